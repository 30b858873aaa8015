//! Decoding: pgoutput bytes into logical replication messages, and text cells into JSON.
//!
//! - [`pgoutput`] turns one `XLogData` payload into a [`pgoutput::LogicalMessage`].
//! - [`relation`] caches the shape of each relation announced by `Relation` messages.
//! - [`value`] maps a text cell and its type to the JSON PostgreSQL's `to_jsonb()` gives.
//!
//! Nothing here touches the network: every function is pure over its input, and malformed
//! input yields a [`DecodeError`], never a panic.

pub mod pgoutput;
pub mod relation;
pub mod value;

pub use pgoutput::DecodeError;
