//! Closed loop: the time-stepped workload model (see the parent module for what it models).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::Duration;

use crate::autoscale::hpa::{Autoscaler, MetricReading, Observation, Timestamp};
use crate::tools::pattern::LoadPattern;
use crate::tools::plot::TimelinePoint;

/// The modelled workload and system timings.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub load: LoadPattern,
    pub service_time: Duration,
    pub concurrency: u32,
    pub pod_startup: Duration,
    pub scrape_delay: Duration,
    pub sync_period: Duration,
    pub step: Duration,
    /// Fixed length; `None` runs until drained and back at minReplicas (or `max_duration`).
    pub duration: Option<Duration>,
    pub max_duration: Duration,
    /// Replicas at t = 0, all ready; `None` = the HPA's minReplicas.
    pub initial_replicas: Option<i32>,
    /// What the HPA's metric is.
    pub signal: Signal,
    /// The window over which `depth+arrivals` estimates the arrival rate.
    pub rate_window: Duration,
    /// Which pods a scale-down deletes.
    pub scale_in: ScaleIn,
}

/// How the ReplicaSet controller picks the pods a scale-down deletes: not-ready before ready,
/// then (with pod deletion costs) the cheapest, then the newest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ScaleIn {
    /// Every pod costs the same (no `controller.kubernetes.io/pod-deletion-cost`): the newest go.
    #[default]
    Newest,
    /// The worker's `--pod-deletion-cost`: idle pods (cost 0) go first, then the least busy
    /// (the cost is [`crate::worker::pod_cost::cost`] of the tasks a pod runs).
    IdleFirst,
}

/// The value the HPA's metric carries, all of it as the HPA sees it (`scrape_delay` old).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Signal {
    /// Tasks waiting in the queue (`celery_queue_depth`, the project's adapter rule today).
    #[default]
    Depth,
    /// Waiting + held by workers (`celery_queue_depth + celery_queue_reserved`).
    #[value(name = "depth+running")]
    DepthRunning,
    /// Waiting + the arrival rate × the pipeline delay (scrape delay + sync period + pod
    /// start-up): the tasks that arrive before a pod asked for now can take them. The rate is
    /// (Δ depth + completions) / `rate_window` over the window ending at the seen instant, as
    /// `delta(celery_queue_depth[W]) + increase(celery_task_success_total[W])` would give it.
    #[value(name = "depth+arrivals")]
    DepthArrivals,
    /// Waiting + the queue's growth rate (Δ depth / `rate_window`, when positive) × the same
    /// pipeline delay: arrivals beyond what the pods already take, so it adds nothing while
    /// the queue holds steady (`deriv`-like, from `delta(celery_queue_depth[W])`).
    #[value(name = "depth+growth")]
    DepthGrowth,
}

impl Signal {
    pub fn name(self) -> &'static str {
        match self {
            Signal::Depth => "depth",
            Signal::DepthRunning => "depth+running",
            Signal::DepthArrivals => "depth+arrivals",
            Signal::DepthGrowth => "depth+growth",
        }
    }

    /// The External metric the adapter serves this signal as, and the HPA reads:
    /// `celery_queue_` + the name with `+` as `_` (`celery_queue_depth`, `celery_queue_depth_running`, …).
    /// nix/k8s/signals.nix names the adapter rules the same way (tests/exporter_prometheus.rs checks it).
    pub fn metric_name(self) -> String {
        format!("celery_queue_{}", self.name().replace('+', "_"))
    }

    /// The signal an External metric name serves ([`Signal::metric_name`] backwards).
    pub fn from_metric_name(name: &str) -> Option<Signal> {
        [Signal::Depth, Signal::DepthRunning, Signal::DepthArrivals, Signal::DepthGrowth]
            .into_iter()
            .find(|s| s.metric_name() == name)
    }

    /// Whether the value needs a rate over a window (and so the lookahead and the window).
    pub fn uses_rate(self) -> bool {
        matches!(self, Signal::DepthArrivals | Signal::DepthGrowth)
    }

    /// The value of the metric from what was seen at one instant (`now`) and, for the rate
    /// signals, `window` seconds before it (`then`), with a lookahead of `lookahead` seconds:
    /// the one home of the signals' arithmetic (the closed loop and `local` both call it), the
    /// same as [`Signal::promql`] computes in Prometheus. Without `then`, a rate counts as 0.
    pub fn value(self, now: SignalSample, then: Option<SignalSample>, lookahead: f64, window: f64) -> f64 {
        let rate = |change: f64| if window > 0.0 { (change / window).max(0.0) } else { 0.0 };
        match (self, then) {
            (Signal::Depth, _) => now.depth,
            (Signal::DepthRunning, _) => now.depth + now.running,
            (Signal::DepthArrivals, Some(then)) => {
                now.depth + lookahead * rate(now.depth - then.depth + (now.completed - then.completed))
            }
            (Signal::DepthGrowth, Some(then)) => now.depth + lookahead * rate(now.depth - then.depth),
            (Signal::DepthArrivals | Signal::DepthGrowth, None) => now.depth,
        }
    }

    /// The adapter's metricsQuery that serves this signal (prometheus-adapter template syntax:
    /// `<<.Series>>` is celery_queue_depth, `<<.LabelMatchers>>` the HPA's selector and
    /// namespace), for a lookahead of `lookahead` seconds and a rate window of `window` seconds.
    /// nix/k8s/signals.nix writes the same queries into the adapter's rules, and
    /// tests/exporter_prometheus.rs checks the rendered ones against this and runs them on a real
    /// Prometheus.
    ///
    /// The completions of `depth+arrivals` are every worker's `celery_task_success_total`
    /// (labelled by task, not queue: the sum over the Prometheus, which scrapes one namespace's
    /// workers), added to each queue's series (`on() group_left`) and 0 before any task finished.
    /// The rate terms are 0 while the window holds a single sample of the depth.
    pub fn promql(self, lookahead: f64, window: f64) -> String {
        let depth = "max by (queue) (<<.Series>>{<<.LabelMatchers>>})";
        // 0 until Prometheus holds two samples in the window (delta is empty then), as `value`
        // counts a rate without an earlier sample.
        let growth = format!("(max by (queue) (delta(<<.Series>>{{<<.LabelMatchers>>}}[{window}s])) or 0 * {depth})");
        match self {
            Signal::Depth => depth.to_owned(),
            Signal::DepthRunning => {
                format!("{depth} + max by (queue) (celery_queue_reserved{{<<.LabelMatchers>>}})")
            }
            Signal::DepthArrivals => format!(
                "{depth} + {lookahead} * clamp_min(({growth} + on() group_left() \
                 (sum(increase(celery_task_success_total[{window}s])) or vector(0))) / {window}, 0)"
            ),
            Signal::DepthGrowth => format!("{depth} + {lookahead} * clamp_min({growth} / {window}, 0)"),
        }
    }
}

/// What a signal is computed from at one instant: tasks waiting, tasks held by workers, and tasks
/// completed so far (a counter).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SignalSample {
    pub depth: f64,
    pub running: f64,
    pub completed: f64,
}

/// The most tasks one closed-loop run models (each waiting task costs the model 16 bytes).
pub const MAX_SIMULATED_TASKS: u64 = 10_000_000;
/// The most time steps one run models (the depth history keeps one number per step).
pub const MAX_STEPS: u64 = 20_000_000;
/// The most pods the model holds at once (from --initial-replicas or the HPA's maxReplicas).
pub const MAX_PODS: i32 = 10_000;

/// Workload parameters the model cannot run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WorkloadError(String);

impl WorkloadError {
    pub(super) fn new(message: String) -> Self {
        WorkloadError(message)
    }
}

impl Workload {
    pub fn validate(&self) -> Result<(), WorkloadError> {
        let err = |m: &str| Err(WorkloadError(m.to_owned()));
        let whole_ms = |d: Duration| d.as_nanos().is_multiple_of(1_000_000);
        if self.step.is_zero() || !whole_ms(self.step) {
            return err("--step must be a whole number of milliseconds, at least 0.001");
        }
        if self.sync_period.is_zero() || !self.sync_period.as_nanos().is_multiple_of(self.step.as_nanos()) {
            return err("--sync-period must be positive and a multiple of --step");
        }
        if self.concurrency == 0 {
            return err("--concurrency must be at least 1");
        }
        if self.service_time.is_zero() {
            return err("--service-time must be greater than 0");
        }
        if self.signal.uses_rate() && (self.rate_window.is_zero() || !whole_ms(self.rate_window)) {
            return err("--rate-window must be a whole number of milliseconds, at least 0.001");
        }
        // Memory grows with tasks and steps: refuse what would not fit rather than abort.
        let tasks = self.load.total();
        if tasks > MAX_SIMULATED_TASKS {
            return Err(WorkloadError(format!(
                "--load {} sends {tasks} tasks; the closed loop models at most {MAX_SIMULATED_TASKS}: lower the load",
                self.load
            )));
        }
        let span = self.duration.unwrap_or(self.max_duration);
        let steps = span.as_millis() / self.step.as_millis().max(1);
        if steps > u128::from(MAX_STEPS) {
            return Err(WorkloadError(format!(
                "{} s of simulated time in steps of {} s is {steps} steps; the model takes at most {MAX_STEPS}: \
                 raise --step or lower --duration/--max-duration",
                span.as_secs_f64(),
                self.step.as_secs_f64()
            )));
        }
        Ok(())
    }

    /// The HPA's maxReplicas, within what the model holds.
    pub fn check_pods(&self, spec: &crate::autoscale::hpa::HpaSpec) -> Result<(), WorkloadError> {
        if spec.max_replicas > MAX_PODS {
            return Err(WorkloadError(format!(
                "HPA {} has maxReplicas {}; the closed loop models at most {MAX_PODS} pods",
                spec.name, spec.max_replicas
            )));
        }
        Ok(())
    }

    pub(super) fn describe(&self) -> String {
        let s = |d: Duration| d.as_secs_f64();
        format!(
            "load={} service-time={}s concurrency={} pod-startup={}s scrape-delay={}s sync-period={}s step={}s",
            self.load,
            s(self.service_time),
            self.concurrency,
            s(self.pod_startup),
            s(self.scrape_delay),
            s(self.sync_period),
            s(self.step)
        ) + &match self.signal {
            Signal::Depth => String::new(),
            Signal::DepthRunning => " signal=depth+running".to_owned(),
            Signal::DepthArrivals | Signal::DepthGrowth => {
                format!(" signal={} rate-window={}s", self.signal.name(), s(self.rate_window))
            }
        }
    }
}

/// One row of the closed-loop timeline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub t: f64,
    /// Tasks sent so far.
    pub arrived: u64,
    /// Tasks waiting in the queue.
    pub queue_depth: usize,
    /// Tasks held (running) by workers.
    pub reserved: usize,
    /// The metric value the HPA saw at its last sync.
    pub metric_seen: Option<f64>,
    pub desired_replicas: i32,
    /// Pods not shutting down (`status.replicas`).
    pub current_replicas: i32,
    pub ready_replicas: i32,
    pub terminating: i32,
}

impl From<&Sample> for TimelinePoint {
    fn from(s: &Sample) -> Self {
        TimelinePoint {
            t: s.t,
            queue_depth: s.queue_depth as f64,
            reserved: s.reserved as f64,
            desired_replicas: s.desired_replicas,
            current_replicas: s.current_replicas,
            ready_replicas: Some(s.ready_replicas),
        }
    }
}

/// The figures of merit of one closed-loop run.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// ∫ existing pods dt, starting and draining pods included.
    pub replica_seconds: f64,
    /// Most tasks waiting at once.
    pub peak_backlog: usize,
    /// First arrival until the queue was empty and nothing ran, after the last arrival.
    pub time_to_drain: Option<f64>,
    /// 95th percentile of the wait between arrival and start (tasks that started).
    pub p95_wait: Option<f64>,
    pub max_replicas: i32,
    pub scale_events: u32,
    /// Scale events in the other direction than the one before (up after down or down after up).
    pub reversals: u32,
    /// Tasks running on a pod when a scale-down chose it (it lets them finish, as the worker's
    /// drain does within its shutdown timeout, but they were interrupted).
    pub interrupted: u64,
    pub tasks: u64,
    pub completed: u64,
    pub simulated: f64,
}

/// A closed-loop run: the timeline (about one sample per second) and its summary.
#[derive(Debug, Clone, PartialEq)]
pub struct ClosedLoopRun {
    pub timeline: Vec<Sample>,
    pub summary: Summary,
}

#[derive(Debug)]
struct Pod {
    created_at: i64,
    ready_at: i64,
    terminating: bool,
    /// Finish times of the tasks it runs.
    running: Vec<i64>,
}

impl Pod {
    fn ready(&self, t: i64) -> bool {
        self.ready_at <= t
    }
}

/// Runs the workload model against `autoscaler` (see the module docs for the model).
/// `workload` must have passed [`Workload::validate`].
pub fn closed_loop(mut autoscaler: Autoscaler, workload: &Workload) -> ClosedLoopRun {
    let ms = |d: Duration| d.as_millis() as i64;
    let step = ms(workload.step).max(1);
    let sync_period = ms(workload.sync_period).max(step);
    let service = ms(workload.service_time);
    let startup = ms(workload.pod_startup);
    let delay = ms(workload.scrape_delay);
    let load_end = ms(workload.load.duration());
    let end = ms(workload.duration.unwrap_or(workload.max_duration));
    let record_every = if 1000 % step == 0 { 1000 } else { step };
    let concurrency = workload.concurrency as usize;
    let min_replicas = autoscaler.spec.min_replicas;
    let total = workload.load.total();

    let mut spec_replicas = workload.initial_replicas.unwrap_or(min_replicas);
    let mut pods: Vec<Pod> = (0..spec_replicas.max(0))
        .map(|_| Pod { created_at: 0, ready_at: 0, terminating: false, running: Vec::new() })
        .collect();
    let mut queue: VecDeque<i64> = VecDeque::new();
    // What the metric pipeline can still look back at: (waiting, running, completed) per step.
    let window = if workload.signal.uses_rate() { ms(workload.rate_window) } else { 0 };
    let keep = ((delay + window) / step + 2) as usize;
    // u32: at most MAX_SIMULATED_TASKS tasks, so counts fit; 12 bytes per step held.
    let mut history: VecDeque<(u32, u32, u32)> = VecDeque::with_capacity(keep.min(1 << 20));
    let lookahead = (delay + sync_period + startup) as f64 / 1000.0;
    let mut waits: Vec<i64> = Vec::new();
    let (mut sent, mut completed) = (0u64, 0u64);
    let mut first_arrival: Option<i64> = None;
    let mut drained_at: Option<i64> = None;
    let mut metric_seen: Option<f64> = None;
    let (mut pod_ms, mut peak_backlog, mut max_replicas, mut scale_events) = (0i64, 0usize, spec_replicas, 0u32);
    let (mut reversals, mut last_direction) = (0u32, 0i32);
    let mut interrupted = 0u64;
    let mut timeline = Vec::new();

    let mut t = 0i64;
    loop {
        let due = (workload.load.cumulative(Duration::from_millis(t as u64)).round() as u64).min(total);
        while sent < due {
            queue.push_back(t);
            sent += 1;
            first_arrival.get_or_insert(t);
        }
        for pod in &mut pods {
            let before = pod.running.len();
            pod.running.retain(|&finish| finish > t);
            completed += (before - pod.running.len()) as u64;
        }
        pods.retain(|p| !(p.terminating && p.running.is_empty()));
        for pod in pods.iter_mut().filter(|p| !p.terminating && p.ready(t)) {
            while pod.running.len() < concurrency {
                let Some(arrival) = queue.pop_front() else {
                    break;
                };
                waits.push(t - arrival);
                pod.running.push(t + service);
            }
        }
        if history.len() == keep {
            history.pop_front();
        }
        let running_now: usize = pods.iter().map(|p| p.running.len()).sum();
        let count = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        history.push_back((count(queue.len() as u64), count(running_now as u64), count(completed)));
        // The entry of instant `at` (before t = 0: nothing yet).
        let at = |at: i64| -> (u64, u64, u64) {
            if at < 0 {
                return (0, 0, 0);
            }
            let back = (t / step - at / step) as usize;
            let (depth, running, done) = history[history.len() - 1 - back];
            (u64::from(depth), u64::from(running), u64::from(done))
        };
        peak_backlog = peak_backlog.max(queue.len());

        let is_sync = t % sync_period == 0;
        if is_sync {
            let seen_at = t - delay;
            let sample = |(depth, running, completed): (u64, u64, u64)| SignalSample {
                depth: depth as f64,
                running: running as f64,
                completed: completed as f64,
            };
            let then = workload.signal.uses_rate().then(|| sample(at(seen_at - window)));
            let value = workload.signal.value(sample(at(seen_at)), then, lookahead, window as f64 / 1000.0);
            metric_seen = Some(value);
            let live = pods.iter().filter(|p| !p.terminating).count() as i32;
            let ready = pods.iter().filter(|p| !p.terminating && p.ready(t)).count() as i32;
            let observation = Observation {
                spec_replicas,
                status_replicas: live,
                ready_pods: (!pods.is_empty()).then_some(ready),
                metrics: vec![
                    MetricReading::total(Some((value * 1000.0).round() as i64));
                    autoscaler.spec.metrics.len()
                ],
            };
            let decision = autoscaler.sync(Timestamp::from_millis(t), &observation);
            if decision.rescaled {
                scale_events += 1;
                let direction = (decision.replicas - spec_replicas).signum();
                if direction != 0 && last_direction != 0 && direction != last_direction {
                    reversals += 1;
                }
                if direction != 0 {
                    last_direction = direction;
                }
            }
            spec_replicas = decision.replicas;
            max_replicas = max_replicas.max(spec_replicas);
            interrupted += resize(&mut pods, spec_replicas, t, startup, workload.scale_in) as u64;
            pods.retain(|p| !(p.terminating && p.running.is_empty()));
        }

        let running: usize = pods.iter().map(|p| p.running.len()).sum();
        let all_sent = sent == total && t >= load_end;
        let drained = all_sent && queue.is_empty() && running == 0;
        if drained && drained_at.is_none() && first_arrival.is_some() {
            drained_at = Some(t);
        }
        let settled = drained && spec_replicas <= min_replicas && pods.iter().all(|p| !p.terminating);
        let finished = t >= end || (workload.duration.is_none() && settled);
        if t % record_every == 0 || is_sync || finished {
            timeline.push(Sample {
                t: t as f64 / 1000.0,
                arrived: sent,
                queue_depth: queue.len(),
                reserved: running,
                metric_seen,
                desired_replicas: spec_replicas,
                current_replicas: pods.iter().filter(|p| !p.terminating).count() as i32,
                ready_replicas: pods.iter().filter(|p| !p.terminating && p.ready(t)).count() as i32,
                terminating: pods.iter().filter(|p| p.terminating).count() as i32,
            });
        }
        if finished {
            break;
        }
        pod_ms += pods.len() as i64 * step;
        t += step;
    }

    let p95_wait = p95(&mut waits);
    ClosedLoopRun {
        timeline,
        summary: Summary {
            replica_seconds: pod_ms as f64 / 1000.0,
            peak_backlog,
            time_to_drain: drained_at.zip(first_arrival).map(|(d, f)| (d - f) as f64 / 1000.0),
            p95_wait,
            max_replicas,
            scale_events,
            reversals,
            interrupted,
            tasks: total,
            completed,
            simulated: t as f64 / 1000.0,
        },
    }
}

/// The 95th percentile (nearest rank) of waits in milliseconds, in seconds.
pub(super) fn p95(waits: &mut [i64]) -> Option<f64> {
    waits.sort_unstable();
    (!waits.is_empty()).then(|| {
        let rank = ((waits.len() as f64) * 0.95).ceil() as usize;
        waits[rank.clamp(1, waits.len()) - 1] as f64 / 1000.0
    })
}

/// Brings the number of live pods to `target`: new pods start now and become ready after
/// `startup`; victims are chosen like the ReplicaSet controller (not-ready before ready, then by
/// `scale_in`). Returns the tasks the victims were running.
fn resize(pods: &mut Vec<Pod>, target: i32, t: i64, startup: i64, scale_in: ScaleIn) -> usize {
    let live = pods.iter().filter(|p| !p.terminating).count() as i32;
    if target > live {
        for _ in live..target {
            pods.push(Pod { created_at: t, ready_at: t + startup, terminating: false, running: Vec::new() });
        }
    } else if target < live {
        let mut victims: Vec<usize> = (0..pods.len()).filter(|&i| !pods[i].terminating).collect();
        let cost = |p: &Pod| match scale_in {
            ScaleIn::Newest => 0,
            ScaleIn::IdleFirst => crate::worker::pod_cost::cost(p.running.len()),
        };
        victims.sort_by_key(|&i| (pods[i].ready(t), cost(&pods[i]), std::cmp::Reverse(pods[i].created_at)));
        let mut interrupted = 0;
        for &i in victims.iter().take((live - target) as usize) {
            pods[i].terminating = true;
            interrupted += pods[i].running.len();
        }
        return interrupted;
    }
    0
}

/// The timeline as CSV.
pub fn timeline_csv(timeline: &[Sample]) -> String {
    let mut csv = String::from(
        "t,arrived,queue_depth,reserved,metric_seen,desired_replicas,current_replicas,ready_replicas,terminating\n",
    );
    for s in timeline {
        let metric = s.metric_seen.map(|m| m.to_string()).unwrap_or_default();
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{},{},{}",
            s.t,
            s.arrived,
            s.queue_depth,
            s.reserved,
            metric,
            s.desired_replicas,
            s.current_replicas,
            s.ready_replicas,
            s.terminating
        );
    }
    csv
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::hpa::{ExternalMetric, HpaSpec, MetricTarget};

    fn fixed(replicas: i32) -> Autoscaler {
        Autoscaler::new(HpaSpec {
            name: "fixed".into(),
            min_replicas: replicas,
            max_replicas: replicas,
            metrics: vec![ExternalMetric {
                match_labels: Default::default(),
                name: "celery_queue_depth".into(),
                target: MetricTarget::AverageValue(10_000),
            }],
            behavior: None,
        })
    }

    fn workload(load: &str) -> Workload {
        Workload {
            load: load.parse().unwrap(),
            service_time: Duration::from_secs(1),
            concurrency: 2,
            pod_startup: Duration::from_secs(10),
            scrape_delay: Duration::from_secs(15),
            sync_period: Duration::from_secs(15),
            step: Duration::from_millis(100),
            duration: None,
            max_duration: Duration::from_secs(600),
            initial_replicas: None,
            signal: Signal::Depth,
            rate_window: Duration::from_secs(30),
            scale_in: ScaleIn::Newest,
        }
    }

    #[test]
    fn fixed_pool_drains_a_burst_in_waves() {
        // 2 pods × 2 slots, 1 s per task: 8 tasks run in two waves.
        let run = closed_loop(fixed(2), &workload("burst:8"));
        let s = &run.summary;
        assert_eq!(s.time_to_drain, Some(2.0));
        assert_eq!(s.peak_backlog, 4, "four wait for the second wave");
        assert_eq!(s.p95_wait, Some(1.0));
        assert_eq!((s.completed, s.tasks, s.scale_events, s.max_replicas), (8, 8, 0, 2));
        assert_eq!(s.replica_seconds, 2.0 * s.simulated);
    }

    #[test]
    fn steady_ramp_below_capacity_never_queues() {
        // 2 tasks/s against 4 tasks/s of capacity.
        let run = closed_loop(fixed(2), &workload("ramp:2:2:30"));
        assert_eq!(run.summary.tasks, 60);
        assert_eq!(run.summary.completed, 60);
        assert!(run.summary.p95_wait.unwrap() < 0.2);
    }

    #[test]
    fn scale_down_lets_victims_finish_their_tasks() {
        let mut pods: Vec<Pod> =
            (0..3).map(|i| Pod { created_at: i, ready_at: i, terminating: false, running: vec![100] }).collect();
        // A pod still starting goes first, then the newest ready one.
        pods.push(Pod { created_at: 50, ready_at: 200, terminating: false, running: Vec::new() });
        assert_eq!(resize(&mut pods, 2, 60, 10, ScaleIn::Newest), 1, "the newest ready pod was running a task");
        let terminating: Vec<i64> = pods.iter().filter(|p| p.terminating).map(|p| p.created_at).collect();
        assert_eq!(terminating, [2, 50]);
        assert_eq!(pods[2].running, [100], "a victim keeps its task until it finishes");
        resize(&mut pods, 4, 70, 10, ScaleIn::Newest);
        assert_eq!(pods.len(), 6);
        assert_eq!(pods[5].ready_at, 80);
    }

    #[test]
    fn idle_first_deletes_idle_pods_before_busy_ones_whatever_their_age() {
        // Oldest two busy (1 and 3 tasks), newest two idle, one older idle.
        let running = [vec![], vec![100], vec![100, 100, 100], vec![], vec![]];
        let fleet = || -> Vec<Pod> {
            running
                .iter()
                .enumerate()
                .map(|(i, r)| Pod { created_at: i as i64, ready_at: i as i64, terminating: false, running: r.clone() })
                .collect()
        };
        let gone = |pods: &[Pod]| -> Vec<i64> { pods.iter().filter(|p| p.terminating).map(|p| p.created_at).collect() };
        let mut pods = fleet();
        assert_eq!(resize(&mut pods, 2, 60, 10, ScaleIn::IdleFirst), 0, "three idle pods to delete: none busy");
        assert_eq!(gone(&pods), [0, 3, 4]);
        let mut pods = fleet();
        assert_eq!(resize(&mut pods, 1, 60, 10, ScaleIn::IdleFirst), 1, "then the least busy (cost 1 < cost 2)");
        assert_eq!(gone(&pods), [0, 1, 3, 4]);
        let mut pods = fleet();
        assert_eq!(resize(&mut pods, 2, 60, 10, ScaleIn::Newest), 3, "newest first: 4, 3 and the one running 3");
        assert_eq!(gone(&pods), [2, 3, 4]);
    }

    #[test]
    fn reversals_count_changes_of_direction() {
        assert_eq!(closed_loop(fixed(2), &workload("burst:40")).summary.reversals, 0, "a fixed pool never scales");
        // Up through the burst, then down to min: one reversal, whatever the number of steps.
        let mut spec = fixed(1).spec;
        spec.max_replicas = 20;
        let run = closed_loop(Autoscaler::new(spec), &workload("burst:400"));
        assert!(run.summary.scale_events >= 3, "{:?}", run.summary);
        assert_eq!(run.summary.reversals, 1);
    }

    #[test]
    fn signals_see_what_prometheus_would() {
        // A fixed pool of 2 pods (4 slots, 1 s per task) under 2 tasks/s: nothing waits, 2 run,
        // 2 complete per second. The HPA sees each value 15 s late.
        let metric_at = |signal: Signal, t: f64| {
            let w = Workload { signal, duration: Some(Duration::from_secs(120)), ..workload("ramp:2:2:120") };
            let run = closed_loop(fixed(2), &w);
            run.timeline.iter().find(|s| s.t == t).and_then(|s| s.metric_seen).unwrap()
        };
        assert_eq!(metric_at(Signal::Depth, 90.0), 0.0);
        assert_eq!(metric_at(Signal::DepthRunning, 90.0), 2.0, "two tasks held");
        // Arrivals over 30 s: Δdepth 0 + 60 completions = 2/s, times 15 + 15 + 10 s.
        assert_eq!(metric_at(Signal::DepthArrivals, 90.0), 80.0);
        assert_eq!(metric_at(Signal::DepthGrowth, 90.0), 0.0, "a steady queue does not grow");
        // Before anything was seen (the first sync, t = 0): all zero.
        assert_eq!(metric_at(Signal::DepthArrivals, 0.0), 0.0);
        // A burst of 40 on 2 pods: at t = 15 the HPA sees t = 0, 36 waiting that grew from 0
        // within the window: 36 + 40 × 36 / 30 (no completions yet at t = 0).
        let w =
            Workload { signal: Signal::DepthGrowth, duration: Some(Duration::from_secs(30)), ..workload("burst:40") };
        let run = closed_loop(fixed(2), &w);
        let seen = run.timeline.iter().find(|s| s.t == 15.0).and_then(|s| s.metric_seen).unwrap();
        assert!((seen - (36.0 + 40.0 * 36.0 / 30.0)).abs() < 1e-9, "{seen}");
    }

    #[test]
    fn rejects_steps_that_break_exact_ticks() {
        let mut w = workload("burst:1");
        w.step = Duration::from_millis(400);
        assert!(w.validate().unwrap_err().to_string().contains("multiple of --step"));
        w.step = Duration::from_micros(1500);
        assert!(w.validate().is_err());
        assert!(workload("burst:1").validate().is_ok());
    }
}
