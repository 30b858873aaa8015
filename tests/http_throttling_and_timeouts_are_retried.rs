//! A 429 with `Retry-After`, a hang past the client's `timeout`, a 500 and a connection closed
//! without an answer are each retried for the batch: the pause after the 429 is at least what
//! the server asked for (although the backoff is 50 ms), a retried request carries the same
//! events and messageIds, the requests of the batch already answered 2xx are not sent again,
//! and every event is delivered once.

use crate::support;
use crate::support::http::{self, Fault, Receiver};

use std::collections::HashMap;
use std::time::Duration;

fn ids(r: &http::Recorded) -> Vec<String> {
    r.events()
        .iter()
        .map(|e| e["messageId"].as_str().expect("messageId").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_after_is_honoured_and_failed_requests_alone_are_sent_again() {
    let rx = Receiver::start().await;
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    let key = http::secret_file(&fx, "write_key", "wk_throttle");
    // About four events per request: a batch of five is two requests.
    http::use_http_destination(
        &fx,
        &format!(
            "url = \"{}\"\nwrite_key_file = {key}\ntimeout = \"1s\"\nmax_request_bytes = 2048\nmax_event_bytes = 1024\n[destination.retry]\ninitial_backoff = \"50ms\"\nmax_backoff = \"100ms\"",
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
    let first_batch = rx.posts().len();
    c.batch_execute(
        "INSERT INTO users (user_id, plan) SELECT 'k' || g, 'free' FROM generate_series(1, 5) g",
    )
    .await
    .unwrap();
    // The batch's first request goes through, its second fails twice.
    rx.fail_next([Fault::Pass, Fault::Status(500), Fault::Close]);
    fx.run_once();

    let posts = rx.posts();
    let statuses: Vec<u16> = posts.iter().map(|r| r.status).collect();
    assert_eq!(&statuses[..3], [429, 0, 200], "{statuses:?}");
    let waited = posts[1].at - posts[0].at;
    assert!(
        waited >= Duration::from_secs(2),
        "retried {waited:?} after a 429 with Retry-After: 2"
    );
    assert_eq!(ids(&posts[0]), ids(&posts[2]));
    assert_eq!(ids(&posts[1]), ids(&posts[2]));
    let second = &posts[first_batch..];
    let statuses: Vec<u16> = second.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 500, 0, 200], "{statuses:?}");
    assert_eq!(ids(&second[1]), ids(&second[3]));
    assert_eq!(ids(&second[2]), ids(&second[3]));
    assert!(
        ids(&second[0])
            .iter()
            .all(|id| !ids(&second[3]).contains(id)),
        "a request already answered 200 was sent again"
    );

    let want: Vec<String> = (1..=5)
        .map(|g| format!("h{g}"))
        .chain((1..=5).map(|g| format!("k{g}")))
        .collect();
    assert_eq!(rx.delivered_users(), want);
    let mut seen: HashMap<String, usize> = HashMap::new();
    for id in posts.iter().filter(|r| r.accepted()).flat_map(ids) {
        *seen.entry(id).or_default() += 1;
    }
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
}
