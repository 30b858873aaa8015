//! Batching between the decoder and the sink.
//!
//! Realtime mode delivers micro-batches: a batch is delivered when it holds
//! `max_batch_events` events, when its estimated size reaches the memory limit, or when its
//! first event has waited `max_batch_delay`. Batches may end inside a transaction (so a huge
//! transaction never has to fit in memory); the position a delivered batch makes durable is the
//! end of the **last transaction whose commit it contains** — a partial transaction is resent
//! after a crash, never skipped (at least once).

use std::time::Duration;

use tokio::time::Instant;

use crate::Lsn;
use crate::transform::Event;

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

/// Events waiting for delivery, and the commit positions they complete.
#[derive(Debug)]
pub struct MicroBatch {
    limits: BatchLimits,
    events: Vec<Event>,
    bytes: u64,
    deadline: Option<Instant>,
    /// End LSN of the last commit seen after (or with) the buffered events.
    last_commit: Option<Lsn>,
}

/// Rough in-memory size of an event, for the memory bound (traits dominate).
fn estimate_bytes(e: &Event) -> u64 {
    let traits = e
        .traits
        .as_ref()
        .map(|t| {
            t.iter()
                .map(|(k, v)| k.len() + estimate_value(v))
                .sum::<usize>()
        })
        .unwrap_or(0);
    (512 + traits) as u64
}

fn estimate_value(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::String(s) => 24 + s.len(),
        serde_json::Value::Array(a) => 24 + a.iter().map(estimate_value).sum::<usize>(),
        serde_json::Value::Object(o) => {
            48 + o
                .iter()
                .map(|(k, v)| k.len() + estimate_value(v))
                .sum::<usize>()
        }
        serde_json::Value::Number(n) => 24 + n.as_str().len(),
        _ => 16,
    }
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

    /// Adds an event; returns true when the batch is full and must be delivered now.
    pub fn push(&mut self, event: Event) -> bool {
        if self.events.is_empty() {
            self.deadline = Some(Instant::now() + self.limits.max_delay);
        }
        self.bytes += estimate_bytes(&event);
        self.events.push(event);
        self.events.len() >= self.limits.max_events || self.bytes >= self.limits.max_bytes
    }

    /// Records a commit: once the events before it are delivered, `end_lsn` is durable.
    pub fn commit(&mut self, end_lsn: Lsn) {
        self.last_commit = Some(end_lsn);
    }

    /// Whether any event is waiting.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Number of buffered events.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// When the oldest event's delay runs out.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The buffered events, for the sink.
    pub fn events_mut(&mut self) -> &mut [Event] {
        &mut self.events
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
        if self.events.is_empty() {
            self.last_commit.take()
        } else {
            None
        }
    }
}
