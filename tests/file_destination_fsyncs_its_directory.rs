//! A file destination that slotstream creates survives a power loss: fsyncing the file makes
//! its data durable, but its name lives in the directory, which must be fsynced too before a
//! batch written to the new file counts as delivered. Observed for real with strace (the
//! system calls the process makes): the directory is opened and fsynced before the first
//! fdatasync of the events file.

use crate::support;

use std::collections::HashMap;
use std::process::Command;

#[tokio::test(flavor = "multi_thread")]
async fn the_directory_of_a_new_events_file_is_fsynced() {
    let fx = support::users_fixture(support::USERS_TABLE, "", None).await;
    fx.db
        .connect()
        .await
        .batch_execute("INSERT INTO users (user_id, plan) VALUES ('u1', 'free')")
        .await
        .expect("row");
    let dir = fx.dir.path().join("new-dir");
    std::fs::create_dir(&dir).expect("dir");
    let events = dir.join("events.jsonl");
    fx.set_destination_path(&events);
    let trace = fx.dir.path().join("strace.txt");
    let out = Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-e",
            "trace=openat,open,fsync,fdatasync,close",
            "-o",
        ])
        .arg(&trace)
        .arg(support::slotstream_bin())
        .args(["run", "--once", "--config"])
        .arg(&fx.config)
        .env("RUST_LOG", "warn")
        .output()
        .expect("strace (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(support::read_events(&events).len(), 1);

    // Follow the descriptors: which path each open one names, and what was synced, in order.
    let trace = std::fs::read_to_string(&trace).expect("trace");
    let quoted = |p: &std::path::Path| format!("\"{}\"", p.display());
    let (dir_name, file_name) = (quoted(&dir), quoted(&events));
    let mut open: HashMap<String, String> = HashMap::new();
    let mut synced = Vec::new();
    // A call interrupted by another thread's is printed in two parts.
    let mut unfinished: HashMap<String, String> = HashMap::new();
    for line in trace.lines() {
        // `<pid> <call>(<args>) = <result>`
        let Some((pid, call)) = line.split_once(' ') else {
            continue;
        };
        let call = call.trim_start();
        if let Some(start) = call.strip_suffix(" <unfinished ...>") {
            unfinished.insert(pid.to_owned(), start.to_owned());
            continue;
        }
        let call = match call.split_once(" resumed>") {
            Some((_, rest)) if call.starts_with("<... ") => {
                unfinished.remove(pid).unwrap_or_default() + rest
            }
            _ => call.to_owned(),
        };
        let Some((head, result)) = call.rsplit_once(" = ") else {
            continue;
        };
        let head = head.trim_end();
        let result = result.split_whitespace().next().unwrap_or("");
        if head.starts_with("openat(") || head.starts_with("open(") {
            for name in [&dir_name, &file_name] {
                if head.contains(&format!("{name},")) && !result.starts_with('-') {
                    open.insert(result.to_owned(), name.clone());
                }
            }
        } else if let Some(fd) = head
            .strip_prefix("fsync(")
            .or_else(|| head.strip_prefix("fdatasync("))
        {
            let fd = fd.trim_end_matches(')');
            if let Some(name) = open.get(fd) {
                synced.push(name.clone());
            }
        } else if let Some(fd) = head.strip_prefix("close(") {
            open.remove(fd.trim_end_matches(')'));
        }
    }
    let dir_synced = synced.iter().position(|n| *n == dir_name);
    let file_synced = synced.iter().position(|n| *n == file_name);
    assert!(
        file_synced.is_some(),
        "the events file was never synced: {synced:?}\n{}",
        trace
            .lines()
            .filter(|l| l.contains("new-dir") || l.contains("sync"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        dir_synced.is_some_and(|d| Some(d) < file_synced),
        "the directory of the new events file was not fsynced before the first batch counted as delivered: {synced:?}"
    );
}
