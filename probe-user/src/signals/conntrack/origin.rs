//! Whose a dropped packet is. The kernel ties a packet to a sender in two ways a pod cannot
//! forge: the local socket still holding it, and the socket the DNS egress program saw send
//! the flow (never a raw socket's). A source address is written by whoever wrote the packet:
//! it names a pod only when the packet arrived on the interface the dropping namespace routes
//! that address through (a reverse-path check, from its `/proc/<pid>/net/route` or
//! `ipv6_route`; another pod's packet comes in on its own interface). Anything else is
//! unattributed, with the reason, and raises no Kubernetes Event.

use std::net::IpAddr;

use serde::Serialize;

use crate::attribution::netns::{self, Netns};

/// How a drop's sender was found, or why it was not (the last three: unattributed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Sender {
    /// The socket that sent the flow (seen leaving it, or still holding the packet).
    Socket,
    /// The pod that has the source address, which arrived where it is routed.
    RoutedAddress,
    /// No socket of this node sent it, and no pod has its source address.
    UnknownSource,
    /// Its source address is a pod's, but it did not arrive on the interface that address is
    /// routed through: anyone may write an address.
    SourceNotRouted,
    /// Its source address is a pod's, but the dropping namespace's routes could not be read.
    RoutesUnreadable,
}

impl Sender {
    /// Why the drop is not tied to a sender; none when it is.
    pub fn unattributed(self) -> Option<&'static str> {
        match self {
            Sender::Socket | Sender::RoutedAddress => None,
            Sender::UnknownSource => {
                Some("no socket on this node sent it and no pod has its source address")
            }
            Sender::SourceNotRouted => Some(
                "its source address is a pod's, but it came in on another interface than that address is routed through (an address anyone can write)",
            ),
            Sender::RoutesUnreadable => Some(
                "its source address is a pod's, but the namespace's routes could not be read to check where it came in",
            ),
        }
    }
}

/// Whether `src` came in on interface `iif` of namespace `ns` as its routes say it should:
/// the longest matching prefix of its main table goes through that interface. An error when
/// the routes cannot be read through the namespace's known process (it exited: the caller
/// may look for another); none when no route holds `src` or the interface has no name.
pub fn arrived_where_routed(ns: &Netns, src: IpAddr, iif: u32) -> anyhow::Result<Option<bool>> {
    let pid = ns
        .pid
        .ok_or_else(|| anyhow::anyhow!("no process known in the namespace"))?;
    let read = |file: &str| netns::read_proc_net(pid, ns.key, file);
    let (routes, names) = match src {
        IpAddr::V4(_) => (read("route")?, read("igmp").ok()),
        IpAddr::V6(_) => (read("ipv6_route")?, read("if_inet6").ok()),
    };
    let device = match src {
        IpAddr::V4(a) => route_v4(&routes, u32::from(a)),
        IpAddr::V6(a) => route_v6(&routes, u128::from(a)),
    };
    let name = match src {
        IpAddr::V4(_) => names.and_then(|t| name_from_igmp(&t, iif)),
        IpAddr::V6(_) => names.and_then(|t| name_from_if_inet6(&t, iif)),
    };
    Ok(device.zip(name).map(|(device, name)| device == name))
}

/// The interface of the longest IPv4 prefix holding `addr` in `/proc/net/route` (addresses and
/// masks in the kernel's byte order, printed as hex).
fn route_v4(text: &str, addr: u32) -> Option<String> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // The kernel prints each __be32 as the u32 it is in memory.
            let addr_of = |hex: &str| {
                let raw = u32::from_str_radix(hex, 16).ok()?;
                Some(u32::from_be_bytes(raw.to_ne_bytes()))
            };
            let (dest, mask) = (addr_of(f.get(1)?)?, addr_of(f.get(7)?)?);
            let dev = (*f.first()?).to_owned();
            (addr & mask == dest & mask).then_some((mask.count_ones(), dev))
        })
        .max_by_key(|(bits, _)| *bits)
        .map(|(_, dev)| dev)
}

/// The same for IPv6, from `/proc/net/ipv6_route` (destination, prefix length, ..., device).
fn route_v6(text: &str, addr: u128) -> Option<String> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = u128::from_str_radix(f.first()?, 16).ok()?;
            let len = u32::from_str_radix(f.get(1)?, 16).ok()?.min(128);
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            // Local and unreachable routes name `lo`: the prefix that sends packets out.
            let dev = (*f.get(9)?).to_owned();
            (addr & mask == dest & mask && dev != "lo").then_some((len, dev))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, dev)| dev)
}

/// An interface's name by index from `/proc/net/igmp` (every interface with IPv4 is listed:
/// `Idx\tDevice    : Count Querier`).
fn name_from_igmp(text: &str, ifindex: u32) -> Option<String> {
    text.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next()?.parse::<u32>().ok()? == ifindex)
            .then(|| f.next().map(|n| n.trim_end_matches(':').to_owned()))
            .flatten()
    })
}

/// The same from `/proc/net/if_inet6` (address, index in hex, ..., name).
fn name_from_if_inet6(text: &str, ifindex: u32) -> Option<String> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let name = (*f.get(5)?).to_owned();
        (u32::from_str_radix(f.get(1)?, 16).ok()? == ifindex).then_some(name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTE: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
cni0\t0000F40A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
cali1\t0500F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";

    #[test]
    fn the_longest_ipv4_prefix_names_the_interface() {
        let at = |a: [u8; 4]| route_v4(ROUTE, u32::from_be_bytes(a));
        assert_eq!(at([10, 244, 0, 5]).as_deref(), Some("cali1"));
        assert_eq!(at([10, 244, 0, 6]).as_deref(), Some("cni0"));
        assert_eq!(at([8, 8, 8, 8]).as_deref(), Some("eth0"));
    }

    #[test]
    fn ipv6_routes_and_interface_names_are_read() {
        let routes = "fd000077000200000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 fl1a2\n\
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n";
        let a: u128 = "fd00:77:2::2".parse::<std::net::Ipv6Addr>().unwrap().into();
        assert_eq!(route_v6(routes, a).as_deref(), Some("fl1a2"));
        let inet6 = "fd000077000200000000000000000001 0000000b 40 00 80     fl1a2\n";
        assert_eq!(name_from_if_inet6(inet6, 11).as_deref(), Some("fl1a2"));
        let igmp = "Idx\tDevice    : Count Querier\tGroup    Users Timer\tReporter\n1\tlo        :     1      V3\n\t\t\t\t010000E0     1 0:00000000\t\t0\n11\tfl1a2     :     1      V3\n";
        assert_eq!(name_from_igmp(igmp, 11).as_deref(), Some("fl1a2"));
        assert_eq!(name_from_igmp(igmp, 2), None);
    }

    #[test]
    fn routes_read_through_a_process_gone_are_an_error_the_caller_can_retry() {
        let key = netns::procfs_key(std::path::Path::new("/proc/self")).expect("our namespace");
        let ns = |pid| Netns {
            key,
            inode: None,
            path: None,
            pid: Some(pid),
        };
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawning true");
        let gone = child.id();
        child.wait().expect("reaping true");
        let src = IpAddr::from([127, 0, 0, 1]);
        assert!(arrived_where_routed(&ns(gone), src, 1).is_err());
        assert!(arrived_where_routed(&ns(std::process::id()), src, 1).is_ok());
    }
}
