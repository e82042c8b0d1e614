//! Redis connections shared by every role: connecting (lazily, so a process can start and
//! report not-ready while Redis is away), retrying with backoff through outages, and keeping
//! passwords out of logs.

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// Default broker URL (DESIGN.md).
pub const DEFAULT_BROKER_URL: &str = "redis://127.0.0.1:6379/0";
/// Default result backend URL (DESIGN.md).
pub const DEFAULT_BACKEND_URL: &str = "redis://127.0.0.1:6379/1";

/// Errors a user can cause with a connection setting.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    // The cause is part of the sentence, not a `source`: a printed chain says it once.
    #[error("{setting}={url} is not a usable Redis URL ({cause}); expected redis://[:password@]host:port/db")]
    BadUrl { setting: &'static str, url: String, cause: redis::RedisError },
}

/// Whether the last Redis operation worked (for `/readyz` and the `redis_connected` gauge).
/// Starts unknown: a connection not used yet is neither up nor down.
#[derive(Debug)]
pub struct Health {
    state: AtomicU8,
    what: &'static str,
}

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

impl Health {
    pub fn new(what: &'static str) -> Arc<Self> {
        Arc::new(Health { state: AtomicU8::new(UNKNOWN), what })
    }

    pub fn is_connected(&self) -> bool {
        self.state.load(Ordering::Relaxed) == UP
    }

    /// Failed last time it was used.
    pub fn is_down(&self) -> bool {
        self.state.load(Ordering::Relaxed) == DOWN
    }

    pub fn set_connected(&self) {
        if self.state.swap(UP, Ordering::Relaxed) == DOWN {
            tracing::info!(redis = self.what, "Redis is reachable again");
        }
    }

    /// Returns true when this call began an outage (so the caller logs once per outage).
    pub fn set_disconnected(&self) -> bool {
        self.state.swap(DOWN, Ordering::Relaxed) != DOWN
    }
}

/// Open a lazily connecting, self-reconnecting connection. `response_timeout` must exceed any
/// blocking command sent on it (BRPOP).
pub fn connect(
    setting: &'static str,
    url: &str,
    response_timeout: Duration,
) -> Result<ConnectionManager, ConnectError> {
    let bad = |cause| ConnectError::BadUrl { setting, url: redact_url(url), cause };
    let client = redis::Client::open(url).map_err(bad)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(response_timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    ConnectionManager::new_lazy_with_config(client, config).map_err(bad)
}

/// `redis://:secret@host/0` → `redis://:***@host/0`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

/// Exponential backoff from 100 ms to 5 s.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Duration::from_millis(100) }
    }
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        d
    }
}

/// Run `op` until it succeeds, sleeping with backoff between failures and logging the outage
/// once when it starts, every 30 s while it lasts, and when it ends. Gives up (returns `None`)
/// only when `give_up` becomes true — the worker's forced exit.
pub async fn retry<T, F, Fut>(health: &Health, what: &str, give_up: &AtomicBool, mut op: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = redis::RedisResult<T>>,
{
    let mut backoff = Backoff::default();
    let mut last_log: Option<Instant> = None;
    loop {
        match op().await {
            Ok(v) => {
                health.set_connected();
                return Some(v);
            }
            Err(e) => {
                let first = health.set_disconnected();
                if first || last_log.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                    tracing::warn!(redis = health.what, error = %e, "Redis {what} failed; retrying with backoff, nothing is dropped");
                    last_log = Some(Instant::now());
                }
                if give_up.load(Ordering::Relaxed) {
                    return None;
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact_url("redis://:s3cret@redis:6379/0"), "redis://:***@redis:6379/0");
        assert_eq!(redact_url("redis://user:pw@h/1"), "redis://user:***@h/1");
        assert_eq!(redact_url("redis://127.0.0.1:6379/0"), "redis://127.0.0.1:6379/0");
    }

    #[test]
    fn bad_urls_name_the_setting() {
        let err = connect("BROKER_URL", "http://nope", Duration::from_secs(1)).unwrap_err().to_string();
        assert!(err.contains("BROKER_URL=http://nope") && err.contains("redis://"), "{err}");
    }

    #[test]
    fn backoff_caps_at_five_seconds() {
        let mut b = Backoff::default();
        let delays: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert_eq!(delays[0], Duration::from_millis(100));
        assert_eq!(*delays.last().unwrap(), Duration::from_secs(5));
    }
}
