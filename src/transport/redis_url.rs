//! Redis URLs as Celery and kombu users write them, and the one function that keeps their
//! secrets out of logs, errors, metric labels and child command lines.
//!
//! Accepted forms (docs/Reliability.md has the full table):
//! - `redis://[[user]:password@]host[:port][/db]`
//! - `rediss://…?ssl_cert_reqs=required&ssl_ca_certs=/ca.crt&ssl_certfile=…&ssl_keyfile=…`
//!   (redis-py's query options; `ssl_cert_reqs=none` skips verification)
//! - `redis+unix:///path.sock?db=0&password=…` (also `unix://`, `redis+socket://`, `socket://`;
//!   `pass=` works as well as `password=`)
//! - `sentinel://[:password@]host:port[;sentinel://[:password@]host:port…][/db]`, the master
//!   name from `--sentinel-master` or `?master_name=`; the password in the URL is the
//!   master's, as in kombu. The sentinels' own password is `?sentinel_password=`
//!   (`sentinel_username=`), TLS to the sentinels `?sentinel_ssl=true`, TLS to the master
//!   `?ssl=true` or any `ssl_*` option (the same CA and client certificate serve both).

use std::collections::BTreeMap;
use std::path::PathBuf;

/// What is wrong with a URL, in words that name the fix. The URL itself is added (redacted) by
/// the caller, which knows the setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("unknown scheme {0:?}: use redis://, rediss://, redis+unix:// or sentinel://")]
    Scheme(String),
    #[error("cannot parse it: {0}")]
    Syntax(String),
    #[error("{option}={value:?} is not one of {expected}")]
    Option { option: &'static str, value: String, expected: &'static str },
    #[error("cannot read {option}={path}: {error}")]
    File { option: &'static str, path: String, error: String },
    #[error("sentinel:// needs a master name: pass --sentinel-master (env SENTINEL_MASTER) or ?master_name=")]
    NoMasterName,
    #[error("sentinel {0:?} needs host:port")]
    SentinelHost(String),
    #[error("ssl_certfile and ssl_keyfile go together: give both or neither")]
    HalfClientCert,
    #[error("{0} only applies to rediss:// or sentinel:// with ssl=true")]
    TlsOptionWithoutTls(&'static str),
}

/// How to verify the server, from redis-py's `ssl_*` options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsOptions {
    /// `ssl_cert_reqs`: `required` (default; also `CERT_REQUIRED`, and `optional`, which a
    /// client treats as required, as Python's ssl does) or `none`/`CERT_NONE`.
    pub verify: bool,
    /// `ssl_check_hostname` (default true; `false` accepts a certificate for another name).
    pub check_hostname: bool,
    /// `ssl_ca_certs`: PEM file of CAs to trust instead of the system's.
    pub ca_certs: Option<PathBuf>,
    /// `ssl_certfile` + `ssl_keyfile`: client certificate for servers that require one.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// A parsed URL: where to connect and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisUrl {
    /// A URL redis-rs understands once kombu's options are taken out: `url` is that URL.
    Direct {
        url: String,
        tls: Option<TlsOptions>,
    },
    Sentinel(SentinelUrl),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentinelUrl {
    pub sentinels: Vec<(String, u16)>,
    pub master_name: Option<String>,
    pub db: i64,
    /// The master's credentials (kombu: the URL's userinfo), still percent-encoded.
    pub userinfo: Option<String>,
    /// TLS to the master and replicas.
    pub tls: Option<TlsOptions>,
    pub sentinel_username: Option<String>,
    pub sentinel_password: Option<String>,
    /// TLS to the sentinels themselves (same CA and client certificate as `tls`).
    pub sentinel_tls: Option<TlsOptions>,
}

impl SentinelUrl {
    /// The redis-rs URL of a node this describes (master or sentinel) at `host:port`.
    pub fn node_url(&self, host: &str, port: u16, sentinel: bool) -> String {
        let (tls, userinfo, db) = if sentinel {
            let auth = match (&self.sentinel_username, &self.sentinel_password) {
                (None, None) => None,
                (u, p) => Some(format!("{}:{}", enc(u.as_deref().unwrap_or("")), enc(p.as_deref().unwrap_or("")))),
            };
            (&self.sentinel_tls, auth, 0)
        } else {
            (&self.tls, self.userinfo.clone(), self.db)
        };
        let scheme = if tls.is_some() { "rediss" } else { "redis" };
        let auth = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
        let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_owned() };
        format!("{scheme}://{auth}{host}:{port}/{db}{}", insecure_fragment(tls.as_ref()))
    }
}

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn insecure_fragment(tls: Option<&TlsOptions>) -> &'static str {
    if tls.is_some_and(|t| !t.verify) { "#insecure" } else { "" }
}

const SSL_KEYS: [&str; 5] = ["ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname"];

/// Parse `url`; `sentinel_master` (the flag) wins over `?master_name=`.
pub fn parse(url: &str, sentinel_master: Option<&str>) -> Result<RedisUrl, UrlError> {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase()).unwrap_or_default();
    match scheme.as_str() {
        "redis" | "rediss" | "valkey" | "valkeys" => parse_direct(url, false),
        "unix" | "redis+unix" | "redis+socket" | "socket" => parse_direct(url, true),
        "sentinel" => parse_sentinel(url, sentinel_master),
        other => Err(UrlError::Scheme(other.to_owned())),
    }
}

fn parse_direct(raw: &str, unix: bool) -> Result<RedisUrl, UrlError> {
    let mut url = url::Url::parse(raw).map_err(|e| UrlError::Syntax(e.to_string()))?;
    let query: Vec<(String, String)> = url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    let options: BTreeMap<&str, &str> = query.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let tls_scheme = matches!(url.scheme(), "rediss" | "valkeys");
    let tls = tls_options(&options, tls_scheme)?;
    if unix {
        // redis-rs knows `unix://` and `redis+unix://` with `pass=`; kombu users write
        // `socket://` and `password=`.
        if matches!(url.scheme(), "redis+socket" | "socket") {
            url = url::Url::parse(&raw.replacen(url.scheme(), "redis+unix", 1))
                .map_err(|e| UrlError::Syntax(e.to_string()))?;
        }
    }
    let kept: Vec<(String, String)> = query
        .into_iter()
        .filter(|(k, _)| !SSL_KEYS.contains(&k.as_str()))
        .map(|(k, v)| if unix && k == "password" { ("pass".to_owned(), v) } else { (k, v) })
        .collect();
    if kept.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(kept);
    }
    url.set_fragment(None);
    let mut url = url.to_string();
    url.push_str(insecure_fragment(tls.as_ref()));
    Ok(RedisUrl::Direct { url, tls })
}

fn tls_options(options: &BTreeMap<&str, &str>, tls: bool) -> Result<Option<TlsOptions>, UrlError> {
    if !tls {
        if let Some(k) = SSL_KEYS.iter().find(|k| options.contains_key(*k)) {
            return Err(UrlError::TlsOptionWithoutTls(k));
        }
        return Ok(None);
    }
    let verify = match options.get("ssl_cert_reqs").map(|v| v.to_ascii_lowercase()) {
        None => true,
        Some(v) => match v.as_str() {
            "required" | "cert_required" | "optional" | "cert_optional" => true,
            "none" | "cert_none" => false,
            _ => {
                return Err(UrlError::Option {
                    option: "ssl_cert_reqs",
                    value: v,
                    expected: "required, optional, none (or CERT_REQUIRED, CERT_OPTIONAL, CERT_NONE)",
                });
            }
        },
    };
    let check_hostname = match options.get("ssl_check_hostname") {
        None => true,
        Some(v) => parse_bool("ssl_check_hostname", v)?,
    };
    let path = |k: &str| options.get(k).map(PathBuf::from);
    let client_cert = match (path("ssl_certfile"), path("ssl_keyfile")) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => return Err(UrlError::HalfClientCert),
    };
    Ok(Some(TlsOptions { verify, check_hostname, ca_certs: path("ssl_ca_certs"), client_cert }))
}

fn parse_bool(option: &'static str, v: &str) -> Result<bool, UrlError> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(UrlError::Option { option, value: v.to_owned(), expected: "true or false" }),
    }
}

fn parse_sentinel(raw: &str, flag: Option<&str>) -> Result<RedisUrl, UrlError> {
    let mut sentinels = Vec::new();
    let mut userinfo = None;
    let mut db = 0;
    let mut query: Vec<(String, String)> = Vec::new();
    for part in split_multi(raw) {
        let url = url::Url::parse(part).map_err(|e| UrlError::Syntax(e.to_string()))?;
        if url.scheme() != "sentinel" {
            return Err(UrlError::Scheme(url.scheme().to_owned()));
        }
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| UrlError::SentinelHost(redact(part)))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        sentinels.push((host, url.port().unwrap_or(26379)));
        if userinfo.is_none() && (url.password().is_some() || !url.username().is_empty()) {
            userinfo = Some(format!("{}:{}", url.username(), url.password().unwrap_or("")));
        }
        match url.path().trim_matches('/') {
            "" => {}
            p => {
                db = p.parse().map_err(|_| UrlError::Option {
                    option: "database",
                    value: p.to_owned(),
                    expected: "a number (sentinel://host:port/0)",
                })?
            }
        }
        query.extend(url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())));
    }
    let options: BTreeMap<&str, &str> = query.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let ssl = match options.get("ssl") {
        Some(v) => parse_bool("ssl", v)?,
        None => SSL_KEYS.iter().any(|k| options.contains_key(k)),
    };
    let sentinel_ssl = options.get("sentinel_ssl").map(|v| parse_bool("sentinel_ssl", v)).transpose()?.unwrap_or(false);
    let tls_any = tls_options(&options, ssl || sentinel_ssl)?;
    let master_name = flag.map(str::to_owned).or_else(|| options.get("master_name").map(|s| (*s).to_owned()));
    if master_name.as_deref().is_none_or(str::is_empty) {
        return Err(UrlError::NoMasterName);
    }
    Ok(RedisUrl::Sentinel(SentinelUrl {
        sentinels,
        master_name,
        db,
        userinfo,
        tls: if ssl { tls_any.clone() } else { None },
        sentinel_username: options.get("sentinel_username").map(|s| (*s).to_owned()),
        sentinel_password: options.get("sentinel_password").map(|s| (*s).to_owned()),
        sentinel_tls: if sentinel_ssl { tls_any } else { None },
    }))
}

/// The same URL naming database `db` instead, everything else kept as written: credentials,
/// query options (TLS CA and client certificate, `password=`), the fragment. `redis://` and
/// `rediss://` carry the database in the path, a unix socket in `?db=` (its path is the
/// socket's), `sentinel://` in the path of its last part.
pub fn with_db(raw: &str, db: i64) -> Result<String, UrlError> {
    let scheme = raw.split_once("://").map(|(s, _)| s.to_ascii_lowercase()).unwrap_or_default();
    let parse = |part: &str| url::Url::parse(part).map_err(|e| UrlError::Syntax(e.to_string()));
    match scheme.as_str() {
        "redis" | "rediss" | "valkey" | "valkeys" => {
            let mut url = parse(raw)?;
            url.set_path(&format!("/{db}"));
            Ok(url.to_string())
        }
        "unix" | "redis+unix" | "redis+socket" | "socket" => {
            let mut url = parse(raw)?;
            let mut replaced = false;
            let mut pairs: Vec<String> = url
                .query()
                .unwrap_or_default()
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=').map_or(p, |(k, _)| k) {
                    "db" => {
                        replaced = true;
                        format!("db={db}")
                    }
                    _ => p.to_owned(),
                })
                .collect();
            if !replaced {
                pairs.push(format!("db={db}"));
            }
            url.set_query(Some(&pairs.join("&")));
            Ok(url.to_string())
        }
        "sentinel" => {
            let mut parts: Vec<String> = split_multi(raw).into_iter().map(str::to_owned).collect();
            let last = parts.last_mut().ok_or_else(|| UrlError::Syntax("empty URL".into()))?;
            let mut url = parse(last)?;
            url.set_path(&format!("/{db}"));
            *last = url.to_string();
            Ok(parts.join(";"))
        }
        other => Err(UrlError::Scheme(other.to_owned())),
    }
}

/// Whether two URLs reach the same Redis server as the same user (databases aside), so one
/// connection could serve both. False when either does not parse.
pub fn same_server(a: &str, b: &str) -> bool {
    fn server(raw: &str) -> Option<(redis::ConnectionAddr, Option<String>, Option<String>)> {
        match parse(raw, None) {
            Ok(RedisUrl::Direct { url, .. }) => {
                let info = redis::Client::open(url.as_str()).ok()?.get_connection_info().clone();
                let s = info.redis_settings();
                Some((info.addr().clone(), s.username().map(str::to_owned), s.password().map(str::to_owned)))
            }
            // The master behind the sentinels is only known at run time.
            _ => None,
        }
    }
    matches!((server(a), server(b)), (Some(x), Some(y)) if x == y)
}

/// The database a URL names (0 when it names none); `None` when it does not parse.
pub fn db_of(raw: &str) -> Option<i64> {
    match parse(raw, None) {
        Ok(RedisUrl::Direct { url, .. }) => {
            Some(redis::Client::open(url.as_str()).ok()?.get_connection_info().redis_settings().db())
        }
        Ok(RedisUrl::Sentinel(s)) => Some(s.db),
        // A sentinel URL without its master name still names a database.
        Err(UrlError::NoMasterName) => match parse(raw, Some("-")) {
            Ok(RedisUrl::Sentinel(s)) => Some(s.db),
            _ => None,
        },
        Err(_) => None,
    }
}

/// Split `a://x;b://y` at each `;` that starts another URL (a password may contain `;`).
fn split_multi(url: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    for (i, _) in url.match_indices(';') {
        let next = &url[i + 1..];
        let scheme_len = next.find("://").unwrap_or(usize::MAX);
        if scheme_len < 32 && next[..scheme_len].chars().all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c)) {
            parts.push(&url[start..i]);
            start = i + 1;
        }
    }
    parts.push(&url[start..]);
    parts
}

/// Query options whose value is a secret.
fn secret_option(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("pass") || k.contains("secret") || k.contains("token")
}

/// The one redaction: every password in any URL form becomes `***` — userinfo passwords in
/// each `;`-separated part, and `password=` / `pass=` / `sentinel_password=` (any option
/// naming a password, secret or token) in the query. Never fails: a URL that does not parse
/// is redacted by the same rules as text.
pub fn redact(url: &str) -> String {
    split_multi(url).into_iter().map(redact_one).collect::<Vec<_>>().join(";")
}

fn redact_one(url: &str) -> String {
    let (before_fragment, fragment) = match url.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (url, None),
    };
    let (base, query) = match before_fragment.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (before_fragment, None),
    };
    let mut out = match base.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, host)) => {
                // `user:password@` keeps the user; a bare `token@` may be a password (redis-py
                // reads it as a username, people still put secrets there).
                let user = match userinfo.split_once(':') {
                    Some((u, _)) => format!("{u}:***"),
                    None => "***".to_owned(),
                };
                format!("{scheme}://{user}@{host}")
            }
            None => base.to_owned(),
        },
        None => base.to_owned(),
    };
    if let Some(q) = query {
        let pairs: Vec<String> = q
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if secret_option(k) => format!("{k}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_covers_every_form() {
        let cases = [
            ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
            ("redis://user:s3cret@h/1", "redis://user:***@h/1"),
            ("redis://s3cret@h/1", "redis://***@h/1"),
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            (
                "rediss://:s3cret@h:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/ca.crt",
                "rediss://:***@h:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/ca.crt",
            ),
            ("redis+unix:///tmp/r.sock?pass=s3cret", "redis+unix:///tmp/r.sock?pass=***"),
            ("redis+unix:///tmp/r.sock?db=2&password=s3cret", "redis+unix:///tmp/r.sock?db=2&password=***"),
            ("unix:///tmp/r.sock?password=s3cret&db=1", "unix:///tmp/r.sock?password=***&db=1"),
            ("redis://:p@ss;w0rd@h/0", "redis://:***@h/0"),
            (
                "sentinel://:s3cret@a:26379;sentinel://:s3cret@b:26380/0?sentinel_password=t0p&ssl=true",
                "sentinel://:***@a:26379;sentinel://:***@b:26380/0?sentinel_password=***&ssl=true",
            ),
            ("sentinel://a:1;sentinel://b:2/0", "sentinel://a:1;sentinel://b:2/0"),
            ("not a url password=s3cret", "not a url password=s3cret"),
            ("junk://:s3cret@x?token=abc#insecure", "junk://:***@x?token=***#insecure"),
        ];
        for (input, want) in cases {
            assert_eq!(redact(input), want, "{input}");
            if want.contains("***") {
                assert!(!redact(input).contains("s3cret"), "{input}");
            }
        }
    }

    proptest::proptest! {
        /// Whatever the password and wherever it sits, the redacted URL does not contain it.
        #[test]
        fn no_form_leaks_the_password(pw in "PW[a-z0-9;@:/%]{6,20}", user in "[a-z]{0,6}", port in 1u16..65535) {
            let enc: String = url::form_urlencoded::byte_serialize(pw.as_bytes()).collect();
            let forms = [
                format!("redis://{user}:{pw}@h:{port}/0"),
                format!("redis://{user}:{enc}@h:{port}/0"),
                format!("rediss://:{enc}@h:{port}/0?ssl_cert_reqs=none"),
                format!("redis+unix:///tmp/r.sock?db=1&pass={enc}"),
                format!("unix:///tmp/r.sock?password={enc}"),
                format!("sentinel://:{enc}@a:{port};sentinel://:{enc}@b:{port}/0?sentinel_password={enc}"),
            ];
            for f in forms {
                let r = redact(&f);
                proptest::prop_assert!(!r.contains(&pw) && !r.contains(&enc), "{f} -> {r}");
            }
        }
    }

    #[test]
    fn tls_options_as_redis_py_takes_them() {
        let u = parse("rediss://:pw@h:6380/2?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs=/ca.pem&protocol=resp2", None)
            .unwrap();
        let RedisUrl::Direct { url, tls: Some(tls) } = u else { panic!("{u:?}") };
        assert_eq!(url, "rediss://:pw@h:6380/2?protocol=resp2");
        assert!(tls.verify && tls.check_hostname);
        assert_eq!(tls.ca_certs, Some(PathBuf::from("/ca.pem")));
        let RedisUrl::Direct { url, tls: Some(tls) } = parse("rediss://h/0?ssl_cert_reqs=none", None).unwrap() else {
            panic!()
        };
        assert_eq!(url, "rediss://h/0#insecure");
        assert!(!tls.verify);
        for ok in ["optional", "CERT_OPTIONAL", "required", "cert_none"] {
            parse(&format!("rediss://h/0?ssl_cert_reqs={ok}"), None).unwrap();
        }
        let e = parse("rediss://h/0?ssl_cert_reqs=maybe", None).unwrap_err().to_string();
        assert!(e.contains("ssl_cert_reqs=\"maybe\"") && e.contains("CERT_NONE"), "{e}");
        assert_eq!(parse("rediss://h/0?ssl_certfile=/c", None).unwrap_err(), UrlError::HalfClientCert);
        assert_eq!(
            parse("redis://h/0?ssl_ca_certs=/c", None).unwrap_err(),
            UrlError::TlsOptionWithoutTls("ssl_ca_certs")
        );
    }

    #[test]
    fn unix_sockets_take_kombu_spellings() {
        let RedisUrl::Direct { url, tls: None } = parse("redis+socket:///tmp/r.sock?password=x&db=3", None).unwrap()
        else {
            panic!()
        };
        assert_eq!(url, "redis+unix:///tmp/r.sock?pass=x&db=3");
    }

    #[test]
    fn with_db_keeps_everything_but_the_database() {
        let cases = [
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/1"),
            ("redis://:pw@redis:6379/3", "redis://:pw@redis:6379/1"),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379/1"),
            ("redis://127.0.0.1:6379/", "redis://127.0.0.1:6379/1"),
            ("rediss://:pw@h:6380/0?ssl_ca_certs=/ca.pem", "rediss://:pw@h:6380/1?ssl_ca_certs=/ca.pem"),
            (
                "rediss://h/0?ssl_cert_reqs=required&ssl_certfile=/c.pem&ssl_keyfile=/k.pem",
                "rediss://h/1?ssl_cert_reqs=required&ssl_certfile=/c.pem&ssl_keyfile=/k.pem",
            ),
            ("redis+unix:///r.sock?db=0", "redis+unix:///r.sock?db=1"),
            ("redis+unix:///var/run/r.sock", "redis+unix:///var/run/r.sock?db=1"),
            ("socket:///tmp/r.sock?password=x&db=2", "socket:///tmp/r.sock?password=x&db=1"),
            ("unix:///tmp/r.sock?pass=x", "unix:///tmp/r.sock?pass=x&db=1"),
            ("sentinel://a:1;sentinel://b:2/0?master_name=m", "sentinel://a:1;sentinel://b:2/1?master_name=m"),
        ];
        for (input, want) in cases {
            assert_eq!(with_db(input, 1).as_deref(), Ok(want), "{input}");
        }
        // What the new URL means: the CA and the socket path survive the parse too.
        let RedisUrl::Direct { url, tls: Some(tls) } =
            parse(&with_db("rediss://h:6380/0?ssl_ca_certs=/ca.pem", 1).unwrap(), None).unwrap()
        else {
            panic!()
        };
        assert_eq!((url.as_str(), tls.ca_certs), ("rediss://h:6380/1", Some(PathBuf::from("/ca.pem"))));
        assert_eq!(db_of(&with_db("redis+unix:///r.sock?db=0", 1).unwrap()), Some(1));
        assert!(matches!(with_db("http://x/0", 1), Err(UrlError::Scheme(_))));
        assert!(with_db("redis://[::1", 1).is_err(), "no panic on junk");
    }

    #[test]
    fn same_server_ignores_the_database_only() {
        assert!(same_server("redis://h:6379/0", "redis://h:6379/1"));
        assert!(same_server("redis://:pw@h/0", "redis://:pw@h:6379/5"));
        assert!(!same_server("redis://:pw@h/0", "redis://:other@h/0"));
        assert!(!same_server("redis://h:6379/0", "redis://h:6380/0"));
        assert!(same_server("rediss://h/0?ssl_ca_certs=/ca.pem", "rediss://h/1?ssl_ca_certs=/ca.pem"));
        assert!(same_server("socket:///tmp/r.sock?db=0", "redis+unix:///tmp/r.sock?db=1"));
        assert!(!same_server("sentinel://a:1/0?master_name=m", "sentinel://a:1/1?master_name=m"), "unknown master");
        assert!(!same_server("junk", "junk"));
        assert_eq!(db_of("redis://h/4"), Some(4));
        assert_eq!(db_of("sentinel://a:1/3"), Some(3));
    }

    #[test]
    fn sentinel_urls() {
        let RedisUrl::Sentinel(s) = parse(
            "sentinel://:pw@10.0.0.1:26379;sentinel://:pw@10.0.0.2;sentinel://h3:26381/4?sentinel_password=sp&ssl_cert_reqs=none",
            Some("mymaster"),
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(s.sentinels, vec![("10.0.0.1".into(), 26379), ("10.0.0.2".into(), 26379), ("h3".into(), 26381)]);
        assert_eq!(s.master_name.as_deref(), Some("mymaster"));
        assert_eq!(s.db, 4);
        assert_eq!(s.node_url("m", 6379, false), "rediss://:pw@m:6379/4#insecure");
        assert_eq!(s.node_url("10.0.0.1", 26379, true), "redis://:sp@10.0.0.1:26379/0");
        let RedisUrl::Sentinel(s) = parse("sentinel://a:1/0?master_name=mm&sentinel_ssl=true", None).unwrap() else {
            panic!()
        };
        assert_eq!(s.master_name.as_deref(), Some("mm"));
        assert_eq!(s.node_url("a", 1, true), "rediss://a:1/0");
        assert_eq!(s.node_url("a", 1, false), "redis://a:1/0");
        assert_eq!(parse("sentinel://a:1/0", None).unwrap_err(), UrlError::NoMasterName);
        assert!(matches!(parse("http://x", None), Err(UrlError::Scheme(_))));
    }
}
