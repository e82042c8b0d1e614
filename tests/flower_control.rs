//! Flower's control buttons against our worker: its HTTP API (`POST /api/task/rate-limit`,
//! `/api/task/timeout`, `/api/worker/pool/grow`, `/api/worker/pool/shrink`) succeeds, and the
//! effect is visible in `inspect stats` and `inspect registered` and in how tasks run.

mod common;

use common::*;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const NODE: &str = "rs1@testhost";
const WAIT: Duration = Duration::from_secs(120);

struct Flower {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Flower {
    /// Flower with the project's Python task set (`-A tasks`): it refuses control of a task
    /// its app does not know.
    fn start(redis: &Redis) -> Flower {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(python())
            .args(["-m", "celery", "-A", "tasks", "--broker", &redis.url(0), "flower"])
            .args(["--address=127.0.0.1", &format!("--port={port}"), "--inspect_timeout=5000"])
            .arg(format!("--db={}", dir.path().join("flower.db").display()))
            .env("FLOWER_UNAUTHENTICATED_API", "true")
            .env("PYTHONPATH", repo_root().join("tests/python"))
            .env("BROKER_URL", redis.url(0))
            .env("BACKEND_URL", redis.url(1))
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn flower (pip install -r scripts/requirements.txt)");
        let f = Flower { child, port, _dir: dir };
        wait_for("flower /healthcheck", WAIT, || match http_get(f.port, "/healthcheck") {
            Some((200, _)) => Some(()),
            _ => None,
        });
        f
    }

    fn workers(&self) -> Option<Value> {
        match http_get(self.port, "/api/workers?refresh=1")? {
            (200, body) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }

    /// `POST path` with a form body: (status, body).
    fn post(&self, path: &str, form: &str) -> (u16, String) {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{form}",
            self.port,
            form.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        (status, body)
    }
}

impl Drop for Flower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `celery inspect <cmd> -d NODE --json` → our node's reply.
fn inspect(redis: &Redis, cmd: &str) -> Value {
    let (ok, out) = celery_cli(redis, &["inspect", cmd, "-d", NODE, "--timeout", "5", "--json"], WAIT);
    assert!(ok, "{out}");
    let line = out.lines().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON:\n{out}"));
    serde_json::from_str::<Value>(line).unwrap()[NODE].clone()
}

#[test]
fn flower_rate_limit_timeout_and_pool_buttons_work_on_our_worker() {
    let redis = Redis::start();
    let flower = Flower::start(&redis);
    let _worker = Worker::start(&redis, &["--events", "--hostname", NODE, "--concurrency", "2"]);
    wait_for("flower to know our worker", WAIT, || flower.workers()?.get(NODE)?.get("stats").map(|_| ()));

    let worker = "workername=rs1%40testhost";
    let (status, body) = flower.post("/api/task/rate-limit/tasks.io_bound", &format!("{worker}&ratelimit=30%2Fm"));
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).ok()),
        (200, Some(json!({"message": "new rate limit set successfully"}))),
        "{body}"
    );
    let registered = inspect(&redis, "registered");
    assert!(registered.as_array().unwrap().iter().any(|t| t == "tasks.io_bound [rate_limit=30/m]"), "{registered}");

    let (status, body) = flower.post("/api/task/timeout/tasks.io_bound", &format!("{worker}&soft=1&hard=2"));
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).ok()),
        (200, Some(json!({"message": "time limits set successfully"}))),
        "{body}"
    );
    let ids = python_client(&redis, "send", &json!([{"task": "tasks.io_bound", "args": [30]}]), WAIT);
    let id = ids[0].as_str().unwrap().to_owned();
    wait_all(&redis, std::slice::from_ref(&id), "FAILURE", WAIT);
    assert_eq!(redis.result(&id).unwrap()["result"]["exc_type"], "SoftTimeLimitExceeded");

    let (status, body) = flower.post(&format!("/api/worker/pool/grow/{NODE}?n=3"), "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Growing"), "{body}");
    let stats = inspect(&redis, "stats");
    assert_eq!(stats["pool"]["max-concurrency"], 5, "{stats}");
    assert_eq!(stats["pool"]["processes"].as_array().unwrap().len(), 5);

    let (status, body) = flower.post(&format!("/api/worker/pool/shrink/{NODE}?n=2"), "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Shrinking"), "{body}");
    let stats = inspect(&redis, "stats");
    assert_eq!(stats["pool"]["max-concurrency"], 3, "{stats}");
    assert_eq!(stats["prefetch_count"], 3);
    // Flower's own view of the pool, from the same stats.
    let seen = wait_for("flower's stats to show three slots", WAIT, || {
        let w = flower.workers()?;
        let p = w.get(NODE)?.get("stats")?.get("pool")?.clone();
        (p["max-concurrency"] == 3).then_some(p)
    });
    println!("Flower's view of our pool after grow 3, shrink 2: {seen}");
}
