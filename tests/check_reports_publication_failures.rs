//! The publication: missing, without the table, with a row filter or column list that differs
//! from the config, without the actions the sync mode needs, or with other tables (a warning).
//! Where a fix is SQL, running exactly the printed SQL makes `check` pass.

use crate::support;

use support::{CheckOutput, TestDb};

struct Pipeline {
    db: TestDb,
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
    publication: String,
}

/// `users (id bigint PRIMARY KEY, user_id bigint, plan int)`, setup.sql for `role` (with the
/// publication's row filter `filter`), then `after_setup` as the superuser; `extra` is appended
/// to the config.
async fn pipeline(role: &str, filter: Option<&str>, after_setup: &str, extra: &str) -> Pipeline {
    let db = support::database().await;
    let admin = db.connect().await;
    admin
        .batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, user_id bigint, plan int)")
        .await
        .unwrap();
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
    admin
        .batch_execute(&after_setup.replace("$PUB", &publication))
        .await
        .unwrap();
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
        publication,
    }
}

fn single_failure(out: &CheckOutput, expected: &str) -> Vec<String> {
    assert_eq!(out.code, 3, "{}", out.dump());
    assert_eq!(out.failures(), vec![expected.to_owned()], "{}", out.dump());
    out.fixes_under(expected)
}

/// Runs the printed SQL lines as the superuser; `check` then passes.
async fn apply_fix_and_recheck(p: &Pipeline, fixes: &[String]) -> CheckOutput {
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
    out
}

#[tokio::test]
async fn check_fails_when_publication_is_missing() {
    let p = pipeline("rudder_nopub", None, "DROP PUBLICATION $PUB", "").await;
    let out = support::run_check(&p.config);
    let fixes = single_failure(&out, "publication \"pub_rudder_nopub\" does not exist");
    assert_eq!(
        fixes[0],
        "CREATE PUBLICATION \"pub_rudder_nopub\" FOR TABLE \"public\".\"users\";"
    );
    assert!(
        fixes[1].starts_with("→ run it as the table's owner"),
        "{fixes:?}"
    );
    apply_fix_and_recheck(&p, &fixes).await;
}

#[tokio::test]
async fn check_fails_when_publication_lacks_the_table() {
    let p = pipeline(
        "rudder_pubnotable",
        None,
        "CREATE TABLE orders (id int PRIMARY KEY);
         ALTER PUBLICATION $PUB DROP TABLE users;
         ALTER PUBLICATION $PUB ADD TABLE orders;",
        "",
    )
    .await;
    let out = support::run_check(&p.config);
    let fixes = single_failure(
        &out,
        "publication \"pub_rudder_pubnotable\" does not publish table \"public\".\"users\"",
    );
    assert_eq!(
        fixes,
        vec![
            "ALTER PUBLICATION \"pub_rudder_pubnotable\" ADD TABLE \"public\".\"users\";"
                .to_owned()
        ]
    );
    let after = apply_fix_and_recheck(&p, &fixes).await;
    assert!(
        after.with_mark('!').iter().any(|w| w.starts_with(
            "publication \"pub_rudder_pubnotable\" also publishes 1 other table (\"public\".\"orders\")"
        )),
        "{}",
        after.dump()
    );
}

#[tokio::test]
async fn check_warns_when_publication_has_other_tables() {
    let p = pipeline(
        "rudder_puball",
        None,
        "CREATE TABLE orders (id int PRIMARY KEY); CREATE TABLE carts (id int PRIMARY KEY);
         ALTER PUBLICATION $PUB ADD TABLE orders, carts;",
        "",
    )
    .await;
    let out = support::run_check(&p.config);
    assert_eq!(out.code, 0, "{}", out.dump());
    assert_eq!(
        out.with_mark('!'),
        vec![format!(
            "publication \"{}\" also publishes 2 other tables (\"public\".\"carts\", \"public\".\"orders\"): slotstream ignores them, but the server still decodes their changes for this slot",
            p.publication
        )],
        "{}",
        out.dump()
    );
    assert!(
        out.summary().ends_with(", 0 failed, 1 warning"),
        "{}",
        out.dump()
    );
}

#[tokio::test]
async fn check_fails_when_publication_filter_differs_from_config() {
    let p = pipeline(
        "rudder_filterdiff",
        Some("id > 10"),
        "",
        "[mapping]\nfilter = \"id > 5\"\n",
    )
    .await;
    let out = support::run_check(&p.config);
    let fixes = single_failure(
        &out,
        "publication \"pub_rudder_filterdiff\" filters \"public\".\"users\" by (id > 10), but [mapping] filter is (id > 5)",
    );
    assert_eq!(
        fixes,
        vec![
            "ALTER PUBLICATION \"pub_rudder_filterdiff\" SET TABLE \"public\".\"users\" WHERE (id > 5);"
                .to_owned(),
            "→ or set filter = \"(id > 10)\" under [mapping] to match the publication".to_owned(),
        ]
    );
    let after = apply_fix_and_recheck(&p, &fixes).await;
    assert!(
        after.with_mark('✓').iter().any(|t| t
            == "publication \"pub_rudder_filterdiff\" filters rows by (id > 5), the same condition as [mapping] filter"),
        "{}",
        after.dump()
    );
}

#[tokio::test]
async fn check_fails_when_config_filter_is_not_published() {
    let p = pipeline(
        "rudder_filternopub",
        None,
        "",
        "[mapping]\nfilter = \"plan IS NOT NULL AND id > 0\"\n",
    )
    .await;
    let out = support::run_check(&p.config);
    assert_eq!(out.code, 3, "{}", out.dump());
    let failures = out.failures();
    assert_eq!(
        failures[0],
        "[mapping] filter is plan IS NOT NULL AND id > 0, but publication \"pub_rudder_filternopub\" publishes every row of \"public\".\"users\"",
        "{}",
        out.dump()
    );
    assert_eq!(
        out.fixes_under("publishes every row"),
        vec![
            "ALTER PUBLICATION \"pub_rudder_filternopub\" SET TABLE \"public\".\"users\" WHERE (plan IS NOT NULL AND id > 0);"
                .to_owned()
        ]
    );
    // The filter reads plan, which is not in the replica identity (the primary key id): the
    // server would reject updates once the filter is published. Said on its own line.
    assert_eq!(
        failures.get(1).map(String::as_str),
        Some(
            "the row filter reads \"plan\", which the replica identity of \"public\".\"users\" lacks, so the server rejects every UPDATE and DELETE of the table"
        ),
        "{}",
        out.dump()
    );
    assert_eq!(failures.len(), 2, "{}", out.dump());
}

#[tokio::test]
async fn check_fails_when_config_filter_is_invalid() {
    let p = pipeline(
        "rudder_badfilter",
        Some("id > 10"),
        "",
        "[mapping]\nfilter = \"no_such_column > 1\"\n",
    )
    .await;
    let out = support::run_check(&p.config);
    let fixes = single_failure(
        &out,
        "[mapping] filter is not a valid condition on table \"public\".\"users\": column \"no_such_column\" does not exist",
    );
    assert_eq!(fixes.len(), 1, "{fixes:?}");
    // Nothing was left behind by the probe: the role owns no table.
    let owned: i64 =
        p.db.connect()
            .await
            .query_one(
                "SELECT count(*) FROM pg_class WHERE relowner = 'rudder_badfilter'::regrole",
                &[],
            )
            .await
            .unwrap()
            .get(0);
    assert_eq!(owned, 0);
}

#[tokio::test]
async fn check_fails_when_mirror_mode_publication_skips_deletes() {
    let p = pipeline(
        "rudder_nodelete",
        None,
        "ALTER PUBLICATION $PUB SET (publish = 'insert, update');
         ALTER TABLE users REPLICA IDENTITY FULL;",
        "[sync]\nmode = \"mirror\"\n",
    )
    .await;
    let out = support::run_check(&p.config);
    let fixes = single_failure(
        &out,
        "publication \"pub_rudder_nodelete\" publishes insert, update, but mirror mode needs delete too",
    );
    assert_eq!(
        fixes,
        vec![
            "ALTER PUBLICATION \"pub_rudder_nodelete\" SET (publish = 'insert, update, delete');"
                .to_owned()
        ]
    );
    apply_fix_and_recheck(&p, &fixes).await;
}

#[tokio::test]
async fn check_fails_when_publication_column_list_leaves_out_selected_columns() {
    let p = pipeline(
        "rudder_collist",
        None,
        "ALTER PUBLICATION $PUB SET TABLE users (id, user_id);",
        "[mapping]\ncolumns = [\"user_id\", \"plan\"]\n",
    )
    .await;
    let out = support::run_check(&p.config);
    let fixes = single_failure(
        &out,
        "publication \"pub_rudder_collist\" publishes only the columns \"id\", \"user_id\" of \"public\".\"users\" and leaves out \"plan\", which the mapping reads",
    );
    assert_eq!(
        fixes,
        vec!["ALTER PUBLICATION \"pub_rudder_collist\" SET TABLE \"public\".\"users\";".to_owned()]
    );
    apply_fix_and_recheck(&p, &fixes).await;
}

#[tokio::test]
async fn check_compares_filters_as_text_when_role_cannot_create_temporary_tables() {
    let p = pipeline(
        "rudder_notemp",
        Some("id > 10"),
        "",
        "[mapping]\nfilter = \"id>10\"\n",
    )
    .await;
    let admin = p.db.connect().await;
    admin
        .batch_execute(&format!(
            "REVOKE TEMPORARY ON DATABASE {} FROM PUBLIC",
            p.db.name
        ))
        .await
        .unwrap();
    let out = support::run_check(&p.config);
    assert_eq!(out.code, 0, "{}", out.dump());
    assert!(
        out.with_mark('✓').iter().any(|t| t.starts_with(
            "publication \"pub_rudder_notemp\" filters rows by (id > 10), which reads as [mapping] filter (compared as text"
        )),
        "{}",
        out.dump()
    );

    // A filter that differs is still caught, with the grant that enables the exact comparison.
    let text = std::fs::read_to_string(&p.config)
        .unwrap()
        .replace("id>10", "id > 11");
    std::fs::write(&p.config, text).unwrap();
    let out = support::run_check(&p.config);
    assert_eq!(out.code, 3, "{}", out.dump());
    assert_eq!(
        out.failures(),
        vec![
            "publication \"pub_rudder_notemp\" filters \"public\".\"users\" by (id > 10), but [mapping] filter is id > 11"
                .to_owned()
        ],
        "{}",
        out.dump()
    );
    let warnings = out.with_mark('!');
    let temp = warnings
        .iter()
        .find(|w| w.starts_with("the row filters were compared as text"))
        .unwrap_or_else(|| panic!("{}", out.dump()));
    // Without the probe the filter's columns are unknown: said, not silently passed.
    assert!(
        warnings.iter().any(|w| w.starts_with(
            "the row filter's columns could not be compared with the replica identity"
        )),
        "{}",
        out.dump()
    );
    assert_eq!(
        out.fixes_under(temp),
        vec![format!(
            "GRANT TEMPORARY ON DATABASE \"{}\" TO \"rudder_notemp\";",
            p.db.name
        )]
    );
}
