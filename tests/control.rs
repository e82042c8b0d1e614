//! Remote control: the real `celery inspect` / `celery control` command line against our worker,
//! and a real Python client's `broadcast` for what the CLI refuses to send (unknown commands,
//! garbage). Nothing here is simulated: the replies are parsed by Celery's own code.

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const NODE: &str = "rs1@testhost";
const CLI: Duration = Duration::from_secs(60);

/// `celery inspect <cmd> -d NODE --json` → the reply of our node.
fn inspect(redis: &Redis, cmd: &[&str]) -> Value {
    let mut args = vec!["inspect"];
    args.extend_from_slice(cmd);
    args.extend_from_slice(&["-d", NODE, "--timeout", "5", "--json"]);
    let (ok, out) = celery_cli(redis, &args, CLI);
    assert!(ok, "celery {args:?} failed:\n{out}");
    let line = out.lines().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON from {args:?}:\n{out}"));
    let v: Value = serde_json::from_str(line).unwrap();
    v[NODE].clone()
}

fn send(redis: &Redis, spec: Value) -> Vec<String> {
    let ids = python_client(redis, "send", &spec, Duration::from_secs(60));
    ids.as_array().unwrap().iter().map(|i| i.as_str().unwrap().to_owned()).collect()
}

#[test]
fn celery_inspect_and_control_see_our_worker() {
    let redis = Redis::start();
    let mut worker = Worker::start(&redis, &["--events", "--hostname", NODE, "--concurrency", "2"]);

    // ping, in the CLI's human form too.
    let (ok, out) = celery_cli(&redis, &["inspect", "ping", "-d", NODE, "--timeout", "5"], CLI);
    assert!(ok && out.contains(&format!("{NODE}: OK")) && out.contains("pong"), "{out}");
    assert_eq!(inspect(&redis, &["ping"]), json!({"ok": "pong"}));

    let registered = inspect(&redis, &["registered"]);
    assert_eq!(registered, json!(["tasks.cpu_bound", "tasks.flaky", "tasks.io_bound", "tasks.xsum"]));

    let queues = inspect(&redis, &["active_queues"]);
    assert_eq!(queues[0]["name"], "celery");
    assert_eq!(queues[0]["exchange"]["type"], "direct");

    // A running task shows in `active`, a countdown task in `scheduled`, and stats count them.
    let ids = send(
        &redis,
        json!([{"task": "tasks.io_bound", "args": [600]},
               {"task": "tasks.io_bound", "args": [0], "options": {"countdown": 600}}]),
    );
    let (running, later) = (&ids[0], &ids[1]);
    let active = wait_for("the task to be active", Duration::from_secs(30), || {
        let a = inspect(&redis, &["active"]);
        (a.as_array()?.len() == 1).then_some(a)
    });
    assert_eq!(active[0]["id"], running.as_str());
    assert_eq!(active[0]["name"], "tasks.io_bound");
    assert_eq!(active[0]["hostname"], NODE);
    assert_eq!(active[0]["acknowledged"], true);
    assert!(active[0]["time_start"].as_f64().is_some(), "{active}");
    assert_eq!(active[0]["delivery_info"]["routing_key"], "celery");
    let scheduled = inspect(&redis, &["scheduled"]);
    assert_eq!(scheduled[0]["request"]["id"], later.as_str(), "{scheduled}");
    assert!(scheduled[0]["eta"].as_str().is_some());
    let q = inspect(&redis, &["query_task", running]);
    assert_eq!(q[running][0], "active", "{q}");

    let stats = inspect(&redis, &["stats"]);
    assert_eq!(stats["pid"], worker.child.id());
    assert_eq!(stats["pool"]["max-concurrency"], 2);
    assert_eq!(stats["total"]["tasks.io_bound"], 1, "{stats}");
    assert!(stats["broker"]["port"] == redis.port && stats["uptime"].as_u64().is_some(), "{stats}");

    // revoke of the countdown task: REVOKED at once, and it never runs, even after its ETA.
    let (ok, out) = celery_cli(&redis, &["control", "revoke", later, "-d", NODE, "--timeout", "5"], CLI);
    assert!(ok && out.contains(&format!("tasks {{'{later}'}} flagged as revoked")), "{out}");
    wait_all(&redis, std::slice::from_ref(later), "REVOKED", Duration::from_secs(30));
    assert_eq!(redis.result(later).unwrap()["result"]["exc_type"], "TaskRevokedError");
    assert_eq!(inspect(&redis, &["revoked"]), json!([later]));
    wait_for("the revoked task to leave the schedule", Duration::from_secs(30), || {
        inspect(&redis, &["scheduled"]).as_array()?.is_empty().then_some(())
    });

    // terminate (the CLI's form of revoke with terminate=True) stops the running task.
    let (ok, out) =
        celery_cli(&redis, &["control", "terminate", "SIGTERM", running, "-d", NODE, "--timeout", "5"], CLI);
    assert!(ok && out.contains(&format!("terminate: {running}")), "{out}");
    wait_all(&redis, std::slice::from_ref(running), "REVOKED", Duration::from_secs(30));
    assert_eq!(redis.result(running).unwrap()["result"]["exc_message"], json!(["terminated"]));
    wait_for("the message to be acknowledged", Duration::from_secs(30), || (redis.unacked() == 0).then_some(()));
    assert!(worker.started_task_ids().iter().all(|id| id != later), "the revoked countdown task ran");

    // shutdown: graceful, like SIGTERM (exit 0).
    let (_, out) = celery_cli(&redis, &["control", "shutdown", "-d", NODE, "--timeout", "2"], CLI);
    let status = worker.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "worker exit {status:?} after shutdown ({out})\n{}", worker.log_text());
}

#[test]
fn a_task_revoked_before_it_arrives_never_runs_and_started_is_tracked() {
    let redis = Redis::start();
    let worker = Worker::start(&redis, &["--hostname", NODE, "--track-started"]);
    let early = "00000000-0000-4000-8000-00000000e001";
    let (ok, out) = celery_cli(&redis, &["control", "revoke", early, "-d", NODE, "--timeout", "5"], CLI);
    assert!(ok, "{out}");
    let mut revoked_task = task("tasks.io_bound", vec![json!(0)]);
    revoked_task.id = early.into();
    let slow = task("tasks.io_bound", vec![json!(3)]);
    let ids = enqueue(&redis, &[revoked_task, slow]);
    // STARTED, with the node and pid Celery stores, while the slow task runs.
    let started =
        wait_for("STARTED", Duration::from_secs(30), || redis.result(&ids[1]).filter(|r| r["status"] == "STARTED"));
    assert_eq!(started["result"], json!({"pid": worker.child.id(), "hostname": NODE}));
    assert_eq!(started["date_done"], Value::Null);
    wait_all(&redis, &ids[1..], "SUCCESS", Duration::from_secs(30));
    assert_eq!(redis.status(early).as_deref(), Some("REVOKED"));
    assert!(!worker.started_task_ids().iter().any(|id| id == early), "a revoked task ran");
    // Not running it is the worker's decision: the message is acknowledged, not lost or kept.
    wait_for("acks", Duration::from_secs(30), || (redis.unacked() == 0 && redis.depth("celery") == 0).then_some(()));
}

#[test]
fn queues_and_events_can_be_changed_remotely_and_unknown_commands_get_celerys_error() {
    let redis = Redis::start();
    let worker = Worker::start(&redis, &["--hostname", NODE]);
    let broadcast = |method: &str, args: Value| -> Value {
        let script = format!(
            "import json,os\nfrom celery import Celery\napp=Celery(broker=os.environ['BROKER_URL'])\n\
             print(json.dumps(app.control.broadcast({method:?}, arguments=json.loads({:?}), destination=[{NODE:?}], reply=True, timeout=5)))",
            args.to_string()
        );
        let out = std::process::Command::new(python())
            .args(["-c", &script])
            .env("BROKER_URL", redis.url(0))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0][NODE].clone()
    };
    assert_eq!(broadcast("no_such_command", json!({})), json!({"error": "KeyError('no_such_command')"}));
    assert_eq!(broadcast("enable_events", json!({})), json!({"ok": "task events enabled"}));
    assert_eq!(broadcast("enable_events", json!({})), json!({"ok": "task events already enabled"}));
    assert_eq!(broadcast("disable_events", json!({})), json!({"ok": "task events disabled"}));
    // Mingle: a Python worker starting up asks for the revoked set; Celery 5.7 answers the ids
    // only, oldest first, and merges the ids it is sent.
    assert_eq!(broadcast("revoke", json!({"task_id": "gone"})), json!({"ok": "tasks {'gone'} flagged as revoked"}));
    let hello = broadcast("hello", json!({"from_node": "py1@elsewhere", "revoked": ["theirs"]}));
    assert!(hello["revoked"] == json!(["gone", "theirs"]) && hello["clock"].is_u64(), "{hello}");

    let (ok, out) = celery_cli(&redis, &["control", "add_consumer", "extra", "-d", NODE, "--timeout", "5"], CLI);
    assert!(ok && out.contains("add consumer extra"), "{out}");
    let names = |q: Value| -> Vec<String> {
        q.as_array().unwrap().iter().map(|x| x["name"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(names(inspect(&redis, &["active_queues"])), ["celery", "extra"]);
    let mut t = task("tasks.io_bound", vec![json!(0)]);
    t.queue = "extra".into();
    let ids = enqueue(&redis, &[t]);
    wait_all(&redis, &ids, "SUCCESS", Duration::from_secs(30));
    let (ok, out) = celery_cli(&redis, &["control", "cancel_consumer", "extra", "-d", NODE, "--timeout", "5"], CLI);
    assert!(ok && out.contains("no longer consuming from extra"), "{out}");
    assert_eq!(names(inspect(&redis, &["active_queues"])), ["celery"]);
    drop(worker);
}

#[test]
fn garbage_and_floods_on_the_pidbox_do_not_stop_or_slow_the_worker() {
    let redis = Redis::start();
    let mut worker = Worker::start(&redis, &["--hostname", NODE]);
    let mut c = redis.conn(0);
    let garbage: [&[u8]; 6] = [
        b"",
        b"not json",
        b"[1,2,3]",
        b"{\"body\": \"%%%\", \"properties\": {\"body_encoding\": \"base64\"}}",
        b"{\"body\": {\"method\": 5}}",
        b"{\"body\": {\"method\": \"revoke\", \"arguments\": {\"task_id\": {\"x\": 1}, \"terminate\": \"yes\"}}}",
    ];
    for g in garbage {
        let _: i64 = redis::cmd("PUBLISH").arg("/0.celery.pidbox").arg(g).query(&mut c).unwrap();
    }
    // A bounded flood of well-formed pings for another node (ignored) and for us (answered
    // into a list nobody reads), while tasks run: they must still finish promptly.
    let ping = |dest: &str| {
        let body = json!({"method": "ping", "arguments": {}, "destination": [dest], "pattern": null,
                          "matcher": null, "ticket": "t", "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "nobody"}});
        let b64 = base64_encode(&serde_json::to_vec(&body).unwrap());
        json!({"body": b64, "content-encoding": "utf-8", "content-type": "application/json",
               "headers": {"clock": 1}, "properties": {"body_encoding": "base64", "delivery_mode": 2,
               "delivery_info": {"exchange": "celery.pidbox", "routing_key": ""}, "priority": 0,
               "delivery_tag": "x"}})
        .to_string()
    };
    let (other, mine) = (ping("someone@else"), ping(NODE));
    let ids = enqueue(&redis, &(0..50).map(|_| task("tasks.cpu_bound", vec![json!(1000)])).collect::<Vec<_>>());
    let start = Instant::now();
    let mut pipe = redis::pipe();
    for i in 0..5000 {
        pipe.cmd("PUBLISH").arg("/0.celery.pidbox").arg(if i % 2 == 0 { &other } else { &mine }).ignore();
    }
    let _: () = pipe.query(&mut c).unwrap();
    wait_all(&redis, &ids, "SUCCESS", Duration::from_secs(60));
    let elapsed = start.elapsed();
    // Still answering after all that, and still running.
    assert_eq!(inspect(&redis, &["ping"]), json!({"ok": "pong"}));
    assert!(worker.child.try_wait().unwrap().is_none(), "worker exited:\n{}", worker.log_text());
    let complaints = worker.log_text().matches("malformed remote-control message").count();
    assert!((1..=2).contains(&complaints), "malformed messages logged {complaints} times (rate limited)");
    eprintln!("50 tasks during a 5000-message pidbox flood: {elapsed:?}");
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}
