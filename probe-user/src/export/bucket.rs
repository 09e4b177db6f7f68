//! A token bucket: the rates of the calls the daemon makes to the Kubernetes API on others'
//! behalf (`kube_events`' Events, `access`' token reviews and password checks per peer).

use std::time::Instant;

#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    pub tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    pub fn refill(&mut self, burst: f64, per_second: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_second).min(burst);
        self.at = now;
    }

    /// Refills, then takes a token if there is one.
    pub fn take(&mut self, burst: f64, per_second: f64, now: Instant) -> bool {
        self.refill(burst, per_second, now);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}
