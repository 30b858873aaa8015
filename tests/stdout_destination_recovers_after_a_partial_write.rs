//! Standard output redirected to a file that refuses a write halfway (the file-size limit,
//! RLIMIT_FSIZE: the kernel accepts the first bytes of a batch, then fails with EFBIG — a real
//! fault, no mock). Unlike a file destination, stdout cannot take back what went out; when the
//! destination recovers (the limit is lifted while `run` keeps retrying), the consumer must
//! still see only whole lines: the line that was cut is completed before the batch is sent
//! again, instead of the resent batch being glued to its first bytes.

use crate::support;
use crate::support::faults;

use std::collections::BTreeSet;
use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Retries of the failed batch at least once a second, so the recovery is seen quickly.
const RETRY_FAST: &str = "[destination.retry]\nmax_backoff = \"1s\"\n";

const ROWS: usize = 20;

#[tokio::test(flavor = "multi_thread")]
async fn a_half_written_line_is_completed_before_the_retry() {
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    let c = fx.db.connect().await;
    c.batch_execute(&format!(
        "INSERT INTO users (user_id, plan) SELECT 'u' || g, 'free' FROM generate_series(1, {ROWS}) g"
    ))
    .await
    .expect("rows");
    let dir = fx.dir.path().join("stdout");
    std::fs::create_dir(&dir).expect("dir");
    let config = fx
        .db
        .write_config(&dir, &fx.name, &fx.role, "pw", "users", RETRY_FAST);
    let out_path = dir.join("out.jsonl");
    let out = std::fs::File::create(&out_path).expect("out file");

    // Room for part of the first event only.
    let limit: u64 = 100;
    let mut cmd = Command::new(support::slotstream_bin());
    cmd.args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::from(out))
        // A pipe: the file-size limit would cut a log file too.
        .stderr(Stdio::piped());
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
    let mut child = faults::Running(cmd.spawn().expect("spawn run"));
    let log = Arc::new(Mutex::new(String::new()));
    let stderr = child.stderr.take().expect("stderr");
    let collector = {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = log.lock().expect("log");
                log.push_str(&line);
                log.push('\n');
            }
        })
    };
    let run_log = || log.lock().expect("log").clone();
    let failed = tokio::time::timeout(Duration::from_secs(30), async {
        while !run_log().contains("retrying the batch") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(failed.is_ok(), "no failed delivery:\n{}", run_log());
    let written = std::fs::metadata(&out_path).expect("out").len();
    assert_eq!(written, limit, "the first bytes of the batch went out");

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
    support::wait_until(
        Duration::from_secs(60),
        "the full sync delivered",
        || async { fx.full_sync_state().await.as_deref() == Some("done") },
    )
    .await;
    support::sigterm(&child);
    let status = faults::wait_exit(&mut child, Duration::from_secs(10)).await;
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    collector.join().expect("stderr collector");
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", run_log());

    let text = std::fs::read_to_string(&out_path).expect("out");
    let bad: Vec<&str> = text
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_err())
        .collect();
    assert!(
        bad.is_empty() && text.ends_with('\n'),
        "the consumer got broken lines: {bad:?}\n{}",
        run_log()
    );
    let users: BTreeSet<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|e| e["userId"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(users.len(), ROWS, "every row arrives: {users:?}");
}
