//! Pipeline stages 2-3 for DNS: packet events from the cgroup_skb programs are parsed (header
//! by hand, question with the `simple-dns` wire parser), queries are matched to responses by
//! socket and transaction id, and each query becomes one `DnsQuery`: answered with its rcode
//! and latency, or timed out. A query re-sent for the same name before an answer is marked as
//! a retransmit with the gap (5 s is the classic resolver timeout), and an answer preceded by
//! NXDOMAINs for `name.<search suffix>` counts them (the `ndots:5` search-path effect).

use std::{
    collections::{HashMap, VecDeque},
    hash::{Hash as _, Hasher as _},
    net::IpAddr,
    time::Duration,
};

use probe_common::dns::{DIRECTION_EGRESS, DnsPacketEvent};
use serde::Serialize;

use crate::{
    clock::KernelClock,
    pods::{Attributor, PodRef},
};

/// What is reported for each query.
#[derive(Clone, Debug, Serialize)]
pub struct DnsQuery {
    pub kind: &'static str,
    /// When the query was sent (RFC 3339).
    pub time: String,
    #[serde(skip)]
    pub start_unix_nano: u64,
    #[serde(skip)]
    pub end_unix_nano: u64,
    pub qname: String,
    pub qtype: String,
    /// NOERROR, NXDOMAIN, SERVFAIL, REFUSED, ... (none for a timeout).
    pub rcode: Option<String>,
    /// "answered" or "timeout".
    pub outcome: &'static str,
    pub latency_ms: Option<f64>,
    pub truncated: bool,
    pub retransmit: bool,
    /// Time since the previous unanswered send of the same question.
    pub retransmit_gap_ms: Option<f64>,
    /// NXDOMAIN answers for `qname.<suffix>` just before this answer (search-path expansion).
    pub search_nxdomain: u32,
    /// Set when conntrack dropped the query's packet (e.g. "insert_failed").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conntrack_drop: Option<&'static str>,
    pub server: String,
    pub cgroup: String,
    pub workload: String,
    pub pod: Option<PodRef>,
}

/// How query names are shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Names {
    Full,
    /// A stable hash instead of the name (same name, same hash, within one run).
    Redact,
}

/// The fields of one DNS message faultline uses.
#[derive(Debug, PartialEq, Eq)]
pub struct Message {
    pub id: u16,
    pub response: bool,
    pub truncated: bool,
    pub rcode: u8,
    pub qname: String,
    pub qtype: u16,
}

/// Parses a DNS message head; `None` for anything malformed (short header, no question,
/// a name that does not parse, compression loops).
pub fn parse(bytes: &[u8]) -> Option<Message> {
    if bytes.len() < 12 {
        return None;
    }
    let id = u16::from_be_bytes([bytes[0], bytes[1]]);
    let flags = u16::from_be_bytes([bytes[2], bytes[3]]);
    let qdcount = u16::from_be_bytes([bytes[4], bytes[5]]);
    if qdcount == 0 {
        return None;
    }
    // Only the header and the first question: answers may be cut by the capture limit.
    let mut head = bytes[..12].to_vec();
    head[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    let question_end = question_end(bytes)?;
    head.extend_from_slice(&bytes[12..question_end]);
    let packet = simple_dns::Packet::parse(&head).ok()?;
    let q = packet.questions.first()?;
    Some(Message {
        id,
        response: flags & 0x8000 != 0,
        truncated: flags & 0x0200 != 0,
        rcode: (flags & 0x000f) as u8,
        qname: q
            .qname
            .to_string()
            .trim_end_matches('.')
            .to_ascii_lowercase(),
        qtype: u16::from(q.qtype),
    })
}

/// End of the first question (uncompressed name, as every resolver sends it, + type + class).
fn question_end(bytes: &[u8]) -> Option<usize> {
    let mut i = 12;
    for _ in 0..128 {
        let len = *bytes.get(i)? as usize;
        if len == 0 {
            return (i + 5 <= bytes.len()).then_some(i + 5);
        }
        if len & 0xc0 != 0 {
            return None;
        }
        i += 1 + len;
    }
    None
}

pub fn rcode_name(rcode: u8) -> String {
    match rcode {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        n => format!("RCODE{n}"),
    }
}

pub fn qtype_name(qtype: u16) -> String {
    match qtype {
        1 => "A".into(),
        2 => "NS".into(),
        5 => "CNAME".into(),
        6 => "SOA".into(),
        12 => "PTR".into(),
        15 => "MX".into(),
        16 => "TXT".into(),
        28 => "AAAA".into(),
        33 => "SRV".into(),
        65 => "HTTPS".into(),
        n => format!("TYPE{n}"),
    }
}

struct Pending {
    sent_ktime: u64,
    cgroup_id: u64,
    msg: Message,
    server: String,
    retransmit_gap: Option<u64>,
    /// Why conntrack dropped this query, when it did.
    conntrack_drop: Option<&'static str>,
}

/// Bounds on what the tracker remembers.
const MAX_PENDING: usize = 65_536;
const MAX_RECENT_NXDOMAIN: usize = 4096;
const SEARCH_WINDOW_NS: u64 = 10_000_000_000;
const RETRANSMIT_WINDOW_NS: u64 = 30_000_000_000;

/// Matches queries to responses; reports completed and timed-out queries.
pub struct DnsTracker {
    timeout_ns: u64,
    names: Names,
    clock: KernelClock,
    pending: HashMap<(u64, u16), Pending>,
    /// (cgroup, qname, qtype) -> when an unanswered query was last sent.
    unanswered: HashMap<(u64, String, u16), u64>,
    /// Recent NXDOMAIN answers: (ktime, cgroup, qname, qtype).
    nxdomains: VecDeque<(u64, u64, String, u16)>,
    pub malformed: u64,
    pub dropped_pending: u64,
}

impl DnsTracker {
    pub fn new(timeout: Duration, names: Names) -> Self {
        DnsTracker {
            timeout_ns: u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX),
            names,
            clock: KernelClock::new(),
            pending: HashMap::new(),
            unanswered: HashMap::new(),
            nxdomains: VecDeque::new(),
            malformed: 0,
            dropped_pending: 0,
        }
    }

    /// One packet: a query is remembered, a response completes its query. A query re-sent
    /// with the same id on the same socket ends the earlier send as unanswered.
    pub fn on_packet(
        &mut self,
        ev: &DnsPacketEvent,
        attributor: &mut Attributor,
    ) -> Option<DnsQuery> {
        let captured = (ev.captured as usize).min(ev.payload.len());
        let Some(msg) = parse(&ev.payload[..captured]) else {
            self.malformed += 1;
            return None;
        };
        if ev.direction == DIRECTION_EGRESS {
            if msg.response {
                self.malformed += 1;
                return None;
            }
            let key = (ev.cgroup_id, msg.qname.clone(), msg.qtype);
            let retransmit_gap = self
                .unanswered
                .get(&key)
                .filter(|t| ev.ktime_ns.saturating_sub(**t) < RETRANSMIT_WINDOW_NS)
                .map(|t| ev.ktime_ns.saturating_sub(*t));
            self.unanswered.insert(key, ev.ktime_ns);
            if self.pending.len() >= MAX_PENDING {
                self.dropped_pending += 1;
                return None;
            }
            let server = endpoint(ev.family, &ev.daddr, ev.dport);
            let earlier = self.pending.insert(
                (ev.socket_cookie, msg.id),
                Pending {
                    sent_ktime: ev.ktime_ns,
                    cgroup_id: ev.cgroup_id,
                    msg,
                    server,
                    retransmit_gap,
                    conntrack_drop: None,
                },
            );
            return earlier.map(|p| self.report(p, None, 0, attributor));
        }
        if !msg.response {
            self.malformed += 1;
            return None;
        }
        let p = self.pending.remove(&(ev.socket_cookie, msg.id))?;
        if p.msg.qname != msg.qname || p.msg.qtype != msg.qtype {
            // Same id, other question: not our answer (a spoof or a confused server).
            self.malformed += 1;
            self.pending.insert((ev.socket_cookie, msg.id), p);
            return None;
        }
        self.unanswered
            .remove(&(p.cgroup_id, p.msg.qname.clone(), p.msg.qtype));
        let search_nxdomain = if msg.rcode == 3 {
            if self.nxdomains.len() >= MAX_RECENT_NXDOMAIN {
                self.nxdomains.pop_front();
            }
            self.nxdomains
                .push_back((ev.ktime_ns, p.cgroup_id, p.msg.qname.clone(), p.msg.qtype));
            0
        } else {
            self.search_expansions(ev.ktime_ns, p.cgroup_id, &p.msg.qname, p.msg.qtype)
        };
        Some(self.report(
            p,
            Some((ev.ktime_ns, msg.rcode, msg.truncated)),
            search_nxdomain,
            attributor,
        ))
    }

    /// NXDOMAINs for `qname.<suffix>` of the same type from the same cgroup in the last
    /// seconds, consumed.
    fn search_expansions(&mut self, now: u64, cgroup: u64, qname: &str, qtype: u16) -> u32 {
        let prefix = format!("{qname}.");
        let before = self.nxdomains.len();
        self.nxdomains.retain(|(t, c, n, q)| {
            !(now.saturating_sub(*t) < SEARCH_WINDOW_NS
                && *c == cgroup
                && *q == qtype
                && n.starts_with(&prefix))
        });
        (before - self.nxdomains.len()) as u32
    }

    /// Queries unanswered for longer than the timeout, as of kernel time `now`.
    pub fn expire(&mut self, now: u64, attributor: &mut Attributor) -> Vec<DnsQuery> {
        let timeout = self.timeout_ns;
        let expired: Vec<(u64, u16)> = self
            .pending
            .iter()
            .filter(|(_, p)| now.saturating_sub(p.sent_ktime) >= timeout)
            .map(|(k, _)| *k)
            .collect();
        let mut out = Vec::with_capacity(expired.len());
        for k in expired {
            if let Some(p) = self.pending.remove(&k) {
                out.push(self.report(p, None, 0, attributor));
            }
        }
        self.unanswered
            .retain(|_, t| now.saturating_sub(*t) < RETRANSMIT_WINDOW_NS);
        out.sort_by_key(|q| q.start_unix_nano);
        out
    }

    /// A query's packet was dropped by conntrack: its report will say so. Returns the query
    /// name when the query is still waiting for an answer.
    pub fn note_conntrack_drop(
        &mut self,
        socket_cookie: u64,
        id: u16,
        cause: &'static str,
    ) -> Option<String> {
        let p = self.pending.get_mut(&(socket_cookie, id))?;
        p.conntrack_drop = Some(cause);
        let qname = p.msg.qname.clone();
        Some(self.name(&qname))
    }

    pub fn now_ktime(&self) -> u64 {
        self.clock.now_ktime()
    }

    fn report(
        &self,
        p: Pending,
        answer: Option<(u64, u8, bool)>,
        search_nxdomain: u32,
        attributor: &mut Attributor,
    ) -> DnsQuery {
        let (cgroup, attribution) = attributor.attribute(p.cgroup_id, None);
        let end = answer.map_or(p.sent_ktime + self.timeout_ns, |a| a.0);
        DnsQuery {
            kind: "dns",
            time: self.clock.rfc3339(p.sent_ktime),
            start_unix_nano: self.clock.unix_nano(p.sent_ktime),
            end_unix_nano: self.clock.unix_nano(end),
            qname: self.name(&p.msg.qname),
            qtype: qtype_name(p.msg.qtype),
            rcode: answer.map(|a| rcode_name(a.1)),
            outcome: if answer.is_some() {
                "answered"
            } else {
                "timeout"
            },
            latency_ms: answer.map(|a| a.0.saturating_sub(p.sent_ktime) as f64 / 1e6),
            truncated: answer.is_some_and(|a| a.2),
            retransmit: p.retransmit_gap.is_some(),
            retransmit_gap_ms: p.retransmit_gap.map(|g| g as f64 / 1e6),
            search_nxdomain,
            conntrack_drop: p.conntrack_drop,
            server: p.server,
            cgroup: cgroup.unwrap_or_else(|| "?".to_owned()),
            workload: attribution.workload,
            pod: attribution.pod,
        }
    }

    fn name(&self, qname: &str) -> String {
        match self.names {
            Names::Full => qname.to_owned(),
            Names::Redact => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                qname.hash(&mut h);
                format!("redacted-{:08x}", h.finish() as u32)
            }
        }
    }
}

fn endpoint(family: u8, addr: &[u8; 16], port: u16) -> String {
    let ip = if family == 4 {
        IpAddr::from([addr[0], addr[1], addr[2], addr[3]])
    } else {
        IpAddr::from(*addr)
    };
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// Feeds every packet waiting in the ring to the tracker; completed queries go to `on_query`.
pub fn drain(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    tracker: &mut DnsTracker,
    attributor: &mut Attributor,
    mut on_query: impl FnMut(DnsQuery) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    while let Some(item) = ring.next() {
        let Some(ev) = crate::loader::decode::<DnsPacketEvent>(&item) else {
            tracker.malformed += 1;
            continue;
        };
        drop(item);
        if let Some(q) = tracker.on_packet(&ev, attributor) {
            on_query(q)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `name` with `id`, as a resolver sends it.
    fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut b = vec![
            (id >> 8) as u8,
            id as u8,
            0x01,
            0x00,
            0,
            1,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        for label in name.split('.') {
            b.push(label.len() as u8);
            b.extend_from_slice(label.as_bytes());
        }
        b.extend_from_slice(&[0, (qtype >> 8) as u8, qtype as u8, 0, 1]);
        b
    }

    #[test]
    fn parses_queries_and_responses() {
        let q = query(0x1234, "Web.Shop.svc.cluster.local", 28);
        assert_eq!(
            parse(&q),
            Some(Message {
                id: 0x1234,
                response: false,
                truncated: false,
                rcode: 0,
                qname: "web.shop.svc.cluster.local".into(),
                qtype: 28
            })
        );
        let mut r = q.clone();
        r[2] = 0x83; // QR, TC
        r[3] = 0x83; // RA, NXDOMAIN
        let m = parse(&r).expect("test");
        assert!(m.response && m.truncated);
        assert_eq!(
            (rcode_name(m.rcode), qtype_name(m.qtype)),
            ("NXDOMAIN".into(), "AAAA".into())
        );
    }

    #[test]
    fn malformed_input_is_none_not_a_panic() {
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&[0; 11]), None);
        assert_eq!(parse(&[0; 12]), None); // no question
        // A compression pointer where the question name should be (a loop, in effect).
        let mut looped = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1];
        assert_eq!(parse(&looped), None);
        looped.truncate(14);
        assert_eq!(parse(&looped), None);
        // A label longer than the packet.
        assert_eq!(parse(&[0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 60, b'a']), None);
        // Random bytes, many seeds.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..20_000 {
            let len = (x % 80) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = parse(&bytes);
        }
    }
}
