//! `type = "http"`, `format = "rudderstack"`, end to end from PostgreSQL changes to the requests
//! a real HTTP server received: `POST /v1/batch`, Basic auth with the write key as the user and
//! an empty password, `Content-Type: application/json`, `User-Agent: slotstream/<version>`,
//! bodies `{"batch":[…],"sentAt":…}` of at most `max_request_bytes`, every event once and in
//! commit order, an identify's traits also in `context.traits`; an event over `max_event_bytes`
//! is a dead letter with its size and the limit. With `gzip = true` the bodies are gzip
//! (`Content-Encoding: gzip`) and decode to the same shape.

use crate::support;
use crate::support::http::{self, Receiver};

use std::collections::HashSet;

const WRITE_KEY: &str = "wk_2aFtest1234";

fn assert_rudderstack_request(r: &http::Recorded, max_request_bytes: usize) {
    assert_eq!(r.path, "/v1/batch");
    assert_eq!(
        r.header("authorization"),
        Some(format!("Basic {}", http::base64(format!("{WRITE_KEY}:").as_bytes())).as_str())
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.header("user-agent"),
        Some(format!("slotstream/{}", env!("CARGO_PKG_VERSION")).as_str())
    );
    assert!(
        r.body.len() <= max_request_bytes,
        "a request of {} bytes",
        r.body.len()
    );
    let body = r.json();
    let keys: Vec<&String> = body.as_object().expect("object").keys().collect();
    assert_eq!(keys, ["batch", "sentAt"], "{body}");
    assert!(body["sentAt"].is_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn rudderstack_requests_are_authenticated_split_at_both_limits_and_in_order() {
    let rx = Receiver::start().await;
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    let key = http::secret_file(&fx, "write_key", WRITE_KEY);
    http::use_http_destination(
        &fx,
        &format!(
            "url = \"{}/\"\nwrite_key_file = {key}\nmax_request_bytes = 4096\nmax_event_bytes = 1500",
            rx.url()
        ),
    );
    // The full sync of the empty table, then a stream in commit order.
    fx.run_once();
    let c = fx.db.connect().await;
    c.batch_execute(
        "INSERT INTO users (user_id, email, name, plan)
           SELECT 'u' || g, 'u' || g || '@example.com', 'Name ' || g, 'free'
             FROM generate_series(1, 40) g;
         INSERT INTO users (user_id, name, plan) VALUES ('big', repeat('x', 3000), 'free');
         UPDATE users SET plan = 'pro' WHERE user_id = 'u1';",
    )
    .await
    .unwrap();
    fx.run_once();

    let posts = rx.posts();
    assert!(
        posts.len() >= 4,
        "41 events of ~500 bytes in requests of at most 4096 bytes: {} requests",
        posts.len()
    );
    for r in &posts {
        assert_rudderstack_request(r, 4096);
        assert!(r.accepted());
    }
    let events = rx.delivered();
    let users: Vec<&str> = events
        .iter()
        .map(|e| e["userId"].as_str().expect("userId"))
        .collect();
    let mut want: Vec<String> = (1..=40).map(|g| format!("u{g}")).collect();
    want.push("u1".into());
    assert_eq!(users, want, "every event once, in commit order");
    let ids: HashSet<&str> = events
        .iter()
        .map(|e| e["messageId"].as_str().expect("messageId"))
        .collect();
    assert_eq!(ids.len(), events.len(), "duplicate messageIds");
    for e in &events {
        assert_eq!(e["type"], "identify");
        assert_eq!(e["context"]["traits"], e["traits"], "{e}");
        assert_eq!(e["context"]["library"]["name"], "slotstream");
        assert!(e["sentAt"].is_string() && e["originalTimestamp"].is_string());
    }
    assert_eq!(events[40]["traits"]["plan"], "pro");
    assert_eq!(events[40]["context"]["traits"]["plan"], "pro");

    let dead = http::dead_letters(&fx).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, "big");
    assert!(
        dead[0].1.contains("max_event_bytes") && dead[0].1.contains("1500"),
        "{}",
        dead[0].1
    );
    assert!(
        !String::from_utf8_lossy(
            &posts
                .iter()
                .flat_map(|r| r.body.clone())
                .collect::<Vec<u8>>()
        )
        .contains("\"big\""),
        "the oversized event was sent"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn gzip_bodies_carry_the_same_batches() {
    let rx = Receiver::start().await;
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    let key = http::secret_file(&fx, "write_key", WRITE_KEY);
    http::use_http_destination(
        &fx,
        &format!(
            "url = \"{}\"\nwrite_key_file = {key}\ngzip = true",
            rx.url()
        ),
    );
    let c = fx.db.connect().await;
    c.batch_execute(
        "INSERT INTO users (user_id, plan) SELECT 'g' || g, 'free' FROM generate_series(1, 50) g",
    )
    .await
    .unwrap();
    fx.run_once();
    let posts = rx.posts();
    assert!(!posts.is_empty());
    for r in &posts {
        assert_rudderstack_request(r, 4000 * 1024);
        assert_eq!(r.header("content-encoding"), Some("gzip"));
        assert!(
            r.wire_len < r.body.len(),
            "{} bytes on the wire for {} of JSON",
            r.wire_len,
            r.body.len()
        );
    }
    let mut users = rx.delivered_users();
    users.sort();
    let mut want: Vec<String> = (1..=50).map(|g| format!("g{g}")).collect();
    want.sort();
    assert_eq!(users, want);
}
