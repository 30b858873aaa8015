//! A long full sync reports its progress when stderr is not a terminal: an INFO line every few
//! seconds with the rows read, the rate and an ETA. When it ends, `_rudderstack.cdc_sync_runs`
//! holds a `snapshot` row with the row count.
//!
//! The full sync is made long without a huge table: the file sink writes into a FIFO that the
//! test reads slowly, so the sink, and through the bounded channel the COPY, go at the test's
//! pace until two progress lines have appeared; then the test reads at full speed.

use crate::support;

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use support::{USERS_TABLE, users_fixture, wait_until};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const ROWS: i64 = 50_000;

/// One `full sync progress` line of the text log.
#[derive(Debug)]
struct ProgressLine {
    at: OffsetDateTime,
    rows: u64,
    rows_per_sec: u64,
    eta: String,
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    line[start..].split_whitespace().next()
}

fn progress_lines(log: &str) -> Vec<ProgressLine> {
    log.lines()
        .filter(|l| l.contains("full sync progress"))
        .map(|l| ProgressLine {
            at: OffsetDateTime::parse(l.split_whitespace().next().unwrap_or(""), &Rfc3339)
                .unwrap_or_else(|e| panic!("timestamp of {l:?}: {e}")),
            rows: field(l, "rows")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("rows in {l:?}")),
            rows_per_sec: field(l, "rows_per_sec")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("rows_per_sec in {l:?}")),
            eta: field(l, "eta")
                .unwrap_or_else(|| panic!("eta in {l:?}"))
                .to_owned(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_sync_reports_progress() {
    let fx = users_fixture(USERS_TABLE, "", None).await;
    let c = fx.db.connect().await;
    c.batch_execute(&format!(
        "INSERT INTO users (user_id, email, name, plan)
         SELECT 'u' || g, 'user' || g || '@example.com', 'user ' || g, 'free'
           FROM generate_series(1, {ROWS}) g;
         ANALYZE users;"
    ))
    .await
    .expect("load rows");
    // The sink writes into a FIFO (fsync does not apply to a pipe).
    let mut config = std::fs::read_to_string(&fx.config).expect("config");
    config.push_str("fsync = false\n");
    std::fs::write(&fx.config, config).expect("config");
    let fifo = std::ffi::CString::new(fx.events.to_str().expect("utf-8")).expect("path");
    // SAFETY: mkfifo(3) with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0, "mkfifo");

    let fast = Arc::new(AtomicBool::new(false));
    let lines = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (fast, lines, path) = (fast.clone(), lines.clone(), fx.events.clone());
        std::thread::spawn(move || {
            // Opening blocks until slotstream opens the FIFO; read ends when it closes it.
            let mut file = std::fs::File::open(&path).expect("open fifo");
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let slow = !fast.load(Ordering::Relaxed);
                let want = if slow { 4096 } else { buf.len() };
                let n = file.read(&mut buf[..want]).expect("read fifo");
                if n == 0 {
                    break;
                }
                let newlines = buf[..n].iter().filter(|b| **b == b'\n').count();
                lines.fetch_add(newlines, Ordering::Relaxed);
                if slow {
                    // About 8 events (4 KiB) every 5 ms: some 1,600 rows/s.
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        })
    };

    let mut child = fx.spawn_run();
    wait_until(
        Duration::from_secs(90),
        "two full sync progress lines",
        || async { progress_lines(&fx.run_log()).len() >= 2 },
    )
    .await;
    fast.store(true, Ordering::Relaxed);
    wait_until(
        Duration::from_secs(120),
        "the full sync to finish",
        || async { fx.full_sync_state().await.as_deref() == Some("done") },
    )
    .await;
    support::sigterm(&child);
    let status = child.wait().expect("wait for slotstream");
    assert!(
        status.success(),
        "slotstream exited with {status}\n{}",
        fx.run_log()
    );
    reader.join().expect("fifo reader");
    assert_eq!(
        lines.load(Ordering::Relaxed),
        ROWS as usize,
        "every row reached the sink"
    );

    let log = fx.run_log();
    let progress = progress_lines(&log);
    eprintln!("{progress:#?}");
    let (first, second) = (&progress[0], &progress[1]);
    assert!(first.rows > 0 && second.rows > first.rows, "{progress:?}");
    assert!(
        first.rows < ROWS as u64,
        "progress is reported during the sync: {progress:?}"
    );
    assert!(first.rows_per_sec > 0, "{progress:?}");
    // ANALYZE gave an estimate, so the ETA is a number of seconds.
    assert!(
        first.eta.ends_with('s') && first.eta.trim_end_matches('s').parse::<u64>().is_ok(),
        "{progress:?}"
    );
    let gap = (second.at - first.at).as_seconds_f64();
    assert!(
        (4.0..=15.0).contains(&gap),
        "a line every few seconds (5 s), got {gap} s apart:\n{log}"
    );
    for l in log.lines().filter(|l| l.contains("full sync progress")) {
        assert!(l.contains(" INFO "), "an INFO line: {l}");
    }
    assert!(
        !log.contains('\u{1b}'),
        "no terminal escapes when stderr is a file:\n{log}"
    );

    let runs = c
        .query(
            r#"SELECT rows, events, status FROM "_rudderstack".cdc_sync_runs
                WHERE pipeline = $1 AND kind = 'snapshot'"#,
            &[&fx.name],
        )
        .await
        .expect("sync runs");
    assert_eq!(runs.len(), 1, "one snapshot sync run");
    let (rows, events, status): (i64, i64, String) =
        (runs[0].get(0), runs[0].get(1), runs[0].get(2));
    eprintln!("snapshot sync run: rows {rows}, events {events}, {status}");
    assert_eq!(rows, ROWS, "the snapshot run records the row count");
    assert_eq!(status, "succeeded");
}
