//! The idle wait, with real redis-server and real workers: an idle worker's take is queued
//! behind its wait on the first list (the taker), and a message on any other priority list ends
//! that wait through `CLIENT UNBLOCK`; exactly one take runs per wait, so every task runs once
//! and nothing is left in `unacked`. A Redis user whose ACL refuses the `CLIENT` subcommands
//! gets every task too, the slower way.

mod common;

use common::{Redis, Worker, enqueue, free_port, task, wait_all, wait_for};
use redis::Commands;
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;

/// Messages on the base list and on two priority lists, one at a time so the workers are idle
/// (waiting) when each arrives.
fn trickle(redis: &Redis, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let mut t = task("tasks.io_bound", vec![json!(0)]);
        t.priority = [0, 5, 9][i % 3];
        ids.extend(enqueue(redis, &[t]));
        std::thread::sleep(Duration::from_millis(60));
    }
    ids
}

#[test]
fn idle_workers_take_from_every_priority_list_and_each_task_runs_once() {
    let redis = Redis::start();
    let workers: Vec<Worker> = (0..3).map(|_| Worker::spawn(&redis, &["--concurrency", "1"])).collect();
    for w in &workers {
        w.wait_ready(Duration::from_secs(20));
    }
    let ids = trickle(&redis, 30);
    wait_all(&redis, &ids, "SUCCESS", Duration::from_secs(30));

    let mut runs: HashMap<String, usize> = HashMap::new();
    for w in &workers {
        for id in w.started_task_ids() {
            *runs.entry(id).or_default() += 1;
        }
    }
    for id in &ids {
        assert_eq!(runs.get(id), Some(&1), "{id} ran {:?} times", runs.get(id));
    }
    assert_eq!(runs.len(), ids.len(), "nothing else ran");
    wait_for("unacked to empty", Duration::from_secs(10), || (redis.unacked() == 0).then_some(()));
    assert_eq!(redis.depth("celery"), 0);

    // Both ways in: the taker's own list, and a waker ending the taker's wait.
    let events: Vec<_> = workers.iter().flat_map(Worker::log_events).collect();
    let took = |unblocked: bool| {
        events.iter().any(|e| e["message"] == "an idle wait took a message" && e["unblocked"] == json!(unblocked))
    };
    assert!(took(false), "a message on the first list was taken behind its wait");
    assert!(
        events.iter().any(|e| e["message"] == "a message on another list: ending the taker's wait" && e["ended"] == 1),
        "a waker ended a taker's wait"
    );
    assert!(took(true), "a message on a priority list was taken after a waker fired");
}

#[test]
fn a_redis_user_refused_the_client_commands_still_gets_every_task_once() {
    for refused in ["client|id", "client|unblock"] {
        let redis = Redis::start();
        let _: () = redis::cmd("ACL")
            .arg(&["SETUSER", "limited", "on", ">s3cret-pw", "~*", "&*", "+@all"][..])
            .arg(format!("-{refused}"))
            .query(&mut redis.conn(0))
            .unwrap();
        let url = |db| redis.url(db).replacen("redis://", "redis://limited:s3cret-pw@", 1);
        let w = Worker::spawn_urls(&url(0), &url(1), free_port(), &["--concurrency", "1"]);
        w.wait_ready(Duration::from_secs(20));
        let ids = trickle(&redis, 9);
        wait_all(&redis, &ids, "SUCCESS", Duration::from_secs(30));

        let mut started = w.started_task_ids();
        started.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(started, want, "{refused}: each ran exactly once");
        wait_for("unacked to empty", Duration::from_secs(10), || (redis.unacked() == 0).then_some(()));
        let log = w.log_text();
        assert_eq!(log.matches("Redis refuses CLIENT ID/UNBLOCK").count(), 1, "{refused}: said once:\n{log}");
        assert!(!log.contains("s3cret-pw"), "{refused}: the password never reaches the log");
        let _: () = redis.conn(0).del("unacked").unwrap();
    }
}
