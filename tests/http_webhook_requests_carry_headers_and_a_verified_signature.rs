//! `type = "http"`, `format = "webhook"`: `POST <url>` with a JSON array of the events as the
//! other destinations write them, the custom headers (one from the environment), and the
//! `X-Slotstream-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">` header, which the
//! test server verifies with the shared secret.

use crate::support;
use crate::support::http::{self, Receiver};

const HMAC_SECRET: &str = "hm4c-shared-secret";
const TOKEN: &str = "Bearer hook-token-42";

#[tokio::test(flavor = "multi_thread")]
async fn webhook_requests_are_json_arrays_with_headers_and_a_valid_signature() {
    let rx = Receiver::start().await;
    rx.verify_signatures("X-Slotstream-Signature", HMAC_SECRET);
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    let secret = http::secret_file(&fx, "hmac", HMAC_SECRET);
    http::use_http_destination(
        &fx,
        &format!(
            "url = \"{}/hooks/users?source=pg\"\nformat = \"webhook\"\nhmac_secret_file = {secret}\n[destination.headers]\nX-Team = \"growth\"\nAuthorization = {{ env = \"SLOTSTREAM_TEST_HOOK_TOKEN\" }}",
            rx.url()
        ),
    );
    let c = fx.db.connect().await;
    c.batch_execute(
        "INSERT INTO users (user_id, email, plan) VALUES ('w1', 'w1@example.com', 'free'), ('w2', NULL, 'pro')",
    )
    .await
    .unwrap();
    let (code, out, err) =
        fx.slotstream_with_env("run", &["--once"], &[("SLOTSTREAM_TEST_HOOK_TOKEN", TOKEN)]);
    assert_eq!(code, 0, "{out}{err}");

    let posts = rx.posts();
    assert!(!posts.is_empty());
    for r in &posts {
        assert_eq!(r.path, "/hooks/users?source=pg");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("x-team"), Some("growth"));
        assert_eq!(r.header("authorization"), Some(TOKEN));
        assert_eq!(
            r.signature_ok,
            Some(true),
            "signature {:?}",
            r.header("x-slotstream-signature")
        );
        assert!(r.json().is_array(), "a webhook body is a JSON array");
        // Tampering with the body breaks the signature.
        let mut tampered = r.clone();
        tampered.body.push(b' ');
        assert!(!http::signature_matches(HMAC_SECRET, &tampered));
    }
    let events = rx.delivered();
    let mut users: Vec<&str> = events.iter().filter_map(|e| e["userId"].as_str()).collect();
    users.sort();
    assert_eq!(users, ["w1", "w2"]);
    for e in &events {
        // The event as the other destinations write it: no context.traits.
        assert!(e["context"].get("traits").is_none(), "{e}");
        assert!(e["traits"].is_object());
        assert!(e["messageId"].is_string() && e["sentAt"].is_string());
    }
}
