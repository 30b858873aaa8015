//! The pipeline's state in the `_rudderstack` schema (docs/architecture.md §6), created and migrated by
//! slotstream itself.
//!
//! - `cdc_checkpoints`: one row per pipeline. `lsn` is the position up to which every change is
//!   durably delivered; the UPDATE that moves it carries `WHERE lsn <= new`, so it never moves
//!   backward whatever the caller does (invariant 2). `full_sync_generation` counts the full
//!   syncs started anew (not restarts of an interrupted one); it is part of the snapshot
//!   messageIds, so a resync re-sends under new ids.
//! - `cdc_sync_runs`: one row per checkpointed stretch of delivery (the user's sync history),
//!   pruned to the configured retention by [`prune_sync_runs`].
//! - `cdc_dead_letters`: rows that could not become events, with the reason. Each carries the
//!   messageId its event would have had, unique per pipeline: a replay of a transaction (after a
//!   crash or a failed delivery) does not write its dead letters twice.
//!
//! Migrations are numbered; each runs once, in a transaction, under an advisory lock so two
//! processes starting together do not race. The seed's grants (`GRANT ALL ON SCHEMA
//! "_rudderstack"`) are enough to create everything here.

use tokio_postgres::Client;
use tokio_postgres::types::PgLsn;

use super::PgError;
use crate::Lsn;

/// Advisory lock key that serialises migrations (any fixed number unique to slotstream).
const MIGRATION_LOCK: i64 = 0x5106_5173_7265_616d;

/// The numbered migrations, applied in order.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        r#"
CREATE TABLE "_rudderstack".cdc_checkpoints (
    pipeline         text PRIMARY KEY,
    slot             text NOT NULL,
    publication      text NOT NULL,
    schema_name      text NOT NULL,
    table_name       text NOT NULL,
    lsn              pg_lsn NOT NULL DEFAULT '0/0',
    mapping_hash     text,
    full_sync_state  text NOT NULL DEFAULT 'pending'
                     CHECK (full_sync_state IN ('pending', 'running', 'done')),
    full_sync_lsn    pg_lsn,
    full_sync_rows   bigint NOT NULL DEFAULT 0,
    resync_requested boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE "_rudderstack".cdc_sync_runs (
    id          bigserial PRIMARY KEY,
    pipeline    text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('snapshot', 'stream')),
    start_lsn   pg_lsn,
    end_lsn     pg_lsn,
    rows        bigint NOT NULL DEFAULT 0,
    events      bigint NOT NULL DEFAULT 0,
    dead_letters bigint NOT NULL DEFAULT 0,
    status      text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    error       text,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE INDEX cdc_sync_runs_pipeline_idx ON "_rudderstack".cdc_sync_runs (pipeline, id DESC);
CREATE TABLE "_rudderstack".cdc_dead_letters (
    id         bigserial PRIMARY KEY,
    pipeline   text NOT NULL,
    lsn        pg_lsn,
    op         text NOT NULL,
    reason     text NOT NULL,
    payload    jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cdc_dead_letters_pipeline_idx ON "_rudderstack".cdc_dead_letters (pipeline, id);
"#,
    ),
    (
        2,
        // The followed table's identity: schema and table name change with a rename, the OID
        // does not, and a table dropped and created again under the same name gets a new one.
        // The identifier columns the last full sync used, by role: {"user_id": {"name": …,
        // "attnum": …}, …}; the attnum tells a renamed column from a dropped one.
        r#"ALTER TABLE "_rudderstack".cdc_checkpoints ADD COLUMN table_oid oid;
           ALTER TABLE "_rudderstack".cdc_checkpoints ADD COLUMN identifier_columns jsonb;"#,
    ),
    (
        3,
        r#"
ALTER TABLE "_rudderstack".cdc_checkpoints
    ADD COLUMN full_sync_generation bigint NOT NULL DEFAULT 0;
ALTER TABLE "_rudderstack".cdc_dead_letters ADD COLUMN message_id uuid;
CREATE UNIQUE INDEX cdc_dead_letters_message_idx
    ON "_rudderstack".cdc_dead_letters (pipeline, message_id);
"#,
    ),
    (
        4,
        // Schedule windows, the window stage and the sent-state ledger (see `super::ledger`).
        r#"
ALTER TABLE "_rudderstack".cdc_checkpoints
    ADD COLUMN window_started_at   timestamptz,
    ADD COLUMN window_ends_at      timestamptz,
    ADD COLUMN window_start_lsn    pg_lsn,
    ADD COLUMN window_rows         bigint NOT NULL DEFAULT 0,
    ADD COLUMN window_dead_letters bigint NOT NULL DEFAULT 0,
    ADD COLUMN sync_requested      boolean NOT NULL DEFAULT false,
    ADD COLUMN resync_changed_only boolean NOT NULL DEFAULT false;
ALTER TABLE "_rudderstack".cdc_sync_runs DROP CONSTRAINT IF EXISTS cdc_sync_runs_kind_check;
ALTER TABLE "_rudderstack".cdc_sync_runs ADD CONSTRAINT cdc_sync_runs_kind_check
    CHECK (kind IN ('snapshot', 'stream', 'window'));
ALTER TABLE "_rudderstack".cdc_sync_runs
    ADD COLUMN window_start timestamptz,
    ADD COLUMN window_end   timestamptz,
    ADD COLUMN coalesced    bigint NOT NULL DEFAULT 0,
    ADD COLUMN unchanged    bigint NOT NULL DEFAULT 0;
CREATE TABLE "_rudderstack".cdc_ledger (
    pipeline     text NOT NULL,
    row_key      text NOT NULL,
    user_id      text,
    anonymous_id text,
    traits_hash  bytea,
    generation   bigint NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, row_key)
);
CREATE TABLE "_rudderstack".cdc_window_stage (
    pipeline           text NOT NULL,
    row_key            text NOT NULL,
    old_key            text,
    fresh              boolean NOT NULL,
    partial            boolean NOT NULL,
    kind               text NOT NULL CHECK (kind IN ('identify', 'delete')),
    message_id         uuid NOT NULL,
    user_id            text,
    anonymous_id       text,
    payload            json,
    op                 text NOT NULL,
    lsn                text NOT NULL,
    original_timestamp text NOT NULL,
    moved_resolved     boolean NOT NULL DEFAULT false,
    moved_user_id      text,
    moved_anonymous_id text,
    moved_hash         bytea,
    moved_known        boolean NOT NULL DEFAULT false,
    PRIMARY KEY (pipeline, row_key)
);
"#,
    ),
    (
        5,
        // A full sync's run is recorded when it starts ('running') and follows its read: rows
        // and the ctid ranges read of all (see `record_full_sync_progress`).
        r#"
ALTER TABLE "_rudderstack".cdc_sync_runs
    ADD COLUMN ranges_done  integer,
    ADD COLUMN ranges_total integer;
"#,
    ),
];

/// Where the first full sync stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullSyncState {
    /// Not started.
    Pending,
    /// Started, not finished: the next run starts it again.
    Running,
    /// Finished: the stream resumes at the checkpoint.
    Done,
}

impl FullSyncState {
    fn parse(s: &str) -> FullSyncState {
        match s {
            "done" => FullSyncState::Done,
            "running" => FullSyncState::Running,
            _ => FullSyncState::Pending,
        }
    }

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            FullSyncState::Pending => "pending",
            FullSyncState::Running => "running",
            FullSyncState::Done => "done",
        }
    }
}

/// One pipeline's checkpoint row.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Pipeline name.
    pub pipeline: String,
    /// Slot the pipeline reads.
    pub slot: String,
    /// Delivered-and-durable position.
    pub lsn: Lsn,
    /// Hash of the mapping the last full sync used.
    pub mapping_hash: Option<String>,
    /// Full-sync progress.
    pub full_sync_state: FullSyncState,
    /// The snapshot position of the current (or last) full sync.
    pub full_sync_lsn: Option<Lsn>,
    /// `slotstream resync` was run.
    pub resync_requested: bool,
    /// Schema of the followed table, as of the last full sync (or rename seen since).
    pub schema_name: String,
    /// Name of the followed table, as of the last full sync (or rename seen since).
    pub table_name: String,
    /// `pg_class.oid` of the table the last full sync read; `None` before the first one.
    pub table_oid: Option<u32>,
    /// The identifier columns the last full sync used (see [`IdentifierColumnState`]).
    pub identifier_columns: Vec<IdentifierColumnState>,
    /// Full syncs started anew so far (0 before the first).
    pub full_sync_generation: i64,
    /// `slotstream resync --changed-only`: the next full sync sends only rows that differ from
    /// the ledger (and, in mirror mode, deletes for rows gone).
    pub resync_changed_only: bool,
}

/// One identifier column as the last full sync used it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdentifierColumnState {
    /// `user_id`, `anonymous_id` or `email`.
    pub role: String,
    /// The column's name then.
    pub name: String,
    /// Its `attnum`, which a rename keeps.
    pub attnum: i16,
}

impl Checkpoint {
    /// The generation the full sync that starts now belongs to: the same as the stored one when
    /// it restarts an interrupted full sync of the same mapping (its rows are re-sent under the
    /// same messageIds), else the next one (a first run, `slotstream resync`, a mapping change:
    /// every row is sent under a new messageId).
    pub fn next_full_sync_generation(&self, mapping_hash: &str) -> i64 {
        let restart = self.full_sync_state == FullSyncState::Running
            && !self.resync_requested
            && self.mapping_hash.as_deref() == Some(mapping_hash);
        if restart {
            self.full_sync_generation
        } else {
            self.full_sync_generation + 1
        }
    }
}

/// A dead letter: a row that could not be sent, and why.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Commit LSN (or snapshot LSN) of the row.
    pub lsn: Lsn,
    /// insert / update / delete / snapshot.
    pub op: &'static str,
    /// Why it was not sent.
    pub reason: String,
    /// The row's traits as they would have been sent.
    pub payload: serde_json::Value,
    /// The messageId its event would have had: the same when the row is read again (a replay
    /// of its transaction, a restarted full sync), so it is stored once.
    pub message_id: uuid::Uuid,
}

fn lsn_param(lsn: Lsn) -> PgLsn {
    PgLsn::from(lsn.as_u64())
}

fn lsn_from(v: PgLsn) -> Lsn {
    Lsn::from_u64(u64::from(v))
}

/// Creates the state tables, or brings them to the newest version.
pub async fn migrate(client: &mut Client) -> Result<(), PgError> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| PgError::query("starting the _rudderstack migration", e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| PgError::query("locking the _rudderstack migration", e))?;
    tx.batch_execute(
        r#"CREATE TABLE IF NOT EXISTS "_rudderstack".cdc_schema_migrations (
               version    int PRIMARY KEY,
               applied_at timestamptz NOT NULL DEFAULT now())"#,
    )
    .await
    .map_err(|e| PgError::query("creating _rudderstack.cdc_schema_migrations", e))?;
    let current: i32 = tx
        .query_one(
            r#"SELECT coalesce(max(version), 0) FROM "_rudderstack".cdc_schema_migrations"#,
            &[],
        )
        .await
        .map_err(|e| PgError::query("reading the state schema version", e))?
        .get(0);
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(sql)
            .await
            .map_err(|e| PgError::query(format!("applying state migration {version}"), e))?;
        tx.execute(
            r#"INSERT INTO "_rudderstack".cdc_schema_migrations (version) VALUES ($1)"#,
            &[version],
        )
        .await
        .map_err(|e| PgError::query("recording the state migration", e))?;
    }
    tx.commit()
        .await
        .map_err(|e| PgError::query("committing the _rudderstack migration", e))
}

/// Whether the state tables exist (commands that do not migrate, such as `status`, may run
/// before the first `run` created them).
async fn state_tables_exist(client: &Client) -> Result<bool, PgError> {
    Ok(client
        .query_one(
            r#"SELECT to_regclass('"_rudderstack".cdc_checkpoints') IS NOT NULL"#,
            &[],
        )
        .await
        .map_err(|e| PgError::query("looking for the state tables", e))?
        .get(0))
}

/// Reads the pipeline's checkpoint row, if there is one (tolerates missing state tables).
pub async fn load(client: &Client, pipeline: &str) -> Result<Option<Checkpoint>, PgError> {
    if !state_tables_exist(client).await? {
        return Ok(None);
    }
    // The generation is read through to_jsonb so that `status` and `teardown`, which do not
    // migrate, also read a state schema from before migration 3.
    let row = client
        .query_opt(
            r#"SELECT pipeline, slot, lsn, mapping_hash, full_sync_state, full_sync_lsn,
                      resync_requested, schema_name, table_name,
                      (to_jsonb(c) ->> 'table_oid')::oid,
                      to_jsonb(c) -> 'identifier_columns',
                      coalesce((to_jsonb(c) ->> 'full_sync_generation')::int8, 0),
                      coalesce((to_jsonb(c) ->> 'resync_changed_only')::bool, false)
                 FROM "_rudderstack".cdc_checkpoints c WHERE pipeline = $1"#,
            &[&pipeline],
        )
        .await
        .map_err(|e| PgError::query("reading the checkpoint", e))?;
    Ok(row.map(|r| Checkpoint {
        pipeline: r.get(0),
        slot: r.get(1),
        lsn: lsn_from(r.get(2)),
        mapping_hash: r.get(3),
        full_sync_state: FullSyncState::parse(r.get::<_, &str>(4)),
        full_sync_lsn: r.get::<_, Option<PgLsn>>(5).map(lsn_from),
        resync_requested: r.get(6),
        schema_name: r.get(7),
        table_name: r.get(8),
        table_oid: r.get(9),
        identifier_columns: r
            .get::<_, Option<serde_json::Value>>(10)
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default(),
        full_sync_generation: r.get(11),
        resync_changed_only: r.get(12),
    }))
}

/// Inserts the checkpoint row for a new pipeline and returns it. For an existing pipeline only
/// the slot and publication names follow the config: the followed table's names and OID are
/// the state of the last full sync, which `run` compares with the config to tell a renamed
/// table from a different one (see [`begin_full_sync`] and [`record_table_rename`]).
pub async fn ensure(
    client: &Client,
    pipeline: &str,
    slot: &str,
    publication: &str,
    schema: &str,
    table: &str,
) -> Result<Checkpoint, PgError> {
    client
        .execute(
            r#"INSERT INTO "_rudderstack".cdc_checkpoints
                   (pipeline, slot, publication, schema_name, table_name)
               VALUES ($1, $2, $3, $4, $5)
               ON CONFLICT (pipeline) DO UPDATE
                  SET slot = EXCLUDED.slot, publication = EXCLUDED.publication"#,
            &[&pipeline, &slot, &publication, &schema, &table],
        )
        .await
        .map_err(|e| PgError::query("creating the checkpoint row", e))?;
    load(client, pipeline).await?.ok_or_else(|| PgError::Query {
        what: "reading the checkpoint row just written".into(),
        detail: "the row is not there".into(),
        code: None,
    })
}

/// Another pipeline of this database whose state names `slot` as its slot, if any (none
/// without state tables).
pub async fn other_pipeline_using_slot(
    client: &Client,
    pipeline: &str,
    slot: &str,
) -> Result<Option<String>, PgError> {
    if !state_tables_exist(client).await? {
        return Ok(None);
    }
    let row = client
        .query_opt(
            r#"SELECT pipeline FROM "_rudderstack".cdc_checkpoints
                WHERE slot = $1 AND pipeline <> $2 ORDER BY pipeline LIMIT 1"#,
            &[&slot, &pipeline],
        )
        .await
        .map_err(|e| PgError::query("looking for other pipelines on the slot", e))?;
    Ok(row.map(|r| r.get(0)))
}

/// Marks a full sync of `generation` (see [`Checkpoint::next_full_sync_generation`]) as started
/// at `snapshot_lsn` with `mapping_hash`. With `new_slot` the
/// checkpoint LSN is reset to the snapshot position: the new slot starts there. Otherwise (the
/// pipeline's slot stays, the snapshot came from a temporary slot) the checkpoint is left where
/// it is: the changes before the snapshot position may still be on their way to the sink, and
/// a restart must read them from the slot again.
pub async fn begin_full_sync(
    client: &Client,
    pipeline: &str,
    snapshot_lsn: Lsn,
    mapping_hash: &str,
    generation: i64,
    new_slot: bool,
    table: &FollowedTable<'_>,
) -> Result<(), PgError> {
    // One statement, so one transaction: the checkpoint says `running` exactly when a
    // `running` snapshot run exists. A run left `running` by a full sync that never finished
    // (killed, or its session lost) is marked failed: this one replaces it.
    client
        .execute(
            r#"WITH checkpoint AS (
                   UPDATE "_rudderstack".cdc_checkpoints
                      SET full_sync_state = 'running', full_sync_lsn = $2, full_sync_rows = 0,
                          mapping_hash = $3, lsn = CASE WHEN $4 THEN $2 ELSE lsn END,
                          full_sync_generation = $5, resync_requested = false, schema_name = $6,
                          table_name = $7, table_oid = $8, identifier_columns = $9,
                          updated_at = now()
                    WHERE pipeline = $1
                   RETURNING pipeline),
               interrupted AS (
                   UPDATE "_rudderstack".cdc_sync_runs
                      SET status = 'failed', finished_at = now(),
                          error = 'the full sync did not finish; a later one replaced it'
                    WHERE pipeline = $1 AND kind = 'snapshot' AND status = 'running')
               INSERT INTO "_rudderstack".cdc_sync_runs (pipeline, kind, start_lsn, status)
               SELECT pipeline, 'snapshot', $2, 'running' FROM checkpoint"#,
            &[
                &pipeline,
                &lsn_param(snapshot_lsn),
                &mapping_hash,
                &new_slot,
                &generation,
                &table.schema,
                &table.name,
                &table.oid,
                &serde_json::to_value(table.identifiers).ok(),
            ],
        )
        .await
        .map_err(|e| PgError::query("recording the start of the full sync", e))?;
    Ok(())
}

/// Records how far the running full sync's read is in its sync run: rows read, and the
/// `ctid` ranges read of all. Written every few seconds, not per row.
pub async fn record_full_sync_progress(
    client: &Client,
    pipeline: &str,
    rows: i64,
    ranges_done: i64,
    ranges_total: i64,
) -> Result<(), PgError> {
    let clamp = |n: i64| i32::try_from(n).unwrap_or(i32::MAX);
    client
        .execute(
            r#"UPDATE "_rudderstack".cdc_sync_runs
                  SET rows = $2, ranges_done = $3, ranges_total = $4
                WHERE pipeline = $1 AND kind = 'snapshot' AND status = 'running'"#,
            &[&pipeline, &rows, &clamp(ranges_done), &clamp(ranges_total)],
        )
        .await
        .map_err(|e| PgError::query("recording the full sync's progress", e))?;
    Ok(())
}

/// The followed table's identity, as stored with the checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct FollowedTable<'a> {
    /// Schema name.
    pub schema: &'a str,
    /// Table name.
    pub name: &'a str,
    /// `pg_class.oid`.
    pub oid: u32,
    /// The identifier columns the mapping resolves to.
    pub identifiers: &'a [IdentifierColumnState],
}

/// Records that the followed table (same OID) now goes by another name, after the config was
/// changed to follow a rename: no full sync is needed, the stream resumes at the checkpoint.
pub async fn record_table_rename(
    client: &Client,
    pipeline: &str,
    table: &FollowedTable<'_>,
) -> Result<(), PgError> {
    client
        .execute(
            r#"UPDATE "_rudderstack".cdc_checkpoints
                  SET schema_name = $2, table_name = $3, updated_at = now()
                WHERE pipeline = $1 AND table_oid = $4"#,
            &[&pipeline, &table.schema, &table.name, &table.oid],
        )
        .await
        .map_err(|e| PgError::query("recording the followed table's new name", e))?;
    Ok(())
}

/// Marks the full sync done: from here on a restart resumes the stream, never repeats it.
pub async fn finish_full_sync(client: &Client, pipeline: &str, rows: i64) -> Result<(), PgError> {
    client
        .execute(
            r#"UPDATE "_rudderstack".cdc_checkpoints
                  SET full_sync_state = 'done', full_sync_rows = $2, resync_changed_only = false,
                      updated_at = now()
                WHERE pipeline = $1"#,
            &[&pipeline, &rows],
        )
        .await
        .map_err(|e| PgError::query("recording the end of the full sync", e))?;
    Ok(())
}

/// Asks for a full sync on the next run.
pub async fn request_resync(
    client: &Client,
    pipeline: &str,
    changed_only: bool,
) -> Result<bool, PgError> {
    let n = client
        .execute(
            r#"UPDATE "_rudderstack".cdc_checkpoints
                  SET resync_requested = true, resync_changed_only = $2, updated_at = now()
                WHERE pipeline = $1"#,
            &[&pipeline, &changed_only],
        )
        .await
        .map_err(|e| PgError::query("requesting a resync", e))?;
    Ok(n > 0)
}

/// What one checkpoint commits: the new position, the dead letters met on the way, and the
/// sync-run record of the stretch it closes.
#[derive(Debug, Clone)]
pub struct CheckpointCommit {
    /// Previous checkpoint.
    pub from: Lsn,
    /// New checkpoint.
    pub to: Lsn,
    /// `snapshot` or `stream`.
    pub kind: &'static str,
    /// Rows read in the stretch.
    pub rows: i64,
    /// Events delivered in the stretch.
    pub events: i64,
    /// Rows dead-lettered in the stretch.
    pub dead_letters: Vec<DeadLetter>,
    /// When the stretch started (µs since the Unix epoch).
    pub started_unix_micros: i64,
    /// Rows whose traits were as last sent (nothing sent).
    pub unchanged: i64,
    /// Ledger writes of the delivered rows (see `super::ledger`).
    pub ledger: Vec<(String, Option<crate::batch::ledger::Sent>)>,
    /// The full-sync generation ledger writes carry.
    pub generation: i64,
    /// Window mode: the coalesced rows this checkpoint stages (no sync run is recorded: the
    /// window's run is, when it is delivered).
    pub stage: Option<StageWrite>,
}

/// What a checkpoint of an open window stages.
#[derive(Debug, Clone, Default)]
pub struct StageWrite {
    /// Coalesced rows by stage key.
    pub rows: Vec<(String, crate::batch::Row)>,
    /// (old key, key now) of rows that moved.
    pub moved: Vec<(String, String)>,
}

/// Commits one checkpoint in one transaction: dead letters, the sync run, and the forward-only
/// move of `lsn`. Returns the checkpoint now stored (which is `to` unless it was already ahead).
///
/// Dead letters may belong to a transaction the checkpoint does not cover yet (a batch ended
/// inside it); if that transaction is read again, its dead letters come again with the same
/// messageIds and are skipped here.
pub async fn commit_checkpoint(
    client: &mut Client,
    pipeline: &str,
    c: &CheckpointCommit,
) -> Result<Lsn, PgError> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| PgError::query("starting the checkpoint transaction", e))?;
    let dead = insert_dead_letters(&tx, pipeline, &c.dead_letters).await?;
    if !c.ledger.is_empty() {
        super::ledger::write_ledger(&tx, pipeline, c.generation, &c.ledger).await?;
    }
    if let Some(stage) = &c.stage {
        super::ledger::stage_rows(&tx, pipeline, stage.rows.clone(), &stage.moved).await?;
        tx.execute(
            r#"UPDATE "_rudderstack".cdc_checkpoints
                  SET window_rows = window_rows + $2,
                      window_dead_letters = window_dead_letters + $3
                WHERE pipeline = $1"#,
            &[&pipeline, &c.rows, &dead],
        )
        .await
        .map_err(|e| PgError::query("counting the window's rows", e))?;
    } else if c.kind == "snapshot"
        && tx
            .execute(
                r#"UPDATE "_rudderstack".cdc_sync_runs
                      SET start_lsn = $2, end_lsn = $3, rows = $4, events = $5,
                          dead_letters = $6, unchanged = $7, status = 'succeeded',
                          finished_at = now()
                    WHERE pipeline = $1 AND kind = 'snapshot' AND status = 'running'"#,
                &[
                    &pipeline,
                    &lsn_param(c.from),
                    &lsn_param(c.to),
                    &c.rows,
                    &c.events,
                    &dead,
                    &c.unchanged,
                ],
            )
            .await
            .map_err(|e| PgError::query("recording the full sync's run", e))?
            > 0
    {
        // The full sync's run, recorded when it started, is complete.
    } else if c.rows > 0 || c.events > 0 || dead > 0 || c.unchanged > 0 {
        tx.execute(
            r#"INSERT INTO "_rudderstack".cdc_sync_runs
                   (pipeline, kind, start_lsn, end_lsn, rows, events, dead_letters, unchanged,
                    status, started_at, finished_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $9, 'succeeded',
                       to_timestamp($8::float8 / 1e6), now())"#,
            &[
                &pipeline,
                &c.kind,
                &lsn_param(c.from),
                &lsn_param(c.to),
                &c.rows,
                &c.events,
                &dead,
                &(c.started_unix_micros as f64),
                &c.unchanged,
            ],
        )
        .await
        .map_err(|e| PgError::query("recording the sync run", e))?;
    }
    let stored: PgLsn = tx
        .query_one(
            r#"UPDATE "_rudderstack".cdc_checkpoints
                  SET lsn = greatest(lsn, $2), updated_at = now()
                WHERE pipeline = $1
            RETURNING lsn"#,
            &[&pipeline, &lsn_param(c.to)],
        )
        .await
        .map_err(|e| PgError::query("moving the checkpoint", e))?
        .get(0);
    tx.commit()
        .await
        .map_err(|e| PgError::query("committing the checkpoint", e))?;
    Ok(lsn_from(stored))
}

/// Writes dead letters (each messageId once: one met again after a replay is skipped);
/// returns how many were new.
pub async fn insert_dead_letters(
    client: &impl tokio_postgres::GenericClient,
    pipeline: &str,
    dead_letters: &[DeadLetter],
) -> Result<i64, PgError> {
    let mut dead: i64 = 0;
    for d in dead_letters {
        dead += client
            .execute(
                r#"INSERT INTO "_rudderstack".cdc_dead_letters
                       (pipeline, lsn, op, reason, payload, message_id)
                   VALUES ($1, $2, $3, $4, $5, $6::text::uuid)
                   ON CONFLICT (pipeline, message_id) DO NOTHING"#,
                &[
                    &pipeline,
                    &lsn_param(d.lsn),
                    &d.op,
                    &d.reason,
                    &d.payload,
                    &d.message_id.to_string(),
                ],
            )
            .await
            .map_err(|e| PgError::query("writing a dead letter", e))? as i64;
    }
    Ok(dead)
}

/// Deletes the pipeline's sync runs that finished more than `max_age` ago or are not among its
/// newest `keep_runs` (at least 1); returns how many. Uses the `(pipeline, id)` index.
pub async fn prune_sync_runs(
    client: &Client,
    pipeline: &str,
    max_age: std::time::Duration,
    keep_runs: i64,
) -> Result<u64, PgError> {
    let max_age_secs = max_age.as_secs_f64();
    client
        .execute(
            r#"DELETE FROM "_rudderstack".cdc_sync_runs
                WHERE pipeline = $1
                  AND (coalesce(finished_at, started_at) < now() - make_interval(secs => $2)
                       OR id < (SELECT id FROM "_rudderstack".cdc_sync_runs
                                 WHERE pipeline = $1
                                 ORDER BY id DESC OFFSET $3::int8 - 1 LIMIT 1))"#,
            &[&pipeline, &max_age_secs, &keep_runs.max(1)],
        )
        .await
        .map_err(|e| PgError::query("pruning the sync history (cdc_sync_runs)", e))
}

/// Deletes the pipeline's state rows (teardown).
pub async fn delete_pipeline(client: &Client, pipeline: &str) -> Result<(), PgError> {
    let tables: &[&str] = if client
        .query_one(
            r#"SELECT to_regclass('"_rudderstack".cdc_ledger') IS NOT NULL"#,
            &[],
        )
        .await
        .map_err(|e| PgError::query("looking for the ledger", e))?
        .get(0)
    {
        &[
            "cdc_checkpoints",
            "cdc_sync_runs",
            "cdc_dead_letters",
            "cdc_ledger",
            "cdc_window_stage",
        ]
    } else {
        &["cdc_checkpoints", "cdc_sync_runs", "cdc_dead_letters"]
    };
    for table in tables {
        client
            .execute(
                &format!(r#"DELETE FROM "_rudderstack".{table} WHERE pipeline = $1"#),
                &[&pipeline],
            )
            .await
            .map_err(|e| PgError::query(format!("deleting from _rudderstack.{table}"), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(state: FullSyncState, resync: bool, hash: Option<&str>) -> Checkpoint {
        Checkpoint {
            pipeline: "p".into(),
            slot: "s".into(),
            lsn: Lsn::ZERO,
            mapping_hash: hash.map(str::to_owned),
            full_sync_state: state,
            full_sync_lsn: None,
            resync_requested: resync,
            schema_name: "public".into(),
            table_name: "users".into(),
            table_oid: None,
            identifier_columns: Vec::new(),
            full_sync_generation: 4,
            resync_changed_only: false,
        }
    }

    #[test]
    fn only_a_restart_of_an_interrupted_full_sync_keeps_its_generation() {
        use FullSyncState::*;
        let restart = checkpoint(Running, false, Some("h"));
        assert_eq!(restart.next_full_sync_generation("h"), 4);
        for (c, why) in [
            (checkpoint(Running, false, Some("h")), "a mapping change"),
            (
                checkpoint(Running, true, Some("other")),
                "a resync while interrupted",
            ),
            (checkpoint(Done, true, Some("other")), "a resync"),
            (checkpoint(Done, false, Some("h")), "a mapping change"),
            (checkpoint(Pending, false, None), "the first full sync"),
        ] {
            assert_eq!(c.next_full_sync_generation("other"), 5, "{why}");
        }
    }
}

/// The open schedule window, as stored with the checkpoint.
#[derive(Debug, Clone, Default)]
pub struct WindowState {
    /// When it opened (seconds since the epoch).
    pub started_at: Option<i64>,
    /// Its boundary (seconds since the epoch); `None`: manual.
    pub ends_at: Option<i64>,
    /// The checkpoint when it opened.
    pub start_lsn: Option<Lsn>,
    /// Changes read into it so far.
    pub rows: i64,
    /// Dead letters met so far.
    pub dead_letters: i64,
    /// `slotstream sync` asked for it to be delivered now.
    pub sync_requested: bool,
}

/// Reads the open window (none before migration 4 or the first window).
pub async fn load_window(client: &Client, pipeline: &str) -> Result<WindowState, PgError> {
    let row = client
        .query_opt(
            r#"SELECT extract(epoch FROM window_started_at)::int8,
                      extract(epoch FROM window_ends_at)::int8, window_start_lsn, window_rows,
                      window_dead_letters, sync_requested
                 FROM "_rudderstack".cdc_checkpoints WHERE pipeline = $1"#,
            &[&pipeline],
        )
        .await
        .map_err(|e| PgError::query("reading the open window", e))?;
    Ok(row
        .map(|r| WindowState {
            started_at: r.get(0),
            ends_at: r.get(1),
            start_lsn: r.get::<_, Option<PgLsn>>(2).map(lsn_from),
            rows: r.get(3),
            dead_letters: r.get(4),
            sync_requested: r.get(5),
        })
        .unwrap_or_default())
}

/// Opens a window (or moves the boundary of the open one, after a schedule change).
pub async fn open_window(
    client: &Client,
    pipeline: &str,
    started_at: i64,
    ends_at: Option<i64>,
    start_lsn: Lsn,
) -> Result<(), PgError> {
    client
        .execute(
            r#"UPDATE "_rudderstack".cdc_checkpoints
                  SET window_started_at = coalesce(window_started_at, to_timestamp($2::float8)),
                      window_ends_at = to_timestamp($3::float8),
                      window_start_lsn = coalesce(window_start_lsn, $4)
                WHERE pipeline = $1"#,
            &[
                &pipeline,
                &(started_at as f64),
                &ends_at.map(|e| e as f64),
                &lsn_param(start_lsn),
            ],
        )
        .await
        .map_err(|e| PgError::query("opening a schedule window", e))?;
    Ok(())
}

/// What a delivered window records in the sync history.
#[derive(Debug, Clone)]
pub struct WindowRun {
    /// The window as stored.
    pub window: WindowState,
    /// The checkpoint it ends at.
    pub end_lsn: Lsn,
    /// Events sent.
    pub events: i64,
    /// Coalesced rows delivered from the stage.
    pub staged: i64,
    /// Rows whose traits were as last sent.
    pub unchanged: i64,
    /// Dead letters made at delivery.
    pub dead_letters: i64,
    /// When delivery started (µs since the epoch).
    pub started_unix_micros: i64,
    /// The next window's boundary (`None`: manual).
    pub next_ends_at: Option<i64>,
    /// When the next window opens (seconds since the epoch).
    pub next_started_at: i64,
}

/// Records a delivered window in the sync history and opens the next one, in one transaction.
pub async fn close_window(
    client: &mut Client,
    pipeline: &str,
    run: &WindowRun,
) -> Result<(), PgError> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| PgError::query("starting the window's closing transaction", e))?;
    let w = &run.window;
    let coalesced = (w.rows - run.staged).max(0);
    // An empty window leaves no history.
    let empty = w.rows == 0 && run.staged == 0 && run.events == 0 && w.dead_letters == 0;
    if !empty {
        tx.execute(
        r#"INSERT INTO "_rudderstack".cdc_sync_runs
               (pipeline, kind, start_lsn, end_lsn, rows, events, dead_letters, unchanged,
                coalesced, window_start, window_end, status, started_at, finished_at)
           VALUES ($1, 'window', $2, $3, $4, $5, $6, $7, $8, to_timestamp($9::float8),
                   to_timestamp($10::float8), 'succeeded', to_timestamp($11::float8 / 1e6), now())"#,
        &[
            &pipeline,
            &w.start_lsn.map(lsn_param),
            &lsn_param(run.end_lsn),
            &w.rows,
            &run.events,
            &(w.dead_letters + run.dead_letters),
            &run.unchanged,
            &coalesced,
            &w.started_at.map(|t| t as f64),
            &(run.next_started_at as f64),
            &(run.started_unix_micros as f64),
        ],
    )
    .await
    .map_err(|e| PgError::query("recording the window's sync run", e))?;
    }
    tx.execute(
        r#"UPDATE "_rudderstack".cdc_checkpoints
              SET window_started_at = to_timestamp($2::float8),
                  window_ends_at = to_timestamp($3::float8),
                  window_start_lsn = $4, window_rows = 0, window_dead_letters = 0,
                  sync_requested = false, updated_at = now()
            WHERE pipeline = $1"#,
        &[
            &pipeline,
            &(run.next_started_at as f64),
            &run.next_ends_at.map(|e| e as f64),
            &lsn_param(run.end_lsn),
        ],
    )
    .await
    .map_err(|e| PgError::query("opening the next window", e))?;
    tx.commit()
        .await
        .map_err(|e| PgError::query("committing the window's sync run", e))
}

/// Asks the running pipeline (or the next run) to deliver its open window now; false when
/// the pipeline has no state yet.
pub async fn request_sync(client: &Client, pipeline: &str) -> Result<bool, PgError> {
    let n = client
        .execute(
            r#"UPDATE "_rudderstack".cdc_checkpoints SET sync_requested = true WHERE pipeline = $1"#,
            &[&pipeline],
        )
        .await
        .map_err(|e| PgError::query("requesting a sync", e))?;
    Ok(n > 0)
}

/// Whether `slotstream sync` asked for the open window to be delivered.
pub async fn sync_requested(client: &Client, pipeline: &str) -> Result<bool, PgError> {
    Ok(client
        .query_opt(
            r#"SELECT sync_requested FROM "_rudderstack".cdc_checkpoints WHERE pipeline = $1"#,
            &[&pipeline],
        )
        .await
        .map_err(|e| PgError::query("reading the sync request", e))?
        .is_some_and(|r| r.get(0)))
}
