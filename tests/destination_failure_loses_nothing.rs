//! A destination that cannot be written — `/dev/full`, which fails every write with ENOSPC
//! for real, and a path in a directory that does not exist — makes `run --once` exit non-zero
//! with one clear error line and a hint (no panic, no error chain), and moves neither the
//! checkpoint nor the slot. Pointing the config at a good file and running again delivers
//! every row: the failed full sync is redone, the failed stream resumes at the checkpoint.

use crate::support;
use crate::support::faults;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

/// A failing `run --once` retries a few times with backoff, then gives up: it must not hang.
const GIVES_UP_WITHIN: Duration = Duration::from_secs(60);

fn assert_clean_failure(fx: &support::Fixture, target: &str) -> String {
    let started = Instant::now();
    let (code, stdout, stderr) = fx.slotstream("run", &["--once"]);
    let took = started.elapsed();
    let dump = format!("exit {code} after {took:?}\n--- stdout\n{stdout}--- stderr\n{stderr}");
    assert!(took < GIVES_UP_WITHIN, "{dump}");
    assert_eq!(
        code, 1,
        "a destination failure is a runtime failure\n{dump}"
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "exactly one error line\n{dump}");
    assert!(
        errors[0].contains(target),
        "the error names the destination\n{dump}"
    );
    let hints: Vec<&str> = stderr.lines().filter(|l| l.starts_with("hint: ")).collect();
    assert_eq!(hints.len(), 1, "exactly one hint line\n{dump}");
    assert!(!stderr.contains("panicked"), "{dump}");
    assert!(!stderr.contains("Caused by"), "no error chain\n{dump}");
    assert!(stdout.is_empty(), "{dump}");
    errors[0].to_owned()
}

/// After a failed run: the checkpoint did not move, and the slot is not acknowledged past it
/// (it may catch up to it: a session acknowledges the stored checkpoint when it starts).
async fn assert_positions_held(
    fx: &support::Fixture,
    checkpoint: Option<u64>,
    confirmed: Option<u64>,
) {
    let (now, slot) = fx.positions().await;
    assert_eq!(
        now, checkpoint,
        "the checkpoint moved although nothing was delivered"
    );
    assert!(
        slot >= confirmed && slot <= checkpoint,
        "the slot moved outside [{confirmed:?}, checkpoint {checkpoint:?}]: {slot:?}"
    );
}

fn users(events: &[serde_json::Value]) -> BTreeSet<(String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["userId"].as_str().unwrap().to_owned(),
                e["traits"]["plan"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn set(items: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    items
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_deliveries_are_redone_from_the_checkpoint() {
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    let c = fx.db.connect().await;
    c.batch_execute(
        "INSERT INTO users (user_id, plan) SELECT 'u' || g, 'free' FROM generate_series(1, 3) g",
    )
    .await
    .unwrap();
    let dev_full = Path::new("/dev/full");

    // 1. The first run's full sync cannot be written: it is not recorded as done.
    fx.set_destination_path(dev_full);
    let error = assert_clean_failure(&fx, "/dev/full");
    assert!(
        error.to_lowercase().contains("no space"),
        "the cause is said: {error}"
    );
    assert_ne!(fx.full_sync_state().await.as_deref(), Some("done"));

    // 2. A good file: the full sync is redone and delivers every row.
    let good = fx.dir.path().join("good.jsonl");
    fx.set_destination_path(&good);
    fx.run_once();
    let events = support::read_events(&good);
    assert_eq!(
        users(&events),
        set(&[("u1", "free"), ("u2", "free"), ("u3", "free")])
    );
    assert_eq!(fx.full_sync_state().await.as_deref(), Some("done"));
    let (checkpoint, confirmed) = fx.positions().await;

    // 3. Changes while the destination is full: the run fails, nothing moves.
    c.batch_execute(
        "INSERT INTO users (user_id, plan) VALUES ('u4', 'free');
         UPDATE users SET plan = 'pro' WHERE user_id = 'u2';
         BEGIN;
         INSERT INTO users (user_id, plan) VALUES ('u5', 'free');
         UPDATE users SET plan = 'team' WHERE user_id = 'u4';
         COMMIT;",
    )
    .await
    .unwrap();
    fx.set_destination_path(dev_full);
    assert_clean_failure(&fx, "/dev/full");
    assert_positions_held(&fx, checkpoint, confirmed).await;

    // 4. A directory that does not exist: a clear error before anything is read.
    let missing = fx.dir.path().join("no-such-dir").join("events.jsonl");
    fx.set_destination_path(&missing);
    let error = assert_clean_failure(&fx, &missing.display().to_string());
    assert!(
        error.to_lowercase().contains("no such file or directory"),
        "the cause is said: {error}"
    );
    assert!(!missing.exists());
    assert_positions_held(&fx, checkpoint, confirmed).await;

    // 5. The good file again: every change since the checkpoint arrives, in order.
    fx.set_destination_path(&good);
    fx.run_once();
    let events = support::read_events(&good);
    let streamed: Vec<(String, String, String)> = events[3..]
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
        ("insert", "u4", "free"),
        ("update", "u2", "pro"),
        ("insert", "u5", "free"),
        ("update", "u4", "team"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(
        streamed, want,
        "every change since the checkpoint, once, in commit order"
    );
    let (after, confirmed_after) = fx.positions().await;
    let last = events.iter().map(faults::event_lsn).max().unwrap();
    assert!(
        after.is_some_and(|a| a > last),
        "the checkpoint {after:?} does not cover the delivered commit {last:X}"
    );
    assert!(confirmed_after <= after);
}
