//! Revokes in an autoscaled fleet, against the real `celery control revoke` and real Python
//! Celery 5.7 workers: a worker started after the revoke learns it from its peers (mingle
//! `hello`, both ways between Rust and Python) or from its `--statedb` file; REVOKED is stored
//! only where Celery 5.7 stores it; `expires` is checked again right before a task runs.

mod common;

use common::*;
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::Duration;

const CLI: Duration = Duration::from_secs(60);
const LONG: Duration = Duration::from_secs(60);

fn revoke(redis: &Redis, id: &str) {
    let (ok, out) = celery_cli(redis, &["control", "revoke", id, "--timeout", "3"], CLI);
    assert!(ok && out.contains("flagged as revoked"), "celery control revoke {id}:\n{out}");
}

/// `tasks.io_bound(0)` under a fixed id, and a plain task after it on the same queue: once the
/// plain one has succeeded, the worker has taken the first.
fn enqueue_pair(redis: &Redis, id: &str) -> String {
    let mut t = task("tasks.io_bound", vec![json!(0)]);
    t.id = id.into();
    let after = task("tasks.io_bound", vec![json!(0)]);
    let ids = enqueue(redis, &[t, after]);
    ids[1].clone()
}

fn stop(mut w: Worker) {
    w.signal("TERM");
    assert!(w.wait_exit(LONG).success(), "worker exit:\n{}", w.log_text());
}

/// The worker took `id`, did not run it, and acknowledged it (nothing left in Redis).
fn refused(redis: &Redis, w: &Worker, id: &str, after: &str) {
    wait_all(redis, &[after.to_owned()], "SUCCESS", LONG);
    wait_for("the queue and unacked to empty", LONG, || {
        (redis.depth("celery") == 0 && redis.unacked() == 0).then_some(())
    });
    assert!(!w.started_task_ids().iter().any(|s| s == id), "the revoked task ran:\n{}", w.log_text());
    assert!(w.log_text().contains("task revoked; not running it"), "{}", w.log_text());
    assert_eq!(redis.status(id).as_deref(), Some("REVOKED"));
}

#[test]
fn a_worker_started_after_a_revoke_learns_it_from_a_peer_or_its_state_file() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let statedb = dir.path().join("worker.state");
    let statedb = statedb.to_str().unwrap();
    let id = "00000000-0000-4000-8000-0000000f1001";

    // A peer that consumes another queue hears the revoke; nobody runs the id yet.
    let peer = Worker::start(&redis, &["--hostname", "peer@fleet", "--queues", "other"]);
    revoke(&redis, id);
    let after = enqueue_pair(&redis, id);

    // A new worker on the task's queue: mingle gives it the peer's revoked set.
    let w = Worker::start(&redis, &["--hostname", "new@fleet", "--statedb", statedb]);
    refused(&redis, &w, id, &after);
    assert!(w.log_text().contains("mingle: sync complete"), "{}", w.log_text());
    stop(w);
    stop(peer);
    let saved = std::fs::read_to_string(statedb).unwrap();
    assert!(saved.contains(id), "the state file lacks the id: {saved}");

    // The same id sent again (a producer retrying): a worker restarted alone with the state
    // file still refuses it.
    let after = enqueue_pair(&redis, id);
    let w = Worker::start(&redis, &["--hostname", "new@fleet", "--statedb", statedb]);
    refused(&redis, &w, id, &after);
    assert!(w.log_text().contains("mingle: all alone"), "{}", w.log_text());
    stop(w);

    // Without the state file the same lone worker knows nothing of it, and runs it.
    let after = enqueue_pair(&redis, id);
    let w = Worker::start(&redis, &["--hostname", "new@fleet"]);
    wait_all(&redis, &[id.to_owned(), after], "SUCCESS", LONG);
    assert!(w.started_task_ids().iter().any(|s| s == id), "{}", w.log_text());
    stop(w);

    // A corrupt state file stops the start with an error naming the flag.
    std::fs::write(statedb, b"{not json").unwrap();
    let mut bad = Worker::spawn(&redis, &["--statedb", statedb]);
    assert!(!bad.wait_exit(LONG).success());
    let log = bad.log_text();
    assert!(log.contains("--statedb") && log.contains("not a celery-autoscale state file"), "{log}");
}

/// A Python worker with mingle on (Celery's default), on the task's queue.
fn python_worker_with_mingle(redis: &Redis, node: &str, queues: &str) -> (std::process::Child, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("py.log");
    let child = Command::new(python())
        .args(["-m", "celery", "-A", "tasks", "worker", "--loglevel", "INFO", "--without-gossip"])
        .args(["--without-heartbeat", "--pool", "solo", "-n", node, "-Q", queues])
        .current_dir(repo_root().join("tests/python"))
        .env("PYTHONPATH", repo_root().join("tests/python"))
        .env("BROKER_URL", redis.url(0))
        .env("BACKEND_URL", redis.url(1))
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::options().append(true).open(&log).unwrap())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn python celery worker");
    wait_for("python worker ready", LONG, || {
        std::fs::read_to_string(&log).unwrap_or_default().contains(" ready.").then_some(())
    });
    (child, dir)
}

fn py_log(dir: &tempfile::TempDir) -> String {
    std::fs::read_to_string(dir.path().join("py.log")).unwrap_or_default()
}

#[test]
fn mingle_works_both_ways_with_python_workers() {
    let redis = Redis::start();
    // Rust peer, Python newcomer: Celery's mingle reads our `hello` answer.
    let id = "00000000-0000-4000-8000-0000000f2001";
    let peer = Worker::start(&redis, &["--hostname", "rspeer@fleet", "--queues", "other"]);
    revoke(&redis, id);
    let after = enqueue_pair(&redis, id);
    let (mut py, dir) = python_worker_with_mingle(&redis, "pynew@fleet", "celery");
    wait_all(&redis, &[after], "SUCCESS", LONG);
    let log = py_log(&dir);
    assert!(log.contains("mingle: sync with 1 nodes"), "{log}");
    assert!(log.contains(&format!("Discarding revoked task: tasks.io_bound[{id}]")), "{log}");
    assert_eq!(redis.status(id).as_deref(), Some("REVOKED"));
    let _ = py.kill();
    let _ = py.wait();
    stop(peer);

    // Python peer, Rust newcomer: we read Celery's answer.
    let id = "00000000-0000-4000-8000-0000000f2002";
    let (mut py, _dir) = python_worker_with_mingle(&redis, "pypeer@fleet", "other");
    revoke(&redis, id);
    let after = enqueue_pair(&redis, id);
    let w = Worker::start(&redis, &["--hostname", "rsnew@fleet"]);
    refused(&redis, &w, id, &after);
    assert!(w.log_text().contains("pypeer@fleet"), "{}", w.log_text());
    let _ = py.kill();
    let _ = py.wait();
    stop(w);
}

#[test]
fn a_revoke_never_overwrites_a_stored_failure() {
    let redis = Redis::start();
    let w = Worker::start(&redis, &["--hostname", "rs@fleet"]);
    let ids = enqueue(&redis, &[task("tasks.xsum", vec![json!([1, "x"])])]);
    wait_all(&redis, &ids, "FAILURE", LONG);
    let before = redis.result(&ids[0]).unwrap();
    revoke(&redis, &ids[0]);
    // The revoke was handled (the id is in the revoked set) and the FAILURE is as it was.
    let (ok, out) = celery_cli(&redis, &["inspect", "revoked", "--timeout", "3", "--json"], CLI);
    assert!(ok && out.contains(&ids[0]), "{out}");
    assert_eq!(redis.result(&ids[0]).unwrap(), before);
    // A waiting task's revoke does store REVOKED (no result yet), as Celery's does.
    let pending = "00000000-0000-4000-8000-0000000f3001";
    revoke(&redis, pending);
    assert_eq!(redis.status(pending).as_deref(), Some("REVOKED"));
    stop(w);
}

#[test]
fn a_task_that_expires_while_it_waits_is_not_run_and_is_revoked() {
    let redis = Redis::start();
    // Prefetch 2: the second task is taken while the first holds the only run slot.
    let w = Worker::start(&redis, &["--hostname", "rs@fleet", "--concurrency", "1", "--prefetch-multiplier", "2"]);
    // Expires during its ETA wait: 2 s to expire, 4 s countdown.
    let spec = json!([{"task": "tasks.io_bound", "args": [0], "options": {"countdown": 4, "expires": 2}}]);
    let eta = python_client(&redis, "send", &spec, LONG)[0].as_str().unwrap().to_owned();
    // Expires while the only run slot is busy: 2 s to expire behind a 6 s task.
    let spec = json!([{"task": "tasks.io_bound", "args": [6]},
                      {"task": "tasks.io_bound", "args": [0], "options": {"expires": 2}}]);
    let sent = python_client(&redis, "send", &spec, LONG);
    let (busy, slot) = (sent[0].as_str().unwrap().to_owned(), sent[1].as_str().unwrap().to_owned());
    wait_all(&redis, &[busy], "SUCCESS", LONG);
    wait_all(&redis, &[eta.clone(), slot.clone()], "REVOKED", LONG);
    for id in [&eta, &slot] {
        let r = redis.result(id).unwrap();
        assert_eq!(r["result"]["exc_type"], "TaskRevokedError");
        assert_eq!(r["result"]["exc_message"], json!(["expired"]));
        assert!(!w.started_task_ids().iter().any(|s| s == id), "an expired task ran:\n{}", w.log_text());
    }
    wait_for("acks", LONG, || (redis.unacked() == 0 && redis.depth("celery") == 0).then_some(()));
    stop(w);
}
