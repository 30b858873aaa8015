//! The replication plane: the walsender session on `pgwire-replication`, and the slot.
//!
//! Protocol facts this module relies on (PostgreSQL 15, pgoutput proto v1):
//! - `START_REPLICATION SLOT s LOGICAL X` sends every transaction whose commit record lies at or
//!   after `max(X, confirmed_flush_lsn)`, whole and in commit order, each as Begin, its changes,
//!   Commit. Starting at the `end_lsn` of the last transaction delivered therefore resends
//!   nothing delivered and skips nothing committed after it.
//! - The slot's `confirmed_flush_lsn` moves only when slotstream reports a position
//!   (`update_applied_lsn`), and slotstream reports only checkpointed positions: the server keeps
//!   every WAL segment needed to resend what is not yet checkpointed.
//! - A keepalive's `wal_end` received outside a transaction means: every transaction that
//!   committed before it has been sent. Acknowledging it when nothing is pending lets an idle
//!   table's slot follow the WAL that other tables write (invariant 2).
//! - `CREATE_REPLICATION_SLOT … LOGICAL pgoutput (SNAPSHOT 'export')` on a gated session returns
//!   the slot's consistent point and a snapshot name that stays importable until that session
//!   runs its next command; a transaction that imports it sees exactly the rows committed before
//!   the consistent point, and `START_REPLICATION … 0/0` then streams exactly the commits after.
//!
//! The session pins `DateStyle=ISO`, `TimeZone=UTC`, `IntervalStyle=postgres`,
//! `extra_float_digits=3` through the startup options, so text cells decode deterministically.

use pgwire_replication::{ReplicationClient, ReplicationConfig, TlsConfig};
use secrecy::ExposeSecret;
use tokio_postgres::Client;
use tokio_postgres::types::PgLsn;

use super::SourceError;
use crate::Lsn;
use crate::config::{SourceConfig, SslMode};
use crate::postgres::{PgError, SESSION_OPTIONS, quote_ident};

/// How often the session reports the acknowledged position to the server, at most.
const STATUS_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Builds the walsender session's configuration. `buffer_events`: how many messages the
/// session buffers ahead of the reader (its share of the memory limit: the buffer is counted in
/// messages, not bytes).
pub fn replication_config(
    source: &SourceConfig,
    pipeline: &str,
    start_lsn: Lsn,
    ack_lsn: Lsn,
    buffer_events: usize,
) -> ReplicationConfig {
    let password = source
        .password
        .as_ref()
        .map(|p| p.expose_secret().to_owned())
        .unwrap_or_default();
    let tls = match source.sslmode {
        SslMode::Disable => TlsConfig::disabled(),
        SslMode::Prefer => TlsConfig {
            mode: pgwire_replication::SslMode::Prefer,
            ..TlsConfig::default()
        },
        SslMode::Require => TlsConfig::require(),
        SslMode::VerifyCa => TlsConfig::verify_ca(source.sslrootcert.clone()),
        SslMode::VerifyFull => TlsConfig::verify_full(source.sslrootcert.clone()),
    };
    let tls = if source.host.starts_with('/') {
        TlsConfig::disabled()
    } else {
        tls
    };
    ReplicationConfig::new(
        source.host.clone(),
        source.user.clone(),
        password,
        source.database.clone(),
        source.slot.clone(),
        source.publication.clone(),
    )
    .with_port(source.port)
    .with_tls(tls)
    .with_start_lsn(start_lsn)
    .with_ack_lsn(ack_lsn)
    .with_options(SESSION_OPTIONS)
    .with_application_name(format!("slotstream/{pipeline}"))
    // Standby status updates at most this often. Short, because two waits depend on it: the
    // final acknowledgement before a session closes (`--once` waits for it to be sent), and the
    // walsender's next keepalive after a ping, which it sends only once we replied; each
    // update is one small message.
    .with_status_interval(STATUS_INTERVAL)
    .with_wakeup_interval(std::time::Duration::from_secs(5))
    // While this buffer is full the session's worker stops reading the socket but keeps
    // sending status updates every `status_interval`, so the server's wal_sender_timeout does
    // not end a session whose reader waits for memory.
    .with_buffer_size(buffer_events.max(1))
}

/// What `pg_replication_slots` says of the pipeline's slot.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    /// `logical` or `physical`.
    pub slot_type: String,
    /// Output plugin.
    pub plugin: Option<String>,
    /// Database of a logical slot.
    pub database: Option<String>,
    /// pid of the walsender using it, if any.
    pub active_pid: Option<i32>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Position the server may discard WAL before.
    pub confirmed_flush_lsn: Option<Lsn>,
}

/// Reads the slot's row, if it exists.
pub async fn slot_info(client: &Client, slot: &str) -> Result<Option<SlotInfo>, PgError> {
    let row = client
        .query_opt(
            "SELECT slot_type, plugin::text, database::text, active_pid, wal_status,
                    confirmed_flush_lsn
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| PgError::query("reading pg_replication_slots", e))?;
    Ok(row.map(|r| SlotInfo {
        slot_type: r.get(0),
        plugin: r.get(1),
        database: r.get(2),
        active_pid: r.get(3),
        wal_status: r.get(4),
        confirmed_flush_lsn: r
            .get::<_, Option<PgLsn>>(5)
            .map(|l| Lsn::from_u64(u64::from(l))),
    }))
}

/// Checks that an existing slot can carry this pipeline's stream.
pub fn check_slot(slot: &str, info: &SlotInfo, database: &str) -> Result<(), SourceError> {
    let unusable = |reason: String| SourceError::SlotUnusable {
        slot: slot.to_owned(),
        reason,
    };
    if info.slot_type != "logical" {
        return Err(unusable(format!("it is a {} slot", info.slot_type)));
    }
    if info.plugin.as_deref() != Some("pgoutput") {
        return Err(unusable(format!(
            "its output plugin is {:?}, not pgoutput",
            info.plugin.as_deref().unwrap_or("none")
        )));
    }
    if info.database.as_deref() != Some(database) {
        return Err(unusable(format!(
            "it belongs to database {:?}",
            info.database.as_deref().unwrap_or("none")
        )));
    }
    if info.wal_status.as_deref() == Some("lost") {
        return Err(unusable(
            "the server removed WAL it still needed (wal_status = lost, see max_slot_wal_keep_size)"
                .into(),
        ));
    }
    if let Some(pid) = info.active_pid {
        return Err(SourceError::SlotBusy {
            slot: slot.to_owned(),
            pid,
        });
    }
    Ok(())
}

/// Drops the slot (it must be inactive).
pub async fn drop_slot(client: &Client, slot: &str) -> Result<(), PgError> {
    client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
              WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| PgError::query(format!("dropping replication slot {slot}"), e))?;
    Ok(())
}

/// A slot just created with an exported snapshot, on a gated session that has not started
/// streaming yet.
pub struct ExportedSlot {
    /// The gated session: call `start()` once the snapshot has been read.
    pub session: ReplicationClient,
    /// The slot's consistent point: the snapshot holds every commit before it, the stream every
    /// commit from it.
    pub consistent_point: Lsn,
    /// The snapshot name for `SET TRANSACTION SNAPSHOT`.
    pub snapshot_name: String,
}

/// Creates the slot with an exported snapshot on a gated replication session.
pub async fn create_slot_with_snapshot(
    config: ReplicationConfig,
    slot: &str,
) -> Result<ExportedSlot, SourceError> {
    create_with_snapshot(config, slot, false).await
}

/// Creates a `TEMPORARY` slot with an exported snapshot: a snapshot tied to a WAL position
/// (the consistent point) while the pipeline's own slot stays. The server drops the slot when
/// the session ends, however it ends.
pub async fn create_temporary_slot_with_snapshot(
    config: ReplicationConfig,
    slot: &str,
) -> Result<ExportedSlot, SourceError> {
    create_with_snapshot(config, slot, true).await
}

/// The name of the temporary slot that exports a full sync's snapshot for `slot`.
pub fn snapshot_slot_name(slot: &str) -> String {
    const SUFFIX: &str = "_snapshot";
    let mut base = slot.to_owned();
    while base.len() + SUFFIX.len() > 63 {
        base.pop();
    }
    format!("{base}{SUFFIX}")
}

/// Waits (up to `timeout`) until no process holds `slot`: a walsender releases its slot shortly
/// after its session ends, and acquiring it before that fails.
pub async fn wait_until_released(
    client: &Client,
    slot: &str,
    timeout: std::time::Duration,
) -> Result<(), PgError> {
    let deadline = tokio::time::Instant::now() + timeout;
    while let Some(info) = slot_info(client, slot).await? {
        if info.active_pid.is_none() || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn create_with_snapshot(
    config: ReplicationConfig,
    slot: &str,
    temporary: bool,
) -> Result<ExportedSlot, SourceError> {
    let mut session = ReplicationClient::connect_gated(config).await?;
    let rows = session
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {}{} LOGICAL pgoutput (SNAPSHOT 'export')",
            quote_ident(slot),
            if temporary { " TEMPORARY" } else { "" }
        ))
        .await?;
    let bad = |detail: &str| SourceError::UnexpectedReply {
        command: "CREATE_REPLICATION_SLOT",
        detail: detail.to_owned(),
    };
    let row = rows.first().ok_or_else(|| bad("no row"))?;
    let text = |i: usize| -> Result<String, SourceError> {
        row.get(i)
            .and_then(|c| c.as_ref())
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .ok_or_else(|| bad("missing column"))
    };
    let consistent_point = Lsn::parse(&text(1)?).map_err(|e| bad(&e.to_string()))?;
    let snapshot_name = text(2)?;
    Ok(ExportedSlot {
        session,
        consistent_point,
        snapshot_name,
    })
}

/// The server's current WAL insert position (the `--once` target). Not `pg_current_wal_lsn()`,
/// the *write* position: a commit made with `synchronous_commit = off` returns before its WAL is
/// written, so the write position can lie before commits that already happened.
pub async fn current_wal_lsn(client: &Client) -> Result<Lsn, PgError> {
    let lsn: PgLsn = client
        .query_one("SELECT pg_current_wal_insert_lsn()", &[])
        .await
        .map_err(|e| PgError::query("reading pg_current_wal_insert_lsn()", e))?
        .get(0);
    Ok(Lsn::from_u64(u64::from(lsn)))
}
