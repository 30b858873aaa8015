//! The replica identity must suit the sync mode: NOTHING (or no primary key) makes the server
//! reject updates of a published table; mirror mode without the ledger needs the identifier
//! columns in it; a row filter needs its columns in it. TOASTable selected columns get a warning, not a failure.

use crate::support;

use support::{CheckOutput, TestDb};

struct Pipeline {
    db: TestDb,
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
}

async fn pipeline(
    role: &str,
    ddl: &str,
    filter: Option<&str>,
    after_setup: &str,
    extra: &str,
) -> Pipeline {
    let db = support::database().await;
    let admin = db.connect().await;
    admin.batch_execute(ddl).await.unwrap();
    let publication = format!("pub_{role}");
    let mut vars = vec![
        ("schema", "public"),
        ("table", "users"),
        ("user", role),
        ("password", "pw"),
        ("publication", publication.as_str()),
    ];
    if let Some(f) = filter {
        vars.push(("filter", f));
    }
    support::apply_setup_sql(&db, &vars);
    admin.batch_execute(after_setup).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = db.write_config(
        dir.path(),
        role,
        role,
        "pw",
        "users",
        &format!("publication = \"{publication}\"\n\n{extra}"),
    );
    Pipeline {
        db,
        _dir: dir,
        config,
    }
}

fn single_failure(out: &CheckOutput, expected: &str) -> Vec<String> {
    assert_eq!(out.code, 3, "{}", out.dump());
    assert_eq!(out.failures(), vec![expected.to_owned()], "{}", out.dump());
    out.fixes_under(expected)
}

/// Runs the printed SQL as the superuser; `check` then passes, and `probe` (an UPDATE/DELETE
/// the server rejected before) now succeeds.
async fn apply_fix_and_recheck(p: &Pipeline, fixes: &[String], probe: &str) {
    let admin = p.db.connect().await;
    let sql: Vec<&str> = fixes
        .iter()
        .filter(|f| !f.starts_with('→'))
        .map(String::as_str)
        .collect();
    admin.batch_execute(&sql.join("\n")).await.unwrap();
    let out = support::run_check(&p.config);
    assert_eq!(out.code, 0, "after the fix:\n{}", out.dump());
    admin.batch_execute(probe).await.unwrap();
}

#[tokio::test]
async fn check_fails_on_replica_identity_nothing() {
    let p = pipeline(
        "rudder_rinothing",
        "CREATE TABLE users (id bigint PRIMARY KEY, user_id bigint, plan int);
         ALTER TABLE users REPLICA IDENTITY NOTHING;
         INSERT INTO users VALUES (1, 1, 1);",
        None,
        "",
        "",
    )
    .await;
    // What the check predicts: the server refuses updates of the published table.
    let err =
        p.db.connect()
            .await
            .batch_execute("UPDATE users SET plan = 2")
            .await
            .expect_err("updates are rejected with REPLICA IDENTITY NOTHING");
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("does not have a replica identity")
    );

    let out = support::run_check(&p.config);
    let fixes = single_failure(
        &out,
        "table \"public\".\"users\" has REPLICA IDENTITY NOTHING, so the server rejects every UPDATE of it once it is published for updates",
    );
    assert_eq!(
        fixes[0],
        "ALTER TABLE \"public\".\"users\" REPLICA IDENTITY FULL;"
    );
    apply_fix_and_recheck(&p, &fixes, "UPDATE users SET plan = 2").await;
}

#[tokio::test]
async fn check_fails_without_primary_key_and_default_identity() {
    let p = pipeline(
        "rudder_nopk",
        "CREATE TABLE users (user_id bigint, plan int)",
        None,
        "",
        "",
    )
    .await;
    let out = support::run_check(&p.config);
    let fixes = single_failure(
        &out,
        "table \"public\".\"users\" has REPLICA IDENTITY DEFAULT but no primary key, so the server rejects every UPDATE of it once it is published for updates",
    );
    apply_fix_and_recheck(&p, &fixes, "UPDATE users SET plan = 2").await;
}

#[tokio::test]
async fn check_fails_in_mirror_mode_when_identifier_is_not_in_replica_identity() {
    let p = pipeline(
        "rudder_mirror",
        "CREATE TABLE users (id bigint PRIMARY KEY, email varchar(200), plan int)",
        None,
        "",
        "[mapping]\ncolumns = [\"plan\"]\n\n[sync]\nmode = \"mirror\"\nledger = false\n",
    )
    .await;
    let out = support::run_check(&p.config);
    let fixes = single_failure(
        &out,
        "mirror mode sends deletes, but the identifier column \"email\" is not in the replica identity of \"public\".\"users\" (DEFAULT: \"id\"), so deleted rows could not be identified",
    );
    assert_eq!(
        fixes,
        vec!["ALTER TABLE \"public\".\"users\" REPLICA IDENTITY FULL;".to_owned()]
    );
    apply_fix_and_recheck(&p, &fixes, "DELETE FROM users").await;
}

#[tokio::test]
async fn mirror_mode_with_the_ledger_does_not_need_identifier_in_replica_identity() {
    let p = pipeline(
        "rudder_mirror_ledger",
        "CREATE TABLE users (id bigint PRIMARY KEY, email varchar(200), plan int)",
        None,
        "",
        "[mapping]\ncolumns = [\"plan\"]\n\n[sync]\nmode = \"mirror\"\n",
    )
    .await;
    let out = support::run_check(&p.config);
    assert_eq!(out.code, 0, "{}", out.dump());
    assert!(
        out.with_mark('✓')
            .iter()
            .any(|l| l.contains("from the sent-state ledger by its key (\"id\")")),
        "{}",
        out.dump()
    );
}

#[tokio::test]
async fn upsert_mode_does_not_need_identifier_in_replica_identity() {
    let p = pipeline(
        "rudder_upsert_ri",
        "CREATE TABLE users (id bigint PRIMARY KEY, email varchar(200), plan int)",
        None,
        "",
        "[mapping]\ncolumns = [\"plan\"]\n",
    )
    .await;
    let out = support::run_check(&p.config);
    assert_eq!(out.code, 0, "{}", out.dump());
}

#[tokio::test]
async fn check_fails_when_row_filter_column_is_not_in_replica_identity() {
    let p = pipeline(
        "rudder_filter_ri",
        "CREATE TABLE users (id bigint PRIMARY KEY, user_id bigint, plan int);
         INSERT INTO users VALUES (1, 1, 1);",
        Some("plan > 0"),
        "",
        "[mapping]\nfilter = \"plan > 0\"\n",
    )
    .await;
    let err =
        p.db.connect()
            .await
            .batch_execute("UPDATE users SET plan = 2")
            .await
            .expect_err("the server rejects the update");
    assert!(
        err.as_db_error()
            .unwrap()
            .detail()
            .unwrap_or_default()
            .contains("not part of the replica identity")
    );
    let out = support::run_check(&p.config);
    let fixes = single_failure(
        &out,
        "the row filter reads \"plan\", which the replica identity of \"public\".\"users\" lacks, so the server rejects every UPDATE and DELETE of the table",
    );
    assert_eq!(
        fixes[0],
        "ALTER TABLE \"public\".\"users\" REPLICA IDENTITY FULL;"
    );
    apply_fix_and_recheck(&p, &fixes, "UPDATE users SET plan = 2").await;
}

#[tokio::test]
async fn check_warns_about_toastable_columns_without_full_identity() {
    let p = pipeline(
        "rudder_toast",
        "CREATE TABLE users (id bigint PRIMARY KEY, user_id bigint, bio text, avatar bytea, plan int)",
        None,
        "",
        "",
    )
    .await;
    let out = support::run_check(&p.config);
    assert_eq!(
        out.code,
        0,
        "a warning does not fail the check:\n{}",
        out.dump()
    );
    let warning = "selected columns \"bio\", \"avatar\" of \"public\".\"users\" can be stored out of line (TOAST): an update that leaves such a large value unchanged does not resend it, so that trait is left out of the update event";
    assert_eq!(
        out.with_mark('!'),
        vec![warning.to_owned()],
        "{}",
        out.dump()
    );
    assert_eq!(
        out.fixes_under(warning)[0],
        "ALTER TABLE \"public\".\"users\" REPLICA IDENTITY FULL;"
    );
    assert!(
        out.summary().ends_with(", 0 failed, 1 warning"),
        "{}",
        out.dump()
    );

    // With FULL the warning goes away.
    p.db.connect()
        .await
        .batch_execute("ALTER TABLE users REPLICA IDENTITY FULL")
        .await
        .unwrap();
    let out = support::run_check(&p.config);
    assert_eq!(out.code, 0, "{}", out.dump());
    assert!(out.with_mark('!').is_empty(), "{}", out.dump());
}
