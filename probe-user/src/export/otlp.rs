//! OTLP/HTTP export of events (`faultline run --otlp-endpoint http://collector:4318`, or the
//! standard `OTEL_EXPORTER_OTLP_*` variables): clone failures and conntrack drops as log
//! records with their real time, DNS queries as client spans with their real start and end,
//! all with OpenTelemetry's Kubernetes attributes (`k8s.namespace.name`, `k8s.pod.name`, ...)
//! and a resource naming the node and the agent (plus `OTEL_RESOURCE_ATTRIBUTES`). The
//! ring-buffer readers only ever `try_send` into a bounded queue: a slow or dead collector
//! makes faultline drop and count events, never wait or grow. Requests are gzip-compressed
//! when asked, and retried with backoff on 429, 502, 503 and 504 (honouring Retry-After).

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

use crate::{
    attribution::pods::PodRef,
    export::budget::BudgetLine,
    signals::Event,
    signals::clone::CloneFailure,
    signals::conntrack::ConntrackDrop,
    signals::dns::{DnsQuery, Outcome, Rcode},
};

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
/// Attempts per request when the collector says "later" (429, 502, 503, 504) or is unreachable.
const ATTEMPTS: u32 = 4;
/// The longest pause between attempts (a Retry-After asking for more is capped to it).
const MAX_BACKOFF: Duration = Duration::from_secs(8);
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

/// Where and how to export: from `--otlp-endpoint` and the standard environment variables.
#[derive(Clone, Debug)]
pub struct OtlpConfig {
    pub logs: hyper::Uri,
    pub traces: hyper::Uri,
    /// `OTEL_EXPORTER_OTLP_HEADERS`: extra request headers (e.g. an API key).
    pub headers: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,
    pub gzip: bool,
    pub timeout: Duration,
    /// `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_SERVICE_NAME`, applied over faultline's own.
    pub resource: Vec<(String, String)>,
}

impl OtlpConfig {
    /// `None` when nothing asks for OTLP. `endpoint` (the flag) wins over
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; the per-signal variables are full URLs, as the
    /// specification says.
    pub fn from_env(
        endpoint: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Option<Self>> {
        let var = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let base = endpoint
            .map(str::to_owned)
            .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"));
        let (logs, traces) = (
            var("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"),
            var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        );
        if base.is_none() && logs.is_none() && traces.is_none() {
            return Ok(None);
        }
        if let Some(p) = var("OTEL_EXPORTER_OTLP_PROTOCOL")
            && p != "http/protobuf"
        {
            bail!("OTEL_EXPORTER_OTLP_PROTOCOL={p}: only http/protobuf is supported");
        }
        let signal = |full: Option<String>, path: &str| -> anyhow::Result<hyper::Uri> {
            let url = match (full, &base) {
                (Some(url), _) => url,
                (None, Some(base)) => format!("{}/{path}", base.trim_end_matches('/')),
                (None, None) => {
                    bail!("no OTLP endpoint for {path}: set OTEL_EXPORTER_OTLP_ENDPOINT")
                }
            };
            if !url.starts_with("http://") {
                bail!("OTLP endpoint {url:?}: only http:// endpoints are supported");
            }
            url.parse()
                .with_context(|| format!("OTLP endpoint {url:?} is not a URL"))
        };
        let gzip = match var("OTEL_EXPORTER_OTLP_COMPRESSION").as_deref() {
            None | Some("none") => false,
            Some("gzip") => true,
            Some(other) => bail!("OTEL_EXPORTER_OTLP_COMPRESSION={other}: gzip or none"),
        };
        let timeout = match var("OTEL_EXPORTER_OTLP_TIMEOUT") {
            None => Duration::from_secs(10),
            Some(ms) => Duration::from_millis(
                ms.trim()
                    .parse()
                    .with_context(|| format!("OTEL_EXPORTER_OTLP_TIMEOUT={ms}: milliseconds"))?,
            ),
        };
        let mut headers = Vec::new();
        for (k, v) in pairs(var("OTEL_EXPORTER_OTLP_HEADERS").as_deref()) {
            headers.push((
                k.parse().with_context(|| {
                    format!("OTEL_EXPORTER_OTLP_HEADERS: bad header name {k:?}")
                })?,
                v.parse()
                    .with_context(|| format!("OTEL_EXPORTER_OTLP_HEADERS: bad value for {k}"))?,
            ));
        }
        let mut resource = pairs(var("OTEL_RESOURCE_ATTRIBUTES").as_deref());
        if let Some(name) = var("OTEL_SERVICE_NAME") {
            resource.push(("service.name".to_owned(), name));
        }
        Ok(Some(OtlpConfig {
            logs: signal(logs, "v1/logs")?,
            traces: signal(traces, "v1/traces")?,
            headers,
            gzip,
            timeout,
            resource,
        }))
    }
}

/// `k=v,k2=v2` (the W3C baggage form the OTEL_* variables use), values percent-decoded;
/// malformed items are skipped.
fn pairs(list: Option<&str>) -> Vec<(String, String)> {
    list.unwrap_or_default()
        .split(',')
        .filter_map(|item| {
            let (k, v) = item.split_once('=')?;
            let k = k.trim();
            (!k.is_empty()).then(|| (k.to_owned(), percent_decode(v.trim())))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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

impl OtlpExporter {
    /// Starts the background sender.
    pub fn start(config: OtlpConfig, node: &str, counters: OtlpCounters) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let resource = resource(node, &config.resource);
        tokio::spawn(send_batches(rx, config, resource, counters.clone()));
        OtlpExporter { tx, counters }
    }

    /// Queues an event: failures and drops as log records, queries as spans (near-misses
    /// and headroom warnings are metrics and lines only); drops and counts it when the queue
    /// is full.
    pub fn event(&self, event: &Event) {
        let item = match event {
            Event::CloneFailure(f) => Item::Log(log_record(f)),
            Event::ConntrackDrop(d) => Item::Log(drop_record(d)),
            Event::DnsQuery(q) => Item::Span(dns_span(q)),
            Event::ClashesResolved(_) | Event::HeadroomWarning(_) => return,
        };
        self.queue(item);
    }

    /// Queues what the event budget says instead of the events it suppressed.
    pub fn budget_line(&self, line: &BudgetLine) {
        self.queue(Item::Log(budget_record(line)));
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

/// A conntrack drop as an OTLP log record: the flow, the cause, the sender's pod.
pub fn drop_record(d: &ConntrackDrop) -> LogRecord {
    let mut attributes = vec![
        kv("faultline.cause", d.cause.as_str()),
        kv("faultline.evidence", d.evidence.clone()),
        kv("faultline.workload", d.workload.clone()),
        kv("network.transport", d.proto.clone()),
        kv("source.address", d.src.clone()),
        kv_int("source.port", i64::from(d.sport)),
        kv("destination.address", d.dst.clone()),
        kv_int("destination.port", i64::from(d.dport)),
        kv_int("faultline.netns", d.netns as i64),
    ];
    if let Some(cgroup) = &d.cgroup {
        attributes.push(kv("container.runtime.cgroup", cgroup.clone()));
    }
    if let Some(dns) = &d.dns {
        attributes.push(kv_int("dns.id", i64::from(dns.id)));
        if let Some(name) = &dns.qname {
            attributes.push(kv("dns.question.name", name.clone()));
        }
    }
    attributes.extend(k8s_attributes(d.pod.as_ref()));
    LogRecord {
        time_unix_nano: d.time_unix_nano,
        observed_time_unix_nano: now_unix_nano(),
        severity_number: SEVERITY_WARN,
        severity_text: "WARN".to_owned(),
        event_name: "faultline.conntrack_drop".to_owned(),
        body: Some(AnyValue {
            value: Some(any_value::Value::StringValue(
                crate::text::printable(&format!(
                    "{} packet {}:{} -> {}:{} dropped by conntrack: {} ({})",
                    d.proto,
                    d.src,
                    d.sport,
                    d.dst,
                    d.dport,
                    d.cause.as_str(),
                    d.evidence
                ))
                .into_owned(),
            )),
        }),
        attributes,
        ..Default::default()
    }
}

/// A budget's summary of suppressed events (or a count of events lost) as a log record.
pub fn budget_record(line: &BudgetLine) -> LogRecord {
    let (event_name, body, attributes) = match line {
        BudgetLine::EventSummary(s) => {
            let mut attributes = vec![
                kv("faultline.event", s.event),
                kv("faultline.workload", s.workload.clone()),
                kv("faultline.cause", s.cause),
                kv_int(
                    "faultline.count",
                    i64::try_from(s.count).unwrap_or(i64::MAX),
                ),
                kv("faultline.evidence", s.evidence.clone()),
            ];
            attributes.extend(k8s_attributes(s.pod.as_ref()));
            let body = format!(
                "{} more {} {} of {} from {} to {} ({})",
                s.count, s.event, s.cause, s.workload, s.first, s.last, s.evidence
            );
            ("faultline.event_summary", body, attributes)
        }
        BudgetLine::EventsLost(l) => (
            "faultline.events_lost",
            format!(
                "{} {} events lost (ring buffer or queue full)",
                l.count, l.event
            ),
            vec![
                kv("faultline.event", l.event),
                kv_int(
                    "faultline.count",
                    i64::try_from(l.count).unwrap_or(i64::MAX),
                ),
            ],
        ),
    };
    LogRecord {
        time_unix_nano: now_unix_nano(),
        observed_time_unix_nano: now_unix_nano(),
        severity_number: SEVERITY_WARN,
        severity_text: "WARN".to_owned(),
        event_name: event_name.to_owned(),
        body: Some(AnyValue {
            value: Some(any_value::Value::StringValue(
                crate::text::printable(&body).into_owned(),
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
        kv("faultline.dns.outcome", q.outcome.as_str()),
        kv("server.address", server.trim_matches(['[', ']'])),
        kv("faultline.workload", q.workload.clone()),
        kv("container.runtime.cgroup", q.cgroup.clone()),
    ];
    if let Ok(p) = port.parse::<i64>() {
        attributes.push(kv_int("server.port", p));
    }
    if let Some(rcode) = &q.rcode {
        attributes.push(kv("dns.response_code", rcode.name()));
    }
    if let Some(gap) = q.retransmit_gap_ms {
        attributes.push(kv("faultline.dns.retransmit_gap_ms", format!("{gap:.1}")));
    }
    attributes.extend(k8s_attributes(q.pod.as_ref()));
    let failed =
        q.outcome == Outcome::Timeout || matches!(q.rcode, Some(Rcode::SERVFAIL | Rcode::REFUSED));
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
                q.rcode
                    .map_or_else(|| "timeout".to_owned(), |r| r.name().into_owned())
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
    config: OtlpConfig,
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
            post(
                &client,
                &config,
                &config.logs,
                request.encode_to_vec(),
                n,
                &counters,
            )
            .await;
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
            post(
                &client,
                &config,
                &config.traces,
                request.encode_to_vec(),
                n,
                &counters,
            )
            .await;
        }
    }
}

/// What one attempt of a request came to.
enum Attempt {
    Done,
    /// 429, 502, 503, 504 or no connection: worth another try, after this long if the
    /// collector said (Retry-After).
    Later(Option<Duration>),
    Failed,
}

/// One OTLP/HTTP request, tried up to ATTEMPTS times with exponential backoff while the
/// collector asks for patience. On failure the records are gone, counted: a collector that
/// cannot keep up loses events, it does not make faultline buffer without bound.
async fn post(
    client: &Client<HttpConnector, Full<Bytes>>,
    config: &OtlpConfig,
    uri: &hyper::Uri,
    body: Vec<u8>,
    records: u64,
    counters: &OtlpCounters,
) {
    let body = if config.gzip { gzip(&body) } else { Some(body) };
    let Some(body) = body.map(Bytes::from) else {
        counters.failed_requests.inc();
        counters.dropped.inc_by(records);
        return;
    };
    let mut backoff = Duration::from_millis(500);
    for attempt in 1..=ATTEMPTS {
        match attempt_once(client, config, uri, body.clone()).await {
            Attempt::Done => return,
            Attempt::Later(asked) if attempt < ATTEMPTS => {
                tokio::time::sleep(asked.unwrap_or(backoff).min(MAX_BACKOFF)).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Attempt::Later(_) | Attempt::Failed => break,
        }
    }
    counters.failed_requests.inc();
    counters.dropped.inc_by(records);
}

async fn attempt_once(
    client: &Client<HttpConnector, Full<Bytes>>,
    config: &OtlpConfig,
    uri: &hyper::Uri,
    body: Bytes,
) -> Attempt {
    let mut req = hyper::Request::post(uri.clone())
        .header("content-type", "application/x-protobuf")
        .header(
            "user-agent",
            concat!("faultline/", env!("CARGO_PKG_VERSION")),
        );
    if config.gzip {
        req = req.header("content-encoding", "gzip");
    }
    for (k, v) in &config.headers {
        req = req.header(k, v);
    }
    let Ok(req) = req.body(Full::new(body)) else {
        return Attempt::Failed;
    };
    match tokio::time::timeout(config.timeout, client.request(req)).await {
        Ok(Ok(resp)) if resp.status().is_success() => Attempt::Done,
        Ok(Ok(resp)) if matches!(resp.status().as_u16(), 429 | 502 | 503 | 504) => Attempt::Later(
            resp.headers()
                .get(hyper::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs),
        ),
        Ok(Ok(_)) => Attempt::Failed,
        // Refused, reset, or too slow: the collector may be restarting.
        Ok(Err(_)) | Err(_) => Attempt::Later(None),
    }
}

fn gzip(body: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    enc.write_all(body).ok()?;
    enc.finish().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn the_standard_variables_configure_the_exporter() {
        assert!(OtlpConfig::from_env(None, env(&[])).unwrap().is_none());
        let c = OtlpConfig::from_env(
            None,
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://tempo:4318/v1/traces",
                ),
                ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=a%20b,bad"),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "deployment.environment=prod,k8s.cluster.name=eu-1",
                ),
                ("OTEL_SERVICE_NAME", "faultline-eu"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.logs, "http://collector:4318/v1/logs");
        assert_eq!(c.traces, "http://tempo:4318/v1/traces");
        assert_eq!(c.headers.len(), 1);
        assert_eq!(c.headers[0].1, "a b");
        assert!(c.gzip);
        assert_eq!(c.timeout, Duration::from_millis(2500));
        let r = resource("node-1", &c.resource);
        let get = |k: &str| {
            r.attributes
                .iter()
                .filter(|a| a.key == k)
                .map(|a| format!("{:?}", a.value))
                .collect::<Vec<_>>()
        };
        assert_eq!(get("service.name").len(), 1, "one service.name");
        assert!(get("service.name")[0].contains("faultline-eu"));
        assert!(get("k8s.node.name")[0].contains("node-1"));
        assert!(get("k8s.cluster.name")[0].contains("eu-1"));
        // The flag wins over the variable.
        let c = OtlpConfig::from_env(
            Some("http://local:4318"),
            env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://other:4318")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.logs, "http://local:4318/v1/logs");
    }

    #[test]
    fn unsupported_settings_are_one_line_errors() {
        for vars in [
            vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318")],
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ],
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd"),
            ],
        ] {
            let e = OtlpConfig::from_env(None, env(&vars)).unwrap_err();
            assert!(!format!("{e:#}").contains('\n'), "{e:#}");
        }
    }

    #[test]
    fn gzip_round_trips() {
        use std::io::Read as _;
        let body = b"faultline ".repeat(100);
        let packed = gzip(&body).unwrap();
        assert!(packed.len() < body.len());
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(packed.as_slice())
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, body);
    }
}
