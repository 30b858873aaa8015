//! Delivery failures, and the one decision each of them gets ([`Recovery`]).

use std::time::Duration;

pub use crate::error::Recovery;

/// A delivery failure.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// An I/O error writing to a file or stream.
    #[error("cannot write to {target}: {source}")]
    Io {
        /// The file, or `stdout`.
        target: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An event could not be serialized.
    #[error("cannot serialize an event: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The Kafka client or broker failed.
    #[error("kafka {what}: {message}")]
    Kafka {
        /// What was being done (`delivering to topic "users"`, `connecting to 10.0.0.1:9092`).
        what: String,
        /// librdkafka's or the broker's reason.
        message: String,
        /// Whether the same operation may succeed later (a broker down, a leader change).
        retryable: bool,
        /// What the operator should do.
        hint: String,
    },
    /// The HTTP endpoint failed or refused a request for a reason that is not the request's
    /// events (a connection error, a timeout, 408, 429, 5xx; a bad write key).
    #[error("http {what}: {message}")]
    Http {
        /// What was being done (`POST to https://dp.example.com`).
        what: String,
        /// The reason: the client's error, or the status and an excerpt of the answer.
        message: String,
        /// What the pipeline does about it.
        recovery: Recovery,
        /// What the operator should do.
        hint: String,
        /// How long the server asked the client to wait (`Retry-After`).
        retry_after: Option<Duration>,
    },
    /// A batch kept failing until the retry budget (`[destination.retry] give_up_after`, or
    /// the attempts of `run --once`) ran out.
    #[error("gave up after {attempts} attempts over {}: {last}", humantime::format_duration(*.elapsed))]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// Time spent, rounded to the second.
        elapsed: Duration,
        /// The last attempt's failure.
        last: Box<SinkError>,
    },
    /// The session was asked to stop while a batch was being retried.
    #[error("stopped while retrying a failed delivery: {last}")]
    Interrupted {
        /// The last attempt's failure.
        last: Box<SinkError>,
    },
}

impl SinkError {
    /// Whether trying again may succeed (a full disk may be freed; a closed stdout will not
    /// reopen).
    pub fn is_retryable(&self) -> bool {
        self.recovery() != Recovery::Stop
    }

    /// The `kind` label of `slotstream_destination_errors_total` (one of
    /// [`crate::metrics::ERROR_KINDS`]).
    pub fn kind(&self) -> &'static str {
        match self {
            SinkError::Io { .. } => "io",
            SinkError::Serialize(_) => "serialize",
            SinkError::Kafka { .. } => "kafka",
            SinkError::Http { .. } => "http",
            SinkError::GaveUp { last, .. } | SinkError::Interrupted { last } => last.kind(),
        }
    }

    /// What the pipeline does about it.
    pub fn recovery(&self) -> Recovery {
        match self {
            SinkError::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::PermissionDenied => {
                    Recovery::Stop
                }
                _ => Recovery::RetryBatch,
            },
            SinkError::Kafka {
                retryable: true, ..
            } => Recovery::RetryBatch,
            SinkError::Serialize(_) | SinkError::Kafka { .. } | SinkError::GaveUp { .. } => {
                Recovery::Stop
            }
            SinkError::Http { recovery, .. } => *recovery,
            SinkError::Interrupted { .. } => Recovery::Reconnect,
        }
    }

    /// How long the destination asked to wait before the next attempt (an HTTP `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SinkError::Http { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// What the operator should do.
    pub fn hint(&self) -> String {
        match self {
            SinkError::Io { .. } => {
                "check the destination path, its permissions and free disk space; nothing past the last checkpoint was acknowledged".into()
            }
            SinkError::Serialize(_) => "this is a bug: report it with the message above".into(),
            SinkError::Kafka { hint, .. } | SinkError::Http { hint, .. } => hint.clone(),
            SinkError::GaveUp { last, .. } => format!(
                "{}; slotstream resumes at the checkpoint when started again (raise [destination.retry] give_up_after to ride out longer outages)",
                last.hint()
            ),
            SinkError::Interrupted { last } => last.hint(),
        }
    }
}
