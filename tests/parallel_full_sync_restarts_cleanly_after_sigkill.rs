//! A full sync read by several connections (`snapshot_workers = 3`) and killed with SIGKILL
//! halfway starts again cleanly: the body of `full_sync_restarts_cleanly_after_sigkill` (the
//! restart reads a new snapshot, unchanged rows come again under the same messageIds, a crash
//! after the full sync never repeats it, the state rebuilt from every event equals the table),
//! with parallel readers. The killed run's sync run is left `running` by the kill and marked
//! `failed` when the next full sync starts; the restarted one succeeds with every range done.
//!
//! The table has `PARALLEL_FULL_SYNC_ROWS` rows (default 400,000).

use crate::parallel_full_sync_is_consistent_with_concurrent_writer::{WORKERS, row_count};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_full_sync_restarts_cleanly_after_sigkill() {
    let (fx, killed_log) =
        crate::full_sync_restarts_cleanly_after_sigkill::full_sync_restarts_cleanly_after_sigkill_with(
            row_count(),
            WORKERS,
        )
        .await;
    assert!(
        killed_log
            .lines()
            .any(|l| l.contains("full sync: parallel readers") && l.contains("readers=3")),
        "the killed full sync ran parallel readers:\n{killed_log}"
    );
    let admin = fx.db.connect().await;
    let runs: Vec<(String, Option<i32>, Option<i32>)> = admin
        .query(
            r#"SELECT status, ranges_done, ranges_total FROM "_rudderstack".cdc_sync_runs
                WHERE pipeline = $1 AND kind = 'snapshot' ORDER BY id"#,
            &[&fx.name],
        )
        .await
        .expect("sync runs")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    eprintln!("snapshot runs: {runs:?}");
    assert_eq!(
        runs.len(),
        2,
        "the killed full sync and its restart: {runs:?}"
    );
    assert_eq!(runs[0].0, "failed", "{runs:?}");
    assert_eq!(runs[1].0, "succeeded", "{runs:?}");
    assert!(
        runs[1].2.is_some_and(|t| t > i32::from(WORKERS)),
        "{runs:?}"
    );
    assert_eq!(runs[1].1, runs[1].2, "every range done: {runs:?}");
}
