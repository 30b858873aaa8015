//! A destination that stops accepting data (a named pipe nobody reads) while a transaction of
//! wide rows streams in: the memory limit fills, the reader waits for memory, and the
//! replication session stops reading the server — so the walsender blocks writing the
//! transaction. The session must stay alive past the server's `wal_sender_timeout` (10 s in
//! the test cluster): the replication worker keeps sending status updates while its buffer is
//! full. Once the pipe is read again, every row arrives once, in order, on the same session.

use crate::support;
use crate::support::faults::{self, Running};

use std::io::BufRead;
use std::time::{Duration, Instant};

const ROWS: i64 = 150;
/// ~280 KiB documents (see `stream_wide_rows_stay_within_the_memory_limit`).
const ITEMS: i64 = 2600;
/// Longer than the test cluster's wal_sender_timeout (10 s).
const STALL: Duration = Duration::from_secs(12);

const TABLE: &str = "CREATE TABLE public.users (
    id bigserial PRIMARY KEY, user_id text NOT NULL, email text, doc jsonb)";

#[tokio::test(flavor = "multi_thread")]
async fn a_reader_waiting_for_memory_keeps_its_session_past_wal_sender_timeout() {
    let fx = support::users_fixture(TABLE, "[schedule]\nmemory_limit = \"4MiB\"\n", None).await;
    // The destination: a named pipe, not read until the session has been stalled long enough.
    let pipe = fx.dir.path().join("events.pipe");
    let c_path = std::ffi::CString::new(pipe.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    fx.set_destination_path(&pipe);
    // A pipe cannot be fsynced; the destination section is the config's last.
    let config = std::fs::read_to_string(&fx.config).unwrap();
    std::fs::write(&fx.config, format!("{config}fsync = false\n")).unwrap();
    fx.run_once(); // the full sync of the empty table writes nothing

    let c = fx.db.connect().await;
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
    let committed = faults::wal_insert_lsn(&c).await;
    let _run = Running(fx.spawn_run());

    // Wait until the walsender has been blocked in the middle of the transaction (nothing more
    // sent, still short of its commit) for longer than wal_sender_timeout, on one session.
    let application = format!("slotstream/{}", fx.name);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut stalled: Option<(i32, i64, Instant)> = None;
    let walsender = loop {
        let row = c
            .query_opt(
                "SELECT pid, coalesce((sent_lsn - '0/0')::int8, 0) FROM pg_stat_replication
                  WHERE application_name = $1",
                &[&application],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            let (pid, sent): (i32, i64) = (row.get(0), row.get(1));
            assert!(
                (sent as u64) < committed,
                "the whole transaction was sent: nothing held it back\n{}",
                fx.run_log()
            );
            match stalled {
                Some((p, s, since)) if p == pid && s == sent => {
                    if since.elapsed() >= STALL {
                        break pid;
                    }
                }
                _ => stalled = Some((pid, sent, Instant::now())),
            }
        } else {
            stalled = None;
        }
        assert!(
            Instant::now() < deadline,
            "the session never stayed blocked for {STALL:?} (a replication timeout ends it sooner)\n{}",
            fx.run_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // Read the pipe: everything flows again, on the same session.
    let reader = std::thread::spawn(move || {
        let file = std::fs::File::open(&pipe).unwrap();
        let mut rows = Vec::new();
        for line in std::io::BufReader::new(file).lines() {
            let e: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
            rows.push((
                e["userId"].as_str().unwrap().to_owned(),
                e["traits"]["doc"]["row"].as_i64().unwrap(),
                e["traits"]["doc"]["items"].as_array().map_or(0, Vec::len),
            ));
            if rows.len() == ROWS as usize {
                break;
            }
        }
        rows
    });
    let rows = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || reader.join().unwrap()),
    )
    .await
    .unwrap_or_else(|_| panic!("the rows did not all arrive\n{}", fx.run_log()))
    .unwrap();
    for (i, row) in rows.iter().enumerate() {
        let n = i as i64 + 1;
        assert_eq!(
            row,
            &(format!("u_{n}"), n, ITEMS as usize),
            "row {n}: every row once, in order, intact"
        );
    }
    let active: Option<i32> = c
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&fx.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        active,
        Some(walsender),
        "the session was replaced\n{}",
        fx.run_log()
    );
    assert!(
        !fx.run_log().contains("pipeline failed"),
        "the session failed:\n{}",
        fx.run_log()
    );
}
