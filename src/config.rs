//! Configuration: a TOML file, overridden by `SLOTSTREAM__SECTION__KEY` environment variables,
//! read in two steps.
//!
//! 1. [`RawConfig`] is what serde reads: every table rejects unknown keys, so a typo is an error
//!    that names the key, never a silently ignored setting.
//! 2. [`RawConfig::validate`] turns it into a [`Config`]: defaults filled in, durations and sizes
//!    parsed, the password read from its source. Every message names the key and the fix.
//!
//! Secrets are [`SecretString`]s: they never appear in `Debug` output, logs or error messages.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;

use crate::batch::schedule::Schedule;
pub use crate::metrics::{MetricsConfig, RawMetrics};
use serde::Deserialize;

pub use crate::sink::{DestinationConfig, RawDestination};

/// The prefix of environment variables that override config keys: `SLOTSTREAM__SOURCE__PORT=5433`.
pub const ENV_PREFIX: &str = "SLOTSTREAM__";

/// A configuration that cannot be used, with the key at fault and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file named by `--config`.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed or has an unknown or mistyped key.
    #[error("config file {path} is not valid: {message}")]
    Parse {
        /// The file named by `--config`.
        path: PathBuf,
        /// What the TOML parser said, with line and column.
        message: String,
    },
    /// An environment override could not be applied.
    #[error("environment variable {var} cannot override the config: {message}")]
    Env {
        /// The variable's name.
        var: String,
        /// Why it was refused.
        message: String,
    },
    /// A key has a value that cannot work.
    #[error("config key `{key}` {message}")]
    Invalid {
        /// The dotted key, e.g. `schedule.frequency`.
        key: String,
        /// What is wrong and what to write instead.
        message: String,
    },
}

impl ConfigError {
    fn invalid(key: &str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.to_owned(),
            message: message.into(),
        }
    }

    /// What the operator should do.
    pub fn hint(&self) -> String {
        match self {
            ConfigError::Read { .. } => "check the path given to --config".into(),
            ConfigError::Parse { .. } => {
                "fix the key named above; README.md lists every key and its default".into()
            }
            ConfigError::Env { .. } => "fix or unset that environment variable".into(),
            ConfigError::Invalid { .. } => "edit the config file and run the command again".into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Step 1: what serde reads.
// ---------------------------------------------------------------------------------------------

/// The config file as written, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Pipeline name.
    pub name: String,
    /// `[source]`.
    pub source: RawSource,
    /// `[mapping]`.
    #[serde(default)]
    pub mapping: RawMapping,
    /// `[schedule]`.
    #[serde(default)]
    pub schedule: RawSchedule,
    /// `[sync]`.
    #[serde(default)]
    pub sync: RawSync,
    /// `[destination]`.
    pub destination: RawDestination,
    /// `[metrics]`.
    #[serde(default)]
    pub metrics: RawMetrics,
}

/// `[source]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    host: Option<String>,
    port: Option<u16>,
    database: String,
    user: String,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    password: Option<SecretString>,
    sslmode: Option<String>,
    sslrootcert: Option<PathBuf>,
    schema: Option<String>,
    table: String,
    slot: Option<String>,
    publication: Option<String>,
}

/// `[mapping]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMapping {
    columns: Option<Vec<String>>,
    #[serde(default)]
    constants: toml::Table,
    filter: Option<String>,
    #[serde(default)]
    identifiers: RawIdentifiers,
    #[serde(default)]
    trait_keys: BTreeMap<String, String>,
}

/// `[mapping.identifiers]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentifiers {
    user_id: Option<String>,
    anonymous_id: Option<String>,
    email: Option<String>,
}

/// `[schedule]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSchedule {
    frequency: Option<String>,
    start_at: Option<String>,
    cron: Option<String>,
    max_batch_events: Option<usize>,
    max_batch_delay: Option<String>,
    memory_limit: Option<String>,
}

/// `[sync]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSync {
    mode: Option<String>,
    ledger: Option<bool>,
    on_truncate: Option<String>,
    history_retention: Option<String>,
    history_keep_runs: Option<u64>,
    snapshot_workers: Option<i64>,
}

// ---------------------------------------------------------------------------------------------
// Step 2: the validated config.
// ---------------------------------------------------------------------------------------------

/// A validated configuration: every default filled in, every value usable.
#[derive(Debug, Clone)]
pub struct Config {
    /// Pipeline name; the slot and publication defaults and the state rows derive from it.
    pub name: String,
    /// Where the table lives.
    pub source: SourceConfig,
    /// Which columns become which traits.
    pub mapping: MappingConfig,
    /// When batches are delivered.
    pub schedule: ScheduleConfig,
    /// Whether deletes are sent.
    pub sync_mode: SyncMode,
    /// `sync.ledger`: the sent-state ledger in `_rudderstack` is kept (mirror deletes under the
    /// default replica identity, no-op suppression, `resync --changed-only`).
    pub ledger: bool,
    /// What a TRUNCATE does (mirror mode with the ledger).
    pub on_truncate: OnTruncate,
    /// How much of the sync history (`_rudderstack.cdc_sync_runs`) is kept.
    pub history: SyncHistory,
    /// `sync.snapshot_workers`: connections that read the full sync's snapshot in parallel.
    pub snapshot_workers: SnapshotWorkers,
    /// Where events go.
    pub destination: DestinationConfig,
    /// `[metrics]`: the endpoint and the slot's safety thresholds.
    pub metrics: MetricsConfig,
}

/// How to reach PostgreSQL and which table to follow.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Host name, IP address, or a unix socket directory (starts with `/`).
    pub host: String,
    /// TCP port (also names the unix socket file).
    pub port: u16,
    /// Database name.
    pub database: String,
    /// Role to connect as.
    pub user: String,
    /// The password, if any; never printed.
    pub password: Option<SecretString>,
    /// TLS mode.
    pub sslmode: SslMode,
    /// CA bundle for `verify-ca` / `verify-full` (default: the Mozilla roots).
    pub sslrootcert: Option<PathBuf>,
    /// Schema of the table.
    pub schema: String,
    /// The table.
    pub table: String,
    /// Replication slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
}

/// libpq's `sslmode` values that slotstream supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, without certificate checks.
    Prefer,
    /// TLS always, without certificate checks.
    Require,
    /// TLS with the certificate chain checked against the CA, not the host name.
    VerifyCa,
    /// TLS with the chain and the host name checked.
    VerifyFull,
}

impl SslMode {
    /// The name as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Which columns become traits, under which keys, and who the user is.
#[derive(Debug, Clone)]
pub struct MappingConfig {
    /// Selected columns; `None` means every column of the table (new columns included).
    pub columns: Option<Vec<String>>,
    /// Traits added to every event.
    pub constants: serde_json::Map<String, serde_json::Value>,
    /// Optional SQL boolean expression over the table's columns.
    pub filter: Option<String>,
    /// Identifier columns.
    pub identifiers: IdentifierColumns,
    /// Column name → trait key, for columns whose trait key differs from their name.
    pub trait_keys: BTreeMap<String, String>,
}

/// The columns that identify the user. A configured name must exist; a default name is used
/// only when the table has such a column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifierColumns {
    /// Column whose value becomes `userId`.
    pub user_id: IdentifierColumn,
    /// Column whose value becomes `anonymousId`.
    pub anonymous_id: IdentifierColumn,
    /// Column holding the email (a row with only an email gets a derived `anonymousId`).
    pub email: IdentifierColumn,
}

/// One identifier column: configured explicitly, or the default name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentifierColumn {
    /// Named under `[mapping.identifiers]`: the table must have it.
    Configured(String),
    /// The default name (`user_id`, `anonymous_id`, `email`): used if the table has it.
    Default(&'static str),
}

impl IdentifierColumn {
    /// The column name.
    pub fn name(&self) -> &str {
        match self {
            IdentifierColumn::Configured(s) => s,
            IdentifierColumn::Default(s) => s,
        }
    }
}

impl IdentifierColumns {
    /// The three, in the order userId, anonymousId, email.
    pub fn all(&self) -> [&IdentifierColumn; 3] {
        [&self.user_id, &self.anonymous_id, &self.email]
    }
}

/// When batches are delivered.
#[derive(Debug, Clone)]
pub struct ScheduleConfig {
    /// Realtime micro-batches, or windows closed by a frequency, a cron expression or on request.
    pub schedule: Schedule,
    /// A batch is delivered when it holds this many events (realtime; and the page size when a
    /// window is delivered)…
    pub max_batch_events: usize,
    /// …or when its first event has waited this long (realtime).
    pub max_batch_delay: Duration,
    /// Cap on buffered bytes; reaching it flushes early (realtime) or stages the window, never
    /// drops.
    pub memory_limit: u64,
}

/// What a TRUNCATE of the followed table does in mirror mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnTruncate {
    /// `Record Deleted` for every row the ledger holds.
    DeleteAll,
    /// A log line only (the destination keeps every user).
    Log,
}

/// Whether deletes are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Inserts and updates become `identify` events; deletes are ignored.
    Upsert,
    /// Deletes also become `Record Deleted` track events.
    Mirror,
}

/// How many connections read a full sync's snapshot (`sync.snapshot_workers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotWorkers {
    /// Absent: decided per full sync from the table's size and the cores
    /// ([`SnapshotWorkers::resolve`]).
    Auto,
    /// Exactly this many (1..=[`SnapshotWorkers::MAX`]); 1 reads on the control connection.
    Fixed(u16),
}

impl SnapshotWorkers {
    /// The most workers a config may ask for.
    pub const MAX: u16 = 16;
    /// Under this relation size (bytes) `Auto` reads with one connection.
    pub const AUTO_MIN_BYTES: u64 = 64 * 1024 * 1024;
    /// Under this row estimate `Auto` reads with one connection.
    pub const AUTO_MIN_ROWS: i64 = 100_000;
    /// `Auto`'s ceiling, whatever the cores.
    pub const AUTO_MAX: u16 = 4;

    /// The workers of one full sync of a table of `relation_bytes` and `estimated_rows` (-1:
    /// never analyzed) on a machine with `cores`: `Fixed(n)` is `n`; `Auto` is 1 for a small
    /// table (under 64 MiB or under 100,000 estimated rows), else `min(cores, 4)`.
    pub fn resolve(self, relation_bytes: u64, estimated_rows: i64, cores: usize) -> u16 {
        match self {
            SnapshotWorkers::Fixed(n) => n.max(1),
            SnapshotWorkers::Auto => {
                let small = relation_bytes < Self::AUTO_MIN_BYTES
                    || (0..Self::AUTO_MIN_ROWS).contains(&estimated_rows);
                if small {
                    1
                } else {
                    u16::try_from(cores)
                        .unwrap_or(u16::MAX)
                        .clamp(1, Self::AUTO_MAX)
                }
            }
        }
    }
}

/// How much of the sync history is kept: a run is deleted once it is older than `retention` or
/// no longer among the newest `keep_runs`, whichever comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncHistory {
    /// `sync.history_retention` (default 30 days).
    pub retention: Duration,
    /// `sync.history_keep_runs` (default 10000).
    pub keep_runs: u32,
}

impl Config {
    /// Reads, overrides from the environment, and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text, path, std::env::vars())
    }

    /// Parses `text` (read from `path`, used in messages), applies `env` overrides, validates.
    pub fn from_toml_str(
        text: &str,
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let parse_err = |message: String| ConfigError::Parse {
            path: path.to_owned(),
            message,
        };
        let mut table: toml::Table = toml::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        apply_env_overrides(&mut table, env)?;
        let raw: RawConfig = match toml::Value::Table(table).try_into() {
            Ok(raw) => raw,
            Err(e) => {
                let e: toml::de::Error = e;
                // The merged table has no positions; the file as written does, so when the
                // error is in the file, report it with its line and the offending text.
                return Err(parse_err(match toml::from_str::<RawConfig>(text) {
                    Err(at) if at.message() == e.message() => at.to_string().trim_end().to_owned(),
                    _ => e.message().to_owned(),
                }));
            }
        };
        raw.validate(&|var| std::env::var(var).ok())
    }
}

/// Sets `[section] key` from each `SLOTSTREAM__SECTION__KEY` variable. The value is read as a
/// TOML value when it parses as one (`5432`, `true`, `["a","b"]`), else as a string.
fn apply_env_overrides(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    for (var, value) in vars {
        let path: Vec<String> = var[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::Env {
                var,
                message:
                    "expected SLOTSTREAM__SECTION__KEY (or SLOTSTREAM__KEY for top-level keys)"
                        .into(),
            });
        }
        let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(value));
        let (leaf, parents) = match path.split_last() {
            Some(split) => split,
            None => continue,
        };
        let mut cursor = &mut *table;
        for part in parents {
            let entry = cursor
                .entry(part.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cursor = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(ConfigError::Env {
                        var,
                        message: format!("`{part}` is not a table in the config"),
                    });
                }
            };
        }
        cursor.insert(leaf.clone(), parsed);
    }
    Ok(())
}

/// Checks that a name is usable as a PostgreSQL identifier (non-empty, ≤ 63 bytes, no NUL).
/// Quoting is always applied where it is used, so any other character is fine.
fn check_identifier(key: &str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() {
        return Err(ConfigError::invalid(key, "must not be empty"));
    }
    if value.len() > 63 {
        return Err(ConfigError::invalid(
            key,
            format!(
                "is {} bytes long; PostgreSQL names are at most 63 bytes",
                value.len()
            ),
        ));
    }
    if value.contains('\0') {
        return Err(ConfigError::invalid(
            key,
            "must not contain a NUL character",
        ));
    }
    Ok(())
}

/// Slot names may hold only lower-case letters, digits and underscores (a server rule).
fn check_slot_name(value: &str) -> Result<(), ConfigError> {
    check_identifier("source.slot", value)?;
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(ConfigError::invalid(
            "source.slot",
            format!(
                "is {value:?}; a replication slot name may contain only lower-case letters, digits and underscores"
            ),
        ));
    }
    Ok(())
}

/// The default slot/publication name for a pipeline: `slotstream_<name>` with every character
/// that a slot name cannot hold replaced by `_`.
pub fn default_object_name(pipeline: &str) -> String {
    let mut out = String::from("slotstream_");
    for c in pipeline.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else {
            out.push('_');
        }
    }
    out.truncate(63);
    out
}

/// Parses a duration such as `200ms`, `15m`, `1h`, `24h`.
fn parse_duration(key: &str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value).map_err(|e| {
        ConfigError::invalid(
            key,
            format!("is {value:?}, not a duration ({e}); write e.g. \"200ms\", \"15m\", \"1h\""),
        )
    })
}

impl RawConfig {
    /// Step 2: defaults, parsing and cross-checks. `getenv` reads `password_env`.
    pub fn validate(self, getenv: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let name = self.name.trim().to_owned();
        if name.is_empty() {
            return Err(ConfigError::invalid("name", "must not be empty"));
        }
        let source = self.source.validate(&name, getenv)?;
        let mapping = self.mapping.validate()?;
        let schedule = self.schedule.validate()?;
        let sync_mode = match self.sync.mode.as_deref().unwrap_or("upsert") {
            "upsert" => SyncMode::Upsert,
            "mirror" => SyncMode::Mirror,
            other => {
                return Err(ConfigError::invalid(
                    "sync.mode",
                    format!("is {other:?}; use \"upsert\" or \"mirror\""),
                ));
            }
        };
        let history = self.sync.history()?;
        let snapshot_workers = self.sync.snapshot_workers()?;
        let ledger = self.sync.ledger.unwrap_or(true);
        let on_truncate = match self.sync.on_truncate.as_deref() {
            None if sync_mode == SyncMode::Mirror && ledger => OnTruncate::DeleteAll,
            None | Some("log") => OnTruncate::Log,
            Some("delete_all") if sync_mode == SyncMode::Mirror && ledger => OnTruncate::DeleteAll,
            Some("delete_all") => {
                return Err(ConfigError::invalid(
                    "sync.on_truncate",
                    "is \"delete_all\", which sends `Record Deleted` for every row the ledger holds: it needs mode = \"mirror\" and ledger = true",
                ));
            }
            Some(other) => {
                return Err(ConfigError::invalid(
                    "sync.on_truncate",
                    format!("is {other:?}; use \"delete_all\" (mirror mode) or \"log\""),
                ));
            }
        };
        let destination = self
            .destination
            .validate(getenv)
            .map_err(|(key, message)| ConfigError::invalid(&key, message))?;
        let metrics = self
            .metrics
            .validate()
            .map_err(|(key, message)| ConfigError::invalid(&key, message))?;
        Ok(Config {
            name,
            source,
            mapping,
            schedule,
            sync_mode,
            ledger,
            on_truncate,
            history,
            snapshot_workers,
            destination,
            metrics,
        })
    }
}

impl RawSource {
    fn validate(
        self,
        pipeline: &str,
        getenv: &dyn Fn(&str) -> Option<String>,
    ) -> Result<SourceConfig, ConfigError> {
        let password_sources = [
            self.password_env.is_some(),
            self.password_file.is_some(),
            self.password.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if password_sources > 1 {
            return Err(ConfigError::invalid(
                "source.password",
                "is given more than once; keep only one of password_env, password_file, password",
            ));
        }
        let password = if let Some(var) = &self.password_env {
            match getenv(var) {
                Some(v) => Some(SecretString::from(v)),
                None => {
                    return Err(ConfigError::invalid(
                        "source.password_env",
                        format!(
                            "names {var}, which is not set; export it before running slotstream"
                        ),
                    ));
                }
            }
        } else if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::invalid(
                    "source.password_file",
                    format!("names {}, which cannot be read: {e}", path.display()),
                )
            })?;
            Some(SecretString::from(
                text.trim_end_matches(['\n', '\r']).to_owned(),
            ))
        } else {
            self.password
        };
        let sslmode = match self.sslmode.as_deref().unwrap_or("prefer") {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(ConfigError::invalid(
                    "source.sslmode",
                    format!("is {other:?}; use disable, prefer, require, verify-ca or verify-full"),
                ));
            }
        };
        if let Some(ca) = &self.sslrootcert
            && !ca.is_file()
        {
            return Err(ConfigError::invalid(
                "source.sslrootcert",
                format!("names {}, which is not a readable file", ca.display()),
            ));
        }
        let host = self.host.unwrap_or_else(|| "127.0.0.1".to_owned());
        if host.is_empty() {
            return Err(ConfigError::invalid("source.host", "must not be empty"));
        }
        let schema = self.schema.unwrap_or_else(|| "public".to_owned());
        check_identifier("source.database", &self.database)?;
        check_identifier("source.user", &self.user)?;
        check_identifier("source.schema", &schema)?;
        check_identifier("source.table", &self.table)?;
        let slot = self.slot.unwrap_or_else(|| default_object_name(pipeline));
        check_slot_name(&slot)?;
        let publication = self
            .publication
            .unwrap_or_else(|| default_object_name(pipeline));
        check_identifier("source.publication", &publication)?;
        Ok(SourceConfig {
            host,
            port: self.port.unwrap_or(5432),
            database: self.database,
            user: self.user,
            password,
            sslmode,
            sslrootcert: self.sslrootcert,
            schema,
            table: self.table,
            slot,
            publication,
        })
    }
}

impl RawMapping {
    fn validate(self) -> Result<MappingConfig, ConfigError> {
        if let Some(cols) = &self.columns {
            if cols.is_empty() {
                return Err(ConfigError::invalid(
                    "mapping.columns",
                    "is empty; list the columns to send, or remove the key to send all columns",
                ));
            }
            let mut seen = std::collections::HashSet::new();
            for c in cols {
                check_identifier("mapping.columns", c)?;
                if !seen.insert(c) {
                    return Err(ConfigError::invalid(
                        "mapping.columns",
                        format!("lists {c:?} twice"),
                    ));
                }
            }
        }
        let mut trait_owner: BTreeMap<&str, &str> = BTreeMap::new();
        for (column, key) in &self.trait_keys {
            if key.is_empty() {
                return Err(ConfigError::invalid(
                    &format!("mapping.trait_keys.{column}"),
                    "must not be empty",
                ));
            }
            if let Some(other) = trait_owner.insert(key, column) {
                return Err(ConfigError::invalid(
                    &format!("mapping.trait_keys.{column}"),
                    format!("maps to {key:?}, which column {other:?} already uses"),
                ));
            }
        }
        if let Some(filter) = &self.filter
            && filter.trim().is_empty()
        {
            return Err(ConfigError::invalid(
                "mapping.filter",
                "is empty; remove the key to send every row",
            ));
        }
        let constants = match serde_json::to_value(&self.constants) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => {
                return Err(ConfigError::invalid(
                    "mapping.constants",
                    "must be a table of trait names to values",
                ));
            }
        };
        let ident = |key: &str,
                     configured: Option<String>,
                     default: &'static str|
         -> Result<IdentifierColumn, ConfigError> {
            match configured {
                Some(c) => {
                    check_identifier(key, &c)?;
                    Ok(IdentifierColumn::Configured(c))
                }
                None => Ok(IdentifierColumn::Default(default)),
            }
        };
        let identifiers = IdentifierColumns {
            user_id: ident(
                "mapping.identifiers.user_id",
                self.identifiers.user_id,
                "user_id",
            )?,
            anonymous_id: ident(
                "mapping.identifiers.anonymous_id",
                self.identifiers.anonymous_id,
                "anonymous_id",
            )?,
            email: ident("mapping.identifiers.email", self.identifiers.email, "email")?,
        };
        Ok(MappingConfig {
            columns: self.columns,
            constants,
            filter: self.filter,
            identifiers,
            trait_keys: self.trait_keys,
        })
    }
}

impl RawSchedule {
    fn validate(self) -> Result<ScheduleConfig, ConfigError> {
        let frequency = self.frequency.as_deref();
        let schedule = match (frequency, self.cron.as_deref()) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    "schedule.cron",
                    "is set together with schedule.frequency: use one of them",
                ));
            }
            (None, Some(expression)) => Schedule::cron(expression).map_err(|e| {
                ConfigError::invalid(
                    "schedule.cron",
                    format!(
                        "is {expression:?}: {e}; write 5 fields (minute hour day month weekday, UTC), e.g. \"0 2 * * *\""
                    ),
                )
            })?,
            (None | Some("realtime"), None) => Schedule::Realtime,
            (Some("manual"), None) => Schedule::Manual,
            (Some(other), None) => {
                let period = parse_duration("schedule.frequency", other)?;
                if period < Duration::from_secs(1) {
                    return Err(ConfigError::invalid(
                        "schedule.frequency",
                        format!(
                            "is {other:?}; windows are at least \"1s\" (or use \"realtime\" or \"manual\")"
                        ),
                    ));
                }
                let start_at = self.start_at.as_deref().unwrap_or("00:00");
                let start_at_secs = parse_start_at(start_at).ok_or_else(|| {
                    ConfigError::invalid(
                        "schedule.start_at",
                        format!(
                            "is {start_at:?}; write a UTC time of day as \"HH:MM\", e.g. \"02:00\""
                        ),
                    )
                })?;
                Schedule::Every {
                    period,
                    start_at_secs,
                }
            }
        };
        if self.start_at.is_some() && !matches!(schedule, Schedule::Every { .. }) {
            return Err(ConfigError::invalid(
                "schedule.start_at",
                "aligns windows of a fixed frequency: set schedule.frequency to a duration such as \"1h\", or remove start_at",
            ));
        }
        let max_batch_events = self.max_batch_events.unwrap_or(500);
        if max_batch_events == 0 || max_batch_events > 1_000_000 {
            return Err(ConfigError::invalid(
                "schedule.max_batch_events",
                "must be between 1 and 1000000",
            ));
        }
        let max_batch_delay = parse_duration(
            "schedule.max_batch_delay",
            self.max_batch_delay.as_deref().unwrap_or("200ms"),
        )?;
        let limit = self.memory_limit.as_deref().unwrap_or("256MiB");
        let memory_limit = limit
            .parse::<bytesize::ByteSize>()
            .map_err(|_| {
                ConfigError::invalid(
                    "schedule.memory_limit",
                    format!("is {limit:?}; write a size such as \"256MiB\" or \"1GiB\""),
                )
            })?
            .as_u64();
        if memory_limit < 1024 * 1024 {
            return Err(ConfigError::invalid(
                "schedule.memory_limit",
                "must be at least 1MiB",
            ));
        }
        Ok(ScheduleConfig {
            schedule,
            max_batch_events,
            max_batch_delay,
            memory_limit,
        })
    }
}

impl RawSync {
    fn snapshot_workers(&self) -> Result<SnapshotWorkers, ConfigError> {
        match self.snapshot_workers {
            None => Ok(SnapshotWorkers::Auto),
            Some(n) => match u16::try_from(n) {
                Ok(n) if (1..=SnapshotWorkers::MAX).contains(&n) => Ok(SnapshotWorkers::Fixed(n)),
                _ => Err(ConfigError::invalid(
                    "sync.snapshot_workers",
                    format!(
                        "is {n}; use a number of connections from 1 to {}, or leave it out to decide from the table's size and the cores",
                        SnapshotWorkers::MAX
                    ),
                )),
            },
        }
    }

    fn history(&self) -> Result<SyncHistory, ConfigError> {
        let retention = parse_duration(
            "sync.history_retention",
            self.history_retention.as_deref().unwrap_or("30d"),
        )?;
        if retention.is_zero() {
            return Err(ConfigError::invalid(
                "sync.history_retention",
                "must be longer than zero; write e.g. \"30d\" or \"12h\"",
            ));
        }
        let keep_runs = self.history_keep_runs.unwrap_or(10_000);
        if keep_runs == 0 || keep_runs > 100_000_000 {
            return Err(ConfigError::invalid(
                "sync.history_keep_runs",
                "must be between 1 and 100000000",
            ));
        }
        Ok(SyncHistory {
            retention,
            keep_runs: keep_runs as u32,
        })
    }
}

fn parse_start_at(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let h: u32 = h.parse().ok()?;
    let m: u32 = m.parse().ok()?;
    (h < 24 && m < 60).then_some(h * 3600 + m * 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    const MINIMAL: &str = r#"
name = "users-to-rudder"
[source]
database = "app"
user = "rudder"
password = "s3cret-value"
table = "users"
[destination]
type = "stdout"
"#;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_toml_str(
            text,
            Path::new("test.toml"),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = parse(MINIMAL, &[]).expect("valid");
        assert_eq!(c.source.host, "127.0.0.1");
        assert_eq!(c.source.port, 5432);
        assert_eq!(c.source.schema, "public");
        assert_eq!(c.source.slot, "slotstream_users_to_rudder");
        assert_eq!(c.source.publication, "slotstream_users_to_rudder");
        assert_eq!(c.source.sslmode, SslMode::Prefer);
        assert_eq!(c.schedule.schedule, Schedule::Realtime);
        assert!(c.ledger);
        assert_eq!(c.on_truncate, OnTruncate::Log);
        assert_eq!(c.schedule.max_batch_events, 500);
        assert_eq!(c.schedule.max_batch_delay, Duration::from_millis(200));
        assert_eq!(c.schedule.memory_limit, 256 * 1024 * 1024);
        assert_eq!(c.sync_mode, SyncMode::Upsert);
        assert_eq!(c.history.retention, Duration::from_secs(30 * 86_400));
        assert_eq!(c.history.keep_runs, 10_000);
        assert!(c.mapping.columns.is_none());
        assert_eq!(c.snapshot_workers, SnapshotWorkers::Auto);
    }

    #[test]
    fn snapshot_workers_is_a_count_from_1_to_16() {
        let with = |value: &str| {
            parse(
                &MINIMAL.replacen(
                    "[destination]",
                    &format!("[sync]\nsnapshot_workers = {value}\n[destination]"),
                    1,
                ),
                &[],
            )
        };
        for n in [1u16, 3, 16] {
            assert_eq!(
                with(&n.to_string()).expect("valid").snapshot_workers,
                SnapshotWorkers::Fixed(n)
            );
        }
        for bad in ["0", "17", "-2", "99999999999", "\"4\"", "2.5", "true"] {
            let err = with(bad).expect_err(bad).to_string();
            assert!(err.contains("snapshot_workers"), "{bad}: {err}");
        }
        let err = with("0").expect_err("0").to_string();
        assert!(err.contains("from 1 to 16"), "{err}");
        let c = parse(MINIMAL, &[("SLOTSTREAM__SYNC__SNAPSHOT_WORKERS", "4")]).expect("env");
        assert_eq!(c.snapshot_workers, SnapshotWorkers::Fixed(4));
    }

    #[test]
    fn snapshot_workers_auto_follows_table_size_and_cores() {
        let big = 2 * SnapshotWorkers::AUTO_MIN_BYTES;
        let auto = SnapshotWorkers::Auto;
        // Small by size, by rows, or both: one reader.
        assert_eq!(auto.resolve(1 << 20, 10_000_000, 8), 1);
        assert_eq!(auto.resolve(big, 50_000, 8), 1);
        // Never analyzed (-1): the size decides.
        assert_eq!(auto.resolve(big, -1, 8), 4);
        assert_eq!(auto.resolve(big, 5_000_000, 2), 2);
        assert_eq!(auto.resolve(big, 5_000_000, 1), 1);
        assert_eq!(auto.resolve(big, 5_000_000, 64), 4);
        // A fixed count is kept whatever the table.
        assert_eq!(SnapshotWorkers::Fixed(3).resolve(0, 0, 1), 3);
    }

    #[test]
    fn unknown_key_is_rejected_by_name() {
        let text = MINIMAL.replace("table = \"users\"", "table = \"users\"\ntabel = \"x\"");
        let err = parse(&text, &[]).expect_err("unknown key");
        assert!(err.to_string().contains("tabel"), "{err}");
    }

    #[test]
    fn password_never_appears_in_debug_output() {
        let c = parse(MINIMAL, &[]).expect("valid");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cret-value"), "{dbg}");
        let pw = c.source.password.expect("password");
        assert_eq!(pw.expose_secret(), "s3cret-value");
    }

    #[test]
    fn env_override_sets_nested_key_with_toml_type() {
        let c = parse(
            MINIMAL,
            &[
                ("SLOTSTREAM__SOURCE__PORT", "6543"),
                ("SLOTSTREAM__SCHEDULE__MAX_BATCH_DELAY", "1s"),
                ("SLOTSTREAM__SYNC__HISTORY_RETENTION", "7d"),
                ("SLOTSTREAM__SYNC__HISTORY_KEEP_RUNS", "50"),
            ],
        )
        .expect("valid");
        assert_eq!(c.history.retention, Duration::from_secs(7 * 86_400));
        assert_eq!(c.history.keep_runs, 50);
        assert_eq!(c.source.port, 6543);
        assert_eq!(c.schedule.max_batch_delay, Duration::from_secs(1));
    }

    #[test]
    fn metrics_keys_reach_the_config() {
        let extra = "[metrics]\nlisten = \"127.0.0.1:9187\"\nlag_warn_bytes = \"2GiB\"\n";
        let text = MINIMAL.replacen("[destination]", &format!("{extra}[destination]"), 1);
        let c = parse(&text, &[]).expect("valid");
        assert_eq!(c.metrics.listen, "127.0.0.1:9187".parse().ok());
        assert_eq!(c.metrics.lag_warn_bytes, 2 << 30);
        let bad = MINIMAL.replacen(
            "[destination]",
            "[metrics]\nlisten = \"nowhere\"\n[destination]",
            1,
        );
        match parse(&bad, &[]).expect_err("bad listen") {
            ConfigError::Invalid { key, .. } => assert_eq!(key, "metrics.listen"),
            other => panic!("metrics.listen: {other:?}"),
        }
        assert_eq!(parse(MINIMAL, &[]).expect("valid").metrics.listen, None);
    }

    #[test]
    fn schedules_parse_and_every_key_of_them_is_used() {
        let with = |extra: &str| {
            parse(
                &MINIMAL.replacen("[destination]", &format!("{extra}\n[destination]"), 1),
                &[],
            )
        };
        let c = with("[schedule]\nfrequency = \"1h\"\nstart_at = \"02:30\"").expect("1h");
        assert_eq!(
            c.schedule.schedule,
            Schedule::Every {
                period: Duration::from_secs(3600),
                start_at_secs: 9000
            }
        );
        let c = with("[schedule]\nfrequency = \"2s\"").expect("seconds");
        assert!(c.schedule.schedule.is_windowed());
        let c = with("[schedule]\nfrequency = \"manual\"").expect("manual");
        assert_eq!(c.schedule.schedule, Schedule::Manual);
        let c = with("[schedule]\ncron = \"0 2 * * *\"").expect("cron");
        assert!(matches!(c.schedule.schedule, Schedule::Cron { .. }));
        // The same through the environment.
        let c = parse(MINIMAL, &[("SLOTSTREAM__SCHEDULE__FREQUENCY", "15m")]).expect("env");
        assert!(c.schedule.schedule.is_windowed());
        // start_at is only used by a fixed frequency: elsewhere it is refused, not ignored.
        for (extra, key) in [
            ("[schedule]\nstart_at = \"02:00\"", "schedule.start_at"),
            (
                "[schedule]\nfrequency = \"manual\"\nstart_at = \"02:00\"",
                "schedule.start_at",
            ),
            (
                "[schedule]\ncron = \"0 2 * * *\"\nstart_at = \"02:00\"",
                "schedule.start_at",
            ),
            (
                "[schedule]\ncron = \"0 2 * * *\"\nfrequency = \"1h\"",
                "schedule.cron",
            ),
            ("[schedule]\ncron = \"every day\"", "schedule.cron"),
            ("[schedule]\nfrequency = \"500ms\"", "schedule.frequency"),
            ("[sync]\non_truncate = \"delete_all\"", "sync.on_truncate"),
            (
                "[sync]\nmode = \"mirror\"\nledger = false\non_truncate = \"delete_all\"",
                "sync.on_truncate",
            ),
            ("[sync]\non_truncate = \"shrug\"", "sync.on_truncate"),
        ] {
            match with(extra) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{extra}"),
                other => panic!("{extra}: {other:?}"),
            }
        }
        let c = with("[sync]\nmode = \"mirror\"").expect("mirror");
        assert_eq!(c.on_truncate, OnTruncate::DeleteAll);
        let c =
            with("[sync]\nmode = \"mirror\"\non_truncate = \"log\"\nledger = true").expect("log");
        assert_eq!(c.on_truncate, OnTruncate::Log);
        let c = with("[sync]\nmode = \"mirror\"\nledger = false").expect("no ledger");
        assert!(!c.ledger);
        assert_eq!(c.on_truncate, OnTruncate::Log);
    }

    #[test]
    fn env_override_of_unknown_key_is_rejected() {
        let err = parse(MINIMAL, &[("SLOTSTREAM__SOURCE__PROT", "1")]).expect_err("unknown");
        assert!(err.to_string().contains("prot"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (from, to, key) in [
            (
                "table = \"users\"",
                "table = \"users\"\nslot = \"Bad-Slot\"",
                "source.slot",
            ),
            (
                "table = \"users\"",
                "table = \"users\"\nsslmode = \"maybe\"",
                "source.sslmode",
            ),
            (
                "[destination]",
                "[schedule]\nfrequency = \"often\"\n[destination]",
                "schedule.frequency",
            ),
            (
                "[destination]",
                "[schedule]\nstart_at = \"25:00\"\n[destination]",
                "schedule.start_at",
            ),
            (
                "[destination]",
                "[schedule]\nmemory_limit = \"lots\"\n[destination]",
                "schedule.memory_limit",
            ),
            (
                "[destination]",
                "[sync]\nmode = \"sideways\"\n[destination]",
                "sync.mode",
            ),
            (
                "[destination]",
                "[sync]\nhistory_retention = \"a month\"\n[destination]",
                "sync.history_retention",
            ),
            (
                "[destination]",
                "[sync]\nhistory_retention = \"0s\"\n[destination]",
                "sync.history_retention",
            ),
            (
                "[destination]",
                "[sync]\nhistory_keep_runs = 0\n[destination]",
                "sync.history_keep_runs",
            ),
            (
                "[destination]",
                "[mapping]\ncolumns = []\n[destination]",
                "mapping.columns",
            ),
            ("type = \"stdout\"", "type = \"file\"", "destination.path"),
        ] {
            let text = MINIMAL.replace(from, to);
            let err = parse(&text, &[]).expect_err(key);
            assert!(err.to_string().contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn destination_type_picks_the_keys_it_accepts() {
        let unknown = MINIMAL.replace("type = \"stdout\"", "type = \"carrier-pigeon\"");
        let err = parse(&unknown, &[]).expect_err("unknown type").to_string();
        assert!(
            err.contains("carrier-pigeon") && err.contains("`kafka`"),
            "{err}"
        );
        // A key of another destination is refused, by name.
        let err = parse(
            &MINIMAL.replace("type = \"stdout\"", "type = \"stdout\"\npath = \"x\""),
            &[],
        )
        .expect_err("file key on stdout")
        .to_string();
        assert!(err.contains("path"), "{err}");
        let err = parse(
            &MINIMAL.replace(
                "type = \"stdout\"",
                "type = \"file\"\npath = \"x\"\ntopic = \"t\"",
            ),
            &[],
        )
        .expect_err("kafka key on file")
        .to_string();
        assert!(err.contains("topic"), "{err}");
        let err = parse(
            &MINIMAL.replace("type = \"stdout\"", "type = \"http\""),
            &[],
        )
        .expect_err("http without url");
        assert!(err.to_string().contains("destination.url"), "{err}");
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("write_key");
        std::fs::write(&key, "write-key-value\n").expect("write key");
        let http = MINIMAL.replace(
            "type = \"stdout\"",
            &format!(
                "type = \"http\"\nurl = \"https://dp.example.com\"\nwrite_key_file = {:?}",
                key.display().to_string()
            ),
        );
        let c = parse(&http, &[]).expect("http");
        match &c.destination {
            DestinationConfig::Http(h) => {
                assert_eq!(h.endpoint.as_str(), "https://dp.example.com/v1/batch");
                assert!(!format!("{c:?}").contains("write-key-value"));
            }
            other => panic!("{other:?}"),
        }
        let kafka = MINIMAL.replace(
            "type = \"stdout\"",
            "type = \"kafka\"\nbrokers = \"127.0.0.1:9092\"\ntopic = \"users\"\ntombstones = true\n[destination.retry]\ngive_up_after = \"5m\"",
        );
        let c = parse(&kafka, &[("SLOTSTREAM__DESTINATION__TOPIC", "people")]).expect("kafka");
        match &c.destination {
            DestinationConfig::Kafka(k) => {
                assert_eq!(k.topic, "people");
                assert!(k.tombstones);
                assert_eq!(k.retry.give_up_after, Some(Duration::from_secs(300)));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn password_env_must_be_set() {
        let text = MINIMAL.replace(
            "password = \"s3cret-value\"",
            "password_env = \"SLOTSTREAM_TEST_UNSET_VAR_XYZ\"",
        );
        let err = parse(&text, &[]).expect_err("unset");
        assert!(
            err.to_string().contains("SLOTSTREAM_TEST_UNSET_VAR_XYZ"),
            "{err}"
        );
    }

    #[test]
    fn default_object_name_is_a_valid_slot_name() {
        let n = default_object_name("Users → Rudder!");
        assert!(check_slot_name(&n).is_ok(), "{n}");
        assert!(n.starts_with("slotstream_users"));
    }
}
