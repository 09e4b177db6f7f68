//! The daemon's HTTP endpoints (`/metrics`, `/explain`, `/healthz`, `/readyz`) on a port
//! every pod on the node can reach, and the health port (`/healthz` and `/readyz` only, plain
//! HTTP, for the kubelet's probes). Read-only (GET and HEAD), and bounded so that no client can
//! take the daemon down, crowd out the kubelet's probes or Prometheus, or make it run out of
//! memory:
//!
//! - **Who may read** (`access`, `web_config`): TLS when the web config file says so (the
//!   handshake within the header deadline), then `/metrics` and `/explain` only with the
//!   credentials configured (basic auth, Kubernetes bearer tokens); a refusal carries no data.
//!   Everything below is in front of that check: a connection takes its slot before the
//!   handshake, and the check runs within its deadlines.
//! - **Slots, shed not refused** (`connections`): 256 connections at most, 32 of them only for
//!   the node itself (loopback, or a peer at the address it connected to: the kubelet), 16 per
//!   peer address. A new connection always gets a slot; the oldest idle (else the oldest
//!   unfinished) connection of the peer holding the most goes instead.
//! - **One copy of the exposition**: scrapes within [`EXPOSITION_REUSE`] (or four times the
//!   encoding's time, if longer) share one encoded text (`Bytes`, reference-counted); scrapes
//!   arriving while it is encoded wait for that one. Encoding runs on the blocking pool, one
//!   at a time. At most two expositions are ever held: when a third is needed, connections
//!   still reading the oldest are shed (`slow_reader`).
//! - **Bounded per connection**: a body is copied out [`CHUNK`] bytes at a time as hyper's write
//!   buffer ([`MAX_BUF`]) drains, so a reader that never reads holds at most MAX_BUF + CHUNK of
//!   copies in the daemon and its share of the one text; the kernel's send queue is bounded
//!   too ([`SEND_BUFFER`] via SO_SNDBUF, which the kernel doubles), so slow readers cannot move
//!   the memory into the kernel. A shed or expired connection is reset (SO_LINGER 0), so its
//!   queued bytes are freed at once instead of lingering in an orphaned socket.
//! - **Bounded answers**: at most [`MAX_EXPLAIN_READERS`](crate::export::connections::MAX_EXPLAIN_READERS) responses copy out an `/explain`
//!   answer at once (each window is an answer of its own); past that the longest reading one
//!   is shed (`slow_reader`).
//! - **Bounded work**: `/explain` reports are computed one at a time on the blocking pool, and
//!   the turn is held as long again as the report took, so `/explain` in a loop (with a new
//!   `since` each time, defeating the 1 s cache) takes at most half a core and half of the
//!   recorder's lock time from the event pipeline; a request that waits more than
//!   [`EXPLAIN_WAIT`] for its turn gets a 503 with `Retry-After`.
//! - **Deadlines**: 5 s for request headers, 60 s for a connection's whole life; a pause after
//!   accept errors (a full fd table) instead of a busy loop; a listen backlog of 1,024, so that
//!   a burst of connections does not drop the kubelet's SYN (resent only after 1 s).
//!
//! What this costs at most under attack, beyond the daemon's own: two expositions plus one
//! being encoded (the registry's gathered families and the growing text), 256 x (MAX_BUF
//! read + MAX_BUF + CHUNK write) = 12 MiB of hyper buffers, 256 x 2 x SEND_BUFFER = 16 MiB
//! of kernel send queues (charged to the daemon's memory cgroup on cgroup v2), and
//! MAX_EXPLAIN_READERS `/explain` answers (~1 KB a finding: a few MB each at most). Measured (`BENCHMARKS.md`, *Serving
//! under attack*; `tests/hostile_http.rs`): with 2,000 workloads (a 4.7 MB exposition), 256
//! connections that never read, renewed so that new expositions are encoded meanwhile, take
//! the release build from 53 to 79 MiB RSS, and the kernel's send queues to 10.5 MiB: ~90 MiB
//! of the DaemonSet's 128 MiB, ~38 MiB of headroom (before this, 16 such connections got the
//! daemon OOM-killed within 2 s). With TLS each connection also holds rustls' state and
//! buffers (a send limit of 64 KiB each). What was shed is counted in /metrics
//! (`faultline_http_shed_connections_total{reason}`).

use std::{
    convert::Infallible,
    net::IpAddr,
    os::fd::{AsRawFd as _, RawFd},
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Frame, SizeHint},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, oneshot, watch},
};
use tokio_rustls::TlsAcceptor;

use crate::{
    diagnosis::{Recorder, findings::ReportSource, history::MAX_AGE},
    export::{
        access::{Access, Guarded, PEER_REFILL, Verdict},
        connections::{Admitted, Busy, Connections, Held, Pool},
        metrics::Metrics,
    },
};

// Built by `Metrics::server_counters`; re-exported where the server takes them.
pub use crate::export::server_counters::ServerCounters;

/// A client that has not sent its request headers by then is disconnected.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lives longer (keep-alive scrapers simply reconnect).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// The longest pause after an accept error.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// hyper's read buffer limit (request headers: Prometheus and the kubelet send well under
/// 1 KiB) and the write buffer level below which it asks a body for more.
pub const MAX_BUF: usize = 16 * 1024;
/// The piece of a body copied out at a time.
pub const CHUNK: usize = 16 * 1024;
/// SO_SNDBUF of every accepted connection (the kernel doubles it for its bookkeeping). A
/// window of ~32 KiB in flight carries a large node's exposition (4.7 MB with 2,000
/// workloads) to a scraper 1 ms away in ~0.15 s; the default, autotuned up to `tcp_wmem`'s
/// 4 MiB, let 256 slow readers of a 1.4 MB exposition park 600 MiB in the kernel.
pub const SEND_BUFFER: usize = 32 * 1024;
/// How long one encoded exposition serves every scrape (at least).
pub const EXPOSITION_REUSE: Duration = Duration::from_secs(1);
/// How long a `/explain` request waits for its turn before a 503.
pub const EXPLAIN_WAIT: Duration = Duration::from_secs(10);
/// The listening socket's queue of connections not yet accepted (the kernel caps it at
/// `net.core.somaxconn`): a burst of hundreds of connections must not fill it, as a SYN
/// dropped then is sent again only after 1 s, the kubelet's probe timeout (std listens with
/// 128).
const LISTEN_BACKLOG: libc::c_int = 1024;

/// What the endpoints read.
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub ready: AtomicBool,
    /// The daemon's recent history and trends, for `/explain`.
    pub recorder: Mutex<Recorder>,
    /// The last `/explain` answer: reused for EXPLAIN_REUSE by every request for the same
    /// window.
    pub explain_cache: Mutex<Option<ExplainAnswer>>,
}

/// How long an `/explain` answer is reused.
const EXPLAIN_REUSE: Duration = Duration::from_secs(1);

/// One `/explain` answer, shared by the requests for its window while it is fresh.
pub struct ExplainAnswer {
    at: Instant,
    since: Duration,
    body: Bytes,
}

/// What one listening socket serves.
pub enum Port {
    /// `--listen`: every endpoint, over TLS if configured; `/metrics` and `/explain` to those
    /// `access` lets through.
    Main {
        tls: Option<TlsAcceptor>,
        access: Arc<Access>,
    },
    /// `--health-listen`: `/healthz` and `/readyz` only, plain HTTP, no credentials: the
    /// kubelet's probes, whatever the main port asks of its readers.
    Health,
}

/// What every connection shares: what its port serves, the endpoints' state, the connection
/// table, the exposition of the moment and the turn of `/explain`.
struct Server {
    port: Port,
    served: Arc<HttpState>,
    connections: Arc<Connections>,
    exposition: Mutex<Exposition>,
    explain_turn: Arc<Semaphore>,
}

/// One encoded exposition, shared by every scrape of its interval.
#[derive(Clone)]
struct Encoded {
    /// Counts up from 1: which readers hold an old one.
    generation: u64,
    done: Instant,
    /// How long it serves scrapes: EXPOSITION_REUSE, or four times what encoding it took if
    /// longer (encoding then takes a fifth of a core at most, however often scrapes come).
    reuse: Duration,
    text: Bytes,
}

/// The outcome of one encoding, as every scrape waiting for it receives it.
type Encoding = Option<Result<Encoded, Arc<str>>>;

/// The exposition of the moment, and the encoding under way that scrapes wait for.
#[derive(Default)]
struct Exposition {
    latest: Option<Encoded>,
    encoding: Option<watch::Receiver<Encoding>>,
    generations: u64,
}

impl Server {
    fn exposition(&self) -> std::sync::MutexGuard<'_, Exposition> {
        // Every change under the lock is one assignment: a poisoned lock is consistent.
        self.exposition
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The exposition to serve: the latest while fresh, else the one being encoded, else a
    /// new one.
    async fn scrape(self: &Arc<Self>) -> Result<Encoded, Arc<str>> {
        let mut waiting = {
            let mut e = self.exposition();
            if let Some(latest) = &e.latest
                && latest.done.elapsed() < latest.reuse
            {
                return Ok(latest.clone());
            }
            match &e.encoding {
                // Its sender is alive: the encoding is under way.
                Some(rx) if rx.has_changed().is_ok() => rx.clone(),
                _ => self.start_encoding(&mut e),
            }
        };
        match waiting.wait_for(Option::is_some).await {
            Ok(done) => done
                .clone()
                .unwrap_or_else(|| Err(Arc::from("no exposition"))),
            Err(_) => Err(Arc::from("encoding the metrics stopped")),
        }
    }

    /// Starts encoding a new exposition (the caller holds the lock).
    fn start_encoding(self: &Arc<Self>, e: &mut Exposition) -> watch::Receiver<Encoding> {
        // Readers still copying out the one before the latest go: with the latest and the new
        // one, no more than two are ever held.
        if let Some(latest) = &e.latest {
            self.connections.shed_holders_before(latest.generation);
        }
        e.generations += 1;
        let generation = e.generations;
        let (tx, rx) = watch::channel(None);
        e.encoding = Some(rx.clone());
        let server = self.clone();
        // Encoding is CPU work (tens of milliseconds with 2,000 workloads, more in an emulated
        // VM): on the blocking pool, not a worker of the runtime, which goes on answering
        // /healthz meanwhile. One at a time, whichever scrape started it, and finished even if
        // that scrape goes away (the handle is not kept: nothing cancels it).
        drop(tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let result = server
                .served
                .metrics
                .encode()
                .map(|mut text| {
                    // The text grew by doubling: up to half of it would be slack, held as long
                    // as any reader holds the text.
                    text.shrink_to_fit();
                    Encoded {
                        generation,
                        done: Instant::now(),
                        reuse: EXPOSITION_REUSE.max(started.elapsed() * 4),
                        text: Bytes::from(text),
                    }
                })
                .map_err(|e| Arc::from(format!("{e:#}")));
            {
                let mut e = server.exposition();
                if let Ok(encoded) = &result {
                    e.latest = Some(encoded.clone());
                }
                e.encoding = None;
            }
            tx.send_replace(Some(result));
        }));
        rx
    }

    /// A fresh `/explain` answer for `since`, if there is one.
    fn cached_explain(&self, since: Duration) -> Option<Bytes> {
        let cache = self.served.explain_cache.lock().ok()?;
        cache
            .as_ref()
            .filter(|a| a.since == since && a.at.elapsed() < EXPLAIN_REUSE)
            .map(|a| a.body.clone())
    }

    /// The report for `since`, as JSON, cached (on the blocking pool: the recorder's lock is
    /// held while the report is made).
    fn compute_explain(&self, since: Duration) -> Reply {
        let report = match self.served.recorder.lock() {
            Ok(r) => r.report(since, ReportSource::Daemon),
            Err(_) => {
                return Reply::text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the history is unavailable\n",
                );
            }
        };
        match crate::text::json_line(&report) {
            Ok(body) => {
                let body = Bytes::from(body);
                if let Ok(mut cache) = self.served.explain_cache.lock() {
                    *cache = Some(ExplainAnswer {
                        at: Instant::now(),
                        since,
                        body: body.clone(),
                    });
                }
                Reply::new(StatusCode::OK, "application/json", body)
            }
            Err(e) => Reply::text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        }
    }
}

/// Accepts and serves connections until the task is aborted.
pub async fn serve(
    listener: TcpListener,
    port: Port,
    served: Arc<HttpState>,
    counters: ServerCounters,
) {
    let server = Arc::new(Server {
        port,
        served,
        connections: Connections::new(counters.shed.clone()),
        exposition: Mutex::new(Exposition::default()),
        explain_turn: Arc::new(Semaphore::new(1)),
    });
    // listen(2) again on a listening socket sets its backlog.
    // SAFETY: listen on a socket the listener owns.
    if unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
        tracing::warn!(
            "raising the HTTP listen backlog to {LISTEN_BACKLOG}: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut backoff = Duration::ZERO;
    let mut said_sndbuf = false;
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
        if let Err(e) = bound_send_queue(&stream)
            && !said_sndbuf
        {
            tracing::warn!("bounding the send queue of HTTP connections (SO_SNDBUF): {e}");
            said_sndbuf = true;
        }
        let peer = peer.ip().to_canonical();
        let pool = stream.local_addr().map_or(Pool::Others, |local| {
            Pool::of(peer, local.ip().to_canonical())
        });
        let admitted = server.connections.admit(peer, pool);
        tokio::spawn(connection(stream, admitted, peer, server.clone()));
    }
}

/// Serves one connection until it ends, is shed, or reaches CONNECTION_LIFETIME: its TLS
/// handshake first when the port has TLS (within HEADER_TIMEOUT), then HTTP.
async fn connection(stream: TcpStream, admitted: Admitted, peer: IpAddr, server: Arc<Server>) {
    let fd = stream.as_raw_fd();
    let id = admitted.id;
    let tls = match &server.port {
        Port::Main { tls: Some(tls), .. } => Some(tls.clone()),
        _ => None,
    };
    let served = async move {
        match tls {
            Some(acceptor) => {
                // A failed or unfinished handshake ends the connection: there is nobody to
                // answer in HTTP.
                if let Ok(Ok(stream)) =
                    tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await
                {
                    http(stream, id, peer, server).await;
                }
            }
            None => http(stream, id, peer, server).await,
        }
    };
    let served = std::pin::pin!(served);
    let cut = tokio::select! {
        () = served => false,
        () = admitted.shed.notified() => true,
        () = tokio::time::sleep(CONNECTION_LIFETIME) => true,
    };
    if cut {
        // The connection (and its socket) is still alive here, dropped at the end of this
        // function: reset, not closed gracefully.
        reset_on_close(fd);
    }
}

/// HTTP/1.1 on one connection (plain or TLS) until it ends.
async fn http<I>(io: I, id: u64, peer: IpAddr, server: Arc<Server>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let connections = server.connections.clone();
    let service = service_fn(move |req| {
        let busy = connections.busy(id);
        respond(req, server.clone(), peer, busy)
    });
    // Its end (done, or a client error) is the connection's end either way.
    let _ = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_BUF)
        .serve_connection(TokioIo::new(io), service)
        .await;
}

/// What an endpoint answers, before it becomes a response.
struct Reply {
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
    /// Seconds to wait before asking again (503 when busy, 429).
    retry_after: Option<u64>,
    /// `WWW-Authenticate` challenges (401).
    challenges: Vec<&'static str>,
}

impl Reply {
    fn new(status: StatusCode, content_type: &'static str, body: Bytes) -> Reply {
        Reply {
            status,
            content_type,
            body,
            retry_after: None,
            challenges: Vec::new(),
        }
    }

    fn text(status: StatusCode, body: impl Into<Bytes>) -> Reply {
        Reply::new(status, "text/plain", body.into())
    }
}

async fn respond<B>(
    req: Request<B>,
    server: Arc<Server>,
    peer: IpAddr,
    busy: Busy,
) -> Result<Response<Body>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = Reply::text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: GET or HEAD\n",
        )
        .into_response(busy);
        response.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return Ok(response);
    }
    let path = req.uri().path();
    let access = match &server.port {
        Port::Main { access, .. } => access,
        Port::Health => {
            let reply = match path {
                "/healthz" | "/readyz" => health(path, &server),
                _ => Reply::text(
                    StatusCode::NOT_FOUND,
                    "not found: this port serves /healthz and /readyz only\n",
                ),
            };
            return Ok(reply.into_response(busy));
        }
    };
    let guarded = match path {
        "/metrics" => Some(Guarded::Metrics),
        "/explain" => Some(Guarded::Explain),
        _ => None,
    };
    if let Some(what) = guarded {
        let authorization = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .map(hyper::header::HeaderValue::as_bytes);
        let verdict = access.check(peer, what, authorization).await;
        if verdict != Verdict::Allowed {
            return Ok(refusal(verdict, what, access).into_response(busy));
        }
    }
    let reply = match path {
        "/metrics" => match server.scrape().await {
            Ok(exposition) => {
                busy.hold(Held::Exposition(exposition.generation));
                Reply::new(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    exposition.text,
                )
            }
            Err(e) => Reply::text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        "/explain" => {
            let reply = explain(req.uri().query(), &server).await;
            if reply.status == StatusCode::OK {
                busy.hold(Held::Explain);
            }
            reply
        }
        "/healthz" | "/readyz" => health(path, &server),
        _ => Reply::text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /explain, /healthz, /readyz\n",
        ),
    };
    Ok(reply.into_response(busy))
}

/// `/healthz` (the server answers) and `/readyz` (a refresh has worked).
fn health(path: &str, server: &Server) -> Reply {
    match path {
        "/readyz" if !server.served.ready.load(Ordering::Relaxed) => {
            Reply::text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
        }
        "/readyz" => Reply::text(StatusCode::OK, "ready\n"),
        _ => Reply::text(StatusCode::OK, "ok\n"),
    }
}

/// What a request the access check refused gets: its status and one line, no data.
fn refusal(verdict: Verdict, what: Guarded, access: &Access) -> Reply {
    let path = what.path();
    match verdict {
        Verdict::Allowed | Verdict::Unauthenticated => {
            let mut reply = Reply::text(
                StatusCode::UNAUTHORIZED,
                format!("unauthorized: {path} needs {}\n", access.describe()),
            );
            reply.challenges = access.challenges();
            reply
        }
        Verdict::Forbidden => Reply::text(
            StatusCode::FORBIDDEN,
            format!("forbidden: these credentials may not get {path}\n"),
        ),
        Verdict::Throttled => {
            let mut reply = Reply::text(
                StatusCode::TOO_MANY_REQUESTS,
                "too many new credentials from this address; retry later\n",
            );
            reply.retry_after = Some(PEER_REFILL.as_secs());
            reply
        }
        Verdict::Unavailable => {
            let mut reply = Reply::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the credentials cannot be checked now; retry\n",
            );
            reply.retry_after = Some(1);
            reply
        }
    }
}

/// The window `/explain` covers when the query names none.
pub const EXPLAIN_DEFAULT_SINCE: Duration = Duration::from_secs(900);

/// The window `/explain?since=` asks for: 0 < since <= the history's hour. Else a one-line
/// text body saying why (the value escaped, at most 40 characters of it).
fn explain_since(query: Option<&str>) -> Result<Duration, String> {
    let Some(v) = query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("since="))
    else {
        return Ok(EXPLAIN_DEFAULT_SINCE);
    };
    let shown = crate::text::printable(v.get(..40).unwrap_or(v)).into_owned();
    match humantime::parse_duration(v) {
        Err(_) => Err(format!(
            "since={shown}: not a duration (e.g. 30s, 5m, 1h)\n"
        )),
        Ok(d) if d.is_zero() => Err(format!(
            "since={shown}: the window must be longer than zero\n"
        )),
        Ok(d) if d > MAX_AGE => Err(format!(
            "since={shown}: at most 1h (the daemon keeps one hour of history)\n"
        )),
        Ok(d) => Ok(d),
    }
}

/// `/explain[?since=15m]`: the findings of the daemon's history, as `faultline explain
/// --output json` prints them. Computed from bounded state, one report at a time.
async fn explain(query: Option<&str>, server: &Arc<Server>) -> Reply {
    let since = match explain_since(query) {
        Ok(d) => d,
        Err(msg) => return Reply::text(StatusCode::BAD_REQUEST, msg),
    };
    if let Some(body) = server.cached_explain(since) {
        return Reply::new(StatusCode::OK, "application/json", body);
    }
    let turn = match tokio::time::timeout(EXPLAIN_WAIT, server.explain_turn.clone().acquire_owned())
        .await
    {
        Ok(Ok(turn)) => turn,
        _ => {
            let mut busy = Reply::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy: too many /explain requests; retry\n",
            );
            busy.retry_after = Some(1);
            return busy;
        }
    };
    // Answered while this one waited.
    if let Some(body) = server.cached_explain(since) {
        return Reply::new(StatusCode::OK, "application/json", body);
    }
    let (tx, rx) = oneshot::channel();
    let worker = server.clone();
    // The turn goes with the work, not with this request: a client that hangs up does not
    // let a second report start beside the first.
    drop(tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let _ = tx.send(worker.compute_explain(since));
        // Held as long again as the report took: /explain in a loop takes at most half a core,
        // and half of the time of the recorder's lock, which the event pipeline needs.
        std::thread::sleep(started.elapsed());
        drop(turn);
    }));
    rx.await
        .unwrap_or_else(|_| Reply::text(StatusCode::INTERNAL_SERVER_ERROR, "the report stopped\n"))
}

impl Reply {
    fn into_response(self, busy: Busy) -> Response<Body> {
        let mut response = Response::new(Body {
            rest: self.body,
            busy: Some(busy),
        });
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(self.content_type),
        );
        if let Some(secs) = self.retry_after {
            headers.insert(hyper::header::RETRY_AFTER, secs.into());
        }
        for challenge in self.challenges {
            headers.append(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static(challenge),
            );
        }
        response
    }
}

/// A response body, copied out CHUNK bytes at a time as the connection takes them (hyper asks
/// for the next piece only once its write buffer is below MAX_BUF), so a reader that stops
/// reading holds at most MAX_BUF + CHUNK of copies, and its share of the one text it reads (an
/// exposition or an `/explain` answer, shared with every other reader). Done copying, it lets
/// go of the text and of the connection's busy mark.
pub struct Body {
    rest: Bytes,
    busy: Option<Busy>,
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.rest.is_empty() {
            this.busy = None;
            return Poll::Ready(None);
        }
        let piece = Bytes::copy_from_slice(&this.rest.split_to(CHUNK.min(this.rest.len())));
        if this.rest.is_empty() {
            // An empty slice still holds the text: let go of it now.
            this.rest = Bytes::new();
            this.busy = None;
        }
        Poll::Ready(Some(Ok(Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.rest.len() as u64)
    }
}

/// Sets an int socket option on a socket this process owns.
fn set_socket_option(fd: RawFd, name: libc::c_int, value: &impl Sized) -> std::io::Result<()> {
    // SAFETY: setsockopt with a pointer to a live value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            std::ptr::from_ref(value).cast(),
            std::mem::size_of_val(value) as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// SO_SNDBUF of an accepted connection: SEND_BUFFER (doubled by the kernel), not autotuned.
fn bound_send_queue(stream: &TcpStream) -> std::io::Result<()> {
    set_socket_option(
        stream.as_raw_fd(),
        libc::SO_SNDBUF,
        &(SEND_BUFFER as libc::c_int),
    )
}

/// SO_LINGER 0: closing the socket resets the connection and frees what is queued at once,
/// instead of leaving an orphaned socket holding it for a peer that does not read.
fn reset_on_close(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // Best effort: a failure leaves an ordinary close.
    let _ = set_socket_option(fd, libc::SO_LINGER, &linger);
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
    use hyper::body::Body as _;

    fn server() -> Arc<Server> {
        let metrics = Arc::new(Metrics::new(100).unwrap());
        let counters = metrics.server_counters().unwrap();
        Arc::new(Server {
            port: Port::Main {
                tls: None,
                access: Arc::new(Access::open().unwrap()),
            },
            served: Arc::new(HttpState {
                metrics,
                ready: AtomicBool::new(true),
                recorder: Mutex::new(Recorder::new("node")),
                explain_cache: Mutex::new(None),
            }),
            connections: Connections::new(counters.shed),
            exposition: Mutex::new(Exposition::default()),
            explain_turn: Arc::new(Semaphore::new(1)),
        })
    }

    #[test]
    fn a_body_is_copied_out_in_chunks_and_lets_go_of_its_text() {
        let server = server();
        let conn = server
            .connections
            .admit("10.0.0.7".parse().unwrap(), Pool::Others);
        let text = Bytes::from(vec![b'x'; 2 * CHUNK + 100]);
        let mut body = Body {
            rest: text.clone(),
            busy: Some(server.connections.busy(conn.id)),
        };
        assert_eq!(body.size_hint().exact(), Some(text.len() as u64));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut sizes = Vec::new();
        while let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut body).poll_frame(&mut cx) {
            let data = frame.into_data().unwrap();
            // A copy: the text is not referenced by what hyper holds.
            assert_ne!(data.as_ptr(), text.as_ptr());
            sizes.push(data.len());
        }
        assert_eq!(sizes, [CHUNK, CHUNK, 100]);
        assert!(body.is_end_stream());
        assert!(
            body.busy.is_none(),
            "still marked busy after the last piece"
        );
        assert!(text.is_unique(), "the body still holds the text");
    }

    #[tokio::test]
    async fn concurrent_scrapes_share_one_encoding() {
        let server = server();
        let scrapes: Vec<_> = (0..8)
            .map(|_| {
                let s = server.clone();
                tokio::spawn(async move { s.scrape().await })
            })
            .collect();
        let mut texts = Vec::new();
        for s in scrapes {
            texts.push(s.await.unwrap().unwrap());
        }
        assert!(texts.iter().all(|e| e.generation == 1));
        assert!(
            texts
                .iter()
                .all(|e| e.text.as_ptr() == texts[0].text.as_ptr())
        );
        assert!(
            std::str::from_utf8(&texts[0].text)
                .unwrap()
                .contains("faultline_http_shed_connections_total{reason=\"slow_reader\"} 0")
        );
        assert_eq!(server.exposition().generations, 1);
    }

    #[tokio::test]
    async fn a_third_exposition_sheds_the_readers_of_the_first() {
        let server = server();
        let ip = |s: &str| s.parse().unwrap();
        let first = server.connections.admit(ip("10.0.0.7"), Pool::Others);
        let second = server.connections.admit(ip("10.0.0.8"), Pool::Others);
        let reading_first = server.connections.busy(first.id);
        reading_first.hold(Held::Exposition(server.scrape().await.unwrap().generation));
        // The latest is stale: the next scrape encodes a second, and keeps the first's reader.
        server.exposition().latest.as_mut().unwrap().reuse = Duration::ZERO;
        let reading_second = server.connections.busy(second.id);
        reading_second.hold(Held::Exposition(server.scrape().await.unwrap().generation));
        server.exposition().latest.as_mut().unwrap().reuse = Duration::ZERO;
        assert_eq!(server.scrape().await.unwrap().generation, 3);
        // The first one's reader went (counted); the second one's stays.
        let shed = |reason: &str| {
            let text = server.served.metrics.encode().unwrap();
            text.lines()
                .find_map(|l| {
                    l.strip_prefix(&format!(
                        "faultline_http_shed_connections_total{{reason=\"{reason}\"}} "
                    ))
                })
                .and_then(|v| v.parse::<u64>().ok())
        };
        assert_eq!(shed("slow_reader"), Some(1));
        assert_eq!(server.connections.shed_holders_before(3), 1);
        assert_eq!(shed("slow_reader"), Some(2));
        drop((reading_first, reading_second));
    }

    #[tokio::test]
    async fn explain_answers_windows_one_at_a_time_and_rejects_bad_ones() {
        let server = server();
        for bad in [
            "since=soon",
            "since=0s",
            "since=2h",
            "since=61m",
            "since=%0a",
        ] {
            let reply = explain(Some(bad), &server).await;
            assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}");
            let body = String::from_utf8(reply.body.to_vec()).unwrap();
            assert!(
                body.ends_with('\n') && body.lines().count() == 1,
                "{bad}: {body:?}"
            );
            assert!(!body.contains("\\x0a"), "{bad}: {body:?}");
        }
        let body = |q: &str| explain_since(Some(q)).unwrap_err();
        assert_eq!(
            body("since=2h"),
            "since=2h: at most 1h (the daemon keeps one hour of history)\n"
        );
        assert_eq!(
            body("since=0s"),
            "since=0s: the window must be longer than zero\n"
        );
        assert_eq!(
            body("since=x"),
            "since=x: not a duration (e.g. 30s, 5m, 1h)\n"
        );
        assert_eq!(explain_since(Some("since=1h")), Ok(MAX_AGE));
        assert_eq!(explain_since(None), Ok(EXPLAIN_DEFAULT_SINCE));
        let asks: Vec<_> = (1..=4)
            .map(|m| {
                let s = server.clone();
                tokio::spawn(async move { explain(Some(&format!("since={m}m")), &s).await })
            })
            .collect();
        for a in asks {
            let reply = a.await.unwrap();
            assert_eq!(reply.status, StatusCode::OK);
            let report: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
            assert_eq!(report["kind"], "explain");
        }
        // The same window within EXPLAIN_REUSE is the cached answer, the very same bytes.
        let a = explain(Some("since=9m"), &server).await.body;
        let b = explain(Some("since=9m"), &server).await.body;
        assert_eq!(a.as_ptr(), b.as_ptr());
    }
}
