//! The deliverer's schedule windows and whole-ledger operations (docs/architecture.md §4).
//!
//! A window's changes are coalesced in memory ([`Coalescer`]) and staged in `_rudderstack`
//! with each checkpoint (every second while changes arrive, or as soon as the coalescer holds
//! its byte cap), so the slot is acknowledged as the window fills. At the boundary (or on
//! `slotstream sync`, or at the end of `run --once`) the stage is delivered page by page: each
//! page is decided against the ledger, sent, and then removed from the stage in the
//! transaction that writes its ledger entries. The window's sync run is recorded and the next
//! window opened in one last transaction. A crash anywhere leaves the stage, ledger and
//! checkpoint consistent: the next run delivers what the stage still holds.

use super::deliver::unix_micros_now;
use super::*;
use crate::batch::ledger::{self, Sent};
use crate::batch::schedule::{self, Schedule};
use crate::batch::window::Coalescer;
use crate::postgres::ledger as ledger_store;
use tracing::Instrument;

/// How often a windowed pipeline looks for a `slotstream sync` request.
const SYNC_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Seconds since the epoch, now.
fn now_secs() -> i64 {
    unix_micros_now() / 1_000_000
}

/// The open window of a windowed pipeline.
pub(super) struct Window {
    pub(super) schedule: Schedule,
    pub(super) coalescer: Coalescer,
    /// Bytes the coalescer may hold before it is staged.
    pub(super) cap: u64,
    /// The boundary (seconds since the epoch); `None`: manual.
    ends_at: Option<i64>,
    /// Rows in the stage.
    pub(super) staged: i64,
    last_poll: Instant,
}

impl Window {
    /// A window for `schedule`, whose coalescer holds at most `cap` bytes.
    pub(super) fn new(schedule: Schedule, cap: u64) -> Self {
        Window {
            schedule,
            coalescer: Coalescer::new(),
            cap,
            ends_at: None,
            staged: 0,
            last_poll: Instant::now(),
        }
    }

    /// When the window closes, as an instant of the runtime's clock.
    pub(super) fn boundary(&self) -> Option<Instant> {
        let ends_at = self.ends_at?;
        let wait = (ends_at - now_secs()).max(0) as u64;
        Some(Instant::now() + Duration::from_secs(wait))
    }
}

impl Deliverer {
    /// Loads (or opens) the window at the start of a session. A stage left by a window whose
    /// boundary passed while slotstream was down (or by a schedule that is now realtime) is
    /// delivered at once.
    pub(super) async fn start_window(&mut self, sink: &mut dyn Sink) -> Result<(), Error> {
        let staged = ledger_store::staged_count(&self.control, &self.pipeline).await?;
        let stored = state::load_window(&self.control, &self.pipeline).await?;
        let Some(w) = self.window.as_mut() else {
            if staged > 0 {
                tracing::info!(
                    staged,
                    "the window stage holds rows of an earlier schedule: delivering them now"
                );
                let from = stored.start_lsn.unwrap_or(Lsn::ZERO);
                self.deliver_stage(sink, stored)
                    .instrument(super::read::sync_run_span("window", from))
                    .await?;
            }
            return Ok(());
        };
        w.staged = staged;
        let now = now_secs();
        let started = stored.started_at.unwrap_or(now);
        let ends_at = w.schedule.next_boundary(started);
        if stored.started_at.is_none() || stored.ends_at != ends_at {
            state::open_window(
                &self.control,
                &self.pipeline,
                started,
                ends_at,
                self.checkpoint,
            )
            .await?;
        }
        w.ends_at = ends_at;
        match ends_at {
            Some(end) => {
                tracing::info!(schedule = %w.schedule.describe(), opened = %schedule::rfc3339(started), closes = %schedule::rfc3339(end), staged, "window open")
            }
            None => {
                tracing::info!(schedule = %w.schedule.describe(), staged, "window open until `slotstream sync`")
            }
        }
        Ok(())
    }

    /// Whether the open window holds rows (in memory or staged).
    pub(super) fn window_holds_rows(&self) -> bool {
        self.window
            .as_ref()
            .is_some_and(|w| !w.coalescer.is_empty() || w.staged > 0)
    }

    /// Stages what the coalescer holds with a checkpoint at the last commit read (everything
    /// before it is in the coalescer or the stage).
    pub(super) async fn stage_window(&mut self) -> Result<(), Error> {
        let Some(w) = self.window.as_mut() else {
            return Ok(());
        };
        let (rows, moved) = w.coalescer.take();
        self.verifier.verify(&self.control, true).await?;
        let to = self.durable.max(self.idle.unwrap_or(Lsn::ZERO));
        self.write_checkpoint_with(to, Some(state::StageWrite { rows, moved }))
            .await
    }

    /// Delivers the open window now (`why` for the log), then opens the next one.
    pub(super) async fn deliver_window(
        &mut self,
        sink: &mut dyn Sink,
        why: &str,
    ) -> Result<(), Error> {
        if self.window.is_none() {
            return Ok(());
        }
        self.flush(sink).await?;
        self.stage_window().await?;
        let stored = state::load_window(&self.control, &self.pipeline).await?;
        tracing::info!(why, "delivering the window");
        let from = stored.start_lsn.unwrap_or(Lsn::ZERO);
        self.deliver_stage(sink, stored)
            .instrument(super::read::sync_run_span("window", from))
            .await
    }

    /// Delivers the stage page by page, records the window's sync run and opens the next
    /// window.
    async fn deliver_stage(
        &mut self,
        sink: &mut dyn Sink,
        stored: state::WindowState,
    ) -> Result<(), Error> {
        let started = unix_micros_now();
        ledger_store::resolve_moves(&self.control, &self.pipeline).await?;
        let page_size = self.batch_page_size();
        let (mut events_sent, mut staged, mut unchanged, mut dead) = (0i64, 0i64, 0i64, 0i64);
        loop {
            let page =
                ledger_store::stage_page(&self.control, &self.pipeline, &self.factory, page_size)
                    .await?;
            if page.is_empty() {
                break;
            }
            staged += page.len() as i64;
            let mut keys = Vec::with_capacity(page.len());
            let mut rows = Vec::with_capacity(page.len());
            let mut moved = Vec::with_capacity(page.len());
            for s in page {
                keys.push(s.stage_key);
                rows.push(s.row);
                moved.push(s.moved_from);
            }
            let before = (
                self.stretch.unchanged,
                self.stretch.dead_letters.len(),
                self.stretch.events,
            );
            let decided = self.decide(rows, Some(moved)).await?;
            let writes = self.send(sink, decided).await?;
            unchanged += self.stretch.unchanged - before.0;
            dead += (self.stretch.dead_letters.len() - before.1) as i64;
            events_sent += self.stretch.events - before.2;
            self.stretch.events = before.2;
            let dead_letters: Vec<DeadLetter> =
                self.stretch.dead_letters.drain(before.1..).collect();
            let tx = self
                .control
                .transaction()
                .await
                .map_err(|e| PgError::query("starting a window page's transaction", e))?;
            ledger_store::unstage(&tx, &self.pipeline, &keys).await?;
            ledger_store::write_ledger(&tx, &self.pipeline, self.generation, &writes).await?;
            state::insert_dead_letters(&tx, &self.pipeline, &dead_letters).await?;
            tx.commit()
                .await
                .map_err(|e| PgError::query("committing a window page", e))?;
            self.metrics.dead_lettered(dead_letters.len() as u64);
        }
        self.stretch.unchanged -= unchanged;
        let now = now_secs();
        // A window closes at its boundary, or now when it closes early (sync, --once, TRUNCATE).
        let closed_at = stored.ends_at.filter(|e| *e <= now).unwrap_or(now);
        let next_ends_at = self
            .window
            .as_ref()
            .and_then(|w| w.schedule.next_boundary(now));
        let run = state::WindowRun {
            window: stored,
            end_lsn: self.checkpoint,
            events: events_sent,
            staged,
            unchanged,
            dead_letters: dead,
            started_unix_micros: started,
            next_ends_at,
            next_started_at: closed_at,
        };
        state::close_window(&mut self.control, &self.pipeline, &run).await?;
        self.metrics
            .coalesced(u64::try_from(run.window.rows - staged).unwrap_or(0));
        if let Some(opened) = run.window.started_at
            && run.window.rows > 0
        {
            // One observation per window: from its opening to its delivery.
            self.metrics
                .delivered_change(opened.saturating_mul(1_000_000));
        }
        if let Some(w) = self.window.as_mut() {
            w.staged = 0;
            w.ends_at = next_ends_at;
        }
        tracing::info!(
            rows = run.window.rows,
            coalesced_into = staged,
            events = events_sent,
            unchanged,
            dead_letters = dead,
            next = %next_ends_at.map(schedule::rfc3339).unwrap_or_else(|| "on `slotstream sync`".into()),
            "window delivered"
        );
        Ok(())
    }

    fn batch_page_size(&self) -> i64 {
        self.page_size.max(1) as i64
    }

    /// Delivers the window if `slotstream sync` asked for it (checked once a second).
    pub(super) async fn poll_sync_request(&mut self, sink: &mut dyn Sink) -> Result<(), Error> {
        let Some(w) = self.window.as_mut() else {
            return Ok(());
        };
        if w.last_poll.elapsed() < SYNC_POLL_INTERVAL {
            return Ok(());
        }
        w.last_poll = Instant::now();
        if state::sync_requested(&self.control, &self.pipeline).await? {
            self.deliver_window(sink, "`slotstream sync` asked for it")
                .await?;
        }
        Ok(())
    }

    /// A TRUNCATE in mirror mode: what came before it is delivered (the window closes early),
    /// then `Record Deleted` goes out for every row the ledger holds, page by page; each page
    /// leaves the ledger once delivered.
    pub(super) async fn truncate(
        &mut self,
        sink: &mut dyn Sink,
        template: Event,
    ) -> Result<(), Error> {
        self.flush(sink).await?;
        if self.window.is_some() {
            self.deliver_window(sink, "the table was truncated").await?;
        }
        // The ledger in the database must hold every delivery before it is read.
        self.commit_checkpoint(self.durable).await?;
        let n = self.delete_ledger_rows(sink, &template, None).await?;
        tracing::warn!(
            deleted = n,
            "TRUNCATE: Record Deleted sent for every row the ledger held"
        );
        Ok(())
    }

    /// Sends `Record Deleted` for the ledger's entries (all of them, or those a full sync of
    /// generation `older_than` did not see), page by page, removing each page once delivered.
    async fn delete_ledger_rows(
        &mut self,
        sink: &mut dyn Sink,
        template: &Event,
        older_than: Option<i64>,
    ) -> Result<i64, Error> {
        let page_size = self.batch_page_size();
        let mut sent = 0i64;
        let mut after = String::new();
        loop {
            let page = ledger_store::ledger_page(
                &self.control,
                &self.pipeline,
                &after,
                older_than,
                page_size,
            )
            .await?;
            let Some((last, _)) = page.last() else {
                break;
            };
            after.clone_from(last);
            let mut decided = super::deliver::Decided {
                events: Vec::with_capacity(page.len()),
                keys: Vec::with_capacity(page.len()),
                writes: std::collections::HashMap::with_capacity(page.len()),
            };
            for (k, s) in page {
                if s.user_id.is_some() || s.anonymous_id.is_some() {
                    decided.events.push(ledger::deleted_event(template, &s, &k));
                    decided.keys.push(Some(k.clone()));
                }
                decided.writes.insert(k, None);
            }
            let before = self.stretch.events;
            // A delete the destination refused for good keeps its entry (and is a dead letter).
            let gone = self.send(sink, decided).await?;
            sent += self.stretch.events - before;
            ledger_store::write_ledger(&self.control, &self.pipeline, self.generation, &gone)
                .await?;
        }
        Ok(sent)
    }

    /// After a full sync delivered its rows: entries of rows it did not see (gone from the
    /// table) leave the ledger; with `resync --changed-only` in mirror mode they get
    /// `Record Deleted` first.
    pub(super) async fn settle_ledger_after_full_sync(
        &mut self,
        sink: &mut dyn Sink,
    ) -> Result<(), Error> {
        if !self.rules.ledger {
            return Ok(());
        }
        if self.rules.mirror && !self.rules.resend_snapshot {
            let stamp = crate::transform::event::Stamp::new(
                self.durable,
                &crate::transform::event::now_rfc3339(),
            );
            let empty = crate::transform::ProjectedRow {
                user_id: None,
                anonymous_id: None,
                traits: crate::transform::Traits::default(),
            };
            let base = crate::transform::event::snapshot_message_id(
                &self.pipeline,
                self.generation,
                "rows gone",
            );
            let template = self.factory.deleted(empty, &stamp, base);
            let n = self
                .delete_ledger_rows(sink, &template, Some(self.generation))
                .await?;
            tracing::info!(
                deleted = n,
                "resync --changed-only: Record Deleted for rows no longer in the table"
            );
        }
        let dropped =
            ledger_store::drop_unseen(&self.control, &self.pipeline, self.generation).await?;
        if dropped > 0 {
            tracing::info!(
                dropped,
                "ledger entries of rows no longer in the table dropped"
            );
        }
        Ok(())
    }
}

/// Writes a full sync's ledger entries on a connection of its own, while the next batches are
/// read and delivered: filling the ledger (one row per table row) then overlaps the full sync
/// instead of adding to it. At most [`FILLER_QUEUE`] batches wait; the full sync is done only
/// once every write has landed ([`LedgerFiller::finish`]).
pub(super) struct LedgerFiller {
    tx: mpsc::Sender<Vec<(String, Option<Sent>)>>,
    task: tokio::task::JoinHandle<Result<(), Error>>,
}

/// Batches of ledger writes that may wait for the filler.
const FILLER_QUEUE: usize = 2;

impl LedgerFiller {
    /// Connects and starts writing for `pipeline` at `generation`.
    pub(super) async fn start(config: &Config, generation: i64) -> Result<Self, Error> {
        let client = connect_control(config).await?;
        let pipeline = config.name.clone();
        let (tx, mut rx) = mpsc::channel::<Vec<(String, Option<Sent>)>>(FILLER_QUEUE);
        let task = tokio::spawn(async move {
            // New entries go in by COPY until a key turns out to have one already (a resync,
            // or a full sync started again): from then on, by the upsert.
            let mut copy = true;
            while let Some(writes) = rx.recv().await {
                if copy && writes.iter().all(|(_, e)| e.is_some()) {
                    copy = ledger_store::copy_new_entries(&client, &pipeline, generation, &writes)
                        .await?;
                    if copy {
                        continue;
                    }
                    tracing::debug!("the ledger holds entries already: filling it by upsert");
                }
                ledger_store::write_ledger(&client, &pipeline, generation, &writes).await?;
            }
            Ok(())
        });
        Ok(LedgerFiller { tx, task })
    }

    /// Queues one delivered batch's writes (waits while the queue is full).
    pub(super) async fn write(&mut self, writes: Vec<(String, Option<Sent>)>) -> Result<(), Error> {
        if self.tx.send(writes).await.is_ok() {
            return Ok(());
        }
        // The writer ended (its receiver is gone): its error says why.
        Err(joined(&mut self.task).await.err().unwrap_or_else(|| {
            Error::Internal("the ledger writer of the full sync ended early".into())
        }))
    }

    /// Waits until every queued write landed.
    pub(super) async fn finish(self) -> Result<(), Error> {
        let LedgerFiller { tx, mut task } = self;
        drop(tx);
        joined(&mut task).await
    }
}

/// The writer task's outcome.
async fn joined(task: &mut tokio::task::JoinHandle<Result<(), Error>>) -> Result<(), Error> {
    match task.await {
        Ok(r) => r,
        Err(e) => Err(Error::Internal(format!(
            "the ledger writer of the full sync failed: {e}"
        ))),
    }
}
