//! The run's record: one row per second, written at the end as a CSV and an SVG plot.

use super::LocalError;
use crate::autoscale::hpa::HpaSpec;
use crate::tools::plot::{self, TimelinePoint};
use std::path::{Path, PathBuf};

/// One row of the timeline.
#[derive(Clone, Debug)]
pub(super) struct Row {
    pub t: f64,
    pub depth: Option<f64>,
    pub reserved: Option<f64>,
    pub desired: i32,
    pub running: i32,
    pub ready: i32,
    pub stopping: i32,
    pub succeeded: Option<f64>,
    pub failed: Option<f64>,
    pub rate: Option<f64>,
    pub event: String,
}

pub(super) const HEADER: &str = "t,queue_depth,reserved,desired_replicas,running_workers,ready_workers,stopping_workers,tasks_succeeded,tasks_failed,tasks_per_second,event";

impl Row {
    fn csv(&self) -> String {
        let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v}"));
        format!(
            "{:.1},{},{},{},{},{},{},{},{},{},{}",
            self.t,
            opt(self.depth),
            opt(self.reserved),
            self.desired,
            self.running,
            self.ready,
            self.stopping,
            opt(self.succeeded),
            opt(self.failed),
            self.rate.map_or(String::new(), |r| format!("{r:.2}")),
            self.event
        )
    }
}

/// Where the outputs went.
pub(super) struct Written {
    pub csv: PathBuf,
    pub svg: Option<PathBuf>,
}

/// Write `timeline.csv` and `timeline.svg` into `dir`. A plot that cannot be drawn is reported
/// and skipped: the CSV holds the same data.
pub(super) fn write(dir: &Path, spec: &HpaSpec, rows: &[Row]) -> Result<Written, LocalError> {
    let csv_path = dir.join("timeline.csv");
    let mut csv = String::from(HEADER);
    csv.push('\n');
    for r in rows {
        csv.push_str(&r.csv());
        csv.push('\n');
    }
    std::fs::write(&csv_path, csv).map_err(|source| LocalError::Io { path: csv_path.display().to_string(), source })?;
    let points: Vec<TimelinePoint> = rows
        .iter()
        .map(|r| TimelinePoint {
            t: r.t,
            queue_depth: r.depth.unwrap_or(0.0),
            reserved: r.reserved.unwrap_or(0.0),
            desired_replicas: r.desired,
            current_replicas: r.running,
            ready_replicas: Some(r.ready),
        })
        .collect();
    let title =
        format!("celery-autoscale local — HPA {} (min {}, max {})", spec.name, spec.min_replicas, spec.max_replicas);
    let svg_path = dir.join("timeline.svg");
    let svg = match plot::write_svg(&svg_path, &title, &points) {
        Ok(()) => Some(svg_path),
        Err(e) => {
            tracing::error!("{e}");
            None
        }
    };
    Ok(Written { csv: csv_path, svg })
}
