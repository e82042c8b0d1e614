//! The `custom_task` example — a user's program registering `tasks.word_count`, `tasks.count_to`
//! (progress) and `tasks.fetch` (declarative retries) next to the built-ins — run as a real
//! worker on a real Redis, called by real Python Celery.

mod common;

use common::{Redis, Worker, example_binary, python_client, run_python};
use serde_json::{Value, json};
use std::process::Command;
use std::time::Duration;

fn ok(o: &Value) -> &Value {
    assert_eq!(o["ok"], true, "expected success, got {o}");
    &o["value"]
}

fn type_error(o: &Value) -> &str {
    assert_eq!(
        (&o["ok"], &o["exc_module"], &o["exc_type"]),
        (&json!(false), &json!("builtins"), &json!("TypeError")),
        "{o}"
    );
    o["exc_args"][0].as_str().unwrap()
}

#[test]
fn a_users_task_runs_next_to_the_builtins() {
    let bin = example_binary("custom_task");
    let redis = Redis::start();
    let worker = Worker::spawn_command(Command::new(bin), &redis, common::free_port(), &["--concurrency", "2"]);
    worker.wait_ready(Duration::from_secs(30));
    let (_, metrics) = worker.http_get("/metrics").expect("metrics endpoint");
    for task in ["tasks.word_count", "tasks.cpu_bound", "tasks.io_bound", "tasks.flaky"] {
        let series = format!("celery_task_success_total{{task_name=\"{task}\"}} 0");
        assert!(metrics.contains(&series), "{series} pre-created from the registry:\n{metrics}");
    }

    let out = python_client(
        &redis,
        "run",
        &json!([
            {"task": "tasks.word_count", "args": ["to be or not to be"]},
            {"task": "tasks.word_count", "kwargs": {"text": "  tabs\tand\nnewlines\u{a0}too  "}},
            {"task": "tasks.word_count", "args": [""]},
            {"task": "tasks.word_count", "args": [42]},
            {"task": "tasks.word_count", "args": []},
            {"task": "tasks.word_count", "args": ["a"], "kwargs": {"text": "b"}},
            {"task": "tasks.cpu_bound", "args": [1000]},
            {"task": "tasks.io_bound", "kwargs": {"seconds": 0.1}},
            {"task": "tasks.flaky", "args": [1], "kwargs": {"countdown": 0}},
        ]),
        Duration::from_secs(120),
    );
    let out = out.as_array().expect("a list of outcomes");
    assert_eq!(ok(&out[0]), &json!(6));
    assert_eq!(ok(&out[1]), &json!(4), "Unicode whitespace splits as Python's str.split() does");
    assert_eq!(ok(&out[2]), &json!(0));
    assert_eq!(type_error(&out[3]), "word_count() argument 'text' must be str, not int");
    assert_eq!(type_error(&out[4]), "word_count() missing 1 required positional argument: 'text'");
    assert_eq!(type_error(&out[5]), "word_count() got multiple values for argument 'text'");
    assert_eq!(ok(&out[6]), &json!(168));
    assert_eq!(ok(&out[7]), &json!(0.1));
    assert_eq!(ok(&out[8]), &json!(1), "retried once, then SUCCESS");

    assert_eq!(worker.metric("celery_task_success_total", "tasks.word_count"), 3.0);
    assert_eq!(worker.metric("celery_task_rejected_total", "reason=\"bad_arguments\""), 3.0);
    assert_eq!(redis.unacked(), 0, "everything acknowledged");
}

/// `tasks.fetch` fails with ConnectionError `fail_times` times; `autoretry_for` retries it with
/// backoff 1 s (cap 60) and full jitter. Each re-sent message's countdown, read from its `eta`
/// header against the moment Redis received it (MONITOR), is within [0, 2^retries]; with
/// jitter they are not all the same. `tasks.count_to` meanwhile reports PROGRESS, which Python
/// reads with `AsyncResult.info` while it runs.
#[test]
fn the_examples_retries_back_off_with_jitter_and_its_progress_is_readable() {
    let bin = example_binary("custom_task");
    let redis = Redis::start();
    let worker = Worker::spawn_command(Command::new(bin), &redis, common::free_port(), &["--concurrency", "2"]);
    worker.wait_ready(Duration::from_secs(30));
    let env = [("BROKER_URL", redis.url(0)), ("BACKEND_URL", redis.url(1))];

    let call = json!({"task": "tasks.count_to", "args": [6], "timeout": 60});
    let out = run_python("task_api.py", &["progress", &call.to_string()], &env, Duration::from_secs(90));
    let out: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(ok(&out["final"]), &json!(6));
    let progress: Vec<&Value> = out["seen"].as_array().unwrap().iter().filter(|s| s["state"] == "PROGRESS").collect();
    eprintln!("progress seen by AsyncResult.info: {progress:?}");
    assert!(progress.len() >= 2, "Python saw the task's progress while it ran: {}", out["seen"]);
    let currents: Vec<u64> = progress.iter().map(|p| p["info"]["current"].as_u64().unwrap()).collect();
    assert!(currents.windows(2).all(|w| w[0] < w[1]) && currents.iter().all(|c| *c < 6), "{currents:?}");
    assert!(progress.iter().all(|p| p["info"]["total"] == 6));

    let spec = json!([
        {"task": "tasks.fetch", "args": [4], "timeout": 90},
        {"task": "tasks.fetch", "args": [4], "timeout": 90},
        {"task": "tasks.fetch", "args": [9], "timeout": 90},
    ]);
    let out = run_python("task_api.py", &["retries", &spec.to_string()], &env, Duration::from_secs(150));
    let out: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(ok(&out["outcomes"][0]), &json!(4), "succeeded on its fifth run");
    assert_eq!(ok(&out["outcomes"][1]), &json!(4));
    let gave_up = &out["outcomes"][2];
    assert_eq!(
        (gave_up["exc_type"].as_str(), gave_up["state"].as_str()),
        (Some("ConnectionError"), Some("FAILURE")),
        "max_retries 4, then the error: {gave_up}"
    );
    let mut rounded = Vec::new();
    for o in out["outcomes"].as_array().unwrap() {
        let id = o["id"].as_str().unwrap();
        let retries: Vec<&Value> = out["pushes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["id"] == id && p["retries"].as_u64() > Some(0))
            .collect();
        assert_eq!(retries.iter().map(|p| p["retries"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 3, 4], "{id}");
        for p in retries {
            let n = p["retries"].as_u64().unwrap() - 1; // the countdown uses the failed run's retries
            let bound = (1u64 << n).min(60) as f64;
            let c = p["countdown"].as_f64().unwrap();
            assert!(c <= bound + 0.01 && c > -3.0, "retry {}: countdown {c} outside [0, {bound}]", n + 1);
            rounded.push(c.round() as i64);
        }
    }
    eprintln!("jittered countdowns (rounded s): {rounded:?}");
    assert!(rounded.iter().any(|c| *c != rounded[0]), "full jitter draws different countdowns: {rounded:?}");
    assert_eq!(redis.unacked(), 0, "everything acknowledged");
}
