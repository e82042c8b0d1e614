//! What a worker holds — the one record of it: the messages taken from Redis and not yet
//! acknowledged, keyed by delivery tag and indexed by task id, each in its [`Phase`], plus the
//! drain rule: once the graceful drain has begun, nothing new is held and nothing waiting
//! starts. Both live under one lock, so the rule is the type's, not the callers'. Everything
//! that reports what the worker holds reads it here: the `/metrics` gauges, lease renewal,
//! heartbeats and `celery inspect` (active, reserved, scheduled, query_task, stats' totals), so
//! they cannot disagree.

use crate::runtime::sync::Locked;
use crate::wire::TaskMessage;
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

/// A held message.
#[derive(Clone, Debug)]
pub struct Held {
    /// The message as parsed (id, task name, args, kwargs, headers).
    pub msg: Arc<TaskMessage>,
    /// The queue it was taken from.
    pub queue: String,
    /// Its value in kombu's `unacked` hash (what goes back to the queue).
    pub entry: Vec<u8>,
    /// When this worker took it.
    pub received: DateTime<Utc>,
    /// When it started running; `None` while it waits for a slot or its ETA.
    pub started: Option<DateTime<Utc>>,
}

/// Where a held message is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Phase {
    /// Waiting for a run slot.
    Reserved,
    /// Waiting for its ETA (Celery's "scheduled").
    Scheduled { eta: DateTime<Utc> },
    /// Running since.
    Active { since: DateTime<Utc> },
}

impl Held {
    pub fn new(msg: Arc<TaskMessage>, queue: String, entry: Vec<u8>) -> Self {
        Held { msg, queue, entry, received: Utc::now(), started: None }
    }

    pub fn is_running(&self) -> bool {
        self.started.is_some()
    }

    /// Its phase at `now`: an ETA task is scheduled until its ETA, then reserved like any other.
    pub fn phase(&self, now: DateTime<Utc>) -> Phase {
        match (self.started, self.msg.eta) {
            (Some(since), _) => Phase::Active { since },
            (None, Some(eta)) if eta > now => Phase::Scheduled { eta },
            _ => Phase::Reserved,
        }
    }
}

#[derive(Default)]
struct State {
    /// Keyed by delivery tag.
    held: HashMap<String, Held>,
    /// Task id → delivery tag of `held`.
    by_id: HashMap<String, String>,
    draining: bool,
    /// Tasks started here, by name.
    started: BTreeMap<String, u64>,
}

/// Held messages and the draining flag. Every critical section is a map update, so a plain
/// mutex is enough.
#[derive(Default)]
pub struct InFlight {
    state: Mutex<State>,
}

impl InFlight {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave a half-made map update behind.
        self.state.locked()
    }

    /// Hold a taken message. Refused (the message is handed back) once the drain has begun:
    /// the caller puts it back in its queue.
    pub fn hold(&self, tag: &str, held: Held) -> Result<(), Held> {
        let mut s = self.lock();
        if s.draining {
            return Err(held);
        }
        s.by_id.insert(held.msg.id.clone(), tag.to_owned());
        s.held.insert(tag.to_owned(), held);
        Ok(())
    }

    /// Mark a held message as running. False if the drain has begun (it was put back or is
    /// about to be) or the message is no longer held: the caller must not run it.
    pub fn start(&self, tag: &str) -> bool {
        let mut s = self.lock();
        if s.draining {
            return false;
        }
        let State { held, started, .. } = &mut *s;
        match held.get_mut(tag) {
            Some(h) => {
                h.started = Some(Utc::now());
                match started.get_mut(&h.msg.task) {
                    Some(n) => *n += 1,
                    None => {
                        started.insert(h.msg.task.clone(), 1);
                    }
                }
                true
            }
            None => false,
        }
    }

    /// Forget an acknowledged message.
    pub fn finish(&self, tag: &str) -> Option<Held> {
        let mut s = self.lock();
        let held = s.held.remove(tag)?;
        s.forget_id(&held.msg.id, tag);
        Some(held)
    }

    /// Begin the graceful drain: from now on nothing is held or started. Returns the messages
    /// that had not started, no longer held: the caller puts them back.
    pub fn begin_drain(&self) -> Vec<(String, Held)> {
        let mut s = self.lock();
        s.draining = true;
        let waiting: Vec<String> = s.held.iter().filter(|(_, h)| !h.is_running()).map(|(t, _)| t.clone()).collect();
        let mut out = Vec::with_capacity(waiting.len());
        for t in waiting {
            if let Some(h) = s.held.remove(&t) {
                s.forget_id(&h.msg.id, &t);
                out.push((t, h));
            }
        }
        out
    }

    pub fn is_draining(&self) -> bool {
        self.lock().draining
    }

    /// (running, waiting) counts.
    pub fn counts(&self) -> (usize, usize) {
        let s = self.lock();
        let running = s.held.values().filter(|h| h.is_running()).count();
        (running, s.held.len() - running)
    }

    /// A copy of every held message with its delivery tag (Celery's `inspect active` is the
    /// running ones, `inspect reserved` the others).
    pub fn snapshot(&self) -> Vec<(String, Held)> {
        self.lock().held.iter().map(|(t, h)| (t.clone(), h.clone())).collect()
    }

    /// The delivery tags of every held message.
    pub fn tags(&self) -> Vec<String> {
        self.lock().held.keys().cloned().collect()
    }

    /// Tasks started by this worker, by name (Celery's `inspect stats` `total`).
    pub fn started_counts(&self) -> BTreeMap<String, u64> {
        self.lock().started.clone()
    }

    /// `f` of every held message, under the lock (keep it short; it must not block).
    pub fn each(&self, mut f: impl FnMut(&Held)) {
        self.lock().held.values().for_each(&mut f);
    }

    /// `f` of the held message with task id `id`, if any.
    pub fn by_task_id<R>(&self, id: &str, f: impl FnOnce(&Held) -> R) -> Option<R> {
        let s = self.lock();
        s.by_id.get(id).and_then(|tag| s.held.get(tag)).map(f)
    }

    /// How many held messages are running.
    pub fn running(&self) -> usize {
        self.lock().held.values().filter(|h| h.is_running()).count()
    }
}

impl State {
    /// Drop the id index entry of `tag`'s message (unless a redelivery of the same task id is
    /// held under another tag).
    fn forget_id(&mut self, id: &str, tag: &str) {
        if self.by_id.get(id).is_some_and(|t| t == tag) {
            self.by_id.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::NewTask;
    use serde_json::Map;

    fn held(task: &str) -> Held {
        let (bytes, _) = NewTask::new(task, vec![], Map::new(), "celery").to_message("gen1@test");
        let msg = crate::wire::parse_message(&bytes).unwrap();
        Held::new(Arc::new(msg), "celery".into(), bytes)
    }

    #[test]
    fn the_drain_returns_waiting_messages_and_refuses_new_ones() {
        let f = InFlight::new();
        f.hold("a", held("t.a")).unwrap();
        f.hold("b", held("t.b")).unwrap();
        f.hold("c", held("t.a")).unwrap();
        assert!(f.start("a"));
        assert!(!f.start("zz"), "not held");
        assert_eq!(f.counts(), (1, 2));
        assert_eq!(f.snapshot().iter().filter(|(_, h)| h.is_running()).count(), 1);

        let mut waiting: Vec<String> = f.begin_drain().into_iter().map(|(t, _)| t).collect();
        waiting.sort();
        assert_eq!(waiting, ["b", "c"]);
        assert!(f.is_draining());
        assert!(f.hold("d", held("t.a")).is_err(), "nothing new is held while draining");
        assert!(!f.start("c"), "a message taken back does not start");
        assert_eq!(f.counts(), (1, 0));
        assert_eq!(f.tags(), ["a"]);
        assert_eq!(f.finish("a").map(|h| h.msg.task.clone()), Some("t.a".into()));
        assert_eq!(f.counts(), (0, 0));
        assert_eq!(f.started_counts(), BTreeMap::from([("t.a".to_owned(), 1)]));
    }

    #[test]
    fn messages_are_found_by_task_id_and_in_their_phase() {
        let f = InFlight::new();
        let now = Utc::now();
        let mut later = NewTask::new("t.eta", vec![], Map::new(), "celery");
        later.eta = Some(now + chrono::Duration::seconds(60));
        let (bytes, _) = later.to_message("gen1@test");
        let eta_msg = Arc::new(crate::wire::parse_message(&bytes).unwrap());
        let eta_id = eta_msg.id.clone();
        f.hold("e", Held::new(eta_msg, "celery".into(), bytes)).unwrap();
        let a = held("t.a");
        let a_id = a.msg.id.clone();
        f.hold("a", a).unwrap();
        assert!(matches!(f.by_task_id(&eta_id, |h| h.phase(now)), Some(Phase::Scheduled { .. })));
        assert_eq!(f.by_task_id(&eta_id, |h| h.phase(now + chrono::Duration::seconds(61))), Some(Phase::Reserved));
        assert_eq!(f.by_task_id(&a_id, |h| h.phase(now)), Some(Phase::Reserved));
        assert!(f.start("a"));
        assert!(matches!(f.by_task_id(&a_id, |h| h.phase(now)), Some(Phase::Active { .. })));
        assert_eq!(f.running(), 1);
        f.finish("a");
        assert_eq!(f.by_task_id(&a_id, |_| ()), None, "gone from the index with the message");
        assert_eq!(f.begin_drain().len(), 1);
        assert_eq!(f.by_task_id(&eta_id, |_| ()), None);
    }
}
