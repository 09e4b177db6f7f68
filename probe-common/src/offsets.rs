//! Kernel struct member offsets and enum values, read by userspace from the running kernel's
//! BTF and handed to the eBPF programs as a global (Rust eBPF gets no CO-RE relocations).

/// Marks an offset or value the running kernel does not have.
pub const MISSING: u32 = u32::MAX;

/// Byte offsets of the kernel struct members the clone programs read, plus the enum values
/// they index with. A field the kernel lacks is [`MISSING`]; the program then skips that
/// snapshot and the event says so in its `valid` bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_tgid: u32,
    pub task_real_parent: u32,
    pub task_cgroups: u32,
    pub task_nsproxy: u32,
    pub task_signal: u32,
    pub task_real_cred: u32,
    pub css_set_subsys: u32,
    pub css_cgroup: u32,
    pub css_parent: u32,
    pub cgroup_kn: u32,
    pub kernfs_node_id: u32,
    /// Offset of `css` inside `struct pids_cgroup` (0 on every kernel so far).
    pub pids_css: u32,
    pub pids_counter: u32,
    pub pids_limit: u32,
    pub memcg_css: u32,
    /// `struct mem_cgroup`'s `memory` page counter.
    pub memcg_memory: u32,
    pub page_counter_usage: u32,
    pub page_counter_max: u32,
    pub page_counter_failcnt: u32,
    pub nsproxy_pid_ns_for_children: u32,
    pub pidns_pid_allocated: u32,
    /// Missing before Linux 6.14 (pid_max was global then).
    pub pidns_pid_max: u32,
    pub pidns_level: u32,
    pub pidns_parent: u32,
    pub pidns_inum: u32,
    /// `pid_namespace.idr.idr_next`: the pid allocator's cursor.
    pub pidns_idr_next: u32,
    pub signal_rlim: u32,
    /// `cred.ucounts` and `ucounts.rlimit`: the process count RLIMIT_NPROC applies to (Linux
    /// >= 5.14).
    pub cred_ucounts: u32,
    pub ucounts_rlimit: u32,
    /// `cred.user` and `user_struct.processes`: where that count lived before 5.14.
    pub cred_user: u32,
    pub user_processes: u32,
    /// `task_struct.stack`, the size of `struct pt_regs` and the kernel's THREAD_SIZE: where
    /// the saved user registers are (`task_pt_regs()`) on kernels without the
    /// `bpf_task_pt_regs` helper (before 5.15).
    pub task_stack: u32,
    pub pt_regs_size: u32,
    pub thread_size: u32,
    /// 1 when the kernel has `bpf_get_current_task_btf` and `bpf_task_pt_regs` (5.15+): the
    /// programs branch on it, and the verifier drops the branch a kernel cannot run.
    pub has_task_pt_regs: u32,
    /// `enum cgroup_subsys_id` values: index into `css_set.subsys`.
    pub pids_subsys_id: u32,
    pub memory_subsys_id: u32,
    /// `enum rlimit_type` value of `UCOUNT_RLIMIT_NPROC`: index into `ucounts.rlimit`.
    pub ucount_rlimit_nproc: u32,
    /// A syscall's first argument in the saved user registers at syscall exit:
    /// `pt_regs.di` on x86_64, `pt_regs.orig_x0` on arm64 (x0 holds the return value by then).
    pub pt_regs_arg0: u32,
    /// The syscall number in the saved user registers (`pt_regs.orig_ax` on x86_64,
    /// `pt_regs.syscallno` on arm64): what `raw_syscalls:sys_exit` filters on.
    pub pt_regs_syscall_nr: u32,
    /// This architecture's numbers of clone, clone3, fork and vfork ([`MISSING`] where it has
    /// no such syscall: arm64 has no fork or vfork).
    pub nr_clone: u32,
    pub nr_clone3: u32,
    pub nr_fork: u32,
    pub nr_vfork: u32,
    /// `cgroup.root` and `cgroup_root.hierarchy_id`: which hierarchy a removed cgroup was in
    /// (the raw `cgroup_rmdir` tracepoint hands over the cgroup itself).
    pub cgroup_root: u32,
    pub cgroup_root_hierarchy_id: u32,
}

impl KernelOffsets {
    /// Every offset missing: programs loaded with this read nothing from kernel structs.
    pub const NONE: KernelOffsets = KernelOffsets {
        task_tgid: MISSING,
        task_real_parent: MISSING,
        task_cgroups: MISSING,
        task_nsproxy: MISSING,
        task_signal: MISSING,
        task_real_cred: MISSING,
        css_set_subsys: MISSING,
        css_cgroup: MISSING,
        css_parent: MISSING,
        cgroup_kn: MISSING,
        kernfs_node_id: MISSING,
        pids_css: MISSING,
        pids_counter: MISSING,
        pids_limit: MISSING,
        memcg_css: MISSING,
        memcg_memory: MISSING,
        page_counter_usage: MISSING,
        page_counter_max: MISSING,
        page_counter_failcnt: MISSING,
        nsproxy_pid_ns_for_children: MISSING,
        pidns_pid_allocated: MISSING,
        pidns_pid_max: MISSING,
        pidns_level: MISSING,
        pidns_parent: MISSING,
        pidns_inum: MISSING,
        pidns_idr_next: MISSING,
        signal_rlim: MISSING,
        cred_ucounts: MISSING,
        ucounts_rlimit: MISSING,
        cred_user: MISSING,
        user_processes: MISSING,
        task_stack: MISSING,
        pt_regs_size: MISSING,
        thread_size: MISSING,
        has_task_pt_regs: 0,
        pids_subsys_id: MISSING,
        memory_subsys_id: MISSING,
        ucount_rlimit_nproc: MISSING,
        pt_regs_arg0: MISSING,
        pt_regs_syscall_nr: MISSING,
        nr_clone: MISSING,
        nr_clone3: MISSING,
        nr_fork: MISSING,
        nr_vfork: MISSING,
        cgroup_root: MISSING,
        cgroup_root_hierarchy_id: MISSING,
    };
}

/// Byte offsets of the networking structs the conntrack-drop program reads.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetOffsets {
    pub skb_nfct: u32,
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_dev: u32,
    pub skb_sk: u32,
    pub skb_iif: u32,
    pub dev_ifindex: u32,
    pub dev_name: u32,
    /// `net_device.nd_net` (a `possible_net_t`: one pointer).
    pub dev_nd_net: u32,
    pub sk_net: u32,
    /// `sock.sk_cgrp_data.cgroup`, then `cgroup.kn` and `kernfs_node.id`: the v2 cgroup id of
    /// a local socket.
    pub sk_cgroup: u32,
    /// `sock.sk_cgrp_data.val` before 5.15: the cgroup pointer when its low bit is clear.
    pub sk_cgroup_val: u32,
    pub cgroup_kn: u32,
    pub kn_id: u32,
    pub net_inum: u32,
    pub ct_status: u32,
    pub ct_net: u32,
    /// `nf_conn.tuplehash[0].tuple` and `tuplehash[1].tuple`.
    pub ct_orig_tuple: u32,
    pub ct_reply_tuple: u32,
    /// Inside `struct nf_conntrack_tuple`.
    pub tuple_src_addr: u32,
    pub tuple_src_port: u32,
    pub tuple_dst_addr: u32,
    pub tuple_dst_port: u32,
    pub tuple_l3num: u32,
    pub tuple_protonum: u32,
    /// `SKB_DROP_REASON_NETFILTER_DROP` on this kernel.
    pub reason_netfilter_drop: u32,
    /// `net.proc_net_stat`, then `proc_dir_entry.low_ino`: the inode of the namespace's
    /// `/proc/<pid>/net/stat`, by which a process in it is found without CAP_SYS_PTRACE.
    pub net_proc_net_stat: u32,
    pub pde_low_ino: u32,
    /// `task_struct.nsproxy`, then `nsproxy.net_ns`: whether the task that drops a packet
    /// lives in the namespace that drops it.
    pub task_nsproxy: u32,
    pub nsproxy_net_ns: u32,
}

impl NetOffsets {
    pub const NONE: NetOffsets = NetOffsets {
        skb_nfct: MISSING,
        skb_head: MISSING,
        skb_network_header: MISSING,
        skb_dev: MISSING,
        skb_sk: MISSING,
        skb_iif: MISSING,
        dev_ifindex: MISSING,
        dev_name: MISSING,
        dev_nd_net: MISSING,
        sk_net: MISSING,
        sk_cgroup: MISSING,
        sk_cgroup_val: MISSING,
        cgroup_kn: MISSING,
        kn_id: MISSING,
        net_inum: MISSING,
        ct_status: MISSING,
        ct_net: MISSING,
        ct_orig_tuple: MISSING,
        ct_reply_tuple: MISSING,
        tuple_src_addr: MISSING,
        tuple_src_port: MISSING,
        tuple_dst_addr: MISSING,
        tuple_dst_port: MISSING,
        tuple_l3num: MISSING,
        tuple_protonum: MISSING,
        reason_netfilter_drop: MISSING,
        net_proc_net_stat: MISSING,
        pde_low_ino: MISSING,
        task_nsproxy: MISSING,
        nsproxy_net_ns: MISSING,
    };
}

/// Offsets of the tracepoint fields the programs read, from tracefs `format` files (stable in
/// practice, but read rather than assumed). Only the syscall exit tracepoints are perf
/// tracepoints; every other program is a raw tracepoint, handed the kernel's own arguments.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TracepointOffsets {
    /// `sys_exit_*`: `ret`.
    pub exit_ret: u32,
}

impl TracepointOffsets {
    pub const NONE: TracepointOffsets = TracepointOffsets { exit_ret: MISSING };
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)] structs of u32 only: no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::KernelOffsets {}
    // SAFETY: as above, #[repr(C)] with one u32.
    unsafe impl aya::Pod for super::TracepointOffsets {}
    // SAFETY: as above, #[repr(C)] struct of u32 only.
    unsafe impl aya::Pod for super::NetOffsets {}
}

crate::kernel_abi_sizes! {
    KernelOffsets => 184,
    NetOffsets => 120,
    TracepointOffsets => 4,
}
