//! Command-line pieces shared by the subcommands: the value parsers every duration and rate flag
//! goes through (so bad input is refused the same way everywhere, before anything runs), and the
//! option groups several roles flatten ([`RedisArgs`], [`QueueArgs`]).
//!
//! Durations are written in seconds (`0.5`, `30`, `1e3`). NaN, infinities, negatives and values
//! above [`MAX_DURATION`] are refused: 30 days is longer than any sensible timeout, interval or
//! simulated run, and far below where `Duration` arithmetic or tokio's timer wheel could overflow
//! (`Instant::now() + d` must never panic).

use crate::transport::connection;
use crate::wire::keys::{self, PrioritySteps};
use std::time::Duration;

/// The longest duration any flag accepts: 30 days.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// The highest task rate a load pattern accepts, tasks/s (one Redis takes ~10⁵/s at best).
pub const MAX_RATE: f64 = 1_000_000.0;

/// A number of seconds > 0 and ≤ [`MAX_DURATION`], as a clap value parser.
pub fn duration(s: &str) -> Result<Duration, String> {
    seconds(s, false)
}

/// A number of seconds ≥ 0 and ≤ [`MAX_DURATION`], as a clap value parser.
pub fn non_negative_duration(s: &str) -> Result<Duration, String> {
    seconds(s, true)
}

fn seconds(s: &str, zero_ok: bool) -> Result<Duration, String> {
    let ceiling = MAX_DURATION.as_secs();
    let range = if zero_ok { "from 0" } else { "greater than 0 and" };
    let refuse = || format!("{s:?} is not a usable number of seconds: use a number {range} up to {ceiling} (30 days)");
    let v: f64 = s.trim().parse().map_err(|_| refuse())?;
    // `!(v >= 0)` also catches NaN.
    if !(v >= 0.0 && v <= ceiling as f64) {
        return Err(refuse());
    }
    match Duration::try_from_secs_f64(v) {
        Ok(d) if zero_ok || !d.is_zero() => Ok(d),
        _ => Err(refuse()),
    }
}

/// A rate in tasks/s: ≥ 0 and ≤ [`MAX_RATE`], as a clap value parser.
pub fn rate(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a rate in tasks/s (e.g. 0.5, 20)"))?;
    check_rate(v).map_err(|problem| format!("{s:?} {problem}"))
}

/// The range check of [`rate`], for rates that arrive as numbers (pattern strings).
pub fn check_rate(v: f64) -> Result<f64, String> {
    if (0.0..=MAX_RATE).contains(&v) {
        Ok(v)
    } else {
        Err(format!("is out of range: a rate must be a number of tasks/s from 0 to {MAX_RATE}"))
    }
}

/// Where the queues and results live; worker, exporter and loadgen flatten this.
#[derive(Clone, Debug, clap::Args)]
pub struct RedisArgs {
    /// Broker (queues) Redis URL.
    #[arg(long, env = "BROKER_URL", default_value = connection::DEFAULT_BROKER_URL, global = true)]
    pub broker_url: String,
    /// Result backend Redis URL (the worker writes results there, `loadgen --wait` reads them;
    /// the exporter does not use it).
    #[arg(long, env = "BACKEND_URL", default_value = connection::DEFAULT_BACKEND_URL, global = true)]
    pub backend_url: String,
    /// Master name for sentinel:// URLs (kombu's master_name); ignored for other URLs.
    #[arg(long, env = "SENTINEL_MASTER", global = true)]
    pub sentinel_master: Option<String>,
    /// Prefix for every broker key and channel: kombu's Redis transport option
    /// `global_keyprefix` (`broker_transport_options={'global_keyprefix': …}`), and for result
    /// keys as well (Celery's `result_backend_transport_options`, which adds `_` unless the
    /// prefix ends in `:_-.`). Producers, workers and clients must all agree (docs/celery-wire.md).
    #[arg(long, env = "GLOBAL_KEYPREFIX", default_value = "", global = true)]
    pub global_keyprefix: String,
    /// The result backend's `global_keyprefix` when it differs from the broker's (default:
    /// `--global-keyprefix`); `""` for none.
    #[arg(long, env = "BACKEND_GLOBAL_KEYPREFIX", global = true)]
    pub backend_global_keyprefix: Option<String>,
}

impl RedisArgs {
    /// Make the key prefixes the process's ([`keys::set_global_keyprefix`]); every role calls
    /// this before it touches Redis.
    pub fn apply_keyprefix(&self) -> Result<(), StartError> {
        let backend = self.backend_global_keyprefix.as_deref().unwrap_or(&self.global_keyprefix);
        keys::set_global_keyprefix(&self.global_keyprefix, backend).map_err(StartError::KeyPrefix)
    }
}

/// Which queues, and how kombu splits them into priority lists; worker, exporter and loadgen
/// flatten this.
#[derive(Clone, Debug, clap::Args)]
pub struct QueueArgs {
    /// Queues, comma-separated: the worker consumes them (round robin by default, so no queue
    /// is preferred: see the worker's --queue-order-strategy), the exporter reports them, loadgen sends to the one given (also spelt
    /// --queue).
    #[arg(long, visible_alias = "queue", value_delimiter = ',', default_value = keys::DEFAULT_QUEUE, global = true)]
    pub queues: Vec<String>,
    /// Priority buckets, as kombu's priority_steps; producers and consumers must agree.
    #[arg(long, default_value_t = PrioritySteps::default(), global = true)]
    pub priority_steps: PrioritySteps,
}

impl QueueArgs {
    /// The queue names, trimmed, blanks dropped; at least one.
    pub fn names(&self) -> Result<Vec<String>, StartError> {
        let names: Vec<String> = self.queues.iter().map(|q| q.trim().to_owned()).filter(|q| !q.is_empty()).collect();
        if names.is_empty() { Err(StartError::NoQueues) } else { Ok(names) }
    }
}

/// Why a long-running role (worker, exporter) could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Connect(#[from] crate::transport::connection::ConnectError),
    #[error(transparent)]
    Http(#[from] crate::runtime::http::HttpError),
    #[error("--queues is empty; name at least one queue (default: celery)")]
    NoQueues,
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// Redis refused a command for good (an ACL); retrying could not help. The text is
    /// [`crate::transport::connection::explain`]'s: the error, the setting and the fix.
    #[error("stopped: Redis refused a command: {0}")]
    Refused(String),
    /// `--global-keyprefix` differs from the one this process already uses (library use).
    #[error("--global-keyprefix: {0}")]
    KeyPrefix(String),
    /// The worker's `--statedb` file cannot be read or written; the text names the flag and the fix.
    #[error("{0}")]
    StateDb(String),
    /// A background service the worker needs ended; the text says which and why.
    #[error("stopped: {0}")]
    ServiceEnded(String),
    /// Flags that contradict each other or the tasks; the text names the flag and the fix.
    #[error("{0}")]
    Config(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn durations() {
        assert_eq!(duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(duration(" 30 "), Ok(Duration::from_secs(30)));
        assert_eq!(duration("2592000"), Ok(MAX_DURATION));
        assert_eq!(non_negative_duration("0"), Ok(Duration::ZERO));
        for bad in ["0", "-1", "-0.5", "NaN", "nan", "inf", "-inf", "1e300", "2592000.5", "soon", ""] {
            let err = duration(bad).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
        assert!(non_negative_duration("-0.001").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(rate("20"), Ok(20.0));
        assert_eq!(rate("0"), Ok(0.0));
        for bad in ["-1", "NaN", "inf", "1e15", "x"] {
            assert!(rate(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        // Whatever the text, the parsers return (never panic), and what they accept can be
        // added to now and slept on.
        #[test]
        fn duration_parsers_never_panic(s in "\\PC{0,12}|[-+]?[0-9.eE]{1,12}|[-+]?(inf|NaN|infinity)") {
            for d in [duration(&s), non_negative_duration(&s)].into_iter().flatten() {
                prop_assert!(d <= MAX_DURATION);
                prop_assert!(std::time::Instant::now().checked_add(d).is_some());
            }
            if let Ok(r) = rate(&s) {
                prop_assert!(r.is_finite() && (0.0..=MAX_RATE).contains(&r));
            }
        }

        #[test]
        fn any_float_is_accepted_or_refused(v in proptest::num::f64::ANY) {
            let s = v.to_string();
            let ceiling = MAX_DURATION.as_secs_f64();
            if duration(&s).is_ok() {
                prop_assert!(v.is_finite() && v > 0.0 && v <= ceiling, "{}", s);
            }
            if (1e-6..=ceiling).contains(&v) {
                prop_assert!(duration(&s).is_ok(), "{}", s);
            }
        }
    }
}
