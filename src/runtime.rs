//! What every long-running role (worker, exporter, local) shares: command-line flags, the HTTP
//! server for `/metrics` and the probes, the metrics registry, signals and shutdown stages, logs,
//! and the one lock-poison policy.

pub mod args;
pub mod http;
pub mod metrics;
pub mod shutdown;
pub mod sync;
pub mod telemetry;
