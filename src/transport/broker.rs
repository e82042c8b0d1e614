//! The kombu Redis transport, byte for byte (celery-wire.md §1): every queue and priority list in
//! kombu's BRPOP order, `unacked`/`unacked_index` bookkeeping, visibility-timeout restore under
//! `unacked_mutex`, and putting messages back at the front of their queue. Python workers and
//! ours share these keys, so each restores the other's orphans.

use crate::runtime::sync::Locked;
use crate::transport::backend::{SharedStore, Stored};
use crate::transport::connection::Conn;
use crate::transport::scripts;
use crate::wire::UnackedEntry;
use crate::wire::keys::{self, PrioritySteps};
use redis::{AsyncCommands, RedisResult, Script};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// Entries examined per restore batch (one ZRANGE and one HMGET each).
const RESTORE_BATCH: usize = 500;

/// Entries moved (or skipped) per restore round, so one round holds `unacked_mutex` for a
/// bounded time; its expiry is [`keys::UNACKED_MUTEX_EXPIRE_MS`].
const RESTORE_MAX_PER_ROUND: usize = 5_000;

/// Tags per `ZADD` of a lease renewal.
const RENEW_CHUNK: usize = 1_000;

/// kombu's `brpop_timeout`: how long one blocking wait lasts before the loop looks around again.
pub const BRPOP_TIMEOUT: Duration = Duration::from_secs(1);

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

/// How long a worker's take marker outlives its last take (a crashed worker's expires; what
/// its lost takes took comes back through the visibility timeout, as with Celery).
const MARKER_TTL_MS: u64 = 3_600_000;

/// A worker's notes of its own takes (key `keys::take_marker`, one hash per process): each take
/// script records `token → delivery tag` in it. A take whose reply never arrived (the
/// connection broke or timed out, so whether it ran is unknown) keeps its token in `lost`; the
/// fetcher looks each one up once Redis answers again ([`scripts::RECLAIM`]) and runs what it
/// took at once, instead of leaving it in `unacked` until the visibility timeout (an hour by
/// default). Tokens of takes whose replies did arrive are deleted by the next take.
#[derive(Debug)]
pub struct TakeMarker {
    key: String,
    next: AtomicU64,
    /// Tokens to delete from the hash with the next take.
    forget: std::sync::Mutex<Vec<u64>>,
    /// Tokens of takes whose replies were lost, to look up.
    lost: std::sync::Mutex<Vec<u64>>,
}

/// One take's token and the tokens its script deletes.
struct Attempt {
    token: u64,
    forget: Vec<u64>,
}

impl Attempt {
    fn forget_arg(&self) -> String {
        self.forget.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
    }
}

impl TakeMarker {
    fn new() -> Arc<Self> {
        Arc::new(TakeMarker {
            key: keys::take_marker(&uuid::Uuid::new_v4().to_string()),
            next: AtomicU64::new(1),
            forget: Default::default(),
            lost: Default::default(),
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    fn begin(&self) -> Attempt {
        let forget = std::mem::take(&mut *self.forget.locked());
        Attempt { token: self.next.fetch_add(1, Ordering::Relaxed), forget }
    }

    /// After the take's reply (or its failure).
    fn end<T>(&self, attempt: Attempt, result: &RedisResult<Option<T>>) {
        self.ended(attempt, result.as_ref().map(Option::is_some));
    }

    /// [`Self::end`] given whether the take took a message.
    fn ended(&self, attempt: Attempt, result: Result<bool, &redis::RedisError>) {
        match result {
            Ok(false) => self.forget.locked().extend(attempt.forget),
            Ok(true) => {
                let mut forget = self.forget.locked();
                forget.push(attempt.token);
            }
            Err(e) => {
                // The script may or may not have run: forget again next time (HDEL is
                // idempotent), and, if the reply was lost, look the take up.
                self.forget.locked().extend(attempt.forget);
                if crate::transport::connection::classify(e) == crate::transport::connection::Failure::Connection {
                    self.lost.locked().push(attempt.token);
                }
            }
        }
    }

    /// Whether a take's reply was lost and not yet looked up.
    pub fn has_lost(&self) -> bool {
        !self.lost.locked().is_empty()
    }
}

/// The broker side of the transport: everything except the blocking fetch.
#[derive(Clone)]
pub struct Broker {
    conn: Conn,
    steps: PrioritySteps,
    move_back: Script,
    release_mutex: Script,
    finish: Script,
    marker: Arc<TakeMarker>,
}

impl Broker {
    pub fn new(conn: Conn, steps: PrioritySteps) -> Self {
        Broker {
            conn,
            steps,
            move_back: Script::new(scripts::MOVE_BACK),
            release_mutex: Script::new(scripts::RELEASE_MUTEX),
            finish: Script::new(scripts::FINISH),
            marker: TakeMarker::new(),
        }
    }

    /// The fetcher for this broker: it shares the take marker, so it finds what a finish
    /// script's lost take took as well as its own.
    pub fn fetcher(&self, wait_conns: Vec<Conn>, lists: Arc<TakeList>) -> Fetcher {
        Fetcher::with_marker(self.conn.clone(), wait_conns, lists, self.marker.clone())
    }

    pub fn marker(&self) -> &TakeMarker {
        &self.marker
    }

    /// Delete the take marker (a clean shutdown: nothing this process took is unsettled).
    pub async fn forget_marker(&self) -> RedisResult<()> {
        self.conn.clone().del(&self.marker.key).await
    }

    pub fn steps(&self) -> &PrioritySteps {
        &self.steps
    }

    pub fn connection(&self) -> Conn {
        self.conn.clone()
    }

    /// Delivery bookkeeping: `MULTI; ZADD unacked_index <now> <tag>; HSET unacked <tag> <entry>; EXEC`.
    pub async fn record_unacked(&self, tag: &str, entry: &[u8], now_unix: f64) -> RedisResult<()> {
        redis::pipe()
            .atomic()
            .zadd(keys::unacked_index(), tag, now_unix)
            .ignore()
            .hset(keys::unacked(), tag, entry)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await
    }

    /// Ack: `MULTI; ZREM unacked_index <tag>; HDEL unacked <tag>; EXEC`.
    pub async fn ack(&self, tag: &str) -> RedisResult<()> {
        redis::pipe()
            .atomic()
            .zrem(keys::unacked_index(), tag)
            .ignore()
            .hdel(keys::unacked(), tag)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await
    }

    /// Finish a message in one round trip ([`scripts::FINISH`]): store its result when
    /// `store` is given (broker and backend share a server), acknowledge `tag`, and take the
    /// next message from `next`'s lists when given (recorded in `unacked` like any take).
    pub async fn finish(
        &self,
        tag: &str,
        store: Option<&SharedStore>,
        next: Option<&TakeList>,
        now_unix: f64,
    ) -> RedisResult<Finished> {
        let attempt = self.marker.begin();
        let result = self.finish_once(tag, store, next, now_unix, &attempt).await;
        self.marker.ended(attempt, result.as_ref().map(|f| f.next.is_some()));
        result
    }

    async fn finish_once(
        &self,
        tag: &str,
        store: Option<&SharedStore>,
        next: Option<&TakeList>,
        now_unix: f64,
        attempt: &Attempt,
    ) -> RedisResult<Finished> {
        let mut invocation = self.finish.prepare_invoke();
        invocation.key(keys::unacked()).key(keys::unacked_index()).key(store.map_or("", |s| s.key.as_str()));
        invocation.key(&self.marker.key);
        invocation.arg(tag).arg(self.conn.db());
        match store {
            Some(s) => invocation.arg(s.db).arg(&s.meta).arg(s.ttl),
            None => invocation.arg("").arg("").arg(0),
        };
        invocation.arg(now_unix).arg(attempt.token).arg(attempt.forget_arg()).arg(MARKER_TTL_MS);
        if let Some(lists) = next {
            lists.scan().add_to(&mut invocation);
        }
        let reply: Vec<redis::Value> = invocation.invoke_async(&mut self.conn.clone()).await?;
        let mut reply = reply.into_iter();
        let written: i64 = match reply.next() {
            Some(v) => redis::from_redis_value(v)?,
            None => return Err(unexpected_reply("finish")),
        };
        let stored = match written {
            1 => Some(Stored::Written),
            0 => Some(Stored::KeptSuccess),
            _ => None,
        };
        let taken = match (reply.next(), reply.next(), reply.next()) {
            (Some(key), Some(bytes), Some(tag)) => Some(Taken::from_reply(
                redis::from_redis_value(key)?,
                redis::from_redis_value(bytes)?,
                redis::from_redis_value(tag)?,
            )),
            (None, ..) => None,
            _ => return Err(unexpected_reply("finish")),
        };
        if let (Some(t), Some(lists)) = (&taken, next) {
            lists.taken_from(&t.key);
        }
        if taken.is_some() && lost_reply_for_test("finish") {
            return Err(lost_reply_error());
        }
        Ok(Finished { stored, next: taken })
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
            .key(keys::unacked())
            .key(keys::unacked_index())
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
        let members: Vec<String> = self.conn.clone().smembers(keys::binding_set(&entry.exchange)).await?;
        let bindings = members.iter().filter_map(|m| keys::Binding::parse(m));
        if let Some(b) = bindings.into_iter().find(|b| b.routes(&entry.routing_key)) {
            return Ok(Some(b.queue.to_owned()));
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
            .arg(keys::unacked_mutex())
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
        let _: RedisResult<i64> =
            self.release_mutex.key(keys::unacked_mutex()).arg(&token).invoke_async(&mut conn).await;
        result
    }

    async fn restore_locked(&self, visibility_timeout: Duration, now_unix: f64) -> RedisResult<RestoreReport> {
        let mut conn = self.conn.clone();
        let ceiling = now_unix - visibility_timeout.as_secs_f64();
        let mut report = RestoreReport::default();
        // In batches, newest first like kombu, so Redis never builds one huge reply and the
        // mutex is not held for an unbounded time with 100 000 entries due. A round stops
        // after RESTORE_MAX_PER_ROUND; the restore loop comes straight back for the rest.
        // Entries left in place (unroutable) are skipped over with the offset.
        let mut skip = 0;
        while report.restored + report.unroutable < RESTORE_MAX_PER_ROUND {
            let batch: Vec<(String, f64)> = redis::cmd("ZRANGE")
                .arg(keys::unacked_index())
                .arg(ceiling)
                .arg(0)
                .arg("BYSCORE")
                .arg("REV")
                .arg("LIMIT")
                .arg(skip)
                .arg(RESTORE_BATCH)
                .arg("WITHSCORES")
                .query_async(&mut conn)
                .await?;
            if batch.is_empty() {
                break;
            }
            let full = batch.len() == RESTORE_BATCH;
            let tags: Vec<&str> = batch.iter().map(|(t, _)| t.as_str()).collect();
            let entries: Vec<Option<Vec<u8>>> =
                redis::cmd("HMGET").arg(keys::unacked()).arg(&tags).query_async(&mut conn).await?;
            for ((tag, score), entry) in batch.iter().zip(entries) {
                let Some(entry) = entry else {
                    // Index without payload (acked between our reads, or a crash mid-ack): drop the index entry like kombu.
                    let _: i64 = conn.zrem(keys::unacked_index(), tag).await?;
                    continue;
                };
                let parsed = match UnackedEntry::parse(&entry) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!(delivery_tag = %tag, error = %e, "unacked entry is unreadable; leaving it for inspection");
                        report.unroutable += 1;
                        skip += 1;
                        continue;
                    }
                };
                match self.route(&parsed).await? {
                    Some(queue) => {
                        if self.move_entry(tag, &entry, &parsed, &queue, End::Front).await? {
                            tracing::debug!(delivery_tag = %tag, score, overdue_s = ceiling - score, "restored a message past the visibility timeout");
                            report.restored += 1;
                        }
                    }
                    None => {
                        report.unroutable += 1;
                        skip += 1;
                    }
                }
            }
            if !full {
                break;
            }
        }
        Ok(report)
    }

    /// Lease renewal: set the `unacked_index` score of each tag still present to `now_unix`
    /// (`ZADD XX`, so an entry acked or restored meanwhile is never re-added), one command per
    /// chunk, all chunks in one pipeline. Returns how many tags were renewed.
    pub async fn renew(&self, tags: &[String], now_unix: f64) -> RedisResult<usize> {
        let mut pipe = redis::pipe();
        for chunk in tags.chunks(RENEW_CHUNK) {
            let cmd = pipe.cmd("ZADD").arg(keys::unacked_index()).arg("XX").arg("CH");
            for tag in chunk {
                cmd.arg(now_unix).arg(tag);
            }
        }
        let changed: Vec<usize> = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(changed.into_iter().sum())
    }

    /// When the oldest `unacked_index` entry falls due (its score + `visibility_timeout`, Unix
    /// seconds), or `None` when nothing is unacked. O(log n).
    pub async fn next_due(&self, visibility_timeout: Duration) -> RedisResult<Option<f64>> {
        let oldest: Vec<(String, f64)> = self.conn.clone().zrange_withscores(keys::unacked_index(), 0, 0).await?;
        Ok(oldest.first().map(|(_, score)| score + visibility_timeout.as_secs_f64()))
    }

    /// Keep what is known of a rejected message (a [`crate::wire::dead_letter_entry`]: reason,
    /// id, length and a bounded prefix) in a list capped in count, hence in bytes, instead of
    /// dropping it.
    pub async fn dead_letter(&self, entry: &[u8]) -> RedisResult<()> {
        redis::pipe()
            .lpush(keys::dead_letter(), entry)
            .ignore()
            .ltrim(keys::dead_letter(), 0, keys::DEAD_LETTER_MAX - 1)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await
    }
}

/// One message taken from a queue.
#[derive(Debug)]
pub struct Taken {
    /// The list it came from (the queue, or one of its priority lists).
    pub key: String,
    pub bytes: Vec<u8>,
    /// The delivery tag it was recorded under in `unacked` by the take itself (the caller must
    /// not record it again, and must ack it); `None` when it was taken unrecorded.
    pub recorded_as: Option<String>,
}

impl Taken {
    fn from_reply(key: String, bytes: Vec<u8>, tag: String) -> Self {
        Taken { key, bytes, recorded_as: (!tag.is_empty()).then_some(tag) }
    }
}

/// What [`Broker::finish`] did.
#[derive(Debug)]
pub struct Finished {
    /// The result's store, when the script stored it.
    pub stored: Option<Stored>,
    /// The next message, when lists were given and one was not empty.
    pub next: Option<Taken>,
}

/// Which queue a take looks at first (kombu's Redis `queue_order_strategy`). Within the order,
/// every priority step of every queue comes before the next step (kombu's BRPOP order), so
/// priorities still win across queues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueOrder {
    /// kombu's default: after a message is taken from a queue, that queue moves to the end of
    /// the cycle, so a busy queue cannot starve the others.
    #[default]
    #[value(name = "round_robin")]
    RoundRobin,
    /// The order given, always: the first non-empty queue wins.
    #[value(name = "priority")]
    Priority,
    /// By queue name, always.
    #[value(name = "sorted")]
    Sorted,
}

/// One scan's lists, in order, with what a take script needs for each: the key and the queue
/// name as JSON (the tail of its `unacked` entries).
#[derive(Debug)]
pub struct Scan {
    pub keys: Vec<String>,
    queue_json: Vec<String>,
}

/// The lists a worker takes from, in kombu's BRPOP order for the current queue order.
#[derive(Debug)]
pub struct TakeList {
    steps: PrioritySteps,
    order: QueueOrder,
    /// The queues in the current cycle order, and the scan built from it.
    cycle: std::sync::Mutex<(Vec<String>, Arc<Scan>)>,
}

impl TakeList {
    /// The queues in the order given, always (kombu's `priority` strategy).
    pub fn new(queues: &[String], steps: &PrioritySteps) -> Self {
        Self::with_order(queues, steps, QueueOrder::Priority)
    }

    pub fn with_order(queues: &[String], steps: &PrioritySteps, order: QueueOrder) -> Self {
        let mut queues = queues.to_vec();
        if order == QueueOrder::Sorted {
            queues.sort();
        }
        let scan = Arc::new(Self::build(&queues, steps));
        TakeList { steps: steps.clone(), order, cycle: std::sync::Mutex::new((queues, scan)) }
    }

    fn build(queues: &[String], steps: &PrioritySteps) -> Scan {
        let keys = steps.brpop_keys(queues);
        let queue_json = keys.iter().map(|k| crate::wire::pyjson::to_string(keys::queue_of_key(k))).collect();
        Scan { keys, queue_json }
    }

    /// The lists in the order the next take scans them.
    pub fn scan(&self) -> Arc<Scan> {
        self.cycle.locked().1.clone()
    }

    /// The lists in the current scan order.
    pub fn keys(&self) -> Vec<String> {
        self.scan().keys.clone()
    }

    /// How many lists (one wait connection each).
    pub fn len(&self) -> usize {
        self.cycle.locked().1.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A message was taken from list `key`: with round robin its queue goes to the end of
    /// the cycle (kombu's `round_robin_cycle.rotate`).
    pub fn taken_from(&self, key: &str) {
        if self.order != QueueOrder::RoundRobin {
            return;
        }
        let mut cycle = self.cycle.locked();
        let (queues, scan) = &mut *cycle;
        if queues.len() < 2 {
            return;
        }
        let queue = keys::queue_of_key(key);
        if let Some(i) = queues.iter().position(|q| q == queue)
            && i + 1 != queues.len()
        {
            let q = queues.remove(i);
            queues.push(q);
            *scan = Arc::new(Self::build(queues, &self.steps));
        }
    }
}

impl Scan {
    /// Append the lists as a take script reads them: the keys after the script's own, and
    /// their queue names after its own arguments.
    fn add_to(&self, invocation: &mut redis::ScriptInvocation<'_>) {
        for k in &self.keys {
            invocation.key(k);
        }
        for q in &self.queue_json {
            invocation.arg(q);
        }
    }
}

/// `BLMOVE key key RIGHT RIGHT <timeout>`: blocks until `key` is non-empty and moves nothing
/// (the tail goes back to the tail), so a wait can never lose a message.
fn rotate(key: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("BLMOVE");
    cmd.arg(key).arg(key).arg("RIGHT").arg("RIGHT").arg(BRPOP_TIMEOUT.as_secs());
    cmd
}

/// One [`rotate`] wait per list, each on its own connection, as they complete.
fn rotate_waits(
    conns: &[Conn],
    keys: &[String],
) -> futures::stream::FuturesUnordered<impl Future<Output = RedisResult<Option<Vec<u8>>>> + use<>> {
    conns
        .iter()
        .zip(keys)
        .map(|(c, k)| {
            let (mut c, cmd) = (c.clone(), rotate(k));
            async move { cmd.query_async::<Option<Vec<u8>>>(&mut c).await }
        })
        .collect()
}

/// How the fetcher waits for work.
enum Wait {
    /// `BLMOVE k k RIGHT RIGHT` on every list, each on its own connection: blocks until a list
    /// is non-empty and moves nothing (the tail goes back to the tail), so waiting can never lose
    /// a message. Redis ≥ 6.2.
    Rotate(Vec<Conn>),
    /// Older Redis: kombu's BRPOP (on a wait connection), with kombu's instant of risk between
    /// pop and record.
    Brpop(Conn),
}

/// The consuming end. Work is taken with one atomic Lua script (`TAKE` in this module); when
/// every list is empty the fetcher blocks (never polls) until one is not.
pub struct Fetcher {
    take_conn: Conn,
    marker: Arc<TakeMarker>,
    reclaim: Script,
    wait: Wait,
    lists: Arc<TakeList>,
    take: Script,
    /// A wait returned a huge element: reset the connections once the waits are done.
    release_buffers_later: bool,
    /// Whether an idle wait takes in the same breath ([`Fetcher::wait_and_take`]): known once a
    /// `BLMOVE` has worked; never again after Redis refused `CLIENT ID`/`CLIENT UNBLOCK`.
    taker: Taker,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Taker {
    /// Not yet: the first waits rotate with `BLMOVE` and take afterwards.
    Untried,
    Ready,
    /// This Redis (or its ACL) refuses `CLIENT ID` or `CLIENT UNBLOCK`: wait, then take.
    Refused,
}

/// Replies larger than this make the fetcher reopen its connections afterwards, so a poison
/// message of many megabytes does not leave its size behind in every read buffer it crossed.
pub const LARGE_REPLY: usize = 1024 * 1024;

/// Test-only: a worker started with this set to a list of ordinals (`1,3`) discards those
/// take replies that carry a message — counting the fetcher's takes (after a busy check or
/// behind an idle wait) and the finish script's alike, from 1 — and reports a broken connection instead, stranding those messages in
/// `unacked` exactly as a reply lost to a network failure or a Redis restart does. The tests
/// use it to show such a message still runs, once, within about a second of its visibility
/// timeout.
pub const DROP_TAKE_REPLIES_ENV: &str = "CELERY_AUTOSCALE_TEST_DROP_TAKE_REPLIES";

/// Whether to discard this take reply ([`DROP_TAKE_REPLIES_ENV`], read once per process);
/// `via` names the path for the log.
fn lost_reply_for_test(via: &str) -> bool {
    static DROP: LazyLock<Vec<u32>> = LazyLock::new(|| {
        let Ok(raw) = std::env::var(DROP_TAKE_REPLIES_ENV) else { return Vec::new() };
        raw.split(',').map(|n| n.trim().parse()).collect::<Result<_, _>>().unwrap_or_else(|_| {
            tracing::warn!(value = %raw, "{DROP_TAKE_REPLIES_ENV} is not a list of ordinals like 1,3; ignoring it");
            Vec::new()
        })
    });
    static SEEN: AtomicU32 = AtomicU32::new(0);
    if DROP.is_empty() {
        return false;
    }
    let ordinal = SEEN.fetch_add(1, Ordering::Relaxed) + 1;
    let dropped = DROP.contains(&ordinal);
    if dropped {
        tracing::warn!(ordinal, via, "{DROP_TAKE_REPLIES_ENV}: discarding a take reply; its message stays in unacked");
    }
    dropped
}

fn lost_reply_error() -> redis::RedisError {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "take reply discarded (test hook)").into()
}

/// `ERR unknown command …`: this Redis lacks the command (BLMOVE before 6.2).
fn is_unknown_command(e: &redis::RedisError) -> bool {
    e.code() == Some("ERR") && e.detail().is_some_and(|d| d.starts_with("unknown command"))
}

fn unexpected_reply(script: &str) -> redis::RedisError {
    (redis::ErrorKind::UnexpectedReturnType, "unexpected reply from a script", script.to_owned()).into()
}

impl Fetcher {
    /// `wait_conns`: one connection per list of `lists`, each with a response timeout longer
    /// than [`BRPOP_TIMEOUT`].
    pub fn new(take_conn: Conn, wait_conns: Vec<Conn>, lists: Arc<TakeList>) -> Self {
        Self::with_marker(take_conn, wait_conns, lists, TakeMarker::new())
    }

    fn with_marker(take_conn: Conn, wait_conns: Vec<Conn>, lists: Arc<TakeList>, marker: Arc<TakeMarker>) -> Self {
        Fetcher {
            take_conn,
            marker,
            reclaim: Script::new(scripts::RECLAIM),
            wait: Wait::Rotate(wait_conns),
            lists,
            take: Script::new(scripts::TAKE),
            release_buffers_later: false,
            taker: Taker::Untried,
        }
    }

    /// The next message, or `None` after about a quiet second.
    pub async fn fetch(&mut self) -> RedisResult<Option<Taken>> {
        if let Some(t) = self.reclaim_lost().await? {
            return Ok(Some(t));
        }
        if let Some(t) = self.try_take().await? {
            if t.bytes.len() > LARGE_REPLY {
                self.release_buffers();
            }
            return Ok(Some(t));
        }
        if self.taker == Taker::Ready && matches!(self.wait, Wait::Rotate(_)) {
            return self.wait_and_take().await;
        }
        match &mut self.wait {
            Wait::Rotate(conns) => {
                let first = conns[0].clone();
                let scan = self.lists.scan();
                let mut waits = rotate_waits(conns, &scan.keys);
                // The first list that has something wakes us; the other waits may be dropped:
                // BLMOVE onto the same list moves nothing, whoever gets the reply.
                let (mut woken, mut fallback) = (false, false);
                while let Some(r) = futures::StreamExt::next(&mut waits).await {
                    match r {
                        Ok(element) => {
                            if self.taker == Taker::Untried {
                                self.taker = Taker::Ready; // this Redis has BLMOVE
                            }
                            let Some(element) = element else { continue };
                            if element.len() > LARGE_REPLY {
                                self.release_buffers_later = true;
                            }
                            woken = true;
                            break;
                        }
                        Err(e) if is_unknown_command(&e) => {
                            tracing::warn!(error = %e, "this Redis has no BLMOVE (needs 6.2+); waiting with BRPOP as kombu does");
                            fallback = true;
                            break;
                        }
                        Err(e) => return Err(e),
                    }
                }
                drop(waits);
                if fallback {
                    self.wait = Wait::Brpop(first);
                }
                let taken = if woken { self.try_take().await? } else { None };
                Ok(self.after_wait(taken))
            }
            Wait::Brpop(conn) => {
                let popped: Option<(String, Vec<u8>)> = redis::cmd("BRPOP")
                    .arg(&self.lists.scan().keys)
                    .arg(BRPOP_TIMEOUT.as_secs())
                    .query_async(conn)
                    .await?;
                if let Some((key, _)) = &popped {
                    self.lists.taken_from(key);
                }
                if popped.as_ref().is_some_and(|(_, bytes)| bytes.len() > LARGE_REPLY) {
                    conn.reset();
                }
                Ok(popped.map(|(key, bytes)| Taken { key, bytes, recorded_as: None }))
            }
        }
    }

    /// Wait for work and take it in one breath. The first list's wait connection is the taker:
    /// `BLMOVE` on its list with the take script pipelined behind it, so when a message arrives
    /// there Redis runs the take at once, without a round trip to us. Every other list has a
    /// plain `BLMOVE` waker; when one fires first, `CLIENT UNBLOCK` ends the taker's wait and
    /// its take runs then. Either way exactly one take runs per wait, and its reply is always
    /// read (the taker is awaited to the end, ≤ [`BRPOP_TIMEOUT`]); wakers take nothing, so they
    /// may be dropped. The take stamps `unacked` with the server's clock (it may run up to a
    /// second after this call).
    async fn wait_and_take(&mut self) -> RedisResult<Option<Taken>> {
        let Wait::Rotate(conns) = &self.wait else { return Ok(None) };
        let conns = conns.clone();
        let scan = self.lists.scan();
        let keys = &scan.keys;
        let mut taker = conns[0].clone();
        let id: i64 = match redis::cmd("CLIENT").arg("ID").query_async(&mut taker).await {
            Ok(id) => id,
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) => {
                return self.refuse_taker(&e);
            }
            Err(e) => return Err(e),
        };
        let attempt = self.marker.begin();
        let mut pipe = redis::pipe();
        pipe.add_command(rotate(&keys[0])).ignore();
        let take = pipe.cmd("EVALSHA").arg(self.take.get_hash()).arg(keys.len() + 3);
        take.arg(keys::unacked()).arg(keys::unacked_index()).arg(&self.marker.key).arg(keys);
        take.arg("").arg(attempt.token).arg(attempt.forget_arg()).arg(MARKER_TTL_MS);
        take.arg(&scan.queue_json);
        let taken = pipe.query_async::<(Option<(String, Vec<u8>, String)>,)>(&mut taker);
        let mut wakers = rotate_waits(&conns[1..], &keys[1..]);
        tokio::pin!(taken);
        let mut unblocked = false;
        let reply = loop {
            tokio::select! {
                reply = &mut taken => break reply,
                Some(woke) = futures::StreamExt::next(&mut wakers), if !unblocked => {
                    let Ok(Some(element)) = woke else { continue };
                    if element.len() > LARGE_REPLY {
                        self.release_buffers_later = true;
                    }
                    unblocked = true;
                    match redis::cmd("CLIENT").arg("UNBLOCK").arg(id).query_async::<i64>(&mut self.take_conn).await {
                        Ok(ended) => tracing::debug!(ended, "a message on another list: ending the taker's wait"),
                        // The taker still ends within its timeout, and takes then.
                        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) => {
                            let _ = self.refuse_taker(&e);
                        }
                        Err(_) => {}
                    }
                }
            }
        };
        drop(wakers);
        let mut reply = reply.map(|(reply,)| reply.map(|(key, bytes, tag)| Taken::from_reply(key, bytes, tag)));
        if matches!(reply, Ok(Some(_))) && lost_reply_for_test("wait") {
            reply = Err(lost_reply_error());
        }
        self.marker.end(attempt, &reply);
        let taken = match reply {
            Ok(taken) => taken,
            // The script was flushed (a Redis restart): nothing ran; the next take reloads it.
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => None,
            Err(e) => return Err(e),
        };
        if let Some(t) = &taken {
            self.lists.taken_from(&t.key);
            tracing::debug!(unblocked, "an idle wait took a message");
        }
        Ok(self.after_wait(taken))
    }

    /// Redis refused `CLIENT ID`/`CLIENT UNBLOCK` (an ACL): wait first and take after, from now on.
    fn refuse_taker(&mut self, e: &redis::RedisError) -> RedisResult<Option<Taken>> {
        tracing::warn!(error = %e, "Redis refuses CLIENT ID/UNBLOCK to this user; an idle worker waits, then takes (one round trip more per idle pickup). Allow +client|id +client|unblock to avoid it");
        self.taker = Taker::Refused;
        Ok(None)
    }

    /// The end of a wait: if it or its take read a huge reply, reopen the connections.
    fn after_wait(&mut self, taken: Option<Taken>) -> Option<Taken> {
        if self.release_buffers_later || taken.as_ref().is_some_and(|t| t.bytes.len() > LARGE_REPLY) {
            self.release_buffers();
        }
        taken
    }

    /// Reopen the take connection and every wait connection (see [`Conn::reset`]).
    fn release_buffers(&mut self) {
        self.release_buffers_later = false;
        self.take_conn.reset();
        if let Wait::Rotate(conns) = &self.wait {
            conns.iter().for_each(Conn::reset);
        }
    }

    /// One atomic take; `None` when every list is empty.
    pub async fn try_take(&mut self) -> RedisResult<Option<Taken>> {
        let attempt = self.marker.begin();
        let mut invocation = self.take.prepare_invoke();
        invocation.key(keys::unacked()).key(keys::unacked_index()).key(&self.marker.key);
        invocation.arg(crate::wire::time::unix_seconds(chrono::Utc::now()));
        invocation.arg(attempt.token).arg(attempt.forget_arg()).arg(MARKER_TTL_MS);
        self.lists.scan().add_to(&mut invocation);
        let mut reply = invocation
            .invoke_async::<Option<(String, Vec<u8>, String)>>(&mut self.take_conn)
            .await
            .map(|r| r.map(|(key, bytes, tag)| Taken::from_reply(key, bytes, tag)));
        if let Ok(Some(t)) = &reply {
            self.lists.taken_from(&t.key);
        }
        if matches!(reply, Ok(Some(_))) && lost_reply_for_test("fetch") {
            reply = Err(lost_reply_error());
        }
        self.marker.end(attempt, &reply);
        reply
    }

    /// Look up the takes whose replies were lost ([`TakeMarker`]); the first that took a
    /// message still in `unacked` is returned, recorded and leased as any take.
    async fn reclaim_lost(&mut self) -> RedisResult<Option<Taken>> {
        loop {
            let Some(token) = self.marker.lost.locked().pop() else { return Ok(None) };
            let found: RedisResult<Option<(String, Vec<u8>)>> = self
                .reclaim
                .key(&self.marker.key)
                .key(keys::unacked())
                .key(keys::unacked_index())
                .arg(token)
                .invoke_async(&mut self.take_conn)
                .await;
            let (tag, entry) = match found {
                Ok(Some(found)) => found,
                Ok(None) => continue,
                Err(e) => {
                    self.marker.lost.locked().push(token);
                    return Err(e);
                }
            };
            match crate::wire::kombu::split_unacked_entry(&entry) {
                Some((envelope, queue)) => {
                    tracing::info!(delivery_tag = %tag, "a take whose reply was lost had taken a message; running it now instead of after the visibility timeout");
                    return Ok(Some(Taken { key: queue, bytes: envelope.to_vec(), recorded_as: Some(tag) }));
                }
                None => {
                    tracing::warn!(delivery_tag = %tag, "a lost take's unacked entry is not in the shape takes write; leaving it to the visibility timeout");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(reply: &str) -> redis::RedisError {
        match redis::parse_redis_value(reply.as_bytes()) {
            Ok(redis::Value::ServerError(e)) => e.into(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn round_robin_moves_the_queue_taken_from_to_the_end() {
        let steps = PrioritySteps::default();
        let queues = ["a".to_owned(), "b".to_owned(), "c".to_owned()];
        let first_step = |l: &TakeList| l.keys()[..3].to_vec();
        let rr = TakeList::with_order(&queues, &steps, QueueOrder::RoundRobin);
        assert_eq!(first_step(&rr), ["a", "b", "c"]);
        rr.taken_from("a");
        assert_eq!(first_step(&rr), ["b", "c", "a"]);
        // A priority list counts for its queue; every step of every queue precedes the next step.
        rr.taken_from(&steps.key_for("c", 9));
        assert_eq!(first_step(&rr), ["b", "a", "c"]);
        let fixed = TakeList::with_order(&queues, &steps, QueueOrder::Priority);
        fixed.taken_from("a");
        assert_eq!(first_step(&fixed), ["a", "b", "c"]);
        let sorted = TakeList::with_order(&["z".to_owned(), "m".to_owned()], &steps, QueueOrder::Sorted);
        assert_eq!(sorted.keys()[..2].to_vec(), ["m", "z"]);
    }

    #[test]
    fn a_redis_without_blmove_is_told_by_its_error_code() {
        assert!(is_unknown_command(&server_error("-ERR unknown command 'BLMOVE', with args beginning with: 'q' \r\n")));
        assert!(!is_unknown_command(&server_error("-ERR wrong number of arguments for 'blmove' command\r\n")));
        assert!(!is_unknown_command(&server_error("-NOPERM unknown command is not what this says\r\n")));
    }
}
