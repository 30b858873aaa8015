//! A real Prometheus scrapes a running slotstream (Kafka destination on a real broker, a
//! cluster of the test's own so that no other test's WAL moves the lag). Before the outage the
//! delivered, latency and lag series have sane values and `promtool check metrics` accepts a
//! live scrape. While the broker is down `/readyz` answers 503 with the reason, the slot lag in
//! bytes and seconds rises in Prometheus and the lag warning is logged; once the broker is back
//! `/readyz` answers 200 and the lag falls, without anyone restarting slotstream. The alert
//! rules pass `promtool check rules`, and their unit tests `promtool test rules`.

use crate::support;
use crate::support::faults::{self, Running};
use crate::support::kafka::Broker;
use crate::support::prometheus::{Prometheus, http_get, promtool};

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const TOPIC: &str = "users_metrics";
/// `[metrics] lag_warn_bytes` of the test: the outage's changes exceed it. Above 1 MiB: once
/// caught up, an idle checkpoint follows the WAL (here, the ledger's own writes) only once it
/// is 1 MiB past the stored one.
const LAG_WARN: i64 = 2 * 1024 * 1024;

fn readyz(addr: &str) -> Option<(u16, String)> {
    http_get(addr, "/readyz")
}

async fn wait_query(
    p: &Prometheus,
    fx: &support::Fixture,
    what: &str,
    promql: &str,
    ok: impl Fn(f64) -> bool,
) -> f64 {
    let mut last = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(v) = p.query(promql) {
            if ok(v) {
                return v;
            }
            last = Some(v);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}: `{promql}` last = {last:?}\n--- prometheus\n{}\n--- slotstream\n{}",
            p.log(),
            fx.run_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_sees_the_lag_rise_during_an_outage_and_fall_after() {
    let cluster = support::cluster_with(&[]);
    let broker = Broker::start();
    let fx = support::users_fixture_in(&cluster, support::USERS_TABLE, "", None).await;
    let listen = format!("127.0.0.1:{}", support::free_port());
    fx.rewrite_config(&format!(
            "[metrics]\nlisten = \"{listen}\"\npoll_interval = \"1s\"\nlag_warn_bytes = {LAG_WARN}\n\
             [destination]\ntype = \"kafka\"\nbrokers = \"{}\"\ntopic = \"{TOPIC}\"\ncreate_topic = true\n\
             [destination.librdkafka_options]\n\"message.timeout.ms\" = 2000\n\
             [destination.retry]\nmax_backoff = \"1s\"\n",
            broker.address()
        ),
    );
    let c = fx.db.connect().await;
    let mut run = Running(fx.spawn_run());
    support::wait_until(Duration::from_secs(60), "/readyz answers 200", || async {
        readyz(&listen).is_some_and(|(s, _)| s == 200)
    })
    .await;
    assert_eq!(
        http_get(&listen, "/healthz").map(|(s, _)| s),
        Some(200),
        "{}",
        fx.run_log()
    );
    let prom = Prometheus::start(&[&listen]);

    // Delivered, with sane series.
    c.batch_execute(
        "INSERT INTO users (user_id, plan) SELECT 'a' || g, 'free' FROM generate_series(1, 20) g",
    )
    .await
    .unwrap();
    wait_query(
        &prom,
        &fx,
        "the delivered events",
        "slotstream_events_delivered_total",
        |v| v >= 20.0,
    )
    .await;
    wait_query(
        &prom,
        &fx,
        "a delivery latency observation",
        "slotstream_delivery_latency_seconds_count",
        |v| v >= 1.0,
    )
    .await;
    let p99 = wait_query(
        &prom,
        &fx,
        "the latency quantile",
        "histogram_quantile(0.99, slotstream_delivery_latency_seconds_bucket)",
        |v| v.is_finite(),
    )
    .await;
    assert!(p99 > 0.0 && p99 <= 30.0, "p99 delivery latency {p99} s");
    wait_query(
        &prom,
        &fx,
        "the insert count",
        "slotstream_changes_received_total{op=\"insert\"}",
        |v| v == 20.0,
    )
    .await;
    let lag_before = wait_query(
        &prom,
        &fx,
        "a small lag once delivered",
        "slotstream_slot_lag_bytes",
        |v| (0.0..LAG_WARN as f64).contains(&v),
    )
    .await;
    wait_query(&prom, &fx, "ready", "slotstream_ready", |v| v == 1.0).await;
    assert_eq!(prom.query("slotstream_slot_active"), Some(1.0));
    assert_eq!(
        prom.query("slotstream_slot_wal_status{status=\"reserved\"}"),
        Some(1.0)
    );
    assert_eq!(
        prom.query("slotstream_full_sync_state{state=\"done\"}"),
        Some(1.0)
    );

    // A live scrape passes promtool's checks.
    let (_, scrape) = http_get(&listen, "/metrics").expect("scrape");
    check_metrics_with_promtool(&scrape);

    // The outage.
    broker.stop();
    for t in 0..10 {
        c.batch_execute(&format!(
            "INSERT INTO users (user_id, name, plan)
             SELECT 'b{t}_' || g, repeat('x', 400), 'free' FROM generate_series(1, 1000) g"
        ))
        .await
        .unwrap();
    }
    support::wait_until(
        Duration::from_secs(60),
        "/readyz answers 503 naming the destination",
        || async {
            readyz(&listen).is_some_and(|(s, body)| s == 503 && body.contains("destination"))
        },
    )
    .await;
    let lag_peak = wait_query(
        &prom,
        &fx,
        "the lag to rise past lag_warn_bytes",
        "slotstream_slot_lag_bytes",
        |v| v > LAG_WARN as f64,
    )
    .await;
    assert!(lag_peak > lag_before);
    wait_query(
        &prom,
        &fx,
        "the source lag in seconds",
        "slotstream_source_lag_seconds",
        |v| v >= 1.0,
    )
    .await;
    wait_query(&prom, &fx, "not ready", "slotstream_ready", |v| v == 0.0).await;
    wait_query(
        &prom,
        &fx,
        "destination errors",
        "slotstream_destination_errors_total{kind=\"kafka\"}",
        |v| v >= 1.0,
    )
    .await;
    assert!(
        fx.run_log()
            .contains("holds back more WAL than lag_warn_bytes"),
        "the lag warning was logged\n{}",
        fx.run_log()
    );
    assert!(run.try_wait().unwrap().is_none(), "{}", fx.run_log());

    // Back (empty: its storage was in memory): recovers by itself.
    broker.resume();
    crate::support::kafka::create_topic(&broker.address(), TOPIC).await;
    support::wait_until(
        Duration::from_secs(90),
        "/readyz answers 200 again",
        || async { readyz(&listen).is_some_and(|(s, _)| s == 200) },
    )
    .await;
    wait_query(
        &prom,
        &fx,
        "everything delivered",
        "slotstream_events_delivered_total",
        |v| v >= 10_020.0,
    )
    .await;
    wait_query(
        &prom,
        &fx,
        "the lag to fall under lag_warn_bytes",
        "slotstream_slot_lag_bytes",
        |v| v < LAG_WARN as f64,
    )
    .await;
    wait_query(
        &prom,
        &fx,
        "no source lag",
        "slotstream_source_lag_seconds",
        |v| v == 0.0,
    )
    .await;
    wait_query(&prom, &fx, "ready again", "slotstream_ready", |v| v == 1.0).await;
    assert!(
        prom.query("slotstream_delivery_retries_total")
            .is_some_and(|v| v >= 1.0)
    );
    assert!(
        fx.run_log().contains("back under lag_warn_bytes"),
        "{}",
        fx.run_log()
    );

    support::sigterm(&run);
    let status = faults::wait_exit(&mut run, Duration::from_secs(30)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", fx.run_log());
    assert!(
        http_get(&listen, "/healthz").is_none(),
        "the endpoint ends with the run"
    );
}

fn check_metrics_with_promtool(scrape: &str) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(scrape.as_bytes())
        .expect("write scrape");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n--- scrape\n{scrape}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn repo_file(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    for args in [vec!["check", "rules"], vec!["test", "rules"]] {
        let file = if args[0] == "check" {
            repo_file("deploy/prometheus/alerts.yml")
        } else {
            repo_file("deploy/prometheus/alerts_test.yml")
        };
        let out = Command::new(promtool())
            .args(&args)
            .arg(&file)
            .current_dir(repo_file("deploy/prometheus"))
            .output()
            .expect("promtool");
        assert!(
            out.status.success(),
            "promtool {args:?} {}:\n{}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_dashboard_is_valid_json_over_exported_series() {
    let text =
        std::fs::read_to_string(repo_file("deploy/grafana/slotstream.json")).expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6, "{} panels", panels.len());
    // Every series a panel queries is one slotstream exports (README lists them).
    let readme = std::fs::read_to_string(repo_file("README.md")).expect("README");
    for p in panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("expr");
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("slotstream_"))
            {
                let base = name
                    .trim_end_matches("_bucket")
                    .trim_end_matches("_count")
                    .trim_end_matches("_sum");
                assert!(
                    readme.contains(&format!("`{base}`")),
                    "panel {:?} queries {name}, which the README does not list",
                    p["title"]
                );
            }
        }
    }
}
