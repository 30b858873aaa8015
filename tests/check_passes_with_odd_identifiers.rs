//! Names with quotes, spaces, unicode and reserved words — schema `Odd "Schema"`, table
//! `select`, column `E-mail ✉`, a role and a publication named alike — go through
//! sql/setup.sql and `check` passes, printing every name correctly quoted.

use crate::support;

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

#[tokio::test]
async fn check_passes_with_odd_identifiers() {
    let schema = "Odd \"Schema\"";
    let table = "select";
    let role = "rudder odd \"q\" ✉";
    let publication = "pub \"odd\" ✉";
    let db = support::database().await;
    db.connect()
        .await
        .batch_execute(
            r#"CREATE SCHEMA "Odd ""Schema""";
               CREATE TABLE "Odd ""Schema"""."select" (id bigint PRIMARY KEY, "E-mail ✉" varchar(200), "Plan" int);
               ALTER TABLE "Odd ""Schema"""."select" REPLICA IDENTITY FULL;"#,
        )
        .await
        .unwrap();
    support::apply_setup_sql(
        &db,
        &[
            ("schema", schema),
            ("table", table),
            ("user", role),
            ("password", "pw ' \" ✉"),
            ("publication", publication),
            ("filter", "\"Plan\" > 0"),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("odd.toml");
    std::fs::write(
        &config,
        format!(
            r#"name = "odd"

[source]
host = "127.0.0.1"
port = {port}
database = "{db}"
user = {user}
password = {password}
sslmode = "disable"
schema = {schema}
table = {table}
publication = {publication}

[mapping]
columns = [{email}, "Plan"]
filter = {filter}

[mapping.identifiers]
email = {email}

[sync]
mode = "mirror"

[destination]
type = "stdout"
"#,
            port = db.cluster.port,
            db = db.name,
            user = toml_str(role),
            password = toml_str("pw ' \" ✉"),
            schema = toml_str(schema),
            table = toml_str(table),
            publication = toml_str(publication),
            email = toml_str("E-mail ✉"),
            filter = toml_str("\"Plan\">0"),
        ),
    )
    .unwrap();

    let out = support::run_check(&config);
    assert_eq!(out.code, 0, "{}", out.dump());
    let marked = out.marked();
    assert!(
        marked.iter().all(|(m, _)| *m == '✓'),
        "every line must pass:\n{}",
        out.dump()
    );
    for expected in [
        r#"role "rudder odd ""q"" ✉" has the REPLICATION attribute"#,
        r#"role "rudder odd ""q"" ✉" may use schema "Odd ""Schema""""#,
        r#"role "rudder odd ""q"" ✉" may read table "Odd ""Schema"""."select""#,
        r#"table "Odd ""Schema"""."select" has identifier columns: email from "E-mail ✉""#,
        r#"publication "pub ""odd"" ✉" publishes table "Odd ""Schema"""."select""#,
        r#"publication "pub ""odd"" ✉" filters rows by ("Plan" > 0), the same condition as [mapping] filter"#,
        r#"mirror mode names the user of a deleted row from the sent-state ledger by its key ("id"), so the replica identity of "Odd ""Schema"""."select" (FULL: every column) is enough"#,
    ] {
        assert!(
            marked.iter().any(|(_, t)| t == expected),
            "missing {expected:?}:\n{}",
            out.dump()
        );
    }
}
