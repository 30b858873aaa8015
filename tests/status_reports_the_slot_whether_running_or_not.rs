//! `slotstream status --json`, as the pipeline's own role, with the daemon stopped and running:
//! the output follows docs/status.schema.json (every property it lists, of its type, and no
//! other), says whether a run is live and by which process, which walsender holds the slot,
//! the lag in bytes and seconds, the checkpoint and when it was written. On a cluster with
//! `max_slot_wal_keep_size`, it gives the safe WAL left, the WAL rate and the forecast of
//! invalidation. The human table says the same.

use crate::support;
use crate::support::faults;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

fn schema() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/status.schema.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("schema")).expect("schema JSON")
}

fn type_matches(v: &Value, ty: &str) -> bool {
    match ty {
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        other => panic!("schema type {other}"),
    }
}

/// Checks `v` against the subset of JSON Schema the status schema uses: type, required,
/// additionalProperties = false, properties, items, enum.
fn conforms(v: &Value, s: &Value, at: &str) {
    if let Some(ty) = s.get("type") {
        let types: Vec<&str> = match ty {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => panic!("type at {at}"),
        };
        assert!(
            types.iter().any(|t| type_matches(v, t)),
            "{at}: {v} is not of type {types:?}"
        );
    }
    if let Some(allowed) = s.get("enum").and_then(Value::as_array) {
        assert!(allowed.contains(v), "{at}: {v} not in {allowed:?}");
    }
    if let (Some(obj), Some(props)) = (
        v.as_object(),
        s.get("properties").and_then(Value::as_object),
    ) {
        for req in s["required"].as_array().into_iter().flatten() {
            let k = req.as_str().expect("required key");
            assert!(obj.contains_key(k), "{at}: missing {k}");
        }
        for (k, val) in obj {
            let sub = props
                .get(k)
                .unwrap_or_else(|| panic!("{at}.{k} is not documented in docs/status.schema.json"));
            conforms(val, sub, &format!("{at}.{k}"));
        }
    }
    if let (Some(items), Some(s_items)) = (v.as_array(), s.get("items")) {
        for (i, item) in items.iter().enumerate() {
            conforms(item, s_items, &format!("{at}[{i}]"));
        }
    }
}

fn status_json(fx: &support::Fixture) -> Value {
    let (code, out, err) = fx.slotstream("status", &["--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    conforms(&v, &schema(), "status");
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn status_json_follows_its_schema_with_the_daemon_stopped_and_running() {
    let cluster = support::cluster_with(&[("max_slot_wal_keep_size", "64MB")]);
    let fx = support::users_fixture_in(&cluster, support::USERS_TABLE, "", None).await;
    let c = fx.db.connect().await;
    c.batch_execute(
        "INSERT INTO users (user_id, plan) SELECT 'u' || g, 'free' FROM generate_series(1, 5) g",
    )
    .await
    .unwrap();
    fx.run_once();

    let stopped = status_json(&fx);
    assert_eq!(stopped["running"], false, "{stopped:#}");
    assert_eq!(stopped["run_pid"], Value::Null);
    assert_eq!(stopped["slot_exists"], true);
    assert_eq!(stopped["slot_active"], false);
    assert_eq!(stopped["slot_active_pid"], Value::Null);
    assert_eq!(stopped["full_sync"], "done");
    assert!(stopped["checkpoint_lsn"].is_string(), "{stopped:#}");
    assert!(
        stopped["checkpoint_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    assert!(stopped["lag_bytes"].as_i64().is_some_and(|l| l >= 0));
    assert_eq!(stopped["lag_seconds"], 0.0, "caught up: {stopped:#}");
    let safe = stopped["safe_wal_size_bytes"]
        .as_i64()
        .expect("a limit is set");
    // Counted from the slot's WAL segment: up to one segment (16 MB) over the setting.
    assert!(safe > 0 && safe <= 80 << 20, "{safe}");
    assert!(
        stopped["retained_wal_bytes"]
            .as_i64()
            .is_some_and(|r| r >= 0)
    );
    assert!(
        stopped["wal_rate_bytes_per_second"].is_number(),
        "{stopped:#}"
    );

    let (mut run, walsender) = faults::spawn_streaming(&fx, &c).await;
    // WAL written while it runs: the forecast has a rate to work from.
    let writer = {
        let c2 = fx.db.connect().await;
        tokio::spawn(async move {
            for i in 0..40 {
                c2.batch_execute(&format!(
                    "INSERT INTO users (user_id, name, plan) SELECT 'w{i}_' || g, repeat('x', 300), 'pro' FROM generate_series(1, 200) g"
                ))
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let running = status_json(&fx);
    writer.await.unwrap();
    assert_eq!(running["running"], true, "{running:#}");
    assert_eq!(running["run_pid"], run.id(), "{running:#}");
    assert_eq!(running["slot_active"], true);
    assert_eq!(running["slot_active_pid"], walsender, "{running:#}");
    let rate = running["wal_rate_bytes_per_second"].as_f64().expect("rate");
    assert!(rate > 0.0, "WAL was written during the sample: {running:#}");
    let left = running["invalidation_forecast_seconds"]
        .as_f64()
        .expect("forecast");
    let safe = running["safe_wal_size_bytes"].as_f64().expect("safe");
    assert!(
        (left - safe / rate).abs() <= 1.0 + left * 1e-6,
        "{running:#}"
    );

    let (code, text, err) = fx.slotstream("status", &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains(&format!("running (pid {})", run.id())),
        "{text}"
    );
    assert!(
        text.contains(&format!("walsender pid {walsender}")),
        "{text}"
    );
    assert!(text.contains("invalidation  "), "{text}");

    support::sigterm(&run);
    let status = faults::wait_exit(&mut run, Duration::from_secs(30)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", fx.run_log());
    let after = status_json(&fx);
    assert_eq!(after["running"], false);
}
