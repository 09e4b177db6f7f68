//! The kernel plumbing: `loader` (the embedded eBPF object: load, attach, rings, maps),
//! `btf` (the kernel's types, split BTF of modules), `offsets` (struct member and tracepoint
//! field offsets the programs read with, and their fallbacks), `tracefs`.

pub mod btf;
pub mod loader;
pub mod offsets;
pub mod tracefs;
