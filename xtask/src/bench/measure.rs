//! What the benchmark measures with: agents running beside a workload (faultline, bpftrace,
//! tcpdump) and their CPU time, context switches and memory from /proc, per-program eBPF run
//! time from the kernel's own statistics (`kernel.bpf_stats_enabled`), and workloads run with
//! their CPU time taken from wait4(2) or their cgroup's `cpu.stat`.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    os::unix::process::ExitStatusExt as _,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// A process observed beside the workload: its CPU time and memory.
pub struct Agent {
    child: Child,
    pub name: String,
}

/// What an agent prints once it is attached, on stdout or stderr.
pub enum Ready {
    Stderr(&'static str),
    Stdout(&'static str),
}

impl Agent {
    /// Starts `cmd` and waits (30 s at most) for its ready line.
    pub fn start(name: &str, cmd: &mut Command, ready: Ready) -> anyhow::Result<Agent> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let (pipe, needle): (Box<dyn std::io::Read + Send>, &str) = match ready {
            Ready::Stderr(n) => (Box::new(child.stderr.take().context("stderr")?), n),
            Ready::Stdout(n) => (Box::new(child.stdout.take().context("stdout")?), n),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the pipe to its end (so the agent never blocks on a full pipe) and says when
        // the ready line has been seen.
        std::thread::spawn(move || {
            let mut seen = false;
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if !seen && line.contains(needle) {
                    seen = true;
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{name} did not become ready");
        }
        // The other pipe is drained too.
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut { pipe }, &mut std::io::sink());
            });
        }
        Ok(Agent {
            child,
            name: name.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User plus system CPU seconds so far.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds_of(self.pid())
    }

    /// (user, system) CPU seconds so far, of all its threads.
    pub fn cpu_split(&self) -> (f64, f64) {
        cpu_split_of(self.pid())
    }

    /// (voluntary, involuntary) context switches of its threads alive now (the kernel counts
    /// them per thread; those of threads that ended are not in /proc).
    pub fn context_switches(&self) -> (u64, u64) {
        let mut total = (0, 0);
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return total;
        };
        for task in tasks.flatten() {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            let field = |name: &str| -> u64 {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0)
            };
            total.0 += field("voluntary_ctxt_switches:");
            total.1 += field("nonvoluntary_ctxt_switches:");
        }
        total
    }

    /// (VmRSS, VmHWM) in KiB.
    pub fn rss_kib(&self) -> (u64, u64) {
        rss_kib_of(self.pid())
    }

    /// SIGINT (repeated every second: bpftrace can miss one that arrives outside its poll),
    /// then SIGKILL after 10 s.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut next_signal = Instant::now();
        loop {
            if Instant::now() >= next_signal {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
                next_signal += Duration::from_secs(1);
            }
            if let Some(status) = self.child.try_wait()? {
                if status.success() || status.signal() == Some(libc::SIGINT) {
                    return Ok(());
                }
                bail!("{} exited with {status}", self.name);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("{} did not stop on SIGINT", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of a process from /proc/<pid>/stat.
pub fn cpu_seconds_of(pid: u32) -> f64 {
    let (user, system) = cpu_split_of(pid);
    user + system
}

/// (utime, stime) of a process (all its threads) from /proc/<pid>/stat, in seconds.
pub fn cpu_split_of(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces): state is field 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the state.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) / hz, ticks(12) / hz)
}

/// (user, system) CPU microseconds of every task that ran in a cgroup v2 directory and its
/// descendants (`cpu.stat`, kept by cgroup v2 with or without the cpu controller).
pub fn cgroup_cpu_usec(dir: &Path) -> anyhow::Result<(u64, u64)> {
    let path = dir.join("cpu.stat");
    let stat =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        stat.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no {name} in {}", path.display()))
    };
    Ok((field("user_usec")?, field("system_usec")?))
}

/// The ids of the eBPF programs a process holds (its program and link descriptors'
/// `prog_id`): its own, whatever else is loaded on the machine.
pub fn prog_ids_of(pid: u32) -> std::collections::HashSet<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Default::default();
    };
    fds.flatten()
        .filter_map(|fd| std::fs::read_to_string(fd.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect()
}

/// A finished workload run: its stdout and CPU time.
pub struct Run {
    pub stdout: String,
    pub cpu: Duration,
}

/// Runs a command to completion and takes its CPU time from wait4(2).
pub fn run_measured(cmd: &mut Command) -> anyhow::Result<Run> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .context("stdout")?
        .read_to_string(&mut stdout)?;
    child
        .stderr
        .take()
        .context("stderr")?
        .read_to_string(&mut stderr)?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child, with valid out-pointers.
    let rc = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    if rc < 0 {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{cmd:?} failed ({status:#x}): {stderr}");
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok(Run {
        stdout,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
    })
}

/// A numeric field of a faultline-lab JSON report.
pub fn report_field(text: &str, name: &str) -> Option<f64> {
    let start = text.find(&format!("\"{name}\":"))? + name.len() + 3;
    text[start..].split([',', '}']).next()?.trim().parse().ok()
}

/// eBPF programs' cumulative run time and run count, per program id, as the kernel counts
/// them while `kernel.bpf_stats_enabled` is 1, and each program's size (instructions after
/// the verifier's rewrite, bytes of native code).
#[derive(Clone, Default)]
pub struct ProgStats(HashMap<u64, (String, u64, u64)>, HashMap<u64, (u64, u64)>);

impl ProgStats {
    /// Every loaded program (name, run_time_ns, run_cnt) from `bpftool prog show`.
    pub fn read() -> anyhow::Result<ProgStats> {
        let out = Command::new("bpftool")
            .args(["prog", "show", "--json"])
            .output()
            .context("running bpftool (installed by cargo xtask setup)")?;
        let progs: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("parsing bpftool's JSON")?;
        let mut map = HashMap::new();
        let mut sizes = HashMap::new();
        for p in progs.as_array().into_iter().flatten() {
            let id = p["id"].as_u64().unwrap_or(0);
            sizes.insert(
                id,
                (
                    p["bytes_xlated"].as_u64().unwrap_or(0) / 8,
                    p["bytes_jited"].as_u64().unwrap_or(0),
                ),
            );
            map.insert(
                id,
                (
                    p["name"].as_str().unwrap_or("?").to_owned(),
                    p["run_time_ns"].as_u64().unwrap_or(0),
                    p["run_cnt"].as_u64().unwrap_or(0),
                ),
            );
        }
        Ok(ProgStats(map, sizes))
    }

    /// (name, instructions, native bytes) of the programs loaded since `existing`.
    pub fn sizes(&self, existing: &ProgStats) -> Vec<(String, u64, u64)> {
        let mut out: Vec<(String, u64, u64)> = self
            .0
            .iter()
            .filter(|(id, _)| !existing.0.contains_key(id))
            .map(|(id, (name, _, _))| {
                let (insns, jited) = self.1.get(id).copied().unwrap_or_default();
                (name.clone(), insns, jited)
            })
            .collect();
        out.sort();
        out
    }

    /// Per program loaded since `existing` was read (the agent's): (name, runs, ns) between
    /// `before` and `self`.
    pub fn since(&self, before: &ProgStats, existing: &ProgStats) -> Vec<(String, u64, u64)> {
        self.between(before, |id| !existing.0.contains_key(id))
    }

    /// Per program of `ids` (a process's, [`prog_ids_of`]): (name, runs, ns) between `before`
    /// and `self`.
    pub fn held(
        &self,
        before: &ProgStats,
        ids: &std::collections::HashSet<u64>,
    ) -> Vec<(String, u64, u64)> {
        self.between(before, |id| ids.contains(id))
    }

    /// [`ProgStats::held`] of every program but `ids`: other tools' on the machine.
    pub fn not_held(
        &self,
        before: &ProgStats,
        ids: &std::collections::HashSet<u64>,
    ) -> Vec<(String, u64, u64)> {
        self.between(before, |id| !ids.contains(id))
    }

    /// Per program `keep` takes, (name, runs, ns) between `before` and `self`; those that did
    /// not run are left out.
    fn between(&self, before: &ProgStats, keep: impl Fn(&u64) -> bool) -> Vec<(String, u64, u64)> {
        let mut out: Vec<(String, u64, u64)> = self
            .0
            .iter()
            .filter(|(id, _)| keep(id))
            .map(|(id, (name, ns, runs))| {
                let (b_ns, b_runs) = before.0.get(id).map_or((0, 0), |b| (b.1, b.2));
                (name.clone(), runs - b_runs.min(*runs), ns - b_ns.min(*ns))
            })
            .filter(|(_, runs, _)| *runs > 0)
            .collect();
        out.sort();
        out
    }
}

/// Sets a sysctl for the benchmark's lifetime and restores it on drop.
pub struct Sysctl {
    path: &'static str,
    old: String,
}

impl Sysctl {
    pub fn set(path: &'static str, value: &str) -> anyhow::Result<Sysctl> {
        let old = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        std::fs::write(path, value).with_context(|| format!("writing {path}"))?;
        Ok(Sysctl {
            path,
            old: old.trim().to_owned(),
        })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, &self.old);
    }
}

/// GET http://127.0.0.1:port/path; the body when the status is 200.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1) == Some("200")).then(|| body.to_owned())
}

/// The sum of every sample of a metric family in a text exposition, filtered by a label
/// substring.
pub fn metric_sum(exposition: &str, family: &str, label_filter: &str) -> f64 {
    metric_sum_all(exposition, family, &[label_filter])
}

/// [`metric_sum`] of the samples whose labels hold every one of `label_filters`.
pub fn metric_sum_all(exposition: &str, family: &str, label_filters: &[&str]) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter(|l| label_filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A cgroup directory of the benchmark's, removed on drop.
pub struct BenchCgroup {
    pub dir: std::path::PathBuf,
}

impl BenchCgroup {
    /// A pids cgroup limited to `max` tasks: v1 where the pids controller is v1, else v2.
    pub fn pids(name: &str, max: u32) -> anyhow::Result<BenchCgroup> {
        let v1 = Path::new("/sys/fs/cgroup/pids");
        let parent = if v1.join("cgroup.procs").exists() {
            v1.to_path_buf()
        } else {
            let root = cgroup2_root()?;
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+pids");
            root
        };
        let cg = BenchCgroup::create(&parent, name)?;
        std::fs::write(cg.dir.join("pids.max"), max.to_string())
            .with_context(|| format!("limiting {}", cg.dir.display()))?;
        Ok(cg)
    }

    pub fn create(parent: &Path, name: &str) -> anyhow::Result<BenchCgroup> {
        let dir = parent.join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(BenchCgroup { dir })
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.dir);
    }
}

/// Removes a cgroup directory; tasks still exiting in it (none, normally) would keep it a
/// moment: bounded retries, 1 s at most. Cgroups a failed workload left below it go first,
/// deepest first.
pub fn remove_cgroup(dir: &Path) {
    for _ in 0..50 {
        remove_below(dir);
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes the cgroup directories below `dir`, deepest first (what can be: one with tasks
/// stays).
fn remove_below(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_below(&entry.path());
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

/// A process's (VmRSS, VmHWM) in KiB; zeros once it is gone.
pub fn rss_kib_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// KiB as MiB.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Where cgroup v2 is mounted (hybrid hosts: /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> anyhow::Result<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("reading mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| std::path::PathBuf::from(f[1]))
        })
        .context("cgroup v2 is not mounted")
}
