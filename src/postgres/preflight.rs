//! `slotstream check`: every requirement of one pipeline, checked as the configured role, one
//! line each, with the SQL or setting that fixes each failure printed under it.
//!
//! ```text
//! ✓ connected to 127.0.0.1:5432 as "rudder", database "app" (PostgreSQL 15.18)
//! ✗ wal_level is replica, but logical replication needs wal_level = logical
//!     ALTER SYSTEM SET wal_level = logical;
//!     → then restart PostgreSQL: wal_level takes effect only at server start
//! ! publication "p" also publishes 2 other tables (public.a, public.b): …
//! 12 checks passed, 1 failed, 1 warning
//! ```
//!
//! `✓` passed, `✗` failed, `!` a warning that does not fail the check. Indented lines under a
//! mark are its fix: bare lines are SQL to run as it is (every identifier quoted with
//! [`quote_ident`]), lines starting with `→` are steps in words.
//!
//! Everything is read from catalogs and functions any role may use (`pg_settings`,
//! `pg_replication_slots`, `pg_stat_replication`, `pg_roles`, `pg_publication*`,
//! `has_*_privilege`), so the answers are the configured role's own.
//!
//! # Comparing row filters
//!
//! The server stores a publication's row filter as a parse tree and shows it deparsed
//! (`pg_publication_tables.rowfilter`): `deleted_at IS NULL` reads back as
//! `(deleted_at IS NULL)`, and `plan = 'pro'` on a varchar column as
//! `((plan)::text = 'pro'::text)`. Text comparison cannot see through that, so the configured
//! filter is deparsed by the same server code: inside a transaction that is always rolled back,
//! a temporary table `LIKE` the followed table (same column names and types, so the same
//! implicit casts) gets the filter as a CHECK constraint, and `pg_get_expr(conbin, conrelid)` —
//! the function behind `rowfilter` — gives its canonical text, and `conkey` its columns. Nothing
//! outlives the transaction. Only when the role may not create temporary tables does the check
//! fall back to comparing the two texts with whitespace and parentheses removed, and says so.

use std::io::Write as _;

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use super::catalog::Table;
use super::tls::{TlsCause, Verification, verification};
use super::version::{MIN_SUPPORTED, PG15, PG18, SUPPORTED_RANGE};
use super::{PgError, connect, quote_ident, quote_literal, quote_qualified, target};
use crate::config::{Config, SslMode};
use crate::error::Error;
use crate::transform::mapping::Projection;

mod publication;
mod table;
mod verify;

pub use verify::Verifier;

/// The schema holding slotstream's state (docs/architecture.md §6); its name is fixed.
pub const STATE_SCHEMA: &str = "_rudderstack";

/// The state tables slotstream keeps in [`STATE_SCHEMA`] (see `postgres::state`).
const STATE_TABLES: [&str; 4] = [
    "cdc_checkpoints",
    "cdc_sync_runs",
    "cdc_dead_letters",
    "cdc_schema_migrations",
];

/// PostgreSQL 13: `pg_replication_slots.wal_status`.
const PG13: i32 = 130_000;
/// PostgreSQL 10: logical replication with pgoutput.
const PG10: i32 = 100_000;

/// The result of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The requirement is met.
    Pass,
    /// Met, with a caveat worth knowing; does not fail `check`.
    Warn,
    /// Not met: `slotstream run` would fail or misbehave.
    Fail,
}

impl Outcome {
    /// The mark printed at the start of the line.
    pub fn mark(self) -> &'static str {
        match self {
            Outcome::Pass => "✓",
            Outcome::Warn => "!",
            Outcome::Fail => "✗",
        }
    }
}

/// One line of a fix, printed indented under the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fix {
    /// SQL to run as it is.
    Sql(String),
    /// A step in words (a setting to change, a restart).
    Step(String),
}

/// One checked requirement.
#[derive(Debug, Clone)]
pub struct CheckResult {
    /// Passed, warned or failed.
    pub outcome: Outcome,
    /// One sentence: what was found.
    pub message: String,
    /// How to fix it (failures and warnings).
    pub fixes: Vec<Fix>,
}

impl CheckResult {
    /// The printed form: the marked line, then each fix line indented.
    pub fn render(&self) -> String {
        let mut s = format!("{} {}", self.outcome.mark(), self.message);
        for fix in &self.fixes {
            match fix {
                Fix::Sql(sql) => {
                    s.push_str("\n    ");
                    s.push_str(sql);
                }
                Fix::Step(step) => {
                    s.push_str("\n    → ");
                    s.push_str(step);
                }
            }
        }
        s
    }
}

/// Every check that ran, in order.
#[derive(Debug, Default)]
pub struct Report {
    /// The results.
    pub results: Vec<CheckResult>,
    /// Print each result to stdout as it is recorded.
    echo: bool,
}

impl Report {
    fn push(&mut self, outcome: Outcome, message: impl Into<String>, fixes: Vec<Fix>) {
        let result = CheckResult {
            outcome,
            message: message.into(),
            fixes,
        };
        if self.echo {
            let mut out = std::io::stdout().lock();
            // A closed stdout must not turn a diagnosis into a panic.
            let _ = writeln!(out, "{}", result.render());
            let _ = out.flush();
        }
        self.results.push(result);
    }

    fn pass(&mut self, message: impl Into<String>) {
        self.push(Outcome::Pass, message, Vec::new());
    }

    fn warn(&mut self, message: impl Into<String>, fixes: Vec<Fix>) {
        self.push(Outcome::Warn, message, fixes);
    }

    fn fail(&mut self, message: impl Into<String>, fixes: Vec<Fix>) {
        self.push(Outcome::Fail, message, fixes);
    }

    fn count(&self, outcome: Outcome) -> usize {
        self.results.iter().filter(|r| r.outcome == outcome).count()
    }

    /// Checks that failed.
    pub fn failed(&self) -> usize {
        self.count(Outcome::Fail)
    }

    /// Checks that passed, warnings included.
    pub fn passed(&self) -> usize {
        self.count(Outcome::Pass) + self.count(Outcome::Warn)
    }

    /// Checks that passed with a warning.
    pub fn warnings(&self) -> usize {
        self.count(Outcome::Warn)
    }

    /// The final line: `N checks passed, M failed` (and the warnings, if any).
    pub fn summary(&self) -> String {
        let mut s = format!("{} checks passed, {} failed", self.passed(), self.failed());
        match self.warnings() {
            0 => {}
            1 => s.push_str(", 1 warning"),
            n => s.push_str(&format!(", {n} warnings")),
        }
        s
    }
}

/// `slotstream check`: runs every check, printing each line as it completes and the summary
/// last. `Err(PreflightFailed)` when any failed (exit code 3), including when the connection
/// itself fails.
pub async fn run_check(config: &Config) -> Result<(), Error> {
    let report = preflight(config, true).await;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", report.summary());
    let _ = out.flush();
    match report.failed() {
        0 => Ok(()),
        failed => Err(Error::PreflightFailed {
            failed,
            total: report.results.len(),
        }),
    }
}

/// The destination's own check (`Sink::healthcheck`): the broker reachable, the topic there
/// (or created), the file writable.
async fn check_destination(config: &Config, report: &mut Report) {
    let result = match crate::sink::build(&config.destination) {
        Ok(mut sink) => {
            let checked = sink.healthcheck().await;
            let _ = sink.shutdown().await;
            checked
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(what) => report.pass(what),
        Err(e) => {
            let hint = e.hint();
            report.fail(
                format!("the destination cannot take events: {e}"),
                vec![Fix::Step(hint)],
            );
        }
    }
}

/// Runs every check as the configured role, then the destination's; `echo` prints each line as it is recorded.
/// Never fails: a query that cannot run becomes a failed check that says so.
pub async fn preflight(config: &Config, echo: bool) -> Report {
    let mut report = Report {
        results: Vec::new(),
        echo,
    };
    let conn = match connect(&config.source, &config.name).await {
        Ok(conn) => conn,
        Err(e) => {
            report_connect_failure(&mut report, config, &e);
            return report;
        }
    };
    let mut ctx = Ctx {
        config,
        client: conn.client,
        report,
        version_num: 0,
        table: None,
        projection: None,
        slot_exists: false,
    };
    ctx.run(conn.tls).await;
    check_destination(config, &mut ctx.report).await;
    ctx.report
}

/// The connection could not be opened: one failed check, classified by cause.
fn report_connect_failure(report: &mut Report, config: &Config, e: &PgError) {
    let src = &config.source;
    let user = quote_ident(&src.user);
    let where_ = target(src);
    match e {
        PgError::Tls {
            cause: TlsCause::NotOffered,
            ..
        } => report.fail(
            format!(
                "the server at {where_} does not offer TLS, but sslmode = {} needs an encrypted connection",
                src.sslmode.as_str()
            ),
            vec![
                Fix::Sql("ALTER SYSTEM SET ssl = on;".into()),
                Fix::Step(
                    "give the server a certificate (ssl_cert_file, ssl_key_file), then reload it with SELECT pg_reload_conf();".into(),
                ),
                Fix::Step(
                    "or, on a trusted network only, set sslmode = \"prefer\" under [source]".into(),
                ),
            ],
        ),
        PgError::Tls { detail, .. } => report.fail(
            format!(
                "TLS cannot be set up for sslmode = {}: {detail}",
                src.sslmode.as_str()
            ),
            vec![Fix::Step(e.hint())],
        ),
        PgError::Connect { detail, code, .. } => {
            let tls_required = matches!(
                src.sslmode,
                SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
            );
            match code.as_ref().map(SqlState::code) {
                Some("28P01") => report.fail(
                    format!("cannot log in to {where_} as {user}: {detail}"),
                    vec![
                        Fix::Step(
                            "check the password under [source] (password_env, password_file or password); or, as a superuser, set the role's password to it:".into(),
                        ),
                        Fix::Sql(format!(
                            "ALTER ROLE {user} WITH LOGIN PASSWORD '<the password in the config>';"
                        )),
                    ],
                ),
                Some("28000") => report.fail(
                    format!("cannot log in to {where_} as {user}: {detail}"),
                    vec![Fix::Step(e.hint())],
                ),
                Some("3D000") => report.fail(
                    format!(
                        "database {} does not exist on {where_}",
                        quote_ident(&src.database)
                    ),
                    vec![Fix::Step(
                        "set source.database to the database that holds the table".into(),
                    )],
                ),
                Some(_) => report.fail(
                    format!("cannot connect to {where_} as {user}: {detail}"),
                    vec![Fix::Step(e.hint())],
                ),
                None if tls_required && detail.contains("TLS") => report.fail(
                    format!(
                        "the TLS handshake with {where_} failed (sslmode = {}): {detail}",
                        src.sslmode.as_str()
                    ),
                    vec![Fix::Step(TlsCause::Handshake.hint().into())],
                ),
                None => report.fail(
                    format!("cannot reach PostgreSQL at {where_}: {detail}"),
                    vec![Fix::Step(e.hint())],
                ),
            }
        }
        PgError::Query { .. } => report.fail(
            format!("cannot connect to {where_} as {user}: {e}"),
            vec![Fix::Step(e.hint())],
        ),
    }
}

/// The state of one `check` run: the connection, what was learned so far, the report.
struct Ctx<'a> {
    config: &'a Config,
    client: Client,
    report: Report,
    version_num: i32,
    table: Option<Table>,
    projection: Option<Projection>,
    slot_exists: bool,
}

/// `a, b, c` with each name quoted.
fn quoted_list<S: AsRef<str>>(names: &[S]) -> String {
    names
        .iter()
        .map(|n| quote_ident(n.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Ctx<'_> {
    fn user(&self) -> String {
        quote_ident(&self.config.source.user)
    }

    fn qtable(&self) -> String {
        quote_qualified(&self.config.source.schema, &self.config.source.table)
    }

    fn could_not(&mut self, what: &str, e: &PgError) {
        self.report.fail(
            format!("could not check {what}: {e}"),
            vec![Fix::Step(e.hint())],
        );
    }

    async fn run(&mut self, tls: bool) {
        if let Err(e) = self.check_server().await {
            self.could_not("the server version", &e);
        }
        self.check_tls(tls);
        if let Err(e) = self.check_wal_level().await {
            self.could_not("wal_level", &e);
        }
        if let Err(e) = self.check_capacity().await {
            self.could_not("free replication slots and WAL senders", &e);
        }
        if let Err(e) = self.check_replication_role().await {
            self.could_not("the role's REPLICATION attribute", &e);
        }
        if let Err(e) = self.check_table_access().await {
            self.could_not("access to the table", &e);
        }
        if let Err(e) = self.check_state_schema().await {
            self.could_not("the \"_rudderstack\" schema", &e);
        }
        self.check_mapping();
        if self.version_num >= PG10
            && let Err(e) = self.check_publication().await
        {
            self.could_not("the publication", &e);
        }
        self.check_replica_identity();
        if self.slot_exists
            && let Err(e) = self.check_existing_slot().await
        {
            self.could_not("the replication slot", &e);
        }
    }

    async fn check_server(&mut self) -> Result<(), PgError> {
        let src = &self.config.source;
        let connected = format!(
            "connected to {} as {}, database {}",
            target(src),
            quote_ident(&src.user),
            quote_ident(&src.database)
        );
        let server = match super::version::server_version(&self.client).await {
            Ok(server) => server,
            Err(e) => {
                self.report.pass(connected);
                return Err(e);
            }
        };
        let version = server.text;
        self.version_num = server.num;
        if self.version_num < MIN_SUPPORTED {
            self.report.fail(
                format!("{connected}, but PostgreSQL {version} is too old: slotstream supports {SUPPORTED_RANGE}"),
                vec![Fix::Step(
                    "upgrade PostgreSQL to 14 or newer (15 or newer for [mapping] filter)".into(),
                )],
            );
        } else {
            self.report
                .pass(format!("{connected} (PostgreSQL {version})"));
        }
        Ok(())
    }

    fn check_tls(&mut self, tls: bool) {
        let src = &self.config.source;
        let mode = src.sslmode.as_str();
        if src.host.starts_with('/') {
            self.report.pass(format!(
                "the connection uses the unix socket in {}, where TLS does not apply (sslmode = {mode})",
                src.host
            ));
            return;
        }
        match (src.sslmode, tls) {
            (SslMode::Disable, _) => self
                .report
                .pass("the connection is not encrypted, as configured (sslmode = disable)"),
            (SslMode::Prefer, true) => self
                .report
                .pass("the connection is encrypted with TLS (sslmode = prefer)"),
            (SslMode::Prefer, false) => self.report.warn(
                "the connection is not encrypted because the server does not offer TLS (sslmode = prefer)",
                vec![Fix::Step(
                    "to insist on encryption, enable ssl on the server and set sslmode = \"require\" or \"verify-full\" under [source]".into(),
                )],
            ),
            (_, true) => {
                let verified = match verification(src) {
                    Verification::None => "",
                    Verification::Chain => ", certificate chain verified",
                    Verification::ChainAndName => ", certificate chain and host name verified",
                };
                self.report.pass(format!(
                    "the connection is encrypted with TLS (sslmode = {mode}{verified})"
                ));
            }
            (_, false) => self.report.fail(
                format!("the connection is not encrypted although sslmode = {mode} requires it"),
                vec![Fix::Step(
                    "enable ssl on the server (ssl = on with a certificate) and check that nothing between slotstream and PostgreSQL strips TLS".into(),
                )],
            ),
        }
    }

    async fn check_wal_level(&mut self) -> Result<(), PgError> {
        let level: String = self
            .client
            .query_one("SELECT current_setting('wal_level')", &[])
            .await
            .map_err(|e| PgError::query("reading wal_level", e))?
            .get(0);
        if level == "logical" {
            self.report.pass("wal_level is logical");
        } else {
            self.report.fail(
                format!("wal_level is {level}, but logical replication needs wal_level = logical"),
                vec![
                    Fix::Sql("ALTER SYSTEM SET wal_level = logical;".into()),
                    Fix::Step(
                        "then restart PostgreSQL: wal_level takes effect only at server start"
                            .into(),
                    ),
                ],
            );
        }
        Ok(())
    }

    async fn check_capacity(&mut self) -> Result<(), PgError> {
        let slot = &self.config.source.slot;
        let row = self
            .client
            .query_one(
                "SELECT current_setting('max_replication_slots')::int4,
                        (SELECT count(*) FROM pg_replication_slots)::int4,
                        EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1),
                        current_setting('max_wal_senders')::int4,
                        (SELECT count(*) FROM pg_stat_replication)::int4",
                &[slot],
            )
            .await
            .map_err(|e| PgError::query("counting replication slots and WAL senders", e))?;
        let (max_slots, used_slots): (i32, i32) = (row.get(0), row.get(1));
        self.slot_exists = row.get(2);
        let (max_senders, used_senders): (i32, i32) = (row.get(3), row.get(4));
        let qslot = quote_ident(slot);
        if self.slot_exists {
            self.report.pass(format!(
                "replication slot {qslot} already exists, so the pipeline needs no free slot ({used_slots} of max_replication_slots = {max_slots} in use)"
            ));
        } else if used_slots < max_slots {
            self.report.pass(format!(
                "a replication slot is free for {qslot} ({used_slots} of max_replication_slots = {max_slots} in use); `slotstream run` creates it"
            ));
        } else {
            let inactive: Vec<String> = self
                .client
                .query(
                    "SELECT slot_name::text FROM pg_replication_slots WHERE NOT active ORDER BY 1 LIMIT 5",
                    &[],
                )
                .await
                .map_err(|e| PgError::query("listing inactive replication slots", e))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let mut fixes = vec![
                Fix::Sql(format!(
                    "ALTER SYSTEM SET max_replication_slots = {};",
                    used_slots.max(max_slots) + 1
                )),
                Fix::Step(
                    "then restart PostgreSQL: max_replication_slots takes effect only at server start"
                        .into(),
                ),
            ];
            if let Some(first) = inactive.first() {
                fixes.push(Fix::Step(format!(
                    "or drop a slot that nothing uses any more (inactive now: {}), e.g.:",
                    inactive.join(", ")
                )));
                fixes.push(Fix::Sql(format!(
                    "SELECT pg_drop_replication_slot({});",
                    quote_literal(first)
                )));
            }
            self.report.fail(
                format!(
                    "no replication slot is free for {qslot}: {used_slots} of max_replication_slots = {max_slots} are in use"
                ),
                fixes,
            );
        }
        if used_senders < max_senders {
            self.report.pass(format!(
                "a WAL sender is free ({used_senders} of max_wal_senders = {max_senders} in use)"
            ));
        } else {
            self.report.fail(
                format!(
                    "no WAL sender is free: {used_senders} of max_wal_senders = {max_senders} are in use"
                ),
                vec![
                    Fix::Sql(format!(
                        "ALTER SYSTEM SET max_wal_senders = {};",
                        used_senders.max(max_senders) + 1
                    )),
                    Fix::Step(
                        "then restart PostgreSQL: max_wal_senders takes effect only at server start"
                            .into(),
                    ),
                ],
            );
        }
        Ok(())
    }

    async fn check_replication_role(&mut self) -> Result<(), PgError> {
        let row = self
            .client
            .query_one(
                "SELECT rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(|e| PgError::query("reading the role's attributes", e))?;
        let (replication, superuser): (bool, bool) = (row.get(0), row.get(1));
        let user = self.user();
        if superuser {
            self.report
                .pass(format!("role {user} is a superuser, so it may replicate"));
        } else if replication {
            self.report
                .pass(format!("role {user} has the REPLICATION attribute"));
        } else {
            self.report.fail(
                format!(
                    "role {user} lacks the REPLICATION attribute, which opening a replication connection requires"
                ),
                vec![Fix::Sql(format!("ALTER ROLE {user} WITH REPLICATION;"))],
            );
        }
        Ok(())
    }

    /// The pipeline's slot already exists: it must be a pgoutput logical slot of this
    /// database, with its WAL, and not in use.
    async fn check_existing_slot(&mut self) -> Result<(), PgError> {
        let slot = &self.config.source.slot;
        let qslot = quote_ident(slot);
        let wal_status = if self.version_num >= PG13 {
            "wal_status"
        } else {
            "NULL::text"
        };
        let row = self
            .client
            .query_opt(
                &format!(
                    "SELECT slot_type, plugin::text, database::text, database = current_database(),
                            active, active_pid, {wal_status}
                       FROM pg_replication_slots WHERE slot_name = $1"
                ),
                &[slot],
            )
            .await
            .map_err(|e| PgError::query("reading the replication slot", e))?;
        // Dropped since the capacity check: nothing to report.
        let Some(row) = row else { return Ok(()) };
        let slot_type: String = row.get(0);
        let plugin: Option<String> = row.get(1);
        let database: Option<String> = row.get(2);
        let here: Option<bool> = row.get(3);
        let active: bool = row.get(4);
        let active_pid: Option<i32> = row.get(5);
        let wal: Option<String> = row.get(6);
        let drop_sql = Fix::Sql(format!(
            "SELECT pg_drop_replication_slot({});",
            quote_literal(slot)
        ));
        let elsewhere = |what: String| {
            (
                what,
                vec![
                    Fix::Step(
                        "set source.slot to another name, or drop that slot if nothing uses it:"
                            .into(),
                    ),
                    drop_sql.clone(),
                ],
            )
        };
        let wrong = if slot_type != "logical" {
            Some(elsewhere(format!(
                "replication slot {qslot} exists but is a {slot_type} slot, not a logical one"
            )))
        } else if plugin.as_deref() != Some("pgoutput") {
            Some(elsewhere(format!(
                "replication slot {qslot} exists but uses the plugin {}, not pgoutput",
                plugin.as_deref().unwrap_or("(none)")
            )))
        } else if here != Some(true) {
            Some(elsewhere(format!(
                "replication slot {qslot} belongs to database {}, not {}",
                quote_ident(database.as_deref().unwrap_or("?")),
                quote_ident(&self.config.source.database)
            )))
        } else {
            None
        };
        if let Some((message, fixes)) = wrong {
            self.report.fail(message, fixes);
            return Ok(());
        }
        if wal.as_deref() == Some("lost") {
            self.report.fail(
                format!("replication slot {qslot} has lost WAL it still needed (wal_status = lost), so it can no longer stream"),
                vec![
                    drop_sql,
                    Fix::Step("then run `slotstream resync` so that the next run starts with a full sync".into()),
                ],
            );
        } else if active {
            let by = active_pid
                .map(|p| format!("process {p}"))
                .unwrap_or_else(|| "another process".into());
            let mut fixes = vec![Fix::Step(
                "stop that consumer first (another slotstream run?): a slot streams to one consumer at a time".into(),
            )];
            if let Some(pid) = active_pid {
                fixes.push(Fix::Sql(format!("SELECT pg_terminate_backend({pid});")));
            }
            self.report.fail(
                format!("replication slot {qslot} is in use by {by}, so slotstream cannot stream from it"),
                fixes,
            );
        } else if wal.as_deref() == Some("unreserved") {
            self.report.warn(
                format!("replication slot {qslot} is about to lose WAL it needs (wal_status = unreserved)"),
                vec![Fix::Step("run slotstream now, or raise max_slot_wal_keep_size".into())],
            );
        } else {
            self.report.pass(format!(
                "replication slot {qslot} is a pgoutput logical slot of this database and is not in use"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixes_render_indented_under_the_mark() {
        let r = CheckResult {
            outcome: Outcome::Fail,
            message: "wal_level is replica".into(),
            fixes: vec![
                Fix::Sql("ALTER SYSTEM SET wal_level = logical;".into()),
                Fix::Step("then restart PostgreSQL".into()),
            ],
        };
        assert_eq!(
            r.render(),
            "✗ wal_level is replica\n    ALTER SYSTEM SET wal_level = logical;\n    → then restart PostgreSQL"
        );
    }

    #[test]
    fn summary_counts_warnings_as_passed() {
        let mut report = Report::default();
        report.pass("a");
        report.warn("b", Vec::new());
        report.fail("c", Vec::new());
        assert_eq!(report.summary(), "2 checks passed, 1 failed, 1 warning");
    }
}
