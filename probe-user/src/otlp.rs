//! OTLP/HTTP export of events (`faultline run --otlp-endpoint http://collector:4318`): clone
//! failures as log records with their real time, DNS queries as client spans with their real
//! start and end, all with OpenTelemetry's Kubernetes attributes (`k8s.namespace.name`,
//! `k8s.pod.name`, ...). The ring-buffer readers only ever `try_send`
//! into a bounded queue: a slow or dead collector makes faultline drop and count events,
//! never wait or grow.

use std::time::Duration;

use anyhow::{Context as _, bail};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use opentelemetry_proto::tonic::{
    collector::{logs::v1::ExportLogsServiceRequest, trace::v1::ExportTraceServiceRequest},
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    logs::v1::{LogRecord, ResourceLogs, ScopeLogs},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode},
};
use prometheus::IntCounter;
use prost::Message as _;
use tokio::sync::mpsc;

use crate::{clone::CloneFailure, dns::DnsQuery, pods::PodRef};

/// What waits in the queue: a log record or a span.
enum Item {
    Log(LogRecord),
    Span(Span),
}

/// Events waiting for export; past this they are dropped and counted.
const QUEUE: usize = 4096;
/// Records per request, and the longest an event waits for a batch to fill.
const BATCH: usize = 512;
const FLUSH_EVERY: Duration = Duration::from_secs(1);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// OTLP severity number for WARN.
const SEVERITY_WARN: i32 = 13;

/// Counters the exporter keeps (registered by the caller).
#[derive(Clone)]
pub struct OtlpCounters {
    pub dropped: IntCounter,
    pub failed_requests: IntCounter,
}

pub struct OtlpExporter {
    tx: mpsc::Sender<Item>,
    counters: OtlpCounters,
}

impl OtlpExporter {
    /// Starts the background sender. Only `http://` endpoints (a node-local or in-cluster
    /// collector); the `/v1/logs` path is added.
    pub fn start(endpoint: &str, node: &str, counters: OtlpCounters) -> anyhow::Result<Self> {
        let base = endpoint.trim_end_matches('/');
        if !base.starts_with("http://") {
            bail!("--otlp-endpoint {endpoint:?}: only http:// endpoints are supported");
        }
        let logs: hyper::Uri = format!("{base}/v1/logs")
            .parse()
            .context("parsing --otlp-endpoint")?;
        let traces: hyper::Uri = format!("{base}/v1/traces")
            .parse()
            .context("parsing --otlp-endpoint")?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let resource = Resource {
            attributes: vec![kv("service.name", "faultline"), kv("k8s.node.name", node)],
            ..Default::default()
        };
        tokio::spawn(send_batches(rx, [logs, traces], resource, counters.clone()));
        Ok(OtlpExporter { tx, counters })
    }

    /// Queues an event; drops and counts it when the queue is full.
    pub fn clone_failure(&self, f: &CloneFailure) {
        self.queue(Item::Log(log_record(f)));
    }

    pub fn dns_query(&self, q: &DnsQuery) {
        self.queue(Item::Span(dns_span(q)));
    }

    fn queue(&self, item: Item) {
        if self.tx.try_send(item).is_err() {
            self.counters.dropped.inc();
        }
    }
}

fn kv(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

fn kv_int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

/// A clone failure as an OTLP log record, with OpenTelemetry's k8s and process attributes.
pub fn log_record(f: &CloneFailure) -> LogRecord {
    let mut attributes = vec![
        kv("faultline.cause", f.cause.as_str()),
        kv("faultline.evidence", f.evidence.clone()),
        kv("faultline.syscall", f.syscall),
        kv("faultline.task", f.task.as_str()),
        kv("faultline.workload", f.workload.clone()),
        kv("error.type", f.errno.clone()),
        kv_int("process.pid", f.pid as i64),
        kv_int("thread.id", f.tid as i64),
        kv_int("process.parent_pid", f.ppid as i64),
        kv("process.executable.name", f.comm.clone()),
        kv("container.runtime.cgroup", f.cgroup.clone()),
    ];
    attributes.extend(k8s_attributes(f.pod.as_ref()));
    LogRecord {
        time_unix_nano: f.time_unix_nano,
        observed_time_unix_nano: now_unix_nano(),
        severity_number: SEVERITY_WARN,
        severity_text: "WARN".to_owned(),
        event_name: "faultline.clone_failure".to_owned(),
        body: Some(AnyValue {
            // Shown as is by log viewers: escaped like a table line.
            value: Some(any_value::Value::StringValue(
                crate::text::printable(&format!(
                    "{} {} failed with {}: {} ({})",
                    f.comm,
                    f.syscall,
                    f.errno,
                    f.cause.as_str(),
                    f.evidence
                ))
                .into_owned(),
            )),
        }),
        attributes,
        ..Default::default()
    }
}

/// OpenTelemetry's Kubernetes attributes of a pod.
fn k8s_attributes(pod: Option<&PodRef>) -> Vec<KeyValue> {
    let Some(p) = pod else { return Vec::new() };
    let mut attributes = vec![kv("k8s.pod.uid", p.uid.clone())];
    for (key, value) in [
        ("k8s.namespace.name", &p.namespace),
        ("k8s.pod.name", &p.name),
        ("k8s.container.name", &p.container),
        ("container.id", &p.container_id),
    ] {
        if let Some(v) = value {
            attributes.push(kv(key, v.clone()));
        }
    }
    if let Some(o) = &p.owner {
        // k8s.deployment.name, k8s.statefulset.name, k8s.daemonset.name, k8s.job.name, ...
        attributes.push(kv(
            &format!("k8s.{}.name", o.kind.to_lowercase()),
            o.name.clone(),
        ));
    }
    attributes
}

/// A DNS query as a client span from send to answer (or to the timeout).
pub fn dns_span(q: &DnsQuery) -> Span {
    let (server, port) = q.server.rsplit_once(':').unwrap_or((q.server.as_str(), ""));
    let mut attributes = vec![
        kv("dns.question.name", q.qname.clone()),
        kv("dns.question.type", q.qtype.clone()),
        kv("faultline.dns.outcome", q.outcome),
        kv("server.address", server.trim_matches(['[', ']'])),
        kv("faultline.workload", q.workload.clone()),
        kv("container.runtime.cgroup", q.cgroup.clone()),
    ];
    if let Ok(p) = port.parse::<i64>() {
        attributes.push(kv_int("server.port", p));
    }
    if let Some(rcode) = &q.rcode {
        attributes.push(kv("dns.response_code", rcode.clone()));
    }
    if let Some(gap) = q.retransmit_gap_ms {
        attributes.push(kv("faultline.dns.retransmit_gap_ms", format!("{gap:.1}")));
    }
    attributes.extend(k8s_attributes(q.pod.as_ref()));
    let failed = q.outcome == "timeout"
        || q.rcode
            .as_deref()
            .is_some_and(|r| r == "SERVFAIL" || r == "REFUSED");
    Span {
        trace_id: random_id(16),
        span_id: random_id(8),
        name: format!("DNS {}", q.qtype),
        kind: SpanKind::Client as i32,
        start_time_unix_nano: q.start_unix_nano,
        end_time_unix_nano: q.end_unix_nano,
        attributes,
        status: Some(Status {
            code: if failed {
                StatusCode::Error
            } else {
                StatusCode::Unset
            } as i32,
            message: if failed {
                q.rcode.clone().unwrap_or_else(|| "timeout".to_owned())
            } else {
                String::new()
            },
        }),
        ..Default::default()
    }
}

/// A non-zero id of `len` bytes (xorshift seeded from the clock and a counter; ids need to be
/// unique, not secret).
fn random_id(len: usize) -> Vec<u8> {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let mut x = now_unix_nano()
        ^ COUNTER.fetch_add(0x9e37_79b9_7f4a_7c15, std::sync::atomic::Ordering::Relaxed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as u8) | 1
        })
        .collect()
}

fn now_unix_nano() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

async fn send_batches(
    mut rx: mpsc::Receiver<Item>,
    [logs_uri, traces_uri]: [hyper::Uri; 2],
    resource: Resource,
    counters: OtlpCounters,
) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let scope = InstrumentationScope {
        name: "faultline".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        ..Default::default()
    };
    let (mut logs, mut spans) = (Vec::new(), Vec::new());
    loop {
        let deadline = tokio::time::sleep(FLUSH_EVERY);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                r = rx.recv() => match r {
                    Some(Item::Log(rec)) => logs.push(rec),
                    Some(Item::Span(span)) => spans.push(span),
                    None if logs.is_empty() && spans.is_empty() => return,
                    None => break,
                },
                _ = &mut deadline => break,
            }
            if logs.len() + spans.len() >= BATCH {
                break;
            }
        }
        if !logs.is_empty() {
            let n = logs.len() as u64;
            let request = ExportLogsServiceRequest {
                resource_logs: vec![ResourceLogs {
                    resource: Some(resource.clone()),
                    scope_logs: vec![ScopeLogs {
                        scope: Some(scope.clone()),
                        log_records: std::mem::take(&mut logs),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            };
            post(&client, &logs_uri, request.encode_to_vec(), n, &counters).await;
        }
        if !spans.is_empty() {
            let n = spans.len() as u64;
            let request = ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    resource: Some(resource.clone()),
                    scope_spans: vec![ScopeSpans {
                        scope: Some(scope.clone()),
                        spans: std::mem::take(&mut spans),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            };
            post(&client, &traces_uri, request.encode_to_vec(), n, &counters).await;
        }
    }
}

/// One OTLP/HTTP request. On failure the records are gone, counted: a collector that cannot
/// keep up loses events, it does not make faultline buffer without bound.
async fn post(
    client: &Client<HttpConnector, Full<Bytes>>,
    uri: &hyper::Uri,
    body: Vec<u8>,
    records: u64,
    counters: &OtlpCounters,
) {
    let req = hyper::Request::post(uri.clone())
        .header("content-type", "application/x-protobuf")
        .body(Full::new(Bytes::from(body)));
    let ok = match req {
        Ok(req) => matches!(
            tokio::time::timeout(REQUEST_TIMEOUT, client.request(req)).await,
            Ok(Ok(resp)) if resp.status().is_success()
        ),
        Err(_) => false,
    };
    if !ok {
        counters.failed_requests.inc();
        counters.dropped.inc_by(records);
    }
}
