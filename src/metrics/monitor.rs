//! The slot's watch: a task of its own, with a connection of its own, that polls the slot every
//! `[metrics] poll_interval` for the whole `run` (across sessions and destination outages).
//!
//! It never touches the stream: a slow or failing poll delays only the next poll. Each poll
//! updates the slot series of [`Metrics`], feeds the WAL rate and the invalidation forecast
//! ([`super::forecast`]), warns when the lag passes `lag_warn_bytes` or the forecast falls
//! below an hour, and, when the server has invalidated the slot (`wal_status = lost`), reports
//! it on the watch channel the run stops on: the changes since the checkpoint are gone from the
//! WAL, so going on would lose them silently. A slot that is about to be replaced anyway (a full
//! sync pending or requested) is not reported.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::Metrics;
use super::forecast::{Alarm, FORECAST_WARN, Forecaster, Sample, Verdict, human_seconds};
use crate::config::Config;
use crate::postgres;

/// One poll's reading of the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotReading {
    /// Whether the slot exists.
    pub exists: bool,
    /// Whether a process streams from it.
    pub active: bool,
    /// The walsender's pid.
    pub active_pid: Option<i32>,
    /// `wal_status`.
    pub wal_status: Option<String>,
    /// `safe_wal_size` (`None`: no `max_slot_wal_keep_size`).
    pub safe_wal_size: Option<i64>,
    /// Why the server invalidated it (PostgreSQL 17+).
    pub invalidation_reason: Option<String>,
    /// `confirmed_flush_lsn` (X/Y).
    pub confirmed_flush_lsn: Option<String>,
    /// `current - confirmed_flush_lsn`.
    pub lag_bytes: Option<i64>,
    /// `current - restart_lsn`.
    pub retained_bytes: Option<i64>,
    /// The server's WAL position as a byte offset.
    pub wal_position: i64,
    /// A full sync will replace the slot (pending, running, or `resync` requested).
    pub full_sync_ahead: bool,
}

impl SlotReading {
    /// Why the run cannot go on from this slot, if it cannot.
    pub fn lost(&self) -> Option<String> {
        if !self.exists || self.full_sync_ahead {
            return None;
        }
        match (&self.invalidation_reason, self.wal_status.as_deref()) {
            (Some(reason), _) => Some(format!("the server invalidated it ({reason})")),
            (None, Some("lost")) => Some(
                "the server removed WAL it still needed (wal_status = lost: it held back more than max_slot_wal_keep_size)"
                    .into(),
            ),
            _ => None,
        }
    }
}

/// The poll: the slot and the server's position in one round trip. Optional columns are read
/// through `to_jsonb`, so the query runs on every supported version; `pg_replication_slots` and
/// the WAL position functions need no privilege beyond `LOGIN`.
pub const POLL_SQL: &str = r#"
SELECT s.slot_name IS NOT NULL,
       coalesce(s.active, false),
       s.active_pid,
       to_jsonb(s) ->> 'wal_status',
       (to_jsonb(s) ->> 'safe_wal_size')::int8,
       to_jsonb(s) ->> 'invalidation_reason',
       (w.lsn - s.confirmed_flush_lsn)::int8,
       (w.lsn - s.restart_lsn)::int8,
       (w.lsn - '0/0'::pg_lsn)::int8,
       s.confirmed_flush_lsn::text
  FROM (SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                    ELSE pg_current_wal_lsn() END AS lsn) w
  LEFT JOIN pg_replication_slots s ON s.slot_name = $1"#;

/// Whether the pipeline's state says a full sync will replace the slot.
const FULL_SYNC_AHEAD_SQL: &str = r#"
SELECT coalesce(bool_or(full_sync_state <> 'done' OR resync_requested), false)
  FROM "_rudderstack".cdc_checkpoints WHERE pipeline = $1"#;

/// Reads the slot (and, when it looks lost, whether a full sync replaces it anyway).
pub async fn read_slot(
    client: &tokio_postgres::Client,
    slot: &str,
    pipeline: &str,
) -> Result<SlotReading, tokio_postgres::Error> {
    let r = client.query_one(POLL_SQL, &[&slot]).await?;
    let mut reading = SlotReading {
        exists: r.get(0),
        active: r.get(1),
        active_pid: r.get(2),
        wal_status: r.get(3),
        safe_wal_size: r.get(4),
        invalidation_reason: r.get(5),
        lag_bytes: r.get(6),
        retained_bytes: r.get(7),
        wal_position: r.get::<_, Option<i64>>(8).unwrap_or(0),
        confirmed_flush_lsn: r.get(9),
        full_sync_ahead: false,
    };
    if reading.lost().is_some() {
        // The state tables may not exist yet (a first run before its migration).
        reading.full_sync_ahead = match client.query_one(FULL_SYNC_AHEAD_SQL, &[&pipeline]).await {
            Ok(row) => row.get(0),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => true,
            Err(e) => return Err(e),
        };
    }
    Ok(reading)
}

/// The slot's watch for one run. `lost` receives the reason once the slot is invalidated.
pub struct Monitor {
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    lost: watch::Sender<Option<String>>,
    forecaster: Forecaster,
    lag_alarm: Alarm,
    forecast_alarm: Alarm,
    poll_failures: u32,
    started: Instant,
}

impl Monitor {
    /// Starts the watch; it ends when `stop` turns true. The receiver gets the reason the slot
    /// can no longer be streamed from, if that happens.
    pub fn spawn(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        mut stop: watch::Receiver<bool>,
    ) -> (tokio::task::JoinHandle<()>, watch::Receiver<Option<String>>) {
        let (lost, lost_rx) = watch::channel(None);
        metrics
            .lag_warn_threshold
            .set(config.metrics.lag_warn_bytes as i64);
        let mut m = Monitor {
            config,
            metrics,
            lost,
            forecaster: Forecaster::default(),
            lag_alarm: Alarm::default(),
            forecast_alarm: Alarm::default(),
            poll_failures: 0,
            started: Instant::now(),
        };
        let task = tokio::spawn(async move {
            let mut client: Option<tokio_postgres::Client> = None;
            let mut tick = tokio::time::interval(m.config.metrics.poll_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tick.tick() => {}
                }
                let limit = m.config.metrics.poll_interval.max(Duration::from_secs(2));
                let polled = tokio::time::timeout(limit, m.poll(&mut client)).await;
                match polled {
                    Ok(Ok(())) => m.poll_failures = 0,
                    Ok(Err(e)) => m.poll_failed(&e),
                    Err(_) => {
                        client = None;
                        m.poll_failed("the poll took longer than poll_interval");
                    }
                }
                if m.lost.borrow().is_some() {
                    return;
                }
            }
        });
        (task, lost_rx)
    }

    async fn poll(&mut self, client: &mut Option<tokio_postgres::Client>) -> Result<(), String> {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            let c = postgres::connect(&self.config.source, &self.config.name)
                .await
                .map_err(|e| e.to_string())?;
            *client = Some(c.client);
        }
        let Some(c) = client.as_ref() else {
            return Ok(());
        };
        let reading = match read_slot(c, &self.config.source.slot, &self.config.name).await {
            Ok(r) => r,
            Err(e) => {
                *client = None;
                return Err(postgres::describe(&e));
            }
        };
        self.apply(&reading);
        Ok(())
    }

    fn poll_failed(&mut self, why: &str) {
        self.metrics.slot_polls_failed.inc();
        self.poll_failures += 1;
        // The first failure, then every 60th: a source that is down says so in the pipeline's
        // own errors already.
        if self.poll_failures % 60 == 1 {
            tracing::warn!(error = %why, "cannot poll the replication slot (lag metrics are stale)");
        }
    }

    /// Updates the series and the alarms from one reading.
    fn apply(&mut self, r: &SlotReading) {
        let m = &self.metrics;
        let at = self.started.elapsed().as_secs_f64();
        m.slot_active.set(i64::from(r.active));
        m.slot_lag.set(r.lag_bytes.unwrap_or(0).max(0));
        m.slot_retained.set(r.retained_bytes.unwrap_or(0).max(0));
        m.wal_position.set(r.wal_position);
        m.slot_safe_wal
            .set(r.safe_wal_size.map_or(f64::INFINITY, |s| s as f64));
        for s in super::WAL_STATUSES {
            m.slot_wal_status
                .with_label_values(&[s])
                .set(i64::from(r.wal_status.as_deref() == Some(s)));
        }
        let rate = self.forecaster.push(Sample {
            at_secs: at,
            wal_position: r.wal_position.max(0) as u64,
            safe_wal_size: r.safe_wal_size,
        });
        m.wal_rate.set(rate.unwrap_or(0.0));
        let left = if r.exists {
            self.forecaster.seconds_left()
        } else {
            f64::INFINITY
        };
        m.forecast.set(left);

        let slot = &self.config.source.slot;
        let lag = r.lag_bytes.unwrap_or(0).max(0) as u64;
        let threshold = self.config.metrics.lag_warn_bytes;
        match self.lag_alarm.check(r.exists && lag > threshold, at) {
            Verdict::Raised | Verdict::Repeat => {
                m.lag_warnings.inc();
                tracing::warn!(
                    slot = %slot,
                    lag = %bytesize::ByteSize(lag),
                    threshold = %bytesize::ByteSize(threshold),
                    wal_status = r.wal_status.as_deref().unwrap_or("unknown"),
                    invalidation_in = %human_seconds(left),
                    "the replication slot holds back more WAL than lag_warn_bytes: the server cannot recycle it until slotstream catches up"
                );
            }
            Verdict::Cleared => {
                tracing::info!(slot = %slot, lag = %bytesize::ByteSize(lag), "the replication slot's lag is back under lag_warn_bytes");
            }
            Verdict::Quiet => {}
        }
        match self
            .forecast_alarm
            .check(left < FORECAST_WARN.as_secs_f64(), at)
        {
            Verdict::Raised | Verdict::Repeat => tracing::warn!(
                slot = %slot,
                safe_wal_size = r.safe_wal_size.unwrap_or(0),
                wal_rate_per_sec = rate.unwrap_or(0.0) as u64,
                invalidation_in = %human_seconds(left),
                "at the current WAL rate the server invalidates the replication slot soon (max_slot_wal_keep_size): changes since the checkpoint would be lost and need a full sync"
            ),
            Verdict::Cleared => {
                tracing::info!(slot = %slot, "the replication slot is no longer near invalidation")
            }
            Verdict::Quiet => {}
        }
        if let Some(why) = r.lost() {
            let message = format!(
                "replication slot {slot:?} can no longer be streamed from: {why}; the changes since the last checkpoint are gone from the WAL"
            );
            tracing::error!("{message}");
            m.fatal(message);
            let _ = self.lost.send(Some(why));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading() -> SlotReading {
        SlotReading {
            exists: true,
            active: true,
            active_pid: Some(7),
            wal_status: Some("reserved".into()),
            safe_wal_size: None,
            invalidation_reason: None,
            confirmed_flush_lsn: None,
            lag_bytes: Some(0),
            retained_bytes: Some(0),
            wal_position: 0,
            full_sync_ahead: false,
        }
    }

    #[test]
    fn a_lost_slot_stops_the_run_unless_a_full_sync_replaces_it() {
        assert_eq!(reading().lost(), None);
        let lost = SlotReading {
            wal_status: Some("lost".into()),
            ..reading()
        };
        assert!(
            lost.lost()
                .is_some_and(|w| w.contains("max_slot_wal_keep_size"))
        );
        let reason = SlotReading {
            invalidation_reason: Some("wal_removed".into()),
            wal_status: Some("lost".into()),
            ..reading()
        };
        assert!(reason.lost().is_some_and(|w| w.contains("wal_removed")));
        let replaced = SlotReading {
            full_sync_ahead: true,
            ..lost.clone()
        };
        assert_eq!(replaced.lost(), None);
        let missing = SlotReading {
            exists: false,
            ..lost
        };
        assert_eq!(
            missing.lost(),
            None,
            "a missing slot is the session's to report"
        );
    }
}
