//! The event budget of the daemon's event lines and OTLP records, the way the kubelet
//! aggregates its events: per workload, kind and cause, the first events of each interval in
//! full, then one summary per interval with the count, the first and last time and the latest
//! evidence; a node-wide ceiling on full lines per second (the first event of a workload's
//! kind and cause in an interval always goes out, so a storm in one pod cannot hide another
//! pod's single failure); events the kernel could not deliver said per interval too. Every
//! suppressed event is counted (`faultline_event_lines_suppressed_total{kind}`); metrics and
//! `/explain` see every event whatever the budget says.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{attribution::pods::PodRef, cli::EventKind, clock::now_rfc3339, signals::Event};

/// Workload, kind and cause sets followed per interval; past it, new ones share one summary
/// (`workload` `(others)`) and their first events are not let through: a pod making cgroups
/// by the thousand costs a summary, not a line each.
const MAX_KEYS: usize = 256;
const OTHERS: &str = "(others)";

/// How many event lines the daemon may write.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BudgetConfig {
    /// Full lines per workload, kind and cause in each interval.
    pub per_workload: u32,
    /// The interval; a summary of what was suppressed ends each.
    pub interval: Duration,
    /// Full lines per second, node-wide, past each workload's first (a burst of ten
    /// seconds' worth).
    pub per_second: f64,
}

/// Whether an event becomes a line (and an OTLP record).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Full,
    Suppressed,
}

/// What the budget says instead of the suppressed events of one workload, kind and cause
/// in one interval.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EventSummary {
    /// `clone_failure`, `dns`, `conntrack_drop`, `conntrack_clash_resolved`.
    pub event: &'static str,
    /// The workload, or `(others)` past the sets followed.
    pub workload: String,
    pub pod: Option<Arc<PodRef>>,
    /// The cause (`pids_limit`, `insert_failed`, a DNS outcome); empty when none.
    pub cause: &'static str,
    /// Events of this interval not written as lines.
    pub count: u64,
    /// The first and last of them (RFC 3339).
    pub first: String,
    pub last: String,
    /// The latest one's evidence.
    pub evidence: String,
    pub interval_s: f64,
}

/// Events the kernel saw but could not deliver (its ring or faultline's queue was full) in
/// one interval: counted, never attributed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EventsLost {
    pub event: &'static str,
    pub count: u64,
    /// When the interval ended (RFC 3339).
    pub time: String,
}

/// One line the budget writes itself.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BudgetLine {
    EventSummary(Box<EventSummary>),
    EventsLost(EventsLost),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    event: &'static str,
    workload: String,
    cause: &'static str,
}

struct Tally {
    full: u32,
    suppressed: u64,
    first: String,
    last: String,
    evidence: String,
    pod: Option<Arc<PodRef>>,
}

pub struct Budget {
    config: BudgetConfig,
    started: Instant,
    keys: HashMap<Key, Tally>,
    tokens: f64,
    refilled: Instant,
    /// The kernel's cumulative lost count per event kind, at the last interval's end.
    lost_seen: HashMap<EventKind, u64>,
    lost_now: HashMap<EventKind, u64>,
}

impl Budget {
    pub fn new(config: BudgetConfig, now: Instant) -> Self {
        Budget {
            config,
            started: now,
            keys: HashMap::new(),
            tokens: burst(&config),
            refilled: now,
            lost_seen: HashMap::new(),
            lost_now: HashMap::new(),
        }
    }

    /// Whether `event` is written in full; a suppressed one is tallied for the summary.
    pub fn admit(&mut self, event: &Event, now: Instant) -> Verdict {
        self.refill(now);
        let facts = Facts::of(event);
        let mut key = Key {
            event: event.name(),
            workload: facts.workload.to_owned(),
            cause: facts.cause,
        };
        if !self.keys.contains_key(&key) && self.keys.len() >= MAX_KEYS {
            key.workload = OTHERS.to_owned();
        }
        let others = key.workload == OTHERS;
        let tally = self.keys.entry(key).or_insert_with(|| Tally {
            full: 0,
            suppressed: 0,
            first: String::new(),
            last: String::new(),
            evidence: String::new(),
            pod: None,
        });
        // A workload's first event of the interval always goes out (bounded by MAX_KEYS);
        // its next ones while the node's ceiling allows.
        let full = !others
            && tally.full < self.config.per_workload
            && (tally.full == 0 || self.tokens >= 1.0);
        if full {
            if tally.full > 0 {
                self.tokens -= 1.0;
            }
            tally.full += 1;
            return Verdict::Full;
        }
        if tally.suppressed == 0 {
            tally.first = facts.time.to_owned();
        }
        tally.suppressed += 1;
        tally.last = facts.time.to_owned();
        tally.evidence = facts.evidence;
        tally.pod = facts.pod.cloned();
        Verdict::Suppressed
    }

    /// The kernel's cumulative count of events of this kind it could not deliver.
    pub fn lost(&mut self, kind: EventKind, total: u64) {
        self.lost_now.insert(kind, total);
    }

    /// At the end of each interval: its summaries and losses (nothing before the end).
    pub fn due(&mut self, now: Instant) -> Vec<BudgetLine> {
        if now.duration_since(self.started) < self.config.interval {
            return Vec::new();
        }
        self.started = now;
        self.take()
    }

    /// Everything tallied so far (at a stop).
    pub fn finish(&mut self) -> Vec<BudgetLine> {
        self.take()
    }

    fn take(&mut self) -> Vec<BudgetLine> {
        let interval_s = self.config.interval.as_secs_f64();
        let mut lines: Vec<BudgetLine> = self
            .keys
            .drain()
            .filter(|(_, t)| t.suppressed > 0)
            .map(|(k, t)| {
                BudgetLine::EventSummary(Box::new(EventSummary {
                    event: k.event,
                    workload: k.workload,
                    pod: t.pod,
                    cause: k.cause,
                    count: t.suppressed,
                    first: t.first,
                    last: t.last,
                    evidence: t.evidence,
                    interval_s,
                }))
            })
            .collect();
        // Busiest first: the summary a reader needs most is on top.
        lines.sort_by_key(|l| match l {
            BudgetLine::EventSummary(s) => std::cmp::Reverse(s.count),
            BudgetLine::EventsLost(_) => std::cmp::Reverse(0),
        });
        let mut lost: Vec<_> = self.lost_now.iter().map(|(k, v)| (*k, *v)).collect();
        lost.sort_by_key(|(kind, _)| kind.as_str());
        for (kind, total) in lost {
            let seen = self.lost_seen.insert(kind, total).unwrap_or(0);
            if total > seen {
                lines.push(BudgetLine::EventsLost(EventsLost {
                    event: lost_event(kind),
                    count: total - seen,
                    time: now_rfc3339(),
                }));
            }
        }
        lines
    }

    fn refill(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + secs * self.config.per_second).min(burst(&self.config));
    }
}

/// The event a kind's losses are of, as the lines name it (a lost record is a clone failure,
/// a DNS query or a conntrack drop; near-misses are polled, never lost).
fn lost_event(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Clone => "clone_failure",
        EventKind::Dns => "dns",
        EventKind::Conntrack => "conntrack_drop",
    }
}

/// Ten seconds' worth of the node's rate, at least one line.
fn burst(config: &BudgetConfig) -> f64 {
    (config.per_second * 10.0).max(1.0)
}

/// What the budget keys (with `Event::name`) and summarizes an event by.
struct Facts<'a> {
    workload: &'a str,
    cause: &'static str,
    time: &'a str,
    evidence: String,
    pod: Option<&'a Arc<PodRef>>,
}

impl<'a> Facts<'a> {
    fn of(event: &'a Event) -> Facts<'a> {
        match event {
            Event::CloneFailure(f) => Facts {
                workload: &f.workload,
                cause: f.cause.as_str(),
                time: &f.time,
                evidence: f.evidence.clone(),
                pod: f.pod.as_ref(),
            },
            Event::DnsQuery(q) => Facts {
                workload: &q.workload,
                cause: q.outcome.as_str(),
                time: &q.time,
                evidence: format!("{} {} -> {}", q.qtype, q.qname, q.server),
                pod: q.pod.as_ref(),
            },
            Event::ConntrackDrop(d) => Facts {
                workload: &d.workload,
                cause: d.cause.as_str(),
                time: &d.time,
                evidence: d.evidence.clone(),
                pod: d.pod.as_ref(),
            },
            Event::ClashesResolved(c) => Facts {
                workload: &c.workload,
                cause: "",
                time: &c.time,
                evidence: format!(
                    "netns={} count={}",
                    crate::signals::conntrack::netns_text(c.netns),
                    c.count
                ),
                pod: None,
            },
            Event::HeadroomWarning(w) => Facts {
                workload: &w.workload,
                cause: "",
                time: &w.time,
                evidence: format!("pids.current={} pids.max={}", w.pids_current, w.pids_max),
                pod: w.pod.as_ref(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signals::clone::CloneFailure;

    fn failure(workload: &str, at: &str) -> Event {
        Event::CloneFailure(CloneFailure {
            time: at.to_owned(),
            workload: workload.to_owned(),
            evidence: format!("evidence at {at}"),
            ..CloneFailure::example("/test")
        })
    }

    fn config() -> BudgetConfig {
        BudgetConfig {
            per_workload: 5,
            interval: Duration::from_secs(60),
            per_second: 2.0,
        }
    }

    #[test]
    fn a_storm_is_five_lines_and_a_summary_that_adds_up() {
        let t = Instant::now();
        let mut b = Budget::new(config(), t);
        let mut full = 0;
        for i in 0..10_000u64 {
            let at = format!("t{i}");
            if b.admit(&failure("shop/api", &at), t + Duration::from_millis(i)) == Verdict::Full {
                full += 1;
            }
        }
        assert_eq!(full, 5);
        // Another workload's one failure during the storm: a line at once.
        assert_eq!(
            b.admit(&failure("shop/web", "w"), t + Duration::from_secs(10)),
            Verdict::Full
        );
        b.lost(EventKind::Clone, 7);
        assert!(b.due(t + Duration::from_secs(30)).is_empty());
        let lines = b.due(t + Duration::from_secs(61));
        let [BudgetLine::EventSummary(s), BudgetLine::EventsLost(l)] = lines.as_slice() else {
            panic!("{lines:?}");
        };
        assert_eq!((s.workload.as_str(), s.count), ("shop/api", 9_995));
        assert_eq!((s.first.as_str(), s.last.as_str()), ("t5", "t9999"));
        assert_eq!(s.evidence, "evidence at t9999");
        assert_eq!(l.count, 7);
        // A new interval: the first lines in full again; losses said once.
        assert_eq!(
            b.admit(&failure("shop/api", "n"), t + Duration::from_secs(62)),
            Verdict::Full
        );
        b.lost(EventKind::Clone, 7);
        assert!(b.finish().is_empty());
    }

    #[test]
    fn the_node_ceiling_holds_many_workloads_to_their_first_lines() {
        let t = Instant::now();
        let mut b = Budget::new(config(), t);
        let mut full = 0;
        for round in 0..5 {
            for w in 0..100 {
                let e = failure(&format!("w{w}"), &format!("{round}"));
                full += u32::from(b.admit(&e, t) == Verdict::Full);
            }
        }
        // 100 first lines, then the burst of 20 shared by the rest.
        assert_eq!(full, 120);
    }

    #[test]
    fn keys_past_the_cap_share_one_summary() {
        let t = Instant::now();
        let mut b = Budget::new(config(), t);
        for w in 0..MAX_KEYS + 50 {
            b.admit(&failure(&format!("w{w}"), "x"), t);
        }
        let lines = b.finish();
        assert_eq!(lines.len(), 1, "{lines:?}");
        let BudgetLine::EventSummary(s) = &lines[0] else {
            panic!("{lines:?}")
        };
        assert_eq!((s.workload.as_str(), s.count), (OTHERS, 50));
    }
}
