//! Diagnosis: from what the pipeline saw to "which pod, which limit, how long until it
//! breaks, and what to change". [`trend`] estimates each limit's time to exhaustion,
//! [`history`] keeps the last hour's problems, bounded, and [`findings`] turns both into a
//! ranked [`findings::Report`]. A [`Recorder`] holds the three; the daemon keeps one for its
//! whole life (served on `/explain`), `faultline explain` fills one in a short observation
//! when no daemon answers.

pub mod findings;
pub mod history;
pub mod trend;

use std::time::{Duration, Instant};

use crate::{
    clock::now_rfc3339,
    signals::{
        clone::CloneFailure,
        conntrack::{ClashesResolved, ConntrackDrop, CtTable},
        dns::DnsQuery,
        clone::node::NodeTasks,
        tasks::CgroupRow,
    },
};
use findings::Report;
use history::History;
use trend::{Estimate, LimitWatch};

/// Workloads named as the node's top task holders.
const HOLDERS: usize = 5;

pub struct Recorder {
    node: String,
    started: Instant,
    history: History,
    limits: LimitWatch,
    /// (workload, live tasks), most first, at the last refresh.
    holders: Vec<(String, u64)>,
}

impl Recorder {
    /// `window`: the span each limit's growth is measured over.
    pub fn new(node: &str, window: Duration) -> Self {
        Recorder {
            node: node.to_owned(),
            started: Instant::now(),
            history: History::default(),
            limits: LimitWatch::new(window),
            holders: Vec::new(),
        }
    }

    pub fn clone_failure(&mut self, f: &CloneFailure) {
        self.history.clone_failure(f);
    }

    pub fn dns_query(&mut self, q: &DnsQuery) {
        self.history.dns_query(q);
    }

    pub fn conntrack_drop(&mut self, d: &ConntrackDrop) {
        self.history.conntrack_drop(d);
    }

    pub fn clashes_resolved(&mut self, c: &ClashesResolved) {
        self.history.clashes_resolved(c);
    }

    /// One refresh: the limits' use now, and who holds the node's tasks.
    pub fn refresh(&mut self, rows: &[CgroupRow], node: Option<NodeTasks>, tables: &[CtTable]) {
        self.limits
            .update(Instant::now(), trend::readings(rows, node, tables));
        let mut by_workload: std::collections::HashMap<&str, u64> = Default::default();
        for r in rows {
            *by_workload.entry(r.workload.as_str()).or_default() += r.live.unwrap_or(0);
        }
        let mut holders: Vec<(String, u64)> = by_workload
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(w, n)| (w.to_owned(), n))
            .collect();
        holders.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        holders.truncate(HOLDERS);
        self.holders = holders;
    }

    pub fn estimates(&self) -> Vec<Estimate> {
        self.limits.estimates()
    }

    /// The findings of the last `since` (at most the history's hour, and the time since the
    /// recorder started).
    pub fn report(&self, since: Duration, source: &str) -> Report {
        let window = since.min(history::MAX_AGE).min(self.started.elapsed());
        let bucket = self.history.since(window);
        let limits = self.limits.estimates();
        Report {
            kind: "explain".to_owned(),
            version: findings::VERSION,
            node: self.node.clone(),
            time: now_rfc3339(),
            source: source.to_owned(),
            window_s: window.as_secs_f64(),
            findings: findings::findings(&bucket, window, &limits, &self.holders),
            not_kept: self.history.not_kept,
            notes: Vec::new(),
        }
    }
}
