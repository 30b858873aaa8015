//! A TOASTed value (a large, incompressible text stored out of line) that an UPDATE leaves
//! unchanged is not in the new row pgoutput sends (it sends the "unchanged TOAST" marker):
//! the update's traits leave that column out — no placeholder, no null — while inserts and
//! updates that do write the value carry it whole.
//!
//! With `REPLICA IDENTITY FULL`, pgoutput still marks the value unchanged in the new row, but
//! the old row it sends alongside carries the value in full. An unchanged value is the old
//! value, so the update's traits then carry it: the destination gets the complete row.

use crate::support;

use serde_json::Value;
use support::{Fixture, users_fixture};

/// About 32 kB of random hex: far above the TOAST threshold, and pglz cannot compress it
/// enough to keep it inline.
const BIG: &str = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 1000))";

async fn bio_of(fx: &Fixture, user_id: &str) -> String {
    fx.db
        .connect()
        .await
        .query_one("SELECT bio FROM users WHERE user_id = $1", &[&user_id])
        .await
        .unwrap()
        .get(0)
}

/// Full sync of one row with a big bio, then: an update that leaves the bio alone, an update
/// of the bio, an insert with a big bio, and another update that leaves it alone.
async fn toast_scenario(identity_full: bool) -> (Fixture, Vec<Value>) {
    let mut table = "CREATE TABLE public.users (
        id bigserial PRIMARY KEY, user_id text, name text, bio text)"
        .to_owned();
    if identity_full {
        table.push_str("; ALTER TABLE public.users REPLICA IDENTITY FULL");
    }
    let fx = users_fixture(&table, "", None).await;
    let c = fx.db.connect().await;
    c.batch_execute(&format!(
        "INSERT INTO users (user_id, name, bio) VALUES ('u_1', 'Ann', {BIG})"
    ))
    .await
    .unwrap();
    let out_of_line: bool = c
        .query_one(
            "SELECT pg_relation_size(reltoastrelid) > 0 FROM pg_class
              WHERE oid = 'public.users'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(out_of_line, "the bio must be stored in the TOAST table");
    fx.run_once();
    c.batch_execute(&format!(
        "UPDATE users SET name = 'Ann B' WHERE user_id = 'u_1';
         UPDATE users SET bio = {BIG} WHERE user_id = 'u_1';
         INSERT INTO users (user_id, name, bio) VALUES ('u_2', 'Bob', {BIG});
         UPDATE users SET name = 'Bobby' WHERE user_id = 'u_2';"
    ))
    .await
    .unwrap();
    fx.run_once();
    let events = fx.events();
    assert_eq!(events.len(), 5, "{events:#?}");
    (fx, events)
}

#[tokio::test]
async fn unchanged_toast_value_is_left_out_of_the_update() {
    let (fx, events) = toast_scenario(false).await;
    let first_bio = events[0]["traits"]["bio"].as_str().unwrap().to_owned();
    assert!(first_bio.len() >= 32_000, "the snapshot carries the bio");

    let untouched = &events[1];
    assert_eq!(untouched["context"]["sources"]["op"], "update");
    assert_eq!(untouched["traits"]["name"], "Ann B");
    assert!(
        untouched["traits"].get("bio").is_none(),
        "an unchanged TOASTed value is left out, not sent as a placeholder or null: {:#}",
        untouched["traits"]
    );

    let u1_bio = bio_of(&fx, "u_1").await;
    assert_ne!(u1_bio, first_bio);
    assert_eq!(
        events[2]["traits"]["bio"], u1_bio,
        "an updated value comes whole"
    );
    assert_eq!(events[3]["context"]["sources"]["op"], "insert");
    assert_eq!(events[3]["traits"]["bio"], bio_of(&fx, "u_2").await);
    assert_eq!(events[4]["traits"]["name"], "Bobby");
    assert!(events[4]["traits"].get("bio").is_none(), "{:#}", events[4]);
}

#[tokio::test]
async fn with_full_identity_the_unchanged_toast_value_comes_from_the_old_row() {
    let (fx, events) = toast_scenario(true).await;
    let first_bio = events[0]["traits"]["bio"].as_str().unwrap().to_owned();

    let untouched = &events[1];
    assert_eq!(untouched["context"]["sources"]["op"], "update");
    assert_eq!(untouched["traits"]["name"], "Ann B");
    assert_eq!(
        untouched["traits"]["bio"], first_bio,
        "the old row (REPLICA IDENTITY FULL) holds the unchanged value"
    );
    assert_eq!(events[2]["traits"]["bio"], bio_of(&fx, "u_1").await);
    assert_eq!(events[3]["traits"]["bio"], bio_of(&fx, "u_2").await);
    assert_eq!(events[4]["traits"]["name"], "Bobby");
    assert_eq!(events[4]["traits"]["bio"], bio_of(&fx, "u_2").await);
}
