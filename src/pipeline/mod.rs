//! The pipeline: the stages wired with a bounded channel, and the ack → checkpoint loop.
//!
//! ```text
//!  reader (this task)                         deliverer (spawned task)
//!  ─ full sync: COPY rows ─┐                  ┌─ MicroBatch ─ Sink::deliver (durable)
//!  ─ stream: pgoutput ─────┼─ Item channel ──►┤─ checkpoint: one transaction in _rudderstack
//!    decode, transform     │  (bounded)       └─ ack watch ──► reader: update_applied_lsn
//! ```
//!
//! Invariants kept here (docs/architecture.md §8):
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
//! 6. What the slot sends covers what the mapping needs: the publication is verified with the
//!    code `check` uses ([`Verifier`]) at session start, on each Relation message of the
//!    followed table, and before every checkpoint. pgoutput silently withholds the changes a
//!    publication does not cover (a table dropped from it sends nothing at all), so a mismatch
//!    stops the pipeline (exit 3) before the checkpoint can pass a withheld change.
//!
//! One shutdown path: SIGTERM or Ctrl-C stops the reader; the deliverer drains the channel,
//! delivers, checkpoints, and the final position is acknowledged before exit.
//!
//! One run per pipeline: the run holds the pipeline lock (`postgres::lock`) from before its
//! first session to its exit, across reconnects. A second run stops at once with "already
//! running". Should the lock's own session end while the others live, the current session stops
//! as on shutdown and the lock is taken again before the next one (or the run stops, if another
//! process took it meanwhile).

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
use crate::batch::{self, BatchLimits, MicroBatch, Row};
use crate::config::{Config, SyncHistory};
use crate::decode::pgoutput::PgoutputDecoder;
use crate::decode::value::TypeCatalog;
use crate::error::{Error, Recovery};
use crate::metrics::Metrics;
use crate::metrics::monitor::Monitor;
use crate::metrics::server::MetricsServer;
use crate::postgres::lock::{LockWatch, PipelineLock};
use crate::postgres::preflight::Verifier;
use crate::postgres::state::{self, CheckpointCommit, DeadLetter, FullSyncState};
use crate::postgres::{self, PgError, catalog, quote_qualified};
use crate::sink::{self, Sink};
use crate::source::SourceError;
use crate::source::snapshot::{CopyTextParser, SnapshotQuery, snapshot_row_message_id_of_json};
use crate::source::stream;
use crate::transform::event::{EventFactory, Stamp, pg_micros_to_rfc3339};
use crate::transform::{Event, Op, Projection};

mod deliver;
mod mapper;
mod progress;
mod read;
mod window;

use deliver::{Deliverer, Stretch};
use mapper::{ChangeMapper, Mapped, row_item};
use read::{FullSyncIdentity, Outbox, Reader};

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
/// An idle checkpoint is written only once the WAL position is this far past the stored
/// checkpoint. Each checkpoint's own write (and the running-transactions record the server logs
/// soon after it) moves the position by a few hundred bytes: following every move rewrote the
/// checkpoint row every 10 s forever on a quiet server. Holding back less than this keeps no
/// WAL file longer (the server frees WAL by 16 MiB segments).
const IDLE_CHECKPOINT_MIN_ADVANCE: u64 = 1024 * 1024;
/// Minimum time between two prunings of the sync history (`cdc_sync_runs`).
const HISTORY_PRUNE_INTERVAL: Duration = Duration::from_secs(300);
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
    /// A row change to deliver (not boxed: items travel in chunks, and this is the common one).
    Row(Row),
    /// The followed table was truncated (mirror mode, `sync.on_truncate = "delete_all"`): every
    /// row the ledger holds gets `Record Deleted`, built on this template (the truncate's
    /// position and time).
    Truncate(Box<Event>),
    /// A row that cannot become an event.
    DeadLetter(Box<DeadLetter>),
    /// A transaction committed: once the events before this are delivered, `end_lsn` is durable.
    Commit {
        /// End of the transaction.
        end_lsn: Lsn,
        /// Rows of the followed table it changed.
        rows: i64,
        /// Its commit time, microseconds since the Unix epoch (delivery latency, source lag).
        commit_unix_micros: i64,
    },
    /// A keepalive outside any transaction: every commit before `wal_end` has been sent.
    Idle(Lsn),
    /// How far the full sync's read is (every few seconds): recorded in its sync run's row.
    SyncProgress {
        /// Rows read so far.
        rows: i64,
        /// Ranges read to the end.
        ranges_done: i64,
        /// Ranges in all.
        ranges_total: i64,
    },
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
        if matches!(self, Item::SyncProgress { .. }) {
            // Sent beside a running read, which may hold the budget: it must never wait for
            // it (a few per minute, in chunks of one).
            return 0;
        }
        let slot = std::mem::size_of::<(Item, u64)>() as u64;
        slot + match self {
            Item::Row(r) => r.bytes(),
            Item::Truncate(e) => batch::event_bytes(e),
            Item::DeadLetter(d) => {
                (std::mem::size_of::<DeadLetter>() + d.reason.len()) as u64
                    + batch::value_bytes(&d.payload)
            }
            Item::Commit { .. }
            | Item::Idle(_)
            | Item::SyncProgress { .. }
            | Item::SnapshotDone { .. } => 0,
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
        // Switching the ledger on needs a full sync to fill it.
        "ledger": config.ledger,
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
    let metrics = Arc::new(Metrics::new(&config.name));
    // Bound first: a port already taken is reported before anything else happens.
    let server = match config.metrics.listen {
        Some(addr) => Some(
            MetricsServer::bind(addr)
                .await
                .map_err(|e| Error::Endpoint {
                    message: e.to_string(),
                    hint: "choose a free port for [metrics] listen, or stop what holds it".into(),
                })?,
        ),
        None => None,
    };
    let sink = sink::build(&config.destination)?;
    let sink = Arc::new(tokio::sync::Mutex::new(sink));
    // The run stops on the process's shutdown signal, or when the slot's watch finds the slot
    // invalidated: one stop signal for the sessions, the monitor and the endpoint.
    let (stop_tx, stop) = watch::channel(*shutdown.borrow());
    let stop_tx = Arc::new(stop_tx);
    let served = server.map(|s| s.spawn(metrics.clone(), stop.clone()));
    let (monitor, lost) = Monitor::spawn(Arc::new(config.clone()), metrics.clone(), stop.clone());
    let forward = {
        let (mut shutdown, mut lost, stop_tx) = (shutdown.clone(), lost.clone(), stop_tx.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => {}
                _ = lost.wait_for(|l| l.is_some()) => {}
            }
            let _ = stop_tx.send(true);
        })
    };
    let result = run_sessions(config, once, stop, sink.clone(), &metrics).await;
    // Whatever ended the run, the sink flushes what it holds (records in flight).
    let flushed = sink.lock().await.shutdown().await;
    forward.abort();
    let _ = stop_tx.send(true);
    let _ = monitor.await;
    if let Some(served) = served {
        let _ = served.await;
    }
    if let Some(reason) = lost.borrow().clone() {
        return Err(SourceError::SlotUnusable {
            slot: config.source.slot.clone(),
            reason: format!(
                "{reason}; the changes since the last checkpoint are gone from the WAL, so the run stopped instead of going on without them"
            ),
        }
        .into());
    }
    match (result, flushed) {
        (Err(e), _) => Err(e),
        (Ok(()), Err(e)) => Err(e.into()),
        (Ok(()), Ok(())) => Ok(()),
    }
}

/// The sessions of a run, one after another: a failure the policy does not stop on
/// ([`Error::recovery`]) starts another session from the checkpoint after a pause.
async fn run_sessions(
    config: &Config,
    once: bool,
    shutdown: watch::Receiver<bool>,
    sink: Arc<tokio::sync::Mutex<Box<dyn Sink>>>,
    metrics: &Arc<Metrics>,
) -> Result<(), Error> {
    let mut backoff = Duration::from_millis(500);
    let mut once_target: Option<Lsn> = None;
    let mut retries: u32 = 0;
    let mut lock: Option<PipelineLock> = None;
    loop {
        let started = Instant::now();
        let result = match hold_lock(config, &mut lock).await {
            Ok(watch) => {
                let (stop, forward) = session_stop(&shutdown, watch.clone());
                let result =
                    run_session(config, once, &mut once_target, stop, sink.clone(), metrics).await;
                forward.abort();
                match result {
                    Ok(()) if watch.is_lost() && !*shutdown.borrow() => Err(PgError::Query {
                        what: "holding the pipeline lock".into(),
                        detail: "its session ended".into(),
                        code: None,
                    }
                    .into()),
                    result => result,
                }
            }
            Err(e) => Err(e),
        };
        metrics.source_state(None, result.as_ref().err().map(|e| e.to_string()));
        match result {
            Ok(()) => return Ok(()),
            Err(e)
                if e.recovery() != Recovery::Stop
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
                metrics.reconnected();
            }
            Err(e) => return Err(e),
        }
    }
}

/// Takes the pipeline lock before the first session, and again if its session ended since.
async fn hold_lock(config: &Config, lock: &mut Option<PipelineLock>) -> Result<LockWatch, Error> {
    if let Some(held) = lock.as_ref()
        && !held.is_lost()
    {
        return Ok(held.watch());
    }
    let previous = lock.take();
    let held = PipelineLock::acquire(&config.source, &config.name, previous.as_ref()).await?;
    let watch = held.watch();
    *lock = Some(held);
    Ok(watch)
}

/// A session's stop signal: the process's shutdown, or the end of the pipeline lock's session
/// (checked twice a second). The task forwarding them ends with the session.
fn session_stop(
    shutdown: &watch::Receiver<bool>,
    lock: LockWatch,
) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(*shutdown.borrow());
    let mut shutdown = shutdown.clone();
    let forward = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut shutdown_open = true;
        loop {
            tokio::select! {
                changed = shutdown.changed(), if shutdown_open => match changed {
                    Ok(()) if *shutdown.borrow_and_update() => break,
                    Ok(()) => {}
                    Err(_) => shutdown_open = false,
                },
                _ = tick.tick() => if lock.is_lost() {
                    tracing::warn!("the pipeline lock's session ended: stopping this session to take the lock again");
                    break;
                },
            }
        }
        let _ = tx.send(true);
    });
    (rx, forward)
}

/// The parts of the followed table the reader needs.
struct TableContext {
    table: catalog::Table,
    factory: EventFactory,
    types: TypeCatalog,
    /// The identifier columns the mapping resolves to in the catalog's shape.
    identifiers: Vec<state::IdentifierColumnState>,
}

impl TableContext {
    /// The table's identity as the checkpoint stores it.
    fn followed(&self) -> state::FollowedTable<'_> {
        state::FollowedTable {
            schema: &self.table.schema,
            name: &self.table.name,
            oid: self.table.oid,
            identifiers: &self.identifiers,
        }
    }
}

/// The identifier columns `projection` resolved in the catalog's shape of `table`.
fn identifier_columns(
    projection: &Projection,
    table: &catalog::Table,
) -> Vec<state::IdentifierColumnState> {
    projection
        .identifier_positions()
        .filter_map(|(role, index)| {
            let column = table.columns.get(index)?;
            Some(state::IdentifierColumnState {
                role: role.to_owned(),
                name: column.name.clone(),
                attnum: column.attnum,
            })
        })
        .collect()
}

/// Refuses to start when an identifier column the last full sync used was renamed or dropped
/// while the config still names it (explicitly or by default): the events would change
/// identity without a word. The column's attnum, which a rename keeps, tells the new name.
fn check_identifiers_unchanged(
    config: &Config,
    stored: &state::Checkpoint,
    table: &catalog::Table,
) -> Result<(), Error> {
    let ids = &config.mapping.identifiers;
    for used in &stored.identifier_columns {
        let configured = match used.role.as_str() {
            "user_id" => ids.user_id.name(),
            "anonymous_id" => ids.anonymous_id.name(),
            _ => ids.email.name(),
        };
        if configured != used.name {
            // The config changed this identifier: a mapping change, hence a full sync.
            continue;
        }
        let now = table.columns.iter().find(|c| c.attnum == used.attnum);
        if now.is_some_and(|c| c.name == used.name) {
            continue;
        }
        let qualified = quote_qualified(&table.schema, &table.name);
        return Err(mapper::identifier_gone(
            &qualified,
            &used.role,
            &used.name,
            now.map(|c| c.name.as_str()),
            "so the pipeline did not start",
        ));
    }
    Ok(())
}

/// Compares the table the config names with the one the pipeline's last full sync read
/// (docs/architecture.md, "The followed table's identity"). `Ok(Some(reason))`: a different
/// table (another name, or the same name dropped and created again): it needs a full sync.
/// The same table (same OID) under a new name needs none; its new name is recorded.
async fn followed_table_changed(
    control: &tokio_postgres::Client,
    pipeline: &str,
    checkpoint: &state::Checkpoint,
    table: &catalog::Table,
) -> Result<Option<String>, Error> {
    let named = |schema: &str, name: &str| quote_qualified(schema, name);
    let now = named(&table.schema, &table.name);
    let before = named(&checkpoint.schema_name, &checkpoint.table_name);
    match checkpoint.table_oid {
        Some(oid) if oid == table.oid => {
            if now != before {
                tracing::info!(from = %before, to = %now, oid, "the followed table was renamed: the stream resumes at the checkpoint");
                let followed = state::FollowedTable {
                    schema: &table.schema,
                    name: &table.name,
                    oid,
                    identifiers: &[],
                };
                state::record_table_rename(control, pipeline, &followed).await?;
            }
            Ok(None)
        }
        Some(oid) => Ok(Some(format!(
            "the followed table changed: the last full sync read {before} (OID {oid}), the config now names {now} (OID {}), a different table",
            table.oid
        ))),
        // Pipelines from before the OID was kept: the names tell.
        None if checkpoint.full_sync_state == FullSyncState::Done && now != before => Ok(Some(
            format!("the followed table changed from {before} to {now}"),
        )),
        None => Ok(None),
    }
}

/// The error for a config that names a table which no longer exists while the table the
/// pipeline followed lives on under another name.
async fn renamed_table_error(
    control: &tokio_postgres::Client,
    config: &Config,
    checkpoint: Option<&state::Checkpoint>,
) -> Result<Option<Error>, Error> {
    let Some(oid) = checkpoint.and_then(|c| c.table_oid) else {
        return Ok(None);
    };
    let Some((schema, name)) = catalog::table_name(control, oid).await? else {
        return Ok(None);
    };
    let src = &config.source;
    Ok(Some(Error::Mapping {
        message: format!(
            "table {} does not exist: the table this pipeline follows (OID {oid}) is now {}",
            quote_qualified(&src.schema, &src.table),
            quote_qualified(&schema, &name)
        ),
        hint: format!(
            "set [source] schema = {schema:?} and table = {name:?} in the config: the stream resumes at its checkpoint, with no full sync"
        ),
    }))
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
    metrics: &Arc<Metrics>,
) -> Result<(), Error> {
    let src = &config.source;
    // The destination first: a broker that cannot take events, or a topic that does not exist,
    // is reported before anything is read.
    let checked = sink.lock().await.healthcheck().await;
    metrics.destination_state(checked.as_ref().err().map(|e| e.to_string()));
    // Not inside the log macro: its arguments are evaluated only when the level is on.
    let checked = checked?;
    tracing::debug!("{checked}");
    let mut control = connect_control(config).await?;
    // Refuse an unsupported server before touching anything.
    let version = postgres::version::server_version(&control).await?;
    if let Some(reason) =
        postgres::version::unsupported(version.num, config.mapping.filter.is_some())
    {
        return Err(SourceError::UnsupportedServer {
            version: version.text,
            reason,
        }
        .into());
    }
    state::migrate(&mut control).await?;
    let stored = state::load(&control, &config.name).await?;
    let Some(table) = catalog::table(&control, &src.schema, &src.table, &src.publication).await?
    else {
        if let Some(e) = renamed_table_error(&control, config, stored.as_ref()).await? {
            return Err(e);
        }
        return Err(SourceError::TableMissing {
            table: quote_qualified(&src.schema, &src.table),
            user: src.user.clone(),
        }
        .into());
    };
    // Refuse a table without identifier columns, or a mapping that needs a column the stream
    // does not carry, before touching the slot.
    let qualified = format!("{}.{}", src.schema, src.table);
    let projection = Projection::resolve_without(
        &config.mapping,
        &qualified,
        table.columns.iter().map(|c| (c.name.as_str(), c.type_oid)),
        &table.unsent_generated(),
    )
    .map_err(|e| Error::Mapping {
        hint: e.hint(),
        message: e.to_string(),
    })?;
    let identifiers = identifier_columns(&projection, &table);
    if let Some(stored) = &stored
        && stored.full_sync_state == FullSyncState::Done
        && stored.table_oid == Some(table.oid)
    {
        check_identifiers_unchanged(config, stored, &table)?;
    }
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
    // Before this pipeline records the slot as its own: the first pipeline that did owns it.
    if let Some(other) = state::other_pipeline_using_slot(&control, &config.name, &src.slot).await?
    {
        return Err(SourceError::SlotNotOurs {
            slot: src.slot.clone(),
            owner: format!(
                "pipeline {other:?} of this database streams from it (its row in _rudderstack.cdc_checkpoints; `slotstream teardown` with that pipeline's config retires it)"
            ),
        }
        .into());
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
    metrics.full_sync_state(checkpoint.full_sync_state.as_str());
    let hash = mapping_hash(config);
    let full_sync = FullSyncIdentity {
        mapping_hash: &hash,
        generation: checkpoint.next_full_sync_generation(&hash),
    };
    let slot = stream::slot_info(&control, &src.slot).await?;
    let table_changed = followed_table_changed(&control, &config.name, &checkpoint, &table).await?;
    let full_sync_reason = if checkpoint.full_sync_state != FullSyncState::Done {
        Some(match checkpoint.full_sync_state {
            FullSyncState::Running => "the previous full sync did not finish".to_owned(),
            _ => "this is the pipeline's first run".to_owned(),
        })
    } else if let Some(reason) = table_changed {
        Some(reason)
    } else if checkpoint.resync_requested {
        Some("`slotstream resync` was run".to_owned())
    } else if checkpoint.mapping_hash.as_deref() != Some(hash.as_str()) {
        Some("the mapping changed since the last full sync".to_owned())
    } else {
        None
    };

    // What the slot sends must cover what the mapping needs, before anything is read: checked
    // again on Relation messages and before every checkpoint.
    let verifier = Arc::new(
        Verifier::prepare(&mut control, config, version.num)
            .await?
            .for_table_oid(table.oid),
    );
    verifier
        .verify(&control, full_sync_reason.is_none())
        .await?;

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
    let history = config.history;
    // A full sync that `resync --changed-only` asked for sends only rows that differ from the
    // ledger.
    let changed_only =
        full_sync_reason.is_some() && checkpoint.resync_changed_only && config.ledger;
    let rules = batch::ledger::Rules {
        mirror: config.sync_mode == crate::config::SyncMode::Mirror,
        ledger: config.ledger,
        resend_snapshot: !changed_only,
    };
    let generation = full_sync.generation;
    let window = config
        .schedule
        .schedule
        .is_windowed()
        .then(|| window::Window::new(config.schedule.schedule.clone(), plan.batch));
    let deliverer_factory = EventFactory::new(&config.name, &src.schema, &src.table);
    let qualified_table = quote_qualified(&src.schema, &src.table);
    let page_size = config.schedule.max_batch_events;
    let deliverer_config = Arc::new(config.clone());
    let start_lsn = checkpoint.lsn;
    let deliverer_verifier = verifier.clone();
    let deliverer_budget = budget.clone();
    let retry = match once {
        true => config.destination.retry().clone().for_once(),
        false => config.destination.retry().clone(),
    };
    let retry_stop = shutdown.clone();
    let deliverer_metrics = metrics.clone();
    let deliverer = tokio::spawn(async move {
        let mut sink = sink.lock().await;
        let mut sink = sink::retry::Retrying::new(&mut **sink, retry, retry_stop)
            .with_metrics(deliverer_metrics.clone());
        let mut d = Deliverer {
            pipeline: pipeline_name,
            control: deliverer_control,
            batch: MicroBatch::new(limits),
            durable: start_lsn,
            idle: None,
            idle_candidate: None,
            checkpoint: start_lsn,
            last_checkpoint: Instant::now(),
            stretch: Stretch::new(start_lsn),
            ack: ack_tx,
            verifier: deliverer_verifier,
            history,
            last_prune: None,
            budget: deliverer_budget,
            rules,
            generation,
            pending: std::collections::HashMap::new(),
            factory: deliverer_factory,
            table: qualified_table,
            window,
            deliver_window_at_end: once,
            page_size,
            filler: None,
            config: deliverer_config,
            metrics: deliverer_metrics,
            commits: std::collections::VecDeque::new(),
            batch_oldest: None,
        };
        d.run(&mut sink, rx).await
    });

    let ctx = TableContext {
        factory: EventFactory::new(&config.name, &src.schema, &src.table),
        table,
        types,
        identifiers,
    };
    let reader = Reader {
        config,
        control,
        ctx,
        out: Outbox::new(tx, budget),
        replication_events: plan.replication_events,
        ack_rx,
        shutdown,
        verifier,
        metrics: metrics.clone(),
    };
    let read_result = reader
        .run(
            full_sync_reason,
            slot,
            checkpoint.lsn,
            full_sync,
            *once_target,
        )
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
