//! The Prometheus families the daemon exports of its own (the kernel's running totals are
//! `totals`'): one declarative table of name, help, labels and kind per family, and their
//! registration, handed out by name as typed handles to `metrics`, which updates them.

use std::collections::HashMap;

use anyhow::{Context as _, bail};
use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, core::Collector,
};

/// The labels that say whose a series is.
pub const WHO: [&str; 4] = ["namespace", "pod", "container", "workload"];

/// A family's label names.
#[derive(Clone, Copy)]
pub enum Labels {
    /// [`WHO`] (`namespace`, `pod`, `container`, `workload`), then these.
    Whose(&'static [&'static str]),
    /// These alone (none for a family of one series).
    Own(&'static [&'static str]),
}

impl Labels {
    fn names(self) -> Vec<&'static str> {
        match self {
            Labels::Whose(extra) => WHO.iter().chain(extra).copied().collect(),
            Labels::Own(names) => names.to_vec(),
        }
    }
}

/// The Prometheus type that holds a family's series.
#[derive(Clone, Copy)]
pub enum Kind {
    /// One counter, no labels.
    IntCounter,
    IntCounterVec,
    /// One gauge, no labels.
    IntGauge,
    IntGaugeVec,
    /// Gauges of fractional values (seconds).
    GaugeVec,
    /// Histograms with these bucket bounds.
    HistogramVec(&'static [f64]),
}

/// One family of the table.
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub labels: Labels,
    pub kind: Kind,
}

/// No labels: a family of one series.
const ONE: Labels = Labels::Own(&[]);

/// Bounds of the DNS latency histogram, in seconds.
const DNS_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The families of `faultline run`, registered by `Metrics::new` in this order.
pub const RUN: &[Family] = &[
    Family {
        name: "faultline_clone_failures_total",
        help: "Failed task creations (clone, clone3, fork, vfork) by cause.",
        labels: Labels::Whose(&["cause", "errno", "task"]),
        kind: Kind::IntCounterVec,
    },
    Family {
        name: "faultline_tasks_created_total",
        help: "Tasks created, by kind (thread or process).",
        labels: Labels::Whose(&["kind"]),
        kind: Kind::IntCounterVec,
    },
    Family {
        name: "faultline_tasks_exited_total",
        help: "Tasks that exited.",
        labels: Labels::Whose(&[]),
        kind: Kind::IntCounterVec,
    },
    Family {
        name: "faultline_tasks_live",
        help: "Tasks alive in the workload's cgroups.",
        labels: Labels::Whose(&[]),
        kind: Kind::IntGaugeVec,
    },
    Family {
        name: "faultline_pids_limit",
        help: "The tightest pids limit over the workload's cgroups and their ancestors.",
        labels: Labels::Whose(&[]),
        kind: Kind::IntGaugeVec,
    },
    Family {
        name: "faultline_pids_headroom",
        help: "Tasks that can still be created before that pids limit refuses one.",
        labels: Labels::Whose(&[]),
        kind: Kind::IntGaugeVec,
    },
    Family {
        name: "faultline_binding_limit",
        help: "The limit that refuses the workload's next task first, of those copy_process() checks (memory: rough, in 16 KiB kernel stacks; rlimit_nproc: the uid's tasks node-wide; threads_max; pid_max; pids), and the tasks it still allows. One series per workload.",
        labels: Labels::Whose(&["limit"]),
        kind: Kind::IntGaugeVec,
    },
    Family {
        name: "faultline_node_threads",
        help: "Threads alive on the node.",
        labels: ONE,
        kind: Kind::IntGauge,
    },
    Family {
        name: "faultline_nproc_processes_unread",
        help: "Processes of counted cgroups not read for their uid and RLIMIT_NPROC (past the first 16 of each cgroup): a uid running only there has no RLIMIT_NPROC forecast. Each uid's count is the kernel's, whatever this says.",
        labels: ONE,
        kind: Kind::IntGauge,
    },
    Family {
        name: "faultline_node_threads_max",
        help: "The node's kernel.threads-max.",
        labels: ONE,
        kind: Kind::IntGauge,
    },
    Family {
        name: "faultline_node_pid_max",
        help: "The node's kernel.pid_max (initial pid namespace).",
        labels: ONE,
        kind: Kind::IntGauge,
    },
    Family {
        name: "faultline_probe_attached",
        help: "1 when a probe's programs are attached, 0 when the kernel refused them.",
        labels: Labels::Own(&["probe"]),
        kind: Kind::IntGaugeVec,
    },
    Family {
        name: "faultline_probe_degraded",
        help: "1 when an attached probe lacks evidence for want of a privilege (the reason: e.g. kernel_addresses_hidden, no CAP_SYSLOG); see `faultline check`.",
        labels: Labels::Own(&["probe", "reason"]),
        kind: Kind::IntGaugeVec,
    },
    Family {
        name: "faultline_dns_queries_total",
        help: "DNS queries over UDP, by question type, response code (none for a timeout) and outcome.",
        labels: Labels::Whose(&["qtype", "rcode", "outcome"]),
        kind: Kind::IntCounterVec,
    },
    Family {
        name: "faultline_dns_query_duration_seconds",
        help: "Time from a DNS query to its answer.",
        labels: Labels::Whose(&[]),
        kind: Kind::HistogramVec(DNS_BUCKETS),
    },
    Family {
        name: "faultline_dns_retransmits_total",
        help: "DNS queries re-sent before an answer (5 s apart: the classic resolver timeout).",
        labels: Labels::Whose(&[]),
        kind: Kind::IntCounterVec,
    },
    Family {
        name: "faultline_dns_tcp_segments_total",
        help: "DNS over TCP port 53 segments (counted, not parsed), by direction.",
        labels: Labels::Whose(&["direction"]),
        kind: Kind::IntCounterVec,
    },
    Family {
        name: "faultline_dns_truncated_total",
        help: "DNS answers with the TC bit: the resolver must retry over TCP.",
        labels: Labels::Whose(&[]),
        kind: Kind::IntCounterVec,
    },
    Family {
        name: "faultline_conntrack_drops_total",
        help: "Packets dropped by netfilter, by cause (insert_failed, table_full, rule, other) and protocol, attributed to the sending pod.",
        labels: Labels::Whose(&["cause", "proto"]),
        kind: Kind::IntCounterVec,
    },
    Family {
        name: "faultline_conntrack_clashes_resolved_total",
        help: "Conntrack insert clashes the kernel resolved (near-misses of a drop), per network namespace (node, a pod, or netns:<name>).",
        labels: Labels::Own(&["netns"]),
        kind: Kind::IntCounterVec,
    },
    Family {
        name: "faultline_conntrack_entries",
        help: "Entries in the node's conntrack table.",
        labels: ONE,
        kind: Kind::IntGauge,
    },
    Family {
        name: "faultline_conntrack_max",
        help: "nf_conntrack_max: the most entries one network namespace's table may hold.",
        labels: ONE,
        kind: Kind::IntGauge,
    },
    Family {
        name: "faultline_limit_exhaustion_seconds",
        help: "Seconds until a limit is reached at its current growth (Theil-Sen slope over --trend-window): limit=pids (the workload's pids limit), rlimit_nproc (workload=uid:<n>, one uid's tasks node-wide against its RLIMIT_NPROC; at most 64 uids), pid_max and threads_max (workload=node), conntrack (the workload's network namespace's table against nf_conntrack_max). Only while growing, and within a week; 0 when reached while growing.",
        labels: Labels::Whose(&["limit"]),
        kind: Kind::GaugeVec,
    },
    Family {
        name: "faultline_series_overflow_total",
        help: "Updates that went to a metric's _overflow series because it already had --max-series series.",
        labels: Labels::Own(&["metric"]),
        kind: Kind::IntCounterVec,
    },
    Family {
        name: "faultline_refresh_errors_total",
        help: "Refreshes of the task and conntrack metrics that failed (the daemon goes on; its stderr says why).",
        labels: ONE,
        kind: Kind::IntCounter,
    },
    Family {
        name: "faultline_build_info",
        help: "faultline's version and the node's kernel; always 1.",
        labels: Labels::Own(&["version", "kernel"]),
        kind: Kind::IntGaugeVec,
    },
];

/// The OTLP exporter's families, registered when it starts (`Metrics::otlp_counters`).
pub const OTLP: &[Family] = &[
    Family {
        name: "faultline_otlp_dropped_events_total",
        help: "Events not exported over OTLP: the queue of their signal full (collector down or slow), their batch refused by the collector, or still queued when the daemon stopped.",
        labels: ONE,
        kind: Kind::IntCounter,
    },
    Family {
        name: "faultline_otlp_failed_requests_total",
        help: "OTLP export attempts that failed: refused, unanswered or unreachable (each retry counts).",
        labels: ONE,
        kind: Kind::IntCounter,
    },
];

/// The HTTP server's families, registered when it starts (`Metrics::server_counters`).
pub const HTTP_SERVER: &[Family] = &[
    Family {
        name: "faultline_http_shed_connections_total",
        help: "Connections to the metrics port the server closed, by reason: peer_full (its address had 16 open and opened another), slots_full (every slot of its pool was taken and another peer connected), slow_reader (still reading an exposition two generations old, or the longest reading of the /explain answers in flight past 4).",
        labels: Labels::Own(&["reason"]),
        kind: Kind::IntCounterVec,
    },
    Family {
        name: "faultline_http_accept_errors_total",
        help: "Errors accepting connections to the metrics port (e.g. out of file descriptors).",
        labels: ONE,
        kind: Kind::IntCounter,
    },
];

/// The event lines' family, registered when they are written (`Metrics::event_lines_dropped`).
pub const EVENT_LINES: &[Family] = &[
    Family {
        name: "faultline_event_lines_dropped_total",
        help: "Event lines not written: queue_full (the reader of stdout or the file is slow), closed (stdout was closed), write_error, reopen_failed (after SIGHUP the events file could not be opened again: not a regular file, a symbolic link, ...; tried every second).",
        labels: Labels::Own(&["reason"]),
        kind: Kind::IntCounterVec,
    },
    Family {
        name: "faultline_event_lines_suppressed_total",
        help: "Events of the kinds asked for that the event budget summarized instead of writing as a line and an OTLP record (counted in the metrics and /explain all the same), by kind.",
        labels: Labels::Own(&["kind"]),
        kind: Kind::IntCounterVec,
    },
];

/// The Kubernetes Events' family, registered when they are recorded (`--kube-events`).
pub const KUBE_EVENTS: &[Family] = &[Family {
    name: "faultline_kube_events_total",
    help: "Kubernetes Events on affected pods, by result: created, updated (a series patched with a new count), dropped (queue full, or forgotten past the cap of followed Events, counted per occurrence), failed (an API call failed; retried within the rates).",
    labels: Labels::Own(&["result"]),
    kind: Kind::IntCounterVec,
}];

/// A registered family, as its Prometheus type.
pub enum Handle {
    IntCounter(IntCounter),
    IntCounterVec(IntCounterVec),
    IntGauge(IntGauge),
    IntGaugeVec(IntGaugeVec),
    GaugeVec(GaugeVec),
    HistogramVec(HistogramVec),
}

impl Family {
    /// Creates the family and registers it with `registry`.
    fn register(&self, registry: &Registry) -> anyhow::Result<Handle> {
        let labels = self.labels.names();
        let opts = || Opts::new(self.name, self.help);
        let handle = match self.kind {
            Kind::IntCounter | Kind::IntGauge if !labels.is_empty() => {
                bail!("a family of one series has no labels")
            }
            Kind::IntCounter => Handle::IntCounter(IntCounter::with_opts(opts())?),
            Kind::IntCounterVec => Handle::IntCounterVec(IntCounterVec::new(opts(), &labels)?),
            Kind::IntGauge => Handle::IntGauge(IntGauge::with_opts(opts())?),
            Kind::IntGaugeVec => Handle::IntGaugeVec(IntGaugeVec::new(opts(), &labels)?),
            Kind::GaugeVec => Handle::GaugeVec(GaugeVec::new(opts(), &labels)?),
            Kind::HistogramVec(buckets) => Handle::HistogramVec(HistogramVec::new(
                HistogramOpts::new(self.name, self.help).buckets(buckets.to_vec()),
                &labels,
            )?),
        };
        registry.register(handle.collector())?;
        Ok(handle)
    }
}

impl Handle {
    /// A clone to register (every clone shares the series).
    fn collector(&self) -> Box<dyn Collector> {
        match self {
            Handle::IntCounter(c) => Box::new(c.clone()),
            Handle::IntCounterVec(c) => Box::new(c.clone()),
            Handle::IntGauge(g) => Box::new(g.clone()),
            Handle::IntGaugeVec(g) => Box::new(g.clone()),
            Handle::GaugeVec(g) => Box::new(g.clone()),
            Handle::HistogramVec(h) => Box::new(h.clone()),
        }
    }
}

/// The Prometheus types a [`Handle`] holds.
pub trait FromHandle: Sized {
    fn from_handle(handle: Handle) -> Option<Self>;
}

impl FromHandle for IntCounter {
    fn from_handle(handle: Handle) -> Option<Self> {
        match handle {
            Handle::IntCounter(c) => Some(c),
            _ => None,
        }
    }
}

impl FromHandle for IntCounterVec {
    fn from_handle(handle: Handle) -> Option<Self> {
        match handle {
            Handle::IntCounterVec(c) => Some(c),
            _ => None,
        }
    }
}

impl FromHandle for IntGauge {
    fn from_handle(handle: Handle) -> Option<Self> {
        match handle {
            Handle::IntGauge(g) => Some(g),
            _ => None,
        }
    }
}

impl FromHandle for IntGaugeVec {
    fn from_handle(handle: Handle) -> Option<Self> {
        match handle {
            Handle::IntGaugeVec(g) => Some(g),
            _ => None,
        }
    }
}

impl FromHandle for GaugeVec {
    fn from_handle(handle: Handle) -> Option<Self> {
        match handle {
            Handle::GaugeVec(g) => Some(g),
            _ => None,
        }
    }
}

impl FromHandle for HistogramVec {
    fn from_handle(handle: Handle) -> Option<Self> {
        match handle {
            Handle::HistogramVec(h) => Some(h),
            _ => None,
        }
    }
}

/// A table's families, registered, until each is taken by name.
pub struct Registered(HashMap<&'static str, Handle>);

impl Registered {
    /// Registers every family of `table` with `registry`, in the table's order.
    pub fn new(registry: &Registry, table: &[Family]) -> anyhow::Result<Self> {
        let mut handles = HashMap::with_capacity(table.len());
        for family in table {
            let handle = family
                .register(registry)
                .with_context(|| format!("registering metric {}", family.name))?;
            handles.insert(family.name, handle);
        }
        Ok(Registered(handles))
    }

    /// The family `name`, as the type its kind in the table says.
    pub fn take<T: FromHandle>(&mut self, name: &str) -> anyhow::Result<T> {
        let handle = self
            .0
            .remove(name)
            .with_context(|| format!("metric {name}: not in the table, or taken already"))?;
        T::from_handle(handle).with_context(|| {
            format!(
                "metric {name}: its kind in the table is not {}",
                std::any::type_name::<T>()
            )
        })
    }

    /// Fails if a family of the table was never taken (registered, but nothing updates it).
    pub fn finish(self) -> anyhow::Result<()> {
        let mut left: Vec<&str> = self.0.into_keys().collect();
        if left.is_empty() {
            return Ok(());
        }
        left.sort_unstable();
        bail!("metrics registered but never taken: {}", left.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_family_is_taken_once_and_as_its_kind() {
        let registry = Registry::new();
        let mut families = Registered::new(&registry, HTTP_SERVER).expect("test");
        let wrong = families.take::<IntGauge>("faultline_http_accept_errors_total");
        assert!(
            wrong
                .err()
                .is_some_and(|e| e.to_string().contains("faultline_http_accept_errors_total")),
        );
        let shed = families.take::<IntCounterVec>("faultline_http_shed_connections_total");
        assert!(shed.is_ok());
        let again = families.take::<IntCounterVec>("faultline_http_shed_connections_total");
        assert!(again.is_err());
        assert!(
            families.finish().is_ok(),
            "the wrongly taken one is gone too"
        );
        let families = Registered::new(&Registry::new(), OTLP).expect("test");
        let left = families.finish().err().map(|e| e.to_string());
        assert_eq!(
            left.as_deref(),
            Some(
                "metrics registered but never taken: faultline_otlp_dropped_events_total, faultline_otlp_failed_requests_total"
            )
        );
    }

    #[test]
    fn names_are_unique_and_single_series_have_no_labels() {
        let registry = Registry::new();
        for table in [RUN, OTLP, HTTP_SERVER, EVENT_LINES, KUBE_EVENTS] {
            Registered::new(&registry, table).expect("one registry takes every table");
        }
        let bad = Family {
            name: "faultline_bad",
            help: "A gauge with a label.",
            labels: Labels::Own(&["x"]),
            kind: Kind::IntGauge,
        };
        let err = Registered::new(&registry, &[bad])
            .err()
            .map(|e| format!("{e:#}"));
        assert_eq!(
            err.as_deref(),
            Some("registering metric faultline_bad: a family of one series has no labels")
        );
    }
}
