//! Flower (from PyPI, pinned in scripts/requirements.txt), headless on a loopback port, sees our
//! worker: `/api/workers` lists it with its stats (remote control), `/api/tasks` shows its tasks
//! with states and runtimes (events), and a mixed fleet shows both workers.

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(90);

#[test]
fn flower_lists_our_worker_and_its_tasks_beside_a_python_worker() {
    let redis = Redis::start();
    let flower = Flower::start(&redis, None);
    // Only the Rust worker consumes this queue, so the tasks below are ours.
    let rust = Worker::start(&redis, &["--events", "--hostname", "rs1@testhost", "--queues", "rust-only"]);
    let _py = PythonWorker::start(&redis, &["-E", "-n", "py1@testhost", "-c", "1"], &[]);

    // Our tasks, with their outcomes, through events.
    let mut ok = task("tasks.cpu_bound", vec![json!(100)]);
    ok.queue = "rust-only".into();
    let mut bad = task("tasks.cpu_bound", vec![json!("x")]);
    bad.queue = "rust-only".into();
    let ids = enqueue(&redis, &[ok, bad]);
    wait_all(&redis, &ids[..1], "SUCCESS", WAIT);
    wait_all(&redis, &ids[1..], "FAILURE", WAIT);

    let tasks = wait_for("flower /api/tasks to show both tasks finished", WAIT, || {
        let t = flower.json("/api/tasks")?;
        let done = |id: &String| t.get(id).is_some_and(|x| x["state"] == "SUCCESS" || x["state"] == "FAILURE");
        ids.iter().all(done).then_some(t)
    });
    let succeeded = &tasks[&ids[0]];
    assert_eq!(succeeded["state"], "SUCCESS", "{succeeded}");
    assert_eq!(succeeded["name"], "tasks.cpu_bound");
    assert_eq!(succeeded["worker"], "rs1@testhost");
    assert_eq!(succeeded["result"], "25");
    assert!(succeeded["runtime"].as_f64().is_some_and(|r| r >= 0.0), "{succeeded}");
    assert_eq!(tasks[&ids[1]]["state"], "FAILURE");
    assert!(tasks[&ids[1]]["exception"].as_str().unwrap().starts_with("TypeError("), "{}", tasks[&ids[1]]);

    // Both workers, each with its stats from `inspect stats`.
    let workers = wait_for("flower /api/workers to list both workers", WAIT, || {
        let w = flower.json("/api/workers?refresh=1")?;
        (w.get("rs1@testhost")?.get("stats").is_some() && w.get("py1@testhost")?.get("stats").is_some()).then_some(w)
    });
    let ours = &workers["rs1@testhost"];
    assert_eq!(ours["stats"]["pid"], rust.child.id());
    assert!(ours["stats"]["total"]["tasks.cpu_bound"].as_u64() >= Some(1), "{}", ours["stats"]);
    assert_eq!(ours["active_queues"][0]["name"], "rust-only");
    assert!(ours["registered"].as_array().unwrap().iter().any(|t| t == "tasks.cpu_bound"), "{ours}");
    assert_eq!(workers.as_object().unwrap().len(), 2, "{workers}");

    // And through heartbeats alone (the dashboard's online/offline view). The Python test
    // worker runs --without-heartbeat, so only ours is judged here.
    wait_for("flower's heartbeat view: our worker online", WAIT, || {
        (flower.json("/api/workers?status=1")?.get("rs1@testhost")? == &json!(true)).then_some(())
    });
}
