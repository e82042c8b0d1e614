//! Prometheus metrics: one struct per role, registered once in its own registry and passed to
//! the code that updates it. Names are the contract with dashboards, alerts and the HPA.

use crate::wire::RejectReason;
use prometheus::{Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

pub const TASK_SUCCESS: &str = "celery_task_success_total";
pub const TASK_FAILURE: &str = "celery_task_failure_total";
pub const TASK_DURATION: &str = "celery_task_duration_seconds";
pub const TASK_REJECTED: &str = "celery_task_rejected_total";
pub const QUEUE_DEPTH: &str = "celery_queue_depth";
pub const QUEUE_RESERVED: &str = "celery_queue_reserved";
pub const EXPORTER_LAST_POLL_OK: &str = "celery_queue_exporter_last_poll_ok";
pub const EXPORTER_KEY_ERRORS: &str = "celery_queue_exporter_key_errors_total";
pub const EXPORTER_LAST_SUCCESS: &str = "celery_queue_exporter_last_success_timestamp_seconds";
pub const WORKER_ACTIVE: &str = "celery_worker_active_tasks";
pub const WORKER_RESERVED: &str = "celery_worker_reserved_tasks";

/// Task durations from sub-millisecond CPU work to ten-minute jobs.
const DURATION_BUCKETS: [f64; 16] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 600.0];

/// The worker's metrics.
#[derive(Clone)]
pub struct WorkerMetrics {
    pub registry: Registry,
    pub received: IntCounterVec,
    pub success: IntCounterVec,
    pub failure: IntCounterVec,
    pub retried: IntCounterVec,
    pub revoked: IntCounterVec,
    pub rejected: IntCounterVec,
    pub duration: HistogramVec,
    pub active: IntGauge,
    pub reserved: IntGauge,
    pub concurrency: IntGauge,
    pub redis_connected: IntGauge,
    pub restored: IntCounter,
    pub requeued: IntCounter,
    pub duplicates_skipped: IntCounter,
    pub delivery_panics: IntCounter,
    /// --pod-deletion-cost: the cost last written to the pod (−1 before the first write).
    pub pod_deletion_cost: IntGauge,
    pub pod_deletion_cost_writes: IntCounterVec,
}

fn counter_vec(registry: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
    registry.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn int_gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    registry.register(Box::new(g.clone())).expect("metric registered once");
    g
}

fn int_counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    registry.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::new(name, help).expect("valid metric");
    registry.register(Box::new(g.clone())).expect("metric registered once");
    g
}

impl WorkerMetrics {
    /// The worker's metrics, with the per-task series of `task_names` created at zero.
    pub fn new<'a>(task_names: impl IntoIterator<Item = &'a str>) -> Self {
        let r = Registry::new();
        let duration = HistogramVec::new(
            HistogramOpts::new(TASK_DURATION, "Task run time in seconds, from start to result stored.")
                .buckets(DURATION_BUCKETS.to_vec()),
            &["task_name"],
        )
        .expect("valid metric");
        r.register(Box::new(duration.clone())).expect("metric registered once");
        let m = WorkerMetrics {
            received: counter_vec(&r, "celery_task_received_total", "Task messages received.", "task_name"),
            success: counter_vec(&r, TASK_SUCCESS, "Tasks that finished with SUCCESS.", "task_name"),
            failure: counter_vec(
                &r,
                TASK_FAILURE,
                "Tasks that finished with FAILURE (errors, time limits).",
                "task_name",
            ),
            retried: counter_vec(
                &r,
                "celery_task_retried_total",
                "Tasks that asked to be retried (RETRY stored, message re-sent).",
                "task_name",
            ),
            revoked: counter_vec(
                &r,
                "celery_task_revoked_total",
                "Tasks discarded because their expires time had passed.",
                "task_name",
            ),
            rejected: counter_vec(
                &r,
                TASK_REJECTED,
                "Messages rejected without running: malformed, unknown task, bad arguments...",
                "reason",
            ),
            duration,
            active: int_gauge(&r, WORKER_ACTIVE, "Tasks running now."),
            reserved: int_gauge(
                &r,
                "celery_worker_reserved_tasks",
                "Messages held but not started (waiting for a slot or an ETA).",
            ),
            concurrency: int_gauge(&r, "celery_worker_concurrency", "Tasks this worker runs at a time."),
            redis_connected: int_gauge(
                &r,
                "celery_worker_redis_connected",
                "1 while the broker and result backend connections work.",
            ),
            restored: int_counter(
                &r,
                "celery_worker_restored_total",
                "Orphaned messages this worker returned to their queue after the visibility timeout.",
            ),
            requeued: int_counter(
                &r,
                "celery_worker_requeued_total",
                "Held messages put back at the front of their queue on shutdown.",
            ),
            duplicates_skipped: int_counter(
                &r,
                "celery_worker_duplicates_skipped_total",
                "Redelivered messages whose task had already succeeded (acked, not run again).",
            ),
            delivery_panics: int_counter(
                &r,
                "celery_worker_delivery_panics_total",
                "Deliveries that panicked; the message they held was put back (or, on a repeat, failed).",
            ),
            pod_deletion_cost: int_gauge(
                &r,
                "celery_worker_pod_deletion_cost",
                "The controller.kubernetes.io/pod-deletion-cost last written to this pod (--pod-deletion-cost; -1 before the first write).",
            ),
            pod_deletion_cost_writes: counter_vec(
                &r,
                "celery_worker_pod_deletion_cost_writes_total",
                "Writes of the pod deletion cost through the Kubernetes API, by outcome (ok, error).",
                "outcome",
            ),
            registry: r,
        };
        // Create every series at zero so rate() works from the first scrape.
        for task in task_names {
            for c in [&m.received, &m.success, &m.failure, &m.retried, &m.revoked] {
                c.with_label_values(&[task]);
            }
            m.duration.with_label_values(&[task]);
        }
        for reason in RejectReason::ALL {
            m.rejected.with_label_values(&[reason.label()]);
        }
        m.pod_deletion_cost.set(-1);
        m
    }
}

/// The queue exporter's metrics.
#[derive(Clone)]
pub struct ExporterMetrics {
    pub registry: Registry,
    pub depth: prometheus::IntGaugeVec,
    pub reserved: prometheus::IntGaugeVec,
    pub last_poll_ok: IntGauge,
    pub poll_duration: Histogram,
    pub last_success: Gauge,
    pub polls: IntCounterVec,
    /// Polls on which a queue's keys (or `unacked`) could not be read.
    pub key_errors: IntCounterVec,
}

impl ExporterMetrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let gauge_vec = |name: &str, help: &str| {
            let g = prometheus::IntGaugeVec::new(Opts::new(name, help), &["queue"]).expect("valid metric");
            r.register(Box::new(g.clone())).expect("metric registered once");
            g
        };
        let depth = gauge_vec(
            QUEUE_DEPTH,
            "Messages waiting in the queue: the sum of LLEN over the queue and all its priority lists.",
        );
        let reserved = gauge_vec(
            QUEUE_RESERVED,
            "Messages taken from the queue by workers but not yet acknowledged (kombu's unacked hash).",
        );
        let poll_duration = Histogram::with_opts(
            HistogramOpts::new("celery_queue_exporter_poll_duration_seconds", "Time one poll of Redis took.")
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
        )
        .expect("valid metric");
        r.register(Box::new(poll_duration.clone())).expect("metric registered once");
        let m = ExporterMetrics {
            depth,
            reserved,
            last_poll_ok: int_gauge(
                &r,
                EXPORTER_LAST_POLL_OK,
                "1 if the last poll of Redis succeeded, else 0 (and the queue series are withdrawn).",
            ),
            poll_duration,
            last_success: gauge(
                &r,
                "celery_queue_exporter_last_success_timestamp_seconds",
                "Unix time of the last successful poll.",
            ),
            polls: counter_vec(&r, "celery_queue_exporter_polls_total", "Polls of Redis by outcome.", "outcome"),
            key_errors: counter_vec(
                &r,
                EXPORTER_KEY_ERRORS,
                "Polls on which a queue's keys could not be read (wrong type); queue=\"unacked\" for the unacked hash.",
                "queue",
            ),
            registry: r,
        };
        for outcome in ["ok", "error"] {
            m.polls.with_label_values(&[outcome]);
        }
        m
    }
}

impl Default for ExporterMetrics {
    fn default() -> Self {
        Self::new()
    }
}
