//! What the commands' arguments share: the output formats, the event kinds, and parsers.

use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::ValueEnum;

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

/// A period between two samples (`1s`, `250ms`): more than zero.
pub fn parse_interval(s: &str) -> anyhow::Result<Duration> {
    let d = humantime::parse_duration(s).with_context(|| format!("{s:?} is not a duration"))?;
    if d.is_zero() {
        bail!("{s:?}: the interval must be longer than zero");
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages() {
        assert_eq!(parse_percent("10%").expect("test"), 10.0);
        assert_eq!(parse_percent("2.5").expect("test"), 2.5);
        assert!(parse_percent("150%").is_err());
        assert!(parse_percent("ten").is_err());
    }

    #[test]
    fn intervals_are_positive() {
        assert_eq!(
            parse_interval("250ms").expect("test"),
            Duration::from_millis(250)
        );
        assert!(parse_interval("0s").is_err());
        assert!(parse_interval("0").is_err());
        assert!(parse_interval("soon").is_err());
    }
}
