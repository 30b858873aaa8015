//! `check` and `run` verify the Kafka topic before anything is read: a topic that does not
//! exist (and `create_topic` is off) is one failed check line with its fix (exit 3), and `run`
//! stops with the same reason and hint instead of streaming into nowhere; with
//! `create_topic = true` the same config creates it and passes.

use crate::support;
use crate::support::kafka;

fn config(fx: &support::Fixture, topic: &str, create: bool) -> std::path::PathBuf {
    fx.rewrite_config(&format!(
            "[destination]\ntype = \"kafka\"\nbrokers = \"{}\"\ntopic = \"{topic}\"\ncreate_topic = {create}\n",
            kafka::broker().address()
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_topic_fails_check_and_run_with_the_fix() {
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    let path = config(&fx, "users_not_created", false);
    let out = support::run_check(&path);
    assert_eq!(out.code, 3, "{}", out.dump());
    let failures = out.failures();
    assert_eq!(failures.len(), 1, "{}", out.dump());
    assert!(
        failures[0].contains("users_not_created") && failures[0].contains("does not exist"),
        "{}",
        out.dump()
    );
    assert!(
        !out.fixes_under("does not exist").is_empty()
            && out.fixes_under("does not exist")[0].contains("create_topic = true"),
        "{}",
        out.dump()
    );

    let (code, _, stderr) = fx.slotstream("run", &["--once"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("error: delivery failed: kafka checking topic"),
        "{stderr}"
    );
    assert!(stderr.contains("hint: create the topic"), "{stderr}");
    assert_eq!(
        fx.full_sync_state().await,
        None,
        "nothing was read: {stderr}"
    );

    let path = config(&fx, "users_not_created", true);
    let out = support::run_check(&path);
    assert_eq!(out.code, 0, "{}", out.dump());
    assert!(
        out.stdout
            .contains("Kafka topic \"users_not_created\" created"),
        "{}",
        out.dump()
    );
}
