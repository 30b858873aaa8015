//! A write that fails halfway (the file-size limit, RLIMIT_FSIZE, makes the kernel accept part
//! of a batch and then refuse with EFBIG — a real fault, no mock) must not leave a partial line
//! behind. When the destination recovers (the limit is lifted while `run` keeps retrying), the
//! batch is written again (retried in place, the session staying up), and every event must come out as a complete,
//! readable line: a retry appended right after partial bytes would glue them to the first
//! resent event and make it unreadable — lost for a consumer although checkpointed.

use crate::support;
use crate::support::faults;

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Retries of the failed batch at least once a second, so the recovery is seen quickly.
const RETRY_FAST: &str = "[destination.retry]\nmax_backoff = \"1s\"\n";

const LATER: usize = 20;

#[tokio::test(flavor = "multi_thread")]
async fn a_half_written_batch_is_rewritten_whole() {
    let fx = support::users_fixture(support::USERS_TABLE, RETRY_FAST, None).await;
    let c = fx.db.connect().await;
    c.batch_execute(
        "INSERT INTO users (user_id, plan) SELECT 'u' || g, 'free' FROM generate_series(1, 10) g",
    )
    .await
    .unwrap();
    fx.run_once();
    let size = std::fs::metadata(&fx.events).unwrap().len();

    // Room for a few hundred more bytes: the next batch is cut in the middle.
    let limit = size + 300;
    let log = std::fs::File::create(fx.dir.path().join("run.log")).unwrap();
    let mut cmd = Command::new(support::slotstream_bin());
    cmd.args(["run", "--config"])
        .arg(&fx.config)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: setrlimit and signal are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let rl = libc::rlimit {
                rlim_cur: limit,
                rlim_max: libc::RLIM_INFINITY,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &rl) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Without this the kernel kills the process (SIGXFSZ) instead of failing the write.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut child = faults::Running(cmd.spawn().unwrap());

    c.batch_execute(&format!(
        "INSERT INTO users (user_id, plan) SELECT 'v' || g, 'free' FROM generate_series(1, {LATER}) g"
    ))
    .await
    .unwrap();
    support::wait_until(Duration::from_secs(30), "a failed delivery", || async {
        fx.run_log().contains("retrying the batch")
    })
    .await;
    // The kernel took the first bytes of the batch (up to the limit), then refused the rest:
    // what was written of the failed batch must be cut off again.
    let text = std::fs::read_to_string(&fx.events).unwrap();
    assert!(
        text.ends_with('\n') && text.len() as u64 == size,
        "after the failed write the file holds {} bytes (before: {size}, limit: {limit}) and ends with {:?}: a partial batch was left behind",
        text.len(),
        &text[text.len().saturating_sub(40)..]
    );

    // The destination recovers.
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit on our own child, with a valid rlimit.
    let rc = unsafe {
        libc::prlimit(
            child.id() as libc::pid_t,
            libc::RLIMIT_FSIZE,
            &unlimited,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());

    let want: BTreeSet<String> = (1..=LATER).map(|i| format!("v{i}")).collect();
    let delivered = || -> BTreeSet<String> {
        fx.events()
            .iter()
            .filter_map(|e| e["userId"].as_str().map(str::to_owned))
            .filter(|u| u.starts_with('v'))
            .collect()
    };
    let wait = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            // Done once the checkpoint covers the batch: nothing will be resent after that.
            let (checkpoint, _) = fx.positions().await;
            let covered = fx
                .events()
                .iter()
                .filter(|e| e["userId"].as_str().is_some_and(|u| u.starts_with('v')))
                .map(faults::event_lsn)
                .max()
                .is_some_and(|l| checkpoint.is_some_and(|c| c > l));
            if covered {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    support::sigterm(&child);
    let status = faults::wait_exit(&mut child, Duration::from_secs(10)).await;
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let log = fx.run_log();
    assert!(
        wait.is_ok(),
        "the batch was never delivered and checkpointed\n{log}"
    );
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{log}");

    let text = std::fs::read_to_string(&fx.events).unwrap();
    let got = delivered();
    let missing: Vec<_> = want.difference(&got).collect();
    let bad: Vec<&str> = text
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_err())
        .collect();
    assert!(
        missing.is_empty(),
        "checkpointed but not readable in the file: {missing:?}\nunreadable lines: {bad:?}\n{log}"
    );
}
