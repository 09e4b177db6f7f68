//! Counters whose running totals the kernel keeps (ring-buffer losses, task events the full
//! map could not count, port-53 packets the DNS probe could not follow, the node's conntrack
//! statistics, the refusal counts no event explained; and the pod watch's failed requests): a
//! Prometheus collector that reports the last refresh's totals at scrape time, instead of
//! turning each total into increments of a counter of our own.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use prometheus::{
    core::{Collector, Desc},
    proto::{Counter, LabelPair, Metric, MetricFamily, MetricType},
};

/// The families, each with at most one label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Total {
    /// `source`: clone, dns, conntrack, cgroups (new cgroup v2 directories).
    EventsLost,
    UncountedTaskEvents,
    /// `reason`: pending_full, cgroup_quota, malformed, unmatched, mismatched, tcp_map_full.
    DnsUntracked,
    /// `counter`: the kernel's conntrack statistics of the node's namespace.
    ConntrackStat,
    /// Failed requests of the pod watch (kept by `attribution::kubeapi`, not the kernel).
    KubeApiErrors,
    /// `counter`: increases of the kernel's refusal counters that no event explained.
    RefusalsUnexplained,
}

const FAMILIES: [(Total, &str, &str, Option<&str>); 6] = [
    (
        Total::EventsLost,
        "faultline_events_lost_total",
        "Events the kernel could not deliver (ring buffer full), by source.",
        Some("source"),
    ),
    (
        Total::UncountedTaskEvents,
        "faultline_uncounted_task_events_total",
        "Task creations and exits in cgroups the full kernel map could not count.",
        None,
    ),
    (
        Total::DnsUntracked,
        "faultline_dns_untracked_total",
        "Port 53 packets the DNS probe could not follow, by reason: pending_full (a query not tracked: the kernel's map of waiting queries was full), cgroup_quota (not tracked: its cgroup had 1,024 queries waiting), malformed (not a DNS query or answer), unmatched (an answer to no tracked query), mismatched (an answer to a waiting query's socket and id from another address than the query went to, or with another question: spoofed or confused; the query keeps waiting), tcp_map_full (a TCP segment in a cgroup the full map could not count).",
        Some("reason"),
    ),
    (
        Total::ConntrackStat,
        "faultline_conntrack_stat_total",
        "The kernel's conntrack statistics of the node's network namespace (insert_failed, drop, early_drop, clash_resolve, search_restart, chaintoolong, invalid).",
        Some("counter"),
    ),
    (
        Total::KubeApiErrors,
        "faultline_kube_api_errors_total",
        "Failed requests of the Kubernetes API pod watch (while it fails, pods are named from the kubelet's log directories).",
        None,
    ),
    (
        Total::RefusalsUnexplained,
        "faultline_kernel_refusals_unexplained_total",
        "Increases of the kernel's own refusal counters since the daemon started that no event explained (a probe missed them: events lost, a program not attached, a path it does not trace), by counter: pids_max (every cgroup's pids.events max, against clone failures of cause pids_limit), conntrack_insert_failed (every network namespace's, against drops of cause insert_failed). An increase gets one re-read (10 s or more) for its event to arrive.",
        Some("counter"),
    ),
];

/// The kernel's totals as of the last refresh; cheap to clone (shared).
#[derive(Clone)]
pub struct KernelTotals {
    descs: Arc<Vec<Desc>>,
    values: Arc<Mutex<BTreeMap<(Total, &'static str), u64>>>,
}

impl KernelTotals {
    pub fn new() -> prometheus::Result<Self> {
        let descs = FAMILIES
            .iter()
            .map(|(_, name, help, label)| {
                Desc::new(
                    (*name).to_owned(),
                    (*help).to_owned(),
                    label.iter().map(|l| (*l).to_owned()).collect(),
                    HashMap::new(),
                )
            })
            .collect::<prometheus::Result<Vec<_>>>()?;
        Ok(KernelTotals {
            descs: Arc::new(descs),
            values: Arc::default(),
        })
    }

    /// A running total as the kernel has it now (`label` "" for a family without one).
    pub fn set(&self, total: Total, label: &'static str, value: u64) {
        if let Ok(mut v) = self.values.lock() {
            v.insert((total, label), value);
        }
    }
}

impl Collector for KernelTotals {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Ok(values) = self.values.lock() else {
            return Vec::new();
        };
        FAMILIES
            .iter()
            .map(|(total, name, help, label)| {
                let mut family = MetricFamily::default();
                family.set_name((*name).to_owned());
                family.set_help((*help).to_owned());
                family.set_field_type(MetricType::COUNTER);
                for ((_, value_label), value) in values
                    .range((*total, "")..)
                    .take_while(|((t, _), _)| t == total)
                {
                    let mut counter = Counter::default();
                    counter.set_value(*value as f64);
                    let mut metric = Metric::default();
                    metric.set_counter(counter);
                    if let Some(l) = label {
                        let mut pair = LabelPair::default();
                        pair.set_name((*l).to_owned());
                        pair.set_value((*value_label).to_owned());
                        metric.set_label(vec![pair]);
                    }
                    family.mut_metric().push(metric);
                }
                family
            })
            .filter(|f| !f.get_metric().is_empty())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_are_exported_as_they_are() {
        let t = KernelTotals::new().expect("test");
        let registry = prometheus::Registry::new();
        registry.register(Box::new(t.clone())).expect("test");
        t.set(Total::EventsLost, "dns", 5);
        t.set(Total::EventsLost, "clone", 2);
        t.set(Total::UncountedTaskEvents, "", 7);
        t.set(Total::EventsLost, "dns", 9);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .expect("test");
        assert!(
            text.contains("faultline_events_lost_total{source=\"dns\"} 9\n"),
            "{text}"
        );
        assert!(
            text.contains("faultline_events_lost_total{source=\"clone\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("faultline_uncounted_task_events_total 7\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE faultline_events_lost_total counter"),
            "{text}"
        );
        assert!(
            !text.contains("faultline_dns_untracked_total"),
            "no series yet: {text}"
        );
    }
}
