//! `celery-autoscale local`: the whole system on one machine, without Kubernetes.
//!
//! A Redis (started here unless `BROKER_URL` points at one), the queue exporter, and worker
//! processes scaled by the same HPA algorithm the cluster runs ([`crate::hpa`]), fed the live
//! `celery_queue_depth` read from the exporter's `/metrics` every `--sync-period`, within the
//! min/max and behavior of an HPA manifest (the project's own by default). Scale-down sends
//! SIGTERM and waits: workers finish or return their tasks. A worker that dies is replaced and
//! counted. `--load` drives the load generator, so one command shows the whole story; at the
//! end a timeline CSV and the same SVG plot as `simulate` are written.
//!
//! This plays the parts of the HPA controller (every sync) and of the ReplicaSet (every
//! second: replace what died, start or stop processes to match the decision). "spec replicas"
//! is the last decision, "status replicas" the worker processes not stopping, "ready" those
//! whose `/readyz` answers 200. The controller's memory is kept for the whole run.

use crate::args::{QueueArgs, RedisArgs, positive_seconds};
use crate::connection::{self, redact_url};
use crate::exporter::{self, ExporterArgs};
use crate::hpa::{self, Autoscaler, ConditionType, Decision, HpaSpec, MetricReading, Observation, Timestamp};
use crate::loadgen::{self, LoadOptions, Span, TaskKind};
use crate::metrics::{
    EXPORTER_LAST_SUCCESS, QUEUE_DEPTH, QUEUE_RESERVED, TASK_FAILURE, TASK_SUCCESS, WORKER_ACTIVE, WORKER_RESERVED,
};
use crate::pattern::LoadPattern;
use crate::plot::{self, TimelinePoint};
use crate::shutdown::{Shutdown, Stage};
use crate::wire::keys::PrioritySteps;
use std::io::{IsTerminal, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// The project's own HPA, compiled in: `local` uses its min/max/behavior by default.
const PROJECT_HPA: &str = include_str!("../k8s/autoscaling.yaml");

/// `celery-autoscale local`.
#[derive(Clone, Debug, clap::Args)]
pub struct LocalArgs {
    /// HPA manifest whose min/max/target/behavior to apply (default: the project's own,
    /// k8s/autoscaling.yaml, built in). Any rendered multi-document YAML works.
    #[arg(long)]
    pub hpa: Option<PathBuf>,
    /// Which HPA, when the manifest holds several.
    #[arg(long)]
    pub hpa_name: Option<String>,
    /// Seconds between autoscaler syncs (the controller's --horizontal-pod-autoscaler-sync-period).
    #[arg(long, default_value_t = 15.0, value_parser = positive_seconds)]
    pub sync_period: f64,
    /// Load to drive: burst:N, ramp:FROM:TO:SECONDS or oscillate:MEAN:AMPLITUDE:PERIOD:SECONDS
    /// (rates in tasks/s). With a load, the run ends once it is sent, done, and the workers are
    /// back at the minimum.
    #[arg(long)]
    pub load: Option<LoadPattern>,
    /// Task the load sends.
    #[arg(long, value_enum, default_value_t = TaskKind::Mix)]
    pub task: TaskKind,
    /// cpu_bound's n range for the load.
    #[arg(long, default_value = "2000000:4000000")]
    pub cpu_n: Span<u64>,
    /// io_bound's seconds range for the load.
    #[arg(long, default_value = "0.5:1.5")]
    pub io_seconds: Span<f64>,
    /// Use this Redis for the queues instead of starting one.
    #[arg(long, env = "BROKER_URL")]
    pub broker_url: Option<String>,
    /// Result backend (default: database 1 of the broker's Redis).
    #[arg(long, env = "BACKEND_URL")]
    pub backend_url: Option<String>,
    /// Tasks each worker runs at a time.
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 2)]
    pub concurrency: u32,
    /// Seconds a stopping worker may take to finish its tasks (its --shutdown-timeout).
    #[arg(long, default_value_t = 30.0, value_parser = positive_seconds)]
    pub worker_shutdown_timeout: f64,
    /// Where the exporter serves /metrics (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:9808")]
    pub exporter_listen: String,
    /// Seconds between the exporter's polls (default: a third of the sync period, at most 5).
    #[arg(long, value_parser = positive_seconds)]
    pub exporter_interval: Option<f64>,
    /// Directory for the embedded Redis' data (append-only: tasks still queued when the run stops
    /// are there for the next run) and the worker logs.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Timeline CSV written at the end.
    #[arg(long, default_value = "celery-autoscale-local.csv")]
    pub timeline: PathBuf,
    /// SVG plot of queue depth and workers written at the end.
    #[arg(long, default_value = "celery-autoscale-local.svg")]
    pub plot: PathBuf,
    /// Stop after this many seconds in any case.
    #[arg(long, value_parser = positive_seconds)]
    pub max_duration: Option<f64>,
}

/// What can stop `local` from starting.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Hpa(#[from] hpa::HpaError),
    #[error(
        "HPA {hpa}: local mode scales on celery_queue_depth for one queue; the HPA's first metric must be \
         celery_queue_depth with a selector matchLabels {{queue: <name>}} (found {found})"
    )]
    UnsupportedMetric { hpa: String, found: String },
    #[error(
        "redis-server was not found on PATH ({0}). Install it (Debian/Ubuntu: apt-get install redis-server; \
         macOS: brew install redis; or `nix develop`), or point BROKER_URL at a running Redis"
    )]
    RedisMissing(std::io::Error),
    #[error("the embedded redis-server did not start: {0}")]
    RedisStart(String),
    #[error("cannot use --exporter-listen {addr}: {cause} (pass another port, or 127.0.0.1:0 for any)")]
    Listen { addr: String, cause: std::io::Error },
    #[error("cannot find this program to start workers: {0}")]
    SelfExe(std::io::Error),
    #[error("cannot create {path}: {cause}")]
    Io { path: String, cause: std::io::Error },
    #[error(transparent)]
    Connect(#[from] connection::ConnectError),
    #[error(transparent)]
    Exporter(#[from] crate::args::StartError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LocalError + '_ {
    move |cause| LocalError::Io { path: path.display().to_string(), cause }
}

/// Load the HPA and the queue its metric selects.
fn load_hpa(args: &LocalArgs) -> Result<(HpaSpec, String), LocalError> {
    let spec = match &args.hpa {
        Some(path) => hpa::load_hpa_file(path, args.hpa_name.as_deref())?,
        None => hpa::parse_hpa_manifest(PROJECT_HPA, args.hpa_name.as_deref())?,
    };
    let queue =
        spec.metrics.first().filter(|m| m.name == QUEUE_DEPTH).and_then(|m| m.match_labels.get("queue").cloned());
    match queue {
        Some(q) => Ok((spec, q)),
        None => Err(LocalError::UnsupportedMetric {
            hpa: spec.name.clone(),
            found: spec.metrics.first().map_or("no metric".into(), |m| format!("{} {:?}", m.name, m.match_labels)),
        }),
    }
}

/// A `redis-server` this run started: append-only data in `dir`, its own process group.
struct OwnedRedis {
    child: Child,
    port: u16,
}

impl OwnedRedis {
    async fn start(dir: &Path) -> Result<OwnedRedis, LocalError> {
        let port = free_port("127.0.0.1:0").map_err(|e| LocalError::RedisStart(e.to_string()))?;
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
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING").query_async::<String>(&mut c).await.is_ok()
            {
                return Ok(r);
            }
            if Instant::now() > deadline {
                return Err(LocalError::RedisStart(format!("no answer on port {port} after 15 s")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn url(&self, db: u8) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    /// SIGTERM: Redis flushes its append-only file and exits.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            signal(pid, "TERM");
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

fn free_port(addr: &str) -> std::io::Result<u16> {
    Ok(TcpListener::bind(addr)?.local_addr()?.port())
}

fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

/// One worker process.
struct WorkerProc {
    number: u32,
    started_at: Instant,
    child: Child,
    metrics_port: u16,
    stopping: bool,
    /// Highest task counters seen (a worker's counters vanish with it).
    succeeded: f64,
    failed: f64,
}

/// The local replica set: worker processes and what happened to them.
struct Fleet {
    exe: PathBuf,
    broker_url: String,
    backend_url: String,
    queue: String,
    concurrency: u32,
    shutdown_timeout: f64,
    log_dir: PathBuf,
    workers: Vec<WorkerProc>,
    next_number: u32,
    /// Crash-loop protection: workers that died soon after starting delay the next start.
    quick_deaths: u32,
    respawn_after: Instant,
    started: u32,
    replaced: u32,
    /// Counters of workers that have exited.
    gone_succeeded: f64,
    gone_failed: f64,
}

impl Fleet {
    fn running(&self) -> impl Iterator<Item = &WorkerProc> {
        self.workers.iter().filter(|w| !w.stopping)
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        self.next_number += 1;
        let number = self.next_number;
        let metrics_port = free_port("127.0.0.1:0")?;
        let log = std::fs::File::create(self.log_dir.join(format!("worker-{number}.log")))?;
        let child = Command::new(&self.exe)
            .arg("worker")
            .args(["--queues", &self.queue, "--concurrency", &self.concurrency.to_string()])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .args(["--shutdown-timeout", &self.shutdown_timeout.to_string()])
            .args(["--hostname", &format!("local-worker-{number}")])
            .env("BROKER_URL", &self.broker_url)
            .env("BACKEND_URL", &self.backend_url)
            .env("LOG_FORMAT", "text")
            .stdout(Stdio::null())
            .stderr(log)
            // Own process group: the terminal's Ctrl-C reaches `local` only, which then stops
            // the workers in order (before Redis).
            .process_group(0)
            .spawn()?;
        tracing::info!(worker = number, metrics_port, "worker started");
        self.workers.push(WorkerProc {
            number,
            started_at: Instant::now(),
            child,
            metrics_port,
            stopping: false,
            succeeded: 0.0,
            failed: 0.0,
        });
        self.started += 1;
        Ok(())
    }

    /// SIGTERM `n` running workers, the least busy first (then the newest).
    async fn stop(&mut self, n: usize) {
        let mut candidates = Vec::new();
        for (i, w) in self.workers.iter().enumerate().filter(|(_, w)| !w.stopping) {
            let busy = scrape(w.metrics_port).await.map_or(0.0, |m| {
                sample(&m, WORKER_ACTIVE, "").unwrap_or(0.0) + sample(&m, WORKER_RESERVED, "").unwrap_or(0.0)
            });
            candidates.push((busy, std::cmp::Reverse(w.number), i));
        }
        candidates.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for (busy, _, i) in candidates.into_iter().take(n) {
            let w = &mut self.workers[i];
            if let Some(pid) = w.child.id() {
                signal(pid, "TERM");
            }
            w.stopping = true;
            tracing::info!(worker = w.number, busy, "worker stopping (SIGTERM: finishes or returns its tasks)");
        }
    }

    /// Collect exited workers; those that were not asked to stop are counted as replaced.
    fn reap(&mut self) {
        let mut i = 0;
        while i < self.workers.len() {
            let w = &mut self.workers[i];
            match w.child.try_wait() {
                Ok(Some(status)) => {
                    if !w.stopping {
                        self.replaced += 1;
                        let log = self.log_dir.join(format!("worker-{}.log", w.number));
                        let last =
                            std::fs::read_to_string(&log).unwrap_or_default().lines().last().unwrap_or("").to_owned();
                        tracing::warn!(worker = w.number, %status, log = %log.display(), last_line = %last, "worker died; it will be replaced (its messages return after the visibility timeout)");
                        if w.started_at.elapsed() < Duration::from_secs(10) {
                            // Dying at once again and again is a crash loop: back off like a kubelet.
                            self.quick_deaths += 1;
                            let delay = Duration::from_secs(1 << self.quick_deaths.min(5));
                            self.respawn_after = Instant::now() + delay;
                        } else {
                            self.quick_deaths = 0;
                        }
                    } else if !status.success() {
                        tracing::warn!(worker = w.number, %status, "worker exited with an error while stopping");
                    } else {
                        tracing::info!(worker = w.number, "worker stopped");
                    }
                    self.gone_succeeded += w.succeeded;
                    self.gone_failed += w.failed;
                    self.workers.remove(i);
                }
                _ => i += 1,
            }
        }
    }

    /// Start or stop processes so that `target` are running.
    async fn converge(&mut self, target: usize) {
        self.reap();
        let running = self.running().count();
        if running < target && Instant::now() >= self.respawn_after {
            for _ in running..target {
                if let Err(e) = self.spawn() {
                    tracing::error!(error = %e, "cannot start a worker");
                    break;
                }
            }
        } else if running > target {
            self.stop(running - target).await;
        }
    }

    /// Refresh per-worker counters; returns (ready, succeeded total, failed total).
    async fn observe(&mut self) -> (i32, f64, f64) {
        let mut ready = 0;
        for w in &mut self.workers {
            if let Some(m) = scrape(w.metrics_port).await {
                w.succeeded = w.succeeded.max(sample(&m, TASK_SUCCESS, "").unwrap_or(0.0));
                w.failed = w.failed.max(sample(&m, TASK_FAILURE, "").unwrap_or(0.0));
            }
            if !w.stopping && get(w.metrics_port, "/readyz").await.is_some_and(|(s, _)| s == 200) {
                ready += 1;
            }
        }
        let succeeded = self.gone_succeeded + self.workers.iter().map(|w| w.succeeded).sum::<f64>();
        let failed = self.gone_failed + self.workers.iter().map(|w| w.failed).sum::<f64>();
        (ready, succeeded, failed)
    }

    /// SIGTERM everyone and wait (a second signal sent to us is forwarded: they return their
    /// running tasks at once).
    async fn stop_all(&mut self, shutdown: &Shutdown) {
        let n = self.running().count();
        self.stop(n).await;
        let grace = Duration::from_secs_f64(self.shutdown_timeout + 10.0);
        let deadline = Instant::now() + grace;
        let mut forwarded = false;
        while !self.workers.is_empty() && Instant::now() < deadline {
            if !forwarded && shutdown.stage() == Stage::Immediate {
                for w in &self.workers {
                    if let Some(pid) = w.child.id() {
                        signal(pid, "INT");
                    }
                }
                forwarded = true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = self.observe().await;
            self.reap();
        }
        for w in &mut self.workers {
            tracing::error!(
                worker = w.number,
                "worker did not stop in time; killing it (its messages return after the visibility timeout)"
            );
            let _ = w.child.kill().await;
        }
        self.workers.clear();
    }
}

/// GET on loopback: (status, body).
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()))
    };
    tokio::time::timeout(Duration::from_secs(2), io).await.ok().flatten()
}

async fn scrape(port: u16) -> Option<String> {
    get(port, "/metrics").await.filter(|(s, _)| *s == 200).map(|(_, b)| b)
}

/// The value of `name` whose labels contain `labels` (summed over matching series); `None` when
/// no such series is exposed.
pub fn sample(exposition: &str, name: &str, labels: &str) -> Option<f64> {
    let mut found = None;
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let rest = match line.strip_prefix(name) {
            Some(r) if r.starts_with('{') || r.starts_with(' ') => r,
            _ => continue,
        };
        if !labels.is_empty() && !rest.contains(labels) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// One row of the timeline.
#[derive(Clone, Debug)]
struct Row {
    t: f64,
    depth: Option<f64>,
    reserved: Option<f64>,
    desired: i32,
    running: i32,
    ready: i32,
    stopping: i32,
    succeeded: f64,
    failed: f64,
    rate: f64,
    event: String,
}

impl Row {
    const HEADER: &str = "t,queue_depth,reserved,desired_replicas,running_workers,ready_workers,stopping_workers,tasks_succeeded,tasks_failed,tasks_per_second,event";

    fn csv(&self) -> String {
        let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v}"));
        format!(
            "{:.1},{},{},{},{},{},{},{},{},{:.2},{}",
            self.t,
            opt(self.depth),
            opt(self.reserved),
            self.desired,
            self.running,
            self.ready,
            self.stopping,
            self.succeeded,
            self.failed,
            self.rate,
            self.event
        )
    }
}

/// Explain a decision in one line: proposal, and why it was held or limited.
fn explain(d: &Decision, target_per_pod: Option<f64>) -> String {
    let mut parts = Vec::new();
    if let (Some(m), Some(t)) = (d.metrics.first(), target_per_pod) {
        match (m.total_milli, m.proposal) {
            (Some(total), Some(p)) => parts.push(format!("{} queued / {t} per worker → {p}", total / 1000)),
            _ => parts.push(format!("metric unavailable: {}", m.error.as_deref().unwrap_or("?"))),
        }
    }
    for kind in [ConditionType::AbleToScale, ConditionType::ScalingLimited, ConditionType::ScalingActive] {
        if let Some(c) = d.condition(kind) {
            let interesting = matches!(
                format!("{:?}", c.reason).as_str(),
                "ScaleUpStabilized"
                    | "ScaleDownStabilized"
                    | "ScaleUpLimit"
                    | "ScaleDownLimit"
                    | "TooManyReplicas"
                    | "TooFewReplicas"
                    | "FailedGetExternalMetric"
            );
            if interesting && (c.status || kind == ConditionType::ScalingActive) {
                parts.push(format!("{:?}", c.reason));
            }
        }
    }
    parts.push(format!("→ {} workers", d.replicas));
    parts.join("; ")
}

/// Run the whole system until the story ends (with `--load`), `--max-duration`, or Ctrl-C.
pub async fn run(args: LocalArgs) -> Result<(), LocalError> {
    let shutdown = Shutdown::from_signals().map_err(LocalError::Signals)?;
    let (spec, queue) = load_hpa(&args)?;
    let target_per_pod = spec.metrics.first().and_then(|m| match m.target {
        hpa::MetricTarget::AverageValue(milli) => Some(milli as f64 / 1000.0),
        hpa::MetricTarget::Value(_) => None,
    });
    let data_dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => default_data_dir(),
    };
    let log_dir = data_dir.join("logs");
    std::fs::create_dir_all(&log_dir).map_err(io_err(&log_dir))?;

    // Redis: the user's, or our own with append-only persistence in the data directory.
    let (owned_redis, broker_url) = match &args.broker_url {
        Some(url) => (None, url.clone()),
        None => {
            let redis_dir = data_dir.join("redis");
            std::fs::create_dir_all(&redis_dir).map_err(io_err(&redis_dir))?;
            let r = OwnedRedis::start(&redis_dir).await?;
            let url = r.url(0);
            (Some(r), url)
        }
    };
    let backend_url = args.backend_url.clone().unwrap_or_else(|| with_db(&broker_url, 1));

    // The exporter, in-process, on a real port (Prometheus and Grafana can scrape it too).
    let exporter_port = match args.exporter_listen.rsplit_once(':') {
        Some((_, "0")) | None => free_port("127.0.0.1:0"),
        Some(_) => TcpListener::bind(&args.exporter_listen).and_then(|l| l.local_addr()).map(|a| a.port()),
    }
    .map_err(|cause| LocalError::Listen { addr: args.exporter_listen.clone(), cause })?;
    let host = args.exporter_listen.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h).to_owned();
    let exporter_shutdown = Shutdown::default();
    let exporter_args = ExporterArgs {
        redis: RedisArgs { broker_url: broker_url.clone(), backend_url: backend_url.clone(), sentinel_master: None },
        queue: QueueArgs { queues: vec![queue.clone()], priority_steps: PrioritySteps::default() },
        interval: Duration::from_secs_f64(args.exporter_interval.unwrap_or((args.sync_period / 3.0).min(5.0))),
        listen: format!("{host}:{exporter_port}"),
        reserved_batch: 2000,
    };
    let exporter_task = tokio::spawn(exporter::run_with_shutdown(exporter_args, exporter_shutdown.clone()));

    let mut fleet = Fleet {
        exe: std::env::current_exe().map_err(LocalError::SelfExe)?,
        broker_url: broker_url.clone(),
        backend_url: backend_url.clone(),
        queue: queue.clone(),
        concurrency: args.concurrency,
        shutdown_timeout: args.worker_shutdown_timeout,
        log_dir: log_dir.clone(),
        workers: Vec::new(),
        next_number: 0,
        quick_deaths: 0,
        respawn_after: Instant::now(),
        started: 0,
        replaced: 0,
        gone_succeeded: 0.0,
        gone_failed: 0.0,
    };

    // The first sync should see a real depth, not an exporter that has not polled yet.
    let ready_by = Instant::now() + Duration::from_secs(10);
    while Instant::now() < ready_by {
        let polled = scrape(exporter_port).await.is_some_and(|m| sample(&m, QUEUE_DEPTH, "").is_some());
        if polled || exporter_task.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if exporter_task.is_finished() {
        return match exporter_task.await {
            Ok(Err(e)) => Err(e.into()),
            _ => Err(LocalError::RedisStart("the exporter stopped at once".into())),
        };
    }

    let mut autoscaler = Autoscaler::new(spec.clone());
    let mut commanded = spec.min_replicas.max(1);
    let start = Instant::now();
    let sync_every = Duration::from_secs_f64(args.sync_period);
    let mut next_sync = start;
    let mut last_explanation = String::from("first sync pending");
    let mut rows: Vec<Row> = Vec::new();
    let mut events: Vec<String> = Vec::new();

    // The load, if any, starts with the first worker.
    let load_task = args.load.clone().map(|pattern| {
        let options = LoadOptions {
            redis: RedisArgs {
                broker_url: broker_url.clone(),
                backend_url: backend_url.clone(),
                sentinel_master: None,
            },
            queue: QueueArgs { queues: vec![queue.clone()], priority_steps: PrioritySteps::default() },
            task: args.task,
            priority: 0,
            cpu_n: args.cpu_n,
            io_seconds: args.io_seconds,
            seed: None,
            batch: 500,
            wait: false,
            wait_timeout: Duration::ZERO,
        };
        tokio::spawn(async move {
            let conn = connection::connect("BROKER_URL", &options.redis.broker_url, None, Duration::from_secs(10))?;
            loadgen::send(&conn, &pattern, &options, |_, _| {}).await
        })
    });
    let total_load = args.load.as_ref().map(LoadPattern::total);
    let mut load_done = load_task.is_none();
    // Tasks the load confirmed in Redis, and when (unix time) it finished sending them.
    let mut load_sent = 0u64;
    let mut load_sent_at = 0.0f64;
    let mut load_note = String::new();
    let view = std::io::stdout().is_terminal();
    println!(
        "celery-autoscale local: HPA {} (min {}, max {}), sync every {} s; broker {}{}; exporter http://{host}:{exporter_port}/metrics; logs in {}",
        spec.name,
        spec.min_replicas,
        spec.max_replicas,
        args.sync_period,
        redact_url(&broker_url),
        if owned_redis.is_some() { " (embedded)" } else { "" },
        log_dir.display()
    );
    let mut load_task = load_task;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut prev_succeeded = (0.0, start);
    let mut rate = 0.0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.reached(Stage::Graceful) => break,
        }
        let now = Instant::now();
        let t = now.duration_since(start).as_secs_f64();
        let mut event = String::new();

        if let Some(task) = load_task.as_mut().filter(|t| t.is_finished()) {
            match task.await {
                Ok(Ok(report)) => {
                    load_note = format!("load sent: {} tasks at {:.0}/s", report.sent, report.rate());
                    load_sent = report.sent;
                    load_sent_at = crate::wire::time::unix_seconds(chrono::Utc::now());
                }
                Ok(Err(e)) => load_note = format!("load failed: {e}"),
                Err(e) => load_note = format!("load task failed: {e}"),
            }
            tracing::info!("{load_note}");
            load_task = None;
            load_done = true;
        }

        let metrics = scrape(exporter_port).await;
        let depth = metrics.as_deref().and_then(|m| sample(m, QUEUE_DEPTH, &format!("queue=\"{queue}\"")));
        let reserved = metrics.as_deref().and_then(|m| sample(m, QUEUE_RESERVED, &format!("queue=\"{queue}\"")));
        let (ready, succeeded, failed) = fleet.observe().await;

        if now >= next_sync {
            next_sync += sync_every;
            let reading = match depth {
                Some(d) => MetricReading::total(Some((d * 1000.0) as i64)),
                None => MetricReading::Failed("the exporter serves no celery_queue_depth (Redis unreachable?)".into()),
            };
            let observation = Observation {
                spec_replicas: commanded,
                status_replicas: fleet.running().count() as i32,
                ready_pods: Some(ready),
                metrics: vec![reading],
            };
            let decision =
                autoscaler.sync(Timestamp::from_millis(now.duration_since(start).as_millis() as i64), &observation);
            last_explanation = explain(&decision, target_per_pod);
            if decision.replicas != commanded {
                event = format!("scale {commanded}->{}", decision.replicas);
                events.push(format!("t={t:.0}s {event}: {last_explanation}"));
            }
            if !view {
                tracing::info!(t = format!("{t:.0}"), depth, reserved, workers = commanded, "sync: {last_explanation}");
            }
            commanded = decision.replicas;
        }
        let replaced_before = fleet.replaced;
        fleet.converge(commanded.max(0) as usize).await;
        if fleet.replaced > replaced_before {
            event = format!("{event} replaced {}", fleet.replaced - replaced_before).trim().to_owned();
        }

        if now.duration_since(prev_succeeded.1) >= Duration::from_secs(5) {
            rate = (succeeded - prev_succeeded.0) / now.duration_since(prev_succeeded.1).as_secs_f64();
            prev_succeeded = (succeeded, now);
        }
        let running = fleet.running().count() as i32;
        let stopping = fleet.workers.len() as i32 - running;
        let row =
            Row { t, depth, reserved, desired: commanded, running, ready, stopping, succeeded, failed, rate, event };
        if view {
            draw(&row, &spec, &queue, &last_explanation, &load_note, total_load);
        }
        rows.push(row);

        // The story is over when every task the load sent has finished, the exporter has seen an
        // empty queue since the load was sent (not a stale zero from before), and the workers are
        // back at the minimum.
        let polled_at = metrics.as_deref().and_then(|m| sample(m, EXPORTER_LAST_SUCCESS, ""));
        let drained = depth == Some(0.0) && reserved == Some(0.0) && polled_at.is_some_and(|p| p > load_sent_at);
        let all_done = succeeded + failed >= load_sent as f64;
        let story_over =
            args.load.is_some() && load_done && all_done && drained && commanded == spec.min_replicas && stopping == 0;
        if story_over {
            tracing::info!("load done, queue empty, workers back at the minimum: stopping");
            break;
        }
        if args.max_duration.is_some_and(|m| t >= m) {
            tracing::info!("--max-duration reached: stopping");
            break;
        }
    }

    // Stop in order: the load, the workers (they finish or return their tasks), the exporter,
    // then Redis, which keeps whatever is still queued in its append-only file.
    if let Some(task) = load_task {
        task.abort();
    }
    println!("stopping: workers finish or return their tasks…");
    fleet.stop_all(&shutdown).await;
    let remaining = queue_depth(&broker_url, &queue).await;
    exporter_shutdown.advance(Stage::Graceful);
    let _ = exporter_task.await;
    if let Some(r) = owned_redis {
        r.stop().await;
    }

    write_outputs(&args, &spec, &rows)?;
    let last = rows.last();
    let max_workers = rows.iter().map(|r| r.running).max().unwrap_or(0);
    let worker_seconds: f64 = rows.iter().map(|r| f64::from(r.running + r.stopping)).sum();
    println!(
        "done: {} tasks succeeded, {} failed; up to {max_workers} workers ({} started, {} replaced after dying); {:.0} worker-seconds",
        last.map_or(0.0, |r| r.succeeded),
        last.map_or(0.0, |r| r.failed),
        fleet.started,
        fleet.replaced,
        worker_seconds
    );
    for e in &events {
        println!("  {e}");
    }
    match remaining {
        Some(0) => {}
        Some(n) => println!(
            "{n} tasks are still queued in {}; they stay there for the next run",
            if args.broker_url.is_some() {
                redact_url(&broker_url)
            } else {
                data_dir.join("redis").display().to_string()
            }
        ),
        None => {}
    }
    println!("timeline: {}  plot: {}", args.timeline.display(), args.plot.display());
    Ok(())
}

async fn queue_depth(broker_url: &str, queue: &str) -> Option<u64> {
    let conn = connection::connect("BROKER_URL", broker_url, None, Duration::from_secs(5)).ok()?;
    let reader = exporter::DepthReader::new(conn, vec![queue.to_owned()], PrioritySteps::default(), 2000);
    reader.poll().await.ok()?.first().map(|s| s.depth)
}

fn write_outputs(args: &LocalArgs, spec: &HpaSpec, rows: &[Row]) -> Result<(), LocalError> {
    let mut csv = String::from(Row::HEADER);
    csv.push('\n');
    for r in rows {
        csv.push_str(&r.csv());
        csv.push('\n');
    }
    std::fs::write(&args.timeline, csv).map_err(io_err(&args.timeline))?;
    let points: Vec<TimelinePoint> = rows
        .iter()
        .map(|r| TimelinePoint {
            t: r.t,
            queue_depth: r.depth.unwrap_or(0.0),
            reserved: r.reserved.unwrap_or(0.0),
            desired_replicas: r.desired,
            current_replicas: r.running,
            ready_replicas: Some(r.ready),
        })
        .collect();
    let title =
        format!("celery-autoscale local — HPA {} (min {}, max {})", spec.name, spec.min_replicas, spec.max_replicas);
    if let Err(e) = plot::write_svg(&args.plot, &title, &points) {
        tracing::error!(error = %e, path = %args.plot.display(), "cannot write the plot");
    }
    Ok(())
}

/// The live view: redrawn every second on a terminal.
fn draw(row: &Row, spec: &HpaSpec, queue: &str, explanation: &str, load_note: &str, total_load: Option<u64>) {
    let n = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
    let mut out = std::io::stdout().lock();
    let _ = write!(
        out,
        "\x1b[H\x1b[2J\
         celery-autoscale local   t = {:>5.0} s   HPA {} (min {}, max {})\n\n\
         queue {queue:<12} depth {:>7}   reserved {:>5}\n\
         workers        desired {:>4}   running {:>4}   ready {:>4}   stopping {:>3}\n\
         tasks          done {:>8.0}   failed {:>5.0}   {:>7.1} /s\n\n\
         last sync      {explanation}\n\
         load           {}\n\n\
         Ctrl-C stops: workers finish or return their tasks; nothing is lost.\n",
        row.t,
        spec.name,
        spec.min_replicas,
        spec.max_replicas,
        n(row.depth),
        n(row.reserved),
        row.desired,
        row.running,
        row.ready,
        row.stopping,
        row.succeeded,
        row.failed,
        row.rate,
        if load_note.is_empty() {
            total_load.map_or("none".to_owned(), |t| format!("sending {t} tasks…"))
        } else {
            load_note.to_owned()
        },
    );
    let _ = out.flush();
}

/// `$XDG_STATE_HOME/celery-autoscale/local`, or `~/.local/state/…`, or a temp dir.
fn default_data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("celery-autoscale/local")
}

/// The same Redis URL with another database number.
fn with_db(url: &str, db: u8) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
    let host = rest.split_once('/').map_or(rest, |(h, _)| h);
    format!("{scheme}://{host}/{db}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_defaults_to_db1_of_the_broker() {
        assert_eq!(with_db("redis://127.0.0.1:6379/0", 1), "redis://127.0.0.1:6379/1");
        assert_eq!(with_db("redis://:pw@redis:6379/3", 1), "redis://:pw@redis:6379/1");
        assert_eq!(with_db("redis://127.0.0.1:6379", 1), "redis://127.0.0.1:6379/1");
        assert_eq!(with_db("redis://127.0.0.1:6379/", 1), "redis://127.0.0.1:6379/1");
    }

    #[test]
    fn samples_are_read_from_the_exposition() {
        let text = "# HELP x\ncelery_queue_depth{queue=\"celery\"} 12\ncelery_queue_depth{queue=\"other\"} 3\ncelery_queue_depth_x 9\n";
        assert_eq!(sample(text, "celery_queue_depth", "queue=\"celery\""), Some(12.0));
        assert_eq!(sample(text, "celery_queue_depth", ""), Some(15.0));
        assert_eq!(sample(text, "celery_queue_depth", "queue=\"none\""), None);
    }

    #[test]
    fn the_project_hpa_is_built_in_and_names_its_queue() {
        let args = <LocalArgsParser as clap::Parser>::parse_from(["x"]).args;
        let (spec, queue) = load_hpa(&args).unwrap();
        assert_eq!(
            (spec.name.as_str(), queue.as_str(), spec.min_replicas, spec.max_replicas),
            ("worker", "celery", 1, 20)
        );
    }

    #[derive(clap::Parser)]
    struct LocalArgsParser {
        #[command(flatten)]
        args: LocalArgs,
    }
}
