//! One transaction of wide rows — 400 rows, each carrying a ~256 KiB jsonb document, about
//! 110 MiB in all — streamed with `memory_limit = "16MiB"`: every row arrives once, in the
//! transaction's order, with its document intact, and the peak resident memory of the
//! `slotstream run --once` process stays within 64 MiB + memory_limit. The memory limit bounds
//! the bytes held for rows in flight (replication buffer, channel, batch, sink), not their
//! number. (A memory bound, measured by the kernel for that one process: not a timing.)

use crate::support;

use std::collections::HashSet;
use std::io::BufRead;

use serde_json::Value;

const ROWS: i64 = 400;
/// Objects in each document's `items` array: ~110 bytes of text each, ~280 KiB a document.
const ITEMS: i64 = 2600;
const MIB: u64 = 1024 * 1024;
const MEMORY_LIMIT: u64 = 16 * MIB;
/// The fixed overhead the memory goal allows on top of the limit.
const OVERHEAD: u64 = 64 * MIB;

const TABLE: &str = "CREATE TABLE public.users (
    id bigserial PRIMARY KEY, user_id text NOT NULL, email text, doc jsonb)";

#[tokio::test(flavor = "multi_thread")]
async fn wide_rows_in_one_transaction_stay_within_the_memory_limit() {
    let fx = support::users_fixture(TABLE, "[schedule]\nmemory_limit = \"16MiB\"\n", None).await;
    fx.run_once();
    let c = fx.db.connect().await;
    // One document built once, varied per row by its `row` key; every row still travels
    // whole (pgoutput sends the detoasted value).
    c.batch_execute(&format!(
        "CREATE TEMP TABLE template AS
         SELECT jsonb_build_object('items', (
                  SELECT jsonb_agg(jsonb_build_object('i', j, 'name', 'item ' || j,
                                                      'text', md5(j::text) || md5((j + 1)::text)))
                    FROM generate_series(1, {ITEMS}) j)) AS doc;
         BEGIN;
         INSERT INTO users (user_id, email, doc)
         SELECT 'u_' || g, 'user' || g || '@example.com', t.doc || jsonb_build_object('row', g)
           FROM generate_series(1, {ROWS}) g, template t;
         COMMIT;"
    ))
    .await
    .unwrap();
    let volume: i64 = c
        .query_one("SELECT sum(octet_length(doc::text))::int8 FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        volume as u64 > 6 * (MEMORY_LIMIT + OVERHEAD) / 5,
        "the transaction must be larger than the memory it may use: {volume} bytes"
    );

    let (code, stderr, peak) = fx.run_once_peak_rss().await;
    assert_eq!(code, 0, "run --once failed\n{stderr}");
    eprintln!(
        "peak RSS {:.1} MiB for a {:.0} MiB transaction at memory_limit = 16MiB",
        peak as f64 / MIB as f64,
        volume as f64 / MIB as f64
    );
    assert!(
        peak <= MEMORY_LIMIT + OVERHEAD,
        "peak RSS {:.1} MiB > {} MiB memory_limit + {} MiB, for a {:.0} MiB transaction",
        peak as f64 / MIB as f64,
        MEMORY_LIMIT / MIB,
        OVERHEAD / MIB,
        volume as f64 / MIB as f64
    );

    // Every row once, in order, intact.
    let file = std::fs::File::open(&fx.events).unwrap();
    let mut ids = HashSet::new();
    let mut lsn: Option<Value> = None;
    let mut n: i64 = 0;
    for line in std::io::BufReader::new(file).lines() {
        let e: Value = serde_json::from_str(&line.unwrap()).unwrap();
        n += 1;
        assert!(n <= ROWS, "more events than rows");
        let head = format!(
            "userId {} op {}",
            e["userId"], e["context"]["sources"]["op"]
        );
        assert_eq!(
            e["userId"],
            format!("u_{n}"),
            "event {n} out of order: {head}"
        );
        assert_eq!(e["context"]["sources"]["op"], "insert", "{head}");
        let doc = &e["traits"]["doc"];
        assert_eq!(doc["row"], n, "{head}");
        let items = doc["items"].as_array().expect("the document's items");
        assert_eq!(items.len() as i64, ITEMS, "{head}");
        assert_eq!(items[0]["name"], "item 1", "{head}");
        assert_eq!(items[ITEMS as usize - 1]["i"], ITEMS, "{head}");
        let this_lsn = &e["context"]["sources"]["lsn"];
        match &lsn {
            None => lsn = Some(this_lsn.clone()),
            Some(l) => assert_eq!(l, this_lsn, "one transaction, one commit LSN: {head}"),
        }
        assert!(
            ids.insert(e["messageId"].as_str().unwrap().to_owned()),
            "duplicate messageId: {head}"
        );
    }
    assert_eq!(n, ROWS, "every row exactly once");

    // Checkpointed: another run delivers nothing more.
    fx.run_once();
    assert_eq!(fx.event_lines() as i64, ROWS, "nothing is delivered twice");
}
