//! Celery's mingle at start-up: before it consumes, a worker asks its peers `hello` (a
//! broadcast pidbox command carrying its node name and its own revoked ids) and merges the
//! revoked ids and the Lamport clock each peer answers with — so a worker an autoscaler has
//! just started knows the revokes its fleet heard before it existed. The answering side is
//! `hello` in [`super::control`].
//!
//! The request and its reply queue are kombu's `Mailbox._broadcast`: the reply queue
//! `<uuid>.reply.celery.pidbox` is bound to the direct exchange `reply.celery.pidbox` (a member
//! of `_kombu.binding.reply.celery.pidbox`), the request is published on the pidbox fanout
//! channel, and replies are collected from the queue for [`WAIT`] (Celery's `inspect(timeout=1.0)`),
//! then the binding and the queue are removed. No reply means no peers: the worker starts as
//! it would have.

use super::control::WorkerState;
use crate::transport::connection::Conn;
use crate::wire::keys;
use crate::wire::pidbox;
use crate::wire::task_write::new_uuid;
use redis::AsyncCommands;
use serde_json::{Map, Value};
use std::time::{Duration, Instant};

/// How long replies are collected: Celery's mingle asks with `inspect(timeout=1.0)`.
pub const WAIT: Duration = Duration::from_secs(1);

/// What a mingle round found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Synced {
    /// Peers that answered.
    pub nodes: Vec<String>,
    /// Revoked ids merged (counted with repeats across peers).
    pub revoked: usize,
}

/// Ask the peers `hello` and merge what they answer into `state`. An error is Redis's (the
/// caller logs it and starts anyway, as Celery logs a failed sync and goes on).
pub async fn sync(state: &WorkerState, broker: &Conn, wait: Duration) -> redis::RedisResult<Synced> {
    let mut conn = broker.clone();
    let reply_key = new_uuid();
    let ticket = new_uuid();
    let reply_queue = keys::pidbox_reply_queue(&reply_key);
    let binding = keys::binding_member(&reply_key, "", &reply_queue);
    let reply_queue = keys::queue_key(&reply_queue);
    let binding_set = keys::binding_set(keys::PIDBOX_REPLY_EXCHANGE);
    let _: i64 = conn.sadd(&binding_set, &binding).await?;
    let collected = async {
        let mut args = Map::new();
        args.insert("from_node".into(), state.node().into());
        // The ids only, oldest first, as Celery 5.7 sends them.
        args.insert("revoked".into(), state.revoked.ids().into());
        let expires = crate::wire::time::unix_seconds(chrono::Utc::now()) + wait.as_secs_f64();
        let clock = state.events.forward_clock();
        let request = pidbox::request_message("hello", args, &ticket, &reply_key, clock, expires);
        let channel = keys::fanout_channel(broker.db(), keys::PIDBOX_EXCHANGE, None);
        let _: i64 = conn.publish(&channel, &request).await?;
        let mut synced = Synced::default();
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            let popped: Option<Vec<u8>> = conn.rpop(&reply_queue, None).await?;
            let Some(bytes) = popped else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let reply = match pidbox::read_reply(&bytes) {
                Ok(r) if r.ticket.as_deref() == Some(ticket.as_str()) => r,
                Ok(_) => continue,
                Err(why) => {
                    tracing::warn!(reason = %why, "mingle: ignored an unreadable reply");
                    continue;
                }
            };
            for (node, answer) in reply.replies {
                if node == state.node() {
                    continue;
                }
                let Value::Object(answer) = answer else { continue };
                synced.revoked += merge(state, &answer);
                synced.nodes.push(node);
            }
        }
        Ok::<_, redis::RedisError>(synced)
    }
    .await;
    // Remove the reply queue's binding and the queue, whatever happened (kombu leaves them to
    // expire; a worker that starts often would otherwise grow the binding set).
    let _: redis::RedisResult<i64> = conn.srem(&binding_set, &binding).await;
    let _: redis::RedisResult<i64> = conn.del(&reply_queue).await;
    collected
}

/// Celery's `sync_with_node`: adjust the clock (or forward it), merge the revoked ids (a list,
/// or the id → time mapping older workers send; the ids are stamped with the local time, as
/// Celery 5.7's `merge_revoked` does). Returns how many ids came.
fn merge(state: &WorkerState, answer: &Map<String, Value>) -> usize {
    match answer.get("clock").and_then(Value::as_u64) {
        Some(c) if c > 0 => {
            state.events.adjust_clock(c);
        }
        _ => {
            state.events.forward_clock();
        }
    }
    let ids: Vec<String> = match answer.get("revoked") {
        Some(Value::Object(m)) => m.keys().cloned().collect(),
        other => pidbox::maybe_list(other).unwrap_or_default(),
    };
    if !ids.is_empty() {
        state.revoked.add(&ids, false);
    }
    ids.len()
}
