//! The Kubernetes API path, against a local HTTP server that serves the pods list and watch
//! endpoints the way the API server does: a watch that ends (restart), a 410 Gone (relist),
//! a ReplicaSet owned by a Deployment. faultline must name pods from the API (the kubelet log
//! directory is empty here), report owner, IPs and only allow-listed labels; with the API
//! unreachable it must keep naming pods from the kubelet directories and say so once; and a
//! pod's labels must not change when the API goes down and comes back without it. Root only.
#![allow(clippy::unwrap_used)] // a test fails by panicking: helpers outside #[test] fns unwrap too

mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{ctlab::*, *};
use serde_json::{Value, json};

const CID_B: &str = "b0b00c6b1a2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f";
const CID_C: &str = "c0c00c6b1a2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f";

fn uid(tag: u32) -> String {
    format!(
        "{:08x}-0000-4000-8000-{:012x}",
        std::process::id(),
        0x100 + tag
    )
}

/// A pod of the `cart` Deployment; with `hash`, it has the pod-template-hash label that names
/// the Deployment without reading the ReplicaSet.
fn pod(name: &str, uid: &str, cid: &str, rv: &str, ip: &str, hash: bool) -> Value {
    let mut labels = json!({"app": "cart", "secret-label": "never-exported"});
    if hash {
        labels["pod-template-hash"] = json!("7d9f");
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": "shop", "uid": uid, "resourceVersion": rv,
            "labels": labels,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "cart-7d9f", "uid": "rs-uid", "controller": true}]
        },
        "spec": {"nodeName": "node-1", "containers": [{"name": "app"}]},
        "status": {
            "podIPs": [{"ip": ip}],
            "containerStatuses": [{"name": "app", "containerID": format!("containerd://{cid}"), "ready": true, "restartCount": 0, "image": "cart:1", "imageID": "sha256:1"}]
        }
    })
}

/// A fake API server: serves one request per connection and logs what it was asked.
struct FakeApi {
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl FakeApi {
    fn start(pod_b: Value, pod_c: Value) -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fake API");
        let port = listener.local_addr().expect("addr").port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log2, stop2) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut lists, mut watches) = (0, 0);
            for conn in listener.incoming().take(200) {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let Some(path) = read_request(&conn) else {
                    continue;
                };
                log2.lock().unwrap().push(path.clone());
                if path.starts_with("/apis/apps/v1/namespaces/shop/replicasets/cart-7d9f") {
                    let rs = json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
                        "metadata": {"name": "cart-7d9f", "namespace": "shop", "uid": "rs-uid",
                            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "cart", "uid": "d-uid", "controller": true}]},
                        "spec": {"selector": {}}});
                    respond(&mut conn, &rs);
                } else if path.starts_with("/api/v1/pods") && !path.contains("watch=") {
                    lists += 1;
                    // First list: pod B only arrives by watch. After the 410, the relist has C.
                    let items = if lists == 1 {
                        vec![]
                    } else {
                        vec![pod_b.clone(), pod_c.clone()]
                    };
                    let rv = if lists == 1 { "100" } else { "200" };
                    respond(
                        &mut conn,
                        &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": rv}, "items": items}),
                    );
                } else if path.starts_with("/api/v1/pods") {
                    watches += 1;
                    let events = match watches {
                        // A watch that delivers B, then ends: the client must restart it.
                        1 => vec![json!({"type": "ADDED", "object": pod_b.clone()})],
                        // Too old: the client must relist.
                        2 => vec![
                            json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Expired", "message": "too old resource version", "code": 410}}),
                        ],
                        _ => vec![],
                    };
                    let hold = watches > 2;
                    let stop = stop2.clone();
                    std::thread::spawn(move || stream_watch(conn, events, move || hold, stop));
                } else {
                    let _ = conn.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                }
            }
        });
        FakeApi { port, log, stop }
    }

    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the API has been listed twice and watched three times (B by watch, the
    /// restart, the 410, C by relist).
    fn wait_for_relist(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = self.requests();
            let lists = r
                .iter()
                .filter(|p| p.starts_with("/api/v1/pods") && !p.contains("watch="))
                .count();
            let watches = r
                .iter()
                .filter(|p| p.starts_with("/api/v1/pods") && p.contains("watch="))
                .count();
            if lists >= 2 && watches >= 3 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the watch did not restart and relist: {r:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Reads a request's head; returns the path with query.
fn read_request(conn: &TcpStream) -> Option<String> {
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut reader = BufReader::new(conn);
    let mut first = String::new();
    reader.read_line(&mut first).ok()?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 || line == "\r\n" {
            break;
        }
    }
    first.split_whitespace().nth(1).map(str::to_owned)
}

fn respond(conn: &mut TcpStream, body: &Value) {
    let body = body.to_string();
    let _ = write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// A chunked watch response: the events, then a hold while `hold` holds (until the test
/// ends, at most 60 s), then the end (the server closing the watch).
fn stream_watch(
    mut conn: TcpStream,
    events: Vec<Value>,
    hold: impl Fn() -> bool,
    stop: Arc<AtomicBool>,
) {
    let _ = conn.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    for e in events {
        let line = format!("{e}\n");
        let _ = write!(conn, "{:x}\r\n{line}\r\n", line.len());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while hold() && !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = conn.write_all(b"0\r\n\r\n");
}

fn kubeconfig(port: u16) -> TempFile {
    let path = std::env::temp_dir().join(unique(&format!("kubeconfig-{port}")));
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{port}\nusers:\n- name: u\n  user:\n    token: test\ncontexts:\n- name: c\n  context:\n    cluster: fake\n    user: u\ncurrent-context: c\n"
    );
    std::fs::write(&path, text).expect("writing the kubeconfig");
    TempFile(path)
}

struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs a lab that hits the pod's pids limit, returning its report.
fn fail_in(cg: &PodCgroup, comm: &str) -> LabReport {
    cg.lab(&["threads", "20", "--comm", comm, "--max-failures", "1"])
}

#[test]
fn pods_named_by_the_api_across_a_watch_restart_and_a_410() {
    let (uid_b, uid_c) = (uid(2), uid(3));
    let api = FakeApi::start(
        pod("cart-7d9f-b", &uid_b, CID_B, "150", "10.1.0.2", true),
        pod("cart-7d9f-c", &uid_c, CID_C, "199", "10.1.0.3", false),
    );
    let config = kubeconfig(api.port);
    let empty_logs = std::env::temp_dir().join(unique("no-kubelet-logs"));
    let top = unique("api");
    let (b, c) = (
        PodCgroup::systemd(&top, &uid_b, CID_B, 5),
        PodCgroup::systemd(&format!("{top}-c"), &uid_c, CID_C, 5),
    );

    let trace = Trace::start(&[
        "--kubeconfig",
        &config.0.display().to_string(),
        "--node-name",
        "node-1",
        "--pod-labels",
        "app",
        "--kubelet-logs",
        &empty_logs.display().to_string(),
        "--namespace",
        "shop",
    ]);
    api.wait_for_relist();
    // The first list asked for this node's pods only.
    assert!(
        api.requests()[0].contains("fieldSelector=spec.nodeName%3Dnode-1"),
        "{:#?}",
        api.requests()
    );
    let rb = fail_in(&b, "fl-api-b");
    let rc = fail_in(&c, "fl-api-c");
    let (events, _) = trace.stop_json();

    for (comm, report, name, ip) in [
        ("fl-api-b", &rb, "cart-7d9f-b", "10.1.0.2"),
        ("fl-api-c", &rc, "cart-7d9f-c", "10.1.0.3"),
    ] {
        let mine = by_comm(&events, comm);
        assert_eq!(mine.len() as u64, report.failures, "{events:#?}");
        for e in mine {
            let p = &e["pod"];
            assert_eq!(
                (
                    p["namespace"].as_str(),
                    p["name"].as_str(),
                    p["container"].as_str()
                ),
                (Some("shop"), Some(name), Some("app")),
                "{e}"
            );
            assert_eq!(
                p["owner"],
                json!({"kind": "Deployment", "name": "cart"}),
                "{e}"
            );
            assert_eq!(p["ips"], json!([ip]), "{e}");
            assert_eq!(
                p["labels"],
                json!({"app": "cart"}),
                "only allow-listed labels: {e}"
            );
            assert_eq!(e["workload"], format!("shop/{name}/app"));
        }
    }
    // Pod B's Deployment came from its pod-template-hash; only pod C's needed the ReplicaSet.
    let rs_reads = api
        .requests()
        .iter()
        .filter(|r| r.starts_with("/apis/apps/"))
        .count();
    assert_eq!(rs_reads, 1, "{:#?}", api.requests());
}

#[test]
fn an_unreachable_api_falls_back_to_the_kubelet_directories_and_says_so_once() {
    let uid_d = uid(4);
    const CID_D: &str = "d0d00c6b1a2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f";
    // A port nobody listens on.
    let closed = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let config = kubeconfig(closed);
    let logs = KubeletLogs::new(&[("shop", "cart-7d9f-d", &uid_d, "app", CID_D)]);
    let d = PodCgroup::systemd(&unique("fallback"), &uid_d, CID_D, 5);

    let trace = Trace::start(&[
        "--kubeconfig",
        &config.0.display().to_string(),
        "--kubelet-logs",
        &logs.arg(),
        "--comm",
        "fl-api-d",
    ]);
    let r1 = fail_in(&d, "fl-api-d");
    std::thread::sleep(Duration::from_millis(1500)); // let the watch retry and fail again
    let r2 = fail_in(&d, "fl-api-d");
    let (lines, stderr) = trace.stop();
    let events: Vec<Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &Value| v["kind"] == "clone_failure")
        .collect();
    assert_eq!(events.len() as u64, r1.failures + r2.failures, "{lines:#?}");
    assert!(
        events
            .iter()
            .all(|e| e["workload"] == "shop/cart-7d9f-d/app"),
        "{events:#?}"
    );
    let said = stderr
        .lines()
        .filter(|l| l.contains("Kubernetes API at") && l.contains("unreachable"))
        .count();
    assert_eq!(said, 1, "said {said} times:\n{stderr}");
}

/// The daemon with an API that never answers: kube's own records stay out of the log, the
/// state is said once at WARN (with the endpoint and what it costs), and every failed request
/// is counted in `faultline_kube_api_errors_total`.
#[test]
fn an_unreachable_api_is_said_once_at_warn_and_counted() {
    let closed = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let config = kubeconfig(closed);
    // Departures: kubeconfig: the stand-in API.
    let daemon = common::Daemon::start_with_env(
        &[("FAULTLINE_LOG_FORMAT", "json")],
        &["--kubeconfig", &config.0.display().to_string()],
    );
    let errors = |m: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix("faultline_kube_api_errors_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let started = std::time::Instant::now();
    let mut counted = None;
    while started.elapsed() < Duration::from_secs(10) {
        counted = errors(&daemon.metrics());
        if counted.is_some_and(|n| n >= 3.0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let (status, stderr, _) = daemon.terminate_raw();
    assert!(status.success(), "{stderr}");
    assert!(
        counted.is_some_and(|n| n >= 3.0),
        "counted {counted:?}\n{stderr}"
    );
    let lines: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let said: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("Kubernetes API at"))
        })
        .collect();
    assert_eq!(said.len(), 1, "{stderr}");
    assert_eq!(said[0]["level"], "WARN", "{stderr}");
    let message = said[0]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("127.0.0.1:{closed}"))
            && message.contains("unreachable")
            && message.contains("kubelet's log directories"),
        "{message}"
    );
    assert!(
        lines.iter().all(|l| l["level"] != "ERROR"
            && !l["target"].as_str().is_some_and(|t| t.starts_with("kube"))),
        "{stderr}"
    );
}

/// The conntrack labs use the same addresses (and every trace sees every drop): one at a time.
static CT_LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A dropped packet whose socket faultline never saw (not DNS, so no flow record) is
/// attributed by its source IP to the pod the API says has it.
#[test]
fn a_conntrack_drop_is_attributed_by_pod_ip() {
    let _lab = CT_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let (uid_b, uid_c) = (uid(12), uid(13));
    let api = FakeApi::start(
        pod("cart-7d9f-b", &uid_b, CID_B, "150", V4.client2, true),
        pod("cart-7d9f-c", &uid_c, CID_C, "199", "10.1.0.3", false),
    );
    let config = kubeconfig(api.port);
    let lab = CtLab::start(&V4);
    let trace = conntrack_trace(&config);
    api.wait_for_relist();
    // Port 5300: not DNS, so the egress program records no flow for it.
    lab.client(1, &format!("1 --dns-server {}", lab.server(5300)));
    lab.client(2, &format!("1 --dns-server {}", lab.server(5300)));
    let (events, _) = trace.stop_json();
    let drops: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "conntrack_drop" && e["src"] == V4.client2)
        .collect();
    assert_eq!(drops.len(), 1, "{events:#?}");
    let d = drops[0];
    assert_eq!(d["cause"], "insert_failed", "{d}");
    assert_eq!(d["pod"]["name"], "cart-7d9f-b", "{d}");
    assert_eq!(d["workload"], "shop/cart-7d9f-b", "{d}");
    assert!(
        d["evidence"]
            .as_str()
            .is_some_and(|e| e.contains("sender by pod IP")),
        "{d}"
    );
}

/// Another pod forges the first pod's source address (a raw socket): 60 packets from client
/// 1's namespace claiming client 2's address, dropped at the router's SNAT. They came in on
/// client 1's interface, not where client 2's address is routed: unattributed, never the
/// victim's. Client 2's own dropped packet stays its own.
#[test]
fn forged_sources_are_unattributed_not_pinned_on_the_pod_they_name() {
    let _lab = CT_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let (uid_b, uid_c) = (uid(14), uid(15));
    let api = FakeApi::start(
        pod("cart-7d9f-b", &uid_b, CID_B, "150", V4.client2, true),
        pod("cart-7d9f-c", &uid_c, CID_C, "199", "10.1.0.3", false),
    );
    let config = kubeconfig(api.port);
    let lab = CtLab::start(&V4);
    // Loose reverse-path filtering at the router (the address is reachable, on another
    // interface), as on nodes whose CNI routes pods so: the forged packets reach conntrack.
    sh(&format!(
        "ip netns exec {} sysctl -qw net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.default.rp_filter=2",
        lab.router()
    ));
    let trace = conntrack_trace(&config);
    api.wait_for_relist();
    // Client 1's flow takes the router's only SNAT port; then the forgeries, then client 2.
    lab.client(1, &format!("1 --dns-server {}", lab.server(5300)));
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", lab.client_ns(1), &LAB, "dns-spray", "60"])
        .args(["--dns-server", &lab.server(5300)])
        .args(["--spoof-from", &format!("{}:33000", V4.client2)])
        .output()
        .expect("forging");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    lab.client(2, &format!("1 --dns-server {}", lab.server(5300)));
    let (events, _) = trace.stop_json();
    let drops: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "conntrack_drop" && e["src"] == V4.client2)
        .collect();
    let (forged, own): (Vec<&Value>, Vec<&Value>) = drops.iter().partition(|d| d["sport"] == 33000);
    // One flow (one source port): its first packet lost the clash; the others matched it.
    assert!(!forged.is_empty(), "{events:#?}");
    for d in &forged {
        assert_eq!(d["workload"], "unattributed", "{d}");
        assert_eq!(d["pod"], Value::Null, "{d}");
        assert_eq!(d["sender"], "source_not_routed", "{d}");
    }
    assert_eq!(own.len(), 1, "{events:#?}");
    assert_eq!(own[0]["pod"]["name"], "cart-7d9f-b", "{}", own[0]);
    assert_eq!(own[0]["sender"], "routed_address", "{}", own[0]);
}

/// A stand-in API that can go down and come back with other pods: while up, it lists `pods`
/// at resourceVersion `rv` and holds watches from that version (one from another version is
/// told 410 Gone, so the client relists); while down, it closes every connection unanswered
/// and ends the watches.
struct OnOffApi {
    port: u16,
    state: Arc<Mutex<Served>>,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

struct Served {
    /// None: down.
    pods: Option<Vec<Value>>,
    rv: u64,
}

impl OnOffApi {
    fn start(pods: Vec<Value>) -> OnOffApi {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the stand-in API");
        let port = listener.local_addr().expect("addr").port();
        let api = OnOffApi {
            port,
            state: Arc::new(Mutex::new(Served {
                pods: Some(pods),
                rv: 100,
            })),
            requests: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (state, requests, stop) = (api.state.clone(), api.requests.clone(), api.stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let Some(path) = read_request(&conn) else {
                    continue;
                };
                requests.lock().unwrap().push(path.clone());
                let (pods, rv) = {
                    let s = state.lock().unwrap();
                    (s.pods.clone(), s.rv)
                };
                // Down: the connection closes unanswered, as a crashed API server's does.
                let Some(pods) = pods else { continue };
                if !path.starts_with("/api/v1/pods") {
                    let _ = conn.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                } else if !path.contains("watch=") {
                    respond(
                        &mut conn,
                        &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": rv.to_string()}, "items": pods}),
                    );
                } else if path.contains(&format!("resourceVersion={rv}&"))
                    || path.ends_with(&format!("resourceVersion={rv}"))
                {
                    // Held while this state lasts.
                    let (state, stop) = (state.clone(), stop.clone());
                    let same = move || {
                        let s = state.lock().unwrap();
                        s.pods.is_some() && s.rv == rv
                    };
                    std::thread::spawn(move || stream_watch(conn, Vec::new(), same, stop));
                } else {
                    let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Expired", "message": "too old resource version", "code": 410}});
                    let stop = stop.clone();
                    std::thread::spawn(move || stream_watch(conn, vec![gone], || false, stop));
                }
            }
        });
        api
    }

    fn down(&self) {
        self.state.lock().unwrap().pods = None;
    }

    /// Up again, listing `pods` at a newer version than any before.
    fn up(&self, pods: Vec<Value>) {
        let mut s = self.state.lock().unwrap();
        s.pods = Some(pods);
        s.rv += 100;
    }

    /// Requests so far that are lists (not watches) of pods.
    fn lists(&self) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.starts_with("/api/v1/pods") && !p.contains("watch="))
            .count()
    }

    /// Whether a watch from the current version was asked for after `lists` lists: the
    /// client has what was listed.
    fn watching_after(&self, lists: usize) -> bool {
        let rv = self.state.lock().unwrap().rv;
        let requests = self.requests.lock().unwrap();
        let mut seen = 0;
        requests.iter().any(|p| {
            if p.starts_with("/api/v1/pods") && !p.contains("watch=") {
                seen += 1;
            }
            seen >= lists && p.contains("watch=") && p.contains(&format!("resourceVersion={rv}"))
        })
    }
}

impl Drop for OnOffApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// The `workload` label of every series of `family` whose labels contain `pod`.
fn workloads(metrics: &str, family: &str, pod: &str) -> Vec<String> {
    metrics
        .lines()
        .filter(|l| l.starts_with(family) && l.contains(pod))
        .filter_map(|l| {
            let rest = &l[l.find("workload=\"")? + "workload=\"".len()..];
            Some(rest[..rest.find('"')?].to_owned())
        })
        .collect()
}

/// Issue #34: a pod's `workload` does not change when the API goes down and comes back
/// without it (deleted from the API while its cgroup is still there, named by its log
/// directory meanwhile), and a pod nothing names is in namespace `unknown` as
/// `pod-<first 8 of its uid>`, never its bare uid.
#[test]
fn workload_labels_stay_across_the_api_going_and_coming_back() {
    let (uid_p, uid_u) = (uid(20), uid(21));
    const CID_P: &str = "e0e00c6b1a2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f";
    const CID_U: &str = "f0f00c6b1a2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f";
    let api = OnOffApi::start(vec![pod(
        "cart-7d9f-p",
        &uid_p,
        CID_P,
        "90",
        "10.1.0.20",
        true,
    )]);
    let config = kubeconfig(api.port);
    // The kubelet's directories name P (as they would without the API); U has none.
    let logs = KubeletLogs::new(&[("shop", "cart-7d9f-p", &uid_p, "app", CID_P)]);
    let top = unique("onoff");
    let (p, u) = (
        PodCgroup::systemd(&top, &uid_p, CID_P, 20),
        PodCgroup::systemd(&format!("{top}-u"), &uid_u, CID_U, 20),
    );
    let daemon = common::Daemon::start(&[
        "--kubeconfig",
        &config.0.display().to_string(),
        "--node-name",
        "node-1",
        "--kubelet-logs",
        &logs.arg(),
        "--no-events",
    ]);
    eventually(Duration::from_secs(10), "the daemon's first list", || {
        api.watching_after(1).then_some(())
    });
    p.lab(&["threads", "2", "--comm", "fl-onoff-p"]);
    u.lab(&["threads", "2", "--comm", "fl-onoff-u"]);

    let live = "faultline_tasks_live{";
    let named = r#"pod="cart-7d9f-p""#;
    let unnamed = format!(
        r#"namespace="unknown",pod="pod-{:08x}""#,
        std::process::id()
    );
    let m = eventually(Duration::from_secs(10), "both pods' series", || {
        let m = daemon.metrics();
        (!workloads(&m, live, named).is_empty() && !workloads(&m, live, &unnamed).is_empty())
            .then_some(m)
    });
    assert_eq!(workloads(&m, live, named), ["Deployment/cart"], "{m}");
    assert_eq!(
        workloads(&m, live, &unnamed),
        [format!("pod {uid_u}/{}", &CID_U[..12])],
        "{m}"
    );
    assert!(!m.contains(&format!("pod=\"{uid_u}\"")), "{m}");

    // Down: the daemon notices, and nothing changes.
    api.down();
    let m = eventually(Duration::from_secs(10), "the API's failure counted", || {
        let m = daemon.metrics();
        sample(&m, "faultline_kube_api_errors_total", &[])
            .is_some_and(|n| n >= 1.0)
            .then_some(m)
    });
    assert_eq!(workloads(&m, live, named), ["Deployment/cart"], "{m}");

    // Back, without P (deleted from the API before its cgroup goes): the relist drops it,
    // and its log directory would name it `shop/cart-7d9f-p/app`.
    let lists = api.lists();
    api.up(Vec::new());
    // The watch's backoff grew while the API was down: up to half a minute.
    eventually(Duration::from_secs(45), "the daemon's relist", || {
        api.watching_after(lists + 1).then_some(())
    });
    // Two refreshes at the shipped 5 s.
    std::thread::sleep(Duration::from_secs(11));
    let m = daemon.metrics();
    assert_eq!(workloads(&m, live, named), ["Deployment/cart"], "{m}");
    // No counter series of P was ever under another workload.
    assert_eq!(
        workloads(&m, "faultline_tasks_created_total{", named),
        ["Deployment/cart", "Deployment/cart"],
        "threads and processes, one workload: {m}"
    );
    assert_eq!(
        workloads(&m, live, &unnamed),
        [format!("pod {uid_u}/{}", &CID_U[..12])],
        "{m}"
    );
    drop(daemon);
}

/// `faultline trace` of conntrack drops, naming pods through the stand-in API as node-1.
fn conntrack_trace(config: &TempFile) -> Trace {
    Trace::start(&[
        "--events",
        "conntrack",
        "--kubeconfig",
        &config.0.display().to_string(),
        "--node-name",
        "node-1",
    ])
}
