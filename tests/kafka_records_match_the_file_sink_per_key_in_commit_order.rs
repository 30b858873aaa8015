//! The Kafka destination against a real broker (tansu): inserts, updates and deletes in mirror
//! mode with tombstones become one record per event, keyed by userId (else anonymousId), all
//! of a key's records in one partition in commit order, with the headers `lsn`, `op`, `table`
//! and `messageId`, and a tombstone right after each `Record Deleted`. The records' values are
//! the events the file sink writes for the same changes (a second pipeline on the same table),
//! and folding them per key gives the table as PostgreSQL committed it.

use crate::support;
use crate::support::kafka::{self, Record, TopicReader};

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

const TOPIC: &str = "users_match_file";
const PARTITIONS: i32 = 3;

const TABLE: &str = "CREATE TABLE public.users (
    id bigserial PRIMARY KEY, user_id text, anonymous_id text, email text, name text, plan text);
    ALTER TABLE public.users REPLICA IDENTITY FULL";

/// An event without what differs between two pipelines over the same changes: the pipeline
/// name (and the messageId derived from it) and the delivery time.
fn comparable(event: &Value) -> Value {
    let mut e = event.clone();
    let o = e.as_object_mut().expect("event object");
    o.remove("messageId");
    o.remove("sentAt");
    if let Some(s) = o
        .get_mut("context")
        .and_then(|c| c.get_mut("sources"))
        .and_then(Value::as_object_mut)
    {
        s.remove("name");
    }
    e
}

fn event_key(event: &Value) -> String {
    event["userId"]
        .as_str()
        .or(event["anonymousId"].as_str())
        .expect("an event has a userId or an anonymousId")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_records_equal_the_file_sinks_events_per_key_in_commit_order() {
    let broker = kafka::broker();
    let fx = support::users_fixture(TABLE, "[sync]\nmode = \"mirror\"\n", None).await;
    // A second pipeline on the same table and publication, into Kafka.
    let kafka_name = format!("{}_kafka", fx.name);
    let kafka_dir = fx.dir.path().join("kafka");
    std::fs::create_dir(&kafka_dir).unwrap();
    let kafka_config = fx.db.write_config(
        &kafka_dir,
        &kafka_name,
        &fx.role,
        "pw",
        "users",
        &format!(
            "publication = {publication:?}\n[sync]\nmode = \"mirror\"\n[destination]\ntype = \"kafka\"\nbrokers = \"{addr}\"\ntopic = \"{TOPIC}\"\ntombstones = true\ncreate_topic = true\npartitions = {PARTITIONS}\ncompression = \"zstd\"\n",
            publication = fx.slot,
            addr = broker.address(),
        ),
    );
    let kafka_run = |command: &str| {
        let config = kafka_config.display().to_string();
        let (code, out, err) = support::run_slotstream(&[command, "--config", &config]);
        assert_eq!(code, 0, "{command}\n{out}\n{err}\n{}", broker.log());
        out
    };
    let kafka_run_once = || {
        let config = kafka_config.display().to_string();
        let (code, out, err) = support::run_slotstream(&["run", "--config", &config, "--once"]);
        assert_eq!(code, 0, "run --once\n{out}\n{err}\n{}", broker.log());
    };

    // Both pipelines start (an empty table: nothing to sync), then the same changes stream.
    fx.run_once();
    kafka_run_once();
    let checked = kafka_run("check");
    assert!(
        checked.contains(&format!("Kafka topic \"{TOPIC}\"")),
        "check names the topic:\n{checked}"
    );
    let c = fx.db.connect().await;
    c.batch_execute(
        "INSERT INTO users (user_id, email, name, plan)
              SELECT 'u' || g, 'u' || g || '@example.com', 'User ' || g, 'free' FROM generate_series(1, 8) g;
         INSERT INTO users (anonymous_id, name, plan) VALUES ('anon-1', 'Anon', 'free');
         UPDATE users SET plan = 'pro' WHERE user_id = 'u1';
         UPDATE users SET plan = 'team' WHERE user_id = 'u1';
         BEGIN;
         UPDATE users SET name = 'Second' WHERE user_id = 'u2';
         DELETE FROM users WHERE user_id = 'u3';
         INSERT INTO users (user_id, plan) VALUES ('u9', 'free');
         UPDATE users SET plan = 'pro' WHERE user_id = 'u9';
         COMMIT;
         DELETE FROM users WHERE user_id = 'u2';
         UPDATE users SET plan = 'enterprise' WHERE anonymous_id = 'anon-1';
         DELETE FROM users WHERE user_id = 'u9';
         INSERT INTO users (user_id, plan) VALUES ('u9', 'again');",
    )
    .await
    .unwrap();
    fx.run_once();
    kafka_run_once();

    let file_events = fx.events();
    let deletes = file_events
        .iter()
        .filter(|e| e["event"] == "Record Deleted")
        .count();
    assert_eq!(deletes, 3, "{file_events:#?}");
    let want = file_events.len() + deletes;
    let mut reader = TopicReader::new(&broker.address(), TOPIC, PARTITIONS);
    let read = reader.read_until(want, Duration::from_secs(30));
    assert_eq!(read, want, "records read: {:#?}", reader.records);
    // Nothing more than that arrives.
    assert_eq!(reader.read_until(want + 1, Duration::from_secs(1)), want);

    // Per key: the same events in the same order, a tombstone after each delete, one
    // partition.
    let mut file_per_key: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for e in &file_events {
        file_per_key
            .entry(event_key(e))
            .or_default()
            .push(comparable(e));
    }
    let mut kafka_per_key: BTreeMap<String, Vec<&Record>> = BTreeMap::new();
    for r in &reader.records {
        let key = r.key.clone().expect("every record has a key");
        kafka_per_key.entry(key).or_default().push(r);
    }
    assert_eq!(
        file_per_key.keys().collect::<Vec<_>>(),
        kafka_per_key.keys().collect::<Vec<_>>()
    );
    for (key, records) in &kafka_per_key {
        let partitions: std::collections::BTreeSet<i32> =
            records.iter().map(|r| r.partition).collect();
        assert_eq!(
            partitions.len(),
            1,
            "key {key} spans partitions {partitions:?}"
        );
        let mut values = Vec::new();
        let mut previous: Option<&Value> = None;
        for r in records {
            match &r.value {
                Some(v) => {
                    assert_eq!(event_key(v), *key, "the key is userId, else anonymousId");
                    let sources = &v["context"]["sources"];
                    assert_eq!(r.header("lsn"), sources["lsn"].as_str(), "{r:?}");
                    assert_eq!(r.header("op"), sources["op"].as_str(), "{r:?}");
                    assert_eq!(r.header("table"), Some("users"), "{r:?}");
                    assert_eq!(r.header("messageId"), v["messageId"].as_str(), "{r:?}");
                    values.push(comparable(v));
                    previous = Some(v);
                }
                None => {
                    let deleted = previous.expect("a tombstone follows an event of its key");
                    assert_eq!(
                        deleted["event"], "Record Deleted",
                        "a tombstone follows a delete: {records:#?}"
                    );
                    assert_eq!(r.header("op"), Some("delete"));
                    previous = None;
                }
            }
        }
        assert_eq!(&values, &file_per_key[key], "key {key}");
    }

    // Folded per key, the records give the table as committed.
    let mut folded: BTreeMap<String, Option<String>> = BTreeMap::new();
    for (key, records) in &kafka_per_key {
        let last = records.last().expect("records");
        folded.insert(
            key.clone(),
            last.value
                .as_ref()
                .map(|v| v["traits"]["plan"].as_str().unwrap_or_default().to_owned()),
        );
    }
    let rows = c
        .query(
            "SELECT coalesce(user_id, anonymous_id), plan FROM users ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let table: BTreeMap<String, Option<String>> = rows
        .iter()
        .map(|r| (r.get::<_, String>(0), Some(r.get::<_, String>(1))))
        .collect();
    let live: BTreeMap<String, Option<String>> = folded
        .iter()
        .filter(|(_, v)| v.is_some())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(live, table, "the live keys are the table's rows");
    assert_eq!(folded.get("u3"), Some(&None), "u3 ends with a tombstone");
    assert_eq!(folded.get("u2"), Some(&None), "u2 ends with a tombstone");
}
