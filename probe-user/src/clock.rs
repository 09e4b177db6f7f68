//! Times as reported: RFC 3339 in UTC with milliseconds, for now and for kernel timestamps
//! (`bpf_ktime_get_ns()`, CLOCK_MONOTONIC).

use std::time::{Duration, SystemTime};

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// Places CLOCK_MONOTONIC stamps on the wall clock. The offset between the two is re-measured
/// every `OFFSET_REREAD`: the wall clock is stepped and slewed (NTP, VM time sync), and an
/// offset measured once drifts by tens of milliseconds within minutes on a VM; measuring it
/// for every event costs two clock reads per conversion in an event storm.
#[derive(Default)]
pub struct KernelClock {
    /// (CLOCK_MONOTONIC when measured, CLOCK_REALTIME - CLOCK_MONOTONIC).
    offset: std::cell::Cell<Option<(i128, i128)>>,
}

const OFFSET_REREAD: i128 = 10_000_000;

impl KernelClock {
    pub fn new() -> Self {
        KernelClock::default()
    }

    fn offset(&self) -> i128 {
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        match self.offset.get() {
            Some((at, offset)) if mono - at < OFFSET_REREAD => offset,
            _ => {
                let offset = clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC);
                self.offset.set(Some((mono, offset)));
                offset
            }
        }
    }

    /// Now on the kernel's clock (what `bpf_ktime_get_ns()` would say).
    pub fn now_ktime(&self) -> u64 {
        u64::try_from(clock_ns(libc::CLOCK_MONOTONIC)).unwrap_or(0)
    }

    pub fn unix_nano(&self, ktime_ns: u64) -> u64 {
        u64::try_from(ktime_ns as i128 + self.offset()).unwrap_or(0)
    }

    pub fn rfc3339(&self, ktime_ns: u64) -> String {
        rfc3339(SystemTime::UNIX_EPOCH + Duration::from_nanos(self.unix_nano(ktime_ns)))
    }
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_stamps_land_near_now() {
        let clock = KernelClock::new();
        let now_mono = clock_ns(libc::CLOCK_MONOTONIC) as u64;
        let a = clock.rfc3339(now_mono);
        let b = now_rfc3339();
        // Same second (allowing for a tick between the two reads).
        assert_eq!(a.len(), "2026-11-22T00:31:21.322Z".len());
        assert_eq!(a[..16], b[..16], "{a} vs {b}");
    }
}
