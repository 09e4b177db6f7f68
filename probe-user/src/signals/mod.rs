//! The signals: what each kernel program reports, decoded and enriched. `clone` (failed task
//! creation, its cause decided by `cause` from the kernel state at the failure and `node`'s
//! counts), `tasks` (task creation and live counts per cgroup, headroom to the pids limit),
//! `dns` (queries, answers, timeouts, retransmits), `conntrack` (drops and near-misses, with
//! the kernel's own counters from `ctstats`).

pub mod cause;
pub mod clone;
pub mod conntrack;
pub mod ctstats;
pub mod dns;
pub mod node;
pub mod tasks;
