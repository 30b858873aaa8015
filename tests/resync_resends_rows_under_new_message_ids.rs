//! Snapshot messageIds belong to one full sync: a destination that deduplicates on messageId
//! takes every row of a new full sync again, and the rows of an interrupted one only once.
//!
//! 1. The first full sync is interrupted (SIGKILL while the destination, a pipe nobody reads
//!    any more, holds it up): some rows are out.
//! 2. The next run restarts it — the same full sync — and re-sends those rows under the same
//!    messageIds.
//! 3. `slotstream resync` and a run: a new full sync, every row under a new messageId.

use crate::support;
use crate::support::faults;

use std::collections::HashMap;
use std::io::BufRead;
use std::process::{Command, Stdio};

use support::{EventOp, LightEvent, users_fixture};

const ROWS: i64 = 3000;
/// Events read from the first full sync before it is killed (far fewer than the table: the
/// pipe's buffer holds ~150).
const READ_BEFORE_KILL: usize = 50;

/// userId → messageId of the snapshot events in `stdout`.
fn snapshot_ids(stdout: &str) -> HashMap<String, String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("events.jsonl");
    std::fs::write(&path, stdout).expect("write events");
    support::read_light_events(&path)
        .into_iter()
        .filter(|e: &LightEvent| e.op == EventOp::Snapshot)
        .map(|e| (e.user_id.expect("userId"), e.message_id))
        .collect()
}

async fn generation(fx: &support::Fixture) -> i64 {
    fx.db
        .connect()
        .await
        .query_one(
            r#"SELECT full_sync_generation FROM "_rudderstack".cdc_checkpoints
                WHERE pipeline = $1"#,
            &[&fx.name],
        )
        .await
        .expect("checkpoint row")
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn resync_resends_rows_under_new_message_ids() {
    let fx = users_fixture(support::USERS_TABLE, "", None).await;
    fx.db
        .connect()
        .await
        .batch_execute(&format!(
            "INSERT INTO users (user_id, email, name, plan)
             SELECT 'u' || g, 'u' || g || '@example.com', 'user ' || g, 'free'
               FROM generate_series(1, {ROWS}) g"
        ))
        .await
        .expect("rows");
    // The same pipeline, writing to stdout.
    let dir = fx.dir.path().join("stdout");
    std::fs::create_dir(&dir).expect("dir");
    let config = fx
        .db
        .write_config(&dir, &fx.name, &fx.role, "pw", "users", "");
    let config = config.to_str().expect("utf-8 path");
    let run_once = || {
        let (code, stdout, stderr) =
            support::run_slotstream(&["run", "--config", config, "--once"]);
        assert_eq!(code, 0, "run --once failed\n{stderr}");
        stdout
    };

    // 1. The first full sync, killed after a few events.
    let mut child = faults::Running(
        Command::new(support::slotstream_bin())
            .args(["run", "--config", config])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn run"),
    );
    let stdout = child.stdout.take().expect("stdout");
    let (first, pipe) = tokio::task::spawn_blocking(move || {
        let mut pipe = std::io::BufReader::new(stdout);
        let lines: Vec<String> = (&mut pipe)
            .lines()
            .take(READ_BEFORE_KILL)
            .map(|l| l.expect("line"))
            .collect();
        (lines, pipe)
    })
    .await
    .expect("reader");
    // The pipe stays open and unread: the full sync stalls until it is killed.
    assert_eq!(fx.full_sync_state().await.as_deref(), Some("running"));
    support::sigkill(&child);
    child.wait().expect("wait for the killed run");
    drop(pipe);
    let interrupted = snapshot_ids(&(first.join("\n") + "\n"));
    assert_eq!(interrupted.len(), READ_BEFORE_KILL);
    assert_eq!(generation(&fx).await, 1);

    // 2. The restart: the same full sync, the same ids for the rows already sent.
    let restarted = snapshot_ids(&run_once());
    assert_eq!(restarted.len() as i64, ROWS);
    for (user, id) in &interrupted {
        assert_eq!(
            restarted.get(user),
            Some(id),
            "{user} was re-sent under another messageId by the restarted full sync"
        );
    }
    assert_eq!(fx.full_sync_state().await.as_deref(), Some("done"));
    assert_eq!(generation(&fx).await, 1, "a restart is not a new full sync");

    // 3. A resync: a new full sync, a new id for every row.
    let (code, out, err) = support::run_slotstream(&["resync", "--config", config]);
    assert_eq!(code, 0, "resync failed\n{out}{err}");
    let resynced = snapshot_ids(&run_once());
    assert_eq!(resynced.len() as i64, ROWS);
    let kept: Vec<&String> = resynced
        .iter()
        .filter(|(user, id)| restarted.get(*user) == Some(*id))
        .map(|(user, _)| user)
        .take(10)
        .collect();
    assert!(
        kept.is_empty(),
        "the resync sent rows under the messageIds of the previous full sync (a deduplicating destination drops them): {kept:?}"
    );
    assert_eq!(generation(&fx).await, 2);

    // Nothing changed since: the next run sends nothing.
    let idle = snapshot_ids(&run_once());
    assert!(idle.is_empty(), "{idle:?}");
}
