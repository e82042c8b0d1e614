//! An SVG picture of an autoscaling run: queue depth and reserved tasks on top, desired and
//! current replicas below, sharing the time axis.
//!
//! plotters' SVG backend writes `<text>` elements with a generic `sans-serif` family, and
//! without its `ttf` feature it measures text with a built-in estimate, so nothing here needs
//! fontconfig or system fonts.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

/// One sample of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimelinePoint {
    /// Seconds since the start of the run.
    pub t: f64,
    /// Tasks waiting in the broker queue (what the exporter reports).
    pub queue_depth: f64,
    /// Tasks held by workers (running or prefetched).
    pub reserved: f64,
    /// The replica count the autoscaler asks for (the scale target's spec).
    pub desired_replicas: i32,
    /// Worker replicas that exist and are not shutting down.
    pub current_replicas: i32,
    /// Of those, the ones consuming tasks (started and ready); `None` draws no line.
    pub ready_replicas: Option<i32>,
}

/// Why the picture could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("nothing to plot: the run produced no timeline points")]
    Empty,
    #[error("cannot draw {path}: {message}")]
    Draw { path: String, message: String },
}

const QUEUE_COLOR: RGBColor = RGBColor(31, 119, 180);
const RESERVED_COLOR: RGBColor = RGBColor(255, 127, 14);
const DESIRED_COLOR: RGBColor = RGBColor(214, 39, 40);
const CURRENT_COLOR: RGBColor = RGBColor(44, 160, 44);
const READY_COLOR: RGBColor = RGBColor(148, 103, 189);
const FONT: &str = "sans-serif";

/// Writes the timeline as an SVG file of two stacked panels.
pub fn write_svg(path: &Path, title: &str, points: &[TimelinePoint]) -> Result<(), PlotError> {
    if points.is_empty() {
        return Err(PlotError::Empty);
    }
    let draw_error = |message: String| PlotError::Draw { path: path.display().to_string(), message };
    let root = SVGBackend::new(path, (1100, 760)).into_drawing_area();
    draw(&root, title, points).map_err(draw_error)?;
    root.present().map_err(|e| draw_error(e.to_string()))
}

fn draw(root: &DrawingArea<SVGBackend<'_>, Shift>, title: &str, points: &[TimelinePoint]) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let body = root.titled(title, (FONT, 26)).map_err(|e| err(&e))?;
    let (top, bottom) = body.split_vertically(body.dim_in_pixel().1 / 2);

    // A little room on the right so a last step at the end stays visible.
    let t_end = points.iter().map(|p| p.t).fold(0.0, f64::max).max(1.0) * 1.02;
    let tasks_max = points.iter().map(|p| p.queue_depth.max(p.reserved)).fold(0.0, f64::max);
    let replicas_max = points.iter().map(|p| p.desired_replicas.max(p.current_replicas)).max().unwrap_or(0);

    let mut queue = ChartBuilder::on(&top)
        .margin(12)
        .caption("Queue", (FONT, 18))
        .x_label_area_size(28)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..t_end, 0.0..nice_top(tasks_max))
        .map_err(|e| err(&e))?;
    queue
        .configure_mesh()
        .y_desc("tasks")
        .x_label_formatter(&|t| format!("{t:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.08))
        .draw()
        .map_err(|e| err(&e))?;
    let mut series =
        vec![("queue depth (waiting)", QUEUE_COLOR, points.iter().map(|p| (p.t, p.queue_depth)).collect::<Vec<_>>())];
    // A metric trace has no reserved tasks; an all-zero line would only add a legend entry.
    if points.iter().any(|p| p.reserved != 0.0) {
        series.push(("reserved (running)", RESERVED_COLOR, points.iter().map(|p| (p.t, p.reserved)).collect()));
    }
    for (label, color, data) in series {
        queue
            .draw_series(LineSeries::new(data, color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(3)));
    }
    legend(&mut queue).map_err(|e| err(&e))?;

    let mut replicas = ChartBuilder::on(&bottom)
        .margin(12)
        .caption("Replicas", (FONT, 18))
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..t_end, 0.0..f64::from(replicas_max + 1).max(2.0) * 1.1)
        .map_err(|e| err(&e))?;
    replicas
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("replicas")
        .x_label_formatter(&|t| format!("{t:.0}"))
        .y_label_formatter(&|v| {
            if v.fract() == 0.0 { format!("{v:.0}") } else { String::new() }
        })
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.08))
        .draw()
        .map_err(|e| err(&e))?;
    // Where the three agree (most of a run) they lie on one another. Each is drawn so that it
    // still shows there: desired as a wide translucent band underneath, current as a solid line
    // inside the band, ready as a thin dashed line on top (current shows between the dashes).
    let desired_style = DESIRED_COLOR.mix(0.35).stroke_width(12);
    replicas
        .draw_series(LineSeries::new(stairs(points, |p| p.desired_replicas), desired_style))
        .map_err(|e| err(&e))?
        .label("desired (HPA spec)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], desired_style));
    let current_style = CURRENT_COLOR.stroke_width(4);
    replicas
        .draw_series(LineSeries::new(stairs(points, |p| p.current_replicas), current_style))
        .map_err(|e| err(&e))?
        .label("current (live workers)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], current_style));
    if points.iter().any(|p| p.ready_replicas.is_some()) {
        let ready = stairs(points, |p| p.ready_replicas.unwrap_or(0));
        let ready_style = READY_COLOR.stroke_width(2);
        replicas
            .draw_series(DashedLineSeries::new(ready, 6, 6, ready_style))
            .map_err(|e| err(&e))?
            .label("ready (consuming)")
            .legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (6, 0)], ready_style)
                    + PathElement::new(vec![(12, 0), (18, 0)], ready_style)
            });
    }
    legend(&mut replicas).map_err(|e| err(&e))?;
    Ok(())
}

fn legend<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<
        'a,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .label_font((FONT, 14))
        .draw()
}

/// Replica counts change at sync instants and hold in between: draw them as steps.
fn stairs(points: &[TimelinePoint], value: impl Fn(&TimelinePoint) -> i32) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(points.len() * 2);
    for (i, point) in points.iter().enumerate() {
        let y = f64::from(value(point));
        if i > 0 {
            out.push((point.t, f64::from(value(&points[i - 1]))));
        }
        out.push((point.t, y));
    }
    out
}

/// Headroom above the largest value so the legend does not sit on the data.
fn nice_top(max: f64) -> f64 {
    (max * 1.25).max(10.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stairs_hold_the_previous_value_until_the_change() {
        let p = |t, r| TimelinePoint {
            t,
            queue_depth: 0.0,
            reserved: 0.0,
            desired_replicas: r,
            current_replicas: r,
            ready_replicas: None,
        };
        let steps = stairs(&[p(0.0, 1), p(15.0, 3), p(30.0, 3)], |p| p.desired_replicas);
        assert_eq!(steps, vec![(0.0, 1.0), (15.0, 1.0), (15.0, 3.0), (30.0, 3.0), (30.0, 3.0)]);
    }

    #[test]
    fn where_the_replica_lines_agree_each_still_shows() {
        let points: Vec<TimelinePoint> = (0..20)
            .map(|t| TimelinePoint {
                t: f64::from(t),
                queue_depth: 0.0,
                reserved: 0.0,
                desired_replicas: 2,
                current_replicas: 2,
                ready_replicas: Some(2),
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.svg");
        write_svg(&path, "t", &points).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        // Drawn in this order, each narrower than the one beneath, the band see-through.
        let at = |needle: &str| svg.find(needle).unwrap_or_else(|| panic!("{needle} missing"));
        let desired = at(r##"opacity="0.35" stroke="#D62728" stroke-width="12""##);
        let current = at(r##"stroke="#2CA02C" stroke-width="4""##);
        let ready = at(r##"stroke="#9467BD" stroke-width="2""##);
        assert!(desired < current && current < ready);
    }
}
