//! Reading a Prometheus endpoint on loopback: a minimal HTTP/1.1 GET and a reader of samples in
//! the text exposition format.
//!
//! `local` reads its exporter and its workers with it, and the integration tests read the
//! worker, the exporter and Prometheus with it. The servers are our own axum endpoints (and
//! Prometheus' API), which answer these small bodies with a `Content-Length`, never chunked, so
//! reading to the end of a `Connection: close` response is all the HTTP needed.

use std::time::Duration;

/// The request line and headers of a `GET path` on loopback.
fn request(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
}

/// `(status, body)` of a whole HTTP/1.1 response; `None` when it is not one.
pub fn parse_response(raw: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let status = text.strip_prefix("HTTP/1.")?.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

/// GET `path` from `127.0.0.1:port`: `(status, body)`, or `None` when nothing answered in time.
pub async fn get(port: u16, path: &str, timeout: Duration) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(request(path).as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        parse_response(&buf)
    };
    tokio::time::timeout(timeout, io).await.ok().flatten()
}

/// The blocking twin of [`get`], for callers without a runtime (the tests).
pub fn get_blocking(port: u16, path: &str, timeout: Duration) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.write_all(request(path).as_bytes()).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    parse_response(&buf)
}

/// The body of `/metrics` on `127.0.0.1:port` when it answers 200 within two seconds.
pub async fn metrics(port: u16) -> Option<String> {
    get(port, "/metrics", Duration::from_secs(2)).await.filter(|(s, _)| *s == 200).map(|(_, b)| b)
}

/// The value of `name` over the series whose labels contain `labels` (e.g. `queue="celery"`;
/// empty: every series), summed; `None` when no such series is exposed. `name` must match the
/// whole metric name: `celery_queue_depth` does not pick up `celery_queue_depth_x`.
pub fn sample(exposition: &str, name: &str, labels: &str) -> Option<f64> {
    let mut found = None;
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let rest = match line.strip_prefix(name) {
            Some(r) if r.starts_with('{') || r.starts_with(' ') => r,
            _ => continue,
        };
        if !labels.is_empty() && !rest.contains(labels) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_read_from_the_exposition() {
        let text = "# HELP x\ncelery_queue_depth{queue=\"celery\"} 12\ncelery_queue_depth{queue=\"other\"} 3\ncelery_queue_depth_x 9\n";
        assert_eq!(sample(text, "celery_queue_depth", "queue=\"celery\""), Some(12.0));
        assert_eq!(sample(text, "celery_queue_depth", ""), Some(15.0));
        assert_eq!(sample(text, "celery_queue_depth", "queue=\"none\""), None);
        assert_eq!(sample(text, "celery_queue_depth_x", ""), Some(9.0));
    }

    #[test]
    fn responses_are_split_into_status_and_body() {
        assert_eq!(
            parse_response(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 5\r\n\r\nnope\n"),
            Some((503, "nope\n".to_owned()))
        );
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\n\r\n"), Some((200, String::new())));
        assert_eq!(parse_response(b"garbage"), None);
        assert_eq!(parse_response(b""), None);
    }
}
