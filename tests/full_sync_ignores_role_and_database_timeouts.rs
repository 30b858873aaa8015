//! Timeouts set as role or database defaults do not reach slotstream's own sessions, which pin
//! them off: a 1 ms `statement_timeout` on the role, an `idle_in_transaction_session_timeout`
//! on the database shorter than the full sync (the replication session that exported the
//! snapshot idles in a transaction until the COPY ends), an `idle_session_timeout` on the role
//! shorter than the idle stretches of a continuous run (and `transaction_timeout` from
//! PostgreSQL 17). The full sync completes, and a continuous run stays idle past them without a
//! reconnect.

use crate::support;
use crate::support::faults;

use std::time::Duration;

const ROWS: i64 = 5000;

#[tokio::test(flavor = "multi_thread")]
async fn role_and_database_timeouts_break_neither_the_full_sync_nor_the_stream() {
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    let c = fx.db.connect().await;
    c.execute(
        "INSERT INTO users (user_id, plan) SELECT 'u' || g, 'free' FROM generate_series(1, $1::int8) g",
        &[&ROWS],
    )
    .await
    .unwrap();
    let role = &fx.role;
    let db = &fx.db.name;
    c.batch_execute(&format!(
        "ALTER ROLE {role} SET statement_timeout = '1ms';
         ALTER ROLE {role} SET idle_session_timeout = '200ms';
         ALTER DATABASE {db} SET idle_in_transaction_session_timeout = '10ms'"
    ))
    .await
    .unwrap();
    let version: i32 = c
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    if version >= 170000 {
        c.batch_execute(&format!(
            "ALTER ROLE {role} SET transaction_timeout = '10ms'"
        ))
        .await
        .unwrap();
    }

    let (code, stdout, stderr) = fx.slotstream("run", &["--once"]);
    let dump = format!("exit {code}\n--- stdout\n{stdout}--- stderr\n{stderr}");
    assert_eq!(code, 0, "{dump}");
    assert!(!stderr.contains("resuming from the checkpoint"), "{dump}");
    assert_eq!(fx.event_lines(), ROWS as usize, "{dump}");

    // A continuous run, idle well past idle_session_timeout, then a change.
    let mut child = faults::Running(fx.spawn_run());
    let name = &fx.name;
    support::wait_until(
        Duration::from_secs(30),
        "the run's sessions idle past idle_session_timeout",
        || {
            let c = &c;
            let plain = format!("slotstream/{name}");
            let lock = format!("slotstream/{name} (pid ");
            async move {
                c.query_one(
                    "SELECT count(*) FILTER (WHERE state = 'idle'
                                               AND state_change < now() - interval '1 second')
                       FROM pg_stat_activity
                      WHERE application_name = $1 OR starts_with(application_name, $2)",
                    &[&plain, &lock],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
                    >= 2
            }
        },
    )
    .await;
    c.batch_execute("INSERT INTO users (user_id, plan) VALUES ('late', 'pro')")
        .await
        .unwrap();
    support::wait_until(Duration::from_secs(30), "the late change", || async {
        fx.events_tail_contains("\"late\"", 4096)
    })
    .await;
    assert!(child.try_wait().unwrap().is_none(), "{}", fx.run_log());
    support::sigterm(&child);
    let status = faults::wait_exit(&mut child, Duration::from_secs(20)).await;
    let log = fx.run_log();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{log}");
    assert!(
        !log.contains("resuming from the checkpoint") && !log.contains("lock's session ended"),
        "no session was ended by a timeout\n{log}"
    );
}
