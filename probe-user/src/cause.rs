//! Why a task could not be created: decided from the kernel state captured at the failure,
//! never from the errno alone (EAGAIN covers five different limits, and old kernels said
//! ENOMEM for a full pid space).
//!
//! The checks run in the order `copy_process()` applies the limits, so when two limits are
//! reached at once the one the kernel hit first is reported.

use probe_common::clone::{CloneFailureEvent, valid};
use serde::Serialize;

use crate::node::NodeTasks;

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

pub fn classify(ev: &CloneFailureEvent, facts: &Facts) -> Verdict {
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
            if let Some(e) = pidns_full(ev, &facts.node) {
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
            ev.pidns.innermost_inum
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

/// Free pids left in the tightest pid namespace, with the pid_max that applies to it.
fn pidns_free(ev: &CloneFailureEvent, node: &NodeTasks) -> Option<(i64, i64)> {
    if ev.valid & valid::PIDNS == 0 {
        return None;
    }
    let pid_max = if ev.valid & valid::PIDNS_PID_MAX != 0 {
        ev.pidns.pid_max as i64
    } else {
        // Before Linux 6.14 pid_max was one global value.
        node.pid_max as i64
    };
    Some((pid_max - 1 - ev.pidns.allocated as i64, pid_max))
}

fn pidns_full(ev: &CloneFailureEvent, node: &NodeTasks) -> Option<String> {
    let (free, pid_max) = pidns_free(ev, node)?;
    (free <= 0).then(|| {
        format!(
            "pid_ns={} level={} pids={} pid_max={}",
            ev.pidns.inum, ev.pidns.level, ev.pidns.allocated, pid_max
        )
    })
}

fn pids_at_limit(ev: &CloneFailureEvent, facts: &Facts) -> Option<String> {
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

fn memory_evidence(ev: &CloneFailureEvent, facts: &Facts) -> String {
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
fn nearest_limits(ev: &CloneFailureEvent, facts: &Facts) -> String {
    let mut parts = Vec::new();
    if ev.valid & valid::PIDS != 0 && ev.pids.limit != i64::MAX {
        parts.push(format!(
            "pids.current={} pids.max={}",
            ev.pids.current, ev.pids.limit
        ));
    }
    if let Some((free, pid_max)) = pidns_free(ev, &facts.node) {
        parts.push(format!("pid_ns free={free} pid_max={pid_max}"));
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
    use probe_common::clone::{CgroupCounter, NprocCounter, PidNsCounter};

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
            valid: valid::PIDS | valid::PIDNS | valid::PIDNS_PID_MAX | valid::NPROC | valid::MEMORY,
            _pad: 0,
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
                inum: 4026531836,
                level: 0,
                allocated: 200,
                pid_max: 4194304,
                innermost_alive: 1,
                innermost_inum: 4026531836,
                node_tasks: 0,
                _pad: 0,
            },
            nproc: NprocCounter {
                count: 20,
                limit: u64::MAX,
            },
        }
    }

    fn facts() -> Facts<'static> {
        Facts {
            node: NodeTasks {
                threads: 300,
                threads_max: 192_730,
                pid_max: 4_194_304,
            },
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

    #[test]
    fn pid_max_per_namespace_and_global() {
        let mut ev = event(EAGAIN);
        ev.pidns = PidNsCounter {
            inum: 5,
            level: 1,
            allocated: 300,
            pid_max: 301,
            innermost_alive: 1,
            innermost_inum: 5,
            ..Default::default()
        };
        let v = classify(&ev, &facts());
        assert_eq!(v.cause, Cause::PidMax);
        assert_eq!(v.evidence, "pid_ns=5 level=1 pids=300 pid_max=301");

        // Old kernel: no per-namespace pid_max, the global one applies.
        ev.valid &= !valid::PIDNS_PID_MAX;
        ev.pidns.pid_max = -1;
        ev.pidns.allocated = 32767;
        let mut f = facts();
        f.node.pid_max = 32768;
        assert_eq!(classify(&ev, &f).cause, Cause::PidMax);
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
        ev.pidns.allocated = 300;
        ev.pidns.pid_max = 301;
        assert_eq!(classify(&ev, &facts()).cause, Cause::PidMax);
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
