//! RLIMIT_NPROC as the kernel applies it: tasks (threads included) counted per real uid
//! across the whole node, against the soft `Max processes` limit of the task that forks.
//!
//! The count is the kernel's own (`cred->ucounts`, or `cred->user` before 5.14), which the
//! tasks program writes into `TASK_UIDS` whenever a non-root uid's task is created or ends:
//! exact, and the same work whatever another pod runs. Which uids run in which cgroup under
//! which limit comes from the cgroups' own processes: at most [`PROCS_PER_CGROUP`] of each
//! counted cgroup (`cgroup.procs` under the cgroup v2 mount, which holds in the DaemonSet's
//! private cgroup namespace; then their `status` and `limits`), so a pod of 20,000 processes
//! costs its own share, not every other pod's. A uid that has created or ended no task since
//! faultline started is counted from the processes read (a lower bound until it does).
//!
//! The count is per uid as the initial user namespace sees it (the kernel counts per user
//! namespace and charges parents too, so pods in their own user namespaces are approximated).
//! Root and holders of CAP_SYS_RESOURCE or CAP_SYS_ADMIN are exempt and not reported.

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
};

use serde::Serialize;

/// Most processes of one cgroup read for their uids and limits; a cgroup's further ones are
/// counted as not read (`UserCensus::unread`).
pub const PROCS_PER_CGROUP: usize = 16;
/// Most uids reported (those with a finite limit): bounds the `uid:<n>` label values.
pub const MAX_UIDS: usize = 64;
/// Most cgroups named per uid.
const MAX_CGROUPS_PER_UID: usize = 32;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_RESOURCE: u32 = 24;

/// One uid's tasks and the tightest RLIMIT_NPROC among its limited cgroups.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UidTasks {
    pub uid: u32,
    /// Processes and threads whose real uid this is, node-wide.
    pub tasks: u64,
    /// The least soft RLIMIT_NPROC among the cgroups' processes of this uid.
    pub max: u64,
    /// cgroup v2 paths holding non-exempt processes of this uid with a finite limit.
    pub cgroups: BTreeSet<String>,
    /// Whether `tasks` is the kernel's count (else a lower bound from the processes read).
    #[serde(skip)]
    pub from_kernel: bool,
}

/// The RLIMIT_NPROC that applies to one cgroup's processes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NprocLimit {
    pub uid: u32,
    /// The uid's tasks node-wide (what the kernel compares with the limit).
    pub current: u64,
    /// The soft limit of this cgroup's processes of that uid.
    pub max: u64,
    pub headroom: i64,
    /// Other cgroups whose processes run as this uid under a finite limit.
    pub shared_with: usize,
}

/// What one census found.
#[derive(Clone, Debug, Default)]
pub struct UserCensus {
    pub uids: HashMap<u32, UidTasks>,
    /// cgroup v2 path -> (uid, the soft limit read for it there).
    limits: HashMap<String, Vec<(u32, u64)>>,
    /// Processes of counted cgroups beyond [`PROCS_PER_CGROUP`], not read for their uids.
    pub unread: u64,
}

/// One process's /proc/<pid>/status fields that matter here.
#[derive(Debug, PartialEq)]
struct Status {
    uid: u32,
    threads: u64,
    exempt: bool,
}

/// Up to `most` pids of a cgroup (a v2 path under `root`, the cgroup v2 mount), and how many
/// more it has. A cgroup gone meanwhile has none.
fn procs(root: &Path, cgroup: &str, most: usize) -> (Vec<u32>, u64) {
    let Ok(text) = std::fs::read_to_string(
        root.join(cgroup.trim_start_matches('/'))
            .join("cgroup.procs"),
    ) else {
        return (Vec::new(), 0);
    };
    let mut pids = text.lines().filter_map(|l| l.trim().parse::<u32>().ok());
    let first: Vec<u32> = pids.by_ref().take(most).collect();
    (first, pids.count() as u64)
}

impl UserCensus {
    /// The uids running in `cgroups` (v2 paths under `root`) with a finite limit, each with
    /// the kernel's count from `kernel` (uid -> its `TASK_UIDS` entry's tasks).
    pub fn read<'a>(
        root: &Path,
        cgroups: impl Iterator<Item = &'a str>,
        kernel: &HashMap<u32, i64>,
    ) -> UserCensus {
        let mut census = UserCensus::default();
        // Threads of the processes read, per uid: the count of a uid the kernel map lacks.
        let mut seen: HashMap<u32, u64> = HashMap::new();
        for cgroup in cgroups {
            let (pids, more) = procs(root, cgroup, PROCS_PER_CGROUP);
            census.unread += more;
            for pid in pids {
                // A process gone meanwhile is simply not read.
                let Some(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|s| parse_status(&s))
                else {
                    continue;
                };
                *seen.entry(status.uid).or_default() += status.threads;
                if status.uid == 0 || status.exempt {
                    continue;
                }
                let known = census.limits.get(cgroup);
                if known.is_some_and(|v| v.iter().any(|(u, _)| *u == status.uid)) {
                    continue;
                }
                let Some(max) = std::fs::read_to_string(format!("/proc/{pid}/limits"))
                    .ok()
                    .and_then(|s| parse_nproc_soft(&s))
                else {
                    continue;
                };
                census
                    .limits
                    .entry(cgroup.to_owned())
                    .or_default()
                    .push((status.uid, max));
            }
        }
        let pairs = census
            .limits
            .iter()
            .flat_map(|(c, v)| v.iter().map(move |(uid, max)| (c, uid, *max)));
        for (cgroup, uid, max) in pairs {
            if census.uids.len() >= MAX_UIDS && !census.uids.contains_key(uid) {
                continue;
            }
            let from_kernel = kernel.get(uid).copied();
            let entry = census.uids.entry(*uid).or_insert_with(|| UidTasks {
                uid: *uid,
                tasks: from_kernel.map_or_else(
                    || seen.get(uid).copied().unwrap_or(0),
                    |n| u64::try_from(n).unwrap_or(0),
                ),
                max,
                cgroups: BTreeSet::new(),
                from_kernel: from_kernel.is_some(),
            });
            entry.max = entry.max.min(max);
            if entry.cgroups.len() < MAX_CGROUPS_PER_UID {
                entry.cgroups.insert(cgroup.clone());
            }
        }
        census
    }

    /// The tightest RLIMIT_NPROC over the uids running in `cgroup` (a v2 path).
    pub fn limit(&self, cgroup: &str) -> Option<NprocLimit> {
        self.limits
            .get(cgroup)?
            .iter()
            .filter_map(|&(uid, max)| {
                let u = self.uids.get(&uid)?;
                Some(NprocLimit {
                    uid,
                    current: u.tasks,
                    max,
                    headroom: max as i64 - u.tasks as i64,
                    shared_with: u.cgroups.len().saturating_sub(1),
                })
            })
            .min_by_key(|l| l.headroom)
    }
}

fn parse_status(s: &str) -> Option<Status> {
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim_start)
    };
    let uid = field("Uid:")?.split_whitespace().next()?.parse().ok()?;
    let threads = field("Threads:")?.parse().ok()?;
    let eff = u64::from_str_radix(field("CapEff:")?, 16).ok()?;
    let exempt = eff & (1 << CAP_SYS_ADMIN | 1 << CAP_SYS_RESOURCE) != 0;
    Some(Status {
        uid,
        threads,
        exempt,
    })
}

/// The soft limit of `Max processes`; none when unlimited.
fn parse_nproc_soft(s: &str) -> Option<u64> {
    s.lines()
        .find_map(|l| l.strip_prefix("Max processes"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_limits() {
        let status =
            "Name:\tsleep\nUid:\t1000\t1000\t1000\t1000\nThreads:\t3\nCapEff:\t0000000000000000\n";
        assert_eq!(
            parse_status(status),
            Some(Status {
                uid: 1000,
                threads: 3,
                exempt: false
            })
        );
        let admin = status.replace("0000000000000000", "0000000000200000");
        assert!(parse_status(&admin).is_some_and(|s| s.exempt));
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max processes             40                   62000                processes\n";
        assert_eq!(parse_nproc_soft(limits), Some(40));
        assert_eq!(parse_nproc_soft(&limits.replace("40 ", "unlimited ")), None);
    }

    #[test]
    fn a_cgroup_gets_its_uids_tightest_limit_and_sharers() {
        let mut census = UserCensus::default();
        census.limits.insert("/a".into(), vec![(1000, 100)]);
        census.limits.insert("/b".into(), vec![(1000, 40)]);
        census.uids.insert(
            1000,
            UidTasks {
                uid: 1000,
                tasks: 30,
                max: 40,
                cgroups: ["/a".to_owned(), "/b".to_owned()].into(),
                from_kernel: true,
            },
        );
        let l = census.limit("/b").expect("a limit");
        assert_eq!(
            (l.uid, l.current, l.max, l.headroom, l.shared_with),
            (1000, 30, 40, 10, 1)
        );
        assert_eq!(census.limit("/a").map(|l| l.headroom), Some(70));
        assert_eq!(census.limit("/c"), None);
    }
}
