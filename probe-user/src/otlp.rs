//! OTLP/HTTP export of events (`faultline run --otlp-endpoint http://collector:4318`): clone
//! failures as log records with their real time and OpenTelemetry's Kubernetes attributes
//! (`k8s.namespace.name`, `k8s.pod.name`, ...). The ring-buffer readers only ever `try_send`
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
    collector::logs::v1::ExportLogsServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    logs::v1::{LogRecord, ResourceLogs, ScopeLogs},
    resource::v1::Resource,
};
use prometheus::IntCounter;
use prost::Message as _;
use tokio::sync::mpsc;

use crate::clone::CloneFailure;

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
    tx: mpsc::Sender<LogRecord>,
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
        let uri: hyper::Uri = format!("{base}/v1/logs")
            .parse()
            .context("parsing --otlp-endpoint")?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let resource = Resource {
            attributes: vec![kv("service.name", "faultline"), kv("k8s.node.name", node)],
            ..Default::default()
        };
        tokio::spawn(send_batches(rx, uri, resource, counters.clone()));
        Ok(OtlpExporter { tx, counters })
    }

    /// Queues an event; drops and counts it when the queue is full.
    pub fn clone_failure(&self, f: &CloneFailure) {
        if self.tx.try_send(log_record(f)).is_err() {
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
    if let Some(p) = &f.pod {
        attributes.push(kv("k8s.pod.uid", p.uid.clone()));
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
    }
    LogRecord {
        time_unix_nano: f.time_unix_nano,
        observed_time_unix_nano: now_unix_nano(),
        severity_number: SEVERITY_WARN,
        severity_text: "WARN".to_owned(),
        event_name: "faultline.clone_failure".to_owned(),
        body: Some(AnyValue {
            value: Some(any_value::Value::StringValue(format!(
                "{} {} failed with {}: {} ({})",
                f.comm,
                f.syscall,
                f.errno,
                f.cause.as_str(),
                f.evidence
            ))),
        }),
        attributes,
        ..Default::default()
    }
}

fn now_unix_nano() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

async fn send_batches(
    mut rx: mpsc::Receiver<LogRecord>,
    uri: hyper::Uri,
    resource: Resource,
    counters: OtlpCounters,
) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let deadline = tokio::time::sleep(FLUSH_EVERY);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                r = rx.recv() => match r {
                    Some(rec) => {
                        batch.push(rec);
                        if batch.len() >= BATCH {
                            break;
                        }
                    }
                    None if batch.is_empty() => return,
                    None => break,
                },
                _ = &mut deadline => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let records = batch.len() as u64;
        let request = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(resource.clone()),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: "faultline".to_owned(),
                        version: env!("CARGO_PKG_VERSION").to_owned(),
                        ..Default::default()
                    }),
                    log_records: std::mem::take(&mut batch),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let body = Full::new(Bytes::from(request.encode_to_vec()));
        let req = hyper::Request::post(uri.clone())
            .header("content-type", "application/x-protobuf")
            .body(body);
        let ok = match req {
            Ok(req) => matches!(
                tokio::time::timeout(REQUEST_TIMEOUT, client.request(req)).await,
                Ok(Ok(resp)) if resp.status().is_success()
            ),
            Err(_) => false,
        };
        if !ok {
            // The batch is gone either way: a collector that cannot keep up loses events
            // (counted), it does not make faultline buffer without bound.
            counters.failed_requests.inc();
            counters.dropped.inc_by(records);
        }
    }
}
