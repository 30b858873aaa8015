//! Unit tests of the cell mapping; the definition of correct is the differential test
//! `tests/value_matches_to_jsonb.rs` against a running server.

use super::*;

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad test JSON {text}: {e}"))
}

/// The JSON text of a cell, checked to be the same through the value and the writer.
fn map(oid: u32, text: &str) -> String {
    let catalog = TypeCatalog::builtin();
    let through_value = catalog.cell_to_json(oid, text).to_string();
    assert_eq!(
        written(&catalog, oid, text),
        through_value,
        "{oid} {text:?}"
    );
    through_value
}

fn written(catalog: &TypeCatalog, oid: u32, text: &str) -> String {
    let mut out = Vec::new();
    catalog.write_cell_json(oid, text, &mut out);
    String::from_utf8(out).expect("utf-8")
}

/// Cell texts near and off the forms the fast paths accept.
fn cell_text() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    prop_oneof![
        "-?[0-9]{1,25}(\\.[0-9]{0,6})?([eE][-+]?[0-9]{1,4})?",
        "[-+ 0.]{0,3}[0-9]{0,4}[.eE]?[0-9]{0,3}",
        "(t|f|true|NaN|-?Infinity|infinity|-0|0|00|-00)",
        "[0-9]{4}-[0-9]{2}-[0-9]{2}( [0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,6})?)?([-+][0-9]{2}(:[0-9]{2})?)?( BC)?",
        any::<String>(),
    ]
}

/// jsonb's output is copied without its spaces; text in another form goes through the value.
#[test]
fn jsonb_output_is_made_compact_without_a_value() {
    let doc = r#"{"a": 1.50, "bb": [true, null, "x\"y\u001f\n"], "ccc": {"d": -0.5}}"#;
    assert_eq!(
        map(JSONB, doc),
        r#"{"a":1.50,"bb":[true,null,"x\"y\u001f\n"],"ccc":{"d":-0.5}}"#
    );
    // Escapes jsonb never writes, and text that is not JSON.
    assert_eq!(map(JSONB, r#"["\u0041", "\u000a"]"#), r#"["A","\n"]"#);
    assert_eq!(map(JSONB, "{\"a\": "), r#""{\"a\": ""#);
    // Exponents are rewritten by the parse: not copied (`map` checks writer = value).
    assert!(map(JSONB, "[0E0, 1e2, true, false]").ends_with(",true,false]"));
    let deep = format!("{}1{}", "[".repeat(100), "]".repeat(100));
    assert_eq!(map(JSONB, &deep), deep);
}

proptest::proptest! {
    /// The writer is the value's serialization for every builtin type and any text.
    #[test]
    fn written_cells_are_the_values_serialization(
        text in cell_text(),
        special in proptest::sample::select(vec![
            BOOL, INT2, INT4, INT8, NUMERIC, FLOAT4, FLOAT8, TIMESTAMP, TIMESTAMPTZ, TEXT, OID,
            JSON, JSONB, 1016, 1231, 1115,
        ]),
        pick in 0usize..(BUILTIN_SCALARS.len() + BUILTIN_ARRAYS.len()),
        any_type in proptest::bool::ANY,
    ) {
        let catalog = TypeCatalog::builtin();
        let oid = if any_type {
            BUILTIN_SCALARS
                .get(pick)
                .copied()
                .unwrap_or_else(|| BUILTIN_ARRAYS[pick - BUILTIN_SCALARS.len()].0)
        } else {
            special
        };
        proptest::prop_assert_eq!(
            written(&catalog, oid, &text),
            catalog.cell_to_json(oid, &text).to_string()
        );
    }
}

#[test]
fn numbers_keep_every_digit() {
    assert_eq!(map(INT8, "-9223372036854775808"), "-9223372036854775808");
    assert_eq!(map(NUMERIC, "1.50"), "1.50");
    assert_eq!(map(NUMERIC, "0.000"), "0.000");
    let huge = format!("1{}", "0".repeat(100));
    assert_eq!(map(NUMERIC, &huge), huge);
    assert_eq!(map(NUMERIC, "NaN"), r#""NaN""#);
    assert_eq!(map(NUMERIC, "-Infinity"), r#""-Infinity""#);
    assert_eq!(map(OID, "12"), r#""12""#);
}

#[test]
fn floats_print_as_numeric_does() {
    assert_eq!(map(FLOAT8, "-0"), "0");
    assert_eq!(map(FLOAT8, "0.1"), "0.1");
    assert_eq!(map(FLOAT8, "1e+300"), format!("1{}", "0".repeat(300)));
    assert_eq!(map(FLOAT8, "1e-300"), format!("0.{}1", "0".repeat(299)));
    assert_eq!(map(FLOAT8, "1.5e-05"), "0.000015");
    assert_eq!(map(FLOAT8, "1.2345678901234568e+17"), "123456789012345680");
    assert_eq!(map(FLOAT8, "-2.5e+00"), "-2.5");
    assert_eq!(
        map(FLOAT4, "3.4028235e+38"),
        format!("34028235{}", "0".repeat(31))
    );
    assert_eq!(map(FLOAT8, "Infinity"), r#""Infinity""#);
    assert_eq!(map(FLOAT8, "NaN"), r#""NaN""#);
}

#[test]
fn canonical_decimal_follows_numeric_in_scale_rules() {
    let c = |t: &str| canonical_decimal(t).map(Cow::into_owned);
    assert_eq!(c("1.0e-2").as_deref(), Some("0.010"));
    assert_eq!(c("100e-1").as_deref(), Some("10.0"));
    assert_eq!(c("1.50e1").as_deref(), Some("15.0"));
    assert_eq!(c("0e5").as_deref(), Some("0"));
    assert_eq!(c("-0.0").as_deref(), Some("0.0"));
    assert_eq!(c("-0.0e3").as_deref(), Some("0"));
    assert_eq!(c("007").as_deref(), Some("7"));
    assert_eq!(c("1E2").as_deref(), Some("100"));
    assert!(matches!(
        canonical_decimal("12.5"),
        Some(Cow::Borrowed("12.5"))
    ));
    assert_eq!(c("1e99999"), None);
    assert_eq!(c("abc"), None);
    assert_eq!(c("1."), None);
    assert_eq!(c(".5"), None);
    assert_eq!(c("1e"), None);
}

#[test]
fn json_becomes_jsonb() {
    let v = TypeCatalog::builtin().cell_to_json(
        JSON,
        r#"{"b":1,"aa":2,"a":3, "a": 4, "c": 1E2, "d": -0, "e": [1.0e-2]}"#,
    );
    assert_eq!(
        v.to_string(),
        r#"{"a":4,"b":1,"c":100,"d":0,"e":[0.010],"aa":2}"#
    );
    assert_eq!(map(JSON, "null"), "null");
    assert_eq!(map(JSONB, r#"{"b": 1, "a": 2}"#), r#"{"b":1,"a":2}"#);
}

#[test]
fn timestamps_use_the_xsd_form() {
    assert_eq!(
        map(TIMESTAMP, "2024-01-02 03:04:05.123456"),
        r#""2024-01-02T03:04:05.123456""#
    );
    assert_eq!(
        map(TIMESTAMP, "0044-03-15 12:00:00 BC"),
        r#""0044-03-15T12:00:00 BC""#
    );
    assert_eq!(map(TIMESTAMP, "infinity"), r#""infinity""#);
    assert_eq!(
        map(TIMESTAMPTZ, "2024-01-02 03:04:05+00"),
        r#""2024-01-02T03:04:05+00:00""#
    );
    assert_eq!(
        map(TIMESTAMPTZ, "0044-03-15 12:00:00+00 BC"),
        r#""0044-03-15T12:00:00+00:00 BC""#
    );
    assert_eq!(
        map(TIMESTAMPTZ, "1999-12-31 20:30:00-03:30"),
        r#""1999-12-31T20:30:00-03:30""#
    );
    assert_eq!(
        map(TIMESTAMPTZ, "1900-01-01 00:19:32+00:19:32"),
        r#""1900-01-01T00:19:32+00:19:32""#
    );
    assert_eq!(map(TIMESTAMPTZ, "-infinity"), r#""-infinity""#);
    assert_eq!(map(DATE, "0044-03-15 BC"), r#""0044-03-15 BC""#);
}

#[test]
fn arrays_parse_quotes_nulls_and_dimensions() {
    assert_eq!(map(1007, "{1,2,NULL}"), "[1,2,null]");
    assert_eq!(map(1007, "{}"), "[]");
    assert_eq!(map(1007, "{{1,2},{3,4}}"), "[[1,2],[3,4]]");
    assert_eq!(map(1007, "[0:1]={1,2}"), "[1,2]");
    assert_eq!(map(1007, "[0:1][2:3]={{1,2},{3,4}}"), "[[1,2],[3,4]]");
    assert_eq!(
        map(
            1009,
            r#"{"a b","q\"uote",NULL,"NULL","",",","{}","back\\slash",plain}"#
        ),
        r#"["a b","q\"uote",null,"NULL","",",","{}","back\\slash","plain"]"#
    );
    assert_eq!(map(1009, r#"{"é\"ü",ü}"#), r#"["é\"ü","ü"]"#);
    assert_eq!(
        map(1020, "{(1,2),(0,0);(3,3),(1,1)}"),
        r#"["(1,2),(0,0)","(3,3),(1,1)"]"#
    );
    assert_eq!(
        map(1021, "{-0,1e+30,NaN}"),
        r#"[0,1000000000000000000000000000000,"NaN"]"#
    );
    assert_eq!(
        map(1185, r#"{"2024-01-02 03:04:05+00"}"#),
        r#"["2024-01-02T03:04:05+00:00"]"#
    );
    assert_eq!(
        map(3807, r#"{"{\"a\": 1}","[1, 2]"}"#),
        r#"[{"a":1},[1,2]]"#
    );
    assert_eq!(map(INT2VECTOR, "1 2"), "[1,2]");
    assert_eq!(map(INT2VECTOR, ""), "[]");
    assert_eq!(map(OIDVECTOR, "1 2"), r#"["1","2"]"#);
}

#[test]
fn malformed_text_falls_back_to_the_string() {
    for bad in [
        "{1,2", "{1,2}x", "1,2", "{\"a}", "{1,,2}", "{a\\", "[0:1]{1}", "",
    ] {
        assert_eq!(
            TypeCatalog::builtin().cell_to_json(1007, bad),
            Value::String(bad.into())
        );
    }
    assert_eq!(map(BOOL, "x"), r#""x""#);
    assert_eq!(map(INT4, "1x"), r#""1x""#);
    assert_eq!(map(JSON, "{"), r#""{""#);
    let deep = format!("{}{}", "{".repeat(100), "}".repeat(100));
    assert_eq!(
        TypeCatalog::builtin().cell_to_json(1007, &deep),
        Value::String(deep.clone())
    );
}

#[test]
fn domains_map_as_their_base_and_unknown_types_as_text() {
    let mut catalog = TypeCatalog::builtin();
    assert!(catalog.needs(30000));
    assert_eq!(catalog.cell_to_json(30000, "12"), json(r#""12""#));
    catalog.insert(30000, TypeShape::Domain { base: 30001 });
    assert!(
        catalog.needs(30000),
        "a domain over an unknown base still needs loading"
    );
    catalog.insert(30001, TypeShape::Domain { base: NUMERIC });
    catalog.insert(
        30002,
        TypeShape::Array {
            element: 30000,
            delimiter: b',',
        },
    );
    assert!(!catalog.needs(30002));
    assert_eq!(
        catalog.cell_to_json(30002, "{1.50,NULL}").to_string(),
        "[1.50,null]"
    );
    catalog.insert(30003, TypeShape::Domain { base: 30003 });
    assert_eq!(catalog.cell_to_json(30003, "7"), json(r#""7""#));
    catalog.invalidate(30001);
    assert!(catalog.needs(30002));
}

#[test]
fn composites_become_objects_in_jsonb_key_order() {
    let mut catalog = TypeCatalog::builtin();
    let field = |name: &str, type_oid| CompositeField {
        name: name.into(),
        type_oid,
    };
    let shape = CompositeShape::new(vec![
        field("zz", INT4),
        field("b", TEXT),
        field("a", 1007),
        field("n", NUMERIC),
    ]);
    catalog.insert(30010, TypeShape::Composite(shape));
    let v = catalog.cell_to_json(30010, r#"(1,"a ""b"" \\c","{1,2}",)"#);
    assert_eq!(
        v.to_string(),
        r#"{"a":[1,2],"b":"a \"b\" \\c","n":null,"zz":1}"#
    );
    assert_eq!(catalog.cell_to_json(30010, "(1,x)"), json(r#""(1,x)""#));
    assert_eq!(
        catalog.cell_to_json(30010, r#"(1,"",,)"#).to_string(),
        r#"{"a":null,"b":"","n":null,"zz":1}"#
    );
    catalog.insert(
        30011,
        TypeShape::Composite(CompositeShape::new(vec![field("x", TEXT)])),
    );
    assert_eq!(
        catalog.cell_to_json(30011, "()").to_string(),
        r#"{"x":null}"#
    );
    catalog.insert(
        30012,
        TypeShape::Array {
            element: 30011,
            delimiter: b',',
        },
    );
    assert_eq!(
        catalog.cell_to_json(30012, r#"{"(a)","()"}"#).to_string(),
        r#"[{"x":"a"},{"x":null}]"#
    );
}

#[test]
fn hstore_becomes_an_object_of_strings() {
    let mut catalog = TypeCatalog::builtin();
    catalog.insert(30020, TypeShape::Hstore);
    let v = catalog.cell_to_json(
        30020,
        r#""b"=>"1", "aa"=>NULL, "a"=>"x\"y\\z", "c"=>"NULL""#,
    );
    assert_eq!(
        v.to_string(),
        r#"{"a":"x\"y\\z","b":"1","c":"NULL","aa":null}"#
    );
    assert_eq!(catalog.cell_to_json(30020, "").to_string(), "{}");
    assert_eq!(
        catalog.cell_to_json(30020, r#""a"=>"#),
        json(r#""\"a\"=>""#)
    );
}

#[test]
fn exactness_is_reported() {
    let mut catalog = TypeCatalog::builtin();
    catalog.insert(30030, TypeShape::JsonCast);
    catalog.insert(
        30031,
        TypeShape::Array {
            element: 30030,
            delimiter: b',',
        },
    );
    assert!(catalog.is_exact(1007));
    assert!(!catalog.is_exact(30031));
    assert!(!catalog.is_exact(39999));
}

#[test]
fn every_builtin_is_known_without_a_query() {
    let catalog = TypeCatalog::builtin();
    for oid in BUILTIN_SCALARS
        .into_iter()
        .chain(BUILTIN_ARRAYS.map(|(a, _)| a))
    {
        assert!(!catalog.needs(oid), "builtin {oid} needs loading");
        assert_eq!(
            catalog.get(oid),
            catalog.shapes.get(&oid).or(catalog.get(oid))
        );
    }
}

#[test]
fn json_deeper_than_the_parser_limit_falls_back_to_text_without_panicking() {
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    assert_eq!(map(JSONB, &deep), Value::String(deep.clone()).to_string());
    assert_eq!(map(JSON, &deep), Value::String(deep.clone()).to_string());
}
