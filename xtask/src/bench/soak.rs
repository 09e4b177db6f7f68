//! Memory as pods come and go: faultline as the DaemonSet runs it (`bench/as_deployed.rs`: the
//! manifest's capabilities, mounts, namespaces, args, environment and 128 MiB memory limit),
//! scraped as its ServiceMonitor has a highly available pair of Prometheus replicas scrape it,
//! while `faultline-lab pod-churn` makes and removes pods as the kubelet lays them out
//! (lab/src/pods.rs: cgroups in the systemd driver's layout, the kubelet's log directories, a
//! process that creates a thread, has a fork refused by the pod's pids limit and asks one DNS
//! question).
//!
//! 1. Bytes per live pod: the daemon's RSS with no pod, then with N pods alive after three
//!    refreshes; the difference over N. Then the RSS once they are gone.
//! 2. The soak: 20,000 pods, each with a network namespace of its own held by its process (a
//!    pause container's uid), at most 500 alive at once, 100 made per second. The RSS every
//!    100 ms, its least and most in each scrape interval; the level is the first interval by
//!    which a quarter of the pods had been made, a minute or more in (every bound full by
//!    then: 2,000 series per metric, the explain history's 4,096 tallies, the 4,096 pods whose
//!    names are kept, the names of cgroups removed within the last minute), the end the
//!    churn's last interval; flat when the end's least (the state between scrapes) is within
//!    FLAT_WITHIN_MIB of the level's. The most adds an exposition being encoded and sent (its
//!    blocks mapped apart and unmapped after, memory.rs): whether a 100 ms sample catches one
//!    is chance, so the most is reported, and bounded by the OOM kills the memory cgroup saw
//!    (none allowed) and the high-water mark.
//!
//! Departures from the DaemonSet, as in the busy node's: ports of its own on loopback, no
//! bearer token asked on `/metrics`, no Kubernetes API (pods named from the churn's own kubelet
//! log root, under /tmp, which the launcher mounts).

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use super::{
    Env, Findings,
    as_deployed::Deployed,
    measure::{Agent, BenchCgroup, Ready, cgroup2_root, http_get, mib, rss_kib_of},
};

/// How often the daemon is scraped: deploy/monitoring/servicemonitor.yaml's 30 s from each of a highly
/// available pair of Prometheus replicas.
const SCRAPE_EVERY: Duration = Duration::from_secs(15);
/// faultline's refresh, which the DaemonSet keeps.
const REFRESH: Duration = Duration::from_secs(5);

/// `n` refreshes' time; one in the quick run, which only checks that the measurement works.
fn refreshes(env: &Env, n: u32) -> Duration {
    REFRESH * if env.quick { 1 } else { n }
}
/// Where the pods' DNS questions go: a faultline-lab responder on a port 53 of its own.
const DNS_SERVER: &str = "127.53.0.35:53";
/// The soak's most pods alive at once.
const SOAK_LIVE: u32 = 500;
/// The soak's pods made per second: a fast churn (a node's CronJobs all firing, a rollout of
/// many replicas), and the same on a busy machine as on an idle one.
const SOAK_RATE: u32 = 100;
/// How long the names of removed cgroups are kept (attribution/cgroups.rs): the level is
/// taken no sooner.
const NAMES_KEPT: Duration = Duration::from_secs(60);
/// What the state (the least RSS of a scrape interval) may have grown above the level by the
/// end of the soak.
pub const FLAT_WITHIN_MIB: f64 = 4.0;

/// What the soak found, for the targets.
pub struct SoakFindings {
    pub pods: u32,
    /// The level's interval and the last one.
    pub level: Window,
    pub end: Window,
    pub hwm_mib: f64,
    pub oom_kills: u64,
}

pub fn run(root: &Path, env: &Env, doc: &mut String, found: &mut Findings) -> anyhow::Result<()> {
    let (live, soak) = if env.quick {
        (20, 300)
    } else {
        (1_000, 20_000)
    };
    let _dns = Agent::start(
        "DNS server",
        Command::new(env.bin.join("faultline-lab")).args([
            "dns-server",
            "3600",
            "--dns-listen",
            DNS_SERVER,
        ]),
        Ready::Stderr("DNS responder"),
    )?;
    let per_pod = live_pods(root, env, live)?;
    let soaked = churn(root, env, soak)?;
    writeln!(
        doc,
        "## Memory as pods come and go\n\n`faultline run` as the DaemonSet runs it (`faultline-as-deployed`: the manifest's capabilities, mounts, namespaces, args and environment; ports on loopback, no bearer token asked on `/metrics`, no Kubernetes API and the churn's own kubelet log root its only departures), in a memory cgroup limited to the manifest's 128 MiB, scraped every {} s (its ServiceMonitor's 30 s from each of two Prometheus replicas), while `faultline-lab pod-churn` makes and removes pods as the kubelet lays them out: the systemd driver's pod slice and container scope, a pids limit of 2, the kubelet's log directories, and a process that creates a thread, has a fork refused and asks one DNS question (events, series, history and attribution for every pod).\n",
        SCRAPE_EVERY.as_secs()
    )?;
    writeln!(
        doc,
        "| measure | value |\n|---|---|\n| RSS with no pod | {:.1} MiB |\n| RSS with {live} pods alive (three refreshes later) | {:.1} MiB |\n| **bytes per live pod** | **{:.0}** ({:.1} KiB) |\n| RSS after a scrape of their series | {:.1} MiB |\n| RSS once they are gone (two refreshes later) | {:.1} MiB |\n",
        per_pod.idle_mib,
        per_pod.live_mib,
        per_pod.bytes_per_pod,
        per_pod.bytes_per_pod / 1024.0,
        per_pod.scraped_mib,
        per_pod.gone_mib,
    )?;
    writeln!(
        doc,
        "The soak: {soak} pods, each with a network namespace of its own (held by its process as a pause container's uid 65535, found by faultline through `/proc/<pid>/net` as deployed), at most {SOAK_LIVE} alive at once, at most {SOAK_RATE} made per second: in {:.0} s ({:.0} pods/s). The RSS (sampled every 100 ms) in each scrape interval of the churn: its least (the state) and its most (with an exposition encoded and sent):\n\n| interval from | pods made by its end | RSS least | RSS most |\n|---|---|---|---|",
        soaked.churn_secs,
        f64::from(soak) / soaked.churn_secs
    )?;
    for w in &soaked.windows {
        writeln!(
            doc,
            "| {:.0} s | {} | {:.1} MiB | {:.1} MiB |",
            w.from_s, w.made, w.floor_mib, w.peak_mib
        )?;
    }
    writeln!(
        doc,
        "\nLevel (the first interval by which a quarter of the pods had been made, a minute or more in: every bound full, the names of removed cgroups kept a minute) **{:.1} MiB** at most ({:.1} least), the churn's last interval **{:.1} MiB** at most ({:.1} least), {} s after the churn {:.1} MiB; high-water mark (VmHWM) {:.1} MiB; the cgroup's peak {}, OOM kills **{}**.\n",
        soaked.level.peak_mib,
        soaked.level.floor_mib,
        soaked.end.peak_mib,
        soaked.end.floor_mib,
        soaked.settle_secs,
        soaked.settled_mib,
        soaked.hwm_mib,
        soaked
            .cgroup_peak_mib
            .map_or("not kept here".to_owned(), |p| format!("{p:.1} MiB")),
        soaked.oom_kills,
    )?;
    found.soak = Some(SoakFindings {
        pods: soak,
        level: soaked.level,
        end: soaked.end,
        hwm_mib: soaked.hwm_mib,
        oom_kills: soaked.oom_kills,
    });
    found.bytes_per_live_pod = Some(per_pod.bytes_per_pod);
    Ok(())
}

/// The daemon's RSS per live pod.
struct PerPod {
    idle_mib: f64,
    live_mib: f64,
    scraped_mib: f64,
    gone_mib: f64,
    bytes_per_pod: f64,
}

fn live_pods(root: &Path, env: &Env, n: u32) -> anyhow::Result<PerPod> {
    let place = Place::new()?;
    let running = Deployed::start(root, env, &place.logs)?;
    let agent = &running.agent;
    std::thread::sleep(refreshes(env, 2));
    let idle = agent.rss_kib().0;
    let mut pods = Churn::start(env, &place, n, n, &["--hold"])?;
    pods.wait_for("live", Duration::from_secs(120))?;
    std::thread::sleep(refreshes(env, 3));
    let live = agent.rss_kib().0;
    http_get(running.port, "/metrics").context("faultline's /metrics")?;
    let scraped = agent.rss_kib().0;
    pods.release()?;
    std::thread::sleep(refreshes(env, 2));
    let gone = agent.rss_kib().0;
    running.agent.stop()?;
    Ok(PerPod {
        idle_mib: mib(idle),
        live_mib: mib(live),
        scraped_mib: mib(scraped),
        gone_mib: mib(gone),
        bytes_per_pod: (live as f64 - idle as f64) * 1024.0 / f64::from(n),
    })
}

/// What the soak measured.
struct Soaked {
    churn_secs: f64,
    /// How long after the churn the daemon was still watched.
    settle_secs: u64,
    /// Each scrape interval within the churn.
    windows: Vec<Window>,
    /// The interval a quarter through, and the last.
    level: Window,
    end: Window,
    settled_mib: f64,
    hwm_mib: f64,
    cgroup_peak_mib: Option<f64>,
    oom_kills: u64,
}

/// One scrape interval (a scrape, then the refreshes until the next): the pods made by its
/// end, and the least and the most RSS within it (the state, and the state with an
/// exposition encoded and sent).
#[derive(Clone, Copy)]
pub struct Window {
    /// Seconds from the churn's start to the interval's.
    from_s: f64,
    made: u32,
    pub floor_mib: f64,
    pub peak_mib: f64,
}

impl Window {
    /// The samples between `from` and `to`, and the pods made by `to`, for a churn that began
    /// at `start`.
    fn of(
        samples: &[(Instant, u64)],
        marks: &[(u32, Instant)],
        start: Instant,
        (from, to): (Instant, Instant),
    ) -> Window {
        let within = samples
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, kib)| *kib);
        Window {
            from_s: from.saturating_duration_since(start).as_secs_f64(),
            made: marks
                .iter()
                .filter(|(_, t)| *t <= to)
                .map(|(made, _)| *made)
                .max()
                .unwrap_or(0),
            floor_mib: mib(within.clone().min().unwrap_or(0)),
            peak_mib: mib(within.max().unwrap_or(0)),
        }
    }
}

fn churn(root: &Path, env: &Env, count: u32) -> anyhow::Result<Soaked> {
    let place = Place::new()?;
    let running = Deployed::start(root, env, &place.logs)?;
    let agent = &running.agent;
    std::thread::sleep(refreshes(env, 2));
    let stop = Arc::new(AtomicBool::new(false));
    let rss = Arc::new(Mutex::new(Vec::<(Instant, u64)>::new()));
    let sampler = {
        let (stop, rss, pid) = (stop.clone(), rss.clone(), agent.pid());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let (kib, _) = rss_kib_of(pid);
                if kib > 0
                    && let Ok(mut v) = rss.lock()
                {
                    v.push((Instant::now(), kib));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let scrapes = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let scraper = {
        let (stop, scrapes, port) = (stop.clone(), scrapes.clone(), running.port);
        std::thread::spawn(move || {
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if Instant::now() >= next {
                    if let Ok(mut v) = scrapes.lock() {
                        v.push(Instant::now());
                    }
                    let _ = http_get(port, "/metrics");
                    next += SCRAPE_EVERY;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let start = Instant::now();
    let rate = SOAK_RATE.to_string();
    let mut pods = Churn::start(
        env,
        &place,
        count,
        SOAK_LIVE,
        &["--pod-netns", "--rate", &rate],
    )?;
    let marks = pods.finish()?;
    let ended = Instant::now();
    // The refreshes after the last pod went, and a scrape.
    let settle = refreshes(env, 6);
    std::thread::sleep(settle);
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let _ = scraper.join();
    let (_, hwm) = agent.rss_kib();
    let memory = running.cgroups.memory();
    let lock_failed = || anyhow::anyhow!("a measuring thread panicked");
    let samples = rss.lock().map_err(|_| lock_failed())?.clone();
    let scrapes = scrapes.lock().map_err(|_| lock_failed())?.clone();
    let windows: Vec<Window> = scrapes
        .windows(2)
        .filter(|w| w[0] >= start && w[1] <= ended)
        .map(|w| Window::of(&samples, &marks, start, (w[0], w[1])))
        .collect();
    // A churn shorter than two scrapes (the quick run) is one window.
    let whole = Window::of(&samples, &marks, start, (start, ended));
    let level = windows
        .iter()
        .find(|w| w.made >= count / 4 && w.from_s >= NAMES_KEPT.as_secs_f64())
        .copied()
        .unwrap_or(whole);
    let soaked = Soaked {
        churn_secs: ended.duration_since(start).as_secs_f64(),
        settle_secs: settle.as_secs(),
        level,
        end: windows.last().copied().unwrap_or(whole),
        windows,
        settled_mib: mib(samples.last().map_or(0, |(_, kib)| *kib)),
        hwm_mib: mib(hwm),
        cgroup_peak_mib: memory.map(|(_, peak)| peak as f64 / 1048576.0),
        oom_kills: memory.map_or(0, |(kills, _)| kills),
    };
    running.agent.stop()?;
    Ok(soaked)
}

/// Where a churn's pods go: a cgroup v2 directory, the v1 pids hierarchy's where pids is v1,
/// and a kubelet log root; all removed on drop.
struct Place {
    roots: Vec<BenchCgroup>,
    logs: PathBuf,
}

impl Place {
    fn new() -> anyhow::Result<Place> {
        let mut roots = vec![BenchCgroup::create(
            &cgroup2_root()?,
            "faultline-bench-pods",
        )?];
        let v1_pids = Path::new("/sys/fs/cgroup/pids");
        if v1_pids.join("cgroup.procs").exists() {
            roots.push(BenchCgroup::create(v1_pids, "faultline-bench-pods")?);
        }
        // Under /tmp: the launcher mounts the host's.
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let logs = std::env::temp_dir().join(format!(
            "faultline-bench-kubelet-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        Ok(Place { roots, logs })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.logs);
    }
}

/// A running `faultline-lab pod-churn`: its progress lines as they come; killed on drop (its
/// pods' processes die with it; the directories go with the Place).
struct Churn {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<(Instant, Value)>,
}

impl Churn {
    fn start(
        env: &Env,
        place: &Place,
        count: u32,
        live: u32,
        extra: &[&str],
    ) -> anyhow::Result<Churn> {
        let mut cmd = Command::new(env.bin.join("faultline-lab"));
        cmd.args(["pod-churn", &count.to_string(), "--live", &live.to_string()])
            .args(["--pod-dns", "--dns-server", DNS_SERVER, "--kubelet-logs"])
            .arg(&place.logs)
            .args(extra);
        for root in &place.roots {
            cmd.arg("--pods-root").arg(&root.dir);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting faultline-lab pod-churn")?;
        let stdout = child.stdout.take().context("pod-churn's stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send((Instant::now(), v));
                }
            }
        });
        Ok(Churn {
            stdin: child.stdin.take(),
            child,
            lines,
        })
    }

    /// Waits for a line with `field`.
    fn wait_for(&mut self, field: &str, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((_, v)) if !v[field].is_null() => return Ok(()),
                Ok(_) => {}
                Err(_) => bail!("pod-churn said no {field:?} within {within:?}"),
            }
        }
    }

    /// Lets held pods go (stdin ends), then [`Churn::finish`].
    fn release(mut self) -> anyhow::Result<Vec<(u32, Instant)>> {
        drop(self.stdin.take());
        self.finish()
    }

    /// Waits for the churn's end: when each progress line came, by pods made.
    fn finish(&mut self) -> anyhow::Result<Vec<(u32, Instant)>> {
        let status = self.child.wait().context("waiting for pod-churn")?;
        if !status.success() {
            bail!("faultline-lab pod-churn failed ({status}); its stderr says why");
        }
        Ok(self
            .lines
            .try_iter()
            .filter_map(|(t, v)| Some((u32::try_from(v["made"].as_u64()?).ok()?, t)))
            .collect())
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
