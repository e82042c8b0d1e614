//! `celery-autoscale local` end to end: real Redis, the real exporter, real worker processes
//! scaled by the HPA algorithm, a real load. The HPA is the project's with its durations cut
//! (tests/fixtures/hpa/fast-local-hpa.yaml) so a whole scale-up and scale-down fits in a minute.

mod common;

use common::{BIN, Redis, alive, free_port, repo_root, signal_pid, wait_for};
use redis::Commands;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn fast_hpa() -> String {
    repo_root().join("tests/fixtures/hpa/fast-local-hpa.yaml").display().to_string()
}

struct Run {
    dir: tempfile::TempDir,
}

impl Run {
    fn new() -> Run {
        Run { dir: tempfile::tempdir().unwrap() }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn command(&self, broker: Option<&Redis>, extra: &[&str]) -> Command {
        self.command_with_hpa(broker, &fast_hpa(), extra)
    }

    fn command_with_hpa(&self, broker: Option<&Redis>, hpa: &str, extra: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("local")
            .args(["--hpa", hpa, "--sync-period", "2", "--worker-shutdown-timeout", "10"])
            .args(["--exporter-listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--data-dir", &self.path("data"), "--output-dir", &self.path("out")])
            .args(extra)
            .env_remove("BROKER_URL")
            .env_remove("BACKEND_URL")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(r) = broker {
            c.env("BROKER_URL", r.url(0)).env("BACKEND_URL", r.url(1));
        }
        c
    }

    fn timeline(&self) -> Vec<Vec<String>> {
        let text = std::fs::read_to_string(self.path("out/timeline.csv")).expect("timeline written");
        let mut lines = text.lines();
        assert!(lines.next().unwrap().starts_with("t,queue_depth,reserved,desired_replicas,running_workers"));
        lines.map(|l| l.split(',').map(str::to_owned).collect()).collect()
    }
}

fn column(rows: &[Vec<String>], i: usize) -> Vec<f64> {
    rows.iter().map(|r| r[i].parse::<f64>().unwrap_or(f64::NAN)).collect()
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_burst_scales_workers_up_and_back_down_and_every_task_succeeds() {
    let redis = Redis::start();
    let run = Run::new();
    let out = run
        .command(
            Some(&redis),
            &["--load", "burst:150", "--task", "io", "--io-seconds", "0.3:0.5", "--max-duration", "150"],
        )
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "local failed\n{stdout}\n{stderr}");
    assert!(stdout.contains("done: 150 tasks succeeded, 0 failed"), "{stdout}");

    // Every task ended SUCCESS in the result backend; nothing queued or held.
    let keys: Vec<String> = redis.conn(1).keys("celery-task-meta-*").unwrap();
    assert_eq!(keys.len(), 150);
    let ids: Vec<String> = keys.iter().map(|k| k.trim_start_matches("celery-task-meta-").to_owned()).collect();
    assert!(redis.statuses(&ids).iter().all(|s| s.as_deref() == Some("SUCCESS")));
    assert_eq!((redis.depth("celery"), redis.unacked()), (0, 0));

    // The timeline agrees with what happened.
    let rows = run.timeline();
    let desired = column(&rows, 3);
    let running = column(&rows, 4);
    let succeeded = column(&rows, 7);
    let peak = desired.iter().cloned().fold(0.0, f64::max);
    assert!(peak > 1.0, "scaled above one worker: {desired:?}");
    assert_eq!(*desired.last().unwrap(), 1.0, "back at the minimum");
    assert_eq!(running.iter().cloned().fold(0.0, f64::max), peak, "as many processes ran as were desired");
    assert_eq!(*succeeded.last().unwrap(), 150.0);
    assert!(succeeded.windows(2).all(|w| w[1] >= w[0]), "the success count never goes back");
    // Each scale event in the CSV is one the summary reports, in order.
    let csv_events: Vec<String> =
        rows.iter().filter_map(|r| r[10].split_whitespace().find(|e| e.contains("->")).map(str::to_owned)).collect();
    let printed: Vec<String> = stdout
        .lines()
        .filter(|l| l.starts_with("  t="))
        .filter_map(|l| Some(l.split_whitespace().nth(2)?.trim_end_matches(':').to_owned()))
        .collect();
    assert_eq!(csv_events, printed, "{stdout}");
    // One log file per worker process started.
    let started: usize = stdout.split(" started,").next().unwrap().rsplit('(').next().unwrap().parse().unwrap();
    let logs = std::fs::read_dir(run.dir.path().join("out/logs")).unwrap().count();
    assert_eq!(logs, started);
    assert!(std::fs::read_to_string(run.path("out/timeline.svg")).unwrap().contains("<svg"));
}

#[test]
fn the_embedded_redis_is_started_and_keeps_what_is_left_for_the_next_run() {
    let run = Run::new();
    let out = run
        .command(None, &["--load", "burst:20", "--task", "io", "--io-seconds", "0.05:0.1", "--max-duration", "90"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("(embedded)") && stdout.contains("done: 20 tasks succeeded"), "{stdout}");
    assert!(run.dir.path().join("data/redis/appendonlydir").exists(), "append-only data kept in the data dir");
}

#[test]
fn without_redis_server_the_error_says_how_to_get_it() {
    let run = Run::new();
    let out = run.command(None, &["--max-duration", "5"]).env("PATH", "/nonexistent").output().unwrap();
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("redis-server was not found")
            && stderr.contains("apt-get install redis-server")
            && stderr.contains("BROKER_URL"),
        "{stderr}"
    );
}

#[test]
fn ctrl_c_stops_everything_cleanly_and_a_dead_worker_is_replaced() {
    let redis = Redis::start();
    let run = Run::new();
    let mut child = run
        .command(
            Some(&redis),
            &["--load", "burst:300", "--task", "io", "--io-seconds", "0.4:0.6", "--max-duration", "120"],
        )
        .spawn()
        .unwrap();
    // Wait until at least two workers run, then kill one outright.
    let local_pid = child.id();
    let pids = wait_for("two local workers", Duration::from_secs(30), || {
        let pids = children(local_pid);
        (pids.len() >= 2).then_some(pids)
    });
    assert!(signal_pid(pids[0], "KILL"));
    let mut seen = pids.clone();
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(100));
        seen.extend(children(local_pid));
    }
    // Ctrl-C: SIGINT to local alone (its workers are in their own process groups).
    assert!(signal_pid(child.id(), "INT"));
    wait_for("local to exit", Duration::from_secs(60), || child.try_wait().unwrap().map(|_| ()));
    let output = child.wait_with_output().unwrap();
    let (stdout, stderr) = text(&output);
    // Stopped before every task of its load succeeded: said once, exit 1 (tests/local_endings.rs).
    assert_eq!(output.status.code(), Some(1), "{stdout}\n{stderr}");
    assert_eq!(stderr.matches("error: --load burst:300:").count(), 1, "{stderr}");
    assert!(stdout.contains("1 replaced after dying"), "{stdout}");
    assert!(stderr.contains("died (signal: 9 (SIGKILL)); it will be replaced"), "{stderr}");
    let rows = run.timeline();
    assert!(rows.iter().any(|r| r[10].contains("replaced 1")), "the timeline records the replacement");
    // Nothing lost: every task is either done, still queued, or held by the killed worker (it
    // comes back after the visibility timeout, as with a real node loss).
    let done: Vec<String> = redis.conn(1).keys("celery-task-meta-*").unwrap();
    let queued = redis.depth("celery");
    let held = redis.unacked();
    assert_eq!(
        done.len() + queued + held,
        300,
        "done {} + queued {queued} + held by the killed worker {held}",
        done.len()
    );
    assert!(held <= 2, "only the SIGKILLed worker's messages (concurrency 2) wait for the visibility timeout");
    let left: Vec<&u32> = seen.iter().filter(|p| alive(**p)).collect();
    assert!(left.is_empty(), "no worker left running: {left:?}");
}

/// The worker processes a `local` run has started (its children other than redis-server).
fn children(pid: u32) -> Vec<u32> {
    let out = Command::new("pgrep").args(["-P", &pid.to_string(), "-f", "celery-autoscale worker"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect()
}

/// `--worker-command`: real Python Celery workers (tests/python/tasks.py: acks_late, prefetch 1)
/// scaled by `local` exactly as our own: past one replica under a burst, back to one, every task
/// SUCCESS, nothing left queued or held, no process left behind, no URL in any argv.
#[test]
fn python_celery_workers_run_by_worker_command_scale_up_and_back_and_every_task_succeeds() {
    let redis = Redis::start();
    let run = Run::new();
    // A word unique to this run in every replica's argv, to find its processes.
    let marker = format!("local-python-{}", redis.port);
    let command = format!(
        "{} -m celery -A tasks worker -c 2 --loglevel=info -n {marker}@%h",
        shell_quote(&common::python().display().to_string())
    );
    let mut child = run
        .command(
            Some(&redis),
            &[
                "--worker-command",
                &command,
                "--worker-ready-after",
                "3",
                "--load",
                "burst:60",
                "--task",
                "io",
                "--io-seconds",
                "0.3:0.5",
                "--max-duration",
                "240",
            ],
        )
        .current_dir(repo_root().join("tests/python"))
        .env("PYTHONPATH", repo_root().join("tests/python"))
        .spawn()
        .unwrap();
    // While it runs: the replicas are the user's command, and no Redis URL is in their argv.
    let pids = wait_for("a python worker started by local", Duration::from_secs(60), || {
        // Children of local: its own argv holds the marker too.
        let out = Command::new("pgrep").args(["-P", &child.id().to_string(), "-f", &marker]).output().unwrap();
        let pids: Vec<u32> =
            String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect();
        (!pids.is_empty()).then_some(pids)
    });
    for pid in pids {
        if let Ok(argv) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
            assert!(argv.contains("celery") && !argv.contains("redis://"), "{argv}");
        }
    }
    wait_for("local to finish", Duration::from_secs(300), || child.try_wait().unwrap().map(|_| ()));
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "local failed\n{stdout}\n{stderr}");
    assert!(stdout.contains("done: 60 tasks succeeded, 0 failed"), "{stdout}\n{stderr}");

    let keys: Vec<String> = redis.conn(1).keys("celery-task-meta-*").unwrap();
    assert_eq!(keys.len(), 60);
    let ids: Vec<String> = keys.iter().map(|k| k.trim_start_matches("celery-task-meta-").to_owned()).collect();
    let statuses = redis.statuses(&ids);
    assert!(statuses.iter().all(|s| s.as_deref() == Some("SUCCESS")), "{statuses:?}");
    assert_eq!((redis.depth("celery"), redis.unacked()), (0, 0), "nothing queued or held");

    let rows = run.timeline();
    let desired = column(&rows, 3);
    let running = column(&rows, 4);
    assert!(desired.iter().cloned().fold(0.0, f64::max) > 1.0, "scaled past one worker: {desired:?}");
    assert!(running.iter().cloned().fold(0.0, f64::max) > 1.0, "more than one python worker ran: {running:?}");
    assert_eq!(*desired.last().unwrap(), 1.0, "back at the minimum");
    assert_eq!(column(&rows, 7).last().copied(), Some(60.0), "the CSV counts the results");
    // Surplus replicas were stopped with SIGTERM (Celery's warm shutdown), not killed.
    assert!(stderr.contains("stopping: SIGTERM") && !stderr.contains("SIGKILL"), "{stderr}");
    let log = std::fs::read_to_string(run.dir.path().join("out/logs/worker-1.log")).unwrap();
    assert!(log.contains("celery@") || log.contains(&marker), "the worker's own output is in its log: {log}");
    assert!(pgrep(&marker).is_empty(), "no python worker left running");
}

/// The README's "your own Python app": examples/python/myapp.py run by Python Celery workers,
/// fed by `--load` with `--task-name`/`--task-args`/`--task-kwargs` (no producer written), every
/// task SUCCESS with the result the app computes from those arguments.
#[test]
fn a_load_of_the_users_own_task_runs_on_python_workers_of_their_app() {
    let redis = Redis::start();
    let run = Run::new();
    let python = shell_quote(&common::python().display().to_string());
    let marker = format!("local-myapp-{}", redis.port);
    let command = format!("{python} -m celery -A myapp worker -c 2 --loglevel=info -n {marker}@%h");
    let out = run
        .command(
            Some(&redis),
            &[
                "--worker-command",
                &command,
                "--worker-ready-after",
                "3",
                "--load",
                "burst:30",
                "--task-name",
                "myapp.resize",
                "--task-args",
                "[640]",
                "--task-kwargs",
                r#"{"height": 480, "seconds": 0.2}"#,
                "--max-duration",
                "240",
            ],
        )
        .current_dir(repo_root().join("examples/python"))
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "local failed\n{stdout}\n{stderr}");
    assert!(stdout.contains("done: 30 tasks succeeded, 0 failed"), "{stdout}\n{stderr}");
    let keys: Vec<String> = redis.conn(1).keys("celery-task-meta-*").unwrap();
    assert_eq!(keys.len(), 30);
    for key in keys {
        let doc: String = redis.conn(1).get(&key).unwrap();
        let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert_eq!((doc["status"].as_str(), doc["result"].as_i64()), (Some("SUCCESS"), Some(640 * 480)), "{doc}");
    }
    assert_eq!((redis.depth("celery"), redis.unacked()), (0, 0), "nothing queued or held");
    assert!(pgrep(&marker).is_empty(), "no python worker left running");
}

#[test]
fn bad_task_arguments_are_refused_with_the_form_to_write() {
    let run = Run::new();
    for (args, expected) in [
        (&["--task-args", "[1]"][..], "required arguments were not provided"),
        (&["--task-name", "myapp.resize", "--task-args", "640"][..], "write the args as a JSON array"),
        (&["--task-name", "myapp.resize", "--task-kwargs", "[1]"][..], "write the kwargs as a JSON object"),
        (&["--task-name", "myapp.resize", "--task-kwargs", "{height: 1}"][..], "is not JSON"),
    ] {
        let mut full = vec!["--load", "burst:1", "--max-duration", "5"];
        full.extend_from_slice(args);
        let out = run.command(None, &full).output().unwrap();
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.matches(expected).count(), 1, "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn a_worker_command_that_cannot_run_is_said_once_before_anything_starts() {
    let run = Run::new();
    for (command, expected) in [
        ("celery 'unclosed", "a quote is not closed"),
        ("no-such-celery-program -A tasks worker", "cannot find the program \"no-such-celery-program\""),
        ("cd app && celery -A tasks worker", "wrap shell syntax in sh -c"),
    ] {
        let out = run.command(None, &["--worker-command", command, "--max-duration", "5"]).output().unwrap();
        let (_, stderr) = text(&out);
        assert!(!out.status.success());
        assert_eq!(stderr.matches(expected).count(), 1, "{stderr}");
        assert!(!run.dir.path().join("data/redis").exists(), "failed before starting Redis");
    }
}

/// Processes whose command line contains `word`.
fn pgrep(word: &str) -> Vec<u32> {
    let out = Command::new("pgrep").args(["-f", word]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect()
}

/// `s` quoted for a POSIX shell's word splitting (what --worker-command applies).
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The fast HPA with a target of 2 per worker (the concurrency), reading `metric`.
fn hpa_reading(run: &Run, metric: &str) -> String {
    let text = std::fs::read_to_string(fast_hpa()).unwrap();
    let text = text
        .replace("averageValue: \"10\"", "averageValue: \"2\"")
        .replace("name: celery_queue_depth\n", &format!("name: {metric}\n"));
    let path = run.path(&format!("{metric}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn depth_plus_running_keeps_busy_workers_that_depth_alone_scales_in() {
    // Eight 25 s tasks on workers of 2 slots: once all are taken the queue is empty, and the
    // depth alone asks for the minimum while four workers are still busy; waiting + held by
    // workers keeps asking for four until the tasks are done.
    let load = ["--load", "burst:8", "--task", "io", "--io-seconds", "25:25", "--max-duration", "150"];
    let mut timelines = Vec::new();
    for (metric, signal) in [("celery_queue_depth", "depth"), ("celery_queue_depth_running", "depth+running")] {
        let redis = Redis::start();
        let run = Run::new();
        // The signal follows the HPA's metric name (no --signal).
        let hpa = hpa_reading(&run, metric);
        let out = run.command_with_hpa(Some(&redis), &hpa, &load).output().unwrap();
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{signal}: local failed\n{stdout}\n{stderr}");
        assert!(stdout.contains(&format!("signal {signal}, sync every 2 s")), "{stdout}");
        assert!(stdout.contains("done: 8 tasks succeeded, 0 failed"), "{signal}: {stdout}");
        timelines.push(run.timeline());
    }
    // (depth, reserved, desired) per second.
    let rows = |rows: &[Vec<String>]| -> Vec<(f64, f64, f64)> {
        let (depth, reserved, desired) = (column(rows, 1), column(rows, 2), column(rows, 3));
        (0..rows.len()).map(|i| (depth[i], reserved[i], desired[i])).collect()
    };
    let (depth_run, running_run) = (rows(&timelines[0]), rows(&timelines[1]));
    // depth: fewer workers desired than the held work needs, while it is held.
    assert!(
        depth_run.iter().any(|&(d, r, want)| r >= 4.0 && want < ((d + r) / 2.0).ceil()),
        "depth alone should leave busy workers short: {depth_run:?}"
    );
    // depth+running: four desired for as long as the eight tasks are held.
    let from = running_run.iter().position(|&(_, _, want)| want == 4.0).expect("depth+running asks for four workers");
    let held: Vec<_> = running_run[from..].iter().filter(|&&(_, r, _)| r == 8.0).collect();
    assert!(held.len() >= 10, "the eight tasks were held for a while: {running_run:?}");
    assert!(held.iter().all(|&&(_, _, want)| want == 4.0), "depth+running kept four workers: {running_run:?}");
}
