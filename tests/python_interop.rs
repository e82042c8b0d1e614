//! Real Python Celery on both sides of our worker: `send_task` → our worker →
//! `AsyncResult.get()`, for every header that changes behaviour.

mod common;

use common::{Redis, Worker, python_client};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn run(redis: &Redis, spec: Value) -> Vec<Value> {
    let out = python_client(redis, "run", &spec, Duration::from_secs(120));
    out.as_array().expect("a list of outcomes").clone()
}

fn ok(o: &Value) -> &Value {
    assert_eq!(o["ok"], true, "expected success, got {o}");
    &o["value"]
}

fn err(o: &Value) -> (String, String) {
    assert_eq!(o["ok"], false, "expected an exception, got {o}");
    (o["exc_module"].as_str().unwrap().to_owned(), o["exc_type"].as_str().unwrap().to_owned())
}

#[test]
fn python_clients_get_values_and_exceptions_from_our_worker() {
    let redis = Redis::start();
    let worker = Worker::start(&redis, &["--concurrency", "4"]);
    let out = run(
        &redis,
        json!([
            {"task": "tasks.cpu_bound", "args": [10000]},
            {"task": "tasks.cpu_bound", "kwargs": {"n": 100}},
            {"task": "tasks.io_bound", "args": [0.2]},
            {"task": "tasks.io_bound", "kwargs": {"seconds": 1}},
            {"task": "tasks.cpu_bound", "args": ["ten"]},
            {"task": "tasks.io_bound", "args": [1, 2]},
            {"task": "tasks.io_bound", "args": [-1]},
            {"task": "rust.unknown_task", "args": [1]},
            {"task": "tasks.cpu_bound", "args": [1_000_000_000_000_i64], "options": {"time_limit": 0.5}},
            {"task": "tasks.io_bound", "args": [30], "options": {"soft_time_limit": 0.3, "time_limit": 5}},
            {"task": "tasks.flaky", "args": [2], "kwargs": {"countdown": 0.2}},
            {"task": "tasks.flaky", "args": [10], "kwargs": {"countdown": 0}},
        ]),
    );
    assert_eq!(ok(&out[0]), &json!(1229));
    assert_eq!(ok(&out[1]), &json!(25));
    assert_eq!(ok(&out[2]), &json!(0.2));
    assert_eq!(ok(&out[3]), &json!(1), "io_bound returns its argument as given");
    assert_eq!(err(&out[4]), ("builtins".into(), "TypeError".into()));
    assert_eq!(out[4]["exc_args"], json!(["cpu_bound() argument 'n' must be int, not str"]));
    assert_eq!(err(&out[5]), ("builtins".into(), "TypeError".into()));
    assert_eq!(err(&out[6]), ("builtins".into(), "TypeError".into()), "negative sleep is rejected as a bad argument");
    assert_eq!(err(&out[7]), ("celery.exceptions".into(), "NotRegistered".into()));
    assert_eq!(err(&out[8]), ("billiard.exceptions".into(), "TimeLimitExceeded".into()));
    assert_eq!(err(&out[9]), ("billiard.exceptions".into(), "SoftTimeLimitExceeded".into()));
    assert_eq!(ok(&out[10]), &json!(2), "retried twice through RETRY, then SUCCESS");
    assert_eq!(err(&out[11]), ("builtins".into(), "RuntimeError".into()), "max_retries (3) reached");

    assert_eq!(worker.metric("celery_task_success_total", "tasks.cpu_bound"), 2.0);
    assert_eq!(worker.metric("celery_task_failure_total", "tasks.cpu_bound"), 1.0);
    assert_eq!(worker.metric("celery_task_retried_total", "tasks.flaky"), 5.0);
    assert_eq!(worker.metric("celery_task_rejected_total", "reason=\"bad_arguments\""), 3.0);
    assert_eq!(worker.metric("celery_task_rejected_total", "reason=\"unknown_task\""), 1.0);
    assert_eq!(worker.metric("celery_task_duration_seconds_count", "tasks.io_bound"), 3.0);
    assert_eq!(redis.unacked(), 0, "everything acknowledged");
}

#[test]
fn eta_expires_ignore_result_and_priorities_are_honoured() {
    let redis = Redis::start();
    let worker = Worker::start(&redis, &["--concurrency", "2"]);
    let soon =
        (chrono::Utc::now() + chrono::Duration::seconds(2)).naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string();
    let started = Instant::now();
    let out = run(
        &redis,
        json!([
            {"task": "tasks.io_bound", "args": [0], "options": {"countdown": 1.5}},
            {"task": "tasks.io_bound", "args": [0], "options": {"eta": soon}},
            {"task": "tasks.cpu_bound", "args": [10], "options": {"expires": "2020-01-01T00:00:00+00:00"}},
            {"task": "tasks.cpu_bound", "args": [10], "options": {"expires": 300}},
        ]),
    );
    assert!(started.elapsed() >= Duration::from_millis(1900), "a naive ETA is UTC and was waited for");
    assert_eq!(ok(&out[0]), &json!(0));
    assert_eq!(ok(&out[1]), &json!(0));
    let (_, exc) = err(&out[2]);
    assert_eq!((exc.as_str(), out[2]["state"].as_str()), ("TaskRevokedError", Some("REVOKED")));
    assert_eq!(ok(&out[3]), &json!(4));

    // ignore_result: nothing stored; a later task still works.
    let ids = python_client(
        &redis,
        "send",
        &json!([{"task": "tasks.cpu_bound", "args": [10], "options": {"ignore_result": true}}]),
        Duration::from_secs(30),
    );
    let id = ids[0].as_str().unwrap().to_owned();
    common::wait_for("ignored task to run", Duration::from_secs(10), || {
        (redis.unacked() == 0 && redis.depth("celery") == 0).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(redis.result(&id), None, "ignore_result stores nothing");

    // Priorities: with the worker stopped, queue low then high; high (bucket 0 on Redis…
    // i.e. priority 0) is taken first by kombu's BRPOP order.
    drop(worker);
    let ids = python_client(
        &redis,
        "send",
        &json!([
            {"task": "tasks.io_bound", "args": [0], "options": {"priority": 9}},
            {"task": "tasks.io_bound", "args": [0], "options": {"priority": 5}},
            {"task": "tasks.io_bound", "args": [0], "options": {"priority": 0}},
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(redis.depth("celery"), 3, "spread over three priority lists");
    let worker = Worker::start(&redis, &["--concurrency", "1"]);
    common::wait_for("prioritised tasks", Duration::from_secs(20), || {
        ids.as_array().unwrap().iter().all(|i| redis.status(i.as_str().unwrap()).is_some()).then_some(())
    });
    let order = worker.started_task_ids();
    let expected: Vec<String> = ids.as_array().unwrap().iter().rev().map(|i| i.as_str().unwrap().to_owned()).collect();
    assert_eq!(order, expected, "priority 0 first, then 5, then 9 (kombu: 0 is highest on Redis)");
}

#[test]
fn links_errbacks_and_chains_are_sent_on_as_celery_does() {
    let redis = Redis::start();
    let _worker = Worker::start(&redis, &["--concurrency", "2"]);
    let link_id = "00000000-0000-4000-8000-00000000a001";
    let errback_id = "00000000-0000-4000-8000-00000000a002";
    let out = run(
        &redis,
        json!([
            // link: cpu_bound(100) = 25, then io_bound(25 * 0 …) — io_bound(25) would be slow, so
            // link an immutable io_bound(0) and a mutable cpu_bound that receives 25 as `n`.
            {"task": "tasks.cpu_bound", "args": [100], "options": {"link": {"task": "tasks.cpu_bound", "options": {"task_id": link_id}}}},
            {"task": "tasks.cpu_bound", "args": ["bad"], "options": {"link_error": {"task": "tasks.io_bound", "args": [], "options": {"task_id": errback_id}}}},
        ]),
    );
    assert_eq!(ok(&out[0]), &json!(25));
    let (_, exc) = err(&out[1]);
    assert_eq!(exc, "TypeError");
    // The link ran with the parent's result prepended: cpu_bound(25) = 9.
    let linked = common::wait_for("linked task result", Duration::from_secs(10), || redis.result(link_id));
    assert_eq!((&linked["status"], &linked["result"]), (&json!("SUCCESS"), &json!(9)));
    assert_eq!(linked["parent_id"], out[0]["id"], "parent_id is the finished task");
    // The errback was sent with (task_id,): io_bound("<uuid>") fails with TypeError — proof
    // of what it received, exactly as a Python worker would behave.
    let errback = common::wait_for("errback result", Duration::from_secs(10), || redis.result(errback_id));
    assert_eq!(errback["status"], "FAILURE");
    let msg = errback["result"]["exc_message"][0].as_str().unwrap();
    assert!(msg.contains("must be a real number, not str"), "{msg}");

    // A chain built by Python: cpu_bound(1000)=168 | cpu_bound → cpu_bound(168)=39 | io_bound(0) immutable.
    let chain = common::run_python(
        "chain.py",
        &[],
        &[("BROKER_URL", redis.url(0)), ("BACKEND_URL", redis.url(1))],
        Duration::from_secs(60),
    );
    assert_eq!(chain.trim(), "[168, 39, 0]");
}
