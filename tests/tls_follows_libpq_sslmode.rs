//! TLS follows libpq's `sslmode` on both connections: the control connection (`check`, and
//! the sessions `run` opens for its state) and the replication connection (`run --once`: the
//! full sync creates the slot on it, later runs stream on it).
//!
//! - `require` encrypts without checking the certificate; with `sslrootcert` it checks the
//!   chain, as libpq does.
//! - `verify-ca` checks the chain against `sslrootcert`, not the host name.
//! - `verify-full` checks the chain and the name: a DNS name in `host` against the
//!   certificate's DNS names, an IP address against its IP addresses.
//! - A TLS configuration error (untrusted chain, wrong name, unreadable CA file, a server
//!   without TLS) stops `run` at once with one sentence and a hint: it is not retried.
//!
//! One cluster with `ssl = on` serves the tests here, with certificates made by `openssl`: a
//! test CA signs `localhost.crt` (DNS `localhost`, IP 127.0.0.1) and `elsewhere.crt` (DNS
//! `db.example.invalid` only); another CA signs nothing the server presents. pg_hba.conf
//! accepts TCP only on `hostssl` lines (SCRAM), so a session that fell back to plain text
//! would be refused. The tests take turns (a lock), as some swap the server's certificate.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use slotstream::Lsn;
use slotstream::config::Config;
use slotstream::error::Error;
use slotstream::source::stream::replication_config;

use crate::support;
use crate::support::certs::{make_ca, make_server_cert};

/// How long a `run` that must stop at once may take: far less than its retries would.
const PROMPT_EXIT: Duration = Duration::from_secs(30);

/// The certificate the server presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerCert {
    /// Names `localhost` and 127.0.0.1.
    Localhost,
    /// Names only `db.example.invalid`.
    Elsewhere,
}

impl ServerCert {
    fn stem(self) -> &'static str {
        match self {
            ServerCert::Localhost => "localhost",
            ServerCert::Elsewhere => "elsewhere",
        }
    }
}

/// The TLS cluster of this module and its certificates.
struct TlsServer {
    cluster: support::OwnedCluster,
    certs: PathBuf,
    /// The certificate the server presents now (`None` before the first reload turns TLS
    /// on); held by the running test.
    serving: tokio::sync::Mutex<Option<ServerCert>>,
}

static SERVER: OnceLock<TlsServer> = OnceLock::new();

/// Runs SQL as the superuser through the unix socket; returns psql's unaligned output.
fn psql(cluster: &support::Cluster, sql: &str) -> String {
    let out = cluster
        .psql("postgres")
        .args(["-At", "-c", sql])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{sql} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.log()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Reloads the server's configuration (and so its certificate) and waits until the postmaster
/// has: a new session then sees a later `pg_conf_load_time()`, and every connection accepted
/// after it gets the reloaded certificate.
async fn reload(cluster: &support::Cluster) {
    let before = psql(cluster, "SELECT pg_conf_load_time()");
    psql(cluster, "SELECT pg_reload_conf()");
    let newer = format!("SELECT pg_conf_load_time() > '{before}'");
    support::wait_until(Duration::from_secs(10), "the server reloaded", || {
        let done = psql(cluster, &newer) == "t";
        async move { done }
    })
    .await;
}

fn start_server() -> TlsServer {
    let cluster = support::cluster_with(&[]);
    // Inside the cluster's directory, which goes away with it; the server (OS user postgres)
    // reads its certificate and key from here.
    let certs = cluster.dir.join("certs");
    std::fs::create_dir(&certs).expect("mkdir certs");
    std::fs::set_permissions(&certs, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    make_ca(&certs, "slotstream-test-ca");
    make_ca(&certs, "other-ca");
    make_server_cert(
        &certs,
        "localhost",
        "slotstream-test-ca",
        "DNS:localhost,IP:127.0.0.1",
    );
    make_server_cert(
        &certs,
        "elsewhere",
        "slotstream-test-ca",
        "DNS:db.example.invalid",
    );
    std::fs::write(certs.join("not-a-cert.pem"), "this is not a certificate\n").expect("write");
    let (crt, key) = (certs.join("server.crt"), certs.join("server.key"));
    std::fs::copy(certs.join("localhost.crt"), &crt).expect("copy certificate");
    std::fs::copy(certs.join("localhost.key"), &key).expect("copy key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
    if let Some((uid, gid)) = cluster.run_as {
        std::os::unix::fs::chown(&key, Some(uid), Some(gid)).expect("chown key");
    }
    // TCP only with TLS; SCRAM as everywhere in the suite.
    std::fs::write(
        cluster.dir.join("data/pg_hba.conf"),
        "local all all trust\n\
         hostssl all all 127.0.0.1/32 scram-sha-256\n\
         hostssl replication all 127.0.0.1/32 scram-sha-256\n",
    )
    .expect("write pg_hba.conf");
    psql(
        &cluster,
        &format!("ALTER SYSTEM SET ssl_cert_file = '{}'", crt.display()),
    );
    psql(
        &cluster,
        &format!("ALTER SYSTEM SET ssl_key_file = '{}'", key.display()),
    );
    psql(&cluster, "ALTER SYSTEM SET ssl = on");
    TlsServer {
        cluster,
        certs,
        serving: tokio::sync::Mutex::new(None),
    }
}

/// The TLS cluster, presenting `cert`, for this test alone until the guard drops.
async fn tls_server(
    cert: ServerCert,
) -> (
    &'static TlsServer,
    tokio::sync::MutexGuard<'static, Option<ServerCert>>,
) {
    let server = SERVER.get_or_init(start_server);
    let mut serving = server.serving.lock().await;
    if *serving != Some(cert) {
        // Rewritten in place: the key file keeps its owner and mode.
        for ext in ["crt", "key"] {
            let pem = std::fs::read(server.certs.join(format!("{}.{ext}", cert.stem())))
                .expect("read certificate");
            std::fs::write(server.certs.join(format!("server.{ext}")), pem)
                .expect("install certificate");
        }
        reload(&server.cluster).await;
        assert_eq!(psql(&server.cluster, "SHOW ssl"), "on");
        *serving = Some(cert);
    }
    (server, serving)
}

impl TlsServer {
    fn cert(&self, name: &str) -> PathBuf {
        self.certs.join(name)
    }
}

/// Points the fixture's config at `host` with `sslmode` and, if given, `sslrootcert`.
fn set_tls(fx: &support::Fixture, host: &str, sslmode: &str, rootcert: Option<&Path>) {
    let text = std::fs::read_to_string(&fx.config).expect("read config");
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("host = ") {
            out.push_str(&format!("host = \"{host}\"\n"));
        } else if line.starts_with("sslmode = ") {
            out.push_str(&format!("sslmode = \"{sslmode}\"\n"));
            if let Some(ca) = rootcert {
                out.push_str(&format!("sslrootcert = \"{}\"\n", ca.display()));
            }
        } else if !line.starts_with("sslrootcert = ") {
            out.push_str(line);
            out.push('\n');
        }
    }
    std::fs::write(&fx.config, out).expect("write config");
}

/// A fixture on the TLS cluster with three rows.
async fn fixture(server: &TlsServer) -> support::Fixture {
    let fx = support::users_fixture_in(&server.cluster, support::USERS_TABLE, "", None).await;
    fx.db
        .connect()
        .await
        .batch_execute(
            "INSERT INTO users (user_id, email, name, plan)
             SELECT 'u' || g, 'u' || g || '@example.com', 'n' || g, 'free'
               FROM generate_series(1, 3) g",
        )
        .await
        .expect("insert rows");
    fx
}

/// `check` passes and reports the session encrypted as `sslmode` says.
fn assert_check_passes(fx: &support::Fixture, encrypted: &str) {
    let out = support::run_check(&fx.config);
    assert_eq!(out.code, 0, "{}", out.dump());
    assert!(
        out.with_mark('✓').iter().any(|l| l.contains(encrypted)),
        "no ✓ line containing {encrypted:?}\n{}",
        out.dump()
    );
}

/// `check` fails on the TLS line containing `detail`, with a fix under it.
fn assert_check_fails(fx: &support::Fixture, detail: &str) {
    let out = support::run_check(&fx.config);
    assert_ne!(out.code, 0, "{}", out.dump());
    let failures = out.failures();
    let line = failures
        .iter()
        .find(|l| l.contains(detail))
        .unwrap_or_else(|| panic!("no ✗ line containing {detail:?}\n{}", out.dump()));
    assert!(
        !out.fixes_under(line).is_empty(),
        "no fix under {line:?}\n{}",
        out.dump()
    );
}

/// A full sync over TLS: `run --once` delivers the three rows, so the control connection and
/// the replication connection (which created the slot) both connected.
fn assert_full_sync(fx: &support::Fixture) {
    fx.run_once();
    let events = fx.events();
    assert_eq!(events.len(), 3, "{events:#?}");
    assert!(
        events
            .iter()
            .all(|e| e["context"]["sources"]["op"] == "snapshot"),
        "{events:#?}"
    );
}

/// A row inserted now arrives through the replication stream of the next `run --once`.
async fn assert_streams(fx: &support::Fixture, user: &str) {
    fx.db
        .connect()
        .await
        .execute(
            "INSERT INTO users (user_id, email, name, plan) VALUES ($1, 'x@example.com', 'x', 'pro')",
            &[&user],
        )
        .await
        .expect("insert");
    let before = fx.events().len();
    fx.run_once();
    let events = fx.events();
    let new = &events[before..];
    assert_eq!(new.len(), 1, "{new:#?}");
    assert_eq!(new[0]["context"]["sources"]["op"], "insert", "{new:#?}");
    assert_eq!(new[0]["userId"], user, "{new:#?}");
}

/// Kills the child if the test ends before it did.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `slotstream run` (not `--once`: it would retry a retryable error forever) must stop by
/// itself, promptly, with exit 1, one `error:` sentence containing `detail` and a `hint:`;
/// returns stderr.
async fn assert_run_stops(config: &Path, detail: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("run.log");
    let child = Command::new(support::slotstream_bin())
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn slotstream run");
    let mut child = KillOnDrop(child);
    let mut code = None;
    support::wait_until(PROMPT_EXIT, "slotstream run to stop by itself", || {
        if let Ok(Some(status)) = child.0.try_wait() {
            code = Some(status.code());
        }
        let done = code.is_some();
        async move { done }
    })
    .await;
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(code, Some(Some(1)), "{stderr}");
    assert!(
        !stderr.contains("resuming from the checkpoint"),
        "a TLS configuration error was retried:\n{stderr}"
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains(detail), "{stderr}");
    assert!(stderr.lines().any(|l| l.starts_with("hint: ")), "{stderr}");
    stderr
}

/// The replication connection on its own (the one `run` opens after its control
/// connections): it refuses with a fatal error containing `detail`.
async fn assert_replication_refused(config: &Path, detail: &str) {
    let config = Config::load(config).expect("config");
    let err = match replication_config(&config.source, &config.name, Lsn::ZERO, Lsn::ZERO, 8).await
    {
        Ok(_) => panic!("the replication connection accepted what it must refuse ({detail})"),
        Err(e) => Error::from(e),
    };
    assert!(err.to_string().contains(detail), "{err}");
    assert!(!err.is_retryable(), "retryable: {err}");
    assert!(!err.hint().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn require_encrypts_without_checks_unless_a_root_certificate_is_given() {
    // The certificate names another host and its CA is nobody's: require does not mind.
    let (server, _turn) = tls_server(ServerCert::Elsewhere).await;
    let fx = fixture(server).await;
    set_tls(&fx, "127.0.0.1", "require", None);
    assert_check_passes(&fx, "encrypted with TLS (sslmode = require)");
    assert_full_sync(&fx);
    assert_streams(&fx, "r1").await;

    // As in libpq, require with sslrootcert checks the chain (and still not the name).
    set_tls(
        &fx,
        "localhost",
        "require",
        Some(&server.cert("slotstream-test-ca.crt")),
    );
    assert_check_passes(&fx, "sslmode = require, certificate chain verified");
    assert_streams(&fx, "r2").await;
    set_tls(
        &fx,
        "localhost",
        "require",
        Some(&server.cert("other-ca.crt")),
    );
    let untrusted = "the server's certificate is not signed by a CA in";
    assert_check_fails(&fx, untrusted);
    assert_run_stops(&fx.config, untrusted).await;
    assert_replication_refused(&fx.config, untrusted).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_accepts_the_dns_name_and_the_ip_address_the_certificate_holds() {
    let (server, _turn) = tls_server(ServerCert::Localhost).await;
    let fx = fixture(server).await;
    let ca = server.cert("slotstream-test-ca.crt");
    let verified = "sslmode = verify-full, certificate chain and host name verified";

    set_tls(&fx, "localhost", "verify-full", Some(&ca));
    assert_check_passes(&fx, verified);
    assert_full_sync(&fx);
    assert_streams(&fx, "dns").await;

    // An IP address in host is checked against the certificate's IP addresses.
    set_tls(&fx, "127.0.0.1", "verify-full", Some(&ca));
    assert_check_passes(&fx, verified);
    assert_streams(&fx, "ip").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_ca_checks_the_chain_but_not_the_host_name() {
    // Neither localhost nor 127.0.0.1 is a name of this certificate.
    let (server, _turn) = tls_server(ServerCert::Elsewhere).await;
    let fx = fixture(server).await;
    let verified = "sslmode = verify-ca, certificate chain verified";

    set_tls(
        &fx,
        "localhost",
        "verify-ca",
        Some(&server.cert("slotstream-test-ca.crt")),
    );
    assert_check_passes(&fx, verified);
    assert_full_sync(&fx);
    assert_streams(&fx, "dns").await;
    set_tls(
        &fx,
        "127.0.0.1",
        "verify-ca",
        Some(&server.cert("slotstream-test-ca.crt")),
    );
    assert_check_passes(&fx, verified);
    assert_streams(&fx, "ip").await;

    // The chain is checked: another CA is refused, at once.
    set_tls(
        &fx,
        "localhost",
        "verify-ca",
        Some(&server.cert("other-ca.crt")),
    );
    let untrusted = format!(
        "the server's certificate is not signed by a CA in {}",
        server.cert("other-ca.crt").display()
    );
    assert_check_fails(&fx, &untrusted);
    assert_run_stops(&fx.config, &untrusted).await;
    assert_replication_refused(&fx.config, &untrusted).await;

    // A CA file that holds no certificate.
    set_tls(
        &fx,
        "localhost",
        "verify-ca",
        Some(&server.cert("not-a-cert.pem")),
    );
    let unusable = "not-a-cert.pem holds no PEM certificate";
    assert_check_fails(&fx, unusable);
    assert_run_stops(&fx.config, unusable).await;
    assert_replication_refused(&fx.config, unusable).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_refuses_a_certificate_for_another_name_at_once() {
    let (server, _turn) = tls_server(ServerCert::Elsewhere).await;
    let fx = fixture(server).await;
    for host in ["localhost", "127.0.0.1"] {
        set_tls(
            &fx,
            host,
            "verify-full",
            Some(&server.cert("slotstream-test-ca.crt")),
        );
        let wrong_name = format!(
            "the server's certificate is not valid for {host} (it names db.example.invalid)"
        );
        assert_check_fails(&fx, &wrong_name);
        let stderr = assert_run_stops(&fx.config, &wrong_name).await;
        assert!(stderr.contains("hint: set source.host"), "{stderr}");
        assert_replication_refused(&fx.config, &wrong_name).await;
    }
    assert!(fx.events().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn require_stops_at_once_on_a_server_without_tls() {
    // The suite's shared cluster runs without TLS.
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    set_tls(&fx, "127.0.0.1", "require", None);
    let detail = format!(
        "the server at 127.0.0.1:{} does not offer TLS",
        fx.db.cluster.port
    );
    let stderr = assert_run_stops(&fx.config, &detail).await;
    assert!(
        stderr.contains("hint: enable TLS on the server"),
        "{stderr}"
    );
    assert_replication_refused(&fx.config, &detail).await;
}
