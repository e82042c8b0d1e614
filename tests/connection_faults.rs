//! Faults between the worker and Redis that the kernel does not report, refusals that retrying
//! cannot cure, and a background service that dies: real `redis-server`, the real binary, real
//! Python Celery for `inspect ping`, and a small TCP proxy in this file that can freeze the
//! connections it carries (stop forwarding without closing), as a dead NAT entry or a frozen
//! node leaves them.

mod common;

use common::{Redis, Worker, celery_cli, enqueue, free_port, task, wait_all, wait_for};
use serde_json::json;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A loopback TCP proxy to a Redis port. `freeze_existing` makes every connection it carries
/// stop forwarding, for good, while staying open; `black_hole_new` does the same to each
/// connection accepted while it is on. Dropping the proxy closes everything.
struct FreezingProxy {
    port: u16,
    black_hole: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
    stop: Arc<AtomicBool>,
}

impl FreezingProxy {
    fn start(upstream: u16) -> FreezingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = FreezingProxy { port, black_hole: Arc::default(), conns: Arc::default(), stop: Arc::default() };
        let (black_hole, conns, stop) = (proxy.black_hole.clone(), proxy.conns.clone(), proxy.stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    Err(_) => break,
                };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                let frozen = Arc::new(AtomicBool::new(black_hole.load(Ordering::Relaxed)));
                conns.lock().unwrap().push(frozen.clone());
                for (from, to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
                    let (frozen, stop) = (frozen.clone(), stop.clone());
                    std::thread::spawn(move || forward(from, to, &frozen, &stop));
                }
            }
        });
        proxy
    }

    fn url(&self, db: u8) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    fn freeze_existing(&self) {
        self.conns.lock().unwrap().iter().for_each(|f| f.store(true, Ordering::Relaxed));
    }

    fn black_hole_new(&self, on: bool) {
        self.black_hole.store(on, Ordering::Relaxed);
    }
}

impl Drop for FreezingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Copy `from` → `to` until either closes; once `frozen`, read nothing more and send nothing
/// (what was read but not yet sent is lost, as packets into a dead NAT are), keeping both open.
fn forward(mut from: TcpStream, mut to: TcpStream, frozen: &AtomicBool, stop: &AtomicBool) {
    from.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = [0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        if frozen.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) if !frozen.load(Ordering::Relaxed) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

fn readyz(w: &Worker) -> Option<u16> {
    w.http_get("/readyz").map(|(status, _)| status)
}

fn pings(redis: &Redis, node: &str) -> bool {
    let (_, out) = celery_cli(redis, &["inspect", "ping", "--timeout", "1", "-d", node], Duration::from_secs(30));
    out.contains(node) && out.contains("pong")
}

/// Every connection the worker has goes half-open while it waits for work (its idle take is
/// queued in Redis behind its wait), then, for a while, new ones lead nowhere too. Twenty tasks
/// arrive meanwhile; the first is taken by that queued take, whose reply never comes back.
/// With a 2 s health-check interval the worker notices, is not Ready while it cannot reach
/// Redis, and once new connections work again answers `celery inspect ping`, runs all twenty
/// (the stranded one too, at the default visibility timeout of an hour) each once.
#[test]
fn a_half_open_connection_is_found_by_the_health_check_and_nothing_is_stranded() {
    let redis = Redis::start();
    let proxy = FreezingProxy::start(redis.port);
    let node = "halfopen@tests";
    let w = Worker::spawn_urls(
        &proxy.url(0),
        &proxy.url(1),
        free_port(),
        &["--concurrency", "2", "--health-check-interval", "2", "--hostname", node],
    );
    w.wait_ready(Duration::from_secs(20));
    let warmup = enqueue(&redis, &[0, 1, 2].map(|_| task("tasks.io_bound", vec![json!(0.05)])));
    wait_all(&redis, &warmup, "SUCCESS", Duration::from_secs(20));
    wait_for("inspect ping through the proxy", Duration::from_secs(30), || pings(&redis, node).then_some(()));
    // Idle again: the worker's take now waits in Redis behind its BLMOVE.
    std::thread::sleep(Duration::from_secs(2));

    proxy.freeze_existing();
    proxy.black_hole_new(true);
    let frozen_at = Instant::now();
    let ids = enqueue(&redis, &[(); 20].map(|()| task("tasks.io_bound", vec![json!(0.05)])));
    wait_for("/readyz to say not ready while Redis cannot be reached", Duration::from_secs(15), || {
        (readyz(&w) == Some(503)).then_some(())
    });
    let noticed = frozen_at.elapsed();
    // Stay cut off a while longer, then let new connections through; the old ones stay frozen.
    std::thread::sleep(Duration::from_secs(8).saturating_sub(frozen_at.elapsed()));
    assert_eq!(readyz(&w), Some(503), "not Ready while every connection is dead:\n{}", w.log_text());
    proxy.black_hole_new(false);
    let healed_at = Instant::now();

    wait_all(&redis, &ids, "SUCCESS", Duration::from_secs(15));
    let drained = healed_at.elapsed();
    wait_for("inspect ping to answer again", Duration::from_secs(15), || pings(&redis, node).then_some(()));
    let answering = healed_at.elapsed();
    wait_for("/readyz = 200 again", Duration::from_secs(10), || (readyz(&w) == Some(200)).then_some(()));
    eprintln!(
        "not Ready {noticed:?} after the freeze; after healing: all done in {drained:?}, ping answered by {answering:?}"
    );

    let mut started = w.started_task_ids();
    started.sort();
    let mut want: Vec<String> = warmup.iter().chain(&ids).cloned().collect();
    want.sort();
    assert_eq!(started, want, "each task ran exactly once");
    wait_for("unacked to empty", Duration::from_secs(10), || (redis.unacked() == 0).then_some(()));
    let log = w.log_text();
    assert!(log.contains("a take whose reply was lost had taken a message"), "the stranded take was found:\n{log}");
    assert!(
        log.contains("health-check the remote-control (pidbox) subscription")
            || log.contains("subscribe to remote control"),
        "{log}"
    );
}

/// A Redis user that may not run the take script: one clear error naming the setting and the
/// fix (and not the password), no endless retry, the worker exits 1, and the queue is untouched.
#[test]
fn a_refused_take_script_stops_the_worker_with_one_clear_error() {
    let redis = Redis::start();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "limited", "on", ">s3cret-pw", "~*", "&*", "+@all", "-evalsha", "-eval"][..])
        .query(&mut redis.conn(0))
        .unwrap();
    let ids = enqueue(&redis, &[task("tasks.io_bound", vec![json!(0.05)])]);
    let url = |db| redis.url(db).replacen("redis://", "redis://limited:s3cret-pw@", 1);
    let mut w = Worker::spawn_urls(&url(0), &url(1), free_port(), &[]);
    let status = w.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{}", w.log_text());
    let log = w.log_text();
    assert_eq!(log.matches("no permissions to run the 'evalsha' command").count(), 1, "said once:\n{log}");
    assert!(log.contains("BROKER_URL=redis://limited:***@") && log.contains("README: Redis ACLs"), "{log}");
    assert!(!log.contains("s3cret-pw"), "{log}");
    assert!(!log.contains("retrying with backoff"), "no retry of a refusal:\n{log}");
    assert_eq!(redis.depth("celery"), 1, "the message is still queued");
    assert_eq!(redis.unacked(), 0);
    assert_eq!(redis.status(&ids[0]), None);
}

/// A background service that dies (here the lease renewer, through a test hook that makes it
/// panic two seconds in, while a 3 s task runs): the worker stops being Ready, lets the running
/// task finish, says which service ended and why, and exits 1 — it does not run on without
/// leases.
#[test]
fn a_background_service_that_ends_stops_the_worker() {
    let redis = Redis::start();
    // Without mingle's 1 s wait for peers, the worker is Ready well before the hook fires.
    let mut w = Worker::spawn_with_env(
        &redis,
        free_port(),
        &["--without-mingle"],
        &[(celery_autoscale::worker::END_SERVICE_ENV, "lease renewer")],
    );
    w.wait_ready(Duration::from_secs(20));
    let ids = enqueue(&redis, &[task("tasks.io_bound", vec![json!(3)])]);
    let mut saw_not_ready = false;
    let status = loop {
        if let Some(status) = w.child.try_wait().unwrap() {
            break status;
        }
        saw_not_ready |= readyz(&w).is_some_and(|s| s == 503);
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = w.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(saw_not_ready, "not Ready while it drained:\n{log}");
    assert_eq!(log.matches("lease renewer service panicked").count(), 1, "{log}");
    assert_eq!(redis.status(&ids[0]).as_deref(), Some("SUCCESS"), "the running task finished:\n{log}");
}
