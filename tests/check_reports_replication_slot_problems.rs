//! Replication slots: no free slot (a dedicated cluster with `max_replication_slots = 1`, filled
//! by another slot) fails, while the pipeline's own existing slot counts as available; an
//! existing slot must be a pgoutput logical slot of this database that nobody is using.

use crate::support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{Cluster, TestDb};

async fn prepare(db: &TestDb, role: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    db.connect()
        .await
        .batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, user_id bigint, plan int)")
        .await
        .unwrap();
    let publication = format!("pub_{role}");
    support::apply_setup_sql(
        db,
        &[
            ("schema", "public"),
            ("table", "users"),
            ("user", role),
            ("password", "pw"),
            ("publication", &publication),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let config = db.write_config(
        dir.path(),
        role,
        role,
        "pw",
        "users",
        &format!("publication = \"{publication}\"\nslot = \"slot_{role}\"\n"),
    );
    (dir, config)
}

/// Holds a logical slot active, like another consumer would, until dropped.
struct Consumer(Child);

impl Consumer {
    fn start(cluster: &Cluster, db: &str, slot: &str, publication: &str) -> Consumer {
        let child = Command::new(cluster.bindir.join("pg_recvlogical"))
            .arg("-h")
            .arg(&cluster.socket_dir)
            .args(["-p", &cluster.port.to_string(), "-U", "postgres", "-d", db])
            .args(["--slot", slot, "--start", "-f", "/dev/null", "--no-loop"])
            .args(["-o", "proto_version=1", "-o"])
            .arg(format!("publication_names={publication}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Consumer(child)
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn check_fails_without_free_replication_slot() {
    let cluster = support::cluster_with(&[("max_replication_slots", "1")]);
    let db = cluster.database().await;
    let (_dir, config) = prepare(&db, "rudder_noslot").await;
    db.connect()
        .await
        .batch_execute(
            "SELECT pg_create_logical_replication_slot('someone_elses_slot', 'pgoutput')",
        )
        .await
        .unwrap();
    let out = support::run_check(&config);
    assert_eq!(out.code, 3, "{}", out.dump());
    let expected = "no replication slot is free for \"slot_rudder_noslot\": 1 of max_replication_slots = 1 are in use";
    assert_eq!(out.failures(), vec![expected.to_owned()], "{}", out.dump());
    assert_eq!(
        out.fixes_under(expected),
        vec![
            "ALTER SYSTEM SET max_replication_slots = 2;".to_owned(),
            "→ then restart PostgreSQL: max_replication_slots takes effect only at server start"
                .to_owned(),
            "→ or drop a slot that nothing uses any more (inactive now: someone_elses_slot), e.g.:"
                .to_owned(),
            "SELECT pg_drop_replication_slot('someone_elses_slot');".to_owned(),
        ],
        "{}",
        out.dump()
    );
}

#[tokio::test]
async fn pipeline_own_slot_counts_as_available() {
    let cluster = support::cluster_with(&[("max_replication_slots", "1")]);
    let db = cluster.database().await;
    let (_dir, config) = prepare(&db, "rudder_ownslot").await;
    db.connect()
        .await
        .batch_execute(
            "SELECT pg_create_logical_replication_slot('slot_rudder_ownslot', 'pgoutput')",
        )
        .await
        .unwrap();
    let out = support::run_check(&config);
    assert_eq!(out.code, 0, "{}", out.dump());
    let passed = out.with_mark('✓');
    assert!(
        passed.iter().any(|t| t.starts_with(
            "replication slot \"slot_rudder_ownslot\" already exists, so the pipeline needs no free slot (1 of max_replication_slots = 1 in use)"
        )),
        "{}",
        out.dump()
    );
    assert!(
        passed.iter().any(|t| t
            == "replication slot \"slot_rudder_ownslot\" is a pgoutput logical slot of this database and is not in use"),
        "{}",
        out.dump()
    );
}

#[tokio::test]
async fn check_fails_when_slot_is_in_use() {
    let db = support::database().await;
    let (_dir, config) = prepare(&db, "rudder_busyslot").await;
    let admin = db.connect().await;
    admin
        .batch_execute(
            "SELECT pg_create_logical_replication_slot('slot_rudder_busyslot', 'pgoutput')",
        )
        .await
        .unwrap();
    let _consumer = Consumer::start(
        db.cluster,
        &db.name,
        "slot_rudder_busyslot",
        "pub_rudder_busyslot",
    );
    support::wait_until(
        Duration::from_secs(30),
        "the slot becomes active",
        || async {
            admin
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = 'slot_rudder_busyslot'",
                &[],
            )
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(false)
        },
    )
    .await;
    let pid: i32 = admin
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'slot_rudder_busyslot'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let out = support::run_check(&config);
    assert_eq!(out.code, 3, "{}", out.dump());
    let expected = format!(
        "replication slot \"slot_rudder_busyslot\" is in use by process {pid}, so slotstream cannot stream from it"
    );
    assert_eq!(out.failures(), vec![expected.clone()], "{}", out.dump());
    assert_eq!(
        out.fixes_under(&expected).last().map(String::as_str),
        Some(format!("SELECT pg_terminate_backend({pid});").as_str()),
        "{}",
        out.dump()
    );
}

#[tokio::test]
async fn check_fails_when_slot_uses_another_plugin() {
    let db = support::database().await;
    let (_dir, config) = prepare(&db, "rudder_wrongplugin").await;
    db.connect()
        .await
        .batch_execute(
            "SELECT pg_create_logical_replication_slot('slot_rudder_wrongplugin', 'test_decoding')",
        )
        .await
        .unwrap();
    let out = support::run_check(&config);
    assert_eq!(out.code, 3, "{}", out.dump());
    let expected = "replication slot \"slot_rudder_wrongplugin\" exists but uses the plugin test_decoding, not pgoutput";
    assert_eq!(out.failures(), vec![expected.to_owned()], "{}", out.dump());
    assert_eq!(
        out.fixes_under(expected).last().map(String::as_str),
        Some("SELECT pg_drop_replication_slot('slot_rudder_wrongplugin');"),
        "{}",
        out.dump()
    );
}
