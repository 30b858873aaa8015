//! A full sync read by several connections at once (`[sync] snapshot_workers = 3`, each
//! COPYing `ctid` ranges of the one exported snapshot) keeps every guarantee of the single
//! reader under a writer that inserts, updates and deletes during it and after it: the state
//! rebuilt from the events equals the table, no row is both in the snapshot and inserted by the
//! stream, no messageId is sent twice (the body of
//! `full_sync_is_consistent_with_concurrent_writer`). It also checks that the readers did share
//! the work: the log names 3 readers and more ranges than readers, and the snapshot's sync run
//! in `_rudderstack.cdc_sync_runs` ends with every range done.
//!
//! The table has `PARALLEL_FULL_SYNC_ROWS` rows (default 400,000: ~40 MiB, a dozen ranges).

use crate::support;

/// Readers of the parallel scenarios (also `parallel_full_sync_restarts_cleanly_after_sigkill`).
pub const WORKERS: u16 = 3;

/// Rows of the parallel scenarios' table.
pub fn row_count() -> i64 {
    std::env::var("PARALLEL_FULL_SYNC_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_full_sync_is_consistent_with_concurrent_writer() {
    parallel_full_sync_is_consistent_with_concurrent_writer_in(support::cluster(), row_count())
        .await;
}

/// The scenario on `cluster` (also run on PostgreSQL 18 by `core_on_postgres_18`).
pub async fn parallel_full_sync_is_consistent_with_concurrent_writer_in(
    cluster: &'static support::Cluster,
    rows: i64,
) {
    let fx = crate::full_sync_is_consistent_with_concurrent_writer::full_sync_is_consistent_with_concurrent_writer_in(
        cluster,
        rows,
        Some(WORKERS),
    )
    .await;
    let log = fx.run_log();
    let planned = log
        .lines()
        .find(|l| l.contains("full sync: parallel readers"))
        .unwrap_or_else(|| panic!("the full sync must run parallel readers:\n{log}"));
    assert!(
        planned.contains(&format!("readers={WORKERS}")),
        "{WORKERS} readers: {planned}"
    );
    let admin = fx.db.connect().await;
    let run = admin
        .query_one(
            r#"SELECT rows, status, ranges_done, ranges_total
                 FROM "_rudderstack".cdc_sync_runs
                WHERE pipeline = $1 AND kind = 'snapshot'"#,
            &[&fx.name],
        )
        .await
        .expect("one snapshot sync run");
    let (read, status, done, total): (i64, String, Option<i32>, Option<i32>) =
        (run.get(0), run.get(1), run.get(2), run.get(3));
    eprintln!("snapshot run: {read} rows, {status}, ranges {done:?}/{total:?}");
    assert_eq!(status, "succeeded");
    let total = total.expect("ranges_total");
    assert!(
        total > i32::from(WORKERS),
        "more ranges than readers: {total}"
    );
    assert_eq!(done, Some(total), "every range done");
    assert!(
        planned.contains(&format!("ranges={total}")),
        "the log and the sync run agree: {planned}"
    );
    assert!(read >= rows * 9 / 10, "rows of the snapshot: {read}");
}
