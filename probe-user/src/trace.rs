//! `faultline trace`: the one-shot CLI. Runs the whole pipeline (load -> attach -> events ->
//! enrich -> filter -> print) until the duration ends or Ctrl-C/SIGTERM, then prints a summary.

use std::{
    collections::BTreeMap,
    io::{self, Write as _},
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use clap::{Args, ValueEnum};
use serde::Serialize;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    time::Instant,
};

use crate::{
    btf::Btf,
    cgroups::CgroupFs,
    clone::{self, CloneFailure, Enricher},
    loader::{self, CloneStats, Probes},
    tracefs::Tracefs,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// One aligned line per event, for people.
    Table,
    /// One JSON object per line, for programs.
    Json,
}

#[derive(Args, Debug)]
pub struct TraceArgs {
    /// Stop after this long (e.g. 10s, 2m); default: until Ctrl-C or SIGTERM.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Only events of this process (thread group id); repeatable.
    #[arg(long = "pid")]
    pub pids: Vec<u32>,
    /// Only events whose command name is exactly this.
    #[arg(long)]
    pub comm: Option<String>,
    /// Only events whose cgroup (v2 path, or pids cgroup path) starts with this prefix.
    #[arg(long)]
    pub cgroup: Option<String>,
}

/// Which events are shown; the others are counted as filtered out.
struct Filter<'a>(&'a TraceArgs);

impl Filter<'_> {
    fn matches(&self, f: &CloneFailure) -> bool {
        let args = self.0;
        (args.pids.is_empty() || args.pids.contains(&f.pid))
            && args.comm.as_deref().is_none_or(|c| c == f.comm)
            && args.cgroup.as_deref().is_none_or(|prefix| {
                f.cgroup.starts_with(prefix)
                    || f.pids_cgroup
                        .as_deref()
                        .is_some_and(|p| p.starts_with(prefix))
            })
    }
}

/// Counts of the shown events, printed when the trace ends.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    kind: &'static str,
    failures: u64,
    by_cause: BTreeMap<&'static str, u64>,
    by_cgroup: BTreeMap<String, u64>,
    by_comm: BTreeMap<String, u64>,
    /// Failures that did not reach userspace (ring buffer full): never silently dropped.
    lost_events: u64,
    /// Failures seen by the kernel programs, before filters.
    kernel_failures: u64,
    filtered_out: u64,
    /// Failures whose syscall entry faultline did not see (task kind unknown).
    flags_unknown: u64,
}

impl Summary {
    fn add(&mut self, f: &CloneFailure) {
        self.failures += 1;
        *self.by_cause.entry(f.cause.as_str()).or_default() += 1;
        *self.by_cgroup.entry(f.cgroup.clone()).or_default() += 1;
        *self.by_comm.entry(f.comm.clone()).or_default() += 1;
    }

    fn finish(&mut self, stats: CloneStats) {
        self.kind = "summary";
        self.lost_events = stats.lost;
        self.kernel_failures = stats.failures;
        self.flags_unknown = stats.missing_entry;
    }
}

pub async fn run(args: TraceArgs) -> anyhow::Result<()> {
    loader::require_privileges()?;
    let tracefs = Tracefs::find_or_mount()?;
    let btf = Btf::from_kernel().context("kernel BTF is required (CONFIG_DEBUG_INFO_BTF)")?;
    let mut probes = Probes::load(&btf, &tracefs)?;
    probes.attach_clone()?;
    let ring = probes.take_clone_events()?;
    // SAFETY: the AsyncFd owns the RingBuf, so the fd stays open for as long as it is
    // registered.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("registering the ring buffer with the event loop")?;
    let mut enricher = Enricher::new(CgroupFs::discover()?);
    for member in &probes.missing_members {
        eprintln!("faultline: note: this kernel has no {member}; that evidence will be missing");
    }

    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let deadline = args.duration.map(|d| Instant::now() + d);
    let mut printer = Printer::new(args.output);
    let mut summary = Summary::default();
    let filter = Filter(&args);

    eprintln!(
        "faultline: tracing failed task creation (clone, clone3, fork, vfork) {}",
        match args.duration {
            Some(d) => format!("for {}", humantime::format_duration(d)),
            None => "until Ctrl-C".to_owned(),
        }
    );
    printer.header()?;
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                drain(guard.get_inner_mut(), &mut enricher, &filter, &mut printer, &mut summary)?;
                guard.clear_ready();
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sleep_until(deadline) => break,
        }
    }
    // Events submitted just before the stop are still in the ring.
    drain(
        ring.get_mut(),
        &mut enricher,
        &filter,
        &mut printer,
        &mut summary,
    )?;
    summary.finish(probes.clone_stats()?);
    printer.summary(&summary)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn drain(
    ring: &mut RingBuf<MapData>,
    enricher: &mut Enricher,
    filter: &Filter,
    printer: &mut Printer,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    while let Some(item) = ring.next() {
        let Some(raw) = clone::decode(&item) else {
            eprintln!(
                "faultline: skipped a ring-buffer record of {} bytes (expected a clone failure)",
                item.len()
            );
            continue;
        };
        drop(item);
        let failure = enricher.enrich(&raw);
        if filter.matches(&failure) {
            summary.add(&failure);
            printer.event(&failure)?;
        } else {
            summary.filtered_out += 1;
        }
    }
    printer.flush()
}

/// Writes events and the summary to stdout in the chosen format.
struct Printer {
    format: Output,
    out: io::Stdout,
}

const TABLE_HEADER: &str = "TIME         PID      TID      COMM             SYSCALL TASK    ERRNO  CAUSE        CGROUP / EVIDENCE";

impl Printer {
    fn new(format: Output) -> Self {
        Printer {
            format,
            out: io::stdout(),
        }
    }

    fn header(&mut self) -> anyhow::Result<()> {
        if self.format == Output::Table {
            writeln!(self.out, "{TABLE_HEADER}").context("writing to stdout")?;
            self.flush()?;
        }
        Ok(())
    }

    fn event(&mut self, f: &CloneFailure) -> anyhow::Result<()> {
        let line = match self.format {
            Output::Json => serde_json::to_string(f).context("encoding an event as JSON")?,
            Output::Table => format!(
                "{:<12} {:<8} {:<8} {:<16} {:<7} {:<7} {:<6} {:<12} {} {}",
                f.time.get(11..23).unwrap_or(&f.time),
                f.pid,
                f.tid,
                f.comm,
                f.syscall,
                f.task.as_str(),
                f.errno,
                f.cause.as_str(),
                f.cgroup,
                f.evidence
            ),
        };
        writeln!(self.out, "{line}").context("writing to stdout")
    }

    fn summary(&mut self, s: &Summary) -> anyhow::Result<()> {
        match self.format {
            Output::Json => {
                let line = serde_json::to_string(s).context("encoding the summary as JSON")?;
                writeln!(self.out, "{line}").context("writing to stdout")?;
            }
            Output::Table => {
                let join = |m: &dyn Fn() -> Vec<String>| {
                    let v = m();
                    if v.is_empty() {
                        "-".to_owned()
                    } else {
                        v.join(", ")
                    }
                };
                writeln!(
                    self.out,
                    "\n{} failed task creation(s) shown, {} filtered out, {} lost",
                    s.failures, s.filtered_out, s.lost_events
                )?;
                writeln!(
                    self.out,
                    "by cause:  {}",
                    join(&|| s.by_cause.iter().map(|(k, v)| format!("{k} {v}")).collect())
                )?;
                writeln!(
                    self.out,
                    "by cgroup: {}",
                    join(&|| s
                        .by_cgroup
                        .iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect())
                )?;
                writeln!(
                    self.out,
                    "by comm:   {}",
                    join(&|| s.by_comm.iter().map(|(k, v)| format!("{k} {v}")).collect())
                )?;
            }
        }
        if s.lost_events > 0 {
            eprintln!(
                "faultline: warning: {} failure event(s) were lost (ring buffer full); the counts above miss them",
                s.lost_events
            );
        }
        self.flush()
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        self.out.flush().context("writing to stdout")
    }
}
