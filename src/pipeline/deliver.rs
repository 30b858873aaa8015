//! The delivering half: micro-batches (or schedule windows, see [`super::window`]), the
//! ledger's decisions, the sink, and the checkpoint transaction.

use std::collections::HashMap;

use super::*;
use crate::batch::ledger::{self, Outcome, Rules, Sent};
use crate::postgres::ledger as ledger_store;

/// Decided events, the row key each came from, and the ledger writes once they are delivered.
pub(super) struct Decided {
    pub(super) events: Vec<Event>,
    pub(super) keys: Vec<Option<String>>,
    pub(super) writes: HashMap<String, Option<Sent>>,
}

/// Ledger writes held for the next checkpoint; past this many keys a checkpoint is taken at
/// once (they are small, but bounded all the same).
const PENDING_LEDGER_MAX: usize = 100_000;

/// Counters of the stretch of delivery since the last checkpoint (one sync-run row).
pub(super) struct Stretch {
    pub(super) kind: &'static str,
    pub(super) from: Lsn,
    pub(super) rows: i64,
    pub(super) events: i64,
    /// Rows whose traits were as last sent (the ledger suppressed them).
    pub(super) unchanged: i64,
    pub(super) dead_letters: Vec<DeadLetter>,
    /// Bytes of the memory budget the dead letters hold until the checkpoint stores them.
    pub(super) dead_letter_bytes: u64,
    pub(super) started_unix_micros: i64,
}

/// Microseconds since the Unix epoch of an RFC 3339 time (an event's commit time).
fn unix_micros_of(rfc3339: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1000).ok()
}

pub(super) fn unix_micros_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl Stretch {
    pub(super) fn new(from: Lsn) -> Self {
        Stretch {
            kind: "stream",
            from,
            rows: 0,
            events: 0,
            unchanged: 0,
            dead_letters: Vec::new(),
            dead_letter_bytes: 0,
            started_unix_micros: unix_micros_now(),
        }
    }
}

/// The delivering half: batches, the sink, the checkpoint.
pub(super) struct Deliverer {
    pub(super) pipeline: String,
    pub(super) control: tokio_postgres::Client,
    pub(super) batch: MicroBatch,
    /// Everything before this position is delivered (not necessarily checkpointed).
    pub(super) durable: Lsn,
    /// A keepalive position with nothing pending before it (confirmed by a later keepalive).
    pub(super) idle: Option<Lsn>,
    /// The last keepalive's position, not yet confirmed by the next one.
    pub(super) idle_candidate: Option<Lsn>,
    /// The stored checkpoint.
    pub(super) checkpoint: Lsn,
    pub(super) last_checkpoint: Instant,
    pub(super) stretch: Stretch,
    pub(super) ack: watch::Sender<Lsn>,
    /// Checks the publication before each checkpoint, so the checkpoint never covers changes
    /// the publication withheld.
    pub(super) verifier: Arc<Verifier>,
    /// How much sync history to keep, and when it was last pruned (never, in this session).
    pub(super) history: SyncHistory,
    pub(super) last_prune: Option<Instant>,
    /// The memory budget: bytes of items go back to it once they are let go.
    pub(super) budget: Arc<MemoryBudget>,
    /// How rows are decided (mirror, ledger, whether a full sync re-sends unchanged rows).
    pub(super) rules: Rules,
    /// The full-sync generation ledger entries carry.
    pub(super) generation: i64,
    /// Ledger writes of delivered stream rows, stored with the next checkpoint.
    pub(super) pending: HashMap<String, Option<Sent>>,
    /// Builds events read back from the window stage.
    pub(super) factory: EventFactory,
    /// The followed table, quoted, for dead-letter reasons.
    pub(super) table: String,
    /// Schedule windows (`None`: realtime).
    pub(super) window: Option<super::window::Window>,
    /// `run --once`: the open window is delivered when the stream is caught up.
    pub(super) deliver_window_at_end: bool,
    /// Rows per page when a window or the ledger is delivered (`max_batch_events`).
    pub(super) page_size: usize,
    /// Writes a full sync's ledger entries alongside its delivery.
    pub(super) filler: Option<super::window::LedgerFiller>,
    /// The pipeline's config (for the filler's connection).
    pub(super) config: Arc<Config>,
    /// The run's metrics.
    pub(super) metrics: Arc<Metrics>,
    /// Commits with rows of the table not yet delivered (end LSN, Unix µs of the commit),
    /// oldest first: the delivery latency and the source lag (realtime only).
    pub(super) commits: std::collections::VecDeque<(Lsn, i64)>,
    /// Commit time (Unix µs) of the first change in the current micro-batch: a batch that
    /// waits for the destination holds the oldest change before its commit is even handled.
    pub(super) batch_oldest: Option<i64>,
}

impl Deliverer {
    pub(super) async fn run(
        &mut self,
        sink: &mut dyn Sink,
        mut rx: mpsc::Receiver<Chunk>,
    ) -> Result<Lsn, Error> {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.start_window(sink).await?;
        loop {
            let deadline = self.batch.deadline();
            let boundary = self.window.as_ref().and_then(|w| w.boundary());
            tokio::select! {
                chunk = rx.recv() => match chunk {
                    Some(items) => {
                        for (item, bytes) in items {
                            self.handle(sink, item, bytes).await?;
                        }
                        self.flush_if_starved(sink, &rx).await?;
                    }
                    None => break,
                },
                _ = self.budget.starved(), if !self.batch.is_empty() => {
                    self.flush_if_starved(sink, &rx).await?;
                }
                _ = async { if let Some(d) = deadline { tokio::time::sleep_until(d).await } }, if deadline.is_some() => {
                    self.flush(sink).await?;
                }
                _ = async { if let Some(b) = boundary { tokio::time::sleep_until(b).await } }, if boundary.is_some() => {
                    self.deliver_window(sink, "its boundary").await?;
                }
                _ = tick.tick() => {
                    self.maybe_checkpoint(false).await?;
                    self.poll_sync_request(sink).await?;
                }
            }
        }
        self.flush(sink).await?;
        if self.deliver_window_at_end && self.window.is_some() {
            self.deliver_window(sink, "`run --once` caught up").await?;
        }
        self.maybe_checkpoint(true).await?;
        Ok(self.checkpoint)
    }

    /// Delivers the batch now if the reader waits for memory and has nothing more to hand over
    /// (the channel is empty): what the batch holds is all that can free it.
    async fn flush_if_starved(
        &mut self,
        sink: &mut dyn Sink,
        rx: &mpsc::Receiver<Chunk>,
    ) -> Result<(), Error> {
        if self.budget.is_starved() && rx.is_empty() {
            self.flush(sink).await?;
        }
        Ok(())
    }

    /// Handles one item, which holds `bytes` of the memory budget.
    pub(super) async fn handle(
        &mut self,
        sink: &mut dyn Sink,
        item: Item,
        bytes: u64,
    ) -> Result<(), Error> {
        // A keepalive's WAL end may lie past a transaction the server has not sent yet (seen
        // with PostgreSQL 15 under load): it counts only once the next keepalive came with
        // nothing in between, and any other item voids it (docs/architecture.md §8).
        if !matches!(item, Item::Idle(_)) {
            self.idle = None;
            self.idle_candidate = None;
        }
        match item {
            Item::Row(row) => {
                if row.event.context.sources.op != Op::Snapshot
                    && let Some(w) = self.window.as_mut()
                {
                    w.coalescer.add(row);
                    self.budget.give_back(bytes);
                    if w.coalescer.bytes() >= w.cap {
                        self.stage_window().await?;
                    }
                    return Ok(());
                }
                if row.event.context.sources.op == Op::Snapshot && self.window_holds_rows() {
                    // Changes read before a full sync's snapshot go out before its rows.
                    self.deliver_window(sink, "a full sync starts").await?;
                }
                if self.batch.is_empty() && row.event.context.sources.op != Op::Snapshot {
                    self.batch_oldest = unix_micros_of(&row.event.original_timestamp);
                    self.publish_pending();
                }
                if self.batch.push(row, bytes) {
                    self.flush(sink).await?;
                }
                return Ok(());
            }
            Item::Truncate(template) => {
                self.truncate(sink, *template).await?;
            }
            Item::DeadLetter(d) => {
                self.stretch.dead_letters.push(*d);
                self.stretch.dead_letter_bytes += bytes;
                return Ok(());
            }
            Item::Commit {
                end_lsn,
                rows,
                commit_unix_micros,
            } => {
                self.stretch.rows += rows;
                if rows > 0 && self.window.is_none() {
                    self.commits.push_back((end_lsn, commit_unix_micros));
                    if self.commits.len() == 1 {
                        self.publish_pending();
                    }
                }
                self.batch.commit(end_lsn);
                if let Some(lsn) = self.batch.take_commit_if_empty() {
                    self.durable = self.durable.max(lsn);
                    self.settle_commits();
                }
            }
            Item::Idle(wal_end) => {
                if self.batch.is_empty()
                    && let Some(confirmed) = self.idle_candidate
                {
                    self.idle = Some(self.idle.unwrap_or(confirmed).max(confirmed));
                }
                self.idle_candidate = Some(wal_end);
            }
            Item::SyncProgress {
                rows,
                ranges_done,
                ranges_total,
            } => {
                state::record_full_sync_progress(
                    &self.control,
                    &self.pipeline,
                    rows,
                    ranges_done,
                    ranges_total,
                )
                .await?;
            }
            Item::SnapshotDone { lsn, rows } => {
                self.flush(sink).await?;
                if let Some(filler) = self.filler.take() {
                    filler.finish().await?;
                }
                self.settle_ledger_after_full_sync(sink).await?;
                self.stretch.kind = "snapshot";
                self.stretch.from = lsn;
                self.stretch.rows = rows;
                // Not yet done: a failure here makes the next run sync again in full.
                self.verifier.verify(&self.control, false).await?;
                state::finish_full_sync(&self.control, &self.pipeline, rows).await?;
                self.durable = self.durable.max(lsn);
                self.checkpoint = self.checkpoint.max(lsn);
                self.write_checkpoint(lsn).await?;
                self.metrics.full_sync_state("done");
                tracing::info!(rows, lsn = %lsn, "full sync delivered; streaming from its position");
            }
        }
        self.budget.give_back(bytes);
        Ok(())
    }

    pub(super) async fn flush(&mut self, sink: &mut dyn Sink) -> Result<(), Error> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let rows = self.batch.take_rows();
        let snapshot = rows
            .first()
            .is_some_and(|r| r.event.context.sources.op == Op::Snapshot);
        let started = Instant::now();
        let decided = self.decide(rows, None).await?;
        let decide_time = started.elapsed();
        let writes = self.send(sink, decided).await?;
        tracing::debug!(
            decide_ms = decide_time.as_millis() as u64,
            deliver_ms = (started.elapsed() - decide_time).as_millis() as u64,
            "batch delivered"
        );
        if snapshot {
            // A full sync's entries are written as its rows are delivered: it is not
            // checkpointed until done, and starts again if interrupted. They are newer than
            // what the stream before it left waiting for the checkpoint.
            for (key, _) in &writes {
                self.pending.remove(key);
            }
            if !writes.is_empty() {
                if self.filler.is_none() {
                    self.filler = Some(
                        super::window::LedgerFiller::start(&self.config, self.generation).await?,
                    );
                }
                if let Some(filler) = self.filler.as_mut() {
                    filler.write(writes).await?;
                }
            }
        } else {
            self.pending.extend(writes);
        }
        let bytes = self.batch.bytes();
        self.metrics.batch_size(bytes);
        self.batch_oldest = None;
        if let Some(lsn) = self.batch.delivered() {
            self.durable = self.durable.max(lsn);
        }
        self.settle_commits();
        self.budget.give_back(bytes);
        if self.pending.len() >= PENDING_LEDGER_MAX {
            self.commit_checkpoint(self.durable).await?;
        }
        Ok(())
    }

    /// Observes the delivery latency of the commits the delivered position now covers, and
    /// reports the oldest one still waiting (the source lag).
    fn settle_commits(&mut self) {
        while let Some(&(lsn, micros)) = self.commits.front() {
            if lsn > self.durable {
                break;
            }
            self.metrics.delivered_change(micros);
            self.commits.pop_front();
        }
        self.publish_pending();
    }

    /// Publishes the commit time of the oldest change not yet delivered (the source lag).
    fn publish_pending(&self) {
        let queued = self.commits.front().map(|&(_, micros)| micros);
        let oldest = match (queued, self.batch_oldest) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.metrics.oldest_pending(oldest);
    }

    /// Decides what `rows` become against the ledger (see [`ledger::decide`]): the events to
    /// send, and the ledger writes once they are delivered (each key once, the last write
    /// wins). `moved` gives the entries the rows' old keys had, when a window resolved them
    /// beforehand (see [`ledger_store::resolve_moves`]); otherwise they are looked up.
    pub(super) async fn decide(
        &mut self,
        rows: Vec<Row>,
        moved: Option<Vec<Option<Sent>>>,
    ) -> Result<Decided, Error> {
        let mut found = HashMap::new();
        if self.rules.ledger {
            let mut need: Vec<String> = Vec::new();
            for r in rows.iter().filter(|r| self.needs_lookup(r)) {
                for k in [&r.key, &r.old_key].into_iter().flatten() {
                    if !self.pending.contains_key(k) {
                        need.push(k.clone());
                    }
                }
            }
            need.sort_unstable();
            need.dedup();
            found = ledger_store::lookup(&self.control, &self.pipeline, &need).await?;
        }
        let mut overlay: HashMap<String, Option<Sent>> = HashMap::new();
        let entry = |k: &str,
                     overlay: &HashMap<String, Option<Sent>>,
                     pending: &HashMap<String, Option<Sent>>| {
            overlay
                .get(k)
                .or_else(|| pending.get(k))
                .cloned()
                .unwrap_or_else(|| found.get(k).cloned())
        };
        let mut moved = moved.map(Vec::into_iter);
        let mut unchanged = 0u64;
        let mut events = Vec::with_capacity(rows.len());
        let mut keys = Vec::with_capacity(rows.len());
        for row in rows {
            let moved_from = match moved.as_mut() {
                Some(m) => m.next().flatten(),
                None => row
                    .old_key
                    .as_deref()
                    .and_then(|k| entry(k, &overlay, &self.pending)),
            };
            // The old key's entry leaves the ledger (a window's moves left it beforehand).
            if self.rules.ledger
                && moved.is_none()
                && let Some(old) = &row.old_key
            {
                overlay.insert(old.clone(), None);
            }
            let current = row
                .key
                .as_deref()
                .and_then(|k| entry(k, &overlay, &self.pending));
            let template = (row.event.message_id, row.event.context.sources.lsn.clone());
            let d = ledger::decide(row, current.as_ref(), moved_from.as_ref(), self.rules);
            match d.outcome {
                Outcome::Unchanged => {
                    self.stretch.unchanged += 1;
                    unchanged += 1;
                }
                Outcome::Unidentified => {
                    let dead = DeadLetter {
                        lsn: template.1.parse().unwrap_or(Lsn::ZERO),
                        op: Op::Delete.as_str(),
                        reason: mapper::unidentified_delete_reason(&self.table),
                        payload: serde_json::Value::Object(serde_json::Map::new()),
                        message_id: template.0,
                    };
                    self.stretch.dead_letters.push(dead);
                }
                Outcome::Sent | Outcome::Skipped => {}
            }
            for e in d.events {
                keys.push(d.writes.first().map(|(k, _)| k.clone()));
                events.push(e);
            }
            if self.rules.ledger {
                overlay.extend(d.writes);
            }
        }
        self.metrics.unchanged(unchanged);
        Ok(Decided {
            events,
            keys,
            writes: overlay,
        })
    }

    /// Whether deciding `row` needs its stored ledger entry. An insert's key has none to speak
    /// of (a delete removed it; in upsert mode an entry left by a delete only spares a
    /// re-insert of identical traits), and a full sync that re-sends every row sends it
    /// whatever the entry says: their entries are written, never read, which spares the
    /// database a lookup per inserted or snapshot row.
    fn needs_lookup(&self, row: &Row) -> bool {
        match row.event.context.sources.op {
            Op::Insert => row.old_key.is_some(),
            Op::Snapshot => !self.rules.resend_snapshot,
            Op::Update | Op::Delete => true,
        }
    }

    /// Delivers decided events (retried for the batch by the sink's policy) and returns the
    /// ledger writes of what the destination took: an event it refused for good is a dead
    /// letter (stored with the next checkpoint), and its row's ledger entry stays as it was.
    pub(super) async fn send(
        &mut self,
        sink: &mut dyn Sink,
        mut decided: Decided,
    ) -> Result<Vec<(String, Option<Sent>)>, Error> {
        let refused = sink::retry::deliver(sink, &mut decided.events).await?;
        self.metrics
            .batch_delivered(decided.events.len(), refused.len());
        self.stretch.events += (decided.events.len() - refused.len()) as i64;
        if !refused.is_empty() {
            let ids: std::collections::HashSet<uuid::Uuid> =
                refused.iter().map(|d| d.message_id).collect();
            for (e, key) in decided.events.iter().zip(&decided.keys) {
                if ids.contains(&e.message_id)
                    && let Some(k) = key
                {
                    decided.writes.remove(k);
                }
            }
            self.stretch.dead_letters.extend(refused);
        }
        Ok(decided.writes.into_iter().collect())
    }

    /// Commits a checkpoint when one is due: every [`CHECKPOINT_INTERVAL`] while rows of the
    /// table were delivered or dead-lettered; every [`IDLE_CHECKPOINT_INTERVAL`] when only the
    /// position moved (keepalives, transactions without rows of the table), and then only once
    /// it moved by [`IDLE_CHECKPOINT_MIN_ADVANCE`]: a quiet server's checkpoint row stays
    /// untouched. `force` (the end of a session) commits any move.
    pub(super) async fn maybe_checkpoint(&mut self, force: bool) -> Result<(), Error> {
        let since = self.last_checkpoint.elapsed();
        let to = self.durable.max(self.idle.unwrap_or(Lsn::ZERO));
        let moved = to > self.checkpoint;
        // A window's rows (and the rows and dead letters counted with them) are staged: its
        // sync run is recorded when it is delivered.
        if let Some(w) = &self.window
            && (!w.coalescer.is_empty()
                || self.stretch.rows > 0
                || !self.stretch.dead_letters.is_empty())
        {
            if force || since >= CHECKPOINT_INTERVAL {
                return self.stage_window().await;
            }
            return Ok(());
        }
        let delivered = self.stretch.rows > 0 || self.stretch.events > 0;
        let dead_letters = !self.stretch.dead_letters.is_empty();
        let has_progress = (delivered && self.durable > self.checkpoint) || dead_letters;
        let idle_progress = moved
            && (force || to.as_u64() - self.checkpoint.as_u64() >= IDLE_CHECKPOINT_MIN_ADVANCE);
        let due = (has_progress && (force || since >= CHECKPOINT_INTERVAL))
            || (idle_progress && (force || since >= IDLE_CHECKPOINT_INTERVAL));
        if due {
            self.commit_checkpoint(to).await?;
        }
        Ok(())
    }

    /// Verifies the publication, then records the checkpoint at `to`.
    pub(super) async fn commit_checkpoint(&mut self, to: Lsn) -> Result<(), Error> {
        self.verifier.verify(&self.control, true).await?;
        self.write_checkpoint(to).await
    }

    /// Records the checkpoint at `to` (and the stretch's sync run) and acknowledges it.
    pub(super) async fn write_checkpoint(&mut self, to: Lsn) -> Result<(), Error> {
        self.write_checkpoint_with(to, None).await
    }

    /// [`Self::write_checkpoint`], staging window rows in the same transaction.
    pub(super) async fn write_checkpoint_with(
        &mut self,
        to: Lsn,
        stage: Option<state::StageWrite>,
    ) -> Result<(), Error> {
        let to = to.max(self.checkpoint);
        let staged = stage.as_ref().map_or(0, |s| s.rows.len() as i64);
        let commit = CheckpointCommit {
            unchanged: self.stretch.unchanged,
            ledger: self.pending.drain().collect(),
            generation: self.generation,
            stage,
            from: self.stretch.from,
            to,
            kind: self.stretch.kind,
            rows: self.stretch.rows,
            events: self.stretch.events,
            dead_letters: std::mem::take(&mut self.stretch.dead_letters),
            started_unix_micros: self.stretch.started_unix_micros,
        };
        let stored = state::commit_checkpoint(&mut self.control, &self.pipeline, &commit).await?;
        self.metrics.checkpointed(stored);
        self.metrics.dead_lettered(commit.dead_letters.len() as u64);
        if let Some(w) = self.window.as_mut() {
            w.staged += staged;
        }
        self.budget.give_back(self.stretch.dead_letter_bytes);
        tracing::debug!(to = %to, durable = %self.durable, idle = ?self.idle, staged = staged, "checkpoint write");
        if commit.events > 0 || !commit.dead_letters.is_empty() {
            tracing::debug!(from = %commit.from, to = %stored, events = commit.events, "checkpoint");
        }
        self.checkpoint = stored;
        self.durable = self.durable.max(stored);
        self.last_checkpoint = Instant::now();
        self.stretch = Stretch::new(stored);
        let _ = self.ack.send(stored);
        if self
            .last_prune
            .is_none_or(|at| at.elapsed() >= HISTORY_PRUNE_INTERVAL)
        {
            self.last_prune = Some(Instant::now());
            let pruned = state::prune_sync_runs(
                &self.control,
                &self.pipeline,
                self.history.retention,
                i64::from(self.history.keep_runs),
            )
            .await?;
            if pruned > 0 {
                tracing::debug!(pruned, "sync history pruned");
            }
        }
        Ok(())
    }
}
