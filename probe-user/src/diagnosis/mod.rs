//! Diagnosis: from what the pipeline saw to "which pod, which limit, how long until it
//! breaks, and what to change". [`history`] keeps the last hour's problems, bounded, and
//! [`findings`] turns them and each limit's time to exhaustion (the refreshes' estimates,
//! from `trend`) into a ranked [`findings::Report`]. A [`Recorder`] holds them; the daemon keeps one for its
//! whole life (served on `/explain`), `faultline explain` fills one in a short observation
//! when no daemon answers.

pub mod findings;
pub mod history;

use std::time::{Duration, Instant};

use crate::{
    clock::now_rfc3339,
    signals::{Event, Refresh},
    trend::Estimate,
};
use findings::Report;
use history::History;

/// Workloads named as the node's top task holders.
const HOLDERS: usize = 5;

pub struct Recorder {
    node: String,
    started: Instant,
    history: History,
    /// Every limit's estimate at the last refresh.
    limits: Vec<Estimate>,
    /// (workload, live tasks), most first, at the last refresh.
    holders: Vec<(String, u64)>,
}

impl Recorder {
    pub fn new(node: &str) -> Self {
        Recorder {
            node: node.to_owned(),
            started: Instant::now(),
            history: History::default(),
            limits: Vec::new(),
            holders: Vec::new(),
        }
    }

    pub fn event(&mut self, event: &Event) {
        self.history.event(event);
    }

    /// One refresh: the limits' estimates, and who holds the node's tasks.
    pub fn refresh(&mut self, refresh: &Refresh) {
        self.limits.clone_from(&refresh.estimates);
        let mut by_workload: std::collections::HashMap<&str, u64> = Default::default();
        for r in refresh.rows() {
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

    /// The findings of the last `since` (at most the history's hour, and the time since the
    /// recorder started).
    pub fn report(&self, since: Duration, source: &str) -> Report {
        let window = since.min(history::MAX_AGE).min(self.started.elapsed());
        let bucket = self.history.since(window);
        Report {
            kind: "explain".to_owned(),
            version: findings::VERSION,
            node: self.node.clone(),
            time: now_rfc3339(),
            source: source.to_owned(),
            window_s: window.as_secs_f64(),
            findings: findings::findings(&bucket, window, &self.limits, &self.holders),
            not_kept: self.history.not_kept,
            notes: Vec::new(),
        }
    }
}
