//! Failed task creation: raw `CloneFailureEvent`s from the ring buffer are decoded and
//! enriched (wall time, cgroup paths, node counts) into `CloneFailure`s with their cause,
//! decided by [`cause`] from the kernel state at the failure and [`node`]'s counts.

pub mod cause;
pub mod node;

use probe_common::clone::{self as common, CloneFailureEvent, Syscall, valid};
use serde::Serialize;
use std::sync::Arc;

use crate::{
    attribution::cgroups::Hierarchy,
    attribution::pods::{Attributor, PodRef},
    clock::KernelClock,
    kernel::loader::{Attachment, CloneHook, EventRing, Probes, raw, tracepoint},
    kernel::rings::Batch,
    signals::Event,
};
use cause::{Facts, Verdict};
use node::{LowPids, NodeTasks};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    Thread,
    Process,
    /// faultline attached while the syscall was running: its flags were not seen.
    Unknown,
}

impl TaskKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Thread => "thread",
            TaskKind::Process => "process",
            TaskKind::Unknown => "unknown",
        }
    }
}

/// Failed task creation: the four syscalls' exit tracepoints (run only on those syscalls).
pub const PROGRAMS: [Attachment; 4] = [
    tracepoint("clone_exit", "syscalls", "sys_exit_clone"),
    tracepoint("clone3_exit", "syscalls", "sys_exit_clone3"),
    tracepoint("fork_exit", "syscalls", "sys_exit_fork"),
    tracepoint("vfork_exit", "syscalls", "sys_exit_vfork"),
];

/// Failed task creation where the perf tracepoints cannot be attached: every syscall's exit,
/// filtered in the program (syscall tracepoints have no raw form of their own).
pub const RAW_PROGRAMS: [Attachment; 1] = [raw("clone_sys_exit", "sys_exit")];

/// How the clone programs are attached on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClonePath {
    /// `syscalls:sys_exit_{clone,clone3,fork,vfork}`.
    SyscallTracepoints,
    /// `raw_syscalls:sys_exit` (a raw tracepoint), the perf tracepoints refused.
    RawSysExit,
}

impl ClonePath {
    pub fn describe(self) -> &'static str {
        match self {
            ClonePath::SyscallTracepoints => "via syscalls:sys_exit_{clone,clone3,fork,vfork}",
            ClonePath::RawSysExit => {
                "via the raw tracepoint sys_exit (where the syscall tracepoints' perf_event_open is refused: Debian's perf_event_paranoid 3 wants CAP_SYS_ADMIN); runs on every syscall's exit, returning at once on success"
            }
        }
    }
}

/// Attaches the clone programs as `hook` says: with `Auto`, the syscall exit tracepoints
/// where `perf_event_open` is allowed, else the raw `sys_exit` tracepoint (both refused:
/// both reasons).
pub fn attach(probes: &mut Probes, hook: CloneHook) -> anyhow::Result<ClonePath> {
    if hook == CloneHook::Raw {
        return probes.attach(&RAW_PROGRAMS).map(|()| ClonePath::RawSysExit);
    }
    let tracepoints = match probes.attach(&PROGRAMS) {
        Ok(()) => return Ok(ClonePath::SyscallTracepoints),
        Err(e) if hook == CloneHook::Tracepoints => return Err(e),
        Err(e) => e,
    };
    // Detach whichever of the four did attach before one was refused.
    probes.detach(&PROGRAMS);
    match probes.attach(&RAW_PROGRAMS) {
        Ok(()) => Ok(ClonePath::RawSysExit),
        Err(raw) => Err(raw.context(format!(
            "the syscall exit tracepoints were refused too ({})",
            crate::kernel::loader::brief(&tracepoints)
        ))),
    }
}

/// Attaches as `hook` says (a fallback is said) and takes the ring of failures.
pub fn open(probes: &mut Probes, hook: CloneHook) -> anyhow::Result<EventRing> {
    let path = attach(probes, hook)?;
    if path == ClonePath::RawSysExit {
        tracing::info!("note: failed task creation is traced {}", path.describe());
    }
    probes.take_ring(common::EVENTS)
}

/// One failed clone/clone3/fork/vfork, as reported.
#[derive(Clone, Debug, Serialize)]
pub struct CloneFailure {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// The same instant in nanoseconds since the epoch, for exporters.
    #[serde(skip)]
    pub time_unix_nano: u64,
    pub pid: u32,
    pub tid: u32,
    pub ppid: u32,
    pub comm: String,
    pub uid: u32,
    pub syscall: &'static str,
    pub errno: String,
    pub task: TaskKind,
    pub cause: cause::Cause,
    pub evidence: String,
    /// cgroup v2 path of the caller ("?" when it is already gone).
    pub cgroup: String,
    /// `namespace/pod/container`, or the systemd unit, session or cgroup for non-pods.
    pub workload: String,
    pub pod: Option<Arc<PodRef>>,
    /// Path of the caller's pids cgroup level that is nearest to its limit, if any.
    pub pids_cgroup: Option<String>,
    pub clone_flags: String,
    /// In a storm, how long before this failure the kernel state behind `cause` and `evidence`
    /// was read: at an earlier refusal of the same process, cgroup, user and errno, at most
    /// `BURST_NS` before. Absent when it was read at this failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_age_ms: Option<f64>,
}

#[cfg(test)]
impl CloneFailure {
    /// A thread refused by the pids limit of `cgroup`, for tests.
    pub fn example(cgroup: &str) -> CloneFailure {
        CloneFailure {
            time: String::new(),
            time_unix_nano: 0,
            pid: 1,
            tid: 1,
            ppid: 0,
            comm: "leaky".into(),
            uid: 0,
            syscall: "clone3",
            errno: "EAGAIN".into(),
            task: TaskKind::Thread,
            cause: cause::Cause::PidsLimit,
            evidence: "pids.current=5 pids.max=5".into(),
            cgroup: cgroup.into(),
            workload: cgroup.into(),
            pod: None,
            pids_cgroup: Some(cgroup.into()),
            clone_flags: String::new(),
            state_age_ms: None,
        }
    }
}

/// Decodes and enriches every event waiting in the ring buffer, in order.
pub fn deliver(
    batch: &Batch,
    enricher: &mut Enricher,
    attributor: &mut Attributor,
    mut emit: impl FnMut(Event) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    crate::kernel::loader::decode_each(
        batch.records(),
        "a clone failure",
        |raw: CloneFailureEvent| emit(Event::CloneFailure(enricher.enrich(&raw, attributor))),
    )
}

/// Turns kernel events into reports: resolves ids to paths and decides the cause.
pub struct Enricher {
    clock: KernelClock,
    page_size: u64,
    /// The node's counts and limits, re-read at most every `NODE_REREAD` (a failure storm
    /// must not cost three /proc reads per event).
    node: Option<(std::time::Instant, NodeTasks)>,
    low_pids: LowPids,
}

/// How stale the node's thread count and limits may be in a failure's evidence (the
/// threads-max verdict uses the kernel's own count at the failure, not this).
const NODE_REREAD: std::time::Duration = std::time::Duration::from_millis(100);

impl Default for Enricher {
    fn default() -> Self {
        Self::new()
    }
}

impl Enricher {
    pub fn new() -> Self {
        // SAFETY: sysconf has no preconditions.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        Enricher {
            clock: KernelClock::new(),
            page_size: u64::try_from(page_size).unwrap_or(4096),
            node: None,
            low_pids: LowPids::default(),
        }
    }

    pub fn enrich(&mut self, ev: &CloneFailureEvent, attributor: &mut Attributor) -> CloneFailure {
        let node = match self.node {
            Some((at, node)) if at.elapsed() < NODE_REREAD => node,
            _ => {
                let node = NodeTasks::read().unwrap_or_default();
                self.node = Some((std::time::Instant::now(), node));
                node
            }
        };
        let pids_cgroup = (ev.valid & valid::PIDS != 0)
            .then(|| attributor.cgroups.path(Hierarchy::Pids, ev.pids.cgroup_ino))
            .flatten()
            .map(|p| p.text());
        let memory_cgroup = (ev.valid & valid::MEMORY != 0)
            .then(|| {
                attributor
                    .cgroups
                    .path(Hierarchy::Memory, ev.memory.cgroup_ino)
            })
            .flatten()
            .map(|p| p.text());
        let Verdict { cause, evidence } = cause::classify(
            ev,
            &Facts {
                node,
                low_pids: &|inum, level| self.low_pids.count(inum, level),
                pids_cgroup: pids_cgroup.as_deref(),
                memory_cgroup: memory_cgroup.as_deref(),
                page_size: self.page_size,
            },
        );
        let task = if ev.valid & valid::FLAGS == 0 {
            TaskKind::Unknown
        } else if ev.is_thread() {
            TaskKind::Thread
        } else {
            TaskKind::Process
        };
        let (cgroup, attribution) = attributor.attribute(
            ev.cgroup_id,
            (ev.own_pids_ino != 0).then_some(ev.own_pids_ino),
        );
        CloneFailure {
            time: self.clock.rfc3339(ev.ktime_ns),
            time_unix_nano: self.clock.unix_nano(ev.ktime_ns),
            pid: ev.pid,
            tid: ev.tid,
            ppid: ev.ppid,
            comm: comm_string(&ev.comm),
            uid: ev.uid,
            syscall: Syscall::from_u32(ev.syscall).map_or("?", Syscall::name),
            errno: cause::errno_name(ev.errno),
            task,
            cause,
            evidence,
            cgroup: cgroup.unwrap_or_else(|| "?".to_owned()),
            workload: attribution.workload,
            pod: attribution.pod,
            pids_cgroup: pids_cgroup.filter(|_| ev.pids.limit != i64::MAX),
            clone_flags: format!("{:#x}", ev.clone_flags),
            state_age_ms: (ev.state_age_us != 0).then(|| f64::from(ev.state_age_us) / 1000.0),
        }
    }
}

fn comm_string(comm: &[u8; 16]) -> String {
    crate::text::c_string(comm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_records_are_rejected() {
        assert!(crate::kernel::loader::decode::<CloneFailureEvent>(&[0u8; 8]).is_none());
        let bytes = vec![0u8; size_of::<CloneFailureEvent>()];
        assert_eq!(
            crate::kernel::loader::decode::<CloneFailureEvent>(&bytes).map(|e| e.pid),
            Some(0)
        );
    }

    #[test]
    fn comm_stops_at_nul_and_tolerates_bad_utf8() {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"java");
        assert_eq!(comm_string(&comm), "java");
        assert_eq!(comm_string(&[0xff; 16]), "\\xff".repeat(16));
    }
}
