//! The HTTP server's connection table: which peer holds each slot, what each connection is
//! doing, and which one goes when a new one needs a slot. Nobody is refused: a new connection
//! always gets a slot, and the one shed for it is the oldest idle connection (else the oldest
//! unfinished one) of the peer holding the most, so that filling the table costs the filler
//! its own connections, never the kubelet's probe or a scrape in flight.
//!
//! The slots come in two pools: [`NODE_SLOTS`] for the node itself (a peer on loopback, or at
//! the very address it connected to: the daemon runs with hostNetwork, so the kubelet's probes
//! come from the node's IP) and the rest of [`MAX_CONNECTIONS`] for everyone else (pods,
//! Prometheus), so no pod can take the slots of the kubelet's probes. In either pool one peer
//! address holds at most [`MAX_PER_PEER`]. Every shed connection is counted by reason.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Instant,
};

use prometheus::IntCounterVec;
use tokio::sync::Notify;

/// Connections served at once, both pools together. Prometheus and the kubelet's probes need
/// a handful; the rest of the node's fd budget stays for the probes and the refresh, and each
/// connection's memory is bounded (`serve`), so this bounds the server's.
pub const MAX_CONNECTIONS: usize = 256;
/// Of MAX_CONNECTIONS, the slots only the node itself can use: the kubelet's probes (one
/// connection each, every few seconds), a node-local scraper, `faultline explain` on the node.
pub const NODE_SLOTS: usize = 32;
/// Connections served at once to one peer address (a pod, the node, Prometheus).
pub const MAX_PER_PEER: usize = 16;
/// Responses copying out an `/explain` answer at once. Each window is an answer of its own
/// (up to a few MB for a history of 4,096 tallies), so readers that never read, each with a
/// new `since`, would each hold one; past this the longest reading one is shed. `faultline
/// explain` on call needs one.
pub const MAX_EXPLAIN_READERS: usize = 4;

/// Why the server closed a connection: the `reason` label of
/// `faultline_http_shed_connections_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShedReason {
    /// Its peer had MAX_PER_PEER connections open and opened another.
    PeerFull,
    /// Every slot of its pool was taken and another peer connected.
    SlotsFull,
    /// It was still reading an exposition two generations old when a new one was needed, or
    /// the oldest of MAX_EXPLAIN_READERS `/explain` answers when another was handed out.
    SlowReader,
}

impl ShedReason {
    pub const ALL: [ShedReason; 3] = [
        ShedReason::PeerFull,
        ShedReason::SlotsFull,
        ShedReason::SlowReader,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ShedReason::PeerFull => "peer_full",
            ShedReason::SlotsFull => "slots_full",
            ShedReason::SlowReader => "slow_reader",
        }
    }
}

/// The pool a connection's slot comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// The node itself: loopback, or the address the connection arrived at.
    Node,
    /// Pods, Prometheus, anyone else.
    Others,
}

impl Pool {
    /// The pool of a connection from `peer` accepted at `local` (both canonical: an
    /// IPv4-mapped IPv6 address is its IPv4 address).
    pub fn of(peer: IpAddr, local: IpAddr) -> Pool {
        if peer.is_loopback() || peer == local {
            Pool::Node
        } else {
            Pool::Others
        }
    }

    fn slots(self) -> usize {
        match self {
            Pool::Node => NODE_SLOTS,
            Pool::Others => MAX_CONNECTIONS - NODE_SLOTS,
        }
    }
}

/// The shared text a busy connection's response is copying out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// The exposition of this generation.
    Exposition(u64),
    /// An `/explain` answer.
    Explain,
}

/// One connection in the table.
struct Entry {
    peer: IpAddr,
    pool: Pool,
    /// Requests being answered whose responses are not yet copied out in full.
    busy: u32,
    /// Since when it has been idle (accepted, or its last response copied out), or busy.
    since: Instant,
    /// What its response is copying out, if anything shared.
    holds: Option<Held>,
    /// Told when it is shed: its task then closes it.
    shed: Arc<Notify>,
}

impl Entry {
    /// Which goes first: an idle connection before a busy one, the longest idle or the
    /// longest unfinished first.
    fn shed_order(&self) -> (bool, Instant) {
        (self.busy > 0, self.since)
    }
}

#[derive(Default)]
struct Table {
    entries: HashMap<u64, Entry>,
    next_id: u64,
}

/// Every connection being served, and the count of those shed.
pub struct Connections {
    table: Mutex<Table>,
    shed: IntCounterVec,
}

/// A connection's slot; given back when dropped (the connection closed).
pub struct Admitted {
    connections: Arc<Connections>,
    pub id: u64,
    /// Notified when the connection is shed: close it.
    pub shed: Arc<Notify>,
}

/// A request being answered on a connection: the connection counts as unfinished, not
/// idle, until this is dropped (the response body copied out in full, or the connection
/// gone).
pub struct Busy {
    connections: Arc<Connections>,
    id: u64,
}

impl Connections {
    /// An empty table; `shed` is `faultline_http_shed_connections_total`, by reason.
    pub fn new(shed: IntCounterVec) -> Arc<Connections> {
        for reason in ShedReason::ALL {
            // Every reason shows in /metrics from the start, at 0.
            shed.with_label_values(&[reason.as_str()]);
        }
        Arc::new(Connections {
            table: Mutex::new(Table::default()),
            shed,
        })
    }

    /// The table; a panic elsewhere while it was held leaves it consistent (every change
    /// is one insert or remove), so a poisoned lock is used as it is.
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a new connection from `peer`, always: when its peer already holds
    /// MAX_PER_PEER, that peer's first connection in shed order goes; when its pool is full,
    /// the first in shed order of the peer holding the most of the pool.
    pub fn admit(self: &Arc<Self>, peer: IpAddr, pool: Pool) -> Admitted {
        let mut table = self.table();
        let mut in_pool = 0;
        let mut of_peer = 0;
        for e in table.entries.values().filter(|e| e.pool == pool) {
            in_pool += 1;
            of_peer += usize::from(e.peer == peer);
        }
        let victim = if of_peer >= MAX_PER_PEER {
            first_to_shed(table.entries.iter().filter(|(_, e)| e.peer == peer))
                .map(|id| (id, ShedReason::PeerFull))
        } else if in_pool >= pool.slots() {
            largest_peers_first(&table, pool).map(|id| (id, ShedReason::SlotsFull))
        } else {
            None
        };
        if let Some((id, reason)) = victim {
            self.shed_locked(&mut table, id, reason);
        }
        let id = table.next_id;
        table.next_id += 1;
        let shed = Arc::new(Notify::new());
        table.entries.insert(
            id,
            Entry {
                peer,
                pool,
                busy: 0,
                since: Instant::now(),
                holds: None,
                shed: shed.clone(),
            },
        );
        Admitted {
            connections: self.clone(),
            id,
            shed,
        }
    }

    /// Marks connection `id` busy until the returned guard is dropped.
    pub fn busy(self: &Arc<Self>, id: u64) -> Busy {
        if let Some(e) = self.table().entries.get_mut(&id) {
            if e.busy == 0 {
                e.since = Instant::now();
            }
            e.busy += 1;
        }
        Busy {
            connections: self.clone(),
            id,
        }
    }

    /// Sheds every connection still copying out an exposition older than `generation`;
    /// returns how many.
    pub fn shed_holders_before(&self, generation: u64) -> usize {
        let mut table = self.table();
        let old: Vec<u64> = table
            .entries
            .iter()
            .filter(|(_, e)| matches!(e.holds, Some(Held::Exposition(g)) if g < generation))
            .map(|(id, _)| *id)
            .collect();
        for id in &old {
            self.shed_locked(&mut table, *id, ShedReason::SlowReader);
        }
        old.len()
    }

    /// Out of the table at once (its slot is free for the newcomer), and told to close.
    fn shed_locked(&self, table: &mut Table, id: u64, reason: ShedReason) {
        if let Some(e) = table.entries.remove(&id) {
            e.shed.notify_one();
            self.shed.with_label_values(&[reason.as_str()]).inc();
        }
    }

    /// Connections open (tests).
    #[cfg(test)]
    fn open(&self) -> usize {
        self.table().entries.len()
    }

    /// Whether connection `id` holds a slot (tests).
    #[cfg(test)]
    fn holds_slot(&self, id: u64) -> bool {
        self.table().entries.contains_key(&id)
    }
}

/// The id of the first connection in shed order among `entries`.
fn first_to_shed<'a>(entries: impl Iterator<Item = (&'a u64, &'a Entry)>) -> Option<u64> {
    entries
        .min_by_key(|(_, e)| e.shed_order())
        .map(|(id, _)| *id)
}

/// In `pool`, the first connection in shed order of the peer holding the most (of two
/// peers holding as many, the one whose connection is first in shed order).
fn largest_peers_first(table: &Table, pool: Pool) -> Option<u64> {
    // Per peer: connections held, and its first in shed order.
    let mut peers: HashMap<IpAddr, (usize, (bool, Instant), u64)> = HashMap::new();
    for (id, e) in table.entries.iter().filter(|(_, e)| e.pool == pool) {
        let order = e.shed_order();
        let p = peers.entry(e.peer).or_insert((0, order, *id));
        p.0 += 1;
        if order < p.1 {
            (p.1, p.2) = (order, *id);
        }
    }
    peers
        .into_values()
        .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
        .map(|(_, _, id)| id)
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.connections.table().entries.remove(&self.id);
    }
}

impl Busy {
    /// This response copies out `held` until the guard is dropped. An `/explain` answer past
    /// MAX_EXPLAIN_READERS sheds the longest reading one first.
    pub fn hold(&self, held: Held) {
        let connections = &self.connections;
        let mut table = connections.table();
        if held == Held::Explain {
            loop {
                let readers = table
                    .entries
                    .iter()
                    .filter(|(id, e)| **id != self.id && e.holds == Some(Held::Explain));
                if readers.clone().count() < MAX_EXPLAIN_READERS {
                    break;
                }
                let Some(oldest) = first_to_shed(readers) else {
                    break;
                };
                connections.shed_locked(&mut table, oldest, ShedReason::SlowReader);
            }
        }
        if let Some(e) = table.entries.get_mut(&self.id) {
            e.holds = Some(held);
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(e) = self.connections.table().entries.get_mut(&self.id) {
            e.busy = e.busy.saturating_sub(1);
            if e.busy == 0 {
                e.since = Instant::now();
                e.holds = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Opts;

    fn table() -> Arc<Connections> {
        let shed = IntCounterVec::new(Opts::new("shed", "shed"), &["reason"]).unwrap();
        Connections::new(shed)
    }

    fn shed(c: &Connections, reason: ShedReason) -> u64 {
        c.shed.with_label_values(&[reason.as_str()]).get()
    }

    /// Whether `a` lost its slot.
    fn was_shed(a: &Admitted) -> bool {
        !a.connections.holds_slot(a.id)
    }

    /// Whether `a` was told to close (consumes the notification).
    fn told_to_close(a: &Admitted) -> bool {
        let notified = std::pin::pin!(a.shed.notified());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        std::future::Future::poll(notified, &mut cx).is_ready()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_node_is_loopback_or_the_address_connected_to() {
        let node = ip("10.0.0.5");
        assert_eq!(Pool::of(ip("127.0.0.9"), node), Pool::Node);
        assert_eq!(Pool::of(ip("::1"), ip("::1")), Pool::Node);
        assert_eq!(Pool::of(node, node), Pool::Node);
        assert_eq!(Pool::of(ip("10.0.0.7"), node), Pool::Others);
        assert_eq!(Pool::of(ip("10.0.0.7"), ip("127.0.0.1")), Pool::Others);
    }

    #[test]
    fn a_full_peer_sheds_its_own_oldest_idle_connection() {
        let c = table();
        let pod = ip("10.0.0.7");
        let held: Vec<Admitted> = (0..MAX_PER_PEER)
            .map(|_| c.admit(pod, Pool::Others))
            .collect();
        // The oldest is busy answering: the next oldest, idle, goes instead.
        let _busy = c.busy(held[0].id);
        let other = c.admit(ip("10.0.0.8"), Pool::Others);
        let newcomer = c.admit(pod, Pool::Others);
        assert!(
            !was_shed(&held[0]),
            "a busy connection went before an idle one"
        );
        assert!(was_shed(&held[1]));
        assert!(held[2..].iter().all(|a| !was_shed(a)));
        assert!(!was_shed(&other) && !was_shed(&newcomer));
        assert_eq!(shed(&c, ShedReason::PeerFull), 1);
        assert_eq!(c.open(), MAX_PER_PEER + 1);
        drop((held, other, newcomer));
        assert_eq!(c.open(), 0, "no entry left behind");
    }

    #[test]
    fn a_full_pool_sheds_from_the_peer_holding_the_most() {
        let c = table();
        let slots = MAX_CONNECTIONS - NODE_SLOTS;
        // Prometheus first, then pods filling every other slot.
        let prometheus = c.admit(ip("10.1.0.1"), Pool::Others);
        let mut pods: Vec<Admitted> = (0..slots - 1)
            .map(|i| {
                c.admit(
                    IpAddr::from([10, 2, (i / 10) as u8, (i % 10) as u8]),
                    Pool::Others,
                )
            })
            .collect();
        // One pod holds three: it is the one that pays.
        let greedy = ip("10.3.0.1");
        for _ in 0..3 {
            pods.remove(0);
            pods.push(c.admit(greedy, Pool::Others));
        }
        assert_eq!(c.open(), slots);
        let late = c.admit(ip("10.1.0.2"), Pool::Others);
        assert!(
            !was_shed(&prometheus),
            "a peer with one connection was shed"
        );
        assert_eq!(pods.iter().filter(|a| was_shed(a)).count(), 1);
        assert!(
            pods[pods.len() - 3..].iter().any(was_shed),
            "the shed connection was not the greedy peer's"
        );
        assert_eq!(shed(&c, ShedReason::SlotsFull), 1);
        assert_eq!(c.open(), slots);
        // The node's slots are untouched by all of it.
        let probes: Vec<Admitted> = (0..NODE_SLOTS as u8)
            .map(|i| c.admit(IpAddr::from([127, 0, 0, i + 1]), Pool::Node))
            .collect();
        assert_eq!(shed(&c, ShedReason::SlotsFull), 1);
        assert_eq!(c.open(), MAX_CONNECTIONS);
        drop((prometheus, pods, late, probes));
        assert_eq!(c.open(), 0);
    }

    #[test]
    fn the_node_pool_full_of_loopback_peers_still_admits_the_probe() {
        let c = table();
        let attack: Vec<Admitted> = (0..16u8)
            .flat_map(|p| (0..16).map(move |_| IpAddr::from([127, 0, 1, p])))
            .map(|ip| c.admit(ip, Pool::Node))
            .collect();
        assert_eq!(c.open(), NODE_SLOTS);
        let probe = c.admit(ip("127.0.0.1"), Pool::Node);
        assert!(!was_shed(&probe));
        assert_eq!(c.open(), NODE_SLOTS);
        assert_eq!(
            shed(&c, ShedReason::SlotsFull) as usize,
            attack.len() + 1 - NODE_SLOTS
        );
    }

    #[test]
    fn readers_of_an_old_exposition_are_shed_and_idle_ones_kept() {
        let c = table();
        let slow = c.admit(ip("10.0.0.7"), Pool::Others);
        let current = c.admit(ip("10.0.0.8"), Pool::Others);
        let idle = c.admit(ip("10.0.0.9"), Pool::Others);
        let slow_busy = c.busy(slow.id);
        slow_busy.hold(Held::Exposition(1));
        let current_busy = c.busy(current.id);
        current_busy.hold(Held::Exposition(2));
        let done = c.busy(idle.id);
        done.hold(Held::Exposition(1));
        drop(done);
        assert_eq!(c.shed_holders_before(2), 1);
        assert!(was_shed(&slow) && told_to_close(&slow));
        assert!(!was_shed(&current) && !was_shed(&idle));
        assert!(!told_to_close(&current));
        assert_eq!(shed(&c, ShedReason::SlowReader), 1);
        drop(slow_busy);
        assert_eq!(c.open(), 2);
    }

    #[test]
    fn past_the_explain_readers_the_longest_reading_one_goes() {
        let c = table();
        let readers: Vec<(Admitted, Busy)> = (0..=MAX_EXPLAIN_READERS as u8)
            .map(|i| {
                let a = c.admit(IpAddr::from([10, 0, 0, i + 1]), Pool::Others);
                let busy = c.busy(a.id);
                busy.hold(Held::Explain);
                (a, busy)
            })
            .collect();
        assert!(
            was_shed(&readers[0].0),
            "the first reader still holds its answer"
        );
        assert!(readers[1..].iter().all(|(a, _)| !was_shed(a)));
        assert_eq!(shed(&c, ShedReason::SlowReader), 1);
        // Exposition readers are not counted among them.
        let scraper = c.admit(ip("10.0.1.1"), Pool::Others);
        let scraping = c.busy(scraper.id);
        scraping.hold(Held::Exposition(1));
        assert_eq!(shed(&c, ShedReason::SlowReader), 1);
        drop((readers, scraping, scraper));
        assert_eq!(c.open(), 0);
    }
}
