//! Through the whole stream path (pgoutput text cells → decode → traits → file), the traits of
//! a row equal `to_jsonb(row)` computed by PostgreSQL (docs/architecture.md §7) for a handful of types
//! that are easy to get wrong: numeric at full precision and NaN, floats, timestamptz and
//! infinity, timestamp, date, jsonb and json, arrays (nested, with NULLs, empty), bool, bytea.
//! The same holds for the full sync's rows (COPY text). The complete type matrix is tested
//! against `decode::value` directly; this is the compact end-to-end differential check.

use crate::support;

use serde_json::Value;
use support::users_fixture_at;

const TABLE: &str = "CREATE TABLE public.users (
    id bigserial PRIMARY KEY, user_id text,
    n numeric, n_scaled numeric(12,4), f8 float8, f4 float4, i8 int8,
    tstz timestamptz, ts timestamp, d date,
    jb jsonb, js json,
    a_int int4[], a_text text[], a_2d int4[], a_jsonb jsonb[], a_empty int4[],
    b bool, raw bytea)";

const ROW_1: &str = "('u_1',
    123456789012345678901234567890.123456789012345678901234567890, 1.5, 0.1, 1.25, 9007199254740993,
    '2024-02-29 23:59:59.123456+05:30', '1999-12-31 23:59:59.5', '2000-02-29',
    '{\"b\": [1, 2.50, {\"c\": null}], \"a\": \"x\\\"y\\u00e9\", \"n\": 1e400}', '{\"k\": [true, false]}',
    '{1,NULL,3}', '{\"a b\",NULL,\"c,d\",\"\\\\\",\"NULL\"}', '{{1,2},{3,4}}',
    ARRAY['{\"x\": 1}'::jsonb, 'null'::jsonb], '{}',
    true, '\\x00ff10')";

const ROW_2: &str = "('u_2',
    'NaN', -0.0001, 'Infinity', '-Infinity', -9223372036854775808,
    'infinity', '-infinity', '-infinity',
    '[]', 'null',
    '{}', '{}', '{{NULL}}', '{}', NULL,
    false, '')";

const COLUMNS: &str = "user_id, n, n_scaled, f8, f4, i8, tstz, ts, d, jb, js, a_int, a_text, \
    a_2d, a_jsonb, a_empty, b, raw";

#[tokio::test]
async fn streamed_traits_equal_to_jsonb() {
    streamed_traits_equal_to_jsonb_in(support::cluster()).await;
}

/// The scenario on `cluster` (also run on PostgreSQL 18 by `core_on_postgres_18`).
pub async fn streamed_traits_equal_to_jsonb_in(cluster: &'static support::Cluster) {
    let fx = users_fixture_at(cluster, TABLE, "", None).await;
    let c = fx.db.connect().await;
    c.batch_execute(&format!("INSERT INTO users ({COLUMNS}) VALUES {ROW_1}"))
        .await
        .unwrap();
    // to_jsonb as the replication session and COPY see values: UTC, ISO dates.
    c.batch_execute("SET TimeZone = 'UTC'; SET DateStyle = ISO")
        .await
        .unwrap();
    let to_jsonb = |user_id: &'static str| {
        let c = &c;
        async move {
            c.query_one(
                "SELECT to_jsonb(u) FROM users u WHERE user_id = $1",
                &[&user_id],
            )
            .await
            .unwrap()
            .get::<_, Value>(0)
        }
    };
    let check = |event: &Value, expected: &Value| {
        let traits = event["traits"].as_object().unwrap();
        let expected = expected.as_object().unwrap();
        for (column, want) in expected {
            let got = traits
                .get(column)
                .unwrap_or_else(|| panic!("{column} missing from {event:#}"));
            // Text equality: number spelling (1.50 vs 1.5, exponents) matters, as does key
            // order inside jsonb.
            assert_eq!(
                got.to_string(),
                want.to_string(),
                "column {column} of {}",
                event["userId"]
            );
        }
        assert_eq!(traits.len(), expected.len(), "{event:#}");
    };
    fx.run_once();
    let snapshot_u1 = to_jsonb("u_1").await;
    // Anchors: the comparison below is between real values, not two nulls.
    assert_eq!(
        snapshot_u1["n"].to_string(),
        "123456789012345678901234567890.123456789012345678901234567890"
    );
    assert_eq!(snapshot_u1["tstz"], "2024-02-29T18:29:59.123456+00:00");
    c.batch_execute(&format!(
        "INSERT INTO users ({COLUMNS}) VALUES {ROW_2};
         UPDATE users SET n = n * 3, tstz = tstz + interval '1 day 1 microsecond',
                          jb = jb || '{{\"added\": [1.0]}}', a_int = a_int || 4
          WHERE user_id = 'u_1';"
    ))
    .await
    .unwrap();
    fx.run_once();

    let events = fx.events();
    assert_eq!(events.len(), 3, "{events:#?}");
    let ops: Vec<&Value> = events
        .iter()
        .map(|e| &e["context"]["sources"]["op"])
        .collect();
    assert_eq!(ops, ["snapshot", "insert", "update"]);
    check(&events[1], &to_jsonb("u_2").await);
    check(&events[2], &to_jsonb("u_1").await);

    check(&events[0], &snapshot_u1);
}
