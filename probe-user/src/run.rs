//! `faultline run`: the node daemon. Loads and attaches every probe the kernel supports
//! (saying which it skipped and why), then runs the pipeline for as long as the node lives:
//! clone failures become JSON event lines and counters as they happen; every refresh, the
//! task counters become per-pod metrics. Serves `/metrics`, `/healthz` and `/readyz`.
//! SIGTERM or SIGINT: stop serving, deliver what is in flight, detach, exit 0.

use std::{
    convert::Infallible,
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::Args;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};

use crate::{
    cgroups::CgroupFs,
    clone::{self, Enricher},
    conntrack::{self, ClashesResolved, Classifier, ConntrackDrop},
    dns::{DnsQuery, DnsTracker, Names},
    loader::{Attachment, CLONE_PROGRAMS, KernelArgs, KernelLog, Probes, TASK_PROGRAMS},
    metrics::Metrics,
    netns::NetnsDirectory,
    node::NodeTasks,
    otlp::OtlpExporter,
    pods::{Attributor, PodArgs},
    tasks::TaskModel,
};

/// Not a default port of any exporter we know of (node_exporter 9100, kube-state-metrics
/// 8080, Tetragon 2112, Retina 10093, Inspektor Gadget 2223).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:9847";

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "FAULTLINE_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Write event lines (JSON, the `trace --output json` schema) here instead of stdout.
    #[arg(long, env = "FAULTLINE_EVENTS_FILE")]
    pub events_file: Option<PathBuf>,
    /// Do not write event lines at all (metrics only).
    #[arg(long, env = "FAULTLINE_NO_EVENTS")]
    pub no_events: bool,
    /// How often the task counters are turned into metrics.
    #[arg(long, env = "FAULTLINE_REFRESH", value_parser = crate::cli::parse_interval, default_value = "5s")]
    pub refresh: Duration,
    /// Also export events over OTLP/HTTP to this collector (e.g. http://127.0.0.1:4318).
    #[arg(long, env = "FAULTLINE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// A DNS query without an answer for this long counts as a timeout.
    #[arg(long, env = "FAULTLINE_DNS_TIMEOUT", value_parser = humantime::parse_duration, default_value = "2s")]
    pub dns_timeout: Duration,
    /// Most series per metric; past it new workloads share one `_overflow` series.
    #[arg(long, env = "FAULTLINE_MAX_SERIES", default_value_t = 2000)]
    pub max_series: usize,
    /// Query names in event lines and OTLP spans: `full`, or `redact` (a hash keyed at random
    /// per start). Metrics never carry names. The DaemonSet sets `redact`.
    #[arg(long, env = "FAULTLINE_DNS_NAMES", value_enum, default_value_t = Names::Full)]
    pub dns_names: Names,
    #[command(flatten)]
    pub kernel: KernelArgs,
    #[command(flatten)]
    pub pods: PodArgs,
}

/// Where event lines go.
enum Sink {
    None,
    /// Buffered (stdout is line-buffered: a write per event in a storm), flushed after each
    /// batch of events.
    Stdout(std::io::BufWriter<std::io::Stdout>),
    File(std::io::BufWriter<std::fs::File>),
}

impl Sink {
    fn open(args: &RunArgs) -> anyhow::Result<Self> {
        Ok(match (&args.events_file, args.no_events) {
            (_, true) => Sink::None,
            (Some(path), false) => Sink::File(std::io::BufWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?,
            )),
            (None, false) => Sink::Stdout(std::io::BufWriter::new(std::io::stdout())),
        })
    }

    /// One event as a JSON line (not even encoded when events are off).
    fn write(&mut self, event: &impl serde::Serialize) -> anyhow::Result<()> {
        fn line(mut w: impl std::io::Write, event: &impl serde::Serialize) -> anyhow::Result<()> {
            serde_json::to_writer(&mut w, event).context("encoding an event")?;
            w.write_all(b"\n")?;
            Ok(())
        }
        match self {
            Sink::None => Ok(()),
            Sink::Stdout(out) => line(out, event).context("writing events to stdout"),
            Sink::File(f) => line(f, event).context("writing the events file"),
        }
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        match self {
            Sink::None => Ok(()),
            Sink::Stdout(out) => out.flush().context("writing events to stdout"),
            Sink::File(f) => f.flush().context("writing the events file"),
        }
    }
}

/// What the HTTP endpoints read.
struct Served {
    metrics: Arc<Metrics>,
    ready: AtomicBool,
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut probes = Probes::open(&args.kernel, KernelLog::Off)?;
    let node = args
        .pods
        .node_name
        .clone()
        .unwrap_or_else(crate::pods::hostname);
    let metrics = Arc::new(Metrics::new(args.max_series)?);
    let attached =
        |probes: &mut Probes, name: &str, programs: &[Attachment]| match probes.attach(programs) {
            Ok(()) => {
                metrics.probe_attached(name, true);
                true
            }
            Err(e) => {
                eprintln!(
                    "faultline: skipped probe {name}: {}",
                    crate::loader::brief(&e)
                );
                metrics.probe_attached(name, false);
                false
            }
        };
    let clone_ok = attached(&mut probes, "clone", &CLONE_PROGRAMS);
    let tasks_ok = attached(&mut probes, "tasks", &TASK_PROGRAMS);
    if !clone_ok && !tasks_ok {
        bail!("no probe could be attached (see the lines above)");
    }
    let mut ring = if clone_ok {
        Some(probes.clone_events()?)
    } else {
        None
    };
    let cgroups = CgroupFs::discover()?;
    let (mut dns_ring, mut dns) = match probes.dns_events(&cgroups) {
        Ok(ring) => {
            metrics.probe_attached("dns", true);
            (
                Some(ring),
                Some(DnsTracker::new(args.dns_timeout, args.dns_names)),
            )
        }
        Err(e) => {
            eprintln!("faultline: skipped probe dns: {}", crate::loader::brief(&e));
            metrics.probe_attached("dns", false);
            (None, None)
        }
    };
    let (mut ct_ring, mut classifier) = match probes.conntrack_events() {
        Ok(ring) => {
            metrics.probe_attached("conntrack", true);
            (
                Some(ring),
                Some(Classifier::new(NetnsDirectory::new("/proc"))),
            )
        }
        Err(e) => {
            eprintln!(
                "faultline: skipped probe conntrack: {}",
                crate::loader::brief(&e)
            );
            metrics.probe_attached("conntrack", false);
            (None, None)
        }
    };
    let mut enricher = Enricher::new(Attributor::new(cgroups, &args.pods).await);
    let mut model = TaskModel::default();
    let mut outputs = Outputs {
        metrics: metrics.clone(),
        sink: Sink::open(&args)?,
        otlp: match &args.otlp_endpoint {
            Some(endpoint) => Some(OtlpExporter::start(
                endpoint,
                &node,
                metrics.otlp_counters()?,
            )?),
            None => None,
        },
    };

    let served = Arc::new(Served {
        metrics: metrics.clone(),
        ready: AtomicBool::new(false),
    });
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let server = tokio::spawn(serve(listener, served.clone()));

    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut refresh = tokio::time::interval(args.refresh);
    let mut dns_sweep = tokio::time::interval(crate::dns::SWEEP_INTERVAL);
    eprintln!(
        "faultline: running on node {node}, serving http://{}/metrics",
        args.listen
    );

    loop {
        tokio::select! {
            guard = async { ring.as_mut().expect("only polled with a ring").readable_mut().await }, if ring.is_some() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                clone::drain(guard.get_inner_mut(), &mut enricher, |f| outputs.clone_failure(&f))?;
                guard.clear_ready();
                outputs.sink.flush()?;
            }
            guard = async { dns_ring.as_mut().expect("only polled with DNS").readable_mut().await }, if dns_ring.is_some() => {
                let mut guard = guard.context("waiting on the DNS ring buffer")?;
                if let Some(tracker) = dns.as_mut() {
                    crate::dns::drain(guard.get_inner_mut(), tracker, &mut enricher.attributor, |q| outputs.dns_query(&q))?;
                }
                guard.clear_ready();
                outputs.sink.flush()?;
            }
            guard = async { ct_ring.as_mut().expect("only polled with conntrack").readable_mut().await }, if ct_ring.is_some() => {
                let mut guard = guard.context("waiting on the conntrack ring buffer")?;
                // The waiting queries first, so that drops can name them.
                if let (Some(ring), Some(tracker)) = (dns_ring.as_mut(), dns.as_mut()) {
                    crate::dns::catch_up(ring.get_mut(), &mut probes, tracker, &mut enricher.attributor, |q| outputs.dns_query(&q))?;
                }
                if let Some(c) = classifier.as_mut() {
                    conntrack::drain(guard.get_inner_mut(), c, &mut enricher.attributor, dns.as_mut(), |d| outputs.conntrack_drop(&d))?;
                }
                guard.clear_ready();
                outputs.sink.flush()?;
            }
            _ = dns_sweep.tick(), if dns.is_some() => {
                if let (Some(ring), Some(tracker)) = (dns_ring.as_mut(), dns.as_mut()) {
                    // The kernel wakes us for DNS events in batches: collect the rest.
                    crate::dns::catch_up(ring.get_mut(), &mut probes, tracker, &mut enricher.attributor, |q| outputs.dns_query(&q))?;
                }
            }
            _ = refresh.tick() => {
                if let Some(c) = classifier.as_mut() {
                    for clashes in c.poll_clashes(args.refresh, &mut enricher.attributor) {
                        outputs.clashes_resolved(&clashes)?;
                    }
                    if let Some(node) = c.node_counters() {
                        metrics.conntrack_node(&node);
                    }
                    metrics.events_lost("conntrack", probes.conntrack_stats()?.lost);
                }
                if tasks_ok {
                    model.update(std::time::Instant::now(), probes.task_counts()?);
                }
                if dns.is_some() {
                    metrics.events_lost("dns", probes.dns_stats()?.lost);
                    let tcp = probes
                        .dns_tcp_counts()?
                        .into_iter()
                        .map(|(id, c)| {
                            let (_, a) = enricher.attributor.attribute(id, None);
                            (id, c, crate::metrics::who(&a.workload, a.pod.as_ref()))
                        })
                        .collect();
                    metrics.dns_tcp(tcp);
                }
                let rows = model.rows(&mut enricher.attributor);
                metrics.tasks(&rows, NodeTasks::read()?, probes.clone_stats()?, probes.task_stats()?);
                outputs.sink.flush()?;
                served.ready.store(true, Ordering::Relaxed);
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    // Stop serving first, then deliver what the kernel already handed over.
    server.abort();
    served.ready.store(false, Ordering::Relaxed);
    if let Some(ring) = ring.as_mut() {
        clone::drain(ring.get_mut(), &mut enricher, |f| outputs.clone_failure(&f))?;
    }
    if let (Some(ring), Some(tracker)) = (dns_ring.as_mut(), dns.as_mut()) {
        crate::dns::drain(ring.get_mut(), tracker, &mut enricher.attributor, |q| {
            outputs.dns_query(&q)
        })?;
    }
    if let (Some(ring), Some(c)) = (ct_ring.as_mut(), classifier.as_mut()) {
        conntrack::drain(
            ring.get_mut(),
            c,
            &mut enricher.attributor,
            dns.as_mut(),
            |d| outputs.conntrack_drop(&d),
        )?;
    }
    outputs.sink.flush()?;
    let stats = probes.clone_stats()?;
    // Dropping the probes detaches every program.
    drop(ring);
    drop(dns_ring);
    drop(ct_ring);
    drop(probes);
    eprintln!(
        "faultline: stopped; {} clone failures seen in the kernel, {} lost (ring buffer full)",
        stats.failures, stats.lost
    );
    Ok(())
}

/// Where each event goes: metrics, the event lines, OTLP.
struct Outputs {
    metrics: Arc<Metrics>,
    sink: Sink,
    otlp: Option<OtlpExporter>,
}

impl Outputs {
    fn clone_failure(&mut self, f: &clone::CloneFailure) -> anyhow::Result<()> {
        self.metrics.clone_failure(f);
        if let Some(otlp) = &self.otlp {
            otlp.clone_failure(f);
        }
        self.sink.write(f)
    }

    fn conntrack_drop(&mut self, d: &ConntrackDrop) -> anyhow::Result<()> {
        self.metrics.conntrack_drop(d);
        self.sink.write(d)
    }

    fn clashes_resolved(&mut self, c: &ClashesResolved) -> anyhow::Result<()> {
        self.metrics.clashes_resolved(c);
        self.sink.write(c)
    }

    fn dns_query(&mut self, q: &DnsQuery) -> anyhow::Result<()> {
        self.metrics.dns_query(q);
        if let Some(otlp) = &self.otlp {
            otlp.dns_query(q);
        }
        self.sink.write(q)
    }
}

async fn serve(listener: TcpListener, served: Arc<Served>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let served = served.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| respond(req, served.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond<B>(
    req: Request<B>,
    served: Arc<Served>,
) -> Result<Response<Full<Bytes>>, Infallible> {
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
            "not found: try /metrics, /healthz, /readyz\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, v);
    }
    Ok(response)
}
