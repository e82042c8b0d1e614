//! Time limits as a running body meets them ([`Call::run_limited`]):
//!
//! - **soft limit**: the body's [`Context::soft_limit`] resolves (and
//!   [`Context::soft_limit_reached`] turns true). A body that watches it runs on until the hard
//!   limit to clean up, and what it then returns is the outcome; a body that never asked is
//!   ended there ([`Ended::SoftLimit`]: an async one is dropped, a blocking one told to stop
//!   through [`Context::is_cancelled`] and waited for), as an uncaught `SoftTimeLimitExceeded`
//!   ends a Python task.
//! - **hard limit**: an async body is dropped. A blocking body is told to stop and given
//!   [`HARD_LIMIT_GRACE`]; a thread cannot be killed safely, so one that is still running then is
//!   left behind ([`Ended::HardLimit`] `abandoned`): the task's slot is freed and the next task
//!   runs on another thread of the blocking pool while the abandoned one keeps its core busy
//!   until its body returns (its result is discarded).

use super::{Body, Call, CancelOnDrop, Context, TaskError, TaskResult, panicked};
use futures::FutureExt as _;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How long a blocking body has to return once told of its hard limit before it is left
/// behind.
pub const HARD_LIMIT_GRACE: Duration = Duration::from_secs(1);

/// The limits of one run, from its start. A soft limit not below the hard one never fires.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limits {
    pub soft: Option<Duration>,
    pub hard: Option<Duration>,
}

/// How a run ended.
#[derive(Debug, PartialEq)]
pub enum Ended {
    /// The body returned (a panic is its `RuntimeError`).
    Returned(TaskResult),
    /// Ended at the soft limit, which the body did not watch.
    SoftLimit,
    /// Ended at the hard limit; `abandoned`: a blocking body still running a
    /// [`HARD_LIMIT_GRACE`] after it was told to stop, left to finish on its own.
    HardLimit { abandoned: bool },
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl Call {
    /// Run under `limits` (see the module docs); [`Call::run`] is this with a hard limit only.
    pub async fn run_limited(self, ctx: Context, limits: Limits) -> Ended {
        let start = Instant::now();
        let hard_at = limits.hard.map(|h| start + h);
        let soft_at = limits.soft.filter(|s| limits.hard.is_none_or(|h| *s < h)).map(|s| start + s);
        if let Some(at) = hard_at {
            ctx.soft.set_hard_at(at);
        }
        let soft = ctx.soft.clone();
        match self.0 {
            Body::Async(body) => {
                let mut fut = AssertUnwindSafe(body(ctx)).catch_unwind();
                let done = |r: Result<TaskResult, Box<dyn std::any::Any + Send>>| {
                    Ended::Returned(r.unwrap_or_else(|p| Err(panicked(p.as_ref()))))
                };
                tokio::select! {
                    r = &mut fut => return done(r),
                    () = sleep_until(soft_at) => {}
                    () = sleep_until(hard_at) => return Ended::HardLimit { abandoned: false },
                }
                soft.reach();
                if !soft.is_watched() {
                    return Ended::SoftLimit;
                }
                tokio::select! {
                    r = &mut fut => done(r),
                    () = sleep_until(hard_at) => Ended::HardLimit { abandoned: false },
                }
            }
            Body::Blocking(body) => {
                // Also when this future is dropped (revoke --terminate, or the worker abandons
                // a task at the end of its shutdown timeout): the thread is told to stop.
                let cancel = CancelOnDrop(ctx.cancel.clone());
                let flag = ctx.cancel.clone();
                let mut handle = tokio::task::spawn_blocking(move || body(&ctx));
                let joined = |j: Result<TaskResult, tokio::task::JoinError>| {
                    j.unwrap_or_else(|e| match e.try_into_panic() {
                        Ok(p) => Err(panicked(p.as_ref())),
                        Err(e) => Err(TaskError::runtime_error(format!("task thread failed: {e}"))),
                    })
                };
                tokio::select! {
                    j = &mut handle => return Ended::Returned(joined(j)),
                    () = sleep_until(soft_at) => {}
                    () = sleep_until(hard_at) => return hard_limit(handle, cancel).await,
                }
                soft.reach();
                let watched = soft.is_watched();
                if !watched {
                    flag.store(true, Ordering::Relaxed);
                }
                tokio::select! {
                    j = &mut handle => if watched { Ended::Returned(joined(j)) } else { Ended::SoftLimit },
                    () = sleep_until(hard_at) => hard_limit(handle, cancel).await,
                }
            }
        }
    }
}

/// Tell the blocking body to stop, give it [`HARD_LIMIT_GRACE`], else leave it behind.
async fn hard_limit(handle: tokio::task::JoinHandle<TaskResult>, cancel: CancelOnDrop) -> Ended {
    drop(cancel);
    let abandoned = tokio::time::timeout(HARD_LIMIT_GRACE, handle).await.is_err();
    Ended::HardLimit { abandoned }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::TaskOptions;
    use serde_json::{Value, json};

    fn ctx() -> Context {
        Context::new("id", 0, &TaskOptions::new("t"))
    }

    fn limits(soft: u64, hard: u64) -> Limits {
        Limits { soft: Some(Duration::from_millis(soft)), hard: Some(Duration::from_millis(hard)) }
    }

    #[tokio::test]
    async fn an_async_body_that_watches_the_soft_limit_cleans_up_and_its_result_stands() {
        let call = Call::future(|ctx: Context| async move {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(60)) => Ok(json!("finished")),
                () = ctx.soft_limit() => {
                    assert!(ctx.time_left().is_some_and(|t| t > Duration::ZERO), "grace before the hard limit");
                    Ok(json!("cleaned up"))
                }
            }
        });
        assert_eq!(call.run_limited(ctx(), limits(50, 10_000)).await, Ended::Returned(Ok(json!("cleaned up"))));
        let unwatched = Call::future(|_ctx| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(Value::Null)
        });
        assert_eq!(unwatched.run_limited(ctx(), limits(50, 10_000)).await, Ended::SoftLimit);
        let ignoring = Call::future(|ctx: Context| async move {
            let _ = ctx.soft_limit_reached();
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(Value::Null)
        });
        assert_eq!(ignoring.run_limited(ctx(), limits(20, 100)).await, Ended::HardLimit { abandoned: false });
    }

    #[tokio::test]
    async fn a_blocking_body_polls_the_soft_limit_and_one_that_ignores_the_hard_limit_is_left_behind() {
        let polling = Call::blocking(|ctx| {
            while !ctx.soft_limit_reached() {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(TaskError::soft_time_limit_exceeded())
        });
        assert_eq!(
            polling.run_limited(ctx(), limits(50, 10_000)).await,
            Ended::Returned(Err(TaskError::soft_time_limit_exceeded()))
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let stubborn = Call::blocking(move |_ctx| {
            std::thread::sleep(Duration::from_millis(1500));
            let _ = tx.send("returned at last");
            Ok(Value::Null)
        });
        let ended = stubborn.run_limited(ctx(), Limits { soft: None, hard: Some(Duration::from_millis(20)) }).await;
        assert_eq!(ended, Ended::HardLimit { abandoned: true });
        let late = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30))).await.unwrap();
        assert_eq!(late, Ok("returned at last"), "the abandoned thread ran on to its end");
        let cooperative = Call::blocking(|ctx| {
            while !ctx.is_cancelled() {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(Value::Null)
        });
        let ended = cooperative.run_limited(ctx(), Limits { soft: None, hard: Some(Duration::from_millis(20)) }).await;
        assert_eq!(ended, Ended::HardLimit { abandoned: false });
    }
}
