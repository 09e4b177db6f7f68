//! Network namespaces: which exist, a process in each, and how to run code inside one (a
//! scoped thread that `setns`es, so the caller's namespace never changes).
//!
//! A namespace is keyed by the inode of its `/proc/<pid>/net/stat` directory ([`NetnsKey`]):
//! procfs makes that directory once per namespace, anyone can `stat` it for any process, and
//! the conntrack-drop program reports it with each drop. The namespace's own inode (what
//! `lsns` and `ip netns identify` show) needs `/proc/<pid>/ns/net`, which the kernel shows
//! only to a reader that may ptrace the process: as deployed (no CAP_SYS_PTRACE), faultline's
//! own, and those the kernel names in a drop ([`NetnsDirectory::learn`]).

use std::{
    collections::HashMap,
    os::{
        fd::AsRawFd as _,
        unix::fs::{DirEntryExt as _, MetadataExt as _},
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

/// A network namespace: the inode of its `/proc/<pid>/net/stat` directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct NetnsKey(pub u64);

/// A network namespace and where it can be read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    pub key: NetnsKey,
    /// The namespace's own inode, where known.
    pub inode: Option<u64>,
    /// Where it can be entered: a bind mount (`/run/netns/<name>`) or `/proc/<pid>/ns/net`,
    /// where readable.
    pub path: Option<PathBuf>,
    /// A process in it, for procfs reads and attribution.
    pub pid: Option<u32>,
}

impl Netns {
    /// `netns:<inode>`, or where the inode is unknown `netns:pid:<pid>` (one of its
    /// processes): what names a namespace that is neither the node's nor a pod's.
    pub fn label(&self) -> String {
        match (self.inode, self.pid) {
            (Some(inode), _) => format!("netns:{inode}"),
            (None, Some(pid)) => format!("netns:pid:{pid}"),
            (None, None) => format!("netns:procfs:{}", self.key.0),
        }
    }
}

/// Every network namespace with a process (and the named ones where they can be entered),
/// rescanned at most every `RESCAN`.
pub struct NetnsDirectory {
    proc_root: PathBuf,
    by_key: HashMap<NetnsKey, Netns>,
    /// Each process's namespace at the last rescan (a process seldom changes it: only new
    /// processes are looked at).
    pids: HashMap<u32, PidNetns>,
    /// Inodes the kernel's records named, of namespaces that still exist.
    learnt: HashMap<NetnsKey, u64>,
    last_scan: Option<Instant>,
}

#[derive(Clone, Copy, Debug)]
struct PidNetns {
    /// The inode of the process's `/proc/<pid>` directory: procfs gives each process its
    /// own, so a pid reused by another process is looked at again.
    dir: u64,
    key: NetnsKey,
    /// The namespace's inode, when `/proc/<pid>/ns/net` is readable.
    inode: Option<u64>,
}

const RESCAN: Duration = Duration::from_secs(5);
/// A rescan for a namespace whose known process has exited, at most this often (a sender
/// refused at its drop often exits at once, before its namespace's counters are read).
const RESCAN_GONE: Duration = Duration::from_secs(1);
const NAMED_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];
/// Inodes learnt from the kernel's records at most (a node has hundreds of namespaces).
const MAX_LEARNT: usize = 16_384;

impl NetnsDirectory {
    /// Namespaces under `proc_root` (the host's `/proc`: faultline runs with hostPID) and the
    /// named ones.
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        NetnsDirectory {
            proc_root: proc_root.into(),
            by_key: HashMap::new(),
            pids: HashMap::new(),
            learnt: HashMap::new(),
            last_scan: None,
        }
    }

    /// The namespace faultline itself runs in.
    pub fn own_inode() -> anyhow::Result<u64> {
        Ok(std::fs::metadata("/proc/self/ns/net")
            .context("reading /proc/self/ns/net")?
            .ino())
    }

    /// The node's namespace: pid 1's, as seen in `proc_root`; where that is not readable
    /// (no CAP_SYS_PTRACE), our own, which is the node's under `hostNetwork`.
    pub fn node(&self) -> anyhow::Result<Netns> {
        let init = self.proc_root.join("1");
        let (dir, pid) = match std::fs::metadata(init.join("ns/net")) {
            Ok(_) => (init, 1),
            Err(_) => (PathBuf::from("/proc/self"), std::process::id()),
        };
        let path = dir.join("ns/net");
        let inode = std::fs::metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .ino();
        let key =
            procfs_key(&dir).with_context(|| format!("reading {}/net/stat", dir.display()))?;
        Ok(Netns {
            key,
            inode: Some(inode),
            path: Some(path),
            pid: Some(pid),
        })
    }

    /// A namespace by key, rescanning (rate-limited) when unknown.
    pub fn get(&mut self, key: NetnsKey) -> Option<Netns> {
        if !self.by_key.contains_key(&key) {
            self.rescan();
        }
        self.by_key.get(&key).cloned()
    }

    /// A namespace by its own inode, among those whose inode is known.
    pub fn by_inode(&mut self, inode: u64) -> Option<Netns> {
        let find = |d: &Self| d.by_key.values().find(|n| n.inode == Some(inode)).cloned();
        find(self).or_else(|| {
            self.rescan();
            find(self)
        })
    }

    /// What the kernel said of a namespace at a drop: its inode, and a process in it (the
    /// packet's sender) when one was dropping it.
    pub fn learn(&mut self, key: NetnsKey, inode: u64, witness: Option<u32>) {
        if self.learnt.len() < MAX_LEARNT || self.learnt.contains_key(&key) {
            self.learnt.insert(key, inode);
        }
        let ns = self.by_key.entry(key).or_insert(Netns {
            key,
            inode: None,
            path: None,
            pid: None,
        });
        ns.inode.get_or_insert(inode);
        if ns.pid.is_none() {
            ns.pid = witness;
        }
    }

    /// The namespace `key` again, once a read through its known process failed (the process
    /// exited): rescans unless a scan ran within `RESCAN_GONE`, and returns it where another
    /// process is found in it.
    pub fn after_exit(&mut self, key: NetnsKey) -> Option<Netns> {
        let before = self.by_key.get(&key).and_then(|n| n.pid);
        if self.last_scan.is_some_and(|t| t.elapsed() < RESCAN_GONE) {
            return None;
        }
        self.scan();
        self.by_key.get(&key).filter(|n| n.pid != before).cloned()
    }

    /// Every namespace known after a (rate-limited) rescan.
    pub fn all(&mut self) -> Vec<Netns> {
        self.rescan();
        let mut all: Vec<Netns> = self.by_key.values().cloned().collect();
        all.sort_by_key(|n| n.key);
        all
    }

    /// Re-reads every process's namespace (new processes only: two `stat`s each) and the
    /// named ones, at most every `RESCAN`.
    fn rescan(&mut self) {
        if self.last_scan.is_some_and(|t| t.elapsed() < RESCAN) {
            return;
        }
        self.scan();
    }

    fn scan(&mut self) {
        self.last_scan = Some(Instant::now());
        let mut found: HashMap<NetnsKey, Netns> = HashMap::new();
        let mut pids = HashMap::with_capacity(self.pids.len());
        if let Ok(entries) = std::fs::read_dir(&self.proc_root) {
            for e in entries.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                let dir = e.path();
                let seen = match self.pids.get(&pid) {
                    Some(seen) if seen.dir == e.ino() => *seen,
                    _ => {
                        let Some(key) = procfs_key(&dir) else {
                            continue;
                        };
                        let inode = std::fs::metadata(dir.join("ns/net")).ok().map(|m| m.ino());
                        PidNetns {
                            dir: e.ino(),
                            key,
                            inode,
                        }
                    }
                };
                pids.insert(pid, seen);
                let ns = found.entry(seen.key).or_insert(Netns {
                    key: seen.key,
                    inode: None,
                    path: None,
                    pid: Some(pid),
                });
                if ns.path.is_none()
                    && let Some(inode) = seen.inode
                {
                    ns.inode = Some(inode);
                    ns.path = Some(dir.join("ns/net"));
                    ns.pid = Some(pid);
                }
            }
        }
        for dir in NAMED_DIRS {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                let Ok(m) = std::fs::metadata(&path) else {
                    continue;
                };
                if found.values().any(|n| n.inode == Some(m.ino())) {
                    continue;
                }
                // No process in it: its key from inside (needs CAP_SYS_ADMIN).
                let Ok(key) = run_in(&path, || {
                    procfs_key(Path::new("/proc/thread-self")).context("no /proc/thread-self/net")
                }) else {
                    continue;
                };
                found.entry(key).or_insert(Netns {
                    key,
                    inode: Some(m.ino()),
                    path: Some(path),
                    pid: None,
                });
            }
        }
        self.learnt.retain(|key, _| found.contains_key(key));
        crate::memory::shrink(&mut self.learnt);
        for ns in found.values_mut() {
            if ns.inode.is_none() {
                ns.inode = self.learnt.get(&ns.key).copied();
            }
        }
        self.pids = pids;
        self.by_key = found;
    }
}

/// The key of the namespace of the process at `dir` (`/proc/<pid>`): the inode of its
/// `net/stat` directory.
pub fn procfs_key(dir: &Path) -> Option<NetnsKey> {
    std::fs::metadata(dir.join("net/stat"))
        .ok()
        .map(|m| NetnsKey(m.ino()))
}

/// Reads `file` under `/proc/<pid>/net/` of a process in the namespace `key`, checking before
/// and after that the process is still in it (it may have exited, and its pid been reused).
pub fn read_proc_net(pid: u32, key: NetnsKey, file: &str) -> anyhow::Result<String> {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let check = || -> anyhow::Result<()> {
        match procfs_key(&dir) {
            Some(k) if k == key => Ok(()),
            Some(_) => bail!("process {pid} is no longer in the namespace"),
            None => bail!("process {pid} is gone"),
        }
    };
    check()?;
    let path = dir.join("net").join(file);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    check()?;
    Ok(text)
}

/// Runs `f` inside the network namespace at `path`, on a short-lived thread (sockets it opens
/// stay bound to that namespace). Needs CAP_SYS_ADMIN unless the namespace is our own.
pub fn run_in<T: Send>(
    path: &Path,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    let target =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    if target.metadata().map(|m| m.ino()).ok() == NetnsDirectory::own_inode().ok() {
        return f();
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only, with an open namespace fd.
            if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!(
                    "entering network namespace {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                );
            }
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_namespace_is_found_by_its_procfs_key() {
        let own = procfs_key(Path::new("/proc/self")).expect("/proc/self/net/stat");
        let mut d = NetnsDirectory::new("/proc");
        let ns = d.get(own).expect("our namespace");
        assert!(ns.pid.is_some(), "{ns:?}");
        let text = read_proc_net(std::process::id(), own, "dev").expect("reading our net/dev");
        assert!(text.contains("lo:"), "{text}");
        assert!(read_proc_net(std::process::id(), NetnsKey(1), "dev").is_err());
    }

    #[test]
    fn a_learnt_inode_names_a_namespace() {
        let mut d = NetnsDirectory::new("/nonexistent");
        d.learn(NetnsKey(7), 4026532000, Some(42));
        let ns = d.by_key[&NetnsKey(7)].clone();
        assert_eq!((ns.inode, ns.pid), (Some(4026532000), Some(42)));
        assert_eq!(ns.label(), "netns:4026532000");
        let unnamed = Netns { inode: None, ..ns };
        assert_eq!(unnamed.label(), "netns:pid:42");
    }

    /// The kernel named a sender that exited before its namespace was read: a rescan finds
    /// another process in it, and that rescan is bounded in rate.
    #[test]
    fn a_namespace_whose_known_process_exited_is_found_again() {
        let own = procfs_key(Path::new("/proc/self")).expect("/proc/self/net/stat");
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawning true");
        let gone = child.id();
        child.wait().expect("reaping true");
        let mut d = NetnsDirectory::new("/proc");
        d.learn(
            own,
            NetnsDirectory::own_inode().expect("our inode"),
            Some(gone),
        );
        let known = d.get(own).expect("the learnt namespace");
        assert_eq!(known.pid, Some(gone));
        assert!(read_proc_net(gone, own, "dev").is_err(), "{gone} is reaped");
        let found = d.after_exit(own).expect("another process in our namespace");
        let pid = found.pid.expect("a process");
        read_proc_net(pid, own, "dev").expect("reading through the process found");
        assert_eq!(
            d.after_exit(own),
            None,
            "a second rescan within RESCAN_GONE"
        );
    }
}
