//! The task API: what a worker runs, under the names Python producers use.
//!
//! A [`Registry`] maps task names to [`Task`]s and is handed to
//! [`worker::run`](crate::worker::run). Most tasks are closures registered with typed
//! parameters — [`Registry::add_async`] for I/O (runs on the async runtime) or
//! [`Registry::add_blocking`] for CPU work (runs on the blocking pool, with a cancel flag the
//! body checks for time limits). Arguments bind like a Python call ([`args`]), so a client gets
//! the `TypeError` a Python worker would give. The built-ins ([`builtin`]) use the same API;
//! Celery's own canvas tasks (`celery.map`, …, [`canvas`]) are added by the worker over yours.
//!
//! ```no_run
//! use celery_autoscale::task::{Registry, TaskError};
//! let registry = Registry::with_builtins()
//!     .add_blocking("tasks.word_count", ["text"], |(text,): (String,), _ctx| {
//!         Ok::<_, TaskError>(text.split_whitespace().count())
//!     });
//! ```

pub mod args;
pub mod builtin;
pub mod canvas;
pub mod context;
pub mod limits;
pub mod rate;
pub mod retry;

pub use args::{Arg, Args, Json, Param, Seconds};
pub use context::{Context, DeliveryInfo, Request, Retry, StateUpdate};
pub use limits::{Ended, Limits};

use crate::wire::ExceptionInfo;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Celery's default `Task.max_retries`.
pub const DEFAULT_MAX_RETRIES: u32 = 3;
/// Celery's default `Task.default_retry_delay`.
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(180);
/// Celery's default `Task.retry_backoff_max`.
pub const DEFAULT_RETRY_BACKOFF_MAX: Duration = Duration::from_secs(600);

/// What a task body returns: the result value (stored as the task's `result`) or an error.
pub type TaskResult = Result<Value, TaskError>;

/// How a task did not succeed.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskError {
    /// The task raised this exception: FAILURE, with `exc_type`/`exc_module`/`exc_message`.
    Raise(ExceptionInfo),
    /// `Task.retry`: RETRY is stored and the message re-sent with `retries + 1` after
    /// `countdown` (with the `changed` arguments instead of the request's). Build it with
    /// [`Context::retry`] or [`Context::retry_with`], which apply `max_retries`.
    Retry { exc: ExceptionInfo, countdown: Duration, changed: Option<Box<Arguments>> },
    /// Celery's `raise Reject(reason, requeue=...)`: with `requeue` the message goes back to
    /// the end of its queue and nothing is stored; without, FAILURE (`Reject`) is stored and
    /// the message dropped, as Celery 5.7 does. Build it with [`TaskError::reject`].
    Reject { exc: ExceptionInfo, requeue: bool },
    /// Celery's `raise Ignore()`: no state is stored, the message is acknowledged.
    Ignore,
}

/// Arguments a retry changes ([`context::Retry::args`], [`context::Retry::kwargs`]); `None`
/// keeps the request's.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Arguments {
    pub args: Option<Vec<Value>>,
    pub kwargs: Option<Map<String, Value>>,
}

impl TaskError {
    /// An exception of any Python type, e.g. `new("myapp.errors", "QuotaExceeded", "...")`.
    /// A client re-raises a `builtins` type as the real class, others as a synthesised one.
    pub fn new(exc_module: &str, exc_type: &str, message: impl Into<String>) -> Self {
        TaskError::Raise(ExceptionInfo::new(exc_module, exc_type, vec![Value::String(message.into())]))
    }

    pub fn type_error(message: impl Into<String>) -> Self {
        TaskError::Raise(ExceptionInfo::builtin("TypeError", message))
    }

    pub fn value_error(message: impl Into<String>) -> Self {
        TaskError::Raise(ExceptionInfo::builtin("ValueError", message))
    }

    pub fn runtime_error(message: impl Into<String>) -> Self {
        TaskError::Raise(ExceptionInfo::builtin("RuntimeError", message))
    }

    /// `Reject(reason, requeue)`.
    pub fn reject(reason: impl Into<String>, requeue: bool) -> Self {
        let exc = ExceptionInfo::new("celery.exceptions", "Reject", vec![Value::String(reason.into()), requeue.into()]);
        TaskError::Reject { exc, requeue }
    }

    /// `SoftTimeLimitExceeded()`, for a body that caught the soft limit
    /// ([`Context::soft_limit`]), cleaned up, and reports it.
    pub fn soft_time_limit_exceeded() -> Self {
        TaskError::Raise(ExceptionInfo::soft_time_limit_exceeded())
    }

    /// The exception stored in the result (for a retry: the one that caused it; `Ignore`,
    /// which stores nothing, is `celery.exceptions.Ignore()`).
    pub fn exception(&self) -> &ExceptionInfo {
        static IGNORE: std::sync::LazyLock<ExceptionInfo> =
            std::sync::LazyLock::new(|| ExceptionInfo::new("celery.exceptions", "Ignore", vec![]));
        match self {
            TaskError::Raise(exc) | TaskError::Retry { exc, .. } | TaskError::Reject { exc, .. } => exc,
            TaskError::Ignore => &IGNORE,
        }
    }
}

impl From<ExceptionInfo> for TaskError {
    fn from(exc: ExceptionInfo) -> Self {
        TaskError::Raise(exc)
    }
}

/// Any Rust error raised with `?` reaches the client as `RuntimeError(<its message>)`.
impl<E: std::error::Error + Send + Sync + 'static> From<E> for TaskError {
    fn from(e: E) -> Self {
        TaskError::runtime_error(e.to_string())
    }
}

/// Per-task options, as Celery's task attributes. A message's own headers (time limits,
/// `ignore_result`) win over these; these win over the worker-wide flags.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskOptions {
    /// The full name producers send, e.g. `tasks.word_count`.
    pub name: String,
    /// Retries allowed through [`Context::retry`] and `autoretry_for`; `None` retries forever.
    /// Default 3.
    pub max_retries: Option<u32>,
    /// Countdown of a retry that names none. Default 180 s.
    pub default_retry_delay: Duration,
    /// Hard limit: the task fails with `TimeLimitExceeded` (an async body is dropped; a
    /// blocking one is told to stop and, if it does not within a second, left behind).
    pub time_limit: Option<Duration>,
    /// Soft limit: a body that watches it ([`Context::soft_limit`]) may clean up until the hard
    /// limit; one that does not fails with `SoftTimeLimitExceeded`.
    pub soft_time_limit: Option<Duration>,
    /// Store no result unless the message asks for one.
    pub ignore_result: bool,
    /// Celery's `rate_limit`: at most this many starts per second per worker (a token bucket;
    /// a task over it waits, held and leased, for its turn). `None`: no limit.
    pub rate_limit: Option<rate::RateLimit>,
    /// Celery's `autoretry_for`: exception kinds (`"module.Type"`, or `"Type"` of any module;
    /// `"Exception"` for all) the body's error is retried for ([`retry::autoretry`]).
    pub autoretry_for: Vec<String>,
    /// Celery's `dont_autoretry_for`: kinds never retried automatically.
    pub dont_autoretry_for: Vec<String>,
    /// Celery's `retry_backoff`: `Some(base)` seconds (Celery's `True` is 1) makes the
    /// automatic retry's countdown `min(retry_backoff_max, base·2^retries)`; `None` uses
    /// `default_retry_delay`.
    pub retry_backoff: Option<u64>,
    /// Celery's `retry_backoff_max`. Default 600 s.
    pub retry_backoff_max: Duration,
    /// Celery's `retry_jitter`: the backoff countdown is drawn from `[0, countdown]`. Default on.
    pub retry_jitter: bool,
}

impl TaskOptions {
    pub fn new(name: impl Into<String>) -> Self {
        TaskOptions {
            name: name.into(),
            max_retries: Some(DEFAULT_MAX_RETRIES),
            default_retry_delay: DEFAULT_RETRY_DELAY,
            time_limit: None,
            soft_time_limit: None,
            ignore_result: false,
            rate_limit: None,
            autoretry_for: Vec::new(),
            dont_autoretry_for: Vec::new(),
            retry_backoff: None,
            retry_backoff_max: DEFAULT_RETRY_BACKOFF_MAX,
            retry_jitter: true,
        }
    }

    /// Retry automatically on these exception kinds (see [`TaskOptions::autoretry_for`]).
    pub fn autoretry_for<S: Into<String>>(mut self, kinds: impl IntoIterator<Item = S>) -> Self {
        self.autoretry_for = kinds.into_iter().map(Into::into).collect();
        self
    }

    pub fn dont_autoretry_for<S: Into<String>>(mut self, kinds: impl IntoIterator<Item = S>) -> Self {
        self.dont_autoretry_for = kinds.into_iter().map(Into::into).collect();
        self
    }

    /// Exponential backoff from `base` seconds (Celery's `retry_backoff=True` is `1`).
    pub fn retry_backoff(mut self, base: u64) -> Self {
        self.retry_backoff = Some(base);
        self
    }

    pub fn retry_backoff_max(mut self, max: Duration) -> Self {
        self.retry_backoff_max = max;
        self
    }

    pub fn retry_jitter(mut self, jitter: bool) -> Self {
        self.retry_jitter = jitter;
        self
    }

    pub fn max_retries(mut self, max: Option<u32>) -> Self {
        self.max_retries = max;
        self
    }

    pub fn default_retry_delay(mut self, delay: Duration) -> Self {
        self.default_retry_delay = delay;
        self
    }

    pub fn time_limit(mut self, limit: Duration) -> Self {
        self.time_limit = Some(limit);
        self
    }

    pub fn soft_time_limit(mut self, limit: Duration) -> Self {
        self.soft_time_limit = Some(limit);
        self
    }

    pub fn ignore_result(mut self, ignore: bool) -> Self {
        self.ignore_result = ignore;
        self
    }

    /// Celery's `rate_limit` in its syntax: `"10/s"`, `"100/m"`, `"1000/h"`, a plain number
    /// (per second); `"0"` is no limit. Panics on a string Celery would refuse (a programming
    /// error, like a bad literal); use [`rate::RateLimit::parse`] for input.
    pub fn rate_limit(mut self, limit: &str) -> Self {
        self.rate_limit = rate::RateLimit::parse(limit).unwrap_or_else(|e| panic!("rate_limit({limit:?}): {e}"));
        self
    }

    /// The name Python uses in `TypeError` texts: the part after the last dot.
    pub fn short_name(&self) -> &str {
        self.name.rsplit('.').next().unwrap_or(&self.name)
    }
}

impl From<&str> for TaskOptions {
    fn from(name: &str) -> Self {
        TaskOptions::new(name)
    }
}

impl From<String> for TaskOptions {
    fn from(name: String) -> Self {
        TaskOptions::new(name)
    }
}

/// A call whose arguments fit its task's signature, ready to run.
pub struct Call(Body);

enum Body {
    Async(Box<dyn FnOnce(Context) -> BoxFuture<'static, TaskResult> + Send>),
    Blocking(Box<dyn FnOnce(&Context) -> TaskResult + Send>),
}

impl Call {
    /// A body that runs on the async runtime (I/O, waiting).
    pub fn future<F, Fut>(body: F) -> Self
    where
        F: FnOnce(Context) -> Fut + Send + 'static,
        Fut: Future<Output = TaskResult> + Send + 'static,
    {
        Call(Body::Async(Box::new(move |ctx| body(ctx).boxed())))
    }

    /// A body that runs on the blocking thread pool (CPU work, blocking libraries).
    pub fn blocking<F>(body: F) -> Self
    where
        F: FnOnce(&Context) -> TaskResult + Send + 'static,
    {
        Call(Body::Blocking(Box::new(body)))
    }

    pub fn is_blocking(&self) -> bool {
        matches!(self.0, Body::Blocking(_))
    }

    /// Run to completion, or until the hard `limit` passes: then `None` (the caller reports
    /// the time limit). A panic in the body is the task's `RuntimeError`, not the worker's.
    /// See [`Call::run_limited`] for the soft limit and what a hard limit does to a blocking
    /// body.
    pub async fn run(self, ctx: Context, limit: Option<Duration>) -> Option<TaskResult> {
        match self.run_limited(ctx, Limits { soft: None, hard: limit }).await {
            Ended::Returned(r) => Some(r),
            Ended::SoftLimit | Ended::HardLimit { .. } => None,
        }
    }
}

struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn panicked(payload: &(dyn std::any::Any + Send)) -> TaskError {
    TaskError::runtime_error(format!("task panicked: {}", panic_text(payload)))
}

/// What a panic said (its `&str` or `String` payload), for logs and stored exceptions.
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// A task the worker can run. Most tasks are closures registered with
/// [`Registry::add_async`] / [`Registry::add_blocking`]; implement this for full control of
/// argument binding.
pub trait Task: Send + Sync + 'static {
    fn options(&self) -> &TaskOptions;

    /// Bind a message's `args`/`kwargs`: a [`Call`], or Python's `TypeError` text.
    fn bind(&self, args: &[Value], kwargs: &Map<String, Value>) -> Result<Call, String>;

    /// Celery's `on_success(retval, task_id, args, kwargs)`: after the body succeeded, before
    /// the result is stored. Hooks run on the worker's async runtime: keep them quick.
    fn on_success(&self, _retval: &Value, _request: &Request) {}

    /// Celery's `on_failure(exc, task_id, args, kwargs, einfo)`: the task failed (its body
    /// raised, hit a time limit, or rejected its message without requeue).
    fn on_failure(&self, _exc: &ExceptionInfo, _request: &Request) {}

    /// Celery's `on_retry(exc, task_id, args, kwargs, einfo)`: the task is being retried.
    fn on_retry(&self, _exc: &ExceptionInfo, _request: &Request) {}

    /// Celery's `after_return(status, retval, task_id, args, kwargs, einfo)`: after every
    /// run, with the state (`SUCCESS`, `FAILURE`, `RETRY`, `REJECTED`, `IGNORED`) and the
    /// result or exception.
    fn after_return(&self, _state: &str, _retval: &Value, _request: &Request) {}

    /// Internal, for the built-in canvas tasks: what a successful run applies from inside the
    /// worker, each sent as a follow-up with no argument (Celery's `celery.chunks` applies a
    /// group of `celery.starmap`). Other tasks send nothing this way.
    #[doc(hidden)]
    fn spawned(&self, _args: &[Value], _kwargs: &Map<String, Value>, _retval: &Value) -> Vec<crate::wire::Signature> {
        Vec::new()
    }
}

/// The tasks a worker serves, by name.
#[derive(Clone, Default)]
pub struct Registry {
    tasks: BTreeMap<String, Arc<dyn Task>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Registry {
    /// No tasks.
    pub fn new() -> Self {
        Self::default()
    }

    /// `tasks.cpu_bound`, `tasks.io_bound`, `tasks.flaky` and `tasks.xsum` (see [`builtin`]).
    pub fn with_builtins() -> Self {
        builtin::register(Self::new())
    }

    /// Add (or replace, by name) a task.
    pub fn add_task(mut self, task: impl Task) -> Self {
        self.tasks.insert(task.options().name.clone(), Arc::new(task));
        self
    }

    /// Add an async task: `body(args, ctx)` runs on the async runtime. `params` names the
    /// parameters in order (a `&str` is required; [`Param::optional`] has a default); `A` is
    /// the tuple of their types.
    pub fn add_async<A, R, F, Fut, P, const N: usize>(
        self,
        options: impl Into<TaskOptions>,
        params: [P; N],
        body: F,
    ) -> Self
    where
        A: Args<N> + Send + 'static,
        R: Serialize + 'static,
        F: Fn(A, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, TaskError>> + Send + 'static,
        P: Into<Param>,
    {
        self.add_task(FnTask {
            options: options.into(),
            params: params.map(Into::into),
            body: Arc::new(body),
            kind: PhantomData::<AsyncBody<A, Fut>>,
        })
    }

    /// Add a blocking task: `body(args, &ctx)` runs on the blocking pool and should check
    /// [`Context::is_cancelled`] now and then if it can run past a time limit.
    pub fn add_blocking<A, R, F, P, const N: usize>(
        self,
        options: impl Into<TaskOptions>,
        params: [P; N],
        body: F,
    ) -> Self
    where
        A: Args<N> + Send + 'static,
        R: Serialize + 'static,
        F: Fn(A, &Context) -> Result<R, TaskError> + Send + Sync + 'static,
        P: Into<Param>,
    {
        self.add_task(FnTask {
            options: options.into(),
            params: params.map(Into::into),
            body: Arc::new(body),
            kind: PhantomData::<BlockingBody<A, R>>,
        })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Task>> {
        self.tasks.get(name)
    }

    /// Registered task names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tasks.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

/// A task whose body is a closure over typed parameters; `K` says how the body runs.
struct FnTask<F, K, const N: usize> {
    options: TaskOptions,
    params: [Param; N],
    body: Arc<F>,
    kind: PhantomData<K>,
}

struct AsyncBody<A, Fut>(PhantomData<fn(A) -> Fut>);
struct BlockingBody<A, R>(PhantomData<fn(A) -> R>);

impl<F, K, const N: usize> FnTask<F, K, N> {
    fn decode<A: Args<N>>(&self, args: &[Value], kwargs: &Map<String, Value>) -> Result<A, String> {
        let short = self.options.short_name();
        let values = args::bind(short, &self.params, args, kwargs)?;
        A::decode(short, &self.params, values)
    }
}

/// The result value as JSON; a value JSON cannot hold fails as kombu's `EncodeError` would.
fn encode<R: Serialize>(r: Result<R, TaskError>) -> TaskResult {
    r.and_then(|v| {
        serde_json::to_value(v).map_err(|e| TaskError::new("kombu.exceptions", "EncodeError", e.to_string()))
    })
}

impl<A, R, F, Fut, const N: usize> Task for FnTask<F, AsyncBody<A, Fut>, N>
where
    A: Args<N> + Send + 'static,
    R: Serialize + 'static,
    F: Fn(A, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, TaskError>> + Send + 'static,
{
    fn options(&self) -> &TaskOptions {
        &self.options
    }

    fn bind(&self, args: &[Value], kwargs: &Map<String, Value>) -> Result<Call, String> {
        let a: A = self.decode(args, kwargs)?;
        let body = self.body.clone();
        Ok(Call::future(move |ctx| body(a, ctx).map(encode)))
    }
}

impl<A, R, F, const N: usize> Task for FnTask<F, BlockingBody<A, R>, N>
where
    A: Args<N> + Send + 'static,
    R: Serialize + 'static,
    F: Fn(A, &Context) -> Result<R, TaskError> + Send + Sync + 'static,
{
    fn options(&self) -> &TaskOptions {
        &self.options
    }

    fn bind(&self, args: &[Value], kwargs: &Map<String, Value>) -> Result<Call, String> {
        let a: A = self.decode(args, kwargs)?;
        let body = self.body.clone();
        Ok(Call::blocking(move |ctx| encode(body(a, ctx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn retry_follows_max_retries_and_the_default_delay() {
        let opts = TaskOptions::new("t").default_retry_delay(Duration::from_secs(7));
        let exc = || TaskError::value_error("x");
        let retry = Context::new("id", 0, &opts).retry(exc(), None);
        assert_eq!(
            retry,
            TaskError::Retry {
                exc: ExceptionInfo::builtin("ValueError", "x"),
                countdown: Duration::from_secs(7),
                changed: None
            }
        );
        assert_eq!(
            Context::new("id", 3, &opts).retry(exc(), Some(Duration::ZERO)),
            exc(),
            "max_retries reached: raise exc"
        );
        let forever = opts.max_retries(None);
        assert!(matches!(Context::new("id", 1000, &forever).retry(exc(), None), TaskError::Retry { .. }));
    }

    #[tokio::test]
    async fn closures_bind_run_and_report_panics() {
        let r = Registry::new()
            .add_blocking("m.double", ["n"], |(n,): (i64,), _ctx| Ok::<_, TaskError>(n * 2))
            .add_async("m.boom", [Param::optional("why", "because")], |(why,): (String,), _ctx| async move {
                if why == "panic" {
                    panic!("boom");
                }
                Err::<(), _>(TaskError::new("m.errors", "Boom", why))
            });
        assert_eq!(r.names().collect::<Vec<_>>(), ["m.boom", "m.double"]);
        let run = |name: &str, args: Value| {
            let task = r.get(name).unwrap().clone();
            let args = args.as_array().unwrap().clone();
            async move {
                let call = task.bind(&args, &Map::new())?;
                Ok::<_, String>(call.run(Context::new("id", 0, task.options()), None).await.unwrap())
            }
        };
        assert_eq!(run("m.double", json!([21])).await, Ok(Ok(json!(42))));
        assert_eq!(run("m.double", json!(["x"])).await.unwrap_err(), "double() argument 'n' must be int, not str");
        assert_eq!(run("m.boom", json!([])).await, Ok(Err(TaskError::new("m.errors", "Boom", "because"))));
        assert_eq!(run("m.boom", json!(["panic"])).await, Ok(Err(TaskError::runtime_error("task panicked: boom"))));
    }

    #[tokio::test]
    async fn an_abandoned_blocking_body_is_told_to_stop() {
        let (tx, rx) = std::sync::mpsc::channel();
        let call = Call::blocking(move |ctx| {
            tx.send("started").unwrap();
            let counted = builtin::count_primes(1 << 40, ctx.cancel_flag());
            tx.send(if counted.is_none() { "cancelled" } else { "ran to the end" }).unwrap();
            Ok(Value::Null)
        });
        let run = tokio::spawn(call.run(Context::new("id", 0, &TaskOptions::new("t")), None));
        let rx = tokio::task::spawn_blocking(move || {
            let started = rx.recv_timeout(Duration::from_secs(30));
            (started, rx)
        });
        let (started, rx) = rx.await.unwrap();
        assert_eq!(started, Ok("started"));
        run.abort(); // what the worker does to tasks still running after its shutdown timeout
        let ended = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60))).await.unwrap();
        assert_eq!(ended, Ok("cancelled"));
    }
}
