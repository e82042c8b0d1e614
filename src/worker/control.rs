//! Remote control (Celery's pidbox) and the worker state it reports.
//!
//! `celery inspect …` / `celery control …` publish a kombu message on the `celery.pidbox`
//! fanout exchange, which kombu's Redis transport turns into `PUBLISH /{db}.celery.pidbox`.
//! The body names a `method`, its `arguments`, an optional `destination` (node names) or
//! `pattern` + `matcher`, a `ticket` and a `reply_to` (`{exchange, routing_key}`). A worker answers
//! `{node: reply}` on the direct exchange `reply.celery.pidbox` with the request's ticket in the
//! headers; kombu routes that through the `_kombu.binding.reply.celery.pidbox` set to the
//! client's `<uuid>.reply.celery.pidbox` list (fixtures e08 and e11 in tests/fixtures/celery/events).
//!
//! Replies have the shapes Python workers send (celery/worker/control.py), so the CLI and
//! Flower print them the same way. Bad control messages are logged (rate limited) and dropped:
//! they never stop the worker, and the pidbox runs on its own connection and task, so a flood of
//! them does not hold up task messages.

use crate::runtime::shutdown::{Shutdown, Stage};
use crate::runtime::sync::Locked;
use crate::transport::backend::Backend;
use crate::transport::connection::{Backoff, Conn, Health, timed_out};
use crate::wire::keys;
use crate::wire::pidbox::{self, Request};
use crate::wire::pyrepr::{self, args_repr, kwargs_repr, repr};
use crate::wire::time::{python_isoformat, unix_seconds};
use crate::wire::{ExceptionInfo, ResultMeta, TaskMessage};
use crate::worker::events::{Events, WorkerCounts};
use crate::worker::inflight::{Held, InFlight, Phase};
use crate::worker::limits::TaskLimits;
use crate::worker::pool::Pool;
use chrono::Utc;
use futures::StreamExt;
use redis::AsyncCommands;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Celery's `REVOKES_MAX` and `REVOKE_EXPIRES` (seconds): the revoked set forgets the oldest ids
/// beyond this count or age.
const REVOKES_MAX: usize = 50_000;
const REVOKE_EXPIRES: Duration = Duration::from_secs(10_800);

mod tuning;

/// The node name Celery derives from `-n`: `name@host`; a value without `@` is a host name
/// (`celery@<value>`), and `%h`, `%n`, `%d` expand to the host name, its first label, its domain.
pub fn node_name(given: Option<&str>, host: &str) -> String {
    let (short, domain) = host.split_once('.').unwrap_or((host, ""));
    let expand = |s: &str| s.replace("%h", host).replace("%n", short).replace("%d", domain);
    match given.map(str::trim).filter(|g| !g.is_empty()) {
        None => format!("celery@{host}"),
        Some(g) => match g.split_once('@') {
            Some((name, h)) => {
                let name = if name.is_empty() { "celery" } else { name };
                let h = if h.is_empty() { host.to_owned() } else { expand(h) };
                format!("{}@{h}", expand(name))
            }
            None => format!("celery@{}", expand(g)),
        },
    }
}

/// Celery's revoked set: ids that must never run, with the ones asked to stop if running.
pub struct Revoked {
    inner: Mutex<RevokedInner>,
    /// Bumped on every change, so waiting tasks re-check.
    changed: watch::Sender<u64>,
}

#[derive(Default)]
struct RevokedInner {
    when: HashMap<String, Instant>,
    order: VecDeque<String>,
    terminate: HashSet<String>,
}

impl Default for Revoked {
    fn default() -> Self {
        Revoked { inner: Mutex::default(), changed: watch::channel(0).0 }
    }
}

impl Revoked {
    pub fn contains(&self, id: &str) -> bool {
        let inner = self.inner.locked();
        inner.when.get(id).is_some_and(|t| t.elapsed() < REVOKE_EXPIRES)
    }

    fn terminate_requested(&self, id: &str) -> bool {
        self.inner.locked().terminate.contains(id)
    }

    pub fn add(&self, ids: &[String], terminate: bool) {
        {
            let mut inner = self.inner.locked();
            for id in ids {
                if inner.when.insert(id.clone(), Instant::now()).is_none() {
                    inner.order.push_back(id.clone());
                }
                if terminate {
                    inner.terminate.insert(id.clone());
                }
            }
            while inner.order.len() > REVOKES_MAX
                || inner.order.front().is_some_and(|f| inner.when.get(f).is_none_or(|t| t.elapsed() >= REVOKE_EXPIRES))
            {
                let Some(old) = inner.order.pop_front() else { break };
                inner.when.remove(&old);
                inner.terminate.remove(&old);
            }
        }
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn ids(&self) -> Vec<String> {
        let inner = self.inner.locked();
        inner
            .order
            .iter()
            .filter(|id| inner.when.get(*id).is_some_and(|t| t.elapsed() < REVOKE_EXPIRES))
            .cloned()
            .collect()
    }

    /// Add ids revoked at the given Unix times (a state file's), oldest first: an id past
    /// Celery's three hours (`REVOKE_EXPIRES`) is skipped, a time ahead of this clock counts as now.
    pub fn add_revoked_at(&self, ids: &[(String, f64)]) {
        let now_unix = unix_seconds(Utc::now());
        {
            let mut inner = self.inner.locked();
            for (id, at) in ids {
                let age = Duration::try_from_secs_f64(now_unix - at).unwrap_or_default();
                if age >= REVOKE_EXPIRES {
                    continue;
                }
                let when = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
                if inner.when.insert(id.clone(), when).is_none() {
                    inner.order.push_back(id.clone());
                }
            }
            while inner.order.len() > REVOKES_MAX {
                let Some(old) = inner.order.pop_front() else { break };
                inner.when.remove(&old);
                inner.terminate.remove(&old);
            }
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// Notified on every change (the state file writer waits on it).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The ids with the Unix time they were revoked, oldest first.
    pub fn ids_with_time(&self) -> Vec<(String, f64)> {
        let now = unix_seconds(Utc::now());
        let inner = self.inner.locked();
        inner
            .order
            .iter()
            .filter_map(|id| {
                let age = inner.when.get(id)?.elapsed();
                (age < REVOKE_EXPIRES).then(|| (id.clone(), now - age.as_secs_f64()))
            })
            .collect()
    }

    /// Resolves once `id` is revoked (`terminate`: revoked with `--terminate`).
    pub async fn wait(&self, id: &str, terminate: bool) {
        let mut rx = self.changed.subscribe();
        loop {
            if self.contains(id) && (!terminate || self.terminate_requested(id)) {
                return;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

/// What the worker is doing, for inspect replies and heartbeats, and the event hooks the
/// worker calls at each step of a task. What it holds is read from the worker's [`InFlight`],
/// the one record of it; this adds the revoked set, the queues and the configuration.
pub struct WorkerState {
    pub events: Arc<Events>,
    pub revoked: Revoked,
    node: String,
    started: Instant,
    /// Run slots and prefetch budget (`pool_grow`/`pool_shrink` change them).
    pool: Arc<Pool>,
    /// Rate and time limits per task (`rate_limit`/`time_limit` change them).
    limits: Arc<TaskLimits>,
    broker_url: String,
    queues: Mutex<Vec<String>>,
    /// Bumped when add_consumer/cancel_consumer change `queues`.
    queues_changed: watch::Sender<u64>,
    in_flight: Arc<InFlight>,
    processed: AtomicU64,
    backend: Backend,
    shutdown: Shutdown,
    conf: Map<String, Value>,
}

/// How the worker is configured, for `stats` and `conf` replies.
pub struct Settings {
    pub node: String,
    pub pool: Arc<Pool>,
    pub limits: Arc<TaskLimits>,
    pub broker_url: String,
    pub queues: Vec<String>,
    pub conf: Map<String, Value>,
}

impl WorkerState {
    pub fn new(
        settings: Settings,
        in_flight: Arc<InFlight>,
        events: Arc<Events>,
        backend: Backend,
        shutdown: Shutdown,
    ) -> Arc<Self> {
        Arc::new(WorkerState {
            events,
            revoked: Revoked::default(),
            node: settings.node,
            started: Instant::now(),
            pool: settings.pool,
            limits: settings.limits,
            broker_url: settings.broker_url,
            queues: Mutex::new(settings.queues),
            queues_changed: watch::channel(0).0,
            in_flight,
            processed: AtomicU64::new(0),
            backend,
            shutdown,
            conf: settings.conf,
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Run slots and prefetch budget.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Rate and time limits per task.
    pub fn limits(&self) -> &TaskLimits {
        &self.limits
    }

    /// The queues to consume now (changed by add_consumer/cancel_consumer).
    pub fn queues(&self) -> Vec<String> {
        self.queues.locked().clone()
    }

    /// Notified when [`WorkerState::queues`] changes.
    pub fn queue_changes(&self) -> watch::Receiver<u64> {
        self.queues_changed.subscribe()
    }

    // ---- hooks the worker calls ----

    /// A task message was accepted (parsed, bound, not revoked or expired).
    pub fn received(&self, msg: &TaskMessage) {
        self.events.task_received(msg);
    }

    pub fn started(&self, msg: &TaskMessage) {
        self.processed.fetch_add(1, Ordering::Relaxed);
        self.events.task_started(&msg.id);
    }

    /// Tasks started by this process, per task name (Celery's `stats` "total").
    pub fn started_totals(&self) -> BTreeMap<String, u64> {
        self.in_flight.started_counts()
    }

    pub fn succeeded(&self, msg: &TaskMessage, result: &Value, runtime: Duration) {
        self.events.task_succeeded(&msg.id, result, runtime);
    }

    pub fn failed(&self, msg: &TaskMessage, exc: &ExceptionInfo) {
        self.events.task_failed(&msg.id, &msg.task, exc);
    }

    pub fn retried(&self, msg: &TaskMessage, exc: &ExceptionInfo) {
        self.events.task_retried(&msg.id, &msg.task, exc);
    }

    /// A message that will not run (bad arguments, unsupported canvas, unreadable headers).
    pub fn rejected(&self, task_id: &str) {
        self.events.task_rejected(task_id, false);
    }

    /// The task will not run or was stopped: revoked (`terminated` when stopped while running)
    /// or `expired`.
    pub fn revoked_task(&self, id: &str, terminated: bool, expired: bool) {
        self.events.task_revoked(id, terminated, terminated.then_some("15"), expired);
    }

    // ---- inspect replies ----

    fn info(&self, h: &Held, safe: bool) -> Value {
        let msg = &h.msg;
        let mut m = Map::new();
        m.insert("id".into(), msg.id.clone().into());
        m.insert("name".into(), msg.task.clone().into());
        // `safe` (Flower asks for it): reprs, as Python's argsrepr/kwargsrepr.
        m.insert("args".into(), if safe { args_repr(&msg.args).into() } else { Value::Array(msg.args.clone()) });
        m.insert(
            "kwargs".into(),
            if safe { kwargs_repr(&msg.kwargs).into() } else { Value::Object(msg.kwargs.clone()) },
        );
        m.insert("type".into(), msg.task.clone().into());
        m.insert("hostname".into(), self.node.clone().into());
        let (start, acked) = match h.started {
            Some(since) => (Value::from(unix_seconds(since)), true),
            None => (Value::Null, false),
        };
        m.insert("time_start".into(), start);
        m.insert("acknowledged".into(), acked.into());
        let mut delivery = Map::new();
        delivery.insert("exchange".into(), "".into());
        delivery.insert("routing_key".into(), msg.routing_key().unwrap_or(&h.queue).into());
        delivery.insert("priority".into(), msg.priority.into());
        delivery.insert("redelivered".into(), msg.redelivered.into());
        m.insert("delivery_info".into(), Value::Object(delivery));
        m.insert("worker_pid".into(), if acked { std::process::id().into() } else { Value::Null });
        Value::Object(m)
    }

    fn list(&self, safe: bool, want: impl Fn(&Phase) -> bool) -> Vec<Value> {
        let now = Utc::now();
        let mut out = Vec::new();
        self.in_flight.each(|h| {
            if want(&h.phase(now)) {
                out.push(self.info(h, safe));
            }
        });
        out
    }

    fn scheduled(&self) -> Value {
        let now = Utc::now();
        let mut out = Vec::new();
        self.in_flight.each(|h| {
            if let Phase::Scheduled { eta } = h.phase(now) {
                out.push(
                    json!({"eta": python_isoformat(eta), "priority": h.msg.priority, "request": self.info(h, false)}),
                );
            }
        });
        Value::Array(out)
    }

    fn query_task(&self, ids: &[String]) -> Value {
        let now = Utc::now();
        let mut out = Map::new();
        for id in ids {
            let found = self.in_flight.by_task_id(id, |h| {
                let state = match h.phase(now) {
                    Phase::Active { .. } => "active",
                    Phase::Reserved => "reserved",
                    // Celery 5.7's name for a task waiting for its ETA.
                    Phase::Scheduled { .. } => "scheduled",
                };
                json!([state, self.info(h, false)])
            });
            if let Some(found) = found {
                out.insert(id.clone(), found);
            }
        }
        Value::Object(out)
    }

    fn stats(&self) -> Value {
        let pid = std::process::id();
        let total: Map<String, Value> =
            self.in_flight.started_counts().into_iter().map(|(k, v)| (k, v.into())).collect();
        let (host, port, db) = match redis::Client::open(self.broker_url.as_str()) {
            Ok(c) => {
                let info = c.get_connection_info();
                let (host, port) = match info.addr() {
                    redis::ConnectionAddr::Tcp(h, p) | redis::ConnectionAddr::TcpTls { host: h, port: p, .. } => {
                        (h.clone(), *p)
                    }
                    other => (other.to_string(), 0),
                };
                (host, port, info.redis_settings().db())
            }
            Err(_) => (String::new(), 0, 0),
        };
        json!({
            "total": total,
            "pid": pid,
            "clock": self.events.clock().to_string(),
            "uptime": self.started.elapsed().as_secs(),
            "pool": {
                "implementation": "celery_autoscale:tokio",
                "max-concurrency": self.pool.slots(),
                // One entry per run slot, as Celery lists one pid per pool process (Flower
                // reads the pool size from it). Every slot is this one process, so each entry
                // is its pid.
                "processes": vec![pid; self.pool.slots() as usize],
                "max-tasks-per-child": "N/A",
                "put-guarded-by-semaphore": false,
                "timeouts": [0, 0],
            },
            "broker": {
                "hostname": host,
                "userid": null,
                "virtual_host": db.to_string(),
                "port": port,
                "insist": false,
                "ssl": self.broker_url.starts_with("rediss://"),
                "transport": "redis",
                "connect_timeout": 4,
                "transport_options": {},
                "login_method": null,
                "uri_prefix": null,
                "heartbeat": 120.0,
                "failover_strategy": "round-robin",
                "alternates": [],
            },
            "prefetch_count": self.pool.prefetch(),
            "rusage": rusage(),
        })
    }

    fn active_queues(&self) -> Value {
        let queues = self.queues();
        Value::Array(queues.iter().map(|q| queue_dict(q)).collect())
    }

    async fn revoke(&self, args: &Map<String, Value>) -> Result<Value, String> {
        let ids = pidbox::maybe_list(args.get("task_id")).ok_or_else(|| missing("revoke", "task_id"))?;
        let terminate = args.get("terminate").is_some_and(truthy);
        // Which ids this worker holds, before the revoke lets them end: the reply names them.
        let known: Vec<String> =
            ids.iter().filter(|id| self.in_flight.by_task_id(id, |_| ()).is_some()).cloned().collect();
        // Celery's order: flag, store REVOKED ("revoked"), then terminate (which stores
        // "terminated" when the task stops).
        self.revoked.add(&ids, false);
        // Celery 5.7 (`_revoke`) stores REVOKED at once, so a caller's AsyncResult sees it
        // before the ETA — from every worker that hears the broadcast, but not for a task
        // running on this worker, and only over no result or PENDING/RECEIVED/RETRY/REJECTED.
        let now = Utc::now();
        for id in &ids {
            let active_here = self.in_flight.by_task_id(id, Held::is_running);
            if active_here == Some(true) {
                continue;
            }
            let meta = ResultMeta::revoked(id, &ExceptionInfo::revoked("revoked"), now);
            if let Err(e) = self.backend.store_revoked_if_waiting(&meta).await {
                tracing::warn!(task_id = %id, error = %e, "could not store REVOKED; the task still will not run here");
            }
        }
        if terminate {
            for id in &known {
                tracing::info!(task_id = %id, "terminating task (remote revoke --terminate)");
            }
            self.revoked.add(&known, true);
            return Ok(if known.is_empty() {
                ok("terminate: tasks unknown")
            } else {
                ok(&format!("terminate: {}", known.join(", ")))
            });
        }
        tracing::info!(ids = %ids.join(", "), "tasks flagged as revoked");
        Ok(ok(&format!("tasks {} flagged as revoked", pyrepr::set_repr(&ids))))
    }

    fn set_queue(&self, args: &Map<String, Value>, method: &str, add: bool) -> Result<Value, String> {
        let queue = args.get("queue").and_then(Value::as_str).filter(|q| !q.trim().is_empty());
        let queue = queue.ok_or_else(|| missing(method, "queue"))?.trim().to_owned();
        let changed = {
            let mut qs = self.queues.locked();
            let had = qs.contains(&queue);
            if add && !had {
                qs.push(queue.clone());
                true
            } else if !add && had && qs.len() > 1 {
                qs.retain(|q| *q != queue);
                true
            } else {
                false
            }
        };
        if changed {
            tracing::info!(queue, add, "queues changed by remote control");
            self.queues_changed.send_modify(|v| *v += 1);
        }
        Ok(if add { ok(&format!("add consumer {queue}")) } else { ok(&format!("no longer consuming from {queue}")) })
    }

    /// Run one command; `Ok(None)` means no reply (shutdown), `Err` is the message of the
    /// Python exception the handler would raise.
    async fn call(&self, method: &str, args: &Map<String, Value>) -> Result<Option<Value>, String> {
        let reply = match method {
            "ping" => ok("pong"),
            "stats" => self.stats(),
            "active" | "dump_active" => {
                Value::Array(self.list(args.get("safe").is_some_and(truthy), |p| matches!(p, Phase::Active { .. })))
            }
            "reserved" | "dump_reserved" => Value::Array(self.list(false, |p| *p == Phase::Reserved)),
            "scheduled" | "dump_schedule" => self.scheduled(),
            "registered" | "dump_tasks" => self.registered(args),
            "active_queues" => self.active_queues(),
            "query_task" => self.query_task(&pidbox::maybe_list(args.get("ids")).unwrap_or_default()),
            "revoked" | "dump_revoked" => json!(self.revoked.ids()),
            "revoke" => self.revoke(args).await?,
            "terminate" => {
                let mut a = args.clone();
                a.insert("terminate".into(), true.into());
                self.revoke(&a).await?
            }
            "shutdown" => {
                tracing::warn!("Got shutdown from remote");
                self.shutdown.advance(Stage::Graceful);
                return Ok(None);
            }
            "rate_limit" => self.rate_limit(args)?,
            "time_limit" => self.time_limit(args)?,
            "pool_grow" => self.resize_pool(args, true)?,
            "pool_shrink" => self.resize_pool(args, false)?,
            "add_consumer" => self.set_queue(args, method, true)?,
            "cancel_consumer" => self.set_queue(args, method, false)?,
            "enable_events" => ok(if self.events.set_task_events(true) {
                "task events already enabled"
            } else {
                "task events enabled"
            }),
            "disable_events" => ok(if self.events.set_task_events(false) {
                "task events disabled"
            } else {
                "task events already disabled"
            }),
            "clock" => json!({"clock": self.events.clock()}),
            "conf" | "dump_conf" => Value::Object(self.conf.clone()),
            "hello" => {
                let from = args.get("from_node").and_then(Value::as_str).ok_or_else(|| missing(method, "from_node"))?;
                if from == self.node {
                    Value::Null
                } else {
                    if let Some(ids) = args.get("revoked").and_then(|r| match r {
                        Value::Object(m) => Some(m.keys().cloned().collect::<Vec<_>>()),
                        other => pidbox::maybe_list(Some(other)),
                    }) {
                        self.revoked.add(&ids, false);
                    }
                    // Celery 5.7 answers the ids only, oldest first (its peers stamp them with
                    // their own clocks), expired ones left out.
                    json!({"revoked": self.revoked.ids(), "clock": self.events.forward_clock()})
                }
            }
            // Python sends a heartbeat now and replies None; ours go out every 2 s regardless.
            "heartbeat" => Value::Null,
            _ => return Err(format!("KeyError({})", repr(&Value::String(method.to_owned())))),
        };
        Ok(Some(reply))
    }
}

impl WorkerCounts for WorkerState {
    fn active(&self) -> usize {
        self.in_flight.running()
    }

    fn processed(&self) -> u64 {
        self.processed.load(Ordering::Relaxed)
    }
}

fn ok(s: &str) -> Value {
    json!({ "ok": s })
}

fn missing(method: &str, arg: &str) -> String {
    let text = format!("{method}() missing 1 required positional argument: '{arg}'");
    format!("TypeError({})", repr(&Value::String(text)))
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => matches!(s.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"),
        _ => false,
    }
}

/// kombu's `Queue.as_dict(recurse=True)` for a queue bound to its direct exchange.
fn queue_dict(q: &str) -> Value {
    json!({
        "name": q,
        "exchange": {"name": q, "type": "direct", "arguments": null, "durable": true, "passive": false,
                     "auto_delete": false, "delivery_mode": null, "no_declare": false},
        "routing_key": q,
        "queue_arguments": null,
        "binding_arguments": null,
        "consumer_arguments": null,
        "durable": true,
        "exclusive": false,
        "auto_delete": false,
        "no_ack": false,
        "alias": null,
        "bindings": [],
        "no_declare": null,
        "expires": null,
        "message_ttl": null,
        "max_length": null,
        "max_length_bytes": null,
        "max_priority": null,
    })
}

/// `resource.getrusage(RUSAGE_SELF)` fields Celery reports, from /proc (Linux); zeros elsewhere.
fn rusage() -> Value {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    let (minflt, majflt, utime, stime) = (field(7), field(9), field(11) / 100.0, field(12) / 100.0);
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    json!({
        "utime": utime, "stime": stime, "maxrss": kb("VmHWM:"), "ixrss": 0, "idrss": 0, "isrss": 0,
        "minflt": minflt as u64, "majflt": majflt as u64, "nswap": 0, "inblock": 0, "oublock": 0,
        "msgsnd": 0, "msgrcv": 0, "nsignals": 0,
        "nvcsw": kb("voluntary_ctxt_switches:"), "nivcsw": kb("nonvoluntary_ctxt_switches:"),
    })
}

/// kombu's `match(hostname, pattern, matcher)`: glob or pcre.
fn matches(node: &str, pattern: &str, matcher: &str) -> bool {
    match matcher {
        "pcre" => regex::Regex::new(pattern).is_ok_and(|re| re.is_match(node)),
        _ => {
            let re = format!("^{}$", regex::escape(pattern).replace("\\*", ".*").replace("\\?", "."));
            regex::Regex::new(&re).is_ok_and(|re| re.is_match(node))
        }
    }
}

/// Consume the pidbox until shutdown begins, answering what is addressed to this node.
///
/// The subscription is health-checked as kombu checks its connections: every `check_every` a
/// `PING` goes down it, and an answer must come back within `check_every` (as must the
/// subscription itself). A connection that fails, ends or stops answering — a half-open socket
/// that a frozen proxy or a dead NAT leaves behind looks healthy to the kernel for a long time —
/// is dropped and the channel subscribed anew, with backoff. `health` says whether the
/// subscription works (for `/readyz`).
pub async fn serve(state: Arc<WorkerState>, broker: Conn, health: Arc<Health>, check_every: Duration) {
    let channel = keys::fanout_channel(broker.db(), keys::PIDBOX_EXCHANGE, None);
    let mut backoff = Backoff::default();
    let mut complaints = RateLimit::default();
    loop {
        let subscribe = async {
            let (mut sink, stream) = broker.pubsub().await?.split();
            // kombu subscribes with PSUBSCRIBE (its fanout_patterns); the name has no wildcard.
            sink.psubscribe(&channel).await?;
            Ok::<_, redis::RedisError>((sink, stream))
        };
        let subscribed = tokio::select! {
            s = tokio::time::timeout(check_every, subscribe) => s.unwrap_or_else(|_| Err(timed_out("subscribing to the pidbox"))),
            () = state.shutdown.reached(Stage::Graceful) => return,
        };
        let (mut sink, mut messages) = match subscribed {
            Ok(s) => s,
            Err(e) => {
                health.report_failure(&e, "subscribe to remote control (pidbox)");
                tokio::select! {
                    () = tokio::time::sleep(backoff.next_delay()) => continue,
                    () = state.shutdown.reached(Stage::Graceful) => return,
                }
            }
        };
        health.set_connected();
        backoff = Backoff::default();
        tracing::debug!(channel, node = %state.node, "pidbox listening");
        let mut check = tokio::time::interval_at(tokio::time::Instant::now() + check_every, check_every);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let msg = tokio::select! {
                m = messages.next() => m,
                _ = check.tick() => {
                    let pong = tokio::time::timeout(check_every, sink.ping::<redis::Value>()).await;
                    match pong.unwrap_or_else(|_| Err(timed_out("health-checking the pidbox subscription"))) {
                        Ok(_) => {
                            health.set_connected();
                            continue;
                        }
                        Err(e) => {
                            health.report_failure(&e, "health-check the remote-control (pidbox) subscription; subscribing anew");
                            break;
                        }
                    }
                }
                () = state.shutdown.reached(Stage::Graceful) => return,
            };
            let Some(msg) = msg else {
                let e: redis::RedisError =
                    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "the subscription ended").into();
                health.report_failure(&e, "listen for remote control (pidbox); subscribing anew");
                break;
            };
            let bytes: &[u8] = msg.get_payload_bytes();
            match pidbox::read_request(bytes) {
                Ok(req) => state.handle(req, &broker).await,
                Err(why) => {
                    if complaints.allow() {
                        tracing::warn!(
                            reason = %why,
                            "ignored a malformed remote-control message on {channel} (further ones are logged at most every 10 s)"
                        );
                    }
                }
            }
        }
    }
}

/// At most one log line per 10 s for a repeated complaint.
#[derive(Default)]
struct RateLimit(Option<Instant>);

impl RateLimit {
    fn allow(&mut self) -> bool {
        if self.0.is_some_and(|t| t.elapsed() < Duration::from_secs(10)) {
            return false;
        }
        self.0 = Some(Instant::now());
        true
    }
}

impl WorkerState {
    fn addressed_to_me(&self, req: &Request) -> bool {
        match (&req.destination, &req.pattern) {
            (Some(d), _) if !d.is_empty() => d.contains(&self.node),
            (_, Some((pattern, matcher))) => matches(&self.node, pattern, matcher),
            _ => true,
        }
    }

    async fn handle(&self, req: Request, replies: &Conn) {
        self.events.adjust_clock(req.clock);
        self.events.forward_clock();
        if !self.addressed_to_me(&req) {
            return;
        }
        tracing::debug!(method = %req.method, "pidbox command");
        let reply = match self.call(&req.method, &req.arguments).await {
            Ok(Some(v)) => v,
            Ok(None) => return,
            Err(exc) => {
                tracing::warn!(method = %req.method, "pidbox command error: {exc}");
                json!({ "error": exc })
            }
        };
        let Some((exchange, routing_key)) = req.reply_to else { return };
        if let Err(e) = self.reply(replies, &exchange, &routing_key, req.ticket.as_deref(), reply).await {
            tracing::debug!(error = %e, "pidbox reply not delivered");
        }
    }

    /// kombu's `_publish_reply`: a direct-exchange publish routed through the exchange's
    /// binding set to each bound queue.
    async fn reply(
        &self,
        conn: &Conn,
        exchange: &str,
        routing_key: &str,
        ticket: Option<&str>,
        reply: Value,
    ) -> redis::RedisResult<()> {
        let mut conn = conn.clone();
        let members: Vec<Vec<u8>> = conn.smembers(keys::binding_set(exchange)).await?;
        let members: Vec<std::borrow::Cow<'_, str>> = members.iter().map(|m| String::from_utf8_lossy(m)).collect();
        let queues: Vec<&str> = members
            .iter()
            .filter_map(|m| keys::Binding::parse(m))
            .filter(|b| b.routes(routing_key))
            .map(|b| b.queue)
            .collect();
        if queues.is_empty() {
            return Ok(()); // nobody waits for this reply any more
        }
        let bytes =
            pidbox::reply_message(&self.node, exchange, routing_key, ticket, self.events.forward_clock(), reply);
        for q in queues {
            conn.lpush::<_, _, i64>(keys::queue_key(q), &bytes).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_follow_celery() {
        assert_eq!(node_name(None, "pod-1"), "celery@pod-1");
        assert_eq!(node_name(Some("w1@box"), "pod-1"), "w1@box");
        assert_eq!(node_name(Some("box"), "pod-1"), "celery@box");
        assert_eq!(node_name(Some("w1@%h"), "pod-1.ns"), "w1@pod-1.ns");
        assert_eq!(node_name(Some("w%n@%d"), "pod-1.ns"), "wpod-1@ns");
        assert_eq!(node_name(Some(""), "h"), "celery@h");
    }

    #[test]
    fn glob_and_pcre() {
        assert!(matches("celery@a1", "celery@a*", "glob"));
        assert!(!matches("celery@b1", "celery@a*", "glob"));
        assert!(matches("celery@a1", "^celery@a\\d$", "pcre"));
    }

    #[test]
    fn revoke_reply_prints_a_python_set() {
        assert_eq!(pyrepr::set_repr(&["b".into(), "a".into()]), "{'a', 'b'}");
        assert_eq!(pyrepr::set_repr(&[]), "set()");
        assert_eq!(
            missing("revoke", "task_id"),
            "TypeError(\"revoke() missing 1 required positional argument: 'task_id'\")"
        );
    }

    #[test]
    fn revoked_set_is_bounded() {
        let r = Revoked::default();
        let ids: Vec<String> = (0..REVOKES_MAX + 10).map(|i| i.to_string()).collect();
        r.add(&ids, false);
        assert!(!r.contains("0"));
        assert!(r.contains(&(REVOKES_MAX + 9).to_string()));
        assert_eq!(r.ids().len(), REVOKES_MAX);
    }
}
