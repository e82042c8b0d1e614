//! The task set, under the names Python producers use. Arguments bind like a Python call
//! (positional or keyword, with Python's TypeError wording), so a client sees the same errors
//! it would from a Python worker.

use crate::wire::ExceptionInfo;
use serde_json::{Map, Number, Value};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub const CPU_BOUND: &str = "tasks.cpu_bound";
pub const IO_BOUND: &str = "tasks.io_bound";
pub const FLAKY: &str = "tasks.flaky";
/// Every registered task name (metrics pre-create their series).
pub const REGISTERED: [&str; 3] = [CPU_BOUND, IO_BOUND, FLAKY];
/// Celery's default `max_retries`.
pub const MAX_RETRIES: u32 = 3;

/// A task call whose arguments fit its signature.
#[derive(Clone, Debug, PartialEq)]
pub enum Call {
    /// `tasks.cpu_bound(n: int) -> int`: the number of primes ≤ n, by trial division.
    CpuBound { n: u64 },
    /// `tasks.io_bound(seconds: float) -> float`: waits without holding a thread; returns
    /// `seconds` as given.
    IoBound { seconds: Duration, echo: Value },
    /// `tasks.flaky(fail_times: int, countdown: float = 1.0) -> int`: fails with a retry until
    /// it has been retried `fail_times` times, then returns the number of retries. A demo of
    /// Celery's retry protocol (RETRY state, re-sent message with `retries + 1` and an ETA).
    Flaky { fail_times: u32, countdown: Duration },
}

/// Why a call could not be bound.
#[derive(Clone, Debug, PartialEq)]
pub enum BindError {
    NotRegistered,
    /// Python's `TypeError` text.
    Arguments(String),
}

/// The result of running a call.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Success(Value),
    Failure(ExceptionInfo),
    Retry { exc: ExceptionInfo, countdown: Duration },
}

/// Bind `args`/`kwargs` to the named task.
pub fn bind(task: &str, args: &[Value], kwargs: &Map<String, Value>) -> Result<Call, BindError> {
    let short = task.rsplit('.').next().unwrap_or(task);
    match task {
        CPU_BOUND => {
            let [n] = bind_params(short, &[("n", None)], args, kwargs)?;
            Ok(Call::CpuBound { n: int_arg(short, "n", &n)?.max(0) as u64 })
        }
        IO_BOUND => {
            let [seconds] = bind_params(short, &[("seconds", None)], args, kwargs)?;
            Ok(Call::IoBound { seconds: seconds_arg(short, "seconds", &seconds)?, echo: seconds })
        }
        FLAKY => {
            let [fail_times, countdown] =
                bind_params(short, &[("fail_times", None), ("countdown", Some(Value::from(1.0)))], args, kwargs)?;
            let fail_times = int_arg(short, "fail_times", &fail_times)?.clamp(0, i64::from(u32::MAX)) as u32;
            Ok(Call::Flaky { fail_times, countdown: seconds_arg(short, "countdown", &countdown)? })
        }
        _ => Err(BindError::NotRegistered),
    }
}

/// Python's binding of positional and keyword arguments to parameters with optional defaults.
fn bind_params<const N: usize>(
    func: &str,
    params: &[(&str, Option<Value>); N],
    args: &[Value],
    kwargs: &Map<String, Value>,
) -> Result<[Value; N], BindError> {
    let err = |m: String| Err(BindError::Arguments(m));
    if args.len() > N {
        let plural = if N == 1 { "" } else { "s" };
        return err(format!("{func}() takes {N} positional argument{plural} but {} were given", args.len()));
    }
    if let Some(unknown) = kwargs.keys().find(|k| !params.iter().any(|(p, _)| p == k)) {
        return err(format!("{func}() got an unexpected keyword argument '{unknown}'"));
    }
    let mut out: [Value; N] = std::array::from_fn(|_| Value::Null);
    let mut missing = Vec::new();
    for (i, (name, default)) in params.iter().enumerate() {
        match (args.get(i), kwargs.get(*name)) {
            (Some(_), Some(_)) => return err(format!("{func}() got multiple values for argument '{name}'")),
            (Some(v), None) | (None, Some(v)) => out[i] = v.clone(),
            (None, None) => match default {
                Some(d) => out[i] = d.clone(),
                None => missing.push(format!("'{name}'")),
            },
        }
    }
    match missing.len() {
        0 => Ok(out),
        1 => err(format!("{func}() missing 1 required positional argument: {}", missing[0])),
        n => err(format!("{func}() missing {n} required positional arguments: {}", missing.join(" and "))),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_i64() || n.is_u64() => "int",
        Value::Number(_) => "float",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

fn int_arg(func: &str, name: &str, v: &Value) -> Result<i64, BindError> {
    match v {
        Value::Number(n) if n.is_i64() => Ok(n.as_i64().unwrap_or(0)),
        Value::Number(n) if n.is_u64() => Ok(i64::MAX),
        other => Err(BindError::Arguments(format!("{func}() argument '{name}' must be int, not {}", type_name(other)))),
    }
}

/// A duration in seconds: an int, a float, or kombu's `{"__type__": "decimal"}`.
fn seconds_arg(func: &str, name: &str, v: &Value) -> Result<Duration, BindError> {
    let secs = match v {
        Value::Number(n) => number_f64(n),
        Value::Object(o) if o.get("__type__").and_then(Value::as_str) == Some("decimal") => {
            o.get("__value__").and_then(Value::as_str).and_then(|s| s.parse::<f64>().ok())
        }
        _ => None,
    };
    let Some(secs) = secs else {
        return Err(BindError::Arguments(format!(
            "{func}() argument '{name}' must be a real number, not {}",
            type_name(v)
        )));
    };
    Duration::try_from_secs_f64(secs).map_err(|_| {
        BindError::Arguments(format!("{func}() argument '{name}' must be a non-negative number of seconds, got {v}"))
    })
}

fn number_f64(n: &Number) -> Option<f64> {
    n.as_f64().filter(|f| f.is_finite())
}

/// What a running task knows about its message.
#[derive(Clone, Debug, Default)]
pub struct Context {
    pub retries: u32,
}

impl Call {
    /// CPU-bound calls run on the blocking pool; the rest on the async runtime.
    pub fn is_cpu_bound(&self) -> bool {
        matches!(self, Call::CpuBound { .. })
    }

    /// Run to completion, or until `limit` passes: then `None` (the caller reports the time
    /// limit). A CPU-bound call is stopped cooperatively and waited for, so a timed-out task
    /// never keeps a core busy behind the worker's back.
    pub async fn run(self, ctx: Context, limit: Option<Duration>) -> Option<Outcome> {
        let deadline = async move {
            match limit {
                Some(l) => tokio::time::sleep(l).await,
                None => std::future::pending().await,
            }
        };
        match self {
            Call::CpuBound { n } => {
                let cancel = Arc::new(AtomicBool::new(false));
                let flag = cancel.clone();
                let mut handle = tokio::task::spawn_blocking(move || count_primes(n, &flag));
                let counted = tokio::select! {
                    joined = &mut handle => joined,
                    () = deadline => {
                        cancel.store(true, Ordering::Relaxed);
                        let _ = handle.await;
                        return None;
                    }
                };
                Some(match counted {
                    Ok(Some(count)) => Outcome::Success(Value::from(count)),
                    Ok(None) => return None,
                    Err(join) => {
                        Outcome::Failure(ExceptionInfo::builtin("RuntimeError", format!("task thread failed: {join}")))
                    }
                })
            }
            // A zero wait must not round up to the timer's 1 ms tick.
            Call::IoBound { seconds, echo } if seconds.is_zero() => Some(Outcome::Success(echo)),
            Call::IoBound { seconds, echo } => tokio::select! {
                () = tokio::time::sleep(seconds) => Some(Outcome::Success(echo)),
                () = deadline => None,
            },
            Call::Flaky { fail_times, countdown } => {
                if ctx.retries >= fail_times {
                    return Some(Outcome::Success(Value::from(ctx.retries)));
                }
                let exc = ExceptionInfo::builtin(
                    "RuntimeError",
                    format!("flaky: attempt {} of {} fails on purpose", ctx.retries + 1, fail_times + 1),
                );
                if ctx.retries >= MAX_RETRIES {
                    // Task.retry(exc=...) re-raises exc once max_retries is reached.
                    return Some(Outcome::Failure(exc));
                }
                Some(Outcome::Retry { exc, countdown })
            }
        }
    }
}

/// The number of primes ≤ n by trial division over odd divisors — the same algorithm as the
/// Python baseline in `tests/python/tasks.py`, so benchmarks compare like with like. Checks
/// `cancel` every 4096 numbers; returns `None` when cancelled.
pub fn count_primes(n: u64, cancel: &AtomicBool) -> Option<u64> {
    let mut count = 0;
    for i in 2..=n {
        if i % 4096 == 0 && cancel.load(Ordering::Relaxed) {
            return None;
        }
        if is_prime(i) {
            count += 1;
        }
    }
    Some(count)
}

fn is_prime(i: u64) -> bool {
    if i < 4 {
        return i >= 2;
    }
    if i.is_multiple_of(2) {
        return false;
    }
    let mut d = 3u64;
    while d.saturating_mul(d) <= i {
        if i.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kw(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn primes() {
        let no = AtomicBool::new(false);
        let counts: Vec<u64> =
            [0, 1, 2, 3, 4, 10, 100, 1000, 10_000].iter().map(|n| count_primes(*n, &no).unwrap()).collect();
        assert_eq!(counts, [0, 0, 1, 2, 2, 4, 25, 168, 1229]);
        assert_eq!(count_primes(1 << 40, &AtomicBool::new(true)), None);
    }

    #[test]
    fn binding_like_python() {
        assert_eq!(bind(CPU_BOUND, &[json!(10)], &Map::new()), Ok(Call::CpuBound { n: 10 }));
        assert_eq!(bind(CPU_BOUND, &[], &kw(json!({"n": 7}))), Ok(Call::CpuBound { n: 7 }));
        assert_eq!(bind(CPU_BOUND, &[json!(-5)], &Map::new()), Ok(Call::CpuBound { n: 0 }));
        let e = |r: Result<Call, BindError>| match r {
            Err(BindError::Arguments(m)) => m,
            other => panic!("{other:?}"),
        };
        assert_eq!(e(bind(CPU_BOUND, &[], &Map::new())), "cpu_bound() missing 1 required positional argument: 'n'");
        assert_eq!(
            e(bind(CPU_BOUND, &[json!(1), json!(2)], &Map::new())),
            "cpu_bound() takes 1 positional argument but 2 were given"
        );
        assert_eq!(
            e(bind(CPU_BOUND, &[json!(1)], &kw(json!({"n": 2})))),
            "cpu_bound() got multiple values for argument 'n'"
        );
        assert_eq!(e(bind(CPU_BOUND, &[], &kw(json!({"m": 2})))), "cpu_bound() got an unexpected keyword argument 'm'");
        assert_eq!(e(bind(CPU_BOUND, &[json!("10")], &Map::new())), "cpu_bound() argument 'n' must be int, not str");
        assert_eq!(e(bind(CPU_BOUND, &[json!(1.5)], &Map::new())), "cpu_bound() argument 'n' must be int, not float");
        assert_eq!(
            e(bind(IO_BOUND, &[json!(-1)], &Map::new())),
            "io_bound() argument 'seconds' must be a non-negative number of seconds, got -1"
        );
        assert_eq!(
            e(bind(IO_BOUND, &[json!(null)], &Map::new())),
            "io_bound() argument 'seconds' must be a real number, not NoneType"
        );
        assert_eq!(
            e(bind(IO_BOUND, &[json!(1e300)], &Map::new())),
            "io_bound() argument 'seconds' must be a non-negative number of seconds, got 1e+300"
        );
        assert_eq!(bind("tasks.nope", &[], &Map::new()), Err(BindError::NotRegistered));
        let dec = json!({"__type__": "decimal", "__value__": "0.25"});
        assert_eq!(
            bind(IO_BOUND, std::slice::from_ref(&dec), &Map::new()),
            Ok(Call::IoBound { seconds: Duration::from_millis(250), echo: dec })
        );
        assert_eq!(
            bind(FLAKY, &[json!(2)], &Map::new()),
            Ok(Call::Flaky { fail_times: 2, countdown: Duration::from_secs(1) })
        );
    }

    #[tokio::test]
    async fn flaky_retries_then_succeeds_or_gives_up() {
        let run = |fail_times, retries| async move {
            Call::Flaky { fail_times, countdown: Duration::ZERO }.run(Context { retries }, None).await.unwrap()
        };
        assert!(matches!(run(2, 0).await, Outcome::Retry { .. }));
        assert_eq!(run(2, 2).await, Outcome::Success(json!(2)));
        assert!(matches!(run(10, 3).await, Outcome::Failure(_)));
    }

    #[tokio::test]
    async fn cpu_bound_stops_at_its_time_limit() {
        let started = std::time::Instant::now();
        let out = Call::CpuBound { n: 1 << 40 }.run(Context::default(), Some(Duration::from_millis(50))).await;
        assert_eq!(out, None);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn io_bound_echoes_its_argument() {
        let call = bind(IO_BOUND, &[json!(0.01)], &Map::new()).unwrap();
        assert_eq!(call.clone().run(Context::default(), None).await, Some(Outcome::Success(json!(0.01))));
        assert_eq!(call.run(Context::default(), Some(Duration::from_millis(1))).await, None, "time limit");
    }
}
