//! `celery-autoscale simulate` end to end: the example vectors through the binary, agreement
//! with the library, the closed loop, and error messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use celery_autoscale::autoscale::hpa::{
    Autoscaler, Behavior, MetricTarget, PolicyKind, ScalingPolicy, ScalingRules, SelectPolicy, load_hpa_file,
};
use celery_autoscale::autoscale::simulate::{read_trace, replay_trace};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hpa").join(name)
}

fn simulate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_celery-autoscale")).arg("simulate").args(args).output().expect("the binary runs")
}

fn stdout_of(args: &[&str]) -> String {
    let output = simulate(args);
    assert!(output.status.success(), "simulate {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

fn stderr_of_failure(args: &[&str]) -> String {
    let output = simulate(args);
    assert!(!output.status.success(), "simulate {args:?} should fail");
    String::from_utf8(output.stderr).expect("UTF-8 output")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// The replica column of `t,metric,replicas` output.
fn replicas_column(csv: &str) -> Vec<i32> {
    csv.lines().skip(1).map(|l| l.rsplit(',').next().unwrap().parse().unwrap()).collect()
}

#[test]
fn tv2_through_the_binary() {
    let hpa = fixture("seed-hpa.yaml");
    let trace = fixture("tv2.csv");
    let out = stdout_of(&["--hpa", path(&hpa), "--trace", path(&trace), "--initial-replicas", "20"]);
    assert_eq!(
        out,
        "t,metric,replicas\n0,200,20\n15,600,20\n30,600,20\n45,150,20\n60,150,20\n75,150,20\n90,150,15\n105,150,15\n"
    );
}

#[test]
fn tv3_through_the_binary() {
    let hpa = fixture("seed-hpa.yaml");
    let trace = fixture("tv3.csv");
    let out = stdout_of(&["--hpa", path(&hpa), "--trace", path(&trace), "--initial-replicas", "10"]);
    assert_eq!(replicas_column(&out), [10, 10, 10, 10, 10, 10, 5, 5, 4, 4]);
}

#[test]
fn tv5_through_the_binary_echoes_missing_cells() {
    let hpa = fixture("seed-hpa.yaml");
    let trace = fixture("tv5.csv");
    let out = stdout_of(&["--hpa", path(&hpa), "--trace", path(&trace), "--initial-replicas", "5"]);
    assert_eq!(out, "t,metric,replicas\n0,50,5\n15,,5\n30,,5\n45,50,5\n");
}

#[test]
fn json_list_manifest_gives_the_same_result() {
    let trace = fixture("tv2.csv");
    let yaml =
        stdout_of(&["--hpa", path(&fixture("seed-hpa.yaml")), "--trace", path(&trace), "--initial-replicas", "20"]);
    let json = stdout_of(&[
        "--hpa",
        path(&fixture("seed-hpa-list.json")),
        "--trace",
        path(&trace),
        "--initial-replicas",
        "20",
    ]);
    assert_eq!(yaml, json);
}

#[test]
fn initial_replicas_default_to_min() {
    let out = stdout_of(&["--hpa", path(&fixture("seed-hpa.yaml")), "--trace", path(&fixture("tv3.csv"))]);
    // From 1: 100 → 10 proposals limited by Percent 200 to 3, then 9, ...
    assert_eq!(replicas_column(&out)[0], 3);
}

/// The shape of the test the real crate runs on k8s/autoscaling.yaml: the binary's answers
/// equal the library's decisions on the same trace.
#[test]
fn binary_equals_library_on_a_long_trace() {
    let dir = std::env::temp_dir().join(format!("simulate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace_path = dir.join("long.csv");
    let mut csv = String::from("t,metric\n");
    for i in 0..120 {
        let value = match i % 37 {
            0..=5 => format!("{}", 400 - i),
            6 => String::new(),
            7..=20 => format!("{}.5", (i * 7) % 90),
            _ => "0".into(),
        };
        csv += &format!("{},{value}\n", i * 15);
    }
    std::fs::write(&trace_path, csv).unwrap();
    let project = Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/autoscaling.yaml");
    for hpa in
        ["seed-hpa.yaml", "legacy-hpa.yaml", "default-behavior-hpa.yaml"].map(fixture).into_iter().chain([project])
    {
        let manifest = hpa.file_name().unwrap().to_str().unwrap().to_owned();
        let out = stdout_of(&["--hpa", path(&hpa), "--trace", path(&trace_path)]);
        let spec = load_hpa_file(&hpa, None).unwrap();
        let initial = spec.min_replicas;
        let decisions = replay_trace(&mut Autoscaler::new(spec), &read_trace(&trace_path).unwrap(), initial).unwrap();
        let expected: Vec<i32> = decisions.iter().map(|d| d.replicas).collect();
        assert_eq!(replicas_column(&out), expected, "{manifest}");
        assert!(expected.iter().any(|&r| r > 1), "{manifest}: the trace exercises scaling");
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn closed_loop_prints_a_summary_and_writes_csv_and_svg() {
    let dir = std::env::temp_dir().join(format!("simulate-closed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (csv, svg) = (dir.join("run.csv"), dir.join("run.svg"));
    let out = stdout_of(&[
        "--hpa",
        path(&fixture("seed-hpa.yaml")),
        "--load",
        "burst:400",
        "--csv",
        path(&csv),
        "--plot",
        path(&svg),
    ]);
    let mut lines = out.lines();
    assert!(lines.next().unwrap().starts_with("# workload: load=burst:400 service-time=0.5s"));
    assert!(lines.next().unwrap().starts_with("hpa  "));
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(row[0], "seed-hpa");
    assert_eq!(row[2], "398", "peak backlog: 400 minus the first pod's two tasks");
    assert_eq!(row[5], "20", "the burst reaches maxReplicas");
    assert_eq!(row[7], "400/400");
    let oracle: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(oracle[0], "oracle", "the just-in-time oracle closes the table");
    assert_eq!((oracle[1], oracle[3]), ("290", "14.5"), "20 pods once the first pod start is over");
    assert_eq!(oracle[10], "1.00");

    let timeline = std::fs::read_to_string(&csv).unwrap();
    assert!(timeline.starts_with("t,arrived,queue_depth,reserved,metric_seen,desired_replicas"));
    let last = timeline.lines().last().unwrap();
    assert!(last.ends_with(",1,1,1,0"), "ends drained and back at min: {last}");

    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(picture.starts_with("<svg"));
    for label in ["queue depth (waiting)", "desired (HPA spec)", "current (live workers)", "time (s)", "replicas"] {
        assert!(picture.contains(label), "SVG lacks {label:?}");
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn compare_prints_one_row_per_file() {
    let out = stdout_of(&[
        "--compare",
        path(&fixture("seed-hpa.yaml")),
        path(&fixture("legacy-hpa.yaml")),
        path(&fixture("default-behavior-hpa.yaml")),
        "--load",
        "ramp:1:10:60",
    ]);
    let rows: Vec<&str> = out.lines().skip(2).collect();
    assert_eq!(rows.len(), 4, "{out}");
    for (row, name) in rows.iter().zip(["seed-hpa", "legacy-hpa", "default-behavior-hpa", "oracle"]) {
        assert!(row.starts_with(name), "{row}");
    }
    // Aligned: every row as wide as the header once trailing spaces are trimmed per column.
    let header = out.lines().nth(1).unwrap();
    assert!(rows.iter().all(|r| r.len() == header.len()), "{out}");
}

#[test]
fn errors_explain_what_to_do() {
    let no_hpa = fixture("tv2.csv"); // a file without an HPA (and not YAML objects)
    let err = stderr_of_failure(&["--hpa", path(&no_hpa), "--trace", path(&no_hpa)]);
    assert!(err.contains("no autoscaling/v2 HorizontalPodAutoscaler found"), "{err}");

    let dir = std::env::temp_dir().join(format!("simulate-err-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad_trace = dir.join("bad.csv");
    std::fs::write(&bad_trace, "t,metric\n0,10\n15,ten\n").unwrap();
    let err = stderr_of_failure(&["--hpa", path(&fixture("seed-hpa.yaml")), "--trace", path(&bad_trace)]);
    assert!(err.contains("trace line 3") && err.contains("leave it empty"), "{err}");
    std::fs::write(&bad_trace, "t,metric\n15,10\n0,10\n").unwrap();
    let err = stderr_of_failure(&["--hpa", path(&fixture("seed-hpa.yaml")), "--trace", path(&bad_trace)]);
    assert!(err.contains("sync order"), "{err}");
    std::fs::remove_dir_all(dir).ok();

    let err = stderr_of_failure(&["--hpa", path(&fixture("seed-hpa.yaml")), "--load", "storm:3"]);
    assert!(err.contains("burst:N"), "{err}");
    let err = stderr_of_failure(&["--hpa", path(&fixture("seed-hpa.yaml")), "--step", "0.4", "--sync-period", "15"]);
    assert!(err.contains("multiple of --step"), "{err}");
}

/// The rendered manifest the cluster gets (k8s/autoscaling.yaml, generated from
/// nix/k8s/autoscaling.nix) carries exactly the seed's numbers.
#[test]
fn the_project_hpa_is_the_seeds() {
    let spec = load_hpa_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/autoscaling.yaml"), None).unwrap();
    assert_eq!((spec.name.as_str(), spec.min_replicas, spec.max_replicas), ("worker", 1, 20));
    assert_eq!(spec.metrics.len(), 1);
    assert_eq!(spec.metrics[0].name, "celery_queue_depth");
    assert_eq!(spec.metrics[0].match_labels.get("queue").map(String::as_str), Some("celery"));
    assert_eq!(spec.metrics[0].target, MetricTarget::AverageValue(10_000), "AverageValue \"10\" per pod");
    let policy = |kind, value, period_seconds| ScalingPolicy { kind, value, period_seconds };
    assert_eq!(
        spec.behavior,
        Some(Behavior {
            scale_up: ScalingRules {
                stabilization_window_seconds: Some(0),
                select_policy: SelectPolicy::Max,
                policies: vec![policy(PolicyKind::Percent, 200, 15)],
                tolerance: None,
            },
            scale_down: ScalingRules {
                stabilization_window_seconds: Some(60),
                select_policy: SelectPolicy::Max,
                policies: vec![policy(PolicyKind::Percent, 50, 30)],
                tolerance: None,
            },
        })
    );
}

/// The README's simulate examples run as written, with the files in examples/.
#[test]
fn readme_examples_run() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let examples: Vec<&str> =
        readme.lines().filter_map(|l| l.trim().strip_prefix("celery-autoscale simulate ")).collect();
    assert!(examples.len() >= 3, "README lost its simulate examples");
    let dir = tempfile::tempdir().unwrap();
    for example in examples {
        // Outputs (--plot) go to a scratch directory; inputs are read from the repository.
        let args: Vec<String> = example
            .split_whitespace()
            .map(|a| if a.ends_with(".svg") { dir.path().join(a).display().to_string() } else { a.to_owned() })
            .collect();
        let output = Command::new(env!("CARGO_BIN_EXE_celery-autoscale"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .arg("simulate")
            .args(&args)
            .output()
            .unwrap();
        assert!(output.status.success(), "README example {example:?}: {}", String::from_utf8_lossy(&output.stderr));
    }
}

#[test]
fn tune_is_deterministic_and_its_hpa_replays() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/autoscaling.yaml");
    let tune = |written: &Path| {
        stdout_of(&[
            "--hpa",
            path(&seed),
            "--tune",
            "--tune-grid",
            "quick",
            "--load",
            "burst:100",
            "--load",
            "ramp:1:10:60",
            "--write-hpa",
            path(written),
        ])
    };
    let (a, b) = (tune(&first), tune(&second));
    assert_eq!(a.replace(path(&first), "X"), b.replace(path(&second), "X"), "two searches print the same");
    assert_eq!(std::fs::read_to_string(&first).unwrap(), std::fs::read_to_string(&second).unwrap());
    assert!(a.contains("# Pareto front: ") && a.contains(" of 24 candidates"), "{a}");
    assert!(a.contains("celeryAutoscale.workers.worker.hpa = {\n  signal = \"depth\";\n  averageValue = "), "{a}");
    // The quick grid keeps --scrape-delay (15 s): the pipeline options that give it.
    assert!(
        a.contains("celeryAutoscale.pipeline = { exporterIntervalSeconds = 7; scrapeIntervalSeconds = 8; };\n"),
        "{a}"
    );
    assert!(
        a.contains("# signal depth: the HPA reads the External metric celery_queue_depth, which the adapter serves"),
        "{a}"
    );

    // The written HPA, replayed on the first workload, gives the tuned row of the report.
    let tuned_row = a.lines().find(|l| l.starts_with("tuned ")).expect("a tuned row").to_owned();
    let replay = stdout_of(&["--hpa", path(&first), "--load", "burst:100"]);
    let replayed = replay.lines().nth(2).unwrap();
    let figures = |row: &str| row.split_whitespace().skip(1).collect::<Vec<_>>().join(" ");
    assert_eq!(figures(replayed), figures(&tuned_row), "{a}\n{replay}");
}

#[test]
fn several_loads_need_tune() {
    let err =
        stderr_of_failure(&["--hpa", path(&fixture("seed-hpa.yaml")), "--load", "burst:10", "--load", "burst:20"]);
    assert!(err.contains("--load is given 2 times"), "{err}");
    let err = stderr_of_failure(&["--hpa", path(&fixture("seed-hpa.yaml")), "--write-hpa", "x.yaml"]);
    assert!(err.contains("--tune"), "{err}");
    let err = stderr_of_failure(&["--hpa", path(&fixture("seed-hpa.yaml")), "--signal", "depth+rumours"]);
    assert!(err.contains("--signal") && err.contains("depth+arrivals"), "{err}");
    let err = stderr_of_failure(&["--hpa", path(&fixture("seed-hpa.yaml")), "--tune-grid", "huge", "--tune"]);
    assert!(err.contains("--tune-grid"), "{err}");
    let err = stderr_of_failure(&[
        "--hpa",
        path(&fixture("seed-hpa.yaml")),
        "--tune",
        "--write-hpa",
        "/nonexistent-dir/tuned.yaml",
    ]);
    assert!(err.contains("--write-hpa: cannot write /nonexistent-dir/tuned.yaml"), "{err}");
    let err = stderr_of_failure(&["--hpa", path(&fixture("seed-hpa.yaml")), "--rate-window", "0"]);
    assert!(err.contains("--rate-window"), "{err}");
}

#[test]
fn every_signal_runs_and_depth_is_todays() {
    let hpa = fixture("seed-hpa.yaml");
    let plain = stdout_of(&["--hpa", path(&hpa), "--load", "ramp:1:10:60"]);
    let depth = stdout_of(&["--hpa", path(&hpa), "--load", "ramp:1:10:60", "--signal", "depth"]);
    assert_eq!(plain, depth, "depth is the default");
    for signal in ["depth+running", "depth+arrivals", "depth+growth"] {
        let out = stdout_of(&["--hpa", path(&hpa), "--load", "ramp:1:10:60", "--signal", signal]);
        assert!(out.lines().next().unwrap().contains(&format!("signal={signal}")), "{out}");
        assert!(out.lines().nth(2).unwrap().contains("330/330"), "{out}");
    }
}

#[test]
fn idle_first_scale_in_interrupts_fewer_tasks_than_newest_first() {
    let repo = env!("CARGO_MANIFEST_DIR");
    let hpa = format!("{repo}/examples/hpa-tuned.yaml");
    let interrupted = |order: &str| -> u64 {
        let out = stdout_of(&[
            "--hpa",
            &hpa,
            "--signal",
            "depth+running",
            "--scrape-delay",
            "10",
            "--load",
            "ramp:1:40:300",
            "--scale-in",
            order,
        ]);
        let mut lines = out.lines().skip(1);
        assert!(lines.next().unwrap().contains("reversals  interrupted  replica-s/oracle"));
        // interrupted, then the two ratios, end each row.
        let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        row[row.len() - 3].parse().unwrap()
    };
    let (newest, idle_first) = (interrupted("newest"), interrupted("idle-first"));
    // The tuned policy scales in while the ramp's pods are busy: the newest pods are often busy.
    assert!(newest >= 5, "newest first interrupts tasks on this load: {newest}");
    assert!(idle_first * 5 <= newest, "idle first: {idle_first} against {newest}");
    assert!(stderr_of_failure(&["--hpa", &hpa, "--scale-in", "oldest"]).contains("--scale-in"));
}
