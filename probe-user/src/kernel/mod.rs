//! The kernel plumbing: `loader` (the embedded eBPF object: load, attach, rings, maps),
//! `rings` (the event rings, read on a thread of their own), `privileges` (what is given up
//! after attaching),
//! `btf` (the kernel's types, split BTF of modules), `offsets` (struct member and tracepoint
//! field offsets the programs read with, and their fallbacks), `tracefs`.

pub mod btf;
pub mod loader;
pub mod offsets;
pub mod privileges;
pub mod rings;
pub mod tracefs;
