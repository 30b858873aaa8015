//! Events as JSON text, written directly ([`crate::json`]): byte for byte what
//! `serde_json::to_writer` gives for an [`Event`] (the tests below compare the two). A row's
//! traits are already JSON text ([`crate::transform::Traits`]): they are copied, not written
//! again.

use crate::json::{write_object, write_str};

use crate::transform::event::{Context, Library, Sources};
use crate::transform::{Event, EventKind};

/// Appends `events` as JSON lines (one object and a newline each), as they are: the encoder
/// stamps nothing (`sentAt` is set by the delivery step).
pub fn write_lines(events: &[Event], out: &mut Vec<u8>) {
    for e in events {
        write_event(out, e);
        out.push(b'\n');
    }
}

/// Appends `event` as one JSON object (no newline).
pub fn write_event(out: &mut Vec<u8>, event: &Event) {
    write(out, event, false);
}

/// Appends `event` as one JSON object (no newline), an identify's traits also under
/// `context.traits`, where RudderStack's event spec and its SDKs put them (the HTTP
/// destination's `rudderstack` format). Everything else as [`write_event`] writes it.
pub fn write_event_with_context_traits(out: &mut Vec<u8>, event: &Event) {
    write(out, event, true);
}

fn write(out: &mut Vec<u8>, event: &Event, context_traits: bool) {
    // Destructured, so that a field added to `Event` fails to compile here until it is written.
    let Event {
        kind,
        event: name,
        message_id,
        user_id,
        anonymous_id,
        traits,
        properties,
        context,
        original_timestamp,
        sent_at,
    } = event;
    let Context {
        library: Library {
            name: library_name,
            version,
        },
        sources:
            Sources {
                name: source_name,
                schema,
                table,
                op,
                lsn,
            },
    } = context;
    out.extend_from_slice(match kind {
        EventKind::Identify => b"{\"type\":\"identify\"",
        EventKind::Track => b"{\"type\":\"track\"",
    });
    if let Some(name) = name {
        out.extend_from_slice(b",\"event\":");
        write_str(out, name);
    }
    out.extend_from_slice(b",\"messageId\":\"");
    let mut uuid = uuid::Uuid::encode_buffer();
    out.extend_from_slice(message_id.hyphenated().encode_lower(&mut uuid).as_bytes());
    out.push(b'"');
    if let Some(user_id) = user_id {
        out.extend_from_slice(b",\"userId\":");
        write_str(out, user_id);
    }
    if let Some(anonymous_id) = anonymous_id {
        out.extend_from_slice(b",\"anonymousId\":");
        write_str(out, anonymous_id);
    }
    if let Some(traits) = traits {
        out.extend_from_slice(b",\"traits\":");
        traits.write_json(out);
    }
    if let Some(properties) = properties {
        out.extend_from_slice(b",\"properties\":");
        write_object(out, properties.iter().map(|(k, v)| (k.as_str(), v)));
    }
    out.extend_from_slice(b",\"context\":{");
    if let (true, Some(traits)) = (context_traits, traits) {
        out.extend_from_slice(b"\"traits\":");
        traits.write_json(out);
        out.push(b',');
    }
    out.extend_from_slice(b"\"library\":{\"name\":");
    write_str(out, library_name);
    out.extend_from_slice(b",\"version\":");
    write_str(out, version);
    out.extend_from_slice(b"},\"sources\":{\"name\":");
    write_str(out, source_name);
    out.extend_from_slice(b",\"schema\":");
    write_str(out, schema);
    out.extend_from_slice(b",\"table\":");
    write_str(out, table);
    out.extend_from_slice(b",\"op\":");
    write_str(out, op.as_str());
    out.extend_from_slice(b",\"lsn\":");
    write_str(out, lsn);
    out.extend_from_slice(b"}},\"originalTimestamp\":");
    write_str(out, original_timestamp);
    if let Some(sent_at) = sent_at {
        out.extend_from_slice(b",\"sentAt\":");
        write_str(out, sent_at);
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Lsn;
    use crate::config::{IdentifierColumn, IdentifierColumns, MappingConfig};
    use crate::transform::event::{EventFactory, Stamp};
    use crate::transform::mapping::CellRef;
    use crate::transform::{Op, Projection};
    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    fn events(text: &str, extra: Value) -> Vec<Event> {
        let mut constants = Map::new();
        constants.insert("source\n\"pg\"".into(), extra.clone());
        let mapping = MappingConfig {
            columns: None,
            constants,
            filter: None,
            identifiers: IdentifierColumns {
                user_id: IdentifierColumn::Default("user_id"),
                anonymous_id: IdentifierColumn::Default("anonymous_id"),
                email: IdentifierColumn::Default("email"),
            },
            trait_keys: Default::default(),
        };
        let columns = [
            ("user_id", 25),
            ("email", 25),
            ("odd \u{1}key\\", 25),
            ("doc", 3802),
        ];
        let projection = Projection::resolve(&mapping, "t", columns).expect("resolves");
        let factory = EventFactory::new("pipe\"line", "sch\u{e9}ma", "t\tbl");
        let stamp = Stamp::new(Lsn::from_u64(0x16B6C50), "2024-01-02T03:04:05.123456Z");
        let row = |absent: bool| {
            projection.project(&crate::decode::value::TypeCatalog::builtin(), |i| match i {
                0 => CellRef::Value(Value::String(format!("u_{text}"))),
                1 if absent => CellRef::Absent,
                1 => CellRef::Value(Value::String(text.to_owned())),
                2 => CellRef::Null,
                _ => CellRef::Value(extra.clone()),
            })
        };
        let id = uuid::Uuid::from_u128(0x1234_5678_9abc_def0_1234_5678_9abc_def0);
        let mut with_sent_at = factory.identify(row(false), Op::Update, &stamp, id);
        with_sent_at.sent_at = Some(text.into());
        vec![
            with_sent_at,
            factory.identify(row(true), Op::Insert, &stamp, id),
            factory.deleted(row(false), &stamp, id),
        ]
    }

    fn assert_same_as_serde(events: &[Event]) {
        for e in events {
            let mut ours = Vec::new();
            write_event(&mut ours, e);
            let serde = serde_json::to_vec(e).expect("serializes");
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&serde)
            );
        }
    }

    #[test]
    fn writes_what_serde_json_writes() {
        let nested = json!({
            "a": [1, -2.5, "x\u{7f}y", null, true, false, {"b": []}, {}],
            "escapes": "\" \\ / \u{8} \u{c} \n \r \t \u{0} \u{1f} é 😀",
            "big": serde_json::from_str::<Value>("123456789012345678901234567890.000").expect("number"),
        });
        assert_same_as_serde(&events("plain", nested));
        assert_same_as_serde(&events("", Value::Null));
        assert_same_as_serde(&events("\"quoted\"\n\u{1}\u{1f}\\", json!("s")));
    }

    proptest! {
        #[test]
        fn any_text_is_escaped_as_serde_json_escapes_it(text in "\\PC*|[\\x00-\\x7f]*") {
            assert_same_as_serde(&events(&text, Value::String(text.clone())));
        }
    }
}
