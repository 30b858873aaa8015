//! One `slotstream run` per pipeline: a session-level advisory lock keyed on the pipeline name,
//! held on a connection of its own for as long as the run lasts.
//!
//! - The server releases the lock when that connection ends, however it ends: a normal exit,
//!   `kill -9` (the kernel closes the socket), a server restart. A host that vanishes is noticed
//!   by the server's TCP keepalives, which the lock session sets short
//!   ([`LOCK_SESSION_SETTINGS`]), so its lock goes within about a minute.
//! - A second run of the same pipeline (same `name`, same database) does not fight for the slot:
//!   it finds the lock taken and stops at once, naming the holder ([`LockHolder`]).
//! - The lock session's `application_name` is `slotstream/<name> (pid <os pid>)`: the holder's
//!   process id is visible to every role through `pg_stat_activity`, next to the lock session's
//!   backend pid and client address (those only to the same role or `pg_read_all_stats`).
//! - `teardown` takes the same lock, so it refuses while a run is live and no run starts while
//!   it drops the slot.
//!
//! Keys: the two-`int4` form of the advisory lock (`objsubid = 2` in `pg_locks`, apart from the
//! one-`bigint` form the state migrations use), class [`LOCK_CLASS`], object a hash of the name.
//! Advisory locks are per database, like the state rows.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use super::PgError;
use crate::config::SourceConfig;
use crate::error::Error;

/// The advisory lock class of pipeline locks (`SLST`).
pub const LOCK_CLASS: i32 = 0x534C_5354;

/// Server-side TCP keepalives of the lock session: a host that vanished without closing the
/// connection loses its lock within about a minute (ignored on a unix socket).
const LOCK_SESSION_SETTINGS: &str =
    "SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; SET tcp_keepalives_count = 3";

/// The advisory lock key `(class, object)` of a pipeline.
pub fn lock_key(pipeline: &str) -> (i32, i32) {
    let digest = Sha256::digest(pipeline.as_bytes());
    let object = i32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) & i32::MAX;
    (LOCK_CLASS, object)
}

/// The session that holds a pipeline's lock, as `pg_locks` and `pg_stat_activity` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHolder {
    /// The server process (backend) of the lock session.
    pub backend_pid: i32,
    /// When that session started (`backend_start`, UTC), if visible.
    pub since: Option<String>,
    /// Its `application_name`.
    pub application_name: Option<String>,
    /// Its client address, or `local socket`, if visible.
    pub client: Option<String>,
}

impl LockHolder {
    /// The process id of the slotstream that holds the lock, from its `application_name`.
    pub fn slotstream_pid(&self) -> Option<u32> {
        let app = self.application_name.as_deref()?;
        let at = app.rfind("(pid ")? + "(pid ".len();
        app[at..].strip_suffix(')')?.parse().ok()
    }

    /// The holder in words: `pid 4567, from 10.0.0.5; its lock session is backend pid 8910,
    /// connected since …`.
    pub fn describe(&self) -> String {
        let mut s = match self.slotstream_pid() {
            Some(pid) => format!("pid {pid}"),
            None => match &self.application_name {
                Some(app) if !app.is_empty() => format!("application_name {app:?}"),
                _ => "an unnamed session".into(),
            },
        };
        if let Some(client) = &self.client {
            s.push_str(&format!(", from {client}"));
        }
        s.push_str(&format!(
            "; its lock session is backend pid {}",
            self.backend_pid
        ));
        if let Some(since) = &self.since {
            s.push_str(&format!(", connected since {since}"));
        }
        s
    }
}

/// Who holds the pipeline's lock, if anyone.
pub async fn holder(client: &Client, pipeline: &str) -> Result<Option<LockHolder>, PgError> {
    let (class, object) = lock_key(pipeline);
    let row = client
        .query_opt(
            "SELECT l.pid, a.backend_start::text, a.application_name::text,
                    CASE WHEN a.client_addr IS NOT NULL THEN host(a.client_addr)
                         WHEN a.client_port = -1 THEN 'local socket' END
               FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
              WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                AND l.pid IS NOT NULL
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND l.classid = $1::int4::oid AND l.objid = $2::int4::oid
              LIMIT 1",
            &[&class, &object],
        )
        .await
        .map_err(|e| PgError::query("reading who holds the pipeline lock", e))?;
    Ok(row.map(|r| LockHolder {
        backend_pid: r.get(0),
        since: r.get(1),
        application_name: r.get(2),
        client: r.get(3),
    }))
}

/// A held pipeline lock; dropping it closes its connection, which releases the lock.
pub struct PipelineLock {
    client: Arc<Client>,
    /// The lock session's backend pid and start time: who we were, to recognise our own
    /// session if the connection broke on our side while the server still holds it.
    backend: (i32, Option<String>),
}

impl PipelineLock {
    /// Takes the pipeline's lock on a session of its own, without waiting for it:
    /// [`Error::AlreadyRunning`] if another session holds it. `previous`, the lock this process
    /// held before its session broke: if the server still keeps that session (it has not
    /// noticed yet), it is ended and the lock taken again.
    pub async fn acquire(
        source: &SourceConfig,
        pipeline: &str,
        previous: Option<&PipelineLock>,
    ) -> Result<PipelineLock, Error> {
        let tag = format!("{pipeline} (pid {})", std::process::id());
        let client = super::connect(source, &tag).await?.client;
        client
            .batch_execute(LOCK_SESSION_SETTINGS)
            .await
            .map_err(|e| PgError::query("setting the lock session's keepalives", e))?;
        let (class, object) = lock_key(pipeline);
        // A few attempts: a holder that goes away while we look (or our own earlier session,
        // which we end) lets the next attempt succeed.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let row = client
                .query_one(
                    "SELECT pg_try_advisory_lock($1, $2), pg_backend_pid(),
                            (SELECT backend_start::text FROM pg_stat_activity
                              WHERE pid = pg_backend_pid())",
                    &[&class, &object],
                )
                .await
                .map_err(|e| PgError::query("taking the pipeline lock", e))?;
            if row.get::<_, bool>(0) {
                return Ok(PipelineLock {
                    client: Arc::new(client),
                    backend: (row.get(1), row.get(2)),
                });
            }
            let holder = holder(&client, pipeline).await?;
            match holder {
                Some(h) if previous.is_some_and(|p| p.is_own_session(&h)) => {
                    tracing::warn!(
                        backend_pid = h.backend_pid,
                        "the server still keeps this process's earlier lock session: ending it"
                    );
                    client
                        .execute("SELECT pg_terminate_backend($1)", &[&h.backend_pid])
                        .await
                        .map_err(|e| PgError::query("ending the earlier lock session", e))?;
                }
                Some(h) if attempts >= 10 => {
                    return Err(Error::AlreadyRunning {
                        pipeline: pipeline.to_owned(),
                        holder: h.describe(),
                    });
                }
                _ => {}
            }
            if attempts >= 50 {
                return Err(PgError::Query {
                    what: "taking the pipeline lock".into(),
                    detail: "it was released and taken again while slotstream looked".into(),
                    code: None,
                }
                .into());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Whether the lock session has ended (the lock is then released, or about to be).
    pub fn is_lost(&self) -> bool {
        self.client.is_closed()
    }

    /// A handle to poll [`PipelineLock::is_lost`] from another task.
    pub fn watch(&self) -> LockWatch {
        LockWatch(Arc::clone(&self.client))
    }

    /// Whether `holder` is this lock's own session: same backend pid, same start time.
    fn is_own_session(&self, holder: &LockHolder) -> bool {
        holder.backend_pid == self.backend.0
            && holder.since.is_some()
            && holder.since == self.backend.1
    }
}

/// Tells whether a [`PipelineLock`]'s session has ended, from another task.
#[derive(Clone)]
pub struct LockWatch(Arc<Client>);

impl LockWatch {
    /// Whether the lock session has ended.
    pub fn is_lost(&self) -> bool {
        self.0.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_positive_and_differ_per_pipeline() {
        let (class, a) = lock_key("users-to-rudder");
        assert_eq!(class, LOCK_CLASS);
        assert!(a >= 0);
        assert_eq!(lock_key("users-to-rudder").1, a);
        assert_ne!(lock_key("orders-to-rudder").1, a);
    }

    #[test]
    fn the_holder_names_the_slotstream_pid_when_its_application_name_carries_it() {
        let mut h = LockHolder {
            backend_pid: 8910,
            since: Some("2026-01-02 03:04:05.123456+00".into()),
            application_name: Some("slotstream/users (pid 4567)".into()),
            client: Some("10.0.0.5".into()),
        };
        assert_eq!(h.slotstream_pid(), Some(4567));
        assert_eq!(
            h.describe(),
            "pid 4567, from 10.0.0.5; its lock session is backend pid 8910, connected since 2026-01-02 03:04:05.123456+00"
        );
        h.application_name = Some("slotstream/a-very-long-name (pi".into());
        h.client = None;
        h.since = None;
        assert_eq!(h.slotstream_pid(), None);
        assert_eq!(
            h.describe(),
            "application_name \"slotstream/a-very-long-name (pi\"; its lock session is backend pid 8910"
        );
    }
}
