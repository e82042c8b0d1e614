//! How a `local` run ends when it cannot do what it was asked, in the style of cli_errors.rs:
//! the exit status, the reason said once with its fix, no panic — and nothing lost, no worker
//! left behind. Real Redis on free loopback ports, the real binary and its real workers.

mod common;

use common::{BIN, Redis, alive, free_port, repo_root, wait_for};
use redis::Commands;
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn fast_hpa() -> String {
    repo_root().join("tests/fixtures/hpa/fast-local-hpa.yaml").display().to_string()
}

/// `local` with short syncs, its own directories, and `extra`.
fn local(dir: &tempfile::TempDir, broker: &str, backend: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("local")
        .args(["--hpa", &fast_hpa(), "--sync-period", "2", "--worker-shutdown-timeout", "10"])
        .args(["--exporter-listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--output-dir")
        .arg(dir.path().join("out"))
        .args(["--broker-url", broker, "--backend-url", backend])
        .args(extra)
        .env_remove("BROKER_URL")
        .env_remove("BACKEND_URL")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Exit code 1, no panic, each phrase said exactly once in stderr; returns (stdout, stderr).
fn assert_failed(out: &Output, phrases: &[&str]) -> (String, String) {
    let (stdout, stderr) = text(out);
    assert_eq!(out.status.code(), Some(1), "exit {:?}\n{stdout}\n{stderr}", out.status);
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "panicked:\n{stderr}");
    for phrase in phrases {
        assert_eq!(stderr.matches(phrase).count(), 1, "{phrase:?} not said exactly once:\n{stderr}");
    }
    (stdout, stderr)
}

/// Every task id the run sent: done, queued, or held — none lost.
fn accounted(redis: &Redis) -> usize {
    let done: Vec<String> = redis.conn(1).keys("celery-task-meta-*").unwrap();
    done.len() + redis.depth("celery") + redis.unacked()
}

#[test]
fn an_unreachable_broker_is_one_error_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("redis://127.0.0.1:{}/0", free_port());
    let started = Instant::now();
    let out = local(&dir, &url, &url, &["--load", "burst:10", "--max-duration", "60"]).output().unwrap();
    let (stdout, stderr) =
        assert_failed(&out, &["cannot reach the broker", "Connection refused", &format!("is Redis running at {url}?")]);
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    assert_eq!(stderr.lines().filter(|l| !l.trim().is_empty()).count(), 1, "one line:\n{stderr}");
    assert!(stdout.is_empty() && !dir.path().join("out/logs/worker-1.log").exists(), "nothing started:\n{stdout}");
}

#[test]
fn a_load_that_cannot_be_sent_ends_the_run_with_the_reason() {
    // Redis answers PING but refuses the load's writes past its memory limit.
    let redis = Redis::start();
    let mut c = redis.conn(0);
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("3mb").query(&mut c).unwrap();
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("noeviction").query(&mut c).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out =
        local(&dir, &redis.url(0), &redis.url(1), &["--load", "burst:200000", "--task", "io", "--max-duration", "120"])
            .output()
            .unwrap();
    let (_, stderr) =
        assert_failed(&out, &["error: --load burst:200000: failed:", "command not allowed when used memory"]);
    assert!(started.elapsed() < Duration::from_secs(60), "ended by itself, took {:?}:\n{stderr}", started.elapsed());
}

#[test]
fn workers_that_keep_dying_with_nothing_done_end_the_run() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let command = "sh -c 'echo The module tasks was not found; exit 1'";
    let started = Instant::now();
    let out = local(
        &dir,
        &redis.url(0),
        &redis.url(1),
        &["--worker-command", command, "--load", "burst:5", "--task", "io", "--max-duration", "200"],
    )
    .output()
    .unwrap();
    let (_, stderr) = assert_failed(&out, &["error: workers keep dying", "fix the worker command"]);
    let error = stderr.lines().find(|l| l.starts_with("error:")).unwrap();
    assert!(error.contains("The module tasks was not found"), "the worker's last words are in the error: {error}");
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
    assert_eq!(accounted(&redis), 5, "the load's tasks are still there");
}

#[test]
fn a_load_run_stopped_before_its_tasks_succeeded_exits_non_zero_and_loses_nothing() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let out = local(
        &dir,
        &redis.url(0),
        &redis.url(1),
        &["--load", "burst:20", "--task", "io", "--io-seconds", "4:4", "--max-duration", "3"],
    )
    .output()
    .unwrap();
    let (_, stderr) = assert_failed(&out, &["error: --load burst:20: ", " of 20 tasks succeeded", "unfinished"]);
    assert!(stderr.contains("let it run to the end"), "{stderr}");
    assert_eq!(accounted(&redis), 20, "done + queued + held");
}

#[test]
fn tasks_left_by_an_earlier_run_are_said_and_counted_apart() {
    let redis = Redis::start();
    let sent = Command::new(BIN)
        .args(["loadgen", "burst", "--n", "7", "--task", "io", "--io-seconds", "0.05:0.1"])
        .args(["--broker-url", &redis.url(0), "--backend-url", &redis.url(1)])
        .output()
        .unwrap();
    assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
    let dir = tempfile::tempdir().unwrap();
    let out = local(
        &dir,
        &redis.url(0),
        &redis.url(1),
        &["--load", "burst:10", "--task", "io", "--io-seconds", "0.05:0.1", "--max-duration", "150"],
    )
    .output()
    .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stdout.matches("7 tasks left by an earlier run are queued").count(), 1, "{stdout}");
    assert!(stdout.contains("done: 10 tasks succeeded, 0 failed"), "the load counted alone:\n{stdout}");
    assert!(stdout.contains("not counted above: 7 tasks an earlier run had left"), "{stdout}");
    let done: Vec<String> = redis.conn(1).keys("celery-task-meta-*").unwrap();
    assert_eq!((done.len(), redis.depth("celery"), redis.unacked()), (17, 0, 0), "all run, none lost");
}

#[test]
fn a_closed_stdout_ends_the_run_cleanly() {
    // `local … | head -1`: the reader goes after the first line.
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let mut child = local(&dir, &redis.url(0), &redis.url(1), &["--max-duration", "120"]).spawn().unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap(); // dropped: closed
    assert!(first.starts_with("celery-autoscale local:"), "{first}");
    // It notices within a tick, so its first worker may be gone before it is seen: watch all along.
    let started = Instant::now();
    let mut workers = Vec::new();
    let status = wait_for("local to stop", Duration::from_secs(60), || {
        let out = Command::new("pgrep").args(["-P", &child.id().to_string(), "-f", "celery-autoscale worker"]).output();
        workers.extend(
            String::from_utf8_lossy(&out.ok()?.stdout).split_whitespace().filter_map(|p| p.parse::<u32>().ok()),
        );
        child.try_wait().unwrap()
    });
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}:\n{stderr}", started.elapsed());
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{stderr}");
    assert_eq!(stderr.matches("stdout was closed").count(), 1, "{stderr}");
    assert!(stderr.contains("done: ") && stderr.contains("timeline: "), "the summary went to stderr:\n{stderr}");
    assert!(stderr.contains("worker 1 stopping"), "the worker was stopped, not left behind:\n{stderr}");
    assert!(workers.iter().all(|p| !alive(*p)), "no worker left running: {workers:?}");
}
