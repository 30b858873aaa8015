//! No secret of an HTTP pipeline (the database password, the write key, the webhook's HMAC
//! secret, a header value read from the environment) appears in anything slotstream prints:
//! `check`, `preview`, `run` (debug logging, with a refused request, a failing one and a
//! retry), `status`, and the error of a request the endpoint refuses for good (401). Neither
//! does the Basic auth header that carries the write key.

use crate::support;
use crate::support::http::{self, Fault, Receiver};

const DB_PASSWORD: &str = "db-Pa55word-q7Zx";
const WRITE_KEY: &str = "wk-S3cret-Key-19Ab";
const HMAC_SECRET: &str = "hmac-S3cret-77Qp";
const TOKEN: &str = "tok-S3cret-Hdr-55";

fn assert_no_secret(what: &str, text: &str) {
    let basic = http::base64(format!("{WRITE_KEY}:").as_bytes());
    for secret in [DB_PASSWORD, WRITE_KEY, HMAC_SECRET, TOKEN, basic.as_str()] {
        assert!(
            !text.contains(secret),
            "{what} shows the secret {secret:?}:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn no_command_prints_a_secret() {
    let rx = Receiver::start().await;
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    let c = fx.db.connect().await;
    c.batch_execute(&format!(
        "ALTER ROLE {} PASSWORD '{DB_PASSWORD}';
         INSERT INTO users (user_id, email, plan) VALUES ('s1', 's1@example.com', 'free');",
        fx.role
    ))
    .await
    .unwrap();
    let rudderstack = format!(
        "[destination]\ntype = \"http\"\nurl = \"{}\"\nwrite_key_env = \"SLOTSTREAM_TEST_WRITE_KEY\"\n[destination.retry]\ninitial_backoff = \"50ms\"\nmax_backoff = \"100ms\"\n",
        rx.url()
    );
    fx.db.write_config(
        fx.dir.path(),
        &fx.name,
        &fx.role,
        DB_PASSWORD,
        "users",
        &rudderstack,
    );
    let env = [
        ("SLOTSTREAM_TEST_WRITE_KEY", WRITE_KEY),
        ("SLOTSTREAM_TEST_HOOK_TOKEN", TOKEN),
        ("RUST_LOG", "debug"),
    ];
    let mut outputs: Vec<(String, String)> = Vec::new();
    let mut run = |what: &str, command: &str, args: &[&str], want: i32| {
        let (code, out, err) = fx.slotstream_with_env(command, args, &env);
        let text = format!("{out}{err}");
        assert_eq!(code, want, "{what}: {text}");
        outputs.push((what.to_owned(), text));
    };

    run("check", "check", &[], 0);
    run("preview", "preview", &[], 0);
    rx.fail_next([Fault::Status(503)]);
    run("run --once (a retry)", "run", &["--once"], 0);
    c.batch_execute("INSERT INTO users (user_id, plan) VALUES ('s2', 'free')")
        .await
        .unwrap();
    rx.fail_next([Fault::Status(400)]);
    run("run --once (a refused request)", "run", &["--once"], 0);
    c.batch_execute("INSERT INTO users (user_id, plan) VALUES ('s3', 'free')")
        .await
        .unwrap();
    rx.fail_next([Fault::Status(401)]);
    run("run --once (bad credentials)", "run", &["--once"], 1);
    run("status", "status", &[], 0);
    run("status --json", "status", &["--json"], 0);

    // The webhook format with a signature and a header from the environment.
    let webhook = format!(
        "[destination]\ntype = \"http\"\nurl = \"{}\"\nformat = \"webhook\"\nhmac_secret_env = \"SLOTSTREAM_TEST_HMAC\"\n[destination.headers]\nAuthorization = {{ env = \"SLOTSTREAM_TEST_HOOK_TOKEN\" }}\n",
        rx.url()
    );
    fx.db.write_config(
        fx.dir.path(),
        &fx.name,
        &fx.role,
        DB_PASSWORD,
        "users",
        &webhook,
    );
    let env = [
        ("SLOTSTREAM_TEST_HMAC", HMAC_SECRET),
        ("SLOTSTREAM_TEST_HOOK_TOKEN", TOKEN),
        ("RUST_LOG", "debug"),
    ];
    rx.fail_next([Fault::Status(500)]);
    let (code, out, err) = fx.slotstream_with_env("run", &["--once"], &env);
    assert_eq!(code, 0, "{out}{err}");
    outputs.push(("webhook run --once".into(), format!("{out}{err}")));

    let all: String = outputs.iter().map(|(_, t)| t.as_str()).collect();
    assert!(
        all.contains("HTTP 401") && all.contains("HTTP 503") && all.contains("hint:"),
        "the failures were reported:\n{all}"
    );
    for (what, text) in &outputs {
        assert_no_secret(what, text);
    }
    // The secrets did reach the endpoint, where they belong.
    let posts = rx.posts();
    assert!(posts.iter().any(|r| {
        r.header("authorization")
            .is_some_and(|a| a.contains(&http::base64(format!("{WRITE_KEY}:").as_bytes())))
    }));
    assert!(
        posts
            .iter()
            .any(|r| r.header("authorization") == Some(TOKEN))
    );
}
