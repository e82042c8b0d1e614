//! The inputs and outputs of one HPA sync, and the memory kept between syncs.

use std::fmt;

/// A point in time, in whole milliseconds since an arbitrary origin. Integer so that 15 s
/// ticks and 60 s windows compare exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const fn from_millis(millis: i64) -> Self {
        Timestamp(millis)
    }

    pub const fn from_secs(secs: i64) -> Self {
        Timestamp(secs * 1000)
    }

    /// Rounds to the nearest millisecond (CSV input such as `15` or `15.25`).
    pub fn from_secs_f64(secs: f64) -> Self {
        Timestamp((secs * 1000.0).round() as i64)
    }

    pub const fn as_millis(self) -> i64 {
        self.0
    }

    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / 1000.0
    }

    /// `now.Add(-time.Second * seconds)`.
    pub(crate) fn minus_secs(self, seconds: i32) -> Self {
        Timestamp(self.0 - i64::from(seconds) * 1000)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}s", self.as_secs_f64())
    }
}

/// The kube-controller-manager settings that shape decisions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControllerConfig {
    /// `--horizontal-pod-autoscaler-tolerance`.
    pub tolerance: f64,
    /// `--horizontal-pod-autoscaler-downscale-stabilization`, in seconds: the legacy window and
    /// the behavior scale-down window when the HPA leaves it unset.
    pub downscale_stabilization_seconds: i32,
    /// Feature gate `HPAConfigurableTolerance` (beta, on by default from 1.35): when off, the
    /// per-direction `behavior.*.tolerance` fields are ignored. In 1.34 (the manifests' target)
    /// it is alpha and off: the v1.34.4 API server drops the field on write and the controller
    /// uses the flag for both directions (docs/HPA-findings.md, 9). On here, as from 1.35; the
    /// rendered HPA sets no per-direction tolerance, so its decisions are the same either way.
    pub configurable_tolerance: bool,
    /// What an AverageValue metric proposes inside the tolerance band.
    pub dead_band: DeadBand,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            tolerance: 0.1,
            downscale_stabilization_seconds: 300,
            configurable_tolerance: true,
            dead_band: DeadBand::StatusReplicas,
        }
    }
}

/// kubernetes/kubernetes#138505: inside the tolerance band `GetExternalPerPodMetricReplicas`
/// proposes `scale.status.replicas`, not `scale.spec.replicas`, so surge pods during a rollout
/// move the spec with no load change. Upstream behaviour is the default; the open fix
/// (#141134) returns the spec instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeadBand {
    #[default]
    StatusReplicas,
    SpecReplicas,
}

/// A raw (unclamped, unstabilized) desired count as recorded by the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recommendation {
    pub replicas: i32,
    pub at: Timestamp,
}

/// A scale change, stored as a non-negative magnitude per direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleEvent {
    pub replica_change: i32,
    pub at: Timestamp,
    /// Set by `markScaleEventsOutdated`; the slot is reused by the next event.
    pub outdated: bool,
}

/// What the controller remembers about one HPA between syncs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HpaState {
    pub recommendations: Vec<Recommendation>,
    pub scale_up_events: Vec<ScaleEvent>,
    pub scale_down_events: Vec<ScaleEvent>,
    /// The HPA's `status.conditions`, in the order they were first set.
    pub conditions: Vec<Condition>,
}

/// The three HPA condition types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionType {
    AbleToScale,
    ScalingActive,
    ScalingLimited,
}

/// Condition reasons this replica can produce (upstream spelling).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    SucceededGetScale,
    SucceededRescale,
    ReadyForNewScale,
    ScaleUpStabilized,
    ScaleDownStabilized,
    ScalingDisabled,
    ValidMetricFound,
    FailedGetExternalMetric,
    ScaleUpLimit,
    ScaleDownLimit,
    TooManyReplicas,
    TooFewReplicas,
    DesiredWithinRange,
}

impl fmt::Display for ConditionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One entry of `status.conditions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub kind: ConditionType,
    pub status: bool,
    pub reason: Reason,
    pub message: String,
}

/// One External metric as the adapter answered at this sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricReading {
    /// The items' `MilliValue()`s. An empty list is the error "no metrics returned from external
    /// metrics API", as upstream.
    Samples(Vec<i64>),
    /// The API call failed (adapter down, 404 for an unknown series, ...).
    Failed(String),
}

impl MetricReading {
    /// A single total, e.g. the queue depth: `Some(v)` → one sample, `None` → missing.
    pub fn total(milli: Option<i64>) -> Self {
        match milli {
            Some(v) => MetricReading::Samples(vec![v]),
            None => MetricReading::Failed("metric missing".into()),
        }
    }
}

/// What one sync reads from the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// `scale.spec.replicas`: what the HPA (or a user) last asked for. The code calls it
    /// "currentReplicas".
    pub spec_replicas: i32,
    /// `scale.status.replicas`: non-terminated pods, ready or not. AverageValue divides by it.
    pub status_replicas: i32,
    /// Running and Ready pods matching the scale selector, for Value targets; `None` means the
    /// selector matched no pod at all, which upstream treats as an error.
    pub ready_pods: Option<i32>,
    /// One reading per metric of the spec, in order; a missing entry counts as failed.
    pub metrics: Vec<MetricReading>,
}

impl Observation {
    /// Pods appear immediately and are ready: spec, status and ready counts are equal.
    pub fn settled(replicas: i32, metrics: Vec<MetricReading>) -> Self {
        Observation { spec_replicas: replicas, status_replicas: replicas, ready_pods: Some(replicas), metrics }
    }
}

/// The outcome for one metric.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricStatus {
    pub name: String,
    /// The replica count this metric proposes.
    pub proposal: Option<i32>,
    /// Sum of the samples in milli-units (what `status.currentMetrics` reports for Value).
    pub total_milli: Option<i64>,
    /// `ceil(total / status.replicas)` for AverageValue targets.
    pub average_milli: Option<i64>,
    pub error: Option<String>,
}

/// Everything one sync decided, with the reasons a UI can show.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// `scale.spec.replicas` after the sync (`status.desiredReplicas`).
    pub replicas: i32,
    /// The spec replicas the sync started from.
    pub previous_replicas: i32,
    /// True when the controller wrote a new spec (a scale event).
    pub rescaled: bool,
    /// The maximum over the metrics' proposals, before stabilization and limits.
    pub metric_replicas: Option<i32>,
    /// After the stabilization window, before the rate limits and min/max.
    pub stabilized_replicas: Option<i32>,
    pub metrics: Vec<MetricStatus>,
    /// `status.conditions` after the sync.
    pub conditions: Vec<Condition>,
    /// The error the controller would return (and log) for this sync, if any. Some metrics can
    /// fail while the sync still scales up on the others.
    pub error: Option<String>,
}

impl Decision {
    pub fn condition(&self, kind: ConditionType) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.kind == kind)
    }
}
