//! `slotstream preview` prints the events the full sync then sends (docs/architecture.md §3, "the exact
//! events that would be sent"): for every row, the same messageId, type, userId, anonymousId,
//! traits (trait keys, constants, value types) and source names. Only the position-dependent
//! parts may differ (`context.sources.lsn`, `originalTimestamp`, `sentAt`). Rows outside the
//! row filter (including a NULL plan, for which the filter is NULL) are in neither, and the row without an identifier is counted, not shown.

use crate::support;

use serde_json::Value;
use support::users_fixture;

const FILTER: &str = "plan <> 'blocked'";

/// The pretty-printed events in preview's output, in order.
fn preview_events(stdout: &str) -> Vec<Value> {
    let start = stdout
        .find("\n{")
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("no event in the preview:\n{stdout}"));
    serde_json::Deserializer::from_str(&stdout[start..])
        .into_iter::<Value>()
        .map_while(Result::ok)
        .take_while(Value::is_object)
        .collect()
}

/// The event without the parts that depend on when and where it was read.
fn comparable(e: &Value) -> Value {
    let mut e = e.clone();
    let o = e.as_object_mut().unwrap();
    o.remove("sentAt");
    o.remove("originalTimestamp");
    e["context"]["sources"]
        .as_object_mut()
        .unwrap()
        .remove("lsn");
    e
}

#[tokio::test]
async fn preview_prints_the_events_the_full_sync_sends() {
    let fx = users_fixture(
        "CREATE TABLE public.users (
            id bigserial PRIMARY KEY, user_id text, email text, name text, plan text,
            score numeric, tags text[], profile jsonb, joined timestamptz)",
        &format!(
            "[mapping]\ncolumns = [\"email\", \"name\", \"plan\", \"score\", \"tags\", \"profile\", \"joined\"]\n\
             constants = {{ source = \"postgres\", version = 2 }}\nfilter = \"{FILTER}\"\n\
             [mapping.trait_keys]\nname = \"fullName\"\njoined = \"createdAt\"\n"
        ),
        Some(FILTER),
    )
    .await;
    fx.db
        .connect()
        .await
        .batch_execute(
            "INSERT INTO users (user_id, email, name, plan, score, tags, profile, joined) VALUES
                ('u_1', 'ann@example.com', 'Ann', 'pro', 12.50, '{a,b}', '{\"x\": [1, 2.0]}',
                 '2024-01-02 03:04:05.678+02'),
                (NULL, 'Bob@Example.com', 'Bob', 'free', NULL, '{}', NULL, NULL),
                ('u_3', NULL, 'Cy', 'blocked', 1, NULL, NULL, NULL),
                (NULL, NULL, 'Nobody', 'free', 2, NULL, NULL, NULL),
                ('u_5', 'e@example.com', 'Eve', 'pro', -0.5, '{\"with space\"}', '[]', 'infinity'),
                ('u_6', 'f@example.com', 'Fay', NULL, 3, NULL, NULL, NULL)",
        )
        .await
        .unwrap();

    let (code, stdout, stderr) = fx.slotstream("preview", &["--limit", "100"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let preview = preview_events(&stdout);
    assert!(
        stdout.contains("3 events; 1 rows without any identifier value"),
        "{stdout}"
    );

    fx.run_once();
    let sent = fx.events();
    assert_eq!(preview.len(), 3, "{stdout}");
    assert_eq!(sent.len(), 3, "{sent:#?}");
    let sent_ids: Vec<&Value> = sent.iter().map(|e| &e["messageId"]).collect();
    for p in &preview {
        let s = sent
            .iter()
            .find(|s| s["messageId"] == p["messageId"])
            .unwrap_or_else(|| {
                panic!(
                    "preview's messageId {} was not sent ({sent_ids:?}):\n{p:#}",
                    p["messageId"]
                )
            });
        assert_eq!(comparable(p), comparable(s));
        assert_eq!(s["context"]["sources"]["op"], "snapshot");
    }
    // `plan <> 'blocked'` is NULL for a NULL plan: u_6 is outside the filter in both.
    assert!(sent.iter().all(|e| e["userId"] != "u_6"), "{sent:#?}");
    // A real comparison: the traits carry the mapping.
    let ann = sent.iter().find(|e| e["userId"] == "u_1").unwrap();
    assert_eq!(ann["traits"]["fullName"], "Ann");
    assert_eq!(ann["traits"]["score"].to_string(), "12.50");
    assert_eq!(ann["traits"]["createdAt"], "2024-01-02T01:04:05.678+00:00");
    assert_eq!(ann["traits"]["version"], 2);
    assert!(
        sent.iter().all(|e| e["traits"]["plan"] != "blocked"),
        "{sent:#?}"
    );
}
