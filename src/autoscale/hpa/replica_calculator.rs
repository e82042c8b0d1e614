//! The External half of replica_calculator.go: what one metric proposes.

use super::spec::MetricTarget;
use super::types::{DeadBand, MetricReading, Observation};

#[derive(Debug, Clone, Copy)]
pub(crate) struct Tolerances {
    pub(crate) down: f64,
    pub(crate) up: f64,
}

impl Tolerances {
    pub(crate) fn is_within(self, ratio: f64) -> bool {
        (1.0 - self.down) <= ratio && ratio <= (1.0 + self.up)
    }
}

pub(crate) struct MetricOutcome {
    pub(crate) replicas: i32,
    pub(crate) total: i64,
    pub(crate) average: Option<i64>,
}

/// `GetExternalPerPodMetricReplicas` / `GetExternalMetricReplicas` on an observed reading.
pub(crate) fn external_metric_replicas(
    target: MetricTarget,
    reading: Option<&MetricReading>,
    observation: &Observation,
    tolerances: Tolerances,
    dead_band: DeadBand,
) -> Result<MetricOutcome, String> {
    let samples = match reading {
        None => return Err("no reading supplied for this metric".into()),
        Some(MetricReading::Failed(reason)) => return Err(reason.clone()),
        Some(MetricReading::Samples(samples)) if samples.is_empty() => {
            return Err("no metrics returned from external metrics API".into());
        }
        Some(MetricReading::Samples(samples)) => samples,
    };
    match target {
        MetricTarget::AverageValue(target) => {
            // Go detects overflow as a negative running sum and saturates; a sum made negative
            // by negative samples saturates too. The Value path below checks differently.
            let mut usage: i64 = 0;
            for &value in samples {
                usage = usage.wrapping_add(value);
                if usage < 0 {
                    usage = i64::MAX;
                    break;
                }
            }
            let status = observation.status_replicas;
            let mut replicas = status;
            let ratio = usage as f64 / (target as f64 * f64::from(status));
            if !tolerances.is_within(ratio) {
                let result = (usage as f64 / target as f64).ceil();
                replicas = if result > f64::from(i32::MAX) { i32::MAX } else { result as i32 };
            } else if dead_band == DeadBand::SpecReplicas {
                replicas = observation.spec_replicas;
            }
            let average = if usage as f64 >= i64::MAX as f64 {
                i64::MAX
            } else {
                (usage as f64 / f64::from(status)).ceil() as i64
            };
            Ok(MetricOutcome { replicas, total: usage, average: Some(average) })
        }
        MetricTarget::Value(target) => {
            let mut usage: i64 = 0;
            for &value in samples {
                if value > 0 && usage > i64::MAX - value {
                    usage = i64::MAX;
                    break;
                }
                usage = usage.wrapping_add(value);
            }
            let ratio = usage as f64 / target as f64;
            let spec = observation.spec_replicas;
            let replicas = if spec != 0 {
                if tolerances.is_within(ratio) {
                    spec
                } else {
                    let ready = observation.ready_pods.ok_or(
                        "unable to calculate ready pods: no pods returned by selector while calculating replica count",
                    )?;
                    let result = ratio * f64::from(ready);
                    if result > f64::from(i32::MAX) { i32::MAX } else { result.ceil() as i32 }
                }
            } else {
                // Scale from zero (HPAScaleToZero): no tolerance, no pods.
                ratio.ceil() as i32
            };
            Ok(MetricOutcome { replicas, total: usage, average: None })
        }
    }
}
