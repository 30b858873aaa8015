//! When a window closes: the dashboard's "Run Frequency" and "Sync Starting At", a cron
//! expression, or manual syncs (docs/architecture.md §4).
//!
//! Times are whole seconds since the Unix epoch, UTC. A window runs from one boundary to the
//! next; boundaries of a fixed frequency are `start_at + k × frequency` (k any integer), so a
//! 1-hour frequency starting at 02:30 closes windows at every half past. Pure arithmetic, unit
//! tested here: the deliverer asks [`Schedule::next_boundary`] and sleeps until then.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};

/// When windows close.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// No windows: micro-batches as changes arrive.
    Realtime,
    /// Windows of a fixed length, aligned to a time of day.
    Every {
        /// Window length (≥ 1 s).
        period: Duration,
        /// Seconds after midnight UTC that boundaries are aligned to.
        start_at_secs: u32,
    },
    /// Windows close when a cron expression (UTC) fires.
    Cron {
        /// The expression as written.
        expression: String,
        /// Parsed.
        cron: Box<croner::Cron>,
    },
    /// Windows close only on `slotstream sync` or at the end of `slotstream run --once`.
    Manual,
}

impl Schedule {
    /// Parses a cron expression (5 fields, or 6 with seconds first), UTC.
    pub fn cron(expression: &str) -> Result<Schedule, String> {
        let cron = croner::Cron::from_str(expression).map_err(|e| e.to_string())?;
        // An expression that never fires (e.g. 30 February) would hold a window open forever.
        let schedule = Schedule::Cron {
            expression: expression.to_owned(),
            cron: Box::new(cron),
        };
        match schedule.next_boundary(0) {
            Some(_) => Ok(schedule),
            None => Err("it never fires".into()),
        }
    }

    /// Whether changes are batched into windows (anything but realtime).
    pub fn is_windowed(&self) -> bool {
        !matches!(self, Schedule::Realtime)
    }

    /// The first boundary strictly after `now` (seconds since the epoch); `None` when windows
    /// close only on request (manual, realtime).
    pub fn next_boundary(&self, now: i64) -> Option<i64> {
        match self {
            Schedule::Realtime | Schedule::Manual => None,
            Schedule::Every {
                period,
                start_at_secs,
            } => {
                let period = period.as_secs().max(1) as i64;
                let anchor = i64::from(*start_at_secs);
                let k = (now - anchor).div_euclid(period);
                Some(anchor + (k + 1) * period)
            }
            Schedule::Cron { cron, .. } => {
                let after = DateTime::<Utc>::from_timestamp(now, 0)?;
                cron.find_next_occurrence(&after, false)
                    .ok()
                    .map(|t| t.timestamp())
            }
        }
    }

    /// A short description for `status` and logs.
    pub fn describe(&self) -> String {
        match self {
            Schedule::Realtime => "realtime".into(),
            Schedule::Manual => "manual (`slotstream sync`)".into(),
            Schedule::Every {
                period,
                start_at_secs,
            } => format!(
                "every {} from {:02}:{:02} UTC",
                humantime::format_duration(*period),
                start_at_secs / 3600,
                start_at_secs % 3600 / 60
            ),
            Schedule::Cron { expression, .. } => format!("cron {expression:?} (UTC)"),
        }
    }
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Schedule::Realtime, Schedule::Realtime) | (Schedule::Manual, Schedule::Manual) => true,
            (
                Schedule::Every {
                    period: a,
                    start_at_secs: x,
                },
                Schedule::Every {
                    period: b,
                    start_at_secs: y,
                },
            ) => a == b && x == y,
            (Schedule::Cron { expression: a, .. }, Schedule::Cron { expression: b, .. }) => a == b,
            _ => false,
        }
    }
}

/// RFC 3339 of seconds since the epoch (for `status` and logs).
pub fn rfc3339(secs: i64) -> String {
    DateTime::<Utc>::from_timestamp(secs, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| secs.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    fn every(secs: u64, start_at_secs: u32) -> Schedule {
        Schedule::Every {
            period: Duration::from_secs(secs),
            start_at_secs,
        }
    }

    #[test]
    fn fixed_windows_are_aligned_to_start_at() {
        // 1 h from 02:30: boundaries at every half past.
        let s = every(3600, 2 * 3600 + 1800);
        let midnight = 20_000 * DAY;
        assert_eq!(s.next_boundary(midnight), Some(midnight + 1800));
        assert_eq!(s.next_boundary(midnight + 1800), Some(midnight + 5400));
        assert_eq!(s.next_boundary(midnight + 1799), Some(midnight + 1800));
        // 24 h from 02:00: the next 02:00.
        let daily = every(86_400, 7200);
        assert_eq!(
            daily.next_boundary(midnight + 7200),
            Some(midnight + DAY + 7200)
        );
        assert_eq!(daily.next_boundary(midnight + 3600), Some(midnight + 7200));
        // Seconds-long windows (tests) work the same way.
        let fast = every(3, 0);
        assert_eq!(fast.next_boundary(10), Some(12));
        assert_eq!(fast.next_boundary(12), Some(15));
    }

    #[test]
    fn cron_fires_at_its_times_in_utc() {
        let s = Schedule::cron("0 2 * * *").expect("parses");
        let midnight = 20_000 * DAY;
        assert_eq!(s.next_boundary(midnight), Some(midnight + 7200));
        assert_eq!(
            s.next_boundary(midnight + 7200),
            Some(midnight + DAY + 7200)
        );
        let every_5s = Schedule::cron("*/5 * * * * *").expect("seconds field");
        assert_eq!(every_5s.next_boundary(midnight + 1), Some(midnight + 5));
        assert!(Schedule::cron("not cron").is_err());
        assert!(
            Schedule::cron("0 0 30 2 *").is_err(),
            "30 February never fires"
        );
    }

    #[test]
    fn manual_and_realtime_have_no_boundaries() {
        assert_eq!(Schedule::Manual.next_boundary(5), None);
        assert_eq!(Schedule::Realtime.next_boundary(5), None);
        assert!(!Schedule::Realtime.is_windowed());
        assert!(Schedule::Manual.is_windowed());
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }
}
