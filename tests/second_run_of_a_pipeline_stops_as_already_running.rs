//! One `slotstream run` per pipeline. While one runs, a second `run` (or `run --once`) of the
//! same pipeline exits 1 at once with "already running (pid …)" naming the first process, and
//! does not fight for the slot; `teardown` refuses; `resync` is accepted. The first run keeps
//! the lock across reconnects (every backend of it terminated, or only the lock's session), and
//! the lock goes with the process (SIGTERM, kill -9).

use crate::support;
use crate::support::faults;

use std::time::Duration;

/// The second run stops at once as "already running", naming `pid`.
fn assert_already_running(fx: &support::Fixture, args: &[&str], pid: u32) {
    let (code, stdout, stderr) = fx.slotstream("run", args);
    let dump = format!("run {args:?}: exit {code}\n--- stdout\n{stdout}--- stderr\n{stderr}");
    assert_eq!(code, 1, "{dump}");
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no `error:` line\n{dump}"));
    assert!(
        error.contains("already running") && error.contains(&format!("pid {pid}")),
        "the error names the running process\n{dump}"
    );
    let hint = stderr
        .lines()
        .find(|l| l.starts_with("hint: "))
        .unwrap_or_else(|| panic!("no `hint:` line\n{dump}"));
    assert!(hint.contains("one `slotstream run` per pipeline"), "{dump}");
    assert!(
        !stderr.contains("resuming from the checkpoint"),
        "a second run is not retried\n{dump}"
    );
}

async fn insert(c: &tokio_postgres::Client, user: &str) {
    c.execute(
        "INSERT INTO users (user_id, plan) VALUES ($1, 'free')",
        &[&user],
    )
    .await
    .unwrap();
}

async fn wait_delivered(fx: &support::Fixture, user: &str, child: &mut faults::Running) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !fx.events().iter().any(|e| e["userId"] == user) {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the first run exited ({status})\n{}", fx.run_log());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{user} never arrived\n{}",
            fx.run_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Terminates the pipeline's backends whose application_name matches `pattern` (LIKE).
async fn terminate(c: &tokio_postgres::Client, name: &str, lock_of: Option<u32>) -> i64 {
    // Exact names, not LIKE: the `_` of pipeline names is a LIKE wildcard, and a prefix would
    // reach other tests' pipelines (p_t_1_5 is a prefix of p_t_1_57).
    let plain = format!("slotstream/{name}");
    let lock = match lock_of {
        Some(pid) => format!("slotstream/{name} (pid {pid})"),
        None => format!("slotstream/{name} (pid "),
    };
    c.query_one(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
          WHERE pid <> pg_backend_pid()
            AND (($3 AND application_name = $1) OR starts_with(application_name, $2))",
        &[&plain, &lock, &lock_of.is_none()],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_run_exits_at_once_and_the_first_keeps_the_lock() {
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    let c = fx.db.connect().await;
    insert(&c, "u1").await;
    let mut child = faults::Running(fx.spawn_run());
    let pid = child.id();
    wait_delivered(&fx, "u1", &mut child).await;

    assert_already_running(&fx, &["--once"], pid);
    assert_already_running(&fx, &[], pid);

    // teardown refuses while the pipeline runs; resync is safe.
    let (code, stdout, stderr) = fx.slotstream("teardown", &["--yes"]);
    assert_eq!(code, 1, "teardown while running\n{stdout}{stderr}");
    assert!(stderr.contains("already running"), "{stdout}{stderr}");
    assert_eq!(fx.full_sync_state().await.as_deref(), Some("done"));
    let slots: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&fx.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 1, "teardown dropped the slot of a running pipeline");
    let (code, stdout, stderr) = fx.slotstream("resync", &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains(&format!("pid {pid}")), "{stdout}");
    // Withdrawn again, so that the reconnects below stream rather than sync.
    c.execute(
        r#"UPDATE "_rudderstack".cdc_checkpoints SET resync_requested = false WHERE pipeline = $1"#,
        &[&fx.name],
    )
    .await
    .unwrap();

    // Every session of the first run ends: it reconnects, keeps the lock and streams on.
    let name = &fx.name;
    assert!(terminate(&c, name, None).await >= 3);
    insert(&c, "u2").await;
    wait_delivered(&fx, "u2", &mut child).await;
    assert_already_running(&fx, &["--once"], pid);

    // Only the lock's session ends: the first run takes the lock again.
    // The first run's own lock session (a second run that just gave up may still have one
    // closing).
    assert_eq!(terminate(&c, name, Some(pid)).await, 1);
    insert(&c, "u3").await;
    wait_delivered(&fx, "u3", &mut child).await;
    support::wait_until(Duration::from_secs(30), "the lock is held again", || {
        let c = &c;
        let pattern = format!("slotstream/{name} (pid {pid})");
        async move {
            c.query_one(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                  WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = $1",
                &[&pattern],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
                == 1
        }
    })
    .await;
    assert_already_running(&fx, &["--once"], pid);
    let log = fx.run_log();
    assert!(
        log.contains("the pipeline lock's session ended"),
        "the first run noticed its lock session ending\n{log}"
    );

    // The lock goes with the process.
    support::sigterm(&child);
    let status = faults::wait_exit(&mut child, Duration::from_secs(20)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", fx.run_log());
    fx.run_once();

    let mut killed = faults::Running(fx.spawn_run());
    support::wait_until(
        Duration::from_secs(30),
        "the new run holds the lock",
        || {
            let c = &c;
            let pattern = format!("slotstream/{name} (pid {})", killed.id());
            async move {
                c.query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                    &[&pattern],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
                    == 1
            }
        },
    )
    .await;
    support::sigkill(&killed);
    let _ = faults::wait_exit(&mut killed, Duration::from_secs(10)).await;
    insert(&c, "u4").await;
    fx.run_once();
    assert!(fx.events().iter().any(|e| e["userId"] == "u4"));
}
