//! `rediss://` against Debian's redis-server with `--tls-port` and a throwaway CA made here with
//! the openssl CLI: the worker runs tasks sent by loadgen over TLS, the exporter polls over TLS,
//! a client that does not trust the server's CA is refused (and never falls back to plain TCP),
//! a server that requires client certificates accepts `ssl_certfile`/`ssl_keyfile`.

mod common;

use common::{BIN, Exporter, Proc, Worker, free_port, http_get, wait_for};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

/// A CA, a server certificate for 127.0.0.1 signed by it, a client certificate signed by it,
/// and an unrelated CA.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let p = Pki { dir };
        p.openssl(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt"], "test-ca");
        p.openssl(
            &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out", "other.crt"],
            "other-ca",
        );
        std::fs::write(p.path("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
        for name in ["server", "client"] {
            p.openssl(
                &[
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                ],
                name,
            );
            p.openssl(
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &format!("{name}.crt"),
                    "-days",
                    "2",
                    "-extfile",
                    "ext.cnf",
                ],
                "",
            );
        }
        p
    }

    fn openssl(&self, args: &[&str], cn: &str) {
        let mut cmd = Command::new("openssl");
        cmd.args(args).current_dir(self.dir.path());
        if !cn.is_empty() {
            cmd.args(["-days", "2", "-subj", &format!("/CN={cn}")]);
        }
        let out = cmd.output().unwrap_or_else(|e| panic!("openssl CLI missing ({e}): apt-get install openssl"));
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// redis-server with TLS only (`--port 0`); `auth_clients`: require client certificates.
    fn server(&self, auth_clients: bool) -> (Proc, u16) {
        let port = free_port();
        let p = |n: &str| self.path(n).display().to_string();
        let proc = Proc::spawn(Command::new("redis-server").args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--tls-cert-file",
            &p("server.crt"),
            "--tls-key-file",
            &p("server.key"),
            "--tls-ca-cert-file",
            &p("ca.crt"),
            "--tls-auth-clients",
            if auth_clients { "yes" } else { "no" },
            "--dir",
            &p(""),
        ]));
        wait_for("TLS redis-server listening", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        });
        (proc, port)
    }

    fn url(&self, port: u16, db: u8, ca: &str, extra: &str) -> String {
        format!("rediss://127.0.0.1:{port}/{db}?ssl_cert_reqs=required&ssl_ca_certs={}{extra}", self.path(ca).display())
    }

    fn client_cert(&self) -> String {
        format!("&ssl_certfile={}&ssl_keyfile={}", self.path("client.crt").display(), self.path("client.key").display())
    }
}

fn loadgen(broker: &str, backend: &str, n: u32) -> Output {
    Command::new(BIN)
        .args(["loadgen", "burst", "--n", &n.to_string(), "--task", "io", "--io-seconds", "0.01:0.02"])
        .args(["--wait", "--wait-timeout", "60"])
        .env("BROKER_URL", broker)
        .env("BACKEND_URL", backend)
        .output()
        .unwrap()
}

fn assert_ok(out: &Output, n: u32) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "loadgen failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("results: {n} succeeded, 0 failed")), "{stdout}");
}

/// The worker stays not-ready and says why; waits for its warning.
fn assert_refused(worker: &Worker, needle: &str) {
    let start = std::time::Instant::now();
    while !worker.log_text().contains(needle) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no warning with {needle:?} in 30 s:\n{}",
            worker.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!matches!(worker.http_get("/readyz"), Some((200, _))), "worker ready although TLS was refused");
}

#[test]
fn worker_loadgen_and_exporter_work_over_tls_and_an_untrusted_ca_is_refused() {
    let pki = Pki::new();
    let (_server, port) = pki.server(false);
    let (broker, backend) = (pki.url(port, 0, "ca.crt", ""), pki.url(port, 1, "ca.crt", ""));

    let worker = Worker::spawn_urls(&broker, &backend, free_port(), &["--concurrency", "4"]);
    worker.wait_ready(Duration::from_secs(30));
    assert_ok(&loadgen(&broker, &backend, 20), 20);
    // A Python Celery client with the very same URLs: a Celery user's URL works as it is.
    let spec = serde_json::json!([{"task": "tasks.io_bound", "args": [0.01], "timeout": 30}]);
    let env = [("BROKER_URL", broker.clone()), ("BACKEND_URL", backend.clone())];
    let out = common::run_python("client.py", &["run", &spec.to_string()], &env, Duration::from_secs(90));
    let results: serde_json::Value = serde_json::from_str(out.trim()).expect("client.py prints JSON");
    assert_eq!(results[0]["ok"], true, "{results}");

    let exporter = Exporter::start(&broker, "celery", &[]);
    exporter.wait_value("celery_queue_exporter_last_poll_ok", "", Some(1.0));
    exporter.wait_value("celery_queue_depth", "queue=\"celery\"", Some(0.0));

    // The same server, but the client trusts another CA: refused, with a message naming the fix.
    let wrong = pki.url(port, 0, "other.crt", "");
    let untrusting = Worker::spawn_urls(&wrong, &pki.url(port, 1, "other.crt", ""), free_port(), &[]);
    assert_refused(&untrusting, "check ssl_ca_certs");
    let log = untrusting.log_text();
    assert!(log.to_ascii_lowercase().contains("certificate"), "the error says it is the certificate: {log}");
    let out = loadgen(&wrong, &backend, 3);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.to_ascii_lowercase().contains("certificate"), "{stderr}");

    // Plain redis:// to the TLS port never gets an answer that counts as a connection either
    // (no downgrade exists to fall back to).
    let plain = Worker::spawn_urls(
        &format!("redis://127.0.0.1:{port}/0"),
        &format!("redis://127.0.0.1:{port}/1"),
        free_port(),
        &[],
    );
    assert_refused(&plain, "Redis");
    assert!(http_get(worker.metrics_port, "/readyz").is_some_and(|(s, _)| s == 200), "the TLS worker is unaffected");
}

#[test]
fn client_certificates_when_the_server_requires_them_and_verification_can_be_turned_off() {
    let pki = Pki::new();
    let (_server, port) = pki.server(true);
    let cert = pki.client_cert();
    let (broker, backend) = (pki.url(port, 0, "ca.crt", &cert), pki.url(port, 1, "ca.crt", &cert));
    let worker = Worker::spawn_urls(&broker, &backend, free_port(), &["--concurrency", "2"]);
    worker.wait_ready(Duration::from_secs(30));
    assert_ok(&loadgen(&broker, &backend, 10), 10);

    // Without a client certificate the server hangs up during the handshake.
    let anonymous =
        Worker::spawn_urls(&pki.url(port, 0, "ca.crt", ""), &pki.url(port, 1, "ca.crt", ""), free_port(), &[]);
    assert_refused(&anonymous, "Redis");

    // ssl_cert_reqs=none: no CA given, the server's certificate is not checked.
    let insecure = |db| format!("rediss://127.0.0.1:{port}/{db}?ssl_cert_reqs=none{cert}");
    assert_ok(&loadgen(&insecure(0), &insecure(1), 5), 5);
}

#[test]
fn a_missing_ca_file_is_a_startup_error_naming_the_option() {
    let out = Command::new(BIN)
        .args(["worker", "--metrics-addr", "127.0.0.1:0"])
        .env("BROKER_URL", "rediss://:s3cret@127.0.0.1:1/0?ssl_ca_certs=/nonexistent/ca.pem")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("ssl_ca_certs=/nonexistent/ca.pem") && stderr.contains("BROKER_URL="), "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
    assert_eq!(stderr.matches("No such file").count(), 1, "said once: {stderr}");
}
