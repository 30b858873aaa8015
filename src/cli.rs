//! The command line (docs/architecture.md §3). Parsing only: each command's work lives in its stage's
//! module, and `main.rs` maps errors to exit codes.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Streams the changes of a PostgreSQL table into RudderStack `identify` events.
#[derive(Debug, Parser)]
#[command(name = "slotstream", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Preflight: check every requirement; exit 0 only if all pass.
    Check {
        /// The pipeline's config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the first N rows as the exact events that would be sent.
    Preview {
        /// The pipeline's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// How many rows.
        #[arg(long, default_value_t = 10)]
        limit: u32,
    },
    /// Stream changes to the destination.
    Run {
        /// The pipeline's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Full sync if needed, catch up to the WAL position current at start, deliver,
        /// checkpoint, exit.
        #[arg(long)]
        once: bool,
    },
    /// Slot, lag, checkpoint and the last sync runs.
    Status {
        /// The pipeline's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Force a full sync on the next run.
    Resync {
        /// The pipeline's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Send only rows whose traits differ from what the ledger says was last sent (and, in
        /// mirror mode, `Record Deleted` for rows gone from the table): the way back after a
        /// lost slot.
        #[arg(long)]
        changed_only: bool,
    },
    /// Deliver the open schedule window now: asks the running `slotstream run` to, or (when
    /// none runs) catches up, delivers and exits like `run --once`.
    Sync {
        /// The pipeline's config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Drop the slot and this pipeline's state.
    Teardown {
        /// The pipeline's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}
