//! The kombu Redis transport, byte for byte (celery-wire.md §1): BRPOP over every queue and
//! priority list, `unacked`/`unacked_index` bookkeeping, visibility-timeout restore under
//! `unacked_mutex`, and putting messages back at the front of their queue. Python workers and
//! ours share these keys, so each restores the other's orphans.

use crate::wire::UnackedEntry;
use crate::wire::keys::{self, PrioritySteps};
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, RedisResult, Script};
use std::time::Duration;

/// kombu's `brpop_timeout`: how long one BRPOP blocks before the loop looks around again.
pub const BRPOP_TIMEOUT: Duration = Duration::from_secs(1);

/// Move one `unacked` entry back to a queue if it is still the value we read — the same effect
/// as kombu's `WATCH unacked; HGET; MULTI; ZREM; HDEL; RPUSH; EXEC`, in one atomic step that is
/// safe on a multiplexed connection.
const MOVE_BACK: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
if ARGV[4] == 'front' then redis.call('RPUSH', KEYS[3], ARGV[3]) else redis.call('LPUSH', KEYS[3], ARGV[3]) end
return 1
";

/// redis-py's Lock release: delete the mutex only if we still own it.
const RELEASE_MUTEX: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Where a message goes back to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The consuming end (RPUSH): next to be taken. Restores and warm shutdown use this.
    Front,
    /// The producing end (LPUSH): behind everything queued (kombu's `leftmost=True` reject).
    Back,
}

/// What a `restore_visible` round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Another consumer held `unacked_mutex`; nothing was examined.
    pub skipped_locked: bool,
    pub restored: usize,
    /// Entries that could not be routed (unparseable, or a non-direct exchange with no binding).
    pub unroutable: usize,
}

/// The broker side of the transport: everything except the blocking fetch.
#[derive(Clone)]
pub struct Broker {
    conn: ConnectionManager,
    steps: PrioritySteps,
    move_back: Script,
    release_mutex: Script,
}

impl Broker {
    pub fn new(conn: ConnectionManager, steps: PrioritySteps) -> Self {
        Broker { conn, steps, move_back: Script::new(MOVE_BACK), release_mutex: Script::new(RELEASE_MUTEX) }
    }

    pub fn steps(&self) -> &PrioritySteps {
        &self.steps
    }

    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Delivery bookkeeping: `MULTI; ZADD unacked_index <now> <tag>; HSET unacked <tag> <entry>; EXEC`.
    pub async fn record_unacked(&self, tag: &str, entry: &[u8], now_unix: f64) -> RedisResult<()> {
        redis::pipe()
            .atomic()
            .zadd(keys::UNACKED_INDEX, tag, now_unix)
            .ignore()
            .hset(keys::UNACKED, tag, entry)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await
    }

    /// Ack: `MULTI; ZREM unacked_index <tag>; HDEL unacked <tag>; EXEC`.
    pub async fn ack(&self, tag: &str) -> RedisResult<()> {
        redis::pipe()
            .atomic()
            .zrem(keys::UNACKED_INDEX, tag)
            .ignore()
            .hdel(keys::UNACKED, tag)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await
    }

    /// Publish a task message to `queue` with `priority`, as a producer does (LPUSH).
    pub async fn publish(&self, queue: &str, priority: i64, message: &[u8]) -> RedisResult<()> {
        let key = self.steps.key_for(queue, priority);
        self.conn.clone().lpush(key, message).await
    }

    /// Put one held message back: remove it from `unacked` and push it to its queue with the
    /// `redelivered` flags, atomically, unless someone else already restored or acked it.
    /// Returns whether this call moved it.
    pub async fn put_back(&self, tag: &str, entry: &[u8], end: End) -> RedisResult<bool> {
        let parsed = match UnackedEntry::parse(entry) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(delivery_tag = tag, error = %e, "cannot put back an unreadable unacked entry; leaving it for the visibility timeout");
                return Ok(false);
            }
        };
        let Some(queue) = self.route(&parsed).await? else { return Ok(false) };
        self.move_entry(tag, entry, &parsed, &queue, end).await
    }

    async fn move_entry(
        &self,
        tag: &str,
        entry: &[u8],
        parsed: &UnackedEntry,
        queue: &str,
        end: End,
    ) -> RedisResult<bool> {
        let key = self.steps.key_for(queue, parsed.priority());
        let moved: i64 = self
            .move_back
            .key(keys::UNACKED)
            .key(keys::UNACKED_INDEX)
            .key(&key)
            .arg(tag)
            .arg(entry)
            .arg(parsed.redelivered_payload())
            .arg(if end == End::Front { "front" } else { "back" })
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(moved == 1)
    }

    /// The queue an unacked entry returns to: the routing key for the anonymous exchange
    /// (what Celery and this worker write); otherwise kombu's binding table
    /// `_kombu.binding.<exchange>` (members `routing_key␆␖pattern␆␖queue`), where an empty
    /// pattern means a direct match and a pattern is a topic regex.
    async fn route(&self, entry: &UnackedEntry) -> RedisResult<Option<String>> {
        if entry.exchange.is_empty() {
            return Ok(Some(entry.routing_key.clone()));
        }
        let members: Vec<String> =
            self.conn.clone().smembers(format!("{}{}", keys::BINDING_PREFIX, entry.exchange)).await?;
        for member in &members {
            let parts: Vec<&str> = member.split(keys::PRIORITY_SEP).collect();
            let [rk, pattern, queue] = parts[..] else { continue };
            let matches = if pattern.is_empty() {
                rk == entry.routing_key
            } else {
                regex::Regex::new(pattern).is_ok_and(|re| re.is_match(&entry.routing_key))
            };
            if matches {
                return Ok(Some(queue.to_owned()));
            }
        }
        tracing::warn!(exchange = %entry.exchange, routing_key = %entry.routing_key, "no binding routes this unacked message; leaving it in place");
        Ok(None)
    }

    /// kombu's `restore_visible`: under `unacked_mutex`, return every message delivered more
    /// than `visibility_timeout` ago to the front of its queue, newest first (so the oldest is
    /// consumed first).
    pub async fn restore_visible(&self, visibility_timeout: Duration, now_unix: f64) -> RedisResult<RestoreReport> {
        let mut conn = self.conn.clone();
        let token = uuid::Uuid::new_v4().simple().to_string();
        let locked: Option<String> = redis::cmd("SET")
            .arg(keys::UNACKED_MUTEX)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(keys::UNACKED_MUTEX_EXPIRE_MS)
            .query_async(&mut conn)
            .await?;
        if locked.is_none() {
            return Ok(RestoreReport { skipped_locked: true, ..Default::default() });
        }
        let result = self.restore_locked(visibility_timeout, now_unix).await;
        let _: RedisResult<i64> = self.release_mutex.key(keys::UNACKED_MUTEX).arg(&token).invoke_async(&mut conn).await;
        result
    }

    async fn restore_locked(&self, visibility_timeout: Duration, now_unix: f64) -> RedisResult<RestoreReport> {
        let mut conn = self.conn.clone();
        let ceiling = now_unix - visibility_timeout.as_secs_f64();
        let tags: Vec<(String, f64)> = conn.zrevrangebyscore_withscores(keys::UNACKED_INDEX, ceiling, 0).await?;
        let mut report = RestoreReport::default();
        for (tag, _score) in tags {
            let entry: Option<Vec<u8>> = conn.hget(keys::UNACKED, &tag).await?;
            let Some(entry) = entry else {
                // Index without payload (acked between our reads, or a crash mid-ack): drop the index entry like kombu.
                let _: i64 = conn.zrem(keys::UNACKED_INDEX, &tag).await?;
                continue;
            };
            let parsed = match UnackedEntry::parse(&entry) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(delivery_tag = %tag, error = %e, "unacked entry is unreadable; leaving it for inspection");
                    report.unroutable += 1;
                    continue;
                }
            };
            match self.route(&parsed).await? {
                Some(queue) => {
                    if self.move_entry(&tag, &entry, &parsed, &queue, End::Front).await? {
                        report.restored += 1;
                    }
                }
                None => report.unroutable += 1,
            }
        }
        Ok(report)
    }

    /// Keep the raw bytes of a message nobody can identify (not JSON, no task id) in a capped
    /// list instead of dropping them.
    pub async fn dead_letter(&self, raw: &[u8]) -> RedisResult<()> {
        redis::pipe()
            .lpush(keys::DEAD_LETTER, raw)
            .ignore()
            .ltrim(keys::DEAD_LETTER, 0, keys::DEAD_LETTER_MAX - 1)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await
    }
}

/// The consuming end: BRPOP on a connection of its own, so a blocked read never delays acks
/// and results.
pub struct Fetcher {
    conn: ConnectionManager,
    keys: Vec<String>,
}

impl Fetcher {
    /// `conn` must have a response timeout longer than [`BRPOP_TIMEOUT`].
    pub fn new(conn: ConnectionManager, queues: &[String], steps: &PrioritySteps) -> Self {
        Fetcher { conn, keys: steps.brpop_keys(queues) }
    }

    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// One `BRPOP k1 k2 … 1`: `Some((list key, message))`, or `None` after a quiet second.
    /// Never cancel this future: a message popped by Redis whose reply is dropped is lost.
    pub async fn fetch(&mut self) -> RedisResult<Option<(String, Vec<u8>)>> {
        redis::cmd("BRPOP").arg(&self.keys).arg(BRPOP_TIMEOUT.as_secs()).query_async(&mut self.conn).await
    }
}
