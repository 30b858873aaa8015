//! Full-sync progress: a bar on a terminal, a log line every few seconds otherwise, and the
//! metrics. Fed by the task that waits for the readers, from their shared counters (rows read,
//! ranges done), never per row.

use super::*;

/// Full-sync progress: a bar on a terminal, a log line every few seconds otherwise.
pub(super) struct Progress {
    pub(super) bar: Option<indicatif::ProgressBar>,
    pub(super) rows: u64,
    pub(super) estimate: u64,
    pub(super) ranges_done: u64,
    pub(super) ranges_total: u64,
    pub(super) started: Instant,
    pub(super) last_log: Instant,
    /// Rows counted in the metrics so far.
    reported: u64,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Progress {
    pub(super) fn new(
        estimated_rows: i64,
        ranges_total: u64,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        let estimate = u64::try_from(estimated_rows).unwrap_or(0);
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(estimate.max(1));
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "full sync {bar:40} {human_pos}/{human_len} rows  {per_sec}  ETA {eta}  {msg}",
            ) {
                bar.set_style(style);
            }
            bar.set_message(format!("ranges 0/{ranges_total}"));
            bar
        });
        let now = Instant::now();
        Progress {
            bar,
            rows: 0,
            estimate,
            ranges_done: 0,
            ranges_total,
            started: now,
            last_log: now,
            reported: 0,
            metrics,
        }
    }

    /// The readers have read `rows` rows and finished `ranges_done` ranges.
    pub(super) fn update(&mut self, rows: u64, ranges_done: u64) {
        self.rows = rows.max(self.rows);
        self.report();
        if let Some(bar) = &self.bar {
            if self.rows > bar.length().unwrap_or(0) {
                bar.set_length(self.rows);
            }
            bar.set_position(self.rows);
            if ranges_done != self.ranges_done {
                bar.set_message(format!("ranges {ranges_done}/{}", self.ranges_total));
            }
        } else if self.last_log.elapsed() >= PROGRESS_LOG_INTERVAL {
            self.last_log = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            let rate = self.rows as f64 / secs;
            let eta = if self.estimate > self.rows && rate > 0.0 {
                format!("{:.0}s", (self.estimate - self.rows) as f64 / rate)
            } else {
                "unknown".into()
            };
            tracing::info!(
                rows = self.rows,
                estimate = self.estimate,
                rows_per_sec = rate as u64,
                eta = %eta,
                ranges_done,
                ranges_total = self.ranges_total,
                "full sync progress"
            );
        }
        self.ranges_done = ranges_done;
    }

    /// Adds the rows read since the last report to the metrics.
    fn report(&mut self) {
        self.metrics.full_sync_rows(self.rows - self.reported);
        self.reported = self.rows;
    }

    pub(super) fn finish(&mut self) {
        self.report();
        if let Some(bar) = &self.bar {
            bar.set_position(self.rows);
            bar.finish_and_clear();
        }
    }
}
