//! `celery-autoscale simulate`: drive the HPA replica ([`crate::autoscale::hpa`]) without a cluster.
//!
//! **Open loop** (`--trace`): replay a metric trace — CSV `t,metric`, one row per sync instant —
//! and print `t,metric,replicas`, the replica count the HPA holds after each sync. Pods appear
//! immediately (status replicas = spec replicas at every sync). An empty metric cell means the
//! metric was missing at that sync.
//!
//! **Closed loop** (no `--trace`): a time-stepped model of the whole system, driven through the
//! same [`Autoscaler::sync`]:
//! - tasks arrive following a [`LoadPattern`] into one FIFO queue;
//! - each pod runs up to `concurrency` tasks at a time, each taking `service_time`; it takes a
//!   task only when a slot is free (prefetch multiplier 1, late ack), so "reserved" = running;
//! - a new pod starts consuming `pod_startup` after the HPA created it;
//! - the HPA sees the queue depth (waiting tasks only, like `celery_queue_depth`) as it was
//!   `scrape_delay` earlier (exporter interval + Prometheus scrape + adapter), 0 before t = 0;
//!   every metric of the HPA is fed that value; `--signal` adds what workers hold or an
//!   arrival-rate term to it ([`Signal`]);
//! - scale-down picks victims like the ReplicaSet controller (pods not yet ready first, then the
//!   most recently started); a victim stops taking tasks, finishes what it runs (the shutdown
//!   timeout is assumed long enough) and then disappears;
//! - time advances in fixed `step`s (integer milliseconds) so the sync ticks are exact; work
//!   finishes at the first step at or after its finish time.
//!
//! It reports pod-seconds (every existing pod, starting and draining ones included), the peak
//! backlog, the time to drain (first arrival until the queue is empty and nothing runs), the p95
//! queue wait (FIFO, nearest rank), the most replicas asked for, the number of scale events and
//! of direction reversals (a scale-up after a scale-down or the reverse). Every table ends with
//! the just-in-time [`oracle()`] on the same workload, bounded by the first HPA's min/max
//! replicas, and each policy's replica-seconds and p95 wait as a ratio to the oracle's.
//!
//! **Tune** (`--tune`): a grid search over the HPA's target and behavior, the scrape delay and
//! the signal on a mix of closed-loop workloads ([`tune`]); docs/Autoscaling.md has the results.

mod closed_loop;
mod oracle;
mod trace;
pub mod tune;

use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;

use crate::autoscale::hpa::{Autoscaler, ControllerConfig, DeadBand, HpaSpec, load_hpa_file};
use crate::runtime::args;
use crate::tools::pattern::LoadPattern;
use crate::tools::plot::{TimelinePoint, write_svg};

pub use closed_loop::{
    ClosedLoopRun, Sample, ScaleIn, Signal, SignalSample, Summary, Workload, WorkloadError, closed_loop, timeline_csv,
};
pub use closed_loop::{MAX_PODS, MAX_SIMULATED_TASKS, MAX_STEPS};
pub use oracle::oracle;
pub use trace::{Trace, TraceError, TraceRow, parse_trace, read_trace, replay_trace};
use trace::{trace_points, write_trace_result};

/// Options of `celery-autoscale simulate`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    about = "Replay a metric trace (open loop) or a modelled workload (closed loop) through the HPA algorithm",
    after_help = "Open loop:   simulate --hpa k8s/autoscaling.yaml --trace examples/trace.csv\n\
                  Closed loop: simulate --hpa k8s/autoscaling.yaml --load ramp:1:20:120 --plot run.svg\n\
                  Compare:     simulate --compare k8s/autoscaling.yaml examples/hpa-faster.yaml --load burst:400\n\
                  Tune:        simulate --hpa k8s/autoscaling.yaml --tune --write-hpa tuned.yaml"
)]
pub struct SimulateArgs {
    /// HPA manifest: YAML (multi-document is fine) or a JSON `kind: List`; the
    /// autoscaling/v2 HorizontalPodAutoscaler in it is used.
    #[arg(long, value_name = "FILE", required_unless_present = "compare")]
    pub hpa: Option<PathBuf>,
    /// Which HPA to use when a file holds several.
    #[arg(long, value_name = "NAME")]
    pub hpa_name: Option<String>,
    /// Open loop: CSV with header `t,metric` (seconds, total metric value; an empty value means
    /// the metric was missing), one row per sync. Prints `t,metric,replicas`.
    #[arg(long, value_name = "CSV", conflicts_with = "compare")]
    pub trace: Option<PathBuf>,
    /// Replicas before the first sync [default: the HPA's minReplicas].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(0..=i64::from(MAX_PODS)))]
    pub initial_replicas: Option<i32>,

    /// Closed loop: arrival pattern, `burst:N`, `ramp:FROM:TO:SECONDS` or
    /// `oscillate:MEAN:AMPLITUDE:PERIOD:SECONDS` (rates in tasks/s) [default: burst:400]. With
    /// --tune, give it once per workload of the mix [default: burst:400, ramp:1:40:300 and
    /// oscillate:10:8:60:300].
    #[arg(long, value_name = "PATTERN")]
    pub load: Vec<LoadPattern>,
    /// Closed loop: seconds one task takes.
    #[arg(long, value_name = "SECONDS", default_value = "0.5", value_parser = args::duration)]
    pub service_time: Duration,
    /// Closed loop: tasks one worker pod runs at once.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub concurrency: u32,
    /// Closed loop: seconds from pod creation until it consumes.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = args::non_negative_duration)]
    pub pod_startup: Duration,
    /// Closed loop: age of the queue depth the HPA sees (exporter interval + scrape + adapter).
    #[arg(long, value_name = "SECONDS", default_value = "15", value_parser = args::non_negative_duration)]
    pub scrape_delay: Duration,
    /// Closed loop: seconds between HPA syncs (--horizontal-pod-autoscaler-sync-period); the
    /// open loop syncs at the trace rows.
    #[arg(long, value_name = "SECONDS", default_value = "15", value_parser = args::duration)]
    pub sync_period: Duration,
    /// Closed loop: simulated time [default: until drained and back at minReplicas, at most
    /// --max-duration].
    #[arg(long, value_name = "SECONDS", value_parser = args::duration)]
    pub duration: Option<Duration>,
    /// Closed loop: upper bound when --duration is not given.
    #[arg(long, value_name = "SECONDS", default_value = "3600", value_parser = args::duration)]
    pub max_duration: Duration,
    /// Closed loop: what the HPA's metric carries: `depth` (waiting tasks, today's adapter rule),
    /// `depth+running` (waiting + held by workers), `depth+arrivals` (waiting + the arrival
    /// rate × (scrape delay + sync period + pod start-up), the rate from Δdepth + completions
    /// over --rate-window) or `depth+growth` (waiting + the queue's growth rate, when positive,
    /// × the same delay).
    #[arg(long, value_name = "SIGNAL", default_value = "depth")]
    pub signal: Signal,
    /// Closed loop, `--signal depth+arrivals` or `depth+growth`: seconds over which the rate is
    /// estimated.
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = args::duration)]
    pub rate_window: Duration,
    /// Closed loop: which pods a scale-down deletes: `newest` (the ReplicaSet's choice when every
    /// pod costs the same) or `idle-first` (the workers keep their pod deletion cost,
    /// `worker --pod-deletion-cost`). The table's `interrupted` counts the tasks running on the
    /// pods chosen.
    #[arg(long, value_name = "ORDER", value_enum, default_value_t = ScaleIn::Newest)]
    pub scale_in: ScaleIn,
    /// Closed loop: time step of the model, in seconds (whole milliseconds).
    #[arg(long, value_name = "SECONDS", default_value = "0.1", value_parser = args::duration)]
    pub step: Duration,
    /// Closed loop: run each HPA file on the same workload and print one table row per file.
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub compare: Vec<PathBuf>,
    /// Closed loop: write the timeline as CSV (with --compare: one file per HPA, suffixed).
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Draw queue depth and replicas over time as SVG (with --compare: one file per HPA).
    #[arg(long, value_name = "FILE", conflicts_with = "tune")]
    pub plot: Option<PathBuf>,

    /// Search HPA behaviors, targets, scrape delays and signals for the --hpa seed on a mix of --load
    /// workloads; print the Pareto front, the chosen policy per workload beside the seed and the
    /// oracle, and the matching kubenix options. The default grid (21600 candidates × 3 loads)
    /// takes 10–18 s with a release build on 2 cores (about 17 s of CPU); `--tune-grid quick`
    /// well under a second.
    #[arg(long, conflicts_with_all = ["trace", "compare", "csv"])]
    pub tune: bool,
    /// With --tune: `default` (21600 candidates: 5400 policies × the four --signal values) or
    /// `quick` (24, at the given --scrape-delay and --signal).
    #[arg(long, value_name = "GRID", default_value = "default", requires = "tune")]
    pub tune_grid: TuneGridArg,
    /// With --tune: write the chosen policy as an HPA manifest (the seed's object with the
    /// chosen target and behavior), loadable by `simulate --hpa`.
    #[arg(long, value_name = "FILE", requires = "tune")]
    pub write_hpa: Option<PathBuf>,

    /// --horizontal-pod-autoscaler-tolerance of the modelled controller.
    #[arg(long, value_name = "RATIO", default_value_t = 0.1)]
    pub tolerance: f64,
    /// --horizontal-pod-autoscaler-downscale-stabilization of the modelled controller, seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub downscale_stabilization: i32,
    /// What an AverageValue metric proposes inside the tolerance band: `status` replicas as
    /// upstream today (kubernetes#138505), or `spec` replicas as the proposed fix.
    #[arg(long, value_name = "WHICH", default_value = "status")]
    pub dead_band: DeadBandArg,
}

/// `--tune-grid` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TuneGridArg {
    Default,
    Quick,
}

/// `--dead-band` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeadBandArg {
    Status,
    Spec,
}

/// Runs the subcommand, writing results to stdout.
pub fn run(args: &SimulateArgs) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    run_to(args, &mut out)
}

/// Runs the subcommand, writing results to `out`.
pub fn run_to(args: &SimulateArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let config = ControllerConfig {
        tolerance: args.tolerance,
        downscale_stabilization_seconds: args.downscale_stabilization,
        dead_band: match args.dead_band {
            DeadBandArg::Status => DeadBand::StatusReplicas,
            DeadBandArg::Spec => DeadBand::SpecReplicas,
        },
        ..ControllerConfig::default()
    };
    let load = |path: &Path| -> anyhow::Result<HpaSpec> { Ok(load_hpa_file(path, args.hpa_name.as_deref())?) };

    if let Some(trace_path) = &args.trace {
        let hpa_path = args.hpa.as_deref().context("--trace needs --hpa FILE")?;
        let spec = load(hpa_path)?;
        let trace = read_trace(trace_path)?;
        let initial = args.initial_replicas.unwrap_or(spec.min_replicas);
        let mut autoscaler = Autoscaler::with_config(spec, config);
        let decisions = replay_trace(&mut autoscaler, &trace, initial)?;
        write_trace_result(out, &trace, &decisions)?;
        if let Some(plot) = &args.plot {
            let title = format!("{} — trace {}", autoscaler.spec.name, file_label(trace_path));
            write_svg(plot, &title, &trace_points(&trace, &decisions))?;
        }
        return Ok(());
    }

    if args.tune {
        return run_tune(args, config, out);
    }
    let pattern = match &args.load[..] {
        [] => LoadPattern::Burst { n: 400 },
        [one] => one.clone(),
        several => anyhow::bail!(WorkloadError::new(format!(
            "--load is given {} times; only --tune takes several workloads",
            several.len()
        ))),
    };
    let workload = Workload {
        load: pattern,
        service_time: args.service_time,
        concurrency: args.concurrency,
        pod_startup: args.pod_startup,
        scrape_delay: args.scrape_delay,
        sync_period: args.sync_period,
        step: args.step,
        duration: args.duration,
        max_duration: args.max_duration,
        initial_replicas: args.initial_replicas,
        signal: args.signal,
        rate_window: args.rate_window,
        scale_in: args.scale_in,
    };
    workload.validate()?;

    let files: Vec<&PathBuf> = args.hpa.iter().chain(&args.compare).collect();
    let several = files.len() > 1;
    let mut rows = Vec::new();
    let mut bounds = None;
    for path in files {
        let spec = load(path)?;
        workload.check_pods(&spec)?;
        bounds.get_or_insert((spec.min_replicas, spec.max_replicas));
        let name = spec.name.clone();
        let run = closed_loop(Autoscaler::with_config(spec, config), &workload);
        let label = file_label(path);
        if let Some(csv) = &args.csv {
            let target = if several { suffixed(csv, &label) } else { csv.clone() };
            std::fs::write(&target, timeline_csv(&run.timeline))
                .with_context(|| format!("cannot write {}", target.display()))?;
        }
        if let Some(plot) = &args.plot {
            let target = if several { suffixed(plot, &label) } else { plot.clone() };
            let title = format!("HPA {name} ({label}) — load {}", workload.load);
            let points: Vec<TimelinePoint> = run.timeline.iter().map(TimelinePoint::from).collect();
            write_svg(&target, &title, &points)?;
        }
        rows.push((label, run.summary));
    }
    // The first file's bounds: the oracle is held to the same pool as the policy it is read with.
    let (min, max) = bounds.context("no HPA file given")?;
    let reference = oracle(&workload, min, max);
    writeln!(out, "# workload: {}", workload.describe())?;
    out.write_all(summary_table(&rows, &reference).as_bytes())?;
    Ok(())
}

/// `--tune`: the search, its report, the written HPA and the kubenix options.
fn run_tune(args: &SimulateArgs, config: ControllerConfig, out: &mut dyn Write) -> anyhow::Result<()> {
    let hpa_path = args.hpa.as_deref().context("--tune needs --hpa FILE (the seed policy)")?;
    let text = std::fs::read_to_string(hpa_path)
        .map_err(|cause| crate::autoscale::hpa::HpaError::Read { path: hpa_path.display().to_string(), cause })?;
    let raw = crate::autoscale::hpa::find_hpa(&text, args.hpa_name.as_deref())
        .with_context(|| format!("{}", hpa_path.display()))?;
    let seed = load_hpa_file(hpa_path, args.hpa_name.as_deref())?;
    let mix: Vec<LoadPattern> = if args.load.is_empty() {
        tune::DEFAULT_MIX.iter().map(|l| l.parse().expect("the default mix parses")).collect()
    } else {
        args.load.clone()
    };
    let base = Workload {
        load: mix[0].clone(),
        service_time: args.service_time,
        concurrency: args.concurrency,
        pod_startup: args.pod_startup,
        scrape_delay: args.scrape_delay,
        sync_period: args.sync_period,
        step: args.step,
        duration: args.duration,
        max_duration: args.max_duration,
        initial_replicas: args.initial_replicas,
        signal: args.signal,
        rate_window: args.rate_window,
        scale_in: args.scale_in,
    };
    for load in &mix {
        Workload { load: load.clone(), ..base.clone() }.validate()?;
    }
    base.check_pods(&seed)?;
    let grid = match args.tune_grid {
        TuneGridArg::Default => tune::Grid::default_grid(),
        TuneGridArg::Quick => tune::Grid::quick(args.scrape_delay, args.signal),
    };
    // An unwritable --write-hpa is said before the search, not after it.
    if let Some(path) = &args.write_hpa {
        std::fs::File::create(path).with_context(|| format!("--write-hpa: cannot write {}", path.display()))?;
    }
    let threads = std::thread::available_parallelism().map(usize::from).unwrap_or(1);
    let result = tune::tune(&seed, config, &base, &mix, &grid, threads);
    let loads: Vec<String> = mix.iter().map(ToString::to_string).collect();
    writeln!(out, "# tune: seed {} ({}), mix {}", seed.name, file_label(hpa_path), loads.join(" "))?;
    writeln!(out, "# workload: {}", base.describe().split_once(' ').map_or("", |(_, rest)| rest))?;
    out.write_all(result.report(&file_label(hpa_path)).as_bytes())?;
    let Some(best) = result.best() else {
        return Ok(());
    };
    let delay = best.candidate.scrape_delay.as_secs_f64();
    let replay: Vec<String> = loads.iter().map(|l| format!("--load {l}")).collect();
    if let Some(path) = &args.write_hpa {
        let comment = format!(
            "Chosen by `celery-autoscale simulate --tune` from {} on the mix {}.\n{}\n\
             Modelled with the metric seen {delay} s late (exporter interval + scrape + adapter).\n\
             The metric must carry the signal {}: the adapter's metricsQuery\n  {}",
            file_label(hpa_path),
            loads.join(" "),
            best.candidate.describe(),
            best.candidate.signal.name(),
            promql(best, &base),
        );
        let yaml = tune::hpa_yaml(&raw, &best.candidate, &comment).context("cannot render the chosen HPA")?;
        std::fs::write(path, yaml).with_context(|| format!("--write-hpa: cannot write {}", path.display()))?;
        writeln!(out, "# wrote {}; replay one workload with:", path.display())?;
        writeln!(
            out,
            "#   celery-autoscale simulate --hpa {} --scrape-delay {delay} --signal {} {}",
            path.display(),
            best.candidate.signal.name(),
            replay[0]
        )?;
    }
    writeln!(out, "# kubenix (nix/k8s/options.nix), for the worker pool {}:", seed.name)?;
    out.write_all(tune::kubenix_options(&seed.name, &best.candidate, lookahead(best, &base)).as_bytes())?;
    writeln!(
        out,
        "# the metric pipeline must deliver the depth within {delay} s: the exporter's poll plus the scrape of its job"
    )?;
    out.write_all(tune::pipeline_options(best.candidate.scrape_delay).as_bytes())?;
    writeln!(
        out,
        "# signal {}: the HPA reads the External metric {}, which the adapter serves with the metricsQuery\n\
         # (nix/k8s/signals.nix, the rules of the ConfigMap adapter-config):\n#   {}",
        best.candidate.signal.name(),
        best.candidate.signal.metric_name(),
        promql(best, &base)
    )?;
    Ok(())
}

/// The rate signals' lookahead for the chosen candidate: scrape delay + sync period + pod start.
fn lookahead(best: &tune::Evaluation, base: &Workload) -> f64 {
    (best.candidate.scrape_delay + base.sync_period + base.pod_startup).as_secs_f64()
}

fn promql(best: &tune::Evaluation, base: &Workload) -> String {
    best.candidate.signal.promql(lookahead(best, base), base.rate_window.as_secs_f64())
}

fn file_label(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

/// `out.svg` + `fast` → `out-fast.svg`.
fn suffixed(path: &Path, label: &str) -> PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{label}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{label}"),
    };
    path.with_file_name(name)
}

/// An aligned table, one row per HPA and a last row for the just-in-time `oracle` (see
/// [`oracle()`]); the last two columns are each HPA's replica-seconds and p95 wait divided by the
/// oracle's (`-` where the oracle's is 0).
pub fn summary_table(rows: &[(String, Summary)], oracle: &Summary) -> String {
    let header = [
        "hpa",
        "replica-s",
        "peak backlog",
        "drain s",
        "p95 wait s",
        "max replicas",
        "scale events",
        "done/tasks",
        "reversals",
        "interrupted",
        "replica-s/oracle",
        "p95 wait/oracle",
    ];
    let optional = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
    let ratio = |v: Option<f64>, reference: Option<f64>| match (v, reference) {
        (Some(v), Some(r)) if r > 0.0 => format!("{:.2}", v / r),
        _ => "-".into(),
    };
    let cells = |name: &str, s: &Summary, events: String, reversals: String| -> [String; 12] {
        [
            name.to_owned(),
            format!("{:.0}", s.replica_seconds),
            s.peak_backlog.to_string(),
            optional(s.time_to_drain),
            optional(s.p95_wait),
            s.max_replicas.to_string(),
            events,
            format!("{}/{}", s.completed, s.tasks),
            reversals,
            s.interrupted.to_string(),
            ratio(Some(s.replica_seconds), Some(oracle.replica_seconds)),
            ratio(s.p95_wait, oracle.p95_wait),
        ]
    };
    let mut table: Vec<[String; 12]> =
        rows.iter().map(|(name, s)| cells(name, s, s.scale_events.to_string(), s.reversals.to_string())).collect();
    table.push(cells("oracle", oracle, "-".into(), "-".into()));
    aligned(&header, &table)
}

/// Left-aligned first column, right-aligned others, two spaces apart, no trailing spaces.
pub(crate) fn aligned<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let widths: Vec<usize> =
        (0..N).map(|c| rows.iter().map(|r| r[c].len()).chain([header[c].len()]).max().unwrap_or(0)).collect();
    let line = |values: &[&str]| {
        let mut text = String::new();
        for (c, value) in values.iter().enumerate() {
            if c == 0 {
                let _ = write!(text, "{value:<w$}", w = widths[c]);
            } else {
                let _ = write!(text, "  {value:>w$}", w = widths[c]);
            }
        }
        text.trim_end().to_owned() + "\n"
    };
    let mut text = line(header);
    for row in rows {
        text += &line(&row.iter().map(String::as_str).collect::<Vec<_>>());
    }
    text
}
