//! The daemon's port against the node's pods: each test is one attack that used to work (a
//! connection cap anyone could fill, slow readers that bloated the daemon to an OOM kill,
//! `/explain` with a new window each time), bounded in count and time, while the kubelet's
//! `/healthz` probe must answer every time within 1 s (scaled by `pace()` in an emulated VM)
//! and Prometheus must be able to scrape. The daemon listens on every address, as with
//! hostNetwork; pods are peers at addresses of the benchmarking range (198.18.0.0/15) put on
//! `lo` for the test and removed after, the node is 127.0.0.1 and the machine's own address.
//! Root only.
#![allow(clippy::unwrap_used)] // a test fails by panicking: helpers outside #[test] fns unwrap too

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use probe_user::attribution::cgroups::Hierarchy;
use probe_user::export::{connections::MAX_CONNECTIONS, serve::SEND_BUFFER};

/// One attack at a time: each fills the daemon's slots, and one limits memory.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The DaemonSet's memory limit (deploy/daemonset.yaml).
const DAEMONSET_MEMORY: u64 = 128 << 20;

/// How long each attack lasts while the probes go on.
const ATTACK: Duration = Duration::from_secs(10);

/// The kubelet's promise: /healthz within 1 s (an emulated VM runs everything slower).
fn healthz_deadline() -> Duration {
    Duration::from_secs(pace())
}

/// A GET over HTTP/1.0 to `to`: (status, body length, how long it took), or why not.
fn timed_get(
    to: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, usize, Duration), String> {
    let started = Instant::now();
    let mut conn = TcpStream::connect_timeout(&to, timeout).map_err(|e| format!("connect: {e}"))?;
    conn.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: node\r\n\r\n").map_err(|e| format!("write: {e}"))?;
    let mut text = Vec::new();
    conn.read_to_end(&mut text)
        .map_err(|e| format!("read after {:?}: {e}", started.elapsed()))?;
    let took = started.elapsed();
    let head_end = text
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no response head: {:?}", String::from_utf8_lossy(&text)))?;
    let status = std::str::from_utf8(&text[..head_end])
        .ok()
        .and_then(|h| h.split_whitespace().nth(1)?.parse().ok())
        .ok_or("no status")?;
    Ok((status, text.len() - head_end - 4, took))
}

/// The kubelet's probe from `to`'s side of the node: 200 within the deadline, or a panic
/// saying what happened; how long it took.
fn probe(to: SocketAddr) -> Duration {
    let deadline = healthz_deadline();
    // The read timeout alone would let a slow connect and a slow read add up.
    match timed_get(to, "/healthz", deadline) {
        Ok((200, _, took)) if took <= deadline => took,
        other => panic!("/healthz at {to}: {other:?} (deadline {deadline:?})"),
    }
}

/// The machine's first IPv4 address that is not on a loopback interface: the node's own,
/// which the kubelet's probes come from when the daemon has hostNetwork.
fn node_address() -> Option<Ipv4Addr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list that freeifaddrs releases; read only in between.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return None;
        }
        let mut found = None;
        let mut cur = list;
        while let Some(ifa) = cur.as_ref() {
            let up = ifa.ifa_flags & libc::IFF_UP as u32 != 0;
            let loopback = ifa.ifa_flags & libc::IFF_LOOPBACK as u32 != 0;
            if up
                && !loopback
                && !ifa.ifa_addr.is_null()
                && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET
            {
                let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                found = Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
                break;
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(list);
        found
    }
}

/// Addresses of pods for the test: 198.18.0.1..=n on `lo`, removed on drop. They are neither
/// loopback nor the address connected to, so the daemon counts their connections as any
/// pod's.
struct PodAddresses(Vec<Ipv4Addr>);

impl PodAddresses {
    /// None where `ip` cannot add them (then the attacks come from loopback only).
    fn add(n: u8) -> Option<PodAddresses> {
        let mut added = PodAddresses(Vec::new());
        for i in 1..=n {
            let a = Ipv4Addr::new(198, 18, 0, i);
            let ok = Command::new("ip")
                .args(["addr", "replace", &format!("{a}/32"), "dev", "lo"])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!("could not add {a} to lo: attacking from loopback only");
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

/// The peers of an attack: 16 loopback addresses (the node's own processes and hostNetwork
/// pods) and, where they could be added, 16 pods.
fn attackers(pods: &Option<PodAddresses>) -> Vec<Ipv4Addr> {
    let mut peers: Vec<Ipv4Addr> = (1..=16).map(|i| Ipv4Addr::new(127, 0, 1, i)).collect();
    if let Some(p) = pods {
        peers.extend(&p.0);
    }
    peers
}

/// `faultline run` on every address of the node (as with hostNetwork), behind `prefix`, ready;
/// its stderr drained into the returned log (the last lines, for a failure's message).
fn start_daemon(prefix: &[String], extra: &[&str]) -> (Daemon, Arc<Mutex<Vec<String>>>) {
    require_root();
    let port = free_port();
    let argv: Vec<String> = prefix
        .iter()
        .cloned()
        .chain(faultline_argv(false))
        .collect();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    as_shipped(&mut cmd);
    let health = run_departures(&mut cmd);
    let mut child = cmd
        // Departure: a port of its own, on every address as with hostNetwork; no API.
        .args(["--listen", &format!("0.0.0.0:{port}"), "--no-kube-api"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting faultline run");
    let log = Arc::new(Mutex::new(Vec::new()));
    if let Some(stderr) = child.stderr.take() {
        let log = log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                if log.len() >= 50 {
                    log.remove(0);
                }
                log.push(line);
            }
        });
    }
    let daemon = Daemon {
        child,
        port,
        health: Some(health),
    };
    eventually(Duration::from_secs(60), "/readyz", || {
        http_get(port, "/readyz").filter(|(s, _)| *s == 200)
    });
    (daemon, log)
}

fn alive(daemon: &mut Daemon, log: &Mutex<Vec<String>>) {
    let status = daemon.child.try_wait().expect("waiting on faultline");
    assert!(
        status.is_none(),
        "faultline run exited ({status:?}); its last lines:\n{}",
        log.lock().map(|l| l.join("\n")).unwrap_or_default()
    );
}

/// The value of one exact series (`name{labels}`) in an exposition, if present.
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// A memory field of /proc/<pid>/status (VmRSS, VmHWM), in bytes.
fn vm(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib << 10)
}

/// VmRSS of a process, in bytes.
fn rss(pid: u32) -> u64 {
    vm(pid, "VmRSS")
}

/// Bytes in the kernel's send queues of the connections accepted on `port` (IPv4), from
/// /proc/net/tcp's tx_queue.
fn send_queued(port: u16) -> u64 {
    let local = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // local_address rem_address st tx_queue:rx_queue; st 0A is the listener.
            (f.get(1)?.ends_with(&local) && f.get(3)? != &"0A").then_some(())?;
            u64::from_str_radix(f.get(4)?.split(':').next()?, 16).ok()
        })
        .sum()
}

/// Probes /healthz at every address in `at` every 200 ms for ATTACK, while `attack` runs (it
/// gets a flag that says when to stop): returns the probes' times, sorted.
fn probe_during(at: &[SocketAddr], attack: impl FnOnce(&AtomicBool) + Send) -> Vec<Duration> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let attacker = s.spawn(|| attack(&stop));
        let started = Instant::now();
        let mut times = Vec::new();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            while started.elapsed() < ATTACK {
                for to in at {
                    times.push(probe(*to));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }));
        stop.store(true, Ordering::Relaxed);
        let attacked = attacker.join();
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
        if let Err(panic) = attacked {
            std::panic::resume_unwind(panic);
        }
        times.sort();
        times
    })
}

/// Where the kubelet probes from: loopback, and the node's own address when it has one.
fn probe_addresses(port: u16) -> Vec<SocketAddr> {
    let mut at = vec![SocketAddr::from(([127, 0, 0, 1], port))];
    match node_address() {
        Some(node) => at.push(SocketAddr::from((node, port))),
        None => eprintln!("no non-loopback address on this machine: probing loopback only"),
    }
    at
}

fn summary(times: &[Duration]) -> String {
    format!(
        "{} probes, p50 {:?}, max {:?}",
        times.len(),
        times.get(times.len() / 2).copied().unwrap_or_default(),
        times.last().copied().unwrap_or_default()
    )
}

/// (a) 16 loopback peers and 16 pods with 16 silent connections each, reconnecting as the
/// daemon sheds them: more than every slot there is, for 10 s.
#[test]
fn silent_connections_from_every_peer_cannot_keep_out_the_kubelet_or_prometheus() {
    let _serial = serial();
    probe_user::export::serve::raise_fd_limit();
    let pods = PodAddresses::add(16);
    let (mut daemon, log) = start_daemon(&[], &[]);
    let port = daemon.port;
    let peers = attackers(&pods);
    let at = probe_addresses(port);
    let times = probe_during(&at, |stop| {
        let mut held = std::collections::VecDeque::new();
        let mut opened = 0usize;
        let until = Instant::now() + ATTACK + Duration::from_secs(5);
        // 16 per peer at first, then a new one every 2 ms round the peers (the oldest let go
        // past 16 per peer): at most ~5,000 connections over the attack.
        while !stop.load(Ordering::Relaxed) && Instant::now() < until && opened < 8000 {
            let from = peers[opened % peers.len()];
            if let Some(c) = connect_from(from, Ipv4Addr::LOCALHOST, port, None) {
                held.push_back(c);
            }
            opened += 1;
            if held.len() > 16 * peers.len() {
                held.pop_front();
            }
            if opened > 16 * peers.len() {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        eprintln!("attack: {opened} silent connections opened");
    });
    eprintln!("/healthz during the attack: {}", summary(&times));
    // Prometheus scrapes, from wherever it is.
    for to in &at {
        let (status, len, took) =
            timed_get(*to, "/metrics", Duration::from_secs(10 * pace())).expect("scrape");
        assert_eq!(status, 200, "/metrics at {to}");
        assert!(len > 1000, "/metrics at {to}: {len} bytes");
        eprintln!("/metrics at {to}: {len} bytes in {took:?}");
    }
    alive(&mut daemon, &log);
    let metrics = daemon.metrics();
    let shed = sample(
        &metrics,
        "faultline_http_shed_connections_total{reason=\"slots_full\"}",
    )
    .unwrap_or(0.0);
    assert!(shed >= 100.0, "slots_full {shed}");
    drop(pods);
}

/// A memory limit around the daemon, as the DaemonSet's (128 MiB): its own memory cgroup,
/// joined before the launcher runs (cgroup v1's `memory`, which the as-deployed launcher does
/// not move it out of, or v2 when not as deployed), or, as deployed on cgroup v2, the
/// launcher's shared cgroup `faultline-as-deployed`, its old limit restored on drop.
struct MemoryLimit {
    dir: PathBuf,
    v2: bool,
    /// What puts the daemon into it (empty when the launcher does).
    prefix: Vec<String>,
    /// The cgroup made for the test (removed on drop), or the shared one's old limit.
    own: Option<TempCgroup>,
    restore: Option<String>,
}

impl MemoryLimit {
    fn new(bytes: u64) -> Option<MemoryLimit> {
        let Some((mount, v2)) = mount(Hierarchy::Memory) else {
            eprintln!("no memory controller: the daemon runs without a limit");
            return None;
        };
        let limit_file = if v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        if v2 && AS_DEPLOYED.is_some() {
            let dir = mount.join("faultline-as-deployed");
            let _ = std::fs::create_dir(&dir);
            let _ = std::fs::write(mount.join("cgroup.subtree_control"), "+memory");
            let Ok(old) = std::fs::read_to_string(dir.join(limit_file)) else {
                eprintln!("no memory controller for {}: no limit", dir.display());
                return None;
            };
            std::fs::write(dir.join(limit_file), bytes.to_string()).expect("memory.max");
            return Some(MemoryLimit {
                dir,
                v2,
                prefix: Vec::new(),
                own: None,
                restore: Some(old.trim().to_owned()),
            });
        }
        let cg = TempCgroup::new(&mount, &unique("http-memory"));
        if !cg.dir.join(limit_file).exists() {
            eprintln!("no memory controller for {}: no limit", cg.dir.display());
            return None;
        }
        cg.write(limit_file, &bytes.to_string());
        let procs = cg.dir.join("cgroup.procs").display().to_string();
        Some(MemoryLimit {
            dir: cg.dir.clone(),
            v2,
            prefix: vec![
                "sh".to_owned(),
                "-c".to_owned(),
                r#"echo $$ > "$0" && exec "$@""#.to_owned(),
                procs,
            ],
            own: Some(cg),
            restore: None,
        })
    }

    /// OOM kills in the cgroup so far.
    fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        std::fs::read_to_string(self.dir.join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The cgroup's peak usage, where the kernel keeps one.
    fn peak(&self) -> Option<u64> {
        let file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        std::fs::read_to_string(self.dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for MemoryLimit {
    fn drop(&mut self) {
        if let Some(old) = &self.restore {
            let _ = std::fs::write(self.dir.join("memory.max"), old);
        }
        drop(self.own.take());
    }
}

const CID: &str = "b0b00c6b1a2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f";

/// Pods' container cgroups and the shared levels above them: fields drop in order, so the
/// pods go first, then the shared levels (also when a test fails).
struct Workloads {
    trees: Vec<CgroupTree>,
    _base: CgroupTree,
}

/// `n` pods' container cgroups (v2), each with one fork counted in it: a large node's
/// exposition. Removed on drop (pods first, then the shared levels).
fn workloads(n: u32) -> Workloads {
    let (unified, _) = mount(Hierarchy::Unified).expect("cgroup v2");
    let base = CgroupTree::new(
        &unified,
        &format!("{}/kubepods/besteffort", unique("http-pods")),
    );
    let trees: Vec<CgroupTree> = (0..n)
        .map(|i| {
            let uid = format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), i);
            CgroupTree::new(&base.leaf().dir, &format!("pod{uid}/{CID}"))
        })
        .collect();
    Workloads { trees, _base: base }
}

/// Activity in each of `trees`: a fork, and a DNS query answered (a query counter and a
/// latency histogram per workload: ~3 KB of exposition each).
fn activity_in(trees: &[CgroupTree]) {
    let mut args = vec!["hop", "1", "--comm", "fl-http"];
    let dirs: Vec<String> = trees
        .iter()
        .map(|t| t.leaf().dir.display().to_string())
        .collect();
    for d in &dirs {
        args.extend(["--cgroup", d]);
    }
    let report = lab(&args);
    assert_eq!(report.created, trees.len() as u64, "{report:?}");
    // An address of this test's own, so that no other test's responder answers.
    let pid = std::process::id();
    let server = format!("127.53.{}.{}:53", pid % 250, 1 + pid / 250 % 250);
    let responder = Lab::spawn(&["dns-server", "60", "--dns-listen", &server]);
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    for d in &dirs {
        let report = lab(&["dns-client", "1", "--dns-server", &server, "--cgroup", d]);
        assert_eq!(report.created, 1, "a DNS query from {d}: {report:?}");
    }
    eprintln!(
        "{} DNS queries from as many pods in {:?}",
        dirs.len(),
        started.elapsed()
    );
    drop(responder);
}

/// (b) 2,000 workloads (a multi-megabyte exposition), the daemon inside the DaemonSet's
/// 128 MiB, and 16 pods x 16 connections that ask for /metrics and never read, renewed every
/// 1.5 s so that new expositions are encoded while old ones are still held.
#[test]
fn slow_readers_of_a_large_exposition_stay_within_the_daemonsets_memory() {
    let _serial = serial();
    probe_user::export::serve::raise_fd_limit();
    let pods = PodAddresses::add(16);
    let pods_cgroups = workloads(2000);
    let trees = &pods_cgroups.trees;
    let limit = MemoryLimit::new(DAEMONSET_MEMORY);
    let kills_before = limit.as_ref().map_or(0, MemoryLimit::oom_kills);
    let prefix = limit.as_ref().map(|l| l.prefix.clone()).unwrap_or_default();
    let (mut daemon, log) = start_daemon(&prefix, &[]);
    let (port, pid) = (daemon.port, daemon.child.id());
    activity_in(trees);
    // The pods' uids (`workloads`) begin with this, and nothing names them: each is
    // `pod-<first 8 of its uid>` (told apart by its workload, `pod <uid>/...`).
    let ours = format!("pod=\"pod-{:08x}\"", std::process::id());
    let exposition = eventually(
        Duration::from_secs(60 * pace()),
        "1,800 workloads in /metrics",
        || {
            let m = daemon.metrics();
            let of = |family: &str| {
                m.lines()
                    .filter(|l| l.starts_with(family) && l.contains(&ours))
                    .count()
            };
            (of("faultline_tasks_created_total{") >= 1800
                && of("faultline_dns_queries_total{") >= 1800)
                .then_some(m.len())
        },
    );
    let before = rss(pid);
    eprintln!(
        "exposition {:.1} MB; daemon RSS {:.1} MiB before the attack",
        exposition as f64 / 1e6,
        before as f64 / 1048576.0
    );
    // Pods where they could be added, else loopback peers.
    let peers: Vec<Ipv4Addr> = attackers(&pods).into_iter().rev().take(16).collect();
    let at = probe_addresses(port);
    let most_rss = Arc::new(Mutex::new(before));
    let most_queued = Arc::new(Mutex::new(0u64));
    let (watch_rss, watch_queued) = (most_rss.clone(), most_queued.clone());
    let times = probe_during(&at, move |stop| {
        let mut held = std::collections::VecDeque::new();
        let mut opened = 0usize;
        let mut wave = 0;
        let until = Instant::now() + ATTACK + Duration::from_secs(5);
        while !stop.load(Ordering::Relaxed) && Instant::now() < until && wave < 12 {
            // 256 at first, then 64 new ones a wave (the oldest let go by the test too).
            let n = if wave == 0 { 256 } else { 64 };
            for _ in 0..n {
                let from = peers[opened % peers.len()];
                opened += 1;
                let Some(mut c) = connect_from(from, Ipv4Addr::LOCALHOST, port, Some(4096)) else {
                    continue;
                };
                if c.write_all(b"GET /metrics HTTP/1.1\r\nHost: node\r\n\r\n")
                    .is_ok()
                {
                    held.push_back(c);
                }
                while held.len() > 256 {
                    held.pop_front();
                }
            }
            wave += 1;
            let next = Instant::now() + Duration::from_millis(1500);
            while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                let (r, q) = (rss(pid), send_queued(port));
                let mut most = watch_rss.lock().unwrap_or_else(|e| e.into_inner());
                *most = (*most).max(r);
                let mut most_q = watch_queued.lock().unwrap_or_else(|e| e.into_inner());
                *most_q = (*most_q).max(q);
                drop((most, most_q));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        eprintln!("attack: {opened} slow readers in {wave} waves");
    });
    eprintln!("/healthz during the attack: {}", summary(&times));
    let (status, len, took) = timed_get(
        SocketAddr::from(([127, 0, 0, 1], port)),
        "/metrics",
        Duration::from_secs(20 * pace()),
    )
    .expect("scrape after the attack");
    assert_eq!(status, 200);
    eprintln!("/metrics: {len} bytes in {took:?}");
    alive(&mut daemon, &log);
    let most_rss = *most_rss.lock().unwrap_or_else(|e| e.into_inner());
    let most_queued = *most_queued.lock().unwrap_or_else(|e| e.into_inner());
    let peak = limit.as_ref().and_then(MemoryLimit::peak);
    eprintln!(
        "daemon RSS at most {:.1} MiB under attack (before {:.1} MiB); memory cgroup peak {}; kernel send queues at most {:.1} MiB",
        most_rss as f64 / 1048576.0,
        before as f64 / 1048576.0,
        peak.map_or("-".to_owned(), |p| format!(
            "{:.1} MiB",
            p as f64 / 1048576.0
        )),
        most_queued as f64 / 1048576.0
    );
    if let Some(l) = &limit {
        assert_eq!(l.oom_kills(), kills_before, "the daemon was OOM-killed");
    }
    // Two expositions and one being encoded, and the connections' bounded buffers: nothing
    // that grows with the readers.
    let allowed = 4 * exposition as u64 + (24 << 20);
    assert!(
        most_rss.saturating_sub(before) <= allowed,
        "RSS grew by {} MiB under attack (allowed {} MiB)",
        most_rss.saturating_sub(before) >> 20,
        allowed >> 20
    );
    // The highest it ever was, its start and the scrapes before the attack included.
    let hwm = vm(pid, "VmHWM");
    eprintln!("daemon VmHWM {:.1} MiB", hwm as f64 / 1048576.0);
    assert!(hwm < DAEMONSET_MEMORY, "VmHWM {hwm}");
    // The kernel doubles SO_SNDBUF; a little over for its own accounting.
    let queue_bound = (MAX_CONNECTIONS * 2 * SEND_BUFFER) as u64 * 5 / 4;
    assert!(
        most_queued <= queue_bound,
        "{most_queued} bytes in the kernel's send queues (bound {queue_bound})"
    );
    let metrics = daemon.metrics();
    eprintln!(
        "shed: slots_full {:?}, slow_reader {:?}, peer_full {:?}",
        sample(
            &metrics,
            "faultline_http_shed_connections_total{reason=\"slots_full\"}"
        ),
        sample(
            &metrics,
            "faultline_http_shed_connections_total{reason=\"slow_reader\"}"
        ),
        sample(
            &metrics,
            "faultline_http_shed_connections_total{reason=\"peer_full\"}"
        ),
    );
    drop(daemon);
    drop(limit);
    drop(pods_cgroups);
    drop(pods);
}

/// (c) `/explain` with a new window every request, from 8 connections at once, for 10 s: the
/// 1 s cache is no help, and the reports are made one at a time.
#[test]
fn explain_with_a_new_window_each_time_cannot_delay_healthz() {
    let _serial = serial();
    let (mut daemon, log) = start_daemon(&[], &[]);
    let port = daemon.port;
    let at = probe_addresses(port);
    let answered = Arc::new(Mutex::new((0usize, 0usize)));
    let tally = answered.clone();
    let times = probe_during(&at, move |stop| {
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let tally = tally.clone();
                s.spawn(move || {
                    for i in 0..5000u64 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        // A window of its own each (within the history's hour).
                        let path = format!("/explain?since={}s", 1 + (t * 5000 + i) % 3600);
                        let status = timed_get(
                            SocketAddr::from(([127, 0, 0, 1], port)),
                            &path,
                            Duration::from_secs(30),
                        )
                        .map(|(s, _, _)| s);
                        let mut tally = tally.lock().unwrap_or_else(|e| e.into_inner());
                        match status {
                            Ok(200) => tally.0 += 1,
                            Ok(503) => tally.1 += 1,
                            other => panic!("{path}: {other:?}"),
                        }
                    }
                });
            }
        });
    });
    let (ok, busy) = *answered.lock().unwrap_or_else(|e| e.into_inner());
    eprintln!(
        "/explain: {ok} answered, {busy} busy; /healthz: {}",
        summary(&times)
    );
    assert!(ok >= 8, "{ok} /explain answers in {ATTACK:?}");
    alive(&mut daemon, &log);
}
