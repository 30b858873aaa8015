//! Events as request bodies: each event encoded once per attempt ([`encode`]), requests packed
//! up to `max_request_bytes` with their envelope counted ([`pack`]), the body of a request
//! ([`body`]), its gzip form and its webhook signature. Nothing is stamped here: `sentAt` was
//! set on each event by the delivery step, and the RudderStack envelope's `sentAt` is the
//! events' own.

use std::io::Write;
use std::ops::Range;

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

use super::config::Format;
use crate::sink::json;
use crate::transform::Event;

/// The events of one attempt, each encoded once: `ranges[i]` is event `i`'s JSON in `buf`
/// (empty for an event not sent in this attempt).
#[derive(Debug, Default)]
pub struct Encoded {
    /// The JSON of the events, one after another.
    pub buf: Vec<u8>,
    /// Each event's range in `buf`.
    pub ranges: Vec<Range<usize>>,
}

impl Encoded {
    /// Event `i`'s JSON.
    pub fn event(&self, i: usize) -> &[u8] {
        &self.buf[self.ranges[i].clone()]
    }
}

/// Encodes the events for which `send(i)` holds, as `format` wants them: the RudderStack format
/// also carries an identify's traits in `context.traits` (RudderStack's event spec), the webhook
/// format carries the events as the other destinations write them.
pub fn encode(format: &Format, events: &[Event], send: impl Fn(usize) -> bool, into: &mut Encoded) {
    into.buf.clear();
    into.ranges.clear();
    for (i, event) in events.iter().enumerate() {
        let start = into.buf.len();
        if send(i) {
            match format {
                Format::RudderStack { .. } => {
                    json::write_event_with_context_traits(&mut into.buf, event)
                }
                Format::Webhook { .. } => json::write_event(&mut into.buf, event),
            }
        }
        into.ranges.push(start..into.buf.len());
    }
}

/// The parts of a body around its events.
fn envelope(format: &Format, sent_at: &str) -> (Vec<u8>, Vec<u8>) {
    match format {
        Format::RudderStack { .. } => {
            let mut suffix = b"],\"sentAt\":".to_vec();
            // The same JSON string writer as the events' (a timestamp needs no escaping, but a
            // body is never built by hand).
            suffix.extend_from_slice(&serde_json::to_vec(sent_at).unwrap_or_default());
            suffix.push(b'}');
            (b"{\"batch\":[".to_vec(), suffix)
        }
        Format::Webhook { .. } => (b"[".to_vec(), b"]".to_vec()),
    }
}

/// Bytes a body holds besides its events' JSON and the commas between them.
pub fn envelope_len(format: &Format, sent_at: &str) -> usize {
    let (prefix, suffix) = envelope(format, sent_at);
    prefix.len() + suffix.len()
}

/// The body of a request of the events `indices`.
pub fn body(format: &Format, encoded: &Encoded, indices: &[usize], sent_at: &str) -> Vec<u8> {
    let (prefix, suffix) = envelope(format, sent_at);
    let events: usize = indices.iter().map(|&i| encoded.ranges[i].len()).sum();
    let mut out = Vec::with_capacity(prefix.len() + events + indices.len() + suffix.len());
    out.extend_from_slice(&prefix);
    for (n, &i) in indices.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(encoded.event(i));
    }
    out.extend_from_slice(&suffix);
    out
}

/// Splits `indices` (in order) into requests of at most `max_request_bytes`: an envelope of
/// `envelope` bytes, each event's JSON and the commas between them. Every event fits alone
/// (larger ones were rejected before).
pub fn pack(
    encoded: &Encoded,
    indices: &[usize],
    envelope: usize,
    max_request_bytes: usize,
) -> Vec<Vec<usize>> {
    let mut requests = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut size = envelope;
    for &i in indices {
        let len = encoded.ranges[i].len();
        let added = len + usize::from(!current.is_empty());
        if !current.is_empty() && size + added > max_request_bytes {
            requests.push(std::mem::take(&mut current));
            size = envelope;
            current.push(i);
            size += len;
        } else {
            current.push(i);
            size += added;
        }
    }
    if !current.is_empty() {
        requests.push(current);
    }
    requests
}

/// `body` compressed with gzip (default level).
pub fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4 + 64),
        flate2::Compression::default(),
    );
    encoder.write_all(body)?;
    encoder.finish()
}

/// The webhook signature header's value: `t=<unix seconds>,v1=<hex HMAC-SHA256 of
/// "<t>.<body>">`, the body as JSON before any compression. A receiver recomputes it with the
/// shared secret and rejects a stale `t` (a replay).
pub fn signature(secret: &SecretString, unix_seconds: i64, body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes()) else {
        return String::new();
    };
    mac.update(unix_seconds.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = format!("t={unix_seconds},v1=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rudderstack() -> Format {
        Format::RudderStack {
            write_key: SecretString::from("k"),
        }
    }

    #[test]
    fn rudderstack_bodies_carry_the_batch_and_context_traits() {
        let mut events = crate::sink::test_events(&["a", "b"]);
        for e in &mut events {
            e.sent_at = Some("2024-01-02T03:04:06Z".into());
        }
        let mut enc = Encoded::default();
        encode(&rudderstack(), &events, |_| true, &mut enc);
        let body = body(&rudderstack(), &enc, &[0, 1], "2024-01-02T03:04:06Z");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["sentAt"], "2024-01-02T03:04:06Z");
        let batch = v["batch"].as_array().expect("batch");
        assert_eq!(batch.len(), 2);
        assert_eq!(batch[1]["userId"], "b");
        assert_eq!(batch[1]["context"]["traits"], batch[1]["traits"]);
        assert_eq!(batch[1]["context"]["library"]["name"], "slotstream");
        // The webhook format writes what the other destinations write.
        let webhook = Format::Webhook {
            headers: Vec::new(),
            signature: None,
        };
        encode(&webhook, &events, |i| i == 1, &mut enc);
        assert!(enc.event(0).is_empty());
        let body = super::body(&webhook, &enc, &[1], "x");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            v,
            serde_json::json!([serde_json::to_value(&events[1]).expect("event")])
        );
    }

    #[test]
    fn requests_are_packed_up_to_the_limit_with_the_envelope_counted() {
        let events = crate::sink::test_events(&["a", "b", "c", "d", "e"]);
        let mut enc = Encoded::default();
        encode(&rudderstack(), &events, |_| true, &mut enc);
        let one = enc.ranges[0].len();
        let env = envelope_len(&rudderstack(), "2024-01-02T03:04:06Z");
        let all: Vec<usize> = (0..5).collect();
        // Room for exactly two events and their comma.
        let limit = env + 2 * one + 1;
        let packed = pack(&enc, &all, env, limit);
        assert_eq!(packed, [vec![0, 1], vec![2, 3], vec![4]]);
        for request in &packed {
            assert!(body(&rudderstack(), &enc, request, "2024-01-02T03:04:06Z").len() <= limit);
        }
        assert_eq!(pack(&enc, &all, env, limit - 1).len(), 5);
        assert_eq!(
            pack(&enc, &all, env, usize::MAX),
            std::slice::from_ref(&all)
        );
        assert_eq!(pack(&enc, &[], env, limit), Vec::<Vec<usize>>::new());
    }

    #[test]
    fn signature_is_an_hmac_of_the_timestamp_and_the_body() {
        let secret = SecretString::from("Jefe");
        let s = signature(&secret, 0, b"what do ya want for nothing?");
        // The signed message is "<t>.<body>".
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").expect("key");
        mac.update(b"0.what do ya want for nothing?");
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(s, format!("t=0,v1={hex}"));
        assert_ne!(s, signature(&secret, 1, b"what do ya want for nothing?"));
    }

    #[test]
    fn gzip_round_trips() {
        use std::io::Read;
        let body = b"[{\"a\":1}]".repeat(100);
        let packed = gzip(&body).expect("gzip");
        assert!(packed.len() < body.len());
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&packed[..])
            .read_to_end(&mut out)
            .expect("gunzip");
        assert_eq!(out, body);
    }
}
