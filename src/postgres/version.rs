//! The PostgreSQL versions slotstream supports: 14 and later.
//!
//! What differs between them, and where it is handled:
//! - 14: pgoutput with `messages`, `array_subscript_handler` (`postgres::types`), the legacy
//!   `CREATE_REPLICATION_SLOT … LOGICAL pgoutput EXPORT_SNAPSHOT` syntax only
//!   ([`create_slot_command`]);
//! - 15: the option-list syntax `(SNAPSHOT 'export')`, publication row filters and column lists
//!   (`[mapping] filter` needs 15; `check` reads `pg_publication_tables.rowfilter`/`attnames`
//!   only from 15 on);
//! - 18: a publication may send stored generated columns (`publish_generated_columns`,
//!   `postgres::catalog::Generated`), and generated columns are virtual unless `STORED`.

use tokio_postgres::Client;

use super::{PgError, quote_ident};

/// `server_version_num` of the oldest supported release, PostgreSQL 14.
pub const MIN_SUPPORTED: i32 = 140_000;
/// `server_version_num` of PostgreSQL 15: publication row filters and column lists, and the
/// option-list syntax of `CREATE_REPLICATION_SLOT`.
pub const PG15: i32 = 150_000;
/// `server_version_num` of PostgreSQL 18: publications may send stored generated columns.
pub const PG18: i32 = 180_000;

/// The supported range, as the messages say it.
pub const SUPPORTED_RANGE: &str = "PostgreSQL 14 and later";

/// The server's version: `server_version_num`, and `server_version` up to its first space
/// (`"15.18 (Debian 15.18-0+deb12u1)"` → `"15.18"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerVersion {
    /// `server_version_num`, e.g. 150018.
    pub num: i32,
    /// `server_version` without the vendor suffix, e.g. `15.18`.
    pub text: String,
}

/// Reads the server's version.
pub async fn server_version(client: &Client) -> Result<ServerVersion, PgError> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version'), current_setting('server_version_num')::int4",
            &[],
        )
        .await
        .map_err(|e| PgError::query("reading the server version", e))?;
    let full: String = row.get(0);
    Ok(ServerVersion {
        num: row.get(1),
        text: full
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned(),
    })
}

/// Why a server of version `num` cannot run a pipeline (whose `[mapping] filter` is set when
/// `filter`), or `None` when it can.
pub fn unsupported(num: i32, filter: bool) -> Option<String> {
    if num < MIN_SUPPORTED {
        Some(format!(
            "slotstream supports {SUPPORTED_RANGE} (it needs pgoutput's options and catalogs of 14)"
        ))
    } else if filter && num < PG15 {
        Some(
            "[mapping] filter needs publication row filters, which PostgreSQL 15 introduced".into(),
        )
    } else {
        None
    }
}

/// The replication command that creates a logical pgoutput slot exporting a snapshot, in the
/// syntax the server of version `num` accepts: the option list from 15 on, the legacy keyword
/// (the only form 14 knows) before. `TEMPORARY` follows the slot name in both.
pub fn create_slot_command(slot: &str, temporary: bool, num: i32) -> String {
    let temporary = if temporary { " TEMPORARY" } else { "" };
    let export = if num >= PG15 {
        "(SNAPSHOT 'export')"
    } else {
        "EXPORT_SNAPSHOT"
    };
    format!(
        "CREATE_REPLICATION_SLOT {}{temporary} LOGICAL pgoutput {export}",
        quote_ident(slot)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_creation_uses_the_syntax_of_each_version() {
        assert_eq!(
            create_slot_command("s", false, 140_011),
            "CREATE_REPLICATION_SLOT \"s\" LOGICAL pgoutput EXPORT_SNAPSHOT"
        );
        assert_eq!(
            create_slot_command("s", true, 140_000),
            "CREATE_REPLICATION_SLOT \"s\" TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT"
        );
        assert_eq!(
            create_slot_command("s", false, 150_018),
            "CREATE_REPLICATION_SLOT \"s\" LOGICAL pgoutput (SNAPSHOT 'export')"
        );
        assert_eq!(
            create_slot_command("we\"ird", true, 180_006),
            "CREATE_REPLICATION_SLOT \"we\"\"ird\" TEMPORARY LOGICAL pgoutput (SNAPSHOT 'export')"
        );
    }

    #[test]
    fn servers_before_14_are_refused_and_filters_need_15() {
        assert!(unsupported(130_020, false).is_some_and(|m| m.contains("14 and later")));
        assert!(unsupported(100_000, false).is_some());
        assert_eq!(unsupported(140_000, false), None);
        assert!(unsupported(140_011, true).is_some_and(|m| m.contains("PostgreSQL 15")));
        assert_eq!(unsupported(150_000, true), None);
        assert_eq!(unsupported(180_006, true), None);
    }
}
