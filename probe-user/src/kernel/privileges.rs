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
use caps::{CapSet, Capability, CapsHashSet};

/// A capability kept, and what for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kept {
    pub cap: Capability,
    pub why: &'static str,
}

const BPF: Kept = Kept {
    cap: Capability::CAP_BPF,
    why: "reading the programs' maps",
};
const NET_ADMIN: Kept = Kept {
    cap: Capability::CAP_NET_ADMIN,
    why: "conntrack counters over ctnetlink",
};
const SYS_ADMIN: Kept = Kept {
    cap: Capability::CAP_SYS_ADMIN,
    why: "entering pods' network namespaces, where granted",
};
const SYS_PTRACE: Kept = Kept {
    cap: Capability::CAP_SYS_PTRACE,
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

/// Reduces this thread's capabilities to those of `keep` it holds, and says which remain
/// and for what. Irreversible.
pub fn keep_only(keep: &[Kept]) -> anyhow::Result<()> {
    let had = caps::read(None, CapSet::Effective).context("reading the capabilities to drop")?;
    let after: CapsHashSet = had
        .iter()
        .copied()
        .filter(|c| keep.iter().any(|k| k.cap == *c))
        .collect();
    let dropped: CapsHashSet = had.difference(&after).copied().collect();
    // Effective first: the kernel refuses a permitted set smaller than the effective one.
    for set in [CapSet::Effective, CapSet::Permitted] {
        caps::set(None, set, &after).context("dropping the capabilities only loading needed")?;
    }
    for set in [CapSet::Inheritable, CapSet::Ambient] {
        caps::clear(None, set).context("clearing the inheritable and ambient capabilities")?;
    }
    tracing::info!(
        "capabilities after attaching: kept {}; dropped {}",
        names(&after),
        counted(&dropped)
    );
    let why: Vec<String> = keep
        .iter()
        .filter(|k| after.contains(&k.cap))
        .map(|k| format!("{} ({})", name(k.cap), k.why))
        .collect();
    tracing::debug!("capabilities kept: {}", why.join(", "));
    tracing::debug!("capabilities dropped: {}", names(&dropped));
    Ok(())
}

/// A capability's name without `CAP_`, as the manifest and `capsh` spell it.
fn name(cap: Capability) -> String {
    let full = cap.to_string();
    full.strip_prefix("CAP_").unwrap_or(&full).to_owned()
}

/// The capabilities of `set` by name in the kernel's order, `none` for none.
fn names(set: &CapsHashSet) -> String {
    let mut caps: Vec<Capability> = set.iter().copied().collect();
    caps.sort_by_key(Capability::index);
    let names: Vec<String> = caps.into_iter().map(name).collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

/// The dropped capabilities for the short line: one by name, more by number (their names are
/// at debug level).
fn counted(dropped: &CapsHashSet) -> String {
    match dropped.len() {
        0 | 1 => names(dropped),
        n => format!("{n} others (--log-level debug lists them)"),
    }
}

/// Loading tracing programs needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN on older kernels).
pub fn require_privileges() -> anyhow::Result<()> {
    let held = caps::read(None, CapSet::Effective).context("reading the capabilities")?;
    let has = |cap| held.contains(&cap);
    if has(Capability::CAP_SYS_ADMIN) || (has(Capability::CAP_BPF) && has(Capability::CAP_PERFMON))
    {
        return Ok(());
    }
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    bail!(
        "faultline needs root, or CAP_BPF and CAP_PERFMON, to load its eBPF programs (running as uid {euid} with {})",
        names(&held)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kept_capabilities_are_named_as_the_manifest_names_them() {
        let kept: Vec<String> = [BPF, NET_ADMIN, SYS_ADMIN, SYS_PTRACE]
            .into_iter()
            .map(|k| name(k.cap))
            .collect();
        assert_eq!(kept, ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]);
        assert_eq!(after_attach(false), vec![BPF]);
    }

    #[test]
    fn the_line_names_what_is_kept_and_counts_the_rest() {
        let set = |caps: &[Capability]| -> CapsHashSet { caps.iter().copied().collect() };
        assert_eq!(
            names(&set(&[Capability::CAP_BPF, Capability::CAP_NET_ADMIN])),
            "NET_ADMIN, BPF"
        );
        assert_eq!(names(&set(&[])), "none");
        assert_eq!(counted(&set(&[])), "none");
        assert_eq!(counted(&set(&[Capability::CAP_SYS_ADMIN])), "SYS_ADMIN");
        let mut all = caps::all();
        all.remove(&Capability::CAP_BPF);
        assert_eq!(
            counted(&all),
            format!("{} others (--log-level debug lists them)", all.len())
        );
    }
}
