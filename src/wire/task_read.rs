//! Reading task messages: the kombu envelope, Celery protocol v2 headers (and legacy v1
//! bodies), the base64/zlib body, and the `[args, kwargs, embed]` payload.
//!
//! Parsing never panics and never guesses: a message is either a [`TaskMessage`] or a
//! [`Rejection`] that says why, with the task id when the message got far enough to carry one
//! (so the worker can still store a FAILURE the caller's `AsyncResult.get()` will see).

use super::kombu::{self, BodyError};
use super::time::parse_iso8601;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use std::fmt;

/// The largest message [`parse_message`] accepts, and the most a compressed body may inflate
/// to (a zlib bomb stops there). The worker's `--max-message-bytes` overrides it.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// How much of a rejected message the dead-letter list keeps (its full length is recorded):
/// 1000 entries of at most this much keep the list under ~6 MB whatever arrives.
pub const DEAD_LETTER_KEEP_BYTES: usize = 4096;

/// `content-encoding` values a JSON message may carry (kombu writes `utf-8`).
const TEXT_ENCODINGS: [&str; 4] = ["utf-8", "utf8", "ascii", "us-ascii"];

/// Why a message was not run. The label is the `reason` of `celery_task_rejected_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Not JSON, or JSON that is not a kombu envelope.
    Malformed,
    /// `content-type` other than JSON (pickle, msgpack, yaml) or an unknown compression.
    UnsupportedEncoding,
    /// Headers present but a field has the wrong type or an unreadable value.
    BadHeaders,
    /// The body does not decode to `[args, kwargs, embed]`.
    BadBody,
    /// No task of that name is registered here (FAILURE `NotRegistered`, as Python does).
    UnknownTask,
    /// Arguments that do not fit the task's signature or types (FAILURE `TypeError`).
    BadArguments,
    /// A canvas form this worker does not run (another kind than a group, chain or chord in a
    /// workflow, a chain led by a group, a chord it would start whose header holds a group or
    /// a chord), or a malformed signature inside the workflow.
    UnsupportedCanvas,
    /// Larger than `--max-message-bytes` (or a body inflating beyond it): refused undecoded.
    TooLarge,
}

impl RejectReason {
    pub const ALL: [RejectReason; 8] = [
        RejectReason::Malformed,
        RejectReason::UnsupportedEncoding,
        RejectReason::BadHeaders,
        RejectReason::BadBody,
        RejectReason::UnknownTask,
        RejectReason::BadArguments,
        RejectReason::UnsupportedCanvas,
        RejectReason::TooLarge,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::UnsupportedEncoding => "unsupported_encoding",
            RejectReason::BadHeaders => "bad_headers",
            RejectReason::BadBody => "bad_body",
            RejectReason::UnknownTask => "unknown_task",
            RejectReason::BadArguments => "bad_arguments",
            RejectReason::UnsupportedCanvas => "unsupported_canvas",
            RejectReason::TooLarge => "too_large",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A message that will not run, and what is known about it.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
    /// Known when the headers were readable: a FAILURE result can then be stored.
    pub task_id: Option<String>,
    pub task_name: Option<String>,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

/// A signature from the `embed` part (link, link_error, chain): `{task, args, kwargs, options,
/// subtask_type, immutable}`: a plain task, or a group or chain (`subtask_type` "group" /
/// "chain", the members in `kwargs.tasks`, each read and checked here), or a chord (its header
/// a group of tasks and chains, its body any of these). Other kinds are refused, named.
#[derive(Clone, Debug, PartialEq)]
pub struct Signature {
    pub task: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub options: Map<String, Value>,
    pub immutable: bool,
    /// `None` for a task; `Some("group")` or `Some("chain")`.
    pub subtask_type: Option<String>,
}

impl Signature {
    /// Read one signature dict; `what` names it in the error (e.g. `link[0]`).
    pub fn from_value(v: &Value, what: &str) -> Result<Signature, String> {
        let obj = v.as_object().ok_or_else(|| format!("{what} is not a signature object"))?;
        let subtask_type = match obj.get("subtask_type").and_then(Value::as_str) {
            None => None,
            Some(kind @ ("group" | "chain")) => {
                let members = match obj.get("kwargs").and_then(|k| k.get("tasks")) {
                    Some(tasks @ Value::Array(_)) => signatures(Some(tasks), &format!("{what}.tasks"))?,
                    _ => return Err(format!("{what} is a {kind:?} without a list of tasks")),
                };
                // A Celery client sends `chain(group, task)` as a chord and flattens chains.
                if kind == "chain" && members.first().is_some_and(|m| m.subtask_type.is_some()) {
                    return Err(format!("{what} is a chain whose first step is a group or chain; send it as a chord"));
                }
                Some(kind.to_owned())
            }
            Some("chord") => {
                // `chain(a, group(b, c), d)`: Celery sends the group and what follows as a chord
                // step. A header of tasks and chains is joined here.
                let part = |key: &str| obj.get("kwargs").and_then(|k| k.get(key));
                let header = Signature::from_value(part("header").unwrap_or(&Value::Null), &format!("{what}.header"))?;
                // The body may be a task, a group, a chain or a chord, read and checked here: it
                // is applied as a whole when the join completes.
                Signature::from_value(part("body").unwrap_or(&Value::Null), &format!("{what}.body"))?;
                if header.subtask_type.as_deref() != Some("group") {
                    return Err(format!("{what} is a chord whose header is not a group"));
                }
                if let Some(kind) =
                    header.members().iter().find_map(|m| m.subtask_type.clone().filter(|k| k != "chain"))
                {
                    return Err(format!(
                        "{what} is a chord whose header holds a {kind:?}; a chord this worker starts \
                         (a chord step of a chain or a link) may hold tasks and chains only"
                    ));
                }
                Some("chord".to_owned())
            }
            Some(kind) => {
                return Err(format!(
                    "{what} is a {kind:?} canvas; only tasks, groups, chains and chords are supported here"
                ));
            }
        };
        let task = obj.get("task").and_then(Value::as_str).filter(|t| !t.is_empty());
        let task = task.ok_or_else(|| format!("{what} has no task name"))?.to_owned();
        let args = match obj.get("args") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a.clone(),
            Some(_) => return Err(format!("{what}.args is not a list")),
        };
        let kwargs = opt_object(obj.get("kwargs")).ok_or_else(|| format!("{what}.kwargs is not a dict"))?;
        let options = opt_object(obj.get("options")).ok_or_else(|| format!("{what}.options is not a dict"))?;
        let immutable = obj.get("immutable").and_then(Value::as_bool).unwrap_or(false);
        // The signature's own follow-ups (`sig.on_error(e)`, `sig.link(c)`) must be readable
        // too: a broken one refuses the message now, not after its parent ran.
        for key in ["link", "link_error"] {
            signature_list(options.get(key), &format!("{what}.options.{key}"))?;
        }
        // A chain's last step that is a chord header member carries the body here.
        if let Some(body) = options.get("chord").filter(|b| !b.is_null()) {
            Signature::from_value(body, &format!("{what}.options.chord"))?;
        }
        check_options(&options).map_err(|e| format!("{what}.options.{e}"))?;
        Ok(Signature { task, args, kwargs, options, immutable, subtask_type })
    }

    /// A chord's `header` or `body` (`kwargs.header` / `kwargs.body`), checked when read.
    pub fn chord_part(&self, key: &str) -> Option<Signature> {
        match self.subtask_type.as_deref() {
            Some("chord") => self.kwargs.get(key).and_then(|v| Signature::from_value(v, key).ok()),
            _ => None,
        }
    }

    /// A group's members or a chain's steps (`kwargs.tasks`), in order; empty for a task.
    pub fn members(&self) -> Vec<Signature> {
        match (&self.subtask_type, self.kwargs.get("tasks")) {
            (Some(_), Some(Value::Array(items))) => {
                items.iter().filter_map(|s| Signature::from_value(s, "tasks").ok()).collect()
            }
            _ => Vec::new(),
        }
    }

    /// The chord body in `options.chord` (a chain's last step that is a chord header member),
    /// checked when the signature was read.
    pub fn option_chord(&self) -> Option<Signature> {
        let body = self.options.get("chord").filter(|b| !b.is_null())?;
        Signature::from_value(body, "options.chord").ok()
    }

    /// `options[key]` as a string, if set.
    pub fn option_str(&self, key: &str) -> Option<&str> {
        self.options.get(key).and_then(Value::as_str)
    }

    /// The signature's own `link` (`"link"`) or `link_error` (`"link_error"`) signatures,
    /// as `Signature.link()` / `.on_error()` keep them in its options; checked when the
    /// signature was read.
    pub fn option_links(&self, key: &str) -> Vec<Signature> {
        signature_list(self.options.get(key), key).unwrap_or_default()
    }
}

/// The options a follow-up is sent with ([`crate::wire::NewTask::from_signature`]) have the
/// types Celery gives them.
fn check_options(options: &Map<String, Value>) -> Result<(), String> {
    let number = |key: &str| match options.get(key) {
        None | Some(Value::Null | Value::Number(_)) => Ok(()),
        Some(v) => Err(format!("{key} is {v}, not a number of seconds")),
    };
    let time = |key: &str, seconds_too: bool| match options.get(key) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Number(_)) if seconds_too => Ok(()),
        Some(Value::String(t)) => parse_iso8601(t).map(drop).map_err(|e| format!("{key}: {e}")),
        Some(v) => Err(format!("{key} is {v}, not a date and time")),
    };
    number("countdown")?;
    number("time_limit")?;
    number("soft_time_limit")?;
    time("eta", false)?;
    if let Some(h) = options.get("headers").filter(|h| !h.is_null() && !h.is_object()) {
        return Err(format!("headers is {h}, not a dict"));
    }
    time("expires", true)?;
    match options.get("priority") {
        None | Some(Value::Null) => Ok(()),
        Some(p) if p.as_u64().is_some() => Ok(()),
        Some(p) => Err(format!("priority is {p}, not a whole number 0-255")),
    }
}

/// A signature option holding one signature or a list of them (`link`, `link_error`).
fn signature_list(v: Option<&Value>, what: &str) -> Result<Vec<Signature>, String> {
    match v {
        Some(one @ Value::Object(_)) => Ok(vec![Signature::from_value(one, what)?]),
        list => signatures(list, what),
    }
}

/// The `embed` dict: what runs after this task.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Embed {
    pub callbacks: Vec<Signature>,
    pub errbacks: Vec<Signature>,
    /// Stored reversed, as Celery does: the next task is the LAST element.
    pub chain: Vec<Signature>,
    /// The body of the chord this task is a header member of (`embed.chord`); its join key
    /// is the message's `group` (celery-wire.md §2.4).
    pub chord: Option<Signature>,
}

/// Everything the worker needs from one message.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskMessage {
    /// The envelope as received (key order and number spelling preserved).
    pub envelope: Map<String, Value>,
    /// The exact bytes received, or `None` when the envelope had to be completed (missing
    /// delivery_tag) and must be re-serialised.
    pub raw: Option<Vec<u8>>,
    pub task: String,
    pub id: String,
    pub delivery_tag: String,
    pub priority: i64,
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    pub group: Option<String>,
    /// `group_index`: the member's place in its group (a chord's header results are joined
    /// in this order); `None` when the producer sent none.
    pub group_index: Option<i64>,
    pub eta: Option<DateTime<Utc>>,
    pub expires: Option<DateTime<Utc>>,
    pub retries: u32,
    /// `timelimit[0]`: hard limit in seconds, as sent (kept as JSON for the FAILURE message).
    pub hard_time_limit: Option<serde_json::Number>,
    /// `timelimit[1]`: soft limit in seconds.
    pub soft_time_limit: Option<serde_json::Number>,
    /// `None` means the task default (Python's `send_task` sends `null`).
    pub ignore_result: Option<bool>,
    pub redelivered: bool,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub embed: Embed,
    /// 1 or 2.
    pub protocol: u8,
}

impl TaskMessage {
    /// The workflow root: `root_id`, defaulting to the task's own id.
    pub fn root_id(&self) -> &str {
        self.root_id.as_deref().unwrap_or(&self.id)
    }

    /// `properties.delivery_info.routing_key`, which Celery reports as the task's queue.
    pub fn routing_key(&self) -> Option<&str> {
        self.envelope.get("properties")?.get("delivery_info")?.get("routing_key")?.as_str()
    }
}

/// Parse one message popped from a queue, within [`DEFAULT_MAX_MESSAGE_BYTES`].
pub fn parse_message(bytes: &[u8]) -> Result<TaskMessage, Rejection> {
    parse_message_within(bytes, DEFAULT_MAX_MESSAGE_BYTES)
}

/// Parse one message, refusing it undecoded when it is larger than `max_bytes` (or its body
/// inflates beyond that). Whenever the message is refused before its headers could be parsed
/// (too large, not JSON, nested too deep), the task id and name are looked for with
/// [`scan_header_ids`], so the caller still gets a FAILURE.
pub fn parse_message_within(bytes: &[u8], max_bytes: usize) -> Result<TaskMessage, Rejection> {
    let result = if bytes.len() > max_bytes {
        Err(Rejection {
            reason: RejectReason::TooLarge,
            detail: format!("message of {} bytes is larger than the limit of {max_bytes}", bytes.len()),
            task_id: None,
            task_name: None,
        })
    } else {
        parse_checked(bytes, max_bytes)
    };
    result.map_err(|mut r| {
        if r.task_id.is_none() && matches!(r.reason, RejectReason::TooLarge | RejectReason::Malformed) {
            let (id, task) = scan_header_ids(bytes);
            r.task_id = id;
            r.task_name = r.task_name.or(task);
        }
        r
    })
}

fn parse_checked(bytes: &[u8], max_bytes: usize) -> Result<TaskMessage, Rejection> {
    let reject = |reason, detail: String| Rejection { reason, detail, task_id: None, task_name: None };
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| reject(RejectReason::Malformed, format!("message is not JSON ({e})")))?;
    let Value::Object(mut envelope) = value else {
        return Err(reject(RejectReason::Malformed, "message is not a JSON object (kombu envelope)".into()));
    };
    let no_headers = Map::new();
    let headers = match envelope.get("headers") {
        None | Some(Value::Null) => &no_headers,
        Some(Value::Object(h)) => h,
        Some(_) => return Err(reject(RejectReason::Malformed, "envelope headers is not a dict".into())),
    };
    let properties = match envelope.get("properties") {
        Some(Value::Object(p)) => p,
        _ => return Err(reject(RejectReason::Malformed, "envelope has no properties dict".into())),
    };
    if !envelope.contains_key("body") {
        return Err(reject(RejectReason::Malformed, "envelope has no body".into()));
    }

    // Protocol v2 names the task in the headers; v1 (or a producer that forgot) in the body.
    let protocol = if headers.contains_key("task") { 2 } else { 1 };
    let ids = if protocol == 2 {
        let task = headers.get("task").and_then(Value::as_str).map(str::to_owned);
        let id = headers.get("id").and_then(Value::as_str).map(str::to_owned);
        Some((task, id))
    } else {
        None
    };
    let known = |reason, detail: String| Rejection {
        reason,
        detail,
        task_id: ids.as_ref().and_then(|(_, id)| id.clone()),
        task_name: ids.as_ref().and_then(|(t, _)| t.clone()),
    };

    let content_type = envelope.get("content-type").and_then(Value::as_str).unwrap_or("application/json");
    if content_type != "application/json" {
        return Err(known(
            RejectReason::UnsupportedEncoding,
            format!("content-type {content_type:?} is not supported; send JSON (task_serializer='json')"),
        ));
    }
    // kombu would decode the body with this codec; one it does not know means Celery would not
    // run the task either.
    match envelope.get("content-encoding") {
        None | Some(Value::Null) => {}
        Some(Value::String(e)) if TEXT_ENCODINGS.iter().any(|t| t.eq_ignore_ascii_case(e)) => {}
        Some(other) => {
            let shown: String = other.to_string().chars().take(64).collect();
            return Err(known(
                RejectReason::UnsupportedEncoding,
                format!("content-encoding {shown} is not supported; JSON messages are utf-8"),
            ));
        }
    }
    let body_bytes = decode_body(&envelope, max_bytes).map_err(|(r, d)| known(r, d))?;
    let body: Value = serde_json::from_slice(&body_bytes)
        .map_err(|e| known(RejectReason::BadBody, format!("body is not JSON ({e})")))?;

    let fields = if protocol == 2 {
        V2Fields::from_headers(headers, body).map_err(|(r, d)| known(r, d))?
    } else {
        V2Fields::from_v1_body(body).map_err(|(r, d)| known(r, d))?
    };
    let with_id = |reason, detail: String| Rejection {
        reason,
        detail,
        task_id: Some(fields.id.clone()),
        task_name: Some(fields.task.clone()),
    };
    let embed = fields.embed.map_err(|d| with_id(RejectReason::UnsupportedCanvas, d))?;

    let priority = properties.get("priority").and_then(Value::as_i64).unwrap_or(0);
    let redelivered = headers.get("redelivered").and_then(Value::as_bool).unwrap_or(false)
        || properties.get("delivery_info").and_then(|d| d.get("redelivered")).and_then(Value::as_bool).unwrap_or(false);
    // kombu names the unacked entry after the delivery tag; a producer that did not set one
    // (celery-rs) gets a fresh one so the message can still be tracked and restored.
    let tag = properties.get("delivery_tag").and_then(Value::as_str).filter(|t| !t.is_empty()).map(str::to_owned);
    let (delivery_tag, raw) = match tag {
        Some(tag) => (tag, Some(bytes.to_vec())),
        None => {
            let tag = super::task_write::new_uuid();
            if let Some(Value::Object(p)) = envelope.get_mut("properties") {
                p.insert("delivery_tag".into(), Value::String(tag.clone()));
            }
            (tag, None)
        }
    };

    Ok(TaskMessage {
        envelope,
        raw,
        task: fields.task,
        id: fields.id,
        delivery_tag,
        priority,
        root_id: fields.root_id,
        parent_id: fields.parent_id,
        group: fields.group,
        group_index: fields.group_index,
        eta: fields.eta,
        expires: fields.expires,
        retries: fields.retries,
        hard_time_limit: fields.hard,
        soft_time_limit: fields.soft,
        ignore_result: fields.ignore_result,
        redelivered,
        args: fields.args,
        kwargs: fields.kwargs,
        embed,
        protocol,
    })
}

/// The body's bytes ([`kombu::decode_body`]), its errors as the reasons a task is rejected for.
fn decode_body(envelope: &Map<String, Value>, max_bytes: usize) -> Result<Vec<u8>, (RejectReason, String)> {
    kombu::decode_body(envelope, max_bytes).map_err(|e| {
        let reason = match e {
            BodyError::NotAString | BodyError::BadBase64(_) | BodyError::Inflate(_) => RejectReason::BadBody,
            BodyError::UnsupportedEncoding(_) | BodyError::UnsupportedCompression(_) => {
                RejectReason::UnsupportedEncoding
            }
            BodyError::TooLarge(_) => RejectReason::TooLarge,
        };
        (reason, e.to_string())
    })
}

/// The task id and name from a protocol-2 envelope's `headers`, found without parsing the rest:
/// one pass over the bytes, nesting counted rather than recursed into, strings skipped without
/// copying. For messages too large or too deep to parse; `None` where the headers do not say.
pub fn scan_header_ids(bytes: &[u8]) -> (Option<String>, Option<String>) {
    // Longer than any real id or task name: not worth a result key.
    const MAX_FIELD: usize = 255;
    let (mut id, mut task) = (None, None);
    let mut depth = 0usize;
    // The last key read directly in the top-level object, and in `headers`.
    let mut top_key: &[u8] = b"";
    let mut header_key: &[u8] = b"";
    let mut in_headers = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                let Some(end) = string_end(bytes, i) else { break };
                let raw = &bytes[i..=end];
                let content = &bytes[i + 1..end];
                i = end + 1;
                let next = bytes[i..].iter().position(|b| !b.is_ascii_whitespace()).map(|p| i + p);
                if next.is_some_and(|n| bytes[n] == b':') {
                    match (depth, in_headers) {
                        (1, _) => top_key = content,
                        (2, true) => header_key = content,
                        _ => {}
                    }
                } else if depth == 2 && in_headers && raw.len() <= MAX_FIELD + 2 {
                    let value = || serde_json::from_slice::<String>(raw).ok();
                    match header_key {
                        b"id" => id = id.or_else(value),
                        b"task" => task = task.or_else(value),
                        _ => {}
                    }
                }
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                if depth == 2 && bytes[i] == b'{' && top_key == b"headers" {
                    in_headers = true;
                }
            }
            b'}' | b']' => {
                if depth == 2 && in_headers {
                    in_headers = false;
                    if id.is_some() {
                        break;
                    }
                }
                depth = depth.saturating_sub(1);
            }
            _ => {}
        }
        i += 1;
    }
    (id, task)
}

/// Index of the quote closing the string that opens at `start`.
fn string_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// What the dead-letter list keeps of a rejected message: a small JSON object with the reason,
/// the id when known, the full length, and at most [`DEAD_LETTER_KEEP_BYTES`] of the message
/// (as text when it is UTF-8, else base64), so the list stays bounded in bytes.
pub fn dead_letter_entry(raw: &[u8], rejection: &Rejection, rejected_at: f64) -> Vec<u8> {
    let kept = &raw[..raw.len().min(DEAD_LETTER_KEEP_BYTES)];
    // A cut may split a UTF-8 character: keep the valid prefix as text.
    let text = match std::str::from_utf8(kept) {
        Ok(t) => Some(t),
        Err(e) if e.error_len().is_none() && raw.len() > kept.len() => {
            std::str::from_utf8(&kept[..e.valid_up_to()]).ok()
        }
        Err(_) => None,
    };
    let detail: String = rejection.detail.chars().take(1024).collect();
    let mut entry = serde_json::json!({
        "reason": rejection.reason.label(),
        "detail": detail,
        "task_id": rejection.task_id,
        "task": rejection.task_name,
        "length": raw.len(),
        "truncated": raw.len() > kept.len(),
        "rejected_at": rejected_at,
    });
    match text {
        Some(t) => entry["body"] = Value::String(t.to_owned()),
        None => entry["body_base64"] = Value::String(B64.encode(kept)),
    }
    serde_json::to_vec(&entry).unwrap_or_default()
}

/// The fields both protocol versions provide, normalised.
struct V2Fields {
    task: String,
    id: String,
    root_id: Option<String>,
    parent_id: Option<String>,
    group: Option<String>,
    group_index: Option<i64>,
    eta: Option<DateTime<Utc>>,
    expires: Option<DateTime<Utc>>,
    retries: u32,
    hard: Option<serde_json::Number>,
    soft: Option<serde_json::Number>,
    ignore_result: Option<bool>,
    args: Vec<Value>,
    kwargs: Map<String, Value>,
    embed: Result<Embed, String>,
}

type FieldResult<T> = Result<T, (RejectReason, String)>;

fn bad_header(detail: String) -> (RejectReason, String) {
    (RejectReason::BadHeaders, detail)
}

impl V2Fields {
    fn from_headers(h: &Map<String, Value>, body: Value) -> FieldResult<V2Fields> {
        let task = required_str(h, "task")?;
        let id = required_str(h, "id")?;
        let (args, kwargs, embed) = split_v2_body(body)?;
        let (hard, soft) = time_limits(h.get("timelimit"))?;
        Ok(V2Fields {
            task,
            id,
            root_id: opt_str(h, "root_id")?,
            parent_id: opt_str(h, "parent_id")?,
            group: opt_str(h, "group")?,
            group_index: opt_int(h, "group_index")?,
            eta: opt_time(h, "eta")?,
            expires: opt_time(h, "expires")?,
            retries: retries(h.get("retries"))?,
            hard,
            soft,
            ignore_result: opt_bool(h, "ignore_result")?,
            args,
            kwargs,
            embed,
        })
    }

    /// Protocol v1: `{"task", "id", "args", "kwargs", "eta", "expires", "retries", "timelimit",
    /// "taskset", "callbacks", "errbacks", "chord", "utc"}` in the body, headers empty.
    fn from_v1_body(body: Value) -> FieldResult<V2Fields> {
        let Value::Object(b) = body else {
            return Err((RejectReason::Malformed, "no task header and the body is not a protocol v1 dict".into()));
        };
        let task = required_str(&b, "task").map_err(|(_, d)| (RejectReason::Malformed, d))?;
        let id = required_str(&b, "id")?;
        let args = match b.get("args") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a.clone(),
            Some(_) => return Err((RejectReason::BadBody, "args is not a list".into())),
        };
        let kwargs = opt_object(b.get("kwargs")).ok_or((RejectReason::BadBody, "kwargs is not a dict".to_owned()))?;
        let (hard, soft) = time_limits(b.get("timelimit"))?;
        let embed = (|| {
            Ok(Embed {
                callbacks: signatures(b.get("callbacks"), "callbacks")?,
                errbacks: signatures(b.get("errbacks"), "errbacks")?,
                chain: Vec::new(),
                chord: chord_body(b.get("chord"))?,
            })
        })();
        Ok(V2Fields {
            task,
            id,
            root_id: None,
            parent_id: None,
            group: opt_str(&b, "taskset")?,
            group_index: None,
            eta: opt_time(&b, "eta")?,
            expires: opt_time(&b, "expires")?,
            retries: retries(b.get("retries"))?,
            hard,
            soft,
            ignore_result: None,
            args,
            kwargs,
            embed,
        })
    }
}

/// `[args, kwargs, embed]`; the embed can still be refused on its own (canvas support).
type V2Body = (Vec<Value>, Map<String, Value>, Result<Embed, String>);

fn split_v2_body(body: Value) -> FieldResult<V2Body> {
    let Value::Array(mut parts) = body else {
        return Err((RejectReason::BadBody, "body is not a [args, kwargs, embed] list".into()));
    };
    if !(2..=3).contains(&parts.len()) {
        return Err((RejectReason::BadBody, format!("body has {} parts, expected [args, kwargs, embed]", parts.len())));
    }
    let embed = if parts.len() == 3 { parts.pop().unwrap_or(Value::Null) } else { Value::Null };
    let kwargs = parts.pop().unwrap_or(Value::Null);
    let args = parts.pop().unwrap_or(Value::Null);
    let args = match args {
        Value::Array(a) => a,
        Value::Null => Vec::new(),
        _ => return Err((RejectReason::BadBody, "args is not a list".into())),
    };
    let kwargs = match kwargs {
        Value::Object(k) => k,
        Value::Null => Map::new(),
        _ => return Err((RejectReason::BadBody, "kwargs is not a dict".into())),
    };
    let embed = match embed {
        Value::Null => Ok(Embed::default()),
        Value::Object(e) => parse_embed(&e),
        _ => return Err((RejectReason::BadBody, "embed is not a dict".into())),
    };
    Ok((args, kwargs, embed))
}

fn parse_embed(e: &Map<String, Value>) -> Result<Embed, String> {
    Ok(Embed {
        callbacks: signatures(e.get("callbacks"), "link")?,
        errbacks: signatures(e.get("errbacks"), "link_error")?,
        chain: signatures(e.get("chain"), "chain")?,
        chord: chord_body(e.get("chord"))?,
    })
}

/// `embed.chord`: the body a chord header member completes: a task, or a group, chain or
/// chord applied as a whole when the join completes (each read and checked here).
fn chord_body(v: Option<&Value>) -> Result<Option<Signature>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(body) => Signature::from_value(body, "chord body").map(Some),
    }
}

fn signatures(v: Option<&Value>, what: &str) -> Result<Vec<Signature>, String> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => {
            items.iter().enumerate().map(|(i, s)| Signature::from_value(s, &format!("{what}[{i}]"))).collect()
        }
        Some(_) => Err(format!("{what} is not a list of signatures")),
    }
}

fn opt_object(v: Option<&Value>) -> Option<Map<String, Value>> {
    match v {
        None | Some(Value::Null) => Some(Map::new()),
        Some(Value::Object(m)) => Some(m.clone()),
        Some(_) => None,
    }
}

fn required_str(h: &Map<String, Value>, key: &str) -> FieldResult<String> {
    match h.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(bad_header(format!("{key} is empty"))),
        None | Some(Value::Null) => Err(bad_header(format!("{key} is missing"))),
        Some(other) => Err(bad_header(format!("{key} is not a string: {other}"))),
    }
}

fn opt_str(h: &Map<String, Value>, key: &str) -> FieldResult<Option<String>> {
    match h.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(bad_header(format!("{key} is not a string: {other}"))),
    }
}

fn opt_int(h: &Map<String, Value>, key: &str) -> FieldResult<Option<i64>> {
    match h.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.is_i64() => Ok(n.as_i64()),
        Some(other) => Err(bad_header(format!("{key} is not an integer: {other}"))),
    }
}

fn opt_bool(h: &Map<String, Value>, key: &str) -> FieldResult<Option<bool>> {
    match h.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(bad_header(format!("{key} is not a boolean: {other}"))),
    }
}

fn opt_time(h: &Map<String, Value>, key: &str) -> FieldResult<Option<DateTime<Utc>>> {
    match h.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_iso8601(s).map(Some).map_err(|e| bad_header(format!("{key}: {e}"))),
        Some(other) => Err(bad_header(format!("{key} is not an ISO-8601 string: {other}"))),
    }
}

fn retries(v: Option<&Value>) -> FieldResult<u32> {
    match v {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|r| u32::try_from(r).ok())
            .ok_or_else(|| bad_header(format!("retries is not a small non-negative integer: {n}"))),
        Some(other) => Err(bad_header(format!("retries is not an integer: {other}"))),
    }
}

type Limits = (Option<serde_json::Number>, Option<serde_json::Number>);

/// `timelimit` is `[hard, soft]` (the code, not the docs, decides the order), each a number or
/// null; floats allowed.
fn time_limits(v: Option<&Value>) -> FieldResult<Limits> {
    let one = |x: &Value, which: &str| -> FieldResult<Option<serde_json::Number>> {
        match x {
            Value::Null => Ok(None),
            Value::Number(n) if n.as_f64().is_some_and(|f| f.is_finite() && f >= 0.0) => Ok(Some(n.clone())),
            other => Err(bad_header(format!("timelimit {which} is not a non-negative number: {other}"))),
        }
    };
    match v {
        None | Some(Value::Null) => Ok((None, None)),
        Some(Value::Array(a)) if a.len() == 2 => Ok((one(&a[0], "hard")?, one(&a[1], "soft")?)),
        Some(other) => Err(bad_header(format!("timelimit is not [hard, soft]: {other}"))),
    }
}

/// Seconds from a JSON number (time limits, io_bound durations).
pub fn number_seconds(n: &serde_json::Number) -> f64 {
    n.as_f64().unwrap_or(f64::INFINITY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(id: &str) -> Value {
        serde_json::json!({
            "body": "W1tdLCB7fSwge31d",
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"lang": "py", "task": "tasks.cpu_bound", "id": id, "nested": {"id": "not this"}},
            "properties": {"delivery_tag": "t1", "body_encoding": "base64"}
        })
    }

    #[test]
    fn a_signatures_own_options_are_checked_when_it_is_read() {
        let sig = |options: Value| {
            Signature::from_value(
                &serde_json::json!({"task": "t", "args": [], "kwargs": {}, "options": options}),
                "link[0]",
            )
        };
        let errback = serde_json::json!({"task": "e", "options": {"task_id": "e1"}});
        let ok =
            sig(serde_json::json!({"link_error": [errback], "countdown": 2.5, "expires": "2026-01-01T00:00:00+00:00"}))
                .unwrap();
        assert_eq!(ok.option_links("link_error")[0].task, "e");
        assert_eq!(ok.option_links("link"), vec![]);
        for (options, says) in [
            (
                serde_json::json!({"link_error": [errback, "junk"]}),
                "link[0].options.link_error[1] is not a signature object",
            ),
            (
                serde_json::json!({"link": {"task": "c", "subtask_type": "chain"}}),
                "link[0].options.link is a \"chain\" without a list of tasks",
            ),
            (
                serde_json::json!({"link": {"task": "c", "subtask_type": "xmap"}}),
                "link[0].options.link is a \"xmap\" canvas",
            ),
            (serde_json::json!({"countdown": "soon"}), "countdown is \"soon\", not a number of seconds"),
            (serde_json::json!({"eta": 5}), "eta is 5, not a date and time"),
            (serde_json::json!({"priority": -1}), "priority is -1"),
        ] {
            let err = sig(options).unwrap_err();
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn ids_are_found_in_headers_only() {
        let bytes = serde_json::to_vec(&envelope("abc")).unwrap();
        assert_eq!(scan_header_ids(&bytes), (Some("abc".into()), Some("tasks.cpu_bound".into())));
        let nested = format!(
            "{{\"body\": {}{}, \"headers\": {{\"id\": \"deep\", \"task\": \"t\"}}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(scan_header_ids(nested.as_bytes()).0.as_deref(), Some("deep"));
        for no_id in [&b"{\"id\": \"top\"}"[..], b"[[[[", b"\"", b"{\"headers\": [{\"id\": \"x\"}]}", b""] {
            assert_eq!(scan_header_ids(no_id).0, None, "{}", String::from_utf8_lossy(no_id));
        }
        // A quote escaped inside a string does not end it.
        let tricky = br#"{"body": "x\"}, \"headers\": {\"id\": \"fake\"}", "headers": {"id": "real"}}"#;
        assert_eq!(scan_header_ids(tricky).0.as_deref(), Some("real"));
    }

    #[test]
    fn limits_and_encodings() {
        let bytes = serde_json::to_vec(&envelope("abc")).unwrap();
        assert!(parse_message(&bytes).is_ok());
        let too_large = parse_message_within(&bytes, 100).unwrap_err();
        assert_eq!((too_large.reason, too_large.task_id.as_deref()), (RejectReason::TooLarge, Some("abc")));
        let mut rot13 = envelope("r");
        rot13["content-encoding"] = "rot13".into();
        let r = parse_message(&serde_json::to_vec(&rot13).unwrap()).unwrap_err();
        assert_eq!((r.reason, r.task_id.as_deref()), (RejectReason::UnsupportedEncoding, Some("r")));
        let mut upper = envelope("u");
        upper["content-encoding"] = "UTF-8".into();
        assert!(parse_message(&serde_json::to_vec(&upper).unwrap()).is_ok());
    }

    fn with_embed(headers: Value, embed: Value) -> Result<TaskMessage, Rejection> {
        let mut env = envelope("c1");
        for (k, v) in headers.as_object().unwrap() {
            env["headers"][k] = v.clone();
        }
        env["body"] = B64.encode(serde_json::json!([[], {}, embed]).to_string()).into();
        parse_message(&serde_json::to_vec(&env).unwrap())
    }

    #[test]
    fn chord_members_are_read_and_malformed_ones_refused_with_their_id() {
        let body = serde_json::json!({"task": "tasks.xsum", "args": [], "kwargs": {}, "options": {"task_id": "b"}});
        let m = with_embed(serde_json::json!({"group": "g", "group_index": 3}), serde_json::json!({"chord": body}))
            .unwrap();
        assert_eq!((m.group.as_deref(), m.group_index), (Some("g"), Some(3)));
        assert_eq!(m.embed.chord.map(|b| b.task), Some("tasks.xsum".to_owned()));
        let group_body = serde_json::json!({"task": "celery.group", "subtask_type": "group", "kwargs": {"tasks": []}});
        let m = with_embed(serde_json::json!({}), serde_json::json!({"chord": group_body})).unwrap();
        assert_eq!(
            m.embed.chord.and_then(|b| b.subtask_type).as_deref(),
            Some("group"),
            "applied when the join completes"
        );
        let xmap_body = serde_json::json!({"task": "celery.map", "subtask_type": "xmap", "kwargs": {}});
        for (headers, embed, reason, says) in [
            (
                serde_json::json!({}),
                serde_json::json!({"chord": xmap_body}),
                RejectReason::UnsupportedCanvas,
                "\"xmap\" canvas",
            ),
            (
                serde_json::json!({}),
                serde_json::json!({"chord": "junk"}),
                RejectReason::UnsupportedCanvas,
                "not a signature",
            ),
            (
                serde_json::json!({}),
                serde_json::json!({"chord": {"args": []}}),
                RejectReason::UnsupportedCanvas,
                "no task name",
            ),
            (serde_json::json!({"group_index": "x"}), serde_json::json!({}), RejectReason::BadHeaders, "group_index"),
            (serde_json::json!({"group_index": 1.5}), serde_json::json!({}), RejectReason::BadHeaders, "group_index"),
        ] {
            let r = with_embed(headers, embed).unwrap_err();
            assert_eq!((r.reason, r.task_id.as_deref()), (reason, Some("c1")), "{r}");
            assert!(r.detail.contains(says), "{r}");
        }
    }

    #[test]
    fn dead_letter_entries_are_bounded() {
        let r =
            Rejection { reason: RejectReason::Malformed, detail: "d".repeat(10_000), task_id: None, task_name: None };
        for raw in [vec![b'x'; 20 << 20], vec![0xff; 20 << 20], "é".repeat(5000).into_bytes(), b"tiny".to_vec()] {
            let entry = dead_letter_entry(&raw, &r, 1.0);
            assert!(entry.len() < 7 * 1024, "{} bytes", entry.len());
            let v: Value = serde_json::from_slice(&entry).unwrap();
            assert_eq!(v["length"], raw.len());
            assert_eq!(v["truncated"], raw.len() > DEAD_LETTER_KEEP_BYTES);
        }
    }
}
