//! `_rudderstack.cdc_sync_runs` does not grow forever: a run is deleted once it is older than
//! `[sync] history_retention` or no longer among the newest `history_keep_runs` of its pipeline.
//! Other pipelines' runs are left alone.

use crate::support;

#[tokio::test(flavor = "multi_thread")]
async fn sync_history_keeps_the_newest_runs_within_the_retention() {
    let fx = support::users_fixture(
        support::USERS_TABLE,
        "[sync]\nhistory_retention = \"1h\"\nhistory_keep_runs = 3\n",
        None,
    )
    .await;
    let c = fx.db.connect().await;
    c.batch_execute("INSERT INTO users (user_id, plan) VALUES ('u0', 'free')")
        .await
        .expect("row");
    fx.run_once();
    // Runs from two hours ago: one of this pipeline, one of another.
    c.execute(
        r#"INSERT INTO "_rudderstack".cdc_sync_runs
               (pipeline, kind, status, started_at, finished_at)
           VALUES ($1, 'stream', 'succeeded', now() - interval '2 hours',
                   now() - interval '2 hours'),
                  ('another pipeline', 'stream', 'succeeded', now() - interval '2 hours',
                   now() - interval '2 hours')"#,
        &[&fx.name],
    )
    .await
    .expect("old runs");

    // The first run of each process prunes after its first checkpoint: one old run goes.
    c.batch_execute("INSERT INTO users (user_id, plan) VALUES ('u1', 'free')")
        .await
        .expect("row");
    fx.run_once();
    let old: i64 = c
        .query_one(
            r#"SELECT count(*) FROM "_rudderstack".cdc_sync_runs
                WHERE pipeline = $1 AND started_at < now() - interval '1 hour'"#,
            &[&fx.name],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(old, 0, "a run older than history_retention is kept");

    for i in 2..7 {
        c.execute(
            "INSERT INTO users (user_id, plan) VALUES ($1, 'free')",
            &[&format!("u{i}")],
        )
        .await
        .expect("row");
        fx.run_once();
    }
    let runs: Vec<i64> = c
        .query(
            r#"SELECT events FROM "_rudderstack".cdc_sync_runs WHERE pipeline = $1 ORDER BY id"#,
            &[&fx.name],
        )
        .await
        .expect("runs")
        .iter()
        .map(|r| r.get(0))
        .collect();
    // The newest three: one streamed insert each.
    assert_eq!(runs, [1, 1, 1], "history_keep_runs = 3");
    let other: i64 = c
        .query_one(
            r#"SELECT count(*) FROM "_rudderstack".cdc_sync_runs
                WHERE pipeline = 'another pipeline'"#,
            &[],
        )
        .await
        .expect("other")
        .get(0);
    assert_eq!(other, 1, "another pipeline's history is its own");
}
