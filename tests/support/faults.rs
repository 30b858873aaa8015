//! Helpers of the durability and fault tests (processes, positions, the events file, the
//! destination path). Used as `crate::support::faults`.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::Fixture;

/// Waits (polling `try_wait`) until `child` exits or `timeout` passes; `None` on timeout.
pub async fn wait_exit(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Parses a textual LSN (`16/B374D848`) into its u64 value.
pub fn parse_lsn(text: &str) -> u64 {
    let (hi, lo) = text
        .split_once('/')
        .unwrap_or_else(|| panic!("not an LSN: {text:?}"));
    let hi = u64::from_str_radix(hi, 16).unwrap_or_else(|_| panic!("not an LSN: {text:?}"));
    let lo = u64::from_str_radix(lo, 16).unwrap_or_else(|_| panic!("not an LSN: {text:?}"));
    (hi << 32) | lo
}

/// The commit LSN an event carries (`context.sources.lsn`), as u64.
pub fn event_lsn(event: &serde_json::Value) -> u64 {
    let text = event["context"]["sources"]["lsn"]
        .as_str()
        .unwrap_or_else(|| panic!("event without context.sources.lsn: {event}"));
    parse_lsn(text)
}

/// `pg_current_wal_insert_lsn()` as u64: run right after a COMMIT returned, it is at or past
/// the end of that transaction's commit record.
pub async fn wal_insert_lsn(client: &tokio_postgres::Client) -> u64 {
    client
        .query_one("SELECT (pg_current_wal_insert_lsn() - '0/0')::int8", &[])
        .await
        .expect("pg_current_wal_insert_lsn")
        .get::<_, i64>(0) as u64
}

impl Fixture {
    /// Rewrites `path = …` under `[destination]` of the config (the file sink's target).
    pub fn set_destination_path(&self, path: &Path) {
        let text = std::fs::read_to_string(&self.config).expect("read config");
        let mut in_destination = false;
        let mut replaced = false;
        let lines: Vec<String> = text
            .lines()
            .map(|line| {
                let trimmed = line.trim_start();
                if trimmed.starts_with('[') {
                    in_destination = trimmed.starts_with("[destination]");
                } else if in_destination && trimmed.starts_with("path") && !replaced {
                    replaced = true;
                    return format!("path = {:?}", path.display().to_string());
                }
                line.to_owned()
            })
            .collect();
        assert!(
            replaced,
            "no destination path in {}:\n{text}",
            self.config.display()
        );
        std::fs::write(&self.config, lines.join("\n") + "\n").expect("write config");
    }
}

/// A spawned slotstream that is killed (SIGKILL) and reaped when dropped, so that a failing
/// assertion does not leave it running against a cluster that is going away.
pub struct Running(pub std::process::Child);

impl std::ops::Deref for Running {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The walsender streaming from `slot` (its pid in `pg_stat_replication`), if one does.
pub async fn walsender(c: &tokio_postgres::Client, slot: &str) -> Option<i32> {
    c.query_one(
        "SELECT s.active_pid FROM pg_replication_slots s
           JOIN pg_stat_replication r ON r.pid = s.active_pid
          WHERE s.slot_name = $1",
        &[&slot],
    )
    .await
    .ok()
    .and_then(|r| r.get::<_, Option<i32>>(0))
}

/// Starts `slotstream run` (continuous) for `fx` and waits until it streams on a walsender;
/// returns the run and that walsender's pid.
pub async fn spawn_streaming(fx: &Fixture, c: &tokio_postgres::Client) -> (Running, i32) {
    let run = Running(fx.spawn_run());
    super::wait_until(Duration::from_secs(60), "the run is streaming", || async {
        fx.run_log().contains("streaming")
    })
    .await;
    super::wait_until(
        Duration::from_secs(30),
        "a walsender for the slot",
        || async { walsender(c, &fx.slot).await.is_some() },
    )
    .await;
    let pid = walsender(c, &fx.slot).await.expect("walsender");
    (run, pid)
}
