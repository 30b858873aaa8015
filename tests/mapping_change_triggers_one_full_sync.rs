//! A change of the mapping (trait keys, selected columns) makes the next run a full sync, once:
//! its snapshot events carry the new keys, the run after it streams only. `slotstream resync`
//! forces one full sync the same way. Changes made between runs are never lost across these
//! full syncs: in mirror mode a row deleted before the full sync still gets its `Record Deleted`
//! event, so the state rebuilt from all events equals the table after every run.

use crate::support;

use support::{
    EventOp, Fixture, LightEvent, assert_same_state, fold_events, read_light_events,
    summarize_events, table_state, users_fixture,
};

const TABLE: &str = "CREATE TABLE public.users (
    id bigserial PRIMARY KEY, user_id text NOT NULL, email text, name text, plan text);
ALTER TABLE public.users REPLICA IDENTITY FULL";

const ROWS: i64 = 200;

const COLUMNS: &str = "columns = [\"user_id\", \"email\", \"name\", \"plan\"]\n";

/// Runs `slotstream run --once` and returns the events it added.
fn run_once(fx: &Fixture) -> Vec<LightEvent> {
    let before = read_light_events(&fx.events).len();
    fx.run_once();
    read_light_events(&fx.events).split_off(before)
}

/// Replaces the `[mapping]` body of the config.
fn set_mapping(fx: &Fixture, body: &str) {
    let text = std::fs::read_to_string(&fx.config).expect("read config");
    let start = text.find("[mapping]\n").expect("[mapping]") + "[mapping]\n".len();
    let end = text.find("[destination]").expect("[destination]");
    let text = format!("{}{body}\n{}", &text[..start], &text[end..]);
    std::fs::write(&fx.config, text).expect("write config");
}

async fn snapshot_runs(fx: &Fixture) -> i64 {
    fx.db
        .connect()
        .await
        .query_one(
            r#"SELECT count(*) FROM "_rudderstack".cdc_sync_runs
                WHERE pipeline = $1 AND kind = 'snapshot'"#,
            &[&fx.name],
        )
        .await
        .expect("sync runs")
        .get(0)
}

async fn table_rows(c: &tokio_postgres::Client) -> usize {
    c.query_one("SELECT count(*) FROM users", &[])
        .await
        .expect("count")
        .get::<_, i64>(0) as usize
}

/// Asserts that the events rebuild the table under `traits` (trait key, column).
async fn assert_rebuilds_table(fx: &Fixture, c: &tokio_postgres::Client, traits: &[(&str, &str)]) {
    let table = table_state(c, "public.users", "user_id", Some(traits)).await;
    assert_same_state(&fold_events(&read_light_events(&fx.events)), &table);
}

/// Asserts that `events` hold one full sync of every row with exactly the trait keys `keys`.
fn assert_full_sync(events: &[LightEvent], rows: usize, keys: &[&str]) {
    let snapshot: Vec<&LightEvent> = events
        .iter()
        .filter(|e| e.op == EventOp::Snapshot)
        .collect();
    assert_eq!(snapshot.len(), rows, "one snapshot event per row");
    let users: std::collections::HashSet<&str> = snapshot
        .iter()
        .filter_map(|e| e.user_id.as_deref())
        .collect();
    assert_eq!(users.len(), rows, "each row once");
    for e in snapshot {
        let traits: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(e.traits.as_deref().expect("traits")).expect("traits json");
        let mut got: Vec<&str> = traits.keys().map(String::as_str).collect();
        got.sort_unstable();
        let mut want = keys.to_vec();
        want.sort_unstable();
        assert_eq!(got, want, "trait keys of a snapshot event");
    }
}

#[tokio::test]
async fn mapping_change_triggers_one_full_sync() {
    let fx = users_fixture(
        TABLE,
        &format!("[sync]\nmode = \"mirror\"\n\n[mapping]\n{COLUMNS}"),
        None,
    )
    .await;
    let c = fx.db.connect().await;
    c.batch_execute(&format!(
        "INSERT INTO users (id, user_id, email, name, plan)
         SELECT g, g::text, 'user' || g || '@example.com', 'user ' || g, 'free'
           FROM generate_series(1, {ROWS}) g;
         SELECT setval('users_id_seq', {ROWS});"
    ))
    .await
    .expect("load rows");
    let v1: &[(&str, &str)] = &[
        ("user_id", "user_id"),
        ("email", "email"),
        ("name", "name"),
        ("plan", "plan"),
    ];

    // First run: the full sync.
    let first = run_once(&fx);
    assert_full_sync(&first, ROWS as usize, &["user_id", "email", "name", "plan"]);
    assert_eq!(snapshot_runs(&fx).await, 1);
    assert_rebuilds_table(&fx, &c, v1).await;

    // Same mapping: the next run only streams.
    c.batch_execute("UPDATE users SET plan = 'pro' WHERE id = 1")
        .await
        .unwrap();
    let second = run_once(&fx);
    let s = summarize_events(&second);
    assert_eq!(
        (s.op(EventOp::Snapshot), s.op(EventOp::Update)),
        (0, 1),
        "{:?}",
        s.ops
    );
    assert_eq!(snapshot_runs(&fx).await, 1);

    // Changes between runs, then a trait key renamed: one full sync with the new key.
    c.batch_execute(
        "UPDATE users SET name = 'renamed' WHERE id = 2;
         DELETE FROM users WHERE id = 3;
         INSERT INTO users (id, user_id, email, name, plan)
           SELECT i, i::text, 'new@example.com', 'new', 'free'
             FROM (SELECT nextval('users_id_seq') AS i) s;",
    )
    .await
    .unwrap();
    set_mapping(
        &fx,
        &format!("{COLUMNS}\n[mapping.trait_keys]\nname = \"fullName\"\n"),
    );
    let v2: &[(&str, &str)] = &[
        ("user_id", "user_id"),
        ("email", "email"),
        ("fullName", "name"),
        ("plan", "plan"),
    ];
    let third = run_once(&fx);
    assert_full_sync(
        &third,
        table_rows(&c).await,
        &["user_id", "email", "fullName", "plan"],
    );
    assert_eq!(snapshot_runs(&fx).await, 2);
    assert_rebuilds_table(&fx, &c, v2).await;

    // The run after it does not repeat it.
    c.batch_execute("UPDATE users SET name = 'again' WHERE id = 4")
        .await
        .unwrap();
    let fourth = run_once(&fx);
    let s = summarize_events(&fourth);
    assert_eq!(
        (s.op(EventOp::Snapshot), s.op(EventOp::Update)),
        (0, 1),
        "{:?}",
        s.ops
    );
    assert!(
        fourth[0]
            .traits
            .as_deref()
            .is_some_and(|t| t.contains("\"fullName\":\"again\""))
    );
    assert_eq!(snapshot_runs(&fx).await, 2);

    // A column dropped from the selection is a mapping change too.
    c.batch_execute("DELETE FROM users WHERE id = 5")
        .await
        .unwrap();
    set_mapping(
        &fx,
        "columns = [\"user_id\", \"email\", \"name\"]\n\n[mapping.trait_keys]\nname = \"fullName\"\n",
    );
    let v3: &[(&str, &str)] = &[
        ("user_id", "user_id"),
        ("email", "email"),
        ("fullName", "name"),
    ];
    let fifth = run_once(&fx);
    assert_full_sync(
        &fifth,
        table_rows(&c).await,
        &["user_id", "email", "fullName"],
    );
    assert_eq!(snapshot_runs(&fx).await, 3);
    assert_rebuilds_table(&fx, &c, v3).await;
    assert_eq!(summarize_events(&run_once(&fx)).op(EventOp::Snapshot), 0);

    // `slotstream resync` forces one full sync, with the same mapping.
    c.batch_execute(
        "DELETE FROM users WHERE id = 6; UPDATE users SET email = 'x@example.com' WHERE id = 7",
    )
    .await
    .unwrap();
    let (code, out, err) = fx.slotstream("resync", &[]);
    assert_eq!(code, 0, "resync failed\nstdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("resync requested"), "{out}");
    let sixth = run_once(&fx);
    assert_full_sync(
        &sixth,
        table_rows(&c).await,
        &["user_id", "email", "fullName"],
    );
    assert_eq!(snapshot_runs(&fx).await, 4);
    assert_rebuilds_table(&fx, &c, v3).await;
    let seventh = run_once(&fx);
    assert_eq!(summarize_events(&seventh).op(EventOp::Snapshot), 0);
    assert_eq!(snapshot_runs(&fx).await, 4);
    assert_eq!(fx.full_sync_state().await.as_deref(), Some("done"));

    // Nothing was lost across the three full syncs: every change made between runs is in the
    // events (a destination that applied them holds the table).
    assert_rebuilds_table(&fx, &c, v3).await;
}
