//! The recent past `explain` reasons about: the problems seen (failed task creations by
//! cause and cgroup, DNS per workload, conntrack drops by cause and workload, resolved
//! clashes per namespace), tallied in one-minute buckets for the last hour. Bounded: at most
//! MAX_TALLIES tallies in all; past that, events are counted as not kept, never stored.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    attribution::pods::PodRef,
    signals::{
        Event,
        clone::{CloneFailure, cause::Cause as CloneCause},
        conntrack::{Cause as DropCause, ClashesResolved, ConntrackDrop},
        dns::{DnsQuery, Outcome},
    },
};

/// The history kept.
pub const MAX_AGE: Duration = Duration::from_secs(3600);
/// Tallies in all buckets together (a tally is a few hundred bytes: ~2 MiB at most).
pub const MAX_TALLIES: usize = 4096;
/// Process names, servers and examples kept per tally.
const MAX_NAMES: usize = 5;
/// Where the names past MAX_NAMES are counted.
const OTHERS: &str = "(others)";

/// Whose a finding is, flat: the pod's names when it is a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Who {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// `namespace/pod/container`, a systemd unit, `node`, or a cgroup path.
    pub workload: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Process names (comm) involved, most frequent first.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub processes: Vec<String>,
}

impl Who {
    pub fn new(workload: &str, pod: Option<&PodRef>, cgroup: Option<&str>) -> Self {
        Who {
            namespace: pod.map(|p| p.shown_namespace().to_owned()),
            pod: pod.map(|p| p.shown_name().into_owned()),
            container: pod.and_then(|p| p.container.clone()),
            workload: workload.to_owned(),
            cgroup: cgroup.map(str::to_owned),
            processes: Vec::new(),
        }
    }
}

/// Names with counts, at most MAX_NAMES of them; the rest counted under "(others)". A short
/// list, not a map: a tally names one or two most often, and a map's first node alone takes
/// ~400 bytes (two per tally, thousands of tallies).
#[derive(Clone, Debug, Default)]
pub struct TopNames(Vec<(String, u64)>);

impl TopNames {
    fn add(&mut self, name: &str, n: u64) {
        if let Some(c) = self.count(name) {
            *c += n;
        } else if self.0.len() < MAX_NAMES {
            self.0.push((name.to_owned(), n));
        } else if let Some(c) = self.count(OTHERS) {
            *c += n;
        } else {
            self.0.push((OTHERS.to_owned(), n));
        }
    }

    fn count(&mut self, name: &str) -> Option<&mut u64> {
        self.0.iter_mut().find(|(k, _)| k == name).map(|(_, c)| c)
    }

    fn merge(&mut self, other: &TopNames) {
        for (k, v) in &other.0 {
            self.add(k, *v);
        }
    }

    /// Most frequent first.
    pub fn ranked(&self) -> Vec<(String, u64)> {
        let mut v = self.0.clone();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }
}

/// When something happened first and last, and how often.
#[derive(Clone, Copy, Debug, Default)]
pub struct Span {
    pub count: u64,
    /// Unix nanoseconds.
    pub first: u64,
    pub last: u64,
}

impl Span {
    fn add(&mut self, at: u64) {
        self.first = if self.count == 0 {
            at
        } else {
            self.first.min(at)
        };
        self.last = self.last.max(at);
        self.count += 1;
    }

    fn merge(&mut self, o: &Span) {
        if o.count == 0 {
            return;
        }
        self.first = if self.count == 0 {
            o.first
        } else {
            self.first.min(o.first)
        };
        self.last = self.last.max(o.last);
        self.count += o.count;
    }
}

/// Failed task creations of one cause in one cgroup.
#[derive(Clone, Debug)]
pub struct CloneTally {
    pub who: Who,
    pub span: Span,
    pub comms: TopNames,
    pub errnos: TopNames,
    /// The newest failure's evidence and pids cgroup.
    pub evidence: String,
    pub pids_cgroup: Option<String>,
    pub uid: u32,
}

/// DNS of one workload.
#[derive(Clone, Debug, Default)]
pub struct DnsTally {
    pub who: Who,
    pub span: Span,
    pub timeouts: u64,
    pub retransmits: u64,
    /// Re-sends 4 to 6 s after the unanswered send: the resolver's default 5 s timeout.
    pub retransmits_5s: u64,
    /// NXDOMAIN answers for search-path expansions of names later answered.
    pub search_misses: u64,
    /// Answers that came after such a chain.
    pub chained_lookups: u64,
    /// The name with the longest chain, and its length.
    pub chain_example: Option<(String, u32)>,
    /// Queries whose packet conntrack dropped.
    pub conntrack_dropped: u64,
    pub rcodes: TopNames,
    pub servers: TopNames,
}

/// Packets of one workload netfilter dropped, for one cause.
#[derive(Clone, Debug)]
pub struct DropTally {
    pub who: Who,
    pub span: Span,
    pub evidence: String,
    /// An example flow (`udp 10.0.0.2:4242 -> 10.96.0.10:53`).
    pub flow: String,
    pub dns_queries: u64,
}

/// Clashes the kernel resolved in one namespace.
#[derive(Clone, Debug)]
pub struct ClashTally {
    pub who: Who,
    /// The namespace's inode, where known.
    pub netns: Option<u64>,
    pub span: Span,
}

/// One minute's tallies (or several minutes' merged).
#[derive(Clone, Debug, Default)]
pub struct Bucket {
    minute: u64,
    pub clone: HashMap<(CloneCause, String), CloneTally>,
    pub dns: HashMap<String, DnsTally>,
    pub drops: HashMap<(DropCause, String), DropTally>,
    pub clashes: HashMap<crate::attribution::netns::NetnsKey, ClashTally>,
}

impl Bucket {
    fn len(&self) -> usize {
        self.clone.len() + self.dns.len() + self.drops.len() + self.clashes.len()
    }

    /// Adds `other`'s tallies to these.
    pub fn merge(&mut self, other: &Bucket) {
        for (k, t) in &other.clone {
            match self.clone.get_mut(k) {
                Some(mine) => {
                    if t.span.last >= mine.span.last {
                        mine.evidence.clone_from(&t.evidence);
                        mine.pids_cgroup.clone_from(&t.pids_cgroup);
                    }
                    mine.span.merge(&t.span);
                    mine.comms.merge(&t.comms);
                    mine.errnos.merge(&t.errnos);
                }
                None => {
                    self.clone.insert(k.clone(), t.clone());
                }
            }
        }
        for (k, t) in &other.dns {
            let mine = self.dns.entry(k.clone()).or_insert_with(|| DnsTally {
                who: t.who.clone(),
                ..DnsTally::default()
            });
            mine.span.merge(&t.span);
            mine.timeouts += t.timeouts;
            mine.retransmits += t.retransmits;
            mine.retransmits_5s += t.retransmits_5s;
            mine.search_misses += t.search_misses;
            mine.chained_lookups += t.chained_lookups;
            mine.conntrack_dropped += t.conntrack_dropped;
            if t.chain_example.as_ref().map(|c| c.1) > mine.chain_example.as_ref().map(|c| c.1) {
                mine.chain_example.clone_from(&t.chain_example);
            }
            mine.rcodes.merge(&t.rcodes);
            mine.servers.merge(&t.servers);
        }
        for (k, t) in &other.drops {
            match self.drops.get_mut(k) {
                Some(mine) => {
                    if t.span.last >= mine.span.last {
                        mine.evidence.clone_from(&t.evidence);
                        mine.flow.clone_from(&t.flow);
                    }
                    mine.span.merge(&t.span);
                    mine.dns_queries += t.dns_queries;
                }
                None => {
                    self.drops.insert(k.clone(), t.clone());
                }
            }
        }
        for (k, t) in &other.clashes {
            match self.clashes.get_mut(k) {
                Some(mine) => mine.span.merge(&t.span),
                None => {
                    self.clashes.insert(*k, t.clone());
                }
            }
        }
    }
}

/// The last hour, a bucket per minute.
#[derive(Default)]
pub struct History {
    buckets: VecDeque<Bucket>,
    /// Tallies in all buckets.
    tallies: usize,
    /// Events not kept: the history held MAX_TALLIES tallies.
    pub not_kept: u64,
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn now_nanos() -> u64 {
    unix_nanos(SystemTime::now())
}

impl History {
    /// The bucket of the minute of `at` (unix ns), if the history has room for the event:
    /// `is_new` says whether it needs a new tally there (the caller then adds it).
    fn bucket(&mut self, at: u64, is_new: impl Fn(&Bucket) -> bool) -> Option<&mut Bucket> {
        let minute = at / 60_000_000_000;
        // The event's own time ages the history (no clock read per event).
        let oldest = at.saturating_sub(MAX_AGE.as_nanos() as u64) / 60_000_000_000;
        while self.buckets.front().is_some_and(|b| b.minute < oldest) {
            if let Some(gone) = self.buckets.pop_front() {
                self.tallies = self.tallies.saturating_sub(gone.len());
            }
        }
        // Events arrive in order but for a little skew: a late one joins the newest bucket.
        if self.buckets.back().is_none_or(|b| b.minute < minute) {
            self.buckets.push_back(Bucket {
                minute,
                ..Bucket::default()
            });
        }
        let bucket = self.buckets.back_mut()?;
        if is_new(bucket) {
            if self.tallies >= MAX_TALLIES {
                self.not_kept += 1;
                return None;
            }
            self.tallies += 1;
        }
        Some(bucket)
    }

    /// Tallies one event (a headroom warning is no problem seen: not kept).
    pub fn event(&mut self, event: &Event) {
        match event {
            Event::CloneFailure(f) => self.clone_failure(f),
            Event::DnsQuery(q) => self.dns_query(q),
            Event::ConntrackDrop(d) => self.conntrack_drop(d),
            Event::ClashesResolved(c) => self.clashes_resolved(c),
            Event::HeadroomWarning(_) => {}
        }
    }

    fn clone_failure(&mut self, f: &CloneFailure) {
        let key = (f.cause, f.cgroup.clone());
        let Some(b) = self.bucket(f.time_unix_nano, |b| !b.clone.contains_key(&key)) else {
            return;
        };
        let t = b.clone.entry(key).or_insert_with(|| CloneTally {
            who: Who::new(&f.workload, f.pod.as_deref(), Some(&f.cgroup)),
            span: Span::default(),
            comms: TopNames::default(),
            errnos: TopNames::default(),
            evidence: String::new(),
            pids_cgroup: None,
            uid: f.uid,
        });
        t.span.add(f.time_unix_nano);
        t.comms.add(&f.comm, 1);
        t.errnos.add(&f.errno, 1);
        t.evidence.clone_from(&f.evidence);
        t.pids_cgroup.clone_from(&f.pids_cgroup);
        t.uid = f.uid;
    }

    fn dns_query(&mut self, q: &DnsQuery) {
        let Some(b) = self.bucket(q.start_unix_nano, |b| !b.dns.contains_key(&q.cgroup)) else {
            return;
        };
        // The common case, a workload already tallied this minute, allocates nothing.
        if !b.dns.contains_key(&q.cgroup) {
            b.dns.insert(
                q.cgroup.clone(),
                DnsTally {
                    who: Who::new(&q.workload, q.pod.as_deref(), Some(&q.cgroup)),
                    ..DnsTally::default()
                },
            );
        }
        let Some(t) = b.dns.get_mut(&q.cgroup) else {
            return;
        };
        t.span.add(q.start_unix_nano);
        if q.outcome == Outcome::Timeout {
            t.timeouts += 1;
        }
        if q.retransmit {
            t.retransmits += 1;
            if q.retransmit_gap_ms
                .is_some_and(|g| (4000.0..=6000.0).contains(&g))
            {
                t.retransmits_5s += 1;
            }
        }
        if q.search_nxdomain > 0 {
            t.search_misses += u64::from(q.search_nxdomain);
            t.chained_lookups += 1;
            if t.chain_example
                .as_ref()
                .is_none_or(|c| c.1 < q.search_nxdomain)
            {
                t.chain_example = Some((q.qname.clone(), q.search_nxdomain));
            }
        }
        if q.conntrack_drop.is_some() {
            t.conntrack_dropped += 1;
        }
        t.rcodes
            .add(&q.rcode.map_or("none".into(), |r| r.name()), 1);
        t.servers.add(&q.server, 1);
    }

    fn conntrack_drop(&mut self, d: &ConntrackDrop) {
        let key = (d.cause, d.workload.clone());
        let Some(b) = self.bucket(d.time_unix_nano, |b| !b.drops.contains_key(&key)) else {
            return;
        };
        let t = b.drops.entry(key).or_insert_with(|| DropTally {
            who: Who::new(&d.workload, d.pod.as_deref(), d.cgroup.as_deref()),
            span: Span::default(),
            evidence: String::new(),
            flow: String::new(),
            dns_queries: 0,
        });
        t.span.add(d.time_unix_nano);
        t.evidence.clone_from(&d.evidence);
        t.flow = format!("{} {}:{} -> {}:{}", d.proto, d.src, d.sport, d.dst, d.dport);
        if d.dns.is_some() {
            t.dns_queries += 1;
        }
    }

    fn clashes_resolved(&mut self, c: &ClashesResolved) {
        let at = now_nanos();
        let Some(b) = self.bucket(at, |b| !b.clashes.contains_key(&c.key)) else {
            return;
        };
        let t = b.clashes.entry(c.key).or_insert_with(|| ClashTally {
            who: Who::new(&c.workload, None, None),
            netns: c.netns,
            span: Span::default(),
        });
        t.span.merge(&Span {
            count: c.count,
            first: at,
            last: at,
        });
    }

    /// Every tally of the minutes that overlap the last `since`, merged.
    pub fn since(&self, since: Duration) -> Bucket {
        let from =
            now_nanos().saturating_sub(since.min(MAX_AGE).as_nanos() as u64) / 60_000_000_000;
        let mut merged = Bucket::default();
        for b in self.buckets.iter().filter(|b| b.minute >= from) {
            merged.merge(b);
        }
        merged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(cgroup: &str, comm: &str) -> CloneFailure {
        CloneFailure {
            time_unix_nano: now_nanos(),
            comm: comm.into(),
            ..CloneFailure::example(cgroup)
        }
    }

    #[test]
    fn failures_are_tallied_per_cause_and_cgroup() {
        let mut h = History::default();
        for i in 0..10 {
            h.clone_failure(&failure("/a", if i % 2 == 0 { "leaky" } else { "sh" }));
        }
        h.clone_failure(&failure("/b", "x"));
        let b = h.since(Duration::from_secs(900));
        let a = &b.clone[&(CloneCause::PidsLimit, "/a".to_owned())];
        assert_eq!(a.span.count, 10);
        assert_eq!(a.comms.ranked()[0].1, 5);
        assert_eq!(b.clone.len(), 2);
    }

    #[test]
    fn the_history_is_bounded() {
        let mut h = History::default();
        for i in 0..(MAX_TALLIES + 500) {
            h.clone_failure(&failure(&format!("/cg{i}"), &"y".repeat(i % 20)));
        }
        let b = h.since(MAX_AGE);
        assert_eq!(b.clone.len(), MAX_TALLIES);
        assert_eq!(h.not_kept, 500);
        // A known tally still counts.
        h.clone_failure(&failure("/cg0", "y"));
        assert_eq!(
            h.since(MAX_AGE).clone[&(CloneCause::PidsLimit, "/cg0".to_owned())]
                .span
                .count,
            2
        );
    }

    #[test]
    fn names_are_capped() {
        let mut n = TopNames::default();
        for i in 0..100 {
            n.add(&format!("p{i}"), 1);
        }
        let ranked = n.ranked();
        assert_eq!(ranked.len(), MAX_NAMES + 1);
        assert_eq!(ranked[0], ("(others)".to_owned(), 95));
    }
}
