//! Task creation and exit per cgroup: counters the kernel keeps in a per-CPU hash map keyed
//! by cgroup v2 id, so the success path costs one map update and no event.

/// Per-CPU counters of one cgroup since faultline attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskCounts {
    /// Tasks created with CLONE_THREAD.
    pub threads: u64,
    /// Tasks created without CLONE_THREAD (fork, vfork, clone of a process).
    pub processes: u64,
    /// Tasks (threads or processes) that exited.
    pub exited: u64,
}

/// One non-root uid's tasks as the kernel counts them against RLIMIT_NPROC (node-wide, threads
/// included), and the soft limit of the task that last created or ended one: written at each
/// of them, so a uid's count is the kernel's own however many processes the node runs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UidTasks {
    pub tasks: i64,
    pub limit: u64,
}

/// Most uids kept; past this, a new uid's tasks are counted in [`TaskStat::UidMapFull`].
pub const MAX_UIDS: u32 = 4096;

/// Most cgroups counted at once; a node has a few thousand. Past this, creations in new
/// cgroups are counted in [`TaskStat::MapFull`] instead.
pub const MAX_TASK_CGROUPS: u32 = 16384;

crate::counters! {
    /// Index of the counters kept per CPU in the `TASK_STATS` array.
    pub enum TaskStat, pub struct TaskStats, TASK_STAT_COUNT, "TASK_STATS" {
        /// A task was created or exited in a cgroup the full map had no room for.
        MapFull = 0 => map_full,
        /// cgroup v2 directories removed (their counters are dropped with them).
        CgroupsRemoved = 1 => cgroups_removed,
        /// A non-root uid created or ended a task while the full `TASK_UIDS` map had no room
        /// for it: its count comes from its pods' processes instead.
        UidMapFull = 2 => uid_map_full,
    }
}

/// `root` of the `cgroup:*` tracepoints for the cgroup v2 hierarchy.
pub const CGROUP_V2_ROOT: i32 = 0;

/// The per-CPU hash of `TaskCounts` by cgroup v2 id.
pub const COUNTS: &str = "TASK_COUNTS";
/// The hash of `UidTasks` by uid.
pub const UIDS: &str = "TASK_UIDS";

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)] struct of u64s: no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::TaskCounts {}
    // SAFETY: #[repr(C)] struct of an i64 and a u64: no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::UidTasks {}
}

crate::kernel_abi_sizes! {
    TaskCounts => 24,
    UidTasks => 16,
}
