//! Destinations. A [`Sink`] takes a batch of events and returns only once they are durable at
//! the destination (written and fsynced, acknowledged by the broker, accepted by the endpoint).
//! The pipeline moves the checkpoint only after `deliver` returned `Ok`, so a sink that returns
//! early breaks invariant 1: nothing else in the pipeline can detect it.
//!
//! The sink stamps `sentAt` as it writes. Events arrive in commit order, and a sink must keep
//! that order.

pub mod file;
pub mod json;
pub mod stdout;

use std::future::Future;
use std::pin::Pin;

use crate::config::DestinationConfig;
use crate::transform::Event;
use crate::transform::event::{SharedStr, now_rfc3339};

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
}

impl SinkError {
    /// Whether trying again may succeed (a full disk may be freed; a closed stdout will not
    /// reopen).
    pub fn is_retryable(&self) -> bool {
        match self {
            SinkError::Io { source, .. } => !matches!(
                source.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::PermissionDenied
            ),
            SinkError::Serialize(_) => false,
        }
    }

    /// What the operator should do.
    pub fn hint(&self) -> String {
        match self {
            SinkError::Io { .. } => {
                "check the destination path, its permissions and free disk space; nothing past the last checkpoint was acknowledged".into()
            }
            SinkError::Serialize(_) => "this is a bug: report it with the message above".into(),
        }
    }
}

/// The boxed future a sink returns (object-safe async).
pub type DeliverFuture<'a> = Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send + 'a>>;

/// A destination.
pub trait Sink: Send {
    /// Delivers `events` in order; returns once all of them are durable at the destination.
    /// `events` may be empty (a no-op).
    fn deliver<'a>(&'a mut self, events: &'a mut [Event]) -> DeliverFuture<'a>;

    /// A short name for logs and sync runs (`file:/path`, `stdout`).
    fn describe(&self) -> String;
}

/// Builds the configured sink.
pub fn build(config: &DestinationConfig) -> Result<Box<dyn Sink>, SinkError> {
    match config {
        DestinationConfig::Stdout => Ok(Box::new(stdout::StdoutSink::new())),
        DestinationConfig::File { path, fsync } => {
            Ok(Box::new(file::FileSink::open(path.clone(), *fsync)?))
        }
    }
}

/// Serializes `events` as JSON lines into `buf`, stamping `sentAt` with one time for the batch.
pub fn write_jsonl(events: &mut [Event], buf: &mut Vec<u8>) -> Result<(), SinkError> {
    let sent_at: SharedStr = now_rfc3339().into();
    for e in events.iter_mut() {
        e.sent_at = Some(sent_at.clone());
        json::write_event(buf, e);
        buf.push(b'\n');
    }
    Ok(())
}
