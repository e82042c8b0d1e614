//! Where the follow-ups this worker sends go when their signature names no queue: a routing
//! table like Celery's `task_routes` (task name or glob → queue), else Celery's default queue.
//!
//! `--task-routes 'tasks.io_*=io,tasks.cpu_bound=cpu'` (env `WORKER_TASK_ROUTES`): entries are
//! tried in order and the first match wins, as a `task_routes` list of dicts is; `*` matches any
//! run of characters and `?` one, as Celery's glob routes do. A signature's own `queue` (or
//! `routing_key`) always wins over the table, as it does in Celery.

use crate::wire::keys;

/// The routing table: `(pattern, queue)` pairs, in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Routes(Vec<(String, String)>);

impl Routes {
    /// The queue a follow-up of `task` goes to when its signature names none.
    pub fn queue_for(&self, task: &str) -> &str {
        self.0.iter().find(|(pattern, _)| glob_match(pattern, task)).map_or(keys::DEFAULT_QUEUE, |(_, q)| q)
    }
}

/// Parse `pattern=queue[,pattern=queue...]` (`--task-routes`); empty gives no routes.
pub fn parse(s: &str) -> Result<Routes, String> {
    let mut routes = Vec::new();
    for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let Some((pattern, queue)) = entry.split_once('=') else {
            return Err(format!("{entry:?} is not `task-name-or-glob=queue` (e.g. `tasks.io_*=io`)"));
        };
        let (pattern, queue) = (pattern.trim(), queue.trim());
        if pattern.is_empty() || queue.is_empty() {
            return Err(format!("{entry:?} needs both a task name (or glob) and a queue, as in `tasks.io_*=io`"));
        }
        routes.push((pattern.to_owned(), queue.to_owned()));
    }
    Ok(Routes(routes))
}

/// `*` any run of characters, `?` any one; everything else literal.
fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Iterative matching with one backtrack point (the last `*`): linear in practice.
    let (mut i, mut j, mut star, mut mark) = (0, 0, None, 0);
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some(i);
            mark = j;
            i += 1;
        } else if let Some(s) = star {
            i = s + 1;
            mark += 1;
            j = mark;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_match_wins_and_the_default_queue_is_celerys() {
        let r = parse("tasks.io_*=io, tasks.*=rest").unwrap();
        assert_eq!(r.queue_for("tasks.io_bound"), "io");
        assert_eq!(r.queue_for("tasks.cpu_bound"), "rest");
        assert_eq!(r.queue_for("other.task"), "celery");
        assert_eq!(parse("").unwrap().queue_for("tasks.io_bound"), "celery");
    }

    #[test]
    fn globs_match_as_celerys_do() {
        assert!(glob_match("tasks.*", "tasks.a"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("*.x*y", "a.b.xzzy"));
        assert!(!glob_match("tasks.a", "tasks.ab"));
        assert!(glob_match("tasks.a*", "tasks.a"));
    }

    #[test]
    fn bad_entries_say_what_to_write() {
        let err = parse("tasks.a").unwrap_err();
        assert!(err.contains("task-name-or-glob=queue"), "{err}");
        assert!(parse("=q").unwrap_err().contains("needs both"));
        assert!(parse("a=").unwrap_err().contains("needs both"));
    }
}
