//! Fills the eBPF programs' offset globals: kernel struct members from BTF, syscall tracepoint
//! fields from tracefs. What the running kernel lacks stays `MISSING` and is listed, so that
//! `faultline check` can say which evidence will be absent.

use probe_common::offsets::{KernelOffsets, TracepointOffsets};

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

/// Offsets of the tracepoint fields the programs read. A tracepoint this kernel lacks leaves
/// its fields `MISSING` and is listed; attaching its program then fails with its name.
pub fn tracepoints(tracefs: &Tracefs) -> Resolved<TracepointOffsets> {
    let mut o = TracepointOffsets::NONE;
    let mut missing = Vec::new();
    for (field, category, event, name) in [
        (
            &mut o.clone_flags,
            "syscalls",
            "sys_enter_clone",
            "clone_flags",
        ),
        (&mut o.clone3_uargs, "syscalls", "sys_enter_clone3", "uargs"),
        (&mut o.exit_ret, "syscalls", "sys_exit_clone", "ret"),
        (
            &mut o.newtask_clone_flags,
            "task",
            "task_newtask",
            "clone_flags",
        ),
        (&mut o.rmdir_root, "cgroup", "cgroup_rmdir", "root"),
        (&mut o.rmdir_id, "cgroup", "cgroup_rmdir", "id"),
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
