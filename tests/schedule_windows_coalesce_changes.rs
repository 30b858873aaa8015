//! Schedule windows (docs/architecture.md §4): the changes of a window are coalesced per row
//! and delivered as one sync run at its boundary; while the window is open they are staged in
//! `_rudderstack` and the slot is acknowledged past them, and a crash inside the window loses
//! nothing: the stage is delivered at the same boundary.
//!
//! - manual windows (`frequency = "manual"`, closed by `slotstream sync`): 10 updates of one
//!   row give one event with the last state, an insert and a delete of one row give nothing, a
//!   no-op update gives nothing (the ledger's hash), and the sync run counts all of it;
//! - fixed windows of a few seconds: changes in two windows give two sync runs whose LSN ranges
//!   follow each other and hold the changes' positions;
//! - SIGKILL inside a window, after the slot moved past its changes: the restarted run delivers
//!   them at the stored boundary.

use crate::support;

use std::time::Duration;

use serde_json::Value;
use support::{Fixture, sigkill, users_fixture, wait_until};

const TABLE: &str = "CREATE TABLE public.users (
    id bigserial PRIMARY KEY, user_id text, email text, name text, plan text)";

/// One `cdc_sync_runs` row of a delivered window.
#[derive(Debug, Clone)]
struct WindowRun {
    start_lsn: u64,
    end_lsn: u64,
    rows: i64,
    events: i64,
    unchanged: i64,
    coalesced: i64,
    window_end: Option<i64>,
}

async fn window_runs(fx: &Fixture) -> Vec<WindowRun> {
    fx.db
        .connect()
        .await
        .query(
            r#"SELECT (start_lsn - '0/0')::int8, (end_lsn - '0/0')::int8, rows, events, unchanged,
                      coalesced, extract(epoch FROM window_end)::int8
                 FROM "_rudderstack".cdc_sync_runs
                WHERE pipeline = $1 AND kind = 'window' ORDER BY id"#,
            &[&fx.name],
        )
        .await
        .expect("sync runs")
        .iter()
        .map(|r| WindowRun {
            start_lsn: r.get::<_, i64>(0) as u64,
            end_lsn: r.get::<_, i64>(1) as u64,
            rows: r.get(2),
            events: r.get(3),
            unchanged: r.get(4),
            coalesced: r.get(5),
            window_end: r.get(6),
        })
        .collect()
}

fn streamed(fx: &Fixture) -> Vec<Value> {
    fx.events()
        .into_iter()
        .filter(|e| e["context"]["sources"]["op"] != "snapshot")
        .collect()
}

async fn current_lsn(fx: &Fixture) -> u64 {
    fx.db
        .connect()
        .await
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::int8", &[])
        .await
        .expect("wal lsn")
        .get::<_, i64>(0) as u64
}

async fn staged_rows(fx: &Fixture) -> i64 {
    fx.db
        .connect()
        .await
        .query_one(
            r#"SELECT count(*) FROM "_rudderstack".cdc_window_stage WHERE pipeline = $1"#,
            &[&fx.name],
        )
        .await
        .expect("stage")
        .get(0)
}

/// Waits until the slot (and the checkpoint) passed `lsn`: the changes before it are staged.
async fn wait_staged_past(fx: &Fixture, lsn: u64) {
    wait_until(
        Duration::from_secs(30),
        "the slot to move past the window's changes",
        || async { matches!(fx.positions().await, (Some(c), Some(f)) if c >= lsn && f >= lsn) },
    )
    .await;
}

async fn started(fx: &Fixture, rows: usize) -> std::process::Child {
    let child = fx.spawn_run();
    wait_until(Duration::from_secs(30), "the full sync", || async {
        fx.events().len() >= rows && fx.full_sync_state().await.as_deref() == Some("done")
    })
    .await;
    child
}

fn stop(mut child: std::process::Child) {
    support::sigterm(&child);
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_window_coalesces_rows_and_suppresses_no_ops() {
    let fx = users_fixture(TABLE, "[schedule]\nfrequency = \"manual\"\n", None).await;
    let c = fx.db.connect().await;
    c.batch_execute(
        "INSERT INTO users (user_id, name, plan) VALUES ('u_1', 'Ann', 'free'), ('u_2', 'Bob', 'free')",
    )
    .await
    .unwrap();
    let child = started(&fx, 2).await;
    for i in 1..=10 {
        c.execute(
            "UPDATE users SET plan = $1 WHERE user_id = 'u_1'",
            &[&format!("plan {i}")],
        )
        .await
        .unwrap();
    }
    c.batch_execute(
        "INSERT INTO users (user_id, name) VALUES ('u_3', 'Cy');
         DELETE FROM users WHERE user_id = 'u_3';
         UPDATE users SET plan = plan WHERE user_id = 'u_2';",
    )
    .await
    .unwrap();
    // Staged, acknowledged, and not delivered.
    let lsn = current_lsn(&fx).await;
    wait_staged_past(&fx, lsn).await;
    assert_eq!(
        staged_rows(&fx).await,
        3,
        "u_1, u_3 and u_2 are staged once each"
    );
    assert!(streamed(&fx).is_empty(), "{:#?}", streamed(&fx));
    // `status` shows the open window and what it holds.
    let (code, out, err) = fx.slotstream("status", &["--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let status: Value = serde_json::from_str(&out).expect("status JSON");
    assert_eq!(status["window"]["staged_rows"], 3, "{status:#}");
    assert_eq!(status["window"]["rows_read"], 13, "{status:#}");
    assert!(
        status["window"]["closes_at"].is_null(),
        "manual: {status:#}"
    );
    assert_eq!(status["ledger_rows"], 2, "{status:#}");
    // `slotstream sync` asks the running pipeline to deliver.
    let (code, out, err) = fx.slotstream("sync", &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("sync requested"), "{out}");
    wait_until(Duration::from_secs(30), "the window's sync run", || async {
        !window_runs(&fx).await.is_empty()
    })
    .await;
    let events = streamed(&fx);
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["userId"], "u_1");
    assert_eq!(events[0]["traits"]["plan"], "plan 10");
    let runs = window_runs(&fx).await;
    let run = &runs[0];
    assert_eq!((run.rows, run.events, run.unchanged), (13, 1, 1), "{run:?}");
    assert_eq!(
        run.coalesced, 10,
        "13 changes coalesced into 3 rows: {run:?}"
    );
    assert_eq!(staged_rows(&fx).await, 0);
    stop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_windows_deliver_each_window_at_its_boundary_with_its_lsn_range() {
    let fx = users_fixture(TABLE, "[schedule]\nfrequency = \"2s\"\n", None).await;
    let c = fx.db.connect().await;
    let child = started(&fx, 0).await;
    let first = current_lsn(&fx).await;
    c.batch_execute("INSERT INTO users (user_id, name) VALUES ('u_1', 'Ann')")
        .await
        .unwrap();
    wait_until(Duration::from_secs(20), "the first window", || async {
        window_runs(&fx).await.iter().any(|r| r.events == 1)
    })
    .await;
    let second = current_lsn(&fx).await;
    c.batch_execute("UPDATE users SET name = 'Ann B' WHERE user_id = 'u_1'")
        .await
        .unwrap();
    wait_until(Duration::from_secs(20), "the second window", || async {
        window_runs(&fx)
            .await
            .iter()
            .filter(|r| r.events == 1)
            .count()
            == 2
    })
    .await;
    stop(child);
    let runs: Vec<WindowRun> = window_runs(&fx)
        .await
        .into_iter()
        .filter(|r| r.events == 1)
        .collect();
    let events = streamed(&fx);
    assert_eq!(events.len(), 2, "{events:#?}");
    for (run, (event, after)) in runs.iter().zip(events.iter().zip([first, second])) {
        let lsn = lsn_of(&event["context"]["sources"]["lsn"]);
        assert!(
            run.start_lsn <= after && lsn > after && lsn <= run.end_lsn,
            "{run:?} holds the change at {lsn:#x} made after {after:#x}"
        );
    }
    assert!(runs[1].start_lsn >= runs[0].end_lsn, "{runs:?}");
    // Boundaries are whole multiples of 2 s from midnight UTC.
    for r in &runs {
        assert_eq!(r.window_end.map(|t| t % 2), Some(0), "{r:?}");
    }
}

fn lsn_of(v: &Value) -> u64 {
    let text = v.as_str().expect("lsn text");
    let (hi, lo) = text.split_once('/').expect("X/Y");
    (u64::from_str_radix(hi, 16).expect("hex") << 32) | u64::from_str_radix(lo, 16).expect("hex")
}

async fn window_ends_at(fx: &Fixture) -> Option<i64> {
    fx.db
        .connect()
        .await
        .query_one(
            r#"SELECT extract(epoch FROM window_ends_at)::int8 FROM "_rudderstack".cdc_checkpoints
                WHERE pipeline = $1"#,
            &[&fx.name],
        )
        .await
        .ok()
        .and_then(|r| r.get(0))
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_inside_a_window_delivers_its_changes_at_the_same_boundary() {
    let fx = users_fixture(TABLE, "[schedule]\nfrequency = \"20s\"\n", None).await;
    let c = fx.db.connect().await;
    let child = started(&fx, 0).await;
    // Leave the changes at least 12 s before the boundary: time to stage them and kill.
    let mut boundary = window_ends_at(&fx).await.expect("an open window");
    if boundary - now_secs() < 12 {
        let passed = boundary;
        wait_until(Duration::from_secs(30), "the next window", || async {
            window_ends_at(&fx).await.is_some_and(|b| b != passed)
        })
        .await;
        boundary = window_ends_at(&fx).await.expect("an open window");
    }
    c.batch_execute(
        "INSERT INTO users (user_id, name) VALUES ('u_1', 'Ann'), ('u_2', 'Bob');
         UPDATE users SET plan = 'pro' WHERE user_id = 'u_1';",
    )
    .await
    .unwrap();
    let lsn = current_lsn(&fx).await;
    wait_staged_past(&fx, lsn).await;
    assert_eq!(staged_rows(&fx).await, 2);
    sigkill(&child);
    let mut child = child;
    let _ = child.wait();
    assert!(now_secs() < boundary, "killed inside the window");
    assert!(streamed(&fx).is_empty());
    let child = fx.spawn_run();
    wait_until(
        Duration::from_secs(40),
        "the window after the restart",
        || async { window_runs(&fx).await.iter().any(|r| r.events > 0) },
    )
    .await;
    stop(child);
    assert!(
        now_secs() >= boundary,
        "delivered at the boundary, not before"
    );
    let run = window_runs(&fx)
        .await
        .into_iter()
        .find(|r| r.events > 0)
        .expect("a run");
    assert_eq!(run.window_end, Some(boundary), "{run:?}");
    let events = streamed(&fx);
    assert_eq!(events.len(), 2, "{events:#?}");
    let u1 = events.iter().find(|e| e["userId"] == "u_1").expect("u_1");
    assert_eq!(u1["traits"]["plan"], "pro");
}

/// A window larger than its memory share is staged as it fills (never dropped, the session
/// never waits for the boundary): 20,000 rows of 1 KiB with `memory_limit = "4MiB"` (the
/// coalescer's cap is 3/16 of it, 768 KiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_larger_than_memory_is_staged_and_delivered_whole() {
    let fx = users_fixture(
        TABLE,
        "[schedule]\nfrequency = \"manual\"\nmemory_limit = \"4MiB\"\n",
        None,
    )
    .await;
    let c = fx.db.connect().await;
    let child = started(&fx, 0).await;
    c.batch_execute(
        "INSERT INTO users (user_id, name)
         SELECT 'u_' || g, repeat('x', 1024) FROM generate_series(1, 20000) g",
    )
    .await
    .unwrap();
    let lsn = current_lsn(&fx).await;
    wait_staged_past(&fx, lsn).await;
    let staged = staged_rows(&fx).await;
    assert_eq!(staged, 20000, "{}", fx.run_log());
    let (code, out, err) = fx.slotstream("sync", &[]);
    assert_eq!(code, 0, "{out}{err}");
    wait_until(Duration::from_secs(60), "the window's sync run", || async {
        !window_runs(&fx).await.is_empty()
    })
    .await;
    stop(child);
    let events = streamed(&fx);
    assert_eq!(events.len(), 20000);
    let mut users: Vec<&str> = events.iter().filter_map(|e| e["userId"].as_str()).collect();
    users.sort_unstable();
    users.dedup();
    assert_eq!(users.len(), 20000, "each row once");
    let log = fx.run_log();
    assert!(
        !log.contains("pipeline failed"),
        "the session never failed while the window filled:\n{log}"
    );
}
