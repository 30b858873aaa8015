//! SIGTERM is the one shutdown path: stop reading, drain what was read, deliver it, checkpoint
//! it, acknowledge it to the slot, exit 0 — within seconds.
//!
//! The batch delay is set to an hour, so nothing the stream reads reaches the file before the
//! signal: whatever the file holds afterwards was delivered by the drain. The signal is sent
//! once the walsender reports having sent the last commit (`pg_stat_replication.sent_lsn`),
//! i.e. once slotstream has it on its socket; a SIGTERM stops reading only after what is
//! already received has been handed on.

use crate::support;
use crate::support::faults;

use std::collections::BTreeSet;
use std::time::Duration;

const ROWS: usize = 200;

async fn sent_lsn(c: &tokio_postgres::Client, slot: &str) -> Option<u64> {
    c.query_opt(
        "SELECT (r.sent_lsn - '0/0')::int8 FROM pg_stat_replication r
           JOIN pg_replication_slots s ON s.active_pid = r.pid
          WHERE s.slot_name = $1",
        &[&slot],
    )
    .await
    .unwrap()
    .and_then(|r| r.get::<_, Option<i64>>(0))
    .map(|v| v as u64)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_delivers_checkpoints_and_acknowledges_what_was_read() {
    let fx = support::users_fixture(
        support::USERS_TABLE,
        "[schedule]\nmax_batch_delay = \"1h\"\nmax_batch_events = 100000\n",
        None,
    )
    .await;
    let c = fx.db.connect().await;
    let mut child = faults::Running(fx.spawn_run());
    support::wait_until(
        Duration::from_secs(30),
        "the full sync and the stream start",
        || async {
            fx.full_sync_state().await.as_deref() == Some("done")
                && sent_lsn(&c, &fx.slot).await.is_some()
        },
    )
    .await;

    // Rows committed while running, one transaction each, flushed at commit.
    c.batch_execute("SET synchronous_commit = on")
        .await
        .unwrap();
    for i in 1..=ROWS {
        c.execute(
            "INSERT INTO users (user_id, plan) VALUES ($1, 'free')",
            &[&format!("u{i}")],
        )
        .await
        .unwrap();
    }
    let last_commit_bound = faults::wal_insert_lsn(&c).await;
    support::wait_until(
        Duration::from_secs(30),
        "the walsender sent the last commit",
        || async {
            sent_lsn(&c, &fx.slot)
                .await
                .is_some_and(|s| s >= last_commit_bound)
        },
    )
    .await;
    assert!(
        fx.events().is_empty(),
        "events were delivered before the signal although the batch delay is an hour"
    );
    let (before, _) = fx.positions().await;
    assert!(
        before.is_some_and(|b| b < last_commit_bound),
        "the checkpoint {before:?} already covers undelivered rows"
    );

    support::sigterm(&child);
    let status = faults::wait_exit(&mut child, Duration::from_secs(10)).await;
    let log = fx.run_log();
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("slotstream did not exit within 10 s of SIGTERM\n{log}");
    };
    assert_eq!(status.code(), Some(0), "exit status {status}\n{log}");
    assert!(!log.contains("panicked"), "{log}");

    // Every committed row, delivered once.
    let events = fx.events();
    let users: Vec<&str> = events
        .iter()
        .map(|e| e["userId"].as_str().unwrap())
        .collect();
    let unique: BTreeSet<&str> = users.iter().copied().collect();
    let want: BTreeSet<String> = (1..=ROWS).map(|i| format!("u{i}")).collect();
    assert_eq!(
        unique,
        want.iter().map(String::as_str).collect(),
        "the drain must deliver every row read before the signal\n{log}"
    );
    assert_eq!(users.len(), ROWS, "a row was delivered twice");

    // What is delivered is checkpointed, and the checkpoint is acknowledged (the walsender
    // applies the last status update a moment after the process is gone).
    support::wait_until(
        Duration::from_secs(10),
        "the slot acknowledged up to the checkpoint",
        || async {
            let (checkpoint, confirmed) = fx.positions().await;
            checkpoint.is_some() && confirmed == checkpoint
        },
    )
    .await;
    let (checkpoint, confirmed) = fx.positions().await;
    let checkpoint = checkpoint.unwrap();
    let last = events.iter().map(faults::event_lsn).max().unwrap();
    assert!(
        checkpoint > last,
        "checkpoint {checkpoint:X} does not cover the last delivered commit {last:X}\n{log}"
    );
    assert_eq!(
        confirmed,
        Some(checkpoint),
        "the slot was not acknowledged up to the checkpoint\n{log}"
    );
}
