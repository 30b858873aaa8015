//! `run --once` catches up to the WAL position current at its start, delivers, checkpoints and
//! exits: on an already-synced pipeline with no new changes it exits 0 promptly and sends
//! nothing; with new changes it sends exactly those (none of the earlier ones again) and exits.

use crate::support;
use crate::support::faults;

use std::time::{Duration, Instant};

/// A `run --once` on a caught-up pipeline must not wait for anything (no new WAL of ours is
/// coming): well under the wal_sender_timeout of 10 s.
const PROMPT: Duration = Duration::from_secs(8);

fn timed_run_once(fx: &support::Fixture) -> Duration {
    let started = Instant::now();
    fx.run_once();
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
async fn run_once_delivers_only_new_changes_and_exits() {
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    let c = fx.db.connect().await;
    c.batch_execute(
        "INSERT INTO users (user_id, email, name, plan)
         SELECT 'u' || g, 'u' || g || '@example.com', 'n' || g, 'free' FROM generate_series(1, 5) g",
    )
    .await
    .unwrap();

    // First run: the full sync.
    fx.run_once();
    let first = fx.events();
    assert_eq!(first.len(), 5, "full sync events: {first:#?}");
    assert!(
        first
            .iter()
            .all(|e| e["context"]["sources"]["op"] == "snapshot")
    );
    let (checkpoint, confirmed) = fx.positions().await;
    assert!(
        confirmed <= checkpoint,
        "slot {confirmed:?} ahead of checkpoint {checkpoint:?}"
    );

    // Nothing new: exits promptly, sends nothing, checkpoint does not go backward.
    let took = timed_run_once(&fx);
    assert!(took < PROMPT, "run --once with nothing to do took {took:?}");
    assert_eq!(fx.events().len(), 5, "a run with no changes sent events");
    let (again, confirmed) = fx.positions().await;
    assert!(
        again >= checkpoint,
        "checkpoint moved backward: {checkpoint:?} -> {again:?}"
    );
    assert!(
        confirmed <= again,
        "slot {confirmed:?} ahead of checkpoint {again:?}"
    );

    // New changes: three inserts and two updates, in four transactions.
    c.batch_execute(
        "INSERT INTO users (user_id, email, name, plan) VALUES ('u6', 'u6@example.com', 'n6', 'free');
         BEGIN;
         INSERT INTO users (user_id, email, name, plan) VALUES ('u7', 'u7@example.com', 'n7', 'free');
         UPDATE users SET plan = 'pro' WHERE user_id = 'u2';
         COMMIT;
         UPDATE users SET plan = 'team' WHERE user_id = 'u7';
         INSERT INTO users (user_id, email, name, plan) VALUES ('u8', 'u8@example.com', 'n8', 'free');",
    )
    .await
    .unwrap();
    let last_commit_end = faults::wal_insert_lsn(&c).await;

    let took = timed_run_once(&fx);
    assert!(took < PROMPT, "run --once with 5 changes took {took:?}");
    let all = fx.events();
    let new: Vec<_> = all[5..].to_vec();
    let got: Vec<(String, String, String)> = new
        .iter()
        .map(|e| {
            (
                e["context"]["sources"]["op"].as_str().unwrap().to_owned(),
                e["userId"].as_str().unwrap().to_owned(),
                e["traits"]["plan"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String, String)> = [
        ("insert", "u6", "free"),
        ("insert", "u7", "free"),
        ("update", "u2", "pro"),
        ("update", "u7", "team"),
        ("insert", "u8", "free"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(
        got, want,
        "the second run must send exactly the new changes, in commit order"
    );
    let ids: std::collections::HashSet<&str> = all
        .iter()
        .map(|e| e["messageId"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids.len(),
        all.len(),
        "a messageId repeats: an event was sent twice"
    );

    // Everything delivered is checkpointed and acknowledged.
    let (checkpoint, confirmed) = fx.positions().await;
    let checkpoint = checkpoint.unwrap();
    let max_lsn = new.iter().map(faults::event_lsn).max().unwrap();
    assert!(
        checkpoint > max_lsn,
        "checkpoint {checkpoint:X} does not cover the last delivered commit {max_lsn:X}"
    );
    assert!(
        confirmed.is_some_and(|c| c <= checkpoint),
        "slot {confirmed:?} ahead of checkpoint {checkpoint:X}"
    );
    assert!(
        confirmed.is_some_and(|c| c > max_lsn),
        "the slot was not acknowledged past the delivered commits: {confirmed:?} vs {max_lsn:X} (last commit end ≤ {last_commit_end:X})"
    );

    // And a third run has nothing to send again.
    let took = timed_run_once(&fx);
    assert!(took < PROMPT, "run --once with nothing to do took {took:?}");
    assert_eq!(
        fx.events().len(),
        all.len(),
        "a caught-up run sent events again"
    );
}
