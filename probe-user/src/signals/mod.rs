//! The signals: what each kernel program reports, decoded and enriched. `clone` (failed task
//! creation, its cause decided by `cause` from the kernel state at the failure and `node`'s
//! counts), `tasks` (task creation and live counts per cgroup, headroom to the pids limit),
//! `dns` (queries, answers, timeouts, retransmits), `conntrack` (drops and near-misses, with
//! the kernel's own counters from `ctstats`).

pub mod clone;
pub mod conntrack;
pub mod dns;
pub mod tasks;

/// An address as the kernel programs keep it: IPv4 in the first 4 of 16 bytes.
pub(crate) fn ip(family: u8, addr: &[u8; 16]) -> std::net::IpAddr {
    if family == 4 {
        std::net::IpAddr::from([addr[0], addr[1], addr[2], addr[3]])
    } else {
        std::net::IpAddr::from(*addr)
    }
}
