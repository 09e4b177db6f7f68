//! From the recent past and the limits' trends to findings: what is wrong, whose it is, why
//! (the kernel's evidence), how fast it goes, and what to change, ranked for the person on
//! call. The JSON of [`Report`] is a stable interface (`faultline explain --output json`,
//! the daemon's `/explain`); fields are only ever added.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    clock::rfc3339,
    diagnosis::{
        history::{Bucket, CloneTally, DnsTally, TopNames, Who},
        past::{Entry, Past, Resource},
    },
    signals::clone::cause::Cause as CloneCause,
    signals::conntrack::{Cause as DropCause, netns_phrase},
    signals::refusals::Counter,
    trend::{Estimate, Limit},
};

/// The report's schema version.
pub const VERSION: u32 = 1;
/// A limit reached within this, at its trend, is a finding.
pub const ETA_HORIZON: Duration = Duration::from_secs(3600);
/// Under this much headroom (share of the limit) a limit is a finding even without a trend.
const LOW_HEADROOM: f64 = 0.10;
/// A share of search-path misses among a workload's queries worth a finding, and the fewest.
const AMPLIFICATION_SHARE: f64 = 0.3;
const AMPLIFICATION_MIN: u64 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Failing now: tasks refused, packets dropped, queries unanswered.
    Critical,
    /// Will fail: a limit reached within the hour, near-misses.
    Warning,
    /// Costs, not failures: search-path amplification.
    Info,
}

/// How fast it goes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Trend {
    /// Events in the window (failures, drops, timeouts, ...).
    pub events: u64,
    pub per_minute: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<String>,
    /// The limit: `pids`, `pid_max`, `threads_max`, `conntrack`; and which one: the pids
    /// cgroup's path, `node`, or `netns:<inode>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_kind: Option<Limit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// The limit's use now, and the limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub growth_per_s: Option<f64>,
    /// Seconds until the limit at that growth (0: reached).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub severity: Severity,
    pub kind: FindingKind,
    /// The symptom, one line.
    pub what: String,
    pub who: Who,
    /// The cause, with the kernel's numbers.
    pub why: String,
    pub trend: Trend,
    /// What to change, most direct first.
    pub advice: Vec<String>,
    /// A finding of the past (in [`Report::past`]): the kernel's own counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelCount>,
}

/// The kernel's own counts behind a finding of the past.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelCount {
    /// The counts when faultline started watching, by counter (`pids_max`, `memory_oom_kill`,
    /// `conntrack_insert_failed`, ...): since the cgroup or network namespace was made.
    pub counts: BTreeMap<Counter, u64>,
    /// Where the finding's counter was read: a cgroup file (`pids.events`, `memory.events.local`,
    /// `memory.failcnt`, ...) or `ctnetlink`.
    pub source: String,
    /// The cgroup's age when faultline started, from its directory (none: not known, as for
    /// a network namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_s: Option<f64>,
    /// How much the finding's counter rose while faultline watched (none: the cgroup or
    /// namespace is gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub while_watched: Option<u64>,
}

/// Whose history a report reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportSource {
    /// The history of `faultline run` on the node.
    Daemon,
    /// `explain` watched for the report's window itself.
    Observation,
}

/// What a finding is about: its `kind` in the JSON report and the text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    // Task creation refused, by cause, and limits near.
    PidsLimit,
    PidsLimitNear,
    PidMax,
    ThreadsMax,
    RlimitNproc,
    RlimitNprocNear,
    Memory,
    PidnsDead,
    CloneUnknown,
    // DNS.
    DnsTimeouts,
    DnsSearchAmplification,
    // Conntrack.
    ConntrackInsertFailed,
    ConntrackTableFull,
    ConntrackRuleDrops,
    ConntrackDropsUnclassified,
    ConntrackTableNear,
    ConntrackNearMisses,
    // Refusals before faultline watched, from the kernel's own counts ([`Report::past`]).
    PidsLimitPast,
    OomKillPast,
    MemoryLimitPast,
    ConntrackInsertFailedPast,
    ConntrackTableFullPast,
    /// A kind this build does not know (a report from a newer daemon).
    #[serde(other)]
    Unknown,
}

impl FindingKind {
    /// As the report's JSON says it.
    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::PidsLimit => "pids_limit",
            FindingKind::PidsLimitNear => "pids_limit_near",
            FindingKind::PidMax => "pid_max",
            FindingKind::ThreadsMax => "threads_max",
            FindingKind::RlimitNproc => "rlimit_nproc",
            FindingKind::RlimitNprocNear => "rlimit_nproc_near",
            FindingKind::Memory => "memory",
            FindingKind::PidnsDead => "pidns_dead",
            FindingKind::CloneUnknown => "clone_unknown",
            FindingKind::DnsTimeouts => "dns_timeouts",
            FindingKind::DnsSearchAmplification => "dns_search_amplification",
            FindingKind::ConntrackInsertFailed => "conntrack_insert_failed",
            FindingKind::ConntrackTableFull => "conntrack_table_full",
            FindingKind::ConntrackRuleDrops => "conntrack_rule_drops",
            FindingKind::ConntrackDropsUnclassified => "conntrack_drops_unclassified",
            FindingKind::ConntrackTableNear => "conntrack_table_near",
            FindingKind::ConntrackNearMisses => "conntrack_near_misses",
            FindingKind::PidsLimitPast => "pids_limit_past",
            FindingKind::OomKillPast => "oom_kill_past",
            FindingKind::MemoryLimitPast => "memory_limit_past",
            FindingKind::ConntrackInsertFailedPast => "conntrack_insert_failed_past",
            FindingKind::ConntrackTableFullPast => "conntrack_table_full_past",
            FindingKind::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for FindingKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub kind: String,
    pub version: u32,
    pub node: String,
    pub time: String,
    /// `daemon` (the history of `faultline run` on the node) or `observation` (this command
    /// watched for `window_s` itself).
    pub source: ReportSource,
    /// The time the findings cover.
    pub window_s: f64,
    pub findings: Vec<Finding>,
    /// Events not kept in the history (it was full): findings may undercount.
    pub not_kept: u64,
    #[serde(default)]
    pub notes: Vec<String>,
    /// Refusals before faultline watched, from the kernel's own counts (the cgroups' and
    /// network namespaces' counters at the start), apart from what it saw happen.
    #[serde(default)]
    pub past: Vec<Finding>,
}

/// The node's task holders, for node-wide pressure: (workload, live tasks), most first.
pub type Holders = [(String, u64)];

/// Every finding of a window, ranked: critical first, then by how soon or how much.
pub fn findings(
    b: &Bucket,
    window: Duration,
    limits: &[Estimate],
    holders: &Holders,
) -> Vec<Finding> {
    let minutes = (window.as_secs_f64() / 60.0).max(1.0 / 60.0);
    let mut out = Vec::new();
    clone_findings(b, minutes, limits, holders, &mut out);
    // A limit already reached has its failure finding, which carries its trend.
    let reached: Vec<(Limit, String)> = out
        .iter()
        .filter_map(|f| Some((f.trend.limit_kind?, f.trend.resource.clone()?)))
        .collect();
    limit_findings(limits, holders, &reached, &mut out);
    for t in b.dns.values() {
        dns_findings(t, minutes, &mut out);
    }
    conntrack_findings(b, minutes, limits, &mut out);
    out.sort_by(|a, b| {
        a.severity
            .cmp(&b.severity)
            .then(urgency(b).total_cmp(&urgency(a)))
            .then(a.kind.as_str().cmp(b.kind.as_str()))
            .then(a.who.workload.cmp(&b.who.workload))
    });
    out
}

/// Within a severity: sooner and more first. A limit finding (no events) by its ETA, one
/// without growth as if due at the horizon.
fn urgency(f: &Finding) -> f64 {
    if f.trend.events == 0 && f.trend.current.is_some() {
        let eta = f.trend.eta_s.unwrap_or(ETA_HORIZON.as_secs_f64());
        return 1e9 / (1.0 + eta);
    }
    f.trend.events as f64
}

fn time(ns: u64) -> Option<String> {
    (ns > 0).then(|| rfc3339(std::time::UNIX_EPOCH + Duration::from_nanos(ns)))
}

fn events_trend(count: u64, first: u64, last: u64, minutes: f64) -> Trend {
    Trend {
        events: count,
        per_minute: count as f64 / minutes,
        first: time(first),
        last: time(last),
        ..Trend::default()
    }
}

fn with_limit(mut t: Trend, e: Option<&Estimate>) -> Trend {
    if let Some(e) = e {
        t.limit_kind = Some(e.limit);
        t.resource = Some(e.resource.clone());
        t.current = Some(e.current);
        t.limit = Some(e.max);
        t.growth_per_s = e.growth_per_s;
        t.eta_s = e.eta_s;
    }
    t
}

fn top(names: &TopNames) -> Vec<String> {
    names.ranked().into_iter().map(|(n, _)| n).collect()
}

fn listed(names: &TopNames) -> String {
    names
        .ranked()
        .iter()
        .map(|(n, c)| format!("{n} ({c})"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn holders_text(holders: &Holders) -> String {
    holders
        .iter()
        .map(|(w, n)| format!("{w} ({n})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How a clone failure cause reads: (kind, symptom, extra evidence, advice, the limit whose
/// trend belongs to it).
type CauseText = (
    FindingKind,
    String,
    String,
    Vec<String>,
    Option<(Limit, String)>,
);

fn cause_text(cause: CloneCause, t: &CloneTally, holders: &Holders) -> CauseText {
    let cgroup = t.who.cgroup.clone().unwrap_or_default();
    let callers = top(&t.comms).join(", ");
    let pod_limit = "If the workload needs more tasks, raise its pids limit: the kubelet's `podPidsLimit` (node-wide, per pod) or the container runtime's pids limit.";
    let every_pod = "Give every pod a pids limit (kubelet `podPidsLimit`) so that one leaking pod cannot take the node's tasks.";
    let held = format!("; most tasks: {}", holders_text(holders));
    match cause {
        CloneCause::PidsLimit => (
            FindingKind::PidsLimit,
            "the pids limit is reached".into(),
            String::new(),
            vec![
                format!("Find why {callers} keeps creating tasks without ending them (a thread or process leak grows the live count without bound: `faultline top --cgroup {cgroup}`)."),
                pod_limit.into(),
            ],
            Some((Limit::Pids, t.pids_cgroup.clone().unwrap_or(cgroup))),
        ),
        CloneCause::PidMax => (
            FindingKind::PidMax,
            "the pid namespace has no free pid".into(),
            held,
            vec![
                "Raise `kernel.pid_max` (e.g. `sysctl -w kernel.pid_max=4194304` on 64-bit nodes, in a sysctl.d file to keep it).".into(),
                every_pod.into(),
            ],
            Some((Limit::PidMax, "node".into())),
        ),
        CloneCause::ThreadsMax => (
            FindingKind::ThreadsMax,
            "the node's threads-max is reached".into(),
            held,
            vec![
                "Raise `kernel.threads-max` (sysctl), and find the workload holding the threads (above).".into(),
                every_pod.into(),
            ],
            Some((Limit::ThreadsMax, "node".into())),
        ),
        CloneCause::RlimitNproc => (
            FindingKind::RlimitNproc,
            format!("uid {} is at its RLIMIT_NPROC", t.uid),
            ". RLIMIT_NPROC counts every process of the uid on the node, in every container running as that uid".into(),
            vec![format!("Run the pods that share uid {} as distinct uids (`securityContext.runAsUser`), or raise the limit where it is set (the container runtime's default ulimits, `ulimit -u` in the entrypoint).", t.uid)],
            None,
        ),
        CloneCause::Memory => (
            FindingKind::Memory,
            "the memory cgroup is at its limit".into(),
            ". A new task's kernel memory (stack, structures) is charged to the cgroup and was refused".into(),
            vec!["Raise the container's memory limit, or find what fills it (its anonymous memory and page cache: `memory.stat`).".into()],
            None,
        ),
        CloneCause::PidnsDead => (
            FindingKind::PidnsDead,
            "the pid namespace's init has exited".into(),
            String::new(),
            vec!["The container's PID 1 died while other processes still run in its pid namespace: restart the pod and find why its init exited.".into()],
            None,
        ),
        CloneCause::Unknown => (
            FindingKind::CloneUnknown,
            "no known cause".into(),
            format!("; errno {}", listed(&t.errnos)),
            vec!["See the event lines (`faultline trace`) for each failure's errno and flags.".into()],
            None,
        ),
    }
}

fn clone_findings(
    b: &Bucket,
    minutes: f64,
    limits: &[Estimate],
    holders: &Holders,
    out: &mut Vec<Finding>,
) {
    for ((cause, _), t) in &b.clone {
        let (kind, symptom, extra, advice, limit) = cause_text(*cause, t, holders);
        let mut who = t.who.clone();
        who.processes = top(&t.comms);
        let estimate =
            limit.and_then(|(l, r)| limits.iter().find(|e| e.limit == l && e.resource == r));
        out.push(Finding {
            severity: Severity::Critical,
            kind,
            what: format!("{} task creations refused: {symptom}", t.span.count),
            who,
            why: format!("{}; callers: {}{extra}", t.evidence, listed(&t.comms)),
            trend: with_limit(
                events_trend(t.span.count, t.span.first, t.span.last, minutes),
                estimate,
            ),
            advice,
            kernel: None,
        });
    }
}

/// Limits near exhaustion that no failure finding (`reached`) already covers.
fn limit_findings(
    limits: &[Estimate],
    holders: &Holders,
    reached: &[(Limit, String)],
    out: &mut Vec<Finding>,
) {
    for e in limits {
        let soon = e.eta_s.is_some_and(|s| s <= ETA_HORIZON.as_secs_f64());
        let low =
            e.max > 0 && (e.max.saturating_sub(e.current) as f64) < LOW_HEADROOM * e.max as f64;
        let covered = reached
            .iter()
            .any(|(l, r)| *l == e.limit && *r == e.resource);
        if !(soon || low) || covered {
            continue;
        }
        let (kind, what, why, advice) = limit_text(e, holders, limits);
        let mut who = Who::new(&e.workload, e.pod.as_deref(), None);
        if e.limit == Limit::RlimitNproc && !e.shared_by.is_empty() {
            who.workload = e.shared_by.join(", ");
        }
        if e.limit == Limit::Pids {
            who.cgroup = Some(e.resource.clone());
        }
        out.push(Finding {
            severity: Severity::Warning,
            kind,
            what,
            who,
            why,
            trend: with_limit(Trend::default(), Some(e)),
            advice,
            kernel: None,
        });
    }
}

/// How a limit near exhaustion reads: (kind, symptom, cause, advice).
fn limit_text(
    e: &Estimate,
    holders: &Holders,
    limits: &[Estimate],
) -> (FindingKind, String, String, Vec<String>) {
    let when = match e.eta_s {
        Some(s) if s <= 0.0 => "reached: what it limits is refused now".to_owned(),
        Some(s) => format!(
            "reached in {} at the current growth ({:+.2}/s)",
            duration(s),
            e.growth_per_s.unwrap_or(0.0)
        ),
        None => "not growing now".to_owned(),
    };
    let soon = match e.eta_s {
        Some(s) if s <= 0.0 => " now: it is reached".to_owned(),
        Some(s) => format!(" in {}", duration(s)),
        None => " (little headroom left)".to_owned(),
    };
    match e.limit {
        Limit::Pids => (
            FindingKind::PidsLimitNear,
            format!("the pids limit of {} will refuse new tasks{soon}", e.workload),
            format!("pids.current={} pids.max={}: {when}", e.current, e.max),
            vec![
                format!("Find what keeps creating tasks in {} (`faultline top --sort eta`): a thread or process leak grows its live count without bound.", e.workload),
                "If the workload needs more tasks, raise its pids limit (kubelet `podPidsLimit`, or the container runtime's).".to_owned(),
            ],
        ),
        Limit::PidMax | Limit::ThreadsMax => {
            let (kind, name) = if e.limit == Limit::PidMax {
                (FindingKind::PidMax, "kernel.pid_max")
            } else {
                (FindingKind::ThreadsMax, "kernel.threads-max")
            };
            (
                kind,
                format!("the node's {name} will refuse new tasks{soon}"),
                format!("{} tasks of {}: {when}; most tasks: {}", e.current, e.max, holders_text(holders)),
                vec![
                    format!("Find the workload whose live count grows (above) and stop the leak; raise `{name}` (sysctl) for room."),
                    "Give every pod a pids limit (kubelet `podPidsLimit`).".to_owned(),
                ],
            )
        }
        Limit::RlimitNproc => {
            let uid = e.resource.strip_prefix("uid:").unwrap_or(&e.resource);
            let others = e.shared_by.len().saturating_sub(1);
            // The pids limit people watch, when looser: the tightest among the sharers'.
            let pids = limits
                .iter()
                .filter(|p| p.limit == Limit::Pids && e.shared_by.contains(&p.workload))
                .map(|p| p.max)
                .min()
                .filter(|m| *m > e.max)
                .map(|m| format!("pids.max is {m} but "))
                .unwrap_or_default();
            (
                FindingKind::RlimitNprocNear,
                format!(
                    "{pids}RLIMIT_NPROC {} for uid {uid}, shared with {others} other pod(s), binds first{}",
                    e.max,
                    soon.replace(" in ", ": in ")
                ),
                format!(
                    "{} tasks (threads included) run as uid {uid} on the node against RLIMIT_NPROC={}: {when}; RLIMIT_NPROC counts every task of the uid, in every pod running as it: {}",
                    e.current,
                    e.max,
                    e.shared_by.join(", ")
                ),
                vec![
                    format!("Find the leak in the pods running as uid {uid} (`faultline top --sort eta`)."),
                    "Run those pods as distinct uids (`securityContext.runAsUser`), or raise the nproc ulimit where it is set (the container runtime's default ulimits, `ulimit -u` in the entrypoint).".to_owned(),
                ],
            )
        }
        Limit::Conntrack => (
            FindingKind::ConntrackTableNear,
            format!("the conntrack table of {} will be full{soon}", e.workload),
            format!("{} entries of nf_conntrack_max={}: {when}", e.current, e.max),
            vec![
                "Raise `net.netfilter.nf_conntrack_max` (and the hash size), or shorten the timeouts of idle flows (`nf_conntrack_udp_timeout`, `nf_conntrack_tcp_timeout_established`).".to_owned(),
                "Find the workload opening the flows (`conntrack -L` grouped by source).".to_owned(),
            ],
        ),
    }
}

fn dns_findings(t: &DnsTally, minutes: f64, out: &mut Vec<Finding>) {
    let queries = t.span.count;
    let servers = listed(&t.servers);
    if t.timeouts > 0 {
        let mut why = format!(
            "{} of {queries} queries got no answer in time (servers: {servers}); {} re-sent",
            t.timeouts, t.retransmits
        );
        if t.retransmits_5s > 0 {
            why.push_str(&format!(", {} of them ~5 s after the first send: the resolver's default timeout, so each such lookup stalled 5 s", t.retransmits_5s));
        }
        let mut advice = Vec::new();
        if t.conntrack_dropped > 0 {
            why.push_str(&format!(
                "; conntrack dropped {} of the queries' packets",
                t.conntrack_dropped
            ));
            advice.push("Packets of parallel A/AAAA queries from one socket race in conntrack: add `options: [{name: single-request-reopen}]` to the pod's `dnsConfig`, or run NodeLocal DNSCache so that pods do not go through DNAT for DNS.".to_owned());
        } else {
            advice.push(format!("Check the DNS servers ({servers}): whether they received the queries (their logs, `conntrack -S` insert_failed on the node) and answered."));
            advice.push("If the loss is in conntrack (parallel A/AAAA from one socket), `single-request-reopen` in the pod's `dnsConfig` or NodeLocal DNSCache avoids it.".to_owned());
        }
        out.push(Finding {
            severity: Severity::Critical,
            kind: FindingKind::DnsTimeouts,
            what: format!("{} DNS queries timed out", t.timeouts),
            who: t.who.clone(),
            why,
            trend: events_trend(t.timeouts, t.span.first, t.span.last, minutes),
            advice,
            kernel: None,
        });
    }
    if t.search_misses >= AMPLIFICATION_MIN
        && t.search_misses as f64 >= AMPLIFICATION_SHARE * queries as f64
    {
        let lookups = queries.saturating_sub(t.search_misses).max(1);
        let example = t
            .chain_example
            .as_ref()
            .map(|(n, k)| format!("; e.g. `{n}` was answered after {k} search-path NXDOMAINs"))
            .unwrap_or_default();
        out.push(Finding {
            severity: Severity::Info,
            kind: FindingKind::DnsSearchAmplification,
            what: format!(
                "{:.1} DNS queries per lookup: {} of {queries} queries were search-path misses",
                queries as f64 / lookups as f64,
                t.search_misses
            ),
            who: t.who.clone(),
            why: format!("names with fewer dots than `ndots` (5 in Kubernetes) are tried with each search domain first, each try an NXDOMAIN round trip{example}"),
            trend: events_trend(t.search_misses, t.span.first, t.span.last, minutes),
            advice: vec![
                "Use fully qualified names with a trailing dot for external names (`api.example.com.`).".to_owned(),
                "Or lower `ndots` in the pod's `dnsConfig` (`options: [{name: ndots, value: \"2\"}]`), or use NodeLocal DNSCache to make the misses cheap.".to_owned(),
            ],
            kernel: None,
        });
    }
}

fn conntrack_findings(b: &Bucket, minutes: f64, limits: &[Estimate], out: &mut Vec<Finding>) {
    for ((cause, _), t) in &b.drops {
        let dns = if t.dns_queries > 0 {
            format!("; {} were DNS queries", t.dns_queries)
        } else {
            String::new()
        };
        let (severity, kind, what, why, advice) = match *cause {
            DropCause::InsertFailed => (
                Severity::Critical,
                FindingKind::ConntrackInsertFailed,
                format!("{} packets dropped by conntrack: insert failed", t.span.count),
                format!("two packets of one flow (or two flows translated to one tuple) raced to confirm their conntrack entry and this one lost: {}, e.g. {}{dns}", t.evidence, t.flow),
                vec![
                    "For DNS: `options: [{name: single-request-reopen}]` in the pod's `dnsConfig` (A and AAAA from separate sockets), or NodeLocal DNSCache.".to_owned(),
                    "For SNAT port clashes: `--random-fully` on the masquerade rule (kube-proxy/CNI option), or more source addresses.".to_owned(),
                ],
            ),
            DropCause::TableFull => (
                Severity::Critical,
                FindingKind::ConntrackTableFull,
                format!("{} packets dropped: the conntrack table is full", t.span.count),
                format!("{}, e.g. {}{dns}", t.evidence, t.flow),
                vec![
                    "Raise `net.netfilter.nf_conntrack_max` (and `nf_conntrack_buckets`), or shorten idle timeouts (`nf_conntrack_udp_timeout`).".to_owned(),
                    "Find the workload opening the flows (`conntrack -L` grouped by source).".to_owned(),
                ],
            ),
            // The namespace's counters could not tell (not readable from here): say so, never
            // guess a rule.
            DropCause::Other => (
                Severity::Warning,
                FindingKind::ConntrackDropsUnclassified,
                format!("{} packets dropped by netfilter, cause not told", t.span.count),
                format!("{}, e.g. {}{dns}", t.evidence, t.flow),
                vec![
                    "Read the namespace's counters where the drop happened (`conntrack -S` inside it): insert_failed, drop (table full) or neither (a rule).".to_owned(),
                    "Drops in a pod's own network namespace are classified only with CAP_SYS_PTRACE and CAP_SYS_ADMIN (to find and enter it); the node's namespace always is.".to_owned(),
                ],
            ),
            DropCause::Rule => (
                Severity::Warning,
                FindingKind::ConntrackRuleDrops,
                format!("{} packets dropped by a netfilter rule", t.span.count),
                format!("{}, e.g. {}{dns}", t.evidence, t.flow),
                vec!["A rule dropped them (a NetworkPolicy, a firewall, kube-proxy's REJECT for a service without endpoints): check the rules for this flow.".to_owned()],
            ),
        };
        let table = limits
            .iter()
            .find(|e| e.limit == Limit::Conntrack && e.workload == t.who.workload);
        out.push(Finding {
            severity,
            kind,
            what,
            who: t.who.clone(),
            why,
            trend: with_limit(
                events_trend(t.span.count, t.span.first, t.span.last, minutes),
                table.filter(|_| *cause == DropCause::TableFull),
            ),
            advice,
            kernel: None,
        });
    }
    for t in b.clashes.values() {
        out.push(Finding {
            severity: Severity::Warning,
            kind: FindingKind::ConntrackNearMisses,
            what: format!("{} conntrack clashes resolved in time (near-misses)", t.span.count),
            who: t.who.clone(),
            why: format!("in {}, packets raced to confirm one conntrack entry and the kernel merged them; when it cannot, the packet is dropped (insert_failed): near-misses come before the drops", netns_phrase(t.netns)),
            trend: events_trend(t.span.count, t.span.first, t.span.last, minutes),
            advice: vec![
                "Remove the race before it becomes drops: `single-request-reopen` in the `dnsConfig` of the pods doing DNS, or NodeLocal DNSCache.".to_owned(),
            ],
            kernel: None,
        });
    }
}

/// The findings of the past: one per cgroup or namespace whose counters say the kernel
/// refused before faultline watched, ranked like the others. `started` (when faultline
/// started) dates the cgroups' ages.
pub fn past_findings(past: &Past, started: std::time::SystemTime) -> Vec<Finding> {
    let mut out: Vec<Finding> = past
        .entries
        .iter()
        .flat_map(|e| past_entry(e, started))
        .collect();
    out.sort_by(|a, b| {
        a.severity
            .cmp(&b.severity)
            .then(kernel_total(b).cmp(&kernel_total(a)))
            .then(a.kind.as_str().cmp(b.kind.as_str()))
            .then(a.who.workload.cmp(&b.who.workload))
    });
    out
}

fn kernel_total(f: &Finding) -> u64 {
    f.kernel.as_ref().map_or(0, |k| k.counts.values().sum())
}

/// "none while watched", "3 more while watched", or that the cgroup is gone.
fn watched_text(n: Option<u64>, what: &str) -> String {
    match n {
        Some(0) => "none while watched".to_owned(),
        Some(n) => format!("{n} more while watched"),
        None => format!("the {what} is gone since"),
    }
}

/// The findings of one cgroup or namespace (a namespace can have both conntrack kinds).
fn past_entry(e: &Entry, started: std::time::SystemTime) -> Vec<Finding> {
    let past = PastEntry::new(e, started);
    let found = match &e.resource {
        Resource::Cgroup(_, cgroup) => [past.pids_limit(cgroup), past.memory_limit(cgroup)],
        Resource::Netns(_, inode) => [past.insert_failed(*inode), past.table_full(*inode)],
    };
    found.into_iter().flatten().collect()
}

/// One cgroup's or namespace's counts at the start, and how its findings of the past say them.
struct PastEntry<'a> {
    e: &'a Entry,
    /// The cgroup's age when faultline started.
    age_s: Option<f64>,
    /// `since the cgroup was made (3 h ago)`.
    since: String,
}

impl<'a> PastEntry<'a> {
    fn new(e: &'a Entry, started: std::time::SystemTime) -> PastEntry<'a> {
        let age_s = e
            .made
            .and_then(|m| started.duration_since(m).ok())
            .map(|d| d.as_secs_f64());
        let since = match (&e.resource, age_s) {
            (Resource::Netns(..), _) => "since the network namespace was made".to_owned(),
            (Resource::Cgroup(..), Some(a)) => {
                format!("since the cgroup was made ({} ago)", duration(a))
            }
            (Resource::Cgroup(..), None) => "since the cgroup was made".to_owned(),
        };
        PastEntry { e, age_s, since }
    }

    /// `pids_max=3 memory_oom=1`: every count at the start.
    fn counts_text(&self) -> String {
        self.e
            .first
            .iter()
            .map(|(c, n)| format!("{}={n}", c.as_str()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// `memory.events.local: max=7 oom=1`, each count with its file.
    fn files_text(&self) -> String {
        let mut by_file: Vec<(&str, Vec<String>)> = Vec::new();
        for (c, n) in &self.e.first {
            let f = self.e.file(*c);
            let item = format!("{}={n}", c.as_str());
            match by_file.iter_mut().find(|(g, _)| *g == f) {
                Some((_, items)) => items.push(item),
                None => by_file.push((f, vec![item])),
            }
        }
        by_file
            .iter()
            .map(|(f, items)| format!("{f}: {}", items.join(" ")))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// "none while watched", "3 more while watched", or that it is gone.
    fn watched(&self, c: Counter) -> String {
        let what = match self.e.resource {
            Resource::Netns(..) => "network namespace",
            Resource::Cgroup(..) => "cgroup",
        };
        watched_text(self.e.while_watched(c), what)
    }

    /// A finding of the past, with the kernel's counts behind it.
    fn finding(
        &self,
        kind: FindingKind,
        severity: Severity,
        counter: Counter,
        what: String,
        why: String,
        advice: Vec<String>,
    ) -> Finding {
        Finding {
            severity,
            kind,
            what,
            who: self.e.who.clone(),
            why,
            trend: Trend::default(),
            advice,
            kernel: Some(KernelCount {
                counts: self.e.first.iter().copied().collect(),
                source: self.e.file(counter).to_owned(),
                age_s: self.age_s,
                while_watched: self.e.while_watched(counter),
            }),
        }
    }

    fn pids_limit(&self, cgroup: &str) -> Option<Finding> {
        let (e, since) = (self.e, &self.since);
        let pids = e.first(Counter::PidsMax);
        (pids > 0).then(|| self.finding(
            FindingKind::PidsLimitPast,
            Severity::Critical,
            Counter::PidsMax,
            format!("{since}, its pids limit refused {pids} task creations; {}", self.watched(Counter::PidsMax)),
            format!("the kernel's count in {cgroup}/{}: max {pids}, counted at each task creation the pids limit refused, before faultline watched", e.file(Counter::PidsMax)),
            vec![
                format!("Find what creates tasks without ending them in {} (`faultline top`): a leak that hit its limit once will again.", e.who.workload),
                "If the workload needs more tasks, raise its pids limit (kubelet `podPidsLimit`, or the container runtime's).".to_owned(),
            ],
        ))
    }

    /// An OOM kill, else running out of memory at the limit, else reaching it.
    fn memory_limit(&self, cgroup: &str) -> Option<Finding> {
        let (e, since) = (self.e, &self.since);
        let kills = e.first(Counter::MemoryOomKill);
        let ooms = e.first(Counter::MemoryOom);
        let hits = e
            .first(Counter::MemoryMax)
            .max(e.first(Counter::MemoryFailcnt));
        let advice = vec![
            "Raise the container's memory limit, or find what fills it (its anonymous memory and page cache: `memory.stat`).".to_owned(),
        ];
        let why = format!("the kernel's counts in {cgroup}: {}", self.files_text());
        if kills > 0 {
            return Some(self.finding(
                FindingKind::OomKillPast,
                Severity::Critical,
                Counter::MemoryOomKill,
                format!("{since}, the OOM killer killed {kills} of its processes at its memory limit; {}", self.watched(Counter::MemoryOomKill)),
                why,
                advice,
            ));
        }
        let (severity, counter, what) = if ooms > 0 {
            (
                Severity::Warning,
                Counter::MemoryOom,
                format!(
                    "{since}, it ran out of memory at its limit {ooms} times (reclaim failed), with no process killed"
                ),
            )
        } else if hits > 0 {
            let counter = if e.first(Counter::MemoryMax) > 0 {
                Counter::MemoryMax
            } else {
                Counter::MemoryFailcnt
            };
            (
                Severity::Info,
                counter,
                format!(
                    "{since}, it reached its memory limit {hits} times (the kernel reclaimed; an allocation it could not reclaim for, a new task's among them, was refused)"
                ),
            )
        } else {
            return None;
        };
        Some(self.finding(
            FindingKind::MemoryLimitPast,
            severity,
            counter,
            format!("{what}; {}", self.watched(counter)),
            why,
            advice,
        ))
    }

    fn insert_failed(&self, inode: Option<u64>) -> Option<Finding> {
        let since = &self.since;
        let failed = self.e.first(Counter::ConntrackInsertFailed);
        (failed > 0).then(|| self.finding(
            FindingKind::ConntrackInsertFailedPast,
            Severity::Critical,
            Counter::ConntrackInsertFailed,
            format!("{since}, conntrack dropped {failed} packets whose entry lost the race to be confirmed (insert_failed); {}", self.watched(Counter::ConntrackInsertFailed)),
            format!("the kernel's counters of {}: {}", netns_phrase(inode), self.counts_text()),
            vec![
                "For DNS: `options: [{name: single-request-reopen}]` in the pod's `dnsConfig`, or NodeLocal DNSCache.".to_owned(),
                "For SNAT port clashes: `--random-fully` on the masquerade rule (kube-proxy/CNI option), or more source addresses.".to_owned(),
            ],
        ))
    }

    fn table_full(&self, inode: Option<u64>) -> Option<Finding> {
        let (e, since) = (self.e, &self.since);
        // `drop` counts lost clashes too: what is left is the table's.
        let full = e
            .first(Counter::ConntrackDrop)
            .saturating_sub(e.first(Counter::ConntrackInsertFailed));
        let early = e.first(Counter::ConntrackEarlyDrop);
        if full == 0 && early == 0 {
            return None;
        }
        let counter = if full > 0 {
            Counter::ConntrackDrop
        } else {
            Counter::ConntrackEarlyDrop
        };
        Some(self.finding(
            FindingKind::ConntrackTableFullPast,
            if full > 0 { Severity::Critical } else { Severity::Warning },
            counter,
            format!("{since}, its conntrack table was full: {full} packets dropped for want of an entry, {early} entries evicted early; {}", self.watched(counter)),
            format!("the kernel's counters of {}: {}; `drop` beyond insert_failed is the table's", netns_phrase(inode), self.counts_text()),
            vec![
                "Raise `net.netfilter.nf_conntrack_max` (and `nf_conntrack_buckets`), or shorten idle timeouts (`nf_conntrack_udp_timeout`).".to_owned(),
            ],
        ))
    }
}

/// `45 s`, `12 min`, `3.5 h`.
pub fn duration(secs: f64) -> String {
    if secs < 120.0 {
        format!("{secs:.0} s")
    } else if secs < 7200.0 {
        format!("{:.0} min", secs / 60.0)
    } else {
        format!("{:.1} h", secs / 3600.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON names a report carries are the ones the text shows.
    #[test]
    fn finding_kinds_serialize_as_they_print() {
        // Every kind: serde's names and `as_str` are written apart and must agree.
        for kind in [
            FindingKind::PidsLimit,
            FindingKind::PidsLimitNear,
            FindingKind::PidMax,
            FindingKind::ThreadsMax,
            FindingKind::RlimitNproc,
            FindingKind::RlimitNprocNear,
            FindingKind::Memory,
            FindingKind::PidnsDead,
            FindingKind::CloneUnknown,
            FindingKind::DnsTimeouts,
            FindingKind::DnsSearchAmplification,
            FindingKind::ConntrackInsertFailed,
            FindingKind::ConntrackTableFull,
            FindingKind::ConntrackRuleDrops,
            FindingKind::ConntrackDropsUnclassified,
            FindingKind::ConntrackTableNear,
            FindingKind::ConntrackNearMisses,
            FindingKind::PidsLimitPast,
            FindingKind::OomKillPast,
            FindingKind::MemoryLimitPast,
            FindingKind::ConntrackInsertFailedPast,
            FindingKind::ConntrackTableFullPast,
            FindingKind::Unknown,
        ] {
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::Value::from(kind.as_str())
            );
        }
        let newer: FindingKind = serde_json::from_str("\"a_kind_of_later\"").unwrap();
        assert_eq!(newer, FindingKind::Unknown);
    }
    use crate::diagnosis::history::{ClashTally, Span};

    fn estimate(
        limit: Limit,
        resource: &str,
        current: u64,
        max: u64,
        eta: Option<f64>,
    ) -> Estimate {
        Estimate {
            limit,
            resource: resource.into(),
            workload: if resource == "node" {
                "node".into()
            } else {
                "shop/leaky/app".into()
            },
            current,
            max,
            growth_per_s: eta.map(|e| (max - current) as f64 / e.max(1.0)),
            eta_s: eta,
            samples: 10,
            pod: None,
            shared_by: Vec::new(),
        }
    }

    #[test]
    fn nothing_wrong_is_no_finding() {
        let limits = [
            estimate(Limit::PidMax, "node", 500, 4_194_304, None),
            estimate(Limit::Pids, "/kubepods/pod1", 10, 100, Some(50_000.0)),
        ];
        assert!(findings(&Bucket::default(), Duration::from_secs(900), &limits, &[]).is_empty());
    }

    #[test]
    fn limits_near_exhaustion_and_near_misses_rank_below_failures() {
        let mut b = Bucket::default();
        b.clashes.insert(
            crate::attribution::netns::NetnsKey(7),
            ClashTally {
                who: Who::new("shop/dns-client/app", None, None),
                netns: Some(7),
                span: Span {
                    count: 4,
                    first: 1,
                    last: 2,
                },
            },
        );
        let limits = [
            estimate(Limit::PidMax, "node", 30_000, 32_768, Some(1200.0)),
            estimate(Limit::Pids, "/kubepods/pod1", 95, 100, None),
            estimate(Limit::Conntrack, "netns:9", 262_000, 262_144, Some(30.0)),
        ];
        let holders = [("shop/leaky/app".to_owned(), 29_000u64)];
        let f = findings(&b, Duration::from_secs(900), &limits, &holders);
        let kinds: Vec<&str> = f.iter().map(|f| f.kind.as_str()).collect();
        // The soonest limit first; low headroom without growth still counts.
        assert_eq!(
            kinds,
            [
                "conntrack_table_near",
                "pid_max",
                "pids_limit_near",
                "conntrack_near_misses"
            ]
        );
        assert!(f.iter().all(|f| f.severity == Severity::Warning));
        let pid_max = &f[1];
        assert!(
            pid_max.why.contains("shop/leaky/app (29000)"),
            "{}",
            pid_max.why
        );
        assert!(pid_max.advice[0].contains("kernel.pid_max"));
        assert_eq!(pid_max.trend.eta_s, Some(1200.0));
    }

    #[test]
    fn the_past_reads_as_the_kernel_counted_it() {
        use crate::{attribution::cgroups::Hierarchy, diagnosis::past::Entry};
        let started = std::time::SystemTime::now();
        let pids = Entry {
            resource: Resource::Cgroup(Hierarchy::Pids, "/kubepods/pod1".into()),
            who: Who::new("shop/leaky/app", None, Some("/kubepods/pod1")),
            files: vec![(Counter::PidsMax, "pids.events")],
            first: vec![(Counter::PidsMax, 412)],
            latest: Some(vec![(Counter::PidsMax, 412)]),
            made: started.checked_sub(Duration::from_secs(3 * 3600)),
        };
        let netns = Entry {
            resource: Resource::Netns(
                crate::attribution::netns::NetnsKey(4026532100),
                Some(4026532000),
            ),
            who: Who::new("netns:4026532000", None, None),
            files: vec![
                (Counter::ConntrackInsertFailed, "ctnetlink"),
                (Counter::ConntrackDrop, "ctnetlink"),
            ],
            first: vec![
                (Counter::ConntrackInsertFailed, 3),
                (Counter::ConntrackDrop, 5),
            ],
            latest: Some(vec![
                (Counter::ConntrackInsertFailed, 4),
                (Counter::ConntrackDrop, 6),
            ]),
            made: None,
        };
        let memory = Entry {
            resource: Resource::Cgroup(Hierarchy::Memory, "/kubepods/pod2".into()),
            who: Who::new("shop/cache/app", None, Some("/kubepods/pod2")),
            files: vec![(Counter::MemoryMax, "memory.events.local")],
            first: vec![(Counter::MemoryMax, 7)],
            latest: None,
            made: None,
        };
        let past = Past {
            entries: vec![memory, pids, netns],
            ..Past::default()
        };
        let f = past_findings(&past, started);
        let kinds: Vec<&str> = f.iter().map(|f| f.kind.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "pids_limit_past",
                "conntrack_insert_failed_past",
                "conntrack_table_full_past",
                "memory_limit_past"
            ]
        );
        assert_eq!(
            f[0].what,
            "since the cgroup was made (3.0 h ago), its pids limit refused 412 task creations; none while watched"
        );
        let k = f[0].kernel.as_ref().expect("test");
        assert_eq!(k.counts[&Counter::PidsMax], 412);
        assert!(k.age_s.is_some_and(|a| (a - 10800.0).abs() < 1.0), "{k:?}");
        assert!(
            f[1].what.ends_with("(insert_failed); 1 more while watched"),
            "{}",
            f[1].what
        );
        // drop beyond insert_failed is the table's.
        assert!(
            f[2].what.contains("2 packets dropped for want of an entry"),
            "{}",
            f[2].what
        );
        assert_eq!(f[3].severity, Severity::Info);
        assert!(
            f[3].what.ends_with("the cgroup is gone since"),
            "{}",
            f[3].what
        );
        let json = serde_json::to_string(&f[0]).expect("test");
        assert!(
            json.contains(r#""kernel":{"counts":{"pids_max":412}"#),
            "{json}"
        );
    }

    #[test]
    fn the_report_round_trips_through_json() {
        let limits = [estimate(Limit::ThreadsMax, "node", 95, 100, Some(10.0))];
        let r = Report {
            kind: "explain".into(),
            version: VERSION,
            node: "n1".into(),
            time: "2026-11-25T00:00:00.000Z".into(),
            source: ReportSource::Daemon,
            window_s: 900.0,
            findings: findings(&Bucket::default(), Duration::from_secs(900), &limits, &[]),
            not_kept: 0,
            notes: vec![],
            past: vec![],
        };
        let text = serde_json::to_string(&r).expect("test");
        assert!(text.contains(r#""limit_kind":"threads_max""#), "{text}");
        assert_eq!(serde_json::from_str::<Report>(&text).expect("test"), r);
    }
}
