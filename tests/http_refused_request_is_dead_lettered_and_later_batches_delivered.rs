//! An HTTP endpoint that answers 400 to one request refuses its events for good: they go to
//! `_rudderstack.cdc_dead_letters` with `HTTP 400: <the answer's body>`, the run goes on, the
//! later batches are delivered and the checkpoint moves past them.

use crate::support;
use crate::support::http::{self, Receiver};

#[tokio::test(flavor = "multi_thread")]
async fn a_400_dead_letters_that_requests_events_and_later_batches_are_delivered() {
    let rx = Receiver::start().await;
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    let key = http::secret_file(&fx, "write_key", "wk_refused");
    http::use_http_destination(
        &fx,
        &format!("url = \"{}\"\nwrite_key_file = {key}", rx.url()),
    );
    let c = fx.db.connect().await;
    c.batch_execute("INSERT INTO users (user_id, plan) VALUES ('r1', 'free')")
        .await
        .unwrap();
    fx.run_once();
    // The request holding r2 (and r3, committed with it) is refused once.
    rx.refuse_containing("\"r2\"", 400, 1);
    c.batch_execute("INSERT INTO users (user_id, plan) VALUES ('r2', 'free'), ('r3', 'free')")
        .await
        .unwrap();
    fx.run_once();
    c.batch_execute("INSERT INTO users (user_id, plan) VALUES ('r4', 'free')")
        .await
        .unwrap();
    fx.run_once();

    assert_eq!(rx.delivered_users(), ["r1", "r4"]);
    let refused: Vec<_> = rx.posts().into_iter().filter(|r| r.status == 400).collect();
    assert_eq!(refused.len(), 1, "the refused request was not sent again");
    let dead = http::dead_letters(&fx).await;
    let users: Vec<&str> = dead.iter().map(|(u, _)| u.as_str()).collect();
    assert_eq!(users, ["r2", "r3"], "{dead:?}");
    for (_, reason) in &dead {
        assert_eq!(reason, "HTTP 400: test receiver says 400");
    }
    // The checkpoint covers r4's transaction.
    let r4 = rx
        .delivered()
        .iter()
        .find(|e| e["userId"] == "r4")
        .map(support::faults::event_lsn)
        .expect("r4");
    let (checkpoint, _) = fx.positions().await;
    assert!(checkpoint.is_some_and(|p| p > r4), "{checkpoint:?} <= {r4}");
}
