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
    /// The slot is in use by a walsender of this pipeline that the server has not ended yet (a
    /// previous session's, after a reconnect): it is released within `wal_sender_timeout`.
    #[error(
        "replication slot {slot:?} is still held by an earlier session of this pipeline (walsender pid {pid})"
    )]
    SlotBusy {
        /// The slot.
        slot: String,
        /// The walsender's pid.
        pid: i32,
    },
    /// A slot of the configured name exists but slotstream did not create it for this pipeline
    /// (a physical slot, another plugin, another database, another consumer, another
    /// pipeline): slotstream never drops, recreates or reads it.
    #[error("replication slot {slot:?} is not this pipeline's: {owner}")]
    SlotNotOurs {
        /// The slot.
        slot: String,
        /// Whose it is, in words (type, plugin, database, or the process using it).
        owner: String,
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
    /// The server's version cannot run this pipeline (older than 14, or a row filter before 15).
    #[error("PostgreSQL {version} cannot run this pipeline: {reason}")]
    UnsupportedServer {
        /// `server_version`, e.g. `13.16`.
        version: String,
        /// What it lacks.
        reason: String,
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
                Some(code) => crate::postgres::sqlstate_is_retryable(code),
                // A TLS failure of the session comes after a probe of the same server passed
                // (`tls`): a changed certificate or a broken handshake. The next attempt probes
                // again and stops there, fatally, if the configuration is wrong.
                None => e.is_transient() || e.is_tls(),
            },
            SourceError::SlotBusy { .. } => true,
            SourceError::Copy(_) => true,
            SourceError::SlotMissing { .. }
            | SourceError::SlotUnusable { .. }
            | SourceError::SlotNotOurs { .. }
            | SourceError::TableMissing { .. }
            | SourceError::UnsupportedServer { .. }
            | SourceError::UnexpectedReply { .. } => false,
        }
    }

    /// What the operator should do.
    pub fn hint(&self) -> String {
        match self {
            SourceError::SlotMissing { .. } | SourceError::SlotUnusable { .. } => {
                "run `slotstream resync --config FILE` and then `slotstream run`: a full sync rebuilds the destination's state and a new slot is created (with `[sync] ledger` on, `slotstream resync --changed-only` sends only the rows that differ from what was sent, plus Record Deleted for rows gone in mirror mode)".into()
            }
            SourceError::SlotBusy { pid, .. } => format!(
                "slotstream retries until the server ends that session (wal_sender_timeout); if it does not, end it with SELECT pg_terminate_backend({pid});"
            ),
            SourceError::SlotNotOurs { slot, .. } => format!(
                "slotstream never drops or reads a slot it did not create: choose another `[source] slot` for this pipeline, or, if that slot is really unused, drop it yourself (SELECT pg_drop_replication_slot('{}');) and run again",
                slot.replace('\'', "''")
            ),
            SourceError::TableMissing { .. } => {
                "check source.schema and source.table, and GRANT SELECT on the table (sql/setup.sql)".into()
            }
            SourceError::Replication(e) => match sqlstate(e) {
                Some("42501") => "the role needs the REPLICATION attribute: ALTER ROLE <user> WITH REPLICATION; (sql/setup.sql)".into(),
                Some("42704") => "the publication or slot named in the config does not exist: run `slotstream check`".into(),
                Some("55000") => "the server refused logical replication: check wal_level = logical and the slot's state with `slotstream check`".into(),
                Some(c) if c.starts_with("28") => "check source.user, the password and pg_hba.conf (a replication connection needs a matching `host` line for the database)".into(),
                Some(c) if c.starts_with("22") => "the publication's row filter fails on a row, and will on every retry: make `[mapping] filter` valid for every row (e.g. guard a division with NULLIF), set the same filter on the publication (ALTER PUBLICATION … SET TABLE … WHERE (…)), then run again; nothing past the checkpoint was acknowledged".into(),
                Some(c) if !crate::postgres::sqlstate_is_retryable(c) => "this error does not pass by retrying: fix its cause (see the server's message), then run again; `slotstream check` diagnoses most of them".into(),
                None if e.is_tls() => "the replication connection's TLS handshake failed although the same checks passed a moment before; slotstream retries, and if this persists run `slotstream check`".into(),
                _ => "slotstream reconnects by itself on transient failures; if this persists run `slotstream check`".into(),
            },
            SourceError::UnsupportedServer { .. } => format!(
                "upgrade PostgreSQL: slotstream supports {} ([mapping] filter needs 15 or later), or remove [mapping] filter; `slotstream check` lists every requirement",
                crate::postgres::version::SUPPORTED_RANGE
            ),
            SourceError::UnexpectedReply { .. } => "this is a bug or an unsupported server version: report it".into(),
            SourceError::Copy(_) => "the full sync restarts from the beginning on the next attempt".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str) -> SourceError {
        SourceError::Replication(PgWireError::Server(format!(
            "ERROR: something (SQLSTATE {code})"
        )))
    }

    #[test]
    fn replication_errors_are_classified_by_their_sqlstate() {
        for code in [
            "57P01", "57P02", "57P03", "08006", "53300", "40001", "40P01", "55006",
        ] {
            assert!(server(code).is_retryable(), "{code} must be retried");
        }
        for code in [
            "22012", "42501", "42703", "42704", "55000", "58P01", "XX000",
        ] {
            assert!(!server(code).is_retryable(), "{code} must be fatal");
        }
        assert!(server("22012").hint().contains("[mapping] filter"));
        let io = SourceError::Replication(PgWireError::Io(std::sync::Arc::new(
            std::io::Error::from(std::io::ErrorKind::ConnectionReset),
        )));
        assert!(io.is_retryable(), "a lost connection is retried");
        let tls = SourceError::Replication(PgWireError::Tls("bad certificate".into()));
        // The session's own handshake comes after a probe with slotstream's checks passed
        // (`tls`): its failure is retried, and the next attempt's probe stops fatally when the
        // configuration is really wrong.
        assert!(
            tls.is_retryable(),
            "a TLS failure after a passed probe is retried"
        );
    }

    #[test]
    fn a_slot_that_is_not_ours_is_fatal_and_a_busy_one_of_ours_is_retried() {
        let not_ours = SourceError::SlotNotOurs {
            slot: "s".into(),
            owner: "it is a physical slot".into(),
        };
        assert!(!not_ours.is_retryable());
        assert!(not_ours.hint().contains("[source] slot"));
        assert!(not_ours.hint().contains("pg_drop_replication_slot('s')"));
        let busy = SourceError::SlotBusy {
            slot: "s".into(),
            pid: 42,
        };
        assert!(busy.is_retryable());
    }
}
