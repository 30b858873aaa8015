//! When the connection itself fails (wrong password, nothing listening, TLS required by the
//! config but not offered by the server), `check` prints that one failure with its fix, stops,
//! and exits 3 — not 1, and without a Rust error chain.

use crate::support;

use std::net::TcpListener;

fn assert_single_failure(out: &support::CheckOutput) -> String {
    assert_eq!(out.code, 3, "{}", out.dump());
    let marked = out.marked();
    assert_eq!(
        marked.len(),
        1,
        "nothing runs after a failed connection:\n{}",
        out.dump()
    );
    assert_eq!(marked[0].0, '✗', "{}", out.dump());
    assert_eq!(out.summary(), "0 checks passed, 1 failed", "{}", out.dump());
    assert!(!out.stderr.contains("panicked"), "{}", out.dump());
    marked[0].1.clone()
}

#[tokio::test]
async fn check_fails_on_wrong_password() {
    let db = support::database().await;
    db.connect()
        .await
        .batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, user_id text)")
        .await
        .unwrap();
    support::apply_setup_sql(
        &db,
        &[
            ("schema", "public"),
            ("table", "users"),
            ("user", "rudder_badpw"),
            ("password", "right-password"),
            ("publication", "pub_badpw"),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let config = db.write_config(
        dir.path(),
        "badpw",
        "rudder_badpw",
        "wrong-password",
        "users",
        "",
    );
    let out = support::run_check(&config);
    let line = assert_single_failure(&out);
    assert_eq!(
        line,
        format!(
            "cannot log in to 127.0.0.1:{} as \"rudder_badpw\": password authentication failed for user \"rudder_badpw\"",
            db.cluster.port
        ),
        "{}",
        out.dump()
    );
    let fixes = out.fixes_under("cannot log in");
    assert!(
        fixes.iter().any(|f| f
            == "ALTER ROLE \"rudder_badpw\" WITH LOGIN PASSWORD '<the password in the config>';"),
        "{}",
        out.dump()
    );
    assert!(
        !out.stdout.contains("wrong-password"),
        "the password is never printed"
    );
}

#[tokio::test]
async fn check_fails_when_nothing_listens() {
    let db = support::database().await;
    let dir = tempfile::tempdir().unwrap();
    let config = db.write_config(dir.path(), "noserver", "rudder_noserver", "pw", "users", "");
    // A port that was free a moment ago and that no server listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &format!("port = {}", db.cluster.port),
        &format!("port = {port}"),
    );
    std::fs::write(&config, text).unwrap();
    let out = support::run_check(&config);
    let line = assert_single_failure(&out);
    assert!(
        line.starts_with(&format!("cannot reach PostgreSQL at 127.0.0.1:{port}: ")),
        "{}",
        out.dump()
    );
    assert!(
        out.fixes_under("cannot reach")
            .iter()
            .any(|f| f.contains("source.host and source.port")),
        "{}",
        out.dump()
    );
}

#[tokio::test]
async fn check_fails_when_tls_required_but_server_has_none() {
    let db = support::database().await;
    let admin = db.connect().await;
    let ssl: String = admin.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    assert_eq!(ssl, "off", "the test cluster runs without TLS");
    let dir = tempfile::tempdir().unwrap();
    let config = db.write_config(dir.path(), "notls", "rudder_notls", "pw", "users", "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("sslmode = \"disable\"", "sslmode = \"require\"");
    std::fs::write(&config, text).unwrap();
    let out = support::run_check(&config);
    let line = assert_single_failure(&out);
    assert_eq!(
        line,
        format!(
            "the server at 127.0.0.1:{} does not offer TLS, but sslmode = require needs an encrypted connection",
            db.cluster.port
        ),
        "{}",
        out.dump()
    );
    let fixes = out.fixes_under("does not offer TLS");
    assert_eq!(
        fixes.first().map(String::as_str),
        Some("ALTER SYSTEM SET ssl = on;"),
        "{}",
        out.dump()
    );
    assert!(
        fixes.iter().any(|f| f.contains("sslmode = \"prefer\"")),
        "{}",
        out.dump()
    );
}
