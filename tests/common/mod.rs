//! What the integration tests share: a real `redis-server` on a free loopback port, the real
//! `celery-autoscale` binary, and real Python Celery from the venv `scripts/test.sh` creates.
//! Nothing here is a mock; a missing tool is a test failure that says how to install it.
#![allow(dead_code)]

use redis::Commands;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_celery-autoscale");

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The wire fixtures captured from real Celery 5.7 (tests/fixtures/celery, see its INDEX.md).
pub fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures/celery")
}

/// A free TCP port on loopback (bound then released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind loopback").local_addr().unwrap().port()
}

/// Poll `f` until it returns `Some`, or panic with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A private `redis-server`: own port, own directory, AOF on (so a restart keeps the queue),
/// killed on drop.
pub struct Redis {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Redis {
    pub fn start() -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = Redis { port: free_port(), dir, child: None };
        r.launch();
        r
    }

    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", "always", "--dir"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server ({e}); install it: apt-get install redis-server"));
        self.child = Some(child);
        let url = self.url(0);
        wait_for("redis-server to answer PING", Duration::from_secs(10), || {
            let mut c = redis::Client::open(url.as_str()).ok()?.get_connection().ok()?;
            redis::cmd("PING").query::<String>(&mut c).ok()
        });
    }

    /// Stop the server (data kept on disk) — an outage.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    pub fn url(&self, db: u8) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    pub fn conn(&self, db: u8) -> redis::Connection {
        redis::Client::open(self.url(db)).unwrap().get_connection().expect("redis connection")
    }

    /// Sum of LLEN over a queue's default priority lists.
    pub fn depth(&self, queue: &str) -> usize {
        let mut c = self.conn(0);
        ["", "\x06\x163", "\x06\x166", "\x06\x169"]
            .iter()
            .map(|suffix| c.llen::<_, usize>(format!("{queue}{suffix}")).unwrap())
            .sum()
    }

    pub fn unacked(&self) -> usize {
        self.conn(0).hlen("unacked").unwrap()
    }

    /// The stored result document of a task, if any.
    pub fn result(&self, task_id: &str) -> Option<Value> {
        let raw: Option<String> = self.conn(1).get(format!("celery-task-meta-{task_id}")).unwrap();
        raw.map(|r| serde_json::from_str(&r).expect("result is JSON"))
    }

    pub fn status(&self, task_id: &str) -> Option<String> {
        self.result(task_id).and_then(|r| r["status"].as_str().map(str::to_owned))
    }

    /// Where a task's message is: in a queue list, in `unacked`, or nowhere (lost).
    pub fn whereabouts(&self, task_id: &str) -> String {
        let mut c = self.conn(0);
        let keys: Vec<String> = c.keys("*").unwrap();
        let mut found = Vec::new();
        for k in keys {
            let kind: String = redis::cmd("TYPE").arg(&k).query(&mut c).unwrap();
            let values: Vec<String> = match kind.as_str() {
                "list" => c.lrange(&k, 0, -1).unwrap(),
                "hash" => c.hvals(&k).unwrap(),
                _ => continue,
            };
            let n = values.iter().filter(|v| v.contains(task_id)).count();
            if n > 0 {
                found.push(format!("{n} in {k:?}"));
            }
        }
        let status = self.status(task_id);
        if found.is_empty() {
            format!("message nowhere in Redis, result {status:?}")
        } else {
            format!("{}, result {status:?}", found.join(", "))
        }
    }

    /// Statuses of many tasks in one MGET.
    pub fn statuses(&self, ids: &[String]) -> Vec<Option<String>> {
        if ids.is_empty() {
            return Vec::new();
        }
        let keys: Vec<String> = ids.iter().map(|i| format!("celery-task-meta-{i}")).collect();
        let raw: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut self.conn(1)).unwrap();
        raw.into_iter()
            .map(|r| r.and_then(|r| serde_json::from_str::<Value>(&r).ok()?["status"].as_str().map(str::to_owned)))
            .collect()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `celery-autoscale worker` process with JSON debug logs captured to a file.
pub struct Worker {
    pub child: Child,
    pub metrics_port: u16,
    pub log: PathBuf,
    _logdir: tempfile::TempDir,
}

impl Worker {
    /// Start a worker on `redis` with extra flags; waits until `/readyz` answers 200.
    pub fn start(redis: &Redis, extra: &[&str]) -> Worker {
        let w = Worker::spawn(redis, extra);
        w.wait_ready(Duration::from_secs(20));
        w
    }

    pub fn spawn(redis: &Redis, extra: &[&str]) -> Worker {
        Worker::spawn_with_metrics_port(redis, free_port(), extra)
    }

    pub fn spawn_with_metrics_port(redis: &Redis, metrics_port: u16, extra: &[&str]) -> Worker {
        Worker::spawn_with_env(redis, metrics_port, extra, &[])
    }

    /// [`Worker::spawn_with_metrics_port`] with extra environment variables (test hooks).
    pub fn spawn_with_env(redis: &Redis, metrics_port: u16, extra: &[&str], env: &[(&str, &str)]) -> Worker {
        let logdir = tempfile::tempdir().unwrap();
        let log = logdir.path().join("worker.log");
        let child = Command::new(BIN)
            .arg("worker")
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .args(extra)
            .env("BROKER_URL", redis.url(0))
            .env("BACKEND_URL", redis.url(1))
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "debug,redis=info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn worker");
        Worker { child, metrics_port, log, _logdir: logdir }
    }

    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.metrics_port, path)
    }

    pub fn wait_ready(&self, timeout: Duration) {
        wait_for("worker /readyz = 200", timeout, || match self.http_get("/readyz") {
            Some((200, _)) => Some(()),
            _ => None,
        });
    }

    /// A sample of the worker's /metrics (sum over label sets that match `labels`).
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, body) = self.http_get("/metrics").expect("metrics endpoint");
        metric_value(&body, name, labels)
    }

    pub fn signal(&self, sig: &str) {
        let ok =
            Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Wait for exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                panic!("worker did not exit within {timeout:?}; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Parsed JSON log lines.
    pub fn log_events(&self) -> Vec<Value> {
        BufReader::new(std::fs::File::open(&self.log).unwrap())
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect()
    }

    /// Task ids this worker started (from its `task started` debug lines).
    pub fn started_task_ids(&self) -> Vec<String> {
        self.log_events()
            .into_iter()
            .filter(|e| e["message"] == "task started")
            .filter_map(|e| e["task_id"].as_str().map(str::to_owned))
            .collect()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Minimal HTTP/1.1 GET on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    // axum sends these small bodies with Content-Length, never chunked.
    Some((status, body))
}

/// Sum of the samples of `name` whose label set contains `labels` (e.g. `task_name="x"`).
pub fn metric_value(exposition: &str, name: &str, labels: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{' | b' ')))
        .filter(|l| labels.is_empty() || l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The Python interpreter of the Celery venv (`.venv`, created by scripts/test.sh), or
/// `$CELERY_PYTHON`.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("CELERY_PYTHON") {
        return PathBuf::from(p);
    }
    let p = repo_root().join(".venv/bin/python");
    assert!(
        p.exists(),
        "Python Celery venv missing at {}: run scripts/test.sh (it creates it with pip install 'celery[redis]'), or set CELERY_PYTHON",
        p.display()
    );
    p
}

/// Run `tests/python/client.py <mode> <spec>` against `redis` and parse its JSON output.
pub fn python_client(redis: &Redis, mode: &str, spec: &Value, timeout: Duration) -> Value {
    let env = [("BROKER_URL", redis.url(0)), ("BACKEND_URL", redis.url(1))];
    let out = run_python("client.py", &[mode, &spec.to_string()], &env, timeout);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("client.py printed non-JSON ({e}): {out}"))
}

/// Run `tests/python/<script>` with the venv's Python; returns stdout, panics with stderr on
/// failure.
pub fn run_python(script: &str, args: &[&str], env: &[(&str, String)], timeout: Duration) -> String {
    let mut child = Command::new(python())
        .arg(repo_root().join("tests/python").join(script))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("PYTHONPATH", repo_root().join("tests/python"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python");
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "python {script} {args:?} timed out after {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python {script} {args:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A real Python Celery worker (`celery -A tasks worker`) on `redis`, killed on drop.
pub struct PythonWorker {
    pub child: Child,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl PythonWorker {
    /// `extra_env` sets the `tests/python/tasks.py` knobs (VISIBILITY_TIMEOUT, ACKS_LATE, ...).
    pub fn start(redis: &Redis, celery_args: &[&str], extra_env: &[(&str, &str)]) -> PythonWorker {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("python-worker.log");
        let child = Command::new(python())
            .args([
                "-m",
                "celery",
                "-A",
                "tasks",
                "worker",
                "--loglevel",
                "INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ])
            .args(celery_args)
            .current_dir(repo_root().join("tests/python"))
            .env("PYTHONPATH", repo_root().join("tests/python"))
            .env("BROKER_URL", redis.url(0))
            .env("BACKEND_URL", redis.url(1))
            .envs(extra_env.iter().copied())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("spawn python celery worker");
        let w = PythonWorker { child, log, _dir: dir };
        wait_for("python celery worker ready", Duration::from_secs(60), || {
            w.log_text().contains(" ready.").then_some(())
        });
        w
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn sigkill(&mut self) {
        // Kill the whole prefork tree at once, as an OOM kill or node loss would.
        let _ = Command::new("pkill").args(["-KILL", "-P", &self.child.id().to_string()]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PythonWorker {
    fn drop(&mut self) {
        self.sigkill();
    }
}

pub fn read(path: impl AsRef<Path>) -> Vec<u8> {
    std::fs::read(path.as_ref()).unwrap_or_else(|e| panic!("read {}: {e}", path.as_ref().display()))
}

/// Enqueue tasks the way a producer does (LPUSH of the Celery envelope); returns their ids.
pub fn enqueue(redis: &Redis, tasks: &[celery_autoscale::wire::NewTask]) -> Vec<String> {
    let steps = celery_autoscale::wire::PrioritySteps::default();
    let mut pipe = redis::pipe();
    for t in tasks {
        let (bytes, _) = t.to_message("gen0@tests");
        pipe.lpush(steps.key_for(&t.queue, i64::from(t.priority)), bytes).ignore();
    }
    let _: () = pipe.query(&mut redis.conn(0)).unwrap();
    tasks.iter().map(|t| t.id.clone()).collect()
}

/// `name(args…)` on the default queue.
pub fn task(name: &str, args: Vec<Value>) -> celery_autoscale::wire::NewTask {
    celery_autoscale::wire::NewTask::new(name, args, serde_json::Map::new(), "celery")
}

/// Wait until every id has a stored result with `status`.
pub fn wait_all(redis: &Redis, ids: &[String], status: &str, timeout: Duration) {
    let start = Instant::now();
    loop {
        let statuses = redis.statuses(ids);
        let pending: Vec<&String> =
            ids.iter().zip(&statuses).filter(|(_, s)| s.as_deref() != Some(status)).map(|(i, _)| i).collect();
        if pending.is_empty() {
            return;
        }
        if start.elapsed() > timeout {
            let first = pending.first().map(|s| s.as_str()).unwrap_or_default();
            panic!(
                "{} of {} tasks not {status} after {timeout:?}; first: {first} ({})",
                pending.len(),
                ids.len(),
                redis.whereabouts(first)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
