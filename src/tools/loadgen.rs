//! The load generator: enqueue Celery tasks in a burst, a ramp or an oscillation, exactly as
//! Python's `send_task` would (so Python and Rust workers both run them), and optionally wait
//! for their results and report latency.

use crate::runtime::args::{self, QueueArgs, RedisArgs};
use crate::task::builtin as tasks;
use crate::tools::pattern::{LoadPattern, MAX_TASKS};
use crate::transport::connection::{self, Conn, redact_url};
use crate::wire::keys;
use crate::wire::task_write::origin;
use crate::wire::{NewTask, TaskState};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};
use std::fmt;
use std::io::IsTerminal;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// `celery-autoscale loadgen <pattern>`.
#[derive(Clone, Debug, clap::Args)]
pub struct LoadgenArgs {
    #[command(subcommand)]
    pub pattern: PatternArgs,
    #[command(flatten)]
    pub options: LoadOptions,
}

/// The arrival pattern, with its parameters. Built through the same validated constructors as
/// the `--load burst:400` strings of `local` and `simulate` ([`LoadPattern::burst`] …).
#[derive(Clone, Debug, clap::Subcommand)]
pub enum PatternArgs {
    /// N tasks at once.
    Burst {
        /// How many tasks (at most 1000000000).
        #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u64).range(..=MAX_TASKS))]
        n: u64,
        /// `loadgen burst 400` (the count without --n): refused with the form to write.
        #[arg(hide = true)]
        count: Option<String>,
    },
    /// A rate that changes linearly.
    Ramp {
        /// Starting rate, tasks/s.
        #[arg(long, default_value = "1", value_parser = args::rate)]
        from: f64,
        /// Final rate, tasks/s.
        #[arg(long, default_value = "20", value_parser = args::rate)]
        to: f64,
        /// Seconds from the first rate to the last.
        #[arg(long, default_value = "120", value_parser = args::non_negative_duration)]
        duration: Duration,
    },
    /// A rate that swings: mean + amplitude·sin(2πt/period), never below 0.
    Oscillate {
        /// Mean rate, tasks/s.
        #[arg(long, default_value = "10", value_parser = args::rate)]
        mean: f64,
        /// Swing above and below the mean, tasks/s.
        #[arg(long, default_value = "8", value_parser = args::rate)]
        amplitude: f64,
        /// Seconds per full swing.
        #[arg(long, default_value = "60", value_parser = args::duration)]
        period: Duration,
        /// Seconds to keep sending.
        #[arg(long, default_value = "300", value_parser = args::non_negative_duration)]
        duration: Duration,
    },
}

impl PatternArgs {
    pub fn to_pattern(&self) -> Result<LoadPattern, LoadgenError> {
        if let PatternArgs::Burst { count: Some(count), .. } = self {
            return Err(LoadgenError::Config(format!(
                "loadgen burst takes the count as --n: write `loadgen burst --n {count}` (`burst:{count}` is the \
                 --load form of local and simulate)"
            )));
        }
        let (kind, built) = match *self {
            PatternArgs::Burst { n, .. } => ("burst", LoadPattern::burst(n)),
            PatternArgs::Ramp { from, to, duration } => ("ramp", LoadPattern::ramp(from, to, duration)),
            PatternArgs::Oscillate { mean, amplitude, period, duration } => {
                ("oscillate", LoadPattern::oscillate(mean, amplitude, period, duration))
            }
        };
        built.map_err(|problem| LoadgenError::Config(format!("loadgen {kind}: {problem}")))
    }
}

/// Which task to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TaskKind {
    /// `tasks.cpu_bound(n)`.
    Cpu,
    /// `tasks.io_bound(seconds)`.
    Io,
    /// Alternating cpu and io.
    Mix,
}

/// Your own task instead of the built-in ones: a Celery app's task name, its args and kwargs as
/// JSON (every message the same), so a load drives your app's workers without a producer.
#[derive(Clone, Debug, Default, PartialEq, clap::Args)]
pub struct CustomTask {
    /// Send this task instead of --task's built-in ones: its name as your Celery app registers
    /// it (e.g. myapp.tasks.resize). Your workers must know it.
    #[arg(long, value_parser = task_name, global = true)]
    pub task_name: Option<String>,
    /// The task's positional arguments as a JSON array, e.g. '[2, 3]' (with --task-name).
    #[arg(long, value_parser = json_args, requires = "task_name", global = true)]
    pub task_args: Option<JsonArgs>,
    /// The task's keyword arguments as a JSON object, e.g. '{"size": 128}' (with --task-name).
    #[arg(long, value_parser = json_kwargs, requires = "task_name", global = true)]
    pub task_kwargs: Option<JsonKwargs>,
}

/// A JSON array: a task's args.
#[derive(Clone, Debug, PartialEq)]
pub struct JsonArgs(pub Vec<Value>);

/// A JSON object: a task's kwargs.
#[derive(Clone, Debug, PartialEq)]
pub struct JsonKwargs(pub Map<String, Value>);

fn task_name(s: &str) -> Result<String, String> {
    if s.trim().is_empty() || s.chars().any(char::is_control) {
        return Err("a task name is a non-empty word such as myapp.tasks.add".to_owned());
    }
    Ok(s.to_owned())
}

fn json_args(s: &str) -> Result<JsonArgs, String> {
    match serde_json::from_str::<Value>(s) {
        Ok(Value::Array(a)) => Ok(JsonArgs(a)),
        Ok(_) => Err(format!("{s:?} is JSON but not an array; write the args as a JSON array, e.g. '[2, 3]'")),
        Err(e) => Err(format!("{s:?} is not JSON ({e}); write the args as a JSON array, e.g. '[2, 3]'")),
    }
}

fn json_kwargs(s: &str) -> Result<JsonKwargs, String> {
    match serde_json::from_str::<Value>(s) {
        Ok(Value::Object(m)) => Ok(JsonKwargs(m)),
        Ok(_) => {
            Err(format!("{s:?} is JSON but not an object; write the kwargs as a JSON object, e.g. '{{\"x\": 1}}'"))
        }
        Err(e) => Err(format!("{s:?} is not JSON ({e}); write the kwargs as a JSON object, e.g. '{{\"x\": 1}}'")),
    }
}

impl CustomTask {
    /// What the load sends, in words.
    pub fn describe(&self, kind: TaskKind) -> String {
        match &self.task_name {
            Some(name) => name.clone(),
            None => match kind {
                TaskKind::Cpu => "tasks.cpu_bound".to_owned(),
                TaskKind::Io => "tasks.io_bound".to_owned(),
                TaskKind::Mix => "tasks.cpu_bound and tasks.io_bound alternating".to_owned(),
            },
        }
    }
}

/// An inclusive range written `A:B` (or one value `A`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Span<T>(pub T, pub T);

/// What a [`Span`] may hold, each kind with its own bounds.
pub trait SpanValue: PartialOrd + Copy + fmt::Display {
    fn parse_value(s: &str) -> Result<Self, String>;
}

impl SpanValue for u64 {
    fn parse_value(s: &str) -> Result<Self, String> {
        s.parse().map_err(|_| format!("{s:?} is not a whole number ≥ 0"))
    }
}

/// Seconds (io_bound's argument): the one duration parser's bounds, so NaN, infinities and
/// negatives never reach the random number generator.
impl SpanValue for f64 {
    fn parse_value(s: &str) -> Result<Self, String> {
        args::non_negative_duration(s).map(|d| d.as_secs_f64())
    }
}

impl<T: SpanValue> FromStr for Span<T> {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |p: &str| T::parse_value(p.trim());
        let (a, b) = match s.split_once(':') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => (parse(s)?, parse(s)?),
        };
        if a > b {
            return Err(format!("range {a}:{b} is empty; write LOW:HIGH"));
        }
        Ok(Span(a, b))
    }
}

impl<T: fmt::Display> fmt::Display for Span<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.0, self.1)
    }
}

/// The most tasks `--wait` follows: it keeps each task's id and send time (~100 bytes) until
/// the result arrives, so the bound keeps that under ~100 MB.
pub const MAX_WAIT_TASKS: u64 = 1_000_000;

/// What every pattern shares.
#[derive(Clone, Debug, clap::Args)]
pub struct LoadOptions {
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub queue: QueueArgs,
    /// Task to send.
    #[arg(long, value_enum, default_value_t = TaskKind::Mix, global = true)]
    pub task: TaskKind,
    #[command(flatten)]
    pub custom: CustomTask,
    /// Message priority 0..=9 (on Redis, 0 is served first).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=9), global = true)]
    pub priority: u8,
    /// cpu_bound's n, drawn uniformly from LOW:HIGH (2M..4M ≈ 0.4–0.8 s of one core).
    #[arg(long, default_value = "2000000:4000000", global = true)]
    pub cpu_n: Span<u64>,
    /// io_bound's seconds, drawn uniformly from LOW:HIGH.
    #[arg(long, default_value = "0.5:1.5", global = true)]
    pub io_seconds: Span<f64>,
    /// Random seed for the task arguments (default: random).
    #[arg(long, global = true)]
    pub seed: Option<u64>,
    /// Messages per LPUSH.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000), global = true)]
    pub batch: u32,
    /// Wait for every result, then report outcomes and latency; exit 1 unless all succeeded
    /// (at most 1000000 tasks: their ids are kept until the results arrive).
    #[arg(long, global = true)]
    pub wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value = "900", value_parser = args::duration, global = true)]
    pub wait_timeout: Duration,
}

impl LoadOptions {
    /// The one queue loadgen sends to.
    pub fn queue_name(&self) -> Result<String, LoadgenError> {
        let mut names = self.queue.names().map_err(|e| LoadgenError::Config(e.to_string()))?;
        if names.len() > 1 {
            return Err(LoadgenError::Config(format!(
                "loadgen sends to one queue, but --queue names {} ({}); run one loadgen per queue",
                names.len(),
                names.join(",")
            )));
        }
        Ok(names.remove(0))
    }

    /// Everything that can be refused before connecting to Redis.
    pub fn check(&self, pattern: &LoadPattern) -> Result<(), LoadgenError> {
        self.queue_name()?;
        let total = pattern.total();
        if self.wait && total > MAX_WAIT_TASKS {
            return Err(LoadgenError::Config(format!(
                "--wait follows at most {MAX_WAIT_TASKS} tasks, but the pattern {pattern} sends {total}; send \
                 without --wait, or in runs of at most {MAX_WAIT_TASKS}"
            )));
        }
        Ok(())
    }
}

/// Errors a user can cause or meet.
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error(transparent)]
    Connect(#[from] connection::ConnectError),
    #[error("{0}")]
    Config(String),
    // The Redis error is part of the sentence, not a `source`: a RedisError's own source repeats
    // its text, so a printed chain would say "Connection refused" three times.
    #[error(
        "Redis at BROKER_URL={url} failed after {sent} of {total} tasks were confirmed in queue {queue:?}{}: {}",
        if *unconfirmed > 0 { format!(" ({unconfirmed} more were in flight and may or may not have arrived)") } else { String::new() },
        connection::explain(cause, "BROKER_URL", url)
    )]
    Send { url: String, queue: String, sent: u64, unconfirmed: u64, total: u64, cause: redis::RedisError },
    #[error("cannot read results from BACKEND_URL={url}: {}", connection::explain(cause, "BACKEND_URL", url))]
    Results { url: String, cause: redis::RedisError },
}

/// What was sent.
#[derive(Clone, Debug)]
pub struct SendReport {
    pub sent: u64,
    pub elapsed: Duration,
    /// Task id → when it was sent; kept only with `--wait` (at most [`MAX_WAIT_TASKS`]).
    pub sent_at: Vec<(String, DateTime<Utc>)>,
}

impl SendReport {
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// What came back (with `--wait`).
#[derive(Clone, Debug, Default)]
pub struct WaitReport {
    pub succeeded: u64,
    pub failed: u64,
    pub pending: u64,
    /// Seconds from send to `date_done`, sorted.
    pub latencies: Vec<f64>,
    /// First send to last `date_done`.
    pub makespan: Duration,
}

impl WaitReport {
    pub fn percentile(&self, p: f64) -> Option<f64> {
        if self.latencies.is_empty() {
            return None;
        }
        let idx = ((p / 100.0) * (self.latencies.len() - 1) as f64).round() as usize;
        self.latencies.get(idx).copied()
    }
}

/// Builds the task messages: arguments drawn from the configured ranges.
pub struct TaskFactory {
    kind: TaskKind,
    custom: CustomTask,
    cpu_n: Span<u64>,
    io_seconds: Span<f64>,
    queue: String,
    priority: u8,
    rng: StdRng,
    origin: String,
    count: u64,
}

impl TaskFactory {
    pub fn new(o: &LoadOptions, queue: String) -> Self {
        let rng = o.seed.map_or_else(StdRng::from_os_rng, StdRng::seed_from_u64);
        TaskFactory {
            kind: o.task,
            custom: o.custom.clone(),
            cpu_n: o.cpu_n,
            io_seconds: o.io_seconds,
            queue,
            priority: o.priority,
            rng,
            origin: origin(),
            count: 0,
        }
    }

    /// The next task and its envelope bytes.
    pub fn next_task(&mut self) -> (NewTask, Vec<u8>) {
        if let Some(name) = &self.custom.task_name {
            let args = self.custom.task_args.as_ref().map_or_else(Vec::new, |a| a.0.clone());
            let kwargs = self.custom.task_kwargs.as_ref().map_or_else(Map::new, |k| k.0.clone());
            let mut t = NewTask::new(name, args, kwargs, &self.queue);
            t.priority = self.priority;
            let (bytes, _) = t.to_message(&self.origin);
            return (t, bytes);
        }
        let cpu = match self.kind {
            TaskKind::Cpu => true,
            TaskKind::Io => false,
            TaskKind::Mix => self.count.is_multiple_of(2),
        };
        self.count += 1;
        let (name, arg) = if cpu {
            (tasks::CPU_BOUND, json!(self.rng.random_range(self.cpu_n.0..=self.cpu_n.1)))
        } else {
            let s = self.rng.random_range(self.io_seconds.0..=self.io_seconds.1);
            (tasks::IO_BOUND, json!((s * 1000.0).round() / 1000.0))
        };
        let mut t = NewTask::new(name, vec![arg], Map::new(), &self.queue);
        t.priority = self.priority;
        let (bytes, _) = t.to_message(&self.origin);
        (t, bytes)
    }
}

/// How many LPUSH commands may be in flight at once (pipelining on one connection).
const IN_FLIGHT: usize = 8;

/// Send `pattern`'s tasks, paced by its rate, `progress` called after every confirmed batch.
/// Messages are built a few batches ahead and dropped once sent, so memory does not grow with
/// the count; ids are kept only with `options.wait`.
pub async fn send(
    conn: &Conn,
    pattern: &LoadPattern,
    options: &LoadOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<SendReport, LoadgenError> {
    options.check(pattern)?;
    let queue = options.queue_name()?;
    let total = pattern.total();
    let key = options.queue.priority_steps.key_for(&queue, i64::from(options.priority));
    let batch_size = u64::from(options.batch);
    // Messages are built on a thread of their own, a few batches ahead, while this task keeps
    // Redis busy: building (JSON, base64, ids) and sending then use both cores.
    let (tx, mut prepared) = tokio::sync::mpsc::channel::<Vec<(String, Vec<u8>)>>(4);
    let mut factory = TaskFactory::new(options, queue.clone());
    std::thread::spawn(move || {
        let mut left = total;
        while left > 0 {
            let n = left.min(batch_size);
            let chunk = (0..n).map(|_| factory.next_task()).map(|(t, bytes)| (t.id, bytes)).collect();
            if tx.blocking_send(chunk).is_err() {
                return; // the sender stopped (an error); nothing more is needed
            }
            left -= n;
        }
    });
    let mut ready: std::collections::VecDeque<(String, Vec<u8>)> = Default::default();
    let start = Instant::now();
    // `check` bounded the count when ids are kept.
    let mut sent_at = Vec::with_capacity(if options.wait { total as usize } else { 0 });
    let (mut queued, mut confirmed) = (0u64, 0u64);
    let mut in_flight = FuturesUnordered::new();
    let fail = |confirmed: u64, unconfirmed: u64, cause| LoadgenError::Send {
        url: redact_url(&options.redis.broker_url),
        queue: queue.clone(),
        sent: confirmed,
        unconfirmed,
        total,
        cause,
    };
    while confirmed < total {
        let due = (pattern.cumulative(start.elapsed()).floor() as u64).min(total);
        while queued < due && in_flight.len() < IN_FLIGHT {
            let n = (due - queued).min(batch_size) as usize;
            while ready.len() < n {
                ready.extend(prepared.recv().await.expect("the builder thread makes every message"));
            }
            let now = Utc::now();
            let batch: Vec<Vec<u8>> = ready
                .drain(..n)
                .map(|(id, bytes)| {
                    if options.wait {
                        sent_at.push((id, now));
                    }
                    bytes
                })
                .collect();
            queued += n as u64;
            let mut c = conn.clone();
            let key = key.clone();
            in_flight.push(async move {
                let r: redis::RedisResult<i64> = redis::cmd("LPUSH").arg(&key).arg(&batch).query_async(&mut c).await;
                (n as u64, r)
            });
        }
        if in_flight.is_empty() {
            // Nothing due yet: wait for the pattern's next task.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        if let Some((n, r)) = in_flight.next().await {
            if let Err(e) = r {
                // A refused connection delivered nothing; any other failure may have landed.
                let unconfirmed = if e.is_connection_refusal() { 0 } else { queued - confirmed };
                return Err(fail(confirmed, unconfirmed, e));
            }
            confirmed += n;
            progress(confirmed, total);
        }
    }
    Ok(SendReport { sent: confirmed, elapsed: start.elapsed(), sent_at })
}

/// Poll the result backend until every task has a final state or `timeout` passes.
pub async fn wait_results(
    backend: &Conn,
    url: &str,
    sent_at: &[(String, DateTime<Utc>)],
    timeout: Duration,
    mut progress: impl FnMut(u64, u64),
) -> Result<WaitReport, LoadgenError> {
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<usize> = (0..sent_at.len()).collect();
    let mut report = WaitReport::default();
    let mut last_done: Option<DateTime<Utc>> = None;
    let first_sent = sent_at.iter().map(|(_, t)| *t).min();
    let mut conn = backend.clone();
    loop {
        let mut still = Vec::new();
        for chunk in pending.chunks(1000) {
            let keys: Vec<String> = chunk.iter().map(|i| keys::result_key(&sent_at[*i].0)).collect();
            let values: Vec<Option<String>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .map_err(|cause| LoadgenError::Results { url: redact_url(url), cause })?;
            for (i, v) in chunk.iter().zip(values) {
                let meta: Option<Value> = v.and_then(|v| serde_json::from_str(&v).ok());
                let status = meta.as_ref().and_then(|m| m["status"].as_str());
                let done = meta
                    .as_ref()
                    .and_then(|m| m["date_done"].as_str())
                    .and_then(|d| crate::wire::time::parse_iso8601(d).ok());
                match status {
                    Some(s) if s == TaskState::Success.as_str() => report.succeeded += 1,
                    Some(s) if s == TaskState::Failure.as_str() || s == TaskState::Revoked.as_str() => {
                        report.failed += 1
                    }
                    _ => {
                        still.push(*i);
                        continue;
                    }
                }
                if let Some(d) = done {
                    report.latencies.push((d - sent_at[*i].1).num_microseconds().unwrap_or(0) as f64 / 1e6);
                    last_done = last_done.max(Some(d));
                }
            }
        }
        pending = still;
        progress(sent_at.len() as u64 - pending.len() as u64, sent_at.len() as u64);
        if pending.is_empty() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    report.pending = pending.len() as u64;
    report.latencies.sort_by(f64::total_cmp);
    if let (Some(first), Some(last)) = (first_sent, last_done) {
        report.makespan = (last - first).to_std().unwrap_or_default();
    }
    Ok(report)
}

/// Progress: a bar on a terminal, a log line every few seconds otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    what: &'static str,
    last_log: Instant,
}

impl Progress {
    fn new(what: &'static str, total: u64) -> Self {
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{msg:>8} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_message(what);
            bar
        });
        Progress { bar, what, last_log: Instant::now() }
    }

    fn update(&mut self, done: u64, total: u64) {
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None if done == total || self.last_log.elapsed() >= Duration::from_secs(5) => {
                tracing::info!("{}: {done}/{total}", self.what);
                self.last_log = Instant::now();
            }
            None => {}
        }
    }

    fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The CLI: send, optionally wait, print the report. `Ok(true)` when everything succeeded.
pub async fn run(args: LoadgenArgs) -> Result<bool, LoadgenError> {
    let o = &args.options;
    let pattern = args.pattern.to_pattern()?;
    o.check(&pattern)?;
    let queue = o.queue_name()?;
    o.redis.apply_keyprefix().map_err(|e| LoadgenError::Config(e.to_string()))?;
    let timeout = Duration::from_secs(10);
    let broker = connection::connect("BROKER_URL", &o.redis.broker_url, o.redis.sentinel_master.as_deref(), timeout)?;
    let total = pattern.total();
    let mut progress = Progress::new("sent", total);
    let sent = send(&broker, &pattern, o, |d, t| progress.update(d, t)).await?;
    progress.finish();
    let tasks = o.custom.describe(o.task);
    println!(
        "sent {} tasks ({tasks}) to queue {queue:?} in {:.3} s: {:.0} tasks/s (pattern {pattern})",
        sent.sent,
        sent.elapsed.as_secs_f64(),
        sent.rate()
    );
    if !o.wait {
        return Ok(true);
    }
    let backend =
        connection::connect("BACKEND_URL", &o.redis.backend_url, o.redis.sentinel_master.as_deref(), timeout)?;
    let mut progress = Progress::new("done", sent.sent);
    let waited =
        wait_results(&backend, &o.redis.backend_url, &sent.sent_at, o.wait_timeout, |d, t| progress.update(d, t))
            .await?;
    progress.finish();
    let pct = |p| waited.percentile(p).map_or("-".to_owned(), |v| format!("{v:.3} s"));
    let pending = if waited.pending > 0 {
        format!(", {} still pending after {:.0} s", waited.pending, o.wait_timeout.as_secs_f64())
    } else {
        String::new()
    };
    println!(
        "results: {} succeeded, {} failed{pending}; latency p50 {} p95 {} p99 {}; makespan {:.3} s",
        waited.succeeded,
        waited.failed,
        pct(50.0),
        pct(95.0),
        pct(99.0),
        waited.makespan.as_secs_f64()
    );
    Ok(waited.failed == 0 && waited.pending == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::Rng;

    #[test]
    fn spans() {
        assert_eq!("0.5:1.5".parse::<Span<f64>>(), Ok(Span(0.5, 1.5)));
        assert_eq!("3".parse::<Span<u64>>(), Ok(Span(3, 3)));
        for bad in ["NaN:NaN", "0:inf", "-1:-0.5", "2:1", "x", "1e300:1e301"] {
            assert!(bad.parse::<Span<f64>>().is_err(), "{bad}");
        }
        assert!("-1:2".parse::<Span<u64>>().is_err());
    }

    proptest! {
        // Any text: a span is refused or can be drawn from (what TaskFactory does).
        #[test]
        fn spans_are_usable_or_refused(s in "[-+]?([0-9.eE]{1,8}|NaN|inf)(:[-+]?([0-9.eE]{1,8}|NaN|inf))?|\\PC{0,12}") {
            let mut rng = StdRng::seed_from_u64(1);
            if let Ok(Span(a, b)) = s.parse::<Span<f64>>() {
                let v = rng.random_range(a..=b);
                prop_assert!(v.is_finite() && v >= 0.0);
            }
            if let Ok(Span(a, b)) = s.parse::<Span<u64>>() {
                let _ = rng.random_range(a..=b);
            }
        }
    }
}
