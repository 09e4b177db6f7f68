//! DNS: cgroup_skb egress and ingress programs on the cgroup v2 root, so they see every pod's
//! sockets whatever its network namespace. A UDP port 53 query is kept in `DNS_PENDING` (keyed
//! by socket cookie and transaction id); its answer ends it with one `DnsQueryEvent` carrying
//! the latency; a re-send on the same socket ends the earlier send as unanswered. Events wake
//! userspace in batches. Queries
//! that get no answer are expired by userspace from the map. TCP port 53 is counted per cgroup,
//! and each DNS flow's sender is recorded for conntrack drop attribution. They never drop a
//! packet (always return 1).

use aya_ebpf::{
    EbpfContext as _,
    helpers::generated::{
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_sk_fullsock, bpf_skb_cgroup_id,
        bpf_skb_load_bytes,
    },
    macros::{cgroup_skb, map},
    maps::{HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::SkBuffContext,
};
use aya_log_ebpf::debug;
use probe_common::conntrack::{FlowKey, FlowOwner};

use crate::kernel::{BPF_NOEXIST, get_or_insert, wakeup};
use probe_common::dns::{
    DNS_CAPTURE, DNS_QUERY_CAPTURE, DNS_STAT_COUNT, DnsKey, DnsPending, DnsQueryEvent, DnsStat,
    DnsTcpCounts, MAX_DNS_PENDING, MAX_DNS_PENDING_PER_CGROUP, MAX_DNS_QUOTA_CGROUPS,
    MAX_DNS_TCP_CGROUPS, OUTCOME_ANSWERED, OUTCOME_RESENT,
};

/// One event per query: 1 MiB holds ~1,700 queries between two reads.
#[map]
static DNS_EVENTS: RingBuf = RingBuf::with_byte_size(1024 * 1024, 0);

/// Queries waiting for their answer. Not an LRU: a full map is counted, never a silent
/// eviction; userspace removes the unanswered ones after its timeout.
#[map]
static DNS_PENDING: HashMap<DnsKey, DnsPending> = HashMap::with_max_entries(MAX_DNS_PENDING, 0);

/// Queries waiting per cgroup v2 id, for the per-cgroup quota: raised here on a new entry,
/// lowered on its answer, and set to the truth by userspace at each sweep (which also expires
/// the unanswered ones), so a lost update corrects itself within 250 ms.
#[map]
static DNS_PENDING_BY_CGROUP: HashMap<u64, u64> =
    HashMap::with_max_entries(MAX_DNS_QUOTA_CGROUPS, 0);

/// Where a pending entry is built (too big for the 512-byte eBPF stack).
#[map]
static DNS_SCRATCH: PerCpuArray<DnsPending> = PerCpuArray::with_max_entries(1, 0);

#[map]
static DNS_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DNS_STAT_COUNT, 0);

/// DNS over TCP segments per cgroup v2 id; sized to the CPU count by the loader, like
/// `TASK_COUNTS`.
#[map]
static DNS_TCP: PerCpuHashMap<u64, DnsTcpCounts> =
    PerCpuHashMap::with_max_entries(MAX_DNS_TCP_CGROUPS, 0);

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const DNS_PORT: u16 = 53;
const DNS_HEADER: usize = 12;
const EGRESS: bool = true;
const INGRESS: bool = false;

#[cgroup_skb]
pub fn dns_egress(ctx: SkBuffContext) -> i32 {
    let _ = on_packet(&ctx, EGRESS);
    1
}

#[cgroup_skb]
pub fn dns_ingress(ctx: SkBuffContext) -> i32 {
    let _ = on_packet(&ctx, INGRESS);
    1
}

#[inline(always)]
fn bump(stat: DnsStat) {
    crate::kernel::bump(&DNS_STATS, stat as u32);
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
    let Some(c) = get_or_insert(&DNS_TCP, &id) else {
        bump(DnsStat::TcpMapFull);
        return;
    };
    // SAFETY: this CPU's value.
    unsafe {
        if to_server {
            (*c).to_server += 1;
        } else {
            (*c).from_server += 1;
        }
    }
}

/// The packet's 5-tuple (ports in network byte order, as conntrack keeps them); `None` when
/// the addresses cannot be read.
#[inline(always)]
fn flow_key(
    pkt: &Packet<'_>,
    family: u8,
    proto: u8,
    addr_off: usize,
    sport: u16,
    dport: u16,
) -> Option<FlowKey> {
    let mut key = FlowKey {
        sport: sport.to_be(),
        dport: dport.to_be(),
        family,
        proto,
        ..FlowKey::default()
    };
    // Fixed-size reads: the verifier follows them without a length check.
    if family == 4 {
        let s = pkt.load::<[u8; 4]>(addr_off).ok()?;
        let d = pkt.load::<[u8; 4]>(addr_off + 4).ok()?;
        key.saddr[..4].copy_from_slice(&s);
        key.daddr[..4].copy_from_slice(&d);
    } else {
        key.saddr = pkt.load::<[u8; 16]>(addr_off).ok()?;
        key.daddr = pkt.load::<[u8; 16]>(addr_off + 16).ok()?;
    }
    Some(key)
}

/// The packet's linear part, read directly (a few ns a field) instead of through the
/// load-bytes helper (tens of ns a call: most of the cost of a packet that is not DNS).
/// A field past the linear part is read through the helper.
struct Packet<'a> {
    ctx: &'a SkBuffContext,
    start: usize,
    end: usize,
}

impl<'a> Packet<'a> {
    #[inline(always)]
    fn new(ctx: &'a SkBuffContext) -> Self {
        let skb = ctx.as_ptr() as *const aya_ebpf::bindings::__sk_buff;
        // SAFETY: the context of a cgroup_skb program is its __sk_buff; the verifier turns
        // these two loads into the packet's bounds.
        let (start, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
        Packet { ctx, start, end }
    }

    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Result<T, i64> {
        let at = self.start + off;
        // At least 2 bytes: for 1, LLVM turns `at + 1 <= end` into `at < end`, from which
        // the verifier grants no readable byte. (A one-byte field in the packet's very last
        // byte then goes through the helper.)
        let need = if core::mem::size_of::<T>() < 2 {
            2
        } else {
            core::mem::size_of::<T>()
        };
        if at + need <= self.end {
            // SAFETY: within the packet's linear part, checked against its end just above.
            Ok(unsafe { core::ptr::read_unaligned(at as *const T) })
        } else {
            self.ctx.load(off)
        }
    }
}

#[inline(always)]
fn on_packet(ctx: &SkBuffContext, egress: bool) -> Result<(), i64> {
    // cgroup_skb sees the packet from the IP header on.
    let pkt = Packet::new(ctx);
    let first: u8 = pkt.load(0)?;
    let (family, proto, l4, addr_off) = match first >> 4 {
        4 => (
            4u8,
            pkt.load::<u8>(9)?,
            ((first & 0x0f) as usize) * 4,
            12usize,
        ),
        // Extension headers are rare on DNS packets and not followed.
        6 => (6u8, pkt.load::<u8>(6)?, 40usize, 8usize),
        _ => return Ok(()),
    };
    if !(20..=60).contains(&l4) {
        return Ok(());
    }
    let sport = u16::from_be(pkt.load::<u16>(l4)?);
    let dport = u16::from_be(pkt.load::<u16>(l4 + 2)?);
    let to_server = egress && dport == DNS_PORT;
    let from_server = !egress && sport == DNS_PORT;
    if !to_server && !from_server {
        return Ok(());
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(());
    }
    let payload = l4 + if proto == PROTO_TCP { 0 } else { 8 };
    // SAFETY: the context pointer is the skb of this program.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // The DNS transaction id (UDP only: over TCP a length prefix comes first).
    // Every path sets both (an Option here left the verifier an uninitialised register).
    let (id, has_id) = match (proto == PROTO_UDP, pkt.load::<u16>(payload)) {
        (true, Ok(v)) => (u16::from_be(v), true),
        _ => (0, false),
    };
    // A query leaving: who sent this flow, for conntrack drop attribution. Not from a raw
    // socket: its headers are whatever its writer chose (another pod's address and port),
    // and a flow noted for it would pin the drops of that pod's real flow on the writer.
    let sent = if to_server {
        let Some(flow) = flow_key(&pkt, family, proto, addr_off, sport, dport) else {
            return Ok(());
        };
        let owner = FlowOwner {
            // SAFETY: the context pointer is the skb of this program.
            cgroup_id: unsafe { bpf_skb_cgroup_id(ctx.as_ptr() as *mut _) },
            socket_cookie: cookie,
        };
        if !from_raw_socket(ctx) {
            crate::conntrack::note_flow(&flow, &owner);
        }
        Some((flow, owner.cgroup_id))
    } else {
        None
    };
    if proto == PROTO_TCP {
        count_tcp(ctx, to_server);
        return Ok(());
    }
    let msg_len = (ctx.len() as usize).saturating_sub(payload);
    if !has_id || msg_len < DNS_HEADER {
        debug!(
            ctx,
            "dns: a port 53 packet of {} bytes is too short for DNS", msg_len
        );
        bump(DnsStat::Malformed);
        return Ok(());
    }
    let key = DnsKey {
        socket_cookie: cookie,
        id,
        _pad: [0; 6],
    };
    let flags = pkt.load::<u8>(payload + 2)?;
    let response = flags & 0x80 != 0;
    match (sent, response) {
        (Some(_), false) if !is_query(&pkt, payload, msg_len) => {
            debug!(
                ctx,
                "dns: a port 53 packet that is not a one-question query"
            );
            bump(DnsStat::Malformed)
        }
        (Some((flow, cgroup_id)), false) => on_query(ctx, &key, &flow, cgroup_id, payload, msg_len),
        (None, true) => {
            // Where the answer comes from: it must be where the query went.
            let Some(from) = flow_key(&pkt, family, proto, addr_off, sport, dport) else {
                return Ok(());
            };
            on_response(ctx, &key, &from, flags, payload, msg_len)
        }
        _ => {
            debug!(
                ctx,
                "dns: QR bit {} does not fit the packet's direction", response as u8
            );
            bump(DnsStat::Malformed)
        }
    }
    Ok(())
}

/// The packet's full socket, when it has one.
#[inline(always)]
fn full_socket(ctx: &SkBuffContext) -> Option<*mut aya_ebpf::bindings::bpf_sock> {
    let skb = ctx.as_ptr() as *const aya_ebpf::bindings::__sk_buff;
    // SAFETY: the context of a cgroup_skb program is its __sk_buff; `sk` is a field it may
    // read (the verifier tracks it as a socket pointer or null).
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: a non-null socket pointer of this skb.
    let full = unsafe { bpf_sk_fullsock(sk) };
    (!full.is_null()).then_some(full)
}

/// Whether the packet was written by a raw socket (its headers the writer's own).
#[inline(always)]
fn from_raw_socket(ctx: &SkBuffContext) -> bool {
    const SOCK_RAW: u32 = 3;
    // SAFETY: a full socket checked non-null; `type_` is readable in one.
    full_socket(ctx).is_some_and(|s| unsafe { (*s).type_ } == SOCK_RAW)
}

/// Whether the packet's socket is connected to a peer: the kernel delivers it only what comes
/// from that peer (as the socket addressed it, before any NAT), so where an answer came from
/// is already vouched for.
#[inline(always)]
fn connected_socket(ctx: &SkBuffContext) -> bool {
    // SAFETY: a full socket checked non-null; `dst_port` is readable in one.
    full_socket(ctx).is_some_and(|s| unsafe { (*s).dst_port } != 0)
}

/// A standard query with one question, as every resolver sends: opcode 0, QDCOUNT 1, no
/// answer or authority records, and a first label of at most 63 bytes (0: the root). Random
/// bytes to port 53 pass this with a probability of about 2^-50.
#[inline(always)]
fn is_query(pkt: &Packet<'_>, payload: usize, msg_len: usize) -> bool {
    // Header, a one-byte name (the root), type and class.
    if msg_len < DNS_HEADER + 5 {
        return false;
    }
    let Ok(head) = pkt.load::<[u8; 13]>(payload) else {
        return false;
    };
    let opcode = (head[2] >> 3) & 0x0f;
    opcode == 0 && head[4..10] == [0, 1, 0, 0, 0, 0] && head[12] <= 63
}

/// The waiting-query count of `cgroup_id`, when it has room for one more under its quota
/// (`Ok(None)`: a cgroup the full quota map cannot hold is let through, fail open), or the
/// count when it has none.
#[inline(always)]
fn under_quota(cgroup_id: u64) -> Result<Option<*mut u64>, u64> {
    if let Some(n) = DNS_PENDING_BY_CGROUP.get_ptr_mut(&cgroup_id) {
        // SAFETY: a live entry; a racing update at worst lets one more through.
        let count = unsafe { *n };
        return if count < MAX_DNS_PENDING_PER_CGROUP {
            Ok(Some(n))
        } else {
            Err(count)
        };
    }
    // A zero written on the stack: with `&0` the compiled program handed the helper a pointer
    // through which 5.10 and 6.1 read garbage, and each cgroup's count was born as a kernel
    // address (its quota reached at once).
    let mut zero = 0u64;
    // SAFETY: writing a local.
    unsafe { core::ptr::write_volatile(&mut zero, 0) };
    let _ = DNS_PENDING_BY_CGROUP.insert(&cgroup_id, &zero, u64::from(BPF_NOEXIST));
    Ok(DNS_PENDING_BY_CGROUP.get_ptr_mut(&cgroup_id))
}

/// One fewer waiting query for a cgroup, never below zero. Not atomic (the BPF target has no
/// atomic read-modify-write in `core`): two CPUs updating one cgroup at the same instant may
/// lose one update, which the next sweep corrects.
#[inline(always)]
fn answered_one(cgroup_id: u64) {
    if let Some(n) = DNS_PENDING_BY_CGROUP.get_ptr_mut(&cgroup_id) {
        // SAFETY: a live, aligned u64 in a map value.
        unsafe { *n = (*n).saturating_sub(1) };
    }
}

/// A query leaving: kept in `DNS_PENDING` until its answer. A query already waiting under the
/// same socket and id is a re-send: the earlier send ends as unanswered. A new query, the
/// common case, costs one insert and its cgroup's quota count; only a failed insert looks for
/// the earlier send.
#[inline(always)]
fn on_query(
    ctx: &SkBuffContext,
    key: &DnsKey,
    flow: &FlowKey,
    cgroup_id: u64,
    payload: usize,
    msg_len: usize,
) {
    let Some(pending) = DNS_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot; every field is written before use.
    let pending = unsafe { &mut *pending };
    // SAFETY: no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    pending.send.sent_ns = now;
    pending.send.prev_sent_ns = 0;
    pending.send.cgroup_id = cgroup_id;
    pending.send.family = flow.family;
    pending.send._pad = 0;
    pending.send.server_port = u16::from_be(flow.dport);
    pending.send.dns_len = msg_len.min(u16::MAX as usize) as u16;
    pending.send.server = flow.daddr;
    pending.send._pad2 = [0; 6];
    pending.send.captured = copy_payload(ctx, payload, msg_len, &mut pending.query) as u16;
    pending.send.question_len = question_len(&pending.query, pending.send.captured as usize);
    if DNS_PENDING
        .insert(key, pending, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        // A new query takes a slot of its cgroup's quota, or is not kept.
        match under_quota(cgroup_id) {
            // SAFETY: a live, aligned u64 in a map value (entries are only removed by the
            // sweep, which then rewrites every count).
            Ok(Some(n)) => unsafe { *n = (*n).saturating_add(1) },
            Ok(None) => {}
            Err(n) => {
                let _ = DNS_PENDING.remove(key);
                debug!(
                    ctx,
                    "dns: cgroup {} has its quota of waiting queries ({})", cgroup_id, n
                );
                bump(DnsStat::PendingQuota);
            }
        }
        return;
    }
    // SAFETY: the map returns a pointer into a live entry.
    let Some(prev) = (unsafe { DNS_PENDING.get(key) }) else {
        bump(DnsStat::PendingFull);
        return;
    };
    pending.send.prev_sent_ns = prev.send.sent_ns;
    match DNS_EVENTS.reserve::<DnsQueryEvent>(0) {
        Some(mut entry) => {
            // SAFETY: a reserved slot of the right size; every field is written.
            let ev = unsafe { &mut *entry.as_mut_ptr() };
            ev.key = *key;
            ev.send = prev.send;
            ev.done_ns = now;
            ev.outcome = OUTCOME_RESENT;
            ev._pad = [0; 3];
            ev.dns_len = prev.send.dns_len as u32;
            ev.captured = prev.send.captured as u32;
            ev._pad2 = 0;
            ev.payload[..DNS_QUERY_CAPTURE].copy_from_slice(&prev.query);
            entry.submit(wakeup(&DNS_EVENTS));
        }
        None => bump(DnsStat::RingbufFull),
    }
    // The re-send replaces the earlier send; it already holds its cgroup's slot.
    if DNS_PENDING.insert(key, pending, 0).is_err() {
        bump(DnsStat::PendingFull);
    }
}

/// Bytes of the question after the header (name, type, class) in a query's captured bytes;
/// 0 when the name is not a plain uncompressed one within them.
#[inline(always)]
fn question_len(query: &[u8; DNS_QUERY_CAPTURE], captured: usize) -> u16 {
    let mut at = DNS_HEADER;
    // A name has at most 127 labels.
    for _ in 0..128 {
        if at >= DNS_QUERY_CAPTURE {
            return 0;
        }
        let label = query[at & (DNS_QUERY_CAPTURE - 1)] as usize;
        if label == 0 {
            let end = at + 5;
            return if end <= captured && end <= DNS_QUERY_CAPTURE {
                (end - DNS_HEADER) as u16
            } else {
                0
            };
        }
        if label > 63 {
            return 0;
        }
        at += label + 1;
    }
    0
}

/// Whether an answer's captured bytes carry one question, the query's: the same bytes after
/// the header as the query sent (a resolver checks no less). Every byte of the query's
/// capture is compared, those past the question masked out: a loop of a fixed count, whose
/// every index the verifier sees in bounds (an early exit on the question's length let LLVM
/// fold the bound into it, which 5.10's verifier cannot follow).
#[inline(always)]
fn same_question(answer: &[u8; DNS_CAPTURE], captured: usize, pending: &DnsPending) -> bool {
    let len = pending.send.question_len as usize;
    if len == 0 || answer[4] != 0 || answer[5] != 1 || DNS_HEADER + len > captured {
        return false;
    }
    let mut differ = 0u8;
    #[expect(
        clippy::needless_range_loop,
        reason = "indices in a fixed range are what 5.10's verifier follows; an iterator adds bounds it may not"
    )]
    for i in DNS_HEADER..DNS_QUERY_CAPTURE {
        let within = if i < DNS_HEADER + len { 0xff } else { 0 };
        differ |= (answer[i] ^ pending.query[i]) & within;
    }
    differ == 0
}

/// A response arriving: the answer to a waiting query ends it with one event. It must come on
/// the query's socket, with its id and its question, and from where the query went: a
/// connected socket receives only from its peer, an unconnected one's answer must come from
/// the address the query left for (NAT in the pod's own namespace between the socket and
/// this hook would rewrite that one: connected sockets, glibc's and Go's, are not affected).
/// Anything else is counted as mismatched and leaves the query waiting (it times out if
/// nothing better comes).
#[inline(always)]
fn on_response(
    ctx: &SkBuffContext,
    key: &DnsKey,
    from: &FlowKey,
    flags: u8,
    payload: usize,
    msg_len: usize,
) {
    // SAFETY: the map returns a pointer into a live entry.
    let Some(pending) = (unsafe { DNS_PENDING.get(key) }) else {
        bump(DnsStat::Unmatched);
        return;
    };
    if !connected_socket(ctx)
        && (from.family != pending.send.family
            || from.saddr != pending.send.server
            || u16::from_be(from.sport) != pending.send.server_port)
    {
        bump(DnsStat::Mismatched);
        return;
    }
    let Some(mut entry) = DNS_EVENTS.reserve::<DnsQueryEvent>(0) else {
        bump(DnsStat::RingbufFull);
        // Answered all the same: left waiting, the query would be swept as a timeout that
        // never happened, holding its cgroup's quota until then. Its answer is counted lost.
        let cgroup = pending.send.cgroup_id;
        if DNS_PENDING.remove(key).is_ok() {
            answered_one(cgroup);
        }
        return;
    };
    // SAFETY: a reserved slot of the right size; every field is written before submit.
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    ev.key = *key;
    ev.send = pending.send;
    // SAFETY: no arguments.
    ev.done_ns = unsafe { bpf_ktime_get_ns() };
    ev.outcome = OUTCOME_ANSWERED;
    ev._pad = [0; 3];
    ev.dns_len = msg_len as u32;
    ev._pad2 = 0;
    ev.captured = copy_payload(ctx, payload, msg_len, &mut ev.payload) as u32;
    if !same_question(&ev.payload, ev.captured as usize, pending) {
        entry.discard(0);
        bump(DnsStat::Mismatched);
        return;
    }
    if flags & 0x02 != 0 {
        bump(DnsStat::Truncated);
    }
    if DNS_PENDING.remove(key).is_ok() {
        answered_one(ev.send.cgroup_id);
    }
    entry.submit(wakeup(&DNS_EVENTS));
}

/// Copies 1..=N bytes of the DNS message into `dst`, with bounds the verifier can follow
/// (the helper refuses a length that might be zero). Returns how many.
#[inline(always)]
fn copy_payload<const N: usize>(
    ctx: &SkBuffContext,
    payload: usize,
    msg_len: usize,
    dst: &mut [u8; N],
) -> usize {
    let len = msg_len.min(N);
    if len == 0 {
        return 0;
    }
    // Equals `len` for every len in 1..=N (a power of two). The volatile read keeps LLVM from
    // folding the mask away again.
    // SAFETY: reading a local.
    let raw = unsafe { core::ptr::read_volatile(&len) } as u32;
    let n = (raw.wrapping_sub(1) & (N as u32 - 1)) + 1;
    // SAFETY: `dst` has N bytes and n <= N.
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr() as *const _,
            payload as u32,
            dst.as_mut_ptr() as *mut _,
            n,
        )
    };
    if ret == 0 { n as usize } else { 0 }
}
