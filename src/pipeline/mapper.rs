//! The decisions about each change of the replication stream, apart from the reader's I/O.
//!
//! [`ChangeMapper`] is synchronous: the reader receives and decodes pgoutput messages, hands
//! them over in order, and sends on the [`Item`]s it gets back; type loading and publication
//! checks (both need the control connection) happen in the reader when the mapper reports a
//! new shape of the followed table ([`Mapped::OurRelation`]). Everything that decides what a
//! change becomes lives here and is unit-tested below without a server.
//!
//! Rules (docs/architecture.md, "The change mapper"):
//! - **The followed table is recognised by OID**, the `rel_id` of pgoutput's messages, never by
//!   name: `ALTER TABLE … RENAME` keeps the stream going (with a log line), and a table of the
//!   same name created later is a different table. With `publish_via_partition_root`, the
//!   changes of every partition arrive under the partitioned table's OID.
//! - **Each change's position** is (commit LSN, ordinal): the ordinal counts every row change of
//!   the transaction, whatever its relation, so replaying the same WAL gives the same
//!   messageIds.
//! - **Unchanged TOAST values** (cells the server did not send) are taken from the old row when
//!   the update carries it whole (`REPLICA IDENTITY FULL`), else left out of the traits.
//! - **Deletes**: in `upsert` mode they are counted and send nothing; in `mirror` mode they
//!   become `Record Deleted`, or a dead letter when the old key holds no identifier.
//! - **Rows without an identifier** become dead letters, with a reason naming the configured
//!   identifier columns.
//! - **A new shape of the followed table** resolves the projection again. A selected column that
//!   disappeared is reported once; an identifier column that was renamed or dropped stops the
//!   pipeline with the config key to change, before any change in the new shape is mapped: the
//!   events would otherwise change identity without a word.

use std::sync::Arc;

use crate::Lsn;
use crate::batch::Row;
use crate::config::{Config, OnTruncate, SyncMode};
use crate::decode::pgoutput::{Cell, LogicalMessage, OldTuple, RelationBody, TupleData};
use crate::decode::relation::{RelationCache, SchemaChange};
use crate::decode::value::TypeCatalog;
use crate::error::Error;
use crate::metrics::ChangeCounts;
use crate::postgres::quote_qualified;
use crate::postgres::state::DeadLetter;
use crate::transform::event::{EventFactory, Stamp, pg_micros_to_rfc3339, stream_message_id};
use crate::transform::mapping::CellRef;
use crate::transform::{Op, ProjectedRow, Projection};

use super::Item;

/// What one message of the stream turned into.
// Not boxed: `Item` is the common case and moves straight on into the outbox.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(super) enum Mapped {
    /// Nothing to hand on (another table, a message that carries no change, an upsert delete).
    Skip,
    /// An event or a dead letter.
    Item(Item),
    /// A new shape of the followed table: the reader loads `unknown_types` into the type
    /// catalog, verifies what it must, then calls [`ChangeMapper::resolve_ours`] before the
    /// next message.
    OurRelation {
        /// Column types the catalog does not know yet.
        unknown_types: Vec<u32>,
    },
}

/// The followed table as last announced, with its projection.
#[derive(Debug)]
struct Ours {
    relation: Arc<RelationBody>,
    projection: Projection,
    /// (config role, column name) of each identifier column the projection resolved.
    identifiers: Vec<(&'static str, String)>,
    /// Positions of the row key's columns in this shape (`None`: no key, or not wanted).
    key_positions: Option<Vec<usize>>,
}

/// The transaction being read.
#[derive(Debug)]
struct Txn {
    commit_lsn: Lsn,
    stamp: Stamp,
    ordinal: u64,
    rows: i64,
    /// Commit time, microseconds since the Unix epoch.
    commit_unix_micros: i64,
}

/// Turns decoded pgoutput messages into items for the deliverer (see the module docs).
pub(super) struct ChangeMapper<'a> {
    config: &'a Config,
    factory: &'a EventFactory,
    table_oid: u32,
    relations: RelationCache,
    ours: Option<Ours>,
    /// A Relation of the followed table waiting for [`Self::resolve_ours`].
    pending: Option<SchemaChange>,
    reported_missing: Vec<String>,
    txn: Option<Txn>,
    /// The row key's columns, when coalescing or the ledger need keys (see
    /// [`Self::with_row_key`]).
    key_columns: Option<Vec<String>>,
    /// Changes of the followed table mapped since [`Self::take_counts`], by operation (an
    /// ignored delete or TRUNCATE counts: it was read).
    counts: ChangeCounts,
}

impl<'a> ChangeMapper<'a> {
    /// A mapper for one replication session of `config`'s pipeline, following the table whose
    /// `pg_class.oid` is `table_oid`.
    pub(super) fn new(config: &'a Config, factory: &'a EventFactory, table_oid: u32) -> Self {
        ChangeMapper {
            config,
            factory,
            table_oid,
            relations: RelationCache::new(),
            ours: None,
            pending: None,
            reported_missing: Vec::new(),
            txn: None,
            key_columns: None,
            counts: ChangeCounts::default(),
        }
    }

    /// The changes of the followed table counted since the last call (for the metrics, taken
    /// once per transaction).
    pub(super) fn take_counts(&mut self) -> ChangeCounts {
        std::mem::take(&mut self.counts)
    }

    /// Gives every row change its key (the table's [`crate::postgres::catalog::Table::row_key_columns`]),
    /// for windows and the ledger.
    pub(super) fn with_row_key(mut self, columns: Option<Vec<String>>) -> Self {
        self.key_columns = columns;
        self
    }

    fn key_positions(&self, rel: &RelationBody) -> Option<Vec<usize>> {
        let columns = self.key_columns.as_ref()?;
        columns
            .iter()
            .map(|name| rel.columns.iter().position(|c| &c.name == name))
            .collect()
    }

    /// Takes `columns` (the catalog's shape when the session started) as the shape the first
    /// Relation message of the followed table is compared with, so an identifier column
    /// renamed before that message is caught too. Changes are still read only against shapes
    /// the stream announced.
    pub(super) fn seed_shape(&mut self, columns: Vec<crate::decode::pgoutput::RelationColumn>) {
        let relation = Arc::new(RelationBody {
            xid: None,
            rel_id: self.table_oid,
            namespace: self.config.source.schema.clone(),
            name: self.config.source.table.clone(),
            replica_identity: crate::decode::pgoutput::ReplicaIdentity::Default,
            columns,
        });
        let Ok(projection) = Projection::resolve(
            &self.config.mapping,
            &self.qualified(),
            relation
                .columns
                .iter()
                .map(|c| (c.name.as_str(), c.type_oid)),
        ) else {
            return;
        };
        let identifiers = identifier_roles(&projection, &relation);
        let key_positions = self.key_positions(&relation);
        self.ours = Some(Ours {
            relation,
            projection,
            identifiers,
            key_positions,
        });
    }

    /// Whether a transaction is open (between Begin and Commit).
    pub(super) fn in_transaction(&self) -> bool {
        self.txn.is_some()
    }

    /// A transaction begins; its commit record is at `final_lsn`.
    pub(super) fn begin(&mut self, final_lsn: Lsn, commit_time_micros: i64) {
        self.txn = Some(Txn {
            commit_lsn: final_lsn,
            stamp: Stamp::new(final_lsn, &pg_micros_to_rfc3339(commit_time_micros)),
            ordinal: 0,
            rows: 0,
            commit_unix_micros: commit_time_micros
                .saturating_add(crate::transform::event::PG_EPOCH_OFFSET_MICROS),
        });
    }

    /// The open transaction committed; its changes are durable once delivered up to `end_lsn`.
    pub(super) fn commit(&mut self, end_lsn: Lsn) -> Item {
        let (rows, commit_unix_micros) = self
            .txn
            .take()
            .map(|t| (t.rows, t.commit_unix_micros))
            .unwrap_or((0, 0));
        Item::Commit {
            end_lsn,
            rows,
            commit_unix_micros,
        }
    }

    fn qualified(&self) -> String {
        quote_qualified(&self.config.source.schema, &self.config.source.table)
    }

    /// Maps one decoded message.
    pub(super) fn map(
        &mut self,
        msg: LogicalMessage,
        types: &TypeCatalog,
    ) -> Result<Mapped, Error> {
        if self.pending.is_some() {
            return Err(Error::Internal(
                "a change arrived before the followed table's new shape was resolved".into(),
            ));
        }
        let mut key_only = false;
        let mut old_tuple: Option<TupleData> = None;
        let (op, rel_id, tuple) = match msg {
            LogicalMessage::Relation(body) => {
                let is_ours = body.rel_id == self.table_oid;
                let change = self.relations.apply(body);
                if !is_ours {
                    return Ok(Mapped::Skip);
                }
                let unknown_types = change
                    .relation
                    .columns
                    .iter()
                    .map(|c| c.type_oid)
                    .filter(|o| types.needs(*o))
                    .collect();
                self.pending = Some(change);
                return Ok(Mapped::OurRelation { unknown_types });
            }
            LogicalMessage::Insert { rel_id, new, .. } => (Op::Insert, rel_id, new),
            LogicalMessage::Update {
                rel_id,
                mut new,
                old,
                ..
            } => {
                // An unchanged TOASTed value is not in the new row, but the whole old row
                // (REPLICA IDENTITY FULL) carries it: unchanged means equal.
                match old {
                    Some(OldTuple::Full(old)) => {
                        for (cell, old) in new.cells.iter_mut().zip(&old.cells) {
                            if matches!(cell, Cell::UnchangedToast) {
                                *cell = old.clone();
                            }
                        }
                        old_tuple = Some(old);
                    }
                    // Sent only when the key changed.
                    Some(OldTuple::Key(old)) => old_tuple = Some(old),
                    None => {}
                }
                (Op::Update, rel_id, new)
            }
            LogicalMessage::Delete { rel_id, old, .. } => {
                key_only = matches!(old, OldTuple::Key(_));
                let (OldTuple::Key(tuple) | OldTuple::Full(tuple)) = old;
                (Op::Delete, rel_id, tuple)
            }
            LogicalMessage::Truncate { rel_ids, .. } => {
                if !rel_ids.contains(&self.table_oid) {
                    return Ok(Mapped::Skip);
                }
                self.counts.truncate();
                let lsn = self.txn.as_ref().map(|t| t.commit_lsn).unwrap_or(Lsn::ZERO);
                let delete_all = self.config.sync_mode == SyncMode::Mirror
                    && self.config.on_truncate == OnTruncate::DeleteAll;
                let qualified = self.qualified();
                let Some(txn) = self.txn.as_mut().filter(|_| delete_all) else {
                    tracing::warn!(table = %qualified, %lsn, "the table was truncated; TRUNCATE produces no events (sync.on_truncate = \"delete_all\" in mirror mode sends Record Deleted for every row)");
                    return Ok(Mapped::Skip);
                };
                txn.ordinal += 1;
                tracing::warn!(table = %qualified, %lsn, "the table was truncated: every row the ledger holds gets Record Deleted");
                let empty = ProjectedRow {
                    user_id: None,
                    anonymous_id: None,
                    traits: crate::transform::Traits::default(),
                };
                let id = stream_message_id(&self.config.name, txn.commit_lsn, txn.ordinal);
                let template = self.factory.deleted(empty, &txn.stamp, id);
                return Ok(Mapped::Item(Item::Truncate(Box::new(template))));
            }
            _ => return Ok(Mapped::Skip),
        };
        let Some(txn) = self.txn.as_mut() else {
            return Err(Error::Internal(format!(
                "a row change of relation {rel_id} arrived outside a transaction"
            )));
        };
        txn.ordinal += 1;
        if rel_id != self.table_oid {
            return Ok(Mapped::Skip);
        }
        let Some(ours) = &self.ours else {
            return Err(crate::decode::DecodeError::UnknownRelation { rel_id }.into());
        };
        txn.rows += 1;
        self.counts.add(op);
        let key = ours
            .key_positions
            .as_deref()
            .and_then(|positions| key_text(&tuple, positions));
        // Windows need an upsert-mode delete too: an insert and a delete in one window send
        // nothing.
        let windowed = self.config.schedule.schedule.is_windowed();
        if op == Op::Delete
            && self.config.sync_mode == SyncMode::Upsert
            && !(windowed && key.is_some())
        {
            return Ok(Mapped::Skip);
        }
        // Checks the tuple against its relation's shape (the projection was resolved from it).
        self.relations.shape_for(rel_id, &tuple)?;
        let projected = project_tuple(&ours.projection, &tuple, types);
        let (commit_lsn, ordinal) = (txn.commit_lsn, txn.ordinal);
        let pipeline = &self.config.name;
        let message_id = stream_message_id(pipeline, commit_lsn, ordinal);
        // A delete that names no user: the ledger may (at delivery), or a window may find the
        // row was new in it.
        if op == Op::Delete
            && !projected.is_identified()
            && key.is_some()
            && (self.config.ledger || windowed)
        {
            let event = self.factory.deleted(projected, &txn.stamp, message_id);
            return Ok(Mapped::Item(Item::Row(Row {
                event,
                key,
                old_key: None,
                fresh: false,
                traits_hash: None,
            })));
        }
        let old_key = match (&old_tuple, &ours.key_positions) {
            (Some(old), Some(positions)) => {
                key_text(old, positions).filter(|k| Some(k) != key.as_ref())
            }
            _ => None,
        };
        let mut item = row_item(
            self.config,
            self.factory,
            projected,
            op,
            commit_lsn,
            &txn.stamp,
            |_| message_id,
        );
        match &mut item {
            Item::DeadLetter(d) if key_only => {
                d.reason = unidentified_delete_reason(&self.qualified())
            }
            Item::Row(row) => {
                row.key = key;
                row.old_key = old_key;
            }
            _ => {}
        }
        Ok(Mapped::Item(item))
    }

    /// Resolves the projection for the followed table's shape announced last (after
    /// [`Mapped::OurRelation`] and the reader's type loading).
    pub(super) fn resolve_ours(&mut self) -> Result<(), Error> {
        let Some(change) = self.pending.take() else {
            return Ok(());
        };
        let rel = Arc::clone(&change.relation);
        let qualified = self.qualified();
        let projection = Projection::resolve(
            &self.config.mapping,
            &qualified,
            rel.columns.iter().map(|c| (c.name.as_str(), c.type_oid)),
        )
        .map_err(|e| Error::Mapping {
            hint: e.hint(),
            message: format!("after a schema change: {e}"),
        })?;
        if let Some(previous) = &self.ours {
            check_identifiers_kept(&qualified, previous, &rel)?;
        }
        for missing in &projection.missing_columns {
            if !self.reported_missing.contains(missing) {
                tracing::warn!(
                    column = %missing,
                    table = %qualified,
                    "a selected column is no longer in the table (dropped or renamed); its trait is no longer sent, the others keep flowing"
                );
                self.reported_missing.push(missing.clone());
            }
        }
        self.reported_missing
            .retain(|m| projection.missing_columns.contains(m));
        if let Some((schema, name)) = &change.renamed_from {
            tracing::warn!(
                from = %quote_qualified(schema, name),
                to = %quote_qualified(&rel.namespace, &rel.name),
                "the followed table was renamed; streaming goes on (it is followed by OID): set [source] schema and table to its new name before the next start"
            );
        }
        if !change.is_unchanged() && !change.first_seen {
            let added: Vec<&str> = change.added.iter().map(|c| c.name.as_str()).collect();
            let retyped: Vec<&str> = change.retyped.iter().map(|c| c.name.as_str()).collect();
            tracing::info!(table = %qualified, ?added, dropped = ?change.dropped, ?retyped, "table shape changed");
        }
        let identifiers = identifier_roles(&projection, &rel);
        let key_positions = self.key_positions(&rel);
        self.ours = Some(Ours {
            relation: rel,
            projection,
            identifiers,
            key_positions,
        });
        Ok(())
    }
}

/// Refuses a new shape in which an identifier column of the previous one is gone. The new
/// name of a renamed column is the new column of the same type at the same position, or the
/// only new column of that type.
fn check_identifiers_kept(table: &str, previous: &Ours, now: &RelationBody) -> Result<(), Error> {
    let before = &previous.relation.columns;
    for (role, column) in &previous.identifiers {
        if now.columns.iter().any(|c| &c.name == column) {
            continue;
        }
        let Some(position) = before.iter().position(|c| &c.name == column) else {
            continue;
        };
        let type_oid = before[position].type_oid;
        let is_new = |c: &&crate::decode::pgoutput::RelationColumn| {
            c.type_oid == type_oid && !before.iter().any(|p| p.name == c.name)
        };
        let same_place = now.columns.get(position).filter(is_new);
        let candidates: Vec<_> = now.columns.iter().filter(is_new).collect();
        let renamed_to = same_place.or(match candidates.as_slice() {
            [only] => Some(*only),
            _ => None,
        });
        return Err(identifier_gone(
            table,
            role,
            column,
            renamed_to.map(|c| c.name.as_str()),
            "so the pipeline stopped before the first change in the new shape",
        ));
    }
    Ok(())
}

/// The error for an identifier column (`role`, once named `column`) that was renamed to
/// `renamed_to`, or dropped when that is `None`. `what_happened` ends the message.
pub(super) fn identifier_gone(
    table: &str,
    role: &str,
    column: &str,
    renamed_to: Option<&str>,
    what_happened: &str,
) -> Error {
    match renamed_to {
        Some(new) => Error::Mapping {
            message: format!(
                "identifier column {column:?} of {table} was renamed to {new:?}: the events would change identity, {what_happened}"
            ),
            hint: format!(
                "set `[mapping.identifiers] {role} = {new:?}` in the config and start slotstream again: it resumes at its checkpoint, and the mapping change makes it do one full sync (no teardown needed)"
            ),
        },
        None => Error::Mapping {
            message: format!(
                "identifier column {column:?} of {table} was dropped or renamed: the events would change identity, {what_happened}"
            ),
            hint: format!(
                "point `[mapping.identifiers] {role}` at the column that now identifies the user (or add the column back) and start slotstream again: it resumes at its checkpoint and does one full sync"
            ),
        },
    }
}

/// (role, column name) of each identifier column `projection` resolved in `rel`.
fn identifier_roles(projection: &Projection, rel: &RelationBody) -> Vec<(&'static str, String)> {
    projection
        .identifier_positions()
        .filter_map(|(role, i)| Some((role, rel.columns.get(i)?.name.clone())))
        .collect()
}

/// The configured identifier columns, for messages.
pub(super) fn identifier_names(config: &Config) -> String {
    config
        .mapping
        .identifiers
        .all()
        .iter()
        .map(|c| c.name().to_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

/// An identify (or, for a delete, `Record Deleted`) event for a row, or a dead letter when it
/// has no identifier value (with the messageId the event would have had). Shared by the full
/// sync and the stream.
pub(super) fn row_item(
    config: &Config,
    factory: &EventFactory,
    projected: ProjectedRow,
    op: Op,
    lsn: Lsn,
    stamp: &Stamp,
    message_id: impl FnOnce(&ProjectedRow) -> uuid::Uuid,
) -> Item {
    // A dead letter keeps the messageId the event would have had: it makes it unique, so a
    // transaction read again after a crash does not write it twice.
    let id = message_id(&projected);
    if !projected.is_identified() {
        return Item::DeadLetter(Box::new(DeadLetter {
            lsn,
            op: op.as_str(),
            reason: format!(
                "the row has no value in any identifier column ({})",
                identifier_names(config)
            ),
            payload: serde_json::Value::Object(projected.traits.into_map()),
            message_id: id,
        }));
    }
    let event = if op == Op::Delete {
        factory.deleted(projected, stamp, id)
    } else {
        factory.identify(projected, op, stamp, id)
    };
    Item::Row(Row::plain(event))
}

/// Projects a pgoutput tuple through `projection` (resolved from the tuple's relation: it
/// knows the columns' types).
pub(super) fn project_tuple(
    projection: &Projection,
    tuple: &TupleData,
    types: &TypeCatalog,
) -> ProjectedRow {
    projection.project(types, |i| match tuple.cells.get(i) {
        Some(Cell::Null) => CellRef::Null,
        Some(Cell::UnchangedToast) | None => CellRef::Absent,
        Some(Cell::Text(bytes)) => CellRef::Text(String::from_utf8_lossy(bytes)),
        Some(Cell::Binary(_)) => CellRef::Absent,
    })
}

/// Why a delete that names no user is a dead letter (without the ledger).
pub(super) fn unidentified_delete_reason(table: &str) -> String {
    format!(
        "the deleted row's old key has no identifier value: the table's replica identity does not include an identifier column, so deletes cannot name the user; keep sync.ledger = true (it names the user by the row's key), or run ALTER TABLE {table} REPLICA IDENTITY FULL"
    )
}

/// The row key of `tuple` (cells at `positions`) as a JSON array of text and nulls, as the full
/// sync writes it; `None` when a key cell was not sent.
fn key_text(tuple: &TupleData, positions: &[usize]) -> Option<String> {
    let mut cells = Vec::with_capacity(positions.len());
    for p in positions {
        cells.push(match tuple.cells.get(*p)? {
            Cell::Null => serde_json::Value::Null,
            Cell::Text(bytes) => {
                serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned())
            }
            Cell::UnchangedToast | Cell::Binary(_) => return None,
        });
    }
    serde_json::to_string(&cells).ok()
}

#[cfg(test)]
#[path = "mapper_tests.rs"]
mod tests;
