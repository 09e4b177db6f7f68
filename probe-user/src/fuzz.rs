//! Property tests ("fuzzing" on stable, in every test run) for everything faultline parses
//! from what pods and the kernel hand it: DNS messages and the tracker that follows them,
//! ctnetlink answers, mountinfo, cgroup paths and the kubelet's log-directory names. Each
//! target starts from the seeds in `probe-user/fuzz-corpus/`, mutated (bytes overwritten,
//! inserted, cut) and also from plain random input, and asserts: no panic, and nothing a
//! terminal would obey in what faultline prints (table lines) or encodes (JSON lines).
//! `PROPTEST_CASES=100000 cargo test -p probe-user --lib fuzz::` runs a deeper search; a
//! failing case is written to `proptest-regressions/` and replayed first from then on.

use std::path::{Path, PathBuf};

use probe_common::dns::{DNS_CAPTURE, DNS_QUERY_CAPTURE, DnsKey, DnsPending, DnsQueryEvent};
use proptest::prelude::*;

use crate::{
    attribution::pods::Attributor,
    signals::dns::{DnsTracker, Names},
    text::printable,
};

/// Cases per target in the suite (about a second each), unless PROPTEST_CASES says otherwise.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

fn corpus(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz-corpus")
        .join(name)
}

fn seeds_in(dir: &str) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus(dir))
        .expect("the fuzz corpus")
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| std::fs::read(f).expect("a seed"))
        .collect()
}

fn lines_of(file: &str) -> Vec<Vec<u8>> {
    std::fs::read(corpus(file))
        .expect("a seed file")
        .split(|b| *b == b'\n')
        .map(<[u8]>::to_vec)
        .collect()
}

/// One edit of a seed: overwrite, insert or cut at a position (taken modulo the length).
#[derive(Clone, Debug)]
enum Edit {
    Set(usize, u8),
    Insert(usize, u8),
    Cut(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Cut),
    ]
}

/// A seed from `seeds` with up to 8 edits, or (one case in four) random bytes.
fn mutated(seeds: Vec<Vec<u8>>, max_len: usize) -> impl Strategy<Value = Vec<u8>> {
    let n = seeds.len();
    prop_oneof![
        3 => (0..n, prop::collection::vec(edit(), 0..8)).prop_map(move |(i, edits)| {
            let mut bytes = seeds[i].clone();
            for e in edits {
                let len = bytes.len();
                match e {
                    Edit::Set(at, b) if len > 0 => bytes[at % len] = b,
                    Edit::Insert(at, b) => bytes.insert(at % (len + 1), b),
                    Edit::Cut(at) if len > 0 => bytes.truncate(at % len),
                    _ => {}
                }
            }
            bytes.truncate(max_len);
            bytes
        }),
        1 => prop::collection::vec(any::<u8>(), 0..max_len),
    ]
}

/// Nothing a terminal would obey: no control, separator or bidirectional character.
fn no_control(s: &str) -> bool {
    !s.chars().any(crate::text::needs_escape)
}

/// A kernel event around `payload`, with the other fields as given.
fn query_event(payload: &[u8], outcome: u8, fields: (u64, u16, u64, u64, u64)) -> DnsQueryEvent {
    // SAFETY: DnsQueryEvent is plain old data (aya::Pod): all-zero bytes are a valid value.
    let mut ev: DnsQueryEvent = unsafe { std::mem::zeroed() };
    let (cookie, id, cgroup, sent, done) = fields;
    ev.key = DnsKey {
        socket_cookie: cookie,
        id,
        _pad: [0; 6],
    };
    ev.send.cgroup_id = cgroup;
    ev.send.sent_ns = sent;
    ev.send.family = if id % 2 == 0 { 4 } else { 6 };
    ev.done_ns = done;
    ev.outcome = outcome;
    let n = payload.len().min(DNS_CAPTURE);
    ev.payload[..n].copy_from_slice(&payload[..n]);
    ev.captured = payload.len() as u32; // may claim more than the buffer: clamped by the tracker
    ev.dns_len = ev.captured;
    ev
}

/// What faultline shows of a query, checked: JSON and the escaped table line are clean.
fn shown_cleanly(q: &crate::signals::dns::DnsQuery) -> Result<(), TestCaseError> {
    let event = crate::signals::Event::DnsQuery(q.clone());
    let json = crate::text::json_line(&event).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let json = String::from_utf8_lossy(&json);
    prop_assert!(no_control(json.trim_end()), "JSON: {json:?}");
    let line = printable(&crate::trace::table_line(&event)).into_owned();
    prop_assert!(no_control(&line), "table line: {line:?}");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn dns_tracker_takes_any_answer_or_query(
        payload in mutated(seeds_in("dns"), DNS_CAPTURE + 64),
        outcome in 0u8..3,
        fields in (any::<u64>(), any::<u16>(), any::<u64>(), any::<u64>(), any::<u64>()),
    ) {
        let mut tracker = DnsTracker::new(std::time::Duration::from_secs(2), Names::Full);
        let mut attributor = Attributor::offline();
        let ev = query_event(&payload, outcome, fields);
        if let Some(q) = tracker.on_event(&ev, &mut attributor) {
            shown_cleanly(&q)?;
        }
        // The same bytes as a query still waiting in the kernel, swept past its timeout.
        // SAFETY: plain old data, as above.
        let mut pending: DnsPending = unsafe { std::mem::zeroed() };
        pending.send = ev.send;
        let n = payload.len().min(DNS_QUERY_CAPTURE);
        pending.query[..n].copy_from_slice(&payload[..n]);
        pending.send.captured = payload.len() as u16;
        let now = ev.send.sent_ns.saturating_add(10_000_000_000);
        let (reports, _) = tracker.sweep(vec![(ev.key, pending)], now, &mut attributor);
        for q in &reports {
            shown_cleanly(q)?;
        }
    }

    #[test]
    fn ctnetlink_answers_never_panic(
        datagram in mutated(seeds_in("netlink"), 4096),
        dump in any::<bool>(),
    ) {
        let mut out = Vec::new();
        let _ = crate::signals::conntrack::ctstats::parse_answers(&datagram, dump, &mut out);
        // Every attribute taken is a 32-bit value.
        prop_assert!(out.iter().all(|(_, v)| *v <= u32::MAX as u64));
    }

    #[test]
    fn mountinfo_never_panics(
        text in mutated(
            vec![
                std::fs::read(corpus("mountinfo-hybrid.txt")).expect("seed"),
                std::fs::read(corpus("mountinfo-v2.txt")).expect("seed"),
            ],
            8192,
        ),
    ) {
        let text = String::from_utf8_lossy(&text);
        let mounts = crate::attribution::cgroups::parse_mountinfo(&text, |_| "pids memory".to_owned());
        prop_assert!(mounts.len() <= 3);
    }

    #[test]
    fn cgroup_paths_attribute_to_printable_workloads(
        path in mutated(lines_of("cgroup-paths.txt"), 512),
    ) {
        let path = crate::text::from_bytes(&path);
        let _ = crate::attribution::pods::parse_cgroup_path(&path);
        let who = Attributor::offline().attribute_path(&path);
        prop_assert!(no_control(&printable(&who.workload)), "{:?}", who.workload);
        let json = crate::text::json_line(&who.workload).expect("a string encodes");
        let json = String::from_utf8_lossy(&json);
        prop_assert!(no_control(json.trim_end()), "{json:?}");
    }

    #[test]
    fn kubelet_log_directory_names_never_panic(
        name in mutated(lines_of("log-dirs.txt"), 512),
    ) {
        let name = String::from_utf8_lossy(&name);
        if let Some((uid, (ns, pod))) = crate::attribution::pods::pod_dir_entry(&name) {
            // A uid is only ever the canonical form: no room for terminal escapes.
            prop_assert!(uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'), "{uid:?}");
            prop_assert!(!ns.contains('_') && !pod.contains('_'));
        }
        if let Some((id, _container)) = crate::attribution::pods::container_log_entry(&name) {
            prop_assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id:?}");
        }
    }
}

#[test]
fn every_seed_is_read() {
    assert!(seeds_in("dns").len() >= 5);
    assert!(seeds_in("netlink").len() >= 3);
    assert!(lines_of("cgroup-paths.txt").len() >= 10);
    assert!(lines_of("log-dirs.txt").len() >= 5);
}

#[test]
fn the_seeds_parse_as_they_should() {
    // The well-formed seeds are what the mutations start from: they must parse.
    let query = std::fs::read(corpus("dns/query-a.bin")).expect("seed");
    let m = crate::signals::dns::parse(&query).expect("a query");
    assert_eq!(m.qname, "web.shop.svc.cluster.local");
    let mut out = Vec::new();
    let dump = std::fs::read(corpus("netlink/stats-cpu-dump.bin")).expect("seed");
    assert!(
        crate::signals::conntrack::ctstats::parse_answers(&dump, true, &mut out).expect("parses")
    );
    assert_eq!(out.len(), 32, "16 attributes for each of 2 CPUs");
    let error = std::fs::read(corpus("netlink/error-eperm.bin")).expect("seed");
    assert!(
        crate::signals::conntrack::ctstats::parse_answers(&error, true, &mut Vec::new()).is_err()
    );
}
