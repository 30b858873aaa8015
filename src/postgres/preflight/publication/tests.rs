//! Unit tests of the publication evaluation.

use super::*;
use crate::postgres::preflight::{CheckResult, Outcome};

fn config(extra: &str) -> Config {
    let text = format!(
        "name = \"p\"\n{extra}\n[source]\ndatabase = \"app\"\nuser = \"rudder\"\npassword = \"pw\"\ntable = \"users\"\npublication = \"pub\"\n[destination]\ntype = \"stdout\"\n"
    );
    Config::from_toml_str(&text, std::path::Path::new("t.toml"), Vec::new()).expect("config")
}

fn publication() -> Publication {
    Publication {
        name: "pub".into(),
        all_tables: false,
        insert: true,
        update: true,
        delete: true,
        truncate: true,
        via_root: true,
        listed: true,
        row_filter: None,
        published_columns: Vec::new(),
        leaves_listed: 0,
        others: Vec::new(),
    }
}

fn facts(partitioned: bool, publication: Option<Publication>) -> Facts {
    Facts {
        columns: ["id", "user_id", "name", "plan"].map(String::from).to_vec(),
        partitioned,
        publication,
    }
}

fn evaluate(config: &Config, facts: &Facts) -> Vec<CheckResult> {
    let mut report = Report::default();
    Requirements {
        config,
        version_num: 150_000,
        configured: None,
        replica_identity: None,
    }
    .evaluate(facts, &mut report);
    report.results
}

fn failures(results: &[CheckResult]) -> Vec<(String, Vec<Fix>)> {
    results
        .iter()
        .filter(|r| r.outcome == Outcome::Fail)
        .map(|r| (r.message.clone(), r.fixes.clone()))
        .collect()
}

#[test]
fn a_partitioned_table_must_be_published_through_its_root() {
    let c = config("");
    let leaves = Publication {
        via_root: false,
        listed: false,
        leaves_listed: 2,
        ..publication()
    };
    assert_eq!(
        failures(&evaluate(&c, &facts(true, Some(leaves)))),
        vec![(
            "publication \"pub\" publishes the partitions of \"public\".\"users\" under their own names, so their changes would not arrive as changes of \"public\".\"users\"".to_owned(),
            vec![Fix::Sql("ALTER PUBLICATION \"pub\" SET (publish_via_partition_root = true);".into())]
        )]
    );
    let absent = Publication {
        via_root: false,
        listed: false,
        ..publication()
    };
    assert_eq!(
        failures(&evaluate(&c, &facts(true, Some(absent)))),
        vec![(
            "publication \"pub\" does not publish table \"public\".\"users\"".to_owned(),
            vec![
                Fix::Sql("ALTER PUBLICATION \"pub\" ADD TABLE \"public\".\"users\";".into()),
                Fix::Sql(
                    "ALTER PUBLICATION \"pub\" SET (publish_via_partition_root = true);".into()
                ),
            ]
        )]
    );
    let missing = failures(&evaluate(&c, &facts(true, None)));
    assert_eq!(
        missing[0].1[0],
        Fix::Sql("CREATE PUBLICATION \"pub\" FOR TABLE \"public\".\"users\" WITH (publish_via_partition_root = true);".into())
    );
    assert!(failures(&evaluate(&c, &facts(true, Some(publication())))).is_empty());
}

#[test]
fn deletes_are_needed_only_in_mirror_mode() {
    let no_delete = Publication {
        delete: false,
        ..publication()
    };
    let upsert = config("");
    assert!(failures(&evaluate(&upsert, &facts(false, Some(no_delete.clone())))).is_empty());
    let mirror = config("[sync]\nmode = \"mirror\"");
    assert_eq!(
        failures(&evaluate(&mirror, &facts(false, Some(no_delete))))[0].0,
        "publication \"pub\" publishes insert, update, truncate, but mirror mode needs delete too"
    );
}

#[test]
fn a_column_list_must_hold_the_selected_and_identifier_columns() {
    let c = config("[mapping]\ncolumns = [\"name\"]");
    let list = |cols: &[&str]| Publication {
        published_columns: cols.iter().map(|c| (*c).to_owned()).collect(),
        ..publication()
    };
    // No list: every column is published.
    let all = list(&["id", "user_id", "name", "plan"]);
    assert!(failures(&evaluate(&c, &facts(false, Some(all)))).is_empty());
    let covering = list(&["id", "user_id", "name"]);
    assert!(failures(&evaluate(&c, &facts(false, Some(covering)))).is_empty());
    let narrow = list(&["id", "name"]);
    assert_eq!(
        failures(&evaluate(&c, &facts(false, Some(narrow))))[0].0,
        "publication \"pub\" publishes only the columns \"id\", \"name\" of \"public\".\"users\" and leaves out \"user_id\", which the mapping reads"
    );
}

#[test]
fn needed_columns_are_the_selected_then_the_identifiers() {
    let columns = ["id", "email", "user_id", "name"].map(String::from);
    assert_eq!(
        needed_columns(
            &config("[mapping]\ncolumns = [\"name\", \"gone\"]"),
            &columns
        ),
        ["name", "user_id", "email"].map(String::from).to_vec()
    );
    assert_eq!(needed_columns(&config(""), &columns), columns.to_vec());
}

#[test]
fn fallback_filter_comparison_ignores_spacing_and_parentheses() {
    assert_eq!(
        normalise_filter("(deleted_at IS NULL)"),
        normalise_filter("deleted_at  IS NULL")
    );
    assert_ne!(normalise_filter("a = 1"), normalise_filter("a = 2"));
}
