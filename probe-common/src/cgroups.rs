//! cgroup v2 directories as the kernel makes and removes them: the raw tracepoints
//! `cgroup_mkdir` and `cgroup_rmdir` send one record each through a small ring of their own
//! (`CGROUP_EVENTS`), so that userspace names a cgroup made after it started by its id,
//! without walking cgroupfs. A record is a [`CgroupEventHeader`] followed by `path_len` bytes
//! of path (a removal carries none). Userspace verifies every path before trusting it.

/// Longest path carried, NUL included: the size of the buffer the kernel formats the
/// tracepoint's path into (`TRACE_CGROUP_PATH_LEN`). A power of two.
pub const CGROUP_PATH_CAPACITY: usize = 1024;

/// Bytes of the `CGROUP_EVENTS` ring. Directories are made and removed a few at a time (a
/// pod start makes two or three); 256 KiB holds over a thousand typical records while
/// userspace catches up, and stays small where RLIMIT_MEMLOCK still counts (before 5.11).
pub const CGROUP_RING_BYTES: u32 = 256 * 1024;

/// `kind`: a directory made (`cgroup_mkdir`), with its path.
pub const CGROUP_MADE: u8 = 0;
/// `kind`: a directory removed (`cgroup_rmdir`), without a path.
pub const CGROUP_REMOVED: u8 = 1;

/// `flags`: the path filled [`CGROUP_PATH_CAPACITY`] (it may be cut short) or could not be
/// read: it names nothing for sure.
pub const PATH_INCOMPLETE: u8 = 1;

/// The fixed part of a record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupEventHeader {
    /// `cgrp->kn->id`: the inode number of the cgroup's directory, the id
    /// `bpf_get_current_cgroup_id()` returns.
    pub id: u64,
    /// `cgrp->root->hierarchy_id` (`CGROUP_V2_ROOT` for cgroup v2, the only one sent).
    pub hierarchy: i32,
    /// [`CGROUP_MADE`] or [`CGROUP_REMOVED`].
    pub kind: u8,
    /// [`PATH_INCOMPLETE`] or 0.
    pub flags: u8,
    /// Bytes of path after the header, without the NUL: `kernfs_path()` from the
    /// hierarchy's root (`/a/b`), whatever cgroup namespace the writer is in.
    pub path_len: u16,
}

/// Bytes of the header in a record: the path starts here.
pub const CGROUP_HEADER_BYTES: usize = core::mem::size_of::<CgroupEventHeader>();

/// A record as the kernel builds it (in a per-CPU scratch slot); only the header and
/// `path_len` bytes of the path go into the ring.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CgroupEvent {
    pub header: CgroupEventHeader,
    pub path: [u8; CGROUP_PATH_CAPACITY],
}

/// Index of the counters kept per CPU in `CGROUP_STATS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug)]
pub enum CgroupStat {
    /// Records that did not fit in the ring buffer.
    RingbufFull = 0,
}

pub const CGROUP_STAT_COUNT: u32 = 1;

/// The ring buffer of cgroup records (a `CgroupEventHeader` and the path).
pub const EVENTS: &str = "CGROUP_EVENTS";
/// The per-CPU array of `CgroupStat` counters.
pub const STATS: &str = "CGROUP_STATS";

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)] plain data without padding (8 + 4 + 1 + 1 + 2 bytes), valid for any
    // bit pattern.
    unsafe impl aya::Pod for super::CgroupEventHeader {}
}

crate::kernel_abi_sizes! {
    CgroupEventHeader => 16,
    CgroupEvent => 1040,
}
