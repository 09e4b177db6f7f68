//! The userspace pipeline without the kernel: ring-buffer records as the programs write them
//! are fed through decode, enrichment and attribution, the metrics, the explain history and
//! the JSON line encoder, one thread, and the rate is printed per kind (events/s per core).
//! `cargo xtask bench` runs it; `cargo run --release -p probe-user --example replay [N]`.

use std::{
    os::unix::fs::MetadataExt as _,
    time::{Duration, Instant},
};

use clap::Parser;
use probe_common::{
    clone::{CloneFailureEvent, Syscall, valid},
    dns::{DnsKey, DnsQueryEvent, DnsSend, OUTCOME_ANSWERED},
};
use probe_user::{
    attribution::{
        cgroups::CgroupFs,
        pods::{Attributor, PodArgs},
    },
    diagnosis::Recorder,
    export::metrics::Metrics,
    signals::{
        Event,
        clone::Enricher,
        dns::{DnsTracker, Names},
    },
};

#[derive(Parser)]
struct Args {
    /// Events of each kind.
    #[arg(default_value_t = 200_000)]
    count: u32,
    #[command(flatten)]
    pods: PodArgs,
}

/// This process's cgroup v2 id: every replayed event comes from it.
fn own_cgroup_id() -> u64 {
    let path = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        })
        .unwrap_or_else(|| "/".to_owned());
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .find_map(|m| std::fs::metadata(format!("{m}{path}")).ok())
        .map_or(0, |m| m.ino())
}

/// A failed pthread_create under a full pids limit, as the clone program reports it.
fn clone_failure(cgroup_id: u64, i: u32) -> CloneFailureEvent {
    // SAFETY: a repr(C) record of integers and byte arrays: all zeroes is a valid value.
    let mut ev: CloneFailureEvent = unsafe { std::mem::zeroed() };
    ev.ktime_ns = 1_000_000 + u64::from(i);
    ev.cgroup_id = cgroup_id;
    ev.clone_flags = 0x3d0f00;
    ev.pid = 4242;
    ev.tid = 4242;
    ev.ppid = 1;
    ev.syscall = Syscall::Clone3 as u32;
    ev.errno = 11;
    ev.valid = valid::PIDS | valid::FLAGS;
    ev.comm[..9].copy_from_slice(b"leaky-app");
    ev.pids.cgroup_ino = cgroup_id;
    ev.pids.current = 64;
    ev.pids.limit = 64;
    ev
}

/// The answer to an A query for `web.test` (NOERROR, no records), as the DNS program reports
/// it with its send.
fn dns_answer(cgroup_id: u64, i: u32) -> DnsQueryEvent {
    // SAFETY: as above.
    let mut ev: DnsQueryEvent = unsafe { std::mem::zeroed() };
    let id = (i & 0xffff) as u16;
    let mut msg = vec![
        (id >> 8) as u8,
        id as u8,
        0x81,
        0x80,
        0,
        1,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    msg.extend_from_slice(b"\x03web\x04test\x00\x00\x01\x00\x01");
    ev.key = DnsKey {
        socket_cookie: u64::from(i),
        id,
        _pad: [0; 6],
    };
    ev.send = DnsSend {
        sent_ns: 1_000_000 + u64::from(i) * 1000,
        cgroup_id,
        family: 4,
        server_port: 53,
        dns_len: msg.len() as u16,
        server: [10, 96, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ..DnsSend::default()
    };
    ev.done_ns = ev.send.sent_ns + 300_000;
    ev.outcome = OUTCOME_ANSWERED;
    ev.dns_len = msg.len() as u32;
    ev.captured = msg.len() as u32;
    ev.payload[..msg.len()].copy_from_slice(&msg);
    ev
}

fn report(kind: &str, n: u32, took: Duration) {
    println!(
        "{kind}: {n} events in {:.3} s: {:.0} events/s per core, {:.2} µs per event",
        took.as_secs_f64(),
        f64::from(n) / took.as_secs_f64(),
        took.as_secs_f64() * 1e6 / f64::from(n)
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut attributor = rt.block_on(Attributor::new(CgroupFs::discover()?, &args.pods));
    let metrics = Metrics::new(2000)?;
    let mut recorder = Recorder::new("replay");
    let cgroup_id = own_cgroup_id();
    let mut sink = Vec::with_capacity(1 << 20);

    let mut enricher = Enricher::new();
    let clones: Vec<CloneFailureEvent> = (0..args.count)
        .map(|i| clone_failure(cgroup_id, i))
        .collect();
    let start = Instant::now();
    for ev in &clones {
        let event = Event::CloneFailure(enricher.enrich(ev, &mut attributor));
        metrics.event(&event);
        recorder.event(&event);
        sink.extend_from_slice(&probe_user::text::json_line(&event)?);
        if sink.len() > 1 << 20 {
            sink.clear();
        }
    }
    report("clone_failure", args.count, start.elapsed());

    let mut tracker = DnsTracker::new(Duration::from_secs(2), Names::Full);
    let answers: Vec<DnsQueryEvent> = (0..args.count).map(|i| dns_answer(cgroup_id, i)).collect();
    let start = Instant::now();
    let mut queries = 0u32;
    for ev in &answers {
        if let Some(q) = tracker.on_event(ev, &mut attributor) {
            let event = Event::DnsQuery(q);
            metrics.event(&event);
            recorder.event(&event);
            queries += 1;
        }
    }
    report(
        "dns_query (metrics, no event line)",
        queries,
        start.elapsed(),
    );
    anyhow::ensure!(
        queries == args.count,
        "only {queries} of {} answers became queries",
        args.count
    );
    Ok(())
}
