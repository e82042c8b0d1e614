//! `global_keyprefix` (kombu's broker transport option and Celery's result backend option of
//! the same name) against real Python Celery 5.7 with the option set: our worker serves a
//! Python producer and client, answers its remote control, the exporter counts the prefixed
//! queue, and the loadgen's messages run on a Python worker whose results it reads. Every key
//! left in Redis carries the prefix.

mod common;

use common::*;
use redis::Commands;
use serde_json::{Value, json};
use std::process::Command;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(60);

/// No separator at its end, so Celery's backend adds `_` (`t1_celery-task-meta-…`) while
/// kombu's broker keys take it verbatim (`t1celery`, `t1unacked`).
const PREFIX: &str = "t1";

fn all_keys(redis: &Redis, db: u8) -> Vec<String> {
    let mut c = redis.conn(db);
    let mut keys: Vec<String> = c.keys("*").unwrap();
    keys.sort();
    keys
}

fn prefixed_env(redis: &Redis) -> [(&'static str, String); 3] {
    [("BROKER_URL", redis.url(0)), ("BACKEND_URL", redis.url(1)), ("GLOBAL_KEYPREFIX", PREFIX.to_owned())]
}

fn client(redis: &Redis, mode: &str, spec: &Value) -> Value {
    let out = run_python("client.py", &[mode, &spec.to_string()], &prefixed_env(redis), LONG);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("client.py printed non-JSON ({e}): {out}"))
}

#[test]
fn python_clients_with_a_key_prefix_are_served_and_counted() {
    let redis = Redis::start();
    let flag = ["--global-keyprefix", PREFIX];

    // Sent before any worker runs: the exporter counts them under the prefixed queue.
    let sent = client(
        &redis,
        "send",
        &json!([{"task": "tasks.io_bound", "args": [0]}, {"task": "tasks.cpu_bound", "args": [100]}]),
    );
    assert_eq!(redis.depth(&format!("{PREFIX}celery")), 2);
    assert_eq!(redis.depth("celery"), 0);
    let exporter = Exporter::start(&redis.url(0), "celery", &flag);
    exporter.wait_value("celery_queue_depth", "queue=\"celery\"", Some(2.0));
    let unprefixed = Exporter::start(&redis.url(0), "celery", &[]);
    unprefixed.wait_value("celery_queue_depth", "queue=\"celery\"", Some(0.0));

    let mut args = flag.to_vec();
    args.extend_from_slice(&["--hostname", "rs@prefixed"]);
    let w = Worker::start(&redis, &args);
    // AsyncResult.get() through the prefixed result key and its PUBLISH channel.
    let got = client(&redis, "run", &json!([{"task": "tasks.cpu_bound", "args": [100], "timeout": 30}]));
    assert_eq!(got[0]["ok"], true, "{got}");
    assert_eq!(got[0]["value"], 25);
    for id in sent.as_array().unwrap() {
        let key = format!("{PREFIX}_celery-task-meta-{}", id.as_str().unwrap());
        wait_for("the earlier tasks' results", LONG, || {
            redis.conn(1).get::<_, Option<String>>(&key).unwrap().filter(|r| r.contains("SUCCESS"))
        });
    }
    exporter.wait_value("celery_queue_depth", "queue=\"celery\"", Some(0.0));

    // Remote control through the prefixed pidbox channel, binding set and reply queue.
    let script = "import json,os\nfrom celery import Celery\napp=Celery(broker=os.environ['BROKER_URL'])\n\
                  app.conf.broker_transport_options={'global_keyprefix': os.environ['GLOBAL_KEYPREFIX']}\n\
                  print(json.dumps(app.control.ping(destination=['rs@prefixed'], timeout=5)))";
    let out = Command::new(python()).args(["-c", script]).envs(prefixed_env(&redis)).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pong: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(pong, json!([{"rs@prefixed": {"ok": "pong"}}]));

    // Nothing without the prefix in either database (the worker's own keys included).
    let stray = |db| all_keys(&redis, db).into_iter().filter(|k| !k.starts_with(PREFIX)).collect::<Vec<_>>();
    assert_eq!(stray(0), Vec::<String>::new());
    assert_eq!(stray(1), Vec::<String>::new());
    assert!(all_keys(&redis, 1).iter().all(|k| k.starts_with(&format!("{PREFIX}_celery-task-meta-"))));
    // The Python producer declared its queue's binding under the prefix.
    let broker_keys = all_keys(&redis, 0);
    assert!(broker_keys.contains(&format!("{PREFIX}_kombu.binding.celery")), "{broker_keys:?}");
    drop(w);
}

#[test]
fn the_loadgen_with_a_key_prefix_feeds_a_python_worker_with_it() {
    let redis = Redis::start();
    let _py = PythonWorker::start(&redis, &["--concurrency", "2"], &[("GLOBAL_KEYPREFIX", PREFIX)]);
    let out = Command::new(BIN)
        .args(["loadgen", "burst", "--n", "5", "--task", "io", "--io-seconds", "0:0", "--wait", "--wait-timeout", "60"])
        .args(["--global-keyprefix", PREFIX])
        .env("BROKER_URL", redis.url(0))
        .env("BACKEND_URL", redis.url(1))
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "loadgen --wait failed:\n{text}");
    let results = all_keys(&redis, 1);
    assert_eq!(results.len(), 5, "{results:?}");
    assert!(results.iter().all(|k| k.starts_with(&format!("{PREFIX}_celery-task-meta-"))), "{results:?}");
    assert_eq!(redis.depth(&format!("{PREFIX}celery")), 0);
    assert!(all_keys(&redis, 0).iter().all(|k| k.starts_with(PREFIX)), "{:?}", all_keys(&redis, 0));
}
