//! `faultline check`: what this kernel and host support, one line per item, with what works,
//! what an older kernel gets in place of a newer mechanism, and what does not work. A refused
//! program shows the verifier's last lines (the whole log with `--verbose`). Exits 0 when the
//! core (failed task creation tracing) works.

use crate::{
    attribution::cgroups::{CgroupFs, Hierarchy},
    attribution::netns::NetnsDirectory,
    kernel::btf::Btf,
    kernel::inventory::{self, Memlock},
    kernel::loader::{Hook, Probes},
    kernel::offsets,
    kernel::privileges,
    kernel::tracefs::Tracefs,
    signals::{clone, conntrack, dns, tasks},
};

#[derive(clap::Args, Debug, Default)]
pub struct CheckArgs {
    /// Print a refused program's whole verifier log (default: its last lines), and the
    /// programs and maps of the eBPF object with what the kernel accepted.
    #[arg(long, short)]
    pub verbose: bool,
    #[command(flatten)]
    pub kernel: crate::kernel::loader::KernelArgs,
}

/// Verifier log lines shown for a refused program without `--verbose`: the verifier's
/// complaint is at the end.
const VERIFIER_TAIL: usize = 20;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Warn,
    Fail,
}

struct Report {
    core_ok: bool,
}

impl Report {
    fn line(&mut self, status: Status, item: &str, detail: impl AsRef<str>) {
        let tag = match status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => {
                self.core_ok = false;
                "FAIL"
            }
        };
        println!("{tag}  {item:<22} {}", detail.as_ref());
    }
}

/// Prints the report; returns whether the core works.
pub fn run(args: &CheckArgs) -> bool {
    let mut r = Report { core_ok: true };
    let kernel = kernel_release();
    r.line(Status::Ok, "kernel", &kernel);
    let privileged = access(&mut r);
    let btf = btf(&mut r, args);
    let tracefs = if privileged.is_ok() {
        Tracefs::find_or_mount()
    } else {
        Tracefs::find().map_err(anyhow::Error::from)
    };
    match &tracefs {
        Ok(t) => {
            r.line(Status::Ok, "tracefs", t.root().display().to_string());
            tracepoints(&mut r, t);
        }
        Err(e) => r.line(
            Status::Warn,
            "tracefs",
            format!("{e:#}: failed task creation is traced through the raw sys_exit tracepoint (every syscall's exit)"),
        ),
    }
    cgroups(&mut r);
    if let (Ok(()), Some(btf)) = (&privileged, &btf) {
        programs(&mut r, args, &kernel, btf, tracefs.as_ref().ok());
    }
    conntrack_counters(&mut r);
    pod_namespace_counters(&mut r);
    r.line(
        Status::Ok,
        "kprobe/fentry",
        "not used: faultline runs on tracepoints only",
    );
    println!(
        "{}",
        if r.core_ok {
            "faultline: failed task creation tracing works on this node"
        } else {
            "faultline: the core does not work on this node (see FAIL lines)"
        }
    );
    r.core_ok
}

/// Privileges and lockdown; `Ok` when programs may be loaded.
fn access(r: &mut Report) -> anyhow::Result<()> {
    let privileged = privileges::require_privileges();
    match &privileged {
        Ok(()) => r.line(Status::Ok, "privileges", "can load eBPF programs"),
        Err(e) => r.line(Status::Fail, "privileges", format!("{e:#}")),
    }
    match std::fs::read_to_string("/sys/kernel/security/lockdown") {
        Ok(s) if s.contains("[confidentiality]") => r.line(
            Status::Fail,
            "lockdown",
            "confidentiality: eBPF may not read kernel memory; no cause can be decided",
        ),
        Ok(s) => r.line(Status::Ok, "lockdown", s.trim()),
        Err(_) => r.line(
            Status::Ok,
            "lockdown",
            "not enabled (no securityfs lockdown file)",
        ),
    }
    privileged
}

/// The kernel's BTF, and which struct members the programs read it has.
fn btf(r: &mut Report, args: &CheckArgs) -> Option<Btf> {
    let source = args
        .kernel
        .btf
        .as_deref()
        .unwrap_or(std::path::Path::new("/sys/kernel/btf/vmlinux"));
    let btf = match Btf::from_option(args.kernel.btf.as_deref()) {
        Ok(btf) => btf,
        Err(e) => {
            r.line(
                Status::Fail,
                "BTF",
                format!("{e:#}: struct offsets unknown, nothing can load"),
            );
            return None;
        }
    };
    r.line(Status::Ok, "BTF", source.display().to_string());
    let (structs, net) = (offsets::kernel(&btf), offsets::net(&btf));
    let missing: Vec<&str> = structs
        .missing
        .iter()
        .chain(&net.missing)
        .copied()
        .collect();
    if missing.is_empty() {
        r.line(
            Status::Ok,
            "kernel structs",
            "every member the programs read is present",
        );
    } else {
        r.line(
            Status::Warn,
            "kernel structs",
            format!(
                "missing {}: the evidence that needs them is absent",
                missing.join(", ")
            ),
        );
    }
    for fallback in structs.fallbacks.iter().chain(&net.fallbacks) {
        r.line(Status::Ok, "older kernel", fallback);
    }
    Some(btf)
}

/// The perf tracepoints the clone programs prefer (the other programs attach to raw
/// tracepoints, which need no tracefs).
fn tracepoints(r: &mut Report, t: &Tracefs) {
    for a in clone::PROGRAMS {
        let Hook::Tracepoint(category, name) = a.hook else {
            continue;
        };
        if t.has_event(category, name) {
            r.line(Status::Ok, "tracepoint", format!("{category}:{name}"));
        } else {
            r.line(
                Status::Warn,
                "tracepoint",
                format!("{category}:{name} missing: failed task creation through the raw sys_exit tracepoint"),
            );
        }
    }
}

fn cgroups(r: &mut Report) {
    let fs = match CgroupFs::discover() {
        Ok(fs) => fs,
        Err(e) => return r.line(Status::Warn, "cgroups", format!("{e:#}")),
    };
    let describe = |h: Hierarchy| match fs.mount(h) {
        Some(m) => format!("{} ({})", m.path.display(), if m.v2 { "v2" } else { "v1" }),
        None => "not mounted".to_owned(),
    };
    let unified = fs.mount(Hierarchy::Unified).is_some();
    r.line(
        if unified { Status::Ok } else { Status::Warn },
        "cgroup v2",
        if unified {
            describe(Hierarchy::Unified)
        } else {
            "not mounted: clone failures are attributed through the task's pids cgroup; per-cgroup task counts (top, headroom warnings) are unavailable".to_owned()
        },
    );
    for (h, name, lost) in [
        (
            Hierarchy::Pids,
            "pids controller",
            "pids limits cannot be named",
        ),
        (
            Hierarchy::Memory,
            "memory controller",
            "memory limits cannot be named",
        ),
    ] {
        match fs.mount(h) {
            Some(_) => r.line(Status::Ok, name, describe(h)),
            None => r.line(Status::Warn, name, format!("not mounted: {lost}")),
        }
    }
    refusal_counters(r, &fs);
}

/// The kernel's own refusal counts per cgroup that `explain` reports from before it watched.
fn refusal_counters(r: &mut Report, fs: &CgroupFs) {
    use crate::signals::refusals::{Availability, available};
    let available = available(fs);
    let names = |want: fn(&Availability) -> bool| {
        available
            .iter()
            .filter(|(_, a)| want(a))
            .map(|(c, a)| match a {
                Availability::File(f) => format!("{} ({f})", c.as_str()),
                _ => c.as_str().to_owned(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let read = names(|a| matches!(a, Availability::File(_)));
    if !read.is_empty() {
        r.line(
            Status::Ok,
            "refusal counters",
            format!("per cgroup since it was made: {read}; kernel.threads-max and pid_max keep no count of refusals"),
        );
    }
    let missing = names(|a| *a == Availability::Missing);
    if !missing.is_empty() {
        r.line(
            Status::Warn,
            "refusal counters",
            format!("not kept by this kernel or controller: {missing}: refusals from before faultline watched are not known for them"),
        );
    }
    let unseen = names(|a| *a == Availability::NoCgroup);
    if !unseen.is_empty() {
        r.line(
            Status::Ok,
            "refusal counters",
            format!("no cgroup below the root to look at for {unseen}: read in each cgroup once there is one"),
        );
    }
}

/// Verifying and attaching for real: the only honest test of the program types and of the
/// privileges this process has.
fn programs(r: &mut Report, args: &CheckArgs, kernel: &str, btf: &Btf, tracefs: Option<&Tracefs>) {
    let Some(mut probes) = load_probes(r, btf, tracefs) else {
        return;
    };
    let refused = |e: &anyhow::Error| verifier_error(e, kernel, args.verbose);
    tracepoint_programs(r, &mut probes, args, &refused);
    for d in &probes.degraded {
        r.line(
            Status::Warn,
            "degraded",
            format!("{} probe: {}", d.probe(), d.describe()),
        );
    }
    if args.verbose {
        object_inventory(&probes);
    }
    dns_programs(r, &mut probes, &refused);
}

/// Raises RLIMIT_MEMLOCK and loads the eBPF object (every program verified at attach), with a
/// line for each; `None` when it could not be loaded.
fn load_probes(r: &mut Report, btf: &Btf, tracefs: Option<&Tracefs>) -> Option<Probes> {
    let cpus = aya::util::nr_cpus().map_or(1, |n| u64::from(n.get()));
    let memlock = Memlock::raise(cpus);
    let short = memlock.shortfall().is_some();
    r.line(
        if short { Status::Fail } else { Status::Ok },
        "memlock",
        memlock.describe(),
    );
    match Probes::load(btf, tracefs, crate::kernel::loader::KernelLog::Off) {
        Ok(probes) => Some(probes),
        Err(_) if short => {
            r.line(Status::Fail, "eBPF object", "not loaded (memlock above)");
            None
        }
        Err(e) => {
            r.line(Status::Fail, "eBPF object", format!("{e:#}"));
            None
        }
    }
}

/// "verified and attached" lines: what, and to which hooks.
fn attached(what: &str, how: &str) -> String {
    format!("{what} verified and attached {how} (then detached)")
}

/// The programs on tracepoints: failed task creation (the core), task counts, cgroup naming,
/// conntrack drops; `refused` says why the kernel refused one.
fn tracepoint_programs(
    r: &mut Report,
    probes: &mut Probes,
    args: &CheckArgs,
    refused: &dyn Fn(&anyhow::Error) -> String,
) {
    match clone::attach(probes, args.kernel.clone_hook) {
        Ok(path) => r.line(
            Status::Ok,
            "tracepoint programs",
            attached("clone programs", path.describe()),
        ),
        Err(e) => r.line(
            Status::Fail,
            "tracepoint programs",
            format!(
                "clone programs: {}: no failed task creation can be traced",
                refused(&e)
            ),
        ),
    }
    match probes.attach(&tasks::PROGRAMS) {
        Ok(()) => r.line(
            Status::Ok,
            "tracepoint programs",
            attached("task counter programs", "to raw tracepoints"),
        ),
        Err(e) => r.line(
            Status::Warn,
            "tracepoint programs",
            format!(
                "task counter programs: {}: no per-cgroup task counts (top, headroom warnings)",
                refused(&e)
            ),
        ),
    }
    match CgroupFs::discover()
        .and_then(|fs| fs.followable())
        .and_then(|()| probes.attach(&crate::attribution::cgroups::PROGRAMS))
    {
        Ok(()) => r.line(
            Status::Ok,
            "tracepoint programs",
            attached(
                "cgroup naming programs",
                "to the raw tracepoints cgroup_mkdir, cgroup_rmdir",
            ),
        ),
        Err(e) => r.line(
            Status::Warn,
            "tracepoint programs",
            format!(
                "cgroup naming programs: {}: cgroups made after start are found by walking cgroupfs (rate-limited; slower to name a new pod)",
                refused(&e)
            ),
        ),
    }
    match conntrack::attach(probes) {
        Ok(_) => r.line(
            Status::Ok,
            "tracepoint programs",
            attached("conntrack drop program", "to the raw tracepoint kfree_skb"),
        ),
        Err(e) => r.line(
            Status::Warn,
            "tracepoint programs",
            format!("conntrack drop program: {}", refused(&e)),
        ),
    }
}

/// The cgroup_skb programs of the DNS probe, on the cgroup v2 root.
fn dns_programs(r: &mut Report, probes: &mut Probes, refused: &dyn Fn(&anyhow::Error) -> String) {
    match CgroupFs::discover().and_then(|fs| dns::attach(probes, &fs)) {
        Ok(_) => r.line(
            Status::Ok,
            "cgroup_skb programs",
            "DNS programs verified and attached to the cgroup v2 root (then detached)",
        ),
        Err(e) => r.line(
            Status::Warn,
            "cgroup_skb programs",
            format!(
                "{}: no DNS queries and no conntrack drop attribution by socket (needs CAP_NET_ADMIN and cgroup v2)",
                refused(&e)
            ),
        ),
    }
}

fn conntrack_counters(r: &mut Report) {
    match NetnsDirectory::new("/proc")
        .node()
        .and_then(|node| crate::signals::conntrack::ctstats::read(&node))
    {
        Ok((c, source)) => r.line(
            Status::Ok,
            "conntrack counters",
            format!(
                "node namespace via {source:?}: entries={} max={} insert_failed={} drop={} early_drop={} clash_resolve={} (per namespace, since it was made)",
                c.entries, c.max, c.insert_failed, c.drop, c.early_drop, c.clash_resolve
            ),
        ),
        Err(e) => r.line(
            Status::Warn,
            "conntrack counters",
            format!("{e:#}: drops are traced but not told apart by counters (cause other; ctnetlink needs CAP_NET_ADMIN)"),
        ),
    }
}

/// Pods' own namespaces (a sidecar's NAT): their counters through a process's
/// `/proc/<pid>/net/stat/nf_conntrack`, which needs neither CAP_SYS_PTRACE nor CAP_SYS_ADMIN
/// but a kernel built with CONFIG_NF_CONNTRACK_PROCFS (and the module loaded).
fn pod_namespace_counters(r: &mut Report) {
    let ours = crate::attribution::netns::procfs_key(std::path::Path::new("/proc/self"));
    match ours.map(|key| {
        crate::attribution::netns::read_proc_net(std::process::id(), key, "stat/nf_conntrack")
    }) {
        Some(Ok(_)) => r.line(
            Status::Ok,
            "pods' namespaces",
            "conntrack counters through /proc/<pid>/net/stat/nf_conntrack of a process in each (no CAP_SYS_PTRACE or CAP_SYS_ADMIN needed): drops and near-misses in a pod's own NAT are told apart",
        ),
        Some(Err(e)) => r.line(
            Status::Warn,
            "pods' namespaces",
            format!(
                "{e:#}: without CONFIG_NF_CONNTRACK_PROCFS (or before nf_conntrack is loaded) a drop in a pod's own namespace is cause other and its near-misses are not seen, unless faultline may enter it (CAP_SYS_ADMIN); the node's namespace is read through ctnetlink"
            ),
        ),
        None => r.line(
            Status::Warn,
            "pods' namespaces",
            "no /proc/self/net/stat: pods' namespaces cannot be found through their processes",
        ),
    }
}

/// `--verbose`: the embedded object's programs (from its ELF) and maps (as the kernel created
/// them), with the memory the maps take on this node: what a DaemonSet's memory limit must hold.
fn object_inventory(probes: &Probes) {
    match inventory::object_programs() {
        Ok(programs) => {
            for p in programs {
                println!(
                    "      program {:<20} {:<22} {} instructions",
                    p.name, p.section, p.instructions
                );
            }
        }
        Err(e) => println!("      programs: {e:#}"),
    }
    let maps = probes.loaded_maps();
    let cpus = aya::util::nr_cpus().map_or(1, |n| u64::from(n.get()));
    for m in &maps {
        println!(
            "      map     {:<21} {:<22} key {} value {} entries {}: {} KiB",
            m.name,
            m.kind,
            m.key_size,
            m.value_size,
            m.max_entries,
            m.bytes(cpus).div_ceil(1024)
        );
    }
    println!(
        "      maps take about {} MiB of kernel memory with {cpus} CPUs",
        inventory::maps_memory(&maps, cpus).div_ceil(1024 * 1024)
    );
}

/// An error with its verifier log cut to the last lines (all with `verbose`), and the kernel
/// that refused the program.
fn verifier_error(e: &anyhow::Error, kernel: &str, verbose: bool) -> String {
    let text = format!("{e:#}");
    let Some(i) = text.find("Verifier output:") else {
        return text;
    };
    let (head, log) = text.split_at(i);
    let log = log.trim_start_matches("Verifier output:");
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect();
    let shown = if verbose {
        &lines[..]
    } else {
        &lines[lines.len().saturating_sub(VERIFIER_TAIL)..]
    };
    let omitted = lines.len() - shown.len();
    let mut out = format!("{}refused by the verifier of Linux {kernel}", head);
    if omitted > 0 {
        out += &format!(
            " (last {} of {} log lines; --verbose for all)",
            shown.len(),
            lines.len()
        );
    }
    out.push(':');
    for l in shown {
        out += "\n        ";
        out += l;
    }
    out
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_program_shows_the_kernel_and_the_verifier_tail() {
        let log: String = (1..=100).map(|i| format!("{i}: insn\n")).collect();
        let e = anyhow::anyhow!("the BPF_PROG_LOAD syscall failed. Verifier output: {log}")
            .context("verifying program clone_exit");
        let brief = verifier_error(&e, "5.10.0-32-amd64", false);
        let lines: Vec<&str> = brief.lines().collect();
        assert!(
            lines[0].contains("refused by the verifier of Linux 5.10.0-32-amd64 (last 20 of 100"),
            "{brief}"
        );
        assert_eq!(lines.len(), 21);
        assert_eq!(lines[1].trim(), "81: insn");
        assert_eq!(lines[20].trim(), "100: insn");
        let full = verifier_error(&e, "5.10.0-32-amd64", true);
        assert_eq!(full.lines().count(), 101);
        // Errors without a verifier log are kept whole.
        let plain = anyhow::anyhow!("no such tracepoint");
        assert_eq!(verifier_error(&plain, "6.1", false), "no such tracepoint");
    }
}
