//! The HTTP server's counters (what it shed, what it failed to accept): built by `metrics`,
//! which registers their families, and updated by `serve` and `connections`. A module of its
//! own so that `metrics` need not know the server, which depends on it.

use prometheus::{IntCounter, IntCounterVec};

/// What the server shed and failed to accept, exported with the other metrics.
#[derive(Clone)]
pub struct ServerCounters {
    /// Connections the server closed, by reason (`connections::ShedReason`): to give their
    /// slot to a newcomer, or to let go of an old exposition or `/explain` answer.
    pub shed: IntCounterVec,
    /// accept(2) errors (e.g. EMFILE).
    pub accept_errors: IntCounter,
}
