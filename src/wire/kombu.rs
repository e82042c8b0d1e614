//! kombu's message envelope over Redis, both ways, for every kind of message the project
//! sends or reads: task messages ([`super::task_write`] / [`super::task_read`]), events
//! (`crate::worker::events`), remote-control requests and replies ([`super::pidbox`]), and the
//! `unacked` entries of kombu's ack emulation (§1.4).
//!
//! An envelope is a JSON object `{body, content-encoding, content-type, headers, properties}`
//! whose `body` is the payload, JSON-encoded and then base64-encoded when
//! `properties.body_encoding` is `base64` (always, for what kombu writes over Redis). The kinds
//! differ only in their headers and properties; this module writes the envelope around them
//! (`exchange_message`) and reads the body back out ([`decode_body`]).

use super::pyjson;
use super::task_read::TaskMessage;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Serialize;
use serde_json::{Map, Value};
use std::fmt;
use std::io::Read as _;

// ---- writing

/// A kombu envelope around a JSON body, serialised in kombu's key order; task messages, events
/// and pidbox replies differ only in their headers and properties.
#[derive(Serialize)]
pub(crate) struct Envelope<H, P> {
    body: String,
    #[serde(rename = "content-encoding")]
    content_encoding: &'static str,
    #[serde(rename = "content-type")]
    content_type: &'static str,
    headers: H,
    properties: P,
}

impl<H: Serialize, P: Serialize> Envelope<H, P> {
    pub(crate) fn json(body: &impl Serialize, headers: H, properties: P) -> Self {
        Envelope {
            body: B64.encode(pyjson::to_vec(body)),
            content_encoding: "utf-8",
            content_type: "application/json",
            headers,
            properties,
        }
    }
}

/// `properties.delivery_info`.
#[derive(Serialize)]
pub(crate) struct DeliveryInfo<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
}

/// The properties kombu gives a message it publishes to a fanout or direct exchange other than
/// the task queues: events and pidbox replies (fixtures e02, e11), in kombu's key order.
#[derive(Serialize)]
struct ExchangeProperties<'a> {
    delivery_mode: u8,
    delivery_info: DeliveryInfo<'a>,
    priority: u8,
    body_encoding: &'static str,
    delivery_tag: String,
}

/// The bytes of an event or a pidbox reply: `body` in an envelope with `headers`, addressed
/// to `exchange` with `routing_key`, under a fresh delivery tag.
pub(crate) fn exchange_message(
    body: &impl Serialize,
    headers: impl Serialize,
    exchange: &str,
    routing_key: &str,
) -> Vec<u8> {
    let properties = ExchangeProperties {
        delivery_mode: 1,
        delivery_info: DeliveryInfo { exchange, routing_key },
        priority: 0,
        body_encoding: "base64",
        delivery_tag: super::task_write::new_uuid(),
    };
    pyjson::to_vec(&Envelope::json(body, headers, properties))
}

// ---- reading

/// Why an envelope's body could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BodyError {
    /// `body` is missing or not a string.
    NotAString,
    /// `body_encoding` is base64 but the body is not.
    BadBase64(String),
    /// A `body_encoding` other than base64 or none.
    UnsupportedEncoding(String),
    /// A `compression` header other than zlib.
    UnsupportedCompression(String),
    /// A zlib body that does not inflate.
    Inflate(String),
    /// A zlib body that inflates beyond the limit.
    TooLarge(usize),
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::NotAString => f.write_str("body is not a string"),
            BodyError::BadBase64(e) => write!(f, "body is not valid base64 ({e})"),
            BodyError::UnsupportedEncoding(e) => write!(f, "body_encoding {e:?} is not supported"),
            BodyError::UnsupportedCompression(c) => write!(f, "compression {c:?} is not supported (zlib is)"),
            BodyError::Inflate(e) => write!(f, "compressed body does not inflate ({e})"),
            BodyError::TooLarge(max) => write!(f, "compressed body inflates beyond {max} bytes"),
        }
    }
}

/// The payload bytes of an envelope: `body` base64-decoded when `properties.body_encoding`
/// says so, then inflated when `headers.compression` is zlib (at most `max_bytes`, so a zlib
/// bomb stops there). The bytes are the JSON the sender serialised; the caller parses them.
pub fn decode_body(envelope: &Map<String, Value>, max_bytes: usize) -> Result<Vec<u8>, BodyError> {
    let body = envelope.get("body").and_then(Value::as_str).ok_or(BodyError::NotAString)?;
    let properties = envelope.get("properties");
    let encoded = match properties.and_then(|p| p.get("body_encoding")).and_then(Value::as_str) {
        Some("base64") => B64.decode(body.trim()).map_err(|e| BodyError::BadBase64(e.to_string()))?,
        None => body.as_bytes().to_vec(),
        Some(other) => return Err(BodyError::UnsupportedEncoding(other.to_owned())),
    };
    match envelope.get("headers").and_then(|h| h.get("compression")).and_then(Value::as_str) {
        None => Ok(encoded),
        // kombu registers zlib under this MIME type (`compression='zlib'` or 'gzip').
        Some("application/x-gzip" | "zlib") => {
            let mut out = Vec::new();
            flate2::read::ZlibDecoder::new(&encoded[..])
                .take(max_bytes as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| BodyError::Inflate(e.to_string()))?;
            if out.len() > max_bytes {
                return Err(BodyError::TooLarge(max_bytes));
            }
            Ok(out)
        }
        Some(other) => Err(BodyError::UnsupportedCompression(other.to_owned())),
    }
}

// ---- unacked entries (kombu's ack emulation)

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
    out.extend_from_slice(UNACKED_SEP);
    out.extend_from_slice(&queue_json);
    out.push(b']');
    out
}

/// Between the envelope and the queue in the entries [`unacked_entry`] writes: the anonymous
/// exchange, as Python's `json.dumps` separates it.
const UNACKED_SEP: &[u8] = b", \"\", ";

/// The inverse of [`unacked_entry`] without parsing the message: its envelope bytes, exactly
/// as taken, and the queue. `None` when `entry` is not in that shape.
pub fn split_unacked_entry(entry: &[u8]) -> Option<(&[u8], String)> {
    let inner = entry.strip_prefix(b"[")?.strip_suffix(b"]")?;
    // The queue name is JSON, whose escaping cannot produce the separator: the last one is it.
    let at = inner.windows(UNACKED_SEP.len()).rposition(|w| w == UNACKED_SEP)?;
    let queue: String = serde_json::from_slice(&inner[at + UNACKED_SEP.len()..]).ok()?;
    Some((&inner[..at], queue))
}

/// A parsed `unacked` value, from any kombu consumer: `[envelope, exchange, routing_key]`.
#[derive(Clone, Debug, PartialEq)]
pub struct UnackedEntry {
    pub envelope: Map<String, Value>,
    pub exchange: String,
    pub routing_key: String,
}

impl UnackedEntry {
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let shape = || "unacked entry is not [envelope, exchange, routing_key]".to_owned();
        let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("unacked entry is not JSON ({e})"))?;
        let Value::Array(a) = v else { return Err(shape()) };
        let [Value::Object(envelope), Value::String(exchange), Value::String(routing_key)] =
            <[Value; 3]>::try_from(a).map_err(|_| shape())?
        else {
            return Err(shape());
        };
        Ok(UnackedEntry { envelope, exchange, routing_key })
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_unacked_entry_splits_back_into_the_bytes_taken_and_the_queue() {
        let envelope = br#"{"body": "W1tdLCB7fSwge31d", "headers": {"x": ["a", "", "b"]}}"#;
        let mut entry = b"[".to_vec();
        entry.extend_from_slice(envelope);
        entry.extend_from_slice(b", \"\", \"q, \\\"\\\", 1\"]");
        let (bytes, queue) = split_unacked_entry(&entry).expect("splits");
        assert_eq!(bytes, envelope);
        assert_eq!(queue, "q, \"\", 1");
        assert_eq!(split_unacked_entry(b"[{}, \"ex\", \"q\"]"), None, "a named exchange is not a take's entry");
        assert_eq!(split_unacked_entry(b"not json"), None);
        assert_eq!(split_unacked_entry(b"[]"), None);
    }

    #[test]
    fn unacked_entries_of_any_other_shape_are_errors() {
        for bad in [&b"{}"[..], b"[]", b"[{}, \"\"]", b"[{}, 1, \"q\"]", b"[[], \"\", \"q\"]", b"[{}, \"\", \"q\", 4]"]
        {
            assert!(UnackedEntry::parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let e = UnackedEntry::parse(br#"[{"properties": {"priority": 3}}, "ex", "rk"]"#).unwrap();
        assert_eq!((e.exchange.as_str(), e.routing_key.as_str(), e.priority()), ("ex", "rk", 3));
    }

    #[test]
    fn bodies_decode_as_kombu_encodes_them() {
        let env = |body: Value, props: Value, headers: Value| {
            json!({"body": body, "properties": props, "headers": headers}).as_object().unwrap().clone()
        };
        let b64 = json!({"body_encoding": "base64"});
        assert_eq!(decode_body(&env(json!("WzFd"), b64.clone(), json!({})), 10).unwrap(), b"[1]");
        assert_eq!(decode_body(&env(json!("[1]"), json!({}), Value::Null), 10).unwrap(), b"[1]");
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut z, b"[1, 2]").unwrap();
        let zipped = B64.encode(z.finish().unwrap());
        let zlib = json!({"compression": "application/x-gzip"});
        assert_eq!(decode_body(&env(json!(zipped), b64.clone(), zlib.clone()), 10).unwrap(), b"[1, 2]");
        assert_eq!(decode_body(&env(json!(zipped), b64.clone(), zlib), 3), Err(BodyError::TooLarge(3)));
        assert_eq!(decode_body(&env(json!(5), b64.clone(), json!({})), 10), Err(BodyError::NotAString));
        assert!(matches!(decode_body(&env(json!("!!"), b64.clone(), json!({})), 10), Err(BodyError::BadBase64(_))));
        assert_eq!(
            decode_body(&env(json!("x"), json!({"body_encoding": "rot13"}), json!({})), 10),
            Err(BodyError::UnsupportedEncoding("rot13".into()))
        );
        assert_eq!(
            decode_body(&env(json!("WzFd"), b64, json!({"compression": "bz2"})), 10).unwrap_err().to_string(),
            "compression \"bz2\" is not supported (zlib is)"
        );
    }
}
