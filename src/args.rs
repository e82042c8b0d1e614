//! Command-line value parsers shared by the subcommands, so every duration flag rejects bad
//! input with the same message.

/// A finite number of seconds > 0.
pub fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

/// A finite number of seconds ≥ 0.
pub fn non_negative_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds ≥ 0")),
    }
}

/// Why a long-running role (worker, exporter) could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Connect(#[from] crate::connection::ConnectError),
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    #[error("--queues is empty; name at least one queue (default: celery)")]
    NoQueues,
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(positive_seconds("1.5"), Ok(1.5));
        assert!(positive_seconds("0").is_err());
        assert!(positive_seconds("inf").is_err());
        assert!(positive_seconds("soon").unwrap_err().contains("\"soon\""));
        assert_eq!(non_negative_seconds("0"), Ok(0.0));
        assert!(non_negative_seconds("-1").is_err());
    }
}
