//! The memory budget: `[schedule] memory_limit` split between the stages that hold rows in
//! flight, counted in bytes (see `docs/architecture.md`, "Memory").
//!
//! ```text
//!  server ─► replication buffer ─► reader ─► outbox ─► channel ─► batch ─► sink buffer ─► destination
//!            (events, 1/8)                   └─────── in flight: 3/8 ───────┘ (≤ batch)
//!                                            (batch: 3/16)
//!                                            dead letters waiting for a checkpoint: in flight
//! ```
//!
//! - **Replication buffer** (1/8): `pgwire-replication` buffers the messages its worker read
//!   from the server in a channel counted in events, not bytes. Its capacity is chosen so that
//!   [`REFERENCE_ROW`]-sized rows fill exactly this share; narrower rows take less. Wider rows
//!   take up to [`MemoryPlan::replication_events`] × their width: the crate has no byte bound.
//! - **In flight** (3/8): every item the reader has made and the deliverer not yet let go of —
//!   the outbox, the reader → deliverer channel, the micro-batch, dead letters waiting for the
//!   checkpoint that records them. The reader takes an item's estimated size (see
//!   [`super::event_bytes`]) from a [`MemoryBudget`] before queueing it and waits while the
//!   budget is spent; the deliverer gives the bytes back once the item is let go (events: when
//!   their batch is durable at the destination; dead letters: when the checkpoint transaction
//!   that stores them committed; commits and keepalives: when handled). The reader holds at
//!   most one more item: the one it waits to queue.
//! - **Batch** (3/16, inside the in-flight share): a micro-batch is delivered as soon as its
//!   events' estimated size reaches this, so the channel keeps the rest moving while a batch is
//!   written.
//! - **Sink buffer** (up to the batch's share): a sink encodes a batch before writing it; its
//!   JSON text is smaller than the batch's parsed values (several times smaller for objects).
//! - **Headroom** (the remaining 5/16): what the allocator keeps beyond the live bytes. With
//!   glibc's per-thread arenas, memory freed by one thread is reused by another only in part:
//!   measured on wide rows, peak RSS is about 1.6 × the live bytes at large limits.
//!
//! Never a deadlock, never a drop: an item larger than the whole in-flight share takes all of it
//! and passes alone, once everything before it is delivered; and when the reader waits for
//! bytes with nothing left to hand over, the deliverer delivers its batch early.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

/// The row width the replication buffer is sized for: rows up to this wide keep it within its
/// share of the budget.
pub const REFERENCE_ROW: u64 = 256 * 1024;
/// The fewest events the replication buffer holds, whatever the budget: a handful keep the
/// replication worker and the reader from waking each other for every message.
pub const MIN_REPLICATION_EVENTS: usize = 8;
/// The most events the replication buffer holds (`pgwire-replication`'s default).
pub const MAX_REPLICATION_EVENTS: usize = 8192;

/// How `memory_limit` is split between the stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Capacity of `pgwire-replication`'s event buffer, in events.
    pub replication_events: usize,
    /// Bytes of items in flight between the reader and the destination (see [`MemoryBudget`]).
    pub in_flight: u64,
    /// A micro-batch is delivered when its events reach this many bytes.
    pub batch: u64,
}

impl MemoryPlan {
    /// The split of `memory_limit` bytes: 1/8 for the replication buffer, 3/8 for items in
    /// flight (of which 3/16 for the batch), the batch's share again for the sink's encoding
    /// buffer, and the rest as headroom for the allocator.
    pub fn new(memory_limit: u64) -> Self {
        let eighth = memory_limit / 8;
        let replication_events = usize::try_from(eighth / REFERENCE_ROW)
            .unwrap_or(MAX_REPLICATION_EVENTS)
            .clamp(MIN_REPLICATION_EVENTS, MAX_REPLICATION_EVENTS);
        MemoryPlan {
            replication_events,
            in_flight: (3 * eighth).max(1),
            batch: (3 * eighth / 2).max(1),
        }
    }
}

/// A byte budget shared by its takers (the reader, or a parallel full sync's workers) and one
/// giver, the deliverer.
///
/// Takers that have to wait take turns (first come, first served): one at a time registers
/// what it wants, so a give-back always wakes the one that waits, and the deliverer's
/// starvation signal speaks for it. Taking never fails and never drops: a request larger than the budget is cut down to the
/// whole budget, so the item waits until everything else is given back and then passes alone.
#[derive(Debug)]
pub struct MemoryBudget {
    /// The whole budget.
    capacity: u64,
    /// Bytes free now.
    free: AtomicU64,
    /// What the reader waits for (0: it does not wait).
    wanted: AtomicU64,
    /// Wakes the reader when bytes are given back.
    freed: Notify,
    /// Wakes the deliverer when the reader starts waiting.
    starving: Notify,
    /// The turn of the taker that waits (the others wait for it, in order).
    turn: tokio::sync::Mutex<()>,
}

impl MemoryBudget {
    /// A budget of `bytes`.
    pub fn new(bytes: u64) -> Arc<Self> {
        let capacity = bytes.max(1);
        Arc::new(MemoryBudget {
            capacity,
            free: AtomicU64::new(capacity),
            wanted: AtomicU64::new(0),
            freed: Notify::new(),
            starving: Notify::new(),
            turn: tokio::sync::Mutex::new(()),
        })
    }

    /// Takes `bytes` (cut down to the whole budget) if they are free now; returns what was
    /// taken, to give back later.
    pub fn try_take(&self, bytes: u64) -> Option<u64> {
        let n = bytes.min(self.capacity);
        self.free
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |free| {
                free.checked_sub(n)
            })
            .ok()
            .map(|_| n)
    }

    /// Takes `bytes`, waiting until they are free; returns what was taken. While it waits, the
    /// deliverer is told (see [`MemoryBudget::starved`]) so that it delivers what it holds.
    pub async fn take(&self, bytes: u64) -> u64 {
        let n = bytes.min(self.capacity);
        // Cancel-safe: a dropped wait gives up its turn and has taken nothing.
        let _turn = self.turn.lock().await;
        loop {
            if let Some(taken) = self.try_take(n) {
                self.wanted.store(0, Ordering::Release);
                return taken;
            }
            // Registered before the second look, so a give-back in between still wakes us.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            self.wanted.store(n, Ordering::Release);
            if let Some(taken) = self.try_take(n) {
                self.wanted.store(0, Ordering::Release);
                return taken;
            }
            self.starving.notify_one();
            freed.await;
        }
    }

    /// Gives back bytes taken earlier.
    pub fn give_back(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        self.free.fetch_add(bytes, Ordering::AcqRel);
        if self.wanted.load(Ordering::Acquire) > 0 {
            self.freed.notify_one();
        }
    }

    /// Whether the reader waits for more bytes than are free now.
    pub fn is_starved(&self) -> bool {
        let wanted = self.wanted.load(Ordering::Acquire);
        wanted > 0 && self.free.load(Ordering::Acquire) < wanted
    }

    /// Completes when the reader has started waiting for bytes (at once if it did since the
    /// last call); check [`MemoryBudget::is_starved`], it may have been served since.
    pub async fn starved(&self) {
        self.starving.notified().await;
    }

    /// Bytes free now.
    pub fn available(&self) -> u64 {
        self.free.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_plan_splits_the_limit_and_sizes_the_replication_buffer() {
        let p = MemoryPlan::new(16 * 1024 * 1024);
        assert_eq!(p.in_flight, 6 * 1024 * 1024);
        assert_eq!(p.batch, 3 * 1024 * 1024);
        assert_eq!(p.replication_events, 8);
        let p = MemoryPlan::new(256 * 1024 * 1024);
        assert_eq!(p.replication_events, 128);
        assert_eq!(MemoryPlan::new(1024 * 1024).replication_events, 8);
        assert_eq!(MemoryPlan::new(1 << 50).replication_events, 8192);
    }

    #[tokio::test]
    async fn takes_wait_for_give_backs_and_oversized_items_pass_alone() {
        let budget = MemoryBudget::new(100);
        assert_eq!(budget.try_take(60), Some(60));
        assert_eq!(budget.try_take(60), None);
        assert!(!budget.is_starved());
        // Larger than the whole budget: cut down to it, so it waits for everything.
        let waiting = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.take(1_000).await })
        };
        budget.starved().await;
        assert!(budget.is_starved());
        budget.give_back(30);
        assert!(budget.is_starved(), "70 free, 100 wanted");
        budget.give_back(30);
        // Enough is free: no longer starved, even before the reader has run again.
        assert!(!budget.is_starved());
        assert_eq!(waiting.await.unwrap(), 100);
        assert!(!budget.is_starved());
        assert_eq!(budget.available(), 0);
        budget.give_back(100);
        assert_eq!(budget.available(), 100);
    }

    #[tokio::test]
    async fn several_waiting_takers_are_each_served_in_turn() {
        // A parallel full sync's workers share the budget: each give-back must reach a taker
        // still waiting, not only the first one that registered.
        let budget = MemoryBudget::new(90);
        assert_eq!(budget.try_take(90), Some(90));
        let mut takers: Vec<_> = (0..3)
            .map(|_| {
                let budget = budget.clone();
                tokio::spawn(async move { budget.take(30).await })
            })
            .collect();
        budget.starved().await;
        for _ in 0..3 {
            budget.give_back(30);
            let served = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    if let Some(i) = takers.iter().position(|t| t.is_finished()) {
                        return takers.swap_remove(i).await.expect("taker");
                    }
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("a give-back serves a waiting taker");
            assert_eq!(served, 30);
        }
        assert_eq!(budget.available(), 0);
    }
}
