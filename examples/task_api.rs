//! The worker of `tests/task_api.rs`: one task per part of the task API (the request context,
//! soft and hard time limits, reject/ignore, declarative and hand-made retries, hooks), run as
//! a real worker for real Python Celery to call. Same flags as `celery-autoscale worker`.
use celery_autoscale::task::{Call, Context, Param, Registry, Request, Task, TaskError, TaskOptions};
use celery_autoscale::wire::ExceptionInfo;
use celery_autoscale::worker::{self, WorkerArgs};
use clap::Parser;
use serde_json::{Map, Value, json};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    worker: WorkerArgs,
}

/// What the hooks of `api.hooked` saw, in order.
static HOOK_LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn log(entry: String) {
    HOOK_LOG.lock().unwrap_or_else(|e| e.into_inner()).push(entry);
}

/// A task with every hook: `api.hooked(mode)` succeeds (`"ok"`), fails (`"fail"`) or asks for
/// a retry once (`"retry"`).
struct Hooked {
    options: TaskOptions,
}

impl Task for Hooked {
    fn options(&self) -> &TaskOptions {
        &self.options
    }

    fn bind(&self, args: &[Value], _kwargs: &Map<String, Value>) -> Result<Call, String> {
        let mode = args.first().and_then(Value::as_str).unwrap_or("ok").to_owned();
        Ok(Call::future(move |ctx: Context| async move {
            match mode.as_str() {
                "fail" => Err(TaskError::value_error("failed on purpose")),
                "retry" if ctx.retries == 0 => {
                    Err(ctx.retry(TaskError::runtime_error("once more"), Some(Duration::ZERO)))
                }
                _ => Ok(json!(mode)),
            }
        }))
    }

    fn on_success(&self, retval: &Value, request: &Request) {
        log(format!("on_success {} {retval}", request.id));
    }

    fn on_failure(&self, exc: &ExceptionInfo, request: &Request) {
        log(format!("on_failure {} {}", request.id, exc.exc_type));
    }

    fn on_retry(&self, exc: &ExceptionInfo, request: &Request) {
        log(format!("on_retry {} {}", request.id, exc.exc_type));
    }

    fn after_return(&self, state: &str, _retval: &Value, request: &Request) {
        log(format!("after_return {} {state}", request.id));
    }
}

/// Celery's `self.request`, as JSON.
fn request_json(r: &Request) -> Value {
    json!({
        "id": r.id, "task": r.task, "args": r.args, "kwargs": r.kwargs,
        "delivery_info": {
            "exchange": r.delivery_info.exchange, "routing_key": r.delivery_info.routing_key,
            "priority": r.delivery_info.priority, "redelivered": r.delivery_info.redelivered,
        },
        "hostname": r.hostname, "root_id": r.root_id, "parent_id": r.parent_id,
        "group": r.group, "group_index": r.group_index,
        "eta": r.eta.map(|t| t.to_rfc3339()), "expires": r.expires.map(|t| t.to_rfc3339()),
        "headers": r.headers, "retries": r.retries, "is_eager": r.is_eager,
        "correlation_id": r.correlation_id, "reply_to": r.reply_to,
        "timelimit": [r.timelimit.0, r.timelimit.1], "origin": r.origin,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    celery_autoscale::runtime::telemetry::init(celery_autoscale::runtime::telemetry::LogFormat::Text);
    let soft_then_hard = |name: &str, hard_s: u64| {
        TaskOptions::new(name).soft_time_limit(Duration::from_millis(500)).time_limit(Duration::from_secs(hard_s))
    };
    let registry = Registry::new()
        .add_async("api.context", [Param::optional("x", Value::Null)], |(_,): (Value,), ctx| async move {
            Ok::<_, TaskError>(request_json(ctx.request()))
        })
        // Retried once at once with new arguments: the second run shows what the retry carried.
        .add_async("api.retry_context", ["n"], |(n,): (i64,), ctx| async move {
            if ctx.retries == 0 {
                return Err(ctx
                    .retry_with(TaskError::runtime_error("again"))
                    .countdown(Duration::ZERO)
                    .args(vec![json!(n + 1)])
                    .into());
            }
            Ok::<_, TaskError>(request_json(ctx.request()))
        })
        // Waits for its soft limit, then cleans up within the grace before the hard limit.
        .add_async(soft_then_hard("api.soft_cleanup", 10), [] as [&str; 0], |(): (), ctx| async move {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(60)) => Ok::<_, TaskError>(json!({"cleaned_up": false})),
                () = ctx.soft_limit() => {
                    ctx.update_state("CLEANING", json!({"left_s": ctx.time_left().map(|d| d.as_secs_f64())}))?;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok(json!({"cleaned_up": true, "grace_s": ctx.time_left().map(|d| d.as_secs_f64())}))
                }
            }
        })
        // A blocking body polls its soft limit and reports SoftTimeLimitExceeded after cleaning up.
        .add_blocking(soft_then_hard("api.soft_poll", 10), [] as [&str; 0], |(): (), ctx| {
            while !ctx.soft_limit_reached() {
                std::thread::sleep(Duration::from_millis(10));
            }
            ctx.update_state("CLEANED", json!({"cleaned_up": true}))?;
            Err::<(), _>(TaskError::soft_time_limit_exceeded())
        })
        // Ignores every limit: spins a core for `seconds`.
        .add_blocking(
            TaskOptions::new("api.stuck").time_limit(Duration::from_secs(1)),
            ["seconds"],
            |(s,): (f64,), _ctx| {
                let start = Instant::now();
                let mut spins = 0u64;
                while start.elapsed() < Duration::from_secs_f64(s) {
                    spins = std::hint::black_box(spins.wrapping_add(1));
                }
                Ok::<_, TaskError>(spins)
            },
        )
        .add_async("api.reject", [] as [&str; 0], |(): (), ctx| async move {
            if !ctx.request().delivery_info.redelivered {
                return Err(TaskError::reject("not yet", true));
            }
            Ok::<_, TaskError>("ran after its requeue")
        })
        .add_async("api.reject_drop", [] as [&str; 0], |(): (), _ctx| async move {
            Err::<(), _>(TaskError::reject("never", false))
        })
        .add_async("api.ignore", [] as [&str; 0], |(): (), _ctx| async move { Err::<(), _>(TaskError::Ignore) })
        // Exact backoff (no jitter): 1, 2, 4 s.
        .add_async(
            TaskOptions::new("api.backoff_exact")
                .autoretry_for(["myapp.errors.Busy"])
                .retry_backoff(1)
                .retry_jitter(false)
                .max_retries(Some(3)),
            ["fail_times"],
            |(fail_times,): (u64,), ctx| async move {
                if u64::from(ctx.retries) < fail_times {
                    return Err(TaskError::new("myapp.errors", "Busy", "busy"));
                }
                Ok::<_, TaskError>(ctx.retries)
            },
        )
        .add_task(Hooked { options: TaskOptions::new("api.hooked") })
        .add_async("api.hook_log", [] as [&str; 0], |(): (), _ctx| async move {
            Ok::<_, TaskError>(HOOK_LOG.lock().unwrap_or_else(|e| e.into_inner()).clone())
        });
    if let Err(e) = worker::run(cli.worker, registry).await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
