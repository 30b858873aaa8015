//! Batching between the decoder and the sink, and the memory budget of rows in flight.
//!
//! Realtime mode delivers micro-batches: a batch is delivered when it holds
//! `max_batch_events` events, when its estimated size reaches its share of the memory limit
//! (see [`budget`]), or when its first event has waited `max_batch_delay`. Batches may end
//! inside a transaction (so a huge transaction never has to fit in memory); the position a
//! delivered batch makes durable is the end of the **last transaction whose commit it
//! contains** — a partial transaction is resent after a crash, never skipped (at least once).

pub mod budget;
pub mod ledger;
pub mod schedule;
pub mod window;

use std::time::Duration;

use tokio::time::Instant;

use crate::Lsn;
use crate::transform::Event;

/// A row change on its way to the destination, with what coalescing and the ledger need.
#[derive(Debug, Clone)]
pub struct Row {
    /// The identify (insert, update, snapshot) or `Record Deleted` (delete) event. A key-only
    /// delete's event may name no user yet: the ledger names it (see [`ledger`]).
    pub event: Event,
    /// The row's key (its primary key, or replica identity index, cells as a JSON array of
    /// text): what coalescing and the ledger go by. `None`: the table has no such key, the row
    /// is neither coalesced nor in the ledger.
    pub key: Option<String>,
    /// An update that changed the key: the key the row had before.
    pub old_key: Option<String>,
    /// The row did not exist before the window it is in (its first change in the window was an
    /// insert): a delete of it in the same window sends nothing.
    pub fresh: bool,
    /// The ledger's hash of `event` ([`ledger::traits_hash`]), when the reader computed it
    /// from the traits JSON it wrote for the messageId anyway (a full sync's rows); `None`:
    /// computed when needed. Whatever changes the event's identifiers or traits clears it.
    pub traits_hash: Option<[u8; 32]>,
}

impl Row {
    /// A row without ledger or coalescing information.
    pub fn plain(event: Event) -> Row {
        Row {
            event,
            key: None,
            old_key: None,
            fresh: false,
            traits_hash: None,
        }
    }

    /// Estimated memory the row holds.
    pub fn bytes(&self) -> u64 {
        event_bytes(&self.event)
            + self.key.as_ref().map_or(0, |k| heap(k.len()) as u64)
            + self.old_key.as_ref().map_or(0, |k| heap(k.len()) as u64)
    }
}

/// The bounds of a micro-batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Deliver at this many events.
    pub max_events: usize,
    /// Deliver when the first event has waited this long.
    pub max_delay: Duration,
    /// Deliver when the estimated size of the buffered events reaches this many bytes.
    pub max_bytes: u64,
}

/// Rows waiting for delivery, and the commit positions they complete.
#[derive(Debug)]
pub struct MicroBatch {
    limits: BatchLimits,
    events: Vec<Row>,
    bytes: u64,
    deadline: Option<Instant>,
    /// End LSN of the last commit seen after (or with) the buffered events.
    last_commit: Option<Lsn>,
}

/// Estimated memory an event holds (its struct, and its traits' values on the heap): what the
/// memory budget counts. An estimate that is too low lets memory outgrow `memory_limit`, so it
/// follows how the values are laid out (see [`value_bytes`]).
pub fn event_bytes(e: &Event) -> u64 {
    // The struct, ids, context and timestamps: a few hundred bytes, mostly shared strings.
    let fixed = 512
        + e.user_id.as_ref().map_or(0, |s| heap(s.len()))
        + e.anonymous_id.as_ref().map_or(0, |s| heap(s.len()));
    let traits = e.traits.as_ref().map_or(0, |t| heap(t.allocated_bytes()));
    let properties = e.properties.as_ref().map_or(0, |p| {
        map_heap(p.len())
            + p.iter()
                .map(|(k, v)| heap(k.len()) + value_heap(v))
                .sum::<usize>()
    });
    (fixed + traits + properties) as u64
}

/// Estimated memory of a JSON value held in a struct: its own 32 bytes and what it owns.
pub fn value_bytes(v: &serde_json::Value) -> u64 {
    (VALUE + value_heap(v)) as u64
}

/// Size of a `serde_json::Value` and of an `Option<Value>` (72 bytes: with `preserve_order` an
/// object's map is held inline).
const VALUE: usize = std::mem::size_of::<serde_json::Value>();
/// Size of an entry of an insertion-ordered map: hash, key, value.
const ENTRY: usize = std::mem::size_of::<usize>() + std::mem::size_of::<String>() + VALUE;

/// Bytes an allocation of `n` bytes takes from the allocator: glibc rounds a request up to 16
/// bytes plus an 8-byte header, 32 at least.
fn heap(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (n + 8).div_ceil(16).max(2) * 16
    }
}

/// Heap a value owns. Parsed JSON grows by doubling: arrays to a power of two (4 at least);
/// objects (insertion-ordered maps) keep [`ENTRY`]-sized entries plus a hash index of 9 bytes
/// a slot. Checked against the allocator by a unit test: exact for parsed JSON.
fn value_heap(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::String(s) => heap(s.len()),
        // `arbitrary_precision`: a number is its digits.
        serde_json::Value::Number(n) => heap(n.as_str().len()),
        serde_json::Value::Array(a) => {
            let cap = if a.is_empty() {
                0
            } else {
                a.len().next_power_of_two().max(4)
            };
            heap(cap * VALUE) + a.iter().map(value_heap).sum::<usize>()
        }
        serde_json::Value::Object(o) => {
            map_heap(o.len())
                + o.iter()
                    .map(|(k, v)| heap(k.len()) + value_heap(v))
                    .sum::<usize>()
        }
        serde_json::Value::Null | serde_json::Value::Bool(_) => 0,
    }
}

/// Heap of an insertion-ordered map's tables for `n` entries (entries as many as its index has
/// usable slots; the index grows 4, 8, 16… slots, 7/8 of them usable from 8 on).
fn map_heap(n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    let slots = if n <= 3 {
        4
    } else if n <= 7 {
        8
    } else {
        (n * 8).div_ceil(7).next_power_of_two()
    };
    let usable = if slots <= 8 { slots - 1 } else { slots / 8 * 7 };
    heap(usable * ENTRY) + heap(slots * 9 + 16)
}

impl MicroBatch {
    /// An empty batch with these bounds.
    pub fn new(limits: BatchLimits) -> Self {
        MicroBatch {
            limits,
            events: Vec::with_capacity(limits.max_events.min(8192)),
            bytes: 0,
            deadline: None,
            last_commit: None,
        }
    }

    /// Adds a row that holds `bytes` of the memory budget (see [`Row::bytes`]); returns true
    /// when the batch is full and must be delivered now.
    pub fn push(&mut self, event: Row, bytes: u64) -> bool {
        if self.events.is_empty() {
            self.deadline = Some(Instant::now() + self.limits.max_delay);
        }
        self.bytes += bytes;
        self.events.push(event);
        self.events.len() >= self.limits.max_events || self.bytes >= self.limits.max_bytes
    }

    /// Records a commit: once the events before it are delivered, `end_lsn` is durable.
    pub fn commit(&mut self, end_lsn: Lsn) {
        self.last_commit = Some(end_lsn);
    }

    /// Whether any row is waiting (or taken and not yet delivered).
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.bytes == 0
    }

    /// Bytes of the memory budget the buffered events hold.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Number of buffered events.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// When the oldest event's delay runs out.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Takes the buffered rows for delivery; their bytes stay counted until [`Self::delivered`].
    pub fn take_rows(&mut self) -> Vec<Row> {
        std::mem::take(&mut self.events)
    }

    /// Empties the batch after a successful delivery; returns the commit position it made
    /// durable, if it contained a commit.
    pub fn delivered(&mut self) -> Option<Lsn> {
        self.events.clear();
        self.bytes = 0;
        self.deadline = None;
        self.last_commit.take()
    }

    /// Takes a commit position recorded while no event was buffered (nothing to deliver).
    pub fn take_commit_if_empty(&mut self) -> Option<Lsn> {
        if self.is_empty() {
            self.last_commit.take()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    use super::*;

    /// Counts, on the threads that ask for it, what the allocator hands out, in glibc's
    /// rounding (see [`heap`]): the estimate is checked against real allocations.
    struct Counting;

    thread_local! {
        static COUNTING: Cell<bool> = const { Cell::new(false) };
        static LIVE: Cell<isize> = const { Cell::new(0) };
    }

    fn count(add: usize, remove: usize) {
        if COUNTING.with(Cell::get) {
            LIVE.with(|l| l.set(l.get() + heap(add) as isize - heap(remove) as isize));
        }
    }

    // SAFETY: every call is passed on to the system allocator unchanged.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            count(layout.size(), 0);
            // SAFETY: the caller upholds `alloc`'s contract.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            count(0, layout.size());
            // SAFETY: the caller upholds `dealloc`'s contract.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            count(new_size, layout.size());
            // SAFETY: the caller upholds `realloc`'s contract.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: Counting = Counting;

    /// Heap bytes that parsing `text` leaves allocated (the parsed value's).
    fn parsed(text: &str) -> (serde_json::Value, usize) {
        LIVE.with(|l| l.set(0));
        COUNTING.with(|c| c.set(true));
        let value: serde_json::Value = serde_json::from_str(text).unwrap();
        COUNTING.with(|c| c.set(false));
        (value, LIVE.with(Cell::get) as usize)
    }

    #[test]
    fn the_estimate_of_parsed_json_is_what_the_allocator_handed_out() {
        let mut items = String::from("{\"items\": [");
        for j in 1..=2000 {
            if j > 1 {
                items.push_str(", ");
            }
            items.push_str(&format!(
                "{{\"i\": {j}, \"name\": \"item {j}\", \"tags\": [\"a\", {j}.5, true, null]}}"
            ));
        }
        items.push_str("], \"row\": 5}");
        let blob = format!("{{\"blob\": \"{}\"}}", "x".repeat(100_000));
        let mixed = r#"{"a": 1, "b": "text", "c": [], "d": {}, "e": [1, 2, 3, 4, 5],
                        "f": {"g": {"h": ["i", -1.5e10, false]}}, "k": "\u00e9\n"}"#;
        for text in [items.as_str(), blob.as_str(), mixed, "[]", "\"\"", "0"] {
            let (value, allocated) = parsed(text);
            assert_eq!(
                value_heap(&value),
                allocated,
                "{}",
                &text[..text.len().min(60)]
            );
        }
        // Parsed objects take several times their text: the budget must count that.
        let (value, _) = parsed(&items);
        assert!(value_bytes(&value) > 5 * items.len() as u64);
    }
}
