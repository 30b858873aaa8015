//! Why a pgoutput message could not be decoded.

use std::str::Utf8Error;

use super::{MAX_PROTOCOL_VERSION, MIN_PROTOCOL_VERSION, MessageKind};

/// Why a pgoutput message could not be decoded (or a change could not be matched to its
/// relation).
///
/// Offsets count bytes from the start of the message (the tag is offset 0). Every variant is
/// fatal: the input is corrupt or the session is out of sync, and retrying the same bytes
/// cannot succeed (see [`DecodeError::is_retryable`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The decoder was created for a protocol version it does not know.
    #[error(
        "pgoutput protocol version {version} is not supported (expected {MIN_PROTOCOL_VERSION} to {MAX_PROTOCOL_VERSION})"
    )]
    UnsupportedProtocolVersion {
        /// The requested version.
        version: u32,
    },
    /// The payload was empty.
    #[error("empty pgoutput message: no tag byte at offset 0")]
    Empty,
    /// The first byte is not a known message tag.
    #[error("unknown pgoutput message tag {} at offset 0", show_byte(.tag))]
    UnknownTag {
        /// The byte found.
        tag: u8,
    },
    /// The message kind needs a newer protocol version than the session negotiated.
    #[error(
        "{kind} message at offset 0 needs pgoutput protocol version {min_version} or later, but the session uses version {version}"
    )]
    NotInProtocolVersion {
        /// The message kind.
        kind: MessageKind,
        /// The session's version.
        version: u32,
        /// The lowest version that carries this kind.
        min_version: u32,
    },
    /// A message arrived inside a streamed block when it must be outside, or vice versa.
    #[error("{kind} message at offset 0 is not valid {}", if *.in_stream { "inside a streamed block" } else { "outside a streamed block" })]
    UnexpectedStreamState {
        /// The message kind.
        kind: MessageKind,
        /// Whether the decoder was inside a streamed block.
        in_stream: bool,
    },
    /// The message ended before a field did.
    #[error(
        "{kind} message truncated at offset {offset}: {field} needs {needed} bytes, only {available} remain"
    )]
    Truncated {
        /// The message kind.
        kind: MessageKind,
        /// Where the field starts.
        offset: usize,
        /// The field being read.
        field: &'static str,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes left in the message.
        available: usize,
    },
    /// A string field has no NUL terminator before the end of the message.
    #[error("{kind} message truncated at offset {offset}: {field} has no NUL terminator")]
    UnterminatedString {
        /// The message kind.
        kind: MessageKind,
        /// Where the string starts.
        offset: usize,
        /// The field being read.
        field: &'static str,
    },
    /// A name is not valid UTF-8.
    #[error("{kind} message: {field} at offset {offset} is not valid UTF-8 ({source})")]
    InvalidUtf8 {
        /// The message kind.
        kind: MessageKind,
        /// Where the string starts.
        offset: usize,
        /// The field being read.
        field: &'static str,
        /// Where in the string the invalid bytes are.
        source: Utf8Error,
    },
    /// A tuple marker is not one of those allowed at that point.
    #[error("{kind} message: unknown tuple kind {} at offset {offset}, expected {expected}", show_byte(.tag))]
    UnknownTupleKind {
        /// The message kind.
        kind: MessageKind,
        /// Where the marker is.
        offset: usize,
        /// The byte found.
        tag: u8,
        /// The markers allowed there.
        expected: &'static str,
    },
    /// A column value marker is not `n`, `u`, `t` or `b`.
    #[error("{kind} message: unknown column value kind {} at offset {offset}, expected 'n', 'u', 't' or 'b'", show_byte(.tag))]
    UnknownCellKind {
        /// The message kind.
        kind: MessageKind,
        /// Where the marker is.
        offset: usize,
        /// The byte found.
        tag: u8,
    },
    /// The replica identity byte is not `d`, `n`, `f` or `i`.
    #[error("{kind} message: unknown replica identity {} at offset {offset}, expected 'd', 'n', 'f' or 'i'", show_byte(.value))]
    UnknownReplicaIdentity {
        /// The message kind.
        kind: MessageKind,
        /// Where the byte is.
        offset: usize,
        /// The byte found.
        value: u8,
    },
    /// A length field is negative.
    #[error("{kind} message: {field} at offset {offset} has negative length {length}")]
    NegativeLength {
        /// The message kind.
        kind: MessageKind,
        /// Where the length is.
        offset: usize,
        /// The field being read.
        field: &'static str,
        /// The length found.
        length: i32,
    },
    /// A count announces more items than the rest of the message could possibly hold.
    #[error(
        "{kind} message: {field} at offset {offset} announces {count} entries of at least {min_entry_size} bytes, but only {available} bytes remain"
    )]
    CountMismatch {
        /// The message kind.
        kind: MessageKind,
        /// Where the count is.
        offset: usize,
        /// The count field.
        field: &'static str,
        /// The count found.
        count: u64,
        /// The smallest encoding of one entry.
        min_entry_size: usize,
        /// Bytes left after the count.
        available: usize,
    },
    /// Bytes remain after the message's last field.
    #[error(
        "{kind} message: {count} trailing bytes at offset {offset} after the end of the message"
    )]
    TrailingBytes {
        /// The message kind.
        kind: MessageKind,
        /// Where the message should have ended.
        offset: usize,
        /// How many bytes follow.
        count: usize,
    },
    /// A change refers to a relation no `Relation` message announced in this session.
    #[error(
        "a change refers to relation {rel_id}, but no Relation message announced it in this session"
    )]
    UnknownRelation {
        /// The relation id of the change.
        rel_id: u32,
    },
    /// A tuple's cell count differs from its relation's announced column count.
    #[error(
        "a tuple of relation {rel_id} ({relation}) has {found} columns, but its Relation message announced {expected}"
    )]
    ColumnCountMismatch {
        /// The relation id.
        rel_id: u32,
        /// `schema.table` of the relation.
        relation: String,
        /// Columns announced.
        expected: usize,
        /// Cells in the tuple.
        found: usize,
    },
}

impl DecodeError {
    /// Always `false`: decoding is pure, so the same bytes fail the same way again. The
    /// session must stop and the operator must look at the message (the error names its kind
    /// and the offending byte offset).
    pub fn is_retryable(&self) -> bool {
        false
    }

    /// The byte offset in the message where decoding failed, when there is one.
    pub fn offset(&self) -> Option<usize> {
        match self {
            Self::Empty
            | Self::UnknownTag { .. }
            | Self::NotInProtocolVersion { .. }
            | Self::UnexpectedStreamState { .. } => Some(0),
            Self::Truncated { offset, .. }
            | Self::UnterminatedString { offset, .. }
            | Self::InvalidUtf8 { offset, .. }
            | Self::UnknownTupleKind { offset, .. }
            | Self::UnknownCellKind { offset, .. }
            | Self::UnknownReplicaIdentity { offset, .. }
            | Self::NegativeLength { offset, .. }
            | Self::CountMismatch { offset, .. }
            | Self::TrailingBytes { offset, .. } => Some(*offset),
            Self::UnsupportedProtocolVersion { .. }
            | Self::UnknownRelation { .. }
            | Self::ColumnCountMismatch { .. } => None,
        }
    }
}

/// `'X'` for printable ASCII, `0xNN` otherwise.
fn show_byte(byte: &u8) -> String {
    if byte.is_ascii_graphic() {
        format!("'{}' (0x{byte:02x})", char::from(*byte))
    } else {
        format!("0x{byte:02x}")
    }
}
