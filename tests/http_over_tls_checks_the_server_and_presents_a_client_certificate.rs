//! The HTTP destination over TLS, against a real HTTPS receiver (rustls, certificates made by
//! openssl) that requires a client certificate. With `ca_file` naming the receiver's CA and
//! `client_cert_file`/`client_key_file`, `check` passes and the events arrive. Without
//! `ca_file` (the built-in webpki roots) the receiver's certificate is not trusted, and
//! without the client certificate the receiver refuses the handshake: `check` fails (exit 3)
//! on the destination's line and `run --once` stops (exit 1) without delivering anything.

use crate::support;
use crate::support::certs::{make_ca, make_client_cert, make_server_cert};
use crate::support::http::{self, Receiver};

fn destination(
    rx: &Receiver,
    key: &str,
    certs: &std::path::Path,
    ca: bool,
    client: bool,
) -> String {
    let file = |name: &str| format!("{:?}", certs.join(name).display().to_string());
    let mut keys = format!(
        "url = \"{}\"\nwrite_key_file = {key}\ntimeout = \"5s\"\n",
        rx.url()
    );
    if ca {
        keys.push_str(&format!("ca_file = {}\n", file("http-ca.crt")));
    }
    if client {
        keys.push_str(&format!(
            "client_cert_file = {}\nclient_key_file = {}\n",
            file("slotstream-client.crt"),
            file("slotstream-client.key")
        ));
    }
    keys
}

#[tokio::test(flavor = "multi_thread")]
async fn https_needs_the_ca_and_the_client_certificate() {
    let certs = tempfile::tempdir().expect("tempdir");
    let dir = certs.path();
    make_ca(dir, "http-ca");
    make_server_cert(dir, "receiver", "http-ca", "IP:127.0.0.1,DNS:localhost");
    make_ca(dir, "client-ca");
    make_client_cert(dir, "slotstream-client", "client-ca");
    let rx = Receiver::start_tls(
        &dir.join("receiver.crt"),
        &dir.join("receiver.key"),
        Some(&dir.join("client-ca.crt")),
    )
    .await;
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    let c = fx.db.connect().await;
    c.batch_execute(
        "INSERT INTO users (user_id, plan) SELECT 'u' || g, 'free' FROM generate_series(1, 3) g",
    )
    .await
    .unwrap();
    let key = http::secret_file(&fx, "write_key", "wk_tls");

    for (ca, client, what) in [
        (
            false,
            true,
            "the receiver's CA is not among the built-in roots",
        ),
        (true, false, "no client certificate"),
    ] {
        http::use_http_destination(&fx, &destination(&rx, &key, dir, ca, client));
        let out = support::run_check(&fx.config);
        assert_eq!(out.code, 3, "{what}\n{}", out.dump());
        assert!(
            out.failures().iter().any(|f| f.contains("127.0.0.1")),
            "{what}: the destination's line fails\n{}",
            out.dump()
        );
        let (code, _, stderr) = fx.slotstream("run", &["--once"]);
        assert_eq!(code, 1, "{what}\n{stderr}");
        assert!(stderr.contains("error: "), "{stderr}");
        assert!(rx.delivered().is_empty(), "{what}: nothing may arrive");
    }

    http::use_http_destination(&fx, &destination(&rx, &key, dir, true, true));
    let out = support::run_check(&fx.config);
    assert_eq!(out.code, 0, "{}", out.dump());
    fx.run_once();
    let mut users = rx.delivered_users();
    users.sort();
    assert_eq!(users, ["u1", "u2", "u3"]);
    assert!(rx.posts().iter().all(|p| p.path == "/v1/batch"));
}
