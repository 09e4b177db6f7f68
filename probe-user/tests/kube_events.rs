//! `run --kube-events` against a local stand-in of the API server that records the
//! `events.k8s.io/v1` Events POSTed and PATCHed: real task creation refused in a pod's
//! cgroup becomes one Event (valid against the Kubernetes OpenAPI schema) whose series count
//! later patches raise, within the rates; with the API down every failure is still counted
//! and /healthz answers. Root only.
#![allow(clippy::unwrap_used)] // a test fails by panicking: helpers outside #[test] fns unwrap too

mod common;

use std::{
    net::TcpListener,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use common::{events_api::*, *};
use serde_json::{Value, json};

/// The container of each test's pod (distinct: both tests' daemons see every cgroup).
const CID_A: &str = "e0e00c6b1a2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f";
const CID_B: &str = "e1e10c6b1a2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f";

fn uid(tag: u32) -> String {
    format!(
        "{:08x}-0000-4000-8000-{:012x}",
        std::process::id(),
        0x200 + tag
    )
}

/// A directory of the test's, removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `faultline run --kube-events` with the API at this kubeconfig, pods also named from the
/// kubelet's directories; killed when dropped.
struct Run {
    child: Child,
    port: u16,
}

impl Run {
    fn start(config: &TempFile, logs: &KubeletLogs) -> Run {
        require_root();
        let port = free_port();
        let mut cmd = faultline();
        as_shipped(&mut cmd);
        run_departures(&mut cmd);
        let child = cmd
            // Departure: a port of its own; the stand-in API's node and pods, named also by
            // the test's kubelet log directories.
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--node-name", "node-1"])
            .args([
                "--kubeconfig",
                &config.path().display().to_string(),
                "--kubelet-logs",
                &logs.root.display().to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let run = Run { child, port };
        eventually(Duration::from_secs(60), "/readyz", || {
            http_get(port, "/readyz").filter(|(s, _)| *s == 200)
        });
        run
    }

    fn metric(&self, prefix: &str) -> f64 {
        let text = http_get(self.port, "/metrics")
            .map(|r| r.1)
            .unwrap_or_default();
        sum_of(&text, |l| l.starts_with(prefix))
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `lab threads` in the pod's cgroup until its pids limit refuses `failures` threads.
fn fail_in(cg: &PodCgroup, comm: &str, failures: u32) -> LabReport {
    let n = failures.to_string();
    cg.lab(&["threads", "40", "--comm", comm, "--max-failures", &n])
}

#[test]
fn repeated_refusals_make_one_valid_event_whose_series_count_rises_within_the_rates() {
    let uid = uid(1);
    let api = StandIn::start(pod("cart-1", &uid, CID_A));
    let config = kubeconfig(api.port);
    let logs = KubeletLogs::new(&[("shop", "cart-1", &uid, "app", CID_A)]);
    let cg = PodCgroup::systemd(&unique("kube-events"), &uid, CID_A, 5);
    let run = Run::start(&config, &logs);
    let start = Instant::now();

    // A burst: many refusals of one cause in one pod.
    let first = fail_in(&cg, "fl-kev-a", 30);
    assert!(first.failures > 0);
    let created = eventually(Duration::from_secs(20), "the Event's POST", || {
        api.events().into_iter().find(|(m, _, b)| {
            m == "POST"
                && b["reason"] == "TaskCreationRefused"
                && b["regarding"]["uid"] == json!(uid)
        })
    });
    assert_eq!(
        created.1.trim_end_matches('?'),
        "/apis/events.k8s.io/v1/namespaces/shop/events"
    );
    let event = &created.2;
    assert_eq!(event["regarding"]["uid"], json!(uid));
    assert_eq!(event["regarding"]["kind"], "Pod");
    assert_eq!(event["reason"], "TaskCreationRefused");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reportingController"], "faultline.dev/agent");
    assert_eq!(event["reportingInstance"], "node-1");
    assert!(
        event["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("cart-1."),
        "{event}"
    );

    // More of the same: a PATCH of the series, no second Event.
    std::thread::sleep(Duration::from_secs(2));
    let second = fail_in(&cg, "fl-kev-a", 30);
    assert!(second.failures > 0);
    let name = event["metadata"]["name"].as_str().unwrap();
    let patch = eventually(Duration::from_secs(50), "the series PATCH", || {
        api.events()
            .into_iter()
            .find(|(m, p, _)| m == "PATCH" && p.contains(name))
    });
    assert_eq!(
        patch.1.trim_end_matches('?'),
        format!("/apis/events.k8s.io/v1/namespaces/shop/events/{name}")
    );
    let count = patch.2["series"]["count"].as_u64().unwrap();
    assert!(count >= 2, "{patch:?}");
    assert!(
        patch.2["series"]["lastObservedTime"].is_string(),
        "{patch:?}"
    );

    // Within the rates: one create, a patch at most every 30 s.
    let calls = api.events();
    // The daemon sees the whole node (the other test's pod too): this pod's Events only.
    let refused =
        |b: &Value| b["reason"] == "TaskCreationRefused" && b["regarding"]["uid"] == json!(uid);
    let posts = calls
        .iter()
        .filter(|(m, _, b)| m == "POST" && refused(b))
        .count();
    assert_eq!(posts, 1, "{calls:#?}");
    let patches = calls
        .iter()
        .filter(|(m, p, _)| m == "PATCH" && p.contains(name))
        .count();
    assert!(
        patches as u64 <= start.elapsed().as_secs() / 30 + 1,
        "{calls:#?}"
    );
    // Every failure counted in the metrics as well.
    let total = first.failures + second.failures;
    assert_eq!(run.metric("faultline_clone_failures_total{cause=\"pids_limit\",container=\"app\",errno=\"EAGAIN\",namespace=\"shop\",pod=\"cart-1\"") as u64, total);

    // The created Event (and the patched one) against the Kubernetes OpenAPI schema.
    let dir = TempDir(std::env::temp_dir().join(unique("kube-events")));
    std::fs::create_dir_all(&dir.0).unwrap();
    let mut patched = event.clone();
    patched["series"] = patch.2["series"].clone();
    let mut files = Vec::new();
    for (i, o) in [event.clone(), patched].iter().enumerate() {
        let f = dir.0.join(format!("{i}.json"));
        std::fs::write(&f, o.to_string()).unwrap();
        files.push(f);
    }
    let validator = common::manifest::deploy_tool("kubernetes-validate");
    let out = std::process::Command::new(&validator)
        .args(["--strict", "--kubernetes-version", "1.33.0"])
        .args(&files)
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    assert_eq!(
        report
            .lines()
            .filter(|l| l.contains(" passed for resource "))
            .count(),
        2,
        "{report}"
    );
    drop(run);
}

#[test]
fn with_the_api_down_every_failure_is_counted_and_healthz_answers() {
    let uid = uid(2);
    // A port nobody listens on.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = kubeconfig(closed);
    let logs = KubeletLogs::new(&[("shop", "cart-2", &uid, "app", CID_B)]);
    let cg = PodCgroup::systemd(&unique("kube-events-down"), &uid, CID_B, 5);
    let run = Run::start(&config, &logs);
    let r = fail_in(&cg, "fl-kev-b", 50);
    assert!(r.failures > 0);
    eventually(Duration::from_secs(20), "a failed Event counted", || {
        (run.metric("faultline_kube_events_total{result=\"failed\"}") >= 1.0).then_some(())
    });
    let counted = eventually(Duration::from_secs(10), "every failure counted", || {
        let n = run.metric("faultline_clone_failures_total{cause=\"pids_limit\",container=\"app\",errno=\"EAGAIN\",namespace=\"shop\",pod=\"cart-2\"") as u64;
        (n >= r.failures).then_some(n)
    });
    assert_eq!(
        counted,
        r.failures,
        "{}",
        http_get(run.port, "/metrics").unwrap().1
    );
    assert_eq!(http_get(run.port, "/healthz").map(|r| r.0), Some(200));
}
