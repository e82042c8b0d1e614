//! The example vectors of docs/hpa-algorithm.md §2 and the specific claims of §1, through the
//! library. (tests/simulate_cli.rs runs the same vectors through the binary.)

use std::path::{Path, PathBuf};

use celery_autoscale::autoscale::hpa::{
    Autoscaler, Behavior, ConditionType, ControllerConfig, DeadBand, Decision, ExternalMetric, HpaError, HpaSpec,
    MetricReading, MetricTarget, Observation, PolicyKind, Reason, ScalingPolicy, ScalingRules, SelectPolicy, Timestamp,
    load_hpa_file, parse_hpa_manifest, percent_scale_down, percent_scale_up,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hpa").join(name)
}

fn seed() -> HpaSpec {
    load_hpa_file(&fixture("seed-hpa.yaml"), None).expect("seed fixture loads")
}

/// Runs syncs every 15 s from t=0 with pods appearing immediately; `queue` values are totals
/// (None = metric missing). Returns every decision.
fn run(autoscaler: &mut Autoscaler, initial: i32, queue: &[Option<i64>]) -> Vec<Decision> {
    let mut replicas = initial;
    queue
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let now = Timestamp::from_secs(15 * i as i64);
            let readings = vec![MetricReading::total(q.map(|v| v * 1000))];
            let decision = autoscaler.sync(now, &Observation::settled(replicas, readings));
            replicas = decision.replicas;
            decision
        })
        .collect()
}

fn replicas(decisions: &[Decision]) -> Vec<i32> {
    decisions.iter().map(|d| d.replicas).collect()
}

fn reason(decision: &Decision, kind: ConditionType) -> (bool, Reason) {
    let condition = decision.condition(kind).expect("condition set");
    (condition.status, condition.reason)
}

#[test]
fn seed_fixture_is_defaulted_like_the_api_server() {
    let spec = seed();
    assert_eq!(spec.name, "worker");
    assert_eq!((spec.min_replicas, spec.max_replicas), (1, 20));
    assert_eq!(
        spec.metrics,
        vec![ExternalMetric {
            name: "celery_queue_depth".into(),
            match_labels: [("queue".to_owned(), "celery".to_owned())].into(),
            target: MetricTarget::AverageValue(10_000)
        }]
    );
    let behavior = spec.behavior.expect("behavior");
    // policies replace the default list as a whole: no "4 pods" policy survives.
    assert_eq!(
        behavior.scale_up.policies,
        vec![ScalingPolicy { kind: PolicyKind::Percent, value: 200, period_seconds: 15 }]
    );
    assert_eq!(behavior.scale_up.select_policy, SelectPolicy::Max);
    assert_eq!(behavior.scale_down.stabilization_window_seconds, Some(60));
    assert_eq!(behavior.scale_down.tolerance, None);
}

#[test]
fn json_list_and_yaml_give_the_same_spec() {
    let json = load_hpa_file(&fixture("seed-hpa-list.json"), None).expect("JSON List loads");
    assert_eq!(json, seed());
}

#[test]
fn empty_behavior_gets_every_default() {
    let spec = load_hpa_file(&fixture("default-behavior-hpa.yaml"), None).unwrap();
    assert_eq!(spec.min_replicas, 1, "minReplicas defaults to 1");
    assert_eq!(spec.behavior, Some(Behavior::defaulted()));
    let behavior = spec.behavior.unwrap();
    assert_eq!(behavior.scale_down.stabilization_window_seconds, None, "left to the controller flag");
    assert_eq!(behavior.scale_up.stabilization_window_seconds, Some(0));
    assert_eq!(behavior.scale_up.policies.len(), 2);
}

#[test]
fn tv2_burst_while_already_at_max() {
    let mut autoscaler = Autoscaler::new(seed());
    let queue = [200, 600, 600, 150, 150, 150, 150, 150].map(Some);
    let decisions = run(&mut autoscaler, 20, &queue);
    assert_eq!(replicas(&decisions), [20, 20, 20, 20, 20, 20, 15, 15]);
    for d in &decisions[1..3] {
        assert_eq!(d.metric_replicas, Some(60));
        assert_eq!(reason(d, ConditionType::ScalingLimited), (true, Reason::TooManyReplicas));
    }
    // The proposals of 60 are stored unclamped and hold the scale-down.
    assert_eq!(decisions[3].stabilized_replicas, Some(20));
    assert_eq!(reason(&decisions[3], ConditionType::AbleToScale), (true, Reason::ScaleDownStabilized));
    assert_eq!(decisions[6].stabilized_replicas, Some(15));
    assert!(decisions[6].rescaled);
}

#[test]
fn tv3_dip_spike_then_real_drop() {
    let mut autoscaler = Autoscaler::new(seed());
    let queue = [100, 40, 100, 40, 40, 40, 40, 40, 40, 40].map(Some);
    let decisions = run(&mut autoscaler, 10, &queue);
    assert_eq!(replicas(&decisions), [10, 10, 10, 10, 10, 10, 5, 5, 4, 4]);
    // t=90: stabilized 4, rate-limited to half of 10.
    assert_eq!(decisions[6].stabilized_replicas, Some(4));
    assert_eq!(reason(&decisions[6], ConditionType::ScalingLimited), (true, Reason::ScaleDownLimit));
    // t=105: the period started at 10 (the @90 event is inside the 30 s period).
    assert_eq!(reason(&decisions[7], ConditionType::ScalingLimited), (true, Reason::ScaleDownLimit));
    // t=120: the @90 event is exactly 30 s old, so it is not counted (strict comparison).
    assert_eq!(reason(&decisions[8], ConditionType::ScalingLimited), (false, Reason::DesiredWithinRange));
}

#[test]
fn tv5_metric_missing_changes_nothing_and_records_nothing() {
    let mut autoscaler = Autoscaler::new(seed());
    let decisions = run(&mut autoscaler, 5, &[Some(50), None, None, Some(50)]);
    assert_eq!(replicas(&decisions), [5, 5, 5, 5]);
    for d in &decisions[1..3] {
        assert_eq!(reason(d, ConditionType::ScalingActive), (false, Reason::FailedGetExternalMetric));
        assert!(!d.rescaled);
        assert!(d.error.as_deref().unwrap().contains("1 invalid out of 1"));
    }
    assert_eq!(reason(&decisions[3], ConditionType::ScalingActive), (true, Reason::ValidMetricFound));
    let stamps: Vec<i64> = autoscaler.state.recommendations.iter().map(|r| r.at.as_millis() / 1000).collect();
    // recordInitialRecommendation at 0, the sync at 0, then nothing until 45.
    assert_eq!(stamps, [0, 0, 45]);
}

#[test]
fn percent_artefacts_match_go() {
    assert_eq!(percent_scale_up(100, 10), 111);
    assert_eq!(percent_scale_down(90, 30), 62);
    // The seed's 200 % and 50 % are exact.
    assert_eq!(percent_scale_up(7, 200), 21);
    assert_eq!(percent_scale_down(7, 50), 3);
}

/// docs/hpa-algorithm.md §1.8: over percent 1..300 and periodStart 1..200, the Go-order
/// computation differs from exact rational arithmetic in 116 scale-up and 463 scale-down cases;
/// 119 of the down cases lie in percent 1..100 (an earlier restatement gave 119 for the whole
/// range; docs/HPA-findings.md).
fn percent_artefact_counts(percents: std::ops::RangeInclusive<i64>) -> (usize, usize) {
    let (mut up, mut down) = (0, 0);
    for percent in percents {
        for start in 1..=200i64 {
            // Exact: ceil(start·(100+p)/100) and trunc(start·(100−p)/100) toward zero.
            let exact_up = (start * (100 + percent) + 99).div_euclid(100);
            let numerator = start * (100 - percent);
            let exact_down = numerator / 100; // Rust integer division truncates toward zero
            if i64::from(percent_scale_up(start as i32, percent as i32)) != exact_up {
                up += 1;
            }
            if i64::from(percent_scale_down(start as i32, percent as i32)) != exact_down {
                down += 1;
            }
        }
    }
    (up, down)
}

#[test]
fn percent_artefacts_exhaustive_count() {
    assert_eq!(percent_artefact_counts(1..=300), (116, 463));
    assert_eq!(percent_artefact_counts(1..=100).1, 119);
}

fn external(target: MetricTarget) -> Vec<ExternalMetric> {
    vec![ExternalMetric { name: "celery_queue_depth".into(), match_labels: Default::default(), target }]
}

fn spec_with(behavior: Option<Behavior>) -> HpaSpec {
    HpaSpec {
        name: "t".into(),
        min_replicas: 1,
        max_replicas: 100,
        metrics: external(MetricTarget::AverageValue(10_000)),
        behavior,
    }
}

/// §1.6: legacy is not "behavior with all defaults".
#[test]
fn legacy_and_defaulted_behavior_differ_on_the_first_scale_up() {
    for (current, legacy_expected, defaulted_expected) in [(1, 4, 5), (3, 6, 7)] {
        let big_queue = Some(10_000);
        let mut legacy = Autoscaler::new(spec_with(None));
        let mut defaulted = Autoscaler::new(spec_with(Some(Behavior::defaulted())));
        assert_eq!(run(&mut legacy, current, &[big_queue])[0].replicas, legacy_expected);
        assert_eq!(run(&mut defaulted, current, &[big_queue])[0].replicas, defaulted_expected);
    }
}

#[test]
fn legacy_fixture_takes_the_legacy_path_with_an_inclusive_300s_window() {
    let spec = load_hpa_file(&fixture("legacy-hpa.yaml"), None).unwrap();
    assert_eq!(spec.behavior, None);
    let mut autoscaler = Autoscaler::new(spec.clone());
    // 8 → 80 pods is limited to 2x = 16.
    let d = run(&mut autoscaler, 8, &[Some(800)]);
    assert_eq!(d[0].replicas, 16);
    assert_eq!(reason(&d[0], ConditionType::ScalingLimited), (true, Reason::ScaleUpLimit));

    // Hold 10 at t=0, then an empty queue: the t=0 entries keep 10 up to and including t=300.
    let mut autoscaler = Autoscaler::new(spec);
    let mut queue = vec![Some(100)];
    queue.extend(std::iter::repeat_n(Some(0), 21));
    let decisions = run(&mut autoscaler, 10, &queue);
    let at = |secs: usize| decisions[secs / 15].replicas;
    assert_eq!(at(285), 10);
    assert_eq!(at(300), 10, "the t=0 entry is exactly 300 s old: inclusive, still counted");
    assert_eq!(at(315), 1, "strictly older entries are dropped; legacy scale-down has no rate limit");
    assert_eq!(reason(&decisions[21], ConditionType::ScalingLimited), (true, Reason::TooFewReplicas));
}

#[test]
fn tolerance_band_edges_are_inclusive_and_exact() {
    let mut autoscaler = Autoscaler::new(seed());
    for (queue, expected) in [(110, 10), (90, 10), (111, 12), (89, 9)] {
        autoscaler.reset();
        let d = run(&mut autoscaler, 10, &[Some(queue)]);
        assert_eq!(d[0].metric_replicas, Some(expected), "queue {queue}");
    }
}

#[test]
fn per_direction_tolerance_from_behavior() {
    let mut behavior = Behavior::defaulted();
    behavior.scale_up.tolerance = Some(0.0);
    behavior.scale_down.tolerance = Some(0.5);
    let mut autoscaler = Autoscaler::new(spec_with(Some(behavior)));
    assert_eq!(run(&mut autoscaler, 10, &[Some(101)])[0].metric_replicas, Some(11));
    autoscaler.reset();
    assert_eq!(run(&mut autoscaler, 10, &[Some(50)])[0].metric_replicas, Some(10));
    // With the feature gate off the flag applies to both directions.
    let config = ControllerConfig { configurable_tolerance: false, ..ControllerConfig::default() };
    let mut gated = Autoscaler::with_config(autoscaler.spec.clone(), config);
    assert_eq!(run(&mut gated, 10, &[Some(101)])[0].metric_replicas, Some(10));
    assert_eq!(
        parse_hpa_manifest(
            &std::fs::read_to_string(fixture("seed-hpa.yaml"))
                .unwrap()
                .replace("scaleUp:\n", "scaleUp:\n      tolerance: 50m\n"),
            None
        )
        .unwrap()
        .behavior
        .unwrap()
        .scale_up
        .tolerance,
        Some(0.05)
    );
}

/// kubernetes/kubernetes#138505: inside the band AverageValue proposes status.replicas.
#[test]
fn dead_band_returns_status_replicas_unless_switched() {
    let observation = Observation {
        spec_replicas: 10,
        status_replicas: 12, // surge pods during a rollout
        ready_pods: Some(12),
        metrics: vec![MetricReading::total(Some(120_000))],
    };
    let mut upstream = Autoscaler::new(seed());
    let d = upstream.sync(Timestamp::from_secs(0), &observation);
    assert_eq!((d.metric_replicas, d.replicas), (Some(12), 12));
    let config = ControllerConfig { dead_band: DeadBand::SpecReplicas, ..ControllerConfig::default() };
    let mut fixed = Autoscaler::with_config(seed(), config);
    let d = fixed.sync(Timestamp::from_secs(0), &observation);
    assert_eq!((d.metric_replicas, d.replicas), (Some(10), 10));
}

#[test]
fn value_target_multiplies_by_ready_pods_and_needs_pods() {
    let mut spec = seed();
    spec.metrics = external(MetricTarget::Value(10_000));
    let mut autoscaler = Autoscaler::new(spec);
    let observation = |ready| Observation {
        spec_replicas: 5,
        status_replicas: 5,
        ready_pods: ready,
        metrics: vec![MetricReading::total(Some(400_000))],
    };
    let d = autoscaler.sync(Timestamp::from_secs(0), &observation(Some(5)));
    assert_eq!(d.metric_replicas, Some(200));
    assert_eq!(d.replicas, 15, "Percent 200 from 5");
    autoscaler.reset();
    let d = autoscaler.sync(Timestamp::from_secs(0), &observation(Some(2)));
    assert_eq!(d.metric_replicas, Some(80));
    autoscaler.reset();
    let d = autoscaler.sync(Timestamp::from_secs(0), &observation(None));
    assert_eq!((d.replicas, d.rescaled), (5, false));
    assert!(d.error.unwrap().contains("no pods returned by selector"));
}

#[test]
fn zero_spec_replicas_disables_scaling() {
    let mut autoscaler = Autoscaler::new(seed());
    let d = run(&mut autoscaler, 0, &[Some(1000)]);
    assert_eq!((d[0].replicas, d[0].rescaled), (0, false));
    assert_eq!(reason(&d[0], ConditionType::ScalingActive), (false, Reason::ScalingDisabled));
}

#[test]
fn out_of_range_clamps_before_metrics() {
    let mut autoscaler = Autoscaler::new(seed());
    // Above max: straight to max even with the metric missing and no policy allowing it.
    let d = run(&mut autoscaler, 35, &[None]);
    assert_eq!((d[0].replicas, d[0].metric_replicas), (20, None));
    assert_eq!(autoscaler.state.scale_down_events.len(), 1, "a scale event is stored");
    let mut spec = seed();
    spec.min_replicas = 3;
    let mut autoscaler = Autoscaler::new(spec);
    assert_eq!(run(&mut autoscaler, 1, &[Some(0)])[0].replicas, 3);
}

#[test]
fn several_metrics_take_the_maximum_and_partial_failures_only_scale_up() {
    let mut spec = seed();
    spec.metrics.push(ExternalMetric {
        name: "other".into(),
        match_labels: Default::default(),
        target: MetricTarget::AverageValue(5_000),
    });
    let mut autoscaler = Autoscaler::new(spec);
    let sync = |a: &mut Autoscaler, readings| a.sync(Timestamp::from_secs(0), &Observation::settled(4, readings));
    let d = sync(&mut autoscaler, vec![MetricReading::total(Some(40_000)), MetricReading::total(Some(60_000))]);
    assert_eq!(d.metric_replicas, Some(12));
    autoscaler.reset();
    // One fails, the other would scale up: scale, and still report the error.
    let d = sync(&mut autoscaler, vec![MetricReading::total(None), MetricReading::total(Some(60_000))]);
    assert_eq!((d.metric_replicas, d.replicas), (Some(12), 12));
    assert!(d.error.is_some());
    assert_eq!(reason(&d, ConditionType::ScalingActive), (true, Reason::ValidMetricFound));
    autoscaler.reset();
    // One fails, the other would scale down: do nothing.
    let d = sync(&mut autoscaler, vec![MetricReading::total(None), MetricReading::total(Some(5_000))]);
    assert_eq!((d.metric_replicas, d.replicas, d.rescaled), (None, 4, false));
    // An empty answer is an error too.
    autoscaler.reset();
    let d = sync(&mut autoscaler, vec![MetricReading::Samples(vec![]), MetricReading::Samples(vec![])]);
    assert!(d.error.unwrap().contains("no metrics returned from external metrics API"));
}

#[test]
fn select_policy_min_and_disabled() {
    let rules = |select| ScalingRules { select_policy: select, ..ScalingRules::default_scale_up() };
    for (select, expected) in [(SelectPolicy::Max, 20), (SelectPolicy::Min, 14), (SelectPolicy::Disabled, 10)] {
        let behavior = Behavior { scale_up: rules(select), scale_down: ScalingRules::default_scale_down() };
        let mut autoscaler = Autoscaler::new(spec_with(Some(behavior)));
        assert_eq!(run(&mut autoscaler, 10, &[Some(1000)])[0].replicas, expected, "{select:?}");
    }
}

#[test]
fn scale_events_replace_the_last_outdated_slot() {
    let mut autoscaler = Autoscaler::new(seed());
    // Up at 0 (1 → 3), again at 15 (3 → 9) and 30 (9 → 20): each older than the 15 s period is
    // outdated when the next one is stored and its slot reused.
    run(&mut autoscaler, 1, &[Some(1000), Some(1000), Some(1000)]);
    // 1 → 3 @0, 3 → 9 @15 (the @0 event is exactly one period old: not yet outdated, append),
    // 9 → 20 @30 (the @0 event is now outdated: its slot takes the new event).
    let events: Vec<(i32, i64)> =
        autoscaler.state.scale_up_events.iter().map(|e| (e.replica_change, e.at.as_millis() / 1000)).collect();
    assert_eq!(events, [(11, 30), (6, 15)]);
}

#[test]
fn manifest_errors_say_what_to_do() {
    let err = |text: &str, name| parse_hpa_manifest(text, name).unwrap_err().to_string();
    let utilization = std::fs::read_to_string(fixture("seed-hpa.yaml"))
        .unwrap()
        .replace("{type: AverageValue, averageValue: \"10\"}", "{type: Utilization, averageUtilization: 50}");
    assert_eq!(
        err(&utilization, None),
        "HPA worker: metric 0 (celery_queue_depth) has target type Utilization; this replica \
         supports External metrics with an AverageValue or Value target"
    );
    assert!(err("apiVersion: v1\nkind: Service\nmetadata: {name: x}\n", None).contains("objects seen: v1 Service"));
    let two = format!(
        "{}\n---\n{}",
        std::fs::read_to_string(fixture("legacy-hpa.yaml")).unwrap(),
        std::fs::read_to_string(fixture("default-behavior-hpa.yaml")).unwrap()
    );
    assert!(err(&two, None).contains("pick one with --hpa-name"));
    assert_eq!(parse_hpa_manifest(&two, Some("worker-defaulted")).unwrap().name, "worker-defaulted");
    assert!(err(&two, Some("nope")).contains("found: worker-legacy, worker-defaulted"));
    let empty_policies = std::fs::read_to_string(fixture("seed-hpa.yaml"))
        .unwrap()
        .replace("[{type: Percent, value: 50, periodSeconds: 30}]", "[]");
    assert!(err(&empty_policies, None).contains("behavior.scaleDown.policies is empty"));
    let bad_quantity = std::fs::read_to_string(fixture("seed-hpa.yaml")).unwrap().replace("\"10\"", "ten");
    assert!(err(&bad_quantity, None).contains("target.averageValue"));
    match load_hpa_file(Path::new("/nonexistent/hpa.yaml"), None) {
        Err(HpaError::Read { .. }) => {}
        other => panic!("expected a read error, got {other:?}"),
    }
}

/// Not only a runtime-edit corner (docs/hpa-algorithm.md §1.8): scale-down events are recycled
/// after the longest *scale-down* period, but the scale-up limit reads them over the
/// *scale-up* period. Here the 10 → 6 event is overwritten at t=30 (down period 15 s), so at
/// t=45 the 60 s up-period starts from 6 instead of 10 and the limit is 8, not 12.
#[test]
fn recycled_scale_down_events_shorten_a_longer_scale_up_period() {
    let behavior = Behavior {
        scale_up: ScalingRules {
            policies: vec![ScalingPolicy { kind: PolicyKind::Pods, value: 2, period_seconds: 60 }],
            ..ScalingRules::default_scale_up()
        },
        scale_down: ScalingRules { stabilization_window_seconds: Some(0), ..ScalingRules::default_scale_down() },
    };
    let mut spec = spec_with(Some(behavior));
    spec.max_replicas = 20;
    let mut autoscaler = Autoscaler::new(spec);
    let decisions = run(&mut autoscaler, 10, &[Some(60), Some(60), Some(40), Some(1000)]);
    assert_eq!(replicas(&decisions), [6, 6, 4, 8]);
    assert_eq!(autoscaler.state.scale_down_events.len(), 1, "the t=0 event was overwritten");
}

#[test]
fn yaml_numbers_are_quantities_and_average_value_wins_over_value() {
    let seed_text = std::fs::read_to_string(fixture("seed-hpa.yaml")).unwrap();
    let numeric = seed_text.replace("averageValue: \"10\"", "averageValue: 1.5");
    assert_eq!(parse_hpa_manifest(&numeric, None).unwrap().metrics[0].target, MetricTarget::AverageValue(1_500));
    // computeStatusForExternalMetric looks at which field is set, averageValue first.
    let both = seed_text
        .replace("{type: AverageValue, averageValue: \"10\"}", "{type: Value, value: \"50\", averageValue: 500m}");
    assert_eq!(parse_hpa_manifest(&both, None).unwrap().metrics[0].target, MetricTarget::AverageValue(500));
    let value = seed_text.replace("{type: AverageValue, averageValue: \"10\"}", "{type: Value, value: 2k}");
    assert_eq!(parse_hpa_manifest(&value, None).unwrap().metrics[0].target, MetricTarget::Value(2_000_000));
}

/// The real HPA controller (kube-controller-manager v1.34.4, built from the module proxy and run by
/// scripts/control-plane/run.py): every sync of the burst and the ramp on the rendered
/// k8s/autoscaling.yaml, with the metric value it read (from its status), the replicas its metric
/// proposed and the replicas it set. The replica, fed the same values at the same instants
/// (real sync times, not exact 15 s ticks), proposes and decides the same at every sync.
#[test]
fn real_controller_v1_34_4_burst_and_ramp() {
    let spec = load_hpa_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/autoscaling.yaml"), None)
        .expect("rendered HPA loads");
    let mut autoscaler = Autoscaler::new(spec);
    let text = std::fs::read_to_string(fixture("real-hpa-v1.34.4-burst-ramp.csv")).expect("fixture");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("time,t,metric,proposed,current,replicas"));
    let mut replicas = None;
    let mut syncs = 0;
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        let t: f64 = f[1].parse().unwrap();
        let metric: i64 = f[2].parse().unwrap();
        let (proposed, current, set): (i32, i32, i32) =
            (f[3].parse().unwrap(), f[4].parse().unwrap(), f[5].parse().unwrap());
        let now = Timestamp::from_millis((t * 1000.0).round() as i64);
        let before = *replicas.get_or_insert(current);
        assert_eq!(before, current, "t={t}: the replica holds {before} replicas, the controller found {current}");
        let d = autoscaler.sync(now, &Observation::settled(before, vec![MetricReading::total(Some(metric * 1000))]));
        assert_eq!(d.metric_replicas, Some(proposed), "t={t} metric={metric}: proposal");
        assert_eq!(d.replicas, set, "t={t} metric={metric}: replicas set");
        replicas = Some(d.replicas);
        syncs += 1;
    }
    assert_eq!(syncs, 32);
}
