//! Network namespaces by inode: where to find each one (a `/run/netns` name or a process in it)
//! and how to run code inside it (a scoped thread that `setns`es, so the caller's namespace
//! never changes).

use std::{
    collections::HashMap,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Where a network namespace can be entered from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    pub inode: u64,
    /// A bind mount (`/run/netns/<name>`) or `/proc/<pid>/ns/net`.
    pub path: PathBuf,
    /// A process in the namespace, when one was seen (for procfs reads and attribution).
    pub pid: Option<u32>,
}

/// Every network namespace the node shows, rescanned at most every `RESCAN`.
pub struct NetnsDirectory {
    proc_root: PathBuf,
    by_inode: HashMap<u64, Netns>,
    last_scan: Option<Instant>,
}

const RESCAN: Duration = Duration::from_secs(5);
const NAMED_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];

impl NetnsDirectory {
    /// Namespaces under `proc_root` (the host's `/proc`: faultline runs with hostPID) and the
    /// named ones.
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        NetnsDirectory {
            proc_root: proc_root.into(),
            by_inode: HashMap::new(),
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
        let init = self.proc_root.join("1/ns/net");
        let (path, pid) = match std::fs::metadata(&init) {
            Ok(_) => (init, 1),
            Err(_) => (PathBuf::from("/proc/self/ns/net"), std::process::id()),
        };
        let inode = std::fs::metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .ino();
        Ok(Netns {
            inode,
            path,
            pid: Some(pid),
        })
    }

    /// A namespace by inode, rescanning (rate-limited) when unknown.
    pub fn get(&mut self, inode: u64) -> Option<Netns> {
        if !self.by_inode.contains_key(&inode) {
            self.rescan();
        }
        self.by_inode.get(&inode).cloned()
    }

    /// Every namespace known after a (rate-limited) rescan.
    pub fn all(&mut self) -> Vec<Netns> {
        self.rescan();
        let mut all: Vec<Netns> = self.by_inode.values().cloned().collect();
        all.sort_by_key(|n| n.inode);
        all
    }

    /// Re-reads the named namespaces and every process's, at most every `RESCAN`.
    fn rescan(&mut self) {
        if self.last_scan.is_some_and(|t| t.elapsed() < RESCAN) {
            return;
        }
        self.last_scan = Some(Instant::now());
        let mut found: HashMap<u64, Netns> = HashMap::new();
        for dir in NAMED_DIRS {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for e in entries.flatten() {
                if let Ok(m) = std::fs::metadata(e.path()) {
                    found.entry(m.ino()).or_insert(Netns {
                        inode: m.ino(),
                        path: e.path(),
                        pid: None,
                    });
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(&self.proc_root) {
            for e in entries.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                let path = e.path().join("ns/net");
                let Ok(m) = std::fs::metadata(&path) else {
                    continue;
                };
                let entry = found.entry(m.ino()).or_insert(Netns {
                    inode: m.ino(),
                    path,
                    pid: None,
                });
                entry.pid.get_or_insert(pid);
            }
        }
        self.by_inode = found;
    }
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
