//! `faultline run`: the node daemon. Loads and attaches every probe the kernel supports
//! (saying which it skipped and why), then runs the pipeline for as long as the node lives:
//! clone failures become JSON event lines and counters as they happen; every refresh, the
//! task counters become per-pod metrics. Serves `/metrics`, `/healthz` and `/readyz`.
//! SIGTERM or SIGINT: stop serving, deliver what is in flight, detach, exit 0.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};

use crate::{
    cgroups::CgroupFs,
    clone::{self, Enricher},
    conntrack::{self, ClashesResolved, Classifier, ConntrackDrop},
    dns::{DnsQuery, DnsTracker, Names},
    lines::EventLines,
    loader::{Attachment, CLONE_PROGRAMS, KernelArgs, KernelLog, Probes, TASK_PROGRAMS},
    metrics::Metrics,
    netns::NetnsDirectory,
    node::NodeTasks,
    otlp::{OtlpConfig, OtlpExporter},
    pods::{Attributor, PodArgs},
    serve::{Served, serve},
    tasks::TaskModel,
    trace::EventKind,
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
    /// Which events become event lines and OTLP records: clone (failed task creation), dns
    /// (every query: a line per query on a busy node), conntrack (drops and resolved clashes).
    /// Metrics count all of them whatever this says.
    #[arg(long, env = "FAULTLINE_EVENTS", value_enum, value_delimiter = ',', default_values_t = [EventKind::Clone, EventKind::Dns, EventKind::Conntrack])]
    pub events: Vec<EventKind>,
    /// How often the task counters are turned into metrics.
    #[arg(long, env = "FAULTLINE_REFRESH", value_parser = crate::cli::parse_interval, default_value = "5s")]
    pub refresh: Duration,
    /// Also export events over OTLP/HTTP to this collector (e.g. http://127.0.0.1:4318). The
    /// standard OTEL_EXPORTER_OTLP_* variables (endpoints, headers, compression, timeout) and
    /// OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME apply too; this flag wins over
    /// OTEL_EXPORTER_OTLP_ENDPOINT.
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

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    crate::serve::raise_fd_limit();
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
        kinds: args.events.clone(),
        metrics: metrics.clone(),
        lines: open_lines(&args, metrics.event_lines_dropped()?)?,
        otlp: match OtlpConfig::from_env(args.otlp_endpoint.as_deref(), |k| std::env::var(k).ok())?
        {
            Some(config) => Some(OtlpExporter::start(config, &node, metrics.otlp_counters()?)),
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
    let server = tokio::spawn(serve(listener, served.clone(), metrics.server_counters()?));
    let mut refresh_errors = RefreshErrors::default();

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
            }
            guard = async { dns_ring.as_mut().expect("only polled with DNS").readable_mut().await }, if dns_ring.is_some() => {
                let mut guard = guard.context("waiting on the DNS ring buffer")?;
                if let Some(tracker) = dns.as_mut() {
                    crate::dns::drain(guard.get_inner_mut(), tracker, &mut enricher.attributor, |q| outputs.dns_query(&q))?;
                }
                guard.clear_ready();
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
            }
            _ = dns_sweep.tick(), if dns.is_some() => {
                if let (Some(ring), Some(tracker)) = (dns_ring.as_mut(), dns.as_mut()) {
                    // The kernel wakes us for DNS events in batches: collect the rest.
                    crate::dns::catch_up(ring.get_mut(), &mut probes, tracker, &mut enricher.attributor, |q| outputs.dns_query(&q))?;
                }
            }
            _ = refresh.tick() => {
                let result = (|| -> anyhow::Result<()> {
                    if let Some(c) = classifier.as_mut() {
                        for clashes in c.poll_clashes(args.refresh, &mut enricher.attributor) {
                            outputs.clashes_resolved(&clashes);
                        }
                        if let Some(node) = c.node_counters() {
                            metrics.conntrack_node(&node);
                        }
                        metrics.events_lost("conntrack", probes.conntrack_stats()?.lost);
                    }
                    if tasks_ok {
                        model.update(Instant::now(), probes.task_counts()?);
                    }
                    if let Some(tracker) = dns.as_ref() {
                        let mut stats = probes.dns_stats()?;
                        metrics.events_lost("dns", stats.lost);
                        stats.malformed += tracker.malformed;
                        metrics.dns_untracked(&stats);
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
                    Ok(())
                })();
                match result {
                    Ok(()) => served.ready.store(true, Ordering::Relaxed),
                    Err(e) => refresh_errors.report(&metrics, &e),
                }
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
    outputs.lines.finish();
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

/// Where each event goes: metrics always; the event lines and OTLP for the kinds asked for.
/// None of them can block.
struct Outputs {
    kinds: Vec<EventKind>,
    metrics: Arc<Metrics>,
    lines: EventLines,
    otlp: Option<OtlpExporter>,
}

impl Outputs {
    fn wants(&self, kind: EventKind) -> bool {
        self.kinds.contains(&kind)
    }

    fn clone_failure(&mut self, f: &clone::CloneFailure) -> anyhow::Result<()> {
        self.metrics.clone_failure(f);
        if self.wants(EventKind::Clone) {
            if let Some(otlp) = &self.otlp {
                otlp.clone_failure(f);
            }
            self.lines.send(f);
        }
        Ok(())
    }

    fn conntrack_drop(&mut self, d: &ConntrackDrop) -> anyhow::Result<()> {
        self.metrics.conntrack_drop(d);
        if self.wants(EventKind::Conntrack) {
            if let Some(otlp) = &self.otlp {
                otlp.conntrack_drop(d);
            }
            self.lines.send(d);
        }
        Ok(())
    }

    fn clashes_resolved(&mut self, c: &ClashesResolved) {
        self.metrics.clashes_resolved(c);
        if self.wants(EventKind::Conntrack) {
            self.lines.send(c);
        }
    }

    fn dns_query(&mut self, q: &DnsQuery) -> anyhow::Result<()> {
        self.metrics.dns_query(q);
        if self.wants(EventKind::Dns) {
            if let Some(otlp) = &self.otlp {
                otlp.dns_query(q);
            }
            self.lines.send(q);
        }
        Ok(())
    }
}

fn open_lines(args: &RunArgs, dropped: prometheus::IntCounterVec) -> anyhow::Result<EventLines> {
    match (&args.events_file, args.no_events) {
        (_, true) => Ok(EventLines::none(dropped)),
        (Some(path), false) => EventLines::file(path, dropped),
        (None, false) => EventLines::stdout(dropped),
    }
}

/// A failed refresh is counted and said on stderr (once per distinct error, or once a
/// minute), never fatal: a pod that makes one /proc or cgroup read fail must not stop the
/// daemon.
#[derive(Default)]
struct RefreshErrors {
    last: Option<(String, Instant)>,
}

impl RefreshErrors {
    fn report(&mut self, metrics: &Metrics, e: &anyhow::Error) {
        metrics.refresh_failed();
        let text = format!("{e:#}");
        let repeat = self
            .last
            .as_ref()
            .is_some_and(|(t, at)| *t == text && at.elapsed() < Duration::from_secs(60));
        if !repeat {
            eprintln!("faultline: refresh failed (will retry): {text}");
            self.last = Some((text, Instant::now()));
        }
    }
}
