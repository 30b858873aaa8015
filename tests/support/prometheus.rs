//! A real Prometheus server (Debian's `prometheus` package, installed by scripts/test.sh)
//! scraping slotstream's endpoint every second, its query API, `promtool`, and a plain HTTP GET
//! for the endpoint itself.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `name` from PATH or /usr/bin, with a clear message when it is missing.
fn binary(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!("{name} is not installed: scripts/test.sh installs Debian's prometheus package")
    })
}

/// `promtool`.
pub fn promtool() -> PathBuf {
    binary("promtool")
}

/// `GET http://{addr}{path}` (HTTP/1.0, so the answer is never chunked): (status, body).
/// `None` when nothing answers.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// `s` with every byte outside the unreserved set percent-encoded (a query parameter).
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server of the test's own, stopped when dropped.
pub struct Prometheus {
    /// `127.0.0.1:port` of its web API.
    pub address: String,
    child: Child,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`host:port`) every second, and waits until it is
    /// ready.
    pub fn start(targets: &[&str]) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("slotstream-prometheus-")
            .tempdir()
            .expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        let list = targets
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: slotstream\n    static_configs:\n      - targets: [{list}]\n"
            ),
        )
        .expect("prometheus.yml");
        let address = format!("127.0.0.1:{}", super::free_port());
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new(binary("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        let p = Prometheus {
            address,
            child,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while http_get(&p.address, "/-/ready").is_none_or(|(s, _)| s != 200) {
            assert!(
                Instant::now() < deadline,
                "prometheus did not become ready:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    /// Its log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The value of the instant query `promql` (its first series), if it has one.
    pub fn query(&self, promql: &str) -> Option<f64> {
        let (status, body) = http_get(
            &self.address,
            &format!("/api/v1/query?query={}", url_encode(promql)),
        )?;
        if status != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let first = v["data"]["result"].as_array()?.first()?;
        first["value"][1].as_str()?.parse().ok()
    }

    /// The health of its scrape of slotstream (`up`).
    pub fn target_up(&self) -> bool {
        self.query("up{job=\"slotstream\"}") == Some(1.0)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
