//! The sent-state ledger and the window stage in `_rudderstack` (docs/architecture.md §6).
//!
//! - `cdc_ledger`: one row per source row key delivered: the identifiers and the traits hash
//!   last sent, and the full-sync generation that last saw it. Stream writes go in the
//!   checkpoint's transaction ([`write_ledger`] on the checkpoint's `Transaction`), so ledger
//!   and checkpoint never disagree; a full sync's rows are written as their batches are
//!   delivered (an interrupted full sync starts again, and is not checkpointed until done).
//! - `cdc_window_stage`: the coalesced rows of the open window, written with the checkpoint that
//!   covers them ([`stage_rows`]): the slot is acknowledged as the window fills, so a long
//!   window keeps no WAL. At the boundary the window is delivered page by page from here; each
//!   page's stage rows leave in the transaction that writes their ledger entries.
//!
//! Rows are written in bulk (`unnest` of arrays): one statement per checkpoint, not per row.

use std::collections::HashMap;

use tokio_postgres::{Client, GenericClient};

use super::PgError;
use crate::Lsn;
use crate::batch::Row;
use crate::batch::ledger::Sent;
use crate::batch::window::is_unkeyed;
use crate::transform::event::{EventFactory, Stamp};
use crate::transform::{EventKind, Op, ProjectedRow, Traits};

fn hash_param(hash: &Option<[u8; 32]>) -> Option<Vec<u8>> {
    hash.map(|h| h.to_vec())
}

fn hash_from(v: Option<Vec<u8>>) -> Option<[u8; 32]> {
    v.and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok())
}

/// A ledger row read as `row_key, user_id, anonymous_id, traits_hash`.
fn entry_of(r: &tokio_postgres::Row) -> (String, Sent) {
    (
        r.get(0),
        Sent {
            user_id: r.get(1),
            anonymous_id: r.get(2),
            hash: hash_from(r.get(3)),
        },
    )
}

/// The entries of `keys` (those the ledger holds).
pub async fn lookup(
    client: &impl GenericClient,
    pipeline: &str,
    keys: &[String],
) -> Result<HashMap<String, Sent>, PgError> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = client
        .query(
            r#"SELECT row_key, user_id, anonymous_id, traits_hash FROM "_rudderstack".cdc_ledger
                WHERE pipeline = $1 AND row_key = ANY($2::text[])"#,
            &[&pipeline, &keys],
        )
        .await
        .map_err(|e| PgError::query("reading the sent-state ledger", e))?;
    Ok(rows.iter().map(entry_of).collect())
}

/// Writes entries (`Some`) and removes keys (`None`); each key at most once.
pub async fn write_ledger(
    client: &impl GenericClient,
    pipeline: &str,
    generation: i64,
    writes: &[(String, Option<Sent>)],
) -> Result<(), PgError> {
    let (mut keys, mut users, mut anons, mut hashes, mut gone) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (key, entry) in writes {
        match entry {
            Some(s) => {
                keys.push(key.as_str());
                users.push(s.user_id.as_deref());
                anons.push(s.anonymous_id.as_deref());
                hashes.push(hash_param(&s.hash));
            }
            None => gone.push(key.as_str()),
        }
    }
    if !gone.is_empty() {
        client
            .execute(
                r#"DELETE FROM "_rudderstack".cdc_ledger
                    WHERE pipeline = $1 AND row_key = ANY($2::text[])"#,
                &[&pipeline, &gone],
            )
            .await
            .map_err(|e| PgError::query("removing deleted rows from the ledger", e))?;
    }
    if !keys.is_empty() {
        client
            .execute(
                r#"INSERT INTO "_rudderstack".cdc_ledger
                       (pipeline, row_key, user_id, anonymous_id, traits_hash, generation)
                   SELECT $1, k, u, a, h, $6
                     FROM unnest($2::text[], $3::text[], $4::text[], $5::bytea[]) AS t(k, u, a, h)
                   ON CONFLICT (pipeline, row_key) DO UPDATE
                      SET user_id = EXCLUDED.user_id, anonymous_id = EXCLUDED.anonymous_id,
                          traits_hash = EXCLUDED.traits_hash, generation = EXCLUDED.generation,
                          updated_at = now()"#,
                &[&pipeline, &keys, &users, &anons, &hashes, &generation],
            )
            .await
            .map_err(|e| PgError::query("writing the sent-state ledger", e))?;
    }
    Ok(())
}

/// Writes new entries by `COPY … FROM STDIN (FORMAT binary)`: a full sync's fill, at about half
/// the server's work of [`write_ledger`]'s upsert. `Ok(false)`: some key already has an entry
/// (a resync, or a full sync started again after an interruption); the COPY wrote nothing
/// and the caller writes the batch with [`write_ledger`] instead.
pub async fn copy_new_entries(
    client: &Client,
    pipeline: &str,
    generation: i64,
    entries: &[(String, Option<Sent>)],
) -> Result<bool, PgError> {
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    use tokio_postgres::types::Type;
    let result = async {
        let sink = client
            .copy_in(
                r#"COPY "_rudderstack".cdc_ledger
                       (pipeline, row_key, user_id, anonymous_id, traits_hash, generation)
                   FROM STDIN (FORMAT binary)"#,
            )
            .await?;
        let types = [
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::BYTEA,
            Type::INT8,
        ];
        let writer = BinaryCopyInWriter::new(sink, &types);
        let mut writer = std::pin::pin!(writer);
        for (key, entry) in entries {
            let Some(s) = entry else { continue };
            let hash = s.hash.as_ref().map(|h| &h[..]);
            writer
                .as_mut()
                .write(&[
                    &pipeline,
                    key,
                    &s.user_id,
                    &s.anonymous_id,
                    &hash,
                    &generation,
                ])
                .await?;
        }
        writer.finish().await
    }
    .await;
    match result {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => Ok(false),
        Err(e) => Err(PgError::query("filling the sent-state ledger", e)),
    }
}

/// Up to `limit` entries with keys after `after`, in key order (for TRUNCATE and for
/// `resync --changed-only`'s deletes); with `older_than`, only entries a full sync of that
/// generation did not see.
pub async fn ledger_page(
    client: &impl GenericClient,
    pipeline: &str,
    after: &str,
    older_than: Option<i64>,
    limit: i64,
) -> Result<Vec<(String, Sent)>, PgError> {
    let rows = client
        .query(
            r#"SELECT row_key, user_id, anonymous_id, traits_hash FROM "_rudderstack".cdc_ledger
                WHERE pipeline = $1 AND row_key > $2 AND ($3::int8 IS NULL OR generation < $3)
                ORDER BY row_key LIMIT $4"#,
            &[&pipeline, &after, &older_than, &limit],
        )
        .await
        .map_err(|e| PgError::query("reading the sent-state ledger", e))?;
    Ok(rows.iter().map(entry_of).collect())
}

/// Removes the entries a full sync of `generation` did not see (rows gone from the table).
pub async fn drop_unseen(
    client: &impl GenericClient,
    pipeline: &str,
    generation: i64,
) -> Result<u64, PgError> {
    client
        .execute(
            r#"DELETE FROM "_rudderstack".cdc_ledger WHERE pipeline = $1 AND generation < $2"#,
            &[&pipeline, &generation],
        )
        .await
        .map_err(|e| PgError::query("dropping ledger entries of rows no longer in the table", e))
}

/// Writes coalesced rows into the window stage, merged with what is staged for the same keys
/// (see `crate::batch::window`): the later state wins, a partial update keeps the staged cells
/// it lacks, and the staged row's first facts (new in the window, the key the destination knows
/// it by) stay. `moved` (old key, key now) drops the staged rows of keys that moved and hands
/// their facts to the row under its new key.
pub async fn stage_rows(
    client: &impl GenericClient,
    pipeline: &str,
    mut rows: Vec<(String, Row)>,
    moved: &[(String, String)],
) -> Result<(), PgError> {
    if !moved.is_empty() {
        let olds: Vec<&str> = moved.iter().map(|(o, _)| o.as_str()).collect();
        let gone = client
            .query(
                r#"DELETE FROM "_rudderstack".cdc_window_stage
                    WHERE pipeline = $1 AND row_key = ANY($2::text[])
                RETURNING row_key, old_key, fresh"#,
                &[&pipeline, &olds],
            )
            .await
            .map_err(|e| PgError::query("moving staged rows to their new keys", e))?;
        for r in gone {
            let (old, old_key, fresh): (String, Option<String>, bool) =
                (r.get(0), r.get(1), r.get(2));
            let Some((_, now)) = moved.iter().find(|(o, _)| *o == old) else {
                continue;
            };
            if let Some((_, row)) = rows.iter_mut().find(|(k, _)| k == now) {
                // The staged facts are older: they win.
                row.old_key = old_key.or((!fresh).then_some(old));
                row.fresh = fresh;
            }
        }
    }
    if rows.is_empty() {
        return Ok(());
    }
    let n = rows.len();
    let mut keys = Vec::with_capacity(n);
    let mut old_keys = Vec::with_capacity(n);
    let mut fresh = Vec::with_capacity(n);
    let mut partial = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    let mut users = Vec::with_capacity(n);
    let mut anons = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    let mut ops = Vec::with_capacity(n);
    let mut lsns = Vec::with_capacity(n);
    let mut times = Vec::with_capacity(n);
    for (key, row) in rows {
        let e = row.event;
        let identify = e.kind == EventKind::Identify;
        keys.push(key);
        old_keys.push(row.old_key);
        fresh.push(row.fresh);
        partial.push(e.traits.as_ref().is_some_and(Traits::is_partial));
        kinds.push(if identify { "identify" } else { "delete" });
        ids.push(e.message_id.to_string());
        users.push(e.user_id);
        anons.push(e.anonymous_id);
        payloads.push(serde_json::Value::Object(
            e.traits.map(Traits::into_map).unwrap_or_default(),
        ));
        ops.push(e.context.sources.op.as_str());
        lsns.push(e.context.sources.lsn.to_string());
        times.push(e.original_timestamp.to_string());
    }
    client
        .execute(
            r#"INSERT INTO "_rudderstack".cdc_window_stage AS s
                   (pipeline, row_key, old_key, fresh, partial, kind, message_id, user_id,
                    anonymous_id, payload, op, lsn, original_timestamp)
               SELECT $1, k, o, f, p, kd, m::uuid, u, a, pl, op, l, t
                 FROM unnest($2::text[], $3::text[], $4::bool[], $5::bool[], $6::text[],
                             $7::text[], $8::text[], $9::text[], $10::json[], $11::text[],
                             $12::text[], $13::text[])
                      AS x(k, o, f, p, kd, m, u, a, pl, op, l, t)
               ON CONFLICT (pipeline, row_key) DO UPDATE SET
                   old_key = coalesce(s.old_key, EXCLUDED.old_key),
                   fresh = s.fresh,
                   payload = CASE WHEN EXCLUDED.partial AND s.kind = 'identify'
                                       AND EXCLUDED.kind = 'identify'
                                  THEN (s.payload::jsonb || EXCLUDED.payload::jsonb)::json
                                  ELSE EXCLUDED.payload END,
                   partial = EXCLUDED.partial AND (s.kind <> 'identify' OR s.partial),
                   kind = EXCLUDED.kind, message_id = EXCLUDED.message_id,
                   user_id = EXCLUDED.user_id, anonymous_id = EXCLUDED.anonymous_id,
                   op = EXCLUDED.op, lsn = EXCLUDED.lsn,
                   original_timestamp = EXCLUDED.original_timestamp"#,
            &[
                &pipeline, &keys, &old_keys, &fresh, &partial, &kinds, &ids, &users, &anons,
                &payloads, &ops, &lsns, &times,
            ],
        )
        .await
        .map_err(|e| PgError::query("staging the window's rows", e))?;
    Ok(())
}

/// Before a window is delivered: takes the ledger entry of every staged row's old key (rows
/// whose key moved) out of the ledger and onto the staged row, all in one statement, so that
/// two rows swapping keys are decided against the entries they had (see
/// `crate::batch::ledger::decide`).
pub async fn resolve_moves(client: &Client, pipeline: &str) -> Result<(), PgError> {
    client
        .execute(
            r#"WITH moved AS (
                   SELECT row_key, old_key FROM "_rudderstack".cdc_window_stage
                    WHERE pipeline = $1 AND old_key IS NOT NULL AND NOT moved_resolved),
               gone AS (
                   DELETE FROM "_rudderstack".cdc_ledger l USING moved m
                    WHERE l.pipeline = $1 AND l.row_key = m.old_key
                RETURNING l.row_key, l.user_id, l.anonymous_id, l.traits_hash)
               UPDATE "_rudderstack".cdc_window_stage s
                  SET moved_resolved = true, moved_known = g.row_key IS NOT NULL,
                      moved_user_id = g.user_id, moved_anonymous_id = g.anonymous_id,
                      moved_hash = g.traits_hash
                 FROM moved m LEFT JOIN gone g ON g.row_key = m.old_key
                WHERE s.pipeline = $1 AND s.row_key = m.row_key"#,
            &[&pipeline],
        )
        .await
        .map_err(|e| PgError::query("resolving the window's moved rows", e))?;
    Ok(())
}

/// A staged row read back for delivery.
#[derive(Debug)]
pub struct Staged {
    /// Its stage key.
    pub stage_key: String,
    /// The row.
    pub row: Row,
    /// The ledger entry its old key had (see [`resolve_moves`]).
    pub moved_from: Option<Sent>,
}

fn parse_op(op: &str) -> Op {
    match op {
        "insert" => Op::Insert,
        "snapshot" => Op::Snapshot,
        "delete" => Op::Delete,
        _ => Op::Update,
    }
}

/// The next `limit` staged rows to deliver: moved rows first, then by key.
pub async fn stage_page(
    client: &Client,
    pipeline: &str,
    factory: &EventFactory,
    limit: i64,
) -> Result<Vec<Staged>, PgError> {
    let rows = client
        .query(
            r#"SELECT row_key, old_key, fresh, kind, message_id::text, user_id, anonymous_id,
                      payload, op, lsn, original_timestamp, moved_known, moved_user_id,
                      moved_anonymous_id, moved_hash
                 FROM "_rudderstack".cdc_window_stage
                WHERE pipeline = $1
                ORDER BY (old_key IS NULL), row_key
                LIMIT $2"#,
            &[&pipeline, &limit],
        )
        .await
        .map_err(|e| PgError::query("reading the window stage", e))?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let stage_key: String = r.get(0);
        let message_id: String = r.get(4);
        let message_id = uuid::Uuid::parse_str(&message_id).unwrap_or_default();
        let lsn: String = r.get(9);
        let lsn = lsn.parse::<Lsn>().unwrap_or(Lsn::ZERO);
        let time: String = r.get(10);
        let stamp = Stamp::new(lsn, &time);
        let payload: Option<serde_json::Value> = r.get(7);
        let traits = match payload {
            Some(serde_json::Value::Object(m)) => Traits::from_map(m),
            _ => Traits::default(),
        };
        let projected = ProjectedRow {
            user_id: r.get(5),
            anonymous_id: r.get(6),
            traits,
        };
        let kind: String = r.get(3);
        let event = if kind == "delete" {
            factory.deleted(projected, &stamp, message_id)
        } else {
            factory.identify(projected, parse_op(r.get(8)), &stamp, message_id)
        };
        let moved_from = r.get::<_, bool>(11).then(|| Sent {
            user_id: r.get(12),
            anonymous_id: r.get(13),
            hash: hash_from(r.get(14)),
        });
        let key = (!is_unkeyed(&stage_key)).then(|| stage_key.clone());
        out.push(Staged {
            row: Row {
                event,
                key,
                old_key: r.get(1),
                fresh: r.get(2),
                traits_hash: None,
            },
            stage_key,
            moved_from,
        });
    }
    Ok(out)
}

/// Removes delivered rows from the stage.
pub async fn unstage(
    client: &impl GenericClient,
    pipeline: &str,
    stage_keys: &[String],
) -> Result<(), PgError> {
    client
        .execute(
            r#"DELETE FROM "_rudderstack".cdc_window_stage
                WHERE pipeline = $1 AND row_key = ANY($2::text[])"#,
            &[&pipeline, &stage_keys],
        )
        .await
        .map_err(|e| PgError::query("removing delivered rows from the window stage", e))?;
    Ok(())
}

/// Rows in the window stage.
pub async fn staged_count(client: &impl GenericClient, pipeline: &str) -> Result<i64, PgError> {
    Ok(client
        .query_one(
            r#"SELECT count(*) FROM "_rudderstack".cdc_window_stage WHERE pipeline = $1"#,
            &[&pipeline],
        )
        .await
        .map_err(|e| PgError::query("counting the window stage", e))?
        .get(0))
}
