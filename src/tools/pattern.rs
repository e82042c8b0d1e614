//! Arrival patterns shared by the load generator and the simulator: how many tasks should have
//! been sent by time `t`.
//!
//! Written as `kind:parameters` on the command line — `burst:400`, `ramp:FROM:TO:SECONDS`,
//! `oscillate:MEAN:AMPLITUDE:PERIOD:SECONDS` — rates in tasks per second.
//!
//! An oscillation whose amplitude exceeds its mean would ask for a negative rate; the rate is
//! clamped at zero and [`LoadPattern::cumulative`] integrates the clamped rate exactly (the
//! troughs send nothing), so the count stays monotone and matches what a sender pacing itself
//! by the rate would send.

use crate::runtime::args;
use std::f64::consts::TAU;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A task arrival pattern.
#[derive(Debug, Clone, PartialEq)]
pub enum LoadPattern {
    /// `n` tasks at once, at t = 0.
    Burst { n: u64 },
    /// Rate changing linearly from `from_rate` to `to_rate` over `duration`.
    Ramp { from_rate: f64, to_rate: f64, duration: Duration },
    /// Rate `mean_rate + amplitude·sin(2πt/period)`, clamped at 0, for `duration`.
    Oscillate { mean_rate: f64, amplitude: f64, period: Duration, duration: Duration },
}

/// A pattern string that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid load pattern {input:?}: {problem}; expected {expected}")]
pub struct PatternError {
    input: String,
    problem: String,
    expected: &'static str,
}

const FORMS: &str =
    "\"burst:N\", \"ramp:FROM_RATE:TO_RATE:SECONDS\" or \"oscillate:MEAN_RATE:AMPLITUDE:PERIOD_SECONDS:SECONDS\"";

impl LoadPattern {
    /// Tasks that should have been sent by `t` (fractional; monotone in `t`). A burst is
    /// entirely sent at t = 0.
    pub fn cumulative(&self, t: Duration) -> f64 {
        match *self {
            LoadPattern::Burst { n } => n as f64,
            LoadPattern::Ramp { from_rate, to_rate, duration } => {
                let total = duration.as_secs_f64();
                if total == 0.0 {
                    return 0.0;
                }
                let t = t.as_secs_f64().min(total);
                from_rate * t + (to_rate - from_rate) * t * t / (2.0 * total)
            }
            LoadPattern::Oscillate { mean_rate, amplitude, period, duration } => {
                let t = t.min(duration).as_secs_f64();
                oscillation_integral(mean_rate, amplitude, period.as_secs_f64(), t)
            }
        }
    }

    /// How long tasks keep arriving; zero for a burst.
    pub fn duration(&self) -> Duration {
        match *self {
            LoadPattern::Burst { .. } => Duration::ZERO,
            LoadPattern::Ramp { duration, .. } | LoadPattern::Oscillate { duration, .. } => duration,
        }
    }

    /// Total number of tasks: `round(cumulative(duration))`.
    pub fn total(&self) -> u64 {
        self.cumulative(self.duration()).round() as u64
    }
}

/// ∫₀ᵗ max(0, mean + amplitude·sin(2πs/period)) ds.
fn oscillation_integral(mean: f64, amplitude: f64, period: f64, t: f64) -> f64 {
    if amplitude <= mean {
        // Never negative: the plain integral.
        return mean * t + amplitude * period / TAU * (1.0 - (TAU * t / period).cos());
    }
    // In phase θ the rate is negative on (π+α, 2π−α) with α = asin(mean/amplitude).
    let alpha = (mean / amplitude).asin();
    let (negative_from, negative_to) = (std::f64::consts::PI + alpha, TAU - alpha);
    let antiderivative = |theta: f64| mean * theta - amplitude * theta.cos();
    let within_period = |theta: f64| {
        let positive = |to: f64| antiderivative(to) - antiderivative(0.0);
        if theta <= negative_from {
            positive(theta)
        } else if theta <= negative_to {
            positive(negative_from)
        } else {
            positive(negative_from) + antiderivative(theta) - antiderivative(negative_to)
        }
    };
    let phase = TAU * t / period;
    let whole_periods = (phase / TAU).floor();
    let in_period = phase - whole_periods * TAU;
    period / TAU * (whole_periods * within_period(TAU) + within_period(in_period))
}

/// The most tasks one pattern may send (a burst of 10⁹ takes hours to send and gigabytes of
/// Redis memory; anything above is a typo).
pub const MAX_TASKS: u64 = 1_000_000_000;

impl LoadPattern {
    /// `n` tasks at once; at most [`MAX_TASKS`].
    pub fn burst(n: u64) -> Result<Self, String> {
        LoadPattern::Burst { n }.checked()
    }

    /// A linear ramp; rates as [`args::check_rate`], a duration as [`args::non_negative_duration`].
    pub fn ramp(from_rate: f64, to_rate: f64, duration: Duration) -> Result<Self, String> {
        let from_rate = args::check_rate(from_rate).map_err(|p| format!("FROM_RATE {from_rate} {p}"))?;
        let to_rate = args::check_rate(to_rate).map_err(|p| format!("TO_RATE {to_rate} {p}"))?;
        LoadPattern::Ramp { from_rate, to_rate, duration }.checked()
    }

    /// An oscillation; the period must be greater than zero.
    pub fn oscillate(mean_rate: f64, amplitude: f64, period: Duration, duration: Duration) -> Result<Self, String> {
        let mean_rate = args::check_rate(mean_rate).map_err(|p| format!("MEAN_RATE {mean_rate} {p}"))?;
        let amplitude = args::check_rate(amplitude).map_err(|p| format!("AMPLITUDE {amplitude} {p}"))?;
        if period.is_zero() {
            return Err("PERIOD_SECONDS must be greater than 0".into());
        }
        LoadPattern::Oscillate { mean_rate, amplitude, period, duration }.checked()
    }

    /// The limits every pattern obeys, whoever built it: durations up to [`args::MAX_DURATION`],
    /// at most [`MAX_TASKS`] tasks in all (so `total()` and every count derived from it fit).
    fn checked(self) -> Result<Self, String> {
        if self.duration() > args::MAX_DURATION {
            return Err(format!("SECONDS is above the limit of {} s (30 days)", args::MAX_DURATION.as_secs()));
        }
        let total = self.cumulative(self.duration()).round();
        // NaN cannot arise (rates and durations are finite), but would be refused too.
        if total.is_nan() || total > MAX_TASKS as f64 {
            return Err(format!(
                "the pattern sends {total:.0} tasks in all, more than the limit of {MAX_TASKS}; lower the count, \
                 the rates or the duration"
            ));
        }
        Ok(self)
    }
}

impl FromStr for LoadPattern {
    type Err = PatternError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let error =
            |problem: String, expected: &'static str| PatternError { input: input.to_owned(), problem, expected };
        let mut parts = input.split(':');
        let kind = parts.next().unwrap_or_default();
        let fields: Vec<&str> = parts.collect();
        let expected = match kind {
            "burst" => "\"burst:N\" (N tasks at once, e.g. burst:400)",
            "ramp" => "\"ramp:FROM_RATE:TO_RATE:SECONDS\" (tasks/s, e.g. ramp:1:20:120)",
            "oscillate" => {
                "\"oscillate:MEAN_RATE:AMPLITUDE:PERIOD_SECONDS:SECONDS\" (tasks/s, e.g. oscillate:10:5:60:300)"
            }
            _ => return Err(error(format!("unknown kind {kind:?}"), FORMS)),
        };
        let arity = match kind {
            "burst" => 1,
            "ramp" => 3,
            _ => 4,
        };
        if fields.len() != arity {
            return Err(error(format!("{kind} takes {arity} value(s), got {}", fields.len()), expected));
        }
        let number = |i: usize, what: &str| -> Result<f64, PatternError> {
            fields[i].parse().map_err(|_| error(format!("{what} {:?} is not a number", fields[i]), expected))
        };
        let seconds = |i: usize, what: &str| -> Result<Duration, PatternError> {
            args::non_negative_duration(fields[i]).map_err(|problem| error(format!("{what} {problem}"), expected))
        };
        let built = match kind {
            "burst" => {
                let n = fields[0]
                    .parse()
                    .map_err(|_| error(format!("N {:?} is not a whole number", fields[0]), expected))?;
                LoadPattern::burst(n)
            }
            "ramp" => LoadPattern::ramp(number(0, "FROM_RATE")?, number(1, "TO_RATE")?, seconds(2, "SECONDS")?),
            _ => LoadPattern::oscillate(
                number(0, "MEAN_RATE")?,
                number(1, "AMPLITUDE")?,
                seconds(2, "PERIOD_SECONDS")?,
                seconds(3, "SECONDS")?,
            ),
        };
        built.map_err(|problem| error(problem, expected))
    }
}

impl fmt::Display for LoadPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadPattern::Burst { n } => write!(f, "burst:{n}"),
            LoadPattern::Ramp { from_rate, to_rate, duration } => {
                write!(f, "ramp:{from_rate}:{to_rate}:{}", duration.as_secs_f64())
            }
            LoadPattern::Oscillate { mean_rate, amplitude, period, duration } => {
                write!(f, "oscillate:{mean_rate}:{amplitude}:{}:{}", period.as_secs_f64(), duration.as_secs_f64())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn burst_is_all_at_zero() {
        let p: LoadPattern = "burst:400".parse().unwrap();
        assert_eq!(p, LoadPattern::Burst { n: 400 });
        assert_eq!(p.cumulative(Duration::ZERO), 400.0);
        assert_eq!(p.duration(), Duration::ZERO);
        assert_eq!(p.total(), 400);
    }

    #[test]
    fn ramp_integrates_linearly() {
        let p: LoadPattern = "ramp:0:10:100".parse().unwrap();
        assert_eq!(p.cumulative(secs(50.0)), 125.0);
        assert_eq!(p.cumulative(secs(100.0)), 500.0);
        assert_eq!(p.cumulative(secs(1000.0)), 500.0, "flat after the end");
        assert_eq!(p.total(), 500);
        let flat: LoadPattern = "ramp:2:2:30".parse().unwrap();
        assert_eq!(flat.total(), 60);
    }

    #[test]
    fn oscillate_integrates_whole_periods_to_the_mean() {
        let p: LoadPattern = "oscillate:10:5:60:300".parse().unwrap();
        assert!((p.cumulative(secs(60.0)) - 600.0).abs() < 1e-9);
        assert_eq!(p.total(), 3000);
        // First quarter: 10·15 + 5·60/2π.
        let quarter = 150.0 + 5.0 * 60.0 / TAU;
        assert!((p.cumulative(secs(15.0)) - quarter).abs() < 1e-9);
    }

    #[test]
    fn oscillate_with_amplitude_above_mean_clamps_the_rate_at_zero() {
        // mean 0: only the positive half-wave sends: 2·A·P/2π per period.
        let p: LoadPattern = "oscillate:0:10:60:120".parse().unwrap();
        let half_wave = 2.0 * 10.0 * 60.0 / TAU;
        assert!((p.cumulative(secs(30.0)) - half_wave).abs() < 1e-9);
        assert!((p.cumulative(secs(60.0)) - half_wave).abs() < 1e-9, "trough sends nothing");
        assert!((p.cumulative(secs(120.0)) - 2.0 * half_wave).abs() < 1e-9);
        // mean 5, amplitude 10: per period ∫ max(0, ·) exceeds mean·P.
        let q: LoadPattern = "oscillate:5:10:60:60".parse().unwrap();
        assert!(q.cumulative(secs(60.0)) > 300.0);
    }

    #[test]
    fn errors_name_the_expected_form() {
        for (input, hint) in [
            ("", "burst:N"),
            ("storm:3", "burst:N"),
            ("burst", "burst:N"),
            ("burst:-1", "burst:N"),
            ("burst:1.5", "burst:N"),
            ("ramp:1:2", "ramp:FROM_RATE:TO_RATE:SECONDS"),
            ("ramp:1:x:3", "ramp:FROM_RATE"),
            ("ramp:1:2:-3", "ramp:FROM_RATE"),
            ("ramp:1:inf:3", "ramp:FROM_RATE"),
            ("oscillate:1:2:0:10", "oscillate:MEAN_RATE"),
            ("oscillate:1:2:3", "oscillate:MEAN_RATE"),
        ] {
            let err = input.parse::<LoadPattern>().unwrap_err().to_string();
            assert!(err.contains(hint), "{input:?}: {err}");
        }
    }

    fn pattern() -> impl Strategy<Value = LoadPattern> {
        prop_oneof![
            (0u64..5000).prop_map(|n| LoadPattern::Burst { n }),
            (0.0..50.0f64, 0.0..50.0f64, 0u64..600_000).prop_map(|(a, b, ms)| LoadPattern::Ramp {
                from_rate: a,
                to_rate: b,
                duration: Duration::from_millis(ms),
            }),
            (0.0..50.0f64, 0.0..80.0f64, 1u64..120_000, 0u64..600_000).prop_map(|(m, a, p, d)| {
                LoadPattern::Oscillate {
                    mean_rate: m,
                    amplitude: a,
                    period: Duration::from_millis(p),
                    duration: Duration::from_millis(d),
                }
            }),
        ]
    }

    #[test]
    fn absurd_patterns_are_refused() {
        for (input, phrase) in [
            ("burst:18446744073709551615", "limit of 1000000000"),
            ("ramp:1e15:1e15:1e6", "FROM_RATE"),
            ("ramp:1e5:1e5:1e6", "limit of 1000000000"),
            ("ramp:1:1:1e300", "SECONDS"),
            ("ramp:NaN:1:10", "FROM_RATE"),
            ("oscillate:1:1:inf:10", "PERIOD_SECONDS"),
            ("oscillate:1:1:0:10", "PERIOD_SECONDS must be greater than 0"),
        ] {
            let err = input.parse::<LoadPattern>().unwrap_err().to_string();
            assert!(err.contains(phrase), "{input:?}: {err}");
        }
        assert_eq!(LoadPattern::burst(MAX_TASKS).unwrap().total(), MAX_TASKS);
    }

    proptest! {
        // Any text: parsed or refused, never a panic; what is accepted is bounded, so every user
        // (loadgen's sender, the closed loop, the display) can use it.
        #[test]
        fn any_pattern_text_is_usable_or_refused(
            s in "(burst|ramp|oscillate|storm)(:([-+]?[0-9.eE]{1,8}|NaN|inf|-inf|18446744073709551616)){0,5}|\\PC{0,20}"
        ) {
            if let Ok(p) = s.parse::<LoadPattern>() {
                prop_assert!(p.duration() <= args::MAX_DURATION);
                prop_assert!(p.total() <= MAX_TASKS);
                let c = p.cumulative(p.duration());
                prop_assert!(c.is_finite() && c >= 0.0);
                prop_assert!(p.to_string().parse::<LoadPattern>().is_ok());
            }
        }

        #[test]
        fn cumulative_is_monotone_and_ends_at_total(p in pattern(), steps in 1usize..200) {
            let end = p.duration();
            let mut previous = 0.0;
            for i in 0..=steps {
                let t = end.mul_f64(i as f64 / steps as f64);
                let c = p.cumulative(t);
                prop_assert!(c >= previous - 1e-9, "{p}: {c} < {previous} at {t:?}");
                prop_assert!(c >= -1e-9);
                previous = c;
            }
            prop_assert_eq!(p.cumulative(end + Duration::from_secs(10)), p.cumulative(end));
            prop_assert_eq!(p.total(), p.cumulative(end).round() as u64);
        }

        #[test]
        fn display_round_trips(p in pattern()) {
            let text = p.to_string();
            let parsed: LoadPattern = text.parse().unwrap();
            prop_assert_eq!(&parsed, &p, "{}", text);
            prop_assert_eq!(parsed.to_string(), text);
        }
    }
}
