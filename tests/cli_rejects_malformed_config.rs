//! A malformed config file stops `check` before it connects: exit code 2 and one message that
//! names the key at fault. No cluster is needed.

use crate::support;

const VALID: &str = r#"name = "malformed"

[source]
host = "127.0.0.1"
port = 5432
database = "app"
user = "rudder"
password = "pw"
table = "users"

[destination]
type = "stdout"
"#;

/// Writes `text` as a config file and runs `check` on it.
fn check_config(text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("slotstream.toml");
    std::fs::write(&path, text).unwrap();
    support::run_slotstream(&["check", "--config", path.to_str().unwrap()])
}

/// Exit 2, nothing checked, and stderr names every one of `needles`.
fn assert_rejected(text: &str, needles: &[&str]) {
    let (code, stdout, stderr) = check_config(text);
    assert_eq!(code, 2, "exit code\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.trim().is_empty(),
        "nothing is checked with a bad config:\n{stdout}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let first = stderr.lines().next().unwrap_or_default();
    assert!(first.starts_with("error: "), "{stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "stderr must name {needle:?}:\n{stderr}"
        );
    }
}

#[test]
fn the_valid_base_config_gets_past_config_loading() {
    // Guards the tests below: only the change each one makes is at fault. With nothing
    // listening on the port the check runs and fails at the connection (exit 3, not 2).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (code, stdout, stderr) = check_config(&VALID.replace("5432", &port.to_string()));
    assert_eq!(code, 3, "stdout:\n{stdout}\nstderr:\n{stderr}");
}

#[test]
fn unknown_key_is_rejected_by_name() {
    assert_rejected(
        &VALID.replace("table = \"users\"", "table = \"users\"\ntabel = \"users\""),
        &["tabel"],
    );
}

#[test]
fn wrong_type_is_rejected_by_name() {
    assert_rejected(&VALID.replace("port = 5432", "port = \"five\""), &["port"]);
}

#[test]
fn wrong_type_in_mapping_is_rejected_by_name() {
    assert_rejected(
        &VALID.replace(
            "[destination]",
            "[mapping]\ncolumns = \"email\"\n\n[destination]",
        ),
        &["columns"],
    );
}

#[test]
fn missing_source_section_is_rejected_by_name() {
    let text = VALID
        .split("[destination]")
        .map(|part| part.split("[source]").next().unwrap_or_default().to_owned())
        .collect::<Vec<_>>()
        .join("[destination]");
    assert!(
        !text.contains("[source]") && text.contains("[destination]"),
        "{text}"
    );
    assert_rejected(&text, &["source"]);
}

#[test]
fn bad_sslmode_is_rejected_by_name() {
    assert_rejected(
        &VALID.replace(
            "table = \"users\"",
            "table = \"users\"\nsslmode = \"maybe\"",
        ),
        &["source.sslmode", "maybe"],
    );
}
