//! A real Kafka-API broker for the Kafka sink's tests: `tansu` with its in-memory storage, one
//! per test binary ([`broker`]) or owned by a test that stops and restarts it
//! ([`Broker::start`]). `scripts/test.sh` installs tansu when missing. Records are read back
//! with rdkafka's consumer; tansu's memory engine may report wrong high-watermark offsets, so
//! the tests count the records they consume and never trust offsets.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// The tansu binary: on PATH, else where `cargo install` puts it.
pub fn tansu_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("tansu");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .expect("HOME or CARGO_HOME");
    let candidate = home.join("bin").join("tansu");
    assert!(
        candidate.is_file(),
        "the Kafka broker `tansu` is not installed: run scripts/test.sh, or `cargo install tansu --locked --features dynostore`"
    );
    candidate
}

/// A running tansu broker on 127.0.0.1.
pub struct Broker {
    /// Its port.
    pub port: u16,
    child: Mutex<Option<Child>>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

static SHARED: OnceLock<Broker> = OnceLock::new();

/// The broker of this test binary, started on first use. Tests on it use a topic of their own.
pub fn broker() -> &'static Broker {
    SHARED.get_or_init(Broker::start)
}

impl Broker {
    /// Starts a broker of the test's own (stopped when dropped).
    pub fn start() -> Broker {
        let dir = tempfile::Builder::new()
            .prefix("slotstream-tansu-")
            .tempdir()
            .expect("tempdir");
        let broker = Broker {
            port: super::free_port(),
            child: Mutex::new(None),
            log: dir.path().join("tansu.log"),
            _dir: dir,
        };
        broker.resume();
        broker
    }

    /// `host:port` for `brokers`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the broker (SIGKILL): connections drop at once, its memory storage is gone.
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().expect("broker").take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker (again) on the same port and waits until it takes connections.
    pub fn resume(&self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("broker log");
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn tansu");
        spawn_watchdog(child.id());
        *self.child.lock().expect("broker") = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {}:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The broker's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Kills `pid` once this test process is gone (a static broker is never dropped).
fn spawn_watchdog(pid: u32) {
    use std::os::unix::process::CommandExt;
    let me = std::process::id();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "while kill -0 {me} 2>/dev/null && kill -0 {pid} 2>/dev/null; do sleep 1; done; kill -9 {pid} 2>/dev/null"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    #[allow(clippy::zombie_processes)]
    cmd.spawn().expect("watchdog");
}

/// One consumed record.
#[derive(Debug, Clone)]
pub struct Record {
    /// Partition.
    pub partition: i32,
    /// Key, as text.
    pub key: Option<String>,
    /// Value as JSON; `None` for a tombstone.
    pub value: Option<serde_json::Value>,
    /// Headers, as text.
    pub headers: Vec<(String, String)>,
}

impl Record {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads a topic from the beginning of each partition.
pub struct TopicReader {
    consumer: BaseConsumer,
    /// Every record read so far, in the order read (each partition's order kept).
    pub records: Vec<Record>,
}

impl TopicReader {
    /// A reader of `partitions` partitions of `topic` on `brokers`.
    pub fn new(brokers: &str, topic: &str, partitions: i32) -> TopicReader {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("test-{topic}"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .expect("consumer");
        let mut list = TopicPartitionList::new();
        for p in 0..partitions {
            list.add_partition_offset(topic, p, Offset::Beginning)
                .expect("partition");
        }
        consumer.assign(&list).expect("assign");
        TopicReader {
            consumer,
            records: Vec::new(),
        }
    }

    /// Reads until `want` records were read in all, or `timeout` passes; returns how many
    /// were read in all.
    pub fn read_until(&mut self, want: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        while self.records.len() < want && Instant::now() < deadline {
            if let Some(Ok(m)) = self.consumer.poll(Duration::from_millis(100)) {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_owned(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                self.records.push(Record {
                    partition: m.partition(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    value: m
                        .payload()
                        .map(|p| serde_json::from_slice(p).expect("record value is JSON")),
                    headers,
                });
            }
        }
        self.records.len()
    }
}

/// Creates `topic` (one partition) on the broker at `address`; one that is already there (the
/// broker creates topics itself) is fine.
pub async fn create_topic(address: &str, topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", address)
        .create()
        .expect("admin client");
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(1));
    let _ = admin
        .create_topics([&new], &AdminOptions::new())
        .await
        .expect("create topic");
}
