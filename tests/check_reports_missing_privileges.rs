//! A right missing from what sql/setup.sql grants is one failed check, with the GRANT/ALTER
//! that restores it printed under it; running exactly that SQL makes `check` pass again.

use crate::support;

use support::{CheckOutput, TestDb};

struct Pipeline {
    db: TestDb,
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
}

/// A table, sql/setup.sql for `role`, then `after_setup` as the superuser.
async fn pipeline(role: &str, after_setup: &str) -> Pipeline {
    let db = support::database().await;
    let admin = db.connect().await;
    admin
        .batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, user_id bigint, plan int)")
        .await
        .unwrap();
    let publication = format!("pub_{role}");
    support::apply_setup_sql(
        &db,
        &[
            ("schema", "public"),
            ("table", "users"),
            ("user", role),
            ("password", "pw"),
            ("publication", &publication),
        ],
    );
    admin.batch_execute(after_setup).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = db.write_config(
        dir.path(),
        role,
        role,
        "pw",
        "users",
        &format!("publication = \"{publication}\"\n"),
    );
    Pipeline {
        db,
        _dir: dir,
        config,
    }
}

/// Exactly one failure, equal to `expected`; returns its fix lines.
fn single_failure(out: &CheckOutput, expected: &str) -> Vec<String> {
    assert_eq!(out.code, 3, "{}", out.dump());
    assert_eq!(out.failures(), vec![expected.to_owned()], "{}", out.dump());
    out.fixes_under(expected)
}

/// Runs the SQL lines of a fix (not the `→` steps) as the superuser, then `check` again.
async fn apply_fix_and_recheck(p: &Pipeline, fixes: &[String]) {
    let sql: Vec<&str> = fixes
        .iter()
        .filter(|f| !f.starts_with('→'))
        .map(String::as_str)
        .collect();
    assert!(!sql.is_empty(), "a fix with SQL: {fixes:?}");
    p.db.connect()
        .await
        .batch_execute(&sql.join("\n"))
        .await
        .unwrap_or_else(|e| panic!("the printed fix must run: {e}\n{sql:?}"));
    let out = support::run_check(&p.config);
    assert_eq!(out.code, 0, "after the fix:\n{}", out.dump());
    assert!(out.failures().is_empty(), "{}", out.dump());
}

#[tokio::test]
async fn check_fails_without_replication_attribute() {
    let p = pipeline("rudder_norepl", "ALTER ROLE rudder_norepl NOREPLICATION").await;
    let out = support::run_check(&p.config);
    let fixes = single_failure(
        &out,
        "role \"rudder_norepl\" lacks the REPLICATION attribute, which opening a replication connection requires",
    );
    assert_eq!(
        fixes,
        vec!["ALTER ROLE \"rudder_norepl\" WITH REPLICATION;".to_owned()]
    );
    apply_fix_and_recheck(&p, &fixes).await;
}

#[tokio::test]
async fn check_fails_without_select_grant() {
    let p = pipeline("rudder_nosel", "REVOKE SELECT ON users FROM rudder_nosel").await;
    let out = support::run_check(&p.config);
    let fixes = single_failure(
        &out,
        "role \"rudder_nosel\" has no SELECT privilege on table \"public\".\"users\", which the full sync needs",
    );
    assert_eq!(
        fixes,
        vec!["GRANT SELECT ON TABLE \"public\".\"users\" TO \"rudder_nosel\";".to_owned()]
    );
    apply_fix_and_recheck(&p, &fixes).await;
}

#[tokio::test]
async fn check_fails_without_rudderstack_schema() {
    let p = pipeline("rudder_nostate", "DROP SCHEMA _rudderstack CASCADE").await;
    let out = support::run_check(&p.config);
    let fixes = single_failure(
        &out,
        "schema \"_rudderstack\" does not exist, and slotstream keeps its checkpoint there",
    );
    assert_eq!(
        fixes,
        vec![
            "CREATE SCHEMA IF NOT EXISTS \"_rudderstack\";".to_owned(),
            "GRANT ALL ON SCHEMA \"_rudderstack\" TO \"rudder_nostate\";".to_owned(),
            "GRANT ALL PRIVILEGES ON ALL TABLES IN SCHEMA \"_rudderstack\" TO \"rudder_nostate\";"
                .to_owned(),
        ]
    );
    apply_fix_and_recheck(&p, &fixes).await;
}

#[tokio::test]
async fn check_fails_without_create_on_rudderstack_schema() {
    let p = pipeline(
        "rudder_nocreate",
        "REVOKE CREATE ON SCHEMA _rudderstack FROM rudder_nocreate",
    )
    .await;
    let out = support::run_check(&p.config);
    let fixes = single_failure(
        &out,
        "role \"rudder_nocreate\" lacks CREATE on schema \"_rudderstack\", so slotstream cannot create its state tables there",
    );
    assert_eq!(
        fixes,
        vec![
            "GRANT ALL ON SCHEMA \"_rudderstack\" TO \"rudder_nocreate\";".to_owned(),
            "GRANT ALL PRIVILEGES ON ALL TABLES IN SCHEMA \"_rudderstack\" TO \"rudder_nocreate\";"
                .to_owned(),
        ]
    );
    apply_fix_and_recheck(&p, &fixes).await;
}

#[tokio::test]
async fn check_fails_when_state_table_and_sequence_are_not_usable() {
    // A state table created by another pipeline's role after setup.sql ran: this role can
    // neither write it nor draw ids from its bigserial sequence.
    let p = pipeline(
        "rudder_nowrite",
        "CREATE TABLE _rudderstack.cdc_sync_runs (id bigserial PRIMARY KEY, pipeline text)",
    )
    .await;
    let out = support::run_check(&p.config);
    let fixes = single_failure(
        &out,
        "role \"rudder_nowrite\" cannot read and write the state tables \"cdc_sync_runs\" or use the sequences \"cdc_sync_runs_id_seq\" in schema \"_rudderstack\"",
    );
    assert_eq!(
        fixes,
        vec![
            "GRANT ALL PRIVILEGES ON ALL TABLES IN SCHEMA \"_rudderstack\" TO \"rudder_nowrite\";"
                .to_owned(),
            "GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA \"_rudderstack\" TO \"rudder_nowrite\";"
                .to_owned(),
        ]
    );
    apply_fix_and_recheck(&p, &fixes).await;
}

#[tokio::test]
async fn check_names_the_missing_table_and_lists_the_schema_tables() {
    let p = pipeline("rudder_notable", "CREATE TABLE orders (id int PRIMARY KEY)").await;
    let text = std::fs::read_to_string(&p.config)
        .unwrap()
        .replace("table = \"users\"", "table = \"userz\"");
    std::fs::write(&p.config, text).unwrap();
    let out = support::run_check(&p.config);
    assert_eq!(out.code, 3, "{}", out.dump());
    let failures = out.failures();
    assert_eq!(
        failures[0],
        "table \"public\".\"userz\" does not exist; the tables in schema \"public\" are: orders, users",
        "{}",
        out.dump()
    );
    assert_eq!(
        out.fixes_under("does not exist"),
        vec!["→ set source.table to the table to stream".to_owned()]
    );
}
