//! Task creation: the kernel's per-cgroup counters become a model with
//! creation rates, live task counts and the headroom left to the pids limit that applies.
//!
//! The model holds exactly the cgroups the kernel map holds (the kernel drops a removed
//! cgroup's counters), so it cannot grow under cgroup churn.

pub mod binding;
pub mod users;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use probe_common::tasks::{self as common, TaskCounts};
use serde::Serialize;

use crate::{
    attribution::cgroups::{CgroupPath, Hierarchy},
    attribution::pods::{Attributor, PodRef},
    clock::now_rfc3339,
    kernel::loader::{Attachment, Probes, raw},
    signals::{TaskRefresh, clone::node::NodeTasks},
    trend::{Estimate, Limit},
};

/// Task creation and exit counters per cgroup.
pub const PROGRAMS: [Attachment; 3] = [
    raw("task_newtask", "task_newtask"),
    raw("task_exit", "sched_process_exit"),
    raw("task_cgroup_rmdir", "cgroup_rmdir"),
];

/// Each non-root uid's task count as the kernel keeps it (`TASK_UIDS`).
fn uid_counts(probes: &Probes) -> anyhow::Result<HashMap<u32, i64>> {
    Ok(probes
        .hash_entries::<u32, common::UidTasks>(common::UIDS)?
        .into_iter()
        .map(|(uid, u)| (uid, u.tasks))
        .collect())
}

/// Every cgroup's task counters (cgroup v2 id, counts summed over CPUs).
fn counts(probes: &Probes) -> anyhow::Result<Vec<(u64, TaskCounts)>> {
    probes.per_cpu_hash(common::COUNTS, |a: TaskCounts, c: &TaskCounts| TaskCounts {
        threads: a.threads + c.threads,
        processes: a.processes + c.processes,
        exited: a.exited + c.exited,
    })
}

/// The tasks signal's part of a refresh: the kernel's counts into `model`, and a row per
/// counted cgroup (and, with `idle_cgroups`, each cgroup holding tasks) with its live count,
/// limits and its uids' RLIMIT_NPROC.
pub fn refresh(
    model: &mut TaskModel,
    probes: &Probes,
    attributor: &mut Attributor,
    idle_cgroups: bool,
) -> anyhow::Result<TaskRefresh> {
    model.update(Instant::now(), counts(probes)?);
    if idle_cgroups && let Some(root) = attributor.cgroups.mount(Hierarchy::Unified) {
        model.include_idle(occupied_cgroups(&root.path));
    }
    let mut rows = model.rows(attributor);
    let kernel = uid_counts(probes)?;
    let census = attributor
        .cgroups
        .mount(Hierarchy::Unified)
        .map(|root| {
            let cgroups = rows.iter().map(|r| r.cgroup.as_str());
            users::UserCensus::read(&root.path, cgroups, &kernel)
        })
        .unwrap_or_default();
    for row in &mut rows {
        row.nproc = census.limit(&row.cgroup);
    }
    Ok(TaskRefresh {
        rows,
        tracked: model.len(),
        stats: probes.stats::<common::TaskStats>()?,
        users: census.uids.into_values().collect(),
        processes_unread: census.unread,
    })
}

/// Rates are averaged over this window.
pub const RATE_WINDOW: Duration = Duration::from_secs(5);
/// Samples kept per cgroup: enough to span the window at the fastest refresh.
const MAX_SAMPLES: usize = 64;

#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    threads: u64,
    processes: u64,
}

struct Entry {
    counts: TaskCounts,
    samples: VecDeque<Sample>,
}

#[derive(Default)]
pub struct TaskModel {
    entries: HashMap<u64, Entry>,
    last_update: Option<Instant>,
}

/// The pids limit with the least headroom among a cgroup and its ancestors.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PidsLimit {
    /// Path of the limiting cgroup in the pids hierarchy.
    pub cgroup: String,
    pub max: u64,
    /// `pids.current` of the limiting cgroup (its whole subtree).
    pub current: u64,
    /// Tasks that can still be created before the limit refuses one.
    pub headroom: i64,
    pub headroom_pct: f64,
}

/// One cgroup as `top` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct CgroupRow {
    /// cgroup v2 id (inode) the kernel counts under.
    pub cgroup_id: u64,
    pub cgroup: String,
    /// `namespace/pod/container`, or the unit, session or path.
    pub workload: String,
    pub pod: Option<Arc<PodRef>>,
    pub threads_per_s: f64,
    pub processes_per_s: f64,
    /// Created since faultline attached.
    pub threads_created: u64,
    pub processes_created: u64,
    pub exited: u64,
    /// Tasks in this cgroup itself now (`cgroup.threads`).
    pub live: Option<u64>,
    pub pids_limit: Option<PidsLimit>,
    /// The RLIMIT_NPROC of this cgroup's processes, when not root and finite.
    pub nproc: Option<users::NprocLimit>,
    /// The tightest memory limit over the cgroup and its ancestors.
    pub memory: Option<binding::MemoryLimit>,
    /// Every limit that can refuse this cgroup's next task, in the kernel's order (`top`
    /// fills it in from the refresh).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<binding::LimitUse>,
    /// Seconds until the pids limit is reached at the current growth (`top` fills it in from
    /// its trend; none while flat or shrinking).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids_eta_s: Option<f64>,
}

/// Node-wide task limits.
#[derive(Clone, Debug, Serialize)]
pub struct NodeRow {
    pub threads: u64,
    pub threads_max: u64,
    pub pid_max: u64,
    pub threads_max_headroom_pct: f64,
    pub pid_max_headroom_pct: f64,
    /// Seconds until each is reached at the current growth, when growing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads_max_eta_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid_max_eta_s: Option<f64>,
}

impl NodeRow {
    pub fn from(node: NodeTasks) -> Self {
        NodeRow {
            threads: node.threads,
            threads_max: node.threads_max,
            pid_max: node.pid_max,
            threads_max_headroom_pct: headroom(node.threads_max, node.threads).1,
            pid_max_headroom_pct: headroom(node.pid_max, node.threads).1,
            threads_max_eta_s: None,
            pid_max_eta_s: None,
        }
    }
}

/// What `top --output json` prints per refresh.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    pub kind: &'static str,
    pub time: String,
    pub node: NodeRow,
    pub cgroups: Vec<CgroupRow>,
    /// cgroups with counters (kernel map entries = model entries).
    pub tracked_cgroups: usize,
    pub cgroups_removed: u64,
    /// Creations and exits in cgroups the full kernel map could not count.
    pub untracked_events: u64,
}

impl TaskModel {
    /// Replaces the model's counters with the kernel's; cgroups the kernel no longer counts
    /// (removed) leave the model.
    pub fn update(&mut self, now: Instant, counts: Vec<(u64, TaskCounts)>) {
        let mut next = HashMap::with_capacity(counts.len());
        for (id, c) in counts {
            let mut entry = self.entries.remove(&id).unwrap_or_else(|| Entry {
                counts: TaskCounts::default(),
                samples: VecDeque::new(),
            });
            // A cgroup first counted now (new, or shown idle until now) had counted nothing
            // at the previous update: its rate starts from there, not from this sample.
            if entry.samples.is_empty()
                && let Some(at) = self.last_update
            {
                entry.samples.push_back(Sample {
                    at,
                    threads: 0,
                    processes: 0,
                });
            }
            entry.counts = c;
            entry.samples.push_back(Sample {
                at: now,
                threads: c.threads,
                processes: c.processes,
            });
            while entry.samples.len() > MAX_SAMPLES
                || entry
                    .samples
                    .front()
                    .is_some_and(|s| now.duration_since(s.at) > RATE_WINDOW)
                    && entry.samples.len() > 2
            {
                entry.samples.pop_front();
            }
            next.insert(id, entry);
        }
        self.entries = next;
        self.last_update = Some(now);
    }

    /// Adds cgroups that hold tasks but created or ended none since faultline attached (the
    /// kernel has no counters for them): they show with their live count and limit, at zero
    /// rates. Call after each [`TaskModel::update`].
    pub fn include_idle(&mut self, ids: impl IntoIterator<Item = u64>) {
        for id in ids {
            self.entries.entry(id).or_insert_with(|| Entry {
                counts: TaskCounts::default(),
                samples: VecDeque::new(),
            });
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// One row per counted cgroup that still exists, with live counts and limits read now.
    pub fn rows(&self, attributor: &mut Attributor) -> Vec<CgroupRow> {
        let mut rows = Vec::with_capacity(self.entries.len());
        let mut levels = PidsLevels::new();
        let mut memory_levels = binding::MemoryLevels::new();
        for (&id, entry) in &self.entries {
            let Some(path) = attributor.cgroups.path(Hierarchy::Unified, id) else {
                continue;
            };
            let attribution = attributor.attribute_path(&path.text());
            let cgroups = &attributor.cgroups;
            let (threads_per_s, processes_per_s) = rates(&entry.samples);
            rows.push(CgroupRow {
                cgroup_id: id,
                live: cgroups
                    .dir(Hierarchy::Unified, &path)
                    .and_then(|d| count_lines(&d.join("cgroup.threads"))),
                pids_limit: cgroups
                    .mount(Hierarchy::Pids)
                    .and_then(|m| tightest_pids_limit_in(&m.path, &path, &mut levels)),
                memory: cgroups.mount(Hierarchy::Memory).and_then(|m| {
                    binding::tightest_memory_limit(&m.path, m.v2, &path, &mut memory_levels)
                }),
                nproc: None,
                limits: Vec::new(),
                cgroup: path.text(),
                workload: attribution.workload,
                pod: attribution.pod,
                threads_per_s,
                processes_per_s,
                threads_created: entry.counts.threads,
                processes_created: entry.counts.processes,
                exited: entry.counts.exited,
                pids_eta_s: None,
            });
        }
        rows
    }
}

impl Snapshot {
    /// What `top` shows of one refresh.
    pub fn new(node: NodeTasks, tasks: &TaskRefresh, time: String) -> Snapshot {
        Snapshot {
            kind: "tasks",
            time,
            node: NodeRow::from(node),
            cgroups: tasks.rows.clone(),
            tracked_cgroups: tasks.tracked,
            cgroups_removed: tasks.stats.cgroups_removed,
            untracked_events: tasks.stats.map_full,
        }
    }
}

/// A pids limit about to refuse tasks, reported before the first failure.
#[derive(Clone, Debug, Serialize)]
pub struct HeadroomWarning {
    pub time: String,
    /// The cgroup v2 path where tasks are being created.
    pub cgroup: String,
    pub workload: String,
    pub pod: Option<Arc<PodRef>>,
    /// The pids cgroup whose limit is near.
    pub pids_cgroup: String,
    pub pids_current: u64,
    pub pids_max: u64,
    pub headroom: i64,
    pub headroom_pct: f64,
    /// Seconds until the limit at the current growth, when growing.
    pub eta_s: Option<f64>,
    pub live: Option<u64>,
}

/// When a pids limit is about to refuse tasks: its headroom below a share of the limit, or
/// its time to exhaustion below a duration.
#[derive(Clone, Copy, Debug)]
pub struct HeadroomThresholds {
    pub headroom_pct: f64,
    pub eta: Duration,
}

/// Warns once per pids limit when its headroom or its time to exhaustion falls below the
/// thresholds, and again only after it has risen above both. Remembers only the limits
/// currently below.
pub struct HeadroomWatch {
    thresholds: HeadroomThresholds,
    below: HashSet<String>,
}

impl HeadroomWatch {
    pub fn new(thresholds: HeadroomThresholds) -> Self {
        HeadroomWatch {
            thresholds,
            below: HashSet::new(),
        }
    }

    /// The warnings of one refresh: its rows and the limits' estimates.
    pub fn check(&mut self, rows: &[CgroupRow], estimates: &[Estimate]) -> Vec<HeadroomWarning> {
        let mut warnings = Vec::new();
        let mut below_now = HashSet::new();
        for row in rows {
            let Some(limit) = &row.pids_limit else {
                continue;
            };
            let eta = estimates
                .iter()
                .find(|e| e.limit == Limit::Pids && e.resource == limit.cgroup)
                .and_then(|e| e.eta_s);
            let soon = eta.is_some_and(|e| e <= self.thresholds.eta.as_secs_f64());
            if limit.headroom_pct >= self.thresholds.headroom_pct && !soon {
                continue;
            }
            if below_now.insert(limit.cgroup.clone()) && !self.below.contains(&limit.cgroup) {
                warnings.push(HeadroomWarning {
                    time: now_rfc3339(),
                    cgroup: row.cgroup.clone(),
                    workload: row.workload.clone(),
                    pod: row.pod.clone(),
                    pids_cgroup: limit.cgroup.clone(),
                    pids_current: limit.current,
                    pids_max: limit.max,
                    headroom: limit.headroom,
                    headroom_pct: limit.headroom_pct,
                    eta_s: eta,
                    live: row.live,
                });
            }
        }
        self.below = below_now;
        warnings
    }
}

/// Threads and processes created per second over the samples kept.
fn rates(samples: &VecDeque<Sample>) -> (f64, f64) {
    let (Some(first), Some(last)) = (samples.front(), samples.back()) else {
        return (0.0, 0.0);
    };
    let secs = last.at.duration_since(first.at).as_secs_f64();
    if secs <= 0.0 {
        return (0.0, 0.0);
    }
    (
        last.threads.saturating_sub(first.threads) as f64 / secs,
        last.processes.saturating_sub(first.processes) as f64 / secs,
    )
}

/// (tasks left, percent of the limit left). A limit of 0 has no headroom.
pub fn headroom(max: u64, current: u64) -> (i64, f64) {
    let left = max as i64 - current as i64;
    let pct = if max == 0 {
        0.0
    } else {
        left as f64 * 100.0 / max as f64
    };
    (left, pct)
}

/// Most cgroup directories walked to find the ones that hold tasks.
const MAX_CGROUPS_WALKED: usize = 100_000;

/// The cgroup v2 ids (directory inodes) under `root` that hold at least one task now.
fn occupied_cgroups(root: &Path) -> Vec<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    let mut walked = 0;
    while let Some(dir) = stack.pop() {
        walked += 1;
        if walked > MAX_CGROUPS_WALKED {
            break;
        }
        if count_lines(&dir.join("cgroup.threads")).is_some_and(|n| n > 0)
            && let Ok(meta) = std::fs::metadata(&dir)
        {
            found.push(meta.ino());
        }
        let Ok(children) = std::fs::read_dir(&dir) else {
            continue;
        };
        stack.extend(
            children
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    found
}

fn count_lines(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.lines().count() as u64)
}

fn read_value(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Walks `path` and its ancestors in the pids hierarchy mounted at `mount`, returning the
/// limited level with the least headroom. Levels missing from that hierarchy (a hybrid host's
/// v1 tree need not mirror v2) are skipped.
pub fn tightest_pids_limit(mount: &Path, path: &CgroupPath) -> Option<PidsLimit> {
    tightest_pids_limit_in(mount, path, &mut HashMap::new())
}

/// The use of the limits `hot` names, read between refreshes: a pids limit's two small files,
/// the node's `/proc/loadavg` and two sysctls, a uid's count from the kernel's map (its limit
/// from `users`, the last refresh's). A limit that cannot be read now (its cgroup gone, a uid
/// the map does not hold) is left out.
pub fn sample(
    pids_mount: Option<&Path>,
    probes: &Probes,
    users: &[users::UidTasks],
    hot: &[(Limit, String)],
) -> Vec<crate::trend::Sample> {
    let uid_counts = hot
        .iter()
        .any(|(l, _)| *l == Limit::RlimitNproc)
        .then(|| uid_counts(probes).ok())
        .flatten()
        .unwrap_or_default();
    let node = hot
        .iter()
        .any(|(l, _)| matches!(l, Limit::PidMax | Limit::ThreadsMax))
        .then(|| NodeTasks::read().ok())
        .flatten();
    hot.iter()
        .filter_map(|(limit, resource)| {
            let (current, max) = match limit {
                Limit::Pids => {
                    // A path that is not UTF-8 reads as text that names no directory: not
                    // sampled, read at the next refresh.
                    let dir = CgroupPath::parse(resource.as_bytes())?.under(pids_mount?);
                    let max = read_value(&dir.join("pids.max"))?.parse().ok()?;
                    let current = read_value(&dir.join("pids.current"))?.parse().ok()?;
                    (current, max)
                }
                Limit::PidMax => (node?.threads, node?.pid_max),
                Limit::ThreadsMax => (node?.threads, node?.threads_max),
                Limit::RlimitNproc => {
                    let u = users
                        .iter()
                        .find(|u| binding::uid_resource(u.uid) == *resource)?;
                    let tasks = u64::try_from(*uid_counts.get(&u.uid)?).ok()?;
                    (tasks, u.max)
                }
                Limit::Conntrack => return None,
            };
            Some(crate::trend::Sample {
                limit: *limit,
                resource: resource.clone(),
                current,
                max,
            })
        })
        .collect()
}

/// `pids.max` and `pids.current` of each level read so far (none: no limit there), so that
/// the shared ancestors of many cgroups are read once per refresh.
type PidsLevels = HashMap<CgroupPath, Option<(u64, u64)>>;

/// [`tightest_pids_limit`], reading each level at most once across the calls sharing `levels`.
fn tightest_pids_limit_in(
    mount: &Path,
    path: &CgroupPath,
    levels: &mut PidsLevels,
) -> Option<PidsLimit> {
    let mut best: Option<PidsLimit> = None;
    let mut level = Some(path.clone());
    while let Some(at) = level {
        let read = match levels.get(&at) {
            Some(v) => *v,
            None => {
                let dir = at.under(mount);
                let v = match (
                    read_value(&dir.join("pids.max")),
                    read_value(&dir.join("pids.current")),
                ) {
                    (Some(max), Some(current)) => {
                        max.parse::<u64>().ok().zip(current.parse::<u64>().ok())
                    }
                    _ => None,
                };
                levels.insert(at.clone(), v);
                v
            }
        };
        if let Some((max, current)) = read {
            let (left, pct) = headroom(max, current);
            if best.as_ref().is_none_or(|b| left < b.headroom) {
                best = Some(PidsLimit {
                    cgroup: at.text(),
                    max,
                    current,
                    headroom: left,
                    headroom_pct: pct,
                });
            }
        }
        level = at.parent();
    }
    best
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStrExt as _;

    use super::*;

    fn at(start: Instant, ms: u64, threads: u64, processes: u64) -> Sample {
        Sample {
            at: start + Duration::from_millis(ms),
            threads,
            processes,
        }
    }

    #[test]
    fn rates_over_the_window() {
        let t = Instant::now();
        let samples: VecDeque<_> =
            [at(t, 0, 10, 1), at(t, 1000, 60, 1), at(t, 2000, 110, 5)].into();
        assert_eq!(rates(&samples), (50.0, 2.0));
        assert_eq!(rates(&VecDeque::new()), (0.0, 0.0));
        assert_eq!(rates(&[at(t, 0, 10, 1)].into()), (0.0, 0.0));
    }

    #[test]
    fn model_keeps_only_what_the_kernel_counts_and_bounds_samples() {
        let t = Instant::now();
        let mut m = TaskModel::default();
        let c = |n| TaskCounts {
            threads: n,
            processes: 0,
            exited: 0,
        };
        for i in 0..200u64 {
            m.update(
                t + Duration::from_millis(i * 10),
                vec![(1, c(i)), (2, c(0))],
            );
        }
        assert_eq!(m.len(), 2);
        assert!(m.entries[&1].samples.len() <= MAX_SAMPLES);
        // 100 threads/s steadily.
        let (thr, _) = rates(&m.entries[&1].samples);
        assert!((thr - 100.0).abs() < 1e-6, "{thr}");
        // cgroup 2 removed in the kernel: gone from the model.
        m.update(t + Duration::from_secs(3), vec![(1, c(300))]);
        assert_eq!(m.len(), 1);
        // Old samples leave the window.
        m.update(t + Duration::from_secs(20), vec![(1, c(300))]);
        assert!(m.entries[&1].samples.len() <= 2);
        // A cgroup that appears between two updates counts from zero at the previous one.
        m.update(t + Duration::from_secs(21), vec![(1, c(300)), (3, c(50))]);
        assert_eq!(rates(&m.entries[&3].samples), (50.0, 0.0));
        // So does one shown idle (it held tasks, created none) until it creates some.
        m.include_idle([4]);
        m.update(t + Duration::from_secs(22), vec![(1, c(300)), (4, c(2))]);
        assert_eq!(rates(&m.entries[&4].samples), (2.0, 0.0));
    }

    fn row(cgroup: &str, limit_cgroup: &str, max: u64, current: u64) -> CgroupRow {
        let (left, pct) = headroom(max, current);
        CgroupRow {
            cgroup_id: 0,
            cgroup: cgroup.into(),
            workload: cgroup.into(),
            pod: None,
            threads_per_s: 0.0,
            processes_per_s: 0.0,
            threads_created: 0,
            processes_created: 0,
            exited: 0,
            live: Some(current),
            pids_limit: Some(PidsLimit {
                cgroup: limit_cgroup.into(),
                max,
                current,
                headroom: left,
                headroom_pct: pct,
            }),
            pids_eta_s: None,
            nproc: None,
            memory: None,
            limits: Vec::new(),
        }
    }

    fn thresholds(headroom_pct: f64, eta: Duration) -> HeadroomThresholds {
        HeadroomThresholds { headroom_pct, eta }
    }

    #[test]
    fn headroom_warns_once_per_crossing_and_per_limit() {
        let mut w = HeadroomWatch::new(thresholds(10.0, Duration::ZERO));
        assert!(w.check(&[row("/a", "/a", 100, 50)], &[]).is_empty());
        // Two cgroups under one limit: one warning.
        let first = w.check(
            &[row("/p/c1", "/p", 100, 95), row("/p/c2", "/p", 100, 95)],
            &[],
        );
        assert_eq!(first.len(), 1);
        assert_eq!(
            (first[0].pids_cgroup.as_str(), first[0].headroom),
            ("/p", 5)
        );
        // Still below: no repeat.
        assert!(w.check(&[row("/p/c1", "/p", 100, 97)], &[]).is_empty());
        // Back above, then below again: warns again.
        assert!(w.check(&[row("/p/c1", "/p", 100, 50)], &[]).is_empty());
        assert_eq!(w.check(&[row("/p/c1", "/p", 100, 99)], &[]).len(), 1);
        // Exactly at the threshold is not below it.
        let mut w = HeadroomWatch::new(thresholds(10.0, Duration::ZERO));
        assert!(w.check(&[row("/a", "/a", 100, 90)], &[]).is_empty());
    }

    #[test]
    fn a_short_eta_warns_with_headroom_left() {
        // 2 tasks a second, 60 left: 30 s to go, under a 1 min ETA threshold.
        let mut w = HeadroomWatch::new(thresholds(10.0, Duration::from_secs(60)));
        let mut trend = crate::trend::LimitWatch::new(Duration::from_secs(60));
        let t = Instant::now();
        let mut warned = Vec::new();
        for i in 0..8u64 {
            let refresh = crate::signals::Refresh {
                parts: vec![crate::signals::Part::Tasks(TaskRefresh {
                    rows: vec![row("/a", "/a", 100, 10 + 4 * i)],
                    ..Default::default()
                })],
                ..Default::default()
            };
            trend.update(t + Duration::from_secs(i * 2), refresh.readings());
            warned.extend(w.check(refresh.rows(), &trend.estimates()));
        }
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(warned[0].headroom_pct > 10.0);
        assert!(warned[0].eta_s.is_some_and(|e| e <= 60.0), "{warned:?}");
    }

    #[test]
    fn headroom_arithmetic() {
        assert_eq!(headroom(100, 90), (10, 10.0));
        assert_eq!(headroom(100, 100), (0, 0.0));
        assert_eq!(headroom(100, 120), (-20, -20.0)); // limit lowered below usage
        assert_eq!(headroom(0, 0), (0, 0.0));
    }

    #[test]
    fn nested_limits_pick_the_tightest_and_max_means_none() {
        let root = std::env::temp_dir().join(format!("faultline-unit-pids-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let write = |rel: &str, max: &str, current: &str| {
            let d = root.join(rel);
            std::fs::create_dir_all(&d).expect("test");
            std::fs::write(d.join("pids.max"), max).expect("test");
            std::fs::write(d.join("pids.current"), current).expect("test");
        };
        write("", "max", "500");
        write("kubepods", "1000", "400");
        write("kubepods/pod1", "100", "95");
        write("kubepods/pod1/ctr", "max", "90");
        write("kubepods/pod2", "max", "10");

        let limit =
            |path: &[u8]| tightest_pids_limit(&root, &CgroupPath::parse(path).expect("test"));
        let l = limit(b"/kubepods/pod1/ctr").expect("test");
        assert_eq!(
            (l.cgroup.as_str(), l.max, l.current, l.headroom),
            ("/kubepods/pod1", 100, 95, 5)
        );
        // pod2 has no limit of its own: the kubepods limit applies.
        let l = limit(b"/kubepods/pod2").expect("test");
        assert_eq!((l.cgroup.as_str(), l.headroom), ("/kubepods", 600));
        // No limit anywhere: none.
        let none = CgroupPath::parse(b"/").expect("test");
        assert!(tightest_pids_limit(&root, &none).is_none());
        // A path the pids tree does not have: its ancestors still apply.
        let l = limit(b"/kubepods/pod3/ctr").expect("test");
        assert_eq!(l.cgroup, "/kubepods");
        // A name that is not UTF-8: read through its bytes, shown escaped.
        let odd = root.join(std::ffi::OsStr::from_bytes(b"kubepods/pod\xff"));
        std::fs::create_dir_all(&odd).expect("test");
        std::fs::write(odd.join("pids.max"), "7").expect("test");
        std::fs::write(odd.join("pids.current"), "3").expect("test");
        let l = limit(b"/kubepods/pod\xff").expect("test");
        assert_eq!((l.cgroup.as_str(), l.max), ("/kubepods/pod\\xff", 7));
        std::fs::remove_dir_all(&root).expect("test");
    }
}
