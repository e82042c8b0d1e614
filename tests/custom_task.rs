//! The `custom_task` example — a user's program registering `tasks.word_count` next to the
//! built-ins — run as a real worker on a real Redis, called by real Python Celery.

mod common;

use common::{Redis, Worker, python_client, repo_root};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Build the example (a no-op when `cargo test` already did) and return its path: the
/// `examples/` directory of this test binary's profile (`target/<profile>/deps/..`).
fn example_binary() -> PathBuf {
    let profile_dir = std::env::current_exe().unwrap().parent().and_then(|deps| deps.parent()).unwrap().to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "--quiet", "--example", "custom_task", "--manifest-path"]).arg(repo_root().join("Cargo.toml"));
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
    let status = build.status().expect("run cargo build --example custom_task");
    assert!(status.success(), "cargo build --example custom_task failed: {status}");
    let bin = profile_dir.join("examples").join(format!("custom_task{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.exists(), "example binary not at {}", bin.display());
    bin
}

fn ok(o: &Value) -> &Value {
    assert_eq!(o["ok"], true, "expected success, got {o}");
    &o["value"]
}

fn type_error(o: &Value) -> &str {
    assert_eq!(
        (&o["ok"], &o["exc_module"], &o["exc_type"]),
        (&json!(false), &json!("builtins"), &json!("TypeError")),
        "{o}"
    );
    o["exc_args"][0].as_str().unwrap()
}

#[test]
fn a_users_task_runs_next_to_the_builtins() {
    let bin = example_binary();
    let redis = Redis::start();
    let worker = Worker::spawn_command(Command::new(bin), &redis, common::free_port(), &["--concurrency", "2"]);
    worker.wait_ready(Duration::from_secs(30));
    let (_, metrics) = worker.http_get("/metrics").expect("metrics endpoint");
    for task in ["tasks.word_count", "tasks.cpu_bound", "tasks.io_bound", "tasks.flaky"] {
        let series = format!("celery_task_success_total{{task_name=\"{task}\"}} 0");
        assert!(metrics.contains(&series), "{series} pre-created from the registry:\n{metrics}");
    }

    let out = python_client(
        &redis,
        "run",
        &json!([
            {"task": "tasks.word_count", "args": ["to be or not to be"]},
            {"task": "tasks.word_count", "kwargs": {"text": "  tabs\tand\nnewlines\u{a0}too  "}},
            {"task": "tasks.word_count", "args": [""]},
            {"task": "tasks.word_count", "args": [42]},
            {"task": "tasks.word_count", "args": []},
            {"task": "tasks.word_count", "args": ["a"], "kwargs": {"text": "b"}},
            {"task": "tasks.cpu_bound", "args": [1000]},
            {"task": "tasks.io_bound", "kwargs": {"seconds": 0.1}},
            {"task": "tasks.flaky", "args": [1], "kwargs": {"countdown": 0}},
        ]),
        Duration::from_secs(120),
    );
    let out = out.as_array().expect("a list of outcomes");
    assert_eq!(ok(&out[0]), &json!(6));
    assert_eq!(ok(&out[1]), &json!(4), "Unicode whitespace splits as Python's str.split() does");
    assert_eq!(ok(&out[2]), &json!(0));
    assert_eq!(type_error(&out[3]), "word_count() argument 'text' must be str, not int");
    assert_eq!(type_error(&out[4]), "word_count() missing 1 required positional argument: 'text'");
    assert_eq!(type_error(&out[5]), "word_count() got multiple values for argument 'text'");
    assert_eq!(ok(&out[6]), &json!(168));
    assert_eq!(ok(&out[7]), &json!(0.1));
    assert_eq!(ok(&out[8]), &json!(1), "retried once, then SUCCESS");

    assert_eq!(worker.metric("celery_task_success_total", "tasks.word_count"), 3.0);
    assert_eq!(worker.metric("celery_task_rejected_total", "reason=\"bad_arguments\""), 3.0);
    assert_eq!(redis.unacked(), 0, "everything acknowledged");
}
