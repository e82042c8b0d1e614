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

/// Build example `name` (a no-op when `cargo test` already did) and return its path: the
/// `examples/` directory of this test binary's profile (`target/<profile>/deps/..`).
pub fn example_binary(name: &str) -> PathBuf {
    let profile_dir = std::env::current_exe().unwrap().parent().and_then(|deps| deps.parent()).unwrap().to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "--quiet", "--example", name, "--manifest-path"]).arg(repo_root().join("Cargo.toml"));
    // Drop what `cargo test` set for this test's own process: build scripts that watch these
    // (ring's does) would otherwise rebuild on every switch between this build and a plain one.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let set_for_us =
            ["CARGO_PKG_", "CARGO_CFG_", "CARGO_BIN_", "CARGO_MANIFEST_"].iter().any(|p| key.starts_with(p))
                || ["CARGO_CRATE_NAME", "CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "OUT_DIR"].contains(&&*key);
        if set_for_us {
            build.env_remove(&*key);
        }
    }
    if profile_dir.file_name().is_some_and(|p| p == "release") {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build --example");
    assert!(status.success(), "cargo build --example {name} failed: {status}");
    let bin = profile_dir.join("examples").join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.exists(), "example binary not at {}", bin.display());
    bin
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
            // DEBUG SLEEP simulates a stalled Redis (exporter staleness test).
            .args(["--appendfsync", "always", "--enable-debug-command", "local", "--dir"])
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
        let mut worker = Command::new(BIN);
        worker.arg("worker");
        Worker::spawn_command(worker, redis, metrics_port, extra)
    }

    /// [`Worker::spawn_with_metrics_port`] with extra environment variables (test hooks).
    pub fn spawn_with_env(redis: &Redis, metrics_port: u16, extra: &[&str], env: &[(&str, &str)]) -> Worker {
        let mut worker = Command::new(BIN);
        worker.arg("worker").envs(env.iter().copied());
        Worker::spawn_command(worker, redis, metrics_port, extra)
    }

    /// Any program that takes `celery-autoscale worker`'s flags (e.g. an example binary).
    pub fn spawn_command(command: Command, redis: &Redis, metrics_port: u16, extra: &[&str]) -> Worker {
        Worker::spawn_command_urls(command, &redis.url(0), &redis.url(1), metrics_port, extra)
    }

    /// A worker on any broker/backend URL (TLS, Sentinel), passed through the environment.
    pub fn spawn_urls(broker_url: &str, backend_url: &str, metrics_port: u16, extra: &[&str]) -> Worker {
        let mut worker = Command::new(BIN);
        worker.arg("worker");
        Worker::spawn_command_urls(worker, broker_url, backend_url, metrics_port, extra)
    }

    fn spawn_command_urls(
        mut command: Command,
        broker_url: &str,
        backend_url: &str,
        metrics_port: u16,
        extra: &[&str],
    ) -> Worker {
        let logdir = tempfile::tempdir().unwrap();
        let log = logdir.path().join("worker.log");
        let child = command
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .args(extra)
            .env("BROKER_URL", broker_url)
            .env("BACKEND_URL", backend_url)
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "debug,redis=info")
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
        assert!(signal_pid(self.child.id(), sig), "kill -{sig}: the worker is gone");
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

/// A `celery-autoscale exporter` process, killed on drop.
pub struct Exporter {
    pub child: Child,
    pub port: u16,
    pub log: tempfile::NamedTempFile,
}

impl Exporter {
    /// Start on `broker_url` (passed in the environment) polling every 0.5 s; waits for /healthz.
    pub fn start(broker_url: &str, queues: &str, extra: &[&str]) -> Exporter {
        Exporter::start_with_env(broker_url, queues, extra, &[])
    }

    pub fn start_with_env(broker_url: &str, queues: &str, extra: &[&str], env: &[(&str, &str)]) -> Exporter {
        let port = free_port();
        let log = tempfile::NamedTempFile::new().unwrap();
        // 0.5 s between polls unless the caller chose.
        let interval: &[&str] = if extra.contains(&"--interval") { &[] } else { &["--interval", "0.5"] };
        let child = Command::new(BIN)
            .args(["exporter", "--queues", queues, "--listen", &format!("127.0.0.1:{port}")])
            .args(interval)
            .args(extra)
            .env("BROKER_URL", broker_url)
            .env("LOG_FORMAT", "json")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        let e = Exporter { child, port, log };
        wait_for("exporter /healthz", Duration::from_secs(10), || http_get(e.port, "/healthz").map(|_| ()));
        e
    }

    pub fn metrics(&self) -> String {
        http_get(self.port, "/metrics").expect("exporter /metrics").1
    }

    pub fn value(&self, name: &str, labels: &str) -> Option<f64> {
        let body = self.metrics();
        let present = body.lines().any(|l| l.starts_with(name) && l.contains(labels));
        present.then(|| metric_value(&body, name, labels))
    }

    /// Wait until `name{labels}` reads `want` (None: the series is absent).
    pub fn wait_value(&self, name: &str, labels: &str, want: Option<f64>) {
        wait_for(&format!("{name}{{{labels}}} = {want:?}"), Duration::from_secs(15), || {
            (self.value(name, labels) == want).then_some(())
        });
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Any helper process (a TLS redis-server, a sentinel), killed on drop.
pub struct Proc(pub Child);

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        let program = cmd.get_program().to_string_lossy().into_owned();
        Proc(
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {program}: {e}")),
        )
    }

    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Minimal HTTP/1.1 GET on loopback: (status, body).
/// GET on loopback: (status, body); the library's own reader (`celery_autoscale::autoscale::scrape`).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    celery_autoscale::autoscale::scrape::get_blocking(port, path, Duration::from_secs(5))
}

/// Sum of the samples of `name` whose label set contains `labels` (e.g. `task_name="x"`); 0
/// when there is none.
pub fn metric_value(exposition: &str, name: &str, labels: &str) -> f64 {
    celery_autoscale::autoscale::scrape::sample(exposition, name, labels).unwrap_or(0.0)
}

/// Send `sig` (e.g. "TERM", "KILL", "INT") to process `pid` through kill(2), not the `kill`
/// program. Returns whether the process existed.
pub fn signal_pid(pid: u32, sig: &str) -> bool {
    use rustix::process::{Pid, Signal, kill_process, test_kill_process};
    let pid = Pid::from_raw(pid as i32).expect("a real pid");
    let sig = match sig {
        "TERM" => Signal::TERM,
        "INT" => Signal::INT,
        "KILL" => Signal::KILL,
        "QUIT" => Signal::QUIT,
        "HUP" => Signal::HUP,
        "STOP" => Signal::STOP,
        "CONT" => Signal::CONT,
        "0" => return test_kill_process(pid).is_ok(),
        other => panic!("signal_pid: add {other} to the table"),
    };
    kill_process(pid, sig).is_ok()
}

/// Whether process `pid` still exists (a zombie counts until it is reaped).
pub fn alive(pid: u32) -> bool {
    signal_pid(pid, "0")
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

/// Flower (from the venv) headless on a free loopback port, its API open
/// (`FLOWER_UNAUTHENTICATED_API`), killed on drop. `app`: a Celery app for `-A` (Flower refuses
/// control of a task its app does not know), e.g. `tests/python`'s `tasks`.
pub struct Flower {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Flower {
    pub fn start(redis: &Redis, app: Option<&str>) -> Flower {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let mut flower = Command::new(python());
        flower.args(["-m", "celery"]);
        if let Some(app) = app {
            flower.args(["-A", app]);
        }
        let child = flower
            .args(["--broker", &redis.url(0), "flower"])
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
        wait_for("flower /healthcheck", Duration::from_secs(120), || match http_get(f.port, "/healthcheck") {
            Some((200, _)) => Some(()),
            _ => None,
        });
        f
    }

    /// `GET path` as JSON, when it answers 200.
    pub fn json(&self, path: &str) -> Option<Value> {
        match http_get(self.port, path)? {
            (200, body) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }

    /// `POST path` with a form body: (status, body).
    pub fn post(&self, path: &str, form: &str) -> (u16, String) {
        use std::io::{Read, Write};
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
    enqueue_on(&mut redis.conn(0), tasks)
}

/// [`enqueue`] on any connection (a TLS or Sentinel-managed server).
pub fn enqueue_on(conn: &mut redis::Connection, tasks: &[celery_autoscale::wire::NewTask]) -> Vec<String> {
    let steps = celery_autoscale::wire::PrioritySteps::default();
    let mut pipe = redis::pipe();
    for t in tasks {
        let (bytes, _) = t.to_message("gen0@tests");
        pipe.lpush(steps.key_for(&t.queue, i64::from(t.priority)), bytes).ignore();
    }
    let _: () = pipe.query(conn).unwrap();
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

/// Run the venv's Celery command line (`python -m celery -b <broker> <args>`), as an operator
/// would; returns whether it exited 0 and what it printed (stdout, then stderr).
pub fn celery_cli(redis: &Redis, args: &[&str], timeout: Duration) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out");
    let mut child = Command::new(python())
        .args(["-m", "celery", "-b", &redis.url(0), "--result-backend", &redis.url(1)])
        .args(args)
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn celery CLI");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!("celery {args:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    (status.success(), format!("{}{err}", std::fs::read_to_string(&out_path).unwrap()))
}

/// Celery's `EventReceiver` (tests/python/events.py) printing every event to a file; it is
/// subscribed when this returns.
pub struct EventLog {
    child: Child,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl EventLog {
    pub fn start(redis: &Redis, seconds: u32) -> EventLog {
        let mut c = redis.conn(0);
        let before: i64 = redis::cmd("PUBSUB").arg("NUMPAT").query(&mut c).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let child = Command::new(python())
            .arg(repo_root().join("tests/python/events.py"))
            .arg(seconds.to_string())
            .env("BROKER_URL", redis.url(0))
            .stdout(std::fs::File::create(&path).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn events.py");
        // kombu subscribes to the event exchange with PSUBSCRIBE.
        wait_for("the event receiver to subscribe", Duration::from_secs(30), || {
            let n: i64 = redis::cmd("PUBSUB").arg("NUMPAT").query(&mut c).ok()?;
            (n > before).then_some(())
        });
        EventLog { child, path, _dir: dir }
    }

    pub fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Wait until an event matches `pred`; returns it.
    pub fn wait(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        wait_for(what, timeout, || self.events().into_iter().find(|e| pred(e)))
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
