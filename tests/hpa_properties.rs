//! Properties of the HPA replica over random specs and metric sequences.

use celery_autoscale::autoscale::hpa::{
    Autoscaler, Behavior, ExternalMetric, HpaSpec, MetricReading, MetricTarget, Observation, PolicyKind, ScalingPolicy,
    ScalingRules, SelectPolicy, Timestamp, percent_scale_down, percent_scale_up,
};
use proptest::prelude::*;

const TARGET_MILLI: i64 = 10_000;

fn policy(max_percent: i32, max_period: i32) -> impl Strategy<Value = ScalingPolicy> {
    (prop_oneof![Just(PolicyKind::Pods), Just(PolicyKind::Percent)], 1..=max_period).prop_flat_map(
        move |(kind, period_seconds)| {
            let values = match kind {
                PolicyKind::Pods => 1..=10,
                PolicyKind::Percent => 1..=max_percent,
            };
            values.prop_map(move |value| ScalingPolicy { kind, value, period_seconds })
        },
    )
}

fn rules(max_percent: i32, select: BoxedStrategy<SelectPolicy>) -> impl Strategy<Value = ScalingRules> {
    (
        prop::option::of(0..=300i32),
        select,
        prop::collection::vec(policy(max_percent, 120), 1..=3),
        prop::option::of(prop_oneof![Just(0.0), Just(0.05), Just(0.1), Just(0.3)]),
    )
        .prop_map(|(window, select_policy, policies, tolerance)| ScalingRules {
            stabilization_window_seconds: window,
            select_policy,
            policies,
            tolerance,
        })
}

fn any_select() -> BoxedStrategy<SelectPolicy> {
    prop_oneof![Just(SelectPolicy::Max), Just(SelectPolicy::Min), Just(SelectPolicy::Disabled)].boxed()
}

fn enabled_select() -> BoxedStrategy<SelectPolicy> {
    prop_oneof![Just(SelectPolicy::Max), Just(SelectPolicy::Min)].boxed()
}

/// Scale-down percents stay ≤ 100: above that the floor is negative and min clamps anyway.
fn spec(select: fn() -> BoxedStrategy<SelectPolicy>) -> impl Strategy<Value = HpaSpec> {
    (
        1..=5i32,
        0..=25i32,
        prop::option::of((rules(300, select()), rules(100, select()))),
        prop_oneof![Just(false), Just(true)],
    )
        .prop_map(|(min, extra, behavior, value_target)| HpaSpec {
            name: "prop".into(),
            min_replicas: min,
            max_replicas: min + extra,
            metrics: vec![ExternalMetric {
                match_labels: Default::default(),
                name: "celery_queue_depth".into(),
                target: if value_target {
                    MetricTarget::Value(TARGET_MILLI)
                } else {
                    MetricTarget::AverageValue(TARGET_MILLI)
                },
            }],
            behavior: behavior.map(|(scale_up, scale_down)| Behavior { scale_up, scale_down }),
        })
}

/// Queue totals; `None` is a missing metric.
fn metric_sequence() -> impl Strategy<Value = Vec<Option<i64>>> {
    let total = prop_oneof![1 => Just(0i64), 2 => 0..60i64, 2 => 0..2_000i64];
    prop::collection::vec(prop::option::weighted(0.9, total), 1..80)
}

/// Sync times: mostly the 15 s tick, sometimes jittered or irregular.
fn sync_gaps(len: usize) -> impl Strategy<Value = Vec<i64>> {
    prop::collection::vec(prop_oneof![4 => Just(15_000i64), 1 => 1..60_000i64], len)
}

struct Step {
    at: i64,
    before: i32,
    after: i32,
}

fn run(spec: &HpaSpec, initial: i32, queue: &[Option<i64>], gaps: &[i64]) -> Vec<Step> {
    let mut autoscaler = Autoscaler::new(spec.clone());
    let (mut replicas, mut now) = (initial, 0i64);
    let mut steps = Vec::new();
    for (q, gap) in queue.iter().zip(gaps) {
        let observation = Observation::settled(replicas, vec![MetricReading::total(q.map(|v| v * 1000))]);
        let decision = autoscaler.sync(Timestamp::from_millis(now), &observation);
        steps.push(Step { at: now, before: replicas, after: decision.replicas });
        replicas = decision.replicas;
        now += gap;
    }
    steps
}

/// Replicas held at `at` (after any sync exactly at `at`), from the recorded history.
fn held_at(steps: &[Step], initial: i32, at: i64) -> i32 {
    steps.iter().take_while(|s| s.at <= at).last().map_or(initial, |s| s.after)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn never_outside_min_max(
        (spec, initial, queue, gaps) in spec(any_select).prop_flat_map(|spec| {
            let range = spec.min_replicas..=spec.max_replicas;
            (Just(spec), range, metric_sequence()).prop_flat_map(|(spec, initial, queue)| {
                let len = queue.len();
                (Just(spec), Just(initial), Just(queue), sync_gaps(len))
            })
        })
    ) {
        for step in run(&spec, initial, &queue, &gaps) {
            prop_assert!(
                (spec.min_replicas..=spec.max_replicas).contains(&step.after),
                "{} outside [{}, {}] at {} ms", step.after, spec.min_replicas, spec.max_replicas, step.at
            );
        }
    }

    /// Over every policy period, the change never exceeds what the policies allow from the
    /// count held at the start of that period (rebuilt here from the run's own history).
    #[test]
    fn never_faster_than_the_policies_allow(
        (spec, initial, queue, gaps) in spec(any_select)
            .prop_filter("behavior path", |s| s.behavior.is_some())
            .prop_flat_map(|spec| {
                let range = spec.min_replicas..=spec.max_replicas;
                (Just(spec), range, metric_sequence()).prop_flat_map(|(spec, initial, queue)| {
                    let len = queue.len();
                    (Just(spec), Just(initial), Just(queue), sync_gaps(len))
                })
            })
    ) {
        let behavior = spec.behavior.as_ref().unwrap();
        let steps = run(&spec, initial, &queue, &gaps);
        for step in &steps {
            let start = |period: i32| held_at(&steps, initial, step.at - i64::from(period) * 1000);
            if step.after > step.before {
                let rules = &behavior.scale_up;
                let allowed = rules.policies.iter().map(|p| {
                    let s = start(p.period_seconds);
                    match p.kind {
                        PolicyKind::Pods => s + p.value,
                        PolicyKind::Percent => percent_scale_up(s, p.value),
                    }
                });
                let bound = match rules.select_policy {
                    SelectPolicy::Max => allowed.max().unwrap(),
                    SelectPolicy::Min => allowed.min().unwrap(),
                    SelectPolicy::Disabled => step.before,
                };
                prop_assert!(step.after <= bound.max(step.before),
                    "up {} → {} at {} ms, bound {}", step.before, step.after, step.at, bound);
            }
            if step.after < step.before {
                let rules = &behavior.scale_down;
                let allowed = rules.policies.iter().map(|p| {
                    let s = start(p.period_seconds);
                    match p.kind {
                        PolicyKind::Pods => s - p.value,
                        PolicyKind::Percent => percent_scale_down(s, p.value),
                    }
                });
                let floor = match rules.select_policy {
                    SelectPolicy::Max => allowed.min().unwrap(),
                    SelectPolicy::Min => allowed.max().unwrap(),
                    SelectPolicy::Disabled => step.before,
                };
                prop_assert!(step.after >= floor.min(step.before).max(spec.min_replicas),
                    "down {} → {} at {} ms, floor {}", step.before, step.after, step.at, floor);
            }
        }
    }

    /// A constant metric on the 15 s tick: the count settles and then holds, on a fixed point of
    /// the proposal clamped to [min, max] (AverageValue: ceil(total/target); Value:
    /// ceil(ratio·ready), which has many fixed points) or on a count whose ratio is inside the
    /// tolerance band.
    #[test]
    fn constant_metric_converges_and_then_holds(
        (spec, initial, queue) in spec(enabled_select).prop_flat_map(|spec| {
            let range = spec.min_replicas..=spec.max_replicas;
            (Just(spec), range, 0..1_000i64)
        })
    ) {
        let syncs = 400;
        let steps = run(&spec, initial, &vec![Some(queue); syncs], &vec![15_000; syncs]);
        let last = steps.last().unwrap().after;
        prop_assert!(steps[syncs - 100..].iter().all(|s| s.after == last && s.before == last),
            "still moving in the last 100 syncs");

        let tolerance = |pick: fn(&Behavior) -> &ScalingRules| spec
            .behavior
            .as_ref()
            .and_then(|b| pick(b).tolerance)
            .unwrap_or(0.1);
        let (up, down) = (tolerance(|b| &b.scale_up), tolerance(|b| &b.scale_down));
        let ratio = match spec.metrics[0].target {
            MetricTarget::AverageValue(t) => (queue * 1000) as f64 / (t as f64 * f64::from(last)),
            MetricTarget::Value(t) => (queue * 1000) as f64 / t as f64,
        };
        let in_band = (1.0 - down) <= ratio && ratio <= (1.0 + up);
        let proposal = match spec.metrics[0].target {
            MetricTarget::AverageValue(t) => ((queue * 1000) as f64 / t as f64).ceil() as i32,
            MetricTarget::Value(_) => (ratio * f64::from(last)).ceil() as i32,
        };
        let clamped = proposal.clamp(spec.min_replicas, spec.max_replicas);
        prop_assert!(last == clamped || in_band,
            "settled at {last}, proposal {proposal} clamped {clamped}, ratio {ratio}");
    }
}
