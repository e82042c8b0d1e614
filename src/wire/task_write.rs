//! Writing task messages exactly as Python Celery 5.7 sends them (fixtures p01/p31/w01): the
//! protocol-2 headers, properties and `[args, kwargs, embed]` body inside kombu's envelope
//! ([`super::kombu`]).

use super::kombu::{DeliveryInfo, Envelope};
use super::pyjson;
use super::pyrepr::{args_repr, args_tuple_repr, kwargs_repr};
use super::task_read::{Signature, TaskMessage};
use super::time::{parse_iso8601, python_isoformat};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Number, Value};

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
    /// The `group_index` header: the task's place in its group (a chord header member's).
    pub group_index: Option<i64>,
    pub eta: Option<DateTime<Utc>>,
    pub expires: Option<DateTime<Utc>>,
    pub retries: u32,
    pub time_limit: (Option<Number>, Option<Number>),
    pub ignore_result: Option<bool>,
    /// Remaining chain (reversed, next task last), carried in `embed.chain`.
    pub chain: Vec<Signature>,
    /// Set the size of this chord (group id, number of header members) before sending this
    /// task: the last message of a chord this worker starts, as Celery's `set_chord_size` does
    /// (a header member, or the first step of a chain that is one).
    pub chord_size: Option<(String, usize)>,
    /// Sent as a chain step: `embed.chain` is a list even when no step is left (Celery passes
    /// the popped chain on), not `null`.
    pub chain_step: bool,
    pub callbacks: Vec<Signature>,
    pub errbacks: Vec<Signature>,
    /// The chord body this task is a header member of (`embed.chord`).
    pub chord: Option<Signature>,
    /// `argsrepr` as a tuple: what a follow-up sent through a `Signature` shows (it keeps its
    /// args as a tuple); `send_task`'s own calls show a list.
    pub args_tuple: bool,
    /// Custom headers (`apply_async(headers={...})`), written after Celery's own.
    pub headers: Map<String, Value>,
}

impl NewTask {
    /// A plain `send_task(name, args, kwargs)` with a fresh id, to the given queue.
    pub fn new(task: &str, args: Vec<Value>, kwargs: Map<String, Value>, queue: &str) -> Self {
        NewTask {
            task: task.into(),
            id: new_uuid(),
            args,
            kwargs,
            queue: queue.into(),
            priority: 0,
            root_id: None,
            parent_id: None,
            group: None,
            group_index: None,
            eta: None,
            expires: None,
            retries: 0,
            time_limit: (None, None),
            ignore_result: None,
            chain: Vec::new(),
            chain_step: false,
            chord_size: None,
            callbacks: Vec::new(),
            errbacks: Vec::new(),
            chord: None,
            args_tuple: false,
            headers: Map::new(),
        }
    }

    /// The next task of a workflow, as Celery's `Signature.apply_async` sends it from a worker:
    /// `(result,) + sig.args` unless the signature is immutable, `parent_id` = the finished task
    /// and the workflow's root, and the signature's own options: its `task_id`, `queue` (else
    /// its `routing_key`, else `routed_queue`: the worker's routing table or the default queue),
    /// `priority`, `countdown`/`eta`, `expires`, `time_limit`/`soft_time_limit`,
    /// `ignore_result`, `group_id`/`group_index`, custom `headers`, and its own
    /// `link`/`link_error`.
    /// [`Signature::from_value`] checked every option read here.
    pub fn from_signature(sig: &Signature, prepend: Option<Value>, parent: &TaskMessage, routed_queue: &str) -> Self {
        let mut args = Vec::with_capacity(sig.args.len() + 1);
        if let Some(v) = prepend.filter(|_| !sig.immutable) {
            args.push(v);
        }
        args.extend(sig.args.iter().cloned());
        let queue = sig.option_str("queue").or_else(|| sig.option_str("routing_key")).unwrap_or(routed_queue);
        let mut t = NewTask::new(&sig.task, args, sig.kwargs.clone(), queue);
        if let Some(id) = sig.option_str("task_id") {
            t.id = id.into();
        }
        t.args_tuple = true; // a Signature keeps its args as a tuple
        t.priority = sig.options.get("priority").and_then(Value::as_u64).map_or(0, |p| p.min(9) as u8);
        t.root_id = Some(parent.root_id().to_owned());
        t.parent_id = Some(parent.id.clone());
        t.group = sig.option_str("group_id").map(str::to_owned);
        t.group_index = sig.options.get("group_index").and_then(Value::as_i64);
        let now = Utc::now();
        // Celery's `as_task_v2`: a countdown wins over an eta; a number of seconds of expiry
        // counts from the send.
        t.eta = match sig.options.get("countdown").and_then(Value::as_f64).filter(|c| *c != 0.0) {
            Some(countdown) => after(now, countdown),
            None => sig.option_str("eta").and_then(|e| parse_iso8601(e).ok()),
        };
        t.expires = match sig.options.get("expires") {
            Some(Value::Number(n)) => n.as_f64().and_then(|secs| after(now, secs)),
            Some(Value::String(e)) => parse_iso8601(e).ok(),
            _ => None,
        };
        let limit = |key| sig.options.get(key).and_then(Value::as_number).cloned();
        t.time_limit = (limit("time_limit"), limit("soft_time_limit"));
        t.ignore_result = Some(sig.options.get("ignore_result").and_then(Value::as_bool).unwrap_or(false));
        // A chord header member sent as a chain's last step carries the body in its options
        // (Celery's `apply_async(chord=...)`).
        t.chord = sig.option_chord();
        t.callbacks = sig.option_links("link");
        t.errbacks = sig.option_links("link_error");
        // `apply_async(headers={...})`: Celery merges them into the message headers.
        if let Some(Value::Object(headers)) = sig.options.get("headers") {
            t.headers = headers.clone();
        }
        t
    }

    /// Apply `sig` as Celery's `Signature.apply_async((prepend,))` does from a worker: a task
    /// is one message ([`Self::from_signature`]); a group sends its members (each called with
    /// `prepend`) as Celery's `group._prepared` freezes them, under the group's own `task_id`
    /// (else a fresh id): a chain member's last step carries the group; a chain sends its first
    /// step (called with `prepend`) carrying the other steps in `embed.chain`; a chord sends its
    /// header members (a chain member's last step), each carrying the body. `route` names the
    /// queue of a task whose signature names none.
    pub fn apply(
        sig: &Signature,
        prepend: Option<Value>,
        parent: &TaskMessage,
        route: &dyn Fn(&str) -> String,
    ) -> Vec<Self> {
        let prepend = prepend.filter(|_| !sig.immutable);
        match sig.subtask_type.as_deref() {
            Some("group") => {
                let group_id = sig.option_str("task_id").map_or_else(new_uuid, str::to_owned);
                let mut sent = Vec::new();
                for (i, member) in sig.members().iter().enumerate() {
                    sent.extend(Self::group_member(member, i, &group_id, prepend.clone(), parent, route));
                }
                sent
            }
            Some("chain") => Self::apply_chain(sig.members(), prepend, parent, route),
            Some("chord") => {
                // Celery's `chord.run`: the header's members share its group id, each carries
                // the body, which keeps the id the client froze it with (what it waits on).
                let (Some(header), Some(body)) = (sig.chord_part("header"), sig.chord_part("body")) else {
                    return Vec::new();
                };
                let group_id = header.option_str("task_id").map_or_else(new_uuid, str::to_owned);
                let mut body = body;
                if body.option_str("task_id").is_none() {
                    let id = sig.option_str("task_id").map_or_else(new_uuid, str::to_owned);
                    body.options.insert("task_id".into(), id.into());
                }
                // Kept when the client froze the body with one (Celery's immutable option).
                body.options.entry("group_id").or_insert_with(|| group_id.clone().into());
                let members = header.members();
                let mut sent = Vec::new();
                for (i, member) in members.iter().enumerate() {
                    let prepend = prepend.clone().filter(|_| !member.immutable);
                    if member.subtask_type.as_deref() == Some("chain") {
                        // Celery's `prepare_steps`: the chain's last step is the header member
                        // (its group, place and the body); the first step has none.
                        let mut steps = member.members();
                        if let Some(last) = steps.last_mut() {
                            last.options.insert("group_id".into(), group_id.clone().into());
                            last.options.insert("group_index".into(), i.into());
                            last.options.insert("chord".into(), signature_value(&body));
                        }
                        sent.extend(Self::apply_chain(steps, prepend, parent, route));
                        continue;
                    }
                    let mut t = Self::from_signature(member, prepend, parent, &route(&member.task));
                    t.group = Some(group_id.clone());
                    t.group_index = i64::try_from(i).ok();
                    t.chord = Some(body.clone());
                    sent.push(t);
                }
                // Celery's `set_chord_size`, before the last member is sent.
                if let Some(last) = sent.last_mut() {
                    last.chord_size = Some((group_id, members.len()));
                }
                sent
            }
            _ => vec![Self::from_signature(sig, prepend, parent, &route(&sig.task))],
        }
    }

    /// Member `index` of group `group_id`, as Celery's `group._prepared` freezes it and
    /// `_apply_tasks` sends it: a task keeps the `group_id` it was frozen with (Celery's
    /// immutable option) or takes the group's, with its `group_index`; a chain's *last* step
    /// carries them (its first step has none: the group's result is the chain's last value); a
    /// nested group is unrolled into this one, its members numbered within it.
    fn group_member(
        member: &Signature,
        index: usize,
        group_id: &str,
        prepend: Option<Value>,
        parent: &TaskMessage,
        route: &dyn Fn(&str) -> String,
    ) -> Vec<Self> {
        let prepend = prepend.filter(|_| !member.immutable);
        match member.subtask_type.as_deref() {
            Some("group") => member
                .members()
                .iter()
                .enumerate()
                .flat_map(|(i, inner)| Self::group_member(inner, i, group_id, prepend.clone(), parent, route))
                .collect(),
            Some("chain") => {
                let mut steps = member.members();
                if let Some(last) = steps.last_mut().filter(|s| s.subtask_type.is_none()) {
                    last.options.entry("group_id").or_insert_with(|| group_id.into());
                    last.options.insert("group_index".into(), index.into());
                }
                Self::apply_chain(steps, prepend, parent, route)
            }
            Some(_) => Self::apply(member, prepend, parent, route),
            None => {
                let mut t = Self::from_signature(member, prepend, parent, &route(&member.task));
                t.group = Some(member.option_str("group_id").unwrap_or(group_id).to_owned());
                t.group_index = i64::try_from(index).ok();
                vec![t]
            }
        }
    }

    /// A chain's `steps`: the first applied (called with `prepend`), carrying the others,
    /// reversed as Celery keeps them (the next step last), in `embed.chain`.
    fn apply_chain(
        mut steps: Vec<Signature>,
        prepend: Option<Value>,
        parent: &TaskMessage,
        route: &dyn Fn(&str) -> String,
    ) -> Vec<Self> {
        if steps.is_empty() {
            return Vec::new();
        }
        let first = steps.remove(0);
        steps.reverse();
        let mut tasks = Self::apply(&first, prepend, parent, route);
        if let Some(t) = tasks.first_mut() {
            t.chain = steps;
            t.chain_step = true;
        }
        tasks
    }

    /// Several follow-ups sent as one group, as Celery's worker sends several callbacks (and
    /// every errback): a fresh `group_id` shared by all, each with its `group_index`.
    pub fn as_group(tasks: &mut [NewTask]) {
        let group_id = new_uuid();
        for (i, t) in tasks.iter_mut().enumerate() {
            t.group = Some(group_id.clone());
            t.group_index = i64::try_from(i).ok();
        }
    }

    /// The message Celery's `Task.retry` sends (fixture w01): the same task, id, arguments,
    /// headers (custom ones included) and workflow (links, chain, its chord and place in the
    /// group) as `msg`, with `retries + 1`, an ETA `countdown` from now, and the request's
    /// `parent_id` — the task itself when it had none (Celery's `send_task` from inside a task).
    pub fn retry_of(msg: &TaskMessage, queue: &str, countdown: std::time::Duration) -> Self {
        let TaskMessage {
            task,
            id,
            priority,
            group,
            group_index,
            expires,
            retries,
            hard_time_limit,
            soft_time_limit,
            ignore_result,
            args,
            kwargs,
            embed,
            ..
        } = msg;
        NewTask {
            task: task.clone(),
            id: id.clone(),
            args: args.clone(),
            kwargs: kwargs.clone(),
            queue: queue.into(),
            priority: (*priority).clamp(0, 9) as u8,
            root_id: Some(msg.root_id().to_owned()),
            parent_id: Some(msg.parent_id.clone().unwrap_or_else(|| id.clone())),
            group: group.clone(),
            group_index: *group_index,
            eta: chrono::Duration::from_std(countdown).ok().and_then(|c| Utc::now().checked_add_signed(c)),
            expires: *expires,
            retries: retries.saturating_add(1),
            time_limit: (hard_time_limit.clone(), soft_time_limit.clone()),
            ignore_result: *ignore_result,
            chain: embed.chain.clone(),
            chain_step: false,
            chord_size: None,
            callbacks: embed.callbacks.clone(),
            errbacks: embed.errbacks.clone(),
            chord: embed.chord.clone(),
            args_tuple: false,
            headers: custom_headers(msg),
        }
    }

    /// Serialise: the envelope bytes to LPUSH and the delivery tag it carries.
    pub fn to_message(&self, origin: &str) -> (Vec<u8>, String) {
        let delivery_tag = new_uuid();
        let body = (
            &self.args,
            &self.kwargs,
            EmbedOut {
                callbacks: signatures(&self.callbacks),
                errbacks: signatures(&self.errbacks),
                chain: if self.chain_step {
                    Some(self.chain.iter().map(SignatureOut::from).collect())
                } else {
                    signatures(&self.chain)
                },
                chord: self.chord.as_ref().map(SignatureOut::from),
            },
        );
        let iso = |d: &Option<DateTime<Utc>>| d.map(python_isoformat);
        let envelope = Envelope::json(
            &body,
            HeadersOut {
                lang: "py",
                task: &self.task,
                id: &self.id,
                shadow: None,
                eta: iso(&self.eta),
                expires: iso(&self.expires),
                group: self.group.as_deref(),
                group_index: self.group_index,
                retries: self.retries,
                timelimit: (&self.time_limit.0, &self.time_limit.1),
                root_id: self.root_id.as_deref().unwrap_or(&self.id),
                parent_id: self.parent_id.as_deref(),
                argsrepr: if self.args_tuple { args_tuple_repr(&self.args) } else { args_repr(&self.args) },
                kwargsrepr: kwargs_repr(&self.kwargs),
                origin,
                ignore_result: self.ignore_result,
                replaced_task_nesting: 0,
                stamped_headers: None,
                stamps: Map::new(),
                custom: &self.headers,
            },
            PropertiesOut {
                correlation_id: &self.id,
                reply_to: new_uuid(),
                delivery_mode: 2,
                // kombu adds the TTL in milliseconds; Redis ignores it, the worker honours `expires`.
                expiration: self.expires.map(|exp| (exp - Utc::now()).num_milliseconds().max(0).to_string()),
                delivery_info: DeliveryInfo { exchange: "", routing_key: &self.queue },
                priority: self.priority,
                body_encoding: "base64",
                delivery_tag: &delivery_tag,
            },
        );
        (pyjson::to_vec(&envelope), delivery_tag)
    }
}

/// A signature as Celery writes it in a message (`embed` or an option of another signature).
pub fn signature_value(sig: &Signature) -> Value {
    serde_json::to_value(SignatureOut::from(sig)).unwrap_or(Value::Null)
}

// The envelope as typed structs: field order is Python's key order, and no map is built.

#[derive(Serialize)]
struct HeadersOut<'a> {
    lang: &'static str,
    task: &'a str,
    id: &'a str,
    shadow: Option<&'a str>,
    eta: Option<String>,
    expires: Option<String>,
    group: Option<&'a str>,
    group_index: Option<i64>,
    retries: u32,
    timelimit: (&'a Option<Number>, &'a Option<Number>),
    root_id: &'a str,
    parent_id: Option<&'a str>,
    argsrepr: String,
    kwargsrepr: String,
    origin: &'a str,
    ignore_result: Option<bool>,
    replaced_task_nesting: u32,
    stamped_headers: Option<()>,
    stamps: Map<String, Value>,
    #[serde(flatten)]
    custom: &'a Map<String, Value>,
}

/// The headers of Celery's own protocol (and the ones kombu/RabbitMQ add); a message's others
/// are custom ones (`apply_async(headers={...})`).
pub const PROTOCOL_HEADERS: &[&str] = &[
    "lang",
    "task",
    "id",
    "shadow",
    "eta",
    "expires",
    "group",
    "group_index",
    "retries",
    "timelimit",
    "root_id",
    "parent_id",
    "argsrepr",
    "kwargsrepr",
    "origin",
    "ignore_result",
    "replaced_task_nesting",
    "stamped_headers",
    "stamps",
    "redelivered",
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
];

/// The custom headers of `msg`: those not in [`PROTOCOL_HEADERS`].
pub fn custom_headers(msg: &TaskMessage) -> Map<String, Value> {
    match msg.envelope.get("headers").and_then(Value::as_object) {
        Some(h) => h
            .iter()
            .filter(|(k, _)| !PROTOCOL_HEADERS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        None => Map::new(),
    }
}

#[derive(Serialize)]
struct PropertiesOut<'a> {
    correlation_id: &'a str,
    reply_to: String,
    delivery_mode: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    expiration: Option<String>,
    delivery_info: DeliveryInfo<'a>,
    priority: u8,
    body_encoding: &'static str,
    delivery_tag: &'a str,
}

#[derive(Serialize)]
struct EmbedOut<'a> {
    callbacks: Option<Vec<SignatureOut<'a>>>,
    errbacks: Option<Vec<SignatureOut<'a>>>,
    chain: Option<Vec<SignatureOut<'a>>>,
    chord: Option<SignatureOut<'a>>,
}

#[derive(Serialize)]
struct SignatureOut<'a> {
    task: &'a str,
    args: &'a [Value],
    kwargs: &'a Map<String, Value>,
    options: &'a Map<String, Value>,
    subtask_type: Option<&'a str>,
    immutable: bool,
}

impl<'a> From<&'a Signature> for SignatureOut<'a> {
    fn from(s: &'a Signature) -> Self {
        SignatureOut {
            task: &s.task,
            args: &s.args,
            kwargs: &s.kwargs,
            options: &s.options,
            subtask_type: s.subtask_type.as_deref(),
            immutable: s.immutable,
        }
    }
}

/// `now` plus `secs` seconds, if that is a time.
fn after(now: DateTime<Utc>, secs: f64) -> Option<DateTime<Utc>> {
    let d = std::time::Duration::try_from_secs_f64(secs).ok()?;
    now.checked_add_signed(chrono::Duration::from_std(d).ok()?)
}

/// `null` for no signatures, as Celery sends.
fn signatures(s: &[Signature]) -> Option<Vec<SignatureOut<'_>>> {
    (!s.is_empty()).then(|| s.iter().map(SignatureOut::from).collect())
}

/// A random (v4) UUID string from the thread's userspace CSPRNG: no system call per id, which
/// matters at a hundred thousand messages a second.
pub fn new_uuid() -> String {
    let bytes: [u8; 16] = rand::random();
    uuid::Builder::from_random_bytes(bytes).into_uuid().to_string()
}

/// Celery's `origin` header: `gen<pid>@<hostname>`.
pub fn origin() -> String {
    format!("gen{}@{}", std::process::id(), hostname())
}

/// This machine's host name (the pod name in Kubernetes).
pub fn hostname() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}
