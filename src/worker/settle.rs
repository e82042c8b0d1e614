//! The Celery rules of a task's outcome, as a pure step: given the message and what the body
//! returned, which result to store and which follow-up messages to send. The delivery
//! (the worker's `deliver`) carries it out — metrics, logs and events, the store, the sends, the
//! acknowledgement — so every rule here is unit-tested without Redis.
//!
//! The rules (Celery 5.7's `Request`/`Task` behaviour, as this worker implements it):
//! - **success**: SUCCESS; each `link` callback gets the result prepended to its arguments
//!   (unless immutable), and the next `chain` step is sent with the rest of the chain. With no
//!   follow-ups the result is stored together with the acknowledgement (one round trip);
//!   with follow-ups it is stored first, so a follow-up never runs before its parent's result
//!   is readable.
//! - **failure** (`Raise`): FAILURE; each `link_error` errback is sent with the task id as its
//!   argument. Stored with the acknowledgement unless there are errbacks (then first).
//! - **chord header member** (`embed.chord`, success or failure): its result is stored first,
//!   then counted in the chord's join (Celery's order: whoever sees the chord complete finds
//!   every member's result), then the follow-ups are sent; see [`super::chord`].
//! - **retry**: RETRY is stored, then the message is sent again with `retries + 1` after the
//!   countdown, to the queue it came from (with the new arguments, if the retry changed them).
//! - **reject** (`Reject(requeue=True)`): nothing is stored; the message goes back to the end
//!   of its queue. With `requeue=False`: FAILURE (`Reject`) is stored and the errbacks sent, as
//!   for a failure (Celery 5.7 marks it failed), and the message is acknowledged (dropped: the
//!   Redis transport has no dead-letter exchange).
//! - **ignore** (`Ignore`): nothing is stored or sent; the message is acknowledged.

use super::chord::{self, ChordStep};
use super::routes::Routes;
use crate::task::{TaskError, TaskResult};
use crate::wire::task_write::NewTask;
use crate::wire::{ExceptionInfo, ResultMeta, Signature, TaskMessage, TaskState};
use chrono::{DateTime, Utc};
use serde_json::Value;

/// What to do about one outcome.
#[derive(Debug, PartialEq)]
pub struct Settlement {
    /// Count the result in its chord's join first (a chord header member).
    pub chord: Option<ChordStep>,
    /// Store before sending anything (follow-ups must find it).
    pub store_first: Option<ResultMeta>,
    /// Follow-up messages, in order.
    pub send: Vec<NewTask>,
    /// Store together with the acknowledgement.
    pub store_with_ack: Option<ResultMeta>,
    /// Put the message back at the end of its queue instead of acknowledging it.
    pub requeue: bool,
}

/// The outcome's kind, for metrics, logs and events (the success value is the stored
/// result's).
#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    Success,
    Failure(ExceptionInfo),
    Retry {
        exc: ExceptionInfo,
        countdown: std::time::Duration,
    },
    /// `Reject`: requeued, or (without requeue) failed with the `Reject` exception.
    Reject {
        exc: ExceptionInfo,
        requeue: bool,
    },
    Ignore,
}

impl Kind {
    /// The state Celery's tracer reports to `after_return`.
    pub fn state(&self) -> &'static str {
        match self {
            Kind::Success => "SUCCESS",
            Kind::Failure(_) => "FAILURE",
            Kind::Retry { .. } => "RETRY",
            Kind::Reject { .. } => "REJECTED",
            Kind::Ignore => "IGNORED",
        }
    }
}

/// Apply the rules to `outcome` of `msg` (taken from `queue`) at `now`; a follow-up whose
/// signature names no queue goes where `routes` says.
pub fn settle(
    msg: &TaskMessage,
    outcome: TaskResult,
    queue: &str,
    now: DateTime<Utc>,
    routes: &Routes,
) -> (Kind, Settlement) {
    settle_spawning(msg, outcome, Vec::new(), queue, now, routes)
}

/// [`settle`], for a built-in canvas task whose success also applies `spawned`
/// ([`crate::task::Task::spawned`]): those are sent first (Celery applies them while the
/// task runs), each with no argument.
pub fn settle_spawning(
    msg: &TaskMessage,
    outcome: TaskResult,
    spawned: Vec<Signature>,
    queue: &str,
    now: DateTime<Utc>,
    routes: &Routes,
) -> (Kind, Settlement) {
    let task = msg.task.as_str();
    match outcome {
        Ok(value) => {
            let mut send: Vec<NewTask> =
                spawned.iter().flat_map(|sig| NewTask::apply(sig, None, msg, &route(routes))).collect();
            send.extend(callbacks(msg, &value, routes));
            if let Some((next, rest)) = msg.embed.chain.split_last() {
                // The next step: a task, or a group ending the chain (`a | group(b, c)`).
                let mut step = NewTask::apply(next, Some(value.clone()), msg, &route(routes));
                match (next.subtask_type.as_deref(), step.as_mut_slice()) {
                    (None, [t]) => {
                        t.chain = rest.to_vec();
                        t.chain_step = true;
                    }
                    // Celery passes the popped (empty) chain on to a group's members.
                    (Some("group"), members) => {
                        for t in members.iter_mut().filter(|t| t.chain.is_empty()) {
                            t.chain_step = true;
                        }
                    }
                    _ => {}
                }
                send.extend(step);
            }
            let part = chord::part(msg, TaskState::Success, &value);
            (Kind::Success, store_around(ResultMeta::success(&msg.id, value, now), send, part))
        }
        Err(TaskError::Raise(exc)) => {
            let plan = failed(msg, &exc, now, routes);
            (Kind::Failure(exc), plan)
        }
        Err(TaskError::Retry { exc, countdown, changed }) => {
            let mut again = NewTask::retry_of(msg, queue, countdown);
            let changed = changed.map(|c| *c).unwrap_or_default();
            if let Some(args) = changed.args {
                again.args = args;
            }
            if let Some(kwargs) = changed.kwargs {
                again.kwargs = kwargs;
            }
            let plan = Settlement {
                chord: None,
                store_first: Some(ResultMeta::retry(&msg.id, task, &exc)),
                send: vec![again],
                store_with_ack: None,
                requeue: false,
            };
            (Kind::Retry { exc, countdown }, plan)
        }
        Err(TaskError::Reject { exc, requeue: true }) => {
            (Kind::Reject { exc, requeue: true }, Settlement { requeue: true, ..nothing() })
        }
        Err(TaskError::Reject { mut exc, requeue: false }) => {
            // Stored by the worker's request handling, not the tracer: no traceback.
            exc.raised_by_task = false;
            let plan = failed(msg, &exc, now, routes);
            (Kind::Reject { exc, requeue: false }, plan)
        }
        Err(TaskError::Ignore) => (Kind::Ignore, nothing()),
    }
}

/// FAILURE with `exc`: the errbacks, and the chord's count for a header member.
fn failed(msg: &TaskMessage, exc: &ExceptionInfo, now: DateTime<Utc>, routes: &Routes) -> Settlement {
    let send = errbacks(msg, routes);
    let meta = ResultMeta::failure(&msg.id, &msg.task, exc, now);
    let part = chord::part(msg, TaskState::Failure, &exc.to_value());
    store_around(meta, send, part)
}

/// Nothing stored or sent: the message is acknowledged.
fn nothing() -> Settlement {
    Settlement { chord: None, store_first: None, send: Vec::new(), store_with_ack: None, requeue: false }
}

/// The `link` callbacks of `msg`, each called with `value`, as Celery's tracer sends them: a
/// group callback is applied as its own group; the others, if more than one, go as one group
/// (`group(callbacks).apply_async((retval,))`); one alone as itself.
fn callbacks(msg: &TaskMessage, value: &Value, routes: &Routes) -> Vec<NewTask> {
    let route = route(routes);
    let (groups, others): (Vec<&Signature>, Vec<&Signature>) =
        msg.embed.callbacks.iter().partition(|sig| sig.subtask_type.as_deref() == Some("group"));
    let mut send: Vec<NewTask> =
        groups.iter().flat_map(|sig| NewTask::apply(sig, Some(value.clone()), msg, &route)).collect();
    let mut rest: Vec<NewTask> =
        others.iter().flat_map(|sig| NewTask::apply(sig, Some(value.clone()), msg, &route)).collect();
    if others.len() > 1 {
        NewTask::as_group(&mut rest);
    }
    send.extend(rest);
    send
}

/// The routing table as the queue-naming function [`NewTask::apply`] takes.
fn route(routes: &Routes) -> impl Fn(&str) -> String + '_ {
    |task| routes.queue_for(task).to_owned()
}

/// The `link_error` errbacks of `msg`, called with its id.
pub fn errbacks(msg: &TaskMessage, routes: &Routes) -> Vec<NewTask> {
    errback_group(&msg.embed.errbacks, &msg.id, msg.root_id(), msg, routes)
}

/// Errbacks as Celery sends those its worker does not define in-process (every one, from a
/// Rust worker): one group, each called with `(failed_id,)`, `parent_id` the failed task.
pub fn errback_group(
    sigs: &[Signature],
    failed_id: &str,
    root_id: &str,
    parent: &TaskMessage,
    routes: &Routes,
) -> Vec<NewTask> {
    let route = route(routes);
    let mut send: Vec<NewTask> = sigs
        .iter()
        .flat_map(|sig| NewTask::apply(sig, Some(Value::String(failed_id.to_owned())), parent, &route))
        .map(|mut t| {
            t.parent_id = Some(failed_id.to_owned());
            t.root_id = Some(root_id.to_owned());
            t
        })
        .collect();
    NewTask::as_group(&mut send);
    send
}

/// Store with the ack when nothing follows; else first. A chord member's result is stored
/// before its part is counted, as Celery does: whoever sees the chord complete (a client
/// looking at the header group, the body) finds every member's result.
fn store_around(meta: ResultMeta, send: Vec<NewTask>, chord: Option<ChordStep>) -> Settlement {
    if send.is_empty() && chord.is_none() {
        Settlement { chord, store_first: None, send, store_with_ack: Some(meta), requeue: false }
    } else {
        Settlement { chord, store_first: Some(meta), send, store_with_ack: None, requeue: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, json};
    use std::time::Duration;

    fn message(embed: Value) -> TaskMessage {
        let mut t = NewTask::new("tasks.add", vec![json!(1), json!(2)], Map::new(), "celery");
        t.id = "parent-id".into();
        let (bytes, _) = t.to_message("gen1@test");
        // Rewrite the body's embed: [args, kwargs, embed], base64 JSON.
        let mut env: Value = serde_json::from_slice(&bytes).unwrap();
        let body = json!([[1, 2], {}, embed]);
        use base64::Engine as _;
        env["body"] = base64::engine::general_purpose::STANDARD.encode(body.to_string()).into();
        crate::wire::parse_message(env.to_string().as_bytes()).unwrap()
    }

    fn retry(exc: ExceptionInfo, secs: u64) -> TaskError {
        TaskError::Retry { exc, countdown: Duration::from_secs(secs), changed: None }
    }

    fn sig(task: &str, args: Value) -> Value {
        json!({"task": task, "args": args, "kwargs": {}, "options": {}, "subtask_type": null, "immutable": false})
    }

    #[test]
    fn a_plain_success_is_stored_with_the_ack_and_sends_nothing() {
        let msg = message(json!({"callbacks": null, "errbacks": null, "chain": null, "chord": null}));
        let (kind, s) = settle(&msg, Ok(json!(3)), "celery", Utc::now(), &Routes::default());
        assert_eq!(kind, Kind::Success);
        assert!(s.store_first.is_none() && s.send.is_empty());
        assert_eq!(s.store_with_ack.as_ref().map(|m| m.status.as_str()), Some("SUCCESS"));
    }

    #[test]
    fn a_success_with_callbacks_and_a_chain_stores_first_then_sends_each_with_the_result() {
        let chain = json!([sig("tasks.last", json!([])), sig("tasks.next", json!([10]))]);
        let msg = message(
            json!({"callbacks": [sig("tasks.cb", json!([]))], "errbacks": null, "chain": chain, "chord": null}),
        );
        let (_, s) = settle(&msg, Ok(json!(3)), "celery", Utc::now(), &Routes::default());
        assert_eq!(s.store_first.as_ref().map(|m| m.status.as_str()), Some("SUCCESS"));
        assert!(s.store_with_ack.is_none());
        let names: Vec<&str> = s.send.iter().map(|t| t.task.as_str()).collect();
        assert_eq!(names, ["tasks.cb", "tasks.next"], "callbacks first, then the chain's next step (its last element)");
        assert_eq!(s.send[0].args, vec![json!(3)], "the parent's result prepended");
        assert_eq!(s.send[1].args, vec![json!(3), json!(10)]);
        assert_eq!(s.send[1].chain.len(), 1, "the rest of the chain travels with the next step");
        assert!(s.send.iter().all(|t| t.parent_id.as_deref() == Some("parent-id")));
    }

    #[test]
    fn a_chain_in_a_group_or_a_chord_header_carries_the_group_on_its_last_step() {
        let chain = |a: &str, b: &str| {
            json!({"task": "celery.chain", "args": [], "kwargs": {"tasks": [sig(a, json!([])), sig(b, json!([]))]},
                   "options": {}, "subtask_type": "chain", "immutable": false})
        };
        let group = json!({"task": "celery.group", "args": [], "kwargs": {"tasks": [chain("tasks.a", "tasks.b"), sig("tasks.c", json!([]))]},
                           "options": {"task_id": "g1"}, "subtask_type": "group", "immutable": false});
        let msg = message(json!({"callbacks": null, "errbacks": null, "chain": [group.clone()], "chord": null}));
        let (_, s) = settle(&msg, Ok(json!(3)), "celery", Utc::now(), &Routes::default());
        let [first, plain] = s.send.as_slice() else { panic!("{:?}", s.send) };
        assert_eq!(
            (first.task.as_str(), first.group.as_deref()),
            ("tasks.a", None),
            "the chain's first step: no group"
        );
        let last = &first.chain[0];
        assert_eq!((last.option_str("group_id"), last.options.get("group_index")), (Some("g1"), Some(&json!(0))));
        assert_eq!((plain.group.as_deref(), plain.group_index, plain.chain_step), (Some("g1"), Some(1), true));
        let chord = json!({"task": "celery.chord", "args": [], "kwargs": {"header": group, "body": sig("tasks.xsum", json!([])), "kwargs": {}},
                           "options": {}, "subtask_type": "chord", "immutable": false});
        let msg = message(json!({"callbacks": null, "errbacks": null, "chain": [chord], "chord": null}));
        let (_, s) = settle(&msg, Ok(json!(3)), "celery", Utc::now(), &Routes::default());
        let [first, plain] = s.send.as_slice() else { panic!("{:?}", s.send) };
        let last = &first.chain[0];
        assert_eq!(
            last.option_chord().map(|b| b.task),
            Some("tasks.xsum".to_owned()),
            "the body rides on the last step"
        );
        assert_eq!((last.option_str("group_id"), first.group.as_deref()), (Some("g1"), None));
        assert_eq!(plain.chord.as_ref().map(|b| b.task.as_str()), Some("tasks.xsum"));
        assert_eq!(plain.chord_size, Some(("g1".to_owned(), 2)), "the size, set before the last member is sent");
    }

    #[test]
    fn a_failure_with_errbacks_stores_first_and_calls_each_with_the_task_id() {
        let msg = message(
            json!({"callbacks": [sig("tasks.cb", json!([]))], "errbacks": [sig("tasks.on_error", json!([]))], "chain": null, "chord": null}),
        );
        let exc = ExceptionInfo::builtin("ValueError", "bad");
        let (kind, s) = settle(&msg, Err(TaskError::Raise(exc)), "celery", Utc::now(), &Routes::default());
        assert!(matches!(kind, Kind::Failure(ref e) if e.exc_type == "ValueError"), "{kind:?}");
        assert_eq!(s.store_first.as_ref().map(|m| m.status.as_str()), Some("FAILURE"));
        assert_eq!(s.send.len(), 1, "no callback on failure");
        assert_eq!((s.send[0].task.as_str(), s.send[0].args.clone()), ("tasks.on_error", vec![json!("parent-id")]));
        let plain = message(json!({"callbacks": null, "errbacks": null, "chain": null, "chord": null}));
        let (_, s) = settle(
            &plain,
            Err(TaskError::Raise(ExceptionInfo::builtin("ValueError", "bad"))),
            "celery",
            Utc::now(),
            &Routes::default(),
        );
        assert!(s.send.is_empty() && s.store_first.is_none());
        assert_eq!(s.store_with_ack.as_ref().map(|m| m.status.as_str()), Some("FAILURE"));
    }

    #[test]
    fn a_retry_stores_retry_and_sends_the_message_again_to_its_queue() {
        let msg = message(json!({"callbacks": null, "errbacks": null, "chain": null, "chord": null}));
        let exc = ExceptionInfo::builtin("IOError", "again");
        let (kind, s) = settle(&msg, Err(retry(exc, 5)), "q2", Utc::now(), &Routes::default());
        assert!(matches!(kind, Kind::Retry { countdown, .. } if countdown == Duration::from_secs(5)), "{kind:?}");
        assert_eq!(s.store_first.as_ref().map(|m| m.status.as_str()), Some("RETRY"));
        assert!(s.store_with_ack.is_none());
        assert_eq!(s.send.len(), 1);
        let again = &s.send[0];
        assert_eq!((again.id.as_str(), again.retries, again.queue.as_str()), ("parent-id", 1, "q2"));
        assert!(again.eta.is_some(), "after its countdown");
    }

    #[test]
    fn a_chord_member_counts_its_outcome_and_a_retry_keeps_its_chord_and_place() {
        let body = sig("tasks.xsum", json!([]));
        let mut msg = message(json!({"callbacks": null, "errbacks": null, "chain": null, "chord": body}));
        msg.group = Some("g1".into());
        msg.group_index = Some(2);
        let (_, s) = settle(&msg, Ok(json!(3)), "celery", Utc::now(), &Routes::default());
        assert!(s.store_first.is_some() && s.store_with_ack.is_none(), "stored before it counts");
        let step = s.chord.expect("a chord member counts its part");
        assert_eq!((step.part.group_id.as_str(), step.part.score.as_str()), ("g1", "2"));
        let (_, s) = settle(
            &msg,
            Err(TaskError::Raise(ExceptionInfo::builtin("ValueError", "x"))),
            "celery",
            Utc::now(),
            &Routes::default(),
        );
        assert!(s.chord.is_some(), "a failure counts too");
        let exc = ExceptionInfo::builtin("IOError", "again");
        let (_, s) = settle(&msg, Err(retry(exc, 1)), "celery", Utc::now(), &Routes::default());
        assert!(s.chord.is_none(), "a retry does not count yet");
        let again = crate::wire::parse_message(&s.send[0].to_message("gen1@test").0).unwrap();
        assert_eq!((again.group.as_deref(), again.group_index), (Some("g1"), Some(2)));
        assert_eq!(again.embed.chord.map(|b| b.task), Some("tasks.xsum".to_owned()));
    }

    #[test]
    fn a_retry_keeps_custom_headers_and_the_parent_and_may_change_the_arguments() {
        let mut t = NewTask::new("tasks.add", vec![json!(1), json!(2)], Map::new(), "celery");
        t.parent_id = Some("the-caller".into());
        t.root_id = Some("the-root".into());
        t.headers.insert("tenant".into(), json!("acme"));
        let msg = crate::wire::parse_message(&t.to_message("gen1@test").0).unwrap();
        let exc = ExceptionInfo::builtin("IOError", "again");
        let changed = TaskError::Retry {
            exc,
            countdown: Duration::from_secs(1),
            changed: Some(Box::new(crate::task::Arguments {
                args: Some(vec![json!(5)]),
                kwargs: Some(json!({"y": 6}).as_object().unwrap().clone()),
            })),
        };
        let (_, s) = settle(&msg, Err(changed), "celery", Utc::now(), &Routes::default());
        let again = crate::wire::parse_message(&s.send[0].to_message("gen1@test").0).unwrap();
        assert_eq!((again.parent_id.as_deref(), again.root_id.as_deref()), (Some("the-caller"), Some("the-root")));
        assert_eq!(crate::wire::task_write::custom_headers(&again), *json!({"tenant": "acme"}).as_object().unwrap());
        assert_eq!((again.args.clone(), again.kwargs.get("y")), (vec![json!(5)], Some(&json!(6))));
        assert_eq!(again.retries, 1);
    }

    #[test]
    fn reject_requeues_or_fails_and_ignore_stores_nothing() {
        let msg = message(
            json!({"callbacks": null, "errbacks": [sig("tasks.on_error", json!([]))], "chain": null, "chord": null}),
        );
        let (kind, s) = settle(&msg, Err(TaskError::reject("not now", true)), "celery", Utc::now(), &Routes::default());
        assert!(matches!(kind, Kind::Reject { requeue: true, .. }));
        assert!(s.requeue && s.store_first.is_none() && s.store_with_ack.is_none() && s.send.is_empty());
        let (kind, s) = settle(&msg, Err(TaskError::reject("never", false)), "celery", Utc::now(), &Routes::default());
        assert_eq!(kind.state(), "REJECTED");
        assert!(!s.requeue);
        let failure = s.store_first.expect("FAILURE stored before the errback");
        assert_eq!(failure.status.as_str(), "FAILURE");
        assert_eq!(failure.result["exc_type"], "Reject");
        assert_eq!(failure.result["exc_message"], json!(["never", false]));
        assert_eq!(failure.traceback, None);
        assert_eq!(s.send.len(), 1, "errbacks run, as for a failure");
        let (kind, s) = settle(&msg, Err(TaskError::Ignore), "celery", Utc::now(), &Routes::default());
        assert_eq!(kind, Kind::Ignore);
        assert_eq!(s, nothing());
    }
}
