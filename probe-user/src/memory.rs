//! Tables that give back their room: hashbrown never shrinks by itself, so the capacity of a
//! burst (a minute of pods coming and going, a storm of cgroups) would otherwise stay for
//! good after the state it held was pruned. What is kept is sized for what exists.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash},
};

/// Tables of this many slots or fewer keep them whatever they hold.
const SHRINK_FROM: usize = 64;

/// After pruning: a table using a quarter of its capacity or less keeps room for twice what
/// it holds, and returns the rest.
pub fn shrink<K: Eq + Hash, V, S: BuildHasher>(map: &mut HashMap<K, V, S>) {
    if map.capacity() > SHRINK_FROM && map.len() * 4 <= map.capacity() {
        map.shrink_to(map.len() * 2);
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
}
