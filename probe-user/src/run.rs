//! `faultline run`: the node daemon, a sink of the pipeline (`pipeline`) with every probe the
//! kernel supports (saying which it skipped and why), for as long as the node lives: events
//! become counters, event lines and OTLP records as they happen; every refresh, the kernel's
//! counters become per-pod metrics. Serves `/metrics`, `/explain`, `/healthz` and `/readyz`
//! (over TLS, and `/metrics` and `/explain` only to the credentials configured, when asked;
//! `/healthz` and `/readyz` also on a plain health port of their own) on threads of their own
//! (a runtime apart from the pipeline's, so no response delays the events, and no event storm
//! delays `/healthz`); the rings are read on a thread of their own too (`kernel::rings`).
//! Everything the user typed is checked before anything loads ([`Setup`]: one line and exit 2
//! for a mistake, the web config file and its TLS files too), and the listening sockets bound
//! then, while the capabilities a low port needs are still held; after attaching it keeps only the
//! capabilities reading needs (`kernel::privileges`). SIGTERM or SIGINT: deliver what is in
//! flight, stop serving, detach, exit 0 (saying what OTLP could not deliver). SIGHUP: reopen
//! the events file (log rotation), go on. The signals it has no use for, whose default would
//! end it, are ignored from its first instruction ([`ignore_unused_signals`]).

use std::{
    io::ErrorKind,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use clap::Args;
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};

use probe_common::{clone::CloneStats, tasks::TaskStats};

use crate::{
    attribution::pods::PodArgs,
    cli::{EventKind, UsageError},
    diagnosis::Recorder,
    export::access::Access,
    export::budget::{Budget, BudgetConfig, BudgetLine, Verdict},
    export::kube_events::KubeEvents,
    export::lines::{Destination, EventLines},
    export::metrics::Metrics,
    export::otlp::{OtlpExporter, OtlpSetup},
    export::serve::{HttpState, Port, serve},
    export::web_config::WebConfig,
    kernel::loader::{KernelArgs, KernelLog},
    pipeline::{Pipeline, Sink},
    signals::{DnsOptions, Event, Part, Plan, Refresh, Signal, dns::Names},
};

/// Signals whose default action ends a process and that neither a container runtime nor an
/// operator uses to stop one: nothing in faultline uses them, and sent by mistake (a log
/// tool's SIGUSR1, a stray profiler's SIGPROF) they must not take the node's probe down.
/// SIGQUIT keeps its meaning (quit now, with a core), and so do SIGPWR and the real-time
/// signals, with which init systems stop a container's first process (faultline may be it).
/// SIGPIPE is ignored already: Rust's runtime ignores it before `main`.
const UNUSED_SIGNALS: [(libc::c_int, &str); 6] = [
    (libc::SIGUSR1, "SIGUSR1"),
    (libc::SIGUSR2, "SIGUSR2"),
    (libc::SIGALRM, "SIGALRM"),
    (libc::SIGVTALRM, "SIGVTALRM"),
    (libc::SIGPROF, "SIGPROF"),
    (libc::SIGIO, "SIGIO"),
];

/// Ignores [`UNUSED_SIGNALS`]: called by `main` before any thread exists, so that no thread
/// starts with them fatal and no signal sent during the load (seconds on a busy node) ends
/// the daemon. Ignored rather than handled: a handler could only say it was ignored, a line
/// per signal for whoever sends them in a loop; faultline starts no other program, which
/// would inherit the ignoring.
pub fn ignore_unused_signals() -> anyhow::Result<()> {
    for (signal, name) in UNUSED_SIGNALS {
        // SAFETY: SIG_IGN for a signal no code of the process handles.
        if unsafe { libc::signal(signal, libc::SIG_IGN) } == libc::SIG_ERR {
            bail!("ignoring {name}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A rate: a finite number above zero.
fn parse_rate(s: &str) -> anyhow::Result<f64> {
    let v: f64 = s
        .parse()
        .with_context(|| format!("{s:?} is not a number"))?;
    if !(v.is_finite() && v > 0.0) {
        bail!("{s:?}: the rate must be above zero");
    }
    Ok(v)
}

/// Not a default port of any exporter we know of (node_exporter 9100, kube-state-metrics
/// 8080, Tetragon 2112, Retina 10093, Inspektor Gadget 2223).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:9847";

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Address for /metrics, /explain, /healthz and /readyz: `:PORT` (every IPv4 address,
    /// 0.0.0.0:PORT), `IP:PORT` or `[IPv6]:PORT`.
    #[arg(long, env = "FAULTLINE_LISTEN", value_parser = crate::cli::parse_listen, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Also serve /healthz and /readyz, and nothing else, on this address (same forms as
    /// --listen): plain HTTP without credentials, for the kubelet's probes when --listen asks
    /// for TLS client certificates or credentials. The DaemonSet sets 0.0.0.0:9848.
    #[arg(long, env = "FAULTLINE_HEALTH_LISTEN", value_parser = crate::cli::parse_listen)]
    pub health_listen: Option<SocketAddr>,
    /// TLS and basic auth on --listen, in the format of Prometheus' exporter-toolkit:
    /// `tls_server_config` (cert_file, key_file, client_auth_type, client_ca_file,
    /// min_version, max_version) and `basic_auth_users` (user: bcrypt hash). With users,
    /// /metrics and /explain need their credentials (or, with --kube-rbac, a token).
    #[arg(long, env = "FAULTLINE_WEB_CONFIG_FILE")]
    pub web_config_file: Option<PathBuf>,
    /// /metrics and /explain need a Kubernetes bearer token whose user may `get` the path
    /// (RBAC nonResourceURLs), checked as kube-rbac-proxy does: TokenReview, then
    /// SubjectAccessReview; verdicts kept 2 min (refusals 30 s). Needs the API and RBAC
    /// `create` on tokenreviews and subjectaccessreviews; the DaemonSet sets it.
    #[arg(long, env = "FAULTLINE_KUBE_RBAC")]
    pub kube_rbac: bool,
    /// Write event lines (JSON, the `trace --output json` schema) here instead of stdout.
    #[arg(long, env = "FAULTLINE_EVENTS_FILE")]
    pub events_file: Option<PathBuf>,
    /// Do not write event lines at all (metrics only).
    #[arg(long, env = "FAULTLINE_NO_EVENTS")]
    pub no_events: bool,
    /// Which events become event lines and OTLP records (within the event budget): clone
    /// (failed task creation), dns (queries), conntrack (drops and resolved clashes). Metrics
    /// count all of them whatever this says.
    #[arg(long, env = "FAULTLINE_EVENTS", value_enum, value_delimiter = ',', default_values_t = [EventKind::Clone, EventKind::Dns, EventKind::Conntrack])]
    pub events: Vec<EventKind>,
    /// The event budget: full lines (and OTLP records) per workload, kind and cause in each
    /// `--events-interval`; the rest of the interval's are summarized in one
    /// `event_summary` line (metrics and /explain count every event).
    #[arg(long, env = "FAULTLINE_EVENTS_PER_WORKLOAD", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub events_per_workload: u32,
    /// The event budget's interval: each ends with the summaries of what it suppressed.
    #[arg(long, env = "FAULTLINE_EVENTS_INTERVAL", value_parser = crate::cli::parse_period, default_value = "1m")]
    pub events_interval: Duration,
    /// The event budget's node-wide ceiling: full lines per second past each workload's
    /// first of the interval (bursts of ten seconds' worth).
    #[arg(long, env = "FAULTLINE_EVENTS_PER_SECOND", default_value_t = 2.0, value_parser = parse_rate)]
    pub events_per_second: f64,
    /// The span each limit's growth is measured over, for its time to exhaustion
    /// (`faultline_limit_exhaustion_seconds`, `/explain`).
    #[arg(long, env = "FAULTLINE_TREND_WINDOW", value_parser = crate::cli::parse_window, default_value = "5m")]
    pub trend_window: Duration,
    /// How often the task counters are turned into metrics.
    #[arg(long, env = "FAULTLINE_REFRESH", value_parser = crate::cli::parse_period, default_value = "5s")]
    pub refresh: Duration,
    /// Also export events over OTLP/HTTP (http/protobuf) to this collector, e.g.
    /// http://127.0.0.1:4318 or https://...: log records to <URL>/v1/logs, spans to
    /// <URL>/v1/traces. Acts as OTEL_EXPORTER_OTLP_ENDPOINT and wins over it; the other
    /// standard variables apply as the OpenTelemetry specification says, general and per
    /// signal (OTEL_EXPORTER_OTLP_[LOGS_|TRACES_]ENDPOINT, _HEADERS, _COMPRESSION, _TIMEOUT,
    /// _PROTOCOL, _CERTIFICATE, _CLIENT_CERTIFICATE, _CLIENT_KEY; OTEL_SDK_DISABLED,
    /// OTEL_LOGS_EXPORTER, OTEL_TRACES_EXPORTER; OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME).
    /// A signal without an endpoint is not exported.
    #[arg(long, env = "FAULTLINE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// A DNS query without an answer for this long counts as a timeout.
    #[arg(long, env = "FAULTLINE_DNS_TIMEOUT", value_parser = crate::cli::parse_timeout, default_value = "2s")]
    pub dns_timeout: Duration,
    /// Most series per metric (one workload has at most 16 of a metric's: its further label
    /// sets count under `other`); past it new series share one `_overflow` series.
    #[arg(long, env = "FAULTLINE_MAX_SERIES", default_value_t = 2000)]
    pub max_series: usize,
    /// Query names in event lines and OTLP spans: `full`, or `redact` (a hash keyed at random
    /// per start). Metrics never carry names. The DaemonSet sets `redact`.
    #[arg(long, env = "FAULTLINE_DNS_NAMES", value_enum, default_value_t = Names::Redact)]
    pub dns_names: Names,
    /// Record Kubernetes Events on the affected pods (refused task creation, a pids limit
    /// about to bind, DNS timeouts, conntrack drops), aggregated and rate-limited. Needs the
    /// API and RBAC `create`/`patch` on `events.k8s.io` events; the DaemonSet sets it.
    #[arg(long, env = "FAULTLINE_KUBE_EVENTS")]
    pub kube_events: bool,
    #[command(flatten)]
    pub kernel: KernelArgs,
    #[command(flatten)]
    pub pods: PodArgs,
}

/// What the user typed, checked and made ready before anything loads: the listening socket
/// bound (while the capabilities a port below 1024 needs are still held), the events file
/// opened for appending, the OTLP settings checked and their TLS files read, the kubeconfig
/// read, the web config file read with its certificates and keys, the API's client made for
/// --kube-rbac. A mistake is one line and exit 2 at once, not an error after the programs
/// loaded.
struct Setup {
    listener: std::net::TcpListener,
    health: Option<std::net::TcpListener>,
    /// What the main port asks of its readers.
    port: Port,
    lines: Destination,
    otlp: Option<OtlpSetup>,
}

impl Setup {
    async fn check(args: &RunArgs) -> anyhow::Result<Setup> {
        if args.kube_rbac && args.pods.no_kube_api {
            bail!(
                "--kube-rbac checks bearer tokens with the Kubernetes API: it cannot go with --no-kube-api"
            );
        }
        if args.health_listen == Some(args.listen) {
            bail!("--health-listen {}: the address of --listen", args.listen);
        }
        let web = match &args.web_config_file {
            Some(path) => WebConfig::read(path)?,
            None => WebConfig::default(),
        };
        let listener = listen(args.listen, "--listen")?;
        let health = match args.health_listen {
            Some(addr) => Some(listen(addr, "--health-listen")?),
            None => None,
        };
        let lines = match (&args.events_file, args.no_events) {
            (_, true) => Destination::none(),
            (Some(path), false) => Destination::file(path)?,
            (None, false) => Destination::stdout()?,
        };
        let otlp = OtlpSetup::from_env(args.otlp_endpoint.as_deref(), |k| std::env::var(k).ok())?;
        if let Some(path) = &args.pods.kubeconfig
            && !args.pods.no_kube_api
        {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            // Its own text only: it repeats its cause's.
            kube::config::Kubeconfig::from_yaml(&text)
                .map_err(|e| anyhow!("the kubeconfig {}: {e}", path.display()))?;
        }
        let kube = if args.kube_rbac {
            let client = crate::attribution::kubeapi::client(args.pods.kubeconfig.as_ref())
                .await
                .map_err(|e| anyhow!("--kube-rbac: {e}"))?;
            Some(client)
        } else {
            None
        };
        let port = Port::Main {
            tls: web.tls.map(|t| tokio_rustls::TlsAcceptor::from(t.config)),
            access: Arc::new(Access::new(web.users, kube)?),
        };
        Ok(Setup {
            listener,
            health,
            port,
            lines,
            otlp,
        })
    }
}

/// The socket `flag` names, bound; a refusal said with what it means.
fn listen(addr: SocketAddr, flag: &str) -> anyhow::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(addr).map_err(|e| {
        let meaning = match e.kind() {
            ErrorKind::AddrInUse => "; another process listens there",
            ErrorKind::AddrNotAvailable => "; not an address of this host",
            ErrorKind::PermissionDenied if addr.port() < 1024 => {
                "; a port below 1024 needs CAP_NET_BIND_SERVICE"
            }
            _ => "",
        };
        anyhow!("{flag} {addr}: {e}{meaning}")
    })
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    crate::export::serve::raise_fd_limit();
    let setup = Setup::check(&args).await.map_err(UsageError::wrap)?;
    let node = args
        .pods
        .node_name
        .clone()
        .unwrap_or_else(crate::attribution::pods::hostname);
    let metrics = Arc::new(Metrics::new(args.max_series)?);
    let plan = Plan {
        signals: Signal::ALL.to_vec(),
        dns: DnsOptions {
            timeout: args.dns_timeout,
            names: args.dns_names,
        },
        trend: Some(args.trend_window),
        headroom: None,
        idle_cgroups: false,
        drop_privileges: true,
    };
    // Every probe the kernel accepts; the others are said and shown in /metrics.
    let mut pipeline = Pipeline::open(
        &args.kernel,
        KernelLog::Off,
        &args.pods,
        &plan,
        |signal, result| {
            if let Err(e) = &result {
                tracing::warn!(
                    "skipped probe {}: {}",
                    signal.as_str(),
                    crate::kernel::loader::brief(e)
                );
            }
            metrics.probe_attached(signal.as_str(), result.is_ok());
            Ok(())
        },
    )
    .await?;
    for d in pipeline.degraded() {
        metrics.probe_degraded(d.probe(), d.reason());
    }
    if !Signal::ALL.iter().any(|&s| s.core() && pipeline.has(s)) {
        bail!("no probe could be attached (see the lines above)");
    }
    let served = Arc::new(HttpState {
        metrics: metrics.clone(),
        ready: AtomicBool::new(false),
        recorder: Mutex::new(Recorder::new(&node)),
        explain_cache: Mutex::new(None),
    });
    let mut sink = Daemon::new(
        &args,
        setup.lines,
        setup.otlp,
        &node,
        metrics.clone(),
        served.clone(),
    )?;
    sink.outputs.kube_events = kube_events(&args, &node, &metrics).await?;
    let scheme = match &setup.port {
        Port::Main { tls: Some(_), .. } => "https",
        _ => "http",
    };
    match &setup.port {
        Port::Main { access, .. } if access.required() => tracing::info!(
            "/metrics and /explain need credentials: {}",
            access.describe()
        ),
        _ => tracing::warn!(
            "/metrics and /explain are open to whoever reaches {}: pod names, cgroup paths and process names (see --kube-rbac, --web-config-file)",
            args.listen
        ),
    }
    let mut listeners = vec![(setup.listener, setup.port)];
    if let Some(health) = setup.health {
        listeners.push((health, Port::Health));
    }
    let server = HttpThread::start(listeners, served.clone(), metrics.server_counters()?)?;

    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let reopen = sink.outputs.lines.reopen();
    let events_file = args.events_file.is_some() && !args.no_events;
    tokio::spawn(async move {
        while sighup.recv().await.is_some() {
            if events_file {
                tracing::info!("SIGHUP: reopening the events file");
                reopen.request();
            } else {
                tracing::info!("SIGHUP: no events file to reopen; going on");
            }
        }
    });
    let stop = async move {
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
    };
    tracing::info!(
        "running on node {node}, serving {scheme}://{}/metrics{}",
        args.listen,
        args.health_listen
            .map(|h| format!(", /healthz and /readyz also on http://{h}"))
            .unwrap_or_default()
    );
    pipeline.run(&mut sink, args.refresh, stop).await?;
    pipeline.refresh_once(&mut sink)?;
    // Stopped: not ready any more; what the kernel handed over is delivered.
    served.ready.store(false, Ordering::Relaxed);
    server.stop();
    let otlp_dropped = match sink.outputs.finish() {
        Some(otlp) => Some(otlp.shutdown(OTLP_SHUTDOWN).await),
        None => None,
    };
    let stats = sink.last_clone_stats;
    // Dropping the pipeline detaches every program.
    drop(pipeline);
    tracing::info!(
        "stopped; {} clone failures seen in the kernel, {} lost (ring buffer or queue full, or still queued at the stop){}",
        stats.failures,
        stats.lost,
        otlp_dropped
            .map(|n| format!("; {n} OTLP records still queued at the stop, dropped"))
            .unwrap_or_default()
    );
    Ok(())
}

/// The HTTP endpoints (the main port, and the health port if any) on a runtime of their own:
/// two worker threads, so that neither an event storm nor one slow response holds up
/// `/healthz`.
struct HttpThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long stopping waits for the OTLP collector to take what is queued.
const OTLP_SHUTDOWN: Duration = Duration::from_secs(5);

/// How long stopping waits for responses in flight.
const HTTP_SHUTDOWN: Duration = Duration::from_secs(1);

impl HttpThread {
    fn start(
        listeners: Vec<(std::net::TcpListener, Port)>,
        served: Arc<HttpState>,
        counters: crate::export::serve::ServerCounters,
    ) -> anyhow::Result<HttpThread> {
        for (listener, _) in &listeners {
            listener
                .set_nonblocking(true)
                .context("making the listening socket non-blocking")?;
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("http")
            .enable_all()
            .build()
            .context("starting the HTTP runtime")?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("http-accept".to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    let mut servers = tokio::task::JoinSet::new();
                    for (listener, port) in listeners {
                        match TcpListener::from_std(listener) {
                            Ok(listener) => {
                                servers.spawn(serve(
                                    listener,
                                    port,
                                    served.clone(),
                                    counters.clone(),
                                ));
                            }
                            Err(e) => tracing::error!("serving HTTP: {e}"),
                        }
                    }
                    // The servers run until stopped (dropping the set aborts them).
                    let _ = stopped.await;
                    drop(servers);
                });
                runtime.shutdown_timeout(HTTP_SHUTDOWN);
            })
            .context("starting the HTTP thread")?;
        Ok(HttpThread {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The daemon as a sink of the pipeline: every event to its outputs; every refresh, the
/// counters to metrics (a failed refresh counted, never fatal), and ready once one worked.
struct Daemon {
    outputs: Outputs,
    served: Arc<HttpState>,
    refresh_errors: RefreshErrors,
    /// For the closing line.
    last_clone_stats: CloneStats,
}

impl Daemon {
    /// Starts the outputs made ready by [`Setup`].
    fn new(
        args: &RunArgs,
        lines: Destination,
        otlp: Option<OtlpSetup>,
        node: &str,
        metrics: Arc<Metrics>,
        served: Arc<HttpState>,
    ) -> anyhow::Result<Self> {
        let otlp = match otlp {
            Some(setup) => Some(OtlpExporter::start(setup, node, metrics.otlp_counters()?)),
            None => None,
        };
        let counters = metrics.event_line_counters()?;
        let budget = BudgetConfig {
            per_workload: args.events_per_workload,
            interval: args.events_interval,
            per_second: args.events_per_second,
        };
        Ok(Daemon {
            outputs: Outputs {
                kinds: args.events.clone(),
                lines: EventLines::start(lines, counters.dropped)?,
                suppressed: counters.suppressed,
                budget: Budget::new(budget, Instant::now()),
                metrics,
                otlp,
                kube_events: None,
            },
            served,
            refresh_errors: RefreshErrors::default(),
            last_clone_stats: CloneStats::default(),
        })
    }

    /// The history `/explain` reads.
    fn record(&self, f: impl FnOnce(&mut Recorder)) {
        if let Ok(mut r) = self.served.recorder.lock() {
            f(&mut r);
        }
    }
}

impl Sink for Daemon {
    fn event(&mut self, event: &Event) -> anyhow::Result<()> {
        self.record(|r| r.event(event));
        self.outputs.event(event);
        Ok(())
    }

    fn refresh(&mut self, refresh: &Refresh) -> anyhow::Result<()> {
        self.outputs.budget_due(refresh);
        let metrics = &self.outputs.metrics;
        let mut task_stats = TaskStats::default();
        for part in &refresh.parts {
            match part {
                // With the task rows below.
                Part::Clone(_) => {}
                Part::Tasks(t) => {
                    task_stats = t.stats;
                    metrics.nproc_unread(t.processes_unread);
                }
                Part::Dns(dns) => {
                    metrics.events_lost("dns", dns.stats.lost);
                    metrics.dns_untracked(&dns.stats);
                    let tcp = dns
                        .tcp
                        .iter()
                        .map(|t| {
                            let counts = probe_common::dns::DnsTcpCounts {
                                to_server: t.to_server,
                                from_server: t.from_server,
                            };
                            let who = crate::export::metrics::who(&t.workload, t.pod.as_deref());
                            (t.cgroup_id, counts, who)
                        })
                        .collect();
                    metrics.dns_tcp(tcp);
                }
                Part::Conntrack(ct) => {
                    if let Some(node) = &ct.node {
                        metrics.conntrack_node(node);
                    }
                    metrics.events_lost("conntrack", ct.stats.lost);
                }
            }
        }
        if let Some(lost) = refresh.cgroup_events_lost {
            metrics.events_lost("cgroups", lost);
        }
        if let Some(errors) = refresh.kube_api_errors {
            metrics.kube_api_errors(errors);
        }
        metrics.refusals_unexplained(&refresh.refusals.unexplained);
        let clone = refresh.clone_stats();
        metrics.tasks(refresh.rows(), refresh.node, clone, task_stats);
        self.record(|r| r.refresh(refresh));
        self.limits(refresh)?;
        self.last_clone_stats = clone;
        self.served.ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The limits' estimates, at each refresh and as their hot limits are sampled between.
    fn limits(&mut self, refresh: &Refresh) -> anyhow::Result<()> {
        let metrics = &self.outputs.metrics;
        metrics.limit_exhaustion(&refresh.estimates);
        metrics.binding_limits(refresh);
        if let Some(k) = &self.outputs.kube_events {
            k.estimates(&refresh.estimates);
        }
        self.record(|r| r.limits(&refresh.estimates));
        Ok(())
    }

    fn refresh_failed(&mut self, e: anyhow::Error) -> anyhow::Result<()> {
        self.refresh_errors.report(&self.outputs.metrics, &e);
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Where each event goes: metrics always; the event lines and OTLP for the kinds asked for,
/// within the event budget. None of them can block.
struct Outputs {
    kinds: Vec<EventKind>,
    metrics: Arc<Metrics>,
    lines: EventLines,
    otlp: Option<OtlpExporter>,
    /// Kubernetes Events (`--kube-events`): of every event, whatever `--events` says.
    kube_events: Option<KubeEvents>,
    budget: Budget,
    /// `faultline_event_lines_suppressed_total{kind}`.
    suppressed: prometheus::IntCounterVec,
}

impl Outputs {
    fn event(&mut self, event: &Event) {
        self.metrics.event(event);
        if let Some(k) = &self.kube_events {
            k.event(event);
        }
        let Some(kind) = event.kind().filter(|k| self.kinds.contains(k)) else {
            return;
        };
        if !self.lines.active() && self.otlp.is_none() {
            return;
        }
        match self.budget.admit(event, Instant::now()) {
            Verdict::Full => {
                if let Some(otlp) = &self.otlp {
                    otlp.event(event);
                }
                self.lines.send(event);
            }
            Verdict::Suppressed => self.suppressed.with_label_values(&[kind.as_str()]).inc(),
        }
    }

    /// The summaries of an interval that ended, with the events the kernel lost meanwhile.
    fn budget_due(&mut self, refresh: &Refresh) {
        for (kind, total) in refresh.lost() {
            if self.kinds.contains(&kind) {
                self.budget.lost(kind, total);
            }
        }
        let due = self.budget.due(Instant::now());
        self.write(&due);
    }

    /// At a stop: what the budget still holds, then the lines' queue.
    /// Writes the budget's last lines; returns the OTLP exporter to be shut down.
    fn finish(mut self) -> Option<OtlpExporter> {
        let rest = self.budget.finish();
        self.write(&rest);
        self.lines.finish();
        self.otlp
    }

    fn write(&self, lines: &[BudgetLine]) {
        for line in lines {
            if let Some(otlp) = &self.otlp {
                otlp.budget_line(line);
            }
            self.lines.send(line);
        }
    }
}

/// The Events' recorder when asked for and the API is there; said once when it is not.
async fn kube_events(
    args: &RunArgs,
    node: &str,
    metrics: &Metrics,
) -> anyhow::Result<Option<KubeEvents>> {
    if !args.kube_events {
        return Ok(None);
    }
    if args.pods.no_kube_api {
        tracing::warn!("Kubernetes Events are off: --no-kube-api");
        return Ok(None);
    }
    let counter = metrics.kube_events_counter()?;
    Ok(KubeEvents::start(args.pods.kubeconfig.as_ref(), node, counter).await)
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
            tracing::warn!("refresh failed (will retry): {text}");
            self.last = Some((text, Instant::now()));
        }
    }
}
