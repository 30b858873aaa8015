//! kill -9 at arbitrary points while a writer commits numbered transactions: after every kill
//! the durable state is consistent — the slot is not acknowledged past the checkpoint, and
//! every transaction the checkpoint covers is in the file — and after the last restart every
//! committed change has been delivered at least once (docs/architecture.md §8 invariants 1-3).
//!
//! Transaction `i` inserts row `u{i}` (plan = i); odd ones from 3 on also update row `u{i-1}`
//! (name = `upd{i}`); every 100th also inserts 20 more rows. Micro-batches of 7 events cut
//! transactions in pieces, so a kill often lands between two batches of one transaction.
//! The kill points come from a seed (printed; set `SLOTSTREAM_TEST_SEED` to replay one).

use crate::support;
use crate::support::faults;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

const TXNS: u64 = 3000;
const KILLS: usize = 3;

/// The changes transaction `i` makes, as the keys [`key_of`] gives their events.
fn keys_of_txn(i: u64) -> Vec<String> {
    let mut keys = vec![format!("ins:u{i}")];
    if i % 2 == 1 && i > 1 {
        keys.push(format!("upd:upd{i}"));
    }
    if i.is_multiple_of(100) {
        keys.extend((1..=20).map(|j| format!("ins:u{i}_{j}")));
    }
    keys
}

/// The transaction a key belongs to.
fn txn_of_key(key: &str) -> u64 {
    let digits: String = key
        .split(':')
        .nth(1)
        .unwrap()
        .trim_start_matches("upd")
        .trim_start_matches('u')
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap()
}

/// The change an event carries.
fn key_of(event: &serde_json::Value) -> String {
    match event["context"]["sources"]["op"].as_str().unwrap() {
        "insert" => format!("ins:{}", event["userId"].as_str().unwrap()),
        "update" => format!("upd:{}", event["traits"]["name"].as_str().unwrap()),
        op => panic!("unexpected op {op}: {event}"),
    }
}

fn txn_sql(i: u64) -> String {
    let mut sql =
        format!("BEGIN; INSERT INTO users (user_id, name, plan) VALUES ('u{i}', 'ins', '{i}');");
    if i % 2 == 1 && i > 1 {
        sql.push_str(&format!(
            "UPDATE users SET name = 'upd{i}' WHERE user_id = 'u{}';",
            i - 1
        ));
    }
    if i.is_multiple_of(100) {
        sql.push_str(&format!(
            "INSERT INTO users (user_id, name, plan) SELECT 'u{i}_' || j, 'ins', '{i}' FROM generate_series(1, 20) j;"
        ));
    }
    sql.push_str("COMMIT; SELECT (pg_current_wal_insert_lsn() - '0/0')::int8");
    sql
}

/// What the events file says.
struct FileState {
    /// key → (commit LSN, messageId) of its first event.
    delivered: HashMap<String, (u64, String)>,
    /// Lines that are not a JSON event (a batch cut by a kill).
    bad_lines: usize,
    /// Complete lines.
    lines: usize,
}

fn read_file(path: &std::path::Path) -> FileState {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut state = FileState {
        delivered: HashMap::new(),
        bad_lines: 0,
        lines: 0,
    };
    // Only newline-terminated lines: a trailing partial line is still being written.
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    for line in complete.lines() {
        state.lines += 1;
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            state.bad_lines += 1;
            continue;
        };
        let key = key_of(&event);
        let lsn = faults::event_lsn(&event);
        let id = event["messageId"].as_str().unwrap().to_owned();
        match state.delivered.get(&key) {
            Some((first_lsn, first_id)) => {
                assert_eq!(
                    (first_lsn, first_id),
                    (&lsn, &id),
                    "{key} was delivered twice with different positions or messageIds"
                );
            }
            None => {
                state.delivered.insert(key, (lsn, id));
            }
        }
    }
    state
}

/// Invariants 1 and 3 on a stopped pipeline: `confirmed ≤ checkpoint`, and every transaction
/// the checkpoint covers is wholly in the file.
fn check_durable_state(
    when: &str,
    checkpoint: u64,
    confirmed: Option<u64>,
    file: &FileState,
    committed: &[(u64, u64)],
) {
    assert!(
        confirmed.is_some_and(|c| c <= checkpoint),
        "{when}: slot confirmed_flush_lsn {confirmed:X?} is past the checkpoint {checkpoint:X}"
    );
    // By the writer's bound: the WAL insert position read right after COMMIT returned is at or
    // past the end of that commit record.
    for &(i, bound) in committed {
        if bound > checkpoint {
            continue;
        }
        for key in keys_of_txn(i) {
            assert!(
                file.delivered.contains_key(&key),
                "{when}: transaction {i} ended at or before {bound:X} ≤ checkpoint {checkpoint:X}, but its change {key} is not in the file"
            );
        }
    }
    // By the events' own commit LSNs: a transaction of which some change was delivered, whose
    // commit lies before the checkpoint, must be there whole (a batch cut mid-transaction must
    // not be checkpointed past that transaction).
    let mut by_txn: BTreeMap<u64, u64> = BTreeMap::new();
    for (key, (lsn, _)) in &file.delivered {
        by_txn.insert(txn_of_key(key), *lsn);
    }
    for (i, lsn) in by_txn {
        if lsn >= checkpoint {
            continue;
        }
        for key in keys_of_txn(i) {
            assert!(
                file.delivered.contains_key(&key),
                "{when}: transaction {i} committed at {lsn:X} < checkpoint {checkpoint:X}, but its change {key} is not in the file"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_never_loses_a_committed_change() {
    kill_9_never_loses_a_committed_change_in(support::cluster(), TXNS).await;
}

/// The scenario on `cluster` with `txns` writer transactions (also run on PostgreSQL 18 by
/// `core_on_postgres_18`).
pub async fn kill_9_never_loses_a_committed_change_in(
    cluster: &'static support::Cluster,
    txns: u64,
) {
    let seed: u64 = std::env::var("SLOTSTREAM_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("SLOTSTREAM_TEST_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let ctx = format!("(SLOTSTREAM_TEST_SEED={seed})");

    let fx = support::users_fixture_at(
        cluster,
        support::USERS_TABLE,
        "[schedule]\nmax_batch_events = 7\nmax_batch_delay = \"20ms\"\n",
        None,
    )
    .await;
    // The full sync of the empty table: every change below comes through the stream.
    fx.run_once();
    assert!(fx.events().is_empty());
    let total: usize = (1..=txns).map(|i| keys_of_txn(i).len()).sum();

    let committed: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let writer = {
        let committed = committed.clone();
        let w = fx.db.connect().await;
        tokio::spawn(async move {
            // Paced (about 10 s in all) so that the kills land while it writes.
            let mut pace = tokio::time::interval(Duration::from_millis(3));
            for i in 1..=txns {
                pace.tick().await;
                let msgs = w.simple_query(&txn_sql(i)).await.unwrap();
                let bound = msgs
                    .iter()
                    .find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0),
                        _ => None,
                    })
                    .unwrap()
                    .parse::<u64>()
                    .unwrap();
                committed.lock().unwrap().push((i, bound));
            }
        })
    };

    let mut last_checkpoint = 0u64;
    for kill in 1..=KILLS {
        let (run_start, _) = fx.positions().await;
        let mut child = faults::Running(fx.spawn_run());
        let deadline = Instant::now() + Duration::from_secs(120);
        // Kill at an arbitrary point after this run has checkpointed at least once (so the
        // checks below are about positions this run wrote), up to a few hundred lines later.
        let mut kill_at: Option<usize> = None;
        loop {
            let all_done = writer.is_finished() && read_file(&fx.events).delivered.len() == total;
            match kill_at {
                None => {
                    let (checkpoint, _) = fx.positions().await;
                    if checkpoint > run_start || all_done {
                        kill_at = Some(fx.event_lines() + rng.random_range(0..=300));
                        continue;
                    }
                }
                Some(at) if fx.event_lines() >= at || all_done => break,
                Some(_) => {}
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("slotstream exited ({status}) {ctx}\n{}", fx.run_log());
            }
            assert!(
                Instant::now() < deadline,
                "kill {kill}: no checkpoint, or the file never reached {kill_at:?} lines {ctx}\n{}",
                fx.run_log()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        support::sigkill(&child);
        child.wait().unwrap();

        let (checkpoint, confirmed) = fx.positions().await;
        let checkpoint = checkpoint.unwrap();
        let file = read_file(&fx.events);
        let snapshot = committed.lock().unwrap().clone();
        let when = format!(
            "after kill {kill} at {} lines ({} txns committed) {ctx}",
            file.lines,
            snapshot.len()
        );
        eprintln!("{when}: checkpoint {checkpoint:X}, slot {confirmed:X?}");
        assert!(
            checkpoint >= last_checkpoint,
            "{when}: checkpoint moved backward {last_checkpoint:X} -> {checkpoint:X}"
        );
        last_checkpoint = checkpoint;
        assert!(
            file.bad_lines <= kill,
            "{when}: {} corrupt lines",
            file.bad_lines
        );
        check_durable_state(&when, checkpoint, confirmed, &file, &snapshot);
    }

    writer.await.unwrap();
    fx.run_once();
    let file = read_file(&fx.events);
    let (checkpoint, confirmed) = fx.positions().await;
    let checkpoint = checkpoint.unwrap();
    let committed = committed.lock().unwrap().clone();
    let when = format!("after the final run --once {ctx}");
    check_durable_state(&when, checkpoint, confirmed, &file, &committed);
    let want: BTreeSet<String> = (1..=txns).flat_map(keys_of_txn).collect();
    let got: BTreeSet<String> = file.delivered.keys().cloned().collect();
    let missing: Vec<&String> = want.difference(&got).take(20).collect();
    assert!(
        missing.is_empty(),
        "{when}: {} committed changes never delivered, e.g. {missing:?}",
        want.difference(&got).count()
    );
    assert_eq!(got.len(), want.len(), "{when}: unexpected events");
    let last = file.delivered.values().map(|(l, _)| *l).max().unwrap();
    assert!(
        checkpoint > last,
        "{when}: checkpoint {checkpoint:X} behind the last delivered commit {last:X}"
    );
    eprintln!(
        "{} changes delivered in {} lines ({} duplicates from the kills)",
        got.len(),
        file.lines,
        file.lines - got.len() - file.bad_lines
    );
}
