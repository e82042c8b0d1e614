//! The small HTTP surface every long-running role serves: `/metrics` for Prometheus,
//! `/healthz` for liveness and `/readyz` for readiness.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

/// Answers `/readyz`: `Ok(())` when ready, `Err(reason)` otherwise.
pub type ReadyCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
struct AppState {
    registry: Registry,
    ready: ReadyCheck,
    before_scrape: Arc<dyn Fn() + Send + Sync>,
}

/// Errors a user can cause with the listen address.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    // The cause is part of the sentence, not a `source`: a printed chain says it once.
    #[error("cannot listen on {setting} {addr}: {cause} (pick a free port, or 127.0.0.1:0 for any)")]
    Bind { setting: &'static str, addr: String, cause: std::io::Error },
}

/// Bind `addr` now (so a bad address fails at startup with a clear error) and serve until
/// `shutdown` resolves. Returns the bound address and the server future to spawn.
pub async fn bind<S>(
    setting: &'static str,
    addr: &str,
    registry: Registry,
    ready: ReadyCheck,
    before_scrape: Arc<dyn Fn() + Send + Sync>,
    shutdown: S,
) -> Result<(SocketAddr, impl Future<Output = std::io::Result<()>> + use<S>), HttpError>
where
    S: Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|cause| HttpError::Bind {
        setting,
        addr: addr.to_owned(),
        cause,
    })?;
    let local = listener.local_addr().map_err(|cause| HttpError::Bind { setting, addr: addr.to_owned(), cause })?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { registry, ready, before_scrape });
    let server = async move { axum::serve(listener, app).with_graceful_shutdown(shutdown).await };
    Ok((local, server))
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (s.before_scrape)();
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&s.registry.gather(), &mut buf) {
        Ok(()) => (StatusCode::OK, [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], buf).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics failed: {e}\n")).into_response(),
    }
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    match (s.ready)() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
    }
}
