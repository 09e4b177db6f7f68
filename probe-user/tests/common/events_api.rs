//! A stand-in of the Kubernetes API server for `run --kube-events`: it lists one pod, holds
//! pod watches open, takes the `events.k8s.io/v1` Events POSTed and PATCHed and records every
//! request, so that a test reads the Events faultline made.

use std::{
    io::{BufReader, Write as _},
    net::{TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::{TempFile, unique};

/// One request the stand-in was sent: method, path, body.
pub type Request = (String, String, Value);

/// Answers the pods list (this pod), holds pod watches, takes Events (201 to a POST, 200 to
/// a PATCH) and records them.
pub struct StandIn {
    pub port: u16,
    log: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
}

impl StandIn {
    pub fn start(pod: Value) -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let port = listener.local_addr().expect("its address").port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log2, stop2) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().take(500) {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (log, stop, pod) = (log2.clone(), stop2.clone(), pod.clone());
                std::thread::spawn(move || serve(conn, log, stop, pod));
            }
        });
        StandIn { port, log, stop }
    }

    /// The requests made of Events, in order.
    pub fn events(&self) -> Vec<Request> {
        let log = self.log.lock().expect("the log");
        log.iter()
            .filter(|(_, p, _)| p.starts_with("/apis/events.k8s.io/"))
            .cloned()
            .collect()
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Serves the requests of one connection (kept alive) until it closes.
fn serve(conn: TcpStream, log: Arc<Mutex<Vec<Request>>>, stop: Arc<AtomicBool>, pod: Value) {
    let Ok(clone) = conn.try_clone() else { return };
    if conn
        .set_read_timeout(Some(Duration::from_secs(10)))
        .is_err()
    {
        return;
    }
    let mut reader = BufReader::new(clone);
    let mut conn = conn;
    for _ in 0..100 {
        let Some(super::HttpRequest { method, path, body }) = super::read_request(&mut reader)
        else {
            return;
        };
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        log.lock()
            .expect("the log")
            .push((method.clone(), path.clone(), body.clone()));
        let (status, answer) = if path.starts_with("/api/v1/pods") && path.contains("watch=") {
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n");
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            return;
        } else if path.starts_with("/api/v1/pods") {
            (
                "200 OK",
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": [pod]}),
            )
        } else if path.starts_with("/apis/events.k8s.io/v1/namespaces/") && method == "POST" {
            let mut created = body.clone();
            created["metadata"]["uid"] = json!("event-uid");
            ("201 Created", created)
        } else if path.starts_with("/apis/events.k8s.io/v1/namespaces/") && method == "PATCH" {
            (
                "200 OK",
                json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "x"}, "eventTime": "2026-01-01T00:00:00.000000Z"}),
            )
        } else {
            (
                "404 Not Found",
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404}),
            )
        };
        super::write_json(&mut conn, status, &answer);
    }
}

/// A running pod of namespace `shop` on node-1, with one container `app`.
pub fn pod(name: &str, uid: &str, cid: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": uid, "resourceVersion": "1"},
        "spec": {"nodeName": "node-1", "containers": [{"name": "app"}]},
        "status": {"containerStatuses": [{"name": "app", "containerID": format!("containerd://{cid}"), "ready": true, "restartCount": 0, "image": "cart:1", "imageID": "sha256:1"}]}
    })
}

/// A kubeconfig for the stand-in on `port`, removed on drop.
pub fn kubeconfig(port: u16) -> TempFile {
    let path = std::env::temp_dir().join(unique(&format!("kubeconfig-{port}")));
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{port}\nusers:\n- name: u\n  user:\n    token: test\ncontexts:\n- name: c\n  context:\n    cluster: fake\n    user: u\ncurrent-context: c\n"
    );
    TempFile::new(&path, text.as_bytes())
}
