//! A real HTTP server for the HTTP destination's tests (hyper 1 on 127.0.0.1, one per test):
//! it records every request (method, path, headers, the body decoded from gzip, its answer)
//! and can be told to fail: a status (500, 503, 400…), 429 with `Retry-After`, 413 above a
//! body size, 400 for the request holding a given text, a hang past the client's timeout, a
//! connection closed without an answer, and an outage (every POST fails until switched off).

use std::collections::VecDeque;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// What the server does with a POST.
#[derive(Debug, Clone)]
pub enum Fault {
    /// No fault: answer as usual (to fail a later request of a sequence).
    Pass,
    /// Answer with this status (and a short text body).
    Status(u16),
    /// 429 with `Retry-After: <seconds>`.
    TooManyRequests(u64),
    /// Answer nothing for this long (past the client's timeout), then 503.
    Hang(Duration),
    /// Read the request, then close the connection without an answer.
    Close,
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// `POST`, `HEAD`…
    pub method: String,
    /// The path and query.
    pub path: String,
    /// Headers, names in lower case, in order.
    pub headers: Vec<(String, String)>,
    /// The body, gunzipped when `Content-Encoding: gzip`.
    pub body: Vec<u8>,
    /// The body's size on the wire.
    pub wire_len: usize,
    /// The status answered; 0 when no answer was given (hang, closed connection).
    pub status: u16,
    /// When it arrived.
    pub at: Instant,
    /// Whether the webhook signature matched (`None` when no secret was configured).
    pub signature_ok: Option<bool>,
}

impl Recorded {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "request body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The events of the body: `batch` of a RudderStack body, or the webhook's array.
    pub fn events(&self) -> Vec<serde_json::Value> {
        match self.json() {
            serde_json::Value::Array(events) => events,
            serde_json::Value::Object(mut body) => match body.remove("batch") {
                Some(serde_json::Value::Array(events)) => events,
                other => panic!("no batch array in the body: {other:?}"),
            },
            other => panic!("unexpected body: {other}"),
        }
    }

    /// Whether it was answered 2xx.
    pub fn accepted(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

#[derive(Default)]
struct State {
    requests: Vec<Recorded>,
    /// Faults for the next POSTs, one each.
    next: VecDeque<Fault>,
    /// While set, every POST gets these faults in turn.
    outage: Option<(Vec<Fault>, usize)>,
    /// 413 for bodies (decoded) larger than this.
    max_body: Option<usize>,
    /// (text, status, times): the next `times` POSTs whose body holds `text` get `status`.
    refuse: Option<(String, u16, u32)>,
    /// The webhook's HMAC secret, to verify signatures with.
    hmac_secret: Option<(String, String)>,
}

/// A running test receiver.
pub struct Receiver {
    /// Its port on 127.0.0.1.
    pub port: u16,
    scheme: &'static str,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    /// Starts a receiver on a free port (on the test's runtime).
    pub async fn start() -> Receiver {
        Receiver::start_with(None).await
    }

    /// Starts an HTTPS receiver presenting `cert`/`key` (PEM); with `client_ca`, it requires a
    /// client certificate signed by that CA (mutual TLS).
    pub async fn start_tls(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Receiver {
        Receiver::start_with(Some(tls_acceptor(cert, key, client_ca))).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { handle(state, req).await }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                        Some(acceptor) => {
                            // A handshake the server refuses (no or a bad client certificate)
                            // ends here; the client sees the TLS alert.
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                    }
                });
            }
        });
        Receiver {
            port,
            scheme,
            state,
            task,
        }
    }

    /// `http://127.0.0.1:<port>` (`https://` for a TLS receiver).
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("receiver state")
    }

    /// The next POSTs get `faults`, one each, in order.
    pub fn fail_next(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state().next.extend(faults);
    }

    /// Every POST gets `faults` in turn until [`Receiver::end_outage`].
    pub fn start_outage(&self, faults: Vec<Fault>) {
        self.state().outage = Some((faults, 0));
    }

    /// Ends the outage.
    pub fn end_outage(&self) {
        self.state().outage = None;
    }

    /// 413 for any body (decoded) over `bytes`.
    pub fn limit_body(&self, bytes: usize) {
        self.state().max_body = Some(bytes);
    }

    /// The next `times` POSTs whose body holds `text` are answered `status`.
    pub fn refuse_containing(&self, text: &str, status: u16, times: u32) {
        self.state().refuse = Some((text.to_owned(), status, times));
    }

    /// Verifies the webhook signature in header `header` with `secret`.
    pub fn verify_signatures(&self, header: &str, secret: &str) {
        self.state().hmac_secret = Some((header.to_lowercase(), secret.to_owned()));
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state().requests.clone()
    }

    /// The POSTs so far.
    pub fn posts(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "POST")
            .collect()
    }

    /// The events of the POSTs answered 2xx, in arrival order.
    pub fn delivered(&self) -> Vec<serde_json::Value> {
        self.posts()
            .iter()
            .filter(|r| r.accepted())
            .flat_map(Recorded::events)
            .collect()
    }

    /// The userIds of [`Receiver::delivered`].
    pub fn delivered_users(&self) -> Vec<String> {
        self.delivered()
            .iter()
            .filter_map(|e| e["userId"].as_str().map(str::to_owned))
            .collect()
    }
}

/// The rustls acceptor of an HTTPS receiver.
fn tls_acceptor(cert: &Path, key: &Path, client_ca: Option<&Path>) -> tokio_rustls::TlsAcceptor {
    let pem =
        |path: &Path| std::io::BufReader::new(std::fs::File::open(path).expect("open a PEM file"));
    let chain: Vec<_> = rustls_pemfile::certs(&mut pem(cert))
        .collect::<Result<_, _>>()
        .expect("certificates");
    let key = rustls_pemfile::private_key(&mut pem(key))
        .expect("key file")
        .expect("a private key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("protocol versions");
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pemfile::certs(&mut pem(ca)) {
                roots.add(c.expect("CA certificate")).expect("add CA");
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .expect("server certificate");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

fn respond(status: u16, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text.to_owned())));
    *response.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
    response
}

fn verify(secret: &str, header: Option<&str>, body: &[u8]) -> bool {
    use hmac::Mac;
    let Some(header) = header else { return false };
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = Some(v),
            Some(("v1", v)) => v1 = Some(v),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // The timestamp is recent: a receiver rejects replays by it.
    let fresh = t.parse::<u64>().is_ok_and(|t| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        now.abs_diff(t) < 300
    });
    fresh && expected == v1
}

async fn handle(
    state: Arc<Mutex<State>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let at = Instant::now();
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let wire = req
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let gzip = headers
        .iter()
        .any(|(k, v)| k == "content-encoding" && v == "gzip");
    let body = if gzip {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&wire[..])
            .read_to_end(&mut out)
            .expect("gzip body");
        out
    } else {
        wire.to_vec()
    };
    let mut record = Recorded {
        method,
        path,
        headers,
        wire_len: wire.len(),
        body,
        status: 0,
        at,
        signature_ok: None,
    };
    let fault = {
        let mut s = state.lock().expect("state");
        if let Some((header, secret)) = &s.hmac_secret {
            record.signature_ok = Some(verify(secret, record.header(header), &record.body));
        }
        if record.method != "POST" {
            None
        } else if let Some((faults, n)) = &mut s.outage {
            let fault = faults[*n % faults.len()].clone();
            *n += 1;
            Some(fault)
        } else if let Some(fault) = s.next.pop_front() {
            Some(fault)
        } else if s.max_body.is_some_and(|max| record.body.len() > max) {
            Some(Fault::Status(413))
        } else if let Some((text, status, times)) = &mut s.refuse
            && *times > 0
            && String::from_utf8_lossy(&record.body).contains(text.as_str())
        {
            *times -= 1;
            Some(Fault::Status(*status))
        } else {
            None
        }
    };
    let response = match fault {
        None | Some(Fault::Pass) => Ok(respond(200, "OK")),
        Some(Fault::Status(413)) => Ok(respond(413, "Request size too large")),
        Some(Fault::Status(status)) => Ok(respond(status, &format!("test receiver says {status}"))),
        Some(Fault::TooManyRequests(seconds)) => {
            let mut r = respond(429, "slow down");
            r.headers_mut().insert(
                "retry-after",
                hyper::header::HeaderValue::from_str(&seconds.to_string()).expect("value"),
            );
            Ok(r)
        }
        Some(Fault::Hang(d)) => {
            state.lock().expect("state").requests.push(record);
            tokio::time::sleep(d).await;
            return Ok(respond(503, "too late"));
        }
        Some(Fault::Close) => Err(std::io::Error::other("closing without an answer")),
    };
    if let Ok(r) = &response {
        record.status = r.status().as_u16();
    }
    state.lock().expect("state").requests.push(record);
    response
}

/// Whether `request`'s signature header (`x-slotstream-signature`) matches its body.
pub fn signature_matches(secret: &str, request: &Recorded) -> bool {
    verify(
        secret,
        request.header("x-slotstream-signature"),
        &request.body,
    )
}

/// Standard base64 of `input` (for the expected Basic auth header).
pub fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Points the fixture's pipeline at an HTTP destination: `[destination] type = "http"` with
/// `keys` (TOML lines, sub-tables last).
pub fn use_http_destination(fx: &super::Fixture, keys: &str) {
    fx.rewrite_config(&format!("[destination]\ntype = \"http\"\n{keys}\n"));
}

/// Writes `secret` to a file in the fixture's directory; returns its path as a TOML string.
pub fn secret_file(fx: &super::Fixture, name: &str, secret: &str) -> String {
    let path = fx.dir.path().join(name);
    std::fs::write(&path, format!("{secret}\n")).expect("write secret file");
    format!("{:?}", path.display().to_string())
}

/// The pipeline's dead letters: (userId of the payload, reason), in order.
pub async fn dead_letters(fx: &super::Fixture) -> Vec<(String, String)> {
    fx.db
        .connect()
        .await
        .query(
            r#"SELECT payload->>'user_id', reason FROM "_rudderstack".cdc_dead_letters
                WHERE pipeline = $1 ORDER BY id"#,
            &[&fx.name],
        )
        .await
        .expect("dead letters")
        .iter()
        .map(|r| (r.get::<_, Option<String>>(0).unwrap_or_default(), r.get(1)))
        .collect()
}
