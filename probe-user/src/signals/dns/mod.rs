//! DNS: the kernel matches answers to queries (socket cookie and
//! transaction id) and emits one event per answered or re-sent query; here each becomes one
//! `DnsQuery` (names parsed with the `simple-dns` wire parser), queries still unanswered after
//! the timeout are taken out of the kernel's map and reported as timeouts, and retransmits are
//! marked with their gap (5 s is the classic resolver timeout): a re-send on the same socket
//! (seen by the kernel), or the same query (name, type and transaction id: a resolver retrying
//! from another socket keeps its id) from the same cgroup while an earlier send of it went
//! unanswered. Another lookup of the same name, with its own id, is never a retransmit.
//! An answer preceded by NXDOMAINs for `name.<search suffix>` counts them (the `ndots:5`
//! search-path effect).

use std::{
    collections::{HashMap, HashSet},
    hash::BuildHasher as _,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use probe_common::dns::{
    self as common, DnsKey, DnsPending, DnsQueryEvent, DnsSend, DnsStats, DnsTcpCounts,
    OUTCOME_ANSWERED,
};
use serde::Serialize;

mod search;

use search::{Asker, RecentMisses};

use crate::{
    attribution::cgroups::{CgroupFs, Hierarchy},
    attribution::pods::{Attributor, PodRef},
    clock::KernelClock,
    kernel::loader::{Attachment, Direction, EventRing, Probes, cgroup_skb},
    kernel::rings::Batch,
    signals::{DnsRefresh, DnsTcp, Event},
};

/// Every packet to and from port 53: cgroup_skb egress and ingress on the cgroup v2 root,
/// where they see every socket on the node.
pub const PROGRAMS: [Attachment; 2] = [
    cgroup_skb("dns_egress", Direction::Egress),
    cgroup_skb("dns_ingress", Direction::Ingress),
];

/// Attaches the DNS programs to the cgroup v2 root.
pub fn attach(probes: &mut Probes, cgroups: &CgroupFs) -> anyhow::Result<()> {
    let root = &cgroups
        .mount(Hierarchy::Unified)
        .context("no cgroup v2 mount")?
        .path;
    probes.attach_to_cgroup(&PROGRAMS, root)
}

/// Attaches, and takes the ring of `DnsQueryEvent`s.
pub fn open(probes: &mut Probes, cgroups: &CgroupFs) -> anyhow::Result<EventRing> {
    attach(probes, cgroups)?;
    probes.take_ring(common::EVENTS)
}

/// DNS's part of a refresh: its counters (`lost`, its ring's drops, added) and DNS over TCP
/// per cgroup.
pub fn refresh(
    probes: &Probes,
    tracker: &DnsTracker,
    lost: u64,
    attributor: &mut Attributor,
) -> anyhow::Result<DnsRefresh> {
    let mut stats: DnsStats = probes.stats()?;
    stats.lost += lost;
    stats.malformed += tracker.malformed;
    let tcp = tcp_counts(probes)?
        .into_iter()
        .map(|(id, c)| {
            let (cgroup, who) = attributor.attribute(id, None);
            DnsTcp {
                cgroup_id: id,
                cgroup,
                workload: who.workload,
                pod: who.pod,
                to_server: c.to_server,
                from_server: c.from_server,
            }
        })
        .collect();
    Ok(DnsRefresh { stats, tcp })
}

/// DNS-over-TCP segments per cgroup v2 id, summed over CPUs.
fn tcp_counts(probes: &Probes) -> anyhow::Result<Vec<(u64, DnsTcpCounts)>> {
    probes.per_cpu_hash(common::TCP, |a: DnsTcpCounts, c: &DnsTcpCounts| {
        DnsTcpCounts {
            to_server: a.to_server + c.to_server,
            from_server: a.from_server + c.from_server,
        }
    })
}

/// Removes expired queries from the kernel's map (an answer may have removed one first).
fn forget(probes: &mut Probes, keys: &[DnsKey]) -> anyhow::Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut pending = probes.hash_mut::<DnsKey, DnsPending>(common::PENDING)?;
    for key in keys {
        let _ = pending.remove(key);
    }
    Ok(())
}

/// Sets each cgroup's count of waiting queries (the quota's) to the truth, and forgets the
/// cgroups with none.
fn set_pending_counts(probes: &mut Probes, counts: &HashMap<u64, u64>) -> anyhow::Result<()> {
    let mut by_cgroup = probes.hash_mut::<u64, u64>(common::PENDING_BY_CGROUP)?;
    let gone: Vec<u64> = by_cgroup
        .keys()
        .map_while(Result::ok)
        .filter(|id| !counts.contains_key(id))
        .collect();
    for id in gone {
        let _ = by_cgroup.remove(&id);
    }
    for (id, n) in counts {
        // Full (a cgroup the kernel let through unquota'd): it is counted next time.
        let _ = by_cgroup.insert(id, n, 0);
    }
    Ok(())
}

/// What is reported for each query.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DnsQuery {
    /// When the query was sent (RFC 3339).
    pub time: String,
    #[serde(skip)]
    pub start_unix_nano: u64,
    #[serde(skip)]
    pub end_unix_nano: u64,
    pub qname: String,
    pub qtype: String,
    /// NOERROR, NXDOMAIN, SERVFAIL, REFUSED, ... (none for a timeout).
    pub rcode: Option<Rcode>,
    pub outcome: Outcome,
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
    pub pod: Option<Arc<PodRef>>,
}

/// What became of a query.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    #[default]
    Answered,
    /// No answer within the timeout.
    Timeout,
}

impl Outcome {
    /// As in `faultline_dns_queries_total{outcome}`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Timeout => "timeout",
        }
    }
}

/// The answer to a query, as the kernel saw it.
#[derive(Clone, Copy, Debug)]
struct Answer {
    /// When it came (kernel clock).
    at_ns: u64,
    rcode: u16,
    truncated: bool,
}

/// How query names are shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Names {
    Full,
    /// A hash instead of the name, keyed at random when faultline starts: the same name gives
    /// the same hash within one run, and no dictionary of names reverses it.
    Redact,
}

/// The fields of one DNS message faultline uses.
#[derive(Debug, PartialEq, Eq)]
pub struct Message {
    pub id: u16,
    pub response: bool,
    pub truncated: bool,
    /// The header's four bits, extended by an EDNS OPT record's eight (RFC 6891) when the
    /// captured bytes hold it.
    pub rcode: u16,
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
        rcode: (flags & 0x000f)
            | extended_rcode(bytes, question_end).map_or(0, |x| u16::from(x) << 4),
        qname: q
            .qname
            .to_string()
            .trim_end_matches('.')
            .to_ascii_lowercase(),
        qtype: u16::from(q.qtype),
    })
}

/// The upper eight bits of the response code an OPT record carries (the high byte of its TTL
/// field), when one is within `bytes`: the records after the question walked, names skipped
/// whether compressed or not. None without one, or where the records run past the capture.
fn extended_rcode(bytes: &[u8], question_end: usize) -> Option<u8> {
    let count = |at: usize| u16::from_be_bytes([bytes[at], bytes[at + 1]]) as usize;
    let records = count(6) + count(8) + count(10);
    let mut at = question_end;
    for _ in 0..records.min(256) {
        // The owner name: labels up to a zero, or a compression pointer (two bytes).
        for _ in 0..128 {
            let len = *bytes.get(at)? as usize;
            if len & 0xc0 == 0xc0 {
                at += 2;
                break;
            }
            at += 1 + len;
            if len == 0 {
                break;
            }
        }
        let fixed = bytes.get(at..at + 10)?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        if rtype == 41 {
            return Some(fixed[4]);
        }
        at += 10 + u16::from_be_bytes([fixed[8], fixed[9]]) as usize;
    }
    None
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

/// A response code (RFC 1035), shown by its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rcode(pub u16);

impl Rcode {
    pub const NOERROR: Rcode = Rcode(0);
    pub const SERVFAIL: Rcode = Rcode(2);
    pub const NXDOMAIN: Rcode = Rcode(3);
    pub const REFUSED: Rcode = Rcode(5);

    /// The name of one of the codes a resolver meets; none for the others.
    pub fn known(self) -> Option<&'static str> {
        match self.0 {
            0 => Some("NOERROR"),
            1 => Some("FORMERR"),
            2 => Some("SERVFAIL"),
            3 => Some("NXDOMAIN"),
            4 => Some("NOTIMP"),
            5 => Some("REFUSED"),
            // EDNS's (RFC 6891, 7873): a server that refuses the query's EDNS version or cookie.
            16 => Some("BADVERS"),
            23 => Some("BADCOOKIE"),
            _ => None,
        }
    }

    /// `NXDOMAIN`, or `RCODE12` for a code without a common name.
    pub fn name(self) -> std::borrow::Cow<'static, str> {
        match self.known() {
            Some(name) => name.into(),
            None => format!("RCODE{}", self.0).into(),
        }
    }
}

impl Serialize for Rcode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
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
        64 => "SVCB".into(),
        65 => "HTTPS".into(),
        255 => "ANY".into(),
        257 => "CAA".into(),
        n => format!("TYPE{n}"),
    }
}

/// How often the kernel's waiting queries are read: timeouts are reported this late at most,
/// and a retransmit from another socket is recognised if the first send waited this long.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(250);

/// Bounds on what the tracker remembers.
const MAX_UNANSWERED: usize = 65_536;
const RETRANSMIT_WINDOW_NS: u64 = 30_000_000_000;

/// One query of one cgroup, as a resolver re-sends it: its question and transaction id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Retry {
    cgroup: u64,
    qname: String,
    qtype: u16,
    id: u16,
}

impl Retry {
    fn of(send: &DnsSend, msg: &Message, id: u16) -> Retry {
        Retry {
            cgroup: send.cgroup_id,
            qname: msg.qname.clone(),
            qtype: msg.qtype,
            id,
        }
    }
}

/// Turns kernel query events and the kernel's waiting queries into reports.
pub struct DnsTracker {
    timeout_ns: u64,
    names: Names,
    /// The key of the redacting hash (SipHash with random keys per process).
    redact_key: std::hash::RandomState,
    clock: KernelClock,
    /// Queries sent and not (yet) answered, with when: from re-sends, timeouts and the
    /// waiting queries seen in the kernel's map.
    unanswered: HashMap<Retry, u64>,
    /// Waiting queries already parsed: (key, sent) -> what a retry of them repeats (None:
    /// unparseable).
    waiting: HashMap<(DnsKey, u64), Option<Retry>>,
    /// Queries whose packet conntrack dropped, with the cause.
    conntrack_drops: HashMap<(u64, u16), &'static str>,
    /// Recent NXDOMAIN answers, per cgroup and type: the search-path chains.
    nxdomains: RecentMisses,
    pub malformed: u64,
}

impl DnsTracker {
    pub fn new(timeout: Duration, names: Names) -> Self {
        DnsTracker {
            timeout_ns: u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX),
            names,
            redact_key: std::hash::RandomState::new(),
            clock: KernelClock::new(),
            unanswered: HashMap::new(),
            waiting: HashMap::new(),
            conntrack_drops: HashMap::new(),
            nxdomains: RecentMisses::default(),
            malformed: 0,
        }
    }

    /// One query's end from the kernel: answered (the event carries the answer) or re-sent
    /// on the same socket before an answer (it carries the query; reported as a timeout).
    pub fn on_event(
        &mut self,
        ev: &DnsQueryEvent,
        attributor: &mut Attributor,
    ) -> Option<DnsQuery> {
        let captured = (ev.captured as usize).min(ev.payload.len());
        let answered = ev.outcome == OUTCOME_ANSWERED;
        self.waiting.remove(&(ev.key, ev.send.sent_ns));
        let Some(msg) = parse(&ev.payload[..captured]).filter(|m| m.response == answered) else {
            self.malformed += 1;
            return None;
        };
        let retry = Retry::of(&ev.send, &msg, ev.key.id);
        let gap = self.retransmit_gap(&ev.send, &retry);
        if !answered {
            self.note_unanswered(retry, ev.send.sent_ns);
            return Some(self.report(&ev.key, &ev.send, &msg, None, gap, 0, attributor));
        }
        self.unanswered.remove(&retry);
        let asker = Asker {
            cgroup: ev.send.cgroup_id,
            qtype: msg.qtype,
        };
        let search_nxdomain = if msg.rcode == 3 {
            self.nxdomains.note(asker, &msg.qname, ev.done_ns);
            0
        } else {
            self.nxdomains.chain_before(asker, &msg.qname, ev.done_ns)
        };
        Some(self.report(
            &ev.key,
            &ev.send,
            &msg,
            Some(Answer {
                at_ns: ev.done_ns,
                rcode: msg.rcode,
                truncated: msg.truncated,
            }),
            gap,
            search_nxdomain,
            attributor,
        ))
    }

    /// The gap to the earlier send this one repeats: the same socket's (the kernel saw the
    /// re-send), or the same query (question and id) from the same cgroup still unanswered
    /// when this left.
    fn retransmit_gap(&self, send: &DnsSend, retry: &Retry) -> Option<u64> {
        if send.prev_sent_ns != 0 {
            return Some(send.sent_ns.saturating_sub(send.prev_sent_ns));
        }
        self.unanswered
            .get(retry)
            .filter(|t| **t < send.sent_ns && send.sent_ns - **t < RETRANSMIT_WINDOW_NS)
            .map(|t| send.sent_ns - t)
    }

    fn note_unanswered(&mut self, retry: Retry, sent: u64) {
        if self.unanswered.len() < MAX_UNANSWERED || self.unanswered.contains_key(&retry) {
            let t = self.unanswered.entry(retry).or_insert(sent);
            *t = (*t).max(sent);
        }
    }

    /// The kernel's waiting queries, as of kernel time `now`: the ones older than the timeout
    /// are reported (their keys returned, for removal from the map); the others are noted as
    /// unanswered so far, so a repeat from another socket is recognised as a retransmit.
    pub fn sweep(
        &mut self,
        waiting: Vec<(DnsKey, DnsPending)>,
        now: u64,
        attributor: &mut Attributor,
    ) -> (Vec<DnsQuery>, Vec<DnsKey>) {
        let mut reports = Vec::new();
        let mut expired = Vec::new();
        let mut present = HashSet::with_capacity(waiting.len());
        // A walk of the map that restarted (an answer deleted the key it stood on) lists
        // entries twice: each is one query, reported once.
        let mut listed = HashSet::with_capacity(waiting.len());
        for (key, p) in waiting {
            if !listed.insert(key) {
                continue;
            }
            let sent = p.send.sent_ns;
            let captured = (p.send.captured as usize).min(p.query.len());
            if now.saturating_sub(sent) >= self.timeout_ns {
                expired.push(key);
                self.waiting.remove(&(key, sent));
                match parse(&p.query[..captured]).filter(|m| !m.response) {
                    Some(msg) => {
                        let retry = Retry::of(&p.send, &msg, key.id);
                        let gap = self.retransmit_gap(&p.send, &retry);
                        self.note_unanswered(retry, sent);
                        reports.push(self.report(&key, &p.send, &msg, None, gap, 0, attributor));
                    }
                    None => self.malformed += 1,
                }
                continue;
            }
            present.insert((key, sent));
            let entry = self.waiting.entry((key, sent)).or_insert_with(|| {
                parse(&p.query[..captured])
                    .filter(|m| !m.response)
                    .map(|m| Retry::of(&p.send, &m, key.id))
            });
            if let Some(retry) = entry.clone() {
                let t = self.unanswered.entry(retry).or_insert(sent);
                *t = (*t).min(sent);
            }
        }
        self.waiting.retain(|k, _| present.contains(k));
        self.unanswered
            .retain(|_, t| now.saturating_sub(*t) < RETRANSMIT_WINDOW_NS);
        reports.sort_by_key(|q| q.start_unix_nano);
        (reports, expired)
    }

    /// A query's packet was dropped by conntrack: its report will say so. Returns the query
    /// name when the query is known to be waiting.
    pub fn note_conntrack_drop(
        &mut self,
        socket_cookie: u64,
        id: u16,
        cause: &'static str,
    ) -> Option<String> {
        // Drops of queries never reported would stay forever: bounded like the rest.
        if self.conntrack_drops.len() >= MAX_UNANSWERED {
            self.conntrack_drops.clear();
        }
        self.conntrack_drops.insert((socket_cookie, id), cause);
        let qname = self
            .waiting
            .iter()
            .find(|((k, _), _)| k.socket_cookie == socket_cookie && k.id == id)
            .and_then(|(_, q)| q.as_ref().map(|q| q.qname.clone()))?;
        Some(self.name(&qname))
    }

    pub fn now_ktime(&self) -> u64 {
        self.clock.now_ktime()
    }

    #[allow(clippy::too_many_arguments)]
    fn report(
        &mut self,
        key: &DnsKey,
        send: &DnsSend,
        msg: &Message,
        answer: Option<Answer>,
        retransmit_gap: Option<u64>,
        search_nxdomain: u32,
        attributor: &mut Attributor,
    ) -> DnsQuery {
        let (cgroup, attribution) = attributor.attribute(send.cgroup_id, None);
        let end = answer.map_or(send.sent_ns + self.timeout_ns, |a| a.at_ns);
        let port = send.server_port;
        DnsQuery {
            time: self.clock.rfc3339(send.sent_ns),
            start_unix_nano: self.clock.unix_nano(send.sent_ns),
            end_unix_nano: self.clock.unix_nano(end),
            qname: self.name(&msg.qname),
            qtype: qtype_name(msg.qtype),
            rcode: answer.map(|a| Rcode(a.rcode)),
            outcome: if answer.is_some() {
                Outcome::Answered
            } else {
                Outcome::Timeout
            },
            latency_ms: answer.map(|a| a.at_ns.saturating_sub(send.sent_ns) as f64 / 1e6),
            truncated: answer.is_some_and(|a| a.truncated),
            retransmit: retransmit_gap.is_some(),
            retransmit_gap_ms: retransmit_gap.map(|g| g as f64 / 1e6),
            search_nxdomain,
            conntrack_drop: self.conntrack_drops.remove(&(key.socket_cookie, key.id)),
            server: endpoint(send.family, &send.server, port),
            cgroup: cgroup.unwrap_or_else(|| "?".to_owned()),
            workload: attribution.workload,
            pod: attribution.pod,
        }
    }

    fn name(&self, qname: &str) -> String {
        match self.names {
            Names::Full => qname.to_owned(),
            Names::Redact => format!("redacted-{:016x}", self.redact_key.hash_one(qname)),
        }
    }
}

fn endpoint(family: u8, addr: &[u8; 16], port: u16) -> String {
    std::net::SocketAddr::new(super::ip(family, addr), port).to_string()
}

/// Feeds every query event of a batch to the tracker; reports go to `emit`.
pub fn deliver(
    batch: &Batch,
    tracker: &mut DnsTracker,
    attributor: &mut Attributor,
    mut emit: impl FnMut(Event) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    crate::kernel::loader::decode_each(batch.records(), "a DNS query", |ev: DnsQueryEvent| {
        match tracker.on_event(&ev, attributor) {
            Some(q) => emit(Event::DnsQuery(q)),
            None => Ok(()),
        }
    })
}

/// The queries the kernel still has waiting past the timeout (after the pipeline delivered
/// the batches already read), reported as timeouts and removed from the kernel's map.
pub fn sweep(
    probes: &mut Probes,
    tracker: &mut DnsTracker,
    attributor: &mut Attributor,
    mut emit: impl FnMut(Event) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let now = tracker.now_ktime();
    let waiting = probes.hash_entries::<DnsKey, DnsPending>(common::PENDING)?;
    let cgroup_of: HashMap<DnsKey, u64> = waiting
        .iter()
        .map(|(k, p)| (*k, p.send.cgroup_id))
        .collect();
    let (reports, expired) = tracker.sweep(waiting, now, attributor);
    forget(probes, &expired)?;
    // What each cgroup still has waiting: the per-cgroup quota's count, made exact again.
    let mut still = cgroup_of;
    for key in &expired {
        still.remove(key);
    }
    let mut counts: HashMap<u64, u64> = HashMap::new();
    for cgroup in still.into_values() {
        *counts.entry(cgroup).or_default() += 1;
    }
    set_pending_counts(probes, &counts)?;
    for q in reports {
        emit(Event::DnsQuery(q))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_is_keyed_per_run() {
        let a = DnsTracker::new(Duration::from_secs(2), Names::Redact);
        let b = DnsTracker::new(Duration::from_secs(2), Names::Redact);
        let name = "payments.internal.example.";
        assert_eq!(a.name(name), a.name(name), "stable within a run");
        assert!(a.name(name).starts_with("redacted-") && !a.name(name).contains("payments"));
        // Another run (another key): a dictionary hashed elsewhere does not match.
        assert_ne!(a.name(name), b.name(name));
        assert_eq!(
            DnsTracker::new(Duration::from_secs(2), Names::Full).name(name),
            name
        );
    }

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

    /// An answer whose OPT record carries the upper bits of its code: BADVERS (16) is 0 in
    /// the header and 1 in the OPT record's TTL; one without OPT keeps the header's code.
    #[test]
    fn extended_rcodes_are_decoded_from_the_opt_record() {
        let mut answer = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 1];
        answer.extend_from_slice(&[
            3, b'w', b'e', b'b', 4, b't', b'e', b's', b't', 0, 0, 1, 0, 1,
        ]);
        // An A record under a compressed name, then the OPT record (root name, type 41).
        answer.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 0, 0, 1]);
        answer.extend_from_slice(&[0, 0, 41, 0x10, 0, 1, 0, 0, 0, 0, 0]);
        let m = parse(&answer).expect("parses");
        assert_eq!((m.rcode, Rcode(m.rcode).name().as_ref()), (16, "BADVERS"));
        // No OPT record: the header's code.
        let mut plain = answer[..answer.len() - 11].to_vec();
        plain[11] = 0;
        plain[3] = 0x83;
        assert_eq!(parse(&plain).expect("parses").rcode, 3);
        // An OPT record past the capture: the header's code, no guess.
        assert_eq!(parse(&answer[..answer.len() - 4]).expect("parses").rcode, 0);
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
            (Rcode(m.rcode).name().into_owned(), qtype_name(m.qtype)),
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

    /// A waiting query in the kernel's map: `id` from socket `cookie`, sent at `sent`.
    fn pending(cookie: u64, id: u16, name: &str, sent: u64) -> (DnsKey, DnsPending) {
        let q = query(id, name, 1);
        let mut p = DnsPending {
            send: DnsSend {
                sent_ns: sent,
                cgroup_id: 7,
                family: 4,
                server_port: 53,
                dns_len: q.len() as u16,
                captured: q.len() as u16,
                ..DnsSend::default()
            },
            query: [0; probe_common::dns::DNS_QUERY_CAPTURE],
        };
        p.query[..q.len()].copy_from_slice(&q);
        let key = DnsKey {
            socket_cookie: cookie,
            id,
            _pad: [0; 6],
        };
        (key, p)
    }

    /// A pod asking the same name every 40 ms from new sockets, each with its own id, while
    /// earlier ones still wait: none is a retransmit. The same query (same id) from another
    /// socket, its first send unanswered, is. A waiting query seen twice by one sweep (the
    /// map walk restarted) is one timeout.
    #[test]
    fn retransmits_are_the_same_query_and_timeouts_count_once() {
        let mut t = DnsTracker::new(Duration::from_secs(2), Names::Full);
        let mut a = Attributor::offline();
        const MS: u64 = 1_000_000;
        let waiting: Vec<_> = (0..5)
            .map(|i| pending(100 + i, 1000 + i as u16, "web.test", i * 40 * MS))
            .collect();
        let (reports, _) = t.sweep(waiting, 200 * MS, &mut a);
        assert!(reports.is_empty());
        let (key, p) = pending(200, 2000, "web.test", 240 * MS);
        let (reports, _) = t.sweep(vec![(key, p), (key, p)], 3000 * MS, &mut a);
        assert_eq!(reports.len(), 1, "one timeout, seen twice by the walk");
        assert_eq!(
            reports[0].retransmit_gap_ms, None,
            "another lookup, not a retry"
        );
        // The first query's id again, from a new socket: a retry of the unanswered send.
        let (key, p) = pending(300, 1000, "web.test", 3100 * MS);
        let (reports, _) = t.sweep(vec![(key, p)], 6000 * MS, &mut a);
        assert_eq!(reports.len(), 1);
        assert!(reports[0].retransmit, "{:?}", reports[0]);
    }
}
