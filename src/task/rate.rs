//! Celery's rate-limit strings: `"10/s"`, `"100/m"`, `"1000/h"`, or a plain number (per second).
//! `"0"` (or an empty string) means no limit, as Celery's `celery.utils.time.rate` reads it.
//! A limit is per worker and per task name: each worker keeps its own token bucket (see
//! `worker::limits`), so a fleet of N workers runs up to N times the rate.

use std::fmt;

/// A task rate limit as written (`text`, what `inspect registered` shows) and what it means.
#[derive(Clone, Debug, PartialEq)]
pub struct RateLimit {
    text: String,
    per_second: f64,
}

/// Why a rate string was refused, in the form Celery's `rate()` would raise it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RateError {
    /// The count is not a number (Python: `ValueError("could not convert string to float: '…'")`).
    NotANumber(String),
    /// The unit is not `s`, `m` or `h` (Python: `KeyError('…')`).
    Unit(String),
    /// Negative, NaN or infinite: Celery takes these and then misbehaves; refused here.
    OutOfRange(String),
}

impl RateError {
    /// The Python exception's repr, as a remote-control error reply carries it.
    pub fn python_repr(&self) -> String {
        let quoted = |s: &str| crate::wire::pyrepr::repr(&serde_json::Value::String(s.to_owned()));
        match self {
            RateError::NotANumber(count) => {
                format!("ValueError({})", quoted(&format!("could not convert string to float: {}", quoted(count))))
            }
            RateError::Unit(unit) => format!("KeyError({})", quoted(unit)),
            RateError::OutOfRange(text) => {
                format!("ValueError({})", quoted(&format!("rate limit {text} is not a finite number >= 0")))
            }
        }
    }
}

impl fmt::Display for RateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RateError::NotANumber(count) => write!(f, "{count:?} is not a number"),
            RateError::Unit(unit) => write!(f, "unit {unit:?} is not s, m or h"),
            RateError::OutOfRange(text) => write!(f, "{text:?} is not a finite number >= 0"),
        }
    }
}

impl RateLimit {
    /// Parse Celery's syntax. `Ok(None)`: no limit (`"0"`, `"0/m"`, `""`).
    pub fn parse(text: &str) -> Result<Option<RateLimit>, RateError> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Ok(None);
        }
        let (count, unit) = trimmed.split_once('/').unwrap_or((trimmed, ""));
        let n: f64 = count.trim().parse().map_err(|_| RateError::NotANumber(count.to_owned()))?;
        let per_second = match unit.trim() {
            "" | "s" => n,
            "m" => n / 60.0,
            "h" => n / 3600.0,
            other => return Err(RateError::Unit(other.to_owned())),
        };
        if !(per_second.is_finite() && per_second >= 0.0) {
            return Err(RateError::OutOfRange(text.to_owned()));
        }
        Ok((per_second > 0.0).then(|| RateLimit { text: text.to_owned(), per_second }))
    }

    /// Tasks per second.
    pub fn per_second(&self) -> f64 {
        self.per_second
    }

    /// As written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `TASK=RATE` (the worker's `--rate-limit`), as a clap value parser.
pub fn task_rate_flag(s: &str) -> Result<(String, Option<RateLimit>), String> {
    let Some((task, rate)) = s.split_once('=') else {
        return Err(format!("{s:?} is not TASK=RATE: write e.g. tasks.io_bound=30/m (10/s, 100/m, 1000/h; 0 = none)"));
    };
    let task = task.trim();
    if task.is_empty() {
        return Err(format!("{s:?} names no task: write e.g. tasks.io_bound=30/m"));
    }
    let rate = RateLimit::parse(rate).map_err(|e| {
        format!("{s:?}: the rate {e}; write a count per s, m or h, e.g. 10/s, 100/m, 1000/h (0 = none)")
    })?;
    Ok((task.to_owned(), rate))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn per_second(s: &str) -> Option<f64> {
        RateLimit::parse(s).unwrap().map(|r| r.per_second())
    }

    #[test]
    fn celery_rate_strings() {
        assert_eq!(per_second("10/s"), Some(10.0));
        assert_eq!(per_second("30/m"), Some(0.5));
        assert_eq!(per_second("1800/h"), Some(0.5));
        assert_eq!(per_second("5"), Some(5.0), "a plain number is per second");
        assert_eq!(per_second("0.5/s"), Some(0.5));
        assert_eq!(per_second(" 2/m "), Some(2.0 / 60.0));
        for none in ["0", "0/m", "", "  ", "0.0/h"] {
            assert_eq!(per_second(none), None, "{none:?} is no limit");
        }
        assert_eq!(RateLimit::parse("30/m").unwrap().unwrap().to_string(), "30/m");
    }

    #[test]
    fn bad_rate_strings_are_refused_as_celery_would() {
        assert_eq!(RateLimit::parse("abc"), Err(RateError::NotANumber("abc".into())));
        assert_eq!(
            RateLimit::parse("abc").unwrap_err().python_repr(),
            "ValueError(\"could not convert string to float: 'abc'\")"
        );
        assert_eq!(RateLimit::parse("10/x").unwrap_err().python_repr(), "KeyError('x')");
        assert_eq!(RateLimit::parse("/m"), Err(RateError::NotANumber("".into())));
        for bad in ["-1/s", "NaN", "inf/m", "1e400"] {
            assert!(matches!(RateLimit::parse(bad), Err(RateError::OutOfRange(_))), "{bad}");
        }
    }

    #[test]
    fn the_flag_names_task_and_rate() {
        assert_eq!(task_rate_flag("tasks.io_bound=30/m").unwrap().1.unwrap().per_second(), 0.5);
        assert_eq!(task_rate_flag("t=0").unwrap(), ("t".into(), None));
        for bad in ["tasks.io_bound", "=10/s", "t=fast", "t=10/d"] {
            let e = task_rate_flag(bad).unwrap_err();
            assert!(e.contains("e.g."), "{bad}: {e}");
        }
    }
}
