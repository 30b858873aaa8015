//! The slot's safety, decided from polls (pure: the monitor does the I/O): the WAL rate, the
//! time left before `max_slot_wal_keep_size` invalidates the slot, and when to warn.

use std::time::Duration;

/// The WAL rate is smoothed over about this long.
const RATE_WINDOW_SECS: f64 = 60.0;
/// While a condition lasts, its warning is logged again this often.
pub const REPEAT_WARNING: Duration = Duration::from_secs(300);
/// A forecast below this is logged as a warning.
pub const FORECAST_WARN: Duration = Duration::from_secs(3600);

/// One poll of the slot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Seconds on a monotonic clock.
    pub at_secs: f64,
    /// The server's WAL position, as a byte offset.
    pub wal_position: u64,
    /// `safe_wal_size` (`None`: no `max_slot_wal_keep_size`).
    pub safe_wal_size: Option<i64>,
}

/// The WAL rate and the invalidation forecast, from successive samples.
#[derive(Debug, Default)]
pub struct Forecaster {
    last: Option<Sample>,
    rate: Option<f64>,
}

impl Forecaster {
    /// Takes a poll; returns the smoothed WAL rate (bytes/s) once two polls were seen.
    pub fn push(&mut self, s: Sample) -> Option<f64> {
        if let Some(prev) = self.last {
            let dt = s.at_secs - prev.at_secs;
            if dt > 0.0 {
                // A position that went back (a restored server) counts as no WAL written.
                let bytes = s.wal_position.saturating_sub(prev.wal_position) as f64;
                let now = bytes / dt;
                let alpha = 1.0 - (-dt / RATE_WINDOW_SECS).exp();
                self.rate = Some(match self.rate {
                    None => now,
                    Some(r) => r + alpha * (now - r),
                });
            }
        }
        self.last = Some(s);
        self.rate
    }

    /// Seconds left before the slot is invalidated: `safe_wal_size / rate`; infinite without a
    /// limit or without WAL being written, 0 when no safe WAL is left.
    pub fn seconds_left(&self) -> f64 {
        let Some(last) = self.last else {
            return f64::INFINITY;
        };
        match (last.safe_wal_size, self.rate) {
            (None, _) => f64::INFINITY,
            (Some(safe), _) if safe <= 0 => 0.0,
            (Some(safe), Some(rate)) if rate > 0.0 => safe as f64 / rate,
            (Some(_), _) => f64::INFINITY,
        }
    }
}

/// When a warning is logged: on entering a condition, then every [`REPEAT_WARNING`] while it
/// lasts; and once when it ends.
#[derive(Debug, Default)]
pub struct Alarm {
    since_last: Option<f64>,
}

/// What an [`Alarm`] says about a poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to log.
    Quiet,
    /// The condition started: log a warning (and count it).
    Raised,
    /// It still holds and the last warning is old: log it again.
    Repeat,
    /// It ended: log that it did.
    Cleared,
}

impl Alarm {
    /// Whether the condition holds at `at_secs`.
    pub fn check(&mut self, holds: bool, at_secs: f64) -> Verdict {
        match (holds, self.since_last) {
            (false, None) => Verdict::Quiet,
            (false, Some(_)) => {
                self.since_last = None;
                Verdict::Cleared
            }
            (true, None) => {
                self.since_last = Some(at_secs);
                Verdict::Raised
            }
            (true, Some(last)) if at_secs - last >= REPEAT_WARNING.as_secs_f64() => {
                self.since_last = Some(at_secs);
                Verdict::Repeat
            }
            (true, Some(_)) => Verdict::Quiet,
        }
    }

    /// Whether the condition holds (as last checked).
    pub fn is_raised(&self) -> bool {
        self.since_last.is_some()
    }
}

/// A duration for people: `3h12m`, `45s`, `more than a year`.
pub fn human_seconds(secs: f64) -> String {
    if !secs.is_finite() {
        return "no limit".into();
    }
    if secs > 365.0 * 86400.0 {
        return "more than a year".into();
    }
    let d = Duration::from_secs(secs.max(0.0) as u64);
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(at: f64, pos: u64, safe: Option<i64>) -> Sample {
        Sample {
            at_secs: at,
            wal_position: pos,
            safe_wal_size: safe,
        }
    }

    #[test]
    fn forecast_is_safe_size_over_the_smoothed_rate() {
        let mut f = Forecaster::default();
        assert_eq!(f.push(s(0.0, 0, Some(1_000_000))), None);
        assert_eq!(f.seconds_left(), f64::INFINITY, "no rate yet");
        assert_eq!(f.push(s(5.0, 50_000, Some(950_000))), Some(10_000.0));
        assert!((f.seconds_left() - 95.0).abs() < 1e-9);
        // A burst moves the smoothed rate part of the way only.
        let rate = f.push(s(10.0, 1_050_000, Some(0))).unwrap_or(0.0);
        assert!(rate > 10_000.0 && rate < 200_000.0, "{rate}");
        assert_eq!(f.seconds_left(), 0.0, "nothing left");
    }

    #[test]
    fn no_limit_or_no_writes_means_no_forecast() {
        let mut f = Forecaster::default();
        f.push(s(0.0, 100, None));
        f.push(s(5.0, 5000, None));
        assert_eq!(f.seconds_left(), f64::INFINITY);
        let mut f = Forecaster::default();
        f.push(s(0.0, 100, Some(10)));
        f.push(s(5.0, 100, Some(10)));
        assert_eq!(f.seconds_left(), f64::INFINITY);
        // A position that goes back is no WAL written, not a negative rate.
        f.push(s(10.0, 50, Some(10)));
        assert_eq!(f.seconds_left(), f64::INFINITY);
    }

    #[test]
    fn alarm_raises_repeats_and_clears() {
        let mut a = Alarm::default();
        assert_eq!(a.check(false, 0.0), Verdict::Quiet);
        assert_eq!(a.check(true, 1.0), Verdict::Raised);
        assert!(a.is_raised());
        assert_eq!(a.check(true, 2.0), Verdict::Quiet);
        assert_eq!(a.check(true, 1.0 + 300.0), Verdict::Repeat);
        assert_eq!(a.check(false, 400.0), Verdict::Cleared);
        assert_eq!(a.check(false, 401.0), Verdict::Quiet);
        assert!(!a.is_raised());
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_seconds(f64::INFINITY), "no limit");
        assert_eq!(human_seconds(90.0), "1m 30s");
        assert_eq!(human_seconds(1e12), "more than a year");
    }
}
