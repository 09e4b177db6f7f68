//! The privileges loading needs (checked before it: [`require_privileges`]), and giving up,
//! once the programs are attached, every capability only loading needed: the
//! daemon keeps what reading needs for as long as it runs (CAP_BPF: every map read goes
//! through bpf(2), which kernels before 6.5 refuse without it when unprivileged BPF is off,
//! Debian's default; CAP_NET_ADMIN: the conntrack counters over ctnetlink) and, where it was
//! granted one, what reaching pods' own network namespaces needs (CAP_SYS_ADMIN for setns,
//! CAP_SYS_PTRACE for their /proc entries; the DaemonSet grants neither). CAP_PERFMON,
//! CAP_SYSLOG and CAP_SYS_RESOURCE (attaching, kernel addresses, RLIMIT_MEMLOCK) and anything
//! else go, from the effective, permitted and inheritable sets and the ambient set; said in one
//! short line (what each kept one is for, and every dropped one, at debug level).
//! Capabilities belong to a thread: this runs before the pipeline starts any, and threads made
//! afterwards inherit the reduced sets.

use anyhow::{Context as _, bail};
use probe_common::caps;

/// A capability kept, and what for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kept {
    pub number: u32,
    pub why: &'static str,
}

const BPF: Kept = Kept {
    number: 39,
    why: "reading the programs' maps",
};
const NET_ADMIN: Kept = Kept {
    number: 12,
    why: "conntrack counters over ctnetlink",
};
const SYS_ADMIN: Kept = Kept {
    number: 21,
    why: "entering pods' network namespaces, where granted",
};
const SYS_PTRACE: Kept = Kept {
    number: 19,
    why: "reading pods' /proc entries, where granted",
};

/// What the running daemon still uses, given the signals attached.
pub fn after_attach(conntrack: bool) -> Vec<Kept> {
    let mut keep = vec![BPF];
    if conntrack {
        keep.extend([NET_ADMIN, SYS_ADMIN, SYS_PTRACE]);
    }
    keep
}

/// linux/capability.h, version 3 (64-bit sets as two 32-bit halves).
const VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn get() -> anyhow::Result<[Data; 2]> {
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget with a version-3 header and room for its two data structs.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("capget");
    }
    Ok(data)
}

fn set(data: &[Data; 2]) -> anyhow::Result<()> {
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    // SAFETY: capset on this thread with a version-3 header and its two data structs.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("capset");
    }
    Ok(())
}

/// Reduces this thread's capabilities to those of `keep` it holds, and says which remain
/// and for what. Irreversible.
pub fn keep_only(keep: &[Kept]) -> anyhow::Result<()> {
    let before = get().context("reading the capabilities to drop")?;
    let held = |d: &[Data; 2]| u64::from(d[0].effective) | (u64::from(d[1].effective) << 32);
    let had = held(&before);
    let mask = keep.iter().fold(0u64, |m, k| m | (1 << k.number));
    let after = had & mask;
    let data = [
        Data {
            effective: after as u32,
            permitted: after as u32,
            inheritable: 0,
        },
        Data {
            effective: (after >> 32) as u32,
            permitted: (after >> 32) as u32,
            inheritable: 0,
        },
    ];
    set(&data).context("dropping the capabilities only loading needed")?;
    // SAFETY: prctl with integer arguments; clears this thread's ambient set.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    tracing::info!(
        "capabilities after attaching: kept {}; dropped {}",
        names(after),
        counted(had & !after)
    );
    let why: Vec<String> = keep
        .iter()
        .filter(|k| after & (1 << k.number) != 0)
        .map(|k| format!("{} ({})", caps::name(k.number), k.why))
        .collect();
    tracing::debug!("capabilities kept: {}", why.join(", "));
    tracing::debug!("capabilities dropped: {}", names(had & !after));
    Ok(())
}

/// The capabilities in `set` by name, `none` for none.
fn names(set: u64) -> String {
    let names: Vec<&str> = (0..64u32)
        .filter(|n| set & (1 << n) != 0)
        .map(caps::name)
        .collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

/// The dropped capabilities for the short line: one by name, more by number (their names are
/// at debug level).
fn counted(dropped: u64) -> String {
    match dropped.count_ones() {
        0 | 1 => names(dropped),
        n => format!("{n} others (--log-level debug lists them)"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kept_numbers_are_the_named_capabilities() {
        for (kept, name) in [
            (BPF, "BPF"),
            (NET_ADMIN, "NET_ADMIN"),
            (SYS_ADMIN, "SYS_ADMIN"),
            (SYS_PTRACE, "SYS_PTRACE"),
        ] {
            assert_eq!(caps::number(name), Some(kept.number));
        }
        assert_eq!(after_attach(false), vec![BPF]);
    }

    #[test]
    fn the_line_names_what_is_kept_and_counts_the_rest() {
        let bit = |k: Kept| 1u64 << k.number;
        assert_eq!(names(bit(BPF) | bit(NET_ADMIN)), "NET_ADMIN, BPF");
        assert_eq!(names(0), "none");
        assert_eq!(counted(0), "none");
        assert_eq!(counted(bit(SYS_ADMIN)), "SYS_ADMIN");
        assert_eq!(
            counted((1u64 << 41) - 1 - bit(BPF)),
            "40 others (--log-level debug lists them)"
        );
    }
}
