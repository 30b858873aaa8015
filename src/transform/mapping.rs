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

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::config::{IdentifierColumn, MappingConfig};
use crate::decode::value::TypeCatalog;
use crate::json::{write_str, write_value};

/// `text`: the type of a cell whose column is not in the projection's shape.
const TEXT_OID: u32 = 25;

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
    /// The capacity a row's JSON buffer starts with: about the last row's size.
    json_hint: Arc<AtomicUsize>,
}

/// The trait keys of one [`Projection`], shared by every row it projects: each column trait's
/// key once, in column order (two columns mapped to one key share the first one's place; the
/// later column's value wins, as when inserting into a JSON object), then the constants.
/// Keys and constants are kept as JSON text too, ready to be copied into each row's object.
#[derive(Debug, Default, PartialEq)]
struct TraitKeys {
    columns: Vec<Arc<str>>,
    /// Each column key as a JSON string followed by `:`.
    prefixes: Vec<Box<[u8]>>,
    /// The constants: key and value's JSON text.
    constants: Vec<(Arc<str>, Box<[u8]>)>,
    /// The constants as the members of a JSON object, comma separated (empty if none).
    constants_json: Box<[u8]>,
}

impl TraitKeys {
    fn new(columns: Vec<Arc<str>>, constants: &Map<String, Value>) -> Self {
        let member_prefix = |key: &str| {
            let mut prefix = Vec::with_capacity(key.len() + 3);
            write_str(&mut prefix, key);
            prefix.push(b':');
            prefix
        };
        let prefixes = columns
            .iter()
            .map(|k| member_prefix(k).into_boxed_slice())
            .collect();
        let mut constants_json = Vec::new();
        let constants = constants
            .iter()
            .map(|(k, v)| {
                if !constants_json.is_empty() {
                    constants_json.push(b',');
                }
                constants_json.extend_from_slice(&member_prefix(k));
                let start = constants_json.len();
                write_value(&mut constants_json, v);
                (Arc::from(k.as_str()), constants_json[start..].into())
            })
            .collect();
        TraitKeys {
            columns,
            prefixes,
            constants,
            constants_json: constants_json.into_boxed_slice(),
        }
    }
}

/// Where a left-out value's text is (nowhere).
const ABSENT: (usize, usize) = (usize::MAX, usize::MAX);

/// The traits of one row: selected columns under their trait keys, in column order, then the
/// constants; [`Traits::write_json`] writes that JSON object. Each value is held as its JSON
/// text (written straight from the cell's text, see
/// [`crate::decode::value::TypeCatalog::write_cell_json`]), all of a row's in one buffer; the
/// keys are the projection's, shared. So a row allocates one buffer and one list of places,
/// whatever its number of columns, and writing the traits into an event, a messageId or a
/// ledger hash copies text.
#[derive(Clone, Default)]
pub struct Traits {
    keys: Arc<TraitKeys>,
    /// The values' JSON texts.
    json: Vec<u8>,
    /// For each column key, its value's place in `json`; [`ABSENT`]: left out (a cell the
    /// server did not send).
    spans: Vec<(usize, usize)>,
}

impl Traits {
    /// The traits in order, as (key, value's JSON text).
    pub fn entries(&self) -> impl Iterator<Item = (&str, &[u8])> {
        let columns = self.keys.columns.iter().zip(&self.spans);
        columns
            .filter(|(_, span)| **span != ABSENT)
            .map(|(k, &(start, end))| (&**k, &self.json[start..end]))
            .chain(self.keys.constants.iter().map(|(k, v)| (&**k, &**v)))
    }

    /// Appends the traits as one JSON object: byte for byte what serializing
    /// [`Self::into_map`] with serde_json gives.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.reserve(self.json.len() + self.keys.constants_json.len() + 16 * self.spans.len());
        out.push(b'{');
        let mut first = true;
        for (prefix, &(start, end)) in self.keys.prefixes.iter().zip(&self.spans) {
            if (start, end) == ABSENT {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(prefix);
            out.extend_from_slice(&self.json[start..end]);
        }
        if !self.keys.constants_json.is_empty() {
            if !first {
                out.push(b',');
            }
            out.extend_from_slice(&self.keys.constants_json);
        }
        out.push(b'}');
    }

    /// The traits as one JSON object's text.
    pub fn to_json_string(&self) -> String {
        let mut out = Vec::with_capacity(self.json.len() + 64);
        self.write_json(&mut out);
        // Every piece is JSON text written from `str`s.
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The value of trait `key`, parsed.
    pub fn get(&self, key: &str) -> Option<Value> {
        self.entries()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| serde_json::from_slice(v).ok())
    }

    /// Whether trait `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.entries().any(|(k, _)| k == key)
    }

    /// Number of traits.
    pub fn len(&self) -> usize {
        self.entries().count()
    }

    /// Whether there is no trait.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a column's value was left out (an unchanged TOASTed cell the server did not
    /// send): such traits are a partial update of the row.
    pub fn is_partial(&self) -> bool {
        self.spans.contains(&ABSENT)
    }

    /// Heap bytes the row's traits hold (the values' text and their places; the keys are
    /// shared).
    pub fn allocated_bytes(&self) -> usize {
        self.json.capacity() + self.spans.capacity() * std::mem::size_of::<(usize, usize)>()
    }

    /// Fills the values left out of these traits from `earlier` traits of the same row (a
    /// partial update merged into the row's earlier state). Keys `earlier` has that these lack
    /// are taken over; keys both have keep this one's value.
    pub fn fill_from(&mut self, earlier: &Traits) {
        if Arc::ptr_eq(&self.keys, &earlier.keys) {
            for (mine, &(start, end)) in self.spans.iter_mut().zip(&earlier.spans) {
                if *mine == ABSENT && (start, end) != ABSENT {
                    let at = self.json.len();
                    self.json.extend_from_slice(&earlier.json[start..end]);
                    *mine = (at, self.json.len());
                }
            }
            return;
        }
        // Different shapes (a staged row, a schema change): merge by key, earlier's order
        // first, as inserting into a JSON object does.
        let mut merged: Vec<(&str, &[u8])> = earlier.entries().collect();
        for (k, v) in self.entries() {
            match merged.iter_mut().find(|(key, _)| *key == k) {
                Some(entry) => entry.1 = v,
                None => merged.push((k, v)),
            }
        }
        let merged = Traits::from_json_entries(merged.into_iter().map(|(k, v)| (k, Some(v))));
        *self = merged;
    }

    /// Traits holding exactly `map` (read back from the window stage): same serialization.
    pub fn from_map(map: Map<String, Value>) -> Traits {
        Traits::from_entries(map.into_iter().map(|(k, v)| (k, Some(v))))
    }

    /// Traits of these keys in order, `None` for a value left out.
    pub fn from_entries(entries: impl IntoIterator<Item = (String, Option<Value>)>) -> Traits {
        let mut text = Vec::new();
        let entries: Vec<(String, Option<(usize, usize)>)> = entries
            .into_iter()
            .map(|(k, v)| {
                let span = v.map(|v| {
                    let start = text.len();
                    write_value(&mut text, &v);
                    (start, text.len())
                });
                (k, span)
            })
            .collect();
        Traits::from_json_entries(
            entries
                .iter()
                .map(|(k, span)| (k.as_str(), span.map(|(s, e)| &text[s..e]))),
        )
    }

    /// Traits of these keys in order with their values' JSON text, `None` for one left out.
    fn from_json_entries<'a>(
        entries: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    ) -> Self {
        let mut columns = Vec::new();
        let mut json = Vec::new();
        let mut spans = Vec::new();
        for (k, v) in entries {
            columns.push(Arc::<str>::from(k));
            spans.push(match v {
                Some(v) => {
                    let start = json.len();
                    json.extend_from_slice(v);
                    (start, json.len())
                }
                None => ABSENT,
            });
        }
        Traits {
            keys: Arc::new(TraitKeys::new(columns, &Map::new())),
            json,
            spans,
        }
    }

    /// The traits as a JSON object (for a dead letter's payload, the window stage).
    pub fn into_map(self) -> Map<String, Value> {
        self.entries()
            .filter_map(|(k, v)| Some((k.to_owned(), serde_json::from_slice(v).ok()?)))
            .collect()
    }
}

/// Equal when they hold the same keys and values in the same order (whatever their buffers).
impl PartialEq for Traits {
    fn eq(&self, other: &Self) -> bool {
        self.entries().eq(other.entries()) && self.is_partial() == other.is_partial()
    }
}

impl std::fmt::Debug for Traits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Traits({})", self.to_json_string())?;
        if self.is_partial() {
            f.write_str(" (partial)")?;
        }
        Ok(())
    }
}

impl Serialize for Traits {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        for (k, v) in self.entries() {
            let value: Value = serde_json::from_slice(v).map_err(serde::ser::Error::custom)?;
            map.serialize_entry(k, &value)?;
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
pub enum CellRef<'a> {
    /// SQL NULL.
    Null,
    /// Not sent by the server (an unchanged TOASTed value, or a column absent from a key-only
    /// old tuple): left out.
    Absent,
    /// The cell in its type's text output form (pgoutput's and COPY's), mapped by the column's
    /// type as `to_jsonb()` maps it.
    Text(Cow<'a, str>),
    /// A value already mapped.
    Value(Value),
}

/// An identifier from its value's JSON text: strings as they are, numbers and others by their
/// JSON text; null and the empty string are none.
fn identifier_text(json: &[u8]) -> Option<String> {
    match json {
        b"null" | b"\"\"" => None,
        [b'"', inner @ .., b'"'] if !inner.contains(&b'\\') => {
            std::str::from_utf8(inner).ok().map(str::to_owned)
        }
        [b'"', ..] => serde_json::from_slice::<String>(json)
            .ok()
            .filter(|s| !s.is_empty()),
        other => std::str::from_utf8(other).ok().map(str::to_owned),
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
            trait_keys: Arc::new(TraitKeys::new(keys, &config.constants)),
            trait_slots,
            type_oids: columns.iter().map(|(_, oid)| *oid).collect(),
            json_hint: Arc::new(AtomicUsize::new(64)),
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

    /// Projects one row. `cell(index)` gives the cell at a column position; it is called once
    /// per needed column. Text cells are written as JSON straight into the row's one buffer
    /// (see [`Traits`]).
    pub fn project<'a>(
        &self,
        types: &TypeCatalog,
        mut cell: impl FnMut(usize) -> CellRef<'a>,
    ) -> ProjectedRow {
        let keys = self.trait_keys.columns.len();
        let mut json = Vec::with_capacity(self.json_hint.load(Ordering::Relaxed));
        let mut spans = vec![ABSENT; keys];
        let mut id_values: [Option<String>; 3] = [None, None, None];
        let id_positions = [self.user_id, self.anonymous_id, self.email];
        let mut seen_ids = [false; 3];
        let write = |json: &mut Vec<u8>, type_oid: u32, cell: CellRef<'_>| {
            let start = json.len();
            match cell {
                CellRef::Absent => return None,
                CellRef::Null => json.extend_from_slice(b"null"),
                CellRef::Text(text) => types.write_cell_json(type_oid, &text, json),
                CellRef::Value(v) => write_value(json, &v),
            }
            Some((start, json.len()))
        };
        for (t, &slot) in self.traits.iter().zip(&self.trait_slots) {
            let span = write(&mut json, t.type_oid, cell(t.index));
            for (id, pos) in id_positions.iter().enumerate() {
                if *pos == Some(t.index) {
                    seen_ids[id] = true;
                    id_values[id] = span.and_then(|(s, e)| identifier_text(&json[s..e]));
                }
            }
            if let Some(span) = span {
                spans[slot] = span;
            }
        }
        let mut scratch = Vec::new();
        for (id, pos) in id_positions.iter().enumerate() {
            if let (Some(pos), false) = (pos, seen_ids[id]) {
                scratch.clear();
                let type_oid = self.type_oid(*pos).unwrap_or(TEXT_OID);
                id_values[id] = match write(&mut scratch, type_oid, cell(*pos)) {
                    Some((s, e)) => identifier_text(&scratch[s..e]),
                    None => None,
                };
            }
        }
        // The next row's buffer starts at about this one's size.
        self.json_hint
            .store(json.len() + json.len() / 4 + 16, Ordering::Relaxed);
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
                json,
                spans,
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
        let row = p.project(&TypeCatalog::builtin(), |i| match i {
            1 => CellRef::Value(Value::String("ann@example.com".into())),
            2 => CellRef::Value(Value::String("Ann".into())),
            3 => CellRef::Value(Value::String("u_1".into())),
            _ => CellRef::Null,
        });
        assert_eq!(row.user_id.as_deref(), Some("u_1"));
        assert_eq!(row.anonymous_id, None);
        assert_eq!(row.traits.get("fullName").expect("trait"), "Ann");
        assert_eq!(row.traits.get("email").expect("trait"), "ann@example.com");
        assert_eq!(row.traits.get("source").expect("trait"), "postgres");
        assert!(!row.traits.contains_key("user_id"));
    }

    #[test]
    fn email_only_row_gets_deterministic_anonymous_id() {
        let p = Projection::resolve(&config(None), "t", COLS).expect("resolves");
        let row = |email: &str| {
            let email = email.to_owned();
            p.project(&TypeCatalog::builtin(), move |i| match i {
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
        let row = p.project(&TypeCatalog::builtin(), |i| match i {
            3 => CellRef::Value(Value::String("u".into())),
            2 => CellRef::Absent,
            _ => CellRef::Null,
        });
        assert!(!row.traits.contains_key("fullName"));
        assert_eq!(row.traits.get("email").expect("trait"), Value::Null);
    }

    /// Text cells are written as the JSON their types map to, straight into the row's buffer;
    /// the object is what serde_json writes for the same map, and a partial row is filled
    /// from an earlier one by copying text.
    #[test]
    fn traits_hold_json_text_and_merge_partial_rows() {
        let p = Projection::resolve(&config(None), "t", COLS).expect("resolves");
        let types = TypeCatalog::builtin();
        let partial = p.project(&types, |i| match i {
            0 => CellRef::Text(Cow::Borrowed("7")),
            1 => CellRef::Text(Cow::Borrowed("a\"b@example.com")),
            2 => CellRef::Absent,
            _ => CellRef::Text(Cow::Borrowed("u\t1")),
        });
        assert_eq!(partial.user_id.as_deref(), Some("u\t1"));
        assert!(partial.traits.is_partial());
        let written = partial.traits.to_json_string();
        assert_eq!(
            written,
            serde_json::to_string(&partial.traits.clone().into_map()).expect("json")
        );
        assert_eq!(
            written,
            r#"{"id":7,"email":"a\"b@example.com","user_id":"u\t1","source":"postgres"}"#
        );
        let earlier = p.project(&types, |i| match i {
            2 => CellRef::Text(Cow::Borrowed("Ann")),
            _ => CellRef::Null,
        });
        let mut filled = partial.traits.clone();
        filled.fill_from(&earlier.traits);
        assert!(!filled.is_partial());
        assert_eq!(filled.get("fullName"), Some(Value::String("Ann".into())));
        assert_eq!(filled.get("id"), Some(serde_json::json!(7)));
        // Another shape (a staged row read back): merged by key, earlier's order first.
        let staged =
            Traits::from_map(serde_json::from_str(r#"{"fullName":"Bo","x":1}"#).expect("map"));
        let mut merged = partial.traits.clone();
        merged.fill_from(&staged);
        assert_eq!(
            merged.to_json_string(),
            r#"{"fullName":"Bo","x":1,"id":7,"email":"a\"b@example.com","user_id":"u\t1","source":"postgres"}"#
        );
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
        let row = p.project(&TypeCatalog::builtin(), |i| match i {
            3 => CellRef::Value(serde_json::json!(42)),
            _ => CellRef::Null,
        });
        assert_eq!(row.user_id.as_deref(), Some("42"));
    }
}
