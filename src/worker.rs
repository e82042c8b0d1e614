//! The worker: take messages from the queues, run them, store results, acknowledge. It runs
//! the tasks of a [`Registry`] (see [`crate::task`]); what it holds is an [`InFlight`].
//!
//! Delivery is at-least-once, like Celery with `acks_late`: a message stays in kombu's
//! `unacked` hash from the moment it is taken until its result is stored. On the first
//! SIGTERM/SIGINT (what an HPA scale-down sends) the worker stops fetching, puts every message
//! it holds but has not started back at the front of its queue, lets running tasks finish
//! within `--shutdown-timeout`, puts back whatever is still running after that, and exits 0.
//! A second signal skips the wait. A worker that dies without warning loses nothing either:
//! any live worker (Python or Rust) restores its messages after `--visibility-timeout`.
//!
//! Prefetch: one message per free slot by default (`--prefetch-multiplier 1`), so messages
//! wait in Redis where the exporter counts them, rather than in a worker's memory where
//! nobody sees them. Queue depth stays an honest autoscaling signal.

use crate::runtime::args::{self, QueueArgs, RedisArgs, StartError};
use crate::runtime::http;
use crate::runtime::metrics::WorkerMetrics;
use crate::runtime::shutdown::{Shutdown, Stage};
use crate::runtime::sync::Locked;
use crate::task::{
    Call, Context, Ended, Limits, Registry, StateUpdate, Task, TaskError, TaskOptions, TaskResult, retry,
};
use crate::transport::backend::{self, Backend, DEFAULT_RESULT_EXPIRES, Stored};
use crate::transport::broker::{BRPOP_TIMEOUT, Broker, End, Fetcher, LARGE_REPLY, QueueOrder, TakeList, Taken};
use crate::transport::connection::{self, Backoff, Health, redact_url};
use crate::transport::lease;
use crate::wire::keys;
use crate::wire::kombu::unacked_entry;
use crate::wire::result::Extended;
use crate::wire::task_read::DEFAULT_MAX_MESSAGE_BYTES;
use crate::wire::task_read::number_seconds;
use crate::wire::task_write::{self, NewTask};
use crate::wire::time::unix_seconds;
use crate::wire::{
    ExceptionInfo, RejectReason, Rejection, ResultMeta, TaskMessage, dead_letter_entry, parse_message_within,
};
use chrono::Utc;
use control::WorkerState;
use events::{Events, WorkerCounts};
use serde_json::{Number, Value};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// `celery-autoscale worker`: every option, with its environment variable where one exists.
#[derive(Clone, Debug, clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub queue: QueueArgs,
    /// Tasks run at a time.
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub concurrency: u32,
    /// Messages held per slot (Celery's worker_prefetch_multiplier). 1 keeps the backlog in
    /// Redis, where the autoscaler can see it.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub prefetch_multiplier: u32,
    /// Seconds after which a taken but unacknowledged message is returned to its queue by any
    /// live worker (kombu's visibility_timeout). This worker renews the lease of every message
    /// it holds every quarter of this, so long tasks and ETAs are safe; only Python workers in
    /// the same fleet (they do not renew) need it above their longest task and ETA wait.
    #[arg(long, default_value = "3600", value_parser = args::duration)]
    pub visibility_timeout: Duration,
    /// Seconds to let running tasks finish after SIGTERM before putting them back and exiting.
    /// Keep Kubernetes' terminationGracePeriodSeconds above this.
    #[arg(long, default_value = "30", value_parser = args::non_negative_duration)]
    pub shutdown_timeout: Duration,
    /// Longest wait in seconds between visibility-timeout restore rounds; a round also runs as
    /// soon as the oldest unacknowledged message falls due.
    #[arg(long, default_value = "30", value_parser = args::duration)]
    pub restore_interval: Duration,
    /// Seconds results are kept (Celery's result_expires); 0 keeps them forever.
    #[arg(long, default_value_t = DEFAULT_RESULT_EXPIRES.as_secs())]
    pub result_expires: u64,
    /// How chords are joined: `true` (Celery's default), a sorted set scored by `group_index`;
    /// `false`, a list in arrival order (Celery's
    /// `result_backend_transport_options={'result_chord_ordered': False}`). Every worker of a
    /// fleet must agree; a join already begun keeps its form.
    #[arg(long, env = "RESULT_CHORD_ORDERED", default_value_t = true, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub result_chord_ordered: bool,
    /// Also store name, args, kwargs, worker, retries and queue in results (result_extended).
    #[arg(long)]
    pub result_extended: bool,
    /// Default hard time limit in seconds for tasks whose message sets none (task_time_limit).
    #[arg(long, value_parser = args::duration)]
    pub time_limit: Option<Duration>,
    /// Default soft time limit in seconds (task_soft_time_limit).
    #[arg(long, value_parser = args::duration)]
    pub soft_time_limit: Option<Duration>,
    /// Largest message accepted, in bytes; a larger one is rejected before it is decoded (its
    /// caller gets a FAILURE when the id is readable), and no compressed body inflates beyond it.
    #[arg(long, default_value_t = DEFAULT_MAX_MESSAGE_BYTES as u64,
          value_parser = clap::value_parser!(u64).range(1024..=512 * 1024 * 1024))]
    pub max_message_bytes: u64,
    /// Where /metrics, /healthz and /readyz are served (loopback by default; a pod passes
    /// 0.0.0.0:9191 so the kubelet and Prometheus reach it).
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9191")]
    pub metrics_addr: String,
    /// Node name, Celery's `-n`: `name@host` (`%h`, `%n`, `%d` expand to the host name, its first
    /// label, its domain; a bare value is a host). Used in events, remote-control replies, logs
    /// and extended results. Default: `celery@<host name>` (the pod name in Kubernetes).
    #[arg(long)]
    pub hostname: Option<String>,
    /// Send task events (Celery's `-E`), for Flower and `celery events`. Worker heartbeats are
    /// sent either way, as Celery does.
    #[arg(long, env = "WORKER_SEND_EVENTS", value_parser = clap::builder::BoolishValueParser::new())]
    pub events: bool,
    /// Store STARTED when a task starts (Celery's `task_track_started`).
    #[arg(long)]
    pub track_started: bool,
    /// Seconds between health checks of the connections that otherwise only wait (kombu's
    /// `health_check_interval`): the remote-control subscription is PINGed this often, and any
    /// reply later than this (at most 10 s; blocking waits get their block time on top) ends
    /// its connection, which is then opened anew. A half-open connection is so found within
    /// about twice this.
    #[arg(long, default_value = "25", value_parser = args::duration)]
    pub health_check_interval: Duration,
    /// Where the follow-ups this worker sends (links, errbacks, chain steps, chord bodies) go
    /// when their signature names no queue, like Celery's `task_routes`:
    /// `tasks.io_*=io,tasks.cpu_bound=cpu` (task name or glob `*`/`?`; first match wins); else
    /// the default queue `celery`.
    #[arg(long, env = "WORKER_TASK_ROUTES", default_value = "", value_parser = routes::parse, hide_default_value = true)]
    pub task_routes: routes::Routes,
    /// Keep the revoked ids (and the clock) in this file across restarts (Celery's `--statedb`,
    /// `worker_state_db`; our own JSON format, see docs/Reliability.md). Read at start, written
    /// on every change and at shutdown.
    #[arg(long, env = "WORKER_STATE_DB")]
    pub statedb: Option<std::path::PathBuf>,
    /// Do not ask the other workers for their revoked ids and clock at start (Celery's
    /// `--without-mingle`). By default a starting worker waits up to 1 s for their answers.
    #[arg(long)]
    pub without_mingle: bool,
    /// Acknowledge a message when its task starts, not when it ends (Celery's default,
    /// `task_acks_late=False`): a worker killed (SIGKILL, OOM, node loss) while a task runs
    /// loses that task instead of running it again. SIGTERM still lets it finish.
    #[arg(long, env = "WORKER_ACKS_EARLY", value_parser = clap::builder::BoolishValueParser::new())]
    pub acks_early: bool,
    /// A task's rate limit, `TASK=RATE` in Celery's syntax (`10/s`, `100/m`, `1000/h`, a plain
    /// number per second, `0` none); repeatable or comma-separated. Wins over the task's own
    /// `rate_limit`; per worker, as Celery's. `control rate_limit` changes it live.
    #[arg(long = "rate-limit", env = "WORKER_RATE_LIMITS", value_delimiter = ',', value_name = "TASK=RATE",
          value_parser = crate::task::rate::task_rate_flag)]
    pub rate_limits: Vec<(String, Option<crate::task::rate::RateLimit>)>,
    /// Which queue a take looks at first (kombu's queue_order_strategy): `round_robin` moves a
    /// queue to the end of the cycle once a message is taken from it, so no queue starves;
    /// `priority` always scans --queues in the order given; `sorted`, by name.
    #[arg(long, value_enum, default_value_t = QueueOrder::RoundRobin)]
    pub queue_order_strategy: QueueOrder,
    /// Queues not to consume, comma-separated (Celery's `-X`): taken out of --queues at start.
    #[arg(short = 'X', long, value_delimiter = ',')]
    pub exclude_queues: Vec<String>,
    /// Keep this pod's `controller.kubernetes.io/pod-deletion-cost` annotation current from the
    /// tasks it runs (0 when idle), so a Deployment scaled in deletes idle workers first. Needs
    /// --pod-name and --pod-namespace (the downward API) and RBAC to patch pods (docs/Autoscaling.md).
    #[arg(long, env = "WORKER_POD_DELETION_COST", value_parser = clap::builder::BoolishValueParser::new())]
    pub pod_deletion_cost: bool,
    /// This worker's pod (for --pod-deletion-cost); Kubernetes: `fieldRef: metadata.name`.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// This worker's namespace (for --pod-deletion-cost); Kubernetes: `fieldRef: metadata.namespace`.
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
}

pub mod chord;
pub mod control;
pub mod events;
pub mod inflight;
pub mod limits;
pub mod mingle;
pub mod pod_cost;
pub mod pool;
pub mod routes;
pub mod settle;
pub mod statedb;

pub use inflight::{Held, InFlight};

/// A rejected message this large has just been freed, with its decoding buffers: hand the
/// memory back to the system rather than keep it (a poison burst left glibc holding ~100 MB).
const RELEASE_AFTER_BYTES: usize = 1024 * 1024;

fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it touches no live memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

struct Worker {
    args: WorkerArgs,
    broker: Broker,
    backend: Backend,
    metrics: WorkerMetrics,
    broker_health: Arc<Health>,
    backend_health: Arc<Health>,
    /// The remote-control subscription's ([`control::serve`] health-checks it).
    pidbox_health: Arc<Health>,
    shutdown: Shutdown,
    registry: Registry,
    /// Messages taken and not yet acknowledged, and whether the drain has begun.
    in_flight: Arc<InFlight>,
    /// Set at the end of the drain (after what is held has been put back): Redis retry loops
    /// stop waiting for Redis.
    give_up: AtomicBool,
    run_slots: Arc<Semaphore>,
    /// Finished tasks whose results are being stored.
    finishing: Arc<Semaphore>,
    /// The lists taken from (the fetcher's; a finishing task takes the next message from them
    /// in its finish script). Replaced when remote control changes the queues.
    lists: std::sync::Mutex<Arc<TakeList>>,
    /// Celery node name (`celery@host`).
    node: String,
    origin: String,
    /// Events, remote control, the revoked set.
    state: Arc<WorkerState>,
    /// Task ids whose delivery panicked here once: a second panic fails the task instead of
    /// putting it back again (no hot loop on a message that always panics).
    panicked: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Why the worker is stopping on its own (Redis refused it for good, or a service it needs
    /// ended): `run` returns it as its error. Not Ready from the moment it is set.
    fatal: std::sync::Mutex<Option<StartError>>,
}

/// At most this many task ids are remembered in [`Worker::panicked`]; past it the set starts
/// again (a repeat is then put back once more, which is harmless).
const PANICKED_IDS: usize = 10_000;

/// Run a worker serving `registry`'s tasks until SIGTERM/SIGINT. Returns after a clean
/// shutdown.
pub async fn run(args: WorkerArgs, registry: Registry) -> Result<(), StartError> {
    let shutdown = Shutdown::from_signals().map_err(StartError::Signals)?;
    run_with_shutdown(args, registry, shutdown).await
}

/// [`run`] with an externally driven [`Shutdown`] (tests, the local supervisor).
pub async fn run_with_shutdown(args: WorkerArgs, registry: Registry, shutdown: Shutdown) -> Result<(), StartError> {
    // Celery's built-in canvas tasks (celery.map, …) over the tasks this worker runs.
    let registry = crate::task::canvas::register(registry);
    let queues = consumed_queues(args.queue.names()?, &args.exclude_queues)?;
    let pod = pod_ref(&args)?;
    args.redis.apply_keyprefix()?;
    let limits = Arc::new(limits::TaskLimits::new(&registry, &args.rate_limits).map_err(|unknown| {
        StartError::Config(format!(
            "--rate-limit names {unknown:?}, which this worker does not run; registered: {:?}",
            registry.names().filter(|n| !n.starts_with("celery.")).collect::<Vec<_>>()
        ))
    })?);
    let metrics = WorkerMetrics::new(registry.names());
    let pool = {
        let gauge = metrics.concurrency.clone();
        Arc::new(pool::Pool::new(args.concurrency, args.prefetch_multiplier, move |n| gauge.set(i64::from(n))))
    };
    // Replies may queue behind a busy Redis; a blocking wait needs its block time on top.
    let op_timeout = connection::response_timeout(args.health_check_interval);
    let master = args.redis.sentinel_master.as_deref();
    let broker_conn = connection::connect("BROKER_URL", &args.redis.broker_url, master, op_timeout)?;
    let lists = Arc::new(TakeList::with_order(&queues, &args.queue.priority_steps, args.queue_order_strategy));
    // One connection per list for the blocking wait, so a wait on one list never delays another.
    let wait_conns = (0..lists.keys().len())
        .map(|_| connection::connect("BROKER_URL", &args.redis.broker_url, master, op_timeout + BRPOP_TIMEOUT))
        .collect::<Result<Vec<_>, _>>()?;
    let backend_conn = connection::connect("BACKEND_URL", &args.redis.backend_url, master, op_timeout)?;
    let steps = args.queue.priority_steps.clone();
    let node = control::node_name(args.hostname.as_deref(), &task_write::hostname());
    let backend = Backend::new(backend_conn, Duration::from_secs(args.result_expires))
        .with_chord_ordered(args.result_chord_ordered);
    let (events, pending_events) = Events::new(broker_conn.clone(), &node, args.events);
    let in_flight = Arc::new(InFlight::new());
    let state = WorkerState::new(
        control_settings(&args, &node, &queues, pool.clone(), limits),
        in_flight.clone(),
        events.clone(),
        backend.clone(),
        shutdown.clone(),
    );
    if let Some(path) = &args.statedb {
        let n = statedb::load(path, &state).map_err(StartError::StateDb)?;
        statedb::save(path, &state).map_err(|e| {
            StartError::StateDb(format!("--statedb {}: cannot write it ({e}); name a writable path", path.display()))
        })?;
        tracing::info!(path = %path.display(), revoked = n, "state file read");
    }
    let worker = Arc::new(Worker {
        broker: Broker::new(broker_conn.clone(), steps.clone()),
        backend: backend.with_shared_broker(backend::shared_broker_db(&args.redis.broker_url, &args.redis.backend_url)),
        metrics,
        broker_health: Health::new("broker", "BROKER_URL", &args.redis.broker_url),
        backend_health: Health::new("backend", "BACKEND_URL", &args.redis.backend_url),
        pidbox_health: Health::new("remote control", "BROKER_URL", &args.redis.broker_url),
        shutdown: shutdown.clone(),
        registry,
        in_flight: in_flight.clone(),
        give_up: AtomicBool::new(false),
        run_slots: pool.run_slots().clone(),
        finishing: Arc::new(Semaphore::new(2 * args.concurrency as usize)),
        lists: std::sync::Mutex::new(lists.clone()),
        origin: format!("gen{}@{}", std::process::id(), node.split_once('@').map_or(node.as_str(), |(_, h)| h)),
        node,
        state: state.clone(),
        panicked: std::sync::Mutex::new(Default::default()),
        fatal: std::sync::Mutex::new(None),
        args,
    });
    worker.metrics.concurrency.set(i64::from(worker.args.concurrency));

    let (addr, server) = {
        let w = worker.clone();
        let ready: http::ReadyCheck = Arc::new(move || w.readiness());
        let w = worker.clone();
        let refresh = Arc::new(move || w.refresh_gauges());
        let stop = shutdown.clone();
        http::bind(
            "--metrics-addr",
            &worker.args.metrics_addr,
            worker.metrics.registry.clone(),
            ready,
            refresh,
            async move { stop.reached(Stage::Immediate).await },
        )
        .await?
    };
    let server = tokio::spawn(server);
    tracing::info!(
        broker = %redact_url(&worker.args.redis.broker_url),
        backend = %redact_url(&worker.args.redis.backend_url),
        node = %worker.node,
        queues = ?queues,
        events = worker.args.events,
        tasks = ?worker.registry,
        concurrency = worker.args.concurrency,
        prefetch = worker.args.concurrency * worker.args.prefetch_multiplier,
        metrics = %addr,
        "worker started"
    );

    let counts: Arc<dyn WorkerCounts> = state.clone();
    // The background services: each runs until the shutdown ends it. One that ends before
    // (a panic, or a return that should not happen) stops the worker: see `supervise`.
    let held: lease::HeldTags = {
        let w = worker.clone();
        Arc::new(move || w.in_flight.tags())
    };
    let mut services: Vec<(&'static str, futures::future::BoxFuture<'static, ()>)> = vec![
        ("events", Box::pin(events.clone().run(pending_events, counts))),
        (
            "remote control (pidbox)",
            Box::pin(control::serve(
                state.clone(),
                broker_conn,
                worker.pidbox_health.clone(),
                worker.args.health_check_interval,
            )),
        ),
        ("visibility-timeout restorer", Box::pin(worker.clone().restore_loop())),
        ("lease renewer", Box::pin(lease::renew_loop(worker.broker.clone(), held, worker.args.visibility_timeout))),
    ];
    if let Some(pod) = pod {
        let metrics = pod_cost::CostMetrics {
            written: worker.metrics.pod_deletion_cost.clone(),
            writes: worker.metrics.pod_deletion_cost_writes.clone(),
        };
        services.push(("pod deletion cost", Box::pin(pod_cost::keep_current(pod, in_flight.clone(), metrics))));
    }
    let (ended_tx, ended_rx) = tokio::sync::mpsc::channel(services.len());
    let mut aborts = Vec::new();
    let mut event_loop = None;
    for (name, service) in services {
        let ended = ended_tx.clone();
        let handle = tokio::spawn(async move {
            use futures::FutureExt as _;
            let outcome = std::panic::AssertUnwindSafe(test_hooks::maybe_end(name, service)).catch_unwind().await;
            let _ = ended.send((name, outcome.err().map(|p| crate::task::panic_text(p.as_ref())))).await;
        });
        if name == "events" {
            event_loop = Some(handle);
        } else {
            aborts.push(handle);
        }
    }
    let supervisor = tokio::spawn(worker.clone().supervise(ended_rx));
    if !worker.args.without_mingle {
        worker.mingle().await;
    }
    let state_writer = worker.args.statedb.clone().map(|path| tokio::spawn(statedb::keep_written(path, state.clone())));
    let mut fetcher = worker.broker.fetcher(wait_conns, lists);
    let mut deliveries = worker.clone().fetch_loop(&mut fetcher).await;
    worker.drain(&mut deliveries).await;
    if let (Some(writer), Some(path)) = (state_writer, &worker.args.statedb) {
        writer.abort();
        if let Err(e) = statedb::save(path, &state) {
            tracing::warn!(path = %path.display(), error = %e, "could not write the --statedb file at shutdown");
        }
    }
    if !worker.broker.marker().has_lost() {
        // Nothing this process took is unaccounted for: its take notes can go. (Otherwise
        // they expire on their own; what a lost take took comes back after the visibility
        // timeout.)
        let _ = tokio::time::timeout(Duration::from_secs(2), worker.broker.forget_marker()).await;
    }
    // From here on the services end because we end them; the supervisor stops watching.
    supervisor.abort();
    aborts.iter().for_each(tokio::task::JoinHandle::abort);
    events.finish();
    // worker-offline, unless Redis is gone: then Flower notices the missing heartbeats.
    if let Some(event_loop) = event_loop {
        let _ = tokio::time::timeout(Duration::from_secs(3), event_loop).await;
    }
    shutdown.advance(Stage::Immediate);
    let _ = server.await;
    // What this process ran, for whoever counts runs across a fleet (the control-plane test
    // sums these over every worker pod it started to show no task ran twice).
    let by_task = state.started_totals();
    let tasks_started: u64 = by_task.values().sum();
    tracing::info!(tasks_started, by_task = ?by_task, "worker stopped");
    match worker.fatal.locked().take() {
        Some(why) => Err(why),
        None => Ok(()),
    }
}

/// Test-only: `CELERY_AUTOSCALE_TEST_END_SERVICE=<name>` makes that background service panic
/// two seconds after the worker starts, as a bug in it would; the tests use it to show the worker
/// then says which service ended and stops, not Ready, instead of running on without it.
mod test_hooks {
    pub const END_SERVICE_ENV: &str = "CELERY_AUTOSCALE_TEST_END_SERVICE";

    pub async fn maybe_end(name: &str, service: impl Future<Output = ()>) {
        if std::env::var(END_SERVICE_ENV).is_ok_and(|v| v == name) {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            panic!("{END_SERVICE_ENV}: this service ends here");
        }
        service.await
    }
}

pub use test_hooks::END_SERVICE_ENV;

/// A message the worker has accepted: parsed, bound to its task, recorded in `unacked` and
/// held in [`InFlight`] under `tag`.
/// What a run of the body gave: its outcome, how long it took, and its request (for the hooks).
struct Ran {
    outcome: TaskResult,
    elapsed: Duration,
    request: Arc<crate::task::Request>,
}

struct Accepted {
    msg: Arc<TaskMessage>,
    task: Arc<dyn Task>,
    tag: String,
    queue: String,
}

/// How a delivery stage ended the delivery before its finish.
enum Stop {
    /// Nothing more to do here: the message was settled by the stage (acknowledged, put back),
    /// is the drain's to put back, or was never held.
    Left,
    /// A result (or none) is settled: acknowledge the message under this tag, which may take
    /// the next one on the fetch slot.
    Ack(String),
}

impl Worker {
    /// Watch the background services; the first to end while the worker runs (a panic, or a
    /// return) stops the worker with its name and why. Restarting it instead could hide a bug
    /// that recurs; a stop is visible (Ready false at once, exit 1 after the drain, and
    /// Kubernetes starts a fresh pod).
    async fn supervise(self: Arc<Self>, mut ended: tokio::sync::mpsc::Receiver<(&'static str, Option<String>)>) {
        let Some((name, panic)) = ended.recv().await else { return };
        if self.shutdown.stage() != Stage::Running {
            return;
        }
        let why = match panic {
            Some(panic) => format!("the worker's {name} service panicked: {panic}"),
            None => format!("the worker's {name} service returned while the worker was running"),
        };
        self.stop_with(StartError::ServiceEnded(why));
    }

    /// Celery's mingle ([`mingle::sync`]): merge the revoked ids and clock of the workers
    /// already running, before consuming. Bounded by [`mingle::WAIT`]; a failure is logged and
    /// the worker starts anyway, as Celery's does.
    async fn mingle(&self) {
        tracing::info!("mingle: searching for neighbors");
        let broker = self.broker.connection();
        let asked = tokio::select! {
            r = tokio::time::timeout(2 * mingle::WAIT, mingle::sync(&self.state, &broker, mingle::WAIT)) => r,
            () = self.shutdown.reached(Stage::Graceful) => return,
        };
        match asked {
            Ok(Ok(s)) if s.nodes.is_empty() => tracing::info!("mingle: all alone"),
            Ok(Ok(s)) => tracing::info!(nodes = ?s.nodes, revoked = s.revoked, "mingle: sync complete"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "mingle: could not ask the other workers; starting without their revokes")
            }
            Err(_) => {
                tracing::warn!("mingle: Redis did not answer in time; starting without the other workers' revokes")
            }
        }
    }

    fn readiness(&self) -> Result<(), String> {
        if let Some(why) = &*self.fatal.locked() {
            return Err(why.to_string());
        }
        if self.shutdown.stage() != Stage::Running {
            return Err("shutting down".into());
        }
        if !self.broker_health.is_connected() {
            return Err("broker Redis unreachable".into());
        }
        if self.backend_health.is_down() {
            return Err("result backend Redis unreachable".into());
        }
        if self.pidbox_health.is_down() {
            return Err("remote-control subscription to the broker Redis lost".into());
        }
        Ok(())
    }

    fn refresh_gauges(&self) {
        let (running, waiting) = self.in_flight.counts();
        self.metrics.active.set(running as i64);
        self.metrics.reserved.set(waiting as i64);
        let connected =
            self.broker_health.is_connected() && !self.backend_health.is_down() && !self.pidbox_health.is_down();
        self.metrics.redis_connected.set(i64::from(connected));
    }

    /// Take messages while there is a free prefetch slot, until the first shutdown signal.
    /// A fetch in flight is never abandoned (with the BRPOP fallback its message would be lost);
    /// it lasts ≤ 1 s.
    async fn fetch_loop(self: Arc<Self>, fetcher: &mut Fetcher) -> JoinSet<()> {
        // The prefetch budget: slots × --prefetch-multiplier, following pool_grow/pool_shrink.
        let slots = self.state.pool().fetch_slots().clone();
        let mut deliveries = JoinSet::new();
        let mut backoff = Backoff::default();
        let mut queue_changes = self.state.queue_changes();
        loop {
            while deliveries.try_join_next().is_some() {}
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
                Ok(()) = queue_changes.changed() => {
                    self.consume_from(fetcher, &self.state.queues());
                    continue;
                }
                () = self.shutdown.reached(Stage::Graceful) => break,
            };
            if self.shutdown.stage() != Stage::Running {
                break;
            }
            match fetcher.fetch().await {
                Ok(Some(taken)) => {
                    self.broker_health.set_connected();
                    backoff = Backoff::default();
                    deliveries.spawn(self.clone().deliver(taken, permit));
                }
                Ok(None) => {
                    self.broker_health.set_connected();
                    backoff = Backoff::default();
                }
                Err(e) if connection::classify(&e) == connection::Failure::Permanent => {
                    let setting = "BROKER_URL";
                    self.stop_with(StartError::Refused(connection::explain(
                        &e,
                        setting,
                        &redact_url(&self.args.redis.broker_url),
                    )));
                    break;
                }
                Err(e) => {
                    self.broker_health.report_failure(&e, "read from the broker");
                    tokio::select! {
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                        () = self.shutdown.reached(Stage::Graceful) => break,
                    }
                }
            }
        }
        deliveries
    }

    /// Switch the fetcher to `queues` (remote add_consumer/cancel_consumer).
    fn consume_from(&self, fetcher: &mut Fetcher, queues: &[String]) {
        let lists =
            Arc::new(TakeList::with_order(queues, &self.args.queue.priority_steps, self.args.queue_order_strategy));
        let master = self.args.redis.sentinel_master.as_deref();
        let conns = (0..lists.keys().len())
            .map(|_| {
                connection::connect(
                    "BROKER_URL",
                    &self.args.redis.broker_url,
                    master,
                    connection::response_timeout(self.args.health_check_interval) + BRPOP_TIMEOUT,
                )
            })
            .collect::<Result<Vec<_>, _>>();
        match conns {
            Ok(conns) => {
                *self.lists.locked() = lists.clone();
                *fetcher = self.broker.fetcher(conns, lists);
                tracing::info!(?queues, "now consuming from");
            }
            Err(e) => tracing::warn!(error = %e, "cannot change queues"),
        }
    }

    /// Handle one message, from parsing to acknowledgement, then each next message its finish
    /// script takes on the same fetch slot, until one finishes without taking another.
    ///
    /// A panic inside a delivery (anything outside the task body, which [`Call::run`] already
    /// catches) does not strand its message: the message it held is taken out of [`InFlight`]
    /// (so its lease is no longer renewed) and put back at the front of its queue, or, when
    /// the same task already panicked here once, failed with a `RuntimeError` and acknowledged.
    async fn deliver(self: Arc<Self>, taken: Taken, fetch_slot: OwnedSemaphorePermit) {
        use futures::FutureExt as _;
        let mut fetch_slot = Some(fetch_slot);
        let mut next = Some(taken);
        while let Some(taken) = next.take() {
            let mut holding = None;
            let delivered = std::panic::AssertUnwindSafe(self.deliver_one(taken, &mut fetch_slot, &mut holding))
                .catch_unwind()
                .await;
            match delivered {
                Ok(n) => next = n,
                Err(payload) => {
                    self.recover_panicked(holding.as_deref(), crate::task::panic_text(payload.as_ref())).await;
                    return;
                }
            }
        }
    }

    /// Settle the message a panicked delivery held (see [`Self::deliver`]).
    async fn recover_panicked(&self, tag: Option<&str>, why: String) {
        self.metrics.delivery_panics.inc();
        let Some((tag, held)) = tag.and_then(|t| self.in_flight.finish(t).map(|h| (t, h))) else {
            // Nothing held (it panicked before holding, or after settling): whatever is in
            // `unacked` without a lease comes back after the visibility timeout.
            tracing::error!(panic = %why, "a delivery panicked; it held no message");
            return;
        };
        let msg = &held.msg;
        let repeat = {
            let mut seen = self.panicked.locked();
            if seen.len() >= PANICKED_IDS {
                seen.clear();
            }
            !seen.insert(msg.id.clone())
        };
        if !repeat {
            tracing::error!(task_id = %msg.id, task = %msg.task, panic = %why, "a delivery panicked; putting its message back");
            self.put_back(tag, &held.entry).await;
            return;
        }
        tracing::error!(task_id = %msg.id, task = %msg.task, panic = %why, "a delivery panicked again for this task; storing FAILURE");
        let exc = ExceptionInfo::builtin("RuntimeError", format!("worker panicked delivering this task: {why}"));
        self.metrics.failure.with_label_values(&[&msg.task]).inc();
        self.state.failed(msg, &exc);
        // The task's own options may be what panics: only the message's ignore_result counts.
        if msg.ignore_result != Some(true) {
            let mut meta = ResultMeta::failure(&msg.id, &msg.task, &exc, Utc::now());
            meta.group_id = msg.group.clone();
            meta.parent_id = msg.parent_id.clone();
            self.redis_backend("store a result", || self.backend.store(&meta)).await;
        }
        self.ack(tag).await;
    }

    /// Handle one message, from parsing to acknowledgement, in four typed stages: [`Self::accept`]
    /// (parse, bind, record, hold), [`Self::until_runnable`] (revoked? expired? its ETA, a run
    /// slot), [`Self::run`] (the body, or a terminate) and the finish ([`Self::follow_up`], then
    /// [`Self::complete`]). A stage that ends the delivery early says how ([`Stop`]). Returns the
    /// next message when the finish took one (only while `fetch_slot` is held: it passes to it).
    /// `holding` is set to the delivery tag once the message is held (for [`Self::deliver`]'s
    /// panic recovery).
    async fn deliver_one(
        &self,
        taken: Taken,
        fetch_slot: &mut Option<OwnedSemaphorePermit>,
        holding: &mut Option<String>,
    ) -> Option<Taken> {
        let delivered = async {
            let (held, call) = self.accept(taken, holding).await?;
            let run_slot = self.until_runnable(&held, fetch_slot).await?;
            let ran = self.run(&held, call).await?;
            // The run slot is free once the task has run, so a waiting message starts while
            // this result travels. Bounded by `finishing` so a stalled result backend stops
            // fetching instead of piling up finished tasks in memory.
            let finishing = self.finishing.acquire().await.expect("semaphore never closed");
            drop(run_slot);
            let Some(last) = self.follow_up(&held.msg, &*held.task, ran, &held.queue).await else {
                self.requeue(&held.tag).await;
                return Err(Stop::Left);
            };
            Ok::<_, Stop>((held.tag, last, finishing))
        };
        match delivered.await {
            Ok((tag, last, _finishing)) => self.complete(&tag, last, fetch_slot).await,
            Err(Stop::Ack(tag)) => self.complete(&tag, None, fetch_slot).await,
            Err(Stop::Left) => None,
        }
    }

    /// Parse the message, bind it to its task, record it in `unacked` (unless the take did) and
    /// hold it. A message that cannot run is rejected (counted, kept or failed, see
    /// [`Self::reject`]) and acknowledged if it was recorded.
    async fn accept(&self, taken: Taken, holding: &mut Option<String>) -> Result<(Accepted, Call), Stop> {
        let Taken { key, bytes, recorded_as } = taken;
        // Taken with a readable tag but unusable otherwise: done with it.
        let done_with = |recorded_as: Option<String>| recorded_as.map_or(Stop::Left, Stop::Ack);
        let queue = keys::queue_of_key(&key).to_owned();
        let msg = match parse_message_within(&bytes, self.args.max_message_bytes as usize) {
            Ok(m) => m,
            Err(rejection) => {
                self.reject(rejection, &bytes, None, None).await;
                return Err(done_with(recorded_as));
            }
        };
        let bound = match self.registry.get(&msg.task) {
            None => Err((RejectReason::UnknownTask, format!("task {:?} is not registered", msg.task), None)),
            Some(t) => match t.bind(&msg.args, &msg.kwargs) {
                Ok(call) => Ok((t.clone(), call)),
                Err(m) => Err((RejectReason::BadArguments, m, Some(t.clone()))),
            },
        };
        let (task, call) = match bound {
            Ok(bound) => bound,
            Err((reason, detail, task)) => {
                let rejection =
                    Rejection { reason, detail, task_id: Some(msg.id.clone()), task_name: Some(msg.task.clone()) };
                self.reject(rejection, &bytes, Some(&msg), task.as_deref()).await;
                return Err(done_with(recorded_as));
            }
        };
        self.metrics.received.with_label_values(&[&msg.task]).inc();
        // The same bytes the take script wrote when it recorded the message itself.
        let entry = unacked_entry(&msg, &queue);
        let tag = msg.delivery_tag.clone();
        if recorded_as.is_none()
            && self
                .redis("record the delivery in unacked", || {
                    self.broker.record_unacked(&tag, &entry, unix_seconds(Utc::now()))
                })
                .await
                .is_none()
        {
            // Reached only when the worker is stopping and Redis does not answer (or refused
            // the write): the message left its queue and no `unacked` entry holds it. Its body
            // is not logged (it may carry secrets or personal data); its id is, to re-send it.
            tracing::error!(task_id = %msg.id, task = %msg.task, queue = %queue, bytes = bytes.len(), "a message taken while the worker stopped could not be recorded in unacked; it is lost unless re-sent");
            return Err(Stop::Left);
        }
        let msg = Arc::new(msg);
        if let Err(held) = self.in_flight.hold(&tag, Held::new(msg.clone(), queue.clone(), entry)) {
            // Shutdown began while we were recording it: it goes straight back.
            self.put_back(&tag, &held.entry).await;
            return Err(Stop::Left);
        }
        *holding = Some(tag.clone());
        Ok((Accepted { msg, task, tag, queue }, call))
    }

    /// Wait until the held message may run: not revoked, not expired, its ETA reached (a
    /// scheduled task gives up its fetch slot meanwhile, as Celery's does not count against
    /// prefetch), and a run slot free. Returns the run slot, with the message marked active.
    async fn until_runnable(
        &self,
        held: &Accepted,
        fetch_slot: &mut Option<OwnedSemaphorePermit>,
    ) -> Result<OwnedSemaphorePermit, Stop> {
        let Accepted { msg, task, tag, .. } = held;
        if self.state.revoked.contains(&msg.id) {
            self.skip_revoked(msg, &**task, tag).await;
            return Err(Stop::Left);
        }
        if self.expired(msg, &**task).await {
            return Err(Stop::Ack(tag.clone()));
        }
        self.state.received(msg);
        if let Some(eta) = msg.eta.filter(|e| *e > Utc::now()) {
            fetch_slot.take();
            let wait = (eta - Utc::now()).to_std().unwrap_or_default();
            tracing::debug!(task_id = %msg.id, %eta, "holding task until its ETA");
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.state.revoked.wait(&msg.id, false) => {}
                () = self.shutdown.reached(Stage::Graceful) => return Err(Stop::Left), // the drain puts it back
            }
        }
        // Its rate limit's token (Celery: after the ETA, before the pool); held and leased meanwhile.
        tokio::select! {
            () = self.state.limits().acquire(&msg.task) => {}
            () = self.state.revoked.wait(&msg.id, false) => {}
            () = self.shutdown.reached(Stage::Graceful) => return Err(Stop::Left),
        }
        let run_slot = tokio::select! {
            p = self.run_slots.clone().acquire_owned() => p.expect("semaphore never closed"),
            () = self.shutdown.reached(Stage::Graceful) => return Err(Stop::Left),
        };
        if self.state.revoked.contains(&msg.id) {
            self.skip_revoked(msg, &**task, tag).await;
            return Err(Stop::Left);
        }
        // Celery checks `expires` again right before it runs the task (`Request.revoked()` in
        // `execute_using_pool`): the ETA or the run-slot wait may have outlasted it.
        if self.expired(msg, &**task).await {
            return Err(Stop::Ack(tag.clone()));
        }
        if !self.in_flight.start(tag) {
            return Err(Stop::Left); // the drain took it back before it could start
        }
        self.state.started(msg);
        if self.args.acks_early {
            // Celery's default (`acks_late=False`): acknowledged as the task starts. It stays
            // held here (inspect, the drain's wait) but is no longer in `unacked`.
            self.redis("acknowledge", || self.broker.ack(tag)).await;
        }
        if self.args.track_started {
            self.store(msg, &**task, ResultMeta::started(&msg.id, std::process::id(), &self.node)).await;
        }
        Ok(run_slot)
    }

    /// Run the task body, unless `revoke --terminate` ends it first (REVOKED is stored) or a
    /// redelivered task already succeeded: both end the delivery with an acknowledgement.
    async fn run(&self, held: &Accepted, call: Call) -> Result<Ran, Stop> {
        let Accepted { msg, task, tag, .. } = held;
        tokio::select! {
            r = self.execute(msg, &**task, call) => r.ok_or_else(|| Stop::Ack(tag.clone())),
            () = self.state.revoked.wait(&msg.id, true) => {
                // `revoke --terminate`: the task's future is dropped: an async task stops at
                // once, a blocking one has its cancel flag set (task::Call::run's drop guard).
                tracing::info!(task_id = %msg.id, task = %msg.task, "task terminated by remote control; storing REVOKED");
                self.metrics.revoked.with_label_values(&[&msg.task]).inc();
                let exc = ExceptionInfo::revoked("terminated");
                self.store(msg, &**task, ResultMeta::revoked(&msg.id, &exc, Utc::now())).await;
                self.chord_part_revoked(msg, &exc).await;
                self.state.revoked_task(&msg.id, true, false);
                Err(Stop::Ack(tag.clone()))
            }
        }
    }

    /// Whether `msg` is past its `expires`; if so REVOKED (`TaskRevokedError('expired')`) is
    /// stored and the event sent, as Celery's `Request.revoked()` does; the caller acknowledges.
    async fn expired(&self, msg: &TaskMessage, task: &dyn Task) -> bool {
        let Some(expires) = msg.expires.filter(|e| *e <= Utc::now()) else { return false };
        tracing::info!(task_id = %msg.id, task = %msg.task, %expires, "task expired before it could run; storing REVOKED");
        self.metrics.revoked.with_label_values(&[&msg.task]).inc();
        let exc = ExceptionInfo::revoked_expired();
        self.store(msg, task, ResultMeta::revoked(&msg.id, &exc, Utc::now())).await;
        self.chord_part_revoked(msg, &exc).await;
        self.state.revoked_task(&msg.id, false, true);
        true
    }

    /// A revoked task never runs: REVOKED is stored (again: remote revoke already stored it)
    /// and the message acknowledged, as Celery's `Request.revoked()` does.
    async fn skip_revoked(&self, msg: &TaskMessage, task: &dyn Task, tag: &str) {
        tracing::info!(task_id = %msg.id, task = %msg.task, "task revoked; not running it");
        self.metrics.revoked.with_label_values(&[&msg.task]).inc();
        let exc = ExceptionInfo::revoked("revoked");
        self.store(msg, task, ResultMeta::revoked(&msg.id, &exc, Utc::now())).await;
        self.chord_part_revoked(msg, &exc).await;
        self.state.revoked_task(&msg.id, false, false);
        self.ack(tag).await;
    }

    /// Run the task; `None` when a redelivered task had already succeeded (nothing to do).
    async fn execute(&self, msg: &TaskMessage, task: &dyn Task, call: Call) -> Option<Ran> {
        if msg.redelivered {
            let status = self.redis_backend("read a stored result", || self.backend.status(&msg.id)).await.flatten();
            if status.as_deref() == Some("SUCCESS") {
                tracing::info!(task_id = %msg.id, task = %msg.task, "redelivered task already succeeded; acknowledging without running it again");
                self.metrics.duplicates_skipped.inc();
                // A chord member's first run may have stopped between its store and its count.
                self.chord_part_of_stored(msg).await;
                return None;
            }
        }
        let (limits, hard_exc) = time_limits(msg, &self.state.limits().options(task.options()), &self.args);
        tracing::debug!(task_id = %msg.id, task = %msg.task, retries = msg.retries, "task started");
        let started = Instant::now();
        let (ctx, updates) = Context::for_message(msg, task.options(), &self.node);
        let request = ctx.shared_request();
        let ended = self.with_state_updates(msg, call.run_limited(ctx, limits), updates).await;
        let outcome = match ended {
            Ended::Returned(r) => retry::autoretry(task.options(), msg.retries, r),
            Ended::SoftLimit => {
                retry::autoretry(task.options(), msg.retries, Err(TaskError::soft_time_limit_exceeded()))
            }
            Ended::HardLimit { abandoned } => {
                if abandoned {
                    tracing::warn!(task_id = %msg.id, task = %msg.task, "hard time limit: the blocking body did not stop within {:?}; its thread is left running until the body returns (its result is discarded) and the slot goes to the next task", crate::task::limits::HARD_LIMIT_GRACE);
                }
                Err(TaskError::Raise(hard_exc.unwrap_or_else(ExceptionInfo::soft_time_limit_exceeded)))
            }
        };
        Some(Ran { outcome, elapsed: started.elapsed(), request })
    }

    /// Drive `run` while writing the task's state updates ([`Context::update_state`]) in
    /// order; the ones still queued when it ends are written before it returns, so the final
    /// result comes after every update.
    async fn with_state_updates<T>(
        &self,
        msg: &TaskMessage,
        run: impl std::future::Future<Output = T>,
        mut updates: tokio::sync::mpsc::UnboundedReceiver<StateUpdate>,
    ) -> T {
        let mut run = std::pin::pin!(run);
        let mut open = true;
        loop {
            tokio::select! {
                biased;
                out = &mut run => {
                    updates.close();
                    while let Ok(update) = updates.try_recv() {
                        self.store_update(msg, update).await;
                    }
                    return out;
                }
                update = updates.recv(), if open => match update {
                    Some(update) => self.store_update(msg, update).await,
                    None => open = false,
                },
            }
        }
    }

    /// A state the task set: stored as Celery's `update_state` stores it, whether or not the
    /// task ignores its result.
    async fn store_update(&self, msg: &TaskMessage, update: StateUpdate) {
        let mut meta = ResultMeta::custom(&msg.id, &update.state, update.meta);
        meta.group_id = msg.group.clone();
        meta.parent_id = msg.parent_id.clone();
        self.store_meta(&meta).await;
    }

    /// Carry out the Celery rules of the outcome ([`settle::settle`]): count, log and send
    /// the event, store what goes first and send the follow-ups; returns the result to store
    /// with the acknowledgement.
    /// Returns `None` instead when the message is to be requeued (`Reject(requeue=True)`).
    async fn follow_up(&self, msg: &TaskMessage, t: &dyn Task, ran: Ran, queue: &str) -> Option<Option<ResultMeta>> {
        let task = msg.task.as_str();
        let Ran { outcome, elapsed, request } = ran;
        let spawned = match &outcome {
            Ok(value) => t.spawned(&msg.args, &msg.kwargs, value),
            Err(_) => Vec::new(),
        };
        let (kind, plan) = settle::settle_spawning(msg, outcome, spawned, queue, Utc::now(), &self.args.task_routes);
        match &kind {
            settle::Kind::Success => {
                self.metrics.success.with_label_values(&[task]).inc();
                self.metrics.duration.with_label_values(&[task]).observe(elapsed.as_secs_f64());
                tracing::debug!(task_id = %msg.id, task, seconds = elapsed.as_secs_f64(), "task succeeded");
                let stored = plan.store_first.as_ref().or(plan.store_with_ack.as_ref());
                let value = stored.map_or(&Value::Null, |m| &m.result);
                self.state.succeeded(msg, value, elapsed);
                t.on_success(value, &request);
                t.after_return(kind.state(), value, &request);
            }
            settle::Kind::Failure(exc) => {
                self.metrics.failure.with_label_values(&[task]).inc();
                self.metrics.duration.with_label_values(&[task]).observe(elapsed.as_secs_f64());
                tracing::info!(task_id = %msg.id, task, "task failed: {}", exc.summary());
                self.state.failed(msg, exc);
                t.on_failure(exc, &request);
                t.after_return(kind.state(), &exc.to_value(), &request);
            }
            settle::Kind::Retry { exc, countdown } => {
                self.metrics.retried.with_label_values(&[task]).inc();
                tracing::info!(task_id = %msg.id, task, retries = msg.retries + 1, ?countdown, "task retry: {}", exc.summary());
                self.state.retried(msg, exc);
                t.on_retry(exc, &request);
                t.after_return(kind.state(), &exc.to_value(), &request);
            }
            settle::Kind::Reject { exc, requeue } => {
                tracing::info!(task_id = %msg.id, task, requeue, "task rejected its message: {}", exc.summary());
                if !requeue {
                    self.metrics.failure.with_label_values(&[task]).inc();
                    self.state.failed(msg, exc);
                }
                self.state.events.task_rejected(&msg.id, *requeue);
                t.after_return(kind.state(), &exc.to_value(), &request);
            }
            settle::Kind::Ignore => {
                tracing::debug!(task_id = %msg.id, task, "task ignored: nothing stored");
                t.after_return(kind.state(), &Value::Null, &request);
            }
        }
        if let Some(meta) = plan.store_first {
            self.store(msg, t, meta).await;
        }
        if let Some(step) = plan.chord {
            self.chord_part_return(msg, step).await;
        }
        for follow_up in plan.send {
            self.send(follow_up).await;
        }
        if plan.requeue {
            return None;
        }
        Some(plan.store_with_ack.and_then(|meta| self.complete_meta(msg, t, meta)))
    }

    /// `Reject(requeue=True)`: the message goes back to the end of its queue.
    async fn requeue(&self, tag: &str) {
        if let Some(held) = self.in_flight.finish(tag) {
            let back =
                self.redis("requeue a rejected message", || self.broker.put_back(tag, &held.entry, End::Back)).await;
            if back == Some(true) {
                self.metrics.requeued.inc();
            }
        }
    }

    /// Store a result unless the message (or, if it does not say, the task) ignores results.
    async fn store(&self, msg: &TaskMessage, task: &dyn Task, meta: ResultMeta) {
        if let Some(meta) = self.complete_meta(msg, task, meta) {
            self.store_meta(&meta).await;
        }
    }

    /// Store a result as it is, on the backend's own connection.
    async fn store_meta(&self, meta: &ResultMeta) {
        let stored = self.redis_backend("store a result", || self.backend.store(meta)).await;
        log_kept_success(stored, meta);
    }

    /// Store `last` (if any), acknowledge `tag`, and — while this task still holds its fetch
    /// slot and the worker runs — take the next message: one round trip when broker and backend
    /// share a server (else the store goes first, on its own). Returns the message taken, which
    /// keeps the slot; without one the slot is freed for the fetch loop.
    async fn complete(
        &self,
        tag: &str,
        last: Option<ResultMeta>,
        fetch_slot: &mut Option<OwnedSemaphorePermit>,
    ) -> Option<Taken> {
        let store = last.as_ref().and_then(|meta| self.backend.shared_store(meta));
        if let (Some(meta), None) = (&last, &store) {
            self.store_meta(meta).await;
        }
        let lists =
            (fetch_slot.is_some() && self.shutdown.stage() == Stage::Running).then(|| self.lists.locked().clone());
        // A retry after an error takes nothing: whatever the lost reply took is in `unacked`,
        // and the fetcher finds it through the take marker once Redis answers again.
        let mut next_from = lists.as_deref();
        let finished = self
            .redis("acknowledge", || {
                let lists = next_from.take();
                self.broker.finish(tag, store.as_ref(), lists, unix_seconds(Utc::now()))
            })
            .await;
        self.in_flight.finish(tag);
        let finished = finished?;
        if let Some(meta) = &last {
            log_kept_success(finished.stored, meta);
        }
        match finished.next {
            Some(next) => {
                self.broker_health.set_connected();
                if next.bytes.len() > LARGE_REPLY {
                    self.broker.connection().reset();
                }
                Some(next)
            }
            None => {
                fetch_slot.take();
                None
            }
        }
    }

    /// The result as stored: group, parent and (with --result-extended) the call; `None` when
    /// the message (or, if it does not say, the task) ignores results.
    fn complete_meta(&self, msg: &TaskMessage, task: &dyn Task, mut meta: ResultMeta) -> Option<ResultMeta> {
        if ignores_result(msg, Some(task)) {
            return None;
        }
        meta.group_id = msg.group.clone();
        meta.parent_id = msg.parent_id.clone();
        if self.args.result_extended {
            meta.extended = Some(Extended {
                name: msg.task.clone(),
                args: msg.args.clone(),
                kwargs: msg.kwargs.clone(),
                worker: self.node.clone(),
                retries: msg.retries,
                queue: msg.routing_key().unwrap_or_default().to_owned(),
            });
        }
        Some(meta)
    }

    async fn send(&self, task: NewTask) {
        if let Some((group, size)) = task.chord_size.as_ref().map(|(g, n)| (g.as_str(), *n)) {
            self.redis_backend("set a chord's size", || self.backend.chord_set_size(group, size)).await;
        }
        let (bytes, _) = task.to_message(&self.origin);
        let priority = i64::from(task.priority);
        self.redis("publish a follow-up task", || self.broker.publish(&task.queue, priority, &bytes)).await;
    }

    async fn ack(&self, tag: &str) {
        self.redis("acknowledge", || self.broker.ack(tag)).await;
        self.in_flight.finish(tag);
    }

    async fn put_back(&self, tag: &str, entry: &[u8]) {
        if self.redis("put a message back", || self.broker.put_back(tag, entry, End::Front)).await == Some(true) {
            self.metrics.requeued.inc();
        }
    }

    /// Log, count, keep what cannot be read, and tell the caller through a FAILURE result.
    async fn reject(&self, r: Rejection, raw: &[u8], msg: Option<&TaskMessage>, task: Option<&dyn Task>) {
        self.metrics.rejected.with_label_values(&[r.reason.label()]).inc();
        tracing::warn!(reason = %r.reason, task_id = r.task_id.as_deref(), task = r.task_name.as_deref(), "message rejected: {}", r.detail);
        let keep_raw = !matches!(r.reason, RejectReason::UnknownTask | RejectReason::BadArguments);
        if keep_raw {
            let entry = dead_letter_entry(raw, &r, unix_seconds(Utc::now()));
            self.redis("keep a rejected message", || self.broker.dead_letter(&entry)).await;
        }
        if raw.len() > RELEASE_AFTER_BYTES {
            release_free_memory();
        }
        let Some(task_id) = &r.task_id else { return };
        if msg.is_some_and(|m| ignores_result(m, task)) {
            return;
        }
        let task = r.task_name.as_deref().unwrap_or("unknown");
        let exc = match r.reason {
            RejectReason::UnknownTask => ExceptionInfo::not_registered(task),
            RejectReason::BadArguments => ExceptionInfo::builtin("TypeError", r.detail.clone()),
            RejectReason::UnsupportedCanvas => ExceptionInfo::builtin("NotImplementedError", r.detail.clone()),
            RejectReason::UnsupportedEncoding => {
                ExceptionInfo::new("kombu.exceptions", "ContentDisallowed", vec![r.detail.clone().into()])
            }
            RejectReason::Malformed | RejectReason::BadHeaders | RejectReason::BadBody | RejectReason::TooLarge => {
                ExceptionInfo::new("kombu.exceptions", "DecodeError", vec![r.detail.clone().into()])
            }
        };
        match r.reason {
            // Python reports these as failures: the consumer for an unknown task, the task
            // itself (a TypeError) for arguments that do not fit.
            RejectReason::UnknownTask | RejectReason::BadArguments => {
                self.state.events.task_failed(task_id, task, &exc)
            }
            _ => self.state.rejected(task_id),
        }
        let mut meta = ResultMeta::failure(task_id, task, &exc, Utc::now());
        if let Some(m) = msg {
            meta.group_id = m.group.clone();
            meta.parent_id = m.parent_id.clone();
        }
        self.redis_backend("store a result", || self.backend.store(&meta)).await;
        // In Python a bad call raises TypeError inside the task, so its link_error runs and
        // a chord header member counts its failure.
        if let (Some(m), RejectReason::BadArguments) = (msg, r.reason) {
            if let Some(step) = chord::part(m, crate::wire::TaskState::Failure, &exc.to_value()) {
                self.chord_part_return(m, step).await;
            }
            self.send_errbacks(m).await;
        }
    }

    async fn send_errbacks(&self, msg: &TaskMessage) {
        for errback in settle::errbacks(msg, &self.args.task_routes) {
            self.send(errback).await;
        }
    }

    async fn redis<T, F, Fut>(&self, what: &str, op: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let result = connection::retry(&self.broker_health, what, &self.give_up, op).await;
        self.settled(result)
    }

    async fn redis_backend<T, F, Fut>(&self, what: &str, op: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let result = connection::retry(&self.backend_health, what, &self.give_up, op).await;
        self.settled(result)
    }

    /// A retried operation's end: a refusal for good stops the worker (what it holds goes back
    /// to its queues in the drain, or stays in `unacked` for the restorer).
    fn settled<T>(&self, result: Result<T, connection::GaveUp>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(connection::GaveUp::Stopping) => None,
            Err(connection::GaveUp::Refused(why)) => {
                self.stop_with(StartError::Refused(why));
                None
            }
        }
    }

    /// Stop on our own: not Ready at once, then the graceful drain; `run` returns `why`. The
    /// first reason wins and is logged once here; the process exits 1 with it after the drain.
    fn stop_with(&self, why: StartError) {
        let mut fatal = self.fatal.locked();
        if fatal.is_none() {
            // The reason is said once, as the exit error (main prints it), not here as well.
            tracing::error!(
                "stopping the worker: it cannot go on; putting back what it holds (the reason is the exit error)"
            );
            *fatal = Some(why);
            self.shutdown.advance(Stage::Graceful);
        }
    }

    /// Restore orphans as they fall due (see [`lease::restore_loop`]), counting and logging.
    async fn restore_loop(self: Arc<Self>) {
        let visibility = self.args.visibility_timeout;
        let longest = self.args.restore_interval;
        lease::restore_loop(self.broker.clone(), visibility, longest, |r| {
            if r.restored > 0 || r.unroutable > 0 {
                self.metrics.restored.inc_by(r.restored as u64);
                tracing::info!(
                    restored = r.restored,
                    unroutable = r.unroutable,
                    "restored messages past the visibility timeout"
                );
            }
        })
        .await;
    }

    /// Graceful stop: put back what has not started, wait for what runs (up to the shutdown
    /// timeout or a second signal), then put back what still runs.
    async fn drain(&self, deliveries: &mut JoinSet<()>) {
        let waiting = self.in_flight.begin_drain();
        for (tag, held) in &waiting {
            self.put_back(tag, &held.entry).await;
        }
        let (running, _) = self.in_flight.counts();
        tracing::info!(
            put_back = waiting.len(),
            running,
            timeout_s = self.args.shutdown_timeout.as_secs_f64(),
            "stopped fetching; waiting for running tasks"
        );
        let all_done = async { while deliveries.join_next().await.is_some() {} };
        tokio::select! {
            () = all_done => {}
            () = tokio::time::sleep(self.args.shutdown_timeout) => {
                tracing::warn!("shutdown timeout reached; putting running tasks back");
            }
            () = self.shutdown.reached(Stage::Immediate) => {
                tracing::warn!("second signal; putting running tasks back");
            }
        }
        let still = self.in_flight.snapshot();
        if !still.is_empty() {
            let put_all = async {
                for (tag, held) in &still {
                    self.put_back(tag, &held.entry).await;
                }
            };
            // Redis may be gone: bound the wait; the visibility timeout covers the rest.
            if tokio::time::timeout(Duration::from_secs(10), put_all).await.is_err() {
                tracing::error!("Redis did not answer; unreturned messages come back after the visibility timeout");
            }
            tracing::info!(put_back = still.len(), "running tasks returned to their queues");
        }
        self.give_up.store(true, Ordering::Relaxed);
        deliveries.abort_all();
    }
}

/// A redelivered duplicate may finish after the first run stored SUCCESS: the store keeps it.
fn log_kept_success(stored: Option<Stored>, meta: &ResultMeta) {
    if stored == Some(Stored::KeptSuccess) {
        tracing::info!(task_id = %meta.task_id, "a SUCCESS was already stored for this task; kept it");
    }
}

/// The run's soft and hard limits, with the exception the hard one raises. Each comes from the
/// message, else the task's options, else the worker's flags (as Celery).
fn time_limits(msg: &TaskMessage, task: &TaskOptions, args: &WorkerArgs) -> (Limits, Option<ExceptionInfo>) {
    let default = |task: Option<Duration>, worker: Option<Duration>| {
        task.or(worker).and_then(|d| Number::from_f64(d.as_secs_f64()))
    };
    let hard = msg.hard_time_limit.clone().or_else(|| default(task.time_limit, args.time_limit));
    let soft = msg.soft_time_limit.clone().or_else(|| default(task.soft_time_limit, args.soft_time_limit));
    let secs = |n: &Number| Duration::try_from_secs_f64(number_seconds(n)).ok();
    let limits = Limits { soft: soft.as_ref().and_then(secs), hard: hard.as_ref().and_then(secs) };
    let exc = limits.hard.and(hard.as_ref()).map(ExceptionInfo::time_limit_exceeded);
    (limits, exc)
}

/// The message's `ignore_result` header if it sets one (Python's `send_task` sends `null`),
/// else the task's option.
fn ignores_result(msg: &TaskMessage, task: Option<&dyn Task>) -> bool {
    msg.ignore_result.unwrap_or_else(|| task.is_some_and(|t| t.options().ignore_result))
}

/// `--queues` without `--exclude-queues` (Celery's `-X`, applied once at start; add_consumer
/// may add an excluded queue later, as in Celery).
fn consumed_queues(queues: Vec<String>, exclude: &[String]) -> Result<Vec<String>, StartError> {
    let exclude: Vec<&str> = exclude.iter().map(|q| q.trim()).collect();
    let left: Vec<String> = queues.iter().filter(|q| !exclude.contains(&q.as_str())).cloned().collect();
    if left.is_empty() {
        return Err(StartError::Config(format!(
            "--exclude-queues removes every queue of --queues ({}); consume at least one",
            queues.join(",")
        )));
    }
    Ok(left)
}

/// The pod whose deletion cost this worker keeps current, with --pod-deletion-cost.
fn pod_ref(args: &WorkerArgs) -> Result<Option<pod_cost::PodRef>, StartError> {
    if !args.pod_deletion_cost {
        return Ok(None);
    }
    let given = |v: &Option<String>| v.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned);
    match (given(&args.pod_name), given(&args.pod_namespace)) {
        (Some(name), Some(namespace)) => Ok(Some(pod_cost::PodRef { name, namespace })),
        (name, _) => Err(StartError::Config(format!(
            "--pod-deletion-cost needs --pod-{} (env POD_{}): in Kubernetes, set it from the downward API \
             (valueFrom.fieldRef.fieldPath: metadata.{})",
            if name.is_none() { "name" } else { "namespace" },
            if name.is_none() { "NAME" } else { "NAMESPACE" },
            if name.is_none() { "name" } else { "namespace" },
        ))),
    }
}

/// What remote control reports about this worker's configuration.
fn control_settings(
    args: &WorkerArgs,
    node: &str,
    queues: &[String],
    pool: Arc<pool::Pool>,
    limits: Arc<limits::TaskLimits>,
) -> control::Settings {
    let mut conf = serde_json::Map::new();
    conf.insert("broker_url".into(), redact_url(&args.redis.broker_url).into());
    conf.insert("result_backend".into(), redact_url(&args.redis.backend_url).into());
    conf.insert("worker_concurrency".into(), args.concurrency.into());
    conf.insert("worker_prefetch_multiplier".into(), args.prefetch_multiplier.into());
    conf.insert("task_acks_late".into(), (!args.acks_early).into());
    conf.insert("task_track_started".into(), args.track_started.into());
    conf.insert("worker_send_task_events".into(), args.events.into());
    conf.insert("result_extended".into(), args.result_extended.into());
    conf.insert("result_expires".into(), args.result_expires.into());
    control::Settings {
        node: node.to_owned(),
        pool,
        limits,
        broker_url: args.redis.broker_url.clone(),
        queues: queues.to_vec(),
        conf,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::parse_message;
    use clap::Parser;
    use serde_json::Map;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        worker: WorkerArgs,
    }

    fn message(limits: (Option<f64>, Option<f64>), ignore_result: Option<bool>) -> TaskMessage {
        let mut t = NewTask::new("t.x", vec![], Map::new(), "celery");
        t.time_limit = (limits.0.and_then(Number::from_f64), limits.1.and_then(Number::from_f64));
        t.ignore_result = ignore_result;
        parse_message(&t.to_message("gen1@test").0).unwrap()
    }

    #[test]
    fn limits_come_from_the_message_then_the_task_then_the_worker() {
        let worker = Cli::parse_from(["w", "--time-limit", "60", "--soft-time-limit", "50"]).worker;
        let plain = TaskOptions::new("t.x");
        let hard = |s: f64| Some(ExceptionInfo::time_limit_exceeded(&Number::from_f64(s).unwrap()));
        let secs = Duration::from_secs_f64;
        let limits = |soft: Option<f64>, hard: Option<f64>| Limits { soft: soft.map(secs), hard: hard.map(secs) };
        let plain_msg = message((None, None), None);
        assert_eq!(time_limits(&plain_msg, &plain, &worker), (limits(Some(50.0), Some(60.0)), hard(60.0)));
        let task = TaskOptions::new("t.x").time_limit(secs(2.0));
        assert_eq!(time_limits(&plain_msg, &task, &worker), (limits(Some(50.0), Some(2.0)), hard(2.0)));
        let from_msg = message((Some(1.5), Some(1.0)), None);
        assert_eq!(time_limits(&from_msg, &task, &worker), (limits(Some(1.0), Some(1.5)), hard(1.5)));
        let soft = TaskOptions::new("t.x").soft_time_limit(secs(0.5));
        let none = Cli::parse_from(["w"]).worker;
        assert_eq!(time_limits(&plain_msg, &soft, &none), (limits(Some(0.5), None), None));
        assert_eq!(time_limits(&plain_msg, &plain, &none), (limits(None, None), None));
    }

    #[test]
    fn ignore_result_is_the_messages_else_the_tasks() {
        let ignoring =
            Registry::new().add_async(TaskOptions::new("t.x").ignore_result(true), ["a"], |(_,): (Value,), _| async {
                Ok::<_, TaskError>(())
            });
        let task = ignoring.get("t.x").map(|t| &**t);
        assert!(ignores_result(&message((None, None), None), task));
        assert!(!ignores_result(&message((None, None), Some(false)), task), "the message says store it");
        assert!(ignores_result(&message((None, None), Some(true)), None));
        assert!(!ignores_result(&message((None, None), None), None));
    }
}
