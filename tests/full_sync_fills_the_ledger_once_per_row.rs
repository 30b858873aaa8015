//! A full sync fills the sent-state ledger with one entry per row: by COPY while the ledger
//! holds none of the rows (a first full sync), by upsert once a key already has an entry (a
//! resync, or a full sync whose ledger was partly filled before). Either way every row ends
//! with the same entry at the new full sync's generation, and the next run sends nothing.

use crate::support;

use std::collections::BTreeMap;

use support::users_fixture;

const ROWS: i64 = 2600;

/// row_key → (user_id, traits_hash) of the pipeline's entries, and their generations.
async fn ledger(fx: &support::Fixture) -> (BTreeMap<String, (Option<String>, Vec<u8>)>, Vec<i64>) {
    let rows = fx
        .db
        .connect()
        .await
        .query(
            r#"SELECT row_key, user_id, traits_hash, generation FROM "_rudderstack".cdc_ledger
                WHERE pipeline = $1"#,
            &[&fx.name],
        )
        .await
        .expect("ledger");
    let mut generations: Vec<i64> = rows.iter().map(|r| r.get(3)).collect();
    generations.sort_unstable();
    generations.dedup();
    let entries = rows
        .iter()
        .map(|r| {
            let hash: Option<Vec<u8>> = r.get(2);
            (
                r.get(0),
                (r.get(1), hash.expect("a full sync's entry has a hash")),
            )
        })
        .collect();
    (entries, generations)
}

#[tokio::test(flavor = "multi_thread")]
async fn full_sync_fills_the_ledger_once_per_row() {
    let fx = users_fixture(support::USERS_TABLE, "", None).await;
    let db = fx.db.connect().await;
    db.batch_execute(&format!(
        "INSERT INTO users (user_id, email, name, plan)
         SELECT 'u' || g, 'u' || g || '@example.com', 'user ' || g, 'free'
           FROM generate_series(1, {ROWS}) g"
    ))
    .await
    .expect("rows");

    // A first full sync: every row gets its entry.
    fx.run_once();
    let (first, generations) = ledger(&fx).await;
    assert_eq!(first.len() as i64, ROWS);
    assert_eq!(generations, vec![1]);
    assert_eq!(
        first.get("[\"7\"]").map(|e| e.0.as_deref()),
        Some(Some("u7"))
    );

    // A resync: the entries exist, so they are updated to the new generation, unchanged.
    let (code, out, err) = fx.slotstream("resync", &[]);
    assert_eq!(code, 0, "resync failed\n{out}{err}");
    fx.run_once();
    let (second, generations) = ledger(&fx).await;
    assert_eq!(generations, vec![2]);
    assert_eq!(
        second, first,
        "a resync of unchanged rows left other entries"
    );

    // A ledger that holds only some of the rows (the rest new): all of them end at the next
    // generation, none twice.
    db.execute(
        r#"DELETE FROM "_rudderstack".cdc_ledger WHERE pipeline = $1 AND row_key > '["5"]'"#,
        &[&fx.name],
    )
    .await
    .expect("drop some entries");
    let (code, out, err) = fx.slotstream("resync", &[]);
    assert_eq!(code, 0, "resync failed\n{out}{err}");
    fx.run_once();
    let (third, generations) = ledger(&fx).await;
    assert_eq!(generations, vec![3]);
    assert_eq!(third, first);

    // Nothing changed since: the next run sends nothing more.
    let before = fx.events().len();
    fx.run_once();
    assert_eq!(fx.events().len(), before);
}
