//! faultline's userspace: finds why tasks fail to be created on a Kubernetes node.
//!
//! The pipeline, in order: [`loader`] loads and attaches the eBPF programs (offsets from
//! [`btf`] and [`tracefs`] via [`offsets`]); [`clone`] decodes ring-buffer events and enriches
//! them into `CloneFailure`s, using [`cgroups`] and [`pods`] for attribution, [`node`] and
//! [`cause`] for the verdict; [`tasks`] turns the kernel's per-cgroup task counters into rates, live counts
//! and headroom. The commands [`trace`], [`top`] and [`check`] export the result.

pub mod btf;
pub mod cause;
pub mod cgroups;
pub mod check;
pub mod cli;
pub mod clock;
pub mod clone;
pub mod conntrack;
pub mod ctstats;
pub mod dns;
#[cfg(test)]
mod fuzz;
pub mod kubeapi;
pub mod lines;
pub mod loader;
pub mod metrics;
pub mod netns;
pub mod node;
pub mod offsets;
pub mod otlp;
pub mod pipeline;
pub mod pods;
pub mod run;
pub mod serve;
pub mod tasks;
pub mod text;
pub mod top;
pub mod trace;
pub mod tracefs;
