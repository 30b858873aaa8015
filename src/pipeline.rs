//! The pipeline: the stages wired with a bounded channel, and the ack → checkpoint loop.
//!
//! ```text
//!  reader (this task)                         deliverer (spawned task)
//!  ─ full sync: COPY rows ─┐                  ┌─ MicroBatch ─ Sink::deliver (durable)
//!  ─ stream: pgoutput ─────┼─ Item channel ──►┤─ checkpoint: one transaction in _rudderstack
//!    decode, transform     │  (bounded)       └─ ack watch ──► reader: update_applied_lsn
//! ```
//!
//! Invariants kept here (DESIGN.md §8):
//! 1. The deliverer moves the checkpoint only to the end of a transaction all of whose events
//!    the sink confirmed, and the reader reports to the slot only positions the deliverer
//!    checkpointed: `confirmed_flush_lsn ≤ checkpoint ≤ delivered`.
//! 2. The checkpoint only moves forward (the UPDATE takes `greatest`), at commit boundaries, or
//!    to a keepalive's WAL end received outside a transaction with nothing pending.
//! 3. A restart (crash, kill -9, server restart, destination outage) resumes at the checkpoint:
//!    the whole session is rebuilt from the stored state, never from memory.
//! 4. The channel blocks when full, so memory is bounded by its capacity plus one batch,
//!    whatever the transaction, table or window size.
//!
//! One shutdown path: SIGTERM or Ctrl-C stops the reader; the deliverer drains the channel,
//! delivers, checkpoints, and the final position is acknowledged before exit.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use pgwire_replication::{ReplicationClient, ReplicationEvent};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::Lsn;
use crate::batch::{BatchLimits, MicroBatch};
use crate::config::{Config, SyncMode};
use crate::decode::pgoutput::{Cell, LogicalMessage, PgoutputDecoder, TupleData};
use crate::decode::relation::RelationCache;
use crate::decode::value::TypeCatalog;
use crate::error::Error;
use crate::postgres::state::{self, CheckpointCommit, DeadLetter, FullSyncState};
use crate::postgres::{self, PgError, catalog, quote_qualified};
use crate::sink::{self, Sink};
use crate::source::SourceError;
use crate::source::snapshot::{CopyTextParser, SnapshotQuery, snapshot_row_message_id};
use crate::source::stream;
use crate::transform::event::{EventFactory, Stamp, pg_micros_to_rfc3339, stream_message_id};
use crate::transform::mapping::CellRef;
use crate::transform::{Event, Op, ProjectedRow, Projection};

/// Items per message on the reader → deliverer channel: handing rows over in chunks rather than
/// one by one saves a channel operation, and often a thread wake-up, per row.
const CHUNK_ITEMS: usize = 256;
/// Capacity of the reader → deliverer channel, in chunks: at most 4096 items in flight.
const CHANNEL_CHUNKS: usize = 16;
/// Minimum time between two checkpoints that record delivered changes.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// Minimum time between two checkpoints that only follow idle WAL (keepalives).
const IDLE_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);
/// Retries of a failing `run --once` before it gives up and exits non-zero: a one-shot job
/// (cron, CI) must end and report a lasting failure (a full disk, a destination down) instead of
/// retrying forever; a brief blip (a server restart) is still ridden out.
const ONCE_MAX_RETRIES: u32 = 3;
/// How often the full sync reports progress when stderr is not a terminal.
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// What the reader hands the deliverer, in WAL order.
// Events are by far the most common item and travel in chunks: boxing them would add an
// allocation per row for the rare, smaller variants' sake.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Item {
    /// An event to deliver (not boxed: items travel in chunks, and this is the common one).
    Event(Event),
    /// A row that cannot become an event.
    DeadLetter(Box<DeadLetter>),
    /// A transaction committed: once the events before this are delivered, `end_lsn` is durable.
    Commit {
        /// End of the transaction.
        end_lsn: Lsn,
        /// Rows of the followed table it changed.
        rows: i64,
    },
    /// A keepalive outside any transaction: every commit before `wal_end` has been sent.
    Idle(Lsn),
    /// The full sync read its last row.
    SnapshotDone {
        /// The snapshot's position: the stream resumes here.
        lsn: Lsn,
        /// Rows read.
        rows: i64,
    },
}

/// The mapping hash stored with the checkpoint: a change means a full sync (as RudderStack does
/// when column mappings change).
pub fn mapping_hash(config: &Config) -> String {
    let m = &config.mapping;
    let canonical = serde_json::json!({
        "columns": m.columns,
        "constants": m.constants,
        "filter": m.filter,
        "identifiers": m.identifiers.all().iter().map(|c| c.name()).collect::<Vec<_>>(),
        "trait_keys": m.trait_keys,
        "sync_mode": format!("{:?}", config.sync_mode),
    });
    let digest = Sha256::digest(canonical.to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Turns SIGTERM / Ctrl-C into the one shutdown signal.
fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        #[cfg(unix)]
        let terminate = async {
            match term.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate => {}
        }
        tracing::info!("shutdown requested: draining, delivering and checkpointing");
        let _ = tx.send(true);
    });
    rx
}

/// `slotstream run`: streams until shutdown (or, with `once`, until caught up), reconnecting
/// with exponential backoff and jitter on retryable failures.
pub async fn run(config: &Config, once: bool) -> Result<(), Error> {
    let shutdown = shutdown_signal();
    run_with_shutdown(config, once, shutdown).await
}

/// [`run`] with a caller-provided shutdown signal (tests, embedding).
pub async fn run_with_shutdown(
    config: &Config,
    once: bool,
    shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    let sink = sink::build(&config.destination)?;
    let sink = Arc::new(tokio::sync::Mutex::new(sink));
    let mut backoff = Duration::from_millis(500);
    let mut once_target: Option<Lsn> = None;
    let mut retries: u32 = 0;
    loop {
        let started = Instant::now();
        match run_session(
            config,
            once,
            &mut once_target,
            shutdown.clone(),
            sink.clone(),
        )
        .await
        {
            Ok(()) => return Ok(()),
            Err(e)
                if e.is_retryable()
                    && !*shutdown.borrow()
                    && !(once && retries >= ONCE_MAX_RETRIES) =>
            {
                retries += 1;
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_millis(500);
                }
                let jitter = rand::random_range(0.5..1.5);
                let wait = backoff.mul_f64(jitter);
                tracing::warn!(
                    error = %e,
                    retry_in_ms = wait.as_millis() as u64,
                    "pipeline failed; resuming from the checkpoint after a pause"
                );
                let mut sd = shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = sd.wait_for(|s| *s) => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The parts of the followed table the reader needs.
struct TableContext {
    table: catalog::Table,
    factory: EventFactory,
    types: TypeCatalog,
}

async fn connect_control(config: &Config) -> Result<tokio_postgres::Client, Error> {
    Ok(postgres::connect(&config.source, &config.name)
        .await?
        .client)
}

/// One session: connect, full sync if needed, stream; ends on shutdown, on `--once` reaching
/// its target, or with the first error.
async fn run_session(
    config: &Config,
    once: bool,
    once_target: &mut Option<Lsn>,
    shutdown: watch::Receiver<bool>,
    sink: Arc<tokio::sync::Mutex<Box<dyn Sink>>>,
) -> Result<(), Error> {
    let src = &config.source;
    let mut control = connect_control(config).await?;
    state::migrate(&mut control).await?;
    let table = catalog::table(&control, &src.schema, &src.table)
        .await?
        .ok_or_else(|| SourceError::TableMissing {
            table: quote_qualified(&src.schema, &src.table),
            user: src.user.clone(),
        })?;
    // Refuse a table without identifier columns before touching the slot.
    let qualified = format!("{}.{}", src.schema, src.table);
    Projection::resolve(
        &config.mapping,
        &qualified,
        table.columns.iter().map(|c| (c.name.as_str(), c.type_oid)),
    )
    .map_err(|e| Error::Mapping {
        hint: e.hint(),
        message: e.to_string(),
    })?;
    let mut types = TypeCatalog::builtin();
    let oids: Vec<u32> = table.columns.iter().map(|c| c.type_oid).collect();
    postgres::types::load_types(&control, &mut types, &oids)
        .await
        .map_err(|e| PgError::query("loading the table's column types", e))?;

    // Read before the checkpoint row's upsert below, whose commit then lies past the target:
    // the WAL always moves beyond the target, so the stream reaches it even on an idle server.
    if once && once_target.is_none() {
        *once_target = Some(stream::current_wal_lsn(&control).await?);
    }
    let checkpoint = state::ensure(
        &control,
        &config.name,
        &src.slot,
        &src.publication,
        &src.schema,
        &src.table,
    )
    .await?;
    let hash = mapping_hash(config);
    let slot = stream::slot_info(&control, &src.slot).await?;
    let full_sync_reason = if checkpoint.full_sync_state != FullSyncState::Done {
        Some(match checkpoint.full_sync_state {
            FullSyncState::Running => "the previous full sync did not finish",
            _ => "this is the pipeline's first run",
        })
    } else if checkpoint.resync_requested {
        Some("`slotstream resync` was run")
    } else if checkpoint.mapping_hash.as_deref() != Some(hash.as_str()) {
        Some("the mapping changed since the last full sync")
    } else {
        None
    };

    let (tx, rx) = mpsc::channel::<Vec<Item>>(CHANNEL_CHUNKS);
    let (ack_tx, ack_rx) = watch::channel(checkpoint.lsn);
    let deliverer_control = connect_control(config).await?;
    let limits = BatchLimits {
        max_events: config.schedule.max_batch_events,
        max_delay: config.schedule.max_batch_delay,
        max_bytes: config.schedule.memory_limit,
    };
    let pipeline_name = config.name.clone();
    let start_lsn = checkpoint.lsn;
    let deliverer = tokio::spawn(async move {
        let mut sink = sink.lock().await;
        let mut d = Deliverer {
            pipeline: pipeline_name,
            control: deliverer_control,
            batch: MicroBatch::new(limits),
            durable: start_lsn,
            idle: None,
            checkpoint: start_lsn,
            last_checkpoint: Instant::now(),
            stretch: Stretch::new(start_lsn),
            ack: ack_tx,
        };
        d.run(&mut **sink, rx).await
    });

    let ctx = TableContext {
        factory: EventFactory::new(&config.name, &src.schema, &src.table),
        table,
        types,
    };
    let reader = Reader {
        config,
        control,
        ctx,
        out: Outbox::new(tx),
        ack_rx,
        shutdown,
    };
    let read_result = reader
        .run(full_sync_reason, slot, checkpoint.lsn, &hash, *once_target)
        .await;
    // The reader dropped its sender: the deliverer drains, delivers, checkpoints and ends.
    let deliver_result = match deliverer.await {
        Ok(r) => r,
        Err(e) => Err(Error::Internal(format!("the delivery task failed: {e}"))),
    };
    match (read_result, deliver_result) {
        (Err(e), _) => Err(e),
        (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(_)) => Ok(()),
    }
}

/// Counters of the stretch of delivery since the last checkpoint (one sync-run row).
struct Stretch {
    kind: &'static str,
    from: Lsn,
    rows: i64,
    events: i64,
    dead_letters: Vec<DeadLetter>,
    started_unix_micros: i64,
}

fn unix_micros_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl Stretch {
    fn new(from: Lsn) -> Self {
        Stretch {
            kind: "stream",
            from,
            rows: 0,
            events: 0,
            dead_letters: Vec::new(),
            started_unix_micros: unix_micros_now(),
        }
    }
}

/// The delivering half: batches, the sink, the checkpoint.
struct Deliverer {
    pipeline: String,
    control: tokio_postgres::Client,
    batch: MicroBatch,
    /// Everything before this position is delivered (not necessarily checkpointed).
    durable: Lsn,
    /// A keepalive position with nothing pending before it.
    idle: Option<Lsn>,
    /// The stored checkpoint.
    checkpoint: Lsn,
    last_checkpoint: Instant,
    stretch: Stretch,
    ack: watch::Sender<Lsn>,
}

impl Deliverer {
    async fn run(
        &mut self,
        sink: &mut dyn Sink,
        mut rx: mpsc::Receiver<Vec<Item>>,
    ) -> Result<Lsn, Error> {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.batch.deadline();
            tokio::select! {
                chunk = rx.recv() => match chunk {
                    Some(items) => {
                        for item in items {
                            self.handle(sink, item).await?;
                        }
                    }
                    None => break,
                },
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

    async fn handle(&mut self, sink: &mut dyn Sink, item: Item) -> Result<(), Error> {
        match item {
            Item::Event(e) => {
                self.stretch.events += 1;
                if self.batch.push(e) {
                    self.flush(sink).await?;
                }
            }
            Item::DeadLetter(d) => self.stretch.dead_letters.push(*d),
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
                state::finish_full_sync(&self.control, &self.pipeline, rows).await?;
                self.durable = self.durable.max(lsn);
                self.checkpoint = self.checkpoint.max(lsn);
                self.commit_checkpoint(lsn).await?;
                tracing::info!(rows, lsn = %lsn, "full sync delivered; streaming from its position");
            }
        }
        Ok(())
    }

    async fn flush(&mut self, sink: &mut dyn Sink) -> Result<(), Error> {
        if self.batch.is_empty() {
            return Ok(());
        }
        sink.deliver(self.batch.events_mut()).await?;
        if let Some(lsn) = self.batch.delivered() {
            self.durable = self.durable.max(lsn);
        }
        Ok(())
    }

    async fn maybe_checkpoint(&mut self, force: bool) -> Result<(), Error> {
        let since = self.last_checkpoint.elapsed();
        let has_progress = self.durable > self.checkpoint || !self.stretch.dead_letters.is_empty();
        let idle_progress = self
            .idle
            .is_some_and(|l| l > self.checkpoint.max(self.durable));
        if has_progress && (force || since >= CHECKPOINT_INTERVAL) {
            let to = self.durable.max(self.idle.unwrap_or(Lsn::ZERO));
            self.commit_checkpoint(to).await?;
        } else if idle_progress && (force || since >= IDLE_CHECKPOINT_INTERVAL) {
            let to = self.idle.unwrap_or(self.durable);
            self.commit_checkpoint(to).await?;
        }
        Ok(())
    }

    async fn commit_checkpoint(&mut self, to: Lsn) -> Result<(), Error> {
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
        if commit.events > 0 || !commit.dead_letters.is_empty() {
            tracing::debug!(from = %commit.from, to = %stored, events = commit.events, "checkpoint");
        }
        self.checkpoint = stored;
        self.durable = self.durable.max(stored);
        self.last_checkpoint = Instant::now();
        self.stretch = Stretch::new(stored);
        let _ = self.ack.send(stored);
        Ok(())
    }
}

/// The reading half: full sync, then the stream.
struct Reader<'a> {
    config: &'a Config,
    control: tokio_postgres::Client,
    ctx: TableContext,
    out: Outbox,
    ack_rx: watch::Receiver<Lsn>,
    shutdown: watch::Receiver<bool>,
}

/// Why the reader stopped without an error.
enum Stop {
    Shutdown,
    ReachedTarget,
    DelivererGone,
}

/// The reader's end of the channel: items queue here and go to the deliverer in chunks.
struct Outbox {
    tx: mpsc::Sender<Vec<Item>>,
    /// Items not yet handed to the deliverer, in WAL order (fewer than [`CHUNK_ITEMS`]).
    pending: Vec<Item>,
}

impl Outbox {
    fn new(tx: mpsc::Sender<Vec<Item>>) -> Self {
        Outbox {
            tx,
            pending: Vec::with_capacity(CHUNK_ITEMS),
        }
    }

    /// Queues `item` for the deliverer; hands the queue over once it holds a full chunk.
    async fn send(&mut self, item: Item) -> Result<(), Stop> {
        self.pending.push(item);
        if self.pending.len() >= CHUNK_ITEMS {
            self.flush().await
        } else {
            Ok(())
        }
    }

    /// Queues `item` and hands the queue over now: at commits, keepalives and the end of the
    /// full sync, so a committed change never waits for later rows.
    async fn send_now(&mut self, item: Item) -> Result<(), Stop> {
        self.pending.push(item);
        self.flush().await
    }

    /// Hands the queued items to the deliverer (blocks while the channel is full).
    async fn flush(&mut self) -> Result<(), Stop> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.pending, Vec::with_capacity(CHUNK_ITEMS));
        self.tx.send(chunk).await.map_err(|_| Stop::DelivererGone)
    }
}

impl Reader<'_> {
    async fn run(
        mut self,
        full_sync_reason: Option<&'static str>,
        slot: Option<stream::SlotInfo>,
        checkpoint: Lsn,
        hash: &str,
        once_target: Option<Lsn>,
    ) -> Result<(), Error> {
        let src = &self.config.source;
        let (session, start) = match full_sync_reason {
            Some(reason) => {
                tracing::info!(reason, "starting a full sync");
                if let Some(pid) = slot.as_ref().and_then(|info| info.active_pid) {
                    return Err(SourceError::SlotBusy {
                        slot: src.slot.clone(),
                        pid,
                    }
                    .into());
                }
                // A usable slot stays (see `full_sync_on_kept_slot`); a missing or unusable one
                // is created (again) with the snapshot.
                let keep = slot
                    .as_ref()
                    .is_some_and(|info| stream::check_slot(&src.slot, info, &src.database).is_ok());
                let kept = if keep {
                    self.full_sync_on_kept_slot(checkpoint, hash).await?
                } else {
                    None
                };
                match kept {
                    Some(Ok(snapshot_lsn)) => {
                        stream::wait_until_released(
                            &self.control,
                            &src.slot,
                            Duration::from_secs(10),
                        )
                        .await?;
                        let ack = *self.ack_rx.borrow();
                        let cfg =
                            stream::replication_config(src, &self.config.name, snapshot_lsn, ack);
                        let session = ReplicationClient::connect(cfg)
                            .await
                            .map_err(SourceError::from)?;
                        (session, snapshot_lsn)
                    }
                    Some(Err(_stop)) => return Ok(()),
                    None => {
                        if slot.is_some() {
                            stream::drop_slot(&self.control, &src.slot).await?;
                        }
                        let cfg = stream::replication_config(
                            src,
                            &self.config.name,
                            Lsn::ZERO,
                            Lsn::ZERO,
                        );
                        let exported = stream::create_slot_with_snapshot(cfg, &src.slot).await?;
                        state::begin_full_sync(
                            &self.control,
                            &self.config.name,
                            exported.consistent_point,
                            hash,
                            true,
                        )
                        .await?;
                        match self
                            .full_sync(Some(&exported.snapshot_name), exported.consistent_point)
                            .await?
                        {
                            Ok(()) => {}
                            Err(Stop::Shutdown | Stop::DelivererGone | Stop::ReachedTarget) => {
                                return Ok(());
                            }
                        }
                        let mut session = exported.session;
                        session.start().await.map_err(SourceError::from)?;
                        (session, exported.consistent_point)
                    }
                }
            }
            None => {
                match &slot {
                    None => {
                        return Err(SourceError::SlotMissing {
                            slot: src.slot.clone(),
                        }
                        .into());
                    }
                    Some(info) => stream::check_slot(&src.slot, info, &src.database)?,
                }
                let cfg =
                    stream::replication_config(src, &self.config.name, checkpoint, checkpoint);
                let session = ReplicationClient::connect(cfg)
                    .await
                    .map_err(SourceError::from)?;
                (session, checkpoint)
            }
        };
        let mut session = session;
        session.wait_started().await.map_err(SourceError::from)?;
        tracing::info!(slot = %src.slot, from = %start, "streaming");
        if once_target.is_some_and(|t| start >= t) {
            drop(self.out);
            return Ok(());
        }
        let result = self.stream(&mut session, once_target, None).await;
        if !matches!(result, Ok(Stop::DelivererGone)) {
            // Rows read before a shutdown or an error are delivered, as they would be one by one.
            let _ = self.out.flush().await;
        }
        let Reader {
            out, mut ack_rx, ..
        } = self;
        drop(out);
        let stop = result?;
        if !matches!(stop, Stop::DelivererGone) {
            // Report the final checkpoint to the slot before closing the session.
            let metrics = session.metrics();
            let sent_before = metrics.feedback_sent();
            let deadline = Instant::now() + Duration::from_secs(5);
            while ack_rx.changed().await.is_ok() {
                session.update_applied_lsn(*ack_rx.borrow_and_update());
            }
            session.update_applied_lsn(*ack_rx.borrow());
            while metrics.feedback_sent() == sent_before && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        session.stop();
        Ok(())
    }

    /// A full sync that keeps the pipeline's slot (a mapping change, `resync`, or a full sync
    /// interrupted earlier). A temporary slot exports a snapshot and its consistent point C and
    /// goes away once the snapshot is imported. The pipeline's slot is then read from the
    /// checkpoint up to C and those changes are delivered first: above all the deletes, which
    /// no snapshot can show (dropping the slot instead would leave rows deleted since the
    /// checkpoint at the destination in mirror mode). Then the snapshot's rows; the stream
    /// goes on from C on the same slot, so every commit lands on exactly one side of C.
    /// `None`: no replication slot is free for the temporary slot; the caller falls back to
    /// dropping and creating the pipeline's slot.
    async fn full_sync_on_kept_slot(
        &mut self,
        checkpoint: Lsn,
        hash: &str,
    ) -> Result<Option<Result<Lsn, Stop>>, Error> {
        let src = &self.config.source;
        let name = &self.config.name;
        let temporary = stream::snapshot_slot_name(&src.slot);
        let cfg = stream::replication_config(src, name, Lsn::ZERO, Lsn::ZERO);
        let exported = match stream::create_temporary_slot_with_snapshot(cfg, &temporary).await {
            Ok(exported) => exported,
            Err(SourceError::Replication(e)) if crate::source::sqlstate(&e) == Some("53400") => {
                tracing::warn!(
                    slot = %src.slot,
                    "no replication slot is free for the full sync's temporary slot (max_replication_slots): the pipeline's slot is created again, and rows deleted since the last checkpoint get no Record Deleted event"
                );
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let snapshot_lsn = exported.consistent_point;
        // Recorded before the snapshot's transaction begins (it is read only). The checkpoint
        // stays: a crash from here on starts the full sync again and reads the slot from it.
        state::begin_full_sync(&self.control, name, snapshot_lsn, hash, false).await?;
        self.import_snapshot(&exported.snapshot_name).await?;
        // The imported snapshot belongs to this transaction now: the temporary slot can go.
        drop(exported.session);
        tracing::info!(slot = %src.slot, from = %checkpoint, to = %snapshot_lsn, "delivering the slot's changes up to the full sync's snapshot");
        let cfg = stream::replication_config(src, name, checkpoint, checkpoint);
        let mut session = ReplicationClient::connect(cfg)
            .await
            .map_err(SourceError::from)?;
        session.wait_started().await.map_err(SourceError::from)?;
        let drained = self.stream(&mut session, None, Some(snapshot_lsn)).await;
        let _ = session.shutdown().await;
        match drained? {
            Stop::ReachedTarget => {}
            stop => return Ok(Some(Err(stop))),
        }
        if let Err(stop) = self.out.flush().await {
            return Ok(Some(Err(stop)));
        }
        Ok(Some(
            self.full_sync(None, snapshot_lsn)
                .await?
                .map(|()| snapshot_lsn),
        ))
    }

    /// Opens the full sync's transaction on the exported snapshot `snapshot_name`.
    async fn import_snapshot(&self, snapshot_name: &str) -> Result<(), Error> {
        self.control
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                postgres::quote_literal(snapshot_name)
            ))
            .await
            .map_err(|e| PgError::query("importing the slot's snapshot", e))?;
        Ok(())
    }

    /// The COPY of the full sync, inside a transaction that imported the exported snapshot
    /// (here when `snapshot_name` is given, else already by the caller).
    async fn full_sync(
        &mut self,
        snapshot_name: Option<&str>,
        snapshot_lsn: Lsn,
    ) -> Result<Result<(), Stop>, Error> {
        let mapping = &self.config.mapping;
        let table = &self.ctx.table;
        let qualified = format!("{}.{}", table.schema, table.name);
        let projection = Projection::resolve(
            mapping,
            &qualified,
            table.columns.iter().map(|c| (c.name.as_str(), c.type_oid)),
        )
        .map_err(|e| Error::Mapping {
            hint: e.hint(),
            message: e.to_string(),
        })?;
        let query = SnapshotQuery::new(table, &projection, mapping.filter.as_deref());
        if let Some(snapshot_name) = snapshot_name {
            self.import_snapshot(snapshot_name).await?;
        }
        let stream = self
            .control
            .copy_out(&query.copy_sql())
            .await
            .map_err(|e| PgError::query("starting the full sync COPY", e))?;
        let mut stream = std::pin::pin!(stream);
        let mut parser = CopyTextParser::new(query.width());
        let mut progress = Progress::new(table.estimated_rows);
        let timestamp = pg_micros_to_rfc3339(crate::transform::event::now_pg_micros());
        let stamp = Stamp::new(snapshot_lsn, &timestamp);
        let mut rows: i64 = 0;
        let mut shutdown = self.shutdown.clone();
        loop {
            let chunk = tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => {
                    tracing::warn!("shutdown during the full sync: it starts again on the next run");
                    return Ok(Err(Stop::Shutdown));
                }
                chunk = stream.next() => chunk,
            };
            let Some(chunk) = chunk else { break };
            let chunk = chunk.map_err(|e| SourceError::Copy(e.to_string()))?;
            parser.push(&chunk);
            while let Some(row) = parser.next_row()? {
                rows += 1;
                let (projected, key_text) = query.project(&projection, table, &self.ctx.types, row);
                let pipeline = &self.config.name;
                let item = self.row_item(projected, Op::Snapshot, snapshot_lsn, &stamp, |p| {
                    snapshot_row_message_id(pipeline, &key_text, p)
                });
                if let Err(stop) = self.out.send(item).await {
                    return Ok(Err(stop));
                }
                progress.row();
            }
        }
        parser.finish()?;
        self.control
            .batch_execute("COMMIT")
            .await
            .map_err(|e| PgError::query("ending the full sync transaction", e))?;
        progress.finish();
        tracing::info!(rows, "full sync read");
        let done = Item::SnapshotDone {
            lsn: snapshot_lsn,
            rows,
        };
        if let Err(stop) = self.out.send_now(done).await {
            return Ok(Err(stop));
        }
        Ok(Ok(()))
    }

    /// An identify event for a row, or a dead letter when it has no identifier.
    fn row_item(
        &self,
        projected: ProjectedRow,
        op: Op,
        lsn: Lsn,
        stamp: &Stamp,
        message_id: impl FnOnce(&ProjectedRow) -> uuid::Uuid,
    ) -> Item {
        if !projected.is_identified() {
            return Item::DeadLetter(Box::new(DeadLetter {
                lsn,
                op: op.as_str(),
                reason:
                    "the row has no value in any identifier column (user_id, anonymous_id, email)"
                        .into(),
                payload: serde_json::Value::Object(projected.traits.into_map()),
            }));
        }
        let id = message_id(&projected);
        let event = if op == Op::Delete {
            self.ctx.factory.deleted(projected, stamp, id)
        } else {
            self.ctx.factory.identify(projected, op, stamp, id)
        };
        Item::Event(event)
    }

    /// The replication stream: decode, keep the followed table, transform, hand on.
    ///
    /// With `stop_before`, stops (`ReachedTarget`) before the first transaction whose commit
    /// lies at or after that position, or at a keepalive past it: every commit before it has
    /// then been handed on, and none after it.
    async fn stream(
        &mut self,
        session: &mut ReplicationClient,
        once_target: Option<Lsn>,
        stop_before: Option<Lsn>,
    ) -> Result<Stop, Error> {
        let src = &self.config.source;
        let mut decoder = PgoutputDecoder::new(1);
        let mut relations = RelationCache::new();
        let mut ours: Option<(u32, Projection)> = None;
        let mut reported_missing: Vec<String> = Vec::new();
        let mut in_txn = false;
        let mut commit_lsn = Lsn::ZERO;
        let mut stamp = Stamp::new(Lsn::ZERO, "");
        let mut ordinal: u64 = 0;
        let mut rows: i64 = 0;
        let mut ack_open = true;
        let mut shutdown = self.shutdown.clone();
        // One waiter for the whole stream: a `wait_for` per message would register and drop a
        // waiter each time.
        let mut shutdown_requested = std::pin::pin!(shutdown.wait_for(|s| *s));
        let qualified = format!("{}.{}", src.schema, src.table);
        loop {
            let event = tokio::select! {
                biased;
                _ = &mut shutdown_requested => return Ok(Stop::Shutdown),
                changed = self.ack_rx.changed(), if ack_open => {
                    match changed {
                        Ok(()) => session.update_applied_lsn(*self.ack_rx.borrow_and_update()),
                        Err(_) => ack_open = false,
                    }
                    continue;
                }
                ev = session.recv() => ev.map_err(SourceError::from)?,
            };
            let Some(event) = event else {
                return Err(
                    SourceError::Replication(pgwire_replication::PgWireError::Io(Arc::new(
                        std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the server ended the replication stream",
                        ),
                    )))
                    .into(),
                );
            };
            match event {
                ReplicationEvent::KeepAlive { wal_end, .. } => {
                    if !in_txn {
                        if stop_before.is_some_and(|c| wal_end >= c) {
                            return Ok(Stop::ReachedTarget);
                        }
                        if let Err(stop) = self.out.send_now(Item::Idle(wal_end)).await {
                            return Ok(stop);
                        }
                        if once_target.is_some_and(|t| wal_end >= t) {
                            return Ok(Stop::ReachedTarget);
                        }
                    }
                }
                ReplicationEvent::Begin {
                    final_lsn,
                    commit_time_micros,
                    ..
                } => {
                    if stop_before.is_some_and(|c| final_lsn >= c) {
                        return Ok(Stop::ReachedTarget);
                    }
                    in_txn = true;
                    commit_lsn = final_lsn;
                    stamp = Stamp::new(final_lsn, &pg_micros_to_rfc3339(commit_time_micros));
                    ordinal = 0;
                    rows = 0;
                }
                ReplicationEvent::Commit { end_lsn, .. } => {
                    in_txn = false;
                    if let Err(stop) = self.out.send_now(Item::Commit { end_lsn, rows }).await {
                        return Ok(stop);
                    }
                    if once_target.is_some_and(|t| end_lsn >= t) {
                        return Ok(Stop::ReachedTarget);
                    }
                }
                ReplicationEvent::XLogData { data, .. } => {
                    let msg = decoder.decode(&data)?;
                    // A delete whose old row holds only the replica identity key.
                    let mut key_only = false;
                    let (op, rel_id, tuple) = match msg {
                        LogicalMessage::Relation(body) => {
                            let is_ours = body.name == src.table && body.namespace == src.schema;
                            let rel_id = body.rel_id;
                            let change = relations.apply(body);
                            if is_ours {
                                let Some(rel) = relations.get(rel_id) else {
                                    continue;
                                };
                                let unknown: Vec<u32> = rel
                                    .columns
                                    .iter()
                                    .map(|c| c.type_oid)
                                    .filter(|o| self.ctx.types.needs(*o))
                                    .collect();
                                if !unknown.is_empty() {
                                    postgres::types::load_types(
                                        &self.control,
                                        &mut self.ctx.types,
                                        &unknown,
                                    )
                                    .await
                                    .map_err(|e| PgError::query("loading column types", e))?;
                                }
                                let projection = Projection::resolve(
                                    &self.config.mapping,
                                    &qualified,
                                    rel.columns.iter().map(|c| (c.name.as_str(), c.type_oid)),
                                )
                                .map_err(|e| Error::Mapping {
                                    hint: e.hint(),
                                    message: format!("after a schema change: {e}"),
                                })?;
                                for missing in &projection.missing_columns {
                                    if !reported_missing.contains(missing) {
                                        tracing::warn!(
                                            column = %missing,
                                            table = %qualified,
                                            "a selected column is no longer in the table (dropped or renamed); its trait is no longer sent, the others keep flowing"
                                        );
                                        reported_missing.push(missing.clone());
                                    }
                                }
                                reported_missing.retain(|m| projection.missing_columns.contains(m));
                                if !change.is_unchanged() && !change.first_seen {
                                    let added: Vec<&str> =
                                        change.added.iter().map(|c| c.name.as_str()).collect();
                                    let retyped: Vec<&str> =
                                        change.retyped.iter().map(|c| c.name.as_str()).collect();
                                    tracing::info!(table = %qualified, ?added, dropped = ?change.dropped, ?retyped, "table shape changed");
                                }
                                ours = Some((rel_id, projection));
                            }
                            continue;
                        }
                        LogicalMessage::Insert { rel_id, new, .. } => (Op::Insert, rel_id, new),
                        LogicalMessage::Update {
                            rel_id,
                            mut new,
                            old,
                            ..
                        } => {
                            // An unchanged TOASTed value is not in the new row, but the whole
                            // old row (REPLICA IDENTITY FULL) carries it: unchanged means equal.
                            if let Some(crate::decode::pgoutput::OldTuple::Full(old)) = old {
                                for (cell, old) in new.cells.iter_mut().zip(old.cells) {
                                    if matches!(cell, Cell::UnchangedToast) {
                                        *cell = old;
                                    }
                                }
                            }
                            (Op::Update, rel_id, new)
                        }
                        LogicalMessage::Delete { rel_id, old, .. } => {
                            key_only = matches!(old, crate::decode::pgoutput::OldTuple::Key(_));
                            let tuple = match old {
                                crate::decode::pgoutput::OldTuple::Key(t)
                                | crate::decode::pgoutput::OldTuple::Full(t) => t,
                            };
                            (Op::Delete, rel_id, tuple)
                        }
                        LogicalMessage::Truncate { rel_ids, .. } => {
                            if let Some((ours_id, _)) = &ours
                                && rel_ids.contains(ours_id)
                            {
                                tracing::warn!(table = %qualified, lsn = %commit_lsn, "the table was truncated; TRUNCATE produces no events");
                            }
                            continue;
                        }
                        _ => continue,
                    };
                    ordinal += 1;
                    let Some((ours_id, projection)) = &ours else {
                        continue;
                    };
                    if *ours_id != rel_id {
                        continue;
                    }
                    rows += 1;
                    if op == Op::Delete && self.config.sync_mode == SyncMode::Upsert {
                        continue;
                    }
                    let rel = relations.shape_for(rel_id, &tuple)?;
                    let types = &self.ctx.types;
                    let projected = project_tuple(projection, &tuple, rel, types);
                    let pipeline = &self.config.name;
                    let mut item = self.row_item(projected, op, commit_lsn, &stamp, |_| {
                        stream_message_id(pipeline, commit_lsn, ordinal)
                    });
                    if let (Item::DeadLetter(d), true) = (&mut item, key_only) {
                        d.reason = format!(
                            "the deleted row's old key has no identifier value: the table's replica identity does not include an identifier column, so deletes cannot name the user; run ALTER TABLE {} REPLICA IDENTITY FULL",
                            quote_qualified(&src.schema, &src.table)
                        );
                    }
                    if let Err(stop) = self.out.send(item).await {
                        return Ok(stop);
                    }
                }
                ReplicationEvent::Message { .. } => {}
                ReplicationEvent::StoppedAt { .. } => return Ok(Stop::ReachedTarget),
            }
        }
    }
}

/// Projects a pgoutput tuple through `projection`.
fn project_tuple(
    projection: &Projection,
    tuple: &TupleData,
    rel: &crate::decode::pgoutput::RelationBody,
    types: &TypeCatalog,
) -> ProjectedRow {
    projection.project(|i| match tuple.cells.get(i) {
        Some(Cell::Null) => CellRef::Null,
        Some(Cell::UnchangedToast) | None => CellRef::Absent,
        Some(Cell::Text(bytes)) => {
            let oid = rel.columns.get(i).map(|c| c.type_oid).unwrap_or(25);
            match std::str::from_utf8(bytes) {
                Ok(text) => CellRef::Value(types.cell_to_json(oid, text)),
                Err(_) => CellRef::Value(types.cell_to_json(oid, &String::from_utf8_lossy(bytes))),
            }
        }
        Some(Cell::Binary(_)) => CellRef::Absent,
    })
}

/// Full-sync progress: a bar on a terminal, a log line every few seconds otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    rows: u64,
    estimate: u64,
    started: Instant,
    last_log: Instant,
}

impl Progress {
    fn new(estimated_rows: i64) -> Self {
        let estimate = u64::try_from(estimated_rows).unwrap_or(0);
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(estimate.max(1));
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "full sync {bar:40} {human_pos}/{human_len} rows  {per_sec}  ETA {eta}",
            ) {
                bar.set_style(style);
            }
            bar
        });
        let now = Instant::now();
        Progress {
            bar,
            rows: 0,
            estimate,
            started: now,
            last_log: now,
        }
    }

    fn row(&mut self) {
        self.rows += 1;
        if let Some(bar) = &self.bar {
            if self.rows.is_multiple_of(1024) {
                if self.rows > bar.length().unwrap_or(0) {
                    bar.set_length(self.rows);
                }
                bar.set_position(self.rows);
            }
        } else if self.rows.is_multiple_of(1024) && self.last_log.elapsed() >= PROGRESS_LOG_INTERVAL
        {
            self.last_log = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            let rate = self.rows as f64 / secs;
            let eta = if self.estimate > self.rows && rate > 0.0 {
                format!("{:.0}s", (self.estimate - self.rows) as f64 / rate)
            } else {
                "unknown".into()
            };
            tracing::info!(rows = self.rows, estimate = self.estimate, rows_per_sec = rate as u64, eta = %eta, "full sync progress");
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.set_position(self.rows);
            bar.finish_and_clear();
        }
    }
}
