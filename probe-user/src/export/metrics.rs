//! Prometheus metrics of `faultline run`: the families, who updates them, and the cap on
//! series per metric. Past the cap, new pods are counted in one overflow series (their
//! `namespace`, `pod`, `container` and `workload` labels set to `_overflow`), so one noisy node
//! cannot blow up Prometheus. Labels never carry a pid, a command or a query name.

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use probe_common::{dns::DnsTcpCounts, tasks::TaskCounts};
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::{
    attribution::pods::PodRef,
    export::totals::{KernelTotals, Total},
    kernel::loader::{CloneStats, TaskStats},
    signals::Event,
    signals::clone::CloneFailure,
    signals::conntrack::{ClashesResolved, ConntrackDrop},
    signals::conntrack::ctstats::CtCounters,
    signals::dns::DnsQuery,
    signals::clone::node::NodeTasks,
    signals::tasks::CgroupRow,
};

pub const OVERFLOW: &str = "_overflow";

/// The labels that say whose a series is.
const WHO: [&str; 4] = ["namespace", "pod", "container", "workload"];

/// Whose a series is: `namespace`, `pod`, `container`, `workload`.
#[derive(Clone, Debug, Eq)]
pub struct Who([String; 4]);

impl std::hash::Hash for Who {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl PartialEq for Who {
    /// Label by label, lengths first. Most labels are empty off Kubernetes, and glibc's AVX-512
    /// memcmp turns a compare of zero bytes at an empty `String`'s dangling pointer into a
    /// masked load the CPU assists in microcode: a third of the replay's time per event
    /// before this (`perf annotate`).
    fn eq(&self, other: &Self) -> bool {
        self.0
            .iter()
            .zip(&other.0)
            .all(|(a, b)| a.len() == b.len() && (a.is_empty() || a == b))
    }
}

impl Who {
    fn labels(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }
}

/// `namespace`, `pod`, `container`, `workload` of a pod or another workload.
pub fn who(workload: &str, pod: Option<&PodRef>) -> Who {
    // Names come from pods and cgroups: no byte a terminal running `curl /metrics` obeys.
    let label = |s: String| match crate::text::printable(&s) {
        std::borrow::Cow::Borrowed(_) => s,
        std::borrow::Cow::Owned(escaped) => escaped,
    };
    Who(match pod {
        Some(p) => [
            p.namespace.clone().unwrap_or_default(),
            p.name.clone().unwrap_or_else(|| p.uid.clone()),
            p.container.clone().unwrap_or_default(),
            p.owner
                .as_ref()
                .map(|o| format!("{}/{}", o.kind, o.name))
                .unwrap_or_default(),
        ],
        None => [
            String::new(),
            String::new(),
            String::new(),
            workload.to_owned(),
        ],
    }
    .map(label))
}

/// Series per metric, up to a cap, by workload, with when each workload's last changed. The
/// cap counts series; one workload has at most `PER_WORKLOAD` of a metric's (past them its
/// new label sets are counted under `other`), so one pod's many query types cannot push
/// other pods out. Every other label comes from a closed set (allow-lists such as
/// `qtype_label`, `rcode_label`).
struct SeriesCap {
    cap: usize,
    seen: Mutex<HashMap<&'static str, Workloads>>,
}

/// The most series one workload has of one metric: its last is the `other` set.
const PER_WORKLOAD: usize = 16;
/// Every extra label of a workload's label sets past `PER_WORKLOAD`.
const OTHER: &str = "other";

#[derive(Default)]
struct Workloads {
    /// Series admitted, all workloads together (the overflow ones apart).
    series: usize,
    /// Whose (namespace, pod, container, workload) -> (last update, the extra labels in use:
    /// short values from closed sets, so that an event costs no hash of the long ones again).
    admitted: HashMap<Who, (Instant, Vec<Vec<String>>)>,
    /// The overflow series in use (every label `_overflow`), and their last update.
    overflow: HashMap<Vec<String>, Instant>,
}

impl SeriesCap {
    /// The labels to use for `who` plus `extra`: themselves; `who` with every extra label
    /// `other` once the workload has `PER_WORKLOAD - 1` other sets; or, once the metric has
    /// `cap` series, the overflow series (every label `_overflow`, so that it does not
    /// multiply by the extra labels). The bool says the event went to overflow. Borrows: an
    /// event whose workload and label set are known allocates nothing.
    fn admit<'a>(
        &self,
        metric: &'static str,
        who: &'a Who,
        extra: &[&'a str],
    ) -> (Vec<&'a str>, bool) {
        let overflow = || vec![OVERFLOW; WHO.len() + extra.len()];
        let Ok(mut seen) = self.seen.lock() else {
            return (overflow(), true);
        };
        let workloads = seen.entry(metric).or_default();
        let now = Instant::now();
        let room = workloads.series < self.cap;
        let with = |extra: &[&'a str]| -> Vec<&'a str> {
            who.labels().chain(extra.iter().copied()).collect()
        };
        let owned = |extra: &[&str]| extra.iter().map(|e| (*e).to_owned()).collect::<Vec<_>>();
        let known = |sets: &[Vec<String>], extra: &[&str]| {
            sets.iter()
                .any(|s| s.iter().map(String::as_str).eq(extra.iter().copied()))
        };
        if let Some((t, sets)) = workloads.admitted.get_mut(who) {
            *t = now;
            if known(sets, extra) {
                return (with(extra), false);
            }
            if room && sets.len() + 1 < PER_WORKLOAD {
                sets.push(owned(extra));
                workloads.series += 1;
                return (with(extra), false);
            }
            let other = vec![OTHER; extra.len()];
            if known(sets, &other) {
                return (with(&other), false);
            }
            if room {
                sets.push(owned(&other));
                workloads.series += 1;
                return (with(&other), false);
            }
        } else if room {
            workloads
                .admitted
                .insert(who.clone(), (now, vec![owned(extra)]));
            workloads.series += 1;
            return (with(extra), false);
        }
        let labels = overflow();
        workloads
            .overflow
            .insert(labels.iter().map(|l| (*l).to_owned()).collect(), now);
        (labels, true)
    }

    /// Forgets a metric's series (gauges are rebuilt on each refresh).
    fn clear(&self, metric: &'static str) {
        if let Ok(mut seen) = self.seen.lock() {
            seen.remove(metric);
        }
    }

    /// Label sets of `metric` whose workload is gone from the node (not in `present`) and was
    /// not updated for `max_age` (the overflow series: not updated): forgotten and returned
    /// for removal. A workload still on the node keeps its series, however rare its events.
    fn expire(
        &self,
        metric: &'static str,
        max_age: Duration,
        present: &HashSet<Who>,
    ) -> Vec<Vec<String>> {
        let Ok(mut seen) = self.seen.lock() else {
            return Vec::new();
        };
        let Some(workloads) = seen.get_mut(metric) else {
            return Vec::new();
        };
        let mut old = Vec::new();
        let series = &mut workloads.series;
        workloads.admitted.retain(|who, (t, sets)| {
            let keep = t.elapsed() <= max_age || present.contains(who);
            if !keep {
                *series -= sets.len();
                old.extend(
                    sets.drain(..)
                        .map(|extra| who.labels().map(str::to_owned).chain(extra).collect()),
                );
            }
            keep
        });
        workloads.overflow.retain(|labels, t| {
            let keep = t.elapsed() <= max_age;
            if !keep {
                old.push(labels.clone());
            }
            keep
        });
        old
    }
}

/// The `rcode` label: the six codes a resolver meets, `none` (no answer), and every other
/// code as `other`.
fn rcode_label(name: &str) -> &str {
    match name {
        "NOERROR" | "FORMERR" | "SERVFAIL" | "NXDOMAIN" | "NOTIMP" | "REFUSED" | "none" => name,
        _ => OTHER,
    }
}

/// The `qtype` label: the common types by name, every other type as `other` (a pod choosing
/// among 65,536 types must not choose the series count too).
fn qtype_label(name: &str) -> &str {
    match name {
        "A" | "AAAA" | "CNAME" | "HTTPS" | "MX" | "NS" | "PTR" | "SOA" | "SRV" | "SVCB" | "TXT"
        | "ANY" | "CAA" => name,
        _ => OTHER,
    }
}

/// Counter series of workloads gone from the node (no cgroup with tasks) and not updated for
/// this long are dropped, so the exposition follows the pods on the node rather than every pod
/// that ever ran; a workload still on the node keeps its series (a failure an hour after the
/// last one still shows as an increase). A returning workload restarts from zero, which
/// Prometheus's rate() and increase() treat as a counter reset.
const STALE_AFTER: Duration = Duration::from_secs(15 * 60);

pub struct Metrics {
    registry: Registry,
    cap: SeriesCap,
    clone_failures: IntCounterVec,
    tasks_created: IntCounterVec,
    tasks_exited: IntCounterVec,
    tasks_live: IntGaugeVec,
    pids_limit: IntGaugeVec,
    pids_headroom: IntGaugeVec,
    node_threads: IntGauge,
    node_threads_max: IntGauge,
    node_pid_max: IntGauge,
    totals: KernelTotals,
    probe_attached: IntGaugeVec,
    probe_degraded: IntGaugeVec,
    dns_queries: IntCounterVec,
    dns_duration: HistogramVec,
    dns_retransmits: IntCounterVec,
    dns_tcp: IntCounterVec,
    dns_truncated: IntCounterVec,
    conntrack_drops: IntCounterVec,
    conntrack_clashes: IntCounterVec,
    conntrack_entries: IntGauge,
    conntrack_max: IntGauge,
    limit_exhaustion: prometheus::GaugeVec,
    refresh_errors: IntCounter,
    series_overflow: IntCounterVec,
    last_tcp: Mutex<HashMap<u64, DnsTcpCounts>>,
    /// Last kernel counts exported per cgroup id, to turn totals into counter increments.
    last_counts: Mutex<HashMap<u64, TaskCounts>>,
}

fn labels<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    WHO.iter().copied().chain(extra.iter().copied()).collect()
}

impl Metrics {
    pub fn new(max_series: usize) -> anyhow::Result<Self> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, l: &[&str]| -> anyhow::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), l)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge_vec = |name: &str, help: &str, l: &[&str]| -> anyhow::Result<IntGaugeVec> {
            let g = IntGaugeVec::new(Opts::new(name, help), l)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let gauge = |name: &str, help: &str| -> anyhow::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let m = Metrics {
            cap: SeriesCap {
                cap: max_series.max(1),
                seen: Mutex::new(HashMap::new()),
            },
            clone_failures: counter(
                "faultline_clone_failures_total",
                "Failed task creations (clone, clone3, fork, vfork) by cause.",
                &labels(&["cause", "errno", "task"]),
            )?,
            tasks_created: counter(
                "faultline_tasks_created_total",
                "Tasks created, by kind (thread or process).",
                &labels(&["kind"]),
            )?,
            tasks_exited: counter(
                "faultline_tasks_exited_total",
                "Tasks that exited.",
                &labels(&[]),
            )?,
            tasks_live: gauge_vec(
                "faultline_tasks_live",
                "Tasks alive in the workload's cgroups.",
                &labels(&[]),
            )?,
            pids_limit: gauge_vec(
                "faultline_pids_limit",
                "The tightest pids limit over the workload's cgroups and their ancestors.",
                &labels(&[]),
            )?,
            pids_headroom: gauge_vec(
                "faultline_pids_headroom",
                "Tasks that can still be created before that pids limit refuses one.",
                &labels(&[]),
            )?,
            node_threads: gauge("faultline_node_threads", "Threads alive on the node.")?,
            node_threads_max: gauge(
                "faultline_node_threads_max",
                "The node's kernel.threads-max.",
            )?,
            node_pid_max: gauge(
                "faultline_node_pid_max",
                "The node's kernel.pid_max (initial pid namespace).",
            )?,
            totals: {
                let t = KernelTotals::new()?;
                registry.register(Box::new(t.clone()))?;
                t
            },
            probe_attached: gauge_vec(
                "faultline_probe_attached",
                "1 when a probe's programs are attached, 0 when the kernel refused them.",
                &["probe"],
            )?,
            probe_degraded: gauge_vec(
                "faultline_probe_degraded",
                "1 when an attached probe lacks evidence for want of a privilege (the reason: e.g. kernel_addresses_hidden, no CAP_SYSLOG); see `faultline check`.",
                &["probe", "reason"],
            )?,
            dns_queries: counter(
                "faultline_dns_queries_total",
                "DNS queries over UDP, by question type, response code (none for a timeout) and outcome.",
                &labels(&["qtype", "rcode", "outcome"]),
            )?,
            dns_duration: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "faultline_dns_query_duration_seconds",
                        "Time from a DNS query to its answer.",
                    )
                    .buckets(vec![
                        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    ]),
                    &WHO,
                )?;
                registry.register(Box::new(h.clone()))?;
                h
            },
            dns_retransmits: counter(
                "faultline_dns_retransmits_total",
                "DNS queries re-sent before an answer (5 s apart: the classic resolver timeout).",
                &labels(&[]),
            )?,
            dns_tcp: counter(
                "faultline_dns_tcp_segments_total",
                "DNS over TCP port 53 segments (counted, not parsed), by direction.",
                &labels(&["direction"]),
            )?,
            dns_truncated: counter(
                "faultline_dns_truncated_total",
                "DNS answers with the TC bit: the resolver must retry over TCP.",
                &labels(&[]),
            )?,
            conntrack_drops: counter(
                "faultline_conntrack_drops_total",
                "Packets dropped by netfilter, by cause (insert_failed, table_full, rule, other) and protocol, attributed to the sending pod.",
                &labels(&["cause", "proto"]),
            )?,
            conntrack_clashes: counter(
                "faultline_conntrack_clashes_resolved_total",
                "Conntrack insert clashes the kernel resolved (near-misses of a drop), per network namespace (node, a pod, or netns:<name>).",
                &["netns"],
            )?,
            conntrack_entries: gauge(
                "faultline_conntrack_entries",
                "Entries in the node's conntrack table.",
            )?,
            conntrack_max: gauge(
                "faultline_conntrack_max",
                "nf_conntrack_max: the most entries one network namespace's table may hold.",
            )?,
            limit_exhaustion: {
                let g = prometheus::GaugeVec::new(
                    Opts::new(
                        "faultline_limit_exhaustion_seconds",
                        "Seconds until a limit is reached at its current growth (Theil-Sen slope over --trend-window): limit=pids (the workload's pids limit), pid_max and threads_max (workload=node), conntrack (the workload's network namespace's table against nf_conntrack_max). Only while growing, and within a week; 0 when reached while growing.",
                    ),
                    &labels(&["limit"]),
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            series_overflow: counter(
                "faultline_series_overflow_total",
                "Updates that went to a metric's _overflow series because it already had --max-series series.",
                &["metric"],
            )?,
            refresh_errors: {
                let c = IntCounter::new(
                    "faultline_refresh_errors_total",
                    "Refreshes of the task and conntrack metrics that failed (the daemon goes on; its stderr says why).",
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            last_tcp: Mutex::new(HashMap::new()),
            last_counts: Mutex::new(HashMap::new()),
            registry,
        };
        let info = IntGaugeVec::new(
            Opts::new(
                "faultline_build_info",
                "faultline's version and the node's kernel; always 1.",
            ),
            &["version", "kernel"],
        )?;
        m.registry.register(Box::new(info.clone()))?;
        // The agent's own CPU, memory and file descriptors (process_*), for its SLO and sizing.
        m.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        info.with_label_values(&[env!("CARGO_PKG_VERSION"), kernel.trim()])
            .set(1);
        Ok(m)
    }

    /// Counters of the OTLP exporter, registered with the others.
    pub fn otlp_counters(&self) -> anyhow::Result<crate::export::otlp::OtlpCounters> {
        let dropped = IntCounter::new(
            "faultline_otlp_dropped_events_total",
            "Events not exported over OTLP: queue full (slow collector) or request failed.",
        )?;
        let failed = IntCounter::new(
            "faultline_otlp_failed_requests_total",
            "OTLP export requests that failed.",
        )?;
        self.registry.register(Box::new(dropped.clone()))?;
        self.registry.register(Box::new(failed.clone()))?;
        Ok(crate::export::otlp::OtlpCounters {
            dropped,
            failed_requests: failed,
        })
    }

    /// Counters of the HTTP server, registered with the others.
    pub fn server_counters(&self) -> anyhow::Result<crate::export::serve::ServerCounters> {
        let shed = IntCounterVec::new(
            Opts::new(
                "faultline_http_shed_connections_total",
                "Connections to the metrics port the server closed, by reason: peer_full (its address had 16 open and opened another), slots_full (every slot of its pool was taken and another peer connected), slow_reader (still reading an exposition two generations old, or the longest reading of the /explain answers in flight past 4).",
            ),
            &["reason"],
        )?;
        let accept_errors = IntCounter::new(
            "faultline_http_accept_errors_total",
            "Errors accepting connections to the metrics port (e.g. out of file descriptors).",
        )?;
        self.registry.register(Box::new(shed.clone()))?;
        self.registry.register(Box::new(accept_errors.clone()))?;
        Ok(crate::export::serve::ServerCounters {
            shed,
            accept_errors,
        })
    }

    /// Event lines not written, by reason, registered with the others.
    pub fn event_lines_dropped(&self) -> anyhow::Result<IntCounterVec> {
        let c = IntCounterVec::new(
            Opts::new(
                "faultline_event_lines_dropped_total",
                "Event lines not written: queue_full (the reader of stdout or the file is slow), closed (stdout was closed), write_error.",
            ),
            &["reason"],
        )?;
        self.registry.register(Box::new(c.clone()))?;
        Ok(c)
    }

    pub fn refresh_failed(&self) {
        self.refresh_errors.inc();
    }

    /// The DNS probe's kernel totals of what it could not follow.
    pub fn dns_untracked(&self, stats: &crate::kernel::loader::DnsStats) {
        for (reason, total) in [
            ("pending_full", stats.untracked),
            ("cgroup_quota", stats.over_quota),
            ("malformed", stats.malformed),
            ("unmatched", stats.unmatched),
            ("tcp_map_full", stats.tcp_uncounted),
        ] {
            self.totals.set(Total::DnsUntracked, reason, total);
        }
    }

    /// `SeriesCap::admit`, counting what went to overflow.
    fn admit<'a>(&self, metric: &'static str, who: &'a Who, extra: &[&'a str]) -> Vec<&'a str> {
        let (labels, overflowed) = self.cap.admit(metric, who, extra);
        if overflowed {
            self.series_overflow.with_label_values(&[metric]).inc();
        }
        labels
    }

    pub fn probe_attached(&self, probe: &str, attached: bool) {
        self.probe_attached
            .with_label_values(&[probe])
            .set(attached as i64);
    }

    pub fn probe_degraded(&self, probe: &str, reason: &str) {
        self.probe_degraded
            .with_label_values(&[probe, reason])
            .set(1);
    }

    /// Counts one event (a headroom warning is a trace's, never the daemon's).
    pub fn event(&self, event: &Event) {
        match event {
            Event::CloneFailure(f) => self.clone_failure(f),
            Event::DnsQuery(q) => self.dns_query(q),
            Event::ConntrackDrop(d) => self.conntrack_drop(d),
            Event::ClashesResolved(c) => self.clashes_resolved(c),
            Event::HeadroomWarning(_) => {}
        }
    }

    fn clone_failure(&self, f: &CloneFailure) {
        let who = who(&f.workload, f.pod.as_ref());
        let labels = self.admit(
            "clone_failures",
            &who,
            &[f.cause.as_str(), &f.errno, f.task.as_str()],
        );
        self.clone_failures.with_label_values(&labels).inc();
    }

    fn dns_query(&self, q: &DnsQuery) {
        let who = who(&q.workload, q.pod.as_ref());
        let rcode = q.rcode.as_deref().unwrap_or("none");
        let labels = self.admit(
            "dns_queries",
            &who,
            &[qtype_label(&q.qtype), rcode_label(rcode), q.outcome.as_str()],
        );
        self.dns_queries.with_label_values(&labels).inc();
        if let Some(ms) = q.latency_ms {
            let labels = self.admit("dns_duration", &who, &[]);
            self.dns_duration
                .with_label_values(&labels)
                .observe(ms / 1000.0);
        }
        if q.truncated {
            let labels = self.admit("dns_truncated", &who, &[]);
            self.dns_truncated.with_label_values(&labels).inc();
        }
        if q.retransmit {
            let labels = self.admit("dns_retransmits", &who, &[]);
            self.dns_retransmits.with_label_values(&labels).inc();
        }
    }

    /// DNS-over-TCP totals per cgroup (id, counts, whose) from the kernel, as increments.
    pub fn dns_tcp(&self, counts: Vec<(u64, DnsTcpCounts, Who)>) {
        let Ok(mut last) = self.last_tcp.lock() else {
            return;
        };
        let mut present = HashMap::with_capacity(counts.len());
        for (id, now, who) in counts {
            let before = last.get(&id).copied().unwrap_or_default();
            for (direction, n, was) in [
                ("to_server", now.to_server, before.to_server),
                ("from_server", now.from_server, before.from_server),
            ] {
                if n > was {
                    let labels = self.admit("dns_tcp", &who, &[direction]);
                    self.dns_tcp.with_label_values(&labels).inc_by(n - was);
                }
            }
            present.insert(id, now);
        }
        *last = present;
    }

    /// Losses of a ring buffer (`dns`, `conntrack`, `cgroups`), as a running total from the
    /// kernel.
    pub fn events_lost(&self, source: &'static str, total: u64) {
        self.totals.set(Total::EventsLost, source, total);
    }

    fn conntrack_drop(&self, d: &ConntrackDrop) {
        let who = who(&d.workload, d.pod.as_ref());
        let labels = self.admit("conntrack_drops", &who, &[d.cause.as_str(), &d.proto]);
        self.conntrack_drops.with_label_values(&labels).inc();
    }

    fn clashes_resolved(&self, c: &ClashesResolved) {
        // One label (the namespace's owner), capped and expired like the others.
        let who = Who([
            c.workload.clone(),
            String::new(),
            String::new(),
            String::new(),
        ]);
        let labels = self.admit("conntrack_clashes", &who, &[]);
        self.conntrack_clashes
            .with_label_values(&labels[..1])
            .inc_by(c.count);
    }

    /// The node namespace's conntrack counters (kernel totals) and fill.
    pub fn conntrack_node(&self, c: &CtCounters) {
        for (name, total) in c.named() {
            self.totals.set(Total::ConntrackStat, name, total);
        }
        self.conntrack_entries.set(c.entries as i64);
        self.conntrack_max.set(c.max as i64);
    }

    /// The time to exhaustion of every growing limit, rebuilt on each refresh: the soonest
    /// per workload and limit.
    pub fn limit_exhaustion(&self, estimates: &[crate::trend::Estimate]) {
        let mut soonest: HashMap<(Who, &'static str), f64> = HashMap::new();
        for e in estimates {
            let Some(eta) = e.eta_s else { continue };
            let who = who(&e.workload, e.pod.as_ref());
            let slot = soonest.entry((who, e.limit.as_str())).or_insert(eta);
            *slot = slot.min(eta);
        }
        self.limit_exhaustion.reset();
        self.cap.clear("limit_exhaustion");
        for ((who, limit), eta) in soonest {
            let labels = self.admit("limit_exhaustion", &who, &[limit]);
            self.limit_exhaustion.with_label_values(&labels).set(eta);
        }
    }

    /// Exports a refresh of the task model: counter increments since the last refresh, and
    /// gauges rebuilt from scratch (so removed pods disappear).
    pub fn tasks(&self, rows: &[CgroupRow], node: NodeTasks, clone: CloneStats, tasks: TaskStats) {
        let Ok(mut last) = self.last_counts.lock() else {
            return;
        };
        let mut live: HashMap<Who, i64> = HashMap::new();
        let mut limits: HashMap<Who, (i64, i64)> = HashMap::new();
        let mut present = HashMap::with_capacity(rows.len());
        for row in rows {
            let who = who(&row.workload, row.pod.as_ref());
            let before = last.get(&row.cgroup_id).copied().unwrap_or_default();
            for (kind, now, was) in [
                ("thread", row.threads_created, before.threads),
                ("process", row.processes_created, before.processes),
            ] {
                let labels = self.admit("tasks_created", &who, &[kind]);
                self.tasks_created
                    .with_label_values(&labels)
                    .inc_by(now.saturating_sub(was));
            }
            let labels = self.admit("tasks_exited", &who, &[]);
            self.tasks_exited
                .with_label_values(&labels)
                .inc_by(row.exited.saturating_sub(before.exited));
            present.insert(
                row.cgroup_id,
                TaskCounts {
                    threads: row.threads_created,
                    processes: row.processes_created,
                    exited: row.exited,
                },
            );
            *live.entry(who.clone()).or_default() += row.live.unwrap_or(0) as i64;
            if let Some(l) = &row.pids_limit {
                let e = limits.entry(who).or_insert((l.max as i64, l.headroom));
                if l.headroom < e.1 {
                    *e = (l.max as i64, l.headroom);
                }
            }
        }
        *last = present;
        drop(last);

        let present: HashSet<Who> = live.keys().cloned().collect();
        self.tasks_live.reset();
        self.pids_limit.reset();
        self.pids_headroom.reset();
        self.cap.clear("tasks_live");
        self.cap.clear("pids_limit");
        for (who, n) in live {
            let labels = self.admit("tasks_live", &who, &[]);
            self.tasks_live.with_label_values(&labels).add(n);
        }
        for (who, (max, headroom)) in limits {
            let labels = self.admit("pids_limit", &who, &[]);
            self.pids_limit.with_label_values(&labels).set(max);
            self.pids_headroom.with_label_values(&labels).set(headroom);
        }
        self.expire_gone(&present);
        self.node_threads.set(node.threads as i64);
        self.node_threads_max.set(node.threads_max as i64);
        self.node_pid_max.set(node.pid_max as i64);
        self.totals.set(Total::EventsLost, "clone", clone.lost);
        self.totals
            .set(Total::UncountedTaskEvents, "", tasks.map_full);
    }

    /// Drops the series of workloads gone from the node (not in `present`) and quiet for
    /// STALE_AFTER; network namespaces' series when quiet that long.
    fn expire_gone(&self, present: &HashSet<Who>) {
        for (metric, vec) in [
            ("clone_failures", &self.clone_failures),
            ("tasks_created", &self.tasks_created),
            ("tasks_exited", &self.tasks_exited),
            ("dns_queries", &self.dns_queries),
            ("dns_retransmits", &self.dns_retransmits),
            ("dns_truncated", &self.dns_truncated),
            ("conntrack_drops", &self.conntrack_drops),
            ("dns_tcp", &self.dns_tcp),
        ] {
            for labels in self.cap.expire(metric, STALE_AFTER, present) {
                let _ =
                    vec.remove_label_values(&labels.iter().map(String::as_str).collect::<Vec<_>>());
            }
        }
        // Network namespaces are not workloads with tasks: their series expire when idle.
        for labels in self
            .cap
            .expire("conntrack_clashes", STALE_AFTER, &HashSet::new())
        {
            let _ = self
                .conntrack_clashes
                .remove_label_values(&[labels[0].as_str()]);
        }
        for labels in self.cap.expire("dns_duration", STALE_AFTER, present) {
            let _ = self
                .dns_duration
                .remove_label_values(&labels.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> anyhow::Result<String> {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .context("encoding metrics")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_counts_series_folds_a_workloads_many_sets_and_overflow_drops_the_extras() {
        let cap = SeriesCap {
            cap: PER_WORKLOAD + 2,
            seen: Mutex::new(HashMap::new()),
        };
        let w = |p: &str| {
            Who([
                String::from("ns"),
                p.to_owned(),
                String::new(),
                String::new(),
            ])
        };
        let full = |p: &str, x: &str| {
            (
                vec![
                    "ns".to_owned(),
                    p.to_owned(),
                    String::new(),
                    String::new(),
                    x.to_owned(),
                ],
                false,
            )
        };
        // Owned copies of what admit lends, to compare.
        let admit = |metric: &'static str, who: Who, extra: &[&str]| {
            let (labels, over) = cap.admit(metric, &who, extra);
            (
                labels.into_iter().map(str::to_owned).collect::<Vec<_>>(),
                over,
            )
        };
        // One workload's label sets: its own up to PER_WORKLOAD - 1, then one `other` set.
        let sets: Vec<String> = (0..PER_WORKLOAD + 5).map(|i| format!("T{i}")).collect();
        for (i, x) in sets.iter().enumerate() {
            let expect = if i + 1 < PER_WORKLOAD {
                x.as_str()
            } else {
                OTHER
            };
            assert_eq!(admit("m", w("a"), &[x]), full("a", expect), "{x}");
        }
        assert_eq!(
            admit("m", w("a"), &["T0"]),
            full("a", "T0"),
            "known sets stay"
        );
        // Two series left under the cap: another workload's two, then overflow.
        assert_eq!(admit("m", w("b"), &["A"]), full("b", "A"));
        assert_eq!(admit("m", w("b"), &["AAAA"]), full("b", "AAAA"));
        let over = admit("m", w("c"), &["A"]);
        assert_eq!(over, (vec![OVERFLOW.to_owned(); 5], true));
        assert_eq!(
            admit("m", w("b"), &["TXT"]),
            over,
            "a new set of an admitted one too"
        );
        assert_eq!(
            admit("m", w("d"), &["TXT"]).0,
            over.0,
            "one overflow series"
        );
        // Other metrics have their own cap.
        assert_eq!(admit("other", w("c"), &["x"]), full("c", "x"));
        let none = HashSet::new();
        assert!(cap.expire("m", Duration::from_secs(60), &none).is_empty());
        // A workload still on the node keeps its series however long it is quiet.
        let a_present = HashSet::from([w("a")]);
        assert_eq!(cap.expire("m", Duration::ZERO, &a_present).len(), 2 + 1);
        // b's two series are free again.
        assert_eq!(admit("m", w("c"), &["A"]), full("c", "A"));
        // Gone: every series of the workload is returned for removal, and its room freed.
        assert_eq!(
            cap.expire("m", Duration::ZERO, &none).len(),
            PER_WORKLOAD + 1
        );
        assert_eq!(admit("m", w("e"), &["A"]), full("e", "A"));
        cap.clear("m");
        assert_eq!(admit("m", w("d"), &["A"]), full("d", "A"));
    }

    #[test]
    fn rcodes_outside_the_common_set_are_other() {
        assert_eq!(rcode_label("NXDOMAIN"), "NXDOMAIN");
        assert_eq!(rcode_label("none"), "none");
        assert_eq!(rcode_label(&crate::signals::dns::rcode_name(9)), "other");
    }

    #[test]
    fn label_values_carry_no_terminal_controls() {
        let hostile = "/pod\u{1b}[31m\u{202e}evil\u{7}";
        let label = &who(hostile, None).0[3];
        assert!(
            label.chars().all(|c| !c.is_control() && c != '\u{202e}'),
            "{label:?}"
        );
        assert!(
            label.starts_with("/pod") && label.contains("evil"),
            "{label:?}"
        );
    }

    #[test]
    fn who_labels() {
        let pod = PodRef {
            namespace: Some("shop".into()),
            name: Some("cart-1".into()),
            uid: "u".into(),
            container: Some("app".into()),
            owner: Some(crate::attribution::kubeapi::Owner {
                kind: "Deployment".into(),
                name: "cart".into(),
            }),
            ..Default::default()
        };
        assert_eq!(
            who("shop/cart-1/app", Some(&pod)),
            Who(["shop", "cart-1", "app", "Deployment/cart"].map(String::from))
        );
        let unnamed = PodRef {
            uid: "u-1".into(),
            ..Default::default()
        };
        assert_eq!(who("pod u-1", Some(&unnamed)).0[1], "u-1");
        assert_eq!(
            who("kubelet.service", None),
            Who(["", "", "", "kubelet.service"].map(String::from))
        );
    }
}
