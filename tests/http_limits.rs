//! The HTTP endpoints under a flood of idle and half-sent-header connections (loopback, 300 of
//! them, all closed by the end): `/healthz` keeps answering, the worker keeps running tasks, the
//! process's descriptors stay bounded, and every flood connection is closed — the ones beyond the
//! limit at once, the rest by the header timeout — rather than held open forever.

mod common;

use celery_autoscale::runtime::http::{HEADER_TIMEOUT, MAX_CONNECTIONS};
use common::{Redis, Worker, enqueue, task, wait_all, wait_for};
use serde_json::json;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const FLOOD: usize = 300;

fn closed(mut s: &TcpStream) -> bool {
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => true,
        // An answer (a 408 for a timed-out header) is followed by the close; read on.
        Ok(_) => closed(s),
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn a_flood_of_idle_and_half_sent_connections_neither_hangs_nor_starves_the_probes() {
    let redis = Redis::start();
    let worker = Worker::start(&redis, &["--concurrency", "4"]);
    let baseline_fds = open_fds(worker.child.id());

    let flood: Vec<TcpStream> = (0..FLOOD)
        .map(|i| {
            let mut s = TcpStream::connect(("127.0.0.1", worker.metrics_port)).expect("connect");
            if i % 2 == 1 {
                // Half a request header, never finished.
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n").unwrap();
            }
            s.set_read_timeout(Some(Duration::from_millis(2))).unwrap();
            s
        })
        .collect();

    // The probes answer while the flood is open, and tasks still run.
    for _ in 0..10 {
        assert_eq!(worker.http_get("/healthz").map(|(s, _)| s), Some(200), "/healthz answers during the flood");
    }
    let ids = enqueue(&redis, &(0..40).map(|_| task("tasks.io_bound", vec![json!(0.01)])).collect::<Vec<_>>());
    wait_all(&redis, &ids, "SUCCESS", Duration::from_secs(60));
    let fds = open_fds(worker.child.id());
    assert!(
        fds <= baseline_fds + MAX_CONNECTIONS + 16,
        "descriptors bounded by the connection limit: {fds} open, {baseline_fds} before the flood"
    );

    // Beyond the limit: closed at once (the oldest go first).
    wait_for("connections beyond the limit closed", Duration::from_secs(10), || {
        let n = flood.iter().filter(|s| closed(s)).count();
        (n >= FLOOD - MAX_CONNECTIONS).then_some(())
    });
    // The rest: closed by the header timeout, none hung.
    let start = std::time::Instant::now();
    wait_for("every flood connection closed", HEADER_TIMEOUT * 3, || flood.iter().all(closed).then_some(()));
    eprintln!(
        "flood of {FLOOD}: worker fds {baseline_fds} before, {fds} during; all closed {:.1?} after the tasks finished",
        start.elapsed()
    );

    // A keep-alive connection idle after a complete request is closed too.
    let mut keep = TcpStream::connect(("127.0.0.1", worker.metrics_port)).unwrap();
    keep.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    keep.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    wait_for("an idle keep-alive connection closed", HEADER_TIMEOUT * 3, || closed(&keep).then_some(()));
    assert_eq!(worker.http_get("/healthz").map(|(s, _)| s), Some(200));
}
