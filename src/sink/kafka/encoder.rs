//! An event as a Kafka record: key, value and headers. The value is the shared JSON encoding
//! (`sink::json`); nothing is stamped here.

use rdkafka::message::{Header, OwnedHeaders};

use crate::sink::json;
use crate::transform::Event;

/// The `event` name of a delete in mirror mode, which a tombstone may follow.
pub const RECORD_DELETED: &str = "Record Deleted";

/// The record key: userId, else anonymousId (one user's events stay in one partition).
pub fn key(event: &Event) -> Option<&str> {
    event.key()
}

/// Whether the event is a delete, after which mirror mode writes a tombstone for its key.
pub fn is_delete(event: &Event) -> bool {
    event.event == Some(RECORD_DELETED)
}

/// The headers: `lsn`, `op`, `table` and `messageId`.
pub fn headers(event: &Event) -> OwnedHeaders {
    let sources = &event.context.sources;
    let mut id = uuid::Uuid::encode_buffer();
    let id = event.message_id.hyphenated().encode_lower(&mut id);
    OwnedHeaders::new_with_capacity(4)
        .insert(Header {
            key: "lsn",
            value: Some(sources.lsn.as_bytes()),
        })
        .insert(Header {
            key: "op",
            value: Some(sources.op.as_str()),
        })
        .insert(Header {
            key: "table",
            value: Some(sources.table.as_bytes()),
        })
        .insert(Header {
            key: "messageId",
            value: Some(id.as_bytes()),
        })
}

/// Appends the values of `events` to `buf`, returning each one's range in it.
pub fn values(events: &[Event], buf: &mut Vec<u8>) -> Vec<std::ops::Range<usize>> {
    buf.clear();
    events
        .iter()
        .map(|e| {
            let start = buf.len();
            json::write_event(buf, e);
            start..buf.len()
        })
        .collect()
}
