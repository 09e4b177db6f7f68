//! OTLP/HTTP (http/protobuf) export of events, configured as the OpenTelemetry specification
//! says (`--otlp-endpoint` as `OTEL_EXPORTER_OTLP_ENDPOINT`, every `OTEL_EXPORTER_OTLP_*`
//! variable general and per signal; a signal without an endpoint is not exported): clone
//! failures and conntrack drops as log records (`event_name`) with their real time, DNS
//! queries as client spans with their real start and end, all with OpenTelemetry's Kubernetes
//! attributes and a resource naming the node and the agent. http or https (rustls; the
//! system's roots unless `..._CERTIFICATE` names a CA), gzip when asked.
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
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::{logs::v1::ExportLogsServiceRequest, trace::v1::ExportTraceServiceRequest},
    common::v1::InstrumentationScope,
    logs::v1::{LogRecord, ResourceLogs, ScopeLogs},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span},
};
use prometheus::IntCounter;
use prost::Message as _;
use tokio::sync::mpsc;

use crate::{export::budget::BudgetLine, signals::Event};

use config::{OtlpConfig, SignalConfig};
use records::{budget_record, dns_span, drop_record, kv, log_record};
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
    logs: Option<mpsc::Sender<LogRecord>>,
    traces: Option<mpsc::Sender<Span>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    counters: OtlpCounters,
    /// Records queued and not yet delivered or dropped, every signal's.
    queued: Arc<AtomicU64>,
}

/// The resource of every export: the agent (service.*, its own pod when the downward API
/// says) and the node, then the operator's attributes over them.
fn resource(node: &str, extra: &[(String, String)]) -> Resource {
    let mut attrs: Vec<(String, String)> = vec![
        ("service.name".into(), "faultline".into()),
        ("service.version".into(), env!("CARGO_PKG_VERSION").into()),
        ("service.instance.id".into(), node.into()),
        ("k8s.node.name".into(), node.into()),
        ("host.name".into(), crate::attribution::pods::hostname()),
    ];
    for (key, var) in [
        ("k8s.pod.name", "POD_NAME"),
        ("k8s.namespace.name", "POD_NAMESPACE"),
    ] {
        if let Ok(v) = std::env::var(var) {
            attrs.push((key.into(), v));
        }
    }
    for (k, v) in extra {
        attrs.retain(|(key, _)| key != k);
        attrs.push((k.clone(), v.clone()));
    }
    Resource {
        attributes: attrs.into_iter().map(|(k, v)| kv(&k, v)).collect(),
        ..Default::default()
    }
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
        let resource = resource(node, &setup.resource);
        let scope = InstrumentationScope {
            name: "faultline".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        };
        let mut tasks = Vec::new();
        let logs = match setup.logs {
            Some(collector) => {
                let (tx, rx) = mpsc::channel(QUEUE);
                let (resource, scope) = (resource.clone(), scope.clone());
                let encode = move |log_records| {
                    ExportLogsServiceRequest {
                        resource_logs: vec![ResourceLogs {
                            resource: Some(resource.clone()),
                            scope_logs: vec![ScopeLogs {
                                scope: Some(scope.clone()),
                                log_records,
                                ..Default::default()
                            }],
                            ..Default::default()
                        }],
                    }
                    .encode_to_vec()
                };
                tasks.push(spawn("logs", collector, &counters, &queued, rx, encode));
                Some(tx)
            }
            None => None,
        };
        let traces = match setup.traces {
            Some(collector) => {
                let (tx, rx) = mpsc::channel(QUEUE);
                let encode = move |spans| {
                    ExportTraceServiceRequest {
                        resource_spans: vec![ResourceSpans {
                            resource: Some(resource.clone()),
                            scope_spans: vec![ScopeSpans {
                                scope: Some(scope.clone()),
                                spans,
                                ..Default::default()
                            }],
                            ..Default::default()
                        }],
                    }
                    .encode_to_vec()
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

    fn log(&self, record: LogRecord) {
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
    use crate::export::budget::EventsLost;

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
}
