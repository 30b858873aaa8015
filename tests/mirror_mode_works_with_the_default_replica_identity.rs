//! The sent-state ledger (docs/architecture.md §6) makes mirror mode work on the most common
//! table shape, a primary key and the default replica identity, with no REPLICA IDENTITY FULL:
//!
//! - inserts, updates, key-only deletes, identifier changes and primary-key changes, streamed
//!   under repeated SIGKILLs, rebuild the table exactly (a `Record Deleted` removes the user);
//! - an update that changes no trait sends nothing (counted as unchanged);
//! - a TRUNCATE sends `Record Deleted` for every user the destination holds;
//! - `slotstream resync --changed-only` (the way back after lost changes) sends only the rows
//!   that differ, and `Record Deleted` for rows gone.

use crate::support;

use std::time::Duration;

use serde_json::Value;
use support::{
    Fixture, assert_same_state, fold_events, read_light_events, sigkill, table_state, users_fixture,
};

const TABLE: &str = "CREATE TABLE public.users (
    id bigserial PRIMARY KEY, user_id text NOT NULL, email text, name text, plan text)";

const MIRROR: &str = "[sync]\nmode = \"mirror\"\n";

fn streamed(fx: &Fixture) -> Vec<Value> {
    fx.events()
        .into_iter()
        .filter(|e| e["context"]["sources"]["op"] != "snapshot")
        .collect()
}

async fn assert_destination_equals_table(fx: &Fixture) {
    let events = fold_events(&read_light_events(&fx.events));
    let table = table_state(&fx.db.connect().await, "users", "user_id", None).await;
    assert_same_state(&events, &table);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_only_deletes_and_identifier_changes_rebuild_the_table_under_sigkill() {
    rebuild_under_sigkill("").await;
}

/// The same in 1-second windows: coalesced, staged, killed inside windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_rebuild_the_table_under_sigkill_too() {
    rebuild_under_sigkill("[schedule]\nfrequency = \"1s\"\n").await;
}

async fn rebuild_under_sigkill(schedule: &str) {
    let fx = users_fixture(TABLE, &format!("{MIRROR}{schedule}"), None).await;
    let c = fx.db.connect().await;
    c.batch_execute(
        "INSERT INTO users (user_id, email, name, plan)
         SELECT 'u_' || g, 'user' || g || '@example.com', 'user ' || g, 'free'
           FROM generate_series(1, 200) g",
    )
    .await
    .unwrap();
    fx.run_once();
    // A writer changes rows while the pipeline is killed three times.
    let writer = {
        let db = fx.db.connect().await;
        tokio::spawn(async move {
            for round in 0..60i64 {
                let sql = format!(
                    "UPDATE users SET plan = 'pro {round}' WHERE id % 7 = {m};
                     DELETE FROM users WHERE id = (SELECT min(id) FROM users WHERE id % 5 = {m5});
                     INSERT INTO users (user_id, name) VALUES ('n_{round}', 'new {round}');
                     UPDATE users SET user_id = user_id || '_moved' WHERE id = (SELECT max(id) FROM users WHERE id % 11 = {m11} AND user_id NOT LIKE '%_moved');
                     UPDATE users SET id = id + 1000000 WHERE id = (SELECT min(id) FROM users WHERE id < 1000000 AND id % 3 = {m3});",
                    m = round % 7,
                    m5 = round % 5,
                    m11 = round % 11,
                    m3 = round % 3,
                );
                db.batch_execute(&sql).await.expect("writer");
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };
    for _ in 0..3 {
        let mut child = fx.spawn_run();
        let before = fx.events().len();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        // Killed once it delivered something (or once the writer is done: nothing more comes).
        while fx.events().len() <= before && !writer.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "no streamed events within 30 s; run log:\n{}",
                fx.run_log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sigkill(&child);
        let _ = child.wait();
    }
    writer.await.expect("writer task");
    fx.run_once();
    assert_destination_equals_table(&fx).await;
    let deletes = streamed(&fx)
        .iter()
        .filter(|e| e["event"] == "Record Deleted")
        .count();
    assert!(
        deletes >= 60,
        "every delete and every moved user_id retires a user: {deletes}"
    );
    let dead: i64 = c
        .query_one(
            r#"SELECT count(*) FROM "_rudderstack".cdc_dead_letters WHERE pipeline = $1"#,
            &[&fx.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(dead, 0, "no delete needs REPLICA IDENTITY FULL");
}

#[tokio::test]
async fn an_update_that_changes_no_trait_sends_nothing() {
    let fx = users_fixture(
        TABLE,
        &format!("{MIRROR}[mapping]\ncolumns = [\"user_id\", \"name\"]\n"),
        None,
    )
    .await;
    let c = fx.db.connect().await;
    c.batch_execute("INSERT INTO users (user_id, name, plan) VALUES ('u_1', 'Ann', 'free')")
        .await
        .unwrap();
    fx.run_once();
    // `plan` is not a trait: neither update changes what was sent.
    c.batch_execute(
        "UPDATE users SET plan = 'pro' WHERE user_id = 'u_1';
         UPDATE users SET name = name WHERE user_id = 'u_1';
         UPDATE users SET name = 'Ann B' WHERE user_id = 'u_1';",
    )
    .await
    .unwrap();
    fx.run_once();
    let events = streamed(&fx);
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["traits"]["name"], "Ann B");
    let unchanged: i64 = c
        .query_one(
            r#"SELECT coalesce(sum(unchanged), 0)::int8 FROM "_rudderstack".cdc_sync_runs
                WHERE pipeline = $1"#,
            &[&fx.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unchanged, 2);
}

#[tokio::test]
async fn truncate_sends_record_deleted_for_every_user() {
    let fx = users_fixture(TABLE, MIRROR, None).await;
    let c = fx.db.connect().await;
    c.batch_execute(
        "INSERT INTO users (user_id, name) SELECT 'u_' || g, 'n' FROM generate_series(1, 30) g",
    )
    .await
    .unwrap();
    fx.run_once();
    c.batch_execute(
        "TRUNCATE users;
         INSERT INTO users (user_id, name) VALUES ('u_after', 'After');",
    )
    .await
    .unwrap();
    fx.run_once();
    let deleted = streamed(&fx)
        .iter()
        .filter(|e| e["event"] == "Record Deleted")
        .count();
    assert_eq!(deleted, 30);
    assert_destination_equals_table(&fx).await;
}

#[tokio::test]
async fn resync_changed_only_sends_only_what_differs() {
    let fx = users_fixture(TABLE, MIRROR, None).await;
    let c = fx.db.connect().await;
    c.batch_execute(
        "INSERT INTO users (user_id, name) SELECT 'u_' || g, 'n' FROM generate_series(1, 50) g",
    )
    .await
    .unwrap();
    fx.run_once();
    // Changes the slot never delivers (as when a slot is lost and recreated): made while the
    // table is out of the publication.
    let publication = &fx.slot;
    c.batch_execute(&format!(
        "ALTER PUBLICATION \"{publication}\" DROP TABLE users;
         UPDATE users SET name = 'changed' WHERE user_id = 'u_7';
         DELETE FROM users WHERE user_id = 'u_9';
         ALTER PUBLICATION \"{publication}\" ADD TABLE users;"
    ))
    .await
    .unwrap();
    let before = fx.events().len();
    let (code, out, err) = fx.slotstream("resync", &["--changed-only"]);
    assert_eq!(code, 0, "{out}{err}");
    fx.run_once();
    let new: Vec<Value> = fx.events().into_iter().skip(before).collect();
    assert_eq!(new.len(), 2, "{new:#?}");
    assert!(
        new.iter()
            .any(|e| e["userId"] == "u_7" && e["traits"]["name"] == "changed")
    );
    assert!(
        new.iter()
            .any(|e| e["userId"] == "u_9" && e["event"] == "Record Deleted")
    );
    assert_destination_equals_table(&fx).await;
}
