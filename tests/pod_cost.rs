//! `worker --pod-deletion-cost` when the Kubernetes API cannot be reached: each failed write is
//! counted, the failure is logged once (not once a second), no credential reaches the log, and the
//! worker keeps serving tasks. The writes themselves, to a real API server with a real ReplicaSet
//! controller choosing victims by them, are the control-plane test's `scale-in` scenario
//! (scripts/control-plane/run.py): no Kubernetes API server runs inside `cargo test`.

mod common;

use common::{BIN, Redis, Worker, free_port, wait_for};
use std::process::Command;
use std::time::Duration;

#[test]
fn an_unreachable_api_is_counted_logged_once_and_the_worker_keeps_serving() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let token = "tok-0123456789-must-never-be-logged";
    let kubeconfig = dir.path().join("kubeconfig");
    // An API server address where nothing listens.
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\n\
             clusters: [{{name: c, cluster: {{server: 'https://127.0.0.1:{}', insecure-skip-tls-verify: true}}}}]\n\
             users: [{{name: u, user: {{token: {token}}}}}]\n\
             contexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n",
            free_port()
        ),
    )
    .unwrap();
    let env = [
        ("KUBECONFIG", kubeconfig.to_str().unwrap()),
        ("POD_NAME", "worker-abc"),
        ("POD_NAMESPACE", "celery-autoscale"),
    ];
    let worker = Worker::spawn_with_env(&redis, free_port(), &["--pod-deletion-cost", "--without-mingle"], &env);
    worker.wait_ready(Duration::from_secs(20));
    wait_for("three failed writes counted", Duration::from_secs(15), || {
        (worker.metric("celery_worker_pod_deletion_cost_writes_total", r#"outcome="error""#) >= 3.0).then_some(())
    });
    assert_eq!(worker.metric("celery_worker_pod_deletion_cost", ""), -1.0, "nothing was written");
    assert_eq!(worker.metric("celery_worker_pod_deletion_cost_writes_total", r#"outcome="ok""#), 0.0);

    // Tasks still run.
    let out = Command::new(BIN)
        .args(["loadgen", "burst", "--n", "3", "--task", "io", "--io-seconds", "0", "--wait", "--wait-timeout", "30"])
        .env("BROKER_URL", redis.url(0))
        .env("BACKEND_URL", redis.url(1))
        .output()
        .unwrap();
    assert!(out.status.success(), "loadgen: {}", String::from_utf8_lossy(&out.stderr));

    let log = worker.log_text();
    let warnings = log.lines().filter(|l| l.contains("cannot write the pod deletion cost")).count();
    assert_eq!(warnings, 1, "one warning for one kind of failure:\n{log}");
    assert!(log.contains("worker-abc"), "the warning names the pod:\n{log}");
    assert!(!log.contains(token), "the token reached the log");
}
