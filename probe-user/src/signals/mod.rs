//! The signals: what each kernel program reports, decoded and enriched, one folder each.
//! `clone` (failed task creation, its cause decided by `clone::cause` from the kernel state at
//! the failure and `clone::node`'s counts), `tasks` (task creation and live counts per cgroup,
//! headroom to the pids limit), `dns` (queries, answers, timeouts, retransmits), `conntrack`
//! (drops and near-misses, with the kernel's own counters from `conntrack::ctstats`);
//! `refusals` reads the kernel's own counts of refusals (pids, memory, conntrack) that it
//! keeps whether or not anyone watched.
//!
//! What the rest of faultline sees of them is data: an [`Event`] as each happens, a
//! [`Refresh`] on every tick, and the [`Signals`] registry (`registry`), the one place that
//! lists the signals and drives each: the pipeline, the loader and the commands name none.

pub mod clone;
pub mod conntrack;
pub mod dns;
mod event;
mod refresh;
pub mod refusals;
mod registry;
pub mod tasks;

use std::time::Duration;

use crate::cli::EventKind;

pub use event::{Event, LINES_VERSION, Line};
pub use refresh::{ConntrackRefresh, DnsRefresh, DnsTcp, Part, Refresh, TaskRefresh};
pub use registry::Signals;

/// A signal, as named in messages and metrics. The order of the variants is the order they
/// are attached in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::VariantArray, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum Signal {
    Clone,
    Tasks,
    Dns,
    Conntrack,
}

impl Signal {
    /// Every signal, in attach order (derived: a new variant is in it).
    pub const ALL: &[Signal] = <Signal as strum::VariantArray>::VARIANTS;

    /// As in `faultline_probe_attached{probe}`.
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// The signal whose events are of this kind.
    pub fn of(kind: EventKind) -> Signal {
        match kind {
            EventKind::Clone => Signal::Clone,
            EventKind::Dns => Signal::Dns,
            EventKind::Conntrack => Signal::Conntrack,
        }
    }

    /// What to attach for these: conntrack drops are attributed through the DNS programs
    /// (they record who sent each flow, and the tracker names the dropped queries).
    pub fn with_dependencies(signals: &[Signal]) -> Vec<Signal> {
        Signal::ALL
            .iter()
            .copied()
            .filter(|s| {
                signals.contains(s) || (*s == Signal::Dns && signals.contains(&Signal::Conntrack))
            })
            .collect()
    }

    /// The core: failed task creation and the task counts. A command without any core
    /// signal has nothing to stand on; the others are worth a warning when refused.
    pub fn core(self) -> bool {
        matches!(self, Signal::Clone | Signal::Tasks)
    }

    /// What it follows, for people.
    pub fn what(self) -> &'static str {
        match self {
            Signal::Clone => "failed task creation (clone, clone3, fork, vfork)",
            Signal::Tasks => "pids headroom",
            Signal::Dns => "DNS",
            Signal::Conntrack => "conntrack drops",
        }
    }
}

/// The signals a command asks for, and how they run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// What to attach ([`Signal::with_dependencies`] adds what a signal needs).
    pub signals: Vec<Signal>,
    pub dns: DnsOptions,
    /// The span each limit's growth is measured over, for the refreshes' times to exhaustion
    /// (none: no estimates).
    pub trend: Option<Duration>,
    /// Warn (an [`Event::HeadroomWarning`]) when a pids limit is about to refuse tasks.
    pub headroom: Option<tasks::HeadroomThresholds>,
    /// Also show cgroups that hold tasks but created none since attaching (walks the cgroup
    /// tree on every refresh: `top` only).
    pub idle_cgroups: bool,
    /// Once everything is attached, keep only the capabilities reading needs (the daemon).
    pub drop_privileges: bool,
}

impl Plan {
    pub fn has(&self, signal: Signal) -> bool {
        self.signals.contains(&signal)
    }
}

/// How DNS queries are followed.
#[derive(Clone, Copy, Debug)]
pub struct DnsOptions {
    /// A query without an answer for this long is a timeout.
    pub timeout: Duration,
    pub names: dns::Names,
}

impl Default for DnsOptions {
    fn default() -> Self {
        DnsOptions {
            timeout: Duration::from_secs(2),
            names: dns::Names::Full,
        }
    }
}

/// An address as the kernel programs keep it: IPv4 in the first 4 of 16 bytes.
pub(crate) fn ip(family: u8, addr: &[u8; 16]) -> std::net::IpAddr {
    if family == 4 {
        std::net::IpAddr::from([addr[0], addr[1], addr[2], addr[3]])
    } else {
        std::net::IpAddr::from(*addr)
    }
}
