//! The kernel's own counts of refusals, which it keeps whether or not anyone watches: per
//! cgroup, forks its pids limit refused (`pids.events` `max`) and its memory limit's hits, OOMs
//! and OOM kills (`memory.events`; v1: `memory.failcnt`, `memory.oom_control` `oom_kill`); per
//! network namespace, conntrack's `insert_failed`, `drop`, `early_drop` (read by the conntrack
//! signal, `conntrack::ctstats`). Read at start they are the past before faultline watched;
//! read again, an increase no event explains says a probe missed something (events lost, a
//! program not attached): [`RefusalWatch`] keeps that running total per counter.
//!
//! A cgroup's "since" is its directory's age: the earliest of its inode's times (kernfs sets
//! all three when it makes the inode, later changes only move them forward). If the kernel
//! evicted and re-made that inode, the cgroup is older than it says.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::Path,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    attribution::{
        cgroups::{CgroupFs, CgroupPath, Hierarchy},
        pods::{Attributor, PodRef},
    },
    signals::{Event, clone::cause::Cause as CloneCause, conntrack::Cause as DropCause},
};

/// Most cgroup directories read per walk (a node has thousands, not this many).
pub const MAX_CGROUPS: usize = 20_000;
/// The counters are read again at most this often...
const REREAD_MIN: Duration = Duration::from_secs(10);
/// ...and at least this many times what the last read took.
const REREAD_COST: u32 = 20;

/// A refusal counter the kernel keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Counter {
    /// Task creations the cgroup's pids limit refused (`pids.events` `max`).
    PidsMax,
    /// Times the cgroup's usage reached `memory.max` (reclaim followed; v2 `memory.events` `max`).
    MemoryMax,
    /// Times reclaim failed and the cgroup went OOM (v2 `memory.events` `oom`).
    MemoryOom,
    /// Processes the OOM killer killed in the cgroup (`oom_kill`).
    MemoryOomKill,
    /// Charges that hit the v1 memory limit (`memory.failcnt`; reclaim may have followed).
    MemoryFailcnt,
    /// Packets dropped because their conntrack entry lost the race to be confirmed.
    ConntrackInsertFailed,
    /// Packets dropped for want of a conntrack entry (table full, or a lost clash).
    ConntrackDrop,
    /// Entries evicted early to make room in a full table.
    ConntrackEarlyDrop,
}

impl Counter {
    /// As in the metric's `counter` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Counter::PidsMax => "pids_max",
            Counter::MemoryMax => "memory_max",
            Counter::MemoryOom => "memory_oom",
            Counter::MemoryOomKill => "memory_oom_kill",
            Counter::MemoryFailcnt => "memory_failcnt",
            Counter::ConntrackInsertFailed => "conntrack_insert_failed",
            Counter::ConntrackDrop => "conntrack_drop",
            Counter::ConntrackEarlyDrop => "conntrack_early_drop",
        }
    }

    /// The counters a probe reports each increase of, by an event: their increases are
    /// cross-checked.
    pub const PROBED: [Counter; 2] = [Counter::PidsMax, Counter::ConntrackInsertFailed];

    /// The counter an event accounts for one increase of.
    pub fn explained_by(event: &Event) -> Option<Counter> {
        match event {
            Event::CloneFailure(f) if f.cause == CloneCause::PidsLimit => Some(Counter::PidsMax),
            Event::ConntrackDrop(d) if d.cause == DropCause::InsertFailed => {
                Some(Counter::ConntrackInsertFailed)
            }
            // Other causes and signals move no counter cross-checked here.
            Event::CloneFailure(_)
            | Event::ConntrackDrop(_)
            | Event::DnsQuery(_)
            | Event::ClashesResolved(_)
            | Event::HeadroomWarning(_) => None,
        }
    }
}

/// One cgroup's non-zero refusal counters, attributed.
#[derive(Clone, Debug, PartialEq)]
pub struct CgroupRefusals {
    /// The controller's hierarchy (`Pids` or `Memory`; one directory on cgroup v2).
    pub hierarchy: Hierarchy,
    pub cgroup: CgroupPath,
    pub workload: String,
    pub pod: Option<Arc<PodRef>>,
    /// (counter, the kernel's count, the file it was read from).
    pub counts: Vec<(Counter, u64, &'static str)>,
    /// When the cgroup was made, as far as its directory tells (see the module's doc).
    pub made: Option<SystemTime>,
}

/// The cgroups' counters at the last read, and the increases no event explained.
#[derive(Clone, Debug, Default)]
pub struct Refusals {
    /// The cgroups with a non-zero counter at the last read.
    pub cgroups: Vec<CgroupRefusals>,
    /// The read stopped at [`MAX_CGROUPS`] directories: some were not read.
    pub truncated: bool,
    /// Per probed counter, increases since faultline started that no event explained
    /// (running totals; the conntrack ones from the conntrack signal's tables).
    pub unexplained: Vec<(Counter, u64)>,
}

/// Reads the counters (rate-limited) and cross-checks their increases with the events.
#[derive(Default)]
pub struct RefusalWatch {
    last: Option<Refusals>,
    last_read: Option<Instant>,
    took: Duration,
    /// Per (counter, key): the kernel's count at the last read.
    seen: HashMap<(Counter, String), u64>,
    ledger: HashMap<Counter, Ledger>,
}

/// One counter's increases against its events. An increase gets one read period for its
/// event to arrive (events lag the counter), an event one period for its increase to be read.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Ledger {
    /// Increases read and not yet explained.
    owed: u64,
    /// Events not yet matched by an increase read.
    credit: u64,
    unexplained: u64,
}

impl Ledger {
    fn event(&mut self) {
        if self.owed > 0 {
            self.owed -= 1;
        } else {
            self.credit += 1;
        }
    }

    /// A read found `delta` more: what was owed since the last read stays unexplained.
    fn read(&mut self, delta: u64) {
        self.unexplained += self.owed;
        let paid = delta.min(self.credit);
        self.owed = delta - paid;
        self.credit = 0;
    }
}

impl RefusalWatch {
    /// One event: it explains an increase of its counter, if any.
    pub fn event(&mut self, counter: Counter) {
        self.ledger.entry(counter).or_default().event();
    }

    /// The counters: every cgroup's when due (or `now`: a last refresh), else again those of
    /// the cgroups that had any at the last walk (a few files: what rose meanwhile is current
    /// at every refresh); `conntrack` is every namespace's (inode, counts) from the conntrack
    /// signal, for the cross-check.
    pub fn refresh(
        &mut self,
        attributor: &mut Attributor,
        conntrack: &[(u64, [(Counter, u64); 3])],
        now: bool,
    ) -> Refusals {
        let due = now
            || self
                .last_read
                .is_none_or(|t| t.elapsed() >= REREAD_MIN.max(self.took * REREAD_COST));
        if !due && let Some(last) = self.last.as_mut() {
            for c in &mut last.cgroups {
                reread(&attributor.cgroups, c);
            }
        }
        if due {
            let started = Instant::now();
            let (cgroups, truncated) = read_cgroups(&attributor.cgroups, MAX_CGROUPS);
            let mut totals: Vec<(Counter, String, u64)> = Vec::new();
            for c in &cgroups {
                for (counter, n, _) in &c.counts {
                    totals.push((*counter, c.cgroup.text(), *n));
                }
            }
            for (netns, counts) in conntrack {
                for (counter, n) in counts {
                    totals.push((*counter, format!("netns:{netns}"), *n));
                }
            }
            self.account(totals);
            let cgroups = cgroups
                .into_iter()
                .map(|mut c| {
                    let a = attributor.attribute_path(&c.cgroup.text());
                    c.workload = a.workload;
                    c.pod = a.pod;
                    c
                })
                .collect();
            self.last = Some(Refusals {
                cgroups,
                truncated,
                unexplained: Vec::new(),
            });
            self.took = started.elapsed();
            self.last_read = Some(Instant::now());
        }
        let mut out = self.last.clone().unwrap_or_default();
        out.unexplained = Counter::PROBED
            .iter()
            .map(|c| (*c, self.ledger.get(c).map_or(0, |l| l.unexplained)))
            .collect();
        out
    }

    /// The counts of one read: the first is the past (nothing to explain); later, each
    /// probed counter's increase over the node goes to its ledger (a key first seen counts
    /// from zero: made while watched; a key gone is no decrease).
    fn account(&mut self, totals: Vec<(Counter, String, u64)>) {
        let first = self.last.is_none();
        let mut deltas: HashMap<Counter, u64> = HashMap::new();
        let mut next = HashMap::with_capacity(totals.len());
        for (counter, key, n) in totals {
            let before = self.seen.get(&(counter, key.clone())).copied().unwrap_or(0);
            *deltas.entry(counter).or_default() += n.saturating_sub(before);
            next.insert((counter, key), n);
        }
        self.seen = next;
        if first {
            return;
        }
        for counter in Counter::PROBED {
            let delta = deltas.get(&counter).copied().unwrap_or(0);
            self.ledger.entry(counter).or_default().read(delta);
        }
    }
}

/// Every cgroup's non-zero counters in the pids and memory hierarchies (one walk where both
/// are the cgroup v2 tree), at most `budget` directories; true when the budget ran out.
/// Unattributed (`workload` is the path).
pub fn read_cgroups(fs: &CgroupFs, budget: usize) -> (Vec<CgroupRefusals>, bool) {
    let mut out = Vec::new();
    let mut truncated = false;
    let pids = fs.mount(Hierarchy::Pids);
    let memory = fs.mount(Hierarchy::Memory);
    let mut walks: Vec<(&Path, bool, Vec<Hierarchy>)> = Vec::new();
    for (h, m) in [(Hierarchy::Pids, pids), (Hierarchy::Memory, memory)] {
        let Some(m) = m else { continue };
        match walks.iter_mut().find(|(p, _, _)| *p == m.path.as_path()) {
            Some(w) => w.2.push(h),
            None => walks.push((m.path.as_path(), m.v2, vec![h])),
        }
    }
    for (mount, v2, hierarchies) in walks {
        truncated |= walk(mount, budget, |dir, path| {
            for h in &hierarchies {
                let mut counts = match h {
                    Hierarchy::Memory if v2 => memory_v2(dir),
                    Hierarchy::Memory => memory_v1(dir),
                    _ => pids_counts(dir),
                };
                counts.retain(|(_, n, _)| *n > 0);
                if !counts.is_empty() {
                    out.push(CgroupRefusals {
                        hierarchy: *h,
                        workload: path.text(),
                        cgroup: path.clone(),
                        pod: None,
                        counts,
                        made: made(dir),
                    });
                }
            }
        });
    }
    (out, truncated)
}

/// One cgroup's counters read again from the files they came from (a counter whose file is
/// gone keeps its last value: the cgroup went, and its count with it at the next walk).
fn reread(fs: &CgroupFs, c: &mut CgroupRefusals) {
    let Some(mount) = fs.mount(c.hierarchy) else {
        return;
    };
    let dir = c.cgroup.under(&mount.path);
    let fresh = match c.hierarchy {
        Hierarchy::Memory if mount.v2 => memory_v2(&dir),
        Hierarchy::Memory => memory_v1(&dir),
        _ => pids_counts(&dir),
    };
    for (counter, n, _) in &mut c.counts {
        if let Some((_, m, _)) = fresh.iter().find(|(k, _, _)| k == counter) {
            *n = *m;
        }
    }
}

/// Whether this node keeps a counter, for `faultline check`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Availability {
    /// Read from this file of each cgroup.
    File(&'static str),
    /// Not kept by this kernel or controller (or the controller is not mounted).
    Missing,
    /// No cgroup below the hierarchy's root to look at (the root has none of these files).
    NoCgroup,
}

/// What each hierarchy offers here: the file each counter is read from, looked up in one
/// cgroup below the root.
pub fn available(fs: &CgroupFs) -> Vec<(Counter, Availability)> {
    let look = |h: Hierarchy, counters: &[Counter], files: &[&'static str], key: Option<&str>| {
        let found = match fs.mount(h) {
            None => Availability::Missing,
            Some(m) => match std::fs::read_dir(&m.path).ok().and_then(|d| {
                d.flatten()
                    .find(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path())
            }) {
                None => Availability::NoCgroup,
                Some(child) => files
                    .iter()
                    .find(|f| match key {
                        Some(k) => {
                            keyed(&child.join(f)).is_some_and(|kv| kv.iter().any(|(n, _)| n == k))
                        }
                        None => child.join(f).exists(),
                    })
                    .map_or(Availability::Missing, |f| Availability::File(f)),
            },
        };
        counters
            .iter()
            .map(|c| (*c, found.clone()))
            .collect::<Vec<_>>()
    };
    let mut out = look(
        Hierarchy::Pids,
        &[Counter::PidsMax],
        &["pids.events.local", "pids.events"],
        None,
    );
    if fs.mount(Hierarchy::Memory).is_some_and(|m| m.v2) {
        out.extend(look(
            Hierarchy::Memory,
            &[
                Counter::MemoryMax,
                Counter::MemoryOom,
                Counter::MemoryOomKill,
            ],
            &["memory.events.local", "memory.events"],
            None,
        ));
    } else {
        out.extend(look(
            Hierarchy::Memory,
            &[Counter::MemoryFailcnt],
            &["memory.failcnt"],
            None,
        ));
        out.extend(look(
            Hierarchy::Memory,
            &[Counter::MemoryOomKill],
            &["memory.oom_control"],
            Some("oom_kill"),
        ));
    }
    out
}

/// Every directory under `mount` (the root included) until `budget` are visited; true when
/// the budget ran out. Paths stay bytes.
fn walk(mount: &Path, budget: usize, mut f: impl FnMut(&Path, &CgroupPath)) -> bool {
    let mut left = budget;
    let mut stack = vec![(mount.to_path_buf(), CgroupPath::root())];
    while let Some((dir, path)) = stack.pop() {
        if left == 0 {
            return true;
        }
        left -= 1;
        f(&dir, &path);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push((e.path(), path.child(&e.file_name())));
            }
        }
    }
    false
}

/// `pids.events.local` where the kernel has it (6.13+: counted at the limiting cgroup alone),
/// else `pids.events` (counted at the forking task's cgroup on older kernels and in v1).
fn pids_counts(dir: &Path) -> Vec<(Counter, u64, &'static str)> {
    for file in ["pids.events.local", "pids.events"] {
        if let Some(kv) = keyed(&dir.join(file)) {
            return kv
                .iter()
                .filter(|(k, _)| k == "max")
                .map(|(_, n)| (Counter::PidsMax, *n, file))
                .collect();
        }
    }
    Vec::new()
}

/// `memory.events.local` (5.2+, this cgroup's own) else `memory.events` (hierarchical).
fn memory_v2(dir: &Path) -> Vec<(Counter, u64, &'static str)> {
    for file in ["memory.events.local", "memory.events"] {
        if let Some(kv) = keyed(&dir.join(file)) {
            return kv
                .iter()
                .filter_map(|(k, n)| {
                    let c = match k.as_str() {
                        "max" => Counter::MemoryMax,
                        "oom" => Counter::MemoryOom,
                        "oom_kill" => Counter::MemoryOomKill,
                        _ => return None,
                    };
                    Some((c, *n, file))
                })
                .collect();
        }
    }
    Vec::new()
}

/// `memory.failcnt` and `memory.oom_control`'s `oom_kill` (4.13+).
fn memory_v1(dir: &Path) -> Vec<(Counter, u64, &'static str)> {
    let mut out = Vec::new();
    if let Some(n) = read_small(&dir.join("memory.failcnt")).and_then(|t| t.trim().parse().ok()) {
        out.push((Counter::MemoryFailcnt, n, "memory.failcnt"));
    }
    if let Some(kv) = keyed(&dir.join("memory.oom_control"))
        && let Some((_, n)) = kv.iter().find(|(k, _)| k == "oom_kill")
    {
        out.push((Counter::MemoryOomKill, *n, "memory.oom_control"));
    }
    out
}

/// Bytes read of a counter file at most (they are a few lines).
const MAX_FILE: u64 = 4096;

fn read_small(path: &Path) -> Option<String> {
    use std::io::Read as _;
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_FILE)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// A file of `key value` lines; lines that are not are skipped. None: no such file.
fn keyed(path: &Path) -> Option<Vec<(String, u64)>> {
    Some(parse_keyed(&read_small(path)?))
}

fn parse_keyed(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}

/// The earliest of the directory's inode times.
fn made(dir: &Path) -> Option<SystemTime> {
    let m = std::fs::metadata(dir).ok()?;
    let secs = [m.atime(), m.mtime(), m.ctime()].into_iter().min()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(u64::try_from(secs).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_increase_gets_one_period_for_its_event() {
        let mut l = Ledger::default();
        // 3 increases read; 2 events come before the next read: 1 unexplained.
        l.read(3);
        l.event();
        l.event();
        l.read(0);
        assert_eq!(l.unexplained, 1);
        // Events first, increases read after: explained.
        l.event();
        l.event();
        l.read(2);
        l.read(0);
        assert_eq!(l.unexplained, 1);
        // An event whose increase was never read (its cgroup went) does not hide a later one.
        l.event();
        l.read(0);
        l.read(1);
        l.read(0);
        assert_eq!(l.unexplained, 2);
    }

    #[test]
    fn the_first_read_is_the_past_and_later_ones_are_cross_checked() {
        let mut w = RefusalWatch::default();
        let read = |w: &mut RefusalWatch, a: u64, b: u64| {
            w.account(vec![
                (Counter::PidsMax, "/a".into(), a),
                (Counter::PidsMax, "/b".into(), b),
                (Counter::MemoryOomKill, "/a".into(), 9),
            ]);
            w.last = Some(Refusals::default());
        };
        read(&mut w, 400, 0);
        read(&mut w, 400, 0);
        assert!(w.ledger.values().all(|l| *l == Ledger::default()));
        // 2 more in /b, one event.
        read(&mut w, 400, 2);
        w.event(Counter::PidsMax);
        read(&mut w, 400, 2);
        assert_eq!(w.ledger[&Counter::PidsMax].unexplained, 1);
        // A cgroup gone and one made: only the new one's count is an increase.
        w.account(vec![(Counter::PidsMax, "/c".into(), 1)]);
        w.event(Counter::PidsMax);
        w.account(vec![]);
        assert_eq!(w.ledger[&Counter::PidsMax].unexplained, 1);
    }

    #[test]
    fn counter_files_are_read_defensively() {
        assert_eq!(
            parse_keyed("max 412\nbogus\noom x\noom_kill 3\n"),
            [("max".to_owned(), 412), ("oom_kill".to_owned(), 3)]
        );
        let root =
            std::env::temp_dir().join(format!("faultline-unit-refusals-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let d = root.join("kubepods/pod1");
        std::fs::create_dir_all(&d).expect("test");
        std::fs::write(d.join("pids.events"), "max 412\n").expect("test");
        std::fs::write(
            d.join("memory.events"),
            "low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\n",
        )
        .expect("test");
        assert_eq!(pids_counts(&d), [(Counter::PidsMax, 412, "pids.events")]);
        std::fs::write(d.join("pids.events.local"), "max 5\n").expect("test");
        assert_eq!(
            pids_counts(&d),
            [(Counter::PidsMax, 5, "pids.events.local")]
        );
        assert_eq!(memory_v2(&d).len(), 3);
        // Missing files: nothing, no error.
        assert!(memory_v1(&d).is_empty());
        assert!(pids_counts(&root).is_empty());
        let mut seen = Vec::new();
        assert!(!walk(&root, 10, |_, p| seen.push(p.text())));
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(walk(&root, 2, |_, _| {}));
        assert!(made(&d).is_some_and(|t| t <= SystemTime::now()));
        std::fs::remove_dir_all(&root).expect("test");
    }
}
