//! Redis connections shared by every role (worker, exporter, loadgen, local): connecting
//! lazily (so a process can start and report not-ready while Redis is away), over TCP, TLS or a
//! unix socket or through Sentinel (URLs parsed in [`crate::transport::redis_url`]); reconnecting by
//! itself, re-asking the sentinels after an error so a failover is followed; retrying with
//! backoff through outages and saying so with the redacted URL and a hint.

use crate::runtime::sync::Locked;
use crate::transport::redis_url::{self, RedisUrl, SentinelUrl, TlsOptions};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

pub use crate::transport::redis_url::redact as redact_url;

/// Default broker URL (the README's configuration table).
pub const DEFAULT_BROKER_URL: &str = "redis://127.0.0.1:6379/0";
/// Default result backend URL (the README's configuration table).
pub const DEFAULT_BACKEND_URL: &str = "redis://127.0.0.1:6379/1";

/// How long to wait for a TCP/TLS connect (per node, sentinels included).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors a user can cause with a connection setting.
/// The reason is part of the message and deliberately not a `source`, so a printed error chain
/// says it once.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{setting}={url} is not usable: {error}")]
    BadUrl { setting: &'static str, url: String, error: redis_url::UrlError },
    #[error("{setting}={url} is not usable: {error}")]
    Client { setting: &'static str, url: String, error: RedisError },
}

/// Whether the last Redis operation worked (for `/readyz` and the `redis_connected` gauge).
/// Starts unknown: a connection not used yet is neither up nor down.
#[derive(Debug)]
pub struct Health {
    state: AtomicU8,
    what: &'static str,
    /// The setting and its redacted URL, for the outage warning's hint.
    setting: &'static str,
    url: String,
    /// When the current outage was last reported (warnings repeat every [`REPEAT_WARNING`]).
    last_warning: std::sync::Mutex<Option<Instant>>,
    repeat: Duration,
}

/// While Redis stays down, the warning is repeated this often (not on every retry).
pub const REPEAT_WARNING: Duration = Duration::from_secs(30);

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

impl Health {
    /// `what` names the role of the connection ("broker"); `setting`/`url` where it points.
    pub fn new(what: &'static str, setting: &'static str, url: &str) -> Arc<Self> {
        Arc::new(Health {
            state: AtomicU8::new(UNKNOWN),
            what,
            setting,
            url: redact_url(url),
            last_warning: std::sync::Mutex::new(None),
            repeat: REPEAT_WARNING,
        })
    }

    pub fn is_connected(&self) -> bool {
        self.state.load(Ordering::Relaxed) == UP
    }

    /// Failed last time it was used.
    pub fn is_down(&self) -> bool {
        self.state.load(Ordering::Relaxed) == DOWN
    }

    pub fn set_connected(&self) {
        if self.state.swap(UP, Ordering::Relaxed) == DOWN {
            tracing::info!(redis = self.what, url = %self.url, "Redis is reachable again");
        }
    }

    /// Returns true when this call began an outage (so the caller logs once per outage).
    pub fn set_disconnected(&self) -> bool {
        self.state.swap(DOWN, Ordering::Relaxed) != DOWN
    }

    /// Mark the connection down after `e` (while trying to `what`) and warn — with the redacted
    /// URL and a hint — when the outage begins and every [`REPEAT_WARNING`] while it lasts.
    /// Returns whether it warned.
    pub fn report_failure(&self, e: &RedisError, what: &str) -> bool {
        let began = self.set_disconnected();
        let mut last = self.last_warning.locked();
        let warn = began || last.is_none_or(|t| t.elapsed() >= self.repeat);
        if warn {
            *last = Some(Instant::now());
            let error = explain(e, self.setting, &self.url);
            tracing::warn!(redis = self.what, url = %self.url, %error, "cannot {what}; retrying with backoff, nothing is dropped");
        }
        warn
    }
}

/// What to tell a user about a Redis error: the error plus the likely fix, naming the setting
/// and its (redacted) URL.
pub fn explain(e: &RedisError, setting: &str, redacted_url: &str) -> String {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    if e.kind() == redis::ErrorKind::AuthenticationFailed || matches!(e.code(), Some("NOAUTH" | "WRONGPASS")) {
        format!("{text} — check the password in {setting}={redacted_url}")
    } else if classify(e) == Failure::Permanent {
        format!(
            "{text} — the Redis user in {setting}={redacted_url} lacks a permission this program needs: grant it (README: Redis ACLs) and start again"
        )
    } else if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
        format!(
            "{text} — TLS to {redacted_url} failed: check ssl_ca_certs (the CA that signed the server's certificate), ssl_certfile/ssl_keyfile, or ssl_cert_reqs in {setting}"
        )
    } else if e.kind() == redis::ErrorKind::MasterNameNotFoundBySentinel {
        format!("{text} — check --sentinel-master (SENTINEL_MASTER) and the sentinels in {setting}={redacted_url}")
    } else if e.is_io_error() || e.is_connection_refusal() || e.is_timeout() {
        format!("{text} — is Redis running at {redacted_url}? check {setting}")
    } else {
        text
    }
}

/// A connection that reconnects by itself, lazily (so a process can start and report not-ready
/// while Redis is away). After a connection error the next command connects anew — and for
/// `sentinel://` asks the sentinels again, so it follows a failover. Cheap to clone; clones
/// share one underlying multiplexed connection.
#[derive(Clone)]
pub struct Conn {
    inner: Arc<Inner>,
    db: i64,
}

struct Inner {
    target: Target,
    config: AsyncConnectionConfig,
    /// The live connection and its generation (so a failure on an old one does not drop a new
    /// one). A plain mutex: held only to clone or swap, never across an await.
    current: std::sync::Mutex<(u64, Option<MultiplexedConnection>)>,
    /// Serialises reconnects, so a burst of failing callers opens one connection, not many.
    connecting: tokio::sync::Mutex<()>,
}

enum Target {
    Direct(Client),
    Sentinel { url: SentinelUrl, master: String, certs: Option<redis::TlsCertificates> },
}

/// Open a lazily connecting, self-reconnecting connection. `response_timeout` must exceed any
/// blocking command sent on it (BRPOP). `sentinel_master` is `--sentinel-master`, used by
/// `sentinel://` URLs only.
pub fn connect(
    setting: &'static str,
    url: &str,
    sentinel_master: Option<&str>,
    response_timeout: Duration,
) -> Result<Conn, ConnectError> {
    let redacted = || redact_url(url);
    let parsed = redis_url::parse(url, sentinel_master.filter(|m| !m.is_empty()))
        .map_err(|error| ConnectError::BadUrl { setting, url: redacted(), error })?;
    let url_err = |error| ConnectError::BadUrl { setting, url: redacted(), error };
    let client_err = |error| ConnectError::Client { setting, url: redacted(), error };
    let (target, db) = match parsed {
        RedisUrl::Direct { url, tls } => {
            let certs = tls.as_ref().map(certificates).transpose().map_err(url_err)?;
            let client = client(&url, tls.as_ref(), certs.as_ref()).map_err(client_err)?;
            let db = client.get_connection_info().redis_settings().db();
            (Target::Direct(client), db)
        }
        RedisUrl::Sentinel(s) => {
            let tls = s.tls.as_ref().or(s.sentinel_tls.as_ref());
            let certs = tls.map(certificates).transpose().map_err(url_err)?;
            // Check every URL we will build now, so a bad one fails at startup.
            for (host, port) in &s.sentinels {
                client(&s.node_url(host, *port, true), s.sentinel_tls.as_ref(), certs.as_ref()).map_err(client_err)?;
            }
            client(&s.node_url("127.0.0.1", 6379, false), s.tls.as_ref(), certs.as_ref()).map_err(client_err)?;
            let master = s.master_name.clone().unwrap_or_default();
            let db = s.db;
            (Target::Sentinel { url: s, master, certs }, db)
        }
    };
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(response_timeout));
    let inner =
        Inner { target, config, current: std::sync::Mutex::new((0, None)), connecting: tokio::sync::Mutex::new(()) };
    Ok(Conn { inner: Arc::new(inner), db })
}

/// rustls needs a process-wide crypto provider; ring is the one this crate builds with.
fn install_crypto_provider() {
    // Err means one is installed already, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Read the PEM files a TLS URL names (at startup, so a missing file is an immediate error).
fn certificates(tls: &TlsOptions) -> Result<redis::TlsCertificates, redis_url::UrlError> {
    install_crypto_provider();
    let read = |option: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| redis_url::UrlError::File {
            option,
            path: path.display().to_string(),
            error: e.to_string(),
        })
    };
    let root_cert = tls.ca_certs.as_deref().map(|p| read("ssl_ca_certs", p)).transpose()?;
    let client_tls = match &tls.client_cert {
        Some((cert, key)) => Some(redis::ClientTlsConfig {
            client_cert: read("ssl_certfile", cert)?,
            client_key: read("ssl_keyfile", key)?,
        }),
        None => None,
    };
    Ok(redis::TlsCertificates { client_tls, root_cert })
}

/// TCP settings of every connection: keepalive probes after 30 s of silence (then every 10 s),
/// and `TCP_USER_TIMEOUT` 30 s (data unacknowledged that long ends the connection), so the
/// kernel notices a peer that vanished (a dead node or NAT entry) even on a quiet connection.
/// Nagle stays as redis-rs leaves it. What the kernel cannot see (a proxy that accepts and
/// stops forwarding) the per-command response timeouts and the Pub/Sub health check catch.
fn tcp_settings() -> redis::io::tcp::TcpSettings {
    use redis::io::tcp::{TcpSettings, socket2::TcpKeepalive};
    let keepalive =
        TcpKeepalive::new().with_time(Duration::from_secs(30)).with_interval(Duration::from_secs(10)).with_retries(3);
    let settings = TcpSettings::default().set_keepalive(keepalive);
    #[cfg(target_os = "linux")]
    let settings = settings.set_user_timeout(Duration::from_secs(30));
    settings
}

fn client(url: &str, tls: Option<&TlsOptions>, certs: Option<&redis::TlsCertificates>) -> RedisResult<Client> {
    let client = match certs {
        Some(certs) => Client::build_with_tls(url, certs.clone())?,
        None => Client::open(url)?,
    };
    let info = client.get_connection_info().clone().set_tcp_settings(tcp_settings());
    match tls {
        Some(t) if t.verify && !t.check_hostname => {
            let mut addr = info.addr().clone();
            addr.set_danger_accept_invalid_hostnames(true);
            Client::open(info.set_addr(addr))
        }
        _ => Client::open(info),
    }
}

/// A timeout as a Redis error (a deadline of ours, not the client's).
pub fn timed_out(what: &str) -> RedisError {
    std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer from Redis in time ({what})")).into()
}

/// How long a command may wait for its reply before the connection is taken for dead and
/// reopened, given the health-check interval: the interval, at most 10 s (replies may queue
/// behind a busy Redis). A blocking command needs its block time on top.
pub fn response_timeout(health_check_interval: Duration) -> Duration {
    health_check_interval.min(Duration::from_secs(10))
}

/// Errors after which the connection (or, with Sentinel, the master it points at) is suspect.
fn needs_reconnect(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        // A demoted master answers writes with READONLY: ask the sentinels again.
        || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
}

impl Inner {
    fn current(&self) -> std::sync::MutexGuard<'_, (u64, Option<MultiplexedConnection>)> {
        self.current.locked()
    }

    fn live(&self) -> Option<(u64, MultiplexedConnection)> {
        let current = self.current();
        current.1.clone().map(|c| (current.0, c))
    }

    async fn get(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(live) = self.live() {
            return Ok(live);
        }
        let _connecting = self.connecting.lock().await;
        // Another caller may have connected while this one waited.
        if let Some(live) = self.live() {
            return Ok(live);
        }
        let conn = self.node_client().await?.get_multiplexed_async_connection_with_config(&self.config).await?;
        let mut current = self.current();
        current.0 += 1;
        current.1 = Some(conn.clone());
        Ok((current.0, conn))
    }

    fn invalidate(&self, generation: u64) {
        let mut current = self.current();
        if current.0 == generation {
            current.1 = None;
        }
    }

    /// Ask each sentinel in turn for the master's address and check that the node it names is
    /// a master (a sentinel can briefly name a demoted one during a failover); returns a client
    /// for that node.
    async fn master_client(
        &self,
        url: &SentinelUrl,
        master: &str,
        certs: Option<&redis::TlsCertificates>,
    ) -> RedisResult<Client> {
        let mut last_err = None;
        let sentinel_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(CONNECT_TIMEOUT));
        for (host, port) in &url.sentinels {
            let attempt = async {
                let sentinel = client(&url.node_url(host, *port, true), url.sentinel_tls.as_ref(), certs)?;
                let mut s = sentinel.get_multiplexed_async_connection_with_config(&sentinel_config).await?;
                let addr: Option<(String, u16)> =
                    redis::cmd("SENTINEL").arg("get-master-addr-by-name").arg(master).query_async(&mut s).await?;
                let Some((mhost, mport)) = addr else {
                    return Err(RedisError::from((
                        redis::ErrorKind::MasterNameNotFoundBySentinel,
                        "sentinel does not know the master",
                        format!("sentinel {host}:{port} knows no master named {master:?}"),
                    )));
                };
                let node = client(&url.node_url(&mhost, mport, false), url.tls.as_ref(), certs)?;
                let mut conn = node.get_multiplexed_async_connection_with_config(&sentinel_config).await?;
                let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
                match role.first() {
                    Some(Value::BulkString(r)) if r == b"master" => Ok(node),
                    _ => Err(RedisError::from((
                        redis::ErrorKind::Io,
                        "sentinel named a node that is not a master (failover in progress)",
                        format!("{mhost}:{mport}"),
                    ))),
                }
            };
            match attempt.await {
                Ok(node) => return Ok(node),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| RedisError::from((redis::ErrorKind::EmptySentinelList, "no sentinels"))))
    }

    /// A client for the node commands go to now: the URL's, or the master the sentinels name.
    async fn node_client(&self) -> RedisResult<Client> {
        match &self.target {
            Target::Direct(client) => Ok(client.clone()),
            Target::Sentinel { url, master, certs } => self.master_client(url, master, certs.as_ref()).await,
        }
    }
}

impl Conn {
    /// Let go of the live connection: the next command opens a new one. A connection keeps its
    /// read buffer at the size of the largest reply it ever received, so after a huge message
    /// this gives that memory back. Commands already under way finish on the old connection.
    pub fn reset(&self) {
        let mut current = self.inner.current();
        current.1 = None;
    }

    /// The database number commands run in (kombu names its fanout channels after it).
    pub fn db(&self) -> i64 {
        self.db
    }

    /// A new Pub/Sub connection to the same node, with the same TLS settings (for Sentinel, the
    /// current master). Pub/Sub ignores the database number.
    pub async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        let client = self.inner.node_client().await?;
        match tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub()).await {
            Ok(pubsub) => pubsub,
            Err(_) => Err(timed_out("connecting for Pub/Sub")),
        }
    }

    async fn run<T>(&self, op: impl AsyncFnOnce(&mut MultiplexedConnection) -> RedisResult<T>) -> RedisResult<T> {
        let (generation, mut conn) = self.inner.get().await?;
        let result = op(&mut conn).await;
        if let Err(e) = &result
            && needs_reconnect(e)
        {
            self.inner.invalidate(generation);
        }
        result
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move { self.run(async |c: &mut MultiplexedConnection| c.req_packed_command(cmd).await).await })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            self.run(async |c: &mut MultiplexedConnection| c.req_packed_commands(pipeline, offset, count).await).await
        })
    }

    fn get_db(&self) -> i64 {
        self.db
    }
}

/// Exponential backoff from 100 ms to 5 s, jittered: each delay is drawn from the upper half
/// of its step (`d/2 ..= d`), so a fleet that lost Redis together does not reconnect in lockstep.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Duration::from_millis(100) }
    }
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        d.mul_f64(rand::random_range(0.5..=1.0))
    }
}

/// What kind of failure a Redis error is, by its kind and server error code (never its text).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The connection failed or timed out: retry; the reply of a command in flight is unknown
    /// (it may or may not have run).
    Connection,
    /// Redis answered with an error that may clear by itself (LOADING, BUSY, TRYAGAIN,
    /// MASTERDOWN, READONLY during a failover, OOM until memory is freed): retry.
    Transient,
    /// Redis refused, and will refuse again until someone changes its configuration (NOPERM:
    /// an ACL; WRONGPASS/NOAUTH): retrying cannot help.
    Permanent,
    /// Any other answered error (a bug, a wrong type): the command ran and failed.
    Other,
}

/// Classify `e` (see [`Failure`]).
pub fn classify(e: &RedisError) -> Failure {
    use redis::{ErrorKind, ServerErrorKind};
    if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_connection_refusal() {
        return Failure::Connection;
    }
    match (e.kind(), e.code()) {
        (ErrorKind::Server(ServerErrorKind::NoPerm), _) | (ErrorKind::AuthenticationFailed, _) => Failure::Permanent,
        (_, Some("NOAUTH" | "WRONGPASS" | "NOPERM")) => Failure::Permanent,
        (
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ReadOnly
                | ServerErrorKind::ClusterDown,
            ),
            _,
        ) => Failure::Transient,
        (_, Some("OOM" | "BUSY" | "LOADING")) => Failure::Transient,
        _ if e.is_unrecoverable_error() => Failure::Connection,
        _ => Failure::Other,
    }
}

/// Run `op` until it succeeds, sleeping with backoff between failures and logging the outage
/// when it starts, every 30 s while it lasts, and when it ends. Gives up (returns `Err`) when
/// `give_up` becomes true — the worker's forced exit — or at once on a [`Failure::Permanent`]
/// error, which it returns: the caller stops with it rather than retry for ever.
pub async fn retry<T, F, Fut>(health: &Health, what: &str, give_up: &AtomicBool, mut op: F) -> Result<T, GaveUp>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = redis::RedisResult<T>>,
{
    let mut backoff = Backoff::default();
    loop {
        match op().await {
            Ok(v) => {
                health.set_connected();
                return Ok(v);
            }
            Err(e) if classify(&e) == Failure::Permanent => {
                return Err(GaveUp::Refused(explain(&e, health.setting, &health.url)));
            }
            Err(e) => {
                health.report_failure(&e, what);
                if give_up.load(Ordering::Relaxed) {
                    return Err(GaveUp::Stopping);
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Why [`retry`] stopped without a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GaveUp {
    /// The forced exit began.
    Stopping,
    /// Redis refused for good; the explained error (with its setting and fix).
    Refused(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(url: &str) -> String {
        match connect("BROKER_URL", url, None, Duration::from_secs(1)) {
            Ok(_) => panic!("{url} accepted"),
            Err(e) => {
                // The reason is in the message only, so `{:#}` does not print it twice.
                assert!(std::error::Error::source(&e).is_none(), "{e}");
                e.to_string()
            }
        }
    }

    #[test]
    fn bad_urls_name_the_setting_once_and_hide_the_password() {
        let e = err("http://nope");
        assert!(e.contains("BROKER_URL=http://nope") && e.contains("redis://"), "{e}");
        let e = err("redis+unix:///tmp/x.sock?pass=s3cret&db=zz");
        assert!(e.contains("BROKER_URL=redis+unix:///tmp/x.sock?pass=***") && !e.contains("s3cret"), "{e}");
        let e = err("rediss://:s3cret@h/0?ssl_ca_certs=/no/such/ca.pem");
        assert!(e.contains("ssl_ca_certs=/no/such/ca.pem") && !e.contains("s3cret"), "{e}");
        let e = err("sentinel://:s3cret@h:26379/0");
        assert!(e.contains("--sentinel-master") && !e.contains("s3cret"), "{e}");
        assert_eq!(e.matches("BROKER_URL").count(), 1, "{e}");
    }

    #[test]
    fn outage_warnings_repeat_while_it_lasts_and_start_again_after_recovery() {
        let mut health = Arc::into_inner(Health::new("broker", "BROKER_URL", "redis://:pw@h/0")).unwrap();
        health.repeat = Duration::from_millis(200);
        let e = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(health.report_failure(&e, "read"), "the first failure warns");
        assert!(!health.report_failure(&e, "read"), "not on every retry");
        std::thread::sleep(Duration::from_millis(250));
        assert!(health.report_failure(&e, "read"), "again while it lasts");
        health.set_connected();
        assert!(health.report_failure(&e, "read"), "a new outage warns at once");
        let text = explain(&e, health.setting, &health.url);
        assert!(text.contains("is Redis running at redis://:***@h/0? check BROKER_URL"), "{text}");
    }

    #[test]
    fn backoff_doubles_to_five_seconds_within_its_jitter() {
        let mut b = Backoff::default();
        let delays: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert!((Duration::from_millis(50)..=Duration::from_millis(100)).contains(&delays[0]), "{delays:?}");
        assert!((Duration::from_millis(2500)..=Duration::from_secs(5)).contains(&delays[9]), "{delays:?}");
        // Two workers that lost Redis at the same instant do not retry in lockstep.
        let firsts: std::collections::HashSet<_> = (0..20).map(|_| Backoff::default().next_delay()).collect();
        assert!(firsts.len() > 1, "every first delay was {firsts:?}");
    }

    #[test]
    fn errors_are_classified_by_kind_and_code() {
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(classify(&io), Failure::Connection);
        let server = |code: &str, text: &str| {
            let reply = format!("-{code} {text}\r\n");
            match redis::parse_redis_value(reply.as_bytes()) {
                Ok(redis::Value::ServerError(e)) => RedisError::from(e),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(
            classify(&server("NOPERM", "this user has no permissions to run the 'evalsha' command")),
            Failure::Permanent
        );
        assert_eq!(classify(&server("WRONGPASS", "invalid username-password pair")), Failure::Permanent);
        assert_eq!(classify(&server("LOADING", "Redis is loading the dataset in memory")), Failure::Transient);
        assert_eq!(classify(&server("OOM", "command not allowed when used memory > 'maxmemory'.")), Failure::Transient);
        assert_eq!(classify(&server("READONLY", "You can't write against a read only replica.")), Failure::Transient);
        assert_eq!(
            classify(&server("WRONGTYPE", "Operation against a key holding the wrong kind of value")),
            Failure::Other
        );
    }
}
