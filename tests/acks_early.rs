//! `--acks-early` (Celery's default `task_acks_late=False`) against the default acks-late: a
//! worker SIGKILLed while its task runs loses the task with the flag (nothing is left in
//! `unacked` for anyone to restore), and without it the task comes back and runs; SIGTERM still
//! lets an early-acked task finish.

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(60);

/// Start a worker, send one 8 s task, wait until it runs, SIGKILL the worker. Returns the id.
fn killed_while_running(redis: &Redis, extra: &[&str]) -> String {
    let w = Worker::start(redis, extra);
    let ids = enqueue(redis, &[task("tasks.io_bound", vec![json!(8)])]);
    wait_for("the task to start", LONG, || w.started_task_ids().contains(&ids[0]).then_some(()));
    w.signal("KILL");
    drop(w);
    ids[0].clone()
}

#[test]
fn sigkill_loses_an_early_acked_task_and_not_a_late_acked_one() {
    let redis = Redis::start();
    let restorer = ["--visibility-timeout", "2", "--restore-interval", "1"];

    // acks early: acknowledged as it started, so nothing is left after the kill.
    let lost = killed_while_running(&redis, &["--acks-early"]);
    assert_eq!((redis.unacked(), redis.depth("celery")), (0, 0), "an early-acked task left a trace");
    assert_eq!(redis.status(&lost), None);

    // acks late (the default): it stays in unacked, and a live worker restores and runs it.
    let kept = killed_while_running(&redis, &[]);
    assert_eq!(redis.unacked(), 1, "a late-acked task must stay in unacked after SIGKILL");
    let mut args = restorer.to_vec();
    args.extend_from_slice(&["--concurrency", "2"]);
    let w = Worker::start(&redis, &args);
    // Its 8 s sleep runs again in full.
    wait_all(&redis, std::slice::from_ref(&kept), "SUCCESS", Duration::from_secs(120));
    assert!(w.started_task_ids().contains(&kept));
    assert!(!w.started_task_ids().contains(&lost), "the lost task came back");
    assert_eq!(redis.status(&lost), None);
}

#[test]
fn sigterm_still_finishes_an_early_acked_task() {
    let redis = Redis::start();
    let mut w = Worker::start(&redis, &["--acks-early", "--shutdown-timeout", "30"]);
    let ids = enqueue(&redis, &[task("tasks.io_bound", vec![json!(2)])]);
    wait_for("the task to start", LONG, || w.started_task_ids().contains(&ids[0]).then_some(()));
    assert_eq!(redis.unacked(), 0, "acknowledged as it started");
    w.signal("TERM");
    assert!(w.wait_exit(LONG).success(), "{}", w.log_text());
    assert_eq!(redis.status(&ids[0]).as_deref(), Some("SUCCESS"));
}
