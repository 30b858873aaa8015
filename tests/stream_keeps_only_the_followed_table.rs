//! The stream turns only the followed table's rows into events, whatever else the WAL and the
//! publication carry: 2000 small transactions, most of which also write to a table in no
//! publication, to a second table the publication also holds (a different shape), and to a
//! table of the *same name* in another schema that the publication holds too; plus two
//! transactions open at the same time on two connections, committed in the opposite order of
//! their start. Every `users` row arrives once, in commit order, each transaction with its own
//! commit LSN, and nothing from the other tables.

use crate::support;

use std::collections::HashSet;

use serde_json::Value;
use support::users_fixture;

const TABLES: &str = "
    CREATE TABLE public.users (id bigserial PRIMARY KEY, user_id text, email text, name text);
    CREATE TABLE public.unpublished (id bigserial PRIMARY KEY, user_id text, email text);
    CREATE TABLE public.accounts (id bigserial PRIMARY KEY, user_id text, balance numeric);
    CREATE SCHEMA crm;
    CREATE TABLE crm.users (id bigserial PRIMARY KEY, user_id text, email text, name text);";

const SMALL_TRANSACTIONS: i64 = 2000;

/// Commit LSN of an event, as a number (for ordering).
fn lsn(e: &Value) -> u64 {
    let text = e["context"]["sources"]["lsn"].as_str().unwrap();
    let (hi, lo) = text.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

#[tokio::test]
async fn only_the_followed_tables_rows_become_events() {
    let fx = users_fixture(TABLES, "", None).await;
    let admin = fx.db.connect().await;
    let publication = fx.slot.clone();
    admin
        .batch_execute(&format!(
            "ALTER PUBLICATION \"{publication}\" ADD TABLE public.accounts, crm.users"
        ))
        .await
        .unwrap();
    fx.run_once();

    // 2000 transactions, one `users` row each; most also touch the other tables, before and
    // after the `users` row.
    admin
        .batch_execute(&format!(
            "DO $$
             BEGIN
               FOR i IN 1..{SMALL_TRANSACTIONS} LOOP
                 IF i % 2 = 0 THEN
                   INSERT INTO crm.users (user_id, email, name) VALUES ('crm_' || i, 'x', 'crm');
                 END IF;
                 IF i % 3 = 0 THEN
                   INSERT INTO accounts (user_id, balance) VALUES ('acct_' || i, i);
                   UPDATE crm.users SET name = 'crm2' WHERE user_id = 'crm_' || (i - 1);
                 END IF;
                 INSERT INTO users (user_id, email, name) VALUES ('u_' || i, 'u' || i || '@x', 'N' || i);
                 IF i % 5 = 0 THEN
                   INSERT INTO unpublished (user_id, email) VALUES ('np_' || i, 'y');
                   DELETE FROM crm.users WHERE user_id = 'crm_' || (i - 1);
                 END IF;
                 COMMIT;
               END LOOP;
             END $$"
        ))
        .await
        .unwrap();

    // Two overlapping transactions: A starts first and commits last.
    let mut ca = fx.db.connect().await;
    let mut cb = fx.db.connect().await;
    let a = ca.transaction().await.unwrap();
    let b = cb.transaction().await.unwrap();
    a.batch_execute("INSERT INTO users (user_id, name) VALUES ('a_1', 'A1')")
        .await
        .unwrap();
    b.batch_execute(
        "INSERT INTO crm.users (user_id, name) VALUES ('crm_b', 'B');
         INSERT INTO users (user_id, name) VALUES ('b_1', 'B1');",
    )
    .await
    .unwrap();
    a.batch_execute(
        "INSERT INTO accounts (user_id, balance) VALUES ('acct_a', 1);
         UPDATE users SET name = 'A1 again' WHERE user_id = 'a_1';",
    )
    .await
    .unwrap();
    b.batch_execute("INSERT INTO unpublished (user_id) VALUES ('np_b')")
        .await
        .unwrap();
    b.commit().await.unwrap();
    a.batch_execute("INSERT INTO users (user_id, name) VALUES ('a_2', 'A2')")
        .await
        .unwrap();
    a.commit().await.unwrap();

    fx.run_once();
    let events = fx.events();
    let user_ids: Vec<&str> = events
        .iter()
        .map(|e| e["userId"].as_str().unwrap())
        .collect();
    let mut expected: Vec<String> = (1..=SMALL_TRANSACTIONS).map(|i| format!("u_{i}")).collect();
    expected.extend(["b_1", "a_1", "a_1", "a_2"].map(String::from));
    assert_eq!(
        user_ids, expected,
        "only users rows, once each, in commit order"
    );

    for e in &events {
        assert_eq!(e["context"]["sources"]["schema"], "public", "{e}");
        assert_eq!(e["context"]["sources"]["table"], "users", "{e}");
        let traits = e["traits"].as_object().unwrap();
        let keys: Vec<&str> = traits.keys().map(String::as_str).collect();
        assert_eq!(keys, ["id", "user_id", "email", "name"], "{e}");
    }
    let small = &events[..SMALL_TRANSACTIONS as usize];
    for (i, e) in small.iter().enumerate() {
        assert_eq!(e["traits"]["name"], format!("N{}", i + 1), "{e}");
        assert_eq!(e["context"]["sources"]["op"], "insert", "{e}");
    }
    // One commit LSN per small transaction, increasing.
    for pair in small.windows(2) {
        assert!(
            lsn(&pair[0]) < lsn(&pair[1]),
            "{} then {}",
            pair[0],
            pair[1]
        );
    }
    // The overlapping transactions: B committed first, then A with its three changes.
    let tail = &events[SMALL_TRANSACTIONS as usize..];
    assert!(lsn(&small[small.len() - 1]) < lsn(&tail[0]));
    assert!(lsn(&tail[0]) < lsn(&tail[1]));
    assert_eq!(lsn(&tail[1]), lsn(&tail[2]));
    assert_eq!(lsn(&tail[2]), lsn(&tail[3]));
    let ops: Vec<&str> = tail
        .iter()
        .map(|e| e["context"]["sources"]["op"].as_str().unwrap())
        .collect();
    assert_eq!(ops, ["insert", "insert", "update", "insert"]);
    assert_eq!(tail[2]["traits"]["name"], "A1 again");

    let ids: HashSet<&str> = events
        .iter()
        .map(|e| e["messageId"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), events.len(), "messageIds are unique");
}
