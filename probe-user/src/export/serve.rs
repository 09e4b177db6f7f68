//! The daemon's HTTP endpoints (`/metrics`, `/explain`, `/healthz`, `/readyz`) on a port
//! every pod on the node can reach. Read-only (GET and HEAD), and bounded so that no client can take the
//! daemon down: a cap on open connections per peer address and in all (past it, new ones are
//! closed at once, so one pod cannot crowd out Prometheus or the kubelet's probes), a
//! deadline for request headers and for each connection's whole life, a pause after accept
//! errors (a full fd table) instead of a busy loop. What it refused is counted in /metrics.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::IntCounter;
use tokio::net::TcpListener;

use crate::{diagnosis::Recorder, export::metrics::Metrics};

/// Connections served at once. Prometheus and the kubelet's probes need a handful; the rest
/// of the node's fd budget stays for the probes and the refresh.
pub const MAX_CONNECTIONS: usize = 256;
/// Connections served at once to one peer address (a pod, the node, Prometheus).
pub const MAX_PER_PEER: usize = 16;
/// A client that has not sent its request headers by then is disconnected.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lives longer (keep-alive scrapers simply reconnect).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// The longest pause after an accept error.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What the endpoints read.
pub struct Served {
    pub metrics: Arc<Metrics>,
    pub ready: AtomicBool,
    /// The daemon's recent history and trends, for `/explain`.
    pub recorder: Mutex<Recorder>,
    /// The last `/explain` answer (when, for which window): reused for EXPLAIN_REUSE, so
    /// that a client asking in a loop costs the event loop one report a second at most.
    pub explain_cache: Mutex<Option<(std::time::Instant, Duration, String)>>,
}

/// How long an `/explain` answer is reused.
const EXPLAIN_REUSE: Duration = Duration::from_secs(1);

/// What the server refused, exported with the other metrics.
#[derive(Clone)]
pub struct ServerCounters {
    /// Connections closed at once because MAX_CONNECTIONS, or MAX_PER_PEER from that
    /// address, were open.
    pub refused: IntCounter,
    /// accept(2) errors (e.g. EMFILE).
    pub accept_errors: IntCounter,
}

/// Open connections, in all and per peer address.
#[derive(Default)]
struct Slots {
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection; its slot is given back when it is dropped.
struct Slot {
    slots: Arc<Slots>,
    peer: IpAddr,
}

impl Slots {
    fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Slot> {
        let mut open = self.open.lock().ok()?;
        let (total, per_peer) = &mut *open;
        let mine = per_peer.entry(peer).or_default();
        if *total >= MAX_CONNECTIONS || *mine >= MAX_PER_PEER {
            if *mine == 0 {
                per_peer.remove(&peer);
            }
            return None;
        }
        *mine += 1;
        *total += 1;
        Some(Slot {
            slots: self.clone(),
            peer,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.slots.open.lock() {
            let (total, per_peer) = &mut *open;
            *total -= 1;
            if let Some(n) = per_peer.get_mut(&self.peer) {
                *n -= 1;
                if *n == 0 {
                    per_peer.remove(&self.peer);
                }
            }
        }
    }
}

/// Accepts and serves connections until the task is aborted.
pub async fn serve(listener: TcpListener, served: Arc<Served>, counters: ServerCounters) {
    let slots = Arc::new(Slots::default());
    let mut backoff = Duration::ZERO;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                backoff = Duration::ZERO;
                accepted
            }
            Err(e) => {
                counters.accept_errors.inc();
                backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_BACKOFF);
                if backoff == MAX_BACKOFF || counters.accept_errors.get() == 1 {
                    tracing::warn!("accepting HTTP connections: {e}; pausing {backoff:?}");
                }
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        let Some(slot) = slots.admit(peer.ip()) else {
            counters.refused.inc();
            drop(stream);
            continue;
        };
        let served = served.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| respond(req, served.clone()));
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
            drop(slot);
        });
    }
}

async fn respond<B>(
    req: Request<B>,
    served: Arc<Served>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed: GET or HEAD\n".to_owned(),
        );
        response.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return Ok(response);
    }
    let (status, content_type, body) = match req.uri().path() {
        "/metrics" => match served.metrics.encode() {
            Ok(text) => (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                text,
            ),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e:#}\n"),
            ),
        },
        "/explain" => explain(req.uri().query(), &served),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/readyz" if served.ready.load(Ordering::Relaxed) => {
            (StatusCode::OK, "text/plain", "ready\n".to_owned())
        }
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /explain, /healthz, /readyz\n".to_owned(),
        ),
    };
    Ok(text(status, content_type, body))
}

/// The window `/explain` covers when the query names none.
pub const EXPLAIN_DEFAULT_SINCE: Duration = Duration::from_secs(900);

/// `/explain[?since=15m]`: the findings of the daemon's history, as `faultline explain
/// --output json` prints them. Computed from bounded state under a lock held for the call.
fn explain(query: Option<&str>, served: &Served) -> (StatusCode, &'static str, String) {
    let since = match query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("since="))
    {
        None => Ok(EXPLAIN_DEFAULT_SINCE),
        Some(v) => humantime::parse_duration(v).map_err(|e| format!("since={v:.40}: {e}\n")),
    };
    let since = match since {
        Ok(d) => d,
        Err(msg) => {
            return (
                StatusCode::BAD_REQUEST,
                "text/plain",
                crate::text::printable(&msg).into_owned(),
            );
        }
    };
    if let Ok(cache) = served.explain_cache.lock()
        && let Some((at, window, body)) = cache.as_ref()
        && *window == since
        && at.elapsed() < EXPLAIN_REUSE
    {
        return (StatusCode::OK, "application/json", body.clone());
    }
    let report = match served.recorder.lock() {
        Ok(r) => r.report(since, "daemon"),
        Err(_) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                "the history is unavailable\n".to_owned(),
            );
        }
    };
    match crate::text::json_line(&report) {
        Ok(body) => {
            let body = String::from_utf8_lossy(&body).into_owned();
            if let Ok(mut cache) = served.explain_cache.lock() {
                *cache = Some((std::time::Instant::now(), since, body.clone()));
            }
            (StatusCode::OK, "application/json", body)
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e}\n"),
        ),
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

/// Raises the soft limit on open files to the hard one: connections, maps and cgroup files
/// all need descriptors, and the default soft limit (1,024) is the first to run out.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_peer_cannot_take_every_slot() {
        let slots = Arc::new(Slots::default());
        let pod: IpAddr = "10.0.0.7".parse().unwrap();
        let node: IpAddr = "127.0.0.1".parse().unwrap();
        let held: Vec<Slot> = (0..MAX_PER_PEER).filter_map(|_| slots.admit(pod)).collect();
        assert_eq!(held.len(), MAX_PER_PEER);
        assert!(slots.admit(pod).is_none());
        let probe = slots.admit(node).expect("another peer still gets a slot");
        drop(held);
        drop(probe);
        let open = slots.open.lock().unwrap();
        assert_eq!(open.0, 0);
        assert!(open.1.is_empty(), "no entry left behind");
    }

    #[test]
    fn the_total_is_capped_across_peers() {
        let slots = Arc::new(Slots::default());
        let held: Vec<Slot> = (0..=255u8)
            .flat_map(|a| (0..2u8).map(move |b| IpAddr::from([10, 1, a, b])))
            .filter_map(|ip| slots.admit(ip))
            .collect();
        assert_eq!(held.len(), MAX_CONNECTIONS);
    }
}
