//! Rate limits and the remote-control commands that tune a running worker, driven by the real
//! `celery control` / `celery inspect` command line: `rate_limit` paces a task on our worker,
//! `registered` shows the limit as Celery does, bad input gets Celery's error replies,
//! `time_limit` applies to the next run, `pool_grow`/`pool_shrink` change the run slots (and
//! `stats` says so, one pool entry per slot), and `query_task` calls an ETA task "scheduled".

mod common;

use common::*;
use serde_json::{Value, json};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const NODE: &str = "rs1@testhost";
const CLI: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(120);

/// `celery <kind> <cmd> -d NODE --json` → the reply of our node.
fn ask(redis: &Redis, kind: &str, cmd: &[&str]) -> Value {
    let mut args = vec![kind];
    args.extend_from_slice(cmd);
    args.extend_from_slice(&["-d", NODE, "--timeout", "5", "--json"]);
    let (ok, out) = celery_cli(redis, &args, CLI);
    assert!(ok, "celery {args:?} failed:\n{out}");
    let line = out.lines().find(|l| l.starts_with('{') || l.starts_with('[')).unwrap_or_else(|| {
        panic!("no JSON from {args:?}:\n{out}");
    });
    let v: Value = serde_json::from_str(line).unwrap();
    // `control` prints a list of {node: reply}; `inspect` a {node: reply} object.
    match v {
        Value::Array(replies) => replies.into_iter().find_map(|r| r.get(NODE).cloned()).unwrap_or(Value::Null),
        v => v[NODE].clone(),
    }
}

fn send(redis: &Redis, spec: Value) -> Vec<String> {
    let ids = python_client(redis, "send", &spec, Duration::from_secs(60));
    ids.as_array().unwrap().iter().map(|i| i.as_str().unwrap().to_owned()).collect()
}

#[test]
fn celery_control_rate_limit_paces_our_worker_and_registered_shows_it() {
    let redis = Redis::start();
    let worker = Worker::start(&redis, &["--hostname", NODE, "--concurrency", "2"]);

    assert_eq!(
        ask(&redis, "control", &["rate_limit", "tasks.io_bound", "30/m"]),
        json!({"ok": "new rate limit set successfully"})
    );
    let registered = ask(&redis, "inspect", &["registered"]);
    assert!(registered.as_array().unwrap().iter().any(|t| t == "tasks.io_bound [rate_limit=30/m]"), "{registered}");
    assert!(
        registered.as_array().unwrap().iter().any(|t| t == "tasks.cpu_bound"),
        "no limit, no brackets: {registered}"
    );

    // 30/m is one start every 2 s: ten tasks that take no time take at least 18 s.
    let started = Instant::now();
    let ids = send(&redis, json!((0..10).map(|_| json!({"task": "tasks.io_bound", "args": [0]})).collect::<Vec<_>>()));
    wait_all(&redis, &ids, "SUCCESS", WAIT);
    let took = started.elapsed();
    println!("10 tasks.io_bound(0) at rate_limit 30/m on one worker (concurrency 2): {:.1} s", took.as_secs_f64());
    assert!(took >= Duration::from_secs(18), "{took:?}");

    // Bad input: Celery's replies, and the worker goes on.
    let bad = ask(&redis, "control", &["rate_limit", "tasks.io_bound", "abc"]);
    assert_eq!(
        bad,
        json!({"error": "Invalid rate limit string: ValueError(\"could not convert string to float: 'abc'\")"}),
        "{bad}"
    );
    assert_eq!(ask(&redis, "control", &["rate_limit", "tasks.nope", "10/s"]), json!({"error": "unknown task"}));
    assert_eq!(ask(&redis, "inspect", &["ping"]), json!({"ok": "pong"}));
    let registered = ask(&redis, "inspect", &["registered"]);
    assert!(
        registered.as_array().unwrap().iter().any(|t| t == "tasks.io_bound [rate_limit=30/m]"),
        "kept: {registered}"
    );

    // Lifting it: ten more go at once (well under the 18 s the limit would take).
    assert_eq!(
        ask(&redis, "control", &["rate_limit", "tasks.io_bound", "1000/s"]),
        json!({"ok": "new rate limit set successfully"})
    );
    let started = Instant::now();
    let ids = send(&redis, json!((0..10).map(|_| json!({"task": "tasks.io_bound", "args": [0]})).collect::<Vec<_>>()));
    wait_all(&redis, &ids, "SUCCESS", WAIT);
    println!("the same ten at 1000/s: {:.1} s", started.elapsed().as_secs_f64());

    // time_limit (soft 1 s, hard 2 s) applies to the next run: a 30 s task fails at the soft limit.
    assert_eq!(
        ask(&redis, "control", &["time_limit", "tasks.io_bound", "1", "2"]),
        json!({"ok": "time limits set successfully"})
    );
    assert_eq!(ask(&redis, "control", &["time_limit", "tasks.nope", "1", "2"]), json!({"error": "unknown task"}));
    let ids = send(&redis, json!([{"task": "tasks.io_bound", "args": [30]}]));
    wait_all(&redis, &ids, "FAILURE", WAIT);
    let result = redis.result(&ids[0]).unwrap();
    assert_eq!(result["result"]["exc_type"], "SoftTimeLimitExceeded", "{result}");
    assert!(worker.log_text().contains("new rate limit"), "the change is logged");
}

#[test]
fn pool_grow_and_shrink_change_the_run_slots_and_stats_lists_one_entry_per_slot() {
    let redis = Redis::start();
    let worker = Worker::start(&redis, &["--hostname", NODE, "--concurrency", "2"]);
    let pid = worker.child.id();

    let stats = ask(&redis, "inspect", &["stats"]);
    assert_eq!(stats["pool"]["max-concurrency"], 2, "{stats}");
    assert_eq!(stats["pool"]["processes"], json!([pid, pid]), "one entry per run slot, each our pid");
    assert_eq!(stats["prefetch_count"], 2);

    // A task waiting for its ETA is "scheduled" to query_task (Celery 5.7's name).
    let later = send(&redis, json!([{"task": "tasks.io_bound", "args": [0], "options": {"countdown": 600}}]));
    let q = wait_for("the ETA task to be held", WAIT, || {
        let q = ask(&redis, "inspect", &["query_task", &later[0]]);
        q.get(&later[0]).cloned()
    });
    assert_eq!(q[0], "scheduled", "{q}");

    assert_eq!(ask(&redis, "control", &["pool_grow", "3"]), json!({"ok": "pool will grow"}));
    let stats = ask(&redis, "inspect", &["stats"]);
    assert_eq!(stats["pool"]["max-concurrency"], 5, "{stats}");
    assert_eq!(stats["pool"]["processes"].as_array().unwrap().len(), 5);
    assert_eq!(stats["prefetch_count"], 5, "the prefetch budget follows the slots");
    assert_eq!(worker.metric("celery_worker_concurrency", ""), 5.0);

    // Five long tasks now run at once.
    let ids = send(&redis, json!((0..5).map(|_| json!({"task": "tasks.io_bound", "args": [600]})).collect::<Vec<_>>()));
    let active = wait_for("five tasks active at once", WAIT, || {
        let a = ask(&redis, "inspect", &["active"]);
        (a.as_array()?.len() == 5).then_some(a)
    });
    println!("after pool_grow 3: {} tasks active", active.as_array().unwrap().len());

    // Shrinking takes slots as tasks end; below one slot is refused with an error reply.
    assert_eq!(ask(&redis, "control", &["pool_shrink", "4"]), json!({"ok": "pool will shrink"}));
    assert_eq!(ask(&redis, "inspect", &["stats"])["pool"]["max-concurrency"], 1);
    let refused = ask(&redis, "control", &["pool_shrink", "1"]);
    assert!(refused["error"].as_str().is_some_and(|e| e.contains("at least one")), "{refused}");
    let mut terminate = vec!["control", "terminate", "SIGTERM"];
    terminate.extend(ids.iter().map(String::as_str));
    terminate.extend(["-d", NODE, "--timeout", "5"]);
    let (ok, out) = celery_cli(&redis, &terminate, CLI);
    assert!(ok, "{out}");
    wait_all(&redis, &ids, "REVOKED", WAIT);
    // One slot left: of two more long tasks, one runs and one waits.
    let more =
        send(&redis, json!([{"task": "tasks.io_bound", "args": [600]}, {"task": "tasks.io_bound", "args": [600]}]));
    wait_for("one task active", WAIT, || (ask(&redis, "inspect", &["active"]).as_array()?.len() == 1).then_some(()));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ask(&redis, "inspect", &["active"]).as_array().unwrap().len(), 1, "one run slot after the shrink");

    // (The second waits in Redis: one slot, prefetch 1.)
    assert_eq!(redis.depth("celery"), 1, "{:?}", more);
}

#[test]
fn bad_rate_limit_flags_are_refused_naming_the_flag() {
    let redis = Redis::start();
    for (args, want) in [
        (vec!["--rate-limit", "tasks.io_bound=fast"], "--rate-limit"),
        (vec!["--rate-limit", "tasks.io_bound"], "TASK=RATE"),
        (vec!["--rate-limit", "tasks.nope=10/s"], "--rate-limit names [\"tasks.nope\"]"),
        (vec!["--queues", "a,b", "-X", "a,b"], "--exclude-queues removes every queue"),
    ] {
        let out = Command::new(BIN)
            .arg("worker")
            .args(["--broker-url", &redis.url(0), "--backend-url", &redis.url(1), "--metrics-addr", "127.0.0.1:0"])
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn a_rate_limit_flag_paces_from_the_start() {
    let redis = Redis::start();
    let _worker = Worker::start(&redis, &["--hostname", NODE, "--rate-limit", "tasks.io_bound=2/s", "-X", "other"]);
    let registered = ask(&redis, "inspect", &["registered"]);
    assert!(registered.as_array().unwrap().iter().any(|t| t == "tasks.io_bound [rate_limit=2/s]"), "{registered}");
    // 2/s: the fifth of five starts no sooner than 2 s after the first.
    let started = Instant::now();
    let ids = send(&redis, json!((0..5).map(|_| json!({"task": "tasks.io_bound", "args": [0]})).collect::<Vec<_>>()));
    wait_all(&redis, &ids, "SUCCESS", WAIT);
    let took = started.elapsed();
    println!("5 tasks.io_bound(0) at --rate-limit 2/s: {:.1} s", took.as_secs_f64());
    assert!(took >= Duration::from_secs(2), "{took:?}");
}
