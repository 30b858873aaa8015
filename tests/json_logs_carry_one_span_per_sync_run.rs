//! `--log-format json` writes one JSON object per line, and the lines of a sync run carry its
//! span (`sync_run` with its `kind` and the position it started from): here the full sync's,
//! `kind = "snapshot"` (a session's stream and a window's delivery have theirs). No password in
//! any line.

use crate::support;

use std::process::Command;

#[tokio::test(flavor = "multi_thread")]
async fn json_log_lines_name_their_sync_run() {
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    let c = fx.db.connect().await;
    c.batch_execute("INSERT INTO users (user_id, plan) VALUES ('u1', 'pro')")
        .await
        .unwrap();
    let out = Command::new(support::slotstream_bin())
        .args(["--log-format", "json", "run", "--once", "--config"])
        .arg(&fx.config)
        .env("RUST_LOG", "info")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let span_of = |message: &str| {
        lines
            .iter()
            .find(|l| l["fields"]["message"] == message)
            .unwrap_or_else(|| panic!("no line {message:?}\n{stderr}"))["span"]
            .clone()
    };
    let snapshot = span_of("full sync read");
    assert_eq!(snapshot["name"], "sync_run", "{stderr}");
    assert_eq!(snapshot["kind"], "snapshot", "{stderr}");
    assert!(snapshot["from"].as_str().is_some_and(|l| l.contains('/')));
    assert!(!stderr.contains("\"pw\""), "the password is never logged");
}
