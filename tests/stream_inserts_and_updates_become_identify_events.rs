//! Inserts and updates committed after the full sync become `identify` events (docs/architecture.md §5):
//! userId / anonymousId from the identifier columns (an email-only row gets the anonymousId
//! derived from the normalised email), traits under the `[mapping.trait_keys]` names plus the
//! constants, `context.sources.op` insert / update, `context.sources.lsn` the LSN of the
//! transaction's commit record (read independently with pg_walinspect), `originalTimestamp` the
//! commit time, and a `messageId` unique per change. Replaying the same WAL (the slot and the
//! checkpoint rewound to the position before the changes) yields byte-for-byte the same events,
//! messageIds included.

use crate::support;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};
use support::{Fixture, users_fixture_at, wait_until};

const TABLE: &str = "CREATE TABLE public.users (
    id bigserial PRIMARY KEY, user_id text, anonymous_id text, email text, name text,
    plan text, secret text)";

/// `ledger = false`: every update is sent, also one that changes no trait (suppressing those is
/// the ledger's job, proven in `mirror_mode_works_with_the_default_replica_identity`).
const MAPPING: &str = r#"
[sync]
ledger = false
[mapping]
columns = ["user_id", "email", "name", "plan"]
constants = { source = "postgres", tier = 2 }
[mapping.trait_keys]
name = "fullName"
plan = "subscription"
"#;

/// The current transaction's id, as text (xid8 of a fresh cluster: epoch 0).
async fn xid(tx: &tokio_postgres::Transaction<'_>) -> String {
    tx.query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// The start LSN of transaction `xid`'s commit record, read from the WAL with pg_walinspect
/// (which reads flushed WAL only: a synchronous commit flushes everything before it first).
async fn commit_record_lsn(admin: &tokio_postgres::Client, from: &str, xid: &str) -> String {
    admin
        .batch_execute(
            "BEGIN; SET LOCAL synchronous_commit = on; SELECT pg_current_xact_id(); COMMIT;",
        )
        .await
        .unwrap();
    admin
        .query_opt(
            "SELECT start_lsn::text FROM pg_get_wal_records_info($1::text::pg_lsn,
                                                           pg_current_wal_flush_lsn())
              WHERE resource_manager = 'Transaction' AND record_type = 'COMMIT'
                AND xid::text = $2",
            &[&from, &xid],
        )
        .await
        .unwrap()
        .map(|r| r.get::<_, String>(0))
        .unwrap_or_else(|| panic!("no commit record for xid {xid} after {from}"))
}

fn streamed(fx: &Fixture) -> Vec<Value> {
    fx.events()
        .into_iter()
        .filter(|e| e["context"]["sources"]["op"] != "snapshot")
        .collect()
}

/// The event without `sentAt` (the only field that depends on the delivery).
fn without_sent_at(mut e: Value) -> Value {
    e.as_object_mut().unwrap().remove("sentAt");
    e
}

#[tokio::test]
async fn inserts_and_updates_become_identify_events() {
    inserts_and_updates_become_identify_events_in(support::cluster()).await;
}

/// The scenario on `cluster` (also run on PostgreSQL 18 by `core_on_postgres_18`).
pub async fn inserts_and_updates_become_identify_events_in(cluster: &'static support::Cluster) {
    let fx = users_fixture_at(cluster, TABLE, MAPPING, None).await;
    let admin = fx.db.connect().await;
    admin
        .batch_execute(
            "CREATE EXTENSION pg_walinspect;
             INSERT INTO users (user_id, email, name, plan, secret)
                  VALUES ('u_0', 'zero@example.com', 'Zed', 'free', 'x')",
        )
        .await
        .unwrap();
    fx.run_once();
    let snapshot = fx.events();
    assert_eq!(snapshot.len(), 1, "{snapshot:#?}");
    assert_eq!(snapshot[0]["context"]["sources"]["op"], "snapshot");

    // The slot as it stands after the full sync, kept for the replay below.
    let copy = format!("{}_replay", fx.slot);
    admin
        .execute(
            "SELECT pg_copy_logical_replication_slot($1, $2)",
            &[&fx.slot, &copy],
        )
        .await
        .unwrap();
    let (checkpoint_before, _) = fx.positions().await;
    let checkpoint_before = checkpoint_before.expect("checkpoint after the full sync");
    let wal_from: String = admin
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);

    // Transaction 1: four inserts with every identifier combination.
    let mut c = fx.db.connect().await;
    let tx = c.transaction().await.unwrap();
    let xid1 = xid(&tx).await;
    tx.batch_execute(
        "INSERT INTO users (user_id, anonymous_id, email, name, plan, secret) VALUES
            ('u_1', NULL,     'ann@example.com',   'Ann', 'pro',  's1'),
            (NULL,  NULL,     ' Bob@Example.COM ', 'Bob', 'free', 's2'),
            (NULL,  'anon-3', NULL,                'Cy',  NULL,   's3'),
            ('u_4', 'anon-4', 'di@example.com',    'Di',  'pro',  's4')",
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let window = admin
        .query_one("SELECT clock_timestamp()::text", &[])
        .await
        .unwrap()
        .get::<_, String>(0);
    // Transaction 2: two updates (one of a column that is not selected) and one more insert.
    let tx = c.transaction().await.unwrap();
    let xid2 = xid(&tx).await;
    tx.batch_execute(
        "UPDATE users SET plan = 'enterprise', name = 'Ann B' WHERE user_id = 'u_1';
         UPDATE users SET secret = 'changed' WHERE anonymous_id = 'anon-3';
         INSERT INTO users (user_id, email, name, plan) VALUES ('u_5', NULL, 'Eve', 'free');",
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let after: String = admin
        .query_one("SELECT clock_timestamp()::text", &[])
        .await
        .unwrap()
        .get(0);

    fx.run_once();
    let events = streamed(&fx);
    assert_eq!(events.len(), 7, "{events:#?}");

    let lsn1 = commit_record_lsn(&admin, &wal_from, &xid1).await;
    let lsn2 = commit_record_lsn(&admin, &wal_from, &xid2).await;
    assert_ne!(lsn1, lsn2);

    let bob_anon = slotstream::transform::mapping::anonymous_id_from_email("bob@example.com");
    let expected = [
        (
            "insert",
            &lsn1,
            json!({"userId": "u_1"}),
            json!({"user_id": "u_1", "email": "ann@example.com", "fullName": "Ann", "subscription": "pro"}),
        ),
        (
            "insert",
            &lsn1,
            json!({"anonymousId": bob_anon}),
            json!({"user_id": null, "email": " Bob@Example.COM ", "fullName": "Bob", "subscription": "free"}),
        ),
        (
            "insert",
            &lsn1,
            json!({"anonymousId": "anon-3"}),
            json!({"user_id": null, "email": null, "fullName": "Cy", "subscription": null}),
        ),
        (
            "insert",
            &lsn1,
            json!({"userId": "u_4", "anonymousId": "anon-4"}),
            json!({"user_id": "u_4", "email": "di@example.com", "fullName": "Di", "subscription": "pro"}),
        ),
        (
            "update",
            &lsn2,
            json!({"userId": "u_1"}),
            json!({"user_id": "u_1", "email": "ann@example.com", "fullName": "Ann B", "subscription": "enterprise"}),
        ),
        (
            "update",
            &lsn2,
            json!({"anonymousId": "anon-3"}),
            json!({"user_id": null, "email": null, "fullName": "Cy", "subscription": null}),
        ),
        (
            "insert",
            &lsn2,
            json!({"userId": "u_5"}),
            json!({"user_id": "u_5", "email": null, "fullName": "Eve", "subscription": "free"}),
        ),
    ];
    for (event, (op, lsn, ids, traits)) in events.iter().zip(expected.iter()) {
        let mut traits = traits.clone();
        traits["source"] = json!("postgres");
        traits["tier"] = json!(2);
        assert_eq!(event["type"], "identify", "{event:#}");
        assert_eq!(event["userId"], ids["userId"], "{event:#}");
        assert_eq!(event["anonymousId"], ids["anonymousId"], "{event:#}");
        assert_eq!(event["traits"], traits, "{event:#}");
        let keys: Vec<&String> = event["traits"].as_object().unwrap().keys().collect();
        assert!(
            !keys
                .iter()
                .any(|k| ["name", "plan", "secret", "id"].contains(&k.as_str())),
            "only selected columns under their trait keys: {event:#}"
        );
        let sources = &event["context"]["sources"];
        assert_eq!(sources["op"], *op, "{event:#}");
        assert_eq!(
            sources["lsn"],
            json!(lsn),
            "lsn must be the commit LSN: {event:#}"
        );
        assert_eq!(sources["name"], json!(fx.name));
        assert_eq!(sources["schema"], "public");
        assert_eq!(sources["table"], "users");
        assert_eq!(event["context"]["library"]["name"], "slotstream");
        assert!(event["sentAt"].is_string(), "{event:#}");
    }
    // originalTimestamp is the commit time: transaction 1 committed before `window`,
    // transaction 2 after it and before `after`.
    let in_window = |ts: &Value, lo: Option<&str>, hi: &str| {
        let ts = ts.as_str().unwrap().to_owned();
        let lo = lo.map(str::to_owned);
        let hi = hi.to_owned();
        let admin = &admin;
        async move {
            admin
                .query_one(
                    "SELECT $1::text::timestamptz <= $3::text::timestamptz
                        AND ($2::text IS NULL OR $1::text::timestamptz >= $2::text::timestamptz)",
                    &[&ts, &lo, &hi],
                )
                .await
                .unwrap()
                .get::<_, bool>(0)
        }
    };
    for e in &events[..4] {
        assert!(
            in_window(&e["originalTimestamp"], None, &window).await,
            "{e:#}"
        );
        assert_eq!(e["originalTimestamp"], events[0]["originalTimestamp"]);
    }
    for e in &events[4..] {
        assert!(
            in_window(&e["originalTimestamp"], Some(&window), &after).await,
            "{e:#}"
        );
    }

    // messageIds: UUIDs, one per change, none shared with the snapshot.
    let mut ids: HashSet<String> = HashSet::new();
    for e in events.iter().chain(snapshot.iter()) {
        let id = e["messageId"].as_str().unwrap();
        uuid::Uuid::parse_str(id).unwrap_or_else(|_| panic!("messageId {id} is not a UUID"));
        assert!(ids.insert(id.to_owned()), "duplicate messageId {id}");
    }

    // Replay: rewind the slot (to the copy taken after the full sync) and the checkpoint, then
    // read the same WAL again into an empty file.
    wait_until(Duration::from_secs(20), "the slot is released", || async {
        !admin
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&fx.slot],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
    admin
        .execute("SELECT pg_drop_replication_slot($1)", &[&fx.slot])
        .await
        .unwrap();
    admin
        .execute(
            "SELECT pg_copy_logical_replication_slot($1, $2)",
            &[&copy, &fx.slot],
        )
        .await
        .unwrap();
    admin
        .execute(
            r#"UPDATE "_rudderstack".cdc_checkpoints SET lsn = ('0/0'::pg_lsn + $2::int8)
                WHERE pipeline = $1"#,
            &[&fx.name, &(checkpoint_before as i64)],
        )
        .await
        .unwrap();
    std::fs::write(&fx.events, "").unwrap();
    fx.run_once();
    let replayed = fx.events();
    assert_eq!(
        replayed.len(),
        events.len(),
        "the replay is a stream, not a new full sync: {replayed:#?}"
    );
    for (a, b) in events.iter().zip(replayed) {
        assert_eq!(without_sent_at(a.clone()), without_sent_at(b));
    }
}
