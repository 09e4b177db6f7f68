//! Attribution to pods on real cgroup trees that copy both kubelet drivers' layouts, with
//! kubelet log directories in a temp root: `trace` and `top` name the namespace, pod,
//! container and QoS class, and the pod filters select by them. Root only.
#![allow(clippy::unwrap_used)] // a test fails by panicking: helpers outside #[test] fns unwrap too

mod common;

use common::*;
use probe_user::attribution::cgroups::Hierarchy;
use serde_json::Value;

const CID_A: &str = "aaaa0c6b1a2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f";
const CID_B: &str = "bbbb0c6b1a2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f";

/// A uid unique to this test run (pod uids are UUIDs).
fn uid(tag: u32) -> String {
    format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), tag)
}

#[test]
fn pods_named_in_trace_and_top_for_both_cgroup_drivers() {
    let Some((pids_mount, _)) = mount(Hierarchy::Pids) else {
        skipped("no pids controller on this host");
        return;
    };
    let (uid_a, uid_b) = (uid(1), uid(2));
    let logs = KubeletLogs::new(&[
        ("shop", "cart-7d9f", &uid_a, "app", CID_A),
        ("batch", "report-x1", &uid_b, "worker", CID_B),
    ]);
    let top_dir = unique("pods");
    // Pod A, systemd driver, burstable, in cgroup v2 (and the same tree in the v1 pids
    // hierarchy on hybrid hosts, where its pids limit lives).
    let a = PodCgroup::systemd(&top_dir, &uid_a, CID_A, 10);
    // Pod B, cgroupfs driver, besteffort, in the pids hierarchy only: attributed through the
    // task's own pids cgroup.
    let cgroupfs = format!("{top_dir}-b/kubepods/besteffort/pod{uid_b}/{CID_B}");
    let b = CgroupTree::new(&pids_mount, &cgroupfs);
    b.level(3).write("pids.max", "6");

    let logs_arg = logs.root.display().to_string();
    let trace = Trace::start(&["--kubelet-logs", &logs_arg]);
    let shop_only = Trace::start(&[
        "--kubelet-logs",
        &logs_arg,
        "--namespace",
        "shop",
        "--pod",
        "cart",
        "--container",
        "app",
    ]);
    let top = Trace::start_top(&["--kubelet-logs", &logs_arg, "--interval", "200ms"]);

    let join_a = a.join_args();
    let join_a: Vec<&str> = join_a.iter().map(String::as_str).collect();
    let mut lab_a = Lab::spawn(
        &[
            &["threads", "30", "--comm", "fl-pod-a", "--hold-ms", "2000"][..],
            &join_a,
        ]
        .concat(),
    );
    let b_dir = b.leaf().dir.display().to_string();
    let lab_b = lab(&["forks", "30", "--comm", "fl-pod-b", "--cgroup", &b_dir]);
    let report_a = lab_a.report();

    let snapshot = top.wait_for(std::time::Duration::from_secs(10), "pod A in top", |s| {
        s["cgroups"].as_array().is_some_and(|rows| {
            rows.iter()
                .any(|r| r["workload"] == "shop/cart-7d9f/app" && r["live"].as_u64() > Some(1))
        })
    });
    lab_a.wait();
    let row = snapshot["cgroups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["workload"] == "shop/cart-7d9f/app")
        .unwrap();
    assert_pod(
        &row["pod"],
        "shop",
        "cart-7d9f",
        &uid_a,
        "app",
        CID_A,
        "burstable",
    );
    assert_eq!(row["pids_limit"]["max"], 10, "{row}");

    let (events, _) = trace.stop_json();
    let a: Vec<&Value> = by_comm(&events, "fl-pod-a");
    let b_events: Vec<&Value> = by_comm(&events, "fl-pod-b");
    assert_eq!(a.len() as u64, report_a.failures, "{events:#?}");
    assert_eq!(b_events.len() as u64, lab_b.failures, "{events:#?}");
    assert!(report_a.failures > 0 && lab_b.failures > 0);
    for e in &a {
        assert_eq!(e["workload"], "shop/cart-7d9f/app", "{e}");
        assert_pod(
            &e["pod"],
            "shop",
            "cart-7d9f",
            &uid_a,
            "app",
            CID_A,
            "burstable",
        );
        assert_eq!(e["cause"], "pids_limit");
    }
    for e in &b_events {
        assert_eq!(e["workload"], "batch/report-x1/worker", "{e}");
        assert_pod(
            &e["pod"],
            "batch",
            "report-x1",
            &uid_b,
            "worker",
            CID_B,
            "best_effort",
        );
    }

    // The filtered trace saw only pod A's container.
    let (only, _) = shop_only.stop_json();
    assert_eq!(only.len() as u64, report_a.failures, "{only:#?}");
    assert!(
        only.iter().all(|e| e["pod"]["namespace"] == "shop"),
        "{only:#?}"
    );
    drop(top);
}

fn assert_pod(pod: &Value, ns: &str, name: &str, uid: &str, container: &str, cid: &str, qos: &str) {
    assert_eq!(pod["namespace"], ns, "{pod}");
    assert_eq!(pod["name"], name, "{pod}");
    assert_eq!(pod["uid"], uid, "{pod}");
    assert_eq!(pod["container"], container, "{pod}");
    assert_eq!(pod["container_id"], cid, "{pod}");
    assert_eq!(pod["qos"], qos, "{pod}");
}
