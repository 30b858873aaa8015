//! A failure that would come back on every retry stops `run` at once (exit 1, one error line and
//! a hint, no retry): a row filter that divides by zero for some row, in the full sync's COPY
//! and in the stream (the publication's filter, evaluated by the walsender), and a SELECT
//! privilege revoked from slotstream's role. Transient failures stay retried: see
//! `second_run_of_a_pipeline_stops_as_already_running` (every backend terminated) and
//! `stream_reconnects_after_postgres_restart`.

use crate::support;

const TABLE: &str = "CREATE TABLE public.users (
    id bigserial PRIMARY KEY, user_id text NOT NULL, n int NOT NULL);
ALTER TABLE public.users REPLICA IDENTITY FULL";

/// Divides by zero for the rows with n = 0.
const FILTER: &str = "10 / n > 0";

/// `run --once` stops at once: exit 1, the error line contains `error`, the hint `hint`.
fn assert_stops(fx: &support::Fixture, error: &str, hint: &str) {
    let (code, stdout, stderr) = fx.slotstream("run", &["--once"]);
    let dump = format!("exit {code}\n--- stdout\n{stdout}--- stderr\n{stderr}");
    assert_eq!(code, 1, "{dump}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no `error:` line\n{dump}"));
    assert!(line.contains(error), "the error says {error:?}\n{dump}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("hint: "))
        .unwrap_or_else(|| panic!("no `hint:` line\n{dump}"));
    assert!(line.contains(hint), "the hint says {hint:?}\n{dump}");
    assert!(
        !stderr.contains("resuming from the checkpoint"),
        "a deterministic failure is not retried\n{dump}"
    );
}

async fn filtered_fixture() -> support::Fixture {
    support::users_fixture(
        TABLE,
        &format!("[mapping]\nfilter = \"{FILTER}\"\n"),
        Some(FILTER),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_filter_dividing_by_zero_stops_the_full_sync() {
    let fx = filtered_fixture().await;
    fx.db
        .connect()
        .await
        .batch_execute("INSERT INTO users (user_id, n) VALUES ('u1', 1), ('u2', 0), ('u3', 2)")
        .await
        .unwrap();
    assert_stops(&fx, "division by zero", "[mapping] filter");
    assert!(fx.events().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_filter_dividing_by_zero_stops_the_stream() {
    let fx = filtered_fixture().await;
    let c = fx.db.connect().await;
    c.batch_execute("INSERT INTO users (user_id, n) VALUES ('u1', 1), ('u3', 2)")
        .await
        .unwrap();
    fx.run_once();
    assert_eq!(fx.events().len(), 2);
    c.batch_execute("INSERT INTO users (user_id, n) VALUES ('u2', 0)")
        .await
        .unwrap();
    assert_stops(&fx, "division by zero", "[mapping] filter");
    assert_eq!(fx.events().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_select_privilege_stops_the_full_sync() {
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    let c = fx.db.connect().await;
    c.batch_execute(&format!(
        "INSERT INTO users (user_id, plan) VALUES ('u1', 'free');
         REVOKE SELECT ON users FROM {}",
        fx.role
    ))
    .await
    .unwrap();
    assert_stops(&fx, "permission denied", "grant");
    assert!(fx.events().is_empty());
}
