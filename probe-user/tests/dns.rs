//! DNS per pod, for real: a dnsmasq server (Debian's package) in its own network namespace,
//! reached through a kube-proxy-like DNAT of a service IP from a client namespace, and a glibc
//! client (`getent ahosts`, parallel A and AAAA) in its own cgroup. Checks answered queries,
//! NXDOMAIN, timeouts with retransmits, the ndots:5 search-path chain, and malformed packets.
//! Every namespace, rule, file and cgroup is removed on drop. Root only.
#![allow(clippy::unwrap_used)] // a test fails by panicking: helpers outside #[test] fns unwrap too

mod common;

use std::{
    process::{Child, Command, Stdio},
    sync::{RwLock, RwLockReadGuard, RwLockWriteGuard},
    time::{Duration, Instant},
};

use common::*;
use probe_user::attribution::cgroups::Hierarchy;
use serde_json::Value;

const SERVICE_IP: &str = "203.0.113.10";
const SERVER_IP: &str = "198.51.100.53";
const CLIENT_IP: &str = "198.51.100.2";
const RESPONDER_IP: &str = "198.51.100.54";
/// Off the lab's subnet and nobody's (TEST-NET-1).
const BLACKHOLE_IP: &str = "192.0.2.53";
const SERVER_IP6: &str = "fd00:fa17::53";
const CLIENT_IP6: &str = "fd00:fa17::2";

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Tests of this file run in parallel and every daemon sees every lab's packets. A test that
/// reads node-wide counters (events lost, the quota counter) takes its turn alone.
static TURNS: RwLock<()> = RwLock::new(());

/// A lab's turn: shared with the other labs, or alone. Released after the lab is torn down.
enum Turn {
    Shared {
        _guard: RwLockReadGuard<'static, ()>,
    },
    Alone {
        _guard: RwLockWriteGuard<'static, ()>,
    },
}

/// Two namespaces joined by a veth pair, dnsmasq in one, the service-IP DNAT in the other.
struct DnsLab {
    server_ns: String,
    server_if: String,
    client_ns: String,
    dnsmasq: Option<Child>,
    cgroup: TempCgroup,
    _turn: Turn,
}

impl DnsLab {
    fn start() -> DnsLab {
        // A test that failed holding its turn poisons the lock; the labs it guards are gone.
        Self::start_in(Turn::Shared {
            _guard: TURNS.read().unwrap_or_else(|e| e.into_inner()),
        })
    }

    /// A lab while no other lab of this file runs.
    fn start_alone() -> DnsLab {
        Self::start_in(Turn::Alone {
            _guard: TURNS.write().unwrap_or_else(|e| e.into_inner()),
        })
    }

    fn start_in(turn: Turn) -> DnsLab {
        require_root();
        // Unique per lab: tests of this file run in parallel.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let id = std::process::id() * 10 + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (server_ns, client_ns) = (format!("flsrv{id}"), format!("flcli{id}"));
        let (unified, _) = mount(Hierarchy::Unified).expect("cgroup v2 mount");
        let (vc, vs) = (format!("fl{id}c"), format!("fl{id}s"));
        let lab = DnsLab {
            server_ns: server_ns.clone(),
            server_if: vs.clone(),
            client_ns: client_ns.clone(),
            dnsmasq: None,
            cgroup: TempCgroup::new(&unified, &format!("{}-{id}", unique("dns-client"))),
            _turn: turn,
        };
        for cmd in [
            format!("ip netns add {server_ns}"),
            format!("ip netns add {client_ns}"),
            format!("ip link add {vc} type veth peer name {vs}"),
            format!("ip link set {vc} netns {client_ns}"),
            format!("ip link set {vs} netns {server_ns}"),
            format!("ip -n {client_ns} addr add {CLIENT_IP}/24 dev {vc}"),
            format!("ip -n {server_ns} addr add {SERVER_IP}/24 dev {vs}"),
            format!("ip -n {client_ns} link set {vc} up"),
            format!("ip -n {server_ns} link set {vs} up"),
            format!("ip -n {client_ns} link set lo up"),
            format!("ip -n {server_ns} link set lo up"),
            format!("ip -n {client_ns} -6 addr add {CLIENT_IP6}/64 dev {vc} nodad"),
            format!("ip -n {server_ns} -6 addr add {SERVER_IP6}/64 dev {vs} nodad"),
            // A route for the service IP, which only exists as a DNAT rule.
            format!("ip -n {client_ns} route add default via {SERVER_IP}"),
            // The kube-proxy-like service IP.
            format!(
                "ip netns exec {client_ns} iptables -t nat -A OUTPUT -d {SERVICE_IP}/32 -p udp --dport 53 -j DNAT --to-destination {SERVER_IP}:53"
            ),
            format!("mkdir -p /etc/netns/{client_ns}"),
        ] {
            sh(&cmd);
        }
        let mut lab = lab;
        lab.dnsmasq = Some(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &server_ns,
                    "dnsmasq",
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                ])
                .args([
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    "--user=root",
                    "--pid-file=",
                ])
                .arg(format!("--listen-address={SERVER_IP}"))
                .arg(format!("--listen-address={SERVER_IP6}"))
                .args([
                    "--host-record=web.test,198.51.100.80",
                    "--local=/test/",
                    "--local=/cluster.local/",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting dnsmasq (Debian's dnsmasq-base, installed by cargo xtask setup)"),
        );
        std::thread::sleep(Duration::from_millis(300));
        lab
    }

    /// The client's whole resolv.conf.
    fn resolv_conf_raw(&self, text: &str) {
        std::fs::write(format!("/etc/netns/{}/resolv.conf", self.client_ns), text)
            .expect("writing the client's resolv.conf");
    }

    /// A resolv.conf pointing at the service IP, plus `extra`.
    fn resolv_conf(&self, extra: &str) {
        self.resolv_conf_raw(&format!("nameserver {SERVICE_IP}\n{extra}"));
    }

    /// Runs a command in the client cgroup and namespace (bounded to 20 s). The cgroup is
    /// joined first: inside the namespace `ip netns exec` mounts a sysfs of its own.
    fn client(&self, cmd: &str) {
        self.client_in(&self.cgroup, cmd);
    }

    /// Like `client`, returning what the command printed.
    fn client_output(&self, cmd: &str) -> String {
        self.client_in(&self.cgroup, cmd)
    }

    /// Like `client`, in another cgroup (another workload in the same namespace).
    fn client_in(&self, cgroup: &TempCgroup, cmd: &str) -> String {
        let procs = cgroup.dir.join("cgroup.procs");
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {} && exec timeout 20 ip netns exec {} bash -c \"$0\"",
                procs.display(),
                self.client_ns
            ))
            .arg(cmd)
            .output()
            .expect("running the client");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// faultline-lab's DNS responder (SERVFAIL for fail.*, 300 ms for slow.*) on a second
    /// server address, for 30 s at most.
    fn responder(&self) -> KillOnDrop {
        sh(&format!(
            "ip -n {} addr add {RESPONDER_IP}/24 dev {}",
            self.server_ns, self.server_if
        ));
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.server_ns,
                &LAB,
                "dns-server",
                "30",
                "--dns-listen",
            ])
            .arg(format!("{RESPONDER_IP}:53"))
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the lab DNS responder");
        std::thread::sleep(Duration::from_millis(300));
        KillOnDrop(child)
    }

    fn server_drops(&self, on: bool) {
        let op = if on { "-A" } else { "-D" };
        sh(&format!(
            "ip netns exec {} iptables {op} INPUT -p udp --dport 53 -j DROP",
            self.server_ns
        ));
    }

    /// `name` looked up with Kubernetes' ndots:5 and three search domains in front of it.
    fn search_chain(&self, name: &str) {
        self.resolv_conf(
            "search ns.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n",
        );
        self.client(&format!("getent ahosts {name}"));
    }

    /// `name` looked up while the server drops every query, by a resolver that retries after
    /// 1 s.
    fn unanswered(&self, name: &str) {
        self.resolv_conf("options timeout:1 attempts:2\n");
        self.server_drops(true);
        self.client(&format!("getent ahosts {name}"));
        self.server_drops(false);
    }

    fn path(&self) -> String {
        format!(
            "/{}",
            self.cgroup.dir.file_name().unwrap().to_string_lossy()
        )
    }
}

impl Drop for DnsLab {
    fn drop(&mut self) {
        if let Some(mut d) = self.dnsmasq.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.server_ns])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.client_ns])
            .status();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.client_ns));
    }
}

fn queries<'a>(events: &'a [Value], qname: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["kind"] == "dns" && e["qname"] == qname)
        .collect()
}

#[test]
fn dns_queries_answers_timeouts_retransmits_search_path_and_garbage() {
    let lab = DnsLab::start();
    let path = lab.path();
    let trace = Trace::start(&[
        "--events",
        "dns",
        "--cgroup",
        &path,
        "--dns-timeout",
        "2500ms",
    ]);

    // 1. glibc getaddrinfo: A and AAAA in parallel, both answered.
    lab.resolv_conf("");
    lab.client("getent ahosts web.test");
    // 2. A name the server does not know.
    lab.client("getent ahosts nope.test");
    // 3. The ndots:5 search list in front of an external-looking name.
    lab.search_chain("web.test");
    // 4. A server that drops queries, with a resolver that retries after 1 s.
    lab.unanswered("slow.test");
    // 5. Garbage to and from port 53: random bytes, a truncated header, a compression loop.
    lab.client(&format!(
        "printf 'garbage-not-dns' > /dev/udp/{SERVER_IP}/53; printf '\\001\\002\\003' > /dev/udp/{SERVER_IP}/53; printf '\\000\\001\\000\\000\\000\\001\\000\\000\\000\\000\\000\\000\\300\\014\\000\\001\\000\\001' > /dev/udp/{SERVER_IP}/53"
    ));
    std::thread::sleep(Duration::from_millis(2800)); // the last timeouts fall due
    let (events, summary) = trace.stop_json();

    // 1.
    let web: Vec<&Value> = queries(&events, "web.test");
    let first: Vec<&&Value> = web.iter().filter(|e| e["search_nxdomain"] == 0).collect();
    for qtype in ["A", "AAAA"] {
        let q = first
            .iter()
            .find(|e| e["qtype"] == qtype)
            .unwrap_or_else(|| panic!("no {qtype} for web.test: {events:#?}"));
        assert_eq!(
            (q["outcome"].as_str(), q["rcode"].as_str()),
            (Some("answered"), Some("NOERROR")),
            "{q}"
        );
        assert!(q["latency_ms"].as_f64().is_some_and(|l| l > 0.0), "{q}");
        assert_eq!(q["cgroup"], path.as_str(), "{q}");
        assert!(
            q["server"]
                .as_str()
                .is_some_and(|s| s.starts_with(SERVER_IP) || s.starts_with(SERVICE_IP)),
            "{q}"
        );
        assert_eq!(q["retransmit"], false);
    }
    // 2.
    let nope = queries(&events, "nope.test");
    assert!(
        !nope.is_empty()
            && nope
                .iter()
                .all(|q| q["rcode"] == "NXDOMAIN" && q["outcome"] == "answered"),
        "{nope:#?}"
    );
    // 3. Each of A and AAAA: three NXDOMAINs for web.test.<suffix>, then the answer.
    let expansions = events
        .iter()
        .filter(|e| {
            e["kind"] == "dns"
                && e["qname"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("web.test.") && n.ends_with("cluster.local"))
        })
        .count();
    assert_eq!(expansions, 6, "{events:#?}");
    for qtype in ["A", "AAAA"] {
        assert!(
            web.iter()
                .any(|e| e["qtype"] == qtype && e["search_nxdomain"] == 3),
            "no {qtype} answer after 3 search-path NXDOMAINs: {web:#?}"
        );
    }
    // 4. Every send timed out; the re-sends are retransmits about 1 s after the first.
    let slow = queries(&events, "slow.test");
    assert!(slow.len() >= 4, "{slow:#?}");
    assert!(
        slow.iter()
            .all(|q| q["outcome"] == "timeout" && q["rcode"].is_null()),
        "{slow:#?}"
    );
    let retransmits: Vec<&&Value> = slow.iter().filter(|q| q["retransmit"] == true).collect();
    assert!(!retransmits.is_empty(), "{slow:#?}");
    for r in retransmits {
        let gap = r["retransmit_gap_ms"].as_f64().unwrap_or(0.0);
        assert!((700.0..3000.0).contains(&gap), "gap {gap} ms: {r}");
    }
    // 5. Counted, not crashed.
    assert!(
        summary["dns_malformed"].as_u64().is_some_and(|n| n >= 3),
        "{summary}"
    );
    // The per-workload summary.
    let s = &summary["dns"][path.as_str()];
    assert!(s["queries"].as_u64().is_some_and(|n| n >= 12), "{summary}");
    assert!(s["timeouts"].as_u64().is_some_and(|n| n >= 4), "{summary}");
    assert!(s["p50_ms"].as_f64().is_some(), "{summary}");
}

/// A resolver that retries from a new socket (new port, the same query and id, as glibc's
/// with `single-request-reopen`): the kernel sees two sockets; the second send is still a
/// retransmit of the first, about 1 s later. Another lookup of the name (its own id) is not.
#[test]
fn a_retry_from_a_new_socket_is_a_retransmit() {
    let lab = DnsLab::start();
    let path = lab.path();
    let trace = Trace::start(&[
        "--events",
        "dns",
        "--cgroup",
        &path,
        "--dns-timeout",
        "1500ms",
    ]);
    lab.server_drops(true);
    lab.client(&format!(
        "{} dns-client 2 --dns-new-socket --dns-keep-id --dns-server {SERVER_IP}:53",
        *LAB
    ));
    lab.server_drops(false);
    std::thread::sleep(Duration::from_millis(1800)); // the second timeout falls due
    let (events, _) = trace.stop_json();
    let sends = queries(&events, "bench.test");
    assert_eq!(sends.len(), 2, "{events:#?}");
    assert!(
        sends.iter().all(|q| q["outcome"] == "timeout"),
        "{sends:#?}"
    );
    let first = sends.iter().find(|q| q["retransmit"] == false);
    let second = sends.iter().find(|q| q["retransmit"] == true);
    assert!(first.is_some(), "{sends:#?}");
    let gap = second
        .and_then(|q| q["retransmit_gap_ms"].as_f64())
        .unwrap_or_else(|| panic!("no retransmit: {sends:#?}"));
    assert!((800.0..2000.0).contains(&gap), "gap {gap} ms");
}

#[test]
fn servfail_slow_answers_tcp_and_redacted_names() {
    let lab = DnsLab::start();
    let _responder = lab.responder();
    let path = lab.path();
    let trace = Trace::start(&[
        "--events",
        "dns",
        "--cgroup",
        &path,
        "--dns-names",
        "redact",
    ]);
    // The responder directly, without the service IP.
    lab.resolv_conf_raw(&format!("nameserver {RESPONDER_IP}\noptions attempts:1\n"));
    lab.client("getent ahosts fail.test");
    lab.client("getent ahosts slow.test");
    // A truncated answer: glibc retries over TCP (the responder has no TCP: refused).
    lab.client("getent ahosts big.test");
    // DNS over TCP to dnsmasq (glibc's use-vc): counted, not parsed.
    lab.resolv_conf("options use-vc\n");
    lab.client("getent ahosts web.test");
    let (events, summary) = trace.stop_json();
    let dns: Vec<&Value> = events.iter().filter(|e| e["kind"] == "dns").collect();
    // Names are hashes, the same for the same name.
    assert!(
        dns.iter().all(|e| e["qname"]
            .as_str()
            .is_some_and(|n| n.starts_with("redacted-"))),
        "{dns:#?}"
    );
    let servfail: Vec<&&Value> = dns.iter().filter(|e| e["rcode"] == "SERVFAIL").collect();
    assert!(!servfail.is_empty(), "{dns:#?}");
    assert!(
        servfail.iter().all(|e| e["qname"] == servfail[0]["qname"]),
        "{servfail:#?}"
    );
    let truncated: Vec<&&Value> = dns.iter().filter(|e| e["truncated"] == true).collect();
    assert!(!truncated.is_empty(), "{dns:#?}");
    assert!(
        summary["dns_truncated"].as_u64() >= Some(truncated.len() as u64),
        "{summary}"
    );
    let slow: Vec<&&Value> = dns
        .iter()
        .filter(|e| e["rcode"] == "NOERROR" && e["truncated"] == false)
        .collect();
    assert!(!slow.is_empty(), "{dns:#?}");
    for e in &slow {
        let l = e["latency_ms"].as_f64().unwrap_or(0.0);
        assert!(
            (250.0..1500.0).contains(&l),
            "a 300 ms answer measured {l} ms: {e}"
        );
    }
    // Counted per workload, not parsed.
    let tcp = &summary["dns"][path.as_str()]["tcp_segments_to_server"];
    assert!(tcp.as_u64().is_some_and(|n| n > 0), "{summary}");
}

#[test]
fn the_daemon_exports_dns_metrics_per_workload() {
    let lab = DnsLab::start();
    let path = lab.path();
    // Departures: dns-timeout: queries time out sooner than the 2 s default, to keep the test short.
    let daemon = Daemon::start(&["--dns-timeout", "1s"]);
    lab.resolv_conf("");
    lab.client("getent ahosts web.test");
    lab.client("getent ahosts nope.test");
    lab.resolv_conf("options use-vc\n");
    lab.client("getent ahosts web.test");
    let sel = format!(r#"workload="{path}""#);
    let text = eventually(Duration::from_secs(20), "DNS metrics", || {
        let m = daemon.metrics();
        let has = |prefix: &str, what: &str| {
            m.lines()
                .any(|l| l.starts_with(prefix) && l.contains(&sel) && l.contains(what))
        };
        (has("faultline_dns_queries_total{", r#"rcode="NXDOMAIN""#)
            && has(
                "faultline_dns_tcp_segments_total{",
                r#"direction="to_server""#,
            ))
        .then_some(m)
    });
    let value = |prefix: &str, must: &[&str]| {
        sum_of(&text, |l| {
            l.starts_with(prefix) && l.contains(&sel) && must.iter().all(|m| l.contains(m))
        })
    };
    assert_eq!(
        value(
            "faultline_dns_queries_total{",
            &[
                r#"qtype="A""#,
                r#"rcode="NOERROR""#,
                r#"outcome="answered""#
            ]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        value("faultline_dns_queries_total{", &[r#"rcode="NXDOMAIN""#]),
        2.0,
        "{text}"
    );
    assert_eq!(
        value("faultline_dns_query_duration_seconds_count{", &[]),
        4.0,
        "{text}"
    );
    assert!(
        text.contains(r#"faultline_probe_attached{probe="dns"} 1"#),
        "{text}"
    );
}

/// One workload asking many question types (most of them outside the allow-list) folds into
/// a few series, at most its 16, and cannot push another workload's series into `_overflow`.
#[test]
fn many_query_types_from_one_workload_leave_room_for_the_others() {
    let lab = DnsLab::start();
    let (unified, _) = mount(Hierarchy::Unified).expect("cgroup v2 mount");
    let quiet = TempCgroup::new(&unified, &unique("dns-quiet"));
    let quiet_path = format!("/{}", quiet.dir.file_name().unwrap().to_string_lossy());
    let noisy_path = lab.path();
    // 60 series: room for the other tests' clients running in parallel, and fewer than the
    // noisy workload's 27 query types times their rcodes would take without its own cap.
    // Departures: max-series: the series cap under test.
    let daemon = Daemon::start(&["--max-series", "60"]);
    // Five common types, then 22 that the parser knows but the allow-list does not.
    let types: Vec<String> = [
        1u16, 28, 15, 16, 33, 10, 11, 13, 14, 17, 18, 20, 21, 22, 29, 35, 36, 37, 43, 45, 46, 47,
        48, 49, 63, 108, 109,
    ]
    .into_iter()
    .map(|t| t.to_string())
    .collect();
    lab.client(&format!(
        "{} dns-client {} --dns-server {SERVER_IP}:53 --dns-qtypes {}",
        *LAB,
        types.len(),
        types.join(",")
    ));
    lab.client_in(
        &quiet,
        &format!("{} dns-client 1 --dns-server {SERVER_IP}:53", *LAB),
    );
    let has = |m: &str, workload: &str, qtype: &str| {
        m.lines().any(|l| {
            l.starts_with("faultline_dns_queries_total{")
                && l.contains(&format!(r#"workload="{workload}""#))
                && l.contains(&format!(r#"qtype="{qtype}""#))
        })
    };
    let text = eventually(Duration::from_secs(20), "both workloads' series", || {
        let m = daemon.metrics();
        (has(&m, &quiet_path, "A") && has(&m, &noisy_path, "other")).then_some(m)
    });
    let noisy: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("faultline_dns_queries_total{")
                && l.contains(&format!(r#"workload="{noisy_path}""#))
        })
        .collect();
    // A, AAAA, MX, TXT, SRV and one `other` for the 22 others (times rcodes), and never
    // more than one workload's 16 series.
    assert!(noisy.len() <= 12, "{noisy:#?}");
    assert!(!text.contains(r#"qtype="TYPE"#), "{text}");
}

/// `run --events` picks the event lines, not what is counted: without `dns` no query is a
/// line, and the metrics still count every query.
#[test]
fn run_events_selects_the_lines_and_the_metrics_count_everything() {
    let lab = DnsLab::start();
    let path = lab.path();
    let file = std::env::temp_dir().join(unique("events.jsonl"));
    let events = TempFile::new(&file, b"");
    // Departures: events-file: the event lines under test, in a file; events: the event kinds the test reads.
    let daemon = Daemon::start(&[
        "--events",
        "clone,conntrack",
        "--events-file",
        &file.display().to_string(),
    ]);
    lab.resolv_conf("");
    lab.client("getent ahosts web.test");
    let sel = format!(r#"workload="{path}""#);
    eventually(
        Duration::from_secs(20),
        "the queries in the metrics",
        || {
            daemon
                .metrics()
                .lines()
                .any(|l| l.starts_with("faultline_dns_queries_total{") && l.contains(&sel))
                .then_some(())
        },
    );
    let (status, stderr, _) = daemon.terminate();
    assert!(status.success(), "{stderr}");
    let lines = std::fs::read_to_string(&file).expect("the events file");
    assert!(
        !lines.lines().any(|l| l.contains(r#""kind":"dns""#)),
        "a DNS line despite --events clone,conntrack: {lines}"
    );
    drop(events);
}

/// One pod flooding port 53 (10,000 datagrams that are not DNS, then 20,000 well-formed
/// queries that nobody answers) cannot untrack another pod's query: the kernel keeps only
/// real queries, at most 1,024 waiting per cgroup, and counts the rest.
#[test]
fn a_port_53_flood_from_one_cgroup_leaves_the_others_tracked() {
    let lab = DnsLab::start();
    let (unified, _) = mount(Hierarchy::Unified).expect("cgroup v2 mount");
    let victim = TempCgroup::new(&unified, &unique("dns-victim"));
    let victim_path = format!("/{}", victim.dir.file_name().unwrap().to_string_lossy());
    let trace = Trace::start(&["--events", "dns", "--dns-timeout", "5s"]);
    // To an address nobody has, off-link: routed into the server namespace, dropped there.
    let flood = lab.client_output(&format!(
        "{} dns-flood 20000 --dns-server {BLACKHOLE_IP}:53",
        *LAB
    ));
    assert!(flood.contains(r#""created":40000"#), "{flood}");
    lab.client_in(
        &victim,
        &format!("{} dns-client 1 --dns-server {SERVER_IP}:53", *LAB),
    );
    trace.wait_for(
        Duration::from_secs(20),
        "the victim's answered query",
        |e| e["cgroup"] == victim_path.as_str() && e["outcome"] == "answered",
    );
    let (_, summary) = trace.stop_json();
    let count = |k: &str| summary[k].as_u64().unwrap_or(0);
    assert!(count("dns_over_quota") >= 10_000, "{summary:#}");
    assert!(count("dns_malformed") >= 10_000, "{summary:#}");
    assert_eq!(
        count("dns_untracked"),
        0,
        "the map never filled: {summary:#}"
    );
}

/// Only the traces endpoint set (per signal, used as is): DNS queries arrive as client spans
/// with real times, and nothing is sent for logs.
#[test]
fn dns_queries_become_otlp_client_spans_with_real_times() {
    let lab = DnsLab::start();
    let receiver = OtlpReceiver::start();
    let traces = format!("http://127.0.0.1:{}/v1/traces", receiver.port);
    let daemon = Daemon::start_with_env(
        &[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &traces)],
        &[
            // Departure: the DaemonSet's events leave DNS out (a record per query); this
            // test is about DNS spans, with their names.
            "--events",
            "clone,dns,conntrack",
            "--dns-names",
            "full",
        ],
    );
    let path = lab.path();
    lab.resolv_conf("");
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    lab.client("getent ahosts web.test");
    let after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let spans = eventually(Duration::from_secs(20), "two DNS spans", || {
        let spans: Vec<_> = receiver
            .spans
            .lock()
            .unwrap()
            .iter()
            // Other tests' clients resolve web.test too: only this lab's cgroup.
            .filter(|s| {
                s.attributes
                    .iter()
                    .any(|kv| kv.key == "faultline.cgroup" && attr_str(kv) == path)
            })
            .filter(|s| {
                s.attributes
                    .iter()
                    .any(|kv| kv.key == "dns.question.name" && attr_str(kv) == "web.test")
            })
            .cloned()
            .collect();
        (spans.len() >= 2).then_some(spans)
    });
    for s in &spans {
        let attr = |k: &str| s.attributes.iter().find(|kv| kv.key == k).map(attr_str);
        assert!(s.name == "DNS A" || s.name == "DNS AAAA", "{}", s.name);
        assert_eq!(s.kind, 3, "a client span");
        // This VM's wall clock is slewed by tens of milliseconds from one second to the next:
        // "real time" here means within a second of the test's own clock, in order.
        const SLACK: u64 = 1_000_000_000;
        assert!(
            before - SLACK <= s.start_time_unix_nano
                && s.start_time_unix_nano < s.end_time_unix_nano
                && s.end_time_unix_nano <= after + SLACK,
            "span [{}, {}] outside [{before}, {after}]",
            s.start_time_unix_nano,
            s.end_time_unix_nano
        );
        assert_eq!(
            attr("faultline.dns.response_code").as_deref(),
            Some("NOERROR")
        );
        assert_eq!(s.trace_id.len(), 16);
        assert_eq!(s.span_id.len(), 8);
    }
    let (status, stderr, _) = daemon.terminate();
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("OTLP: logs not exported; traces to http://127.0.0.1:"),
        "{stderr}"
    );
    for request in receiver.headers.lock().unwrap().iter() {
        assert_eq!(request[0], "post /v1/traces http/1.1", "{request:?}");
    }
}

#[test]
fn dns_over_ipv6() {
    let lab = DnsLab::start();
    let path = lab.path();
    let trace = Trace::start(&["--events", "dns", "--cgroup", &path]);
    lab.resolv_conf_raw(&format!("nameserver {SERVER_IP6}\n"));
    lab.client("getent ahosts web.test");
    let (events, _) = trace.stop_json();
    let web = queries(&events, "web.test");
    assert!(web.len() >= 2, "{events:#?}");
    for q in web {
        assert_eq!(
            (q["outcome"].as_str(), q["rcode"].as_str()),
            (Some("answered"), Some("NOERROR")),
            "{q}"
        );
        assert_eq!(q["server"], format!("[{SERVER_IP6}]:53"), "{q}");
    }
}

/// Another pod sprays forged answers at a pod's socket, every transaction id, from the
/// address its query went to: with another question, and with none at all (FORMERR); and
/// from another address with the query's own question. None of them ends the query: it times
/// out under its own name, the attacker's name never appears, and each forged answer that
/// reached the query's socket with its id is counted as mismatched.
#[test]
fn forged_answers_never_end_a_query_or_rename_it() {
    let lab = DnsLab::start();
    let path = lab.path();
    // Departure: a timeout longer than the sprays take (ten times longer in emulation).
    let timeout = Duration::from_secs(if vm_kernel().is_some() { 30 } else { 10 });
    let timeout_arg = format!("{}s", timeout.as_secs());
    let trace = Trace::start(&[
        "--events",
        "dns",
        "--cgroup",
        &path,
        "--dns-timeout",
        &timeout_arg,
    ]);
    lab.server_drops(true);
    let procs = lab.cgroup.dir.join("cgroup.procs");
    // One query for bench.test (A, id 0) from port 45353, then a socket that keeps its place
    // without reading, as a resolver waiting for its answer: nothing forged ends it here.
    let query = "0000010000010000000000000562656e636804746573740000010001";
    let victim = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {} && exec timeout 60 ip netns exec {} python3 -c \"import socket, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('', 45353)); s.connect(('{SERVER_IP}', 53)); s.send(bytes.fromhex('{query}')); time.sleep({})\"",
            procs.display(),
            lab.client_ns,
            timeout.as_secs() + 4,
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the victim");
    let _victim = KillOnDrop(victim);
    // Its query is out once its socket is listed: python starts in seconds in emulation, and
    // the sprays must come while the query waits, and the trace stop after its timeout.
    let listed = Instant::now() + Duration::from_secs(30);
    loop {
        let ss = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.client_ns,
                "ss",
                "-Huan",
                "sport = :45353",
            ])
            .output()
            .expect("ss");
        if !ss.stdout.is_empty() {
            break;
        }
        assert!(
            Instant::now() < listed,
            "the victim's socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let sent = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let to = format!("{CLIENT_IP}:45353");
    let ids = if vm_kernel().is_some() {
        "256"
    } else {
        "65536"
    };
    for (from, name, rcode) in [
        (SERVER_IP, "evil.test", "0"),
        (SERVER_IP, "", "1"),
        (RESPONDER_IP, "bench.test", "2"),
    ] {
        // The query's id (0) alone first, so that a backlog full of the spray before cannot
        // drop it; then every id on a node (in emulation, ten times slower, the first 256).
        for count in ["1", ids] {
            let out = Command::new("ip")
                .args(["netns", "exec", &lab.server_ns, &LAB, "dns-spray", count])
                .args(["--dns-server", &to, "--spoof-from", &format!("{from}:53")])
                .args(["--spoof-name", name, "--spoof-rcode", rcode])
                .output()
                .expect("spraying");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    lab.server_drops(false);
    assert!(
        sent.elapsed() + Duration::from_secs(1) < timeout,
        "the sprays outlasted the query"
    );
    // The query's timeout falls due.
    std::thread::sleep((timeout + Duration::from_secs(1)).saturating_sub(sent.elapsed()));
    let (events, summary) = trace.stop_json();
    let mine: Vec<&Value> = events.iter().filter(|e| e["kind"] == "dns").collect();
    assert_eq!(mine.len(), 1, "{mine:#?}");
    assert_eq!(mine[0]["qname"], "bench.test", "{:#}", mine[0]);
    assert_eq!(mine[0]["outcome"], "timeout", "{:#}", mine[0]);
    // The two from the query's own server address reached its socket with its id (a
    // connected socket never sees the third).
    assert!(
        summary["dns_mismatched"].as_u64().is_some_and(|n| n >= 2),
        "{summary:#}"
    );
}

/// `faultline explain` on the DNS lab: the ndots:5 chain is a search-path amplification
/// finding with its example name and the ndots advice; queries to a server that drops them
/// are a timeout finding for the same workload.
#[test]
fn explain_finds_search_path_amplification_and_timeouts_per_workload() {
    let lab = DnsLab::start();
    let path = lab.path();
    // Departures: dns-timeout: queries time out sooner than the 2 s default, to keep the test short.
    let daemon = Daemon::start(&["--dns-timeout", "1s"]);
    lab.search_chain("web.test");
    lab.unanswered("slow.test");
    let mine = |report: &Value, kind: &str| finding(report, kind, &path);
    let report = eventually(Duration::from_secs(20), "DNS findings", || {
        let report = daemon.explain()?;
        (mine(&report, "dns_timeouts").is_some()
            && mine(&report, "dns_search_amplification").is_some())
        .then_some(report)
    });
    let amp = mine(&report, "dns_search_amplification").expect("amplification");
    assert_eq!(amp["severity"], "info", "{amp:#}");
    assert!(
        amp["why"]
            .as_str()
            // Redacted, as the DaemonSet shows names.
            .is_some_and(|w| w.contains("`redacted-") && w.contains("3 search-path NXDOMAINs")),
        "{amp:#}"
    );
    assert_eq!(
        amp["trend"]["events"], 6,
        "three misses each for A and AAAA: {amp:#}"
    );
    assert!(amp["advice"].to_string().contains("ndots"), "{amp:#}");
    let timeouts = mine(&report, "dns_timeouts").expect("timeouts");
    assert_eq!(timeouts["severity"], "critical", "{timeouts:#}");
    assert!(
        timeouts["trend"]["events"].as_u64().is_some_and(|n| n >= 2),
        "{timeouts:#}"
    );
    assert!(
        timeouts["why"]
            .as_str()
            .is_some_and(|w| w.contains("re-sent")),
        "{timeouts:#}"
    );
    assert!(
        timeouts["advice"]
            .to_string()
            .contains("single-request-reopen"),
        "{timeouts:#}"
    );
    // Critical before info.
    let rank = |kind: &str| {
        report["findings"].as_array().and_then(|a| {
            a.iter()
                .position(|f| f["kind"] == kind && f["who"]["cgroup"] == path.as_str())
        })
    };
    assert!(
        rank("dns_timeouts") < rank("dns_search_amplification"),
        "{report:#}"
    );
}

/// Answers the reader could not take in time (the daemon stopped while a pod's queries are all
/// answered, so the ring of query events fills) are lost and counted, never reported as
/// timeouts, and do not use up the pod's quota of waiting queries.
#[test]
fn a_full_ring_loses_answers_but_invents_no_timeouts() {
    // Alone: the lost-event and quota counters are the node's, not this lab's.
    let lab = DnsLab::start_alone();
    let path = lab.path();
    // Departures: dns-timeout: queries time out sooner than the 2 s default, to keep the test short.
    let daemon = Daemon::start(&["--dns-timeout", "1s"]);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGSTOP) };
    // 3,000 answered queries: more than the 1 MiB ring holds (~1,700).
    let sent = lab.client_output(&format!(
        "{} dns-client 3000 --dns-server {SERVER_IP}:53",
        *LAB
    ));
    // SAFETY: as above.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGCONT) };
    assert!(sent.contains(r#""created":3000"#), "{sent}");
    let sel = format!(r#"workload="{path}""#);
    let sum = |m: &str, prefix: &str, must: &str| {
        sum_of(m, |l| {
            l.starts_with(prefix) && l.contains(&sel) && l.contains(must)
        })
    };
    let lost = |m: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix("faultline_events_lost_total{source=\"dns\"} "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let m = eventually(Duration::from_secs(30), "the answers the ring held", || {
        let m = daemon.metrics();
        (lost(&m) > 0.0 && sum(&m, "faultline_dns_queries_total{", r#"outcome="answered""#) > 0.0)
            .then_some(m)
    });
    // Past the timeout and a sweep: nothing the kernel saw answered may turn into a timeout.
    std::thread::sleep(Duration::from_secs(3));
    let m2 = daemon.metrics();
    let answered = sum(&m2, "faultline_dns_queries_total{", r#"outcome="answered""#);
    assert_eq!(
        sum(&m2, "faultline_dns_queries_total{", r#"outcome="timeout""#),
        0.0,
        "answered queries reported as timeouts:\n{m2}"
    );
    assert_eq!(
        answered + lost(&m2),
        3000.0,
        "every query is reported or counted lost:\n{m}"
    );
    assert!(
        m2.lines().all(|l| !l
            .starts_with(r#"faultline_dns_untracked_total{reason="cgroup_quota"}"#)
            || l.ends_with(" 0")),
        "answered queries held the quota:\n{m2}"
    );
}
