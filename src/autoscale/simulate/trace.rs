//! Open loop: replay a metric trace, one row per sync, with pods appearing immediately.

use std::io::Write;
use std::path::Path;

use crate::autoscale::hpa::{Autoscaler, Decision, HpaSpec, MetricReading, Observation, Timestamp};
use crate::tools::plot::TimelinePoint;

/// A problem with a trace file.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    // The cause is part of the sentence, not a `source`: a printed chain says it once.
    #[error("cannot read trace {path}: {cause}")]
    Read { path: String, cause: std::io::Error },
    #[error("trace line {line}: {message}")]
    Line { line: usize, message: String },
    #[error("trace: {0}")]
    Shape(String),
}

/// A metric trace: one row per sync instant.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// Column names after `t`: `metric`, or the HPA's metric names.
    pub columns: Vec<String>,
    pub rows: Vec<TraceRow>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TraceRow {
    pub t: Timestamp,
    /// `t` as written, echoed in the output.
    pub t_text: String,
    /// The metric cells as written (empty = missing).
    pub cells: Vec<String>,
    /// The cells as numbers.
    pub values: Vec<Option<f64>>,
}

/// Reads a trace CSV (`t,metric` header; no quoting; blank lines and `#` comments skipped).
pub fn read_trace(path: &Path) -> Result<Trace, TraceError> {
    let text =
        std::fs::read_to_string(path).map_err(|cause| TraceError::Read { path: path.display().to_string(), cause })?;
    parse_trace(&text)
}

/// Parses trace CSV text; see [`read_trace`].
pub fn parse_trace(text: &str) -> Result<Trace, TraceError> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_end_matches('\r')))
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    let (header_line, header) =
        lines.next().ok_or_else(|| TraceError::Shape("the file is empty; expected a header `t,metric`".into()))?;
    let header: Vec<String> = header.split(',').map(|c| c.trim().to_owned()).collect();
    if header.len() < 2 || header[0] != "t" {
        return Err(TraceError::Line {
            line: header_line,
            message: format!("header is {:?}; expected `t,metric`", header.join(",")),
        });
    }
    let columns = header[1..].to_vec();
    let mut rows: Vec<TraceRow> = Vec::new();
    for (line, text) in lines {
        let bad = |message: String| TraceError::Line { line, message };
        let cells: Vec<&str> = text.split(',').map(str::trim).collect();
        if cells.len() != header.len() {
            return Err(bad(format!(
                "{} fields, the header has {}; write `t,value` (an empty value = metric missing)",
                cells.len(),
                header.len()
            )));
        }
        let seconds: f64 = cells[0]
            .parse()
            .ok()
            .filter(|s: &f64| s.is_finite())
            .ok_or_else(|| bad(format!("t {:?} is not a number of seconds", cells[0])))?;
        let t = Timestamp::from_secs_f64(seconds);
        if let Some(previous) = rows.last()
            && t <= previous.t
        {
            return Err(bad(format!(
                "t {} is not after the previous row's {}; rows must be in sync order",
                cells[0], previous.t_text
            )));
        }
        let values = cells[1..]
            .iter()
            .map(|cell| {
                if cell.is_empty() {
                    return Ok(None);
                }
                cell.parse::<f64>().ok().filter(|v| v.is_finite()).map(Some).ok_or_else(|| {
                    bad(format!("metric value {cell:?} is not a number (leave it empty for a missing metric)"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        rows.push(TraceRow {
            t,
            t_text: cells[0].to_owned(),
            cells: cells[1..].iter().map(|c| (*c).to_owned()).collect(),
            values,
        });
    }
    Ok(Trace { columns, rows })
}

/// Which trace column feeds each metric of the HPA: a single `metric` column feeds all of them,
/// otherwise columns are matched by metric name.
fn metric_columns(spec: &HpaSpec, trace: &Trace) -> Result<Vec<usize>, TraceError> {
    if trace.columns == ["metric"] {
        return Ok(vec![0; spec.metrics.len()]);
    }
    spec.metrics
        .iter()
        .map(|m| {
            trace.columns.iter().position(|c| *c == m.name).ok_or_else(|| {
                TraceError::Shape(format!(
                    "no column for metric {:?}; name the value column `metric` or after each of the HPA's metrics",
                    m.name
                ))
            })
        })
        .collect()
}

/// Replays `trace` through `autoscaler`, starting at `initial_replicas`, with pods appearing
/// immediately. Metric values are converted like the adapter: `int64(v*1000)` milli-units.
pub fn replay_trace(
    autoscaler: &mut Autoscaler,
    trace: &Trace,
    initial_replicas: i32,
) -> Result<Vec<Decision>, TraceError> {
    let columns = metric_columns(&autoscaler.spec, trace)?;
    let mut replicas = initial_replicas;
    Ok(trace
        .rows
        .iter()
        .map(|row| {
            let readings =
                columns.iter().map(|&c| MetricReading::total(row.values[c].map(|v| (v * 1000.0) as i64))).collect();
            let decision = autoscaler.sync(row.t, &Observation::settled(replicas, readings));
            replicas = decision.replicas;
            decision
        })
        .collect())
}

pub(super) fn write_trace_result(out: &mut dyn Write, trace: &Trace, decisions: &[Decision]) -> std::io::Result<()> {
    writeln!(out, "t,{},replicas", trace.columns.join(","))?;
    for (row, decision) in trace.rows.iter().zip(decisions) {
        writeln!(out, "{},{},{}", row.t_text, row.cells.join(","), decision.replicas)?;
    }
    Ok(())
}

/// For the picture a missing sample holds the previous value.
pub(super) fn trace_points(trace: &Trace, decisions: &[Decision]) -> Vec<TimelinePoint> {
    let mut last = 0.0;
    trace
        .rows
        .iter()
        .zip(decisions)
        .map(|(row, decision)| {
            last = row.values.first().copied().flatten().unwrap_or(last);
            TimelinePoint {
                t: row.t.as_secs_f64(),
                queue_depth: last,
                reserved: 0.0,
                desired_replicas: decision.replicas,
                current_replicas: decision.replicas,
                ready_replicas: None,
            }
        })
        .collect()
}
