//! What every sink receives on each tick: the node's state, read from the kernel and /proc
//! and attributed once by the pipeline (the task rows, the node's counts, the conntrack
//! tables, each program's counters, the times to exhaustion), so that no sink reads or
//! recomputes it. Each attached signal adds its [`Part`]; the consumers that read every
//! signal (the daemon, `trace`, [`Refresh::lost`]) match the parts exhaustively.

use probe_common::{clone::CloneStats, conntrack::ConntrackStats, dns::DnsStats, tasks::TaskStats};
use std::sync::Arc;

use crate::{
    attribution::pods::PodRef,
    cli::EventKind,
    signals::{
        clone::node::NodeTasks,
        conntrack::{CtTable, ctstats::CtCounters},
        refusals::Refusals,
        tasks::{
            CgroupRow,
            binding::{self, LimitUse},
            users::UidTasks,
        },
    },
    trend::{Estimate, Limit, Reading},
};

#[derive(Clone, Debug, Default)]
pub struct Refresh {
    /// The node's thread count and task limits.
    pub node: NodeTasks,
    /// One per attached signal, in attach order.
    pub parts: Vec<Part>,
    /// cgroup naming events that did not reach userspace (none: cgroups named by walk).
    pub cgroup_events_lost: Option<u64>,
    /// Failed requests to the Kubernetes API since the start (none: no API in use).
    pub kube_api_errors: Option<u64>,
    /// The kernel's own refusal counts per cgroup (read every few seconds, not every tick)
    /// and the increases no event explained.
    pub refusals: Refusals,
    /// Every watched limit's use, growth and time left (empty unless the command asked for a
    /// trend window).
    pub estimates: Vec<Estimate>,
}

/// One signal's part of a refresh: its counters, read from its maps.
#[derive(Clone, Debug)]
pub enum Part {
    Clone(CloneStats),
    Tasks(TaskRefresh),
    Dns(DnsRefresh),
    Conntrack(ConntrackRefresh),
}

/// The task counters per cgroup.
#[derive(Clone, Debug, Default)]
pub struct TaskRefresh {
    /// One row per counted cgroup that still exists, attributed.
    pub rows: Vec<CgroupRow>,
    /// cgroups with counters (kernel map entries).
    pub tracked: usize,
    pub stats: TaskStats,
    /// Each non-root uid's tasks and tightest RLIMIT_NPROC (bounded: `users::MAX_UIDS`).
    pub users: Vec<UidTasks>,
    /// Processes of counted cgroups not read for their uids (`users::PROCS_PER_CGROUP`).
    pub processes_unread: u64,
}

/// The DNS programs' counters.
#[derive(Clone, Debug, Default)]
pub struct DnsRefresh {
    /// `lost` counts the reader's queue drops too, `malformed` userspace's parse failures.
    pub stats: DnsStats,
    /// DNS over TCP, counted (not parsed) per cgroup.
    pub tcp: Vec<DnsTcp>,
}

/// DNS-over-TCP segments of one cgroup.
#[derive(Clone, Debug)]
pub struct DnsTcp {
    pub cgroup_id: u64,
    pub cgroup: Option<String>,
    pub workload: String,
    pub pod: Option<Arc<PodRef>>,
    pub to_server: u64,
    pub from_server: u64,
}

/// The conntrack program's counters and the tables at the last poll.
#[derive(Clone, Debug, Default)]
pub struct ConntrackRefresh {
    /// `lost` counts the reader's queue drops too.
    pub stats: ConntrackStats,
    /// The node's own namespace's counters, when readable.
    pub node: Option<CtCounters>,
    pub tables: Vec<CtTable>,
}

impl Refresh {
    /// Events each signal's programs could not deliver since they were attached (ring or
    /// queue full), by the kind of event lost.
    pub fn lost(&self) -> Vec<(EventKind, u64)> {
        self.parts
            .iter()
            .filter_map(|part| match part {
                Part::Clone(clone) => Some((EventKind::Clone, clone.lost)),
                Part::Dns(dns) => Some((EventKind::Dns, dns.stats.lost)),
                Part::Conntrack(conntrack) => Some((EventKind::Conntrack, conntrack.stats.lost)),
                // Its programs only count: nothing to lose.
                Part::Tasks(_) => None,
            })
            .collect()
    }

    /// The clone programs' counters (zero when the signal is not attached).
    pub fn clone_stats(&self) -> CloneStats {
        self.parts
            .iter()
            .find_map(|part| match part {
                Part::Clone(stats) => Some(*stats),
                Part::Tasks(_) | Part::Dns(_) | Part::Conntrack(_) => None,
            })
            .unwrap_or_default()
    }

    pub fn tasks(&self) -> Option<&TaskRefresh> {
        self.parts.iter().find_map(|part| match part {
            Part::Tasks(tasks) => Some(tasks),
            Part::Clone(_) | Part::Dns(_) | Part::Conntrack(_) => None,
        })
    }

    fn tasks_mut(&mut self) -> Option<&mut TaskRefresh> {
        self.parts.iter_mut().find_map(|part| match part {
            Part::Tasks(tasks) => Some(tasks),
            Part::Clone(_) | Part::Dns(_) | Part::Conntrack(_) => None,
        })
    }

    pub fn rows(&self) -> &[CgroupRow] {
        self.tasks().map_or(&[], |t| t.rows.as_slice())
    }

    pub fn conntrack_tables(&self) -> &[CtTable] {
        let conntrack = self.parts.iter().find_map(|part| match part {
            Part::Conntrack(conntrack) => Some(conntrack),
            Part::Clone(_) | Part::Tasks(_) | Part::Dns(_) => None,
        });
        conntrack.map_or(&[], |c| c.tables.as_slice())
    }

    /// Every limit that can refuse `row`'s next task, in the kernel's order, with its ETA.
    pub fn limits(&self, row: &CgroupRow) -> Vec<LimitUse> {
        binding::limits(row, self.node, &self.estimates)
    }

    /// A limit's estimate, by limit and resource (a pids cgroup's path, `node`).
    pub fn estimate(&self, limit: Limit, resource: &str) -> Option<&Estimate> {
        self.estimates
            .iter()
            .find(|e| e.limit == limit && e.resource == resource)
    }

    /// Takes limits' use sampled since the refresh: each pids limit's in the rows under it,
    /// the node's task count.
    pub fn sample(&mut self, samples: &[crate::trend::Sample]) {
        for s in samples {
            match s.limit {
                Limit::Pids => {
                    let rows = self.tasks_mut().into_iter().flat_map(|t| t.rows.iter_mut());
                    for l in rows.filter_map(|r| r.pids_limit.as_mut()) {
                        if l.cgroup == s.resource {
                            let (left, pct) = crate::signals::tasks::headroom(s.max, s.current);
                            (l.current, l.max, l.headroom, l.headroom_pct) =
                                (s.current, s.max, left, pct);
                        }
                    }
                }
                Limit::PidMax | Limit::ThreadsMax => self.node.threads = s.current,
                Limit::RlimitNproc => {
                    if let Some(t) = self.tasks_mut() {
                        for u in &mut t.users {
                            if binding::uid_resource(u.uid) == s.resource {
                                u.tasks = s.current;
                            }
                        }
                        for n in t.rows.iter_mut().filter_map(|r| r.nproc.as_mut()) {
                            if binding::uid_resource(n.uid) == s.resource {
                                n.current = s.current;
                                n.headroom = n.max as i64 - s.current as i64;
                            }
                        }
                    }
                }
                Limit::Conntrack => {}
            }
        }
    }

    /// The readings a trend takes: each pids limit once (the cgroups under one limit share
    /// it), the node's two task limits, each namespace's conntrack table.
    pub fn readings(&self) -> Vec<Reading> {
        let mut out: Vec<Reading> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for row in self.rows() {
            let Some(l) = &row.pids_limit else { continue };
            if seen.insert(l.cgroup.as_str()) {
                out.push(Reading {
                    limit: Limit::Pids,
                    resource: l.cgroup.clone(),
                    workload: row.workload.clone(),
                    pod: row.pod.clone(),
                    current: l.current,
                    max: l.max,
                    shared_by: Vec::new(),
                });
            }
        }
        for u in self.tasks().into_iter().flat_map(|t| &t.users) {
            let shared_by: Vec<String> = self
                .rows()
                .iter()
                .filter(|r| u.cgroups.contains(&r.cgroup))
                .map(|r| r.workload.clone())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            out.push(Reading {
                limit: Limit::RlimitNproc,
                resource: binding::uid_resource(u.uid),
                workload: binding::uid_resource(u.uid),
                pod: None,
                current: u.tasks,
                max: u.max,
                shared_by,
            });
        }
        let n = self.node;
        for (limit, max) in [
            (Limit::PidMax, n.pid_max),
            (Limit::ThreadsMax, n.threads_max),
        ] {
            out.push(Reading {
                limit,
                resource: "node".into(),
                workload: "node".into(),
                pod: None,
                current: n.threads,
                max,
                shared_by: Vec::new(),
            });
        }
        for t in self.conntrack_tables().iter().filter(|t| t.max > 0) {
            out.push(Reading {
                limit: Limit::Conntrack,
                resource: t.resource(),
                workload: t.workload.clone(),
                pod: None,
                current: t.entries,
                max: t.max,
                shared_by: Vec::new(),
            });
        }
        out
    }
}
