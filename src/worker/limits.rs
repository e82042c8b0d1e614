//! Per-task limits a worker keeps and remote control changes live: the rate limit (one token
//! bucket per task name, as Celery's consumer keeps) and the time limits `control time_limit`
//! sets.
//!
//! The bucket is kombu's `TokenBucket` with capacity 1: a task may start when a token is there,
//! and tokens come back at the limit's rate. A task over the limit waits for its token after its
//! ETA and before a run slot, its message held and leased all the while (never dropped or put
//! back), as Celery's worker holds it in the bucket. Waiters are served in arrival order: each
//! takes a token ahead of time and sleeps until it is due. A new limit (remote control) replaces
//! the bucket, full, as Celery's `reset_rate_limits` does, and the waiters queue on the new one.

use crate::runtime::sync::Locked;
use crate::task::rate::RateLimit;
use crate::task::{Registry, TaskOptions};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The longest wait one reservation computes (a tiny rate would otherwise ask the timer for
/// ages): 30 days, the longest duration any flag takes.
const MAX_WAIT: Duration = crate::runtime::args::MAX_DURATION;

/// kombu's `TokenBucket(fill_rate, capacity=1)`, reserving ahead: [`Bucket::reserve`] always
/// takes a token, letting the level go below zero, and says how long until that token is due.
#[derive(Debug)]
pub struct Bucket {
    fill_rate: f64,
    tokens: f64,
    stamp: Instant,
}

impl Bucket {
    /// Full (one token), as kombu's starts.
    pub fn new(per_second: f64, now: Instant) -> Self {
        Bucket { fill_rate: per_second, tokens: 1.0, stamp: now }
    }

    /// Take the next token; the wait until it is due (zero when one is there now).
    pub fn reserve(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.stamp).as_secs_f64();
        self.tokens = (self.tokens + self.fill_rate * elapsed).min(1.0);
        self.stamp = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::try_from_secs_f64(-self.tokens / self.fill_rate).unwrap_or(MAX_WAIT).min(MAX_WAIT)
        }
    }

    /// Give back a token taken by [`Bucket::reserve`] whose task did not wait for it.
    fn give_back(&mut self) {
        self.tokens = (self.tokens + 1.0).min(1.0);
    }
}

#[derive(Debug, Default)]
struct PerTask {
    /// The limit as Celery's task attribute holds it (`None`: never set). `text` may say "no
    /// limit" (`"0"`), which `inspect registered` still shows, as Celery does.
    rate_text: Option<String>,
    bucket: Option<Bucket>,
    /// Set by `control time_limit`: (soft, hard), each `None` = none for the task.
    time_limits: Option<(Option<Duration>, Option<Duration>)>,
}

/// Why `control rate_limit` / `time_limit` refused.
#[derive(Debug, PartialEq, Eq)]
pub enum LimitError {
    UnknownTask,
}

/// Every registered task's limits.
pub struct TaskLimits {
    tasks: Mutex<BTreeMap<String, PerTask>>,
    /// Bumped when a rate limit changes, so waiters reserve on the new bucket.
    changed: watch::Sender<u64>,
}

impl TaskLimits {
    /// From each task's options, then `flags` (the worker's `--rate-limit`, which win).
    /// Fails with the names of flags' tasks the registry does not have.
    pub fn new(registry: &Registry, flags: &[(String, Option<RateLimit>)]) -> Result<Self, Vec<String>> {
        let now = Instant::now();
        let mut tasks: BTreeMap<String, PerTask> = registry
            .names()
            .map(|name| {
                let rate = registry.get(name).and_then(|t| t.options().rate_limit.clone());
                let per = PerTask {
                    rate_text: rate.as_ref().map(|r| r.as_str().to_owned()),
                    bucket: rate.map(|r| Bucket::new(r.per_second(), now)),
                    time_limits: None,
                };
                (name.to_owned(), per)
            })
            .collect();
        let mut unknown = Vec::new();
        for (name, rate) in flags {
            match tasks.get_mut(name) {
                Some(per) => {
                    per.rate_text = Some(rate.as_ref().map_or_else(|| "0".to_owned(), |r| r.as_str().to_owned()));
                    per.bucket = rate.as_ref().map(|r| Bucket::new(r.per_second(), now));
                }
                None => unknown.push(name.clone()),
            }
        }
        if !unknown.is_empty() {
            return Err(unknown);
        }
        Ok(TaskLimits { tasks: Mutex::new(tasks), changed: watch::channel(0).0 })
    }

    /// Wait for `task`'s token (at once when it has no limit). Cancel-safe: a waiter dropped
    /// before its token is due gives it back.
    pub async fn acquire(&self, task: &str) {
        let mut changes = self.changed.subscribe();
        loop {
            let wait = {
                let mut tasks = self.tasks.locked();
                match tasks.get_mut(task).and_then(|p| p.bucket.as_mut()) {
                    None => return,
                    Some(bucket) => bucket.reserve(Instant::now()),
                }
            };
            if wait.is_zero() {
                return;
            }
            let mut guard = GiveBack { limits: self, task, armed: true };
            tokio::select! {
                () = tokio::time::sleep(wait) => {
                    guard.armed = false;
                    return;
                }
                // The bucket was replaced: the token taken is gone with the old one.
                _ = changes.changed() => guard.armed = false,
            }
        }
    }

    /// `control rate_limit`: set (`Some`) or clear the limit; `text` is kept as Celery keeps
    /// the attribute (what `registered` shows).
    pub fn set_rate(&self, task: &str, text: Option<String>, rate: Option<RateLimit>) -> Result<(), LimitError> {
        {
            let mut tasks = self.tasks.locked();
            let per = tasks.get_mut(task).ok_or(LimitError::UnknownTask)?;
            per.rate_text = text;
            per.bucket = rate.map(|r| Bucket::new(r.per_second(), Instant::now()));
        }
        self.changed.send_modify(|v| *v += 1);
        Ok(())
    }

    /// `control time_limit`: the task's soft and hard limits from now on (`None`: none for
    /// the task, so the worker's `--soft-time-limit`/`--time-limit` apply).
    pub fn set_time_limits(
        &self,
        task: &str,
        soft: Option<Duration>,
        hard: Option<Duration>,
    ) -> Result<(), LimitError> {
        let mut tasks = self.tasks.locked();
        let per = tasks.get_mut(task).ok_or(LimitError::UnknownTask)?;
        per.time_limits = Some((soft, hard));
        Ok(())
    }

    /// The task's options with the time limits remote control set, if it set any.
    pub fn options<'a>(&self, options: &'a TaskOptions) -> Cow<'a, TaskOptions> {
        let set = self.tasks.locked().get(&options.name).and_then(|p| p.time_limits);
        match set {
            None => Cow::Borrowed(options),
            Some((soft, hard)) => {
                let mut o = options.clone();
                o.soft_time_limit = soft;
                o.time_limit = hard;
                Cow::Owned(o)
            }
        }
    }

    /// Whether `task` is registered.
    pub fn knows(&self, task: &str) -> bool {
        self.tasks.locked().contains_key(task)
    }

    /// Every task name with its rate-limit text when one was set, sorted by name.
    pub fn rates(&self) -> Vec<(String, Option<String>)> {
        self.tasks.locked().iter().map(|(n, p)| (n.clone(), p.rate_text.clone())).collect()
    }
}

/// Returns a reserved token when its waiter is dropped before the token is due (a revoke or a
/// shutdown ended the wait), so the next waiter is not delayed by a task that never ran.
struct GiveBack<'a> {
    limits: &'a TaskLimits,
    task: &'a str,
    armed: bool,
}

impl Drop for GiveBack<'_> {
    fn drop(&mut self) {
        if self.armed
            && let Some(b) = self.limits.tasks.locked().get_mut(self.task).and_then(|p| p.bucket.as_mut())
        {
            b.give_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_lets_one_through_then_one_per_interval() {
        let t0 = Instant::now();
        let mut b = Bucket::new(0.5, t0); // 30/m
        assert_eq!(b.reserve(t0), Duration::ZERO, "full at first");
        assert_eq!(b.reserve(t0), Duration::from_secs(2));
        assert_eq!(b.reserve(t0), Duration::from_secs(4), "waiters queue behind each other");
        // Ten at once: the tenth waits 18 s.
        let mut b = Bucket::new(0.5, t0);
        let waits: Vec<Duration> = (0..10).map(|_| b.reserve(t0)).collect();
        assert_eq!(waits[9], Duration::from_secs(18));
        // Idle time refills, but never beyond one token.
        let mut b = Bucket::new(10.0, t0);
        b.reserve(t0);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(b.reserve(later), Duration::ZERO);
        assert_eq!(b.reserve(later), Duration::from_millis(100));
    }

    #[test]
    fn a_token_given_back_is_the_next_waiters() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1.0, t0);
        b.reserve(t0);
        assert_eq!(b.reserve(t0), Duration::from_secs(1));
        b.give_back();
        assert_eq!(b.reserve(t0), Duration::from_secs(1));
    }

    fn registry() -> Registry {
        crate::task::builtin::register(Registry::new())
    }

    #[tokio::test]
    async fn acquire_waits_for_the_token_and_a_new_limit_applies_to_waiters() {
        let flags = [("tasks.io_bound".to_owned(), RateLimit::parse("1/h").unwrap())];
        let limits = std::sync::Arc::new(TaskLimits::new(&registry(), &flags).unwrap());
        // The first token is there; a task without a limit never waits.
        tokio::time::timeout(Duration::from_secs(30), async {
            limits.acquire("tasks.io_bound").await;
            limits.acquire("tasks.cpu_bound").await;
        })
        .await
        .unwrap();
        let l = limits.clone();
        let waiter = tokio::spawn(async move { l.acquire("tasks.io_bound").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiter.is_finished(), "1/h: the second waits");
        limits.set_rate("tasks.io_bound", None, None).unwrap();
        tokio::time::timeout(Duration::from_secs(30), waiter).await.expect("cleared: it goes at once").unwrap();
        assert_eq!(limits.set_rate("nope", None, None), Err(LimitError::UnknownTask));
    }

    #[test]
    fn flags_win_over_task_options_and_must_name_known_tasks() {
        let reg = Registry::new().add_async(
            TaskOptions::new("t.a").rate_limit("10/s"),
            ["x"],
            |(_,): (serde_json::Value,), _| async { Ok::<_, crate::task::TaskError>(()) },
        );
        let limits = TaskLimits::new(&reg, &[]).unwrap();
        assert_eq!(limits.rates(), vec![("t.a".to_owned(), Some("10/s".to_owned()))]);
        let flags = [("t.a".to_owned(), RateLimit::parse("30/m").unwrap())];
        assert_eq!(TaskLimits::new(&reg, &flags).unwrap().rates()[0].1.as_deref(), Some("30/m"));
        let unknown = [("t.b".to_owned(), None)];
        assert_eq!(TaskLimits::new(&reg, &unknown).err(), Some(vec!["t.b".to_owned()]));
    }
}
