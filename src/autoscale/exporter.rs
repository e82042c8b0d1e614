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
//! HPA then holds its replica count instead of scaling in on old data. A poll still running
//! after one interval counts as failed for the same reason (the numbers being served are
//! already more than two intervals old), though it may still finish and restore them.
//!
//! Faults are isolated per key: a queue key of the wrong type (`SET q05 x`) withdraws only that
//! queue's series, a wrong-type `unacked` only the `celery_queue_reserved` series; each is
//! logged once when it starts and counted in `celery_queue_exporter_key_errors_total{queue}`
//! (`queue="unacked"` for the hash) on every poll it lasts.

use crate::runtime::args::{self, QueueArgs, RedisArgs, StartError};
use crate::runtime::http;
use crate::runtime::metrics::ExporterMetrics;
use crate::runtime::shutdown::{Shutdown, Stage};
use crate::transport::connection::{self, Conn, redact_url};
use crate::wire::keys::{self, PrioritySteps};
use redis::{RedisResult, Script};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// `celery-autoscale exporter`.
#[derive(Clone, Debug, clap::Args)]
pub struct ExporterArgs {
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub queue: QueueArgs,
    /// Seconds between polls of Redis.
    #[arg(long, default_value = "5", value_parser = args::duration)]
    pub interval: Duration,
    /// Where /metrics, /healthz and /readyz are served (loopback by default; a pod passes
    /// 0.0.0.0:9808 so Prometheus reaches it).
    #[arg(long, env = "EXPORTER_LISTEN", default_value = "127.0.0.1:9808")]
    pub listen: String,
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

/// A key the poll could not read (wrong type, usually): which queue, or `unacked`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyError {
    pub queue: String,
    pub error: String,
}

/// One poll: the queues that could be read, and the keys that could not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Poll {
    pub stats: Vec<QueueStats>,
    /// Queues (or `unacked`) whose keys failed; their series are withdrawn.
    pub broken: Vec<KeyError>,
    /// False when `unacked` could not be read: `reserved` is then unknown for every queue.
    pub reserved_ok: bool,
}

/// The name [`KeyError::queue`] gives the `unacked` hash.
pub const UNACKED_LABEL: &str = keys::UNACKED;

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
        DepthReader { conn, queues, steps, batch, count_unacked: Script::new(crate::transport::scripts::COUNT_UNACKED) }
    }

    /// The queues that could be read (see [`DepthReader::poll_detailed`] for the others).
    pub async fn poll(&self) -> RedisResult<Vec<QueueStats>> {
        Ok(self.poll_detailed().await?.stats)
    }

    /// Err only when Redis itself failed; a key of the wrong type is reported in
    /// [`Poll::broken`] and does not touch the other queues.
    pub async fn poll_detailed(&self) -> RedisResult<Poll> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for q in &self.queues {
            for key in self.steps.queue_keys(q) {
                pipe.llen(key);
            }
        }
        pipe.hlen(keys::unacked());
        // Per-command results: one WRONGTYPE must not fail the others.
        let mut counts: Vec<RedisResult<u64>> = pipe.ignore_errors().query_async(&mut conn).await?;
        let unacked_total = counts.pop().unwrap_or(Ok(0));
        let mut broken = Vec::new();
        let reserved = match unacked_total {
            Ok(0) => Ok(HashMap::new()),
            Ok(_) => self.reserved_by_queue().await,
            Err(e) => Err(e),
        };
        let (reserved, reserved_ok) = match reserved {
            Ok(r) => (r, true),
            Err(e) if is_key_error(&e) => {
                broken.push(KeyError { queue: UNACKED_LABEL.to_owned(), error: e.to_string() });
                (HashMap::new(), false)
            }
            Err(e) => return Err(e),
        };
        let per_queue = self.steps.steps().len();
        let mut stats = Vec::new();
        for (q, lens) in self.queues.iter().zip(counts.chunks(per_queue)) {
            let mut depth = 0;
            let mut failed = None;
            for len in lens {
                match len {
                    Ok(n) => depth += n,
                    Err(e) if is_key_error(e) => failed = Some(e.to_string()),
                    Err(e) => return Err(e.clone()),
                }
            }
            match failed {
                Some(error) => broken.push(KeyError { queue: q.clone(), error }),
                None => {
                    stats.push(QueueStats { queue: q.clone(), depth, reserved: reserved.get(q).copied().unwrap_or(0) })
                }
            }
        }
        Ok(Poll { stats, broken, reserved_ok })
    }

    /// Walk `unacked` with HSCAN inside Redis, `batch` entries per call.
    pub async fn reserved_by_queue(&self) -> RedisResult<HashMap<String, u64>> {
        let mut conn = self.conn.clone();
        let mut cursor = "0".to_owned();
        let mut totals: HashMap<String, u64> = HashMap::new();
        loop {
            let reply: Vec<redis::Value> =
                self.count_unacked.key(keys::unacked()).arg(&cursor).arg(self.batch).invoke_async(&mut conn).await?;
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

/// An error about one key's contents (WRONGTYPE, also when raised inside the counting script),
/// as opposed to Redis being unreachable or refusing us as a whole (NOAUTH, LOADING, …).
fn is_key_error(e: &redis::RedisError) -> bool {
    // Redis 7 keeps the code of an error raised inside a script; older servers wrap it in ERR.
    e.code() == Some("WRONGTYPE") || (e.code() == Some("ERR") && e.detail().is_some_and(|d| d.contains("WRONGTYPE")))
}

/// Run until SIGTERM/SIGINT.
pub async fn run(args: ExporterArgs) -> Result<(), StartError> {
    let shutdown = Shutdown::from_signals().map_err(StartError::Signals)?;
    run_with_shutdown(args, shutdown).await
}

/// [`run`] with an externally driven [`Shutdown`] (the local supervisor embeds the exporter).
pub async fn run_with_shutdown(args: ExporterArgs, shutdown: Shutdown) -> Result<(), StartError> {
    let queues = args.queue.names()?;
    args.redis.apply_keyprefix()?;
    let interval = args.interval;
    // A poll that takes longer than this is treated as failed: its numbers would be old.
    let timeout = interval.clamp(Duration::from_secs(2), Duration::from_secs(10));
    let conn =
        connection::connect("BROKER_URL", &args.redis.broker_url, args.redis.sentinel_master.as_deref(), timeout)?;
    let reader = DepthReader::new(conn, queues.clone(), args.queue.priority_steps.clone(), args.reserved_batch);
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
    tracing::info!(broker = %redact_url(&args.redis.broker_url), ?queues, interval_s = interval.as_secs_f64(), listen = %addr, "exporter started");

    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing_since: Option<Instant> = None;
    // Keys reported broken, so each is logged once when it breaks and once when it heals.
    let mut broken_keys: HashSet<String> = HashSet::new();
    let stale_after = interval.min(timeout);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.reached(Stage::Graceful) => break,
        }
        let started = Instant::now();
        let poll = reader.poll_detailed();
        tokio::pin!(poll);
        let outcome = match tokio::time::timeout(stale_after, &mut poll).await {
            Ok(r) => Ok(r),
            Err(_) => {
                // Still waiting after an interval: what is served is no longer fresh.
                withdraw(&metrics, &healthy);
                tokio::time::timeout(timeout.saturating_sub(stale_after), &mut poll).await
            }
        };
        metrics.poll_duration.observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(Ok(poll)) => {
                publish(&metrics, &poll, &mut broken_keys);
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
                    Ok(Err(e)) => connection::explain(&e, "BROKER_URL", &redact_url(&args.redis.broker_url)),
                    _ => format!("no answer within {timeout:?}"),
                };
                withdraw(&metrics, &healthy);
                metrics.polls.with_label_values(&["error"]).inc();
                if failing_since.is_none() {
                    tracing::error!(broker = %redact_url(&args.redis.broker_url), %error, "cannot poll Redis; queue series withdrawn until it answers again");
                    failing_since = Some(Instant::now());
                }
            }
        }
    }
    let _ = server.await;
    tracing::info!("exporter stopped");
    Ok(())
}

/// Withdraw the numbers rather than leave stale ones for the autoscaler.
fn withdraw(metrics: &ExporterMetrics, healthy: &AtomicBool) {
    metrics.depth.reset();
    metrics.reserved.reset();
    metrics.last_poll_ok.set(0);
    healthy.store(false, Ordering::Relaxed);
}

/// Serve one poll's numbers: the readable queues' series, none for the broken ones.
fn publish(metrics: &ExporterMetrics, poll: &Poll, broken_keys: &mut HashSet<String>) {
    // Update in place (no reset first): a scrape in between must not see the series vanish.
    if !poll.reserved_ok {
        metrics.reserved.reset();
    }
    for s in &poll.stats {
        metrics.depth.with_label_values(&[&s.queue]).set(s.depth as i64);
        if poll.reserved_ok {
            metrics.reserved.with_label_values(&[&s.queue]).set(s.reserved as i64);
        }
    }
    let mut now_broken = HashSet::new();
    for b in &poll.broken {
        let _ = metrics.depth.remove_label_values(&[&b.queue]);
        let _ = metrics.reserved.remove_label_values(&[&b.queue]);
        metrics.key_errors.with_label_values(&[&b.queue]).inc();
        if !broken_keys.contains(&b.queue) {
            let withdrawn =
                if b.queue == UNACKED_LABEL { "celery_queue_reserved of every queue" } else { "this queue's series" };
            tracing::error!(queue = %b.queue, error = %b.error, "cannot read this queue's keys (wrong type?); {withdrawn} withdrawn, the other queues still served");
        }
        now_broken.insert(b.queue.clone());
    }
    for healed in broken_keys.difference(&now_broken) {
        tracing::info!(queue = %healed, "queue keys readable again");
    }
    *broken_keys = now_broken;
}
