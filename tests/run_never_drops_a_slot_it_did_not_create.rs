//! A slot named like the pipeline's but not created by slotstream for it (a physical slot,
//! another output plugin, another database, another consumer holding it, another pipeline's) is
//! never dropped, recreated or read: `run` stops at once (exit 1, no retry) with a message naming
//! the slot and its owner, and a hint (another `[source] slot`, or drop it yourself); `teardown`
//! leaves it alone too. Only a slot of ours that the server invalidated is created again by a
//! full sync.

use crate::support;
use crate::support::faults;

use std::process::{Command, Stdio};
use std::time::Duration;

/// Drops a cluster-wide slot (a physical one has no database, so `TestDb` does not) when the
/// test ends, pass or fail.
struct DropSlot<'a> {
    cluster: &'a support::Cluster,
    slot: String,
}

impl Drop for DropSlot<'_> {
    fn drop(&mut self) {
        let sql = format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
              WHERE slot_name = '{}' AND NOT active",
            self.slot
        );
        let _ = self
            .cluster
            .psql("postgres")
            .args(["-c", &sql])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `run --once` refuses: exit 1 promptly, naming the slot and `owner`, with the hint, no retry.
fn assert_refused(fx: &support::Fixture, owner: &str) -> String {
    let (code, stdout, stderr) = fx.slotstream("run", &["--once"]);
    let dump = format!("exit {code}\n--- stdout\n{stdout}--- stderr\n{stderr}");
    assert_eq!(code, 1, "{dump}");
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no `error:` line\n{dump}"));
    assert!(error.contains(&fx.slot), "the error names the slot\n{dump}");
    assert!(error.contains(owner), "the error names {owner:?}\n{dump}");
    let hint = stderr
        .lines()
        .find(|l| l.starts_with("hint: "))
        .unwrap_or_else(|| panic!("no `hint:` line\n{dump}"));
    assert!(
        hint.contains("[source] slot") && hint.contains("pg_drop_replication_slot"),
        "the hint offers another slot or dropping it by hand\n{dump}"
    );
    assert!(
        !stderr.contains("resuming from the checkpoint"),
        "a slot that is not ours is not retried\n{dump}"
    );
    dump
}

async fn slot_row(c: &tokio_postgres::Client, slot: &str) -> Option<(String, Option<String>)> {
    c.query_opt(
        "SELECT slot_type, plugin::text FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .unwrap()
    .map(|r| (r.get(0), r.get(1)))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_physical_slot_or_another_plugins_slot_is_left_alone() {
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    let c = fx.db.connect().await;
    c.batch_execute("INSERT INTO users (user_id, plan) VALUES ('u1', 'free')")
        .await
        .unwrap();

    let _guard = DropSlot {
        cluster: fx.db.cluster,
        slot: fx.slot.clone(),
    };
    c.execute(
        "SELECT pg_create_physical_replication_slot($1)",
        &[&fx.slot],
    )
    .await
    .unwrap();
    let dump = assert_refused(&fx, "physical slot");
    assert_eq!(
        slot_row(&c, &fx.slot).await,
        Some(("physical".into(), None)),
        "the physical slot is still there\n{dump}"
    );
    // teardown retires the pipeline's state but leaves that slot alone too.
    let (code, stdout, stderr) = fx.slotstream("teardown", &["--yes"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("alone"), "{stdout}{stderr}");
    assert_eq!(
        slot_row(&c, &fx.slot).await,
        Some(("physical".into(), None)),
        "teardown dropped the physical slot\n{stdout}{stderr}"
    );
    c.execute("SELECT pg_drop_replication_slot($1)", &[&fx.slot])
        .await
        .unwrap();

    c.execute(
        "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
        &[&fx.slot],
    )
    .await
    .unwrap();
    let dump = assert_refused(&fx, "test_decoding");
    assert_eq!(
        slot_row(&c, &fx.slot).await,
        Some(("logical".into(), Some("test_decoding".into()))),
        "the test_decoding slot is still there\n{dump}"
    );
    assert!(fx.events().is_empty(), "nothing was sent\n{dump}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_of_another_database_is_left_alone() {
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    // Its drop removes the slot made in it.
    let other = support::database().await;
    other
        .connect()
        .await
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&fx.slot],
        )
        .await
        .unwrap();
    let dump = assert_refused(&fx, &format!("belongs to database {:?}", other.name));
    let c = fx.db.connect().await;
    let database: Option<String> = c
        .query_opt(
            "SELECT database::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&fx.slot],
        )
        .await
        .unwrap()
        .and_then(|r| r.get(0));
    assert_eq!(
        database.as_deref(),
        Some(other.name.as_str()),
        "the other database's slot is still there\n{dump}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_held_by_another_consumer_is_neither_read_nor_dropped() {
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    let c = fx.db.connect().await;
    c.batch_execute("INSERT INTO users (user_id, plan) VALUES ('u1', 'free')")
        .await
        .unwrap();
    fx.run_once();
    assert_eq!(fx.events().len(), 1);

    // Another consumer (pg_recvlogical) streams from the pipeline's slot.
    let cluster = fx.db.cluster;
    let mut recv = Command::new(cluster.bindir.join("pg_recvlogical"));
    recv.arg("-h")
        .arg(&cluster.socket_dir)
        .args(["-p", &cluster.port.to_string(), "-U", "postgres"])
        .args(["-d", &fx.db.name, "--slot", &fx.slot, "--start"])
        .args(["-o", "proto_version=1", "-o"])
        .arg(format!("publication_names={}", fx.slot))
        .args(["-f", "/dev/null"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some((uid, gid)) = cluster.run_as {
        use std::os::unix::process::CommandExt;
        recv.uid(uid).gid(gid);
    }
    let recv = faults::Running(recv.spawn().expect("pg_recvlogical"));
    support::wait_until(Duration::from_secs(20), "pg_recvlogical holds the slot", || {
        let c = &c;
        let slot = fx.slot.clone();
        async move {
            c.query_one(
                "SELECT coalesce(bool_or(active), false) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get(0)
        }
    })
    .await;
    c.batch_execute("INSERT INTO users (user_id, plan) VALUES ('u2', 'free')")
        .await
        .unwrap();

    // Streaming: the slot is not read.
    assert_refused(&fx, "pg_recvlogical");
    // A full sync: the slot is not dropped either.
    let (code, out, err) = fx.slotstream("resync", &[]);
    assert_eq!(code, 0, "{out}{err}");
    let dump = assert_refused(&fx, "pg_recvlogical");
    assert_eq!(fx.events().len(), 1, "nothing more was sent\n{dump}");
    drop(recv);

    // Once the other consumer is gone, the pipeline goes on.
    support::wait_until(Duration::from_secs(20), "the slot is released", || {
        let c = &c;
        let slot = fx.slot.clone();
        async move {
            !c.query_one(
                "SELECT coalesce(bool_or(active), false) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
        }
    })
    .await;
    fx.run_once();
    let users: Vec<_> = fx.events()[1..]
        .iter()
        .map(|e| e["userId"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        users.contains(&"u2".to_owned()),
        "the full sync ran: {users:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn another_pipelines_slot_is_left_alone() {
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    let c = fx.db.connect().await;
    c.batch_execute("INSERT INTO users (user_id, plan) VALUES ('u1', 'free')")
        .await
        .unwrap();
    fx.run_once();
    c.batch_execute("INSERT INTO users (user_id, plan) VALUES ('u2', 'free')")
        .await
        .unwrap();

    // A second pipeline configured with the first one's slot.
    let events = fx.dir.path().join("other.jsonl");
    let extra = format!(
        "slot = \"{slot}\"\npublication = \"{slot}\"\n\n[destination]\ntype = \"file\"\npath = \"{}\"\n",
        events.display(),
        slot = fx.slot
    );
    let config = fx.db.write_config(
        fx.dir.path(),
        &format!("{}_b", fx.name),
        &fx.role,
        "pw",
        "users",
        &extra,
    );
    let path = config.display().to_string();
    let (code, stdout, stderr) =
        support::run_slotstream(&["run", "--config", path.as_str(), "--once"]);
    let dump = format!("exit {code}\n--- stdout\n{stdout}--- stderr\n{stderr}");
    assert_eq!(code, 1, "{dump}");
    assert!(
        stderr.contains(&format!("pipeline {:?}", fx.name)),
        "the error names the pipeline that owns the slot\n{dump}"
    );
    assert!(support::read_events(&events).is_empty(), "{dump}");

    // The first pipeline did not lose its change to the second.
    fx.run_once();
    let last = fx.events().last().cloned().unwrap();
    assert_eq!(last["userId"], "u2", "{dump}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_of_ours_that_lost_its_wal_is_created_again_by_a_full_sync() {
    let cluster = support::cluster_with(&[("max_slot_wal_keep_size", "1MB")]);
    let fx = support::users_fixture_in(&cluster, support::USERS_TABLE, "", None).await;
    let c = fx.db.connect().await;
    c.batch_execute("INSERT INTO users (user_id, plan) VALUES ('u1', 'free')")
        .await
        .unwrap();
    fx.run_once();

    // Past max_slot_wal_keep_size: the server removes WAL the idle slot still needs.
    c.batch_execute("CREATE TABLE filler (x int)")
        .await
        .unwrap();
    for _ in 0..4 {
        c.batch_execute("INSERT INTO filler VALUES (1); SELECT pg_switch_wal()")
            .await
            .unwrap();
    }
    c.batch_execute("CHECKPOINT").await.unwrap();
    let status: Option<String> = c
        .query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
            &[&fx.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status.as_deref(), Some("lost"), "{}", cluster.log());

    let (code, out, err) = fx.slotstream("resync", &[]);
    assert_eq!(code, 0, "{out}{err}");
    fx.run_once();
    let events = fx.events();
    assert_eq!(events.len(), 2, "{events:#?}");
    assert_eq!(events[1]["context"]["sources"]["op"], "snapshot");
    let status: Option<String> = c
        .query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
            &[&fx.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(
        status.as_deref(),
        Some("lost"),
        "the slot was created again"
    );
}
