//! DNS over UDP port 53, seen by cgroup_skb programs on the cgroup v2 root: one event per DNS
//! packet (query or response) with its socket and the head of the DNS message; userspace parses,
//! matches queries to responses and detects timeouts and retransmits.

/// Bytes of the DNS message copied into each event: the header, the question and the first
/// answers of any ordinary response. A power of two (the kernel side masks with it).
pub const DNS_CAPTURE: usize = 512;

pub const DIRECTION_EGRESS: u8 = 0;
pub const DIRECTION_INGRESS: u8 = 1;

/// One DNS packet on a pod's socket.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DnsPacketEvent {
    pub ktime_ns: u64,
    /// cgroup v2 id of the socket's owner.
    pub cgroup_id: u64,
    /// Socket cookie: the same for every packet of one socket.
    pub socket_cookie: u64,
    /// 4 or 6.
    pub family: u8,
    /// [`DIRECTION_EGRESS`] (a query leaving) or [`DIRECTION_INGRESS`] (a response arriving).
    pub direction: u8,
    pub sport: u16,
    pub dport: u16,
    pub _pad: u16,
    /// IPv4 in the first 4 bytes.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Length of the DNS message in the packet, and how much of it is in `payload`.
    pub dns_len: u32,
    pub captured: u32,
    pub payload: [u8; DNS_CAPTURE],
}

/// Index of the counters kept per CPU in `DNS_STATS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug)]
pub enum DnsStat {
    /// Events that did not fit in the ring buffer.
    RingbufFull = 0,
    /// DNS over TCP port 53 segments in cgroups the full `DNS_TCP` map could not count.
    TcpMapFull = 1,
}

pub const DNS_STAT_COUNT: u32 = 2;

/// DNS over TCP port 53, per cgroup: segments to and from servers (counted, not parsed).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsTcpCounts {
    pub to_server: u64,
    pub from_server: u64,
}

/// Most cgroups counted in `DNS_TCP`.
pub const MAX_DNS_TCP_CGROUPS: u32 = 16384;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)] plain data, valid for any bit pattern (padding is never read).
    unsafe impl aya::Pod for super::DnsPacketEvent {}
    // SAFETY: #[repr(C)] struct of u64s: no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::DnsTcpCounts {}
}
