use super::*;

/// A hand-built message: `Msg::new(b'B').u64(..).i64(..).u32(..).bytes()`.
struct Msg(Vec<u8>);

impl Msg {
    fn new(tag: u8) -> Self {
        Self(vec![tag])
    }
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u16(mut self, v: u16) -> Self {
        self.0.extend(v.to_be_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend(v.to_be_bytes());
        self
    }
    fn i32(mut self, v: i32) -> Self {
        self.0.extend(v.to_be_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend(v.to_be_bytes());
        self
    }
    fn i64(mut self, v: i64) -> Self {
        self.0.extend(v.to_be_bytes());
        self
    }
    fn raw(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }
    fn cstr(self, v: &str) -> Self {
        self.raw(v.as_bytes()).u8(0)
    }
    fn text(self, v: &[u8]) -> Self {
        self.u8(b't').i32(v.len() as i32).raw(v)
    }
    fn bytes(self) -> Bytes {
        Bytes::from(self.0)
    }
}

fn decode(version: u32, msg: Msg) -> Result<LogicalMessage, DecodeError> {
    PgoutputDecoder::new(version).decode(&msg.bytes())
}

fn streaming(version: u32) -> PgoutputDecoder {
    let mut d = PgoutputDecoder::new(version);
    let start = Msg::new(b'S').u32(900).u8(1).bytes();
    assert_eq!(
        d.decode(&start),
        Ok(LogicalMessage::StreamStart {
            xid: 900,
            first_segment: true
        })
    );
    d
}

fn text(v: &'static [u8]) -> Cell {
    Cell::Text(Bytes::from_static(v))
}

/// One tuple: ('42', NULL, unchanged TOAST, binary 0x0102).
fn tuple4(m: Msg) -> Msg {
    m.u16(4)
        .text(b"42")
        .u8(b'n')
        .u8(b'u')
        .u8(b'b')
        .i32(2)
        .raw(&[1, 2])
}

fn tuple4_decoded() -> TupleData {
    TupleData {
        cells: vec![
            text(b"42"),
            Cell::Null,
            Cell::UnchangedToast,
            Cell::Binary(Bytes::from_static(&[1, 2])),
        ],
    }
}

fn relation_msg(m: Msg) -> Msg {
    m.u32(16384)
        .cstr("public")
        .cstr("users")
        .u8(b'f')
        .u16(2)
        .u8(1)
        .cstr("id")
        .u32(23)
        .i32(-1)
        .u8(0)
        .cstr("naïve")
        .u32(1043)
        .i32(68)
}

fn relation_decoded(xid: Option<u32>) -> LogicalMessage {
    LogicalMessage::Relation(RelationBody {
        xid,
        rel_id: 16384,
        namespace: "public".into(),
        name: "users".into(),
        replica_identity: ReplicaIdentity::Full,
        columns: vec![
            RelationColumn {
                is_key: true,
                name: "id".into(),
                type_oid: 23,
                type_modifier: -1,
            },
            RelationColumn {
                is_key: false,
                name: "naïve".into(),
                type_oid: 1043,
                type_modifier: 68,
            },
        ],
    })
}

#[test]
fn begin_decodes_final_lsn_commit_time_and_xid() {
    let m = Msg::new(b'B').u64(0x1_6B6C50).i64(-5).u32(777);
    let msg = decode(1, m).unwrap();
    assert_eq!(
        msg,
        LogicalMessage::Begin {
            final_lsn: Lsn(0x1_6B6C50),
            commit_time_micros: -5,
            xid: 777
        }
    );
    assert_eq!(msg.kind(), MessageKind::Begin);
}

#[test]
fn commit_decodes_flags_lsns_and_time() {
    let m = Msg::new(b'C').u8(0).u64(10).u64(20).i64(30);
    assert_eq!(
        decode(1, m),
        Ok(LogicalMessage::Commit {
            flags: 0,
            commit_lsn: Lsn(10),
            end_lsn: Lsn(20),
            commit_time_micros: 30
        })
    );
}

#[test]
fn origin_decodes_lsn_and_name() {
    let m = Msg::new(b'O').u64(99).cstr("node_a");
    assert_eq!(
        decode(1, m),
        Ok(LogicalMessage::Origin {
            commit_lsn: Lsn(99),
            name: "node_a".into()
        })
    );
}

#[test]
fn relation_decodes_columns_keys_types_and_replica_identity() {
    assert_eq!(
        decode(1, relation_msg(Msg::new(b'R'))),
        Ok(relation_decoded(None))
    );
}

#[test]
fn type_decodes_oid_namespace_and_name() {
    let m = Msg::new(b'Y').u32(50000).cstr("public").cstr("mood");
    assert_eq!(
        decode(1, m),
        Ok(LogicalMessage::Type {
            xid: None,
            type_oid: 50000,
            namespace: "public".into(),
            name: "mood".into()
        })
    );
}

#[test]
fn insert_decodes_every_cell_kind_zero_copy() {
    let input = tuple4(Msg::new(b'I').u32(16384).u8(b'N')).bytes();
    let msg = PgoutputDecoder::new(1).decode(&input).unwrap();
    let LogicalMessage::Insert { xid, rel_id, new } = &msg else {
        panic!("not an insert: {msg:?}");
    };
    assert_eq!((*xid, *rel_id), (None, 16384));
    assert_eq!(new, &tuple4_decoded());
    // The text cell points into the input buffer.
    let Some(Cell::Text(cell)) = new.cells.first() else {
        panic!("first cell is not text");
    };
    let range = input.as_ptr_range();
    assert!(range.contains(&cell.as_ptr()));
}

#[test]
fn update_decodes_without_old_with_key_and_with_full_old_row() {
    let plain = tuple4(Msg::new(b'U').u32(7).u8(b'N'));
    assert_eq!(
        decode(1, plain),
        Ok(LogicalMessage::Update {
            xid: None,
            rel_id: 7,
            old: None,
            new: tuple4_decoded()
        })
    );
    let key = tuple4(Msg::new(b'U').u32(7).u8(b'K').u16(1).text(b"1").u8(b'N'));
    let old_key = TupleData {
        cells: vec![text(b"1")],
    };
    assert_eq!(
        decode(1, key),
        Ok(LogicalMessage::Update {
            xid: None,
            rel_id: 7,
            old: Some(OldTuple::Key(old_key.clone())),
            new: tuple4_decoded()
        })
    );
    let full = tuple4(Msg::new(b'U').u32(7).u8(b'O').u16(1).text(b"1").u8(b'N'));
    let msg = decode(1, full).unwrap();
    let LogicalMessage::Update { old: Some(old), .. } = &msg else {
        panic!("no old tuple: {msg:?}");
    };
    assert_eq!(old, &OldTuple::Full(old_key.clone()));
    assert_eq!(old.tuple(), &old_key);
}

#[test]
fn delete_decodes_key_and_full_old_rows() {
    let key = Msg::new(b'D').u32(7).u8(b'K').u16(2).text(b"1").u8(b'n');
    let expected = TupleData {
        cells: vec![text(b"1"), Cell::Null],
    };
    assert_eq!(
        decode(1, key),
        Ok(LogicalMessage::Delete {
            xid: None,
            rel_id: 7,
            old: OldTuple::Key(expected.clone())
        })
    );
    let full = Msg::new(b'D').u32(7).u8(b'O').u16(2).text(b"1").u8(b'n');
    assert_eq!(
        decode(1, full),
        Ok(LogicalMessage::Delete {
            xid: None,
            rel_id: 7,
            old: OldTuple::Full(expected)
        })
    );
}

#[test]
fn truncate_decodes_options_and_relation_ids() {
    let m = Msg::new(b'T')
        .u32(2)
        .u8(TRUNCATE_CASCADE | TRUNCATE_RESTART_IDENTITY)
        .u32(5)
        .u32(6);
    assert_eq!(
        decode(1, m),
        Ok(LogicalMessage::Truncate {
            xid: None,
            options: 3,
            rel_ids: vec![5, 6]
        })
    );
}

#[test]
fn message_decodes_flags_lsn_prefix_and_binary_content() {
    let m = Msg::new(b'M')
        .u8(1)
        .u64(44)
        .cstr("app")
        .i32(3)
        .raw(&[0, 0xff, 7]);
    assert_eq!(
        decode(1, m),
        Ok(LogicalMessage::Message {
            xid: None,
            transactional: true,
            lsn: Lsn(44),
            prefix: "app".into(),
            content: Bytes::from_static(&[0, 0xff, 7])
        })
    );
    let m = Msg::new(b'M').u8(0).u64(44).cstr("").i32(0);
    assert!(matches!(
        decode(1, m),
        Ok(LogicalMessage::Message {
            transactional: false,
            ..
        })
    ));
}

#[test]
fn changes_inside_a_streamed_block_carry_the_xid() {
    let mut d = streaming(2);
    assert!(d.in_stream());
    let rel = d.decode(&relation_msg(Msg::new(b'R').u32(901)).bytes());
    assert_eq!(rel, Ok(relation_decoded(Some(901))));
    let ins = tuple4(Msg::new(b'I').u32(901).u32(16384).u8(b'N')).bytes();
    assert_eq!(
        d.decode(&ins),
        Ok(LogicalMessage::Insert {
            xid: Some(901),
            rel_id: 16384,
            new: tuple4_decoded()
        })
    );
    let upd = tuple4(Msg::new(b'U').u32(901).u32(16384).u8(b'N')).bytes();
    assert!(matches!(
        d.decode(&upd),
        Ok(LogicalMessage::Update { xid: Some(901), .. })
    ));
    let del = Msg::new(b'D').u32(901).u32(16384).u8(b'K').u16(0).bytes();
    assert!(matches!(
        d.decode(&del),
        Ok(LogicalMessage::Delete { xid: Some(901), .. })
    ));
    let typ = Msg::new(b'Y').u32(901).u32(1).cstr("s").cstr("t").bytes();
    assert!(matches!(
        d.decode(&typ),
        Ok(LogicalMessage::Type { xid: Some(901), .. })
    ));
    let tru = Msg::new(b'T').u32(901).u32(1).u8(0).u32(16384).bytes();
    assert_eq!(
        d.decode(&tru),
        Ok(LogicalMessage::Truncate {
            xid: Some(901),
            options: 0,
            rel_ids: vec![16384]
        })
    );
    let msg = Msg::new(b'M')
        .u32(901)
        .u8(1)
        .u64(1)
        .cstr("p")
        .i32(0)
        .bytes();
    assert!(matches!(
        d.decode(&msg),
        Ok(LogicalMessage::Message { xid: Some(901), .. })
    ));
    // An Origin message may follow Stream Start; it never carries an xid.
    let origin = Msg::new(b'O').u64(0).cstr("o").bytes();
    assert!(matches!(
        d.decode(&origin),
        Ok(LogicalMessage::Origin { .. })
    ));

    assert_eq!(
        d.decode(&Msg::new(b'E').bytes()),
        Ok(LogicalMessage::StreamStop)
    );
    assert!(!d.in_stream());
    // Outside the block the same insert bytes no longer parse: the xid is gone.
    assert!(d.decode(&ins).is_err());
    let plain = tuple4(Msg::new(b'I').u32(16384).u8(b'N')).bytes();
    assert!(matches!(
        d.decode(&plain),
        Ok(LogicalMessage::Insert { xid: None, .. })
    ));
}

#[test]
fn stream_start_marks_later_segments() {
    let m = Msg::new(b'S').u32(5).u8(0);
    assert_eq!(
        decode(2, m),
        Ok(LogicalMessage::StreamStart {
            xid: 5,
            first_segment: false
        })
    );
}

#[test]
fn stream_commit_decodes_xid_flags_lsns_and_time() {
    let m = Msg::new(b'c').u32(900).u8(0).u64(1).u64(2).i64(3);
    assert_eq!(
        decode(2, m),
        Ok(LogicalMessage::StreamCommit {
            xid: 900,
            flags: 0,
            commit_lsn: Lsn(1),
            end_lsn: Lsn(2),
            commit_time_micros: 3
        })
    );
}

#[test]
fn stream_abort_has_lsn_and_time_only_with_v4_parallel_streaming() {
    let short = || Msg::new(b'A').u32(900).u32(901);
    let plain = LogicalMessage::StreamAbort {
        xid: 900,
        subxid: 901,
        abort_lsn: None,
        abort_time_micros: None,
    };
    assert_eq!(decode(2, short()), Ok(plain.clone()));
    assert_eq!(decode(4, short()), Ok(plain));
    assert_eq!(
        decode(4, short().u64(70).i64(80)),
        Ok(LogicalMessage::StreamAbort {
            xid: 900,
            subxid: 901,
            abort_lsn: Some(Lsn(70)),
            abort_time_micros: Some(80)
        })
    );
    assert!(matches!(
        decode(3, short().u64(70).i64(80)),
        Err(DecodeError::TrailingBytes {
            offset: 9,
            count: 16,
            ..
        })
    ));
    assert!(matches!(
        decode(4, short().u64(70)),
        Err(DecodeError::Truncated { offset: 17, .. })
    ));
}

#[test]
fn two_phase_messages_decode_with_protocol_3() {
    let m = Msg::new(b'b').u64(1).u64(2).i64(3).u32(4).cstr("gid-1");
    assert_eq!(
        decode(3, m),
        Ok(LogicalMessage::BeginPrepare {
            prepare_lsn: Lsn(1),
            end_lsn: Lsn(2),
            prepare_time_micros: 3,
            xid: 4,
            gid: "gid-1".into()
        })
    );
    let body = |tag| Msg::new(tag).u8(0).u64(1).u64(2).i64(3).u32(4).cstr("g");
    assert_eq!(
        decode(3, body(b'P')),
        Ok(LogicalMessage::Prepare {
            flags: 0,
            prepare_lsn: Lsn(1),
            end_lsn: Lsn(2),
            prepare_time_micros: 3,
            xid: 4,
            gid: "g".into()
        })
    );
    assert_eq!(
        decode(3, body(b'p')),
        Ok(LogicalMessage::StreamPrepare {
            flags: 0,
            prepare_lsn: Lsn(1),
            end_lsn: Lsn(2),
            prepare_time_micros: 3,
            xid: 4,
            gid: "g".into()
        })
    );
    assert_eq!(
        decode(4, body(b'K')),
        Ok(LogicalMessage::CommitPrepared {
            flags: 0,
            commit_lsn: Lsn(1),
            end_lsn: Lsn(2),
            commit_time_micros: 3,
            xid: 4,
            gid: "g".into()
        })
    );
    let m = Msg::new(b'r')
        .u8(0)
        .u64(1)
        .u64(2)
        .i64(3)
        .i64(4)
        .u32(5)
        .cstr("g");
    assert_eq!(
        decode(3, m),
        Ok(LogicalMessage::RollbackPrepared {
            flags: 0,
            prepare_end_lsn: Lsn(1),
            rollback_end_lsn: Lsn(2),
            prepare_time_micros: 3,
            rollback_time_micros: 4,
            xid: 5,
            gid: "g".into()
        })
    );
}

#[test]
fn messages_newer_than_the_protocol_version_are_rejected() {
    let err = decode(1, Msg::new(b'S').u32(1).u8(1)).unwrap_err();
    assert_eq!(
        err,
        DecodeError::NotInProtocolVersion {
            kind: MessageKind::StreamStart,
            version: 1,
            min_version: 2
        }
    );
    assert!(err.to_string().contains("Stream Start"));
    assert!(matches!(
        decode(2, Msg::new(b'b').u64(1).u64(2).i64(3).u32(4).cstr("g")),
        Err(DecodeError::NotInProtocolVersion { min_version: 3, .. })
    ));
}

#[test]
fn unsupported_versions_empty_input_and_unknown_tags_are_errors() {
    for version in [0, 5, u32::MAX] {
        assert_eq!(
            decode(version, Msg::new(b'E')),
            Err(DecodeError::UnsupportedProtocolVersion { version })
        );
    }
    assert_eq!(
        PgoutputDecoder::new(1).decode(&Bytes::new()),
        Err(DecodeError::Empty)
    );
    let err = decode(1, Msg::new(b'Z')).unwrap_err();
    assert_eq!(err, DecodeError::UnknownTag { tag: b'Z' });
    assert_eq!(
        err.to_string(),
        "unknown pgoutput message tag 'Z' (0x5a) at offset 0"
    );
    assert_eq!(
        decode(1, Msg::new(0)).unwrap_err().to_string(),
        "unknown pgoutput message tag 0x00 at offset 0"
    );
}

#[test]
fn stream_blocks_never_nest_and_transaction_boundaries_stay_outside() {
    let mut d = PgoutputDecoder::new(2);
    assert_eq!(
        d.decode(&Msg::new(b'E').bytes()),
        Err(DecodeError::UnexpectedStreamState {
            kind: MessageKind::StreamStop,
            in_stream: false
        })
    );
    let mut d = streaming(2);
    let again = Msg::new(b'S').u32(900).u8(0).bytes();
    assert!(matches!(
        d.decode(&again),
        Err(DecodeError::UnexpectedStreamState {
            in_stream: true,
            ..
        })
    ));
    let commit = Msg::new(b'C').u8(0).u64(1).u64(2).i64(3).bytes();
    assert!(matches!(
        d.decode(&commit),
        Err(DecodeError::UnexpectedStreamState { .. })
    ));
    assert!(d.in_stream(), "a failed decode leaves the state unchanged");
    d.reset();
    assert!(!d.in_stream());
    assert!(d.decode(&commit).is_ok());
}

#[test]
fn trailing_bytes_are_an_error() {
    let err = decode(1, Msg::new(b'B').u64(1).i64(2).u32(3).u8(0)).unwrap_err();
    assert_eq!(
        err,
        DecodeError::TrailingBytes {
            kind: MessageKind::Begin,
            offset: 21,
            count: 1
        }
    );
    assert_eq!(err.offset(), Some(21));
    assert!(!err.is_retryable());
    assert!(decode(2, Msg::new(b'E').u8(0)).is_err());
}

#[test]
fn invalid_utf8_in_a_name_is_a_typed_error_but_cells_stay_bytes() {
    let m = Msg::new(b'O').u64(1).raw(&[b'a', 0xff]).u8(0);
    assert!(matches!(
        decode(1, m),
        Err(DecodeError::InvalidUtf8 {
            kind: MessageKind::Origin,
            offset: 9,
            field: "origin name",
            ..
        })
    ));
    let m = Msg::new(b'I').u32(1).u8(b'N').u16(1).text(&[0xff, 0xfe]);
    assert!(matches!(decode(1, m), Ok(LogicalMessage::Insert { .. })));
}

#[test]
fn unterminated_strings_are_errors() {
    let m = Msg::new(b'O').u64(1).raw(b"abc");
    assert_eq!(
        decode(1, m),
        Err(DecodeError::UnterminatedString {
            kind: MessageKind::Origin,
            offset: 9,
            field: "origin name"
        })
    );
}

#[test]
fn unknown_tuple_and_cell_kinds_are_errors() {
    assert!(matches!(
        decode(1, Msg::new(b'I').u32(1).u8(b'K').u16(0)),
        Err(DecodeError::UnknownTupleKind {
            offset: 5,
            tag: b'K',
            ..
        })
    ));
    assert!(matches!(
        decode(1, Msg::new(b'U').u32(1).u8(b'K').u16(0).u8(b'O').u16(0)),
        Err(DecodeError::UnknownTupleKind {
            offset: 8,
            tag: b'O',
            ..
        })
    ));
    assert!(matches!(
        decode(1, Msg::new(b'D').u32(1).u8(b'N').u16(0)),
        Err(DecodeError::UnknownTupleKind { tag: b'N', .. })
    ));
    assert!(matches!(
        decode(1, Msg::new(b'I').u32(1).u8(b'N').u16(2).u8(b'n').u8(b'x')),
        Err(DecodeError::UnknownCellKind {
            offset: 9,
            tag: b'x',
            ..
        })
    ));
}

#[test]
fn negative_lengths_and_impossible_counts_are_errors_before_allocating() {
    assert!(matches!(
        decode(1, Msg::new(b'I').u32(1).u8(b'N').u16(1).u8(b't').i32(-1)),
        Err(DecodeError::NegativeLength {
            offset: 9,
            length: -1,
            ..
        })
    ));
    assert!(matches!(
        decode(1, Msg::new(b'M').u8(0).u64(1).cstr("p").i32(i32::MIN)),
        Err(DecodeError::NegativeLength { .. })
    ));
    assert!(matches!(
        decode(1, Msg::new(b'T').u32(u32::MAX).u8(0).u32(1)),
        Err(DecodeError::CountMismatch {
            offset: 1,
            count: 4_294_967_295,
            ..
        })
    ));
    assert!(matches!(
        decode(1, Msg::new(b'I').u32(1).u8(b'N').u16(u16::MAX).u8(b'n')),
        Err(DecodeError::CountMismatch { offset: 6, .. })
    ));
    let rel = Msg::new(b'R')
        .u32(1)
        .cstr("s")
        .cstr("t")
        .u8(b'd')
        .u16(1000)
        .u8(0);
    assert!(matches!(
        decode(1, rel),
        Err(DecodeError::CountMismatch { .. })
    ));
    // A text length larger than the message is a truncation, not an allocation.
    assert!(matches!(
        decode(
            1,
            Msg::new(b'I').u32(1).u8(b'N').u16(1).u8(b't').i32(i32::MAX)
        ),
        Err(DecodeError::Truncated {
            needed: 2_147_483_647,
            ..
        })
    ));
}

#[test]
fn unknown_replica_identity_is_an_error() {
    let m = Msg::new(b'R').u32(1).cstr("s").cstr("t").u8(b'x').u16(0);
    assert!(matches!(
        decode(1, m),
        Err(DecodeError::UnknownReplicaIdentity {
            offset: 9,
            value: b'x',
            ..
        })
    ));
}

/// Every valid sample message, with the version and stream state it needs.
fn samples() -> Vec<(u32, bool, Bytes)> {
    let gid = |tag| {
        Msg::new(tag)
            .u8(0)
            .u64(1)
            .u64(2)
            .i64(3)
            .u32(4)
            .cstr("g")
            .bytes()
    };
    vec![
        (1, false, Msg::new(b'B').u64(1).i64(2).u32(3).bytes()),
        (1, false, Msg::new(b'C').u8(0).u64(1).u64(2).i64(3).bytes()),
        (1, false, Msg::new(b'O').u64(1).cstr("o").bytes()),
        (1, false, relation_msg(Msg::new(b'R')).bytes()),
        (2, true, relation_msg(Msg::new(b'R').u32(9)).bytes()),
        (1, false, Msg::new(b'Y').u32(1).cstr("s").cstr("t").bytes()),
        (1, false, tuple4(Msg::new(b'I').u32(1).u8(b'N')).bytes()),
        (
            2,
            true,
            tuple4(Msg::new(b'I').u32(9).u32(1).u8(b'N')).bytes(),
        ),
        (
            1,
            false,
            tuple4(Msg::new(b'U').u32(1).u8(b'O').u16(1).u8(b'n').u8(b'N')).bytes(),
        ),
        (
            1,
            false,
            Msg::new(b'D').u32(1).u8(b'K').u16(1).text(b"k").bytes(),
        ),
        (1, false, Msg::new(b'T').u32(2).u8(1).u32(5).u32(6).bytes()),
        (
            1,
            false,
            Msg::new(b'M')
                .u8(1)
                .u64(1)
                .cstr("p")
                .i32(2)
                .raw(b"hi")
                .bytes(),
        ),
        (2, false, Msg::new(b'S').u32(9).u8(1).bytes()),
        (
            2,
            false,
            Msg::new(b'c').u32(9).u8(0).u64(1).u64(2).i64(3).bytes(),
        ),
        (2, false, Msg::new(b'A').u32(9).u32(10).bytes()),
        (
            4,
            false,
            Msg::new(b'A').u32(9).u32(10).u64(1).i64(2).bytes(),
        ),
        (
            3,
            false,
            Msg::new(b'b').u64(1).u64(2).i64(3).u32(4).cstr("g").bytes(),
        ),
        (3, false, gid(b'P')),
        (3, false, gid(b'K')),
        (3, false, gid(b'p')),
        (
            3,
            false,
            Msg::new(b'r')
                .u8(0)
                .u64(1)
                .u64(2)
                .i64(3)
                .i64(4)
                .u32(5)
                .cstr("g")
                .bytes(),
        ),
    ]
}

fn decoder_for(version: u32, in_stream: bool) -> PgoutputDecoder {
    if in_stream {
        streaming(version)
    } else {
        PgoutputDecoder::new(version)
    }
}

#[test]
fn every_truncation_of_every_message_kind_is_an_error() {
    for (version, in_stream, full) in samples() {
        let mut d = decoder_for(version, in_stream);
        let state = d.clone();
        assert!(
            d.clone().decode(&full).is_ok(),
            "sample {full:?} must decode"
        );
        for len in 0..full.len() {
            let cut = full.slice(..len);
            // Stream Abort under v4 is complete at 9 bytes too (no parallel fields).
            if full.first() == Some(&b'A') && len == 9 {
                continue;
            }
            assert!(d.decode(&cut).is_err(), "prefix {len} of {full:?} decoded");
            assert_eq!(
                d, state,
                "a failed decode must not change the decoder state"
            );
        }
    }
}

#[test]
fn every_single_byte_corruption_returns_without_panicking() {
    for (version, in_stream, full) in samples() {
        for i in 0..full.len() {
            for value in [0x00, 0x01, 0x7f, 0x80, 0xff, b'n', b't'] {
                let mut bytes = full.to_vec();
                if let Some(b) = bytes.get_mut(i) {
                    *b = value;
                }
                let _ = decoder_for(version, in_stream).decode(&Bytes::from(bytes));
            }
        }
    }
}

#[test]
fn every_message_kind_round_trips_its_tag_and_version_gate() {
    for (version, _, full) in samples() {
        let tag = full.first().copied().unwrap_or_default();
        let kind = MessageKind::from_tag(tag).expect("sample tags are known");
        assert_eq!(kind.tag(), tag);
        assert!(kind.min_protocol_version() <= version);
    }
    assert_eq!(pg_micros_to_unix_micros(0), Some(PG_EPOCH_UNIX_MICROS));
    assert_eq!(pg_micros_to_unix_micros(i64::MAX), None);
}
