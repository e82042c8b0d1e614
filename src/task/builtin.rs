//! The demo tasks the load generator sends and the benchmarks run, registered through the same
//! API as any user task. Same names and algorithms as `tests/python/tasks.py`, so a Python
//! worker and this one are interchangeable on a queue.

use super::{Context, Param, Registry, Seconds, TaskError};
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};

pub const CPU_BOUND: &str = "tasks.cpu_bound";
pub const IO_BOUND: &str = "tasks.io_bound";
pub const FLAKY: &str = "tasks.flaky";
pub const XSUM: &str = "tasks.xsum";

/// Add the built-in tasks to `registry`.
pub fn register(registry: Registry) -> Registry {
    registry
        // `tasks.cpu_bound(n: int) -> int`: the number of primes ≤ n, by trial division.
        .add_blocking(CPU_BOUND, ["n"], |(n,): (i64,), ctx: &Context| {
            // Python's range(2, n + 1) is empty for a negative n.
            count_primes(n.max(0) as u64, ctx.cancel_flag()).ok_or_else(|| time_limit_reached(ctx))
        })
        // `tasks.io_bound(seconds: float) -> float`: waits without holding a thread; returns
        // `seconds` as given.
        .add_async(IO_BOUND, ["seconds"], |(seconds,): (Seconds,), _ctx| async move {
            // A zero wait must not round up to the timer's 1 ms tick.
            if !seconds.duration.is_zero() {
                tokio::time::sleep(seconds.duration).await;
            }
            Ok::<_, TaskError>(seconds.given)
        })
        // `tasks.flaky(fail_times: int, countdown: float = 1.0) -> int`: asks for a retry until
        // it has been retried `fail_times` times, then returns the number of retries. A demo of
        // Celery's retry protocol (RETRY state, re-sent message with `retries + 1` and an ETA).
        .add_async(
            FLAKY,
            [Param::required("fail_times"), Param::optional("countdown", 1.0)],
            |(fail_times, countdown): (i64, Seconds), ctx| async move {
                if i64::from(ctx.retries) >= fail_times {
                    return Ok(Value::from(ctx.retries));
                }
                let exc = TaskError::runtime_error(format!(
                    "flaky: attempt {} of {} fails on purpose",
                    u64::from(ctx.retries) + 1,
                    fail_times.saturating_add(1)
                ));
                Err(ctx.retry(exc, Some(countdown.duration)))
            },
        )
        // `tasks.xsum(numbers: list) -> int | float`: Python's `sum(numbers)`; a chord body (it
        // receives the header's results as one list).
        .add_blocking(XSUM, ["numbers"], |(numbers,): (Vec<Value>,), _ctx: &Context| python_sum(&numbers))
}

/// Python's `sum(items)` over ints, floats and bools: an int while every item is one (a
/// `TypeError` where the sum leaves i64, which Python would not), else a float.
fn python_sum(items: &[Value]) -> Result<Value, TaskError> {
    let mut int: Option<i64> = Some(0);
    let mut float = 0.0f64;
    let mut all_ints = true;
    for item in items {
        let (i, f) = match item {
            Value::Bool(b) => (Some(i64::from(*b)), f64::from(u8::from(*b))),
            Value::Number(n) if n.is_f64() => (None, n.as_f64().unwrap_or(f64::NAN)),
            Value::Number(n) => (n.as_i64(), n.as_f64().unwrap_or(f64::NAN)),
            other => {
                let left = if all_ints { "int" } else { "float" };
                return Err(TaskError::type_error(format!(
                    "unsupported operand type(s) for +: '{left}' and '{}'",
                    super::args::type_name(other)
                )));
            }
        };
        all_ints &= i.is_some();
        int = int.zip(i).and_then(|(a, b)| a.checked_add(b));
        float += f;
    }
    match (all_ints, int) {
        (true, Some(total)) => Ok(Value::from(total)),
        (true, None) => Err(TaskError::new("builtins", "OverflowError", "xsum: the sum does not fit in 64 bits")),
        (false, _) => Ok(serde_json::Number::from_f64(float).map_or(Value::Null, Value::Number)),
    }
}

/// What a cancelled body returns; the worker discards it and reports the time limit itself.
fn time_limit_reached(ctx: &Context) -> TaskError {
    TaskError::new("billiard.exceptions", "SoftTimeLimitExceeded", format!("task {} cancelled", ctx.id))
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
    use crate::task::TaskResult;
    use serde_json::{Map, json};
    use std::time::Duration;

    async fn run(name: &str, args: Value, retries: u32, limit: Option<Duration>) -> Option<TaskResult> {
        let registry = Registry::with_builtins();
        let task = registry.get(name).unwrap();
        let call = task.bind(args.as_array().unwrap(), &Map::new()).unwrap();
        call.run(Context::new("id", retries, task.options()), limit).await
    }

    fn bind_error(name: &str, args: Value) -> String {
        let registry = Registry::with_builtins();
        match registry.get(name).unwrap().bind(args.as_array().unwrap(), &Map::new()) {
            Ok(_) => panic!("{name}{args} bound"),
            Err(e) => e,
        }
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
    fn builtins_keep_their_python_type_errors() {
        assert_eq!(bind_error(CPU_BOUND, json!(["10"])), "cpu_bound() argument 'n' must be int, not str");
        assert_eq!(bind_error(CPU_BOUND, json!([1, 2])), "cpu_bound() takes 1 positional argument but 2 were given");
        assert_eq!(
            bind_error(IO_BOUND, json!([-1])),
            "io_bound() argument 'seconds' must be a non-negative number of seconds, got -1"
        );
        assert_eq!(
            bind_error(IO_BOUND, json!([null])),
            "io_bound() argument 'seconds' must be a real number, not NoneType"
        );
        assert_eq!(bind_error(FLAKY, json!([])), "flaky() missing 1 required positional argument: 'fail_times'");
        assert_eq!(
            Registry::with_builtins().names().collect::<Vec<_>>(),
            [CPU_BOUND, FLAKY, IO_BOUND, XSUM],
            "sorted names"
        );
    }

    #[tokio::test]
    async fn cpu_bound_counts_and_stops_at_its_time_limit() {
        assert_eq!(run(CPU_BOUND, json!([-5]), 0, None).await, Some(Ok(json!(0))));
        assert_eq!(run(CPU_BOUND, json!([100]), 0, None).await, Some(Ok(json!(25))));
        let started = std::time::Instant::now();
        assert_eq!(run(CPU_BOUND, json!([1u64 << 40]), 0, Some(Duration::from_millis(50))).await, None);
        assert!(started.elapsed() < Duration::from_secs(30), "cancelled, not run to the end");
    }

    #[tokio::test]
    async fn xsum_is_pythons_sum() {
        assert_eq!(run(XSUM, json!([[1, 2, 3]]), 0, None).await, Some(Ok(json!(6))));
        assert_eq!(run(XSUM, json!([[]]), 0, None).await, Some(Ok(json!(0))));
        assert_eq!(run(XSUM, json!([[1, 0.5, true]]), 0, None).await, Some(Ok(json!(2.5))));
        let Some(Err(e)) = run(XSUM, json!([[1, "a"]]), 0, None).await else { panic!("str is not summed") };
        assert_eq!(e.exception().exc_message, vec![json!("unsupported operand type(s) for +: 'int' and 'str'")]);
        assert_eq!(bind_error(XSUM, json!([5])), "xsum() argument 'numbers' must be list, not int");
    }

    #[tokio::test]
    async fn io_bound_echoes_its_argument() {
        assert_eq!(run(IO_BOUND, json!([0.01]), 0, None).await, Some(Ok(json!(0.01))));
        assert_eq!(run(IO_BOUND, json!([0]), 0, None).await, Some(Ok(json!(0))));
        assert_eq!(run(IO_BOUND, json!([10]), 0, Some(Duration::from_millis(1))).await, None, "time limit");
    }

    #[tokio::test]
    async fn flaky_retries_then_succeeds_or_gives_up() {
        let countdown = Duration::from_millis(250);
        let exc = |n| TaskError::runtime_error(format!("flaky: attempt {n} of 3 fails on purpose")).exception().clone();
        assert_eq!(
            run(FLAKY, json!([2, 0.25]), 0, None).await,
            Some(Err(TaskError::Retry { exc: exc(1), countdown, changed: None }))
        );
        assert_eq!(run(FLAKY, json!([2]), 2, None).await, Some(Ok(json!(2))));
        let gave_up = run(FLAKY, json!([10]), 3, None).await.unwrap().unwrap_err();
        assert!(matches!(gave_up, TaskError::Raise(_)), "max_retries (3) reached: {gave_up:?}");
    }
}
