//! One HPA sync as a pure function: `reconcileAutoscaler` (horizontal.go) and the External
//! half of replica_calculator.go, with the clock and the API calls replaced by arguments.
//!
//! Everything the controller keeps in memory between syncs (`recommendations`,
//! `scaleUpEvents`, `scaleDownEvents`, and the conditions it writes to the HPA status) lives in
//! [`HpaState`]. A fresh state behaves like a controller that has just (re)started.
//!
//! Go takes `time.Now()` several times per sync (recommendation stamp, scale-event stamp after
//! the PUT); here one `now` is used throughout, which is the exact-tick model of
//! docs/hpa-algorithm.md §1.9. All comparisons keep Go's strictness: `After` is `>`, `Before`
//! is `<`.

use super::rate::{convert_desired_replicas_with_rules, scale_down_limit, scale_up_limit};
use super::replica_calculator::{Tolerances, external_metric_replicas};
use super::spec::{Behavior, HpaSpec};
use super::types::{
    Condition, ConditionType, ControllerConfig, Decision, HpaState, MetricStatus, Observation, Reason, Recommendation,
    ScaleEvent, Timestamp,
};

/// The replica: spec + settings + memory. `sync` is what the simulator and the local supervisor
/// call at every tick.
#[derive(Debug, Clone)]
pub struct Autoscaler {
    pub spec: HpaSpec,
    pub config: ControllerConfig,
    pub state: HpaState,
}

impl Autoscaler {
    pub fn new(spec: HpaSpec) -> Self {
        Self::with_config(spec, ControllerConfig::default())
    }

    pub fn with_config(spec: HpaSpec, config: ControllerConfig) -> Self {
        Autoscaler { spec, config, state: HpaState::default() }
    }

    /// One controller sync at `now`.
    pub fn sync(&mut self, now: Timestamp, observation: &Observation) -> Decision {
        let (decision, state) = reconcile(&self.spec, &self.config, &self.state, now, observation);
        self.state = state;
        decision
    }

    /// Forget everything, as a controller restart or leader change does.
    pub fn reset(&mut self) {
        self.state = HpaState::default();
    }
}

/// One sync as a pure function of (spec, settings, state, now, observation).
pub fn reconcile(
    spec: &HpaSpec,
    config: &ControllerConfig,
    state: &HpaState,
    now: Timestamp,
    observation: &Observation,
) -> (Decision, HpaState) {
    let mut sync = Sync { spec, config, now, state: state.clone() };
    let decision = sync.run(observation);
    (decision, sync.state)
}

struct Sync<'a> {
    spec: &'a HpaSpec,
    config: &'a ControllerConfig,
    now: Timestamp,
    state: HpaState,
}

impl Sync<'_> {
    fn set_condition(&mut self, kind: ConditionType, status: bool, reason: Reason, message: impl Into<String>) {
        let condition = Condition { kind, status, reason, message: message.into() };
        match self.state.conditions.iter_mut().find(|c| c.kind == kind) {
            Some(existing) => *existing = condition,
            None => self.state.conditions.push(condition),
        }
    }

    fn run(&mut self, observation: &Observation) -> Decision {
        use ConditionType::*;
        self.set_condition(
            AbleToScale,
            true,
            Reason::SucceededGetScale,
            "the HPA controller was able to get the target's current scale",
        );
        let current = observation.spec_replicas;
        // recordInitialRecommendation
        if self.state.recommendations.is_empty() {
            self.state.recommendations.push(Recommendation { replicas: current, at: self.now });
        }
        let (min, max) = (self.spec.min_replicas, self.spec.max_replicas);

        let mut decision = Decision {
            replicas: current,
            previous_replicas: current,
            rescaled: false,
            metric_replicas: None,
            stabilized_replicas: None,
            metrics: Vec::new(),
            conditions: Vec::new(),
            error: None,
        };
        let mut desired;
        let rescale;
        if current == 0 && min != 0 {
            desired = 0;
            rescale = false;
            self.set_condition(
                ScalingActive,
                false,
                Reason::ScalingDisabled,
                "scaling is disabled since the replica count of the target is zero",
            );
        } else if current > max {
            // Out of range: straight to the bound, no metrics, no stabilization, no policies.
            desired = max;
            rescale = true;
        } else if current < min {
            desired = min;
            rescale = true;
        } else {
            let (metric_desired, statuses, error) = self.compute_replicas_for_metrics(observation);
            decision.metrics = statuses;
            decision.error = error;
            let Some(metric_desired) = metric_desired else {
                // No change, no recommendation recorded, no scale event.
                decision.conditions = self.state.conditions.clone();
                return decision;
            };
            decision.metric_replicas = Some(metric_desired);
            desired = metric_desired.max(0);
            desired = match &self.spec.behavior {
                None => self.normalize_legacy(current, desired, &mut decision),
                Some(behavior) => self.normalize_with_behaviors(behavior, current, desired, &mut decision),
            };
            rescale = desired != current;
        }

        if rescale {
            self.set_condition(
                AbleToScale,
                true,
                Reason::SucceededRescale,
                format!("the HPA controller was able to update the target scale to {desired}"),
            );
            self.store_scale_event(current, desired);
        } else {
            desired = current;
        }
        decision.replicas = desired;
        decision.rescaled = rescale;
        decision.conditions = self.state.conditions.clone();
        decision
    }

    /// The flag, replaced per direction by `behavior.*.tolerance` when the feature gate is on
    /// (KEP-4951; `tolerancesForHpa` itself was not in the source read, docs/HPA-findings.md item 6).
    fn tolerances(&self) -> Tolerances {
        let flag = self.config.tolerance;
        let mut tolerances = Tolerances { down: flag, up: flag };
        if let (true, Some(behavior)) = (self.config.configurable_tolerance, &self.spec.behavior) {
            tolerances.up = behavior.scale_up.tolerance.unwrap_or(flag);
            tolerances.down = behavior.scale_down.tolerance.unwrap_or(flag);
        }
        tolerances
    }

    /// `computeReplicasForMetrics`: `None` is its −1 ("do nothing this sync").
    fn compute_replicas_for_metrics(
        &mut self,
        observation: &Observation,
    ) -> (Option<i32>, Vec<MetricStatus>, Option<String>) {
        let tolerances = self.tolerances();
        let mut replicas = 0;
        let mut invalid = 0;
        let mut first_error: Option<String> = None;
        let mut statuses = Vec::with_capacity(self.spec.metrics.len());
        for (index, metric) in self.spec.metrics.iter().enumerate() {
            let reading = observation.metrics.get(index);
            let outcome =
                external_metric_replicas(metric.target, reading, observation, tolerances, self.config.dead_band);
            match outcome {
                Ok(outcome) => {
                    if replicas == 0 || outcome.replicas > replicas {
                        replicas = outcome.replicas;
                    }
                    statuses.push(MetricStatus {
                        name: metric.name.clone(),
                        proposal: Some(outcome.replicas),
                        total_milli: Some(outcome.total),
                        average_milli: outcome.average,
                        error: None,
                    });
                }
                Err(reason) => {
                    let message = format!("unable to get external metric {}: {reason}", metric.name);
                    if first_error.is_none() {
                        first_error = Some(message.clone());
                    }
                    invalid += 1;
                    statuses.push(MetricStatus {
                        name: metric.name.clone(),
                        proposal: None,
                        total_milli: None,
                        average_milli: None,
                        error: Some(message),
                    });
                }
            }
        }
        let count = self.spec.metrics.len();
        let error = first_error
            .as_ref()
            .map(|first| format!("invalid metrics ({invalid} invalid out of {count}), first error is: {first}"));
        if invalid >= count || (invalid > 0 && replicas < observation.spec_replicas) {
            let first = first_error.unwrap_or_else(|| "the HPA has no metrics".into());
            self.set_condition(
                ConditionType::ScalingActive,
                false,
                Reason::FailedGetExternalMetric,
                format!("the HPA was unable to compute the replica count: {first}"),
            );
            return (None, statuses, error);
        }
        let names: Vec<&str> = self.spec.metrics.iter().map(|m| m.name.as_str()).collect();
        self.set_condition(
            ConditionType::ScalingActive,
            true,
            Reason::ValidMetricFound,
            format!(
                "the HPA was able to successfully calculate a replica count from external metric {}",
                names.join(", ")
            ),
        );
        (Some(replicas), statuses, error)
    }

    /// `normalizeDesiredReplicas` (no `behavior`).
    fn normalize_legacy(&mut self, current: i32, desired: i32, decision: &mut Decision) -> i32 {
        let stabilized = self.stabilize_recommendation(desired);
        decision.stabilized_replicas = Some(stabilized);
        if stabilized != desired {
            self.set_condition(
                ConditionType::AbleToScale,
                true,
                Reason::ScaleDownStabilized,
                "recent recommendations were higher than current one, applying the highest recent recommendation",
            );
        } else {
            self.set_condition(
                ConditionType::AbleToScale,
                true,
                Reason::ReadyForNewScale,
                "recommended size matches current size",
            );
        }
        let (limited, reason, message) =
            convert_desired_replicas_with_rules(current, stabilized, self.spec.min_replicas, self.spec.max_replicas);
        self.set_condition(ConditionType::ScalingLimited, limited != stabilized, reason, message);
        limited
    }

    /// `stabilizeRecommendation`: maximum over the window, boundary included (an entry is old
    /// only when strictly before the cutoff).
    fn stabilize_recommendation(&mut self, desired: i32) -> i32 {
        let cutoff = self.now.minus_secs(self.config.downscale_stabilization_seconds);
        let mut max_recommendation = desired;
        let mut old_index = None;
        for (i, rec) in self.state.recommendations.iter().enumerate() {
            if rec.at < cutoff {
                old_index = Some(i);
            } else if rec.replicas > max_recommendation {
                max_recommendation = rec.replicas;
            }
        }
        self.record_recommendation(old_index, desired);
        max_recommendation
    }

    fn record_recommendation(&mut self, old_index: Option<usize>, desired: i32) {
        let fresh = Recommendation { replicas: desired, at: self.now };
        match old_index {
            Some(i) => self.state.recommendations[i] = fresh,
            None => self.state.recommendations.push(fresh),
        }
    }

    /// `normalizeDesiredReplicasWithBehaviors`.
    fn normalize_with_behaviors(
        &mut self,
        behavior: &Behavior,
        current: i32,
        desired: i32,
        decision: &mut Decision,
    ) -> i32 {
        // maybeInitScaleDownStabilizationWindow
        let down_window =
            behavior.scale_down.stabilization_window_seconds.unwrap_or(self.config.downscale_stabilization_seconds);
        // Always set after API-server defaulting; 0 keeps a hand-built spec meaningful.
        let up_window = behavior.scale_up.stabilization_window_seconds.unwrap_or(0);

        let (stabilized, reason, message) = self.stabilize_with_behaviors(current, desired, up_window, down_window);
        decision.stabilized_replicas = Some(stabilized);
        if stabilized != desired {
            self.set_condition(ConditionType::AbleToScale, true, reason, message);
        } else {
            self.set_condition(
                ConditionType::AbleToScale,
                true,
                Reason::ReadyForNewScale,
                "recommended size matches current size",
            );
        }
        let (limited, reason, message) = self.convert_with_behavior_rate(behavior, current, stabilized);
        self.set_condition(ConditionType::ScalingLimited, limited != stabilized, reason, message);
        limited
    }

    /// `stabilizeRecommendationWithBehaviors`: the lowest recommendation in the up-window caps a
    /// scale-up, the highest in the down-window floors a scale-down; the result never crosses
    /// `current`.
    fn stabilize_with_behaviors(
        &mut self,
        current: i32,
        desired: i32,
        up_window: i32,
        down_window: i32,
    ) -> (i32, Reason, &'static str) {
        let up_cutoff = self.now.minus_secs(up_window);
        let down_cutoff = self.now.minus_secs(down_window);
        let mut up_recommendation = desired;
        let mut down_recommendation = desired;
        let mut old_index = None;
        for (i, rec) in self.state.recommendations.iter().enumerate() {
            if rec.at > up_cutoff {
                up_recommendation = up_recommendation.min(rec.replicas);
            }
            if rec.at > down_cutoff {
                down_recommendation = down_recommendation.max(rec.replicas);
            }
            if rec.at < up_cutoff && rec.at < down_cutoff {
                old_index = Some(i);
            }
        }
        let mut recommendation = current;
        if recommendation < up_recommendation {
            recommendation = up_recommendation;
        }
        if recommendation > down_recommendation {
            recommendation = down_recommendation;
        }
        self.record_recommendation(old_index, desired);
        if desired >= current {
            (
                recommendation,
                Reason::ScaleUpStabilized,
                "recent recommendations were lower than current one, applying the lowest recent recommendation",
            )
        } else {
            (
                recommendation,
                Reason::ScaleDownStabilized,
                "recent recommendations were higher than current one, applying the highest recent recommendation",
            )
        }
    }

    /// `convertDesiredReplicasWithBehaviorRate`: rate limits, and min/max only in the direction
    /// of change.
    fn convert_with_behavior_rate(
        &self,
        behavior: &Behavior,
        current: i32,
        desired: i32,
    ) -> (i32, Reason, &'static str) {
        let (up_events, down_events) = (&self.state.scale_up_events, &self.state.scale_down_events);
        if desired > current {
            let limit = scale_up_limit(self.now, current, up_events, down_events, &behavior.scale_up).max(current);
            let (maximum, reason, message) = if self.spec.max_replicas > limit {
                (
                    limit,
                    Reason::ScaleUpLimit,
                    "the desired replica count is increasing faster than the maximum scale rate",
                )
            } else {
                (
                    self.spec.max_replicas,
                    Reason::TooManyReplicas,
                    "the desired replica count is more than the maximum replica count",
                )
            };
            if desired > maximum {
                return (maximum, reason, message);
            }
        } else if desired < current {
            let limit = scale_down_limit(self.now, current, up_events, down_events, &behavior.scale_down).min(current);
            let (minimum, reason, message) = if self.spec.min_replicas < limit {
                (
                    limit,
                    Reason::ScaleDownLimit,
                    "the desired replica count is decreasing faster than the maximum scale rate",
                )
            } else {
                (
                    self.spec.min_replicas,
                    Reason::TooFewReplicas,
                    "the desired replica count is less than the minimum replica count",
                )
            };
            if desired < minimum {
                return (minimum, reason, message);
            }
        }
        (desired, Reason::DesiredWithinRange, "the desired count is within the acceptable range")
    }

    /// `storeScaleEvent` + `markScaleEventsOutdated`: the last outdated slot is overwritten.
    /// "Outdated" uses the longest period of this direction's policies, while the limits read
    /// both directions' events over their own periods, so with different up/down periods an
    /// event can be recycled while still relevant (docs/HPA-findings.md, item 7); kept as upstream.
    fn store_scale_event(&mut self, previous: i32, new: i32) {
        let Some(behavior) = &self.spec.behavior else {
            return; // the legacy path keeps no events
        };
        let (rules, events, change) = if new > previous {
            (&behavior.scale_up, &mut self.state.scale_up_events, new.wrapping_sub(previous))
        } else {
            (&behavior.scale_down, &mut self.state.scale_down_events, previous.wrapping_sub(new))
        };
        let cutoff = self.now.minus_secs(rules.longest_policy_period_seconds());
        let mut old_index = None;
        for (i, event) in events.iter_mut().enumerate() {
            if event.at < cutoff {
                event.outdated = true;
            }
            if event.outdated {
                old_index = Some(i);
            }
        }
        let fresh = ScaleEvent { replica_change: change, at: self.now, outdated: false };
        match old_index {
            Some(i) => events[i] = fresh,
            None => events.push(fresh),
        }
    }
}
