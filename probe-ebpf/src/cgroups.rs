//! Naming cgroups by id: the raw tracepoints `cgroup_mkdir` and `cgroup_rmdir` (both
//! `(struct cgroup *cgrp, const char *path)`, the path formatted by the kernel from the
//! hierarchy's root) send each cgroup v2 directory made, with its id and path, and each one
//! removed, through `CGROUP_EVENTS`. Userspace then knows a new cgroup's path before any event
//! from inside it arrives, whatever the depth and size of the tree, and verifies the path
//! before it trusts it. Other hierarchies (cgroup v1) are skipped here. A record that does not
//! fit in the ring is counted, never silent.

use aya_ebpf::{
    helpers::generated::bpf_probe_read_kernel_str,
    macros::{map, raw_tracepoint},
    maps::{PerCpuArray, RingBuf},
    programs::RawTracePointContext,
};
use probe_common::{
    cgroups::{
        CGROUP_HEADER_BYTES, CGROUP_MADE, CGROUP_PATH_CAPACITY, CGROUP_REMOVED, CGROUP_RING_BYTES,
        CGROUP_STAT_COUNT, CgroupEvent, CgroupEventHeader, CgroupStat, PATH_INCOMPLETE,
    },
    offsets::KernelOffsets,
    tasks::CGROUP_V2_ROOT,
};

use crate::kernel::{deref, global_field, read};

macro_rules! koff {
    ($field:ident) => {
        global_field!(crate::clone::CLONE_KERNEL_OFFSETS, KernelOffsets, $field)
    };
}

#[map]
static CGROUP_EVENTS: RingBuf = RingBuf::with_byte_size(CGROUP_RING_BYTES, 0);

/// Where a record is built (the path does not fit on the 512-byte stack); only its used part
/// is copied into the ring.
#[map]
static CGROUP_SCRATCH: PerCpuArray<CgroupEvent> = PerCpuArray::with_max_entries(1, 0);

/// Counters indexed by [`CgroupStat`].
#[map]
static CGROUP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(CGROUP_STAT_COUNT, 0);

/// `cgroup_mkdir(struct cgroup *cgrp, const char *path)`.
#[raw_tracepoint(tracepoint = "cgroup_mkdir")]
pub fn cgroup_mkdir(ctx: RawTracePointContext) -> u32 {
    let cgrp: *const u8 = ctx.arg(0);
    let path: *const u8 = ctx.arg(1);
    let Some(id) = v2_id(cgrp) else {
        return 0;
    };
    let Some(ev) = CGROUP_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's scratch slot; the program runs without preemption on it.
    let ev = unsafe { &mut *ev };
    // SAFETY: the helper reads at most CGROUP_PATH_CAPACITY bytes (NUL included) from any
    // kernel address into the slot's path, which is that long.
    let read = unsafe {
        bpf_probe_read_kernel_str(
            ev.path.as_mut_ptr().cast(),
            CGROUP_PATH_CAPACITY as u32,
            path.cast(),
        )
    };
    // The length without the NUL; a full buffer may be a cut path, a failed read is none.
    let (len, flags) = if read <= 0 {
        (0, PATH_INCOMPLETE)
    } else if read as usize >= CGROUP_PATH_CAPACITY {
        (CGROUP_PATH_CAPACITY - 1, PATH_INCOMPLETE)
    } else {
        (read as usize - 1, 0)
    };
    ev.header = CgroupEventHeader {
        id,
        hierarchy: CGROUP_V2_ROOT,
        kind: CGROUP_MADE,
        flags,
        path_len: len as u16,
    };
    // SAFETY: the header and the first `len` path bytes of the slot, all written above;
    // `len` < CGROUP_PATH_CAPACITY keeps the slice inside it.
    let record = unsafe {
        core::slice::from_raw_parts(
            (ev as *const CgroupEvent).cast::<u8>(),
            CGROUP_HEADER_BYTES + (len & (CGROUP_PATH_CAPACITY - 1)),
        )
    };
    if CGROUP_EVENTS.output(record, 0).is_err() {
        bump(CgroupStat::RingbufFull);
    }
    0
}

/// `cgroup_rmdir(struct cgroup *cgrp, const char *path)`: the id is enough.
#[raw_tracepoint(tracepoint = "cgroup_rmdir")]
pub fn cgroup_rmdir(ctx: RawTracePointContext) -> u32 {
    let cgrp: *const u8 = ctx.arg(0);
    let Some(id) = v2_id(cgrp) else {
        return 0;
    };
    let header = CgroupEventHeader {
        id,
        hierarchy: CGROUP_V2_ROOT,
        kind: CGROUP_REMOVED,
        flags: 0,
        path_len: 0,
    };
    if CGROUP_EVENTS.output(&header, 0).is_err() {
        bump(CgroupStat::RingbufFull);
    }
    0
}

/// `cgrp->kn->id` when the cgroup is in the v2 hierarchy (`cgrp->root->hierarchy_id`).
#[inline(always)]
fn v2_id(cgrp: *const u8) -> Option<u64> {
    let root = deref(cgrp, koff!(cgroup_root))
        .and_then(|root| read::<i32>(root, koff!(cgroup_root_hierarchy_id)))?;
    if root != CGROUP_V2_ROOT {
        return None;
    }
    deref(cgrp, koff!(cgroup_kn)).and_then(|kn| read::<u64>(kn, koff!(kernfs_node_id)))
}

#[inline(always)]
fn bump(stat: CgroupStat) {
    crate::kernel::bump(&CGROUP_STATS, stat as u32);
}
