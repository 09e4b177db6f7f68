//! Reading kernel structs at offsets the loader took from the running kernel's BTF, and
//! tracepoint fields at offsets it took from tracefs.

use aya_ebpf::{Global, helpers::bpf_probe_read_kernel};
use probe_common::offsets::{MISSING, TracepointOffsets};

/// Map flag: entries are allocated when inserted, not all at load.
pub const BPF_F_NO_PREALLOC: u32 = 1;

#[unsafe(no_mangle)]
pub static TP_OFFSETS: Global<TracepointOffsets> = Global::new(TracepointOffsets::NONE);

/// Reads a `T` at `base + off`, or `None` when the pointer is null, the offset is missing on
/// this kernel, or the read faults.
#[inline(always)]
pub fn read<T: Copy>(base: *const u8, off: u32) -> Option<T> {
    if base.is_null() || off == MISSING {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel tolerates any address; a bad one returns an error.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(off as usize) as *const T).ok() }
}

/// Reads a `T` at `base + off` straight into `dst` (no copy on the small eBPF stack). False
/// when the pointer is null, the offset is missing on this kernel, or the read faults.
#[inline(always)]
pub fn read_into<T: Copy>(dst: &mut T, base: *const u8, off: u32) -> bool {
    if base.is_null() || off == MISSING {
        return false;
    }
    // SAFETY: bpf_probe_read_kernel tolerates any source address and writes size_of::<T>()
    // bytes into `dst`.
    unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_kernel(
            dst as *mut T as *mut _,
            core::mem::size_of::<T>() as u32,
            base.wrapping_add(off as usize) as *const _,
        ) == 0
    }
}

/// Follows a pointer member: `*(base + off)` as a pointer.
#[inline(always)]
pub fn deref(base: *const u8, off: u32) -> Option<*const u8> {
    read::<*const u8>(base, off).filter(|p| !p.is_null())
}

/// Reads one field of a struct global (an [`aya_ebpf::Global`]) without copying the whole
/// struct onto the 512-byte eBPF stack.
macro_rules! global_field {
    ($global:path, $ty:ty, $field:ident) => {
        // SAFETY: Global<T> is repr(transparent) over MaybeUninit<T>, always initialised;
        // a volatile read keeps the loader's override visible.
        unsafe { core::ptr::read_volatile(&raw const (*(&raw const $global as *const $ty)).$field) }
    };
}
pub(crate) use global_field;

/// Offset of a tracepoint field, from [`TP_OFFSETS`].
macro_rules! tpoff {
    ($field:ident) => {
        $crate::kernel::global_field!(
            $crate::kernel::TP_OFFSETS,
            probe_common::offsets::TracepointOffsets,
            $field
        )
    };
}
pub(crate) use tpoff;
