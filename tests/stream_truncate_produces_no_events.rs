//! With `sync.on_truncate = "log"`, a TRUNCATE of the followed table is logged and produces no
//! events, and the running stream goes on: rows inserted after the
//! truncate are delivered, and the checkpoint moves past it. Truncating another table together
//! with it changes nothing.

use crate::support;

use std::time::Duration;

use support::{sigterm, users_fixture, wait_until};

#[tokio::test]
async fn truncate_is_logged_and_the_stream_continues() {
    let fx = users_fixture(
        "CREATE TABLE public.users (id bigserial PRIMARY KEY, user_id text, name text);
         CREATE TABLE public.audit (id bigserial PRIMARY KEY, note text);",
        "[sync]\nmode = \"mirror\"\non_truncate = \"log\"\n",
        None,
    )
    .await;
    let c = fx.db.connect().await;
    c.batch_execute("INSERT INTO users (user_id, name) VALUES ('u_0', 'Zed'), ('u_1', 'Ann')")
        .await
        .unwrap();
    let mut child = fx.spawn_run();
    let user_ids = |fx: &support::Fixture| -> Vec<String> {
        fx.events()
            .iter()
            .map(|e| e["userId"].as_str().unwrap_or("?").to_owned())
            .collect()
    };
    wait_until(
        Duration::from_secs(60),
        "the full sync is delivered",
        || async { fx.events().len() == 2 },
    )
    .await;

    c.batch_execute("INSERT INTO users (user_id, name) VALUES ('u_2', 'Bob')")
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(30),
        "the insert before the truncate",
        || async { fx.events().len() == 3 },
    )
    .await;

    c.batch_execute(
        "INSERT INTO audit (note) VALUES ('about to truncate');
         TRUNCATE users, audit;",
    )
    .await
    .unwrap();
    let truncated: String = c
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    c.batch_execute("INSERT INTO users (user_id, name) VALUES ('u_3', 'Cy')")
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(30),
        "the insert after the truncate",
        || async { fx.events().len() >= 4 },
    )
    .await;
    wait_until(
        Duration::from_secs(30),
        "the truncate is logged",
        || async { fx.run_log().contains("truncated") },
    )
    .await;
    // The checkpoint follows the stream past the truncate.
    wait_until(
        Duration::from_secs(30),
        "the checkpoint passes the truncate",
        || async {
            let (checkpoint, _) = fx.positions().await;
            let past: bool = c
                .query_one(
                    "SELECT ('0/0'::pg_lsn + $1::int8) > $2::text::pg_lsn",
                    &[&(checkpoint.unwrap_or(0) as i64), &truncated],
                )
                .await
                .unwrap()
                .get(0);
            past
        },
    )
    .await;

    sigterm(&child);
    wait_until(Duration::from_secs(30), "slotstream exits", || {
        let done = child.try_wait().unwrap().is_some();
        async move { done }
    })
    .await;
    assert_eq!(child.wait().unwrap().code(), Some(0), "{}", fx.run_log());

    let events = fx.events();
    assert_eq!(user_ids(&fx), ["u_0", "u_1", "u_2", "u_3"], "{events:#?}");
    assert_eq!(events[3]["context"]["sources"]["op"], "insert");
    assert!(
        events.iter().all(|e| e["type"] == "identify"),
        "a truncate is not a delete, even in mirror mode: {events:#?}"
    );
    let log = fx.run_log();
    assert_eq!(
        log.matches("truncated").count(),
        1,
        "logged once, as a warning:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("truncated") && l.contains("WARN")),
        "{log}"
    );
}
