//! Nothing is lost: kills, scale-down signals, garbage in the queue, Redis outages, and
//! crash recovery shared with real Python Celery workers through kombu's `unacked` keys.

mod common;

use common::{PythonWorker, Redis, Worker, enqueue, task, wait_all, wait_for};
use redis::Commands;
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[test]
fn sigkill_and_sigterm_mid_burst_lose_nothing() {
    let redis = Redis::start();
    // 600 tasks: short sleeps and small prime counts, so hundreds are in flight across workers.
    let tasks: Vec<_> = (0..600)
        .map(|i| {
            if i % 3 == 0 {
                task("tasks.cpu_bound", vec![json!(20_000)])
            } else {
                task("tasks.io_bound", vec![json!(0.05 + (i % 5) as f64 * 0.05)])
            }
        })
        .collect();
    let ids = enqueue(&redis, &tasks);
    let flags =
        ["--concurrency", "8", "--visibility-timeout", "3", "--restore-interval", "1", "--shutdown-timeout", "30"];
    let mut killed = Worker::start(&redis, &flags);
    let mut stopped = Worker::start(&redis, &flags);
    let survivor = Worker::start(&redis, &flags);
    wait_for("a third of the burst done", Duration::from_secs(60), || (redis.depth("celery") < 400).then_some(()));

    assert!(redis.unacked() > 0, "messages are in flight when the kill lands");
    killed.signal("KILL");
    stopped.signal("TERM");
    let status = stopped.wait_exit(Duration::from_secs(40));
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0; log:\n{}", stopped.log_text());
    assert!(!killed.wait_exit(Duration::from_secs(5)).success());

    wait_all(&redis, &ids, "SUCCESS", Duration::from_secs(120));
    assert_eq!(redis.depth("celery"), 0);
    wait_for("unacked to empty", Duration::from_secs(10), || (redis.unacked() == 0).then_some(()));

    let mut runs: HashMap<String, Vec<&str>> = HashMap::new();
    for (name, w) in [("killed", &killed), ("stopped", &stopped), ("survivor", &survivor)] {
        for id in w.started_task_ids() {
            runs.entry(id).or_default().push(name);
        }
    }
    assert_eq!(runs.len(), ids.len(), "every task ran");
    for (id, who) in &runs {
        if who.len() > 1 {
            // At-least-once: only a task the SIGKILLed worker had started may run again.
            assert!(who.contains(&"killed") && !who.contains(&"stopped"), "{id} ran on {who:?}");
        }
    }
    let stopped_runs = stopped.started_task_ids().len();
    assert!(stopped_runs > 0, "the SIGTERMed worker had work");
    let restored: f64 = survivor.metric("celery_worker_restored_total", "");
    assert!(restored > 0.0, "the survivor restored the killed worker's messages after the visibility timeout");
}

#[test]
fn sigterm_puts_back_what_it_cannot_finish_and_exits_zero() {
    let redis = Redis::start();
    // Two long tasks occupy both slots; a third waits in Redis.
    let long: Vec<_> = (0..3).map(|_| task("tasks.io_bound", vec![json!(5)])).collect();
    let ids = enqueue(&redis, &long);
    let mut w = Worker::start(&redis, &["--concurrency", "2", "--shutdown-timeout", "1"]);
    wait_for("two tasks running", Duration::from_secs(10), || {
        (w.metric("celery_worker_active_tasks", "") == 2.0).then_some(())
    });
    let t0 = Instant::now();
    w.signal("TERM");
    wait_for("readyz 503 while draining", Duration::from_secs(2), || match w.http_get("/readyz") {
        Some((503, _)) | None => Some(()),
        _ => None,
    });
    assert_eq!(w.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert!(t0.elapsed() < Duration::from_secs(4), "stopped within the shutdown timeout: {:?}", t0.elapsed());
    assert_eq!(redis.unacked(), 0, "nothing left in unacked");
    assert_eq!(redis.depth("celery"), 3, "both running tasks are back in the queue");
    let front: Vec<String> = redis.conn(0).lrange("celery", -2, -1).unwrap();
    for m in &front {
        assert!(m.contains("\"redelivered\": true"), "put back with kombu's redelivered flag");
    }
    // Another worker finishes them.
    let _w2 = Worker::start(&redis, &["--concurrency", "3"]);
    wait_all(&redis, &ids, "SUCCESS", Duration::from_secs(30));
}

#[test]
fn held_eta_tasks_go_back_on_sigterm_and_a_second_signal_stops_at_once() {
    let redis = Redis::start();
    let mut scheduled = task("tasks.io_bound", vec![json!(0)]);
    scheduled.eta = Some(chrono::Utc::now() + chrono::Duration::seconds(60));
    enqueue(&redis, &[scheduled]);
    let mut w = Worker::start(&redis, &["--concurrency", "1"]);
    wait_for("ETA task held", Duration::from_secs(10), || {
        (redis.unacked() == 1 && redis.depth("celery") == 0).then_some(())
    });
    w.signal("TERM");
    assert_eq!(w.wait_exit(Duration::from_secs(5)).code(), Some(0));
    assert_eq!((redis.depth("celery"), redis.unacked()), (1, 0), "held ETA task returned to the queue");

    // Second signal: a long task and a generous shutdown timeout; SIGINT after SIGTERM skips the wait.
    let redis = Redis::start();
    let ids = enqueue(&redis, &[task("tasks.io_bound", vec![json!(30)])]);
    let mut w = Worker::start(&redis, &["--concurrency", "1", "--shutdown-timeout", "60"]);
    wait_for("task running", Duration::from_secs(10), || {
        (w.metric("celery_worker_active_tasks", "") == 1.0).then_some(())
    });
    w.signal("TERM");
    std::thread::sleep(Duration::from_millis(500));
    assert!(w.child.try_wait().unwrap().is_none(), "first signal waits for the running task");
    let t0 = Instant::now();
    w.signal("INT");
    assert_eq!(w.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert_eq!((redis.depth("celery"), redis.unacked()), (1, 0), "the running task is back in the queue");
    assert_eq!(redis.status(&ids[0]), None);
}

#[test]
fn garbage_is_rejected_counted_kept_and_the_worker_keeps_going() {
    let redis = Redis::start();
    let w = Worker::start(&redis, &["--concurrency", "2"]);
    let mut c = redis.conn(0);
    let before = enqueue(&redis, &[task("tasks.cpu_bound", vec![json!(100)])]);
    let good = task("tasks.cpu_bound", vec![json!(10)]);
    let (good_bytes, _) = good.to_message("gen0@tests");
    let mut envelope: serde_json::Value = serde_json::from_slice(&good_bytes).unwrap();
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut e = envelope.clone();
        f(&mut e);
        serde_json::to_vec(&e).unwrap()
    };
    let bad_base64_id = "00000000-0000-4000-8000-00000000bad1";
    let pickle_id = "00000000-0000-4000-8000-00000000bad2";
    let garbage: Vec<Vec<u8>> = vec![
        b"this is not json".to_vec(),
        b"".to_vec(),
        vec![0xff, 0xfe, 0x00, 0x7b],
        b"[1, 2, 3]".to_vec(),
        b"{}".to_vec(),
        "[".repeat(100_000).into_bytes(),
        with(&|e| {
            e["headers"]["id"] = json!(bad_base64_id);
            e["body"] = json!("%%% not base64 %%%");
        }),
        with(&|e| {
            e["headers"]["id"] = json!(pickle_id);
            e["content-type"] = json!("application/x-python-serialize");
        }),
        with(&|e| e["headers"]["eta"] = json!("next tuesday")),
        with(&|e| e["headers"]["timelimit"] = json!("fast")),
        with(&|e| e["headers"]["compression"] = json!("application/x-bz2")),
        with(&|e| e["body"] = json!(base64_of(b"{\"not\": \"a list\"}"))),
        with(&|e| {
            e["headers"].as_object_mut().unwrap().remove("task");
        }),
    ];
    for g in &garbage {
        let _: () = c.lpush("celery", g).unwrap();
    }
    envelope["headers"]["id"] = json!("ignored");
    let after = enqueue(&redis, &(0..20).map(|_| task("tasks.cpu_bound", vec![json!(1000)])).collect::<Vec<_>>());
    wait_all(&redis, &before, "SUCCESS", Duration::from_secs(20));
    wait_all(&redis, &after, "SUCCESS", Duration::from_secs(20));
    assert!(w.http_get("/healthz").is_some_and(|(s, _)| s == 200), "still alive");
    let rejected = w.metric("celery_task_rejected_total", "");
    assert_eq!(rejected, garbage.len() as f64, "every bad message counted once");
    assert_eq!(w.metric("celery_task_rejected_total", "reason=\"malformed\""), 7.0);
    let kept: usize = c.llen("celery-autoscale.rejected").unwrap();
    assert_eq!(kept, garbage.len(), "the raw bytes of every unreadable message are kept");
    // The callers of the two identifiable bad messages get a FAILURE, not a hang.
    let bad = redis.result(bad_base64_id).unwrap();
    assert_eq!((&bad["status"], &bad["result"]["exc_type"]), (&json!("FAILURE"), &json!("DecodeError")));
    let pickle = redis.result(pickle_id).unwrap();
    assert_eq!(pickle["result"]["exc_type"], "ContentDisallowed");
    assert_eq!(redis.unacked(), 0);
}

fn base64_of(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[test]
fn a_redis_outage_loses_nothing_and_readiness_follows_it() {
    let mut redis = Redis::start();
    // A take whose reply dies with Redis (executed and persisted, never read) is held by nobody
    // and comes back when it falls due (tests/leases.rs); a short visibility timeout keeps that
    // inside this test's wait. Everything else must survive the outage as it is.
    let w = Worker::start(&redis, &["--concurrency", "4", "--visibility-timeout", "10"]);
    let first = enqueue(&redis, &(0..80).map(|_| task("tasks.io_bound", vec![json!(0.1)])).collect::<Vec<_>>());
    wait_for("some progress", Duration::from_secs(20), || (redis.depth("celery") < 70).then_some(()));
    redis.stop();
    wait_for("readyz 503 while Redis is down", Duration::from_secs(10), || {
        w.http_get("/readyz").and_then(|(s, _)| (s == 503).then_some(()))
    });
    wait_for("redis_connected gauge 0", Duration::from_secs(10), || {
        (w.metric("celery_worker_redis_connected", "") == 0.0).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    redis.restart();
    wait_for("readyz 200 after Redis returns", Duration::from_secs(20), || {
        w.http_get("/readyz").and_then(|(s, _)| (s == 200).then_some(()))
    });
    let second = enqueue(&redis, &(0..20).map(|_| task("tasks.io_bound", vec![json!(0.01)])).collect::<Vec<_>>());
    wait_all(&redis, &first, "SUCCESS", Duration::from_secs(60));
    wait_all(&redis, &second, "SUCCESS", Duration::from_secs(30));
    wait_for("unacked empty", Duration::from_secs(10), || (redis.unacked() == 0).then_some(()));
    assert!(w.log_text().contains("retrying with backoff"), "the outage was logged");
}

#[test]
fn we_restore_what_a_killed_python_worker_held() {
    let redis = Redis::start();
    let ids = enqueue(&redis, &(0..4).map(|_| task("tasks.io_bound", vec![json!(2)])).collect::<Vec<_>>());
    // acks_late, prefetch 2 × concurrency 1: the Python worker holds two messages in unacked.
    let mut py =
        PythonWorker::start(&redis, &["--concurrency", "1", "--pool", "prefork"], &[("PREFETCH_MULTIPLIER", "2")]);
    wait_for("python worker holding messages", Duration::from_secs(20), || (redis.unacked() == 2).then_some(()));
    py.sigkill();
    assert_eq!(redis.unacked(), 2, "a SIGKILLed Python worker leaves its messages in unacked");
    let w = Worker::start(&redis, &["--concurrency", "4", "--visibility-timeout", "2", "--restore-interval", "1"]);
    wait_all(&redis, &ids, "SUCCESS", Duration::from_secs(30));
    assert!(w.metric("celery_worker_restored_total", "") >= 2.0);
    assert_eq!(redis.unacked(), 0);
}

#[test]
fn a_python_worker_restores_what_we_held_when_killed() {
    let redis = Redis::start();
    let ids = enqueue(&redis, &(0..3).map(|_| task("tasks.io_bound", vec![json!(3)])).collect::<Vec<_>>());
    let mut w = Worker::start(&redis, &["--concurrency", "2"]);
    wait_for("our worker holding messages", Duration::from_secs(10), || (redis.unacked() == 2).then_some(()));
    w.signal("KILL");
    w.wait_exit(Duration::from_secs(5));
    assert_eq!(redis.unacked(), 2, "our unacked entries stay after SIGKILL");
    // kombu restores entries older than its visibility_timeout when its consumer starts.
    std::thread::sleep(Duration::from_secs(3));
    let py = PythonWorker::start(&redis, &["--concurrency", "2", "--pool", "threads"], &[("VISIBILITY_TIMEOUT", "2")]);
    wait_all(&redis, &ids, "SUCCESS", Duration::from_secs(60));
    assert!(py.log_text().contains("tasks.io_bound"), "the Python worker ran them");
    wait_for("unacked empty", Duration::from_secs(10), || (redis.unacked() == 0).then_some(()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stored_success_is_never_overwritten_and_every_store_is_published() {
    use celery_autoscale::transport::backend::{Backend, Stored};
    use celery_autoscale::wire::{ExceptionInfo, ResultMeta};
    let redis = Redis::start();
    let conn =
        celery_autoscale::transport::connection::connect("BACKEND_URL", &redis.url(1), None, Duration::from_secs(5))
            .unwrap();
    let backend = Backend::new(conn, Duration::from_secs(120));
    let id = "00000000-0000-4000-8000-00000000c0de";
    let channel = format!("celery-task-meta-{id}");
    let mut sub = redis::Client::open(redis.url(1)).unwrap().get_connection().unwrap();
    let mut pubsub = sub.as_pubsub();
    pubsub.subscribe(&channel).unwrap();
    pubsub.set_read_timeout(Some(Duration::from_millis(500))).unwrap();

    let now = chrono::Utc::now();
    let retry = ResultMeta::retry(id, "tasks.flaky", &ExceptionInfo::builtin("RuntimeError", "once"));
    assert_eq!(backend.store(&retry).await.unwrap(), Stored::Written, "RETRY may be replaced");
    assert_eq!(backend.store(&ResultMeta::success(id, json!(42), now)).await.unwrap(), Stored::Written);
    let late_failure = ResultMeta::failure(id, "tasks.flaky", &ExceptionInfo::builtin("RuntimeError", "late"), now);
    assert_eq!(backend.store(&late_failure).await.unwrap(), Stored::KeptSuccess);
    let stored = redis.result(id).unwrap();
    assert_eq!((&stored["status"], &stored["result"]), (&json!("SUCCESS"), &json!(42)));
    let ttl: i64 = redis.conn(1).ttl(&channel).unwrap();
    assert!((100..=120).contains(&ttl), "SETEX with result_expires: {ttl}");
    // RETRY and SUCCESS were published on the key's channel, the refused FAILURE was not.
    let published: Vec<String> =
        std::iter::from_fn(|| pubsub.get_message().ok()).map(|m| m.get_payload::<String>().unwrap()).collect();
    assert_eq!(published.len(), 2, "{published:?}");
    assert!(published[0].contains("\"RETRY\"") && published[1].contains("\"SUCCESS\""));
}
