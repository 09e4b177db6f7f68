//! Fills the eBPF programs' offset globals: kernel struct members from BTF, syscall tracepoint
//! fields from tracefs. What the running kernel lacks stays `MISSING` and is listed, so that
//! `faultline check` can say which evidence will be absent.

use probe_common::offsets::{KernelOffsets, NetOffsets, TracepointOffsets};

use crate::{btf::Btf, tracefs::Tracefs};

/// Offsets for this kernel plus the names of the members it does not have.
pub struct Resolved<T> {
    pub offsets: T,
    pub missing: Vec<&'static str>,
}

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

pub fn kernel(btf: &Btf) -> Resolved<KernelOffsets> {
    let mut o = KernelOffsets::NONE;
    let mut missing = Vec::new();
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
        pidns_pid_max = "pid_namespace"."pid_max",
        pidns_level = "pid_namespace"."level",
        pidns_parent = "pid_namespace"."parent",
        pidns_inum = "pid_namespace"."ns.inum",
        signal_rlim = "signal_struct"."rlim",
        cred_ucounts = "cred"."ucounts",
        ucounts_rlimit = "ucounts"."rlimit",
    );
    // arm64 keeps the first argument in orig_x0 (x0 is the return value at exit); x86_64 in di.
    match ["orig_x0", "di"]
        .iter()
        .find_map(|m| btf.member_offset("pt_regs", m).ok())
    {
        Some(off) => o.pt_regs_arg0 = off,
        None => missing.push("pt_regs.di"),
    }
    enumerators!(btf, o, missing;
        pids_subsys_id = "pids_cgrp_id",
        memory_subsys_id = "memory_cgrp_id",
        ucount_rlimit_nproc = "UCOUNT_RLIMIT_NPROC",
    );
    Resolved {
        offsets: o,
        missing,
    }
}

/// Offsets for the conntrack-drop program. The tuple's layout is read member by member; the
/// reply tuple is the second element of `nf_conn.tuplehash`.
pub fn net(btf: &Btf) -> Resolved<NetOffsets> {
    let mut o = NetOffsets::NONE;
    let mut missing = Vec::new();
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
        sk_cgroup = "sock"."sk_cgrp_data.cgroup",
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
    enumerators!(btf, o, missing;
        reason_netfilter_drop = "SKB_DROP_REASON_NETFILTER_DROP",
    );
    Resolved {
        offsets: o,
        missing,
    }
}

/// Offsets of the tracepoint fields the programs read. A tracepoint this kernel lacks leaves
/// its fields `MISSING` and is listed; attaching its program then fails with its name.
pub fn tracepoints(tracefs: &Tracefs) -> Resolved<TracepointOffsets> {
    let mut o = TracepointOffsets::NONE;
    let mut missing = Vec::new();
    for (field, category, event, name) in [
        (&mut o.exit_ret, "syscalls", "sys_exit_clone", "ret"),
        (
            &mut o.newtask_clone_flags,
            "task",
            "task_newtask",
            "clone_flags",
        ),
        (&mut o.rmdir_root, "cgroup", "cgroup_rmdir", "root"),
        (&mut o.rmdir_id, "cgroup", "cgroup_rmdir", "id"),
        (&mut o.kfree_skb_skbaddr, "skb", "kfree_skb", "skbaddr"),
        (&mut o.kfree_skb_reason, "skb", "kfree_skb", "reason"),
    ] {
        match tracefs.field_offset(category, event, name) {
            Ok(off) => *field = off,
            Err(_) => missing.push(event),
        }
    }
    Resolved {
        offsets: o,
        missing,
    }
}
