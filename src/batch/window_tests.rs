use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use serde_json::{Map, Value, json};

use super::*;
use crate::Lsn;
use crate::batch::ledger::{Outcome, Rules, Sent, decide};
use crate::transform::event::{EventFactory, Stamp};
use crate::transform::{EventKind, Op, ProjectedRow, Traits};

fn factory() -> EventFactory {
    EventFactory::new("p", "public", "users")
}

fn key(k: u8) -> String {
    format!("[\"{k}\"]")
}

/// An identify of row `k` for `user`; `name: None` leaves the name out (unchanged TOAST).
fn identify(n: u64, op: Op, k: u8, user: &str, plan: i64, name: Option<&str>) -> Row {
    let traits = Traits::from_entries([
        ("plan".to_owned(), Some(json!(plan))),
        ("name".to_owned(), name.map(|s| json!(s))),
    ]);
    let row = ProjectedRow {
        user_id: Some(user.to_owned()),
        anonymous_id: None,
        traits,
    };
    let stamp = Stamp::new(Lsn(n), "2026-01-01T00:00:00Z");
    let id = crate::transform::event::stream_message_id("p", Lsn(n), 1);
    Row {
        event: factory().identify(row, op, &stamp, id),
        key: Some(key(k)),
        old_key: None,
        fresh: false,
        traits_hash: None,
    }
}

/// A key-only delete of row `k` (default replica identity: no identifier in it).
fn delete(n: u64, k: u8) -> Row {
    let row = ProjectedRow {
        user_id: None,
        anonymous_id: None,
        traits: Traits::default(),
    };
    let stamp = Stamp::new(Lsn(n), "2026-01-01T00:00:00Z");
    let id = crate::transform::event::stream_message_id("p", Lsn(n), 1);
    Row {
        event: factory().deleted(row, &stamp, id),
        key: Some(key(k)),
        old_key: None,
        fresh: false,
        traits_hash: None,
    }
}

const MIRROR: Rules = Rules {
    mirror: true,
    ledger: true,
    resend_snapshot: true,
};

#[test]
fn ten_updates_to_one_row_become_one_event_with_the_last_state() {
    let mut c = Coalescer::new();
    for i in 0..10 {
        c.add(identify(i + 1, Op::Update, 1, "u1", i as i64, Some("Ann")));
    }
    assert_eq!(c.rows(), 10);
    let (rows, moved) = c.take();
    assert!(moved.is_empty());
    assert_eq!(rows.len(), 1);
    let row = &rows[0].1;
    assert_eq!(
        row.event
            .traits
            .as_ref()
            .map(|t| t.get("plan").expect("plan")),
        Some(json!(9))
    );
    // The messageId of the last change kept.
    assert_eq!(
        row.event.message_id,
        crate::transform::event::stream_message_id("p", Lsn(10), 1)
    );
    assert!(c.is_empty() && c.bytes() == 0);
}

#[test]
fn a_partial_update_merges_into_the_earlier_state() {
    let mut c = Coalescer::new();
    c.add(identify(1, Op::Update, 1, "u1", 1, Some("Ann")));
    c.add(identify(2, Op::Update, 1, "u1", 2, None));
    let (rows, _) = c.take();
    let traits = rows[0].1.event.traits.clone().expect("traits");
    assert!(!traits.is_partial());
    assert_eq!(traits.get("plan").expect("plan"), json!(2));
    assert_eq!(traits.get("name").expect("name"), json!("Ann"));
}

#[test]
fn insert_then_delete_in_a_window_sends_nothing_but_a_known_row_gets_record_deleted() {
    let mut c = Coalescer::new();
    c.add(identify(1, Op::Insert, 1, "u1", 1, Some("Ann")));
    c.add(delete(2, 1));
    let (rows, _) = c.take();
    let (_, row) = rows.into_iter().next().expect("one entry");
    assert!(row.fresh);
    for ledger in [true, false] {
        let rules = Rules { ledger, ..MIRROR };
        let d = decide(row.clone(), None, None, rules);
        assert!(d.events.is_empty(), "ledger {ledger}: {:?}", d.events);
        assert_eq!(d.outcome, Outcome::Skipped);
    }
    // The destination had row 2: the key-only delete is named by the ledger.
    let mut c = Coalescer::new();
    c.add(identify(3, Op::Update, 2, "u2", 1, Some("Bob")));
    c.add(delete(4, 2));
    let (rows, _) = c.take();
    let sent = Sent {
        user_id: Some("u2".into()),
        anonymous_id: None,
        hash: None,
    };
    let d = decide(rows[0].1.clone(), Some(&sent), None, MIRROR);
    assert_eq!(d.outcome, Outcome::Sent);
    assert_eq!(d.events.len(), 1);
    assert_eq!(d.events[0].kind, EventKind::Track);
    assert_eq!(d.events[0].user_id.as_deref(), Some("u2"));
    assert_eq!(
        d.events[0].properties.as_ref().map(|p| p["userId"].clone()),
        Some(json!("u2"))
    );
    assert_eq!(d.writes, vec![(key(2), None)]);
    // Without a ledger, a key-only delete cannot name the user.
    let rules = Rules {
        ledger: false,
        ..MIRROR
    };
    assert_eq!(
        decide(rows[0].1.clone(), None, None, rules).outcome,
        Outcome::Unidentified
    );
}

#[test]
fn an_update_that_changes_nothing_sends_nothing_and_a_new_user_retires_the_old_one() {
    let first = identify(1, Op::Insert, 1, "u1", 1, Some("Ann"));
    let d = decide(first.clone(), None, None, MIRROR);
    let (_, Some(sent)) = d.writes[0].clone() else {
        panic!("an entry")
    };
    let same = identify(2, Op::Update, 1, "u1", 1, Some("Ann"));
    let d = decide(same, Some(&sent), None, MIRROR);
    assert_eq!(d.outcome, Outcome::Unchanged);
    assert!(d.events.is_empty());
    // A full sync re-sends all the same; `resync --changed-only` does not.
    let snap = identify(3, Op::Snapshot, 1, "u1", 1, Some("Ann"));
    assert_eq!(
        decide(snap.clone(), Some(&sent), None, MIRROR).outcome,
        Outcome::Sent
    );
    let changed_only = Rules {
        resend_snapshot: false,
        ..MIRROR
    };
    assert_eq!(
        decide(snap, Some(&sent), None, changed_only).outcome,
        Outcome::Unchanged
    );
    // user_id changed: mirror retires u1 first.
    let moved = identify(4, Op::Update, 1, "u9", 1, Some("Ann"));
    let d = decide(moved.clone(), Some(&sent), None, MIRROR);
    let kinds: Vec<_> = d
        .events
        .iter()
        .map(|e| (e.kind, e.user_id.clone()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (EventKind::Track, Some("u1".into())),
            (EventKind::Identify, Some("u9".into()))
        ]
    );
    assert_ne!(d.events[0].message_id, d.events[1].message_id);
    // Upsert: only the identify.
    let upsert = Rules {
        mirror: false,
        ..MIRROR
    };
    assert_eq!(decide(moved, Some(&sent), None, upsert).events.len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Property: coalesced windows leave the destination as the uncoalesced stream does.
// ---------------------------------------------------------------------------------------------

/// A destination: profiles by user; identify merges traits, `Record Deleted` removes.
#[derive(Debug, Default, PartialEq)]
struct Destination(BTreeMap<String, Map<String, Value>>);

impl Destination {
    fn apply(&mut self, e: &crate::transform::Event) {
        let Some(user) = e.user_id.clone() else {
            return;
        };
        match e.kind {
            EventKind::Identify => {
                let profile = self.0.entry(user).or_default();
                if let Some(t) = &e.traits {
                    for (k, v) in t.clone().into_map() {
                        profile.insert(k, v);
                    }
                }
            }
            EventKind::Track => {
                self.0.remove(&user);
            }
        }
    }
}

/// One generated intent; interpreted against the table so that every change is valid.
#[derive(Debug, Clone)]
struct Intent {
    what: u8,
    key: u8,
    other: u8,
    plan: i64,
    window_ends: bool,
}

fn intents() -> impl Strategy<Value = Vec<Intent>> {
    prop::collection::vec(
        (0u8..5, 0u8..4, 0u8..4, 0i64..3, prop::bool::weighted(0.25)).prop_map(
            |(what, key, other, plan, window_ends)| Intent {
                what,
                key,
                other,
                plan,
                window_ends,
            },
        ),
        1..40,
    )
}

/// The table: key → (user, plan, name). Users are unique per row (a unique user_id column).
type Table = BTreeMap<u8, (String, i64, String)>;

/// Turns intents into valid changes (and window ends), and returns the final table.
fn changes(intents: &[Intent]) -> (Vec<(Row, bool)>, Table) {
    let mut table = Table::new();
    let mut out = Vec::new();
    let mut next_user = 0;
    for (n, i) in intents.iter().enumerate() {
        let n = n as u64 + 1;
        let k = i.key;
        let fresh_user = |next_user: &mut u32| {
            *next_user += 1;
            format!("u{next_user}")
        };
        let row = match (i.what, table.get(&k).cloned()) {
            (0, None) | (1, None) => {
                let user = fresh_user(&mut next_user);
                let name = format!("n{n}");
                table.insert(k, (user.clone(), i.plan, name.clone()));
                identify(n, Op::Insert, k, &user, i.plan, Some(&name))
            }
            (0, Some((user, _, name))) => {
                // A full update, same user.
                table.insert(k, (user.clone(), i.plan, name.clone()));
                identify(n, Op::Update, k, &user, i.plan, Some(&name))
            }
            (1, Some((user, _, name))) => {
                // A partial update: the name is TOASTed and unchanged.
                table.insert(k, (user.clone(), i.plan, name));
                identify(n, Op::Update, k, &user, i.plan, None)
            }
            (2, Some((_, plan, name))) => {
                // The row's user_id changes.
                let user = fresh_user(&mut next_user);
                table.insert(k, (user.clone(), plan, name.clone()));
                identify(n, Op::Update, k, &user, plan, Some(&name))
            }
            (3, Some(_)) => {
                table.remove(&k);
                delete(n, k)
            }
            (4, Some((user, plan, name))) if !table.contains_key(&i.other) => {
                // The key columns change.
                table.remove(&k);
                table.insert(i.other, (user.clone(), plan, name.clone()));
                let mut row = identify(n, Op::Update, i.other, &user, plan, Some(&name));
                row.old_key = Some(key(k));
                row
            }
            _ => continue,
        };
        out.push((row, i.window_ends));
    }
    (out, table)
}

fn apply_decision(
    row: Row,
    moved_from: Option<Sent>,
    ledger: &mut HashMap<String, Sent>,
    dest: &mut Destination,
    rules: Rules,
) {
    let current = row.key.as_ref().and_then(|k| ledger.get(k)).cloned();
    let d = decide(row, current.as_ref(), moved_from.as_ref(), rules);
    for e in &d.events {
        dest.apply(e);
    }
    for (k, w) in d.writes {
        match w {
            Some(s) => {
                ledger.insert(k, s);
            }
            None => {
                ledger.remove(&k);
            }
        }
    }
}

/// Delivers a window as the deliverer does: moved rows first, then by key.
fn deliver_window(
    c: &mut Coalescer,
    ledger: &mut HashMap<String, Sent>,
    dest: &mut Destination,
    rules: Rules,
) {
    let (rows, _) = c.take();
    // First every moved row's old entry leaves the ledger, then the rows are decided.
    let moved: Vec<Option<Sent>> = rows
        .iter()
        .map(|(_, r)| r.old_key.as_ref().and_then(|k| ledger.remove(k)))
        .collect();
    for ((_, row), moved_from) in rows.into_iter().zip(moved) {
        apply_decision(row, moved_from, ledger, dest, rules);
    }
}

fn truth(table: &Table) -> Destination {
    let mut d = Destination::default();
    for (user, plan, name) in table.values() {
        let mut m = Map::new();
        m.insert("plan".into(), json!(plan));
        m.insert("name".into(), json!(name));
        d.0.insert(user.clone(), m);
    }
    d
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn coalesced_windows_give_the_same_destination_as_every_change(intents in intents()) {
        let (changes, table) = changes(&intents);
        // Every change, one by one.
        let mut ledger = HashMap::new();
        let mut every = Destination::default();
        for (row, _) in &changes {
            let moved_from = row.old_key.as_ref().and_then(|k| ledger.remove(k));
            apply_decision(row.clone(), moved_from, &mut ledger, &mut every, MIRROR);
        }
        // Windows.
        let mut ledger = HashMap::new();
        let mut windowed = Destination::default();
        let mut c = Coalescer::new();
        for (row, ends) in &changes {
            c.add(row.clone());
            if *ends {
                deliver_window(&mut c, &mut ledger, &mut windowed, MIRROR);
            }
        }
        deliver_window(&mut c, &mut ledger, &mut windowed, MIRROR);
        prop_assert_eq!(&every, &truth(&table));
        prop_assert_eq!(&windowed, &truth(&table));
        // The ledger holds exactly the table's keys.
        let mut keys: Vec<_> = ledger.keys().cloned().collect();
        keys.sort();
        let expected: Vec<_> = table.keys().map(|k| key(*k)).collect();
        prop_assert_eq!(keys, expected);
    }

    #[test]
    fn upsert_windows_leave_every_row_s_latest_state(intents in intents()) {
        let (changes, table) = changes(&intents);
        let rules = Rules { mirror: false, ..MIRROR };
        let mut ledger = HashMap::new();
        let mut dest = Destination::default();
        let mut c = Coalescer::new();
        for (row, ends) in &changes {
            c.add(row.clone());
            if *ends {
                deliver_window(&mut c, &mut ledger, &mut dest, rules);
            }
        }
        deliver_window(&mut c, &mut ledger, &mut dest, rules);
        for (user, profile) in truth(&table).0 {
            prop_assert_eq!(dest.0.get(&user), Some(&profile), "{}", user);
        }
    }
}
