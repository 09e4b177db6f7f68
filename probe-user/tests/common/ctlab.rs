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
    /// One sleeping process in each namespace, as a pod's has its pause container: how
    /// faultline finds a pod's namespace as deployed (`/proc/<pid>/ns/net`; `/run/netns` is not
    /// one of the DaemonSet's mounts). Killed on drop.
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
            let pause = std::process::Command::new("ip")
                .args(["netns", "exec", n, "sleep", "900"])
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
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                self.router(),
                "cat",
                "/proc/net/stat/nf_conntrack",
            ])
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
