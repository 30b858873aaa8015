//! Invariant 6 for the pgoutput decoder: bad input never panics.
//!
//! Arbitrary bytes, sequences of arbitrary messages through one stateful decoder, and valid
//! messages that were truncated or mutated must all come back as `Ok` or `Err`. Valid messages
//! generated here (every kind, every protocol version, inside and outside streamed blocks) must
//! decode to exactly what was encoded, and every strict prefix of one must be an error.

use bytes::Bytes;
use proptest::prelude::*;
use proptest::strategy::Union;
use slotstream::Lsn;
use slotstream::decode::pgoutput::{
    Cell, LogicalMessage, OldTuple, PgoutputDecoder, RelationBody, RelationColumn, ReplicaIdentity,
    TupleData,
};

const TAGS: &[u8] = b"BCORYIUDTMSEcAbPKrp";

/// A decoder for `version`, moved inside a streamed block when `in_stream`.
fn decoder(version: u32, in_stream: bool) -> PgoutputDecoder {
    let mut d = PgoutputDecoder::new(version);
    if in_stream {
        let start = Bytes::from_static(&[b'S', 0, 0, 0, 9, 1]);
        assert!(
            d.decode(&start).is_ok(),
            "Stream Start must decode under v{version}"
        );
    }
    d
}

// ---- an encoder, the mirror image of the decoder, for generated messages ----

struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend(v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend(v.to_be_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend(v.to_be_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend(v.to_be_bytes());
    }
    fn lsn(&mut self, v: Lsn) {
        self.0.extend(v.0.to_be_bytes());
    }
    fn xid(&mut self, v: Option<u32>) {
        if let Some(x) = v {
            self.u32(x);
        }
    }
    fn cstr(&mut self, v: &str) {
        self.0.extend_from_slice(v.as_bytes());
        self.0.push(0);
    }
    fn sized(&mut self, v: &[u8]) {
        self.i32(i32::try_from(v.len()).expect("generated values are small"));
        self.0.extend_from_slice(v);
    }
    fn tuple(&mut self, t: &TupleData) {
        self.u16(u16::try_from(t.cells.len()).expect("generated tuples are small"));
        for cell in &t.cells {
            match cell {
                Cell::Null => self.u8(b'n'),
                Cell::UnchangedToast => self.u8(b'u'),
                Cell::Text(b) => {
                    self.u8(b't');
                    self.sized(b);
                }
                Cell::Binary(b) => {
                    self.u8(b'b');
                    self.sized(b);
                }
            }
        }
    }
    fn old(&mut self, t: &OldTuple) {
        match t {
            OldTuple::Key(t) => {
                self.u8(b'K');
                self.tuple(t);
            }
            OldTuple::Full(t) => {
                self.u8(b'O');
                self.tuple(t);
            }
        }
    }
    /// flags, lsn, lsn, time, xid, gid: the shared tail of Prepare, Stream Prepare and
    /// Commit Prepared.
    fn two_phase(&mut self, flags: u8, a: Lsn, b: Lsn, t: i64, xid: u32, gid: &str) {
        self.u8(flags);
        self.lsn(a);
        self.lsn(b);
        self.i64(t);
        self.u32(xid);
        self.cstr(gid);
    }
}

fn encode(m: &LogicalMessage) -> Bytes {
    use LogicalMessage as L;
    let mut e = Enc(vec![m.kind().tag()]);
    match m {
        L::Begin {
            final_lsn,
            commit_time_micros,
            xid,
        } => {
            e.lsn(*final_lsn);
            e.i64(*commit_time_micros);
            e.u32(*xid);
        }
        L::Commit {
            flags,
            commit_lsn,
            end_lsn,
            commit_time_micros,
        } => {
            e.u8(*flags);
            e.lsn(*commit_lsn);
            e.lsn(*end_lsn);
            e.i64(*commit_time_micros);
        }
        L::Origin { commit_lsn, name } => {
            e.lsn(*commit_lsn);
            e.cstr(name);
        }
        L::Relation(r) => {
            e.xid(r.xid);
            e.u32(r.rel_id);
            e.cstr(&r.namespace);
            e.cstr(&r.name);
            e.u8(r.replica_identity.as_byte());
            e.u16(u16::try_from(r.columns.len()).expect("generated relations are small"));
            for c in &r.columns {
                e.u8(u8::from(c.is_key));
                e.cstr(&c.name);
                e.u32(c.type_oid);
                e.i32(c.type_modifier);
            }
        }
        L::Type {
            xid,
            type_oid,
            namespace,
            name,
        } => {
            e.xid(*xid);
            e.u32(*type_oid);
            e.cstr(namespace);
            e.cstr(name);
        }
        L::Insert { xid, rel_id, new } => {
            e.xid(*xid);
            e.u32(*rel_id);
            e.u8(b'N');
            e.tuple(new);
        }
        L::Update {
            xid,
            rel_id,
            old,
            new,
        } => {
            e.xid(*xid);
            e.u32(*rel_id);
            if let Some(old) = old {
                e.old(old);
            }
            e.u8(b'N');
            e.tuple(new);
        }
        L::Delete { xid, rel_id, old } => {
            e.xid(*xid);
            e.u32(*rel_id);
            e.old(old);
        }
        L::Truncate {
            xid,
            options,
            rel_ids,
        } => {
            e.xid(*xid);
            e.u32(u32::try_from(rel_ids.len()).expect("generated lists are small"));
            e.u8(*options);
            for id in rel_ids {
                e.u32(*id);
            }
        }
        L::Message {
            xid,
            transactional,
            lsn,
            prefix,
            content,
        } => {
            e.xid(*xid);
            e.u8(u8::from(*transactional));
            e.lsn(*lsn);
            e.cstr(prefix);
            e.sized(content);
        }
        L::StreamStart { xid, first_segment } => {
            e.u32(*xid);
            e.u8(u8::from(*first_segment));
        }
        L::StreamStop => {}
        L::StreamCommit {
            xid,
            flags,
            commit_lsn,
            end_lsn,
            commit_time_micros,
        } => {
            e.u32(*xid);
            e.u8(*flags);
            e.lsn(*commit_lsn);
            e.lsn(*end_lsn);
            e.i64(*commit_time_micros);
        }
        L::StreamAbort {
            xid,
            subxid,
            abort_lsn,
            abort_time_micros,
        } => {
            e.u32(*xid);
            e.u32(*subxid);
            if let (Some(lsn), Some(t)) = (abort_lsn, abort_time_micros) {
                e.lsn(*lsn);
                e.i64(*t);
            }
        }
        L::BeginPrepare {
            prepare_lsn,
            end_lsn,
            prepare_time_micros,
            xid,
            gid,
        } => {
            e.lsn(*prepare_lsn);
            e.lsn(*end_lsn);
            e.i64(*prepare_time_micros);
            e.u32(*xid);
            e.cstr(gid);
        }
        L::Prepare {
            flags,
            prepare_lsn,
            end_lsn,
            prepare_time_micros,
            xid,
            gid,
        }
        | L::StreamPrepare {
            flags,
            prepare_lsn,
            end_lsn,
            prepare_time_micros,
            xid,
            gid,
        } => e.two_phase(
            *flags,
            *prepare_lsn,
            *end_lsn,
            *prepare_time_micros,
            *xid,
            gid,
        ),
        L::CommitPrepared {
            flags,
            commit_lsn,
            end_lsn,
            commit_time_micros,
            xid,
            gid,
        } => e.two_phase(
            *flags,
            *commit_lsn,
            *end_lsn,
            *commit_time_micros,
            *xid,
            gid,
        ),
        L::RollbackPrepared {
            flags,
            prepare_end_lsn,
            rollback_end_lsn,
            prepare_time_micros,
            rollback_time_micros,
            xid,
            gid,
        } => {
            e.u8(*flags);
            e.lsn(*prepare_end_lsn);
            e.lsn(*rollback_end_lsn);
            e.i64(*prepare_time_micros);
            e.i64(*rollback_time_micros);
            e.u32(*xid);
            e.cstr(gid);
        }
    }
    Bytes::from(e.0)
}

// ---- strategies for valid messages ----

fn name() -> impl Strategy<Value = String> {
    // Printable characters, any script; never NUL.
    "\\PC{0,10}"
}

fn lsn() -> impl Strategy<Value = Lsn> {
    any::<u64>().prop_map(Lsn)
}

fn value() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn tuple() -> impl Strategy<Value = TupleData> {
    let cell = prop_oneof![
        Just(Cell::Null),
        Just(Cell::UnchangedToast),
        value().prop_map(Cell::Text),
        value().prop_map(Cell::Binary),
    ];
    proptest::collection::vec(cell, 0..6).prop_map(|cells| TupleData { cells })
}

fn old_tuple() -> impl Strategy<Value = OldTuple> {
    prop_oneof![
        tuple().prop_map(OldTuple::Key),
        tuple().prop_map(OldTuple::Full)
    ]
}

fn relation(xid: Option<u32>) -> impl Strategy<Value = RelationBody> {
    let identity = prop_oneof![
        Just(ReplicaIdentity::Default),
        Just(ReplicaIdentity::Nothing),
        Just(ReplicaIdentity::Full),
        Just(ReplicaIdentity::Index),
    ];
    let column = (any::<bool>(), name(), any::<u32>(), any::<i32>()).prop_map(
        |(is_key, name, type_oid, type_modifier)| RelationColumn {
            is_key,
            name,
            type_oid,
            type_modifier,
        },
    );
    (
        any::<u32>(),
        name(),
        name(),
        identity,
        proptest::collection::vec(column, 0..5),
    )
        .prop_map(
            move |(rel_id, namespace, name, replica_identity, columns)| RelationBody {
                xid,
                rel_id,
                namespace,
                name,
                replica_identity,
                columns,
            },
        )
}

/// Any message valid for a decoder at `version`, inside a streamed block or not.
fn message(version: u32, in_stream: bool) -> BoxedStrategy<LogicalMessage> {
    use LogicalMessage as L;
    // Changes inside a streamed block carry the streamed transaction's xid.
    let stream_xid = in_stream.then_some(77u32);
    let xid = Just(stream_xid);
    let mut choices: Vec<BoxedStrategy<LogicalMessage>> = vec![
        (lsn(), name())
            .prop_map(|(commit_lsn, name)| L::Origin { commit_lsn, name })
            .boxed(),
        relation(stream_xid).prop_map(L::Relation).boxed(),
        (xid, any::<u32>(), name(), name())
            .prop_map(|(xid, type_oid, namespace, name)| L::Type {
                xid,
                type_oid,
                namespace,
                name,
            })
            .boxed(),
        (xid, any::<u32>(), tuple())
            .prop_map(|(xid, rel_id, new)| L::Insert { xid, rel_id, new })
            .boxed(),
        (
            xid,
            any::<u32>(),
            proptest::option::of(old_tuple()),
            tuple(),
        )
            .prop_map(|(xid, rel_id, old, new)| L::Update {
                xid,
                rel_id,
                old,
                new,
            })
            .boxed(),
        (xid, any::<u32>(), old_tuple())
            .prop_map(|(xid, rel_id, old)| L::Delete { xid, rel_id, old })
            .boxed(),
        (
            xid,
            any::<u8>(),
            proptest::collection::vec(any::<u32>(), 0..6),
        )
            .prop_map(|(xid, options, rel_ids)| L::Truncate {
                xid,
                options,
                rel_ids,
            })
            .boxed(),
        (xid, any::<bool>(), lsn(), name(), value())
            .prop_map(|(xid, transactional, lsn, prefix, content)| L::Message {
                xid,
                transactional,
                lsn,
                prefix,
                content,
            })
            .boxed(),
    ];
    if in_stream {
        choices.push(Just(L::StreamStop).boxed());
        return Union::new(choices).boxed();
    }
    choices.push(
        (lsn(), any::<i64>(), any::<u32>())
            .prop_map(|(final_lsn, commit_time_micros, xid)| L::Begin {
                final_lsn,
                commit_time_micros,
                xid,
            })
            .boxed(),
    );
    choices.push(
        (any::<u8>(), lsn(), lsn(), any::<i64>())
            .prop_map(
                |(flags, commit_lsn, end_lsn, commit_time_micros)| L::Commit {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time_micros,
                },
            )
            .boxed(),
    );
    if version >= 2 {
        choices.push(
            (any::<u32>(), any::<bool>())
                .prop_map(|(xid, first_segment)| L::StreamStart { xid, first_segment })
                .boxed(),
        );
        choices.push(
            (any::<u32>(), any::<u8>(), lsn(), lsn(), any::<i64>())
                .prop_map(|(xid, flags, commit_lsn, end_lsn, t)| L::StreamCommit {
                    xid,
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time_micros: t,
                })
                .boxed(),
        );
        let parallel = if version >= 4 {
            proptest::option::of((lsn(), any::<i64>())).boxed()
        } else {
            Just(None).boxed()
        };
        choices.push(
            (any::<u32>(), any::<u32>(), parallel)
                .prop_map(|(xid, subxid, parallel)| L::StreamAbort {
                    xid,
                    subxid,
                    abort_lsn: parallel.map(|p| p.0),
                    abort_time_micros: parallel.map(|p| p.1),
                })
                .boxed(),
        );
    }
    if version >= 3 {
        let fields = || {
            (
                any::<u8>(),
                lsn(),
                lsn(),
                any::<i64>(),
                any::<u32>(),
                name(),
            )
        };
        choices.push(
            fields()
                .prop_map(|(_, prepare_lsn, end_lsn, t, xid, gid)| L::BeginPrepare {
                    prepare_lsn,
                    end_lsn,
                    prepare_time_micros: t,
                    xid,
                    gid,
                })
                .boxed(),
        );
        choices.push(
            fields()
                .prop_map(|(flags, prepare_lsn, end_lsn, t, xid, gid)| L::Prepare {
                    flags,
                    prepare_lsn,
                    end_lsn,
                    prepare_time_micros: t,
                    xid,
                    gid,
                })
                .boxed(),
        );
        choices.push(
            fields()
                .prop_map(
                    |(flags, prepare_lsn, end_lsn, t, xid, gid)| L::StreamPrepare {
                        flags,
                        prepare_lsn,
                        end_lsn,
                        prepare_time_micros: t,
                        xid,
                        gid,
                    },
                )
                .boxed(),
        );
        choices.push(
            fields()
                .prop_map(
                    |(flags, commit_lsn, end_lsn, t, xid, gid)| L::CommitPrepared {
                        flags,
                        commit_lsn,
                        end_lsn,
                        commit_time_micros: t,
                        xid,
                        gid,
                    },
                )
                .boxed(),
        );
        choices.push(
            (fields(), any::<i64>())
                .prop_map(|((flags, a, b, t, xid, gid), rt)| L::RollbackPrepared {
                    flags,
                    prepare_end_lsn: a,
                    rollback_end_lsn: b,
                    prepare_time_micros: t,
                    rollback_time_micros: rt,
                    xid,
                    gid,
                })
                .boxed(),
        );
    }
    Union::new(choices).boxed()
}

/// `(version, in_stream, message)` for every combination the protocol allows.
fn session_message() -> impl Strategy<Value = (u32, bool, LogicalMessage)> {
    (1u32..=4, any::<bool>())
        .prop_map(|(version, in_stream)| (version, in_stream && version >= 2))
        .prop_flat_map(|(version, in_stream)| {
            (Just(version), Just(in_stream), message(version, in_stream))
        })
}

/// Ways to damage a valid message.
#[derive(Debug, Clone)]
enum Mutation {
    Truncate(usize),
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    /// Overwrite four bytes with an extreme Int32 (lengths and counts live in Int32/Int16).
    Extreme(usize, u32),
    Append(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
        (
            any::<usize>(),
            prop::sample::select(vec![0, 1, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 0xffff])
        )
            .prop_map(|(i, v)| Mutation::Extreme(i, v)),
        proptest::collection::vec(any::<u8>(), 1..8).prop_map(Mutation::Append),
    ]
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len().max(1);
    match m {
        Mutation::Truncate(i) => bytes.truncate(i % len),
        Mutation::Set(i, b) => {
            if let Some(x) = bytes.get_mut(i % len) {
                *x = *b;
            }
        }
        Mutation::Insert(i, b) => bytes.insert(i % (bytes.len() + 1), *b),
        Mutation::Remove(i) => {
            if !bytes.is_empty() {
                bytes.remove(i % len);
            }
        }
        Mutation::Extreme(i, v) => {
            for (k, b) in v.to_be_bytes().into_iter().enumerate() {
                if let Some(x) = bytes.get_mut(i % len + k) {
                    *x = b;
                }
            }
        }
        Mutation::Append(extra) => bytes.extend_from_slice(extra),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(
        version in 0u32..=5,
        in_stream in any::<bool>(),
        tag in prop::sample::select(TAGS.to_vec()),
        body in proptest::collection::vec(any::<u8>(), 0..96),
        raw in proptest::collection::vec(any::<u8>(), 0..96),
    ) {
        let mut d = decoder(version.clamp(2, 4), in_stream);
        let mut tagged = vec![tag];
        tagged.extend_from_slice(&body);
        let _ = d.decode(&Bytes::from(tagged));
        let _ = d.decode(&Bytes::from(raw.clone()));
        let _ = PgoutputDecoder::new(version).decode(&Bytes::from(raw));
    }

    #[test]
    fn a_sequence_of_arbitrary_messages_never_panics_one_decoder(
        version in 1u32..=4,
        frames in proptest::collection::vec(
            (prop::sample::select(TAGS.to_vec()), proptest::collection::vec(any::<u8>(), 0..40)),
            0..24,
        ),
    ) {
        let mut d = PgoutputDecoder::new(version);
        for (tag, body) in frames {
            let mut frame = vec![tag];
            frame.extend(body);
            let _ = d.decode(&Bytes::from(frame));
        }
    }

    #[test]
    fn valid_messages_decode_to_what_was_encoded((version, in_stream, msg) in session_message()) {
        let bytes = encode(&msg);
        let mut d = decoder(version, in_stream);
        prop_assert_eq!(d.decode(&bytes), Ok(msg.clone()));
        let expect_in_stream = match msg {
            LogicalMessage::StreamStart { .. } => true,
            LogicalMessage::StreamStop => false,
            _ => in_stream,
        };
        prop_assert_eq!(d.in_stream(), expect_in_stream);
    }

    #[test]
    fn every_strict_prefix_of_a_valid_message_is_an_error(
        (version, in_stream, msg) in session_message(),
    ) {
        let bytes = encode(&msg);
        for len in 0..bytes.len() {
            // Stream Abort is also complete without its parallel-streaming fields.
            if matches!(msg, LogicalMessage::StreamAbort { .. }) && len == 9 {
                continue;
            }
            let result = decoder(version, in_stream).decode(&bytes.slice(..len));
            prop_assert!(result.is_err(), "prefix {} of {:?} decoded as {:?}", len, bytes, result);
        }
    }

    #[test]
    fn mutated_valid_messages_never_panic(
        (version, in_stream, msg) in session_message(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let mut bytes = encode(&msg).to_vec();
        for m in &mutations {
            mutate(&mut bytes, m);
        }
        let _ = decoder(version, in_stream).decode(&Bytes::from(bytes));
    }
}
