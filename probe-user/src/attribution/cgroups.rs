//! The node's cgroup hierarchies (v2, and v1 controllers on hybrid or legacy hosts) and the
//! translation of the kernel's cgroup ids (inode numbers of cgroup directories) into paths.
//!
//! Attribution by id, not by walk: the cgroups that exist at start are walked once; from
//! then on the kernel reports each cgroup v2 directory it makes, with its id and path
//! (`probe-ebpf/src/cgroups.rs`), and a path names it unless another cgroup is at that path
//! now (its inode is not the id). An id no one can name is remembered as unknown for a short while, so a
//! storm of events from it costs one lookup per while; a walk happens only where the records
//! missed something (or where they are not followed: v1 hierarchies, a refused program), and
//! rarely. Paths are kept as bytes (a cgroup's name need not be UTF-8) and escaped for display.

use std::{
    collections::HashMap,
    ffi::OsStr,
    os::unix::{
        ffi::OsStrExt as _,
        fs::{DirEntryExt as _, MetadataExt as _},
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use probe_common::{
    cgroups::{
        self as common, CGROUP_HEADER_BYTES, CGROUP_MADE, CGROUP_REMOVED, CgroupEventHeader,
        CgroupStat, PATH_INCOMPLETE,
    },
    tasks::CGROUP_V2_ROOT,
};

use crate::kernel::loader::{Attachment, Degraded, Probes, brief, decode, raw};

/// cgroup v2 directories made and removed, for naming cgroups by id.
pub const PROGRAMS: [Attachment; 2] = [
    raw("cgroup_mkdir", "cgroup_mkdir"),
    raw("cgroup_rmdir", "cgroup_rmdir"),
];

/// A cgroup hierarchy the kernel ids can refer to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hierarchy {
    /// cgroup v2: `bpf_get_current_cgroup_id()` ids.
    Unified,
    /// Wherever the pids controller lives (v1 `pids` or v2).
    Pids,
    /// Wherever the memory controller lives (v1 `memory` or v2).
    Memory,
}

/// Where one hierarchy is mounted and whether it is cgroup v2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub path: PathBuf,
    pub v2: bool,
}

/// The shortest wait between two walks of one hierarchy...
const RESCAN_MIN: Duration = Duration::from_millis(250);
/// ...and at least this many times what the last walk took: walking takes at most a
/// twentieth of the thread that attributes events, however big the tree.
const RESCAN_COST: u32 = 20;
/// How long an id no lookup found is answered "unknown" at once before it is looked up
/// again: events from a cgroup that cannot be named cost one lookup per this, never a walk
/// per event.
const UNKNOWN_RETRY: Duration = Duration::from_millis(500);
/// Most ids remembered as unknown at once.
const MAX_UNKNOWN: usize = 4096;
/// How long a removed cgroup keeps its name: events of short-lived tasks often arrive after
/// their cgroup is gone.
const REMOVED_GRACE: Duration = Duration::from_secs(60);
/// Removed cgroups past their grace are forgotten at most this often.
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// Bounds one walk of a hierarchy (a node has thousands of cgroups, not millions).
const MAX_WALK_ENTRIES: usize = 200_000;
/// The id (inode) of a cgroup hierarchy's root directory.
const ROOT_ID: u64 = 1;

/// A cgroup's path inside its hierarchy (`/` for the root), as the kernel spells it: bytes,
/// since a cgroup's name need not be UTF-8. Files are reached through the bytes
/// ([`CgroupPath::under`]); [`CgroupPath::text`] is for people, labels and JSON.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CgroupPath(Vec<u8>);

impl CgroupPath {
    pub fn root() -> Self {
        CgroupPath(b"/".to_vec())
    }

    /// A path as the kernel formats it (`/a/b`). Only an absolute path without NUL bytes
    /// and without an empty, `.` or `..` component: it names a directory under its mount
    /// and cannot lead out of it.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        if bytes == b"/" {
            return Some(Self::root());
        }
        let names = bytes.strip_prefix(b"/")?;
        let sound = !bytes.contains(&0)
            && names
                .split(|b| *b == b'/')
                .all(|name| !name.is_empty() && name != b"." && name != b"..");
        sound.then(|| CgroupPath(bytes.to_vec()))
    }

    pub fn is_root(&self) -> bool {
        self.0 == b"/"
    }

    /// The child directory `name` (one path component, as read from the directory).
    pub fn child(&self, name: &OsStr) -> Self {
        let mut bytes = if self.is_root() {
            Vec::new()
        } else {
            self.0.clone()
        };
        bytes.push(b'/');
        bytes.extend_from_slice(name.as_bytes());
        CgroupPath(bytes)
    }

    /// The parent cgroup's path; none for the root.
    pub fn parent(&self) -> Option<Self> {
        if self.is_root() {
            return None;
        }
        match self.0.iter().rposition(|b| *b == b'/')? {
            0 => Some(Self::root()),
            i => Some(CgroupPath(self.0[..i].to_vec())),
        }
    }

    /// The cgroup's directory under the hierarchy's mount.
    pub fn under(&self, mount: &Path) -> PathBuf {
        mount.join(OsStr::from_bytes(&self.0[1..]))
    }

    /// For people, labels and JSON: valid UTF-8 as is, any other byte as `\xNN`
    /// ([`crate::text::from_bytes`]; terminals get [`crate::text::printable`] on top).
    pub fn text(&self) -> String {
        crate::text::from_bytes(&self.0)
    }
}

/// The kernel's records of cgroup v2 directories made and removed (`probe-ebpf/src/cgroups.rs`),
/// and its count of those that did not fit in their ring.
pub struct CgroupEvents {
    ring: RingBuf<MapData>,
    stats: PerCpuArray<MapData, u64>,
}

impl CgroupEvents {
    pub fn new(ring: RingBuf<MapData>, stats: PerCpuArray<MapData, u64>) -> Self {
        CgroupEvents { ring, stats }
    }

    /// Records the kernel could not deliver (ring full), summed over CPUs; 0 while unreadable.
    fn lost(&self) -> u64 {
        self.stats
            .get(&(CgroupStat::RingbufFull as u32), 0)
            .map_or(0, |per_cpu| per_cpu.iter().sum())
    }
}

/// A known cgroup: its path, and since when it is removed (None = present).
struct Known {
    path: CgroupPath,
    gone: Option<Instant>,
}

/// When a hierarchy was last walked and how long that took.
struct Walked {
    at: Instant,
    took: Duration,
}

/// Following the kernel's records of the v2 directories it makes: a new cgroup is named from
/// its record, and a walk finds only what the records did not say.
struct Followed {
    events: CgroupEvents,
    /// The kernel's count of records it could not deliver, when the last walk began.
    lost_at_walk: u64,
    /// When that count was last read, and what it was: read at most once per RESCAN_MIN.
    lost_read: Option<(Instant, u64)>,
    /// A record's path was cut short since the last walk: only a walk can name that cgroup.
    incomplete: bool,
}

pub struct CgroupFs {
    mounts: HashMap<Hierarchy, Mount>,
    /// Known cgroups by (hierarchy, id).
    known: HashMap<(Hierarchy, u64), Known>,
    /// Ids no lookup found, and when they may be looked up again.
    unknown: HashMap<(Hierarchy, u64), Instant>,
    walked: HashMap<Hierarchy, Walked>,
    /// The cgroup v2 hierarchy's records, where the naming programs are attached.
    followed: Option<Followed>,
    /// When removed cgroups past their grace were last forgotten.
    last_prune: Instant,
}

impl CgroupFs {
    /// Discovers the hierarchies from /proc/self/mountinfo.
    pub fn discover() -> anyhow::Result<Self> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| anyhow::anyhow!("reading /proc/self/mountinfo: {e}"))?;
        Ok(Self::from_mounts(parse_mountinfo(&mountinfo, |p| {
            std::fs::read_to_string(p.join("cgroup.controllers")).unwrap_or_default()
        })))
    }

    /// Discovers the hierarchies, and follows the cgroup v2 directories the kernel makes from
    /// now on (the naming programs), after one walk for those that exist already. Where that
    /// cannot be, it says why and counts the tasks probe degraded (`faultline check`, the
    /// log, `faultline_probe_degraded`), and new cgroups are found by walking, as in v1
    /// hierarchies.
    pub fn open(probes: &mut Probes) -> anyhow::Result<Self> {
        let mut fs = Self::discover()?;
        if let Err(e) = fs.follow(probes) {
            let degraded = Degraded::CgroupsNamedByWalk;
            tracing::warn!(
                "{} probe degraded: {} (walks at most every {RESCAN_MIN:?}, or {RESCAN_COST}x the last walk's time): {}",
                degraded.probe(),
                degraded.describe(),
                brief(&e)
            );
            probes.degraded.push(degraded);
        }
        Ok(fs)
    }

    /// No hierarchy at all (tests).
    #[cfg(test)]
    pub(crate) fn none() -> Self {
        Self::from_mounts(HashMap::new())
    }

    fn from_mounts(mounts: HashMap<Hierarchy, Mount>) -> Self {
        CgroupFs {
            mounts,
            known: HashMap::new(),
            unknown: HashMap::new(),
            walked: HashMap::new(),
            followed: None,
            last_prune: Instant::now(),
        }
    }

    /// Whether the kernel's records can be followed here: where the v2 mount shows the
    /// hierarchy's root, since the kernel's paths start there.
    pub fn followable(&self) -> anyhow::Result<()> {
        let mount = &self
            .mounts
            .get(&Hierarchy::Unified)
            .context("no cgroup v2 mount")?
            .path;
        let root =
            std::fs::metadata(mount).with_context(|| format!("reading {}", mount.display()))?;
        if root.ino() != ROOT_ID {
            bail!(
                "{} is not the cgroup v2 hierarchy's root (a cgroup namespace's view?): the kernel's paths cannot be found under it",
                mount.display()
            );
        }
        Ok(())
    }

    /// Attaches the naming programs and takes their records, then walks the v2 hierarchy
    /// once.
    fn follow(&mut self, probes: &mut Probes) -> anyhow::Result<()> {
        self.followable()?;
        probes.attach(&PROGRAMS)?;
        let ring = probes.take_ring(common::EVENTS)?;
        let stats = PerCpuArray::try_from(probes.take_map(common::STATS)?)
            .with_context(|| format!("{} is not a per-CPU array", common::STATS))?;
        let events = CgroupEvents::new(ring, stats);
        let now = Instant::now();
        self.followed = Some(Followed {
            events,
            lost_at_walk: 0,
            lost_read: None,
            incomplete: false,
        });
        // After attaching: a cgroup made meanwhile is walked, recorded, or both.
        self.rescan(Hierarchy::Unified, now);
        Ok(())
    }

    pub fn mount(&self, h: Hierarchy) -> Option<&Mount> {
        self.mounts.get(&h)
    }

    /// The directory of a cgroup within a hierarchy.
    pub fn dir(&self, h: Hierarchy, path: &CgroupPath) -> Option<PathBuf> {
        Some(path.under(&self.mounts.get(&h)?.path))
    }

    /// Records of new cgroup v2 directories the kernel could not deliver (ring full); none
    /// when it is not followed.
    pub fn events_lost(&self) -> Option<u64> {
        self.followed.as_ref().map(|f| f.events.lost())
    }

    /// The hierarchy whose ids `h` uses: there is one cgroup v2 hierarchy, whichever
    /// controllers it has.
    fn space(&self, h: Hierarchy) -> Hierarchy {
        match self.mounts.get(&h) {
            Some(m) if m.v2 => Hierarchy::Unified,
            _ => h,
        }
    }

    /// Path of the cgroup with this id inside its hierarchy (`/` for the root), or `None` if
    /// no such cgroup exists (any more) or it cannot be named now.
    pub fn path(&mut self, h: Hierarchy, id: u64) -> Option<CgroupPath> {
        if id == 0 {
            return None;
        }
        let key = (self.space(h), id);
        if key.0 == Hierarchy::Unified && !self.known.contains_key(&key) {
            // A cgroup made since the last catch-up has its record in the ring by now.
            self.catch_up();
        }
        if let Some(k) = self.known.get(&key) {
            return Some(k.path.clone());
        }
        let now = Instant::now();
        if self.unknown.get(&key).is_some_and(|at| now < *at) {
            return None;
        }
        if self.walk_due(key.0, now) {
            self.rescan(key.0, now);
            if let Some(k) = self.known.get(&key) {
                self.unknown.remove(&key);
                return Some(k.path.clone());
            }
        }
        if self.unknown.len() >= MAX_UNKNOWN {
            self.unknown.retain(|_, at| now < *at);
            if self.unknown.len() >= MAX_UNKNOWN {
                self.unknown.clear();
            }
        }
        self.unknown.insert(key, now + UNKNOWN_RETRY);
        None
    }

    /// Takes every record the kernel has sent, verifying each made directory before naming
    /// it. The pipeline calls it before each batch of events (and lookups of an unknown id
    /// do), so an event from a cgroup made a moment earlier finds its name.
    pub fn catch_up(&mut self) {
        let now = Instant::now();
        let mut record = Vec::new();
        while let Some(f) = self.followed.as_mut() {
            let Some(item) = f.events.ring.next() else {
                break;
            };
            record.clear();
            record.extend_from_slice(&item);
            drop(item);
            self.take(&record, now);
        }
        if now.duration_since(self.last_prune) >= PRUNE_EVERY {
            self.forget_removed(now);
        }
    }

    /// Forgets the cgroups removed more than REMOVED_GRACE ago in every hierarchy (followed
    /// or walked) and the ids no longer answered "unknown", and the room they took: what is
    /// kept is what exists, and the last minute's removals.
    fn forget_removed(&mut self, now: Instant) {
        self.last_prune = now;
        self.known
            .retain(|_, k| k.gone.is_none_or(|t| now.duration_since(t) < REMOVED_GRACE));
        crate::memory::shrink(&mut self.known);
        self.unknown.retain(|_, at| now < *at);
        crate::memory::shrink(&mut self.unknown);
    }

    /// One record: a made directory is named once its path is verified, a removed one
    /// keeps its name for REMOVED_GRACE.
    fn take(&mut self, record: &[u8], now: Instant) {
        let Some(header) = decode::<CgroupEventHeader>(record) else {
            tracing::warn!(
                "skipped a cgroup record of {} bytes (expected at least {CGROUP_HEADER_BYTES})",
                record.len()
            );
            return;
        };
        if header.hierarchy != CGROUP_V2_ROOT {
            return;
        }
        let key = (Hierarchy::Unified, header.id);
        match header.kind {
            CGROUP_REMOVED => {
                if let Some(k) = self.known.get_mut(&key) {
                    k.gone.get_or_insert(now);
                }
            }
            CGROUP_MADE if header.flags & PATH_INCOMPLETE != 0 => {
                if let Some(f) = self.followed.as_mut() {
                    f.incomplete = true;
                }
            }
            CGROUP_MADE => {
                let Some(mount) = self.mounts.get(&Hierarchy::Unified) else {
                    return;
                };
                let path = record
                    .get(CGROUP_HEADER_BYTES..)
                    .and_then(|rest| rest.get(..usize::from(header.path_len)));
                match path.and_then(|p| verify(&mount.path, header.id, p)) {
                    Some(path) => {
                        self.known.insert(key, Known { path, gone: None });
                        self.unknown.remove(&key);
                    }
                    // Removed and made again (its own record follows), or not the kernel's form.
                    None => tracing::debug!(
                        "cgroup {} not named: its recorded path is another cgroup now",
                        header.id
                    ),
                }
            }
            _ => {}
        }
    }

    /// Whether a lookup may walk `h` now: rarely (RESCAN_MIN, RESCAN_COST), and in the
    /// followed v2 hierarchy only when the kernel's records missed something since the last
    /// walk (a full ring, a path cut short).
    fn walk_due(&mut self, h: Hierarchy, now: Instant) -> bool {
        if !self.mounts.contains_key(&h) {
            return false;
        }
        if self
            .walked
            .get(&h)
            .is_some_and(|w| now.duration_since(w.at) < RESCAN_MIN.max(w.took * RESCAN_COST))
        {
            return false;
        }
        match self.followed.as_mut() {
            Some(f) if h == Hierarchy::Unified => {
                let lost = match f.lost_read {
                    Some((at, lost)) if now.duration_since(at) < RESCAN_MIN => lost,
                    _ => {
                        let lost = f.events.lost();
                        f.lost_read = Some((now, lost));
                        lost
                    }
                };
                f.incomplete || lost > f.lost_at_walk
            }
            _ => true,
        }
    }

    /// Walks hierarchy `h`, naming every cgroup found. Where records are not followed, the
    /// walk is also how a removal is seen: a cgroup it no longer finds keeps its name for
    /// REMOVED_GRACE.
    fn rescan(&mut self, h: Hierarchy, now: Instant) {
        let Some(mount) = self.mounts.get(&h).map(|m| m.path.clone()) else {
            return;
        };
        match self.followed.as_mut() {
            Some(f) if h == Hierarchy::Unified => {
                // Read before walking: a record lost during the walk asks for the next one.
                f.lost_at_walk = f.events.lost();
                f.incomplete = false;
            }
            _ => {
                for ((hh, _), k) in self.known.iter_mut() {
                    if *hh == h && k.gone.is_none() {
                        k.gone = Some(now);
                    }
                }
                self.forget_removed(now);
            }
        }
        let start = Instant::now();
        walk(&mount, MAX_WALK_ENTRIES, |id, path| {
            self.known.insert((h, id), Known { path, gone: None });
        });
        self.walked.insert(
            h,
            Walked {
                at: start,
                took: start.elapsed(),
            },
        );
    }
}

/// The cgroup path of a record, unless the directory at that path under the v2 mount is
/// another cgroup now (removed and made again: no record may name one cgroup's events after
/// another). Nothing there is the record's word: the kernel records a mkdir before the
/// directory is visible, and a short-lived cgroup (a container whose first fork fails and
/// which exits at once) may be gone before its record is read; its removal's record follows.
fn verify(mount: &Path, id: u64, raw: &[u8]) -> Option<CgroupPath> {
    let path = CgroupPath::parse(raw)?;
    match std::fs::symlink_metadata(path.under(mount)) {
        Ok(meta) => (meta.is_dir() && meta.ino() == id).then_some(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(path),
        Err(_) => None,
    }
}

/// Every directory under `mount` (the root included), with its inode and path, until
/// `budget` entries are read. Depth does not matter; paths stay bytes.
fn walk(mount: &Path, budget: usize, mut f: impl FnMut(u64, CgroupPath)) {
    let Ok(root) = std::fs::metadata(mount) else {
        return;
    };
    f(root.ino(), CgroupPath::root());
    let mut left = budget;
    let mut stack = vec![(mount.to_path_buf(), CgroupPath::root())];
    while let Some((dir, path)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if left == 0 {
                return;
            }
            left -= 1;
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let child = path.child(&entry.file_name());
                // kernfs gives each directory entry its inode: no stat per cgroup.
                f(entry.ino(), child.clone());
                stack.push((entry.path(), child));
            }
        }
    }
}

/// Picks the cgroup mounts out of mountinfo. `controllers_of` reads a v2 mount's
/// `cgroup.controllers` (a parameter so the parsing is testable without a real mount).
pub(crate) fn parse_mountinfo(
    mountinfo: &str,
    controllers_of: impl Fn(&Path) -> String,
) -> HashMap<Hierarchy, Mount> {
    let mut mounts = HashMap::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = left.split(' ').nth(4) else {
            continue;
        };
        let mut right = right.split(' ');
        let (Some(fstype), Some(_source), Some(options)) =
            (right.next(), right.next(), right.next())
        else {
            continue;
        };
        let path = PathBuf::from(unescape(mount_point));
        match fstype {
            "cgroup2" => {
                let controllers = controllers_of(&path);
                let v2 = Mount { path, v2: true };
                for (name, h) in [("pids", Hierarchy::Pids), ("memory", Hierarchy::Memory)] {
                    if controllers.split_whitespace().any(|c| c == name) {
                        mounts.entry(h).or_insert_with(|| v2.clone());
                    }
                }
                mounts.entry(Hierarchy::Unified).or_insert(v2);
            }
            "cgroup" => {
                for opt in options.split(',') {
                    let h = match opt {
                        "pids" => Hierarchy::Pids,
                        "memory" => Hierarchy::Memory,
                        _ => continue,
                    };
                    // A v1 controller wins over a v2 mount that merely lists it as available.
                    let v1 = Mount {
                        path: path.clone(),
                        v2: false,
                    };
                    match mounts.get(&h) {
                        Some(m) if !m.v2 => {}
                        _ => {
                            mounts.insert(h, v1);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    mounts
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let oct: String = chars.clone().take(3).collect();
            if let Ok(v) = u8::from_str_radix(&oct, 8)
                && oct.len() == 3
            {
                out.push(v as char);
                for _ in 0..3 {
                    chars.next();
                }
                continue;
            }
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 23 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw
36 30 0:32 / /sys/fs/cgroup/pids rw,relatime shared:16 - cgroup cgroup rw,pids
37 30 0:33 / /sys/fs/cgroup/memory rw,relatime shared:17 - cgroup cgroup rw,memory
38 30 0:34 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
";

    const PURE_V2: &str = "\
30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn hybrid_host_uses_v1_pids_and_memory() {
        let m = parse_mountinfo(HYBRID, |_| "hugetlb".into());
        assert_eq!(
            m[&Hierarchy::Unified],
            Mount {
                path: "/sys/fs/cgroup/unified".into(),
                v2: true
            }
        );
        assert_eq!(
            m[&Hierarchy::Pids],
            Mount {
                path: "/sys/fs/cgroup/pids".into(),
                v2: false
            }
        );
        assert_eq!(
            m[&Hierarchy::Memory],
            Mount {
                path: "/sys/fs/cgroup/memory".into(),
                v2: false
            }
        );
    }

    #[test]
    fn pure_v2_host_uses_the_unified_mount_for_everything() {
        let m = parse_mountinfo(PURE_V2, |_| "cpuset cpu io memory hugetlb pids rdma".into());
        for h in [Hierarchy::Unified, Hierarchy::Pids, Hierarchy::Memory] {
            assert_eq!(
                m[&h],
                Mount {
                    path: "/sys/fs/cgroup".into(),
                    v2: true
                }
            );
        }
    }

    #[test]
    fn v1_controller_wins_regardless_of_order() {
        let reversed: String = HYBRID.lines().rev().map(|l| format!("{l}\n")).collect();
        let m = parse_mountinfo(&reversed, |_| "pids memory".into());
        assert!(!m[&Hierarchy::Pids].v2);
        assert!(!m[&Hierarchy::Memory].v2);
    }

    #[test]
    fn garbage_lines_are_skipped() {
        let m = parse_mountinfo("nonsense\n1 2 3\n - cgroup2\n", |_| String::new());
        assert!(m.is_empty());
        assert_eq!(unescape(r"/a\040b\134c"), "/a b\\c");
        assert_eq!(unescape(r"/trailing\04"), r"/trailing\04");
    }

    /// A directory tree standing in for a cgroup v2 mount, removed on drop.
    struct FakeMount(PathBuf);

    impl FakeMount {
        fn new(tag: &str, dirs: &[&[u8]]) -> FakeMount {
            let root = std::env::temp_dir().join(format!(
                "faultline-unit-cgroups-{tag}-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&root);
            for d in dirs {
                std::fs::create_dir_all(root.join(OsStr::from_bytes(d))).expect("test");
            }
            FakeMount(root)
        }

        fn ino(&self, rel: &[u8]) -> u64 {
            std::fs::metadata(self.0.join(OsStr::from_bytes(rel)))
                .expect("test")
                .ino()
        }

        fn fs(&self) -> CgroupFs {
            let unified = Mount {
                path: self.0.clone(),
                v2: true,
            };
            CgroupFs::from_mounts(HashMap::from([(Hierarchy::Unified, unified)]))
        }
    }

    impl Drop for FakeMount {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A record as `cgroup_mkdir` or `cgroup_rmdir` sends it.
    fn record(kind: u8, flags: u8, id: u64, path: &[u8]) -> Vec<u8> {
        let header = CgroupEventHeader {
            id,
            hierarchy: CGROUP_V2_ROOT,
            kind,
            flags,
            path_len: path.len() as u16,
        };
        // SAFETY: a plain #[repr(C)] struct without padding, read as its bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const header).cast::<u8>(), CGROUP_HEADER_BYTES)
        };
        [bytes, path].concat()
    }

    fn named(fs: &CgroupFs, id: u64) -> Option<String> {
        fs.known
            .get(&(Hierarchy::Unified, id))
            .map(|k| k.path.text())
    }

    #[test]
    fn a_record_names_a_cgroup_only_where_its_path_is_that_cgroup() {
        let m = FakeMount::new("verify", &[b"pod/ctr", b"other"]);
        let mut fs = m.fs();
        let now = Instant::now();
        let (pod, ctr, other) = (m.ino(b"pod"), m.ino(b"pod/ctr"), m.ino(b"other"));
        // The path's inode is another cgroup's (removed and made again, or a lie): rejected.
        fs.take(&record(CGROUP_MADE, 0, other, b"/pod/ctr"), now);
        assert_eq!(named(&fs, other), None);
        // Paths that leave the mount, or are not the kernel's form: rejected.
        for bad in [
            &b"/pod/ctr/../../other"[..],
            b"other",
            b"/pod//ctr",
            b"/pod/\0",
        ] {
            fs.take(&record(CGROUP_MADE, 0, other, bad), now);
            assert_eq!(named(&fs, other), None, "{bad:?}");
        }
        // Nothing there (not visible yet, or removed already): the record's word, until the
        // removal's record says it went.
        fs.take(&record(CGROUP_MADE, 0, pod + 1000, b"/gone"), now);
        assert_eq!(named(&fs, pod + 1000).as_deref(), Some("/gone"));
        fs.take(&record(CGROUP_REMOVED, 0, pod + 1000, b""), now);
        assert!(fs.known[&(Hierarchy::Unified, pod + 1000)].gone.is_some());
        // A path cut short names nothing, however it looks.
        fs.take(&record(CGROUP_MADE, PATH_INCOMPLETE, pod, b"/pod"), now);
        assert_eq!(named(&fs, pod), None);
        // A record shorter than its header, or a path longer than the record: skipped.
        fs.take(&record(CGROUP_MADE, 0, pod, b"/pod")[..8], now);
        let mut long = record(CGROUP_MADE, 0, pod, b"/pod");
        long.truncate(CGROUP_HEADER_BYTES + 2);
        fs.take(&long, now);
        assert_eq!(named(&fs, pod), None);
        // The path of the id: named.
        fs.take(&record(CGROUP_MADE, 0, ctr, b"/pod/ctr"), now);
        assert_eq!(named(&fs, ctr).as_deref(), Some("/pod/ctr"));
        // Removed: still named for the grace period.
        fs.take(&record(CGROUP_REMOVED, 0, ctr, b""), now);
        assert_eq!(named(&fs, ctr).as_deref(), Some("/pod/ctr"));
        assert!(fs.known[&(Hierarchy::Unified, ctr)].gone.is_some());
    }

    #[test]
    fn cgroups_made_and_removed_are_forgotten_after_their_grace_with_their_room() {
        const PODS: usize = 2_000;
        let names: Vec<String> = (0..PODS).map(|i| format!("pod{i}")).collect();
        let dirs: Vec<&[u8]> = names.iter().map(|n| n.as_bytes()).collect();
        let m = FakeMount::new("forget", &dirs);
        let mut fs = m.fs();
        // The same tree is a walked v1 hierarchy too (pids, on a hybrid host).
        fs.mounts.insert(
            Hierarchy::Pids,
            Mount {
                path: m.0.clone(),
                v2: false,
            },
        );
        let t0 = Instant::now();
        fs.rescan(Hierarchy::Pids, t0);
        for name in &names {
            let id = m.ino(name.as_bytes());
            fs.take(
                &record(CGROUP_MADE, 0, id, format!("/{name}").as_bytes()),
                t0,
            );
        }
        // The walk named the v1 root too.
        assert_eq!(fs.known.len(), 2 * PODS + 1);
        let room = fs.known.capacity();
        // Every pod goes: the records say so, and the next walk of the v1 tree.
        for name in &names {
            let id = m.ino(name.as_bytes());
            fs.take(&record(CGROUP_REMOVED, 0, id, b""), t0);
            std::fs::remove_dir(m.0.join(name)).expect("test");
        }
        fs.rescan(Hierarchy::Pids, t0);
        // Still named for their grace (late events)...
        fs.forget_removed(t0 + REMOVED_GRACE / 2);
        assert_eq!(fs.known.len(), 2 * PODS + 1);
        // ...then forgotten in both hierarchies, and the table's room returned: what is left
        // is what exists (the v1 root).
        fs.forget_removed(t0 + REMOVED_GRACE);
        assert_eq!(fs.known.len(), 1);
        assert!(
            fs.known.capacity() < room / 8,
            "{} of {room}",
            fs.known.capacity()
        );
    }

    #[test]
    fn a_name_that_is_not_utf8_keeps_its_bytes() {
        let m = FakeMount::new("bytes", &[b"caf\xe9/x"]);
        let mut fs = m.fs();
        let id = m.ino(b"caf\xe9/x");
        fs.take(&record(CGROUP_MADE, 0, id, b"/caf\xe9/x"), Instant::now());
        let path = fs.known[&(Hierarchy::Unified, id)].path.clone();
        assert_eq!(path.text(), "/caf\\xe9/x");
        assert!(path.under(&m.0).is_dir(), "reached through its bytes");
        let parent = path.parent().expect("test");
        assert_eq!(Some(&parent), CgroupPath::parse(b"/caf\xe9").as_ref());
        assert!(parent.parent().is_some_and(|p| p.is_root()));
        // The walk keeps the bytes too.
        let mut walked = Vec::new();
        walk(&m.0, 100, |ino, p| walked.push((ino, p)));
        assert!(walked.contains(&(id, path)), "{walked:?}");
    }

    #[test]
    fn an_unknown_id_costs_one_lookup_per_retry_not_a_walk_per_event() {
        let m = FakeMount::new("unknown", &[b"a/b"]);
        let mut fs = m.fs();
        assert_eq!(fs.path(Hierarchy::Unified, 999_999_999), None);
        let first = fs.walked[&Hierarchy::Unified].at;
        // Found by that one walk, and named at once.
        assert_eq!(
            fs.path(Hierarchy::Unified, m.ino(b"a/b"))
                .map(|p| p.text())
                .as_deref(),
            Some("/a/b")
        );
        for _ in 0..10_000 {
            assert_eq!(fs.path(Hierarchy::Unified, 999_999_999), None);
        }
        assert_eq!(fs.walked[&Hierarchy::Unified].at, first, "walked again");
        assert_eq!(fs.unknown.len(), 1);
        // Controllers on the v2 mount share its ids.
        fs.mounts
            .insert(Hierarchy::Pids, fs.mounts[&Hierarchy::Unified].clone());
        assert_eq!(
            fs.path(Hierarchy::Pids, m.ino(b"a"))
                .map(|p| p.text())
                .as_deref(),
            Some("/a")
        );
    }

    #[test]
    fn cgroup_paths_are_the_kernels_form() {
        assert!(CgroupPath::parse(b"/").is_some_and(|p| p.is_root()));
        assert_eq!(
            CgroupPath::parse(b"/a/b").and_then(|p| p.parent()),
            CgroupPath::parse(b"/a")
        );
        for bad in [&b""[..], b"a", b"/a/", b"//", b"/./a", b"/a/..", b"/a\0b"] {
            assert_eq!(CgroupPath::parse(bad), None, "{bad:?}");
        }
        assert_eq!(CgroupPath::root().child(OsStr::new("x")).text(), "/x");
        assert_eq!(
            CgroupPath::root().under(Path::new("/sys/fs/cgroup")),
            Path::new("/sys/fs/cgroup/")
        );
    }

    #[test]
    fn resolves_real_cgroup_ids() {
        let Ok(mut fs) = CgroupFs::discover() else {
            return;
        };
        let Some(mount) = fs.mount(Hierarchy::Unified).cloned() else {
            eprintln!("no cgroup2 mount here; skipped");
            return;
        };
        let ino = std::fs::metadata(&mount.path).expect("test").ino();
        assert_eq!(
            fs.path(Hierarchy::Unified, ino)
                .map(|p| p.text())
                .as_deref(),
            Some("/")
        );
        assert_eq!(fs.path(Hierarchy::Unified, 0), None);
    }
}
