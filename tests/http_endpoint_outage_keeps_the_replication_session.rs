//! The HTTP endpoint fails for 60 s in the middle of a stream (every request answered 503 or
//! its connection closed without an answer) and comes back. The deliverer retries the batch
//! while the replication session stays up: the slot keeps one walsender (the same pid in
//! `pg_stat_replication`) for the whole outage although the server's `wal_sender_timeout` is
//! 10 s, the checkpoint does not move meanwhile, and once the endpoint is back every change
//! committed during the outage arrives, by itself, with no messageId delivered twice.

use crate::support;
use crate::support::faults;
use crate::support::http::{self, Fault, Receiver};

use std::collections::HashMap;
use std::time::{Duration, Instant};

const OUTAGE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn a_60s_endpoint_outage_is_ridden_out_on_one_replication_connection() {
    let rx = Receiver::start().await;
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    let key = http::secret_file(&fx, "write_key", "wk_outage");
    http::use_http_destination(
        &fx,
        &format!(
            "url = \"{}\"\nwrite_key_file = {key}\ntimeout = \"2s\"\n[destination.retry]\ninitial_backoff = \"200ms\"\nmax_backoff = \"2s\"",
            rx.url()
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
    support::wait_until(Duration::from_secs(30), "40 events delivered", || async {
        rx.delivered().len() >= 40
    })
    .await;
    let before = rx
        .delivered()
        .iter()
        .map(faults::event_lsn)
        .max()
        .expect("events");
    support::wait_until(
        Duration::from_secs(30),
        "the checkpoint covers the first rows",
        || async { fx.positions().await.0.is_some_and(|p| p > before) },
    )
    .await;
    let (checkpoint, _) = fx.positions().await;

    // The outage: changes committed meanwhile cannot be delivered.
    rx.start_outage(vec![Fault::Status(503), Fault::Close]);
    let started = Instant::now();
    for t in 0..5 {
        c.batch_execute(&format!(
            "INSERT INTO users (user_id, plan) SELECT 'c{t}_' || g, 'free' FROM generate_series(1, 10) g"
        ))
        .await
        .unwrap();
    }
    while started.elapsed() < OUTAGE {
        assert_eq!(
            fx.positions().await.0,
            checkpoint,
            "the checkpoint moved while the endpoint was down\n{}",
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
    let failed = rx.posts().iter().filter(|r| !r.accepted()).count();
    assert!(
        failed >= 5,
        "only {failed} failed requests during the outage"
    );
    assert!(
        fx.run_log().contains("retrying the batch"),
        "{}",
        fx.run_log()
    );

    rx.end_outage();
    support::wait_until(Duration::from_secs(30), "90 events delivered", || async {
        rx.delivered().len() >= 90
    })
    .await;
    let delivered = rx.delivered();
    let mut users: Vec<String> = delivered
        .iter()
        .filter_map(|e| e["userId"].as_str().map(str::to_owned))
        .collect();
    users.sort();
    let mut want: Vec<String> = (1..=20)
        .flat_map(|g| [format!("a{g}"), format!("b{g}")])
        .chain((0..5).flat_map(|t| (1..=10).map(move |g| format!("c{t}_{g}"))))
        .collect();
    want.sort();
    assert_eq!(users, want, "lost or extra events\n{}", fx.run_log());
    let mut ids: HashMap<&str, usize> = HashMap::new();
    for e in &delivered {
        *ids.entry(e["messageId"].as_str().expect("messageId"))
            .or_default() += 1;
    }
    assert!(
        ids.values().all(|n| *n == 1),
        "a messageId was delivered twice"
    );
    let during = delivered
        .iter()
        .map(faults::event_lsn)
        .max()
        .expect("events");
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
