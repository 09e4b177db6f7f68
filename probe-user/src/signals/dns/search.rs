//! The search-path chain: NXDOMAIN answers remembered per asker (cgroup and query type) for
//! a few seconds, so that an answer for `name` counts the NXDOMAINs for `name.<suffix>` that
//! preceded it. Kept per asker, an answer looks through its own cgroup's recent misses only
//! (a handful in a chain) rather than the node's: on a busy node every NOERROR answer paid
//! a walk of up to 4,096 names (BENCHMARKS.md, *A busy node*). A pod that asks for endless
//! missing names fills its own bucket, not another pod's. Each miss keeps a hash of its first
//! label, which a chain's answer shares: the walk compares integers, and bytes only where they
//! agree (the byte compares of a full bucket were 9% of the busy node's agent, `perf`).

use std::{
    collections::{HashMap, VecDeque},
    hash::{BuildHasher as _, BuildHasherDefault, DefaultHasher},
};

/// How long an NXDOMAIN may precede the answer it is part of the chain of.
pub const WINDOW_NS: u64 = 10_000_000_000;
/// NXDOMAINs remembered per asker: Kubernetes allows 32 search domains, a lookup's A and
/// AAAA are separate askers, and a few lookups run at once.
const PER_ASKER: usize = 64;
/// Askers remembered at once; past this the one with the oldest last miss is forgotten.
const ASKERS: usize = 1024;

/// Who asked: a cgroup and a query type (a chain repeats one type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Asker {
    pub cgroup: u64,
    pub qtype: u16,
}

/// One remembered NXDOMAIN: when it was answered and for what name.
struct Miss {
    at_ns: u64,
    /// `first_label` of `qname`.
    first: u64,
    qname: String,
}

/// A hash of the name's first label (all of it without a dot): equal for `name` and every
/// `name.<suffix>`. Fixed keys: the same name hashes the same for the process's life.
fn first_label(name: &str) -> u64 {
    let label = name.split_once('.').map_or(name, |(first, _)| first);
    BuildHasherDefault::<DefaultHasher>::default().hash_one(label)
}

/// Recent NXDOMAIN answers, per asker.
#[derive(Default)]
pub struct RecentMisses {
    by_asker: HashMap<Asker, VecDeque<Miss>>,
}

impl RecentMisses {
    /// An NXDOMAIN for `qname`, answered at `at_ns`.
    pub fn note(&mut self, asker: Asker, qname: &str, at_ns: u64) {
        if !self.by_asker.contains_key(&asker) && self.by_asker.len() >= ASKERS {
            self.forget_one(at_ns);
        }
        let misses = self.by_asker.entry(asker).or_default();
        while misses
            .front()
            .is_some_and(|m| at_ns.saturating_sub(m.at_ns) >= WINDOW_NS)
            || misses.len() >= PER_ASKER
        {
            misses.pop_front();
        }
        misses.push_back(Miss {
            at_ns,
            first: first_label(qname),
            qname: qname.to_owned(),
        });
    }

    /// An answer for `qname` at `now`: the asker's NXDOMAINs within the window for
    /// `qname.<suffix>`, counted and forgotten (each belongs to one chain).
    pub fn chain_before(&mut self, asker: Asker, qname: &str, now: u64) -> u32 {
        let Some(misses) = self.by_asker.get_mut(&asker) else {
            return 0;
        };
        let before = misses.len();
        let first = first_label(qname);
        misses.retain(|m| {
            !(m.first == first
                && now.saturating_sub(m.at_ns) < WINDOW_NS
                && m.qname.len() > qname.len()
                && m.qname.starts_with(qname)
                && m.qname.as_bytes()[qname.len()] == b'.')
        });
        let counted = before - misses.len();
        if misses.is_empty() {
            self.by_asker.remove(&asker);
        }
        u32::try_from(counted).unwrap_or(u32::MAX)
    }

    /// Room for a new asker: those whose misses are all past the window go; if none is, the
    /// one whose last miss is oldest.
    fn forget_one(&mut self, now: u64) {
        let before = self.by_asker.len();
        self.by_asker.retain(|_, misses| {
            misses
                .back()
                .is_some_and(|m| now.saturating_sub(m.at_ns) < WINDOW_NS)
        });
        if self.by_asker.len() < before {
            return;
        }
        let oldest = self
            .by_asker
            .iter()
            .min_by_key(|(_, misses)| misses.back().map_or(0, |m| m.at_ns))
            .map(|(asker, _)| *asker);
        if let Some(asker) = oldest {
            self.by_asker.remove(&asker);
        }
    }

    /// NXDOMAINs remembered, over all askers.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_asker.values().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Asker = Asker {
        cgroup: 7,
        qtype: 1,
    };

    #[test]
    fn a_chain_counts_its_own_misses_once() {
        let mut r = RecentMisses::default();
        for (i, suffix) in [
            "default.svc.cluster.local",
            "svc.cluster.local",
            "cluster.local",
        ]
        .iter()
        .enumerate()
        {
            r.note(A, &format!("api.example.com.{suffix}"), i as u64);
        }
        // Another type, another cgroup, a name that only shares a prefix: not this chain.
        r.note(Asker { qtype: 28, ..A }, "api.example.com.cluster.local", 3);
        r.note(Asker { cgroup: 8, ..A }, "api.example.com.cluster.local", 3);
        r.note(A, "api.example.community.local", 3);
        assert_eq!(r.chain_before(A, "api.example.com", 5), 3);
        assert_eq!(r.chain_before(A, "api.example.com", 6), 0);
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn misses_past_the_window_are_not_counted() {
        let mut r = RecentMisses::default();
        r.note(A, "db.svc.cluster.local", 0);
        r.note(A, "db.cluster.local", WINDOW_NS - 1);
        assert_eq!(r.chain_before(A, "db", WINDOW_NS + 1), 1);
    }

    #[test]
    fn one_asker_of_endless_misses_is_bounded_and_leaves_others_alone() {
        let mut r = RecentMisses::default();
        let other = Asker { cgroup: 9, ..A };
        r.note(other, "web.svc.cluster.local", 0);
        for i in 0..10_000u64 {
            r.note(A, &format!("x{i}.svc.cluster.local"), i);
        }
        assert_eq!(r.len(), PER_ASKER + 1);
        assert_eq!(r.chain_before(other, "web", 10_000), 1);
    }

    #[test]
    fn askers_are_bounded_the_stalest_forgotten_first() {
        let mut r = RecentMisses::default();
        for c in 0..(ASKERS as u64 + 10) {
            r.note(Asker { cgroup: c, ..A }, "a.b", c);
        }
        assert_eq!(r.by_asker.len(), ASKERS);
        assert!(!r.by_asker.contains_key(&Asker { cgroup: 0, ..A }));
        assert!(r.by_asker.contains_key(&Asker {
            cgroup: ASKERS as u64 + 9,
            ..A
        }));
    }
}
