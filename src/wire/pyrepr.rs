//! Python `repr()` of JSON values, for the `argsrepr`/`kwargsrepr` headers that Celery's logs,
//! events and Flower display. Mirrors `reprlib`-style truncation at Celery's 1024 characters.

use super::result::ExceptionInfo;
use serde_json::{Map, Value};

const MAX_REPR: usize = 1024;

/// `repr(list(args))`, as `send_task` produces it.
pub fn args_repr(args: &[Value]) -> String {
    let mut s = String::from("[");
    for (i, v) in args.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        repr_into(v, &mut s);
    }
    s.push(']');
    truncate(s)
}

/// `repr(tuple(args))`, as a follow-up sent through a `Signature` shows it: `()`, `(x,)`,
/// `(a, b)`.
pub fn args_tuple_repr(args: &[Value]) -> String {
    let mut s = String::from("(");
    for (i, v) in args.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        repr_into(v, &mut s);
    }
    if args.len() == 1 {
        s.push(',');
    }
    s.push(')');
    truncate(s)
}

/// `repr(dict(kwargs))`.
pub fn kwargs_repr(kwargs: &Map<String, Value>) -> String {
    let mut s = String::new();
    repr_object(kwargs, &mut s);
    truncate(s)
}

/// `repr(value)`, e.g. a task's return value in a `task-succeeded` event.
pub fn repr(v: &Value) -> String {
    let mut s = String::new();
    repr_into(v, &mut s);
    truncate(s)
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_REPR {
        let mut cut = MAX_REPR - 3;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

fn repr_into(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => repr_str(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                repr_into(item, out);
            }
            out.push(']');
        }
        Value::Object(m) => repr_object(m, out),
    }
}

fn repr_object(m: &Map<String, Value>, out: &mut String) {
    out.push('{');
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        repr_str(k, out);
        out.push_str(": ");
        repr_into(v, out);
    }
    out.push('}');
}

/// Python's string repr: single quotes unless the text has a `'` and no `"`.
fn repr_str(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python's `repr(exc)`: `ValueError('bad')`.
pub fn exception_repr(exc: &ExceptionInfo) -> String {
    let args: Vec<String> = exc.exc_message.iter().map(repr).collect();
    format!("{}({})", exc.exc_type, args.join(", "))
}

/// Python's repr of a set of strings, sorted (Python's own order is a hash's): `{'a', 'b'}`,
/// or `set()`. Celery's revoke reply prints one.
pub fn set_repr(items: &[String]) -> String {
    if items.is_empty() {
        return "set()".into();
    }
    let unique: Vec<String> = items
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|i| repr(&Value::String(i.clone())))
        .collect();
    format!("{{{}}}", unique.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn exception_repr_is_pythons() {
        assert_eq!(exception_repr(&ExceptionInfo::builtin("ValueError", "bad")), "ValueError('bad')");
        assert_eq!(exception_repr(&ExceptionInfo::new("m", "E", vec![])), "E()");
        assert_eq!(exception_repr(&ExceptionInfo::new("m", "E", vec![json!(1), json!("it's")])), "E(1, \"it's\")");
    }

    #[test]
    fn matches_python_repr() {
        // repr([2, 3]) / repr([1, 2.5, 's', None, True, [1, 2], {'a': 1}]) in Python
        assert_eq!(args_repr(&[json!(2), json!(3)]), "[2, 3]");
        assert_eq!(args_tuple_repr(&[]), "()");
        assert_eq!(args_tuple_repr(&[json!([25, 168])]), "([25, 168],)");
        assert_eq!(args_tuple_repr(&[json!(1), json!("a")]), "(1, 'a')");
        let v = json!([1, 2.5, "s", null, true, [1, 2], {"a": 1}]);
        assert_eq!(args_repr(v.as_array().unwrap()), "[1, 2.5, 's', None, True, [1, 2], {'a': 1}]");
        assert_eq!(args_repr(&[json!("it's")]), "[\"it's\"]");
        assert_eq!(kwargs_repr(json!({"x": 2, "y": "a\nb"}).as_object().unwrap()), "{'x': 2, 'y': 'a\\nb'}");
    }

    #[test]
    fn long_reprs_are_truncated_on_a_char_boundary() {
        let long = json!("é".repeat(2000));
        let r = args_repr(&[long]);
        assert!(r.len() <= MAX_REPR && r.ends_with("..."));
    }
}
