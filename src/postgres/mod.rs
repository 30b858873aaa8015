//! The control plane: a `tokio-postgres` connection for catalog queries, COPY, the state tables
//! and lag; never the walsender (that is `source::stream`, on `pgwire-replication`).
//!
//! Every control connection pins the same session settings as the replication session
//! (`DateStyle=ISO`, `TimeZone=UTC`, `IntervalStyle=postgres`, `extra_float_digits=3`), so text
//! values read by COPY or preview render exactly as pgoutput renders them (DESIGN.md §7).

pub mod catalog;
pub mod preflight;
pub mod state;
pub mod tls;
pub mod types;

use std::time::Duration;

use secrecy::ExposeSecret;
use tokio_postgres::error::SqlState;

use crate::config::{SourceConfig, SslMode};

/// The startup `options` that pin the session settings text output depends on.
pub const SESSION_OPTIONS: &str =
    "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=postgres -c extra_float_digits=3";

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

fn describe(e: &tokio_postgres::Error) -> String {
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

    /// Whether retrying may help: network errors, server restarts and resource exhaustion yes;
    /// authentication, permissions, missing objects no.
    pub fn is_retryable(&self) -> bool {
        match self.code() {
            None => !matches!(self, PgError::Tls { .. }),
            Some(code) => {
                let c = code.code();
                // Class 08 connection exception, 53 insufficient resources, 57 operator
                // intervention (admin shutdown, crash shutdown, cannot connect now), 40 rollback.
                c.starts_with("08")
                    || c.starts_with("53")
                    || c.starts_with("57")
                    || c.starts_with("40")
            }
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
        return Ok(Connection { client, tls: false });
    }
    let tls = tls::make_connector(source)?;
    let (client, connection) = cfg.connect(tls).await.map_err(connect_err)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "control connection closed");
        }
    });
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
}
