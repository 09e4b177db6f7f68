//! faultline: shows why tasks fail to be created on a Kubernetes node, live, with the cause.
//!
//! The pipeline, in module order: `loader` (load -> attach the eBPF programs, offsets from
//! `btf` and `tracefs`), `clone` (ring-buffer events -> enriched `CloneFailure`, with `cause`,
//! `cgroups` and `node` for attribution), then the commands that export: `trace`, `check`.

mod btf;
mod cause;
mod cgroups;
mod check;
mod clone;
mod loader;
mod node;
mod offsets;
mod trace;
mod tracefs;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "faultline",
    version,
    about = "eBPF probe that shows why tasks, DNS and conntrack fail on a Kubernetes node"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Trace failed task creation (clone, clone3, fork, vfork) live, with the cause.
    Trace(trace::TraceArgs),
    /// Report what this kernel supports for faultline.
    Check,
}

fn main() -> ExitCode {
    // clap exits 2 on usage errors and 0 for --help/--version.
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check => {
            return if check::run() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        Command::Trace(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(trace::run(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("faultline: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
