//! Task results as Celery's Redis backend stores them (celery-wire.md §2):
//! `{"status", "result", "traceback", "children", "date_done", ["group_id"], ["parent_id"],
//! [extended fields], "task_id"}` written with Python's `json.dumps` defaults.

use super::pyjson;
use super::time::python_isoformat;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

/// The states this worker writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskState {
    Success,
    Failure,
    Retry,
    Revoked,
    /// Stored when a task starts, with `--track-started` (Celery's `task_track_started`).
    Started,
    /// A state the task names itself (`update_state(state="PROGRESS", ...)`).
    Custom(String),
}

impl TaskState {
    pub fn as_str(&self) -> &str {
        match self {
            TaskState::Custom(s) => s,
            TaskState::Success => "SUCCESS",
            TaskState::Failure => "FAILURE",
            TaskState::Retry => "RETRY",
            TaskState::Revoked => "REVOKED",
            TaskState::Started => "STARTED",
        }
    }
}

/// An exception as the result backend serialises it. A Python client re-raises it: a
/// `builtins` type becomes the real class, other modules a synthesised one.
#[derive(Clone, Debug, PartialEq)]
pub struct ExceptionInfo {
    pub exc_type: String,
    pub exc_module: String,
    /// The exception's `args`.
    pub exc_message: Vec<Value>,
    /// Whether the task raised it (a traceback is stored) or the worker decided it outside the
    /// task (unknown task, hard time limit: Python stores `traceback: null`).
    pub raised_by_task: bool,
}

impl ExceptionInfo {
    pub fn new(exc_module: &str, exc_type: &str, exc_message: Vec<Value>) -> Self {
        ExceptionInfo { exc_type: exc_type.into(), exc_module: exc_module.into(), exc_message, raised_by_task: true }
    }

    fn decided_by_worker(mut self) -> Self {
        self.raised_by_task = false;
        self
    }

    /// A Python builtin exception with one message argument (`TypeError("...")`).
    pub fn builtin(exc_type: &str, message: impl Into<String>) -> Self {
        Self::new("builtins", exc_type, vec![Value::String(message.into())])
    }

    /// What a Python worker stores for a task name it does not know (fixture r32).
    pub fn not_registered(task: &str) -> Self {
        Self::new("celery.exceptions", "NotRegistered", vec![Value::String(task.into())]).decided_by_worker()
    }

    /// Hard time limit (fixture r31: `exc_message` is `[time_limit]`).
    pub fn time_limit_exceeded(limit: &serde_json::Number) -> Self {
        Self::new("billiard.exceptions", "TimeLimitExceeded", vec![Value::Number(limit.clone())]).decided_by_worker()
    }

    /// Soft time limit reached inside a task that does not catch it.
    pub fn soft_time_limit_exceeded() -> Self {
        Self::new("billiard.exceptions", "SoftTimeLimitExceeded", vec![Value::String("SoftTimeLimitExceeded()".into())])
    }

    /// REVOKED for an `expires` in the past (fixture r30).
    pub fn revoked_expired() -> Self {
        Self::new("celery.exceptions", "TaskRevokedError", vec![Value::String("expired".into())]).decided_by_worker()
    }

    /// REVOKED by remote control (`reason` "revoked", or "terminated" for a stopped task).
    pub fn revoked(reason: &str) -> Self {
        Self::new("celery.exceptions", "TaskRevokedError", vec![Value::String(reason.into())]).decided_by_worker()
    }

    pub fn to_value(&self) -> Value {
        json!({"exc_type": self.exc_type, "exc_message": self.exc_message, "exc_module": self.exc_module})
    }

    /// The last line of a Python traceback, e.g. `ValueError: bad thing`.
    pub fn summary(&self) -> String {
        let msg: Vec<String> = self
            .exc_message
            .iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        format!("{}: {}", self.exc_type, msg.join(", "))
    }

    /// A traceback string for the `traceback` field (there is no Python stack to show).
    pub fn traceback(&self, task: &str) -> String {
        format!("Traceback (most recent call last):\n  Rust task {task:?} in celery-autoscale\n{}\n", self.summary())
    }
}

/// Optional `result_extended` fields.
#[derive(Clone, Debug, PartialEq)]
pub struct Extended {
    pub name: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub worker: String,
    pub retries: u32,
    pub queue: String,
}

/// One result document.
#[derive(Clone, Debug, PartialEq)]
pub struct ResultMeta {
    pub task_id: String,
    pub status: TaskState,
    pub result: Value,
    pub traceback: Option<String>,
    pub date_done: Option<DateTime<Utc>>,
    pub group_id: Option<String>,
    pub parent_id: Option<String>,
    pub extended: Option<Extended>,
}

impl ResultMeta {
    pub fn success(task_id: &str, value: Value, now: DateTime<Utc>) -> Self {
        Self::base(task_id, TaskState::Success, value, None, Some(now))
    }

    pub fn failure(task_id: &str, task: &str, exc: &ExceptionInfo, now: DateTime<Utc>) -> Self {
        let traceback = exc.raised_by_task.then(|| exc.traceback(task));
        Self::base(task_id, TaskState::Failure, exc.to_value(), traceback, Some(now))
    }

    pub fn revoked(task_id: &str, exc: &ExceptionInfo, now: DateTime<Utc>) -> Self {
        Self::base(task_id, TaskState::Revoked, exc.to_value(), None, Some(now))
    }

    /// STARTED: `{"pid", "hostname"}` of the worker as the result and no `date_done`, as
    /// Celery's `task_track_started` stores it.
    pub fn started(task_id: &str, pid: u32, hostname: &str) -> Self {
        Self::base(task_id, TaskState::Started, json!({"pid": pid, "hostname": hostname}), None, None)
    }

    /// RETRY has no `date_done` (fixture r07).
    /// A state the task stored itself (Celery's `update_state`): `meta` as the result, no
    /// `date_done`.
    pub fn custom(task_id: &str, state: &str, meta: Value) -> Self {
        Self::base(task_id, TaskState::Custom(state.to_owned()), meta, None, None)
    }

    pub fn retry(task_id: &str, task: &str, exc: &ExceptionInfo) -> Self {
        Self::base(task_id, TaskState::Retry, exc.to_value(), Some(exc.traceback(task)), None)
    }

    fn base(
        task_id: &str,
        status: TaskState,
        result: Value,
        traceback: Option<String>,
        date_done: Option<DateTime<Utc>>,
    ) -> Self {
        ResultMeta {
            task_id: task_id.into(),
            status,
            result,
            traceback,
            date_done,
            group_id: None,
            parent_id: None,
            extended: None,
        }
    }

    /// Serialised in Celery's key order and Python's JSON formatting.
    pub fn to_json(&self) -> Vec<u8> {
        let mut m = Map::new();
        m.insert("status".into(), self.status.as_str().into());
        m.insert("result".into(), self.result.clone());
        m.insert("traceback".into(), self.traceback.clone().map_or(Value::Null, Value::String));
        // A retry is its own child (the re-sent message keeps the id), as Python records it.
        let children = if self.status == TaskState::Retry { json!([[[self.task_id, null], null]]) } else { json!([]) };
        m.insert("children".into(), children);
        m.insert("date_done".into(), self.date_done.map_or(Value::Null, |d| Value::String(python_isoformat(d))));
        if let Some(g) = &self.group_id {
            m.insert("group_id".into(), g.clone().into());
        }
        if let Some(p) = &self.parent_id {
            m.insert("parent_id".into(), p.clone().into());
        }
        if let Some(x) = &self.extended {
            m.insert("name".into(), x.name.clone().into());
            m.insert("args".into(), Value::Array(x.args.clone()));
            m.insert("kwargs".into(), Value::Object(x.kwargs.clone()));
            m.insert("worker".into(), x.worker.clone().into());
            m.insert("retries".into(), x.retries.into());
            m.insert("queue".into(), x.queue.clone().into());
        }
        m.insert("task_id".into(), self.task_id.clone().into());
        pyjson::to_vec(&Value::Object(m))
    }
}
