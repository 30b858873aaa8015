//! The reading half: the full sync's COPY, then the replication stream, decoded and
//! transformed into items for the deliverer.

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
    fn replication_config(&self, start: Lsn, ack: Lsn) -> pgwire_replication::ReplicationConfig {
        stream::replication_config(
            &self.config.source,
            &self.config.name,
            start,
            ack,
            self.replication_events,
        )
    }

    pub(super) async fn run(
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
                        let cfg = self.replication_config(snapshot_lsn, ack);
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
                        let cfg = self.replication_config(Lsn::ZERO, Lsn::ZERO);
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
                let cfg = self.replication_config(checkpoint, checkpoint);
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
    pub(super) async fn full_sync_on_kept_slot(
        &mut self,
        checkpoint: Lsn,
        hash: &str,
    ) -> Result<Option<Result<Lsn, Stop>>, Error> {
        let src = &self.config.source;
        let name = &self.config.name;
        let temporary = stream::snapshot_slot_name(&src.slot);
        let cfg = self.replication_config(Lsn::ZERO, Lsn::ZERO);
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
        let cfg = self.replication_config(checkpoint, checkpoint);
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
    /// (here when `snapshot_name` is given, else already by the caller).
    pub(super) async fn full_sync(
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
    pub(super) fn row_item(
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
    pub(super) async fn stream(
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
        // Likewise one waiter for the deliverer's end: an idle stream may not send anything
        // for a long time, and a deliverer that failed must not wait for that.
        let mut deliverer_gone = std::pin::pin!(self.out.deliverer_gone());
        let qualified = format!("{}.{}", src.schema, src.table);
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
pub(super) fn project_tuple(
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
