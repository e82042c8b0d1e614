//! Celery's built-in canvas tasks (`celery/app/builtins.py`), over the tasks of a registry:
//! `celery.map` and `celery.starmap` (what `task.map(it)`, `task.starmap(it)` and
//! `task.chunks(it, n)` send) call the named task once per item, in this process and in order,
//! as Celery's do (`[task(item) for item in it]`; a task that asks for a retry there raises its
//! exception, as a task called directly does); `celery.accumulate` returns its arguments (or
//! the one at `index`); `celery.backend_cleanup` does nothing, as on the Redis backend, whose
//! results expire by themselves. A mapped task that is not registered here fails the call with
//! `NotRegistered('<name>')`, as in Python.
//!
//! `celery.chunks(task, it, n)` applies, from inside the worker, a group of one
//! `celery.starmap` per `n` items and returns that group's result as Celery stores a
//! `GroupResult` (`[[group_id, null], [[[id, null], null], ...]]`): the ids are chosen when the
//! call is bound and the group is sent by the worker after the run ([`Task::spawned`]). The
//! starmaps are routed by their own name (`celery.starmap`), not the mapped task's as Celery's
//! `route_name` does.
//!
//! Not here: the chord/group/chain/unlock tasks, which a Celery 5 client on the Redis backend
//! does not send.

use super::args::{self, Param, type_name};
use super::{Call, Context, Registry, Task, TaskError, TaskOptions, TaskResult};
use crate::wire::Signature;
use crate::wire::task_write::new_uuid;
use serde_json::{Map, Value, json};
use std::sync::Arc;

pub const MAP: &str = "celery.map";
pub const STARMAP: &str = "celery.starmap";
pub const CHUNKS: &str = "celery.chunks";
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
    if out.get(CHUNKS).is_none() {
        out = out.add_task(Chunks { options: TaskOptions::new(CHUNKS) });
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

/// `chunks(task, it, n)`: a group of `xstarmap(task, part)`, one per `n` items of `it`.
struct Chunks {
    options: TaskOptions,
}

/// The parts of `chunks(task, it, n)` (Celery's `_chunks`: `n` items each, the last what is
/// left), or the error Python raises.
fn chunk_parts(it: &Value, n: &Value) -> Result<Vec<Value>, TaskError> {
    let items = iterate(it)?;
    let n = match n {
        Value::Number(n) if n.is_i64() => n.as_i64().unwrap_or(0),
        other => {
            return Err(TaskError::type_error(format!(
                "'{}' object cannot be interpreted as an integer",
                type_name(other)
            )));
        }
    };
    let size = usize::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
        TaskError::new(
            "builtins",
            "ValueError",
            "Stop argument for islice() must be None or an integer: 0 <= x <= sys.maxsize.",
        )
    })?;
    Ok(items.chunks(size).map(|part| Value::Array(part.to_vec())).collect())
}

fn chunk_params() -> [Param; 3] {
    [Param::required("task"), Param::required("it"), Param::required("n")]
}

impl Task for Chunks {
    fn options(&self) -> &TaskOptions {
        &self.options
    }

    fn bind(&self, args: &[Value], kwargs: &Map<String, Value>) -> Result<Call, String> {
        let [_task, it, n] = args::bind("chunks", &chunk_params(), args, kwargs)?;
        // The ids of the group and of each starmap, as a `GroupResult`'s `as_tuple()`.
        let result = chunk_parts(&it, &n).map(|parts| {
            let members: Vec<Value> = parts.iter().map(|_| json!([[new_uuid(), null], null])).collect();
            json!([[new_uuid(), null], members])
        });
        Ok(Call::future(move |_ctx| async move { result }))
    }

    /// The group the run returned the result of: `celery.starmap(task, part)` under the ids it
    /// chose.
    fn spawned(&self, args: &[Value], kwargs: &Map<String, Value>, retval: &Value) -> Vec<Signature> {
        let Ok([task, it, n]) = args::bind("chunks", &chunk_params(), args, kwargs) else { return Vec::new() };
        let Ok(parts) = chunk_parts(&it, &n) else { return Vec::new() };
        let ids = retval[1].as_array().map(Vec::as_slice).unwrap_or_default();
        let members: Vec<Value> = parts
            .into_iter()
            .zip(ids)
            .map(|(part, id)| {
                json!({"task": STARMAP, "args": [], "kwargs": {"task": task, "it": part},
                       "options": {"task_id": id[0][0]}, "subtask_type": null, "immutable": false})
            })
            .collect();
        let group = json!({"task": "celery.group", "args": [], "kwargs": {"tasks": members},
                           "options": {"task_id": retval[0][0]}, "subtask_type": "group", "immutable": false});
        Signature::from_value(&group, "celery.chunks").map(|g| vec![g]).unwrap_or_default()
    }
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
    async fn chunks_returns_its_group_result_and_spawns_that_group() {
        let r = register(Registry::with_builtins());
        let args = json!([sig("tasks.cpu_bound"), [[10], [100], [1000]], 2]);
        let retval = run(&r, CHUNKS, args.clone(), json!({})).await.unwrap();
        let group = r.get(CHUNKS).unwrap().spawned(args.as_array().unwrap(), &Map::new(), &retval);
        let [group] = group.as_slice() else { panic!("one group: {group:?}") };
        assert_eq!(
            (group.subtask_type.as_deref(), group.option_str("task_id")),
            (Some("group"), retval[0][0].as_str())
        );
        let members = group.members();
        assert_eq!(members.len(), 2);
        assert_eq!(members[1].option_str("task_id"), retval[1][1][0][0].as_str());
        assert_eq!((members[1].task.as_str(), &members[1].kwargs["it"]), (STARMAP, &json!([[1000]])));
        let bad = run(&r, CHUNKS, json!([sig("tasks.cpu_bound"), [1], 0]), json!({})).await.unwrap_err();
        assert_eq!(bad.exception().exc_type, "ValueError");
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
