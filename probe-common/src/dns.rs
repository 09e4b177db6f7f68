//! DNS over UDP port 53, matched in the kernel: cgroup_skb programs on the cgroup v2 root keep
//! each query in `DNS_PENDING` (keyed by socket cookie and transaction id) and emit one
//! `DnsQueryEvent` when its answer arrives, or when the resolver re-sends it on the same socket
//! before any answer. Userspace parses names, expires unanswered queries from the map, and
//! detects retransmits across sockets.

/// Bytes of the answer copied into an event: the header, the question and the first answers
/// of any ordinary response. A power of two (the kernel side masks with it).
pub const DNS_CAPTURE: usize = 512;

/// Bytes of the query kept while it waits: the header and a question name of up to ~240
/// bytes. A power of two.
pub const DNS_QUERY_CAPTURE: usize = 256;

/// The query was answered; the event carries the answer.
pub const OUTCOME_ANSWERED: u8 = 0;
/// The query was re-sent (same socket, same id) before any answer: this send went
/// unanswered. The event carries the query.
pub const OUTCOME_RESENT: u8 = 1;

/// A query waiting for its answer: the socket and the DNS transaction id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsKey {
    pub socket_cookie: u64,
    pub id: u16,
    pub _pad: [u8; 6],
}

/// Where a query went and when; shared by the pending entry and the event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DnsSend {
    pub sent_ns: u64,
    /// When the same query was sent before on this socket (a re-send), else 0.
    pub prev_sent_ns: u64,
    /// cgroup v2 id of the socket's owner.
    pub cgroup_id: u64,
    /// 4 or 6.
    pub family: u8,
    pub _pad: u8,
    pub server_port: u16,
    /// Length of the DNS message, and how much of it is captured.
    pub dns_len: u16,
    pub captured: u16,
    /// IPv4 in the first 4 bytes.
    pub server: [u8; 16],
    /// Bytes of the question (name, type and class) after the header, as the query sent it
    /// (0: not within the capture): an answer must carry the same to end the query.
    pub question_len: u16,
    pub _pad2: [u8; 6],
}

/// A query in `DNS_PENDING`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DnsPending {
    pub send: DnsSend,
    pub query: [u8; DNS_QUERY_CAPTURE],
}

/// One query's end: answered, or re-sent before an answer.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DnsQueryEvent {
    pub key: DnsKey,
    pub send: DnsSend,
    /// When the answer arrived or the query was re-sent.
    pub done_ns: u64,
    /// `OUTCOME_ANSWERED` or `OUTCOME_RESENT`.
    pub outcome: u8,
    pub _pad: [u8; 3],
    /// Length of the DNS message in `payload` and how much of it is captured: the answer, or
    /// the query for a re-send.
    pub dns_len: u32,
    pub captured: u32,
    pub _pad2: u32,
    pub payload: [u8; DNS_CAPTURE],
}

/// Most queries waiting for an answer at once; a full map is counted, never silent.
pub const MAX_DNS_PENDING: u32 = 16384;

/// Most queries one cgroup may have waiting at once: a pod flooding port 53 fills its own
/// share, not the map the other pods' queries need.
pub const MAX_DNS_PENDING_PER_CGROUP: u64 = 1024;

/// Cgroups whose waiting queries are counted for that quota (past it, a new cgroup's queries
/// are tracked without a quota: fail open, counted nowhere as lost).
pub const MAX_DNS_QUOTA_CGROUPS: u32 = 4096;

crate::counters! {
    /// Index of the counters kept per CPU in `DNS_STATS`.
    pub enum DnsStat, pub struct DnsStats, DNS_STAT_COUNT, "DNS_STATS" {
        /// Events that did not fit in the ring buffer.
        RingbufFull = 0 => lost,
        /// DNS over TCP port 53 segments in cgroups the full `DNS_TCP` map could not count.
        TcpMapFull = 1 => tcp_uncounted,
        /// Queries not tracked because `DNS_PENDING` was full.
        PendingFull = 2 => untracked,
        /// UDP port 53 packets that are not DNS: too short for a header, the response bit wrong
        /// for the direction, or a "query" that is not a standard query with exactly one question
        /// (opcode 0, one question, no answer or authority records, a first label of at most 63
        /// bytes). Never kept in `DNS_PENDING`.
        Malformed = 3 => malformed,
        /// Responses that matched no waiting query (late, duplicate, spoofed or garbage).
        Unmatched = 4 => unmatched,
        /// Responses with the TC (truncated) bit: the resolver must retry over TCP.
        Truncated = 5 => truncated,
        /// Queries not tracked because their cgroup already had `MAX_DNS_PENDING_PER_CGROUP`
        /// waiting.
        PendingQuota = 6 => over_quota,
        /// Responses to a waiting query's socket and id that came from another address or
        /// port than the query went to, or carry another question (or none): spoofed, or a
        /// confused server. They never end the query.
        Mismatched = 7 => mismatched,
    }
}

/// DNS over TCP port 53, per cgroup: segments to and from servers (counted, not parsed).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsTcpCounts {
    pub to_server: u64,
    pub from_server: u64,
}

/// Most cgroups counted in `DNS_TCP`.
pub const MAX_DNS_TCP_CGROUPS: u32 = 16384;

/// The ring buffer of `DnsQueryEvent`s.
pub const EVENTS: &str = "DNS_EVENTS";
/// The hash of queries waiting for their answer (`DnsKey` -> `DnsPending`).
pub const PENDING: &str = "DNS_PENDING";
/// The hash of each cgroup's count of waiting queries (the quota's).
pub const PENDING_BY_CGROUP: &str = "DNS_PENDING_BY_CGROUP";
/// The per-CPU hash of `DnsTcpCounts` by cgroup v2 id.
pub const TCP: &str = "DNS_TCP";

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)] plain data with explicit padding, valid for any bit pattern.
    unsafe impl aya::Pod for super::DnsQueryEvent {}
    // SAFETY: #[repr(C)] DnsSend (no padding) and a byte array: every bit pattern valid.
    unsafe impl aya::Pod for super::DnsPending {}
    // SAFETY: #[repr(C)] u64, u16 and explicit padding bytes: every bit pattern valid.
    unsafe impl aya::Pod for super::DnsKey {}
    // SAFETY: #[repr(C)] struct of two u64s: no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::DnsTcpCounts {}
}

crate::kernel_abi_sizes! {
    DnsKey => 16,
    DnsSend => 56,
    DnsPending => 312,
    DnsQueryEvent => 608,
    DnsTcpCounts => 16,
}
