//! Mapping problems found against the real table: no identifier column, a configured
//! identifier column that does not exist, a selected column that does not exist. Each names
//! what is missing and lists the columns the table does have.

use crate::support;

use support::CheckOutput;

/// `ddl` creates `users`; setup.sql for `role`; `check` with `mapping` appended to the config.
async fn check_with(role: &str, ddl: &str, mapping: &str) -> CheckOutput {
    let db = support::database().await;
    db.connect().await.batch_execute(ddl).await.unwrap();
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
    let dir = tempfile::tempdir().unwrap();
    let config = db.write_config(
        dir.path(),
        role,
        role,
        "pw",
        "users",
        &format!("publication = \"{publication}\"\n\n{mapping}"),
    );
    support::run_check(&config)
}

#[tokio::test]
async fn check_fails_without_identifier_column() {
    let out = check_with(
        "rudder_noident",
        "CREATE TABLE users (id bigint PRIMARY KEY, nickname text, score int)",
        "",
    )
    .await;
    assert_eq!(out.code, 3, "{}", out.dump());
    assert_eq!(
        out.failures(),
        vec![
            "table \"public\".\"users\" has no identifier column: it needs one of `user_id`, `anonymous_id`, `email`, and its columns are: id, nickname, score"
                .to_owned()
        ],
        "{}",
        out.dump()
    );
    let fixes = out.fixes_under("has no identifier column");
    assert!(
        fixes.len() == 1 && fixes[0].contains("[mapping.identifiers]"),
        "{}",
        out.dump()
    );
}

#[tokio::test]
async fn check_fails_when_configured_identifier_column_is_missing() {
    let out = check_with(
        "rudder_badident",
        "CREATE TABLE users (id bigint PRIMARY KEY, email text, plan int)",
        "[mapping.identifiers]\nuser_id = \"customer_id\"\n",
    )
    .await;
    assert_eq!(out.code, 3, "{}", out.dump());
    assert_eq!(
        out.failures(),
        vec![
            "mapping.identifiers.user_id names column \"customer_id\", which table \"public\".\"users\" does not have (its columns: id, email, plan)"
                .to_owned()
        ],
        "{}",
        out.dump()
    );
    assert_eq!(
        out.fixes_under("names column \"customer_id\""),
        vec!["→ fix the column name under [mapping.identifiers]".to_owned()]
    );
}

#[tokio::test]
async fn check_fails_when_selected_column_is_missing() {
    let out = check_with(
        "rudder_badcol",
        "CREATE TABLE users (id bigint PRIMARY KEY, user_id bigint, plan int)",
        "[mapping]\ncolumns = [\"user_id\", \"nickname\", \"plan\", \"Score\"]\n",
    )
    .await;
    assert_eq!(out.code, 3, "{}", out.dump());
    assert_eq!(
        out.failures(),
        vec![
            "table \"public\".\"users\" has no column \"nickname\", \"Score\" of [mapping] columns; its columns are: id, user_id, plan"
                .to_owned()
        ],
        "{}",
        out.dump()
    );
    assert_eq!(
        out.fixes_under("of [mapping] columns"),
        vec!["→ fix [mapping] columns, or remove the key to send every column".to_owned()]
    );
    // The identifier check still passes on its own line.
    assert!(
        out.with_mark('✓')
            .iter()
            .any(|t| t
                == "table \"public\".\"users\" has identifier columns: userId from \"user_id\""),
        "{}",
        out.dump()
    );
}
