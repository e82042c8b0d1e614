//! The HPA as the controller sees it after the API server has defaulted and validated it.
//!
//! [`HpaSpec::from_k8s`] converts the real `autoscaling/v2` type: it applies
//! `SetDefaults_HorizontalPodAutoscaler` (minReplicas 1, behavior rules through
//! `copyHPAScalingRules`, where a user's `policies` list replaces the default list as a whole)
//! and the parts of `ValidateHorizontalPodAutoscaler` that matter here, and it turns quantities
//! into milli-units with `MilliValue()` / tolerances with `AsApproximateFloat64()`.

use k8s_openapi::api::autoscaling::v2 as k8s;
use std::collections::BTreeMap;

use super::HpaError;
use super::quantity::Quantity;

/// Longest stabilization window the API server accepts (`MaxStabilizationWindowSeconds`).
pub const MAX_STABILIZATION_WINDOW_SECONDS: i32 = 3600;
/// Longest policy period the API server accepts (`MaxPeriodSeconds`).
pub const MAX_PERIOD_SECONDS: i32 = 1800;

/// An HPA reduced to what the decision algorithm reads.
#[derive(Debug, Clone, PartialEq)]
pub struct HpaSpec {
    /// `metadata.name`, for messages.
    pub name: String,
    /// `spec.minReplicas` after defaulting (1 when absent).
    pub min_replicas: i32,
    pub max_replicas: i32,
    pub metrics: Vec<ExternalMetric>,
    /// `None` selects the legacy path (`normalizeDesiredReplicas`), which is not the same as a
    /// behavior block with all defaults.
    pub behavior: Option<Behavior>,
}

/// One `type: External` metric.
#[derive(Debug, Clone, PartialEq)]
pub struct ExternalMetric {
    pub name: String,
    /// `metric.selector.matchLabels` (which series the adapter sums; `queue` for this project).
    pub match_labels: BTreeMap<String, String>,
    pub target: MetricTarget,
}

/// The target of an External metric, in milli-units (`Quantity.MilliValue()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricTarget {
    /// Total divided by `scale.status.replicas` (`GetExternalPerPodMetricReplicas`).
    AverageValue(i64),
    /// Total compared with the target, times the ready-pod count (`GetExternalMetricReplicas`).
    Value(i64),
}

/// `spec.behavior` with the API-server defaults applied to both directions.
#[derive(Debug, Clone, PartialEq)]
pub struct Behavior {
    pub scale_up: ScalingRules,
    pub scale_down: ScalingRules,
}

/// One direction of `spec.behavior`, defaulted.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalingRules {
    /// Still `None` for a defaulted scale-down: the controller fills it from
    /// `--horizontal-pod-autoscaler-downscale-stabilization` at every sync
    /// (`maybeInitScaleDownStabilizationWindow`). Scale-up defaults to `Some(0)`.
    pub stabilization_window_seconds: Option<i32>,
    pub select_policy: SelectPolicy,
    pub policies: Vec<ScalingPolicy>,
    /// `tolerance` as `AsApproximateFloat64()`; `None` means the controller flag.
    pub tolerance: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectPolicy {
    Max,
    Min,
    Disabled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScalingPolicy {
    pub kind: PolicyKind,
    pub value: i32,
    pub period_seconds: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    Pods,
    Percent,
}

impl ScalingRules {
    /// `defaultHPAScaleUpRules`: window 0, Max of {4 pods, 100 %} per 15 s.
    pub fn default_scale_up() -> Self {
        ScalingRules {
            stabilization_window_seconds: Some(0),
            select_policy: SelectPolicy::Max,
            policies: vec![
                ScalingPolicy { kind: PolicyKind::Pods, value: 4, period_seconds: 15 },
                ScalingPolicy { kind: PolicyKind::Percent, value: 100, period_seconds: 15 },
            ],
            tolerance: None,
        }
    }

    /// `defaultHPAScaleDownRules`: window left to the controller, 100 % per 15 s.
    pub fn default_scale_down() -> Self {
        ScalingRules {
            stabilization_window_seconds: None,
            select_policy: SelectPolicy::Max,
            policies: vec![ScalingPolicy { kind: PolicyKind::Percent, value: 100, period_seconds: 15 }],
            tolerance: None,
        }
    }

    /// `getLongestPolicyPeriod`.
    pub fn longest_policy_period_seconds(&self) -> i32 {
        self.policies.iter().map(|p| p.period_seconds).fold(0, i32::max)
    }
}

impl Behavior {
    /// What the API server stores for `behavior: {}`.
    pub fn defaulted() -> Self {
        Behavior { scale_up: ScalingRules::default_scale_up(), scale_down: ScalingRules::default_scale_down() }
    }
}

impl HpaSpec {
    /// Converts a deserialized `autoscaling/v2` HPA, applying API-server defaults and rejecting
    /// what the API server (or this replica) would not accept.
    pub fn from_k8s(hpa: &k8s::HorizontalPodAutoscaler) -> Result<Self, HpaError> {
        let name = hpa.metadata.name.clone().unwrap_or_else(|| "<unnamed>".to_owned());
        let invalid = |message: String| HpaError::Invalid { hpa: name.clone(), message };
        let spec =
            hpa.spec.as_ref().ok_or_else(|| invalid("has no spec; add spec.minReplicas/maxReplicas/metrics".into()))?;

        let min_replicas = spec.min_replicas.unwrap_or(1);
        let max_replicas = spec.max_replicas;
        if min_replicas < 0 {
            return Err(invalid(format!(
                "minReplicas is {min_replicas}; it must be 1 or more (0 only with the HPAScaleToZero gate)"
            )));
        }
        if max_replicas < 1 || max_replicas < min_replicas {
            return Err(invalid(format!(
                "maxReplicas is {max_replicas}; it must be at least 1 and at least minReplicas ({min_replicas})"
            )));
        }

        let metric_specs = spec.metrics.as_deref().unwrap_or_default();
        if metric_specs.is_empty() {
            return Err(invalid(
                "has no metrics; the API server would add a default CPU Utilization metric, which \
                 this replica does not model; list an External metric"
                    .into(),
            ));
        }
        let metrics = metric_specs
            .iter()
            .enumerate()
            .map(|(index, metric)| external_metric(index, metric).map_err(&invalid))
            .collect::<Result<Vec<_>, _>>()?;

        let behavior = spec
            .behavior
            .as_ref()
            .map(|b| -> Result<Behavior, HpaError> {
                Ok(Behavior {
                    scale_up: defaulted_rules("scaleUp", b.scale_up.as_ref(), ScalingRules::default_scale_up())
                        .map_err(&invalid)?,
                    scale_down: defaulted_rules("scaleDown", b.scale_down.as_ref(), ScalingRules::default_scale_down())
                        .map_err(&invalid)?,
                })
            })
            .transpose()?;

        Ok(HpaSpec { name, min_replicas, max_replicas, metrics, behavior })
    }
}

const SUPPORTED: &str = "this replica supports External metrics with an AverageValue or Value target";

fn external_metric(index: usize, metric: &k8s::MetricSpec) -> Result<ExternalMetric, String> {
    if metric.type_ != "External" {
        return Err(format!("metric {index} has type {}; {SUPPORTED}", metric.type_));
    }
    let external =
        metric.external.as_ref().ok_or_else(|| format!("metric {index} has type External but no `external` block"))?;
    let name = external.metric.name.clone();
    let target = &external.target;
    let milli = |field: &str, quantity: &k8s_openapi::apimachinery::pkg::api::resource::Quantity| {
        let parsed: Quantity =
            quantity.0.parse().map_err(|e| format!("metric {index} ({name}): target.{field}: {e}"))?;
        if !parsed.is_positive() {
            return Err(format!("metric {index} ({name}): target.{field} is {parsed}; it must be positive"));
        }
        parsed.milli_value().map_err(|e| format!("metric {index} ({name}): target.{field}: {e}"))
    };
    // Validation: the declared type needs its field.
    match target.type_.as_str() {
        "AverageValue" if target.average_value.is_none() => {
            return Err(format!("metric {index} ({name}): target type AverageValue needs target.averageValue"));
        }
        "Value" if target.value.is_none() => {
            return Err(format!("metric {index} ({name}): target type Value needs target.value"));
        }
        "AverageValue" | "Value" => {}
        other => {
            return Err(format!("metric {index} ({name}) has target type {other}; {SUPPORTED}"));
        }
    }
    // The controller (computeStatusForExternalMetric) dispatches on which field is set, not on
    // target.type: averageValue wins when both are present.
    let target = match (&target.average_value, &target.value) {
        (Some(average), _) => MetricTarget::AverageValue(milli("averageValue", average)?),
        (None, Some(value)) => MetricTarget::Value(milli("value", value)?),
        (None, None) => unreachable!("checked above"),
    };
    let match_labels = external.metric.selector.as_ref().and_then(|s| s.match_labels.clone()).unwrap_or_default();
    Ok(ExternalMetric { name, match_labels, target })
}

/// `copyHPAScalingRules(user, default)` followed by `validateScalingRules`.
fn defaulted_rules(
    direction: &str,
    user: Option<&k8s::HPAScalingRules>,
    mut rules: ScalingRules,
) -> Result<ScalingRules, String> {
    let Some(user) = user else {
        return Ok(rules);
    };
    if let Some(select) = &user.select_policy {
        rules.select_policy = match select.as_str() {
            "Max" => SelectPolicy::Max,
            "Min" => SelectPolicy::Min,
            "Disabled" => SelectPolicy::Disabled,
            other => {
                return Err(format!("behavior.{direction}.selectPolicy is {other:?}; use Max, Min or Disabled"));
            }
        };
    }
    if let Some(window) = user.stabilization_window_seconds {
        if !(0..=MAX_STABILIZATION_WINDOW_SECONDS).contains(&window) {
            return Err(format!(
                "behavior.{direction}.stabilizationWindowSeconds is {window}; it must be 0..={MAX_STABILIZATION_WINDOW_SECONDS}"
            ));
        }
        rules.stabilization_window_seconds = Some(window);
    }
    if let Some(policies) = &user.policies {
        if policies.is_empty() {
            return Err(format!(
                "behavior.{direction}.policies is empty; list at least one policy or omit the field for the defaults"
            ));
        }
        rules.policies = policies.iter().enumerate().map(|(i, p)| policy(direction, i, p)).collect::<Result<_, _>>()?;
    }
    if let Some(tolerance) = &user.tolerance {
        let parsed: Quantity = tolerance.0.parse().map_err(|e| format!("behavior.{direction}.tolerance: {e}"))?;
        if parsed.is_negative() {
            return Err(format!("behavior.{direction}.tolerance is {parsed}; it must be 0 or more"));
        }
        rules.tolerance = Some(parsed.approximate_f64());
    }
    Ok(rules)
}

fn policy(direction: &str, index: usize, p: &k8s::HPAScalingPolicy) -> Result<ScalingPolicy, String> {
    let at = format!("behavior.{direction}.policies[{index}]");
    let kind = match p.type_.as_str() {
        "Pods" => PolicyKind::Pods,
        "Percent" => PolicyKind::Percent,
        other => return Err(format!("{at}.type is {other:?}; use Pods or Percent")),
    };
    if p.value <= 0 {
        return Err(format!("{at}.value is {}; it must be greater than zero", p.value));
    }
    if !(1..=MAX_PERIOD_SECONDS).contains(&p.period_seconds) {
        return Err(format!("{at}.periodSeconds is {}; it must be 1..={MAX_PERIOD_SECONDS}", p.period_seconds));
    }
    Ok(ScalingPolicy { kind, value: p.value, period_seconds: p.period_seconds })
}
