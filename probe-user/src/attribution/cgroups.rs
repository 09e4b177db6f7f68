//! The node's cgroup hierarchies (v2, and v1 controllers on hybrid or legacy hosts) and the
//! translation of the kernel's cgroup ids (inode numbers of cgroup directories) into paths.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

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

/// Stops a rescan storm when events name cgroups that are already gone.
const RESCAN_INTERVAL: Duration = Duration::from_millis(250);
/// How long a removed cgroup keeps its name.
const REMOVED_GRACE: Duration = Duration::from_secs(60);
/// Bounds one walk of a hierarchy (a node has thousands of cgroups, not millions).
const MAX_WALK_ENTRIES: usize = 200_000;
const MAX_WALK_DEPTH: usize = 32;

pub struct CgroupFs {
    mounts: HashMap<Hierarchy, Mount>,
    /// Known cgroups: path, and since when a rescan no longer finds it (None = present).
    paths: HashMap<(Hierarchy, u64), (String, Option<Instant>)>,
    last_scan: HashMap<Hierarchy, Instant>,
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

    /// No hierarchy at all (tests).
    #[cfg(test)]
    pub(crate) fn none() -> Self {
        Self::from_mounts(HashMap::new())
    }

    fn from_mounts(mounts: HashMap<Hierarchy, Mount>) -> Self {
        CgroupFs {
            mounts,
            paths: HashMap::new(),
            last_scan: HashMap::new(),
        }
    }

    pub fn mount(&self, h: Hierarchy) -> Option<&Mount> {
        self.mounts.get(&h)
    }

    /// The directory of a cgroup path within a hierarchy.
    pub fn dir(&self, h: Hierarchy, path: &str) -> Option<PathBuf> {
        let mount = self.mounts.get(&h)?;
        Some(mount.path.join(path.trim_start_matches('/')))
    }

    /// Path of the cgroup with this id inside its hierarchy (`/` for the root), or `None` if
    /// no such cgroup exists (any more).
    pub fn path(&mut self, h: Hierarchy, ino: u64) -> Option<String> {
        if ino == 0 {
            return None;
        }
        if let Some((p, _)) = self.paths.get(&(h, ino)) {
            return Some(p.clone());
        }
        let mount = self.mounts.get(&h)?.path.clone();
        let now = Instant::now();
        if self
            .last_scan
            .get(&h)
            .is_some_and(|t| now.duration_since(*t) < RESCAN_INTERVAL)
        {
            return None;
        }
        self.last_scan.insert(h, now);
        // Removed cgroups stay resolvable for a grace period: events of short-lived tasks
        // often arrive after their cgroup is gone.
        for ((hh, _), (_, gone)) in self.paths.iter_mut() {
            if *hh == h && gone.is_none() {
                *gone = Some(now);
            }
        }
        self.paths.retain(|(hh, _), (_, gone)| {
            *hh != h || gone.is_none_or(|t| now.duration_since(t) < REMOVED_GRACE)
        });
        let mut budget = MAX_WALK_ENTRIES;
        walk(&mount, "", 0, &mut budget, &mut |ino, rel| {
            self.paths.insert((h, ino), (rel, None));
        });
        self.paths.get(&(h, ino)).map(|(p, _)| p.clone())
    }
}

fn walk(dir: &Path, rel: &str, depth: usize, budget: &mut usize, f: &mut impl FnMut(u64, String)) {
    let Ok(meta) = std::fs::metadata(dir) else {
        return;
    };
    f(
        meta.ino(),
        if rel.is_empty() {
            "/".to_owned()
        } else {
            rel.to_owned()
        },
    );
    if depth >= MAX_WALK_DEPTH {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            let name = entry.file_name();
            let child_rel = format!("{rel}/{}", name.to_string_lossy());
            walk(&entry.path(), &child_rel, depth + 1, budget, f);
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
        assert_eq!(fs.path(Hierarchy::Unified, ino).as_deref(), Some("/"));
        assert_eq!(fs.path(Hierarchy::Unified, 0), None);
    }
}
