//! The exporter against a real Redis, and the whole metrics path against a real Prometheus
//! running the project's shipped scrape config (targets pointed at loopback), queried with the
//! exact PromQL the prometheus-adapter rule will send. Also: loadgen messages run on a real
//! Python Celery worker, and loadgen fails clearly when Redis is unreachable.

mod common;

use celery_autoscale::autoscale::simulate::{Signal, SimulateArgs};
use common::{
    BIN, Exporter, PythonWorker, Redis, Worker, enqueue, free_port, http_get, metric_value, repo_root, task, wait_for,
};
use redis::Commands;
use serde::Deserialize;
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[test]
fn depth_sums_every_priority_list_and_queue_and_reserved_counts_held_work() {
    let redis = Redis::start();
    let exporter = Exporter::start(&redis.url(0), "celery,other,empty", &[]);
    let mut batch = Vec::new();
    for p in [0u8, 0, 2, 3, 5, 6, 7, 9, 9, 9] {
        let mut t = task("tasks.io_bound", vec![json!(5)]);
        t.priority = p;
        batch.push(t);
    }
    for _ in 0..4 {
        let mut t = task("tasks.io_bound", vec![json!(5)]);
        t.queue = "other".into();
        batch.push(t);
    }
    enqueue(&redis, &batch);
    let llen_celery: usize = redis.conn(0).llen("celery").unwrap();
    assert_eq!(llen_celery, 3, "a bare LLEN sees only bucket 0 (priorities 0, 0, 2)");
    exporter.wait_value("celery_queue_depth", "queue=\"celery\"", Some(10.0));
    exporter.wait_value("celery_queue_depth", "queue=\"other\"", Some(4.0));
    exporter.wait_value("celery_queue_depth", "queue=\"empty\"", Some(0.0));
    assert_eq!(exporter.value("celery_queue_reserved", "queue=\"celery\""), Some(0.0));

    // A worker on `celery` with 3 slots holds 3 messages (taken, running, unacknowledged).
    let _w = Worker::start(&redis, &["--concurrency", "3"]);
    exporter.wait_value("celery_queue_reserved", "queue=\"celery\"", Some(3.0));
    exporter.wait_value("celery_queue_depth", "queue=\"celery\"", Some(7.0));
    assert_eq!(exporter.value("celery_queue_reserved", "queue=\"other\""), Some(0.0));
    assert_eq!(exporter.value("celery_queue_exporter_last_poll_ok", ""), Some(1.0));
}

#[test]
fn redis_outage_withdraws_the_series_and_recovery_restores_them() {
    let mut redis = Redis::start();
    enqueue(&redis, &[task("tasks.io_bound", vec![json!(1)]), task("tasks.io_bound", vec![json!(1)])]);
    let exporter = Exporter::start(&redis.url(0), "celery", &[]);
    exporter.wait_value("celery_queue_depth", "queue=\"celery\"", Some(2.0));
    redis.stop();
    exporter.wait_value("celery_queue_exporter_last_poll_ok", "", Some(0.0));
    assert_eq!(exporter.value("celery_queue_depth", "queue=\"celery\""), None, "no stale depth while Redis is down");
    assert!(http_get(exporter.port, "/readyz").is_some_and(|(s, _)| s == 503));
    redis.restart();
    exporter.wait_value("celery_queue_exporter_last_poll_ok", "", Some(1.0));
    exporter.wait_value("celery_queue_depth", "queue=\"celery\"", Some(2.0));
    let log = std::fs::read_to_string(exporter.log.path()).unwrap();
    assert!(log.contains("cannot poll Redis") && log.contains("work again"), "{log}");
}

#[test]
fn a_wrong_password_is_reported_and_no_depth_is_served() {
    let redis = Redis::start();
    let _: () = redis::cmd("CONFIG").arg("SET").arg("requirepass").arg("s3cret").query(&mut redis.conn(0)).unwrap();
    let exporter = Exporter::start(&format!("redis://:wrong@127.0.0.1:{}/0", redis.port), "celery", &[]);
    exporter.wait_value("celery_queue_exporter_last_poll_ok", "", Some(0.0));
    assert_eq!(exporter.value("celery_queue_depth", "queue=\"celery\""), None);
    wait_for("a log line naming the password", Duration::from_secs(10), || {
        let log = std::fs::read_to_string(exporter.log.path()).unwrap();
        (log.contains("check the password in BROKER_URL") && !log.contains("wrong@")).then_some(())
    });
}

#[test]
fn reserved_counting_stays_bounded_with_100k_unacked_entries() {
    let redis = Redis::start();
    let (bytes, _) = task("tasks.io_bound", vec![json!(1)]).to_message("gen0@tests");
    let entry = {
        let mut e = b"[".to_vec();
        e.extend_from_slice(&bytes);
        e.extend_from_slice(b", \"\", \"celery\"]");
        e
    };
    let mut c = redis.conn(0);
    for chunk in 0..100 {
        let mut pipe = redis::pipe();
        for i in 0..1000 {
            pipe.hset("unacked", format!("tag-{chunk}-{i}"), &entry).ignore();
        }
        let _: () = pipe.query(&mut c).unwrap();
    }
    let exporter = Exporter::start(&redis.url(0), "celery", &[]);
    exporter.wait_value("celery_queue_reserved", "queue=\"celery\"", Some(100_000.0));
    let body = exporter.metrics();
    let polls = metric_value(&body, "celery_queue_exporter_poll_duration_seconds_count", "");
    let total = metric_value(&body, "celery_queue_exporter_poll_duration_seconds_sum", "");
    println!("100k unacked entries: mean poll {:.1} ms over {polls} polls", 1000.0 * total / polls);
    assert!(polls >= 1.0);
}

/// The shipped Prometheus config with its targets pointed at loopback; everything else (the
/// namespace relabelling, scrape intervals, the alert rules) as shipped.
fn prometheus_config(dir: &Path, exporter_port: u16, worker_port: u16) -> std::path::PathBuf {
    let shipped = repo_root().join("nix/k8s/files/prometheus.yml");
    let mut cfg: serde_norway::Value = serde_norway::from_str(&std::fs::read_to_string(&shipped).unwrap()).unwrap();
    cfg["global"]["scrape_interval"] = "1s".into();
    cfg["global"]["evaluation_interval"] = "1s".into();
    cfg["global"]["scrape_timeout"] = "1s".into();
    let rules = repo_root().join("nix/k8s/files/alerts.yml");
    cfg["rule_files"] = serde_norway::Value::Sequence(vec![rules.to_str().unwrap().into()]);
    let jobs = cfg["scrape_configs"].as_sequence_mut().unwrap();
    jobs.retain(|j| ["celery-queue-exporter", "celery-worker"].contains(&j["job_name"].as_str().unwrap()));
    assert_eq!(jobs.len(), 2, "the shipped config scrapes the exporter and the workers");
    for job in jobs.iter_mut() {
        let port = if job["job_name"] == "celery-queue-exporter" { exporter_port } else { worker_port };
        let m = job.as_mapping_mut().unwrap();
        m.remove("dns_sd_configs");
        m.insert("scrape_interval".into(), "1s".into());
        m.insert("scrape_timeout".into(), "1s".into());
        let targets: serde_norway::Value =
            serde_norway::from_str(&format!("[{{targets: ['127.0.0.1:{port}']}}]")).unwrap();
        m.insert("static_configs".into(), targets);
    }
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, serde_norway::to_string(&cfg).unwrap()).unwrap();
    path
}

struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(exporter_port: u16, worker_port: u16) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = prometheus_config(dir.path(), exporter_port, worker_port);
        let check = Command::new("promtool")
            .arg("check")
            .arg("config")
            .arg(&config)
            .output()
            .expect("promtool (apt-get install prometheus)");
        assert!(
            check.status.success(),
            "promtool rejects the test config: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus (apt-get install prometheus)");
        let p = Prometheus { child, port, _dir: dir };
        wait_for("prometheus ready", Duration::from_secs(30), || {
            http_get(p.port, "/-/ready").and_then(|(s, _)| (s == 200).then_some(()))
        });
        p
    }

    /// An instant query; the result vector.
    fn query(&self, promql: &str) -> Vec<Value> {
        let q: String = promql
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
            .collect();
        let (status, body) = http_get(self.port, &format!("/api/v1/query?query={q}")).expect("prometheus API");
        assert_eq!(status, 200, "query {promql}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["data"]["result"].as_array().unwrap().clone()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The external rules of the rendered ConfigMap adapter-config (k8s/adapter.yaml, generated from
/// nix/k8s/signals.nix): (the External metric served, its metricsQuery template).
fn adapter_rules() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_root().join("k8s/adapter.yaml")).unwrap();
    let config = serde_norway::Deserializer::from_str(&text)
        .map(|d| serde_norway::Value::deserialize(d).unwrap())
        .find(|doc| doc["kind"] == "ConfigMap" && doc["metadata"]["name"] == "adapter-config")
        .expect("k8s/adapter.yaml holds the ConfigMap adapter-config");
    let cfg: serde_norway::Value = serde_norway::from_str(config["data"]["config.yaml"].as_str().unwrap()).unwrap();
    cfg["externalRules"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|rule| {
            let name =
                rule["name"]["as"].as_str().unwrap_or(rule["seriesQuery"].as_str().unwrap().split('{').next().unwrap());
            (name.to_owned(), rule["metricsQuery"].as_str().unwrap().to_owned())
        })
        .collect()
}

/// The adapter's metricsQuery serving `metric`, as the adapter fills it for the HPA's selector
/// `queue=celery` in namespace celery-autoscale.
fn adapter_query(metric: &str) -> String {
    let (_, template) = adapter_rules().into_iter().find(|(name, _)| name == metric).expect("the adapter serves it");
    template
        .replace("<<.Series>>", "celery_queue_depth")
        .replace("<<.LabelMatchers>>", "queue=\"celery\",namespace=\"celery-autoscale\"")
}

const SIGNALS: [Signal; 4] = [Signal::Depth, Signal::DepthRunning, Signal::DepthArrivals, Signal::DepthGrowth];

#[test]
fn the_adapter_serves_each_signal_with_the_query_the_simulator_models() {
    // The simulator's defaults: lookahead = --scrape-delay + --sync-period + --pod-startup, and
    // --rate-window; the kubenix defaults (scaling-policy.nix) must be the same.
    #[derive(clap::Parser)]
    struct P {
        #[command(flatten)]
        args: SimulateArgs,
    }
    let sim = <P as clap::Parser>::parse_from(["simulate", "--hpa", "k8s/autoscaling.yaml"]).args;
    let lookahead = (sim.scrape_delay + sim.sync_period + sim.pod_startup).as_secs_f64();
    assert_eq!(lookahead, 40.0);
    let window = sim.rate_window.as_secs_f64();
    let expected: Vec<(String, String)> =
        SIGNALS.iter().map(|s| (s.metric_name(), s.promql(lookahead, window))).collect();
    assert_eq!(adapter_rules(), expected, "k8s/adapter.yaml (nix/k8s/signals.nix) and Signal::promql differ");
    assert_eq!(expected[0].0, "celery_queue_depth", "the default HPA metric keeps its name");
    for s in SIGNALS {
        assert_eq!(Signal::from_metric_name(&s.metric_name()), Some(s));
    }
}

#[test]
fn prometheus_scrapes_the_exporter_and_a_worker_and_the_adapter_query_returns_one_series() {
    let redis = Redis::start();
    let exporter = Exporter::start(&redis.url(0), "celery", &[]);
    let worker_port = free_port();
    let prom = Prometheus::start(exporter.port, worker_port);
    let out = Command::new(BIN)
        .args(["loadgen", "burst", "--n", "120", "--task", "io", "--io-seconds", "0.05:0.1"])
        .env("BROKER_URL", redis.url(0))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("sent 120 tasks"));

    wait_for("Prometheus sees depth 120", Duration::from_secs(30), || {
        let r = prom.query("celery_queue_depth{queue=\"celery\"}");
        (r.len() == 1 && r[0]["value"][1] == "120").then_some(())
    });
    let series = prom.query("celery_queue_depth{queue=\"celery\"}");
    assert_eq!(series[0]["metric"]["namespace"], "celery-autoscale", "the shipped relabelling adds the namespace");
    let q = adapter_query("celery_queue_depth");
    let filled = prom.query(&q);
    assert_eq!(filled.len(), 1, "the adapter query {q} returns exactly one series: {filled:?}");
    assert_eq!(filled[0]["value"][1], "120");
    // Every signal's rule returns one series per queue, before any worker ran (no
    // celery_task_success_total yet) and after; the rate terms only add.
    let value = |metric: &str| {
        let q = adapter_query(metric);
        let r = prom.query(&q);
        assert_eq!(r.len(), 1, "{metric}: {q} returns exactly one series: {r:?}");
        assert_eq!(r[0]["metric"]["queue"], "celery", "{metric}: {r:?}");
        r[0]["value"][1].as_str().unwrap().parse::<f64>().unwrap()
    };
    assert_eq!(value("celery_queue_depth_running"), 120.0, "nothing held yet");
    assert!(value("celery_queue_depth_arrivals") >= 120.0);
    assert!(value("celery_queue_depth_growth") >= 120.0);

    // A worker on the port Prometheus scrapes drains the queue; the task rate turns positive.
    let _w = Worker::spawn_with_metrics_port(&redis, worker_port, &["--concurrency", "8"]);
    wait_for("rate(celery_task_success_total[1m]) > 0", Duration::from_secs(60), || {
        let r = prom.query("sum(rate(celery_task_success_total[1m]))");
        r.first().and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok()).filter(|v| *v > 0.0).map(|_| ())
    });
    wait_for("depth 0 in Prometheus", Duration::from_secs(60), || {
        prom.query(&q).first().and_then(|s| (s["value"][1] == "0").then_some(()))
    });
    for s in SIGNALS {
        value(&s.metric_name());
    }
    let up = prom.query("up{job=\"celery-worker\",namespace=\"celery-autoscale\"}");
    assert_eq!(up.len(), 1);
    assert_eq!(up[0]["value"][1], "1");
}

#[test]
fn a_python_celery_worker_runs_what_loadgen_sends() {
    let redis = Redis::start();
    let _py = PythonWorker::start(&redis, &["--concurrency", "2", "--pool", "threads"], &[]);
    let out = Command::new(BIN)
        .args(["loadgen", "burst", "--n", "30", "--task", "mix", "--cpu-n", "1000:20000", "--io-seconds", "0.01:0.05"])
        .args(["--wait", "--wait-timeout", "60"])
        .env("BROKER_URL", redis.url(0))
        .env("BACKEND_URL", redis.url(1))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "loadgen --wait failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("results: 30 succeeded, 0 failed"), "{stdout}");
}

#[test]
fn loadgen_says_which_redis_it_could_not_reach_and_exits_nonzero() {
    let port = free_port();
    let out = Command::new(BIN)
        .args(["loadgen", "burst", "--n", "10"])
        .env("BROKER_URL", format!("redis://:pw@127.0.0.1:{port}/0"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("redis://:***@127.0.0.1:{port}/0")) && err.contains("0 of 10 tasks"), "{err}");
    assert!(!err.contains(":pw@"), "password not printed");
}

#[test]
fn ramp_and_oscillate_send_at_their_rate() {
    let redis = Redis::start();
    for (args, total) in [
        // 20 → 60 tasks/s over 2 s: 20·2 + 40·2/2 = 80 tasks
        (vec!["ramp", "--from", "20", "--to", "60", "--duration", "2"], 80usize),
        // 30 ± 30 tasks/s, period 1 s, for 2 s: two whole periods = 60 tasks
        (vec!["oscillate", "--mean", "30", "--amplitude", "30", "--period", "1", "--duration", "2"], 60),
    ] {
        let _: () = redis::cmd("FLUSHDB").query(&mut redis.conn(0)).unwrap();
        let started = std::time::Instant::now();
        let out = Command::new(BIN)
            .arg("loadgen")
            .args(&args)
            .args(["--task", "io"])
            .env("BROKER_URL", redis.url(0))
            .output()
            .unwrap();
        let elapsed = started.elapsed();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(redis.depth("celery"), total, "{args:?}");
        assert!(
            elapsed >= Duration::from_millis(1800) && elapsed < Duration::from_secs(6),
            "{args:?} took {elapsed:?}"
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("sent {total} tasks")));
    }
}

#[test]
fn a_key_of_the_wrong_type_withdraws_only_its_own_series() {
    let redis = Redis::start();
    let queues: Vec<String> = (0..20).map(|i| format!("q{i:02}")).collect();
    let mut batch = Vec::new();
    for q in &queues {
        let mut t = task("tasks.io_bound", vec![json!(1)]);
        t.queue = q.clone();
        batch.push(t);
    }
    enqueue(&redis, &batch);
    let exporter = Exporter::start(&redis.url(0), &queues.join(","), &[]);
    exporter.wait_value("celery_queue_depth", "queue=\"q19\"", Some(1.0));

    let _: () = redis.conn(0).del("q05").unwrap();
    let _: () = redis.conn(0).set("q05", "x").unwrap();
    exporter.wait_value("celery_queue_depth", "queue=\"q05\"", None);
    wait_for("three polls counted for q05", Duration::from_secs(15), || {
        (exporter.value("celery_queue_exporter_key_errors_total", "queue=\"q05\"")? >= 3.0).then_some(())
    });
    let body = exporter.metrics();
    for q in queues.iter().filter(|q| *q != "q05") {
        assert_eq!(metric_value(&body, "celery_queue_depth", &format!("queue=\"{q}\"")), 1.0, "{q}: {body}");
    }
    assert_eq!(metric_value(&body, "celery_queue_exporter_last_poll_ok", ""), 1.0);
    let log = exporter.log_text();
    assert_eq!(log.matches("cannot read this queue's keys").count(), 1, "logged once: {log}");
    assert!(log.contains("q05") && log.contains("WRONGTYPE"), "{log}");

    // A wrong-type unacked: depth still served for all 20, reserved withdrawn and counted.
    let _: () = redis.conn(0).set("unacked", "x").unwrap();
    exporter.wait_value("celery_queue_reserved", "queue=\"q01\"", None);
    wait_for("unacked counted", Duration::from_secs(15), || {
        (exporter.value("celery_queue_exporter_key_errors_total", "queue=\"unacked\"")? >= 1.0).then_some(())
    });
    assert_eq!(exporter.value("celery_queue_depth", "queue=\"q01\""), Some(1.0));
    assert_eq!(exporter.value("celery_queue_exporter_last_poll_ok", ""), Some(1.0));

    // Healed: the series come back.
    let _: () = redis.conn(0).del(&["q05", "unacked"]).unwrap();
    exporter.wait_value("celery_queue_depth", "queue=\"q05\"", Some(0.0));
    exporter.wait_value("celery_queue_reserved", "queue=\"q01\"", Some(0.0));
    assert!(exporter.log_text().contains("queue keys readable again"));
}

#[test]
fn a_poll_slower_than_the_interval_marks_the_data_stale() {
    let redis = Redis::start();
    enqueue(&redis, &[task("tasks.io_bound", vec![json!(1)])]);
    // Polls every 0.5 s; a poll that hangs is given up after 2 s (the floor of the timeout).
    let exporter = Exporter::start(&redis.url(0), "celery", &[]);
    exporter.wait_value("celery_queue_depth", "queue=\"celery\"", Some(1.0));
    exporter.wait_value("celery_queue_exporter_last_poll_ok", "", Some(1.0));
    // Redis stalls for 1.8 s: shorter than the poll timeout, so a poll answered late still
    // "succeeds" — before this fix the old depth was served with last_poll_ok 1 all along. Now a
    // poll in flight for longer than the interval (0.5 s) withdraws the data while it waits.
    let port = redis.port;
    let sleeper = std::thread::spawn(move || {
        let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap().get_connection().unwrap();
        let _: () = redis::cmd("DEBUG").arg("SLEEP").arg(1.8).query(&mut c).unwrap();
    });
    // While Redis is still asleep the old value must no longer be served as fresh.
    wait_for("stale data withdrawn during the stall", Duration::from_secs(20), || {
        let body = exporter.metrics();
        let stale = metric_value(&body, "celery_queue_exporter_last_poll_ok", "") == 0.0
            && !body.lines().any(|l| l.starts_with("celery_queue_depth{"));
        assert!(stale || !sleeper.is_finished(), "Redis woke up before the exporter marked its data stale");
        stale.then_some(())
    });
    sleeper.join().unwrap();
    exporter.wait_value("celery_queue_exporter_last_poll_ok", "", Some(1.0));
    exporter.wait_value("celery_queue_depth", "queue=\"celery\"", Some(1.0));
}

#[test]
fn no_password_in_logs_metrics_or_errors_for_a_unix_socket_url() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("redis.sock");
    let _server = common::Proc::spawn(Command::new("redis-server").args([
        "--port",
        "0",
        "--unixsocket",
        sock.to_str().unwrap(),
        "--unixsocketperm",
        "700",
        "--requirepass",
        "s3cret",
        "--save",
        "",
        "--dir",
        dir.path().to_str().unwrap(),
    ]));
    let url = |db: u8, key: &str| format!("redis+unix://{}?{key}=s3cret&db={db}", sock.display());
    wait_for("redis on its unix socket", Duration::from_secs(10), || {
        let mut c = redis::Client::open(url(0, "pass")).ok()?.get_connection().ok()?;
        redis::cmd("PING").query::<String>(&mut c).ok()
    });

    let worker = Worker::spawn_urls(&url(0, "pass"), &url(1, "password"), free_port(), &[]);
    worker.wait_ready(Duration::from_secs(20));
    let exporter = Exporter::start(&url(0, "password"), "celery", &[]);
    exporter.wait_value("celery_queue_exporter_last_poll_ok", "", Some(1.0));
    let started = worker.log_events().into_iter().find(|e| e["message"] == "worker started").expect("started line");
    assert!(started["broker"].as_str().unwrap().ends_with("?pass=***&db=0"), "{started}");
    assert!(exporter.log_text().contains("password=***"), "{}", exporter.log_text());
    let out = Command::new(BIN)
        .args(["loadgen", "burst", "--n", "1"])
        .env("BROKER_URL", format!("redis+unix://{}?pass=s3cret&db=zz", sock.display()))
        .output()
        .unwrap();
    let loadgen_err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && loadgen_err.contains("BROKER_URL=redis+unix://"), "{loadgen_err}");
    for (what, text) in [
        ("worker log", worker.log_text()),
        ("worker metrics", worker.http_get("/metrics").unwrap().1),
        ("exporter log", exporter.log_text()),
        ("exporter metrics", exporter.metrics()),
        ("loadgen error", loadgen_err),
    ] {
        assert!(!text.contains("s3cret"), "password in the {what}:\n{text}");
    }
}
