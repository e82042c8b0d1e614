//! A delivery that panics after its message is held (outside the task body, whose panics are
//! the task's own `RuntimeError`) does not strand the message: it goes back to the front of its
//! queue and runs again; a message whose delivery panics a second time is failed with a
//! `RuntimeError` and acknowledged, so it cannot loop. The worker keeps serving throughout.
//!
//! The worker runs in this process (its registry holds a task whose `options()` panics on
//! demand, which a delivery only calls once the message is held); Redis is real.

mod common;

use celery_autoscale::runtime::shutdown::{Shutdown, Stage};
use celery_autoscale::task::{Call, Registry, Task, TaskError, TaskOptions};
use celery_autoscale::worker::{self, WorkerArgs};
use clap::Parser;
use common::{Redis, enqueue, http_get, metric_value, task, wait_all, wait_for};
use serde_json::{Map, Value, json};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    worker: WorkerArgs,
}

/// `t.panicky(mode)`: with "once", the first delivery panics (later ones succeed); with
/// "always", every delivery panics. The panic comes from `options()`, which the worker reads
/// for the time limit just before running the task.
struct Panicky {
    options: TaskOptions,
    /// Panics owed by the next `options()` calls (the worker runs one message at a time here).
    armed: AtomicU32,
    once_fired: AtomicBool,
}

impl Task for Panicky {
    fn options(&self) -> &TaskOptions {
        if self.armed.load(Ordering::SeqCst) > 0 {
            self.armed.fetch_sub(1, Ordering::SeqCst);
            panic!("options() exploded");
        }
        &self.options
    }

    fn bind(&self, args: &[Value], _kwargs: &Map<String, Value>) -> Result<Call, String> {
        let mode = args.first().and_then(Value::as_str).unwrap_or_default().to_owned();
        if mode == "always" || (mode == "once" && !self.once_fired.swap(true, Ordering::SeqCst)) {
            self.armed.fetch_add(1, Ordering::SeqCst);
        }
        Ok(Call::future(move |_| async move { Ok(json!(mode)) }))
    }
}

#[test]
fn a_panicking_delivery_puts_its_message_back_and_the_worker_keeps_serving() {
    let redis = Redis::start();
    let port = common::free_port();
    let registry = Registry::new()
        .add_task(Panicky {
            options: TaskOptions::new("t.panicky"),
            armed: AtomicU32::new(0),
            once_fired: AtomicBool::new(false),
        })
        .add_async(TaskOptions::new("t.ok"), ["x"], |(x,): (Value,), _| async move { Ok::<_, TaskError>(x) });
    let metrics_addr = format!("127.0.0.1:{port}");
    let (broker, backend) = (redis.url(0), redis.url(1));
    // One task at a time, so the panics land on the message that armed them.
    let args = Cli::parse_from([
        "worker",
        "--broker-url",
        &broker,
        "--backend-url",
        &backend,
        "--metrics-addr",
        &metrics_addr,
        "--concurrency",
        "1",
    ])
    .worker;
    let shutdown = Shutdown::default();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let running = rt.spawn(worker::run_with_shutdown(args, registry, shutdown.clone()));
    wait_for("the worker to be ready", Duration::from_secs(20), || {
        http_get(port, "/readyz").filter(|(code, _)| *code == 200)
    });

    let once = enqueue(&redis, &[task("t.panicky", vec![json!("once")])]);
    let always = enqueue(&redis, &[task("t.panicky", vec![json!("always")])]);
    let others = enqueue(&redis, &(0..5).map(|i| task("t.ok", vec![json!(i)])).collect::<Vec<_>>());

    wait_all(&redis, &once, "SUCCESS", Duration::from_secs(10));
    wait_all(&redis, &always, "FAILURE", Duration::from_secs(10));
    wait_all(&redis, &others, "SUCCESS", Duration::from_secs(10));
    let failure = redis.result(&always[0]).unwrap();
    assert_eq!(failure["result"]["exc_type"], "RuntimeError", "{failure}");
    assert!(failure["result"]["exc_message"].to_string().contains("options() exploded"), "{failure}");
    assert_eq!(redis.result(&once[0]).unwrap()["result"], "once");

    // Nothing stranded: no message left in `unacked` (none would be restored before an hour).
    wait_for("unacked to empty", Duration::from_secs(5), || (redis.unacked() == 0).then_some(()));
    let (_, metrics) = http_get(port, "/metrics").expect("metrics");
    assert_eq!(metric_value(&metrics, "celery_worker_delivery_panics_total", ""), 3.0, "once + always twice");
    assert_eq!(metric_value(&metrics, "celery_worker_active_tasks", ""), 0.0, "{metrics}");

    // Still serving.
    let later = enqueue(&redis, &[task("t.ok", vec![json!("later")])]);
    wait_all(&redis, &later, "SUCCESS", Duration::from_secs(10));
    assert_eq!(http_get(port, "/readyz").map(|(code, _)| code), Some(200));

    shutdown.advance(Stage::Graceful);
    let stopped = rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), running).await });
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "the worker stops cleanly");
}
