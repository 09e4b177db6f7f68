//! `cargo xtask bench`: faultline's cost, measured against no probe and against the tool an
//! SRE would use instead, in the same run on the same machine. Writes BENCHMARKS.md.
//!
//! 1. Overhead: thread create+join, fork+wait and two UDP DNS query loops: on loopback, and a
//!    pod's path to the cluster DNS, from a pod network namespace through a veth and the
//!    node's DNAT of a service IP to dnsmasq in another (`bench/netlab.rs`). Each is run with
//!    no probe, with `faultline run`, and with the comparison (an equivalent bpftrace script
//!    for task creation, `tcpdump -w /dev/null udp port 53` for DNS, capturing on lo or in the
//!    node namespace on the pod's veth). Configurations alternate within each repetition; the
//!    workload (and its DNS server) is pinned to one CPU. Reported: median throughput,
//!    the workload's own CPU time per operation (from wait4), the eBPF programs' run time per
//!    operation (the kernel's `bpf_stats`), and the agent's CPU time per operation.
//! 2. Failure storm and pipeline ceiling: processes failing pthread_create as fast as they can
//!    under a pids limit of 1, at rising parallelism, with `faultline run` counting: events
//!    per second delivered, events lost, faultline's CPU time per event.
//! 3. The floor: empty tracepoint programs' run time, and userspace per event without the
//!    kernel (replay of ring records through the daemon's code).
//! 4. A busy node where users run faultline: as deployed, beside 250 pods at fixed rates of
//!    DNS, task creation and refused creations, and once without it (`bench/busy.rs`): the
//!    agent's and its programs' CPU, per-event costs, losses, exact counts, the workloads' CPU.
//! 5. Footprint: exec to ready, RSS idle, after the storm, after 10,000 cgroups.
//! 6. Serving under attack: `/healthz` latency and RSS while 256 connections from 16 pods read
//!    nothing of a 2,000-workload exposition (`bench/serving.rs`).
//! 7. Memory as pods come and go: as deployed in 128 MiB, bytes per live pod, and RSS through
//!    20,000 pods and their network namespaces made and removed (`bench/soak.rs`).
//!
//! `--profile` instead runs each workload once beside faultline under `perf record` and the
//! replay too, and writes where the time goes (`bench/profile.rs`).

mod as_deployed;
mod busy;
mod measure;
mod netlab;
mod profile;
mod serving;
mod soak;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use measure::{
    Agent, BenchCgroup, ProgStats, Ready, Sysctl, cgroup2_root, http_get, metric_sum, report_field,
    run_measured,
};
use netlab::Net;

/// Who watches the node while a workload runs.
#[derive(Clone, Copy, PartialEq)]
enum Tool {
    None,
    Faultline,
    /// faultline with failed task creation on the raw sys_exit tracepoint, the path Debian's
    /// kernels (perf_event_paranoid 3) leave the DaemonSet: it runs on every syscall's exit.
    FaultlineRawClone,
    Bpftrace,
    /// tcpdump capturing the workload's DNS where a node agent would on that network.
    Tcpdump(Net),
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::None => "no probe",
            Tool::Faultline => "faultline run",
            Tool::FaultlineRawClone => "faultline run --clone-hook raw",
            Tool::Bpftrace => "bpftrace (equivalent script)",
            Tool::Tcpdump(_) => "tcpdump -w /dev/null udp port 53",
        }
    }
}

struct Workload {
    name: &'static str,
    /// faultline-lab arguments; the count is appended.
    lab: &'static [&'static str],
    /// A faultline-lab helper running for the whole workload (a DNS server), if any.
    helper: Option<&'static [&'static str]>,
    /// Where the workload runs and its packets go.
    net: Net,
    count: u32,
    quick_count: u32,
    unit: &'static str,
    comparison: Tool,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "thread create+join",
        lab: &["spin-threads"],
        helper: None,
        net: Net::Loopback,
        count: 20_000,
        quick_count: 300,
        unit: "threads/s",
        comparison: Tool::Bpftrace,
    },
    Workload {
        name: "fork+wait",
        lab: &["spin-forks"],
        helper: None,
        net: Net::Loopback,
        count: 3_000,
        quick_count: 50,
        unit: "forks/s",
        comparison: Tool::Bpftrace,
    },
    Workload {
        name: "DNS query+answer, UDP on loopback",
        lab: &["dns-client", "--dns-server", "127.53.0.1:53"],
        helper: Some(&["dns-server", "900", "--dns-listen", "127.53.0.1:53"]),
        net: Net::Loopback,
        count: 20_000,
        quick_count: 300,
        unit: "queries/s",
        comparison: Tool::Tcpdump(Net::Loopback),
    },
    Workload {
        name: "DNS query+answer, pod to service IP via veth+DNAT to dnsmasq",
        // A new socket per query, as glibc, musl and Go open one per lookup: each query is a
        // new flow for the node's conntrack and DNAT, and for faultline's flow record.
        lab: &[
            "dns-client",
            "--dns-new-socket",
            "--dns-server",
            netlab::SERVICE,
        ],
        helper: None,
        net: Net::PodToService,
        count: 20_000,
        quick_count: 300,
        unit: "queries/s",
        comparison: Tool::Tcpdump(Net::PodToService),
    },
];

impl Workload {
    /// What the workload needs around it for all its runs: its network (namespaces and
    /// dnsmasq) and its DNS server; both go when the returned guards drop.
    fn set_up(&self, env: &Env) -> anyhow::Result<(Option<netlab::PodToService>, Option<Agent>)> {
        let net = self.net.up(&env.bin, WORKLOAD_CPU)?;
        let helper = match self.helper {
            Some(args) => Some(Agent::start(
                "DNS server",
                pinned(&env.bin.join("faultline-lab")).args(args),
                Ready::Stderr("DNS responder"),
            )?),
            None => None,
        };
        Ok((net, helper))
    }

    /// The workload's command for `count` operations, pinned, on its network.
    fn command(&self, env: &Env, count: u32) -> Command {
        let mut cmd = self
            .net
            .workload(WORKLOAD_CPU, &env.bin.join("faultline-lab"));
        cmd.args(self.lab).arg(count.to_string());
        cmd
    }
}

const REPS: usize = 9;
/// The CPU the workload (and its DNS server) is pinned to; agents run where they like.
const WORKLOAD_CPU: &str = "1";

/// `program` pinned to the workload's CPU, in the benchmark's own namespace; the caller adds
/// the arguments.
fn pinned(program: &Path) -> Command {
    Net::Loopback.workload(WORKLOAD_CPU, program)
}

/// Where things are.
struct Env {
    bin: PathBuf,
    bpftrace_script: PathBuf,
    quick: bool,
}

/// What `cargo xtask bench` does.
#[derive(Clone, Copy, PartialEq)]
pub enum Mode {
    /// Everything, release builds, 9 repetitions: writes BENCHMARKS.md.
    Full,
    /// One short run of each part with the debug builds: checks that the benchmark works.
    Quick,
    /// Where the time goes: each workload once under `perf record` (`bench/profile.rs`).
    Profile,
}

/// Where BENCHMARKS.md's hand-written sections begin (the image's size and start-to-ready,
/// printed by probe-user/tests/image.rs): a rewrite keeps them.
const HAND_WRITTEN: &str = "\n## The image";

pub fn run(root: &Path, mode: Mode) -> anyhow::Result<()> {
    let quick = mode == Mode::Quick;
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark attaches eBPF programs and creates cgroups: run it as root");
    }
    // Quick mode (the smoke run of the test suite) uses the debug binaries `cargo test`
    // builds, with the same features, so nothing is rebuilt.
    let build: &[&str] = if quick {
        &["test", "--no-run"]
    } else {
        &["build", "--release", "-p", "probe-user"]
    };
    crate::run(Command::new("cargo").current_dir(root).args(build))?;
    crate::build_lab(root, !quick)?;
    let env = Env {
        bin: root.join(if quick {
            "target/debug"
        } else {
            "target/release"
        }),
        bpftrace_script: root.join("xtask/bench/clone-equivalent.bt"),
        quick,
    };
    if mode == Mode::Profile {
        return profile::run(root, &env);
    }
    // The kernel counts each program's runs and run time while this is set.
    let _stats = Sysctl::set("/proc/sys/kernel/bpf_stats_enabled", "1")?;
    let started = Instant::now();

    let mut body = String::new();
    let mut found = Findings::default();
    overhead(&env, &mut body, &mut found)?;
    storm(&env, &mut body, &mut found)?;
    floor(&env, &mut body, &mut found)?;
    replay(root, &env, &mut body, &mut found)?;
    busy::run(root, &env, &mut body, &mut found)?;
    footprint(&env, &mut body, &mut found)?;
    serving::run(&env, &mut body, &mut found)?;
    soak::run(root, &env, &mut body, &mut found)?;
    let doc = found.targets() + &body;
    println!("{doc}");
    eprintln!(
        "bench: finished in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if quick {
        return Ok(());
    }
    let header = format!(
        "# Benchmarks\n\nWritten by `cargo xtask bench` on {date} ({secs:.0} s).\n\n- machine: {cpus} CPUs, {mem}\n- kernel: {kernel}\n- tools: {bpftrace}, {tcpdump}\n\n",
        date = stdout_of(Command::new("date").arg("-u").arg("+%Y-%m-%d %H:%M UTC")).trim(),
        secs = started.elapsed().as_secs_f64(),
        cpus = std::thread::available_parallelism().map_or(0, |n| n.get()),
        mem = stdout_of(
            Command::new("sh").args(["-c", "free -h | awk '/Mem:/ {print $2 \" memory\"}'"])
        )
        .trim(),
        kernel = stdout_of(Command::new("uname").arg("-r")).trim(),
        bpftrace = stdout_of(Command::new("bpftrace").arg("--version")).trim(),
        tcpdump =
            stdout_of(Command::new("sh").args(["-c", "tcpdump --version 2>&1 | head -1"])).trim(),
    );
    // Sections measured elsewhere and written by hand (the image's, by probe-user/tests/image.rs)
    // are kept, at the end.
    let kept = std::fs::read_to_string(root.join("BENCHMARKS.md"))
        .ok()
        .and_then(|old| old.find(HAND_WRITTEN).map(|i| old[i..].to_owned()))
        .unwrap_or_default();
    std::fs::write(
        root.join("BENCHMARKS.md"),
        format!("{header}{}\n{kept}", doc.trim_end()),
    )
    .context("writing BENCHMARKS.md")?;
    eprintln!("bench: wrote BENCHMARKS.md");
    Ok(())
}

fn stdout_of(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Starts an agent with its programs attached.
fn start(env: &Env, tool: Tool, port: u16) -> anyhow::Result<Option<Agent>> {
    Ok(match tool {
        Tool::None => None,
        Tool::Faultline | Tool::FaultlineRawClone => Some(faultline_agent(env, tool, port, None)?),
        Tool::Bpftrace => Some(Agent::start(
            "bpftrace",
            Command::new("bpftrace").arg(&env.bpftrace_script),
            Ready::Stdout("Attaching"),
        )?),
        Tool::Tcpdump(net) => Some(Agent::start(
            "tcpdump",
            &mut net.capture(),
            Ready::Stderr("listening on"),
        )?),
    })
}

/// (throughput ratio, workload CPU per operation ratio) of one configuration.
type Ratios = (f64, f64);

/// The numbers the targets are checked against.
#[derive(Default)]
struct Findings {
    /// Per workload: faultline's and the comparison tool's ratios, against no probe.
    ratios: Vec<(&'static str, Tool, Ratios, Ratios)>,
    /// Per workload: faultline's eBPF run time per operation (ns, median) and its programs'
    /// runs per operation.
    kernel: Vec<(&'static str, f64, f64)>,
    /// An empty tracepoint program's run time per run (ns), measured in the same run.
    floor_ns: f64,
    /// Userspace per event without the kernel (replay): (kind, µs).
    replay_us: Vec<(String, f64)>,
    /// The busy node as deployed (`bench/busy.rs`).
    busy: Option<busy::Found>,
    ceiling: f64,
    /// The failed task creation programs' run time per failure in the storms (ns; the most).
    storm_ebpf_ns: f64,
    rss_10k_mib: f64,
    startup_ms: f64,
    /// `/healthz` under the slow-reader attack: the slowest answer (ms), and the probes not
    /// answered.
    healthz_under_attack: Option<(f64, usize)>,
    /// The daemon's high-water RSS by the end of the attack.
    rss_under_attack_mib: f64,
    /// The daemon's RSS per pod alive, as deployed.
    bytes_per_live_pod: Option<f64>,
    /// The RSS through the pod churn, as deployed.
    soak: Option<soak::SoakFindings>,
}

impl Findings {
    fn targets(&self) -> String {
        let mut t = String::from("## Targets\n\n| target | measured | met |\n|---|---|---|\n");
        let mut row = |target: &str, measured: String, met: bool| {
            let _ = writeln!(
                t,
                "| {target} | {measured} | {} |",
                if met { "yes" } else { "**no**" }
            );
        };
        // The programs' own run time per operation (bpf_stats): the steadiest figure.
        for (name, ns, runs) in &self.kernel {
            if name.starts_with("DNS") {
                row(
                    &format!("{name}: eBPF per query, client side <= 0.35 µs"),
                    format!(
                        "{:.2} µs for both sides ({runs:.1} runs per query: the client's query and answer, the server's too)",
                        ns / 1e3
                    ),
                    *ns <= 350.0,
                );
            } else {
                row(
                    &format!("{name}: eBPF per created task <= 0.20 µs"),
                    format!(
                        "{:.2} µs in {runs:.1} runs; {runs:.1} runs of an empty program: {:.2} µs",
                        ns / 1e3,
                        runs * self.floor_ns / 1e3
                    ),
                    *ns <= 200.0,
                );
            }
        }
        for (kind, us) in &self.replay_us {
            let goal = if kind.starts_with("dns") { 2.0 } else { 1.5 };
            row(
                &format!("userspace per {kind} (replay) <= {goal} µs"),
                format!("{us:.2} µs ({:.0} events/s per core)", 1e6 / us),
                *us <= goal,
            );
        }
        if let Some(busy) = &self.busy {
            busy.rows(&mut row);
        }
        for (name, tool, (f_rate, f_cpu), (c_rate, c_cpu)) in &self.ratios {
            let goal = if name.starts_with("DNS") { 0.95 } else { 0.98 };
            row(
                &format!("{name}: throughput with faultline >= {goal} of without"),
                format!("{f_rate:.3} (workload CPU x{f_cpu:.3})"),
                *f_rate >= goal,
            );
            row(
                &format!("{name}: faultline's cost below {}'s", tool.name()),
                format!(
                    "throughput {f_rate:.3} vs {c_rate:.3}; workload CPU x{f_cpu:.3} vs x{c_cpu:.3}"
                ),
                f_cpu <= c_cpu,
            );
        }
        row(
            "eBPF per refused creation in a storm <= 2 µs",
            format!("{:.2} µs (the storms' most)", self.storm_ebpf_ns / 1e3),
            self.storm_ebpf_ns <= 2000.0,
        );
        row(
            ">= 200,000 events/s with zero loss",
            format!("{:.0} events/s", self.ceiling),
            self.ceiling >= 200_000.0,
        );
        row(
            "RSS <= 64 MiB with 10,000 cgroups seen",
            format!("{:.1} MiB", self.rss_10k_mib),
            self.rss_10k_mib <= 64.0,
        );
        row(
            "ready in under 1 s",
            format!("{:.0} ms", self.startup_ms),
            self.startup_ms < 1000.0,
        );
        if let Some((max_ms, failed)) = self.healthz_under_attack {
            row(
                "/healthz within 1 s under the slow-reader attack",
                format!("max {max_ms:.1} ms, {failed} not answered"),
                max_ms < 1000.0 && failed == 0,
            );
            row(
                "RSS within the DaemonSet's 128 MiB under that attack",
                format!("{:.1} MiB (high-water mark)", self.rss_under_attack_mib),
                self.rss_under_attack_mib < 128.0,
            );
        }
        if let Some(s) = &self.soak {
            row(
                &format!(
                    "RSS flat while {} pods and their network namespaces come and go: between scrapes, the end within {} MiB of the level (a quarter through, a minute in)",
                    s.pods,
                    soak::FLAT_WITHIN_MIB
                ),
                format!(
                    "{:.1} MiB at the level, {:.1} MiB at the end (with an exposition being sent: {:.1} and {:.1} MiB){}",
                    s.level.floor_mib,
                    s.end.floor_mib,
                    s.level.peak_mib,
                    s.end.peak_mib,
                    self.bytes_per_live_pod.map_or(String::new(), |b| format!(
                        "; {:.1} KiB per live pod",
                        b / 1024.0
                    ))
                ),
                s.end.floor_mib - s.level.floor_mib <= soak::FLAT_WITHIN_MIB,
            );
            row(
                "no OOM kill in the DaemonSet's 128 MiB through that churn",
                format!(
                    "{} OOM kills; high-water mark {:.1} MiB",
                    s.oom_kills, s.hwm_mib
                ),
                s.oom_kills == 0 && s.hwm_mib < 128.0,
            );
        }
        t.push('\n');
        t.push_str(WHY);
        t
    }
}

/// What the numbers mean where a target is missed (from the measurements below, and the
/// per-program run times).
const WHY: &str = "Where a target is missed, on this 2-core VM:\n\n\
- *eBPF per created task.* A created and exited thread runs four programs: the clone3 exit in parent and child (on success they return at once: ~60 ns each, the floor), the new task and the exit (~150 ns each: the floor plus one per-CPU hash lookup keyed by cgroup id, ~90 ns here). Four runs of an *empty* program cost ~0.23 µs on this machine (*The floor* below), so 0.20 µs is below what any four programs cost here; faultline's ~0.42 µs is that floor plus two map lookups. A counter slot per cgroup without a hash lookup needs cgroup local storage (6.2+), absent on the 5.10 and 6.1 kernels of the matrix; a per-CPU cache of the last cgroup's counts in front of the hash would save most lookups for bursts from one cgroup, at the price of counts split between two maps while userspace reads them: not done.\n\
- *Thread creation throughput.* The programs are ~1.8% of a thread create+join's CPU (*eBPF share*); the same workload's CPU per operation *without any probe* swings between runs by 30% on this VM (0.34 to 0.56 s for 20,000 threads in five back-to-back runs), so the ratio of medians lands within a few percent either side of the programs' share. faultline once traced `sys_enter_clone*` as well: that alone made every thread creation ~7 µs dearer, so flags are read from the saved registers at exit, on failures only.\n\
- *eBPF per DNS query.* The figure covers both sides: the benchmark's server is a socket on this node too, as CoreDNS is on a node that runs it, and its two runs return after the port check (~70 ns each). The client's side is the rest: on the query's egress the socket cookie and cgroup id, the flow's owner for conntrack attribution (a lookup for a known flow; a new socket per query, as resolvers open per lookup, pays an LRU insert: hence the pod-to-service figure), the waiting query's insert and its cgroup's quota count; on the answer's ingress the waiting query's lookup and delete, the quota count and one ring event. Each map operation costs ~80-100 ns here and each run ~60 ns before it does anything, so this design's least is ~0.7 µs on the client side. Measured, not guessed: the 256-byte question capture and the answer's copy are not where the time goes (removing either changed nothing measurable); the flow record's update per packet was ~280 ns of the query's run (now a lookup for a known flow). 0.35 µs would need answered queries counted in the kernel with no event per query, giving up the per-query detail behind `trace`, the query names and `explain`'s search-path findings.\n\
- *DNS throughput.* On loopback a query costs ~5 µs of the client's CPU, so ~1.2 µs of programs is a fifth of it; through the pod's veth and the node's DNAT ~13 µs, and the ratio rises accordingly. Against a resolver that forwards upstream (hundreds of µs to ms per query) the same cost is below 1%. tcpdump's copy of each packet lands mostly in softirq and in tcpdump itself; faultline's map work runs inside the client's own send and receive, where the workload CPU column counts it.\n\
- *Event ceiling.* A failing pthread_create costs the generating process ~8 µs of kernel time without a probe and ~12.5 µs with faultline (the failure path reserves a ~300-byte event, and at a process's first refusal in 100 ms reads the pids cgroups, pid namespaces, ucounts and memory cgroup, which the next ones copy), so two cores cannot generate 200,000 failures/s and leave faultline a core; the storm rows show the rates the machine could generate and that faultline delivered them without loss up to the highest parallelism the CPUs allowed. faultline's own cost per failure event is ~1.1 µs without the kernel (*replay*): one free core would carry ~880,000 events/s.\n\
- *Busy node, the agent.* Its ~6,500 events a second at the replay's ~1.2-1.7 µs each would be ~1% of a core; live it spends ~4-5x that. Most of the gap was the DNS tracker's search-path check (a walk of every NXDOMAIN the node had had in 10 s on every NOERROR answer), now kept per asker and compared by a hash of the first label, and each event's series kept with the series cap rather than looked up in the registry: 8.1% of a core before, the figure above after (*A busy node* below). What is left: the workload's labels built and hashed per event, the sweep, the refresh's reads of every pod's cgroup files, and one event to userspace per DNS query: 1% needs answered queries counted in the kernel, with events for the exceptions only (not built yet).\n\
- *Busy node, eBPF.* At these rates the DNS programs cost ~2-2.5 µs a run on egress (half of its runs the resolver's answers, which return after the port check) and ~1 µs on ingress, against 0.3-0.6 µs in the tight loops above; with one pod asking 100 a second, 2-5 µs a run: run this seldom, between other work, the programs and their maps are out of the caches. Sampled every 2 s over a busy minute (by hand, bpftool), the per-run cost stayed level while the flow table filled and began to evict (32,768 flows: 6.5 s of new sockets), so the LRU's eviction is not where it goes. 5,000 queries/s at ~6.5 µs is ~3.3% of a core, 1,000 refusals/s at the storm's eBPF per failure (its table) ~0.15%: the busy row's per refusal is higher because, as deployed, the failure program is the raw `sys_exit` tracepoint, which runs on every syscall of the busy machine and returns at once; all that is charged to the refusals.\n\
- *Busy node, losses and RSS.* The DNS ring (1 MiB) holds ~0.6 s of this load's events; the reader drains it every 250 ms or per 64 KiB. When the machine's two CPUs are saturated (the *other work* line of the section: builds and tests of a shared machine), the reader thread now and then waits longer than that and events are lost (counted, never silent): of five runs while this was written, three lost 265 to 5,415 events (two of them with `perf` attached to the agent), two none. RSS ended at 30-33 MiB on this load (22 MiB when ready); in two runs where another engineer's test kept 1,000 pods' cgroups churning on the machine it reached 110 MiB: their series filled the cap (2,000 a metric) and the exposition grew to 6.7 MB.\n\n";

/// One configuration's measurements over the repetitions.
#[derive(Default)]
struct Samples {
    rate: Vec<f64>,
    cpu_us_per_op: Vec<f64>,
    bpf_ns_per_op: Vec<f64>,
    agent_us_per_op: Vec<f64>,
    programs: Vec<(String, u64, u64)>,
}

fn overhead(env: &Env, doc: &mut String, found: &mut Findings) -> anyhow::Result<()> {
    let reps = if env.quick { 1 } else { REPS };
    writeln!(
        doc,
        "## Overhead on the workloads faultline watches\n\nMedians of {reps} runs per configuration, configurations alternating within each run; the workload (and the DNS server) pinned to CPU {WORKLOAD_CPU}. *Workload CPU* is the workload's own user+system time per operation (wait4); eBPF programs run inside its system calls, so their cost shows there. *eBPF* is the run time the kernel measured for the agent's programs (`kernel.bpf_stats_enabled`), per operation. *eBPF share* is that run time against the workload's CPU per operation without a probe: the cost attributable to the programs, steadier than the wall-clock ratios. *Agent* is the agent process's CPU time per operation. Ratios are against no probe in the same run. tcpdump captures where a node agent would: on lo, or in the node's namespace on the pod's veth.\n\n| workload | configuration | throughput | ratio | workload CPU/op | ratio | eBPF/op | eBPF share | agent CPU/op |\n|---|---|---|---|---|---|---|---|---|"
    )?;
    let mut per_program = String::new();
    // Each faultline program's size, once: (instructions after the verifier, native bytes).
    let mut sizes = std::collections::BTreeMap::new();
    let port = free_port()?;
    for w in &WORKLOADS {
        let count = if env.quick { w.quick_count } else { w.count };
        // The network and DNS server, if the workload has them: removed after its last run.
        let _setting = w.set_up(env)?;
        let tools = [
            Tool::None,
            Tool::Faultline,
            w.comparison,
            Tool::FaultlineRawClone,
        ];
        let mut samples: Vec<Samples> = tools.iter().map(|_| Samples::default()).collect();
        for rep in 0..reps {
            for (i, &tool) in tools.iter().enumerate() {
                let existing = ProgStats::read()?;
                let agent = start(env, tool, port)?;
                let before = ProgStats::read()?;
                let cpu0 = agent.as_ref().map_or(0.0, Agent::cpu_seconds);
                let run = run_measured(&mut w.command(env, count))?;
                let after = ProgStats::read()?;
                let s = &mut samples[i];
                let (Some(done), Some(ns)) = (
                    report_field(&run.stdout, "created"),
                    report_field(&run.stdout, "elapsed_ns"),
                ) else {
                    bail!("unexpected faultline-lab output: {}", run.stdout);
                };
                if done < 1.0 {
                    bail!("{}: nothing completed: {}", w.name, run.stdout);
                }
                s.rate.push(done / (ns / 1e9));
                s.cpu_us_per_op.push(run.cpu.as_secs_f64() * 1e6 / done);
                if let Some(a) = &agent {
                    s.agent_us_per_op
                        .push((a.cpu_seconds() - cpu0) * 1e6 / done);
                    let programs = after.since(&before, &existing);
                    if matches!(tool, Tool::Faultline | Tool::FaultlineRawClone) {
                        for (name, insns, jited) in after.sizes(&existing) {
                            sizes.insert(name, (insns, jited));
                        }
                    }
                    let ns: u64 = programs.iter().map(|p| p.2).sum();
                    s.bpf_ns_per_op.push(ns as f64 / done);
                    s.programs = programs;
                }
                eprintln!(
                    "bench: {} / {} / run {}: {:.0} {}",
                    w.name,
                    tool.name(),
                    rep + 1,
                    done / (ns / 1e9),
                    w.unit
                );
                if let Some(a) = agent {
                    a.stop()?;
                }
            }
        }
        let base_rate = median(&mut samples[0].rate.clone());
        let base_cpu = median(&mut samples[0].cpu_us_per_op.clone());
        let ratio = |s: &Samples| {
            (
                median(&mut s.rate.clone()) / base_rate,
                median(&mut s.cpu_us_per_op.clone()) / base_cpu,
            )
        };
        found
            .ratios
            .push((w.name, w.comparison, ratio(&samples[1]), ratio(&samples[2])));
        let runs: u64 = samples[1].programs.iter().map(|p| p.1).sum();
        found.kernel.push((
            w.name,
            median(&mut samples[1].bpf_ns_per_op.clone()),
            runs as f64 / f64::from(count),
        ));
        for (tool, s) in tools.iter().zip(samples.iter_mut()) {
            let rate = median(&mut s.rate);
            let cpu = median(&mut s.cpu_us_per_op);
            let opt = |v: &mut Vec<f64>, unit: &str, scale: f64| {
                if v.is_empty() {
                    "-".to_owned()
                } else {
                    format!("{:.2} {unit}", median(v) * scale)
                }
            };
            let share = if s.bpf_ns_per_op.is_empty() {
                "-".to_owned()
            } else {
                format!(
                    "{:.1}%",
                    median(&mut s.bpf_ns_per_op.clone()) / 1e3 / base_cpu * 100.0
                )
            };
            writeln!(
                doc,
                "| {} ({count}) | {} | {rate:.0} {} | {:.3} | {cpu:.2} µs | {:.3} | {} | {share} | {} |",
                w.name,
                tool.name(),
                w.unit,
                rate / base_rate,
                cpu / base_cpu,
                opt(&mut s.bpf_ns_per_op, "µs", 1e-3),
                opt(&mut s.agent_us_per_op, "µs", 1.0),
            )?;
            if !s.programs.is_empty() {
                for (name, runs, ns) in &s.programs {
                    writeln!(
                        per_program,
                        "| {} | {} | {name} | {runs} | {:.0} ns |",
                        w.name,
                        tool.name(),
                        *ns as f64 / *runs as f64
                    )?;
                }
            }
        }
    }
    writeln!(
        doc,
        "\n### eBPF programs, per run (last repetition)\n\n| workload | agent | program | runs | mean run time |\n|---|---|---|---|---|\n{per_program}"
    )?;
    let mut size_rows = String::new();
    for (name, (insns, jited)) in &sizes {
        writeln!(size_rows, "| {name} | {insns} | {jited} |")?;
    }
    writeln!(
        doc,
        "\n### faultline's eBPF programs, size\n\nInstructions as the kernel runs them (after the verifier's rewrites: `bpftool prog show` `bytes_xlated` / 8) and bytes of native code (`bytes_jited`): what each change to a program's hot path adds or removes.\n\n| program | instructions | native bytes |\n|---|---|---|\n{size_rows}"
    )?;
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// faultline run's counters: (failures delivered, failure events lost).
fn clone_counts(port: u16) -> anyhow::Result<(f64, f64)> {
    let m = http_get(port, "/metrics").context("faultline's /metrics")?;
    Ok((
        metric_sum(&m, "faultline_clone_failures_total", ""),
        metric_sum(&m, "faultline_events_lost_total", "source=\"clone\""),
    ))
}

fn storm(env: &Env, doc: &mut String, found: &mut Findings) -> anyhow::Result<()> {
    let per_process: u32 = if env.quick { 2_000 } else { 200_000 };
    let cg = BenchCgroup::pids("faultline-bench-storm", 1)?;
    let port = free_port()?;
    let events = std::env::temp_dir().join(format!(
        "faultline-bench-storm-{}.jsonl",
        std::process::id()
    ));
    let existing = ProgStats::read()?;
    let agent = faultline_agent(env, Tool::Faultline, port, Some(&events))?;
    let storms = Instant::now();
    writeln!(
        doc,
        "## Failure storm and event pipeline ceiling\n\nProcesses calling pthread_create as fast as they can under a pids limit of 1 (every call fails with EAGAIN), {per_process} failures each, with `faultline run` (events written to a file, metrics served). *Generated* is the kernel's failure rate; *delivered* the events that reached userspace and were classified and counted; *lost* the events the ring buffer had no room for (counted by the kernel, exported as `faultline_events_lost_total`); *eBPF/failure* the failed task creation programs' run time over the storm's failures (bpf_stats; their runs on anything else the machine did meanwhile included). A process's refusals within 100 ms of a read of the kernel state carry that read (`BURST_NS`).\n\n| processes | failures | wall | generated/s | delivered/s | lost | faultline CPU/event | eBPF/failure |\n|---|---|---|---|---|---|---|---|"
    )?;
    let mut ceiling: f64 = 0.0;
    for procs in [1usize, 2, 4] {
        let (d0, l0) = clone_counts(port)?;
        let cpu0 = agent.cpu_seconds();
        let progs0 = ProgStats::read()?;
        let start = Instant::now();
        let mut labs = Vec::new();
        for _ in 0..procs {
            labs.push(
                Command::new(env.bin.join("faultline-lab"))
                    .args(["threads", "4", "--comm", "fl-storm", "--max-failures"])
                    .arg(per_process.to_string())
                    .arg("--cgroup")
                    .arg(&cg.dir)
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .context("starting a storm")?,
            );
        }
        for mut l in labs {
            l.wait()?;
        }
        let wall = start.elapsed();
        let clone_ns: u64 = ProgStats::read()?
            .since(&progs0, &existing)
            .iter()
            .filter(|(name, _, _)| name.starts_with("clone"))
            .map(|(_, _, ns)| ns)
            .sum();
        // Wait until faultline has counted everything: delivered plus lost adds up, or
        // nothing changed across more than one refresh of the loss counter (1 s).
        let total = (procs as u32 * per_process) as f64;
        let mut last = (d0, l0);
        let mut still = 0;
        for _ in 0..40 {
            std::thread::sleep(Duration::from_millis(250));
            let (d, l) = clone_counts(port)?;
            if d - d0 + l - l0 >= total {
                break;
            }
            still = if (d, l) == last { still + 1 } else { 0 };
            if still >= 6 {
                break;
            }
            last = (d, l);
        }
        let (d1, l1) = clone_counts(port)?;
        let (delivered, lost) = (d1 - d0, l1 - l0);
        let cpu = agent.cpu_seconds() - cpu0;
        let secs = wall.as_secs_f64();
        if lost == 0.0 {
            ceiling = ceiling.max(delivered / secs);
        }
        let ebpf_ns = clone_ns as f64 / total;
        found.storm_ebpf_ns = found.storm_ebpf_ns.max(ebpf_ns);
        eprintln!("bench: storm x{procs}: {delivered} delivered, {lost} lost in {secs:.2} s");
        writeln!(
            doc,
            "| {procs} | {total:.0} | {secs:.2} s | {:.0} | {:.0} | {lost:.0} | {:.2} µs | {:.2} µs |",
            total / secs,
            delivered / secs,
            cpu * 1e6 / delivered.max(1.0),
            ebpf_ns / 1e3
        )?;
    }
    found.ceiling = ceiling;
    let (rss, hwm) = agent.rss_kib();
    agent.stop()?;
    let secs = storms.elapsed().as_secs_f64();
    let written = std::fs::read_to_string(&events).unwrap_or_default();
    let _ = std::fs::remove_file(&events);
    let storm_lines = written.lines().count();
    let summaries = written
        .lines()
        .filter(|l| l.contains(r#""kind":"event_summary""#))
        .count();
    let full: Vec<&str> = written
        .lines()
        .filter(|l| l.contains(r#""kind":"clone_failure""#))
        .collect();
    let line_bytes =
        full.iter().map(|l| l.len() + 1).sum::<usize>() as f64 / full.len().max(1) as f64;
    writeln!(
        doc,
        "\nHighest sustained rate with zero loss: **{ceiling:.0} events/s**. faultline's RSS after the storms: {:.1} MiB (peak {:.1} MiB).\n\nThe event lines of these storms, one cgroup's failures under the default event budget (5 full lines per workload, kind and cause a minute, then a summary): **{storm_lines} lines, {:.1} KiB** ({summaries} summaries) in {secs:.0} s, for {:.0} failures; a line per failure ({line_bytes:.0} bytes each) would have been {:.1} MiB.\n",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        written.len() as f64 / 1024.0,
        7.0 * f64::from(per_process),
        7.0 * f64::from(per_process) * line_bytes / f64::from(1u32 << 20)
    )?;
    Ok(())
}

/// `faultline run` as deploy/daemonset.yaml runs it, its event lines to `events`, or to its
/// stdout (which the DaemonSet's runtime, here [`Agent`], reads); faultline refuses a
/// character device such as /dev/null as its events file.
fn faultline_agent(
    env: &Env,
    tool: Tool,
    port: u16,
    events: Option<&Path>,
) -> anyhow::Result<Agent> {
    let mut cmd = Command::new(env.bin.join("faultline"));
    cmd.args([
        "run",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--no-kube-api",
    ]);
    if let Some(events) = events {
        cmd.arg("--events-file").arg(events);
    }
    Agent::start(
        tool.name(),
        cmd.args([
            // As deploy/daemonset.yaml runs it: event lines for the rare events only
            // (DNS is in the metrics), names redacted, the default event budget.
            "--events",
            "clone,conntrack",
            "--dns-names",
            "redact",
            "--refresh",
            "1s",
            "--clone-hook",
            if tool == Tool::FaultlineRawClone {
                "raw"
            } else {
                "auto"
            },
        ]),
        Ready::Stderr("faultline: running on node"),
    )
}

/// The least a tracepoint program costs here: empty bpftrace probes on the tracepoints the
/// task path uses, during thread create+join, their run time per run from bpf_stats (the
/// statistics' own clock reads included, as in every figure of this file).
fn floor(env: &Env, doc: &mut String, found: &mut Findings) -> anyhow::Result<()> {
    let existing = ProgStats::read()?;
    let agent = Agent::start(
        "bpftrace (empty probes)",
        Command::new("bpftrace").args([
            "-e",
            "tracepoint:syscalls:sys_exit_clone3 {} tracepoint:task:task_newtask {} tracepoint:sched:sched_process_exit {}",
        ]),
        Ready::Stdout("Attaching"),
    )?;
    let before = ProgStats::read()?;
    let count = if env.quick { 300 } else { 20_000 };
    run_measured(
        pinned(&env.bin.join("faultline-lab")).args(["spin-threads", &count.to_string()]),
    )?;
    let after = ProgStats::read()?;
    agent.stop()?;
    let programs = after.since(&before, &existing);
    let (runs, ns) = programs.iter().fold((0, 0), |(r, t), p| (r + p.1, t + p.2));
    if runs == 0 {
        bail!("the empty bpftrace probes never ran");
    }
    found.floor_ns = ns as f64 / runs as f64;
    writeln!(
        doc,
        "\n## The floor: an empty program\n\nEmpty bpftrace probes (`{{}}`) on `sys_exit_clone3`, `task_newtask` and `sched_process_exit` during {count} thread create+joins: **{:.0} ns per run** ({runs} runs), the least any tracepoint program costs on this machine with bpf_stats on. A created and exited thread runs four (the clone3 exit in parent and child, the new task, the exit).\n",
        found.floor_ns
    )?;
    Ok(())
}

/// The userspace pipeline alone: recorded-shape ring records through decode, enrichment,
/// attribution, metrics, the explain history and (failures) the JSON line, on one thread
/// (`probe-user/examples/replay.rs`).
fn replay(root: &Path, env: &Env, doc: &mut String, found: &mut Findings) -> anyhow::Result<()> {
    let count = if env.quick { "2000" } else { "200000" };
    let out = stdout_of(&mut replay_command(root, env, count)?);
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("events/s per core"))
        .collect();
    if rows.len() != 2 {
        bail!("unexpected replay output: {out}");
    }
    writeln!(
        doc,
        "\n## Userspace per event, without the kernel (replay)\n\n{count} records of each kind through the same code the daemon runs (decode, cause, attribution, metrics with the series cap, the explain history; failures also encoded as JSON lines), one thread, pinned: the events/s one core carries.\n"
    )?;
    for row in rows {
        writeln!(doc, "- {row}")?;
        // "<kind>: ... events/s per core, <us> µs per event"
        let us = row
            .strip_suffix(" µs per event")
            .and_then(|r| r.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok());
        if let (Some((kind, _)), Some(us)) = (row.split_once(':'), us) {
            found.replay_us.push((kind.to_owned(), us));
        }
    }
    writeln!(doc)?;
    Ok(())
}

/// The replay example, built, pinned, for `count` records of each kind.
fn replay_command(root: &Path, env: &Env, count: &str) -> anyhow::Result<Command> {
    let mut build = Command::new("cargo");
    build
        .current_dir(root)
        .args(["build", "-p", "probe-user", "--example", "replay"]);
    if !env.quick {
        build.arg("--release");
    }
    crate::run(&mut build)?;
    let mut cmd = pinned(&env.bin.join("examples/replay"));
    cmd.args([count, "--no-kube-api"]);
    Ok(cmd)
}

fn footprint(env: &Env, doc: &mut String, found: &mut Findings) -> anyhow::Result<()> {
    let cgroups: u32 = if env.quick { 200 } else { 10_000 };
    let port = free_port()?;
    // Exec to ready: the programs are already built; this is load, verify, attach, first
    // refresh.
    let mut starts = Vec::new();
    for _ in 0..if env.quick { 1 } else { 3 } {
        let t = Instant::now();
        let agent = start(env, Tool::Faultline, port)?.context("faultline")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(port, "/readyz").is_none() {
            if Instant::now() > deadline {
                bail!("faultline run never became ready");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        starts.push(t.elapsed().as_secs_f64());
        agent.stop()?;
    }
    let startup = median(&mut starts);

    let agent = start(env, Tool::Faultline, port)?.context("faultline")?;
    std::thread::sleep(Duration::from_secs(3));
    let (idle, _) = agent.rss_kib();
    let cpu0 = agent.cpu_seconds();
    std::thread::sleep(Duration::from_secs(if env.quick { 1 } else { 10 }));
    let idle_cpu = (agent.cpu_seconds() - cpu0) / if env.quick { 1.0 } else { 10.0 };

    let churn_root = BenchCgroup::create(&cgroup2_root()?, "faultline-bench-churn")?;
    let t = Instant::now();
    run_measured(
        Command::new(env.bin.join("faultline-lab"))
            .args(["churn", &cgroups.to_string(), "--churn-root"])
            .arg(&churn_root.dir),
    )?;
    let churn_secs = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let (after, hwm) = agent.rss_kib();
    agent.stop()?;
    found.startup_ms = startup * 1000.0;
    found.rss_10k_mib = after as f64 / 1024.0;
    writeln!(
        doc,
        "## Agent footprint (`faultline run`)\n\n| measure | value |\n|---|---|\n| exec to ready (`/readyz` 200; median of runs) | {:.0} ms |\n| RSS idle | {:.1} MiB |\n| CPU idle | {:.2}% of one CPU |\n| RSS after {cgroups} cgroups created and removed ({churn_secs:.1} s) | {:.1} MiB (peak {:.1} MiB) |\n",
        startup * 1000.0,
        idle as f64 / 1024.0,
        idle_cpu * 100.0,
        after as f64 / 1024.0,
        hwm as f64 / 1024.0
    )?;
    Ok(())
}
