//! Failed task creation: `syscalls:sys_exit_{clone,clone3,fork,vfork}`, or where those perf
//! tracepoints cannot be attached (Debian's kernels refuse `perf_event_open` without
//! CAP_SYS_ADMIN at perf_event_paranoid 3), the raw tracepoint `sys_exit` (a bpf link) filtered
//! to the same four syscalls: it runs on every syscall's exit, and returns at once on success.
//!
//! The exit programs do nothing on success. On failure they read the clone flags from the
//! syscall's first argument in the task's saved user registers (fork and vfork have fixed
//! flags), and the kernel state that decides the cause *at that moment* (pids cgroup, pid
//! namespace, RLIMIT_NPROC, memory cgroup), and send one `CloneFailureEvent` through the
//! `CLONE_EVENTS` ring buffer. In a storm that state is read once per burst: a refusal of the
//! same process, cgroup, user and errno within [`BURST_NS`] of the last read carries a copy of
//! that read (from `CLONE_BURSTS`) and its age, which halves a refusal's cost (measured). No
//! `sys_enter` tracepoint: enabling one made every thread creation on the node cost ~7 µs more
//! (measured), while the exit side costs nothing on the success path.

use aya_ebpf::{
    EbpfContext, Global,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_probe_read_user,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_current_task, bpf_get_current_task_btf,
            bpf_ktime_get_ns, bpf_probe_read_kernel as probe_read_raw, bpf_task_pt_regs,
        },
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
};
use aya_log_ebpf::warn;
use probe_common::{
    clone::{
        BURST_NS, CLONE_STAT_COUNT, CgroupCounter, CloneFailureEvent, CloneStat, MAX_PIDNS_LEVELS,
        NprocCounter, PidNsCounter, PidNsLevel, Syscall, valid,
    },
    offsets::{KernelOffsets, MISSING},
};

use crate::kernel::{deref, global_field, read, tpoff};

#[unsafe(no_mangle)]
pub(crate) static CLONE_KERNEL_OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets::NONE);

/// Address of the kernel's global `pid_max` variable (from /proc/kallsyms, which shows it only
/// to CAP_SYSLOG; 0 when hidden, unknown or where pid_max is per namespace): read at the failure, since it may change right after.
#[unsafe(no_mangle)]
static PID_MAX_ADDR: Global<u64> = Global::new(0);

macro_rules! koff {
    ($field:ident) => {
        global_field!(CLONE_KERNEL_OFFSETS, KernelOffsets, $field)
    };
}

/// One event per failed syscall. Failures are rare, but a leak hitting its limit fails in
/// storms: 2 MiB holds a burst of ~8,000 while userspace catches up.
#[map]
static CLONE_EVENTS: RingBuf = RingBuf::with_byte_size(2 * 1024 * 1024, 0);

/// Counters indexed by [`CloneStat`].
#[map]
static CLONE_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(CLONE_STAT_COUNT, 0);

/// Whose refusals share one read of the kernel state: one process (its threads share its pid
/// namespace and limits; two processes of a pod may not), in one cgroup and pids cgroup (pods
/// live in v1 hierarchies only on hybrid hosts), as one user (RLIMIT_NPROC is per user), with
/// one errno.
#[repr(C)]
struct BurstKey {
    cgroup_id: u64,
    own_pids_ino: u64,
    tgid: u32,
    uid: u32,
    errno: u32,
    _pad: u32,
}

/// The kernel state read at a burst's last full read, and when.
#[repr(C)]
struct BurstState {
    read_ns: u64,
    /// The `valid` bits of the state (without [`valid::FLAGS`], which is per call).
    valid: u32,
    _pad: u32,
    pids: CgroupCounter,
    memory: CgroupCounter,
    pidns: PidNsCounter,
    nproc: NprocCounter,
}

/// One entry per bursting process; the least recently refused goes first (its next refusal
/// then reads the state afresh).
#[map]
static CLONE_BURSTS: LruHashMap<BurstKey, BurstState> = LruHashMap::with_max_entries(256, 0);

/// Where a fresh state is composed before it goes into `CLONE_BURSTS` (too big for the stack).
#[map]
static CLONE_BURST_SCRATCH: PerCpuArray<BurstState> = PerCpuArray::with_max_entries(1, 0);

const SIGCHLD: u64 = 17;
const CLONE_VM: u64 = 0x100;
const CLONE_VFORK: u64 = 0x4000;
const FORK_FLAGS: u64 = SIGCHLD;
const VFORK_FLAGS: u64 = CLONE_VFORK | CLONE_VM | SIGCHLD;
/// `pid_namespace.pid_allocated` carries this bit while the namespace accepts new pids.
const PIDNS_ADDING: u32 = 1 << 31;
/// UAPI resource number of RLIMIT_NPROC; `struct rlimit` is two unsigned longs.
const RLIMIT_NPROC: u32 = 6;
const RLIMIT_SIZE: u32 = 16;
/// Deepest cgroup and pid namespace nesting walked to find the limiting level.
const MAX_CGROUP_DEPTH: u32 = 12;
/// `pids.max` is stored as PID_MAX_LIMIT + 1 when unlimited.
const PIDS_UNLIMITED: i64 = 4 * 1024 * 1024 + 1;
/// errno values of syscalls the kernel restarts transparently (ERESTARTSYS..ERESTART_RESTARTBLOCK):
/// a signal interrupted the fork, userspace never sees them.
const ERESTART_FIRST: i64 = 512;
const ERESTART_LAST: i64 = 516;

#[tracepoint]
pub fn clone_exit(ctx: TracePointContext) -> u32 {
    on_tracepoint(&ctx, Syscall::Clone);
    0
}

#[tracepoint]
pub fn clone3_exit(ctx: TracePointContext) -> u32 {
    on_tracepoint(&ctx, Syscall::Clone3);
    0
}

#[tracepoint]
pub fn fork_exit(ctx: TracePointContext) -> u32 {
    on_tracepoint(&ctx, Syscall::Fork);
    0
}

#[tracepoint]
pub fn vfork_exit(ctx: TracePointContext) -> u32 {
    on_tracepoint(&ctx, Syscall::Vfork);
    0
}

/// `sys_exit(struct pt_regs *regs, long ret)`, for every syscall: the return value first (a
/// success costs one compare), then the syscall number from the saved user registers.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn clone_sys_exit(ctx: RawTracePointContext) -> u32 {
    let ret: i64 = ctx.arg(1);
    if ret >= 0 {
        return 0;
    }
    let regs: usize = ctx.arg(0);
    let Some(nr) = read::<u64>(regs as *const u8, koff!(pt_regs_syscall_nr)) else {
        return 0;
    };
    let syscall = if nr == u64::from(koff!(nr_clone)) {
        Syscall::Clone
    } else if nr == u64::from(koff!(nr_clone3)) {
        Syscall::Clone3
    } else if nr == u64::from(koff!(nr_fork)) {
        Syscall::Fork
    } else if nr == u64::from(koff!(nr_vfork)) {
        Syscall::Vfork
    } else {
        return 0;
    };
    on_exit(&ctx, ret, syscall, Some(regs));
    0
}

#[inline(always)]
fn on_tracepoint(ctx: &TracePointContext, syscall: Syscall) {
    let Some(ret) = crate::kernel::tp_u64(ctx, tpoff!(exit_ret)).map(|r| r as i64) else {
        return;
    };
    if ret < 0 {
        let regs = match syscall {
            Syscall::Clone | Syscall::Clone3 => user_regs(),
            Syscall::Fork | Syscall::Vfork => None,
        };
        on_exit(ctx, ret, syscall, regs);
    }
}

/// The clone flags of the failing clone/clone3 call: its first argument (the flags, or for
/// clone3 a user pointer to `struct clone_args`, whose first u64 is the flags), read from the
/// user registers the kernel saved at syscall entry.
#[inline(always)]
fn syscall_flags(syscall: Syscall, regs: Option<usize>) -> Option<u64> {
    let off = koff!(pt_regs_arg0);
    if off == MISSING {
        return None;
    }
    let regs = regs?;
    let mut arg0: u64 = 0;
    // SAFETY: the registers are read with the fault-tolerant probe-read helper.
    if unsafe {
        probe_read_raw(
            &mut arg0 as *mut u64 as *mut _,
            8,
            (regs + off as usize) as *const _,
        )
    } != 0
    {
        return None;
    }
    match syscall {
        Syscall::Clone => Some(arg0),
        // SAFETY: a user pointer, read with the fault-tolerant helper.
        _ => unsafe { bpf_probe_read_user(arg0 as *const u64) }.ok(),
    }
}

/// Address of the current task's saved user registers. With `bpf_task_pt_regs` (5.15+) from
/// the helper; before, as the kernel's `task_pt_regs()` computes it: the top of the task's
/// kernel stack less one `struct pt_regs`. The branch is on a load-time constant, so the
/// verifier of an old kernel never sees the helpers it does not have.
#[inline(always)]
fn user_regs() -> Option<usize> {
    if koff!(has_task_pt_regs) != 0 {
        // SAFETY: helpers on the current task.
        let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as usize;
        return (regs != 0).then_some(regs);
    }
    let (size, thread_size) = (koff!(pt_regs_size), koff!(thread_size));
    if size == MISSING || thread_size == MISSING {
        return None;
    }
    // SAFETY: no arguments.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let stack = deref(task, koff!(task_stack))? as usize;
    Some(stack + thread_size as usize - size as usize)
}

#[inline(always)]
fn bump(stat: CloneStat) {
    crate::kernel::bump(&CLONE_STATS, stat as u32);
}

/// A failed task creation (`ret` < 0), with the saved user registers where known.
#[inline(always)]
fn on_exit<C: EbpfContext>(ctx: &C, ret: i64, syscall: Syscall, regs: Option<usize>) {
    if -ret >= ERESTART_FIRST && -ret <= ERESTART_LAST {
        return;
    }
    bump(CloneStat::Failures);
    let flags = match syscall {
        Syscall::Fork => Some(FORK_FLAGS),
        Syscall::Vfork => Some(VFORK_FLAGS),
        Syscall::Clone | Syscall::Clone3 => syscall_flags(syscall, regs),
    };
    if flags.is_none() {
        bump(CloneStat::MissingEntry);
    }
    let Some(mut entry) = CLONE_EVENTS.reserve::<CloneFailureEvent>(0) else {
        bump(CloneStat::RingbufFull);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved ring-buffer slot of the right size; every field is
    // written before submit.
    unsafe {
        let task = fill(&mut *ev, syscall, -ret as u32, flags);
        if !reuse_state(&mut *ev) {
            read_state(&mut *ev, task);
            keep_state(&*ev);
        }
    }
    // SAFETY: as above, the slot is still ours until submit.
    log_missing(ctx, unsafe { (*ev).valid });
    // A storm of refusals wakes the reader once per 64 KiB, not once each.
    entry.submit(crate::kernel::wakeup(&CLONE_EVENTS));
}

/// Says which evidence a failure lacks (a member offset this kernel does not have, or a read
/// that failed): `trace --kernel-log warn` shows it. Removed by the verifier when off.
#[inline(always)]
fn log_missing<C: EbpfContext>(ctx: &C, bits: u32) {
    if bits & valid::PIDS == 0 {
        warn!(
            ctx,
            "clone failure without a pids cgroup snapshot (offset missing or read failed)"
        );
    }
    if bits & valid::MEMORY == 0 {
        warn!(
            ctx,
            "clone failure without a memory cgroup snapshot (offset missing or read failed)"
        );
    }
    if bits & valid::PIDNS == 0 {
        warn!(
            ctx,
            "clone failure without a pid namespace snapshot (offset missing or read failed)"
        );
    }
    if bits & valid::NPROC == 0 {
        warn!(
            ctx,
            "clone failure without the RLIMIT_NPROC count (offset missing or read failed)"
        );
    }
    if bits & valid::FLAGS == 0 {
        warn!(
            ctx,
            "clone failure without its flags (saved user registers not found)"
        );
    }
}

/// The failing call itself: who, when, which syscall and flags, and the caller's pids cgroup.
/// Returns the current task, for [`read_state`].
#[inline(always)]
fn fill(ev: &mut CloneFailureEvent, syscall: Syscall, errno: u32, flags: Option<u64>) -> *const u8 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: a helper without arguments; the task is only read through bpf_probe_read_kernel.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    // SAFETY: a helper without arguments or preconditions.
    ev.ktime_ns = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a helper without arguments or preconditions.
    ev.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    ev.clone_flags = flags.unwrap_or(0);
    ev.pid = (pid_tgid >> 32) as u32;
    ev.tid = pid_tgid as u32;
    ev.uid = bpf_get_current_uid_gid() as u32;
    ev.ppid = deref(task, koff!(task_real_parent))
        .and_then(|parent| read::<u32>(parent, koff!(task_tgid)))
        .unwrap_or(0);
    ev.syscall = syscall as u32;
    ev.errno = errno;
    ev.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    ev.state_age_us = 0;
    ev.valid = if flags.is_some() { valid::FLAGS } else { 0 };
    ev.own_pids_ino = deref(task, koff!(task_cgroups))
        .and_then(|s| subsys_css(s, koff!(pids_subsys_id)))
        .map_or(0, css_ino);
    task
}

fn burst_key(ev: &CloneFailureEvent) -> BurstKey {
    BurstKey {
        cgroup_id: ev.cgroup_id,
        own_pids_ino: ev.own_pids_ino,
        tgid: ev.pid,
        uid: ev.uid,
        errno: ev.errno,
        _pad: 0,
    }
}

/// Copies the state of this process's burst into `ev` when it was read less than
/// [`BURST_NS`] ago. False when there is none that recent.
#[inline(always)]
fn reuse_state(ev: &mut CloneFailureEvent) -> bool {
    let Some(kept) = CLONE_BURSTS.get_ptr(&burst_key(ev)) else {
        return false;
    };
    // SAFETY: a map value pointer, valid for this program run; another CPU may rewrite it
    // meanwhile (the copy is then a mix of two reads less than BURST_NS apart).
    let kept = unsafe { &*kept };
    let age = ev.ktime_ns.wrapping_sub(kept.read_ns);
    if age >= BURST_NS {
        return false;
    }
    ev.pids = kept.pids;
    ev.memory = kept.memory;
    ev.pidns = kept.pidns;
    ev.nproc = kept.nproc;
    ev.valid |= kept.valid;
    ev.state_age_us = ((age / 1000) as u32).max(1);
    bump(CloneStat::StateReused);
    true
}

/// Keeps the state just read for the burst's next refusals.
#[inline(always)]
fn keep_state(ev: &CloneFailureEvent) {
    let Some(scratch) = CLONE_BURST_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot of a per-CPU array, used by this program run only.
    let scratch = unsafe { &mut *scratch };
    scratch.read_ns = ev.ktime_ns;
    scratch.valid = ev.valid & !valid::FLAGS;
    scratch._pad = 0;
    scratch.pids = ev.pids;
    scratch.memory = ev.memory;
    scratch.pidns = ev.pidns;
    scratch.nproc = ev.nproc;
    // A full map evicts its least recently used entry; an error only costs a read next time.
    let _ = CLONE_BURSTS.insert(&burst_key(ev), scratch, 0);
}

/// The kernel state that decides the cause: the pids and memory cgroup levels nearest their
/// limits, the pid namespaces and RLIMIT_NPROC.
#[inline(always)]
fn read_state(ev: &mut CloneFailureEvent, task: *const u8) {
    let css_set = deref(task, koff!(task_cgroups));
    ev.pids = CgroupCounter::default();
    if let Some(css) = css_set.and_then(|s| subsys_css(s, koff!(pids_subsys_id)))
        && walk_pids(css, &mut ev.pids)
    {
        ev.valid |= valid::PIDS;
    }
    ev.memory = CgroupCounter::default();
    if let Some(css) = css_set.and_then(|s| subsys_css(s, koff!(memory_subsys_id)))
        && walk_memory(css, &mut ev.memory)
    {
        ev.valid |= valid::MEMORY;
    }
    ev.pidns = PidNsCounter::default();
    if let Some(ns) = deref(task, koff!(task_nsproxy))
        .and_then(|nsproxy| deref(nsproxy, koff!(nsproxy_pid_ns_for_children)))
    {
        ev.valid |= walk_pidns(ns, &mut ev.pidns);
    }
    ev.nproc = NprocCounter::default();
    if read_nproc(task, &mut ev.nproc) {
        ev.valid |= valid::NPROC;
    }
}

/// `css_set.subsys[id]`, the task's css in one controller.
#[inline(always)]
fn subsys_css(css_set: *const u8, id: u32) -> Option<*const u8> {
    let base = koff!(css_set_subsys);
    if id == MISSING || base == MISSING || id >= 64 {
        return None;
    }
    deref(css_set, base + id * 8)
}

/// Inode of a css's cgroup directory.
#[inline(always)]
fn css_ino(css: *const u8) -> u64 {
    deref(css, koff!(css_cgroup))
        .and_then(|cgrp| deref(cgrp, koff!(cgroup_kn)))
        .and_then(|kn| read::<u64>(kn, koff!(kernfs_node_id)))
        .unwrap_or(0)
}

/// One cgroup level's usage, limit (`i64::MAX` = none) and failure count.
struct Level {
    current: i64,
    limit: i64,
    failcnt: u64,
}

/// Walks from a css to the root and keeps the level with the least headroom: the kernel
/// charges every ancestor, so the level that refused may be above the task's own cgroup.
#[inline(always)]
fn walk_css(
    mut css: *const u8,
    out: &mut CgroupCounter,
    read_level: impl Fn(*const u8) -> Option<Level>,
) -> bool {
    let parent_off = koff!(css_parent);
    let mut best_headroom = i64::MAX;
    let mut found = false;
    for depth in 0..MAX_CGROUP_DEPTH {
        let Some(level) = read_level(css) else {
            break;
        };
        let headroom = level.limit.saturating_sub(level.current);
        if !found || headroom < best_headroom {
            best_headroom = headroom;
            *out = CgroupCounter {
                cgroup_ino: css_ino(css),
                current: level.current,
                limit: level.limit,
                failcnt: level.failcnt,
                depth,
                _pad: 0,
            };
            found = true;
        }
        match deref(css, parent_off) {
            Some(parent) => css = parent,
            None => break,
        }
    }
    found
}

/// The pids cgroup level nearest to its `pids.max`.
#[inline(always)]
fn walk_pids(css: *const u8, out: &mut CgroupCounter) -> bool {
    let (css_off, counter_off, limit_off) =
        (koff!(pids_css), koff!(pids_counter), koff!(pids_limit));
    if css_off == MISSING {
        return false;
    }
    walk_css(css, out, |css| {
        let pids = css.wrapping_sub(css_off as usize);
        let current = read::<i64>(pids, counter_off)?;
        let limit = read::<i64>(pids, limit_off)?;
        Some(Level {
            current,
            limit: if limit >= PIDS_UNLIMITED {
                i64::MAX
            } else {
                limit
            },
            failcnt: 0,
        })
    })
}

/// The memory cgroup level nearest to its limit, from its `memory` page counter.
#[inline(always)]
fn walk_memory(css: *const u8, out: &mut CgroupCounter) -> bool {
    let (css_off, memory_off, usage_off, max_off, failcnt_off) = (
        koff!(memcg_css),
        koff!(memcg_memory),
        koff!(page_counter_usage),
        koff!(page_counter_max),
        koff!(page_counter_failcnt),
    );
    if css_off == MISSING || memory_off == MISSING {
        return false;
    }
    walk_css(css, out, |css| {
        let counter = css
            .wrapping_sub(css_off as usize)
            .wrapping_add(memory_off as usize);
        let current = read::<i64>(counter, usage_off)?;
        let max = read::<u64>(counter, max_off)?;
        Some(Level {
            current,
            limit: i64::try_from(max).unwrap_or(i64::MAX),
            failcnt: read::<u64>(counter, failcnt_off).unwrap_or(0),
        })
    })
}

/// Reads the pid namespaces the child's pid would be allocated in, innermost first: each
/// level's allocation, pid_max (6.14+) and allocator cursor. Returns the `valid` bits it filled.
#[inline(always)]
fn walk_pidns(mut ns: *const u8, out: &mut PidNsCounter) -> u32 {
    let (alloc_off, max_off, level_off, parent_off, inum_off, cursor_off) = (
        koff!(pidns_pid_allocated),
        koff!(pidns_pid_max),
        koff!(pidns_level),
        koff!(pidns_parent),
        koff!(pidns_inum),
        koff!(pidns_idr_next),
    );
    let Some(innermost) = read::<u32>(ns, alloc_off) else {
        return 0;
    };
    out.innermost_alive = (innermost & PIDNS_ADDING != 0) as u32;
    out.innermost_level = read::<u32>(ns, level_off).unwrap_or(0);
    let mut bits = valid::PIDNS;
    if max_off != MISSING {
        bits |= valid::PIDNS_PID_MAX;
    } else {
        let addr = PID_MAX_ADDR.load();
        if addr != 0 {
            out.global_pid_max = read::<i32>(addr as *const u8, 0).unwrap_or(0);
        }
    }
    if cursor_off != MISSING {
        bits |= valid::PIDNS_CURSOR;
    }
    for i in 0..MAX_PIDNS_LEVELS {
        let Some(allocated) = read::<u32>(ns, alloc_off) else {
            break;
        };
        let allocated = allocated & !PIDNS_ADDING;
        out.levels[i] = PidNsLevel {
            inum: read::<u32>(ns, inum_off).unwrap_or(0),
            allocated,
            pid_max: read::<i32>(ns, max_off).unwrap_or(-1),
            cursor: read::<u32>(ns, cursor_off).unwrap_or(0),
        };
        out.depth = i as u32 + 1;
        match deref(ns, parent_off) {
            Some(parent) => ns = parent,
            None => {
                // No parent: this is the initial namespace, which holds every task's pid.
                out.node_tasks = allocated;
                break;
            }
        }
    }
    bits
}

/// The caller's process count and its RLIMIT_NPROC soft limit
/// (`signal->rlim[RLIMIT_NPROC].rlim_cur`). The count is `cred->ucounts->rlimit[NPROC]` on
/// Linux >= 5.14 and `cred->user->processes` before.
#[inline(always)]
pub(crate) fn read_nproc(task: *const u8, out: &mut NprocCounter) -> bool {
    let rlim_off = koff!(signal_rlim);
    if rlim_off == MISSING {
        return false;
    }
    let cred = deref(task, koff!(task_real_cred));
    let (idx, rlimit_off) = (koff!(ucount_rlimit_nproc), koff!(ucounts_rlimit));
    let count = if idx != MISSING && rlimit_off != MISSING && idx < 16 {
        cred.and_then(|cred| deref(cred, koff!(cred_ucounts)))
            .and_then(|ucounts| read::<i64>(ucounts, rlimit_off + idx * 8))
    } else {
        cred.and_then(|cred| deref(cred, koff!(cred_user)))
            .and_then(|user| read::<i32>(user, koff!(user_processes)))
            .map(i64::from)
    };
    let limit = deref(task, koff!(task_signal))
        .and_then(|signal| read::<u64>(signal, rlim_off + RLIMIT_NPROC * RLIMIT_SIZE));
    match (count, limit) {
        (Some(count), Some(limit)) => {
            *out = NprocCounter { count, limit };
            true
        }
        _ => false,
    }
}
