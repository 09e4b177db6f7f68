//! deploy/: the kustomize base renders and validates against the Kubernetes OpenAPI schemas,
//! the alert rules pass promtool's checks and unit tests, the PrometheusRule carries the same
//! rules, the DaemonSet's capabilities are exactly enough, and every dashboard query parses
//! and returns data from a real Prometheus scraping faultline with induced failures.
//! The tools come from `cargo xtask setup` (target/deploy-tools, Debian's prometheus).
#![allow(clippy::unwrap_used)] // a test fails by panicking: helpers outside #[test] fns unwrap too

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use common::{ctlab::*, manifest::*, *};
use serde_json::Value;

#[test]
fn the_kustomize_base_renders_and_validates() {
    let objects = rendered();
    let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "PriorityClass",
        "DaemonSet",
        "Service",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    // The Prometheus Operator's objects are an optional component: not in the base, and with
    // it the base plus exactly them, each with the `release` label set in one place.
    for kind in ["ServiceMonitor", "PrometheusRule"] {
        assert!(!kinds.contains(&kind), "{kind} in the base: {kinds:?}");
    }
    let monitored = rendered_with_monitoring();
    let monitored_kinds: Vec<&str> = monitored
        .iter()
        .filter_map(|o| o["kind"].as_str())
        .collect();
    assert_eq!(monitored.len(), objects.len() + 2, "{monitored_kinds:?}");
    for kind in ["ServiceMonitor", "PrometheusRule"] {
        let o = monitored
            .iter()
            .find(|o| o["kind"] == kind)
            .unwrap_or_else(|| panic!("{kind} missing with the monitoring component"));
        assert_eq!(o["metadata"]["labels"]["release"], "prometheus", "{kind}");
        assert_eq!(o["metadata"]["namespace"], "faultline", "{kind}");
    }
    assert!(
        monitored
            .iter()
            .filter(|o| o["metadata"]["labels"]["release"].is_string())
            .count()
            == 2,
        "the release label reached objects other than the Operator's"
    );
    let ds = objects.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
    assert_eq!(
        ds["spec"]["template"]["spec"]["nodeSelector"]["kubernetes.io/os"],
        "linux"
    );
    // The image: a locked build from a context without target/ (gigabytes) or .git.
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile.contains("cargo build --release --locked"),
        "{dockerfile}"
    );
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).expect(".dockerignore");
    for excluded in ["target/", ".git/"] {
        assert!(
            ignore.lines().any(|l| l == excluded),
            "{excluded} is sent to docker"
        );
    }
    // Least privilege: pods get/list/watch, events create/patch, token and access reviews
    // (which read nothing), its own /explain; nothing more.
    let role = |name: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == "ClusterRole" && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no ClusterRole {name}"))
    };
    assert_eq!(
        role("faultline")["rules"],
        serde_json::json!([
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
            {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]},
            {"nonResourceURLs": ["/explain"], "verbs": ["get"]}
        ])
    );
    // What a scraper is granted: get on /metrics, nothing else.
    assert_eq!(
        role("faultline-metrics-reader")["rules"],
        serde_json::json!([{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}])
    );
    // The port asks for a token; the kubelet's probes go to the plain health port, the one
    // FAULTLINE_HEALTH_LISTEN names; the ServiceMonitor sends Prometheus' token.
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    let env = |name: &str| {
        container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("no {name}"))
            .to_owned()
    };
    assert_eq!(env("FAULTLINE_KUBE_RBAC"), "true");
    let health_port: u64 = env("FAULTLINE_HEALTH_LISTEN")
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port");
    let port_named = |name: &str| {
        container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no port {name}"))
    };
    assert_eq!(port_named("health"), health_port);
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(container[probe]["httpGet"]["port"], "health", "{probe}");
    }
    let sm = monitored
        .iter()
        .find(|o| o["kind"] == "ServiceMonitor")
        .unwrap();
    assert_eq!(
        sm["spec"]["endpoints"][0]["bearerTokenFile"],
        "/var/run/secrets/kubernetes.io/serviceaccount/token"
    );
    // Every core object against the Kubernetes OpenAPI schema (the Prometheus Operator's CRDs
    // are not in it: their rules are checked by promtool below).
    let dir = std::env::temp_dir().join(unique("rendered"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut files = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        if o["apiVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("monitoring.coreos.com/"))
        {
            continue;
        }
        let f = dir.join(format!("{i}.json"));
        std::fs::write(&f, o.to_string()).expect("writing an object");
        files.push(f);
    }
    let report = output(
        Command::new(deploy_tool("kubernetes-validate"))
            .args(["--strict", "--kubernetes-version", "1.33.0"])
            .args(&files),
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        report
            .lines()
            .filter(|l| l.contains(" passed for resource "))
            .count(),
        files.len(),
        "{report}"
    );
}

#[test]
fn alert_rules_pass_promtool_and_the_prometheusrule_carries_them() {
    let alerts = root().join("deploy/alerts");
    output(
        Command::new("promtool")
            .args(["check", "rules"])
            .arg(alerts.join("faultline-rules.yaml")),
    );
    output(
        Command::new("promtool")
            .args(["test", "rules"])
            .arg(alerts.join("faultline-rules.test.yaml"))
            .arg(alerts.join("faultline-limits.test.yaml"))
            .arg(alerts.join("faultline-fleet.test.yaml")),
    );
    let plain =
        yaml_docs(&std::fs::read_to_string(alerts.join("faultline-rules.yaml")).expect("rules"));
    let operator = rendered_with_monitoring()
        .into_iter()
        .find(|o| o["kind"] == "PrometheusRule")
        .expect("PrometheusRule");
    assert_eq!(
        operator["spec"], plain[0],
        "deploy/monitoring/prometheusrule.yaml and alerts/faultline-rules.yaml differ"
    );
    // Every alert has a runbook section.
    let runbook = std::fs::read_to_string(root().join("deploy/RUNBOOK.md")).expect("runbook");
    for rule in plain[0]["groups"][0]["rules"].as_array().expect("rules") {
        let name = rule["alert"].as_str().expect("alert name");
        assert!(
            runbook.contains(&format!("## {name}\n")),
            "no runbook section for {name}"
        );
    }
}

/// What the agent's own process may use on a large node (series, caches, buffers), on top
/// of its eBPF maps; deploy/README.md derives the DaemonSet's limit from the same figures.
const AGENT_BUDGET: u64 = 48 << 20;
/// The node the limit must hold: 192 possible CPUs (the maps are preallocated: how many
/// cgroups it runs does not change their size).
const BIG_NODE_CPUS: u64 = 192;

fn mebibytes(quantity: &str) -> u64 {
    let n: u64 = quantity
        .strip_suffix("Mi")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a memory quantity in Mi: {quantity}"));
    n << 20
}

/// The programs loaded on this kernel, their maps as the kernel created them, costed for a
/// 192-CPU node (the per-CPU hashes sized to its CPU count as the loader would), plus the
/// agent's measured peak RSS within its budget: inside the limit.
#[test]
fn the_memory_limit_holds_a_192_cpu_node() {
    require_root();
    let objects = rendered();
    let ds = objects
        .iter()
        .find(|o| o["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let resources = &ds["spec"]["template"]["spec"]["containers"][0]["resources"];
    let limit = mebibytes(
        resources["limits"]["memory"]
            .as_str()
            .expect("a memory limit"),
    );
    let probes = probe_user::kernel::loader::Probes::open(&Default::default(), Default::default())
        .expect("loading the programs");
    let maps = probes.loaded_maps();
    let cpus = BIG_NODE_CPUS;
    let kernel = probe_user::kernel::inventory::maps_memory(&maps, cpus);
    // Every per-CPU hash stays within its budget on the big node (the loader sizes it).
    for m in maps.iter().filter(|m| m.per_cpu && m.hash) {
        let bytes = m.bytes(cpus);
        assert!(
            bytes <= probe_user::kernel::inventory::PER_CPU_HASH_BUDGET,
            "{} takes {} MiB on {cpus} CPUs",
            m.name,
            bytes >> 20
        );
    }
    assert!(
        kernel + AGENT_BUDGET <= limit,
        "maps {} MiB on {cpus} CPUs + agent {} MiB > limit {} MiB",
        kernel >> 20,
        AGENT_BUDGET >> 20,
        limit >> 20
    );
    drop(probes);
    // The agent's peak RSS (at start: the kernel's BTF is parsed once) stays inside its budget.
    let daemon = Daemon::start(&[]);
    let report = lab(&["threads", "500", "--comm", "fl-rss"]);
    assert_eq!(report.created, 500);
    for _ in 0..5 {
        let _ = daemon.metrics();
        std::thread::sleep(Duration::from_millis(300));
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.child.id()))
        .expect("the daemon's status");
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    eprintln!(
        "maps on a {cpus}-CPU node: {} MiB; agent peak RSS here: {} MiB",
        kernel >> 20,
        peak_kib >> 10
    );
    assert!(peak_kib << 10 <= AGENT_BUDGET, "peak RSS {peak_kib} KiB");
}

#[test]
fn the_daemonset_capabilities_are_exactly_enough() {
    probe_user::kernel::tracefs::Tracefs::find_or_mount()
        .expect("tracefs (mounted by the DaemonSet's hostPath)");
    let objects = rendered();
    let ds = objects
        .iter()
        .find(|o| o["kind"] == "DaemonSet")
        .expect("DaemonSet");
    let sc = &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_ne!(sc["privileged"], true);
    let caps: Vec<String> = sc["capabilities"]["add"]
        .as_array()
        .expect("capabilities")
        .iter()
        .map(|c| format!("+{}", c.as_str().unwrap_or("").to_lowercase()))
        .collect();
    // The daemon with only those capabilities in its bounding set (so in its effective set).
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut setpriv = Command::new("setpriv");
    setpriv
        .arg(format!("--bounding-set=-all,{}", caps.join(",")))
        .arg(&*FAULTLINE);
    as_shipped(&mut setpriv);
    run_departures(&mut setpriv);
    let mut child = setpriv
        // Departure: a port of its own; no API.
        .args(["--listen", &listen, "--no-kube-api"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("setpriv");
    let ready = eventually(
        Duration::from_secs(60),
        "/readyz with reduced capabilities",
        || {
            http_get(port, "/readyz")
                .filter(|(s, _)| *s == 200)
                .and_then(|_| http_get(port, "/metrics"))
        },
    );
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    for probe in ["clone", "tasks", "dns", "conntrack"] {
        assert!(
            ready
                .1
                .contains(&format!("faultline_probe_attached{{probe=\"{probe}\"}} 1")),
            "{probe} not attached with {caps:?}:\n{}",
            ready.1
        );
    }
    // setpriv exec'd faultline: its bounding set is the manifest's capabilities less any this
    // machine's own bounding set lacks (this kind of machine has no CAP_SYS_RESOURCE to give);
    // once attached, it keeps only CAP_BPF and CAP_NET_ADMIN in effect.
    let field = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    let ours = std::fs::read_to_string("/proc/self/status").expect("our status");
    let number = |cap: &str| {
        probe_common::caps::number(cap.trim_start_matches('+'))
            .unwrap_or_else(|| panic!("{cap}: not a capability"))
    };
    let manifest: u64 = caps.iter().map(|c| 1u64 << number(c)).sum();
    assert_eq!(
        field(&status, "CapBnd:"),
        manifest & field(&ours, "CapBnd:"),
        "CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_RESOURCE and CAP_SYSLOG only:\n{status}"
    );
    assert_eq!(
        field(&status, "CapEff:"),
        (1 << number("BPF")) | (1 << number("NET_ADMIN")),
        "CAP_BPF and CAP_NET_ADMIN after attaching:\n{status}"
    );
    // The node namespace's conntrack counters were readable (ctnetlink).
    assert!(
        ready.1.contains("faultline_conntrack_max "),
        "no conntrack counters with {caps:?}:\n{}",
        ready.1
    );
}

/// Dashboard variables replaced the way Grafana would for "All" over a short range.
fn concrete(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s")
        .replace("$__range", "5m")
        .replace("$cluster", ".*")
        .replace("$node", ".*")
        .replace("$namespace", ".*")
        .replace("$pod", ".*")
}

fn dashboard_exprs() -> Vec<(String, String)> {
    let mut exprs = Vec::new();
    for entry in std::fs::read_dir(root().join("deploy/dashboards")).expect("dashboards") {
        let path = entry.expect("entry").path();
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read"))
            .expect("dashboard JSON");
        let vars: Vec<&str> = d["templating"]["list"]
            .as_array()
            .expect("variables")
            .iter()
            .filter_map(|v| v["name"].as_str())
            .collect();
        for var in ["datasource", "cluster"] {
            assert!(vars.contains(&var), "{}: no {var} variable", path.display());
        }
        for panel in d["panels"].as_array().expect("panels") {
            let title = &panel["title"];
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
            assert!(
                panel["fieldConfig"]["defaults"]["unit"].is_string(),
                "{title}: no unit"
            );
            if panel["type"] == "table" {
                // A table of totals over the range: one instant query, not a time series.
                for t in panel["targets"].as_array().expect("targets") {
                    assert_eq!(
                        (&t["instant"], &t["format"]),
                        (&Value::Bool(true), &Value::from("table")),
                        "{title}"
                    );
                }
                // Each pod row leads to the pod dashboard.
                if panel["targets"][0]["expr"]
                    .as_str()
                    .is_some_and(|e| e.contains("pod"))
                {
                    assert!(
                        panel.to_string().contains("/d/faultline-pod/"),
                        "{title}: no link to the pod dashboard"
                    );
                }
            }
            for t in panel["targets"].as_array().expect("targets") {
                assert!(
                    t["expr"]
                        .as_str()
                        .is_some_and(|e| e.contains(r#"cluster=~"$cluster""#)),
                    "{title}: a query without the cluster variable"
                );
                exprs.push((
                    format!("{} / {}", d["title"], panel["title"]),
                    t["expr"].as_str().expect("expr").to_owned(),
                ));
            }
        }
    }
    exprs
}

#[test]
fn every_dashboard_query_parses_and_returns_data() {
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 10, "{exprs:#?}");
    // Parse: promtool checks them as recording rules.
    let rules = std::env::temp_dir().join(unique("dashboard-rules.yaml"));
    let body: String = exprs
        .iter()
        .enumerate()
        .map(|(i, (_, e))| {
            format!(
                "      - record: dashboard:expr{i}\n        expr: {}\n",
                serde_json::to_string(&concrete(e)).unwrap()
            )
        })
        .collect();
    std::fs::write(
        &rules,
        format!("groups:\n  - name: dashboards\n    rules:\n{body}"),
    )
    .expect("rules file");
    output(
        Command::new("promtool")
            .args(["check", "rules"])
            .arg(&rules),
    );
    let _ = std::fs::remove_file(&rules);

    // Data: a lab run scraped by a real Prometheus, with failures and task creation in a pod.
    let uid = format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), 0x300);
    const CID: &str = "f0f00c6b1a2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f";
    // A second pod leaks threads towards its pids limit, for the time to exhaustion.
    let leak_uid = format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), 0x301);
    const LEAK_CID: &str = "f1f10c6b1a2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f";
    let logs = KubeletLogs::new(&[
        ("shop", "dash-1", &uid, "app", CID),
        ("shop", "leaky-1", &leak_uid, "app", LEAK_CID),
    ]);
    let cg = PodCgroup::systemd(&unique("dash"), &uid, CID, 8);
    let leak_cg = PodCgroup::systemd(&unique("dash-leak"), &leak_uid, LEAK_CID, 1000);
    // A short trend window: a leak's time to exhaustion is known within seconds.
    // Departures: kubelet-logs: the test's pods are named by kubelet log directories of its own; trend-window: a trend window of seconds, for a test of seconds.
    let daemon = Daemon::start(&["--kubelet-logs", &logs.arg(), "--trend-window", "10s"]);
    // The fleet dashboard reads what the fleet recording rules record.
    let prom = Prometheus::start_with_rules(
        &Prometheus::job(&[(daemon.port, "test-node")]),
        &[&root().join("deploy/alerts/faultline-rules.yaml")],
    );
    for _ in 0..3 {
        cg.lab(&["threads", "20", "--comm", "fl-dash", "--max-failures", "2"]);
        std::thread::sleep(Duration::from_secs(2));
    }
    // DNS and conntrack from the same pod: a DNS server behind a router that SNATs to one
    // port. The pod's first query is answered and takes the port; its next two (from new
    // sockets) lose the insert race, time out, and the second is a retransmit. Then two
    // packets held in an NFQUEUE race to confirm: a resolved clash.
    let ct = CtLab::start(&V4);
    let server = ct.server(53);
    let dns_server = Lab::spawn_in(
        Some(ct.server_ns()),
        &["dns-server", "60", "--dns-listen", &server],
    );
    std::thread::sleep(Duration::from_millis(300));
    let pod_dirs = cg.dirs();
    ct.client_in(2, &pod_dirs, &format!("1 --dns-server {server}"));
    ct.client_in(
        2,
        &pod_dirs,
        // A resolver retrying from a new socket keeps its query's id: a retransmit.
        &format!("2 --dns-new-socket --dns-keep-id --dns-server {server}"),
    );
    sh(&format!(
        "ip netns exec {} iptables -I FORWARD -p udp --dport 5355 -j NFQUEUE --queue-num 7",
        ct.router()
    ));
    let mut hold = Lab::spawn_in(Some(ct.router()), &["nfqueue-hold", "2", "--queue", "7"]);
    assert!(hold.line().contains("ready"), "nfqueue-hold did not start");
    ct.client(
        1,
        &format!("2 --dns-burst --dns-server {}", ct.server(5355)),
    );
    assert_eq!(hold.report().created, 2);
    // A time to exhaustion exists only while the use grows: the leak runs while its query is
    // asked (a thread every 100 ms, its limit of 1000 about 90 s away).
    let mut leak_args: Vec<String> = "threads 500 --comm fl-dash-leak --interval-ms 100"
        .split(' ')
        .map(String::from)
        .collect();
    leak_args.extend(leak_cg.join_args());
    let leak_args: Vec<&str> = leak_args.iter().map(String::as_str).collect();
    for (panel, expr) in &exprs {
        let q = concrete(expr);
        let _leak = expr
            .contains("faultline_limit_exhaustion_seconds")
            .then(|| Lab::spawn(&leak_args));
        eventually(
            Duration::from_secs(30),
            &format!("data for {panel}: {q}"),
            || prom.series(&q).filter(|n| *n > 0),
        );
    }
    drop(prom);
    drop(daemon);
    drop(dns_server);
}

/// The fleet view on a real Prometheus: three agents (three nodes by name, as their scrape
/// labels them) scraped by one Prometheus evaluating the fleet recording rules; a pod near its
/// pids limit has task creation refused. Every node is ranked, and the fleet dashboard's
/// rankings name the pod on each. (Three agents on one machine see the same pod: what differs
/// between nodes here is only the name, which is what the rules group by.)
#[test]
fn the_fleet_rules_rank_three_nodes_in_a_real_prometheus() {
    let uid = format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), 0x302);
    const CID: &str = "f2f20c6b1a2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f";
    let logs = KubeletLogs::new(&[("fleet", "near-1", &uid, "app", CID)]);
    let cg = PodCgroup::systemd(&unique("fleet"), &uid, CID, 8);
    let nodes = ["node-a", "node-b", "node-c"];
    let daemons: Vec<Daemon> = nodes
        .iter()
        .map(|node| {
            // Departure: kubelet-logs: the test's pod is named by a kubelet log directory of its own.
            Daemon::start_with_env(&[("NODE_NAME", node)], &["--kubelet-logs", &logs.arg()])
        })
        .collect();
    let targets: Vec<(u16, &str)> = daemons.iter().map(|d| d.port).zip(nodes).collect();
    let prom = Prometheus::start_with_rules(
        &Prometheus::job(&targets),
        &[&root().join("deploy/alerts/faultline-rules.yaml")],
    );
    // The pod fills its 8 pids, has 2 creations refused, and holds its threads meanwhile.
    let mut held = cg.spawn(&[
        "threads",
        "20",
        "--comm",
        "fl-fleet",
        "--max-failures",
        "2",
        "--hold-ms",
        "60000",
    ]);
    assert_eq!(held.report().failures, 2);
    let pod = r#"namespace="fleet",pod="near-1""#;
    for (what, query) in [
        (
            "nodes ranked by pid_max in use",
            "node:faultline_pid_max:used_ratio".to_owned(),
        ),
        (
            "nodes ranked by threads-max in use",
            "node:faultline_threads_max:used_ratio".to_owned(),
        ),
        (
            "nodes ranked by a pod's pids headroom",
            "node:faultline_pids_headroom:min_ratio".to_owned(),
        ),
        (
            "the pod's pids headroom on each node",
            format!("workload:faultline_pids_headroom:ratio{{{pod}}}"),
        ),
        (
            "the pod's refusals on each node",
            format!(
                "workload:faultline_clone_failures:increase5m{{{pod},cause=\"pids_limit\"}} > 0"
            ),
        ),
    ] {
        let found = within(Duration::from_secs(30), || {
            prom.series(&query).filter(|n| *n == nodes.len())
        });
        assert!(
            found.is_some(),
            "{what}: not on {} nodes in 30 s; {query} is {}; the pod's headroom: {}",
            nodes.len(),
            prom.raw(&query),
            prom.raw(&format!("faultline_pids_headroom{{{pod}}}"))
        );
    }
    // The pod's pids are all in use: the least headroom on each node.
    for node in nodes {
        let q = format!(r#"node:faultline_pids_headroom:min_ratio{{node="{node}"}}"#);
        let left = eventually(Duration::from_secs(30), &q, || prom.value(&q));
        assert!((0.0..0.5).contains(&left), "{q}: {left}");
    }
    // The fleet dashboard's pod ranking names the pod once per node.
    let ranking =
        concrete(r#"bottomk(20, workload:faultline_pids_headroom:ratio{cluster=~"$cluster"})"#);
    assert!(
        dashboard_exprs()
            .iter()
            .any(|(_, e)| concrete(e) == ranking),
        "the fleet dashboard no longer ranks pods by headroom"
    );
    let ranked = eventually(Duration::from_secs(30), &ranking, || {
        prom.series(&format!(
            "{ranking} and workload:faultline_pids_headroom:ratio{{{pod}}}"
        ))
        .filter(|n| *n >= nodes.len())
    });
    assert!(ranked >= nodes.len());
    drop(held);
    drop(prom);
    drop(daemons);
}

/// The Prometheus Operator's path. The scrape job it generates for the ServiceMonitor of
/// deploy/monitoring/, reproduced as a static job (no Kubernetes service discovery here): the discovery labels of
/// the agent's pod, the Operator's own target relabelings (namespace, service, pod, container,
/// job, endpoint: the *agent's*), then the ServiceMonitor's relabelings, with honor_labels from
/// its honorLabels, and its bearerTokenFile as the job's credentials file (Prometheus' service
/// account token, here one a stand-in API knows). The daemon asks for tokens as deployed. The
/// failing pod's labels must survive on its series, and node totals must not be attributed to
/// the agent's pod.
#[test]
fn the_operator_scrape_keeps_the_failing_pods_labels() {
    let sm = rendered_with_monitoring()
        .into_iter()
        .find(|o| o["kind"] == "ServiceMonitor")
        .expect("ServiceMonitor");
    assert_eq!(
        sm["metadata"]["labels"]["release"], "prometheus",
        "kube-prometheus-stack's selector"
    );
    let endpoint = &sm["spec"]["endpoints"][0];
    let honor = endpoint["honorLabels"].as_bool().unwrap_or(false);
    assert_eq!(
        endpoint["bearerTokenFile"], "/var/run/secrets/kubernetes.io/serviceaccount/token",
        "Prometheus sends its service account's token"
    );
    let api = review_api::ReviewApi::start(vec![review_api::Grant {
        token: "prometheus-sa-token",
        user: "system:serviceaccount:monitoring:prometheus",
        paths: &["/metrics"],
    }]);
    let token = std::env::temp_dir().join(unique("prometheus-sa-token"));
    let _token = TempFile::new(&token, b"prometheus-sa-token\n");
    let mut relabel = String::new();
    for r in endpoint["relabelings"].as_array().expect("relabelings") {
        relabel += "  - action: ";
        relabel += r["action"].as_str().unwrap_or("replace");
        relabel += "\n";
        if let Some(s) = r["sourceLabels"].as_array() {
            let names: Vec<&str> = s.iter().filter_map(Value::as_str).collect();
            relabel += &format!("    source_labels: [{}]\n", names.join(", "));
        }
        for (from, to) in [
            ("targetLabel", "target_label"),
            ("regex", "regex"),
            ("replacement", "replacement"),
        ] {
            if let Some(v) = r[from].as_str() {
                relabel += &format!("    {to}: '{v}'\n");
            }
        }
    }

    let uid = format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), 0x400);
    const CID: &str = "0a0b0c6b1a2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f";
    let logs = KubeletLogs::new(&[("shop", "op-1", &uid, "app", CID)]);
    let cg = PodCgroup::systemd(&unique("operator"), &uid, CID, 8);
    // Departures: kubelet-logs: the test's pods are named by kubelet log directories of its
    // own; the stand-in API (reviewing the tokens as the DaemonSet asks: FAULTLINE_KUBE_RBAC).
    let daemon = Daemon::start_with_env(
        &[("FAULTLINE_KUBE_RBAC", "true")],
        &[
            "--kubelet-logs",
            &logs.arg(),
            "--kubeconfig",
            &api.kubeconfig(),
        ],
    );
    assert_eq!(
        http_get(daemon.port, "/metrics").map(|(s, _)| s),
        Some(401),
        "the port asks for a token"
    );
    let job = format!(
        "- job_name: serviceMonitor/faultline/faultline/0\n  honor_labels: {honor}\n  authorization:\n    credentials_file: {token}\n  static_configs:\n  - targets: ['127.0.0.1:{port}']\n    labels:\n      __meta_kubernetes_namespace: faultline\n      __meta_kubernetes_service_name: faultline\n      __meta_kubernetes_pod_name: faultline-x7k2p\n      __meta_kubernetes_pod_container_name: faultline\n      __meta_kubernetes_pod_node_name: node-1\n  relabel_configs:\n  - source_labels: [__meta_kubernetes_namespace]\n    target_label: namespace\n  - source_labels: [__meta_kubernetes_service_name]\n    target_label: service\n  - source_labels: [__meta_kubernetes_pod_name]\n    target_label: pod\n  - source_labels: [__meta_kubernetes_pod_container_name]\n    target_label: container\n  - source_labels: [__meta_kubernetes_service_name]\n    target_label: job\n  - target_label: endpoint\n    replacement: metrics\n{relabel}",
        port = daemon.port,
        token = token.display(),
    );
    let prom = Prometheus::start_with_job(&job);
    cg.lab(&[
        "threads",
        "20",
        "--comm",
        "fl-operator",
        "--max-failures",
        "2",
    ]);

    let failing = r#"faultline_clone_failures_total{namespace="shop",pod="op-1",container="app",node="node-1",job="faultline"}"#;
    let counted = within(Duration::from_secs(60), || {
        prom.value(failing).filter(|v| *v >= 2.0)
    });
    assert!(
        counted.is_some(),
        "no series of the failing pod with both failures in 60 s; Prometheus holds {}",
        prom.raw("faultline_clone_failures_total")
    );
    assert_eq!(
        prom.series(r#"faultline_clone_failures_total{pod="faultline-x7k2p"}"#),
        Some(0),
        "failures attributed to the agent's pod"
    );
    assert_eq!(
        prom.series(r#"faultline_node_threads{agent_pod="faultline-x7k2p",pod=""}"#),
        Some(1),
        "node totals carry the agent, not a pod"
    );
    assert_eq!(prom.series(r#"up{job="faultline"} == 1"#), Some(1));
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("a directory").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// One edit to deploy: the base renders with no placeholder, its one site-specific value the
/// image in kustomization.yaml's `images:` entry (the DaemonSet names only `faultline`), set by
/// the README's `kustomize edit set image` line (done here as kustomize does it, on a copy: no
/// kustomize CLI in Debian). The one placeholder left is the runbook links' base in the rule
/// files (the Operator's component and the plain rules), which the README's one `sed`
/// rewrites: run on copies, it leaves none and promtool's tests pass.
#[test]
fn every_placeholder_has_one_documented_place() {
    const RUNBOOK_BASE: &str =
        "https://github.com/REPLACE-ME/faultline/blob/main/deploy/RUNBOOK.md";
    let deploy = root().join("deploy");
    let mut with_base = Vec::new();
    for file in files_under(&deploy) {
        let rel = file
            .strip_prefix(root())
            .expect("under the root")
            .to_owned();
        if rel == Path::new("deploy/README.md") {
            continue; // the documentation of the places
        }
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains("REPLACE-ME")) {
            assert!(
                line.contains(RUNBOOK_BASE),
                "{}: a placeholder outside the documented places: {line}",
                rel.display()
            );
            if !with_base.contains(&rel) {
                with_base.push(rel.clone());
            }
        }
    }
    // The image: the DaemonSet's plain name, mapped by the one entry.
    let daemonset = std::fs::read_to_string(deploy.join("daemonset.yaml")).expect("daemonset");
    assert!(
        daemonset.lines().any(|l| l.trim() == "image: faultline"),
        "the DaemonSet names its image `faultline` (kustomization.yaml's images: maps it)"
    );
    let image_of = |objects: Vec<Value>| {
        let ds = objects
            .into_iter()
            .find(|o| o["kind"] == "DaemonSet")
            .expect("DaemonSet");
        ds["spec"]["template"]["spec"]["containers"][0]["image"]
            .as_str()
            .expect("an image")
            .to_owned()
    };
    let base = rendered();
    assert!(
        !serde_json::to_string(&base)
            .expect("JSON")
            .contains("REPLACE-ME"),
        "a placeholder in what `kubectl kustomize deploy/` renders"
    );
    // Unedited: the name a local build gives (`podman build -t faultline:0.1.0`).
    assert_eq!(image_of(base), "localhost/faultline:0.1.0");
    // The README's one edit.
    let readme = std::fs::read_to_string(deploy.join("README.md")).expect("README");
    let set = readme
        .lines()
        .find_map(|l| l.trim().strip_prefix("kustomize edit set image faultline="))
        .expect("deploy/README.md shows `kustomize edit set image faultline=...`");
    let (name, tag) = set.rsplit_once(':').expect("IMAGE:TAG");
    let edited = rendered_after(|text| {
        text.lines()
            .map(|l| match l.trim_start().split_once(':') {
                Some(("newName", _)) => format!("    newName: {name}"),
                Some(("newTag", _)) => format!("    newTag: {tag}"),
                _ => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    });
    assert_eq!(
        image_of(edited),
        set,
        "kustomization.yaml's images: entry maps the image"
    );
    // The README's sed, with each continuation line.
    let mut sed = String::new();
    for line in readme
        .lines()
        .skip_while(|l| !l.starts_with(&format!("sed -i 's|{RUNBOOK_BASE}|")))
    {
        sed += line.trim_end_matches('\\');
        if !line.ends_with('\\') {
            break;
        }
    }
    assert!(
        !sed.is_empty(),
        "deploy/README.md has no sed for {RUNBOOK_BASE}"
    );
    for rel in &with_base {
        assert!(
            sed.contains(&rel.display().to_string()),
            "the README's sed misses {}",
            rel.display()
        );
    }
    // Run on copies: no placeholder left, and the rules' tests still pass.
    let dir = std::env::temp_dir().join(unique("placeholders"));
    for rel in &with_base {
        std::fs::create_dir_all(dir.join(rel).parent().expect("parent")).expect("copy dir");
        std::fs::copy(root().join(rel), dir.join(rel)).expect("a copy");
    }
    output(Command::new("sh").args(["-c", &sed]).current_dir(&dir));
    let left: Vec<String> = with_base
        .iter()
        .filter(|rel| {
            std::fs::read_to_string(dir.join(rel)).is_ok_and(|t| t.contains("REPLACE-ME"))
        })
        .map(|rel| rel.display().to_string())
        .collect();
    let tests = Command::new("promtool")
        .args(["test", "rules"])
        .arg(dir.join("deploy/alerts/faultline-rules.test.yaml"))
        .arg(dir.join("deploy/alerts/faultline-limits.test.yaml"))
        .output()
        .expect("promtool");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(left.is_empty(), "placeholders left after the sed: {left:?}");
    assert!(
        tests.status.success(),
        "promtool test rules after the sed:\n{}",
        String::from_utf8_lossy(&tests.stdout)
    );
}
