//! The event of docs/architecture.md §5, and its deterministic `messageId`.
//!
//! `messageId` is a UUID v5 of the pipeline name and the change's position: the commit LSN and
//! the change's ordinal within its transaction for streamed changes, the snapshot LSN and the
//! row's key for snapshot rows. Replaying the same WAL, or re-running the same snapshot, yields
//! the same ids, so a destination that deduplicates on `messageId` sees each change once.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use serde::{Serialize, Serializer};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::Lsn;

/// Namespace of every `messageId` (UUID v5).
const MESSAGE_NAMESPACE: Uuid = Uuid::from_u128(0x2c9e_41d7_6f0a_4b1c_8e55_93a2_7d10_c4f8);

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// An immutable string that many events share (pipeline and table names, a transaction's LSN
/// and commit time, a batch's `sentAt`): a clone is a reference count, not a copy. Serializes
/// as a plain JSON string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SharedStr(Arc<str>);

impl Deref for SharedStr {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for SharedStr {
    fn from(s: &str) -> Self {
        SharedStr(Arc::from(s))
    }
}

impl From<String> for SharedStr {
    fn from(s: String) -> Self {
        SharedStr(Arc::from(s))
    }
}

impl PartialEq<str> for SharedStr {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for SharedStr {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl fmt::Debug for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for SharedStr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

/// What kind of change produced the event (`context.sources.op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// A row of the full sync.
    Snapshot,
    /// An INSERT.
    Insert,
    /// An UPDATE.
    Update,
    /// A DELETE (mirror mode).
    Delete,
}

impl Op {
    /// The name written into events and Kafka headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Snapshot => "snapshot",
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }
}

/// `identify` for rows, `track` ("Record Deleted") for deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A row's traits.
    Identify,
    /// A deleted row.
    Track,
}

/// `context.library`.
#[derive(Debug, Clone, Serialize)]
pub struct Library {
    /// Always `slotstream`.
    pub name: &'static str,
    /// This build's version.
    pub version: &'static str,
}

/// `context.sources`: where the change came from.
#[derive(Debug, Clone, Serialize)]
pub struct Sources {
    /// Pipeline name.
    pub name: SharedStr,
    /// Schema of the table.
    pub schema: SharedStr,
    /// The table.
    pub table: SharedStr,
    /// Kind of change.
    pub op: Op,
    /// Commit LSN (stream) or snapshot LSN, as `X/Y`.
    pub lsn: SharedStr,
}

/// `context`.
#[derive(Debug, Clone, Serialize)]
pub struct Context {
    /// The emitting library.
    pub library: Library,
    /// The source of the change.
    pub sources: Sources,
}

/// One event, as sent.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// `identify` or `track`.
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// `Record Deleted` for deletes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<&'static str>,
    /// Deterministic id of the change.
    pub message_id: Uuid,
    /// From the user_id column.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// From the anonymous_id column, or derived from the email.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anonymous_id: Option<String>,
    /// Identify: selected columns under their trait keys, and constants.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traits: Option<crate::transform::Traits>,
    /// Track: the identifiers of the deleted row.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub properties: Option<Map<String, Value>>,
    /// Library and source.
    pub context: Context,
    /// Commit time (or snapshot time), RFC 3339.
    pub original_timestamp: SharedStr,
    /// Delivery time, set by the sink as it writes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<SharedStr>,
}

impl Event {
    /// The record key for keyed destinations: userId, else anonymousId.
    pub fn key(&self) -> Option<&str> {
        self.user_id.as_deref().or(self.anonymous_id.as_deref())
    }
}

/// `messageId` of a streamed change: commit LSN and ordinal within the transaction.
pub fn stream_message_id(pipeline: &str, commit_lsn: Lsn, ordinal: u64) -> Uuid {
    // The name `{pipeline}\0{commit LSN as u64}\0{ordinal}`, built without `format!`: this
    // runs once per change.
    let mut name = Vec::with_capacity(pipeline.len() + 42);
    name.extend_from_slice(pipeline.as_bytes());
    name.push(0);
    push_decimal(&mut name, commit_lsn.as_u64());
    name.push(0);
    push_decimal(&mut name, ordinal);
    uuid_v5(&MESSAGE_NAMESPACE, &name)
}

/// `Uuid::new_v5(namespace, name)`, the same UUID, by a SHA-1 that uses the CPU's SHA
/// instructions where it has them (the `uuid` crate's own SHA-1 is portable code, and a
/// messageId is computed for every row).
pub fn uuid_v5(namespace: &Uuid, name: &[u8]) -> Uuid {
    let mut hasher = V5Hasher::new(namespace);
    hasher.update(name);
    hasher.finish()
}

/// A UUID v5 whose name is fed in pieces (no buffer to build it in first).
pub struct V5Hasher(sha1::Sha1);

impl V5Hasher {
    /// A hasher for names in `namespace`.
    pub fn new(namespace: &Uuid) -> Self {
        use sha1::Digest;
        let mut h = sha1::Sha1::new();
        h.update(namespace.as_bytes());
        V5Hasher(h)
    }

    /// Appends `bytes` to the name.
    pub fn update(&mut self, bytes: &[u8]) {
        sha1::Digest::update(&mut self.0, bytes);
    }

    /// The UUID of the name fed so far.
    pub fn finish(self) -> Uuid {
        let digest = sha1::Digest::finalize(self.0);
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        uuid::Builder::from_sha1_bytes(bytes).into_uuid()
    }
}

impl std::io::Write for V5Hasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Appends the decimal digits of `n`.
fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

/// `messageId` of a snapshot row of the full sync `generation` from the row's identity (see
/// `source::snapshot`: key and content).
pub fn snapshot_message_id(pipeline: &str, generation: i64, row_identity: &str) -> Uuid {
    let mut hasher = snapshot_id_hasher(pipeline, generation);
    hasher.update(row_identity.as_bytes());
    hasher.finish()
}

/// A hasher fed `pipeline \0 snapshot \0 generation \0`: the start of every snapshot row's
/// messageId name; the row's identity follows (see [`snapshot_message_id`]).
pub fn snapshot_id_hasher(pipeline: &str, generation: i64) -> V5Hasher {
    let mut hasher = V5Hasher::new(&MESSAGE_NAMESPACE);
    hasher.update(pipeline.as_bytes());
    hasher.update(b"\0snapshot\0");
    let mut digits = Vec::with_capacity(20);
    push_decimal(&mut digits, generation.unsigned_abs());
    hasher.update(&digits);
    hasher.update(&[0]);
    hasher
}

/// RFC 3339 (UTC, microseconds) of a PostgreSQL timestamp (µs since 2000-01-01).
pub fn pg_micros_to_rfc3339(micros: i64) -> String {
    let unix_nanos = (i128::from(micros) + i128::from(PG_EPOCH_OFFSET_MICROS)) * 1000;
    OffsetDateTime::from_unix_timestamp_nanos(unix_nanos)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_owned())
}

/// Now, RFC 3339 UTC.
pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

/// Now as PostgreSQL microseconds since 2000-01-01.
pub fn now_pg_micros() -> i64 {
    let unix = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000;
    i64::try_from(unix).unwrap_or(i64::MAX) - PG_EPOCH_OFFSET_MICROS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_deterministic_and_position_specific() {
        let a = stream_message_id("p", Lsn(0x16B6C50), 3);
        assert_eq!(a, stream_message_id("p", Lsn(0x16B6C50), 3));
        assert_ne!(a, stream_message_id("p", Lsn(0x16B6C50), 4));
        assert_ne!(a, stream_message_id("q", Lsn(0x16B6C50), 3));
        assert_ne!(a, stream_message_id("p", Lsn(0x16B6C51), 3));
        for (lsn, ordinal) in [(0, 0), (0x16B6C50, 3), (u64::MAX, u64::MAX)] {
            let name = format!("p\u{0}{lsn}\u{0}{ordinal}");
            let expected = Uuid::new_v5(&MESSAGE_NAMESPACE, name.as_bytes());
            assert_eq!(stream_message_id("p", Lsn(lsn), ordinal), expected);
        }
        let s = snapshot_message_id("p", 1, "[1]");
        assert_eq!(s, snapshot_message_id("p", 1, "[1]"));
        assert_ne!(s, snapshot_message_id("p", 1, "[2]"));
        assert_ne!(s, snapshot_message_id("p", 2, "[1]"));
        for (generation, identity) in [(1, "[1]"), (12, "[\"a\"]\u{0}{\"x\":1}")] {
            let name = format!("p\u{0}snapshot\u{0}{generation}\u{0}{identity}");
            let expected = Uuid::new_v5(&MESSAGE_NAMESPACE, name.as_bytes());
            assert_eq!(snapshot_message_id("p", generation, identity), expected);
        }
        // Every length around SHA-1's 64-byte blocks: the same UUID as the `uuid` crate's.
        let long: Vec<u8> = (0..300u32).map(|i| (i * 7 % 251) as u8).collect();
        for n in 0..long.len() {
            assert_eq!(
                uuid_v5(&MESSAGE_NAMESPACE, &long[..n]),
                Uuid::new_v5(&MESSAGE_NAMESPACE, &long[..n])
            );
        }
    }

    #[test]
    fn pg_epoch_converts_to_rfc3339() {
        assert_eq!(pg_micros_to_rfc3339(0), "2000-01-01T00:00:00Z");
        assert_eq!(pg_micros_to_rfc3339(1_500_000), "2000-01-01T00:00:01.5Z");
    }

    #[test]
    fn event_serializes_in_contract_shape() {
        let e = Event {
            kind: EventKind::Identify,
            event: None,
            message_id: Uuid::nil(),
            user_id: Some("u_1".into()),
            anonymous_id: None,
            traits: Some(crate::transform::Traits::default()),
            properties: None,
            context: Context {
                library: Library {
                    name: "slotstream",
                    version: "0.1.0",
                },
                sources: Sources {
                    name: "p".into(),
                    schema: "public".into(),
                    table: "users".into(),
                    op: Op::Insert,
                    lsn: "0/1".into(),
                },
            },
            original_timestamp: "2000-01-01T00:00:00Z".into(),
            sent_at: Some("2000-01-01T00:00:01Z".into()),
        };
        let v: Value = serde_json::to_value(&e).expect("serializes");
        assert_eq!(v["type"], "identify");
        assert_eq!(v["userId"], "u_1");
        assert!(v.get("anonymousId").is_none());
        assert_eq!(v["context"]["sources"]["op"], "insert");
        assert_eq!(v["messageId"], Uuid::nil().to_string());
        assert!(v.get("sentAt").is_some() && v.get("originalTimestamp").is_some());
    }
}

/// What the events of one transaction (or of one full sync) share, formatted once: the
/// position (`context.sources.lsn`) and the time (`originalTimestamp`).
#[derive(Debug, Clone)]
pub struct Stamp {
    lsn: SharedStr,
    timestamp: SharedStr,
}

impl Stamp {
    /// The commit (or snapshot) LSN and its time, RFC 3339.
    pub fn new(lsn: Lsn, timestamp: &str) -> Self {
        Stamp {
            lsn: lsn.to_string().into(),
            timestamp: timestamp.into(),
        }
    }
}

/// Builds the events of one pipeline and table: the fixed parts (names, library) are held here,
/// so every path (snapshot, stream, preview) produces the same shape.
#[derive(Debug, Clone)]
pub struct EventFactory {
    pipeline: SharedStr,
    schema: SharedStr,
    table: SharedStr,
}

impl EventFactory {
    /// For `pipeline` following `schema.table`.
    pub fn new(pipeline: &str, schema: &str, table: &str) -> Self {
        EventFactory {
            pipeline: pipeline.into(),
            schema: schema.into(),
            table: table.into(),
        }
    }

    /// The pipeline name (for message ids).
    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }

    fn context(&self, op: Op, stamp: &Stamp) -> Context {
        Context {
            library: Library {
                name: crate::LIBRARY_NAME,
                version: crate::VERSION,
            },
            sources: Sources {
                name: self.pipeline.clone(),
                schema: self.schema.clone(),
                table: self.table.clone(),
                op,
                lsn: stamp.lsn.clone(),
            },
        }
    }

    /// An `identify` event for an inserted, updated or snapshot row.
    pub fn identify(
        &self,
        row: crate::transform::ProjectedRow,
        op: Op,
        stamp: &Stamp,
        message_id: Uuid,
    ) -> Event {
        Event {
            kind: EventKind::Identify,
            event: None,
            message_id,
            user_id: row.user_id,
            anonymous_id: row.anonymous_id,
            traits: Some(row.traits),
            properties: None,
            context: self.context(op, stamp),
            original_timestamp: stamp.timestamp.clone(),
            sent_at: None,
        }
    }

    /// A `track` event named `Record Deleted` for a deleted row (mirror mode), with the row's
    /// identifiers as properties.
    pub fn deleted(
        &self,
        row: crate::transform::ProjectedRow,
        stamp: &Stamp,
        message_id: Uuid,
    ) -> Event {
        let properties = row.identifiers();
        Event {
            kind: EventKind::Track,
            event: Some("Record Deleted"),
            message_id,
            user_id: row.user_id,
            anonymous_id: row.anonymous_id,
            traits: None,
            properties: Some(properties),
            context: self.context(Op::Delete, stamp),
            original_timestamp: stamp.timestamp.clone(),
            sent_at: None,
        }
    }
}
