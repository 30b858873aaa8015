//! A full sync after the first one exports its snapshot from a temporary slot, next to the
//! pipeline's own. When the server has no replication slot free for it
//! (`max_replication_slots` reached), slotstream warns and falls back to dropping and creating
//! the pipeline's slot: the full sync still happens, with the new mapping, and the stream goes
//! on after it; only deletes made since the last checkpoint go without a `Record Deleted`
//! event (the warning says so).

use crate::support;

use support::{EventOp, cluster_with, read_light_events, summarize_events, users_fixture_in};

const TABLE: &str = "CREATE TABLE public.users (
    id bigserial PRIMARY KEY, user_id text NOT NULL, email text, name text);
ALTER TABLE public.users REPLICA IDENTITY FULL;
INSERT INTO public.users (user_id, email, name)
SELECT g::text, 'user' || g || '@example.com', 'user ' || g FROM generate_series(1, 50) g";

#[tokio::test]
async fn full_sync_without_a_free_slot_recreates_the_slot() {
    let cluster = cluster_with(&[("max_replication_slots", "1")]);
    let fx = users_fixture_in(&cluster, TABLE, "[sync]\nmode = \"mirror\"\n", None).await;
    let c = fx.db.connect().await;
    fx.run_once();
    assert_eq!(
        summarize_events(&read_light_events(&fx.events)).op(EventOp::Snapshot),
        50
    );

    c.batch_execute("UPDATE users SET name = 'changed' WHERE id = 1")
        .await
        .unwrap();
    let (code, out, err) = fx.slotstream("resync", &[]);
    assert_eq!(code, 0, "{out}{err}");
    let before = read_light_events(&fx.events).len();
    let (code, out, err) = fx.slotstream("run", &["--once"]);
    assert_eq!(code, 0, "run --once failed\nstdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains("no replication slot is free") && err.contains("Record Deleted"),
        "the fallback warns:\n{err}"
    );
    let events = read_light_events(&fx.events).split_off(before);
    let s = summarize_events(&events);
    assert_eq!(s.op(EventOp::Snapshot), 50, "{:?}", s.ops);
    assert!(
        events.iter().any(|e| e
            .traits
            .as_deref()
            .is_some_and(|t| t.contains("\"changed\""))),
        "the full sync reads the table as it is now"
    );
    assert_eq!(fx.full_sync_state().await.as_deref(), Some("done"));

    // The recreated slot carries the stream on.
    c.batch_execute("UPDATE users SET name = 'streamed' WHERE id = 2")
        .await
        .unwrap();
    fx.run_once();
    let events = read_light_events(&fx.events).split_off(before + 50);
    let s = summarize_events(&events);
    assert_eq!(
        (s.op(EventOp::Snapshot), s.op(EventOp::Update)),
        (0, 1),
        "{:?}",
        s.ops
    );
}
