//! Fills the eBPF programs' offset globals: kernel struct members from BTF, syscall tracepoint
//! fields from tracefs. What the running kernel lacks stays `MISSING` and is listed, so that
//! `faultline check` can say which evidence will be absent.

use probe_common::offsets::{KernelOffsets, MISSING, NetOffsets, TracepointOffsets};

use crate::{kernel::btf::Btf, kernel::tracefs::Tracefs};

/// Offsets for this kernel plus the names of the members it does not have, and the older
/// layouts or mechanisms used in place of newer ones (for `faultline check`).
pub struct Resolved<T> {
    pub offsets: T,
    pub missing: Vec<&'static str>,
    pub fallbacks: Vec<&'static str>,
}

/// The kernel's THREAD_SIZE on the architectures whose `task_pt_regs()` is the top of the
/// kernel stack less one `struct pt_regs` (x86_64 and arm64, 16 KiB without KASAN).
const THREAD_SIZE: Option<u32> = if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
    Some(16 * 1024)
} else {
    None
};

macro_rules! members {
    ($btf:ident, $out:ident, $missing:ident; $($field:ident = $strukt:literal . $member:literal,)*) => {
        $(
            match $btf.member_offset($strukt, $member) {
                Ok(off) => $out.$field = off,
                Err(_) => $missing.push(concat!($strukt, ".", $member)),
            }
        )*
    };
}

/// This architecture's clone, clone3, fork and vfork syscall numbers (arm64 has no fork or
/// vfork: glibc makes them clone calls there).
fn syscall_numbers() -> (u32, u32, u32, u32) {
    let nr = |n: libc::c_long| u32::try_from(n).unwrap_or(MISSING);
    #[cfg(target_arch = "x86_64")]
    let (fork, vfork) = (nr(libc::SYS_fork), nr(libc::SYS_vfork));
    #[cfg(not(target_arch = "x86_64"))]
    let (fork, vfork) = (MISSING, MISSING);
    (nr(libc::SYS_clone), nr(libc::SYS_clone3), fork, vfork)
}

macro_rules! enumerators {
    ($btf:ident, $out:ident, $missing:ident; $($field:ident = $name:literal,)*) => {
        $(
            match $btf.enum_value($name).ok().and_then(|v| u32::try_from(v).ok()) {
                Some(v) => $out.$field = v,
                None => $missing.push($name),
            }
        )*
    };
}

/// Offsets of the kernel struct members and enum values the clone programs read.
pub fn kernel(btf: &Btf) -> Resolved<KernelOffsets> {
    let mut r = Resolved {
        offsets: KernelOffsets::NONE,
        missing: Vec::new(),
        fallbacks: Vec::new(),
    };
    struct_members(btf, &mut r);
    pid_max(btf, &mut r);
    nproc_count(btf, &mut r);
    syscall_registers(btf, &mut r);
    let o = &mut r.offsets;
    (o.nr_clone, o.nr_clone3, o.nr_fork, o.nr_vfork) = syscall_numbers();
    user_registers(btf, &mut r);
    subsys_ids(btf, &mut r);
    r
}

/// The struct members read as they are, with no older layout to fall back on.
fn struct_members(btf: &Btf, r: &mut Resolved<KernelOffsets>) {
    let (o, missing) = (&mut r.offsets, &mut r.missing);
    members!(btf, o, missing;
        task_tgid = "task_struct"."tgid",
        task_real_parent = "task_struct"."real_parent",
        task_cgroups = "task_struct"."cgroups",
        task_nsproxy = "task_struct"."nsproxy",
        task_signal = "task_struct"."signal",
        task_real_cred = "task_struct"."real_cred",
        css_set_subsys = "css_set"."subsys",
        css_cgroup = "cgroup_subsys_state"."cgroup",
        css_parent = "cgroup_subsys_state"."parent",
        cgroup_kn = "cgroup"."kn",
        kernfs_node_id = "kernfs_node"."id",
        cgroup_root = "cgroup"."root",
        cgroup_root_hierarchy_id = "cgroup_root"."hierarchy_id",
        pids_css = "pids_cgroup"."css",
        pids_counter = "pids_cgroup"."counter",
        pids_limit = "pids_cgroup"."limit",
        memcg_css = "mem_cgroup"."css",
        memcg_memory = "mem_cgroup"."memory",
        page_counter_usage = "page_counter"."usage",
        page_counter_max = "page_counter"."max",
        page_counter_failcnt = "page_counter"."failcnt",
        nsproxy_pid_ns_for_children = "nsproxy"."pid_ns_for_children",
        pidns_pid_allocated = "pid_namespace"."pid_allocated",
        pidns_level = "pid_namespace"."level",
        pidns_parent = "pid_namespace"."parent",
        pidns_inum = "pid_namespace"."ns.inum",
        pidns_idr_next = "pid_namespace"."idr.idr_next",
        signal_rlim = "signal_struct"."rlim",
    );
}

/// Per-namespace pid_max arrived in 6.14; before, one global value applies to every level.
fn pid_max(btf: &Btf, r: &mut Resolved<KernelOffsets>) {
    match btf.member_offset("pid_namespace", "pid_max") {
        Ok(off) => r.offsets.pidns_pid_max = off,
        Err(_) => r
            .fallbacks
            .push("pid_max is global (before 6.14): the kernel's pid_max read at each failure"),
    }
}

/// The process count RLIMIT_NPROC limits: in ucounts since 5.14, in user_struct before.
fn nproc_count(btf: &Btf, r: &mut Resolved<KernelOffsets>) {
    let o = &mut r.offsets;
    let ucounts = (
        btf.member_offset("cred", "ucounts"),
        btf.member_offset("ucounts", "rlimit"),
        btf.enum_value("UCOUNT_RLIMIT_NPROC"),
    );
    let user = (
        btf.member_offset("cred", "user"),
        btf.member_offset("user_struct", "processes"),
    );
    match (ucounts, user) {
        ((Ok(c), Ok(l), Ok(i)), _) if u32::try_from(i).is_ok() => {
            (o.cred_ucounts, o.ucounts_rlimit) = (c, l);
            o.ucount_rlimit_nproc = i as u32;
        }
        (_, (Ok(c), Ok(p))) => {
            (o.cred_user, o.user_processes) = (c, p);
            r.fallbacks
                .push("RLIMIT_NPROC count from cred->user->processes (before 5.14)");
        }
        _ => r.missing.push("cred.ucounts (RLIMIT_NPROC count)"),
    }
}

/// Where `pt_regs` keeps the syscall's first argument and its number.
fn syscall_registers(btf: &Btf, r: &mut Resolved<KernelOffsets>) {
    // arm64 keeps the first argument in orig_x0 (x0 is the return value at exit); x86_64 in di.
    match ["orig_x0", "di"]
        .iter()
        .find_map(|m| btf.member_offset("pt_regs", m).ok())
    {
        Some(off) => r.offsets.pt_regs_arg0 = off,
        None => r.missing.push("pt_regs.di"),
    }
    // The syscall number, for the raw `sys_exit` tracepoint: orig_ax on x86_64, syscallno on
    // arm64.
    match ["syscallno", "orig_ax"]
        .iter()
        .find_map(|m| btf.member_offset("pt_regs", m).ok())
    {
        Some(off) => r.offsets.pt_regs_syscall_nr = off,
        None => r.missing.push("pt_regs.orig_ax"),
    }
}

/// Where the saved user registers are: bpf_task_pt_regs (5.15+), else the top of the task's
/// kernel stack.
fn user_registers(btf: &Btf, r: &mut Resolved<KernelOffsets>) {
    if btf.enum_value("BPF_FUNC_task_pt_regs").is_ok() {
        r.offsets.has_task_pt_regs = 1;
        return;
    }
    match (
        btf.member_offset("task_struct", "stack"),
        btf.struct_size("pt_regs"),
        THREAD_SIZE,
    ) {
        (Ok(stack), Ok(size), Some(thread_size)) => {
            let o = &mut r.offsets;
            (o.task_stack, o.pt_regs_size, o.thread_size) = (stack, size, thread_size);
            r.fallbacks.push("clone flags read from the top of the task's kernel stack (no bpf_task_pt_regs before 5.15)");
        }
        _ => r
            .missing
            .push("bpf_task_pt_regs (clone flags: task kind unknown)"),
    }
}

/// The cgroup subsystems' ids, to find a task's pids and memory cgroups.
fn subsys_ids(btf: &Btf, r: &mut Resolved<KernelOffsets>) {
    let (o, missing) = (&mut r.offsets, &mut r.missing);
    enumerators!(btf, o, missing;
        pids_subsys_id = "pids_cgrp_id",
        memory_subsys_id = "memory_cgrp_id",
    );
}

/// Offsets for the conntrack-drop program. The tuple's layout is read member by member; the
/// reply tuple is the second element of `nf_conn.tuplehash`. Where conntrack is a module,
/// `nf_conn` and its tuple are described only in the module's BTF, read on top of vmlinux.
pub fn net(vmlinux: &Btf) -> Resolved<NetOffsets> {
    let mut o = NetOffsets::NONE;
    let mut missing = Vec::new();
    let mut fallbacks = Vec::new();
    let module;
    let btf = if vmlinux.has_struct("nf_conn") {
        vmlinux
    } else {
        match vmlinux.with_module("nf_conntrack") {
            Ok(m) => {
                module = m;
                fallbacks.push("nf_conn from the nf_conntrack module's BTF");
                &module
            }
            Err(_) => {
                fallbacks.push("nf_conntrack is not loaded: no conntrack entry details until faultline restarts after it is");
                vmlinux
            }
        }
    };
    members!(btf, o, missing;
        skb_nfct = "sk_buff"."_nfct",
        skb_head = "sk_buff"."head",
        skb_network_header = "sk_buff"."network_header",
        skb_dev = "sk_buff"."dev",
        skb_sk = "sk_buff"."sk",
        skb_iif = "sk_buff"."skb_iif",
        dev_ifindex = "net_device"."ifindex",
        dev_name = "net_device"."name",
        dev_nd_net = "net_device"."nd_net",
        sk_net = "sock"."__sk_common.skc_net",
        cgroup_kn = "cgroup"."kn",
        kn_id = "kernfs_node"."id",
        net_inum = "net"."ns.inum",
        ct_status = "nf_conn"."status",
        ct_net = "nf_conn"."ct_net",
        tuple_src_addr = "nf_conntrack_tuple"."src.u3",
        tuple_src_port = "nf_conntrack_tuple"."src.u",
        tuple_dst_addr = "nf_conntrack_tuple"."dst.u3",
        tuple_dst_port = "nf_conntrack_tuple"."dst.u",
        tuple_l3num = "nf_conntrack_tuple"."src.l3num",
        tuple_protonum = "nf_conntrack_tuple"."dst.protonum",
        net_proc_net_stat = "net"."proc_net_stat",
        pde_low_ino = "proc_dir_entry"."low_ino",
        task_nsproxy = "task_struct"."nsproxy",
        nsproxy_net_ns = "nsproxy"."net_ns",
    );
    match (
        btf.member_offset("nf_conn", "tuplehash"),
        btf.member_offset("nf_conntrack_tuple_hash", "tuple"),
        btf.struct_size("nf_conntrack_tuple_hash"),
    ) {
        (Ok(hash), Ok(tuple), Ok(size)) => {
            o.ct_orig_tuple = hash + tuple;
            o.ct_reply_tuple = hash + size + tuple;
        }
        _ => missing.push("nf_conn.tuplehash"),
    }
    match (
        btf.member_offset("sock", "sk_cgrp_data.cgroup"),
        btf.member_offset("sock", "sk_cgrp_data.val"),
    ) {
        (Ok(off), _) => o.sk_cgroup = off,
        (_, Ok(off)) => o.sk_cgroup_val = off,
        _ => missing.push("sock.sk_cgrp_data"),
    }
    // Drop reasons arrived in 5.17; before, a netfilter drop is a free from nf_hook_slow.
    match btf.enum_value("SKB_DROP_REASON_NETFILTER_DROP") {
        Ok(v) => o.reason_netfilter_drop = u32::try_from(v).unwrap_or(MISSING),
        Err(_) => fallbacks.push(
            "no drop reasons (before 5.17): a netfilter drop is a packet freed in nf_hook_slow",
        ),
    }
    Resolved {
        offsets: o,
        missing,
        fallbacks,
    }
}

/// Kernel addresses the programs read from /proc/kallsyms (0 where hidden or absent).
pub struct KernelSymbols {
    /// `[start, end)` of `nf_hook_slow`: the conntrack-drop program's test on kernels without
    /// drop reasons.
    pub nf_drop_site: [u64; 2],
    /// The global `pid_max` variable (kernels before 6.14), read at each failure.
    pub pid_max: u64,
    /// /proc/kallsyms lists symbols but shows every address as 0: they are shown only to
    /// CAP_SYSLOG (at kptr_restrict 0 also at perf_event_paranoid <= 1).
    pub hidden: bool,
}

impl KernelSymbols {
    pub fn read() -> KernelSymbols {
        let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
        let symbols = parse_kallsyms(&kallsyms);
        KernelSymbols {
            nf_drop_site: function_range(&symbols, "nf_hook_slow").unwrap_or([0; 2]),
            pid_max: symbol(&symbols, "pid_max", &["d", "D"]).unwrap_or(0),
            hidden: symbols.is_empty() && !kallsyms.is_empty(),
        }
    }
}

/// (address, type, name) of each kernel (not module) symbol with a readable address.
fn parse_kallsyms(kallsyms: &str) -> Vec<(u64, &str, &str)> {
    kallsyms
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (addr, kind, name) = (f.next()?, f.next()?, f.next()?);
            let addr = u64::from_str_radix(addr, 16).ok().filter(|a| *a != 0)?;
            f.next().is_none().then_some((addr, kind, name))
        })
        .collect()
}

fn symbol(symbols: &[(u64, &str, &str)], name: &str, kinds: &[&str]) -> Option<u64> {
    symbols
        .iter()
        .find(|(_, k, n)| *n == name && kinds.contains(k))
        .map(|(a, _, _)| *a)
}

/// The text range of `name`: from its address to the next higher text symbol's.
fn function_range(symbols: &[(u64, &str, &str)], name: &str) -> Option<[u64; 2]> {
    let text = ["t", "T"];
    let start = symbol(symbols, name, &text)?;
    let end = symbols
        .iter()
        .filter(|(a, k, _)| *a > start && text.contains(k))
        .map(|(a, _, _)| *a)
        .min()?;
    Some([start, end])
}

/// Offsets of the syscall exit tracepoints' `ret` field. Missing when tracefs is not there
/// (or lacks them): the clone programs then attach to the raw `sys_exit` tracepoint instead.
pub fn tracepoints(tracefs: Option<&Tracefs>) -> Resolved<TracepointOffsets> {
    let mut o = TracepointOffsets::NONE;
    let mut missing = Vec::new();
    match tracefs.map(|t| t.field_offset("syscalls", "sys_exit_clone", "ret")) {
        Some(Ok(off)) => o.exit_ret = off,
        _ => missing.push("sys_exit_clone"),
    }
    Resolved {
        offsets: o,
        missing,
        fallbacks: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kallsyms_function_ranges_and_data() {
        let k = "ffffffff81000000 T _stext\n\
                 ffffffff81a00000 T nf_hook_slow\n\
                 ffffffff81a00100 t nf_hook_slow_list\n\
                 ffffffff82000000 D pid_max\n\
                 ffffffffc0000000 t nf_conntrack_in\t[nf_conntrack]\n\
                 0000000000000000 T hidden\n";
        let symbols = parse_kallsyms(k);
        assert_eq!(
            function_range(&symbols, "nf_hook_slow"),
            Some([0xffffffff81a00000, 0xffffffff81a00100])
        );
        assert_eq!(
            symbol(&symbols, "pid_max", &["d", "D"]),
            Some(0xffffffff82000000)
        );
        assert_eq!(symbol(&symbols, "pid_max", &["t", "T"]), None);
        // Module symbols and hidden (zero) addresses are not used.
        assert_eq!(symbol(&symbols, "nf_conntrack_in", &["t"]), None);
        assert_eq!(symbol(&symbols, "hidden", &["T"]), None);
    }
}
