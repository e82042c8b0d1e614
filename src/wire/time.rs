//! Timestamps in Celery headers and results.
//!
//! Celery parses `eta`/`expires` with dateutil's `isoparse`: an offset (`Z`, `+05:30`, `+0530`,
//! `+05`) or none at all — a naive time is in the app's timezone, UTC by default — and any
//! number of fractional digits. Results carry `date_done` as Python's `isoformat()` writes it.

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, SecondsFormat, TimeZone, Timelike, Utc};

/// Parse an ISO-8601 timestamp the way Celery's consumer does; naive means UTC.
pub fn parse_iso8601(s: &str) -> Result<DateTime<Utc>, String> {
    let s = s.trim();
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Ok(dt.with_timezone(&Utc));
    }
    let (body, offset) = split_offset(s)?;
    let naive = parse_naive(body).ok_or_else(|| format!("{s:?} is not an ISO-8601 date-time"))?;
    match offset {
        None => Ok(Utc.from_utc_datetime(&naive)),
        Some(off) => off
            .from_local_datetime(&naive)
            .single()
            .map(|dt| dt.with_timezone(&Utc))
            .ok_or_else(|| format!("{s:?} is not a valid local time")),
    }
}

fn parse_naive(s: &str) -> Option<NaiveDateTime> {
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M"] {
        if let Ok(dt) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(dt);
        }
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d").ok().and_then(|d| d.and_hms_opt(0, 0, 0))
}

/// Split a trailing `Z` / `±HH[:MM]` / `±HHMM` offset off a timestamp.
fn split_offset(s: &str) -> Result<(&str, Option<FixedOffset>), String> {
    if let Some(body) = s.strip_suffix('Z').or_else(|| s.strip_suffix('z')) {
        return Ok((body, FixedOffset::east_opt(0)));
    }
    // The offset sign can only appear after the time part ('T' or ' ' separator).
    let Some(time_start) = s.find(['T', ' ']) else { return Ok((s, None)) };
    let Some(rel) = s[time_start..].rfind(['+', '-']) else { return Ok((s, None)) };
    let pos = time_start + rel;
    let (body, off) = s.split_at(pos);
    let sign = if off.starts_with('-') { -1 } else { 1 };
    let digits: String = off[1..].chars().filter(|c| *c != ':').collect();
    let bad = || format!("{s:?} has an unreadable UTC offset {off:?}");
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let (h, m) = match digits.len() {
        2 => (digits.parse::<i32>().map_err(|_| bad())?, 0),
        4 => (digits[..2].parse::<i32>().map_err(|_| bad())?, digits[2..].parse::<i32>().map_err(|_| bad())?),
        _ => return Err(bad()),
    };
    let off = FixedOffset::east_opt(sign * (h * 3600 + m * 60)).ok_or_else(bad)?;
    Ok((body, Some(off)))
}

/// Python's `datetime.now(timezone.utc).isoformat()`: microseconds unless they are zero, `+00:00`.
pub fn python_isoformat(dt: DateTime<Utc>) -> String {
    if dt.nanosecond() / 1000 == 0 {
        dt.format("%Y-%m-%dT%H:%M:%S+00:00").to_string()
    } else {
        dt.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
    }
}

/// RFC 3339 with microseconds, for logs.
pub fn rfc3339(dt: DateTime<Utc>) -> String {
    dt.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Unix time as a float, the score kombu writes into `unacked_index`.
pub fn unix_seconds(dt: DateTime<Utc>) -> f64 {
    dt.timestamp() as f64 + f64::from(dt.timestamp_subsec_nanos()) / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> i64 {
        parse_iso8601(s).unwrap().timestamp_micros()
    }

    #[test]
    fn celery_header_forms() {
        let utc = ts("2030-01-02T03:04:05+00:00");
        assert_eq!(ts("2030-01-02T03:04:05"), utc, "naive is UTC (p06)");
        assert_eq!(ts("2030-01-02T03:04:05Z"), utc);
        assert_eq!(ts("2030-01-02T08:34:05+05:30"), utc, "p07 offset");
        assert_eq!(ts("2030-01-02T08:34:05+0530"), utc);
        assert_eq!(ts("2030-01-02T08:34:05+05"), utc + 1800 * 1_000_000);
        assert_eq!(ts("2030-01-01T22:04:05-05:00"), utc);
        assert_eq!(ts("2030-01-02 03:04:05"), utc);
        assert_eq!(ts("2030-01-02T03:04:05.678901+00:00") - utc, 678_901, "p05 micros");
        assert_eq!(ts("2030-01-02T03:04:05.678901234Z") - utc, 678_901, "nanoseconds accepted");
        assert_eq!(ts("2030-01-02T03:04:05.5") - utc, 500_000);
        assert_eq!(ts("2030-01-02"), ts("2030-01-02T00:00:00"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in
            ["", "tomorrow", "2030-13-02T00:00:00", "2030-01-02T03:04:05+5:3x", "2030-01-02T03:04:05+99:00", "-", "T+"]
        {
            assert!(parse_iso8601(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn isoformat_like_python() {
        let dt = parse_iso8601("2026-11-28T03:14:02.633617+00:00").unwrap();
        assert_eq!(python_isoformat(dt), "2026-11-28T03:14:02.633617+00:00");
        let whole = parse_iso8601("2026-11-28T03:14:02+00:00").unwrap();
        assert_eq!(python_isoformat(whole), "2026-11-28T03:14:02+00:00");
    }
}
