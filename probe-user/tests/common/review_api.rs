//! A local stand-in of the Kubernetes API server for `run --kube-rbac`: it answers
//! TokenReviews from a table of tokens and SubjectAccessReviews of non-resource URLs from the
//! paths each user may get, counts the reviews, can be made to fail (500), and answers the
//! daemon's pod list (empty) and watch (held open). Plain HTTP, JSON.

use std::{
    io::{BufReader, Write as _},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// One grant: this token is this user, who may get these paths.
pub struct Grant {
    pub token: &'static str,
    pub user: &'static str,
    pub paths: &'static [&'static str],
}

pub struct ReviewApi {
    pub port: u16,
    /// Every review asked: ("token", token) or ("access", "user path verb").
    pub reviews: Arc<Mutex<Vec<(String, String)>>>,
    /// While set, reviews are answered 500.
    pub failing: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    kubeconfig: PathBuf,
}

impl ReviewApi {
    pub fn start(grants: Vec<Grant>) -> ReviewApi {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let reviews = Arc::new(Mutex::new(Vec::new()));
        let failing = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let grants = Arc::new(grants);
        let (r, f, s) = (reviews.clone(), failing.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().take(2000) {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (r, f, s, g) = (r.clone(), f.clone(), s.clone(), grants.clone());
                std::thread::spawn(move || serve(conn, &r, &f, &s, &g));
            }
        });
        let kubeconfig = std::env::temp_dir().join(super::unique(&format!("review-api-{port}")));
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{port}\nusers:\n- name: u\n  user:\n    token: the-daemons-own\ncontexts:\n- name: c\n  context:\n    cluster: fake\n    user: u\ncurrent-context: c\n"
            ),
        )
        .expect("writing the kubeconfig");
        ReviewApi {
            port,
            reviews,
            failing,
            stop,
            kubeconfig,
        }
    }

    /// The kubeconfig naming it, for `--kubeconfig`.
    pub fn kubeconfig(&self) -> String {
        self.kubeconfig.display().to_string()
    }

    /// How many reviews (token and access) it was asked.
    pub fn count(&self) -> usize {
        self.reviews.lock().expect("reviews").len()
    }
}

impl Drop for ReviewApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// The requests of one connection (kept alive) until it closes.
fn serve(
    conn: TcpStream,
    reviews: &Mutex<Vec<(String, String)>>,
    failing: &AtomicBool,
    stop: &AtomicBool,
    grants: &[Grant],
) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(clone) = conn.try_clone() else { return };
    let mut reader = BufReader::new(clone);
    let mut conn = conn;
    for _ in 0..1000 {
        let Some(super::HttpRequest { path, body, .. }) = super::read_request(&mut reader) else {
            return;
        };
        let mut body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let review = path.contains("/tokenreviews") || path.contains("/subjectaccessreviews");
        let (status, answer) = if review && failing.load(Ordering::Relaxed) {
            (
                "500 Internal Server Error",
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500}),
            )
        } else if path.starts_with("/apis/authentication.k8s.io/v1/tokenreviews") {
            let token = body["spec"]["token"].as_str().unwrap_or("").to_owned();
            reviews
                .lock()
                .expect("reviews")
                .push(("token".to_owned(), token.clone()));
            body["status"] = match grants.iter().find(|g| g.token == token) {
                Some(g) => {
                    json!({"authenticated": true, "user": {"username": g.user, "groups": ["system:authenticated"]}})
                }
                None => json!({"authenticated": false, "error": "invalid bearer token"}),
            };
            ("201 Created", body)
        } else if path.starts_with("/apis/authorization.k8s.io/v1/subjectaccessreviews") {
            let spec = &body["spec"];
            let user = spec["user"].as_str().unwrap_or("").to_owned();
            let asked = spec["nonResourceAttributes"]["path"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            let verb = spec["nonResourceAttributes"]["verb"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            reviews
                .lock()
                .expect("reviews")
                .push(("access".to_owned(), format!("{user} {asked} {verb}")));
            let allowed = verb == "get"
                && grants
                    .iter()
                    .any(|g| g.user == user && g.paths.contains(&asked.as_str()));
            body["status"] = json!({"allowed": allowed});
            ("201 Created", body)
        } else if path.starts_with("/api/v1/pods") && path.contains("watch=") {
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n");
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            return;
        } else if path.starts_with("/api/v1/pods") {
            (
                "200 OK",
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": []}),
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
