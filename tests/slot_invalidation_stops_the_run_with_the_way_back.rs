//! The server invalidates the slot underneath a running slotstream: a cluster with a 1 MB
//! `max_slot_wal_keep_size`, the destination down (a Kafka broker stopped) so that the slot
//! cannot move, and WAL written past the limit until a checkpoint marks the slot lost. The
//! run's slot watch sees `wal_status = lost` within its poll interval (the deliverer is still
//! retrying the batch, so nothing else would notice): the run stops by itself, non-zero, with
//! one error line that says the slot was invalidated and the changes are gone, and a hint that
//! names `slotstream resync`. `/readyz` says why meanwhile. `resync` and `run --once` (the
//! broker back) then recover every row, the ones written during the outage included.

use crate::support;
use crate::support::faults::{self, Running};
use crate::support::kafka::{Broker, TopicReader};
use crate::support::prometheus::http_get;

use std::collections::BTreeSet;
use std::time::Duration;

const TOPIC: &str = "users_invalidated";

async fn wal_status(c: &tokio_postgres::Client, slot: &str) -> Option<String> {
    c.query_opt(
        "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .unwrap()
    .and_then(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_lost_underneath_stops_the_run_and_resync_recovers() {
    let cluster =
        support::cluster_with(&[("max_slot_wal_keep_size", "1MB"), ("wal_keep_size", "0")]);
    let broker = Broker::start();
    let fx = support::users_fixture_in(&cluster, support::USERS_TABLE, "", None).await;
    let listen = format!("127.0.0.1:{}", support::free_port());
    let config = fx.rewrite_config(&format!(
            "[metrics]\nlisten = \"{listen}\"\npoll_interval = \"1s\"\n\
             [destination]\ntype = \"kafka\"\nbrokers = \"{}\"\ntopic = \"{TOPIC}\"\ncreate_topic = true\n\
             [destination.librdkafka_options]\n\"message.timeout.ms\" = 2000\n\
             [destination.retry]\nmax_backoff = \"1s\"\n",
            broker.address()
        ),
    );
    assert_eq!(config, fx.config);
    let c = fx.db.connect().await;
    c.batch_execute(
        "INSERT INTO users (user_id, plan) SELECT 'a' || g, 'free' FROM generate_series(1, 10) g",
    )
    .await
    .unwrap();
    let mut run = Running(fx.spawn_run());
    support::wait_until(Duration::from_secs(60), "streaming", || async {
        http_get(&listen, "/readyz").is_some_and(|(s, body)| s == 200 && body.contains("streaming"))
    })
    .await;

    // The destination goes away; changes keep coming and WAL piles up behind the slot.
    broker.stop();
    c.batch_execute(
        "INSERT INTO users (user_id, plan) SELECT 'b' || g, 'free' FROM generate_series(1, 10) g",
    )
    .await
    .unwrap();
    support::wait_until(Duration::from_secs(60), "the slot lost", || async {
        c.batch_execute(
            "CREATE TABLE IF NOT EXISTS filler (x text);
             INSERT INTO filler SELECT repeat('w', 500) FROM generate_series(1, 2000);
             SELECT pg_switch_wal();
             CHECKPOINT;",
        )
        .await
        .unwrap();
        wal_status(&c, &fx.slot).await.as_deref() == Some("lost")
    })
    .await;

    let status = faults::wait_exit(&mut run, Duration::from_secs(60)).await;
    let log = fx.run_log();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "one error line\n{log}");
    assert!(errors[0].contains(&fx.slot), "{log}");
    assert!(
        errors[0].contains("wal_status = lost") && errors[0].contains("gone from the WAL"),
        "the error explains the state\n{log}"
    );
    let hint = log
        .lines()
        .find(|l| l.starts_with("hint: "))
        .unwrap_or_else(|| panic!("no hint\n{log}"));
    assert!(hint.contains("slotstream resync"), "{log}");
    assert!(!log.contains("panicked"), "{log}");

    // The way back: resync, then a run with the destination up.
    let (code, out, err) = fx.slotstream("resync", &[]);
    assert_eq!(code, 0, "{out}{err}");
    broker.resume();
    fx.run_once();
    let mut reader = TopicReader::new(&broker.address(), TOPIC, 1);
    reader.read_until(20, Duration::from_secs(30));
    let got: BTreeSet<String> = reader
        .records
        .iter()
        .filter_map(|r| r.value.as_ref()?["userId"].as_str().map(str::to_owned))
        .collect();
    let want: BTreeSet<String> = (1..=10)
        .flat_map(|g| [format!("a{g}"), format!("b{g}")])
        .collect();
    assert!(
        want.is_subset(&got),
        "missing after resync: {:?}\n{}",
        want.difference(&got).collect::<Vec<_>>(),
        fx.run_log()
    );
    assert_eq!(wal_status(&c, &fx.slot).await.as_deref(), Some("reserved"));
}
