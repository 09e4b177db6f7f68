//! Who may read the port, as deployed: the daemon with the DaemonSet's settings
//! (`FAULTLINE_KUBE_RBAC=true`, the health port) against a stand-in API that reviews tokens:
//! an unauthenticated read of /metrics or /explain gets 401 and no data, a token gets what its
//! RBAC grants, verdicts are cached so repeats do not reach the API, a flood of new tokens is
//! throttled per peer, a failing API lets nothing through, and the kubelet's probes answer on
//! the health port without credentials. Then a web config file (exporter-toolkit's format):
//! TLS requiring a verified client certificate, plus basic auth. Root only.
#![allow(clippy::unwrap_used)] // a test fails by panicking: helpers outside #[test] fns unwrap too

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    path::Path,
    process::Command,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use common::{review_api::*, *};

const PROMETHEUS: &str = "prometheus-token";
const ONCALL: &str = "oncall-token";
const NOBODY: &str = "nobody-token";

fn grants() -> Vec<Grant> {
    vec![
        Grant {
            token: PROMETHEUS,
            user: "system:serviceaccount:monitoring:prometheus",
            paths: &["/metrics"],
        },
        Grant {
            token: ONCALL,
            user: "alice",
            paths: &["/explain"],
        },
        Grant {
            token: NOBODY,
            user: "mallory",
            paths: &[],
        },
    ]
}

/// The readers, each from an address of its own (the check limits new credentials per peer).
const SCRAPER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const ONCALL_AT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const POD: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
const FLOODER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);

fn get(from: Ipv4Addr, port: u16, path: &str, headers: &[&str]) -> (u16, String, String) {
    http_request_from(from, port, path, headers)
        .unwrap_or_else(|| panic!("no answer to {path} from {from}"))
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

/// No series, no finding: what a refused reader must not see.
fn no_data(body: &str) {
    assert!(
        !body.contains("faultline_") && !body.contains("findings") && body.lines().count() <= 1,
        "a refusal carried data: {body}"
    );
}

#[test]
fn an_unauthenticated_read_gets_nothing_as_deployed() {
    let shipped = CONTAINER
        .env
        .iter()
        .find(|(k, _)| k == "FAULTLINE_KUBE_RBAC")
        .map(|(_, v)| v.clone());
    assert_eq!(
        shipped.as_deref(),
        Some("true"),
        "the DaemonSet asks for bearer tokens"
    );
    let api = ReviewApi::start(grants());
    // Departure undone: the shipped FAULTLINE_KUBE_RBAC, with the stand-in API to review.
    let daemon = Daemon::start_with_env(
        &[("FAULTLINE_KUBE_RBAC", "true")],
        &["--kubeconfig", &api.kubeconfig()],
    );
    let port = daemon.port;
    let health = daemon.health.unwrap();

    // Nobody's credentials: 401, a challenge, no data.
    for path in ["/metrics", "/explain"] {
        let (status, head, body) = get(POD, port, path, &[]);
        assert_eq!(status, 401, "{path}: {head}\n{body}");
        assert!(
            head.to_ascii_lowercase()
                .contains("www-authenticate: bearer realm=\"faultline\""),
            "{head}"
        );
        no_data(&body);
        let (status, _, body) = get(POD, port, path, &[&bearer("forged")]);
        assert_eq!(status, 401, "{path} with a forged token");
        no_data(&body);
    }
    // The kubelet's probes: on the health port, without credentials, and nothing else there.
    assert_eq!(http_get(health, "/healthz").unwrap().0, 200);
    assert_eq!(http_get(health, "/readyz").unwrap().0, 200);
    let (status, body) = http_get(health, "/metrics").unwrap();
    assert_eq!(status, 404);
    no_data(&body);
    // The health endpoints of the main port reveal nothing and stay open.
    assert_eq!(http_get(port, "/healthz").unwrap().0, 200);

    // A token gets what its user's RBAC grants, and only that.
    let (status, _, body) = get(SCRAPER, port, "/metrics", &[&bearer(PROMETHEUS)]);
    assert_eq!(status, 200);
    assert!(body.contains("faultline_probe_attached"), "{body}");
    let (status, _, body) = get(SCRAPER, port, "/explain", &[&bearer(PROMETHEUS)]);
    assert_eq!(status, 403);
    no_data(&body);
    let (status, _, body) = get(POD, port, "/metrics", &[&bearer(NOBODY)]);
    assert_eq!(status, 403);
    no_data(&body);
    let (status, _, body) = get(ONCALL_AT, port, "/explain", &[&bearer(ONCALL)]);
    assert_eq!(status, 200);
    assert!(body.contains("\"kind\":\"explain\""), "{body}");
    // The review asked what RBAC's nonResourceURLs grant: get on the path.
    assert!(
        api.reviews.lock().unwrap().contains(&(
            "access".to_owned(),
            "system:serviceaccount:monitoring:prometheus /metrics get".to_owned()
        )),
        "{:?}",
        api.reviews.lock().unwrap()
    );
    // `faultline explain` sends the token its file names; without one it says what is needed.
    let token_file = std::env::temp_dir().join(unique("oncall-token"));
    let _token = TempFile::new(&token_file, format!("{ONCALL}\n").as_bytes());
    let url = format!("http://127.0.0.1:{port}");
    let out = faultline()
        .args(["explain", "--daemon", &url, "-o", "json", "--token-file"])
        .arg(&token_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = faultline()
        .args(["explain", "--daemon", &url])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("401") && stderr.contains("--token-file"),
        "{stderr}"
    );

    // Repeats, right or wrong, are answered from the cache: no more reviews.
    let asked = api.count();
    for _ in 0..10 {
        let (s, _, _) = get(SCRAPER, port, "/metrics", &[&bearer(PROMETHEUS)]);
        assert_eq!(s, 200);
        let (s, _, _) = get(POD, port, "/metrics", &[&bearer("forged")]);
        assert_eq!(s, 401);
    }
    assert_eq!(api.count(), asked, "cached verdicts went to the API");

    // The API failing lets nothing new through: 503, no data (what is cached still holds).
    api.failing.store(true, Ordering::Relaxed);
    let (status, head, body) = get(ONCALL_AT, port, "/metrics", &[&bearer(ONCALL)]);
    assert_eq!(status, 503, "{head}");
    no_data(&body);
    assert_eq!(
        get(SCRAPER, port, "/metrics", &[&bearer(PROMETHEUS)]).0,
        200
    );
    api.failing.store(false, Ordering::Relaxed);

    // A flood of new tokens from one address: its few reviews, then 429 without asking the
    // API; the cached scraper is not held up.
    let asked = api.count();
    let mut statuses = Vec::new();
    for i in 0..30 {
        let (s, _, body) = get(FLOODER, port, "/metrics", &[&bearer(&format!("guess-{i}"))]);
        no_data(&body);
        statuses.push(s);
    }
    assert!(
        statuses.iter().all(|s| *s == 401 || *s == 429),
        "{statuses:?}"
    );
    assert!(
        statuses.iter().filter(|s| **s == 429).count() >= 20,
        "{statuses:?}"
    );
    assert!(
        api.count() - asked <= 10,
        "{} reviews for 30 new tokens",
        api.count() - asked
    );
    assert_eq!(
        get(SCRAPER, port, "/metrics", &[&bearer(PROMETHEUS)]).0,
        200
    );
}

/// A GET over TLS trusting `ca`, with a client certificate if given: (status, head, body), or
/// the handshake's error.
fn https_get(
    port: u16,
    path: &str,
    ca: &Path,
    client: Option<(&Path, &Path)>,
    headers: &[&str],
) -> Result<(u16, String, String), String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n");
    for h in headers {
        request += &format!("{h}\r\n");
    }
    tls.write_all(format!("{request}\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    tls.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no HTTP answer: {text:?}"))?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok((status, head.to_owned(), body.to_owned()))
}

#[test]
fn a_web_config_file_asks_for_a_client_certificate_and_a_password() {
    let dir = std::env::temp_dir().join(unique("web-config"));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = test_ca(&dir);
    let hash = bcrypt::hash("s3cret", 6).unwrap();
    // Relative paths: taken from the file's directory, as exporter-toolkit does.
    let config = dir.join("web.yml");
    std::fs::write(
        &config,
        format!(
            "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\nbasic_auth_users:\n  prometheus: '{hash}'\n"
        ),
    )
    .unwrap();
    // Departure: a web config file (the DaemonSet ships none; deploy/README.md says how).
    let daemon = Daemon::start_with_env(
        &[("FAULTLINE_WEB_CONFIG_FILE", config.to_str().unwrap())],
        &[],
    );
    let port = daemon.port;
    let client = Some((ca.client_cert.as_path(), ca.client_key.as_path()));
    let password = format!("Authorization: Basic {}", base64_of("prometheus:s3cret"));

    // Without a client certificate: no TLS session, no HTTP, no data.
    match https_get(port, "/metrics", &ca.ca, None, &[&password]) {
        Err(_) => {}
        Ok(answer) => panic!("answered without a client certificate: {answer:?}"),
    }
    // Plain HTTP on the TLS port: nothing.
    assert!(
        http_get(port, "/metrics").is_none_or(|(_, body)| !body.contains("faultline_")),
        "plain HTTP got data"
    );
    // A client certificate, no password or a wrong one: 401, no data.
    for headers in [
        vec![],
        vec![format!(
            "Authorization: Basic {}",
            base64_of("prometheus:guess")
        )],
        vec![format!("Authorization: Basic {}", base64_of("root:s3cret"))],
    ] {
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        for path in ["/metrics", "/explain"] {
            let (status, head, body) = https_get(port, path, &ca.ca, client, &headers).unwrap();
            assert_eq!(status, 401, "{path} {headers:?}: {head}");
            assert!(
                head.to_ascii_lowercase()
                    .contains("www-authenticate: basic realm=\"faultline\""),
                "{head}"
            );
            no_data(&body);
        }
    }
    // Both: the exposition and the report.
    let (status, _, body) = https_get(port, "/metrics", &ca.ca, client, &[&password]).unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("faultline_probe_attached"), "{body}");
    let (status, _, body) = https_get(port, "/explain", &ca.ca, client, &[&password]).unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("\"kind\":\"explain\""), "{body}");
    // The kubelet's probes: plain, on the health port.
    assert_eq!(http_get(daemon.health.unwrap(), "/healthz").unwrap().0, 200);
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_web_config_file_that_cannot_be_honoured_is_one_line_and_exit_2() {
    let dir = std::env::temp_dir().join(unique("bad-web-config"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("web.yml");
    std::fs::write(
        &config,
        "tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n  client_auth_type: RequireAnyClientCert\n  client_ca_file: ca.pem\n",
    )
    .unwrap();
    let out = Command::new(&*FAULTLINE)
        .args([
            "run",
            "--no-kube-api",
            "--listen",
            "127.0.0.1:0",
            "--web-config-file",
        ])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("proves nothing"), "{stderr}");
    let out = Command::new(&*FAULTLINE)
        .args([
            "run",
            "--no-kube-api",
            "--kube-rbac",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--no-kube-api"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn base64_of(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}
