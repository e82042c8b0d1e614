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

/// Concurrency 1 and three tasks: the 1st take reply (the fetcher's, task 1) and the 3rd (the
/// finish script of task 2 taking task 3) are discarded, so both kinds of take strand a message
/// in `unacked`. At the default visibility timeout (an hour) the restorer would bring them back
/// only then; the take marker finds them as soon as Redis answers again, so all three run, once,
/// within seconds, and nothing is restored.
#[test]
fn a_take_whose_reply_is_lost_runs_once_within_seconds_at_the_default_visibility_timeout() {
    let redis = Redis::start();
    let w = Worker::spawn_with_env(
        &redis,
        free_port(),
        &["--concurrency", "1"],
        &[(celery_autoscale::transport::broker::DROP_TAKE_REPLIES_ENV, "1,3")],
    );
    w.wait_ready(Duration::from_secs(20));
    let ids = enqueue(&redis, &[0, 1, 2].map(|_| task("tasks.io_bound", vec![json!(0.1)])));
    wait_all(&redis, &ids, "SUCCESS", Duration::from_secs(10));

    let discarded: Vec<String> = w
        .log_events()
        .into_iter()
        .filter(|e| e["message"].as_str().is_some_and(|m| m.contains("discarding a take reply")))
        .map(|e| e["via"].as_str().unwrap_or("?").to_owned())
        .collect();
    // The first take is the fetcher's: a take after finding the queue busy ("fetch") or the take
    // queued behind an idle wait ("wait"); the third is task 2's finish script taking task 3.
    assert!(
        discarded.len() == 2 && ["fetch", "wait"].contains(&discarded[0].as_str()) && discarded[1] == "finish",
        "the hook dropped a fetcher's reply and a finish reply ({discarded:?}):\n{}",
        w.log_text()
    );
    assert_eq!(restores(&w), vec![], "nothing waited for the visibility timeout");
    let reclaimed = w
        .log_events()
        .into_iter()
        .filter(|e| {
            e["message"].as_str().is_some_and(|m| m.contains("a take whose reply was lost had taken a message"))
        })
        .count();
    assert_eq!(reclaimed, 2, "both stranded messages were found through the take marker:\n{}", w.log_text());
    let mut started = w.started_task_ids();
    started.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(started, want, "each ran exactly once");
    wait_for("unacked to empty", Duration::from_secs(10), || (redis.unacked() == 0).then_some(()));
    for id in &ids {
        let entry: Option<Value> = redis.result(id);
        assert_eq!(entry.map(|r| r["result"].clone()), Some(json!(0.1)), "{id}");
    }
    // The worker's take notes (one hash, which Redis deletes when it is empty) are emptied by
    // the idle takes that follow.
    let mut c = redis.conn(0);
    wait_for("the take marker to empty", Duration::from_secs(10), || {
        let markers: Vec<String> = c.keys("celery-autoscale.taking.*").unwrap();
        assert!(markers.len() <= 1, "one marker per worker process: {markers:?}");
        markers.iter().all(|m| c.hlen::<_, usize>(m).unwrap() == 0).then_some(())
    });
}

/// The take script records a message under `properties.delivery_tag`, whatever the layout, and
/// never under a key of the same name elsewhere in the envelope.
#[test]
fn the_take_records_the_properties_delivery_tag_whatever_the_layout() {
    use celery_autoscale::transport::broker::{Fetcher, TakeList};
    use celery_autoscale::transport::connection::connect;
    use celery_autoscale::wire::PrioritySteps;

    let redis = Redis::start();
    let (bytes, kombu_tag) = task("tasks.io_bound", vec![json!(0)]).to_message("gen0@tests");
    let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        ("kombu layout", bytes, Some(kombu_tag.as_str())),
        (
            "compact, properties first",
            br#"{"properties":{"delivery_tag":"P1","delivery_info":{"exchange":"","routing_key":"celery"}},"body":"e30="}"#
                .to_vec(),
            Some("P1"),
        ),
        (
            "the only delivery_tag is in a sibling object",
            br#"{"properties": {"priority": 0}, "headers": {"delivery_tag": "H"}, "body": "e30="}"#.to_vec(),
            None,
        ),
        (
            "a header key of the same name before properties",
            br#"{"headers": {"delivery_tag": "H"}, "properties": {"delivery_info": {"exchange": ""}, "delivery_tag": "P2"}}"#
                .to_vec(),
            Some("P2"),
        ),
        (
            "nested object inside properties before the tag",
            br#"{"body": "e30=", "properties": {"delivery_info": {"exchange": "", "routing_key": "celery"}, "delivery_tag": "P3"}}"#
                .to_vec(),
            Some("P3"),
        ),
        ("not JSON", b"\x00garbage".to_vec(), None),
    ];
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let steps = PrioritySteps::default();
        let queues = vec!["celery".to_owned()];
        let conn = || connect("BROKER_URL", &redis.url(0), None, Duration::from_secs(10)).unwrap();
        let lists = std::sync::Arc::new(TakeList::new(&queues, &steps));
        let waits = (0..lists.keys().len()).map(|_| conn()).collect();
        let mut fetcher = Fetcher::new(conn(), waits, lists);
        for (what, bytes, want) in cases {
            let _: () = redis.conn(0).lpush("celery", &bytes).unwrap();
            let taken = fetcher.try_take().await.unwrap().unwrap_or_else(|| panic!("{what}: nothing taken"));
            assert_eq!(taken.bytes, bytes, "{what}");
            assert_eq!(taken.recorded_as.as_deref(), want, "{what}");
            let entry: Option<Vec<u8>> = redis.conn(0).hget("unacked", want.unwrap_or("H")).unwrap();
            assert_eq!(entry.is_some(), want.is_some(), "{what}: recorded in unacked iff a tag was found");
            if let Some(tag) = want {
                let score: Option<f64> = redis.conn(0).zscore("unacked_index", tag).unwrap();
                assert!(score.is_some(), "{what}: indexed");
                let _: () = redis.conn(0).hdel("unacked", tag).unwrap();
                let _: () = redis.conn(0).zrem("unacked_index", tag).unwrap();
            }
        }
    });
}

/// The finish script: the result is stored, the message acknowledged and the next one taken
/// (and recorded in `unacked`) in one step; a stored SUCCESS is kept and the message still
/// acknowledged; with nothing to store or take it is a plain ack.
#[test]
fn a_finish_stores_acks_and_takes_the_next_message_in_one_script() {
    use celery_autoscale::transport::backend::{Backend, Stored, shared_broker_db};
    use celery_autoscale::transport::broker::{Broker, TakeList};
    use celery_autoscale::transport::connection::connect;
    use celery_autoscale::wire::{PrioritySteps, ResultMeta};

    let redis = Redis::start();
    assert_eq!(shared_broker_db(&redis.url(0), &redis.url(1)), Some(0));
    let mut c0 = redis.conn(0);
    for tag in ["T", "U", "V"] {
        let _: () = c0.hset("unacked", tag, "[{}, \"\", \"celery\"]").unwrap();
        let _: () = c0.zadd("unacked_index", tag, 1.0).unwrap();
    }
    let (next, next_tag) = task("tasks.io_bound", vec![json!(0)]).to_message("gen0@tests");
    let _: () = c0.lpush("celery", &next).unwrap();

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let connect = |db| connect("BROKER_URL", &redis.url(db), None, Duration::from_secs(10)).unwrap();
        let steps = PrioritySteps::default();
        let broker = Broker::new(connect(0), steps.clone());
        let backend = Backend::new(connect(1), Duration::from_secs(60)).with_shared_broker(Some(0));
        let lists = TakeList::new(&["celery".to_owned()], &steps);

        let ok = backend.shared_store(&ResultMeta::success("id-1", json!(4), Utc::now())).expect("shared server");
        let done = broker.finish("T", Some(&ok), Some(&lists), 1e9).await.unwrap();
        assert_eq!(done.stored, Some(Stored::Written));
        let taken = done.next.expect("the queued message was taken");
        assert_eq!((taken.key.as_str(), taken.bytes.as_slice()), ("celery", next.as_slice()));
        assert_eq!(taken.recorded_as.as_deref(), Some(next_tag.as_str()), "recorded by the take");

        let again = backend.shared_store(&ResultMeta::success("id-1", json!(5), Utc::now())).unwrap();
        let done = broker.finish("U", Some(&again), Some(&lists), 1e9).await.unwrap();
        assert_eq!(done.stored, Some(Stored::KeptSuccess), "a stored SUCCESS is kept");
        assert!(done.next.is_none(), "the queue is empty");

        let done = broker.finish("V", None, None, 1e9).await.unwrap();
        assert_eq!((done.stored, done.next.is_none()), (None, true), "a plain ack");

        let elsewhere = Backend::new(connect(1), Duration::ZERO);
        assert!(
            elsewhere.shared_store(&ResultMeta::success("id-2", json!(4), Utc::now())).is_none(),
            "no shared server"
        );
    });
    assert_eq!(redis.result("id-1").map(|r| r["result"].clone()), Some(json!(4)));
    let left: Vec<String> = c0.hkeys("unacked").unwrap();
    assert_eq!(left, std::slice::from_ref(&next_tag), "T, U, V acknowledged; the taken message recorded");
    let score: Option<f64> = c0.zscore("unacked_index", &next_tag).unwrap();
    assert_eq!(score, Some(1e9), "indexed at the finish's time");
    let ttl: i64 = redis.conn(1).ttl("celery-task-meta-id-1").unwrap();
    assert!(ttl > 0 && ttl <= 60, "stored with result_expires: {ttl}");
}
