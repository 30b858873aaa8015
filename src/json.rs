//! JSON text written directly: byte for byte what `serde_json::to_writer` gives (compact, its
//! string escaping, numbers as their text under `arbitrary_precision`, objects in their map's
//! order), without serde's per-value machinery. Cells become trait JSON here
//! ([`crate::decode::value::TypeCatalog::write_cell_json`]) and events become lines and
//! requests ([`crate::sink::json`]); both run once per row, and serde_json's string escaping
//! was the largest single cost of both. A string without anything to escape, the usual case,
//! is checked in one branch-free pass and copied in one piece.

use serde_json::Value;

/// Appends `entries` as one JSON object, in their order.
pub fn write_object<'a>(out: &mut Vec<u8>, entries: impl Iterator<Item = (&'a str, &'a Value)>) {
    out.push(b'{');
    for (i, (key, value)) in entries.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, key);
        out.push(b':');
        write_value(out, value);
    }
    out.push(b'}');
}

/// Appends `value`.
pub fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        // With `arbitrary_precision` a number is its JSON text, written as is.
        Value::Number(n) => out.extend_from_slice(n.as_str().as_bytes()),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => write_object(out, map.iter().map(|(k, v)| (k.as_str(), v))),
    }
}

/// Whether JSON needs `b` escaped inside a string: `"`, `\` and the control characters.
fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Appends `s` as a JSON string, escaped as serde_json escapes (short forms for
/// `\b \t \n \f \r`, `\u00xx` for the other control characters, nothing else).
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    write_str_content(out, s);
    out.push(b'"');
}

/// Appends `s` escaped as inside a JSON string, without the quotes (a string written in
/// pieces).
pub fn write_str_content(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    // No early exit, so the check compiles to a vectorized pass.
    if !bytes.iter().fold(false, |any, &b| any | needs_escape(b)) {
        out.extend_from_slice(bytes);
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !needs_escape(b) {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\x08' => out.extend_from_slice(b"\\b"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\x0c' => out.extend_from_slice(b"\\f"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn written(v: &Value) -> String {
        let mut out = Vec::new();
        write_value(&mut out, v);
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn every_character_below_128_is_escaped_as_serde_json_escapes_it() {
        let all: String = (0u8..128).map(char::from).collect();
        let v = Value::String(all);
        assert_eq!(written(&v), serde_json::to_string(&v).expect("json"));
    }

    proptest! {
        #[test]
        fn strings_and_nested_values_are_written_as_serde_json_writes_them(
            s in any::<String>(),
            n in any::<i64>(),
            f in "-?[1-9][0-9]{0,4}\\.[0-9]{1,4}",
        ) {
            let v = serde_json::json!({
                "s": s.clone(), "n": n, "f": f.parse::<serde_json::Number>().expect("number"),
                "a": [s.clone(), null, true, {"k\n": false}],
            });
            prop_assert_eq!(written(&v), serde_json::to_string(&v).expect("json"));
        }
    }
}
