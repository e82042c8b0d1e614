//! Your own task next to the built-ins: `tasks.word_count(text: str) -> int`, the number of
//! whitespace-separated words. Same flags and environment (BROKER_URL, BACKEND_URL, ...) as
//! `celery-autoscale worker`:
//!
//!     cargo run --release --example custom_task -- --concurrency 2
//!
//! From Python: `app.send_task("tasks.word_count", args=["to be or not"]).get()` → 4.
use celery_autoscale::runtime::telemetry::{self, LogFormat};
use celery_autoscale::task::{Registry, TaskError};
use celery_autoscale::worker::{self, WorkerArgs};
use clap::Parser;

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
    let registry = Registry::with_builtins().add_blocking("tasks.word_count", ["text"], |(text,): (String,), _ctx| {
        Ok::<_, TaskError>(text.split_whitespace().count())
    });
    if let Err(e) = worker::run(cli.worker, registry).await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
