//! Celery's remote-control messages (the pidbox), both ways: reading a request that
//! `celery inspect …` / `celery control …` (or Flower) published, and writing the reply.
//!
//! A request is a kombu envelope ([`super::kombu`]) whose body names a `method`, its
//! `arguments`, an optional `destination` (node names) or `pattern` + `matcher`, a `ticket` and a
//! `reply_to` (`{exchange, routing_key}`); the sender's Lamport clock is in the headers
//! (fixture e08). A reply is `{node: reply}` with the request's ticket and the worker's clock in
//! the headers (fixture e11). What the commands mean is `crate::worker::control`'s business.

use super::kombu;
use serde::Serialize;
use serde_json::{Map, Value};

/// A control request, as far as it could be read.
#[derive(Debug, PartialEq)]
pub struct Request {
    pub method: String,
    pub arguments: Map<String, Value>,
    pub destination: Option<Vec<String>>,
    /// `(pattern, matcher)`: a glob or a pcre over node names.
    pub pattern: Option<(String, String)>,
    pub ticket: Option<String>,
    /// `(exchange, routing_key)` to reply to; no reply without it.
    pub reply_to: Option<(String, String)>,
    pub clock: u64,
}

/// The most a request body may inflate to; control requests are small.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Read a pidbox message. Errors say what was wrong.
pub fn read_request(bytes: &[u8]) -> Result<Request, String> {
    let env: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON ({e})"))?;
    let env = env.as_object().ok_or("not a kombu envelope (JSON object)")?;
    let raw = kombu::decode_body(env, MAX_REQUEST_BYTES).map_err(|e| e.to_string())?;
    let body: Value = serde_json::from_slice(&raw).map_err(|e| format!("body is not JSON ({e})"))?;
    let body = body.as_object().ok_or("body is not a JSON object")?;
    let method = body.get("method").and_then(Value::as_str).ok_or("no method")?.to_owned();
    let arguments = match body.get("arguments") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err("arguments is not an object".into()),
    };
    let destination = match body.get("destination") {
        None | Some(Value::Null) => None,
        Some(v) => Some(maybe_list(Some(v)).ok_or("destination is not a list of node names")?),
    };
    let text = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_owned);
    let pattern = text("pattern").zip(text("matcher"));
    let reply_to = body
        .get("reply_to")
        .and_then(|r| Some((r.get("exchange")?.as_str()?.to_owned(), r.get("routing_key")?.as_str()?.to_owned())));
    let headers = env.get("headers");
    let clock = headers.and_then(|h| h.get("clock")).and_then(Value::as_u64).unwrap_or(0);
    let ticket = text("ticket").or_else(|| headers?.get("ticket")?.as_str().map(str::to_owned));
    Ok(Request { method, arguments, destination, pattern, ticket, reply_to, clock })
}

/// Celery's `maybe_list`, as control commands read their id arguments: one string or a list of
/// them (other items are skipped); `None` for anything else.
pub fn maybe_list(v: Option<&Value>) -> Option<Vec<String>> {
    match v? {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(items) => Some(items.iter().filter_map(|i| i.as_str().map(str::to_owned)).collect()),
        _ => None,
    }
}

/// The headers of a reply, in kombu's key order.
#[derive(Serialize)]
struct ReplyHeaders<'a> {
    ticket: Option<&'a str>,
    clock: u64,
}

/// The reply message: `{node: reply}` to `exchange`/`routing_key`, with the request's ticket
/// and the worker's clock.
pub fn reply_message(
    node: &str,
    exchange: &str,
    routing_key: &str,
    ticket: Option<&str>,
    clock: u64,
    reply: Value,
) -> Vec<u8> {
    let mut body = Map::new();
    body.insert(node.to_owned(), reply);
    kombu::exchange_message(&Value::Object(body), ReplyHeaders { ticket, clock }, exchange, routing_key)
}

/// The headers of a request, in kombu's key order (fixture e01): the sender's clock and when
/// the request stops mattering (Unix seconds).
#[derive(Serialize)]
struct RequestHeaders {
    clock: u64,
    expires: f64,
}

/// The properties kombu gives a broadcast request (fixture e01), in its key order.
#[derive(Serialize)]
struct RequestProperties<'a> {
    delivery_mode: u8,
    delivery_info: kombu::DeliveryInfo<'a>,
    priority: u8,
    body_encoding: &'static str,
    delivery_tag: String,
}

/// A broadcast request as `celery inspect` (kombu's `Mailbox._broadcast`) writes it: `method`
/// with `arguments` to every node, replies to `reply.celery.pidbox` with `reply_key`, under
/// `ticket`; `expires` is Unix seconds (fixture e01 is Celery's own `hello`).
pub fn request_message(
    method: &str,
    arguments: Map<String, Value>,
    ticket: &str,
    reply_key: &str,
    clock: u64,
    expires: f64,
) -> Vec<u8> {
    let mut body = Map::new();
    body.insert("method".into(), method.into());
    body.insert("arguments".into(), Value::Object(arguments));
    body.insert("destination".into(), Value::Null);
    body.insert("pattern".into(), Value::Null);
    body.insert("matcher".into(), Value::Null);
    body.insert("ticket".into(), ticket.into());
    let mut reply_to = Map::new();
    reply_to.insert("exchange".into(), super::keys::PIDBOX_REPLY_EXCHANGE.into());
    reply_to.insert("routing_key".into(), reply_key.into());
    body.insert("reply_to".into(), Value::Object(reply_to));
    let properties = RequestProperties {
        delivery_mode: 2,
        delivery_info: kombu::DeliveryInfo { exchange: super::keys::PIDBOX_EXCHANGE, routing_key: "" },
        priority: 0,
        body_encoding: "base64",
        delivery_tag: super::task_write::new_uuid(),
    };
    super::pyjson::to_vec(&kombu::Envelope::json(&Value::Object(body), RequestHeaders { clock, expires }, properties))
}

/// A reply read back: the request's ticket (from the headers) and `{node: reply}`.
#[derive(Debug, PartialEq)]
pub struct Reply {
    pub ticket: Option<String>,
    pub clock: u64,
    pub replies: Map<String, Value>,
}

/// Read a reply message (fixture e11). Errors say what was wrong.
pub fn read_reply(bytes: &[u8]) -> Result<Reply, String> {
    let env: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON ({e})"))?;
    let env = env.as_object().ok_or("not a kombu envelope (JSON object)")?;
    let raw = kombu::decode_body(env, MAX_REQUEST_BYTES).map_err(|e| e.to_string())?;
    let body: Value = serde_json::from_slice(&raw).map_err(|e| format!("body is not JSON ({e})"))?;
    let Value::Object(replies) = body else { return Err("body is not a JSON object".into()) };
    let headers = env.get("headers");
    let ticket = headers.and_then(|h| h.get("ticket")).and_then(Value::as_str).map(str::to_owned);
    let clock = headers.and_then(|h| h.get("clock")).and_then(Value::as_u64).unwrap_or(0);
    Ok(Reply { ticket, clock, replies })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{keys, pyjson};
    use serde_json::json;

    #[test]
    fn reads_the_captured_ping() {
        let raw = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/celery/events/e08__0.celery.pidbox.ping.json"
        ))
        .unwrap();
        let req = read_request(&raw).unwrap();
        assert_eq!(req.method, "ping");
        assert_eq!(req.clock, 1);
        assert_eq!(req.reply_to.as_ref().unwrap().0, "reply.celery.pidbox");
        assert!(req.ticket.is_some());
    }

    #[test]
    fn ping_reply_is_byte_identical_to_pythons_but_the_delivery_tag() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/celery/events/e11_reply.celery.pidbox.ping-reply.json"
        );
        let theirs: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let ticket = theirs["headers"]["ticket"].as_str().unwrap();
        let rk = theirs["properties"]["delivery_info"]["routing_key"].as_str().unwrap();
        let ours =
            reply_message("probe1@testhost", keys::PIDBOX_REPLY_EXCHANGE, rk, Some(ticket), 3, json!({"ok": "pong"}));
        let mut ours: Value = serde_json::from_slice(&ours).unwrap();
        ours["properties"]["delivery_tag"] = theirs["properties"]["delivery_tag"].clone();
        assert_eq!(pyjson::to_string(&ours), pyjson::to_string(&theirs));
    }

    #[test]
    fn hello_request_is_byte_identical_to_celerys_but_the_delivery_tag() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/celery/events/e01__0.celery.pidbox.hello.json");
        let raw = std::fs::read(path).unwrap();
        let theirs: Value = serde_json::from_slice(&raw).unwrap();
        let req = read_request(&raw).unwrap();
        let (_, rk) = req.reply_to.clone().unwrap();
        let expires = theirs["headers"]["expires"].as_f64().unwrap();
        let ours = request_message("hello", req.arguments.clone(), req.ticket.as_deref().unwrap(), &rk, 1, expires);
        let mut ours: Value = serde_json::from_slice(&ours).unwrap();
        ours["properties"]["delivery_tag"] = theirs["properties"]["delivery_tag"].clone();
        assert_eq!(pyjson::to_string(&ours), pyjson::to_string(&theirs));
    }

    #[test]
    fn replies_read_back() {
        let msg = reply_message("a@h", keys::PIDBOX_REPLY_EXCHANGE, "k", Some("t1"), 7, json!({"revoked": ["x"]}));
        let r = read_reply(&msg).unwrap();
        assert_eq!((r.ticket.as_deref(), r.clock), (Some("t1"), 7));
        assert_eq!(r.replies["a@h"]["revoked"], json!(["x"]));
        assert!(
            read_reply(b"[]").is_err()
                && read_reply(b"{\"body\": \"WzFd\", \"properties\": {\"body_encoding\": \"base64\"}}").is_err()
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &b""[..],
            b"null",
            b"[]",
            b"{}",
            b"{\"body\": 5}",
            b"{\"body\": \"!!\", \"properties\": {\"body_encoding\": \"base64\"}}",
            b"{\"body\": \"e30=\", \"properties\": {\"body_encoding\": \"base64\"}}",
            b"{\"body\": \"{\\\"method\\\": 1}\"}",
        ] {
            assert!(read_request(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
