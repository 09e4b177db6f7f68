//! The embedded eBPF object, and what it holds and costs: its programs (read from the ELF with
//! `object`), its maps and the kernel memory they take on a node of a given size, and what
//! RLIMIT_MEMLOCK means for loading them on this kernel. Read by `check` and the load.

use anyhow::Context as _;

/// The eBPF object, built by build.rs with aya-build.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe-ebpf"));

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

/// Kernel memory of the maps on a node with `cpus` possible CPUs.
pub fn maps_memory(maps: &[LoadedMap], cpus: u64) -> u64 {
    maps.iter().map(|m| m.bytes(cpus)).sum()
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

/// The embedded object's maps as it declares them (before any is created).
pub fn object_maps() -> Vec<LoadedMap> {
    const HASH: u32 = 1;
    const PERCPU_HASH: u32 = 5;
    const PERCPU_ARRAY: u32 = 6;
    const LRU_HASH: u32 = 9;
    const LRU_PERCPU_HASH: u32 = 10;
    const RINGBUF: u32 = 27;
    let Ok(object) = aya_obj::Object::parse(OBJECT) else {
        return Vec::new();
    };
    object
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
        .collect()
}

/// The declared maps' kernel memory on a node with `cpus` possible CPUs, costed like
/// [`LoadedMap::bytes`].
pub fn object_maps_memory(cpus: u64) -> u64 {
    maps_memory(&object_maps(), cpus)
}

#[cfg(test)]
mod tests {
    use object::{Object as _, ObjectSection as _};

    /// The object declares its license, and one the kernel counts as GPL-compatible
    /// (`license_is_gpl_compatible`, include/linux/license.h): without a `license` section aya
    /// would say "GPL" on the object's behalf, which is not what the crate is under.
    #[test]
    fn the_object_declares_a_gpl_compatible_license() {
        let file = object::File::parse(super::OBJECT).expect("the embedded object");
        let section = file.section_by_name("license").expect("a license section");
        let data = section.data().expect("its bytes");
        assert_eq!(data, b"Dual MIT/GPL\0");
        let kernel_gpl_compatible = [
            "GPL",
            "GPL v2",
            "GPL and additional rights",
            "Dual BSD/GPL",
            "Dual MIT/GPL",
            "Dual MPL/GPL",
        ];
        let text = std::str::from_utf8(&data[..data.len() - 1]).expect("ASCII");
        assert!(kernel_gpl_compatible.contains(&text), "{text}");
        let manifest = include_str!("../../../probe-ebpf/Cargo.toml");
        assert!(
            manifest.contains("license = \"MIT OR GPL-2.0-only\""),
            "probe-ebpf's Cargo.toml names the same license"
        );
    }
}
