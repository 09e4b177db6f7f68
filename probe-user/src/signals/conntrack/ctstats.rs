//! Conntrack counters of one network namespace: `insert_failed`, `drop`, `early_drop`,
//! `clash_resolve`, `search_restart`, `chaintoolong`, entries and the table's maximum. Read
//! through ctnetlink (works where `/proc/net/stat/nf_conntrack` is not built), with that procfs
//! file as the fallback.

use anyhow::{Context as _, bail, ensure};
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla as _,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    conntrack::ConntrackMessage,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use serde::Serialize;

use crate::attribution::netns::{self, Netns};

/// The kernel's conntrack statistics for one namespace, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CtCounters {
    pub insert_failed: u64,
    pub drop: u64,
    pub early_drop: u64,
    pub clash_resolve: u64,
    pub search_restart: u64,
    pub chaintoolong: u64,
    pub invalid: u64,
    pub entries: u64,
    /// `nf_conntrack_max` (host-wide).
    pub max: u64,
}

impl CtCounters {
    /// The counters by name, for metrics.
    pub fn named(&self) -> [(&'static str, u64); 7] {
        [
            ("insert_failed", self.insert_failed),
            ("drop", self.drop),
            ("early_drop", self.early_drop),
            ("clash_resolve", self.clash_resolve),
            ("search_restart", self.search_restart),
            ("chaintoolong", self.chaintoolong),
            ("invalid", self.invalid),
        ]
    }
}

/// Where the counters came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Netlink,
    Procfs,
}

impl Source {
    /// As a finding names the file it read.
    pub fn file(self) -> &'static str {
        match self {
            Source::Netlink => "ctnetlink",
            Source::Procfs => "net/stat/nf_conntrack",
        }
    }
}

const IPCTNL_MSG_CT_GET_STATS_CPU: u8 = 4;
const IPCTNL_MSG_CT_GET_STATS: u8 = 5;
const CTA_STATS_INVALID: u16 = 4;
const CTA_STATS_INSERT_FAILED: u16 = 9;
const CTA_STATS_DROP: u16 = 10;
const CTA_STATS_EARLY_DROP: u16 = 11;
const CTA_STATS_SEARCH_RESTART: u16 = 13;
const CTA_STATS_CLASH_RESOLVE: u16 = 14;
const CTA_STATS_CHAIN_TOOLONG: u16 = 15;
const CTA_STATS_GLOBAL_ENTRIES: u16 = 1;
const CTA_STATS_GLOBAL_MAX_ENTRIES: u16 = 2;

/// The counters of `ns`: ctnetlink from inside it where it can be entered (our own; others
/// with CAP_SYS_ADMIN), else its procfs file through a process in it (`/proc/<pid>/net` needs
/// no privilege; the kernel must have CONFIG_NF_CONNTRACK_PROCFS).
pub fn read(ns: &Netns) -> anyhow::Result<(CtCounters, Source)> {
    let netlink = match &ns.path {
        Some(path) => match netns::run_in(path, read_netlink) {
            Ok(c) => return Ok((c, Source::Netlink)),
            Err(e) => Some(e),
        },
        None => None,
    };
    let procfs = |pid: u32| -> anyhow::Result<CtCounters> {
        let text = netns::read_proc_net(pid, ns.key, "stat/nf_conntrack")?;
        let mut c = parse_procfs(&text)
            .with_context(|| format!("parsing /proc/{pid}/net/stat/nf_conntrack"))?;
        c.max = sysctl_max().unwrap_or(0);
        Ok(c)
    };
    let result = match ns.pid {
        Some(pid) => procfs(pid),
        None => Err(anyhow::anyhow!(
            "no process in the namespace for a procfs read"
        )),
    };
    match (result, netlink) {
        (Ok(c), _) => Ok((c, Source::Procfs)),
        (Err(e), Some(netlink)) => Err(e.context(format!("{netlink:#}"))),
        (Err(e), None) => Err(e),
    }
}

/// `nf_conntrack_max`, host-wide.
pub fn sysctl_max() -> anyhow::Result<u64> {
    let path = "/proc/sys/net/netfilter/nf_conntrack_max";
    std::fs::read_to_string(path)
        .with_context(|| format!("reading {path}"))?
        .trim()
        .parse()
        .with_context(|| format!("parsing {path}"))
}

/// Counters of the caller's network namespace through ctnetlink.
pub fn read_netlink() -> anyhow::Result<CtCounters> {
    let mut socket =
        Socket::new(NETLINK_NETFILTER).context("opening a netfilter netlink socket")?;
    socket.bind_auto().context("binding the netlink socket")?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .context("connecting the netlink socket")?;
    let mut c = CtCounters::default();
    for nla in request(&mut socket, IPCTNL_MSG_CT_GET_STATS_CPU, NLM_F_DUMP)? {
        let slot = match nla.0 {
            CTA_STATS_INSERT_FAILED => &mut c.insert_failed,
            CTA_STATS_DROP => &mut c.drop,
            CTA_STATS_EARLY_DROP => &mut c.early_drop,
            CTA_STATS_SEARCH_RESTART => &mut c.search_restart,
            CTA_STATS_CLASH_RESOLVE => &mut c.clash_resolve,
            CTA_STATS_CHAIN_TOOLONG => &mut c.chaintoolong,
            CTA_STATS_INVALID => &mut c.invalid,
            _ => continue,
        };
        *slot += nla.1;
    }
    for nla in request(&mut socket, IPCTNL_MSG_CT_GET_STATS, 0)? {
        match nla.0 {
            CTA_STATS_GLOBAL_ENTRIES => c.entries = nla.1,
            CTA_STATS_GLOBAL_MAX_ENTRIES => c.max = nla.1,
            _ => {}
        }
    }
    Ok(c)
}

/// Sends one ctnetlink request and returns every big-endian u32 attribute of every answer.
fn request(socket: &mut Socket, message_type: u8, flags: u16) -> anyhow::Result<Vec<(u16, u64)>> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    let mut packet = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, 0),
            ConntrackMessage::Other {
                message_type,
                attributes: vec![],
            },
        )),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket
        .send(&buf, 0)
        .context("sending a ctnetlink request")?;

    let mut out = Vec::new();
    let mut recv = vec![0u8; 16384];
    // A dump answers one message per CPU; bounded for a kernel that never says Done.
    for _ in 0..1024 {
        let n = socket
            .recv(&mut &mut recv[..], 0)
            .context("receiving a ctnetlink answer")?;
        if parse_answers(&recv[..n], flags & NLM_F_DUMP != 0, &mut out)? {
            return Ok(out);
        }
    }
    bail!("ctnetlink dump did not end")
}

/// One datagram of ctnetlink answers: every big-endian u32 attribute into `out`. True when
/// the answer is complete (Done, an ACK, or the one message of a non-dump request).
pub(crate) fn parse_answers(
    buf: &[u8],
    dump: bool,
    out: &mut Vec<(u16, u64)>,
) -> anyhow::Result<bool> {
    let mut offset = 0;
    while offset < buf.len() {
        let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&buf[offset..])
            .context("decoding a ctnetlink answer")?;
        let len = msg.header.length as usize;
        match msg.payload {
            NetlinkPayload::Done(_) => return Ok(true),
            NetlinkPayload::Error(e) if e.code.is_some() => {
                bail!("ctnetlink refused the request: {}", e.to_io())
            }
            NetlinkPayload::Error(_) => return Ok(true),
            NetlinkPayload::InnerMessage(m) => {
                if let NetfilterMessageInner::Conntrack(ConntrackMessage::Other {
                    attributes,
                    ..
                }) = m.inner
                {
                    for a in attributes {
                        if a.value_len() == 4 {
                            let mut v = [0u8; 4];
                            a.emit_value(&mut v);
                            out.push((a.kind(), u32::from_be_bytes(v) as u64));
                        }
                    }
                }
                if !dump {
                    return Ok(true);
                }
            }
            _ => {}
        }
        ensure!(len > 0, "a zero-length netlink message");
        offset = offset.saturating_add((len + 3) & !3);
    }
    Ok(false)
}

/// `/proc/net/stat/nf_conntrack`: a header of names, then one row of hex numbers per CPU.
pub fn parse_procfs(text: &str) -> anyhow::Result<CtCounters> {
    let mut lines = text.lines();
    let names: Vec<&str> = lines
        .next()
        .context("empty file")?
        .split_whitespace()
        .collect();
    let mut c = CtCounters::default();
    for line in lines {
        for (name, hex) in names.iter().zip(line.split_whitespace()) {
            let v = u64::from_str_radix(hex, 16).with_context(|| format!("{hex:?} is not hex"))?;
            match *name {
                // The same global count on every row.
                "entries" => c.entries = v,
                "insert_failed" => c.insert_failed += v,
                "drop" => c.drop += v,
                "early_drop" => c.early_drop += v,
                "clashres" => c.clash_resolve += v,
                "search_restart" => c.search_restart += v,
                "chainlength" => c.chaintoolong += v,
                "invalid" => c.invalid += v,
                _ => {}
            }
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn procfs_rows_are_summed() {
        let text = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart\n\
                    00000003  00000001 00000000 00000000 00000002 00000000 00000000 00000000 00000000 0000000a 00000004 00000000 00000000  00000000 00000000 00000000 00000000\n\
                    00000003  00000002 00000000 00000000 00000000 00000000 00000000 00000001 00000000 00000001 00000001 00000000 00000000  00000000 00000000 00000000 00000005\n";
        let c = parse_procfs(text).expect("test");
        assert_eq!(c.entries, 3);
        assert_eq!(c.clash_resolve, 3);
        assert_eq!(c.insert_failed, 11);
        assert_eq!(c.drop, 5);
        assert_eq!(c.chaintoolong, 1);
        assert_eq!(c.search_restart, 5);
        assert_eq!(c.invalid, 2);
        assert!(parse_procfs("entries\nzz\n").is_err());
    }
}
