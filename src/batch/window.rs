//! Schedule windows: the changes between two boundaries, coalesced per row
//! (docs/architecture.md §4, "Windows").
//!
//! Invariants:
//! - **The coalescing key** is the row's key ([`Row::key`]: primary key, else replica identity
//!   index). Several changes to one key become one: the latest state, under the messageId of
//!   the last change kept. A partial update (unchanged TOAST cells left out) is merged into the
//!   row's earlier state. A row without a key is never coalesced (each change stays).
//! - **A delete after an identify** of the same key leaves the delete; whether it is sent is
//!   the ledger's decision at the boundary ([`super::ledger::decide`]): a row inserted in the
//!   window and deleted in it sends nothing, a row the destination had gets `Record Deleted`.
//! - **A row whose key moved** takes the place of its old key's entry, remembering the key the
//!   destination knows it by, so the boundary tells the old user (mirror) when needed. The old
//!   key keeps a key-only delete: whatever the destination holds under it goes (the ledger
//!   names it; without a ledger it sends nothing).
//! - **Memory** is capped in bytes: the [`Coalescer`] reports when it holds its cap; the
//!   deliverer then writes it to the window stage in `_rudderstack` (with the checkpoint, in one
//!   transaction) and empties it. Nothing is dropped and the replication session never waits
//!   for the boundary.
//! - **The checkpoint** moves as the window fills, to the last commit whose changes are all
//!   staged; the window is delivered from the stage at the boundary, then the stage rows go in
//!   the transaction that writes their ledger entries.

use std::collections::HashMap;

use super::Row;

/// Prefix of the stage key of a row without a key: unique per change (its messageId), so it is
/// never coalesced. Real keys are JSON arrays and start with `[`.
const UNKEYED: &str = "~";

/// The stage key of a row: its key, or a unique stand-in.
pub fn stage_key(row: &Row) -> String {
    match &row.key {
        Some(k) => k.clone(),
        None => format!("{UNKEYED}{}", row.event.message_id),
    }
}

/// Whether a stage key stands for a row without a key.
pub fn is_unkeyed(stage_key: &str) -> bool {
    stage_key.starts_with(UNKEYED)
}

/// (old key, key now) of rows whose key moved.
pub type Moves = Vec<(String, String)>;

/// The coalesced changes of the open window not yet staged.
#[derive(Debug, Default)]
pub struct Coalescer {
    entries: HashMap<String, Row>,
    /// (old key, key now) of rows that moved: the old key's row may already be staged (the
    /// stage drops it, and hands its facts to the row's entry under the key it has now).
    moved: Moves,
    bytes: u64,
    rows: i64,
}

impl Coalescer {
    /// An empty coalescer.
    pub fn new() -> Self {
        Coalescer::default()
    }

    /// Adds one change of a committed or committing transaction.
    pub fn add(&mut self, mut row: Row) {
        self.rows += 1;
        // Coalescing may merge the traits: the hash is computed again when needed.
        row.traits_hash = None;
        if row.event.context.sources.op == crate::transform::Op::Insert {
            row.fresh = true;
        }
        if let Some(old) = row.old_key.take() {
            let to = stage_key(&row);
            match self.remove(&old) {
                // The old key's row changed earlier in this window: the destination knows it
                // by that entry's old key, or by `old` unless it is new in the window.
                Some(before) => {
                    row.old_key = before.old_key.or((!before.fresh).then(|| old.clone()));
                    row.fresh = before.fresh;
                }
                None => {
                    row.old_key = Some(old.clone());
                    row.fresh = false;
                }
            }
            // The old key may also be staged: the stage drops it, and its facts (older) win.
            for m in &mut self.moved {
                if m.1 == old {
                    m.1.clone_from(&to);
                }
            }
            // What the destination holds under the old key, if anything, goes: a key-only
            // delete the ledger names at the boundary (or nothing, without a ledger).
            let left = Row {
                event: super::ledger::deleted_event(
                    &row.event,
                    &super::ledger::Sent::nobody(),
                    "left",
                ),
                key: Some(old.clone()),
                old_key: None,
                fresh: true,
                traits_hash: None,
            };
            self.bytes += left.bytes() + old.len() as u64;
            self.entries.insert(old.clone(), left);
            self.moved.push((old, to));
        }
        let key = stage_key(&row);
        if let Some(before) = self.remove(&key) {
            merge(&mut row, before);
        }
        self.bytes += row.bytes() + key.len() as u64;
        self.entries.insert(key, row);
    }

    fn remove(&mut self, key: &str) -> Option<Row> {
        let before = self.entries.remove(key)?;
        self.bytes = self.bytes.saturating_sub(before.bytes() + key.len() as u64);
        Some(before)
    }

    /// Estimated bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Changes added since the last [`Self::take`].
    pub fn rows(&self) -> i64 {
        self.rows
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.moved.is_empty() && self.rows == 0
    }

    /// Takes the coalesced rows (by stage key) and the moved-away old keys, and empties the
    /// coalescer.
    pub fn take(&mut self) -> (Vec<(String, Row)>, Moves) {
        self.bytes = 0;
        self.rows = 0;
        let mut rows: Vec<(String, Row)> = std::mem::take(&mut self.entries).into_iter().collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        (rows, std::mem::take(&mut self.moved))
    }
}

/// Merges `row` (the later change) with `before` (the earlier state of the same key in the
/// window): the later state wins, a partial update takes the cells it lacks from the earlier
/// state, and the row keeps the window's first facts (whether it is new, the key the
/// destination knows it by).
pub fn merge(row: &mut Row, before: Row) {
    use crate::transform::EventKind;
    let both_identify =
        row.event.kind == EventKind::Identify && before.event.kind == EventKind::Identify;
    if both_identify
        && let (Some(traits), Some(earlier)) =
            (row.event.traits.as_mut(), before.event.traits.as_ref())
        && traits.is_partial()
    {
        traits.fill_from(earlier);
    }
    row.fresh = before.fresh;
    if row.old_key.is_none() {
        row.old_key = before.old_key;
    }
}

#[cfg(test)]
#[path = "window_tests.rs"]
mod tests;
