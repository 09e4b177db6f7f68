//! Prometheus metrics of `faultline run`: the registry of the families `families` declares,
//! which event or refresh updates each, and the cap on series per metric. Past the cap, new
//! pods are counted in one overflow series (their `namespace`, `pod`, `container` and
//! `workload` labels set to `_overflow`), so one noisy node cannot blow up Prometheus. Labels
//! never carry a pid, a command or a query name.

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use probe_common::{dns::DnsTcpCounts, tasks::TaskCounts};
use prometheus::{
    GaugeVec, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry,
    TextEncoder,
};

use probe_common::{clone::CloneStats, dns::DnsStats, tasks::TaskStats};

use crate::{
    attribution::pods::PodRef,
    export::{
        families::{self, Registered, WHO},
        otlp::OtlpCounters,
        server_counters::ServerCounters,
        totals::{KernelTotals, Total},
    },
    signals::Event,
    signals::clone::CloneFailure,
    signals::clone::node::NodeTasks,
    signals::conntrack::ctstats::CtCounters,
    signals::conntrack::{ClashesResolved, ConntrackDrop},
    signals::dns::{DnsQuery, Rcode},
    signals::tasks::CgroupRow,
};

pub const OVERFLOW: &str = "_overflow";

/// What became of event lines that were not written.
pub struct EventLineCounters {
    /// `reason`: queue_full, closed, write_error, reopen_failed (`export::lines`).
    pub dropped: IntCounterVec,
    /// `kind`: summarized by the event budget.
    pub suppressed: IntCounterVec,
}

/// Whose a series is: `namespace`, `pod`, `container`, `workload`.
#[derive(Clone, Debug, Eq)]
pub struct WhoLabels([String; 4]);

impl std::hash::Hash for WhoLabels {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl PartialEq for WhoLabels {
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

impl WhoLabels {
    fn labels(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }
}

#[cfg(test)]
impl From<[&str; 4]> for WhoLabels {
    fn from(labels: [&str; 4]) -> Self {
        WhoLabels(labels.map(String::from))
    }
}

/// `namespace`, `pod`, `container`, `workload` of a pod or another workload. A pod nothing
/// named is in namespace `unknown` as `pod-<first 8 of its uid>` (`PodRef::shown_name`).
pub fn who(workload: &str, pod: Option<&PodRef>) -> WhoLabels {
    // Names come from pods and cgroups: no byte a terminal running `curl /metrics` obeys.
    let label = |s: String| match crate::text::printable(&s) {
        std::borrow::Cow::Borrowed(_) => s,
        std::borrow::Cow::Owned(escaped) => escaped,
    };
    WhoLabels(
        match pod {
            Some(p) => [
                p.shown_namespace().to_owned(),
                p.shown_name().into_owned(),
                p.container.clone().unwrap_or_default(),
                // The owner the API gave first (kept for the pod's life by the attributor);
                // without one, the pod's own workload (never empty: alerts name it).
                p.owner
                    .as_ref()
                    .map_or_else(|| workload.to_owned(), |o| format!("{}/{}", o.kind, o.name)),
            ],
            None => [
                String::new(),
                String::new(),
                String::new(),
                workload.to_owned(),
            ],
        }
        .map(label),
    )
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
    /// Whose (namespace, pod, container, workload) -> its last update and label sets.
    admitted: HashMap<WhoLabels, Admitted>,
    /// The overflow series in use (every label `_overflow`), and their last update.
    overflow: HashMap<Vec<String>, Instant>,
}

/// One workload's series of a metric.
struct Admitted {
    at: Instant,
    sets: Vec<Set>,
}

/// One series' extra labels (short values from closed sets, so that an event costs no hash of
/// the long ones again), and the counter an event updates, once looked up: the registry's own
/// lookup hashes every label under a lock, per event.
struct Set {
    extra: Vec<String>,
    handle: Option<Handle>,
}

/// A series' value, kept by `SeriesCap` while the series is.
#[derive(Clone)]
enum Handle {
    Counter(IntCounter),
    Histogram(Histogram),
}

/// A metric vector whose series `SeriesCap` keeps.
trait Family {
    type Series: Clone;
    fn series(&self, labels: &[&str]) -> Self::Series;
    fn cached(handle: &Handle) -> Option<Self::Series>;
    fn handle(series: Self::Series) -> Handle;
}

impl Family for IntCounterVec {
    type Series = IntCounter;
    fn series(&self, labels: &[&str]) -> IntCounter {
        self.with_label_values(labels)
    }
    fn cached(handle: &Handle) -> Option<IntCounter> {
        match handle {
            Handle::Counter(c) => Some(c.clone()),
            Handle::Histogram(_) => None,
        }
    }
    fn handle(series: IntCounter) -> Handle {
        Handle::Counter(series)
    }
}

impl Family for HistogramVec {
    type Series = Histogram;
    fn series(&self, labels: &[&str]) -> Histogram {
        self.with_label_values(labels)
    }
    fn cached(handle: &Handle) -> Option<Histogram> {
        match handle {
            Handle::Histogram(h) => Some(h.clone()),
            Handle::Counter(_) => None,
        }
    }
    fn handle(series: Histogram) -> Handle {
        Handle::Histogram(series)
    }
}

impl Set {
    fn new(extra: &[&str]) -> Self {
        Set {
            extra: extra.iter().map(|e| (*e).to_owned()).collect(),
            handle: None,
        }
    }

    fn is(&self, extra: &[&str]) -> bool {
        self.extra
            .iter()
            .map(String::as_str)
            .eq(extra.iter().copied())
    }
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
        who: &'a WhoLabels,
        extra: &[&'a str],
    ) -> (Vec<&'a str>, bool) {
        self.admit_with(metric, who, extra, |labels, _| labels)
    }

    /// `admit`, then `then` with the labels and the series' cached handle (`None` for an
    /// overflow series, whose labels many workloads share and whose handle is not kept).
    fn admit_with<'a, R>(
        &self,
        metric: &'static str,
        who: &'a WhoLabels,
        extra: &[&'a str],
        then: impl FnOnce(Vec<&'a str>, Option<&mut Option<Handle>>) -> R,
    ) -> (R, bool) {
        let overflow = || vec![OVERFLOW; WHO.len() + extra.len()];
        let Ok(mut seen) = self.seen.lock() else {
            return (then(overflow(), None), true);
        };
        let workloads = seen.entry(metric).or_default();
        let now = Instant::now();
        let room = workloads.series < self.cap;
        let with = |extra: &[&'a str]| -> Vec<&'a str> {
            who.labels().chain(extra.iter().copied()).collect()
        };
        if let Some(admitted) = workloads.admitted.get_mut(who) {
            admitted.at = now;
            let sets = &mut admitted.sets;
            // The common case (a known set) allocates nothing.
            if let Some(i) = sets.iter().position(|s| s.is(extra)) {
                return (then(with(extra), Some(&mut sets[i].handle)), false);
            }
            if room && sets.len() + 1 < PER_WORKLOAD {
                sets.push(Set::new(extra));
                workloads.series += 1;
                let i = sets.len() - 1;
                return (then(with(extra), Some(&mut sets[i].handle)), false);
            }
            let other = vec![OTHER; extra.len()];
            if let Some(i) = sets.iter().position(|s| s.is(&other)) {
                return (then(with(&other), Some(&mut sets[i].handle)), false);
            }
            if room {
                sets.push(Set::new(&other));
                workloads.series += 1;
                let i = sets.len() - 1;
                return (then(with(&other), Some(&mut sets[i].handle)), false);
            }
        } else if room {
            let admitted = workloads.admitted.entry(who.clone()).or_insert(Admitted {
                at: now,
                sets: vec![Set::new(extra)],
            });
            workloads.series += 1;
            return (then(with(extra), Some(&mut admitted.sets[0].handle)), false);
        }
        let labels = overflow();
        workloads
            .overflow
            .insert(labels.iter().map(|l| (*l).to_owned()).collect(), now);
        (then(labels, None), true)
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
        present: &HashSet<WhoLabels>,
    ) -> Vec<Vec<String>> {
        let Ok(mut seen) = self.seen.lock() else {
            return Vec::new();
        };
        let Some(workloads) = seen.get_mut(metric) else {
            return Vec::new();
        };
        let mut old = Vec::new();
        let series = &mut workloads.series;
        workloads.admitted.retain(|who, admitted| {
            let keep = admitted.at.elapsed() <= max_age || present.contains(who);
            if !keep {
                *series -= admitted.sets.len();
                old.extend(
                    admitted
                        .sets
                        .drain(..)
                        .map(|set| who.labels().map(str::to_owned).chain(set.extra).collect()),
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
        crate::memory::shrink(&mut workloads.admitted);
        crate::memory::shrink(&mut workloads.overflow);
        old
    }
}

/// The `rcode` label: the six codes a resolver meets, `none` (no answer), and every other
/// code as `other`.
fn rcode_label(rcode: Option<Rcode>) -> &'static str {
    match rcode {
        None => "none",
        Some(r) => r.known().unwrap_or(OTHER),
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
    binding_limit: IntGaugeVec,
    node_threads: IntGauge,
    node_threads_max: IntGauge,
    nproc_unread: IntGauge,
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
    limit_exhaustion: GaugeVec,
    refresh_errors: IntCounter,
    series_overflow: IntCounterVec,
    last_tcp: Mutex<HashMap<u64, DnsTcpCounts>>,
    /// Last kernel counts exported per cgroup id, to turn totals into counter increments.
    last_counts: Mutex<HashMap<u64, TaskCounts>>,
}

impl Metrics {
    pub fn new(max_series: usize) -> anyhow::Result<Self> {
        let registry = Registry::new();
        let mut f = Registered::new(&registry, families::RUN)?;
        let totals = KernelTotals::new().context("the kernel totals")?;
        registry
            .register(Box::new(totals.clone()))
            .context("registering the kernel totals")?;
        // The agent's own CPU, memory and file descriptors (process_*), for its SLO and sizing.
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .context("registering the process metrics")?;
        let info: IntGaugeVec = f.take("faultline_build_info")?;
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        info.with_label_values(&[env!("CARGO_PKG_VERSION"), kernel.trim()])
            .set(1);
        let m = Metrics {
            cap: SeriesCap {
                cap: max_series.max(1),
                seen: Mutex::new(HashMap::new()),
            },
            clone_failures: f.take("faultline_clone_failures_total")?,
            tasks_created: f.take("faultline_tasks_created_total")?,
            tasks_exited: f.take("faultline_tasks_exited_total")?,
            tasks_live: f.take("faultline_tasks_live")?,
            pids_limit: f.take("faultline_pids_limit")?,
            pids_headroom: f.take("faultline_pids_headroom")?,
            binding_limit: f.take("faultline_binding_limit")?,
            node_threads: f.take("faultline_node_threads")?,
            node_threads_max: f.take("faultline_node_threads_max")?,
            nproc_unread: f.take("faultline_nproc_processes_unread")?,
            node_pid_max: f.take("faultline_node_pid_max")?,
            totals,
            probe_attached: f.take("faultline_probe_attached")?,
            probe_degraded: f.take("faultline_probe_degraded")?,
            dns_queries: f.take("faultline_dns_queries_total")?,
            dns_duration: f.take("faultline_dns_query_duration_seconds")?,
            dns_retransmits: f.take("faultline_dns_retransmits_total")?,
            dns_tcp: f.take("faultline_dns_tcp_segments_total")?,
            dns_truncated: f.take("faultline_dns_truncated_total")?,
            conntrack_drops: f.take("faultline_conntrack_drops_total")?,
            conntrack_clashes: f.take("faultline_conntrack_clashes_resolved_total")?,
            conntrack_entries: f.take("faultline_conntrack_entries")?,
            conntrack_max: f.take("faultline_conntrack_max")?,
            limit_exhaustion: f.take("faultline_limit_exhaustion_seconds")?,
            series_overflow: f.take("faultline_series_overflow_total")?,
            refresh_errors: f.take("faultline_refresh_errors_total")?,
            last_tcp: Mutex::new(HashMap::new()),
            last_counts: Mutex::new(HashMap::new()),
            registry,
        };
        f.finish()?;
        Ok(m)
    }

    /// Counters of the OTLP exporter, registered with the others.
    pub fn otlp_counters(&self) -> anyhow::Result<OtlpCounters> {
        let mut f = Registered::new(&self.registry, families::OTLP)?;
        let counters = OtlpCounters {
            dropped: f.take("faultline_otlp_dropped_events_total")?,
            failed_requests: f.take("faultline_otlp_failed_requests_total")?,
        };
        f.finish()?;
        Ok(counters)
    }

    /// Counters of the HTTP server, registered with the others.
    pub fn server_counters(&self) -> anyhow::Result<ServerCounters> {
        let mut f = Registered::new(&self.registry, families::HTTP_SERVER)?;
        let counters = ServerCounters {
            shed: f.take("faultline_http_shed_connections_total")?,
            accept_errors: f.take("faultline_http_accept_errors_total")?,
        };
        f.finish()?;
        Ok(counters)
    }

    /// Event lines not written, by reason, registered with the others.
    /// The event lines' counters (registered with the lines, when they are written).
    pub fn event_line_counters(&self) -> anyhow::Result<EventLineCounters> {
        let mut f = Registered::new(&self.registry, families::EVENT_LINES)?;
        let counters = EventLineCounters {
            dropped: f.take("faultline_event_lines_dropped_total")?,
            suppressed: f.take("faultline_event_lines_suppressed_total")?,
        };
        f.finish()?;
        Ok(counters)
    }

    /// `faultline_kube_events_total{result}`, registered with the others.
    pub fn kube_events_counter(&self) -> anyhow::Result<IntCounterVec> {
        let mut f = Registered::new(&self.registry, families::KUBE_EVENTS)?;
        let counter = f.take("faultline_kube_events_total")?;
        f.finish()?;
        Ok(counter)
    }

    pub fn refresh_failed(&self) {
        self.refresh_errors.inc();
    }

    /// The DNS probe's kernel totals of what it could not follow.
    pub fn dns_untracked(&self, stats: &DnsStats) {
        for (reason, total) in [
            ("pending_full", stats.untracked),
            ("cgroup_quota", stats.over_quota),
            ("malformed", stats.malformed),
            ("unmatched", stats.unmatched),
            ("mismatched", stats.mismatched),
            ("tcp_map_full", stats.tcp_uncounted),
        ] {
            self.totals.set(Total::DnsUntracked, reason, total);
        }
    }

    /// `SeriesCap::admit`, counting what went to overflow.
    fn admit<'a>(
        &self,
        metric: &'static str,
        who: &'a WhoLabels,
        extra: &[&'a str],
    ) -> Vec<&'a str> {
        let (labels, overflowed) = self.cap.admit(metric, who, extra);
        if overflowed {
            self.series_overflow.with_label_values(&[metric]).inc();
        }
        labels
    }

    /// The series of `who` plus `extra` in `vec`, admitted as `admit` does; looked up in the
    /// registry once per series, then kept with it (an event's hot path).
    fn series<F: Family>(
        &self,
        vec: &F,
        metric: &'static str,
        who: &WhoLabels,
        extra: &[&str],
    ) -> F::Series {
        let (series, overflowed) = self.cap.admit_with(metric, who, extra, |labels, slot| {
            let Some(slot) = slot else {
                return vec.series(&labels);
            };
            if let Some(cached) = slot.as_ref().and_then(F::cached) {
                return cached;
            }
            let series = vec.series(&labels);
            *slot = Some(F::handle(series.clone()));
            series
        });
        if overflowed {
            self.series_overflow.with_label_values(&[metric]).inc();
        }
        series
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
        let who = who(&f.workload, f.pod.as_deref());
        self.series(
            &self.clone_failures,
            "clone_failures",
            &who,
            &[f.cause.as_str(), &f.errno, f.task.as_str()],
        )
        .inc();
    }

    fn dns_query(&self, q: &DnsQuery) {
        let who = who(&q.workload, q.pod.as_deref());
        self.series(
            &self.dns_queries,
            "dns_queries",
            &who,
            &[
                qtype_label(&q.qtype),
                rcode_label(q.rcode),
                q.outcome.as_str(),
            ],
        )
        .inc();
        if let Some(ms) = q.latency_ms {
            self.series(&self.dns_duration, "dns_duration", &who, &[])
                .observe(ms / 1000.0);
        }
        if q.truncated {
            self.series(&self.dns_truncated, "dns_truncated", &who, &[])
                .inc();
        }
        if q.retransmit {
            self.series(&self.dns_retransmits, "dns_retransmits", &who, &[])
                .inc();
        }
    }

    /// DNS-over-TCP totals per cgroup (id, counts, whose) from the kernel, as increments.
    pub fn dns_tcp(&self, counts: Vec<(u64, DnsTcpCounts, WhoLabels)>) {
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
                    self.series(&self.dns_tcp, "dns_tcp", &who, &[direction])
                        .inc_by(n - was);
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

    /// The Kubernetes API's failed requests since the start.
    pub fn kube_api_errors(&self, total: u64) {
        self.totals.set(Total::KubeApiErrors, "", total);
    }

    fn conntrack_drop(&self, d: &ConntrackDrop) {
        let who = who(&d.workload, d.pod.as_deref());
        self.series(
            &self.conntrack_drops,
            "conntrack_drops",
            &who,
            &[d.cause.as_str(), &d.proto],
        )
        .inc();
    }

    fn clashes_resolved(&self, c: &ClashesResolved) {
        // One label (the namespace's owner), capped and expired like the others.
        let who = WhoLabels([
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

    /// Increases of the kernel's refusal counters no event explained (running totals).
    pub fn refusals_unexplained(&self, totals: &[(crate::signals::refusals::Counter, u64)]) {
        for (counter, n) in totals {
            self.totals
                .set(Total::RefusalsUnexplained, counter.as_str(), *n);
        }
    }

    /// The time to exhaustion of every growing limit, rebuilt on each refresh: the soonest
    /// per workload and limit.
    pub fn limit_exhaustion(&self, estimates: &[crate::trend::Estimate]) {
        let mut soonest: HashMap<(WhoLabels, &'static str), f64> = HashMap::new();
        for e in estimates {
            let Some(eta) = e.eta_s else { continue };
            let who = who(&e.workload, e.pod.as_deref());
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

    /// The limit binding first per workload (over its cgroups), rebuilt on each refresh.
    pub fn binding_limits(&self, refresh: &crate::signals::Refresh) {
        use crate::signals::tasks::binding::{LimitUse, binding};
        let mut first: HashMap<WhoLabels, LimitUse> = HashMap::new();
        for row in refresh.rows() {
            let limits = refresh.limits(row);
            let Some(b) = binding(&limits) else { continue };
            let who = who(&row.workload, row.pod.as_deref());
            let next = match first.remove(&who) {
                Some(seen) => binding(&[seen.clone(), b.clone()]).cloned().unwrap_or(seen),
                None => b.clone(),
            };
            first.insert(who, next);
        }
        self.binding_limit.reset();
        self.cap.clear("binding_limit");
        for (who, l) in first {
            let labels = self.admit("binding_limit", &who, &[l.limit.as_str()]);
            self.binding_limit
                .with_label_values(&labels)
                .set(l.headroom);
        }
    }

    /// Processes of counted cgroups the RLIMIT_NPROC census did not read.
    pub fn nproc_unread(&self, n: u64) {
        self.nproc_unread.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Exports a refresh of the task model: counter increments since the last refresh, and
    /// gauges rebuilt from scratch (so removed pods disappear).
    pub fn tasks(&self, rows: &[CgroupRow], node: NodeTasks, clone: CloneStats, tasks: TaskStats) {
        let Ok(mut last) = self.last_counts.lock() else {
            return;
        };
        let mut live: HashMap<WhoLabels, i64> = HashMap::new();
        let mut limits: HashMap<WhoLabels, (i64, i64)> = HashMap::new();
        let mut present = HashMap::with_capacity(rows.len());
        for row in rows {
            let who = who(&row.workload, row.pod.as_deref());
            let before = last.get(&row.cgroup_id).copied().unwrap_or_default();
            for (kind, now, was) in [
                ("thread", row.threads_created, before.threads),
                ("process", row.processes_created, before.processes),
            ] {
                self.series(&self.tasks_created, "tasks_created", &who, &[kind])
                    .inc_by(now.saturating_sub(was));
            }
            self.series(&self.tasks_exited, "tasks_exited", &who, &[])
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

        let present: HashSet<WhoLabels> = live.keys().cloned().collect();
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
    fn expire_gone(&self, present: &HashSet<WhoLabels>) {
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
            WhoLabels([
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
        let admit = |metric: &'static str, who: WhoLabels, extra: &[&str]| {
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
    fn a_series_kept_is_the_registrys_until_it_is_forgotten() -> anyhow::Result<()> {
        let m = Metrics::new(100)?;
        let who = WhoLabels::from(["ns", "p", "c", "Deployment/w"]);
        let labels = ["ns", "p", "c", "Deployment/w", "to_server"];
        let count = || m.series(&m.dns_tcp, "dns_tcp", &who, &["to_server"]).inc();
        count();
        count();
        assert_eq!(m.dns_tcp.with_label_values(&labels).get(), 2);
        // Forgotten as expire_gone does: the next event starts a new series, and counts in it
        // (not in a kept handle the registry no longer has).
        for gone in m.cap.expire("dns_tcp", Duration::ZERO, &HashSet::new()) {
            m.dns_tcp
                .remove_label_values(&gone.iter().map(String::as_str).collect::<Vec<_>>())?;
        }
        count();
        assert_eq!(m.dns_tcp.with_label_values(&labels).get(), 1);
        Ok(())
    }

    #[test]
    fn series_of_pods_gone_are_forgotten_with_their_room() {
        let cap = SeriesCap {
            cap: 2_000,
            seen: Mutex::new(HashMap::new()),
        };
        for i in 0..3_000 {
            let who = WhoLabels::from(["churn", &format!("job-{i}"), "app", "Job/x"]);
            cap.admit("m", &who, &["thread"]);
        }
        let room = |cap: &SeriesCap| {
            let seen = cap.seen.lock().expect("test");
            (seen["m"].admitted.capacity(), seen["m"].overflow.len())
        };
        let (full, overflow) = room(&cap);
        assert!(full >= 2_000 && overflow == 1, "{full} {overflow}");
        let gone = cap.expire("m", Duration::ZERO, &HashSet::new());
        assert_eq!(gone.len(), 2_000 + 1);
        assert!(room(&cap).0 <= 64, "{}", room(&cap).0);
    }

    #[test]
    fn rcodes_outside_the_common_set_are_other() {
        assert_eq!(rcode_label(Some(Rcode::NXDOMAIN)), "NXDOMAIN");
        assert_eq!(rcode_label(None), "none");
        assert_eq!(rcode_label(Some(Rcode(9))), "other");
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
            WhoLabels(["shop", "cart-1", "app", "Deployment/cart"].map(String::from))
        );
        // A pod nothing named: never its bare uid, and never an empty namespace.
        let uid = "0d3e2f1a-8b7c-4d6e-9f00-112233445566";
        let unnamed = PodRef {
            uid: uid.into(),
            ..Default::default()
        };
        let workload = format!("pod {uid}/4f8e0c6b1a2d");
        assert_eq!(
            who(&workload, Some(&unnamed)),
            WhoLabels(["unknown", "pod-0d3e2f1a", "", &workload].map(String::from))
        );
        assert_eq!(
            who("kubelet.service", None),
            WhoLabels(["", "", "", "kubelet.service"].map(String::from))
        );
    }
}
