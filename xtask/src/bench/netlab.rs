//! Where a DNS workload's packets go. `Net::Loopback`: the benchmark's own network namespace,
//! client and server on lo. `Net::PodToService`: the path a pod's query takes on a node, in
//! three network namespaces created here (the host's namespace, iptables and sysctls are
//! never touched):
//!
//! ```text
//! flbench-pod            flbench-node                               flbench-dns
//! eth0 10.244.1.2 ─veth─ flb-pod 10.244.1.1
//!                        PREROUTING DNAT 10.96.0.10:53 -> 10.244.2.2:53
//!                        ip_forward=1
//!                        flb-dns 10.244.2.1 ──────────────── veth ─ eth0 10.244.2.2 dnsmasq
//! ```
//!
//! The client asks the service IP (kube-proxy's kube-dns ClusterIP), the node namespace
//! rewrites it to the DNS pod like kube-proxy's rule and forwards; dnsmasq (Debian's
//! dnsmasq-base) answers `bench.test`, the name faultline-lab's dns-client asks, from its own
//! data (`--host-record`, `--local=/test/`), with no upstream. The comparison captures where a
//! node agent would: in the node namespace, on the pod's veth. The namespaces and dnsmasq are
//! removed when the guard drops (on errors and panics too), and leftovers of an aborted run
//! before setting up.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use super::measure::{Agent, Ready, report_field, run_measured};

/// The DNS service IP the pod asks (a workload's --dns-server).
pub const SERVICE: &str = "10.96.0.10:53";
const POD_NS: &str = "flbench-pod";
const NODE_NS: &str = "flbench-node";
const DNS_NS: &str = "flbench-dns";
/// The node's end of the pod's veth: where tcpdump captures.
const NODE_POD_IF: &str = "flb-pod";
const DNS_POD_IP: &str = "10.244.2.2";

/// The network a workload runs on.
#[derive(Clone, Copy, PartialEq)]
pub enum Net {
    /// The benchmark's own namespace; DNS over lo.
    Loopback,
    /// From a pod's namespace through the node's DNAT of a service IP to dnsmasq.
    PodToService,
}

impl Net {
    /// Sets the network up; it lasts as long as the returned guard (none for loopback).
    pub fn up(self, bin: &Path, cpu: &str) -> anyhow::Result<Option<PodToService>> {
        Ok(match self {
            Net::Loopback => None,
            Net::PodToService => Some(PodToService::start(bin, cpu)?),
        })
    }

    /// `program` pinned to `cpu`, in the workload's namespace; the caller adds the arguments.
    /// `ip netns exec` and taskset exec it: wait4 on the child gives the program's CPU time.
    pub fn workload(self, cpu: &str, program: &Path) -> Command {
        let mut cmd = match self {
            Net::Loopback => Command::new("taskset"),
            Net::PodToService => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", POD_NS, "taskset"]);
                cmd
            }
        };
        cmd.args(["-c", cpu]).arg(program);
        cmd
    }

    /// tcpdump writing the workload's DNS to /dev/null, capturing where a node agent would.
    pub fn capture(self) -> Command {
        let filter = ["-n", "-w", "/dev/null", "udp port 53"];
        match self {
            Net::Loopback => {
                let mut cmd = Command::new("tcpdump");
                cmd.args(["-i", "lo"]).args(filter);
                cmd
            }
            Net::PodToService => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", NODE_NS, "tcpdump", "-i", NODE_POD_IF])
                    .args(filter);
                cmd
            }
        }
    }
}

/// The three namespaces and dnsmasq; all removed on drop.
pub struct PodToService {
    dnsmasq: Option<Agent>,
}

impl PodToService {
    /// Creates the namespaces, starts dnsmasq pinned to `cpu`, and checks that queries to the
    /// service IP are answered.
    fn start(bin: &Path, cpu: &str) -> anyhow::Result<PodToService> {
        remove();
        // From here on, whatever fails is undone by the drop.
        let mut lab = PodToService { dnsmasq: None };
        for ns in [POD_NS, NODE_NS, DNS_NS] {
            ip(&format!("netns add {ns}"))?;
            ip(&format!("-n {ns} link set lo up"))?;
        }
        // Each veth is created inside its namespaces, never in the host's.
        for cmd in [
            format!("-n {POD_NS} link add eth0 type veth peer name {NODE_POD_IF} netns {NODE_NS}"),
            format!("-n {DNS_NS} link add eth0 type veth peer name flb-dns netns {NODE_NS}"),
            format!("-n {POD_NS} addr add 10.244.1.2/24 dev eth0"),
            format!("-n {NODE_NS} addr add 10.244.1.1/24 dev {NODE_POD_IF}"),
            format!("-n {NODE_NS} addr add 10.244.2.1/24 dev flb-dns"),
            format!("-n {DNS_NS} addr add {DNS_POD_IP}/24 dev eth0"),
            format!("-n {POD_NS} link set eth0 up"),
            format!("-n {NODE_NS} link set {NODE_POD_IF} up"),
            format!("-n {NODE_NS} link set flb-dns up"),
            format!("-n {DNS_NS} link set eth0 up"),
            format!("-n {POD_NS} route add default via 10.244.1.1"),
            format!("-n {DNS_NS} route add default via 10.244.2.1"),
            format!("netns exec {NODE_NS} sysctl -qw net.ipv4.ip_forward=1"),
            format!(
                "netns exec {NODE_NS} iptables -t nat -A PREROUTING -d 10.96.0.10/32 -p udp --dport 53 -j DNAT --to-destination {DNS_POD_IP}:53"
            ),
        ] {
            ip(&cmd)?;
        }
        lab.dnsmasq = Some(Agent::start(
            "dnsmasq (Debian's dnsmasq-base, installed by cargo xtask setup)",
            Command::new("ip")
                .args(["netns", "exec", DNS_NS, "taskset", "-c", cpu, "dnsmasq"])
                .args([
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    "--user=root",
                    "--pid-file=",
                    "--log-facility=-",
                    "--host-record=bench.test,10.244.3.7",
                    "--local=/test/",
                ])
                .arg(format!("--listen-address={DNS_POD_IP}")),
            Ready::Stderr("started, version"),
        )?);
        let probe = run_measured(
            Net::PodToService
                .workload(cpu, &bin.join("faultline-lab"))
                .args(["dns-client", "--dns-server", SERVICE, "3"]),
        )?;
        if report_field(&probe.stdout, "created") != Some(3.0) {
            bail!(
                "queries from {POD_NS} to {SERVICE} went unanswered: {}",
                probe.stdout
            );
        }
        Ok(lab)
    }
}

impl Drop for PodToService {
    fn drop(&mut self) {
        // Killed and reaped (Agent's drop).
        self.dnsmasq = None;
        remove();
    }
}

/// Kills whatever still runs in the benchmark's namespaces (a dnsmasq left by an aborted
/// run) and deletes them. Quiet where there is nothing to remove.
fn remove() {
    for ns in [POD_NS, NODE_NS, DNS_NS] {
        if !Path::new("/run/netns").join(ns).exists() {
            continue;
        }
        let pids = Command::new("ip")
            .args(["netns", "pids", ns])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: signalling a process in the benchmark's own namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs `ip` with whitespace-separated arguments.
fn ip(args: &str) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {args} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
