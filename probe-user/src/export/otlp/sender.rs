//! One signal's background sender: batches, the HTTP(S) client (rustls), gzip, and the retry
//! policy (the oldest batch retried until the collector takes it, its failure said with its
//! cause; refusals dropped and counted).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::sync::mpsc;

use super::{
    BATCH, FLUSH_EVERY, OtlpCounters, QUEUE,
    config::SignalConfig,
    failure::{BODY_READ, Failure},
};

/// The first pause after a failed attempt, doubled each time up to MAX_BACKOFF.
pub(super) const FIRST_BACKOFF: Duration = Duration::from_millis(250);
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The longest pause a Retry-After gets.
pub(super) const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// At most one warning per signal this often about batches the collector refused, or about a
/// failure that retrying cannot heal (a refused certificate) while it lasts.
pub(super) const WARN_EVERY: Duration = Duration::from_secs(60);

pub(super) type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// One signal's collector: where and how to send, and the client that reaches it (its TLS
/// files read).
pub(super) struct Collector {
    config: SignalConfig,
    client: HttpClient,
}

impl Collector {
    /// Errors: a TLS file that cannot be read or used.
    pub(super) fn new(signal: &str, config: SignalConfig) -> anyhow::Result<Self> {
        let client = client(&config).with_context(|| format!("OTLP {signal} to {}", config.uri))?;
        Ok(Collector { config, client })
    }
}

/// One signal's sender: batches from its queue, each delivered before the next is taken.
pub(super) struct Sender {
    signal: &'static str,
    collector: Collector,
    counters: OtlpCounters,
    /// Records queued and not yet delivered or dropped (every signal's): what a stop that
    /// cannot wait for them drops.
    queued: Arc<AtomicU64>,
    /// The collector unreachable, refusing this side's TLS, or asking for patience.
    outage: Option<Outage>,
    /// Batches refused since the last warning, and when that was.
    refused: (u64, Option<Instant>),
}

/// Since when attempts fail, and the last warning about it.
struct Outage {
    since: Instant,
    warned: Failure,
    at: Instant,
}

impl Sender {
    pub(super) fn new(
        signal: &'static str,
        collector: Collector,
        counters: OtlpCounters,
        queued: Arc<AtomicU64>,
    ) -> Self {
        Sender {
            signal,
            collector,
            counters,
            queued,
            outage: None,
            refused: (0, None),
        }
    }

    pub(super) async fn run<T>(
        mut self,
        mut rx: mpsc::Receiver<T>,
        encode: impl Fn(Vec<T>) -> Vec<u8>,
    ) {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            let deadline = tokio::time::sleep(FLUSH_EVERY);
            tokio::pin!(deadline);
            while batch.len() < BATCH {
                tokio::select! {
                    r = rx.recv() => match r {
                        Some(item) => batch.push(item),
                        None => break,
                    },
                    () = &mut deadline => break,
                }
            }
            let records = batch.len() as u64;
            self.deliver(encode(batch), records).await;
            self.queued.fetch_sub(records, Ordering::Relaxed);
        }
    }

    /// One batch, retried with backoff for as long as the collector is unreachable, refuses
    /// this side's TLS, or says "later" (429, 502, 503, 504, Retry-After honoured): meanwhile
    /// new records wait in the queue or, past it, are dropped and counted. A refused batch is
    /// dropped and counted.
    async fn deliver(&mut self, body: Vec<u8>, records: u64) {
        let body = if self.collector.config.gzip {
            match gzip(&body) {
                Ok(packed) => packed,
                Err(e) => {
                    return self.refused(records, &Failure::Local(format!("compressing: {e}")));
                }
            }
        } else {
            body
        };
        let body = Bytes::from(body);
        let mut backoff = FIRST_BACKOFF;
        loop {
            match self.attempt(body.clone()).await {
                Attempt::Done => {
                    if let Some(outage) = self.outage.take() {
                        tracing::info!(
                            "OTLP {}: the collector takes records again after {:.1?}",
                            self.signal,
                            outage.since.elapsed()
                        );
                    }
                    return;
                }
                Attempt::Later(asked, failure) => {
                    self.counters.failed_requests.inc();
                    self.outage_goes_on(failure);
                    let pause = asked.map_or(backoff, |a| a.min(MAX_RETRY_AFTER));
                    tokio::time::sleep(pause).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Attempt::Refused(failure) => return self.refused(records, &failure),
            }
        }
    }

    /// Says a failed attempt that will be retried: when the outage starts, when its cause
    /// changes, and once a minute while a cause that retrying cannot heal lasts.
    fn outage_goes_on(&mut self, failure: Failure) {
        let warn = match &self.outage {
            None => true,
            Some(o) => {
                !o.warned.same_cause(&failure) || (!failure.heals() && o.at.elapsed() >= WARN_EVERY)
            }
        };
        if !warn {
            return;
        }
        tracing::warn!(
            "OTLP {} to {}: {failure}; retrying, keeping up to {} records meanwhile",
            self.signal,
            self.collector.config.uri,
            QUEUE + BATCH
        );
        let now = Instant::now();
        self.outage = Some(Outage {
            since: self.outage.as_ref().map_or(now, |o| o.since),
            warned: failure,
            at: now,
        });
    }

    fn refused(&mut self, records: u64, failure: &Failure) {
        self.counters.failed_requests.inc();
        self.counters.dropped.inc_by(records);
        self.refused.0 += 1;
        if self
            .refused
            .1
            .is_none_or(|last| last.elapsed() >= WARN_EVERY)
        {
            tracing::warn!(
                "OTLP {} to {}: {failure}; {} batch(es) dropped since the last warning (at most one a minute)",
                self.signal,
                self.collector.config.uri,
                self.refused.0
            );
            self.refused = (0, Some(Instant::now()));
        }
    }

    async fn attempt(&self, body: Bytes) -> Attempt {
        let config = &self.collector.config;
        let mut req = hyper::Request::post(config.uri.clone())
            .header("content-type", "application/x-protobuf")
            .header(
                "user-agent",
                concat!("faultline/", env!("CARGO_PKG_VERSION")),
            );
        if config.gzip {
            req = req.header("content-encoding", "gzip");
        }
        for (k, v) in &config.headers {
            req = req.header(k, v);
        }
        let req = match req.body(Full::new(body)) {
            Ok(req) => req,
            Err(e) => {
                return Attempt::Refused(Failure::Local(format!("building the request: {e}")));
            }
        };
        // The answer, and of an error answer the start of its body, within the timeout.
        let answer = async {
            let resp = self.collector.client.request(req).await?;
            if resp.status().is_success() {
                return Ok::<_, hyper_util::client::legacy::Error>(Attempt::Done);
            }
            let retry_after = resp
                .headers()
                .get(hyper::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let content_type = resp
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let status = resp.status();
            let body = first_bytes(resp.into_body(), BODY_READ).await;
            let failure = Failure::status(status, content_type.as_deref(), &body);
            Ok(match status.as_u16() {
                429 | 502 | 503 | 504 => Attempt::Later(retry_after, failure),
                _ => Attempt::Refused(failure),
            })
        };
        match tokio::time::timeout(config.timeout, answer).await {
            Ok(Ok(attempt)) => attempt,
            // Refused, reset, a TLS failure, or too slow: the collector may be restarting, or
            // an operator fixing its certificate.
            Ok(Err(e)) => Attempt::Later(None, Failure::of_request(&e, &config.tls)),
            Err(_) => Attempt::Later(None, Failure::NoAnswer(config.timeout)),
        }
    }
}

/// At most `max` bytes of a body, as far as it comes (an error ends it).
async fn first_bytes(mut body: hyper::body::Incoming, max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < max {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let room = max - out.len();
                    out.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            Some(Err(_)) | None => break,
        }
    }
    out
}

/// What one attempt of a request came to.
pub(super) enum Attempt {
    Done,
    /// Worth another try, after this long if the collector said (Retry-After).
    Later(Option<Duration>, Failure),
    /// Not worth another try (400, 401, 403, 404, 413, ...).
    Refused(Failure),
}

/// The client of one signal: http, or https with the `..._CERTIFICATE` CA (else the system's
/// roots, through rustls-native-certs) and the `..._CLIENT_*` certificate if given.
fn client(config: &SignalConfig) -> anyhow::Result<HttpClient> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let tls = &config.tls;
    let mut roots = rustls::RootCertStore::empty();
    match &tls.certificate {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .with_context(|| format!("reading the CA certificate {}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                bail!("no CA certificate in {}", path.display());
            }
        }
        None if config.uri.scheme_str() == Some("https") => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                bail!(
                    "no system CA certificates found ({} errors); set OTEL_EXPORTER_OTLP_CERTIFICATE",
                    found.errors.len()
                );
            }
        }
        None => {}
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_root_certificates(roots);
    let tls_config = match (&tls.client_certificate, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .with_context(|| format!("reading the client certificate {}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("reading the client key {}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .context("the client certificate and key")?
        }
        _ => builder.with_no_client_auth(),
    };
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

pub(super) fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    enc.write_all(body)?;
    enc.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hyper's real error for a closed port, said with every cause.
    #[tokio::test]
    async fn a_closed_port_is_said_with_its_causes() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let endpoint = format!("http://127.0.0.1:{port}");
        let config = super::super::OtlpConfig::from_env(Some(&endpoint), |_| None)
            .unwrap()
            .unwrap();
        let counters = OtlpCounters {
            dropped: prometheus::IntCounter::new("dropped", "dropped").unwrap(),
            failed_requests: prometheus::IntCounter::new("failed", "failed").unwrap(),
        };
        let collector = Collector::new("logs", config.logs.unwrap()).unwrap();
        let sender = Sender::new("logs", collector, counters, Arc::default());
        match sender.attempt(Bytes::new()).await {
            Attempt::Later(None, failure) => assert_eq!(
                failure.to_string(),
                "unreachable (client error (Connect): tcp connect error: Connection refused (os \
                 error 111))"
            ),
            Attempt::Later(..) | Attempt::Done | Attempt::Refused(_) => panic!("not refused"),
        }
    }

    #[test]
    fn gzip_round_trips() {
        use std::io::Read as _;
        let body = b"faultline ".repeat(100);
        let packed = gzip(&body).unwrap();
        assert!(packed.len() < body.len());
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(packed.as_slice())
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, body);
    }
}
