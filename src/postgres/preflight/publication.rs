//! The publication requirements, one implementation for `check` (check 10) and for `run` (see
//! [`super::verify`]): the publication exists, publishes the table under its own name (a
//! partitioned table through its root, `publish_via_partition_root`) and the actions the sync
//! mode needs; on PostgreSQL 15 its row filter equals `[mapping] filter` (compared through the
//! server's own deparser, see the parent module) and its column list covers what the mapping
//! reads. `check` adds the replica identity rules that make the server accept updates and
//! deletes with a row filter or a column list.
//!
//! What the catalog says is read by [`read`] (plain queries, valid inside any transaction);
//! [`Requirements::evaluate`] turns it into pass, warning and failure lines without touching
//! the server, so both commands print the same line and the same fix for the same problem.

use tokio_postgres::Client;

use super::{Ctx, Fix, PG13, PG15, Report, quoted_list};
use crate::config::{Config, SyncMode};
use crate::postgres::catalog::Table;
use crate::postgres::{PgError, quote_ident, quote_literal, quote_qualified};

/// The followed table as it is now, and its publication as the catalog describes it.
#[derive(Debug, Clone)]
pub(super) struct Facts {
    /// The table's live columns, in attnum order, generated ones left out: before 18 a column
    /// list names them though pgoutput never sends them, from 18 on it names only those it
    /// sends (empty when the table does not exist).
    pub(super) columns: Vec<String>,
    /// The table is partitioned.
    pub(super) partitioned: bool,
    /// The publication, when it exists.
    pub(super) publication: Option<Publication>,
}

/// The publication, seen from the followed table.
#[derive(Debug, Clone)]
pub(super) struct Publication {
    pub(super) name: String,
    pub(super) all_tables: bool,
    pub(super) insert: bool,
    pub(super) update: bool,
    pub(super) delete: bool,
    pub(super) truncate: bool,
    /// `publish_via_partition_root`: partitions' changes are published as their root's.
    pub(super) via_root: bool,
    /// `pg_publication_tables` lists the table itself: its changes are published under its own
    /// name (directly, FOR ALL TABLES, TABLES IN SCHEMA, or as a partition root).
    pub(super) listed: bool,
    /// The listed table's row filter, as the server deparses it (PostgreSQL 15).
    pub(super) row_filter: Option<String>,
    /// The listed table's published columns (PostgreSQL 15; empty before).
    pub(super) published_columns: Vec<String>,
    /// Leaf partitions of the table that it lists under their own names.
    pub(super) leaves_listed: usize,
    /// Other published tables, quoted `schema.table` (read only when asked for).
    pub(super) others: Vec<String>,
}

impl Publication {
    fn actions(&self) -> Vec<&'static str> {
        [
            (self.insert, "insert"),
            (self.update, "update"),
            (self.delete, "delete"),
            (self.truncate, "truncate"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, a)| *a)
        .collect()
    }
}

/// Reads the table's columns and the publication's definition for it. `with_others` also
/// lists the other tables the publication publishes (for `check`'s warning).
pub(super) async fn read(
    client: &Client,
    config: &Config,
    version_num: i32,
    with_others: bool,
) -> Result<Facts, PgError> {
    let src = &config.source;
    let via_root = if version_num >= PG13 {
        "p.pubviaroot"
    } else {
        "false"
    };
    let row = client
        .query_one(
            &format!(
                "WITH t AS (SELECT c.oid, c.relkind FROM pg_class c
                              JOIN pg_namespace n ON n.oid = c.relnamespace
                             WHERE n.nspname = $2 AND c.relname = $3)
                 SELECT ARRAY(SELECT a.attname::text FROM t JOIN pg_attribute a ON a.attrelid = t.oid
                               WHERE a.attnum > 0 AND NOT a.attisdropped
                                 AND a.attgenerated = '' ORDER BY a.attnum),
                        coalesce((SELECT relkind = 'p' FROM t), false),
                        p.oid IS NOT NULL, p.puballtables, p.pubinsert, p.pubupdate, p.pubdelete,
                        p.pubtruncate, {via_root}
                   FROM (SELECT 1) one
                   LEFT JOIN pg_publication p ON p.pubname = $1"
            ),
            &[&src.publication, &src.schema, &src.table],
        )
        .await
        .map_err(|e| PgError::query("looking up the publication", e))?;
    let columns: Vec<String> = row.get(0);
    let partitioned: bool = row.get(1);
    if !row.get::<_, bool>(2) {
        return Ok(Facts {
            columns,
            partitioned,
            publication: None,
        });
    }
    let mut publication = Publication {
        name: src.publication.clone(),
        all_tables: row.get(3),
        insert: row.get(4),
        update: row.get(5),
        delete: row.get(6),
        truncate: row.get(7),
        via_root: row.get(8),
        listed: false,
        row_filter: None,
        published_columns: Vec::new(),
        leaves_listed: 0,
        others: Vec::new(),
    };
    // The table and its leaf partitions: the names pgoutput may publish its changes under.
    let ours = if partitioned && version_num >= PG13 {
        "SELECT $2::text, $3::text, true
          UNION ALL
         SELECT n.nspname::text, c.relname::text, false
           FROM t CROSS JOIN LATERAL pg_partition_tree(t.oid) tree
           JOIN pg_class c ON c.oid = tree.relid
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE tree.isleaf AND tree.level > 0"
    } else {
        "SELECT $2::text, $3::text, true"
    };
    let (filter, attnames) = if version_num >= PG15 {
        ("p.rowfilter", "p.attnames::text[]")
    } else {
        ("NULL::text", "NULL::text[]")
    };
    let rows = client
        .query(
            &format!(
                "WITH t AS (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                             WHERE n.nspname = $2 AND c.relname = $3),
                      ours (schemaname, tablename, is_table) AS ({ours})
                 SELECT ours.is_table, {filter}, {attnames}
                   FROM pg_publication_tables p
                   JOIN ours ON ours.schemaname = p.schemaname::text AND ours.tablename = p.tablename::text
                  WHERE p.pubname = $1"
            ),
            &[&src.publication, &src.schema, &src.table],
        )
        .await
        .map_err(|e| PgError::query("listing the publication's tables", e))?;
    for r in &rows {
        if r.get::<_, bool>(0) {
            publication.listed = true;
            publication.row_filter = r.get(1);
            publication.published_columns = r.get::<_, Option<Vec<String>>>(2).unwrap_or_default();
        } else {
            publication.leaves_listed += 1;
        }
    }
    if with_others {
        publication.others = client
            .query(
                &format!(
                    "WITH t AS (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                 WHERE n.nspname = $2 AND c.relname = $3),
                          ours (schemaname, tablename, is_table) AS ({ours})
                     SELECT p.schemaname::text, p.tablename::text FROM pg_publication_tables p
                      WHERE p.pubname = $1
                        AND NOT EXISTS (SELECT FROM ours WHERE ours.schemaname = p.schemaname::text
                                                           AND ours.tablename = p.tablename::text)
                      ORDER BY 1, 2"
                ),
                &[&src.publication, &src.schema, &src.table],
            )
            .await
            .map_err(|e| PgError::query("listing the publication's tables", e))?
            .iter()
            .map(|r| quote_qualified(r.get(0), r.get(1)))
            .collect();
    }
    Ok(Facts {
        columns,
        partitioned,
        publication: Some(publication),
    })
}

/// What the server made of a filter expression.
#[derive(Debug, Clone)]
pub(super) enum Probe {
    /// Its canonical text and the columns it reads.
    Deparsed { text: String, columns: Vec<String> },
    /// The expression is not valid over the table; the server's message.
    Invalid(String),
    /// The role may not create the temporary table; the server's message.
    Unavailable(String),
}

/// The filter texts with whitespace and parentheses removed: the fallback comparison.
fn normalise_filter(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_whitespace() && *c != '(' && *c != ')')
        .collect()
}

/// Whether `check` must deparse the published filter too, to learn which columns the filter
/// the server enforces reads: it differs from the configured one, or nothing is configured.
pub(super) fn published_filter_needs_probe(published: &str, configured: Option<&Probe>) -> bool {
    match configured {
        None => true,
        Some(Probe::Deparsed { text, .. }) => text != published,
        Some(Probe::Invalid(_) | Probe::Unavailable(_)) => false,
    }
}

/// Deparses `expr` with the server's own code (see the parent module), in a transaction that
/// is always rolled back. The client must not be inside a transaction.
pub(super) async fn probe_filter(
    client: &mut Client,
    qtable: &str,
    expr: &str,
) -> Result<Probe, PgError> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| PgError::query("starting the filter check", e))?;
    let create = format!("CREATE TEMPORARY TABLE slotstream_filter_probe (LIKE {qtable})");
    if let Err(e) = tx.execute(create.as_str(), &[]).await {
        let _ = tx.rollback().await;
        return match e.as_db_error() {
            Some(db) => Ok(Probe::Unavailable(db.message().to_owned())),
            None => Err(PgError::query("preparing the filter check", e)),
        };
    }
    let constrain = format!(
        "ALTER TABLE pg_temp.slotstream_filter_probe ADD CONSTRAINT slotstream_filter CHECK (\n{expr}\n)"
    );
    if let Err(e) = tx.execute(constrain.as_str(), &[]).await {
        let _ = tx.rollback().await;
        return match e.as_db_error() {
            Some(db) => Ok(Probe::Invalid(db.message().to_owned())),
            None => Err(PgError::query("checking [mapping] filter", e)),
        };
    }
    let row = tx
        .query_one(
            "SELECT pg_get_expr(c.conbin, c.conrelid),
                    ARRAY(SELECT a.attname::text FROM pg_attribute a
                           WHERE a.attrelid = c.conrelid AND a.attnum = ANY(c.conkey)
                           ORDER BY a.attnum)
               FROM pg_constraint c
              WHERE c.conrelid = 'pg_temp.slotstream_filter_probe'::regclass
                AND c.conname = 'slotstream_filter'",
            &[],
        )
        .await;
    let _ = tx.rollback().await;
    let row = row.map_err(|e| PgError::query("reading the normalised filter", e))?;
    Ok(Probe::Deparsed {
        text: row.get(0),
        columns: row.get(1),
    })
}

/// The table's columns that the mapping reads: the selected ones (all when `[mapping] columns`
/// is unset) that exist, then the identifier columns that exist.
pub(super) fn needed_columns(config: &Config, columns: &[String]) -> Vec<String> {
    let mut needed: Vec<String> = match &config.mapping.columns {
        None => columns.to_vec(),
        Some(sel) => sel
            .iter()
            .filter(|c| columns.contains(c))
            .cloned()
            .collect(),
    };
    for id in config.mapping.identifiers.all() {
        let name = id.name();
        if columns.iter().any(|c| c == name) && !needed.iter().any(|c| c == name) {
            needed.push(name.to_owned());
        }
    }
    needed
}

/// Everything the evaluation needs besides the [`Facts`].
pub(super) struct Requirements<'a> {
    pub(super) config: &'a Config,
    pub(super) version_num: i32,
    /// The server's reading of `[mapping] filter`, when one is set and was deparsed.
    pub(super) configured: Option<&'a Probe>,
    /// `check` only: the replica identity rules for a row filter and a column list, with the
    /// table as the catalog describes it and the server's reading of the published filter
    /// when it differs from the configured one.
    pub(super) replica_identity: Option<(&'a Table, Option<&'a Probe>)>,
}

impl Requirements<'_> {
    fn qtable(&self) -> String {
        quote_qualified(&self.config.source.schema, &self.config.source.table)
    }

    /// `"s"."t" WHERE (filter)`: the table as a publication should list it.
    fn publication_table_spec(&self) -> String {
        match (&self.config.mapping.filter, self.version_num >= PG15) {
            (Some(filter), true) => format!("{} WHERE ({filter})", self.qtable()),
            _ => self.qtable(),
        }
    }

    /// `CREATE PUBLICATION` for the table as configured.
    fn create_sql(&self, name: &str, partitioned: bool) -> String {
        let with = if partitioned {
            " WITH (publish_via_partition_root = true)"
        } else {
            ""
        };
        format!(
            "CREATE PUBLICATION {} FOR TABLE {}{with};",
            quote_ident(name),
            self.publication_table_spec()
        )
    }

    /// SQL that makes the publication list the table exactly as configured.
    fn republish(&self, facts: &Facts, publication: &Publication) -> Vec<Fix> {
        let p = quote_ident(&publication.name);
        let spec = self.publication_table_spec();
        if publication.all_tables {
            vec![
                Fix::Step(format!(
                    "publication {p} is FOR ALL TABLES, which cannot filter rows or columns; if nothing else uses it, recreate it for this table:"
                )),
                Fix::Sql(format!("DROP PUBLICATION {p};")),
                Fix::Sql(self.create_sql(&publication.name, facts.partitioned)),
            ]
        } else if publication.others.is_empty() {
            vec![Fix::Sql(format!("ALTER PUBLICATION {p} SET TABLE {spec};"))]
        } else {
            vec![
                Fix::Sql(format!(
                    "ALTER PUBLICATION {p} DROP TABLE {};",
                    self.qtable()
                )),
                Fix::Sql(format!("ALTER PUBLICATION {p} ADD TABLE {spec};")),
            ]
        }
    }

    /// Records a line per requirement in `report`.
    pub(super) fn evaluate(&self, facts: &Facts, report: &mut Report) {
        let src = &self.config.source;
        let qpub = quote_ident(&src.publication);
        let qtable = self.qtable();
        if self.config.mapping.filter.is_some() && self.version_num < PG15 {
            report.fail(
                "[mapping] filter needs publication row filters, which PostgreSQL 15 introduced; this server is older",
                vec![Fix::Step(
                    "remove [mapping] filter, or upgrade PostgreSQL to 15 or newer".into(),
                )],
            );
        }
        let Some(publication) = &facts.publication else {
            report.fail(
                format!("publication {qpub} does not exist"),
                vec![
                    Fix::Sql(self.create_sql(&src.publication, facts.partitioned)),
                    Fix::Step(
                        "run it as the table's owner or a superuser (sql/setup.sql does this)"
                            .into(),
                    ),
                ],
            );
            return;
        };
        let via_root = Fix::Sql(format!(
            "ALTER PUBLICATION {qpub} SET (publish_via_partition_root = true);"
        ));
        if publication.listed && facts.partitioned {
            report.pass(format!(
                "publication {qpub} publishes table {qtable}, its partitions' changes as changes of {qtable} (publish_via_partition_root)"
            ));
        } else if publication.listed {
            report.pass(format!("publication {qpub} publishes table {qtable}"));
        } else if publication.leaves_listed > 0 {
            report.fail(
                format!(
                    "publication {qpub} publishes the partitions of {qtable} under their own names, so their changes would not arrive as changes of {qtable}"
                ),
                vec![via_root],
            );
        } else {
            let mut fixes = vec![Fix::Sql(format!(
                "ALTER PUBLICATION {qpub} ADD TABLE {};",
                self.publication_table_spec()
            ))];
            if facts.partitioned && !publication.via_root {
                fixes.push(via_root);
            }
            report.fail(
                format!("publication {qpub} does not publish table {qtable}"),
                fixes,
            );
        }
        if publication.all_tables {
            report.warn(
                format!("publication {qpub} is FOR ALL TABLES: slotstream ignores the other tables, but the server still decodes their changes for this slot"),
                vec![Fix::Step("a publication of this table alone saves that work".into())],
            );
        } else if !publication.others.is_empty() {
            let n = publication.others.len();
            let shown: Vec<&str> = publication
                .others
                .iter()
                .take(5)
                .map(String::as_str)
                .collect();
            let more = if n > 5 { ", …" } else { "" };
            report.warn(
                format!(
                    "publication {qpub} also publishes {n} other table{} ({}{more}): slotstream ignores them, but the server still decodes their changes for this slot",
                    if n == 1 { "" } else { "s" },
                    shown.join(", ")
                ),
                vec![Fix::Step("a publication of this table alone saves that work".into())],
            );
        }
        self.evaluate_actions(publication, report);
        if publication.listed && self.version_num >= PG15 {
            self.evaluate_filter(facts, publication, report);
            self.evaluate_columns(facts, publication, report);
        }
    }

    fn evaluate_actions(&self, publication: &Publication, report: &mut Report) {
        let qpub = quote_ident(&publication.name);
        let mirror = self.config.sync_mode == SyncMode::Mirror;
        let mut missing = Vec::new();
        if !publication.insert {
            missing.push("insert");
        }
        if !publication.update {
            missing.push("update");
        }
        if mirror && !publication.delete {
            missing.push("delete");
        }
        let current = publication.actions();
        let shown = if current.is_empty() {
            "nothing".to_owned()
        } else {
            current.join(", ")
        };
        if missing.is_empty() {
            report.pass(format!("publication {qpub} publishes {shown}"));
            return;
        }
        let wanted: Vec<&str> = ["insert", "update", "delete", "truncate"]
            .into_iter()
            .filter(|a| current.contains(a) || missing.contains(a))
            .collect();
        let mode = if mirror { "mirror" } else { "upsert" };
        report.fail(
            format!(
                "publication {qpub} publishes {shown}, but {mode} mode needs {} too",
                missing.join(" and ")
            ),
            vec![Fix::Sql(format!(
                "ALTER PUBLICATION {qpub} SET (publish = {});",
                quote_literal(&wanted.join(", "))
            ))],
        );
    }

    /// PostgreSQL 15+: the row filter matches `[mapping] filter`; for `check`, the replica
    /// identity covers the columns of the filter the server enforces.
    fn evaluate_filter(&self, facts: &Facts, publication: &Publication, report: &mut Report) {
        let src = &self.config.source;
        let qpub = quote_ident(&publication.name);
        let qtable = self.qtable();
        let published = publication.row_filter.as_deref();
        let configured = self.config.mapping.filter.as_deref();
        let published_probe = self.replica_identity.and_then(|(_, p)| p);
        let deparsed_columns = |p: Option<&Probe>| match p {
            Some(Probe::Deparsed { columns, .. }) => Some(columns.clone()),
            _ => None,
        };
        // The columns of the filter the server enforces on updates, for the replica identity.
        let mut enforced_columns: Option<Vec<String>> = None;
        match (published, configured) {
            (None, None) => {}
            (Some(pf), None) => {
                let mut fixes = self.republish(facts, publication);
                fixes.push(Fix::Step(format!(
                    "or, to send only those rows, set filter = {} under [mapping]",
                    toml::Value::String(pf.to_owned())
                )));
                report.fail(
                    format!("publication {qpub} publishes only the rows of {qtable} where {pf}, but [mapping] sets no filter"),
                    fixes,
                );
                enforced_columns = deparsed_columns(published_probe);
            }
            (None, Some(cf)) => match self.configured {
                Some(Probe::Invalid(msg)) => self.invalid_filter(msg, report),
                probe => {
                    report.fail(
                        format!("[mapping] filter is {cf}, but publication {qpub} publishes every row of {qtable}"),
                        self.republish(facts, publication),
                    );
                    enforced_columns = deparsed_columns(probe);
                }
            },
            (Some(pf), Some(cf)) => match self.configured {
                Some(Probe::Invalid(msg)) => self.invalid_filter(msg, report),
                Some(Probe::Deparsed { text, columns }) => {
                    if text == pf {
                        report.pass(format!(
                            "publication {qpub} filters rows by {pf}, the same condition as [mapping] filter"
                        ));
                        enforced_columns = Some(columns.clone());
                    } else {
                        self.filter_differs(facts, publication, pf, text, report);
                        enforced_columns = deparsed_columns(published_probe);
                    }
                }
                Some(Probe::Unavailable(why)) => {
                    if normalise_filter(pf) == normalise_filter(cf) {
                        report.pass(format!(
                            "publication {qpub} filters rows by {pf}, which reads as [mapping] filter (compared as text, since the server could not normalise it: {why})"
                        ));
                    } else {
                        self.filter_differs(facts, publication, pf, cf, report);
                        report.warn(
                            format!("the row filters were compared as text because the server could not normalise them: {why}"),
                            vec![Fix::Sql(format!(
                                "GRANT TEMPORARY ON DATABASE {} TO {};",
                                quote_ident(&src.database),
                                quote_ident(&src.user)
                            ))],
                        );
                    }
                }
                // Not deparsed: compared as text.
                None => {
                    if normalise_filter(pf) == normalise_filter(cf) {
                        report.pass(format!(
                            "publication {qpub} filters rows by {pf}, which reads as [mapping] filter"
                        ));
                    } else {
                        self.filter_differs(facts, publication, pf, cf, report);
                    }
                }
            },
        }
        if let Some((table, _)) = self.replica_identity
            && (published.is_some() || configured.is_some())
        {
            check_filter_replica_identity(table, publication, enforced_columns, report);
        }
    }

    fn invalid_filter(&self, message: &str, report: &mut Report) {
        let qtable = self.qtable();
        report.fail(
            format!("[mapping] filter is not a valid condition on table {qtable}: {message}"),
            vec![Fix::Step(
                "fix [mapping] filter: it is a SQL boolean expression over the table's columns"
                    .into(),
            )],
        );
    }

    fn filter_differs(
        &self,
        facts: &Facts,
        publication: &Publication,
        published: &str,
        configured: &str,
        report: &mut Report,
    ) {
        let qpub = quote_ident(&publication.name);
        let qtable = self.qtable();
        let mut fixes = self.republish(facts, publication);
        fixes.push(Fix::Step(format!(
            "or set filter = {} under [mapping] to match the publication",
            toml::Value::String(published.to_owned())
        )));
        report.fail(
            format!(
                "publication {qpub} filters {qtable} by {published}, but [mapping] filter is {configured}"
            ),
            fixes,
        );
    }

    /// PostgreSQL 15+: a column list covers every column the mapping reads (and, for `check`,
    /// the replica identity, without which the server rejects updates and deletes).
    fn evaluate_columns(&self, facts: &Facts, publication: &Publication, report: &mut Report) {
        let qpub = quote_ident(&publication.name);
        let qtable = self.qtable();
        let published = &publication.published_columns;
        let has_list =
            !published.is_empty() && facts.columns.iter().any(|c| !published.contains(c));
        if !has_list {
            return;
        }
        let missing: Vec<String> = needed_columns(self.config, &facts.columns)
            .into_iter()
            .filter(|c| !published.contains(c))
            .collect();
        let ri_missing: Vec<String> = match self.replica_identity {
            Some((table, _)) if publication.update || publication.delete => table
                .columns
                .iter()
                .filter(|c| c.replica_identity && !published.contains(&c.name))
                .map(|c| c.name.clone())
                .collect(),
            _ => Vec::new(),
        };
        if missing.is_empty() && ri_missing.is_empty() {
            report.pass(format!(
                "publication {qpub} publishes the columns {} of {qtable}, which cover the selected and identifier columns",
                quoted_list(published)
            ));
            return;
        }
        let mut problems = Vec::new();
        if !missing.is_empty() {
            problems.push(format!(
                "leaves out {}, which the mapping reads",
                quoted_list(&missing)
            ));
        }
        if !ri_missing.is_empty() {
            problems.push(format!(
                "leaves out the replica identity columns {}, so the server rejects every UPDATE and DELETE of the table",
                quoted_list(&ri_missing)
            ));
        }
        report.fail(
            format!(
                "publication {qpub} publishes only the columns {} of {qtable} and {}",
                quoted_list(published),
                problems.join(" and ")
            ),
            self.republish(facts, publication),
        );
    }
}

impl Ctx<'_> {
    /// Check 10: the publication, as [`Requirements::evaluate`] judges it, with the replica
    /// identity rules.
    pub(super) async fn check_publication(&mut self) -> Result<(), PgError> {
        let facts = read(&self.client, self.config, self.version_num, true).await?;
        let listed = facts.publication.as_ref().is_some_and(|p| p.listed);
        let qtable = self.qtable();
        // The server deparses filters over a copy of the table, so only a published (hence
        // existing) table can be probed.
        let configured = match &self.config.mapping.filter {
            Some(filter) if listed && self.version_num >= PG15 => {
                Some(probe_filter(&mut self.client, &qtable, filter).await?)
            }
            _ => None,
        };
        let published_filter = facts
            .publication
            .as_ref()
            .and_then(|p| p.row_filter.clone());
        let published = match published_filter {
            Some(pf)
                if listed
                    && self.table.is_some()
                    && published_filter_needs_probe(&pf, configured.as_ref()) =>
            {
                Some(probe_filter(&mut self.client, &qtable, &pf).await?)
            }
            _ => None,
        };
        let requirements = Requirements {
            config: self.config,
            version_num: self.version_num,
            configured: configured.as_ref(),
            replica_identity: self.table.as_ref().map(|t| (t, published.as_ref())),
        };
        requirements.evaluate(&facts, &mut self.report);
        Ok(())
    }
}

/// With a row filter, the server rejects UPDATE and DELETE of the table unless the filter's
/// columns are in the replica identity (PostgreSQL 15; of each partition, for a partitioned
/// table).
fn check_filter_replica_identity(
    table: &Table,
    publication: &Publication,
    filter_columns: Option<Vec<String>>,
    report: &mut Report,
) {
    let qtable = quote_qualified(&table.schema, &table.name);
    if !(publication.update || publication.delete) {
        return;
    }
    if table.replica_identity == 'f' {
        report.pass(format!(
            "REPLICA IDENTITY FULL of {qtable} covers the row filter's columns, as updates and deletes with a row filter require"
        ));
        return;
    }
    let Some(columns) = filter_columns else {
        report.warn(
            format!("the row filter's columns could not be compared with the replica identity of {qtable}; updates and deletes with a row filter need every filter column in the replica identity"),
            super::table::replica_identity_full_fixes(table),
        );
        return;
    };
    let outside: Vec<&String> = columns
        .iter()
        .filter(|c| !table.column(c).is_some_and(|col| col.replica_identity))
        .collect();
    if outside.is_empty() {
        report.pass(format!(
            "the row filter's columns are in the replica identity of {qtable}, as updates and deletes with a row filter require"
        ));
    } else {
        let mut fixes = super::table::replica_identity_full_fixes(table);
        fixes.push(Fix::Step(
            "or use a unique index that includes those columns: ALTER TABLE … REPLICA IDENTITY USING INDEX …".into(),
        ));
        report.fail(
            format!(
                "the row filter reads {}, which the replica identity of {qtable} lacks, so the server rejects every UPDATE and DELETE of the table",
                quoted_list(&outside)
            ),
            fixes,
        );
    }
}

#[cfg(test)]
mod tests;
