//! The stdout destination (`[destination] type = "stdout"`): JSON lines on standard output,
//! flushed before a batch counts as delivered. Keys: `[destination.retry]` only.

mod sink;

use serde::Deserialize;

pub use sink::StdoutSink;

use super::retry::{RawRetry, RetryPolicy};

/// `[destination]` with `type = "stdout"`, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStdoutConfig {
    #[serde(default)]
    retry: RawRetry,
}

/// The stdout destination, validated.
#[derive(Debug, Clone, Default)]
pub struct StdoutConfig {
    /// How failed deliveries are retried.
    pub retry: RetryPolicy,
}

impl RawStdoutConfig {
    /// Validates the keys; `Err((key, message))` names the key at fault.
    pub fn validate(self) -> Result<StdoutConfig, (String, String)> {
        Ok(StdoutConfig {
            retry: self.retry.validate()?,
        })
    }
}
