//! Pipeline stage 1, load -> attach: the eBPF object built from probe-ebpf, given this kernel's
//! offsets, and its programs attached to their tracepoints through the path this kernel and
//! these privileges allow (raw tracepoints need no `perf_event_open`). Owns the maps afterwards.

use std::collections::HashMap;

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, RawTracePoint, TracePoint},
};
use probe_common::{
    clone::{CLONE_STAT_COUNT, CloneStat},
    conntrack::{CT_STAT_COUNT, ConntrackStat},
    dns::{DNS_STAT_COUNT, DnsKey, DnsPending, DnsStat, DnsTcpCounts, MAX_DNS_TCP_CGROUPS},
    offsets::MISSING,
    tasks::{MAX_TASK_CGROUPS, TASK_STAT_COUNT, TaskCounts, TaskStat},
};

use crate::{
    attribution::cgroups::{CgroupEvents, CgroupFs, Hierarchy},
    kernel::btf::Btf,
    kernel::offsets,
    kernel::tracefs::Tracefs,
};

/// A ring buffer of events, read by `kernel::rings`.
pub type EventRing = RingBuf<MapData>;

/// The eBPF object, built by build.rs with aya-build.
pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe-ebpf"));

/// Where a program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// A perf tracepoint (category, name): attached through `perf_event_open`, which Debian's
    /// kernels refuse without CAP_SYS_ADMIN at perf_event_paranoid 3.
    Tracepoint(&'static str, &'static str),
    /// A raw tracepoint by name: attached through a bpf link, with CAP_BPF and CAP_PERFMON.
    Raw(&'static str),
}

/// A program of the object and its hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub program: &'static str,
    pub hook: Hook,
}

const fn tracepoint(
    program: &'static str,
    category: &'static str,
    name: &'static str,
) -> Attachment {
    Attachment {
        program,
        hook: Hook::Tracepoint(category, name),
    }
}

const fn raw(program: &'static str, name: &'static str) -> Attachment {
    Attachment {
        program,
        hook: Hook::Raw(name),
    }
}

/// Failed task creation: the four syscalls' exit tracepoints (run only on those syscalls).
pub const CLONE_PROGRAMS: [Attachment; 4] = [
    tracepoint("clone_exit", "syscalls", "sys_exit_clone"),
    tracepoint("clone3_exit", "syscalls", "sys_exit_clone3"),
    tracepoint("fork_exit", "syscalls", "sys_exit_fork"),
    tracepoint("vfork_exit", "syscalls", "sys_exit_vfork"),
];

/// Failed task creation where the perf tracepoints cannot be attached: every syscall's exit,
/// filtered in the program (syscall tracepoints have no raw form of their own).
pub const CLONE_RAW_PROGRAMS: [Attachment; 1] = [raw("clone_sys_exit", "sys_exit")];

/// Task creation and exit counters per cgroup.
pub const TASK_PROGRAMS: [Attachment; 3] = [
    raw("task_newtask", "task_newtask"),
    raw("task_exit", "sched_process_exit"),
    raw("task_cgroup_rmdir", "cgroup_rmdir"),
];

/// cgroup v2 directories made and removed, for naming cgroups by id (attribution).
pub const CGROUP_PROGRAMS: [Attachment; 2] = [
    raw("cgroup_mkdir", "cgroup_mkdir"),
    raw("cgroup_rmdir", "cgroup_rmdir"),
];

/// Packets dropped by netfilter.
pub const CONNTRACK_PROGRAMS: [Attachment; 1] = [raw("conntrack_drop", "kfree_skb")];

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

/// Evidence a probe lacks on this node although it is attached: said by `check`, in `run`'s
/// log, and in `faultline_probe_degraded`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Degraded {
    /// Before 6.14 pid_max is one global variable, found in /proc/kallsyms, which shows
    /// addresses only to CAP_SYSLOG: the value used is the one userspace reads after the failure.
    GlobalPidMaxHidden,
    /// The cgroup naming programs could not be attached (or the cgroup v2 mount is not the
    /// hierarchy's root): cgroups made after start are named by walking cgroupfs.
    CgroupsNamedByWalk,
}

impl Degraded {
    /// The probe (signal) it degrades, as `faultline_probe_attached` names it.
    pub fn probe(self) -> &'static str {
        match self {
            Degraded::GlobalPidMaxHidden => "clone",
            Degraded::CgroupsNamedByWalk => "tasks",
        }
    }

    /// The metric's `reason` label.
    pub fn reason(self) -> &'static str {
        match self {
            Degraded::GlobalPidMaxHidden => "kernel_addresses_hidden",
            Degraded::CgroupsNamedByWalk => "cgroups_named_by_walk",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Degraded::GlobalPidMaxHidden => {
                "kernel addresses hidden (no CAP_SYSLOG): the node's pid_max (global before 6.14) is read after a failure, not at it"
            }
            Degraded::CgroupsNamedByWalk => {
                "cgroups made after start are named by walking cgroupfs (rate-limited), not from the kernel's records: the first events of a new pod may show no pod"
            }
        }
    }
}

/// What the conntrack-drop program cannot do without kernel addresses (before 5.17).
const CONNTRACK_BLIND: &str = "kernel addresses hidden (no CAP_SYSLOG): before 5.17 a conntrack drop cannot be told from another freed packet (no drop reasons; the free's location is compared with nf_hook_slow's address): conntrack drops off, the counters still work";

/// Where the kernel's types come from. Every command that loads the programs takes it.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct KernelArgs {
    /// Read the kernel's types from this file (raw BTF, or a vmlinux ELF with a .BTF section)
    /// instead of /sys/kernel/btf/vmlinux.
    #[arg(long, env = "FAULTLINE_BTF")]
    pub btf: Option<std::path::PathBuf>,
    /// How failed task creation is hooked: the syscall exit tracepoints where perf_event_open
    /// is allowed, else the raw sys_exit tracepoint (`auto`); or only one of them.
    #[arg(long, env = "FAULTLINE_CLONE_HOOK", value_enum, default_value_t)]
    pub clone_hook: CloneHook,
}

/// How failed task creation is hooked (`--clone-hook`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CloneHook {
    /// The syscall exit tracepoints, else (perf_event_open refused) the raw sys_exit tracepoint.
    #[default]
    Auto,
    /// Only the syscall exit tracepoints (perf_event_open; run on those four syscalls only).
    Tracepoints,
    /// Only the raw sys_exit tracepoint (a bpf link; runs on every syscall's exit).
    Raw,
}

/// What the programs may log (`trace --kernel-log`): missing evidence, rejected packets. `off`
/// (the default) costs nothing: the verifier removes the log statements.

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KernelLog {
    #[default]
    Off,
    Error,
    Warn,
    Info,
    Debug,
}

impl KernelLog {
    /// aya-log's level number (`AYA_LOG_LEVEL`): statements above it are dead code.
    fn level(self) -> u8 {
        match self {
            KernelLog::Off => 0,
            KernelLog::Error => 1,
            KernelLog::Warn => 2,
            KernelLog::Info => 3,
            KernelLog::Debug => 4,
        }
    }
}

/// The programs' log records, printed to stderr as `faultline: kernel <level>: <message>`.
pub type KernelLogger = tokio::io::unix::AsyncFd<aya_log::EbpfLogger<LogBridge>>;

/// Hands aya-log's records (the programs' own log, `--kernel-log`) to faultline's log.
pub struct LogBridge;

impl log::Log for LogBridge {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        tracing::info!(
            "kernel {}: {}",
            record.level().as_str().to_lowercase(),
            record.args()
        );
    }

    fn flush(&self) {}
}

pub struct Probes {
    ebpf: Ebpf,
    /// The programs' log records, while `--kernel-log` is on (taken once by the command).
    logger: Option<KernelLogger>,
    /// Kernel struct members this kernel lacks: their evidence will be absent.
    pub missing_members: Vec<&'static str>,
    /// Older layouts or mechanisms used in place of newer ones on this kernel.
    pub fallbacks: Vec<&'static str>,
    /// Evidence missing for want of a privilege.
    pub degraded: Vec<Degraded>,
    /// Why the conntrack-drop program cannot tell a netfilter drop here, if it cannot.
    conntrack_blind: Option<&'static str>,
}

/// Counters the DNS programs keep in the kernel, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsStats {
    /// Query events that did not fit in the ring buffer.
    pub lost: u64,
    /// DNS-over-TCP segments in cgroups the full per-cgroup map could not count.
    pub tcp_uncounted: u64,
    /// Queries not tracked: the kernel's map of waiting queries was full.
    pub untracked: u64,
    /// Queries not tracked: their cgroup had its quota of waiting queries.
    pub over_quota: u64,
    /// Port 53 packets that are not DNS (too short, the wrong QR bit for their direction, or
    /// not a standard query with one question).
    pub malformed: u64,
    /// Responses that matched no waiting query.
    pub unmatched: u64,
    /// Responses with the TC bit.
    pub truncated: u64,
}

/// Counters the task programs keep in the kernel, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskStats {
    /// Creations and exits in cgroups the full map had no room for.
    pub map_full: u64,
    pub cgroups_removed: u64,
}

/// Counters the conntrack-drop program keeps in the kernel, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConntrackStats {
    pub drops: u64,
    /// Drops whose event did not fit in the ring buffer.
    pub lost: u64,
    /// Drops by the state of the packet's conntrack entry.
    pub no_entry: u64,
    pub unconfirmed: u64,
    pub confirmed: u64,
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

/// Counters with a count of events lost: the reader's queue drops add to the kernel's.
macro_rules! plus_lost {
    ($($stats:ty),*) => {$(
        impl $stats {
            /// With `dropped` more events lost (the ring reader's queue was full).
            pub fn plus_lost(mut self, dropped: u64) -> Self {
                self.lost += dropped;
                self
            }
        }
    )*};
}
plus_lost!(CloneStats, DnsStats, ConntrackStats);

impl Probes {
    /// Everything before attaching, for the commands: privileges, tracefs, BTF, load.
    pub fn open(args: &KernelArgs, kernel_log: KernelLog) -> anyhow::Result<Self> {
        require_privileges()?;
        // Only the syscall exit tracepoints need tracefs; without it they fall back to a raw
        // tracepoint.
        let tracefs = Tracefs::find_or_mount()
            .inspect_err(|e| tracing::info!("note: {e:#}"))
            .ok();
        let btf = Btf::from_option(args.btf.as_deref()).context(
            "kernel BTF is required (CONFIG_DEBUG_INFO_BTF, or --btf with a vmlinux or BTF file)",
        )?;
        let probes = Probes::load(&btf, tracefs.as_ref(), kernel_log)?;
        for member in &probes.missing_members {
            tracing::info!("note: this kernel has no {member}; that evidence will be missing");
        }
        for d in &probes.degraded {
            tracing::warn!("{} probe degraded: {}", d.probe(), d.describe());
        }
        Ok(probes)
    }

    /// Loads the object with offsets from `btf` and `tracefs`. Does not attach anything.
    pub fn load(
        btf: &Btf,
        tracefs: Option<&Tracefs>,
        kernel_log: KernelLog,
    ) -> anyhow::Result<Self> {
        let cpus = aya::util::nr_cpus().map_or(1, |n| n.get() as u64);
        let memlock = Memlock::raise(cpus);
        let kernel = offsets::kernel(btf);
        let net = offsets::net(btf);
        let tracepoints = offsets::tracepoints(tracefs);
        let symbols = offsets::KernelSymbols::read();
        let level = kernel_log.level();
        // Both per-cgroup hashes are keyed by a cgroup id.
        const U64: u32 = size_of::<u64>() as u32;
        let loaded = EbpfLoader::new()
            .map_max_entries(
                "TASK_COUNTS",
                per_cpu_hash_entries(MAX_TASK_CGROUPS, U64, size_of::<TaskCounts>() as u32, cpus),
            )
            .map_max_entries(
                "DNS_TCP",
                per_cpu_hash_entries(
                    MAX_DNS_TCP_CGROUPS,
                    U64,
                    size_of::<DnsTcpCounts>() as u32,
                    cpus,
                ),
            )
            .override_global("AYA_LOG_LEVEL", &level, true)
            .override_global("CLONE_KERNEL_OFFSETS", &kernel.offsets, true)
            .override_global("NET_OFFSETS", &net.offsets, true)
            .override_global("TP_OFFSETS", &tracepoints.offsets, true)
            .override_global("NF_DROP_SITE", &symbols.nf_drop_site, true)
            .override_global("PID_MAX_ADDR", &symbols.pid_max, true)
            .load(OBJECT);
        let mut ebpf = match (loaded, memlock.shortfall()) {
            (Ok(ebpf), _) => ebpf,
            (Err(e), Some(short)) => return Err(anyhow::Error::new(e).context(short)),
            (Err(e), None) => return Err(e).context("loading the eBPF object"),
        };
        let mut missing_members = kernel.missing;
        missing_members.extend(net.missing);
        let mut fallbacks = kernel.fallbacks;
        fallbacks.extend(net.fallbacks);
        let mut degraded = Vec::new();
        if kernel.offsets.pidns_pid_max == MISSING && symbols.pid_max == 0 && symbols.hidden {
            degraded.push(Degraded::GlobalPidMaxHidden);
        }
        let conntrack_blind = (net.offsets.reason_netfilter_drop == MISSING
            && symbols.nf_drop_site[0] == 0)
            .then_some(if symbols.hidden {
                CONNTRACK_BLIND
            } else {
                "no drop reasons (before 5.17) and nf_hook_slow not in /proc/kallsyms: conntrack drops off, the counters still work"
            });
        let logger = if kernel_log == KernelLog::Off {
            None
        } else {
            let logger = aya_log::EbpfLogger::init_with_logger(&mut ebpf, LogBridge)
                .context("reading the programs' log ring")?;
            Some(register(logger, "the programs' log ring")?)
        };
        Ok(Probes {
            ebpf,
            logger,
            missing_members,
            fallbacks,
            degraded,
            conntrack_blind,
        })
    }

    /// The programs' log records (once), when `--kernel-log` is on.
    pub fn kernel_logger(&mut self) -> Option<KernelLogger> {
        self.logger.take()
    }

    /// Loads (verifies) and attaches programs to their hooks.
    pub fn attach(&mut self, programs: &[Attachment]) -> anyhow::Result<()> {
        for a in programs {
            let program = self
                .ebpf
                .program_mut(a.program)
                .with_context(|| format!("program {} missing from the eBPF object", a.program))?;
            match a.hook {
                Hook::Tracepoint(category, name) => {
                    let prog: &mut TracePoint = program
                        .try_into()
                        .with_context(|| format!("program {} is not a tracepoint", a.program))?;
                    prog.load()
                        .with_context(|| format!("verifying program {}", a.program))?;
                    prog.attach(category, name)
                        .with_context(|| format!("attaching {} to {category}:{name}", a.program))?;
                }
                Hook::Raw(name) => {
                    let prog: &mut RawTracePoint = program.try_into().with_context(|| {
                        format!("program {} is not a raw tracepoint", a.program)
                    })?;
                    prog.load()
                        .with_context(|| format!("verifying program {}", a.program))?;
                    prog.attach(name).with_context(|| {
                        format!("attaching {} to the raw tracepoint {name}", a.program)
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Attaches the clone programs as `hook` says: with `Auto`, the syscall exit tracepoints
    /// where `perf_event_open` is allowed, else the raw `sys_exit` tracepoint (both refused:
    /// both reasons).
    pub fn attach_clone(&mut self, hook: CloneHook) -> anyhow::Result<ClonePath> {
        if hook == CloneHook::Raw {
            return self
                .attach(&CLONE_RAW_PROGRAMS)
                .map(|()| ClonePath::RawSysExit);
        }
        let tracepoints = match self.attach(&CLONE_PROGRAMS) {
            Ok(()) => return Ok(ClonePath::SyscallTracepoints),
            Err(e) if hook == CloneHook::Tracepoints => return Err(e),
            Err(e) => e,
        };
        // Detach whichever of the four did attach before one was refused.
        for a in &CLONE_PROGRAMS {
            if let Some(prog) = self.ebpf.program_mut(a.program)
                && let Ok(prog) = <&mut TracePoint>::try_from(prog)
            {
                let _ = prog.unload();
            }
        }
        match self.attach(&CLONE_RAW_PROGRAMS) {
            Ok(()) => Ok(ClonePath::RawSysExit),
            Err(raw) => Err(raw.context(format!(
                "the syscall exit tracepoints were refused too ({})",
                brief(&tracepoints)
            ))),
        }
    }

    /// Attaches the DNS programs (cgroup_skb egress and ingress) to the cgroup v2 root, where
    /// they see every socket on the node.
    pub fn attach_dns(&mut self, cgroups: &CgroupFs) -> anyhow::Result<()> {
        let cgroup_v2_root = &cgroups
            .mount(Hierarchy::Unified)
            .context("no cgroup v2 mount")?
            .path;
        let root = std::fs::File::open(cgroup_v2_root)
            .with_context(|| format!("opening the cgroup v2 root {}", cgroup_v2_root.display()))?;
        for (program, attach_type) in [
            ("dns_egress", CgroupSkbAttachType::Egress),
            ("dns_ingress", CgroupSkbAttachType::Ingress),
        ] {
            let prog: &mut CgroupSkb = self
                .ebpf
                .program_mut(program)
                .with_context(|| format!("program {program} missing from the eBPF object"))?
                .try_into()
                .with_context(|| format!("program {program} is not cgroup_skb"))?;
            prog.load()
                .with_context(|| format!("verifying program {program}"))?;
            prog.attach(&root, attach_type, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {program} to {}", cgroup_v2_root.display()))?;
        }
        Ok(())
    }

    /// Attaches the DNS programs to the cgroup v2 root and returns their ring of
    /// `DnsPacketEvent`s (once).
    pub fn dns_events(&mut self, cgroups: &CgroupFs) -> anyhow::Result<EventRing> {
        self.attach_dns(cgroups)?;
        self.take_ring("DNS_EVENTS")
    }

    pub fn dns_stats(&self) -> anyhow::Result<DnsStats> {
        let sums = self.stat_sums::<{ DNS_STAT_COUNT as usize }>("DNS_STATS")?;
        Ok(DnsStats {
            lost: sums[DnsStat::RingbufFull as usize],
            tcp_uncounted: sums[DnsStat::TcpMapFull as usize],
            untracked: sums[DnsStat::PendingFull as usize],
            over_quota: sums[DnsStat::PendingQuota as usize],
            malformed: sums[DnsStat::Malformed as usize],
            unmatched: sums[DnsStat::Unmatched as usize],
            truncated: sums[DnsStat::Truncated as usize],
        })
    }

    /// The queries waiting for an answer in the kernel.
    pub fn dns_waiting(&self) -> anyhow::Result<Vec<(DnsKey, DnsPending)>> {
        let map = self
            .ebpf
            .map("DNS_PENDING")
            .context("map DNS_PENDING missing")?;
        let pending = aya::maps::HashMap::<_, DnsKey, DnsPending>::try_from(map)
            .context("DNS_PENDING is not a hash map")?;
        // An entry answered during the walk can end it early; the next sweep sees the rest.
        Ok(pending.iter().map_while(Result::ok).collect())
    }

    /// Removes expired queries from the kernel's map (an answer may have removed one first).
    pub fn forget_dns_queries(&mut self, keys: &[DnsKey]) -> anyhow::Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let map = self
            .ebpf
            .map_mut("DNS_PENDING")
            .context("map DNS_PENDING missing")?;
        let mut pending = aya::maps::HashMap::<_, DnsKey, DnsPending>::try_from(map)
            .context("DNS_PENDING is not a hash map")?;
        for key in keys {
            let _ = pending.remove(key);
        }
        Ok(())
    }

    /// Sets each cgroup's count of waiting queries (the quota's) to the truth, and forgets
    /// the cgroups with none.
    pub fn set_dns_pending_counts(&mut self, counts: &HashMap<u64, u64>) -> anyhow::Result<()> {
        let map = self
            .ebpf
            .map_mut("DNS_PENDING_BY_CGROUP")
            .context("map DNS_PENDING_BY_CGROUP missing")?;
        let mut by_cgroup = aya::maps::HashMap::<_, u64, u64>::try_from(map)
            .context("DNS_PENDING_BY_CGROUP is not a hash map")?;
        let gone: Vec<u64> = by_cgroup
            .keys()
            .map_while(Result::ok)
            .filter(|id| !counts.contains_key(id))
            .collect();
        for id in gone {
            let _ = by_cgroup.remove(&id);
        }
        for (id, n) in counts {
            // Full (a cgroup the kernel let through unquota'd): it is counted next time.
            let _ = by_cgroup.insert(id, n, 0);
        }
        Ok(())
    }

    /// DNS-over-TCP segments per cgroup v2 id, summed over CPUs.
    pub fn dns_tcp_counts(&self) -> anyhow::Result<Vec<(u64, DnsTcpCounts)>> {
        self.per_cpu_hash("DNS_TCP", |a: DnsTcpCounts, c: &DnsTcpCounts| {
            DnsTcpCounts {
                to_server: a.to_server + c.to_server,
                from_server: a.from_server + c.from_server,
            }
        })
    }

    /// Attaches the conntrack-drop program and returns its ring of `ConntrackDropEvent`s
    /// (once).
    pub fn conntrack_events(&mut self) -> anyhow::Result<EventRing> {
        self.attach_conntrack()?;
        self.take_ring("CT_EVENTS")
    }

    /// Attaches the conntrack-drop program, where it can tell a netfilter drop on this node.
    pub fn attach_conntrack(&mut self) -> anyhow::Result<()> {
        if let Some(blind) = self.conntrack_blind {
            bail!("{blind}");
        }
        self.attach(&CONNTRACK_PROGRAMS)
    }

    pub fn conntrack_stats(&self) -> anyhow::Result<ConntrackStats> {
        let sums = self.stat_sums::<{ CT_STAT_COUNT as usize }>("CT_STATS")?;
        Ok(ConntrackStats {
            drops: sums[ConntrackStat::Drops as usize],
            lost: sums[ConntrackStat::RingbufFull as usize],
            no_entry: sums[ConntrackStat::NoEntry as usize],
            unconfirmed: sums[ConntrackStat::Unconfirmed as usize],
            confirmed: sums[ConntrackStat::Confirmed as usize],
        })
    }

    /// Attaches the cgroup naming programs and returns their ring and counters (once).
    pub fn cgroup_events(&mut self) -> anyhow::Result<CgroupEvents> {
        self.attach(&CGROUP_PROGRAMS)?;
        let ring = self.take_ring("CGROUP_EVENTS")?;
        let stats = self
            .ebpf
            .take_map("CGROUP_STATS")
            .context("map CGROUP_STATS missing or already taken")?;
        let stats = PerCpuArray::try_from(stats).context("CGROUP_STATS is not a per-CPU array")?;
        Ok(CgroupEvents::new(ring, stats))
    }

    /// The ring of `CloneFailureEvent`s (once).
    pub fn clone_events(&mut self) -> anyhow::Result<EventRing> {
        self.take_ring("CLONE_EVENTS")
    }

    /// Takes a ring-buffer map (once) and registers it with the event loop.
    fn take_ring(&mut self, name: &str) -> anyhow::Result<EventRing> {
        let map = self
            .ebpf
            .take_map(name)
            .with_context(|| format!("map {name} missing or already taken"))?;
        RingBuf::try_from(map).with_context(|| format!("{name} is not a ring buffer"))
    }

    pub fn clone_stats(&self) -> anyhow::Result<CloneStats> {
        let sums = self.stat_sums::<{ CLONE_STAT_COUNT as usize }>("CLONE_STATS")?;
        Ok(CloneStats {
            failures: sums[CloneStat::Failures as usize],
            lost: sums[CloneStat::RingbufFull as usize],
            missing_entry: sums[CloneStat::MissingEntry as usize],
        })
    }

    pub fn task_stats(&self) -> anyhow::Result<TaskStats> {
        let sums = self.stat_sums::<{ TASK_STAT_COUNT as usize }>("TASK_STATS")?;
        Ok(TaskStats {
            map_full: sums[TaskStat::MapFull as usize],
            cgroups_removed: sums[TaskStat::CgroupsRemoved as usize],
        })
    }

    /// Every cgroup's task counters (cgroup v2 id, counts summed over CPUs).
    pub fn task_counts(&self) -> anyhow::Result<Vec<(u64, TaskCounts)>> {
        self.per_cpu_hash("TASK_COUNTS", |a: TaskCounts, c: &TaskCounts| TaskCounts {
            threads: a.threads + c.threads,
            processes: a.processes + c.processes,
            exited: a.exited + c.exited,
        })
    }

    /// Every entry of a per-CPU hash keyed by cgroup id, its values summed over CPUs.
    fn per_cpu_hash<V: aya::Pod + Default>(
        &self,
        name: &str,
        add: impl Fn(V, &V) -> V,
    ) -> anyhow::Result<Vec<(u64, V)>> {
        let map = self
            .ebpf
            .map(name)
            .with_context(|| format!("map {name} missing"))?;
        let hash = PerCpuHashMap::<_, u64, V>::try_from(map)
            .with_context(|| format!("{name} is not a per-CPU hash"))?;
        let mut out = Vec::new();
        for entry in hash.iter() {
            // A cgroup removed during the walk can end it early; the next read sees the rest.
            let Ok((id, per_cpu)) = entry else { break };
            out.push((id, per_cpu.iter().fold(V::default(), &add)));
        }
        Ok(out)
    }

    /// A per-CPU array of counters, each summed over CPUs.
    fn stat_sums<const N: usize>(&self, name: &str) -> anyhow::Result<[u64; N]> {
        let map = self
            .ebpf
            .map(name)
            .with_context(|| format!("map {name} missing"))?;
        let array = PerCpuArray::<_, u64>::try_from(map)
            .with_context(|| format!("{name} is not a per-CPU array"))?;
        let mut sums = [0u64; N];
        for (i, sum) in sums.iter_mut().enumerate() {
            let values = array
                .get(&(i as u32), 0)
                .with_context(|| format!("reading {name}"))?;
            *sum = values.iter().sum();
        }
        Ok(sums)
    }
}

/// A program of the embedded eBPF object, as its ELF file describes it.
pub struct ObjectProgram {
    pub name: String,
    /// ELF section: the program type and attach point (`tracepoint`, `cgroup_skb/egress`).
    pub section: String,
    pub instructions: u64,
}

/// The programs in the embedded object, read with `object` from the ELF itself.
pub fn object_programs() -> anyhow::Result<Vec<ObjectProgram>> {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _, SymbolKind};
    let file = object::File::parse(OBJECT).context("parsing the embedded eBPF object")?;
    let mut programs = Vec::new();
    for symbol in file.symbols() {
        let Some(index) = symbol.section_index() else {
            continue;
        };
        let section = file.section_by_index(index)?;
        let section = section.name().unwrap_or("?");
        if symbol.kind() != SymbolKind::Text || symbol.size() == 0 || section == ".text" {
            continue;
        }
        programs.push(ObjectProgram {
            name: symbol.name().unwrap_or("?").to_owned(),
            section: section.to_owned(),
            instructions: symbol.size() / 8,
        });
    }
    programs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(programs)
}

/// A map as the kernel created it, and what it costs in kernel memory.
pub struct LoadedMap {
    pub name: String,
    pub kind: String,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    /// One value per possible CPU.
    pub per_cpu: bool,
    pub hash: bool,
    pub ring: bool,
}

/// Kernel memory one per-CPU hash may take at load: it holds an entry per cgroup, each with a
/// value per possible CPU, all preallocated (an insert from a tracepoint never waits on an
/// allocator). 16,384 cgroups up to ~170 CPUs; fewer on bigger nodes (3,597 at 192 CPUs).
pub const PER_CPU_HASH_BUDGET: u64 = 16 << 20;

/// Kernel memory of one map entry with `cpus` possible CPUs: its value (one per CPU for
/// per-CPU maps, each rounded to 8 bytes), and for a hash its key and ~48 bytes of
/// bookkeeping.
fn entry_bytes(key_size: u32, value_size: u32, per_cpu: bool, hash: bool, cpus: u64) -> u64 {
    let value = u64::from(value_size);
    let values = if per_cpu {
        value.next_multiple_of(8) * cpus.max(1)
    } else {
        value
    };
    if hash {
        values + u64::from(key_size).next_multiple_of(8) + 48
    } else {
        values
    }
}

/// Entries of a per-CPU hash (at most `max`, at least 1,024) that fit PER_CPU_HASH_BUDGET
/// with `cpus` possible CPUs.
pub fn per_cpu_hash_entries(max: u32, key_size: u32, value_size: u32, cpus: u64) -> u32 {
    let fit = PER_CPU_HASH_BUDGET / entry_bytes(key_size, value_size, true, true, cpus);
    u32::try_from(fit).unwrap_or(u32::MAX).clamp(1024, max)
}

impl LoadedMap {
    /// Kernel memory with `cpus` possible CPUs (a ring buffer's max_entries is its size in
    /// bytes; a per-CPU hash has as many entries as the loader gives it on such a node).
    pub fn bytes(&self, cpus: u64) -> u64 {
        if self.ring {
            return u64::from(self.max_entries);
        }
        let entries = if self.per_cpu && self.hash {
            per_cpu_hash_entries(self.max_entries, self.key_size, self.value_size, cpus)
        } else {
            self.max_entries
        };
        u64::from(entries)
            * entry_bytes(
                self.key_size,
                self.value_size,
                self.per_cpu,
                self.hash,
                cpus,
            )
    }
}

impl Probes {
    /// Every map of the loaded object, as the kernel holds it.
    pub fn loaded_maps(&self) -> Vec<LoadedMap> {
        use aya::maps::Map;
        let mut maps = Vec::new();
        for (name, map) in self.ebpf.maps() {
            let (data, per_cpu, hash, ring) = match map {
                Map::Array(d) => (d, false, false, false),
                Map::HashMap(d) | Map::LruHashMap(d) => (d, false, true, false),
                Map::PerCpuArray(d) => (d, true, false, false),
                Map::PerCpuHashMap(d) | Map::PerCpuLruHashMap(d) => (d, true, true, false),
                Map::RingBuf(d) => (d, false, false, true),
                _ => continue,
            };
            let Ok(info) = data.info() else { continue };
            maps.push(LoadedMap {
                name: name.to_owned(),
                kind: info
                    .map_type()
                    .map_or_else(|_| "?".to_owned(), |t| format!("{t:?}")),
                key_size: info.key_size(),
                value_size: info.value_size(),
                max_entries: info.max_entries(),
                per_cpu,
                hash,
                ring,
            });
        }
        maps.sort_by(|a, b| a.name.cmp(&b.name));
        maps
    }
}

/// Kernel memory of the maps on a node with `cpus` possible CPUs.
pub fn maps_memory(maps: &[LoadedMap], cpus: u64) -> u64 {
    maps.iter().map(|m| m.bytes(cpus)).sum()
}

/// Registers a ring buffer (or a reader owning one) with the tokio event loop.
fn register<T: std::os::fd::AsRawFd>(
    ring: T,
    name: &str,
) -> anyhow::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: the AsyncFd owns the ring, so the fd stays open for as long as it is registered.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .with_context(|| format!("registering {name} with the event loop"))
}

/// Decodes each record of a batch the ring reader took as a `T`, in order, and hands each
/// to `f`. A record shorter than a `T` (the binary and its embedded object would disagree: a
/// bug) is skipped and said on stderr, the same way for every ring.
pub fn decode_each<'a, T: aya::Pod>(
    records: impl IntoIterator<Item = &'a [u8]>,
    what: &str,
    mut f: impl FnMut(T) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    for item in records {
        let Some(record) = decode::<T>(item) else {
            tracing::warn!(
                "skipped a ring-buffer record of {} bytes (expected {what}, {} bytes)",
                item.len(),
                size_of::<T>()
            );
            continue;
        };
        f(record)?;
    }
    Ok(())
}

/// Decodes one ring-buffer record; `None` for a record shorter than a `T`.
pub fn decode<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: the length is checked; `Pod` types are plain #[repr(C)] data valid for any bit
    // pattern, and read_unaligned does not need the ring buffer's alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// An error on one line: a refused program's verifier log (hundreds of lines) is cut.
pub fn brief(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    match text.find("Verifier output:") {
        Some(i) => format!("{}(verifier log omitted)", &text[..i]),
        None => text.lines().next().unwrap_or_default().to_owned(),
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

/// What RLIMIT_MEMLOCK means for loading here. Kernels before 5.11 charge eBPF maps (and
/// programs) to it, per user; later ones to the memory cgroup. Raising it needs
/// CAP_SYS_RESOURCE, which a container does not have unless asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Memlock {
    /// Linux 5.11+: maps are charged to the memory cgroup, the limit does not apply.
    Cgroup,
    /// Raised to unlimited.
    Unlimited,
    /// A kernel that charges the limit, which could not be raised: `limit` bytes, of which
    /// the maps need about `need`.
    Limited {
        kernel: String,
        limit: u64,
        need: u64,
    },
}

/// The first release that charges eBPF memory to the memory cgroup instead of RLIMIT_MEMLOCK.
const MEMCG_CHARGED: (u32, u32) = (5, 11);

impl Memlock {
    /// Raises the limit to unlimited (best effort), and says where that leaves the load.
    pub fn raise(cpus: u64) -> Memlock {
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: plain setrlimit(2) with a valid struct.
        let raised = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0;
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        if release_at_least(&kernel, MEMCG_CHARGED) {
            return Memlock::Cgroup;
        }
        let mut current = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain getrlimit(2) into a valid struct.
        let read = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut current) } == 0;
        if raised || (read && current.rlim_cur == libc::RLIM_INFINITY) {
            return Memlock::Unlimited;
        }
        Memlock::Limited {
            kernel,
            limit: current.rlim_cur,
            need: object_maps_memory(cpus),
        }
    }

    /// Why loading fails here, when the limit is below what the maps need.
    pub fn shortfall(&self) -> Option<String> {
        match self {
            Memlock::Limited {
                kernel,
                limit,
                need,
            } if limit < need => Some(format!(
                "kernel {kernel} charges eBPF maps to RLIMIT_MEMLOCK: {} KiB here, faultline's maps need about {} MiB; give the container CAP_SYS_RESOURCE (faultline then raises the limit itself) or a memlock limit of at least that",
                limit / 1024,
                need.div_ceil(1 << 20)
            )),
            _ => None,
        }
    }

    /// One line for `check`.
    pub fn describe(&self) -> String {
        match self {
            Memlock::Cgroup => {
                "not charged: Linux 5.11+ charges eBPF maps to the memory cgroup".to_owned()
            }
            Memlock::Unlimited => {
                "raised to unlimited (this kernel charges eBPF maps to RLIMIT_MEMLOCK)".to_owned()
            }
            Memlock::Limited { limit, need, .. } => self.shortfall().unwrap_or_else(|| {
                format!(
                    "{} KiB, enough for the maps' ~{} MiB",
                    limit / 1024,
                    need.div_ceil(1 << 20)
                )
            }),
        }
    }
}

/// Whether a release string ("5.10.0-32-amd64") is at least `(major, minor)`; an unreadable
/// one counts as new.
fn release_at_least(release: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => true,
    }
}

/// The embedded object's maps as it declares them (before any is created), costed like
/// [`LoadedMap::bytes`].
pub fn object_maps_memory(cpus: u64) -> u64 {
    const HASH: u32 = 1;
    const PERCPU_HASH: u32 = 5;
    const PERCPU_ARRAY: u32 = 6;
    const LRU_HASH: u32 = 9;
    const LRU_PERCPU_HASH: u32 = 10;
    const RINGBUF: u32 = 27;
    let Ok(object) = aya_obj::Object::parse(OBJECT) else {
        return 0;
    };
    let maps: Vec<LoadedMap> = object
        .maps
        .iter()
        .map(|(name, m)| {
            let t = m.map_type();
            LoadedMap {
                name: name.clone(),
                kind: t.to_string(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries: m.max_entries(),
                per_cpu: matches!(t, PERCPU_HASH | PERCPU_ARRAY | LRU_PERCPU_HASH),
                hash: matches!(t, HASH | PERCPU_HASH | LRU_HASH | LRU_PERCPU_HASH),
                ring: t == RINGBUF,
            }
        })
        .collect();
    maps_memory(&maps, cpus)
}
