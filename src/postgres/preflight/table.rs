//! The table checks: access (check 6), the state schema (check 7), the mapping against the
//! real columns (checks 8 and 9) and the replica identity (check 11).

use super::{Ctx, Fix, PG18, STATE_SCHEMA, STATE_TABLES, quoted_list};
use crate::config::SyncMode;
use crate::postgres::catalog::{Partition, Table};
use crate::postgres::{PgError, catalog, quote_ident, quote_literal, quote_qualified};
use crate::transform::mapping::{MappingError, Projection};

impl Ctx<'_> {
    pub(super) async fn check_table_access(&mut self) -> Result<(), PgError> {
        let schema = &self.config.source.schema;
        let qschema = quote_ident(schema);
        let user = self.user();
        let ns = self
            .client
            .query_opt(
                "SELECT oid, has_schema_privilege(oid, 'USAGE') FROM pg_namespace WHERE nspname = $1",
                &[schema],
            )
            .await
            .map_err(|e| PgError::query("looking up the table's schema", e))?;
        let Some(ns) = ns else {
            let schemas: Vec<String> = self
                .client
                .query(
                    "SELECT nspname::text FROM pg_namespace
                      WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'
                      ORDER BY 1",
                    &[],
                )
                .await
                .map_err(|e| PgError::query("listing the schemas", e))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            self.report.fail(
                format!(
                    "schema {qschema} does not exist; the database's schemas are: {}",
                    schemas.join(", ")
                ),
                vec![Fix::Step(
                    "set source.schema to the schema that holds the table".into(),
                )],
            );
            return Ok(());
        };
        let ns_oid: u32 = ns.get(0);
        if ns.get::<_, bool>(1) {
            self.report
                .pass(format!("role {user} may use schema {qschema}"));
        } else {
            self.report.fail(
                format!("role {user} has no USAGE privilege on schema {qschema}"),
                vec![Fix::Sql(format!(
                    "GRANT USAGE ON SCHEMA {qschema} TO {user};"
                ))],
            );
        }
        let qtable = self.qtable();
        let table = catalog::table(
            &self.client,
            schema,
            &self.config.source.table,
            &self.config.source.publication,
        )
        .await?;
        let Some(table) = table else {
            let tables: Vec<String> = self
                .client
                .query(
                    "SELECT relname::text FROM pg_class
                      WHERE relnamespace = $1 AND relkind IN ('r', 'p') ORDER BY 1 LIMIT 50",
                    &[&ns_oid],
                )
                .await
                .map_err(|e| PgError::query("listing the schema's tables", e))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let found = if tables.is_empty() {
                format!("schema {qschema} has no tables")
            } else {
                format!("the tables in schema {qschema} are: {}", tables.join(", "))
            };
            self.report.fail(
                format!("table {qtable} does not exist; {found}"),
                vec![Fix::Step("set source.table to the table to stream".into())],
            );
            return Ok(());
        };
        let select: bool = self
            .client
            .query_one(
                "SELECT has_table_privilege($1::oid, 'SELECT')",
                &[&table.oid],
            )
            .await
            .map_err(|e| PgError::query("checking SELECT on the table", e))?
            .get(0);
        if select {
            self.report
                .pass(format!("role {user} may read table {qtable}"));
        } else {
            self.report.fail(
                format!("role {user} has no SELECT privilege on table {qtable}, which the full sync needs"),
                vec![Fix::Sql(format!("GRANT SELECT ON TABLE {qtable} TO {user};"))],
            );
        }
        self.table = Some(table);
        Ok(())
    }

    pub(super) async fn check_state_schema(&mut self) -> Result<(), PgError> {
        let user = self.user();
        let qstate = quote_ident(STATE_SCHEMA);
        let grant_schema = Fix::Sql(format!("GRANT ALL ON SCHEMA {qstate} TO {user};"));
        let grant_tables = Fix::Sql(format!(
            "GRANT ALL PRIVILEGES ON ALL TABLES IN SCHEMA {qstate} TO {user};"
        ));
        let row = self
            .client
            .query_opt(
                "SELECT oid, has_schema_privilege(oid, 'USAGE'), has_schema_privilege(oid, 'CREATE')
                   FROM pg_namespace WHERE nspname = $1",
                &[&STATE_SCHEMA],
            )
            .await
            .map_err(|e| PgError::query("looking up the state schema", e))?;
        let Some(row) = row else {
            self.report.fail(
                format!(
                    "schema {qstate} does not exist, and slotstream keeps its checkpoint there"
                ),
                vec![
                    Fix::Sql(format!("CREATE SCHEMA IF NOT EXISTS {qstate};")),
                    grant_schema,
                    grant_tables,
                ],
            );
            return Ok(());
        };
        let (oid, usage, create): (u32, bool, bool) = (row.get(0), row.get(1), row.get(2));
        if !usage || !create {
            let missing = match (usage, create) {
                (false, false) => "USAGE and CREATE",
                (false, true) => "USAGE",
                _ => "CREATE",
            };
            self.report.fail(
                format!(
                    "role {user} lacks {missing} on schema {qstate}, so slotstream cannot create its state tables there"
                ),
                vec![grant_schema, grant_tables],
            );
            return Ok(());
        }
        let names: Vec<String> = STATE_TABLES.iter().map(|s| (*s).to_owned()).collect();
        let denied: Vec<String> = self
            .client
            .query(
                "SELECT c.relname::text FROM pg_class c
                  WHERE c.relnamespace = $1 AND c.relkind IN ('r', 'p')
                    AND c.relname::text = ANY($2)
                    AND NOT (has_table_privilege(c.oid, 'SELECT') AND has_table_privilege(c.oid, 'INSERT')
                             AND has_table_privilege(c.oid, 'UPDATE') AND has_table_privilege(c.oid, 'DELETE'))
                  ORDER BY 1",
                &[&oid, &names],
            )
            .await
            .map_err(|e| PgError::query("checking privileges on the state tables", e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        // State tables created by another pipeline's role have bigserial ids: inserting needs
        // USAGE on their sequences, which GRANT … ON ALL TABLES does not give.
        let sequences: Vec<String> = self
            .client
            .query(
                "SELECT c.relname::text FROM pg_class c
                  WHERE c.relnamespace = $1
                    -- CASE, not AND: the planner may evaluate the function on other relations.
                    AND CASE WHEN c.relkind = 'S'
                             THEN NOT has_sequence_privilege(c.oid, 'USAGE') ELSE false END
                  ORDER BY 1",
                &[&oid],
            )
            .await
            .map_err(|e| PgError::query("checking privileges on the state sequences", e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if denied.is_empty() && sequences.is_empty() {
            self.report.pass(format!(
                "role {user} may create and use slotstream's state tables in schema {qstate}"
            ));
            return Ok(());
        }
        let mut problems = Vec::new();
        let mut fixes = Vec::new();
        if !denied.is_empty() {
            problems.push(format!(
                "read and write the state tables {}",
                quoted_list(&denied)
            ));
            fixes.push(grant_tables);
        }
        if !sequences.is_empty() {
            problems.push(format!("use the sequences {}", quoted_list(&sequences)));
            fixes.push(Fix::Sql(format!(
                "GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {qstate} TO {user};"
            )));
        }
        self.report.fail(
            format!(
                "role {user} cannot {} in schema {qstate}",
                problems.join(" or ")
            ),
            fixes,
        );
        Ok(())
    }

    /// Checks 8 and 9: identifier columns (the rule lives in [`Projection::resolve`]) and the
    /// selected columns.
    pub(super) fn check_mapping(&mut self) {
        let Some(table) = &self.table else { return };
        let qtable = self.qtable();
        let mapping = &self.config.mapping;
        let unsent = table.unsent_generated();
        let resolved = Projection::resolve_without(
            mapping,
            &qtable,
            table.columns.iter().map(|c| (c.name.as_str(), c.type_oid)),
            &unsent,
        );
        match resolved {
            Ok(projection) => {
                let name = |i: Option<usize>| {
                    i.and_then(|i| table.columns.get(i))
                        .map(|c| quote_ident(&c.name))
                };
                let found: Vec<String> = [
                    ("userId", name(projection.user_id)),
                    ("anonymousId", name(projection.anonymous_id)),
                    ("email", name(projection.email)),
                ]
                .into_iter()
                .filter_map(|(role, col)| col.map(|c| format!("{role} from {c}")))
                .collect();
                self.report.pass(format!(
                    "table {qtable} has identifier columns: {}",
                    found.join(", ")
                ));
                self.projection = Some(projection);
            }
            Err(e) => {
                let fixes = match &e {
                    MappingError::NoIdentifierColumn { .. } => vec![Fix::Step(
                        "name the column that identifies the user under [mapping.identifiers] (e.g. user_id = \"<column>\"), or add a user_id, anonymous_id or email column to the table".into(),
                    )],
                    MappingError::UnsentGeneratedColumn { column, needed_as, .. } => {
                        self.unsent_generated_fixes(column, needed_as)
                    }
                    other => vec![Fix::Step(other.hint())],
                };
                self.report.fail(e.to_string(), fixes);
            }
        }
        match &mapping.columns {
            None if !unsent.is_empty() => {
                let n = unsent.len();
                let mut fixes = Vec::new();
                if self.version_num >= PG18
                    && table.columns.iter().any(|c| {
                        c.generated == Some(catalog::Generated::Stored { published: false })
                    })
                {
                    fixes.push(Fix::Step(
                        "to send stored generated columns too, have the publication publish them (PostgreSQL 18):".into(),
                    ));
                    fixes.push(Fix::Sql(format!(
                        "ALTER PUBLICATION {} SET (publish_generated_columns = stored);",
                        quote_ident(&self.config.source.publication)
                    )));
                } else {
                    fixes.push(Fix::Step(
                        "compute generated values downstream from the columns they derive from, or list the columns to send under [mapping] columns".into(),
                    ));
                }
                self.report.warn(
                    format!(
                        "generated column{} {} of {qtable} {} left out of the traits: logical replication does not send {}, so the full sync leaves {} out too; the other {} columns are sent ([mapping] columns is not set)",
                        if n == 1 { "" } else { "s" },
                        quoted_list(&unsent),
                        if n == 1 { "is" } else { "are" },
                        if n == 1 { "it" } else { "them" },
                        if n == 1 { "it" } else { "them" },
                        table.columns.len() - n
                    ),
                    fixes,
                );
            }
            None => self.report.pass(format!(
                "all {} columns of {qtable} are sent as traits ([mapping] columns is not set)",
                table.columns.len()
            )),
            Some(selected) => {
                let missing: Vec<&String> = selected
                    .iter()
                    .filter(|c| table.column(c).is_none())
                    .collect();
                if missing.is_empty() {
                    self.report.pass(format!(
                        "the {} selected columns exist in {qtable}",
                        selected.len()
                    ));
                } else {
                    self.report.fail(
                        format!(
                            "table {qtable} has no column {} of [mapping] columns; its columns are: {}",
                            quoted_list(&missing),
                            table.column_list()
                        ),
                        vec![Fix::Step(
                            "fix [mapping] columns, or remove the key to send every column".into(),
                        )],
                    );
                }
            }
        }
    }

    /// The fix for a mapping that needs `column`, a generated column pgoutput does not send.
    fn unsent_generated_fixes(&self, column: &str, needed_as: &str) -> Vec<Fix> {
        let stored = self.table.as_ref().is_some_and(|t| {
            t.column(column)
                .is_some_and(|c| matches!(c.generated, Some(catalog::Generated::Stored { .. })))
        });
        let mut fixes = vec![Fix::Step(if needed_as.starts_with("[mapping] columns") {
            format!(
                "remove {} from [mapping] columns and compute its value downstream",
                quote_ident(column)
            )
        } else {
            "name an identifier column that is not generated under [mapping.identifiers]".into()
        })];
        if stored && self.version_num >= PG18 {
            fixes.push(Fix::Step(
                "or have the publication send stored generated columns (PostgreSQL 18):".into(),
            ));
            fixes.push(Fix::Sql(format!(
                "ALTER PUBLICATION {} SET (publish_generated_columns = stored);",
                quote_ident(&self.config.source.publication)
            )));
        }
        fixes
    }

    /// Names of the identifier columns the projection resolved.
    pub(super) fn identifier_columns(&self) -> Vec<String> {
        let (Some(table), Some(p)) = (&self.table, &self.projection) else {
            return Vec::new();
        };
        [p.user_id, p.anonymous_id, p.email]
            .into_iter()
            .flatten()
            .filter_map(|i| table.columns.get(i).map(|c| c.name.clone()))
            .collect()
    }

    /// Check 11: the replica identity suits the sync mode; TOASTed columns warn.
    pub(super) fn check_replica_identity(&mut self) {
        let Some(table) = &self.table else { return };
        if table.is_partitioned() {
            self.check_partition_identities();
            self.check_toast();
            return;
        }
        let qtable = self.qtable();
        let ri: Vec<&str> = table
            .columns
            .iter()
            .filter(|c| c.replica_identity)
            .map(|c| c.name.as_str())
            .collect();
        let kind = match table.replica_identity {
            'f' => "FULL".to_owned(),
            'n' => "NOTHING".to_owned(),
            'i' => "USING INDEX".to_owned(),
            _ => "DEFAULT".to_owned(),
        };
        let full_fix = Fix::Sql(format!("ALTER TABLE {qtable} REPLICA IDENTITY FULL;"));
        if ri.is_empty() {
            let why = match table.replica_identity {
                'n' => "REPLICA IDENTITY NOTHING".to_owned(),
                'i' => "REPLICA IDENTITY USING INDEX, but that index is gone".to_owned(),
                _ => "REPLICA IDENTITY DEFAULT but no primary key".to_owned(),
            };
            self.report.fail(
                format!("table {qtable} has {why}, so the server rejects every UPDATE of it once it is published for updates"),
                vec![
                    full_fix.clone(),
                    Fix::Step("or give the table a primary key and use REPLICA IDENTITY DEFAULT".into()),
                ],
            );
        } else {
            let described = if table.replica_identity == 'f' {
                "FULL: every column".to_owned()
            } else {
                format!("{kind}: {}", quoted_list(&ri))
            };
            let ids = self.identifier_columns();
            let ledger_key = table
                .row_key_columns()
                .filter(|_| self.config.ledger)
                .map(|k| quoted_list(&k));
            if let (SyncMode::Mirror, Some(key)) = (self.config.sync_mode, &ledger_key) {
                self.report.pass(format!(
                    "mirror mode names the user of a deleted row from the sent-state ledger by its key ({key}), so the replica identity of {qtable} ({described}) is enough"
                ));
            } else if self.config.sync_mode == SyncMode::Mirror && self.projection.is_some() {
                let outside: Vec<&String> =
                    ids.iter().filter(|c| !ri.contains(&c.as_str())).collect();
                if outside.is_empty() {
                    self.report.pass(format!(
                        "the replica identity of {qtable} ({described}) includes the identifier columns, so mirror mode can identify deleted rows"
                    ));
                } else {
                    self.report.fail(
                        format!(
                            "mirror mode sends deletes, but the identifier column{} {} {} not in the replica identity of {qtable} ({described}), so deleted rows could not be identified",
                            if outside.len() == 1 { "" } else { "s" },
                            quoted_list(&outside),
                            if outside.len() == 1 { "is" } else { "are" },
                        ),
                        vec![full_fix.clone()],
                    );
                }
            } else {
                self.report.pass(format!(
                    "table {qtable} has a replica identity ({described}), so its updates are published"
                ));
            }
        }
        self.check_ledger();
        self.check_toast();
    }

    /// What the sent-state ledger does for this table, or what going without it costs.
    fn check_ledger(&mut self) {
        let Some(table) = &self.table else { return };
        let qtable = self.qtable();
        if !self.config.ledger {
            self.report.warn(
                "sync.ledger = false: every update is sent even when no trait changed, mirror-mode deletes need the identifier columns in the replica identity, `resync --changed-only` is unavailable and TRUNCATE only logs",
                vec![Fix::Step(
                    "set [sync] ledger = true (the default) to have them, at one row per table row in _rudderstack.cdc_ledger".into(),
                )],
            );
        } else if table.row_key_columns().is_none() {
            self.report.warn(
                format!(
                    "{qtable} has no primary key (nor replica identity index): its rows are neither coalesced in windows nor kept in the sent-state ledger, so updates that change nothing are sent and mirror-mode deletes need REPLICA IDENTITY FULL"
                ),
                vec![Fix::Step("give the table a primary key".into())],
            );
        }
    }

    /// Large values: an update that leaves a TOASTed value unchanged does not resend it unless
    /// the replica identity is FULL.
    fn check_toast(&mut self) {
        let Some(table) = &self.table else { return };
        let qtable = self.qtable();
        if table.replica_identity != 'f' {
            let toastable: Vec<&str> = match &self.config.mapping.columns {
                None => table
                    .columns
                    .iter()
                    .filter(|c| c.toastable && !c.unsent_generated())
                    .map(|c| c.name.as_str())
                    .collect(),
                Some(sel) => sel
                    .iter()
                    .filter(|c| table.column(c).is_some_and(|col| col.toastable))
                    .map(String::as_str)
                    .collect(),
            };
            if !toastable.is_empty() {
                let mut fixes = replica_identity_full_fixes(table);
                fixes.push(Fix::Step(
                    "REPLICA IDENTITY FULL logs every column on update, at the cost of more WAL"
                        .into(),
                ));
                self.report.warn(
                    format!(
                        "selected column{} {} of {qtable} can be stored out of line (TOAST): an update that leaves such a large value unchanged does not resend it, so that trait is left out of the update event",
                        if toastable.len() == 1 { "" } else { "s" },
                        quoted_list(&toastable)
                    ),
                    fixes,
                );
            }
        }
    }
}

impl Ctx<'_> {
    /// Check 11 for a partitioned table: pgoutput sends the old row of an update or delete by
    /// the replica identity of the partition the row is in, and each partition has its own
    /// (`ALTER TABLE … REPLICA IDENTITY` on the parent does not reach them).
    fn check_partition_identities(&mut self) {
        let Some(table) = &self.table else { return };
        let Some(leaves) = &table.partitions else {
            return;
        };
        let qtable = self.qtable();
        let later = Fix::Step(LATER_PARTITIONS.into());
        if leaves.is_empty() {
            self.report.warn(
                format!("partitioned table {qtable} has no partitions yet; each partition has its own replica identity"),
                vec![later],
            );
            return;
        }
        let names = |ps: &[&Partition]| {
            let shown: Vec<String> = ps
                .iter()
                .take(5)
                .map(|p| quote_qualified(&p.schema, &p.name))
                .collect();
            let more = if ps.len() > 5 { ", …" } else { "" };
            format!("{}{more}", shown.join(", "))
        };
        let plural = |ps: &[&Partition]| {
            if ps.len() == 1 {
                "partition"
            } else {
                "partitions"
            }
        };
        let without: Vec<&Partition> = leaves
            .iter()
            .filter(|p| p.identity_columns.is_empty())
            .collect();
        if !without.is_empty() {
            let mut fixes = full_fixes(&qtable, &without);
            fixes.push(later);
            self.report.fail(
                format!(
                    "{} {} of {qtable} {} no replica identity (REPLICA IDENTITY NOTHING, or DEFAULT without a primary key), so the server rejects every UPDATE of {} once the table is published for updates",
                    plural(&without),
                    names(&without),
                    if without.len() == 1 { "has" } else { "have" },
                    if without.len() == 1 { "it" } else { "them" },
                ),
                fixes,
            );
            return;
        }
        let ids = self.identifier_columns();
        if self.config.sync_mode == SyncMode::Mirror
            && self.config.ledger
            && let Some(key) = table.row_key_columns()
        {
            self.report.pass(format!(
                "mirror mode names the user of a deleted row from the sent-state ledger by its key ({}), so the partitions' replica identities are enough",
                quoted_list(&key)
            ));
        } else if self.config.sync_mode == SyncMode::Mirror && self.projection.is_some() {
            let lacking: Vec<&Partition> = leaves
                .iter()
                .filter(|p| ids.iter().any(|id| !p.identity_columns.contains(id)))
                .collect();
            if lacking.is_empty() {
                self.report.pass(format!(
                    "the replica identity of every partition of {qtable} includes the identifier columns, so mirror mode can identify deleted rows"
                ));
            } else {
                let mut fixes = full_fixes(&qtable, &lacking);
                fixes.push(later);
                self.report.fail(
                    format!(
                        "mirror mode sends deletes, but the replica identity of {} {} of {qtable} lacks the identifier columns {}, so rows deleted there could not be identified",
                        plural(&lacking),
                        names(&lacking),
                        quoted_list(&ids),
                    ),
                    fixes,
                );
            }
        } else {
            self.report.pass(format!(
                "every partition of {qtable} ({}) has a replica identity, so its updates are published",
                leaves.len()
            ));
        }
    }
}

/// Partitions created or attached later start with the default replica identity.
const LATER_PARTITIONS: &str = "partitions created or attached later start with REPLICA IDENTITY DEFAULT: set it on each new partition too";

/// `ALTER TABLE … REPLICA IDENTITY FULL` for each of `leaves`; past ten, a query that writes
/// the statements for every partition not yet FULL (run it in psql, then `\gexec`).
fn full_fixes(root: &str, leaves: &[&Partition]) -> Vec<Fix> {
    if leaves.len() <= 10 {
        return leaves
            .iter()
            .map(|p| {
                Fix::Sql(format!(
                    "ALTER TABLE {} REPLICA IDENTITY FULL;",
                    quote_qualified(&p.schema, &p.name)
                ))
            })
            .collect();
    }
    vec![Fix::Step(format!(
        "for each of the {} partitions, ALTER TABLE <partition> REPLICA IDENTITY FULL; in psql: SELECT format('ALTER TABLE %s REPLICA IDENTITY FULL', c.oid::regclass) FROM pg_partition_tree({}::regclass) t JOIN pg_class c ON c.oid = t.relid WHERE t.isleaf AND c.relreplident <> 'f' \\gexec",
        leaves.len(),
        quote_literal(root)
    ))]
}

/// The SQL that makes the table's replica identity FULL: on the table itself, or on each of
/// its partitions that is not FULL yet (with a reminder for later partitions).
pub(super) fn replica_identity_full_fixes(table: &Table) -> Vec<Fix> {
    match &table.partitions {
        None => vec![Fix::Sql(format!(
            "ALTER TABLE {} REPLICA IDENTITY FULL;",
            quote_qualified(&table.schema, &table.name)
        ))],
        Some(leaves) => {
            let not_full: Vec<&Partition> = leaves
                .iter()
                .filter(|p| p.replica_identity != 'f')
                .collect();
            let root = quote_qualified(&table.schema, &table.name);
            let mut fixes = full_fixes(&root, &not_full);
            fixes.push(Fix::Step(LATER_PARTITIONS.into()));
            fixes
        }
    }
}
