//! pgoutput does not send stored generated columns (before PostgreSQL 18; on 18 only when the
//! publication publishes them), so the full sync must not send them either: full-sync events
//! and stream events of a table with a `GENERATED ALWAYS AS (…) STORED` column carry the same
//! trait keys, `check` warns that the column is left out, and a mapping that needs the column
//! (`[mapping] columns`, an identifier) is refused by `check` (with a fix) and by `run` (exit 3,
//! nothing touched). On PostgreSQL 18 with `publish_generated_columns = stored` the column is
//! sent by both (see `core_on_postgres_18`).

use std::collections::BTreeSet;

use crate::support;

use serde_json::Value;
use support::{Cluster, Fixture, run_check};

/// `name_upper` and `user_key` are generated from `name` and `id`.
pub const TABLE: &str = "CREATE TABLE public.users (
    id bigserial PRIMARY KEY, user_id text, name text, plan text,
    name_upper text GENERATED ALWAYS AS (upper(name)) STORED,
    user_key text GENERATED ALWAYS AS ('k' || id::text) STORED)";

/// The trait keys of an event.
fn keys(event: &Value) -> BTreeSet<String> {
    event["traits"]
        .as_object()
        .unwrap_or_else(|| panic!("no traits in {event:#}"))
        .keys()
        .cloned()
        .collect()
}

/// A full sync of two rows, then inserts and an update streamed: every event's trait keys are
/// `expected`, in the full sync and in the stream alike. Returns the fixture.
pub async fn full_sync_and_stream_send_the_same_traits(
    cluster: &'static Cluster,
    publish_stored: bool,
    expected: &[&str],
) -> Fixture {
    let fx = support::users_fixture_at(cluster, TABLE, "", None).await;
    let c = fx.db.connect().await;
    if publish_stored {
        c.batch_execute(&format!(
            "ALTER PUBLICATION \"{}\" SET (publish_generated_columns = stored)",
            fx.slot
        ))
        .await
        .unwrap();
    }
    c.batch_execute(
        "INSERT INTO users (user_id, name, plan) VALUES ('u_1', 'Ann', 'pro'), ('u_2', 'Bob', NULL)",
    )
    .await
    .unwrap();
    fx.run_once();
    c.batch_execute(
        "INSERT INTO users (user_id, name, plan) VALUES ('u_3', 'Cy', 'free');
         UPDATE users SET name = 'Annie' WHERE user_id = 'u_1';",
    )
    .await
    .unwrap();
    fx.run_once();

    let events = fx.events();
    let ops: Vec<&str> = events
        .iter()
        .map(|e| e["context"]["sources"]["op"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(
        ops,
        ["snapshot", "snapshot", "insert", "update"],
        "{events:#?}"
    );
    let expected: BTreeSet<String> = expected.iter().map(|k| k.to_string()).collect();
    for event in &events {
        assert_eq!(
            keys(event),
            expected,
            "{} event of {} carries other trait keys than expected (full sync and stream must agree)",
            event["context"]["sources"]["op"],
            event["userId"]
        );
    }
    fx
}

#[tokio::test(flavor = "multi_thread")]
async fn generated_columns_are_left_out_of_full_sync_and_stream_alike() {
    let fx = full_sync_and_stream_send_the_same_traits(
        support::cluster(),
        false,
        &["id", "user_id", "name", "plan"],
    )
    .await;
    let out = run_check(&fx.config);
    assert_eq!(out.code, 0, "{}", out.dump());
    let warning = out
        .with_mark('!')
        .into_iter()
        .find(|w| w.contains("generated"))
        .unwrap_or_else(|| panic!("no warning about the generated columns\n{}", out.dump()));
    assert!(
        warning.contains("\"name_upper\", \"user_key\"") && warning.contains("left out"),
        "the warning names the generated columns\n{}",
        out.dump()
    );
}

/// `check` fails naming the column with a fix, and `run` exits 3 without creating the slot or
/// sending anything.
pub fn mapping_that_needs_a_generated_column_is_refused(fx: &Fixture) {
    let out = run_check(&fx.config);
    assert_eq!(out.code, 3, "{}", out.dump());
    let failure = out
        .failures()
        .into_iter()
        .find(|f| f.contains("generated"))
        .unwrap_or_else(|| panic!("no failed check about the generated column\n{}", out.dump()));
    assert!(failure.contains("\"name_upper\""), "{}", out.dump());
    assert!(
        !out.fixes_under("generated column").is_empty(),
        "a fix under the failure\n{}",
        out.dump()
    );
    for args in [&["--once"][..], &[][..]] {
        let (code, stdout, stderr) = fx.slotstream("run", args);
        let dump = format!("run {args:?}: exit {code}\n--- stdout\n{stdout}--- stderr\n{stderr}");
        assert_eq!(code, 3, "{dump}");
        let error = stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("no `error:` line\n{dump}"));
        assert!(
            error.contains("name_upper") && error.contains("generated"),
            "{dump}"
        );
        assert!(stderr.lines().any(|l| l.starts_with("hint: ")), "{dump}");
    }
    assert!(fx.events().is_empty(), "a refused run sent events");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mapping_that_needs_a_generated_column_is_refused() {
    for extra in [
        "[mapping]\ncolumns = [\"name\", \"name_upper\"]\n",
        "[mapping.identifiers]\nuser_id = \"name_upper\"\n",
    ] {
        let fx = support::users_fixture(TABLE, extra, None).await;
        fx.db
            .connect()
            .await
            .batch_execute("INSERT INTO users (user_id, name) VALUES ('u_1', 'Ann')")
            .await
            .unwrap();
        mapping_that_needs_a_generated_column_is_refused(&fx);
        let slots: i64 = fx
            .db
            .connect()
            .await
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                &[&fx.slot],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(slots, 0, "{extra}: a refused run must not create the slot");
    }
}
