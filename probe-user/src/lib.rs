//! faultline's userspace: why tasks fail to be created, DNS stalls and conntrack drops on a
//! Kubernetes node, per pod.
//!
//! One flow, [`pipeline`]: [`kernel`] loads and attaches the eBPF programs; the [`signals`]
//! decode what their ring buffers and counters hold and enrich it (the cause of a failed
//! clone, the answer to a query, the verdict on a drop); [`attribution`] names the cgroup, pod
//! and workload; a sink exports it. The commands are sinks or thin consumers: [`trace`]
//! (lines and a summary), [`run`] (the daemon: [`export`]s metrics, event lines, OTLP, and
//! keeps a [`diagnosis`] recorder for `/explain`), [`explain`] (findings from the daemon or
//! its own short observation), [`top`] (task counts per cgroup, with their trends) and
//! [`check`] (what works on this node). [`logging`] carries faultline's own messages;
//! [`memory`] hands the heap's freed pages back to the node; [`manual`] writes the man pages.

pub mod attribution;
pub mod check;
pub mod cli;
pub mod clock;
pub mod diagnosis;
pub mod explain;
pub mod export;
#[cfg(test)]
mod fuzz;
pub mod kernel;
pub mod logging;
pub mod manual;
pub mod memory;
pub mod pipeline;
pub mod run;
pub mod signals;
pub mod text;
pub mod top;
pub mod trace;
pub mod trend;
