//! The crate's error: one variant per stage, each stage's error typed in its own module.
//!
//! Every error answers three questions the CLI and the pipeline need:
//! - [`Error::is_retryable`]: may the same operation succeed if tried again (a restarted server,
//!   a network blip, a destination outage), or will it fail the same way until an operator acts
//!   (bad config, missing grant, dropped slot)?
//! - [`Error::hint`]: the one sentence telling the operator what to do.
//! - [`Error::exit_code`]: the process exit code of docs/architecture.md §3 (1 runtime, 2 config, 3 preflight).

use crate::config::ConfigError;
use crate::decode::DecodeError;
use crate::postgres::PgError;
use crate::sink::SinkError;
use crate::source::SourceError;

/// Process exit codes (docs/architecture.md §3).
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// A runtime failure.
    pub const RUNTIME: i32 = 1;
    /// Bad config or usage.
    pub const CONFIG: i32 = 2;
    /// A preflight check failed.
    pub const PREFLIGHT: i32 = 3;
}

/// What the pipeline does about a failure: the one policy every error goes through
/// (docs/architecture.md §13): [`Error::recovery`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Deliver the same batch again after a pause, inside the deliverer: the replication
    /// session stays up and nothing is read again.
    RetryBatch,
    /// End the session and start another from the checkpoint (a new replication connection).
    Reconnect,
    /// Stop the pipeline: nothing will change until an operator acts.
    Stop,
}

/// Any error slotstream reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file or an override is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The control-plane connection or one of its queries failed.
    #[error(transparent)]
    Postgres(#[from] PgError),
    /// `check` found failures (already printed, one line each).
    #[error("{failed} of {total} preflight checks failed")]
    PreflightFailed {
        /// How many checks failed.
        failed: usize,
        /// How many ran.
        total: usize,
    },
    /// A pgoutput message could not be decoded.
    #[error("cannot decode the replication stream: {0}")]
    Decode(#[from] DecodeError),
    /// The replication session or the full sync failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The destination refused or failed.
    #[error("delivery failed: {0}")]
    Sink(#[from] SinkError),
    /// A task of slotstream itself failed (a bug).
    #[error("internal error: {0}")]
    Internal(String),
    /// Another process runs this pipeline (it holds the pipeline lock).
    #[error("pipeline {pipeline:?} is already running ({holder})")]
    AlreadyRunning {
        /// The pipeline name.
        pipeline: String,
        /// Who runs it, in words.
        holder: String,
    },
    /// `run` found a requirement that `check` verifies unmet, such as a publication that no
    /// longer publishes what the mapping needs: `check`'s line, with its fix.
    #[error("{message}")]
    Requirement {
        /// The line `check` prints for it.
        message: String,
        /// The fix, as `check` prints it under that line (indented, one step per line).
        fix: String,
    },
    /// The metrics endpoint cannot be served (`[metrics] listen`).
    #[error("{message}")]
    Endpoint {
        /// What is wrong.
        message: String,
        /// What to do.
        hint: String,
    },
    /// The table cannot be mapped to events as configured.
    #[error("{message}")]
    Mapping {
        /// What is wrong.
        message: String,
        /// What to do.
        hint: String,
    },
}

impl Error {
    /// Whether the same operation may succeed when retried without operator action.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Postgres(e) => e.is_retryable(),
            Error::Source(e) => e.is_retryable(),
            Error::Sink(e) => e.is_retryable(),
            Error::Internal(_) | Error::AlreadyRunning { .. } | Error::Endpoint { .. } => false,
            Error::Config(_)
            | Error::PreflightFailed { .. }
            | Error::Decode(_)
            | Error::Requirement { .. }
            | Error::Mapping { .. } => false,
        }
    }

    /// What the pipeline does about it. A destination failure decides for itself (most are
    /// retried for the batch inside the deliverer, see `sink::retry`); any other failure that
    /// may pass by itself ends the session and a new one resumes from the checkpoint; the rest
    /// stop the pipeline for the operator.
    pub fn recovery(&self) -> Recovery {
        match self {
            Error::Sink(e) => e.recovery(),
            e if e.is_retryable() => Recovery::Reconnect,
            _ => Recovery::Stop,
        }
    }

    /// What the operator should do about it.
    pub fn hint(&self) -> String {
        match self {
            Error::Config(e) => e.hint(),
            Error::Postgres(e) => e.hint(),
            Error::PreflightFailed { .. } => {
                "fix each failed check with the SQL or setting printed beside it, then run `slotstream check` again".into()
            }
            Error::Decode(_) => {
                "this is a bug or an unsupported server: report it with the message above; nothing was acknowledged, so a fixed version resumes without loss".into()
            }
            Error::Mapping { hint, .. } | Error::Endpoint { hint, .. } => hint.clone(),
            Error::AlreadyRunning { .. } => {
                "one `slotstream run` per pipeline: stop the running one first (SIGTERM) if you mean to replace it; a second pipeline on this database needs its own `name`. If that process is gone, the server releases its lock within about a minute, or at once with SELECT pg_terminate_backend(<its lock session's backend pid>)".into()
            }
            Error::Requirement { fix, .. } => format!(
                "slotstream stopped before acknowledging anything it did not deliver; fix it, then start slotstream again:\n{fix}"
            ),
            Error::Source(e) => e.hint(),
            Error::Sink(e) => e.hint(),
            Error::Internal(_) => "this is a bug: report it with the message above; nothing unconfirmed was acknowledged".into(),
        }
    }

    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) => exit::CONFIG,
            Error::PreflightFailed { .. }
            | Error::Mapping { .. }
            | Error::Requirement { .. }
            | Error::Source(SourceError::UnsupportedServer { .. }) => exit::PREFLIGHT,
            Error::Postgres(_)
            | Error::Decode(_)
            | Error::Source(_)
            | Error::Sink(_)
            | Error::Internal(_)
            | Error::Endpoint { .. }
            | Error::AlreadyRunning { .. } => exit::RUNTIME,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_policy_decides_per_error() {
        let io = |kind| {
            Error::from(SinkError::Io {
                target: "f".into(),
                source: std::io::Error::from(kind),
            })
        };
        assert_eq!(
            io(std::io::ErrorKind::StorageFull).recovery(),
            Recovery::RetryBatch
        );
        assert_eq!(
            io(std::io::ErrorKind::BrokenPipe).recovery(),
            Recovery::Stop
        );
        let gave_up = Error::from(SinkError::GaveUp {
            attempts: 4,
            elapsed: std::time::Duration::from_secs(3),
            last: Box::new(SinkError::Io {
                target: "f".into(),
                source: std::io::Error::from(std::io::ErrorKind::StorageFull),
            }),
        });
        assert_eq!(gave_up.recovery(), Recovery::Stop);
        assert!(
            gave_up.hint().contains("give_up_after"),
            "{}",
            gave_up.hint()
        );
        let dropped = Error::from(PgError::Query {
            what: "x".into(),
            detail: "connection closed".into(),
            code: None,
        });
        assert_eq!(
            dropped.is_retryable(),
            dropped.recovery() == Recovery::Reconnect
        );
        assert_eq!(Error::Internal("bug".into()).recovery(), Recovery::Stop);
    }

    #[test]
    fn an_unsupported_server_is_fatal_with_a_hint_and_exits_3() {
        let e = Error::from(SourceError::UnsupportedServer {
            version: "13.16".into(),
            reason: crate::postgres::version::unsupported(130_016, false).unwrap_or_default(),
        });
        assert!(!e.is_retryable());
        assert_eq!(e.exit_code(), exit::PREFLIGHT);
        assert!(
            e.to_string()
                .starts_with("PostgreSQL 13.16 cannot run this pipeline: slotstream supports PostgreSQL 14 and later"),
            "{e}"
        );
        assert!(e.hint().contains("upgrade PostgreSQL"), "{}", e.hint());
    }
}
