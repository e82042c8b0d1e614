//! Chords on the Redis result backend, as Celery 5.7 runs them (celery-wire.md §2.4): each
//! header task counts its result in the chord's join (`transport::scripts::CHORD_PART`, one
//! atomic step that also claims the body for exactly one worker of the fleet), and the worker
//! that completes the chord sends the body with the header's results in `group_index` order —
//! or, when a header task failed, fails the body with Celery's `ChordError` and sends the
//! body's errbacks.
//!
//! The rules are pure functions here ([`part`], [`body_plan`]); the worker's `chord_part_return`
//! carries them out against Redis.
//!
//! Where this differs from Celery, on purpose: the body's FAILURE is stored *before* its
//! errbacks are sent (Celery sends them first, so an errback may look before the ChordError
//! is there); errbacks are sent as `(body_id,)` task messages, one each (Celery calls an
//! errback that takes more than the task id in-process and sends the others as a group); a
//! header the producer saved as a GroupResult fails the chord with a clear
//! `ChordError` instead of being joined by structure.

use super::Worker;
use super::routes::Routes;
use crate::transport::backend::{ChordPart, PartReturned};
use crate::transport::connection;
use crate::wire::chord::{self, JoinError, part_entry, part_score};
use crate::wire::task_write::new_uuid;
use crate::wire::{ExceptionInfo, NewTask, ResultMeta, Signature, TaskMessage, TaskState};
use chrono::{DateTime, Utc};
use serde_json::Value;

/// A header task's part in its chord: what to count, and the body to send when it completes.
#[derive(Clone, Debug, PartialEq)]
pub struct ChordStep {
    pub part: ChordPart,
    pub body: Signature,
}

/// The chord part of `msg` finishing in `state` with `result` (the value, or the exception as
/// stored); `None` when the message is not a chord header member (no `chord` body, or no
/// group to join in — Celery does nothing then either).
pub fn part(msg: &TaskMessage, state: TaskState, result: &Value) -> Option<ChordStep> {
    let body = msg.embed.chord.as_ref()?;
    let group_id = msg.group.as_deref().filter(|g| !g.is_empty())?;
    Some(ChordStep {
        part: ChordPart {
            group_id: group_id.to_owned(),
            task_id: msg.id.clone(),
            score: part_score(msg.group_index),
            entry: part_entry(&msg.id, state, result),
        },
        body: body.clone(),
    })
}

/// What the worker that claimed a complete chord does.
#[derive(Clone, Debug, PartialEq)]
pub enum BodyPlan {
    /// Send the body with the header's results as its first argument: one message for a task
    /// body, the members of a group body, the first step of a chain body, the header of a
    /// chord body ([`NewTask::apply`]).
    Send(Vec<NewTask>),
    /// Store the FAILUREs (a `ChordError`: the body's, or each member's and the group's for a
    /// group body), then send the errbacks.
    Fail { error: ExceptionInfo, metas: Vec<ResultMeta>, errbacks: Vec<NewTask> },
}

/// The body of a complete chord, from the header's `entries` in join order. `nested`: the
/// producer saved a group result, which this worker does not join by structure.
pub fn body_plan(
    body: &Signature,
    entries: &[Vec<u8>],
    nested: bool,
    header: &TaskMessage,
    now: DateTime<Utc>,
    routes: &Routes,
) -> BodyPlan {
    let joined = if nested {
        Err(JoinError::Unreadable(
            "the chord header was saved as a GroupResult; this worker joins flat headers only".into(),
        ))
    } else {
        chord::join(entries)
    };
    match joined {
        Ok(results) => BodyPlan::Send(body_tasks(body, Value::Array(results), header, routes)),
        Err(e) => fail(body, &e, header, now, routes),
    }
}

/// The body's messages as Celery's `callback.delay(results)` sends them from the worker that
/// completed the chord: the body applied as a whole with the results as its first argument
/// ([`NewTask::apply`]), each message with the ids and options the client froze it with,
/// `parent_id` the header task that completed the chord and the workflow's root; a task that
/// names no queue goes where `routes` says.
fn body_tasks(body: &Signature, results: Value, header: &TaskMessage, routes: &Routes) -> Vec<NewTask> {
    NewTask::apply(body, Some(results), header, &|task| routes.queue_for(task).to_owned())
}

/// Celery's `chord_error_from_stack`: the body fails with `exc` (stored under its task id,
/// without group or parent; a chain's or a chord's id is the one the client froze it with),
/// and its errbacks are sent as one group with the body's id as their argument, the body as
/// their parent and root ([`super::settle::errbacks`]). A group body
/// (`_handle_group_chord_error`): each member fails with the failed header member's own
/// exception (the `ChordError`'s cause; the `ChordError` itself when an entry was unreadable)
/// and gets its own errbacks and the group's, and the group's id is failed too.
fn fail(body: &Signature, err: &JoinError, header: &TaskMessage, now: DateTime<Utc>, routes: &Routes) -> BodyPlan {
    let chord_error = err.chord_error();
    let exc = match (body.subtask_type.as_deref(), err) {
        (Some("group"), JoinError::Dependency { exc, .. }) => exc,
        _ => &chord_error,
    };
    let fail_one = |sig: &Signature, extra: &[Signature]| {
        let id = sig.option_str("task_id").map_or_else(new_uuid, str::to_owned);
        let mut links = sig.option_links("link_error");
        links.extend(extra.iter().filter(|e| !links.contains(e)).cloned().collect::<Vec<_>>());
        let errbacks = super::settle::errback_group(&links, &id, &id, header, routes);
        (ResultMeta::failure(&id, &sig.task, exc, now), errbacks)
    };
    let (mut metas, mut errbacks) = (Vec::new(), Vec::new());
    if body.subtask_type.as_deref() == Some("group") {
        let group_links = body.option_links("link_error");
        for member in body.members() {
            let (meta, sent) = fail_one(&member, &group_links);
            metas.push(meta);
            errbacks.extend(sent);
        }
        if let Some(group_id) = body.option_str("task_id") {
            metas.push(ResultMeta::failure(group_id, &body.task, exc, now));
        }
    } else {
        let (meta, sent) = fail_one(body, &[]);
        metas.push(meta);
        errbacks = sent;
    }
    BodyPlan::Fail { error: chord_error.clone(), metas, errbacks }
}

impl Worker {
    /// Count `step`'s part ([`crate::transport::backend::Backend::chord_part_return`]) and, when
    /// this worker claimed the complete chord, send its body (claim extended first, join keys
    /// cleaned up after) or fail it. A Redis error that retrying cannot cure (a join key of the
    /// wrong type) is logged and counted, and leaves the chord to its keys' expiry.
    pub(super) async fn chord_part_return(&self, header: &TaskMessage, step: ChordStep) {
        let gid = step.part.group_id.as_str();
        let Some(returned) =
            self.chord_redis("count a chord part", || self.backend.chord_part_return(&step.part)).await
        else {
            return;
        };
        let (token, entries, nested) = match returned {
            PartReturned::AlreadyDone => {
                tracing::info!(task_id = %header.id, group_id = gid, "chord already complete; this part is a late duplicate");
                return;
            }
            PartReturned::Counted { count, expected } => {
                tracing::debug!(task_id = %header.id, group_id = gid, count, ?expected, "chord part counted");
                return;
            }
            PartReturned::Claimed { token, entries, nested } => (token, entries, nested),
        };
        match body_plan(&step.body, &entries, nested, header, Utc::now(), &self.args.task_routes) {
            BodyPlan::Send(tasks) => {
                let extended =
                    self.chord_redis("extend the chord claim", || self.backend.chord_extend_claim(gid, &token)).await;
                if extended != Some(true) {
                    tracing::warn!(group_id = gid, "chord body not sent: another worker holds its claim now");
                    return;
                }
                let body_id = tasks.first().map(|t| t.id.clone()).unwrap_or_default();
                tracing::info!(group_id = gid, body = %step.body.task, body_id = %body_id, messages = tasks.len(), members = entries.len(), "chord complete; sending its body");
                for task in tasks {
                    self.send(task).await;
                }
                let cleaned = self.chord_redis("clean up the chord", || self.backend.chord_cleanup(gid, &token)).await;
                if cleaned == Some(false) {
                    tracing::warn!(group_id = gid, "chord claim lost before cleanup; its keys are left to expire");
                }
            }
            BodyPlan::Fail { error, metas, errbacks } => {
                let body_id = step.body.option_str("task_id").unwrap_or_default();
                tracing::warn!(group_id = gid, body = %step.body.task, body_id = %body_id, "chord failed: {}", error.summary());
                self.metrics.failure.with_label_values(&[&step.body.task]).inc();
                for meta in &metas {
                    self.store_meta(meta).await;
                }
                for errback in errbacks {
                    self.send(errback).await;
                }
                self.chord_redis("drop the failed chord's size", || self.backend.chord_drop_size(gid)).await;
            }
        }
    }

    /// A chord member that will not run (revoked, expired, terminated) counts as REVOKED with
    /// `exc`, as Celery's `mark_as_revoked` does: the chord fails with a `ChordError`. Call it
    /// after storing the REVOKED result.
    pub(super) async fn chord_part_revoked(&self, msg: &TaskMessage, exc: &ExceptionInfo) {
        if let Some(step) = part(msg, TaskState::Revoked, &exc.to_value()) {
            self.chord_part_return(msg, step).await;
        }
    }

    /// A redelivered chord member whose SUCCESS is already stored is not run again; its first
    /// run may have stopped after the store and before the count, so count the stored result
    /// (a duplicate counts once).
    pub(super) async fn chord_part_of_stored(&self, msg: &TaskMessage) {
        if msg.embed.chord.is_none() {
            return;
        }
        let stored = self.chord_redis("read a chord member's result", || self.backend.stored(&msg.id)).await.flatten();
        let Some(result) = stored.and_then(|mut m| m.get_mut("result").map(Value::take)) else { return };
        if let Some(step) = part(msg, TaskState::Success, &result) {
            self.chord_part_return(msg, step).await;
        }
    }

    /// A backend call of the chord join, retried through outages like every store; an error
    /// that retrying cannot cure (a script or type error: the keys hold something else) is
    /// logged and counted as a rejection (`chord_join`), and gives `None`.
    async fn chord_redis<T, F, Fut>(&self, what: &str, mut op: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let outcome = self
            .redis_backend(what, || {
                let fut = op();
                async move {
                    match fut.await {
                        Err(e) if connection::classify(&e) == connection::Failure::Other => Ok(Err(e)),
                        other => other.map(Ok),
                    }
                }
            })
            .await?;
        match outcome {
            Ok(v) => Some(v),
            Err(e) => {
                self.metrics.rejected.with_label_values(&["chord_join"]).inc();
                tracing::error!(error = %e, "cannot {what}; the chord is left to its keys' expiry");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::parse_message;
    use serde_json::{Map, json};

    /// A header member as Celery 5.7 sends it (fixture p27: `group`, `group_index`,
    /// `embed.chord`).
    fn header(index: Option<i64>, body: Value) -> TaskMessage {
        let mut t = NewTask::new("tasks.cpu_bound", vec![json!(10)], Map::new(), "celery");
        t.id = "h1".into();
        t.group = Some("g1".into());
        let (bytes, _) = t.to_message("gen1@test");
        let mut env: Value = serde_json::from_slice(&bytes).unwrap();
        env["headers"]["group_index"] = index.map_or(Value::Null, Value::from);
        let embed = json!({"callbacks": null, "errbacks": null, "chain": null, "chord": body});
        use base64::Engine as _;
        env["body"] = base64::engine::general_purpose::STANDARD.encode(json!([[10], {}, embed]).to_string()).into();
        parse_message(env.to_string().as_bytes()).unwrap()
    }

    fn body_sig(options: Value) -> Value {
        json!({"task": "tasks.xsum", "args": [], "kwargs": {}, "options": options, "subtask_type": null, "immutable": false})
    }

    #[test]
    fn a_header_member_counts_its_result_under_its_group_and_index() {
        let msg = header(Some(1), body_sig(json!({"task_id": "b1", "group_id": "g1"})));
        let step = part(&msg, TaskState::Success, &json!(4)).unwrap();
        assert_eq!(step.part.group_id, "g1");
        assert_eq!(step.part.score, "1");
        assert_eq!(step.part.entry, br#"[1, "h1", "SUCCESS", 4]"#);
        assert_eq!(step.body.task, "tasks.xsum");
        let no_index = header(None, body_sig(json!({})));
        assert_eq!(part(&no_index, TaskState::Success, &json!(4)).unwrap().part.score, "+inf");
        let plain = header(Some(0), Value::Null);
        assert_eq!(part(&plain, TaskState::Success, &json!(4)), None, "not a chord member");
    }

    #[test]
    fn a_complete_chord_sends_its_body_with_the_results_in_order() {
        let msg = header(Some(1), body_sig(json!({"task_id": "b1", "group_id": "g1", "queue": "bodyq"})));
        let step = part(&msg, TaskState::Success, &json!(168)).unwrap();
        let entries = [part_entry("h0", TaskState::Success, &json!(25)), step.part.entry.clone()];
        let BodyPlan::Send(tasks) = body_plan(&step.body, &entries, false, &msg, Utc::now(), &Routes::default()) else {
            panic!("sent")
        };
        let [body] = tasks.as_slice() else { panic!("one message: {tasks:?}") };
        assert_eq!((body.id.as_str(), body.queue.as_str()), ("b1", "bodyq"));
        assert_eq!(body.args, vec![json!([25, 168])]);
        assert_eq!(
            (body.group.as_deref(), body.parent_id.as_deref(), body.root_id.as_deref()),
            (Some("g1"), Some("h1"), Some("h1"))
        );
    }

    /// A group body as a Celery 5.7 client freezes it: members with their ids, the header's
    /// group id and their places.
    fn group_body() -> Value {
        let member = |id: &str, i: i64| {
            json!({"task": "tasks.xsum", "args": [], "kwargs": {}, "subtask_type": null, "immutable": false,
                   "options": {"task_id": id, "group_id": "g1", "group_index": i}})
        };
        json!({"task": "celery.group", "args": [], "kwargs": {"tasks": [member("m0", 0), member("m1", 1)]},
               "options": {"task_id": "bg", "group_id": "g1"}, "subtask_type": "group", "immutable": false})
    }

    #[test]
    fn a_group_body_sends_its_members_and_fails_each_with_the_cause() {
        let msg = header(Some(1), group_body());
        let step = part(&msg, TaskState::Success, &json!(3)).unwrap();
        let entries = [part_entry("h0", TaskState::Success, &json!(2)), step.part.entry.clone()];
        let BodyPlan::Send(tasks) = body_plan(&step.body, &entries, false, &msg, Utc::now(), &Routes::default()) else {
            panic!("sent")
        };
        let sent: Vec<_> = tasks.iter().map(|t| (t.id.as_str(), t.group.as_deref(), t.group_index)).collect();
        assert_eq!(sent, [("m0", Some("g1"), Some(0)), ("m1", Some("g1"), Some(1))], "their frozen group id kept");
        assert!(tasks.iter().all(|t| t.args == vec![json!([2, 3])]));
        let exc = ExceptionInfo::builtin("TypeError", "bad");
        let entries = [part_entry("h0", TaskState::Failure, &exc.to_value())];
        let BodyPlan::Fail { error, metas, .. } =
            body_plan(&step.body, &entries, false, &msg, Utc::now(), &Routes::default())
        else {
            panic!("failed")
        };
        assert_eq!(error.exc_type, "ChordError");
        let failed: Vec<_> = metas.iter().map(|m| (m.task_id.as_str(), m.result["exc_type"].clone())).collect();
        assert_eq!(failed, [("m0", json!("TypeError")), ("m1", json!("TypeError")), ("bg", json!("TypeError"))]);
    }

    #[test]
    fn a_failed_member_fails_the_body_with_a_chord_error_and_calls_its_errbacks() {
        let errback = json!({"task": "tasks.on_error", "args": [], "kwargs": {}, "options": {"task_id": "e1"}, "subtask_type": null, "immutable": false});
        let msg = header(Some(0), body_sig(json!({"task_id": "b1", "link_error": [errback]})));
        let exc = ExceptionInfo::builtin("ValueError", "boom");
        let entries = [part_entry("h1", TaskState::Failure, &exc.to_value())];
        let step = part(&msg, TaskState::Failure, &exc.to_value()).unwrap();
        let BodyPlan::Fail { metas, errbacks, .. } =
            body_plan(&step.body, &entries, false, &msg, Utc::now(), &Routes::default())
        else {
            panic!("failed")
        };
        let [meta] = metas.as_slice() else { panic!("one FAILURE: {metas:?}") };
        assert_eq!((meta.task_id.as_str(), meta.status.clone()), ("b1", TaskState::Failure));
        assert_eq!(
            meta.result,
            json!({"exc_type": "ChordError", "exc_message": ["Dependency h1 raised ValueError('boom')"], "exc_module": "celery.exceptions"})
        );
        assert_eq!((meta.group_id.clone(), meta.parent_id.clone()), (None, None));
        assert_eq!(errbacks.len(), 1);
        assert_eq!((errbacks[0].id.as_str(), errbacks[0].args.clone()), ("e1", vec![json!("b1")]));
        assert_eq!(errbacks[0].parent_id.as_deref(), Some("b1"));
        assert!(
            errbacks[0].group.is_some() && errbacks[0].group_index == Some(0),
            "sent as a group of one, as Celery does"
        );
        let BodyPlan::Fail { metas, .. } = body_plan(&step.body, &[], true, &msg, Utc::now(), &Routes::default())
        else {
            panic!()
        };
        let meta = &metas[0];
        assert!(meta.result["exc_message"][0].as_str().unwrap().contains("saved as a GroupResult"), "{}", meta.result);
    }
}
