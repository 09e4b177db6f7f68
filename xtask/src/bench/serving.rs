//! The daemon's port under the worst attack of `probe-user/tests/hostile_http.rs`: a large
//! node's exposition (2,000 workloads, each with a fork and an answered DNS query) and 256
//! connections from 16 pods that ask for `/metrics` and never read, renewed every 1.5 s so
//! that new expositions are encoded while old ones are held. Measured: `/healthz` latency from
//! 127.0.0.1 every 100 ms (the kubelet's probe), the daemon's RSS before, at most and its
//! high-water mark, and the kernel's send queues of its connections. The pods are peers at
//! 198.18.0.1-16 (the benchmarking range) put on `lo` for the measurement and removed after
//! (the one change to the host's namespace; without them the attack comes from loopback
//! peers, which share the node's 32 slots, and says so).

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::fd::FromRawFd as _,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    Env, Findings, Tool, clone_counts, free_port,
    measure::{Agent, BenchCgroup, Ready, cgroup2_root, http_get, metric_sum, run_measured},
    start,
};

/// Pods' container cgroups under one top directory, removed deepest first on drop.
struct PodCgroups {
    top: PathBuf,
    leaves: Vec<PathBuf>,
}

impl PodCgroups {
    fn create(n: u32) -> anyhow::Result<PodCgroups> {
        let top = cgroup2_root()?.join(format!("faultline-bench-http-{}", std::process::id()));
        let mut pods = PodCgroups {
            top: top.clone(),
            leaves: Vec::new(),
        };
        for i in 0..n {
            let leaf = top.join(format!(
                "kubepods/besteffort/pod{:08x}-0000-4000-8000-{i:012x}/{}",
                std::process::id(),
                "c0c00c6b1a2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f"
            ));
            std::fs::create_dir_all(&leaf)
                .with_context(|| format!("creating {}", leaf.display()))?;
            pods.leaves.push(leaf);
        }
        Ok(pods)
    }
}

impl Drop for PodCgroups {
    fn drop(&mut self) {
        for leaf in &self.leaves {
            let _ = std::fs::remove_dir(leaf);
            if let Some(pod) = leaf.parent() {
                let _ = std::fs::remove_dir(pod);
            }
        }
        for dir in ["kubepods/besteffort", "kubepods", ""] {
            let _ = std::fs::remove_dir(self.top.join(dir));
        }
    }
}

/// 198.18.0.1..=16 on `lo` while it lives: pods, for the daemon (neither loopback nor the
/// address connected to).
struct PodAddresses(Vec<Ipv4Addr>);

impl PodAddresses {
    fn add() -> Option<PodAddresses> {
        let mut added = PodAddresses(Vec::new());
        for i in 1..=16 {
            let a = Ipv4Addr::new(198, 18, 0, i);
            let ok = Command::new("ip")
                .args(["addr", "replace", &format!("{a}/32"), "dev", "lo"])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return None;
            }
            added.0.push(a);
        }
        Some(added)
    }
}

impl Drop for PodAddresses {
    fn drop(&mut self) {
        for a in &self.0 {
            let _ = Command::new("ip")
                .args(["addr", "del", &format!("{a}/32"), "dev", "lo"])
                .status();
        }
    }
}

/// A connection to 127.0.0.1:`port` from `from`, with a 4 KiB receive buffer (a reader that
/// never reads stalls the daemon's sends at once).
fn connect_from(from: Ipv4Addr, port: u16) -> Option<TcpStream> {
    let sockaddr = |addr: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let rcvbuf: libc::c_int = 4096;
    // SAFETY: a fresh socket, configured, bound and connected with valid structs; owned by the
    // TcpStream from then on, closed here on failure.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let (local, remote) = (sockaddr(from, 0), sockaddr(Ipv4Addr::LOCALHOST, port));
        if libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const rcvbuf).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) != 0
            || libc::bind(fd, (&raw const local).cast(), len) != 0
            || libc::connect(fd, (&raw const remote).cast(), len) != 0
        {
            libc::close(fd);
            return None;
        }
        Some(TcpStream::from_raw_fd(fd))
    }
}

/// One /healthz from 127.0.0.1: how long until the whole answer, if it was a 200.
fn healthz(port: u16) -> Option<Duration> {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(5),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /healthz HTTP/1.0\r\nHost: node\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.starts_with("HTTP/1.0 200").then(|| started.elapsed())
}

/// Bytes in the kernel's send queues of the connections accepted on `port` (tx_queue of
/// /proc/net/tcp, the listener left out).
fn send_queued(port: u16) -> u64 {
    let local = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1)?.ends_with(&local) && f.get(3)? != &"0A").then_some(())?;
            u64::from_str_radix(f.get(4)?.split(':').next()?, 16).ok()
        })
        .sum()
}

/// A fork and an answered DNS query in each pod's cgroup.
fn activity(env: &Env, pods: &PodCgroups) -> anyhow::Result<()> {
    let lab = env.bin.join("faultline-lab");
    let mut hop = Command::new(&lab);
    hop.args(["hop", "1", "--comm", "fl-bench-http"]);
    for leaf in &pods.leaves {
        hop.arg("--cgroup").arg(leaf);
    }
    run_measured(&mut hop)?;
    let server = "127.53.7.7:53";
    let _responder = Agent::start(
        "DNS server",
        Command::new(&lab).args(["dns-server", "300", "--dns-listen", server]),
        Ready::Stderr("DNS responder"),
    )?;
    for leaf in &pods.leaves {
        run_measured(
            Command::new(&lab)
                .args(["dns-client", "1", "--dns-server", server, "--cgroup"])
                .arg(leaf),
        )?;
    }
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

/// The attack and its measurements, written as a section of BENCHMARKS.md.
pub fn run(env: &Env, doc: &mut String, found: &mut Findings) -> anyhow::Result<()> {
    let (workloads, secs) = if env.quick { (200, 3) } else { (2000, 10) };
    let pods = PodCgroups::create(workloads)?;
    let port = free_port()?;
    let agent = start(env, Tool::Faultline, port)?.context("faultline")?;
    activity(env, &pods)?;
    // Every pod's queries counted (or no more for 5 s): the exposition is as large as it gets.
    let ours = format!("pod=\"{:08x}-0000-4000-8000-", std::process::id());
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut counted, mut since_change) = (0, Instant::now());
    let exposition = loop {
        let m = http_get(port, "/metrics").context("faultline's /metrics")?;
        let now = m
            .lines()
            .filter(|l| l.starts_with("faultline_dns_queries_total{") && l.contains(&ours))
            .count();
        if now != counted {
            (counted, since_change) = (now, Instant::now());
        }
        if counted >= workloads as usize * 9 / 10 || since_change.elapsed() > Duration::from_secs(5)
        {
            break m.len();
        }
        if Instant::now() > deadline {
            bail!("the {workloads} pods' DNS queries never showed in /metrics ({counted} did)");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let (before, _) = agent.rss_kib();
    let addresses = PodAddresses::add();
    let peers: Vec<Ipv4Addr> = match &addresses {
        Some(a) => a.0.clone(),
        None => {
            eprintln!("bench: could not add pod addresses to lo: attacking from loopback peers");
            (1..=16).map(|i| Ipv4Addr::new(127, 0, 1, i)).collect()
        }
    };
    // A failure storm at the same time: the events are read on a thread of their own, so the
    // attack on the port must not cost them.
    let storm_cg = BenchCgroup::pids("faultline-bench-http-storm", 1)?;
    let storm_failures: u32 = if env.quick { 2_000 } else { 100_000 };
    let (d0, l0) = clone_counts(port)?;
    let mut storm = Command::new(env.bin.join("faultline-lab"))
        .args(["threads", "4", "--comm", "fl-http-storm", "--max-failures"])
        .arg(storm_failures.to_string())
        .arg("--cgroup")
        .arg(&storm_cg.dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting the storm")?;
    let mut held = std::collections::VecDeque::new();
    let mut latencies = Vec::new();
    let (mut most_rss, mut most_queued, mut opened, mut failed) = (before, 0, 0usize, 0usize);
    let started = Instant::now();
    let mut next_wave = started;
    while started.elapsed() < Duration::from_secs(secs) {
        if Instant::now() >= next_wave {
            for _ in 0..if opened == 0 { 256 } else { 64 } {
                let from = peers[opened % peers.len()];
                opened += 1;
                if let Some(mut c) = connect_from(from, port)
                    && c.write_all(b"GET /metrics HTTP/1.1\r\nHost: node\r\n\r\n")
                        .is_ok()
                {
                    held.push_back(c);
                }
                while held.len() > 256 {
                    held.pop_front();
                }
            }
            next_wave += Duration::from_millis(1500);
        }
        match healthz(port) {
            Some(took) => latencies.push(took),
            None => failed += 1,
        }
        most_rss = most_rss.max(agent.rss_kib().0);
        most_queued = most_queued.max(send_queued(port));
        std::thread::sleep(Duration::from_millis(100));
    }
    storm.wait().context("waiting for the storm")?;
    // Every failure delivered or counted lost (or no change for 3 s).
    let (mut delivered, mut lost) = (0.0, 0.0);
    let (mut last, mut still) = ((f64::NAN, f64::NAN), 0);
    for _ in 0..240 {
        let (d, l) = clone_counts(port)?;
        (delivered, lost) = (d - d0, l - l0);
        still = if (d, l) == last { still + 1 } else { 0 };
        if delivered + lost >= f64::from(storm_failures) || still >= 12 {
            break;
        }
        last = (d, l);
        std::thread::sleep(Duration::from_millis(250));
    }
    drop(storm_cg);
    let (_, hwm) = agent.rss_kib();
    let metrics = http_get(port, "/metrics").unwrap_or_default();
    let shed = |reason: &str| {
        metric_sum(
            &metrics,
            "faultline_http_shed_connections_total",
            &format!("reason=\"{reason}\""),
        )
    };
    let (slots_full, slow_reader) = (shed("slots_full"), shed("slow_reader"));
    drop(held);
    agent.stop()?;
    drop(addresses);
    drop(pods);
    latencies.sort();
    let p50 = latencies
        .get(latencies.len() / 2)
        .copied()
        .unwrap_or_default();
    let max = latencies.last().copied().unwrap_or_default();
    let probes = latencies.len() + failed;
    found.healthz_under_attack = Some((max.as_secs_f64() * 1e3, failed));
    found.rss_under_attack_mib = mib(hwm << 10);
    let from = if addresses_were_pods(&peers) {
        "16 pods (198.18.0.1-16 on lo)"
    } else {
        "16 loopback peers (the node's slots: 32)"
    };
    eprintln!(
        "bench: serving under attack: a storm of {storm_failures}: {delivered} delivered, {lost} lost"
    );
    eprintln!(
        "bench: serving under attack: /healthz p50 {p50:?} max {max:?}, {failed} failed; RSS {:.1} -> {:.1} MiB (peak {:.1})",
        mib(before << 10),
        mib(most_rss << 10),
        mib(hwm << 10)
    );
    writeln!(
        doc,
        "## Serving under attack\n\n`faultline run` with {workloads} workloads (each a fork and an answered DNS query; {counted} with their DNS series by then: a {:.1} MB exposition), while {from} hold 256 connections that ask for `/metrics` and never read (4 KiB receive buffers), renewed by 64 every 1.5 s so that new expositions are encoded while old ones are held ({opened} connections in {secs} s), and a pod failing {storm_failures} thread creations as fast as it can (4 threads, pids limit 1); `/healthz` from 127.0.0.1 every 100 ms, as the kubelet probes. The DaemonSet's memory limit is 128 MiB.\n\n| measure | value |\n|---|---|\n| `/healthz` latency, p50 / max ({probes} probes) | {:.2} ms / {:.2} ms |\n| `/healthz` probes not answered 200 within 5 s | {failed} |\n| RSS before the attack | {:.1} MiB |\n| RSS at most during the attack (sampled every 100 ms) / high-water mark | {:.1} MiB / {:.1} MiB |\n| kernel send queues of its connections, at most | {:.1} MiB |\n| connections shed: slots_full / slow_reader | {slots_full:.0} / {slow_reader:.0} |\n| the storm's failures delivered / lost (counted) | {delivered:.0} / {lost:.0} |\n",
        exposition as f64 / 1e6,
        p50.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3,
        mib(before << 10),
        mib(most_rss << 10),
        mib(hwm << 10),
        mib(most_queued),
    )?;
    Ok(())
}

fn addresses_were_pods(peers: &[Ipv4Addr]) -> bool {
    peers.first().is_some_and(|p| !p.is_loopback())
}
