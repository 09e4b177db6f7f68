//! The kernel plumbing: `loader` (the embedded eBPF object: load, attach, rings, maps, by
//! name: it knows no signal), `inventory` (what the object holds and costs, RLIMIT_MEMLOCK),
//! `rings` (the event rings, read on a thread of their own), `privileges` (what loading needs,
//! and what is given up after attaching), `btf` (the kernel's types, split BTF of modules),
//! `offsets` (struct member and tracepoint field offsets the programs read with, and their
//! fallbacks), `tracefs`.

pub mod btf;
pub mod inventory;
pub mod loader;
pub mod offsets;
pub mod privileges;
pub mod rings;
pub mod tracefs;
