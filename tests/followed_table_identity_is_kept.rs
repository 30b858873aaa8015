//! The followed table's identity is part of the pipeline's state (its OID): a different table
//! under the config's name (dropped and created again), or another table named in the config,
//! gets a full sync instead of a stream that silently misses its rows; the same table under a
//! new name keeps streaming, and the config is told the new name; an identifier column renamed
//! under a running pipeline stops it with the config key to change, and the way forward needs
//! no teardown.

use std::time::Duration;

use serde_json::Value;

use crate::support::{self, Fixture, USERS_TABLE, faults, users_fixture};

fn ops(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["context"]["sources"]["op"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
                e["userId"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn rewrite_config(fx: &Fixture, from: &str, to: &str) {
    let text = std::fs::read_to_string(&fx.config).unwrap();
    assert!(text.contains(from), "config has {from:?}:\n{text}");
    std::fs::write(&fx.config, text.replacen(from, to, 1)).unwrap();
}

/// A pipeline over `users` holding one row, running, its full sync delivered.
async fn streaming_one_row(insert: &str) -> (Fixture, tokio_postgres::Client, faults::Running) {
    let fx = users_fixture(USERS_TABLE, "", None).await;
    let c = fx.db.connect().await;
    c.batch_execute(insert).await.unwrap();
    let child = faults::Running(fx.spawn_run());
    support::wait_until(Duration::from_secs(30), "the full sync", || async {
        fx.events().len() == 1
    })
    .await;
    (fx, c, child)
}

/// Rows written into a table before it joins the publication are in no stream: only a full
/// sync can deliver them.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_dropped_and_created_again_gets_a_full_sync() {
    let fx = users_fixture(USERS_TABLE, "", None).await;
    let c = fx.db.connect().await;
    c.batch_execute("INSERT INTO users (user_id) VALUES ('u_1'), ('u_2')")
        .await
        .unwrap();
    fx.run_once();
    assert_eq!(fx.events().len(), 2);

    c.batch_execute(&format!(
        "DROP TABLE users;
         {USERS_TABLE};
         INSERT INTO users (user_id) VALUES ('n_1'), ('n_2'), ('n_3');
         GRANT SELECT ON users TO {role};
         ALTER PUBLICATION {publication} ADD TABLE users;",
        role = fx.role,
        publication = fx.slot,
    ))
    .await
    .unwrap();
    let (code, _, err) = fx.slotstream("run", &["--once"]);
    assert_eq!(code, 0, "{err}");
    let new: Vec<(String, String)> = ops(&fx.events()).split_off(2);
    let mut ids: Vec<&str> = new.iter().map(|(_, id)| id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["n_1", "n_2", "n_3"], "the new table's rows: {new:?}");
    assert!(new.iter().all(|(op, _)| op == "snapshot"), "{new:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn naming_another_table_in_the_config_gets_a_full_sync_of_it() {
    let fx = users_fixture(USERS_TABLE, "", None).await;
    let c = fx.db.connect().await;
    c.batch_execute("INSERT INTO users (user_id) VALUES ('u_1')")
        .await
        .unwrap();
    fx.run_once();
    c.batch_execute(&format!(
        "CREATE TABLE customers (id bigserial PRIMARY KEY, user_id text);
         INSERT INTO customers (user_id) VALUES ('c_1'), ('c_2');
         GRANT SELECT ON customers TO {role};
         ALTER PUBLICATION {publication} ADD TABLE customers;",
        role = fx.role,
        publication = fx.slot,
    ))
    .await
    .unwrap();
    rewrite_config(&fx, "table = \"users\"", "table = \"customers\"");
    fx.run_once();
    let new = ops(&fx.events()).split_off(1);
    assert_eq!(
        new,
        [
            ("snapshot".to_owned(), "c_1".to_owned()),
            ("snapshot".to_owned(), "c_2".to_owned())
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renamed_table_keeps_streaming_and_the_config_follows_without_a_full_sync() {
    let (fx, c, mut child) = streaming_one_row("INSERT INTO users (user_id) VALUES ('u_1')").await;
    c.batch_execute(
        "ALTER TABLE users RENAME TO customers;
         INSERT INTO customers (user_id) VALUES ('u_2');",
    )
    .await
    .unwrap();
    support::wait_until(
        Duration::from_secs(30),
        "the insert after the rename",
        || async { fx.events().len() == 2 },
    )
    .await;
    support::sigterm(&child.0);
    let status = faults::wait_exit(&mut child.0, Duration::from_secs(20)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", fx.run_log());

    // Written while slotstream is stopped.
    c.batch_execute("INSERT INTO customers (user_id) VALUES ('u_3')")
        .await
        .unwrap();
    let (code, _, err) = fx.slotstream("run", &["--once"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("is now \"public\".\"customers\""), "{err}");
    assert!(err.contains("table = \"customers\""), "{err}");

    rewrite_config(&fx, "table = \"users\"", "table = \"customers\"");
    fx.run_once();
    assert_eq!(
        ops(&fx.events()),
        [
            ("snapshot".to_owned(), "u_1".to_owned()),
            ("insert".to_owned(), "u_2".to_owned()),
            ("insert".to_owned(), "u_3".to_owned()),
        ],
        "no second full sync"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renamed_identifier_column_stops_the_pipeline_with_the_key_to_change() {
    let (fx, c, mut child) =
        streaming_one_row("INSERT INTO users (user_id, email) VALUES ('u_1', 'a@example.com')")
            .await;
    // With the default identifiers, the email alone would still identify the row: without
    // the check, the event would silently become anonymous.
    c.batch_execute(
        "ALTER TABLE users RENAME COLUMN user_id TO uid;
         INSERT INTO users (uid, email) VALUES ('u_2', 'b@example.com');",
    )
    .await
    .unwrap();
    let status = faults::wait_exit(&mut child.0, Duration::from_secs(30)).await;
    let log = fx.run_log();
    assert_eq!(status.and_then(|s| s.code()), Some(3), "{log}\n---");
    assert!(log.contains("renamed to \"uid\""), "{log}");
    assert!(
        log.contains("[mapping.identifiers] user_id = \"uid\""),
        "{log}"
    );
    assert_eq!(fx.events().len(), 1, "nothing in the new shape was sent");

    let text = std::fs::read_to_string(&fx.config).unwrap();
    std::fs::write(
        &fx.config,
        text.replacen(
            "[destination]",
            "[mapping.identifiers]\nuser_id = \"uid\"\n\n[destination]",
            1,
        ),
    )
    .unwrap();
    fx.run_once();
    let events = fx.events();
    let u2: Vec<&Value> = events
        .iter()
        .filter(|e| e["traits"]["uid"] == "u_2")
        .collect();
    assert!(!u2.is_empty(), "the row written after the rename arrives");
    assert!(u2.iter().all(|e| e["userId"] == "u_2"), "{u2:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_identifier_column_renamed_while_stopped_is_caught_at_start() {
    let fx = users_fixture(USERS_TABLE, "", None).await;
    let c = fx.db.connect().await;
    c.batch_execute("INSERT INTO users (user_id, email) VALUES ('u_1', 'a@example.com')")
        .await
        .unwrap();
    fx.run_once();
    c.batch_execute(
        "ALTER TABLE users RENAME COLUMN user_id TO uid;
         INSERT INTO users (uid, email) VALUES ('u_2', 'b@example.com');",
    )
    .await
    .unwrap();
    let (code, _, err) = fx.slotstream("run", &["--once"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("renamed to \"uid\""), "{err}");
    assert!(
        err.contains("[mapping.identifiers] user_id = \"uid\""),
        "{err}"
    );
    assert_eq!(
        fx.events().len(),
        1,
        "nothing was sent under another identity"
    );
}
