//! `sentinel://` on loopback: one master, one replica, three sentinels (`redis-server
//! --sentinel` with generated configs and a 1 s down-after). A worker and an exporter connect
//! through the sentinels; the master is SIGKILLed mid-burst; both follow the failover by
//! themselves and every task completes on the promoted replica. Bounded: 400 short tasks, the
//! whole test well under two minutes. Passwords everywhere: the master's in the URL (as kombu
//! takes it), the sentinels' own as `sentinel_password`.

mod common;

use common::{Exporter, Proc, Worker, enqueue_on, free_port, task, wait_for};
use serde_json::{Value, json};
use std::process::Command;
use std::time::{Duration, Instant};

const MASTER: &str = "mymaster";
/// The master's (and replica's) password, given in the URL as kombu does.
const MASTER_PW: &str = "m4ster";
/// The sentinels' own password, given as `sentinel_password` (celery/celery#8016).
const SENTINEL_PW: &str = "s3ntinel";

struct Cluster {
    master: Proc,
    master_port: u16,
    _replica: Proc,
    replica_port: u16,
    _sentinels: Vec<Proc>,
    sentinel_ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

/// A data node (master or replica).
fn conn(port: u16, db: u8) -> redis::Connection {
    redis::Client::open(format!("redis://:{MASTER_PW}@127.0.0.1:{port}/{db}"))
        .unwrap()
        .get_connection()
        .expect("connect")
}

fn try_conn(port: u16, password: &str) -> Option<redis::Connection> {
    redis::Client::open(format!("redis://:{password}@127.0.0.1:{port}/0")).ok()?.get_connection().ok()
}

/// A data node with its own directory (a replica writes the RDB of its initial sync there).
fn redis_server(port: u16, dir: &std::path::Path, extra: &[&str]) -> Proc {
    std::fs::create_dir_all(dir).unwrap();
    let p = Proc::spawn(
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .args(["--requirepass", MASTER_PW, "--masterauth", MASTER_PW])
            .args(extra),
    );
    wait_for("redis-server up", Duration::from_secs(10), || try_conn(port, MASTER_PW).map(|_| ()));
    p
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let master_port = free_port();
        let master = redis_server(master_port, &dir.path().join("master"), &[]);
        let replica_port = free_port();
        let replica = redis_server(
            replica_port,
            &dir.path().join("replica"),
            &["--replicaof", "127.0.0.1", &master_port.to_string()],
        );
        wait_for("replica in sync", Duration::from_secs(20), || {
            let info: String = redis::cmd("INFO").arg("replication").query(&mut conn(replica_port, 0)).ok()?;
            info.contains("master_link_status:up").then_some(())
        });
        let mut sentinels = Vec::new();
        let mut sentinel_ports = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let conf = dir.path().join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {MASTER} 1000\nsentinel failover-timeout {MASTER} 4000\n\
                     sentinel parallel-syncs {MASTER} 1\nsentinel auth-pass {MASTER} {MASTER_PW}\n\
                     requirepass {SENTINEL_PW}\nsentinel sentinel-pass {SENTINEL_PW}\n",
                    dir.path().display()
                ),
            )
            .unwrap();
            sentinels.push(Proc::spawn(Command::new("redis-server").arg(&conf).arg("--sentinel")));
            sentinel_ports.push(port);
        }
        // Each sentinel must know the replica and the two other sentinels before a failover can
        // be agreed on (they find each other through the master's hello channel).
        for &port in &sentinel_ports {
            wait_for("sentinel knows the replica and its peers", Duration::from_secs(30), || {
                let mut c = try_conn(port, SENTINEL_PW)?;
                let replicas: Vec<redis::Value> =
                    redis::cmd("SENTINEL").arg("replicas").arg(MASTER).query(&mut c).ok()?;
                let peers: Vec<redis::Value> =
                    redis::cmd("SENTINEL").arg("sentinels").arg(MASTER).query(&mut c).ok()?;
                (replicas.len() == 1 && peers.len() == 2).then_some(())
            });
        }
        Cluster {
            master,
            master_port,
            _replica: replica,
            replica_port,
            _sentinels: sentinels,
            sentinel_ports,
            _dir: dir,
        }
    }

    fn url(&self, db: u8) -> String {
        let hosts: Vec<String> =
            self.sentinel_ports.iter().map(|p| format!("sentinel://:{MASTER_PW}@127.0.0.1:{p}")).collect();
        format!("{}/{db}?sentinel_password={SENTINEL_PW}", hosts.join(";"))
    }

    /// The master's port according to the first sentinel that answers.
    fn current_master(&self) -> Option<u16> {
        self.sentinel_ports.iter().find_map(|&p| {
            let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(MASTER)
                .query(&mut try_conn(p, SENTINEL_PW)?)
                .ok()?;
            addr.map(|(_, port)| port)
        })
    }
}

fn statuses(port: u16, ids: &[String]) -> Vec<Option<String>> {
    let keys: Vec<String> = ids.iter().map(|i| format!("celery-task-meta-{i}")).collect();
    let raw: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut conn(port, 1)).unwrap();
    raw.into_iter()
        .map(|r| r.and_then(|r| serde_json::from_str::<Value>(&r).ok()?["status"].as_str().map(str::to_owned)))
        .collect()
}

fn succeeded(port: u16, ids: &[String]) -> usize {
    statuses(port, ids).iter().filter(|s| s.as_deref() == Some("SUCCESS")).count()
}

#[test]
fn worker_and_exporter_follow_a_failover_and_no_task_is_lost() {
    let started = Instant::now();
    let mut cluster = Cluster::start();
    let (broker, backend) = (cluster.url(0), cluster.url(1));
    let worker = Worker::spawn_urls(
        &broker,
        &backend,
        free_port(),
        &["--sentinel-master", MASTER, "--concurrency", "8", "--visibility-timeout", "4", "--restore-interval", "1"],
    );
    worker.wait_ready(Duration::from_secs(30));
    // The exporter takes the master name from the environment, as a Kubernetes pod would.
    let exporter = Exporter::start_with_env(&broker, "celery", &[], &[("SENTINEL_MASTER", MASTER)]);
    exporter.wait_value("celery_queue_exporter_last_poll_ok", "", Some(1.0));

    let tasks: Vec<_> = (0..400).map(|i| task("tasks.io_bound", vec![json!(0.05 + (i % 4) as f64 * 0.02)])).collect();
    let ids = enqueue_on(&mut conn(cluster.master_port, 0), &tasks);
    // The burst is on the replica before the kill: what this test measures is the consumers'
    // side. (A producer's writes in the last moment before a crash are the replication window
    // docs/Reliability.md describes; WAIT is how a producer closes it.)
    let acked: i64 = redis::cmd("WAIT").arg(1).arg(5000).query(&mut conn(cluster.master_port, 0)).unwrap();
    assert_eq!(acked, 1, "replica acknowledged the burst");
    wait_for("a quarter of the burst done", Duration::from_secs(60), || {
        (succeeded(cluster.master_port, &ids) >= 100).then_some(())
    });
    let done_before_kill = succeeded(cluster.master_port, &ids);
    cluster.master.kill();
    let killed_at = Instant::now();

    let new_master = wait_for("the sentinels to promote the replica", Duration::from_secs(30), || {
        cluster.current_master().filter(|&p| p == cluster.replica_port)
    });
    let promoted_after = killed_at.elapsed();
    // Both follow by themselves: the exporter polls again, the worker finishes the burst.
    exporter.wait_value("celery_queue_exporter_last_poll_ok", "", Some(1.0));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = succeeded(new_master, &ids);
        if done == ids.len() {
            break;
        }
        if Instant::now() > deadline {
            let missing: Vec<&String> =
                ids.iter().zip(statuses(new_master, &ids)).filter(|(_, s)| s.is_none()).map(|(i, _)| i).collect();
            panic!(
                "{} of {} tasks lost after the failover (first {:?}); worker log:\n{}",
                ids.len() - done,
                ids.len(),
                missing.first(),
                worker.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    exporter.wait_value("celery_queue_depth", "queue=\"celery\"", Some(0.0));
    let recovered_after = killed_at.elapsed();
    let runs = worker.started_task_ids();
    let unique: std::collections::HashSet<&String> = runs.iter().collect();
    eprintln!(
        "sentinel failover: {done_before_kill}/400 done at the kill, replica promoted after {promoted_after:.1?}, \
         all 400 done after {recovered_after:.1?}, 0 lost, {} run twice (at-least-once); whole test {:.1?}",
        runs.len() - unique.len(),
        started.elapsed()
    );
    let log = worker.log_text();
    assert!(log.contains("reachable again"), "the worker noticed the outage and its end:\n{log}");
    for text in [log, exporter.log_text()] {
        assert!(!text.contains(MASTER_PW) && !text.contains(SENTINEL_PW), "a password was logged:\n{text}");
    }
}
