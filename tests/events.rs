//! Events: Celery's own `EventReceiver` (tests/python/events.py, what Flower and `celery events`
//! use) receives every event kind from our worker, with the field names a Python worker sends.
//! The reference is Python itself: the captures in tests/fixtures/celery/events (a Python 5.7
//! worker with -E) and a Python worker run in this test for the kinds those lack.

mod common;

use common::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

type Fields = BTreeMap<String, BTreeSet<String>>;

fn keys(e: &Value) -> BTreeSet<String> {
    e.as_object().unwrap().keys().cloned().collect()
}

/// Field names per event type; the receiver adds `local_received` (and Celery's State adds
/// nothing here), so it is part of both sides.
fn by_type(events: &[Value], host: &str) -> Fields {
    let mut out = Fields::new();
    for e in events.iter().filter(|e| e["hostname"] == host) {
        out.entry(e["type"].as_str().unwrap().to_owned()).or_default().extend(keys(e));
    }
    out
}

/// The captured Python events: the kombu envelope's base64 body, a JSON event or a list.
fn captured() -> Fields {
    let mut out = Fields::new();
    for entry in std::fs::read_dir(fixtures().join("events")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.contains("celeryev") {
            continue;
        }
        let env: Value = serde_json::from_slice(&read(&path)).unwrap();
        use base64::Engine as _;
        let body = base64::engine::general_purpose::STANDARD.decode(env["body"].as_str().unwrap()).unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        let list = if body.is_array() { body.as_array().unwrap().clone() } else { vec![body] };
        for e in list {
            let mut k = keys(&e);
            k.insert("local_received".into()); // added by the receiver on arrival
            out.entry(e["type"].as_str().unwrap().to_owned()).or_default().extend(k);
        }
    }
    out
}

fn send(redis: &Redis, spec: Value) -> Vec<String> {
    let ids = python_client(redis, "send", &spec, WAIT);
    ids.as_array().unwrap().iter().map(|i| i.as_str().unwrap().to_owned()).collect()
}

/// The task calls both workers get: a success, a TypeError failure, a retry then success, and a
/// long task that is terminated (task-revoked).
fn workload(redis: &Redis, log: &EventLog, node: &str) {
    send(
        redis,
        json!([{"task": "tasks.cpu_bound", "args": [100]},
               {"task": "tasks.cpu_bound", "args": ["x"]},
               {"task": "tasks.flaky", "args": [1], "kwargs": {"countdown": 0.1}}]),
    );
    let long = send(redis, json!([{"task": "tasks.io_bound", "args": [600]}])).remove(0);
    log.wait("task-started of the long task", WAIT, |e| e["type"] == "task-started" && e["uuid"] == long.as_str());
    log.wait("task-retried", WAIT, |e| e["type"] == "task-retried");
    let (ok, out) = celery_cli(redis, &["control", "terminate", "SIGTERM", &long, "-d", node, "--timeout", "5"], WAIT);
    assert!(ok, "{out}");
    log.wait("task-revoked", WAIT, |e| e["type"] == "task-revoked" && e["uuid"] == long.as_str());
    log.wait("task-failed", WAIT, |e| e["type"] == "task-failed");
    wait_for("two task-succeeded", WAIT, || {
        (log.events().iter().filter(|e| e["type"] == "task-succeeded" && e["hostname"] == node).count() >= 2)
            .then_some(())
    });
}

#[test]
fn celerys_event_receiver_sees_every_event_kind_with_python_field_names() {
    // The Python reference for the kinds the captures lack (failed, retried, revoked).
    let mut reference = captured();
    {
        let redis = Redis::start();
        let log = EventLog::start(&redis, 600);
        let py = PythonWorker::start(&redis, &["-E", "-n", "py1@testhost", "-c", "2"], &[]);
        workload(&redis, &log, "py1@testhost");
        for (kind, fields) in by_type(&log.events(), "py1@testhost") {
            reference.entry(kind).or_default().extend(fields);
        }
        drop(py);
    }
    // task-rejected is sent only by tasks that raise Reject in Python: its fields, from
    // celery/worker/request.py (`send_event('task-rejected', requeue=requeue)`).
    let common: BTreeSet<String> =
        ["hostname", "utcoffset", "pid", "clock", "uuid", "timestamp", "type", "local_received"]
            .into_iter()
            .map(String::from)
            .collect();
    let mut rejected = common.clone();
    rejected.insert("requeue".into());
    reference.insert("task-rejected".into(), rejected);

    let redis = Redis::start();
    let log = EventLog::start(&redis, 600);
    let mut worker = Worker::start(&redis, &["--events", "--hostname", "rs1@testhost"]);
    log.wait("worker-online", WAIT, |e| e["type"] == "worker-online" && e["hostname"] == "rs1@testhost");
    workload(&redis, &log, "rs1@testhost");
    // A message whose headers cannot be used is rejected (task-rejected, requeue False).
    let t = task("tasks.io_bound", vec![json!(0)]);
    let (bytes, _) = t.to_message("gen0@tests");
    let mut env: Value = serde_json::from_slice(&bytes).unwrap();
    env["headers"]["retries"] = json!("many");
    let _: i64 = redis::cmd("LPUSH").arg("celery").arg(env.to_string()).query(&mut redis.conn(0)).unwrap();
    let rejected = log.wait("task-rejected", WAIT, |e| e["type"] == "task-rejected");
    assert_eq!(rejected["uuid"], t.id.as_str());
    assert_eq!(rejected["requeue"], false);
    log.wait("a heartbeat after the tasks", WAIT, |e| {
        e["type"] == "worker-heartbeat" && e["hostname"] == "rs1@testhost" && e["processed"].as_u64() >= Some(4)
    });
    worker.signal("TERM");
    assert!(worker.wait_exit(WAIT).success());
    log.wait("worker-offline", WAIT, |e| e["type"] == "worker-offline" && e["hostname"] == "rs1@testhost");

    let ours = by_type(&log.events(), "rs1@testhost");
    let kinds = [
        "worker-online",
        "worker-heartbeat",
        "worker-offline",
        "task-received",
        "task-started",
        "task-succeeded",
        "task-failed",
        "task-retried",
        "task-rejected",
        "task-revoked",
    ];
    for kind in kinds {
        let want = reference.get(kind).unwrap_or_else(|| panic!("no Python reference for {kind}"));
        let got = ours.get(kind).unwrap_or_else(|| panic!("our worker sent no {kind}; got {:?}", ours.keys()));
        assert_eq!(got, want, "{kind}: our fields vs Python's");
    }

    // Types and values Flower relies on.
    let events = log.events();
    let ours: Vec<&Value> = events.iter().filter(|e| e["hostname"] == "rs1@testhost").collect();
    let beat = ours.iter().rfind(|e| e["type"] == "worker-heartbeat").unwrap();
    assert_eq!(beat["freq"], 2.0);
    assert!(beat["loadavg"].as_array().unwrap().len() == 3 && beat["utcoffset"].is_number(), "{beat}");
    let ok = ours.iter().find(|e| e["type"] == "task-succeeded" && e["result"] == "25").expect("cpu_bound(100) = 25");
    assert!(ok["runtime"].as_f64().unwrap() >= 0.0);
    let received = ours.iter().find(|e| e["type"] == "task-received" && e["name"] == "tasks.cpu_bound").unwrap();
    assert_eq!(received["args"], "[100]");
    let failed = ours.iter().find(|e| e["type"] == "task-failed").unwrap();
    assert!(failed["exception"].as_str().unwrap().starts_with("TypeError("), "{failed}");
    let revoked = ours.iter().find(|e| e["type"] == "task-revoked").unwrap();
    assert_eq!(revoked["terminated"], true);
    // Lamport clock: every event of a sender has its own tick.
    let clocks: BTreeSet<u64> = ours.iter().map(|e| e["clock"].as_u64().unwrap()).collect();
    assert_eq!(clocks.len(), ours.len(), "clock values repeat");
}

#[test]
fn without_events_only_worker_events_are_sent() {
    let redis = Redis::start();
    let log = EventLog::start(&redis, 120);
    let worker = Worker::start(&redis, &["--hostname", "quiet@testhost"]);
    let ids = enqueue(&redis, &[task("tasks.io_bound", vec![json!(0)])]);
    wait_all(&redis, &ids, "SUCCESS", WAIT);
    let beat = log.wait("a heartbeat", WAIT, |e| e["type"] == "worker-heartbeat" && e["processed"] == 1);
    assert_eq!(beat["hostname"], "quiet@testhost");
    assert!(
        log.events().iter().all(|e| !e["type"].as_str().unwrap().starts_with("task-")),
        "task events sent without --events"
    );
    drop(worker);
}
