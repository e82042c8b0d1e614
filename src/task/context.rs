//! What a running task sees: Celery's `self.request` ([`Request`]), and what it can ask of the
//! worker through its [`Context`] — a retry ([`Context::retry`], [`Context::retry_with`]), a
//! state update ([`Context::update_state`]), and the time limits (the soft limit it may catch to
//! clean up, [`Context::soft_limit`]; the hard limit's cancel flag, [`Context::is_cancelled`]).

use super::{TaskError, TaskOptions};
use crate::wire::{ExceptionInfo, TaskMessage};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Number, Value};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc};

/// `self.request.delivery_info`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeliveryInfo {
    pub exchange: String,
    /// The queue the message was sent to (direct routing).
    pub routing_key: String,
    pub priority: Option<i64>,
    /// Whether the message was delivered before (restored after a lost worker, or put back).
    pub redelivered: bool,
}

/// Celery's `self.request`: what the message said about this call.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Request {
    pub id: String,
    /// The task name.
    pub task: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub delivery_info: DeliveryInfo,
    /// This worker's node name (`celery@host`).
    pub hostname: String,
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    /// `self.request.group`: the group id, if the task is a group (or chord header) member.
    pub group: Option<String>,
    pub group_index: Option<i64>,
    pub eta: Option<DateTime<Utc>>,
    pub expires: Option<DateTime<Utc>>,
    /// Custom headers (`apply_async(headers={...})`): every header that is not part of
    /// Celery's protocol.
    pub headers: Map<String, Value>,
    /// Retries so far (0 on the first run).
    pub retries: u32,
    /// Always false: a worker never runs a task eagerly.
    pub is_eager: bool,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    /// `[hard, soft]` seconds, as sent.
    pub timelimit: (Option<Number>, Option<Number>),
    /// The producer's node (`gen<pid>@host`).
    pub origin: Option<String>,
}

fn text<'a>(m: Option<&'a Map<String, Value>>, key: &str) -> Option<&'a str> {
    m.and_then(|m| m.get(key)).and_then(Value::as_str)
}

impl Request {
    /// The request of `msg` as this worker (`hostname`) runs it.
    pub fn from_message(msg: &TaskMessage, hostname: &str) -> Self {
        let env = &msg.envelope;
        let headers = env.get("headers").and_then(Value::as_object);
        let props = env.get("properties").and_then(Value::as_object);
        let info = props.and_then(|p| p.get("delivery_info")).and_then(Value::as_object);
        Request {
            id: msg.id.clone(),
            task: msg.task.clone(),
            args: msg.args.clone(),
            kwargs: msg.kwargs.clone(),
            delivery_info: DeliveryInfo {
                exchange: text(info, "exchange").unwrap_or_default().to_owned(),
                routing_key: text(info, "routing_key").unwrap_or_default().to_owned(),
                priority: props.and_then(|p| p.get("priority")).and_then(Value::as_i64),
                redelivered: msg.redelivered,
            },
            hostname: hostname.to_owned(),
            root_id: msg.root_id.clone(),
            parent_id: msg.parent_id.clone(),
            group: msg.group.clone(),
            group_index: msg.group_index,
            eta: msg.eta,
            expires: msg.expires,
            headers: crate::wire::task_write::custom_headers(msg),
            retries: msg.retries,
            is_eager: false,
            correlation_id: text(props, "correlation_id").map(str::to_owned),
            reply_to: text(props, "reply_to").map(str::to_owned),
            timelimit: (msg.hard_time_limit.clone(), msg.soft_time_limit.clone()),
            origin: text(headers, "origin").map(str::to_owned),
        }
    }
}

/// A state the task stored with [`Context::update_state`], for the worker to write.
#[derive(Clone, Debug, PartialEq)]
pub struct StateUpdate {
    pub state: String,
    pub meta: Value,
}

/// The soft limit as the body sees it.
#[derive(Debug, Default)]
pub(crate) struct SoftLimit {
    reached: AtomicBool,
    /// The body asked about the soft limit (so it handles it: it gets the time to the hard
    /// limit to clean up instead of being ended at the soft limit).
    watched: AtomicBool,
    notify: Notify,
    /// When the hard limit ends the task, once known.
    hard_at: OnceLock<Instant>,
}

impl SoftLimit {
    pub(crate) fn reach(&self) {
        self.reached.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub(crate) fn is_watched(&self) -> bool {
        self.watched.load(Ordering::SeqCst)
    }

    pub(crate) fn set_hard_at(&self, at: Instant) {
        let _ = self.hard_at.set(at);
    }
}

/// What a running task knows about its message ([`Request`], Celery's `self.request`), and its
/// way to ask for a retry, store a state, or notice a time limit.
#[derive(Clone, Debug)]
pub struct Context {
    /// The task id.
    pub id: String,
    /// Retries so far (0 on the first run).
    pub retries: u32,
    request: Arc<Request>,
    max_retries: Option<u32>,
    default_retry_delay: Duration,
    pub(crate) cancel: Arc<AtomicBool>,
    pub(crate) soft: Arc<SoftLimit>,
    updates: Option<mpsc::UnboundedSender<StateUpdate>>,
}

impl Context {
    /// A context outside any message (tests, a task calling another in process): the request
    /// holds only the id and retries, and [`update_state`](Self::update_state) stores nothing.
    pub fn new(id: impl Into<String>, retries: u32, options: &TaskOptions) -> Self {
        let id = id.into();
        let request = Request { id: id.clone(), task: options.name.clone(), retries, ..Request::default() };
        Self::with_request(request, options, None)
    }

    /// The context of `msg` run by this worker (`hostname`), with the receiver of its state
    /// updates, which the worker writes in order before the final result.
    pub fn for_message(
        msg: &TaskMessage,
        options: &TaskOptions,
        hostname: &str,
    ) -> (Self, mpsc::UnboundedReceiver<StateUpdate>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self::with_request(Request::from_message(msg, hostname), options, Some(tx)), rx)
    }

    fn with_request(
        request: Request,
        options: &TaskOptions,
        updates: Option<mpsc::UnboundedSender<StateUpdate>>,
    ) -> Self {
        Context {
            id: request.id.clone(),
            retries: request.retries,
            request: Arc::new(request),
            max_retries: options.max_retries,
            default_retry_delay: options.default_retry_delay,
            cancel: Arc::new(AtomicBool::new(false)),
            soft: Arc::new(SoftLimit::default()),
            updates,
        }
    }

    /// Celery's `self.request`.
    pub fn request(&self) -> &Request {
        &self.request
    }

    pub(crate) fn shared_request(&self) -> Arc<Request> {
        self.request.clone()
    }

    /// Celery's `self.retry(exc=..., countdown=...)`: a [`TaskError::Retry`], or — once
    /// `max_retries` is reached — `exc` itself, as Celery re-raises it. `countdown` `None`
    /// means the task's `default_retry_delay`. For `eta`, a per-call `max_retries` or changed
    /// arguments, see [`retry_with`](Self::retry_with).
    pub fn retry(&self, exc: TaskError, countdown: Option<Duration>) -> TaskError {
        let mut r = self.retry_with(exc);
        r.countdown = countdown;
        r.into()
    }

    /// A retry with every option of Celery's `self.retry(...)`; `.into()` (or `?`) makes it the
    /// [`TaskError`] to return.
    pub fn retry_with(&self, exc: TaskError) -> Retry<'_> {
        let exc = match exc {
            TaskError::Raise(e) | TaskError::Retry { exc: e, .. } | TaskError::Reject { exc: e, .. } => e,
            TaskError::Ignore => ExceptionInfo::new("celery.exceptions", "Ignore", vec![]),
        };
        Retry { ctx: self, exc, countdown: None, eta: None, max_retries: None, args: None, kwargs: None }
    }

    /// Celery's `self.update_state(state=..., meta=...)`: store `state` (e.g. `"PROGRESS"`)
    /// with `meta` as its result, readable as `AsyncResult(id).state` / `.info` while the task
    /// runs. Queued, not awaited: the worker writes updates in order, all before the final
    /// result (which replaces them). Outside a worker it stores nothing.
    pub fn update_state(&self, state: &str, meta: impl Serialize) -> Result<(), TaskError> {
        let meta =
            serde_json::to_value(meta).map_err(|e| TaskError::new("kombu.exceptions", "EncodeError", e.to_string()))?;
        if let Some(tx) = &self.updates {
            // The receiver is gone only once the task has ended: nothing left to update.
            let _ = tx.send(StateUpdate { state: state.to_owned(), meta });
        }
        Ok(())
    }

    /// True once the soft time limit has passed. A body that asks (this, or
    /// [`soft_limit`](Self::soft_limit)) handles the soft limit itself: it runs on until the
    /// hard limit ([`time_left`](Self::time_left)) to clean up, and whatever it returns is
    /// stored — e.g. [`TaskError::soft_time_limit_exceeded`]. A body that never asks is ended
    /// at the soft limit with `SoftTimeLimitExceeded`, as an uncaught one ends a Python task.
    pub fn soft_limit_reached(&self) -> bool {
        self.soft.watched.store(true, Ordering::SeqCst);
        self.soft.reached.load(Ordering::SeqCst)
    }

    /// Resolves when the soft time limit passes (never, if the task has none): `select!` it
    /// against the work to clean up. Asking counts as handling it (see
    /// [`soft_limit_reached`](Self::soft_limit_reached)).
    pub fn soft_limit(&self) -> impl Future<Output = ()> + Send + 'static {
        self.soft.watched.store(true, Ordering::SeqCst);
        let soft = self.soft.clone();
        async move {
            loop {
                let notified = soft.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if soft.reached.load(Ordering::SeqCst) {
                    return;
                }
                notified.await;
            }
        }
    }

    /// Time left before the hard time limit ends the task; `None` without a hard limit.
    pub fn time_left(&self) -> Option<Duration> {
        self.soft.hard_at.get().map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// True once the task's hard time limit has passed (or it was terminated): a blocking
    /// body should return at once (its result is discarded; the worker reports the limit).
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// The flag behind [`is_cancelled`](Self::is_cancelled), for loops that take an
    /// `&AtomicBool`.
    pub fn cancel_flag(&self) -> &AtomicBool {
        &self.cancel
    }
}

/// A retry being built ([`Context::retry_with`]): Celery's `self.retry(exc, countdown=,
/// eta=, max_retries=, args=, kwargs=)`.
#[derive(Debug)]
#[must_use = "a retry does nothing until it is returned as the task's error"]
pub struct Retry<'a> {
    ctx: &'a Context,
    exc: ExceptionInfo,
    countdown: Option<Duration>,
    eta: Option<DateTime<Utc>>,
    max_retries: Option<u32>,
    args: Option<Vec<Value>>,
    kwargs: Option<Map<String, Value>>,
}

impl Retry<'_> {
    /// Run again after this long (default: the task's `default_retry_delay`).
    pub fn countdown(mut self, countdown: Duration) -> Self {
        self.countdown = Some(countdown);
        self
    }

    /// Run again at this time (wins over a countdown, as in Celery).
    pub fn eta(mut self, eta: DateTime<Utc>) -> Self {
        self.eta = Some(eta);
        self
    }

    /// The retry limit for this call only (Celery's per-call `max_retries`).
    pub fn max_retries(mut self, max: u32) -> Self {
        self.max_retries = Some(max);
        self
    }

    /// Retry with these positional arguments instead of the request's.
    pub fn args(mut self, args: Vec<Value>) -> Self {
        self.args = Some(args);
        self
    }

    /// Retry with these keyword arguments instead of the request's.
    pub fn kwargs(mut self, kwargs: Map<String, Value>) -> Self {
        self.kwargs = Some(kwargs);
        self
    }
}

impl From<Retry<'_>> for TaskError {
    fn from(r: Retry<'_>) -> Self {
        let max = r.max_retries.or(r.ctx.max_retries);
        // Celery: `request.retries + 1 > max_retries` re-raises the exception.
        if max.is_some_and(|max| r.ctx.retries >= max) {
            return TaskError::Raise(r.exc);
        }
        let countdown = match r.eta {
            Some(eta) => (eta - Utc::now()).to_std().unwrap_or_default(),
            None => r.countdown.unwrap_or(r.ctx.default_retry_delay),
        };
        let changed = (r.args.is_some() || r.kwargs.is_some())
            .then(|| Box::new(super::Arguments { args: r.args, kwargs: r.kwargs }));
        TaskError::Retry { exc: r.exc, countdown, changed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::task_write::NewTask;
    use serde_json::json;

    #[test]
    fn the_request_is_what_the_message_says() {
        let mut t = NewTask::new("t.x", vec![json!(1)], Map::new(), "q1");
        t.root_id = Some("root".into());
        t.parent_id = Some("parent".into());
        t.group = Some("g".into());
        t.group_index = Some(3);
        t.priority = 4;
        t.headers.insert("tenant".into(), json!("acme"));
        let msg = crate::wire::parse_message(&t.to_message("gen1@test").0).unwrap();
        let r = Request::from_message(&msg, "celery@here");
        assert_eq!((r.id.as_str(), r.task.as_str(), &r.args), (t.id.as_str(), "t.x", &vec![json!(1)]));
        assert_eq!((r.root_id.as_deref(), r.parent_id.as_deref()), (Some("root"), Some("parent")));
        assert_eq!((r.group.as_deref(), r.group_index), (Some("g"), Some(3)));
        assert_eq!(r.delivery_info.routing_key, "q1");
        assert_eq!(r.delivery_info.priority, Some(4));
        assert_eq!(r.headers, json!({"tenant": "acme"}).as_object().unwrap().clone(), "only the custom headers");
        assert_eq!((r.hostname.as_str(), r.origin.as_deref(), r.is_eager), ("celery@here", Some("gen1@test"), false));
        assert_eq!(r.correlation_id.as_deref(), Some(t.id.as_str()));
    }

    #[test]
    fn a_per_call_max_retries_and_new_arguments_travel_with_the_retry() {
        let opts = TaskOptions::new("t").max_retries(Some(1));
        let ctx = Context::new("id", 1, &opts);
        let exc = || TaskError::value_error("x");
        assert!(matches!(TaskError::from(ctx.retry_with(exc())), TaskError::Raise(_)), "the task's limit");
        let r: TaskError =
            ctx.retry_with(exc()).max_retries(5).countdown(Duration::from_secs(2)).args(vec![json!(9)]).into();
        assert_eq!(
            r,
            TaskError::Retry {
                exc: ExceptionInfo::builtin("ValueError", "x"),
                countdown: Duration::from_secs(2),
                changed: Some(Box::new(crate::task::Arguments { args: Some(vec![json!(9)]), kwargs: None }))
            }
        );
        let at = Utc::now() + chrono::Duration::seconds(60);
        let TaskError::Retry { countdown, .. } = ctx.retry_with(exc()).max_retries(5).eta(at).into() else {
            panic!("a retry")
        };
        assert!(countdown > Duration::from_secs(58) && countdown <= Duration::from_secs(60), "{countdown:?}");
    }

    #[tokio::test]
    async fn the_soft_limit_resolves_once_reached_and_counts_as_watched() {
        let ctx = Context::new("id", 0, &TaskOptions::new("t"));
        assert!(!ctx.soft.is_watched());
        let waiting = tokio::spawn(ctx.soft_limit());
        assert!(ctx.soft.is_watched());
        assert!(!ctx.soft_limit_reached());
        ctx.soft.reach();
        waiting.await.unwrap();
        assert!(ctx.soft_limit_reached());
        ctx.soft_limit().await; // already reached: at once
    }

    #[test]
    fn state_updates_are_queued_in_order() {
        let t = NewTask::new("t.x", vec![], Map::new(), "celery");
        let msg = crate::wire::parse_message(&t.to_message("gen1@test").0).unwrap();
        let (ctx, mut rx) = Context::for_message(&msg, &TaskOptions::new("t.x"), "celery@here");
        ctx.update_state("PROGRESS", json!({"current": 1, "total": 2})).unwrap();
        ctx.update_state("PROGRESS", json!({"current": 2, "total": 2})).unwrap();
        assert_eq!(rx.try_recv().unwrap().meta["current"], 1);
        assert_eq!(
            rx.try_recv().unwrap(),
            StateUpdate { state: "PROGRESS".into(), meta: json!({"current": 2, "total": 2}) }
        );
        Context::new("id", 0, &TaskOptions::new("t")).update_state("PROGRESS", 1).unwrap();
    }
}
