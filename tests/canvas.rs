//! Celery's canvas with real Python Celery 5.7 as the client and our worker running the tasks:
//! chords joined on the Redis backend exactly as Celery's own workers join them, so a Python
//! worker and ours can share one chord. The chord keys are compared with what a Python worker
//! leaves (tests/fixtures/celery/chord/, captured by this file: `CAPTURE_CELERY_FIXTURES=1
//! cargo test --test canvas chord_keys` runs the same cases on a Python worker and writes them).

mod common;

use common::{PythonWorker, Redis, Worker, fixtures, run_python, wait_for};
use redis::Commands;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const GROUP_ID: &str = "00000000-0000-4000-8000-00000000c000";

fn canvas(redis: &Redis, args: &[&str], timeout: Duration) -> Value {
    let env = [("BROKER_URL", redis.url(0)), ("BACKEND_URL", redis.url(1))];
    let out = run_python("canvas.py", args, &env, timeout);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("canvas.py printed non-JSON ({e}): {out}"))
}

fn python_worker(redis: &Redis, queues: &str, env: &[(&str, &str)]) -> PythonWorker {
    PythonWorker::start(redis, &["-Q", queues, "-c", "2"], env)
}

/// What `canvas.py args` prints when a Python 5.7 worker runs the tasks, on a Redis of its own:
/// the reference each interop test compares ours with.
fn on_a_python_worker(args: &[&str], timeout: Duration) -> Value {
    let redis = Redis::start();
    let _w = python_worker(&redis, "celery", &[]);
    canvas(&redis, args, timeout)
}

#[test]
fn a_python_chord_gives_what_a_python_worker_gives() {
    let ns = "[10, 100, 1000, 10000, 2, 0]";
    let python = on_a_python_worker(&["chord", ns], Duration::from_secs(120));
    let redis = Redis::start();
    let worker = Worker::start(&redis, &["--concurrency", "2"]);
    let ours = canvas(&redis, &["chord", ns], Duration::from_secs(120));
    assert_eq!(ours["value"], python["value"], "ours {ours}, Python's {python}");
    assert_eq!(ours["value"], json!(4 + 25 + 168 + 1229 + 1));
    assert_eq!(ours["piped"], ours["value"], "group(...) | task is the same chord");
    assert_eq!(python["piped"], python["value"]);
    let body = redis.result(ours["id"].as_str().unwrap()).unwrap();
    assert_eq!(body["status"], "SUCCESS");
    assert_eq!(worker.metric("celery_task_success_total", "tasks.xsum"), 2.0);
    assert_eq!(worker.metric("celery_task_rejected_total", ""), 0.0, "nothing rejected");
    // The join is cleaned up as Celery does: only `.c` = done is left, for 300 s.
    let keys: Vec<String> = redis.conn(1).keys("celery-taskset-meta-*").unwrap();
    assert_eq!(keys.len(), 2, "{keys:?}");
    for key in keys {
        assert!(key.ends_with(".c"), "{key}");
        assert_eq!(redis.conn(1).get::<_, String>(&key).unwrap(), "done");
    }
    assert_eq!(redis.unacked(), 0);
}

#[test]
fn a_failing_header_member_gives_the_bodys_errback_a_chord_error() {
    let python = on_a_python_worker(&["fail"], Duration::from_secs(120));
    let redis = Redis::start();
    let worker = Worker::start(&redis, &["--concurrency", "2"]);
    let out = canvas(&redis, &["fail"], Duration::from_secs(120));
    let kind = |o: &Value| (o["ok"].clone(), o["exc_module"].clone(), o["exc_type"].clone());
    for what in ["get", "body"] {
        assert_eq!(kind(&out[what]), kind(&python[what]), "{what}: ours {out}, Python's {python}");
    }
    // `.get()` re-raises the member's TypeError, as with a Python worker; the body holds the
    // ChordError, worded as Celery words it.
    assert_eq!(kind(&out["get"]), (json!(false), json!("builtins"), json!("TypeError")));
    assert_eq!(kind(&out["body"]), (json!(false), json!("celery.exceptions"), json!("ChordError")));
    let msg = out["body"]["exc_args"][0].as_str().unwrap();
    let tail = " raised TypeError(\"unsupported operand type(s) for +: 'int' and 'str'\")";
    assert!(msg.starts_with("Dependency ") && msg.ends_with(tail), "{msg}");
    assert_eq!(out["state"], "FAILURE");
    // The errback got the body's id: io_bound("<id>") fails with a TypeError naming a str,
    // exactly as on a Python worker; under that id it finds the ChordError.
    let errback_id = out["errback_id"].as_str().unwrap();
    let errback = wait_for("the errback's result", Duration::from_secs(20), || redis.result(errback_id));
    assert_eq!(errback["status"], "FAILURE");
    assert!(errback["result"]["exc_message"][0].as_str().unwrap().contains("not str"), "{errback}");
    assert_eq!(errback["parent_id"], out["id"], "called for the body");
    assert_eq!(worker.metric("celery_task_failure_total", "tasks.xsum"), 2.0, "the member and the body");
    assert_eq!(redis.unacked(), 0);
}

#[test]
fn a_retried_member_keeps_its_place_and_counts_once() {
    let redis = Redis::start();
    let worker = Worker::start(&redis, &["--concurrency", "2"]);
    let out = canvas(&redis, &["retry"], Duration::from_secs(120));
    assert_eq!(out["value"], json!(1 + 4), "flaky returns its retry count, 1");
    assert_eq!(worker.metric("celery_task_retried_total", "tasks.flaky"), 1.0);
    assert_eq!(worker.metric("celery_task_success_total", "tasks.xsum"), 1.0);
}

/// Sum of `tasks.xsum` body messages in `bodyq` (nobody consumes it): how many times a
/// chord's body was sent.
fn bodies_sent(redis: &Redis) -> usize {
    redis.depth("bodyq")
}

#[test]
fn a_mixed_fleet_sends_each_body_exactly_once() {
    let redis = Redis::start();
    let python = python_worker(&redis, "celery", &[]);
    let ours = Worker::start(&redis, &["--concurrency", "2"]);
    let rounds = 6;
    let mut members = Vec::new();
    for _ in 0..rounds {
        let sent = canvas(&redis, &["send", "30"], Duration::from_secs(60));
        let gid = sent["group"].as_str().unwrap().to_owned();
        let ids: Vec<String> = sent["members"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().into()).collect();
        members.push((gid, ids));
    }
    for (gid, ids) in &members {
        common::wait_all(&redis, ids, "SUCCESS", Duration::from_secs(120));
        // The body is sent before the join is marked done, and only then.
        wait_for("the chord's cleanup", Duration::from_secs(30), || {
            let c: Option<String> = redis.conn(1).get(format!("celery-taskset-meta-{gid}.c")).unwrap();
            (c.as_deref() == Some("done")).then_some(())
        });
    }
    assert_eq!(bodies_sent(&redis), rounds, "one body per chord");
    let bodies: Vec<String> = redis.conn(0).lrange("bodyq", 0, -1).unwrap();
    let mut args: Vec<Value> = bodies
        .iter()
        .map(|b| {
            let env: Value = serde_json::from_str(b).unwrap();
            use base64::Engine as _;
            let body = base64::engine::general_purpose::STANDARD.decode(env["body"].as_str().unwrap()).unwrap();
            serde_json::from_slice::<Value>(&body).unwrap()[0][0].clone()
        })
        .collect();
    args.dedup();
    assert_eq!(args.len(), 1, "every chord had the same header, in order: {args:?}");
    let expected: Vec<u64> = (0..30).map(|i| count_primes(200 + i)).collect();
    assert_eq!(args[0], json!(expected), "the header's results in group_index order");
    let ran_here = ours.started_task_ids().len();
    let ran_there = python.log_text().matches("Task tasks.cpu_bound[").count();
    assert!(ran_here > 0 && ran_there > 0, "both workers ran header tasks: ours {ran_here}, Python's {ran_there}");
    let sent_here = ours.log_events().iter().filter(|e| e["message"] == "chord complete; sending its body").count();
    eprintln!("of {rounds} chord bodies, our worker sent {sent_here} and Python's {}", rounds - sent_here);
}

fn count_primes(n: u64) -> u64 {
    (2..=n).filter(|i| (2..*i).take_while(|d| d * d <= *i).all(|d| i % d != 0)).count() as u64
}

#[test]
fn a_10000_member_chord_completes() {
    let redis = Redis::start();
    // Python sends the whole header first; then our worker drains it and joins.
    let sent = canvas(&redis, &["big", "10000"], Duration::from_secs(600));
    let body_id = sent["body"].as_str().unwrap().to_owned();
    assert_eq!(redis.depth("celery"), 10_000);
    let worker = Worker::start(&redis, &["--concurrency", "4"]);
    let started = Instant::now();
    let body = wait_for("the body's result", Duration::from_secs(600), || redis.result(&body_id));
    eprintln!(
        "10000-member chord: Python sent the header in {:.1} s; our worker ran the 10000 members, joined them and ran the body in {:.1} s",
        sent["send_seconds"].as_f64().unwrap(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!((body["status"].as_str(), &body["result"]), (Some("SUCCESS"), &json!(40_000)));
    assert_eq!(worker.metric("celery_task_success_total", "tasks.cpu_bound"), 10_000.0);
    assert_eq!(worker.metric("celery_task_success_total", "tasks.xsum"), 1.0);
}

/// Every chord key of [`GROUP_ID`]: type, value (sets sorted, sorted sets with their scores)
/// and whether it expires, with its TTL rounded to the minute (a run takes seconds).
fn snapshot(redis: &Redis) -> Value {
    let mut c = redis.conn(1);
    let mut out = serde_json::Map::new();
    for suffix in ["", ".j", ".t", ".s", ".d", ".c"] {
        let key = format!("celery-taskset-meta-{GROUP_ID}{suffix}");
        let kind: String = redis::cmd("TYPE").arg(&key).query(&mut c).unwrap();
        let value = match kind.as_str() {
            "none" => continue,
            "zset" => {
                let v: Vec<(String, String)> = c.zrange_withscores(&key, 0, -1).unwrap();
                json!(v)
            }
            "list" => json!(c.lrange::<_, Vec<String>>(&key, 0, -1).unwrap()),
            "set" => {
                let mut v: Vec<String> = c.smembers(&key).unwrap();
                v.sort();
                json!(v)
            }
            "string" => {
                let v: String = c.get(&key).unwrap();
                // The claim's token is random, and lapses within seconds: not compared.
                if suffix == ".c" && v != "done" {
                    continue;
                }
                json!(v)
            }
            other => json!(format!("<{other}>")),
        };
        let ttl: i64 = c.ttl(&key).unwrap();
        let ttl = if ttl < 0 { json!(ttl) } else { json!((ttl + 30) / 60 * 60) };
        out.insert(suffix.to_owned(), json!({"type": kind, "value": value, "ttl": ttl}));
    }
    Value::Object(out)
}

/// The fields of a message that do not vary between runs (ids are fixed by the case).
fn message_fields(raw: &str) -> Value {
    let env: Value = serde_json::from_str(raw).unwrap();
    let h = &env["headers"];
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.decode(env["body"].as_str().unwrap()).unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    json!({
        "task": h["task"], "id": h["id"], "root_id": h["root_id"], "parent_id": h["parent_id"],
        "eta": h["eta"], "expires": h["expires"], "retries": h["retries"], "timelimit": h["timelimit"],
        "args": body[0], "kwargs": body[1],
        "routing_key": env["properties"]["delivery_info"]["routing_key"],
    })
}

/// The worker of a fixture case (kept until the case ends).
struct Side {
    _python: Option<PythonWorker>,
    _ours: Option<Worker>,
}

fn start(redis: &Redis, case: &str) -> Side {
    let capture = std::env::var("CAPTURE_CELERY_FIXTURES").is_ok_and(|v| v == "1");
    if capture {
        let env: &[(&str, &str)] = if case == "list" { &[("CHORD_ORDERED", "0")] } else { &[] };
        Side { _python: Some(python_worker(redis, "celery", env)), _ours: None }
    } else {
        let ordered = if case == "list" { "false" } else { "true" };
        Side {
            _python: None,
            _ours: Some(Worker::start(redis, &["--concurrency", "1", "--result-chord-ordered", ordered])),
        }
    }
}

/// Run fixture case `case` on a Python worker (capture) or ours; returns what it left.
fn run_case(case: &str) -> Value {
    let redis = Redis::start();
    let side = start(&redis, case);
    canvas(&redis, &["keys", case], Duration::from_secs(60));
    let id = |n: u32| format!("00000000-0000-4000-8000-00000000c00{n}");
    let mut record = serde_json::Map::new();
    if case == "fail" {
        let body = wait_for("the body's FAILURE", Duration::from_secs(30), || redis.result(&id(3)));
        wait_for("the errback message", Duration::from_secs(30), || (redis.depth("errq") == 1).then_some(()));
        record.insert("body_result".into(), json!({"status": body["status"], "result": body["result"]}));
        let errback: Vec<String> = redis.conn(0).lrange("errq", 0, -1).unwrap();
        record.insert("errback".into(), message_fields(&errback[0]));
        record.insert("keys_after".into(), snapshot(&redis));
    } else {
        wait_for("member 0's result", Duration::from_secs(30), || redis.result(&id(1)));
        wait_for("member 0 acknowledged", Duration::from_secs(30), || (redis.unacked() == 0).then_some(()));
        record.insert("keys_after_one".into(), snapshot(&redis));
        let _: Option<String> = redis.conn(0).rpoplpush("hold", "celery").unwrap();
        wait_for("the body message", Duration::from_secs(30), || (redis.depth("bodyq") == 1).then_some(()));
        wait_for("the cleanup", Duration::from_secs(30), || {
            let c: Option<String> = redis.conn(1).get(format!("celery-taskset-meta-{GROUP_ID}.c")).unwrap();
            (c.as_deref() == Some("done")).then_some(())
        });
        let body: Vec<String> = redis.conn(0).lrange("bodyq", 0, -1).unwrap();
        let fields = message_fields(&body[0]);
        let env: Value = serde_json::from_str(&body[0]).unwrap();
        record.insert("body".into(), fields);
        record.insert("body_group".into(), env["headers"]["group"].clone());
        record.insert("keys_after_all".into(), snapshot(&redis));
    }
    drop(side);
    Value::Object(record)
}

#[test]
fn chord_keys_match_what_celery_leaves() {
    let dir = fixtures().join("chord");
    for case in ["ordered", "list", "fail"] {
        let got = run_case(case);
        let path = dir.join(format!("c_{case}.json"));
        if std::env::var("CAPTURE_CELERY_FIXTURES").is_ok_and(|v| v == "1") {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, serde_json::to_string_pretty(&got).unwrap() + "\n").unwrap();
            continue;
        }
        let want: Value = serde_json::from_slice(&common::read(&path)).unwrap();
        assert_eq!(got, want, "case {case}: ours (left) vs Celery 5.7's (right, {})", path.display());
    }
}

/// A header member as Celery sends it: group, group_index and `embed.chord` = `body`.
fn member_message(id: &str, group: &str, index: i64, body: Value) -> Vec<u8> {
    let mut t = common::task("tasks.cpu_bound", vec![json!(10)]);
    t.id = id.into();
    t.group = Some(group.into());
    t.group_index = Some(index);
    let (bytes, _) = t.to_message("gen0@tests");
    let mut env: Value = serde_json::from_slice(&bytes).unwrap();
    use base64::Engine as _;
    let embed = json!({"callbacks": null, "errbacks": null, "chain": null, "chord": body});
    env["body"] = base64::engine::general_purpose::STANDARD.encode(json!([[10], {}, embed]).to_string()).into();
    serde_json::to_vec(&env).unwrap()
}

#[test]
fn a_redelivered_member_already_stored_still_counts() {
    let redis = Redis::start();
    // Its first run stored SUCCESS and stopped before counting (a killed worker); the copy
    // comes back redelivered.
    let body = json!({"task": "tasks.xsum", "args": [], "kwargs": {}, "options": {"task_id": "body-1", "group_id": "g-r"}, "immutable": false});
    let mut env: Value = serde_json::from_slice(&member_message("m-1", "g-r", 0, body)).unwrap();
    env["headers"]["redelivered"] = json!(true);
    let meta = r#"{"status": "SUCCESS", "result": 7, "traceback": null, "children": [], "date_done": "2026-01-01T00:00:00.000000+00:00", "task_id": "m-1"}"#;
    let _: () = redis.conn(1).set("celery-task-meta-m-1", meta).unwrap();
    let _: () = redis.conn(1).set("celery-taskset-meta-g-r.s", 1).unwrap();
    let _: () = redis.conn(0).lpush("celery", serde_json::to_vec(&env).unwrap()).unwrap();
    let worker = Worker::start(&redis, &["--concurrency", "1"]);
    let body = wait_for("the body's result", Duration::from_secs(30), || redis.result("body-1"));
    assert_eq!((body["status"].as_str(), &body["result"]), (Some("SUCCESS"), &json!(7)), "xsum([7])");
    assert_eq!(worker.metric("celery_worker_duplicates_skipped_total", ""), 1.0, "the member did not run again");
}

#[test]
fn malformed_chords_are_refused_and_counted_and_the_worker_goes_on() {
    let redis = Redis::start();
    let worker = Worker::start(&redis, &["--concurrency", "1"]);
    let plain_body = json!({"task": "tasks.xsum", "args": [], "kwargs": {}, "options": {}, "immutable": false});
    // A group body is applied when the join completes; one whose member is not a signature is
    // refused when the member arrives, naming the form.
    let group_body = json!({"task": "celery.group", "args": [], "kwargs": {"tasks": ["junk"]}, "options": {}, "subtask_type": "group"});
    // A join key of the wrong type (something else wrote it): the script fails inside Redis.
    let _: () = redis.conn(1).set("celery-taskset-meta-g-wrong.j", "not a zset").unwrap();
    let mut c = redis.conn(0);
    for bytes in [
        member_message("m-group-body", "g1", 0, group_body),
        member_message("m-junk-body", "g2", 0, json!("junk")),
        member_message("m-wrong-type", "g-wrong", 0, plain_body.clone()),
    ] {
        let _: () = c.lpush("celery", bytes).unwrap();
    }
    // A chord step whose header holds a group (a Celery client flattens it; this worker does
    // not start such a chord): refused up front, naming the form.
    let nested_header = json!({"task": "celery.group", "args": [], "kwargs": {"tasks": [
        {"task": "celery.group", "args": [], "kwargs": {"tasks": [plain_body.clone()]}, "options": {}, "subtask_type": "group"}
    ]}, "options": {}, "subtask_type": "group"});
    let chord_step = json!({"task": "celery.chord", "args": [], "kwargs": {"header": nested_header, "body": plain_body.clone(), "kwargs": {}}, "options": {}, "subtask_type": "chord"});
    let mut t = common::task("tasks.cpu_bound", vec![json!(10)]);
    t.id = "m-nested-header".into();
    let mut env: Value = serde_json::from_slice(&t.to_message("gen0@tests").0).unwrap();
    use base64::Engine as _;
    let embed = json!({"callbacks": null, "errbacks": null, "chain": [chord_step], "chord": null});
    env["body"] = base64::engine::general_purpose::STANDARD.encode(json!([[10], {}, embed]).to_string()).into();
    let _: () = c.lpush("celery", serde_json::to_vec(&env).unwrap()).unwrap();
    let ids = ["m-group-body".to_owned(), "m-junk-body".to_owned(), "m-nested-header".to_owned()];
    common::wait_all(&redis, &ids, "FAILURE", Duration::from_secs(30));
    let r = redis.result("m-group-body").unwrap();
    assert_eq!(r["result"]["exc_type"], "NotImplementedError");
    assert!(r["result"]["exc_message"][0].as_str().unwrap().contains("chord body.tasks[0] is not a signature"), "{r}");
    // The member whose join cannot be written still runs and succeeds; the join error is
    // logged and counted, and the worker serves on.
    common::wait_all(&redis, &["m-wrong-type".to_owned()], "SUCCESS", Duration::from_secs(30));
    wait_for("the join error counted", Duration::from_secs(10), || {
        (worker.metric("celery_task_rejected_total", "reason=\"chord_join\"") == 1.0).then_some(())
    });
    let r = redis.result("m-nested-header").unwrap();
    assert!(r["result"]["exc_message"][0].as_str().unwrap().contains("header holds a \"group\""), "{r}");
    assert_eq!(worker.metric("celery_task_rejected_total", "reason=\"unsupported_canvas\""), 3.0);
    let after = common::enqueue(&redis, &[common::task("tasks.cpu_bound", vec![json!(100)])]);
    common::wait_all(&redis, &after, "SUCCESS", Duration::from_secs(30));
    wait_for("everything acknowledged", Duration::from_secs(10), || (redis.unacked() == 0).then_some(()));
}

#[test]
fn map_starmap_and_chunks_give_what_a_python_worker_gives() {
    let python = on_a_python_worker(&["maps"], Duration::from_secs(120));
    let redis = Redis::start();
    let worker = Worker::start(&redis, &["--concurrency", "2"]);
    let ours = canvas(&redis, &["maps"], Duration::from_secs(120));
    assert_eq!(ours["map"], json!({"ok": true, "value": [4, 25, 168]}));
    assert_eq!(ours["starmap"], json!({"ok": true, "value": [3, 12, 0]}));
    assert_eq!(ours["chunks"], json!({"ok": true, "value": [[4, 25], [168, 1], [0]]}));
    for what in ["map", "starmap", "chunks"] {
        assert_eq!(ours[what], python[what], "{what}: ours {ours}, Python's {python}");
    }
    // A bad item fails the whole map with the item's TypeError (the texts differ: Python's
    // comes from inside cpu_bound, ours from binding its argument).
    let kind = |o: &Value| (o["ok"].clone(), o["exc_module"].clone(), o["exc_type"].clone());
    assert_eq!(kind(&ours["map_bad_item"]), kind(&python["map_bad_item"]));
    assert_eq!(kind(&ours["map_bad_item"]), (json!(false), json!("builtins"), json!("TypeError")));
    // A mapped task nobody registered: NotRegistered naming it, as from a Python worker.
    assert_eq!(ours["map_not_registered"], python["map_not_registered"], "ours {ours}, Python's {python}");
    assert_eq!(ours["map_not_registered"]["exc_type"], "NotRegistered");
    assert_eq!(ours["map_not_registered"]["exc_args"], json!(["tasks.nobody_has_this"]));
    assert_eq!(worker.metric("celery_task_success_total", "celery.map"), 1.0);
    assert_eq!(worker.metric("celery_task_success_total", "celery.starmap"), 4.0, "one, and one per chunk");
    assert_eq!(worker.metric("celery_task_rejected_total", ""), 0.0);
}

#[test]
fn the_celery_chunks_task_gives_what_a_python_worker_gives() {
    let python = on_a_python_worker(&["chunks_task"], Duration::from_secs(120));
    let redis = Redis::start();
    let worker = Worker::start(&redis, &["--concurrency", "2"]);
    let ours = canvas(&redis, &["chunks_task"], Duration::from_secs(120));
    assert_eq!(ours, python, "ours (left) vs a Python 5.7 worker's (right)");
    // A GroupResult stored as Celery stores it, whose starmaps the worker sent and ran.
    assert_eq!(ours["shape"], json!([2, 2, true, null, [2, 2, 2]]));
    assert_eq!(ours["value"], json!([[4, 25], [168, 1], [0]]));
    assert_eq!(ours["bad_n"]["exc_type"], "ValueError");
    assert_eq!(worker.metric("celery_task_success_total", "celery.chunks"), 1.0);
    assert_eq!(worker.metric("celery_task_success_total", "celery.starmap"), 3.0);
    assert_eq!(worker.metric("celery_task_rejected_total", ""), 0.0);
}

#[test]
fn a_revoked_member_fails_the_chord_as_celery_does() {
    let redis = Redis::start();
    let worker = Worker::start(&redis, &["--concurrency", "1"]);
    canvas(&redis, &["keys", "ordered"], Duration::from_secs(60));
    let member = "00000000-0000-4000-8000-00000000c002";
    let (ok, out) = common::celery_cli(&redis, &["control", "revoke", member], Duration::from_secs(30));
    assert!(ok, "{out}");
    wait_for("the revoke to reach our worker", Duration::from_secs(10), || {
        worker.log_text().contains(member).then_some(())
    });
    let _: Option<String> = redis.conn(0).rpoplpush("hold", "celery").unwrap();
    let body = wait_for("the body's FAILURE", Duration::from_secs(30), || {
        redis.result("00000000-0000-4000-8000-00000000c003")
    });
    assert_eq!(body["result"]["exc_type"], "ChordError");
    assert_eq!(body["result"]["exc_message"][0], format!("Dependency {member} raised TaskRevokedError('revoked')"));
    assert_eq!(redis.depth("bodyq"), 0, "no body sent");
}

#[test]
fn an_expired_member_fails_the_chord_as_celery_does() {
    let redis = Redis::start();
    let worker = Worker::start(&redis, &["--concurrency", "1"]);
    canvas(&redis, &["keys", "expired"], Duration::from_secs(60));
    let member = "00000000-0000-4000-8000-00000000c002";
    let body = wait_for("the body's FAILURE", Duration::from_secs(30), || {
        redis.result("00000000-0000-4000-8000-00000000c003")
    });
    assert_eq!(body["result"]["exc_type"], "ChordError");
    assert_eq!(body["result"]["exc_message"][0], format!("Dependency {member} raised TaskRevokedError('expired')"));
    assert_eq!(redis.result(member).unwrap()["status"], "REVOKED");
    assert_eq!(redis.depth("bodyq"), 0, "no body sent");
    assert_eq!(worker.metric("celery_task_success_total", "tasks.cpu_bound"), 1.0, "the other member ran");
}

#[test]
fn a_terminated_member_fails_the_chord_as_celery_does() {
    let redis = Redis::start();
    let worker = Worker::start(&redis, &["--concurrency", "2"]);
    canvas(&redis, &["keys", "terminate"], Duration::from_secs(60));
    let member = "00000000-0000-4000-8000-00000000c002";
    wait_for("the long member to start", Duration::from_secs(30), || {
        (worker.metric("celery_task_success_total", "tasks.cpu_bound") == 1.0
            && worker.metric("celery_worker_active_tasks", "") >= 1.0)
            .then_some(())
    });
    let (ok, out) = common::celery_cli(&redis, &["control", "terminate", "SIGTERM", member], Duration::from_secs(30));
    assert!(ok, "{out}");
    let body = wait_for("the body's FAILURE", Duration::from_secs(30), || {
        redis.result("00000000-0000-4000-8000-00000000c003")
    });
    assert_eq!(body["result"]["exc_type"], "ChordError");
    assert_eq!(body["result"]["exc_message"][0], format!("Dependency {member} raised TaskRevokedError('terminated')"));
    assert_eq!(redis.result(member).unwrap()["status"], "REVOKED");
    assert_eq!(redis.depth("bodyq"), 0, "no body sent");
}

/// The parts of a follow-up message that do not vary between runs: times as seconds from
/// now rounded to 10 s, a group as whether there is one.
fn follow_up_fields(raw: &str) -> Value {
    let env: Value = serde_json::from_str(raw).unwrap();
    let (h, p) = (&env["headers"], &env["properties"]);
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.decode(env["body"].as_str().unwrap()).unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    let from_now = |v: &Value| {
        v.as_str().map(|t| {
            let t = chrono::DateTime::parse_from_rfc3339(t).unwrap().with_timezone(&chrono::Utc);
            ((t - chrono::Utc::now()).num_milliseconds() as f64 / 10_000.0).round() as i64 * 10
        })
    };
    let sigs = |v: &Value| -> Value {
        v.as_array().map_or(json!(null), |a| {
            a.iter().map(|s| json!([s["task"], s["options"]["task_id"], s["options"]["queue"]])).collect()
        })
    };
    json!({
        "task": h["task"], "id": h["id"], "argsrepr": h["argsrepr"], "kwargsrepr": h["kwargsrepr"],
        "timelimit": h["timelimit"], "ignore_result": h["ignore_result"], "retries": h["retries"],
        "x-trace": h["x-trace"],
        "group": h["group"].is_string(), "group_index": h["group_index"],
        "parent_id": h["parent_id"], "root_id": h["root_id"],
        "eta_in": from_now(&h["eta"]), "expires_in": from_now(&h["expires"]),
        "priority": p["priority"], "routing_key": p["delivery_info"]["routing_key"],
        "args": body[0], "kwargs": body[1],
        "callbacks": sigs(&body[2]["callbacks"]), "errbacks": sigs(&body[2]["errbacks"]),
        "chain": body[2]["chain"].as_array().map(Vec::len),
    })
}

/// Run the `followups` case with `start` consuming `celery`; the parked messages by queue, and
/// whether each queue's messages share one group.
fn follow_ups(start: impl FnOnce(&Redis) -> Side) -> Value {
    let redis = Redis::start();
    let side = start(&redis);
    canvas(&redis, &["followups"], Duration::from_secs(60));
    let mut out = serde_json::Map::new();
    for (queue, n) in [("hold", 1), ("links", 2), ("errs", 2)] {
        let raw: Vec<String> = wait_for(&format!("{n} messages on {queue}"), Duration::from_secs(60), || {
            // Every priority list of the queue (a priority-5 message is on `hold\x06\x163`).
            let raw: Vec<String> = ["", "\x06\x163", "\x06\x166", "\x06\x169"]
                .iter()
                .flat_map(|suffix| redis.conn(0).lrange::<_, Vec<String>>(format!("{queue}{suffix}"), 0, -1).unwrap())
                .collect();
            (raw.len() == n).then_some(raw)
        });
        // LPUSH: the first sent is last.
        let fields: Vec<Value> = raw.iter().rev().map(|m| follow_up_fields(m)).collect();
        let groups: std::collections::BTreeSet<String> =
            raw.iter().map(|m| serde_json::from_str::<Value>(m).unwrap()["headers"]["group"].to_string()).collect();
        out.insert(queue.into(), json!({"messages": fields, "one_group": groups.len() == 1}));
    }
    drop(side);
    Value::Object(out)
}

#[test]
fn follow_ups_carry_their_own_options_as_a_python_worker_sends_them() {
    let python = follow_ups(|r| Side { _python: Some(python_worker(r, "celery", &[])), _ours: None });
    let ours = follow_ups(|r| Side { _python: None, _ours: Some(Worker::start(r, &["--concurrency", "1"])) });
    for queue in ["hold", "links", "errs"] {
        assert_eq!(ours[queue], python[queue], "{queue}: ours (left) vs a Python 5.7 worker's (right)");
    }
    // What that means, spelled out: the step kept its countdown, expiry, priority, limits and
    // its own errback; two links and the errbacks each went as one group.
    let step = &ours["hold"]["messages"][0];
    assert_eq!(
        (step["eta_in"].clone(), step["expires_in"].clone(), step["priority"].clone()),
        (json!(30), json!(600), json!(5))
    );
    assert_eq!(step["timelimit"], json!([60, 50]));
    assert_eq!(step["x-trace"], "t-1", "the step's custom header");
    assert_eq!(step["errbacks"][0][0], "tasks.io_bound");
    assert_eq!(ours["links"]["one_group"], true);
    assert_eq!(ours["errs"]["one_group"], true);
}

#[test]
fn a_chain_steps_own_errback_fires_after_its_countdown() {
    let redis = Redis::start();
    let _worker = Worker::start(&redis, &["--concurrency", "2"]);
    let sent = canvas(&redis, &["errback_countdown"], Duration::from_secs(60));
    let errback = sent["errback"].as_str().unwrap();
    common::wait_all(&redis, &[errback.to_owned()], "SUCCESS", Duration::from_secs(60));
    let first = redis.result("00000000-0000-4000-8000-00000000c001").unwrap();
    let step = redis.result("00000000-0000-4000-8000-00000000c002").unwrap();
    assert_eq!((step["status"].as_str(), step["result"]["exc_type"].as_str()), (Some("FAILURE"), Some("TypeError")));
    let done = |r: &Value| chrono::DateTime::parse_from_rfc3339(r["date_done"].as_str().unwrap()).unwrap();
    let waited = (done(&step) - done(&first)).num_milliseconds() as f64 / 1000.0;
    println!("the step ran {waited:.2} s after its parent (countdown 2 s)");
    assert!(waited >= 2.0, "the countdown was kept: {waited} s");
}

#[test]
fn a_follow_up_without_a_queue_goes_where_the_routing_table_says() {
    let redis = Redis::start();
    let _worker = Worker::start(&redis, &["--task-routes", "tasks.io_*=io, tasks.xsum=routed"]);
    canvas(&redis, &["routed"], Duration::from_secs(60));
    let raw: Vec<String> = wait_for("the step on queue routed", Duration::from_secs(30), || {
        let raw: Vec<String> = redis.conn(0).lrange("routed", 0, -1).unwrap();
        (raw.len() == 1).then_some(raw)
    });
    let fields = follow_up_fields(&raw[0]);
    assert_eq!((fields["task"].as_str(), fields["routing_key"].as_str()), (Some("tasks.xsum"), Some("routed")));
    assert_eq!(redis.depth("celery"), 0);
}

#[test]
fn groups_chains_and_chords_inside_chains_and_links_give_what_a_python_worker_gives() {
    let python = on_a_python_worker(&["nested"], Duration::from_secs(120));
    let redis = Redis::start();
    let worker = Worker::start(&redis, &["--concurrency", "2"]);
    let ours = canvas(&redis, &["nested"], Duration::from_secs(120));
    assert_eq!(ours, python, "ours (left) vs a Python 5.7 worker's (right)");
    // cpu_bound(100) = 25 primes; cpu_bound(25) = 9; cpu_bound(9) = 4; cpu_bound(1000) = 168.
    assert_eq!(ours["chain_then_group"], json!([9, 9]));
    assert_eq!(ours["chain_group_task"], json!(9 + 9 + 168));
    assert_eq!(ours["link_group"], json!([9, 9]));
    assert_eq!(ours["link_chain"], json!(4));
    assert_eq!(ours["group_of_chain"], json!([4, 168]));
    assert_eq!(worker.metric("celery_task_rejected_total", ""), 0.0);
}

#[test]
fn chord_bodies_that_are_groups_chains_and_chords_give_what_a_python_worker_gives() {
    let python = on_a_python_worker(&["bodies"], Duration::from_secs(180));
    let redis = Redis::start();
    let worker = Worker::start(&redis, &["--concurrency", "2"]);
    let ours = canvas(&redis, &["bodies"], Duration::from_secs(180));
    for what in ["group", "chain", "chord", "chain_then_group", "group_fail_members"] {
        assert_eq!(ours[what], python[what], "{what}: ours {ours}, Python's {python}");
    }
    // The header gives [4, 25]: xsum = 29, cpu_bound(29) = 10, cpu_bound(1000) = 168.
    assert_eq!(ours["group"], json!({"ok": true, "value": [29, 168]}));
    assert_eq!(ours["chain"], json!({"ok": true, "value": 10}));
    assert_eq!(ours["chord"], json!({"ok": true, "value": 58}));
    assert_eq!(ours["chain_then_group"], json!({"ok": true, "value": [10, 10]}));
    // A failed header member: each member of the group body holds that member's own error
    // (the ChordError's cause, as Celery stores it), and `.get()` on the group raises it.
    assert_eq!(ours["group_fail"], python["group_fail"], "ours {ours}, Python's {python}");
    let type_error = json!({"state": "FAILURE", "exc_type": "TypeError", "exc_args": ["unsupported operand type(s) for +: 'int' and 'str'"]});
    assert_eq!(ours["group_fail_members"], json!([type_error, type_error]));
    assert_eq!(worker.metric("celery_task_rejected_total", ""), 0.0, "nothing refused");
    assert_eq!(redis.unacked(), 0);
}

/// The `n` messages canvas.py `mode` leaves parked on `hold` when `start`'s worker runs it, in
/// task-id order: their fields ([`follow_up_fields`]), whether their group is [`GROUP_ID`],
/// and the chain they carry (each step's task, id, and whether it has a `group_id`).
fn parked(mode: &str, n: usize, start: impl FnOnce(&Redis) -> Side) -> Vec<Value> {
    let redis = Redis::start();
    let side = start(&redis);
    canvas(&redis, &[mode], Duration::from_secs(60));
    let raw: Vec<String> = wait_for(&format!("{n} messages on hold"), Duration::from_secs(60), || {
        let raw: Vec<String> = redis.conn(0).lrange("hold", 0, -1).unwrap();
        (raw.len() == n).then_some(raw)
    });
    drop(side);
    let mut out: Vec<Value> = raw
        .iter()
        .map(|m| {
            let env: Value = serde_json::from_str(m).unwrap();
            use base64::Engine as _;
            let body = base64::engine::general_purpose::STANDARD.decode(env["body"].as_str().unwrap()).unwrap();
            let body: Value = serde_json::from_slice(&body).unwrap();
            let next = body[2]["chain"].as_array().map(|c| {
                c.iter()
                    .map(|s| {
                        let o = &s["options"];
                        json!([s["task"], o["task_id"], o["group_id"].is_string(), o["group_index"]])
                    })
                    .collect::<Vec<_>>()
            });
            let mut f = follow_up_fields(m);
            f["group_is_the_header"] = json!(env["headers"]["group"] == GROUP_ID);
            f["next"] = json!(next);
            f
        })
        .collect();
    out.sort_by_key(|f| f["id"].as_str().unwrap_or_default().to_owned());
    out
}

/// A Python worker of one process (the order the chord members finish in is fixed).
fn python_one(redis: &Redis) -> Side {
    Side { _python: Some(PythonWorker::start(redis, &["-Q", "celery", "-c", "1"], &[])), _ours: None }
}

fn ours_one(redis: &Redis) -> Side {
    Side { _python: None, _ours: Some(Worker::start(redis, &["--concurrency", "1"])) }
}

#[test]
fn group_and_chain_bodies_are_sent_as_a_python_worker_sends_them() {
    let python = parked("parked_bodies", 3, python_one);
    let ours = parked("parked_bodies", 3, ours_one);
    assert_eq!(ours, python, "ours (left) vs a Python 5.7 worker's (right)");
    // Spelled out: the group body's members keep the ids and places the client froze them
    // with, and (Celery's immutable option) the header's group id; the chain body's first step
    // has no group and carries the rest.
    let ids: Vec<&str> = ours.iter().map(|f| f["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        [
            "00000000-0000-4000-8000-00000000c003",
            "00000000-0000-4000-8000-00000000c004",
            "00000000-0000-4000-8000-00000000c005"
        ]
    );
    assert_eq!((ours[0]["args"].clone(), ours[0]["group_index"].clone()), (json!([[4, 25]]), json!(0)));
    assert_eq!((ours[1]["args"].clone(), ours[1]["group_index"].clone()), (json!([1000]), json!(1)));
    assert!(ours[0]["group_is_the_header"] == true && ours[1]["group_is_the_header"] == true);
    assert_eq!((ours[2]["group"].clone(), ours[2]["chain"].clone()), (json!(false), json!(1)));
    assert_eq!(ours[2]["next"], json!([["tasks.cpu_bound", "00000000-0000-4000-8000-00000000c006", true, null]]));
}

#[test]
fn a_chain_in_a_group_carries_the_group_on_its_last_step_as_a_python_worker_sends_it() {
    let python = parked("parked_group_chain", 2, python_one);
    let ours = parked("parked_group_chain", 2, ours_one);
    assert_eq!(ours, python, "ours (left) vs a Python 5.7 worker's (right)");
    // Spelled out: the chain's first step has no group; its last step (in `chain`) has the
    // group's id and the chain's place; the plain member has both.
    assert_eq!(
        (ours[0]["id"].as_str(), ours[0]["group"].clone()),
        (Some("00000000-0000-4000-8000-00000000c002"), json!(false))
    );
    assert_eq!(ours[0]["next"], json!([["tasks.cpu_bound", "00000000-0000-4000-8000-00000000c003", true, 0]]));
    assert_eq!((ours[1]["group"].clone(), ours[1]["group_index"].clone()), (json!(true), json!(1)));
}

#[test]
fn chord_headers_holding_groups_and_chains_give_what_a_python_worker_gives() {
    let python = on_a_python_worker(&["headers"], Duration::from_secs(180));
    let redis = Redis::start();
    let worker = Worker::start(&redis, &["--concurrency", "2"]);
    let ours = canvas(&redis, &["headers"], Duration::from_secs(180));
    for what in ["group_in_header", "chain_in_header", "chain_in_header_in_chain"] {
        assert_eq!(ours[what], python[what], "{what}: ours {ours}, Python's {python}");
    }
    // The client flattens a group in the header (5, 4 then 25: its order); a chain counts once,
    // with its last value: cpu_bound(100) = 25, cpu_bound(25) = 9, cpu_bound(9) = 4.
    assert_eq!(ours["group_in_header"], json!({"ok": true, "value": [[5, 4, 25]]}));
    assert_eq!(ours["chain_in_header"], json!({"ok": true, "value": 9 + 4}));
    assert_eq!(ours["chain_in_header_in_chain"], json!({"ok": true, "value": 4 + 168}));
    // The client flattens a group inside a chord step's header before sending it.
    assert_eq!(ours["group_in_header_in_chain"], python["group_in_header_in_chain"]);
    assert_eq!(ours["group_in_header_in_chain"], json!({"ok": true, "value": 27}));
    assert_eq!(worker.metric("celery_task_rejected_total", ""), 0.0, "nothing refused");
    assert_eq!(redis.unacked(), 0);
}

mod join_script {
    //! The chord join script on a real Redis, through the library's backend: the semantics of
    //! Celery 5.7's `on_chord_part_return`, step by step.
    use super::*;
    use celery_autoscale::transport::backend::{Backend, ChordPart, PartReturned};
    use celery_autoscale::transport::connection;
    use celery_autoscale::wire::TaskState;
    use celery_autoscale::wire::chord::{part_entry, part_score};

    fn backend(redis: &Redis, ordered: bool) -> Backend {
        let conn = connection::connect("BACKEND_URL", &redis.url(1), None, Duration::from_secs(5)).unwrap();
        Backend::new(conn, Duration::from_secs(86_400)).with_chord_ordered(ordered)
    }

    fn part(gid: &str, id: &str, index: Option<i64>, value: i64) -> ChordPart {
        ChordPart {
            group_id: gid.into(),
            task_id: id.into(),
            score: part_score(index),
            entry: part_entry(id, TaskState::Success, &json!(value)),
        }
    }

    fn claimed(r: PartReturned) -> (String, Vec<String>) {
        match r {
            PartReturned::Claimed { token, entries, nested: false } => {
                (token, entries.into_iter().map(|e| String::from_utf8(e).unwrap()).collect())
            }
            other => panic!("expected the claim, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn duplicates_count_once_the_last_part_claims_and_a_done_chord_ignores_late_copies() {
        let redis = Redis::start();
        let b = backend(&redis, true);
        let _: () = redis.conn(1).set("celery-taskset-meta-g1.s", 2).unwrap();
        let first = part("g1", "a", Some(1), 10);
        for _ in 0..2 {
            let r = b.chord_part_return(&first).await.unwrap();
            assert_eq!(r, PartReturned::Counted { count: 1, expected: Some(2) }, "a redelivered copy counts once");
        }
        let (token, entries) = claimed(b.chord_part_return(&part("g1", "b", Some(0), 20)).await.unwrap());
        assert_eq!(entries, [r#"[1, "b", "SUCCESS", 20]"#, r#"[1, "a", "SUCCESS", 10]"#], "in group_index order");
        let ttl: i64 = redis.conn(1).ttl("celery-taskset-meta-g1.c").unwrap();
        assert!((1..=6).contains(&ttl), "the first claim lasts 6 s: {ttl}");
        assert!(b.chord_extend_claim("g1", &token).await.unwrap());
        assert!(!b.chord_extend_claim("g1", "someone-else").await.unwrap(), "not another worker's");
        assert!(b.chord_cleanup("g1", &token).await.unwrap());
        let keys: Vec<String> = redis.conn(1).keys("celery-taskset-meta-g1*").unwrap();
        assert_eq!(keys, ["celery-taskset-meta-g1.c"]);
        assert_eq!(b.chord_part_return(&first).await.unwrap(), PartReturned::AlreadyDone);
        assert_eq!(
            redis.conn(1).keys::<_, Vec<String>>("celery-taskset-meta-g1.*").unwrap().len(),
            1,
            "nothing recreated"
        );
    }

    #[tokio::test]
    async fn only_one_worker_gets_the_claim_and_extra_results_count() {
        let redis = Redis::start();
        let b = backend(&redis, true);
        let _: () = redis.conn(1).set("celery-taskset-meta-g2.s", 1).unwrap();
        // `.t` (a member replaced by a group of two): one more result than the size.
        let _: () = redis.conn(1).set("celery-taskset-meta-g2.t", 1).unwrap();
        let r = b.chord_part_return(&part("g2", "a", Some(0), 1)).await.unwrap();
        assert_eq!(r, PartReturned::Counted { count: 1, expected: Some(2) });
        // Another worker holds the claim (it counted the same last part first).
        let _: () = redis.conn(1).set("celery-taskset-meta-g2.c", "their-token").unwrap();
        let r = b.chord_part_return(&part("g2", "b", None, 2)).await.unwrap();
        assert_eq!(r, PartReturned::Counted { count: 2, expected: Some(2) }, "complete, but not ours to send");
        // No size yet (the producer has not set it): counted, nothing decided.
        let r = b.chord_part_return(&part("g3", "a", Some(0), 1)).await.unwrap();
        assert_eq!(r, PartReturned::Counted { count: 1, expected: None });
    }

    #[tokio::test]
    async fn the_list_form_keeps_arrival_order_and_a_begun_join_keeps_its_form() {
        let redis = Redis::start();
        let list = backend(&redis, false);
        let _: () = redis.conn(1).set("celery-taskset-meta-g4.s", 2).unwrap();
        list.chord_part_return(&part("g4", "a", Some(1), 10)).await.unwrap();
        let (_, entries) = claimed(list.chord_part_return(&part("g4", "b", Some(0), 20)).await.unwrap());
        assert_eq!(entries, [r#"[1, "a", "SUCCESS", 10]"#, r#"[1, "b", "SUCCESS", 20]"#], "arrival order");
        // A fleet on the list form began this join; a worker configured for the sorted set
        // joins the same list instead of failing with WRONGTYPE.
        let sorted = backend(&redis, true);
        let _: () = redis.conn(1).set("celery-taskset-meta-g5.s", 2).unwrap();
        let _: () = redis.conn(1).rpush("celery-taskset-meta-g5.j", r#"[1, "x", "SUCCESS", 1]"#).unwrap();
        let _: () = redis.conn(1).sadd("celery-taskset-meta-g5.d", "x:0").unwrap();
        let (_, entries) = claimed(sorted.chord_part_return(&part("g5", "y", Some(1), 2)).await.unwrap());
        assert_eq!(entries.len(), 2);
        let kind: String = redis::cmd("TYPE").arg("celery-taskset-meta-g5.j").query(&mut redis.conn(1)).unwrap();
        assert_eq!(kind, "list");
    }
}
