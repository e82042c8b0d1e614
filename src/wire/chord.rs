//! The values of Celery's Redis chord join (celery-wire.md §2.4): each header task's entry in
//! `celery-taskset-meta-<group_id>.j`, and the join of those entries into the body's argument
//! or the `ChordError` its errbacks get. Pure: the keys are in [`super::keys::chord_keys`], the
//! script that writes them in `transport::scripts::CHORD_PART`.

use super::pyjson;
use super::pyrepr::exception_repr;
use super::result::{ExceptionInfo, TaskState};
use serde_json::Value;

/// The states whose entry fails the chord (Celery's `PROPAGATE_STATES`).
const PROPAGATE: [&str; 2] = ["FAILURE", "REVOKED"];
/// The states whose result is a serialised exception (Celery's `EXCEPTION_STATES`).
const EXCEPTION: [&str; 3] = ["RETRY", "FAILURE", "REVOKED"];

/// A header task's entry in `.j`: `[1, task_id, state, result]` in Python's JSON, the result
/// as the backend encodes it (an exception as `{exc_type, exc_message, exc_module}`).
pub fn part_entry(task_id: &str, state: TaskState, result: &Value) -> Vec<u8> {
    pyjson::to_vec(&(1, task_id, state.as_str(), result))
}

/// The score a member's entry gets in the sorted set, and the second half of its `.d`
/// member: its `group_index`, or `+inf` when the producer sent none (as Celery does).
pub fn part_score(group_index: Option<i64>) -> String {
    group_index.map_or_else(|| "+inf".to_owned(), |i| i.to_string())
}

/// Why a chord cannot call its body.
#[derive(Clone, Debug, PartialEq)]
pub enum JoinError {
    /// A header task failed or was revoked: `ChordError("Dependency <id> raised <repr>")`, for
    /// the first such entry in join order.
    Dependency { task_id: String, exc: ExceptionInfo },
    /// An entry could not be read (Celery: `ChordError("Join error: ...")`).
    Unreadable(String),
}

impl JoinError {
    /// The `ChordError` the body is failed with and its errbacks find.
    pub fn chord_error(&self) -> ExceptionInfo {
        let message = match self {
            JoinError::Dependency { task_id, exc } => format!("Dependency {task_id} raised {}", exception_repr(exc)),
            JoinError::Unreadable(why) => format!("Join error: {why}"),
        };
        ExceptionInfo::new("celery.exceptions", "ChordError", vec![Value::String(message)])
    }
}

/// The header results in join order (the order the script returned the entries in), or the
/// error that fails the chord, as Celery's `_unpack_chord_result` decides it.
pub fn join(entries: &[Vec<u8>]) -> Result<Vec<Value>, JoinError> {
    entries.iter().map(|e| unpack(e)).collect()
}

fn unpack(entry: &[u8]) -> Result<Value, JoinError> {
    let shown = || String::from_utf8_lossy(&entry[..entry.len().min(200)]).into_owned();
    let parts: Value = serde_json::from_slice(entry)
        .map_err(|e| JoinError::Unreadable(format!("entry {:?} is not JSON ({e})", shown())))?;
    let Value::Array(mut parts) = parts else {
        return Err(JoinError::Unreadable(format!("entry {:?} is not a list", shown())));
    };
    if parts.len() != 4 {
        return Err(JoinError::Unreadable(format!("entry {:?} has {} items, expected 4", shown(), parts.len())));
    }
    let result = parts.pop().unwrap_or(Value::Null);
    let (Some(state), Some(task_id)) = (parts[2].as_str(), parts[1].as_str()) else {
        return Err(JoinError::Unreadable(format!("entry {:?} has no task id and state", shown())));
    };
    if !EXCEPTION.contains(&state) {
        return Ok(result);
    }
    let exc = exception(&result)
        .ok_or_else(|| JoinError::Unreadable(format!("entry {:?}: {state} without an exception", shown())))?;
    if PROPAGATE.contains(&state) {
        return Err(JoinError::Dependency { task_id: task_id.to_owned(), exc });
    }
    Ok(result)
}

/// `{exc_type, exc_message, exc_module}` back to an exception (a bare message is its only
/// argument, as Celery's `exception_to_python` takes it).
fn exception(v: &Value) -> Option<ExceptionInfo> {
    let exc_type = v.get("exc_type")?.as_str()?;
    let module = v.get("exc_module").and_then(Value::as_str).unwrap_or("builtins");
    let args = match v.get("exc_message") {
        Some(Value::Array(a)) => a.clone(),
        None | Some(Value::Null) => Vec::new(),
        Some(other) => vec![other.clone()],
    };
    Some(ExceptionInfo::new(module, exc_type, args))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn entries_are_pythons_json() {
        assert_eq!(part_entry("t1", TaskState::Success, &json!(25)), br#"[1, "t1", "SUCCESS", 25]"#);
        let exc = ExceptionInfo::builtin("ValueError", "bad").to_value();
        assert_eq!(
            String::from_utf8(part_entry("t2", TaskState::Failure, &exc)).unwrap(),
            r#"[1, "t2", "FAILURE", {"exc_type": "ValueError", "exc_message": ["bad"], "exc_module": "builtins"}]"#
        );
        assert_eq!((part_score(Some(3)), part_score(None)), ("3".to_owned(), "+inf".to_owned()));
    }

    #[test]
    fn the_join_keeps_order_and_fails_on_the_first_failed_member() {
        let ok = |id: &str, v: Value| part_entry(id, TaskState::Success, &v);
        assert_eq!(join(&[ok("a", json!(1)), ok("b", json!([2]))]), Ok(vec![json!(1), json!([2])]));
        let bad = part_entry("b", TaskState::Failure, &ExceptionInfo::builtin("TypeError", "no 'x'").to_value());
        let revoked = part_entry("c", TaskState::Revoked, &ExceptionInfo::revoked("revoked").to_value());
        let err = join(&[ok("a", json!(1)), bad, revoked]).unwrap_err();
        assert_eq!(
            err.chord_error().exc_message,
            vec![json!("Dependency b raised TypeError(\"no 'x'\")")],
            "Python's repr picks the quotes"
        );
        assert_eq!(err.chord_error().exc_module, "celery.exceptions");
    }

    #[test]
    fn unreadable_entries_are_a_join_error_not_a_panic() {
        for entry in [&b"not json"[..], b"{}", b"[1, 2]", b"[1, null, null, 3]", b"[1, \"t\", \"FAILURE\", 3]", b""] {
            let err = join(&[entry.to_vec()]).unwrap_err();
            assert!(matches!(err, JoinError::Unreadable(_)), "{err:?}");
            let msg = err.chord_error().exc_message[0].as_str().unwrap().to_owned();
            assert!(msg.starts_with("Join error: "), "{msg}");
        }
    }
}
