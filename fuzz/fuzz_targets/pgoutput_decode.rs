//! Fuzzes `decode::pgoutput` and `decode::relation` with one replication session per input.
//!
//! Input layout (so that seeds stay readable):
//! - byte 0: session config. Bits 0-1: protocol version - 1 (1..=4); bit 2: start inside a
//!   streamed block (version 2+ only).
//! - then frames: a big-endian `u16` length and that many bytes, each frame one `XLogData`
//!   payload fed to the same decoder; a short last frame takes whatever is left.
//!
//! Decoded `Relation` messages feed a `RelationCache`, and decoded tuples are checked against
//! it, so the whole decode stage runs. The property is invariant 6: `Ok` or `Err`, never a
//! panic (and never an allocation the input cannot pay for).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use slotstream::decode::pgoutput::{LogicalMessage, OldTuple, PgoutputDecoder};
use slotstream::decode::relation::RelationCache;

fuzz_target!(|data: &[u8]| {
    let Some((&config, mut rest)) = data.split_first() else {
        return;
    };
    let version = u32::from(config & 0b11) + 1;
    let mut decoder = PgoutputDecoder::new(version);
    if config & 0b100 != 0 && version >= 2 {
        let start = Bytes::from_static(&[b'S', 0, 0, 0, 1, 1]);
        assert!(decoder.decode(&start).is_ok());
    }
    let mut cache = RelationCache::new();
    while !rest.is_empty() {
        let frame;
        (frame, rest) = match rest {
            [hi, lo, tail @ ..] => {
                tail.split_at(usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len()))
            }
            _ => (rest, &[][..]),
        };
        let before = decoder.clone();
        match decoder.decode(&Bytes::copy_from_slice(frame)) {
            Ok(LogicalMessage::Relation(body)) => {
                let _ = cache.apply(body);
            }
            Ok(LogicalMessage::Insert { rel_id, new, .. }) => {
                let _ = cache.shape_for(rel_id, &new);
            }
            Ok(LogicalMessage::Update {
                rel_id, old, new, ..
            }) => {
                let _ = cache.shape_for(rel_id, &new);
                if let Some(old) = old {
                    let _ = cache.shape_for(rel_id, old.tuple());
                }
            }
            Ok(LogicalMessage::Delete {
                rel_id,
                old: OldTuple::Key(t) | OldTuple::Full(t),
                ..
            }) => {
                let _ = cache.shape_for(rel_id, &t);
            }
            Ok(_) => {}
            Err(e) => {
                // A failed decode leaves the session state as it was, and the error renders.
                assert_eq!(decoder, before);
                assert!(!e.to_string().is_empty());
                assert!(!e.is_retryable());
            }
        }
    }
});
