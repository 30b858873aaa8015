//! Deletes follow `sync.mode` (docs/architecture.md §5): in `upsert` mode a streamed DELETE produces
//! nothing (no event, no dead letter) and the stream goes on; in `mirror` mode it becomes a
//! `track` event named `Record Deleted` whose properties are the deleted row's identifiers —
//! which the old row carries when the replica identity holds them (`REPLICA IDENTITY FULL`);
//! with the default identity (a primary key that is not an identifier) the sent-state ledger
//! names the user the key was last sent as. With `sync.ledger = false` such a delete cannot be
//! attributed to a user and goes to `_rudderstack.cdc_dead_letters` with a reason that says how
//! to fix it.

use crate::support;

use serde_json::{Value, json};
use support::{Fixture, users_fixture};

const TABLE: &str = "CREATE TABLE public.users (
    id bigserial PRIMARY KEY, user_id text, anonymous_id text, email text, name text, plan text)";

const ROWS: &str = "INSERT INTO users (user_id, anonymous_id, email, name, plan) VALUES
    ('u_1', NULL,     'ann@example.com', 'Ann', 'pro'),
    (NULL,  NULL,     'Bob@Example.com', 'Bob', 'free'),
    (NULL,  'anon-3', NULL,              'Cy',  'free'),
    ('u_4', 'anon-4', NULL,              'Di',  'pro')";

fn streamed(fx: &Fixture) -> Vec<Value> {
    fx.events()
        .into_iter()
        .filter(|e| e["context"]["sources"]["op"] != "snapshot")
        .collect()
}

/// (op, reason, payload) of the pipeline's dead letters, oldest first.
async fn dead_letters(fx: &Fixture) -> Vec<(String, String, Value)> {
    fx.db
        .connect()
        .await
        .query(
            r#"SELECT op, reason, payload FROM "_rudderstack".cdc_dead_letters
                WHERE pipeline = $1 ORDER BY id"#,
            &[&fx.name],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Creates the fixture, fills it, runs the full sync, deletes three rows (two in one
/// transaction), then inserts one more row, and streams.
async fn delete_scenario(identity_full: bool, mode: &str) -> Fixture {
    delete_scenario_with(identity_full, mode, "").await
}

async fn delete_scenario_with(identity_full: bool, mode: &str, sync: &str) -> Fixture {
    let table = if identity_full {
        format!("{TABLE}; ALTER TABLE public.users REPLICA IDENTITY FULL")
    } else {
        TABLE.to_owned()
    };
    let fx = users_fixture(&table, &format!("[sync]\nmode = \"{mode}\"\n{sync}"), None).await;
    let c = fx.db.connect().await;
    c.batch_execute(ROWS).await.unwrap();
    fx.run_once();
    assert_eq!(fx.events().len(), 4, "{:#?}", fx.events());
    c.batch_execute(
        "BEGIN;
         DELETE FROM users WHERE user_id = 'u_1';
         DELETE FROM users WHERE name = 'Bob';
         COMMIT;
         DELETE FROM users WHERE anonymous_id = 'anon-4';
         INSERT INTO users (user_id, name) VALUES ('u_5', 'Eve');",
    )
    .await
    .unwrap();
    fx.run_once();
    fx
}

#[tokio::test]
async fn upsert_mode_ignores_deletes() {
    let fx = delete_scenario(true, "upsert").await;
    let events = streamed(&fx);
    assert_eq!(
        events.len(),
        1,
        "only the insert after the deletes: {events:#?}"
    );
    assert_eq!(events[0]["type"], "identify");
    assert_eq!(events[0]["userId"], "u_5");
    assert_eq!(events[0]["context"]["sources"]["op"], "insert");
    assert!(dead_letters(&fx).await.is_empty());
}

#[tokio::test]
async fn mirror_mode_with_full_identity_sends_record_deleted() {
    let fx = delete_scenario(true, "mirror").await;
    let events = streamed(&fx);
    assert_eq!(events.len(), 4, "{events:#?}");
    let bob = slotstream::transform::mapping::anonymous_id_from_email("bob@example.com");
    let expected = [
        json!({"userId": "u_1"}),
        json!({"anonymousId": bob}),
        json!({"userId": "u_4", "anonymousId": "anon-4"}),
    ];
    for (event, ids) in events.iter().zip(&expected) {
        assert_eq!(event["type"], "track", "{event:#}");
        assert_eq!(event["event"], "Record Deleted", "{event:#}");
        assert_eq!(event["properties"], *ids, "{event:#}");
        assert_eq!(event["userId"], ids["userId"], "{event:#}");
        assert_eq!(event["anonymousId"], ids["anonymousId"], "{event:#}");
        assert!(event.get("traits").is_none(), "{event:#}");
        assert_eq!(event["context"]["sources"]["op"], "delete", "{event:#}");
        assert!(uuid::Uuid::parse_str(event["messageId"].as_str().unwrap()).is_ok());
    }
    // The first two deletes share a transaction (one commit LSN, two messageIds); the third is
    // a later transaction.
    let lsn = |i: usize| events[i]["context"]["sources"]["lsn"].clone();
    assert_eq!(lsn(0), lsn(1));
    assert_ne!(lsn(1), lsn(2));
    assert_ne!(events[0]["messageId"], events[1]["messageId"]);
    assert_eq!(events[3]["type"], "identify");
    assert_eq!(events[3]["userId"], "u_5");
    assert!(dead_letters(&fx).await.is_empty());
}

#[tokio::test]
async fn mirror_mode_with_key_identity_names_deleted_users_from_the_ledger() {
    let fx = delete_scenario(false, "mirror").await;
    let events = streamed(&fx);
    assert_eq!(events.len(), 4, "{events:#?}");
    let bob = slotstream::transform::mapping::anonymous_id_from_email("bob@example.com");
    let expected = [
        json!({"userId": "u_1"}),
        json!({"anonymousId": bob}),
        json!({"userId": "u_4", "anonymousId": "anon-4"}),
    ];
    for (event, ids) in events.iter().zip(&expected) {
        assert_eq!(event["event"], "Record Deleted", "{event:#}");
        assert_eq!(event["properties"], *ids, "{event:#}");
        assert_eq!(event["userId"], ids["userId"], "{event:#}");
    }
    assert_eq!(events[3]["userId"], "u_5");
    assert!(dead_letters(&fx).await.is_empty());
}

#[tokio::test]
async fn mirror_mode_with_key_identity_and_no_ledger_dead_letters_unattributable_deletes() {
    let fx = delete_scenario_with(false, "mirror", "ledger = false\n").await;
    let events = streamed(&fx);
    assert_eq!(
        events.len(),
        1,
        "the old key (id) names no user, so no delete can be sent: {events:#?}"
    );
    assert_eq!(events[0]["userId"], "u_5");
    let dead = dead_letters(&fx).await;
    assert_eq!(dead.len(), 3, "one dead letter per delete: {dead:#?}");
    for (op, reason, _payload) in &dead {
        assert_eq!(op, "delete");
        assert!(
            reason.contains("REPLICA IDENTITY FULL"),
            "the reason must say how to get deletes through: {reason}"
        );
    }
}
