//! `[metrics]`: the endpoint and the slot's safety thresholds.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

/// Default `lag_warn_bytes`: 1 GiB of WAL held back.
const DEFAULT_LAG_WARN: u64 = 1 << 30;
/// Default `poll_interval`.
const DEFAULT_POLL: Duration = Duration::from_secs(5);

/// `[metrics]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    listen: Option<String>,
    lag_warn_bytes: Option<toml::Value>,
    poll_interval: Option<String>,
}

/// `[metrics]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Where `/metrics`, `/healthz` and `/readyz` are served (`None`: no endpoint; the slot is
    /// watched all the same).
    pub listen: Option<SocketAddr>,
    /// Slot lag above which a warning is logged (and counted).
    pub lag_warn_bytes: u64,
    /// How often the slot is polled.
    pub poll_interval: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: None,
            lag_warn_bytes: DEFAULT_LAG_WARN,
            poll_interval: DEFAULT_POLL,
        }
    }
}

impl RawMetrics {
    /// Validates the keys; `Err((key, message))` names the key at fault.
    pub fn validate(self) -> Result<MetricsConfig, (String, String)> {
        let mut c = MetricsConfig::default();
        if let Some(s) = self.listen {
            c.listen = Some(s.parse::<SocketAddr>().map_err(|_| {
                (
                    "metrics.listen".to_owned(),
                    format!(
                        "is {s:?}; write an address and port such as \"127.0.0.1:9187\" (\"0.0.0.0:9187\" for every interface)"
                    ),
                )
            })?);
        }
        if let Some(v) = self.lag_warn_bytes {
            let bad = |shown: &str| {
                (
                    "metrics.lag_warn_bytes".to_owned(),
                    format!(
                        "is {shown}; write a size such as \"1GiB\" or \"512MB\", or a number of bytes"
                    ),
                )
            };
            c.lag_warn_bytes = match &v {
                toml::Value::Integer(n) if *n > 0 => *n as u64,
                toml::Value::String(s) => s
                    .parse::<bytesize::ByteSize>()
                    .map_err(|_| bad(&format!("{s:?}")))?
                    .as_u64(),
                other => return Err(bad(&other.to_string())),
            };
            if c.lag_warn_bytes == 0 {
                return Err(bad("0"));
            }
        }
        if let Some(s) = self.poll_interval {
            let d = humantime::parse_duration(&s).map_err(|e| {
                (
                    "metrics.poll_interval".to_owned(),
                    format!("is {s:?}: {e}; write a duration such as \"5s\""),
                )
            })?;
            if d < Duration::from_millis(500) || d > Duration::from_secs(300) {
                return Err((
                    "metrics.poll_interval".to_owned(),
                    format!("is {s:?}; it must lie between 500ms and 5m"),
                ));
            }
            c.poll_interval = d;
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<MetricsConfig, (String, String)> {
        let raw: RawMetrics = toml::from_str(text).map_err(|e| ("toml".into(), e.to_string()))?;
        raw.validate()
    }

    #[test]
    fn defaults_and_values() {
        assert_eq!(parse("").ok(), Some(MetricsConfig::default()));
        let c = parse(
            "listen = \"127.0.0.1:9187\"\nlag_warn_bytes = \"64MiB\"\npoll_interval = \"1s\"",
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            c.listen,
            Some("127.0.0.1:9187".parse().unwrap_or_else(|_| unreachable!()))
        );
        assert_eq!(c.lag_warn_bytes, 64 << 20);
        assert_eq!(c.poll_interval, Duration::from_secs(1));
        assert_eq!(
            parse("lag_warn_bytes = 1000").map(|c| c.lag_warn_bytes),
            Ok(1000)
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("listen = \"localhost\"", "metrics.listen"),
            ("lag_warn_bytes = \"lots\"", "metrics.lag_warn_bytes"),
            ("lag_warn_bytes = 0", "metrics.lag_warn_bytes"),
            ("lag_warn_bytes = -5", "metrics.lag_warn_bytes"),
            ("poll_interval = \"10ms\"", "metrics.poll_interval"),
            ("poll_interval = \"soon\"", "metrics.poll_interval"),
        ] {
            assert_eq!(parse(text).map_err(|e| e.0), Err(key.to_owned()), "{text}");
        }
        assert!(parse("unknown = 1").is_err());
    }
}
