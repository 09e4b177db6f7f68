//! Which limit refuses a cgroup's next task: every limit `copy_process()` checks, in its
//! order (the memory cgroup charging the new kernel stack, RLIMIT_NPROC, threads-max, the
//! pid namespace's pid_max, the pids cgroup), with use, limit, headroom and time left; the
//! binding one is the first to run out.

use std::{collections::HashMap, path::Path};

use serde::Serialize;

use crate::{
    attribution::cgroups::CgroupPath,
    signals::clone::node::NodeTasks,
    trend::{Estimate, Limit},
};

use super::CgroupRow;

/// A task's kernel stack on x86_64 (THREAD_SIZE): the memory headroom in tasks is
/// `(max - current) / KERNEL_STACK`, a rough upper bound (a task also costs its
/// `task_struct` and more).
pub const KERNEL_STACK: u64 = 16 * 1024;

/// A v1 memory limit this high means none.
const V1_UNLIMITED: u64 = 1 << 62;

/// One limit that can refuse a new task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BindingLimit {
    /// The memory cgroup (headroom in kernel stacks: rough).
    Memory,
    /// RLIMIT_NPROC of the cgroup's processes, counted over every task of the uid.
    RlimitNproc { uid: u32 },
    /// The node's `kernel.threads-max`.
    ThreadsMax,
    /// `kernel.pid_max` (global before 6.14; the reader's namespace's value after).
    PidMax,
    /// The tightest `pids.max` over the cgroup and its ancestors.
    Pids,
}

impl BindingLimit {
    /// The `limit` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            BindingLimit::Memory => "memory",
            BindingLimit::RlimitNproc { .. } => "rlimit_nproc",
            BindingLimit::ThreadsMax => "threads_max",
            BindingLimit::PidMax => "pid_max",
            BindingLimit::Pids => "pids",
        }
    }

    /// For `top`'s BINDS column: `pids`, `nproc:1000`, `pid_max`, `threads`, `memory`.
    pub fn short(self) -> String {
        match self {
            BindingLimit::RlimitNproc { uid } => format!("nproc:{uid}"),
            BindingLimit::ThreadsMax => "threads".to_owned(),
            other => other.as_str().to_owned(),
        }
    }
}

/// One limit's use as it applies to one cgroup.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LimitUse {
    pub limit: BindingLimit,
    /// In the limit's unit (tasks; bytes for memory).
    pub current: u64,
    pub max: u64,
    /// Tasks that can still be created before it refuses one (memory: rough).
    pub headroom: i64,
    /// Seconds until it is reached at the current growth, when growing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<f64>,
}

/// The tightest memory limit over a cgroup and its ancestors.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MemoryLimit {
    pub cgroup: String,
    pub max: u64,
    pub current: u64,
}

/// `(max, current)` of each memory level read so far (none: no limit there).
pub type MemoryLevels = HashMap<CgroupPath, Option<(u64, u64)>>;

/// The limited level with the least bytes left, reading each level at most once across the
/// calls sharing `levels` (v2 `memory.max`/`memory.current`, v1 `memory.limit_in_bytes`/
/// `memory.usage_in_bytes`).
pub fn tightest_memory_limit(
    mount: &Path,
    v2: bool,
    path: &CgroupPath,
    levels: &mut MemoryLevels,
) -> Option<MemoryLimit> {
    let (max_file, current_file) = if v2 {
        ("memory.max", "memory.current")
    } else {
        ("memory.limit_in_bytes", "memory.usage_in_bytes")
    };
    let mut best: Option<MemoryLimit> = None;
    let mut level = Some(path.clone());
    while let Some(at) = level {
        let read = *levels.entry(at.clone()).or_insert_with(|| {
            let dir = at.under(mount);
            let value = |f: &str| {
                std::fs::read_to_string(dir.join(f))
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
            };
            value(max_file)
                .filter(|m| *m < V1_UNLIMITED)
                .zip(value(current_file))
        });
        if let Some((max, current)) = read
            && best
                .as_ref()
                .is_none_or(|b| max.saturating_sub(current) < b.max.saturating_sub(b.current))
        {
            best = Some(MemoryLimit {
                cgroup: at.text(),
                max,
                current,
            });
        }
        level = at.parent();
    }
    best
}

/// The resource a uid's RLIMIT_NPROC estimate goes by.
pub fn uid_resource(uid: u32) -> String {
    format!("uid:{uid}")
}

/// Every limit that can refuse `row`'s next task, in `copy_process()`'s order, with the
/// estimates' times left.
pub fn limits(row: &CgroupRow, node: NodeTasks, estimates: &[Estimate]) -> Vec<LimitUse> {
    let eta = |limit: Limit, resource: &str| {
        estimates
            .iter()
            .find(|e| e.limit == limit && e.resource == resource)
            .and_then(|e| e.eta_s)
    };
    let mut out = Vec::with_capacity(5);
    if let Some(m) = &row.memory {
        out.push(LimitUse {
            limit: BindingLimit::Memory,
            current: m.current,
            max: m.max,
            headroom: (m.max.saturating_sub(m.current) / KERNEL_STACK) as i64,
            eta_s: None,
        });
    }
    if let Some(n) = &row.nproc {
        out.push(LimitUse {
            limit: BindingLimit::RlimitNproc { uid: n.uid },
            current: n.current,
            max: n.max,
            headroom: n.headroom,
            eta_s: eta(Limit::RlimitNproc, &uid_resource(n.uid)),
        });
    }
    for (limit, trend, max) in [
        (
            BindingLimit::ThreadsMax,
            Limit::ThreadsMax,
            node.threads_max,
        ),
        (BindingLimit::PidMax, Limit::PidMax, node.pid_max),
    ] {
        if max > 0 {
            out.push(LimitUse {
                limit,
                current: node.threads,
                max,
                headroom: max as i64 - node.threads as i64,
                eta_s: eta(trend, "node"),
            });
        }
    }
    if let Some(p) = &row.pids_limit {
        out.push(LimitUse {
            limit: BindingLimit::Pids,
            current: p.current,
            max: p.max,
            headroom: p.headroom,
            eta_s: eta(Limit::Pids, &p.cgroup),
        });
    }
    out
}

/// The limit that refuses first: one already reached, else the soonest to be reached at
/// the current growth, else the least headroom; ties go to the one checked first.
pub fn binding(limits: &[LimitUse]) -> Option<&LimitUse> {
    let before = |a: &LimitUse, b: &LimitUse| {
        (a.headroom > 0)
            .cmp(&(b.headroom > 0))
            .then(
                a.eta_s
                    .unwrap_or(f64::INFINITY)
                    .total_cmp(&b.eta_s.unwrap_or(f64::INFINITY)),
            )
            .then(a.headroom.cmp(&b.headroom))
            .is_lt()
    };
    limits
        .iter()
        .reduce(|best, l| if before(l, best) { l } else { best })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn use_of(limit: BindingLimit, headroom: i64, eta_s: Option<f64>) -> LimitUse {
        LimitUse {
            limit,
            current: 0,
            max: 0,
            headroom,
            eta_s,
        }
    }

    #[test]
    fn the_soonest_binds_then_the_least_headroom() {
        let nproc = BindingLimit::RlimitNproc { uid: 1000 };
        let limits = [
            use_of(BindingLimit::Memory, 5000, None),
            use_of(nproc, 10, Some(31.0)),
            use_of(BindingLimit::ThreadsMax, 100_000, None),
            use_of(BindingLimit::Pids, 4000, Some(3000.0)),
        ];
        assert_eq!(binding(&limits).map(|l| l.limit), Some(nproc));
        let flat = [
            use_of(BindingLimit::Pids, 4000, None),
            use_of(BindingLimit::Memory, 50, None),
        ];
        assert_eq!(binding(&flat).map(|l| l.limit), Some(BindingLimit::Memory));
        // Reached beats a short ETA; a tie keeps the kernel's order.
        let reached = [
            use_of(nproc, 0, Some(0.0)),
            use_of(BindingLimit::Pids, 0, Some(0.0)),
        ];
        assert_eq!(binding(&reached).map(|l| l.limit), Some(nproc));
        assert_eq!(nproc.short(), "nproc:1000");
        assert_eq!(BindingLimit::ThreadsMax.short(), "threads");
    }
}
