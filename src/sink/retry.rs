//! Retrying a failed delivery for the batch, inside the deliverer (docs/architecture.md §13).
//!
//! A destination outage (a broker down, a full disk) does not end the replication session: the
//! deliverer delivers the same batch again, with exponential backoff, jitter and a cap, while
//! the reader goes on until its memory budget is spent and then waits; pgwire-replication keeps
//! answering the server's keepalives meanwhile, so the walsender stays and nothing is read
//! again from the checkpoint. Which failures are retried this way is the error's own decision
//! ([`SinkError::recovery`]); the rest end the session or the pipeline.
//!
//! A batch is retried until it is delivered, until the retry budget runs out
//! (`give_up_after`, or [`ONCE_MAX_ATTEMPTS`] for `run --once`, which must end), or until the
//! session is asked to stop while it waits between attempts. A destination that asks for a
//! longer pause (an HTTP `Retry-After`) gets it, up to [`RETRY_AFTER_CAP`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::watch;

use super::{Batch, Recovery, Sink, SinkError, SinkFuture};
use crate::Lsn;
use crate::metrics::Metrics;
use crate::postgres::state::DeadLetter;
use crate::transform::Event;
use crate::transform::event::{SharedStr, now_rfc3339};

/// Attempts per batch in `run --once`: a one-shot job (cron, CI) must end and report a lasting
/// failure instead of retrying forever; a brief blip is still ridden out.
pub const ONCE_MAX_ATTEMPTS: u32 = 4;

/// The longest wait a destination may ask for (an HTTP `Retry-After`): a longer one is cut to
/// this, so that a wrong header cannot stall the pipeline for hours.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(600);

/// How a failed delivery is retried: `[destination.retry]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    initial_backoff: Option<String>,
    max_backoff: Option<String>,
    give_up_after: Option<String>,
}

/// How a failed delivery is retried (`[destination.retry]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The first pause (default 500 ms); each next one doubles, with ±50 % jitter.
    pub initial_backoff: Duration,
    /// The longest pause (default 30 s).
    pub max_backoff: Duration,
    /// Give up on a batch (and stop the pipeline) once it has failed for this long; `None`
    /// (`"never"`, the default) retries until the destination is back.
    pub give_up_after: Option<Duration>,
    /// Give up after this many attempts (`run --once` only).
    pub max_attempts: Option<u32>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            give_up_after: None,
            max_attempts: None,
        }
    }
}

impl RawRetry {
    /// Validates the keys; `Err((key, message))` names the key at fault.
    pub fn validate(self) -> Result<RetryPolicy, (String, String)> {
        let parse = |key: &str, value: &str| {
            humantime::parse_duration(value).map_err(|e| {
                (
                    format!("destination.retry.{key}"),
                    format!(
                        "is {value:?}: {e}; write a duration such as \"500ms\", \"30s\" or \"10m\""
                    ),
                )
            })
        };
        let mut policy = RetryPolicy::default();
        if let Some(v) = &self.initial_backoff {
            policy.initial_backoff = parse("initial_backoff", v)?;
        }
        if let Some(v) = &self.max_backoff {
            policy.max_backoff = parse("max_backoff", v)?;
        }
        if policy.initial_backoff.is_zero() || policy.max_backoff < policy.initial_backoff {
            return Err((
                "destination.retry.max_backoff".into(),
                "must be at least initial_backoff, and initial_backoff more than 0".into(),
            ));
        }
        policy.give_up_after = match self.give_up_after.as_deref() {
            None | Some("never") => None,
            Some(v) => Some(parse("give_up_after", v)?),
        };
        Ok(policy)
    }
}

impl RetryPolicy {
    /// The policy for `run --once`: at most [`ONCE_MAX_ATTEMPTS`] attempts per batch.
    pub fn for_once(mut self) -> Self {
        self.max_attempts = Some(ONCE_MAX_ATTEMPTS);
        self
    }

    /// The pause after the `failures`-th failed attempt, without jitter.
    pub fn backoff(&self, failures: u32) -> Duration {
        let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(20));
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }

    fn exhausted(&self, attempts: u32, elapsed: Duration) -> bool {
        self.max_attempts.is_some_and(|max| attempts >= max)
            || self.give_up_after.is_some_and(|limit| elapsed >= limit)
    }
}

/// A sink whose deliveries are retried for the batch by the policy (the decorator the
/// deliverer delivers through). It also stamps `sentAt` on the events of each attempt.
pub struct Retrying<'a> {
    inner: &'a mut dyn Sink,
    policy: RetryPolicy,
    stop: watch::Receiver<bool>,
    metrics: Option<Arc<Metrics>>,
}

impl<'a> Retrying<'a> {
    /// Wraps `inner`; `stop` (the session's stop signal) ends a wait between two attempts.
    pub fn new(inner: &'a mut dyn Sink, policy: RetryPolicy, stop: watch::Receiver<bool>) -> Self {
        Retrying {
            inner,
            policy,
            stop,
            metrics: None,
        }
    }

    /// Counts failed attempts and retries, and reports the destination's health for
    /// `/readyz`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }
}

impl Sink for Retrying<'_> {
    fn deliver<'a>(&'a mut self, batch: &'a mut Batch<'_>) -> SinkFuture<'a, ()> {
        Box::pin(async move {
            let started = Instant::now();
            let mut attempts = 0u32;
            loop {
                stamp_sent_at(batch);
                attempts += 1;
                let error = match self.inner.deliver(batch).await {
                    Ok(()) => {
                        if let Some(m) = &self.metrics {
                            m.destination_state(None);
                            if attempts > 1 {
                                m.delivery_recovered();
                            }
                        }
                        if attempts > 1 {
                            tracing::info!(
                                attempts,
                                destination = %self.inner.describe(),
                                "delivery recovered; the batch is delivered"
                            );
                        }
                        return Ok(());
                    }
                    Err(e) => {
                        if let Some(m) = &self.metrics {
                            m.delivery_failed(e.kind());
                            m.destination_state(Some(e.to_string()));
                        }
                        if e.recovery() != Recovery::RetryBatch {
                            return Err(e);
                        }
                        e
                    }
                };
                let elapsed = started.elapsed();
                if self.policy.exhausted(attempts, elapsed) {
                    return Err(SinkError::GaveUp {
                        attempts,
                        elapsed: Duration::from_secs(elapsed.as_secs()),
                        last: Box::new(error),
                    });
                }
                let wait = self
                    .policy
                    .backoff(attempts)
                    .mul_f64(rand::random_range(0.5..1.5))
                    .max(error.retry_after().unwrap_or_default().min(RETRY_AFTER_CAP));
                tracing::warn!(
                    error = %error,
                    attempt = attempts,
                    retry_in_ms = wait.as_millis() as u64,
                    "delivery failed; retrying the batch (the replication session stays up)"
                );
                if *self.stop.borrow() {
                    return Err(SinkError::Interrupted {
                        last: Box::new(error),
                    });
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.stop.wait_for(|s| *s) => {
                        return Err(SinkError::Interrupted { last: Box::new(error) });
                    }
                }
            }
        })
    }

    fn healthcheck(&mut self) -> SinkFuture<'_, String> {
        self.inner.healthcheck()
    }

    fn shutdown(&mut self) -> SinkFuture<'_, ()> {
        self.inner.shutdown()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Stamps `sentAt`, one time for the attempt, on the events not yet delivered.
fn stamp_sent_at(batch: &mut Batch<'_>) {
    let sent_at: SharedStr = now_rfc3339().into();
    for (event, delivered) in batch.events.iter_mut().zip(&batch.delivered) {
        if !delivered {
            event.sent_at = Some(sent_at.clone());
        }
    }
}

/// Delivers `events` through `sink` (a [`Retrying`] sink retries it); returns the events the
/// destination refused for good, as dead letters.
pub async fn deliver(
    sink: &mut dyn Sink,
    events: &mut [Event],
) -> Result<Vec<DeadLetter>, SinkError> {
    let mut batch = Batch::new(events);
    sink.deliver(&mut batch).await?;
    if tracing::enabled!(target: LATENCY_TARGET, tracing::Level::DEBUG) {
        tracing::debug!(
            target: LATENCY_TARGET,
            events = batch.events.len(),
            lag_ms = %commit_lags(batch.events),
            "batch acknowledged"
        );
    }
    let rejected = std::mem::take(&mut batch.rejected);
    Ok(rejected
        .into_iter()
        .filter_map(|r| Some(dead_letter(batch.events.get(r.index)?, r.reason)))
        .collect())
}

/// The log target of the per-batch commit → acknowledgement lags (`bench/kafka.sh` turns it on
/// with `RUST_LOG=slotstream::latency=debug`).
pub const LATENCY_TARGET: &str = "slotstream::latency";

/// Milliseconds from each event's commit (`originalTimestamp`) to now, as `lag×count` for each
/// run of events with the same commit time: `12.3x50,13.1x2`.
fn commit_lags(events: &[Event]) -> String {
    use time::format_description::well_known::Rfc3339;
    let now = time::OffsetDateTime::now_utc();
    let mut out = String::new();
    let mut i = 0;
    while i < events.len() {
        let at = &events[i].original_timestamp;
        let n = events[i..]
            .iter()
            .take_while(|e| e.original_timestamp == *at)
            .count();
        if let Ok(t) = time::OffsetDateTime::parse(at, &Rfc3339) {
            let ms = (now - t).as_seconds_f64() * 1000.0;
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(&format!("{ms:.1}x{n}"));
        }
        i += n;
    }
    out
}

/// The dead letter of an event the destination refused.
fn dead_letter(event: &Event, reason: String) -> DeadLetter {
    let payload = match (&event.traits, &event.properties) {
        (Some(traits), _) => serde_json::Value::Object(traits.clone().into_map()),
        (None, Some(properties)) => serde_json::Value::Object(properties.clone()),
        (None, None) => serde_json::Value::Null,
    };
    DeadLetter {
        lsn: Lsn::parse(&event.context.sources.lsn).unwrap_or(Lsn::ZERO),
        op: event.context.sources.op.as_str(),
        reason,
        payload,
        message_id: event.message_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            ..RetryPolicy::default()
        };
        let waits: Vec<u128> = (1..=6).map(|n| p.backoff(n).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.backoff(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn the_budget_ends_by_attempts_or_by_time() {
        let forever = RetryPolicy::default();
        assert!(!forever.exhausted(1_000_000, Duration::from_secs(86_400)));
        let once = RetryPolicy::default().for_once();
        assert!(!once.exhausted(ONCE_MAX_ATTEMPTS - 1, Duration::ZERO));
        assert!(once.exhausted(ONCE_MAX_ATTEMPTS, Duration::ZERO));
        let timed = RetryPolicy {
            give_up_after: Some(Duration::from_secs(60)),
            ..RetryPolicy::default()
        };
        assert!(!timed.exhausted(100, Duration::from_secs(59)));
        assert!(timed.exhausted(2, Duration::from_secs(60)));
    }

    #[test]
    fn keys_are_validated_by_name() {
        let raw: RawRetry =
            toml::from_str("give_up_after = \"10m\"\nmax_backoff = \"5s\"").expect("parses");
        let p = raw.validate().expect("valid");
        assert_eq!(p.give_up_after, Some(Duration::from_secs(600)));
        assert_eq!(p.max_backoff, Duration::from_secs(5));
        let raw: RawRetry = toml::from_str("give_up_after = \"soon\"").expect("parses");
        let (key, _) = raw.validate().expect_err("invalid");
        assert_eq!(key, "destination.retry.give_up_after");
        let raw: RawRetry = toml::from_str("max_backoff = \"1ms\"").expect("parses");
        assert!(raw.validate().is_err());
    }
}
