//! slotstream: the changes of one PostgreSQL table, by logical replication, as RudderStack
//! `identify` events.
//!
//! ```text
//!         PostgreSQL (wal_level=logical)
//!         │  publication FOR TABLE schema.table   (created once by the admin, sql/setup.sql)
//!         │  logical slot, pgoutput proto v1      (created by slotstream)
//!         ▼
//!  source::snapshot ── exported snapshot + COPY ──┐   (first run, resync)
//!  source::stream  ── START_REPLICATION ──────────┤   pgwire-replication
//!         ▼                                       │
//!  decode::pgoutput   bytes → Begin/Relation/Insert/Update/Delete/Truncate/Commit/…
//!  decode::value      text cell + type oid → serde_json::Value  (== PostgreSQL's to_jsonb)
//!         ▼
//!  transform          selected columns → traits (JSON trait keys), identifiers → userId/anonymousId
//!         ▼
//!  batch              realtime micro-batches, or a schedule window with per-user coalescing
//!         ▼
//!  sink               stdout | file (JSONL)
//!         ▼  durable ack
//!  checkpoint         UPDATE _rudderstack.cdc_checkpoints SET lsn = … ; then ack the slot
//! ```
//!
//! Two PostgreSQL clients, one per plane: `pgwire-replication` owns the walsender connection
//! (the replication plane), `tokio-postgres` does catalog queries, COPY and the state tables
//! (the control plane).
//!
//! The invariants every stage keeps are listed in `docs/architecture.md` §8; the one that matters most:
//! nothing is acknowledged to the slot before the destination confirmed it and the checkpoint
//! row in `_rudderstack` recorded it.

pub mod batch;
pub mod cli;
pub mod config;
pub mod decode;
pub mod error;
pub mod json;
pub mod metrics;
pub mod pipeline;
pub mod postgres;
pub mod preview;
pub mod sink;
pub mod source;
pub mod status;
pub mod transform;

/// The one WAL position type used everywhere (pgwire-replication's), stored as `pg_lsn` in SQL.
pub use pgwire_replication::Lsn;

/// The library name and version written into every event's `context.library`.
pub const LIBRARY_NAME: &str = "slotstream";
/// This build's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
