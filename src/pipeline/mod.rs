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
//! 4. Memory is bounded in bytes by `[schedule] memory_limit`, whatever the transaction, table
//!    or window size: the reader takes each item's estimated size from a byte budget before
//!    queueing it and waits while the budget is spent; the deliverer gives the bytes back once
//!    the item is delivered (and, for a dead letter, checkpointed). The split of the limit
//!    between the replication buffer, the items in flight, the batch and the sink is in
//!    [`crate::batch::budget`].
//! 5. A deliverer that ends (an error) stops the reader at once, whatever it waits for: the
//!    reader's waits all watch the channel's closing.
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
use crate::batch::budget::{MemoryBudget, MemoryPlan};
use crate::batch::{self, BatchLimits, MicroBatch};
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

mod deliver;
mod progress;
mod read;

use deliver::{Deliverer, Stretch};
use read::{Outbox, Reader};

/// Items per message on the reader → deliverer channel: handing rows over in chunks rather than
/// one by one saves a channel operation, and often a thread wake-up, per row.
const CHUNK_ITEMS: usize = 256;
/// Capacity of the reader → deliverer channel, in chunks: at most 4096 items in flight (and at
/// most the memory budget's bytes, see [`crate::batch::budget`]).
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

impl Item {
    /// Estimated memory the item holds while in flight: what it takes from the memory budget.
    fn budget_bytes(&self) -> u64 {
        let slot = std::mem::size_of::<(Item, u64)>() as u64;
        slot + match self {
            Item::Event(e) => batch::event_bytes(e),
            Item::DeadLetter(d) => {
                (std::mem::size_of::<DeadLetter>() + d.reason.len()) as u64
                    + batch::value_bytes(&d.payload)
            }
            Item::Commit { .. } | Item::Idle(_) | Item::SnapshotDone { .. } => 0,
        }
    }
}

/// What travels on the reader → deliverer channel: items in WAL order, each with the bytes of
/// the memory budget it holds (given back by the deliverer once the item is let go).
type Chunk = Vec<(Item, u64)>;

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

    let (tx, rx) = mpsc::channel::<Chunk>(CHANNEL_CHUNKS);
    let plan = MemoryPlan::new(config.schedule.memory_limit);
    let budget = MemoryBudget::new(plan.in_flight);
    let (ack_tx, ack_rx) = watch::channel(checkpoint.lsn);
    let deliverer_control = connect_control(config).await?;
    let limits = BatchLimits {
        max_events: config.schedule.max_batch_events,
        max_delay: config.schedule.max_batch_delay,
        max_bytes: plan.batch,
    };
    let pipeline_name = config.name.clone();
    let start_lsn = checkpoint.lsn;
    let deliverer_budget = budget.clone();
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
            budget: deliverer_budget,
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
        out: Outbox::new(tx, budget),
        replication_events: plan.replication_events,
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
