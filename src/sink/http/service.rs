//! The request and its answer: one `reqwest` client per sink (a keep-alive connection pool,
//! rustls), the request's headers (content type, gzip, Basic auth or custom headers, the
//! signature), and what the status code means ([`classify`]).

use std::time::Duration;

use reqwest::header::{CONTENT_ENCODING, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{Client, StatusCode};
use secrecy::ExposeSecret;

use super::config::{Format, HttpConfig};
use super::encoder;
use crate::sink::{Recovery, SinkError};

/// The longest excerpt of an answer's body kept in a dead letter's reason or an error.
pub const EXCERPT_CHARS: usize = 200;
/// How much of an answer's body is read (the rest is dropped with the connection).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// What the endpoint made of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// 2xx: the events are delivered.
    Accepted,
    /// 413: the request is too large; split it.
    TooLarge {
        /// The start of the answer's body.
        excerpt: String,
    },
    /// Another 4xx: the endpoint refuses these events for good.
    Refused {
        /// The status code.
        status: u16,
        /// The start of the answer's body.
        excerpt: String,
    },
}

/// What a status code means for the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Delivered.
    Accepted,
    /// Split the request and try the halves.
    TooLarge,
    /// Its events become dead letters.
    Refused,
    /// Try the batch again later (408, 429, 5xx and anything unexpected).
    Retry,
    /// Every request would get the same answer (bad credentials, a wrong URL, a redirect): stop
    /// for the operator, nothing acknowledged.
    Stop,
}

/// Sorts a status code.
pub fn classify(status: StatusCode) -> Verdict {
    match status.as_u16() {
        200..=299 => Verdict::Accepted,
        413 => Verdict::TooLarge,
        408 | 429 => Verdict::Retry,
        300..=399 | 401 | 403 | 404 | 405 => Verdict::Stop,
        400..=499 => Verdict::Refused,
        _ => Verdict::Retry,
    }
}

/// A `Retry-After` value: seconds, or an HTTP date (the wait until then).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// The first [`EXCERPT_CHARS`] characters of an answer's body, control characters as spaces.
pub fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .chars()
        .take(EXCERPT_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// The HTTP client of one sink.
pub struct Service {
    client: Client,
    config: HttpConfig,
    /// `scheme://host:port`: what logs and errors name (a path or query may hold a token).
    origin: String,
}

fn http_error(what: &str, message: String, recovery: Recovery, hint: &str) -> SinkError {
    SinkError::Http {
        what: what.to_owned(),
        message,
        recovery,
        hint: hint.to_owned(),
        retry_after: None,
    }
}

/// A client error in words: its chain of causes, without the URL.
fn describe_error(e: reqwest::Error) -> String {
    let timeout = e.is_timeout();
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    if timeout && !text.contains("timed out") {
        text.push_str(" (timed out)");
    }
    text
}

impl Service {
    /// The client for `config`: rustls with the built-in (webpki) roots or the given CA, an
    /// optional client certificate, the request timeout, no redirects, `User-Agent:
    /// slotstream/<version>`.
    pub fn new(config: &HttpConfig) -> Result<Self, SinkError> {
        let tls_error = |what: &str, e: String| {
            http_error(
                what,
                e,
                Recovery::Stop,
                "check [destination] ca_file, client_cert_file and client_key_file: PEM files",
            )
        };
        let mut builder = Client::builder()
            .use_rustls_tls()
            .user_agent(format!("slotstream/{}", crate::VERSION))
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(2);
        if let Some(ca) = &config.tls.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| tls_error("reading ca_file", format!("{}: {e}", ca.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| tls_error("reading ca_file", describe_error(e)))?;
            if certs.is_empty() {
                return Err(tls_error(
                    "reading ca_file",
                    format!("{} holds no PEM certificate", ca.display()),
                ));
            }
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let Some((cert, key)) = &config.tls.client_cert {
            let mut pem = std::fs::read(cert).map_err(|e| {
                tls_error(
                    "reading client_cert_file",
                    format!("{}: {e}", cert.display()),
                )
            })?;
            pem.push(b'\n');
            pem.extend(std::fs::read(key).map_err(|e| {
                tls_error("reading client_key_file", format!("{}: {e}", key.display()))
            })?);
            let identity = reqwest::Identity::from_pem(&pem)
                .map_err(|e| tls_error("reading the client certificate", describe_error(e)))?;
            builder = builder.identity(identity);
        }
        let client = builder
            .build()
            .map_err(|e| tls_error("building the HTTP client", describe_error(e)))?;
        let origin = config.endpoint.origin().ascii_serialization();
        Ok(Service {
            client,
            config: config.clone(),
            origin,
        })
    }

    /// `scheme://host:port` of the endpoint.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// POSTs `json` (a whole body, uncompressed) and sorts the answer. `Err` for a failure that
    /// is not about these events (retried or stopping, as its recovery says).
    pub async fn post(&self, json: Vec<u8>) -> Result<Answer, SinkError> {
        let what = format!("POST to {}", self.origin);
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let mut request = self.client.post(self.config.endpoint.clone());
        match &self.config.format {
            Format::RudderStack { write_key } => {
                request = request.basic_auth(write_key.expose_secret(), Some(""));
            }
            Format::Webhook {
                headers: extra,
                signature,
            } => {
                for (name, value) in extra {
                    let mut value = HeaderValue::from_str(value.expose_secret()).map_err(|_| {
                        http_error(
                            &what,
                            format!("header {name} has an invalid value"),
                            Recovery::Stop,
                            "fix [destination.headers]",
                        )
                    })?;
                    value.set_sensitive(true);
                    headers.append(name.clone(), value);
                }
                if let Some(signature) = signature {
                    let now = time::OffsetDateTime::now_utc().unix_timestamp();
                    let value = encoder::signature(&signature.secret, now, &json);
                    if let Ok(value) = HeaderValue::from_str(&value) {
                        headers.insert(signature.header.clone(), value);
                    }
                }
            }
        }
        let body = if self.config.gzip {
            headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            encoder::gzip(&json).map_err(|e| {
                http_error(
                    &what,
                    format!("cannot compress the body: {e}"),
                    Recovery::RetryBatch,
                    "this is a bug: report it",
                )
            })?
        } else {
            json
        };
        let response = request
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(|e| self.transport_error(&what, e))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let verdict = classify(status);
        // The status is what counts: an answer's body cut short only shortens the excerpt.
        let answer = read_answer(response).await.unwrap_or_default();
        let excerpt = excerpt(&answer);
        match verdict {
            Verdict::Accepted => Ok(Answer::Accepted),
            Verdict::TooLarge => Ok(Answer::TooLarge { excerpt }),
            Verdict::Refused => Ok(Answer::Refused {
                status: status.as_u16(),
                excerpt,
            }),
            Verdict::Retry => Err(SinkError::Http {
                what,
                message: format!("HTTP {status}: {excerpt}"),
                recovery: Recovery::RetryBatch,
                hint: "the endpoint is failing or throttling; the batch is retried (Retry-After is honoured), nothing past the last checkpoint was acknowledged".into(),
                retry_after,
            }),
            Verdict::Stop => Err(SinkError::Http {
                what,
                message: format!("HTTP {status}: {excerpt}"),
                recovery: Recovery::Stop,
                hint: match status.as_u16() {
                    401 | 403 => "the endpoint refuses the credentials: check write_key_env/write_key_file (the source's write key) or the headers; nothing past the last checkpoint was acknowledged".into(),
                    300..=399 => "the endpoint redirects: set [destination] url to the address it redirects to; nothing past the last checkpoint was acknowledged".into(),
                    _ => "the endpoint does not take events at this URL: check [destination] url (and format); nothing past the last checkpoint was acknowledged".into(),
                },
                retry_after: None,
            }),
        }
    }

    fn transport_error(&self, what: &str, e: reqwest::Error) -> SinkError {
        let hint = if e.is_timeout() {
            "the endpoint did not answer within [destination] timeout; the batch is retried, nothing past the last checkpoint was acknowledged"
        } else {
            "check that the endpoint is up and reachable from here (DNS, firewall, TLS); the batch is retried, nothing past the last checkpoint was acknowledged"
        };
        http_error(what, describe_error(e), Recovery::RetryBatch, hint)
    }

    /// Resolves the endpoint's host, connects, completes the TLS handshake (with the configured
    /// roots and client certificate) and sends a `HEAD` request for the endpoint's path: any
    /// answer counts. No event is sent.
    pub async fn probe(&self) -> Result<String, SinkError> {
        let what = format!("connecting to {}", self.origin);
        let response = self
            .client
            .head(self.config.endpoint.clone())
            .send()
            .await
            .map_err(|e| self.transport_error(&what, e))?;
        Ok(format!(
            "HTTP endpoint {} is reachable ({} format; it answered {} to a HEAD request, no event was sent)",
            self.origin,
            self.config.format.name(),
            response.status().as_u16()
        ))
    }
}

/// Reads up to [`MAX_ANSWER_BYTES`] of an answer's body.
async fn read_answer(mut response: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        body.extend_from_slice(&chunk);
        if body.len() >= MAX_ANSWER_BYTES {
            break;
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_status_gets_its_policy() {
        let v = |code: u16| classify(StatusCode::from_u16(code).expect("status"));
        assert_eq!(v(200), Verdict::Accepted);
        assert_eq!(v(204), Verdict::Accepted);
        assert_eq!(v(413), Verdict::TooLarge);
        for code in [408, 429, 500, 502, 503, 504, 100] {
            assert_eq!(v(code), Verdict::Retry, "{code}");
        }
        for code in [400, 409, 422] {
            assert_eq!(v(code), Verdict::Refused, "{code}");
        }
        for code in [301, 302, 307, 401, 403, 404, 405] {
            assert_eq!(v(code), Verdict::Stop, "{code}");
        }
    }

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        let wait = parse_retry_after(&httpdate::fmt_http_date(later)).expect("date");
        assert!(wait > Duration::from_secs(100) && wait <= Duration::from_secs(120));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn excerpts_are_short_and_on_one_line() {
        let long = "x".repeat(1000);
        assert_eq!(excerpt(long.as_bytes()).chars().count(), EXCERPT_CHARS);
        assert_eq!(excerpt(b"bad\nrequest\r\n"), "bad request");
    }
}
