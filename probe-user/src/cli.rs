//! Argument parsers the commands share.

use std::time::Duration;

use anyhow::{Context as _, bail};

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
