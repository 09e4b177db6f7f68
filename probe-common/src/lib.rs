//! Types shared by the kernel side (`probe-ebpf`) and userspace (`probe-user`).
//!
//! Everything here is `#[repr(C)]` plain data: the eBPF programs write it into ring buffers,
//! maps and globals, userspace reads the same bytes back. One module per concern; `caps` is
//! the kernel's capability numbering, for every tool that checks or sets a capability set;
//! `cgroups` names the cgroup v2 directories the kernel makes, for attribution by id.
#![no_std]

/// A program's counters, summed over CPUs, as userspace reads them: one named field per slot
/// of the per-CPU array `MAP`.
#[cfg(feature = "user")]
pub trait Counters: Sized + Default {
    /// The per-CPU array's name in the eBPF object.
    const MAP: &'static str;
    /// Slots in the array.
    const COUNT: u32;
    /// From each slot's sum over CPUs, in slot order (a missing slot reads as 0).
    fn from_sums(sums: &[u64]) -> Self;
}

/// Declares a program's per-CPU counter array once, for both sides: the slot enum the kernel
/// side counts by, the number of slots, and (userspace) the struct of named sums decoded from
/// it, with the array's name.
macro_rules! counters {
    (
        $(#[$meta:meta])*
        pub enum $slot:ident, pub struct $sums:ident, $count:ident, $map:literal {
            $( $(#[$doc:meta])* $variant:ident = $index:literal => $field:ident, )*
        }
    ) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug)]
        pub enum $slot {
            $( $(#[$doc])* $variant = $index, )*
        }

        /// Slots in the array.
        pub const $count: u32 = [$($index),*].len() as u32;

        #[doc = concat!("The sums of `", $map, "` over CPUs, by slot.")]
        #[cfg(feature = "user")]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
        pub struct $sums {
            $( $(#[$doc])* pub $field: u64, )*
        }

        #[cfg(feature = "user")]
        impl $crate::Counters for $sums {
            const MAP: &'static str = $map;
            const COUNT: u32 = $count;
            fn from_sums(sums: &[u64]) -> Self {
                let at = |i: usize| sums.get(i).copied().unwrap_or(0);
                $sums { $( $field: at($index), )* }
            }
        }
    };
}
pub(crate) use counters;

/// Fails the build when a type that crosses the kernel boundary changes size. Both sides
/// compile this crate, so they agree with each other; what this catches is a change that
/// moves the bytes a reader elsewhere expects (a ring record's size that userspace checks, a
/// map value sized by the loader, a field added with padding), which must be made on purpose
/// (bump the number here with the reason in the commit).
macro_rules! kernel_abi_sizes {
    ($($ty:ty => $bytes:literal),* $(,)?) => {
        $(
            const _: () = assert!(
                core::mem::size_of::<$ty>() == $bytes,
                concat!(stringify!($ty), " changed size: it crosses the kernel boundary")
            );
        )*
    };
}
pub(crate) use kernel_abi_sizes;

pub mod caps;
pub mod cgroups;
pub mod clone;
pub mod conntrack;
pub mod dns;
pub mod offsets;
pub mod tasks;
