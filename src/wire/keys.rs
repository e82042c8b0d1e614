//! Kombu's Redis key layout: queues, priority sub-lists, ack-emulation and result keys, and the
//! Pub/Sub channels of Celery's fanout exchanges (events, remote control) (docs: celery-wire.md
//! §1.1, §1.4, §2.1). Every Redis key and channel name the project uses lives here.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// The `global_keyprefix` transport options, broker and result backend, as set once per
/// process ([`set_global_keyprefix`]); none by default.
static PREFIXES: OnceLock<(String, String)> = OnceLock::new();

/// Set the process's key prefixes, as kombu's Redis transport option `global_keyprefix`
/// (`broker_transport_options`) and Celery's result backend option of the same name
/// (`result_backend_transport_options`) do:
/// - `broker` goes verbatim before every broker key and channel (queues and their priority
///   lists, `unacked`, `unacked_index`, `unacked_mutex`, `_kombu.binding.*`, the event and
///   pidbox fanout channels, reply queues) — kombu's prefixing client puts it before the key
///   argument of every command it sends; values (queue names inside messages, `unacked`
///   entries and bindings) stay unprefixed;
/// - `backend` goes before the result and group key prefixes (`celery-task-meta-`,
///   `celery-taskset-meta-`, hence the chord keys and the result PUBLISH channel), with `_`
///   added when it does not end in one of `:_-.`, as Celery's `_add_global_keyprefix` does.
///
/// Our own keys (`celery-autoscale.taking.*`, `celery-autoscale.rejected`) get the broker
/// prefix too. Once per process: a second call with other values is refused.
pub fn set_global_keyprefix(broker: &str, backend: &str) -> Result<(), String> {
    let backend = if backend.is_empty() || backend.ends_with([':', '_', '-', '.']) {
        backend.to_owned()
    } else {
        format!("{backend}_")
    };
    let want = (broker.to_owned(), backend);
    let set = PREFIXES.get_or_init(|| want.clone());
    if *set == want {
        Ok(())
    } else {
        Err(format!(
            "global_keyprefix is already {:?} (broker) / {:?} (backend) in this process; it is set once",
            set.0, set.1
        ))
    }
}

/// The broker's `global_keyprefix` ("" when none).
pub fn broker_prefix() -> &'static str {
    PREFIXES.get().map_or("", |p| p.0.as_str())
}

/// The result backend's key prefix ("" when none), with Celery's separator.
pub fn backend_prefix() -> &'static str {
    PREFIXES.get().map_or("", |p| p.1.as_str())
}

/// A broker key or channel: `name` with the broker prefix.
pub fn broker_key(name: &str) -> String {
    format!("{}{name}", broker_prefix())
}

/// The key of queue `name`'s highest-priority list (the bare queue, prefixed): where kombu
/// LPUSHes a message of priority 0 and a pidbox reply.
pub fn queue_key(name: &str) -> String {
    broker_key(name)
}

/// kombu's separator (`'\x06\x16'`): between a queue name and its priority bucket, and between
/// the fields of a binding (`routing_key␆␖pattern␆␖queue`).
pub const SEP: &str = "\x06\x16";
/// Celery's event exchange (fanout).
pub const EVENT_EXCHANGE: &str = "celeryev";
/// Celery's remote-control mailbox exchange (fanout) for the app namespace `celery`.
pub const PIDBOX_EXCHANGE: &str = "celery.pidbox";
/// Where remote-control replies go (direct, through its binding set).
pub const PIDBOX_REPLY_EXCHANGE: &str = "reply.celery.pidbox";

/// kombu's Redis channel for a fanout exchange in database `db`: `/{db}.{exchange}`, with
/// `/{routing_key}` appended when the message has one (events do; remote control does not).
pub fn fanout_channel(db: i64, exchange: &str, routing_key: Option<&str>) -> String {
    let p = broker_prefix();
    match routing_key {
        Some(rk) => format!("{p}/{db}.{exchange}/{rk}"),
        None => format!("{p}/{db}.{exchange}"),
    }
}
/// The name of kombu's HASH delivery_tag → `[envelope, exchange, routing_key]` (its key is
/// [`unacked`]).
pub const UNACKED: &str = "unacked";
/// The name of kombu's ZSET delivery_tag → delivery time (unix seconds, float).
pub const UNACKED_INDEX: &str = "unacked_index";
/// The name of kombu's lock held while restoring `unacked` entries (redis-py Lock token).
pub const UNACKED_MUTEX: &str = "unacked_mutex";

/// The key of [`UNACKED`].
pub fn unacked() -> String {
    broker_key(UNACKED)
}

/// The key of [`UNACKED_INDEX`].
pub fn unacked_index() -> String {
    broker_key(UNACKED_INDEX)
}

/// The key of [`UNACKED_MUTEX`].
pub fn unacked_mutex() -> String {
    broker_key(UNACKED_MUTEX)
}
/// How long our hold on `unacked_mutex` lasts if we die holding it, in milliseconds. kombu uses
/// 300 s (`unacked_mutex_expire`): a consumer killed mid-restore then blocks every restore for
/// five minutes. Ours is 10 s: each entry moves with an atomic compare-and-move, so a restore
/// that outlives the lock and overlaps another (ours or kombu's WATCH transaction) is still safe.
pub const UNACKED_MUTEX_EXPIRE_MS: u64 = 10_000;
/// A worker process's notes of its own takes (`broker::TakeMarker`): HASH token → delivery
/// tag. Not a kombu key; `id` is unique per process.
pub fn take_marker(id: &str) -> String {
    broker_key(&format!("celery-autoscale.taking.{id}"))
}
/// Prefix of result keys in the backend DB (and of their PUBLISH channels).
pub const RESULT_KEY_PREFIX: &str = "celery-task-meta-";
/// Prefix of kombu's exchange binding sets.
pub const BINDING_PREFIX: &str = "_kombu.binding.";

/// SET: the bindings of `exchange`, one member per bound queue ([`Binding`]).
pub fn binding_set(exchange: &str) -> String {
    broker_key(&format!("{BINDING_PREFIX}{exchange}"))
}

/// A member of a binding set ([`Binding`]), as kombu's `queue_bind` writes it.
pub fn binding_member(routing_key: &str, pattern: &str, queue: &str) -> String {
    format!("{routing_key}{SEP}{pattern}{SEP}{queue}")
}

/// The queue a remote-control client collects its replies from: `<key>.reply.celery.pidbox`,
/// bound to [`PIDBOX_REPLY_EXCHANGE`] with routing key `key` (kombu's `Mailbox._broadcast`).
pub fn pidbox_reply_queue(key: &str) -> String {
    format!("{key}.{PIDBOX_REPLY_EXCHANGE}")
}

/// One member of a binding set: `routing_key␆␖pattern␆␖queue`, as kombu's `queue_bind` writes
/// it. An empty pattern means a direct match on the routing key; otherwise it is a topic regex.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding<'a> {
    pub routing_key: &'a str,
    pub pattern: &'a str,
    pub queue: &'a str,
}

impl<'a> Binding<'a> {
    /// Read a member; `None` when it does not have exactly three fields (kombu would fail to
    /// unpack it too).
    pub fn parse(member: &'a str) -> Option<Self> {
        let mut parts = member.split(SEP);
        let (routing_key, pattern, queue) = (parts.next()?, parts.next()?, parts.next()?);
        parts.next().is_none().then_some(Binding { routing_key, pattern, queue })
    }

    /// Whether a message with `routing_key` goes to this binding's queue.
    pub fn routes(&self, routing_key: &str) -> bool {
        if self.pattern.is_empty() {
            self.routing_key == routing_key
        } else {
            regex::Regex::new(self.pattern).is_ok_and(|re| re.is_match(routing_key))
        }
    }
}
/// Capped list where messages the worker cannot even identify (not JSON, no task id) are kept
/// for inspection instead of being dropped. Not a kombu key; the name cannot clash with a queue
/// that a Celery app would declare by accident.
pub const DEAD_LETTER: &str = "celery-autoscale.rejected";

/// The key of [`DEAD_LETTER`].
pub fn dead_letter() -> String {
    broker_key(DEAD_LETTER)
}
/// How many rejected raw messages [`DEAD_LETTER`] keeps.
pub const DEAD_LETTER_MAX: isize = 1000;
/// Celery's default queue (`task_default_queue`).
pub const DEFAULT_QUEUE: &str = "celery";

/// The result key of a task id.
pub fn result_key(task_id: &str) -> String {
    format!("{}{RESULT_KEY_PREFIX}{task_id}", backend_prefix())
}

/// Prefix of group (taskset) keys in the backend DB, and of a chord's join keys.
pub const GROUP_KEY_PREFIX: &str = "celery-taskset-meta-";

/// The group result key of a group id (`GroupResult.save()`; for a chord, written by the
/// producer only when the header holds groups).
pub fn group_key(group_id: &str) -> String {
    format!("{}{GROUP_KEY_PREFIX}{group_id}", backend_prefix())
}

/// The keys of the Redis backend's chord join for the header group `group_id`
/// (celery-wire.md §2.4), every one `celery-taskset-meta-<group_id>` plus a suffix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChordKeys {
    /// `.j`: the header results, `[1, task_id, state, result]` each; a sorted set scored by
    /// `group_index` (Celery's default), or a list in arrival order (`result_chord_ordered`
    /// off).
    pub join: String,
    /// `.t`: INCR'd for each header task replaced by a group (`Task.add_to_chord`): the
    /// results expected beyond the size.
    pub extra: String,
    /// `.s`: the header's size, set by the producer (`set_chord_size`).
    pub size: String,
    /// `.d`: SET of `task_id:group_index` already counted (a redelivered header task counts
    /// once).
    pub seen: String,
    /// `.c`: the claim on sending the body (a random token, with an expiry), then `done`.
    pub claim: String,
    /// The group's own result key (see [`group_key`]).
    pub group: String,
}

/// The chord join keys of header group `group_id`.
pub fn chord_keys(group_id: &str) -> ChordKeys {
    let group = group_key(group_id);
    ChordKeys {
        join: format!("{group}.j"),
        extra: format!("{group}.t"),
        size: format!("{group}.s"),
        seen: format!("{group}.d"),
        claim: format!("{group}.c"),
        group,
    }
}

/// Kombu's `priority_steps`: the buckets a queue is split into. Sorted, unique, within 0..=9,
/// and starting at 0 (kombu maps priorities below the first step to the first step's key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrioritySteps(Vec<u8>);

impl Default for PrioritySteps {
    /// kombu's `PRIORITY_STEPS = [0, 3, 6, 9]`.
    fn default() -> Self {
        PrioritySteps(vec![0, 3, 6, 9])
    }
}

impl PrioritySteps {
    pub fn new(mut steps: Vec<u8>) -> Result<Self, String> {
        steps.sort_unstable();
        steps.dedup();
        if steps.first() != Some(&0) || steps.iter().any(|s| *s > 9) {
            return Err(format!(
                "priority steps {steps:?} must include 0 and stay within 0..=9 (kombu default: 0,3,6,9)"
            ));
        }
        Ok(PrioritySteps(steps))
    }

    pub fn steps(&self) -> &[u8] {
        &self.0
    }

    /// Kombu's `priority(n)`: `steps[bisect(steps, n) - 1]` after clamping `n` to 0..=9.
    pub fn bucket(&self, priority: i64) -> u8 {
        let p = priority.clamp(0, 9) as u8;
        let idx = self.0.partition_point(|s| *s <= p);
        self.0[idx.saturating_sub(1)]
    }

    /// The list a message with `priority` goes to (kombu's `_q_for_pri`).
    pub fn key_for(&self, queue: &str, priority: i64) -> String {
        bucket_key(queue, self.bucket(priority))
    }

    /// Every list of every queue, in the order kombu's BRPOP names them:
    /// `for pri in steps: for queue in queues` — bucket 0 is the highest priority on Redis.
    pub fn brpop_keys(&self, queues: &[String]) -> Vec<String> {
        self.0.iter().flat_map(|b| queues.iter().map(move |q| bucket_key(q, *b))).collect()
    }

    /// Every list of one queue (for depth: the sum of LLEN over these).
    pub fn queue_keys(&self, queue: &str) -> Vec<String> {
        self.0.iter().map(|b| bucket_key(queue, *b)).collect()
    }
}

impl FromStr for PrioritySteps {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let steps = s
            .split(',')
            .map(|p| p.trim().parse::<u8>().map_err(|_| format!("priority step {p:?} is not an integer 0..=9")))
            .collect::<Result<Vec<_>, _>>()?;
        PrioritySteps::new(steps)
    }
}

impl fmt::Display for PrioritySteps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(u8::to_string).collect();
        f.write_str(&parts.join(","))
    }
}

fn bucket_key(queue: &str, bucket: u8) -> String {
    let p = broker_prefix();
    if bucket == 0 { format!("{p}{queue}") } else { format!("{p}{queue}{SEP}{bucket}") }
}

/// The queue a list key belongs to (strips the broker prefix and a priority suffix).
pub fn queue_of_key(key: &str) -> &str {
    let key = key.strip_prefix(broker_prefix()).unwrap_or(key);
    match key.rsplit_once(SEP) {
        Some((queue, bucket)) if bucket.len() == 1 && bucket.as_bytes()[0].is_ascii_digit() => queue,
        _ => key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_members_read_like_kombu() {
        let b = Binding::parse("celery\x06\x16\x06\x16celery").unwrap();
        assert_eq!(b, Binding { routing_key: "celery", pattern: "", queue: "celery" });
        assert!(b.routes("celery") && !b.routes("other"));
        let topic = Binding::parse("\x06\x16^orders\\..*\x06\x16orders").unwrap();
        assert!(topic.routes("orders.eu") && !topic.routes("billing.eu"));
        assert_eq!(Binding::parse("a\x06\x16b"), None);
        assert_eq!(Binding::parse("a\x06\x16b\x06\x16c\x06\x16d"), None);
        assert_eq!(binding_set("reply.celery.pidbox"), "_kombu.binding.reply.celery.pidbox");
    }

    #[test]
    fn chord_keys_are_celerys() {
        let k = chord_keys("g1");
        assert_eq!(
            [k.join, k.extra, k.size, k.seen, k.claim, k.group],
            [".j", ".t", ".s", ".d", ".c", ""].map(|s| format!("celery-taskset-meta-g1{s}"))
        );
    }

    #[test]
    fn captured_bucket_mapping() {
        // celery-wire.md §1.1 table, captured from kombu 5.7.
        let d = PrioritySteps::default();
        assert_eq!(d.key_for("celery", 0), "celery");
        assert_eq!(d.key_for("celery", 5), "celery\x06\x163");
        assert_eq!(d.key_for("celery", 9), "celery\x06\x169");
        assert_eq!(d.key_for("celery", 7), "celery\x06\x166");
        let ten: PrioritySteps = "0,1,2,3,4,5,6,7,8,9".parse().unwrap();
        assert_eq!(ten.key_for("celery", 5), "celery\x06\x165");
        // out-of-range priorities clamp like kombu
        assert_eq!(d.key_for("celery", -3), "celery");
        assert_eq!(d.key_for("celery", 42), "celery\x06\x169");
    }

    #[test]
    fn brpop_order_is_priority_major() {
        let keys = PrioritySteps::default().brpop_keys(&["a".into(), "b".into()]);
        assert_eq!(
            keys,
            ["a", "b", "a\x06\x163", "b\x06\x163", "a\x06\x166", "b\x06\x166", "a\x06\x169", "b\x06\x169"]
        );
    }

    #[test]
    fn queue_of_key_strips_bucket() {
        assert_eq!(queue_of_key("celery\x06\x166"), "celery");
        assert_eq!(queue_of_key("celery"), "celery");
        assert_eq!(queue_of_key("we\x06\x16ird\x06\x163"), "we\x06\x16ird");
    }

    #[test]
    fn bad_steps_are_explained() {
        assert!("3,6".parse::<PrioritySteps>().unwrap_err().contains("must include 0"));
        assert!("0,x".parse::<PrioritySteps>().unwrap_err().contains("\"x\""));
        assert!("0,10".parse::<PrioritySteps>().is_err());
    }
}
