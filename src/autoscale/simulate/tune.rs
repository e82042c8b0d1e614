//! `simulate --tune`: a deterministic grid search over the HPA's `behavior`, its target and the
//! metric pipeline's delay, on a mix of closed-loop workloads, against the just-in-time oracle.
//!
//! Every candidate is the seed HPA (its name, bounds and metrics) with another AverageValue
//! target, scale-up and scale-down rules (policies, selectPolicy, stabilization window) and
//! scrape delay. Each runs on every workload of the mix through [`closed_loop`]; the figures over
//! the mix are the summed replica-seconds, the largest p95 wait, the largest peak backlog and the
//! summed direction reversals. The Pareto front is over (replica-seconds, p95 wait, peak
//! backlog): a candidate is on it when no other is at least as good on all three and better on
//! one.
//!
//! The chosen candidate meets the most [goals](Goal) (issue 22's, by load kind), then misses
//! the others by the least (summed [`Goal::shortfall`]), then has the fewest summed
//! replica-seconds, the smallest largest p95 wait, the fewest reversals, and last the earliest
//! place in the grid. The grid's order is fixed and the runs are exact, so two
//! searches print the same.

use std::fmt::Write as _;
use std::time::Duration;

use k8s_openapi::api::autoscaling::v2 as k8s;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::closed_loop::{Signal, Summary, Workload, closed_loop};
use super::oracle::oracle;
use crate::autoscale::hpa::{
    Autoscaler, Behavior, ControllerConfig, HpaSpec, MetricTarget, PolicyKind, ScalingPolicy, ScalingRules,
    SelectPolicy,
};
use crate::tools::pattern::LoadPattern;

/// The default mix: a burst, a ramp and an oscillation (issue 22).
pub const DEFAULT_MIX: [&str; 3] = ["burst:400", "ramp:1:40:300", "oscillate:10:8:60:300"];

/// One point of the grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// AverageValue target: waiting tasks per pod.
    pub target: u32,
    pub scale_up: ScalingRules,
    pub scale_down: ScalingRules,
    pub scrape_delay: Duration,
    pub signal: Signal,
}

/// The values the search combines, every combination once, in this order.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    pub targets: Vec<u32>,
    /// Scale-up policies with their selectPolicy (the window comes from `up_windows`).
    pub up: Vec<(SelectPolicy, Vec<ScalingPolicy>)>,
    pub up_windows: Vec<i32>,
    pub down: Vec<(SelectPolicy, Vec<ScalingPolicy>)>,
    pub down_windows: Vec<i32>,
    pub scrape_delays: Vec<Duration>,
    pub signals: Vec<Signal>,
}

fn policy(kind: PolicyKind, value: i32, period_seconds: i32) -> ScalingPolicy {
    ScalingPolicy { kind, value, period_seconds }
}

impl Grid {
    /// The default grid: 5 targets × 6 scale-up rules × 2 windows × 6 scale-down rules × 5
    /// windows × 3 scrape delays × 4 signals = 21600 candidates.
    pub fn default_grid() -> Self {
        use PolicyKind::{Percent, Pods};
        use SelectPolicy::{Max, Min};
        Grid {
            targets: vec![2, 5, 10, 20, 40],
            up: vec![
                (Max, vec![policy(Percent, 200, 15)]),
                (Max, vec![policy(Percent, 900, 15)]),
                (Max, vec![policy(Pods, 10, 15)]),
                (Max, vec![policy(Pods, 20, 15)]),
                (Max, vec![policy(Pods, 4, 15), policy(Percent, 100, 15)]),
                (Min, vec![policy(Pods, 20, 15), policy(Percent, 300, 15)]),
            ],
            up_windows: vec![0, 30],
            down: vec![
                (Max, vec![policy(Percent, 50, 30)]),
                (Max, vec![policy(Percent, 100, 15)]),
                (Max, vec![policy(Pods, 2, 15)]),
                (Max, vec![policy(Percent, 20, 15)]),
                (Max, vec![policy(Percent, 50, 15), policy(Pods, 4, 15)]),
                (Min, vec![policy(Percent, 100, 15), policy(Pods, 5, 30)]),
            ],
            down_windows: vec![0, 30, 60, 120, 300],
            scrape_delays: [5, 10, 15].map(Duration::from_secs).to_vec(),
            signals: vec![Signal::Depth, Signal::DepthRunning, Signal::DepthArrivals, Signal::DepthGrowth],
        }
    }

    /// A small grid (24 candidates) for a first look and for tests: the seed's rules and a fast
    /// pair, two targets, two down windows, the workload's own scrape delay and signal.
    pub fn quick(scrape_delay: Duration, signal: Signal) -> Self {
        use PolicyKind::{Percent, Pods};
        use SelectPolicy::Max;
        Grid {
            targets: vec![5, 10],
            up: vec![(Max, vec![policy(Percent, 200, 15)]), (Max, vec![policy(Pods, 20, 15)])],
            up_windows: vec![0],
            down: vec![
                (Max, vec![policy(Percent, 50, 30)]),
                (Max, vec![policy(Percent, 100, 15)]),
                (Max, vec![policy(Pods, 2, 15)]),
            ],
            down_windows: vec![0, 60],
            scrape_delays: vec![scrape_delay],
            signals: vec![signal],
        }
    }

    /// Every combination, targets outermost, signals innermost.
    pub fn candidates(&self) -> Vec<Candidate> {
        let rules = |(select, policies): &(SelectPolicy, Vec<ScalingPolicy>), window: i32| ScalingRules {
            stabilization_window_seconds: Some(window),
            select_policy: *select,
            policies: policies.clone(),
            tolerance: None,
        };
        let mut all = Vec::new();
        for &target in &self.targets {
            for up in &self.up {
                for &up_window in &self.up_windows {
                    for down in &self.down {
                        for &down_window in &self.down_windows {
                            for &scrape_delay in &self.scrape_delays {
                                for &signal in &self.signals {
                                    all.push(Candidate {
                                        target,
                                        scale_up: rules(up, up_window),
                                        scale_down: rules(down, down_window),
                                        scrape_delay,
                                        signal,
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
        all
    }
}

impl Candidate {
    /// The seed HPA with this candidate's target and behavior.
    pub fn spec(&self, seed: &HpaSpec) -> HpaSpec {
        let mut spec = seed.clone();
        for metric in &mut spec.metrics {
            metric.name = self.signal.metric_name();
            metric.target = MetricTarget::AverageValue(i64::from(self.target) * 1000);
        }
        spec.behavior = Some(Behavior { scale_up: self.scale_up.clone(), scale_down: self.scale_down.clone() });
        spec
    }

    /// The workload as this candidate's pipeline sees it.
    pub fn workload(&self, base: &Workload) -> Workload {
        Workload { scrape_delay: self.scrape_delay, signal: self.signal, ..base.clone() }
    }

    /// One line: `target=5 up=Pods 20/15s w0 down=Percent 100/15s w30 delay=15s signal=depth`.
    pub fn describe(&self) -> String {
        format!(
            "target={} up={} down={} delay={}s signal={}",
            self.target,
            describe_rules(&self.scale_up),
            describe_rules(&self.scale_down),
            self.scrape_delay.as_secs_f64(),
            self.signal.name()
        )
    }
}

fn describe_rules(rules: &ScalingRules) -> String {
    let one = |p: &ScalingPolicy| {
        let kind = match p.kind {
            PolicyKind::Pods => "Pods",
            PolicyKind::Percent => "Percent",
        };
        format!("{kind} {}/{}s", p.value, p.period_seconds)
    };
    let policies: Vec<String> = rules.policies.iter().map(one).collect();
    let window = rules.stabilization_window_seconds.unwrap_or(0);
    if policies.len() == 1 {
        format!("{} w{window}", policies[0])
    } else {
        format!("{}({}) w{window}", select_name(rules.select_policy), policies.join(","))
    }
}

fn select_name(select: SelectPolicy) -> &'static str {
    match select {
        SelectPolicy::Max => "Max",
        SelectPolicy::Min => "Min",
        SelectPolicy::Disabled => "Disabled",
    }
}

/// A pass/fail figure for one workload of the mix: issue 22's goals, by load kind.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    /// Drained within this many seconds.
    DrainWithin(f64),
    /// At most this many replica-seconds.
    ReplicaSecondsAtMost(f64),
    /// At most this many tasks waiting at once.
    PeakBacklogAtMost(usize),
    /// Replica-seconds at most this multiple of the oracle's.
    OracleRatioAtMost(f64),
    /// Replica-seconds at most the seed HPA's on the same workload.
    NoCostlierThanSeed,
    /// At most this many direction reversals (the load's up and down phases).
    ReversalsAtMost(u32),
}

impl Goal {
    /// The goals for one load: a burst drained within 25 s and at most 600 replica-s; a ramp's
    /// peak backlog at most 300 and replica-s at most 1.3× the oracle's; an oscillation no
    /// costlier than the seed and with no more reversals than it has half-periods.
    pub fn for_load(load: &LoadPattern) -> Vec<Goal> {
        match load {
            LoadPattern::Burst { .. } => vec![Goal::DrainWithin(25.0), Goal::ReplicaSecondsAtMost(600.0)],
            LoadPattern::Ramp { .. } => vec![Goal::PeakBacklogAtMost(300), Goal::OracleRatioAtMost(1.3)],
            LoadPattern::Oscillate { period, duration, .. } => {
                let half_periods = (2.0 * duration.as_secs_f64() / period.as_secs_f64()).ceil();
                vec![Goal::NoCostlierThanSeed, Goal::ReversalsAtMost(half_periods.min(f64::from(u32::MAX)) as u32)]
            }
        }
    }

    pub fn met(&self, run: &Summary, seed: &Summary, oracle: &Summary) -> bool {
        self.shortfall(run, seed, oracle) == 0.0
    }

    /// How far `run` misses the goal, relative to its threshold: 0 when met, 0.5 for a figure
    /// 50 % above its limit; infinite for a workload that never drained (or a zero limit).
    pub fn shortfall(&self, run: &Summary, seed: &Summary, oracle: &Summary) -> f64 {
        let over = |value: f64, limit: f64| {
            if value <= limit {
                0.0
            } else if limit > 0.0 {
                value / limit - 1.0
            } else {
                f64::INFINITY
            }
        };
        match *self {
            Goal::DrainWithin(seconds) => run.time_to_drain.map_or(f64::INFINITY, |d| over(d, seconds)),
            Goal::ReplicaSecondsAtMost(limit) => over(run.replica_seconds, limit),
            Goal::PeakBacklogAtMost(limit) => over(run.peak_backlog as f64, limit as f64),
            Goal::OracleRatioAtMost(ratio) => over(run.replica_seconds, ratio * oracle.replica_seconds),
            Goal::NoCostlierThanSeed => over(run.replica_seconds, seed.replica_seconds),
            Goal::ReversalsAtMost(limit) => over(f64::from(run.reversals), f64::from(limit)),
        }
    }

    pub fn describe(&self) -> String {
        match *self {
            Goal::DrainWithin(s) => format!("drain <= {s} s"),
            Goal::ReplicaSecondsAtMost(r) => format!("replica-s <= {r}"),
            Goal::PeakBacklogAtMost(b) => format!("peak backlog <= {b}"),
            Goal::OracleRatioAtMost(x) => format!("replica-s <= {x}x oracle"),
            Goal::NoCostlierThanSeed => "replica-s <= seed's".into(),
            Goal::ReversalsAtMost(n) => format!("reversals <= {n}"),
        }
    }
}

/// A candidate's runs on the mix and the figures over it.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// Place in the grid, from 0.
    pub index: usize,
    pub candidate: Candidate,
    pub runs: Vec<Summary>,
    pub replica_seconds: f64,
    pub p95_wait: f64,
    pub peak_backlog: usize,
    pub reversals: u32,
    pub goals_met: usize,
    /// The summed [`Goal::shortfall`] of the goals it misses.
    pub shortfall: f64,
}

/// The search's result.
#[derive(Debug, Clone, PartialEq)]
pub struct TuneResult {
    pub mix: Vec<LoadPattern>,
    pub seed: Vec<Summary>,
    pub oracle: Vec<Summary>,
    pub goals: Vec<Vec<Goal>>,
    pub evaluations: Vec<Evaluation>,
    /// Indices into `evaluations`, by replica-seconds (then grid order).
    pub front: Vec<usize>,
    /// Index into `evaluations`.
    pub chosen: usize,
}

/// Runs `grid` on every load of `mix` (each with `base`'s timings), with `seed` supplying the
/// HPA's name, bounds and metrics and the reference rows. `base` must have passed
/// [`Workload::validate`] for every load. Uses up to `threads` threads; the result does not
/// depend on it.
pub fn tune(
    seed: &HpaSpec,
    config: ControllerConfig,
    base: &Workload,
    mix: &[LoadPattern],
    grid: &Grid,
    threads: usize,
) -> TuneResult {
    let workload = |load: &LoadPattern| Workload { load: load.clone(), ..base.clone() };
    let seed_runs: Vec<Summary> =
        mix.iter().map(|l| closed_loop(Autoscaler::with_config(seed.clone(), config), &workload(l)).summary).collect();
    let oracle_runs: Vec<Summary> =
        mix.iter().map(|l| oracle(&workload(l), seed.min_replicas, seed.max_replicas)).collect();
    let goals: Vec<Vec<Goal>> = mix.iter().map(Goal::for_load).collect();

    let candidates = grid.candidates();
    let evaluate = |index: usize| -> Evaluation {
        let candidate = &candidates[index];
        let spec = candidate.spec(seed);
        let runs: Vec<Summary> = mix
            .iter()
            .map(|l| {
                closed_loop(Autoscaler::with_config(spec.clone(), config), &candidate.workload(&workload(l))).summary
            })
            .collect();
        let shortfalls: Vec<f64> = runs
            .iter()
            .enumerate()
            .flat_map(|(w, run)| goals[w].iter().map(move |g| (w, run, g)))
            .map(|(w, run, g)| g.shortfall(run, &seed_runs[w], &oracle_runs[w]))
            .collect();
        Evaluation {
            index,
            candidate: candidate.clone(),
            replica_seconds: runs.iter().map(|r| r.replica_seconds).sum(),
            p95_wait: runs.iter().filter_map(|r| r.p95_wait).fold(0.0, f64::max),
            peak_backlog: runs.iter().map(|r| r.peak_backlog).max().unwrap_or(0),
            reversals: runs.iter().map(|r| r.reversals).sum(),
            goals_met: shortfalls.iter().filter(|&&s| s == 0.0).count(),
            shortfall: shortfalls.iter().sum(),
            runs,
        }
    };
    let threads = threads.clamp(1, candidates.len().max(1));
    let mut evaluations: Vec<Evaluation> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|k| {
                let evaluate = &evaluate;
                let n = candidates.len();
                scope.spawn(move || (k..n).step_by(threads).map(evaluate).collect::<Vec<_>>())
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("a tune thread panicked")).collect()
    });
    evaluations.sort_by_key(|e| e.index);

    let dominates = |a: &Evaluation, b: &Evaluation| {
        let no_worse =
            a.replica_seconds <= b.replica_seconds && a.p95_wait <= b.p95_wait && a.peak_backlog <= b.peak_backlog;
        let better =
            a.replica_seconds < b.replica_seconds || a.p95_wait < b.p95_wait || a.peak_backlog < b.peak_backlog;
        no_worse && better
    };
    let mut front: Vec<usize> =
        (0..evaluations.len()).filter(|&i| !evaluations.iter().any(|o| dominates(o, &evaluations[i]))).collect();
    front.sort_by(|&a, &b| evaluations[a].replica_seconds.total_cmp(&evaluations[b].replica_seconds).then(a.cmp(&b)));
    let chosen = choose(&evaluations, 0..evaluations.len()).unwrap_or(0);
    TuneResult { mix: mix.to_vec(), seed: seed_runs, oracle: oracle_runs, goals, evaluations, front, chosen }
}

/// The choice among `among`: the most goals met, then the smallest summed shortfall on the
/// goals missed, the fewest replica-seconds, the smallest p95 wait, the fewest reversals, the
/// earliest in the grid.
fn choose(evaluations: &[Evaluation], among: impl Iterator<Item = usize>) -> Option<usize> {
    among.min_by(|&a, &b| {
        let (x, y) = (&evaluations[a], &evaluations[b]);
        y.goals_met
            .cmp(&x.goals_met)
            .then(x.shortfall.total_cmp(&y.shortfall))
            .then(x.replica_seconds.total_cmp(&y.replica_seconds))
            .then(x.p95_wait.total_cmp(&y.p95_wait))
            .then(x.reversals.cmp(&y.reversals))
            .then(a.cmp(&b))
    })
}

impl TuneResult {
    /// For each signal the grid tried, in grid order, the candidate [`tune`] would choose among
    /// that signal's candidates.
    pub fn best_per_signal(&self) -> Vec<(Signal, usize)> {
        let mut signals: Vec<Signal> = Vec::new();
        for e in &self.evaluations {
            if !signals.contains(&e.candidate.signal) {
                signals.push(e.candidate.signal);
            }
        }
        signals
            .into_iter()
            .filter_map(|signal| {
                let among = (0..self.evaluations.len()).filter(|&i| self.evaluations[i].candidate.signal == signal);
                choose(&self.evaluations, among).map(|i| (signal, i))
            })
            .collect()
    }

    /// The chosen candidate, if the grid was not empty.
    pub fn best(&self) -> Option<&Evaluation> {
        self.evaluations.get(self.chosen)
    }

    /// The report: the front, the choice and its goals, and per workload seed vs chosen vs oracle.
    pub fn report(&self, seed_label: &str) -> String {
        let mut text = String::new();
        let oracle_total: f64 = self.oracle.iter().map(|o| o.replica_seconds).sum();
        let goal_total: usize = self.goals.iter().map(Vec::len).sum();
        let _ = writeln!(
            text,
            "# Pareto front: {} of {} candidates (replica-s summed, p95 wait and peak backlog the largest over the mix; \
             oracle: {oracle_total:.0} replica-s)",
            self.front.len(),
            self.evaluations.len()
        );
        let header = ["#", "replica-s", "/oracle", "p95 wait s", "peak backlog", "reversals", "goals", "policy"];
        let row = |e: &Evaluation| -> [String; 8] {
            [
                e.index.to_string(),
                format!("{:.0}", e.replica_seconds),
                format!("{:.2}", e.replica_seconds / oracle_total.max(f64::MIN_POSITIVE)),
                format!("{:.1}", e.p95_wait),
                e.peak_backlog.to_string(),
                e.reversals.to_string(),
                format!("{}/{goal_total}", e.goals_met),
                e.candidate.describe(),
            ]
        };
        let rows: Vec<[String; 8]> = self.front.iter().map(|&i| row(&self.evaluations[i])).collect();
        // The policy, last, left-aligned after the aligned figures.
        let figures: Vec<[String; 7]> = rows.iter().map(|r| std::array::from_fn(|c| r[c].clone())).collect();
        let head: [&str; 7] = std::array::from_fn(|c| header[c]);
        for (line, r) in super::aligned(&head, &figures).lines().zip(std::iter::once(None).chain(rows.iter().map(Some)))
        {
            let _ = writeln!(text, "{line}  {}", r.map_or(header[7], |r| r[7].as_str()));
        }
        let Some(best) = self.best() else {
            return text;
        };
        let per_signal = self.best_per_signal();
        if per_signal.len() > 1 {
            let _ = writeln!(text, "# the choice within each signal (replica-s, p95 wait s, peak backlog per load):");
            let loads: Vec<String> = self.mix.iter().map(ToString::to_string).collect();
            let mut header: Vec<String> = vec!["signal".into(), "#".into(), "goals".into()];
            header.extend(loads.iter().map(|l| format!("{l} (r-s/p95/backlog)")));
            let rows: Vec<Vec<String>> = per_signal
                .iter()
                .map(|&(signal, i)| {
                    let e = &self.evaluations[i];
                    let mut row =
                        vec![signal.name().to_owned(), i.to_string(), format!("{}/{goal_total}", e.goals_met)];
                    row.extend(e.runs.iter().map(|r| {
                        format!("{:.0}/{:.1}/{}", r.replica_seconds, r.p95_wait.unwrap_or(0.0), r.peak_backlog)
                    }));
                    row
                })
                .collect();
            let widths: Vec<usize> = (0..header.len())
                .map(|c| rows.iter().map(|r| r[c].len()).chain([header[c].len()]).max().unwrap_or(0))
                .collect();
            for row in std::iter::once(&header).chain(&rows) {
                let cells: Vec<String> = row
                    .iter()
                    .enumerate()
                    .map(
                        |(c, v)| {
                            if c == 0 { format!("{v:<w$}", w = widths[c]) } else { format!("{v:>w$}", w = widths[c]) }
                        },
                    )
                    .collect();
                let policy = match row[1].parse::<usize>() {
                    Ok(i) => self.evaluations[i].candidate.describe(),
                    Err(_) => "policy".to_owned(),
                };
                let _ = writeln!(text, "{}  {policy}", cells.join("  "));
            }
        }
        let on_front = if self.front.contains(&self.chosen) { "on the front" } else { "not on the front" };
        let _ = writeln!(
            text,
            "# chosen: #{} ({on_front}): the most goals met ({}/{goal_total}), then the least shortfall on the \
             others, the fewest replica-s, the smallest p95 wait, the fewest reversals, the earliest in the grid",
            best.index, best.goals_met
        );
        let _ = writeln!(text, "#   {}", best.candidate.describe());
        for (w, load) in self.mix.iter().enumerate() {
            let goals: Vec<String> = self.goals[w]
                .iter()
                .map(|g| {
                    let short = g.shortfall(&best.runs[w], &self.seed[w], &self.oracle[w]);
                    if short == 0.0 {
                        format!("{} met", g.describe())
                    } else {
                        format!("{} MISSED by {:.0} %", g.describe(), short * 100.0)
                    }
                })
                .collect();
            let _ = writeln!(text, "# load {load}: {}", goals.join(", "));
            let rows = [(seed_label.to_owned(), self.seed[w].clone()), ("tuned".to_owned(), best.runs[w].clone())];
            text += &super::summary_table(&rows, &self.oracle[w]);
        }
        text
    }
}

/// The seed's HPA object with the candidate's target and behavior (kubenix annotations dropped),
/// as YAML that `simulate --hpa` and `kubectl apply` read.
pub fn hpa_yaml(
    seed: &k8s::HorizontalPodAutoscaler,
    candidate: &Candidate,
    comment: &str,
) -> Result<String, serde_norway::Error> {
    let mut hpa = seed.clone();
    hpa.metadata.annotations = None;
    hpa.metadata.managed_fields = None;
    hpa.metadata.resource_version = None;
    hpa.metadata.uid = None;
    hpa.metadata.creation_timestamp = None;
    hpa.status = None;
    if let Some(spec) = hpa.spec.as_mut() {
        for metric in spec.metrics.iter_mut().flatten() {
            if let Some(external) = metric.external.as_mut() {
                // The External metric that carries the candidate's signal (nix/k8s/signals.nix).
                external.metric.name = candidate.signal.metric_name();
                external.target = k8s::MetricTarget {
                    type_: "AverageValue".into(),
                    average_value: Some(Quantity(candidate.target.to_string())),
                    ..Default::default()
                };
            }
        }
        spec.behavior = Some(k8s::HorizontalPodAutoscalerBehavior {
            scale_up: Some(k8s_rules(&candidate.scale_up)),
            scale_down: Some(k8s_rules(&candidate.scale_down)),
        });
    }
    let body = serde_norway::to_string(&hpa)?;
    let mut text: String = comment.lines().map(|l| format!("# {l}\n")).collect();
    text += "---\n";
    text += &body;
    Ok(text)
}

fn k8s_rules(rules: &ScalingRules) -> k8s::HPAScalingRules {
    k8s::HPAScalingRules {
        policies: Some(
            rules
                .policies
                .iter()
                .map(|p| k8s::HPAScalingPolicy {
                    type_: match p.kind {
                        PolicyKind::Pods => "Pods".into(),
                        PolicyKind::Percent => "Percent".into(),
                    },
                    value: p.value,
                    period_seconds: p.period_seconds,
                })
                .collect(),
        ),
        select_policy: Some(select_name(rules.select_policy).into()),
        stabilization_window_seconds: rules.stabilization_window_seconds,
        tolerance: None,
    }
}

/// The candidate as options of the kubenix module (nix/k8s/options.nix) for the pool `pool`.
/// The chosen candidate as options of nix/k8s/options.nix for the worker pool `pool`;
/// `lookahead` (seconds, rounded to the option's whole seconds) is printed for the rate signals,
/// whose adapter rules use it.
pub fn kubenix_options(pool: &str, candidate: &Candidate, lookahead: f64) -> String {
    let rules = |r: &ScalingRules| {
        let policies: Vec<String> = r
            .policies
            .iter()
            .map(|p| {
                let kind = match p.kind {
                    PolicyKind::Pods => "Pods",
                    PolicyKind::Percent => "Percent",
                };
                format!("{{ type = \"{kind}\"; value = {}; periodSeconds = {}; }}", p.value, p.period_seconds)
            })
            .collect();
        format!(
            "{{\n      stabilizationWindowSeconds = {};\n      selectPolicy = \"{}\";\n      policies = [ {} ];\n    }}",
            r.stabilization_window_seconds.unwrap_or(0),
            select_name(r.select_policy),
            policies.join(" ")
        )
    };
    format!(
        "celeryAutoscale.workers.{pool}.hpa = {{\n  signal = \"{}\";\n{}  averageValue = \"{}\";\n  \
         behavior = {{\n    scaleUp = {};\n    scaleDown = {};\n  }};\n}};\n",
        candidate.signal.name(),
        if !candidate.signal.uses_rate() {
            String::new()
        } else if lookahead.fract() == 0.0 {
            format!("  lookaheadSeconds = {lookahead};\n")
        } else {
            // The option is whole seconds.
            format!("  lookaheadSeconds = {}; # {lookahead} s, rounded\n", lookahead.round())
        },
        candidate.target,
        rules(&candidate.scale_up),
        rules(&candidate.scale_down)
    )
}

/// The kubenix options (nix/k8s/options.nix: `celeryAutoscale.pipeline`) of a pipeline that
/// delivers the depth at most `delay` late: the exporter's poll interval plus the exporter job's
/// scrape interval (the adapter queries Prometheus when the HPA asks), split evenly (the scrape
/// takes the odd second, which keeps its timeout above 1 s), whole seconds, at least 1 s each. Below 2 s the options cannot follow, and the line says so.
pub fn pipeline_options(delay: Duration) -> String {
    let total = delay.as_secs_f64().round().clamp(2.0, 120.0) as u64;
    let exporter = total / 2;
    let note = if delay.as_secs_f64() < 1.5 {
        format!(" # {} s asked; each interval is at least 1 s", delay.as_secs_f64())
    } else if delay.as_secs_f64().fract() != 0.0 {
        format!(" # {} s, rounded", delay.as_secs_f64())
    } else {
        String::new()
    };
    format!(
        "celeryAutoscale.pipeline = {{ exporterIntervalSeconds = {exporter}; scrapeIntervalSeconds = {}; }};{note}\n",
        total - exporter
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::hpa::ExternalMetric;

    fn seed() -> HpaSpec {
        HpaSpec {
            name: "worker".into(),
            min_replicas: 1,
            max_replicas: 20,
            metrics: vec![ExternalMetric {
                match_labels: Default::default(),
                name: "celery_queue_depth".into(),
                target: MetricTarget::AverageValue(10_000),
            }],
            behavior: None,
        }
    }

    fn base() -> Workload {
        Workload {
            load: "burst:1".parse().unwrap(),
            service_time: Duration::from_millis(500),
            concurrency: 2,
            pod_startup: Duration::from_secs(10),
            scrape_delay: Duration::from_secs(15),
            sync_period: Duration::from_secs(15),
            step: Duration::from_millis(100),
            duration: None,
            max_duration: Duration::from_secs(3600),
            initial_replicas: None,
            signal: Signal::Depth,
            rate_window: Duration::from_secs(30),
            scale_in: crate::autoscale::simulate::ScaleIn::Newest,
        }
    }

    #[test]
    fn a_candidate_that_dominates_is_the_front_and_the_choice() {
        // One waiting task per pod keeps the HPA at maxReplicas until the burst is nearly
        // drained; after that a 300 s scale-down window only adds idle pods. Same scale-up,
        // same waits and backlog: the 0 s window costs strictly less.
        use PolicyKind::Pods;
        let grid = Grid {
            targets: vec![1],
            up: vec![(SelectPolicy::Max, vec![policy(Pods, 20, 15)])],
            up_windows: vec![0],
            down: vec![(SelectPolicy::Max, vec![policy(Pods, 20, 15)])],
            down_windows: vec![300, 0],
            scrape_delays: vec![Duration::from_secs(15)],
            signals: vec![Signal::Depth],
        };
        let mix = ["burst:400".parse().unwrap()];
        let result = tune(&seed(), ControllerConfig::default(), &base(), &mix, &grid, 2);
        let [slow, fast] = &result.evaluations[..] else { panic!("two candidates") };
        assert_eq!((slow.p95_wait, slow.peak_backlog), (fast.p95_wait, fast.peak_backlog));
        assert!(
            fast.replica_seconds + 250.0 < slow.replica_seconds,
            "{} vs {}",
            fast.replica_seconds,
            slow.replica_seconds
        );
        assert_eq!(result.front, [1]);
        assert_eq!(result.chosen, 1);
        assert_eq!(result.best().unwrap().candidate.scale_down.stabilization_window_seconds, Some(0));
    }

    #[test]
    fn the_search_is_deterministic_whatever_the_threads() {
        let mix: Vec<LoadPattern> = ["burst:200", "ramp:1:10:60"].map(|l| l.parse().unwrap()).to_vec();
        let grid = Grid::quick(Duration::from_secs(15), Signal::Depth);
        let one = tune(&seed(), ControllerConfig::default(), &base(), &mix, &grid, 1);
        let two = tune(&seed(), ControllerConfig::default(), &base(), &mix, &grid, 2);
        assert_eq!(one, two);
        assert_eq!(one.report("seed"), two.report("seed"));
        assert_eq!(one.evaluations.len(), 24);
        // Every front member is undominated, and the choice meets at least as many goals as any.
        let best = one.best().unwrap();
        assert!(one.evaluations.iter().all(|e| e.goals_met <= best.goals_met));
    }

    #[test]
    fn goals_follow_the_issue() {
        let osc: LoadPattern = "oscillate:10:8:60:300".parse().unwrap();
        assert_eq!(Goal::for_load(&osc), [Goal::NoCostlierThanSeed, Goal::ReversalsAtMost(10)]);
        let burst: LoadPattern = "burst:400".parse().unwrap();
        assert_eq!(Goal::for_load(&burst), [Goal::DrainWithin(25.0), Goal::ReplicaSecondsAtMost(600.0)]);
    }

    #[test]
    fn the_written_yaml_loads_as_the_candidate() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/k8s/autoscaling.yaml")).unwrap();
        let raw = crate::autoscale::hpa::find_hpa(&text, None).unwrap();
        let seed = HpaSpec::from_k8s(&raw).unwrap();
        for candidate in Grid::default_grid().candidates().iter().step_by(97) {
            let yaml = hpa_yaml(&raw, candidate, "tuned\nby a test").unwrap();
            let loaded = crate::autoscale::hpa::parse_hpa_manifest(&yaml, None).unwrap();
            assert_eq!(loaded, candidate.spec(&seed), "{yaml}");
            assert!(yaml.starts_with("# tuned\n# by a test\n---\n"));
        }
        let first = &Grid::default_grid().candidates()[0];
        let options = kubenix_options("worker", first, 40.0);
        assert!(
            options
                .starts_with("celeryAutoscale.workers.worker.hpa = {\n  signal = \"depth\";\n  averageValue = \"2\";"),
            "{options}"
        );
        let growth = Candidate { signal: Signal::DepthGrowth, ..first.clone() };
        assert!(
            kubenix_options("worker", &growth, 35.0)
                .contains("  signal = \"depth+growth\";\n  lookaheadSeconds = 35;\n")
        );
        assert!(kubenix_options("worker", &growth, 32.5).contains("  lookaheadSeconds = 33; # 32.5 s, rounded\n"));
    }

    #[test]
    fn the_pipeline_options_add_up_to_the_delay() {
        let options = |s: f64| pipeline_options(Duration::from_secs_f64(s));
        // 10 s is the default render: 5 s exporter poll + 5 s scrape.
        assert_eq!(
            options(10.0),
            "celeryAutoscale.pipeline = { exporterIntervalSeconds = 5; scrapeIntervalSeconds = 5; };\n"
        );
        assert_eq!(
            options(15.0),
            "celeryAutoscale.pipeline = { exporterIntervalSeconds = 7; scrapeIntervalSeconds = 8; };\n"
        );
        assert!(
            options(5.0)
                .starts_with("celeryAutoscale.pipeline = { exporterIntervalSeconds = 2; scrapeIntervalSeconds = 3; };")
        );
        assert!(options(7.4).ends_with("scrapeIntervalSeconds = 4; }; # 7.4 s, rounded\n"));
        assert!(options(0.0).ends_with(
            "exporterIntervalSeconds = 1; scrapeIntervalSeconds = 1; }; # 0 s asked; each interval is at least 1 s\n"
        ));
    }
}
