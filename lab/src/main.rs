//! faultline-lab: reproduces real task-creation failures so faultline can be checked against
//! them (integration tests, benchmarks, or an SRE trying faultline on a node).
//!
//! It joins the cgroups it is given, sets its command name, optionally drops to a uid under an
//! RLIMIT_NPROC or moves into a fresh pid namespace, then creates threads or processes until
//! the kernel refuses. It prints one JSON line: its pid (as the node sees it), how many tasks
//! it created and the errno of each failure. Every task it made is ended before it exits.

mod pods;

use std::{io::Write as _, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// pthread_create (glibc: clone3 with CLONE_THREAD).
    Threads,
    /// fork() (glibc: the clone syscall).
    Forks,
    /// The fork syscall itself.
    SysForks,
    /// Fill with forks until refused, then try vfork().
    Vforks,
    /// Create `count` cgroups under --churn-root one after another; in each, fork one
    /// short-lived child, then remove the cgroup.
    Churn,
    /// Make `count` pods as the kubelet lays them out (cgroups under each --pods-root, log
    /// directories under --kubelet-logs, a process that creates a thread and has a fork
    /// refused), at most --live at once, then remove them all (`pods.rs`).
    PodChurn,
    /// Join each --cgroup in turn and fork `count` short-lived children in each (many
    /// workloads' worth of task creation from one process).
    Hop,
    /// Benchmark: create and join `count` threads one after another, timed.
    SpinThreads,
    /// Benchmark: fork and reap `count` short-lived processes one after another, timed.
    SpinForks,
    /// A DNS responder on --dns-listen for `count` seconds: SERVFAIL for names starting with
    /// "fail.", NXDOMAIN for "nx.", no answer at all for "lost.", answers after --dns-delay for
    /// names starting with "slow.", truncated (TC) for "big.", NOERROR otherwise.
    DnsServer,
    /// Benchmark: `count` DNS queries, one after another, to --dns-server, timed. With
    /// --dns-burst, all sent at once from the one socket, then the answers awaited.
    DnsClient,
    /// Hold the first `count` packets of NFQUEUE --queue (up to 10 s), then accept them all
    /// at once: packets of one new flow then race to confirm their conntrack entries.
    NfqueueHold,
    /// A pod flooding port 53 of --dns-server from one socket, waiting for nothing: `count`
    /// datagrams that are not DNS queries, then `count` (at most 65,536) well-formed queries
    /// with distinct ids.
    DnsFlood,
    /// A pod forging DNS answers (IPv4, a raw socket): `count` answers, one per transaction
    /// id from 0, to --dns-server (the victim's address and port) from --spoof-from, with
    /// --spoof-rcode, carrying the question --spoof-name (A, IN), or none when it is empty.
    DnsSpray,
}

#[derive(Parser, Debug)]
#[command(
    name = "faultline-lab",
    about = "Reproduce real node failures: task creation, DNS, conntrack"
)]
struct Args {
    #[arg(value_enum)]
    mode: Mode,
    /// Most tasks to create.
    count: u32,
    /// Stop after this many refused creations.
    #[arg(long, default_value_t = 3)]
    max_failures: u32,
    /// Command name to run under (what faultline reports as comm; at most 15 bytes).
    #[arg(long, default_value = "faultline-lab")]
    comm: String,
    /// cgroup directories to join first (v1 or v2): their cgroup.procs gets this process.
    #[arg(long = "cgroup")]
    cgroups: Vec<std::path::PathBuf>,
    /// Drop to this uid (and gid) before creating tasks.
    #[arg(long)]
    uid: Option<u32>,
    /// Set RLIMIT_NPROC to this before dropping privileges.
    #[arg(long)]
    nproc: Option<u64>,
    /// Create the tasks as init of a new pid namespace whose pid_max is this.
    #[arg(long)]
    pidns_pid_max: Option<u32>,
    /// Lower the node's global kernel.pid_max (kernels before 6.14) so that exactly this many
    /// pids are left to allocate, create the tasks, and restore it. Disposable machines only:
    /// while it is low, nothing on the machine can create a task.
    #[arg(long, conflicts_with = "pidns_pid_max")]
    global_pid_max_free: Option<u32>,
    /// Create a pid namespace whose init exits at once, then fork into it (ENOMEM).
    #[arg(long)]
    dead_pidns: bool,
    /// Memory cgroup directory (v1 or v2) to join and limit to its usage plus
    /// --memory-headroom, so that the kernel's own allocations for new tasks fail.
    #[arg(long, requires = "memory_headroom")]
    memory_cgroup: Option<std::path::PathBuf>,
    /// Bytes of room left in --memory-cgroup.
    #[arg(long, requires = "memory_cgroup")]
    memory_headroom: Option<u64>,
    /// Pause between two creations (a slow leak rather than a storm).
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// Operations a second, each at its time from the start (a steady load rather than as
    /// fast as they go): task creations of threads, forks, spin-threads and spin-forks,
    /// dns-client's queries, and pod-churn's pods.
    #[arg(long, conflicts_with = "interval_ms")]
    rate: Option<f64>,
    /// Keep the created tasks alive this long after printing the report.
    #[arg(long, default_value_t = 0)]
    hold_ms: u64,
    /// cgroup v2 directory under which `churn` creates and removes its cgroups.
    #[arg(long)]
    churn_root: Option<std::path::PathBuf>,
    /// pod-churn: a cgroup directory to lay the pods out under (v2 first, then the v1 pids
    /// hierarchy's where pids is v1).
    #[arg(long = "pods-root")]
    pods_roots: Vec<std::path::PathBuf>,
    /// pod-churn: the kubelet's log root (faultline's --kubelet-logs).
    #[arg(long, default_value = "/var/log")]
    kubelet_logs: std::path::PathBuf,
    /// pod-churn: the most pods alive at once.
    #[arg(long, default_value_t = 1)]
    live: u32,
    /// pod-churn: each pod asks one DNS question of --dns-server.
    #[arg(long)]
    pod_dns: bool,
    /// pod-churn: each pod's process moves into a network namespace of its own.
    #[arg(long)]
    pod_netns: bool,
    /// pod-churn: once the last pod is made, print {"live":n} and keep the pods until a line
    /// or the end of stdin.
    #[arg(long)]
    hold: bool,
    /// Address the dns-server mode listens on.
    #[arg(long, default_value = "127.0.0.1:5353")]
    dns_listen: std::net::SocketAddr,
    /// How long the dns-server mode waits before answering "slow." names.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "300ms")]
    dns_delay: std::time::Duration,
    /// Where the dns-client mode sends its queries.
    #[arg(long, default_value = "127.53.0.1:53")]
    dns_server: std::net::SocketAddr,
    /// dns-client: send every query before waiting for any answer.
    #[arg(long)]
    dns_burst: bool,
    /// dns-client: a new socket for each query (a resolver that retries from a new port).
    #[arg(long)]
    dns_new_socket: bool,
    /// dns-client: every query with the first's transaction id (a resolver re-sending one
    /// query, as glibc's does from a new socket with `single-request-reopen`).
    #[arg(long)]
    dns_keep_id: bool,
    /// dns-client: a busy node's mix of names: every 4th query asks nx.bench.test (NXDOMAIN
    /// from dns-server), every 100th lost.bench.test (dns-server never answers it: sent, not
    /// waited for), the others bench.test. The report counts the NXDOMAIN answers.
    #[arg(long)]
    dns_busy_mix: bool,
    /// dns-client: the first query's transaction id; the next ones count up from it.
    #[arg(long, default_value_t = 0)]
    dns_first_id: u16,
    /// dns-client: the question types, cycled through query by query (1 = A).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    dns_qtypes: Vec<u16>,
    /// dns-client: the UDP source port (0: any).
    #[arg(long, default_value_t = 0)]
    dns_source_port: u16,
    /// The NFQUEUE number nfqueue-hold reads.
    #[arg(long, default_value_t = 0)]
    queue: u16,
    /// dns-spray: the forged answers' source (the address a query went to, or any other).
    #[arg(long, default_value = "127.53.0.1:53")]
    spoof_from: std::net::SocketAddr,
    /// dns-spray: the forged answers' question name ("": no question section at all).
    #[arg(long, default_value = "evil.test")]
    spoof_name: String,
    /// dns-spray: the forged answers' response code.
    #[arg(long, default_value_t = 0)]
    spoof_rcode: u8,
}

#[derive(serde::Serialize, Default)]
struct Report {
    /// pid of the process that created the tasks, in the initial pid namespace.
    pid: u32,
    created: u32,
    failures: u32,
    /// The first errnos (a storm makes hundreds of thousands).
    #[serde(serialize_with = "first_errnos")]
    errnos: Vec<i32>,
    /// Wall time of the creation loop (spin modes).
    #[serde(skip_serializing_if = "Option::is_none")]
    elapsed_ns: Option<u64>,
    /// dns-client --dns-busy-mix: the answers (of `created`) that were NXDOMAIN.
    #[serde(skip_serializing_if = "Option::is_none")]
    nxdomain: Option<u32>,
}

/// `--rate`: when each operation is due, counted from the start of the loop.
struct Pace {
    start: std::time::Instant,
    period: Option<std::time::Duration>,
}

impl Pace {
    fn new(rate: Option<f64>) -> anyhow::Result<Pace> {
        let period = match rate {
            Some(r) if r.is_finite() && r > 0.0 => {
                Some(std::time::Duration::from_secs_f64(1.0 / r))
            }
            Some(r) => bail!("--rate {r}: operations a second, more than 0"),
            None => None,
        };
        Ok(Pace {
            start: std::time::Instant::now(),
            period,
        })
    }

    /// Sleeps until operation `i` (from 0) is due; at once when late or unpaced.
    fn wait(&self, i: u32) {
        if let Some(period) = self.period {
            let due = self.start + period * i;
            std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("faultline-lab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    set_comm(&args.comm)?;
    if args.mode == Mode::Hop {
        return hop(&args.cgroups, args.count);
    }
    for dir in &args.cgroups {
        join(dir)?;
    }
    // Thread stacks are mapped and touched before any limit applies: at a memory limit a
    // page fault would wait for memory instead of failing.
    let stacks = if args.mode == Mode::Threads {
        Some(Stacks::new(args.count as usize)?)
    } else {
        None
    };
    let memory_limit = match (&args.memory_cgroup, args.memory_headroom) {
        (Some(dir), Some(headroom)) => Some(MemoryLimit::apply(dir, headroom)?),
        _ => None,
    };
    if let Some(n) = args.nproc {
        let lim = libc::rlimit {
            rlim_cur: n,
            rlim_max: n,
        };
        check(
            // SAFETY: setrlimit with a valid struct.
            unsafe { libc::setrlimit(libc::RLIMIT_NPROC, &lim) },
            "setrlimit(RLIMIT_NPROC)",
        )?;
    }
    if let Some(uid) = args.uid {
        // SAFETY: plain syscalls; gid first, while still privileged.
        check(unsafe { libc::setresgid(uid, uid, uid) }, "setresgid")?;
        // SAFETY: as above, a plain syscall on integers.
        check(unsafe { libc::setresuid(uid, uid, uid) }, "setresuid")?;
    }
    if args.dead_pidns {
        return dead_pidns(args);
    }
    if let Some(pid_max) = args.pidns_pid_max {
        return in_new_pidns(args, stacks.as_ref(), pid_max);
    }
    if let Some(free) = args.global_pid_max_free {
        return with_global_pid_max(args, stacks.as_ref(), free);
    }
    if args.mode == Mode::DnsClient {
        return dns_client(args);
    }
    if args.mode == Mode::DnsFlood {
        return dns_flood(args.dns_server, args.count);
    }
    if args.mode == Mode::DnsSpray {
        return dns_spray(args);
    }
    if args.mode == Mode::NfqueueHold {
        return nfqueue_hold(args.queue, args.count);
    }
    if args.mode == Mode::DnsServer {
        return dns_server(
            args.dns_listen,
            args.dns_delay,
            std::time::Duration::from_secs(args.count.into()),
        );
    }
    if matches!(args.mode, Mode::SpinThreads | Mode::SpinForks) {
        return spin(args.mode, args.count, args.rate);
    }
    if args.mode == Mode::Churn {
        let root = args
            .churn_root
            .as_deref()
            .context("churn needs --churn-root")?;
        return churn(root, args.count);
    }
    if args.mode == Mode::PodChurn {
        return pods::churn(&pods::Churn {
            count: args.count,
            live: args.live,
            rate: args.rate,
            roots: &args.pods_roots,
            kubelet_logs: &args.kubelet_logs,
            dns_server: args.pod_dns.then_some(args.dns_server),
            netns: args.pod_netns,
            hold: args.hold,
        });
    }
    create(args, stacks.as_ref(), || {
        memory_limit.map_or(Ok(()), MemoryLimit::lift)
    })
}

fn join(dir: &std::path::Path) -> anyhow::Result<()> {
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("joining {}", procs.display()))
}

/// Visits each cgroup and forks `count` children there, one at a time.
fn hop(cgroups: &[std::path::PathBuf], count: u32) -> anyhow::Result<()> {
    let mut report = Report {
        pid: node_pid(),
        ..Default::default()
    };
    for dir in cgroups {
        join(dir)?;
        for _ in 0..count {
            report.tally(fork_and_reap()?);
        }
    }
    print_report(&report)
}

/// Answers DNS queries by echoing them as responses: SERVFAIL for `fail.*`, NXDOMAIN for
/// `nx.*`, nothing for `lost.*`, NOERROR (no records) otherwise, after `delay` for `slow.*`.
/// Stops after `lifetime`.
fn dns_server(
    listen: std::net::SocketAddr,
    delay: std::time::Duration,
    lifetime: std::time::Duration,
) -> anyhow::Result<()> {
    let socket = std::net::UdpSocket::bind(listen).with_context(|| format!("binding {listen}"))?;
    socket.set_read_timeout(Some(std::time::Duration::from_millis(200)))?;
    eprintln!("faultline-lab: DNS responder on {listen}");
    let end = std::time::Instant::now() + lifetime;
    let mut buf = [0u8; 512];
    while std::time::Instant::now() < end {
        let Ok((n, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        if n < 12 {
            continue;
        }
        let mut reply = buf[..n].to_vec();
        let name = first_label(&reply).unwrap_or_default();
        reply[2] |= 0x80; // QR
        if name == "big" {
            reply[2] |= 0x02; // TC: too big for UDP, ask again over TCP
        }
        let rcode = match name.as_str() {
            "fail" => 2,
            "nx" => 3,
            "lost" => continue,
            _ => 0,
        };
        reply[3] = 0x80 | rcode; // RA, rcode
        if name == "slow" {
            std::thread::sleep(delay);
        }
        let _ = socket.send_to(&reply, peer);
    }
    Ok(())
}

/// Holds the first `count` packets of an NFQUEUE, then accepts them together.
fn nfqueue_hold(queue_num: u16, count: u32) -> anyhow::Result<()> {
    let mut queue = nfq::Queue::open().context("opening an NFQUEUE netlink socket")?;
    queue
        .bind(queue_num)
        .with_context(|| format!("binding NFQUEUE {queue_num}"))?;
    queue.set_nonblocking(true);
    // Ready: the caller may start sending.
    println!("{{\"ready\":true}}");
    let mut held = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while held.len() < count as usize && std::time::Instant::now() < deadline {
        match queue.recv() {
            Ok(msg) => held.push(msg),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            Err(e) => return Err(e).context("reading NFQUEUE"),
        }
    }
    let mut report = Report {
        pid: node_pid(),
        created: held.len() as u32,
        ..Default::default()
    };
    for mut msg in held {
        msg.set_verdict(nfq::Verdict::Accept);
        if queue.verdict(msg).is_err() {
            report.failures += 1;
        }
    }
    let _ = queue.unbind(queue_num);
    print_report(&report)
}

/// Sends `count` A queries for bench.test (or --dns-busy-mix's names): one at a time, each
/// waiting for its answer (at --rate), or (--dns-burst) all at once, then waits for the answers.
fn dns_client(args: &Args) -> anyhow::Result<()> {
    let (server, count) = (args.dns_server, args.count);
    let any: std::net::IpAddr = if server.is_ipv6() {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    };
    let open = || -> anyhow::Result<std::net::UdpSocket> {
        let socket = std::net::UdpSocket::bind((any, args.dns_source_port))
            .context("binding a UDP socket")?;
        socket
            .connect(server)
            .with_context(|| format!("connecting to {server}"))?;
        socket.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
        Ok(socket)
    };
    let mut socket = open()?;
    let mut report = Report {
        pid: node_pid(),
        nxdomain: args.dns_busy_mix.then_some(0),
        ..Default::default()
    };
    // bench.test, nx.bench.test, lost.bench.test.
    let mut queries = [question(""), question("nx."), question("lost.")];
    let mut buf = [0u8; 512];
    let start = std::time::Instant::now();
    if args.dns_burst {
        let query = &mut queries[0];
        for i in 0..count {
            query[..2].copy_from_slice(&(i as u16).to_be_bytes());
            socket.send(query).context("sending a query")?;
        }
        for _ in 0..count {
            report.tally(socket.recv(&mut buf).is_ok());
        }
        return report.timed(start);
    }
    let pace = Pace::new(args.rate)?;
    for i in 0..count {
        pace.wait(i);
        if args.dns_new_socket && i > 0 {
            socket = open()?;
        }
        let which = match (args.dns_busy_mix, i % 100, i % 4) {
            (true, 1, _) => 2,
            (true, _, 3) => 1,
            _ => 0,
        };
        let query = &mut queries[which];
        let id = if args.dns_keep_id {
            args.dns_first_id
        } else {
            args.dns_first_id.wrapping_add(i as u16)
        };
        query[..2].copy_from_slice(&id.to_be_bytes());
        let qtype = args.dns_qtypes[i as usize % args.dns_qtypes.len().max(1)];
        let at = query.len() - 4;
        query[at..at + 2].copy_from_slice(&qtype.to_be_bytes());
        if which == 2 {
            // Never answered: sent, and not waited for.
            let _ = socket.send(query);
            report.tally(false);
            continue;
        }
        let answered = socket.send(query).is_ok()
            && socket
                .recv(&mut buf)
                .is_ok_and(|n| n >= 4 && buf[..2] == query[..2]);
        if let Some(nx) = report.nxdomain.as_mut()
            && answered
            && buf[3] & 0x0f == 3
        {
            *nx += 1;
        }
        report.tally(answered);
    }
    report.timed(start)
}

/// A query (id 0, recursion desired, type A, class IN) for `prefix` + "bench.test".
fn question(prefix: &str) -> Vec<u8> {
    let mut q = vec![0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in format!("{prefix}bench.test").split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

fn dns_flood(server: std::net::SocketAddr, count: u32) -> anyhow::Result<()> {
    let socket = std::net::UdpSocket::bind(if server.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    })
    .context("binding a UDP socket")?;
    socket
        .connect(server)
        .with_context(|| format!("connecting to {server}"))?;
    let mut report = Report {
        pid: node_pid(),
        ..Default::default()
    };
    let start = std::time::Instant::now();
    // Not queries: a header claiming five questions and two answers, then noise.
    let mut junk = [0x5au8; 48];
    junk[2..12].copy_from_slice(&[0x01, 0x00, 0, 5, 0, 2, 0, 0, 0, 0]);
    for i in 0..count {
        junk[..2].copy_from_slice(&(i as u16).to_be_bytes());
        report.tally(socket.send(&junk).is_ok());
    }
    let mut query = vec![
        0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 5, b'f', b'l', b'o', b'o', b'd', 4, b't', b'e', b's',
        b't', 0, 0, 1, 0, 1,
    ];
    for i in 0..count.min(65_536) {
        query[..2].copy_from_slice(&(i as u16).to_be_bytes());
        report.tally(socket.send(&query).is_ok());
    }
    report.timed(start)
}

/// Forged answers through a raw socket (the kernel fills in the IP checksum and length; the
/// UDP checksum is left 0, which IPv4 allows).
fn dns_spray(args: &Args) -> anyhow::Result<()> {
    use std::{net::SocketAddr, os::fd::FromRawFd as _};
    let (SocketAddr::V4(to), SocketAddr::V4(from)) = (args.dns_server, args.spoof_from) else {
        bail!("dns-spray forges IPv4 only");
    };
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening a raw socket (root)");
    }
    // SAFETY: a fresh descriptor this function owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let mut dns = vec![
        0,
        0,
        0x81,
        0x80 | args.spoof_rcode & 0x0f,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    if !args.spoof_name.is_empty() {
        dns[5] = 1;
        for label in args.spoof_name.split('.') {
            dns.push(label.len() as u8);
            dns.extend_from_slice(label.as_bytes());
        }
        dns.extend_from_slice(&[0, 0, 1, 0, 1]);
    }
    let udp_len = 8 + dns.len();
    let mut packet = vec![0u8; 20 + udp_len];
    packet[0] = 0x45;
    packet[8] = 64;
    packet[9] = 17;
    packet[12..16].copy_from_slice(&from.ip().octets());
    packet[16..20].copy_from_slice(&to.ip().octets());
    packet[20..22].copy_from_slice(&from.port().to_be_bytes());
    packet[22..24].copy_from_slice(&to.port().to_be_bytes());
    packet[24..26].copy_from_slice(&(udp_len as u16).to_be_bytes());
    packet[28..].copy_from_slice(&dns);
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(to.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let mut report = Report {
        pid: node_pid(),
        ..Default::default()
    };
    let start = std::time::Instant::now();
    for id in 0..args.count.min(65_536) {
        packet[28..30].copy_from_slice(&(id as u16).to_be_bytes());
        // SAFETY: sendto with a buffer and address that live across the call.
        let sent = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                packet.as_ptr() as *const _,
                packet.len(),
                0,
                &addr as *const libc::sockaddr_in as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        report.tally(sent >= 0);
    }
    report.timed(start)
}

/// The first label of the question name.
fn first_label(msg: &[u8]) -> Option<String> {
    let len = *msg.get(12)? as usize;
    let label = msg.get(13..13 + len)?;
    Some(String::from_utf8_lossy(label).to_ascii_lowercase())
}

/// Creates and ends `count` tasks one at a time (at `rate` a second, if given) and reports how
/// long that took.
fn spin(mode: Mode, count: u32, rate: Option<f64>) -> anyhow::Result<()> {
    let mut report = Report {
        pid: node_pid(),
        ..Default::default()
    };
    let start = std::time::Instant::now();
    let pace = Pace::new(rate)?;
    for i in 0..count {
        pace.wait(i);
        let ok = if mode == Mode::SpinThreads {
            std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(|| ())
                .map(|t| t.join().is_ok())
                .unwrap_or(false)
        } else {
            fork_and_reap().unwrap_or(false)
        };
        report.tally(ok);
    }
    report.timed(start)
}

/// cgroup churn: `count` cgroups made, used by one short-lived process each, and removed.
fn churn(root: &std::path::Path, count: u32) -> anyhow::Result<()> {
    let mut report = Report {
        pid: node_pid(),
        ..Default::default()
    };
    for i in 0..count {
        let dir = root.join(format!("churn-{i}"));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        join(&dir)?;
        report.tally(fork_and_reap()?);
        join(root)?;
        std::fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    print_report(&report)
}

/// A memory cgroup this process joined and limited.
struct MemoryLimit {
    /// Opened before the limit applies: opening a cgroup file allocates kernel memory that
    /// would be charged to (and refused by) the limited cgroup.
    limit_file: std::fs::File,
    unlimited: &'static str,
}

impl MemoryLimit {
    /// Joins a memory cgroup, then lowers its limit to what it uses now plus `headroom`. The
    /// OOM killer is kept away (oom_score_adj -1000, or v1's oom_control), so the kernel
    /// refuses charges for new tasks with ENOMEM instead of killing this process.
    fn apply(dir: &std::path::Path, headroom: u64) -> anyhow::Result<Self> {
        warm_heap();
        // Every page of every mapping (this binary's and libc's code, the stacks, the heap)
        // in memory and locked, charged where it is now. Otherwise code first run after the
        // join is charged to the limited cgroup, reclaimed under its pressure and faulted
        // back in a loop: with no OOM victim, a livelock (seen on 6.12: 138,000 failed
        // charges, 7,000 major faults, no report).
        check(
            // SAFETY: mlockall takes flags only.
            unsafe { libc::mlockall(libc::MCL_CURRENT) },
            "mlockall (needs CAP_IPC_LOCK)",
        )?;
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("joining {}", dir.display()))?;
        let unkillable = std::fs::write("/proc/self/oom_score_adj", "-1000").is_ok();
        let v2 = dir.join("memory.current").exists();
        let (usage_file, limit_file, unlimited) = if v2 {
            ("memory.current", "memory.max", "max")
        } else {
            std::fs::write(dir.join("memory.oom_control"), "1")
                .context("disabling the v1 OOM killer")?;
            ("memory.usage_in_bytes", "memory.limit_in_bytes", "-1")
        };
        if v2 && !unkillable {
            bail!(
                "a cgroup v2 memory limit would OOM-kill this process: oom_score_adj -1000 needs CAP_SYS_RESOURCE"
            );
        }
        let usage: u64 = std::fs::read_to_string(dir.join(usage_file))
            .with_context(|| format!("reading {usage_file}"))?
            .trim()
            .parse()
            .with_context(|| format!("parsing {usage_file}"))?;
        let path = dir.join(limit_file);
        let mut limit_file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        limit_file
            .write_all((usage + headroom).to_string().as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(MemoryLimit {
            limit_file,
            unlimited,
        })
    }

    /// Lifts the limit again, so that printing the report cannot wait on memory.
    fn lift(mut self) -> anyhow::Result<()> {
        self.limit_file
            .write_all(self.unlimited.as_bytes())
            .context("lifting the memory limit")
    }
}

/// Grows and touches malloc's main heap, and keeps it: glibc allocates each new thread's TLS
/// vector there, and a page fault at a memory limit with no OOM victim (we are unkillable)
/// retries forever instead of failing, so no heap page may be first touched under the limit.
/// (`mlockall` then locks it with the rest.)
fn warm_heap() {
    const WARM: usize = 4 << 20;
    // SAFETY: mallopt only tunes glibc's allocator; the block is written within its length
    // and freed once.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
        libc::mallopt(libc::M_MMAP_THRESHOLD, (2 * WARM) as libc::c_int);
        let block = libc::malloc(WARM);
        if !block.is_null() {
            std::ptr::write_bytes(block.cast::<u8>(), 1, WARM);
            libc::free(block);
        }
    }
}

/// Pre-touched thread stacks, one mapping for all threads.
struct Stacks {
    base: *mut u8,
    count: usize,
}

const STACK_SIZE: usize = 32 * 1024;

impl Stacks {
    fn new(count: usize) -> anyhow::Result<Self> {
        let len = count.max(1) * STACK_SIZE;
        // SAFETY: anonymous private mapping; checked for MAP_FAILED.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            bail!(
                "mapping {len} bytes of thread stacks: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(Stacks {
            base: base.cast(),
            count,
        })
    }

    fn get(&self, i: usize) -> Option<*mut libc::c_void> {
        (i < self.count).then(|| self.base.wrapping_add(i * STACK_SIZE).cast())
    }
}

/// A thread parked on a pipe until its write end closes. Touches nothing but its own stack.
extern "C" fn parked_thread(fd: *mut libc::c_void) -> *mut libc::c_void {
    let mut byte = 0u8;
    // SAFETY: reading one byte into a stack variable.
    unsafe { libc::read(fd as usize as libc::c_int, (&raw mut byte).cast(), 1) };
    std::ptr::null_mut()
}

/// pthread_create (clone3 in glibc) on a pre-touched stack. Returns the thread or the errno.
fn spawn_parked(stack: *mut libc::c_void, fd: libc::c_int) -> Result<libc::pthread_t, i32> {
    // SAFETY: attr is initialised before use and destroyed after; the stack outlives the
    // thread (it is unmapped only at process exit).
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        libc::pthread_attr_init(&mut attr);
        libc::pthread_attr_setstack(&mut attr, stack, STACK_SIZE);
        let mut thread: libc::pthread_t = 0;
        let rc = libc::pthread_create(
            &mut thread,
            &attr,
            parked_thread,
            fd as usize as *mut libc::c_void,
        );
        libc::pthread_attr_destroy(&mut attr);
        if rc == 0 { Ok(thread) } else { Err(rc) }
    }
}

fn check(rc: libc::c_int, what: &str) -> anyhow::Result<()> {
    if rc != 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn set_comm(comm: &str) -> anyhow::Result<()> {
    let c = std::ffi::CString::new(comm).context("--comm contains a NUL byte")?;
    // SAFETY: PR_SET_NAME reads a NUL-terminated string (truncated to 15 bytes).
    check(
        unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr()) },
        "prctl(PR_SET_NAME)",
    )
}

impl Report {
    /// One operation of a timed loop: done, or failed.
    fn tally(&mut self, ok: bool) {
        if ok {
            self.created += 1;
        } else {
            self.failures += 1;
        }
    }

    /// Prints the report of a timed loop that began at `start`.
    fn timed(mut self, start: std::time::Instant) -> anyhow::Result<()> {
        self.elapsed_ns = Some(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
        print_report(&self)
    }
}

/// Serializes the first 64 errnos only.
fn first_errnos<S: serde::Serializer>(errnos: &[i32], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(errnos.iter().take(64))
}

fn print_report(report: &Report) -> anyhow::Result<()> {
    print_json(report)
}

/// One JSON line on stdout, flushed.
fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(value)?)?;
    out.flush()?;
    Ok(())
}

/// Our pid in the initial namespace: /proc is the host's, so /proc/self names it even from
/// inside a new pid namespace.
fn node_pid() -> u32 {
    std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str()?.parse().ok())
        .unwrap_or_else(std::process::id)
}

/// Creates tasks until `count` exist or `max_failures` were refused, calls `created` (which
/// lifts any limit), prints the report, holds the tasks for --hold-ms, then ends them all.
fn create(
    args: &Args,
    stacks: Option<&Stacks>,
    created: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut report = Report {
        pid: node_pid(),
        ..Default::default()
    };
    let mut pipe = [-1; 2];
    // SAFETY: pipe(2) into a two-element array.
    unsafe { libc::pipe(pipe.as_mut_ptr()) };
    // Room reserved and touched up front: no allocation or page fault once a limit is near.
    let mut threads: Vec<libc::pthread_t> = prefaulted(args.count as usize);
    let mut children: Vec<libc::pid_t> = prefaulted(args.count as usize);
    report.errnos = prefaulted(args.max_failures as usize + 1);
    let fill_mode = if args.mode == Mode::Vforks {
        Mode::Forks
    } else {
        args.mode
    };

    let interval = std::time::Duration::from_millis(args.interval_ms);
    let pace = Pace::new(args.rate)?;
    while report.created < args.count && report.failures < args.max_failures {
        if !interval.is_zero() && report.created + report.failures > 0 {
            std::thread::sleep(interval);
        }
        pace.wait(report.created + report.failures);
        let result = match fill_mode {
            Mode::Threads => match stacks.and_then(|s| s.get(threads.len())) {
                Some(stack) => spawn_parked(stack, pipe[0]).map(|t| threads.push(t)),
                None => break,
            },
            Mode::Forks | Mode::Vforks => {
                // SAFETY: the child only calls async-signal-safe functions (see park_child).
                fork_with(|| unsafe { libc::fork() }).map(|pid| children.push(pid))
            }
            Mode::SysForks => {
                // SAFETY: as above; the raw syscall returns 0 in the child.
                fork_with(|| unsafe { libc::syscall(libc::SYS_fork) as libc::pid_t })
                    .map(|pid| children.push(pid))
            }
            Mode::Churn
            | Mode::PodChurn
            | Mode::Hop
            | Mode::SpinThreads
            | Mode::SpinForks
            | Mode::DnsServer
            | Mode::DnsClient
            | Mode::DnsFlood
            | Mode::DnsSpray
            | Mode::NfqueueHold => {
                break;
            } // run elsewhere
        };
        match result {
            Ok(()) => report.created += 1,
            Err(errno) => {
                report.failures += 1;
                report.errnos.push(errno);
                if fill_mode != args.mode {
                    break;
                }
            }
        }
    }
    if args.mode == Mode::Vforks {
        // The node is now full for us: every vfork is refused the same way.
        for _ in 0..args.max_failures {
            // SAFETY: the vfork child only calls _exit, so it neither returns through our
            // frames nor touches the shared memory (libc deprecates vfork for the general case).
            #[allow(deprecated)]
            let pid = unsafe { libc::vfork() };
            match pid {
                // SAFETY: _exit is what a vfork child may call: it ends the child at once.
                0 => unsafe { libc::_exit(0) },
                -1 => {
                    report.failures += 1;
                    report
                        .errnos
                        .push(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
                }
                pid => {
                    report.created += 1;
                    // SAFETY: reaping our own child.
                    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
                }
            }
        }
    }

    created()?;
    print_report(&report)?;
    std::thread::sleep(std::time::Duration::from_millis(args.hold_ms));
    // SAFETY: closing our pipe ends the parked threads' reads; joining our own threads.
    unsafe {
        libc::close(pipe[1]);
        for t in threads {
            libc::pthread_join(t, std::ptr::null_mut());
        }
        libc::close(pipe[0]);
    }
    for pid in children {
        // SAFETY: killing and reaping our own children.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
    Ok(())
}

/// An empty Vec whose capacity has been written once (so its pages are present).
fn prefaulted<T: Default + Clone>(capacity: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(capacity);
    v.resize(capacity, T::default());
    v.clear();
    v
}

/// Runs a fork-like call; the child parks until killed. Returns the child's pid or the errno.
fn fork_with(fork: impl FnOnce() -> libc::pid_t) -> Result<libc::pid_t, i32> {
    match fork() {
        -1 => Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)),
        0 => park_child(),
        pid => Ok(pid),
    }
}

/// A forked child: dies with its parent, otherwise sleeps. Async-signal-safe calls only.
fn park_child() -> ! {
    // SAFETY: prctl, pause and _exit are async-signal-safe.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        loop {
            libc::pause();
        }
    }
}

/// Becomes init of a new pid namespace with a small pid_max and creates the tasks there.
fn in_new_pidns(args: &Args, stacks: Option<&Stacks>, pid_max: u32) -> anyhow::Result<()> {
    match fork_into_new_pidns()? {
        0 => {
            // pid_max is per pid namespace (Linux >= 6.14): this writes our namespace's.
            let code = match std::fs::write("/proc/sys/kernel/pid_max", pid_max.to_string())
                .context("setting pid_max in the new pid namespace")
                .and_then(|()| create(args, stacks, || Ok(())))
            {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("faultline-lab: error: {e:#}");
                    1
                }
            };
            // SAFETY: leaving the namespace's init without running the parent's atexit state.
            unsafe { libc::_exit(code) }
        }
        child => wait_ok(child),
    }
}

const PID_MAX: &str = "/proc/sys/kernel/pid_max";
/// pids below this are not handed out again once the allocator has wrapped (kernel/pid.c).
const RESERVED_PIDS: u32 = 300;

/// Sets the global pid_max so that `free` pids are left in [RESERVED_PIDS, pid_max), creates
/// the tasks, and restores pid_max before reporting, also on error.
fn with_global_pid_max(args: &Args, stacks: Option<&Stacks>, free: u32) -> anyhow::Result<()> {
    let original = std::fs::read_to_string(PID_MAX).context("reading kernel.pid_max")?;
    pass_reserved_pids()?;
    let pid_max = pid_max_leaving(&task_ids()?, free);
    std::fs::write(PID_MAX, pid_max.to_string()).context("lowering kernel.pid_max")?;
    let result = create(args, stacks, || {
        std::fs::write(PID_MAX, original.trim()).context("restoring kernel.pid_max")
    });
    let restored = std::fs::write(PID_MAX, original.trim()).context("restoring kernel.pid_max");
    result.and(restored)
}

/// Until the pid allocator's cursor first passes RESERVED_PIDS (early after boot), it hands
/// out freed pids from 1: fork until a child's pid shows it has passed, so that the free range
/// is [RESERVED_PIDS, pid_max) as on any node that has run for a while.
fn pass_reserved_pids() -> anyhow::Result<()> {
    for _ in 0..2 * RESERVED_PIDS {
        // SAFETY: the child only calls _exit.
        match unsafe { libc::fork() } {
            -1 => bail!("fork: {}", std::io::Error::last_os_error()),
            // SAFETY: _exit is async-signal-safe and ends the child at once.
            0 => unsafe { libc::_exit(0) },
            child => {
                wait_ok(child)?;
                if child > RESERVED_PIDS as libc::pid_t {
                    return Ok(());
                }
            }
        }
    }
    bail!(
        "no pid above {RESERVED_PIDS} after {} forks",
        2 * RESERVED_PIDS
    )
}

/// Every task id (threads included) in our pid namespace.
fn task_ids() -> anyhow::Result<Vec<u32>> {
    let mut ids = Vec::new();
    for proc in std::fs::read_dir("/proc")
        .context("reading /proc")?
        .flatten()
    {
        let Some(pid) = proc
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        ids.extend(
            tasks
                .flatten()
                .filter_map(|t| t.file_name().to_str().and_then(|n| n.parse::<u32>().ok())),
        );
    }
    Ok(ids)
}

/// The pid_max that leaves `free` ids unused in [RESERVED_PIDS, pid_max).
fn pid_max_leaving(ids: &[u32], free: u32) -> u32 {
    let mut used: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|i| *i >= RESERVED_PIDS)
        .collect();
    used.sort_unstable();
    let mut pid_max = RESERVED_PIDS + 1;
    loop {
        let taken = used.iter().take_while(|i| **i < pid_max).count() as u32;
        if pid_max - RESERVED_PIDS - taken >= free {
            return pid_max;
        }
        pid_max += 1;
    }
}

/// Moves our future children into a new pid namespace and forks its init: 0 in the child
/// (pid 1 there), the child's pid in the parent.
fn fork_into_new_pidns() -> anyhow::Result<libc::pid_t> {
    check(
        // SAFETY: unshare of the pid namespace affects only our future children.
        unsafe { libc::unshare(libc::CLONE_NEWPID) },
        "unshare(CLONE_NEWPID)",
    )?;
    // SAFETY: no other thread exists yet (the callers fork before creating any), so the child
    // may run the lab logic; it leaves with _exit.
    match unsafe { libc::fork() } {
        -1 => bail!(
            "fork into the new pid namespace: {}",
            std::io::Error::last_os_error()
        ),
        pid => Ok(pid),
    }
}

/// A pid namespace whose init has exited refuses new pids with ENOMEM.
fn dead_pidns(args: &Args) -> anyhow::Result<()> {
    match fork_into_new_pidns()? {
        // SAFETY: the init exits at once.
        0 => unsafe { libc::_exit(0) },
        init => wait_ok(init)?,
    }
    create(args, None, || Ok(()))
}

/// Forks a child that exits at once and reaps it: false when the fork was refused.
fn fork_and_reap() -> anyhow::Result<bool> {
    // SAFETY: the child only calls _exit.
    match unsafe { libc::fork() } {
        -1 => Ok(false),
        // SAFETY: _exit is async-signal-safe and ends the child at once.
        0 => unsafe { libc::_exit(0) },
        child => wait_ok(child).map(|()| true),
    }
}

fn wait_ok(pid: libc::pid_t) -> anyhow::Result<()> {
    let mut status = 0;
    // SAFETY: waiting for our own child.
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
        bail!("waitpid({pid}): {}", std::io::Error::last_os_error());
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("child {pid} failed (wait status {status:#x})");
    }
    Ok(())
}
