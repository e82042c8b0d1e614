//! Celery events, as a Python worker started with `-E` sends them (tests/fixtures/celery/events):
//! kombu's Redis fanout, i.e. `PUBLISH /{db}.celeryev/<routing key>` of a kombu envelope whose
//! base64 body is the event JSON. Worker events (`worker-online`, `worker-heartbeat` every 2 s,
//! `worker-offline`) go out one per message on `worker.<kind>`; task events are batched under
//! `task.multi` as a JSON list, as Celery's buffered dispatcher does.
//!
//! Like Celery, worker events are always sent (Flower and `celery events` see the worker), task
//! events only with `--events` or after a remote `enable_events`. Events are transient (delivery
//! mode 1): when Redis is away they are dropped, never queued without bound, and never slow a
//! task down — the hot path only formats a map and hands it to a bounded channel.

use crate::transport::connection::Conn;
use crate::wire::keys;
use crate::wire::kombu;
use crate::wire::pyrepr::{args_repr, exception_repr, kwargs_repr, repr};
use crate::wire::time::{python_isoformat, unix_seconds};
use crate::wire::{ExceptionInfo, TaskMessage};
use chrono::Utc;
use redis::AsyncCommands;
use serde::Serialize;
use serde_json::{Map, Value};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};

/// Seconds between heartbeats (Celery's default `freq`); Flower marks a worker offline after
/// missing a few.
pub const HEARTBEAT_FREQ: f64 = 2.0;
/// Identifies this worker's software in worker events (Celery sends `py-celery`).
pub const SW_IDENT: &str = "celery-autoscale";
pub const SW_VER: &str = env!("CARGO_PKG_VERSION");
/// Task events waiting to be published; beyond this they are dropped (events are best-effort).
const BUFFER: usize = 8192;
/// Most task events in one `task.multi` message.
const MAX_BATCH: usize = 256;
/// How long the first task event of a batch may wait for company.
const LINGER: Duration = Duration::from_millis(50);

/// Counts a worker reports in its worker events.
pub trait WorkerCounts: Send + Sync {
    /// Tasks running now.
    fn active(&self) -> usize;
    /// Tasks started since the worker started.
    fn processed(&self) -> u64;
}

/// The event dispatcher of one worker node.
pub struct Events {
    conn: Conn,
    db: i64,
    node: String,
    pid: u32,
    utcoffset: f64,
    clock: AtomicU64,
    task_events: AtomicBool,
    queue: mpsc::Sender<Map<String, Value>>,
    /// The worker asked for `worker-offline` and the end of the loop.
    stop: Notify,
    dropped: AtomicU64,
}

/// The receiving half, driven by [`Events::run`].
pub struct Pending(mpsc::Receiver<Map<String, Value>>);

impl Events {
    /// A dispatcher for node `node` on the broker `conn` (its db number names the channels, as
    /// kombu's `fanout_prefix` does).
    pub fn new(conn: Conn, node: &str, task_events: bool) -> (Arc<Events>, Pending) {
        let db = conn.db();
        let (tx, rx) = mpsc::channel(BUFFER);
        let events = Events {
            conn,
            db,
            node: node.to_owned(),
            pid: std::process::id(),
            utcoffset: utcoffset(),
            clock: AtomicU64::new(0),
            task_events: AtomicBool::new(task_events),
            queue: tx,
            stop: Notify::new(),
            dropped: AtomicU64::new(0),
        };
        (Arc::new(events), Pending(rx))
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Advance the Lamport clock (Celery's `app.clock.forward()`).
    pub fn forward_clock(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Merge a clock value seen on a message (`LamportClock.adjust`).
    pub fn adjust_clock(&self, other: u64) -> u64 {
        let mut cur = self.clock.load(Ordering::Relaxed);
        loop {
            let next = cur.max(other) + 1;
            match self.clock.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return next,
                Err(seen) => cur = seen,
            }
        }
    }

    pub fn clock(&self) -> u64 {
        self.clock.load(Ordering::Relaxed)
    }

    pub fn task_events_enabled(&self) -> bool {
        self.task_events.load(Ordering::Relaxed)
    }

    /// Turn task events on or off (remote `enable_events`/`disable_events`); returns the old value.
    pub fn set_task_events(&self, on: bool) -> bool {
        self.task_events.swap(on, Ordering::Relaxed)
    }

    /// The fields every event starts with, in Celery's order.
    fn head(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("hostname".into(), self.node.clone().into());
        m.insert("utcoffset".into(), self.utcoffset.into());
        m.insert("pid".into(), self.pid.into());
        m.insert("clock".into(), self.forward_clock().into());
        m
    }

    fn tail(m: &mut Map<String, Value>, kind: &str) {
        m.insert("timestamp".into(), unix_seconds(Utc::now()).into());
        m.insert("type".into(), kind.into());
    }

    /// Queue a task event (if task events are on) with `fields` after `uuid`.
    fn task(&self, kind: &'static str, uuid: &str, fields: impl FnOnce(&mut Map<String, Value>)) {
        if !self.task_events_enabled() {
            return;
        }
        let mut m = self.head();
        m.insert("uuid".into(), uuid.into());
        fields(&mut m);
        Self::tail(&mut m, kind);
        if self.queue.try_send(m).is_err() && self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                "task events are produced faster than Redis takes them; dropping some (events are best-effort, tasks are not affected)"
            );
        }
    }

    pub fn task_received(&self, msg: &TaskMessage) {
        self.task("task-received", &msg.id, |m| {
            m.insert("name".into(), msg.task.clone().into());
            m.insert("args".into(), args_repr(&msg.args).into());
            m.insert("kwargs".into(), kwargs_repr(&msg.kwargs).into());
            m.insert("root_id".into(), msg.root_id().into());
            m.insert("parent_id".into(), msg.parent_id.clone().into());
            m.insert("retries".into(), msg.retries.into());
            m.insert("eta".into(), msg.eta.map(python_isoformat).into());
            m.insert("expires".into(), msg.expires.map(python_isoformat).into());
        });
    }

    pub fn task_started(&self, id: &str) {
        self.task("task-started", id, |_| {});
    }

    pub fn task_succeeded(&self, id: &str, result: &Value, runtime: Duration) {
        self.task("task-succeeded", id, |m| {
            m.insert("result".into(), repr(result).into());
            m.insert("runtime".into(), runtime.as_secs_f64().into());
        });
    }

    pub fn task_failed(&self, id: &str, task: &str, exc: &ExceptionInfo) {
        self.task("task-failed", id, |m| {
            m.insert("exception".into(), exception_repr(exc).into());
            m.insert("traceback".into(), exc.traceback(task).into());
        });
    }

    pub fn task_retried(&self, id: &str, task: &str, exc: &ExceptionInfo) {
        self.task("task-retried", id, |m| {
            m.insert("exception".into(), exception_repr(exc).into());
            m.insert("traceback".into(), exc.traceback(task).into());
        });
    }

    pub fn task_rejected(&self, id: &str, requeue: bool) {
        self.task("task-rejected", id, |m| {
            m.insert("requeue".into(), requeue.into());
        });
    }

    /// `signum` is the signal name's number as Celery sends it (a string, e.g. "15"), or None.
    pub fn task_revoked(&self, id: &str, terminated: bool, signum: Option<&str>, expired: bool) {
        self.task("task-revoked", id, |m| {
            m.insert("terminated".into(), terminated.into());
            m.insert("signum".into(), signum.map(str::to_owned).into());
            m.insert("expired".into(), expired.into());
        });
    }

    fn worker_event(&self, kind: &str, counts: &dyn WorkerCounts) -> Map<String, Value> {
        let mut m = self.head();
        m.insert("freq".into(), HEARTBEAT_FREQ.into());
        m.insert("active".into(), counts.active().into());
        m.insert("processed".into(), counts.processed().into());
        m.insert("loadavg".into(), Value::Array(loadavg().into_iter().map(Value::from).collect()));
        m.insert("sw_ident".into(), SW_IDENT.into());
        m.insert("sw_ver".into(), SW_VER.into());
        m.insert("sw_sys".into(), std::env::consts::OS.replace("linux", "Linux").into());
        Self::tail(&mut m, kind);
        m
    }

    /// Publish one kombu fanout message; failures are logged at debug level only (the broker
    /// health is reported by the task path).
    async fn publish(&self, routing_key: &str, body: &Value) -> bool {
        let envelope = self.envelope(routing_key, body);
        let channel = keys::fanout_channel(self.db, keys::EVENT_EXCHANGE, Some(routing_key));
        match self.conn.clone().publish::<_, _, i64>(channel, envelope).await {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(error = %e, routing_key, "event not published (Redis unavailable)");
                false
            }
        }
    }

    /// The kombu message carrying `body` (an event or a list of them).
    fn envelope(&self, routing_key: &str, body: &Value) -> Vec<u8> {
        kombu::exchange_message(body, HeadersOut { hostname: &self.node }, keys::EVENT_EXCHANGE, routing_key)
    }

    /// Ask [`Events::run`] to send `worker-offline` and return.
    pub fn finish(&self) {
        self.stop.notify_one();
    }

    /// Send `worker-online`, then task events as they come and a heartbeat every
    /// [`HEARTBEAT_FREQ`] seconds, until [`Events::finish`]: then the remaining task events and
    /// `worker-offline`.
    pub async fn run(self: Arc<Self>, pending: Pending, counts: Arc<dyn WorkerCounts>) {
        let Pending(mut rx) = pending;
        self.publish("worker.online", &Value::Object(self.worker_event("worker-online", &*counts))).await;
        let period = Duration::from_secs_f64(HEARTBEAT_FREQ);
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                n = rx.recv_many(&mut batch, MAX_BATCH) => {
                    if n > 0 {
                        Self::gather(&mut rx, &mut batch).await;
                        self.publish_tasks(&mut batch).await;
                    }
                }
                _ = beat.tick() => {
                    self.publish("worker.heartbeat", &Value::Object(self.worker_event("worker-heartbeat", &*counts))).await;
                }
                () = self.stop.notified() => break,
            }
        }
        while rx.recv_many(&mut batch, MAX_BATCH).now_or_never_nonzero() {
            self.publish_tasks(&mut batch).await;
        }
        self.publish("worker.offline", &Value::Object(self.worker_event("worker-offline", &*counts))).await;
    }

    /// Add what arrives within [`LINGER`] (up to [`MAX_BATCH`]): at thousands of tasks a second
    /// one PUBLISH per event would add a Redis command per event; batched, events cost the
    /// worker little (docs/Performance.md, "Events").
    async fn gather(rx: &mut mpsc::Receiver<Map<String, Value>>, batch: &mut Vec<Map<String, Value>>) {
        let deadline = tokio::time::sleep(LINGER);
        tokio::pin!(deadline);
        while batch.len() < MAX_BATCH {
            tokio::select! {
                n = rx.recv_many(batch, MAX_BATCH - batch.len()) => if n == 0 { break },
                () = &mut deadline => break,
            }
        }
    }

    async fn publish_tasks(&self, batch: &mut Vec<Map<String, Value>>) {
        let body = Value::Array(batch.drain(..).map(Value::Object).collect());
        self.publish("task.multi", &body).await;
    }
}

/// `recv_many` without waiting: true when it returned events.
trait NowOrNever {
    fn now_or_never_nonzero(self) -> bool;
}

impl<F: std::future::Future<Output = usize>> NowOrNever for F {
    fn now_or_never_nonzero(self) -> bool {
        futures::FutureExt::now_or_never(self).is_some_and(|n| n > 0)
    }
}

/// Celery's `utcoffset()`: hours west of UTC, as Python's `time.timezone // 3600`.
fn utcoffset() -> f64 {
    let east = chrono::Local::now().offset().local_minus_utc();
    // `+ 0.0` turns UTC's -0.0 into the 0.0 Python sends.
    (-f64::from(east) / 3600.0).floor() + 0.0
}

/// `os.getloadavg()` rounded to 2 places, as Celery reports it.
fn loadavg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut out = [0.0; 3];
    for (slot, field) in out.iter_mut().zip(text.split_whitespace()) {
        *slot = field.parse::<f64>().map(|v| (v * 100.0).round() / 100.0).unwrap_or(0.0);
    }
    out
}

/// The headers of an event's kombu envelope (fixture e02).
#[derive(Serialize)]
struct HeadersOut<'a> {
    hostname: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as B64;

    /// Events for `node` on a connection that is never used (nothing listens on port 1).
    fn unconnected(node: &str) -> (Arc<Events>, Pending) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let url = "redis://127.0.0.1:1/0";
            let conn = crate::transport::connection::connect("BROKER_URL", url, None, Duration::from_secs(1)).unwrap();
            Events::new(conn, node, false)
        })
    }

    /// Key order and types of envelope and body as in the capture of a Python worker (e02).
    #[test]
    fn worker_online_is_shaped_like_pythons() {
        struct Idle;
        impl WorkerCounts for Idle {
            fn active(&self) -> usize {
                0
            }
            fn processed(&self) -> u64 {
                0
            }
        }
        let (ev, _p) = unconnected("evw@vm");
        let body = Value::Object(ev.worker_event("worker-online", &Idle));
        let ours: Value = serde_json::from_slice(&ev.envelope("worker.online", &body)).unwrap();
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/celery/events/e02__0.celeryev_worker.online.worker-online.json"
        );
        let theirs: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let shape = |v: &Value| -> Vec<(String, &'static str)> {
            fn kind(v: &Value) -> &'static str {
                match v {
                    Value::Null => "null",
                    Value::Bool(_) => "bool",
                    Value::Number(n) if n.is_f64() => "float",
                    Value::Number(_) => "int",
                    Value::String(_) => "str",
                    Value::Array(_) => "list",
                    Value::Object(_) => "dict",
                }
            }
            v.as_object().unwrap().iter().map(|(k, v)| (k.clone(), kind(v))).collect()
        };
        assert_eq!(shape(&ours), shape(&theirs));
        assert_eq!(shape(&ours["properties"]), shape(&theirs["properties"]));
        assert_eq!(ours["properties"]["delivery_info"], theirs["properties"]["delivery_info"]);
        assert_eq!(ours["headers"], theirs["headers"]);
        let decode =
            |v: &Value| -> Value { serde_json::from_slice(&B64.decode(v["body"].as_str().unwrap()).unwrap()).unwrap() };
        assert_eq!(shape(&decode(&ours)), shape(&decode(&theirs)));
    }

    #[test]
    fn clock_is_lamport() {
        let (ev, _p) = unconnected("celery@x");
        assert_eq!(ev.forward_clock(), 1);
        assert_eq!(ev.adjust_clock(10), 11);
        assert_eq!(ev.adjust_clock(3), 12);
    }
}
