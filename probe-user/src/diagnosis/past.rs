//! The past before faultline watched: the kernel's refusal counts (`signals::refusals`, the
//! conntrack tables' counters) at the first refresh, kept with what each rose by since, for
//! findings of their own kind apart from what was seen happen. Bounded: the cgroups and
//! namespaces with the most refusals, at most [`MAX_PAST`].

use std::{collections::HashMap, time::SystemTime};

use crate::{
    attribution::cgroups::Hierarchy,
    attribution::netns::NetnsKey,
    diagnosis::history::Who,
    signals::{
        conntrack::CtTable,
        refusals::{Counter, Refusals},
    },
};

/// Most cgroups and namespaces remembered with past refusals.
pub const MAX_PAST: usize = 50;

/// What a count belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Resource {
    /// A cgroup (its path) in the pids or memory hierarchy.
    Cgroup(Hierarchy, String),
    /// A network namespace, and its inode where known (matched by the key alone).
    Netns(NetnsKey, Option<u64>),
}

/// One cgroup's or namespace's counts at the start, and now.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub resource: Resource,
    pub who: Who,
    /// The file each count comes from (`pids.events`, `memory.events.local`,
    /// `memory.oom_control`, ...); `ctnetlink` for a namespace's.
    pub files: Vec<(Counter, &'static str)>,
    pub first: Vec<(Counter, u64)>,
    /// At the last refresh; none once the cgroup or namespace is gone.
    pub latest: Option<Vec<(Counter, u64)>>,
    /// When the cgroup was made, as far as its directory tells.
    pub made: Option<SystemTime>,
}

impl Entry {
    /// The file `c` was read from.
    pub fn file(&self, c: Counter) -> &'static str {
        self.files
            .iter()
            .find(|(k, _)| *k == c)
            .map_or("", |(_, f)| *f)
    }

    pub fn first(&self, c: Counter) -> u64 {
        get(&self.first, c)
    }

    /// What `c` rose by while watched (none: gone).
    pub fn while_watched(&self, c: Counter) -> Option<u64> {
        let latest = self.latest.as_ref()?;
        Some(get(latest, c).saturating_sub(self.first(c)))
    }
}

fn get(counts: &[(Counter, u64)], c: Counter) -> u64 {
    counts.iter().find(|(k, _)| *k == c).map_or(0, |(_, n)| *n)
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Past {
    pub entries: Vec<Entry>,
    /// Cgroups and namespaces with past refusals beyond [`MAX_PAST`].
    pub left_out: usize,
    /// The first read did not reach every cgroup.
    pub truncated: bool,
}

fn netns_counts(t: &CtTable) -> Vec<(Counter, u64)> {
    let c = &t.counters;
    [
        (Counter::ConntrackInsertFailed, c.insert_failed),
        (Counter::ConntrackDrop, c.drop),
        (Counter::ConntrackEarlyDrop, c.early_drop),
    ]
    .into_iter()
    .filter(|(_, n)| *n > 0)
    .collect()
}

impl Past {
    /// The counts of the first refresh.
    pub fn new(refusals: &Refusals, tables: &[CtTable]) -> Past {
        let mut entries: Vec<Entry> = refusals
            .cgroups
            .iter()
            .map(|c| {
                let cgroup = c.cgroup.text();
                Entry {
                    resource: Resource::Cgroup(c.hierarchy, cgroup.clone()),
                    who: Who::new(&c.workload, c.pod.as_deref(), Some(&cgroup)),
                    files: c.counts.iter().map(|(k, _, f)| (*k, *f)).collect(),
                    first: c.counts.iter().map(|(k, n, _)| (*k, *n)).collect(),
                    latest: None,
                    made: c.made,
                }
            })
            .collect();
        entries.extend(tables.iter().filter_map(|t| {
            let first = netns_counts(t);
            (!first.is_empty()).then(|| Entry {
                resource: Resource::Netns(t.key, t.netns),
                who: Who::new(&t.workload, None, None),
                files: first.iter().map(|(k, _)| (*k, t.source.file())).collect(),
                first,
                latest: None,
                made: None,
            })
        }));
        // The most refused first.
        entries.sort_by_key(|e| std::cmp::Reverse(e.first.iter().map(|(_, n)| *n).sum::<u64>()));
        let left_out = entries.len().saturating_sub(MAX_PAST);
        entries.truncate(MAX_PAST);
        let mut past = Past {
            entries,
            left_out,
            truncated: refusals.truncated,
        };
        past.update(refusals, tables);
        past
    }

    /// The counts of a later refresh.
    pub fn update(&mut self, refusals: &Refusals, tables: &[CtTable]) {
        let mut now: HashMap<Resource, Vec<(Counter, u64)>> = HashMap::new();
        for c in &refusals.cgroups {
            now.insert(
                Resource::Cgroup(c.hierarchy, c.cgroup.text()),
                c.counts.iter().map(|(k, n, _)| (*k, *n)).collect(),
            );
        }
        for t in tables {
            now.insert(Resource::Netns(t.key, t.netns), netns_counts(t));
        }
        let conntrack_read = !tables.is_empty();
        for e in &mut self.entries {
            match now.remove(&e.resource) {
                Some(latest) => e.latest = Some(latest),
                // A namespace's tables are absent when the conntrack signal was not polled.
                None if matches!(e.resource, Resource::Netns(..)) && !conntrack_read => {}
                None => e.latest = None,
            }
        }
    }
}
