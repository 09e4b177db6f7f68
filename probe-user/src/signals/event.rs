//! The one event type every sink receives: each signal's report, tagged by its `kind` (the
//! event lines' JSON schema: `{"kind":"clone_failure",...}`). A new signal adds a variant
//! here, and the compiler lists every exporter, filter and printer that must handle it.

use serde::Serialize;

use super::{
    clone::CloneFailure,
    conntrack::{ClashesResolved, ConntrackDrop},
    dns::DnsQuery,
    tasks::HeadroomWarning,
};
use crate::cli::EventKind;

/// The version of the event lines' schema: every line (`trace --output json`, the daemon's
/// event lines) carries it after its own fields.
pub const LINES_VERSION: u32 = 1;

/// A line of the event lines' schema: the value's fields, then `version`.
#[derive(Serialize)]
pub struct Line<'a, T: Serialize> {
    #[serde(flatten)]
    pub value: &'a T,
    pub version: u32,
}

impl<'a, T: Serialize> Line<'a, T> {
    pub fn of(value: &'a T) -> Self {
        Line {
            value,
            version: LINES_VERSION,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    CloneFailure(CloneFailure),
    #[serde(rename = "dns")]
    DnsQuery(DnsQuery),
    ConntrackDrop(ConntrackDrop),
    #[serde(rename = "conntrack_clash_resolved")]
    ClashesResolved(ClashesResolved),
    HeadroomWarning(HeadroomWarning),
}

impl Event {
    /// Its `kind` tag, as the event lines name it.
    pub fn name(&self) -> &'static str {
        match self {
            Event::CloneFailure(_) => "clone_failure",
            Event::DnsQuery(_) => "dns",
            Event::ConntrackDrop(_) => "conntrack_drop",
            Event::ClashesResolved(_) => "conntrack_clash_resolved",
            Event::HeadroomWarning(_) => "headroom_warning",
        }
    }

    /// The `--events` choice it belongs to; none for a headroom warning (asked for with
    /// `--headroom-warn`, never exported).
    pub fn kind(&self) -> Option<EventKind> {
        match self {
            Event::CloneFailure(_) => Some(EventKind::Clone),
            Event::DnsQuery(_) => Some(EventKind::Dns),
            Event::ConntrackDrop(_) | Event::ClashesResolved(_) => Some(EventKind::Conntrack),
            Event::HeadroomWarning(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kind_tag_comes_first_as_before() {
        let line = serde_json::to_string(&Event::DnsQuery(DnsQuery::default())).expect("test");
        assert!(line.starts_with(r#"{"kind":"dns","time":"#), "{line}");
        let event = Event::DnsQuery(DnsQuery::default());
        let line = serde_json::to_string(&Line::of(&event)).expect("test");
        assert!(line.starts_with(r#"{"kind":"dns","time":"#), "{line}");
        assert!(line.ends_with(r#","version":1}"#), "{line}");
        assert!(
            line.contains(&format!(r#""kind":"{}""#, event.name())),
            "{line}"
        );
    }
}
