//! diffusiond: parse the command line, set up logging, hand off.

use std::process::ExitCode;

use clap::Parser;
use diffusiond::cli::{Cli, Command};

/// mimalloc keeps freed tensor buffers for reuse instead of handing large blocks back to the OS
/// after every op (page faults were ~7% of a denoising step with the system allocator).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    diffusiond::pipeline::device::init_cpu_runtime();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn")),
        )
        .init();
    let result = match cli.command {
        Command::Serve(args) => runtime().and_then(|rt| rt.block_on(diffusiond::app::serve(args))),
        Command::Keys(args) => runtime().and_then(|rt| rt.block_on(diffusiond::app::keys(args))),
        Command::Generate(args) => diffusiond::generate::run(args),
        Command::Bench(args) => diffusiond::bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
