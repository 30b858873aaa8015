//! One transaction of 200,000 inserts is delivered completely, exactly once, in the order of
//! the transaction: every row an `insert` event with the same commit LSN, a distinct messageId,
//! and its traits intact. (Bounded memory for such a transaction is measured by the memory
//! benchmark; here the point is correctness across many micro-batches of one transaction.)

use crate::support;

use std::collections::HashSet;
use std::io::BufRead;

use serde_json::Value;
use support::users_fixture;

const ROWS: i64 = 200_000;

#[tokio::test]
async fn a_200k_row_transaction_is_delivered_once_in_order() {
    let fx = users_fixture(support::USERS_TABLE, "", None).await;
    fx.run_once();
    assert!(fx.events().is_empty());
    let c = fx.db.connect().await;
    // Ids go down while the insertion order goes up, so the order check cannot pass by
    // sorting on the key.
    c.batch_execute(&format!(
        "INSERT INTO users (id, user_id, email, name, plan)
         SELECT {ROWS} + 1 - g, 'u_' || g, 'user' || g || '@example.com', 'Name ' || g,
                CASE WHEN g % 2 = 0 THEN 'pro' ELSE 'free' END
           FROM generate_series(1, {ROWS}) g"
    ))
    .await
    .unwrap();
    fx.run_once();

    // Read the file line by line: 200k parsed events would be a lot of memory for the test.
    let file = std::fs::File::open(&fx.events).unwrap();
    let mut ids: HashSet<String> = HashSet::with_capacity(ROWS as usize);
    let mut lsn: Option<Value> = None;
    let mut n: i64 = 0;
    for line in std::io::BufReader::new(file).lines() {
        let line = line.unwrap();
        let e: Value = serde_json::from_str(&line).unwrap();
        n += 1;
        assert!(n <= ROWS, "more events than rows: {e}");
        assert_eq!(e["userId"], format!("u_{n}"), "event {n} out of order: {e}");
        assert_eq!(e["traits"]["id"], ROWS + 1 - n, "{e}");
        assert_eq!(e["traits"]["email"], format!("user{n}@example.com"), "{e}");
        assert_eq!(e["traits"]["name"], format!("Name {n}"), "{e}");
        assert_eq!(
            e["traits"]["plan"],
            if n % 2 == 0 { "pro" } else { "free" },
            "{e}"
        );
        assert_eq!(e["context"]["sources"]["op"], "insert", "{e}");
        let this_lsn = &e["context"]["sources"]["lsn"];
        match &lsn {
            None => lsn = Some(this_lsn.clone()),
            Some(l) => assert_eq!(l, this_lsn, "one transaction, one commit LSN: {e}"),
        }
        assert!(
            ids.insert(e["messageId"].as_str().unwrap().to_owned()),
            "duplicate messageId: {e}"
        );
    }
    assert_eq!(n, ROWS, "every row exactly once");

    // Checkpointed: another run delivers nothing more.
    fx.run_once();
    let again = std::io::BufReader::new(std::fs::File::open(&fx.events).unwrap())
        .lines()
        .count() as i64;
    assert_eq!(
        again, ROWS,
        "nothing is delivered twice after the checkpoint"
    );
    let rows: i64 = c
        .query_one(
            r#"SELECT coalesce(sum(rows), 0)::int8 FROM "_rudderstack".cdc_sync_runs
                WHERE pipeline = $1 AND kind = 'stream'"#,
            &[&fx.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, ROWS, "the sync runs count the transaction's rows");
}
