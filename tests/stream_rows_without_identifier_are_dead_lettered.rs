//! A row without any identifier value (user_id, anonymous_id and email all NULL or empty) is
//! never sent (docs/architecture.md §5): neither from the full sync nor from the stream (insert or
//! update). Each one is written to `_rudderstack.cdc_dead_letters` with its op, LSN, a reason
//! and the traits it would have carried, counted in the sync run, and the identified rows around
//! it keep flowing.

use crate::support;

use serde_json::{Value, json};
use support::users_fixture;

const TABLE: &str = "CREATE TABLE public.users (
    id bigserial PRIMARY KEY, user_id text, anonymous_id text, email text, name text)";

#[tokio::test]
async fn rows_without_identifier_are_dead_lettered() {
    let fx = users_fixture(TABLE, "[mapping]\nconstants = { source = \"pg\" }\n", None).await;
    let c = fx.db.connect().await;
    c.batch_execute(
        "INSERT INTO users (user_id, anonymous_id, email, name) VALUES
            ('u_1', NULL, NULL, 'Ann'),
            (NULL,  NULL, NULL, 'Nobody in the snapshot')",
    )
    .await
    .unwrap();
    fx.run_once();
    c.batch_execute(
        "INSERT INTO users (user_id, anonymous_id, email, name) VALUES
            (NULL, NULL, NULL, 'Nobody'),
            ('',   '',   '',   'Empty strings'),
            ('u_2', NULL, NULL, 'Bob');
         UPDATE users SET user_id = NULL, name = 'Ann lost her id' WHERE user_id = 'u_1';",
    )
    .await
    .unwrap();
    fx.run_once();

    let events = fx.events();
    let names: Vec<&Value> = events.iter().map(|e| &e["traits"]["name"]).collect();
    assert_eq!(names, [&json!("Ann"), &json!("Bob")], "{events:#?}");
    assert_eq!(events[1]["context"]["sources"]["op"], "insert");

    let rows = c
        .query(
            r#"SELECT op, reason, payload, lsn::text FROM "_rudderstack".cdc_dead_letters
                WHERE pipeline = $1 ORDER BY id"#,
            &[&fx.name],
        )
        .await
        .unwrap();
    let dead: Vec<(String, String, Value, Option<String>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let ops: Vec<&str> = dead.iter().map(|d| d.0.as_str()).collect();
    assert_eq!(ops, ["snapshot", "insert", "insert", "update"], "{dead:#?}");
    let payload_names: Vec<&Value> = dead.iter().map(|d| &d.2["name"]).collect();
    assert_eq!(
        payload_names,
        [
            &json!("Nobody in the snapshot"),
            &json!("Nobody"),
            &json!("Empty strings"),
            &json!("Ann lost her id")
        ]
    );
    for (_, reason, payload, lsn) in &dead {
        assert!(reason.contains("identifier"), "{reason}");
        assert_eq!(
            payload["source"], "pg",
            "the payload is the traits: {payload}"
        );
        assert!(lsn.as_deref().is_some_and(|l| l != "0/0"), "{lsn:?}");
    }
    // The three streamed dead letters come from one transaction: the same commit LSN as Bob's.
    for d in &dead[1..] {
        assert_eq!(
            d.3.as_deref(),
            events[1]["context"]["sources"]["lsn"].as_str(),
            "{d:?}"
        );
    }
    // The sync runs count them.
    let counted: i64 = c
        .query_one(
            r#"SELECT coalesce(sum(dead_letters), 0)::int8 FROM "_rudderstack".cdc_sync_runs
                WHERE pipeline = $1"#,
            &[&fx.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(counted, 4);
}
