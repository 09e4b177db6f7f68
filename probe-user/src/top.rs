//! `faultline top`: a live per-cgroup view of task creation, live tasks and pids headroom,
//! with the node's thread and pid totals in the header. Refreshes every second; `--once`
//! prints one snapshot (two samples a second apart, for the rates); `--output json` prints
//! snapshots as JSON lines.

use std::{
    io::{IsTerminal as _, Write as _},
    time::Duration,
};

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    attribution::pods::{PodArgs, PodFilters},
    cli::Output,
    clock::now_rfc3339,
    kernel::loader::{KernelArgs, KernelLog},
    pipeline::{Pipeline, Sink},
    signals::{
        DnsOptions, Event, Plan, Refresh, Signal,
        tasks::{CgroupRow, Snapshot, binding::binding},
    },
    trend::Limit,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Sort {
    /// Threads plus processes created per second, highest first.
    Rate,
    /// Live tasks, most first.
    Live,
    /// Pids headroom, least first (cgroups without a limit last).
    Headroom,
    /// Time until the pids limit at the current growth, soonest first (then by headroom).
    Eta,
}

#[derive(Args, Debug)]
pub struct TopArgs {
    /// Print one snapshot and exit.
    #[arg(long)]
    pub once: bool,
    /// `table`: an aligned screen for people, redrawn every interval; `json`: one snapshot
    /// object per line.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Row order.
    #[arg(long, value_enum, default_value_t = Sort::Rate)]
    pub sort: Sort,
    /// Only cgroups whose path starts with this prefix.
    #[arg(long)]
    pub cgroup: Option<String>,
    /// Rows in the table (JSON has them all).
    #[arg(long, default_value_t = 20)]
    pub rows: usize,
    /// Time between two samples (rates are per second over the last 5 s); with --once, the
    /// time between the two samples it takes.
    #[arg(long, value_parser = crate::cli::parse_period, default_value = "1s")]
    pub interval: Duration,
    /// The span each limit's growth is measured over, for the ETA column.
    #[arg(long, value_parser = crate::cli::parse_window, default_value = "1m")]
    pub trend_window: Duration,
    #[command(flatten)]
    pub filters: PodFilters,
    #[command(flatten)]
    pub pods: PodArgs,
    #[command(flatten)]
    pub kernel: KernelArgs,
}

pub async fn run(args: TopArgs) -> anyhow::Result<()> {
    let plan = Plan {
        signals: vec![Signal::Tasks],
        dns: DnsOptions::default(),
        trend: Some(args.trend_window),
        headroom: None,
        idle_cgroups: true,
        drop_privileges: false,
    };
    let mut pipeline = Pipeline::open(
        &args.kernel,
        KernelLog::Off,
        &args.pods,
        &plan,
        |_, attached| attached,
    )
    .await?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let (done, printed) = tokio::sync::oneshot::channel();
    let live_screen = args.output == Output::Table && !args.once && std::io::stdout().is_terminal();
    if !live_screen {
        tracing::info!("counting task creation per cgroup");
    }
    let mut sink = Viewer {
        args: &args,
        live_screen,
        refreshes: 0,
        done: Some(done),
    };
    let stop = async move {
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
            _ = printed => {}
        }
    };
    pipeline.run(&mut sink, args.interval, stop).await
}

/// `top` as a sink of the pipeline: a screen (or a JSON line) per refresh.
struct Viewer<'a> {
    args: &'a TopArgs,
    live_screen: bool,
    refreshes: u64,
    /// Said after the one snapshot of `--once`.
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Sink for Viewer<'_> {
    fn event(&mut self, _: &Event) -> anyhow::Result<()> {
        Ok(())
    }

    fn refresh(&mut self, refresh: &Refresh) -> anyhow::Result<()> {
        self.refreshes += 1;
        // The first refresh only starts the rates; `--once` prints one snapshot.
        let Some(tasks) = refresh.tasks() else {
            return Ok(());
        };
        if self.refreshes == 1 || (self.args.once && self.done.is_none()) {
            return Ok(());
        }
        let mut snapshot = Snapshot::new(refresh.node, tasks, now_rfc3339());
        with_etas(&mut snapshot, refresh);
        print(self.args, snapshot, self.live_screen)?;
        if self.args.once
            && let Some(done) = self.done.take()
        {
            let _ = done.send(());
        }
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Each row's and the node's time to exhaustion, from the refresh's estimates.
fn with_etas(s: &mut Snapshot, refresh: &Refresh) {
    let eta = |limit, resource: &str| refresh.estimate(limit, resource).and_then(|e| e.eta_s);
    for r in &mut s.cgroups {
        r.pids_eta_s = r
            .pids_limit
            .as_ref()
            .and_then(|l| eta(Limit::Pids, &l.cgroup));
        r.limits = refresh.limits(r);
    }
    s.node.threads_max_eta_s = eta(Limit::ThreadsMax, "node");
    s.node.pid_max_eta_s = eta(Limit::PidMax, "node");
}

fn print(args: &TopArgs, mut snapshot: Snapshot, live_screen: bool) -> anyhow::Result<()> {
    if let Some(prefix) = &args.cgroup {
        snapshot
            .cgroups
            .retain(|r| r.cgroup.starts_with(prefix.as_str()));
    }
    snapshot
        .cgroups
        .retain(|r| args.filters.matches(r.pod.as_deref()));
    sort(&mut snapshot.cgroups, args.sort);
    let mut out = std::io::stdout().lock();
    match args.output {
        Output::Json => out.write_all(&crate::text::json_line(&snapshot)?)?,
        Output::Table => {
            if live_screen {
                // Home and clear: redraw in place.
                write!(out, "\x1b[H\x1b[2J")?;
            }
            for line in render(&snapshot, args.rows) {
                writeln!(out, "{}", crate::text::printable(&line))?;
            }
            if !live_screen {
                writeln!(out)?;
            }
        }
    }
    out.flush().context("writing to stdout")
}

fn sort(rows: &mut [CgroupRow], by: Sort) {
    let rate = |r: &CgroupRow| r.threads_per_s + r.processes_per_s;
    let live = |r: &CgroupRow| r.live.unwrap_or(0);
    match by {
        Sort::Rate => rows.sort_by(|a, b| rate(b).total_cmp(&rate(a)).then(live(b).cmp(&live(a)))),
        Sort::Live => rows.sort_by(|a, b| live(b).cmp(&live(a)).then(rate(b).total_cmp(&rate(a)))),
        Sort::Headroom => rows.sort_by(|a, b| {
            let pct = |r: &CgroupRow| {
                r.pids_limit
                    .as_ref()
                    .map_or(f64::INFINITY, |l| l.headroom_pct)
            };
            pct(a).total_cmp(&pct(b))
        }),
        Sort::Eta => rows.sort_by(|a, b| {
            let eta = |r: &CgroupRow| r.pids_eta_s.unwrap_or(f64::INFINITY);
            let pct = |r: &CgroupRow| {
                r.pids_limit
                    .as_ref()
                    .map_or(f64::INFINITY, |l| l.headroom_pct)
            };
            eta(a).total_cmp(&eta(b)).then(pct(a).total_cmp(&pct(b)))
        }),
    }
}

/// Width of the cgroup column: the table fits an 80-column terminal.
const CGROUP_WIDTH: usize = 24;

/// The table, 80 columns wide: a header with node totals, then one row per cgroup.
pub fn render(s: &Snapshot, max_rows: usize) -> Vec<String> {
    let n = &s.node;
    let mut lines = vec![
        format!(
            "faultline top  {}  {} cgroup(s) counted{}",
            s.time.get(11..19).unwrap_or(&s.time),
            s.tracked_cgroups,
            if s.untracked_events > 0 {
                format!("  ({} events in uncounted cgroups)", s.untracked_events)
            } else {
                String::new()
            }
        ),
        format!(
            "node: {} threads, threads-max {} ({:.1}% left{}), pid_max {} ({:.1}%{})",
            n.threads,
            n.threads_max,
            n.threads_max_headroom_pct,
            eta_note(n.threads_max_eta_s),
            n.pid_max,
            n.pid_max_headroom_pct,
            eta_note(n.pid_max_eta_s)
        ),
        String::new(),
        format!(
            "{:<CGROUP_WIDTH$} {:>6} {:>6} {:>6} {:>7} {:>8} {:>5} {:>9}",
            "WORKLOAD", "THR/s", "PROC/s", "LIVE", "LIMIT", "HEADROOM", "ETA", "BINDS"
        ),
    ];
    for r in s.cgroups.iter().take(max_rows) {
        let (limit, headroom) = match &r.pids_limit {
            Some(l) => (l.max.to_string(), format!("{:.1}%", l.headroom_pct)),
            None => ("-".to_owned(), "-".to_owned()),
        };
        lines.push(format!(
            "{:<CGROUP_WIDTH$} {:>6.1} {:>6.1} {:>6} {:>7} {:>8} {:>5} {:>9}",
            shorten(&r.workload, CGROUP_WIDTH),
            r.threads_per_s,
            r.processes_per_s,
            r.live.map_or("-".to_owned(), |l| l.to_string()),
            limit,
            headroom,
            r.pids_eta_s.map_or("-".to_owned(), eta_short),
            binding(&r.limits).map_or("-".to_owned(), |l| l.limit.short())
        ));
    }
    if s.cgroups.len() > max_rows {
        lines.push(format!(
            "... {} more (--rows, --cgroup)",
            s.cgroups.len() - max_rows
        ));
    }
    lines
}

/// `, full in 12m` when growing.
fn eta_note(eta: Option<f64>) -> String {
    eta.map(|e| format!(", full in {}", eta_short(e)))
        .unwrap_or_default()
}

/// At most 5 characters: `45s`, `12m`, `3.5h`, `9d`.
fn eta_short(secs: f64) -> String {
    if secs < 100.0 {
        format!("{secs:.0}s")
    } else if secs < 6000.0 {
        format!("{:.0}m", secs / 60.0)
    } else if secs < 86_400.0 {
        format!("{:.1}h", secs / 3600.0)
    } else {
        format!("{:.0}d", secs / 86_400.0)
    }
}

/// Keeps the end of a long path, where pod and container ids are.
fn shorten(path: &str, width: usize) -> String {
    let chars: Vec<char> = path.chars().collect();
    if chars.len() <= width {
        return path.to_owned();
    }
    let tail: String = chars[chars.len() - (width - 1)..].iter().collect();
    format!("…{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signals::{
        clone::node::NodeTasks,
        tasks::{NodeRow, PidsLimit},
    };

    fn row(cgroup: &str, thr: f64, live: u64, pct: Option<f64>) -> CgroupRow {
        CgroupRow {
            cgroup_id: 0,
            cgroup: cgroup.into(),
            workload: cgroup.into(),
            pod: None,
            threads_per_s: thr,
            processes_per_s: 0.0,
            threads_created: 0,
            processes_created: 0,
            exited: 0,
            live: Some(live),
            pids_limit: pct.map(|p| PidsLimit {
                cgroup: cgroup.into(),
                max: 100,
                current: 100 - p as u64,
                headroom: p as i64,
                headroom_pct: p,
            }),
            pids_eta_s: (pct == Some(3.0)).then_some(30.0),
            nproc: None,
            memory: None,
            limits: Vec::new(),
        }
    }

    #[test]
    fn sorting() {
        let mut rows = vec![
            row("/a", 1.0, 50, None),
            row("/b", 9.0, 5, Some(40.0)),
            row("/c", 0.0, 99, Some(3.0)),
        ];
        sort(&mut rows, Sort::Rate);
        assert_eq!(
            rows.iter().map(|r| r.cgroup.as_str()).collect::<Vec<_>>(),
            ["/b", "/a", "/c"]
        );
        sort(&mut rows, Sort::Live);
        assert_eq!(
            rows.iter().map(|r| r.cgroup.as_str()).collect::<Vec<_>>(),
            ["/c", "/a", "/b"]
        );
        sort(&mut rows, Sort::Headroom);
        assert_eq!(
            rows.iter().map(|r| r.cgroup.as_str()).collect::<Vec<_>>(),
            ["/c", "/b", "/a"]
        );
        sort(&mut rows, Sort::Eta);
        assert_eq!(
            rows.iter().map(|r| r.cgroup.as_str()).collect::<Vec<_>>(),
            ["/c", "/b", "/a"]
        );
        assert_eq!(
            [45.0, 720.0, 12_600.0, 200_000.0].map(eta_short),
            ["45s", "12m", "3.5h", "2d"]
        );
    }

    #[test]
    fn table_fits_80_columns() {
        let long = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_5678.slice/cri-containerd-abcdef0123456789.scope";
        let s = Snapshot {
            kind: "tasks",
            time: "2026-11-22T00:31:21.322Z".into(),
            node: NodeRow::from(NodeTasks {
                threads: 46_000,
                threads_max: 192_730,
                pid_max: 4_194_304,
            }),
            cgroups: vec![
                row(long, 12345.6, 123_456, Some(0.5)),
                row("/", 0.0, 1, None),
            ],
            tracked_cgroups: 2,
            cgroups_removed: 0,
            untracked_events: 0,
        };
        let lines = render(&s, 20);
        for l in &lines {
            assert!(
                l.chars().count() <= 80,
                "{} columns: {l}",
                l.chars().count()
            );
        }
        assert!(
            lines[4].starts_with("…") && lines[4].contains("abcdef0123456789.scope"),
            "{}",
            lines[4]
        );
        assert_eq!(
            render(&s, 1).last().expect("test"),
            "... 1 more (--rows, --cgroup)"
        );
    }
}
