//! An endpoint that answers 413 to bodies over a size gets the request again in halves, until
//! each part fits: every event arrives once, in commit order. An event that is refused with 413
//! even alone is a dead letter.

use crate::support;
use crate::support::http::{self, Receiver};

#[tokio::test(flavor = "multi_thread")]
async fn a_413_splits_the_request_until_it_fits_and_a_lone_oversized_event_is_dead_lettered() {
    let rx = Receiver::start().await;
    // About three events per request.
    rx.limit_body(1500);
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    let key = http::secret_file(&fx, "write_key", "wk_split");
    http::use_http_destination(
        &fx,
        &format!("url = \"{}\"\nwrite_key_file = {key}", rx.url()),
    );
    fx.run_once();
    let c = fx.db.connect().await;
    c.batch_execute(
        "INSERT INTO users (user_id, plan) SELECT 's' || g, 'free' FROM generate_series(1, 10) g;
         INSERT INTO users (user_id, name, plan) VALUES ('wide', repeat('y', 2000), 'free');
         INSERT INTO users (user_id, plan) SELECT 't' || g, 'free' FROM generate_series(1, 10) g;",
    )
    .await
    .unwrap();
    fx.run_once();

    let posts = rx.posts();
    assert!(posts.iter().any(|r| r.status == 413), "no 413 was answered");
    assert!(posts.iter().filter(|r| r.accepted()).count() >= 7);
    let want: Vec<String> = (1..=10)
        .map(|g| format!("s{g}"))
        .chain((1..=10).map(|g| format!("t{g}")))
        .collect();
    assert_eq!(rx.delivered_users(), want, "every event once, in order");
    let dead = http::dead_letters(&fx).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, "wide");
    assert!(dead[0].1.starts_with("HTTP 413: "), "{}", dead[0].1);
}
