//! RLIMIT_NPROC as the kernel applies it: tasks (threads included) counted per real uid
//! across the whole node, against the soft `Max processes` limit of the task that forks.
//! Read from /proc once per refresh, for a bounded number of processes.
//!
//! The count is per uid as the initial user namespace sees it (the kernel counts per user
//! namespace and charges parents too, so pods in their own user namespaces are approximated).
//! Root and holders of CAP_SYS_RESOURCE or CAP_SYS_ADMIN are exempt and not reported.
//!
//! Which cgroup a process is in comes from the listed cgroups' `cgroup.procs` under the
//! cgroup v2 mount, not from `/proc/<pid>/cgroup`: in a private cgroup namespace (the
//! DaemonSet's) the latter reads `/../..`-relative for every pod.

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
};

use serde::Serialize;

/// Most processes read per refresh; the rest are counted as skipped.
pub const MAX_PROCESSES: usize = 20_000;
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
    /// Of `tasks`, those in `cgroups` at the walk: between walks the uid's count is sampled
    /// as the rest plus what those cgroups hold then ([`UidTasks::sample`]).
    #[serde(skip)]
    pub in_cgroups: u64,
}

impl UidTasks {
    /// The uid's tasks now, reading only its cgroups' processes (under `root`, the cgroup v2
    /// mount): its tasks elsewhere as the last walk counted them, plus those of its cgroups
    /// now. What a leak in one of its pods adds shows at once; none when no cgroup is left.
    pub fn sample(&self, root: &Path) -> Option<u64> {
        let members = members(root, self.cgroups.iter().map(String::as_str));
        if members.is_empty() {
            return None;
        }
        let now: u64 = members
            .keys()
            .filter_map(|pid| {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                parse_status(&status).filter(|s| s.uid == self.uid)
            })
            .map(|s| s.threads)
            .sum();
        Some(self.tasks.saturating_sub(self.in_cgroups) + now)
    }
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

/// What one /proc walk found.
#[derive(Clone, Debug, Default)]
pub struct UserCensus {
    pub uids: HashMap<u32, UidTasks>,
    /// cgroup v2 path -> (uid, the soft limit read for it there).
    limits: HashMap<String, Vec<(u32, u64)>>,
    /// Processes not read because of [`MAX_PROCESSES`].
    pub skipped: u64,
}

/// One process's /proc/<pid>/status fields that matter here.
#[derive(Debug, PartialEq)]
struct Status {
    uid: u32,
    threads: u64,
    exempt: bool,
}

/// Which of `cgroups` (cgroup v2 paths) each process is in, from their `cgroup.procs` under
/// `root` (the cgroup v2 mount); at most [`MAX_PROCESSES`] processes. A cgroup gone
/// meanwhile is skipped.
pub fn members<'a>(root: &Path, cgroups: impl Iterator<Item = &'a str>) -> HashMap<u32, String> {
    let mut members = HashMap::new();
    for cgroup in cgroups {
        if members.len() >= MAX_PROCESSES {
            break;
        }
        let Ok(procs) = std::fs::read_to_string(
            root.join(cgroup.trim_start_matches('/'))
                .join("cgroup.procs"),
        ) else {
            continue;
        };
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            members.insert(pid, cgroup.to_owned());
        }
    }
    members
}

impl UserCensus {
    /// Walks /proc: each process's real uid, thread count and capabilities from `status`,
    /// its cgroup v2 path from `members`, and `limits` once per (cgroup, uid).
    pub fn read(members: &HashMap<u32, String>) -> anyhow::Result<UserCensus> {
        use anyhow::Context as _;
        let mut census = UserCensus::default();
        let mut tasks: HashMap<u32, u64> = HashMap::new();
        // Per (uid, cgroup): the threads of the uid's processes there.
        let mut in_cgroup: HashMap<(u32, String), u64> = HashMap::new();
        let mut read = 0;
        for entry in std::fs::read_dir("/proc")
            .context("listing /proc")?
            .filter_map(Result::ok)
        {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            if read >= MAX_PROCESSES {
                census.skipped += 1;
                continue;
            }
            read += 1;
            // A process gone meanwhile is simply not counted.
            let Some(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| parse_status(&s))
            else {
                continue;
            };
            *tasks.entry(status.uid).or_default() += status.threads;
            if status.uid == 0 || status.exempt {
                continue;
            }
            let Some(cgroup) = pid
                .parse::<u32>()
                .ok()
                .and_then(|pid| members.get(&pid))
                .cloned()
            else {
                continue;
            };
            *in_cgroup.entry((status.uid, cgroup.clone())).or_default() += status.threads;
            let seen = census.limits.get(&cgroup);
            if seen.is_some_and(|v| v.iter().any(|(u, _)| *u == status.uid)) {
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
                .entry(cgroup)
                .or_default()
                .push((status.uid, max));
        }
        let pairs = census
            .limits
            .iter()
            .flat_map(|(c, v)| v.iter().map(move |(uid, max)| (c, uid, *max)));
        for (cgroup, uid, max) in pairs {
            if census.uids.len() >= MAX_UIDS && !census.uids.contains_key(uid) {
                continue;
            }
            let entry = census.uids.entry(*uid).or_insert_with(|| UidTasks {
                uid: *uid,
                tasks: tasks.get(uid).copied().unwrap_or(0),
                max,
                cgroups: BTreeSet::new(),
                in_cgroups: 0,
            });
            entry.max = entry.max.min(max);
            if entry.cgroups.len() < MAX_CGROUPS_PER_UID && entry.cgroups.insert(cgroup.clone()) {
                entry.in_cgroups += in_cgroup.get(&(*uid, cgroup.clone())).copied().unwrap_or(0);
            }
        }
        Ok(census)
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
                in_cgroups: 30,
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
