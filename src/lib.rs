//! celery-autoscale: Celery workers that scale on queue depth.
//!
//! A Redis list is the queue; the [`worker`] speaks Celery's wire protocol ([`wire`]) over
//! kombu's Redis layout ([`transport`]) and writes Celery results, so Python producers and
//! clients work unchanged; it runs the tasks of a [`task::Registry`] (the built-ins, or your
//! own). The exporter publishes the queue depth for Prometheus, which prometheus-adapter serves
//! to a Kubernetes HPA; [`autoscale`] holds it, the same decision algorithm the HPA runs, and the
//! two places that algorithm runs without Kubernetes. The load generator ([`tools`]) drives it
//! all; [`runtime`] is what every long-running role shares.
//!
//! Where to look: what a worker holds is `worker::inflight`; how a message is framed is
//! `wire::kombu` (the envelope) with `wire::task_read`/`task_write` and `wire::pidbox`; which
//! Redis keys are touched is `wire::keys`; every Lua script is `transport::scripts`.

pub mod autoscale;
pub mod runtime;
pub mod task;
pub mod tools;
pub mod transport;
pub mod wire;
pub mod worker;
