//! The `celery-autoscale` command line: parse arguments, call into the library.

use celery_autoscale::autoscale::{exporter, local, simulate};
use celery_autoscale::runtime::args;
use celery_autoscale::runtime::telemetry::{self, LogFormat};
use celery_autoscale::task::Registry;
use celery_autoscale::tools::loadgen;
use celery_autoscale::worker;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "celery-autoscale",
    version,
    about = "Celery workers that scale on queue depth: worker, exporter, load generator, local autoscaler and HPA simulator"
)]
struct Cli {
    /// Log format: text for terminals, json for Kubernetes.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume Celery tasks from Redis, run them, store results, serve /metrics.
    Worker(worker::WorkerArgs),
    /// Poll queue depth (all priority lists) and reserved messages; serve them on /metrics.
    Exporter(exporter::ExporterArgs),
    /// Enqueue tasks as Python's send_task would: burst, ramp or oscillate.
    Loadgen(loadgen::LoadgenArgs),
    /// The whole system on one machine: Redis, exporter, and workers scaled by the HPA algorithm.
    Local(local::LocalArgs),
    /// Replay a metric trace (open loop) or a workload model (closed loop) through the HPA algorithm.
    Simulate(simulate::SimulateArgs),
}

fn main() {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    // The worker's own work is waiting on Redis: one thread does it with no cross-thread
    // wake-ups (a third of its CPU per task on a multi-thread runtime, docs/Performance.md);
    // task bodies registered as blocking run on tokio's blocking pool, in parallel.
    let runtime = match cli.command {
        Command::Worker(_) => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        _ => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
    }
    .expect("tokio runtime");
    let result: anyhow::Result<()> = runtime.block_on(async {
        match cli.command {
            Command::Worker(args) => worker::run(args, Registry::with_builtins()).await?,
            Command::Exporter(args) => exporter::run(args).await?,
            Command::Loadgen(args) => {
                if !loadgen::run(args).await? {
                    anyhow::bail!("not every task succeeded");
                }
            }
            Command::Local(args) => local::run(args).await?,
            Command::Simulate(args) => simulate::run(&args)?,
        }
        Ok(())
    });
    // Do not wait for task threads the worker has already put back and abandoned.
    runtime.shutdown_background();
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("error: {}", one_sentence(&e));
            std::process::exit(exit_code(&e));
        }
    }
}

/// The error and its causes, each said once. The crate's own errors put their cause in their
/// sentence and do not chain it; this also keeps third-party errors whose `source()` repeats
/// their own text (redis, io) from being printed twice.
fn one_sentence(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

/// 2 for a command line that cannot work (as clap's own usage errors), 1 for what went wrong
/// while running.
fn exit_code(e: &anyhow::Error) -> i32 {
    let usage = matches!(e.downcast_ref(), Some(loadgen::LoadgenError::Config(_)))
        || e.downcast_ref::<simulate::WorkloadError>().is_some()
        || matches!(e.downcast_ref(), Some(args::StartError::NoQueues | args::StartError::Config(_)));
    if usage { 2 } else { 1 }
}
