//! faultline's own heap, handed back to the node once it is free, and tables sized for what
//! is left. glibc's malloc keeps what is freed for reuse: the pages of a burst (a node's pods
//! gone, a large exposition encoded, a batch of namespaces read) stay in the process's RSS,
//! counted against the DaemonSet's memory limit, after the state they held is gone. So:
//!
//! - blocks of [`MAP_FROM`] bytes and more are mapped on their own and unmapped when freed
//!   ([`tune`]). Left alone, glibc raises that threshold to the largest block freed so far (up
//!   to 32 MiB), after which each exposition's megabytes come from the heap and stay there;
//! - once per refresh ([`Release::tick`]), when at least [`RELEASE_AFTER`] more bytes lie free
//!   in the heap than at its fullest since the last release, the free pages inside it go back
//!   to the kernel too (`malloc_trim`), not only those at its top. A release walks every free
//!   block: after a large free, not on every refresh;
//! - a table pruned of what is gone gives back the room it no longer needs ([`shrink`]):
//!   hashbrown never shrinks by itself.
//!
//! Measured by the memory soak of `cargo xtask bench` (BENCHMARKS.md, *Memory as pods come and
//! go*; 2026-12-06, as deployed in 128 MiB, 20,000 pods, 500 alive at most), without and with
//! the first two: RSS 30 s after the churn 89.4 and 68.6 MiB, its least through the churn's
//! last interval 89.6 and 73.1 MiB, high-water mark 95.3 and 89.9 MiB, and once 1,000 live
//! pods had gone 64.3 and 43.3 MiB.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash},
};

/// Blocks this large or larger are mapped apart from the heap and unmapped when freed.
const MAP_FROM: usize = 1 << 20;
/// Bytes freed since the heap was fullest that make a release worth its walk.
const RELEASE_AFTER: usize = 4 << 20;

/// Tables of this many slots or fewer keep them whatever they hold.
const SHRINK_FROM: usize = 64;

/// After pruning: a table using a quarter of its capacity or less keeps room for twice what
/// it holds, and returns the rest.
pub fn shrink<K: Eq + Hash, V, S: BuildHasher>(map: &mut HashMap<K, V, S>) {
    if map.capacity() > SHRINK_FROM && map.len() * 4 <= map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}

/// Sets how glibc's malloc maps large blocks (process-wide; any time).
pub fn tune() {
    // SAFETY: mallopt only changes the allocator's parameters; a value it refuses is ignored.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MAP_FROM as libc::c_int) };
}

/// Free bytes inside malloc's arenas, released to the kernel or not (blocks mapped apart are
/// unmapped when freed, and not counted).
fn free_bytes() -> usize {
    // SAFETY: mallinfo2 reads the allocator's counters and takes no arguments.
    unsafe { libc::mallinfo2() }.fordblks
}

/// When the heap's free pages were last handed back, and how little of it was free since.
pub struct Release {
    /// The fewest free bytes seen since the last release.
    low: usize,
}

impl Default for Release {
    fn default() -> Self {
        Release { low: free_bytes() }
    }
}

impl Release {
    /// Once per refresh: hands the heap's free pages back when RELEASE_AFTER bytes were freed
    /// since it was fullest. Whether it did.
    pub fn tick(&mut self) -> bool {
        let free = free_bytes();
        if !self.due(free) {
            return false;
        }
        // SAFETY: malloc_trim only returns free pages of the allocator's own arenas.
        unsafe { libc::malloc_trim(0) };
        true
    }

    /// Takes the free bytes now: whether a release is due (and if so, counts from now).
    fn due(&mut self, free: usize) -> bool {
        self.low = self.low.min(free);
        let due = free - self.low >= RELEASE_AFTER;
        if due {
            self.low = free;
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pruned_table_gives_back_what_it_no_longer_needs() {
        let mut map: HashMap<u32, [u8; 64]> = (0..10_000).map(|i| (i, [0; 64])).collect();
        // Half still there: the room stays (it will be needed again).
        map.retain(|k, _| *k >= 5_000);
        let room = map.capacity();
        shrink(&mut map);
        assert_eq!(map.capacity(), room);
        // A burst gone: room for twice what is left, no more.
        map.retain(|k, _| *k >= 9_990);
        shrink(&mut map);
        assert!(map.capacity() <= SHRINK_FROM, "{}", map.capacity());
        assert_eq!(map.len(), 10);
        // Small tables are left alone.
        map.clear();
        shrink(&mut map);
        assert!(map.capacity() <= SHRINK_FROM);
    }

    #[test]
    fn a_release_follows_a_large_free_once_not_every_refresh() {
        let mut r = Release { low: 1 << 20 };
        // Small changes either way: nothing to hand back.
        assert!(!r.due(2 << 20));
        assert!(!r.due(1 << 20));
        // Pods gone, their state freed: one release...
        assert!(r.due(6 << 20));
        // ...and none while those pages stay free.
        assert!(!r.due(6 << 20));
        assert!(!r.due(7 << 20));
        // Reused (the heap fuller again), then freed again: pages touched since, released.
        assert!(!r.due(2 << 20));
        assert!(r.due(6 << 20));
    }
}
