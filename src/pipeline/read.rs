//! The reading half: the full sync's COPY, then the replication stream, decoded and
//! transformed into items for the deliverer.

use tracing::Instrument;

use super::progress::Progress;
use super::*;

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
    budget: Arc<MemoryBudget>,
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

    /// The COPY of the full sync, inside a transaction that imported the exported snapshot
    /// (here when `snapshot_name` is given, else already by the caller). `generation` goes into
    /// the rows' messageIds.
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
        let stream = self
            .control
            .copy_out(&query.copy_sql())
            .await
            .map_err(|e| PgError::query("starting the full sync COPY", e))?;
        let mut stream = std::pin::pin!(stream);
        let mut parser = CopyTextParser::new(query.width());
        self.metrics.full_sync_started(table.estimated_rows);
        let mut progress = Progress::new(table.estimated_rows, self.metrics.clone());
        let timestamp = pg_micros_to_rfc3339(crate::transform::event::now_pg_micros());
        let stamp = Stamp::new(snapshot_lsn, &timestamp);
        let mut rows: i64 = 0;
        // Each row's traits as JSON, written once for its messageId and its ledger hash (the
        // buffer is reused from row to row).
        let mut traits_json: Vec<u8> = Vec::with_capacity(512);
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
            let chunk = chunk.map_err(|e| PgError::query("reading the full sync's COPY", e))?;
            parser.push(&chunk);
            while let Some(row) = parser.next_row()? {
                rows += 1;
                let (projected, key_text) = query.project(&projection, &self.ctx.types, row);
                traits_json.clear();
                projected.traits.write_json(&mut traits_json);
                let pipeline = &self.config.name;
                let mut item = row_item(
                    self.config,
                    &self.ctx.factory,
                    projected,
                    Op::Snapshot,
                    snapshot_lsn,
                    &stamp,
                    |_| {
                        snapshot_row_message_id_of_json(
                            pipeline,
                            generation,
                            &key_text,
                            &traits_json,
                        )
                    },
                );
                if let Item::Row(row) = &mut item
                    && keyed
                {
                    row.key = Some(key_text);
                    row.traits_hash = Some(crate::batch::ledger::traits_hash_of(
                        row.event.user_id.as_deref(),
                        row.event.anonymous_id.as_deref(),
                        &traits_json,
                    ));
                    debug_assert_eq!(
                        row.traits_hash,
                        Some(crate::batch::ledger::traits_hash(&row.event))
                    );
                }
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
