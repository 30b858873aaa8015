//! `[destination] type = "kafka"`: the keys, their validation, and the librdkafka settings they
//! become. Secrets (the SASL password, an SSL key password, any pass-through setting that looks
//! like one) are [`SecretString`]s: never in `Debug` output, logs or messages.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rdkafka::ClientConfig;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::sink::retry::{RawRetry, RetryPolicy};
use crate::sink::secret_from;

/// librdkafka settings slotstream sets itself, from typed keys or for safety: refused in
/// `librdkafka_options`, each with the key to use instead.
const OWNED_SETTINGS: &[(&str, &str)] = &[
    ("bootstrap.servers", "brokers"),
    ("metadata.broker.list", "brokers"),
    ("client.id", "client_id"),
    ("compression.type", "compression"),
    ("compression.codec", "compression"),
    ("security.protocol", "security.protocol"),
    ("sasl.mechanism", "security.sasl_mechanism"),
    ("sasl.mechanisms", "security.sasl_mechanism"),
    ("sasl.username", "security.username"),
    (
        "sasl.password",
        "security.password_env or security.password_file",
    ),
    ("ssl.ca.location", "security.ca"),
    ("ssl.certificate.location", "security.certificate"),
    ("ssl.key.location", "security.key"),
    ("ssl.key.password", "security.key_password_env"),
    (
        "enable.idempotence",
        "nothing: the idempotent producer is always on",
    ),
    ("acks", "nothing: acks=all is always on"),
    ("request.required.acks", "nothing: acks=all is always on"),
    (
        "max.in.flight.requests.per.connection",
        "nothing: at most 5 requests are in flight, which keeps each key's order",
    ),
    ("max.in.flight", "nothing: at most 5 requests are in flight"),
];

/// How long librdkafka tries to deliver a record before it reports a failure, unless
/// `librdkafka_options` sets `message.timeout.ms`: the batch is then retried by
/// `[destination.retry]`, and each failed attempt is logged.
const DEFAULT_MESSAGE_TIMEOUT_MS: &str = "30000";

/// `[destination]` with `type = "kafka"`, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKafkaConfig {
    brokers: Option<Brokers>,
    topic: Option<String>,
    compression: Option<String>,
    client_id: Option<String>,
    tombstones: Option<bool>,
    create_topic: Option<bool>,
    partitions: Option<i32>,
    replication_factor: Option<i32>,
    #[serde(default)]
    security: RawSecurity,
    #[serde(default)]
    librdkafka_options: BTreeMap<String, toml::Value>,
    #[serde(default)]
    retry: RawRetry,
}

/// `brokers`: a string as librdkafka's `bootstrap.servers` takes it, or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Brokers {
    Text(String),
    List(Vec<String>),
}

/// `[destination.security]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecurity {
    protocol: Option<String>,
    ca: Option<PathBuf>,
    certificate: Option<PathBuf>,
    key: Option<PathBuf>,
    key_password_env: Option<String>,
    sasl_mechanism: Option<String>,
    username: Option<String>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
}

/// Record compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// None (the default).
    None,
    /// gzip.
    Gzip,
    /// Snappy.
    Snappy,
    /// LZ4.
    Lz4,
    /// Zstandard.
    Zstd,
}

impl Compression {
    fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// How the client authenticates and encrypts (`[destination.security]`).
#[derive(Debug, Clone)]
pub struct Security {
    /// `plaintext` (default), `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub protocol: &'static str,
    /// CA certificate (PEM) that signed the brokers' certificates.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM), for brokers that authenticate clients by certificate.
    pub certificate: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub key: Option<PathBuf>,
    /// The private key's password, if it is encrypted.
    pub key_password: Option<SecretString>,
    /// SASL: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub sasl_mechanism: Option<&'static str>,
    /// SASL user name.
    pub username: Option<String>,
    /// SASL password.
    pub password: Option<SecretString>,
}

/// The Kafka destination, validated.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: `host:port,host:port`.
    pub brokers: String,
    /// The topic every event goes to.
    pub topic: String,
    /// Record compression.
    pub compression: Compression,
    /// `client.id` (default `slotstream`).
    pub client_id: String,
    /// Mirror mode: a null-value record for the key after each `Record Deleted` event.
    pub tombstones: bool,
    /// Create the topic when it does not exist, with these partitions and replication factor.
    pub create_topic: Option<TopicSpec>,
    /// Security.
    pub security: Security,
    /// Other librdkafka settings, as given (the secret-looking ones wrapped).
    pub options: Vec<(String, SecretString)>,
    /// How failed deliveries are retried.
    pub retry: RetryPolicy,
}

/// The topic `create_topic` creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicSpec {
    /// Partitions (default 1).
    pub partitions: i32,
    /// Replication factor (default -1: the broker's default).
    pub replication_factor: i32,
}

type Invalid = (String, String);

fn invalid(key: &str, message: impl Into<String>) -> Invalid {
    (format!("destination.{key}"), message.into())
}

fn readable_file(key: &str, path: &Option<PathBuf>) -> Result<(), Invalid> {
    match path {
        Some(p) if !p.is_file() => Err(invalid(
            key,
            format!("names {}, which is not a readable file", p.display()),
        )),
        _ => Ok(()),
    }
}

impl RawSecurity {
    fn validate(self, getenv: &dyn Fn(&str) -> Option<String>) -> Result<Security, Invalid> {
        let protocol = match self.protocol.as_deref().unwrap_or("plaintext") {
            "plaintext" => "plaintext",
            "ssl" => "ssl",
            "sasl_plaintext" => "sasl_plaintext",
            "sasl_ssl" => "sasl_ssl",
            other => {
                return Err(invalid(
                    "security.protocol",
                    format!("is {other:?}; use plaintext, ssl, sasl_plaintext or sasl_ssl"),
                ));
            }
        };
        let tls = protocol.ends_with("ssl");
        let sasl = protocol.starts_with("sasl");
        for (key, given) in [
            ("security.ca", self.ca.is_some()),
            ("security.certificate", self.certificate.is_some()),
            ("security.key", self.key.is_some()),
            ("security.key_password_env", self.key_password_env.is_some()),
        ] {
            if given && !tls {
                return Err(invalid(
                    key,
                    format!("applies to protocol = \"ssl\" or \"sasl_ssl\", not {protocol:?}"),
                ));
            }
        }
        for (key, given) in [
            ("security.sasl_mechanism", self.sasl_mechanism.is_some()),
            ("security.username", self.username.is_some()),
            ("security.password_env", self.password_env.is_some()),
            ("security.password_file", self.password_file.is_some()),
        ] {
            if given && !sasl {
                return Err(invalid(
                    key,
                    format!(
                        "applies to protocol = \"sasl_plaintext\" or \"sasl_ssl\", not {protocol:?}"
                    ),
                ));
            }
        }
        readable_file("security.ca", &self.ca)?;
        readable_file("security.certificate", &self.certificate)?;
        readable_file("security.key", &self.key)?;
        if self.certificate.is_some() != self.key.is_some() {
            return Err(invalid(
                "security.key",
                "and security.certificate go together: give both for a client certificate, or neither",
            ));
        }
        let key_password = secret_from(
            "security.key_password",
            self.key_password_env.as_deref(),
            None,
            getenv,
        )?;
        let (sasl_mechanism, username, password) = if sasl {
            let mechanism = match self.sasl_mechanism.as_deref().unwrap_or("plain") {
                "plain" => "PLAIN",
                "scram-sha-256" => "SCRAM-SHA-256",
                "scram-sha-512" => "SCRAM-SHA-512",
                other => {
                    return Err(invalid(
                        "security.sasl_mechanism",
                        format!("is {other:?}; use plain, scram-sha-256 or scram-sha-512"),
                    ));
                }
            };
            let username = self.username.ok_or_else(|| {
                invalid("security.username", format!("is required for {protocol}"))
            })?;
            let password = secret_from(
                "security.password",
                self.password_env.as_deref(),
                self.password_file.as_ref(),
                getenv,
            )?
            .ok_or_else(|| {
                invalid(
                    "security.password_env",
                    format!("(or password_file) is required for {protocol}"),
                )
            })?;
            (Some(mechanism), Some(username), Some(password))
        } else {
            (None, None, None)
        };
        Ok(Security {
            protocol,
            ca: self.ca,
            certificate: self.certificate,
            key: self.key,
            key_password,
            sasl_mechanism,
            username,
            password,
        })
    }
}

/// Whether a librdkafka setting holds a secret (never logged).
fn looks_secret(key: &str) -> bool {
    [
        "password",
        "secret",
        "token",
        "key.pem",
        "keystore",
        "credentials",
    ]
    .iter()
    .any(|s| key.contains(s))
}

impl RawKafkaConfig {
    /// Validates the keys; `Err((key, message))` names the key at fault. `getenv` reads the
    /// `*_env` secrets.
    pub fn validate(self, getenv: &dyn Fn(&str) -> Option<String>) -> Result<KafkaConfig, Invalid> {
        let brokers = match self.brokers {
            Some(Brokers::Text(s)) => s,
            Some(Brokers::List(list)) => list.join(","),
            None => String::new(),
        };
        let broker_list: Vec<&str> = brokers
            .split(',')
            .map(str::trim)
            .filter(|b| !b.is_empty())
            .collect();
        if broker_list.is_empty() {
            return Err(invalid(
                "brokers",
                "is required for type = \"kafka\": write \"host:9092\" or \"host1:9092,host2:9092\"",
            ));
        }
        let topic = self.topic.unwrap_or_default();
        let topic_ok = !topic.is_empty()
            && topic.len() <= 249
            && topic != "."
            && topic != ".."
            && topic
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !topic_ok {
            return Err(invalid(
                "topic",
                format!(
                    "is {topic:?}; a Kafka topic name is 1 to 249 characters of a-z, A-Z, 0-9, '.', '_' and '-'"
                ),
            ));
        }
        let compression = match self.compression.as_deref().unwrap_or("none") {
            "none" => Compression::None,
            "gzip" => Compression::Gzip,
            "snappy" => Compression::Snappy,
            "lz4" => Compression::Lz4,
            "zstd" => Compression::Zstd,
            other => {
                return Err(invalid(
                    "compression",
                    format!("is {other:?}; use none, gzip, snappy, lz4 or zstd"),
                ));
            }
        };
        let create_topic = if self.create_topic.unwrap_or(false) {
            let partitions = self.partitions.unwrap_or(1);
            let replication_factor = self.replication_factor.unwrap_or(-1);
            if partitions < 1 {
                return Err(invalid("partitions", "must be at least 1"));
            }
            if replication_factor == 0 || replication_factor < -1 {
                return Err(invalid(
                    "replication_factor",
                    "must be at least 1, or -1 for the broker's default",
                ));
            }
            Some(TopicSpec {
                partitions,
                replication_factor,
            })
        } else {
            if self.partitions.is_some() || self.replication_factor.is_some() {
                return Err(invalid(
                    "partitions",
                    "(and replication_factor) apply only with create_topic = true",
                ));
            }
            None
        };
        let mut options = Vec::new();
        for (key, value) in self.librdkafka_options {
            if let Some((_, instead)) = OWNED_SETTINGS.iter().find(|(k, _)| *k == key) {
                return Err(invalid(
                    &format!("librdkafka_options.{key:?}"),
                    format!("is set by slotstream; use {instead}"),
                ));
            }
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                _ => {
                    return Err(invalid(
                        &format!("librdkafka_options.{key:?}"),
                        "must be a string, a number or a boolean",
                    ));
                }
            };
            options.push((key, SecretString::from(text)));
        }
        Ok(KafkaConfig {
            brokers: broker_list.join(","),
            topic,
            compression,
            client_id: self.client_id.unwrap_or_else(|| "slotstream".to_owned()),
            tombstones: self.tombstones.unwrap_or(false),
            create_topic,
            security: self.security.validate(getenv)?,
            options,
            retry: self.retry.validate()?,
        })
    }
}

impl KafkaConfig {
    /// The librdkafka settings of the producer: the safety settings (idempotence, acks=all,
    /// bounded in-flight), the typed keys, then the pass-through table.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", &self.client_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", "5")
            .set("compression.type", self.compression.as_str())
            .set("message.timeout.ms", DEFAULT_MESSAGE_TIMEOUT_MS)
            .set("linger.ms", "5")
            .set("security.protocol", self.security.protocol);
        let s = &self.security;
        let path = |p: &PathBuf| p.display().to_string();
        if let Some(ca) = &s.ca {
            c.set("ssl.ca.location", path(ca));
        }
        if let Some(cert) = &s.certificate {
            c.set("ssl.certificate.location", path(cert));
        }
        if let Some(key) = &s.key {
            c.set("ssl.key.location", path(key));
        }
        if let Some(pw) = &s.key_password {
            c.set("ssl.key.password", pw.expose_secret());
        }
        if let Some(m) = s.sasl_mechanism {
            c.set("sasl.mechanism", m);
        }
        if let Some(u) = &s.username {
            c.set("sasl.username", u);
        }
        if let Some(pw) = &s.password {
            c.set("sasl.password", pw.expose_secret());
        }
        for (key, value) in &self.options {
            c.set(key, value.expose_secret());
        }
        c
    }

    /// The pass-through settings as they may be logged: secret-looking values masked.
    pub fn options_for_log(&self) -> String {
        self.options
            .iter()
            .map(|(k, v)| {
                let shown = if looks_secret(k) {
                    "***"
                } else {
                    v.expose_secret()
                };
                format!("{k}={shown}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<KafkaConfig, Invalid> {
        let raw: RawKafkaConfig =
            toml::from_str(text).map_err(|e| ("toml".into(), e.to_string()))?;
        raw.validate(&|var| (var == "KAFKA_PW").then(|| "hunter2".to_owned()))
    }

    #[test]
    fn defaults_are_safe() {
        let c = parse("brokers = \"a:9092, b:9092\"\ntopic = \"users\"").expect("valid");
        assert_eq!(c.brokers, "a:9092,b:9092");
        assert_eq!(c.compression, Compression::None);
        assert!(!c.tombstones);
        let cc = c.client_config();
        assert_eq!(cc.get("enable.idempotence"), Some("true"));
        assert_eq!(cc.get("acks"), Some("all"));
        assert_eq!(cc.get("max.in.flight.requests.per.connection"), Some("5"));
    }

    #[test]
    fn brokers_may_be_a_list() {
        let c = parse("brokers = [\"a:1\", \"b:2\"]\ntopic = \"t\"").expect("valid");
        assert_eq!(c.brokers, "a:1,b:2");
    }

    #[test]
    fn settings_slotstream_owns_are_refused_in_the_pass_through_table() {
        let err = parse(
            "brokers = \"a:1\"\ntopic = \"t\"\n[librdkafka_options]\n\"enable.idempotence\" = false",
        )
        .expect_err("owned");
        assert!(err.0.contains("enable.idempotence"), "{err:?}");
        let c = parse("brokers = \"a:1\"\ntopic = \"t\"\n[librdkafka_options]\n\"linger.ms\" = 20\n\"sasl.oauthbearer.client.secret\" = \"s3cret\"")
            .expect("valid");
        assert_eq!(c.client_config().get("linger.ms"), Some("20"));
        assert!(!format!("{c:?}").contains("s3cret"));
        assert!(!c.options_for_log().contains("s3cret"));
    }

    #[test]
    fn sasl_reads_its_secret_from_the_environment_and_never_shows_it() {
        let c = parse(
            "brokers = \"a:1\"\ntopic = \"t\"\n[security]\nprotocol = \"sasl_ssl\"\nsasl_mechanism = \"scram-sha-512\"\nusername = \"u\"\npassword_env = \"KAFKA_PW\"",
        )
        .expect("valid");
        assert_eq!(c.security.sasl_mechanism, Some("SCRAM-SHA-512"));
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(c.client_config().get("sasl.password"), Some("hunter2"));
        let err = parse(
            "brokers = \"a:1\"\ntopic = \"t\"\n[security]\nprotocol = \"sasl_plaintext\"\nusername = \"u\"\npassword_env = \"UNSET_VAR\"",
        )
        .expect_err("unset");
        assert_eq!(err.0, "destination.security.password_env");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("topic = \"t\"", "destination.brokers"),
            (
                "brokers = \"a:1\"\ntopic = \"no spaces\"",
                "destination.topic",
            ),
            (
                "brokers = \"a:1\"\ntopic = \"t\"\ncompression = \"brotli\"",
                "destination.compression",
            ),
            (
                "brokers = \"a:1\"\ntopic = \"t\"\npartitions = 3",
                "destination.partitions",
            ),
            (
                "brokers = \"a:1\"\ntopic = \"t\"\n[security]\nca = \"/etc/hostname\"",
                "destination.security.ca",
            ),
            (
                "brokers = \"a:1\"\ntopic = \"t\"\n[security]\nprotocol = \"kerberos\"",
                "destination.security.protocol",
            ),
        ] {
            let err = parse(text).expect_err(key);
            assert_eq!(err.0, key, "{err:?}");
        }
    }
}
