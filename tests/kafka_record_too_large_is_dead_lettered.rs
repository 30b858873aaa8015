//! A record larger than the producer may send (`message.max.bytes`, passed through
//! `librdkafka_options`) is refused for good: its event goes to
//! `_rudderstack.cdc_dead_letters` with the reason, and the pipeline goes on: the records
//! after it are delivered and the checkpoint moves past it.

use crate::support;
use crate::support::kafka::{self, TopicReader};

use std::time::Duration;

const TOPIC: &str = "users_too_large";

#[tokio::test(flavor = "multi_thread")]
async fn a_record_too_large_is_dead_lettered_and_later_records_are_delivered() {
    let broker = kafka::broker();
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    fx.rewrite_config(&format!(
            "[destination]\ntype = \"kafka\"\nbrokers = \"{}\"\ntopic = \"{TOPIC}\"\ncreate_topic = true\n[destination.librdkafka_options]\n\"message.max.bytes\" = 20000\n",
            broker.address()
        ),
    );
    let c = fx.db.connect().await;
    c.batch_execute("INSERT INTO users (user_id, plan) VALUES ('u1', 'free')")
        .await
        .unwrap();
    fx.run_once();
    c.batch_execute(
        "INSERT INTO users (user_id, name, plan) VALUES ('u2', repeat('x', 50000), 'free');
         INSERT INTO users (user_id, plan) VALUES ('u3', 'free');",
    )
    .await
    .unwrap();
    fx.run_once();

    let mut reader = TopicReader::new(&broker.address(), TOPIC, 1);
    reader.read_until(3, Duration::from_secs(10));
    let users: Vec<&str> = reader
        .records
        .iter()
        .filter_map(|r| r.value.as_ref()?["userId"].as_str())
        .collect();
    assert_eq!(users, ["u1", "u3"]);

    let dead: Vec<(String, String, serde_json::Value)> = c
        .query(
            r#"SELECT op, reason, payload FROM "_rudderstack".cdc_dead_letters WHERE pipeline = $1"#,
            &[&fx.name],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(dead.len(), 1, "{dead:#?}");
    let (op, reason, payload) = &dead[0];
    assert_eq!(op, "insert");
    assert!(reason.contains("too large"), "{reason}");
    assert!(payload.to_string().contains("\"u2\""), "{payload}");
    // The checkpoint covers the transaction of the record after it.
    let u3 = reader
        .records
        .iter()
        .find(|r| r.value.as_ref().is_some_and(|v| v["userId"] == "u3"))
        .and_then(|r| r.header("lsn"))
        .map(support::faults::parse_lsn)
        .expect("u3's commit LSN");
    let (checkpoint, _) = fx.positions().await;
    assert!(
        checkpoint.is_some_and(|p| p > u3),
        "the checkpoint {checkpoint:?} did not move past {u3}"
    );
}
