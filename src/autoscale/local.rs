//! `celery-autoscale local`: the whole system on one machine, without Kubernetes.
//!
//! A Redis (started here unless `BROKER_URL` points at one), the queue exporter, and worker
//! processes scaled by the same HPA algorithm the cluster runs ([`crate::autoscale::hpa`]), fed the live
//! `celery_queue_depth` read from the exporter's `/metrics` every `--sync-period`, within the
//! min/max and behavior of an HPA manifest (the project's own by default). Scale-down sends
//! SIGTERM and waits: workers finish or return their tasks. A worker that dies is replaced and
//! counted. `--load` drives the load generator, so one command shows the whole story; at the
//! end a timeline CSV and the same SVG plot as `simulate` are written to `--output-dir`.
//!
//! This plays the parts of the HPA controller (every sync) and of the ReplicaSet (every
//! second: replace what died, start or stop processes to match the decision). "desired" is the
//! last decision (spec replicas), "running" the worker processes not stopping (status
//! replicas), "ready" those consuming (see `fleet.rs` for what ready means for each kind of
//! worker). The controller's memory is kept for the whole run.
//!
//! The modules: `redis.rs` the embedded Redis, `fleet.rs` the worker processes, `load.rs` the
//! load and its results, `view.rs` the terminal panel or log lines, `timeline.rs` the CSV and
//! plot. This file holds the run's state (`Run`) and one method per step of a tick.

mod fleet;
mod load;
mod redis;
mod timeline;
mod view;

use crate::autoscale::exporter::{self, ExporterArgs};
use crate::autoscale::hpa::{self, Autoscaler, HpaSpec, MetricReading, Observation, Timestamp};
use crate::autoscale::scrape;
use crate::autoscale::simulate::{Signal, SignalSample};
use crate::runtime::args::{self, QueueArgs, RedisArgs};
use crate::runtime::metrics::{EXPORTER_LAST_SUCCESS, QUEUE_DEPTH, QUEUE_RESERVED};
use crate::runtime::shutdown::{Shutdown, Stage};
use crate::tools::loadgen::{CustomTask, Span, TaskKind};
use crate::tools::pattern::LoadPattern;
use crate::transport::connection::{self, redact_url};
use crate::wire::keys::PrioritySteps;
use fleet::{Census, Fleet, WorkerKind};
use load::Load;
use redis::OwnedRedis;
use rustix::process::Signal as ProcessSignal;
use std::collections::VecDeque;
use std::io::IsTerminal;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use view::{Frame, View};

/// The project's own HPA, compiled in: `local` uses its min/max/behavior by default.
const PROJECT_HPA: &str = include_str!("../../k8s/autoscaling.yaml");

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
    #[arg(long, default_value = "15", value_parser = args::duration)]
    pub sync_period: Duration,
    /// Load to drive: burst:N, ramp:FROM:TO:SECONDS or oscillate:MEAN:AMPLITUDE:PERIOD:SECONDS
    /// (rates in tasks/s). With a load, the run ends once it is sent, done, and the workers are
    /// back at the minimum.
    #[arg(long)]
    pub load: Option<LoadPattern>,
    /// Task the load sends (built in; or your own with --task-name).
    #[arg(long, value_enum, default_value_t = TaskKind::Mix)]
    pub task: TaskKind,
    /// Your own task for the load (--task-name, --task-args, --task-kwargs), e.g. for Python
    /// workers of your app run by --worker-command.
    #[command(flatten)]
    pub custom: CustomTask,
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
    /// Tasks each of our workers runs at a time (a --worker-command sets its own).
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 2)]
    pub concurrency: u32,
    /// Run this command for each replica instead of our worker, e.g.
    /// 'celery -A tasks worker -c 2 --loglevel=info'. Split into words as a POSIX shell would
    /// (quotes, backslashes) but run without a shell; BROKER_URL and BACKEND_URL are set in its
    /// environment, as a pod's would be.
    #[arg(long)]
    pub worker_command: Option<WorkerCommand>,
    /// Seconds a --worker-command process must stay alive to count as ready (local cannot look
    /// inside it; our own worker is ready when its /readyz says so).
    #[arg(long, default_value = "5", value_parser = args::duration)]
    pub worker_ready_after: Duration,
    /// Seconds a stopping worker may take to finish its tasks (our worker's --shutdown-timeout);
    /// 10 s after it, a worker still running is killed (SIGKILL), as a pod past its grace period.
    #[arg(long, default_value = "30", value_parser = args::duration)]
    pub worker_shutdown_timeout: Duration,
    /// Where the exporter serves /metrics (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:9808")]
    pub exporter_listen: String,
    /// Seconds between the exporter's polls (default: a third of the sync period, at most 1, so
    /// the panel shows a new load within a second).
    #[arg(long, value_parser = args::duration)]
    pub exporter_interval: Option<Duration>,
    /// Directory for the embedded Redis' data (append-only: tasks still queued when the run stops
    /// are there for the next run). Default: $XDG_STATE_HOME/celery-autoscale/local.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Directory for this run's outputs: timeline.csv, timeline.svg and logs/worker-N.log (a
    /// previous run's there are replaced). Created if missing.
    #[arg(long, default_value = "celery-autoscale-local")]
    pub output_dir: PathBuf,
    /// Stop after this many seconds in any case.
    #[arg(long, value_parser = args::duration)]
    pub max_duration: Option<Duration>,
    /// What the autoscaler's metric carries, as in `simulate --signal`: `depth` (waiting tasks),
    /// `depth+running` (waiting + held by workers, the exporter's celery_queue_reserved),
    /// `depth+arrivals` (waiting + the arrival rate × --lookahead, the rate from Δdepth + tasks
    /// finished over --rate-window) or `depth+growth` (waiting + the queue's growth rate, when
    /// positive, × --lookahead). Default: the signal the HPA's metric names
    /// (celery_queue_depth → depth, celery_queue_depth_running → depth+running, …).
    #[arg(long, value_name = "SIGNAL")]
    pub signal: Option<Signal>,
    /// `--signal depth+arrivals` or `depth+growth`: seconds of arrivals the rate term adds (the
    /// cluster's metric delay + sync period + pod start; the kubenix option hpa.lookaheadSeconds).
    #[arg(long, value_name = "SECONDS", default_value = "40", value_parser = args::non_negative_duration, allow_hyphen_values = true)]
    pub lookahead: Duration,
    /// `--signal depth+arrivals` or `depth+growth`: seconds over which the rate is measured
    /// (shorter while the run is younger).
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = args::duration, allow_hyphen_values = true)]
    pub rate_window: Duration,
}

/// A command line split into argv, shell-style.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerCommand(pub Vec<String>);

impl FromStr for WorkerCommand {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match shlex::split(s) {
            None => Err("a quote is not closed (the words are split as a POSIX shell would)".to_owned()),
            Some(argv) if argv.is_empty() => Err("no command given".to_owned()),
            Some(argv) => Ok(WorkerCommand(argv)),
        }
    }
}

/// What can stop `local` from starting.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Hpa(#[from] hpa::HpaError),
    #[error("--load: {0}")]
    Load(String),
    #[error(
        "HPA {hpa}: local mode scales on the depth of one queue; the HPA's first metric must be \
         celery_queue_depth (or a signal's celery_queue_depth_running, _arrivals, _growth) with a selector \
         matchLabels {{queue: <name>}} (found {found})"
    )]
    UnsupportedMetric { hpa: String, found: String },
    #[error(
        "redis-server was not found on PATH ({0}). Install it (Debian/Ubuntu: apt-get install redis-server; \
         macOS: brew install redis; or `nix develop`), or point BROKER_URL at a running Redis"
    )]
    RedisMissing(std::io::Error),
    #[error("the embedded redis-server did not start: {0}")]
    RedisStart(String),
    #[error("the exporter stopped at once")]
    ExporterGone,
    #[error("cannot use --exporter-listen {addr}: {source} (pass another port, or 127.0.0.1:0 for any)")]
    Listen { addr: String, source: std::io::Error },
    #[error(
        "--worker-command: cannot find the program {program:?} (not a file{}); {}",
        if program.contains('/') { "" } else { " in any PATH directory" },
        if *shell { "it is run without a shell: wrap shell syntax in sh -c '…'" } else { "give its full path or fix PATH" }
    )]
    NoSuchProgram { program: String, shell: bool },
    #[error("cannot find this program to start workers: {0}")]
    SelfExe(std::io::Error),
    #[error("cannot write {path}: {source} (choose another --output-dir / --data-dir)")]
    Io { path: String, source: std::io::Error },
    #[error(transparent)]
    Connect(#[from] connection::ConnectError),
    #[error(transparent)]
    Exporter(#[from] crate::runtime::args::StartError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot reach the broker: {0} (or unset BROKER_URL and --broker-url: local then starts its own Redis)")]
    BrokerUnreachable(String),
    /// The run started but did not do what it was asked; the sentence says why and what to do.
    #[error("{0}")]
    RunFailed(String),
}

/// Unasked-for worker deaths in a row, each soon after its start, with no task done: a crash
/// loop (a wrong --worker-command, a missing module) that would otherwise run until Ctrl-C.
const CRASH_LOOP_DEATHS: u32 = 4;

/// Set once stdout is closed (`local … | head`): lines go to stderr instead and the run stops.
static STDOUT_GONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn stdout_gone() -> bool {
    STDOUT_GONE.load(std::sync::atomic::Ordering::Relaxed)
}

fn mark_stdout_gone() {
    STDOUT_GONE.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// `println!` that cannot panic: once stdout is closed the line goes to stderr.
fn say(line: &str) {
    use std::io::Write;
    if !stdout_gone() {
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_ok() {
            return;
        }
        mark_stdout_gone();
    }
    eprintln!("{line}");
}

/// Whether the reader of our stdout has gone (a pipe whose other end is closed reports POLLERR,
/// a hung-up terminal POLLHUP) — noticed without writing anything.
fn check_stdout_closed() -> bool {
    if stdout_gone() {
        return true;
    }
    let mut fd = libc::pollfd { fd: libc::STDOUT_FILENO, events: 0, revents: 0 };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    if n == 1 && fd.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
        mark_stdout_gone();
    }
    stdout_gone()
}

/// Ask the user's Redis for a PONG before anything starts, so a wrong URL is one error now
/// instead of a minute of "metric unavailable".
async fn check_broker(url: &str) -> Result<(), LocalError> {
    let mut conn = connection::connect("BROKER_URL", url, None, Duration::from_secs(5))?;
    let ping = ::redis::cmd("PING");
    match tokio::time::timeout(Duration::from_secs(10), ping.query_async::<String>(&mut conn)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(LocalError::BrokerUnreachable(connection::explain(&e, "BROKER_URL", &redact_url(url)))),
        Err(_) => Err(LocalError::BrokerUnreachable(format!(
            "no answer within 10 s — is Redis running at {}? check BROKER_URL",
            redact_url(url)
        ))),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LocalError + '_ {
    move |source| LocalError::Io { path: path.display().to_string(), source }
}

/// A free TCP port on loopback (bound, then released for the process that will use it).
fn free_loopback_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Signal a child process; one that has already exited is not an error.
fn send_signal(child: &tokio::process::Child, sig: ProcessSignal) {
    if let Some(pid) = child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// Whether `program` names a file: a path as given, or a bare name found on PATH (as exec does).
fn program_exists(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Load the HPA, the queue its metric selects and the signal that metric names.
fn load_hpa(args: &LocalArgs) -> Result<(HpaSpec, String, Signal), LocalError> {
    let spec = match &args.hpa {
        Some(path) => hpa::load_hpa_file(path, args.hpa_name.as_deref())?,
        None => hpa::parse_hpa_manifest(PROJECT_HPA, args.hpa_name.as_deref())?,
    };
    let selected = spec.metrics.first().and_then(|m| {
        let signal = Signal::from_metric_name(&m.name)?;
        Some((m.match_labels.get("queue")?.clone(), signal))
    });
    match selected {
        Some((q, signal)) => Ok((spec, q, signal)),
        None => Err(LocalError::UnsupportedMetric {
            hpa: spec.name.clone(),
            found: spec.metrics.first().map_or("no metric".into(), |m| format!("{} {:?}", m.name, m.match_labels)),
        }),
    }
}

/// The in-process exporter.
struct ExporterHandle {
    port: u16,
    task: JoinHandle<Result<(), crate::runtime::args::StartError>>,
    shutdown: Shutdown,
}

/// What the exporter said at one scrape.
struct QueueReading {
    depth: Option<f64>,
    reserved: Option<f64>,
    /// Unix time of its last successful poll of Redis.
    polled_at: Option<f64>,
}

impl ExporterHandle {
    async fn read(&self, queue: &str) -> QueueReading {
        let m = scrape::metrics(self.port).await;
        let label = format!("queue=\"{queue}\"");
        QueueReading {
            depth: m.as_deref().and_then(|m| scrape::sample(m, QUEUE_DEPTH, &label)),
            reserved: m.as_deref().and_then(|m| scrape::sample(m, QUEUE_RESERVED, &label)),
            polled_at: m.as_deref().and_then(|m| scrape::sample(m, EXPORTER_LAST_SUCCESS, "")),
        }
    }
}

/// Tasks per second over windows of five seconds.
struct RateMeter {
    last: Option<(f64, Instant)>,
    rate: Option<f64>,
}

impl RateMeter {
    const WINDOW: Duration = Duration::from_secs(5);

    fn update(&mut self, done: Option<f64>, now: Instant) -> Option<f64> {
        let done = done?;
        match self.last {
            None => self.last = Some((done, now)),
            Some((before, at)) if now.duration_since(at) >= Self::WINDOW => {
                self.rate = Some((done - before) / now.duration_since(at).as_secs_f64());
                self.last = Some((done, now));
            }
            Some(_) => {}
        }
        self.rate
    }
}

/// The state of one `local` run: what it started, what the controller remembers, and the record.
struct Run {
    args: LocalArgs,
    spec: HpaSpec,
    queue: String,
    target_per_pod: Option<f64>,
    shutdown: Shutdown,
    broker_url: String,
    data_dir: PathBuf,
    output_dir: PathBuf,
    redis: Option<OwnedRedis>,
    exporter: ExporterHandle,
    fleet: Fleet,
    autoscaler: Autoscaler,
    /// The last decision: spec replicas.
    desired: i32,
    start: Instant,
    next_sync: Instant,
    last_sync: String,
    load: Option<Load>,
    rate: RateMeter,
    view: View,
    rows: Vec<timeline::Row>,
    /// Scale events, for the summary.
    scale_events: Vec<String>,
    /// Tasks queued before this run's load (an earlier run's).
    leftover: u64,
    /// Why the run could not do what it was asked (the load could not be sent, workers crash-loop).
    failure: Option<String>,
    /// What the autoscaler's metric carries (--signal, else the HPA metric's).
    signal: Signal,
    /// The signal's inputs once a second, as far back as --rate-window (rate signals only).
    history: VecDeque<(Instant, SignalSample)>,
}

impl Run {
    async fn start(args: LocalArgs, shutdown: Shutdown) -> Result<Run, LocalError> {
        let (spec, queue, hpa_signal) = load_hpa(&args)?;
        let signal = args.signal.unwrap_or(hpa_signal);
        let target_per_pod = spec.metrics.first().and_then(|m| match m.target {
            hpa::MetricTarget::AverageValue(milli) => Some(milli as f64 / 1000.0),
            hpa::MetricTarget::Value(_) => None,
        });
        let kind = match &args.worker_command {
            Some(WorkerCommand(argv)) => {
                // Said once, here, rather than as a failed start every second.
                if !program_exists(&argv[0]) {
                    // `cd app && celery …`: shell syntax, which is not run by a shell here.
                    let builtins = ["cd", "export", "source", ".", "exec", "set", "ulimit"];
                    let operators = ["&&", "||", ";", "|", ">", "<", "&"];
                    let shell = builtins.contains(&argv[0].as_str())
                        || argv.iter().any(|w| operators.contains(&w.as_str()) || w.ends_with(';'));
                    return Err(LocalError::NoSuchProgram { program: argv[0].clone(), shell });
                }
                WorkerKind::Command { argv: argv.clone(), ready_after: args.worker_ready_after }
            }
            None => WorkerKind::Own {
                exe: std::env::current_exe().map_err(LocalError::SelfExe)?,
                concurrency: args.concurrency,
            },
        };
        let output_dir = args.output_dir.clone();
        let log_dir = output_dir.join("logs");
        prepare_log_dir(&log_dir)?;
        let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);

        // Redis: the user's, or our own with append-only persistence in the data directory.
        let (redis, broker_url) = match &args.broker_url {
            Some(url) => {
                check_broker(url).await?;
                (None, url.clone())
            }
            None => {
                let redis_dir = data_dir.join("redis");
                std::fs::create_dir_all(&redis_dir).map_err(io_err(&redis_dir))?;
                let r = OwnedRedis::start(&redis_dir).await?;
                let url = r.url(0);
                (Some(r), url)
            }
        };
        let backend_url = match &args.backend_url {
            Some(url) => url.clone(),
            // The broker's URL was checked before anything started; a URL `with_db` cannot
            // rewrite is kept as is (the backend then shares the broker's database).
            None => crate::transport::redis_url::with_db(&broker_url, 1).unwrap_or_else(|_| broker_url.clone()),
        };
        let exporter = start_exporter(&args, &broker_url, &queue).await?;

        let fleet = Fleet::new(
            kind,
            broker_url.clone(),
            backend_url.clone(),
            queue.clone(),
            args.worker_shutdown_timeout,
            log_dir,
        );
        // Tasks an earlier run left queued are run too; said now and counted apart from the load.
        let leftover = queue_depth(&broker_url, &queue).await.unwrap_or(0);
        let load = match &args.load {
            Some(pattern) => Some(load::start(&args, pattern, &broker_url, &backend_url, &queue)?),
            None => None,
        };
        let terminal = std::io::stdout().is_terminal();
        let title = format!(
            "celery-autoscale local · HPA {} (min {}, max {}{}) · sync every {} s",
            spec.name,
            spec.min_replicas,
            spec.max_replicas,
            target_per_pod.map_or(String::new(), |t| format!(", {t} waiting per worker")),
            args.sync_period.as_secs_f64(),
        );
        say(&format!(
            "celery-autoscale local: HPA {} (min {}, max {}), signal {}, sync every {} s; broker {}{}; exporter http://127.0.0.1:{}/metrics",
            spec.name,
            spec.min_replicas,
            spec.max_replicas,
            signal.name(),
            args.sync_period.as_secs_f64(),
            redact_url(&broker_url),
            if redis.is_some() { " (embedded)" } else { "" },
            exporter.port,
        ));
        say(&format!(
            "writing to {}/: timeline.csv, timeline.svg and logs/ (a previous run's are replaced)",
            output_dir.display()
        ));
        if leftover > 0 {
            say(&format!(
                "{leftover} tasks left by an earlier run are queued in {queue:?}: the workers run them too; \
                 they are counted apart from this run's{}",
                if args.load.is_some() { " load" } else { "" }
            ));
        }
        let start = Instant::now();
        Ok(Run {
            autoscaler: Autoscaler::new(spec.clone()),
            desired: spec.min_replicas.max(1),
            spec,
            queue,
            target_per_pod,
            shutdown,
            broker_url,
            data_dir,
            output_dir,
            redis,
            exporter,
            fleet,
            start,
            next_sync: start,
            last_sync: "first sync pending".to_owned(),
            load,
            rate: RateMeter { last: None, rate: None },
            view: View::new(terminal, title),
            rows: Vec::new(),
            scale_events: Vec::new(),
            leftover,
            failure: None,
            signal,
            history: VecDeque::new(),
            args,
        })
    }

    /// Once a second until the story is over, `--max-duration`, or Ctrl-C.
    async fn run_until_done(&mut self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.shutdown.reached(Stage::Graceful) => break,
            }
            if let Some(why) = self.step().await {
                if self.failure.is_some() {
                    // The reason is the run's error, said once at the end.
                    tracing::warn!("stopping: the run cannot do what it was asked (the reason follows at the end)");
                } else {
                    tracing::info!("{why}: stopping");
                }
                break;
            }
        }
    }

    /// One tick: read, decide (on sync instants), act, record. Returns why to stop, if so.
    async fn step(&mut self) -> Option<String> {
        let now = Instant::now();
        let t = now.duration_since(self.start).as_secs_f64();
        self.poll_load().await;
        let reading = self.exporter.read(&self.queue).await;
        let census = self.fleet.census().await;
        let tasks = self.tasks(&census);
        let metric = self.metric(now, &reading, tasks);
        let mut event = String::new();
        if now >= self.next_sync {
            event = self.sync(now, t, metric, &reading, &census);
        }
        let replaced_before = self.fleet.replaced;
        self.fleet.converge(self.desired.max(0) as usize).await;
        if self.fleet.replaced > replaced_before {
            event = format!("{event} replaced {}", self.fleet.replaced - replaced_before).trim().to_owned();
        }
        for e in self.fleet.take_events() {
            self.view.event(t, &e);
        }
        let rate = self.rate.update(tasks.map(|(ok, failed)| ok + failed), now);
        let row = timeline::Row {
            succeeded: tasks.map(|(ok, _)| ok),
            failed: tasks.map(|(_, f)| f),
            rate,
            event,
            ..self.row(t, &reading, &census)
        };
        self.view.draw(&frame(&self.queue, self.load.as_ref(), &self.last_sync, &row));
        self.rows.push(row);

        if let Some(why) = &self.failure {
            return Some(why.clone());
        }
        if self.fleet.quick_deaths >= CRASH_LOOP_DEATHS && tasks.is_none_or(|(ok, failed)| ok + failed == 0.0) {
            let why = format!(
                "workers keep dying: {CRASH_LOOP_DEATHS} in a row within seconds of starting, no task done; {} \
                 (fix the worker command or its environment and run again)",
                self.fleet.last_death
            );
            self.failure = Some(why.clone());
            return Some(why);
        }
        if self.story_over(&reading, &census, tasks) {
            return Some("load done, queue empty, workers back at the minimum".to_owned());
        }
        if self.args.max_duration.is_some_and(|m| t >= m.as_secs_f64()) {
            return Some("--max-duration reached".to_owned());
        }
        if check_stdout_closed() {
            return Some("stdout was closed (the reader of the output has gone)".to_owned());
        }
        None
    }

    /// Collect the load generator's report once it has sent everything; count results.
    async fn poll_load(&mut self) {
        let Some(load) = &mut self.load else { return };
        if let Some(task) = load.task.take_if(|t| t.is_finished()) {
            load.note = match task.await {
                Ok(Ok(report)) => {
                    load.sent = Some((report.sent, crate::wire::time::unix_seconds(chrono::Utc::now())));
                    load.results.pending = report.sent_at.into_iter().map(|(id, _)| id).collect();
                    format!("{}: all {} tasks sent", load.pattern, report.sent)
                }
                Ok(Err(e)) => format!("{}: failed: {e}", load.pattern),
                Err(e) => format!("{}: the sender stopped: {e}", load.pattern),
            };
            if load.sent.is_none() {
                // Nothing more will come: end the run now instead of scaling on nothing for ever
                // (the reason is the run's error, said once at the end).
                self.failure = Some(format!("--load {}", load.note));
            } else {
                let t = self.start.elapsed().as_secs_f64();
                self.view.event(t, &fleet::Event { warn: false, text: format!("load {}", load.note) });
            }
        }
        load.results.refresh().await;
    }

    /// Tasks done so far: the load's results in the backend when there is a load, else what the
    /// workers report (ours count every task they ran, foreign ones report nothing).
    fn tasks(&self, census: &Census) -> Option<(f64, f64)> {
        self.load.as_ref().map(|l| (l.results.succeeded, l.results.failed)).or(census.tasks)
    }

    /// The numbers of second `t`, without task counts or events.
    fn row(&self, t: f64, reading: &QueueReading, census: &Census) -> timeline::Row {
        timeline::Row {
            t,
            depth: reading.depth,
            reserved: reading.reserved,
            desired: self.desired,
            running: census.running,
            ready: census.ready,
            stopping: census.stopping,
            succeeded: None,
            failed: None,
            rate: None,
            event: String::new(),
        }
    }

    /// The autoscaler's metric now: `signal` of the exporter's depth and reserved and of the tasks
    /// finished, with the same arithmetic as `simulate` ([`Signal::value`]). Records the inputs
    /// the rate signals look back at.
    fn metric(&mut self, now: Instant, reading: &QueueReading, tasks: Option<(f64, f64)>) -> MetricReading {
        let missing = |what: &str| MetricReading::Failed(format!("the exporter serves no {what} (Redis unreachable?)"));
        let Some(depth) = reading.depth else {
            return missing("celery_queue_depth");
        };
        let running = match (self.signal, reading.reserved) {
            (Signal::DepthRunning, None) => return missing("celery_queue_reserved"),
            (_, reserved) => reserved.unwrap_or(0.0),
        };
        let completed = match (self.signal, tasks) {
            (_, Some((ok, failed))) => ok + failed,
            (Signal::DepthArrivals, None) => {
                return MetricReading::Failed(
                    "depth+arrivals needs the tasks finished, which a --worker-command without --load does not report"
                        .into(),
                );
            }
            (_, None) => 0.0,
        };
        let sample = SignalSample { depth, running, completed };
        let mut then = None;
        if self.signal.uses_rate() {
            self.history.push_back((now, sample));
            // Keep the newest sample at least --rate-window old, and everything after it.
            while self.history.len() > 1 && now.duration_since(self.history[1].0) >= self.args.rate_window {
                self.history.pop_front();
            }
            then = self.history.front().filter(|(at, _)| *at < now).copied();
        }
        let window = then.map_or(0.0, |(at, _)| now.duration_since(at).as_secs_f64());
        let value = self.signal.value(sample, then.map(|(_, s)| s), self.args.lookahead.as_secs_f64(), window);
        MetricReading::total(Some((value * 1000.0).round() as i64))
    }

    /// The controller's sync: decide from the metric. Returns the timeline event.
    fn sync(&mut self, now: Instant, t: f64, metric: MetricReading, reading: &QueueReading, census: &Census) -> String {
        self.next_sync += self.args.sync_period;
        let observation = Observation {
            spec_replicas: self.desired,
            status_replicas: census.running,
            ready_pods: Some(census.ready),
            metrics: vec![metric],
        };
        let at = Timestamp::from_millis(now.duration_since(self.start).as_millis() as i64);
        let decision = self.autoscaler.sync(at, &observation);
        let explanation = view::explain(&decision, self.target_per_pod);
        let mut event = String::new();
        if decision.replicas != self.desired {
            event = format!("scale {}->{}", self.desired, decision.replicas);
            self.scale_events.push(format!("t={t:.0}s {event}: {explanation}"));
        }
        self.last_sync = format!("t={t:.0}s: {explanation}");
        self.desired = decision.replicas;
        let row = self.row(t, reading, census);
        self.view.sync(&frame(&self.queue, self.load.as_ref(), &self.last_sync, &row));
        event
    }

    /// The story is over when every task the load sent has finished, the exporter has seen an
    /// empty queue since the load was sent (not a stale zero from before), and the workers are
    /// back at the minimum.
    fn story_over(&self, reading: &QueueReading, census: &Census, tasks: Option<(f64, f64)>) -> bool {
        let Some(load) = &self.load else { return false };
        let Some((sent, sent_at)) = load.sent else { return false };
        let drained = reading.depth == Some(0.0)
            && reading.reserved == Some(0.0)
            && reading.polled_at.is_some_and(|p| p > sent_at);
        let all_done = tasks.is_some_and(|(ok, failed)| ok + failed >= sent as f64);
        load.done_sending()
            && all_done
            && drained
            && self.desired == self.spec.min_replicas
            && census.running == self.spec.min_replicas
            && census.stopping == 0
    }

    /// Stop in order: the load, the workers (they finish or return their tasks), the exporter,
    /// then Redis, which keeps whatever is still queued in its append-only file. Then the summary.
    async fn finish(mut self) -> Result<(), LocalError> {
        if let Some(task) = self.load.as_mut().and_then(|l| l.task.take()) {
            task.abort();
        }
        say("stopping: workers finish or return their tasks…");
        self.fleet
            .stop_all(
                &self.shutdown,
                |e| if e.warn { tracing::warn!("{}", e.text) } else { tracing::info!("{}", e.text) },
            )
            .await;
        let remaining = queue_depth(&self.broker_url, &self.queue).await;
        // The last results, finished by the stopping workers (Redis is still up).
        if let Some(load) = &mut self.load {
            for _ in 0..=load.results.pending.len() / load::ResultCounter::PER_TICK {
                load.results.refresh().await;
            }
        }
        let tasks = match &self.load {
            Some(l) => Some((l.results.succeeded, l.results.failed)),
            None => self.rows.iter().rev().find_map(|r| r.succeeded.zip(r.failed)),
        };
        let outcome = self.outcome(tasks);
        self.exporter.shutdown.advance(Stage::Graceful);
        let _ = self.exporter.task.await;
        if let Some(r) = self.redis.take() {
            r.stop().await;
        }

        let written = timeline::write(&self.output_dir, &self.spec, &self.rows)?;
        let max_workers = self.rows.iter().map(|r| r.running).max().unwrap_or(0);
        let worker_seconds: f64 = self.rows.iter().map(|r| f64::from(r.running + r.stopping)).sum();
        let tasks = match tasks {
            Some((ok, failed)) => format!("{ok} tasks succeeded, {failed} failed"),
            None => "tasks done: unknown (a --worker-command reports none without a --load)".to_owned(),
        };
        say(&format!(
            "done: {tasks}; up to {} ({} started, {} replaced after dying); {worker_seconds:.0} worker-seconds",
            view::workers(max_workers),
            self.fleet.started,
            self.fleet.replaced,
        ));
        if self.leftover > 0 {
            say(&format!("  (not counted above: {} tasks an earlier run had left queued at the start)", self.leftover));
        }
        for e in &self.scale_events {
            say(&format!("  {e}"));
        }
        if let Some(n) = remaining.filter(|n| *n > 0) {
            let place = if self.args.broker_url.is_some() {
                redact_url(&self.broker_url)
            } else {
                self.data_dir.join("redis").display().to_string()
            };
            say(&format!("{n} tasks are still queued in {place}; they stay there for the next run"));
        }
        let svg = written.svg.map_or("not written".to_owned(), |p| p.display().to_string());
        say(&format!(
            "timeline: {}  plot: {svg}  worker logs: {}",
            written.csv.display(),
            self.output_dir.join("logs").display()
        ));
        outcome
    }

    /// The exit: an error unless the run did what it was asked — with a load, every task it
    /// sent succeeded.
    fn outcome(&self, tasks: Option<(f64, f64)>) -> Result<(), LocalError> {
        if let Some(why) = &self.failure {
            return Err(LocalError::RunFailed(why.clone()));
        }
        let Some(load) = &self.load else { return Ok(()) };
        let (ok, failed) = tasks.unwrap_or((0.0, 0.0));
        let logs = self.output_dir.join("logs");
        match load.sent {
            None => Err(LocalError::RunFailed(format!(
                "--load {}: the run stopped before the load was sent ({ok:.0} succeeded, {failed:.0} failed); \
                 let it run to the end (or raise --max-duration)",
                load.pattern
            ))),
            Some((sent, _)) if ok < sent as f64 => {
                let unfinished = (sent as f64 - ok - failed).max(0.0);
                let fix = if failed > 0.0 {
                    format!("see why in the worker logs, {}", logs.display())
                } else {
                    "the run stopped before they finished; let it run to the end (or raise --max-duration)".to_owned()
                };
                Err(LocalError::RunFailed(format!(
                    "--load {}: {ok:.0} of {sent} tasks succeeded ({failed:.0} failed, {unfinished:.0} unfinished); {fix}",
                    load.pattern
                )))
            }
            Some(_) => Ok(()),
        }
    }
}

/// What the panel shows for `row`.
fn frame<'a>(queue: &'a str, load: Option<&'a Load>, last_sync: &'a str, row: &'a timeline::Row) -> Frame<'a> {
    let load = load
        .map_or("none (scaling on whatever arrives)", |l| if l.note.is_empty() { "sending…" } else { l.note.as_str() });
    Frame { queue, row, load, last_sync }
}

/// Create the log directory and remove a previous run's worker logs (one file per worker of
/// this run, no mix-up with an older run's numbering).
fn prepare_log_dir(log_dir: &Path) -> Result<(), LocalError> {
    std::fs::create_dir_all(log_dir).map_err(io_err(log_dir))?;
    for entry in std::fs::read_dir(log_dir).map_err(io_err(log_dir))?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("worker-") && name.ends_with(".log") {
            std::fs::remove_file(entry.path()).map_err(io_err(&entry.path()))?;
        }
    }
    Ok(())
}

/// The exporter, in-process, on a real port (Prometheus and Grafana can scrape it too); returns
/// once it has polled Redis, so the first sync sees a real depth.
async fn start_exporter(args: &LocalArgs, broker_url: &str, queue: &str) -> Result<ExporterHandle, LocalError> {
    let port = match args.exporter_listen.rsplit_once(':') {
        Some((_, "0")) | None => free_loopback_port(),
        Some(_) => TcpListener::bind(&args.exporter_listen).and_then(|l| l.local_addr()).map(|a| a.port()),
    }
    .map_err(|source| LocalError::Listen { addr: args.exporter_listen.clone(), source })?;
    let host = args.exporter_listen.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h);
    let shutdown = Shutdown::default();
    let exporter_args = ExporterArgs {
        redis: RedisArgs {
            broker_url: broker_url.to_owned(),
            backend_url: String::new(), // the exporter reads only the broker
            sentinel_master: None,
            global_keyprefix: String::new(),
            backend_global_keyprefix: None,
        },
        queue: QueueArgs { queues: vec![queue.to_owned()], priority_steps: PrioritySteps::default() },
        interval: args.exporter_interval.unwrap_or((args.sync_period / 3).min(Duration::from_secs(1))),
        listen: format!("{host}:{port}"),
        reserved_batch: 2000,
    };
    let task = tokio::spawn(exporter::run_with_shutdown(exporter_args, shutdown.clone()));
    let handle = ExporterHandle { port, task, shutdown };
    let ready_by = Instant::now() + Duration::from_secs(10);
    while Instant::now() < ready_by && !handle.task.is_finished() {
        if handle.read(queue).await.depth.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if handle.task.is_finished() {
        return match handle.task.await {
            Ok(Err(e)) => Err(e.into()),
            _ => Err(LocalError::ExporterGone),
        };
    }
    Ok(handle)
}

/// Run the whole system until the story ends (with `--load`), `--max-duration`, or Ctrl-C.
pub async fn run(args: LocalArgs) -> Result<(), LocalError> {
    let shutdown = Shutdown::from_signals().map_err(LocalError::Signals)?;
    let mut run = Run::start(args, shutdown).await?;
    run.run_until_done().await;
    run.finish().await
}

async fn queue_depth(broker_url: &str, queue: &str) -> Option<u64> {
    let conn = connection::connect("BROKER_URL", broker_url, None, Duration::from_secs(5)).ok()?;
    let reader = exporter::DepthReader::new(conn, vec![queue.to_owned()], PrioritySteps::default(), 2000);
    reader.poll().await.ok()?.first().map(|s| s.depth)
}

/// `$XDG_STATE_HOME/celery-autoscale/local`, or `~/.local/state/…`, or a temp dir.
fn default_data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("celery-autoscale/local")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_project_hpa_is_built_in_and_names_its_queue() {
        let args = <LocalArgsParser as clap::Parser>::parse_from(["x"]).args;
        let (spec, queue, signal) = load_hpa(&args).unwrap();
        assert_eq!(
            (spec.name.as_str(), queue.as_str(), spec.min_replicas, spec.max_replicas, signal),
            ("worker", "celery", 1, 20, Signal::Depth)
        );
    }

    #[test]
    fn the_signal_follows_the_hpa_metric_and_bad_flags_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tuned.yaml");
        std::fs::write(&path, PROJECT_HPA.replace("name: celery_queue_depth", "name: celery_queue_depth_running"))
            .unwrap();
        let args = <LocalArgsParser as clap::Parser>::parse_from(["x", "--hpa", path.to_str().unwrap()]).args;
        assert_eq!(load_hpa(&args).unwrap().2, Signal::DepthRunning);
        std::fs::write(&path, PROJECT_HPA.replace("name: celery_queue_depth", "name: celery_queue_depth_other"))
            .unwrap();
        let err = load_hpa(&args).unwrap_err().to_string();
        assert!(err.contains("celery_queue_depth_running, _arrivals, _growth"), "{err}");
        for (flag, value) in [
            ("--signal", ""),
            ("--signal", "depth+queue"),
            ("--lookahead", "NaN"),
            ("--lookahead", "-1"),
            ("--lookahead", "1e300"),
            ("--lookahead", ""),
            ("--rate-window", "0"),
            ("--rate-window", "-5"),
            ("--rate-window", "inf"),
        ] {
            let e = <LocalArgsParser as clap::Parser>::try_parse_from(["x", flag, value]).unwrap_err().to_string();
            assert!(e.contains(flag), "{flag} {value:?}: {e}");
            assert!(
                e.contains("possible values: depth, depth+running, depth+arrivals, depth+growth")
                    || e.contains("is not a usable number of seconds"),
                "{flag} {value:?}: {e}"
            );
        }
    }

    #[test]
    fn a_worker_command_is_split_like_a_shell_without_one() {
        let c: WorkerCommand = "celery -A tasks worker -c 2 --loglevel='info' -n \"w 1\" a\\ b".parse().unwrap();
        let argv = ["celery", "-A", "tasks", "worker", "-c", "2", "--loglevel=info", "-n", "w 1", "a b"];
        assert_eq!(c.0, argv);
        // No shell: its operators are plain words.
        assert_eq!("echo $HOME; rm x".parse::<WorkerCommand>().unwrap().0, ["echo", "$HOME;", "rm", "x"]);
        assert!("celery 'unclosed".parse::<WorkerCommand>().unwrap_err().contains("quote is not closed"));
        assert!("   ".parse::<WorkerCommand>().unwrap_err().contains("no command"));
    }

    #[test]
    fn the_output_dir_defaults_to_a_directory_in_the_cwd() {
        let args = <LocalArgsParser as clap::Parser>::parse_from(["x"]).args;
        assert_eq!(args.output_dir, PathBuf::from("celery-autoscale-local"));
    }

    #[test]
    fn a_previous_runs_worker_logs_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("out/logs");
        std::fs::create_dir_all(&logs).unwrap();
        std::fs::write(logs.join("worker-7.log"), "old").unwrap();
        std::fs::write(logs.join("notes.txt"), "mine").unwrap();
        prepare_log_dir(&logs).unwrap();
        let left: Vec<String> =
            std::fs::read_dir(&logs).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(left, ["notes.txt"]);
    }

    #[derive(clap::Parser, Debug)]
    struct LocalArgsParser {
        #[command(flatten)]
        args: LocalArgs,
    }
}
