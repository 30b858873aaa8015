//! The full sync is consistent with a writer that inserts, updates and deletes for its whole
//! duration (docs/architecture.md §8 invariant 4): the snapshot holds exactly the rows committed before the
//! slot's consistent point, the stream exactly the commits after it, so the state rebuilt from
//! the events (last event per `userId`, `Record Deleted` removes it; mirror mode) equals the
//! table row for row, every value as `to_jsonb` gives it. No row missing, none extra, no stale
//! version, no row both in the snapshot and inserted by the stream.
//!
//! The table has `FULL_SYNC_ROWS` rows (default 1,000,000) loaded with `generate_series`.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use support::{
    EventOp, assert_same_state, fold_events, read_light_events, summarize_events, table_state,
    users_fixture_at, wait_until,
};

/// `userId` is `user_id`, the id as text. REPLICA IDENTITY FULL puts user_id into the old tuple
/// of deletes, so `Record Deleted` carries it (README: identifiers in the replica identity).
const TABLE: &str = "CREATE TABLE public.users (
    id bigserial PRIMARY KEY, user_id text NOT NULL, email text, name text, plan text,
    n int NOT NULL DEFAULT 0, seen_at timestamptz);
ALTER TABLE public.users REPLICA IDENTITY FULL";

fn row_count() -> i64 {
    std::env::var("FULL_SYNC_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

/// What the writer did.
#[derive(Default)]
struct WriterStats {
    transactions: AtomicU64,
    inserts: AtomicU64,
    updates: AtomicU64,
    deletes: AtomicU64,
}

impl WriterStats {
    fn total(&self) -> u64 {
        self.transactions.load(Ordering::Relaxed)
    }
}

/// Inserts, updates and deletes random rows until `stop`: single statements, and transactions
/// that change the same row twice, insert and delete in one go, or mix all three.
async fn writer(
    client: tokio_postgres::Client,
    initial_rows: i64,
    stop: Arc<AtomicBool>,
    stats: Arc<WriterStats>,
) {
    let mut client = client;
    let insert = client
        .prepare(
            "INSERT INTO users (id, user_id, email, name, plan, n, seen_at)
             SELECT i, i::text, 'new' || i || '@example.com', 'new ' || i, 'free', 0, now()
               FROM (SELECT nextval('users_id_seq') AS i) s
             RETURNING id",
        )
        .await
        .expect("prepare insert");
    let update = client
        .prepare(
            "UPDATE users SET n = n + 1, name = $2, plan = $3, seen_at = clock_timestamp()
              WHERE id = $1",
        )
        .await
        .expect("prepare update");
    let delete = client
        .prepare("DELETE FROM users WHERE id = $1")
        .await
        .expect("prepare delete");
    let mut max_id = initial_rows;
    let plans = ["free", "pro", "team", "enterprise", "trial"];
    while !stop.load(Ordering::Relaxed) {
        let (choice, a, b, name, plan) = {
            let mut rng = rand::rng();
            let choice = rng.random_range(0..100);
            let a = rng.random_range(1..=max_id);
            let b = rng.random_range(1..=max_id);
            let name = format!("name {}", rng.random::<u32>());
            let plan = plans[rng.random_range(0..plans.len())];
            (choice, a, b, name, plan)
        };
        match choice {
            0..=24 => {
                let row = client.query_one(&insert, &[]).await.expect("insert");
                max_id = max_id.max(row.get(0));
                stats.inserts.fetch_add(1, Ordering::Relaxed);
            }
            25..=64 => {
                let n = client
                    .execute(&update, &[&a, &name, &plan])
                    .await
                    .expect("update");
                stats.updates.fetch_add(n, Ordering::Relaxed);
            }
            65..=79 => {
                let n = client.execute(&delete, &[&a]).await.expect("delete");
                stats.deletes.fetch_add(n, Ordering::Relaxed);
            }
            _ => {
                let tx = client.transaction().await.expect("begin");
                let n1 = tx
                    .execute(&update, &[&a, &name, &plan])
                    .await
                    .expect("update");
                let n2 = tx
                    .execute(&update, &[&a, &format!("{name} again"), &plan])
                    .await
                    .expect("update again");
                let row = tx.query_one(&insert, &[]).await.expect("insert");
                let new_id: i64 = row.get(0);
                max_id = max_id.max(new_id);
                let n3 = tx
                    .execute(&update, &[&new_id, &name, &plan])
                    .await
                    .expect("update new");
                let n4 = if choice % 2 == 0 {
                    tx.execute(&delete, &[&new_id]).await.expect("delete new")
                } else {
                    tx.execute(&delete, &[&b]).await.expect("delete")
                };
                tx.commit().await.expect("commit");
                stats.inserts.fetch_add(1, Ordering::Relaxed);
                stats.updates.fetch_add(n1 + n2 + n3, Ordering::Relaxed);
                stats.deletes.fetch_add(n4, Ordering::Relaxed);
            }
        }
        stats.transactions.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_sync_is_consistent_with_concurrent_writer() {
    full_sync_is_consistent_with_concurrent_writer_in(support::cluster(), row_count(), Some(1))
        .await;
}

/// The scenario on `cluster` with a table of `rows` rows, read by `workers` snapshot readers
/// (`None`: the automatic choice). Also run on PostgreSQL 18 by `core_on_postgres_18`, and with
/// parallel readers by `parallel_full_sync_is_consistent_with_concurrent_writer`.
pub async fn full_sync_is_consistent_with_concurrent_writer_in(
    cluster: &'static support::Cluster,
    rows: i64,
    workers: Option<u16>,
) -> support::Fixture {
    let extra = match workers {
        Some(n) => format!("[sync]\nmode = \"mirror\"\nsnapshot_workers = {n}\n"),
        None => "[sync]\nmode = \"mirror\"\n".to_owned(),
    };
    let fx = users_fixture_at(cluster, TABLE, &extra, None).await;
    let admin = fx.db.connect().await;
    let t = Instant::now();
    admin
        .batch_execute(&format!(
            "INSERT INTO users (id, user_id, email, name, plan, n, seen_at)
             SELECT g, g::text, 'user' || g || '@example.com', 'user ' || g,
                    (ARRAY['free','pro','team'])[1 + g % 3], g % 1000,
                    timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second'
               FROM generate_series(1, {rows}) g;
             SELECT setval('users_id_seq', {rows});
             ANALYZE users;"
        ))
        .await
        .expect("load rows");
    eprintln!("loaded {rows} rows in {:?}", t.elapsed());

    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(WriterStats::default());
    let writer_task = tokio::spawn(writer(
        fx.db.connect().await,
        rows,
        stop.clone(),
        stats.clone(),
    ));
    wait_until(Duration::from_secs(10), "the writer to start", || {
        let stats = stats.clone();
        async move { stats.total() > 20 }
    })
    .await;

    let started = Instant::now();
    let mut child = fx.spawn_run();
    wait_until(
        Duration::from_secs(60),
        "the full sync to start",
        || async { fx.full_sync_state().await.as_deref() == Some("running") },
    )
    .await;
    let writes_at_start = stats.total();
    let sync_started = Instant::now();
    wait_until(
        Duration::from_secs(300),
        "the full sync to finish",
        || async { fx.full_sync_state().await.as_deref() == Some("done") },
    )
    .await;
    let writes_during_sync = stats.total() - writes_at_start;
    eprintln!(
        "full sync of {rows} rows took about {:?} ({:?} since spawn); {writes_during_sync} writer transactions during it",
        sync_started.elapsed(),
        started.elapsed()
    );
    // The writer goes on for a bit while the stream runs.
    let more = stats.total();
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_until(
        Duration::from_secs(30),
        "more writes after the full sync",
        || {
            let stats = stats.clone();
            async move { stats.total() > more + 20 }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    writer_task.await.expect("writer");
    eprintln!(
        "writer: {} transactions, {} inserts, {} updates, {} deletes",
        stats.total(),
        stats.inserts.load(Ordering::Relaxed),
        stats.updates.load(Ordering::Relaxed),
        stats.deletes.load(Ordering::Relaxed)
    );
    assert!(
        writes_during_sync > 0,
        "the writer must have committed during the full sync"
    );

    // A last row marks the end: once its event is in the file, every earlier commit is too.
    let sentinel: i64 = admin
        .query_one(
            "INSERT INTO users (id, user_id, name) SELECT i, i::text, 'sentinel'
               FROM (SELECT nextval('users_id_seq') AS i) s RETURNING id",
            &[],
        )
        .await
        .expect("sentinel")
        .get(0);
    let needle = format!("\"userId\":\"{sentinel}\"");
    wait_until(Duration::from_secs(120), "the sentinel's event", || async {
        fx.events_tail_contains(&needle, 1 << 16)
    })
    .await;
    support::sigterm(&child);
    let status = child.wait().expect("wait for slotstream");
    assert!(
        status.success(),
        "slotstream exited with {status}\n{}",
        fx.run_log()
    );
    eprintln!("caught up {:?} after spawn", started.elapsed());

    let t = Instant::now();
    let path = fx.events.clone();
    let reading = tokio::task::spawn_blocking(move || {
        let events = read_light_events(&path);
        let summary = summarize_events(&events);
        let state = fold_events(&events);
        (summary, state)
    });
    let table = table_state(&admin, "public.users", "user_id", None).await;
    let (summary, state) = reading.await.expect("read events");
    eprintln!(
        "{} events {:?}, read with the table in {:?}",
        summary.events,
        summary.ops,
        t.elapsed()
    );
    assert_eq!(summary.without_user_id, 0, "every event carries the userId");
    assert_eq!(
        summary.duplicate_message_ids, 0,
        "one uninterrupted run sends each change once"
    );
    // At the boundary no change is counted twice: ids are never reused, so a row the stream
    // inserted must not also be in the snapshot.
    assert!(
        summary.inserted_after_snapshot.is_empty(),
        "rows both in the snapshot and inserted by the stream: {:?}",
        summary.inserted_after_snapshot
    );
    for op in [
        EventOp::Snapshot,
        EventOp::Insert,
        EventOp::Update,
        EventOp::Delete,
    ] {
        assert!(
            summary.op(op) > 0,
            "expected {op:?} events, got {:?}",
            summary.ops
        );
    }
    let t = Instant::now();
    assert_same_state(&state, &table);
    eprintln!("compared with the table in {:?}", t.elapsed());
    let log = fx.run_log();
    assert!(
        !log.contains("ERROR") && !log.contains("WARN pipeline failed"),
        "{log}"
    );
    fx
}
