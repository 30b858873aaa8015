//! The control plane: a `tokio-postgres` connection for catalog queries, COPY, the state tables
//! and lag; never the walsender (that is `source::stream`, on `pgwire-replication`).
//!
//! Every control connection pins the same session settings as the replication session
//! (`DateStyle=ISO`, `TimeZone=UTC`, `IntervalStyle=postgres`, `extra_float_digits=3`), so text
//! values read by COPY or preview render exactly as pgoutput renders them (docs/architecture.md §7). Both
//! also pin the settings a role or database default could use to break slotstream's own work:
//! no statement or idle-in-transaction timeout (a full sync is one long COPY in one long
//! transaction, and the replication session that exported its snapshot idles in a transaction
//! until the COPY ends), and `synchronous_commit = on` (a checkpoint is acknowledged to the slot
//! only once its commit is durable). Startup options beat `ALTER ROLE/DATABASE … SET`.
//!
//! Errors carry the server's SQLSTATE; [`sqlstate_is_retryable`] is the one table that decides
//! whether an error may pass by itself (a restart, a lost connection, a deadlock) or will come
//! back until an operator acts (a permission, a bad filter, a missing column).

pub mod catalog;
pub mod ledger;
pub mod lock;
pub mod preflight;
pub mod state;
pub mod tls;
pub mod types;
pub mod version;

use std::time::Duration;

use secrecy::ExposeSecret;
use tokio_postgres::error::SqlState;

use crate::config::{SourceConfig, SslMode};

/// The startup `options` of every session slotstream opens (control and replication): the
/// settings text output depends on, and the timeouts and durability its own work needs, whatever
/// the role's or the database's defaults. Every one of them exists on every PostgreSQL version
/// `check` may meet (an unknown name in the startup options refuses the connection).
pub const SESSION_OPTIONS: &str = "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=postgres \
     -c extra_float_digits=3 -c statement_timeout=0 -c idle_in_transaction_session_timeout=0 \
     -c synchronous_commit=on";

/// Turns off, for this session, the timeouts that only newer servers have
/// (`idle_session_timeout`, PostgreSQL 14; `transaction_timeout`, 17), where the server has them:
/// a name the server does not know cannot go into the startup options. Run once per session,
/// also on the replication session before it exports a snapshot.
pub const UNSET_NEWER_TIMEOUTS: &str = "SELECT set_config(name, '0', false) FROM pg_settings \
     WHERE name IN ('idle_session_timeout', 'transaction_timeout')";

/// Whether an error with this SQLSTATE may pass without an operator acting, so that retrying
/// the same work later can succeed. Everything not listed is deterministic: the same statement
/// fails the same way until someone changes the data, the config, a grant or the schema
/// (class 22 data exception such as a division by zero in a row filter, 42 syntax error or
/// access rule violation such as a permission or a missing column, 23 integrity, 28
/// authorization, 3D missing database, 55000 wrong object state, 58P01 missing file, XX internal).
pub fn sqlstate_is_retryable(code: &str) -> bool {
    match code {
        // Serialization failure, deadlock, statement completion unknown, plain rollback.
        "40000" | "40001" | "40003" | "40P01" => true,
        // Object in use (a slot still held by a session the server is ending), lock not available.
        "55006" | "55P03" => true,
        // Operator intervention, except a dropped database: admin or crash shutdown, cannot
        // connect now (starting up, recovering), query canceled, idle session timeout.
        "57P04" => false,
        _ if code.starts_with("57") => true,
        // Connection exceptions; insufficient resources (disk full, out of memory, too many
        // connections, configuration limits such as max_replication_slots).
        _ if code.starts_with("08") || code.starts_with("53") => true,
        // System error, I/O error on the server.
        "58000" | "58030" => true,
        _ => false,
    }
}

/// A control-plane failure, with enough context to tell the operator what to do.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The connection could not be opened or was refused.
    #[error("cannot connect to PostgreSQL at {target} as {user}: {detail}")]
    Connect {
        /// host:port or socket directory.
        target: String,
        /// The role.
        user: String,
        /// The server's or the network's words.
        detail: String,
        /// The SQLSTATE, if the server answered.
        code: Option<SqlState>,
    },
    /// TLS could not be set up as configured: fatal, reconnecting cannot fix it.
    #[error("cannot set up TLS ({mode}): {detail}")]
    Tls {
        /// The configured sslmode.
        mode: &'static str,
        /// Why, for the hint.
        cause: tls::TlsCause,
        /// What went wrong, in words.
        detail: String,
    },
    /// A statement failed.
    #[error("{what} failed: {detail}")]
    Query {
        /// What slotstream was doing, in words.
        what: String,
        /// The server's message.
        detail: String,
        /// The SQLSTATE, if the server answered.
        code: Option<SqlState>,
    },
}

/// A server error as its message (and detail), or the client error.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = db.message().to_owned();
            if let Some(d) = db.detail() {
                s.push_str(" (");
                s.push_str(d);
                s.push(')');
            }
            s
        }
        None => {
            // The Display of a client-side error is short ("error connecting to server");
            // the cause carries the useful part (connection refused, timed out, …).
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                s.push_str(": ");
                s.push_str(&cause.to_string());
                source = cause.source();
            }
            s
        }
    }
}

impl PgError {
    /// Wraps a failed statement with what slotstream was doing.
    pub fn query(what: impl Into<String>, e: tokio_postgres::Error) -> Self {
        PgError::Query {
            what: what.into(),
            detail: describe(&e),
            code: e.code().cloned(),
        }
    }

    /// The SQLSTATE the server gave, if any.
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            PgError::Connect { code, .. } | PgError::Query { code, .. } => code.as_ref(),
            PgError::Tls { .. } => None,
        }
    }

    /// Whether retrying may help: the server's SQLSTATE decides ([`sqlstate_is_retryable`]);
    /// without one the connection itself failed (network, server gone), which may pass, except
    /// a TLS setup error.
    pub fn is_retryable(&self) -> bool {
        match self.code() {
            None => !matches!(self, PgError::Tls { .. }),
            Some(code) => sqlstate_is_retryable(code.code()),
        }
    }

    /// The operator's next step.
    pub fn hint(&self) -> String {
        let code = self.code().map(SqlState::code).unwrap_or("");
        match (self, code) {
            (PgError::Tls { cause, .. }, _) => cause.hint().into(),
            (_, "28P01") | (_, "28000") => {
                "check source.user and the password (password_env / password_file / password), and pg_hba.conf on the server".into()
            }
            (_, "3D000") => "check source.database: that database does not exist".into(),
            (_, "42501") => {
                "grant the missing privilege: sql/setup.sql has every GRANT slotstream needs".into()
            }
            (_, "53300") => {
                "the server has no free connection slot: raise max_connections or close idle sessions".into()
            }
            (PgError::Connect { .. }, _) => {
                "check that PostgreSQL is running and that source.host and source.port point at it".into()
            }
            (_, c) if c.starts_with("22") => {
                "the server cannot evaluate an expression on some row, and will not on a retry: if the message is about `[mapping] filter` (it is evaluated on every row of the full sync), make it valid for every row (e.g. guard a division with NULLIF) in the config and in the publication's row filter, then run again; nothing past the checkpoint was acknowledged".into()
            }
            (_, "42703" | "42P01" | "42883" | "42P02" | "42601") => {
                "the statement names a column, table or function the server does not know: check `[mapping] filter` and the selected columns against the table, and run `slotstream check`".into()
            }
            (_, c) if !c.is_empty() && !sqlstate_is_retryable(c) => {
                "this error does not pass by retrying: fix its cause (see the server's message), then run again; `slotstream check` diagnoses most of them".into()
            }
            _ => "see the server's message above; run `slotstream check` for a full diagnosis".into(),
        }
    }
}

/// A human-readable "where" for messages: `host:port` or the socket path.
pub fn target(source: &SourceConfig) -> String {
    if source.host.starts_with('/') {
        format!("{}/.s.PGSQL.{}", source.host, source.port)
    } else {
        format!("{}:{}", source.host, source.port)
    }
}

/// Builds the tokio-postgres config for the control plane.
fn pg_config(source: &SourceConfig, application_name: &str) -> tokio_postgres::Config {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&source.host)
        .port(source.port)
        .dbname(&source.database)
        .user(&source.user)
        .application_name(application_name)
        .options(SESSION_OPTIONS)
        .connect_timeout(Duration::from_secs(10))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30));
    if let Some(pw) = &source.password {
        cfg.password(pw.expose_secret().as_bytes());
    }
    cfg.ssl_mode(match source.sslmode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            tokio_postgres::config::SslMode::Require
        }
    });
    cfg
}

/// An open control connection: the client, and whether TLS is in use.
pub struct Connection {
    /// The client; its connection task runs on the tokio runtime until the client is dropped.
    pub client: tokio_postgres::Client,
    /// Whether the session is encrypted.
    pub tls: bool,
}

/// Opens a control-plane connection as configured (TLS per `sslmode`), with the pinned session
/// settings and `application_name = slotstream/<pipeline>`.
pub async fn connect(source: &SourceConfig, pipeline: &str) -> Result<Connection, PgError> {
    let cfg = pg_config(source, &format!("slotstream/{pipeline}"));
    let connect_err = |e: tokio_postgres::Error| {
        tls::control_failure(source, &e).unwrap_or_else(|| PgError::Connect {
            target: target(source),
            user: source.user.clone(),
            detail: describe(&e),
            code: e.code().cloned(),
        })
    };
    if source.sslmode == SslMode::Disable || source.host.starts_with('/') {
        let (client, connection) = cfg
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(connect_err)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "control connection closed");
            }
        });
        unset_newer_timeouts(&client).await?;
        return Ok(Connection { client, tls: false });
    }
    let tls = tls::make_connector(source)?;
    let (client, connection) = cfg.connect(tls).await.map_err(connect_err)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "control connection closed");
        }
    });
    unset_newer_timeouts(&client).await?;
    // tokio-postgres does not say whether `prefer` ended up encrypted; ask the server.
    let encrypted = client
        .query_one(
            "SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)",
            &[],
        )
        .await
        .map(|row| row.get::<_, bool>(0))
        .unwrap_or(false);
    Ok(Connection {
        client,
        tls: encrypted,
    })
}

async fn unset_newer_timeouts(client: &tokio_postgres::Client) -> Result<(), PgError> {
    client
        .batch_execute(UNSET_NEWER_TIMEOUTS)
        .await
        .map_err(|e| PgError::query("turning off the session's idle and transaction timeouts", e))
}

/// Quotes an identifier for SQL: `"` doubled, wrapped in `"`. Every identifier slotstream
/// puts into SQL text goes through here (or `quote_qualified`).
pub fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// `"schema"."table"`, each part quoted.
pub fn quote_qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

/// Quotes a string literal for SQL (standard_conforming_strings on): `'` doubled.
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_with_doubled_quotes() {
        assert_eq!(quote_ident("users"), "\"users\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(
            quote_qualified("My Schema", "select"),
            "\"My Schema\".\"select\""
        );
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn sqlstates_that_pass_by_themselves_are_retried_and_the_rest_are_fatal() {
        let retried = [
            ("08000", "connection exception"),
            ("08006", "connection failure"),
            ("08P01", "protocol violation"),
            ("40000", "transaction rollback"),
            ("40001", "serialization failure"),
            ("40003", "statement completion unknown"),
            ("40P01", "deadlock detected"),
            ("53000", "insufficient resources"),
            ("53100", "disk full"),
            ("53200", "out of memory"),
            ("53300", "too many connections"),
            (
                "53400",
                "configuration limit exceeded (max_replication_slots)",
            ),
            ("55006", "object in use (slot still active)"),
            ("55P03", "lock not available"),
            ("57000", "operator intervention"),
            ("57014", "query canceled"),
            ("57P01", "admin shutdown"),
            ("57P02", "crash shutdown"),
            ("57P03", "cannot connect now"),
            ("57P05", "idle session timeout"),
            ("58000", "system error"),
            ("58030", "I/O error"),
        ];
        let fatal = [
            ("0A000", "feature not supported"),
            ("22000", "data exception"),
            ("22012", "division by zero"),
            ("22P02", "invalid text representation"),
            ("23505", "unique violation"),
            ("25006", "read-only transaction"),
            ("28000", "invalid authorization"),
            ("28P01", "invalid password"),
            ("3D000", "database does not exist"),
            ("40002", "integrity constraint violation at commit"),
            ("42501", "insufficient privilege"),
            ("42601", "syntax error"),
            ("42703", "undefined column"),
            ("42704", "undefined object"),
            ("42710", "duplicate object"),
            ("42883", "undefined function"),
            ("42P01", "undefined table"),
            ("54000", "program limit exceeded"),
            ("55000", "object not in prerequisite state"),
            ("57P04", "database dropped"),
            ("58P01", "undefined file (WAL removed)"),
            ("XX000", "internal error"),
            ("XX001", "data corrupted"),
        ];
        for (code, what) in retried {
            assert!(
                sqlstate_is_retryable(code),
                "{code} ({what}) must be retried"
            );
        }
        for (code, what) in fatal {
            assert!(
                !sqlstate_is_retryable(code),
                "{code} ({what}) must be fatal"
            );
        }
    }

    #[test]
    fn query_errors_follow_the_table_and_connection_errors_are_retried() {
        let query = |code: &str| PgError::Query {
            what: "x".into(),
            detail: "y".into(),
            code: Some(SqlState::from_code(code)),
        };
        assert!(query("57P01").is_retryable());
        assert!(query("40001").is_retryable());
        assert!(!query("22012").is_retryable());
        assert!(!query("42501").is_retryable());
        assert!(query("22012").hint().contains("[mapping] filter"));
        assert!(query("42703").hint().contains("[mapping] filter"));
        let lost = PgError::Query {
            what: "x".into(),
            detail: "connection closed".into(),
            code: None,
        };
        assert!(lost.is_retryable());
        let tls = PgError::Tls {
            mode: "verify-full",
            cause: tls::TlsCause::Untrusted,
            detail: "bad certificate".into(),
        };
        assert!(!tls.is_retryable());
    }

    #[test]
    fn session_options_pin_the_timeouts_and_durability() {
        for pin in [
            "-c statement_timeout=0",
            "-c idle_in_transaction_session_timeout=0",
            "-c synchronous_commit=on",
        ] {
            assert!(SESSION_OPTIONS.contains(pin), "{pin}");
        }
    }
}
