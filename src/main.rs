//! The `slotstream` binary: parse the command line, load the config, run the command, and turn
//! any error into one clear sentence, a hint and an exit code (docs/architecture.md §3).

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use slotstream::cli::{Cli, Command, LogFormat};
use slotstream::config::Config;
use slotstream::error::{Error, exit};

/// mimalloc: the full sync and the stream allocate and free small buffers for every row, and
/// the system allocator spent about a fifth of a full sync's CPU on them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .init(),
    }
}

async fn run(command: Command) -> Result<i32, Error> {
    match command {
        Command::Check { config } => {
            let config = Config::load(&config)?;
            slotstream::postgres::preflight::run_check(&config).await?;
            Ok(exit::OK)
        }
        Command::Preview { config, limit } => {
            let config = Config::load(&config)?;
            slotstream::preview::run(&config, limit).await?;
            Ok(exit::OK)
        }
        Command::Run { config, once } => {
            let config = Config::load(&config)?;
            slotstream::pipeline::run(&config, once).await?;
            Ok(exit::OK)
        }
        Command::Status { config, json } => {
            let config = Config::load(&config)?;
            slotstream::status::run(&config, json).await?;
            Ok(exit::OK)
        }
        Command::Resync {
            config,
            changed_only,
        } => {
            let config = Config::load(&config)?;
            slotstream::status::resync(&config, changed_only).await?;
            Ok(exit::OK)
        }
        Command::Sync { config } => {
            let config = Config::load(&config)?;
            if !slotstream::status::request_sync(&config).await? {
                slotstream::pipeline::run(&config, true).await?;
            }
            Ok(exit::OK)
        }
        Command::Teardown { config, yes } => {
            let config = Config::load(&config)?;
            slotstream::status::teardown(&config, yes).await?;
            Ok(exit::OK)
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::CONFIG
            } else {
                exit::OK
            };
            let _ = e.print();
            return ExitCode::from(code as u8);
        }
    };
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::RUNTIME as u8);
        }
    };
    // The command runs as a task of the runtime rather than on this thread, so its channel
    // hand-offs with the other tasks (replication worker, deliverer) are wake-ups inside the
    // runtime's workers, not wake-ups of a thread parked outside them.
    let result = runtime.block_on(async {
        tokio::spawn(run(cli.command))
            .await
            .unwrap_or_else(|e| Err(Error::Internal(format!("the command's task failed: {e}"))))
    });
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("error: {e}");
            eprintln!("hint: {}", e.hint());
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
