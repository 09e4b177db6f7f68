//! `faultline explain`: the findings of the recent past, ranked, each with what, who, why,
//! trend and what to change. From the node's daemon (`faultline run`'s `/explain`, its last
//! hour) when one answers, otherwise from a short observation of its own: the live tasks and
//! limits plus a few seconds of events, said in the output.

use std::{
    io::{Read as _, Write as _},
    net::{TcpStream, ToSocketAddrs as _},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    attribution::pods::PodArgs,
    cli::Output,
    diagnosis::{
        Recorder,
        findings::{Finding, Report, duration},
    },
    kernel::loader::{KernelArgs, KernelLog},
    pipeline::{Pipeline, Sink},
    signals::{DnsOptions, Event, Plan, Refresh, Signal},
};

/// Largest `/explain` answer read (the daemon's history is bounded far below).
const MAX_ANSWER: u64 = 16 << 20;

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// The window the findings cover (the daemon keeps one hour).
    #[arg(long, value_parser = crate::cli::parse_interval, default_value = "15m")]
    pub since: Duration,
    /// `table` for people, `json`: one report object (documented in the README).
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// The node's daemon, asked first.
    #[arg(
        long,
        env = "FAULTLINE_DAEMON",
        default_value = "http://127.0.0.1:9847"
    )]
    pub daemon: String,
    /// Do not ask a daemon: observe this node for --observe-for.
    #[arg(long)]
    pub observe: bool,
    /// How long the command watches when no daemon answers (or with --observe).
    #[arg(long, value_parser = crate::cli::parse_interval, default_value = "10s")]
    pub observe_for: Duration,
    #[command(flatten)]
    pub pods: PodArgs,
    #[command(flatten)]
    pub kernel: KernelArgs,
}

pub async fn run(args: ExplainArgs) -> anyhow::Result<()> {
    let mut report = if args.observe {
        observe(&args, Vec::new()).await?
    } else {
        match ask_daemon(&args.daemon, args.since)? {
            DaemonAnswer::Report(r) => r,
            DaemonAnswer::Unreachable(why) => {
                let note = format!(
                    "no daemon answered at {} ({why}): observed this node for {} instead; trends over so short a window are rough",
                    args.daemon,
                    humantime::format_duration(args.observe_for)
                );
                observe(&args, vec![note]).await?
            }
        }
    };
    report.findings.retain(|f| matches(&args.pods, f));
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
fn matches(pods: &PodArgs, f: &Finding) -> bool {
    let is = |plan: &Option<String>, have: &Option<String>, prefix: bool| match plan {
        None => true,
        Some(w) => have.as_deref().is_some_and(|h| {
            if prefix {
                h.starts_with(w.as_str())
            } else {
                h == w
            }
        }),
    };
    is(&pods.namespace, &f.who.namespace, false)
        && is(&pods.pod, &f.who.pod, true)
        && is(&pods.container, &f.who.container, false)
}

/// What asking the daemon gave.
enum DaemonAnswer {
    Report(Report),
    /// Nobody listens there (or the name does not resolve): the command observes for itself.
    Unreachable(String),
}

/// `GET <daemon>/explain?since=...`. A daemon that answers with an error, or with something
/// that is not a report, is an error; one that is not there is [`DaemonAnswer::Unreachable`].
fn ask_daemon(daemon: &str, since: Duration) -> anyhow::Result<DaemonAnswer> {
    let Some(authority) = daemon.strip_prefix("http://") else {
        bail!("--daemon {daemon:?}: not an http:// address");
    };
    let authority = authority.trim_end_matches('/');
    let addr = match authority.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(addr)) => addr,
        Ok(None) => {
            return Ok(DaemonAnswer::Unreachable(format!(
                "{authority} has no address"
            )));
        }
        Err(e) => {
            return Ok(DaemonAnswer::Unreachable(format!(
                "resolving {authority}: {e}"
            )));
        }
    };
    let mut stream = match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) => return Ok(DaemonAnswer::Unreachable(e.to_string())),
    };
    let answer = (|| -> anyhow::Result<Vec<u8>> {
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        let request = format!(
            "GET /explain?since={}s HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n",
            since.as_secs().max(1)
        );
        stream.write_all(request.as_bytes())?;
        let mut buf = Vec::new();
        stream.take(MAX_ANSWER).read_to_end(&mut buf)?;
        Ok(buf)
    })()
    .with_context(|| format!("asking the daemon at {daemon}"))?;
    parse_answer(&answer)
        .with_context(|| format!("the daemon at {daemon}"))
        .map(DaemonAnswer::Report)
}

fn parse_answer(answer: &[u8]) -> anyhow::Result<Report> {
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("the daemon's answer has no header end")?;
    let head = String::from_utf8_lossy(&answer[..split]);
    let body = &answer[split + 4..];
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    if status != "200" {
        bail!(
            "the daemon answered {status}: {}",
            String::from_utf8_lossy(body).trim()
        );
    }
    serde_json::from_slice(body).context("the daemon's /explain answer is not a report")
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
    let mut report = sink.recorder.report(args.observe_for, "observation");
    report.notes = notes;
    report.notes.extend(skipped);
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
    let source = match r.source.as_str() {
        "daemon" => "the daemon's history",
        _ => "its own observation",
    };
    let mut lines = vec![format!(
        "faultline explain: node {}, {} of the last {} ({} finding{})",
        r.node,
        source,
        duration(r.window_s),
        r.findings.len(),
        if r.findings.len() == 1 { "" } else { "s" }
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
        lines.push("No finding: no failed task creation, DNS timeout, conntrack drop or near-miss, and no limit near exhaustion.".to_owned());
    }
    for (i, f) in r.findings.iter().enumerate() {
        lines.push(String::new());
        lines.push(format!(
            "{}. {} {}: {}",
            i + 1,
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
        lines.push(format!("   trend   {}", trend_text(f)));
        for (j, a) in f.advice.iter().enumerate() {
            lines.push(format!(
                "   {}  - {a}",
                if j == 0 { "change" } else { "      " }
            ));
        }
    }
    lines
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
    fn a_daemon_error_is_said() {
        let e = parse_answer(b"HTTP/1.1 400 Bad Request\r\n\r\nsince=x: bad\n").unwrap_err();
        assert!(format!("{e:#}").contains("400"), "{e:#}");
        assert!(parse_answer(b"garbage").is_err());
    }
}
