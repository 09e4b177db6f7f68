//! Pipeline stage 1, load -> attach: the eBPF object built from probe-ebpf, given this kernel's
//! offsets, and its programs attached to their tracepoints. Owns the maps afterwards.

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};
use probe_common::clone::{CLONE_STAT_COUNT, CloneStat};

use crate::{btf::Btf, offsets, tracefs::Tracefs};

/// The eBPF object, built by build.rs with aya-build.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe-ebpf"));

/// (program, tracepoint in the `syscalls` category) for failed task creation.
pub const CLONE_PROGRAMS: [(&str, &str); 6] = [
    ("clone_enter", "sys_enter_clone"),
    ("clone3_enter", "sys_enter_clone3"),
    ("clone_exit", "sys_exit_clone"),
    ("clone3_exit", "sys_exit_clone3"),
    ("fork_exit", "sys_exit_fork"),
    ("vfork_exit", "sys_exit_vfork"),
];

pub struct Probes {
    ebpf: Ebpf,
    /// Kernel struct members this kernel lacks: their evidence will be absent.
    pub missing_members: Vec<&'static str>,
}

/// Counters the clone programs keep in the kernel, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CloneStats {
    pub failures: u64,
    /// Events that did not fit in the ring buffer.
    pub lost: u64,
    /// Failures whose syscall entry was not seen (clone flags unknown).
    pub missing_entry: u64,
}

impl Probes {
    /// Loads the object with offsets from `btf` and `tracefs`. Does not attach anything.
    pub fn load(btf: &Btf, tracefs: &Tracefs) -> anyhow::Result<Self> {
        raise_memlock_limit();
        let kernel = offsets::kernel(btf);
        let tracepoints = offsets::tracepoints(tracefs)?;
        let ebpf = EbpfLoader::new()
            .override_global("CLONE_KERNEL_OFFSETS", &kernel.offsets, true)
            .override_global("CLONE_TP_OFFSETS", &tracepoints, true)
            .load(OBJECT)
            .context("loading the eBPF object")?;
        Ok(Probes {
            ebpf,
            missing_members: kernel.missing,
        })
    }

    /// Loads (verifies) and attaches the failed-task-creation programs.
    pub fn attach_clone(&mut self) -> anyhow::Result<()> {
        for (program, tracepoint) in CLONE_PROGRAMS {
            let prog: &mut TracePoint = self
                .ebpf
                .program_mut(program)
                .with_context(|| format!("program {program} missing from the eBPF object"))?
                .try_into()
                .with_context(|| format!("program {program} is not a tracepoint"))?;
            prog.load()
                .with_context(|| format!("verifying program {program}"))?;
            prog.attach("syscalls", tracepoint)
                .with_context(|| format!("attaching {program} to syscalls:{tracepoint}"))?;
        }
        Ok(())
    }

    /// The ring buffer of `CloneFailureEvent`s. Can be taken once.
    pub fn take_clone_events(&mut self) -> anyhow::Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map("CLONE_EVENTS")
            .context("map CLONE_EVENTS missing or already taken")?;
        RingBuf::try_from(map).context("CLONE_EVENTS is not a ring buffer")
    }

    pub fn clone_stats(&self) -> anyhow::Result<CloneStats> {
        let map = self
            .ebpf
            .map("CLONE_STATS")
            .context("map CLONE_STATS missing")?;
        let array =
            PerCpuArray::<_, u64>::try_from(map).context("CLONE_STATS is not a per-CPU array")?;
        let mut sums = [0u64; CLONE_STAT_COUNT as usize];
        for (i, sum) in sums.iter_mut().enumerate() {
            let values = array.get(&(i as u32), 0).context("reading CLONE_STATS")?;
            *sum = values.iter().sum();
        }
        Ok(CloneStats {
            failures: sums[CloneStat::Failures as usize],
            lost: sums[CloneStat::RingbufFull as usize],
            missing_entry: sums[CloneStat::MissingEntry as usize],
        })
    }
}

/// Capabilities in effect, from /proc/self/status.
pub fn effective_capabilities() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("no CapEff in /proc/self/status")?;
    u64::from_str_radix(hex.trim(), 16).context("parsing CapEff")
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Loading tracing programs needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN on older kernels).
pub fn require_privileges() -> anyhow::Result<()> {
    let caps = effective_capabilities()?;
    let has = |cap: u32| caps & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    bail!(
        "faultline needs root, or CAP_BPF and CAP_PERFMON, to load its eBPF programs (running as uid {euid} with CapEff={caps:#x})"
    )
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones to the memory cgroup.
/// Raising it is best effort: where it cannot be raised the load error says so.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain setrlimit(2) with a valid struct.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}
