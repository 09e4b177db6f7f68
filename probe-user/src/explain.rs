//! `faultline explain`: the findings of the recent past, ranked, each with what, who, why,
//! trend and what to change. From the node's daemon (`faultline run`'s `/explain`, its last
//! hour, asked with hyper's client) when one answers; when the default address does not
//! answer, from a short observation of its own (the live tasks and limits plus a few seconds
//! of events, said in the output). A daemon named by `--daemon` that does not answer is an
//! error. A port that asks for a Kubernetes bearer token (`run --kube-rbac`) is sent the one
//! `--token-file` names, or, asking the default daemon from a pod (`kubectl exec`), the pod's
//! own service account token. Either way, the kernel's own counts of refusals before faultline watched come
//! apart, after what it saw.

use std::{
    fmt,
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::{Request, StatusCode, Uri, body::Bytes};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    attribution::pods::{PodArgs, PodFilters},
    cli::Output,
    diagnosis::{
        Recorder,
        findings::{Finding, Report, ReportSource, duration},
        history::MAX_AGE,
    },
    export::serve::EXPLAIN_DEFAULT_SINCE,
    kernel::loader::{KernelArgs, KernelLog},
    pipeline::{Pipeline, Sink},
    signals::{DnsOptions, Event, Plan, Refresh, Signal},
};

/// Largest `/explain` answer read (the daemon's history is bounded far below).
const MAX_ANSWER: usize = 16 << 20;
/// How long connecting to the daemon may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the whole exchange with the daemon may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Asked when neither `--daemon` nor `$FAULTLINE_DAEMON` names one.
const DEFAULT_DAEMON: &str = "http://127.0.0.1:9847";
/// A pod's service account token: sent to the default daemon (on this node's loopback) when
/// there, never to a daemon named elsewhere.
const POD_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// The window of the daemon's history the findings cover (at most 1h; default 15m). An
    /// observation covers --observe-for instead, so with --observe, or when no daemon
    /// answers, --since is an error.
    #[arg(long, value_parser = parse_since)]
    pub since: Option<Duration>,
    /// `table` for people, `json`: one report object (documented in the README).
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// The node's daemon, an http:// URL, with a path prefix when behind a proxy
    /// (`<URL>/explain` is asked). When given (or $FAULTLINE_DAEMON is), a daemon that does
    /// not answer is an error; by default http://127.0.0.1:9847 is asked, and when nothing
    /// answers there this node is observed for --observe-for instead.
    #[arg(long, env = "FAULTLINE_DAEMON")]
    pub daemon: Option<String>,
    /// A file holding a bearer token to send to the daemon, for a port that asks for one
    /// (`run --kube-rbac`): a token whose user may `get` /explain. Without it the default
    /// daemon is sent this pod's service account token when there is one (the DaemonSet's
    /// may get /explain), a daemon named by --daemon none.
    #[arg(long, env = "FAULTLINE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Do not ask a daemon: observe this node for --observe-for.
    #[arg(long)]
    pub observe: bool,
    /// How long the command watches when no daemon answers (or with --observe).
    #[arg(long, value_parser = crate::cli::parse_run_time, default_value = "10s")]
    pub observe_for: Duration,
    #[command(flatten)]
    pub filters: PodFilters,
    #[command(flatten)]
    pub pods: PodArgs,
    #[command(flatten)]
    pub kernel: KernelArgs,
}

/// `--since`: a window within the daemon's hour of history.
fn parse_since(s: &str) -> anyhow::Result<Duration> {
    let d = crate::cli::parse_window(s)?;
    if d > MAX_AGE {
        bail!("the daemon keeps one hour of history: the window is at most 1h");
    }
    Ok(d)
}

/// Why an explicit `--since` cannot apply to an observation.
const SINCE_OBSERVED: &str = "--since selects from the daemon's history; an observation covers --observe-for (drop --since, or set --observe-for)";

pub async fn run(args: ExplainArgs) -> anyhow::Result<()> {
    let explicit = match &args.daemon {
        Some(s) => Some(DaemonUrl::parse(s).with_context(|| format!("--daemon {s:?}"))?),
        None => None,
    };
    let mut report = if args.observe {
        if args.since.is_some() {
            bail!("with --observe, {SINCE_OBSERVED}");
        }
        observe(&args, Vec::new()).await?
    } else {
        let daemon = match &explicit {
            Some(d) => d.clone(),
            None => DaemonUrl::parse(DEFAULT_DAEMON)?,
        };
        let token = match (&args.token_file, &explicit) {
            (Some(path), _) => Some(read_token(path)?),
            (None, None) if Path::new(POD_TOKEN).exists() => {
                Some(read_token(Path::new(POD_TOKEN))?)
            }
            (None, _) => None,
        };
        match ask_daemon(
            &daemon,
            args.since.unwrap_or(EXPLAIN_DEFAULT_SINCE),
            token.as_deref(),
        )
        .await
        {
            Ok(report) => report,
            Err(Asked::Failed(e)) => return Err(e),
            Err(Asked::Unreachable(why)) if explicit.is_some() => {
                bail!("no daemon answered at {daemon} ({why})");
            }
            Err(Asked::Unreachable(why)) if args.since.is_some() => {
                bail!("no daemon answered at {daemon} ({why}), and {SINCE_OBSERVED}");
            }
            Err(Asked::Unreachable(why)) => {
                let note = format!(
                    "no daemon answered at {daemon} ({why}): observed this node for {} instead; trends over so short a window are rough",
                    humantime::format_duration(args.observe_for)
                );
                observe(&args, vec![note]).await?
            }
        }
    };
    report.findings.retain(|f| matches(&args.filters, f));
    report.past.retain(|f| matches(&args.filters, f));
    let mut out = std::io::stdout().lock();
    match args.output {
        Output::Json => out.write_all(&crate::text::json_line(&report)?)?,
        Output::Table => {
            for line in render(&report) {
                writeln!(out, "{}", crate::text::printable(&line))?;
            }
        }
    }
    out.flush().context("writing to stdout")
}

/// The pod filters (--namespace, --pod, --container) on a finding's names.
fn matches(filters: &PodFilters, f: &Finding) -> bool {
    filters.matches_names(
        f.who.namespace.as_deref(),
        f.who.pod.as_deref(),
        f.who.container.as_deref(),
    )
}

/// The bearer token in `path` (surrounding whitespace dropped).
fn read_token(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() || token.contains(char::is_whitespace) {
        bail!(
            "the token file {} holds no token (one word)",
            path.display()
        );
    }
    Ok(token.to_owned())
}

/// Where the daemon is: an http:// URL, its path (a proxy's prefix) kept.
#[derive(Clone, Debug)]
struct DaemonUrl {
    /// `host:port`, as given.
    authority: String,
    /// The path before `/explain`, without a trailing `/` (empty at the root).
    prefix: String,
}

impl DaemonUrl {
    fn parse(s: &str) -> anyhow::Result<Self> {
        if s.starts_with("https://") {
            bail!(
                "https is not supported: the daemon serves plain http:// (on the node, or through a proxy that speaks http)"
            );
        }
        let uri: Uri = s
            .parse()
            .map_err(|_| anyhow::anyhow!("not a URL (e.g. http://127.0.0.1:9847)"))?;
        if uri.scheme_str() != Some("http") {
            bail!("not an http:// URL (e.g. http://127.0.0.1:9847)");
        }
        let Some(authority) = uri.authority().filter(|a| !a.host().is_empty()) else {
            bail!("the URL names no host (e.g. http://127.0.0.1:9847)");
        };
        // After an IPv6 literal's `]`, a `:` starts the port.
        let tail = authority.as_str().rsplit(']').next().unwrap_or("");
        if tail
            .rsplit_once(':')
            .is_some_and(|(_, port)| port.parse::<u16>().is_err())
        {
            bail!("the port is not a number from 0 to 65535");
        }
        if uri.query().is_some() {
            bail!("the URL has a query: give the daemon's address (and path prefix) only");
        }
        Ok(DaemonUrl {
            authority: authority.as_str().to_owned(),
            prefix: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// `<prefix>/explain?since=<seconds>s`.
    fn explain(&self, since: Duration) -> anyhow::Result<Uri> {
        let uri = format!(
            "http://{}{}/explain?since={}s",
            self.authority,
            self.prefix,
            since.as_secs().max(1)
        );
        uri.parse().with_context(|| format!("{uri:?} is not a URL"))
    }
}

impl fmt::Display for DaemonUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority, self.prefix)
    }
}

/// What asking the daemon gave, when it gave no report.
enum Asked {
    /// Nothing answered there (refused, connecting timed out, the name does not resolve).
    Unreachable(String),
    /// Something answered, with an error or with what is not a report.
    Failed(anyhow::Error),
}

/// `GET <daemon>/explain?since=...`, bounded in time and size.
async fn ask_daemon(
    daemon: &DaemonUrl,
    since: Duration,
    token: Option<&str>,
) -> Result<Report, Asked> {
    let uri = daemon.explain(since).map_err(Asked::Failed)?;
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let mut request = Request::get(uri);
    if let Some(token) = token {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(Empty::new())
        .map_err(|e| Asked::Failed(anyhow::anyhow!("building the request: {e}")))?;
    let exchange = async {
        let response = client.request(request).await.map_err(|e| {
            if e.is_connect() {
                Asked::Unreachable(innermost(&e))
            } else {
                Asked::Failed(anyhow::anyhow!(
                    "asking the daemon at {daemon}: {}",
                    innermost(&e)
                ))
            }
        })?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| {
                Asked::Failed(anyhow::anyhow!(
                    "reading the answer of the daemon at {daemon}: {e} (at most {} MiB)",
                    MAX_ANSWER >> 20
                ))
            })?
            .to_bytes();
        read_report(status, &body)
            .with_context(|| format!("the daemon at {daemon}"))
            .map_err(Asked::Failed)
    };
    match tokio::time::timeout(ANSWER_TIMEOUT, exchange).await {
        Ok(answer) => answer,
        Err(_) => Err(Asked::Failed(anyhow::anyhow!(
            "the daemon at {daemon} did not answer within {}",
            humantime::format_duration(ANSWER_TIMEOUT)
        ))),
    }
}

/// The innermost cause of an error, in words: `connection refused`, `timed out`...
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    match cause
        .downcast_ref::<std::io::Error>()
        .map(std::io::Error::kind)
    {
        Some(std::io::ErrorKind::ConnectionRefused) => "connection refused".to_owned(),
        Some(std::io::ErrorKind::TimedOut) => "timed out".to_owned(),
        _ => cause.to_string(),
    }
}

/// A report from a 200 answer; any other status is an error with the body's first line.
fn read_report(status: StatusCode, body: &[u8]) -> anyhow::Result<Report> {
    if status != StatusCode::OK {
        let text = String::from_utf8_lossy(body);
        let first = text.lines().next().unwrap_or("").trim();
        let hint = match status {
            StatusCode::UNAUTHORIZED => " (--token-file names a bearer token to send)",
            _ => "",
        };
        bail!(
            "answered {status}: {}{hint}",
            crate::text::printable(first.get(..200).unwrap_or(first))
        );
    }
    serde_json::from_slice(body)
        .map_err(|e| anyhow::anyhow!("answered with what is not a report ({e})"))
}

/// Watches the node for `--observe-for`: the live tasks and limits at each second, and every
/// event of the probes this kernel supports.
async fn observe(args: &ExplainArgs, notes: Vec<String>) -> anyhow::Result<Report> {
    let node = args
        .pods
        .node_name
        .clone()
        .unwrap_or_else(crate::attribution::pods::hostname);
    let plan = Plan {
        signals: Signal::ALL.to_vec(),
        dns: DnsOptions::default(),
        trend: Some(args.observe_for),
        headroom: None,
        idle_cgroups: false,
        drop_privileges: false,
    };
    let mut skipped = Vec::new();
    let mut pipeline = Pipeline::open(&args.kernel, KernelLog::Off, &args.pods, &plan, |s, r| {
        if let Err(e) = r {
            skipped.push(format!(
                "{} not observed: {}",
                s.as_str(),
                crate::kernel::loader::brief(&e)
            ));
        }
        Ok(())
    })
    .await?;
    tracing::info!(
        "observing this node for {}",
        humantime::format_duration(args.observe_for)
    );
    let mut sink = Observer {
        recorder: Recorder::new(&node),
    };
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let deadline = Instant::now() + args.observe_for;
    let stop = async move {
        tokio::select! {
            _ = sigint.recv() => {}
            () = tokio::time::sleep_until(deadline.into()) => {}
        }
    };
    pipeline
        .run(&mut sink, Duration::from_secs(1), stop)
        .await?;
    // The counters as the observation ends: what the kernel counted while watched.
    pipeline.refresh_once(&mut sink)?;
    let mut report = sink
        .recorder
        .report(args.observe_for, ReportSource::Observation);
    let mut all = notes;
    all.extend(skipped);
    all.append(&mut report.notes);
    report.notes = all;
    Ok(report)
}

/// Feeds a recorder, as the daemon does.
struct Observer {
    recorder: Recorder,
}

impl Sink for Observer {
    fn event(&mut self, event: &Event) -> anyhow::Result<()> {
        self.recorder.event(event);
        Ok(())
    }

    fn refresh(&mut self, refresh: &Refresh) -> anyhow::Result<()> {
        self.recorder.refresh(refresh);
        Ok(())
    }

    fn limits(&mut self, refresh: &Refresh) -> anyhow::Result<()> {
        self.recorder.limits(&refresh.estimates);
        Ok(())
    }

    /// A short observation goes on without one refresh's counts.
    fn refresh_failed(&mut self, e: anyhow::Error) -> anyhow::Result<()> {
        tracing::debug!("refresh failed: {e:#}");
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// The report for people: a header, then each finding as a block.
pub fn render(r: &Report) -> Vec<String> {
    let source = match r.source {
        ReportSource::Daemon => "the daemon's history",
        ReportSource::Observation => "its own observation",
    };
    let mut lines = vec![format!(
        "faultline explain: node {}, {} of the last {} ({} finding{}{})",
        r.node,
        source,
        duration(r.window_s),
        r.findings.len(),
        if r.findings.len() == 1 { "" } else { "s" },
        if r.past.is_empty() {
            String::new()
        } else {
            format!(", {} from before it watched", r.past.len())
        }
    )];
    lines.extend(r.notes.iter().map(|n| format!("note: {n}")));
    if r.not_kept > 0 {
        lines.push(format!(
            "note: {} events were not kept (the history was full): counts may be low",
            r.not_kept
        ));
    }
    if r.findings.is_empty() {
        lines.push(String::new());
        lines.push("No finding while watched: no failed task creation, DNS timeout, conntrack drop or near-miss, and no limit near exhaustion.".to_owned());
    }
    for (i, f) in r.findings.iter().enumerate() {
        block(&mut lines, i + 1, f);
    }
    if !r.past.is_empty() {
        lines.push(String::new());
        lines.push(
            "Before faultline watched (the kernel's own counts, since each cgroup or network namespace was made):"
                .to_owned(),
        );
    }
    for (i, f) in r.past.iter().enumerate() {
        block(&mut lines, r.findings.len() + i + 1, f);
    }
    lines
}

/// One finding as a block of lines.
fn block(lines: &mut Vec<String>, n: usize, f: &Finding) {
    lines.push(String::new());
    lines.push(format!(
        "{n}. {} {}: {}",
        format!("{:?}", f.severity).to_uppercase(),
        f.kind,
        f.what
    ));
    let mut who = f.who.workload.clone();
    if let Some(c) = &f.who.cgroup
        && c != &who
    {
        who.push_str(&format!(" (cgroup {c})"));
    }
    if !f.who.processes.is_empty() {
        who.push_str(&format!(", processes: {}", f.who.processes.join(", ")));
    }
    lines.push(format!("   who     {who}"));
    lines.push(format!("   why     {}", f.why));
    let trend = trend_text(f);
    if !trend.is_empty() {
        lines.push(format!("   trend   {trend}"));
    }
    for (j, a) in f.advice.iter().enumerate() {
        lines.push(format!(
            "   {}  - {a}",
            if j == 0 { "change" } else { "      " }
        ));
    }
}

fn trend_text(f: &Finding) -> String {
    let t = &f.trend;
    let mut parts = Vec::new();
    if t.events > 0 {
        let clock = |s: &Option<String>| {
            s.as_deref()
                .and_then(|s| s.get(11..19))
                .unwrap_or("?")
                .to_owned()
        };
        parts.push(format!(
            "{} events ({:.1}/min), first {}, last {}",
            t.events,
            t.per_minute,
            clock(&t.first),
            clock(&t.last)
        ));
    }
    if let (Some(c), Some(m)) = (t.current, t.limit) {
        parts.push(format!("{c} of {m} in use"));
    }
    match (t.growth_per_s, t.eta_s) {
        (_, Some(0.0)) => parts.push("limit reached".to_owned()),
        (Some(g), Some(eta)) => parts.push(format!("growing {g:.2}/s: limit in {}", duration(eta))),
        (Some(g), None) if t.current.is_some() => parts.push(format!("not growing ({g:+.2}/s)")),
        _ => {}
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_error_is_said_in_one_line() {
        let e = read_report(StatusCode::BAD_REQUEST, b"since=x: bad\nmore\n").unwrap_err();
        assert_eq!(format!("{e:#}"), "answered 400 Bad Request: since=x: bad");
        let e = read_report(StatusCode::OK, b"<html>").unwrap_err();
        assert!(format!("{e:#}").contains("not a report"), "{e:#}");
    }

    #[test]
    fn daemon_urls_keep_their_path_prefix() {
        let url = |s: &str| DaemonUrl::parse(s).expect(s);
        let ask = |s: &str| {
            url(s)
                .explain(Duration::from_secs(300))
                .expect(s)
                .to_string()
        };
        assert_eq!(
            ask("http://127.0.0.1:9847"),
            "http://127.0.0.1:9847/explain?since=300s"
        );
        assert_eq!(
            ask("http://host:9847/faultline/"),
            "http://host:9847/faultline/explain?since=300s"
        );
        assert_eq!(
            url("http://[::1]:9847/a/b").to_string(),
            "http://[::1]:9847/a/b"
        );
        for bad in [
            "127.0.0.1:9847",
            "ftp://host/",
            "http://",
            "http://h:x/",
            "http://h/?a=b",
        ] {
            assert!(DaemonUrl::parse(bad).is_err(), "{bad}");
        }
        let https = DaemonUrl::parse("https://host/").unwrap_err().to_string();
        assert!(https.contains("https is not supported"), "{https}");
    }

    #[test]
    fn since_is_within_the_daemons_hour() {
        assert_eq!(parse_since("1h").expect("test"), MAX_AGE);
        assert!(parse_since("61m").is_err());
        assert!(parse_since("0s").is_err());
    }
}
