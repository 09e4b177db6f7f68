//! Kubernetes Events on the affected pod (`run --kube-events`), as the kubelet's recorder
//! makes them: the first occurrence of a (pod uid, reason, cause) creates an
//! `events.k8s.io/v1` Event in the pod's namespace; repeats update its `series` (count, last
//! observed time) with a PATCH at most once per [`PATCH_EVERY`]. Every call to the API takes
//! a token of its pod and reason's bucket ([`POD_BURST`], one more per [`POD_REFILL`]) and of
//! the node's ([`NODE_BURST`], [`NODE_PER_SECOND`] a second): what waits is aggregated, not
//! lost. The sink hands occurrences over with `try_send` into a bounded queue and never waits
//! for the API; a task posts them. Failures are counted and said once at WARN. A note is
//! escaped as every line faultline shows ([`crate::text::printable`]): what pods name in it
//! reaches terminals through `kubectl`.

use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::{
    api::{
        core::v1::ObjectReference,
        events::v1::{Event as KubeEvent, EventSeries},
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use prometheus::IntCounterVec;
use tokio::sync::mpsc;

use crate::{
    attribution::{kubeapi::client, pods::PodRef},
    export::bucket::Bucket,
    signals::{Event, clone::cause::Cause as CloneCause, dns::Outcome},
    trend::{Estimate, Limit},
};

/// The Event's `reportingController`.
pub const CONTROLLER: &str = "faultline.dev/agent";
/// Repeats of one Event are patched at most this often.
pub const PATCH_EVERY: Duration = Duration::from_secs(30);
/// API calls a pod and reason may make at once...
pub const POD_BURST: f64 = 4.0;
/// ...and one more per this.
pub const POD_REFILL: Duration = Duration::from_secs(30);
/// API calls the node may make at once...
pub const NODE_BURST: f64 = 20.0;
/// ...and this many more a second.
pub const NODE_PER_SECOND: f64 = 1.0;
/// Most Events followed at once; past it the least recently seen is forgotten (counted
/// `dropped`).
pub const MAX_KEYS: usize = 4096;
/// An Event not seen for this long is forgotten: the next occurrence creates a new one.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);
/// A limit this close to binding (its time to exhaustion) is an Event.
pub const ETA_WARN: Duration = Duration::from_secs(600);
/// Occurrences waiting for the task.
const QUEUE: usize = 1024;
/// How often the task posts what is due.
const TICK: Duration = Duration::from_secs(1);
/// The API server's limit on a note is 1 kB.
const MAX_NOTE: usize = 1024;
/// A name is a DNS subdomain of at most 253 characters.
const MAX_NAME: usize = 253;

/// Why an Event is recorded: its `reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    TaskCreationRefused,
    LimitNearlyReached,
    DnsTimeouts,
    ConntrackDrops,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::TaskCreationRefused => "TaskCreationRefused",
            Reason::LimitNearlyReached => "LimitNearlyReached",
            Reason::DnsTimeouts => "DNSTimeouts",
            Reason::ConntrackDrops => "ConntrackDrops",
        }
    }

    /// The Event's `action`: what was done, or is about to fail.
    fn action(self) -> &'static str {
        match self {
            Reason::TaskCreationRefused => "CreateTask",
            Reason::LimitNearlyReached => "CreateTask",
            Reason::DnsTimeouts => "ResolveName",
            Reason::ConntrackDrops => "TrackConnection",
        }
    }
}

/// The pod an Event is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Regarding {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl Regarding {
    fn of(pod: Option<&PodRef>) -> Option<Regarding> {
        let pod = pod?;
        Some(Regarding {
            namespace: pod.namespace.clone()?,
            name: pod.name.clone()?,
            uid: pod.uid.clone(),
        })
    }
}

/// One occurrence of something worth an Event.
#[derive(Clone, Debug)]
pub struct Occurrence {
    pub pod: Regarding,
    pub reason: Reason,
    /// Tells Events of one pod and reason apart (the cause).
    pub key: String,
    pub note: String,
    pub time: SystemTime,
}

impl Occurrence {
    /// The Event a signal's event is worth, if any: a refused task creation, a DNS timeout or
    /// a conntrack drop of a pod the API named.
    pub fn of_event(event: &Event) -> Option<Occurrence> {
        let (pod, reason, key, note) = match event {
            Event::CloneFailure(f) => {
                let limit = match f.cause {
                    CloneCause::PidsLimit => f
                        .pids_cgroup
                        .as_deref()
                        .map_or(String::new(), |c| format!(" (pids.max of {c})")),
                    _ => String::new(),
                };
                (
                    f.pod.as_deref(),
                    Reason::TaskCreationRefused,
                    f.cause.as_str().to_owned(),
                    format!(
                        "{} refused a new {} to {} (pid {}): {}{limit}, {}",
                        f.syscall,
                        f.task.as_str(),
                        f.comm,
                        f.pid,
                        f.cause.as_str(),
                        f.errno
                    ),
                )
            }
            Event::DnsQuery(q) if q.outcome == Outcome::Timeout => (
                q.pod.as_deref(),
                Reason::DnsTimeouts,
                q.server.clone(),
                format!("DNS queries to {} got no answer in time", q.server),
            ),
            Event::ConntrackDrop(d) => (
                d.pod.as_deref(),
                Reason::ConntrackDrops,
                d.cause.as_str().to_owned(),
                format!(
                    "conntrack dropped {} packets ({}): {}",
                    d.proto,
                    d.cause.as_str(),
                    d.evidence
                ),
            ),
            // Answered queries, near-misses (the kernel resolved the clash) and a trace's
            // headroom warnings are worth no Event.
            Event::DnsQuery(_) | Event::ClashesResolved(_) | Event::HeadroomWarning(_) => {
                return None;
            }
        };
        Some(Occurrence {
            pod: Regarding::of(pod)?,
            reason,
            key,
            note,
            time: SystemTime::now(),
        })
    }

    /// The Event an estimate is worth: a pod's pids limit exhausted within [`ETA_WARN`].
    pub fn of_estimate(e: &Estimate) -> Option<Occurrence> {
        let eta = e.eta_s.filter(|s| s.is_finite() && *s >= 0.0)?;
        if e.limit != Limit::Pids || eta > ETA_WARN.as_secs_f64() {
            return None;
        }
        Some(Occurrence {
            pod: Regarding::of(e.pod.as_deref())?,
            reason: Reason::LimitNearlyReached,
            key: e.limit.as_str().to_owned(),
            note: format!(
                "{} of {} {} in use, full in about {:.0} s at the current growth",
                e.current,
                e.max,
                e.limit.as_str(),
                eta
            ),
            time: SystemTime::now(),
        })
    }
}

type Key = (String, Reason, String);

/// One Event followed.
#[derive(Debug)]
struct Entry {
    pod: Regarding,
    reason: Reason,
    note: String,
    /// Its name once created.
    name: Option<String>,
    count: u32,
    /// The count the API has.
    posted: u32,
    first: SystemTime,
    last: SystemTime,
    seen: Instant,
    posted_at: Option<Instant>,
}

/// What to ask of the API.
#[derive(Clone, Debug, PartialEq)]
pub enum Call {
    Create {
        key: Key,
        event: Box<KubeEvent>,
    },
    Patch {
        key: Key,
        namespace: String,
        name: String,
        count: u32,
        series: EventSeries,
    },
}

/// The aggregation and rate limits, apart from the API (tested alone).
pub struct Recorder {
    node: String,
    entries: HashMap<Key, Entry>,
    pod_buckets: HashMap<(String, Reason), Bucket>,
    node_bucket: Bucket,
    /// Occurrences forgotten at the cap.
    pub evicted: u64,
    serial: u64,
}

impl Recorder {
    pub fn new(node: &str, now: Instant) -> Recorder {
        Recorder {
            node: node.to_owned(),
            entries: HashMap::new(),
            pod_buckets: HashMap::new(),
            node_bucket: Bucket::full(NODE_BURST, now),
            evicted: 0,
            serial: 0,
        }
    }

    pub fn record(&mut self, o: Occurrence, now: Instant) {
        let key = (o.pod.uid.clone(), o.reason, o.key);
        if !self.entries.contains_key(&key) && self.entries.len() >= MAX_KEYS {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.seen)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest.and_then(|k| self.entries.remove(&k)) {
                self.evicted += u64::from(oldest.count - oldest.posted);
            }
        }
        let entry = self.entries.entry(key).or_insert_with(|| Entry {
            pod: o.pod,
            reason: o.reason,
            note: o.note,
            name: None,
            count: 0,
            posted: 0,
            first: o.time,
            last: o.time,
            seen: now,
            posted_at: None,
        });
        entry.count = entry.count.saturating_add(1);
        entry.last = o.time;
        entry.seen = now;
    }

    /// The calls due now, within the rates; what is not due waits in its entry.
    pub fn due(&mut self, now: Instant) -> Vec<Call> {
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.seen) < FORGET_AFTER);
        let buckets: std::collections::HashSet<_> = self
            .entries
            .values()
            .map(|e| (e.pod.uid.clone(), e.reason))
            .collect();
        self.pod_buckets.retain(|k, _| buckets.contains(k));
        crate::memory::shrink(&mut self.entries);
        crate::memory::shrink(&mut self.pod_buckets);
        self.node_bucket.refill(NODE_BURST, NODE_PER_SECOND, now);
        let mut keys: Vec<_> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                e.count > e.posted
                    && (e.name.is_none()
                        || e.posted_at
                            .is_none_or(|at| now.saturating_duration_since(at) >= PATCH_EVERY))
            })
            .map(|(k, e)| (e.seen, k.clone()))
            .collect();
        keys.sort();
        let mut calls = Vec::new();
        for (_, key) in keys {
            if self.node_bucket.tokens < 1.0 {
                break;
            }
            let Some(entry) = self.entries.get_mut(&key) else {
                continue;
            };
            let bucket = self
                .pod_buckets
                .entry((key.0.clone(), key.1))
                .or_insert_with(|| Bucket::full(POD_BURST, now));
            bucket.refill(POD_BURST, 1.0 / POD_REFILL.as_secs_f64(), now);
            if bucket.tokens < 1.0 {
                continue;
            }
            bucket.tokens -= 1.0;
            self.node_bucket.tokens -= 1.0;
            entry.posted_at = Some(now);
            let series = (entry.count >= 2).then(|| EventSeries {
                count: i32::try_from(entry.count).unwrap_or(i32::MAX),
                last_observed_time: micro(entry.last),
            });
            match (&entry.name, series) {
                (Some(name), Some(series)) => calls.push(Call::Patch {
                    key,
                    namespace: entry.pod.namespace.clone(),
                    name: name.clone(),
                    count: entry.count,
                    series,
                }),
                _ => {
                    self.serial += 1;
                    let name = event_name(&entry.pod.name, entry.first, self.serial);
                    let event = new_event(&self.node, entry, &name);
                    entry.name = Some(name);
                    calls.push(Call::Create {
                        key,
                        event: Box::new(event),
                    });
                }
            }
        }
        calls
    }

    /// The API has the count this call carried.
    pub fn posted(&mut self, call: &Call) {
        let (key, count) = match call {
            Call::Create { key, event } => (
                key,
                event
                    .series
                    .as_ref()
                    .map_or(1, |s| u32::try_from(s.count).unwrap_or(u32::MAX)),
            ),
            Call::Patch { key, count, .. } => (key, *count),
        };
        if let Some(e) = self.entries.get_mut(key) {
            e.posted = e.posted.max(count);
        }
    }

    /// The call failed: a create is tried again (a new name), a patch too; `gone` (the Event
    /// expired or was deleted) means create it anew.
    pub fn failed(&mut self, call: &Call, gone: bool) {
        let key = match call {
            Call::Create { key, .. } | Call::Patch { key, .. } => key,
        };
        if let Some(e) = self.entries.get_mut(key)
            && (gone || matches!(call, Call::Create { .. }))
        {
            e.name = None;
            e.posted = 0;
        }
    }
}

fn micro(t: SystemTime) -> MicroTime {
    MicroTime(Timestamp::try_from(t).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// `<pod>.<16 hex digits>`: unique per start, at most 253 characters.
fn event_name(pod: &str, first: SystemTime, serial: u64) -> String {
    let nanos = first
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let suffix = format!("{:016x}", nanos.wrapping_add(serial));
    let room = MAX_NAME - suffix.len() - 1;
    let pod: String = pod.chars().take(room).collect();
    let pod = pod.trim_end_matches(['.', '-']);
    format!("{pod}.{suffix}")
}

fn new_event(node: &str, e: &Entry, name: &str) -> KubeEvent {
    // The note carries what pods name (process, cgroup and interface names) to `kubectl
    // describe` and `get events`: escaped as every line faultline shows, before it is cut.
    let note = format!("{} (seen by faultline on {node})", e.note);
    let mut note = crate::text::printable(&note).into_owned();
    if note.len() > MAX_NOTE {
        let mut end = MAX_NOTE;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
    }
    KubeEvent {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(e.pod.namespace.clone()),
            ..ObjectMeta::default()
        },
        action: Some(e.reason.action().to_owned()),
        event_time: Some(micro(e.first)),
        note: Some(note),
        reason: Some(e.reason.as_str().to_owned()),
        regarding: Some(ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Pod".to_owned()),
            namespace: Some(e.pod.namespace.clone()),
            name: Some(e.pod.name.clone()),
            uid: Some(e.pod.uid.clone()),
            ..ObjectReference::default()
        }),
        reporting_controller: Some(CONTROLLER.to_owned()),
        reporting_instance: Some(node.to_owned()),
        series: (e.count >= 2).then(|| EventSeries {
            count: i32::try_from(e.count).unwrap_or(i32::MAX),
            last_observed_time: micro(e.last),
        }),
        type_: Some("Warning".to_owned()),
        ..KubeEvent::default()
    }
}

/// The sink's end: hands occurrences to the task, never waits.
pub struct KubeEvents {
    tx: mpsc::Sender<Occurrence>,
    counters: IntCounterVec,
}

impl KubeEvents {
    /// Starts the task posting Events, or says once why not (no API configured).
    pub async fn start(
        kubeconfig: Option<&PathBuf>,
        node: &str,
        counters: IntCounterVec,
    ) -> Option<KubeEvents> {
        let client = match client(kubeconfig).await {
            Ok(c) => c,
            Err(why) => {
                tracing::warn!("Kubernetes Events are off: {why}");
                return None;
            }
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(post(
            client,
            Recorder::new(node, Instant::now()),
            rx,
            counters.clone(),
        ));
        tracing::info!("recording Kubernetes Events on affected pods");
        Some(KubeEvents { tx, counters })
    }

    pub fn event(&self, event: &Event) {
        if let Some(o) = Occurrence::of_event(event) {
            self.send(o);
        }
    }

    pub fn estimates(&self, estimates: &[Estimate]) {
        for o in estimates.iter().filter_map(Occurrence::of_estimate) {
            self.send(o);
        }
    }

    fn send(&self, o: Occurrence) {
        if self.tx.try_send(o).is_err() {
            self.counters.with_label_values(&["dropped"]).inc();
        }
    }
}

/// The task: aggregates what the sink sends, posts what is due each [`TICK`].
async fn post(
    client: Client,
    mut recorder: Recorder,
    mut rx: mpsc::Receiver<Occurrence>,
    counters: IntCounterVec,
) {
    let mut tick = tokio::time::interval(TICK);
    let mut failing = false;
    let mut evicted = 0;
    loop {
        tokio::select! {
            o = rx.recv() => match o {
                Some(o) => recorder.record(o, Instant::now()),
                None => return,
            },
            _ = tick.tick() => {
                for call in recorder.due(Instant::now()) {
                    let result = send(&client, &call).await;
                    match result {
                        Ok(()) => {
                            recorder.posted(&call);
                            let what = if matches!(call, Call::Create { .. }) { "created" } else { "updated" };
                            counters.with_label_values(&[what]).inc();
                            if failing {
                                tracing::info!("Kubernetes Events are recorded again");
                                failing = false;
                            }
                        }
                        Err(e) => {
                            let gone = matches!(&e, kube::Error::Api(s) if s.code == 404);
                            recorder.failed(&call, gone);
                            counters.with_label_values(&["failed"]).inc();
                            if !failing {
                                tracing::warn!("recording a Kubernetes Event failed (will retry within the rates; said once until one works): {e}");
                                failing = true;
                            }
                        }
                    }
                }
                if recorder.evicted > evicted {
                    counters.with_label_values(&["dropped"]).inc_by(recorder.evicted - evicted);
                    evicted = recorder.evicted;
                }
            }
        }
    }
}

/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

async fn send(client: &Client, call: &Call) -> Result<(), kube::Error> {
    let request = async {
        match call {
            Call::Create { event, .. } => {
                let namespace = event.metadata.namespace.as_deref().unwrap_or("default");
                let api: Api<KubeEvent> = Api::namespaced(client.clone(), namespace);
                api.create(&PostParams::default(), event).await.map(|_| ())
            }
            Call::Patch {
                namespace,
                name,
                series,
                ..
            } => {
                let api: Api<KubeEvent> = Api::namespaced(client.clone(), namespace);
                let patch = serde_json::json!({ "series": series });
                api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| ())
            }
        }
    };
    tokio::time::timeout(CALL_TIMEOUT, request)
        .await
        .unwrap_or_else(|_| Err(kube::Error::Service("timed out".into())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn occurrence(uid: &str, cause: &str) -> Occurrence {
        Occurrence {
            pod: Regarding {
                namespace: "shop".to_owned(),
                name: format!("web-{uid}"),
                uid: uid.to_owned(),
            },
            reason: Reason::TaskCreationRefused,
            key: cause.to_owned(),
            note: "clone refused a new thread: pids_limit".to_owned(),
            time: SystemTime::now(),
        }
    }

    /// Posts every call as if the API took it.
    fn post_all(r: &mut Recorder, now: Instant) -> Vec<Call> {
        let calls = r.due(now);
        for c in &calls {
            r.posted(c);
        }
        calls
    }

    /// A conntrack drop of cart-1 with this evidence.
    fn insert_failed(evidence: &str) -> crate::signals::conntrack::ConntrackDrop {
        crate::signals::conntrack::ConntrackDrop {
            time: String::new(),
            time_unix_nano: 0,
            cause: crate::signals::conntrack::Cause::InsertFailed,
            proto: "udp".into(),
            src: "10.0.0.5".into(),
            sport: 40000,
            dst: "10.96.0.10".into(),
            dport: 53,
            netns: 1,
            cgroup: None,
            workload: "shop/cart-1".into(),
            pod: named(),
            sender: crate::signals::conntrack::origin::Sender::Socket,
            evidence: evidence.into(),
            dns: None,
        }
    }

    fn named() -> Option<Arc<PodRef>> {
        Some(Arc::new(PodRef {
            namespace: Some("shop".into()),
            name: Some("cart-1".into()),
            uid: "u1".into(),
            ..PodRef::default()
        }))
    }

    /// Each of the four reasons from the signal it stands for, and nothing from what is
    /// not worth an Event (an answered query, a far or non-pids estimate, a pod without a name).
    #[test]
    fn each_signal_makes_its_reason_and_only_that() {
        use crate::signals::{clone::CloneFailure, dns::DnsQuery};
        let reason = |o: Option<Occurrence>| o.map(|o| (o.reason, o.key, o.pod.name));
        let refused = CloneFailure {
            pod: named(),
            ..CloneFailure::example("/kubepods/pod-u1")
        };
        assert_eq!(
            reason(Occurrence::of_event(&Event::CloneFailure(refused.clone()))),
            Some((
                Reason::TaskCreationRefused,
                "pids_limit".into(),
                "cart-1".into()
            ))
        );
        let timeout = DnsQuery {
            outcome: Outcome::Timeout,
            server: "10.96.0.10:53".into(),
            pod: named(),
            ..DnsQuery::default()
        };
        assert_eq!(
            reason(Occurrence::of_event(&Event::DnsQuery(timeout.clone()))),
            Some((Reason::DnsTimeouts, "10.96.0.10:53".into(), "cart-1".into()))
        );
        let answered = DnsQuery {
            outcome: Outcome::Answered,
            ..timeout
        };
        assert!(Occurrence::of_event(&Event::DnsQuery(answered)).is_none());
        let drop = insert_failed("insert_failed rose by 1");
        assert_eq!(
            reason(Occurrence::of_event(&Event::ConntrackDrop(drop))),
            Some((
                Reason::ConntrackDrops,
                "insert_failed".into(),
                "cart-1".into()
            ))
        );
        let soon = Estimate {
            limit: Limit::Pids,
            resource: "/kubepods/pod-u1".into(),
            workload: "shop/cart-1".into(),
            current: 90,
            max: 100,
            growth_per_s: Some(1.0),
            eta_s: Some(10.0),
            samples: 3,
            pod: named(),
            shared_by: Vec::new(),
        };
        assert_eq!(
            reason(Occurrence::of_estimate(&soon)),
            Some((Reason::LimitNearlyReached, "pids".into(), "cart-1".into()))
        );
        let far = Estimate {
            eta_s: Some(ETA_WARN.as_secs_f64() + 1.0),
            ..soon.clone()
        };
        let other_limit = Estimate {
            limit: Limit::PidMax,
            ..soon.clone()
        };
        let unnamed = Estimate {
            pod: Some(Arc::default()),
            ..soon
        };
        for e in [far, other_limit, unnamed] {
            assert!(Occurrence::of_estimate(&e).is_none(), "{e:?}");
        }
        // Not a pod, and a pod nothing named (its labels say `unknown`): no Event, rather
        // than one on a made-up object.
        let not_a_pod = CloneFailure {
            pod: None,
            ..refused.clone()
        };
        let unnamed = CloneFailure {
            pod: Some(Arc::new(PodRef {
                uid: "0d3e2f1a-8b7c-4d6e-9f00-112233445566".into(),
                ..PodRef::default()
            })),
            ..refused
        };
        for f in [not_a_pod, unnamed] {
            assert!(Occurrence::of_event(&Event::CloneFailure(f)).is_none());
        }
    }

    /// What pods name reaches the note escaped: a process name with a colour escape and a
    /// BEL, a nested cgroup name that is a terminal link (OSC 8) with the line and paragraph
    /// separators, an interface name with an escape.
    #[test]
    fn notes_escape_what_pods_name() {
        use crate::signals::clone::CloneFailure;
        let link = "/kubepods/pod-u1/\x1b]8;;https://evil.example/\x07click\x1b]8;;\x07\u{2028}FAKE\u{2029}";
        let refused = CloneFailure {
            pod: named(),
            comm: "k\x1b[31m\x07\u{2028}".into(),
            pids_cgroup: Some(link.into()),
            ..CloneFailure::example(link)
        };
        let drop = insert_failed("insert_failed rose by 1; received on e\x1b[2Jth0\u{2029}");
        let t0 = Instant::now();
        let mut r = Recorder::new("node-a", t0);
        for event in [Event::CloneFailure(refused), Event::ConntrackDrop(drop)] {
            r.record(Occurrence::of_event(&event).expect("an occurrence"), t0);
        }
        let notes: Vec<String> = r
            .due(t0)
            .into_iter()
            .filter_map(|c| match c {
                Call::Create { event, .. } => event.note,
                Call::Patch { .. } => None,
            })
            .collect();
        assert_eq!(notes.len(), 2, "{notes:?}");
        for note in &notes {
            assert!(!note.chars().any(crate::text::needs_escape), "{note:?}");
        }
        let all = notes.concat();
        for escaped in [
            "to k\\x1b[31m\\x07\\u{2028} (pid 1)",
            "\\x1b]8;;https://evil.example/\\x07click\\x1b]8;;\\x07\\u{2028}FAKE\\u{2029}",
            "received on e\\x1b[2Jth0\\u{2029}",
        ] {
            assert!(all.contains(escaped), "{escaped} in {notes:#?}");
        }
    }

    #[test]
    fn repeats_create_one_event_then_patch_its_series() {
        let t0 = Instant::now();
        let mut r = Recorder::new("node-a", t0);
        r.record(occurrence("u1", "pids_limit"), t0);
        let calls = post_all(&mut r, t0);
        let [Call::Create { event, .. }] = calls.as_slice() else {
            panic!("{calls:?}");
        };
        let name = event.metadata.name.clone().expect("test");
        assert!(name.starts_with("web-u1."), "{name}");
        assert_eq!(event.series, None);
        assert_eq!(event.reason.as_deref(), Some("TaskCreationRefused"));
        assert_eq!(event.reporting_instance.as_deref(), Some("node-a"));
        for _ in 0..10 {
            r.record(occurrence("u1", "pids_limit"), t0);
        }
        // Within PATCH_EVERY: nothing yet.
        assert!(post_all(&mut r, t0 + Duration::from_secs(5)).is_empty());
        let calls = post_all(&mut r, t0 + PATCH_EVERY);
        let [
            Call::Patch {
                name: patched,
                series,
                ..
            },
        ] = calls.as_slice()
        else {
            panic!("{calls:?}");
        };
        assert_eq!(patched, &name);
        assert_eq!(series.count, 11);
        assert!(post_all(&mut r, t0 + PATCH_EVERY * 3).is_empty());
    }

    #[test]
    fn a_burst_stays_within_the_rates() {
        let t0 = Instant::now();
        let mut r = Recorder::new("n", t0);
        // One pod, many causes: its bucket allows POD_BURST calls.
        for i in 0..50 {
            r.record(occurrence("u1", &format!("cause{i}")), t0);
        }
        assert_eq!(post_all(&mut r, t0).len(), POD_BURST as usize);
        // Many pods: the node's bucket allows NODE_BURST, then NODE_PER_SECOND.
        let mut r = Recorder::new("n", t0);
        for i in 0..500 {
            r.record(occurrence(&format!("p{i}"), "pids_limit"), t0);
        }
        let mut calls = post_all(&mut r, t0).len();
        assert_eq!(calls, NODE_BURST as usize);
        for s in 1..=10 {
            calls += post_all(&mut r, t0 + Duration::from_secs(s)).len();
        }
        assert_eq!(calls, NODE_BURST as usize + 10 * NODE_PER_SECOND as usize);
    }

    #[test]
    fn keys_are_capped_and_what_is_forgotten_counted() {
        let t0 = Instant::now();
        let mut r = Recorder::new("n", t0);
        for i in 0..MAX_KEYS + 3 {
            r.record(
                occurrence(&format!("p{i}"), "c"),
                t0 + Duration::from_millis(i as u64),
            );
        }
        assert_eq!(r.entries.len(), MAX_KEYS);
        assert_eq!(r.evicted, 3);
    }

    #[test]
    fn a_failed_create_is_retried_and_a_gone_event_created_anew() {
        let t0 = Instant::now();
        let mut r = Recorder::new("n", t0);
        r.record(occurrence("u1", "c"), t0);
        let calls = r.due(t0);
        r.failed(&calls[0], false);
        let again = r.due(t0 + Duration::from_secs(1));
        assert!(
            matches!(again.as_slice(), [Call::Create { .. }]),
            "{again:?}"
        );
        r.posted(&again[0]);
        r.record(occurrence("u1", "c"), t0);
        let patch = r.due(t0 + PATCH_EVERY * 2);
        r.failed(&patch[0], true);
        r.record(occurrence("u1", "c"), t0);
        let create = r.due(t0 + PATCH_EVERY * 4);
        let [Call::Create { event, .. }] = create.as_slice() else {
            panic!("{create:?}");
        };
        assert_eq!(event.series.as_ref().map(|s| s.count), Some(3));
    }

    #[test]
    fn names_are_bounded_subdomains() {
        let long = "a".repeat(300);
        let name = event_name(&long, SystemTime::now(), 1);
        assert!(name.len() <= MAX_NAME, "{}", name.len());
        assert_eq!(
            event_name("web-1", SystemTime::UNIX_EPOCH, 255),
            "web-1.00000000000000ff"
        );
    }
}
