//! The slot dropped behind slotstream's back while its state says the full sync is done: the
//! changes since the checkpoint are gone, so `run` must not silently start over. It exits
//! non-zero naming the slot with the hint to run `slotstream resync`; `resync` then
//! `run --once` recovers with a full sync that carries every row, including those written
//! while the slot was missing.

use crate::support;

use std::collections::BTreeSet;

fn user_ids(events: &[serde_json::Value]) -> BTreeSet<String> {
    events
        .iter()
        .map(|e| e["userId"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn run_names_the_slot_and_resync_recovers() {
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    let c = fx.db.connect().await;
    c.batch_execute(
        "INSERT INTO users (user_id, plan) SELECT 'u' || g, 'free' FROM generate_series(1, 3) g",
    )
    .await
    .unwrap();
    fx.run_once();
    assert_eq!(fx.full_sync_state().await.as_deref(), Some("done"));
    assert_eq!(fx.events().len(), 3);

    c.execute("SELECT pg_drop_replication_slot($1)", &[&fx.slot])
        .await
        .unwrap();
    // Written while the slot is gone: no slot holds these changes.
    c.batch_execute(
        "INSERT INTO users (user_id, plan) VALUES ('u4', 'free');
         UPDATE users SET plan = 'pro' WHERE user_id = 'u1'",
    )
    .await
    .unwrap();

    for args in [&["--once"][..], &[][..]] {
        let (code, stdout, stderr) = fx.slotstream("run", args);
        let dump = format!("run {args:?}: exit {code}\n--- stdout\n{stdout}--- stderr\n{stderr}");
        assert_ne!(code, 0, "{dump}");
        assert_eq!(code, 1, "a missing slot is a runtime failure\n{dump}");
        let error = stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("no `error:` line\n{dump}"));
        assert!(error.contains(&fx.slot), "the error names the slot\n{dump}");
        let hint = stderr
            .lines()
            .find(|l| l.starts_with("hint: "))
            .unwrap_or_else(|| panic!("no `hint:` line\n{dump}"));
        assert!(
            hint.contains("slotstream resync"),
            "the hint says to resync\n{dump}"
        );
        assert!(!stderr.contains("panicked"), "{dump}");
        assert!(!stderr.contains("Caused by"), "no error chain\n{dump}");
    }
    assert_eq!(fx.events().len(), 3, "a failed run sent events");
    let slots: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&fx.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        slots, 0,
        "run must not recreate the slot by itself (that would skip changes)"
    );

    let (code, stdout, stderr) = fx.slotstream("resync", &[]);
    assert_eq!(code, 0, "resync failed\n{stdout}{stderr}");
    fx.run_once();

    let events = fx.events();
    let resent = &events[3..];
    assert!(
        resent
            .iter()
            .all(|e| e["context"]["sources"]["op"] == "snapshot"),
        "the recovery is a full sync: {resent:#?}"
    );
    assert_eq!(
        user_ids(resent),
        ["u1", "u2", "u3", "u4"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        "the full sync carries every row"
    );
    let u1 = resent.iter().find(|e| e["userId"] == "u1").unwrap();
    assert_eq!(
        u1["traits"]["plan"], "pro",
        "the full sync carries the current values"
    );
    assert_eq!(fx.full_sync_state().await.as_deref(), Some("done"));

    // And the pipeline streams again from the new slot.
    c.batch_execute("INSERT INTO users (user_id, plan) VALUES ('u5', 'free')")
        .await
        .unwrap();
    fx.run_once();
    let events = fx.events();
    let last = events.last().unwrap();
    assert_eq!(events.len(), 3 + 4 + 1, "{events:#?}");
    assert_eq!(last["userId"], "u5");
    assert_eq!(last["context"]["sources"]["op"], "insert");
    let (checkpoint, confirmed) = fx.positions().await;
    assert!(
        confirmed <= checkpoint,
        "slot {confirmed:?} ahead of checkpoint {checkpoint:?}"
    );
}
