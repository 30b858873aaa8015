//! `run`'s own verification that what the slot sends covers what the mapping needs: the
//! publication requirements of `check` (see [`super::publication`]), judged by the same code,
//! so a failure stops the pipeline with the line and the fix `check` prints.
//!
//! pgoutput decides what to send from the publication as it was when each change was written:
//! a change made while the table was out of the publication (or while its updates, deletes or
//! rows were not published) never reaches the slot, and adding the table back later does not
//! bring it back. Such a gap can only be repaired by a full sync, so the verification runs
//! before each checkpoint as well as at session start and on Relation messages: the checkpoint
//! (and with it the slot's acknowledged position) never moves past changes that the
//! publication may have withheld, and the error says to run `slotstream resync` after the fix.

use tokio_postgres::Client;

use super::publication::{Probe, Requirements, probe_filter, read};
use super::{Fix, Outcome, PG15, Report};
use crate::config::Config;
use crate::error::Error;
use crate::postgres::{PgError, quote_qualified};

/// Reads of the publication before a failure is believed even if it keeps changing (DDL
/// racing every read).
const MAX_READS: u32 = 5;

/// The publication requirements of one pipeline, prepared once per session.
#[derive(Debug, Clone)]
pub struct Verifier {
    config: Config,
    version_num: i32,
    /// The server's reading of `[mapping] filter`, deparsed once at session start.
    configured: Option<Probe>,
    /// `pg_class.oid` of the followed table: it is followed by OID, so after a rename the
    /// publication is checked under the table's current name.
    table_oid: Option<u32>,
}

impl Verifier {
    /// Deparses `[mapping] filter` for a server of `version_num` (in a transaction that is
    /// rolled back; `client` must not be inside a transaction).
    pub async fn prepare(
        client: &mut Client,
        config: &Config,
        version_num: i32,
    ) -> Result<Self, PgError> {
        let configured = match &config.mapping.filter {
            Some(filter) if version_num >= PG15 => {
                let qtable = quote_qualified(&config.source.schema, &config.source.table);
                Some(probe_filter(client, &qtable, filter).await?)
            }
            _ => None,
        };
        Ok(Verifier {
            config: config.clone(),
            version_num,
            configured,
            table_oid: None,
        })
    }

    /// Checks the publication for the table whose `pg_class.oid` is `oid`, under whatever
    /// name it has when a check runs (a rename keeps the stream going).
    pub fn for_table_oid(mut self, oid: u32) -> Self {
        self.table_oid = Some(oid);
        self
    }

    /// The followed table's current `(schema, name)` when it differs from the config's (a
    /// rename: the table is followed by OID); `None` when it is as configured or unknown.
    async fn current_name(&self, client: &Client) -> Result<Option<(String, String)>, PgError> {
        let Some(oid) = self.table_oid else {
            return Ok(None);
        };
        let src = &self.config.source;
        Ok(crate::postgres::catalog::table_name(client, oid)
            .await?
            .filter(|(schema, name)| *schema != src.schema || *name != src.table))
    }

    /// Checks the publication now. The first unmet requirement is an
    /// [`Error::Requirement`] with `check`'s line and fix (and, with `advise_resync`, the
    /// advice to run a full sync once fixed: the pipeline has streamed, so changes the
    /// publication withheld may be missing at the destination). Plain queries only: `client`
    /// may be inside a transaction.
    pub async fn verify(&self, client: &Client, advise_resync: bool) -> Result<(), Error> {
        // The table's name, its columns and the publication are read by separate queries: a
        // table or column renamed between them would look like a table or column gone from
        // the publication. So a failure is believed only when the name did not change
        // meanwhile and a fresh read fails the same way (a column renamed by the writer is
        // then reported by the stream as the rename it is, not as a publication to fix).
        let mut name = self.current_name(client).await?;
        let mut earlier_failure: Option<String> = None;
        let mut reads = 0;
        let report = loop {
            reads += 1;
            let config = match &name {
                Some((schema, table)) => {
                    let mut config = self.config.clone();
                    config.source.schema = schema.clone();
                    config.source.table = table.clone();
                    std::borrow::Cow::Owned(config)
                }
                None => std::borrow::Cow::Borrowed(&self.config),
            };
            let facts = read(client, &config, self.version_num, false).await?;
            let requirements = Requirements {
                config: &config,
                version_num: self.version_num,
                configured: self.configured.as_ref(),
                replica_identity: None,
            };
            let mut report = Report::default();
            requirements.evaluate(&facts, &mut report);
            let Some(failure) = report
                .results
                .iter()
                .find(|r| r.outcome == Outcome::Fail)
                .map(|r| r.message.clone())
            else {
                return Ok(());
            };
            let now = self.current_name(client).await?;
            let repeated = earlier_failure.as_ref() == Some(&failure);
            if now == name && (repeated || reads >= MAX_READS) {
                break report;
            }
            earlier_failure = (now == name).then_some(failure);
            name = now;
        };
        let mut failures = report
            .results
            .into_iter()
            .filter(|r| r.outcome == Outcome::Fail);
        let Some(first) = failures.next() else {
            return Ok(());
        };
        for other in failures {
            tracing::error!("{}", other.render());
        }
        let mut fixes = first.fixes;
        if advise_resync {
            fixes.push(Fix::Step(
                "changes the publication did not cover never reach the slot: once it is fixed, run `slotstream resync` so that a full sync brings the destination up to date".into(),
            ));
        }
        Err(Error::Requirement {
            message: first.message,
            fix: render_fixes(&fixes),
        })
    }
}

/// The fix lines as `check` prints them under a failure, one per line.
fn render_fixes(fixes: &[Fix]) -> String {
    fixes
        .iter()
        .map(|f| match f {
            Fix::Sql(sql) => format!("    {sql}"),
            Fix::Step(step) => format!("    → {step}"),
        })
        .collect::<Vec<_>>()
        .join("\n")
}
