//! The relation cache: the shape of every relation as the replication stream announced it.
//!
//! # Invariants
//!
//! - A `Relation` message always precedes the first change of a relation in a session, and is
//!   sent again after any schema change of that relation (and after other invalidations, so
//!   an unchanged shape may be announced again). Changes carry only a `rel_id` and positional
//!   cells, so they must be read against the **last shape announced before them**: consult
//!   this cache, never the catalog, which may already reflect later DDL.
//! - The cache is per session: a new replication session re-announces every relation before
//!   its first change, so nothing here needs to survive a reconnect.
//! - [`RelationCache::apply`] replaces the cached shape and reports what changed. Columns are
//!   compared **by name**: the stream carries no column identity (`attnum`), so a renamed column
//!   shows up as one dropped and one added, and a renamed table as [`SchemaChange::renamed_from`].
//! - Relations announced inside a streamed block (they carry an xid) are applied like any other:
//!   the newest announcement wins. pgoutput announces the shape again after the invalidation
//!   caused by aborting a transaction that had changed it.

use std::collections::HashMap;
use std::sync::Arc;

use super::pgoutput::{DecodeError, RelationBody, RelationColumn, ReplicaIdentity, TupleData};

/// Relation shapes by `rel_id`, as last announced by `Relation` messages.
#[derive(Debug, Clone, Default)]
pub struct RelationCache {
    by_id: HashMap<u32, Arc<RelationBody>>,
}

impl RelationCache {
    /// An empty cache, for the start of a session.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `body` as the current shape of its relation and returns what changed versus the
    /// shape it replaces.
    pub fn apply(&mut self, body: RelationBody) -> SchemaChange {
        let body = Arc::new(body);
        let previous = self.by_id.insert(body.rel_id, Arc::clone(&body));
        SchemaChange::between(previous.as_deref(), body)
    }

    /// The current shape of `rel_id`, if announced in this session.
    pub fn get(&self, rel_id: u32) -> Option<&Arc<RelationBody>> {
        self.by_id.get(&rel_id)
    }

    /// The relation named `schema.table` (exact, case-sensitive catalog names, unquoted).
    /// pgoutput sends an empty namespace for `pg_catalog`; both spellings match it.
    pub fn find(&self, schema: &str, table: &str) -> Option<&Arc<RelationBody>> {
        self.by_id
            .values()
            .find(|rel| rel.name == table && namespace_matches(&rel.namespace, schema))
    }

    /// The shape `tuple` of relation `rel_id` must be read with; errors if the relation was
    /// never announced or the tuple's cell count differs from its column count.
    pub fn shape_for(
        &self,
        rel_id: u32,
        tuple: &TupleData,
    ) -> Result<&Arc<RelationBody>, DecodeError> {
        let rel = self
            .get(rel_id)
            .ok_or(DecodeError::UnknownRelation { rel_id })?;
        if rel.columns.len() != tuple.cells.len() {
            return Err(DecodeError::ColumnCountMismatch {
                rel_id,
                relation: qualified_name(rel),
                expected: rel.columns.len(),
                found: tuple.cells.len(),
            });
        }
        Ok(rel)
    }

    /// Number of relations cached.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no relation was announced yet.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Forgets every shape, as at the start of a new session.
    pub fn clear(&mut self) {
        self.by_id.clear();
    }
}

/// `schema.table` of a relation, with `pg_catalog` for the empty namespace.
pub fn qualified_name(rel: &RelationBody) -> String {
    let schema = if rel.namespace.is_empty() {
        "pg_catalog"
    } else {
        &rel.namespace
    };
    format!("{schema}.{}", rel.name)
}

fn column<'a>(columns: &'a [RelationColumn], name: &str) -> Option<&'a RelationColumn> {
    columns.iter().find(|c| c.name == name)
}

fn namespace_matches(announced: &str, wanted: &str) -> bool {
    announced == wanted || (announced.is_empty() && wanted == "pg_catalog")
}

/// What a `Relation` message changed versus the previous shape of the same relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaChange {
    /// The shape now cached.
    pub relation: Arc<RelationBody>,
    /// No shape was cached for this `rel_id` before: the other fields are empty.
    pub first_seen: bool,
    /// Previous `(namespace, name)` when the relation was renamed or moved to another schema.
    pub renamed_from: Option<(String, String)>,
    /// Columns present now but not before (by name), in their new order.
    pub added: Vec<RelationColumn>,
    /// Names of columns present before but not now.
    pub dropped: Vec<String>,
    /// Columns present before and now whose type OID or type modifier changed.
    pub retyped: Vec<TypeChange>,
    /// The replica identity, or the set of key columns, changed.
    pub identity_changed: bool,
}

/// A column whose type changed (`ALTER COLUMN … TYPE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeChange {
    /// Column name.
    pub name: String,
    /// Previous `(type OID, type modifier)`.
    pub before: (u32, i32),
    /// Current `(type OID, type modifier)`.
    pub after: (u32, i32),
}

impl SchemaChange {
    fn between(previous: Option<&RelationBody>, relation: Arc<RelationBody>) -> Self {
        let mut change = Self {
            first_seen: previous.is_none(),
            renamed_from: None,
            added: Vec::new(),
            dropped: Vec::new(),
            retyped: Vec::new(),
            identity_changed: false,
            relation,
        };
        let Some(before) = previous else {
            return change;
        };
        let after = &*change.relation;
        if before.namespace != after.namespace || before.name != after.name {
            change.renamed_from = Some((before.namespace.clone(), before.name.clone()));
        }
        for col in &after.columns {
            match column(&before.columns, &col.name) {
                None => change.added.push(col.clone()),
                Some(old) => {
                    if (old.type_oid, old.type_modifier) != (col.type_oid, col.type_modifier) {
                        change.retyped.push(TypeChange {
                            name: col.name.clone(),
                            before: (old.type_oid, old.type_modifier),
                            after: (col.type_oid, col.type_modifier),
                        });
                    }
                }
            }
        }
        change.dropped = before
            .columns
            .iter()
            .filter(|c| column(&after.columns, &c.name).is_none())
            .map(|c| c.name.clone())
            .collect();
        let keys = |rel: &RelationBody| -> Vec<String> {
            let mut keys: Vec<String> = rel
                .columns
                .iter()
                .filter(|c| c.is_key)
                .map(|c| c.name.clone())
                .collect();
            keys.sort();
            keys
        };
        change.identity_changed =
            before.replica_identity != after.replica_identity || keys(before) != keys(after);
        change
    }

    /// Whether the shape is the same as before (a re-announcement): not first seen, same
    /// name, same columns and types, same identity. Column order is not compared separately:
    /// PostgreSQL cannot reorder columns, and tuples are always read against
    /// [`relation`](Self::relation).
    pub fn is_unchanged(&self) -> bool {
        !self.first_seen
            && self.renamed_from.is_none()
            && self.added.is_empty()
            && self.dropped.is_empty()
            && self.retyped.is_empty()
            && !self.identity_changed
    }

    /// The replica identity now in force.
    pub fn replica_identity(&self) -> ReplicaIdentity {
        self.relation.replica_identity
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::pgoutput::Cell;

    fn col(name: &str, type_oid: u32, is_key: bool) -> RelationColumn {
        RelationColumn {
            is_key,
            name: name.to_owned(),
            type_oid,
            type_modifier: -1,
        }
    }

    fn users(columns: Vec<RelationColumn>) -> RelationBody {
        RelationBody {
            xid: None,
            rel_id: 16384,
            namespace: "public".to_owned(),
            name: "users".to_owned(),
            replica_identity: ReplicaIdentity::Default,
            columns,
        }
    }

    fn base() -> Vec<RelationColumn> {
        vec![
            col("id", 23, true),
            col("email", 25, false),
            col("plan", 25, false),
        ]
    }

    #[test]
    fn first_announcement_is_first_seen_and_cached() {
        let mut cache = RelationCache::new();
        let change = cache.apply(users(base()));
        assert!(change.first_seen);
        assert!(!change.is_unchanged());
        assert!(change.added.is_empty() && change.dropped.is_empty());
        assert_eq!(cache.get(16384).map(|r| r.columns.len()), Some(3));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn reannouncing_the_same_shape_is_unchanged() {
        let mut cache = RelationCache::new();
        cache.apply(users(base()));
        let mut again = users(base());
        again.xid = Some(900); // announced inside a streamed block: same shape
        assert!(cache.apply(again).is_unchanged());
    }

    #[test]
    fn added_dropped_and_retyped_columns_are_reported() {
        let mut cache = RelationCache::new();
        cache.apply(users(base()));
        let mut cols = vec![col("id", 20, true), col("email", 25, false)];
        cols.push(RelationColumn {
            type_modifier: 68,
            ..col("name", 1043, false)
        });
        let change = cache.apply(users(cols));
        assert_eq!(
            change
                .added
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
            ["name"]
        );
        assert_eq!(change.dropped, ["plan"]);
        assert_eq!(
            change.retyped,
            [TypeChange {
                name: "id".to_owned(),
                before: (23, -1),
                after: (20, -1)
            }]
        );
        assert!(!change.identity_changed);
        assert_eq!(cache.get(16384).map(|r| r.columns.len()), Some(3));
    }

    #[test]
    fn a_renamed_column_is_seen_as_drop_plus_add() {
        let mut cache = RelationCache::new();
        cache.apply(users(base()));
        let change = cache.apply(users(vec![
            col("id", 23, true),
            col("email_address", 25, false),
            col("plan", 25, false),
        ]));
        assert_eq!(change.dropped, ["email"]);
        assert_eq!(change.added.len(), 1);
        assert_eq!(
            change.added.first().map(|c| c.name.as_str()),
            Some("email_address")
        );
    }

    #[test]
    fn renamed_table_and_identity_changes_are_reported() {
        let mut cache = RelationCache::new();
        cache.apply(users(base()));
        let mut moved = users(vec![
            col("id", 23, false),
            col("email", 25, true),
            col("plan", 25, false),
        ]);
        moved.namespace = "crm".to_owned();
        moved.replica_identity = ReplicaIdentity::Index;
        let change = cache.apply(moved);
        assert_eq!(
            change.renamed_from,
            Some(("public".to_owned(), "users".to_owned()))
        );
        assert!(change.identity_changed);
        assert_eq!(change.replica_identity(), ReplicaIdentity::Index);
        assert!(cache.find("crm", "users").is_some());
        assert!(cache.find("public", "users").is_none());
    }

    #[test]
    fn find_matches_schema_and_table_and_pg_catalog_for_empty_namespace() {
        let mut cache = RelationCache::new();
        cache.apply(users(base()));
        let mut catalog = users(vec![col("x", 23, false)]);
        catalog.rel_id = 1;
        catalog.namespace = String::new();
        catalog.name = "t".to_owned();
        cache.apply(catalog);
        assert_eq!(cache.find("public", "users").map(|r| r.rel_id), Some(16384));
        assert_eq!(cache.find("pg_catalog", "t").map(|r| r.rel_id), Some(1));
        assert!(cache.find("public", "Users").is_none());
        assert_eq!(
            cache.get(1).map(|r| qualified_name(r)),
            Some("pg_catalog.t".to_owned())
        );
    }

    #[test]
    fn shape_for_rejects_unknown_relations_and_wrong_cell_counts() {
        let mut cache = RelationCache::new();
        let two = TupleData {
            cells: vec![Cell::Null, Cell::UnchangedToast],
        };
        assert_eq!(
            cache.shape_for(16384, &two).err(),
            Some(DecodeError::UnknownRelation { rel_id: 16384 })
        );
        cache.apply(users(base()));
        assert!(matches!(
            cache.shape_for(16384, &two),
            Err(DecodeError::ColumnCountMismatch {
                expected: 3,
                found: 2,
                ..
            })
        ));
        let three = TupleData {
            cells: vec![Cell::Null, Cell::Null, Cell::Null],
        };
        assert_eq!(
            cache.shape_for(16384, &three).map(|r| r.rel_id).ok(),
            Some(16384)
        );
        cache.clear();
        assert!(cache.is_empty());
    }
}
