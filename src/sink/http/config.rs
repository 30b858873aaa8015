//! `[destination] type = "http"`: the keys and their validation. Secrets (the write key, the
//! HMAC secret, header values read from the environment) are [`SecretString`]s: never in
//! `Debug` output, logs or messages.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;
use reqwest::header::HeaderName;
use secrecy::SecretString;
use serde::Deserialize;

use crate::sink::retry::{RawRetry, RetryPolicy};
use crate::sink::secret_from;

/// The default request limit: RudderStack's gateway refuses larger requests.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4000 * 1024;
/// The default event limit: RudderStack's gateway refuses larger events.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 32 * 1024;
/// The default signature header of `format = "webhook"`.
pub const DEFAULT_SIGNATURE_HEADER: &str = "X-Slotstream-Signature";
/// What a request holds besides its events, at most (`{"batch":[`, the commas, `],"sentAt":…}`
/// without the commas): `max_event_bytes` must leave this much room in `max_request_bytes`.
pub const ENVELOPE_RESERVE: usize = 128;

/// Headers slotstream sets itself: refused in `headers`.
const OWNED_HEADERS: &[&str] = &[
    "content-type",
    "content-encoding",
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
    "user-agent",
];

/// `[destination]` with `type = "http"`, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpConfig {
    url: Option<String>,
    format: Option<String>,
    write_key_env: Option<String>,
    write_key_file: Option<PathBuf>,
    #[serde(default)]
    headers: BTreeMap<String, RawHeaderValue>,
    hmac_secret_env: Option<String>,
    hmac_secret_file: Option<PathBuf>,
    signature_header: Option<String>,
    gzip: Option<bool>,
    timeout: Option<String>,
    max_request_bytes: Option<RawSize>,
    max_event_bytes: Option<RawSize>,
    ca_file: Option<PathBuf>,
    client_cert_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
    #[serde(default)]
    retry: RawRetry,
}

/// A header value: the text, or `{ env = "NAME" }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawHeaderValue {
    Text(String),
    Env(EnvRef),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvRef {
    env: String,
}

/// A size: bytes, or text such as `"4000KiB"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(i64),
    Text(String),
}

/// What the requests carry.
#[derive(Debug, Clone)]
pub enum Format {
    /// RudderStack's HTTP API: `POST <url>/v1/batch`, `{"batch":[…],"sentAt":…}`, Basic auth
    /// with the source's write key.
    RudderStack {
        /// The source's write key (the Basic auth user name).
        write_key: SecretString,
    },
    /// A JSON array of events to `POST <url>`, with custom headers and an optional signature.
    Webhook {
        /// Extra headers, in order (values may be secrets read from the environment).
        headers: Vec<(HeaderName, SecretString)>,
        /// The HMAC-SHA256 signature header, if a secret is configured.
        signature: Option<Signature>,
    },
}

impl Format {
    /// `rudderstack` or `webhook`.
    pub fn name(&self) -> &'static str {
        match self {
            Format::RudderStack { .. } => "rudderstack",
            Format::Webhook { .. } => "webhook",
        }
    }
}

/// The webhook signature: `<header>: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
#[derive(Debug, Clone)]
pub struct Signature {
    /// The header's name.
    pub header: HeaderName,
    /// The shared secret.
    pub secret: SecretString,
}

/// TLS beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// CA certificates (PEM) to trust instead of the built-in roots.
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM) and its key (PEM), for endpoints that authenticate clients.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// The HTTP destination, validated.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// The URL requests go to (`<url>/v1/batch` for RudderStack).
    pub endpoint: Url,
    /// The request format and its credentials.
    pub format: Format,
    /// Compress request bodies with gzip (`Content-Encoding: gzip`).
    pub gzip: bool,
    /// The whole request's deadline: connect, send, answer.
    pub timeout: Duration,
    /// The largest request body (uncompressed), envelope included.
    pub max_request_bytes: usize,
    /// The largest event; larger ones become dead letters.
    pub max_event_bytes: usize,
    /// TLS settings.
    pub tls: Tls,
    /// How failed deliveries are retried.
    pub retry: RetryPolicy,
}

type Invalid = (String, String);

fn invalid(key: &str, message: impl Into<String>) -> Invalid {
    (format!("destination.{key}"), message.into())
}

fn readable_file(key: &str, path: Option<&PathBuf>) -> Result<(), Invalid> {
    match path {
        Some(p) if std::fs::File::open(p).is_err() || !p.is_file() => Err(invalid(
            key,
            format!("names {}, which is not a readable file", p.display()),
        )),
        _ => Ok(()),
    }
}

fn size(key: &str, raw: Option<RawSize>, default: usize) -> Result<usize, Invalid> {
    let bytes = match raw {
        None => return Ok(default),
        Some(RawSize::Bytes(n)) => u64::try_from(n).unwrap_or(0),
        Some(RawSize::Text(text)) => text
            .parse::<bytesize::ByteSize>()
            .map_err(|_| {
                invalid(
                    key,
                    format!("is {text:?}; write a size such as \"32KiB\", \"4000KiB\" or a number of bytes"),
                )
            })?
            .as_u64(),
    };
    if bytes == 0 || bytes > 1 << 30 {
        return Err(invalid(key, "must be more than 0 bytes and at most 1GiB"));
    }
    usize::try_from(bytes).map_err(|_| invalid(key, "is too large"))
}

impl RawHttpConfig {
    /// Validates the keys; `Err((key, message))` names the key at fault. `getenv` reads the
    /// `*_env` secrets and header values.
    pub fn validate(self, getenv: &dyn Fn(&str) -> Option<String>) -> Result<HttpConfig, Invalid> {
        let url = self.url.as_deref().map(str::trim).unwrap_or_default();
        if url.is_empty() {
            return Err(invalid(
                "url",
                "is required for type = \"http\": the data plane URL (format = \"rudderstack\") or the webhook's URL",
            ));
        }
        let parsed = Url::parse(url).map_err(|e| {
            invalid(
                "url",
                format!("is {url:?}: {e}; write a URL such as \"https://hosted.rudderlabs.com\""),
            )
        })?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(invalid(
                "url",
                format!("is {url:?}; it must be an http:// or https:// URL with a host"),
            ));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(invalid(
                "url",
                "must not carry credentials; use write_key_env or headers",
            ));
        }
        let format = self.format.as_deref().unwrap_or("rudderstack");
        let format = match format {
            "rudderstack" => {
                for (key, given) in [
                    ("headers", !self.headers.is_empty()),
                    ("hmac_secret_env", self.hmac_secret_env.is_some()),
                    ("hmac_secret_file", self.hmac_secret_file.is_some()),
                    ("signature_header", self.signature_header.is_some()),
                ] {
                    if given {
                        return Err(invalid(
                            key,
                            "applies to format = \"webhook\" only (the RudderStack API authenticates with the write key)",
                        ));
                    }
                }
                let write_key = secret_from(
                    "write_key",
                    self.write_key_env.as_deref(),
                    self.write_key_file.as_ref(),
                    getenv,
                )?
                .ok_or_else(|| {
                    invalid(
                        "write_key_env",
                        "(or write_key_file) is required for format = \"rudderstack\": the source's write key",
                    )
                })?;
                Format::RudderStack { write_key }
            }
            "webhook" => {
                for (key, given) in [
                    ("write_key_env", self.write_key_env.is_some()),
                    ("write_key_file", self.write_key_file.is_some()),
                ] {
                    if given {
                        return Err(invalid(
                            key,
                            "applies to format = \"rudderstack\" only; a webhook takes headers (and hmac_secret_env)",
                        ));
                    }
                }
                let secret = secret_from(
                    "hmac_secret",
                    self.hmac_secret_env.as_deref(),
                    self.hmac_secret_file.as_ref(),
                    getenv,
                )?;
                let header_text = self.signature_header.as_deref();
                if secret.is_none() && header_text.is_some() {
                    return Err(invalid(
                        "signature_header",
                        "applies only with hmac_secret_env or hmac_secret_file",
                    ));
                }
                let signature = match secret {
                    Some(secret) => {
                        let name = header_text.unwrap_or(DEFAULT_SIGNATURE_HEADER);
                        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                            invalid(
                                "signature_header",
                                format!("is {name:?}, which is not a valid header name"),
                            )
                        })?;
                        Some(Signature { header, secret })
                    }
                    None => None,
                };
                let mut headers = Vec::new();
                for (name, value) in self.headers {
                    let key = format!("headers.{name:?}");
                    let header = HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| invalid(&key, "is not a valid header name"))?;
                    if OWNED_HEADERS.contains(&header.as_str())
                        || signature.as_ref().is_some_and(|s| s.header == header)
                    {
                        return Err(invalid(&key, "is set by slotstream; remove it"));
                    }
                    let value = match value {
                        RawHeaderValue::Text(text) => text,
                        RawHeaderValue::Env(EnvRef { env }) => getenv(&env).ok_or_else(|| {
                            invalid(
                                &key,
                                format!("names {env}, which is not set; export it before running slotstream"),
                            )
                        })?,
                    };
                    if reqwest::header::HeaderValue::from_str(&value).is_err() {
                        // The value is not shown: it may be a secret.
                        return Err(invalid(
                            &key,
                            "has a value that is not a valid header value (control characters or non-ASCII)",
                        ));
                    }
                    headers.push((header, SecretString::from(value)));
                }
                Format::Webhook { headers, signature }
            }
            other => {
                return Err(invalid(
                    "format",
                    format!("is {other:?}; use \"rudderstack\" or \"webhook\""),
                ));
            }
        };
        let endpoint = match &format {
            Format::RudderStack { .. } => {
                let base = parsed.as_str().trim_end_matches('/');
                Url::parse(&format!("{base}/v1/batch"))
                    .map_err(|e| invalid("url", format!("is {url:?}: {e}")))?
            }
            Format::Webhook { .. } => parsed,
        };
        let timeout_text = self.timeout.as_deref().unwrap_or("30s");
        let timeout = humantime::parse_duration(timeout_text)
            .ok()
            .filter(|t| !t.is_zero())
            .ok_or_else(|| {
                invalid(
                    "timeout",
                    format!("is {timeout_text:?}; write a duration such as \"10s\" or \"1m\""),
                )
            })?;
        let max_request_bytes = size(
            "max_request_bytes",
            self.max_request_bytes,
            DEFAULT_MAX_REQUEST_BYTES,
        )?;
        let max_event_bytes = size(
            "max_event_bytes",
            self.max_event_bytes,
            DEFAULT_MAX_EVENT_BYTES,
        )?;
        if max_event_bytes.saturating_add(ENVELOPE_RESERVE) > max_request_bytes {
            return Err(invalid(
                "max_event_bytes",
                format!(
                    "is {max_event_bytes} bytes, which leaves no room in max_request_bytes ({max_request_bytes}) for the request's envelope ({ENVELOPE_RESERVE} bytes)"
                ),
            ));
        }
        readable_file("ca_file", self.ca_file.as_ref())?;
        readable_file("client_cert_file", self.client_cert_file.as_ref())?;
        readable_file("client_key_file", self.client_key_file.as_ref())?;
        let client_cert = match (self.client_cert_file, self.client_key_file) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "client_key_file",
                    "and client_cert_file go together: give both for a client certificate, or neither",
                ));
            }
        };
        let tls = Tls {
            ca_file: self.ca_file,
            client_cert,
        };
        if endpoint.scheme() == "http" && (tls.ca_file.is_some() || tls.client_cert.is_some()) {
            return Err(invalid(
                "ca_file",
                "(and client_cert_file) apply to an https:// url only",
            ));
        }
        Ok(HttpConfig {
            endpoint,
            format,
            gzip: self.gzip.unwrap_or(false),
            timeout,
            max_request_bytes,
            max_event_bytes,
            tls,
            retry: self.retry.validate()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn parse(text: &str) -> Result<HttpConfig, Invalid> {
        let raw: RawHttpConfig =
            toml::from_str(text).map_err(|e| ("toml".into(), e.to_string()))?;
        raw.validate(&|var| match var {
            "WRITE_KEY" => Some("wk-secret-1".to_owned()),
            "HMAC" => Some("hmac-secret-2".to_owned()),
            "TOKEN" => Some("Bearer tok-3".to_owned()),
            _ => None,
        })
    }

    #[test]
    fn rudderstack_defaults() {
        let c = parse("url = \"https://dp.example.com/\"\nwrite_key_env = \"WRITE_KEY\"")
            .expect("valid");
        assert_eq!(c.endpoint.as_str(), "https://dp.example.com/v1/batch");
        assert_eq!(c.format.name(), "rudderstack");
        assert!(!c.gzip);
        assert_eq!(c.timeout, Duration::from_secs(30));
        assert_eq!(c.max_request_bytes, 4000 * 1024);
        assert_eq!(c.max_event_bytes, 32 * 1024);
        match &c.format {
            Format::RudderStack { write_key } => {
                assert_eq!(write_key.expose_secret(), "wk-secret-1")
            }
            other => panic!("{other:?}"),
        }
        assert!(!format!("{c:?}").contains("wk-secret-1"));
    }

    #[test]
    fn the_write_key_may_come_from_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key");
        std::fs::write(&path, "from-file\n").expect("write");
        let c = parse(&format!(
            "url = \"http://h:8080/base\"\nwrite_key_file = {:?}",
            path.display().to_string()
        ))
        .expect("valid");
        assert_eq!(c.endpoint.as_str(), "http://h:8080/base/v1/batch");
        match &c.format {
            Format::RudderStack { write_key } => assert_eq!(write_key.expose_secret(), "from-file"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn webhook_headers_and_signature() {
        let c = parse(
            "url = \"https://hooks.example.com/in\"\nformat = \"webhook\"\ngzip = true\ntimeout = \"5s\"\nmax_request_bytes = \"1MiB\"\nmax_event_bytes = 2048\nhmac_secret_env = \"HMAC\"\n[headers]\nX-Team = \"growth\"\nAuthorization = { env = \"TOKEN\" }",
        )
        .expect("valid");
        assert_eq!(c.endpoint.as_str(), "https://hooks.example.com/in");
        assert!(c.gzip);
        assert_eq!(c.timeout, Duration::from_secs(5));
        assert_eq!(c.max_request_bytes, 1024 * 1024);
        assert_eq!(c.max_event_bytes, 2048);
        let Format::Webhook { headers, signature } = &c.format else {
            panic!("{c:?}");
        };
        let shown: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.expose_secret()))
            .collect();
        assert_eq!(
            shown,
            [("authorization", "Bearer tok-3"), ("x-team", "growth")]
        );
        let signature = signature.as_ref().expect("signature");
        assert_eq!(signature.header.as_str(), "x-slotstream-signature");
        assert_eq!(signature.secret.expose_secret(), "hmac-secret-2");
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("tok-3") && !debug.contains("hmac-secret-2"),
            "{debug}"
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("write_key_env = \"WRITE_KEY\"", "destination.url"),
            (
                "url = \"ftp://h\"\nwrite_key_env = \"WRITE_KEY\"",
                "destination.url",
            ),
            (
                "url = \"not a url\"\nwrite_key_env = \"WRITE_KEY\"",
                "destination.url",
            ),
            (
                "url = \"https://u:p@h\"\nwrite_key_env = \"WRITE_KEY\"",
                "destination.url",
            ),
            ("url = \"https://h\"", "destination.write_key_env"),
            (
                "url = \"https://h\"\nwrite_key_env = \"WRITE_KEY\"\nwrite_key_file = \"/etc/hostname\"",
                "destination.write_key_env",
            ),
            (
                "url = \"https://h\"\nwrite_key_env = \"UNSET\"",
                "destination.write_key_env",
            ),
            (
                "url = \"https://h\"\nwrite_key_file = \"/nonexistent/key\"",
                "destination.write_key_file",
            ),
            (
                "url = \"https://h\"\nwrite_key_env = \"WRITE_KEY\"\nhmac_secret_env = \"HMAC\"",
                "destination.hmac_secret_env",
            ),
            (
                "url = \"https://h\"\nwrite_key_env = \"WRITE_KEY\"\n[headers]\nX-A = \"b\"",
                "destination.headers",
            ),
            (
                "url = \"https://h\"\nwrite_key_env = \"WRITE_KEY\"\nsignature_header = \"X-Sig\"",
                "destination.signature_header",
            ),
            (
                "url = \"https://h\"\nformat = \"webhook\"\nwrite_key_env = \"WRITE_KEY\"",
                "destination.write_key_env",
            ),
            (
                "url = \"https://h\"\nformat = \"webhook\"\nsignature_header = \"X-Sig\"",
                "destination.signature_header",
            ),
            (
                "url = \"https://h\"\nformat = \"webhook\"\nhmac_secret_env = \"HMAC\"\nsignature_header = \"bad header\"",
                "destination.signature_header",
            ),
            (
                "url = \"https://h\"\nformat = \"webhook\"\n[headers]\nContent-Type = \"text/plain\"",
                "destination.headers.\"Content-Type\"",
            ),
            (
                "url = \"https://h\"\nformat = \"webhook\"\n[headers]\nX-A = { env = \"UNSET\" }",
                "destination.headers.\"X-A\"",
            ),
            (
                "url = \"https://h\"\nformat = \"segment\"",
                "destination.format",
            ),
            (
                "url = \"https://h\"\nformat = \"webhook\"\ntimeout = \"soon\"",
                "destination.timeout",
            ),
            (
                "url = \"https://h\"\nformat = \"webhook\"\ntimeout = \"0s\"",
                "destination.timeout",
            ),
            (
                "url = \"https://h\"\nformat = \"webhook\"\nmax_request_bytes = \"lots\"",
                "destination.max_request_bytes",
            ),
            (
                "url = \"https://h\"\nformat = \"webhook\"\nmax_event_bytes = 0",
                "destination.max_event_bytes",
            ),
            (
                "url = \"https://h\"\nformat = \"webhook\"\nmax_request_bytes = 1000\nmax_event_bytes = 1000",
                "destination.max_event_bytes",
            ),
            (
                "url = \"https://h\"\nformat = \"webhook\"\nca_file = \"/nonexistent/ca.pem\"",
                "destination.ca_file",
            ),
            (
                "url = \"https://h\"\nformat = \"webhook\"\nclient_cert_file = \"/etc/hostname\"",
                "destination.client_key_file",
            ),
            (
                "url = \"http://h\"\nformat = \"webhook\"\nca_file = \"/etc/hostname\"",
                "destination.ca_file",
            ),
            (
                "url = \"https://h\"\nformat = \"webhook\"\n[retry]\nmax_backoff = \"soon\"",
                "destination.retry.max_backoff",
            ),
        ] {
            let err = parse(text).expect_err(text);
            assert_eq!(err.0, key, "{text}: {err:?}");
        }
        // Unknown keys are refused by name.
        let err =
            parse("url = \"https://h\"\nwrite_key_env = \"WRITE_KEY\"\ncompression = \"gzip\"")
                .expect_err("unknown");
        assert!(err.1.contains("compression"), "{err:?}");
    }

    #[test]
    fn no_error_shows_a_secret() {
        for text in [
            "url = \"https://h\"\nformat = \"webhook\"\n[headers]\nX-A = { env = \"TOKEN\" }\nX-B = \"bad\\u0001\"",
            "url = \"https://h\"\nformat = \"webhook\"\n[headers]\nX-A = \"secret\\nvalue\"",
        ] {
            let err = parse(text).expect_err(text);
            assert!(
                !err.1.contains("secret") && !err.1.contains("tok-3"),
                "{err:?}"
            );
        }
    }
}
