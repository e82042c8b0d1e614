//! What `local` shows while it runs.
//!
//! On a terminal: a fixed-height panel redrawn in place every second (cursor up, clear each
//! line), with the latest events inside it, so three minutes of run leave one panel on screen,
//! not a thousand lines of scrollback. Anywhere else (a pipe, a CI log): plain log lines, one
//! per sync and one per event.

use super::fleet::Event;
use super::timeline::Row;
use crate::autoscale::hpa::{Condition, ConditionType, Decision, Reason};
use std::collections::VecDeque;
use std::io::Write;

/// Events kept in the terminal panel.
const RECENT: usize = 6;

/// One frame of the panel.
pub(super) struct Frame<'a> {
    pub queue: &'a str,
    /// The numbers: the timeline row of this second.
    pub row: &'a Row,
    pub load: &'a str,
    pub last_sync: &'a str,
}

pub(super) struct View {
    terminal: bool,
    /// Header line: the HPA and where things are.
    title: String,
    recent: VecDeque<String>,
    /// Lines of the panel on screen, to move the cursor back over.
    drawn: usize,
}

impl View {
    pub(super) fn new(terminal: bool, title: String) -> View {
        View { terminal, title, recent: VecDeque::new(), drawn: 0 }
    }

    /// An event at `t` seconds: into the panel on a terminal, a log line otherwise.
    pub(super) fn event(&mut self, t: f64, event: &Event) {
        if self.terminal {
            if self.recent.len() == RECENT {
                self.recent.pop_front();
            }
            self.recent.push_back(format!("t={t:>4.0}s  {}", event.text));
        } else if event.warn {
            tracing::warn!("{}", event.text);
        } else {
            tracing::info!("{}", event.text);
        }
    }

    /// A sync's outcome, as a log line when there is no panel to show it.
    pub(super) fn sync(&self, f: &Frame<'_>) {
        if !self.terminal {
            tracing::info!(
                t = format!("{:.0}", f.row.t),
                depth = f.row.depth,
                reserved = f.row.reserved,
                workers = f.row.desired,
                "sync: {}",
                f.last_sync
            );
        }
    }

    /// Redraw the panel (terminal only).
    pub(super) fn draw(&mut self, f: &Frame<'_>) {
        if !self.terminal || super::stdout_gone() {
            return;
        }
        let n = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
        let r = f.row;
        let tasks = match r.succeeded.zip(r.failed) {
            Some((ok, failed)) => format!("{ok:.0} done, {failed:.0} failed"),
            None => "-".to_owned(),
        };
        let rate = r.rate.map_or(String::new(), |r| format!(", {r:.1}/s"));
        let width = terminal_width();
        // The clock first and the last sync's reason on two lines, so 80 columns cut neither.
        let (sync1, sync2) = split_at_width(f.last_sync, width.saturating_sub(18));
        let mut lines = vec![
            format!("t = {:>4.0} s   {}", r.t, self.title),
            String::new(),
            format!("queue {:<10} {} waiting, {} in workers' hands", f.queue, n(r.depth), n(r.reserved)),
            format!(
                "workers          {} desired, {} running, {} ready, {} stopping",
                r.desired, r.running, r.ready, r.stopping
            ),
            format!("tasks            {tasks}{rate}"),
            format!("load             {}", f.load),
            format!("last sync        {sync1}"),
            format!("                 {sync2}"),
            "recent events".to_owned(),
        ];
        lines.extend(self.recent.iter().map(|e| format!("  {e}")));
        lines.resize(9 + RECENT, String::new());
        lines.push(String::new());
        lines.push("Ctrl-C stops: workers finish or return their tasks; nothing is lost.".to_owned());
        let mut out = std::io::stdout().lock();
        let mut text = String::new();
        if self.drawn > 0 {
            text.push_str(&format!("\x1b[{}A", self.drawn));
        }
        for line in &lines {
            // Clear the old line; cut to the width so nothing wraps and the height stays fixed.
            text.push_str("\x1b[2K");
            text.extend(line.chars().take(width.saturating_sub(1)));
            text.push('\n');
        }
        // Anything below (a stray log line) goes too.
        text.push_str("\x1b[J");
        if out.write_all(text.as_bytes()).and_then(|()| out.flush()).is_err() {
            super::mark_stdout_gone();
        }
        self.drawn = lines.len();
    }
}

/// `text` as two lines of at most `width` characters, broken at a space when there is one.
fn split_at_width(text: &str, width: usize) -> (String, String) {
    let width = width.max(10);
    if text.chars().count() <= width {
        return (text.to_owned(), String::new());
    }
    let head: String = text.chars().take(width).collect();
    let cut = head.rfind(' ').filter(|&i| i > width / 2).unwrap_or(head.len());
    (text[..cut].to_owned(), text[cut..].trim_start().to_owned())
}

fn terminal_width() -> usize {
    // A pseudo-terminal may report 0 columns: unknown, not narrow.
    match rustix::termios::tcgetwinsize(std::io::stdout()) {
        Ok(w) if w.ws_col > 0 => usize::from(w.ws_col).max(40),
        _ => 100,
    }
}

/// "1 worker", "3 workers".
pub(super) fn workers(n: i32) -> String {
    if n == 1 { "1 worker".to_owned() } else { format!("{n} workers") }
}

/// Why the rate limits or min/max changed the stabilized count, in words, with the HPA's own
/// reason name (the ScalingLimited condition; AbleToScale is no guide: a rescale overwrites it
/// with SucceededRescale).
fn limit(c: &Condition) -> Option<String> {
    let words = match c.reason {
        Reason::ScaleUpLimit => "limited by the scale-up policy",
        Reason::ScaleDownLimit => "limited by the scale-down policy",
        Reason::TooManyReplicas => "capped at maxReplicas",
        Reason::TooFewReplicas => "raised to minReplicas",
        _ => return None,
    };
    c.status.then(|| format!("{words} ({})", c.reason))
}

/// A decision in one line: what the metric proposes, what the stabilization window made of it,
/// and what limited it.
pub(super) fn explain(d: &Decision, target_per_pod: Option<f64>) -> String {
    let mut parts = Vec::new();
    if let (Some(m), Some(t)) = (d.metrics.first(), target_per_pod) {
        match (m.total_milli, m.proposal) {
            (Some(total), Some(p)) => parts.push(format!("{} waiting / {t} per worker → {}", total / 1000, workers(p))),
            _ => parts.push(format!("metric unavailable: {}", m.error.as_deref().unwrap_or("no reading"))),
        }
    }
    if d.condition(ConditionType::ScalingActive).is_some_and(|c| c.reason == Reason::FailedGetExternalMetric) {
        parts.push(format!("no change without a metric ({})", Reason::FailedGetExternalMetric));
    }
    if let (Some(proposed), Some(stabilized)) = (d.metric_replicas, d.stabilized_replicas)
        && proposed != stabilized
    {
        let (window, reason) = if stabilized > proposed {
            ("scale-down", Reason::ScaleDownStabilized)
        } else {
            ("scale-up", Reason::ScaleUpStabilized)
        };
        parts.push(format!("held at {stabilized} by the {window} stabilization window ({reason})"));
    }
    if let Some(text) = d.condition(ConditionType::ScalingLimited).and_then(limit) {
        parts.push(text);
    }
    parts.push(format!("→ {}", workers(d.replicas)));
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_long_reason_is_split_into_two_lines_at_a_space() {
        let reason = "t=45s: 37 waiting / 10 per worker → 4 workers; limited by the scale-up policy (ScaleUpLimit)";
        let (a, b) = super::split_at_width(reason, 62);
        assert!(a.chars().count() <= 62 && !a.ends_with(' '), "{a:?}");
        assert_eq!(format!("{a} {b}"), reason);
        assert_eq!(super::split_at_width("short", 62), ("short".to_owned(), String::new()));
        let (a, _) = super::split_at_width("ééééééééééééééééééééééééé", 12);
        assert_eq!(a.chars().count(), 12, "cut on a character, not a byte");
    }

    use super::*;
    use crate::autoscale::hpa::{self, Autoscaler, MetricReading, Observation, Timestamp};

    fn project_hpa() -> Autoscaler {
        Autoscaler::new(hpa::parse_hpa_manifest(super::super::PROJECT_HPA, None).unwrap())
    }

    #[test]
    fn a_limited_scale_up_says_which_policy_held_it() {
        let mut a = project_hpa();
        let d =
            a.sync(Timestamp::from_secs_f64(0.0), &Observation::settled(1, vec![MetricReading::total(Some(400_000))]));
        assert_eq!(
            explain(&d, Some(10.0)),
            "400 waiting / 10 per worker → 40 workers; limited by the scale-up policy (ScaleUpLimit); → 3 workers"
        );
    }

    #[test]
    fn an_idle_queue_keeps_one_worker_in_the_singular() {
        let mut a = project_hpa();
        let d = a.sync(Timestamp::from_secs_f64(0.0), &Observation::settled(1, vec![MetricReading::total(Some(0))]));
        let text = explain(&d, Some(10.0));
        assert!(text.ends_with("→ 1 worker"), "{text}");
        assert!(!text.contains("1 workers"), "{text}");
    }

    #[test]
    fn a_scale_down_held_by_the_window_says_so() {
        let mut a = project_hpa();
        let busy = |r| Observation::settled(r, vec![MetricReading::total(Some(400_000))]);
        let idle = |r| Observation::settled(r, vec![MetricReading::total(Some(0))]);
        let d = a.sync(Timestamp::from_secs_f64(0.0), &busy(1));
        let d = a.sync(Timestamp::from_secs_f64(15.0), &busy(d.replicas));
        assert_eq!(d.replicas, 9);
        // The queue is empty, but the last 60 s recommended 40: the window keeps 9.
        let d = a.sync(Timestamp::from_secs_f64(30.0), &idle(9));
        assert_eq!(
            explain(&d, Some(10.0)),
            "0 waiting / 10 per worker → 0 workers; held at 9 by the scale-down stabilization window (ScaleDownStabilized); → 9 workers"
        );
    }

    #[test]
    fn a_missing_metric_is_said_and_changes_nothing() {
        let mut a = project_hpa();
        let d = a.sync(Timestamp::from_secs_f64(0.0), &Observation::settled(2, vec![MetricReading::total(None)]));
        let text = explain(&d, Some(10.0));
        assert!(text.contains("metric unavailable") && text.ends_with("→ 2 workers"), "{text}");
    }
}
