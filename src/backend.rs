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

/// The store Celery does (`GET`, skip if SUCCESS, `SETEX` or `SET`, `PUBLISH`) as one atomic
/// script, so two workers finishing the same redelivered task cannot overwrite a SUCCESS.
const STORE: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, meta = pcall(cjson.decode, cur)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then return 0 end
end
local ttl = tonumber(ARGV[2])
if ttl and ttl > 0 then redis.call('SETEX', KEYS[1], ttl, ARGV[1]) else redis.call('SET', KEYS[1], ARGV[1]) end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
";

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
}

impl Backend {
    /// `expires` of zero stores without a TTL (Celery's `result_expires=None`).
    pub fn new(conn: Conn, expires: Duration) -> Self {
        Backend { conn, expires, store: Script::new(STORE) }
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
