//! The HTTP destination (`[destination] type = "http"`): RudderStack's HTTP API
//! (`format = "rudderstack"`: `POST <url>/v1/batch`, `{"batch":[…],"sentAt":…}`, Basic auth with
//! the source's write key) or a webhook (`format = "webhook"`: `POST <url>` with a JSON array of
//! events, custom headers and an optional HMAC-SHA256 signature).
//!
//! One `reqwest` client per sink (a keep-alive connection pool, rustls with the built-in webpki
//! roots or a given CA, an optional client certificate), one request in flight per pipeline:
//! requests go out one after another in commit order, so one user's events never overtake
//! each other.
//!
//! A batch is delivered when every request of it was answered 2xx, or its events refused for
//! good; only then does the checkpoint move. What an answer means ([`service::classify`]):
//! - 2xx: delivered;
//! - connection errors, timeouts, 408, 429, 5xx: the batch fails and is retried (`sink::retry`,
//!   honouring `Retry-After`); the requests already answered 2xx are not sent again;
//! - 413: the request is split in halves, each sent in turn; a single event still refused is a
//!   dead letter;
//! - 401, 403, 404, 405, 3xx: every request would get the same answer (a bad write key, a
//!   wrong URL): the pipeline stops for the operator, nothing acknowledged;
//! - another 4xx: the request's events become dead letters with `HTTP <status>: <excerpt>`,
//!   and the batch goes on.
//!
//! Events over `max_event_bytes` are dead letters before anything is sent; requests are packed
//! up to `max_request_bytes`, the envelope counted ([`encoder::pack`]).

mod config;
pub mod encoder;
pub mod service;
mod sink;

pub use config::{
    DEFAULT_MAX_EVENT_BYTES, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_SIGNATURE_HEADER, Format,
    HttpConfig, RawHttpConfig, Signature, Tls,
};
pub use sink::HttpSink;
