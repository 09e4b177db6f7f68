//! What the commands' arguments share: the output formats, the event kinds, parsers, and the
//! error that says the user typed something wrong ([`UsageError`], exit status 2).

use std::{fmt, net::SocketAddr, time::Duration};

use anyhow::{Context as _, bail};
use clap::ValueEnum;

/// Something the user typed (a flag, an environment variable, a path it names) cannot be used:
/// `main` exits 2 for it, as for the usage errors clap finds.
#[derive(Debug)]
pub struct UsageError(anyhow::Error);

impl UsageError {
    /// `e` as a usage error, for `?`.
    pub fn wrap(e: anyhow::Error) -> anyhow::Error {
        anyhow::Error::new(UsageError(e))
    }

    /// Whether `e` is, or was caused by, a usage error.
    pub fn is_cause_of(e: &anyhow::Error) -> bool {
        e.chain().any(|cause| cause.is::<UsageError>())
    }
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The whole chain: its text is the one line the user gets.
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for UsageError {}

/// How a command prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns, for people.
    Table,
    /// One JSON object per line, for programs.
    Json,
}

/// The kinds of events a command prints or exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
pub enum EventKind {
    /// Failed task creation.
    Clone,
    /// DNS queries over UDP port 53.
    Dns,
    /// Packets dropped by netfilter (with their conntrack cause) and resolved clashes.
    Conntrack,
}

impl EventKind {
    /// As `--events` names it.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Clone => "clone",
            EventKind::Dns => "dns",
            EventKind::Conntrack => "conntrack",
        }
    }
}

/// `10%` or `10` -> 10.0, within 0..=100.
pub fn parse_percent(s: &str) -> anyhow::Result<f64> {
    let v: f64 = s
        .trim_end_matches('%')
        .parse()
        .with_context(|| format!("{s:?} is not a percentage"))?;
    if !(0.0..=100.0).contains(&v) {
        bail!("{s:?} is not between 0% and 100%");
    }
    Ok(v)
}

/// A positive duration, or a message naming what it is for (`what`: "window", "period"...).
fn positive(s: &str, what: &str) -> anyhow::Result<Duration> {
    let d = humantime::parse_duration(s)
        .map_err(|_| anyhow::anyhow!("{s:?} is not a duration (e.g. 30s, 5m, 1h)"))?;
    if d.is_zero() {
        bail!("the {what} must be longer than zero");
    }
    Ok(d)
}

/// A period between two samples or refreshes (`1s`, `250ms`): more than zero.
pub fn parse_period(s: &str) -> anyhow::Result<Duration> {
    positive(s, "period")
}

/// A window of the past a measure or report covers (`15m`): more than zero.
pub fn parse_window(s: &str) -> anyhow::Result<Duration> {
    positive(s, "window")
}

/// How long to wait for something before giving up on it (`2s`): more than zero.
pub fn parse_timeout(s: &str) -> anyhow::Result<Duration> {
    positive(s, "timeout")
}

/// How long a command runs (`30s`): more than zero.
pub fn parse_run_time(s: &str) -> anyhow::Result<Duration> {
    positive(s, "duration")
}

/// A time ahead within which something is warned of (`10m`): more than zero.
pub fn parse_horizon(s: &str) -> anyhow::Result<Duration> {
    positive(s, "horizon")
}

/// `--listen`: `:PORT` (every IPv4 address, 0.0.0.0:PORT, as the Prometheus exporters take
/// it), `HOST:PORT` with an IP address, or `[v6]:PORT`.
pub fn parse_listen(s: &str) -> anyhow::Result<SocketAddr> {
    let full = match s.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => s.to_owned(),
    };
    full.parse().map_err(|_| {
        anyhow::anyhow!(
            "{s:?} is not an address to listen on (e.g. :9847, 127.0.0.1:9847, [::1]:9847)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_are_found_under_context() {
        let e = UsageError::wrap(anyhow::anyhow!("inner").context("outer"));
        assert_eq!(format!("{e:#}"), "outer: inner");
        assert!(UsageError::is_cause_of(&e.context("more")));
        assert!(!UsageError::is_cause_of(&anyhow::anyhow!("runtime")));
    }

    #[test]
    fn percentages() {
        assert_eq!(parse_percent("10%").expect("test"), 10.0);
        assert_eq!(parse_percent("2.5").expect("test"), 2.5);
        assert!(parse_percent("150%").is_err());
        assert!(parse_percent("ten").is_err());
    }

    #[test]
    fn durations_are_positive_and_said_in_words() {
        assert_eq!(
            parse_period("250ms").expect("test"),
            Duration::from_millis(250)
        );
        let e = |r: anyhow::Result<Duration>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(e(parse_window("0s")), "the window must be longer than zero");
        assert_eq!(e(parse_period("0")), "the period must be longer than zero");
        assert_eq!(
            e(parse_timeout("0ms")),
            "the timeout must be longer than zero"
        );
        assert_eq!(
            e(parse_run_time("x")),
            "\"x\" is not a duration (e.g. 30s, 5m, 1h)"
        );
        assert!(parse_horizon("soon").is_err());
    }

    #[test]
    fn listen_addresses_as_exporters_take_them() {
        let ok = |s: &str| parse_listen(s).expect("test").to_string();
        assert_eq!(ok(":9847"), "0.0.0.0:9847");
        assert_eq!(ok("127.0.0.1:9847"), "127.0.0.1:9847");
        assert_eq!(ok("[::1]:9847"), "[::1]:9847");
        for bad in [":", ":x", "9847", "localhost:9847", "[::1]", ":70000"] {
            let e = parse_listen(bad).expect_err(bad).to_string();
            assert!(e.contains("is not an address to listen on"), "{bad}: {e}");
        }
    }
}
