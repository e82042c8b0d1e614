//! The real binary, given bad command lines and unreachable or refusing services: each case ends
//! with one clear error (its key phrase said exactly once, naming the setting), the right exit
//! code (2: the command line cannot work; 1: something failed while running), no panic, and —
//! for loadgen — nothing sent when the command line was refused.

mod common;

use common::{BIN, Redis, free_port, wait_for};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs the binary (no inherited BROKER_URL/BACKEND_URL) and returns its exit code and stderr.
fn run(args: &[&str]) -> (i32, String) {
    let output = Command::new(BIN)
        .args(args)
        .env_remove("BROKER_URL")
        .env_remove("BACKEND_URL")
        .stdin(Stdio::null())
        .output()
        .expect("the binary runs");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// Exit code as expected, every phrase exactly once, no panic or abort.
fn assert_error(args: &[&str], code: i32, phrases: &[&str]) -> String {
    let (got, stderr) = run(args);
    assert_eq!(got, code, "{args:?}: exit code {got}, stderr:\n{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "{args:?} panicked:\n{stderr}");
    for phrase in phrases {
        assert_eq!(stderr.matches(phrase).count(), 1, "{args:?}: {phrase:?} not said exactly once:\n{stderr}");
    }
    stderr
}

/// A loopback URL where nothing listens.
fn nobody_url() -> String {
    format!("redis://127.0.0.1:{}/0", free_port())
}

#[test]
fn simulate_file_errors_are_said_once() {
    assert_error(&["simulate", "--hpa", "no-such.yaml"], 1, &["No such file or directory", "no-such.yaml"]);
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "kind: ConfigMap\n").unwrap();
    assert_error(
        &["simulate", "--hpa", bad.to_str().unwrap()],
        1,
        &["no autoscaling/v2 HorizontalPodAutoscaler found", "bad.yaml"],
    );
    assert_error(
        &["simulate", "--hpa", "k8s/autoscaling.yaml", "--trace", "no-such-trace.csv"],
        1,
        &["No such file or directory", "no-such-trace.csv"],
    );
}

#[test]
fn simulate_refuses_absurd_values() {
    let hpa = common::repo_root().join("k8s/autoscaling.yaml");
    let hpa = hpa.to_str().unwrap();
    for (flag, value) in [
        ("--service-time", "NaN"),
        ("--step", "-1"),
        ("--max-duration", "1e300"),
        ("--sync-period", "inf"),
        ("--duration", "0"),
    ] {
        assert_error(&["simulate", "--hpa", hpa, &format!("{flag}={value}")], 2, &[flag, "seconds"]);
    }
    assert_error(&["simulate", "--hpa", hpa, "--load", "burst:18446744073709551615"], 2, &["limit of 1000000000"]);
    assert_error(&["simulate", "--hpa", hpa, "--load", "burst:20000000"], 2, &["at most 10000000"]);
    assert_error(&["simulate", "--hpa", hpa, "--max-duration", "2592000", "--step", "0.001"], 2, &["--step"]);
    assert_error(&["simulate", "--hpa", hpa, "--initial-replicas", "2000000000"], 2, &["--initial-replicas"]);
}

#[test]
fn exporter_refuses_absurd_interval_and_says_a_busy_port_once() {
    for value in ["1e300", "NaN", "-5", "0", "inf"] {
        assert_error(
            &["exporter", &format!("--interval={value}")],
            2,
            &["--interval", "not a usable number of seconds"],
        );
    }
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = holder.local_addr().unwrap().to_string();
    assert_error(
        &["exporter", "--broker-url", &nobody_url(), "--listen", &busy],
        1,
        &["Address already in use", "--listen"],
    );
}

#[test]
fn worker_refuses_absurd_durations() {
    for flag in
        ["--visibility-timeout", "--shutdown-timeout", "--restore-interval", "--time-limit", "--soft-time-limit"]
    {
        assert_error(&["worker", flag, "1e30"], 2, &[flag]);
        assert_error(&["worker", flag, "NaN"], 2, &[flag]);
    }
    assert_error(&["worker", "--queues", ","], 2, &["--queues is empty"]);
}

#[test]
fn loadgen_without_redis_says_connection_refused_once() {
    let url = nobody_url();
    assert_error(
        &["loadgen", "burst", "--n", "3", "--broker-url", &url],
        1,
        &["Connection refused", "BROKER_URL=", &format!("is Redis running at {url}?")],
    );
}

#[test]
fn loadgen_burst_with_a_bare_count_says_the_form_to_write() {
    assert_error(&["loadgen", "burst", "400", "--broker-url", &nobody_url()], 2, &["write `loadgen burst --n 400`"]);
}

#[test]
fn standalone_listeners_default_to_loopback_and_the_manifests_pass_their_address() {
    for (args, default) in [(["worker", "--help"], "127.0.0.1:9191"), (["exporter", "--help"], "127.0.0.1:9808")] {
        let out = Command::new(BIN).args(args).output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains(&format!("[default: {default}]")), "{args:?}:\n{help}");
    }
    let root = common::repo_root();
    for (file, addr) in [("k8s/worker.yaml", "- 0.0.0.0:9191"), ("k8s/exporter.yaml", "- 0.0.0.0:9808")] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        assert!(text.contains(addr), "{file} must pass {addr} explicitly (nix/k8s renders it)");
    }
}

#[test]
fn loadgen_refuses_bad_input_before_sending_anything() {
    let redis = Redis::start();
    let url = redis.url(0);
    let backend = redis.url(1);
    let cases: &[(&[&str], &str)] = &[
        (&["burst", "--n", "18446744073709551615"], "--n"),
        (&["ramp", "--from", "1e15", "--to", "1e15", "--duration", "1e6"], "--from"),
        (&["ramp", "--from", "1e5", "--to", "1e5", "--duration", "1e6"], "limit of 1000000000"),
        (&["oscillate", "--period", "0"], "--period"),
        (&["burst", "--io-seconds", "NaN:NaN"], "--io-seconds"),
        (&["burst", "--io-seconds", "0:inf"], "--io-seconds"),
        (&["burst", "--io-seconds=-1:-0.5"], "--io-seconds"),
        (&["burst", "--io-seconds", "2:1"], "--io-seconds"),
        (&["burst", "--n", "5", "--wait", "--wait-timeout=-1"], "--wait-timeout"),
        (&["burst", "--n", "5", "--wait", "--wait-timeout=NaN"], "--wait-timeout"),
        (&["burst", "--n", "5", "--wait", "--wait-timeout=1e30"], "--wait-timeout"),
        (&["burst", "--n", "2000000", "--wait"], "--wait follows at most 1000000"),
        (&["burst", "--n", "5", "--queue", "a,b"], "one queue"),
    ];
    for (args, phrase) in cases {
        let mut full = vec!["loadgen"];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--broker-url", &url, "--backend-url", &backend]);
        assert_error(&full, 2, &[phrase]);
    }
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut redis.conn(0)).unwrap();
    assert!(keys.is_empty(), "a refused command line sent something: {keys:?}");
}

/// Peak resident memory of a running process, from /proc (Linux), in kB.
fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn loadgen_memory_stays_bounded_for_a_billion_tasks() {
    // Redis refuses writes past 16 MB, so the run ends by itself after some thousands of tasks:
    // what matters is that loadgen streamed them (no allocation sized by --n) and said why it
    // stopped, once.
    let redis = Redis::start();
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("16mb").query(&mut redis.conn(0)).unwrap();
    let _: () =
        redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("noeviction").query(&mut redis.conn(0)).unwrap();
    let mut child = Command::new(BIN)
        .args(["loadgen", "burst", "--n", "1000000000", "--task", "io", "--broker-url", &redis.url(0)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut peak = 0;
    let started = Instant::now();
    let status = wait_for("loadgen to stop at Redis' maxmemory", Duration::from_secs(180), || {
        if let Some(kb) = peak_rss_kb(pid) {
            peak = peak.max(kb);
        }
        child.try_wait().unwrap()
    });
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "after {:?}: {stderr}", started.elapsed());
    assert_eq!(stderr.matches("command not allowed when used memory").count(), 1, "{stderr}");
    assert!(stderr.contains("of 1000000000 tasks"), "{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("memory allocation"), "{stderr}");
    assert!(redis.depth("celery") > 1000, "Redis should have taken thousands before refusing");
    assert!(peak > 0 && peak < 200_000, "loadgen peak RSS {peak} kB for a billion-task burst");
}

#[test]
fn pod_deletion_cost_names_the_missing_pod_setting() {
    let (code, stderr) = {
        let output = Command::new(BIN)
            .args(["worker", "--pod-deletion-cost", "--broker-url", &nobody_url()])
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.matches("--pod-deletion-cost needs --pod-name").count(), 1, "{stderr}");
    assert_error(
        &["worker", "--pod-deletion-cost", "--pod-name", "w", "--pod-namespace", " "],
        2,
        &["--pod-deletion-cost needs --pod-namespace"],
    );
    let out = Command::new(BIN).args(["worker"]).env("WORKER_POD_DELETION_COST", "maybe").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--pod-deletion-cost") && !stderr.contains("panicked"), "{stderr}");
}
