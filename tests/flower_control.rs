//! Flower's control buttons against our worker: its HTTP API (`POST /api/task/rate-limit`,
//! `/api/task/timeout`, `/api/worker/pool/grow`, `/api/worker/pool/shrink`) succeeds, and the
//! effect is visible in `inspect stats` and `inspect registered` and in how tasks run.

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::Duration;

const NODE: &str = "rs1@testhost";
const WAIT: Duration = Duration::from_secs(120);

/// `celery inspect <cmd> -d NODE --json` → our node's reply.
fn inspect(redis: &Redis, cmd: &str) -> Value {
    let (ok, out) = celery_cli(redis, &["inspect", cmd, "-d", NODE, "--timeout", "5", "--json"], WAIT);
    assert!(ok, "{out}");
    let line = out.lines().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON:\n{out}"));
    serde_json::from_str::<Value>(line).unwrap()[NODE].clone()
}

#[test]
fn flower_rate_limit_timeout_and_pool_buttons_work_on_our_worker() {
    let redis = Redis::start();
    let flower = Flower::start(&redis, Some("tasks"));
    let _worker = Worker::start(&redis, &["--events", "--hostname", NODE, "--concurrency", "2"]);
    wait_for("flower to know our worker", WAIT, || {
        flower.json("/api/workers?refresh=1")?.get(NODE)?.get("stats").map(|_| ())
    });

    let worker = "workername=rs1%40testhost";
    let (status, body) = flower.post("/api/task/rate-limit/tasks.io_bound", &format!("{worker}&ratelimit=30%2Fm"));
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).ok()),
        (200, Some(json!({"message": "new rate limit set successfully"}))),
        "{body}"
    );
    let registered = inspect(&redis, "registered");
    assert!(registered.as_array().unwrap().iter().any(|t| t == "tasks.io_bound [rate_limit=30/m]"), "{registered}");

    let (status, body) = flower.post("/api/task/timeout/tasks.io_bound", &format!("{worker}&soft=1&hard=2"));
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).ok()),
        (200, Some(json!({"message": "time limits set successfully"}))),
        "{body}"
    );
    let ids = python_client(&redis, "send", &json!([{"task": "tasks.io_bound", "args": [30]}]), WAIT);
    let id = ids[0].as_str().unwrap().to_owned();
    wait_all(&redis, std::slice::from_ref(&id), "FAILURE", WAIT);
    assert_eq!(redis.result(&id).unwrap()["result"]["exc_type"], "SoftTimeLimitExceeded");

    let (status, body) = flower.post(&format!("/api/worker/pool/grow/{NODE}?n=3"), "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Growing"), "{body}");
    let stats = inspect(&redis, "stats");
    assert_eq!(stats["pool"]["max-concurrency"], 5, "{stats}");
    assert_eq!(stats["pool"]["processes"].as_array().unwrap().len(), 5);

    let (status, body) = flower.post(&format!("/api/worker/pool/shrink/{NODE}?n=2"), "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Shrinking"), "{body}");
    let stats = inspect(&redis, "stats");
    assert_eq!(stats["pool"]["max-concurrency"], 3, "{stats}");
    assert_eq!(stats["prefetch_count"], 3);
    // Flower's own view of the pool, from the same stats.
    let seen = wait_for("flower's stats to show three slots", WAIT, || {
        let w = flower.json("/api/workers?refresh=1")?;
        let p = w.get(NODE)?.get("stats")?.get("pool")?.clone();
        (p["max-concurrency"] == 3).then_some(p)
    });
    println!("Flower's view of our pool after grow 3, shrink 2: {seen}");
}
