//! The `faultline` command line: parses arguments, runs a command, turns errors into one
//! line and an exit code (2 for usage: clap's, and a command's [`UsageError`]; 1 for
//! everything else).

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use probe_user::{
    check,
    cli::UsageError,
    explain,
    logging::{self, LogFormat, LogLevel},
    run, top, trace,
};

#[derive(Parser, Debug)]
#[command(
    name = "faultline",
    version,
    about = "eBPF probe that shows why things fail on a Kubernetes node: failed task creation with its cause, \
task creation and pids headroom per pod, DNS latency and timeouts per pod, conntrack drops and near-misses"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// faultline's own messages on stderr: `plain` lines, or `json` objects for a log
    /// pipeline.
    #[arg(long, global = true, env = "FAULTLINE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    log_format: LogFormat,
    /// The least severe of faultline's own messages shown.
    #[arg(long, global = true, env = "FAULTLINE_LOG_LEVEL", value_enum, default_value_t = LogLevel::Info)]
    log_level: LogLevel,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Trace live, per pod: failed task creation with its cause, DNS queries (latency, rcode,
    /// timeouts, retransmits), conntrack drops and resolved clashes; a summary at the end.
    Trace(trace::TraceArgs),
    /// What is wrong on this node, ranked: which pod, which limit, how long until it breaks,
    /// and what to change (from the node's daemon, or a short observation).
    Explain(explain::ExplainArgs),
    /// Live per-cgroup view of task creation, live tasks and pids headroom.
    Top(top::TopArgs),
    /// The node daemon: Prometheus metrics on /metrics, event lines and OTLP, until SIGTERM.
    Run(run::RunArgs),
    /// Report what this kernel supports for faultline, and what an older kernel gets instead.
    Check(check::CheckArgs),
    /// Print a shell completion script for SHELL (e.g. `faultline completions bash >
    /// /etc/bash_completion.d/faultline`).
    Completions {
        /// The shell the script is for.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) of faultline, or with --dir write one per command there
    /// (faultline.1, faultline-trace.1, faultline-explain.1, ...).
    Man {
        /// Write the pages into this directory instead of printing the main one.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn block_on(f: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(f))
}

fn main() -> ExitCode {
    // clap exits 2 on usage errors and 0 for --help/--version.
    let cli = Cli::parse();
    logging::init(cli.log_format, cli.log_level);
    if matches!(cli.command, Command::Run(_)) {
        // The daemon: no stray signal ends it, from before its first thread.
        if let Err(e) = run::ignore_unused_signals() {
            tracing::error!("{e:#}");
            return ExitCode::FAILURE;
        }
    } else {
        // A reader that goes away (`faultline check | head -3`) ends the one-shot commands
        // quietly, as it ends grep; the daemon handles a closed stdout itself.
        // SAFETY: restoring a signal's default disposition.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Check(args) => {
            return if check::run(&args) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "faultline",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Command::Man { dir } => {
            probe_user::manual::write(<Cli as clap::CommandFactory>::command(), dir.as_deref())
        }
        Command::Trace(args) => block_on(trace::run(args)),
        Command::Top(args) => block_on(top::run(args)),
        Command::Explain(args) => block_on(explain::run(args)),
        Command::Run(args) => block_on(run::run(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", probe_user::kernel::loader::brief(&e));
            if UsageError::is_cause_of(&e) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `run` and the global flags take has an environment variable (the DaemonSet sets
    /// them there): every argument but help and version.
    #[test]
    fn every_run_flag_has_an_environment_variable() {
        let mut cli = <Cli as clap::CommandFactory>::command();
        cli.build();
        let run = cli.find_subcommand("run").expect("a run command").clone();
        let missing: Vec<String> = run
            .get_arguments()
            .chain(cli.get_arguments())
            .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
            .filter(|a| a.get_env().is_none())
            .map(|a| format!("--{}", a.get_long().unwrap_or(a.get_id().as_str())))
            .collect();
        assert!(missing.is_empty(), "no environment variable: {missing:?}");
    }
}
