//! Celery's built-in canvas tasks (`celery/app/builtins.py`), over the tasks of a registry:
//! `celery.map` and `celery.starmap` (what `task.map(it)`, `task.starmap(it)` and
//! `task.chunks(it, n)` send) call the named task once per item, in this process and in order,
//! as Celery's do (`[task(item) for item in it]`; a task that asks for a retry there raises its
//! exception, as a task called directly does); `celery.accumulate` returns its arguments (or
//! the one at `index`); `celery.backend_cleanup` does nothing, as on the Redis backend, whose
//! results expire by themselves. A mapped task that is not registered here fails the call with
//! `NotRegistered('<name>')`, as in Python.
//!
//! Not here: `celery.chunks` (Celery's publishes a group of `celery.starmap` tasks from inside
//! the worker; `task.chunks(...).group()` and `.apply_async()` send that group from the client
//! and work), and the chord/group/chain/unlock tasks, which a Celery 5 client on the Redis
//! backend does not send.

use super::args::{self, Param, type_name};
use super::{Call, Context, Registry, Task, TaskError, TaskOptions, TaskResult};
use serde_json::{Map, Value};
use std::sync::Arc;

pub const MAP: &str = "celery.map";
pub const STARMAP: &str = "celery.starmap";
pub const ACCUMULATE: &str = "celery.accumulate";
pub const BACKEND_CLEANUP: &str = "celery.backend_cleanup";

/// Add the canvas tasks over `registry`'s tasks (a task the registry already names is kept).
pub fn register(registry: Registry) -> Registry {
    let tasks = registry.clone();
    let mut out = registry;
    if out.get(MAP).is_none() {
        out = out.add_task(MapTask { options: TaskOptions::new(MAP), tasks: tasks.clone(), star: false });
    }
    if out.get(STARMAP).is_none() {
        out = out.add_task(MapTask { options: TaskOptions::new(STARMAP), tasks, star: true });
    }
    if out.get(ACCUMULATE).is_none() {
        out = out.add_task(Accumulate { options: TaskOptions::new(ACCUMULATE) });
    }
    if out.get(BACKEND_CLEANUP).is_none() {
        out = out.add_blocking(BACKEND_CLEANUP, [] as [&str; 0], |(): (), _ctx: &Context| Ok::<_, TaskError>(()));
    }
    out
}

/// `xmap(task, it)` / `xstarmap(task, it)`.
struct MapTask {
    options: TaskOptions,
    tasks: Registry,
    star: bool,
}

impl Task for MapTask {
    fn options(&self) -> &TaskOptions {
        &self.options
    }

    fn bind(&self, args: &[Value], kwargs: &Map<String, Value>) -> Result<Call, String> {
        let func = if self.star { "xstarmap" } else { "xmap" };
        let [task, it] = args::bind(func, &[Param::required("task"), Param::required("it")], args, kwargs)?;
        let name = match &task {
            Value::String(name) => Some(name.clone()),
            Value::Object(sig) => sig.get("task").and_then(Value::as_str).map(str::to_owned),
            _ => None,
        };
        let star = self.star;
        // What Python raises inside the task is the task's failure, not a binding error.
        let failing = |e: TaskError| Ok(Call::future(move |_ctx| async move { Err(e) }));
        let Some(name) = name else {
            return failing(TaskError::type_error(format!(
                "{func}() argument 'task' must be a signature, not {}",
                type_name(&task)
            )));
        };
        let Some(mapped) = self.tasks.get(&name).cloned() else {
            return failing(TaskError::new("celery.exceptions", "NotRegistered", name));
        };
        let items = match iterate(&it) {
            Ok(items) => items,
            Err(e) => return failing(e),
        };
        Ok(Call::future(move |ctx| run_each(mapped, items, star, ctx)))
    }
}

/// Python's `for item in it`: a list's items, a string's characters, a dict's keys.
fn iterate(it: &Value) -> Result<Vec<Value>, TaskError> {
    match it {
        Value::Array(items) => Ok(items.clone()),
        Value::String(s) => Ok(s.chars().map(|c| Value::String(c.into())).collect()),
        Value::Object(m) => Ok(m.keys().map(|k| Value::String(k.clone())).collect()),
        other => Err(TaskError::type_error(format!("'{}' object is not iterable", type_name(other)))),
    }
}

/// Call `task` with each item (its arguments, for starmap), in order; the first failure is
/// the call's.
async fn run_each(task: Arc<dyn Task>, items: Vec<Value>, star: bool, ctx: Context) -> TaskResult {
    let mut out = Vec::with_capacity(items.len());
    let none = Map::new();
    for item in items {
        let args = if star {
            iterate(&item).map_err(|_| {
                TaskError::type_error(format!(
                    "{}() argument after * must be an iterable, not {}",
                    task.options().short_name(),
                    type_name(&item)
                ))
            })?
        } else {
            vec![item]
        };
        let call = task.bind(&args, &none).map_err(TaskError::type_error)?;
        // The outer call's time limit covers the whole map: dropping this future stops it.
        let Some(result) = call.run(ctx.clone(), None).await else {
            return Err(TaskError::runtime_error("mapped call ended without a result"));
        };
        match result {
            Ok(v) => out.push(v),
            Err(TaskError::Raise(e)) | Err(TaskError::Retry { exc: e, .. }) | Err(TaskError::Reject { exc: e, .. }) => {
                return Err(TaskError::Raise(e));
            }
            Err(TaskError::Ignore) => return Err(TaskError::Ignore),
        }
    }
    Ok(Value::Array(out))
}

/// `accumulate(self, *args, **kwargs)`: `args[index]` if `index` is given, else `args`.
struct Accumulate {
    options: TaskOptions,
}

impl Task for Accumulate {
    fn options(&self) -> &TaskOptions {
        &self.options
    }

    fn bind(&self, args: &[Value], kwargs: &Map<String, Value>) -> Result<Call, String> {
        let result = match kwargs.get("index") {
            None | Some(Value::Null) => Ok(Value::Array(args.to_vec())),
            Some(Value::Number(n)) if n.is_i64() => {
                let i = n.as_i64().unwrap_or(0);
                let at = if i < 0 { i.checked_add(args.len() as i64) } else { Some(i) };
                at.and_then(|at| usize::try_from(at).ok())
                    .and_then(|at| args.get(at).cloned())
                    .ok_or_else(|| TaskError::new("builtins", "IndexError", "tuple index out of range"))
            }
            Some(other) => Err(TaskError::type_error(format!(
                "tuple indices must be integers or slices, not {}",
                type_name(other)
            ))),
        };
        Ok(Call::future(move |_ctx| async move { result }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    async fn run(registry: &Registry, name: &str, args: Value, kwargs: Value) -> TaskResult {
        let task = registry.get(name).unwrap();
        let call = task.bind(args.as_array().unwrap(), kwargs.as_object().unwrap()).unwrap();
        call.run(Context::new("id", 0, task.options()), None).await.unwrap()
    }

    fn sig(name: &str) -> Value {
        json!({"task": name, "args": [], "kwargs": {}, "options": {}, "subtask_type": null, "immutable": false})
    }

    #[tokio::test]
    async fn map_and_starmap_call_the_task_per_item() {
        let r = register(Registry::with_builtins());
        let map = run(&r, MAP, json!([]), json!({"task": sig("tasks.cpu_bound"), "it": [10, 100]})).await;
        assert_eq!(map, Ok(json!([4, 25])));
        let star = run(&r, STARMAP, json!([sig("tasks.xsum"), [[[1, 2]], [[3]]]]), json!({})).await;
        assert_eq!(star, Ok(json!([3, 3])));
        let missing = run(&r, MAP, json!([sig("tasks.nope"), [1]]), json!({})).await.unwrap_err();
        assert_eq!(
            (missing.exception().exc_type.as_str(), missing.exception().exc_message.clone()),
            ("NotRegistered", vec![json!("tasks.nope")])
        );
        let bad = run(&r, MAP, json!([sig("tasks.cpu_bound"), [1, "x"]]), json!({})).await.unwrap_err();
        assert_eq!(bad.exception().exc_message, vec![json!("cpu_bound() argument 'n' must be int, not str")]);
        let not_iterable = run(&r, STARMAP, json!([sig("tasks.xsum"), [5]]), json!({})).await.unwrap_err();
        assert!(not_iterable.exception().exc_message[0].as_str().unwrap().contains("must be an iterable"));
        let no_it = r.get(MAP).unwrap().bind(&[sig("tasks.xsum")], &Map::new()).err().unwrap();
        assert_eq!(no_it, "xmap() missing 1 required positional argument: 'it'");
    }

    #[tokio::test]
    async fn accumulate_and_backend_cleanup_are_celerys() {
        let r = register(Registry::new());
        assert_eq!(run(&r, ACCUMULATE, json!([1, 2, 3]), json!({})).await, Ok(json!([1, 2, 3])));
        assert_eq!(run(&r, ACCUMULATE, json!([1, 2, 3]), json!({"index": -1})).await, Ok(json!(3)));
        assert!(run(&r, ACCUMULATE, json!([1]), json!({"index": 5})).await.is_err());
        assert_eq!(run(&r, BACKEND_CLEANUP, json!([]), json!({})).await, Ok(Value::Null));
        let kept =
            register(Registry::new().add_blocking(MAP, ["x"], |(x,): (i64,), _: &Context| Ok::<_, TaskError>(x)));
        assert!(kept.get(MAP).unwrap().bind(&[json!(1)], &Map::new()).is_ok(), "a user's own celery.map is kept");
    }
}
