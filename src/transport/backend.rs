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

#[derive(Clone)]
pub struct Backend {
    conn: Conn,
    expires: Duration,
    store: Script,
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
        Backend { conn, expires, store: Script::new(scripts::STORE), broker_db: None }
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
