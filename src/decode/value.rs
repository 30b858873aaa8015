//! Text cells to JSON: exactly the value PostgreSQL's `to_jsonb(column)` gives.
//!
//! pgoutput (and the COPY snapshot) deliver every cell in its text output form. The session pins
//! `DateStyle=ISO`, `TimeZone=UTC`, `IntervalStyle=postgres` and `extra_float_digits=3`, so that
//! text is deterministic, and [`TypeCatalog::cell_to_json`] turns it into the JSON that
//! `to_jsonb()` computes on the server for the same value under the same settings.
//!
//! **Invariant:** for every type, `cell_to_json(atttypid, col::text) == to_jsonb(col)`; the
//! differential test `tests/value_matches_to_jsonb.rs` checks it against a running server over
//! a wide type matrix, and is the definition of correct. What `to_jsonb()` does (PostgreSQL 15,
//! `jsonb_categorize_type` / `datum_to_jsonb`), and so what this module does:
//!
//! - domains are looked through: a domain maps as its base type;
//! - `bool` → `true`/`false`;
//! - `int2`/`int4`/`int8`/`numeric` → JSON numbers, digit for digit (`1.50` stays `1.50`);
//!   numeric `NaN`/`Infinity`/`-Infinity` → those strings. `oid` is *not* a number: a string;
//! - `float4`/`float8` → the float's text is read by `numeric_in` and printed by
//!   `numeric_out`: no exponent (`1e+300` → `1` and 300 zeros, `1.5e-05` → `0.000015`), no
//!   negative zero (`-0` → `0`); `NaN`/`Infinity`/`-Infinity` → strings;
//! - `json` → converted to jsonb: duplicate keys keep the last value, keys ordered as jsonb
//!   orders them (shorter first, then bytewise), numbers normalized like floats (`1E2` → `100`);
//! - `jsonb` → embedded as is (its text is already canonical);
//! - `timestamp` → `2024-01-02T03:04:05.123456` (a `T` instead of the space; ` BC` kept);
//!   `timestamptz` → the same with a `+HH:MM` offset (`+00` → `+00:00`); `date` and the
//!   infinities are their text;
//! - arrays (`{…}`, any dimensions, `[0:1]=` bounds dropped) → nested JSON arrays, each
//!   element mapped by its type's rule; `int2vector`/`oidvector` likewise from `1 2`;
//! - composite types → objects keyed by attribute name, in jsonb key order;
//! - `hstore` (an extension type whose cast to `json` `to_jsonb` calls) → an object of strings;
//! - every other type (text, time, timetz, interval, bytea, uuid, inet, money, enums, ranges,
//!   …) → the string of its text output.
//!
//! Non-builtin types other than hstore that have a cast to `json` are rendered by that cast
//! function on the server, which cannot be reproduced here: they fall back to their text string
//! and [`TypeCatalog::is_exact`] reports them. Nothing here panics on malformed text: a cell
//! that does not parse as its type's text form falls back to its text string. One known limit:
//! `json`/`jsonb` nested deeper than 128 levels (serde_json's recursion limit) also falls back
//! to its text string, where `to_jsonb()` would give the document.
//!
//! Note that `col::text` is *not* the text form pgoutput sends: casts to text differ from the
//! output functions for `bool` (`true`), `char(n)` (padding dropped) and `inet` (`/32` kept).
//! The text here is always the type's output function's, as pgoutput and COPY send it.
//!
//! Builtin types are known without a query ([`TypeCatalog::builtin`]); other type OIDs are
//! resolved through `pg_type` by `crate::postgres::types::load_types`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::str::FromStr;

use serde_json::{Map, Number, Value};

use text::{ArrayParser, hstore, record_field};

use crate::json::{write_str, write_str_content, write_value};

mod text;

/// How `to_jsonb()` renders values of one type; one entry of the [`TypeCatalog`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeShape {
    /// `bool`: `t`/`f` → `true`/`false`.
    Bool,
    /// `int2`, `int4`, `int8`: a JSON number with the text's digits.
    Integer,
    /// `float4`, `float8`: a JSON number as `numeric_out(numeric_in(text))` prints it;
    /// `NaN`/`Infinity`/`-Infinity` stay strings.
    Float,
    /// `numeric`: a JSON number with the text's digits (scale kept); `NaN`/`±Infinity` strings.
    Numeric,
    /// `json`: parsed and normalized the way the cast to `jsonb` does.
    Json,
    /// `jsonb`: parsed, kept as is.
    Jsonb,
    /// `timestamp`: ISO text with a `T` between date and time.
    Timestamp,
    /// `timestamptz`: ISO text with a `T` and a `+HH:MM` offset.
    TimestampTz,
    /// Rendered as the string of its text output (text, date, time, interval, enums, …).
    Text,
    /// A true array type (`{…}` text) of `element`, whose elements are separated by `delimiter`
    /// (`,` for all builtins but `box`, which uses `;`).
    Array {
        /// Element type OID.
        element: u32,
        /// The element type's `typdelim`.
        delimiter: u8,
    },
    /// `int2vector`/`oidvector`: an array of `element` whose text is space separated (`1 2`).
    Vector {
        /// Element type OID.
        element: u32,
    },
    /// A domain: mapped as its base type.
    Domain {
        /// Base type OID (`typbasetype`).
        base: u32,
    },
    /// A composite (row) type: an object keyed by attribute name.
    Composite(CompositeShape),
    /// The `hstore` extension type: an object of string (or null) values.
    Hstore,
    /// A non-builtin type with a cast to `json` that `to_jsonb()` calls: not reproducible
    /// here, rendered as its text string (see [`TypeCatalog::is_exact`]).
    JsonCast,
}

/// One attribute of a composite type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompositeField {
    /// Attribute name (the JSON key).
    pub name: String,
    /// Attribute type OID.
    pub type_oid: u32,
}

/// The attributes of a composite type, in attribute order, with the jsonb key order precomputed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompositeShape {
    fields: Box<[CompositeField]>,
    key_order: Box<[usize]>,
}

impl CompositeShape {
    /// A composite of these attributes (in `attnum` order, dropped attributes left out).
    pub fn new(fields: Vec<CompositeField>) -> Self {
        let mut key_order: Vec<usize> = (0..fields.len()).collect();
        key_order.sort_by(|&a, &b| jsonb_key_cmp(&fields[a].name, &fields[b].name));
        Self {
            fields: fields.into_boxed_slice(),
            key_order: key_order.into_boxed_slice(),
        }
    }

    /// The attributes in `attnum` order.
    pub fn fields(&self) -> &[CompositeField] {
        &self.fields
    }
}

/// Type OID → [`TypeShape`], with every builtin type known up front.
#[derive(Debug, Clone)]
pub struct TypeCatalog {
    shapes: HashMap<u32, TypeShape, BuildHasherDefault<OidHasher>>,
}

impl Default for TypeCatalog {
    fn default() -> Self {
        Self::builtin()
    }
}

// Bootstrap OIDs of the builtins with a rule of their own; fixed across PostgreSQL versions.
const BOOL: u32 = 16;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT2VECTOR: u32 = 22;
const INT4: u32 = 23;
const TEXT: u32 = 25;
const OID: u32 = 26;
const OIDVECTOR: u32 = 30;
const JSON: u32 = 114;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const BPCHAR: u32 = 1042;
const VARCHAR: u32 = 1043;
const DATE: u32 = 1082;
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;
const NUMERIC: u32 = 1700;
const UUID: u32 = 2950;
const JSONB: u32 = 3802;

/// Builtin scalar (base, range, multirange) types of PostgreSQL 15 with bootstrap OIDs, and
/// `cstring` (2275), the element of the builtin `cstring[]`.
#[rustfmt::skip]
const BUILTIN_SCALARS: [u32; 81] = [
    16, 17, 18, 19, 20, 21, 23, 24, 25, 26, 27, 28, 29, 114, 142, 194, 600, 601, 602, 603, 604, 628,
    650, 700, 701, 718, 774, 790, 829, 869, 1033, 1042, 1043, 1082, 1083, 1114, 1184, 1186, 1266,
    1560, 1562, 1700, 1790, 2202, 2203, 2204, 2205, 2206, 2950, 2970, 3220, 3361, 3402, 3614, 3615,
    3642, 3734, 3769, 3802, 3904, 3906, 3908, 3910, 3912, 3926, 4072, 4089, 4096, 4191, 4451, 4532,
    4533, 4534, 4535, 4536, 4600, 4601, 5017, 5038, 5069, 2275,
];

/// Builtin array types of PostgreSQL 15 (array OID, element OID); all use `,` but `box[]`.
#[rustfmt::skip]
const BUILTIN_ARRAYS: [(u32, u32); 77] = [
    (143, 142), (199, 114), (271, 5069), (629, 628), (651, 650), (719, 718), (775, 774), (791, 790),
    (1000, 16), (1001, 17), (1002, 18), (1003, 19), (1005, 21), (1006, 22), (1007, 23), (1008, 24),
    (1009, 25), (1010, 27), (1011, 28), (1012, 29), (1013, 30), (1014, 1042), (1015, 1043),
    (1016, 20), (1017, 600), (1018, 601), (1019, 602), (1020, 603), (1021, 700), (1022, 701),
    (1027, 604), (1028, 26), (1034, 1033), (1040, 829), (1041, 869), (1115, 1114), (1182, 1082),
    (1183, 1083), (1185, 1184), (1187, 1186), (1231, 1700), (1263, 2275), (1270, 1266),
    (1561, 1560), (1563, 1562), (2201, 1790), (2207, 2202), (2208, 2203), (2209, 2204),
    (2210, 2205), (2211, 2206), (2949, 2970), (2951, 2950), (3221, 3220), (3643, 3614),
    (3644, 3642), (3645, 3615), (3735, 3734), (3770, 3769), (3807, 3802), (3905, 3904),
    (3907, 3906), (3909, 3908), (3911, 3910), (3913, 3912), (3927, 3926), (4073, 4072),
    (4090, 4089), (4097, 4096), (4192, 4191), (5039, 5038), (6150, 4451), (6151, 4532),
    (6152, 4533), (6153, 4534), (6155, 4535), (6157, 4536),
];
const BOX_ARRAY: u32 = 1020;

/// Deepest nesting of arrays/composites/domains followed before falling back to text.
const MAX_DEPTH: usize = 32;
/// numeric_in rejects exponents beyond ±1000 (`NUMERIC_MAX_PRECISION`); beyond it a number is
/// left as it is rather than expanded.
const MAX_EXPONENT: i64 = 1000;

impl TypeCatalog {
    /// A catalog that knows every builtin type of PostgreSQL 15 (and earlier): no query needed
    /// for tables made of builtin types.
    pub fn builtin() -> Self {
        let mut shapes = HashMap::with_capacity_and_hasher(256, Default::default());
        for oid in BUILTIN_SCALARS {
            shapes.insert(oid, builtin_scalar(oid));
        }
        for (oid, element) in BUILTIN_ARRAYS {
            let delimiter = if oid == BOX_ARRAY { b';' } else { b',' };
            shapes.insert(oid, TypeShape::Array { element, delimiter });
        }
        shapes.insert(INT2VECTOR, TypeShape::Vector { element: INT2 });
        shapes.insert(OIDVECTOR, TypeShape::Vector { element: OID });
        Self { shapes }
    }

    /// Records the shape of `oid` (a later insert replaces an earlier one).
    pub fn insert(&mut self, oid: u32, shape: TypeShape) {
        self.shapes.insert(oid, shape);
    }

    /// Forgets `oid`, e.g. after pgoutput announced a changed type; the next [`Self::needs`]
    /// on it says it must be loaded again.
    pub fn invalidate(&mut self, oid: u32) {
        self.shapes.remove(&oid);
    }

    /// The shape recorded for `oid`, if any (domains not resolved).
    pub fn get(&self, oid: u32) -> Option<&TypeShape> {
        match oid {
            BOOL => Some(&TypeShape::Bool),
            INT2 | INT4 | INT8 => Some(&TypeShape::Integer),
            TEXT | VARCHAR | BPCHAR | UUID | DATE | OID => Some(&TypeShape::Text),
            NUMERIC => Some(&TypeShape::Numeric),
            FLOAT4 | FLOAT8 => Some(&TypeShape::Float),
            TIMESTAMPTZ => Some(&TypeShape::TimestampTz),
            TIMESTAMP => Some(&TypeShape::Timestamp),
            JSONB => Some(&TypeShape::Jsonb),
            JSON => Some(&TypeShape::Json),
            _ => self.shapes.get(&oid),
        }
    }

    /// True if `oid`, or a type it refers to (domain base, array element, composite attribute),
    /// is unknown: `load_types` should resolve it before cells of that type are mapped.
    pub fn needs(&self, oid: u32) -> bool {
        !self.closed(oid, 0)
    }

    fn closed(&self, oid: u32, depth: usize) -> bool {
        if depth > MAX_DEPTH {
            return true; // a cycle cannot be fixed by loading more
        }
        match self.get(oid) {
            None => false,
            Some(TypeShape::Domain { base }) => self.closed(*base, depth + 1),
            Some(TypeShape::Array { element, .. } | TypeShape::Vector { element }) => {
                self.closed(*element, depth + 1)
            }
            Some(TypeShape::Composite(c)) => {
                c.fields.iter().all(|f| self.closed(f.type_oid, depth + 1))
            }
            Some(_) => true,
        }
    }

    /// True if cells of `oid` map exactly to `to_jsonb()`: the type and everything it contains
    /// is known and none of it is a [`TypeShape::JsonCast`] rendered as text instead.
    pub fn is_exact(&self, oid: u32) -> bool {
        self.exact(oid, 0)
    }

    fn exact(&self, oid: u32, depth: usize) -> bool {
        if depth > MAX_DEPTH {
            return false;
        }
        match self.resolve(oid) {
            None | Some(TypeShape::JsonCast) => false,
            Some(TypeShape::Array { element, .. } | TypeShape::Vector { element }) => {
                self.exact(*element, depth + 1)
            }
            Some(TypeShape::Composite(c)) => {
                c.fields.iter().all(|f| self.exact(f.type_oid, depth + 1))
            }
            Some(_) => true,
        }
    }

    /// The shape of `oid` with domains followed to their base type.
    fn resolve(&self, mut oid: u32) -> Option<&TypeShape> {
        for _ in 0..MAX_DEPTH {
            match self.get(oid)? {
                TypeShape::Domain { base } => oid = *base,
                shape => return Some(shape),
            }
        }
        None
    }

    /// Maps one non-NULL cell, in its text output form, of type `type_oid` to the JSON value
    /// `to_jsonb()` gives for it. Unknown types, and text that does not parse as its type's
    /// output form, become the text string.
    pub fn cell_to_json(&self, type_oid: u32, text: &str) -> Value {
        self.render(type_oid, text, 0)
    }

    /// Appends the JSON text of [`Self::cell_to_json`]`(type_oid, text)` to `out`, byte for
    /// byte what serializing that value gives, written straight from the cell's text for the
    /// common types (booleans, integers, numerics, floats, timestamps and every type rendered
    /// as a string): no `Value`, no allocation. Arrays, composites, json, jsonb and hstore go
    /// through the value.
    pub fn write_cell_json(&self, type_oid: u32, text: &str, out: &mut Vec<u8>) {
        match self.resolve(type_oid) {
            None | Some(TypeShape::Text | TypeShape::JsonCast | TypeShape::Domain { .. }) => {
                write_str(out, text)
            }
            Some(TypeShape::Bool) => match text {
                "t" => out.extend_from_slice(b"true"),
                "f" => out.extend_from_slice(b"false"),
                _ => write_str(out, text),
            },
            // `i64` parsing prints the same digits back for a plain integer (not `-0`, no
            // leading zeros); the number rule keeps a plain decimal's text.
            Some(TypeShape::Integer) if is_plain_decimal(text, false) && text != "-0" => {
                out.extend_from_slice(text.as_bytes())
            }
            Some(TypeShape::Numeric | TypeShape::Float) if has_n(text) => write_str(out, text),
            Some(TypeShape::Numeric) if is_plain_decimal(text, true) => {
                out.extend_from_slice(text.as_bytes())
            }
            Some(TypeShape::Float) => match canonical_decimal(text) {
                Some(d) if is_plain_decimal(&d, true) => out.extend_from_slice(d.as_bytes()),
                _ => write_value(out, &self.render(type_oid, text, 0)),
            },
            Some(TypeShape::Jsonb) if write_compact_jsonb(text, out) => {}
            Some(TypeShape::Timestamp) => write_iso_timestamp(text, false, out),
            Some(TypeShape::TimestampTz) => write_iso_timestamp(text, true, out),
            Some(_) => write_value(out, &self.render(type_oid, text, 0)),
        }
    }

    fn render(&self, oid: u32, text: &str, depth: usize) -> Value {
        let Some(shape) = self.resolve(oid) else {
            return string(text);
        };
        let mapped = match shape {
            TypeShape::Bool => match text {
                "t" => Some(Value::Bool(true)),
                "f" => Some(Value::Bool(false)),
                _ => None,
            },
            TypeShape::Integer => match text.parse::<i64>() {
                Ok(n) => Some(Value::Number(n.into())),
                Err(_) => number(text),
            },
            TypeShape::Numeric if has_n(text) => None,
            TypeShape::Numeric => number(text),
            TypeShape::Float if has_n(text) => None,
            TypeShape::Float => canonical_decimal(text).and_then(|d| number(&d)),
            TypeShape::Json => serde_json::from_str(text).ok().map(json_to_jsonb),
            TypeShape::Jsonb => serde_json::from_str(text).ok(),
            TypeShape::Timestamp => Some(Value::String(iso_timestamp(text, false))),
            TypeShape::TimestampTz => Some(Value::String(iso_timestamp(text, true))),
            TypeShape::Text | TypeShape::JsonCast | TypeShape::Domain { .. } => None,
            _ if depth >= MAX_DEPTH => None,
            TypeShape::Array { element, delimiter } => {
                ArrayParser::new(self, text, *element, *delimiter, depth + 1).parse()
            }
            TypeShape::Vector { element } => Some(Value::Array(
                text.split(' ')
                    .filter(|s| !s.is_empty())
                    .map(|s| self.render(*element, s, depth + 1))
                    .collect(),
            )),
            TypeShape::Composite(c) => self.composite(c, text, depth + 1),
            TypeShape::Hstore => hstore(text),
        };
        mapped.unwrap_or_else(|| string(text))
    }

    /// A composite's `record_out` text `(a,"b c",)` → object in jsonb key order.
    fn composite(&self, shape: &CompositeShape, text: &str, depth: usize) -> Option<Value> {
        let inner = text.strip_prefix('(')?.strip_suffix(')')?;
        let mut values: Vec<Value> = Vec::with_capacity(shape.fields.len());
        if !shape.fields.is_empty() {
            let mut rest = inner;
            loop {
                let (field, next) = record_field(rest)?;
                let field_oid = shape.fields.get(values.len())?.type_oid;
                values.push(match field {
                    None => Value::Null,
                    Some(f) => self.render(field_oid, &f, depth),
                });
                match next {
                    Some(n) => rest = n,
                    None => break,
                }
            }
        } else if !inner.is_empty() {
            return None;
        }
        if values.len() != shape.fields.len() {
            return None;
        }
        let mut object = Map::with_capacity(values.len());
        for &i in shape.key_order.iter() {
            object.insert(shape.fields[i].name.clone(), std::mem::take(&mut values[i]));
        }
        Some(Value::Object(object))
    }
}

/// The shape of a builtin non-array type by OID.
fn builtin_scalar(oid: u32) -> TypeShape {
    match oid {
        BOOL => TypeShape::Bool,
        INT2 | INT4 | INT8 => TypeShape::Integer,
        FLOAT4 | FLOAT8 => TypeShape::Float,
        NUMERIC => TypeShape::Numeric,
        JSON => TypeShape::Json,
        JSONB => TypeShape::Jsonb,
        TIMESTAMP => TypeShape::Timestamp,
        TIMESTAMPTZ => TypeShape::TimestampTz,
        _ => TypeShape::Text,
    }
}

fn string(text: &str) -> Value {
    Value::String(text.to_owned())
}

/// `to_jsonb` sends number text containing `N`/`n` (NaN, Infinity) to a string.
fn has_n(text: &str) -> bool {
    text.bytes().any(|b| b == b'N' || b == b'n')
}

/// A JSON number with exactly these digits (arbitrary precision keeps the text).
fn number(text: &str) -> Option<Value> {
    Number::from_str(text).ok().map(Value::Number)
}

/// jsonb's object key order: shorter keys first, then bytewise.
fn jsonb_key_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    a.len()
        .cmp(&b.len())
        .then_with(|| a.as_bytes().cmp(b.as_bytes()))
}

/// What `numeric_out(numeric_in(text))` prints for a number in JSON syntax: the exponent
/// expanded (scale = fraction digits − exponent, at least 0), leading zeros dropped, no
/// negative zero. Borrows when the text is already in that form; `None` if it is not a number
/// or its exponent is beyond what numeric accepts.
fn canonical_decimal(text: &str) -> Option<Cow<'_, str>> {
    let bytes = text.as_bytes();
    let negative = bytes.first() == Some(&b'-');
    let body = if negative { &text[1..] } else { text };
    let b = body.as_bytes();
    let int_len = b.iter().take_while(|c| c.is_ascii_digit()).count();
    let mut pos = int_len;
    let mut frac = &body[0..0];
    if b.get(pos) == Some(&b'.') {
        let n = b[pos + 1..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        frac = &body[pos + 1..pos + 1 + n];
        pos += 1 + n;
        if n == 0 {
            return None;
        }
    }
    let int = &body[..int_len];
    if int.is_empty() {
        return None;
    }
    let all_zero = int.bytes().chain(frac.bytes()).all(|c| c == b'0');
    if pos == b.len() {
        let leading = int.len() - int.trim_start_matches('0').len();
        if !(negative && all_zero) && (leading == 0 || int.len() == 1) {
            return Some(Cow::Borrowed(text));
        }
        let int = &int[leading.min(int.len() - 1)..];
        let mut out = String::with_capacity(text.len());
        if negative && !all_zero {
            out.push('-');
        }
        out.push_str(int);
        if !frac.is_empty() {
            out.push('.');
            out.push_str(frac);
        }
        return Some(Cow::Owned(out));
    }
    if !matches!(b[pos], b'e' | b'E') {
        return None;
    }
    let exp_text = &body[pos + 1..];
    let exp_digits = exp_text.strip_prefix(['+', '-']).unwrap_or(exp_text);
    if exp_digits.is_empty()
        || exp_digits.len() > 6
        || !exp_digits.bytes().all(|c| c.is_ascii_digit())
    {
        return None;
    }
    let mut exponent: i64 = exp_digits.parse().ok()?;
    if exp_text.starts_with('-') {
        exponent = -exponent;
    }
    if exponent.abs() > MAX_EXPONENT {
        return None;
    }
    // Digits without the point; the point goes after `point` of them.
    let digits_len = int.len() + frac.len();
    let point = int.len() as i64 + exponent;
    let digit = |i: usize| {
        if i < int.len() {
            int.as_bytes()[i]
        } else {
            frac.as_bytes()[i - int.len()]
        }
    };
    let mut out = String::with_capacity(digits_len + exponent.unsigned_abs() as usize + 3);
    if negative && !all_zero {
        out.push('-');
    }
    if point <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', point.unsigned_abs() as usize));
        out.extend((0..digits_len).map(|i| char::from(digit(i))));
        return Some(Cow::Owned(out));
    }
    let point = point as usize;
    let int_end = point.min(digits_len);
    let first = (0..int_end).find(|&i| digit(i) != b'0');
    match first {
        Some(start) => {
            out.extend((start..int_end).map(|i| char::from(digit(i))));
            out.extend(std::iter::repeat_n('0', point.saturating_sub(digits_len)));
        }
        // Only zeros before the point: the integer part is 0.
        None => out.push('0'),
    }
    if point < digits_len {
        out.push('.');
        out.extend((point..digits_len).map(|i| char::from(digit(i))));
    }
    Some(Cow::Owned(out))
}

/// What the cast `json` → `jsonb` does to a parsed document: numbers through numeric, object
/// keys in jsonb order (duplicates already resolved last-wins by the parser).
fn json_to_jsonb(value: Value) -> Value {
    match value {
        Value::Number(n) => match canonical_decimal(n.as_str()) {
            Some(Cow::Owned(text)) => {
                Number::from_str(&text).map_or(Value::Number(n), Value::Number)
            }
            _ => Value::Number(n),
        },
        Value::Array(items) => Value::Array(items.into_iter().map(json_to_jsonb).collect()),
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map
                .into_iter()
                .map(|(k, v)| (k, json_to_jsonb(v)))
                .collect();
            entries.sort_by(|a, b| jsonb_key_cmp(&a.0, &b.0));
            Value::Object(entries.into_iter().collect())
        }
        other => other,
    }
}

/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?` (the fraction only with `fraction`): a JSON number in the
/// form numeric_out prints, which JSON numbers keep digit for digit.
fn is_plain_decimal(text: &str, fraction: bool) -> bool {
    let b = text.as_bytes();
    let b = b.strip_prefix(b"-").unwrap_or(b);
    let int = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if int == 0 || (int > 1 && b[0] == b'0') {
        return false;
    }
    match &b[int..] {
        [] => true,
        [b'.', rest @ ..] => fraction && !rest.is_empty() && rest.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

/// Nesting of a jsonb document beyond which [`write_compact_jsonb`] leaves it to the value
/// (well under serde_json's recursion limit, which makes deeper documents a text string).
const MAX_JSONB_DEPTH: usize = 64;

/// Writes jsonb's text output compact, as serializing its parsed value gives: jsonb prints
/// `", "` and `": "` between members, and otherwise already writes what serde_json writes (keys
/// unique and in jsonb order, numbers as numeric_out prints them, the same string escapes:
/// `\" \\ \b \f \n \r \t` and `\u00xx` for other control characters). So the
/// whitespace outside strings is dropped and the document is copied, without building a
/// value. Returns `false`, having written nothing, for text that is not in that form (other
/// escapes, deeper than [`MAX_JSONB_DEPTH`], not JSON): the value path decides then.
fn write_compact_jsonb(text: &str, out: &mut Vec<u8>) -> bool {
    let start = out.len();
    let b = text.as_bytes();
    let (mut i, mut copied, mut depth) = (0, 0, 0usize);
    let give_up = |out: &mut Vec<u8>| {
        out.truncate(start);
        false
    };
    while i < b.len() {
        match b[i] {
            b'"' => {
                i += 1;
                loop {
                    match b.get(i) {
                        None => return give_up(out),
                        Some(b'"') => break,
                        Some(b'\\') => match b.get(i + 1) {
                            Some(b'"' | b'\\' | b'b' | b'f' | b'n' | b'r' | b't') => i += 2,
                            Some(b'u') => match b.get(i + 2..i + 6) {
                                Some([b'0', b'0', hi @ (b'0' | b'1'), lo])
                                    if lo.is_ascii_digit() || (b'a'..=b'f').contains(lo) =>
                                {
                                    // Short forms exist for these: jsonb uses them.
                                    let short = *hi == b'0'
                                        && matches!(lo, b'8' | b'9' | b'a' | b'c' | b'd');
                                    if short {
                                        return give_up(out);
                                    }
                                    i += 6;
                                }
                                _ => return give_up(out),
                            },
                            _ => return give_up(out),
                        },
                        Some(c) if *c < 0x20 => return give_up(out),
                        Some(_) => i += 1,
                    }
                }
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_JSONB_DEPTH {
                    return give_up(out);
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            // An exponent (numeric_out never writes one): serde_json rewrites it.
            b'E' => return give_up(out),
            b'e' if i > 0 && b[i - 1].is_ascii_digit() => return give_up(out),
            b' ' | b'\t' | b'\n' | b'\r' => {
                out.extend_from_slice(&b[copied..i]);
                copied = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    out.extend_from_slice(&b[copied..]);
    // Valid JSON as it came (dropping spaces could join tokens), checked without building it.
    if serde_json::from_str::<serde::de::IgnoredAny>(text).is_err() {
        return give_up(out);
    }
    true
}

/// [`iso_timestamp`] written as a JSON string into `out`.
fn write_iso_timestamp(text: &str, with_offset: bool, out: &mut Vec<u8>) {
    out.push(b'"');
    iso_timestamp_pieces(text, with_offset, |piece| write_str_content(out, piece));
    out.push(b'"');
}

/// ISO `timestamp[tz]` text → to_jsonb's XSD form: `T` between date and time, and for
/// timestamptz an offset of at least `+HH:MM`. `infinity`/`-infinity` have no space: unchanged.
fn iso_timestamp(text: &str, with_offset: bool) -> String {
    let mut out = String::with_capacity(text.len() + 3);
    iso_timestamp_pieces(text, with_offset, |piece| out.push_str(piece));
    out
}

/// [`iso_timestamp`]'s text, handed to `piece` in consecutive pieces.
fn iso_timestamp_pieces(text: &str, with_offset: bool, mut piece: impl FnMut(&str)) {
    // Byte searches (every character looked for is ASCII): a `char` pattern costs more here,
    // once per timestamp cell.
    let position = |s: &str, what: &[u8]| s.bytes().position(|b| what.contains(&b));
    let Some(space) = position(text, b" ") else {
        return piece(text);
    };
    piece(&text[..space]);
    piece("T");
    let rest = &text[space + 1..];
    if with_offset && let Some(sign) = position(rest, b"+-") {
        let end = position(&rest[sign..], b" ").map_or(rest.len(), |e| sign + e);
        piece(&rest[..end]);
        if end - sign == 3 {
            piece(":00");
        }
        return piece(&rest[end..]);
    }
    piece(rest)
}

/// Hasher for type OIDs: one multiply, no SipHash on the hot path.
#[derive(Debug, Default, Clone, Copy)]
struct OidHasher(u64);

impl Hasher for OidHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u32(u32::from(b) ^ (self.0 as u32).rotate_left(8));
        }
    }

    fn write_u32(&mut self, n: u32) {
        let x = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = x ^ (x >> 32);
    }
}

#[cfg(test)]
mod tests;
