//! Writing task messages exactly as Python Celery 5.7 sends them (fixtures p01/p31/w01), and
//! the kombu `unacked` entries and restored payloads (§1.4).

use super::envelope::{Signature, TaskMessage};
use super::pyjson;
use super::pyrepr::{args_repr, kwargs_repr};
use super::time::python_isoformat;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, Utc};
use serde_json::{Map, Number, Value, json};

/// A task to publish.
#[derive(Clone, Debug, PartialEq)]
pub struct NewTask {
    pub task: String,
    pub id: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    /// The queue (routing key); messages use the anonymous exchange, as Celery does for
    /// direct routing.
    pub queue: String,
    pub priority: u8,
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    pub group: Option<String>,
    pub eta: Option<DateTime<Utc>>,
    pub expires: Option<DateTime<Utc>>,
    pub retries: u32,
    pub time_limit: (Option<Number>, Option<Number>),
    pub ignore_result: Option<bool>,
    /// Remaining chain (reversed, next task last), carried in `embed.chain`.
    pub chain: Vec<Signature>,
    pub callbacks: Vec<Signature>,
    pub errbacks: Vec<Signature>,
}

impl NewTask {
    /// A plain `send_task(name, args, kwargs)` with a fresh id, to the given queue.
    pub fn new(task: &str, args: Vec<Value>, kwargs: Map<String, Value>, queue: &str) -> Self {
        NewTask {
            task: task.into(),
            id: uuid::Uuid::new_v4().to_string(),
            args,
            kwargs,
            queue: queue.into(),
            priority: 0,
            root_id: None,
            parent_id: None,
            group: None,
            eta: None,
            expires: None,
            retries: 0,
            time_limit: (None, None),
            ignore_result: None,
            chain: Vec::new(),
            callbacks: Vec::new(),
            errbacks: Vec::new(),
        }
    }

    /// The next task of a workflow: a signature applied with `(result,) + sig.args` unless
    /// it is immutable, with `parent_id` = the finished task and the workflow's root, as
    /// Celery's tracer sends links and chain steps.
    pub fn from_signature(sig: &Signature, prepend: Option<Value>, parent: &TaskMessage, fallback_queue: &str) -> Self {
        let mut args = Vec::with_capacity(sig.args.len() + 1);
        if let Some(v) = prepend.filter(|_| !sig.immutable) {
            args.push(v);
        }
        args.extend(sig.args.iter().cloned());
        let mut t =
            NewTask::new(&sig.task, args, sig.kwargs.clone(), sig.option_str("queue").unwrap_or(fallback_queue));
        if let Some(id) = sig.option_str("task_id") {
            t.id = id.into();
        }
        t.priority = sig.options.get("priority").and_then(Value::as_u64).map_or(0, |p| p.min(9) as u8);
        t.root_id = Some(parent.root_id().to_owned());
        t.parent_id = Some(parent.id.clone());
        t.group = sig.option_str("group_id").map(str::to_owned);
        t
    }

    /// Serialise: the envelope bytes to LPUSH and the delivery tag it carries.
    pub fn to_message(&self, origin: &str) -> (Vec<u8>, String) {
        let delivery_tag = uuid::Uuid::new_v4().to_string();
        let sigs = |s: &[Signature]| -> Value {
            if s.is_empty() { Value::Null } else { Value::Array(s.iter().map(signature_value).collect()) }
        };
        let embed = json!({
            "callbacks": sigs(&self.callbacks),
            "errbacks": sigs(&self.errbacks),
            "chain": sigs(&self.chain),
            "chord": null,
        });
        let body = json!([self.args, self.kwargs, embed]);
        let iso = |d: &Option<DateTime<Utc>>| d.map_or(Value::Null, |d| Value::String(python_isoformat(d)));
        let root_id = self.root_id.clone().unwrap_or_else(|| self.id.clone());
        let headers = json!({
            "lang": "py",
            "task": self.task,
            "id": self.id,
            "shadow": null,
            "eta": iso(&self.eta),
            "expires": iso(&self.expires),
            "group": self.group,
            "group_index": null,
            "retries": self.retries,
            "timelimit": [self.time_limit.0, self.time_limit.1],
            "root_id": root_id,
            "parent_id": self.parent_id,
            "argsrepr": args_repr(&self.args),
            "kwargsrepr": kwargs_repr(&self.kwargs),
            "origin": origin,
            "ignore_result": self.ignore_result,
            "replaced_task_nesting": 0,
            "stamped_headers": null,
            "stamps": {},
        });
        let mut properties = Map::new();
        properties.insert("correlation_id".into(), self.id.clone().into());
        properties.insert("reply_to".into(), uuid::Uuid::new_v4().to_string().into());
        properties.insert("delivery_mode".into(), 2.into());
        if let Some(exp) = self.expires {
            // kombu adds the TTL in milliseconds; Redis ignores it, the worker honours `expires`.
            let ms = (exp - Utc::now()).num_milliseconds().max(0);
            properties.insert("expiration".into(), ms.to_string().into());
        }
        properties.insert("delivery_info".into(), json!({"exchange": "", "routing_key": self.queue}));
        properties.insert("priority".into(), self.priority.into());
        properties.insert("body_encoding".into(), "base64".into());
        properties.insert("delivery_tag".into(), delivery_tag.clone().into());
        let envelope = json!({
            "body": B64.encode(pyjson::to_vec(&body)),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": properties,
        });
        (pyjson::to_vec(&envelope), delivery_tag)
    }
}

fn signature_value(s: &Signature) -> Value {
    json!({
        "task": s.task,
        "args": s.args,
        "kwargs": s.kwargs,
        "options": s.options,
        "subtask_type": null,
        "immutable": s.immutable,
    })
}

/// Celery's `origin` header: `gen<pid>@<hostname>`.
pub fn origin() -> String {
    format!("gen{}@{}", std::process::id(), hostname())
}

/// This machine's host name (the pod name in Kubernetes).
pub fn hostname() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

/// The `unacked` hash value for a message taken from `queue`: `[envelope, "", queue]`.
/// Entries always name the anonymous exchange and the queue the message was taken from, so any
/// kombu consumer restores them without binding lookups (§1.3).
pub fn unacked_entry(msg: &TaskMessage, queue: &str) -> Vec<u8> {
    let queue_json = pyjson::to_vec(queue);
    let envelope = match &msg.raw {
        Some(raw) => raw.clone(),
        None => pyjson::to_vec(&Value::Object(msg.envelope.clone())),
    };
    let mut out = Vec::with_capacity(envelope.len() + queue_json.len() + 8);
    out.push(b'[');
    out.extend_from_slice(&envelope);
    out.extend_from_slice(b", \"\", ");
    out.extend_from_slice(&queue_json);
    out.push(b']');
    out
}

/// A parsed `unacked` value.
#[derive(Clone, Debug, PartialEq)]
pub struct UnackedEntry {
    pub envelope: Map<String, Value>,
    pub exchange: String,
    pub routing_key: String,
}

impl UnackedEntry {
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("unacked entry is not JSON ({e})"))?;
        match v {
            Value::Array(mut a) if a.len() == 3 => {
                let routing_key = a.pop().and_then(|v| v.as_str().map(str::to_owned));
                let exchange = a.pop().and_then(|v| v.as_str().map(str::to_owned));
                let envelope = match a.pop() {
                    Some(Value::Object(m)) => Some(m),
                    _ => None,
                };
                match (envelope, exchange, routing_key) {
                    (Some(envelope), Some(exchange), Some(routing_key)) => {
                        Ok(UnackedEntry { envelope, exchange, routing_key })
                    }
                    _ => Err("unacked entry is not [envelope, exchange, routing_key]".into()),
                }
            }
            _ => Err("unacked entry is not [envelope, exchange, routing_key]".into()),
        }
    }

    /// The message priority kombu uses to pick the list on restore.
    pub fn priority(&self) -> i64 {
        self.envelope.get("properties").and_then(|p| p.get("priority")).and_then(Value::as_i64).unwrap_or(0)
    }

    /// The payload kombu's `_do_restore_message` pushes back: `redelivered` set in the headers
    /// and in `delivery_info`.
    pub fn redelivered_payload(&self) -> Vec<u8> {
        let mut env = self.envelope.clone();
        mark_redelivered(&mut env);
        pyjson::to_vec(&Value::Object(env))
    }
}

/// Set the two `redelivered` flags; like kombu, skip silently when headers or delivery_info
/// are missing.
pub fn mark_redelivered(envelope: &mut Map<String, Value>) {
    let Some(Value::Object(headers)) = envelope.get_mut("headers") else { return };
    headers.insert("redelivered".into(), Value::Bool(true));
    if let Some(Value::Object(info)) = envelope.get_mut("properties").and_then(|p| p.get_mut("delivery_info")) {
        info.insert("redelivered".into(), Value::Bool(true));
    }
}
