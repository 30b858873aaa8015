//! Resolves column type OIDs that are not builtin (domains, enums, composites, extension types,
//! their arrays) through `pg_type`, into the [`TypeCatalog`] that `decode::value` maps cells
//! with.
//!
//! The rules mirror PostgreSQL's `jsonb_categorize_type`, which decides what `to_jsonb()` does
//! with a type:
//! - a domain (`typtype = 'd'`) is looked through to `typbasetype`;
//! - a true array (`typelem <> 0` with `array_subscript_handler`, or `typlen = -1` before
//!   PostgreSQL 14) is an array of `typelem`, delimited by the element's `typdelim`;
//! - a composite (`typtype = 'c'`) is an object of its live attributes (`pg_attribute`);
//! - a non-builtin type (OID ≥ 16384) with a function cast to `json` is rendered by that cast:
//!   `hstore_to_json` is reproduced ([`TypeShape::Hstore`]), any other is
//!   [`TypeShape::JsonCast`] (text, reported by [`TypeCatalog::is_exact`]);
//! - everything else (enums, ranges, base types) is its text string.
//!
//! Loading is recursive (array of domain over numeric, domain over domain, composite of
//! arrays…) and all-or-nothing: shapes are committed to the catalog only once every type they
//! refer to is resolved, so a failed load leaves the catalog closed and can simply be retried.

use std::collections::{HashMap, HashSet};

use tokio_postgres::{Client, Row};

use crate::decode::value::{CompositeField, CompositeShape, TypeCatalog, TypeShape};

/// OIDs below this are assigned at initdb; above it, user and extension objects.
const FIRST_NORMAL_OBJECT_ID: u32 = 16384;
/// `json`'s OID, the target of the casts `to_jsonb()` looks for.
const JSON_OID: u32 = 114;
/// Rounds of reference chasing before giving up on a (corrupt, cyclic) catalog.
const MAX_ROUNDS: usize = 64;

/// One query for a batch of types: what `jsonb_categorize_type` looks at. `typsubscript` is
/// read through `to_jsonb(t)` so the query also runs before PostgreSQL 14 (where it is NULL).
const TYPE_QUERY: &str = "\
SELECT t.oid, t.typtype::text AS typtype, t.typbasetype, t.typelem, t.typlen, t.typrelid,
       to_jsonb(t) ->> 'typsubscript' AS typsubscript,
       (SELECT e.typdelim::text FROM pg_catalog.pg_type e WHERE e.oid = t.typelem) AS elemdelim,
       (SELECT p.proname::text
          FROM pg_catalog.pg_cast c JOIN pg_catalog.pg_proc p ON p.oid = c.castfunc
         WHERE c.castsource = t.oid AND c.casttarget = $2 AND c.castmethod = 'f'
         LIMIT 1) AS json_cast
  FROM pg_catalog.pg_type t
 WHERE t.oid = ANY($1)";

/// The live attributes of a batch of composite types' relations, in attribute order.
const ATTRIBUTE_QUERY: &str = "\
SELECT a.attrelid, a.attname::text AS attname, a.atttypid
  FROM pg_catalog.pg_attribute a
 WHERE a.attrelid = ANY($1) AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attrelid, a.attnum";

/// What one `pg_type` row says about a type.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TypeRow {
    oid: u32,
    typtype: String,
    typbasetype: u32,
    typelem: u32,
    typlen: i16,
    typrelid: u32,
    typsubscript: Option<String>,
    elemdelim: Option<String>,
    json_cast: Option<String>,
}

impl TypeRow {
    fn from_row(row: &Row) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            oid: row.try_get("oid")?,
            typtype: row.try_get("typtype")?,
            typbasetype: row.try_get("typbasetype")?,
            typelem: row.try_get("typelem")?,
            typlen: row.try_get("typlen")?,
            typrelid: row.try_get("typrelid")?,
            typsubscript: row.try_get("typsubscript")?,
            elemdelim: row.try_get("elemdelim")?,
            json_cast: row.try_get("json_cast")?,
        })
    }
}

/// The shape a `pg_type` row gives, or the relation whose attributes make the composite.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resolved {
    Shape(TypeShape),
    Composite { relid: u32 },
}

/// `jsonb_categorize_type`'s decision for one type.
fn resolve(row: &TypeRow) -> Resolved {
    let shape = match row.typtype.as_str() {
        "d" => TypeShape::Domain {
            base: row.typbasetype,
        },
        "c" => {
            return Resolved::Composite {
                relid: row.typrelid,
            };
        }
        _ if is_true_array(row) => TypeShape::Array {
            element: row.typelem,
            delimiter: row
                .elemdelim
                .as_deref()
                .and_then(|d| d.bytes().next())
                .unwrap_or(b','),
        },
        _ if row.oid >= FIRST_NORMAL_OBJECT_ID => match row.json_cast.as_deref() {
            Some("hstore_to_json") => TypeShape::Hstore,
            Some(_) => TypeShape::JsonCast,
            None => TypeShape::Text,
        },
        _ => TypeShape::Text,
    };
    Resolved::Shape(shape)
}

/// PostgreSQL's `IsTrueArrayType` (14+), or `typlen = -1` with an element before 14.
fn is_true_array(row: &TypeRow) -> bool {
    row.typelem != 0
        && match row.typsubscript.as_deref() {
            Some(handler) => {
                handler == "array_subscript_handler"
                    || handler == "pg_catalog.array_subscript_handler"
            }
            None => row.typlen == -1,
        }
}

/// The OIDs a shape refers to and that must be known too.
fn references(shape: &TypeShape) -> Vec<u32> {
    match shape {
        TypeShape::Domain { base } => vec![*base],
        TypeShape::Array { element, .. } | TypeShape::Vector { element } => vec![*element],
        TypeShape::Composite(c) => c.fields().iter().map(|f| f.type_oid).collect(),
        _ => Vec::new(),
    }
}

/// Resolves every OID of `oids` that `catalog` [needs](TypeCatalog::needs), and every type
/// those refer to, through `pg_type`/`pg_attribute`, and records their shapes. OIDs the server
/// does not know (a type dropped meanwhile) are recorded as text. On error nothing is recorded.
pub async fn load_types(
    client: &Client,
    catalog: &mut TypeCatalog,
    oids: &[u32],
) -> Result<(), tokio_postgres::Error> {
    let mut staged: HashMap<u32, TypeShape> = HashMap::new();
    let mut queued: HashSet<u32> = HashSet::new();
    let mut pending: Vec<u32> = Vec::new();
    for &oid in oids {
        if catalog.needs(oid) && queued.insert(oid) {
            pending.push(oid);
        }
    }
    for _ in 0..MAX_ROUNDS {
        if pending.is_empty() {
            break;
        }
        let rows = client.query(TYPE_QUERY, &[&pending, &JSON_OID]).await?;
        let mut composites: Vec<(u32, u32)> = Vec::new();
        for row in &rows {
            let info = TypeRow::from_row(row)?;
            match resolve(&info) {
                Resolved::Shape(shape) => {
                    staged.insert(info.oid, shape);
                }
                Resolved::Composite { relid } => composites.push((info.oid, relid)),
            }
        }
        if !composites.is_empty() {
            let relids: Vec<u32> = composites.iter().map(|&(_, relid)| relid).collect();
            let mut fields: HashMap<u32, Vec<CompositeField>> = HashMap::new();
            for row in client.query(ATTRIBUTE_QUERY, &[&relids]).await? {
                let relid: u32 = row.try_get("attrelid")?;
                fields.entry(relid).or_default().push(CompositeField {
                    name: row.try_get("attname")?,
                    type_oid: row.try_get("atttypid")?,
                });
            }
            for (oid, relid) in composites {
                let shape = CompositeShape::new(fields.remove(&relid).unwrap_or_default());
                staged.insert(oid, TypeShape::Composite(shape));
            }
        }
        let mut next = Vec::new();
        for oid in pending.drain(..) {
            // Unknown to the server: render as text rather than ask again on every relation.
            let shape = staged.entry(oid).or_insert(TypeShape::Text);
            for referenced in references(shape) {
                let known = staged.contains_key(&referenced) || !catalog.needs(referenced);
                if !known && queued.insert(referenced) {
                    next.push(referenced);
                }
            }
        }
        pending = next;
    }
    for (oid, shape) in staged {
        catalog.insert(oid, shape);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(typtype: &str) -> TypeRow {
        TypeRow {
            oid: 20000,
            typtype: typtype.to_owned(),
            typbasetype: 0,
            typelem: 0,
            typlen: -1,
            typrelid: 0,
            typsubscript: Some("-".to_owned()),
            elemdelim: None,
            json_cast: None,
        }
    }

    #[test]
    fn domains_resolve_to_their_base_type() {
        let info = TypeRow {
            typbasetype: 1700,
            ..row("d")
        };
        assert_eq!(
            resolve(&info),
            Resolved::Shape(TypeShape::Domain { base: 1700 })
        );
    }

    #[test]
    fn true_arrays_use_the_element_delimiter() {
        let info = TypeRow {
            typelem: 20001,
            typsubscript: Some("array_subscript_handler".to_owned()),
            elemdelim: Some(";".to_owned()),
            ..row("b")
        };
        let shape = TypeShape::Array {
            element: 20001,
            delimiter: b';',
        };
        assert_eq!(resolve(&info), Resolved::Shape(shape));
    }

    #[test]
    fn fixed_length_types_with_an_element_are_not_arrays() {
        let info = TypeRow {
            oid: 600,
            typelem: 701,
            typlen: 16,
            typsubscript: Some("raw_array_subscript_handler".to_owned()),
            ..row("b")
        };
        assert_eq!(resolve(&info), Resolved::Shape(TypeShape::Text));
    }

    #[test]
    fn before_postgres_14_arrays_are_varlena_with_an_element() {
        let info = TypeRow {
            typelem: 23,
            typsubscript: None,
            ..row("b")
        };
        let shape = TypeShape::Array {
            element: 23,
            delimiter: b',',
        };
        assert_eq!(resolve(&info), Resolved::Shape(shape));
    }

    #[test]
    fn json_casts_of_extension_types_are_recognized() {
        let hstore = TypeRow {
            json_cast: Some("hstore_to_json".to_owned()),
            ..row("b")
        };
        assert_eq!(resolve(&hstore), Resolved::Shape(TypeShape::Hstore));
        let other = TypeRow {
            json_cast: Some("st_asgeojson".to_owned()),
            ..row("b")
        };
        assert_eq!(resolve(&other), Resolved::Shape(TypeShape::JsonCast));
        let builtin = TypeRow {
            oid: 25,
            json_cast: Some("x".to_owned()),
            ..row("b")
        };
        assert_eq!(resolve(&builtin), Resolved::Shape(TypeShape::Text));
    }

    #[test]
    fn enums_ranges_and_composites() {
        assert_eq!(resolve(&row("e")), Resolved::Shape(TypeShape::Text));
        assert_eq!(resolve(&row("r")), Resolved::Shape(TypeShape::Text));
        let composite = TypeRow {
            typrelid: 777,
            ..row("c")
        };
        assert_eq!(resolve(&composite), Resolved::Composite { relid: 777 });
    }
}
