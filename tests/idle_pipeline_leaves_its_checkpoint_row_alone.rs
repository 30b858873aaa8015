//! A pipeline on a quiet server does not rewrite its checkpoint row again and again. Each
//! checkpoint write is WAL of its own (and makes the server log a running-transactions record
//! soon after), so a checkpoint that followed every keepalive's WAL position kept itself busy
//! forever: an UPDATE of the row, and its WAL, every 10 s on a server where nothing happens.
//! The checkpoint follows idle WAL only once it has moved by 1 MiB (less frees no WAL file).
//!
//! A cluster of its own, so that no other test's WAL moves the position.

use crate::support;
use crate::support::faults;

use std::time::{Duration, Instant};

/// Longer than two idle checkpoint intervals (10 s each), plus keepalive delays.
const WATCH: Duration = Duration::from_secs(25);
/// How far the WAL may move without an idle checkpoint.
const MIN_ADVANCE: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_pipeline_leaves_its_checkpoint_row_alone() {
    let cluster = support::cluster_with(&[]);
    let fx = support::users_fixture_in(&cluster, support::USERS_TABLE, "", None).await;
    let c = fx.db.connect().await;
    c.batch_execute("INSERT INTO users (user_id, plan) VALUES ('u1', 'free')")
        .await
        .expect("row");
    let mut child = faults::Running(fx.spawn_run());
    support::wait_until(Duration::from_secs(30), "the stream", || async {
        fx.full_sync_state().await.as_deref() == Some("done") && fx.run_log().contains("streaming")
    })
    .await;

    let row = || async {
        let row = fx
            .db
            .connect()
            .await
            .query_one(
                r#"SELECT xmin::text, (lsn - '0/0')::int8 FROM "_rudderstack".cdc_checkpoints
                    WHERE pipeline = $1"#,
                &[&fx.name],
            )
            .await
            .expect("checkpoint row");
        (row.get::<_, String>(0), row.get::<_, i64>(1) as u64)
    };
    let before = row().await;
    let wal_before = faults::wal_insert_lsn(&c).await;
    let started = Instant::now();
    let mut writes = Vec::new();
    let mut last = before.clone();
    while started.elapsed() < WATCH {
        let now = row().await;
        if now != last {
            writes.push(format!("{:?}: {now:?}", started.elapsed()));
            last = now;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let wal_after = faults::wal_insert_lsn(&c).await;
    support::sigterm(&child);
    let status = faults::wait_exit(&mut child, Duration::from_secs(10)).await;
    let log = fx.run_log();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{log}");

    assert!(
        wal_after < before.1 + MIN_ADVANCE,
        "the WAL moved by 1 MiB past the checkpoint {:X} ({wal_before:X} → {wal_after:X}): the test cannot tell",
        before.1
    );
    assert!(
        writes.is_empty(),
        "the checkpoint row (xmin, lsn) {before:?} was rewritten on a quiet server (WAL {wal_before:X} → {wal_after:X}): {writes:#?}"
    );
}
