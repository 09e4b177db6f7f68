//! Node-wide task limits that no kernel snapshot carries: `kernel.threads-max`, the live thread
//! count, and the initial namespace's `pid_max`, read from /proc when a failure arrives.

use anyhow::Context as _;

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
