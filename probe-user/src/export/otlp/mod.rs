//! OTLP/HTTP (http/protobuf) export of events, configured as the OpenTelemetry specification
//! says (`--otlp-endpoint` as `OTEL_EXPORTER_OTLP_ENDPOINT`, every `OTEL_EXPORTER_OTLP_*`
//! variable general and per signal; a signal without an endpoint is not exported): clone
//! failures and conntrack drops as log records (`event_name`) with their real time, DNS
//! queries as client spans with their real start and end, each under the resource of what it
//! is about (a pod's OpenTelemetry Kubernetes attributes, the node, or faultline's own pod),
//! which also names faultline and the node. http or https (rustls; the system's roots unless
//! `..._CERTIFICATE` names a CA), gzip when asked.
//!
//! The configuration is checked and the TLS files read before the programs load
//! ([`OtlpSetup`]: a mistake is a usage error); the senders start after.
//!
//! The ring-buffer readers only ever `try_send` into a bounded queue per signal ([`QUEUE`]
//! records, plus the [`BATCH`] in flight). While the collector is unreachable, refuses this
//! side's TLS, or says 429, 502, 503 or 504, the oldest batch is retried with capped backoff
//! (Retry-After honoured) and never given up, the failure said with its cause (`failure`);
//! records past the queue are dropped and counted. A batch the collector refuses (400, 401,
//! 413, ...) is dropped and counted, said at WARN with the collector's answer at most once a
//! minute. What is still queued when a stop cannot wait any longer is dropped and counted.

mod config;
mod failure;
mod records;
mod sender;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::{logs::v1::ExportLogsServiceRequest, trace::v1::ExportTraceServiceRequest},
    common::v1::{InstrumentationScope, KeyValue},
    logs::v1::{LogRecord, ResourceLogs, ScopeLogs},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span},
};
use prometheus::IntCounter;
use prost::Message as _;
use tokio::sync::mpsc;

use crate::{export::budget::BudgetLine, signals::Event};

use config::{OtlpConfig, SignalConfig};
use records::{
    Subject, Subjected, budget_record, dns_span, drop_record, k8s_attributes, kv, log_record,
};
use sender::{Collector, Sender};

/// Records waiting per signal; past this they are dropped and counted. With the batch in
/// flight, a collector that is down costs nothing until QUEUE + BATCH records are waiting.
pub const QUEUE: usize = 4096;
/// Records per request, and the longest a record waits for a batch to fill.
pub const BATCH: usize = 512;
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Counters the exporter keeps (registered by the caller).
#[derive(Clone)]
pub struct OtlpCounters {
    pub dropped: IntCounter,
    pub failed_requests: IntCounter,
}

/// The export as configured (`--otlp-endpoint`, the `OTEL_*` variables), checked, with each
/// signal's client made (its TLS files read): made before anything loads, started after.
pub struct OtlpSetup {
    logs: Option<Collector>,
    traces: Option<Collector>,
    /// `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_SERVICE_NAME`.
    resource: Vec<(String, String)>,
    /// Which signals go where, said at the start.
    described: String,
}

impl OtlpSetup {
    /// `None` when nothing is to be exported. Errors: a value that cannot be used, a TLS file
    /// that cannot be read (see [`OtlpConfig::from_env`]).
    pub fn from_env(
        endpoint: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Option<Self>> {
        let Some(config) = OtlpConfig::from_env(endpoint, env)? else {
            return Ok(None);
        };
        let described = config.describe();
        let collector = |name: &str, signal: Option<SignalConfig>| {
            signal.map(|s| Collector::new(name, s)).transpose()
        };
        Ok(Some(OtlpSetup {
            logs: collector("logs", config.logs)?,
            traces: collector("traces", config.traces)?,
            resource: config.resource,
            described,
        }))
    }
}

pub struct OtlpExporter {
    logs: Option<mpsc::Sender<Subjected<LogRecord>>>,
    traces: Option<mpsc::Sender<Subjected<Span>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    counters: OtlpCounters,
    /// Records queued and not yet delivered or dropped, every signal's.
    queued: Arc<AtomicU64>,
}

/// The resources of an export. Every one names faultline and the node (`service.*`,
/// `k8s.node.name`, `host.name`, the operator's `OTEL_RESOURCE_ATTRIBUTES` over them) and
/// what its records are about: a pod's Kubernetes attributes, none for the node, faultline's
/// own pod (the downward API's, or the operator's `k8s.*` pod attributes) for its own.
struct Resources {
    common: Vec<(String, String)>,
    own_pod: Vec<(String, String)>,
}

impl Resources {
    fn new(node: &str, extra: &[(String, String)]) -> Resources {
        let mut common: Vec<(String, String)> = vec![
            ("service.name".into(), "faultline".into()),
            ("service.version".into(), env!("CARGO_PKG_VERSION").into()),
            ("service.instance.id".into(), node.into()),
            ("k8s.node.name".into(), node.into()),
            ("host.name".into(), crate::attribution::pods::hostname()),
        ];
        let mut own_pod: Vec<(String, String)> = [
            ("k8s.pod.name", "POD_NAME"),
            ("k8s.namespace.name", "POD_NAMESPACE"),
        ]
        .into_iter()
        .filter_map(|(key, var)| std::env::var(var).ok().map(|v| (key.to_owned(), v)))
        .collect();
        for (k, v) in extra {
            let list = if names_a_pod(k) {
                &mut own_pod
            } else {
                &mut common
            };
            list.retain(|(key, _)| key != k);
            list.push((k.clone(), v.clone()));
        }
        Resources { common, own_pod }
    }

    fn of(&self, subject: &Subject) -> Resource {
        let mut attributes: Vec<KeyValue> = self.common.iter().map(|(k, v)| kv(k, v)).collect();
        match subject {
            Subject::Pod(pod) => attributes.extend(k8s_attributes(pod)),
            Subject::Node => {}
            Subject::Agent => attributes.extend(self.own_pod.iter().map(|(k, v)| kv(k, v))),
        }
        Resource {
            attributes,
            ..Default::default()
        }
    }
}

/// Whether a resource attribute names a pod (its namespace, containers or owners), not the
/// node or the cluster: given by the operator, it names faultline's own pod.
fn names_a_pod(key: &str) -> bool {
    key.starts_with("container.")
        || (key.starts_with("k8s.")
            && !key.starts_with("k8s.node.")
            && !key.starts_with("k8s.cluster."))
}

/// A batch's records grouped by what they are about, in the order each subject came first.
fn by_subject<T>(batch: Vec<Subjected<T>>) -> Vec<(Subject, Vec<T>)> {
    #[derive(PartialEq, Eq, Hash)]
    enum Key {
        Pod(String),
        Node,
        Agent,
    }
    let mut groups: Vec<(Subject, Vec<T>)> = Vec::new();
    let mut index: HashMap<Key, usize> = HashMap::new();
    for Subjected { subject, record } in batch {
        let key = match &subject {
            Subject::Pod(p) => Key::Pod(p.uid.clone()),
            Subject::Node => Key::Node,
            Subject::Agent => Key::Agent,
        };
        let i = *index.entry(key).or_insert_with(|| {
            groups.push((subject, Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push(record);
    }
    groups
}

/// One signal's background sender, encoding its batches with `encode`.
fn spawn<T: Send + 'static>(
    name: &'static str,
    collector: Collector,
    counters: &OtlpCounters,
    queued: &Arc<AtomicU64>,
    rx: mpsc::Receiver<T>,
    encode: impl Fn(Vec<T>) -> Vec<u8> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let sender = Sender::new(name, collector, counters.clone(), queued.clone());
    tokio::spawn(sender.run(rx, encode))
}

impl OtlpExporter {
    /// Starts one background sender per exported signal.
    pub fn start(setup: OtlpSetup, node: &str, counters: OtlpCounters) -> Self {
        tracing::info!("{}", setup.described);
        let queued = Arc::new(AtomicU64::new(0));
        let resources = Arc::new(Resources::new(node, &setup.resource));
        let scope = InstrumentationScope {
            name: "faultline".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        };
        let mut tasks = Vec::new();
        let logs = match setup.logs {
            Some(collector) => {
                let (tx, rx) = mpsc::channel(QUEUE);
                let (resources, scope) = (resources.clone(), scope.clone());
                let encode = move |batch| {
                    let resource_logs = by_subject(batch)
                        .into_iter()
                        .map(|(subject, log_records)| ResourceLogs {
                            resource: Some(resources.of(&subject)),
                            scope_logs: vec![ScopeLogs {
                                scope: Some(scope.clone()),
                                log_records,
                                ..Default::default()
                            }],
                            ..Default::default()
                        })
                        .collect();
                    ExportLogsServiceRequest { resource_logs }.encode_to_vec()
                };
                tasks.push(spawn("logs", collector, &counters, &queued, rx, encode));
                Some(tx)
            }
            None => None,
        };
        let traces = match setup.traces {
            Some(collector) => {
                let (tx, rx) = mpsc::channel(QUEUE);
                let encode = move |batch| {
                    let resource_spans = by_subject(batch)
                        .into_iter()
                        .map(|(subject, spans)| ResourceSpans {
                            resource: Some(resources.of(&subject)),
                            scope_spans: vec![ScopeSpans {
                                scope: Some(scope.clone()),
                                spans,
                                ..Default::default()
                            }],
                            ..Default::default()
                        })
                        .collect();
                    ExportTraceServiceRequest { resource_spans }.encode_to_vec()
                };
                tasks.push(spawn("traces", collector, &counters, &queued, rx, encode));
                Some(tx)
            }
            None => None,
        };
        OtlpExporter {
            logs,
            traces,
            tasks,
            counters,
            queued,
        }
    }

    /// Queues an event: failures and drops as log records, queries as spans (near-misses
    /// and headroom warnings are metrics and lines only); drops and counts it when the queue
    /// is full.
    pub fn event(&self, event: &Event) {
        match event {
            Event::CloneFailure(f) => self.log(log_record(f)),
            Event::ConntrackDrop(d) => self.log(drop_record(d)),
            Event::DnsQuery(q) => {
                if let Some(tx) = &self.traces {
                    self.queue(tx, dns_span(q));
                }
            }
            Event::ClashesResolved(_) | Event::HeadroomWarning(_) => {}
        }
    }

    /// Queues what the event budget says instead of the events it suppressed.
    pub fn budget_line(&self, line: &BudgetLine) {
        self.log(budget_record(line));
    }

    fn log(&self, record: Subjected<LogRecord>) {
        if let Some(tx) = &self.logs {
            self.queue(tx, record);
        }
    }

    /// One record into its signal's queue, counted as queued until its sender is done with
    /// it; dropped and counted when the queue is full.
    fn queue<T>(&self, tx: &mpsc::Sender<T>, record: T) {
        // Counted first: the sender may be done with it before try_send returns.
        self.queued.fetch_add(1, Ordering::Relaxed);
        if tx.try_send(record).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.counters.dropped.inc();
        }
    }

    /// Delivers what is queued, for at most `within`; then gives up, and drops and counts
    /// what is still queued (said at WARN). Returns how many records that was.
    pub async fn shutdown(self, within: Duration) -> u64 {
        let OtlpExporter {
            logs,
            traces,
            tasks,
            counters,
            queued,
        } = self;
        drop(logs);
        drop(traces);
        let deadline = tokio::time::Instant::now() + within;
        for mut task in tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
                // Gone once this returns: it counts nothing more.
                let _ = task.await;
            }
        }
        let left = queued.load(Ordering::Relaxed);
        if left > 0 {
            counters.dropped.inc_by(left);
            tracing::warn!(
                "OTLP: the collector did not take everything within {within:?}: {left} records still queued were dropped"
            );
        }
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{attribution::pods::PodRef, export::budget::EventsLost};

    /// A collector that takes the connection and never answers: what is queued at the stop
    /// is dropped, counted, and said.
    #[tokio::test]
    async fn what_a_stop_cannot_deliver_is_dropped_and_counted() {
        let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", black_hole.local_addr().unwrap());
        let setup = OtlpSetup::from_env(Some(&endpoint), |_| None)
            .unwrap()
            .unwrap();
        let counters = OtlpCounters {
            dropped: IntCounter::new("dropped", "dropped").unwrap(),
            failed_requests: IntCounter::new("failed", "failed").unwrap(),
        };
        let exporter = OtlpExporter::start(setup, "node-1", counters.clone());
        let line = BudgetLine::EventsLost(EventsLost {
            event: "clone_failure",
            count: 1,
            time: "2026-01-01T00:00:00Z".to_owned(),
        });
        for _ in 0..3 {
            exporter.budget_line(&line);
        }
        let dropped = exporter.shutdown(Duration::from_millis(300)).await;
        assert_eq!(dropped, 3);
        assert_eq!(counters.dropped.get(), 3);
        drop(black_hole);
    }

    /// A pod's records are exported under a resource of their own with its Kubernetes
    /// attributes; faultline's own pod (here the operator's `k8s.pod.name`) names only its
    /// own records, never a pod's or the node's.
    #[test]
    fn each_subject_has_its_resource_and_faultlines_pod_only_its_own() {
        let extra = [
            ("k8s.cluster.name".to_owned(), "eu-1".to_owned()),
            ("k8s.pod.name".to_owned(), "faultline-x7".to_owned()),
        ];
        let resources = Resources::new("node-1", &extra);
        let pairs = |subject: &Subject| records::tests::pairs(resources.of(subject).attributes);
        let has = |list: &[(String, String)], k: &str, v: &str| {
            list.iter().any(|(key, value)| key == k && value == v)
        };
        let pod = Arc::new(PodRef {
            uid: "0d3e2f1a-8b7c-4d6e-9f00-112233445566".into(),
            namespace: Some("shop".into()),
            name: Some("cart-1".into()),
            ..Default::default()
        });
        let of_pod = pairs(&Subject::Pod(pod.clone()));
        for (k, v) in [
            ("k8s.pod.name", "cart-1"),
            ("k8s.namespace.name", "shop"),
            ("k8s.node.name", "node-1"),
            ("k8s.cluster.name", "eu-1"),
            ("service.name", "faultline"),
        ] {
            assert!(has(&of_pod, k, v), "{k}={v}: {of_pod:?}");
        }
        assert_eq!(
            of_pod.iter().filter(|(k, _)| k == "k8s.pod.name").count(),
            1
        );
        let of_node = pairs(&Subject::Node);
        assert!(
            !of_node.iter().any(|(k, _)| k.starts_with("k8s.pod.")),
            "{of_node:?}"
        );
        assert!(has(&of_node, "k8s.cluster.name", "eu-1"));
        assert!(has(&pairs(&Subject::Agent), "k8s.pod.name", "faultline-x7"));

        let record = |subject: Subject, n: u64| Subjected { subject, record: n };
        let groups = by_subject(vec![
            record(Subject::Pod(pod.clone()), 1),
            record(Subject::Node, 2),
            record(Subject::Pod(pod), 3),
            record(Subject::Agent, 4),
        ]);
        let shape: Vec<Vec<u64>> = groups.into_iter().map(|(_, r)| r).collect();
        assert_eq!(shape, [vec![1, 3], vec![2], vec![4]]);
    }
}
