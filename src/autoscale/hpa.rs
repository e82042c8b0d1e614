//! A faithful replica of the Kubernetes HPA controller's decisions, for the cases this project
//! meets: External metrics with AverageValue or Value targets, tolerance (global or
//! per-direction), min/max, the `behavior` path and the legacy path, API-server defaults, and
//! "metric missing → no change, no recommendation recorded".
//!
//! Pure: no clock, no I/O in the algorithm. The simulator, the local supervisor and the tests
//! call the same [`Autoscaler::sync`] (or the free function [`reconcile`]).
//!
//! Restated from kubernetes/kubernetes `pkg/controller/podautoscaler/horizontal.go`,
//! `replica_calculator.go` and `pkg/apis/autoscaling/v2/defaults.go`; docs/hpa-algorithm.md
//! explains it in prose, and docs/HPA-findings.md lists where that document and the source differ
//! (the source wins).
//!
//! - [`spec`]: the defaulted HPA the algorithm reads, converted from the real k8s-openapi type.
//! - [`manifest`]: finding the HPA in a rendered multi-document YAML or JSON `List`.
//! - [`controller`]: one sync ([`Autoscaler`], [`reconcile`]).
//! - [`types`]: what a sync reads, returns and remembers.
//! - [`rate`]: the policy rate limits and the legacy clamp.
//! - `replica_calculator`: what one External metric proposes.
//! - [`quantity`]: `MilliValue()` / `AsApproximateFloat64()` of Kubernetes quantities.

pub mod controller;
pub mod manifest;
pub mod quantity;
pub mod rate;
mod replica_calculator;
pub mod spec;
pub mod types;

use std::path::Path;

pub use controller::{Autoscaler, reconcile};
pub use manifest::{find_hpa, load_hpa_file, parse_hpa_manifest};
pub use quantity::{Quantity, QuantityError};
pub use rate::{percent_scale_down, percent_scale_up};
pub use spec::{
    Behavior, ExternalMetric, HpaSpec, MetricTarget, PolicyKind, ScalingPolicy, ScalingRules, SelectPolicy,
};
pub use types::{
    Condition, ConditionType, ControllerConfig, DeadBand, Decision, HpaState, MetricReading, MetricStatus, Observation,
    Reason, Recommendation, ScaleEvent, Timestamp,
};

/// Why an HPA manifest could not be used.
#[derive(Debug, thiserror::Error)]
pub enum HpaError {
    // Causes are part of the sentence and not a `source`, so a printed chain says them once.
    #[error("cannot read HPA manifest {path}: {cause}")]
    Read { path: String, cause: std::io::Error },
    #[error("{0}")]
    Parse(String),
    #[error(
        "no autoscaling/v2 HorizontalPodAutoscaler found (objects seen: {seen}); pass the rendered \
         manifest that contains the HPA, e.g. k8s/autoscaling.yaml"
    )]
    NotFound { seen: String },
    #[error("several HorizontalPodAutoscalers ({found}); pick one with --hpa-name")]
    Ambiguous { found: String },
    #[error("no HorizontalPodAutoscaler named {name:?} (found: {found}); check --hpa-name")]
    NameNotFound { name: String, found: String },
    #[error("HPA {hpa}: {message}")]
    Invalid { hpa: String, message: String },
    #[error("{path}: {cause}")]
    InFile { path: String, cause: Box<HpaError> },
}

impl HpaError {
    /// Prefixes the file name, once.
    fn in_file(self, path: &Path) -> Self {
        match self {
            HpaError::Read { .. } | HpaError::InFile { .. } => self,
            other => HpaError::InFile { path: path.display().to_string(), cause: Box::new(other) },
        }
    }
}
