//! Task creation and exit per cgroup: `task:task_newtask`, `sched:sched_process_exit` and
//! `cgroup:cgroup_rmdir`. Counts only, in a per-CPU hash keyed by cgroup v2 id: no event on
//! the hot path. A removed cgroup's counters are dropped with it, so the map tracks live
//! cgroups only; when it is full, the miss is counted, never silent.

use aya_ebpf::{
    helpers::generated::bpf_get_current_cgroup_id,
    macros::{map, tracepoint},
    maps::{PerCpuArray, PerCpuHashMap},
    programs::TracePointContext,
};
use probe_common::{
    clone::CLONE_THREAD,
    tasks::{CGROUP_V2_ROOT, MAX_TASK_CGROUPS, TASK_STAT_COUNT, TaskCounts, TaskStat},
};

use crate::kernel::{get_or_insert, tpoff};

/// Preallocated (an insert never waits on an allocator), and sized by the loader to the
/// node's CPU count: entries x value x CPUs stay within a fixed budget on any node.
#[map]
static TASK_COUNTS: PerCpuHashMap<u64, TaskCounts> =
    PerCpuHashMap::with_max_entries(MAX_TASK_CGROUPS, 0);

/// Counters indexed by [`TaskStat`].
#[map]
static TASK_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(TASK_STAT_COUNT, 0);

#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    let flags = crate::kernel::tp_u64(&ctx, tpoff!(newtask_clone_flags)).unwrap_or(0);
    // Runs in the parent: the child starts in the parent's cgroup.
    update(|c| {
        if flags & CLONE_THREAD != 0 {
            c.threads += 1;
        } else {
            c.processes += 1;
        }
    });
    0
}

#[tracepoint]
pub fn task_exit(_ctx: TracePointContext) -> u32 {
    // Runs in the exiting task, still in its cgroup.
    update(|c| c.exited += 1);
    0
}

#[tracepoint]
pub fn task_cgroup_rmdir(ctx: TracePointContext) -> u32 {
    let (root_off, id_off) = (tpoff!(rmdir_root) as usize, tpoff!(rmdir_id) as usize);
    // SAFETY: offsets from this tracepoint's format file.
    let (Ok(root), Ok(id)) = (unsafe { ctx.read_at::<i32>(root_off) }, unsafe {
        ctx.read_at::<u64>(id_off)
    }) else {
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
