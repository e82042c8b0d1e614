//! Celery's Redis result backend (celery-wire.md §2): `SETEX celery-task-meta-<id>` and
//! `PUBLISH` on the same name, atomically, never replacing a stored SUCCESS.

use crate::connection::Conn;
use crate::wire::ResultMeta;
use crate::wire::keys;
use redis::{AsyncCommands, RedisResult, Script};
use serde_json::Value;
use std::time::Duration;

/// Celery's `result_expires` default: one day.
pub const DEFAULT_RESULT_EXPIRES: Duration = Duration::from_secs(86_400);

/// The store Celery does (`GET`, skip if SUCCESS, `SETEX` or `SET`, `PUBLISH`), as Lua shared by
/// the two scripts below; leaves 1 (written) or 0 (a SUCCESS kept) in `written`.
macro_rules! store_lua {
    () => {
        r"
local written = 1
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, meta = pcall(cjson.decode, cur)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then written = 0 end
end
if written == 1 then
  local ttl = tonumber(ARGV[2])
  if ttl and ttl > 0 then redis.call('SETEX', KEYS[1], ttl, ARGV[1]) else redis.call('SET', KEYS[1], ARGV[1]) end
  redis.call('PUBLISH', KEYS[1], ARGV[1])
end
"
    };
}

/// The store as one atomic script, so two workers finishing the same redelivered task cannot
/// overwrite a SUCCESS.
const STORE: &str = concat!(store_lua!(), "return written\n");

/// The store, then the ack (`ZREM unacked_index`, `HDEL unacked`) in the broker's database of
/// the same server: one round trip instead of two. A script may SELECT another database for
/// its own commands (the caller's connection keeps its own). If the store fails the script
/// stops before the ack, so the message is never acknowledged without its result.
/// KEYS: result key, `unacked`, `unacked_index`. ARGV: meta, ttl, delivery tag, broker db.
const STORE_AND_ACK: &str = concat!(
    store_lua!(),
    r"
redis.call('SELECT', ARGV[4])
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('HDEL', KEYS[2], ARGV[3])
return written
"
);

/// The broker's database number when the broker and the result backend are databases of one
/// Redis server (same address and credentials), so a result and its ack can travel together.
pub fn shared_broker_db(broker_url: &str, backend_url: &str) -> Option<i64> {
    let broker = redis::Client::open(broker_url).ok()?;
    let backend = redis::Client::open(backend_url).ok()?;
    let (b, r) = (broker.get_connection_info(), backend.get_connection_info());
    let (bs, rs) = (b.redis_settings(), r.redis_settings());
    (b.addr() == r.addr() && bs.username() == rs.username() && bs.password() == rs.password()).then(|| bs.db())
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
    store_and_ack: Script,
    /// See [`shared_broker_db`]; `None` when the broker is elsewhere.
    broker_db: Option<i64>,
}

impl Backend {
    /// `expires` of zero stores without a TTL (Celery's `result_expires=None`).
    pub fn new(conn: Conn, expires: Duration) -> Self {
        Backend { conn, expires, store: Script::new(STORE), store_and_ack: Script::new(STORE_AND_ACK), broker_db: None }
    }

    /// Acknowledge together with the store ([`Backend::store_and_ack`]) when the broker is
    /// database `broker_db` of this backend's server (see [`shared_broker_db`]).
    pub fn with_shared_broker(mut self, broker_db: Option<i64>) -> Self {
        self.broker_db = broker_db;
        self
    }

    /// Whether [`Backend::store_and_ack`] can acknowledge.
    pub fn shares_broker(&self) -> bool {
        self.broker_db.is_some()
    }

    /// Store a result and, in the same atomic script, acknowledge the message `tag`. Returns
    /// `None` without doing anything when the broker is on another server (store, then ack,
    /// separately).
    pub async fn store_and_ack(&self, meta: &ResultMeta, tag: &str) -> RedisResult<Option<Stored>> {
        let Some(db) = self.broker_db else { return Ok(None) };
        let written: i64 = self
            .store_and_ack
            .key(keys::result_key(&meta.task_id))
            .key(keys::UNACKED)
            .key(keys::UNACKED_INDEX)
            .arg(meta.to_json())
            .arg(self.expires.as_secs())
            .arg(tag)
            .arg(db)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(Some(if written == 1 { Stored::Written } else { Stored::KeptSuccess }))
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
    fn store_and_ack_only_when_both_urls_name_one_server() {
        assert_eq!(shared_broker_db("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/1"), Some(0));
        assert_eq!(shared_broker_db("redis://:pw@h:6379/3", "redis://:pw@h:6379/1"), Some(3));
        assert_eq!(shared_broker_db("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6380/1"), None);
        assert_eq!(shared_broker_db("redis://a:6379/0", "redis://b:6379/1"), None);
        assert_eq!(shared_broker_db("redis://:pw@h:6379/0", "redis://:other@h:6379/1"), None);
        assert_eq!(shared_broker_db("not a url", "redis://h/1"), None);
    }
}
