//! Scale-in that removes idle workers first: keep this worker pod's
//! `controller.kubernetes.io/pod-deletion-cost` annotation current from what it runs.
//!
//! When a Deployment shrinks, the ReplicaSet controller deletes the pods of lowest deletion cost
//! first (KEP-2255, on by default since Kubernetes 1.22), after the not-ready and unscheduled ones.
//! Without the annotation every pod costs 0 and the controller picks among equals by age, so a
//! worker in the middle of a ten-minute task is as likely to go as an idle one. With
//! `--pod-deletion-cost`, the worker writes its cost through the Kubernetes API (kube-rs, the pod's
//! own service account), so the idle pods cost least and go first.
//!
//! The cost is [`cost`] of the tasks **running** here: 0 when idle, then 1, 2, 3, … for 1, 2–3,
//! 4–7, … running (a log₂ scale). Messages only held (prefetched, or waiting for an ETA) do not
//! count: the warm shutdown SIGTERM starts puts them straight back at the front of their queue,
//! so deleting a pod that only holds them interrupts nothing. The log scale keeps the number of
//! writes low — Kubernetes asks that the annotation not be updated at the pace of a metric — while
//! still ordering idle < lightly busy < busy.
//!
//! Writes are rate-limited: the worker looks at its running count every [`LOOK_EVERY`], writes
//! when the cost changed, and never more often than once per [`MIN_INTERVAL`] (a change inside
//! the interval is written when it ends, if it still holds). A failed write is logged (once per
//! kind of failure until one succeeds), counted in `celery_worker_pod_deletion_cost_writes_total
//! {outcome="error"}` and tried again; it never stops the worker.
//!
//! RBAC: `patch` on `pods` in the worker's namespace (nix/k8s/worker.nix renders the Role when
//! the option is on). RBAC cannot name "the caller's own pod", so the grant covers every pod of
//! the namespace; the rendered ValidatingAdmissionPolicy narrows it back to the caller's own pod
//! and this one annotation. See docs/Autoscaling.md "Scale-in removes idle workers first".

use super::InFlight;
use kube::api::{Api, PartialObjectMeta, Patch, PatchParams};
use prometheus::{IntCounterVec, IntGauge};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The annotation the ReplicaSet controller ranks pods by.
pub const ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";
/// How often the running count is looked at (a lock and a count: cheap).
pub const LOOK_EVERY: Duration = Duration::from_millis(250);
/// At most one write per this long.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Where to write: the pod this worker runs in.
#[derive(Clone, Debug)]
pub struct PodRef {
    pub name: String,
    pub namespace: String,
}

/// The deletion cost of a pod running `running` tasks: 0 idle, else ⌊log₂ running⌋ + 1.
pub fn cost(running: usize) -> u32 {
    match running {
        0 => 0,
        n => usize::BITS - n.leading_zeros(),
    }
}

/// The worker's counters for this service.
#[derive(Clone)]
pub struct CostMetrics {
    /// The cost last written (−1 until the first write succeeds).
    pub written: IntGauge,
    /// Writes by outcome (`ok`, `error`).
    pub writes: IntCounterVec,
}

/// Keep the pod's deletion cost current until the process ends. Connects lazily and keeps
/// retrying: the API server being away is logged and counted, never fatal.
pub async fn keep_current(pod: PodRef, in_flight: Arc<InFlight>, metrics: CostMetrics) {
    metrics.written.set(-1);
    let mut client: Option<Api<k8s_openapi::api::core::v1::Pod>> = None;
    let mut written: Option<u32> = None;
    let mut last_write: Option<Instant> = None;
    let mut last_error: Option<String> = None;
    let mut look = tokio::time::interval(LOOK_EVERY);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        look.tick().await;
        let want = cost(in_flight.running());
        if written == Some(want) || last_write.is_some_and(|t| t.elapsed() < MIN_INTERVAL) {
            continue;
        }
        last_write = Some(Instant::now());
        let result = match &client {
            Some(api) => write(api, &pod.name, want).await,
            None => match connect(&pod.namespace).await {
                Ok(api) => {
                    let r = write(&api, &pod.name, want).await;
                    client = Some(api);
                    r
                }
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(()) => {
                metrics.writes.with_label_values(&["ok"]).inc();
                metrics.written.set(i64::from(want));
                if last_error.take().is_some() || written.is_none() {
                    tracing::info!(pod = %pod.name, cost = want, "pod deletion cost written");
                } else {
                    tracing::debug!(pod = %pod.name, cost = want, "pod deletion cost written");
                }
                written = Some(want);
            }
            Err(e) => {
                metrics.writes.with_label_values(&["error"]).inc();
                if last_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!(pod = %pod.name, error = %e, "cannot write the pod deletion cost; retrying");
                    last_error = Some(e);
                }
            }
        }
    }
}

/// A client for the pods of `namespace`: the kubeconfig of `KUBECONFIG` when set, else the
/// in-cluster service account (kube-rs' `Config::infer`).
async fn connect(namespace: &str) -> Result<Api<k8s_openapi::api::core::v1::Pod>, String> {
    let config = kube::Config::infer().await.map_err(|e| format!("no Kubernetes API configuration: {e}"))?;
    let client = kube::Client::try_from(config).map_err(|e| format!("cannot build the Kubernetes client: {e}"))?;
    Ok(Api::namespaced(client, namespace))
}

/// One merge patch of the annotation (metadata only: the pod's spec and status are not sent or
/// read back).
async fn write(api: &Api<k8s_openapi::api::core::v1::Pod>, name: &str, cost: u32) -> Result<(), String> {
    let patch = serde_json::json!({ "metadata": { "annotations": { ANNOTATION: cost.to_string() } } });
    let _: PartialObjectMeta<k8s_openapi::api::core::v1::Pod> = api
        .patch_metadata(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| format!("patch pod {name}: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::cost;

    #[test]
    fn idle_costs_least_and_the_scale_is_logarithmic() {
        let got: Vec<u32> = [0, 1, 2, 3, 4, 7, 8, 1000].into_iter().map(cost).collect();
        assert_eq!(got, [0, 1, 2, 2, 3, 3, 4, 10]);
        assert_eq!(cost(usize::MAX), usize::BITS);
    }
}
