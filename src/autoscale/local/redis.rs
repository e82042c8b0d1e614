//! The `redis-server` that `local` starts when no `BROKER_URL` is given.

use super::{LocalError, free_loopback_port, send_signal};
use rustix::process::Signal;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// How long a fresh `redis-server` may take to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A `redis-server` this run started: append-only data in its directory, its own process group
/// (the terminal's Ctrl-C reaches `local` only, which stops Redis last, after the workers).
pub(super) struct OwnedRedis {
    child: Child,
    port: u16,
}

impl OwnedRedis {
    pub(super) async fn start(dir: &Path) -> Result<OwnedRedis, LocalError> {
        let port = free_loopback_port().map_err(|e| LocalError::RedisStart(e.to_string()))?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--appendonly", "yes", "--save", ""])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    LocalError::RedisMissing(e)
                } else {
                    LocalError::RedisStart(e.to_string())
                }
            })?;
        let r = OwnedRedis { child, port };
        let client = redis::Client::open(r.url(0)).map_err(|e| LocalError::RedisStart(e.to_string()))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING").query_async::<String>(&mut c).await.is_ok()
            {
                return Ok(r);
            }
            if Instant::now() > deadline {
                return Err(LocalError::RedisStart(format!(
                    "no answer on port {port} after {} s",
                    START_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(super) fn url(&self, db: u8) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    /// SIGTERM: Redis flushes its append-only file and exits.
    pub(super) async fn stop(mut self) {
        send_signal(&self.child, Signal::TERM);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}
