//! The reading half: the full sync's COPY, then the replication stream, decoded and
//! transformed into items for the deliverer.
//!
//! ## The full sync's readers (docs/architecture.md §16)
//!
//! The snapshot: the control connection opens a `REPEATABLE READ READ ONLY` transaction that
//! imports the snapshot exported at the slot's consistent point C (the new slot's, or a
//! temporary slot's). That transaction is the full sync: it stays open until every reader has
//! finished, and its commit ends the read.
//!
//! - **One reader** (`snapshot_workers = 1`, or the automatic choice for a small table, or a
//!   partitioned table): the control transaction COPYs the whole table, as before.
//! - **N readers**: the control transaction measures the heap (`pg_relation_size`, in pages)
//!   and exports its own snapshot (`pg_export_snapshot()`, the same snapshot it imported, as
//!   `pg_dump -j` shares its snapshot). It then does nothing until the readers are done, so the
//!   export stays valid. Each reader opens a connection the way the control connection is
//!   opened (same TLS, same pinned settings), and before anything else
//!   `BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '…'`: every
//!   reader sees exactly the rows committed before C. The heap is cut into more page ranges
//!   than readers (`TidRange::split`): the first from the table's start, each starting where
//!   the one before ends, the last open-ended (pages added after the measure fall in it). A
//!   row version has one `ctid`, so each row of the snapshot lies in exactly one range and is
//!   read exactly once; the mapping's row filter is ANDed to each range's `ctid` bounds (a TID
//!   Range Scan, PostgreSQL 14 and later). Readers take the next range not yet taken until
//!   none is left.
//!
//! Each reader parses, projects and encodes its rows itself ([`SnapshotRows::item`], the one
//! per-row step of both paths), on the runtime's worker threads, and queues the items on an
//! outbox of its own into the one reader → deliverer channel, taking each item's bytes from
//! the one memory budget (waiters take turns): memory stays bounded by `memory_limit` whatever
//! N is, plus per reader one COPY message, one row and its item. Events of different ranges
//! interleave; each key appears once in a snapshot, so the order per key is the one event.
//!
//! The handoff is unchanged: [`Item::SnapshotDone`] is queued by this task after every reader
//! finished without error and handed over everything it read, and after the control
//! transaction's commit; the stream resumes at C. The first reader's error, a shutdown, or a
//! deliverer that ended stops the whole full sync (the other readers are aborted with their
//! connections): it is still `running` in `_rudderstack`, and the next run does it again from
//! a new snapshot under the same generation, so rows that did not change get the same
//! messageIds.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tracing::Instrument;

use super::progress::Progress;
use super::*;
use crate::source::snapshot::{CopyRow, TidRange};

/// The reading half: full sync, then the stream.
pub(super) struct Reader<'a> {
    pub(super) config: &'a Config,
    pub(super) control: tokio_postgres::Client,
    pub(super) ctx: TableContext,
    pub(super) out: Outbox,
    /// Capacity of the replication session's event buffer (see [`MemoryPlan`]).
    pub(super) replication_events: usize,
    pub(super) ack_rx: watch::Receiver<Lsn>,
    pub(super) shutdown: watch::Receiver<bool>,
    /// Checks that the publication covers what the mapping needs.
    pub(super) verifier: Arc<Verifier>,
    /// The run's metrics and readiness.
    pub(super) metrics: Arc<Metrics>,
}

/// What a full sync that starts in this session is: the mapping it sends and its generation
/// (see `state::Checkpoint::next_full_sync_generation`).
#[derive(Clone, Copy)]
pub(super) struct FullSyncIdentity<'a> {
    pub(super) mapping_hash: &'a str,
    pub(super) generation: i64,
}

/// The span of one sync run's log lines (`--log-format json` carries it on each line): a full
/// sync, the stream of a session, or a window's delivery.
pub(super) fn sync_run_span(kind: &'static str, from: Lsn) -> tracing::Span {
    tracing::info_span!("sync_run", kind, from = %from)
}

/// Why the reader stopped without an error.
pub(super) enum Stop {
    Shutdown,
    ReachedTarget,
    DelivererGone,
}

/// The reader's end of the channel: items queue here and go to the deliverer in chunks.
///
/// Every item first takes its estimated size from the memory budget (see
/// [`crate::batch::budget`]); while the budget is spent the outbox hands over what it holds and
/// waits for the deliverer to give bytes back. Every wait also watches the channel's closing:
/// a deliverer that ended stops the reader at once.
pub(super) struct Outbox {
    pub(super) tx: mpsc::Sender<Chunk>,
    /// Items not yet handed to the deliverer, in WAL order (fewer than [`CHUNK_ITEMS`]), each
    /// with the bytes it took from the budget.
    pub(super) pending: Chunk,
    pub(super) budget: Arc<MemoryBudget>,
}

impl Outbox {
    pub(super) fn new(tx: mpsc::Sender<Chunk>, budget: Arc<MemoryBudget>) -> Self {
        Outbox {
            tx,
            pending: Vec::with_capacity(CHUNK_ITEMS),
            budget,
        }
    }

    /// Queues `item` for the deliverer; hands the queue over once it holds a full chunk.
    pub(super) async fn send(&mut self, item: Item) -> Result<(), Stop> {
        self.queue(item).await?;
        if self.pending.len() >= CHUNK_ITEMS {
            self.flush().await
        } else {
            Ok(())
        }
    }

    /// Queues `item` and hands the queue over now: at commits, keepalives and the end of the
    /// full sync, so a committed change never waits for later rows.
    pub(super) async fn send_now(&mut self, item: Item) -> Result<(), Stop> {
        self.queue(item).await?;
        self.flush().await
    }

    /// Takes the item's bytes from the budget (waiting if it is spent) and queues it.
    async fn queue(&mut self, item: Item) -> Result<(), Stop> {
        let bytes = item.budget_bytes();
        let taken = match self.budget.try_take(bytes) {
            Some(taken) => taken,
            None => {
                // Only the deliverer gives bytes back, and only for items it has: hand over
                // what is queued here before waiting.
                self.flush().await?;
                let budget = self.budget.clone();
                tokio::select! {
                    taken = budget.take(bytes) => taken,
                    () = self.tx.closed() => return Err(Stop::DelivererGone),
                }
            }
        };
        self.pending.push((item, taken));
        Ok(())
    }

    /// Hands the queued items to the deliverer (blocks while the channel is full; a closed
    /// channel ends the wait at once).
    pub(super) async fn flush(&mut self) -> Result<(), Stop> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.pending, Vec::with_capacity(CHUNK_ITEMS));
        self.tx.send(chunk).await.map_err(|_| Stop::DelivererGone)
    }

    /// Completes once the deliverer has ended (its end of the channel is gone). Owns a sender
    /// of its own, so one waiter can serve a whole loop while the outbox is in use.
    pub(super) fn deliverer_gone(&self) -> impl Future<Output = ()> + use<> {
        let tx = self.tx.clone();
        async move { tx.closed().await }
    }
}

impl Reader<'_> {
    /// The replication session's configuration, its event buffer sized from the memory budget.
    async fn replication_config(
        &self,
        start: Lsn,
        ack: Lsn,
    ) -> Result<pgwire_replication::ReplicationConfig, Error> {
        Ok(stream::replication_config(
            &self.config.source,
            &self.config.name,
            start,
            ack,
            self.replication_events,
        )
        .await?)
    }

    pub(super) async fn run(
        mut self,
        full_sync_reason: Option<String>,
        slot: Option<stream::SlotInfo>,
        checkpoint: Lsn,
        full_sync: FullSyncIdentity<'_>,
        once_target: Option<Lsn>,
    ) -> Result<(), Error> {
        let src = &self.config.source;
        let (session, start) = match full_sync_reason {
            Some(reason) => {
                tracing::info!(reason, "starting a full sync");
                // A usable slot stays (see `full_sync_on_kept_slot`); a missing one is created
                // with the snapshot, and so is one of ours the server invalidated. A slot that
                // is not this pipeline's is never dropped: `check_slot` stops the run.
                let keep = match &slot {
                    None => false,
                    Some(info) => {
                        match stream::check_slot(&src.slot, info, &src.database, &self.config.name)
                        {
                            Ok(()) => true,
                            Err(SourceError::SlotUnusable { reason, .. }) => {
                                tracing::warn!(slot = %src.slot, %reason, "the slot is invalidated: the full sync creates it again");
                                false
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                };
                let kept = if keep {
                    self.full_sync_on_kept_slot(checkpoint, full_sync).await?
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
                        let cfg = self.replication_config(snapshot_lsn, ack).await?;
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
                        let cfg = self.replication_config(Lsn::ZERO, Lsn::ZERO).await?;
                        let exported = stream::create_slot_with_snapshot(cfg, &src.slot).await?;
                        self.metrics.source_state(Some("full sync"), None);
                        state::begin_full_sync(
                            &self.control,
                            &self.config.name,
                            exported.consistent_point,
                            full_sync.mapping_hash,
                            full_sync.generation,
                            true,
                            &self.ctx.followed(),
                        )
                        .await?;
                        match self
                            .full_sync(
                                Some(&exported.snapshot_name),
                                exported.consistent_point,
                                full_sync.generation,
                            )
                            .instrument(sync_run_span("snapshot", exported.consistent_point))
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
                    Some(info) => {
                        stream::check_slot(&src.slot, info, &src.database, &self.config.name)?
                    }
                }
                let cfg = self.replication_config(checkpoint, checkpoint).await?;
                let session = ReplicationClient::connect(cfg)
                    .await
                    .map_err(SourceError::from)?;
                (session, checkpoint)
            }
        };
        let mut session = session;
        session.wait_started().await.map_err(SourceError::from)?;
        tracing::info!(slot = %src.slot, from = %start, "streaming");
        self.metrics.source_state(Some("streaming"), None);
        if once_target.is_some_and(|t| start >= t) {
            drop(self.out);
            return Ok(());
        }
        let result = self
            .stream(&mut session, once_target, None)
            .instrument(sync_run_span("stream", start))
            .await;
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
            while ack_rx.changed().await.is_ok() {
                session.update_applied_lsn(*ack_rx.borrow_and_update());
            }
            let last = *ack_rx.borrow();
            session.update_applied_lsn(last);
            // Until a status update carried the final position (one sent while the deliverer
            // was still draining carries an older one).
            let deadline = Instant::now() + Duration::from_secs(5);
            while metrics.last_applied_lsn() < last && Instant::now() < deadline {
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
    pub(super) async fn full_sync_on_kept_slot(
        &mut self,
        checkpoint: Lsn,
        full_sync: FullSyncIdentity<'_>,
    ) -> Result<Option<Result<Lsn, Stop>>, Error> {
        let src = &self.config.source;
        let name = &self.config.name;
        let temporary = stream::snapshot_slot_name(&src.slot);
        let cfg = self.replication_config(Lsn::ZERO, Lsn::ZERO).await?;
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
        self.metrics.source_state(Some("full sync"), None);
        // Recorded before the snapshot's transaction begins (it is read only). The checkpoint
        // stays: a crash from here on starts the full sync again and reads the slot from it.
        let followed = self.ctx.followed();
        state::begin_full_sync(
            &self.control,
            name,
            snapshot_lsn,
            full_sync.mapping_hash,
            full_sync.generation,
            false,
            &followed,
        )
        .await?;
        self.import_snapshot(&exported.snapshot_name).await?;
        // The imported snapshot belongs to this transaction now: the temporary slot can go.
        drop(exported.session);
        tracing::info!(slot = %src.slot, from = %checkpoint, to = %snapshot_lsn, "delivering the slot's changes up to the full sync's snapshot");
        let cfg = self.replication_config(checkpoint, checkpoint).await?;
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
            self.full_sync(None, snapshot_lsn, full_sync.generation)
                .instrument(sync_run_span("snapshot", snapshot_lsn))
                .await?
                .map(|()| snapshot_lsn),
        ))
    }

    /// Opens the full sync's transaction on the exported snapshot `snapshot_name`.
    pub(super) async fn import_snapshot(&self, snapshot_name: &str) -> Result<(), Error> {
        self.control
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                postgres::quote_literal(snapshot_name)
            ))
            .await
            .map_err(|e| PgError::query("importing the slot's snapshot", e))?;
        Ok(())
    }

    /// The full sync's read, inside the control connection's transaction that imported the
    /// exported snapshot (here when `snapshot_name` is given, else already by the caller):
    /// one COPY on the control connection, or ranges of the table read by parallel workers
    /// that share that transaction's snapshot (see the module's documentation). `generation`
    /// goes into the rows' messageIds. The transaction ends (its commit) once every reader
    /// finished; [`Item::SnapshotDone`] follows every row.
    pub(super) async fn full_sync(
        &mut self,
        snapshot_name: Option<&str>,
        snapshot_lsn: Lsn,
        generation: i64,
    ) -> Result<Result<(), Stop>, Error> {
        let mapping = &self.config.mapping;
        let table = &self.ctx.table;
        let qualified = format!("{}.{}", table.schema, table.name);
        let projection = Projection::resolve_without(
            mapping,
            &qualified,
            table.columns.iter().map(|c| (c.name.as_str(), c.type_oid)),
            &table.unsent_generated(),
        )
        .map_err(|e| Error::Mapping {
            hint: e.hint(),
            message: e.to_string(),
        })?;
        let query = SnapshotQuery::new(table, &projection, mapping.filter.as_deref());
        // Rows carry their key for the ledger (the full sync fills it).
        let keyed = query.has_row_key() && self.config.ledger;
        if let Some(snapshot_name) = snapshot_name {
            self.import_snapshot(snapshot_name).await?;
        }
        let plan = self.plan_readers().await?;
        let estimated_rows = table.estimated_rows;
        let timestamp = pg_micros_to_rfc3339(crate::transform::event::now_pg_micros());
        let rows_of = Arc::new(SnapshotRows {
            config: Arc::new(self.config.clone()),
            factory: self.ctx.factory.clone(),
            types: self.ctx.types.clone(),
            projection,
            query,
            keyed,
            generation,
            lsn: snapshot_lsn,
            stamp: Stamp::new(snapshot_lsn, &timestamp),
        });
        if let Err(stop) = self.out.flush().await {
            return Ok(Err(stop));
        }
        self.metrics.full_sync_started(estimated_rows);
        let counters = Arc::new(ReadCounters::default());
        let ranges_total = plan.ranges.len() as u64;
        let mut progress = Progress::new(estimated_rows, ranges_total, self.metrics.clone());
        let Reader {
            control,
            out,
            shutdown,
            ..
        } = self;
        let control: &tokio_postgres::Client = control;
        let progress_item = |rows: u64, ranges_done: u64| Item::SyncProgress {
            rows: i64::try_from(rows).unwrap_or(i64::MAX),
            ranges_done: i64::try_from(ranges_done).unwrap_or(i64::MAX),
            ranges_total: i64::try_from(ranges_total).unwrap_or(i64::MAX),
        };
        if let Err(stop) = out.send_now(progress_item(0, 0)).await {
            return Ok(Err(stop));
        }
        // The readers, and beside them the progress: the bar and the metrics every half
        // second, the log line and the sync run's row every few seconds.
        let read = {
            let (tx, budget) = (out.tx.clone(), out.budget.clone());
            let (shutdown, counters, rows_of) =
                (shutdown.clone(), counters.clone(), rows_of.clone());
            let (workers, ranges) = (plan.workers, plan.ranges.clone());
            async move {
                if workers <= 1 {
                    let mut rows_out = Outbox::new(tx, budget);
                    let mut shutdown = shutdown;
                    let read = copy_into(
                        control,
                        &rows_of.query.copy_sql(),
                        &rows_of,
                        &mut rows_out,
                        &mut shutdown,
                        &counters,
                    )
                    .await?;
                    if let Err(stop) = read {
                        return Ok(Err(stop));
                    }
                    counters.ranges_done.fetch_add(1, Ordering::Relaxed);
                    Ok(rows_out.flush().await)
                } else {
                    let snapshot = export_snapshot(control).await?;
                    read_in_parallel(ParallelRead {
                        config: rows_of.config.clone(),
                        snapshot,
                        ranges,
                        workers,
                        rows: rows_of,
                        tx,
                        budget,
                        shutdown,
                        counters,
                    })
                    .await
                }
            }
        };
        let read: Result<Result<(), Stop>, Error> = {
            let mut read = std::pin::pin!(read);
            let mut tick = tokio::time::interval(PROGRESS_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_recorded = Instant::now();
            loop {
                tokio::select! {
                    done = &mut read => break done,
                    _ = tick.tick() => {
                        let (rows, ranges_done) = counters.get();
                        progress.update(rows, ranges_done);
                        if last_recorded.elapsed() >= PROGRESS_LOG_INTERVAL {
                            last_recorded = Instant::now();
                            if let Err(stop) = out.send_now(progress_item(rows, ranges_done)).await {
                                break Ok(Err(stop));
                            }
                        }
                    }
                }
            }
        };
        match read? {
            Ok(()) => {}
            Err(Stop::Shutdown) => {
                tracing::warn!("shutdown during the full sync: it starts again on the next run");
                return Ok(Err(Stop::Shutdown));
            }
            Err(stop) => return Ok(Err(stop)),
        }
        control
            .batch_execute("COMMIT")
            .await
            .map_err(|e| PgError::query("ending the full sync transaction", e))?;
        let (rows, ranges_done) = counters.get();
        progress.update(rows, ranges_done);
        progress.finish();
        let rows = i64::try_from(rows).unwrap_or(i64::MAX);
        tracing::info!(
            rows,
            readers = plan.workers,
            ranges = ranges_total,
            "full sync read"
        );
        if let Err(stop) = out
            .send_now(progress_item(counters.get().0, ranges_done))
            .await
        {
            return Ok(Err(stop));
        }
        let done = Item::SnapshotDone {
            lsn: snapshot_lsn,
            rows,
        };
        if let Err(stop) = out.send_now(done).await {
            return Ok(Err(stop));
        }
        Ok(Ok(()))
    }

    /// How the full sync reads the table (in the snapshot's transaction): how many readers,
    /// and the `ctid` ranges they share out. One reader and one range (the whole table, on
    /// the control connection) for a partitioned table (its partitions' `ctid`s overlap and
    /// the parent has no pages of its own), a small one, or `snapshot_workers = 1`.
    async fn plan_readers(&self) -> Result<ReadPlan, Error> {
        let table = &self.ctx.table;
        let whole = |why: &str| {
            tracing::info!(readers = 1, why, "full sync: one reader");
            ReadPlan {
                workers: 1,
                ranges: vec![TidRange {
                    start: None,
                    end: None,
                }],
            }
        };
        if table.is_partitioned() {
            return Ok(whole("a partitioned table is read through its parent"));
        }
        let row = self
            .control
            .query_one(
                "SELECT pg_relation_size($1::oid), current_setting('block_size')::int8",
                &[&table.oid],
            )
            .await
            .map_err(|e| PgError::query("measuring the table for the full sync", e))?;
        let bytes = u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
        let block = u64::try_from(row.get::<_, i64>(1)).unwrap_or(8192).max(1);
        let pages = bytes / block;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let wanted = self
            .config
            .snapshot_workers
            .resolve(bytes, table.estimated_rows, cores);
        if wanted <= 1 {
            return Ok(whole("snapshot_workers is 1, or the table is small"));
        }
        // More ranges than readers: the work balances and "ranges done" moves; no range
        // under MIN_RANGE_PAGES.
        let count = (u64::from(wanted) * RANGES_PER_WORKER).min(pages / MIN_RANGE_PAGES);
        let ranges = TidRange::split(pages, count.max(1));
        let workers = wanted.min(u16::try_from(ranges.len()).unwrap_or(u16::MAX));
        if workers <= 1 {
            return Ok(whole("the table has too few pages to share out"));
        }
        tracing::info!(
            readers = workers,
            ranges = ranges.len(),
            pages,
            "full sync: parallel readers on one snapshot"
        );
        Ok(ReadPlan { workers, ranges })
    }

    /// Checks that the publication still covers what the mapping needs (a Relation message of
    /// the followed table says its definition, or the publication's, may have changed).
    pub(super) async fn verify_publication(&self) -> Result<(), Error> {
        self.verifier.verify(&self.control, true).await
    }

    /// The replication stream: decode, keep the followed table, transform, hand on.
    ///
    /// With `stop_before`, stops (`ReachedTarget`) before the first transaction whose commit
    /// lies at or after that position, or at a keepalive past it: every commit before it has
    /// then been handed on, and none after it.
    pub(super) async fn stream(
        &mut self,
        session: &mut ReplicationClient,
        once_target: Option<Lsn>,
        stop_before: Option<Lsn>,
    ) -> Result<Stop, Error> {
        let mut decoder = PgoutputDecoder::new(1);
        let factory = self.ctx.factory.clone();
        let wants_keys = self.config.ledger || self.config.schedule.schedule.is_windowed();
        let key_columns = self
            .ctx
            .table
            .row_key_columns()
            .filter(|_| wants_keys)
            .map(|c| c.into_iter().map(str::to_owned).collect());
        let mut mapper =
            ChangeMapper::new(self.config, &factory, self.ctx.table.oid).with_row_key(key_columns);
        mapper.seed_shape(
            self.ctx
                .table
                .columns
                .iter()
                .map(|c| crate::decode::pgoutput::RelationColumn {
                    is_key: c.replica_identity,
                    name: c.name.clone(),
                    type_oid: c.type_oid,
                    type_modifier: -1,
                })
                .collect(),
        );
        let mut ack_open = true;
        let mut shutdown = self.shutdown.clone();
        // One waiter for the whole stream: a `wait_for` per message would register and drop a
        // waiter each time.
        let mut shutdown_requested = std::pin::pin!(shutdown.wait_for(|s| *s));
        // Likewise one waiter for the deliverer's end: an idle stream may not send anything
        // for a long time, and a deliverer that failed must not wait for that.
        let mut deliverer_gone = std::pin::pin!(self.out.deliverer_gone());
        loop {
            let event = tokio::select! {
                biased;
                _ = &mut shutdown_requested => return Ok(Stop::Shutdown),
                () = &mut deliverer_gone => return Ok(Stop::DelivererGone),
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
                    if !mapper.in_transaction() {
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
                    mapper.begin(final_lsn, commit_time_micros);
                }
                ReplicationEvent::Commit { end_lsn, .. } => {
                    let counts = mapper.take_counts();
                    if !counts.is_empty() {
                        self.metrics.changes_received(&counts);
                    }
                    let item = mapper.commit(end_lsn);
                    if let Err(stop) = self.out.send_now(item).await {
                        return Ok(stop);
                    }
                    if once_target.is_some_and(|t| end_lsn >= t) {
                        return Ok(Stop::ReachedTarget);
                    }
                }
                ReplicationEvent::XLogData { data, .. } => {
                    let msg = decoder.decode(&data)?;
                    match mapper.map(msg, &self.ctx.types)? {
                        Mapped::Skip => {}
                        Mapped::Item(item) => {
                            if let Err(stop) = self.out.send(item).await {
                                return Ok(stop);
                            }
                        }
                        Mapped::OurRelation { unknown_types } => {
                            self.verify_publication().await?;
                            if !unknown_types.is_empty() {
                                postgres::types::load_types(
                                    &self.control,
                                    &mut self.ctx.types,
                                    &unknown_types,
                                )
                                .await
                                .map_err(|e| PgError::query("loading column types", e))?;
                            }
                            mapper.resolve_ours()?;
                        }
                    }
                }
                ReplicationEvent::Message { .. } => {}
                ReplicationEvent::StoppedAt { .. } => return Ok(Stop::ReachedTarget),
            }
        }
    }
}

/// How often the progress bar and the metrics follow the readers.
const PROGRESS_TICK: Duration = Duration::from_millis(500);
/// Ranges per parallel reader: more ranges than readers, so that a reader that finished early
/// takes another and "ranges done" moves.
const RANGES_PER_WORKER: u64 = 4;
/// The fewest heap pages in a range (256 KiB at 8 KiB pages).
const MIN_RANGE_PAGES: u64 = 32;
/// Rows a reader counts locally before adding them to the shared counter.
const COUNT_EVERY: u64 = 1024;

/// How a full sync reads the table.
struct ReadPlan {
    /// Connections reading at once (1: the control connection alone).
    workers: u16,
    /// The ranges, in page order; the first starts at the table's start, the last is
    /// open-ended.
    ranges: Vec<TidRange>,
}

/// The readers' progress, shared with the task that reports it.
#[derive(Default)]
struct ReadCounters {
    rows: AtomicU64,
    ranges_done: AtomicU64,
}

impl ReadCounters {
    fn get(&self) -> (u64, u64) {
        (
            self.rows.load(Ordering::Relaxed),
            self.ranges_done.load(Ordering::Relaxed),
        )
    }
}

/// What turns a snapshot row into an item, shared by every reader of one full sync.
pub(super) struct SnapshotRows {
    config: Arc<Config>,
    factory: EventFactory,
    types: TypeCatalog,
    projection: Projection,
    query: SnapshotQuery,
    /// Rows carry their key and traits hash for the ledger.
    keyed: bool,
    generation: i64,
    lsn: Lsn,
    stamp: Stamp,
}

impl SnapshotRows {
    /// One snapshot row → its item: project, messageId, ledger key and hash. The one per-row
    /// step of the full sync, whichever reader read the row. `traits_json` is a buffer the
    /// caller reuses from row to row (each row's traits as JSON, written once for its
    /// messageId and its ledger hash).
    fn item(&self, row: &CopyRow, traits_json: &mut Vec<u8>) -> Item {
        let (projected, key_text) = self.query.project(&self.projection, &self.types, row);
        traits_json.clear();
        projected.traits.write_json(traits_json);
        let traits_json: &[u8] = traits_json;
        let pipeline = &self.config.name;
        let generation = self.generation;
        let mut item = row_item(
            &self.config,
            &self.factory,
            projected,
            Op::Snapshot,
            self.lsn,
            &self.stamp,
            |_| snapshot_row_message_id_of_json(pipeline, generation, &key_text, traits_json),
        );
        if let Item::Row(row) = &mut item
            && self.keyed
        {
            row.key = Some(key_text);
            row.traits_hash = Some(crate::batch::ledger::traits_hash_of(
                row.event.user_id.as_deref(),
                row.event.anonymous_id.as_deref(),
                traits_json,
            ));
            debug_assert_eq!(
                row.traits_hash,
                Some(crate::batch::ledger::traits_hash(&row.event))
            );
        }
        item
    }
}

/// One COPY of the snapshot (`sql`, on `client`, whose transaction holds the snapshot): each
/// row made into its item and queued on `out`. Returns the rows read.
async fn copy_into(
    client: &tokio_postgres::Client,
    sql: &str,
    rows_of: &SnapshotRows,
    out: &mut Outbox,
    shutdown: &mut watch::Receiver<bool>,
    counters: &ReadCounters,
) -> Result<Result<u64, Stop>, Error> {
    let stream = client
        .copy_out(sql)
        .await
        .map_err(|e| PgError::query("starting the full sync COPY", e))?;
    let mut stream = std::pin::pin!(stream);
    let mut parser = CopyTextParser::new(rows_of.query.width());
    let mut traits_json: Vec<u8> = Vec::with_capacity(512);
    let mut rows: u64 = 0;
    let mut uncounted: u64 = 0;
    loop {
        let chunk = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return Ok(Err(Stop::Shutdown)),
            chunk = stream.next() => chunk,
        };
        let Some(chunk) = chunk else { break };
        let chunk = chunk.map_err(|e| PgError::query("reading the full sync's COPY", e))?;
        parser.push(&chunk);
        while let Some(row) = parser.next_row()? {
            let item = rows_of.item(row, &mut traits_json);
            if let Err(stop) = out.send(item).await {
                return Ok(Err(stop));
            }
            rows += 1;
            uncounted += 1;
            if uncounted >= COUNT_EVERY {
                counters.rows.fetch_add(uncounted, Ordering::Relaxed);
                uncounted = 0;
            }
        }
    }
    parser.finish()?;
    counters.rows.fetch_add(uncounted, Ordering::Relaxed);
    Ok(Ok(rows))
}

/// Exports the control transaction's snapshot (the one it imported) for the parallel readers:
/// valid while that transaction is open.
async fn export_snapshot(control: &tokio_postgres::Client) -> Result<String, Error> {
    let row = control
        .query_one("SELECT pg_export_snapshot()", &[])
        .await
        .map_err(|e| PgError::query("exporting the full sync's snapshot to its readers", e))?;
    Ok(row.get(0))
}

/// What the parallel readers share.
struct ParallelRead {
    config: Arc<Config>,
    /// The snapshot the control transaction exported.
    snapshot: String,
    ranges: Vec<TidRange>,
    workers: u16,
    rows: Arc<SnapshotRows>,
    tx: mpsc::Sender<Chunk>,
    budget: Arc<MemoryBudget>,
    shutdown: watch::Receiver<bool>,
    counters: Arc<ReadCounters>,
}

/// Reads the ranges with `workers` connections, each in a transaction on the shared snapshot,
/// taking the next range not yet taken until none is left. Every reader queues its items
/// itself (taking their bytes from the one budget). Ends with the first reader's error or
/// stop (the others are aborted: the full sync starts again on the next run), or once every
/// reader finished and handed over all it read.
async fn read_in_parallel(read: ParallelRead) -> Result<Result<(), Stop>, Error> {
    let read = Arc::new(read);
    let next = Arc::new(AtomicUsize::new(0));
    let mut readers = tokio::task::JoinSet::new();
    for worker in 0..read.workers {
        let (read, next) = (read.clone(), next.clone());
        readers.spawn(
            async move { read_ranges(&read, &next).await }
                .instrument(tracing::debug_span!("snapshot_reader", worker)),
        );
    }
    while let Some(done) = readers.join_next().await {
        match done {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(stop))) => return Ok(Err(stop)),
            Ok(Err(e)) => return Err(e),
            Err(e) => {
                return Err(Error::Internal(format!("a full sync reader failed: {e}")));
            }
        }
    }
    Ok(Ok(()))
}

/// One parallel reader: its connection imports the shared snapshot before anything else, then
/// it reads ranges until none is left.
async fn read_ranges(read: &ParallelRead, next: &AtomicUsize) -> Result<Result<(), Stop>, Error> {
    let client = postgres::connect(&read.config.source, &read.config.name)
        .await?
        .client;
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            postgres::quote_literal(&read.snapshot)
        ))
        .await
        .map_err(|e| PgError::query("importing the full sync's snapshot in a reader", e))?;
    let mut out = Outbox::new(read.tx.clone(), read.budget.clone());
    let mut shutdown = read.shutdown.clone();
    while let Some(range) = read.ranges.get(next.fetch_add(1, Ordering::Relaxed)) {
        let sql = read.rows.query.copy_range_sql(range);
        if let Err(stop) = copy_into(
            &client,
            &sql,
            &read.rows,
            &mut out,
            &mut shutdown,
            &read.counters,
        )
        .await?
        {
            return Ok(Err(stop));
        }
        read.counters.ranges_done.fetch_add(1, Ordering::Relaxed);
    }
    if let Err(stop) = out.flush().await {
        return Ok(Err(stop));
    }
    client
        .batch_execute("COMMIT")
        .await
        .map_err(|e| PgError::query("ending a full sync reader's transaction", e))?;
    Ok(Ok(()))
}
