//! `faultline explain` and time to exhaustion, for real: a pod leaking threads at a steady
//! rate under its pids limit gets an ETA from the daemon before its first failure, close to
//! the real time of that failure; after it, `explain` names the pod, the cause and what to
//! change; a quiet node has no finding. (The DNS and conntrack findings are tested next to
//! their labs, in dns.rs and conntrack.rs.) Root only.
#![allow(clippy::unwrap_used)] // a test fails by panicking: helpers outside #[test] fns unwrap too

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The tests of this file one at a time: the quiet-node test must not see the leak.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const CID: &str = "f1e2d3c4b5a6978877665544332211000f1e2d3c4b5a69788776655443322110";

/// `faultline explain` with these arguments: (exit code, stdout, stderr).
fn explain(args: &[&str]) -> (i32, String, String) {
    let out = common::faultline()
        .arg("explain")
        .args(args)
        .args(["--no-kube-api"])
        .output()
        .expect("running faultline explain");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_leak_gets_an_eta_before_its_first_failure_and_explain_names_it_after() {
    let _serial = serial();
    let uid = format!("{:08x}-0000-4000-8000-00000000e7a1", std::process::id());
    let logs = KubeletLogs::new(&[("shop", "leaky-7", &uid, "app", CID)]);
    // The lab itself is one of the 50 tasks: it fails at its 50th thread.
    let cg = PodCgroup::systemd(&unique("leak"), &uid, CID, 50);
    // Departures: kubelet-logs: the test's pods are named by kubelet log directories of its own; trend-window: a trend window of seconds, for a test of seconds.
    let daemon = Daemon::start(&["--kubelet-logs", &logs.arg(), "--trend-window", "20s"]);
    let container = cg.dirs()[0]
        .strip_prefix(
            mount(probe_user::attribution::cgroups::Hierarchy::Unified)
                .expect("v2")
                .0,
        )
        .map(|p| format!("/{}", p.display()))
        .expect("container cgroup under the v2 mount");
    // `top` shows the same ETA per row; a trace warns on it (headroom alone would only warn
    // under 1%, at the last task).
    let top = Trace::start_top(&[
        "--cgroup",
        &container,
        "--interval",
        "500ms",
        "--trend-window",
        "10s",
    ]);
    let trace = Trace::start(&[
        "--events",
        "clone",
        "--cgroup",
        &container,
        "--headroom-warn",
        "1%",
        "--eta-warn",
        "1m",
    ]);
    let started = Instant::now();
    // One thread every 300 ms: ~15 s to the limit.
    let mut leak = cg.spawn(&[
        "threads",
        "200",
        "--comm",
        "fl-leaky",
        "--interval-ms",
        "300",
        "--max-failures",
        "2",
        "--hold-ms",
        "4000",
    ]);
    let who = [r#"namespace="shop""#, r#"pod="leaky-7""#, r#"limit="pids""#];
    let failed = [r#"pod="leaky-7""#, r#"cause="pids_limit""#];
    // (when read, the ETA read), until the first failure is counted.
    let mut etas: Vec<(Instant, f64)> = Vec::new();
    let first_failure = loop {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "no failure after 90 s; ETAs seen: {etas:?}"
        );
        let m = daemon.metrics();
        if sample(&m, "faultline_clone_failures_total", &failed).is_some_and(|n| n > 0.0) {
            break Instant::now();
        }
        if let Some(eta) = sample(&m, "faultline_limit_exhaustion_seconds", &who) {
            etas.push((Instant::now(), eta));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let report = leak.report();
    assert!(
        report.failures >= 1,
        "the leak was never refused: {report:?}"
    );
    assert!(report.created >= 40, "{report:?}");

    // Before the failure: ETAs, each within 25% (and a refresh) of the real time left when read
    // (those read with 3 s or more left; closer, the scrape's own delay dominates).
    let early: Vec<(f64, f64)> = etas
        .iter()
        .map(|(at, eta)| (first_failure.duration_since(*at).as_secs_f64(), *eta))
        .filter(|(left, _)| *left >= 3.0)
        .collect();
    assert!(
        early.len() >= 3,
        "too few ETAs with 3 s or more left (failure {:.1} s after the start): {etas:?}",
        first_failure.duration_since(started).as_secs_f64()
    );
    // An estimate is made at a refresh (every 300 ms; slower in emulation) and read up to one
    // refresh later: that age is allowed besides the 25%.
    // A reading is at most one sample old: the hot limits are sampled every second.
    let age = 1.2 * pace() as f64;
    for (left, eta) in &early {
        assert!(
            (eta - left).abs() <= 0.25 * left + age,
            "ETA {eta:.1} s with {left:.1} s really left: {early:?}"
        );
    }
    let (top_lines, _) = top.stop();
    let top_eta = top_lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .any(|snap| {
            snap["cgroups"].as_array().is_some_and(|rows| {
                rows.iter().any(|r| {
                    r["cgroup"] == container.as_str() && r["pids_eta_s"].as_f64().is_some()
                })
            })
        });
    assert!(
        top_eta,
        "top never showed an ETA for {container}: {top_lines:#?}"
    );
    let (events, _) = trace.stop_json();
    let warning = events
        .iter()
        .position(|e| e["kind"] == "headroom_warning")
        .unwrap_or_else(|| panic!("no ETA warning: {events:#?}"));
    let w = &events[warning];
    assert!(w["eta_s"].as_f64().is_some_and(|e| e <= 60.0), "{w}");
    assert!(w["headroom_pct"].as_f64().is_some_and(|p| p > 1.0), "{w}");
    let failure = events
        .iter()
        .position(|e| e["kind"] == "clone_failure")
        .expect("no failure traced");
    assert!(
        warning < failure,
        "the warning came after the failure: {events:#?}"
    );
    let mut shown = early.clone();
    shown.dedup_by(|a, b| a.1 == b.1);
    eprintln!("(real time left, ETA read) in s: {shown:.1?}");

    // After it: the finding, from the daemon, through the CLI.
    let daemon_url = format!("http://127.0.0.1:{}", daemon.port);
    let (code, out, err) = explain(&["--daemon", &daemon_url, "--since", "5m", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(report["kind"], "explain");
    assert_eq!(report["version"], 1);
    assert_eq!(report["source"], "daemon");
    let findings = report["findings"].as_array().expect("findings");
    let f = findings
        .iter()
        .find(|f| f["kind"] == "pids_limit" && f["who"]["pod"] == "leaky-7")
        .unwrap_or_else(|| panic!("no pids_limit finding for leaky-7: {report:#}"));
    assert_eq!(f["severity"], "critical");
    assert_eq!(f["who"]["namespace"], "shop");
    assert_eq!(f["who"]["container"], "app");
    assert!(
        f["who"]["processes"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p == "fl-leaky")),
        "{f:#}"
    );
    assert!(
        f["why"].as_str().is_some_and(|w| w.contains("pids.max=50")),
        "{f:#}"
    );
    assert!(
        f["trend"]["events"].as_u64().is_some_and(|n| n >= 1),
        "{f:#}"
    );
    assert_eq!(f["trend"]["limit"], 50, "{f:#}");
    assert!(
        f["advice"].as_array().is_some_and(|a| a
            .iter()
            .any(|a| a.as_str().is_some_and(|a| a.contains("podPidsLimit")))),
        "{f:#}"
    );
    // The table says the same to people, one finding per block.
    let (code, table, err) = explain(&["--daemon", &daemon_url, "--pod", "leaky-7"]);
    assert_eq!(code, 0, "{err}");
    assert!(table.contains("CRITICAL pids_limit"), "{table}");
    assert!(table.contains("shop/leaky-7/app"), "{table}");
    assert!(table.contains("fl-leaky"), "{table}");
    assert!(table.contains("change  - "), "{table}");
    // The endpoint refuses a bad window with a clear 400.
    let (status, body) = http_get(daemon.port, "/explain?since=forever").expect("GET /explain");
    assert_eq!(status, 400, "{body}");
    leak.wait();
}

/// A leak that reaches its pids limit ~20 s after it starts, under the daemon's default
/// 5-minute trend window: its first time to exhaustion and a `pids_limit_near` finding come at
/// least 10 s before the first failure, and every ETA read with 3 s or more left is within 25%
/// of the real time left.
#[test]
fn a_20_s_leak_is_forecast_10_s_ahead_under_the_default_window() {
    let _serial = serial();
    let uid = format!("{:08x}-0000-4000-8000-0000000020a1", std::process::id());
    let logs = KubeletLogs::new(&[("shop", "leaky-20", &uid, "app", CID)]);
    let cg = PodCgroup::systemd(&unique("leak20"), &uid, CID, 40);
    // Departures: kubelet-logs: the test's pods are named by kubelet log directories of its own.
    let daemon = Daemon::start(&["--kubelet-logs", &logs.arg()]);
    // An agent that has been up a while, as on a node.
    std::thread::sleep(Duration::from_secs(3 * pace()));
    let started = Instant::now();
    // One thread every 500 ms, also in emulation (a thread takes far less): ~20 s to the limit,
    // well within the lab's 60 s.
    let mut leak = cg.spawn(&[
        "threads",
        "200",
        "--comm",
        "fl-leak20",
        "--interval-ms",
        "500",
        "--max-failures",
        "1",
    ]);
    let who = [r#"pod="leaky-20""#, r#"limit="pids""#];
    let failed = [r#"pod="leaky-20""#, r#"cause="pids_limit""#];
    let mut etas: Vec<(Instant, f64)> = Vec::new();
    let mut near: Option<Instant> = None;
    let mut asked = Instant::now();
    let first_failure = loop {
        assert!(
            started.elapsed() < Duration::from_secs(60 * pace()),
            "no failure; ETAs seen: {etas:?}"
        );
        let m = daemon.metrics();
        if sample(&m, "faultline_clone_failures_total", &failed).is_some_and(|n| n > 0.0) {
            break Instant::now();
        }
        if let Some(eta) = sample(&m, "faultline_limit_exhaustion_seconds", &who) {
            etas.push((Instant::now(), eta));
        }
        if near.is_none() && asked.elapsed() >= Duration::from_secs(1) {
            asked = Instant::now();
            let (status, body) = http_get(daemon.port, "/explain?since=5m").expect("GET /explain");
            if status == 200
                && body.contains(r#""kind":"pids_limit_near""#)
                && body.contains("leaky-20")
            {
                near = Some(Instant::now());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let report = leak.report();
    assert_eq!(report.failures, 1, "{report:?}");
    leak.wait();
    let before = |at: Instant| first_failure.duration_since(at).as_secs_f64();
    let ahead = 10.0;
    let first_eta = etas.first().map(|(at, _)| before(*at));
    eprintln!(
        "failure {:.1} s after the start; first ETA {first_eta:.1?} s and pids_limit_near {:.1?} s before it",
        first_failure.duration_since(started).as_secs_f64(),
        near.map(before)
    );
    assert!(first_eta.is_some_and(|b| b >= ahead), "{etas:?}");
    assert!(
        near.map(before).is_some_and(|b| b >= ahead),
        "pids_limit_near {near:?}"
    );
    // A reading is at most one sample old: the hot limits are sampled every second.
    let age = 1.2 * pace() as f64;
    for (at, eta) in &etas {
        let left = before(*at);
        if left >= 5.0 {
            assert!(
                (eta - left).abs() <= 0.25 * left + age,
                "ETA {eta:.1} s with {left:.1} s really left: {etas:?}"
            );
        }
    }
}

/// A pod leaks to its pids limit, then its tasks exit: within one refresh and a sample past
/// the recovery its time to exhaustion is gone from /metrics (no "runs out soon" for a pod
/// that is fine), and it stays gone while the use is flat.
#[test]
fn a_recovered_leak_leaves_no_exhaustion_series() {
    let _serial = serial();
    let uid = format!("{:08x}-0000-4000-8000-00000000a1e7", std::process::id());
    let logs = KubeletLogs::new(&[("shop", "healed-1", &uid, "app", CID)]);
    let cg = PodCgroup::systemd(&unique("healed"), &uid, CID, 40);
    // Departures: kubelet-logs: the test's pods are named by kubelet log directories of its own.
    let daemon = Daemon::start(&["--kubelet-logs", &logs.arg()]);
    let who = [r#"pod="healed-1""#, r#"limit="pids""#];
    let eta = || {
        sample(
            &daemon.metrics(),
            "faultline_limit_exhaustion_seconds",
            &who,
        )
    };
    // Up to the limit in ~8 s, refused once, then every thread exits with the lab.
    let report = cg.lab(&[
        "threads",
        "200",
        "--comm",
        "fl-healed",
        "--interval-ms",
        "200",
        "--max-failures",
        "1",
    ]);
    assert_eq!(report.failures, 1, "{report:?}");
    let recovered = Instant::now();
    // The limit was reached: an estimate of 0 s, or one still counting down.
    // One refresh (5 s) and one sample later, no series.
    let gone = eventually(Duration::from_secs(8 * pace()), "the series to go", || {
        eta().is_none().then(Instant::now)
    });
    eprintln!(
        "series gone {:.1} s after the recovery",
        gone.duration_since(recovered).as_secs_f64()
    );
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_secs(12) {
        assert_eq!(eta(), None, "an estimate for a pod at 0 of 40");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_quiet_node_has_no_finding_and_says_where_it_looked() {
    let _serial = serial();
    // A daemon asked for by name that does not answer: an error, not an observation.
    let (code, out, err) = explain(&["--daemon", "http://127.0.0.1:1", "--observe-for", "1s"]);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(
        err.trim(),
        "faultline: error: no daemon answered at http://127.0.0.1:1 (connection refused)"
    );
    // Nothing at the default address: explain observes for itself and says so (unless this
    // machine runs a daemon there).
    if std::net::TcpStream::connect("127.0.0.1:9847").is_err() {
        let out = common::faultline()
            .args([
                "explain",
                "--no-kube-api",
                "--observe-for",
                "3s",
                "-o",
                "json",
            ])
            .env_remove("FAULTLINE_DAEMON")
            .output()
            .expect("running faultline explain");
        let (code, out, err) = (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert_eq!(code, Some(0), "{err}");
        let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(report["source"], "observation", "{report:#}");
        assert!(
            report["notes"][0]
                .as_str()
                .is_some_and(|n| n.contains("no daemon answered at http://127.0.0.1:9847")),
            "{report:#}"
        );
        assert_eq!(report["findings"], serde_json::json!([]), "{report:#}");
        // --since selects from a daemon's history: an observation cannot honour it.
        let out = common::faultline()
            .args(["explain", "--no-kube-api", "--since", "5m"])
            .env_remove("FAULTLINE_DAEMON")
            .output()
            .expect("running faultline explain");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("--since selects from the daemon's history"),
            "{err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    let (code, table, err) = explain(&["--observe", "--observe-for", "2s"]);
    assert_eq!(code, 0, "{err}");
    assert!(table.contains("No finding"), "{table}");
    let (code, _, err) = explain(&["--observe", "--since", "5m"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("an observation covers --observe-for"), "{err}");
}

#[test]
fn explain_rejects_bad_arguments_in_one_line() {
    for args in [
        &["--since", "soon"][..],
        &["--output", "xml"][..],
        &["--observe-for", "0s"][..],
        &["--since", "0s"][..],
        &["--since", "2h"][..],
    ] {
        let (code, _, err) = explain(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    for daemon in [
        "127.0.0.1:9847",
        "http://",
        "https://127.0.0.1:9847",
        "http://h:x/",
    ] {
        let (code, _, err) = explain(&["--daemon", daemon]);
        assert_eq!(code, 1, "{daemon}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{daemon}: {err}");
        assert!(
            err.starts_with("faultline: error: --daemon"),
            "{daemon}: {err}"
        );
    }
    // A daemon that is not a faultline: a clear error, not a report.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        if let Ok((mut s, _)) = listener.accept() {
            // The whole request, then the answer.
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 25\r\n\r\n<html>not a report</html>",
            );
            return String::from_utf8_lossy(&got)
                .lines()
                .next()
                .map(str::to_owned);
        }
        None
    });
    // Behind a proxy: the daemon's paths are asked under the URL's.
    let (code, _, err) = explain(&[
        "--daemon",
        &format!("http://127.0.0.1:{port}/faultline/"),
        "--since",
        "5m",
    ]);
    let request = server.join().expect("the stand-in");
    assert_eq!(
        request.as_deref(),
        Some("GET /faultline/explain?since=300s HTTP/1.1")
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not a report"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// `faultline explain --observe -o json` with these arguments, parsed.
fn observed(args: &[&str]) -> Value {
    let (code, out, err) = explain(&[&["--observe", "-o", "json"][..], args].concat());
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The finding of the past of this kind whose pod is `pod`.
fn past<'a>(report: &'a Value, kind: &str, pod: &str) -> Option<&'a Value> {
    report["past"]
        .as_array()?
        .iter()
        .find(|f| f["kind"] == kind && f["who"]["pod"] == pod)
}

/// A pod's pids limit refused forks before faultline ran: `explain`, observing for 2 s,
/// names the pod, `pids_limit` and the kernel's count (`pids.events`), with the cgroup's age,
/// apart from what it saw (nothing).
#[test]
fn explain_reports_the_pids_refusals_of_before_it_watched() {
    let _serial = serial();
    let uid = format!("{:08x}-0000-4000-8000-0000000a57a1", std::process::id());
    let logs = KubeletLogs::new(&[("shop", "forky-1", &uid, "app", CID)]);
    let cg = PodCgroup::systemd(&unique("past"), &uid, CID, 8);
    let lab = cg.spawn(&[
        "threads",
        "50",
        "--comm",
        "fl-forky",
        "--interval-ms",
        "1",
        "--max-failures",
        "4",
    ]);
    let refused = lab.finish();
    assert!(refused.failures >= 1, "{refused:?}");
    let report = observed(&["--observe-for", "2s", "--kubelet-logs", &logs.arg()]);
    let f = past(&report, "pids_limit_past", "forky-1")
        .unwrap_or_else(|| panic!("no pids_limit_past for forky-1: {report:#}"));
    assert_eq!(f["severity"], "critical", "{f:#}");
    assert_eq!(f["who"]["namespace"], "shop", "{f:#}");
    let k = &f["kernel"];
    assert_eq!(k["counts"]["pids_max"], refused.failures, "{f:#}");
    assert_eq!(k["while_watched"], 0, "{f:#}");
    // pids.events, or pids.events.local on 6.13+ (counted at the limiting cgroup alone).
    assert!(
        k["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("pids.events")),
        "{f:#}"
    );
    assert!(
        k["age_s"]
            .as_f64()
            .is_some_and(|a| a < 120.0 * pace() as f64),
        "{f:#}"
    );
    let what = f["what"].as_str().unwrap_or_default();
    assert!(
        what.contains(&format!(
            "its pids limit refused {} task creations; none while watched",
            refused.failures
        )),
        "{f:#}"
    );
    // Kept apart: what it saw happen has no failure of this pod.
    assert!(
        !report["findings"].to_string().contains("forky-1"),
        "{report:#}"
    );
    let (code, table, err) = explain(&[
        "--observe",
        "--observe-for",
        "2s",
        "--kubelet-logs",
        &logs.arg(),
        "--pod",
        "forky-1",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(table.contains("Before faultline watched"), "{table}");
    assert!(table.contains("CRITICAL pids_limit_past"), "{table}");
    // The pod (pids.events.local counts at the limiting cgroup, 6.12 here) or its container.
    assert!(table.contains("shop/forky-1"), "{table}");
}

/// The pod's limit refuses again while `explain` observes: the "before" entry keeps the
/// count at the start and says how many the kernel counted while it watched, which is what
/// the kernel's counter rose by (read once more as the observation ends).
#[test]
fn explain_counts_what_the_kernel_refused_while_it_watched() {
    let _serial = serial();
    let uid = format!("{:08x}-0000-4000-8000-0000000a57a2", std::process::id());
    let logs = KubeletLogs::new(&[("shop", "again-1", &uid, "app", CID)]);
    let cg = PodCgroup::systemd(&unique("again"), &uid, CID, 8);
    let refuse = |n: &str| {
        let report = cg.lab(&[
            "threads",
            "50",
            "--comm",
            "fl-again",
            "--interval-ms",
            "1",
            "--max-failures",
            n,
        ]);
        assert!(report.failures >= 1, "{report:?}");
        report.failures
    };
    let before = refuse("4");
    let mut observer = common::faultline()
        .args(["explain", "--observe", "-o", "json", "--no-kube-api"])
        .args(["--observe-for", &format!("{}s", 6 * pace())])
        .args(["--kubelet-logs", &logs.arg()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running faultline explain");
    // Refused again once the observation has taken its first counts (it says it observes
    // just before; loading takes seconds in emulation).
    let stderr = observer.stderr.take().expect("stderr");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    assert!(
        lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.contains("observing this node")),
        "explain did not start observing"
    );
    std::thread::spawn(move || lines.for_each(drop));
    std::thread::sleep(Duration::from_secs(pace()));
    let during = refuse("6");
    let out = observer.wait_with_output().expect("explain's report");
    assert!(out.status.success(), "{:?}", out.status);
    let report: Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    let f = past(&report, "pids_limit_past", "again-1")
        .unwrap_or_else(|| panic!("no pids_limit_past for again-1: {report:#}"));
    let k = &f["kernel"];
    assert_eq!(k["counts"]["pids_max"], before, "{f:#}");
    assert_eq!(k["while_watched"], during, "{f:#}");
    let what = f["what"].as_str().unwrap_or_default();
    assert!(
        what.contains(&format!("{during} more while watched")),
        "{f:#}"
    );
}

const CID2: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

/// A container OOM-killed at its pod's memory limit before faultline ran: `explain` names
/// the pod and the kernel's count (`memory.events.local` `oom_kill` on cgroup v2,
/// `memory.oom_control` `oom_kill` on a v1 memory controller).
#[test]
fn explain_reports_the_oom_kills_of_before_it_watched() {
    use probe_user::attribution::cgroups::Hierarchy;
    let _serial = serial();
    let (memory, v2) = mount(Hierarchy::Memory).expect("the memory controller");
    let uid = format!("{:08x}-0000-4000-8000-00000000f00d", std::process::id());
    let logs = KubeletLogs::new(&[("shop", "hungry-1", &uid, "app", CID2)]);
    let rel = format!(
        "{}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID2}.scope",
        unique("oom"),
        uid.replace('-', "_")
    );
    let tree = CgroupTree::new(&memory, &rel);
    let pod = tree.level(3);
    if v2 {
        for depth in 0..4 {
            let _ = std::fs::write(
                tree.level(depth).dir.join("cgroup.subtree_control"),
                "+memory",
            );
        }
        pod.write("memory.max", "16M");
        if pod.dir.join("memory.swap.max").exists() {
            pod.write("memory.swap.max", "0");
        }
    } else {
        pod.write("memory.limit_in_bytes", "16M");
    }
    // `tail` keeps all of a file without a newline: it grows until the OOM killer ends it.
    let procs = tree.leaf().dir.join("cgroup.procs");
    let status = std::process::Command::new("timeout")
        .args(["--signal=KILL", "30", "sh", "-c"])
        .arg(format!(
            "echo $$ > '{}' && exec tail /dev/zero",
            procs.display()
        ))
        .status()
        .expect("running tail");
    assert!(!status.success(), "tail ended by itself: {status}");
    let report = observed(&["--observe-for", "2s", "--kubelet-logs", &logs.arg()]);
    let f = past(&report, "oom_kill_past", "hungry-1")
        .unwrap_or_else(|| panic!("no oom_kill_past for hungry-1: {report:#}"));
    assert_eq!(f["severity"], "critical", "{f:#}");
    let k = &f["kernel"];
    assert!(
        k["counts"]["memory_oom_kill"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "{f:#}"
    );
    let source = if v2 {
        "memory.events"
    } else {
        "memory.oom_control"
    };
    assert!(
        k["source"].as_str().is_some_and(|s| s.starts_with(source)),
        "{f:#}"
    );
    assert_eq!(k["while_watched"], 0, "{f:#}");
    assert!(
        f["what"]
            .as_str()
            .is_some_and(|w| w.contains("the OOM killer killed")),
        "{f:#}"
    );
    // The pod's own level reached its limit: a finding of its own, with the kernel's count.
    let limit = past(&report, "memory_limit_past", "hungry-1")
        .unwrap_or_else(|| panic!("no memory_limit_past for hungry-1: {report:#}"));
    let counts = &limit["kernel"]["counts"];
    assert!(
        counts["memory_max"].as_u64().is_some_and(|n| n >= 1)
            || counts["memory_failcnt"].as_u64().is_some_and(|n| n >= 1),
        "{limit:#}"
    );
}

/// The daemon reports a pod's refusals of before it started as the past, and cross-checks
/// the counters' later increases with its events: refusals it saw are explained
/// (`faultline_kernel_refusals_unexplained_total{counter="pids_max"}` stays 0) and are not
/// the past.
#[test]
fn the_daemon_reports_the_past_and_cross_checks_later_refusals() {
    let _serial = serial();
    let uid1 = format!("{:08x}-0000-4000-8000-0000000bef01", std::process::id());
    let uid2 = format!("{:08x}-0000-4000-8000-0000000d0e02", std::process::id());
    let logs = KubeletLogs::new(&[
        ("shop", "before-1", &uid1, "app", CID),
        ("shop", "during-1", &uid2, "app", CID2),
    ]);
    let refuse = |cg: &PodCgroup, comm: &str| {
        let report = cg.lab(&[
            "threads",
            "50",
            "--comm",
            comm,
            "--interval-ms",
            "1",
            "--max-failures",
            "3",
        ]);
        assert!(report.failures >= 1, "{report:?}");
        report.failures
    };
    let before = PodCgroup::systemd(&unique("before"), &uid1, CID, 8);
    let refused_before = refuse(&before, "fl-before");
    // Departures: kubelet-logs: the test's pods are named by kubelet log directories of its own.
    let daemon = Daemon::start(&["--kubelet-logs", &logs.arg()]);
    let during = PodCgroup::systemd(&unique("during"), &uid2, CID2, 8);
    eventually(Duration::from_secs(20), "the past at start", || {
        daemon
            .explain()
            .filter(|r| past(r, "pids_limit_past", "before-1").is_some())
    });
    let refused_during = refuse(&during, "fl-during");
    let report = eventually(Duration::from_secs(20), "the refusals seen", || {
        daemon.explain().filter(|r| {
            r["findings"].as_array().is_some_and(|f| {
                f.iter()
                    .any(|f| f["kind"] == "pids_limit" && f["who"]["pod"] == "during-1")
            })
        })
    });
    let f = past(&report, "pids_limit_past", "before-1").expect("the past");
    assert_eq!(f["kernel"]["counts"]["pids_max"], refused_before, "{f:#}");
    assert!(
        past(&report, "pids_limit_past", "during-1").is_none(),
        "{report:#}"
    );
    // Two re-reads of the counters (10 s apart at least) after the refusals: each increase
    // got its read period for its event.
    std::thread::sleep(Duration::from_secs(22));
    let m = daemon.metrics();
    let unexplained = |counter: &str| {
        sample(
            &m,
            "faultline_kernel_refusals_unexplained_total",
            &[&format!("counter=\"{counter}\"")],
        )
    };
    assert_eq!(
        unexplained("pids_max"),
        Some(0.0),
        "{refused_during} refused while watched"
    );
    assert!(unexplained("conntrack_insert_failed").is_some(), "{m}");
}
