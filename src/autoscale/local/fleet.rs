//! The local replica set: one process per replica, started, stopped and replaced as a
//! ReplicaSet and the kubelet would do it for pods.
//!
//! Two kinds of worker. Our own `celery-autoscale worker` serves `/readyz` and `/metrics`, so
//! `local` knows when it is ready, how busy it is and how many tasks it ran. A foreign worker
//! (`--worker-command`, e.g. a Python `celery worker`) is a black box: it is *ready* once it has
//! stayed alive for `--worker-ready-after` seconds (a pod with a start-up delay and no probe),
//! and a scale-down stops the *newest* first, as a ReplicaSet does when it cannot tell pods
//! apart: the newest has had the least time to take work, so stopping it hands back the least.

use super::{free_loopback_port, send_signal};
use crate::autoscale::scrape;
use crate::runtime::metrics::{TASK_FAILURE, TASK_SUCCESS, WORKER_ACTIVE, WORKER_RESERVED};
use rustix::process::Signal;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// A stopping worker gets this much longer than its own shutdown timeout before SIGKILL (the
/// pod's terminationGracePeriodSeconds over the worker's --shutdown-timeout).
const KILL_MARGIN: Duration = Duration::from_secs(10);
/// A worker that dies sooner than this after starting counts toward the crash-loop backoff.
const QUICK_DEATH: Duration = Duration::from_secs(10);

/// What a replica runs.
#[derive(Clone, Debug)]
pub(super) enum WorkerKind {
    /// `celery-autoscale worker` (this very program).
    Own { exe: PathBuf, concurrency: u32 },
    /// A user's command line, split into argv (no shell).
    Command { argv: Vec<String>, ready_after: Duration },
}

/// Something the fleet did that the user should hear about.
pub(super) struct Event {
    pub warn: bool,
    pub text: String,
}

/// One worker process.
struct WorkerProc {
    number: u32,
    started_at: Instant,
    child: Child,
    /// Where our own worker serves /readyz and /metrics; `None` for a foreign worker.
    metrics_port: Option<u16>,
    stopping_since: Option<Instant>,
    killed: bool,
    /// Highest task counters seen (a worker's counters vanish with it).
    succeeded: f64,
    failed: f64,
}

/// What the fleet looks like at one instant.
pub(super) struct Census {
    pub running: i32,
    pub ready: i32,
    pub stopping: i32,
    /// Tasks the workers report (succeeded, failed); `None` for foreign workers, which report
    /// nothing.
    pub tasks: Option<(f64, f64)>,
}

pub(super) struct Fleet {
    kind: WorkerKind,
    broker_url: String,
    backend_url: String,
    queue: String,
    shutdown_timeout: Duration,
    log_dir: PathBuf,
    workers: Vec<WorkerProc>,
    next_number: u32,
    /// Crash-loop protection: workers that died soon after starting delay the next start.
    pub(super) quick_deaths: u32,
    respawn_after: Instant,
    /// The last unasked-for death, in words (for the reason a crash-looping run stops).
    pub(super) last_death: String,
    pub started: u32,
    pub replaced: u32,
    /// Counters of workers that have exited.
    gone_succeeded: f64,
    gone_failed: f64,
    events: Vec<Event>,
}

impl Fleet {
    pub(super) fn new(
        kind: WorkerKind,
        broker_url: String,
        backend_url: String,
        queue: String,
        shutdown_timeout: Duration,
        log_dir: PathBuf,
    ) -> Fleet {
        Fleet {
            kind,
            broker_url,
            backend_url,
            queue,
            shutdown_timeout,
            log_dir,
            workers: Vec::new(),
            next_number: 0,
            quick_deaths: 0,
            respawn_after: Instant::now(),
            last_death: String::new(),
            started: 0,
            replaced: 0,
            gone_succeeded: 0.0,
            gone_failed: 0.0,
            events: Vec::new(),
        }
    }

    /// What happened since the last call.
    pub(super) fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    fn note(&mut self, warn: bool, text: String) {
        self.events.push(Event { warn, text });
    }

    pub(super) fn running(&self) -> usize {
        self.workers.iter().filter(|w| w.stopping_since.is_none()).count()
    }

    pub(super) fn log_path(&self, number: u32) -> PathBuf {
        self.log_dir.join(format!("worker-{number}.log"))
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let number = self.next_number + 1;
        let log = std::fs::File::create(self.log_path(number))?;
        let (mut command, metrics_port) = match &self.kind {
            WorkerKind::Own { exe, concurrency } => {
                let port = free_loopback_port()?;
                let mut c = Command::new(exe);
                c.arg("worker")
                    .args(["--queues", &self.queue, "--concurrency", &concurrency.to_string()])
                    .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
                    .args(["--shutdown-timeout", &self.shutdown_timeout.as_secs_f64().to_string()])
                    .args(["--hostname", &format!("local-worker-{number}")])
                    .env("LOG_FORMAT", "text")
                    .stdout(Stdio::null())
                    .stderr(log);
                (c, Some(port))
            }
            WorkerKind::Command { argv, .. } => {
                let mut c = Command::new(&argv[0]);
                c.args(&argv[1..]).stdout(log.try_clone()?).stderr(log);
                (c, None)
            }
        };
        // The URLs go in the environment only, as a pod gets them from its Secret: never in argv,
        // where `ps` shows a password to every user of the machine.
        let child = command
            .env("BROKER_URL", &self.broker_url)
            .env("BACKEND_URL", &self.backend_url)
            // Own process group: the terminal's Ctrl-C reaches `local` only, which then stops the
            // workers in order (before Redis); a SIGKILL after the grace reaches a prefork pool.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()?;
        self.next_number = number;
        let port = metrics_port.map_or(String::new(), |p| format!(", metrics on port {p}"));
        self.note(false, format!("worker {number} started{port}"));
        self.workers.push(WorkerProc {
            number,
            started_at: Instant::now(),
            child,
            metrics_port,
            stopping_since: None,
            killed: false,
            succeeded: 0.0,
            failed: 0.0,
        });
        self.started += 1;
        Ok(())
    }

    /// SIGTERM `n` running workers: our own least busy first (then the newest), foreign ones
    /// newest first (see the module doc).
    async fn stop(&mut self, n: usize) {
        let mut candidates = Vec::new();
        for (i, w) in self.workers.iter().enumerate().filter(|(_, w)| w.stopping_since.is_none()) {
            let busy = match w.metrics_port {
                Some(port) => scrape::metrics(port).await.map_or(0.0, |m| {
                    scrape::sample(&m, WORKER_ACTIVE, "").unwrap_or(0.0)
                        + scrape::sample(&m, WORKER_RESERVED, "").unwrap_or(0.0)
                }),
                None => 0.0,
            };
            candidates.push((busy, std::cmp::Reverse(w.number), i));
        }
        candidates.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut notes = Vec::new();
        for (busy, _, i) in candidates.into_iter().take(n) {
            let w = &mut self.workers[i];
            send_signal(&w.child, Signal::TERM);
            w.stopping_since = Some(Instant::now());
            let busy = if w.metrics_port.is_some() { format!(" ({busy:.0} tasks in hand)") } else { String::new() };
            notes.push(format!("worker {} stopping{busy}: SIGTERM, it finishes or returns its tasks", w.number));
        }
        for text in notes {
            self.note(false, text);
        }
    }

    /// Collect exited workers (those not asked to stop are counted as replaced) and SIGKILL the
    /// stopping ones past their grace.
    fn reap(&mut self) {
        let mut i = 0;
        while i < self.workers.len() {
            let w = &mut self.workers[i];
            let status = match w.child.try_wait() {
                Ok(Some(status)) => status,
                _ => {
                    if let Some(since) = w.stopping_since
                        && !w.killed
                        && since.elapsed() > self.shutdown_timeout + KILL_MARGIN
                    {
                        // The whole process group: a prefork pool's children go with their parent.
                        if let Some(pid) = w.child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
                            let _ = rustix::process::kill_process_group(pid, Signal::KILL);
                        }
                        w.killed = true;
                        let number = w.number;
                        self.note(
                            true,
                            format!(
                                "worker {number} did not stop within its grace; SIGKILL (its messages return after the visibility timeout)"
                            ),
                        );
                    }
                    i += 1;
                    continue;
                }
            };
            let w = self.workers.remove(i);
            self.gone_succeeded += w.succeeded;
            self.gone_failed += w.failed;
            if w.stopping_since.is_none() {
                self.replaced += 1;
                let log = self.log_path(w.number);
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let last = text.lines().last().unwrap_or("");
                self.last_death =
                    format!("worker {} exited with {status}; last line of {}: {last}", w.number, log.display());
                self.note(
                    true,
                    format!(
                        "worker {} died ({status}); it will be replaced (its messages return after the visibility timeout); last line of {}: {last}",
                        w.number,
                        log.display()
                    ),
                );
                if w.started_at.elapsed() < QUICK_DEATH {
                    // Dying at once again and again is a crash loop: back off like a kubelet.
                    self.quick_deaths += 1;
                    self.respawn_after = Instant::now() + Duration::from_secs(1 << self.quick_deaths.min(5));
                } else {
                    self.quick_deaths = 0;
                }
            } else if w.killed || !status.success() {
                self.note(true, format!("worker {} exited with {status} while stopping", w.number));
            } else {
                self.note(false, format!("worker {} stopped", w.number));
            }
        }
    }

    /// Start or stop processes so that `target` are running.
    pub(super) async fn converge(&mut self, target: usize) {
        self.reap();
        let running = self.running();
        if running < target && Instant::now() >= self.respawn_after {
            for _ in running..target {
                if let Err(e) = self.spawn() {
                    self.note(true, format!("cannot start a worker: {e}"));
                    break;
                }
            }
        } else if running > target {
            self.stop(running - target).await;
        }
    }

    fn is_ready(w: &WorkerProc, ready_after: Option<Duration>) -> bool {
        w.stopping_since.is_none() && ready_after.is_some_and(|d| w.started_at.elapsed() >= d)
    }

    /// Refresh the per-worker counters and count who is ready.
    pub(super) async fn census(&mut self) -> Census {
        let ready_after = match &self.kind {
            WorkerKind::Own { .. } => None,
            WorkerKind::Command { ready_after, .. } => Some(*ready_after),
        };
        let mut ready = 0;
        for w in &mut self.workers {
            let Some(port) = w.metrics_port else {
                ready += i32::from(Self::is_ready(w, ready_after));
                continue;
            };
            if let Some(m) = scrape::metrics(port).await {
                w.succeeded = w.succeeded.max(scrape::sample(&m, TASK_SUCCESS, "").unwrap_or(0.0));
                w.failed = w.failed.max(scrape::sample(&m, TASK_FAILURE, "").unwrap_or(0.0));
            }
            if w.stopping_since.is_none()
                && scrape::get(port, "/readyz", Duration::from_secs(2)).await.is_some_and(|(s, _)| s == 200)
            {
                ready += 1;
            }
        }
        let running = self.running() as i32;
        let tasks = matches!(self.kind, WorkerKind::Own { .. }).then(|| {
            let alive = |f: fn(&WorkerProc) -> f64| self.workers.iter().map(f).sum::<f64>();
            (self.gone_succeeded + alive(|w| w.succeeded), self.gone_failed + alive(|w| w.failed))
        });
        Census { running, ready, stopping: self.workers.len() as i32 - running, tasks }
    }

    /// SIGTERM everyone and wait for them; after a second Ctrl-C they get SIGINT too (ours and
    /// Celery's then return running tasks at once), and past the grace SIGKILL.
    pub(super) async fn stop_all(
        &mut self,
        shutdown: &crate::runtime::shutdown::Shutdown,
        mut report: impl FnMut(Event),
    ) {
        use crate::runtime::shutdown::Stage;
        let n = self.running();
        self.stop(n).await;
        let mut forwarded = false;
        while !self.workers.is_empty() {
            if !forwarded && shutdown.stage() == Stage::Immediate {
                for w in &self.workers {
                    send_signal(&w.child, Signal::INT);
                }
                forwarded = true;
            }
            // Counters until the end: a stopping worker still finishes tasks.
            let _ = self.census().await;
            self.reap();
            if self.workers.iter().all(|w| w.killed) && !self.workers.is_empty() {
                for w in &mut self.workers {
                    let _ = w.child.wait().await;
                }
                self.reap();
            }
            self.take_events().into_iter().for_each(&mut report);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
