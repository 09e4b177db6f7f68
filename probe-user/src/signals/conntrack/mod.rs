//! Conntrack drops: `ConntrackDropEvent`s from the ring buffer are
//! decoded, given their cause from the kernel state at the drop plus the namespace's
//! conntrack counters, attributed to the pod that sent the flow, and linked to its DNS query.
//! Also watches every namespace's `clash_resolve` counter: clashes the kernel resolved in time
//! (near-misses of the race that drops packets on older kernels). [`ctstats`] reads the
//! kernel's own counters per namespace.

pub mod ctstats;
pub mod origin;

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use probe_common::conntrack::{
    self as common, CT_CONFIRMED, CT_NONE, ConntrackDropEvent, ConntrackStats, FlowKey,
};
use serde::Serialize;

use crate::{
    attribution::netns::{Netns, NetnsDirectory, NetnsKey},
    attribution::pods::{Attributor, PodRef},
    clock::{self, KernelClock},
    kernel::loader::{self, Attachment, EventRing, KernelFacts, Probes, raw},
    kernel::rings::Batch,
    signals::dns::DnsTracker,
    signals::refusals::Counter,
    signals::{ConntrackRefresh, Event},
};
use ctstats::CtCounters;
use origin::Sender;

/// Packets dropped by netfilter.
pub const PROGRAMS: [Attachment; 1] = [raw("conntrack_drop", "kfree_skb")];

/// Attaches the conntrack-drop program, where it can tell a netfilter drop on this node.
pub fn attach(probes: &mut Probes) -> anyhow::Result<()> {
    if let Some(blind) = blind(probes.facts) {
        anyhow::bail!("{blind}");
    }
    probes.attach(&PROGRAMS)
}

/// Why the program cannot tell a netfilter drop from another freed packet here, if it
/// cannot: without drop reasons (before 5.17) it compares the free's location with
/// `nf_hook_slow`'s address, which hidden kernel addresses hide.
fn blind(facts: KernelFacts) -> Option<&'static str> {
    if facts.drop_reasons || facts.nf_drop_site {
        return None;
    }
    Some(if facts.addresses_hidden {
        "kernel addresses hidden (no CAP_SYSLOG): before 5.17 a conntrack drop cannot be told from another freed packet (no drop reasons; the free's location is compared with nf_hook_slow's address): conntrack drops off, the counters still work"
    } else {
        "no drop reasons (before 5.17) and nf_hook_slow not in /proc/kallsyms: conntrack drops off, the counters still work"
    })
}

/// Attaches, and takes the ring of `ConntrackDropEvent`s.
pub fn open(probes: &mut Probes) -> anyhow::Result<EventRing> {
    attach(probes)?;
    probes.take_ring(common::EVENTS)
}

/// Why netfilter dropped a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// A new entry lost a clash when it was confirmed (e.g. two flows SNATed to one port).
    InsertFailed,
    /// No entry could be allocated: the namespace's table held `nf_conntrack_max` entries.
    TableFull,
    /// A DROP verdict from a ruleset.
    Rule,
    /// The counters needed to tell the causes apart could not be read.
    Other,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::InsertFailed => "insert_failed",
            Cause::TableFull => "table_full",
            Cause::Rule => "rule",
            Cause::Other => "other",
        }
    }
}

/// The DNS query a dropped packet carried.
#[derive(Clone, Debug, Serialize)]
pub struct DnsLink {
    pub id: u16,
    /// Known when the query was still waiting for its answer.
    pub qname: Option<String>,
}

/// One packet dropped by netfilter, as reported.
#[derive(Clone, Debug, Serialize)]
pub struct ConntrackDrop {
    pub time: String,
    #[serde(skip)]
    pub time_unix_nano: u64,
    pub cause: Cause,
    pub proto: String,
    /// The flow as its sender sent it (the conntrack entry's original tuple when there is one).
    pub src: String,
    pub sport: u16,
    pub dst: String,
    pub dport: u16,
    pub netns: u64,
    /// Whose packet it was: the sending socket's cgroup and pod, when seen on this node.
    pub cgroup: Option<String>,
    pub workload: String,
    pub pod: Option<Arc<PodRef>>,
    /// How the sender was found (`unattributed`: not, and why: then `workload` is
    /// `unattributed` and no pod is named).
    pub sender: Sender,
    pub evidence: String,
    pub dns: Option<DnsLink>,
}

/// Clashes the kernel resolved in one namespace since the previous report.
#[derive(Clone, Debug, Serialize)]
pub struct ClashesResolved {
    pub time: String,
    #[serde(skip)]
    pub key: NetnsKey,
    /// The namespace's inode; null where faultline cannot learn it (another user's namespace
    /// without CAP_SYS_PTRACE, before the kernel named it in a drop).
    pub netns: Option<u64>,
    pub count: u64,
    pub workload: String,
}

/// A namespace's conntrack table at the last poll.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtTable {
    pub key: NetnsKey,
    /// The namespace's inode, where known.
    pub netns: Option<u64>,
    pub workload: String,
    pub entries: u64,
    /// `nf_conntrack_max`: each namespace's own count is held to it.
    pub max: u64,
    /// The namespace's counters (since it was made) at the poll.
    pub counters: CtCounters,
    /// Where they were read.
    pub source: ctstats::Source,
}

/// A namespace's inode for a line of text: `?` where not known.
pub fn netns_text(inode: Option<u64>) -> String {
    inode.map_or_else(|| "?".to_owned(), |i| i.to_string())
}

/// "network namespace <inode>", or where the inode is not known here, "its network namespace".
pub fn netns_phrase(inode: Option<u64>) -> String {
    match inode {
        Some(i) => format!("network namespace {i}"),
        None => "its network namespace (inode not readable without CAP_SYS_PTRACE)".to_owned(),
    }
}

impl CtTable {
    /// The table as a limit's resource: `netns:<inode>`, or where the inode is not known
    /// here `netns:procfs:<key>`.
    pub fn resource(&self) -> String {
        match self.netns {
            Some(inode) => format!("netns:{inode}"),
            None => format!("netns:procfs:{}", self.key.0),
        }
    }
}

/// One namespace's counters as far as drops explained them, and its last two reads.
#[derive(Clone, Copy, Debug, Default)]
struct Accounted {
    seen: CtCounters,
    /// The counters at the last read, and at the one before.
    reads: [Option<CtCounters>; 2],
}

impl From<CtCounters> for Accounted {
    fn from(c: CtCounters) -> Self {
        Accounted {
            seen: c,
            reads: [None; 2],
        }
    }
}

impl Accounted {
    /// A read after a batch: what the read before the last one counted and no event has
    /// explained since is written off (its events were lost). An increase read now may have
    /// its events in the next batches: the ring reader wakes between them.
    fn read(&mut self, c: CtCounters) {
        if let Some(old) = self.reads[1] {
            let s = &mut self.seen;
            s.insert_failed = s.insert_failed.max(old.insert_failed);
            s.drop = s.drop.max(old.drop);
            s.chaintoolong = s.chaintoolong.max(old.chaintoolong);
        }
        self.reads = [Some(c), self.reads[0]];
    }
}

/// The counters of namespace `key` (inode `inode`), through the process the directory knows
/// in it; where that one has exited (a sender refused at its drop often exits at once: the
/// kernel named it, and it is gone before its batch is read), through one a rescan finds.
fn read_counters(
    netns: &mut NetnsDirectory,
    key: NetnsKey,
    inode: u64,
) -> anyhow::Result<CtCounters> {
    let ns = netns
        .get(key)
        .ok_or_else(|| anyhow::anyhow!("network namespace {inode} not found"))?;
    ctstats::read(&ns)
        .or_else(|gone| match netns.after_exit(key) {
            Some(ns) => ctstats::read(&ns),
            None => Err(gone),
        })
        .map(|(c, _)| c)
}

/// Conntrack's part of a refresh: its counters (`lost`, its ring's drops, added), the node's
/// table and every namespace's at the last poll.
pub fn refresh(
    classifier: &mut Classifier,
    probes: &Probes,
    lost: u64,
) -> anyhow::Result<ConntrackRefresh> {
    let mut stats: ConntrackStats = probes.stats()?;
    stats.lost += lost;
    Ok(ConntrackRefresh {
        stats,
        node: classifier.node_counters(),
        tables: classifier.tables.clone(),
    })
}

/// Decides causes; owns the namespaces and the counters already accounted for.
pub struct Classifier {
    pub netns: NetnsDirectory,
    clock: KernelClock,
    /// Per namespace: the counters up to which drops have been explained.
    accounted: HashMap<NetnsKey, Accounted>,
    /// Per namespace: `clash_resolve` at the last near-miss report.
    clashes: HashMap<NetnsKey, u64>,
    last_clash_poll: Option<Instant>,
    /// Every namespace's table at the last poll.
    tables: Vec<CtTable>,
}

impl Classifier {
    /// Takes every namespace's counters now, so that later increments are this run's.
    pub fn new(mut netns: NetnsDirectory) -> Self {
        let mut accounted = HashMap::new();
        for ns in netns.all() {
            if let Ok((c, _)) = ctstats::read(&ns) {
                accounted.insert(ns.key, Accounted::from(c));
            }
        }
        let clashes = accounted
            .iter()
            .map(|(k, a)| (*k, a.seen.clash_resolve))
            .collect();
        Classifier {
            netns,
            clock: KernelClock::new(),
            accounted,
            clashes,
            last_clash_poll: None,
            tables: Vec::new(),
        }
    }

    /// Causes for one batch of drops, from the entry's state at the drop and the namespace's
    /// counters, read once per namespace after the batch (the kernel counts before it frees
    /// the packet, so every drop of the batch is already in them):
    /// - an unconfirmed entry is `insert_failed` while unexplained `insert_failed` increments
    ///   remain, else a rule dropped the new flow;
    /// - no entry is `table_full` while unexplained `drop` increments remain (an allocation
    ///   that failed; `drop` also counts lost clashes, which are subtracted), else a rule
    ///   (or raw-table) drop before conntrack;
    /// - a confirmed entry is a rule drop of an established flow.
    fn classify(&mut self, batch: &[ConntrackDropEvent]) -> Vec<(Cause, String)> {
        let mut now: HashMap<NetnsKey, anyhow::Result<CtCounters>> = HashMap::new();
        let mut out = Vec::with_capacity(batch.len());
        for ev in batch {
            let inode = u64::from(ev.netns);
            // The key the kernel gave, with what it says of the namespace; without one (no
            // procfs details on this kernel), the namespace of that inode.
            let key = if ev.proc_ino != 0 {
                let key = NetnsKey(u64::from(ev.proc_ino));
                let witness = (ev.witness_tgid != 0).then_some(ev.witness_tgid);
                self.netns.learn(key, inode, witness);
                Some(key)
            } else {
                self.netns.by_inode(inode).map(|n| n.key)
            };
            let nat = nat_note(ev);
            if ev.ct_state == CT_CONFIRMED {
                out.push((
                    Cause::Rule,
                    format!("established flow{nat}, entry confirmed"),
                ));
                continue;
            }
            let Some(key) = key else {
                out.push((
                    Cause::Other,
                    format!("dropped{nat}; network namespace {inode} not found"),
                ));
                continue;
            };
            let counters = now
                .entry(key)
                .or_insert_with(|| read_counters(&mut self.netns, key, inode));
            let c = match counters {
                Ok(c) => *c,
                Err(e) => {
                    out.push((
                        Cause::Other,
                        format!(
                            "dropped{nat}; conntrack counters unreadable: {}",
                            loader::brief(e)
                        ),
                    ));
                    continue;
                }
            };
            let seen = &mut self.accounted.entry(key).or_default().seen;
            out.push(verdict(ev.ct_state, &c, seen, &nat));
        }
        for (key, c) in now {
            if let Ok(c) = c {
                self.accounted.entry(key).or_default().read(c);
            }
        }
        out
    }

    /// Whether a drop's packet came in where its namespace routes its source address (none:
    /// a locally sent packet without a socket, or the routes unreadable through any process
    /// of the namespace).
    fn arrived_where_routed(&mut self, ev: &ConntrackDropEvent) -> Option<bool> {
        if ev.local != 0 || ev.iif == 0 {
            return None;
        }
        let ns = if ev.proc_ino != 0 {
            self.netns.get(NetnsKey(u64::from(ev.proc_ino)))
        } else {
            self.netns.by_inode(u64::from(ev.netns))
        }?;
        let (src, iif) = (ip(flow_of(ev), true), ev.iif);
        origin::arrived_where_routed(&ns, src, iif)
            .or_else(|gone| match self.netns.after_exit(ns.key) {
                Some(ns) => origin::arrived_where_routed(&ns, src, iif),
                None => Err(gone),
            })
            .ok()
            .flatten()
    }

    /// The refusal counters of every namespace's table at the last poll (by namespace key),
    /// for the cross-check with the drops explained.
    pub fn refusal_counts(&self) -> Vec<(u64, [(Counter, u64); 3])> {
        self.tables
            .iter()
            .map(|t| {
                let c = &t.counters;
                let counts = [
                    (Counter::ConntrackInsertFailed, c.insert_failed),
                    (Counter::ConntrackDrop, c.drop),
                    (Counter::ConntrackEarlyDrop, c.early_drop),
                ];
                (t.key.0, counts)
            })
            .collect()
    }

    /// The node's namespace's counters (pid 1's), when readable.
    fn node_counters(&mut self) -> Option<CtCounters> {
        let node = self.netns.node().ok()?;
        ctstats::read(&node).ok().map(|(c, _)| c)
    }

    /// Near-misses: every namespace whose `clash_resolve` rose since the last poll (at most
    /// once per `every`).
    pub fn poll_clashes(
        &mut self,
        every: Duration,
        attributor: &mut Attributor,
    ) -> Vec<ClashesResolved> {
        if self.last_clash_poll.is_some_and(|t| t.elapsed() < every) {
            return Vec::new();
        }
        self.last_clash_poll = Some(Instant::now());
        let mut out = Vec::new();
        // A namespace's owner does not change: the last poll's names are reused, so each
        // namespace's processes are read once in its life, not once per poll.
        let mut known: HashMap<NetnsKey, String> =
            self.tables.drain(..).map(|t| (t.key, t.workload)).collect();
        let all = self.netns.all();
        // Namespaces gone since are forgotten (their key may be reused by a new one).
        let live: std::collections::HashSet<NetnsKey> = all.iter().map(|n| n.key).collect();
        self.clashes.retain(|key, _| live.contains(key));
        self.accounted.retain(|key, _| live.contains(key));
        crate::memory::shrink(&mut self.clashes);
        crate::memory::shrink(&mut self.accounted);
        for ns in all {
            let Ok((c, source)) = ctstats::read(&ns) else {
                continue;
            };
            // A namespace first seen now starts from zero: it was created while we watched.
            let last = self.clashes.insert(ns.key, c.clash_resolve).unwrap_or(0);
            let workload = known
                .remove(&ns.key)
                .unwrap_or_else(|| netns_workload(&ns, attributor));
            if c.clash_resolve > last {
                out.push(ClashesResolved {
                    time: clock::now_rfc3339(),
                    key: ns.key,
                    netns: ns.inode,
                    count: c.clash_resolve - last,
                    workload: workload.clone(),
                });
            }
            self.tables.push(CtTable {
                key: ns.key,
                netns: ns.inode,
                workload,
                entries: c.entries,
                max: c.max,
                counters: c,
                source,
            });
        }
        out
    }
}

/// The cause of a drop of a packet whose entry was not confirmed (`ct_state`), from its
/// namespace's counters now (`c`) and those already explained (`seen`, advanced by this one).
fn verdict(ct_state: u8, c: &CtCounters, seen: &mut CtCounters, nat: &str) -> (Cause, String) {
    let fill = format!("entries={} nf_conntrack_max={}", c.entries, c.max);
    if ct_state == CT_NONE {
        // Lost clashes count in `drop` too; chain-too-long failures do not.
        let clash_drops = c
            .insert_failed
            .saturating_sub(c.chaintoolong)
            .saturating_sub(seen.insert_failed.saturating_sub(seen.chaintoolong));
        if c.drop.saturating_sub(seen.drop) > clash_drops {
            seen.drop += 1;
            return (
                Cause::TableFull,
                format!("no conntrack entry could be allocated, {fill}"),
            );
        }
        return (
            Cause::Rule,
            format!("no conntrack entry (dropped before conntrack or untracked), {fill}"),
        );
    }
    if c.insert_failed > seen.insert_failed {
        seen.insert_failed += 1;
        // A lost clash also counts in `drop`; a chain too long does not.
        let chain = if c.chaintoolong > seen.chaintoolong {
            seen.chaintoolong += 1;
            ", hash chain too long"
        } else {
            seen.drop += 1;
            ""
        };
        return (
            Cause::InsertFailed,
            format!(
                "new entry lost the clash at confirmation{nat}{chain}; insert_failed={} in netns",
                c.insert_failed
            ),
        );
    }
    (
        Cause::Rule,
        format!(
            "new flow{nat} dropped before confirmation, insert_failed unchanged ({})",
            c.insert_failed
        ),
    )
}

/// The workload of a namespace: the pod of a process in it, else [`Netns::label`] (or its
/// `/run/netns` name).
fn netns_workload(ns: &Netns, attributor: &mut Attributor) -> String {
    if let Some(pid) = ns.pid
        && let Some(path) = process_cgroup(pid, attributor)
    {
        let a = attributor.attribute_path(&path);
        if a.pod.is_some() || pid != 1 {
            return a.workload;
        }
        return "node".to_owned();
    }
    match ns
        .path
        .as_ref()
        .and_then(|p| p.parent())
        .and_then(|p| p.to_str())
    {
        Some("/run/netns" | "/var/run/netns") => format!(
            "netns:{}",
            ns.path
                .as_ref()
                .and_then(|p| p.file_name())
                .and_then(|n| n.to_str())
                .unwrap_or("?")
        ),
        _ => ns.label(),
    }
}

/// The cgroup v2 path of a process. In a private cgroup namespace (the DaemonSet's) a cgroup
/// outside it reads `/../..`-relative in `/proc/<pid>/cgroup`: below a common ancestor that is
/// the root (a node's pods and ours are under it), the rest is the path, which the process's
/// presence in that cgroup's `cgroup.procs` confirms; otherwise none, rather than a wrong one.
fn process_cgroup(pid: u32, attributor: &Attributor) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mut rest = path;
    while let Some(r) = rest.strip_prefix("/..") {
        rest = r;
    }
    if rest.len() == path.len() {
        return Some(path.to_owned());
    }
    let root = attributor
        .cgroups
        .mount(crate::attribution::cgroups::Hierarchy::Unified)?;
    let procs = std::fs::read_to_string(
        root.path
            .join(rest.trim_start_matches('/'))
            .join("cgroup.procs"),
    )
    .ok()?;
    procs
        .lines()
        .any(|l| l.trim() == pid.to_string())
        .then(|| rest.to_owned())
}

/// `, SNAT a:p -> b:q` when the entry's reply tuple shows an address translation.
fn nat_note(ev: &ConntrackDropEvent) -> String {
    const SRC_NAT: u32 = 1 << 4;
    const DST_NAT: u32 = 1 << 5;
    if ev.orig.family == 0 {
        return String::new();
    }
    let mut notes = Vec::new();
    // The reply goes to the translated source.
    if ev.ct_status & SRC_NAT != 0
        || ev.reply.daddr != ev.orig.saddr
        || ev.reply.dport != ev.orig.sport
    {
        notes.push(format!(
            "SNAT {} -> {}",
            endpoint(&ev.orig, true),
            endpoint(&ev.reply, false)
        ));
    }
    if ev.ct_status & DST_NAT != 0
        || ev.reply.saddr != ev.orig.daddr
        || ev.reply.sport != ev.orig.dport
    {
        notes.push(format!(
            "DNAT {} -> {}",
            endpoint(&ev.orig, false),
            endpoint(&ev.reply, true)
        ));
    }
    if notes.is_empty() {
        String::new()
    } else {
        format!(", {}", notes.join(", "))
    }
}

fn ip(k: &FlowKey, source: bool) -> IpAddr {
    super::ip(k.family, if source { &k.saddr } else { &k.daddr })
}

/// `addr:port` of one side of a tuple (`[v6]:port` for IPv6).
fn endpoint(k: &FlowKey, source: bool) -> String {
    let port = u16::from_be(if source { k.sport } else { k.dport });
    std::net::SocketAddr::new(ip(k, source), port).to_string()
}

fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        n => n.to_string(),
    }
}

/// The flow a drop belongs to: its entry's original tuple (what the sender sent), else the
/// packet's own headers.
fn flow_of(ev: &ConntrackDropEvent) -> &FlowKey {
    if ev.ct_state == CT_NONE {
        &ev.packet
    } else {
        &ev.orig
    }
}

/// Enriches one drop with its verdict. The sender ([`origin`]): the socket the kernel ties to
/// the flow, else the pod that has its source address if the packet arrived where that
/// address is routed (`routed`, checked by the caller), else none.
fn report(
    ev: &ConntrackDropEvent,
    (cause, evidence): (Cause, String),
    routed: Option<bool>,
    clock: &KernelClock,
    attributor: &mut Attributor,
    dns: Option<&mut DnsTracker>,
) -> ConntrackDrop {
    let flow = flow_of(ev);
    let src = ip(flow, true).to_string();
    let unattributed = |why| {
        (
            None,
            crate::attribution::pods::Attribution {
                workload: "unattributed".to_owned(),
                pod: None,
            },
            why,
        )
    };
    let (cgroup, who, sender) = if ev.owner.cgroup_id != 0 {
        let (path, a) = attributor.attribute(ev.owner.cgroup_id, None);
        (path, a, Sender::Socket)
    } else {
        match (attributor.attribute_ip(&src), routed) {
            (Some(a), Some(true)) => (None, a, Sender::RoutedAddress),
            (Some(_), Some(false)) => unattributed(Sender::SourceNotRouted),
            (Some(_), None) => unattributed(Sender::RoutesUnreadable),
            (None, _) => unattributed(Sender::UnknownSource),
        }
    };
    let is_dns = flow.proto == 17 && u16::from_be(flow.dport) == 53 && ev.owner.socket_cookie != 0;
    let dns = is_dns.then(|| DnsLink {
        id: ev.dns_id,
        qname: dns
            .and_then(|t| t.note_conntrack_drop(ev.owner.socket_cookie, ev.dns_id, cause.as_str())),
    });
    let ifname = crate::text::c_string(&ev.ifname);
    let path = if ev.local != 0 {
        "from a local socket".to_owned()
    } else if ev.iif != 0 && ev.iif != ev.ifindex {
        format!("forwarded, on {ifname}")
    } else {
        format!("received on {ifname}")
    };
    ConntrackDrop {
        time: clock.rfc3339(ev.ktime_ns),
        time_unix_nano: clock.unix_nano(ev.ktime_ns),
        cause,
        proto: proto_name(flow.proto),
        src,
        sport: u16::from_be(flow.sport),
        dst: ip(flow, false).to_string(),
        dport: u16::from_be(flow.dport),
        netns: ev.netns as u64,
        cgroup,
        workload: who.workload,
        pod: who.pod,
        evidence: match (sender, sender.unattributed()) {
            (_, Some(why)) => format!("{evidence}; {path}; unattributed: {why}"),
            (Sender::RoutedAddress, None) => format!(
                "{evidence}; {path}; sender by pod IP (it came in where that address is routed)"
            ),
            (_, None) => format!("{evidence}; {path}"),
        },
        sender,
        dns,
    }
}

/// Decodes, classifies and enriches every drop of a batch, in order.
pub fn deliver(
    batch: &Batch,
    classifier: &mut Classifier,
    attributor: &mut Attributor,
    mut dns: Option<&mut DnsTracker>,
    mut emit: impl FnMut(Event) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut drops = Vec::new();
    loader::decode_each(
        batch.records(),
        "a conntrack drop",
        |ev: ConntrackDropEvent| {
            drops.push(ev);
            Ok(())
        },
    )?;
    if drops.is_empty() {
        return Ok(());
    }
    let verdicts = classifier.classify(&drops);
    for (ev, verdict) in drops.iter().zip(verdicts) {
        let routed = (ev.owner.cgroup_id == 0)
            .then(|| classifier.arrived_where_routed(ev))
            .flatten();
        let clock = &classifier.clock;
        emit(Event::ConntrackDrop(report(
            ev,
            verdict,
            routed,
            clock,
            attributor,
            dns.as_deref_mut(),
        )))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use probe_common::conntrack::CT_UNCONFIRMED;

    use super::*;

    fn failed(n: u64) -> CtCounters {
        CtCounters {
            insert_failed: n,
            drop: n,
            ..CtCounters::default()
        }
    }

    /// Three drops read at once, their events in two batches: each is an insert failure.
    /// An increase no event explains within two reads is written off (its event was lost),
    /// and a later rule drop is not taken for it.
    #[test]
    fn increases_wait_two_reads_for_their_events() {
        let mut a = Accounted::from(failed(0));
        let c = failed(3);
        assert_eq!(
            verdict(CT_UNCONFIRMED, &c, &mut a.seen, "").0,
            Cause::InsertFailed
        );
        a.read(c);
        for _ in 0..2 {
            assert_eq!(
                verdict(CT_UNCONFIRMED, &c, &mut a.seen, "").0,
                Cause::InsertFailed
            );
        }
        a.read(c);
        // One more increase whose event is lost: read at three batches (each of rule drops),
        // it is written off at the third, and a rule drop then is not taken for it.
        let c = failed(4);
        for _ in 0..3 {
            a.read(c);
        }
        assert_eq!(verdict(CT_UNCONFIRMED, &c, &mut a.seen, "").0, Cause::Rule);
    }
}
