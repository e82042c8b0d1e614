//! Fair queues: one worker consuming two queues, a deep one and a shallow one, sent in Celery's
//! message format. With kombu's default `round_robin` order the shallow queue's messages
//! are all done early (a queue moves to the end of the cycle once a message is taken from it);
//! with the fixed `priority` order the deep queue is drained first. The completion order comes
//! from the results' `date_done` (one run slot, so it is the order the tasks ran in).

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

const DEEP: usize = 2_000;
const SHALLOW: usize = 20;
const WAIT: Duration = Duration::from_secs(300);

/// Send `n` `tasks.io_bound(0)` to `queue` (Celery's message format, pipelined LPUSHes: a
/// Python client takes minutes for 2 000 on this loaded machine).
fn send(redis: &Redis, queue: &str, n: usize) -> Vec<String> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let mut t = task("tasks.io_bound", vec![json!(0)]);
            t.queue = queue.to_owned();
            t
        })
        .collect();
    enqueue(redis, &tasks)
}

/// Run DEEP messages on `deep` and SHALLOW on `shallow` (both queued before the worker starts)
/// with `extra` worker flags; returns the 1-based completion positions of the shallow queue's
/// messages and the position at which the deep queue's 200th message finished.
fn completion_positions(extra: &[&str]) -> (Vec<usize>, usize) {
    let redis = Redis::start();
    let deep = send(&redis, "deep", DEEP);
    let shallow = send(&redis, "shallow", SHALLOW);
    assert_eq!((redis.depth("deep"), redis.depth("shallow")), (DEEP, SHALLOW));
    let mut args = vec!["--queues", "deep,shallow", "--concurrency", "1"];
    args.extend_from_slice(extra);
    let _worker = Worker::start(&redis, &args);
    let all: Vec<String> = deep.iter().chain(&shallow).cloned().collect();
    wait_all(&redis, &all, "SUCCESS", WAIT);
    // ISO 8601 times of one format sort as strings.
    let mut done: Vec<(String, bool)> = all
        .iter()
        .map(|id| {
            let r = redis.result(id).unwrap();
            (r["date_done"].as_str().unwrap_or_else(|| panic!("no date_done: {r}")).to_owned(), shallow.contains(id))
        })
        .collect();
    done.sort();
    let positions: Vec<usize> = done.iter().enumerate().filter(|(_, (_, s))| *s).map(|(i, _)| i + 1).collect();
    let deep_200th = done.iter().enumerate().filter(|(_, (_, s))| !*s).nth(199).map(|(i, _)| i + 1).unwrap();
    (positions, deep_200th)
}

#[test]
fn round_robin_serves_a_shallow_queue_beside_a_deep_one() {
    let (shallow, deep_200th) = completion_positions(&[]);
    println!(
        "round_robin: the shallow queue's {SHALLOW} finished at positions {shallow:?}; the deep queue's 200th at {deep_200th}"
    );
    let last = *shallow.iter().max().unwrap();
    assert!(
        last < deep_200th,
        "round robin: every shallow message before the deep queue's 200th ({last} vs {deep_200th})"
    );
}

#[test]
fn the_priority_order_drains_the_first_queue_first() {
    let (shallow, deep_200th) = completion_positions(&["--queue-order-strategy", "priority"]);
    println!(
        "priority: the shallow queue's {SHALLOW} finished at positions {shallow:?}; the deep queue's 200th at {deep_200th}"
    );
    let first = *shallow.iter().min().unwrap();
    assert!(first > deep_200th, "priority: the deep queue first ({first} vs {deep_200th})");
    assert!(first > DEEP * 9 / 10, "the deep queue's messages mostly finish first: the first shallow one at {first}");
}
