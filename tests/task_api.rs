//! The task API (`examples/task_api.rs`, a worker with one task per feature) with real Python
//! Celery 5.7 as the producer and client: the request context as Python sent it, a retry's
//! headers and changed arguments, hooks, Reject/Ignore, soft and hard time limits, and exact
//! exponential backoff read from the retry messages themselves.

mod common;

use common::{Redis, Worker, example_binary, python_client, run_python, wait_for};
use serde_json::{Value, json};
use std::process::Command;
use std::time::{Duration, Instant};

fn start(redis: &Redis, concurrency: &str) -> Worker {
    let worker = Worker::spawn_command(
        Command::new(example_binary("task_api")),
        redis,
        common::free_port(),
        &["--concurrency", concurrency, "--hostname", "api@test"],
    );
    worker.wait_ready(Duration::from_secs(60));
    worker
}

fn ok(o: &Value) -> &Value {
    assert_eq!(o["ok"], true, "expected success, got {o}");
    &o["value"]
}

fn failed_with<'a>(o: &'a Value, exc_type: &str) -> &'a Value {
    assert_eq!(
        (&o["ok"], o["exc_type"].as_str(), o["state"].as_str()),
        (&json!(false), Some(exc_type), Some("FAILURE")),
        "{o}"
    );
    &o["exc_args"]
}

/// CPU seconds (user + system) the process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0 // USER_HZ
}

#[test]
fn the_request_a_retry_hooks_reject_and_ignore_are_celerys() {
    let redis = Redis::start();
    let worker = start(&redis, "2");
    let sent = json!({"headers": {"tenant": "acme", "trace": [1, 2]}, "root_id": "root-1", "parent_id": "parent-1",
                      "group_id": "group-1", "group_index": 4, "priority": 3, "expires": 600,
                      "time_limit": 30, "soft_time_limit": 20});
    let out = python_client(
        &redis,
        "run",
        &json!([
            {"task": "api.context", "args": ["a"], "options": sent},
            {"task": "api.retry_context", "args": [1], "options": {"headers": {"tenant": "acme"}, "root_id": "root-1", "parent_id": "parent-1"}},
            {"task": "api.retry_context", "args": [1]},
            {"task": "api.hooked", "args": ["ok"]},
            {"task": "api.hooked", "args": ["fail"]},
            {"task": "api.hooked", "args": ["retry"]},
            {"task": "api.reject"},
            {"task": "api.reject_drop"},
        ]),
        Duration::from_secs(120),
    );
    let out = out.as_array().unwrap();
    let r = ok(&out[0]);
    let id = out[0]["id"].as_str().unwrap();
    assert_eq!(
        (r["id"].as_str(), r["task"].as_str(), &r["args"], &r["kwargs"]),
        (Some(id), Some("api.context"), &json!(["a"]), &json!({}))
    );
    assert_eq!(r["headers"], json!({"tenant": "acme", "trace": [1, 2]}), "the custom headers, and only those");
    assert_eq!((&r["root_id"], &r["parent_id"]), (&json!("root-1"), &json!("parent-1")));
    assert_eq!((&r["group"], &r["group_index"]), (&json!("group-1"), &json!(4)));
    assert_eq!(
        r["delivery_info"],
        json!({"exchange": "", "routing_key": "celery", "priority": 3, "redelivered": false})
    );
    assert_eq!((&r["hostname"], &r["retries"], &r["is_eager"]), (&json!("api@test"), &json!(0), &json!(false)));
    assert_eq!(r["correlation_id"].as_str(), Some(id));
    assert!(r["reply_to"].as_str().is_some_and(|s| !s.is_empty()), "{r}");
    assert!(r["expires"].is_string() && r["eta"].is_null(), "{r}");
    assert_eq!(r["timelimit"], json!([30, 20]));
    assert!(r["origin"].as_str().is_some_and(|o| o.starts_with("gen")), "{r}");

    // The retry carries the new args, the custom headers and the caller's parent and root.
    let again = ok(&out[1]);
    assert_eq!((&again["args"], &again["retries"]), (&json!([2]), &json!(1)));
    assert_eq!(again["headers"], json!({"tenant": "acme"}));
    assert_eq!((&again["root_id"], &again["parent_id"]), (&json!("root-1"), &json!("parent-1")));
    // Without a parent, the retry's parent is the task itself (Celery's send_task in a task).
    let own = ok(&out[2]);
    assert_eq!((own["parent_id"].as_str(), own["root_id"].as_str()), (out[2]["id"].as_str(), out[2]["id"].as_str()));

    // Hooks, as Celery's tracer calls them.
    assert_eq!(ok(&out[3]), &json!("ok"));
    failed_with(&out[4], "ValueError");
    assert_eq!(ok(&out[5]), &json!("retry"));
    let log = python_client(&redis, "run", &json!([{"task": "api.hook_log"}]), Duration::from_secs(60));
    let log: Vec<String> = serde_json::from_value(ok(&log[0]).clone()).unwrap();
    let of = |i: usize| {
        let id = out[i]["id"].as_str().unwrap();
        log.iter().filter(|l| l.contains(id)).map(|l| l.replace(id, "<id>")).collect::<Vec<_>>()
    };
    assert_eq!(of(3), ["on_success <id> \"ok\"", "after_return <id> SUCCESS"]);
    assert_eq!(of(4), ["on_failure <id> ValueError", "after_return <id> FAILURE"]);
    assert_eq!(
        of(5),
        [
            "on_retry <id> RuntimeError",
            "after_return <id> RETRY",
            "on_success <id> \"retry\"",
            "after_return <id> SUCCESS"
        ]
    );

    // Reject(requeue=True): back in its queue, run again (redelivered); Reject(requeue=False):
    // FAILURE, dropped.
    assert_eq!(ok(&out[6]), &json!("ran after its requeue"));
    assert_eq!(failed_with(&out[7], "Reject"), &json!(["never", false]));

    // Ignore: acknowledged, nothing stored.
    let ids = python_client(&redis, "send", &json!([{"task": "api.ignore"}]), Duration::from_secs(60));
    let ignored = ids[0].as_str().unwrap().to_owned();
    wait_for("the ignored task to be acknowledged", Duration::from_secs(60), || {
        (worker.metric("celery_task_received_total", "task_name=\"api.ignore\"") == 1.0
            && redis.unacked() == 0
            && redis.depth("celery") == 0)
            .then_some(())
    });
    assert_eq!(redis.status(&ignored), None, "Ignore stores no state");
    assert_eq!(redis.unacked(), 0, "everything acknowledged");
}

#[test]
fn a_soft_limit_is_caught_to_clean_up_and_a_hard_limit_ends_a_stuck_blocking_body() {
    let redis = Redis::start();
    let mut worker = start(&redis, "1");
    let out = python_client(
        &redis,
        "run",
        &json!([{"task": "api.soft_cleanup"}, {"task": "api.soft_poll"}]),
        Duration::from_secs(120),
    );
    let cleaned = ok(&out[0]);
    assert_eq!(cleaned["cleaned_up"], true, "the async body saw its soft limit and cleaned up: {cleaned}");
    let grace = cleaned["grace_s"].as_f64().unwrap();
    assert!(grace > 0.0 && grace < 10.0, "time left before the hard limit: {grace}");
    failed_with(&out[1], "SoftTimeLimitExceeded");

    // A blocking body that ignores its 1 s hard limit and spins for 8 s: TimeLimitExceeded is
    // stored, and the only run slot serves the next task while the abandoned thread spins on.
    let ids = python_client(
        &redis,
        "send",
        &json!([{"task": "api.stuck", "args": [8]}, {"task": "api.context"}]),
        Duration::from_secs(60),
    );
    let (stuck, next) = (ids[0].as_str().unwrap().to_owned(), ids[1].as_str().unwrap().to_owned());
    let sent = Instant::now();
    wait_for("the next task to succeed", Duration::from_secs(60), || {
        (redis.status(&next).as_deref() == Some("SUCCESS")).then_some(())
    });
    let served_after = sent.elapsed();
    let result = redis.result(&stuck).expect("a result for the stuck task");
    assert_eq!(
        (result["status"].as_str(), result["result"]["exc_type"].as_str()),
        (Some("FAILURE"), Some("TimeLimitExceeded")),
        "{result}"
    );
    let pid = worker.child.id();
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let burned = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64();
    eprintln!(
        "next task served {served_after:?} after sending; the abandoned thread meanwhile burns {burned:.2} cores"
    );
    assert!(worker.log_text().contains("left running"), "the abandonment is logged");
    // The stuck body's late return does not overwrite the stored TimeLimitExceeded.
    std::thread::sleep(Duration::from_secs(7));
    let later = redis.result(&stuck).unwrap();
    assert_eq!(later["result"]["exc_type"], "TimeLimitExceeded", "{later}");
    assert_eq!(redis.unacked(), 0);
    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(60)).success());
}

#[test]
fn backoff_without_jitter_is_exactly_base_times_two_to_the_retries() {
    let redis = Redis::start();
    let _worker = start(&redis, "2");
    let env = [("BROKER_URL", redis.url(0)), ("BACKEND_URL", redis.url(1))];
    let spec = json!([{"task": "api.backoff_exact", "args": [3], "timeout": 90}]);
    let out = run_python("task_api.py", &["retries", &spec.to_string()], &env, Duration::from_secs(150));
    let out: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(ok(&out["outcomes"][0]), &json!(3), "succeeded on its fourth run");
    let id = out["outcomes"][0]["id"].as_str().unwrap();
    let retries: Vec<&Value> =
        out["pushes"].as_array().unwrap().iter().filter(|p| p["id"] == id && p["retries"].as_u64() > Some(0)).collect();
    let countdowns: Vec<f64> = retries.iter().map(|p| p["countdown"].as_f64().unwrap()).collect();
    eprintln!("retry countdowns (eta − LPUSH time): {countdowns:?}");
    assert_eq!(retries.iter().map(|p| p["retries"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 3]);
    for (n, c) in countdowns.iter().enumerate() {
        let want = f64::from(1u32 << n);
        // The ETA is set just before the RETRY result is stored and the message pushed: the
        // countdown seen at the push is `want` less that moment, never more.
        assert!(*c <= want + 0.01 && *c > want - 3.0, "retry {}: countdown {c}, want {want}", n + 1);
    }
}
