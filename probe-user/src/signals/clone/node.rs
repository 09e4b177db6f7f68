//! Node-wide task limits that no kernel snapshot carries: `kernel.threads-max`, the live thread
//! count, the initial namespace's `pid_max`, and the pids below `RESERVED_PIDS` in use per pid
//! namespace, read from /proc when a failure arrives.

use std::{
    cell::RefCell,
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    time::{Duration, Instant},
};

use anyhow::Context as _;

/// pids below this are handed out only until the allocator's cursor first passes it; then
/// `alloc_pid()` allocates cyclically in [RESERVED_PIDS, pid_max) (kernel/pid.c).
pub const RESERVED_PIDS: u32 = 300;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeTasks {
    /// Threads alive on the node (4th field of /proc/loadavg, after the slash).
    pub threads: u64,
    pub threads_max: u64,
    /// pid_max as seen from faultline's pid namespace.
    pub pid_max: u64,
}

impl NodeTasks {
    pub fn read() -> anyhow::Result<Self> {
        let loadavg = std::fs::read_to_string("/proc/loadavg").context("reading /proc/loadavg")?;
        Ok(NodeTasks {
            threads: parse_loadavg_threads(&loadavg).context("parsing /proc/loadavg")?,
            threads_max: read_u64("/proc/sys/kernel/threads-max")?,
            pid_max: read_u64("/proc/sys/kernel/pid_max")?,
        })
    }
}

/// How long a namespace's count of low pids is reused: a failure storm must not walk /proc
/// per event. Once a namespace's allocator has wrapped, that count can only fall.
const LOW_PIDS_REUSE: Duration = Duration::from_secs(1);
/// Tasks examined at most in one walk of /proc.
const MAX_TASKS_WALKED: usize = 200_000;

/// Counts the pids below `RESERVED_PIDS` in use in a pid namespace: the allocator never hands
/// them out again once it has wrapped, so they decide whether the namespace is full.
#[derive(Default)]
pub struct LowPids {
    cache: RefCell<HashMap<u32, (Instant, Option<u32>)>>,
}

impl LowPids {
    /// For the namespace with inode `inum` (at nesting `level`, unused but for the caller's
    /// clarity): faultline's own namespace from `/proc/<n>` for n < 300; another one from the
    /// `NSpid` of the tasks whose innermost namespace it is (tasks of namespaces nested in it
    /// are not counted).
    pub fn count(&self, inum: u32, _level: u32) -> Option<u32> {
        if let Some((at, n)) = self.cache.borrow().get(&inum)
            && at.elapsed() < LOW_PIDS_REUSE
        {
            return *n;
        }
        let n = if pidns_inode("/proc/self/ns/pid") == Some(inum) {
            Some(
                (1..RESERVED_PIDS)
                    .filter(|pid| std::fs::symlink_metadata(format!("/proc/{pid}")).is_ok())
                    .count() as u32,
            )
        } else {
            count_in_namespace(inum)
        };
        let mut cache = self.cache.borrow_mut();
        if cache.len() > 1024 {
            cache.clear();
        }
        cache.insert(inum, (Instant::now(), n));
        n
    }
}

fn pidns_inode(link: &str) -> Option<u32> {
    std::fs::metadata(link)
        .ok()
        .and_then(|m| u32::try_from(m.ino()).ok())
}

/// Tasks whose innermost pid namespace is `inum` and whose pid there is below RESERVED_PIDS.
fn count_in_namespace(inum: u32) -> Option<u32> {
    let mut count = 0;
    let mut walked = 0;
    for proc in std::fs::read_dir("/proc").ok()?.filter_map(Result::ok) {
        let name = proc.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.filter_map(Result::ok) {
            walked += 1;
            if walked > MAX_TASKS_WALKED {
                return None;
            }
            let dir = task.path();
            if pidns_inode(&format!("{}/ns/pid", dir.display())) != Some(inum) {
                continue;
            }
            let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
            let inner = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|l| l.split_whitespace().last())
                .and_then(|p| p.parse::<u32>().ok());
            if inner.is_some_and(|p| p < RESERVED_PIDS) {
                count += 1;
            }
        }
    }
    Some(count)
}

fn read_u64(path: &str) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    s.trim()
        .parse()
        .with_context(|| format!("parsing {path}: {s:?}"))
}

/// `0.52 0.31 0.12 2/78 2535` -> 78.
fn parse_loadavg_threads(s: &str) -> Option<u64> {
    s.split_whitespace().nth(3)?.split_once('/')?.1.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loadavg() {
        assert_eq!(
            parse_loadavg_threads("0.52 0.31 0.12 2/78 2535\n"),
            Some(78)
        );
        assert_eq!(parse_loadavg_threads("0.52 0.31"), None);
        assert_eq!(parse_loadavg_threads("a b c d/e f"), None);
    }

    #[test]
    fn reads_this_node() {
        let n = NodeTasks::read().expect("test");
        assert!(n.threads > 0 && n.threads_max > 0 && n.pid_max > 0);
    }
}
