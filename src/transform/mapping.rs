//! Columns → traits and identifiers.
//!
//! A [`Projection`] is the config's mapping resolved against one shape of the table (from the
//! catalog, or from a pgoutput Relation message): column positions instead of names, so the
//! per-row work is index lookups. It is rebuilt whenever the relation's shape changes.
//!
//! Rules:
//! - traits hold every selected column (all columns when `mapping.columns` is absent) under its
//!   trait key (`mapping.trait_keys`, else the column name), plus `mapping.constants`;
//! - `userId` comes from the user_id column, `anonymousId` from the anonymous_id column; a row
//!   with only an email gets a deterministic `anonymousId` derived from the normalised email;
//! - a cell the server did not send (an unchanged TOASTed value) is left out of the traits,
//!   never sent as a placeholder;
//! - the table must have at least one identifier column; a row with no identifier value is
//!   not an event (the caller dead-letters it).

use std::sync::Arc;

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::config::{IdentifierColumn, MappingConfig};

/// Namespace of the `anonymousId`s derived from emails (UUID v5).
const EMAIL_NAMESPACE: Uuid = Uuid::from_u128(0x5a1f_0c2e_8d3b_4e47_9b6a_1e2d_3c4b_5a69);

/// The table cannot be mapped as configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    /// No identifier column exists.
    #[error(
        "table {table} has no identifier column: it needs one of {wanted}, and its columns are: {columns}"
    )]
    NoIdentifierColumn {
        /// schema.table.
        table: String,
        /// The identifier names looked for.
        wanted: String,
        /// The columns it has.
        columns: String,
    },
    /// An identifier named under `[mapping.identifiers]` does not exist.
    #[error(
        "mapping.identifiers.{role} names column {column:?}, which table {table} does not have (its columns: {columns})"
    )]
    MissingIdentifier {
        /// user_id / anonymous_id / email.
        role: &'static str,
        /// The configured column.
        column: String,
        /// schema.table.
        table: String,
        /// The columns it has.
        columns: String,
    },
    /// The mapping needs a column that logical replication does not send (a generated
    /// column): stream events could not carry it.
    #[error(
        "{needed_as} needs column {column:?} of table {table}, but it is a generated column, which logical replication does not send: stream events could not carry it"
    )]
    UnsentGeneratedColumn {
        /// The column.
        column: String,
        /// schema.table.
        table: String,
        /// What needs it: `[mapping] columns`, `mapping.identifiers.user_id`, …
        needed_as: String,
    },
    /// A constant and a column map to the same trait key.
    #[error("trait key {key:?} is both a constant and the key of column {column:?}")]
    TraitKeyClash {
        /// The key.
        key: String,
        /// The column.
        column: String,
    },
}

impl MappingError {
    /// What to do.
    pub fn hint(&self) -> String {
        match self {
            MappingError::NoIdentifierColumn { .. } => "add a user_id, anonymous_id or email column to the table, or name the column that identifies the user under [mapping.identifiers]".into(),
            MappingError::MissingIdentifier { .. } => "fix the column name under [mapping.identifiers]".into(),
            MappingError::TraitKeyClash { .. } => "rename the constant or change [mapping.trait_keys]".into(),
            MappingError::UnsentGeneratedColumn { needed_as, .. } => format!(
                "{} (compute the value downstream instead); on PostgreSQL 18 a publication can send stored generated columns: ALTER PUBLICATION <publication> SET (publish_generated_columns = stored)",
                if needed_as.starts_with("[mapping] columns") {
                    "remove the column from [mapping] columns"
                } else {
                    "name an identifier column under [mapping.identifiers] that is not generated"
                }
            ),
        }
    }
}

/// One trait: which column, under which key.
#[derive(Debug, Clone)]
pub struct TraitColumn {
    /// Position of the column in the relation.
    pub index: usize,
    /// Column name.
    pub column: Arc<str>,
    /// Trait key.
    pub key: Arc<str>,
    /// Type OID, for decoding the cell.
    pub type_oid: u32,
}

/// The mapping resolved against one shape of the table.
#[derive(Debug, Clone)]
pub struct Projection {
    /// Traits, in column order.
    pub traits: Vec<TraitColumn>,
    /// Position of the user_id column.
    pub user_id: Option<usize>,
    /// Position of the anonymous_id column.
    pub anonymous_id: Option<usize>,
    /// Position of the email column.
    pub email: Option<usize>,
    /// Selected columns the table does not have (dropped or renamed): reported, not fatal.
    pub missing_columns: Vec<String>,
    /// The keys every projected row shares.
    trait_keys: Arc<TraitKeys>,
    /// For each of `traits`, its key's place in `trait_keys.columns`.
    trait_slots: Vec<usize>,
    /// Type OIDs by position, for the identifier cells.
    type_oids: Vec<u32>,
}

/// The trait keys of one [`Projection`], shared by every row it projects: each column trait's
/// key once, in column order (two columns mapped to one key share the first one's place; the
/// later column's value wins, as when inserting into a JSON object), then the constants.
#[derive(Debug, Default, PartialEq)]
struct TraitKeys {
    columns: Vec<Arc<str>>,
    constants: Map<String, Value>,
}

/// The traits of one row: selected columns under their trait keys, in column order, then the
/// constants; serializes as that JSON object. The keys are the projection's, shared, so a row
/// allocates only its values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Traits {
    keys: Arc<TraitKeys>,
    /// One per column key; `None`: left out (a cell the server did not send).
    values: Vec<Option<Value>>,
}

impl Traits {
    /// The traits in order, as (key, value).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        let columns = self.keys.columns.iter().zip(&self.values);
        columns
            .filter_map(|(k, v)| Some((&**k, v.as_ref()?)))
            .chain(self.keys.constants.iter().map(|(k, v)| (k.as_str(), v)))
    }

    /// The value of trait `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Whether trait `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Number of traits.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Whether there is no trait.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a column's value was left out (an unchanged TOASTed cell the server did not
    /// send): such traits are a partial update of the row.
    pub fn is_partial(&self) -> bool {
        self.values.iter().any(Option::is_none)
    }

    /// Fills the values left out of these traits from `earlier` traits of the same row (a
    /// partial update merged into the row's earlier state). Keys `earlier` has that these lack
    /// are taken over; keys both have keep this one's value.
    pub fn fill_from(&mut self, earlier: &Traits) {
        if Arc::ptr_eq(&self.keys, &earlier.keys) {
            for (mine, theirs) in self.values.iter_mut().zip(&earlier.values) {
                if mine.is_none() {
                    mine.clone_from(theirs);
                }
            }
            return;
        }
        // Different shapes (a staged row, a schema change): merge by key.
        let mut merged = earlier.clone().into_map();
        for (k, v) in self.iter() {
            merged.insert(k.to_owned(), v.clone());
        }
        *self = Traits::from_map(merged);
    }

    /// Traits holding exactly `map` (read back from the window stage): same serialization.
    pub fn from_map(map: Map<String, Value>) -> Traits {
        Traits::from_entries(map.into_iter().map(|(k, v)| (k, Some(v))))
    }

    /// Traits of these keys in order, `None` for a value left out.
    pub fn from_entries(entries: impl IntoIterator<Item = (String, Option<Value>)>) -> Traits {
        let (columns, values) = entries
            .into_iter()
            .map(|(k, v)| (Arc::<str>::from(k), v))
            .unzip();
        Traits {
            keys: Arc::new(TraitKeys {
                columns,
                constants: Map::new(),
            }),
            values,
        }
    }

    /// The traits as a JSON object (for a dead letter's payload).
    pub fn into_map(self) -> Map<String, Value> {
        let mut map = Map::with_capacity(self.values.len() + self.keys.constants.len());
        for (k, v) in self.keys.columns.iter().zip(self.values) {
            if let Some(v) = v {
                map.insert(k.to_string(), v);
            }
        }
        for (k, v) in &self.keys.constants {
            map.insert(k.clone(), v.clone());
        }
        map
    }
}

/// Like a JSON object's: the value of `key`; panics when there is none.
impl std::ops::Index<&str> for Traits {
    type Output = Value;

    fn index(&self, key: &str) -> &Value {
        self.get(key)
            .unwrap_or_else(|| panic!("no trait {key:?} in {self:?}"))
    }
}

impl Serialize for Traits {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        for (k, v) in self.iter() {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// The identifiers and traits of one row.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectedRow {
    /// `userId`.
    pub user_id: Option<String>,
    /// `anonymousId`.
    pub anonymous_id: Option<String>,
    /// Traits (selected columns under their keys, constants).
    pub traits: Traits,
}

impl ProjectedRow {
    /// Whether the row can be sent: it has a userId or an anonymousId.
    pub fn is_identified(&self) -> bool {
        self.user_id.is_some() || self.anonymous_id.is_some()
    }

    /// The identifiers as a JSON object (the properties of a `Record Deleted` event).
    pub fn identifiers(&self) -> Map<String, Value> {
        let mut m = Map::new();
        if let Some(u) = &self.user_id {
            m.insert("userId".into(), Value::String(u.clone()));
        }
        if let Some(a) = &self.anonymous_id {
            m.insert("anonymousId".into(), Value::String(a.clone()));
        }
        m
    }
}

/// A cell as the projection sees it.
pub enum CellRef {
    /// SQL NULL.
    Null,
    /// Not sent by the server (an unchanged TOASTed value, or a column absent from a key-only
    /// old tuple): left out.
    Absent,
    /// The value.
    Value(Value),
}

/// An identifier value as a string: strings as they are, numbers and others by their JSON text.
fn identifier_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// The deterministic `anonymousId` of a row that only has an email: UUID v5 of the trimmed,
/// lower-cased address.
pub fn anonymous_id_from_email(email: &str) -> String {
    let normalised = email.trim().to_lowercase();
    Uuid::new_v5(&EMAIL_NAMESPACE, normalised.as_bytes()).to_string()
}

impl Projection {
    /// Resolves `config` against the columns `(name, type_oid)` of one shape of `table`, as a
    /// pgoutput Relation message lists them.
    pub fn resolve<'a>(
        config: &MappingConfig,
        table: &str,
        columns: impl IntoIterator<Item = (&'a str, u32)>,
    ) -> Result<Projection, MappingError> {
        Self::resolve_without(config, table, columns, &[])
    }

    /// Resolves `config` against the catalog's columns of `table`, of which pgoutput does not
    /// send those named in `unsent` (generated columns): they get no place in the projection,
    /// so the full sync's traits are the stream's. With every column selected (the default)
    /// they are left out, and a default-named identifier column among them does not count; a
    /// mapping that names one (`[mapping] columns`, `[mapping.identifiers]`) is refused, as is
    /// a table whose only identifier column is one. Positions stay those of `columns`.
    pub fn resolve_without<'a>(
        config: &MappingConfig,
        table: &str,
        columns: impl IntoIterator<Item = (&'a str, u32)>,
        unsent: &[&str],
    ) -> Result<Projection, MappingError> {
        let columns: Vec<(&str, u32)> = columns.into_iter().collect();
        let sent = |name: &str| !unsent.contains(&name);
        let position = |name: &str| columns.iter().position(|(n, _)| *n == name && sent(n));
        let unsent_error = |column: &str, needed_as: String| MappingError::UnsentGeneratedColumn {
            column: column.to_owned(),
            table: table.to_owned(),
            needed_as,
        };
        let column_list = || {
            columns
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let ident = |role: &'static str, col: &IdentifierColumn| match col {
            IdentifierColumn::Configured(name) if !sent(name) => {
                Err(unsent_error(name, format!("mapping.identifiers.{role}")))
            }
            IdentifierColumn::Configured(name) => match position(name) {
                Some(i) => Ok(Some(i)),
                None => Err(MappingError::MissingIdentifier {
                    role,
                    column: name.clone(),
                    table: table.to_owned(),
                    columns: column_list(),
                }),
            },
            IdentifierColumn::Default(name) => Ok(position(name)),
        };
        let ids = &config.identifiers;
        let user_id = ident("user_id", &ids.user_id)?;
        let anonymous_id = ident("anonymous_id", &ids.anonymous_id)?;
        let email = ident("email", &ids.email)?;
        if user_id.is_none() && anonymous_id.is_none() && email.is_none() {
            if let Some(generated) = ids.all().iter().find(|c| !sent(c.name())) {
                return Err(unsent_error(
                    generated.name(),
                    format!(
                        "the mapping's only identifier (a column named {:?})",
                        generated.name()
                    ),
                ));
            }
            return Err(MappingError::NoIdentifierColumn {
                table: table.to_owned(),
                wanted: ids
                    .all()
                    .iter()
                    .map(|c| format!("`{}`", c.name()))
                    .collect::<Vec<_>>()
                    .join(", "),
                columns: column_list(),
            });
        }
        let mut traits = Vec::new();
        let mut missing_columns = Vec::new();
        let mut push = |index: usize, name: &str, type_oid: u32| -> Result<(), MappingError> {
            let key = config
                .trait_keys
                .get(name)
                .map(String::as_str)
                .unwrap_or(name);
            if config.constants.contains_key(key) {
                return Err(MappingError::TraitKeyClash {
                    key: key.to_owned(),
                    column: name.to_owned(),
                });
            }
            traits.push(TraitColumn {
                index,
                column: Arc::from(name),
                key: Arc::from(key),
                type_oid,
            });
            Ok(())
        };
        match &config.columns {
            None => {
                for (i, (name, oid)) in columns.iter().enumerate() {
                    if sent(name) {
                        push(i, name, *oid)?;
                    }
                }
            }
            Some(selected) => {
                if let Some(name) = selected.iter().find(|n| !sent(n)) {
                    return Err(unsent_error(name, "[mapping] columns".into()));
                }
                for name in selected {
                    match position(name) {
                        Some(i) => push(i, name, columns[i].1)?,
                        None => missing_columns.push(name.clone()),
                    }
                }
                traits.sort_by_key(|t| t.index);
            }
        }
        let mut keys: Vec<Arc<str>> = Vec::with_capacity(traits.len());
        let trait_slots = traits
            .iter()
            .map(|t| match keys.iter().position(|k| *k == t.key) {
                Some(slot) => slot,
                None => {
                    keys.push(t.key.clone());
                    keys.len() - 1
                }
            })
            .collect();
        Ok(Projection {
            traits,
            user_id,
            anonymous_id,
            email,
            missing_columns,
            trait_keys: Arc::new(TraitKeys {
                columns: keys,
                constants: config.constants.clone(),
            }),
            trait_slots,
            type_oids: columns.iter().map(|(_, oid)| *oid).collect(),
        })
    }

    /// The type OID of the column at `index`.
    pub fn type_oid(&self, index: usize) -> Option<u32> {
        self.type_oids.get(index).copied()
    }

    /// `(role, position)` of each identifier column the projection resolved, roles named as
    /// under `[mapping.identifiers]`: `user_id`, `anonymous_id`, `email`.
    pub fn identifier_positions(&self) -> impl Iterator<Item = (&'static str, usize)> {
        [
            ("user_id", self.user_id),
            ("anonymous_id", self.anonymous_id),
            ("email", self.email),
        ]
        .into_iter()
        .filter_map(|(role, index)| Some((role, index?)))
    }

    /// Positions of every column the projection reads (traits and identifiers), sorted, unique.
    pub fn needed_columns(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.traits.iter().map(|t| t.index).collect();
        v.extend(self.user_id);
        v.extend(self.anonymous_id);
        v.extend(self.email);
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Projects one row. `cell(index)` gives the decoded cell at a column position; it is
    /// called once per needed column.
    pub fn project(&self, mut cell: impl FnMut(usize) -> CellRef) -> ProjectedRow {
        let mut values: Vec<Option<Value>> = Vec::with_capacity(self.trait_keys.columns.len());
        values.resize_with(self.trait_keys.columns.len(), || None);
        let mut id_values: [Option<String>; 3] = [None, None, None];
        let id_positions = [self.user_id, self.anonymous_id, self.email];
        let mut seen_ids = [false; 3];
        for (t, &slot) in self.traits.iter().zip(&self.trait_slots) {
            let value = match cell(t.index) {
                CellRef::Absent => None,
                CellRef::Null => Some(Value::Null),
                CellRef::Value(v) => Some(v),
            };
            for (slot, pos) in id_positions.iter().enumerate() {
                if *pos == Some(t.index) {
                    seen_ids[slot] = true;
                    id_values[slot] = value.as_ref().and_then(identifier_text);
                }
            }
            if let Some(v) = value {
                values[slot] = Some(v);
            }
        }
        for (slot, pos) in id_positions.iter().enumerate() {
            if let (Some(pos), false) = (pos, seen_ids[slot])
                && let CellRef::Value(v) = cell(*pos)
            {
                id_values[slot] = identifier_text(&v);
            }
        }
        let [user_id, anonymous_id, email] = id_values;
        let anonymous_id = match (anonymous_id, &user_id, email) {
            (Some(a), _, _) => Some(a),
            (None, None, Some(e)) => Some(anonymous_id_from_email(&e)),
            _ => None,
        };
        ProjectedRow {
            user_id,
            anonymous_id,
            traits: Traits {
                keys: Arc::clone(&self.trait_keys),
                values,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IdentifierColumns;
    use std::collections::BTreeMap;

    fn config(columns: Option<Vec<&str>>) -> MappingConfig {
        let mut trait_keys = BTreeMap::new();
        trait_keys.insert("name".to_owned(), "fullName".to_owned());
        let mut constants = Map::new();
        constants.insert("source".into(), Value::String("postgres".into()));
        MappingConfig {
            columns: columns.map(|c| c.into_iter().map(String::from).collect()),
            constants,
            filter: None,
            identifiers: IdentifierColumns {
                user_id: IdentifierColumn::Default("user_id"),
                anonymous_id: IdentifierColumn::Default("anonymous_id"),
                email: IdentifierColumn::Default("email"),
            },
            trait_keys,
        }
    }

    const COLS: [(&str, u32); 4] = [("id", 20), ("email", 25), ("name", 25), ("user_id", 25)];

    #[test]
    fn traits_use_trait_keys_and_constants() {
        let p = Projection::resolve(&config(Some(vec!["email", "name"])), "public.users", COLS)
            .expect("resolves");
        let row = p.project(|i| match i {
            1 => CellRef::Value(Value::String("ann@example.com".into())),
            2 => CellRef::Value(Value::String("Ann".into())),
            3 => CellRef::Value(Value::String("u_1".into())),
            _ => CellRef::Null,
        });
        assert_eq!(row.user_id.as_deref(), Some("u_1"));
        assert_eq!(row.anonymous_id, None);
        assert_eq!(row.traits["fullName"], "Ann");
        assert_eq!(row.traits["email"], "ann@example.com");
        assert_eq!(row.traits["source"], "postgres");
        assert!(!row.traits.contains_key("user_id"));
    }

    #[test]
    fn email_only_row_gets_deterministic_anonymous_id() {
        let p = Projection::resolve(&config(None), "t", COLS).expect("resolves");
        let row = |email: &str| {
            let email = email.to_owned();
            p.project(move |i| match i {
                1 => CellRef::Value(Value::String(email.clone())),
                _ => CellRef::Null,
            })
        };
        let a = row("Ann@Example.com ");
        let b = row("ann@example.com");
        assert_eq!(a.user_id, None);
        assert!(a.anonymous_id.is_some());
        assert_eq!(a.anonymous_id, b.anonymous_id);
        assert_ne!(a.anonymous_id, row("bob@example.com").anonymous_id);
    }

    #[test]
    fn absent_cells_are_left_out_of_traits() {
        let p = Projection::resolve(&config(None), "t", COLS).expect("resolves");
        let row = p.project(|i| match i {
            3 => CellRef::Value(Value::String("u".into())),
            2 => CellRef::Absent,
            _ => CellRef::Null,
        });
        assert!(!row.traits.contains_key("fullName"));
        assert_eq!(row.traits["email"], Value::Null);
    }

    #[test]
    fn table_without_identifier_is_refused_with_its_columns() {
        let err = Projection::resolve(&config(None), "public.t", [("a", 23), ("b", 25)])
            .expect_err("no identifier");
        let msg = err.to_string();
        assert!(msg.contains("`user_id`") && msg.contains("a, b"), "{msg}");
    }

    #[test]
    fn missing_selected_column_is_reported_not_fatal() {
        let p =
            Projection::resolve(&config(Some(vec!["email", "plan"])), "t", COLS).expect("resolves");
        assert_eq!(p.missing_columns, vec!["plan".to_owned()]);
    }

    /// `plan` and (by its default name) `email` are generated columns pgoutput does not send.
    const UNSENT: [&str; 2] = ["plan", "email"];
    const GEN_COLS: [(&str, u32); 5] = [
        ("id", 20),
        ("email", 25),
        ("name", 25),
        ("user_id", 25),
        ("plan", 25),
    ];

    #[test]
    fn unsent_generated_columns_are_left_out_of_all_columns() {
        let p =
            Projection::resolve_without(&config(None), "t", GEN_COLS, &UNSENT).expect("resolves");
        let columns: Vec<&str> = p.traits.iter().map(|t| &*t.column).collect();
        assert_eq!(columns, ["id", "name", "user_id"]);
        // Positions stay the catalog's.
        assert_eq!(p.user_id, Some(3));
        // A default-named identifier that is not sent does not count.
        assert_eq!(p.email, None);
        assert_eq!(p.needed_columns(), vec![0, 2, 3]);
    }

    #[test]
    fn a_mapping_that_names_an_unsent_generated_column_is_refused() {
        let err = Projection::resolve_without(
            &config(Some(vec!["name", "plan"])),
            "public.t",
            GEN_COLS,
            &UNSENT,
        )
        .expect_err("plan is generated");
        let msg = err.to_string();
        assert!(
            msg.contains("[mapping] columns")
                && msg.contains("\"plan\"")
                && msg.contains("generated"),
            "{msg}"
        );
        assert!(err.hint().contains("remove the column"), "{}", err.hint());

        let mut cfg = config(None);
        cfg.identifiers.user_id = IdentifierColumn::Configured("plan".into());
        let err = Projection::resolve_without(&cfg, "public.t", GEN_COLS, &UNSENT)
            .expect_err("the identifier is generated");
        assert!(
            err.to_string().contains("mapping.identifiers.user_id"),
            "{err}"
        );
    }

    #[test]
    fn a_table_whose_only_identifier_is_generated_is_refused_naming_it() {
        let cols = [("id", 20), ("email", 25), ("name", 25)];
        let err = Projection::resolve_without(&config(None), "public.t", cols, &["email"])
            .expect_err("no identifier is sent");
        assert!(
            matches!(&err, MappingError::UnsentGeneratedColumn { column, .. } if column == "email"),
            "{err}"
        );
    }

    #[test]
    fn numeric_identifier_becomes_its_text() {
        let p = Projection::resolve(&config(Some(vec!["email"])), "t", COLS).expect("resolves");
        let row = p.project(|i| match i {
            3 => CellRef::Value(serde_json::json!(42)),
            _ => CellRef::Null,
        });
        assert_eq!(row.user_id.as_deref(), Some("42"));
    }
}
