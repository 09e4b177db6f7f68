//! Load -> attach: the eBPF object built from probe-ebpf, given this kernel's offsets, and
//! its programs attached to their hooks as each signal's descriptor lists them (the signals
//! choose the path this kernel and these privileges allow: raw tracepoints need no
//! `perf_event_open`). Owns the maps afterwards and hands out rings, counters and maps by
//! name; it names no signal.

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, RawTracePoint, TracePoint},
};
use probe_common::{Counters, offsets::MISSING};

use crate::{
    kernel::btf::Btf,
    kernel::inventory::{LoadedMap, OBJECT, object_maps, per_cpu_hash_entries},
    kernel::offsets,
    kernel::tracefs::Tracefs,
};

/// A ring buffer of events, read by `kernel::rings`.
pub type EventRing = RingBuf<MapData>;

/// Where a program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// A perf tracepoint (category, name): attached through `perf_event_open`, which Debian's
    /// kernels refuse without CAP_SYS_ADMIN at perf_event_paranoid 3.
    Tracepoint(&'static str, &'static str),
    /// A raw tracepoint by name: attached through a bpf link, with CAP_BPF and CAP_PERFMON.
    Raw(&'static str),
    /// A cgroup_skb program on a cgroup v2 directory ([`Probes::attach_to_cgroup`]), egress
    /// or ingress: it sees every socket in that cgroup and below.
    CgroupSkb(Direction),
}

/// Which packets a cgroup_skb program sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Egress,
    Ingress,
}

/// A program of the object and its hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub program: &'static str,
    pub hook: Hook,
}

pub const fn tracepoint(
    program: &'static str,
    category: &'static str,
    name: &'static str,
) -> Attachment {
    Attachment {
        program,
        hook: Hook::Tracepoint(category, name),
    }
}

pub const fn raw(program: &'static str, name: &'static str) -> Attachment {
    Attachment {
        program,
        hook: Hook::Raw(name),
    }
}

pub const fn cgroup_skb(program: &'static str, direction: Direction) -> Attachment {
    Attachment {
        program,
        hook: Hook::CgroupSkb(direction),
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

/// What this kernel and these privileges let the programs tell, found at load; each signal
/// judges what it means for its own programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelFacts {
    /// /proc/kallsyms shows no addresses (no CAP_SYSLOG).
    pub addresses_hidden: bool,
    /// Freed packets carry a drop reason (5.17+): a netfilter drop says so itself.
    pub drop_reasons: bool,
    /// `nf_hook_slow`'s address range is known: a free's location can be compared with it.
    pub nf_drop_site: bool,
}

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
    /// What the programs can tell on this kernel.
    pub facts: KernelFacts,
}

impl Probes {
    /// Everything before attaching, for the commands: privileges, tracefs, BTF, load.
    pub fn open(args: &KernelArgs, kernel_log: KernelLog) -> anyhow::Result<Self> {
        crate::kernel::privileges::require_privileges()?;
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
        let memlock = crate::kernel::inventory::Memlock::raise(cpus);
        let kernel = offsets::kernel(btf);
        let net = offsets::net(btf);
        let tracepoints = offsets::tracepoints(tracefs);
        let symbols = offsets::KernelSymbols::read();
        let level = kernel_log.level();
        let mut loader = EbpfLoader::new();
        // Every per-CPU hash (an entry per cgroup, a value per possible CPU) is cut to the
        // budget on a node with many CPUs.
        let per_cpu_hashes: Vec<LoadedMap> = object_maps()
            .into_iter()
            .filter(|m| m.per_cpu && m.hash)
            .collect();
        for m in &per_cpu_hashes {
            let entries = per_cpu_hash_entries(m.max_entries, m.key_size, m.value_size, cpus);
            loader.map_max_entries(&m.name, entries);
        }
        let loaded = loader
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
        let facts = KernelFacts {
            addresses_hidden: symbols.hidden,
            drop_reasons: net.offsets.reason_netfilter_drop != MISSING,
            nf_drop_site: symbols.nf_drop_site[0] != 0,
        };
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
            facts,
        })
    }

    /// The programs' log records (once), when `--kernel-log` is on.
    pub fn kernel_logger(&mut self) -> Option<KernelLogger> {
        self.logger.take()
    }

    /// Loads (verifies) and attaches programs to their hooks (cgroup_skb programs: with
    /// [`Probes::attach_to_cgroup`]).
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
                Hook::CgroupSkb(_) => {
                    bail!("program {} attaches to a cgroup", a.program)
                }
            }
        }
        Ok(())
    }

    /// Unloads programs (detaching them), as after a partial [`Probes::attach`]; a program
    /// never loaded is left as it is.
    pub fn detach(&mut self, programs: &[Attachment]) {
        for a in programs {
            if let Some(prog) = self.ebpf.program_mut(a.program) {
                let _ = match prog {
                    aya::programs::Program::TracePoint(p) => p.unload(),
                    aya::programs::Program::RawTracePoint(p) => p.unload(),
                    aya::programs::Program::CgroupSkb(p) => p.unload(),
                    _ => Ok(()),
                };
            }
        }
    }

    /// Loads and attaches cgroup_skb programs to the cgroup v2 directory `cgroup`.
    pub fn attach_to_cgroup(
        &mut self,
        programs: &[Attachment],
        cgroup: &std::path::Path,
    ) -> anyhow::Result<()> {
        let dir = std::fs::File::open(cgroup)
            .with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
        for a in programs {
            let Hook::CgroupSkb(direction) = a.hook else {
                bail!("program {} does not attach to a cgroup", a.program);
            };
            let prog: &mut CgroupSkb = self
                .ebpf
                .program_mut(a.program)
                .with_context(|| format!("program {} missing from the eBPF object", a.program))?
                .try_into()
                .with_context(|| format!("program {} is not cgroup_skb", a.program))?;
            prog.load()
                .with_context(|| format!("verifying program {}", a.program))?;
            let direction = match direction {
                Direction::Egress => CgroupSkbAttachType::Egress,
                Direction::Ingress => CgroupSkbAttachType::Ingress,
            };
            prog.attach(&dir, direction, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {} to {}", a.program, cgroup.display()))?;
        }
        Ok(())
    }

    /// Takes a ring-buffer map (once), for `kernel::rings`.
    pub fn take_ring(&mut self, name: &str) -> anyhow::Result<EventRing> {
        let map = self
            .ebpf
            .take_map(name)
            .with_context(|| format!("map {name} missing or already taken"))?;
        RingBuf::try_from(map).with_context(|| format!("{name} is not a ring buffer"))
    }

    /// Takes a map (once), for a reader that owns it.
    pub fn take_map(&mut self, name: &str) -> anyhow::Result<aya::maps::Map> {
        self.ebpf
            .take_map(name)
            .with_context(|| format!("map {name} missing or already taken"))
    }

    /// A hash map's entries, each once. An entry the kernel removes while the walk stands on
    /// it sends the walk back to the first key (what `BPF_MAP_GET_NEXT_KEY` does with a key
    /// gone): the entries seen again are skipped; one removed elsewhere can end the walk
    /// early, and the next read sees the rest.
    pub fn hash_entries<K: aya::Pod + std::hash::Hash + Eq, V: aya::Pod>(
        &self,
        name: &str,
    ) -> anyhow::Result<Vec<(K, V)>> {
        let map = self
            .ebpf
            .map(name)
            .with_context(|| format!("map {name} missing"))?;
        let hash = aya::maps::HashMap::<_, K, V>::try_from(map)
            .with_context(|| format!("{name} is not a hash map"))?;
        let mut seen = std::collections::HashSet::new();
        Ok(hash
            .iter()
            .map_while(Result::ok)
            .filter(|(k, _)| seen.insert(*k))
            .collect())
    }

    /// A hash map, to change.
    pub fn hash_mut<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
    ) -> anyhow::Result<aya::maps::HashMap<&mut MapData, K, V>> {
        let map = self
            .ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} missing"))?;
        aya::maps::HashMap::try_from(map).with_context(|| format!("{name} is not a hash map"))
    }

    /// Every entry of a per-CPU hash keyed by cgroup id, its values summed over CPUs.
    pub fn per_cpu_hash<V: aya::Pod + Default>(
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
        let mut seen = std::collections::HashSet::new();
        for entry in hash.iter() {
            // A cgroup removed during the walk can end it early (the next read sees the rest),
            // or send it back to the first key: each cgroup is summed once.
            let Ok((id, per_cpu)) = entry else { break };
            if seen.insert(id) {
                out.push((id, per_cpu.iter().fold(V::default(), &add)));
            }
        }
        Ok(out)
    }

    /// A program's counters (its per-CPU array, each slot summed over CPUs).
    pub fn stats<C: Counters>(&self) -> anyhow::Result<C> {
        let name = C::MAP;
        let map = self
            .ebpf
            .map(name)
            .with_context(|| format!("map {name} missing"))?;
        let array = PerCpuArray::<_, u64>::try_from(map)
            .with_context(|| format!("{name} is not a per-CPU array"))?;
        let mut sums = Vec::with_capacity(C::COUNT as usize);
        for i in 0..C::COUNT {
            let values = array
                .get(&i, 0)
                .with_context(|| format!("reading {name}"))?;
            sums.push(values.iter().sum());
        }
        Ok(C::from_sums(&sums))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A record is taken whole (a longer one: the kernel's record may grow at its end);
    /// a shorter one would be read past its end, and is skipped.
    #[test]
    fn a_record_shorter_than_its_type_is_skipped_never_read_past() {
        let bytes = 0x0102_0304_u32.to_ne_bytes();
        assert_eq!(decode::<u32>(&bytes), Some(0x0102_0304));
        assert_eq!(
            decode::<u32>(&[bytes.as_slice(), &[9]].concat()),
            Some(0x0102_0304)
        );
        assert_eq!(decode::<u32>(&bytes[..3]), None);
        let mut seen = Vec::new();
        let records: [&[u8]; 3] = [&bytes, &bytes[..2], &7u32.to_ne_bytes()];
        decode_each::<u32>(records, "a u32", |v| {
            seen.push(v);
            Ok(())
        })
        .expect("no error from the callback");
        assert_eq!(seen, [0x0102_0304, 7]);
    }

    /// A refused program's error is one line: the verifier's log is cut, as is any text
    /// after a first line.
    #[test]
    fn an_error_is_said_on_one_line_without_the_verifier_log() {
        let refused = anyhow::anyhow!("Verifier output: 0: (bf) r6 = r1\n1: ...\n")
            .context("verifying program dns_egress");
        assert_eq!(
            brief(&refused),
            "verifying program dns_egress: (verifier log omitted)"
        );
        let plain = anyhow::anyhow!("first line\nsecond line").context("attaching");
        assert_eq!(brief(&plain), "attaching: first line");
    }

    /// `--kernel-log` levels are aya-log's numbers: off removes every statement.
    #[test]
    fn kernel_log_levels_rise_from_off() {
        let levels: Vec<u8> = [
            KernelLog::Off,
            KernelLog::Error,
            KernelLog::Warn,
            KernelLog::Info,
            KernelLog::Debug,
        ]
        .into_iter()
        .map(KernelLog::level)
        .collect();
        assert_eq!(levels, [0, 1, 2, 3, 4]);
    }
}
