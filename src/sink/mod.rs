//! Destinations, one folder each (`stdout/`, `file/`, `kafka/`, `http/`): its config (the keys of
//! `[destination]` for that `type`), its encoding, and its delivery. The encoding of an event
//! is shared ([`json`]) and stamps nothing; `sentAt` is set by the delivery step ([`retry`])
//! before each attempt.
//!
//! A [`Sink`] takes a [`Batch`] of events and returns only once each of them is durable at the
//! destination (written and fsynced, acknowledged by the broker) or rejected for good (a record
//! the broker will never take). The pipeline moves the checkpoint only after that, so a sink
//! that returns early breaks invariant 1 (docs/architecture.md §8): nothing else in the
//! pipeline can detect it.
//!
//! Events arrive in commit order, and a sink keeps that order (per key, for a keyed
//! destination). A failed delivery is retried for the batch by [`retry::Retrying`], which calls
//! `deliver` again with the same `Batch`: a sink skips what it already marked delivered, as far
//! as the order allows.

pub mod file;
pub mod http;
pub mod json;
pub mod kafka;
pub mod retry;
pub mod stdout;

mod error;

use std::future::Future;
use std::pin::Pin;

use serde::Deserialize;

pub use error::{Recovery, SinkError};

use crate::transform::Event;

/// `[destination]` as written: `type` picks the destination, whose own keys follow (each
/// destination rejects the keys of the others).
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RawDestination {
    /// `type = "stdout"`.
    Stdout(stdout::RawStdoutConfig),
    /// `type = "file"`.
    File(file::RawFileConfig),
    /// `type = "kafka"`.
    Kafka(Box<kafka::RawKafkaConfig>),
    /// `type = "http"`.
    Http(Box<http::RawHttpConfig>),
}

impl RawDestination {
    /// Validates the destination's keys; `Err((key, message))` names the key at fault.
    pub fn validate(
        self,
        getenv: &dyn Fn(&str) -> Option<String>,
    ) -> Result<DestinationConfig, (String, String)> {
        match self {
            RawDestination::Stdout(c) => Ok(DestinationConfig::Stdout(c.validate()?)),
            RawDestination::File(c) => Ok(DestinationConfig::File(c.validate()?)),
            RawDestination::Kafka(c) => Ok(DestinationConfig::Kafka(Box::new(c.validate(getenv)?))),
            RawDestination::Http(c) => Ok(DestinationConfig::Http(Box::new(c.validate(getenv)?))),
        }
    }
}

/// The destination, as `[destination]` configures it (`type = "…"` picks the variant).
#[derive(Debug, Clone)]
pub enum DestinationConfig {
    /// One JSON event per line on standard output.
    Stdout(stdout::StdoutConfig),
    /// One JSON event per line appended to a file, fsynced before a batch counts as delivered.
    File(file::FileConfig),
    /// One record per event in a Kafka topic.
    Kafka(Box<kafka::KafkaConfig>),
    /// Events POSTed to an HTTP endpoint: RudderStack's HTTP API or a webhook.
    Http(Box<http::HttpConfig>),
}

impl DestinationConfig {
    /// How a failed delivery is retried (`[destination.retry]`).
    pub fn retry(&self) -> &retry::RetryPolicy {
        match self {
            DestinationConfig::Stdout(c) => &c.retry,
            DestinationConfig::File(c) => &c.retry,
            DestinationConfig::Kafka(c) => &c.retry,
            DestinationConfig::Http(c) => &c.retry,
        }
    }
}

/// An event the destination refused for good (too large, not authorised, invalid topic): it
/// becomes a dead letter and the pipeline goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Its index in the batch.
    pub index: usize,
    /// The destination's reason.
    pub reason: String,
}

/// A batch on its way to the destination, with what has become of each event so far. The
/// same `Batch` is handed to [`Sink::deliver`] again when a delivery is retried.
#[derive(Debug)]
pub struct Batch<'a> {
    /// The events, in commit order.
    pub events: &'a mut [Event],
    /// Which events the destination acknowledged.
    pub delivered: Vec<bool>,
    /// The events refused for good.
    pub rejected: Vec<Rejected>,
}

impl<'a> Batch<'a> {
    /// A batch of `events`, none delivered yet.
    pub fn new(events: &'a mut [Event]) -> Self {
        let delivered = vec![false; events.len()];
        Batch {
            events,
            delivered,
            rejected: Vec::new(),
        }
    }

    /// Marks every event delivered (a destination that writes the batch as one piece).
    pub fn mark_all_delivered(&mut self) {
        self.delivered.iter_mut().for_each(|d| *d = true);
    }

    /// Whether every event was delivered or rejected.
    pub fn is_done(&self) -> bool {
        let rejected = self.rejected.len();
        self.delivered.iter().filter(|d| !**d).count() == rejected
    }
}

/// The boxed future a sink returns (object-safe async).
pub type SinkFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, SinkError>> + Send + 'a>>;

/// A destination.
pub trait Sink: Send {
    /// Delivers the events of `batch` not yet delivered, in order; returns once each of them is
    /// durable at the destination (marked in `batch.delivered`) or refused for good (pushed
    /// onto `batch.rejected`). On `Err`, the marks say what got through; the batch may be
    /// handed over again.
    fn deliver<'a>(&'a mut self, batch: &'a mut Batch<'_>) -> SinkFuture<'a, ()>;

    /// Checks that the destination can take events (`slotstream check`, and the start of each
    /// `run` session): the broker is reachable, the topic exists (or is created), the file can
    /// be opened. Returns a sentence saying what was checked.
    fn healthcheck(&mut self) -> SinkFuture<'_, String>;

    /// Flushes whatever the sink holds and lets go of the destination (the end of `run`).
    fn shutdown(&mut self) -> SinkFuture<'_, ()>;

    /// A short name for logs and sync runs (`file:/path`, `stdout`, `kafka:topic`).
    fn describe(&self) -> String;
}

/// A secret from `<key>_env` or `<key>_file` (at most one of them; `None` when neither is
/// given), for every destination's credentials. An unset or empty variable, an unreadable or
/// empty file is an error naming the key (`destination.<key>_env` / `_file`); a file's trailing
/// newline is not part of the secret.
pub(crate) fn secret_from(
    key: &str,
    env: Option<&str>,
    file: Option<&std::path::PathBuf>,
    getenv: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<secrecy::SecretString>, (String, String)> {
    let invalid = |suffix: &str, message: String| (format!("destination.{key}{suffix}"), message);
    match (env, file) {
        (Some(_), Some(_)) => Err(invalid(
            "_env",
            format!("and {key}_file are both given; keep one"),
        )),
        (Some(var), None) => match getenv(var) {
            Some(v) if !v.is_empty() => Ok(Some(secrecy::SecretString::from(v))),
            _ => Err(invalid(
                "_env",
                format!(
                    "names {var}, which is not set or empty; export it before running slotstream"
                ),
            )),
        },
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                invalid(
                    "_file",
                    format!("names {}, which cannot be read: {e}", path.display()),
                )
            })?;
            let value = text.trim_end_matches(['\n', '\r']);
            if value.is_empty() {
                return Err(invalid(
                    "_file",
                    format!("names {}, which is empty", path.display()),
                ));
            }
            Ok(Some(secrecy::SecretString::from(value.to_owned())))
        }
        (None, None) => Ok(None),
    }
}

/// Builds the configured sink.
pub fn build(config: &DestinationConfig) -> Result<Box<dyn Sink>, SinkError> {
    match config {
        DestinationConfig::Stdout(_) => Ok(Box::new(stdout::StdoutSink::new())),
        DestinationConfig::File(c) => Ok(Box::new(file::FileSink::open(c.path.clone(), c.fsync)?)),
        DestinationConfig::Kafka(c) => Ok(Box::new(kafka::KafkaSink::new(c)?)),
        DestinationConfig::Http(c) => Ok(Box::new(http::HttpSink::new(c)?)),
    }
}

/// Identify events keyed by `user_ids`, for the sinks' unit tests.
#[cfg(test)]
pub(crate) fn test_events(user_ids: &[&str]) -> Vec<Event> {
    use crate::Lsn;
    use crate::config::{IdentifierColumn, IdentifierColumns, MappingConfig};
    use crate::transform::event::{EventFactory, Stamp};
    use crate::transform::mapping::CellRef;
    use crate::transform::{Op, Projection};
    let mapping = MappingConfig {
        columns: None,
        constants: Default::default(),
        filter: None,
        identifiers: IdentifierColumns {
            user_id: IdentifierColumn::Default("user_id"),
            anonymous_id: IdentifierColumn::Default("anonymous_id"),
            email: IdentifierColumn::Default("email"),
        },
        trait_keys: Default::default(),
    };
    let projection = Projection::resolve(&mapping, "t", [("user_id", 25)]).expect("resolves");
    let factory = EventFactory::new("p", "public", "t");
    let stamp = Stamp::new(Lsn::from_u64(0x16B6C50), "2024-01-02T03:04:05Z");
    user_ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let row = projection.project(&crate::decode::value::TypeCatalog::builtin(), |_| {
                CellRef::Value(serde_json::Value::String((*id).to_owned()))
            });
            factory.identify(row, Op::Insert, &stamp, uuid::Uuid::from_u128(i as u128))
        })
        .collect()
}
