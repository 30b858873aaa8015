//! Unit tests of the change mapper: each decision about a change, without a server.

use std::path::Path;

use bytes::Bytes;

use super::*;
use crate::decode::pgoutput::{RelationColumn, ReplicaIdentity};
use crate::transform::event::EventKind;

const OID: u32 = 16_384;
const OTHER: u32 = 16_999;
const TEXT: u32 = 25;
const INT8: u32 = 20;

fn config(extra: &str) -> Config {
    let text = format!(
        "name = \"p\"\n[source]\ndatabase = \"app\"\nuser = \"rudder\"\npassword = \"x\"\ntable = \"users\"\n{extra}\n[destination]\ntype = \"stdout\"\n"
    );
    Config::from_toml_str(&text, Path::new("test.toml"), Vec::new()).expect("valid config")
}

fn relation(rel_id: u32, name: &str, columns: &[(&str, u32, bool)]) -> LogicalMessage {
    LogicalMessage::Relation(RelationBody {
        xid: None,
        rel_id,
        namespace: "public".into(),
        name: name.into(),
        replica_identity: ReplicaIdentity::Default,
        columns: columns
            .iter()
            .map(|(n, t, key)| RelationColumn {
                is_key: *key,
                name: (*n).into(),
                type_oid: *t,
                type_modifier: -1,
            })
            .collect(),
    })
}

/// id, user_id, email, name
fn users(rel_id: u32) -> LogicalMessage {
    relation(
        rel_id,
        "users",
        &[
            ("id", INT8, true),
            ("user_id", TEXT, false),
            ("email", TEXT, false),
            ("name", TEXT, false),
        ],
    )
}

fn cell(v: Option<&str>) -> Cell {
    match v {
        Some(s) => Cell::Text(Bytes::copy_from_slice(s.as_bytes())),
        None => Cell::Null,
    }
}

fn row(cells: &[Option<&str>]) -> TupleData {
    TupleData {
        cells: cells.iter().map(|c| cell(*c)).collect(),
    }
}

fn insert(rel_id: u32, cells: &[Option<&str>]) -> LogicalMessage {
    LogicalMessage::Insert {
        xid: None,
        rel_id,
        new: row(cells),
    }
}

struct Harness<'a> {
    mapper: ChangeMapper<'a>,
    types: TypeCatalog,
}

impl<'a> Harness<'a> {
    fn new(config: &'a Config, factory: &'a EventFactory) -> Self {
        let mut mapper = ChangeMapper::new(config, factory, OID);
        mapper.begin(Lsn::from(0x100), 0);
        Harness {
            mapper,
            types: TypeCatalog::builtin(),
        }
    }

    /// Maps `msg`, resolving a new shape of the followed table as the reader does.
    fn map(&mut self, msg: LogicalMessage) -> Result<Option<Item>, Error> {
        match self.mapper.map(msg, &self.types)? {
            Mapped::Skip => Ok(None),
            Mapped::Item(item) => Ok(Some(item)),
            Mapped::OurRelation { unknown_types } => {
                assert!(unknown_types.is_empty(), "built-in types only here");
                self.mapper.resolve_ours()?;
                Ok(None)
            }
        }
    }

    fn event(&mut self, msg: LogicalMessage) -> crate::transform::Event {
        match self.map(msg) {
            Ok(Some(Item::Row(r))) => r.event,
            other => panic!("expected an event, got {other:?}"),
        }
    }
}

fn factory() -> EventFactory {
    EventFactory::new("p", "public", "users")
}

#[test]
fn the_followed_table_is_recognised_by_oid_not_by_name() {
    let c = config("");
    let f = factory();
    let mut h = Harness::new(&c, &f);
    // Another relation named like ours (another schema's, or a table created after a rename).
    h.map(users(OTHER)).unwrap();
    assert!(
        h.map(insert(OTHER, &[Some("1"), Some("u_1"), None, None]))
            .unwrap()
            .is_none()
    );
    // Ours under another name (renamed): still followed.
    h.map(relation(
        OID,
        "customers",
        &[
            ("id", INT8, true),
            ("user_id", TEXT, false),
            ("email", TEXT, false),
            ("name", TEXT, false),
        ],
    ))
    .unwrap();
    let e = h.event(insert(OID, &[Some("2"), Some("u_2"), None, Some("Ann")]));
    assert_eq!(e.user_id.as_deref(), Some("u_2"));
}

#[test]
fn ordinals_count_every_change_of_the_transaction() {
    let c = config("");
    let f = factory();
    let mut h = Harness::new(&c, &f);
    h.map(users(OID)).unwrap();
    h.map(users(OTHER)).unwrap();
    h.map(insert(OTHER, &[Some("1"), Some("x"), None, None]))
        .unwrap();
    let e = h.event(insert(OID, &[Some("2"), Some("u_2"), None, None]));
    // The second change of the transaction, whichever table the first one touched.
    assert_eq!(e.message_id, stream_message_id("p", Lsn::from(0x100), 2));
    match h.mapper.commit(Lsn::from(0x180)) {
        Item::Commit { end_lsn, rows, .. } => {
            assert_eq!(end_lsn, Lsn::from(0x180));
            assert_eq!(rows, 1, "only the followed table's rows are counted");
        }
        other => panic!("expected a commit, got {other:?}"),
    }
    assert!(!h.mapper.in_transaction());
}

#[test]
fn unchanged_toast_is_taken_from_a_full_old_row_else_left_out() {
    let c = config("");
    let f = factory();
    let mut h = Harness::new(&c, &f);
    h.map(users(OID)).unwrap();
    let mut new = row(&[Some("1"), Some("u_1"), None, None]);
    new.cells[3] = Cell::UnchangedToast;
    let e = h.event(LogicalMessage::Update {
        xid: None,
        rel_id: OID,
        old: Some(OldTuple::Full(row(&[
            Some("1"),
            Some("u_1"),
            None,
            Some("Ann"),
        ]))),
        new: new.clone(),
    });
    assert_eq!(
        e.traits.as_ref().unwrap().get("name"),
        Some(serde_json::json!("Ann"))
    );
    let e = h.event(LogicalMessage::Update {
        xid: None,
        rel_id: OID,
        old: None,
        new,
    });
    assert!(!e.traits.as_ref().unwrap().contains_key("name"));
}

#[test]
fn deletes_follow_the_sync_mode() {
    let delete = || LogicalMessage::Delete {
        xid: None,
        rel_id: OID,
        old: OldTuple::Full(row(&[Some("1"), Some("u_1"), None, Some("Ann")])),
    };
    let upsert = config("");
    let f = factory();
    let mut h = Harness::new(&upsert, &f);
    h.map(users(OID)).unwrap();
    assert!(h.map(delete()).unwrap().is_none());
    assert_eq!(
        h.mapper.take_counts().0,
        [0, 0, 1, 0],
        "an ignored delete was read all the same (the metrics count it)"
    );
    assert!(h.mapper.take_counts().is_empty(), "taken once");
    match h.mapper.commit(Lsn::from(0x180)) {
        Item::Commit { rows, .. } => assert_eq!(rows, 1, "an ignored delete still counts"),
        other => panic!("{other:?}"),
    }

    let mirror = config("[sync]\nmode = \"mirror\"");
    let mut h = Harness::new(&mirror, &f);
    h.map(users(OID)).unwrap();
    let e = h.event(delete());
    assert_eq!(e.kind, EventKind::Track);
    assert_eq!(e.event, Some("Record Deleted"));
    assert_eq!(e.user_id.as_deref(), Some("u_1"));
}

#[test]
fn a_key_only_delete_without_identifier_is_a_dead_letter_that_says_why() {
    let mirror = config("[sync]\nmode = \"mirror\"");
    let f = factory();
    let mut h = Harness::new(&mirror, &f);
    h.map(users(OID)).unwrap();
    let item = h
        .map(LogicalMessage::Delete {
            xid: None,
            rel_id: OID,
            old: OldTuple::Key(row(&[Some("1"), None, None, None])),
        })
        .unwrap();
    match item {
        Some(Item::DeadLetter(d)) => {
            assert_eq!(d.op, "delete");
            assert!(d.reason.contains("REPLICA IDENTITY FULL"), "{}", d.reason);
        }
        other => panic!("expected a dead letter, got {other:?}"),
    }
}

#[test]
fn dead_letter_reasons_name_the_configured_identifiers() {
    let c = config("[mapping.identifiers]\nuser_id = \"uid\"");
    let f = factory();
    let mut h = Harness::new(&c, &f);
    h.map(relation(
        OID,
        "users",
        &[("id", INT8, true), ("uid", TEXT, false)],
    ))
    .unwrap();
    match h.map(insert(OID, &[Some("1"), None])).unwrap() {
        Some(Item::DeadLetter(d)) => assert!(d.reason.contains("uid"), "{}", d.reason),
        other => panic!("expected a dead letter, got {other:?}"),
    }
}

#[test]
fn a_renamed_identifier_column_stops_with_the_key_to_change() {
    let c = config("");
    let f = factory();
    let mut h = Harness::new(&c, &f);
    h.map(users(OID)).unwrap();
    let err = h
        .map(relation(
            OID,
            "users",
            &[
                ("id", INT8, true),
                ("uid", TEXT, false),
                ("email", TEXT, false),
                ("name", TEXT, false),
            ],
        ))
        .unwrap_err();
    let (message, hint) = (err.to_string(), err.hint());
    assert!(
        message.contains("\"user_id\"") && message.contains("renamed to \"uid\""),
        "{message}"
    );
    assert!(
        hint.contains("[mapping.identifiers] user_id = \"uid\""),
        "{hint}"
    );
    assert_eq!(err.exit_code(), crate::error::exit::PREFLIGHT);
}

#[test]
fn a_dropped_identifier_column_stops_even_when_another_identifier_remains() {
    let c = config("");
    let f = factory();
    let mut h = Harness::new(&c, &f);
    h.map(users(OID)).unwrap();
    let err = h
        .map(relation(
            OID,
            "users",
            &[
                ("id", INT8, true),
                ("email", TEXT, false),
                ("name", TEXT, false),
            ],
        ))
        .unwrap_err();
    assert!(err.to_string().contains("was dropped"), "{err}");
    assert!(
        err.hint().contains("[mapping.identifiers] user_id"),
        "{}",
        err.hint()
    );
}

#[test]
fn other_shape_changes_keep_streaming() {
    let c = config("");
    let f = factory();
    let mut h = Harness::new(&c, &f);
    h.map(users(OID)).unwrap();
    // A column added, a non-identifier one renamed.
    h.map(relation(
        OID,
        "users",
        &[
            ("id", INT8, true),
            ("user_id", TEXT, false),
            ("email", TEXT, false),
            ("full_name", TEXT, false),
            ("plan", TEXT, false),
        ],
    ))
    .unwrap();
    let e = h.event(insert(
        OID,
        &[Some("1"), Some("u_1"), None, Some("Ann"), Some("pro")],
    ));
    let traits = e.traits.unwrap();
    assert_eq!(traits.get("full_name"), Some(serde_json::json!("Ann")));
    assert_eq!(traits.get("plan"), Some(serde_json::json!("pro")));
}

#[test]
fn a_change_of_the_followed_table_before_its_relation_is_an_error() {
    let c = config("");
    let f = factory();
    let mut h = Harness::new(&c, &f);
    assert!(
        h.map(insert(OID, &[Some("1"), Some("u_1"), None, None]))
            .is_err()
    );
}

/// id, user_id, email, as the catalog describes them at the start of a session.
fn catalog_shape() -> Vec<RelationColumn> {
    [
        ("id", INT8, true),
        ("user_id", TEXT, false),
        ("email", TEXT, false),
    ]
    .into_iter()
    .map(|(name, type_oid, is_key)| RelationColumn {
        is_key,
        name: name.into(),
        type_oid,
        type_modifier: -1,
    })
    .collect()
}

#[test]
fn the_catalog_shape_seeds_the_comparison_with_the_first_relation() {
    let c = config("");
    let f = factory();
    let mut h = Harness::new(&c, &f);
    h.mapper.seed_shape(catalog_shape());
    // A change streamed before any Relation message is still refused: the seed is no shape
    // to read tuples with.
    assert!(h.map(insert(OID, &[Some("1"), Some("u_1"), None])).is_err());
    let mut h = Harness::new(&c, &f);
    h.mapper.seed_shape(catalog_shape());
    let err = h
        .map(relation(
            OID,
            "users",
            &[
                ("id", INT8, true),
                ("uid", TEXT, false),
                ("email", TEXT, false),
            ],
        ))
        .unwrap_err();
    assert!(err.to_string().contains("renamed to \"uid\""), "{err}");
}
