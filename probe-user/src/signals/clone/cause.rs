//! Why a task could not be created: decided from the kernel state captured at the failure,
//! never from the errno alone (EAGAIN covers five different limits, and old kernels said
//! ENOMEM for a full pid space).
//!
//! The checks run in the order `copy_process()` applies the limits, so when two limits are
//! reached at once the one the kernel hit first is reported.

use probe_common::clone::{CloneFailureEvent, valid};
use serde::Serialize;

use crate::signals::clone::node::{NodeTasks, RESERVED_PIDS};

pub const EAGAIN: u32 = libc::EAGAIN as u32;
pub const ENOMEM: u32 = libc::ENOMEM as u32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The pids cgroup (a pod's pids limit) or one of its ancestors is full.
    PidsLimit,
    /// A pid namespace has no free pid below its pid_max.
    PidMax,
    /// The pid namespace's init exited: it accepts no new pids (ENOMEM).
    PidnsDead,
    /// The node's `kernel.threads-max` is reached.
    ThreadsMax,
    /// The user's process count reached RLIMIT_NPROC (`ulimit -u`), non-root only.
    RlimitNproc,
    /// A memory allocation for the new task failed (memory cgroup limit or node memory).
    Memory,
    Unknown,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::PidsLimit => "pids_limit",
            Cause::PidMax => "pid_max",
            Cause::PidnsDead => "pidns_dead",
            Cause::ThreadsMax => "threads_max",
            Cause::RlimitNproc => "rlimit_nproc",
            Cause::Memory => "memory",
            Cause::Unknown => "unknown",
        }
    }
}

/// What the classification knows besides the kernel snapshot.
pub struct Facts<'a> {
    pub node: NodeTasks,
    /// How many pids below `RESERVED_PIDS` are in use in a pid namespace (inode, level):
    /// those the allocator no longer hands out once its cursor has passed them.
    pub low_pids: &'a dyn Fn(u32, u32) -> Option<u32>,
    /// Path of the pids cgroup the snapshot names, in the pids hierarchy.
    pub pids_cgroup: Option<&'a str>,
    pub memory_cgroup: Option<&'a str>,
    pub page_size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub cause: Cause,
    /// The numbers behind the cause, e.g. `pids.current=512 pids.max=512 cgroup=/kubepods/...`.
    pub evidence: String,
}

/// The node's task count is the initial pid namespace's allocation at the failure, which can
/// differ from the kernel's `nr_threads` by a few tasks being reaped; without that snapshot it
/// is read from /proc after the event arrives. Either way allow a little slack.
fn threads_slack(threads_max: u64) -> u64 {
    (threads_max / 100).max(8)
}

/// Live tasks on the node at the failure: the kernel snapshot when there is one.
fn node_threads(ev: &CloneFailureEvent, node: &NodeTasks) -> u64 {
    if ev.valid & valid::PIDNS != 0 && ev.pidns.node_tasks > 0 {
        ev.pidns.node_tasks as u64
    } else {
        node.threads
    }
}

pub fn classify(ev: &CloneFailureEvent, facts: &Facts<'_>) -> Verdict {
    let verdict = |cause, evidence| Verdict { cause, evidence };
    match ev.errno {
        ENOMEM => {
            if let Some(e) = dead_pidns(ev) {
                return verdict(Cause::PidnsDead, e);
            }
            verdict(Cause::Memory, memory_evidence(ev, facts))
        }
        EAGAIN => {
            if let Some(e) = nproc_at_limit(ev) {
                return verdict(Cause::RlimitNproc, e);
            }
            if let Some(e) = threads_at_limit(ev, &facts.node) {
                return verdict(Cause::ThreadsMax, e);
            }
            if let Some(e) = pidns_full(ev, facts) {
                return verdict(Cause::PidMax, e);
            }
            if let Some(e) = pids_at_limit(ev, facts) {
                return verdict(Cause::PidsLimit, e);
            }
            verdict(Cause::Unknown, nearest_limits(ev, facts))
        }
        _ => verdict(
            Cause::Unknown,
            format!(
                "{} is not a resource limit; {}",
                errno_name(ev.errno),
                nearest_limits(ev, facts)
            ),
        ),
    }
}

fn dead_pidns(ev: &CloneFailureEvent) -> Option<String> {
    (ev.valid & valid::PIDNS != 0 && ev.pidns.innermost_alive == 0).then(|| {
        format!(
            "pid_ns={} init exited, the namespace accepts no new pids",
            ev.pidns.levels[0].inum
        )
    })
}

fn nproc_at_limit(ev: &CloneFailureEvent) -> Option<String> {
    let n = &ev.nproc;
    let limited = ev.valid & valid::NPROC != 0 && ev.uid != 0 && n.limit != u64::MAX;
    (limited && n.count >= 0 && n.count as u64 >= n.limit).then(|| {
        format!(
            "uid={} processes={} RLIMIT_NPROC={}",
            ev.uid, n.count, n.limit
        )
    })
}

fn threads_at_limit(ev: &CloneFailureEvent, node: &NodeTasks) -> Option<String> {
    let threads = node_threads(ev, node);
    (node.threads_max > 0 && threads + threads_slack(node.threads_max) >= node.threads_max).then(
        || {
            format!(
                "threads={threads} threads-max={} (node-wide)",
                node.threads_max
            )
        },
    )
}

/// One pid namespace level as `alloc_pid()` sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PidSpace {
    inum: u32,
    level: u32,
    allocated: u32,
    pid_max: i64,
    /// pid_max is the global `kernel.pid_max` (kernels before 6.14).
    global: bool,
    /// The lowest pid the allocator still hands out: 1, or RESERVED_PIDS once wrapped.
    pid_min: u32,
    /// Free pids in [pid_min, pid_max); `None` when it cannot be told (pids below
    /// RESERVED_PIDS uncounted).
    free: Option<i64>,
}

/// Every level of the new task's pid namespaces, innermost first (the order `alloc_pid()`
/// allocates in), with its free pids.
fn pid_spaces(ev: &CloneFailureEvent, facts: &Facts<'_>) -> Vec<PidSpace> {
    if ev.valid & valid::PIDNS == 0 {
        return Vec::new();
    }
    let own_max = ev.valid & valid::PIDNS_PID_MAX != 0;
    let cursor_known = ev.valid & valid::PIDNS_CURSOR != 0;
    let mut spaces = Vec::new();
    for (i, l) in ev.pidns.read_levels().iter().enumerate() {
        let level = ev.pidns.innermost_level.saturating_sub(i as u32);
        let global = !own_max || l.pid_max <= 0;
        let pid_max = match (global, ev.pidns.global_pid_max) {
            (false, _) => l.pid_max as i64,
            // The value the kernel had at the failure.
            (true, at_failure) if at_failure > 0 => at_failure as i64,
            (true, _) => facts.node.pid_max as i64,
        };
        let allocated = l.allocated as i64;
        // Without the cursor, assume the allocator has wrapped (every busy namespace has).
        let wrapped = !cursor_known || l.cursor > RESERVED_PIDS;
        let (pid_min, free) = if !wrapped {
            (1, Some(pid_max - 1 - allocated))
        } else {
            let capacity = pid_max - RESERVED_PIDS as i64;
            // Every pid below RESERVED_PIDS in use makes room above it: only when the space
            // looks full without them is it worth counting them.
            let free = if capacity - allocated > 0 {
                Some(capacity - allocated)
            } else {
                (facts.low_pids)(l.inum, level)
                    .map(|low| capacity - (allocated - (low as i64).min(allocated)))
            };
            (RESERVED_PIDS, free)
        };
        spaces.push(PidSpace {
            inum: l.inum,
            level,
            allocated: l.allocated,
            pid_max,
            global,
            pid_min,
            free,
        });
    }
    spaces
}

fn pidns_full(ev: &CloneFailureEvent, facts: &Facts<'_>) -> Option<String> {
    let s = pid_spaces(ev, facts)
        .into_iter()
        .find(|s| s.free.is_some_and(|f| f <= 0))?;
    Some(format!(
        "pid_ns={} level={} pids={} pid_max={}{}: no free pid in [{}, {})",
        s.inum,
        s.level,
        s.allocated,
        s.pid_max,
        if s.global { " (global)" } else { "" },
        s.pid_min,
        s.pid_max
    ))
}

fn pids_at_limit(ev: &CloneFailureEvent, facts: &Facts<'_>) -> Option<String> {
    let p = &ev.pids;
    (ev.valid & valid::PIDS != 0 && p.limit != i64::MAX && p.current >= p.limit).then(|| {
        format!(
            "pids.current={} pids.max={} cgroup={}",
            p.current,
            p.limit,
            facts.pids_cgroup.unwrap_or("?")
        )
    })
}

fn memory_evidence(ev: &CloneFailureEvent, facts: &Facts<'_>) -> String {
    if ev.valid & valid::MEMORY == 0 {
        return "no memory cgroup snapshot; node memory or kernel allocation failure".to_owned();
    }
    let m = &ev.memory;
    let bytes = |pages: i64| (pages.max(0) as u64).saturating_mul(facts.page_size);
    let max = if m.limit == i64::MAX {
        "max".to_owned()
    } else {
        bytes(m.limit).to_string()
    };
    format!(
        "memory.usage={} memory.max={} failcnt={} cgroup={}",
        bytes(m.current),
        max,
        m.failcnt,
        facts.memory_cgroup.unwrap_or("?")
    )
}

/// For an unexplained failure: the closest of each limit, so a person can judge.
fn nearest_limits(ev: &CloneFailureEvent, facts: &Facts<'_>) -> String {
    let mut parts = Vec::new();
    if ev.valid & valid::PIDS != 0 && ev.pids.limit != i64::MAX {
        parts.push(format!(
            "pids.current={} pids.max={}",
            ev.pids.current, ev.pids.limit
        ));
    }
    // The tightest level.
    if let Some(s) = pid_spaces(ev, facts)
        .into_iter()
        .filter_map(|s| Some((s.free?, s)))
        .min_by_key(|(free, _)| *free)
        .map(|(_, s)| s)
    {
        parts.push(format!(
            "pid_ns={} free={} pid_max={}",
            s.inum,
            s.free.unwrap_or_default(),
            s.pid_max
        ));
    }
    if ev.valid & valid::NPROC != 0 && ev.nproc.limit != u64::MAX {
        parts.push(format!(
            "processes={} RLIMIT_NPROC={}",
            ev.nproc.count, ev.nproc.limit
        ));
    }
    parts.push(format!(
        "threads={} threads-max={}",
        node_threads(ev, &facts.node),
        facts.node.threads_max
    ));
    format!("no limit reached: {}", parts.join(" "))
}

/// Symbolic name of the errnos task creation returns; `E<n>` for others.
pub fn errno_name(errno: u32) -> String {
    let name = match errno as i32 {
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EINVAL => "EINVAL",
        libc::EPERM => "EPERM",
        libc::ENOSPC => "ENOSPC",
        libc::EUSERS => "EUSERS",
        libc::EEXIST => "EEXIST",
        libc::EBUSY => "EBUSY",
        libc::EFAULT => "EFAULT",
        libc::EINTR => "EINTR",
        libc::ENOSYS => "ENOSYS",
        libc::E2BIG => "E2BIG",
        libc::EBADF => "EBADF",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ECHILD => "ECHILD",
        _ => return format!("E{errno}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use probe_common::clone::{CgroupCounter, NprocCounter, PidNsCounter, PidNsLevel};

    use super::*;

    fn event(errno: u32) -> CloneFailureEvent {
        CloneFailureEvent {
            ktime_ns: 0,
            cgroup_id: 1,
            clone_flags: 0,
            pid: 100,
            tid: 100,
            ppid: 1,
            uid: 1000,
            syscall: 0,
            errno,
            valid: valid::PIDS
                | valid::PIDNS
                | valid::PIDNS_PID_MAX
                | valid::PIDNS_CURSOR
                | valid::NPROC
                | valid::MEMORY,
            state_age_us: 0,
            own_pids_ino: 0,
            comm: [0; 16],
            pids: CgroupCounter {
                cgroup_ino: 7,
                current: 10,
                limit: i64::MAX,
                ..Default::default()
            },
            memory: CgroupCounter {
                cgroup_ino: 8,
                current: 100,
                limit: i64::MAX,
                ..Default::default()
            },
            pidns: PidNsCounter {
                levels: [
                    PidNsLevel {
                        inum: 4026531836,
                        allocated: 200,
                        pid_max: 4194304,
                        cursor: 5000,
                    },
                    PidNsLevel::default(),
                    PidNsLevel::default(),
                    PidNsLevel::default(),
                    PidNsLevel::default(),
                    PidNsLevel::default(),
                ],
                depth: 1,
                innermost_level: 0,
                innermost_alive: 1,
                node_tasks: 0,
                global_pid_max: 0,
                _pad: 0,
            },
            nproc: NprocCounter {
                count: 20,
                limit: u64::MAX,
            },
        }
    }

    /// 100 pids below RESERVED_PIDS in use in every namespace.
    fn low_pids(_inum: u32, _level: u32) -> Option<u32> {
        Some(100)
    }

    fn facts() -> Facts<'static> {
        Facts {
            node: NodeTasks {
                threads: 300,
                threads_max: 192_730,
                pid_max: 4_194_304,
            },
            low_pids: &low_pids,
            pids_cgroup: Some("/kubepods/pod1"),
            memory_cgroup: Some("/kubepods/pod1"),
            page_size: 4096,
        }
    }

    #[test]
    fn pids_limit() {
        let mut ev = event(EAGAIN);
        ev.pids.current = 512;
        ev.pids.limit = 512;
        let v = classify(&ev, &facts());
        assert_eq!(v.cause, Cause::PidsLimit);
        assert_eq!(
            v.evidence,
            "pids.current=512 pids.max=512 cgroup=/kubepods/pod1"
        );
    }

    /// A pod's namespace (level 1, innermost) inside the node's.
    fn pod_namespace(ev: &mut CloneFailureEvent, pod: PidNsLevel, node: PidNsLevel) {
        ev.pidns.levels[0] = pod;
        ev.pidns.levels[1] = node;
        ev.pidns.depth = 2;
        ev.pidns.innermost_level = 1;
    }

    #[test]
    fn pid_max_of_a_fresh_namespace_before_its_cursor_wraps() {
        // A new namespace with pid_max=301: pids 1..300 taken, the cursor at 301.
        let mut ev = event(EAGAIN);
        let node = ev.pidns.levels[0];
        let pod = PidNsLevel {
            inum: 5,
            allocated: 300,
            pid_max: 301,
            cursor: 301,
        };
        pod_namespace(&mut ev, pod, node);
        let f = Facts {
            low_pids: &|_, _| Some(299),
            ..facts()
        };
        let v = classify(&ev, &f);
        assert_eq!(v.cause, Cause::PidMax);
        assert_eq!(
            v.evidence,
            "pid_ns=5 level=1 pids=300 pid_max=301: no free pid in [300, 301)"
        );
        // Before the cursor passes RESERVED_PIDS every pid from 1 is available.
        ev.pidns.levels[0].cursor = 200;
        ev.pidns.levels[0].allocated = 199;
        ev.pidns.levels[0].pid_max = 200;
        let v = classify(&ev, &f);
        assert_eq!(v.cause, Cause::PidMax);
        assert!(
            v.evidence.ends_with("no free pid in [1, 200)"),
            "{}",
            v.evidence
        );
    }

    #[test]
    fn global_pid_max_follows_the_allocator_not_a_count() {
        // Linux 6.12, kernel.pid_max=301 on the node: 187 tasks, 186 of them below 300 and
        // the only allocatable pid, 300, taken. A count against pid_max says 113 free.
        let mut ev = event(EAGAIN);
        ev.valid &= !valid::PIDNS_PID_MAX;
        let node = PidNsLevel {
            inum: 4026531836,
            allocated: 187,
            pid_max: -1,
            cursor: 301,
        };
        let pod = PidNsLevel {
            inum: 4026532200,
            allocated: 3,
            pid_max: -1,
            cursor: 4,
        };
        pod_namespace(&mut ev, pod, node);
        ev.pidns.global_pid_max = 301;
        let f = Facts {
            low_pids: &|inum, level| (inum == 4026531836 && level == 0).then_some(186),
            ..facts()
        };
        let v = classify(&ev, &f);
        assert_eq!(v.cause, Cause::PidMax);
        assert_eq!(
            v.evidence,
            "pid_ns=4026531836 level=0 pids=187 pid_max=301 (global): no free pid in [300, 301)"
        );
        // One task fewer, all 186 below 300: pid 300 is free, so it is not pid_max.
        ev.pidns.levels[1].allocated = 186;
        let v = classify(&ev, &f);
        assert_eq!(v.cause, Cause::Unknown, "{}", v.evidence);
        assert!(
            v.evidence.contains("pid_ns=4026531836 free=1 pid_max=301"),
            "{}",
            v.evidence
        );
        // Uncounted low pids: the verdict is not guessed.
        ev.pidns.levels[1].allocated = 187;
        let f = Facts {
            low_pids: &|_, _| None,
            ..f
        };
        assert_eq!(classify(&ev, &f).cause, Cause::Unknown);
    }

    #[test]
    fn a_roomy_namespace_needs_no_count_of_low_pids() {
        let ev = event(EAGAIN);
        let f = Facts {
            low_pids: &|_, _| panic!("counted low pids for a namespace with room"),
            ..facts()
        };
        assert_eq!(classify(&ev, &f).cause, Cause::Unknown);
    }

    #[test]
    fn dead_pid_namespace_is_not_memory() {
        let mut ev = event(ENOMEM);
        ev.pidns.innermost_alive = 0;
        assert_eq!(classify(&ev, &facts()).cause, Cause::PidnsDead);
    }

    #[test]
    fn enomem_with_a_live_namespace_is_memory() {
        let mut ev = event(ENOMEM);
        ev.memory.current = 256;
        ev.memory.limit = 256;
        ev.memory.failcnt = 3;
        let v = classify(&ev, &facts());
        assert_eq!(v.cause, Cause::Memory);
        assert_eq!(
            v.evidence,
            "memory.usage=1048576 memory.max=1048576 failcnt=3 cgroup=/kubepods/pod1"
        );
    }

    #[test]
    fn rlimit_nproc_only_for_non_root() {
        let mut ev = event(EAGAIN);
        ev.nproc = NprocCounter { count: 5, limit: 5 };
        let v = classify(&ev, &facts());
        assert_eq!(v.cause, Cause::RlimitNproc);
        assert_eq!(v.evidence, "uid=1000 processes=5 RLIMIT_NPROC=5");
        ev.uid = 0;
        assert_eq!(classify(&ev, &facts()).cause, Cause::Unknown);
    }

    #[test]
    fn threads_max_from_node_counts() {
        let ev = event(EAGAIN);
        let mut f = facts();
        f.node.threads = 192_729;
        let v = classify(&ev, &f);
        assert_eq!(v.cause, Cause::ThreadsMax);
        assert_eq!(v.evidence, "threads=192729 threads-max=192730 (node-wide)");
        // Well below the limit: not threads-max.
        f.node.threads = 150_000;
        assert_eq!(classify(&ev, &f).cause, Cause::Unknown);
        // A tiny threads-max still needs the count near it.
        f.node = NodeTasks {
            threads: 10,
            threads_max: 100,
            pid_max: 32768,
        };
        assert_eq!(classify(&ev, &f).cause, Cause::Unknown);
        f.node.threads = 95;
        assert_eq!(classify(&ev, &f).cause, Cause::ThreadsMax);
    }

    #[test]
    fn threads_max_prefers_the_kernel_snapshot_over_a_stale_proc_read() {
        // At the failure the node had 128 tasks; by the time /proc was read, 112.
        let mut ev = event(EAGAIN);
        ev.pidns.node_tasks = 128;
        let mut f = facts();
        f.node = NodeTasks {
            threads: 112,
            threads_max: 128,
            pid_max: 32768,
        };
        let v = classify(&ev, &f);
        assert_eq!(v.cause, Cause::ThreadsMax);
        assert_eq!(v.evidence, "threads=128 threads-max=128 (node-wide)");
        // And a snapshot far from the limit is not overridden by /proc.
        ev.pidns.node_tasks = 50;
        f.node.threads = 127;
        assert_eq!(classify(&ev, &f).cause, Cause::Unknown);
    }

    #[test]
    fn kernel_order_wins_when_two_limits_are_reached() {
        // RLIMIT_NPROC is checked before the pids cgroup in copy_process().
        let mut ev = event(EAGAIN);
        ev.nproc = NprocCounter { count: 5, limit: 5 };
        ev.pids.current = 5;
        ev.pids.limit = 5;
        assert_eq!(classify(&ev, &facts()).cause, Cause::RlimitNproc);
        // pid allocation comes before the pids cgroup charge.
        let mut ev = event(EAGAIN);
        ev.pids.current = 5;
        ev.pids.limit = 5;
        ev.pidns.levels[0].allocated = 300;
        ev.pidns.levels[0].pid_max = 301;
        ev.pidns.levels[0].cursor = 301;
        let f = Facts {
            low_pids: &|_, _| Some(299),
            ..facts()
        };
        assert_eq!(classify(&ev, &f).cause, Cause::PidMax);
    }

    #[test]
    fn unlimited_and_missing_snapshots_are_unknown_with_evidence() {
        let mut ev = event(EAGAIN);
        ev.valid = 0;
        let v = classify(&ev, &facts());
        assert_eq!(v.cause, Cause::Unknown);
        assert!(v.evidence.starts_with("no limit reached"), "{}", v.evidence);
        let v = classify(&event(libc::EINVAL as u32), &facts());
        assert_eq!(v.cause, Cause::Unknown);
        assert!(
            v.evidence.starts_with("EINVAL is not a resource limit"),
            "{}",
            v.evidence
        );
    }

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(11), "EAGAIN");
        assert_eq!(errno_name(12), "ENOMEM");
        assert_eq!(errno_name(4095), "E4095");
    }
}
