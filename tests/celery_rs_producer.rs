//! A producer written with celery-rs (the `celery` crate) → our worker → results.
//!
//! celery-rs writes messages a Python worker loses (no `delivery_info`: kombu raises
//! `KeyError('exchange')` after the BRPOP and the message is gone, as observed when these
//! fixtures were captured; docs/celery-wire.md §4). Our worker runs them:
//! a Rust service that already produces with celery-rs can use it unchanged.

// celery-rs 0.5.5's #[celery::task] expands to impl blocks inside a const item.
#![allow(non_local_definitions)]

mod common;

use celery::prelude::*;
use common::{Redis, Worker, wait_all};

// Producer-side declarations: names and parameters as the worker registers them. The bodies
// never run here (the worker does the work).
#[celery::task(name = "tasks.cpu_bound")]
fn cpu_bound(n: i64) -> TaskResult<i64> {
    Ok(n)
}

#[celery::task(name = "tasks.io_bound")]
fn io_bound(seconds: f64) -> TaskResult<f64> {
    Ok(seconds)
}

#[tokio::test(flavor = "multi_thread")]
async fn celery_rs_messages_run_on_our_worker() {
    let redis = Redis::start();
    let _worker = Worker::start(&redis, &["--concurrency", "4"]);
    let app = celery::app!(
        broker = RedisBroker { redis.url(0) },
        tasks = [cpu_bound, io_bound],
        task_routes = ["*" => "celery"],
    )
    .await
    .expect("celery-rs app");
    let mut ids = Vec::new();
    ids.push(app.send_task(cpu_bound::new(1000)).await.unwrap().task_id);
    ids.push(app.send_task(io_bound::new(0.2)).await.unwrap().task_id);
    // A countdown: celery-rs writes the ETA with nine fractional digits.
    ids.push(app.send_task(cpu_bound::new(100).with_countdown(1)).await.unwrap().task_id);
    app.close().await.unwrap();

    let ids2 = ids.clone();
    tokio::task::spawn_blocking(move || {
        wait_all(&redis, &ids2, "SUCCESS", std::time::Duration::from_secs(30));
        let values: Vec<serde_json::Value> =
            ids2.iter().map(|id| redis.result(id).unwrap()["result"].clone()).collect();
        assert_eq!(values, [serde_json::json!(168), serde_json::json!(0.2), serde_json::json!(25)]);
        assert_eq!(redis.unacked(), 0);
    })
    .await
    .unwrap();
}
