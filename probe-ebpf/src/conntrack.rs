//! Conntrack drops: the raw tracepoint `kfree_skb` (attached through a bpf link: no
//! `perf_event_open`), filtered to the netfilter drop reason. For each dropped
//! packet one `ConntrackDropEvent` with the packet's tuple, its conntrack entry (state, status,
//! original and reply tuples), the network namespace, and the socket that
//! sent the flow when the DNS egress program recorded it in `FLOWS`. Counted per entry state.

use aya_ebpf::{
    Global,
    helpers::generated::{bpf_get_current_task, bpf_ktime_get_ns},
    macros::{map, raw_tracepoint},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::RawTracePointContext,
};
use probe_common::{
    conntrack::{
        CT_CONFIRMED, CT_NONE, CT_STAT_COUNT, CT_UNCONFIRMED, ConntrackDropEvent, ConntrackStat,
        FlowKey, FlowOwner, MAX_FLOWS,
    },
    offsets::{MISSING, NetOffsets},
};

use crate::kernel::{deref, global_field, read, read_into};

#[unsafe(no_mangle)]
pub static NET_OFFSETS: Global<NetOffsets> = Global::new(NetOffsets::NONE);

/// `[start, end)` of `nf_hook_slow` in kernel text: where netfilter frees the packets it drops.
/// Kernels before 5.17 have no drop reason in `kfree_skb`; there a drop is a free whose
/// `location` lies in this range. Read from /proc/kallsyms, which shows addresses only to
/// CAP_SYSLOG: without them the loader does not attach this program on such kernels.
#[unsafe(no_mangle)]
pub static NF_DROP_SITE: Global<[u64; 2]> = Global::new([0; 2]);

/// Drops are rare: 256 KiB holds ~1,200 events between two reads.
#[map]
static CT_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Counters indexed by [`ConntrackStat`].
#[map]
static CT_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(CT_STAT_COUNT, 0);

/// Which socket sent each recent DNS flow (written on egress by the DNS program).
#[map]
static FLOWS: LruHashMap<FlowKey, FlowOwner> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

const IPS_CONFIRMED: u32 = 1 << 3;
const NFCT_PTRMASK: usize = !7;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

macro_rules! net_off {
    ($field:ident) => {
        global_field!(NET_OFFSETS, NetOffsets, $field)
    };
}

/// Remembers who sent a flow, for attributing its drops. A flow already known with this
/// owner costs a lookup, not an update (an LRU update allocates and copies an element: about
/// 200 ns a query on the benchmark's machine).
#[inline(always)]
pub fn note_flow(key: &FlowKey, owner: &FlowOwner) {
    // SAFETY: the map returns a pointer into a live entry, read at once.
    if unsafe { FLOWS.get(key) } != Some(owner) {
        let _ = FLOWS.insert(key, owner, 0);
    }
}

#[inline(always)]
fn bump(stat: ConntrackStat) {
    crate::kernel::bump(&CT_STATS, stat as u32);
}

/// `kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason, ...)`; the
/// reason argument arrived in 5.17.
#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn conntrack_drop(ctx: RawTracePointContext) -> u32 {
    if !is_netfilter_drop(&ctx) {
        return 0;
    }
    bump(ConntrackStat::Drops);
    let skb: *const u8 = ctx.arg(0);
    if !skb.is_null() {
        on_drop(skb);
    }
    0
}

/// The drop reason `SKB_DROP_REASON_NETFILTER_DROP` (5.17+), or before drop reasons existed,
/// a free called from `nf_hook_slow`. The branch is on a load-time constant: an older kernel's
/// verifier never sees the third argument read, which its tracepoint does not have.
#[inline(always)]
fn is_netfilter_drop(ctx: &RawTracePointContext) -> bool {
    let netfilter_drop = net_off!(reason_netfilter_drop);
    if netfilter_drop != MISSING {
        let reason: u64 = ctx.arg(2);
        return reason == u64::from(netfilter_drop);
    }
    let location: u64 = ctx.arg(1);
    let site = NF_DROP_SITE.load();
    site[0] != 0 && location >= site[0] && location < site[1]
}

#[inline(always)]
fn on_drop(skb: *const u8) {
    let Some(mut entry) = CT_EVENTS.reserve::<ConntrackDropEvent>(0) else {
        bump(ConntrackStat::RingbufFull);
        return;
    };
    // SAFETY: a reserved slot of the right size; every field is written before submit.
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    // SAFETY: no arguments.
    ev.ktime_ns = unsafe { bpf_ktime_get_ns() };
    ev.packet = FlowKey::default();
    ev.orig = FlowKey::default();
    ev.reply = FlowKey::default();
    ev.dns_id = 0;
    if let Some(udp) = packet_tuple(&mut ev.packet, skb)
        && ev.packet.proto == PROTO_UDP
    {
        // The first two bytes after the UDP header.
        ev.dns_id = read::<u16>(udp, 8).map_or(0, u16::from_be);
    }
    ev.ct_status = 0;
    ev.ct_state = CT_NONE;
    ev.ifname = [0; 16];
    ev._pad = 0;

    let nfct = read::<usize>(skb, net_off!(skb_nfct)).unwrap_or(0) & NFCT_PTRMASK;
    let ct = nfct as *const u8;
    let mut net = core::ptr::null::<u8>();
    if !ct.is_null() {
        ev.ct_status = read::<u64>(ct, net_off!(ct_status)).unwrap_or(0) as u32;
        ev.ct_state = if ev.ct_status & IPS_CONFIRMED != 0 {
            CT_CONFIRMED
        } else {
            CT_UNCONFIRMED
        };
        ct_tuple(&mut ev.orig, ct, net_off!(ct_orig_tuple));
        ct_tuple(&mut ev.reply, ct, net_off!(ct_reply_tuple));
        net = deref(ct, net_off!(ct_net)).unwrap_or(core::ptr::null());
    }
    bump(match ev.ct_state {
        CT_NONE => ConntrackStat::NoEntry,
        CT_UNCONFIRMED => ConntrackStat::Unconfirmed,
        _ => ConntrackStat::Confirmed,
    });

    let dev = deref(skb, net_off!(skb_dev));
    ev.ifindex = dev
        .and_then(|d| read::<u32>(d, net_off!(dev_ifindex)))
        .unwrap_or(0);
    if let Some(d) = dev {
        read_into(&mut ev.ifname, d, net_off!(dev_name));
    }
    ev.iif = read::<u32>(skb, net_off!(skb_iif)).unwrap_or(0);
    let sk = deref(skb, net_off!(skb_sk));
    ev.local = sk.is_some() as u8;
    if net.is_null() {
        net = dev
            .and_then(|d| deref(d, net_off!(dev_nd_net)))
            .or_else(|| sk.and_then(|s| deref(s, net_off!(sk_net))))
            .unwrap_or(core::ptr::null());
    }
    ev.netns = read::<u32>(net, net_off!(net_inum)).unwrap_or(0);
    ev.proc_ino = deref(net, net_off!(net_proc_net_stat))
        .and_then(|pde| read::<u32>(pde, net_off!(pde_low_ino)))
        .unwrap_or(0);
    ev.witness_tgid = witness(net);

    // The original tuple is what the sender sent (before any NAT); without an entry, the
    // packet's own headers.
    let key = if ev.ct_state == CT_NONE {
        &ev.packet
    } else {
        &ev.orig
    };
    // Older verifiers (before 6.2) take map keys from the stack only, not from ring-buffer
    // memory: copy it.
    // SAFETY: `key` points at a field of the reserved slot; a volatile read keeps the copy.
    let key: FlowKey = unsafe { core::ptr::read_volatile(key) };
    // SAFETY: the map returns a pointer into a live entry; copied at once.
    ev.owner = unsafe { FLOWS.get(&key) }.copied().unwrap_or_default();
    // A packet dropped before it left its own namespace (an OUTPUT rule) never reached the
    // egress program: its socket says whose it is.
    if ev.owner.cgroup_id == 0
        && let Some(id) = sk
            .and_then(socket_cgroup)
            .and_then(|c| deref(c, net_off!(cgroup_kn)))
            .and_then(|kn| read::<u64>(kn, net_off!(kn_id)))
    {
        ev.owner.cgroup_id = id;
    }
    entry.submit(0);
}

/// The current task's tgid when it lives in `net` (a packet sent from a local socket is
/// dropped in its sender's context), else 0: a process through which userspace reads that
/// namespace's counters in procfs, which needs no privilege a pod's namespace would refuse.
#[inline(always)]
fn witness(net: *const u8) -> u32 {
    if net.is_null() {
        return 0;
    }
    // SAFETY: no arguments; the current task, read only through probe reads.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let current_net = deref(task, net_off!(task_nsproxy))
        .and_then(|nsproxy| deref(nsproxy, net_off!(nsproxy_net_ns)));
    if current_net != Some(net) {
        return 0;
    }
    (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32
}

/// The cgroup v2 `struct cgroup` of a socket: `sk_cgrp_data.cgroup` (5.15+), or before, the
/// `sk_cgrp_data.val` word, which holds that pointer when its low bit is clear.
#[inline(always)]
fn socket_cgroup(sk: *const u8) -> Option<*const u8> {
    if net_off!(sk_cgroup) != MISSING {
        return deref(sk, net_off!(sk_cgroup));
    }
    let val = read::<u64>(sk, net_off!(sk_cgroup_val))?;
    (val != 0 && val & 1 == 0).then_some(val as *const u8)
}

/// Fills `k` with the 5-tuple of the `struct nf_conntrack_tuple` at `ct + off`.
#[inline(always)]
fn ct_tuple(k: &mut FlowKey, ct: *const u8, off: u32) {
    if off == MISSING {
        return;
    }
    let t = ct.wrapping_add(off as usize);
    k.family = match read::<u16>(t, net_off!(tuple_l3num)) {
        Some(AF_INET) => 4,
        Some(AF_INET6) => 6,
        _ => return,
    };
    read_into(&mut k.saddr, t, net_off!(tuple_src_addr));
    read_into(&mut k.daddr, t, net_off!(tuple_dst_addr));
    if k.family == 4 {
        // The rest of `union nf_inet_addr` is not part of an IPv4 address.
        k.saddr[4..].fill(0);
        k.daddr[4..].fill(0);
    }
    k.sport = read::<u16>(t, net_off!(tuple_src_port)).unwrap_or(0);
    k.dport = read::<u16>(t, net_off!(tuple_dst_port)).unwrap_or(0);
    k.proto = read::<u8>(t, net_off!(tuple_protonum)).unwrap_or(0);
}

/// Fills `k` with the 5-tuple in the packet's headers (ports only for TCP and UDP; IPv6
/// extension headers are not followed), and returns where the TCP or UDP header is.
#[inline(always)]
fn packet_tuple(k: &mut FlowKey, skb: *const u8) -> Option<*const u8> {
    let (Some(head), Some(nh)) = (
        deref(skb, net_off!(skb_head)),
        read::<u16>(skb, net_off!(skb_network_header)),
    ) else {
        return None;
    };
    let ip = head.wrapping_add(nh as usize);
    let first = read::<u8>(ip, 0)?;
    let l4 = match first >> 4 {
        4 => {
            k.family = 4;
            k.proto = read::<u8>(ip, 9).unwrap_or(0);
            let mut a = [0u8; 4];
            read_into(&mut a, ip, 12);
            k.saddr[..4].copy_from_slice(&a);
            read_into(&mut a, ip, 16);
            k.daddr[..4].copy_from_slice(&a);
            ((first & 0x0f) as usize) * 4
        }
        6 => {
            k.family = 6;
            k.proto = read::<u8>(ip, 6).unwrap_or(0);
            read_into(&mut k.saddr, ip, 8);
            read_into(&mut k.daddr, ip, 24);
            40
        }
        _ => return None,
    };
    if k.proto != PROTO_TCP && k.proto != PROTO_UDP {
        return None;
    }
    let l4 = ip.wrapping_add(l4);
    k.sport = read::<u16>(l4, 0).unwrap_or(0);
    k.dport = read::<u16>(l4, 2).unwrap_or(0);
    Some(l4)
}
