//! An idle followed table must not pin WAL: while another table (not in the publication)
//! churns, keepalives received with nothing pending move the checkpoint, and the slot's
//! `confirmed_flush_lsn` follows (docs/architecture.md §8 invariant 2). Idle checkpoints are taken at most
//! every 10 s, hence the generous wait.

use crate::support;
use crate::support::faults;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn confirmed_flush_follows_other_tables_wal() {
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    let c = fx.db.connect().await;
    c.batch_execute(
        "CREATE TABLE public.other (id bigserial PRIMARY KEY, payload text);
         INSERT INTO users (user_id, plan) VALUES ('u1', 'free')",
    )
    .await
    .unwrap();
    let mut child = faults::Running(fx.spawn_run());
    support::wait_until(Duration::from_secs(30), "the full sync", || async {
        fx.full_sync_state().await.as_deref() == Some("done")
    })
    .await;
    let (start_checkpoint, start_confirmed) = fx.positions().await;

    // Churn on the other table until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let churned = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, churned) = (stop.clone(), churned.clone());
        let w = fx.db.connect().await;
        tokio::spawn(async move {
            let mut pace = tokio::time::interval(Duration::from_millis(5));
            while !stop.load(Ordering::Relaxed) {
                pace.tick().await;
                w.batch_execute("INSERT INTO other (payload) SELECT repeat('x', 200) FROM generate_series(1, 20)")
                    .await
                    .unwrap();
                churned.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    support::wait_until(Duration::from_secs(30), "some churn", || async {
        churned.load(Ordering::Relaxed) >= 200
    })
    .await;
    let target = faults::wal_insert_lsn(&c).await;
    assert!(start_confirmed.is_some_and(|s| s < target));

    let mut last = (start_checkpoint, start_confirmed);
    let result = tokio::time::timeout(Duration::from_secs(45), async {
        loop {
            let now = fx.positions().await;
            let (checkpoint, confirmed) = now;
            assert!(
                confirmed <= checkpoint,
                "slot {confirmed:?} ahead of checkpoint {checkpoint:?}"
            );
            assert!(
                checkpoint >= last.0,
                "checkpoint moved backward: {:?} -> {checkpoint:?}",
                last.0
            );
            last = now;
            if confirmed.is_some_and(|c| c >= target) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    support::sigterm(&child);
    let status = faults::wait_exit(&mut child, Duration::from_secs(10)).await;
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let log = fx.run_log();
    assert!(
        result.is_ok(),
        "confirmed_flush_lsn stayed at {:X?} (checkpoint {:X?}), behind {target:X}, for 45 s while another table churned\n{log}",
        last.1,
        last.0
    );
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{log}");
    let events = fx.events();
    assert_eq!(events.len(), 1, "only the full sync's row: {events:#?}");
}
