//! A 429 with `Retry-After`, a hang past the client's `timeout`, a 500 and a connection closed
//! without an answer are each retried for the batch: the pause after the 429 is at least what
//! the server asked for (although the backoff is 50 ms), the events arrive once, and only the
//! requests that failed were sent again.

use crate::support;
use crate::support::http::{self, Fault, Receiver};

use std::collections::HashMap;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn retry_after_is_honoured_and_a_hang_past_the_timeout_is_retried() {
    let rx = Receiver::start().await;
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    let key = http::secret_file(&fx, "write_key", "wk_throttle");
    http::use_http_destination(
        &fx,
        &format!(
            "url = \"{}\"\nwrite_key_file = {key}\ntimeout = \"1s\"\n[destination.retry]\ninitial_backoff = \"50ms\"\nmax_backoff = \"100ms\"",
            rx.url()
        ),
    );
    fx.run_once();
    let c = fx.db.connect().await;
    c.batch_execute(
        "INSERT INTO users (user_id, plan) SELECT 'h' || g, 'free' FROM generate_series(1, 5) g",
    )
    .await
    .unwrap();
    rx.fail_next([
        Fault::TooManyRequests(2),
        Fault::Hang(Duration::from_secs(5)),
    ]);
    fx.run_once();
    c.batch_execute(
        "INSERT INTO users (user_id, plan) SELECT 'k' || g, 'free' FROM generate_series(1, 5) g",
    )
    .await
    .unwrap();
    rx.fail_next([Fault::Status(500), Fault::Close]);
    fx.run_once();

    let posts = rx.posts();
    let statuses: Vec<u16> = posts.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [429, 0, 200, 500, 0, 200], "{statuses:?}");
    let waited = posts[1].at - posts[0].at;
    assert!(
        waited >= Duration::from_secs(2),
        "retried {waited:?} after a 429 with Retry-After: 2"
    );
    let want: Vec<String> = (1..=5)
        .map(|g| format!("h{g}"))
        .chain((1..=5).map(|g| format!("k{g}")))
        .collect();
    assert_eq!(rx.delivered_users(), want);
    // Each retry carried the same events and messageIds.
    let ids = |r: &http::Recorded| -> Vec<String> {
        r.events()
            .iter()
            .map(|e| e["messageId"].as_str().expect("messageId").to_owned())
            .collect()
    };
    assert_eq!(ids(&posts[0]), ids(&posts[2]));
    assert_eq!(ids(&posts[1]), ids(&posts[2]));
    assert_eq!(ids(&posts[3]), ids(&posts[5]));
    let mut seen: HashMap<String, usize> = HashMap::new();
    for id in posts.iter().filter(|r| r.accepted()).flat_map(ids) {
        *seen.entry(id).or_default() += 1;
    }
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
}
