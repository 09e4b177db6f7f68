//! What every program shares: reading kernel structs at offsets the loader took from the
//! running kernel's BTF (and tracepoint fields at offsets it took from tracefs), per-CPU
//! counters, and per-cgroup entries of per-CPU hashes.

pub use aya_ebpf::bindings::BPF_NOEXIST;
use aya_ebpf::bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
use aya_ebpf::{
    Global,
    helpers::bpf_probe_read_kernel,
    maps::{PerCpuArray, PerCpuHashMap, RingBuf},
};
use probe_common::offsets::{MISSING, TracepointOffsets};

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

/// An 8-byte tracepoint field at `off` (from [`TP_OFFSETS`]). The offsets the loader writes
/// are constants to the verifier (read-only data), so only one arm of the match is ever
/// explored: the usual offsets are a direct load from the record (a few ns), any other one
/// goes through the probe-read helper (tens of ns).
#[inline(always)]
pub fn tp_u64(ctx: &aya_ebpf::programs::TracePointContext, off: u32) -> Option<u64> {
    use aya_ebpf::EbpfContext as _;
    let base = ctx.as_ptr() as *const u8;
    // SAFETY: tracepoint programs may load 8 aligned bytes at a constant offset from 8 up
    // to the record's size; these are the fields' offsets in their format files.
    unsafe {
        match off {
            16 => Some(core::ptr::read(base.add(16) as *const u64)),
            24 => Some(core::ptr::read(base.add(24) as *const u64)),
            32 => Some(core::ptr::read(base.add(32) as *const u64)),
            40 => Some(core::ptr::read(base.add(40) as *const u64)),
            MISSING => None,
            _ => ctx.read_at::<u64>(off as usize).ok(),
        }
    }
}

/// Wake userspace only once this much waits in a ring: a wakeup per event would cost a
/// context switch each (of the task whose event it is, too). Userspace drains every ring every
/// 250 ms as well, so an event waits that long at most.
const WAKEUP_BYTES: u64 = 64 * 1024;

/// The submit flags for a record of `ring`: no wakeup until [`WAKEUP_BYTES`] wait.
#[inline(always)]
pub fn wakeup(ring: &RingBuf) -> u64 {
    if ring.query(u64::from(BPF_RB_AVAIL_DATA)) >= WAKEUP_BYTES {
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    }
}

const EEXIST: i32 = 17;

/// Adds one to slot `index` of a per-CPU counter array.
#[inline(always)]
pub fn bump(stats: &PerCpuArray<u64>, index: u32) {
    if let Some(v) = stats.get_ptr_mut(index) {
        // SAFETY: this CPU's slot; the program runs without preemption on it.
        unsafe { *v += 1 };
    }
}

/// This CPU's value for `key` in a per-CPU hash, inserted zeroed first when missing (another
/// CPU inserting it first is fine). `None` when the map is full.
#[inline(always)]
pub fn get_or_insert<K, V: Default>(map: &PerCpuHashMap<K, V>, key: &K) -> Option<*mut V> {
    if let Some(v) = map.get_ptr_mut(key) {
        return Some(v);
    }
    // The zero value written on the stack: a constant's address handed to the helper read
    // back as garbage on 5.10 and 6.1.
    let mut zero = V::default();
    // SAFETY: writing a local.
    unsafe { core::ptr::write_volatile(&mut zero, V::default()) };
    if let Err(e) = map.insert(key, &zero, u64::from(BPF_NOEXIST))
        && e != -EEXIST
    {
        return None;
    }
    map.get_ptr_mut(key)
}
