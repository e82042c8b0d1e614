//! The worker: take messages from the queues, run them, store results, acknowledge.
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

use crate::args::{StartError, non_negative_seconds, positive_seconds};
use crate::backend::{self, Backend, DEFAULT_RESULT_EXPIRES, Stored};
use crate::broker::{BRPOP_TIMEOUT, Broker, End, Fetcher, Taken};
use crate::connection::{self, Backoff, Health, redact_url};
use crate::http;
use crate::lease;
use crate::metrics::WorkerMetrics;
use crate::shutdown::{Shutdown, Stage};
use crate::tasks::{self, BindError, Call, Context, Outcome};
use crate::wire::envelope::number_seconds;
use crate::wire::keys::{self, PrioritySteps};
use crate::wire::message::{self, NewTask, unacked_entry};
use crate::wire::result::Extended;
use crate::wire::time::unix_seconds;
use crate::wire::{ExceptionInfo, RejectReason, Rejection, ResultMeta, TaskMessage, parse_message};
use chrono::Utc;
use serde_json::{Number, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// `celery-autoscale worker`: every option, with its environment variable where one exists.
#[derive(Clone, Debug, clap::Args)]
pub struct WorkerArgs {
    /// Broker (queues) Redis URL.
    #[arg(long, env = "BROKER_URL", default_value = connection::DEFAULT_BROKER_URL)]
    pub broker_url: String,
    /// Result backend Redis URL.
    #[arg(long, env = "BACKEND_URL", default_value = connection::DEFAULT_BACKEND_URL)]
    pub backend_url: String,
    /// Queues to consume, comma-separated; earlier queues are not preferred (kombu reads all of
    /// them in kombu's BRPOP order, priority bucket first).
    #[arg(long, value_delimiter = ',', default_value = keys::DEFAULT_QUEUE)]
    pub queues: Vec<String>,
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
    #[arg(long, default_value_t = 3600.0, value_parser = positive_seconds)]
    pub visibility_timeout: f64,
    /// Seconds to let running tasks finish after SIGTERM before putting them back and exiting.
    /// Keep Kubernetes' terminationGracePeriodSeconds above this.
    #[arg(long, default_value_t = 30.0, value_parser = non_negative_seconds)]
    pub shutdown_timeout: f64,
    /// Longest wait in seconds between visibility-timeout restore rounds; a round also runs as
    /// soon as the oldest unacknowledged message falls due.
    #[arg(long, default_value_t = 30.0, value_parser = positive_seconds)]
    pub restore_interval: f64,
    /// Priority buckets, as kombu's priority_steps; producers and consumers must agree.
    #[arg(long, default_value_t = PrioritySteps::default())]
    pub priority_steps: PrioritySteps,
    /// Seconds results are kept (Celery's result_expires); 0 keeps them forever.
    #[arg(long, default_value_t = DEFAULT_RESULT_EXPIRES.as_secs())]
    pub result_expires: u64,
    /// Also store name, args, kwargs, worker, retries and queue in results (result_extended).
    #[arg(long)]
    pub result_extended: bool,
    /// Default hard time limit in seconds for tasks whose message sets none (task_time_limit).
    #[arg(long, value_parser = positive_seconds)]
    pub time_limit: Option<f64>,
    /// Default soft time limit in seconds (task_soft_time_limit).
    #[arg(long, value_parser = positive_seconds)]
    pub soft_time_limit: Option<f64>,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9191")]
    pub metrics_addr: String,
    /// Worker name in logs and extended results (default: the host name, i.e. the pod name).
    #[arg(long)]
    pub hostname: Option<String>,
}

/// A message the worker has taken and not yet acknowledged.
struct Held {
    entry: Vec<u8>,
    running: bool,
}

struct Worker {
    args: WorkerArgs,
    broker: Broker,
    backend: Backend,
    metrics: WorkerMetrics,
    broker_health: Arc<Health>,
    backend_health: Arc<Health>,
    shutdown: Shutdown,
    /// Keyed by delivery tag. Guarded by a plain mutex: every critical section is a map update.
    held: Mutex<HashMap<String, Held>>,
    /// Set (under `held`'s lock) when the graceful drain starts: from then on a newly taken
    /// message goes straight back.
    draining: AtomicBool,
    /// Set at the immediate stage: Redis retry loops stop waiting for Redis.
    give_up: AtomicBool,
    run_slots: Arc<Semaphore>,
    /// Finished tasks whose results are being stored.
    finishing: Arc<Semaphore>,
    hostname: String,
    origin: String,
}

/// Run a worker until it is told to stop. Returns after a clean shutdown.
pub async fn run(args: WorkerArgs) -> Result<(), StartError> {
    let shutdown = Shutdown::from_signals().map_err(StartError::Signals)?;
    run_with_shutdown(args, shutdown).await
}

/// [`run`] with an externally driven [`Shutdown`] (tests, the local supervisor).
pub async fn run_with_shutdown(args: WorkerArgs, shutdown: Shutdown) -> Result<(), StartError> {
    if args.queues.iter().all(|q| q.trim().is_empty()) {
        return Err(StartError::NoQueues);
    }
    // Replies may queue behind a busy Redis; a blocking wait needs its block time on top.
    let op_timeout = Duration::from_secs(10);
    let broker_conn = connection::connect("BROKER_URL", &args.broker_url, op_timeout)?;
    // One connection per list for the blocking wait, so a wait on one list never delays another.
    let wait_conns = (0..Fetcher::lists(&args.queues, &args.priority_steps))
        .map(|_| connection::connect("BROKER_URL", &args.broker_url, op_timeout + BRPOP_TIMEOUT))
        .collect::<Result<Vec<_>, _>>()?;
    let backend_conn = connection::connect("BACKEND_URL", &args.backend_url, op_timeout)?;
    let steps = args.priority_steps.clone();
    let hostname = args.hostname.clone().unwrap_or_else(message::hostname);
    let worker = Arc::new(Worker {
        broker: Broker::new(broker_conn, steps.clone()),
        backend: Backend::new(backend_conn, Duration::from_secs(args.result_expires))
            .with_shared_broker(backend::shared_broker_db(&args.broker_url, &args.backend_url)),
        metrics: WorkerMetrics::new(),
        broker_health: Health::new("broker"),
        backend_health: Health::new("backend"),
        shutdown: shutdown.clone(),
        held: Mutex::new(HashMap::new()),
        draining: AtomicBool::new(false),
        give_up: AtomicBool::new(false),
        run_slots: Arc::new(Semaphore::new(args.concurrency as usize)),
        finishing: Arc::new(Semaphore::new(2 * args.concurrency as usize)),
        origin: format!("gen{}@{hostname}", std::process::id()),
        hostname,
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
        broker = %redact_url(&worker.args.broker_url),
        backend = %redact_url(&worker.args.backend_url),
        queues = ?worker.args.queues,
        concurrency = worker.args.concurrency,
        prefetch = worker.args.concurrency * worker.args.prefetch_multiplier,
        metrics = %addr,
        "worker started"
    );

    let restorer = tokio::spawn(worker.clone().restore_loop());
    let renewer = {
        let w = worker.clone();
        let held: lease::HeldTags = Arc::new(move || w.held_tags());
        let visibility = Duration::from_secs_f64(worker.args.visibility_timeout);
        tokio::spawn(lease::renew_loop(worker.broker.clone(), held, visibility))
    };
    let mut fetcher = Fetcher::new(worker.broker.connection(), wait_conns, &worker.args.queues, &steps);
    let mut deliveries = worker.clone().fetch_loop(&mut fetcher).await;
    worker.drain(&mut deliveries).await;
    restorer.abort();
    renewer.abort();
    shutdown.advance(Stage::Immediate);
    let _ = server.await;
    tracing::info!("worker stopped");
    Ok(())
}

impl Worker {
    fn readiness(&self) -> Result<(), String> {
        if self.shutdown.stage() != Stage::Running {
            return Err("shutting down".into());
        }
        if !self.broker_health.is_connected() {
            return Err("broker Redis unreachable".into());
        }
        if self.backend_health.is_down() {
            return Err("result backend Redis unreachable".into());
        }
        Ok(())
    }

    fn refresh_gauges(&self) {
        let (running, waiting) = {
            let held = self.held.lock().expect("held lock");
            let running = held.values().filter(|h| h.running).count();
            (running, held.len() - running)
        };
        self.metrics.active.set(running as i64);
        self.metrics.reserved.set(waiting as i64);
        let connected = self.broker_health.is_connected() && !self.backend_health.is_down();
        self.metrics.redis_connected.set(i64::from(connected));
    }

    /// Take messages while there is a free prefetch slot, until the first shutdown signal.
    /// A fetch in flight is never abandoned (with the BRPOP fallback its message would be lost);
    /// it lasts ≤ 1 s.
    async fn fetch_loop(self: Arc<Self>, fetcher: &mut Fetcher) -> JoinSet<()> {
        let slots = Arc::new(Semaphore::new((self.args.concurrency * self.args.prefetch_multiplier) as usize));
        let mut deliveries = JoinSet::new();
        let mut backoff = Backoff::default();
        loop {
            while deliveries.try_join_next().is_some() {}
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
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
                Err(e) => {
                    if self.broker_health.set_disconnected() {
                        tracing::warn!(error = %e, "cannot read from the broker; reconnecting with backoff");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                        () = self.shutdown.reached(Stage::Graceful) => break,
                    }
                }
            }
        }
        deliveries
    }

    /// Handle one message from `key`, from parsing to acknowledgement.
    async fn deliver(self: Arc<Self>, taken: Taken, fetch_slot: OwnedSemaphorePermit) {
        let Taken { key, bytes, recorded_as } = taken;
        let queue = keys::queue_of_key(&key).to_owned();
        let msg = match parse_message(&bytes) {
            Ok(m) => m,
            Err(rejection) => {
                self.reject(rejection, &bytes, None).await;
                if let Some(tag) = &recorded_as {
                    // Taken with a readable tag but unusable otherwise: done with it.
                    self.ack(tag).await;
                }
                return;
            }
        };
        let call = match tasks::bind(&msg.task, &msg.args, &msg.kwargs) {
            Ok(call) => call,
            Err(e) => {
                let (reason, detail) = match e {
                    BindError::NotRegistered => {
                        (RejectReason::UnknownTask, format!("task {:?} is not registered", msg.task))
                    }
                    BindError::Arguments(m) => (RejectReason::BadArguments, m),
                };
                let rejection =
                    Rejection { reason, detail, task_id: Some(msg.id.clone()), task_name: Some(msg.task.clone()) };
                self.reject(rejection, &bytes, Some(&msg)).await;
                if let Some(tag) = &recorded_as {
                    self.ack(tag).await;
                }
                return;
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
            tracing::error!(task_id = %msg.id, message = %String::from_utf8_lossy(&bytes), "exiting with a message Redis never took back; it is logged here in full");
            return;
        }
        if !self.hold(&tag, entry.clone()) {
            // Shutdown began while we were recording it: it goes straight back.
            self.put_back(&tag, &entry).await;
            return;
        }

        if let Some(expires) = msg.expires.filter(|e| *e <= Utc::now()) {
            tracing::info!(task_id = %msg.id, task = %msg.task, %expires, "task expired before it could run; storing REVOKED");
            self.metrics.revoked.with_label_values(&[&msg.task]).inc();
            self.store(&msg, ResultMeta::revoked(&msg.id, &ExceptionInfo::revoked_expired(), Utc::now())).await;
            return self.ack(&tag).await;
        }
        let mut fetch_slot = Some(fetch_slot);
        if let Some(eta) = msg.eta.filter(|e| *e > Utc::now()) {
            // Like Celery, a scheduled task does not count against prefetch while it waits.
            fetch_slot.take();
            let wait = (eta - Utc::now()).to_std().unwrap_or_default();
            tracing::debug!(task_id = %msg.id, %eta, "holding task until its ETA");
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.shutdown.reached(Stage::Graceful) => return, // the drain puts it back
            }
        }
        let run_slot = tokio::select! {
            p = self.run_slots.clone().acquire_owned() => p.expect("semaphore never closed"),
            () = self.shutdown.reached(Stage::Graceful) => return,
        };
        if !self.start(&tag) {
            return; // the drain took it back before it could start
        }
        let Some((outcome, elapsed)) = self.execute(&msg, call).await else {
            return self.ack(&tag).await;
        };
        // The slot is free once the task has run: store and ack off the critical path, so the
        // next message is fetched while this result travels. Bounded by `finishing` so a stalled
        // result backend stops fetching instead of piling up finished tasks in memory.
        let finishing = self.finishing.clone().acquire_owned().await.expect("semaphore never closed");
        drop(run_slot);
        drop(fetch_slot);
        if !self.finish(&msg, outcome, &queue, elapsed, &tag).await {
            self.ack(&tag).await;
        }
        drop(finishing);
    }

    /// Register a taken message; false if the drain has started (the caller puts it back).
    fn hold(&self, tag: &str, entry: Vec<u8>) -> bool {
        let mut held = self.held.lock().expect("held lock");
        if self.draining.load(Ordering::SeqCst) {
            return false;
        }
        held.insert(tag.to_owned(), Held { entry, running: false });
        true
    }

    /// Mark a held message as started; false if the drain already put it back.
    fn start(&self, tag: &str) -> bool {
        let mut held = self.held.lock().expect("held lock");
        if self.draining.load(Ordering::SeqCst) {
            return false;
        }
        match held.get_mut(tag) {
            Some(h) => {
                h.running = true;
                true
            }
            None => false,
        }
    }

    /// Run the task; `None` when a redelivered task had already succeeded (nothing to do).
    async fn execute(&self, msg: &TaskMessage, call: Call) -> Option<(Outcome, Duration)> {
        if msg.redelivered {
            let status = self.redis_backend("read a stored result", || self.backend.status(&msg.id)).await.flatten();
            if status.as_deref() == Some("SUCCESS") {
                tracing::info!(task_id = %msg.id, task = %msg.task, "redelivered task already succeeded; acknowledging without running it again");
                self.metrics.duplicates_skipped.inc();
                return None;
            }
        }
        let (limit, limit_exc) = self.time_limit(msg);
        tracing::debug!(task_id = %msg.id, task = %msg.task, retries = msg.retries, "task started");
        let started = Instant::now();
        let outcome = call
            .run(Context { retries: msg.retries }, limit)
            .await
            .unwrap_or_else(|| Outcome::Failure(limit_exc.unwrap_or_else(ExceptionInfo::soft_time_limit_exceeded)));
        Some((outcome, started.elapsed()))
    }

    /// The effective limit: the earlier of soft and hard, with the exception it raises.
    fn time_limit(&self, msg: &TaskMessage) -> (Option<Duration>, Option<ExceptionInfo>) {
        let default = |v: Option<f64>| v.and_then(Number::from_f64);
        let hard = msg.hard_time_limit.clone().or_else(|| default(self.args.time_limit));
        let soft = msg.soft_time_limit.clone().or_else(|| default(self.args.soft_time_limit));
        let secs = |n: &Number| Duration::try_from_secs_f64(number_seconds(n)).ok();
        match (hard.as_ref().and_then(secs), soft.as_ref().and_then(secs)) {
            (Some(h), Some(s)) if s < h => (Some(s), None),
            (Some(h), _) => (Some(h), hard.as_ref().map(ExceptionInfo::time_limit_exceeded)),
            (None, Some(s)) => (Some(s), None),
            (None, None) => (None, None),
        }
    }

    /// Store the outcome and send follow-ups; true when the message was acknowledged with its
    /// result (only when nothing else must be sent before the ack).
    async fn finish(&self, msg: &TaskMessage, outcome: Outcome, queue: &str, elapsed: Duration, tag: &str) -> bool {
        let now = Utc::now();
        let task = msg.task.as_str();
        match outcome {
            Outcome::Success(value) => {
                self.metrics.success.with_label_values(&[task]).inc();
                self.metrics.duration.with_label_values(&[task]).observe(elapsed.as_secs_f64());
                tracing::debug!(task_id = %msg.id, task, seconds = elapsed.as_secs_f64(), "task succeeded");
                if msg.embed.callbacks.is_empty() && msg.embed.chain.is_empty() {
                    return self.store_and_ack(msg, ResultMeta::success(&msg.id, value, now), tag).await;
                }
                self.store(msg, ResultMeta::success(&msg.id, value.clone(), now)).await;
                for sig in &msg.embed.callbacks {
                    self.send(NewTask::from_signature(sig, Some(value.clone()), msg, keys::DEFAULT_QUEUE)).await;
                }
                if let Some((next, rest)) = msg.embed.chain.split_last() {
                    let mut t = NewTask::from_signature(next, Some(value), msg, keys::DEFAULT_QUEUE);
                    t.chain = rest.to_vec();
                    self.send(t).await;
                }
            }
            Outcome::Failure(exc) => {
                self.metrics.failure.with_label_values(&[task]).inc();
                self.metrics.duration.with_label_values(&[task]).observe(elapsed.as_secs_f64());
                tracing::info!(task_id = %msg.id, task, "task failed: {}", exc.summary());
                if msg.embed.errbacks.is_empty() {
                    return self.store_and_ack(msg, ResultMeta::failure(&msg.id, task, &exc, now), tag).await;
                }
                self.store(msg, ResultMeta::failure(&msg.id, task, &exc, now)).await;
                self.send_errbacks(msg).await;
            }
            Outcome::Retry { exc, countdown } => {
                self.metrics.retried.with_label_values(&[task]).inc();
                tracing::info!(task_id = %msg.id, task, retries = msg.retries + 1, ?countdown, "task retry: {}", exc.summary());
                self.store(msg, ResultMeta::retry(&msg.id, task, &exc)).await;
                self.send(retry_message(msg, queue, countdown)).await;
            }
        }
        false
    }

    /// Store a result unless the message asked not to.
    async fn store(&self, msg: &TaskMessage, meta: ResultMeta) {
        let Some(meta) = self.complete_meta(msg, meta) else { return };
        if self.redis_backend("store a result", || self.backend.store(&meta)).await == Some(Stored::KeptSuccess) {
            tracing::info!(task_id = %msg.id, "a SUCCESS was already stored for this task; kept it");
        }
    }

    /// Store a result and acknowledge `tag` in one round trip when broker and backend share a
    /// server; true when it did (otherwise the caller acknowledges).
    async fn store_and_ack(&self, msg: &TaskMessage, meta: ResultMeta, tag: &str) -> bool {
        let meta = match self.complete_meta(msg, meta) {
            Some(meta) if self.backend.shares_broker() => meta,
            Some(meta) => {
                self.store(msg, meta).await;
                return false;
            }
            None => return false,
        };
        let stored = self.redis_backend("store a result", || self.backend.store_and_ack(&meta, tag)).await.flatten();
        if stored == Some(Stored::KeptSuccess) {
            tracing::info!(task_id = %msg.id, "a SUCCESS was already stored for this task; kept it");
        }
        if stored.is_some() {
            self.held.lock().expect("held lock").remove(tag);
        }
        stored.is_some()
    }

    /// The result as stored: group, parent and (with --result-extended) the call; `None` when
    /// the message asked for no result.
    fn complete_meta(&self, msg: &TaskMessage, mut meta: ResultMeta) -> Option<ResultMeta> {
        if msg.ignore_result == Some(true) {
            return None;
        }
        meta.group_id = msg.group.clone();
        meta.parent_id = msg.parent_id.clone();
        if self.args.result_extended {
            meta.extended = Some(Extended {
                name: msg.task.clone(),
                args: msg.args.clone(),
                kwargs: msg.kwargs.clone(),
                worker: self.hostname.clone(),
                retries: msg.retries,
                queue: msg.routing_key().unwrap_or_default().to_owned(),
            });
        }
        Some(meta)
    }

    async fn send(&self, task: NewTask) {
        let (bytes, _) = task.to_message(&self.origin);
        let priority = i64::from(task.priority);
        self.redis("publish a follow-up task", || self.broker.publish(&task.queue, priority, &bytes)).await;
    }

    async fn ack(&self, tag: &str) {
        self.redis("acknowledge", || self.broker.ack(tag)).await;
        self.held.lock().expect("held lock").remove(tag);
    }

    async fn put_back(&self, tag: &str, entry: &[u8]) {
        if self.redis("put a message back", || self.broker.put_back(tag, entry, End::Front)).await == Some(true) {
            self.metrics.requeued.inc();
        }
    }

    /// Log, count, keep what cannot be read, and tell the caller through a FAILURE result.
    async fn reject(&self, r: Rejection, raw: &[u8], msg: Option<&TaskMessage>) {
        self.metrics.rejected.with_label_values(&[r.reason.label()]).inc();
        tracing::warn!(reason = %r.reason, task_id = r.task_id.as_deref(), task = r.task_name.as_deref(), "message rejected: {}", r.detail);
        let keep_raw = !matches!(r.reason, RejectReason::UnknownTask | RejectReason::BadArguments);
        if keep_raw {
            self.redis("keep a rejected message", || self.broker.dead_letter(raw)).await;
        }
        let Some(task_id) = &r.task_id else { return };
        if msg.is_some_and(|m| m.ignore_result == Some(true)) {
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
            RejectReason::Malformed | RejectReason::BadHeaders | RejectReason::BadBody => {
                ExceptionInfo::new("kombu.exceptions", "DecodeError", vec![r.detail.clone().into()])
            }
        };
        let mut meta = ResultMeta::failure(task_id, task, &exc, Utc::now());
        if let Some(m) = msg {
            meta.group_id = m.group.clone();
            meta.parent_id = m.parent_id.clone();
        }
        self.redis_backend("store a result", || self.backend.store(&meta)).await;
        // In Python a bad call raises TypeError inside the task, so its link_error runs.
        if let (Some(m), RejectReason::BadArguments) = (msg, r.reason) {
            self.send_errbacks(m).await;
        }
    }

    async fn send_errbacks(&self, msg: &TaskMessage) {
        for sig in &msg.embed.errbacks {
            self.send(NewTask::from_signature(sig, Some(Value::String(msg.id.clone())), msg, keys::DEFAULT_QUEUE))
                .await;
        }
    }

    async fn redis<T, F, Fut>(&self, what: &str, op: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        connection::retry(&self.broker_health, what, &self.give_up, op).await
    }

    async fn redis_backend<T, F, Fut>(&self, what: &str, op: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        connection::retry(&self.backend_health, what, &self.give_up, op).await
    }

    /// Restore orphans as they fall due (see [`lease::restore_loop`]), counting and logging.
    async fn restore_loop(self: Arc<Self>) {
        let visibility = Duration::from_secs_f64(self.args.visibility_timeout);
        let longest = Duration::from_secs_f64(self.args.restore_interval);
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

    /// The delivery tags this worker holds, for lease renewal.
    fn held_tags(&self) -> Vec<String> {
        self.held.lock().expect("held lock").keys().cloned().collect()
    }

    /// Graceful stop: put back what has not started, wait for what runs (up to the shutdown
    /// timeout or a second signal), then put back what still runs.
    async fn drain(&self, deliveries: &mut JoinSet<()>) {
        let waiting: Vec<(String, Vec<u8>)> = {
            let mut held = self.held.lock().expect("held lock");
            self.draining.store(true, Ordering::SeqCst);
            let tags: Vec<String> = held.iter().filter(|(_, h)| !h.running).map(|(t, _)| t.clone()).collect();
            tags.into_iter().filter_map(|t| held.remove(&t).map(|h| (t, h.entry))).collect()
        };
        for (tag, entry) in &waiting {
            self.put_back(tag, entry).await;
        }
        let running = self.held.lock().expect("held lock").len();
        tracing::info!(
            put_back = waiting.len(),
            running,
            timeout_s = self.args.shutdown_timeout,
            "stopped fetching; waiting for running tasks"
        );
        let all_done = async { while deliveries.join_next().await.is_some() {} };
        tokio::select! {
            () = all_done => {}
            () = tokio::time::sleep(Duration::from_secs_f64(self.args.shutdown_timeout)) => {
                tracing::warn!("shutdown timeout reached; putting running tasks back");
            }
            () = self.shutdown.reached(Stage::Immediate) => {
                tracing::warn!("second signal; putting running tasks back");
            }
        }
        let still: Vec<(String, Vec<u8>)> =
            self.held.lock().expect("held lock").iter().map(|(t, h)| (t.clone(), h.entry.clone())).collect();
        if !still.is_empty() {
            let put_all = async {
                for (tag, entry) in &still {
                    self.put_back(tag, entry).await;
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

/// The message Celery's `Task.retry` sends (fixture w01): same id and arguments,
/// `retries + 1`, an ETA `countdown` from now, the workflow root kept, `parent_id` = this task.
fn retry_message(msg: &TaskMessage, queue: &str, countdown: Duration) -> NewTask {
    let mut t = NewTask::new(&msg.task, msg.args.clone(), msg.kwargs.clone(), queue);
    t.id = msg.id.clone();
    t.priority = msg.priority.clamp(0, 9) as u8;
    t.root_id = Some(msg.root_id().to_owned());
    t.parent_id = Some(msg.id.clone());
    t.group = msg.group.clone();
    t.retries = msg.retries + 1;
    t.eta = chrono::Duration::from_std(countdown).ok().map(|c| Utc::now() + c);
    t.expires = msg.expires;
    t.time_limit = (msg.hard_time_limit.clone(), msg.soft_time_limit.clone());
    t.ignore_result = msg.ignore_result;
    t.callbacks = msg.embed.callbacks.clone();
    t.errbacks = msg.embed.errbacks.clone();
    t.chain = msg.embed.chain.clone();
    t
}
