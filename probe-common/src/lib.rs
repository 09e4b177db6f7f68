//! Types shared by the kernel side (`probe-ebpf`) and userspace (`probe-user`).
//!
//! Everything here is `#[repr(C)]` plain data: the eBPF programs write it into ring buffers,
//! maps and globals, userspace reads the same bytes back. One module per concern; `caps` is
//! the kernel's capability numbering, for every tool that checks or sets a capability set;
//! `cgroups` names the cgroup v2 directories the kernel makes, for attribution by id.
#![no_std]

pub mod caps;
pub mod cgroups;
pub mod clone;
pub mod conntrack;
pub mod dns;
pub mod offsets;
pub mod tasks;
