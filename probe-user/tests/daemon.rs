//! `faultline run` as a DaemonSet runs it: scraped by a real Prometheus (Debian's package,
//! on loopback), its exposition checked by promtool, stopped by SIGTERM in the middle of an
//! event storm, and kept within its series cap by 500 pods' worth of cgroups. Root only.
#![allow(clippy::unwrap_used)] // a test fails by panicking: helpers outside #[test] fns unwrap too

mod common;

use std::{
    io::Write as _,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

/// The storm test floods every faultline's ring buffer on the node: the tests of this file
/// run one at a time so that none counts another's events as its own losses.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn pod_uid(tag: u32) -> String {
    format!(
        "{:08x}-0000-4000-8000-{:012x}",
        std::process::id(),
        0x200 + tag
    )
}

const CID: &str = "e0e00c6b1a2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f";

#[test]
fn prometheus_scrapes_exact_counts_per_pod_and_promtool_accepts_them() {
    let _serial = serial();
    let uid = pod_uid(1);
    let logs = KubeletLogs::new(&[("shop", "cart-9", &uid, "app", CID)]);
    let cg = PodCgroup::systemd(&unique("daemon"), &uid, CID, 8);
    let events = std::env::temp_dir().join(unique("daemon-events.jsonl"));
    // Departures: kubelet-logs: the test's pods are named by kubelet log directories of its own; events-file: the event lines under test, in a file.
    let daemon = Daemon::start(&[
        "--kubelet-logs",
        &logs.arg(),
        "--events-file",
        &events.display().to_string(),
    ]);
    let prom = Prometheus::start(daemon.port);
    // The agent's own footprint, for its sizing and SLO.
    let own = daemon.metrics();
    for family in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds_total",
        "faultline_build_info{",
    ] {
        assert!(own.contains(family), "{family} missing:\n{own}");
    }

    let report = cg.lab(&[
        "threads",
        "20",
        "--comm",
        "fl-daemon",
        "--max-failures",
        "3",
    ]);
    assert_eq!((report.created, report.failures), (7, 3), "{report:?}");

    let sel = r#"namespace="shop",pod="cart-9",container="app""#;
    let failures = format!(
        r#"sum(faultline_clone_failures_total{{{sel},cause="pids_limit",errno="EAGAIN",task="thread"}})"#
    );
    eventually(
        Duration::from_secs(30),
        "the failures in Prometheus",
        || prom.value(&failures).filter(|v| *v == 3.0),
    );
    let created = format!(r#"faultline_tasks_created_total{{{sel},kind="thread"}}"#);
    eventually(
        Duration::from_secs(30),
        "7 threads created in Prometheus",
        || prom.value(&created).filter(|v| *v == 7.0),
    );
    let limit = format!(r#"faultline_pids_limit{{{sel}}}"#);
    eventually(Duration::from_secs(30), "the pod's pids limit", || {
        prom.value(&limit).filter(|v| *v == 8.0)
    });
    assert!(
        prom.value("faultline_node_threads_max")
            .is_some_and(|v| v > 0.0)
    );
    assert_eq!(prom.value(r#"faultline_build_info"#), Some(1.0));
    assert_eq!(
        prom.value(r#"faultline_events_lost_total{source="clone"}"#),
        Some(0.0)
    );

    // promtool lints the exposition (names, units, _total, help).
    let exposition = daemon.metrics();
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(exposition.as_bytes())
        .expect("feeding promtool");
    let out = promtool.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let (status, stderr, _) = daemon.terminate();
    assert!(status.success(), "{stderr}");
    // The event lines have the trace schema.
    let lines = std::fs::read_to_string(&events).expect("events file");
    let _ = std::fs::remove_file(&events);
    let mine: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("event line is JSON"))
        .filter(|v| v["comm"] == "fl-daemon")
        .collect();
    assert_eq!(mine.len(), 3, "{lines}");
    assert!(
        mine.iter()
            .all(|e| e["kind"] == "clone_failure" && e["pod"]["name"] == "cart-9"),
        "{mine:#?}"
    );
}

/// eBPF program ids a process holds, from its fds.
fn prog_ids(pid: u32) -> Vec<u32> {
    let mut ids = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(info) = std::fs::read_to_string(fd.path()) {
            ids.extend(
                info.lines()
                    .filter_map(|l| l.strip_prefix("prog_id:"))
                    .filter_map(|v| v.trim().parse::<u32>().ok()),
            );
        }
    }
    ids
}

#[test]
fn sigterm_during_an_event_storm_exits_cleanly_and_detaches_everything() {
    let _serial = serial();
    let cg = PodCgroup::systemd(&unique("storm"), &pod_uid(2), CID, 4);
    let daemon = Daemon::start(&[]);
    let ids = prog_ids(daemon.child.id());
    assert!(
        ids.len() >= 9,
        "expected the clone and task programs, found {ids:?}"
    );
    // Fails clone as fast as it can, for up to 50,000 attempts.
    let mut storm = cg.spawn(&[
        "threads",
        "50000",
        "--comm",
        "fl-storm",
        "--max-failures",
        "50000",
    ]);
    std::thread::sleep(Duration::from_millis(700));
    let (status, stderr, secs) = daemon.terminate();
    assert!(status.success(), "exit {status}: {stderr}");
    assert!(secs < 5.0, "took {secs:.1} s to stop");
    // It says how many events were lost, whatever the number.
    assert!(
        stderr.contains(" lost (ring buffer or queue full"),
        "{stderr}"
    );
    for id in ids {
        let out = Command::new("bpftool")
            .args(["prog", "show", "id", &id.to_string()])
            .output()
            .expect("bpftool");
        assert!(
            !out.status.success(),
            "program {id} still loaded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let _ = storm.report();
}

#[test]
fn five_hundred_pods_stay_within_the_series_cap() {
    let _serial = serial();
    let (unified, _) =
        mount(probe_user::attribution::cgroups::Hierarchy::Unified).expect("cgroup v2");
    // The shared levels are owned once and removed after every pod's (locals drop in reverse).
    let base = CgroupTree::new(
        &unified,
        &format!("{}/kubepods/besteffort", unique("cardinality")),
    );
    let trees: Vec<CgroupTree> = (0..500u32)
        .map(|i| CgroupTree::new(&base.leaf().dir, &format!("pod{}/{CID}", pod_uid(1000 + i))))
        .collect();
    // Departures: max-series: the series cap under test.
    let daemon = Daemon::start(&["--max-series", "50"]);
    let mut args = vec![
        "hop".to_owned(),
        "1".to_owned(),
        "--comm".to_owned(),
        "fl-hop".to_owned(),
    ];
    for t in &trees {
        args.extend(["--cgroup".to_owned(), t.leaf().dir.display().to_string()]);
    }
    let report = lab(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(report.created, 500);
    // The overflow series has every label `_overflow`, its kind too.
    let forks = |text: &str| -> f64 {
        sum_of(text, |l| {
            l.starts_with("faultline_tasks_created_total{")
                && (l.contains(r#"kind="process""#) || l.contains(r#"pod="_overflow""#))
        })
    };
    // Every fork is counted, in a pod's series or in the overflow one.
    let text = eventually(Duration::from_secs(30), "all 500 forks counted", || {
        let m = daemon.metrics();
        (forks(&m) >= 500.0).then_some(m)
    });
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("faultline_tasks_created_total{"))
        .collect();
    let overflow = series
        .iter()
        .filter(|l| l.contains(r#"pod="_overflow""#))
        .count();
    assert_eq!(overflow, 1, "one overflow series: {series:#?}");
    // The cap counts series: 50 of them (a thread and a process series per workload).
    assert!(
        series.len() - overflow <= 50,
        "{} series past the cap of 50",
        series.len() - overflow
    );
    let overflowed = text
        .lines()
        .find_map(|l| l.strip_prefix(r#"faultline_series_overflow_total{metric="tasks_created"} "#))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(overflowed >= 450.0, "{overflowed} updates went to overflow");
    drop(daemon);
    drop(trees);
    drop(base);
}

/// An OTLP/HTTP receiver on loopback that decodes the real protobuf requests.
#[test]
fn otlp_log_records_carry_k8s_attributes_and_real_times() {
    let _serial = serial();
    let uid = pod_uid(3);
    let logs = KubeletLogs::new(&[("shop", "cart-otlp", &uid, "app", CID)]);
    let cg = PodCgroup::systemd(&unique("otlp"), &uid, CID, 6);
    let receiver = OtlpReceiver::start();
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    // Departures: kubelet-logs: the test's pods are named by kubelet log directories of its own; otlp-endpoint: the OTLP collector under test (the manifest leaves it to the user); node-name: a node name the test asserts.
    let daemon = Daemon::start(&[
        "--otlp-endpoint",
        &endpoint,
        "--kubelet-logs",
        &logs.arg(),
        "--node-name",
        "node-otlp",
    ]);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let report = cg.lab(&["threads", "20", "--comm", "fl-otlp", "--max-failures", "3"]);
    let after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mine = eventually(Duration::from_secs(20), "3 log records", || {
        let mine = receiver.records_of("fl-otlp");
        (mine.len() as u64 == report.failures).then_some(mine)
    });
    for (resource, rec) in &mine {
        let attr = |k: &str| rec.attributes.iter().find(|kv| kv.key == k).map(attr_str);
        // The pod is the record's subject: its attributes are on the resource it is exported
        // under, once, and not on the record; an event has attributes and no body.
        for (k, v) in [
            ("k8s.namespace.name", "shop"),
            ("k8s.pod.name", "cart-otlp"),
            ("k8s.container.name", "app"),
            ("k8s.pod.uid", uid.as_str()),
            ("k8s.node.name", "node-otlp"),
            ("service.name", "faultline"),
        ] {
            let values: Vec<&str> = resource
                .iter()
                .filter(|(key, _)| key == k)
                .map(|(_, value)| value.as_str())
                .collect();
            assert_eq!(values, [v], "{k} on the resource: {resource:?}");
        }
        assert!(
            !rec.attributes.iter().any(|kv| kv.key.starts_with("k8s.")),
            "{:?}",
            rec.attributes
        );
        assert!(rec.body.is_none(), "{:?}", rec.body);
        assert_eq!(attr("faultline.cause").as_deref(), Some("pids_limit"));
        assert_eq!(attr("process.pid"), Some(report.pid.to_string()));
        assert!(
            (before - 1_000_000_000..=after + 1_000_000_000).contains(&rec.time_unix_nano),
            "{} not in [{before}, {after}]",
            rec.time_unix_nano
        );
        assert_eq!(rec.event_name, "faultline.clone_failure");
    }
    drop(daemon);
}

#[test]
fn a_dead_otlp_collector_costs_dropped_events_not_a_stuck_daemon() {
    let _serial = serial();
    // Accepts connections and never answers.
    let black_hole = TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!(
        "http://127.0.0.1:{}",
        black_hole.local_addr().expect("addr").port()
    );
    let cg = PodCgroup::systemd(&unique("otlp-slow"), &pod_uid(4), CID, 4);
    // The event budget lifted: a record per failure.
    // Departures: otlp-endpoint: the OTLP collector under test (the manifest leaves it to the user); a line for every event (the budget is tested apart).
    let daemon = Daemon::start(&[&["--otlp-endpoint", &endpoint], NO_BUDGET].concat());
    let storm = cg.lab(&[
        "threads",
        "20000",
        "--comm",
        "fl-otlp-slow",
        "--max-failures",
        "20000",
    ]);
    assert!(storm.failures > 10_000, "{storm:?}");
    let value = |text: &str, name: &str| sum_of(text, |l| l.starts_with(name));
    // The daemon keeps answering and counting while the exporter drops.
    let started = Instant::now();
    eventually(
        Duration::from_secs(20),
        "dropped OTLP events counted",
        || (value(&daemon.metrics(), "faultline_otlp_dropped_events_total") > 0.0).then_some(()),
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    // Records read but still queued behind the exporter are counted as the pipeline takes
    // them: every failure ends up counted or lost.
    let all = |m: &str| {
        value(m, "faultline_clone_failures_total{") + value(m, "faultline_events_lost_total{")
    };
    let mut seen = 0.0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen < storm.failures as f64 && Instant::now() < deadline {
        seen = all(&daemon.metrics());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        seen >= storm.failures as f64,
        "counted + lost {seen} < {}",
        storm.failures
    );
    let (status, stderr, _) = daemon.terminate();
    assert!(status.success(), "{stderr}");
    drop(black_hole);
}

/// Only the logs endpoint set (per signal, used as is), with its own headers and compression:
/// log records arrive with them, and nothing asks for traces.
#[test]
fn otlp_logs_only_with_per_signal_headers_and_compression() {
    let _serial = serial();
    let cg = PodCgroup::systemd(&unique("otlp-logs"), &pod_uid(5), CID, 4);
    let receiver = OtlpReceiver::start();
    let logs = format!("http://127.0.0.1:{}/v1/logs", receiver.port);
    let daemon = Daemon::start_with_env(
        &[
            ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", &logs),
            ("OTEL_EXPORTER_OTLP_LOGS_HEADERS", "x-tenant=team%20a"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=general"),
            ("OTEL_EXPORTER_OTLP_LOGS_COMPRESSION", "gzip"),
        ],
        &[],
    );
    let report = cg.lab(&[
        "threads",
        "20",
        "--comm",
        "fl-otlp-logs",
        "--max-failures",
        "3",
    ]);
    eventually(Duration::from_secs(20), "the log records", || {
        (receiver.records_of("fl-otlp-logs").len() as u64 == report.failures).then_some(())
    });
    let headers = receiver.headers.lock().unwrap().clone();
    assert!(!headers.is_empty());
    for request in &headers {
        assert_eq!(request[0], "post /v1/logs http/1.1", "{request:?}");
        assert!(
            request.contains(&"x-tenant: team a".to_owned()),
            "{request:?}"
        );
        assert!(
            request.contains(&"content-encoding: gzip".to_owned()),
            "{request:?}"
        );
    }
    let (status, stderr, _) = daemon.terminate();
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("OTLP: logs to http://127.0.0.1:")
            && stderr.contains("traces not exported"),
        "{stderr}"
    );
}

/// A collector that is down for a while and comes back on the same port: every record
/// emitted meanwhile (fewer than the exporter's queue) arrives, none is dropped.
#[test]
fn an_otlp_collector_down_and_back_loses_nothing_within_the_queue() {
    let _serial = serial();
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let cg = PodCgroup::systemd(&unique("otlp-back"), &pod_uid(6), CID, 4);
    let endpoint = format!("http://127.0.0.1:{port}");
    // Departures: otlp-endpoint: the OTLP collector under test (the manifest leaves it to the user); a line for every event (the budget is tested apart).
    let daemon = Daemon::start(&[&["--otlp-endpoint", &endpoint], NO_BUDGET].concat());
    let report = cg.lab(&[
        "threads",
        "1000",
        "--comm",
        "fl-otlp-back",
        "--max-failures",
        "1000",
    ]);
    assert!(report.failures >= 500, "{report:?}");
    // Down for 5 s more (refused connections), then back.
    std::thread::sleep(Duration::from_secs(5));
    let receiver = OtlpReceiver::start_on(port);
    let mine = || receiver.records_of("fl-otlp-back").len() as u64;
    eventually(
        Duration::from_secs(30),
        "every record after the outage",
        || (mine() == report.failures).then_some(()),
    );
    let metric = |name: &str| sum_of(&daemon.metrics(), |l| l.starts_with(name));
    assert_eq!(metric("faultline_otlp_dropped_events_total"), 0.0);
    assert!(metric("faultline_otlp_failed_requests_total") >= 1.0);
    let (status, stderr, _) = daemon.terminate();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("takes records again"), "{stderr}");
}

/// https to a collector whose certificate a test CA signed, trusted through
/// OTEL_EXPORTER_OTLP_CERTIFICATE, and which takes only clients with a certificate of that CA:
/// the daemon's, from OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and _CLIENT_KEY.
#[test]
fn otlp_over_mutual_tls_with_the_certificate_variables() {
    let _serial = serial();
    let dir = std::env::temp_dir().join(unique("otlp-tls"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let ca = test_ca(&dir);
    let receiver = OtlpReceiver::start_mutual_tls(&ca);
    let cg = PodCgroup::systemd(&unique("otlp-tls"), &pod_uid(7), CID, 4);
    let logs = format!("https://127.0.0.1:{}/v1/logs", receiver.port);
    let daemon = Daemon::start_with_env(
        &[
            ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", &logs),
            (
                "OTEL_EXPORTER_OTLP_CERTIFICATE",
                ca.ca.to_str().expect("utf-8"),
            ),
            (
                "OTEL_EXPORTER_OTLP_LOGS_CLIENT_CERTIFICATE",
                ca.client_cert.to_str().expect("utf-8"),
            ),
            (
                "OTEL_EXPORTER_OTLP_LOGS_CLIENT_KEY",
                ca.client_key.to_str().expect("utf-8"),
            ),
        ],
        &[],
    );
    let report = cg.lab(&[
        "threads",
        "20",
        "--comm",
        "fl-otlp-tls",
        "--max-failures",
        "3",
    ]);
    eventually(
        Duration::from_secs(20),
        "the log records over https",
        || (receiver.records_of("fl-otlp-tls").len() as u64 == report.failures).then_some(()),
    );
    let (status, stderr, _) = daemon.terminate();
    assert!(status.success(), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The capabilities in effect of every thread of `pid`.
fn thread_caps(pid: u32) -> Vec<(String, u64)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the daemon's threads");
    tasks
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            Some((
                comm.trim().to_owned(),
                u64::from_str_radix(hex.trim(), 16).ok()?,
            ))
        })
        .collect()
}

/// Once attached, every thread of the daemon (the pipeline's, the ring reader's, the HTTP
/// workers', the event-line writer's) holds only what reading needs: as deployed CAP_BPF and
/// CAP_NET_ADMIN; even as full root nothing beyond those and the two for pods' namespaces.
#[test]
fn after_attaching_every_thread_keeps_only_what_reading_needs() {
    let _serial = serial();
    let cap = |name: &str| 1u64 << probe_common::caps::number(name).expect("a capability");
    let reading = cap("BPF") | cap("NET_ADMIN");
    let as_full_root = reading | cap("SYS_ADMIN") | cap("SYS_PTRACE");
    // Without the launcher (not as deployed) the plain start is full root too.
    let deployed = if AS_DEPLOYED.is_some() {
        reading
    } else {
        as_full_root
    };
    for (full_root, allowed) in [(false, deployed), (true, as_full_root)] {
        let daemon = if full_root {
            Daemon::start_full_root(&[], &[])
        } else {
            Daemon::start(&[])
        };
        // The HTTP workers exist once it answers; the others before it is ready.
        healthz_answers(&daemon);
        let threads = thread_caps(daemon.child.id());
        assert!(threads.len() >= 4, "{threads:?}");
        for (comm, caps) in &threads {
            assert_eq!(caps & !allowed, 0, "{comm} keeps {caps:#x}: {threads:?}");
            assert_ne!(caps & cap("BPF"), 0, "{comm} lost CAP_BPF: {threads:?}");
        }
        let (status, stderr, _) = daemon.terminate();
        assert!(status.success(), "{stderr}");
        // One short line; what each kept one is for, and every dropped one, at debug level.
        let line = stderr
            .lines()
            .find(|l| l.contains("capabilities after attaching: kept "))
            .unwrap_or_else(|| panic!("no capabilities line: {stderr}"));
        // It was ~600 characters: every dropped capability by name.
        assert!(line.contains("BPF") && line.len() < 160, "{line}");
    }
}

/// SIGHUP, as log rotation sends it: the daemon reopens its events file (a new one appears
/// where the old was moved away, and later lines go there) and goes on serving.
#[test]
fn sighup_reopens_the_events_file_and_the_daemon_goes_on() {
    let _serial = serial();
    let dir = std::env::temp_dir();
    let events = dir.join(unique("rotated-events.jsonl"));
    let rotated = events.with_extension("jsonl.1");
    // Departures: events-file: the event lines under test, in a file.
    let daemon = Daemon::start(&["--events-file", &events.display().to_string()]);
    let _cleanup = (TempFile::adopt(&events), TempFile::adopt(&rotated));
    std::fs::rename(&events, &rotated).expect("rotating the events file");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGHUP) };
    eventually(
        Duration::from_secs(10 * pace()),
        "a new events file",
        || events.exists().then_some(()),
    );
    healthz_answers(&daemon);
    let cg = PodCgroup::systemd(&unique("rotate"), &pod_uid(9), CID, 4);
    let report = cg.lab(&["threads", "8", "--comm", "fl-rotate", "--max-failures", "1"]);
    assert_eq!(report.failures, 1, "{report:?}");
    eventually(
        Duration::from_secs(20 * pace()),
        "the failure in the new file",
        || {
            std::fs::read_to_string(&events)
                .ok()
                .filter(|t| t.contains("fl-rotate"))
        },
    );
    let (status, stderr, _) = daemon.terminate();
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("SIGHUP: reopening the events file"),
        "{stderr}"
    );
}

/// The event budget under a storm: one cgroup failing for 20 s or more costs at most five full
/// lines per interval and one summary each; full lines, summaries and the counts of lost
/// events add up exactly to the failures the labs made; another pod's single failure during
/// the storm has its own line at once.
#[test]
fn an_event_storm_costs_the_budget_of_lines_and_every_failure_is_accounted() {
    let _serial = serial();
    let storm_cg = PodCgroup::systemd(&unique("budget-storm"), &pod_uid(5), CID, 4);
    let other_cg = PodCgroup::systemd(&unique("budget-other"), &pod_uid(6), CID, 4);
    let file = std::env::temp_dir().join(unique("budget-events.jsonl"));
    let events = TempFile::new(&file, b"");
    // Departures: events-file: the event lines under test, in a file; events-interval: the budget's interval shortened, to see it end.
    let daemon = Daemon::start(&[
        "--events-file",
        &file.display().to_string(),
        "--events-interval",
        "10s",
    ]);
    let started = Instant::now();
    // A millisecond apart at least: 20 s or more, also in emulation (within the lab's 60 s).
    let n = "20000";
    let storm = storm_cg.spawn(&[
        "threads",
        n,
        "--comm",
        "fl-bstorm",
        "--max-failures",
        n,
        "--interval-ms",
        "1",
    ]);
    std::thread::sleep(Duration::from_secs(2));
    let other = other_cg.lab(&[
        "threads",
        "10",
        "--comm",
        "fl-bother",
        "--max-failures",
        "1",
    ]);
    assert_eq!(other.failures, 1, "{other:?}");
    let read = || -> Vec<Value> {
        std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("event line is JSON"))
            .collect()
    };
    let other_line = eventually(
        Duration::from_secs(5 * pace()),
        "the other pod's failure in full",
        || {
            read()
                .into_iter()
                .find(|e| e["kind"] == "clone_failure" && e["comm"] == "fl-bother")
        },
    );
    let report = storm.finish();
    let (status, stderr, _) = daemon.terminate();
    assert!(status.success(), "{stderr}");
    let intervals = (started.elapsed().as_secs_f64() / 10.0).ceil() as u64;
    let lines = read();
    let storm_workload = lines
        .iter()
        .find(|e| e["comm"] == "fl-bstorm")
        .map(|e| e["workload"].clone())
        .expect("a storm line in full");
    let full = lines
        .iter()
        .filter(|e| e["kind"] == "clone_failure" && e["workload"] == storm_workload)
        .count() as u64;
    let summaries: Vec<&Value> = lines
        .iter()
        .filter(|e| e["kind"] == "event_summary" && e["workload"] == storm_workload)
        .collect();
    let summarized: u64 = summaries.iter().map(|s| s["count"].as_u64().unwrap()).sum();
    let lost: u64 = lines
        .iter()
        .filter(|e| e["kind"] == "events_lost" && e["event"] == "clone_failure")
        .map(|e| e["count"].as_u64().unwrap())
        .sum();
    eprintln!(
        "{} failures: {full} lines, {} summaries of {summarized}, {lost} lost; {} lines in all",
        report.failures,
        summaries.len(),
        lines.len()
    );
    assert!(
        lines.iter().all(|e| e["version"] == 1),
        "a line without its version"
    );
    // Five full lines an interval and one summary.
    assert!(
        full <= 5 * intervals,
        "{full} full lines in {intervals} intervals"
    );
    assert!(summaries.len() as u64 <= intervals, "{summaries:#?}");
    // Exactly the failures made: the storm's and the other pod's, nothing more or less.
    let others = lines.iter().filter(|e| e["comm"] == "fl-bother").count() as u64;
    assert_eq!(others, 1);
    assert_eq!(
        full + summarized + lost + others,
        report.failures + other.failures
    );
    // The other pod's line was written while the storm was still summarized after it.
    let last = summaries
        .iter()
        .filter_map(|s| s["last"].as_str())
        .max()
        .expect("a summary");
    assert!(
        other_line["time"].as_str() < Some(last),
        "{other_line} after the storm's last failure {last}"
    );
    drop(events);
}

/// A port below 1024: faultline binds it before loading, while it still holds every capability
/// it was given (here all of root's: the manifest grants no CAP_NET_BIND_SERVICE), then drops
/// them; as deployed it is refused at once, naming the capability, before anything loads.
#[test]
fn a_port_below_1024_is_bound_before_the_capabilities_drop() {
    let _serial = serial();
    let port = (900..1000u16)
        .rev()
        .find(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below 1024");
    let listen = format!("127.0.0.1:{port}");
    // Root's capabilities for CAP_NET_BIND_SERVICE, all else as deployed.
    let daemon = Daemon::start_listening(&listen, port, true, &["--no-events"]);
    healthz_answers(&daemon);
    let bind = 1u64 << probe_common::caps::number("NET_BIND_SERVICE").expect("a capability");
    let threads = thread_caps(daemon.child.id());
    assert!(
        threads.iter().all(|(_, caps)| caps & bind == 0),
        "kept CAP_NET_BIND_SERVICE: {threads:?}"
    );
    let (status, stderr, _) = daemon.terminate();
    assert!(status.success(), "{stderr}");
    if AS_DEPLOYED.is_some() {
        let out = faultline()
            .args(["run", "--listen", &listen, "--no-kube-api", "--no-events"])
            .output()
            .expect("faultline run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(&format!("--listen {listen}: Permission denied"))
                && stderr.contains("needs CAP_NET_BIND_SERVICE"),
            "{stderr}"
        );
    }
}

/// A daemon exporting over OTLP as `env` says, and one clone failure in a pod for it to
/// export: the daemon, its stderr as it comes, the pod's cgroup, and when the failure was.
fn exporting_one_failure(
    env: &[(&str, &str)],
    tag: u32,
    comm: &str,
) -> (Daemon, mpsc::Receiver<String>, PodCgroup, Instant) {
    let cg = PodCgroup::systemd(&unique(comm), &pod_uid(tag), CID, 4);
    let mut daemon = Daemon::start_with_env(env, &["--no-events"]);
    let lines = daemon.stderr_lines();
    let report = cg.lab(&["threads", "8", "--comm", comm, "--max-failures", "1"]);
    assert_eq!(report.failures, 1, "{report:?}");
    (daemon, lines, cg, Instant::now())
}

/// A scratch directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(unique(name));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    fn sub(&self, name: &str) -> PathBuf {
        let dir = self.0.join(name);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

/// The TLS warning of a daemon whose collector's TLS fails, within a few seconds of the
/// record; the failed attempts go on (retried), the warning is not repeated meanwhile.
fn tls_warning(daemon: &Daemon, lines: &mpsc::Receiver<String>, since: Instant) -> String {
    let line = line_within(lines, Duration::from_secs(10), "a TLS warning", |l| {
        l.contains("TLS: ")
    });
    let took = since.elapsed();
    assert!(took < Duration::from_secs(5), "said after {took:?}: {line}");
    let failed = |m: &str| sum_of(m, |l| l.starts_with("faultline_otlp_failed_requests_total"));
    eventually(Duration::from_secs(10), "the attempt retried", || {
        (failed(&daemon.metrics()) >= 3.0).then_some(())
    });
    let again: Vec<String> = lines.try_iter().filter(|l| l.contains("TLS: ")).collect();
    assert!(again.is_empty(), "warned again at once: {again:?}");
    line
}

/// The certificate the `openssl req -x509` one-liner makes, given to the collector as its own
/// and to faultline as the CA: rustls refuses a CA certificate as a server's, and the daemon
/// says so in rustls' words, what they mean and what to do, within seconds; it keeps retrying.
#[test]
fn a_collector_with_a_self_signed_ca_certificate_is_said_in_rustls_words() {
    let _serial = serial();
    let dir = TempDir::new("otlp-self-signed");
    let (cert, key) = self_signed(&dir.0);
    let receiver = OtlpReceiver::start_tls(&cert, &key, None);
    let logs = format!("https://127.0.0.1:{}/v1/logs", receiver.port);
    let (daemon, lines, _cg, at) = exporting_one_failure(
        &[
            ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", &logs),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", path(&cert)),
        ],
        20,
        "fl-tls-self",
    );
    let line = tls_warning(&daemon, &lines, at);
    eprintln!("{line}");
    for says in [
        "the collector's certificate is refused here",
        &format!("trusting the CA certificate in {}", cert.display()),
        "CaUsedAsEndEntity",
        "it is a CA certificate",
        "give the collector a server certificate signed by a CA",
        "retrying",
    ] {
        assert!(line.contains(says), "should say {says:?}: {line}");
    }
    assert!(receiver.records_of("fl-tls-self").is_empty());
    let (status, _, _) = daemon.terminate();
    assert!(status.success());
}

/// A collector whose certificate a CA signed that faultline was not given (it trusts another,
/// of another name): UnknownIssuer, with the CA file it trusts and what to set.
#[test]
fn a_collector_certificate_of_an_unknown_ca_is_said_as_such() {
    let _serial = serial();
    let dir = TempDir::new("otlp-unknown-ca");
    let theirs = test_ca(&dir.sub("theirs"));
    let (ours, _) = self_signed(&dir.sub("ours"));
    let receiver = OtlpReceiver::start_tls(&theirs.server_cert, &theirs.server_key, None);
    let logs = format!("https://127.0.0.1:{}/v1/logs", receiver.port);
    let (daemon, lines, _cg, at) = exporting_one_failure(
        &[
            ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", &logs),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", path(&ours)),
        ],
        21,
        "fl-tls-unknown",
    );
    let line = tls_warning(&daemon, &lines, at);
    eprintln!("{line}");
    for says in [
        &format!("trusting the CA certificate in {}", ours.display()),
        "invalid peer certificate: UnknownIssuer",
        "no CA trusted here signed it",
        "set OTEL_EXPORTER_OTLP_CERTIFICATE",
    ] {
        assert!(line.contains(says), "should say {says:?}: {line}");
    }
    let (status, _, _) = daemon.terminate();
    assert!(status.success());
}

/// Mutual TLS where the collector takes only clients of its own CA and faultline presents a
/// certificate of another: said as the collector refusing faultline's client certificate.
#[test]
fn a_client_certificate_the_collector_refuses_is_said_as_refused() {
    let _serial = serial();
    let dir = TempDir::new("otlp-client-refused");
    let theirs = test_ca(&dir.sub("theirs"));
    let ours = dir.sub("ours");
    let (other_ca, other_key) = self_signed(&ours);
    let (client_cert, client_key) = client_certificate(&ours, &other_ca, &other_key);
    let receiver = OtlpReceiver::start_mutual_tls(&theirs);
    let logs = format!("https://127.0.0.1:{}/v1/logs", receiver.port);
    let (daemon, lines, _cg, at) = exporting_one_failure(
        &[
            ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", &logs),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", path(&theirs.ca)),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", path(&client_cert)),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", path(&client_key)),
        ],
        22,
        "fl-tls-client",
    );
    let line = tls_warning(&daemon, &lines, at);
    eprintln!("{line}");
    for says in [
        &format!(
            "the collector refused faultline's client certificate {}",
            client_cert.display()
        ),
        "received fatal alert: UnknownCA",
        "it does not trust the CA that signed it",
    ] {
        assert!(line.contains(says), "should say {says:?}: {line}");
    }
    assert!(receiver.records_of("fl-tls-client").is_empty());
    let (status, _, _) = daemon.terminate();
    assert!(status.success());
}

/// A collector that refuses the batch with 400 and says why in its body: the warning quotes
/// the status and the body, escaped (a collector is not trusted to send printable text), and
/// the batch is dropped and counted.
#[test]
fn a_collector_answering_400_is_quoted_with_its_body() {
    let _serial = serial();
    let body = "log record 1: bad\x1b[2Jtime\n";
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let port = collector_answering(Box::leak(response.into_bytes().into_boxed_slice()));
    let endpoint = format!("http://127.0.0.1:{port}");
    let (daemon, lines, _cg, _) = exporting_one_failure(
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)],
        23,
        "fl-otlp-400",
    );
    let line = line_within(&lines, Duration::from_secs(10), "the refusal", |l| {
        l.contains("the collector answers 400")
    });
    eprintln!("{line}");
    assert!(
        line.contains(r#"the collector answers 400 Bad Request: "log record 1: bad\x1b[2Jtime""#),
        "{line}"
    );
    assert!(line.contains("batch(es) dropped"), "{line}");
    eventually(Duration::from_secs(5), "the dropped record counted", || {
        let m = daemon.metrics();
        (sum_of(&m, |l| l.starts_with("faultline_otlp_dropped_events_total")) >= 1.0).then_some(())
    });
    let (status, _, _) = daemon.terminate();
    assert!(status.success());
}

/// Records queued for a collector that takes the connection and never answers, at SIGTERM:
/// the stop waits its few seconds, then counts them in the exit line (and the dropped counter:
/// `export::otlp`'s unit test reads it; the endpoint is gone by then).
#[test]
fn otlp_records_still_queued_at_sigterm_are_counted_in_the_exit_line() {
    let _serial = serial();
    let black_hole = TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!(
        "http://127.0.0.1:{}",
        black_hole.local_addr().expect("addr").port()
    );
    let cg = PodCgroup::systemd(&unique("otlp-queued"), &pod_uid(24), CID, 4);
    let daemon =
        Daemon::start(&[&["--otlp-endpoint", &endpoint, "--no-events"], NO_BUDGET].concat());
    let report = cg.lab(&[
        "threads",
        "20",
        "--comm",
        "fl-otlp-queued",
        "--max-failures",
        "5",
    ]);
    assert_eq!(report.failures, 5, "{report:?}");
    let sel = r#"cause="pids_limit""#;
    eventually(Duration::from_secs(10), "the failures counted", || {
        let m = daemon.metrics();
        (sum_of(&m, |l| {
            l.starts_with("faultline_clone_failures_total{") && l.contains(sel)
        }) >= 5.0)
            .then_some(())
    });
    let dropped = |m: &str| sum_of(m, |l| l.starts_with("faultline_otlp_dropped_events_total"));
    assert_eq!(dropped(&daemon.metrics()), 0.0);
    let (status, stderr, secs) = daemon.terminate();
    assert!(status.success(), "{stderr}");
    assert!(secs < 10.0, "took {secs:.1} s to stop");
    let exit = stderr
        .lines()
        .find(|l| l.contains("stopped; "))
        .unwrap_or_else(|| panic!("no exit line: {stderr}"));
    eprintln!("{exit}");
    let queued: u64 = exit
        .split("; ")
        .find_map(|part| part.strip_suffix(" OTLP records still queued at the stop, dropped"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no OTLP count in the exit line: {exit}"));
    assert!(queued >= report.failures, "{exit}");
    assert!(
        stderr.contains(&format!("{queued} records still queued were dropped")),
        "{stderr}"
    );
    drop(black_hole);
}
