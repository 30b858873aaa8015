//! When the delivering half fails for good (here the destination, `/dev/full`, until the retry
//! budget `[destination.retry] give_up_after` is spent), the session ends at once — the reader
//! does not wait for its next message from the server to notice. The server is made silent for
//! the test: its walsender is stopped (SIGSTOP) after it sent the change, so no keepalive or
//! row ever reaches the reader again. The run must still report the failure and stop; a reader
//! that only notices a dead deliverer when it next hands it something waits for the server
//! forever.

use crate::support;
use crate::support::faults::{self, Running};

use std::path::Path;
use std::time::Duration;

/// Time for the failure to be reported: generous; a reader that waits for the silent server
/// never reports it.
const REPORTED_WITHIN: Duration = Duration::from_secs(60);

/// Stops a process (SIGSTOP) and lets it go on (SIGCONT) when dropped, however the test ends.
struct Stopped(libc::pid_t);

impl Stopped {
    fn new(pid: libc::pid_t) -> Self {
        // SAFETY: kill(2) on a server process of the test's own cluster.
        let r = unsafe { libc::kill(pid, libc::SIGSTOP) };
        assert_eq!(r, 0, "SIGSTOP {pid}: {}", std::io::Error::last_os_error());
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe {
            libc::kill(self.0, libc::SIGCONT);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_delivery_ends_the_session_while_the_server_is_silent() {
    // The batch waits a few seconds before it is written: time to silence the server between
    // the change arriving and its delivery failing.
    let fx = support::users_fixture(
        support::USERS_TABLE,
        "[schedule]\nmax_batch_delay = \"3s\"\n[destination.retry]\ninitial_backoff = \"100ms\"\ngive_up_after = \"1s\"\n",
        None,
    )
    .await;
    fx.run_once();
    fx.set_destination_path(Path::new("/dev/full"));
    let mut run = Running(fx.spawn_run());
    support::wait_until(Duration::from_secs(30), "the run is streaming", || async {
        fx.run_log().contains("streaming")
    })
    .await;

    let c = fx.db.connect().await;
    c.batch_execute("INSERT INTO users (user_id, plan) VALUES ('u1', 'free')")
        .await
        .unwrap();
    let committed = faults::wal_insert_lsn(&c).await;
    // A later transaction (of a table the slot does not follow): once the walsender has read
    // past `committed`, it has decoded the insert's commit and written the change out.
    c.batch_execute("CREATE TABLE later (x int); INSERT INTO later VALUES (1)")
        .await
        .unwrap();
    let walsender: i32 = c
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&fx.slot],
        )
        .await
        .unwrap()
        .get(0);
    support::wait_until(
        Duration::from_secs(30),
        "the walsender sent the change",
        || async {
            c.query_one(
                "SELECT coalesce((sent_lsn - '0/0')::int8, 0) FROM pg_stat_replication WHERE pid = $1",
                &[&walsender],
            )
            .await
            .map(|r| r.get::<_, i64>(0) as u64 > committed)
            .unwrap_or(false)
        },
    )
    .await;
    let _silent = Stopped::new(walsender);

    let status = faults::wait_exit(&mut run, REPORTED_WITHIN)
        .await
        .expect("the destination failure ends the run while the server is silent");
    let log = fx.run_log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("error: delivery failed: gave up after") && log.contains("/dev/full"),
        "{log}"
    );
    assert!(
        log.contains("retrying the batch"),
        "the batch was retried first\n{log}"
    );
}
