//! Conntrack drops: the `skb:kfree_skb` program reports each packet netfilter dropped
//! (`SKB_DROP_REASON_NETFILTER_DROP`) with its tuples, its conntrack entry and the network
//! namespace's conntrack fill; the DNS egress program records which socket sent each DNS flow so
//! a dropped packet can be attributed to its pod.

/// The packet's conntrack entry at the drop.
pub const CT_NONE: u8 = 0;
/// An entry not yet in the table: a new flow, dropped before or at its confirmation.
pub const CT_UNCONFIRMED: u8 = 1;
/// An entry already in the table: an established flow.
pub const CT_CONFIRMED: u8 = 2;

/// A 5-tuple in network byte order (IPv4 in the first 4 bytes of each address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// 4 or 6.
    pub family: u8,
    /// IPPROTO_*.
    pub proto: u8,
    pub _pad: u16,
}

/// Who sent a flow, recorded on egress: the same for every packet of the flow, so a flow is
/// written once, not per packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowOwner {
    pub cgroup_id: u64,
    pub socket_cookie: u64,
}

/// Flows remembered for attribution (LRU: the least recently sent are forgotten first). A
/// drop needs its flow for as long as the flow is re-sent (a resolver's retries, seconds):
/// a busy node's 2,500 new DNS sockets a second fill 32,768 in 13 s.
pub const MAX_FLOWS: u32 = 32768;

/// One packet dropped by netfilter.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConntrackDropEvent {
    pub ktime_ns: u64,
    /// The sender, when the flow was seen leaving a socket on this node (else zero).
    pub owner: FlowOwner,
    /// The packet's headers as dropped (after any NAT already applied).
    pub packet: FlowKey,
    /// The conntrack entry's original and reply tuples (zero without an entry).
    pub orig: FlowKey,
    pub reply: FlowKey,
    /// `nf_conn.status` (IPS_* bits).
    pub ct_status: u32,
    /// Network namespace inode.
    pub netns: u32,
    /// `ifindex` of the device the skb was on, and the one it arrived on (0: locally sent).
    pub ifindex: u32,
    pub iif: u32,
    /// One of `CT_NONE`, `CT_UNCONFIRMED`, `CT_CONFIRMED`.
    pub ct_state: u8,
    /// 1 when the packet still belonged to a local socket.
    pub local: u8,
    /// The DNS transaction id, from the dropped packet itself (UDP; meaningful to port 53).
    pub dns_id: u16,
    /// The inode of the namespace's `/proc/<pid>/net/stat` directory (0: unknown): its
    /// counters are read through any process whose directory has it.
    pub proc_ino: u32,
    pub ifname: [u8; 16],
    /// The process that was dropping the packet when it lives in the dropping namespace (a
    /// locally sent packet: its sender), else 0.
    pub witness_tgid: u32,
    pub _pad: u32,
}

crate::counters! {
    /// Index of the counters kept per CPU in `CT_STATS`.
    pub enum ConntrackStat, pub struct ConntrackStats, CT_STAT_COUNT, "CT_STATS" {
        /// Every netfilter drop seen.
        Drops = 0 => drops,
        /// Drops whose event did not fit in the ring buffer.
        RingbufFull = 1 => lost,
        /// Drops by the state of the packet's conntrack entry.
        NoEntry = 2 => no_entry,
        Unconfirmed = 3 => unconfirmed,
        Confirmed = 4 => confirmed,
    }
}

/// The ring buffer of `ConntrackDropEvent`s.
pub const EVENTS: &str = "CT_EVENTS";

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)] plain data, valid for any bit pattern (padding is never read).
    unsafe impl aya::Pod for super::ConntrackDropEvent {}
    // SAFETY: #[repr(C)] structs with explicit padding: every bit pattern valid.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: #[repr(C)] struct of two u64s: no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::FlowOwner {}
}

crate::kernel_abi_sizes! {
    FlowKey => 40,
    FlowOwner => 16,
    ConntrackDropEvent => 192,
}
