//! Failed task creation (clone, clone3, fork, vfork): the event the kernel side emits and the
//! counters it keeps.

/// Which syscall failed. Stored as `u32` in [`CloneFailureEvent::syscall`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syscall {
    Clone = 0,
    Clone3 = 1,
    Fork = 2,
    Vfork = 3,
}

impl Syscall {
    pub const ALL: [Syscall; 4] = [
        Syscall::Clone,
        Syscall::Clone3,
        Syscall::Fork,
        Syscall::Vfork,
    ];

    pub fn from_u32(v: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|s| *s as u32 == v)
    }

    /// The syscall's name, as in `syscalls:sys_enter_<name>`.
    pub fn name(self) -> &'static str {
        match self {
            Syscall::Clone => "clone",
            Syscall::Clone3 => "clone3",
            Syscall::Fork => "fork",
            Syscall::Vfork => "vfork",
        }
    }
}

/// `CLONE_THREAD` from the kernel's UAPI: the new task shares the caller's thread group.
pub const CLONE_THREAD: u64 = 0x0001_0000;

/// Bits of [`CloneFailureEvent::valid`]: which kernel snapshots could be read.
pub mod valid {
    /// `pids` holds the pids cgroup nearest to its limit.
    pub const PIDS: u32 = 1 << 0;
    /// `pidns` holds the new task's pid namespaces.
    pub const PIDNS: u32 = 1 << 1;
    /// Each level's `pid_max` was read from the namespace (kernels >= 6.14 have per-namespace
    /// pid_max; before, it is one global value).
    pub const PIDNS_PID_MAX: u32 = 1 << 2;
    /// `nproc` holds the user's process count and RLIMIT_NPROC.
    pub const NPROC: u32 = 1 << 3;
    /// `memory` holds the memory cgroup nearest to its limit.
    pub const MEMORY: u32 = 1 << 4;
    /// The clone flags were read from the syscall's saved user registers.
    pub const FLAGS: u32 = 1 << 5;
    /// Each level's allocator cursor was read (`pidns.levels[i].cursor`).
    pub const PIDNS_CURSOR: u32 = 1 << 6;
}

/// In a storm of refusals of one process (cgroup, user, errno), the kernel state (cgroups, pid
/// namespaces, RLIMIT_NPROC) is read at most this often and copied into the refusals between:
/// reading it was about half of a refusal's eBPF time (2.4-2.7 µs, 1.3-1.4 µs with the copies).
pub const BURST_NS: u64 = 100_000_000;

/// A cgroup level (pids or memory) with its usage and limit, read when the syscall failed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupCounter {
    /// kernfs id of the cgroup directory (its inode number in that controller's hierarchy).
    pub cgroup_ino: u64,
    /// pids: tasks charged; memory: pages charged.
    pub current: i64,
    /// pids: `pids.max`; memory: limit in pages. `i64::MAX` when unlimited.
    pub limit: i64,
    /// memory only: the page counter's failcnt.
    pub failcnt: u64,
    /// How many levels above the task's own cgroup this one is (0 = the task's cgroup).
    pub depth: u32,
    pub _pad: u32,
}

/// How many pid namespace levels a snapshot holds, innermost first. Pods sit at level 1,
/// nested containers a level or two deeper; deeper levels are not read.
pub const MAX_PIDNS_LEVELS: usize = 6;

/// One pid namespace the new task's pid would be allocated in, read when the syscall failed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PidNsLevel {
    /// Namespace inode number, as in `/proc/<pid>/ns/pid`.
    pub inum: u32,
    /// pids allocated in it (without the PIDNS_ADDING bit).
    pub allocated: u32,
    /// Its own pid_max (kernels >= 6.14), or -1 where pid_max is one global value.
    pub pid_max: i32,
    /// The allocator's cursor (`idr.idr_next`): past `RESERVED_PIDS` (300), new pids come from
    /// [300, pid_max) only. 0 when unknown.
    pub cursor: u32,
}

/// The pid namespaces of the new task, from the innermost (`pid_ns_for_children`) outwards.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PidNsCounter {
    pub levels: [PidNsLevel; MAX_PIDNS_LEVELS],
    /// How many of `levels` were read.
    pub depth: u32,
    /// Nesting level of the innermost namespace (0 = the initial namespace).
    pub innermost_level: u32,
    /// 0 when the innermost namespace no longer accepts new pids (its init exited).
    pub innermost_alive: u32,
    /// pids allocated in the initial namespace: every task on the node, the live count that
    /// `kernel.threads-max` limits (0 when the walk did not reach it).
    pub node_tasks: u32,
    /// The global `kernel.pid_max` at the failure (kernels before 6.14; 0 when unread).
    pub global_pid_max: i32,
    pub _pad: u32,
}

impl PidNsCounter {
    /// The levels read, innermost first.
    pub fn read_levels(&self) -> &[PidNsLevel] {
        &self.levels[..(self.depth as usize).min(MAX_PIDNS_LEVELS)]
    }
}

/// The calling user's process count against RLIMIT_NPROC.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NprocCounter {
    pub count: i64,
    /// `rlim_cur` of RLIMIT_NPROC (`u64::MAX` = unlimited).
    pub limit: u64,
}

/// One failed clone/clone3/fork/vfork, with the kernel state that decides its cause.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CloneFailureEvent {
    /// `bpf_ktime_get_ns()` at syscall exit (CLOCK_MONOTONIC).
    pub ktime_ns: u64,
    /// cgroup v2 id of the caller (the inode of its cgroup2 directory).
    pub cgroup_id: u64,
    pub clone_flags: u64,
    /// Thread group id (what userspace calls the pid), in the initial pid namespace.
    pub pid: u32,
    pub tid: u32,
    /// Thread group id of the real parent.
    pub ppid: u32,
    pub uid: u32,
    /// [`Syscall`] as `u32`.
    pub syscall: u32,
    /// Positive errno (11 = EAGAIN, 12 = ENOMEM, ...).
    pub errno: u32,
    /// Bits from [`valid`].
    pub valid: u32,
    /// 0 when the kernel state below was read at this failure; else how many microseconds
    /// earlier it was read, at a refusal of the same process, cgroup, user and errno (a burst
    /// reads it at most once per [`BURST_NS`]).
    pub state_age_us: u32,
    /// Inode of the caller's own pids cgroup (v1 or v2; 0 if unknown): attributes the task on
    /// hosts whose pods live in v1 hierarchies only.
    pub own_pids_ino: u64,
    pub comm: [u8; 16],
    pub pids: CgroupCounter,
    pub memory: CgroupCounter,
    pub pidns: PidNsCounter,
    pub nproc: NprocCounter,
}

impl CloneFailureEvent {
    pub fn is_thread(&self) -> bool {
        self.clone_flags & CLONE_THREAD != 0
    }
}

crate::counters! {
    /// Index of the counters kept per CPU in the `CLONE_STATS` array.
    pub enum CloneStat, pub struct CloneStats, CLONE_STAT_COUNT, "CLONE_STATS" {
        /// Failures seen (before any userspace filter).
        Failures = 0 => failures,
        /// Failures whose event did not fit in the ring buffer: lost, and reported as such.
        RingbufFull = 1 => lost,
        /// Syscall exits without a matching entry (faultline attached mid-call): flags unknown.
        MissingEntry = 2 => missing_entry,
        /// Failures that carry the kernel state read at an earlier one of their burst.
        StateReused = 3 => state_reused,
    }
}

/// The ring buffer of `CloneFailureEvent`s.
pub const EVENTS: &str = "CLONE_EVENTS";

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)] plain data, valid for any bit pattern (padding is never read).
    unsafe impl aya::Pod for super::CloneFailureEvent {}
}

crate::kernel_abi_sizes! {
    CgroupCounter => 40,
    PidNsLevel => 16,
    PidNsCounter => 120,
    NprocCounter => 16,
    CloneFailureEvent => 296,
}
