//! Diagnosis: from what the pipeline saw to "which pod, which limit, how long until it
//! breaks, and what to change". [`history`] keeps the last hour's problems, bounded, and
//! [`findings`] turns them and each limit's time to exhaustion (the refreshes' estimates,
//! from `trend`) into a ranked [`findings::Report`]. A [`Recorder`] holds them; the daemon keeps one for its
//! whole life (served on `/explain`), `faultline explain` fills one in a short observation
//! when no daemon answers. [`past`] keeps the kernel's refusal counts at its start: the
//! findings of before anyone watched, reported apart.

pub mod findings;
pub mod history;
pub mod past;

use std::time::{Duration, Instant, SystemTime};

use crate::{
    clock::now_rfc3339,
    signals::{Event, Refresh},
    trend::Estimate,
};
use findings::Report;
use history::History;
use past::Past;

/// Workloads named as the node's top task holders.
const HOLDERS: usize = 5;

pub struct Recorder {
    node: String,
    started: Instant,
    /// The wall-clock time of the start, for the cgroups' ages.
    started_at: SystemTime,
    history: History,
    /// The kernel's refusal counts at the first refresh, and since.
    past: Option<Past>,
    /// Every limit's estimate at the last refresh.
    limits: Vec<Estimate>,
    /// (workload, live tasks), most first, at the last refresh.
    holders: Vec<(String, u64)>,
    /// Processes of counted cgroups the RLIMIT_NPROC census did not read, at the last refresh.
    nproc_unread: u64,
}

impl Recorder {
    pub fn new(node: &str) -> Self {
        Recorder {
            node: node.to_owned(),
            started: Instant::now(),
            started_at: SystemTime::now(),
            history: History::default(),
            past: None,
            limits: Vec::new(),
            holders: Vec::new(),
            nproc_unread: 0,
        }
    }

    pub fn event(&mut self, event: &Event) {
        self.history.event(event);
    }

    /// One refresh: the limits' estimates, and who holds the node's tasks.
    pub fn refresh(&mut self, refresh: &Refresh) {
        self.limits(&refresh.estimates);
        self.nproc_unread = refresh.tasks().map_or(0, |t| t.processes_unread);
        match self.past.as_mut() {
            Some(past) => past.update(&refresh.refusals, refresh.conntrack_tables()),
            None => self.past = Some(Past::new(&refresh.refusals, refresh.conntrack_tables())),
        }
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

    /// The limits' estimates (at each refresh, and as hot limits are sampled between).
    pub fn limits(&mut self, estimates: &[Estimate]) {
        self.limits = estimates.to_vec();
    }

    /// The findings of the last `since` (at most the history's hour, and the time since the
    /// recorder started).
    pub fn report(&self, since: Duration, source: findings::ReportSource) -> Report {
        let window = since.min(history::MAX_AGE).min(self.started.elapsed());
        let bucket = self.history.since(window);
        Report {
            kind: "explain".to_owned(),
            version: findings::VERSION,
            node: self.node.clone(),
            time: now_rfc3339(),
            source,
            window_s: window.as_secs_f64(),
            findings: findings::findings(&bucket, window, &self.limits, &self.holders),
            not_kept: self.history.not_kept,
            notes: self.past_notes(),
            past: self
                .past
                .as_ref()
                .map(|p| findings::past_findings(p, self.started_at))
                .unwrap_or_default(),
        }
    }

    /// What the past's findings leave out.
    fn past_notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if let Some(p) = &self.past {
            if p.left_out > 0 {
                notes.push(format!(
                    "{} more cgroups and network namespaces had refusals before faultline watched (only the {} with the most are reported)",
                    p.left_out,
                    past::MAX_PAST
                ));
            }
            if p.truncated {
                notes.push(format!(
                    "the kernel's refusal counts were read in the first {} cgroups only",
                    crate::signals::refusals::MAX_CGROUPS
                ));
            }
        }
        if self.nproc_unread > 0 {
            notes.push(format!(
                "{} processes of busy cgroups were not read for their uid and RLIMIT_NPROC (the first {} of each are): a uid running only there has no RLIMIT_NPROC finding",
                self.nproc_unread,
                crate::signals::tasks::users::PROCS_PER_CGROUP
            ));
        }
        notes
    }
}
