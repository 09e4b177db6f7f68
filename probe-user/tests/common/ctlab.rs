//! A conntrack lab in network namespaces created here: two client namespaces and a server
//! namespace behind a router namespace that SNATs traffic to the server to ONE source port, so
//! a second flow cannot be inserted (a deterministic `insert_failed`). Removed on drop.

use std::os::unix::fs::MetadataExt as _;

use probe_user::attribution::cgroups::Hierarchy;

use super::*;

pub const SNAT_PORT: u16 = 40000;

/// Addresses of one address family.
pub struct Plan {
    pub v6: bool,
    pub client1: &'static str,
    pub client2: &'static str,
    pub server: &'static str,
    pub router_to_server: &'static str,
    pub prefix: u8,
}

pub const V4: Plan = Plan {
    v6: false,
    client1: "10.77.1.2",
    client2: "10.77.2.2",
    server: "10.77.9.2",
    router_to_server: "10.77.9.1",
    prefix: 24,
};

pub const V6: Plan = Plan {
    v6: true,
    client1: "fd00:77:1::2",
    client2: "fd00:77:2::2",
    server: "fd00:77:9::2",
    router_to_server: "fd00:77:9::1",
    prefix: 64,
};

/// client1, client2 -> router (SNAT to one port) -> server.
pub struct CtLab {
    plan: &'static Plan,
    ns: [String; 4],
    cgroups: [TempCgroup; 2],
    /// Each namespace's pause process's cgroup (a pod's, to faultline): what names the
    /// namespace where its inode is not readable.
    pause_cgroups: Vec<TempCgroup>,
    /// One sleeping process in each namespace, as a pod's has its pause container: uid 65535
    /// (the pause image's) with no capabilities, so that as deployed (no CAP_SYS_PTRACE)
    /// faultline cannot read its `/proc/<pid>/ns/net`, nor enter the namespace (no
    /// CAP_SYS_ADMIN), nor see `/run/netns` (not one of the DaemonSet's mounts): it finds the
    /// namespace through the process's `/proc/<pid>/net`, as a pod's. Killed on drop.
    pause: Vec<std::process::Child>,
}

impl CtLab {
    pub fn start(plan: &'static Plan) -> CtLab {
        require_root();
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let id = std::process::id() % 100_000 * 10
            + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ns = ["c1", "c2", "r", "s"].map(|n| format!("flct{n}{id}"));
        let (unified, _) = mount(Hierarchy::Unified).expect("cgroup v2 mount");
        let mut lab = CtLab {
            plan,
            cgroups: [1, 2]
                .map(|n| TempCgroup::new(&unified, &format!("{}-c{n}-{id}", unique("ct")))),
            ns: ns.clone(),
            pause_cgroups: Vec::new(),
            pause: Vec::new(),
        };
        let [c1, c2, r, s] = &ns;
        let (ip, p) = (if plan.v6 { "ip -6" } else { "ip" }, plan.prefix);
        let router_addr = |a: &str| {
            let (head, _) = a
                .rsplit_once(if plan.v6 { ':' } else { '.' })
                .expect("address");
            format!("{head}{}1", if plan.v6 { ":" } else { "." })
        };
        for n in &ns {
            sh(&format!("ip netns add {n}"));
            sh(&format!("ip -n {n} link set lo up"));
            let cgroup = TempCgroup::new(&unified, &format!("{}-{n}", unique("ctpause")));
            let procs = cgroup.dir.join("cgroup.procs");
            lab.pause_cgroups.push(cgroup);
            let pause = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "echo $$ > '{}' && exec ip netns exec {n} setpriv --reuid=65535 \
                     --regid=65535 --clear-groups --inh-caps=-all --bounding-set=-all sleep 900",
                    procs.display()
                ))
                .stdin(std::process::Stdio::null())
                .spawn()
                .expect("a process in the lab's namespace");
            lab.pause.push(pause);
        }
        for (i, (client, addr)) in [(c1, plan.client1), (c2, plan.client2), (s, plan.server)]
            .into_iter()
            .enumerate()
        {
            let (a, b) = (format!("fl{id}a{i}"), format!("fl{id}b{i}"));
            let gw = router_addr(addr);
            let nodad = if plan.v6 { " nodad" } else { "" };
            for cmd in [
                format!("ip link add {a} type veth peer name {b}"),
                format!("ip link set {a} netns {client}"),
                format!("ip link set {b} netns {r}"),
                format!("{ip} -n {client} addr add {addr}/{p} dev {a}{nodad}"),
                format!("{ip} -n {r} addr add {gw}/{p} dev {b}{nodad}"),
                format!("ip -n {client} link set {a} up"),
                format!("ip -n {r} link set {b} up"),
            ] {
                sh(&cmd);
            }
            if client != s {
                sh(&format!("{ip} -n {client} route add default via {gw}"));
            }
        }
        let (fwd, tables) = if plan.v6 {
            ("net.ipv6.conf.all.forwarding", "ip6tables")
        } else {
            ("net.ipv4.ip_forward", "iptables")
        };
        sh(&format!("ip netns exec {r} sysctl -qw {fwd}=1"));
        let to = if plan.v6 {
            format!("[{}]:{SNAT_PORT}", plan.router_to_server)
        } else {
            format!("{}:{SNAT_PORT}", plan.router_to_server)
        };
        sh(&format!(
            "ip netns exec {r} {tables} -t nat -A POSTROUTING -d {} -p udp -j SNAT --to-source {to}",
            plan.server
        ));
        lab
    }

    pub fn server_ns(&self) -> &str {
        &self.ns[3]
    }

    pub fn router(&self) -> &str {
        &self.ns[2]
    }

    /// The router namespace's workload as faultline names it: its pause process's cgroup.
    pub fn router_workload(&self) -> String {
        format!(
            "/{}",
            self.pause_cgroups[2]
                .dir
                .file_name()
                .expect("name")
                .to_string_lossy()
        )
    }

    pub fn router_inode(&self) -> u64 {
        std::fs::metadata(format!("/run/netns/{}", self.router()))
            .expect("router netns")
            .ino()
    }

    pub fn tables(&self) -> &'static str {
        if self.plan.v6 {
            "ip6tables"
        } else {
            "iptables"
        }
    }

    /// A DROP rule for DNS in the router's FORWARD chain (removed with the namespace).
    pub fn drop_dns(&self) {
        super::sh(&format!(
            "ip netns exec {} {} -I FORWARD -p udp --dport 53 -j DROP",
            self.router(),
            self.tables()
        ));
    }

    pub fn server(&self, port: u16) -> String {
        if self.plan.v6 {
            format!("[{}]:{port}", self.plan.server)
        } else {
            format!("{}:{port}", self.plan.server)
        }
    }

    /// faultline-lab's DNS client in client `n`'s cgroup and namespace (joined in that
    /// order: `ip netns exec` mounts its own sysfs).
    pub fn client(&self, n: usize, args: &str) {
        self.client_in(n, &[self.cgroups[n - 1].dir.as_path()], args);
    }

    /// The same, in other cgroups (a pod's v2 and v1 directories).
    pub fn client_in(&self, n: usize, cgroups: &[&std::path::Path], args: &str) {
        let join: String = cgroups
            .iter()
            .map(|d| format!("echo $$ > {} && ", d.join("cgroup.procs").display()))
            .collect();
        sh(&format!(
            "{join}exec timeout 30 ip netns exec {} {} dns-client {args} >/dev/null",
            self.ns[n - 1],
            *LAB
        ));
    }

    pub fn cgroup_path(&self, n: usize) -> String {
        format!(
            "/{}",
            self.cgroups[n - 1]
                .dir
                .file_name()
                .expect("name")
                .to_string_lossy()
        )
    }

    /// The router namespace's conntrack counters, summed over CPUs, from procfs.
    pub fn counters(&self) -> std::collections::HashMap<String, u64> {
        self.counters_in(self.router())
    }

    /// Client `n`'s namespace (a pod's own).
    pub fn client_ns(&self, n: usize) -> &str {
        &self.ns[n - 1]
    }

    pub fn client_inode(&self, n: usize) -> u64 {
        std::fs::metadata(format!("/run/netns/{}", self.client_ns(n)))
            .expect("client netns")
            .ino()
    }

    /// NAT in client `n`'s own namespace, as a sidecar's: its DNS SNATed to ONE source port
    /// of its own address, so that a second flow loses the clash there, in its sender's
    /// context.
    pub fn snat_in_client(&self, n: usize, port: u16) {
        let addr = if n == 1 {
            self.plan.client1
        } else {
            self.plan.client2
        };
        let to = if self.plan.v6 {
            format!("[{addr}]:{port}")
        } else {
            format!("{addr}:{port}")
        };
        super::sh(&format!(
            "ip netns exec {} {} -t nat -A POSTROUTING -p udp --dport 53 -j SNAT --to-source {to}",
            self.client_ns(n),
            self.tables()
        ));
    }

    /// A namespace's conntrack counters, summed over CPUs, from procfs.
    pub fn counters_in(&self, ns: &str) -> std::collections::HashMap<String, u64> {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "cat", "/proc/net/stat/nf_conntrack"])
            .output()
            .expect("reading conntrack counters");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = text.lines();
        let names: Vec<String> = lines
            .next()
            .expect("header")
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let mut sums = std::collections::HashMap::new();
        for line in lines {
            for (name, hex) in names.iter().zip(line.split_whitespace()) {
                *sums.entry(name.clone()).or_default() +=
                    u64::from_str_radix(hex, 16).expect("hex");
            }
        }
        sums
    }
}

impl Drop for CtLab {
    fn drop(&mut self) {
        for p in &mut self.pause {
            let _ = p.kill();
            let _ = p.wait();
        }
        for n in &self.ns {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", n])
                .status();
        }
    }
}

/// `after[name] - before[name]` of two `CtLab::counters` readings.
pub fn delta(
    before: &std::collections::HashMap<String, u64>,
    after: &std::collections::HashMap<String, u64>,
    name: &str,
) -> u64 {
    after[name] - before[name]
}
