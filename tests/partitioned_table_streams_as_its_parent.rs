//! A partitioned table works end to end: its publication publishes through the partition root
//! (`publish_via_partition_root`, as sql/setup.sql creates it), so inserts, updates, deletes
//! and rows moving between partitions all arrive as changes of the parent, partitions created
//! or attached later included; the full sync reads the parent. `check` and `run` refuse a
//! publication that publishes the partitions under their own names, and `check` judges the
//! replica identity of each partition (the parent's own setting is never used).

use crate::support;
use support::{EventOp, users_fixture};

const TABLE: &str = "
    CREATE TABLE public.users (
        id bigint NOT NULL, region text NOT NULL, user_id text, email text, name text, plan text,
        PRIMARY KEY (id, region)) PARTITION BY LIST (region);
    CREATE TABLE public.users_eu PARTITION OF public.users FOR VALUES IN ('eu');
    CREATE TABLE public.users_us PARTITION OF public.users FOR VALUES IN ('us');";

const MIRROR: &str = "[sync]\nmode = \"mirror\"\n";
/// Without the ledger, mirror mode needs the identifiers in every partition's replica identity.
const MIRROR_WITHOUT_LEDGER: &str = "[sync]\nmode = \"mirror\"\nledger = false\n";

#[tokio::test]
async fn partitioned_table_streams_as_its_parent() {
    let table = format!(
        "{TABLE}
         ALTER TABLE public.users_eu REPLICA IDENTITY FULL;
         ALTER TABLE public.users_us REPLICA IDENTITY FULL;"
    );
    let fx = users_fixture(&table, MIRROR, None).await;
    let c = fx.db.connect().await;
    c.batch_execute(
        "INSERT INTO users (id, region, user_id, email, name, plan) VALUES
            (1, 'eu', 'u1', 'a@example.com', 'Ann', 'free'),
            (2, 'eu', 'u2', 'b@example.com', 'Bob', 'free'),
            (3, 'eu', 'u3', NULL, 'Cy', 'pro'),
            (4, 'us', 'u4', NULL, 'Di', 'free'),
            (5, 'us', 'u5', NULL, 'Ed', 'pro'),
            (6, 'us', 'u6', NULL, 'Flo', 'free');
         ANALYZE users;",
    )
    .await
    .unwrap();
    let check = support::run_check(&fx.config);
    assert_eq!(check.code, 0, "{}", check.dump());
    fx.run_once();
    let snapshot = support::read_light_events(&fx.events);
    assert_eq!(snapshot.len(), 6, "the full sync reads every partition");
    assert!(snapshot.iter().all(|e| e.op == EventOp::Snapshot));

    c.batch_execute(
        "INSERT INTO users (id, region, user_id, plan) VALUES (7, 'eu', 'u7', 'pro'), (8, 'us', 'u8', 'free');
         UPDATE users SET plan = 'pro' WHERE user_id IN ('u1', 'u4');
         DELETE FROM users WHERE user_id IN ('u2', 'u5');
         -- moves from one partition to another
         UPDATE users SET region = 'us', plan = 'team' WHERE user_id = 'u3';
         -- a partition attached later, and one created later
         CREATE TABLE public.users_as (LIKE public.users);
         ALTER TABLE public.users ATTACH PARTITION public.users_as FOR VALUES IN ('as');
         ALTER TABLE public.users_as REPLICA IDENTITY FULL;
         CREATE TABLE public.users_af PARTITION OF public.users FOR VALUES IN ('af');
         ALTER TABLE public.users_af REPLICA IDENTITY FULL;
         INSERT INTO users (id, region, user_id, plan) VALUES (9, 'as', 'u9', 'free'), (10, 'af', 'u10', 'free');
         UPDATE users SET plan = 'pro' WHERE user_id = 'u9';
         UPDATE users SET region = 'as' WHERE user_id = 'u6';
         DELETE FROM users WHERE user_id = 'u10';",
    )
    .await
    .unwrap();
    fx.run_once();

    let events = support::read_light_events(&fx.events);
    let streamed: Vec<_> = events
        .iter()
        .filter(|e| e.op != EventOp::Snapshot)
        .collect();
    for op in [EventOp::Insert, EventOp::Update, EventOp::Delete] {
        assert!(
            streamed.iter().any(|e| e.op == op),
            "a streamed {op:?}: {streamed:#?}"
        );
    }
    // A move between partitions arrives as a delete from the old partition, then an insert
    // into the new one, in one transaction: the row ends present.
    for user in ["u3", "u6"] {
        let moves: Vec<EventOp> = streamed
            .iter()
            .filter(|e| e.user_id.as_deref() == Some(user))
            .map(|e| e.op)
            .collect();
        assert_eq!(moves.last(), Some(&EventOp::Insert), "{user}: {moves:?}");
    }
    let state = support::fold_events(&events);
    let table = support::table_state(&c, "users", "user_id", None).await;
    support::assert_same_state(&state, &table);
}

/// Runs the SQL lines among `fixes` as the superuser.
async fn apply(db: &support::TestDb, fixes: &[String]) {
    let sql: Vec<&str> = fixes
        .iter()
        .filter(|f| !f.starts_with('→'))
        .map(String::as_str)
        .collect();
    assert!(!sql.is_empty(), "a fix with SQL: {fixes:?}");
    db.connect()
        .await
        .batch_execute(&sql.join("\n"))
        .await
        .unwrap_or_else(|e| panic!("the printed fix must run: {e}\n{sql:?}"));
}

#[tokio::test]
async fn check_and_run_require_the_root_and_an_identity_per_partition() {
    // The parent's REPLICA IDENTITY FULL reaches no partition.
    let table = format!("{TABLE}\n ALTER TABLE public.users REPLICA IDENTITY FULL;");
    let fx = users_fixture(&table, MIRROR_WITHOUT_LEDGER, None).await;
    let p = fx.slot.clone();
    fx.db
        .connect()
        .await
        .batch_execute(&format!(
            "ALTER PUBLICATION \"{p}\" SET (publish_via_partition_root = false);
             INSERT INTO users (id, region, user_id) VALUES (1, 'eu', 'u1');"
        ))
        .await
        .unwrap();
    let not_root = format!(
        "publication \"{p}\" publishes the partitions of \"public\".\"users\" under their own names, so their changes would not arrive as changes of \"public\".\"users\""
    );
    let identity = "mirror mode sends deletes, but the replica identity of partitions \"public\".\"users_eu\", \"public\".\"users_us\" of \"public\".\"users\" lacks the identifier columns \"user_id\", \"email\", so rows deleted there could not be identified";
    let check = support::run_check(&fx.config);
    assert_eq!(check.code, 3, "{}", check.dump());
    assert_eq!(
        check.failures(),
        vec![not_root.clone(), identity.to_owned()],
        "{}",
        check.dump()
    );
    let (code, _, err) = fx.slotstream("run", &["--once"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(&format!("error: {not_root}\n")), "{err}");
    assert!(
        err.contains(&format!(
            "\n    ALTER PUBLICATION \"{p}\" SET (publish_via_partition_root = true);\n"
        )),
        "{err}"
    );

    apply(&fx.db, &check.fixes_under(&not_root)).await;
    apply(&fx.db, &check.fixes_under(identity)).await;
    let check = support::run_check(&fx.config);
    assert_eq!(check.code, 0, "after the fixes:\n{}", check.dump());
    fx.run_once();
    assert_eq!(fx.events().len(), 1, "{:#?}", fx.events());
}
