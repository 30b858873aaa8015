//! The replication plane: the walsender session on `pgwire-replication`, and the slot.
//!
//! Protocol facts this module relies on (PostgreSQL 14 and later, pgoutput proto v1):
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
//! - `CREATE_REPLICATION_SLOT … LOGICAL pgoutput (SNAPSHOT 'export')` (14: `… EXPORT_SNAPSHOT`,
//!   see [`version::create_slot_command`]) on a gated session returns
//!   the slot's consistent point and a snapshot name that stays importable until that session
//!   runs its next command; a transaction that imports it sees exactly the rows committed before
//!   the consistent point, and `START_REPLICATION … 0/0` then streams exactly the commits after.
//!
//! The session pins `DateStyle=ISO`, `TimeZone=UTC`, `IntervalStyle=postgres`,
//! `extra_float_digits=3` through the startup options, so text cells decode deterministically,
//! and the same timeouts as the control connections (`SESSION_OPTIONS`): the session that
//! exported a full sync's snapshot idles in a transaction until the COPY has ended, and a
//! role's `idle_in_transaction_session_timeout` (or, from PostgreSQL 17, `transaction_timeout`)
//! would end it mid-sync.
//!
//! Ownership: slotstream creates the pipeline's slot and may drop and create it again only
//! while it is provably this pipeline's, a `pgoutput` logical slot of this database that no
//! other process holds ([`check_slot`]). Any other slot of the configured name (physical,
//! another plugin, another database, held by another consumer) is left alone with an error.

use pgwire_replication::{ReplicationClient, ReplicationConfig};
use secrecy::ExposeSecret;
use tokio_postgres::Client;
use tokio_postgres::types::PgLsn;

use super::SourceError;
use crate::Lsn;
use crate::config::SourceConfig;
use crate::postgres::{PgError, SESSION_OPTIONS, UNSET_NEWER_TIMEOUTS, version};

/// How often the session reports the acknowledged position to the server, at most.
const STATUS_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Builds the walsender session's configuration. With an sslmode that requires TLS this
/// probes the server first (`source::tls`): a TLS configuration error is returned here, fatal.
/// `buffer_events`: how many messages the session buffers ahead of the reader (its share of
/// the memory limit: the buffer is counted in messages, not bytes).
pub async fn replication_config(
    source: &SourceConfig,
    pipeline: &str,
    start_lsn: Lsn,
    ack_lsn: Lsn,
    buffer_events: usize,
) -> Result<ReplicationConfig, PgError> {
    let password = source
        .password
        .as_ref()
        .map(|p| p.expose_secret().to_owned())
        .unwrap_or_default();
    let tls = super::tls::session_tls(source).await?;
    Ok(ReplicationConfig::new(
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
    .with_application_name(application_name(pipeline))
    // Standby status updates at most this often. Short, because two waits depend on it: the
    // final acknowledgement before a session closes (`--once` waits for it to be sent), and the
    // walsender's next keepalive after a ping, which it sends only once we replied; each
    // update is one small message.
    .with_status_interval(STATUS_INTERVAL)
    .with_wakeup_interval(std::time::Duration::from_secs(5))
    // While this buffer is full the session's worker stops reading the socket but keeps
    // sending status updates every `status_interval`, so the server's wal_sender_timeout does
    // not end a session whose reader waits for memory.
    .with_buffer_size(buffer_events.max(1)))
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
    /// Why the server invalidated the slot (PostgreSQL 17+), if it did.
    pub invalidation_reason: Option<String>,
    /// `application_name` of the process using it, if any.
    pub active_application: Option<String>,
    /// Where that process connects from (an address, or `local socket`), if visible.
    pub active_client: Option<String>,
}

impl SlotInfo {
    /// Whether the slot can no longer stream because the server invalidated it.
    pub fn is_invalidated(&self) -> bool {
        self.wal_status.as_deref() == Some("lost") || self.invalidation_reason.is_some()
    }
}

/// Reads the slot's row, if it exists.
pub async fn slot_info(client: &Client, slot: &str) -> Result<Option<SlotInfo>, PgError> {
    let row = client
        .query_opt(
            // `invalidation_reason` exists from PostgreSQL 17: read through to_jsonb, it is
            // NULL on servers without it.
            "SELECT s.slot_type, s.plugin::text, s.database::text, s.active_pid, s.wal_status,
                    s.confirmed_flush_lsn, to_jsonb(s) ->> 'invalidation_reason',
                    a.application_name::text,
                    CASE WHEN a.client_addr IS NOT NULL THEN host(a.client_addr)
                         WHEN a.pid IS NOT NULL AND a.client_port = -1 THEN 'local socket' END
               FROM pg_replication_slots s LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid
              WHERE s.slot_name = $1",
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
        invalidation_reason: r.get(6),
        active_application: r.get(7),
        active_client: r.get(8),
    }))
}

/// The `application_name` of this pipeline's walsenders.
pub fn application_name(pipeline: &str) -> String {
    format!("slotstream/{pipeline}")
}

/// Checks that an existing slot is this pipeline's and can carry its stream.
///
/// - `SlotNotOurs` (fatal): a physical slot, another plugin, another database, or a slot held by
///   a process that is not one of this pipeline's walsenders. slotstream never drops, recreates
///   or reads such a slot.
/// - `SlotBusy` (retried): held by a walsender of this pipeline that the server has not ended
///   yet (the caller holds the pipeline lock, so it is an earlier session's).
/// - `SlotUnusable` (fatal for the stream): ours, but invalidated by the server; only a full
///   sync may drop it and create it again.
pub fn check_slot(
    slot: &str,
    info: &SlotInfo,
    database: &str,
    pipeline: &str,
) -> Result<(), SourceError> {
    let not_ours = |owner: String| SourceError::SlotNotOurs {
        slot: slot.to_owned(),
        owner,
    };
    if info.slot_type != "logical" {
        return Err(not_ours(format!(
            "it is a {} slot (a standby or a backup tool's), not a logical one",
            info.slot_type
        )));
    }
    if info.plugin.as_deref() != Some("pgoutput") {
        return Err(not_ours(format!(
            "it is a logical slot of the output plugin {}, not pgoutput",
            info.plugin.as_deref().unwrap_or("(none)")
        )));
    }
    if info.database.as_deref() != Some(database) {
        return Err(not_ours(format!(
            "it belongs to database {:?}, not {database:?}",
            info.database.as_deref().unwrap_or("(none)")
        )));
    }
    if let Some(pid) = info.active_pid {
        if info.active_application.as_deref() == Some(application_name(pipeline).as_str()) {
            return Err(SourceError::SlotBusy {
                slot: slot.to_owned(),
                pid,
            });
        }
        let mut by = format!("it is in use by process {pid}");
        match &info.active_application {
            Some(app) if !app.is_empty() => by.push_str(&format!(" (application_name {app:?}")),
            _ => by.push_str(" (no application_name"),
        }
        if let Some(client) = &info.active_client {
            by.push_str(&format!(", from {client}"));
        }
        by.push(')');
        return Err(not_ours(by));
    }
    if info.is_invalidated() {
        let why = match &info.invalidation_reason {
            Some(reason) => format!("the server invalidated it ({reason})"),
            None => "the server removed WAL it still needed (wal_status = lost, see max_slot_wal_keep_size)".into(),
        };
        return Err(SourceError::SlotUnusable {
            slot: slot.to_owned(),
            reason: why,
        });
    }
    Ok(())
}

/// Drops the slot, only if it is still a `pgoutput` logical slot of this database that no
/// process holds (what [`check_slot`] found before); returns whether it did.
pub async fn drop_slot(client: &Client, slot: &str) -> Result<bool, PgError> {
    let dropped = client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
              WHERE slot_name = $1 AND slot_type = 'logical' AND plugin = 'pgoutput'
                AND database = current_database() AND NOT active",
            &[&slot],
        )
        .await
        .map_err(|e| PgError::query(format!("dropping replication slot {slot}"), e))?;
    Ok(dropped > 0)
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
    // The walsender answers SHOW too: the version decides the command's syntax.
    let rows = session.simple_query("SHOW server_version_num").await?;
    let version = rows
        .first()
        .and_then(|r| r.first())
        .and_then(|c| c.as_ref())
        .and_then(|b| std::str::from_utf8(b).ok())
        .and_then(|t| t.trim().parse::<i32>().ok())
        .ok_or_else(|| SourceError::UnexpectedReply {
            command: "SHOW server_version_num",
            detail: "no version number".into(),
        })?;
    // This session idles in the snapshot's transaction until the COPY has ended.
    session.simple_query(UNSET_NEWER_TIMEOUTS).await?;
    let rows = session
        .simple_query(&version::create_slot_command(slot, temporary, version))
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
