//! A full sync killed with SIGKILL halfway starts again cleanly, and a crash after it finished
//! never repeats it.
//!
//! 1. `slotstream run` is killed in the middle of the full sync of a large table (the events
//!    file has some lines, fewer than the table): the stored state is `running`.
//! 2. Rows change while it is down: one already sent is updated, one already sent is deleted,
//!    one not yet sent is updated, one is inserted.
//! 3. The restart does the full sync again from a new snapshot and then streams. Unchanged rows
//!    are re-sent under the same messageIds as before the kill (a deduplicating destination
//!    sees them once), the updated row under a new one.
//! 4. It is killed again while streaming, after the full sync finished: the next run adds no
//!    snapshot event, and the state rebuilt from all events (mirror mode: deletes included)
//!    equals the table.
//!
//! The table has `FULL_SYNC_ROWS` rows (default 1,000,000).

use crate::support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use support::{
    EventOp, assert_same_state, fold_events, read_light_events, read_light_events_after, sigkill,
    summarize_events, table_state, users_fixture, wait_until,
};

const TABLE: &str = "CREATE TABLE public.users (
    id bigserial PRIMARY KEY, user_id text NOT NULL, email text, name text, plan text,
    n int NOT NULL DEFAULT 0);
ALTER TABLE public.users REPLICA IDENTITY FULL";

fn row_count() -> i64 {
    std::env::var("FULL_SYNC_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

async fn full_sync_lsn(client: &tokio_postgres::Client, pipeline: &str) -> Option<String> {
    client
        .query_one(
            r#"SELECT full_sync_lsn::text FROM "_rudderstack".cdc_checkpoints WHERE pipeline = $1"#,
            &[&pipeline],
        )
        .await
        .expect("checkpoint row")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_sync_restarts_cleanly_after_sigkill() {
    full_sync_restarts_cleanly_after_sigkill_with(row_count(), 1).await;
}

/// The scenario with a table of `rows` rows read by `workers` snapshot readers (also run with
/// parallel readers by `parallel_full_sync_restarts_cleanly_after_sigkill`). Returns the
/// fixture and the log of the killed run, for the caller's own checks.
pub async fn full_sync_restarts_cleanly_after_sigkill_with(
    rows: i64,
    workers: u16,
) -> (support::Fixture, String) {
    let fx = users_fixture(
        TABLE,
        &format!("[sync]\nmode = \"mirror\"\nsnapshot_workers = {workers}\n"),
        None,
    )
    .await;
    let admin = fx.db.connect().await;
    admin
        .batch_execute(&format!(
            "INSERT INTO users (id, user_id, email, name, plan, n)
             SELECT g, g::text, 'user' || g || '@example.com', 'user ' || g,
                    (ARRAY['free','pro','team'])[1 + g % 3], g % 1000
               FROM generate_series(1, {rows}) g;
             SELECT setval('users_id_seq', {rows});
             ANALYZE users;"
        ))
        .await
        .expect("load rows");

    // 1. Kill the first full sync halfway.
    let mut child = fx.spawn_run();
    let some = (rows / 20).max(1) as usize;
    wait_until(
        Duration::from_secs(120),
        "the first snapshot events",
        || async { fx.event_lines() >= some },
    )
    .await;
    sigkill(&child);
    child.wait().expect("wait for the killed run");
    let killed_log = fx.run_log();
    let killed_at = fx.event_lines();
    assert!(
        killed_at < rows as usize,
        "the full sync must be killed before it ends ({killed_at} lines for {rows} rows)"
    );
    assert_eq!(fx.full_sync_state().await.as_deref(), Some("running"));
    let first_snapshot_lsn = full_sync_lsn(&admin, &fx.name)
        .await
        .expect("full_sync_lsn");
    let partial = read_light_events(&fx.events);
    assert!(partial.iter().all(|e| e.op == EventOp::Snapshot));
    let partial_ids: HashMap<String, String> = partial
        .iter()
        .map(|e| (e.user_id.clone().expect("userId"), e.message_id.clone()))
        .collect();
    eprintln!("killed after {} snapshot events of {rows}", partial.len());

    // 2. Changes while slotstream is down.
    let sent: Vec<&String> = partial.iter().filter_map(|e| e.user_id.as_ref()).collect();
    let updated_sent = sent[0].clone();
    let deleted_sent = sent[1].clone();
    let unsent = (1..=rows)
        .rev()
        .map(|i| i.to_string())
        .find(|k| !partial_ids.contains_key(k))
        .expect("a row not sent yet");
    admin
        .execute(
            "UPDATE users SET name = 'changed while down', n = n + 1 WHERE user_id = $1 OR user_id = $2",
            &[&updated_sent, &unsent],
        )
        .await
        .expect("update");
    admin
        .execute("DELETE FROM users WHERE user_id = $1", &[&deleted_sent])
        .await
        .expect("delete");
    let inserted: i64 = admin
        .query_one(
            "INSERT INTO users (id, user_id, name) SELECT i, i::text, 'inserted while down'
               FROM (SELECT nextval('users_id_seq') AS i) s RETURNING id",
            &[],
        )
        .await
        .expect("insert")
        .get(0);

    // 3. Restart: the full sync runs again from a new snapshot, then the stream.
    let restarted = Instant::now();
    let mut child = fx.spawn_run();
    wait_until(
        Duration::from_secs(300),
        "the restarted full sync to finish",
        || async { fx.full_sync_state().await.as_deref() == Some("done") },
    )
    .await;
    eprintln!("restarted full sync done in {:?}", restarted.elapsed());
    let second_snapshot_lsn = full_sync_lsn(&admin, &fx.name)
        .await
        .expect("full_sync_lsn");
    assert_ne!(
        first_snapshot_lsn, second_snapshot_lsn,
        "the restarted full sync reads a new snapshot"
    );
    let slot_exists: bool = admin
        .query_one(
            "SELECT count(*) = 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&fx.slot],
        )
        .await
        .expect("slot")
        .get(0);
    assert!(slot_exists, "the pipeline's slot exists after the restart");

    // 4. Changes while streaming, then a crash after the full sync finished.
    admin
        .batch_execute(
            "UPDATE users SET n = n + 100 WHERE id IN (10, 20, 30);
             DELETE FROM users WHERE id = 40;
             INSERT INTO users (id, user_id, name)
                SELECT i, i::text, 'streamed' FROM (SELECT nextval('users_id_seq') AS i) s;",
        )
        .await
        .expect("streamed changes");
    // Events are written in commit order: once the insert's is there, the others are too.
    wait_until(
        Duration::from_secs(60),
        "the streamed changes' events",
        || async { fx.events_tail_contains("\"name\":\"streamed\"", 1 << 16) },
    )
    .await;
    sigkill(&child);
    child.wait().expect("wait for the killed run");
    // Where the file ended at the crash: what follows is the next run's.
    let streaming_killed_at = std::fs::metadata(&fx.events).expect("events file").len();
    assert_eq!(fx.full_sync_state().await.as_deref(), Some("done"));
    admin
        .execute("UPDATE users SET n = n + 1000 WHERE id = 50", &[])
        .await
        .expect("update after the second kill");
    fx.run_once();

    let events = read_light_events(&fx.events);
    let after_crash = read_light_events_after(&fx.events, streaming_killed_at);
    let (first, rest) = events.split_at(partial.len());
    let (second, _) = rest.split_at(rest.len() - after_crash.len());
    assert!(first.iter().all(|e| e.op == EventOp::Snapshot));
    let after = summarize_events(&after_crash);
    assert_eq!(
        after.op(EventOp::Snapshot),
        0,
        "a crash after the full sync finished must not repeat it: {:?}",
        after.ops
    );
    assert!(after.op(EventOp::Update) >= 1, "{:?}", after.ops);

    // Every row of the second snapshot, unchanged rows under the ids sent before the kill.
    let resent: HashMap<&str, &str> = second
        .iter()
        .filter(|e| e.op == EventOp::Snapshot)
        .map(|e| (e.user_id.as_deref().expect("userId"), e.message_id.as_str()))
        .collect();
    assert_eq!(
        resent.len() as i64,
        rows,
        "the restarted full sync sends every row (one deleted, one inserted while down)"
    );
    assert!(resent.contains_key(inserted.to_string().as_str()));
    assert!(!resent.contains_key(deleted_sent.as_str()));
    let mut same = 0;
    for (user, id) in &partial_ids {
        if *user == updated_sent || *user == deleted_sent {
            continue;
        }
        assert_eq!(
            resent.get(user.as_str()),
            Some(&id.as_str()),
            "unchanged row {user} must be re-sent under the messageId sent before the kill"
        );
        same += 1;
    }
    assert_ne!(
        resent.get(updated_sent.as_str()).copied(),
        partial_ids.get(&updated_sent).map(String::as_str),
        "a row changed in between gets a new messageId"
    );
    eprintln!("{same} unchanged rows re-sent under their earlier messageIds");

    // The complete, correct result: the state rebuilt from every event equals the table.
    let table = table_state(&admin, "public.users", "user_id", None).await;
    assert_same_state(&fold_events(&events), &table);
    (fx, killed_log)
}
