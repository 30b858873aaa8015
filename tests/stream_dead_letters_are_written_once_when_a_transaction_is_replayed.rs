//! The dead letters of a transaction are written once, even when the transaction is read twice.
//!
//! A transaction larger than a batch is delivered in several batches, and checkpoints between
//! them record the dead letters met so far while the checkpoint position stays before the
//! transaction. A crash then (SIGKILL, while a slow destination — a pipe read slowly — holds the
//! transaction up) makes the next run read the whole transaction again: its rows without
//! identifier must not be dead-lettered a second time, nor counted twice in the sync runs.

use crate::support;
use crate::support::faults;

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Rows of the transaction without any identifier (at its start).
const NAMELESS: i64 = 10;
/// Identified rows after them.
const IDENTIFIED: i64 = 5000;

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_of_a_replayed_transaction_are_written_once() {
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    let c = fx.db.connect().await;
    // The same pipeline, writing to stdout.
    let dir = fx.dir.path().join("stdout");
    std::fs::create_dir(&dir).expect("dir");
    let config = fx.db.write_config(
        &dir,
        &fx.name,
        &fx.role,
        "pw",
        "users",
        // Without the ledger every replayed row is sent again (with it, rows delivered before
        // the crash are known as sent and suppressed), which this test counts on.
        "[schedule]\nmax_batch_events = 100\n[sync]\nledger = false\n",
    );
    let config = config.to_str().expect("utf-8 path");
    let (code, _, err) = support::run_slotstream(&["run", "--config", config, "--once"]);
    assert_eq!(code, 0, "{err}");

    let mut child = faults::Running(
        Command::new(support::slotstream_bin())
            .args(["run", "--config", config])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn run"),
    );
    // A slow destination: a few KiB at a time.
    let mut pipe = child.stdout.take().expect("stdout");
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        })
    };

    c.batch_execute(&format!(
        "BEGIN;
         INSERT INTO users (name) SELECT 'nobody ' || g FROM generate_series(1, {NAMELESS}) g;
         INSERT INTO users (user_id, name, plan)
            SELECT 'u' || g, 'user ' || g, 'free' FROM generate_series(1, {IDENTIFIED}) g;"
    ))
    .await
    .expect("the transaction");
    // Past the transaction's last change, before its commit record (WAL written by anything
    // else after the commit must not count: the checkpoint stops at the commit's end).
    let last_change = faults::wal_insert_lsn(&c).await;
    c.batch_execute("COMMIT").await.expect("commit");

    let dead_letters = || async {
        let c = fx.db.connect().await;
        let count: i64 = c
            .query_one(
                r#"SELECT count(*) FROM "_rudderstack".cdc_dead_letters WHERE pipeline = $1"#,
                &[&fx.name],
            )
            .await
            .expect("count")
            .get(0);
        count
    };
    // A checkpoint has recorded dead letters of the transaction, but not its end.
    support::wait_until(
        Duration::from_secs(60),
        "dead letters recorded while the transaction is being delivered",
        || async {
            let (checkpoint, _) = fx.positions().await;
            dead_letters().await > 0 && checkpoint.is_some_and(|p| p < last_change)
        },
    )
    .await;
    support::sigkill(&child);
    child.wait().expect("wait for the killed run");
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("reader");

    // The next run reads the whole transaction again.
    let (code, out, err) = support::run_slotstream(&["run", "--config", config, "--once"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().count() as i64 >= IDENTIFIED);
    let (checkpoint, _) = fx.positions().await;
    assert!(
        checkpoint.is_some_and(|p| p > last_change),
        "{checkpoint:?}"
    );

    assert_eq!(
        dead_letters().await,
        NAMELESS,
        "each row without identifier is dead-lettered once"
    );
    let counted: i64 = c
        .query_one(
            r#"SELECT coalesce(sum(dead_letters), 0)::int8 FROM "_rudderstack".cdc_sync_runs
                WHERE pipeline = $1"#,
            &[&fx.name],
        )
        .await
        .expect("sum")
        .get(0);
    assert_eq!(
        counted, NAMELESS,
        "the sync runs count each dead letter once"
    );
}
