//! The publication checks (check 10): it exists, publishes the table and the actions the sync
//! mode needs; on PostgreSQL 15 its row filter equals `[mapping] filter` (compared through the
//! server's own deparser, see the parent module), the replica identity covers the filter's
//! columns, and its column list covers what the mapping reads.

use super::{Ctx, Fix, PG15, quoted_list};
use crate::config::SyncMode;
use crate::postgres::{PgError, quote_ident, quote_literal, quote_qualified};

/// The publication as the catalog describes it.
struct Publication {
    name: String,
    all_tables: bool,
    insert: bool,
    update: bool,
    delete: bool,
    truncate: bool,
    /// Other published tables, `schema.table`.
    others: Vec<String>,
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

/// What the server made of a filter expression.
enum Probe {
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

impl Ctx<'_> {
    /// `"s"."t" WHERE (filter)`: the table as a publication should list it.
    fn publication_table_spec(&self) -> String {
        match (&self.config.mapping.filter, self.version_num >= PG15) {
            (Some(filter), true) => format!("{} WHERE ({filter})", self.qtable()),
            _ => self.qtable(),
        }
    }

    /// SQL that makes the publication list the table exactly as configured.
    fn republish(&self, publication: &Publication) -> Vec<Fix> {
        let p = quote_ident(&publication.name);
        let spec = self.publication_table_spec();
        if publication.all_tables {
            vec![
                Fix::Step(format!(
                    "publication {p} is FOR ALL TABLES, which cannot filter rows or columns; if nothing else uses it, recreate it for this table:"
                )),
                Fix::Sql(format!("DROP PUBLICATION {p};")),
                Fix::Sql(format!("CREATE PUBLICATION {p} FOR TABLE {spec};")),
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

    pub(super) async fn check_publication(&mut self) -> Result<(), PgError> {
        let src = &self.config.source;
        let qpub = quote_ident(&src.publication);
        let qtable = self.qtable();
        if self.config.mapping.filter.is_some() && self.version_num < PG15 {
            self.report.fail(
                "[mapping] filter needs publication row filters, which PostgreSQL 15 introduced; this server is older",
                vec![Fix::Step(
                    "remove [mapping] filter, or upgrade PostgreSQL to 15 or newer".into(),
                )],
            );
        }
        let row = self
            .client
            .query_opt(
                "SELECT puballtables, pubinsert, pubupdate, pubdelete, pubtruncate
                   FROM pg_publication WHERE pubname = $1",
                &[&src.publication],
            )
            .await
            .map_err(|e| PgError::query("looking up the publication", e))?;
        let Some(row) = row else {
            self.report.fail(
                format!("publication {qpub} does not exist"),
                vec![
                    Fix::Sql(format!(
                        "CREATE PUBLICATION {qpub} FOR TABLE {};",
                        self.publication_table_spec()
                    )),
                    Fix::Step(
                        "run it as the table's owner or a superuser (sql/setup.sql does this)"
                            .into(),
                    ),
                ],
            );
            return Ok(());
        };
        let tables = self
            .client
            .query(
                "SELECT schemaname::text, tablename::text FROM pg_publication_tables
                  WHERE pubname = $1 ORDER BY 1, 2",
                &[&src.publication],
            )
            .await
            .map_err(|e| PgError::query("listing the publication's tables", e))?;
        let mut has_table = false;
        let mut others = Vec::new();
        for r in &tables {
            let (s, t): (String, String) = (r.get(0), r.get(1));
            if s == src.schema && t == src.table {
                has_table = true;
            } else {
                others.push(quote_qualified(&s, &t));
            }
        }
        let publication = Publication {
            name: src.publication.clone(),
            all_tables: row.get(0),
            insert: row.get(1),
            update: row.get(2),
            delete: row.get(3),
            truncate: row.get(4),
            others,
        };
        if has_table {
            self.report
                .pass(format!("publication {qpub} publishes table {qtable}"));
        } else {
            self.report.fail(
                format!("publication {qpub} does not publish table {qtable}"),
                vec![Fix::Sql(format!(
                    "ALTER PUBLICATION {qpub} ADD TABLE {};",
                    self.publication_table_spec()
                ))],
            );
        }
        if publication.all_tables {
            self.report.warn(
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
            self.report.warn(
                format!(
                    "publication {qpub} also publishes {n} other table{} ({}{more}): slotstream ignores them, but the server still decodes their changes for this slot",
                    if n == 1 { "" } else { "s" },
                    shown.join(", ")
                ),
                vec![Fix::Step("a publication of this table alone saves that work".into())],
            );
        }
        self.check_publish_actions(&publication);
        if has_table && self.version_num >= PG15 {
            self.check_publication_filter_and_columns(&publication)
                .await?;
        }
        Ok(())
    }

    fn check_publish_actions(&mut self, publication: &Publication) {
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
            self.report
                .pass(format!("publication {qpub} publishes {shown}"));
            return;
        }
        let wanted: Vec<&str> = ["insert", "update", "delete", "truncate"]
            .into_iter()
            .filter(|a| current.contains(a) || missing.contains(a))
            .collect();
        let mode = if mirror { "mirror" } else { "upsert" };
        self.report.fail(
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

    /// PostgreSQL 15+: the row filter matches `[mapping] filter`, the replica identity covers
    /// the filter's columns, and the column list covers what the mapping reads.
    async fn check_publication_filter_and_columns(
        &mut self,
        publication: &Publication,
    ) -> Result<(), PgError> {
        let src = &self.config.source;
        let qpub = quote_ident(&publication.name);
        let qtable = self.qtable();
        let row = self
            .client
            .query_one(
                "SELECT rowfilter, attnames::text[] FROM pg_publication_tables
                  WHERE pubname = $1 AND schemaname = $2 AND tablename = $3 LIMIT 1",
                &[&src.publication, &src.schema, &src.table],
            )
            .await
            .map_err(|e| PgError::query("reading the publication's row filter", e))?;
        let published_filter: Option<String> = row.get(0);
        let published_columns: Vec<String> =
            row.get::<_, Option<Vec<String>>>(1).unwrap_or_default();
        let configured = self.config.mapping.filter.clone();

        // The filter the server enforces on updates, for the replica identity rule below.
        let mut enforced_columns: Option<Vec<String>> = None;
        match (&published_filter, &configured) {
            (None, None) => {}
            (Some(pf), None) => {
                let mut fixes = self.republish(publication);
                fixes.push(Fix::Step(format!(
                    "or, to send only those rows, set filter = {} under [mapping]",
                    toml::Value::String(pf.clone())
                )));
                self.report.fail(
                    format!("publication {qpub} publishes only the rows of {qtable} where {pf}, but [mapping] sets no filter"),
                    fixes,
                );
                if let Probe::Deparsed { columns, .. } = self.probe_filter(pf).await? {
                    enforced_columns = Some(columns);
                }
            }
            (None, Some(cf)) => match self.probe_filter(cf).await? {
                Probe::Invalid(msg) => self.invalid_filter(&msg),
                probe => {
                    self.report.fail(
                        format!("[mapping] filter is {cf}, but publication {qpub} publishes every row of {qtable}"),
                        self.republish(publication),
                    );
                    if let Probe::Deparsed { columns, .. } = probe {
                        enforced_columns = Some(columns);
                    }
                }
            },
            (Some(pf), Some(cf)) => match self.probe_filter(cf).await? {
                Probe::Invalid(msg) => self.invalid_filter(&msg),
                Probe::Deparsed { text, columns } => {
                    if &text == pf {
                        self.report.pass(format!(
                            "publication {qpub} filters rows by {pf}, the same condition as [mapping] filter"
                        ));
                        enforced_columns = Some(columns);
                    } else {
                        self.filter_differs(publication, pf, &text);
                        if let Probe::Deparsed { columns, .. } = self.probe_filter(pf).await? {
                            enforced_columns = Some(columns);
                        }
                    }
                }
                Probe::Unavailable(why) => {
                    if normalise_filter(pf) == normalise_filter(cf) {
                        self.report.pass(format!(
                            "publication {qpub} filters rows by {pf}, which reads as [mapping] filter (compared as text, since the server could not normalise it: {why})"
                        ));
                    } else {
                        self.filter_differs(publication, pf, cf);
                        self.report.warn(
                            format!("the row filters were compared as text because the server could not normalise them: {why}"),
                            vec![Fix::Sql(format!(
                                "GRANT TEMPORARY ON DATABASE {} TO {};",
                                quote_ident(&src.database),
                                self.user()
                            ))],
                        );
                    }
                }
            },
        }
        if published_filter.is_some() || configured.is_some() {
            self.check_filter_replica_identity(publication, enforced_columns);
        }

        let Some(table) = &self.table else {
            return Ok(());
        };
        // Generated columns do not tell: before 18 the list names them though pgoutput does
        // not send them, from 18 on it leaves out those the publication does not send.
        let has_list = !published_columns.is_empty()
            && table
                .columns
                .iter()
                .any(|c| c.generated.is_none() && !published_columns.contains(&c.name));
        if !has_list {
            return Ok(());
        }
        let missing: Vec<String> = self
            .needed_columns()
            .into_iter()
            .filter(|c| !published_columns.contains(c))
            .collect();
        let ri_missing: Vec<String> = if publication.update || publication.delete {
            table
                .columns
                .iter()
                .filter(|c| c.replica_identity && !published_columns.contains(&c.name))
                .map(|c| c.name.clone())
                .collect()
        } else {
            Vec::new()
        };
        if missing.is_empty() && ri_missing.is_empty() {
            self.report.pass(format!(
                "publication {qpub} publishes the columns {} of {qtable}, which cover the selected and identifier columns",
                quoted_list(&published_columns)
            ));
            return Ok(());
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
        self.report.fail(
            format!(
                "publication {qpub} publishes only the columns {} of {qtable} and {}",
                quoted_list(&published_columns),
                problems.join(" and ")
            ),
            self.republish(publication),
        );
        Ok(())
    }

    fn invalid_filter(&mut self, message: &str) {
        let qtable = self.qtable();
        self.report.fail(
            format!("[mapping] filter is not a valid condition on table {qtable}: {message}"),
            vec![Fix::Step(
                "fix [mapping] filter: it is a SQL boolean expression over the table's columns"
                    .into(),
            )],
        );
    }

    fn filter_differs(&mut self, publication: &Publication, published: &str, configured: &str) {
        let qpub = quote_ident(&publication.name);
        let qtable = self.qtable();
        let mut fixes = self.republish(publication);
        fixes.push(Fix::Step(format!(
            "or set filter = {} under [mapping] to match the publication",
            toml::Value::String(published.to_owned())
        )));
        self.report.fail(
            format!(
                "publication {qpub} filters {qtable} by {published}, but [mapping] filter is {configured}"
            ),
            fixes,
        );
    }

    /// With a row filter, the server rejects UPDATE and DELETE of the table unless the
    /// filter's columns are in the replica identity (PostgreSQL 15).
    fn check_filter_replica_identity(
        &mut self,
        publication: &Publication,
        filter_columns: Option<Vec<String>>,
    ) {
        let Some(table) = &self.table else { return };
        let qtable = self.qtable();
        if !(publication.update || publication.delete) {
            return;
        }
        if table.replica_identity == 'f' {
            self.report.pass(format!(
                "REPLICA IDENTITY FULL of {qtable} covers the row filter's columns, as updates and deletes with a row filter require"
            ));
            return;
        }
        let Some(columns) = filter_columns else {
            self.report.warn(
                format!("the row filter's columns could not be compared with the replica identity of {qtable}; updates and deletes with a row filter need every filter column in the replica identity"),
                vec![Fix::Sql(format!("ALTER TABLE {qtable} REPLICA IDENTITY FULL;"))],
            );
            return;
        };
        let outside: Vec<&String> = columns
            .iter()
            .filter(|c| !table.column(c).is_some_and(|col| col.replica_identity))
            .collect();
        if outside.is_empty() {
            self.report.pass(format!(
                "the row filter's columns are in the replica identity of {qtable}, as updates and deletes with a row filter require"
            ));
        } else {
            self.report.fail(
                format!(
                    "the row filter reads {}, which the replica identity of {qtable} lacks, so the server rejects every UPDATE and DELETE of the table",
                    quoted_list(&outside)
                ),
                vec![
                    Fix::Sql(format!("ALTER TABLE {qtable} REPLICA IDENTITY FULL;")),
                    Fix::Step(
                        "or use a unique index that includes those columns: ALTER TABLE … REPLICA IDENTITY USING INDEX …".into(),
                    ),
                ],
            );
        }
    }

    /// Deparses `expr` with the server's own code (see the module docs), in a transaction that
    /// is always rolled back.
    async fn probe_filter(&mut self, expr: &str) -> Result<Probe, PgError> {
        let qtable = self.qtable();
        let tx = self
            .client
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_filter_comparison_ignores_spacing_and_parentheses() {
        assert_eq!(
            normalise_filter("(deleted_at IS NULL)"),
            normalise_filter("deleted_at  IS NULL")
        );
        assert_ne!(normalise_filter("a = 1"), normalise_filter("a = 2"));
    }
}
