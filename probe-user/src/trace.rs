//! `faultline trace`: the one-shot CLI. A sink of the pipeline (load -> attach -> events ->
//! enrich, in `pipeline`) that filters and prints each event until the duration ends or
//! Ctrl-C/SIGTERM, then prints a summary.
//! With `--headroom-warn`, it also watches the per-cgroup task counters and warns when a pids
//! limit is about to refuse tasks, before the first failure.

use std::{
    collections::BTreeMap,
    io::{self, Write as _},
    time::Duration,
};

use anyhow::Context as _;
use clap::Args;
use serde::Serialize;
use tokio::{
    signal::unix::{SignalKind, signal},
    time::Instant,
};

use probe_common::conntrack::ConntrackStats;

use crate::{
    attribution::pods::{PodArgs, PodFilters},
    cli::{EventKind, Output},
    kernel::loader,
    kernel::loader::{KernelArgs, KernelLog},
    pipeline::{Pipeline, Sink},
    signals::{
        DnsOptions, DnsRefresh, Event, Line, Part, Plan, Refresh, Signal,
        clone::CloneFailure,
        conntrack::{ClashesResolved, ConntrackDrop},
        dns::{DnsQuery, Names, Outcome, Rcode},
        tasks::{HeadroomThresholds, HeadroomWarning},
    },
};

#[derive(Args, Debug)]
pub struct TraceArgs {
    /// Stop after this long (e.g. 10s, 2m); default: until Ctrl-C or SIGTERM.
    #[arg(long, value_parser = crate::cli::parse_run_time)]
    pub duration: Option<Duration>,
    /// `table`: one aligned line per event, for people; `json`: one object per line.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Only events of this process (thread group id); repeatable.
    #[arg(long = "pid", short)]
    pub pids: Vec<u32>,
    /// Only events whose command name is exactly this.
    #[arg(long)]
    pub comm: Option<String>,
    /// Only events whose cgroup (v2 path, or pids cgroup path) starts with this prefix.
    #[arg(long)]
    pub cgroup: Option<String>,
    /// Also warn when a cgroup's pids headroom drops below this share of its limit (e.g. 10%).
    #[arg(long, value_parser = crate::cli::parse_percent)]
    pub headroom_warn: Option<f64>,
    /// With --headroom-warn, also warn when a pids limit will be reached within this at the
    /// current growth (measured over the last minute).
    #[arg(long, value_parser = crate::cli::parse_horizon, default_value = "10m")]
    pub eta_warn: Duration,
    /// What to trace: failed task creation (clone), DNS queries (dns), netfilter drops and
    /// resolved clashes (conntrack). Only the programs of the events asked for are attached.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [EventKind::Clone, EventKind::Dns, EventKind::Conntrack])]
    pub events: Vec<EventKind>,
    /// A DNS query without an answer for this long is reported as a timeout.
    #[arg(long, value_parser = crate::cli::parse_timeout, default_value = "2s")]
    pub dns_timeout: Duration,
    /// Show DNS query names, or a hash of them (for privacy).
    #[arg(long, value_enum, default_value_t = Names::Full)]
    pub dns_names: Names,
    #[command(flatten)]
    pub filters: PodFilters,
    #[command(flatten)]
    pub pods: PodArgs,
    #[command(flatten)]
    pub kernel: KernelArgs,
    /// Also print what the eBPF programs log at this level and above (`warn`: evidence a
    /// failure lacks; `debug`: rejected DNS packets too). `off` costs nothing.
    #[arg(long, value_enum, default_value_t = KernelLog::Off)]
    pub kernel_log: KernelLog,
}

/// How often the pipeline refreshes for a trace: the task counters are read this often for
/// headroom warnings (a leak must be caught between the warning threshold and the limit).
const HEADROOM_TICK: Duration = Duration::from_millis(250);
/// The span a trace measures each pids limit's growth over.
const HEADROOM_TREND_WINDOW: Duration = Duration::from_secs(60);

/// Which events are shown; the others are counted as filtered out.
struct Filter<'a> {
    args: &'a TraceArgs,
    show_dns: bool,
}

impl Filter<'_> {
    fn cgroup_matches(&self, cgroup: &str, pids_cgroup: Option<&str>) -> bool {
        self.args.cgroup.as_deref().is_none_or(|prefix| {
            cgroup.starts_with(prefix) || pids_cgroup.is_some_and(|p| p.starts_with(prefix))
        })
    }

    /// Whether the trace is narrowed to processes (which only clone failures have).
    fn by_process(&self) -> bool {
        !self.args.pids.is_empty() || self.args.comm.is_some()
    }

    fn matches(&self, event: &Event) -> bool {
        let args = self.args;
        match event {
            Event::CloneFailure(f) => {
                (args.pids.is_empty() || args.pids.contains(&f.pid))
                    && args.comm.as_deref().is_none_or(|c| c == f.comm)
                    && self.cgroup_matches(&f.cgroup, f.pids_cgroup.as_deref())
                    && args.filters.matches(f.pod.as_deref())
            }
            // DNS queries belong to sockets: the cgroup and pod filters apply.
            Event::DnsQuery(q) => {
                self.show_dns
                    && !self.by_process()
                    && self.cgroup_matches(&q.cgroup, None)
                    && args.filters.matches(q.pod.as_deref())
            }
            // Drops belong to flows: the cgroup and pod filters apply to their sender.
            Event::ConntrackDrop(d) => {
                !self.by_process()
                    && self.cgroup_matches(d.cgroup.as_deref().unwrap_or("?"), None)
                    && args.filters.matches(d.pod.as_deref())
            }
            // Near-misses belong to namespaces: shown unless the trace is narrowed to a
            // process, cgroup or pod.
            Event::ClashesResolved(_) => {
                !self.by_process() && args.cgroup.is_none() && !args.filters.any()
            }
            // Warnings belong to cgroups, not processes: only the cgroup filter applies.
            Event::HeadroomWarning(w) => {
                self.cgroup_matches(&w.cgroup, Some(&w.pids_cgroup))
                    && args.filters.matches(w.pod.as_deref())
            }
        }
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
    headroom_warnings: u64,
    /// DNS queries per workload.
    dns: BTreeMap<String, DnsSummary>,
    /// DNS packets that did not parse (counted, never fatal).
    dns_malformed: u64,
    /// Queries the kernel could not track (its map of waiting queries was full).
    dns_untracked: u64,
    /// Queries the kernel did not track: their cgroup had its quota of waiting queries.
    dns_over_quota: u64,
    /// Answers with the TC bit, and answers that matched no waiting query (late, duplicate,
    /// spoofed), counted in the kernel.
    dns_truncated: u64,
    dns_unmatched: u64,
    dns_mismatched: u64,
    /// DNS query events that did not reach userspace (ring buffer full).
    dns_lost_events: u64,
    /// DNS over TCP port 53 segments in cgroups the kernel map could not count.
    dns_tcp_uncounted: u64,
    /// Packets dropped by netfilter, shown, by cause.
    conntrack_drops: BTreeMap<&'static str, u64>,
    /// Clashes the kernel resolved (near-misses), per workload of the namespace.
    conntrack_clashes_resolved: BTreeMap<String, u64>,
    /// Drops that did not reach userspace (ring buffer full).
    conntrack_lost_events: u64,
    /// Every netfilter drop the kernel program saw, before filters, by the state of the
    /// packet's conntrack entry.
    conntrack_kernel: Option<ConntrackStats>,
}

/// DNS per workload in the summary.
#[derive(Debug, Default, Serialize)]
pub struct DnsSummary {
    queries: u64,
    timeouts: u64,
    retransmits: u64,
    nxdomain: u64,
    nxdomain_share: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    /// DNS over TCP port 53 (counted, not parsed): segments to and from servers.
    tcp_segments_to_server: u64,
    tcp_segments_from_server: u64,
    #[serde(skip)]
    latencies: Vec<f64>,
    #[serde(skip)]
    answered: u64,
}

/// Latencies kept per workload for the percentiles.
const MAX_LATENCIES: usize = 20_000;
/// Keys (cgroups, commands, workloads) per summary map; the rest are counted under OTHERS, so
/// a pod naming each task anew cannot grow a long trace's memory.
const MAX_KEYS: usize = 1000;
const OTHERS: &str = "(others)";

/// The key to count under: itself, or OTHERS once the map has MAX_KEYS keys.
fn capped<V>(map: &BTreeMap<String, V>, key: &str) -> String {
    if map.len() < MAX_KEYS || map.contains_key(key) {
        key.to_owned()
    } else {
        OTHERS.to_owned()
    }
}

/// A well-mixed 64-bit value of `x` (splitmix64's finaliser): the reservoir's randomness.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl DnsSummary {
    fn add(&mut self, q: &DnsQuery) {
        self.queries += 1;
        self.timeouts += (q.outcome == Outcome::Timeout) as u64;
        self.retransmits += q.retransmit as u64;
        self.nxdomain += (q.rcode == Some(Rcode::NXDOMAIN)) as u64;
        if let Some(l) = q.latency_ms {
            // A uniform sample of at most MAX_LATENCIES (reservoir sampling), so that a long
            // trace of a busy node keeps bounded memory and fair percentiles.
            self.answered += 1;
            if self.latencies.len() < MAX_LATENCIES {
                self.latencies.push(l);
            } else {
                let slot = (splitmix(self.answered) % self.answered) as usize;
                if let Some(s) = self.latencies.get_mut(slot) {
                    *s = l;
                }
            }
        }
    }

    fn finish(&mut self) {
        self.latencies.sort_by(f64::total_cmp);
        let pct = |p: f64| -> Option<f64> {
            let n = self.latencies.len();
            (n > 0).then(|| self.latencies[((n as f64 * p).ceil() as usize).clamp(1, n) - 1])
        };
        self.p50_ms = pct(0.50);
        self.p99_ms = pct(0.99);
        self.nxdomain_share = if self.queries == 0 {
            0.0
        } else {
            self.nxdomain as f64 / self.queries as f64
        };
    }
}

impl Summary {
    fn add(&mut self, event: &Event) {
        match event {
            Event::CloneFailure(f) => {
                self.failures += 1;
                *self.by_cause.entry(f.cause.as_str()).or_default() += 1;
                let key = capped(&self.by_cgroup, &f.cgroup);
                *self.by_cgroup.entry(key).or_default() += 1;
                let key = capped(&self.by_comm, &f.comm);
                *self.by_comm.entry(key).or_default() += 1;
            }
            Event::DnsQuery(q) => {
                let key = capped(&self.dns, &q.workload);
                self.dns.entry(key).or_default().add(q);
            }
            Event::ConntrackDrop(d) => {
                *self.conntrack_drops.entry(d.cause.as_str()).or_default() += 1;
            }
            Event::ClashesResolved(c) => {
                let key = capped(&self.conntrack_clashes_resolved, &c.workload);
                *self.conntrack_clashes_resolved.entry(key).or_default() += c.count;
            }
            Event::HeadroomWarning(_) => self.headroom_warnings += 1,
        }
    }

    /// The kernel's counts, from the last refresh (taken after the stop's final delivery).
    fn finish(&mut self, last: &Refresh, filter: &Filter<'_>) {
        self.kind = "summary";
        for part in &last.parts {
            match part {
                Part::Clone(clone) => {
                    self.lost_events = clone.lost;
                    self.kernel_failures = clone.failures;
                    self.flags_unknown = clone.missing_entry;
                }
                // The rows are `top`'s; a summary has none.
                Part::Tasks(_) => {}
                Part::Dns(dns) if filter.show_dns => self.dns_counts(dns, filter),
                Part::Dns(_) => {}
                Part::Conntrack(ct) => {
                    self.conntrack_lost_events = ct.stats.lost;
                    self.conntrack_kernel = Some(ct.stats);
                }
            }
        }
        self.dns.values_mut().for_each(DnsSummary::finish);
    }

    /// The DNS programs' counters, and DNS over TCP per workload the filter selects.
    fn dns_counts(&mut self, dns: &DnsRefresh, filter: &Filter<'_>) {
        let stats = dns.stats;
        self.dns_malformed = stats.malformed;
        self.dns_untracked = stats.untracked;
        self.dns_over_quota = stats.over_quota;
        self.dns_truncated = stats.truncated;
        self.dns_unmatched = stats.unmatched;
        self.dns_mismatched = stats.mismatched;
        self.dns_lost_events = stats.lost;
        self.dns_tcp_uncounted = stats.tcp_uncounted;
        for tcp in &dns.tcp {
            if filter.cgroup_matches(tcp.cgroup.as_deref().unwrap_or("?"), None)
                && filter.args.filters.matches(tcp.pod.as_deref())
            {
                let key = capped(&self.dns, &tcp.workload);
                let d = self.dns.entry(key).or_default();
                d.tcp_segments_to_server += tcp.to_server;
                d.tcp_segments_from_server += tcp.from_server;
            }
        }
    }
}

pub async fn run(args: TraceArgs) -> anyhow::Result<()> {
    let show_dns = args.events.contains(&EventKind::Dns);
    let mut shown: Vec<Signal> = args.events.iter().map(|k| Signal::of(*k)).collect();
    if args.headroom_warn.is_some() {
        shown.push(Signal::Tasks);
    }
    let plan = Plan {
        signals: Signal::with_dependencies(&shown),
        dns: DnsOptions {
            timeout: args.dns_timeout,
            names: args.dns_names,
        },
        trend: args.headroom_warn.map(|_| HEADROOM_TREND_WINDOW),
        headroom: args.headroom_warn.map(|headroom_pct| HeadroomThresholds {
            headroom_pct,
            eta: args.eta_warn,
        }),
        idle_cgroups: false,
        drop_privileges: false,
    };
    let mut pipeline = Pipeline::open(
        &args.kernel,
        args.kernel_log,
        &args.pods,
        &plan,
        |signal, result| match result {
            Ok(()) => Ok(()),
            Err(e) if signal.core() => Err(e),
            Err(e) => {
                tracing::warn!(
                    "{} not traced: {}; the other events still are",
                    signal.what(),
                    loader::brief(&e)
                );
                Ok(())
            }
        },
    )
    .await?;
    let mut sink = Tracer {
        filter: Filter {
            args: &args,
            show_dns,
        },
        printer: Printer::new(args.output),
        summary: Summary::default(),
        last: Refresh::default(),
    };
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let deadline = args.duration.map(|d| Instant::now() + d);
    let stop = async move {
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
            () = sleep_until(deadline) => {}
        }
    };
    tracing::info!(
        "tracing {} {}",
        what(&pipeline, &shown),
        match args.duration {
            Some(d) => format!("for {}", humantime::format_duration(d)),
            None => "until Ctrl-C".to_owned(),
        }
    );
    sink.printer.header()?;
    pipeline.run(&mut sink, HEADROOM_TICK, stop).await?;
    pipeline.refresh_once(&mut sink)?;
    sink.summary.finish(&sink.last, &sink.filter);
    sink.printer.summary(&sink.summary)
}

/// What the trace follows, for its first line.
fn what(pipeline: &Pipeline, shown: &[Signal]) -> String {
    Signal::ALL
        .iter()
        .copied()
        .filter(|s| shown.contains(s) && pipeline.has(*s))
        .map(Signal::what)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `trace` as a sink of the pipeline: filters, prints and sums up.
struct Tracer<'a> {
    filter: Filter<'a>,
    printer: Printer,
    summary: Summary,
    /// The last refresh: the kernel's counts for the summary.
    last: Refresh,
}

impl Sink for Tracer<'_> {
    fn event(&mut self, event: &Event) -> anyhow::Result<()> {
        if self.filter.matches(event) {
            self.summary.add(event);
            self.printer.event(event)
        } else {
            if let Event::CloneFailure(_) = event {
                self.summary.filtered_out += 1;
            }
            Ok(())
        }
    }

    fn refresh(&mut self, refresh: &Refresh) -> anyhow::Result<()> {
        // The kernel's counts only: the summary needs no rows.
        self.last.parts = refresh
            .parts
            .iter()
            .filter(|part| !matches!(part, Part::Tasks(_)))
            .cloned()
            .collect();
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        self.printer.flush()
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn conntrack_drop_line(e: &ConntrackDrop) -> String {
    let dns = e.dns.as_ref().map_or_else(String::new, |d| {
        format!(
            " dns query id {}{}",
            d.id,
            d.qname
                .as_deref()
                .map_or_else(String::new, |n| format!(" {n}"))
        )
    });
    format!(
        "{:<12} conntrack_drop {} {} {}:{} -> {}:{} netns={}{} / {}",
        time_of_day(&e.time),
        e.cause.as_str(),
        e.workload,
        e.src,
        e.sport,
        e.dst,
        e.dport,
        e.netns,
        dns,
        e.evidence
    )
}

fn clashes_line(e: &ClashesResolved) -> String {
    format!(
        "{:<12} conntrack_clash_resolved {} netns={} count={}",
        time_of_day(&e.time),
        e.workload,
        crate::signals::conntrack::netns_text(e.netns),
        e.count
    )
}

fn dns_line(e: &DnsQuery) -> String {
    format!(
        "{:<12} dns {} {} -> {} {} {}{}{}{}{}{}",
        time_of_day(&e.time),
        e.workload,
        e.qname,
        e.server,
        e.qtype,
        e.rcode.map_or("TIMEOUT".into(), |r| r.name()),
        e.latency_ms
            .map_or_else(String::new, |l| format!(" {l:.1}ms")),
        if e.truncated { " truncated" } else { "" },
        e.retransmit_gap_ms.map_or_else(String::new, |g| format!(
            " retransmit after {:.1}s",
            g / 1000.0
        )),
        if e.search_nxdomain > 0 {
            format!(" after {} search-path NXDOMAIN", e.search_nxdomain)
        } else {
            String::new()
        },
        e.conntrack_drop
            .map_or_else(String::new, |c| format!(" dropped by conntrack: {c}")),
    )
}

/// An event as a table line.
pub fn table_line(event: &Event) -> String {
    match event {
        Event::CloneFailure(f) => clone_failure_line(f),
        Event::DnsQuery(q) => dns_line(q),
        Event::ConntrackDrop(d) => conntrack_drop_line(d),
        Event::ClashesResolved(c) => clashes_line(c),
        Event::HeadroomWarning(w) => headroom_line(w),
    }
}

fn clone_failure_line(e: &CloneFailure) -> String {
    format!(
        "{:<12} {:<8} {:<8} {:<16} {:<7} {:<7} {:<6} {:<12} {} {}",
        time_of_day(&e.time),
        e.pid,
        e.tid,
        e.comm,
        e.syscall,
        e.task.as_str(),
        e.errno,
        e.cause.as_str(),
        e.workload,
        e.evidence
    )
}

fn headroom_line(e: &HeadroomWarning) -> String {
    format!(
        "{:<12} {:<8} {:<8} {:<16} {:<7} {:<7} {:<6} {:<12} {} pids.current={} pids.max={} cgroup={} headroom={} ({:.1}%){}",
        time_of_day(&e.time),
        "-",
        "-",
        "-",
        "-",
        "-",
        "-",
        "headroom_low",
        e.workload,
        e.pids_current,
        e.pids_max,
        e.pids_cgroup,
        e.headroom,
        e.headroom_pct,
        e.eta_s
            .map(|e| format!(" full in {}", crate::diagnosis::findings::duration(e)))
            .unwrap_or_default()
    )
}

/// `key count, key count` of a summary map, `-` when empty.
fn join<K: std::fmt::Display>(m: &BTreeMap<K, u64>) -> String {
    if m.is_empty() {
        return "-".to_owned();
    }
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `HH:MM:SS.mmm` of an RFC 3339 time.
fn time_of_day(rfc3339: &str) -> &str {
    rfc3339.get(11..23).unwrap_or(rfc3339)
}

/// Writes events and the summary to stdout in the chosen format.
struct Printer {
    format: Output,
    out: io::Stdout,
}

const TABLE_HEADER: &str = "TIME         PID      TID      COMM             SYSCALL TASK    ERRNO  CAUSE        WORKLOAD / EVIDENCE";

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

    fn event(&mut self, e: &Event) -> anyhow::Result<()> {
        match self.format {
            Output::Json => {
                let line =
                    crate::text::json_line(&Line::of(e)).context("encoding an event as JSON")?;
                self.out.write_all(&line).context("writing to stdout")
            }
            Output::Table => {
                let line = crate::text::printable(&table_line(e)).into_owned();
                writeln!(self.out, "{line}").context("writing to stdout")
            }
        }
    }

    fn summary(&mut self, s: &Summary) -> anyhow::Result<()> {
        match self.format {
            Output::Json => {
                let line =
                    crate::text::json_line(&Line::of(s)).context("encoding the summary as JSON")?;
                self.out.write_all(&line).context("writing to stdout")?;
            }
            Output::Table => {
                writeln!(
                    self.out,
                    "\n{} failed task creation(s) shown, {} filtered out, {} lost",
                    s.failures, s.filtered_out, s.lost_events
                )?;
                if s.headroom_warnings > 0 {
                    writeln!(self.out, "headroom warnings: {}", s.headroom_warnings)?;
                }
                for (workload, d) in &s.dns {
                    let workload = crate::text::printable(workload);
                    writeln!(
                        self.out,
                        "dns {workload}: {} queries, p50 {} p99 {}, {} timeouts, {} retransmits, {:.0}% NXDOMAIN",
                        d.queries,
                        d.p50_ms.map_or("-".to_owned(), |v| format!("{v:.1}ms")),
                        d.p99_ms.map_or("-".to_owned(), |v| format!("{v:.1}ms")),
                        d.timeouts,
                        d.retransmits,
                        d.nxdomain_share * 100.0
                    )?;
                }
                if s.dns_untracked
                    + s.dns_over_quota
                    + s.dns_malformed
                    + s.dns_unmatched
                    + s.dns_mismatched
                    + s.dns_lost_events
                    + s.dns_tcp_uncounted
                    > 0
                {
                    writeln!(
                        self.out,
                        "dns not followed: {} queries untracked (pending-query map full), {} over their cgroup's quota, {} lost (ring buffer full), {} malformed packets, {} unmatched answers, {} answers from elsewhere or to another question (spoofed), {} TCP segments uncounted",
                        s.dns_untracked,
                        s.dns_over_quota,
                        s.dns_lost_events,
                        s.dns_malformed,
                        s.dns_unmatched,
                        s.dns_mismatched,
                        s.dns_tcp_uncounted
                    )?;
                }
                if !s.conntrack_drops.is_empty() || !s.conntrack_clashes_resolved.is_empty() {
                    writeln!(
                        self.out,
                        "conntrack drops: {}; clashes resolved: {}",
                        join(&s.conntrack_drops),
                        join(&s.conntrack_clashes_resolved)
                    )?;
                }
                writeln!(self.out, "by cause:  {}", join(&s.by_cause))?;
                let by_cgroup = join(&s.by_cgroup);
                writeln!(
                    self.out,
                    "by cgroup: {}",
                    crate::text::printable(&by_cgroup)
                )?;
                let by_comm = join(&s.by_comm);
                writeln!(self.out, "by comm:   {}", crate::text::printable(&by_comm))?;
            }
        }
        if s.conntrack_lost_events > 0 {
            tracing::warn!(
                "warning: {} conntrack drop event(s) were lost (ring buffer full)",
                s.conntrack_lost_events
            );
        }
        if s.lost_events > 0 {
            tracing::warn!(
                "warning: {} failure event(s) were lost (ring buffer full); the counts above miss them",
                s.lost_events
            );
        }
        self.flush()
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        self.out.flush().context("writing to stdout")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_maps_stop_growing_at_the_key_cap() {
        let mut m: BTreeMap<String, u64> = BTreeMap::new();
        for i in 0..MAX_KEYS + 500 {
            let key = capped(&m, &format!("comm-{i}"));
            *m.entry(key).or_default() += 1;
        }
        assert_eq!(m.len(), MAX_KEYS + 1);
        assert_eq!(m[OTHERS], 500);
        // A key already counted keeps its own entry.
        assert_eq!(capped(&m, "comm-0"), "comm-0");
    }

    #[test]
    fn the_latency_sample_is_bounded_and_fair() {
        let mut d = DnsSummary::default();
        let q = |ms: f64| DnsQuery {
            latency_ms: Some(ms),
            ..Default::default()
        };
        // 100,000 answers, the first half at 1 ms and the second at 100 ms.
        for i in 0..100_000 {
            d.add(&q(if i < 50_000 { 1.0 } else { 100.0 }));
        }
        assert_eq!(d.latencies.len(), MAX_LATENCIES);
        let slow = d.latencies.iter().filter(|l| **l > 50.0).count() as f64;
        let share = slow / MAX_LATENCIES as f64;
        assert!((0.45..0.55).contains(&share), "{share}");
        d.finish();
        assert_eq!(d.queries, 100_000);
    }
}
