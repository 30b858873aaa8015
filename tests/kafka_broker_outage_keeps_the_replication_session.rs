//! The Kafka broker goes away for 30 s in the middle of a stream and comes back (a real broker
//! process killed and started again on its port). The deliverer retries the batch while the
//! replication session stays up: the slot keeps one walsender (the same pid in
//! `pg_stat_replication`) for the whole outage although the server's `wal_sender_timeout` is
//! 10 s, the checkpoint does not move while nothing can be delivered, and once the broker is
//! back every change committed during the outage arrives, and the checkpoint covers it, without
//! anyone restarting slotstream.

use crate::support;
use crate::support::faults;
use crate::support::kafka::{self, Broker, TopicReader};

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const TOPIC: &str = "users_outage";
const OUTAGE: Duration = Duration::from_secs(30);

/// The latest commit LSN among `records` (their `lsn` headers).
fn last_commit(records: &[crate::support::kafka::Record]) -> u64 {
    records
        .iter()
        .filter_map(|r| r.header("lsn"))
        .map(faults::parse_lsn)
        .max()
        .expect("records with an lsn header")
}

fn user_ids(records: &[crate::support::kafka::Record]) -> BTreeSet<String> {
    records
        .iter()
        .filter_map(|r| r.value.as_ref()?["userId"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_30s_broker_outage_is_ridden_out_on_one_replication_connection() {
    let broker = Broker::start();
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    // The same pipeline, into Kafka: records time out after 2 s, so the batch is retried (and
    // its failures logged) during the outage.
    fx.rewrite_config(&format!(
            "[destination]\ntype = \"kafka\"\nbrokers = \"{}\"\ntopic = \"{TOPIC}\"\ncreate_topic = true\n[destination.librdkafka_options]\n\"message.timeout.ms\" = 2000\n[destination.retry]\nmax_backoff = \"2s\"\n",
            broker.address()
        ),
    );
    let c = fx.db.connect().await;
    c.batch_execute(
        "INSERT INTO users (user_id, plan) SELECT 'a' || g, 'free' FROM generate_series(1, 20) g",
    )
    .await
    .unwrap();
    let (mut run, pid) = faults::spawn_streaming(&fx, &c).await;

    // Before the outage: delivered and checkpointed.
    c.batch_execute(
        "INSERT INTO users (user_id, plan) SELECT 'b' || g, 'free' FROM generate_series(1, 20) g",
    )
    .await
    .unwrap();
    let mut reader = TopicReader::new(&broker.address(), TOPIC, 1);
    assert_eq!(
        reader.read_until(40, Duration::from_secs(30)),
        40,
        "{}",
        fx.run_log()
    );
    let before = last_commit(&reader.records);
    support::wait_until(
        Duration::from_secs(30),
        "the checkpoint covers the first rows",
        || async { fx.positions().await.0.is_some_and(|p| p > before) },
    )
    .await;
    let (checkpoint, _) = fx.positions().await;

    // The outage: changes committed meanwhile cannot be delivered.
    broker.stop();
    let stopped = Instant::now();
    for t in 0..5 {
        c.batch_execute(&format!(
            "INSERT INTO users (user_id, plan) SELECT 'c{t}_' || g, 'free' FROM generate_series(1, 10) g"
        ))
        .await
        .unwrap();
    }
    while stopped.elapsed() < OUTAGE {
        assert_eq!(
            fx.positions().await.0,
            checkpoint,
            "the checkpoint moved while the broker was down\n{}",
            fx.run_log()
        );
        assert_eq!(
            faults::walsender(&c, &fx.slot).await,
            Some(pid),
            "the replication connection was not kept through the outage\n{}",
            fx.run_log()
        );
        assert!(run.try_wait().unwrap().is_none(), "{}", fx.run_log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    assert!(
        fx.run_log().contains("retrying the batch"),
        "the failed batch was retried\n{}",
        fx.run_log()
    );

    // The broker is back (empty: its storage was in memory); slotstream recovers by itself.
    broker.resume();
    kafka::create_topic(&broker.address(), TOPIC).await;
    let mut reader = TopicReader::new(&broker.address(), TOPIC, 1);
    let want: BTreeSet<String> = (0..5)
        .flat_map(|t| (1..=10).map(move |g| format!("c{t}_{g}")))
        .collect();
    reader.read_until(want.len(), Duration::from_secs(60));
    let got = user_ids(&reader.records);
    assert!(
        want.is_subset(&got),
        "lost during the outage: {:?}\n{}\n--- broker\n{}",
        want.difference(&got).collect::<Vec<_>>(),
        fx.run_log(),
        broker.log()
    );
    let during = last_commit(&reader.records);
    support::wait_until(
        Duration::from_secs(30),
        "the checkpoint covers the outage's changes",
        || async { fx.positions().await.0.is_some_and(|p| p > during) },
    )
    .await;
    assert_eq!(
        faults::walsender(&c, &fx.slot).await,
        Some(pid),
        "{}",
        fx.run_log()
    );
    let log = fx.run_log();
    assert!(log.contains("delivery recovered"), "{log}");
    assert!(
        !log.contains("pipeline failed"),
        "no session was restarted\n{log}"
    );
    support::sigterm(&run);
    let status = faults::wait_exit(&mut run, Duration::from_secs(30)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", fx.run_log());
}
