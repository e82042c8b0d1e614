//! Poison messages against a real Redis and our worker: oversized bodies, zlib bombs, an unknown
//! content-encoding, an envelope nested 100 000 deep, megabytes of garbage. Each is rejected and
//! counted, its caller gets a FAILURE whenever the task id is readable from the headers, the
//! dead-letter list stays bounded in bytes, the worker keeps serving, and its memory comes back
//! near where it started.

mod common;

use common::{Redis, Worker, enqueue, task, wait_all};
use flate2::Compression;
use flate2::write::ZlibEncoder;
use redis::Commands;
use serde_json::{Value, json};
use std::io::Write;
use std::time::Duration;

const DEAD_LETTER: &str = "celery-autoscale.rejected";

/// A valid envelope for `tasks.cpu_bound(1)`, as JSON, and its task id.
fn envelope() -> (Value, String) {
    let t = task("tasks.cpu_bound", vec![json!(1)]);
    let (bytes, _) = t.to_message("gen0@tests");
    (serde_json::from_slice(&bytes).unwrap(), t.id)
}

fn base64_of(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Resident memory of a process, from /proc (Linux), in kB.
fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// One round of poison: (message bytes, task id its headers carry, expected exception type).
fn poison_round() -> Vec<(Vec<u8>, Option<String>, &'static str)> {
    let mut out = Vec::new();
    // 20 MB body: larger than the 4 MiB default, refused undecoded.
    let (mut e, id) = envelope();
    e["body"] = json!("A".repeat(20 * 1024 * 1024));
    out.push((serde_json::to_vec(&e).unwrap(), Some(id), "DecodeError"));
    // A zlib bomb: 40 KB that inflate to 40 MB of zeros.
    let (mut e, id) = envelope();
    let mut z = ZlibEncoder::new(Vec::new(), Compression::best());
    z.write_all(&vec![b'0'; 40 * 1024 * 1024]).unwrap();
    e["body"] = json!(base64_of(&z.finish().unwrap()));
    e["headers"]["compression"] = json!("application/x-gzip");
    out.push((serde_json::to_vec(&e).unwrap(), Some(id), "DecodeError"));
    // An encoding Celery would not decode: the task must not run.
    let (mut e, id) = envelope();
    e["content-encoding"] = json!("rot13");
    out.push((serde_json::to_vec(&e).unwrap(), Some(id), "ContentDisallowed"));
    // A body nested 100 000 deep: no JSON parser takes it, the headers still name the task.
    let (mut e, id) = envelope();
    e["body"] = json!("@NESTED@");
    let text = serde_json::to_string(&e).unwrap();
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    out.push((text.replace("\"@NESTED@\"", &nested).into_bytes(), Some(id), "DecodeError"));
    // 2 MB of garbage: no id, only the dead-letter list knows it.
    out.push((vec![b'x'; 2 * 1024 * 1024], None, ""));
    out
}

#[test]
fn poison_is_rejected_answered_bounded_and_forgotten() {
    let redis = Redis::start();
    let w = Worker::start(&redis, &["--concurrency", "2"]);
    let mut c = redis.conn(0);
    let warmup = enqueue(&redis, &(0..20).map(|_| task("tasks.cpu_bound", vec![json!(1000)])).collect::<Vec<_>>());
    wait_all(&redis, &warmup, "SUCCESS", Duration::from_secs(60));
    let baseline = rss_kb(w.child.id());

    let rounds = 5;
    let mut answered = Vec::new();
    let mut messages = 0;
    for _ in 0..rounds {
        for (bytes, id, exc) in poison_round() {
            let _: () = c.lpush("celery", bytes).unwrap();
            messages += 1;
            if let Some(id) = id {
                answered.push((id, exc));
            }
        }
    }
    let ids: Vec<String> = answered.iter().map(|(id, _)| id.clone()).collect();
    wait_all(&redis, &ids, "FAILURE", Duration::from_secs(120));
    for (id, exc) in &answered {
        let result = redis.result(id).unwrap();
        assert_eq!(result["result"]["exc_type"], json!(exc), "{id}: {result}");
    }
    // Still serving.
    let after = enqueue(&redis, &(0..20).map(|_| task("tasks.cpu_bound", vec![json!(1000)])).collect::<Vec<_>>());
    wait_all(&redis, &after, "SUCCESS", Duration::from_secs(60));
    assert!(w.http_get("/healthz").is_some_and(|(s, _)| s == 200), "still alive");
    let after_rss = rss_kb(w.child.id());

    let count = |reason: &str| w.metric("celery_task_rejected_total", &format!("reason=\"{reason}\""));
    assert_eq!(count("too_large"), 2.0 * f64::from(rounds));
    assert_eq!(count("unsupported_encoding"), f64::from(rounds));
    assert_eq!(count("malformed"), 2.0 * f64::from(rounds));
    assert_eq!(w.metric("celery_task_rejected_total", ""), f64::from(messages));

    // Every rejected message is in the dead-letter list, as a bounded entry with its real length.
    let entries: Vec<Vec<u8>> = c.lrange(DEAD_LETTER, 0, -1).unwrap();
    assert_eq!(entries.len(), messages as usize);
    let bytes: usize = entries.iter().map(Vec::len).sum();
    assert!(bytes < entries.len() * 8 * 1024, "dead-letter list holds {bytes} bytes for {} entries", entries.len());
    let big: Vec<Value> = entries
        .iter()
        .map(|e| serde_json::from_slice::<Value>(e).unwrap())
        .filter(|e| e["length"].as_u64() > Some(20 * 1024 * 1024))
        .collect();
    assert_eq!(big.len(), rounds as usize, "the 20 MB messages, recorded with their length");
    assert!(big.iter().all(|e| e["truncated"] == json!(true) && e["task_id"].is_string()));
    assert_eq!(redis.unacked(), 0);

    eprintln!("worker RSS: {baseline} kB before {messages} poison messages, {after_rss} kB after");
    // What stays is mostly the Redis connections' read buffers, sized by the largest reply
    // (20 MB here, on two connections) and not growing with more rounds (docs/Reliability.md);
    // a worker without these bounds kept ~190 MB more in this debug build, 330–390 MB released.
    assert!(after_rss < baseline + 150 * 1024, "RSS {baseline} kB → {after_rss} kB");
}

#[test]
fn max_message_bytes_is_a_flag() {
    let redis = Redis::start();
    let w = Worker::start(&redis, &["--max-message-bytes", "2048"]);
    let (mut e, id) = envelope();
    e["headers"]["argsrepr"] = json!("x".repeat(4096));
    let _: () = redis.conn(0).lpush("celery", serde_json::to_vec(&e).unwrap()).unwrap();
    wait_all(&redis, std::slice::from_ref(&id), "FAILURE", Duration::from_secs(30));
    let result = redis.result(&id).unwrap();
    assert!(result["result"]["exc_message"].to_string().contains("limit of 2048"), "{result}");
    assert_eq!(w.metric("celery_task_rejected_total", "reason=\"too_large\""), 1.0);
}
