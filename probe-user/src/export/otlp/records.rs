//! Events as OTLP: clone failures, conntrack drops and budget summaries as event records
//! (`event_name`, attributes, no body, as the conventions for events say), DNS queries as
//! client spans; each with its [`Subject`], whose OpenTelemetry Kubernetes attributes go on
//! the resource it is exported under.

use std::sync::Arc;

use opentelemetry_proto::tonic::{
    common::v1::{AnyValue, KeyValue, any_value},
    logs::v1::LogRecord,
    trace::v1::{Span, Status, span::SpanKind, status::StatusCode},
};

use crate::{
    attribution::pods::PodRef,
    export::budget::BudgetLine,
    signals::clone::CloneFailure,
    signals::conntrack::ConntrackDrop,
    signals::dns::{DnsQuery, Outcome, Rcode},
};

/// What a record is about, which names the resource it is exported under: a pod (its
/// Kubernetes attributes), the node (a process no pod holds), or faultline itself (its own
/// losses).
#[derive(Clone, Debug)]
pub enum Subject {
    Pod(Arc<PodRef>),
    Node,
    Agent,
}

impl Subject {
    fn of(pod: Option<&Arc<PodRef>>) -> Subject {
        pod.map_or(Subject::Node, |p| Subject::Pod(p.clone()))
    }
}

/// A log record or span with what it is about.
#[derive(Debug)]
pub struct Subjected<T> {
    pub subject: Subject,
    pub record: T,
}

/// OTLP severity number for WARN.
pub(super) const SEVERITY_WARN: i32 = 13;

pub(super) fn kv(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

pub(super) fn kv_int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

/// A clone failure as an OTLP event record, with OpenTelemetry's process and thread
/// attributes (`thread.name` is the task's `comm`).
pub fn log_record(f: &CloneFailure) -> Subjected<LogRecord> {
    let attributes = vec![
        kv("faultline.cause", f.cause.as_str()),
        kv("faultline.evidence", f.evidence.clone()),
        kv("faultline.syscall", f.syscall),
        kv("faultline.task", f.task.as_str()),
        kv("faultline.workload", f.workload.clone()),
        kv("faultline.cgroup", f.cgroup.clone()),
        kv("error.type", f.errno.clone()),
        kv_int("process.pid", f.pid as i64),
        kv_int("thread.id", f.tid as i64),
        kv("thread.name", f.comm.clone()),
        kv_int("process.parent_pid", f.ppid as i64),
    ];
    Subjected {
        subject: Subject::of(f.pod.as_ref()),
        record: event("faultline.clone_failure", f.time_unix_nano, attributes),
    }
}

/// An event record: its name, time and attributes, WARN, no body.
fn event(name: &str, time_unix_nano: u64, attributes: Vec<KeyValue>) -> LogRecord {
    LogRecord {
        time_unix_nano,
        observed_time_unix_nano: now_unix_nano(),
        severity_number: SEVERITY_WARN,
        severity_text: "WARN".to_owned(),
        event_name: name.to_owned(),
        attributes,
        ..Default::default()
    }
}

/// A conntrack drop as an OTLP event record: the flow, the cause, the sender's pod.
pub fn drop_record(d: &ConntrackDrop) -> Subjected<LogRecord> {
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
        attributes.push(kv("faultline.cgroup", cgroup.clone()));
    }
    if let Some(dns) = &d.dns {
        attributes.push(kv_int("faultline.dns.id", i64::from(dns.id)));
        if let Some(name) = &dns.qname {
            attributes.push(kv("dns.question.name", name.clone()));
        }
    }
    Subjected {
        subject: Subject::of(d.pod.as_ref()),
        record: event("faultline.conntrack_drop", d.time_unix_nano, attributes),
    }
}

/// A budget's summary of suppressed events (about their pod, or the node), or a count of
/// events lost (about faultline), as an event record.
pub fn budget_record(line: &BudgetLine) -> Subjected<LogRecord> {
    let count = |n: u64| kv_int("faultline.count", i64::try_from(n).unwrap_or(i64::MAX));
    let (subject, name, attributes) = match line {
        BudgetLine::EventSummary(s) => (
            Subject::of(s.pod.as_ref()),
            "faultline.event_summary",
            vec![
                kv("faultline.event", s.event),
                kv("faultline.workload", s.workload.clone()),
                kv("faultline.cause", s.cause),
                count(s.count),
                kv("faultline.evidence", s.evidence.clone()),
                kv("faultline.first", s.first.clone()),
                kv("faultline.last", s.last.clone()),
            ],
        ),
        BudgetLine::EventsLost(l) => (
            Subject::Agent,
            "faultline.events_lost",
            vec![kv("faultline.event", l.event), count(l.count)],
        ),
    };
    Subjected {
        subject,
        record: event(name, now_unix_nano(), attributes),
    }
}

/// OpenTelemetry's Kubernetes attributes of a pod. A pod nothing named has `k8s.pod.uid`
/// alone: the conventions' names are the pod's real ones, never the labels' `unknown`.
pub(super) fn k8s_attributes(p: &PodRef) -> Vec<KeyValue> {
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
pub fn dns_span(q: &DnsQuery) -> Subjected<Span> {
    let (server, port) = q.server.rsplit_once(':').unwrap_or((q.server.as_str(), ""));
    let mut attributes = vec![
        kv("dns.question.name", q.qname.clone()),
        kv("faultline.dns.question.type", q.qtype.clone()),
        kv("faultline.dns.outcome", q.outcome.as_str()),
        kv("server.address", server.trim_matches(['[', ']'])),
        kv("faultline.workload", q.workload.clone()),
        kv("faultline.cgroup", q.cgroup.clone()),
    ];
    if let Ok(p) = port.parse::<i64>() {
        attributes.push(kv_int("server.port", p));
    }
    if let Some(rcode) = &q.rcode {
        attributes.push(kv("faultline.dns.response_code", rcode.name()));
    }
    if let Some(gap) = q.retransmit_gap_ms {
        attributes.push(kv("faultline.dns.retransmit_gap_ms", format!("{gap:.1}")));
    }
    let failed =
        q.outcome == Outcome::Timeout || matches!(q.rcode, Some(Rcode::SERVFAIL | Rcode::REFUSED));
    // Semantic conventions: error.type names the failure (the rcode, or "timeout").
    let error = failed.then(|| {
        q.rcode
            .map_or_else(|| "timeout".to_owned(), |r| r.name().into_owned())
    });
    if let Some(error) = &error {
        attributes.push(kv("error.type", error.clone()));
    }
    let record = Span {
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
            message: error.unwrap_or_default(),
        }),
        ..Default::default()
    };
    Subjected {
        subject: Subject::of(q.pod.as_ref()),
        record,
    }
}

/// A random id of `len` bytes, not all zero (W3C trace context: 16 for a trace, 8 for a span;
/// an all-zero id is invalid). Unique, not secret: fastrand, seeded from the OS per thread.
pub(super) fn random_id(len: usize) -> Vec<u8> {
    let mut id: Vec<u8> = std::iter::repeat_with(|| fastrand::u8(..))
        .take(len)
        .collect();
    if let Some(last) = id.last_mut()
        && *last == 0
    {
        *last = 1;
    }
    id
}

pub(super) fn now_unix_nano() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn ids_are_of_their_length_never_zero_and_do_not_repeat() {
        let ids: std::collections::HashSet<Vec<u8>> = (0..10_000).map(|_| random_id(8)).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(
            ids.iter()
                .all(|id| id.len() == 8 && id.iter().any(|&b| b != 0))
        );
        assert_eq!(random_id(16).len(), 16);
    }

    /// Attributes as (key, value) text, in order.
    pub(in crate::export::otlp) fn pairs(attributes: Vec<KeyValue>) -> Vec<(String, String)> {
        attributes
            .into_iter()
            .map(|kv| {
                let value = match kv.value.and_then(|v| v.value) {
                    Some(any_value::Value::StringValue(s)) => s,
                    other => format!("{other:?}"),
                };
                (kv.key, value)
            })
            .collect()
    }

    fn keys(pod: &PodRef) -> Vec<(String, String)> {
        pairs(k8s_attributes(pod))
    }

    #[test]
    fn a_pod_nothing_named_has_its_uid_and_no_made_up_names() {
        let uid = "0d3e2f1a-8b7c-4d6e-9f00-112233445566";
        let unnamed = PodRef {
            uid: uid.into(),
            ..Default::default()
        };
        assert_eq!(keys(&unnamed), [("k8s.pod.uid".into(), uid.into())]);
        let named = PodRef {
            namespace: Some("shop".into()),
            name: Some("cart-1".into()),
            owner: Some(crate::attribution::kubeapi::Owner {
                kind: "Deployment".into(),
                name: "cart".into(),
            }),
            ..unnamed
        };
        let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert_eq!(
            keys(&named),
            pairs(&[
                ("k8s.pod.uid", uid),
                ("k8s.namespace.name", "shop"),
                ("k8s.pod.name", "cart-1"),
                ("k8s.deployment.name", "cart"),
            ])
        );
    }
}
