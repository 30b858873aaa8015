//! `decode::value` gives, for every cell, exactly the JSON PostgreSQL's `to_jsonb(column)`
//! gives (docs/architecture.md §7): a table with a wide type matrix — builtins, extremes, NaN/infinities,
//! BC dates, json with duplicate keys, arrays of every shape, enum, domains, a composite,
//! hstore — is read back in its text output form (what pgoutput and COPY send) and as
//! `to_jsonb(col)`, and the mapped text must equal the server's JSON, key order included.

use crate::support;

use serde_json::Value;
use slotstream::decode::value::TypeCatalog;
use slotstream::postgres::types::load_types;
use tokio_postgres::SimpleQueryMessage;

/// The settings the replication session and COPY pin.
const SESSION_GUCS: &str = "SET DateStyle = ISO; SET TimeZone = UTC; \
    SET IntervalStyle = postgres; SET extra_float_digits = 3;";

const TYPES: &str = r##"
CREATE TYPE mood AS ENUM ('happy', 'sad', 'it''s "complicated"');
CREATE DOMAIN price AS numeric CHECK (VALUE >= 0);
CREATE DOMAIN price2 AS price;
CREATE DOMAIN label AS text;
CREATE DOMAIN intlist AS int4[];
CREATE TYPE address AS (street text, zip int4, tags text[], geo point, mood mood, cost price,
                        doc json, dropped int4);
ALTER TYPE address DROP ATTRIBUTE dropped;
CREATE TYPE parcel AS (to_addr address, weights float8[]);
"##;

/// Columns of the matrix (besides `id`); `{ext}` columns need the contrib extensions.
const COLUMNS: &[(&str, &str)] = &[
    ("c_bool", "bool"),
    ("c_int2", "int2"),
    ("c_int4", "int4"),
    ("c_int8", "int8"),
    ("c_oid", "oid"),
    ("c_float4", "float4"),
    ("c_float8", "float8"),
    ("c_numeric", "numeric"),
    ("c_numeric_scaled", "numeric(10,2)"),
    ("c_text", "text"),
    ("c_varchar", "varchar(20)"),
    ("c_char", "char(5)"),
    ("c_name", "name"),
    ("c_qchar", "\"char\""),
    ("c_uuid", "uuid"),
    ("c_json", "json"),
    ("c_jsonb", "jsonb"),
    ("c_date", "date"),
    ("c_time", "time"),
    ("c_timetz", "timetz"),
    ("c_ts", "timestamp"),
    ("c_ts3", "timestamp(3)"),
    ("c_tstz", "timestamptz"),
    ("c_interval", "interval"),
    ("c_bytea", "bytea"),
    ("c_inet", "inet"),
    ("c_cidr", "cidr"),
    ("c_macaddr", "macaddr"),
    ("c_money", "money"),
    ("c_bit", "bit(4)"),
    ("c_varbit", "varbit"),
    ("c_xml", "xml"),
    ("c_point", "point"),
    ("c_box", "box"),
    ("c_range", "int4range"),
    ("c_tsvector", "tsvector"),
    ("c_lsn", "pg_lsn"),
    ("c_int2vector", "int2vector"),
    ("c_oidvector", "oidvector"),
    ("c_mood", "mood"),
    ("c_price", "price"),
    ("c_price2", "price2"),
    ("c_label", "label"),
    ("c_intlist", "intlist"),
    ("c_address", "address"),
    ("c_parcel", "parcel"),
    ("a_int4", "int4[]"),
    ("a_text", "text[]"),
    ("a_int4_2d", "int4[][]"),
    ("a_numeric", "numeric[]"),
    ("a_bool", "bool[]"),
    ("a_float8", "float8[]"),
    ("a_tstz", "timestamptz[]"),
    ("a_ts", "timestamp[]"),
    ("a_jsonb", "jsonb[]"),
    ("a_json", "json[]"),
    ("a_date", "date[]"),
    ("a_mood", "mood[]"),
    ("a_uuid", "uuid[]"),
    ("a_bounds", "int4[]"),
    ("a_price", "price[]"),
    ("a_address", "address[]"),
    ("a_box", "box[]"),
    ("a_char", "char(3)[]"),
    ("a_bytea", "bytea[]"),
    ("a_interval", "interval[]"),
    ("c_citext", "citext"),
    ("c_hstore", "hstore"),
    ("a_hstore", "hstore[]"),
];

/// Columns whose type comes from an extension that may be missing on a minimal install.
const EXTENSION_COLUMNS: &[(&str, &str)] = &[
    ("c_citext", "citext"),
    ("c_hstore", "hstore"),
    ("a_hstore", "hstore"),
];

/// One row per INSERT; columns left out are NULL (row 0 is NULL everywhere but `id`).
const ROWS: &[&str] = &[
    "INSERT INTO matrix (id) VALUES (0)",
    r##"INSERT INTO matrix (id, c_bool, c_int2, c_int4, c_int8, c_oid, c_float4, c_float8,
        c_numeric, c_numeric_scaled, c_text, c_varchar, c_char, c_name, c_qchar, c_uuid, c_json,
        c_jsonb, c_date, c_time, c_timetz, c_ts, c_ts3, c_tstz, c_interval, c_bytea, c_inet,
        c_cidr, c_macaddr, c_money, c_bit, c_varbit, c_point, c_box, c_range, c_tsvector,
        c_lsn, c_int2vector, c_oidvector, c_mood, c_price, c_price2, c_label, c_intlist,
        c_address, c_parcel, a_int4, a_text, a_int4_2d, a_numeric, a_bool, a_float8, a_tstz,
        a_ts, a_jsonb, a_json, a_date, a_mood, a_uuid, a_bounds, a_price, a_address, a_box,
        a_char, a_bytea, a_interval)
    VALUES (1, true, 32767, 2147483647, 9223372036854775807, 4294967295, '3.4028235e38',
        '1e300', '1.50', 12.3, E'h\u00e9llo "quoted" \\back\\slash\nnew line\ttab \U0001F389',
        'abc', 'ab', 'some_name', 'x', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
        '{"b": 1, "a": [1, 2.50, 1E2, -0, 1.5e-3], "a": "dup", "c": {"zz": null, "y": true}}',
        '{"b": 1, "aa": {"c": [1, "x", null, 2.50]}, "a": "\u00e9"}', '2024-02-29',
        '12:34:56.789', '12:34:56.789+05:30', '2024-01-02 03:04:05.123456',
        '2024-01-02 03:04:05.1239', '2024-01-02 03:04:05.123456+02',
        '1 year -2 mons 3 days -04:05:06.5', '\x00ff10', '192.168.0.1/24', '10.0.0.0/8',
        '08:00:2b:01:02:03', 12.5, B'1010', B'101', '(1.5,2)',
        '(1,2),(3,4)', '[1,10)', 'a fat cat sat', '0/16B6C50', '1 2 3', '1 2', 'happy', 19.990,
        5, 'hi there', '{1,2,3}',
        ROW('Main St 1, "B"', 12345, '{a,"b c",NULL}', '(1,2)', 'sad', 3.50,
            '{"k": 1, "k": 2.0e1}'),
        ROW(ROW('x', 1, '{}', '(0,0)', 'happy', 0, '[]'), '{1.5,-0,NaN}'),
        '{1,2,NULL}',
        '{"a b","q\"uote",NULL,"NULL","",",","{}","back\\slash",plain,"\u00e9\U0001F389"," lead"}',
        '{{1,2},{3,4}}', '{1.50,NaN,-0.0,100000000000000000000,Infinity}', '{t,f,NULL}',
        '{-0,1e300,NaN,-Infinity,0.1,1e-300,1.5e-5}',
        '{"2024-01-02 03:04:05.5+00",infinity,NULL,"0044-03-15 12:00:00+00 BC"}',
        '{"2024-01-02 03:04:05",-infinity}',
        ARRAY['{"b": 1, "a": 2}'::jsonb, '[1, 2]', 'null', NULL, '"s"'],
        ARRAY['{"a":1,"a":2, "b" :  [ 1E2 ] }'::json, '1.0e-2', '"x"'],
        '{2024-01-01,infinity,"0044-03-15 BC"}', ARRAY['happy', 'it''s "complicated"']::mood[],
        '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11,NULL}', '[0:2]={1,2,3}', '{1.5,2.25}',
        ARRAY[ROW('s', 1, '{x}', '(1,1)', 'happy', 1, '{}')::address, NULL,
              ROW(NULL, NULL, NULL, NULL, NULL, NULL, NULL)::address],
        '{(1,2),(3,4);(5,6),(7,8)}', '{a,bc,NULL}', '{"\\x00ff",NULL}',
        '{"1 day","-00:00:01.5"}')"##,
    r##"INSERT INTO matrix (id, c_bool, c_int2, c_int4, c_int8, c_oid, c_float4, c_float8,
        c_numeric, c_numeric_scaled, c_text, c_varchar, c_char, c_json, c_jsonb, c_date, c_time,
        c_timetz, c_ts, c_tstz, c_interval, c_bytea, c_inet, c_money, c_range, c_int2vector,
        c_mood, c_price, c_label, c_intlist, c_address, a_int4, a_text, a_int4_2d, a_numeric,
        a_float8, a_jsonb, a_date, a_bounds, a_address, a_char)
    VALUES (2, false, -32768, -2147483648, -9223372036854775808, 0, '-0', '-0',
        1e100, -0.01, '', '', '', ' [ 1 , "x" , { } ] ', '[]', 'infinity', '24:00:00',
        '00:00:00-12:34', 'infinity', 'infinity', '-1 day +02:00', '', '::1', -0.01, 'empty',
        '', 'it''s "complicated"', 0, '', '{}', ROW('', NULL, '{}', NULL, NULL, NULL, 'null'),
        '{}', '{""}', '{{{1},{2}},{{3},{4}}}', '{}', '{}', '{}', '{}',
        '[-5:-4][1:2]={{1,2},{3,4}}', '{}', '{"   "}')"##,
    r##"INSERT INTO matrix (id, c_float4, c_float8, c_numeric, c_text, c_json, c_jsonb, c_date,
        c_ts, c_tstz, a_text, a_int4, a_numeric, a_float8)
    VALUES (3, 'Infinity', '-Infinity', 'NaN', 'NULL', 'null', '"s"', '-infinity',
        '-infinity', '-infinity', '{NULL}', '{NULL,NULL}', '{-Infinity}', '{NaN}')"##,
    r##"INSERT INTO matrix (id, c_float4, c_float8, c_numeric, c_text, c_json, c_jsonb, c_date,
        c_ts, c_tstz, c_numeric_scaled)
    VALUES (4, 'NaN', 'NaN', 'Infinity', '{"looks": "like json"}',
        '"str\u00e9 \n \\ \"q\""', '{"a": {"b": {"c": [[[]]]}}}', '0044-03-15 BC',
        '0044-03-15 12:00:00.5 BC', '0001-01-01 00:00:00+00 BC', 0)"##,
    r##"INSERT INTO matrix (id, c_float4, c_float8, c_numeric, c_json, c_date, c_ts, c_tstz)
    VALUES (5, '0.1', '1e-300', '-Infinity', '1e400', '4713-01-01 BC', '4713-01-01 00:00:00 BC',
        '1800-01-01 00:00:00+00')"##,
    r##"INSERT INTO matrix (id, c_float4, c_float8, c_numeric, c_json, c_date, c_ts, c_tstz)
    VALUES (6, '1.17549435e-38', '123456789012345678', '0.000000000000000000000000000001',
        '{"a": 1.0e-2, "aa": -0, "": 0, "b": -1.5E+3, "c": 12345678901234567890123}',
        '5874897-12-31', '294276-12-31 23:59:59.999999', '294276-12-31 23:59:59.999999+00')"##,
    r##"INSERT INTO matrix (id, c_float8, c_numeric, c_json)
    VALUES (7, '0.1', '-0.000', '[0.1, 1e-7, 5E0, 10e-1, 0e10, -0.0]')"##,
    r##"INSERT INTO matrix (id, c_float8, c_numeric)
    VALUES (8, '1.5e-5', '12345678901234567890.12345678901234567890')"##,
    r##"INSERT INTO matrix (id, c_float8, c_float4) VALUES (9, '2.2250738585072014e-308', '-1e-45')"##,
];

/// The xml value, when the server is built with libxml.
const XML_ROW: &str = r##"UPDATE matrix SET c_xml = '<a b="c">x &amp; y</a>' WHERE id = 1"##;

/// Rows with the extension types, when the extensions are available.
const EXTENSION_ROWS: &[&str] = &[
    r##"UPDATE matrix SET c_citext = 'MiXeD Case', c_hstore = 'a=>1, b=>NULL, "c \"q\""=>"x\\y"',
        a_hstore = ARRAY['a=>1'::hstore, NULL, '']
      WHERE id = 1"##,
    r##"UPDATE matrix SET c_citext = '', c_hstore = '', a_hstore = '{}' WHERE id = 2"##,
    r##"UPDATE matrix SET c_hstore = '"NULL"=>"NULL", "bb"=>"", "a"=>NULL' WHERE id = 3"##,
];

/// Double-quotes an identifier for SQL.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Parses the server's JSON text keeping numbers and key order as printed.
fn server_json(text: &str) -> Value {
    serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("server JSON {text:?} does not parse: {e}"))
}

/// The JSON text of a value (numbers as parsed, keys in map order).
fn printed(value: &Value) -> String {
    value.to_string()
}

#[tokio::test]
async fn every_type_maps_to_the_json_to_jsonb_gives() {
    every_type_maps_to_the_json_to_jsonb_gives_in(support::database().await).await;
}

/// The type matrix in `db` (also run on PostgreSQL 18 by `core_on_postgres_18`). A server built
/// without libxml cannot hold xml values: the xml column is then left out.
pub async fn every_type_maps_to_the_json_to_jsonb_gives_in(db: support::TestDb) {
    let client = db.connect().await;
    client
        .batch_execute(SESSION_GUCS)
        .await
        .expect("pin session settings");

    let available: Vec<String> = client
        .query(
            "SELECT name::text FROM pg_available_extensions WHERE name IN ('citext', 'hstore')",
            &[],
        )
        .await
        .expect("list extensions")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let with_extensions = available.len() == 2;
    if with_extensions {
        client
            .batch_execute("CREATE EXTENSION citext; CREATE EXTENSION hstore;")
            .await
            .expect("create extensions");
    } else {
        eprintln!("citext/hstore not installed: their columns are left out");
    }

    let with_xml = match client.simple_query("SELECT '<a/>'::xml").await {
        Ok(_) => true,
        Err(e)
            if e.as_db_error()
                .is_some_and(|d| d.message().contains("unsupported XML feature")) =>
        {
            false
        }
        Err(e) => panic!("probing xml support: {e}"),
    };
    if !with_xml {
        eprintln!("the server is built without libxml: the xml column is left out");
    }

    client.batch_execute(TYPES).await.expect("create types");
    let columns: Vec<(&str, &str)> = COLUMNS
        .iter()
        .copied()
        .filter(|(name, _)| with_extensions || !EXTENSION_COLUMNS.iter().any(|(n, _)| n == name))
        .filter(|(name, _)| with_xml || *name != "c_xml")
        .collect();
    let definitions: Vec<String> = columns.iter().map(|(n, t)| format!("{n} {t}")).collect();
    client
        .batch_execute(&format!(
            "CREATE TABLE matrix (id int4 PRIMARY KEY, {})",
            definitions.join(", ")
        ))
        .await
        .expect("create table");
    for insert in ROWS {
        client
            .batch_execute(insert)
            .await
            .unwrap_or_else(|e| panic!("{insert}: {e}"));
    }
    if with_xml {
        client.batch_execute(XML_ROW).await.expect("xml row");
    }
    if with_extensions {
        for update in EXTENSION_ROWS {
            client
                .batch_execute(update)
                .await
                .unwrap_or_else(|e| panic!("{update}: {e}"));
        }
    }

    // The type OIDs pgoutput's Relation message carries: pg_attribute.atttypid.
    let attributes: Vec<(String, u32)> = client
        .query(
            "SELECT attname::text, atttypid FROM pg_attribute
              WHERE attrelid = 'matrix'::regclass AND attnum > 0 AND NOT attisdropped
                AND attname <> 'id'
              ORDER BY attnum",
            &[],
        )
        .await
        .expect("read attributes")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(attributes.len(), columns.len());

    let mut catalog = TypeCatalog::builtin();
    let oids: Vec<u32> = attributes.iter().map(|(_, oid)| *oid).collect();
    load_types(&client, &mut catalog, &oids)
        .await
        .expect("load types");
    for (name, oid) in &attributes {
        assert!(
            !catalog.needs(*oid),
            "{name} (type {oid}) still unresolved after load_types"
        );
        assert!(
            catalog.is_exact(*oid),
            "{name} (type {oid}) reported as not exact"
        );
    }

    let mut failures = Vec::new();
    let mut compared = 0;
    for (name, oid) in &attributes {
        let col = ident(name);
        // The simple query protocol returns each value in its type's text output form — what
        // pgoutput and COPY send. (`col::text` would not do: it runs casts, and bool::text is
        // `true`, bpchar::text drops the padding, inet::text keeps `/128`.)
        let messages = client
            .simple_query(&format!(
                "SELECT id, {col}, to_jsonb({col}) FROM matrix ORDER BY id"
            ))
            .await
            .unwrap_or_else(|e| panic!("read {name}: {e}"));
        let mut non_null = 0;
        for message in messages {
            let SimpleQueryMessage::Row(row) = message else {
                continue;
            };
            let id = row.get(0).unwrap_or("?");
            match (row.get(1), row.get(2)) {
                (None, None) => {}
                (Some(text), Some(expected)) => {
                    non_null += 1;
                    compared += 1;
                    let expected = server_json(expected);
                    let ours = catalog.cell_to_json(*oid, text);
                    // What the pipeline writes: the cell's JSON text, straight from its text.
                    let mut written = Vec::new();
                    catalog.write_cell_json(*oid, text, &mut written);
                    let written = String::from_utf8_lossy(&written);
                    // Equal as values, and printed alike (key order, number digits).
                    if ours != expected
                        || printed(&ours) != printed(&expected)
                        || written != printed(&expected)
                    {
                        failures.push(format!(
                            "column {name} (type {oid}), row {id}: text {text:?}\n  \
                             to_jsonb: {expected}\n  ours:     {ours}\n  written:  {written}"
                        ));
                    }
                }
                (text, expected) => failures.push(format!(
                    "column {name}, row {id}: text {text:?} but to_jsonb {expected:?}"
                )),
            }
        }
        assert!(
            non_null > 0,
            "column {name} has no non-NULL row: the matrix misses it"
        );
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!(
        "{compared} cells of {} columns equal to_jsonb",
        attributes.len()
    );
}

#[tokio::test]
async fn timestamptz_offsets_match_to_jsonb_under_any_time_zone() {
    let db = support::database().await;
    let client = db.connect().await;
    client
        .batch_execute(SESSION_GUCS)
        .await
        .expect("pin session settings");
    client
        .batch_execute(
            "CREATE TABLE moments (id int4 PRIMARY KEY, t timestamptz, a timestamptz[]);
             INSERT INTO moments VALUES
               (1, '1900-01-01 00:00:00+00', '{\"1900-01-01 00:00:00+00\"}'),
               (2, '2000-01-01 00:00:00+00', '{\"2000-07-01 00:00:00+00\"}'),
               (3, '0044-03-15 12:00:00+00 BC', '{infinity}'),
               (4, '2024-06-30 23:59:59.999999+00', '{\"1800-01-01 00:00:00+00\"}');",
        )
        .await
        .expect("create moments");
    let catalog = TypeCatalog::builtin();
    let mut failures = Vec::new();
    // Whole-hour, half-hour, negative and LMT (seconds) offsets.
    for zone in [
        "UTC",
        "Asia/Kolkata",
        "America/St_Johns",
        "Europe/Amsterdam",
        "Asia/Kathmandu",
    ] {
        client
            .batch_execute(&format!("SET TimeZone = '{zone}'"))
            .await
            .expect("set time zone");
        for (column, oid) in [("t", 1184_u32), ("a", 1185)] {
            let messages = client
                .simple_query(&format!(
                    "SELECT id, {column}, to_jsonb({column}) FROM moments"
                ))
                .await
                .expect("read moments");
            for message in messages {
                let SimpleQueryMessage::Row(row) = message else {
                    continue;
                };
                let (Some(id), Some(text), Some(expected)) = (row.get(0), row.get(1), row.get(2))
                else {
                    panic!("moments has no NULLs");
                };
                let expected = server_json(expected);
                let ours = catalog.cell_to_json(oid, text);
                let mut written = Vec::new();
                catalog.write_cell_json(oid, text, &mut written);
                if ours != expected || written != printed(&expected).as_bytes() {
                    failures.push(format!(
                        "{zone} {column} row {id}: {text:?} → {ours} ≠ {expected}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "mismatches:\n{}", failures.join("\n"));
}
