//! The `pgoutput` wire format: one `XLogData` payload in, one [`LogicalMessage`] out.
//!
//! PostgreSQL's built-in output plugin writes the messages described in the server
//! documentation, "Logical Replication Message Formats". Each payload starts with a one-byte
//! tag and holds exactly one message; integers are big-endian, strings are NUL-terminated.
//!
//! # Protocol invariants this decoder relies on (and checks)
//!
//! - **Versions.** `proto_version` 1 carries plain transactions; 2 (PostgreSQL 14+) adds
//!   streamed in-progress transactions (`Stream Start/Stop/Commit/Abort`); 3 (15+) adds
//!   two-phase commit (`Begin Prepare`, `Prepare`, `Commit Prepared`, `Rollback Prepared`,
//!   `Stream Prepare`); 4 (16+) adds the abort LSN and time to `Stream Abort` when streaming is
//!   `parallel`. A message the negotiated version cannot carry is an error, not a guess.
//! - **Streamed blocks.** Between `Stream Start` and `Stream Stop`, `Relation`, `Type`,
//!   `Insert`, `Update`, `Delete`, `Truncate` and `Message` start with the xid of the streamed
//!   (sub)transaction. Nothing on the wire says whether a message has that field: only the
//!   decoder's state does, which is why [`PgoutputDecoder::decode`] takes `&mut self` and must
//!   see every message of the session, in order. Blocks never nest, and transaction
//!   boundaries (`Begin`, `Commit`, `Stream Commit`, `Stream Abort`, the two-phase messages)
//!   are never inside one; violating either is an error. A new replication session starts
//!   outside any block: make a new decoder (or call [`PgoutputDecoder::reset`]) for it.
//! - **Relations before changes.** A `Relation` message always precedes the first change of a
//!   relation in a session, and is sent again after any schema change (or other invalidation)
//!   of that relation. Tuples are positional: cell `i` belongs to column `i` of the *last*
//!   `Relation` message for that `rel_id`. Consumers must consult
//!   [`super::relation::RelationCache`], never the catalog, whose current shape may already be
//!   newer than the change being decoded.
//! - **Exact framing.** A message ends where its last field ends; trailing bytes are an error.
//!   `Stream Abort` under version 4 is the one message whose length varies (its two extra
//!   fields are present only with `streaming = parallel`): the decoder accepts both lengths.
//! - **Untrusted input.** Counts and lengths on the wire are checked against the bytes that
//!   remain before anything is allocated, so memory stays bounded by the input's size.
//!   Malformed input yields a [`DecodeError`], never a panic.
//!
//! Cell values are zero-copy [`Bytes`] slices of the input; names (namespaces, relations,
//! columns, types, prefixes, gids) are decoded as UTF-8 and rejected when they are not.
//! Timestamps are microseconds since the PostgreSQL epoch, 2000-01-01 00:00:00 UTC; see
//! [`pg_micros_to_unix_micros`].

use bytes::Bytes;

use crate::Lsn;

mod error;
mod message;
#[cfg(test)]
mod tests;

pub use error::DecodeError;
pub use message::*;

/// Microseconds between the Unix epoch (1970-01-01) and the PostgreSQL epoch (2000-01-01).
pub const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// Converts a pgoutput timestamp (microseconds since 2000-01-01 UTC) to microseconds since the
/// Unix epoch; `None` if the result does not fit in an `i64` (e.g. `infinity`).
pub fn pg_micros_to_unix_micros(pg_micros: i64) -> Option<i64> {
    pg_micros.checked_add(PG_EPOCH_UNIX_MICROS)
}

/// The lowest `proto_version` this decoder understands.
pub const MIN_PROTOCOL_VERSION: u32 = 1;
/// The highest `proto_version` this decoder understands.
pub const MAX_PROTOCOL_VERSION: u32 = 4;

/// Decodes pgoutput messages of one replication session, one payload at a time.
///
/// The decoder is a small state machine: it remembers the negotiated protocol version and
/// whether it is inside a streamed block (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgoutputDecoder {
    protocol_version: u32,
    in_stream: bool,
}

impl PgoutputDecoder {
    /// A decoder for a session started with `proto_version` `protocol_version`.
    ///
    /// Versions outside [`MIN_PROTOCOL_VERSION`]`..=`[`MAX_PROTOCOL_VERSION`] are accepted here
    /// but every [`decode`](Self::decode) then fails with
    /// [`DecodeError::UnsupportedProtocolVersion`].
    pub fn new(protocol_version: u32) -> Self {
        Self {
            protocol_version,
            in_stream: false,
        }
    }

    /// The protocol version this decoder was created for.
    pub fn protocol_version(&self) -> u32 {
        self.protocol_version
    }

    /// Whether the last decoded messages opened a streamed block (`Stream Start` seen, its
    /// `Stream Stop` not yet).
    pub fn in_stream(&self) -> bool {
        self.in_stream
    }

    /// Forgets any open streamed block, as at the start of a new replication session.
    pub fn reset(&mut self) {
        self.in_stream = false;
    }

    /// Decodes one complete message (the payload of one `XLogData`).
    ///
    /// On error the decoder's state is unchanged. Every error is fatal for the session: the
    /// same bytes will never decode differently.
    pub fn decode(&mut self, data: &Bytes) -> Result<LogicalMessage, DecodeError> {
        let version = self.protocol_version;
        if !(MIN_PROTOCOL_VERSION..=MAX_PROTOCOL_VERSION).contains(&version) {
            return Err(DecodeError::UnsupportedProtocolVersion { version });
        }
        let &tag = data.first().ok_or(DecodeError::Empty)?;
        let kind = MessageKind::from_tag(tag).ok_or(DecodeError::UnknownTag { tag })?;
        if version < kind.min_protocol_version() {
            return Err(DecodeError::NotInProtocolVersion {
                kind,
                version,
                min_version: kind.min_protocol_version(),
            });
        }
        self.check_stream_state(kind)?;

        let mut r = Reader {
            buf: data,
            pos: 1,
            kind,
        };
        let message = self.decode_body(kind, &mut r)?;
        r.finish()?;
        match kind {
            MessageKind::StreamStart => self.in_stream = true,
            MessageKind::StreamStop => self.in_stream = false,
            _ => {}
        }
        Ok(message)
    }

    fn check_stream_state(&self, kind: MessageKind) -> Result<(), DecodeError> {
        use MessageKind as K;
        let allowed = match kind {
            K::StreamStop => self.in_stream,
            K::StreamStart
            | K::Begin
            | K::Commit
            | K::StreamCommit
            | K::StreamAbort
            | K::BeginPrepare
            | K::Prepare
            | K::CommitPrepared
            | K::RollbackPrepared
            | K::StreamPrepare => !self.in_stream,
            _ => true,
        };
        if allowed {
            Ok(())
        } else {
            Err(DecodeError::UnexpectedStreamState {
                kind,
                in_stream: self.in_stream,
            })
        }
    }

    /// The xid that starts a change message inside a streamed block.
    fn stream_xid(&self, r: &mut Reader<'_>) -> Result<Option<u32>, DecodeError> {
        if self.in_stream {
            r.u32("streamed transaction xid").map(Some)
        } else {
            Ok(None)
        }
    }

    fn decode_body(
        &self,
        kind: MessageKind,
        r: &mut Reader<'_>,
    ) -> Result<LogicalMessage, DecodeError> {
        use MessageKind as K;
        Ok(match kind {
            K::Begin => LogicalMessage::Begin {
                final_lsn: r.lsn("final LSN")?,
                commit_time_micros: r.i64("commit timestamp")?,
                xid: r.u32("xid")?,
            },
            K::Commit => LogicalMessage::Commit {
                flags: r.u8("flags")?,
                commit_lsn: r.lsn("commit LSN")?,
                end_lsn: r.lsn("end LSN")?,
                commit_time_micros: r.i64("commit timestamp")?,
            },
            K::Origin => LogicalMessage::Origin {
                commit_lsn: r.lsn("origin commit LSN")?,
                name: r.cstr("origin name")?,
            },
            K::Relation => LogicalMessage::Relation(self.relation(r)?),
            K::Type => LogicalMessage::Type {
                xid: self.stream_xid(r)?,
                type_oid: r.u32("type OID")?,
                namespace: r.cstr("type namespace")?,
                name: r.cstr("type name")?,
            },
            K::Insert => {
                let xid = self.stream_xid(r)?;
                let rel_id = r.u32("relation id")?;
                let offset = r.pos;
                match r.u8("tuple kind")? {
                    b'N' => {}
                    tag => return Err(r.unknown_tuple_kind(offset, tag, "'N'")),
                }
                LogicalMessage::Insert {
                    xid,
                    rel_id,
                    new: r.tuple()?,
                }
            }
            K::Update => {
                let xid = self.stream_xid(r)?;
                let rel_id = r.u32("relation id")?;
                let offset = r.pos;
                let (old, new_offset, new_tag) = match r.u8("tuple kind")? {
                    b'K' => (Some(OldTuple::Key(r.tuple()?)), r.pos, r.u8("tuple kind")?),
                    b'O' => (Some(OldTuple::Full(r.tuple()?)), r.pos, r.u8("tuple kind")?),
                    tag => (None, offset, tag),
                };
                if new_tag != b'N' {
                    let expected = if old.is_some() {
                        "'N'"
                    } else {
                        "'K', 'O' or 'N'"
                    };
                    return Err(r.unknown_tuple_kind(new_offset, new_tag, expected));
                }
                LogicalMessage::Update {
                    xid,
                    rel_id,
                    old,
                    new: r.tuple()?,
                }
            }
            K::Delete => {
                let xid = self.stream_xid(r)?;
                let rel_id = r.u32("relation id")?;
                let offset = r.pos;
                let old = match r.u8("tuple kind")? {
                    b'K' => OldTuple::Key(r.tuple()?),
                    b'O' => OldTuple::Full(r.tuple()?),
                    tag => return Err(r.unknown_tuple_kind(offset, tag, "'K' or 'O'")),
                };
                LogicalMessage::Delete { xid, rel_id, old }
            }
            K::Truncate => {
                let xid = self.stream_xid(r)?;
                let count_offset = r.pos;
                let count = r.u32("relation count")?;
                let options = r.u8("truncate options")?;
                let count = r.bounded_count(u64::from(count), 4, "relation count", count_offset)?;
                let mut rel_ids = Vec::with_capacity(count);
                for _ in 0..count {
                    rel_ids.push(r.u32("truncated relation id")?);
                }
                LogicalMessage::Truncate {
                    xid,
                    options,
                    rel_ids,
                }
            }
            K::Message => LogicalMessage::Message {
                xid: self.stream_xid(r)?,
                transactional: r.u8("flags")? & 1 != 0,
                lsn: r.lsn("message LSN")?,
                prefix: r.cstr("message prefix")?,
                content: r.sized_bytes("message content")?,
            },
            K::StreamStart => LogicalMessage::StreamStart {
                xid: r.u32("xid")?,
                first_segment: r.u8("first segment flag")? != 0,
            },
            K::StreamStop => LogicalMessage::StreamStop,
            K::StreamCommit => LogicalMessage::StreamCommit {
                xid: r.u32("xid")?,
                flags: r.u8("flags")?,
                commit_lsn: r.lsn("commit LSN")?,
                end_lsn: r.lsn("end LSN")?,
                commit_time_micros: r.i64("commit timestamp")?,
            },
            K::StreamAbort => {
                let xid = r.u32("xid")?;
                let subxid = r.u32("subtransaction xid")?;
                // Version 4 adds these two fields only when streaming = parallel; the message
                // length is the only way to tell.
                let (abort_lsn, abort_time_micros) =
                    if self.protocol_version >= 4 && r.remaining() > 0 {
                        (Some(r.lsn("abort LSN")?), Some(r.i64("abort timestamp")?))
                    } else {
                        (None, None)
                    };
                LogicalMessage::StreamAbort {
                    xid,
                    subxid,
                    abort_lsn,
                    abort_time_micros,
                }
            }
            K::BeginPrepare => LogicalMessage::BeginPrepare {
                prepare_lsn: r.lsn("prepare LSN")?,
                end_lsn: r.lsn("end LSN")?,
                prepare_time_micros: r.i64("prepare timestamp")?,
                xid: r.u32("xid")?,
                gid: r.cstr("gid")?,
            },
            K::Prepare | K::StreamPrepare => {
                let flags = r.u8("flags")?;
                let prepare_lsn = r.lsn("prepare LSN")?;
                let end_lsn = r.lsn("end LSN")?;
                let prepare_time_micros = r.i64("prepare timestamp")?;
                let xid = r.u32("xid")?;
                let gid = r.cstr("gid")?;
                if kind == K::Prepare {
                    LogicalMessage::Prepare {
                        flags,
                        prepare_lsn,
                        end_lsn,
                        prepare_time_micros,
                        xid,
                        gid,
                    }
                } else {
                    LogicalMessage::StreamPrepare {
                        flags,
                        prepare_lsn,
                        end_lsn,
                        prepare_time_micros,
                        xid,
                        gid,
                    }
                }
            }
            K::CommitPrepared => LogicalMessage::CommitPrepared {
                flags: r.u8("flags")?,
                commit_lsn: r.lsn("commit LSN")?,
                end_lsn: r.lsn("end LSN")?,
                commit_time_micros: r.i64("commit timestamp")?,
                xid: r.u32("xid")?,
                gid: r.cstr("gid")?,
            },
            K::RollbackPrepared => LogicalMessage::RollbackPrepared {
                flags: r.u8("flags")?,
                prepare_end_lsn: r.lsn("prepare end LSN")?,
                rollback_end_lsn: r.lsn("rollback end LSN")?,
                prepare_time_micros: r.i64("prepare timestamp")?,
                rollback_time_micros: r.i64("rollback timestamp")?,
                xid: r.u32("xid")?,
                gid: r.cstr("gid")?,
            },
        })
    }

    fn relation(&self, r: &mut Reader<'_>) -> Result<RelationBody, DecodeError> {
        let xid = self.stream_xid(r)?;
        let rel_id = r.u32("relation id")?;
        let namespace = r.cstr("namespace")?;
        let name = r.cstr("relation name")?;
        let identity_offset = r.pos;
        let identity = r.u8("replica identity")?;
        let replica_identity =
            ReplicaIdentity::from_byte(identity).ok_or(DecodeError::UnknownReplicaIdentity {
                kind: r.kind,
                offset: identity_offset,
                value: identity,
            })?;
        let count_offset = r.pos;
        let count = r.u16("column count")?;
        // flags (1) + name (at least the NUL, 1) + type OID (4) + type modifier (4)
        let count = r.bounded_count(u64::from(count), 10, "column count", count_offset)?;
        let mut columns = Vec::with_capacity(count);
        for _ in 0..count {
            columns.push(RelationColumn {
                is_key: r.u8("column flags")? & 1 != 0,
                name: r.cstr("column name")?,
                type_oid: r.u32("column type OID")?,
                type_modifier: r.i32("column type modifier")?,
            });
        }
        Ok(RelationBody {
            xid,
            rel_id,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }
}

/// A bounds-checked cursor over one message.
struct Reader<'a> {
    buf: &'a Bytes,
    /// Invariant: `pos <= buf.len()`.
    pos: usize,
    kind: MessageKind,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let buf: &'a Bytes = self.buf;
        let slice = self
            .pos
            .checked_add(n)
            .and_then(|end| buf.get(self.pos..end))
            .ok_or(DecodeError::Truncated {
                kind: self.kind,
                offset: self.pos,
                field,
                needed: n,
                available: self.remaining(),
            })?;
        self.pos += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let offset = self.pos;
        let slice = self.take(N, field)?;
        <[u8; N]>::try_from(slice).map_err(|_| DecodeError::Truncated {
            kind: self.kind,
            offset,
            field,
            needed: N,
            available: slice.len(),
        })
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(field).map(|[b]| b)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.array(field).map(u16::from_be_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        self.array(field).map(i32::from_be_bytes)
    }

    fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        self.array(field).map(i64::from_be_bytes)
    }

    fn lsn(&mut self, field: &'static str) -> Result<Lsn, DecodeError> {
        self.array(field).map(|b| Lsn(u64::from_be_bytes(b)))
    }

    /// A NUL-terminated UTF-8 string.
    fn cstr(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let offset = self.pos;
        let buf: &'a Bytes = self.buf;
        let rest = buf.get(offset..).unwrap_or_default();
        let raw = rest
            .iter()
            .position(|&b| b == 0)
            .and_then(|nul| rest.get(..nul))
            .ok_or(DecodeError::UnterminatedString {
                kind: self.kind,
                offset,
                field,
            })?;
        let text = std::str::from_utf8(raw).map_err(|source| DecodeError::InvalidUtf8 {
            kind: self.kind,
            offset,
            field,
            source,
        })?;
        self.pos = offset + raw.len() + 1;
        Ok(text.to_owned())
    }

    /// An `Int32` length followed by that many bytes, as a zero-copy slice.
    fn sized_bytes(&mut self, field: &'static str) -> Result<Bytes, DecodeError> {
        let offset = self.pos;
        let length = self.i32(field)?;
        let n = usize::try_from(length).map_err(|_| DecodeError::NegativeLength {
            kind: self.kind,
            offset,
            field,
            length,
        })?;
        let start = self.pos;
        self.take(n, field)?;
        Ok(self.buf.slice(start..start + n))
    }

    /// Checks that `count` entries of at least `min_entry_size` bytes fit in what remains, so
    /// the caller may allocate `count` entries.
    fn bounded_count(
        &self,
        count: u64,
        min_entry_size: usize,
        field: &'static str,
        offset: usize,
    ) -> Result<usize, DecodeError> {
        let available = self.remaining();
        let max = available / min_entry_size.max(1);
        match usize::try_from(count) {
            Ok(n) if n <= max => Ok(n),
            _ => Err(DecodeError::CountMismatch {
                kind: self.kind,
                offset,
                field,
                count,
                min_entry_size,
                available,
            }),
        }
    }

    fn tuple(&mut self) -> Result<TupleData, DecodeError> {
        let count_offset = self.pos;
        let count = self.u16("tuple column count")?;
        let count = self.bounded_count(u64::from(count), 1, "tuple column count", count_offset)?;
        let mut cells = Vec::with_capacity(count);
        for _ in 0..count {
            let offset = self.pos;
            cells.push(match self.u8("column value kind")? {
                b'n' => Cell::Null,
                b'u' => Cell::UnchangedToast,
                b't' => Cell::Text(self.sized_bytes("text column value")?),
                b'b' => Cell::Binary(self.sized_bytes("binary column value")?),
                tag => {
                    return Err(DecodeError::UnknownCellKind {
                        kind: self.kind,
                        offset,
                        tag,
                    });
                }
            });
        }
        Ok(TupleData { cells })
    }

    fn unknown_tuple_kind(&self, offset: usize, tag: u8, expected: &'static str) -> DecodeError {
        DecodeError::UnknownTupleKind {
            kind: self.kind,
            offset,
            tag,
            expected,
        }
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes {
                kind: self.kind,
                offset: self.pos,
                count,
            }),
        }
    }
}
