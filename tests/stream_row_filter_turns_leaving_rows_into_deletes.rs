//! The row filter (`[mapping] filter`, and the same WHERE on the publication through
//! setup.sql's `filter`), with `REPLICA IDENTITY FULL` so that updates and deletes can be
//! filtered: rows outside the filter never become events, in the full sync or in the stream.
//! An UPDATE that moves a row out of the filter reaches the stream as a DELETE of the old row
//! (mirror mode: a `Record Deleted` event; upsert mode: nothing), and an UPDATE that moves a
//! row into it as an INSERT of the new row.

use crate::support;

use serde_json::Value;
use support::{Fixture, users_fixture};

const FILTER: &str = "plan <> 'blocked'";

async fn filter_scenario(mode: &str) -> (Fixture, Vec<Value>) {
    let fx = users_fixture(
        &format!(
            "{}; ALTER TABLE public.users REPLICA IDENTITY FULL",
            support::USERS_TABLE
        ),
        &format!("[mapping]\nfilter = \"{FILTER}\"\n\n[sync]\nmode = \"{mode}\"\n"),
        Some(FILTER),
    )
    .await;
    let c = fx.db.connect().await;
    c.batch_execute(
        "INSERT INTO users (user_id, name, plan) VALUES
            ('u_1', 'Ann', 'pro'), ('u_2', 'Bob', 'blocked'), ('u_6', 'Fay', 'free')",
    )
    .await
    .unwrap();
    fx.run_once();
    let snapshot: Vec<Value> = fx.events().iter().map(|e| e["userId"].clone()).collect();
    assert_eq!(snapshot, ["u_1", "u_6"], "the full sync applies the filter");
    c.batch_execute(
        "INSERT INTO users (user_id, name, plan) VALUES ('u_3', 'Cy', 'blocked');
         INSERT INTO users (user_id, name, plan) VALUES ('u_4', 'Di', 'free');
         UPDATE users SET plan = 'blocked' WHERE user_id = 'u_1';
         UPDATE users SET plan = 'pro' WHERE user_id = 'u_2';
         UPDATE users SET name = 'Cyrus' WHERE user_id = 'u_3';
         UPDATE users SET name = 'Fay B' WHERE user_id = 'u_6';
         DELETE FROM users WHERE user_id = 'u_3';
         DELETE FROM users WHERE user_id = 'u_4';",
    )
    .await
    .unwrap();
    fx.run_once();
    let streamed = fx.events().split_off(2);
    (fx, streamed)
}

/// (type, op, userId, traits.plan) of each event.
fn summary(events: &[Value]) -> Vec<(String, String, String, Value)> {
    events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_owned(),
                e["context"]["sources"]["op"].as_str().unwrap().to_owned(),
                e["userId"].as_str().unwrap().to_owned(),
                e["traits"]["plan"].clone(),
            )
        })
        .collect()
}

fn row(t: &str, op: &str, user: &str, plan: Value) -> (String, String, String, Value) {
    (t.to_owned(), op.to_owned(), user.to_owned(), plan)
}

#[tokio::test]
async fn mirror_mode_turns_a_row_leaving_the_filter_into_record_deleted() {
    let (_fx, events) = filter_scenario("mirror").await;
    assert_eq!(
        summary(&events),
        [
            row("identify", "insert", "u_4", "free".into()),
            // u_1 left the filter: a delete of the old row.
            row("track", "delete", "u_1", Value::Null),
            // u_2 entered it: an insert of the new row.
            row("identify", "insert", "u_2", "pro".into()),
            row("identify", "update", "u_6", "free".into()),
            row("track", "delete", "u_4", Value::Null),
        ],
        "{events:#?}"
    );
    assert_eq!(events[1]["event"], "Record Deleted");
    assert_eq!(events[1]["properties"]["userId"], "u_1");
    assert_eq!(events[3]["traits"]["name"], "Fay B");
    assert!(
        events.iter().all(|e| e["userId"] != "u_3"),
        "u_3 never matched the filter"
    );
}

#[tokio::test]
async fn upsert_mode_drops_a_row_leaving_the_filter_silently() {
    let (_fx, events) = filter_scenario("upsert").await;
    assert_eq!(
        summary(&events),
        [
            row("identify", "insert", "u_4", "free".into()),
            row("identify", "insert", "u_2", "pro".into()),
            row("identify", "update", "u_6", "free".into()),
        ],
        "{events:#?}"
    );
}
