//! The queue-depth exporter: poll Redis every `--interval` and serve what the autoscaler needs.
//!
//! - `celery_queue_depth{queue}`: the sum of LLEN over the queue and every priority list
//!   (kombu splits a prioritised queue into several lists; a bare `LLEN celery` undercounts).
//! - `celery_queue_reserved{queue}`: messages workers have taken but not acknowledged (kombu's
//!   `unacked` hash, attributed by the routing key each entry records). Bare LLEN reads 0 while
//!   every worker is saturated with prefetched work; this series lets the HPA count that work.
//!
//! When a poll fails (Redis down, wrong password, timeout) `celery_queue_exporter_last_poll_ok`
//! drops to 0 and the queue series disappear, so nothing downstream acts on a stale number: the
//! HPA then holds its replica count instead of scaling in on old data.

use crate::args::{StartError, positive_seconds};
use crate::connection::{self, Conn, redact_url};
use crate::http;
use crate::metrics::ExporterMetrics;
use crate::shutdown::{Shutdown, Stage};
use crate::wire::keys::{self, PrioritySteps};
use redis::{RedisResult, Script};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Count `unacked` entries per routing key, one bounded HSCAN batch per call, inside Redis: the
/// ~1 kB payloads never cross the network and Redis is never blocked for long. An entry ends
/// with `, "<exchange>", "<routing_key>"]`, so the routing key is the last JSON string (a
/// routing key containing an escaped quote is not recognised).
const COUNT_UNACKED: &str = r#"
local res = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local vals = res[2]
local counts = {}
local byte = string.byte
for i = 2, #vals, 2 do
  -- Read backwards from the closing bracket: the work per entry is the routing key's length,
  -- not the payload's.
  local v = vals[i]
  local e = #v
  while e > 0 and byte(v, e) ~= 93 do e = e - 1 end
  e = e - 1
  while e > 0 and byte(v, e) == 32 do e = e - 1 end
  if e > 0 and byte(v, e) == 34 then
    local s = e - 1
    while s > 0 and byte(v, s) ~= 34 do s = s - 1 end
    if s > 0 then
      local rk = string.sub(v, s + 1, e - 1)
      counts[rk] = (counts[rk] or 0) + 1
    end
  end
end
local out = {res[1]}
for k, v in pairs(counts) do
  out[#out + 1] = k
  out[#out + 1] = v
end
return out
"#;

/// `celery-autoscale exporter`.
#[derive(Clone, Debug, clap::Args)]
pub struct ExporterArgs {
    /// Broker (queues) Redis URL.
    #[arg(long, env = "BROKER_URL", default_value = connection::DEFAULT_BROKER_URL)]
    pub broker_url: String,
    /// Master name for sentinel:// URLs (kombu's master_name).
    #[arg(long, env = "SENTINEL_MASTER")]
    pub sentinel_master: Option<String>,
    /// Queues to report, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = keys::DEFAULT_QUEUE)]
    pub queues: Vec<String>,
    /// Seconds between polls of Redis.
    #[arg(long, default_value_t = 5.0, value_parser = positive_seconds)]
    pub interval: f64,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, env = "EXPORTER_LISTEN", default_value = "0.0.0.0:9808")]
    pub listen: String,
    /// Priority buckets, as kombu's priority_steps (must match the producers').
    #[arg(long, default_value_t = PrioritySteps::default())]
    pub priority_steps: PrioritySteps,
    /// `unacked` entries examined per Redis call when counting reserved messages.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(10..=100_000))]
    pub reserved_batch: u32,
}

/// One poll's result for one queue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub queue: String,
    /// Σ LLEN over the queue's lists.
    pub depth: u64,
    /// `unacked` entries whose routing key is this queue.
    pub reserved: u64,
}

/// Reads queue depths; one pipelined round trip for all lists, plus bounded batches over
/// `unacked` when it is not empty.
#[derive(Clone)]
pub struct DepthReader {
    conn: Conn,
    queues: Vec<String>,
    steps: PrioritySteps,
    batch: u32,
    count_unacked: Script,
}

impl DepthReader {
    pub fn new(conn: Conn, queues: Vec<String>, steps: PrioritySteps, batch: u32) -> Self {
        DepthReader { conn, queues, steps, batch, count_unacked: Script::new(COUNT_UNACKED) }
    }

    pub async fn poll(&self) -> RedisResult<Vec<QueueStats>> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for q in &self.queues {
            for key in self.steps.queue_keys(q) {
                pipe.llen(key);
            }
        }
        pipe.hlen(keys::UNACKED);
        let mut counts: Vec<u64> = pipe.query_async(&mut conn).await?;
        let unacked_total = counts.pop().unwrap_or(0);
        let per_queue = self.steps.steps().len();
        let reserved = if unacked_total > 0 { self.reserved_by_queue().await? } else { HashMap::new() };
        Ok(self
            .queues
            .iter()
            .zip(counts.chunks(per_queue))
            .map(|(q, lens)| QueueStats {
                queue: q.clone(),
                depth: lens.iter().sum(),
                reserved: reserved.get(q).copied().unwrap_or(0),
            })
            .collect())
    }

    /// Walk `unacked` with HSCAN inside Redis, `batch` entries per call.
    pub async fn reserved_by_queue(&self) -> RedisResult<HashMap<String, u64>> {
        let mut conn = self.conn.clone();
        let mut cursor = "0".to_owned();
        let mut totals: HashMap<String, u64> = HashMap::new();
        loop {
            let reply: Vec<redis::Value> =
                self.count_unacked.key(keys::UNACKED).arg(&cursor).arg(self.batch).invoke_async(&mut conn).await?;
            let mut it = reply.into_iter();
            cursor = it.next().map(redis::from_redis_value).transpose()?.unwrap_or_else(|| "0".into());
            while let (Some(k), Some(n)) = (it.next(), it.next()) {
                let k: String = redis::from_redis_value(k)?;
                let n: u64 = redis::from_redis_value(n)?;
                *totals.entry(k).or_default() += n;
            }
            if cursor == "0" {
                return Ok(totals);
            }
        }
    }
}

/// Run until SIGTERM/SIGINT.
pub async fn run(args: ExporterArgs) -> Result<(), StartError> {
    let shutdown = Shutdown::from_signals().map_err(StartError::Signals)?;
    run_with_shutdown(args, shutdown).await
}

/// [`run`] with an externally driven [`Shutdown`] (the local supervisor embeds the exporter).
pub async fn run_with_shutdown(args: ExporterArgs, shutdown: Shutdown) -> Result<(), StartError> {
    let queues: Vec<String> = args.queues.iter().map(|q| q.trim().to_owned()).filter(|q| !q.is_empty()).collect();
    if queues.is_empty() {
        return Err(StartError::NoQueues);
    }
    let interval = Duration::from_secs_f64(args.interval);
    // A poll that takes longer than this is treated as failed: its numbers would be old.
    let timeout = interval.clamp(Duration::from_secs(2), Duration::from_secs(10));
    let conn = connection::connect("BROKER_URL", &args.broker_url, args.sentinel_master.as_deref(), timeout)?;
    let reader = DepthReader::new(conn, queues.clone(), args.priority_steps.clone(), args.reserved_batch);
    let metrics = ExporterMetrics::new();
    let healthy = Arc::new(AtomicBool::new(false));
    let ready: http::ReadyCheck = {
        let healthy = healthy.clone();
        Arc::new(move || if healthy.load(Ordering::Relaxed) { Ok(()) } else { Err("last poll of Redis failed".into()) })
    };
    let stop = shutdown.clone();
    let (addr, server) =
        http::bind("--listen", &args.listen, metrics.registry.clone(), ready, Arc::new(|| {}), async move {
            stop.reached(Stage::Graceful).await
        })
        .await?;
    let server = tokio::spawn(server);
    tracing::info!(broker = %redact_url(&args.broker_url), ?queues, interval_s = args.interval, listen = %addr, "exporter started");

    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.reached(Stage::Graceful) => break,
        }
        let started = Instant::now();
        let outcome = tokio::time::timeout(timeout, reader.poll()).await;
        metrics.poll_duration.observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(Ok(stats)) => {
                for s in &stats {
                    metrics.depth.with_label_values(&[&s.queue]).set(s.depth as i64);
                    metrics.reserved.with_label_values(&[&s.queue]).set(s.reserved as i64);
                }
                metrics.last_poll_ok.set(1);
                metrics.last_success.set(crate::wire::time::unix_seconds(chrono::Utc::now()));
                metrics.polls.with_label_values(&["ok"]).inc();
                healthy.store(true, Ordering::Relaxed);
                if let Some(since) = failing_since.take() {
                    tracing::info!(
                        outage_s = since.elapsed().as_secs_f64(),
                        "Redis polls work again; queue series restored"
                    );
                }
            }
            failure => {
                let error = match failure {
                    Ok(Err(e)) => connection::explain(&e, "BROKER_URL", &redact_url(&args.broker_url)),
                    _ => format!("no answer within {timeout:?}"),
                };
                // Withdraw the numbers rather than leave stale ones for the autoscaler.
                metrics.depth.reset();
                metrics.reserved.reset();
                metrics.last_poll_ok.set(0);
                metrics.polls.with_label_values(&["error"]).inc();
                healthy.store(false, Ordering::Relaxed);
                if failing_since.is_none() {
                    tracing::error!(broker = %redact_url(&args.broker_url), %error, "cannot poll Redis; queue series withdrawn until it answers again");
                    failing_since = Some(Instant::now());
                }
            }
        }
    }
    let _ = server.await;
    tracing::info!("exporter stopped");
    Ok(())
}
