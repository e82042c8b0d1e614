//! The small HTTP surface every long-running role serves: `/metrics` for Prometheus,
//! `/healthz` for liveness and `/readyz` for readiness.
//!
//! Bounded, because `axum::serve` alone keeps idle, half-sent-header and keep-alive
//! connections open forever: a few hundred of them used up the process's file descriptors and
//! starved both the probes and the Redis reconnects. Here each connection must send a complete
//! request header within [`HEADER_TIMEOUT`] — which also closes a keep-alive connection idle
//! that long — and at most [`MAX_CONNECTIONS`] are open at once. A connection beyond the limit
//! closes the *oldest* one, so a flood of idle sockets cannot lock a probe out: the newest
//! connection (the probe's) is served, the stalest is dropped.

use crate::runtime::sync::Locked;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::{AbortHandle, JoinSet};

/// Connections served at once; one more closes the oldest.
pub const MAX_CONNECTIONS: usize = 64;
/// Time allowed for a request header, and for a keep-alive connection to stay idle.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

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
    let server = serve(listener, app, Limits::default(), shutdown);
    Ok((local, server))
}

/// The bounds the accept loop applies.
#[derive(Clone, Copy, Debug)]
struct Limits {
    max_connections: usize,
    header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_connections: MAX_CONNECTIONS, header_timeout: HEADER_TIMEOUT }
    }
}

/// The open connections, oldest first, so one over the limit can close the oldest.
#[derive(Default)]
struct Open {
    next_id: u64,
    conns: VecDeque<(u64, AbortHandle)>,
}

/// Accept until `shutdown`, each connection under `limits`; then close them all.
async fn serve<S>(listener: tokio::net::TcpListener, app: Router, limits: Limits, shutdown: S) -> std::io::Result<()>
where
    S: Future<Output = ()> + Send + 'static,
{
    let open = Arc::new(Mutex::new(Open::default()));
    let mut tasks = JoinSet::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
    tokio::pin!(shutdown);
    let mut accept_failing = false;
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or similar: a pause, not the end of the server. Said
                    // once per episode, not ten times a second.
                    if !std::mem::replace(&mut accept_failing, true) {
                        tracing::warn!(error = %e, "HTTP accept failed; retrying every 100 ms");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if std::mem::take(&mut accept_failing) {
            tracing::info!("HTTP accept works again");
        }
        while tasks.try_join_next().is_some() {}
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let mut guard = open.locked();
        let id = guard.next_id;
        guard.next_id += 1;
        let forget = Forget { open: open.clone(), id };
        let handle = tasks.spawn(async move {
            let _forget = forget;
            // Errors here are the client's (reset, timeout, malformed request): nothing to report.
            let _ = conn.await;
        });
        guard.conns.push_back((id, handle));
        while guard.conns.len() > limits.max_connections {
            if let Some((_, oldest)) = guard.conns.pop_front() {
                oldest.abort();
            }
        }
    }
    tasks.shutdown().await;
    Ok(())
}

/// Removes a finished connection from [`Open`].
struct Forget {
    open: Arc<Mutex<Open>>,
    id: u64,
}

impl Drop for Forget {
    fn drop(&mut self) {
        let mut open = self.open.locked();
        if let Some(i) = open.conns.iter().position(|(id, _)| *id == self.id) {
            open.conns.remove(i);
        }
    }
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
