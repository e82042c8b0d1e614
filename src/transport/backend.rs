//! Celery's Redis result backend (celery-wire.md §2): `SETEX celery-task-meta-<id>` and
//! `PUBLISH` on the same name, atomically, never replacing a stored SUCCESS (the `store` of
//! [`crate::transport::scripts`]).

use crate::transport::connection::Conn;
use crate::transport::scripts;
use crate::wire::ResultMeta;
use crate::wire::keys;
use redis::{AsyncCommands, RedisResult, Script};
use serde_json::Value;
use std::time::Duration;

/// Celery's `result_expires` default: one day.
pub const DEFAULT_RESULT_EXPIRES: Duration = Duration::from_secs(86_400);

/// The broker's database number when the broker and the result backend are databases of one
/// Redis server (same address and credentials), so a result and its ack can travel together.
pub fn shared_broker_db(broker_url: &str, backend_url: &str) -> Option<i64> {
    if !crate::transport::redis_url::same_server(broker_url, backend_url) {
        return None;
    }
    crate::transport::redis_url::db_of(broker_url)
}

/// Outcome of a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    Written,
    /// A SUCCESS was already there (a redelivered duplicate finished first); left as is.
    KeptSuccess,
}

/// How long the first claim on a chord's body lasts, in seconds: Celery's
/// `max(5, int(result_chord_join_timeout * 2))` with the default join timeout of 3 s.
pub const CHORD_CLAIM_EXPIRES: u64 = 6;
/// The claim while the body is sent: Celery's estimate of its publish retries with the
/// default `task_publish_retry_policy` and `broker_connection_timeout` (21 s).
pub const CHORD_PUBLISH_CLAIM_EXPIRES: u64 = 21;
/// How long `.c` says `done` after the body was sent: `max(claim * 2, 300)`.
pub const CHORD_DONE_EXPIRES: u64 = 300;

/// A chord header task's result, to count in its chord's join.
#[derive(Clone, Debug, PartialEq)]
pub struct ChordPart {
    pub group_id: String,
    pub task_id: String,
    /// `wire::chord::part_score` of its `group_index`.
    pub score: String,
    /// `wire::chord::part_entry`.
    pub entry: Vec<u8>,
}

/// What counting a part decided.
#[derive(Clone, Debug, PartialEq)]
pub enum PartReturned {
    /// The chord was already completed and cleaned up: a late duplicate.
    AlreadyDone,
    /// Counted; the chord is not complete, or another worker claimed its body.
    Counted { count: i64, expected: Option<i64> },
    /// This worker claimed the body (with `token`): the header's entries in join order, and
    /// whether the producer saved a group result (a header holding groups).
    Claimed { token: String, entries: Vec<Vec<u8>>, nested: bool },
}

#[derive(Clone)]
pub struct Backend {
    conn: Conn,
    expires: Duration,
    store: Script,
    store_revoked: Script,
    chord_part: Script,
    chord_extend: Script,
    chord_cleanup: Script,
    /// The join's sorted-set form (Celery's default `result_chord_ordered`), else the list.
    chord_ordered: bool,
    /// See [`shared_broker_db`]; `None` when the broker is elsewhere.
    broker_db: Option<i64>,
}

/// A store to run inside the broker's [`crate::transport::broker::Broker::finish`] script (broker and
/// backend share a server): the result key, its database, the meta and the ttl.
#[derive(Clone, Debug)]
pub struct SharedStore {
    pub key: String,
    pub db: i64,
    pub meta: Vec<u8>,
    pub ttl: u64,
}

impl Backend {
    /// `expires` of zero stores without a TTL (Celery's `result_expires=None`).
    pub fn new(conn: Conn, expires: Duration) -> Self {
        Backend {
            conn,
            expires,
            store: Script::new(scripts::STORE),
            store_revoked: Script::new(scripts::STORE_REVOKED_IF_WAITING),
            chord_part: Script::new(scripts::CHORD_PART),
            chord_extend: Script::new(scripts::CHORD_EXTEND_CLAIM),
            chord_cleanup: Script::new(scripts::CHORD_CLEANUP),
            chord_ordered: true,
            broker_db: None,
        }
    }

    /// Join chords in a list instead of a sorted set (Celery's
    /// `result_backend_transport_options={'result_chord_ordered': False}`); a join key that
    /// exists keeps its form either way.
    pub fn with_chord_ordered(mut self, ordered: bool) -> Self {
        self.chord_ordered = ordered;
        self
    }

    /// Store together with the ack ([`Backend::shared_store`]) when the broker is database
    /// `broker_db` of this backend's server (see [`shared_broker_db`]).
    pub fn with_shared_broker(mut self, broker_db: Option<i64>) -> Self {
        self.broker_db = broker_db;
        self
    }

    /// The store of `meta` as the broker's finish script runs it, or `None` when the broker is
    /// on another server (then [`Backend::store`] first, and acknowledge after).
    pub fn shared_store(&self, meta: &ResultMeta) -> Option<SharedStore> {
        self.broker_db?;
        Some(SharedStore {
            key: keys::result_key(&meta.task_id),
            db: self.conn.db(),
            meta: meta.to_json(),
            ttl: self.expires.as_secs(),
        })
    }

    pub async fn store(&self, meta: &ResultMeta) -> RedisResult<Stored> {
        let written: i64 = self
            .store
            .key(keys::result_key(&meta.task_id))
            .arg(meta.to_json())
            .arg(self.expires.as_secs())
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(if written == 1 { Stored::Written } else { Stored::KeptSuccess })
    }

    /// Count a chord header task's result and, when it completes the chord, claim its body
    /// ([`scripts::CHORD_PART`]). The join keys expire after `result_expires` (Celery's
    /// `result_chord_expires` default), the group key no sooner.
    pub async fn chord_part_return(&self, part: &ChordPart) -> RedisResult<PartReturned> {
        let k = keys::chord_keys(&part.group_id);
        let token = crate::wire::task_write::new_uuid().replace('-', "");
        let expires = self.expires.as_secs();
        let reply: Vec<redis::Value> = self
            .chord_part
            .key(&k.join)
            .key(&k.extra)
            .key(&k.size)
            .key(&k.seen)
            .key(&k.group)
            .key(&k.claim)
            .arg(&part.task_id)
            .arg(&part.entry)
            .arg(if self.chord_ordered { "1" } else { "0" })
            .arg(&part.score)
            .arg(expires)
            .arg(expires)
            .arg(CHORD_CLAIM_EXPIRES)
            .arg(&token)
            .invoke_async(&mut self.conn.clone())
            .await?;
        let int = |i: usize| match reply.get(i) {
            Some(redis::Value::Int(n)) => Some(*n),
            _ => None,
        };
        let bad = || redis::RedisError::from((redis::ErrorKind::UnexpectedReturnType, "unexpected chord script reply"));
        let count = int(0).ok_or_else(bad)?;
        if count == -1 {
            return Ok(PartReturned::AlreadyDone);
        }
        let (extra, size, claimed) = (int(1).ok_or_else(bad)?, int(2).ok_or_else(bad)?, int(3).ok_or_else(bad)?);
        if claimed != 1 {
            let expected = (size >= 0).then(|| size.saturating_add(extra));
            return Ok(PartReturned::Counted { count, expected });
        }
        let nested = int(4).ok_or_else(bad)? == 1;
        let entries = reply[5..]
            .iter()
            .map(|v| match v {
                redis::Value::BulkString(b) => Ok(b.clone()),
                _ => Err(bad()),
            })
            .collect::<RedisResult<Vec<_>>>()?;
        Ok(PartReturned::Claimed { token, entries, nested })
    }

    /// Extend the claim on a chord's body for its publish ([`scripts::CHORD_EXTEND_CLAIM`]);
    /// `false` when another worker holds it now.
    pub async fn chord_extend_claim(&self, group_id: &str, token: &str) -> RedisResult<bool> {
        let k = keys::chord_keys(group_id);
        let held: i64 = self
            .chord_extend
            .key(&k.claim)
            .key(&k.size)
            .arg(token)
            .arg(CHORD_PUBLISH_CLAIM_EXPIRES)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(held == 1)
    }

    /// After the body was sent: delete the join keys and mark the chord done
    /// ([`scripts::CHORD_CLEANUP`]); `false` when the claim was lost first.
    pub async fn chord_cleanup(&self, group_id: &str, token: &str) -> RedisResult<bool> {
        let k = keys::chord_keys(group_id);
        let cleaned: i64 = self
            .chord_cleanup
            .key(&k.claim)
            .key(&k.join)
            .key(&k.extra)
            .key(&k.size)
            .key(&k.seen)
            .arg(token)
            .arg(CHORD_DONE_EXPIRES)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(cleaned == 1)
    }

    /// Store a remote revoke's REVOKED only over no result or PENDING/RECEIVED/RETRY/REJECTED,
    /// as Celery 5.7 does ([`scripts::STORE_REVOKED_IF_WAITING`]); `false` when left as it was.
    pub async fn store_revoked_if_waiting(&self, meta: &ResultMeta) -> RedisResult<bool> {
        let written: i64 = self
            .store_revoked
            .key(keys::result_key(&meta.task_id))
            .arg(meta.to_json())
            .arg(self.expires.as_secs())
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(written == 1)
    }

    /// Celery's `set_chord_size`, for a chord this worker starts (a chord step of a chain):
    /// the header's size under `.s`, with the join keys' expiry, and any claim left by an
    /// earlier run of the same group dropped.
    pub async fn chord_set_size(&self, group_id: &str, size: usize) -> RedisResult<()> {
        let k = keys::chord_keys(group_id);
        let mut set = redis::cmd("SET");
        set.arg(&k.size).arg(size);
        if self.expires.as_secs() > 0 {
            set.arg("EX").arg(self.expires.as_secs());
        }
        redis::pipe()
            .atomic()
            .del(&k.claim)
            .ignore()
            .add_command(set)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await
    }

    /// After a chord failed: drop its size, so a late copy of a header task does not fail it
    /// again (the entries stay until they expire), as Celery does.
    pub async fn chord_drop_size(&self, group_id: &str) -> RedisResult<()> {
        self.conn.clone().del(keys::chord_keys(group_id).size).await
    }

    /// The stored result document of a task, if any and readable.
    pub async fn stored(&self, task_id: &str) -> RedisResult<Option<Value>> {
        let raw: Option<Vec<u8>> = self.conn.clone().get(keys::result_key(task_id)).await?;
        Ok(raw.and_then(|r| serde_json::from_slice::<Value>(&r).ok()))
    }

    /// The stored status of a task, if any (used to skip redelivered tasks that already succeeded).
    pub async fn status(&self, task_id: &str) -> RedisResult<Option<String>> {
        let raw: Option<Vec<u8>> = self.conn.clone().get(keys::result_key(task_id)).await?;
        Ok(raw
            .and_then(|r| serde_json::from_slice::<Value>(&r).ok())
            .and_then(|v| v.get("status")?.as_str().map(str::to_owned)))
    }
}

#[cfg(test)]
mod tests {
    use super::shared_broker_db;

    #[test]
    fn a_shared_server_only_when_both_urls_name_one() {
        assert_eq!(shared_broker_db("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/1"), Some(0));
        assert_eq!(shared_broker_db("redis://:pw@h:6379/3", "redis://:pw@h:6379/1"), Some(3));
        assert_eq!(shared_broker_db("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6380/1"), None);
        assert_eq!(shared_broker_db("redis://a:6379/0", "redis://b:6379/1"), None);
        assert_eq!(shared_broker_db("redis://:pw@h:6379/0", "redis://:other@h:6379/1"), None);
        assert_eq!(shared_broker_db("not a url", "redis://h/1"), None);
    }
}
