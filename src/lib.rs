//! celery-autoscale: Celery workers that scale on queue depth.
//!
//! A Redis list is the queue; [`worker`] speaks Celery's wire protocol ([`wire`]) over kombu's
//! Redis layout ([`broker`]) and writes Celery results ([`backend`]), so Python producers and
//! clients work unchanged; it runs the tasks of a [`task::Registry`] (the built-ins, or your
//! own). [`exporter`] publishes the queue depth for Prometheus, which prometheus-adapter serves
//! to a Kubernetes HPA; [`hpa`] is the same decision algorithm run locally by [`local`] and
//! [`simulate`]. [`loadgen`] drives it all.

pub mod args;
pub mod backend;
pub mod broker;
pub mod connection;
pub mod control;
pub mod events;
pub mod exporter;
pub mod hpa;
pub mod http;
pub mod lease;
pub mod loadgen;
pub mod local;
pub mod metrics;
pub mod pattern;
pub mod plot;
pub mod redis_url;
pub mod scrape;
pub mod scripts;
pub mod shutdown;
pub mod simulate;
pub mod sync;
pub mod task;
pub mod telemetry;
pub mod wire;
pub mod worker;
