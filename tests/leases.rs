//! Leases and prompt restore, with real redis-server, real workers and a real Python Celery
//! worker: a live worker's message is never restored however long it holds it, and a message
//! nobody holds (a SIGKILLed worker's, or one whose take reply was lost) is back within a second
//! of falling due.

mod common;

use chrono::{DateTime, Utc};
use common::{PythonWorker, Redis, Worker, enqueue, free_port, task, wait_all, wait_for};
use redis::Commands;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;

/// How late a restore may come after an entry falls due (score + visibility timeout).
const PROMPT: f64 = 1.0;

/// `(delivery tag, score, log time)` of every message a worker restored, from its debug log.
fn restores(w: &Worker) -> Vec<(String, f64, f64)> {
    w.log_events()
        .into_iter()
        .filter(|e| e["message"] == "restored a message past the visibility timeout")
        .map(|e| {
            let at: DateTime<Utc> = e["timestamp"].as_str().expect("timestamp").parse().expect("RFC 3339 timestamp");
            let at = at.timestamp_micros() as f64 / 1e6;
            (e["delivery_tag"].as_str().expect("tag").to_owned(), e["score"].as_f64().expect("score"), at)
        })
        .collect()
}

/// Runs per task id across workers.
fn runs(workers: &[&Worker]) -> HashMap<String, usize> {
    let mut runs = HashMap::new();
    for w in workers {
        for id in w.started_task_ids() {
            *runs.entry(id).or_default() += 1;
        }
    }
    runs
}

#[test]
fn long_tasks_and_countdowns_beyond_the_timeout_run_exactly_once() {
    let redis = Redis::start();
    // A Python worker on another queue: its kombu restore scans the same unacked_index every
    // second with a 2 s visibility timeout.
    let python = PythonWorker::start(
        &redis,
        &["-Q", "elsewhere", "--pool", "solo"],
        &[("VISIBILITY_TIMEOUT", "2"), ("UNACKED_RESTORE_INTERVAL", "1"), ("UNACKED_RESTORE_THROTTLE", "1")],
    );
    let flags = ["--concurrency", "4", "--visibility-timeout", "2", "--restore-interval", "1"];
    let a = Worker::start(&redis, &flags);
    let b = Worker::start(&redis, &flags);

    // Four tasks running 3× the visibility timeout, two countdowns 2.5× beyond it.
    let mut tasks: Vec<_> = (0..4).map(|_| task("tasks.io_bound", vec![json!(6.0)])).collect();
    for _ in 0..2 {
        let mut t = task("tasks.io_bound", vec![json!(0.1)]);
        t.eta = Some(Utc::now() + chrono::Duration::seconds(5));
        tasks.push(t);
    }
    let ids = enqueue(&redis, &tasks);
    wait_all(&redis, &ids, "SUCCESS", Duration::from_secs(90));

    let runs = runs(&[&a, &b]);
    for id in &ids {
        assert_eq!(runs.get(id), Some(&1), "task {id} ran {:?} times", runs.get(id));
    }
    assert_eq!(runs.len(), ids.len(), "only these tasks ran");
    for w in [&a, &b] {
        assert_eq!(w.metric("celery_worker_restored_total", ""), 0.0, "nothing was restored");
    }
    assert_eq!(redis.depth("celery"), 0);
    assert_eq!(redis.depth("elsewhere"), 0);

    // The control: the same Python restore does take back a message whose worker stopped
    // renewing (SIGSTOP freezes both our workers mid-task), so it was live all along.
    let ids = enqueue(&redis, &[task("tasks.io_bound", vec![json!(30.0)])]);
    wait_for("the long task to start", Duration::from_secs(20), || runs_of(&[&a, &b], &ids[0]).then_some(()));
    a.signal("STOP");
    b.signal("STOP");
    wait_for("the Python worker to restore the frozen worker's message", Duration::from_secs(30), || {
        (redis.depth("celery") == 1).then_some(())
    });
    a.signal("CONT");
    b.signal("CONT");
    drop(python);
}

fn runs_of(workers: &[&Worker], id: &str) -> bool {
    workers.iter().any(|w| w.started_task_ids().iter().any(|i| i == id))
}

#[test]
fn orphans_of_a_sigkilled_worker_are_back_within_a_second_of_falling_due() {
    let redis = Redis::start();
    let vt = 5.0;
    let tasks: Vec<_> = (0..300).map(|i| task("tasks.io_bound", vec![json!(0.1 + (i % 4) as f64 * 0.1)])).collect();
    let ids = enqueue(&redis, &tasks);
    // A long --restore-interval: promptness must come from the due time, not from a tick.
    let common_flags = ["--visibility-timeout", "5", "--restore-interval", "30"];
    let mut killed =
        Worker::start(&redis, &[&common_flags[..], &["--concurrency", "8", "--prefetch-multiplier", "2"]].concat());
    let survivor = Worker::start(&redis, &[&common_flags[..], &["--concurrency", "4"]].concat());
    wait_for("the burst under way", Duration::from_secs(60), || (redis.depth("celery") < 250).then_some(()));

    killed.signal("KILL");
    assert!(!killed.wait_exit(Duration::from_secs(5)).success());
    let snapshot: HashMap<String, f64> =
        redis.conn(0).zrange_withscores::<_, Vec<(String, f64)>>("unacked_index", 0, -1).unwrap().into_iter().collect();
    assert!(!snapshot.is_empty(), "messages were in flight when the kill landed");

    wait_all(&redis, &ids, "SUCCESS", Duration::from_secs(120));
    wait_for("unacked to empty", Duration::from_secs(20), || (redis.unacked() == 0).then_some(()));

    let restored = restores(&survivor);
    assert!(!restored.is_empty(), "the survivor restored the killed worker's messages");
    for (tag, score, at) in &restored {
        let taken = snapshot.get(tag).unwrap_or_else(|| panic!("restored {tag}, which was not in flight at the kill"));
        assert_eq!(score, taken, "{tag}: the restored score is the killed worker's last");
        let late = at - (score + vt);
        assert!(late <= PROMPT, "{tag} came back {late:.3} s after falling due (allowed {PROMPT} s)");
        assert!(late >= 0.0, "{tag} was restored {:.3} s before falling due", -late);
    }
    // Completeness needs no count: every task succeeded and `unacked` emptied, and a dead
    // worker's message leaves `unacked` only through a restore, each of which was timed above.
}

#[test]
fn a_take_whose_reply_is_lost_runs_once_within_a_second_of_its_timeout() {
    let redis = Redis::start();
    let vt = 3.0;
    let w = Worker::spawn_with_env(
        &redis,
        free_port(),
        &["--visibility-timeout", "3", "--restore-interval", "30"],
        &[(celery_autoscale::broker::DROP_TAKE_REPLIES_ENV, "1")],
    );
    w.wait_ready(Duration::from_secs(20));
    let ids = enqueue(&redis, &[task("tasks.io_bound", vec![json!(0.1)])]);
    wait_all(&redis, &ids, "SUCCESS", Duration::from_secs(30));

    assert!(w.log_text().contains("discarding a take reply"), "the hook dropped the reply:\n{}", w.log_text());
    let restored = restores(&w);
    assert_eq!(restored.len(), 1, "the stranded message was restored once: {restored:?}");
    let (_, score, at) = &restored[0];
    let late = at - (score + vt);
    assert!((0.0..=PROMPT).contains(&late), "the stranded message came back {late:.3} s after falling due");
    assert_eq!(w.started_task_ids(), ids, "it ran exactly once");
    wait_for("unacked to empty", Duration::from_secs(10), || (redis.unacked() == 0).then_some(()));
    let entry: Option<Value> = redis.result(&ids[0]);
    assert_eq!(entry.map(|r| r["result"].clone()), Some(json!(0.1)));
}
