//! The sent-state ledger's decisions (docs/architecture.md §6, "The sent-state ledger"):
//! what a row change becomes, given what the destination was last sent for the row's key.
//! Pure and synchronous; the deliverer looks the entries up and stores the writes (in the
//! checkpoint's transaction).
//!
//! Rules:
//! - **An identify** whose identifiers and traits hash equal the entry's is *unchanged*: it
//!   sends nothing (a full sync re-sends every row all the same; `resync --changed-only` does
//!   not). A partial update (unchanged TOAST cells left out) is always sent: the ledger holds a
//!   hash, not the cells.
//! - **Identifiers that changed** (the row's user_id now names someone else): in mirror mode the
//!   old user gets `Record Deleted` before the new one's identify.
//! - **A delete** in mirror mode names the user the ledger holds for the key, so a key-only
//!   delete (default replica identity) still becomes `Record Deleted`. A key the ledger does not
//!   hold was never delivered (inserted and deleted before a delivery, or never identified):
//!   nothing is sent. Without a ledger, a delete needs its own identifiers (REPLICA IDENTITY
//!   FULL), else it is a dead letter. In upsert mode deletes send nothing and keep the entry:
//!   the destination keeps the user.
//! - **A row whose key moved** (an update of the key columns) is the old key deleted and the
//!   new key written; the old user is told only if the identifiers changed (or the row is
//!   deleted).

use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::Row;
use crate::transform::event::{Event, EventKind, Op};

/// What the destination was last sent for one row key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// `userId` last sent.
    pub user_id: Option<String>,
    /// `anonymousId` last sent.
    pub anonymous_id: Option<String>,
    /// Hash of the identifiers and traits last sent ([`traits_hash`]); `None` after a partial
    /// update (the hash of a part says nothing about the whole).
    pub hash: Option<[u8; 32]>,
}

impl Sent {
    /// An entry that names no user (the template of a key-only delete).
    pub fn nobody() -> Sent {
        Sent {
            user_id: None,
            anonymous_id: None,
            hash: None,
        }
    }
}

/// How the pipeline treats rows.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// `sync.mode = "mirror"`: deletes are sent.
    pub mirror: bool,
    /// `sync.ledger`: entries are read and written.
    pub ledger: bool,
    /// Snapshot rows are sent even when unchanged (a full sync); `false` for
    /// `resync --changed-only`.
    pub resend_snapshot: bool,
}

/// What became of a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// At least one event.
    Sent,
    /// Same traits as last sent: nothing.
    Unchanged,
    /// Nothing to send (an upsert-mode delete, a delete of a row never delivered).
    Skipped,
    /// A delete that names no user and has no ledger entry to name one: a dead letter.
    Unidentified,
}

/// A decision: the events to send in order, the outcome, and the ledger writes (key, new entry
/// or `None` to remove it).
#[derive(Debug)]
pub struct Decision {
    /// Events, in order.
    pub events: Vec<Event>,
    /// What became of the row.
    pub outcome: Outcome,
    /// Ledger writes.
    pub writes: Vec<(String, Option<Sent>)>,
}

/// The hash the ledger keeps of what an identify sends: its identifiers and traits.
pub fn traits_hash(event: &Event) -> [u8; 32] {
    // Writing JSON into a Vec cannot fail.
    let mut traits = Vec::with_capacity(256);
    match &event.traits {
        Some(t) => t.write_json(&mut traits),
        None => traits.extend_from_slice(b"null"),
    }
    traits_hash_of(
        event.user_id.as_deref(),
        event.anonymous_id.as_deref(),
        &traits,
    )
}

/// [`traits_hash`] of an event with these identifiers whose traits serialize as `traits_json`.
pub fn traits_hash_of(
    user_id: Option<&str>,
    anonymous_id: Option<&str>,
    traits_json: &[u8],
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(user_id.unwrap_or("").as_bytes());
    h.update([0]);
    h.update(anonymous_id.unwrap_or("").as_bytes());
    h.update([0]);
    h.update(traits_json);
    h.finalize().into()
}

/// The ledger entry an event leaves behind (`known`: its hash, if computed already).
fn sent_of(event: &Event, partial: bool, known: Option<[u8; 32]>) -> Sent {
    Sent {
        user_id: event.user_id.clone(),
        anonymous_id: event.anonymous_id.clone(),
        hash: (!partial).then(|| known.unwrap_or_else(|| traits_hash(event))),
    }
}

fn same_user(a: &Sent, e: &Event) -> bool {
    a.user_id == e.user_id && a.anonymous_id == e.anonymous_id
}

/// `Record Deleted` for the user `sent` names, built on `like`'s context (same source and
/// position), under a messageId derived from `like`'s and `salt`.
pub fn deleted_event(like: &Event, sent: &Sent, salt: &str) -> Event {
    let mut properties = serde_json::Map::new();
    if let Some(u) = &sent.user_id {
        properties.insert("userId".into(), u.clone().into());
    }
    if let Some(a) = &sent.anonymous_id {
        properties.insert("anonymousId".into(), a.clone().into());
    }
    let mut context = like.context.clone();
    context.sources.op = Op::Delete;
    Event {
        kind: EventKind::Track,
        event: Some("Record Deleted"),
        message_id: Uuid::new_v5(&like.message_id, salt.as_bytes()),
        user_id: sent.user_id.clone(),
        anonymous_id: sent.anonymous_id.clone(),
        traits: None,
        properties: Some(properties),
        context,
        original_timestamp: like.original_timestamp.clone(),
        sent_at: None,
    }
}

fn is_identified(e: &Event) -> bool {
    e.user_id.is_some() || e.anonymous_id.is_some()
}

/// Decides what `row` becomes. `current` is the entry of `row.key`, `moved_from` the entry
/// `row.old_key` had (when the row's key changed): the caller removes that entry from the
/// ledger first, for every moved row of a window before any other row of it (two rows may
/// swap keys).
pub fn decide(
    row: Row,
    current: Option<&Sent>,
    moved_from: Option<&Sent>,
    rules: Rules,
) -> Decision {
    let Row {
        event,
        key,
        old_key,
        fresh,
        traits_hash: known_hash,
    } = row;
    let mut events = Vec::new();
    let mut writes = Vec::new();
    let ledger = rules.ledger && key.is_some();
    let is_delete = event.kind == EventKind::Track;
    if !rules.mirror && is_delete {
        return Decision {
            events,
            outcome: Outcome::Skipped,
            writes,
        };
    }
    // A row that moved to a new key: the old key is gone; its user is told when the row is
    // deleted or now names someone else.
    if ledger
        && old_key.is_some()
        && let Some(before) = moved_from
        && rules.mirror
        && (is_delete || !same_user(before, &event))
    {
        events.push(deleted_event(&event, before, "moved"));
    }
    let moved_events = !events.is_empty();
    if is_delete {
        let outcome = match (ledger, current) {
            (true, Some(sent)) => {
                // The ledger names whom the destination holds for this key.
                let mut e = event;
                if !same_user(sent, &e) {
                    let named = deleted_event(&e, sent, "");
                    e.user_id = named.user_id;
                    e.anonymous_id = named.anonymous_id;
                    e.properties = named.properties;
                }
                events.push(e);
                Outcome::Sent
            }
            (true, None) if moved_events => Outcome::Sent,
            (true, None) => Outcome::Skipped,
            (false, _) if fresh => Outcome::Skipped,
            (false, _) if is_identified(&event) => {
                events.push(event);
                Outcome::Sent
            }
            (false, _) => Outcome::Unidentified,
        };
        if let (true, Some(k)) = (ledger, key) {
            writes.push((k, None));
        }
        return Decision {
            events,
            outcome,
            writes,
        };
    }
    if !ledger {
        // Nothing to compare with and nothing to record: no hash to compute.
        events.push(event);
        return Decision {
            events,
            outcome: Outcome::Sent,
            writes,
        };
    }
    let partial = event.traits.as_ref().is_some_and(|t| t.is_partial());
    let snapshot = event.context.sources.op == Op::Snapshot;
    let sent = sent_of(&event, partial, known_hash);
    if let Some(before) = current {
        let unchanged = before.hash.is_some()
            && before.hash == sent.hash
            && same_user(before, &event)
            && !(snapshot && rules.resend_snapshot);
        if unchanged {
            // The entry stays (written again: a full sync marks it as seen).
            if let Some(k) = key {
                writes.push((k, Some(sent)));
            }
            let outcome = if moved_events {
                Outcome::Sent
            } else {
                Outcome::Unchanged
            };
            return Decision {
                events,
                outcome,
                writes,
            };
        }
        if rules.mirror && !same_user(before, &event) {
            events.push(deleted_event(&event, before, "previous identity"));
        }
    }
    events.push(event);
    if let Some(k) = key {
        writes.push((k, Some(sent)));
    }
    Decision {
        events,
        outcome: Outcome::Sent,
        writes,
    }
}
