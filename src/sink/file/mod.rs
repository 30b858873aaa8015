//! The file destination (`[destination] type = "file"`): JSON lines appended to a file, fsynced
//! before a batch counts as delivered. Keys: `path` (required), `fsync` (default true),
//! `[destination.retry]`.

mod sink;

use std::path::PathBuf;

use serde::Deserialize;

pub use sink::FileSink;

use super::retry::{RawRetry, RetryPolicy};

/// `[destination]` with `type = "file"`, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFileConfig {
    path: Option<PathBuf>,
    fsync: Option<bool>,
    #[serde(default)]
    retry: RawRetry,
}

/// The file destination, validated.
#[derive(Debug, Clone)]
pub struct FileConfig {
    /// The file.
    pub path: PathBuf,
    /// fsync after each batch (default true; turning it off weakens invariant 1).
    pub fsync: bool,
    /// How failed deliveries are retried.
    pub retry: RetryPolicy,
}

impl RawFileConfig {
    /// Validates the keys; `Err((key, message))` names the key at fault.
    pub fn validate(self) -> Result<FileConfig, (String, String)> {
        let path = self.path.ok_or_else(|| {
            (
                "destination.path".to_owned(),
                "is required for type = \"file\"; name the JSONL file to append to".to_owned(),
            )
        })?;
        Ok(FileConfig {
            path,
            fsync: self.fsync.unwrap_or(true),
            retry: self.retry.validate()?,
        })
    }
}
