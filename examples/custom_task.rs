//! Your own tasks next to the built-ins: `tasks.word_count(text: str) -> int`, the number of
//! whitespace-separated words; `tasks.count_to(n: int) -> int`, which reports its progress; and
//! `tasks.fetch(fail_times: int) -> int`, retried with exponential backoff on `ConnectionError`.
//! Same flags and environment (BROKER_URL, BACKEND_URL, ...) as `celery-autoscale worker`:
//!
//!     cargo run --release --example custom_task -- --concurrency 2
//!
//! From Python: `app.send_task("tasks.word_count", args=["to be or not"]).get()` → 4.
use celery_autoscale::runtime::telemetry::{self, LogFormat};
use celery_autoscale::task::{Registry, TaskError, TaskOptions};
use celery_autoscale::worker::{self, WorkerArgs};
use clap::Parser;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Parser)]
struct Cli {
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(flatten)]
    worker: WorkerArgs,
}

// One thread for the worker's waiting on Redis, as `celery-autoscale worker` runs; blocking
// bodies (add_blocking) run on tokio's blocking pool, so `--concurrency` of them run at once.
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let registry = Registry::with_builtins()
        .add_blocking("tasks.word_count", ["text"], |(text,): (String,), _ctx| {
            Ok::<_, TaskError>(text.split_whitespace().count())
        })
        // While it runs, Python's `AsyncResult(id).state` is "PROGRESS" and `.info` is
        // {"current": i, "total": n}; then the result, n.
        .add_blocking("tasks.count_to", ["n"], |(n,): (u64,), ctx| {
            for i in 0..n {
                ctx.update_state("PROGRESS", BTreeMap::from([("current", i), ("total", n)]))?;
                std::thread::sleep(Duration::from_millis(250));
            }
            Ok::<_, TaskError>(n)
        })
        // A ConnectionError is retried after min(60, 1·2^retries) seconds, each drawn from
        // [0, that] (Celery's full jitter), at most 4 times; then it is the task's failure.
        .add_async(
            TaskOptions::new("tasks.fetch")
                .autoretry_for(["ConnectionError"])
                .retry_backoff(1)
                .retry_backoff_max(Duration::from_secs(60))
                .max_retries(Some(4)),
            ["fail_times"],
            |(fail_times,): (u64,), ctx| async move {
                if u64::from(ctx.retries) < fail_times {
                    return Err(TaskError::new("builtins", "ConnectionError", "upstream unavailable"));
                }
                Ok::<_, TaskError>(ctx.retries)
            },
        );
    if let Err(e) = worker::run(cli.worker, registry).await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
