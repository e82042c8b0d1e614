//! Autoscaling: the queue-depth exporter, the HPA controller's algorithm, and the two places it
//! runs without Kubernetes — `local` scales real worker processes, `simulate` a model — with
//! `scrape` reading workers' and exporters' metrics.

pub mod exporter;
pub mod hpa;
pub mod local;
pub mod scrape;
pub mod simulate;
