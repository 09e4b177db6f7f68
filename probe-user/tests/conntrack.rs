//! Conntrack drops, for real, in network namespaces created here: two client namespaces and a
//! server namespace behind a router namespace that SNATs everything to ONE source port, so a
//! second flow cannot be inserted (deterministic `insert_failed`); an NFQUEUE that holds two
//! packets of one new flow so both race to confirm (a resolved clash, no drop); a lowered
//! host-wide `nf_conntrack_max` (table full, restored on every path); a plain DROP rule; and
//! the insert failure again over IPv6. Every namespace is removed and the sysctl restored on
//! drop. Root only.
#![allow(clippy::unwrap_used)] // a test fails by panicking: helpers outside #[test] fns unwrap too

mod common;

use probe_user::kernel::btf::Btf;

use std::{sync::Mutex, time::Duration};

use common::{ctlab::*, *};
use serde_json::Value;

/// `nf_conntrack_max` is host-wide: the cases run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn drops_in(events: &[Value], netns: u64) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| e["kind"] == "conntrack_drop" && e["netns"] == netns)
        .collect()
}

/// Client 1's flow takes the only SNAT port; each of client 2's three queries then loses the
/// clash at confirmation and is dropped.
fn insert_failed_case(plan: &'static Plan) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = CtLab::start(plan);
    let trace = Trace::start(&["--events", "conntrack,dns", "--dns-timeout", "1500ms"]);
    let server = lab.server(53);
    lab.client(1, &format!("1 --dns-server {server}"));
    let before = lab.counters();
    lab.client(2, &format!("3 --dns-server {server}"));
    let after = lab.counters();
    std::thread::sleep(Duration::from_millis(1800)); // the last DNS timeout falls due
    let (events, summary) = trace.stop_json();

    let lost = delta(&before, &after, "insert_failed");
    assert_eq!(lost, 3, "the kernel's insert_failed delta: {after:?}");
    let drops = drops_in(&events, lab.router_inode());
    assert_eq!(
        drops.len() as u64,
        lost,
        "one drop event per lost packet: {events:#?}"
    );
    let client2 = lab.cgroup_path(2);
    for d in &drops {
        assert_eq!(d["cause"], "insert_failed", "{d}");
        assert_eq!(d["proto"], "udp");
        assert_eq!(d["src"], plan.client2);
        assert_eq!(d["dst"], plan.server);
        assert_eq!(d["dport"], 53);
        assert_eq!(
            d["cgroup"],
            client2.as_str(),
            "attributed to the sender: {d}"
        );
        assert!(
            d["evidence"]
                .as_str()
                .is_some_and(|e| e.contains("SNAT") && e.contains(&SNAT_PORT.to_string())),
            "{d}"
        );
        assert!(d["dns"]["id"].as_u64().is_some_and(|id| id < 3), "{d}");
        assert_eq!(d["dns"]["qname"], "bench.test", "{d}");
    }
    // The dropped queries are reported as DNS timeouts that say why.
    let dropped_queries: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "dns" && e["cgroup"] == client2.as_str())
        .collect();
    assert_eq!(dropped_queries.len(), 3, "{events:#?}");
    for q in dropped_queries {
        assert_eq!(q["outcome"], "timeout");
        assert_eq!(q["conntrack_drop"], "insert_failed");
    }
    assert_eq!(summary["conntrack_drops"]["insert_failed"], 3, "{summary}");
    // The kernel's own count, before filters: at least these, all with unconfirmed entries.
    assert!(
        summary["conntrack_kernel"]["unconfirmed"].as_u64() >= Some(3),
        "{summary}"
    );
}

#[test]
fn insert_failed_after_snat_is_reported_per_lost_packet_with_its_sender() {
    insert_failed_case(&V4);
}

#[test]
fn insert_failed_over_ipv6() {
    insert_failed_case(&V6);
}

/// The NAT in a pod's own namespace, as a sidecar's (Istio redirects DNS there): client 2's
/// namespace SNATs its DNS to one source port itself, so its later flows lose the clash at
/// confirmation there, in the sending process's context. As deployed faultline can neither
/// read that namespace's inode nor enter it: it reads its counters through a process in it,
/// and tells each drop as `insert_failed`, attributed to the sender.
#[test]
fn insert_failed_in_a_pods_own_namespace() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = CtLab::start(&V4);
    lab.snat_in_client(2, 41000);
    let trace = Trace::start(&["--events", "conntrack"]);
    let server = lab.server(53);
    lab.client(2, &format!("1 --dns-server {server}"));
    let before = lab.counters_in(lab.client_ns(2));
    lab.client(2, &format!("3 --dns-server {server}"));
    let after = lab.counters_in(lab.client_ns(2));
    let (events, summary) = trace.stop_json();

    let lost = delta(&before, &after, "insert_failed");
    assert_eq!(
        lost, 3,
        "the pod namespace's insert_failed delta: {after:?}"
    );
    let drops = drops_in(&events, lab.client_inode(2));
    assert_eq!(drops.len() as u64, lost, "{events:#?}");
    for d in &drops {
        assert_eq!(d["cause"], "insert_failed", "{d}");
        assert_eq!(d["cgroup"], lab.cgroup_path(2).as_str(), "{d}");
        assert!(
            d["evidence"]
                .as_str()
                .is_some_and(|e| e.contains("SNAT") && e.contains("41000")),
            "{d}"
        );
    }
    assert_eq!(summary["conntrack_drops"]["insert_failed"], 3, "{summary}");
}

/// Two packets of one new flow are held in an NFQUEUE, then released together: both race to
/// confirm their entries and the kernel resolves the clash. Counted, never a drop.
#[test]
fn resolved_clash_is_a_near_miss_not_a_drop() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = CtLab::start(&V4);
    let r = lab.router().to_owned();
    sh(&format!(
        "ip netns exec {r} iptables -I FORWARD -p udp --dport 5355 -j NFQUEUE --queue-num 7"
    ));
    let trace = Trace::start(&["--events", "conntrack"]);
    let before = lab.counters();
    let mut hold = Lab::spawn_in(Some(&r), &["nfqueue-hold", "2", "--queue", "7"]);
    assert!(hold.line().contains("ready"), "nfqueue-hold did not start");
    lab.client(
        1,
        &format!("2 --dns-burst --dns-server {}", lab.server(5355)),
    );
    let held = hold.report().created;
    hold.wait();
    std::thread::sleep(Duration::from_millis(2500)); // one clash poll after the race
    let after = lab.counters();
    let (events, summary) = trace.stop_json();

    assert_eq!(held, 2, "both packets were held");
    let resolved = delta(&before, &after, "clashres");
    // Both packets pass on every kernel of the matrix, but only 6.12 and later count this
    // resolution (the loser behind the router's NAT) in clash_resolve; 5.10 and 6.1 resolve
    // it without a trace in any counter, so there is no near-miss to see.
    let counted = u64::from(kernel_version() >= (6, 12));
    assert_eq!(
        resolved, counted,
        "the kernel resolved {counted} clash(es) here: {after:?}"
    );
    assert_eq!(delta(&before, &after, "insert_failed"), 0);
    let netns = lab.router_inode();
    // As deployed the router's inode is not readable (its only process is another user's):
    // its pause process's cgroup names it.
    let router = lab.router_workload();
    let reported: u64 = events
        .iter()
        .filter(|e| {
            e["kind"] == "conntrack_clash_resolved"
                && (e["netns"] == netns || e["workload"] == router.as_str())
        })
        .map(|e| e["count"].as_u64().expect("count"))
        .sum();
    assert_eq!(reported, resolved, "{events:#?}");
    assert!(drops_in(&events, netns).is_empty(), "no drop: {events:#?}");
    assert_eq!(
        summary["conntrack_clashes_resolved"]
            .as_object()
            .is_some_and(|m| !m.is_empty()),
        counted > 0,
        "{summary}"
    );
}

/// With the host-wide table limit at the router's entry count, new flows get no entry.
#[test]
fn table_full_drops_name_the_limit() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = CtLab::start(&V4);
    let trace = Trace::start(&["--events", "conntrack"]);
    lab.client(1, &format!("1 --dns-server {}", lab.server(53)));
    let before = lab.counters();
    let drops = {
        let _limit = SysctlGuard::set("/proc/sys/net/netfilter/nf_conntrack_max", "1");
        lab.client(2, &format!("2 --dns-server {}", lab.server(53)));
        let after = lab.counters();
        delta(&before, &after, "drop")
    }; // the limit is restored here, and on a panic above
    let (events, _) = trace.stop_json();

    assert_eq!(drops, 2, "the kernel's drop delta");
    let reported = drops_in(&events, lab.router_inode());
    assert_eq!(reported.len(), 2, "{events:#?}");
    for d in reported {
        assert_eq!(d["cause"], "table_full", "{d}");
        assert_eq!(d["src"], V4.client2);
        assert_eq!(d["dport"], 53);
        assert_eq!(d["cgroup"], lab.cgroup_path(2).as_str(), "{d}");
        assert!(
            d["evidence"]
                .as_str()
                .is_some_and(|e| e.contains("nf_conntrack_max=1")),
            "{d}"
        );
    }
}

/// A DROP rule on DNS: cause `rule`, and insert_failed does not move.
#[test]
fn a_drop_rule_is_a_rule_not_an_insert_failure() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = CtLab::start(&V4);
    lab.drop_dns();
    let trace = Trace::start(&["--events", "conntrack"]);
    let before = lab.counters();
    lab.client(1, &format!("2 --dns-server {}", lab.server(53)));
    let after = lab.counters();
    let (events, _) = trace.stop_json();

    assert_eq!(delta(&before, &after, "insert_failed"), 0);
    let reported = drops_in(&events, lab.router_inode());
    assert_eq!(reported.len(), 2, "{events:#?}");
    for d in reported {
        assert_eq!(d["cause"], "rule", "{d}");
        assert_eq!(d["cgroup"], lab.cgroup_path(1).as_str(), "{d}");
    }
}

/// The daemon exports conntrack drops over OTLP like the other events, configured the
/// standard way (OTEL_* variables: endpoint, gzip, a header, resource attributes), and a
/// collector answering 503 at first gets them on the retry.
#[test]
fn conntrack_drops_reach_otlp_configured_by_the_standard_variables() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = CtLab::start(&V4);
    lab.drop_dns();
    let receiver = OtlpReceiver::start_refusing(1);
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    // Departures: node-name: a node name the test asserts.
    let daemon = Daemon::start_with_env(
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=s3cret"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "k8s.cluster.name=lab,deployment.environment=test",
            ),
        ],
        &["--node-name", "node-ct"],
    );
    lab.client(1, &format!("2 --dns-server {}", lab.server(53)));
    let drops = eventually(Duration::from_secs(30), "2 conntrack drop records", || {
        let recs = receiver.records.lock().unwrap().clone();
        let mine: Vec<_> = recs
            .into_iter()
            .filter(|(_, r)| {
                r.event_name == "faultline.conntrack_drop"
                    && r.attributes.iter().any(|kv| {
                        kv.key == "faultline.cgroup" && attr_str(kv) == lab.cgroup_path(1)
                    })
            })
            .collect();
        (mine.len() >= 2).then_some(mine)
    });
    for (resource, rec) in &drops {
        let attr = |k: &str| rec.attributes.iter().find(|kv| kv.key == k).map(attr_str);
        assert_eq!(attr("faultline.cause").as_deref(), Some("rule"));
        assert_eq!(attr("network.transport").as_deref(), Some("udp"));
        assert_eq!(attr("destination.port").as_deref(), Some("53"));
        for (k, v) in [
            ("k8s.cluster.name", "lab"),
            ("k8s.node.name", "node-ct"),
            ("service.name", "faultline"),
        ] {
            assert!(
                resource.contains(&(k.to_owned(), v.to_owned())),
                "{k}={v} missing: {resource:?}"
            );
        }
    }
    let headers = receiver.headers.lock().unwrap().clone();
    assert!(headers.len() >= 2, "a refused request, then its retry");
    for h in &headers {
        assert!(h.contains(&"content-encoding: gzip".to_owned()), "{h:?}");
        assert!(h.contains(&"x-api-key: s3cret".to_owned()), "{h:?}");
    }
    drop(daemon);
}

/// Where conntrack is a module with BTF of its own (Debian's kernels from 5.11: 6.1 and 6.12 of
/// the VM matrix), its types are in split BTF on top of vmlinux (`/sys/kernel/btf/nf_conntrack`):
/// read that way, the module's own structs resolve, and so do the ones vmlinux shares with it,
/// at the same offsets.
#[test]
fn conntrack_module_btf_is_read_on_top_of_vmlinux() {
    if vm_kernel().is_some() {
        sh("modprobe nf_conntrack");
    }
    if !std::path::Path::new("/sys/kernel/btf/nf_conntrack").exists() {
        skipped(
            "no split BTF for nf_conntrack here (built in, or a kernel before 5.11, which has no \
             module BTF): its types are read from vmlinux",
        );
        return;
    }
    let vmlinux = Btf::from_kernel().expect("vmlinux BTF");
    let module = vmlinux
        .with_module("nf_conntrack")
        .expect("nf_conntrack's split BTF");
    let own: Vec<&str> = module
        .struct_names()
        .filter(|n| !vmlinux.has_struct(n))
        .collect();
    assert!(!own.is_empty(), "the module describes no struct of its own");
    for name in &own {
        assert!(module.struct_size(name).is_ok(), "{name}");
    }
    for (strukt, member) in [
        ("nf_conn", "status"),
        ("nf_conn", "tuplehash"),
        ("sk_buff", "_nfct"),
    ] {
        let merged = module
            .member_offset(strukt, member)
            .expect("through the module");
        if let Ok(base) = vmlinux.member_offset(strukt, member) {
            assert_eq!(merged, base, "{strukt}.{member}");
        }
    }
}

/// `faultline explain` on the insert-failure lab: a critical finding for the sender's
/// workload with the clashing SNAT and the DNS advice, and its queries' timeouts blamed on
/// conntrack.
#[test]
fn explain_names_the_insert_failures_sender_and_the_clashing_snat() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = CtLab::start(&V4);
    // Departures: dns-timeout: queries time out sooner than the 2 s default, to keep the test short.
    let daemon = Daemon::start(&["--dns-timeout", "1s"]);
    let server = lab.server(53);
    lab.client(1, &format!("1 --dns-server {server}"));
    lab.client(2, &format!("3 --dns-server {server}"));
    let client2 = lab.cgroup_path(2);
    let find = |report: &Value, kind: &str| finding(report, kind, &client2);
    let report = eventually(Duration::from_secs(20), "conntrack findings", || {
        let report = daemon.explain()?;
        (find(&report, "conntrack_insert_failed").is_some()
            && find(&report, "dns_timeouts").is_some_and(|f| f["trend"]["events"] == 3))
        .then_some(report)
    });
    let f = find(&report, "conntrack_insert_failed").expect("insert_failed");
    assert_eq!(f["severity"], "critical", "{f:#}");
    assert_eq!(f["trend"]["events"], 3, "{f:#}");
    let why = f["why"].as_str().unwrap_or_default();
    assert!(
        why.contains("SNAT") && why.contains(&SNAT_PORT.to_string()),
        "{f:#}"
    );
    assert!(why.contains("3 were DNS queries"), "{f:#}");
    assert!(
        f["advice"].to_string().contains("single-request-reopen"),
        "{f:#}"
    );
    let t = find(&report, "dns_timeouts").expect("timeouts");
    assert!(
        t["why"]
            .as_str()
            .is_some_and(|w| w.contains("conntrack dropped 3")),
        "{t:#}"
    );
}

/// Insert failures in the router's namespace before faultline ran: `explain`, observing for
/// 2 s, reports them from the namespace's own counters (ctnetlink), apart from what it saw.
#[test]
fn explain_reports_the_insert_failures_of_before_it_watched() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = CtLab::start(&V4);
    let server = lab.server(53);
    lab.client(1, &format!("1 --dns-server {server}"));
    lab.client(2, &format!("3 --dns-server {server}"));
    let lost = lab.counters().get("insert_failed").copied().unwrap_or(0);
    assert_eq!(lost, 3, "the kernel's insert_failed: {:?}", lab.counters());
    let out = faultline()
        .args(["explain", "--observe", "--observe-for", "2s", "-o", "json"])
        .args(["--no-kube-api"])
        .output()
        .expect("running faultline explain");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    // As deployed the router's inode is not readable: its pause process's cgroup names it.
    let router = lab.router_workload();
    let f = report["past"]
        .as_array()
        .and_then(|p| {
            p.iter().find(|f| {
                f["kind"] == "conntrack_insert_failed_past" && f["who"]["workload"] == router
            })
        })
        .unwrap_or_else(|| panic!("no conntrack_insert_failed_past of {router}: {report:#}"));
    assert_eq!(f["severity"], "critical", "{f:#}");
    assert_eq!(f["kernel"]["counts"]["conntrack_insert_failed"], 3, "{f:#}");
    // Read through its process's /proc/<pid>/net (as deployed), or ctnetlink inside it (root).
    assert!(
        ["net/stat/nf_conntrack", "ctnetlink"]
            .contains(&f["kernel"]["source"].as_str().unwrap_or("")),
        "{f:#}"
    );
    assert_eq!(f["kernel"]["while_watched"], 0, "{f:#}");
    assert!(
        f["what"].as_str().is_some_and(
            |w| w.contains("since the network namespace was made, conntrack dropped 3 packets")
        ),
        "{f:#}"
    );
    // Nothing of it was seen happen.
    assert!(
        !report["findings"]
            .to_string()
            .contains("conntrack_insert_failed\""),
        "{report:#}"
    );
}
