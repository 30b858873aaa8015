//! The must-show: on a server with `wal_level = replica`, for a table without an
//! identifier column, `check` prints exactly two failures, each with its fix (the ALTER SYSTEM
//! line; the table's columns), and exits 3.

use crate::support;

#[tokio::test]
async fn check_reports_wal_level_and_identifier_failures() {
    let cluster = support::cluster_with(&[("wal_level", "replica")]);
    let db = cluster.database().await;
    let admin = db.connect().await;
    let level: String = admin.query_one("SHOW wal_level", &[]).await.unwrap().get(0);
    assert_eq!(
        level, "replica",
        "the dedicated cluster must run with wal_level=replica"
    );
    admin
        .batch_execute("CREATE TABLE accounts (id bigint PRIMARY KEY, full_name text, plan int)")
        .await
        .unwrap();
    support::apply_setup_sql(
        &db,
        &[
            ("schema", "public"),
            ("table", "accounts"),
            ("user", "rudder_walrep"),
            ("password", "pw"),
            ("publication", "pub_walrep"),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let config = db.write_config(
        dir.path(),
        "walrep",
        "rudder_walrep",
        "pw",
        "accounts",
        "publication = \"pub_walrep\"\n",
    );
    let out = support::run_check(&config);
    println!("{}", out.dump());
    assert_eq!(out.code, 3, "{}", out.dump());

    let failures = out.failures();
    assert_eq!(failures.len(), 2, "exactly two failures:\n{}", out.dump());
    assert_eq!(
        failures[0],
        "wal_level is replica, but logical replication needs wal_level = logical",
        "{}",
        out.dump()
    );
    assert_eq!(
        out.fixes_under("wal_level is replica"),
        vec![
            "ALTER SYSTEM SET wal_level = logical;".to_owned(),
            "→ then restart PostgreSQL: wal_level takes effect only at server start".to_owned(),
        ],
        "{}",
        out.dump()
    );
    assert!(
        failures[1].contains("\"public\".\"accounts\" has no identifier column")
            && failures[1].contains("`user_id`, `anonymous_id`, `email`")
            && failures[1].ends_with("its columns are: id, full_name, plan"),
        "{}",
        out.dump()
    );
    let fix = out.fixes_under("has no identifier column");
    assert!(
        fix.len() == 1 && fix[0].contains("[mapping.identifiers]"),
        "{}",
        out.dump()
    );
    assert!(out.summary().contains(", 2 failed"), "{}", out.dump());
    assert!(
        out.stderr.contains("2 of") && out.stderr.contains("preflight checks failed"),
        "{}",
        out.dump()
    );
}
