//! The decoded pgoutput message types.

use std::fmt;

use bytes::Bytes;

use crate::Lsn;

/// One decoded pgoutput message.
///
/// `xid: Option<u32>` fields are `Some` only inside a streamed block (protocol 2+), where they
/// name the streamed (sub)transaction the message belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogicalMessage {
    /// `B`: a transaction starts; its changes follow, then its `Commit`.
    Begin {
        /// LSN of the transaction's commit record.
        final_lsn: Lsn,
        /// Commit time, microseconds since 2000-01-01 UTC.
        commit_time_micros: i64,
        /// Transaction id.
        xid: u32,
    },
    /// `C`: the transaction opened by the last `Begin` committed.
    Commit {
        /// Flags; currently unused (0).
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// End LSN of the transaction: the position to acknowledge once it is durable.
        end_lsn: Lsn,
        /// Commit time, microseconds since 2000-01-01 UTC.
        commit_time_micros: i64,
    },
    /// `O`: the transaction (or streamed block) was replicated from another origin.
    Origin {
        /// Commit LSN on the origin server (0/0 inside a streamed block).
        commit_lsn: Lsn,
        /// Origin name.
        name: String,
    },
    /// `R`: the shape of a relation, sent before its first change and after schema changes.
    Relation(RelationBody),
    /// `Y`: a data type's name, sent before the first relation column that uses it (only
    /// for non-built-in types).
    Type {
        /// Streamed transaction xid, inside a streamed block.
        xid: Option<u32>,
        /// Type OID.
        type_oid: u32,
        /// Namespace (empty for `pg_catalog`).
        namespace: String,
        /// Type name.
        name: String,
    },
    /// `I`: a row was inserted.
    Insert {
        /// Streamed transaction xid, inside a streamed block.
        xid: Option<u32>,
        /// Relation, as announced by the last `Relation` message with this id.
        rel_id: u32,
        /// The new row.
        new: TupleData,
    },
    /// `U`: a row was updated.
    Update {
        /// Streamed transaction xid, inside a streamed block.
        xid: Option<u32>,
        /// Relation, as announced by the last `Relation` message with this id.
        rel_id: u32,
        /// The old key (if the key changed) or old row (`REPLICA IDENTITY FULL`); `None` when
        /// the replica identity did not change.
        old: Option<OldTuple>,
        /// The new row; unchanged TOASTed values are [`Cell::UnchangedToast`].
        new: TupleData,
    },
    /// `D`: a row was deleted.
    Delete {
        /// Streamed transaction xid, inside a streamed block.
        xid: Option<u32>,
        /// Relation, as announced by the last `Relation` message with this id.
        rel_id: u32,
        /// The deleted row's key, or the whole row under `REPLICA IDENTITY FULL`.
        old: OldTuple,
    },
    /// `T`: relations were truncated.
    Truncate {
        /// Streamed transaction xid, inside a streamed block.
        xid: Option<u32>,
        /// Bit set: [`TRUNCATE_CASCADE`], [`TRUNCATE_RESTART_IDENTITY`].
        options: u8,
        /// The truncated relations.
        rel_ids: Vec<u32>,
    },
    /// `M`: a message written by `pg_logical_emit_message` (option `messages`).
    Message {
        /// Streamed transaction xid, inside a streamed block.
        xid: Option<u32>,
        /// Whether the message belongs to the surrounding transaction.
        transactional: bool,
        /// LSN of the message.
        lsn: Lsn,
        /// The message's prefix.
        prefix: String,
        /// The message's content, a zero-copy slice of the input.
        content: Bytes,
    },
    /// `S`: a block of a streamed in-progress transaction starts (protocol 2+).
    StreamStart {
        /// The streamed transaction's xid.
        xid: u32,
        /// Whether this is the transaction's first block.
        first_segment: bool,
    },
    /// `E`: the current streamed block ends (protocol 2+).
    StreamStop,
    /// `c`: a streamed transaction committed (protocol 2+).
    StreamCommit {
        /// The streamed transaction's xid.
        xid: u32,
        /// Flags; currently unused (0).
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// End LSN of the transaction.
        end_lsn: Lsn,
        /// Commit time, microseconds since 2000-01-01 UTC.
        commit_time_micros: i64,
    },
    /// `A`: a streamed transaction or one of its subtransactions aborted (protocol 2+).
    StreamAbort {
        /// The streamed (top-level) transaction's xid.
        xid: u32,
        /// The aborted subtransaction's xid (equal to `xid` when the whole transaction aborted).
        subxid: u32,
        /// LSN of the abort (protocol 4 with `streaming = parallel` only).
        abort_lsn: Option<Lsn>,
        /// Abort time, microseconds since 2000-01-01 UTC (protocol 4, parallel streaming only).
        abort_time_micros: Option<i64>,
    },
    /// `b`: a transaction prepared for two-phase commit starts (protocol 3+).
    BeginPrepare {
        /// LSN of the prepare record.
        prepare_lsn: Lsn,
        /// End LSN of the prepared transaction.
        end_lsn: Lsn,
        /// Prepare time, microseconds since 2000-01-01 UTC.
        prepare_time_micros: i64,
        /// Transaction id.
        xid: u32,
        /// Global identifier of the prepared transaction.
        gid: String,
    },
    /// `P`: the transaction opened by `BeginPrepare` was prepared (protocol 3+).
    Prepare {
        /// Flags; currently unused (0).
        flags: u8,
        /// LSN of the prepare record.
        prepare_lsn: Lsn,
        /// End LSN of the prepared transaction.
        end_lsn: Lsn,
        /// Prepare time, microseconds since 2000-01-01 UTC.
        prepare_time_micros: i64,
        /// Transaction id.
        xid: u32,
        /// Global identifier of the prepared transaction.
        gid: String,
    },
    /// `K`: a prepared transaction committed (protocol 3+).
    CommitPrepared {
        /// Flags; currently unused (0).
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// End LSN of the commit.
        end_lsn: Lsn,
        /// Commit time, microseconds since 2000-01-01 UTC.
        commit_time_micros: i64,
        /// Transaction id.
        xid: u32,
        /// Global identifier of the prepared transaction.
        gid: String,
    },
    /// `r`: a prepared transaction was rolled back (protocol 3+).
    RollbackPrepared {
        /// Flags; currently unused (0).
        flags: u8,
        /// End LSN of the prepared transaction.
        prepare_end_lsn: Lsn,
        /// End LSN of the rollback.
        rollback_end_lsn: Lsn,
        /// Prepare time, microseconds since 2000-01-01 UTC.
        prepare_time_micros: i64,
        /// Rollback time, microseconds since 2000-01-01 UTC.
        rollback_time_micros: i64,
        /// Transaction id.
        xid: u32,
        /// Global identifier of the prepared transaction.
        gid: String,
    },
    /// `p`: a streamed transaction was prepared (protocol 3+).
    StreamPrepare {
        /// Flags; currently unused (0).
        flags: u8,
        /// LSN of the prepare record.
        prepare_lsn: Lsn,
        /// End LSN of the prepared transaction.
        end_lsn: Lsn,
        /// Prepare time, microseconds since 2000-01-01 UTC.
        prepare_time_micros: i64,
        /// Transaction id.
        xid: u32,
        /// Global identifier of the prepared transaction.
        gid: String,
    },
}

/// [`LogicalMessage::Truncate`] option bit: `TRUNCATE … CASCADE`.
pub const TRUNCATE_CASCADE: u8 = 1;
/// [`LogicalMessage::Truncate`] option bit: `TRUNCATE … RESTART IDENTITY`.
pub const TRUNCATE_RESTART_IDENTITY: u8 = 2;

impl LogicalMessage {
    /// Which kind of message this is.
    pub fn kind(&self) -> MessageKind {
        use MessageKind as K;
        match self {
            Self::Begin { .. } => K::Begin,
            Self::Commit { .. } => K::Commit,
            Self::Origin { .. } => K::Origin,
            Self::Relation(_) => K::Relation,
            Self::Type { .. } => K::Type,
            Self::Insert { .. } => K::Insert,
            Self::Update { .. } => K::Update,
            Self::Delete { .. } => K::Delete,
            Self::Truncate { .. } => K::Truncate,
            Self::Message { .. } => K::Message,
            Self::StreamStart { .. } => K::StreamStart,
            Self::StreamStop => K::StreamStop,
            Self::StreamCommit { .. } => K::StreamCommit,
            Self::StreamAbort { .. } => K::StreamAbort,
            Self::BeginPrepare { .. } => K::BeginPrepare,
            Self::Prepare { .. } => K::Prepare,
            Self::CommitPrepared { .. } => K::CommitPrepared,
            Self::RollbackPrepared { .. } => K::RollbackPrepared,
            Self::StreamPrepare { .. } => K::StreamPrepare,
        }
    }
}

/// The body of a `Relation` message: the shape of a table as the publisher sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationBody {
    /// Streamed transaction xid, when announced inside a streamed block.
    pub xid: Option<u32>,
    /// The relation's OID; the key every change message refers to.
    pub rel_id: u32,
    /// Schema name (empty for `pg_catalog`).
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// What old-row data `Update` and `Delete` carry.
    pub replica_identity: ReplicaIdentity,
    /// Published columns, in tuple order.
    pub columns: Vec<RelationColumn>,
}

/// One column of a [`RelationBody`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Whether the column is part of the replica identity key.
    pub is_key: bool,
    /// Column name.
    pub name: String,
    /// OID of the column's data type.
    pub type_oid: u32,
    /// The type modifier (`atttypmod`), -1 when there is none.
    pub type_modifier: i32,
}

/// `REPLICA IDENTITY` of a relation: which old values `Update` and `Delete` carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// `d`: the primary key, if any.
    Default,
    /// `n`: nothing.
    Nothing,
    /// `f`: all columns.
    Full,
    /// `i`: the columns of a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    /// Parses the wire byte (`d`, `n`, `f`, `i`).
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            b'd' => Some(Self::Default),
            b'n' => Some(Self::Nothing),
            b'f' => Some(Self::Full),
            b'i' => Some(Self::Index),
            _ => None,
        }
    }

    /// The wire byte.
    pub fn as_byte(self) -> u8 {
        match self {
            Self::Default => b'd',
            Self::Nothing => b'n',
            Self::Full => b'f',
            Self::Index => b'i',
        }
    }
}

/// The old row data of an `Update` or `Delete`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: only the replica identity key columns are set; the others are [`Cell::Null`].
    Key(TupleData),
    /// `O`: the whole old row (`REPLICA IDENTITY FULL`).
    Full(TupleData),
}

impl OldTuple {
    /// The tuple, whichever kind it is.
    pub fn tuple(&self) -> &TupleData {
        match self {
            Self::Key(t) | Self::Full(t) => t,
        }
    }
}

/// A row: one cell per column of the relation, in the order of its `Relation` message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TupleData {
    /// The cells, positionally matching [`RelationBody::columns`].
    pub cells: Vec<Cell>,
}

/// One column value of a [`TupleData`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    /// `n`: SQL NULL.
    Null,
    /// `u`: a TOASTed value that did not change; its value is not sent.
    UnchangedToast,
    /// `t`: the value in the type's text output form (zero-copy slice of the input).
    Text(Bytes),
    /// `b`: the value in the type's binary send form (`binary = true` only).
    Binary(Bytes),
}

/// The kinds of pgoutput messages, named after their section in the PostgreSQL docs; the
/// discriminant is the tag byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageKind {
    /// `B`
    Begin = b'B',
    /// `C`
    Commit = b'C',
    /// `O`
    Origin = b'O',
    /// `R`
    Relation = b'R',
    /// `Y`
    Type = b'Y',
    /// `I`
    Insert = b'I',
    /// `U`
    Update = b'U',
    /// `D`
    Delete = b'D',
    /// `T`
    Truncate = b'T',
    /// `M`
    Message = b'M',
    /// `S`
    StreamStart = b'S',
    /// `E`
    StreamStop = b'E',
    /// `c`
    StreamCommit = b'c',
    /// `A`
    StreamAbort = b'A',
    /// `b`
    BeginPrepare = b'b',
    /// `P`
    Prepare = b'P',
    /// `K`
    CommitPrepared = b'K',
    /// `r`
    RollbackPrepared = b'r',
    /// `p`
    StreamPrepare = b'p',
}

impl MessageKind {
    /// The kind a tag byte announces, if any.
    pub fn from_tag(tag: u8) -> Option<Self> {
        use MessageKind as K;
        Some(match tag {
            b'B' => K::Begin,
            b'C' => K::Commit,
            b'O' => K::Origin,
            b'R' => K::Relation,
            b'Y' => K::Type,
            b'I' => K::Insert,
            b'U' => K::Update,
            b'D' => K::Delete,
            b'T' => K::Truncate,
            b'M' => K::Message,
            b'S' => K::StreamStart,
            b'E' => K::StreamStop,
            b'c' => K::StreamCommit,
            b'A' => K::StreamAbort,
            b'b' => K::BeginPrepare,
            b'P' => K::Prepare,
            b'K' => K::CommitPrepared,
            b'r' => K::RollbackPrepared,
            b'p' => K::StreamPrepare,
            _ => return None,
        })
    }

    /// The tag byte that starts messages of this kind.
    pub fn tag(self) -> u8 {
        self as u8
    }

    /// The lowest protocol version that can carry this kind.
    pub fn min_protocol_version(self) -> u32 {
        use MessageKind as K;
        match self {
            K::StreamStart | K::StreamStop | K::StreamCommit | K::StreamAbort => 2,
            K::BeginPrepare
            | K::Prepare
            | K::CommitPrepared
            | K::RollbackPrepared
            | K::StreamPrepare => 3,
            _ => 1,
        }
    }

    /// The name used in the PostgreSQL docs, e.g. `"Stream Commit"`.
    pub fn name(self) -> &'static str {
        use MessageKind as K;
        match self {
            K::Begin => "Begin",
            K::Commit => "Commit",
            K::Origin => "Origin",
            K::Relation => "Relation",
            K::Type => "Type",
            K::Insert => "Insert",
            K::Update => "Update",
            K::Delete => "Delete",
            K::Truncate => "Truncate",
            K::Message => "Message",
            K::StreamStart => "Stream Start",
            K::StreamStop => "Stream Stop",
            K::StreamCommit => "Stream Commit",
            K::StreamAbort => "Stream Abort",
            K::BeginPrepare => "Begin Prepare",
            K::Prepare => "Prepare",
            K::CommitPrepared => "Commit Prepared",
            K::RollbackPrepared => "Rollback Prepared",
            K::StreamPrepare => "Stream Prepare",
        }
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
