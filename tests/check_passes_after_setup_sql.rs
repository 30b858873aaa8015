//! The setup test: after `sql/setup.sql`, `slotstream check` run as the role it created (with a
//! password, over TCP, with only the rights setup.sql grants) passes every check.

use crate::support;

use support::{TestDb, apply_setup_sql, run_check};

async fn prepare(db: &TestDb, role: &str, ddl: &str, filter: Option<&str>) {
    db.connect().await.batch_execute(ddl).await.unwrap();
    let publication = format!("pub_{role}");
    let mut vars = vec![
        ("schema", "public"),
        ("table", "users"),
        ("user", role),
        ("password", "pw-Ünïcode 'quoted'"),
        ("publication", publication.as_str()),
    ];
    if let Some(f) = filter {
        vars.push(("filter", f));
    }
    apply_setup_sql(db, &vars);
}

#[tokio::test]
async fn check_passes_after_setup_sql() {
    check_passes_after_setup_sql_in(support::database().await).await;
}

/// The scenario in `db` (also run on PostgreSQL 18 by `core_on_postgres_18`).
pub async fn check_passes_after_setup_sql_in(db: TestDb) {
    // Only non-TOASTable columns are selected, so not even the TOAST warning applies.
    prepare(
        &db,
        "rudder_setup_ok",
        "CREATE TABLE users (id bigint PRIMARY KEY, user_id bigint, email text, plan int,
                             created_at timestamptz)",
        None,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = db.write_config(
        dir.path(),
        "setup-ok",
        "rudder_setup_ok",
        "pw-Ünïcode 'quoted'",
        "users",
        "publication = \"pub_rudder_setup_ok\"\n\n[mapping]\ncolumns = [\"user_id\", \"plan\", \"created_at\"]\n",
    );
    let out = run_check(&config);
    println!("{}", out.dump());
    assert_eq!(out.code, 0, "{}", out.dump());
    let marked = out.marked();
    assert!(marked.len() >= 12, "{}", out.dump());
    assert!(
        marked.iter().all(|(m, _)| *m == '✓'),
        "every line must pass:\n{}",
        out.dump()
    );
    for expected in [
        "connected to 127.0.0.1:",
        "wal_level is logical",
        "a replication slot is free for \"slotstream_setup_ok\"",
        "a WAL sender is free",
        "role \"rudder_setup_ok\" has the REPLICATION attribute",
        "role \"rudder_setup_ok\" may use schema \"public\"",
        "role \"rudder_setup_ok\" may read table \"public\".\"users\"",
        "may create and use slotstream's state tables in schema \"_rudderstack\"",
        "has identifier columns: userId from \"user_id\", email from \"email\"",
        "the 3 selected columns exist",
        "publication \"pub_rudder_setup_ok\" publishes table \"public\".\"users\"",
        "publication \"pub_rudder_setup_ok\" publishes insert, update, delete, truncate",
        "has a replica identity (DEFAULT: \"id\")",
    ] {
        assert!(
            marked.iter().any(|(_, t)| t.contains(expected)),
            "missing {expected:?}:\n{}",
            out.dump()
        );
    }
    assert_eq!(
        out.summary(),
        format!("{} checks passed, 0 failed", marked.len()),
        "{}",
        out.dump()
    );
}

#[tokio::test]
async fn check_passes_when_publication_filter_matches_config_after_normalising() {
    let db = support::database().await;
    // plan is varchar: the server stores the filter as ((plan)::text = 'pro'::text), which only
    // the server's own deparser can match with the config's spelling.
    prepare(
        &db,
        "rudder_setup_filter",
        "CREATE TABLE users (id bigint PRIMARY KEY, user_id bigint, plan varchar(20));
         ALTER TABLE users REPLICA IDENTITY FULL;",
        Some("plan = 'pro'"),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = db.write_config(
        dir.path(),
        "setup-filter",
        "rudder_setup_filter",
        "pw-Ünïcode 'quoted'",
        "users",
        "publication = \"pub_rudder_setup_filter\"\n\n[mapping]\nfilter = \"plan='pro'\"\n",
    );
    let out = run_check(&config);
    assert_eq!(out.code, 0, "{}", out.dump());
    assert!(out.failures().is_empty(), "{}", out.dump());
    let passed = out.with_mark('✓');
    assert!(
        passed.iter().any(|t| t.contains(
            "filters rows by ((plan)::text = 'pro'::text), the same condition as [mapping] filter"
        )),
        "{}",
        out.dump()
    );
    assert!(
        passed.iter().any(|t| t.contains(
            "REPLICA IDENTITY FULL of \"public\".\"users\" covers the row filter's columns"
        )),
        "{}",
        out.dump()
    );
}
