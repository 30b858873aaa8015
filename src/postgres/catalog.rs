//! Catalog queries about the followed table. Names are passed as parameters, never spliced
//! into SQL, so odd identifiers (quotes, unicode, reserved words) need no special care here.

use tokio_postgres::Client;

use super::PgError;

/// One column of the table as the catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// `attnum`: the column's identity in the table, kept across renames.
    pub attnum: i16,
    /// Type OID (`atttypid`), the same OID pgoutput's Relation message carries.
    pub type_oid: u32,
    /// `format_type(atttypid, atttypmod)`, for people.
    pub type_name: String,
    /// Part of the primary key.
    pub primary_key: bool,
    /// Part of the replica identity (the key pgoutput sends for updates and deletes). For a
    /// partitioned table: part of every leaf partition's replica identity.
    pub replica_identity: bool,
    /// Stored out of line when large (`attstorage` x or e): an update that leaves it unchanged
    /// sends no value for it unless REPLICA IDENTITY FULL.
    pub toastable: bool,
    /// `GENERATED ALWAYS AS (…)`: how it is generated, and whether pgoutput sends it.
    pub generated: Option<Generated>,
}

/// A generated column, as logical replication treats it.
///
/// pgoutput never sends generated columns before PostgreSQL 18. From 18 on it sends a stored
/// one when the publication publishes it: `publish_generated_columns = stored`, or a column
/// list that names it; `pg_publication_tables.attnames` lists exactly the columns it sends.
/// Virtual generated columns (18) are never sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generated {
    /// `STORED`; `published`: the publication sends it (PostgreSQL 18 and later only).
    Stored {
        /// pgoutput sends it.
        published: bool,
    },
    /// `VIRTUAL` (PostgreSQL 18): computed when read, never sent.
    Virtual,
}

impl Column {
    /// A generated column that pgoutput does not send: stream events cannot carry it, so the
    /// full sync must not either.
    pub fn unsent_generated(&self) -> bool {
        matches!(
            self.generated,
            Some(Generated::Virtual | Generated::Stored { published: false })
        )
    }
}

/// The followed table.
#[derive(Debug, Clone)]
pub struct Table {
    /// `pg_class.oid`.
    pub oid: u32,
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub name: String,
    /// Live columns in attnum order.
    pub columns: Vec<Column>,
    /// `relreplident`: `d` default (primary key), `n` nothing, `f` full, `i` index. For a
    /// partitioned table, whose own setting pgoutput never uses, the leaves' in one letter: `f`
    /// when every leaf is FULL, `n` when a leaf has no identity, else `d`.
    pub replica_identity: char,
    /// The planner's row estimate (`reltuples`; for a partitioned table the sum over its
    /// leaves), -1 when never analyzed.
    pub estimated_rows: i64,
    /// For a partitioned table, its leaf partitions, which hold the rows and each have their
    /// own replica identity; `None` for a plain table.
    pub partitions: Option<Vec<Partition>>,
}

/// A leaf partition of a partitioned table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub name: String,
    /// `relreplident` of the partition.
    pub replica_identity: char,
    /// The columns its replica identity holds (every column when FULL, none when NOTHING or
    /// when the key is missing).
    pub identity_columns: Vec<String>,
}

impl Table {
    /// The column with this exact name.
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// Names of the generated columns pgoutput does not send (see [`Generated`]).
    pub fn unsent_generated(&self) -> Vec<&str> {
        self.columns
            .iter()
            .filter(|c| c.unsent_generated())
            .map(|c| c.name.as_str())
            .collect()
    }

    /// The columns that identify a row in the stream as in a full sync: the replica identity
    /// index when the table names one (what deletes carry), else the primary key; `None` when
    /// the table has neither (its rows are not coalesced and have no ledger entry).
    pub fn row_key_columns(&self) -> Option<Vec<&str>> {
        let pick = |f: fn(&Column) -> bool| -> Vec<&str> {
            self.columns
                .iter()
                .filter(|c| f(c))
                .map(|c| c.name.as_str())
                .collect()
        };
        let mut key = Vec::new();
        if self.replica_identity == 'i' && !self.is_partitioned() {
            key = pick(|c| c.replica_identity);
        }
        if key.is_empty() {
            key = pick(|c| c.primary_key);
        }
        (!key.is_empty()).then_some(key)
    }

    /// Whether this is a partitioned table.
    pub fn is_partitioned(&self) -> bool {
        self.partitions.is_some()
    }

    /// Makes a partitioned table's replica identity the one its leaves share: pgoutput sends
    /// the old row of an update or delete by the identity of the leaf the row is in.
    fn apply_partitions(&mut self, leaves: Vec<Partition>) {
        for col in &mut self.columns {
            col.replica_identity = !leaves.is_empty()
                && leaves
                    .iter()
                    .all(|p| p.identity_columns.contains(&col.name));
        }
        self.replica_identity = if leaves.is_empty() {
            self.replica_identity
        } else if leaves.iter().all(|p| p.replica_identity == 'f') {
            'f'
        } else if leaves.iter().any(|p| p.identity_columns.is_empty()) {
            'n'
        } else {
            'd'
        };
        self.partitions = Some(leaves);
    }

    /// Column names, comma-separated, for messages.
    pub fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Reads the table's shape as `publication` sends it, or `None` when it does not exist (or is
/// not visible to the role). The publication decides only whether a stored generated column is
/// sent (PostgreSQL 18, see [`Generated`]); a publication that does not exist or does not
/// publish the table sends none.
pub async fn table(
    client: &Client,
    schema: &str,
    name: &str,
    publication: &str,
) -> Result<Option<Table>, PgError> {
    let row = client
        .query_opt(
            "SELECT c.oid, c.relreplident::text, c.reltuples::int8, c.relkind = 'p'
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &name],
        )
        .await
        .map_err(|e| PgError::query("looking up the table", e))?;
    let Some(row) = row else { return Ok(None) };
    let oid: u32 = row.get(0);
    let replica_identity = row.get::<_, String>(1).chars().next().unwrap_or('d');
    let estimated_rows: i64 = row.get(2);
    let partitioned: bool = row.get(3);
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid, format_type(a.atttypid, a.atttypmod),
                    coalesce(a.attnum = ANY(pk.indkey), false),
                    coalesce(a.attnum = ANY(ri.indkey), false),
                    a.attstorage IN ('x', 'e'), a.attgenerated::text, a.attnum
               FROM pg_attribute a
               LEFT JOIN pg_index pk ON pk.indrelid = a.attrelid AND pk.indisprimary
               LEFT JOIN pg_index ri ON ri.indrelid = a.attrelid AND ri.indisreplident
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(|e| PgError::query("reading the table's columns", e))?;
    let mut columns: Vec<Column> = rows
        .iter()
        .map(|r| Column {
            name: r.get(0),
            type_oid: r.get(1),
            type_name: r.get(2),
            primary_key: r.get(3),
            replica_identity: false,
            toastable: r.get(5),
            generated: match r.get::<_, String>(6).as_str() {
                "s" => Some(Generated::Stored { published: false }),
                "v" => Some(Generated::Virtual),
                _ => None,
            },
            attnum: r.get(7),
        })
        .collect();
    mark_published_generated(client, &mut columns, schema, name, publication).await?;
    for (col, r) in columns.iter_mut().zip(rows.iter()) {
        col.replica_identity = match replica_identity {
            'f' => true,
            'i' => r.get(4),
            'd' => col.primary_key,
            _ => false,
        };
    }
    let mut table = Table {
        oid,
        schema: schema.to_owned(),
        name: name.to_owned(),
        columns,
        replica_identity,
        estimated_rows,
        partitions: None,
    };
    if partitioned {
        let (leaves, estimate) = partitions(client, oid).await?;
        table.estimated_rows = estimate;
        table.apply_partitions(leaves);
    }
    Ok(Some(table))
}

/// The leaf partitions of the partitioned table `oid`, with their replica identities, and the
/// row estimate summed over them (-1 when none was ever analyzed).
async fn partitions(client: &Client, oid: u32) -> Result<(Vec<Partition>, i64), PgError> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, c.relreplident::text, c.reltuples::int8,
                    ARRAY(SELECT a.attname::text FROM pg_attribute a
                           WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                             AND (c.relreplident = 'f'
                                  OR EXISTS (SELECT FROM pg_index i
                                              WHERE i.indrelid = c.oid AND a.attnum = ANY(i.indkey)
                                                AND CASE c.relreplident
                                                      WHEN 'd' THEN i.indisprimary
                                                      WHEN 'i' THEN i.indisreplident
                                                      ELSE false END))
                           ORDER BY a.attnum)
               FROM pg_partition_tree($1::oid::regclass) t
               JOIN pg_class c ON c.oid = t.relid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE t.isleaf AND c.relkind = 'r'
              ORDER BY 1, 2",
            &[&oid],
        )
        .await
        .map_err(|e| PgError::query("listing the table's partitions", e))?;
    let mut estimate: i64 = -1;
    let leaves = rows
        .iter()
        .map(|r| {
            let tuples: i64 = r.get(3);
            if tuples >= 0 {
                estimate = estimate.max(0) + tuples;
            }
            Partition {
                schema: r.get(0),
                name: r.get(1),
                replica_identity: r.get::<_, String>(2).chars().next().unwrap_or('d'),
                identity_columns: r.get(4),
            }
        })
        .collect();
    Ok((leaves, estimate))
}

/// Marks the stored generated columns that `publication` sends (PostgreSQL 18 and later: they
/// are in `pg_publication_tables.attnames`; before 18 that list names generated columns that
/// pgoutput does not send, so it is not asked).
async fn mark_published_generated(
    client: &Client,
    columns: &mut [Column],
    schema: &str,
    name: &str,
    publication: &str,
) -> Result<(), PgError> {
    let stored = |c: &Column| matches!(c.generated, Some(Generated::Stored { .. }));
    if !columns.iter().any(stored) {
        return Ok(());
    }
    if super::version::server_version(client).await?.num < super::version::PG18 {
        return Ok(());
    }
    let published: Vec<String> = client
        .query_opt(
            "SELECT attnames::text[] FROM pg_publication_tables
              WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[&publication, &schema, &name],
        )
        .await
        .map_err(|e| PgError::query("reading the publication's columns", e))?
        .and_then(|r| r.get::<_, Option<Vec<String>>>(0))
        .unwrap_or_default();
    for column in columns.iter_mut().filter(|c| stored(c)) {
        column.generated = Some(Generated::Stored {
            published: published.contains(&column.name),
        });
    }
    Ok(())
}

/// The `(schema, name)` of the table with `pg_class.oid` = `oid`, if it still exists.
pub async fn table_name(client: &Client, oid: u32) -> Result<Option<(String, String)>, PgError> {
    let row = client
        .query_opt(
            "SELECT n.nspname::text, c.relname::text
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = $1 AND c.relkind IN ('r', 'p')",
            &[&oid],
        )
        .await
        .map_err(|e| PgError::query("looking up the followed table by OID", e))?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(name: &str) -> Column {
        Column {
            name: name.into(),
            type_oid: 25,
            type_name: "text".into(),
            primary_key: false,
            replica_identity: false,
            toastable: true,
            generated: None,
            attnum: 1,
        }
    }

    fn leaf(name: &str, identity: char, columns: &[&str]) -> Partition {
        Partition {
            schema: "public".into(),
            name: name.into(),
            replica_identity: identity,
            identity_columns: columns.iter().map(|c| (*c).to_owned()).collect(),
        }
    }

    fn parent() -> Table {
        Table {
            oid: 1,
            schema: "public".into(),
            name: "users".into(),
            columns: vec![column("id"), column("region"), column("user_id")],
            replica_identity: 'f',
            estimated_rows: -1,
            partitions: None,
        }
    }

    #[test]
    fn a_partitioned_tables_identity_is_what_every_leaf_has() {
        let mut t = parent();
        t.apply_partitions(vec![
            leaf("users_eu", 'f', &["id", "region", "user_id"]),
            leaf("users_us", 'd', &["id", "region"]),
        ]);
        assert!(t.is_partitioned());
        assert_eq!(
            t.replica_identity, 'd',
            "the parent's own FULL does not count"
        );
        let ri: Vec<bool> = t.columns.iter().map(|c| c.replica_identity).collect();
        assert_eq!(ri, [true, true, false]);

        let mut t = parent();
        t.apply_partitions(vec![leaf("users_eu", 'f', &["id", "region", "user_id"])]);
        assert_eq!(t.replica_identity, 'f');

        let mut t = parent();
        t.apply_partitions(vec![
            leaf("users_eu", 'f', &["id", "region", "user_id"]),
            leaf("users_us", 'n', &[]),
        ]);
        assert_eq!(t.replica_identity, 'n');
        assert!(t.columns.iter().all(|c| !c.replica_identity));
    }
}
