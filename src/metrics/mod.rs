//! What an operator watches: Prometheus metrics, readiness, and the slot's safety
//! (docs/architecture.md §14).
//!
//! - [`Metrics`]: every series of the `/metrics` endpoint, on one registry of the `prometheus`
//!   crate. Counters and gauges are atomics; the pipeline adds to them once per transaction,
//!   batch or checkpoint (never per row behind a lock), so they cost the stream nothing
//!   measurable.
//!   Values that depend on the time of the scrape (the checkpoint's age, the source lag in
//!   seconds) are derived when the endpoint is scraped.
//! - [`Health`] inside it: what `/readyz` answers (connected to the source, the destination
//!   taking events, the slot usable) with a one-line reason when not ready.
//! - [`monitor`]: a task with its own connection that polls the slot every few seconds (lag,
//!   `wal_status`, `safe_wal_size`, the WAL rate and the forecast of invalidation), warns when
//!   the lag passes `[metrics] lag_warn_bytes`, and stops the run with an explanation when the
//!   server invalidated the slot. It never waits on the stream, and goes on while the
//!   destination is down.
//! - [`server`]: the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`), on the pipeline's
//!   runtime, ended by the same shutdown signal.

pub mod config;
pub mod forecast;
pub mod monitor;
pub mod server;

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub use config::{MetricsConfig, RawMetrics};

use crate::Lsn;
use crate::transform::Op;

/// The `wal_status` values a slot can have (one series each, 1 for the current one).
pub const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];
/// The full-sync states (one series each, 1 for the current one).
pub const FULL_SYNC_STATES: [&str; 3] = ["pending", "running", "done"];
/// The kinds of destination errors (the `kind` label of `slotstream_destination_errors_total`).
pub const ERROR_KINDS: [&str; 5] = ["io", "serialize", "kafka", "http", "rejected"];

/// Every series slotstream exports, and the readiness state.
pub struct Metrics {
    registry: Registry,
    // The slot (the monitor's polls).
    pub(crate) slot_lag: IntGauge,
    pub(crate) slot_retained: IntGauge,
    pub(crate) slot_safe_wal: Gauge,
    pub(crate) slot_active: IntGauge,
    pub(crate) slot_wal_status: IntGaugeVec,
    pub(crate) wal_position: IntGauge,
    pub(crate) wal_rate: Gauge,
    pub(crate) forecast: Gauge,
    pub(crate) lag_warn_threshold: IntGauge,
    pub(crate) lag_warnings: IntCounter,
    pub(crate) slot_polls_failed: IntCounter,
    // Progress.
    checkpoint_lsn: IntGauge,
    checkpoint_time: Gauge,
    checkpoint_age: Gauge,
    source_lag: Gauge,
    changes: [IntCounter; 4],
    events_delivered: IntCounter,
    coalesced: IntCounter,
    unchanged: IntCounter,
    dead_letters: IntCounter,
    // Delivery.
    batches: IntCounter,
    batch_bytes: Histogram,
    latency: Histogram,
    destination_errors: IntCounterVec,
    retries: IntCounter,
    reconnects: IntCounter,
    // Full sync.
    full_sync_rows: IntCounter,
    full_sync_estimate: IntGauge,
    full_sync_state: IntGaugeVec,
    ready: IntGauge,
    /// Commit time (Unix µs) of the oldest change read but not yet delivered; 0: none.
    oldest_pending_commit: AtomicI64,
    health: Mutex<Health>,
}

/// What `/readyz` is made of.
#[derive(Debug, Clone, Default)]
pub struct Health {
    /// The source session: `None` until it streams or runs a full sync, then what it does.
    pub source: Option<&'static str>,
    /// Why the source is not connected (the last session's failure), if it is not.
    pub source_down: Option<String>,
    /// The destination's last failure, while a batch is being retried.
    pub destination_down: Option<String>,
    /// A state the run cannot go on from (the slot invalidated).
    pub fatal: Option<String>,
}

impl Health {
    /// `Ok(what the pipeline does)` when ready, else `Err(one-line reason)`.
    pub fn readiness(&self) -> Result<&'static str, String> {
        if let Some(f) = &self.fatal {
            return Err(f.clone());
        }
        if let Some(d) = &self.destination_down {
            return Err(format!("the destination is failing: {d}"));
        }
        match (self.source, &self.source_down) {
            (Some(what), _) => Ok(what),
            (None, Some(why)) => Err(format!("not connected to the source: {why}")),
            (None, None) => Err("connecting to the source".into()),
        }
    }
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

impl Metrics {
    /// A fresh set of series, registered.
    pub fn new(pipeline: &str) -> Metrics {
        let registry = Registry::new();
        let r = &registry;
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            // Names are unique constants: registering cannot fail.
            let _ = r.register(Box::new(c.clone()));
            c
        }
        let counter = |name: &str, help: &str| {
            reg(
                r,
                IntCounter::with_opts(opts(name, help))
                    .unwrap_or_else(|_| unreachable_metric(name)),
            )
        };
        let int_gauge = |name: &str, help: &str| {
            reg(
                r,
                IntGauge::with_opts(opts(name, help)).unwrap_or_else(|_| unreachable_metric(name)),
            )
        };
        let gauge = |name: &str, help: &str| {
            reg(
                r,
                Gauge::with_opts(opts(name, help)).unwrap_or_else(|_| unreachable_metric(name)),
            )
        };
        let info = reg(
            r,
            IntGaugeVec::new(
                opts(
                    "slotstream_build_info",
                    "Always 1: the version and the pipeline.",
                ),
                &["version", "pipeline"],
            )
            .unwrap_or_else(|_| unreachable_metric("slotstream_build_info")),
        );
        info.with_label_values(&[env!("CARGO_PKG_VERSION"), pipeline])
            .set(1);
        let changes = IntCounterVec::new(
            opts(
                "slotstream_changes_received_total",
                "Changes of the followed table read from the slot, by operation.",
            ),
            &["op"],
        )
        .unwrap_or_else(|_| unreachable_metric("slotstream_changes_received_total"));
        let changes = reg(r, changes);
        let change = |op: &str| changes.with_label_values(&[op]);
        let slot_wal_status = reg(
            r,
            IntGaugeVec::new(
                opts(
                    "slotstream_slot_wal_status",
                    "1 for the slot's current wal_status (reserved, extended, unreserved, lost).",
                ),
                &["status"],
            )
            .unwrap_or_else(|_| unreachable_metric("slotstream_slot_wal_status")),
        );
        for s in WAL_STATUSES {
            slot_wal_status.with_label_values(&[s]).set(0);
        }
        let full_sync_state = reg(
            r,
            IntGaugeVec::new(
                opts(
                    "slotstream_full_sync_state",
                    "1 for the full sync's current state (pending, running, done).",
                ),
                &["state"],
            )
            .unwrap_or_else(|_| unreachable_metric("slotstream_full_sync_state")),
        );
        for s in FULL_SYNC_STATES {
            full_sync_state.with_label_values(&[s]).set(0);
        }
        let destination_errors = reg(
            r,
            IntCounterVec::new(
                opts(
                    "slotstream_destination_errors_total",
                    "Failed delivery attempts and events refused for good, by kind.",
                ),
                &["kind"],
            )
            .unwrap_or_else(|_| unreachable_metric("slotstream_destination_errors_total")),
        );
        for k in ERROR_KINDS {
            destination_errors.with_label_values(&[k]);
        }
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            reg(
                r,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                    .unwrap_or_else(|_| unreachable_metric(name)),
            )
        };
        let m = Metrics {
            slot_lag: int_gauge(
                "slotstream_slot_lag_bytes",
                "WAL the slot has not confirmed: pg_current_wal_lsn() - confirmed_flush_lsn.",
            ),
            slot_retained: int_gauge(
                "slotstream_slot_retained_wal_bytes",
                "WAL the server keeps for the slot: pg_current_wal_lsn() - restart_lsn.",
            ),
            slot_safe_wal: gauge(
                "slotstream_slot_safe_wal_size_bytes",
                "WAL that can still be written before the slot is invalidated (+Inf: no max_slot_wal_keep_size).",
            ),
            slot_active: int_gauge(
                "slotstream_slot_active",
                "1 while a process streams from the slot.",
            ),
            slot_wal_status,
            wal_position: int_gauge(
                "slotstream_source_wal_position_bytes",
                "The server's current WAL position (pg_current_wal_lsn() as a byte offset).",
            ),
            wal_rate: gauge(
                "slotstream_source_wal_rate_bytes",
                "WAL written per second on the server, smoothed over the last minute of polls.",
            ),
            forecast: gauge(
                "slotstream_slot_invalidation_forecast_seconds",
                "Time left before the slot is invalidated at the current WAL rate (+Inf: no limit or no WAL written).",
            ),
            lag_warn_threshold: int_gauge(
                "slotstream_slot_lag_warn_threshold_bytes",
                "[metrics] lag_warn_bytes: above it slotstream logs a warning.",
            ),
            lag_warnings: counter(
                "slotstream_slot_lag_warnings_total",
                "Times the slot lag passed lag_warn_bytes.",
            ),
            slot_polls_failed: counter(
                "slotstream_slot_polls_failed_total",
                "Slot polls that failed (the monitor's connection or query).",
            ),
            checkpoint_lsn: int_gauge(
                "slotstream_checkpoint_lsn_bytes",
                "The stored checkpoint (an LSN as a byte offset).",
            ),
            checkpoint_time: gauge(
                "slotstream_checkpoint_timestamp_seconds",
                "When the checkpoint was last written (Unix time).",
            ),
            checkpoint_age: gauge(
                "slotstream_checkpoint_age_seconds",
                "Time since the checkpoint was last written in this process.",
            ),
            source_lag: gauge(
                "slotstream_source_lag_seconds",
                "Now minus the commit time of the oldest change read and not yet delivered (0: caught up).",
            ),
            changes: [
                change(Op::Insert.as_str()),
                change(Op::Update.as_str()),
                change(Op::Delete.as_str()),
                change("truncate"),
            ],
            events_delivered: counter(
                "slotstream_events_delivered_total",
                "Events the destination acknowledged.",
            ),
            coalesced: counter(
                "slotstream_changes_coalesced_total",
                "Changes a schedule window merged into a later change of the same row.",
            ),
            unchanged: counter(
                "slotstream_rows_unchanged_total",
                "Rows whose traits were as last sent (the ledger sent nothing).",
            ),
            dead_letters: counter(
                "slotstream_dead_letters_total",
                "Rows and events written to _rudderstack.cdc_dead_letters.",
            ),
            batches: counter(
                "slotstream_batches_delivered_total",
                "Batches the destination acknowledged.",
            ),
            batch_bytes: histogram(
                "slotstream_batch_size_bytes",
                "Size of each delivered micro-batch in memory (its share of memory_limit).",
                prometheus::exponential_buckets(4096.0, 4.0, 9)
                    .unwrap_or_else(|_| vec![4096.0, 65536.0, 1048576.0, 16777216.0]),
            ),
            latency: histogram(
                "slotstream_delivery_latency_seconds",
                "From a transaction's commit to the destination's acknowledgement (a window: from its opening).",
                vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0, 900.0, 3600.0,
                ],
            ),
            destination_errors,
            retries: counter(
                "slotstream_delivery_retries_total",
                "Batches delivered again after a failed attempt.",
            ),
            reconnects: counter(
                "slotstream_source_reconnects_total",
                "Sessions started again from the checkpoint after a failure.",
            ),
            full_sync_rows: counter(
                "slotstream_full_sync_rows_copied_total",
                "Rows the full syncs of this process read.",
            ),
            full_sync_estimate: int_gauge(
                "slotstream_full_sync_rows_estimated",
                "The planner's estimate of the table's rows at the start of the last full sync.",
            ),
            full_sync_state,
            ready: int_gauge(
                "slotstream_ready",
                "1 when /readyz answers 200: connected, the destination taking events, the slot usable.",
            ),
            oldest_pending_commit: AtomicI64::new(0),
            health: Mutex::new(Health::default()),
            registry,
        };
        m.slot_safe_wal.set(f64::INFINITY);
        m.forecast.set(f64::INFINITY);
        m
    }

    /// The Prometheus text exposition of every series, the derived ones computed for now.
    pub fn render(&self) -> String {
        let now = unix_secs_now();
        let at = self.checkpoint_time.get();
        self.checkpoint_age
            .set(if at > 0.0 { (now - at).max(0.0) } else { 0.0 });
        let pending = self.oldest_pending_commit.load(Ordering::Relaxed);
        self.source_lag.set(if pending > 0 {
            (now - pending as f64 / 1e6).max(0.0)
        } else {
            0.0
        });
        self.ready.set(i64::from(self.readiness().is_ok()));
        let mut out = String::new();
        // Encoding text into a String fails only on a malformed family, which the constant
        // names above rule out.
        let _ = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out);
        out
    }

    /// What `/readyz` answers.
    pub fn readiness(&self) -> Result<&'static str, String> {
        self.health().readiness()
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The source session streams (`what`: "streaming", "full sync"), or (`None`) ended.
    pub fn source_state(&self, what: Option<&'static str>, why_down: Option<String>) {
        let mut h = self.health();
        h.source = what;
        if what.is_some() || why_down.is_some() {
            h.source_down = why_down;
        }
    }

    /// The destination failed (`Some(reason)`) or took a batch (`None`).
    pub fn destination_state(&self, failing: Option<String>) {
        let mut h = self.health();
        if h.destination_down.is_some() || failing.is_some() {
            h.destination_down = failing;
        }
    }

    /// The run cannot go on: `/readyz` says why until the process ends.
    pub fn fatal(&self, why: String) {
        self.health().fatal = Some(why);
    }

    /// Changes read by the reader since its last report, by operation.
    pub fn changes_received(&self, counts: &ChangeCounts) {
        for (c, n) in self.changes.iter().zip(counts.0) {
            if n > 0 {
                c.inc_by(n);
            }
        }
    }

    /// A batch of `events` the destination acknowledged; `refused` of them it refused for good.
    pub fn batch_delivered(&self, events: usize, refused: usize) {
        self.batches.inc();
        self.events_delivered
            .inc_by(events.saturating_sub(refused) as u64);
        if refused > 0 {
            self.destination_errors
                .with_label_values(&["rejected"])
                .inc_by(refused as u64);
        }
    }

    /// A micro-batch of `bytes` (its share of the memory budget) was delivered.
    pub fn batch_size(&self, bytes: u64) {
        self.batch_bytes.observe(bytes as f64);
    }

    /// A delivery attempt failed with an error of `kind` (one of [`ERROR_KINDS`]); it is
    /// retried.
    pub fn delivery_failed(&self, kind: &'static str) {
        self.destination_errors.with_label_values(&[kind]).inc();
    }

    /// A batch was delivered after at least one failed attempt.
    pub fn delivery_recovered(&self) {
        self.retries.inc();
    }

    /// A session starts again after a failure.
    pub fn reconnected(&self) {
        self.reconnects.inc();
    }

    /// Changes a window merged into a later change of the same row.
    pub fn coalesced(&self, n: u64) {
        self.coalesced.inc_by(n);
    }

    /// Rows whose traits were as last sent.
    pub fn unchanged(&self, n: u64) {
        if n > 0 {
            self.unchanged.inc_by(n);
        }
    }

    /// Dead letters written.
    pub fn dead_lettered(&self, n: u64) {
        if n > 0 {
            self.dead_letters.inc_by(n);
        }
    }

    /// The checkpoint was written at `lsn`.
    pub fn checkpointed(&self, lsn: Lsn) {
        self.checkpoint_lsn.set(lsn.as_u64() as i64);
        self.checkpoint_time.set(unix_secs_now());
    }

    /// A change committed at `commit_unix_micros` reached the destination now.
    pub fn delivered_change(&self, commit_unix_micros: i64) {
        let secs = (unix_micros_now() - commit_unix_micros) as f64 / 1e6;
        self.latency.observe(secs.max(0.0));
    }

    /// The commit time of the oldest change read and not yet delivered (`None`: caught up).
    pub fn oldest_pending(&self, commit_unix_micros: Option<i64>) {
        self.oldest_pending_commit
            .store(commit_unix_micros.unwrap_or(0), Ordering::Relaxed);
    }

    /// The full sync's state (one of [`FULL_SYNC_STATES`]).
    pub fn full_sync_state(&self, state: &str) {
        for s in FULL_SYNC_STATES {
            self.full_sync_state
                .with_label_values(&[s])
                .set(i64::from(s == state));
        }
    }

    /// A full sync starts on a table the planner estimates at `rows`.
    pub fn full_sync_started(&self, estimated_rows: i64) {
        self.full_sync_estimate.set(estimated_rows.max(0));
        self.full_sync_state("running");
    }

    /// The full sync read `rows` more rows.
    pub fn full_sync_rows(&self, rows: u64) {
        self.full_sync_rows.inc_by(rows);
    }
}

/// Changes counted by operation (insert, update, delete, truncate), reported in one go.
#[derive(Debug, Default, Clone, Copy)]
pub struct ChangeCounts(pub [u64; 4]);

impl ChangeCounts {
    /// Counts one change of `op` (a snapshot row is not a change).
    pub fn add(&mut self, op: Op) {
        let i = match op {
            Op::Insert => 0,
            Op::Update => 1,
            Op::Delete => 2,
            Op::Snapshot => return,
        };
        self.0[i] += 1;
    }

    /// Counts a TRUNCATE.
    pub fn truncate(&mut self) {
        self.0[3] += 1;
    }

    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|n| *n == 0)
    }
}

#[cold]
fn unreachable_metric(name: &str) -> ! {
    // Only a malformed name or label fails, and every name here is a constant.
    panic!("metric {name} has an invalid definition")
}

/// Seconds since the Unix epoch, as a float.
pub fn unix_secs_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Microseconds since the Unix epoch.
pub fn unix_micros_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn counters_add_up_per_report() {
        let m = Metrics::new("p");
        let mut c = ChangeCounts::default();
        c.add(Op::Insert);
        c.add(Op::Insert);
        c.add(Op::Delete);
        c.add(Op::Snapshot);
        c.truncate();
        m.changes_received(&c);
        m.batch_delivered(10, 2);
        let text = m.render();
        assert_eq!(
            sample(&text, "slotstream_changes_received_total{op=\"insert\"}"),
            Some(2.0)
        );
        assert_eq!(
            sample(&text, "slotstream_changes_received_total{op=\"delete\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "slotstream_changes_received_total{op=\"truncate\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "slotstream_events_delivered_total"),
            Some(8.0)
        );
        assert_eq!(
            sample(
                &text,
                "slotstream_destination_errors_total{kind=\"rejected\"}"
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(&text, "slotstream_slot_safe_wal_size_bytes"),
            Some(f64::INFINITY)
        );
    }

    #[test]
    fn source_lag_is_zero_when_caught_up_and_grows_with_the_oldest_pending_change() {
        let m = Metrics::new("p");
        assert_eq!(
            sample(&m.render(), "slotstream_source_lag_seconds"),
            Some(0.0)
        );
        m.oldest_pending(Some(unix_micros_now() - 30_000_000));
        let lag = sample(&m.render(), "slotstream_source_lag_seconds").unwrap_or(0.0);
        assert!((29.0..60.0).contains(&lag), "{lag}");
        m.oldest_pending(None);
        assert_eq!(
            sample(&m.render(), "slotstream_source_lag_seconds"),
            Some(0.0)
        );
    }

    #[test]
    fn readiness_needs_the_source_the_destination_and_the_slot() {
        let m = Metrics::new("p");
        assert_eq!(m.readiness(), Err("connecting to the source".into()));
        m.source_state(Some("streaming"), None);
        assert_eq!(m.readiness(), Ok("streaming"));
        m.destination_state(Some("broker down".into()));
        assert!(m.readiness().unwrap_err().contains("broker down"));
        assert_eq!(sample(&m.render(), "slotstream_ready"), Some(0.0));
        m.destination_state(None);
        assert_eq!(sample(&m.render(), "slotstream_ready"), Some(1.0));
        m.source_state(None, Some("connection refused".into()));
        assert!(m.readiness().unwrap_err().contains("connection refused"));
        m.source_state(Some("full sync"), None);
        m.fatal("the slot was invalidated".into());
        assert!(m.readiness().unwrap_err().contains("invalidated"));
    }
}
