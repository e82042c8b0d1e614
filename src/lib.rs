//! celery-autoscale: Celery workers that scale on queue depth.
//!
//! A Redis list is the queue; [`worker`] speaks Celery's wire protocol ([`wire`]) over kombu's
//! Redis layout ([`broker`]) and writes Celery results ([`backend`]), so Python producers and
//! clients work unchanged; it runs the tasks of a [`task::Registry`] (the built-ins, or your
//! own). [`exporter`] publishes the queue depth for Prometheus, which prometheus-adapter serves
//! to a Kubernetes HPA; [`hpa`] is the same decision algorithm run locally by [`local`] and
//! [`simulate`]. [`loadgen`] drives it all.

// The map, by area. Each module is one concern; what the worker holds, how a message is framed
// and which Redis keys are touched each have one home (named below).

// Celery's wire format, pure (no I/O): messages, results, events framing, Python reprs, and
// `wire::keys`, the one list of every Redis key and channel name.
pub mod wire;

// Redis: URLs (the one parser), connections (health checks, error kinds, backoff), kombu's
// transport, Celery's result backend, leases, and every Lua script.
pub mod backend;
pub mod broker;
pub mod connection;
pub mod lease;
pub mod redis_url;
pub mod scripts;

// The worker: delivery (`worker`, with `worker::inflight`, what it holds), the task API, remote
// control and events, and what every long-running role shares (flags, HTTP, metrics, signals,
// logs, the lock-poison policy).
pub mod args;
pub mod control;
pub mod events;
pub mod http;
pub mod metrics;
pub mod shutdown;
pub mod sync;
pub mod task;
pub mod telemetry;
pub mod worker;

// Autoscaling: the queue-depth exporter, the HPA algorithm, and the two places it runs without
// Kubernetes (`local` scales real processes, `simulate` a model), with `scrape` reading workers'
// metrics.
pub mod exporter;
pub mod hpa;
pub mod local;
pub mod scrape;
pub mod simulate;

// Tools: the load generator, its load patterns, and plots.
pub mod loadgen;
pub mod pattern;
pub mod plot;
