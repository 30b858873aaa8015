//! The server restarts under a continuous `run`: the replication session and the control
//! connections break, slotstream reconnects with backoff and resumes at the checkpoint, and the
//! changes written after the restart arrive; nothing written before it is lost.
//!
//! On a cluster of its own: restarting the suite's shared cluster would break the other tests'
//! connections.

use crate::support;
use crate::support::faults;

use std::collections::BTreeSet;
use std::time::Duration;

const BEFORE: usize = 100;
const AFTER: usize = 100;

fn delivered(fx: &support::Fixture) -> BTreeSet<String> {
    fx.events()
        .iter()
        .map(|e| {
            format!(
                "{}:{}",
                e["userId"].as_str().unwrap(),
                e["traits"]["plan"].as_str().unwrap()
            )
        })
        .collect()
}

fn expected(range: std::ops::RangeInclusive<usize>) -> BTreeSet<String> {
    range.map(|i| format!("u{i}:free")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn events_written_after_a_server_restart_arrive() {
    let cluster = support::cluster_with(&[]);
    let fx = support::users_fixture_in(&cluster, support::USERS_TABLE, "", None).await;
    let mut child = faults::Running(fx.spawn_run());
    support::wait_until(Duration::from_secs(30), "the full sync", || async {
        fx.full_sync_state().await.as_deref() == Some("done")
    })
    .await;

    let c = fx.db.connect().await;
    for i in 1..=BEFORE {
        c.execute(
            "INSERT INTO users (user_id, plan) VALUES ($1, 'free')",
            &[&format!("u{i}")],
        )
        .await
        .unwrap();
    }
    // Written and committed, possibly not yet delivered, when the server goes down.
    c.batch_execute("UPDATE users SET plan = 'pro' WHERE user_id = 'u1'")
        .await
        .unwrap();
    drop(c);
    cluster.restart();

    let c = fx.db.connect().await;
    for i in BEFORE + 1..=BEFORE + AFTER {
        c.execute(
            "INSERT INTO users (user_id, plan) VALUES ($1, 'free')",
            &[&format!("u{i}")],
        )
        .await
        .unwrap();
    }
    c.batch_execute("UPDATE users SET plan = 'team' WHERE user_id = 'u2'")
        .await
        .unwrap();

    let mut want = expected(1..=BEFORE + AFTER);
    want.insert("u1:pro".into());
    want.insert("u2:team".into());
    let result = tokio::time::timeout(Duration::from_secs(90), async {
        loop {
            if delivered(&fx).is_superset(&want) {
                return;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "slotstream exited ({status}) instead of reconnecting\n{}",
                    fx.run_log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let log = fx.run_log();
    if result.is_err() {
        let _ = child.kill();
        let _ = child.wait();
        let missing: Vec<_> = want.difference(&delivered(&fx)).cloned().collect();
        panic!(
            "after the restart, {} changes never arrived: {missing:?}\n{log}",
            missing.len()
        );
    }
    assert!(
        log.contains("resuming from the checkpoint"),
        "the run log shows no reconnect; did the restart happen?\n{log}"
    );

    support::sigterm(&child);
    let status = faults::wait_exit(&mut child, Duration::from_secs(10)).await;
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let log = fx.run_log();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{log}");
    let events = fx.events();
    // The walsender applies the last status update a moment after the process is gone.
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
        "checkpoint {checkpoint:X} behind delivered {last:X}\n{log}"
    );
    assert_eq!(
        confirmed,
        Some(checkpoint),
        "the slot was not acknowledged up to the checkpoint\n{log}"
    );
}
