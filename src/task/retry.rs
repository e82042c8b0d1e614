//! Declarative retries, as Celery's `autoretry_for` (celery/app/autoretry.py): an exception the
//! task raises whose kind is listed is retried — after `retry_backoff`'s exponential countdown
//! (with full jitter by default) or else `default_retry_delay` — until `max_retries`.

use super::{TaskError, TaskOptions, TaskResult};
use crate::wire::ExceptionInfo;
use std::time::Duration;

/// Whether `exc` is of a kind named in `kinds`: `"module.Type"` (e.g.
/// `"builtins.ConnectionError"`, `"myapp.errors.Busy"`), or a bare `"Type"` of any module.
/// `"Exception"` names every exception a task raises, as Python's base class does.
pub fn matches(kinds: &[String], exc: &ExceptionInfo) -> bool {
    kinds.iter().any(|k| match k.rsplit_once('.') {
        Some((module, ty)) => {
            (module == exc.exc_module && ty == exc.exc_type) || (module == "builtins" && ty == "Exception")
        }
        None => k == &exc.exc_type || k == "Exception",
    })
}

/// Celery's `get_exponential_backoff_interval(factor, retries, maximum, full_jitter)`:
/// `min(maximum, factor·2^retries)` seconds, then with full jitter a whole number of seconds
/// drawn uniformly from `[0, that]`.
pub fn backoff_countdown(factor: u64, retries: u32, maximum: u64, full_jitter: bool) -> u64 {
    let countdown = 2u64.checked_pow(retries).and_then(|p| p.checked_mul(factor)).map_or(maximum, |c| c.min(maximum));
    if full_jitter { rand::random_range(0..=countdown) } else { countdown }
}

/// Apply the task's `autoretry_for` to what its body returned: a raised exception of a listed
/// kind (and not of a `dont_autoretry_for` one) becomes a retry, or — past `max_retries` — stays
/// the failure, as Celery's `task.retry(exc=exc)` re-raises it. Everything else is unchanged.
pub fn autoretry(options: &TaskOptions, retries: u32, outcome: TaskResult) -> TaskResult {
    let exc = match outcome {
        Err(TaskError::Raise(exc))
            if matches(&options.autoretry_for, &exc) && !matches(&options.dont_autoretry_for, &exc) =>
        {
            exc
        }
        other => return other,
    };
    if options.max_retries.is_some_and(|max| retries >= max) {
        return Err(TaskError::Raise(exc));
    }
    let countdown = match options.retry_backoff {
        Some(base) => Duration::from_secs(backoff_countdown(
            base.max(1),
            retries,
            options.retry_backoff_max.as_secs(),
            options.retry_jitter,
        )),
        None => options.default_retry_delay,
    };
    Err(TaskError::Retry { exc, countdown, changed: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_match_by_module_and_name_or_name_alone() {
        let conn = ExceptionInfo::builtin("ConnectionError", "down");
        let busy = ExceptionInfo::new("myapp.errors", "Busy", vec![]);
        let kinds = |k: &[&str]| k.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(matches(&kinds(&["builtins.ConnectionError"]), &conn));
        assert!(matches(&kinds(&["ConnectionError"]), &conn));
        assert!(matches(&kinds(&["myapp.errors.Busy"]), &busy));
        assert!(!matches(&kinds(&["other.Busy"]), &busy));
        assert!(matches(&kinds(&["Exception"]), &busy) && matches(&kinds(&["builtins.Exception"]), &conn));
        assert!(!matches(&[], &conn));
    }

    #[test]
    fn the_backoff_is_celerys_formula() {
        let exact: Vec<u64> = (0..6).map(|n| backoff_countdown(3, n, 60, false)).collect();
        assert_eq!(exact, [3, 6, 12, 24, 48, 60], "base·2^n, capped at the maximum");
        assert_eq!(backoff_countdown(1, 200, 600, false), 600, "no overflow");
        let drawn: Vec<u64> = (0..200).map(|_| backoff_countdown(1, 4, 600, true)).collect();
        assert!(drawn.iter().all(|c| *c <= 16));
        assert!(drawn.contains(&0) && drawn.contains(&16), "full jitter spans [0, 16]: {drawn:?}");
    }

    #[test]
    fn listed_exceptions_retry_until_max_retries() {
        let opts = TaskOptions::new("t")
            .autoretry_for(["ConnectionError"])
            .dont_autoretry_for(["builtins.ConnectionRefusedError"])
            .retry_backoff(2)
            .retry_jitter(false)
            .max_retries(Some(2));
        let raise = |t: &str| Err(TaskError::Raise(ExceptionInfo::builtin(t, "x")));
        let retry = |c| {
            Err(TaskError::Retry { exc: ExceptionInfo::builtin("ConnectionError", "x"), countdown: c, changed: None })
        };
        assert_eq!(autoretry(&opts, 0, raise("ConnectionError")), retry(Duration::from_secs(2)));
        assert_eq!(autoretry(&opts, 1, raise("ConnectionError")), retry(Duration::from_secs(4)));
        assert_eq!(autoretry(&opts, 2, raise("ConnectionError")), raise("ConnectionError"), "max_retries reached");
        assert_eq!(autoretry(&opts, 0, raise("ValueError")), raise("ValueError"), "not listed");
        assert_eq!(autoretry(&opts, 0, raise("ConnectionRefusedError")), raise("ConnectionRefusedError"));
        assert_eq!(autoretry(&opts, 0, Ok(1.into())), Ok(1.into()));
        let plain = TaskOptions::new("t").autoretry_for(["ValueError"]);
        let Err(TaskError::Retry { countdown, .. }) = autoretry(&plain, 0, raise("ValueError")) else { panic!() };
        assert_eq!(countdown, crate::task::DEFAULT_RETRY_DELAY, "no backoff: default_retry_delay");
    }
}
