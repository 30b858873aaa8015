//! Where changes come from: the full sync (`snapshot`, an exported snapshot read with COPY) and
//! the replication stream (`stream`, a walsender session on pgwire-replication, whose TLS
//! `tls` sets up with libpq's semantics).

pub mod snapshot;
pub mod stream;
pub mod tls;

use pgwire_replication::PgWireError;

/// A replication-plane failure.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The walsender connection failed or ended.
    #[error("replication session failed: {0}")]
    Replication(#[from] PgWireError),
    /// The slot this pipeline reads is gone while the full sync is done: changes since the
    /// checkpoint can no longer be read.
    #[error(
        "replication slot {slot:?} does not exist, so the changes since the last checkpoint cannot be read"
    )]
    SlotMissing {
        /// The slot.
        slot: String,
    },
    /// The slot exists but was invalidated (max_slot_wal_keep_size) or belongs elsewhere.
    #[error("replication slot {slot:?} cannot be used: {reason}")]
    SlotUnusable {
        /// The slot.
        slot: String,
        /// Why.
        reason: String,
    },
    /// The slot is in use by another process.
    #[error("replication slot {slot:?} is in use by another process (pid {pid})")]
    SlotBusy {
        /// The slot.
        slot: String,
        /// The walsender's pid.
        pid: i32,
    },
    /// The followed table is not in the database.
    #[error("table {table} does not exist or is not visible to role {user}")]
    TableMissing {
        /// schema.table.
        table: String,
        /// The role.
        user: String,
    },
    /// The server's reply to a replication command was not what the protocol says.
    #[error("unexpected reply to {command}: {detail}")]
    UnexpectedReply {
        /// The command.
        command: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The COPY stream of the full sync broke off or could not be parsed.
    #[error("full sync COPY failed: {0}")]
    Copy(String),
}

/// The SQLSTATE in a pgwire-replication server error message, if any.
pub fn sqlstate(e: &PgWireError) -> Option<&str> {
    match e {
        PgWireError::Server(msg) | PgWireError::Auth(msg) => {
            let at = msg.find("SQLSTATE ")? + "SQLSTATE ".len();
            msg.get(at..at + 5)
        }
        _ => None,
    }
}

impl SourceError {
    /// Whether reconnecting may help.
    pub fn is_retryable(&self) -> bool {
        match self {
            SourceError::Replication(e) => match sqlstate(e) {
                // connection exceptions, resource limits, admin/crash shutdown, object in use
                Some(code) => {
                    code.starts_with("08")
                        || code.starts_with("53")
                        || code.starts_with("57")
                        || code == "55006"
                }
                // A TLS failure of the session comes after a probe of the same server passed
                // (`tls`): a changed certificate or a broken handshake. The next attempt probes
                // again and stops there, fatally, if the configuration is wrong.
                None => e.is_transient() || e.is_tls(),
            },
            SourceError::SlotBusy { .. } => true,
            SourceError::Copy(_) => true,
            SourceError::SlotMissing { .. }
            | SourceError::SlotUnusable { .. }
            | SourceError::TableMissing { .. }
            | SourceError::UnexpectedReply { .. } => false,
        }
    }

    /// What the operator should do.
    pub fn hint(&self) -> String {
        match self {
            SourceError::SlotMissing { .. } | SourceError::SlotUnusable { .. } => {
                "run `slotstream resync --config FILE` and then `slotstream run`: a full sync rebuilds the destination's state and a new slot is created".into()
            }
            SourceError::SlotBusy { .. } => {
                "another slotstream (or another client) is reading this slot: stop it, or give this pipeline its own slot with source.slot".into()
            }
            SourceError::TableMissing { .. } => {
                "check source.schema and source.table, and GRANT SELECT on the table (sql/setup.sql)".into()
            }
            SourceError::Replication(e) => match sqlstate(e) {
                Some("42501") => "the role needs the REPLICATION attribute: ALTER ROLE <user> WITH REPLICATION; (sql/setup.sql)".into(),
                Some("42704") => "the publication or slot named in the config does not exist: run `slotstream check`".into(),
                Some("55000") => "the server refused logical replication: check wal_level = logical and the slot's state with `slotstream check`".into(),
                Some(c) if c.starts_with("28") => "check source.user, the password and pg_hba.conf (a replication connection needs a matching `host` line for the database)".into(),
                None if e.is_tls() => "the replication connection's TLS handshake failed although the same checks passed a moment before; slotstream retries, and if this persists run `slotstream check`".into(),
                _ => "slotstream reconnects by itself on transient failures; if this persists run `slotstream check`".into(),
            },
            SourceError::UnexpectedReply { .. } => "this is a bug or an unsupported server version: report it".into(),
            SourceError::Copy(_) => "the full sync restarts from the beginning on the next attempt".into(),
        }
    }
}
