//! Task creation and exit per cgroup: the raw tracepoints `task_newtask`, `sched_process_exit`
//! and `cgroup_rmdir`. Raw tracepoints attach through a bpf link (no `perf_event_open`, which
//! Debian's kernels refuse without CAP_SYS_ADMIN at perf_event_paranoid 3) and are handed the
//! kernel's own arguments, without the record a perf tracepoint builds first. Counts only, in a per-CPU hash keyed by cgroup v2 id: no event on
//! the hot path. A removed cgroup's counters are dropped with it, so the map tracks live
//! cgroups only; when it is full, the miss is counted, never silent.

use aya_ebpf::{
    helpers::{
        bpf_get_current_uid_gid,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_task},
    },
    macros::{map, raw_tracepoint},
    maps::{HashMap, PerCpuArray, PerCpuHashMap},
    programs::RawTracePointContext,
};
use probe_common::{
    clone::{CLONE_THREAD, NprocCounter},
    offsets::KernelOffsets,
    tasks::{
        CGROUP_V2_ROOT, MAX_TASK_CGROUPS, MAX_UIDS, TASK_STAT_COUNT, TaskCounts, TaskStat, UidTasks,
    },
};

use crate::kernel::{deref, get_or_insert, global_field, read};

macro_rules! koff {
    ($field:ident) => {
        global_field!(crate::clone::CLONE_KERNEL_OFFSETS, KernelOffsets, $field)
    };
}

/// Preallocated (an insert never waits on an allocator), and sized by the loader to the
/// node's CPU count: entries x value x CPUs stay within a fixed budget on any node.
#[map]
static TASK_COUNTS: PerCpuHashMap<u64, TaskCounts> =
    PerCpuHashMap::with_max_entries(MAX_TASK_CGROUPS, 0);

/// Each non-root uid's task count as the kernel keeps it for RLIMIT_NPROC, written when one of
/// its tasks is created or ends: userspace reads a uid's count here instead of walking /proc.
#[map]
static TASK_UIDS: HashMap<u32, UidTasks> = HashMap::with_max_entries(MAX_UIDS, 0);

/// Counters indexed by [`TaskStat`].
#[map]
static TASK_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(TASK_STAT_COUNT, 0);

/// `task_newtask(struct task_struct *task, unsigned long clone_flags)`.
#[raw_tracepoint(tracepoint = "task_newtask")]
pub fn task_newtask(ctx: RawTracePointContext) -> u32 {
    let flags: u64 = ctx.arg(1);
    // Runs in the parent: the child starts in the parent's cgroup, and is already counted
    // under its uid.
    update(|c| {
        if flags & CLONE_THREAD != 0 {
            c.threads += 1;
        } else {
            c.processes += 1;
        }
    });
    note_uid();
    0
}

/// `sched_process_exit(struct task_struct *p)`.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn task_exit(_ctx: RawTracePointContext) -> u32 {
    // Runs in the exiting task, still in its cgroup (and still counted under its uid: the
    // count drops when it is reaped, so this one lags by the tasks ending now).
    update(|c| c.exited += 1);
    note_uid();
    0
}

/// The current task's uid's count and limit into `TASK_UIDS`, for a non-root uid (root is
/// exempt from RLIMIT_NPROC, and creates most tasks on a node: it costs nothing here).
#[inline(always)]
fn note_uid() {
    let uid = bpf_get_current_uid_gid() as u32;
    if uid == 0 {
        return;
    }
    // SAFETY: no arguments; the task is read through probe reads only.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let mut nproc = NprocCounter::default();
    if !crate::clone::read_nproc(task, &mut nproc) {
        return;
    }
    let now = UidTasks {
        tasks: nproc.count,
        limit: nproc.limit,
    };
    match TASK_UIDS.get_ptr_mut(&uid) {
        // SAFETY: a live entry of this map; a racing writer at worst writes its own reading.
        Some(entry) => unsafe { *entry = now },
        None => {
            if TASK_UIDS.insert(&uid, &now, 0).is_err() {
                bump(TaskStat::UidMapFull);
            }
        }
    }
}

/// `cgroup_rmdir(struct cgroup *cgrp, const char *path)`: the hierarchy is
/// `cgrp->root->hierarchy_id`, the id `cgrp->kn->id` (what the perf tracepoint records).
#[raw_tracepoint(tracepoint = "cgroup_rmdir")]
pub fn task_cgroup_rmdir(ctx: RawTracePointContext) -> u32 {
    let cgrp: *const u8 = ctx.arg(0);
    let root = deref(cgrp, koff!(cgroup_root))
        .and_then(|root| read::<i32>(root, koff!(cgroup_root_hierarchy_id)));
    let id = deref(cgrp, koff!(cgroup_kn)).and_then(|kn| read::<u64>(kn, koff!(kernfs_node_id)));
    let (Some(root), Some(id)) = (root, id) else {
        return 0;
    };
    if root == CGROUP_V2_ROOT {
        crate::dns::forget_cgroup(id);
        if TASK_COUNTS.remove(&id).is_ok() {
            bump(TaskStat::CgroupsRemoved);
        }
    }
    0
}

#[inline(always)]
fn update(f: impl Fn(&mut TaskCounts)) {
    // SAFETY: no arguments.
    let id = unsafe { bpf_get_current_cgroup_id() };
    let Some(counts) = get_or_insert(&TASK_COUNTS, &id) else {
        bump(TaskStat::MapFull);
        return;
    };
    // SAFETY: a per-CPU value: only this CPU writes it, and preemption is off in the program.
    f(unsafe { &mut *counts });
}

#[inline(always)]
fn bump(stat: TaskStat) {
    crate::kernel::bump(&TASK_STATS, stat as u32);
}
