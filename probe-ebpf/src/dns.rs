//! DNS: cgroup_skb egress and ingress programs on the cgroup v2 root, so they see every pod's
//! sockets whatever its network namespace. UDP port 53 packets become `DnsPacketEvent`s with
//! the socket and the head of the DNS message; TCP port 53 is counted. They never drop a
//! packet (always return 1).

use aya_ebpf::{
    EbpfContext as _,
    helpers::generated::{
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_skb_cgroup_id, bpf_skb_load_bytes,
    },
    macros::{cgroup_skb, map},
    maps::{PerCpuArray, PerCpuHashMap, RingBuf},
    programs::SkBuffContext,
};
use probe_common::conntrack::{FlowKey, FlowOwner};
use probe_common::dns::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, DNS_CAPTURE, DNS_STAT_COUNT, DnsPacketEvent, DnsStat,
    DnsTcpCounts, MAX_DNS_TCP_CGROUPS,
};

/// Per-request events: 1 MiB holds ~1,600 packets between two reads.
#[map]
static DNS_EVENTS: RingBuf = RingBuf::with_byte_size(1024 * 1024, 0);

#[map]
static DNS_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DNS_STAT_COUNT, 0);

/// DNS over TCP segments per cgroup v2 id.
#[map]
static DNS_TCP: PerCpuHashMap<u64, DnsTcpCounts> =
    PerCpuHashMap::with_max_entries(MAX_DNS_TCP_CGROUPS, 0);

const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const DNS_PORT: u16 = 53;

#[cgroup_skb]
pub fn dns_egress(ctx: SkBuffContext) -> i32 {
    let _ = on_packet(&ctx, DIRECTION_EGRESS);
    1
}

#[cgroup_skb]
pub fn dns_ingress(ctx: SkBuffContext) -> i32 {
    let _ = on_packet(&ctx, DIRECTION_INGRESS);
    1
}

#[inline(always)]
fn bump(stat: DnsStat) {
    if let Some(v) = DNS_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot.
        unsafe { *v += 1 };
    }
}

/// Drops a removed cgroup's DNS-over-TCP counts (called from the cgroup_rmdir program).
#[inline(always)]
pub fn forget_cgroup(id: u64) {
    let _ = DNS_TCP.remove(&id);
}

#[inline(always)]
fn count_tcp(ctx: &SkBuffContext, to_server: bool) {
    // SAFETY: the context pointer is the skb of this program.
    let id = unsafe { bpf_skb_cgroup_id(ctx.as_ptr() as *mut _) };
    if DNS_TCP.get_ptr_mut(&id).is_none()
        && let Err(e) = DNS_TCP.insert(&id, &DnsTcpCounts::default(), BPF_NOEXIST)
        && e != -(EEXIST as i64) as i32
    {
        bump(DnsStat::TcpMapFull);
        return;
    }
    if let Some(c) = DNS_TCP.get_ptr_mut(&id) {
        // SAFETY: per-CPU value.
        unsafe {
            if to_server {
                (*c).to_server += 1;
            } else {
                (*c).from_server += 1;
            }
        }
    }
}

/// Records which socket sent a DNS flow, so that conntrack drops of it can be attributed.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn note_flow(
    ctx: &SkBuffContext,
    family: u8,
    proto: u8,
    addr_off: usize,
    addr_len: usize,
    sport: u16,
    dport: u16,
    payload: usize,
) {
    let mut key = FlowKey {
        sport: sport.to_be(),
        dport: dport.to_be(),
        family,
        proto,
        ..FlowKey::default()
    };
    let loaded = if addr_len == 4 {
        match (
            ctx.load::<[u8; 4]>(addr_off),
            ctx.load::<[u8; 4]>(addr_off + 4),
        ) {
            (Ok(s), Ok(d)) => {
                key.saddr[..4].copy_from_slice(&s);
                key.daddr[..4].copy_from_slice(&d);
                true
            }
            _ => false,
        }
    } else {
        match (
            ctx.load::<[u8; 16]>(addr_off),
            ctx.load::<[u8; 16]>(addr_off + 16),
        ) {
            (Ok(s), Ok(d)) => {
                key.saddr = s;
                key.daddr = d;
                true
            }
            _ => false,
        }
    };
    if !loaded {
        return;
    }
    let skb = ctx.as_ptr() as *mut _;
    let owner = FlowOwner {
        // SAFETY: the context pointer is the skb of this program.
        cgroup_id: unsafe { bpf_skb_cgroup_id(skb) },
        // SAFETY: as above.
        socket_cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        dns_id: if proto == PROTO_UDP {
            ctx.load::<u16>(payload).map(u16::from_be).unwrap_or(0)
        } else {
            0
        },
        _pad: [0; 6],
    };
    crate::conntrack::note_flow(&key, &owner);
}

#[inline(always)]
fn on_packet(ctx: &SkBuffContext, direction: u8) -> Result<(), i64> {
    // cgroup_skb sees the packet from the IP header on.
    let first: u8 = ctx.load(0)?;
    let (family, proto, l4, addr_off, addr_len) = match first >> 4 {
        4 => (
            4u8,
            ctx.load::<u8>(9)?,
            ((first & 0x0f) as usize) * 4,
            12usize,
            4usize,
        ),
        // Extension headers are rare on DNS packets and not followed.
        6 => (6u8, ctx.load::<u8>(6)?, 40usize, 8usize, 16usize),
        _ => return Ok(()),
    };
    if l4 < 20 || l4 > 60 {
        return Ok(());
    }
    let sport = u16::from_be(ctx.load::<u16>(l4)?);
    let dport = u16::from_be(ctx.load::<u16>(l4 + 2)?);
    let to_server = direction == DIRECTION_EGRESS && dport == DNS_PORT;
    let from_server = direction == DIRECTION_INGRESS && sport == DNS_PORT;
    if !to_server && !from_server {
        return Ok(());
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(());
    }
    let payload = l4 + if proto == PROTO_TCP { 0 } else { 8 };
    if to_server {
        note_flow(
            ctx, family, proto, addr_off, addr_len, sport, dport, payload,
        );
    }
    if proto == PROTO_TCP {
        count_tcp(ctx, to_server);
        return Ok(());
    }
    let Some(mut entry) = DNS_EVENTS.reserve::<DnsPacketEvent>(0) else {
        bump(DnsStat::RingbufFull);
        return Ok(());
    };
    // SAFETY: a reserved slot of the right size; every field is written before submit.
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    let skb = ctx.as_ptr() as *mut _;
    ev.ktime_ns = unsafe { bpf_ktime_get_ns() };
    ev.cgroup_id = unsafe { bpf_skb_cgroup_id(skb) };
    ev.socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    ev.family = family;
    ev.direction = direction;
    ev.sport = sport;
    ev.dport = dport;
    ev._pad = 0;
    ev.saddr = [0; 16];
    ev.daddr = [0; 16];
    let total = ctx.len() as usize;
    ev.dns_len = total.saturating_sub(payload) as u32;
    // Fixed-size reads: the verifier refuses a copy whose length might be zero.
    let copied = if addr_len == 4 {
        match (
            ctx.load::<[u8; 4]>(addr_off),
            ctx.load::<[u8; 4]>(addr_off + 4),
        ) {
            (Ok(s), Ok(d)) => {
                ev.saddr[..4].copy_from_slice(&s);
                ev.daddr[..4].copy_from_slice(&d);
                true
            }
            _ => false,
        }
    } else {
        match (
            ctx.load::<[u8; 16]>(addr_off),
            ctx.load::<[u8; 16]>(addr_off + 16),
        ) {
            (Ok(s), Ok(d)) => {
                ev.saddr = s;
                ev.daddr = d;
                true
            }
            _ => false,
        }
    };
    // A copy of 1..=DNS_CAPTURE bytes, with bounds the verifier can follow (the helper
    // refuses a length that might be zero).
    let len = total.saturating_sub(payload).min(DNS_CAPTURE);
    ev.captured = 0;
    if copied && len > 0 {
        // 1..=512 by construction, which the verifier can follow: equals `len` for every len
        // in 1..=DNS_CAPTURE. The volatile read keeps LLVM from folding the mask away again.
        // SAFETY: reading a local.
        let raw = unsafe { core::ptr::read_volatile(&len) } as u32;
        let n = (raw.wrapping_sub(1) & (DNS_CAPTURE as u32 - 1)) + 1;
        // SAFETY: `payload` has DNS_CAPTURE bytes and n <= DNS_CAPTURE.
        let ret = unsafe {
            bpf_skb_load_bytes(
                ctx.as_ptr() as *const _,
                payload as u32,
                ev.payload.as_mut_ptr() as *mut _,
                n,
            )
        };
        if ret == 0 {
            ev.captured = n;
        }
    }
    entry.submit(0);
    Ok(())
}
