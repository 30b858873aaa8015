//! `run` verifies the publication on its own, with `check`'s code: at start, on Relation
//! messages of the followed table, and before every checkpoint. A publication that does not
//! (or no longer does) send what the mapping needs stops the pipeline with exit 3, `check`'s
//! line and its fix, before the checkpoint moves past a change it did not deliver.

use std::time::Duration;

use crate::support;
use crate::support::faults::{self, Running};
use support::{Fixture, USERS_TABLE, users_fixture};

/// The publication's name (setup.sql was given the slot's name).
fn publication(fx: &Fixture) -> String {
    fx.slot.clone()
}

/// `run --once` exits 3 with `expected` as its error line, creates no slot and sends nothing;
/// `check` prints the same line as a failure.
async fn assert_refused_at_start(fx: &Fixture, expected: &str) {
    let (code, out, err) = fx.slotstream("run", &["--once"]);
    assert_eq!(code, 3, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains(&format!("error: {expected}\n")),
        "expected `error: {expected}` in:\n{err}"
    );
    let slots: i64 = fx
        .db
        .connect()
        .await
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&fx.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "refused before creating the slot");
    assert!(fx.events().is_empty(), "{:#?}", fx.events());
    let check = support::run_check(&fx.config);
    assert!(
        check.failures().iter().any(|f| f == expected),
        "check prints the same line:\n{}",
        check.dump()
    );
}

#[tokio::test]
async fn run_refuses_a_publication_without_updates() {
    let fx = users_fixture(USERS_TABLE, "", None).await;
    let p = publication(&fx);
    fx.db
        .connect()
        .await
        .batch_execute(&format!(
            "ALTER PUBLICATION \"{p}\" SET (publish = 'insert')"
        ))
        .await
        .unwrap();
    let expected =
        format!("publication \"{p}\" publishes insert, but upsert mode needs update too");
    assert_refused_at_start(&fx, &expected).await;
    let (_, _, err) = fx.slotstream("run", &["--once"]);
    assert!(
        err.contains(&format!(
            "    ALTER PUBLICATION \"{p}\" SET (publish = 'insert, update');"
        )),
        "the fix: {err}"
    );
}

#[tokio::test]
async fn run_refuses_a_row_filter_that_differs_from_the_config() {
    let fx = users_fixture(
        USERS_TABLE,
        "[mapping]\nfilter = \"plan = 'pro'\"\n",
        Some("plan = 'free'"),
    )
    .await;
    let p = publication(&fx);
    let expected = format!(
        "publication \"{p}\" filters \"public\".\"users\" by (plan = 'free'::text), but [mapping] filter is (plan = 'pro'::text)"
    );
    assert_refused_at_start(&fx, &expected).await;
}

#[tokio::test]
async fn run_refuses_a_column_list_without_a_selected_column() {
    let fx = users_fixture(
        USERS_TABLE,
        "[mapping]\ncolumns = [\"name\", \"plan\"]\n",
        None,
    )
    .await;
    let p = publication(&fx);
    fx.db
        .connect()
        .await
        .batch_execute(&format!(
            "ALTER PUBLICATION \"{p}\" SET TABLE users (id, user_id, email, plan)"
        ))
        .await
        .unwrap();
    let expected = format!(
        "publication \"{p}\" publishes only the columns \"id\", \"user_id\", \"email\", \"plan\" of \"public\".\"users\" and leaves out \"name\", which the mapping reads"
    );
    assert_refused_at_start(&fx, &expected).await;
}

/// Starts a continuous run after a full sync of one row and waits until a streamed insert of
/// `u2` was delivered.
async fn streaming(fx: &Fixture) -> Running {
    let c = fx.db.connect().await;
    c.batch_execute("INSERT INTO users (user_id, plan) VALUES ('u1', 'free')")
        .await
        .unwrap();
    let child = Running(fx.spawn_run());
    support::wait_until(Duration::from_secs(30), "the full sync", || async {
        fx.full_sync_state().await.as_deref() == Some("done")
    })
    .await;
    c.batch_execute("INSERT INTO users (user_id, plan) VALUES ('u2', 'free')")
        .await
        .unwrap();
    support::wait_until(Duration::from_secs(30), "the streamed insert", || async {
        fx.events().iter().any(|e| e["userId"] == "u2")
    })
    .await;
    child
}

/// The run exits 3 within `timeout`, saying `expected` and printing `fix`; neither the
/// checkpoint nor the slot moved past `before` (taken before the undelivered change), and no
/// event carries `user`.
async fn assert_stopped(
    fx: &Fixture,
    child: &mut Running,
    timeout: Duration,
    expected: &str,
    fix: &str,
    before: u64,
    user: &str,
) {
    let status = faults::wait_exit(child, timeout).await;
    let log = fx.run_log();
    assert_eq!(status.and_then(|s| s.code()), Some(3), "{log}");
    assert!(log.contains(&format!("error: {expected}\n")), "{log}");
    assert!(log.contains(&format!("\n    {fix}\n")), "{log}");
    assert!(log.contains("`slotstream resync`"), "{log}");
    let (checkpoint, confirmed) = fx.positions().await;
    assert!(
        checkpoint.is_some_and(|c| c <= before) && confirmed.is_some_and(|c| c <= before),
        "checkpoint {checkpoint:X?} and slot {confirmed:X?} must not pass {before:X}"
    );
    assert!(
        !fx.events().iter().any(|e| e["userId"] == user),
        "{:#?}",
        fx.events()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn run_stops_when_the_table_leaves_the_publication() {
    let fx = users_fixture(USERS_TABLE, "", None).await;
    let p = publication(&fx);
    let mut child = streaming(&fx).await;
    let c = fx.db.connect().await;
    c.batch_execute(&format!("ALTER PUBLICATION \"{p}\" DROP TABLE users"))
        .await
        .unwrap();
    let before = faults::wal_insert_lsn(&c).await;
    // pgoutput sends nothing of this insert: only the publication check can notice.
    c.batch_execute("INSERT INTO users (user_id, plan) VALUES ('u3', 'pro')")
        .await
        .unwrap();
    assert_stopped(
        &fx,
        &mut child,
        Duration::from_secs(40),
        &format!("publication \"{p}\" does not publish table \"public\".\"users\""),
        &format!("ALTER PUBLICATION \"{p}\" ADD TABLE \"public\".\"users\";"),
        before,
        "u3",
    )
    .await;

    // The printed way forward: the fix, then a resync, and u3 arrives.
    c.batch_execute(&format!(
        "ALTER PUBLICATION \"{p}\" ADD TABLE \"public\".\"users\""
    ))
    .await
    .unwrap();
    let (code, out, err) = fx.slotstream("resync", &[]);
    assert_eq!(code, 0, "{out}{err}");
    fx.run_once();
    assert!(
        fx.events().iter().any(|e| e["userId"] == "u3"),
        "{:#?}",
        fx.events()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn run_stops_when_the_column_list_narrows_while_streaming() {
    let fx = users_fixture(
        USERS_TABLE,
        "[mapping]\ncolumns = [\"name\", \"plan\"]\n",
        None,
    )
    .await;
    let p = publication(&fx);
    let mut child = streaming(&fx).await;
    let c = fx.db.connect().await;
    c.batch_execute(&format!(
        "ALTER PUBLICATION \"{p}\" SET TABLE users (id, user_id, email, plan)"
    ))
    .await
    .unwrap();
    let before = faults::wal_insert_lsn(&c).await;
    c.batch_execute("INSERT INTO users (user_id, name, plan) VALUES ('u3', 'Cy', 'pro')")
        .await
        .unwrap();
    assert_stopped(
        &fx,
        &mut child,
        Duration::from_secs(20),
        &format!(
            "publication \"{p}\" publishes only the columns \"id\", \"user_id\", \"email\", \"plan\" of \"public\".\"users\" and leaves out \"name\", which the mapping reads"
        ),
        &format!("ALTER PUBLICATION \"{p}\" SET TABLE \"public\".\"users\";"),
        before,
        "u3",
    )
    .await;
}
