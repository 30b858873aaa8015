//! The delivering half: micro-batches, the sink, and the checkpoint transaction.

use super::*;

/// Counters of the stretch of delivery since the last checkpoint (one sync-run row).
pub(super) struct Stretch {
    pub(super) kind: &'static str,
    pub(super) from: Lsn,
    pub(super) rows: i64,
    pub(super) events: i64,
    pub(super) dead_letters: Vec<DeadLetter>,
    /// Bytes of the memory budget the dead letters hold until the checkpoint stores them.
    pub(super) dead_letter_bytes: u64,
    pub(super) started_unix_micros: i64,
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
    /// A keepalive position with nothing pending before it.
    pub(super) idle: Option<Lsn>,
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
}

impl Deliverer {
    pub(super) async fn run(
        &mut self,
        sink: &mut dyn Sink,
        mut rx: mpsc::Receiver<Chunk>,
    ) -> Result<Lsn, Error> {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.batch.deadline();
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
                _ = tick.tick() => self.maybe_checkpoint(false).await?,
            }
        }
        self.flush(sink).await?;
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
        match item {
            Item::Event(e) => {
                self.stretch.events += 1;
                if self.batch.push(e, bytes) {
                    self.flush(sink).await?;
                }
                return Ok(());
            }
            Item::DeadLetter(d) => {
                self.stretch.dead_letters.push(*d);
                self.stretch.dead_letter_bytes += bytes;
                return Ok(());
            }
            Item::Commit { end_lsn, rows } => {
                self.stretch.rows += rows;
                self.batch.commit(end_lsn);
                if let Some(lsn) = self.batch.take_commit_if_empty() {
                    self.durable = self.durable.max(lsn);
                }
            }
            Item::Idle(wal_end) => {
                if self.batch.is_empty() {
                    self.idle = Some(self.idle.unwrap_or(wal_end).max(wal_end));
                }
            }
            Item::SnapshotDone { lsn, rows } => {
                self.flush(sink).await?;
                self.stretch.kind = "snapshot";
                self.stretch.from = lsn;
                self.stretch.rows = rows;
                // Not yet done: a failure here makes the next run sync again in full.
                self.verifier.verify(&self.control, false).await?;
                state::finish_full_sync(&self.control, &self.pipeline, rows).await?;
                self.durable = self.durable.max(lsn);
                self.checkpoint = self.checkpoint.max(lsn);
                self.write_checkpoint(lsn).await?;
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
        // Retried for the batch inside the sink's retry policy; what the destination refused
        // for good comes back as dead letters, stored with the next checkpoint.
        let refused = sink::retry::deliver(sink, self.batch.events_mut()).await?;
        self.stretch.dead_letters.extend(refused);
        let bytes = self.batch.bytes();
        if let Some(lsn) = self.batch.delivered() {
            self.durable = self.durable.max(lsn);
        }
        self.budget.give_back(bytes);
        Ok(())
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
        let to = to.max(self.checkpoint);
        let commit = CheckpointCommit {
            from: self.stretch.from,
            to,
            kind: self.stretch.kind,
            rows: self.stretch.rows,
            events: self.stretch.events,
            dead_letters: std::mem::take(&mut self.stretch.dead_letters),
            started_unix_micros: self.stretch.started_unix_micros,
        };
        let stored = state::commit_checkpoint(&mut self.control, &self.pipeline, &commit).await?;
        self.budget.give_back(self.stretch.dead_letter_bytes);
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
