//! Which limit binds first, for real: two pods running as one non-root uid, each leaking
//! processes under a generous pids limit, share that uid's RLIMIT_NPROC. The daemon gives the
//! uid a time to exhaustion before the first refusal, names RLIMIT_NPROC as each pod's binding
//! limit, and `explain` names the uid and both pods. Root only.
#![allow(clippy::unwrap_used)] // a test fails by panicking: helpers outside #[test] fns unwrap too

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A uid nothing else on the machine runs as (RLIMIT_NPROC counts every task of the uid).
const UID: &str = "64999";

#[test]
fn two_pods_sharing_a_uid_are_bound_by_its_rlimit_nproc_before_their_pids_limits() {
    let pods = ["nproc-a", "nproc-b"];
    let uids: Vec<String> = (0..2)
        .map(|i| format!("{:08x}-0000-4000-8000-00000000b1d{i}", std::process::id()))
        .collect();
    let cids: Vec<String> = (0..2)
        .map(|i| format!("{i}{}", "b1".repeat(31)) + "b")
        .collect();
    let logs = KubeletLogs::new(&[
        ("shop", pods[0], &uids[0], "app", &cids[0]),
        ("shop", pods[1], &uids[1], "app", &cids[1]),
    ]);
    let cgroups: Vec<PodCgroup> = (0..2)
        .map(|i| PodCgroup::systemd(&unique(&format!("nproc{i}")), &uids[i], &cids[i], 1000))
        .collect();
    // Departures: kubelet-logs: the test's pods are named by kubelet log directories of its own; trend-window: a trend window of seconds, for a test of seconds.
    let daemon = Daemon::start(&["--kubelet-logs", &logs.arg(), "--trend-window", "20s"]);
    // A pod holding 400 processes of another uid: the census reads 16 of a cgroup's, and each
    // uid's count is the kernel's, so it cannot crowd the others out (as a /proc walk bounded
    // per node could).
    let hog_uid = format!("{:08x}-0000-4000-8000-00000000b1d9", std::process::id());
    let hog = PodCgroup::systemd(&unique("nproc-hog"), &hog_uid, &cids[0], 1000);
    let hog_lab = hog.spawn(&[
        "forks",
        "400",
        "--comm",
        "fl-hog",
        "--uid",
        "65534",
        "--interval-ms",
        "0",
        "--hold-ms",
        "60000",
    ]);
    // Together: 40 tasks of the uid (the two labs included) in ~12 s, each pod far from its
    // pids limit of 1000.
    let started = Instant::now();
    let mut labs: Vec<Lab> = cgroups
        .iter()
        .enumerate()
        .map(|(i, cg)| {
            let comm = format!("fl-nproc{i}");
            let join = cg.join_args();
            let args: Vec<&str> = [
                "forks",
                "100",
                "--comm",
                &comm,
                "--uid",
                UID,
                "--nproc",
                "40",
                "--interval-ms",
                "600",
                "--max-failures",
                "1",
                "--hold-ms",
                "20000",
            ]
            .into_iter()
            .chain(join.iter().map(String::as_str))
            .collect();
            Lab::spawn(&args)
        })
        .collect();
    let eta_labels = [r#"limit="rlimit_nproc""#, r#"workload="uid:64999""#];
    let failed = [r#"cause="rlimit_nproc""#];
    let mut eta_before_failure = None;
    let mut bound: Vec<&str> = Vec::new();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(60 * pace()),
            "no rlimit_nproc failure after {:?}; ETA seen: {eta_before_failure:?}",
            started.elapsed()
        );
        let m = daemon.metrics();
        for pod in pods {
            let pod_label = format!(r#"pod="{pod}""#);
            if sample(
                &m,
                "faultline_binding_limit",
                &[&pod_label, r#"limit="rlimit_nproc""#],
            )
            .is_some()
                && !bound.contains(&pod)
            {
                bound.push(pod);
            }
        }
        if sample(&m, "faultline_clone_failures_total", &failed).is_some_and(|n| n > 0.0) {
            break;
        }
        if eta_before_failure.is_none() {
            eta_before_failure = sample(&m, "faultline_limit_exhaustion_seconds", &eta_labels);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let reports: Vec<LabReport> = labs.iter_mut().map(Lab::report).collect();
    assert!(
        reports.iter().any(|r| r.failures >= 1),
        "no lab was refused: {reports:?}"
    );
    assert!(
        eta_before_failure.is_some(),
        "no rlimit_nproc ETA for uid {UID} before the first failure"
    );
    bound.sort_unstable();
    assert_eq!(bound, pods, "RLIMIT_NPROC not shown binding for both pods");
    let unread = sample(&daemon.metrics(), "faultline_nproc_processes_unread", &[]);
    assert!(unread.is_some_and(|n| n >= 300.0), "{unread:?}");

    // While the labs hold their tasks: the finding names the uid and both pods.
    let report: Value = daemon.explain().expect("an explain report");
    let findings = report["findings"].as_array().expect("findings");
    let f = findings
        .iter()
        .find(|f| f["kind"] == "rlimit_nproc_near")
        .unwrap_or_else(|| panic!("no rlimit_nproc_near finding: {report:#}"));
    let what = f["what"].as_str().unwrap_or_default();
    assert!(
        what.starts_with("pids.max is 1000 but RLIMIT_NPROC 40 for uid 64999, shared with 1 other pod(s), binds first"),
        "{f:#}"
    );
    eprintln!("finding: {what}");
    let who = f["who"]["workload"].as_str().unwrap_or_default();
    assert!(
        pods.iter().all(|p| who.contains(p)),
        "the finding does not name both pods: {f:#}"
    );
    assert!(
        f["why"]
            .as_str()
            .is_some_and(|w| w.contains("RLIMIT_NPROC=40")),
        "{f:#}"
    );
    assert!(
        f["advice"].as_array().is_some_and(|a| a
            .iter()
            .any(|a| a.as_str().is_some_and(|a| a.contains("runAsUser")))),
        "{f:#}"
    );
    drop(labs);
    drop(hog_lab);
}
