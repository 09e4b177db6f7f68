//! Types shared by the kernel side (`probe-ebpf`) and userspace (`probe-user`).
//!
//! Everything here is `#[repr(C)]` plain data: the eBPF programs write it into ring buffers,
//! maps and globals, userspace reads the same bytes back. One module per concern.
#![no_std]

pub mod clone;
pub mod conntrack;
pub mod dns;
pub mod offsets;
pub mod tasks;
