//! The load `--load` drives, and counting what became of it.

use super::{LocalArgs, LocalError};
use crate::runtime::args::{QueueArgs, RedisArgs};
use crate::tools::loadgen::{self, LoadOptions, LoadgenError, SendReport};
use crate::tools::pattern::LoadPattern;
use crate::transport::connection;
use crate::wire::keys::PrioritySteps;
use std::time::Duration;
use tokio::task::JoinHandle;

/// The load generator's part of the run.
pub(super) struct Load {
    pub(super) pattern: LoadPattern,
    pub(super) task: Option<JoinHandle<Result<SendReport, LoadgenError>>>,
    /// Tasks confirmed in Redis, and when (unix time) sending finished.
    pub(super) sent: Option<(u64, f64)>,
    pub(super) note: String,
    /// Results of the load's tasks, read from the backend.
    pub(super) results: ResultCounter,
}

impl Load {
    pub(super) fn done_sending(&self) -> bool {
        self.task.is_none()
    }
}

/// Counts the load's tasks that reached SUCCESS or FAILURE in the result backend.
pub(super) struct ResultCounter {
    pub(super) conn: crate::transport::connection::Conn,
    pub(super) pending: Vec<String>,
    pub(super) succeeded: f64,
    pub(super) failed: f64,
}

impl ResultCounter {
    /// Ids looked up per tick: a big load is counted over a few seconds instead of one huge MGET.
    pub(super) const PER_TICK: usize = 2000;

    pub(super) async fn refresh(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let n = self.pending.len().min(Self::PER_TICK);
        let keys: Vec<String> = self.pending[..n].iter().map(|id| crate::wire::keys::result_key(id)).collect();
        let Ok(raw) = ::redis::cmd("MGET").arg(&keys).query_async::<Vec<Option<String>>>(&mut self.conn).await else {
            return;
        };
        let mut still = Vec::with_capacity(n);
        for (id, doc) in self.pending.drain(..n).zip(raw) {
            let status = doc
                .and_then(|d| serde_json::from_str::<serde_json::Value>(&d).ok())
                .and_then(|v| v["status"].as_str().map(str::to_owned));
            match status.as_deref() {
                Some("SUCCESS") => self.succeeded += 1.0,
                Some("FAILURE") => self.failed += 1.0,
                _ => still.push(id),
            }
        }
        // Unfinished ones go to the back, so every id gets its turn.
        self.pending.extend(still);
    }
}

/// Start sending the load (it runs alongside the first worker).
pub(super) fn start(
    args: &LocalArgs,
    pattern: &LoadPattern,
    broker_url: &str,
    backend_url: &str,
    queue: &str,
) -> Result<Load, LocalError> {
    let options = LoadOptions {
        redis: RedisArgs {
            broker_url: broker_url.to_owned(),
            backend_url: backend_url.to_owned(),
            sentinel_master: None,
            global_keyprefix: String::new(),
            backend_global_keyprefix: None,
        },
        queue: QueueArgs { queues: vec![queue.to_owned()], priority_steps: PrioritySteps::default() },
        task: args.task,
        custom: args.custom.clone(),
        priority: 0,
        cpu_n: args.cpu_n,
        io_seconds: args.io_seconds,
        seed: None,
        batch: 500,
        // Keep the sent ids: the result counter below follows them (`send` itself never waits).
        wait: true,
        wait_timeout: Duration::ZERO,
    };
    options.check(pattern).map_err(|e| LocalError::Load(e.to_string()))?;
    // What became of the load is read from the result backend, not from worker counters: a
    // foreign worker has none, and ours lose the last tasks a stopping worker finishes between
    // two scrapes.
    let results = ResultCounter {
        conn: connection::connect("BACKEND_URL", backend_url, None, Duration::from_secs(10))?,
        pending: Vec::new(),
        succeeded: 0.0,
        failed: 0.0,
    };
    let send_pattern = pattern.clone();
    let task = tokio::spawn(async move {
        let conn = connection::connect("BROKER_URL", &options.redis.broker_url, None, Duration::from_secs(10))?;
        loadgen::send(&conn, &send_pattern, &options, |_, _| {}).await
    });
    Ok(Load { pattern: pattern.clone(), task: Some(task), sent: None, note: String::new(), results })
}
