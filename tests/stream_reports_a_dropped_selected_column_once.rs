//! Dropping a column that `[mapping] columns` selects does not stop a running stream: the drop
//! is reported once in the log (a warning naming the column) — not again when later schema
//! changes re-announce the table — and the other selected columns keep flowing as traits.

use crate::support;

use std::time::Duration;

use serde_json::json;
use support::{sigterm, users_fixture, wait_until};

const WARNING: &str = "no longer in the table";

#[tokio::test]
async fn dropped_selected_column_is_reported_once() {
    let fx = users_fixture(
        support::USERS_TABLE,
        "[mapping]\ncolumns = [\"user_id\", \"email\", \"name\", \"plan\"]\n",
        None,
    )
    .await;
    let c = fx.db.connect().await;
    c.batch_execute(
        "INSERT INTO users (user_id, email, name, plan) VALUES ('u_1', 'a@x', 'Ann', 'pro')",
    )
    .await
    .unwrap();
    let mut child = fx.spawn_run();
    let count = |n: usize| {
        let fx = &fx;
        move || async move { fx.events().len() >= n }
    };
    wait_until(Duration::from_secs(60), "the full sync", count(1)).await;
    c.batch_execute("UPDATE users SET plan = 'enterprise' WHERE user_id = 'u_1'")
        .await
        .unwrap();
    wait_until(Duration::from_secs(30), "the first update", count(2)).await;

    c.batch_execute("ALTER TABLE users DROP COLUMN plan")
        .await
        .unwrap();
    c.batch_execute("UPDATE users SET name = 'Ann B' WHERE user_id = 'u_1'")
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(30),
        "the update after the drop",
        count(3),
    )
    .await;
    // Later changes, and another schema change that re-announces the table.
    c.batch_execute("INSERT INTO users (user_id, email, name) VALUES ('u_2', 'b@x', 'Bob')")
        .await
        .unwrap();
    c.batch_execute("ALTER TABLE users ADD COLUMN age int")
        .await
        .unwrap();
    c.batch_execute("UPDATE users SET name = 'Bobby', age = 3 WHERE user_id = 'u_2'")
        .await
        .unwrap();
    wait_until(Duration::from_secs(30), "the later changes", count(5)).await;

    sigterm(&child);
    wait_until(Duration::from_secs(30), "slotstream exits", || {
        let done = child.try_wait().unwrap().is_some();
        async move { done }
    })
    .await;
    let log = fx.run_log();
    assert_eq!(child.wait().unwrap().code(), Some(0), "{log}");

    let events = fx.events();
    let traits: Vec<&serde_json::Value> = events.iter().map(|e| &e["traits"]).collect();
    assert_eq!(
        traits,
        [
            &json!({"user_id": "u_1", "email": "a@x", "name": "Ann", "plan": "pro"}),
            &json!({"user_id": "u_1", "email": "a@x", "name": "Ann", "plan": "enterprise"}),
            &json!({"user_id": "u_1", "email": "a@x", "name": "Ann B"}),
            &json!({"user_id": "u_2", "email": "b@x", "name": "Bob"}),
            &json!({"user_id": "u_2", "email": "b@x", "name": "Bobby"}),
        ],
        "the dropped column's trait is gone, the others flow, `age` is not selected"
    );
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains(WARNING)).collect();
    assert_eq!(warnings.len(), 1, "reported exactly once:\n{log}");
    assert!(
        warnings[0].contains("WARN") && warnings[0].contains("plan"),
        "a warning naming the column: {}",
        warnings[0]
    );
}
