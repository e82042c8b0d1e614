//! The remote-control commands that tune a running worker, with Celery's argument names and
//! reply texts (celery/worker/control.py): `rate_limit`, `time_limit`, `pool_grow`,
//! `pool_shrink`, and `registered` with its `taskinfoitems`.

use super::{WorkerState, missing, ok};
use crate::task::rate::RateLimit;
use crate::worker::limits::LimitError;
use serde_json::{Map, Value, json};
use std::time::Duration;

/// The task attributes `registered` shows when asked for none (Celery's
/// `DEFAULT_TASK_INFO_ITEMS`); only `rate_limit` is ever set here (exchange and routing_key are
/// None on every task, as on a Celery task that does not set them).
const DEFAULT_TASK_INFO_ITEMS: [&str; 3] = ["exchange", "routing_key", "rate_limit"];

fn nok(s: &str) -> Value {
    json!({ "error": s })
}

fn unknown_task(method: &str, task: &str) -> Value {
    tracing::error!(task, "{method} for an unknown task");
    nok("unknown task")
}

impl WorkerState {
    /// `rate_limit(task_name, rate_limit)`.
    pub(super) fn rate_limit(&self, args: &Map<String, Value>) -> Result<Value, String> {
        let task = args.get("task_name").and_then(Value::as_str).ok_or_else(|| missing("rate_limit", "task_name"))?;
        let raw = args.get("rate_limit").ok_or_else(|| missing("rate_limit", "rate_limit"))?;
        // Celery keeps the attribute as given (`registered` shows it) and reads it with rate().
        let (text, disabled) = match raw {
            Value::Null => (None, true),
            Value::String(s) => (Some(s.clone()), s.is_empty()),
            Value::Number(n) => (Some(n.to_string()), n.as_f64() == Some(0.0)),
            other => {
                let text = format!("rate limit must be a string or a number, not {other}");
                return Ok(nok(&format!("Invalid rate limit string: ValueError({})", super::repr(&text.into()))));
            }
        };
        let rate = match text.as_deref().map(RateLimit::parse).transpose() {
            Ok(rate) => rate.flatten(),
            // rate() raises KeyError for an unknown unit, which Celery does not catch.
            Err(e @ crate::task::rate::RateError::Unit(_)) => return Err(e.python_repr()),
            Err(e) => return Ok(nok(&format!("Invalid rate limit string: {}", e.python_repr()))),
        };
        if self.limits.set_rate(task, text.clone(), rate) == Err(LimitError::UnknownTask) {
            return Ok(unknown_task("rate_limit", task));
        }
        if disabled {
            tracing::info!(task, "rate limits disabled for tasks of this type");
            return Ok(ok("rate limit disabled successfully"));
        }
        tracing::info!(task, rate_limit = text.as_deref().unwrap_or_default(), "new rate limit for tasks of this type");
        Ok(ok("new rate limit set successfully"))
    }

    /// `time_limit(task_name, hard, soft)`: both replace the task's; none (or 0) is no limit
    /// for the task, so the worker's `--time-limit`/`--soft-time-limit` apply.
    pub(super) fn time_limit(&self, args: &Map<String, Value>) -> Result<Value, String> {
        let task = args.get("task_name").and_then(Value::as_str).unwrap_or_default();
        let secs = |name: &str| -> Result<Option<Duration>, String> {
            let v = match args.get(name) {
                None | Some(Value::Null) => return Ok(None),
                Some(Value::Number(n)) => n.as_f64(),
                Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
                Some(_) => None,
            };
            let v = v.filter(|v| v.is_finite() && *v >= 0.0).ok_or_else(|| {
                format!("ValueError({})", super::repr(&format!("{name} must be a number of seconds >= 0").into()))
            })?;
            Ok(Duration::try_from_secs_f64(v)
                .ok()
                .filter(|d| !d.is_zero())
                .map(|d| d.min(crate::runtime::args::MAX_DURATION)))
        };
        let (soft, hard) = (secs("soft")?, secs("hard")?);
        if self.limits.set_time_limits(task, soft, hard) == Err(LimitError::UnknownTask) {
            return Ok(unknown_task("time_limit", task));
        }
        tracing::info!(task, ?soft, ?hard, "new time limits for tasks of this type");
        Ok(ok("time limits set successfully"))
    }

    /// `pool_grow(n=1)` / `pool_shrink(n=1)`: run slots (and the prefetch budget with them).
    pub(super) fn resize_pool(&self, args: &Map<String, Value>, grow: bool) -> Result<Value, String> {
        let n = match args.get("n") {
            None | Some(Value::Null) => 1,
            Some(Value::Number(n)) => n.as_i64().ok_or_else(|| {
                format!("ValueError({})", super::repr(&format!("n must be an integer, not {n}").into()))
            })?,
            Some(Value::String(s)) => s.trim().parse().map_err(|_| {
                format!("ValueError({})", super::repr(&format!("invalid literal for int() with base 10: {s:?}").into()))
            })?,
            Some(other) => {
                return Err(format!(
                    "TypeError({})",
                    super::repr(&format!("n must be an integer, not {other}").into())
                ));
            }
        };
        // Python's grow/shrink loop n times: nothing for n < 1.
        let n = u32::try_from(n.max(0)).unwrap_or(u32::MAX);
        let slots = match (n, grow) {
            (0, _) => self.pool.slots(),
            (n, true) => self.pool.grow(n)?,
            (n, false) => self.pool.shrink(n)?,
        };
        tracing::info!(slots, prefetch = self.pool.prefetch(), "run slots changed by remote control");
        Ok(ok(if grow { "pool will grow" } else { "pool will shrink" }))
    }

    /// `registered(taskinfoitems=None, builtins=False)`: `name [rate_limit=…]` where set.
    pub(super) fn registered(&self, args: &Map<String, Value>) -> Value {
        let items: Vec<String> = match args.get("taskinfoitems") {
            Some(Value::Array(a)) if !a.is_empty() => a.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
            _ => DEFAULT_TASK_INFO_ITEMS.iter().map(|s| (*s).to_owned()).collect(),
        };
        let show_rate = items.iter().any(|i| i == "rate_limit");
        let builtins = args.get("builtins").is_some_and(super::truthy);
        let names = self.limits.rates().into_iter().filter(|(n, _)| builtins || !n.starts_with("celery."));
        Value::Array(
            names
                .map(|(name, rate)| match rate.filter(|_| show_rate) {
                    Some(rate) => format!("{name} [rate_limit={rate}]").into(),
                    None => name.into(),
                })
                .collect(),
        )
    }
}
