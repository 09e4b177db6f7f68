//! Shared harness of the integration tests: runs the real `faultline` and `faultline-lab`
//! binaries as root on the real kernel, and cleans up every cgroup and sysctl it touches,
//! also when a test fails (Drop guards run while a panic unwinds). faultline itself is started
//! by [`faultline`]: as the DaemonSet runs it when `FAULTLINE_AS_DEPLOYED` names a profile
//! (`cargo xtask test` and `vm-test` set it), else as plain root.
#![allow(dead_code)] // each test binary uses a different part

pub mod ctlab;
pub mod events_api;
pub mod manifest;
pub mod review_api;

use std::{
    io::{BufRead, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    os::fd::FromRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{LazyLock, mpsc},
    time::{Duration, Instant},
};

use probe_user::attribution::cgroups::{CgroupFs, Hierarchy};
use serde_json::Value;

/// The binaries under test: cargo's, or the copies `cargo xtask vm-test` made for a VM run
/// (`FAULTLINE_BIN_DIR`), so that a rebuild during the run cannot swap them.
pub static FAULTLINE: LazyLock<String> =
    LazyLock::new(|| binary("faultline", env!("CARGO_BIN_EXE_faultline")));
/// faultline-lab is a crate of its own (`lab/`, never shipped): cargo builds it next to
/// faultline (`cargo xtask test` does; `cargo build -p faultline-lab` by hand).
pub static LAB: LazyLock<String> = LazyLock::new(|| {
    let built = Path::new(env!("CARGO_BIN_EXE_faultline")).with_file_name("faultline-lab");
    let lab = binary("faultline-lab", &built.display().to_string());
    assert!(
        Path::new(&lab).exists(),
        "{lab} is missing: build it with `cargo build -p faultline-lab` (`cargo xtask test` does)"
    );
    lab
});

/// The launcher that runs faultline as the DaemonSet does (lab/src/bin/faultline-as-deployed.rs,
/// built with faultline-lab), and the profile it reads: only when `FAULTLINE_AS_DEPLOYED` names
/// one (`cargo xtask as-deployed-profile` writes target/as-deployed/profile.json).
pub static AS_DEPLOYED: LazyLock<Option<AsDeployed>> = LazyLock::new(|| {
    let profile = std::env::var("FAULTLINE_AS_DEPLOYED")
        .ok()
        .filter(|p| !p.is_empty())?;
    assert!(
        Path::new(&profile).exists(),
        "FAULTLINE_AS_DEPLOYED={profile}: no such profile (`cargo xtask as-deployed-profile`)"
    );
    let built = Path::new(env!("CARGO_BIN_EXE_faultline")).with_file_name("faultline-as-deployed");
    let launcher = binary("faultline-as-deployed", &built.display().to_string());
    assert!(
        Path::new(&launcher).exists(),
        "{launcher} is missing: build it with `cargo build -p faultline-lab`"
    );
    let memlock = std::env::var("FAULTLINE_AS_DEPLOYED_MEMLOCK").unwrap_or("65536".to_owned());
    // A node has tracefs mounted (systemd's sys-kernel-tracing.mount); the DaemonSet's hostPath
    // only passes it in, and faultline cannot mount it without CAP_SYS_ADMIN.
    probe_user::kernel::tracefs::Tracefs::find_or_mount().expect("tracefs on this node");
    Some(AsDeployed {
        launcher,
        profile,
        memlock,
    })
});

pub struct AsDeployed {
    pub launcher: String,
    pub profile: String,
    pub memlock: String,
}

/// What the DaemonSet's container runs: its args and the environment the manifest writes
/// (literal values; `NODE_NAME` and the pod's own name come from the API, and faultline's
/// fallbacks stand in for them here). [`Daemon`] starts `faultline run` with exactly these:
/// the shipped defaults. From the as-deployed profile, else from `kubectl kustomize deploy/`.
pub static CONTAINER: LazyLock<Container> = LazyLock::new(|| {
    let container = match &*AS_DEPLOYED {
        Some(d) => {
            let text = std::fs::read_to_string(&d.profile).expect("reading the profile");
            let profile: Value = serde_json::from_str(&text).expect("the profile is JSON");
            profile["container"].clone()
        }
        None => {
            let docs = manifest::rendered();
            let ds = docs
                .iter()
                .find(|d| d["kind"] == "DaemonSet")
                .expect("deploy/ has a DaemonSet");
            let containers = ds["spec"]["template"]["spec"]["containers"]
                .as_array()
                .expect("containers");
            containers
                .iter()
                .find(|c| c["name"] == "faultline")
                .expect("the faultline container")
                .clone()
        }
    };
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect()
    };
    let env = container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_owned(),
                e["value"].as_str()?.to_owned(),
            ))
        })
        .collect();
    Container {
        args: strings(&container["args"]),
        env,
    }
});

pub struct Container {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// `cmd` (faultline, or a launcher of it) made the DaemonSet's container: its args (`run`) and
/// environment. What a test adds after it departs from what ships, and says why.
pub fn as_shipped(cmd: &mut Command) -> &mut Command {
    cmd.args(&CONTAINER.args)
        .envs(CONTAINER.env.iter().map(|(k, v)| (k, v)))
}

/// The departures from the DaemonSet's settings of every `faultline run` a test starts, said
/// once here: a health port of its own on loopback (the DaemonSet's 9848 is one per node, and
/// tests run side by side), and no bearer token asked for on /metrics and /explain (no API
/// here reviews tokens; tests/auth.rs restores the shipped setting against a stand-in API that
/// does). Set before a test's own environment, which may undo them. Returns the health port.
pub fn run_departures(cmd: &mut Command) -> u16 {
    let health = free_port();
    cmd.args(["--health-listen", &format!("127.0.0.1:{health}")])
        .env("FAULTLINE_KUBE_RBAC", "false");
    health
}

/// The command line that starts faultline: the launcher and its arguments first when running
/// as deployed; with `full_root` the launcher keeps every capability (all else as deployed).
pub fn faultline_argv(full_root: bool) -> Vec<String> {
    let mut argv = Vec::new();
    if let Some(d) = &*AS_DEPLOYED {
        argv.extend([
            d.launcher.clone(),
            "--profile".to_owned(),
            d.profile.clone(),
            "--memlock".to_owned(),
            d.memlock.clone(),
        ]);
        if full_root {
            argv.push("--full-root".to_owned());
        }
        argv.push("--".to_owned());
    }
    argv.push(FAULTLINE.clone());
    argv
}

/// `faultline`, as the DaemonSet runs it when `FAULTLINE_AS_DEPLOYED` is set: every test
/// starts faultline through this (or says at the call why it needs [`faultline_full_root`]).
pub fn faultline() -> Command {
    command(&faultline_argv(false))
}

/// `faultline` with every capability, for a test that needs more than the manifest gives (the
/// call says what); otherwise as deployed all the same (mounts, namespaces, memlock).
pub fn faultline_full_root() -> Command {
    command(&faultline_argv(true))
}

/// [`faultline_argv`] as one shell word list, for `sh -c`.
pub fn faultline_shell() -> String {
    faultline_argv(false)
        .iter()
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

fn command(argv: &[String]) -> Command {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    cmd
}

fn binary(name: &str, built: &str) -> String {
    match std::env::var("FAULTLINE_BIN_DIR") {
        Ok(dir) => format!("{dir}/{name}"),
        Err(_) => built.to_owned(),
    }
}

/// Longest wait for faultline to load and attach (cold caches on a busy 2-core machine).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A name no other call makes, in this process or another: tests of one binary run side by
/// side, and two that asked for the same name (the harness's `kubelet-logs`) shared a
/// directory that the first to finish removed under the other.
pub fn unique(name: &str) -> String {
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("faultline-test-{name}-{}-{n}", std::process::id())
}

/// Runs a shell command that must succeed.
pub fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Says that this test did not run what it tests here, and why: on stderr, and as a line of
/// the file `FAULTLINE_TEST_SKIPS` names (`cargo xtask test` and each VM of the matrix set it,
/// and list its lines at the end), so a skip is counted rather than passing as `ok`. The
/// test returns after it.
pub fn skipped(reason: &str) {
    use std::io::Write as _;
    let test = std::thread::current().name().unwrap_or("?").to_owned();
    // A test binary is `<name>-<hash>` under target/, `<name>` in the VMs.
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|s| s.split('-').next().unwrap_or_default().to_owned())
        .unwrap_or_default();
    eprintln!("skipped: {reason}");
    if let Some(path) = std::env::var_os("FAULTLINE_TEST_SKIPS") {
        let line = format!("{binary}::{test}: {reason}\n");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            panic!("recording the skip in {}: {e}", path.to_string_lossy());
        }
    }
}

pub fn require_root() {
    assert_eq!(
        // SAFETY: geteuid cannot fail.
        unsafe { libc::geteuid() },
        0,
        "the integration tests load eBPF programs: run them as root"
    );
}

/// A running `faultline` command (trace or top) whose output lines are collected.
pub struct Trace {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl Trace {
    /// Starts `faultline trace --output json` and waits until its programs are attached.
    pub fn start(extra: &[&str]) -> Trace {
        Self::start_with_output("json", extra)
    }

    pub fn start_with_output(output: &str, extra: &[&str]) -> Trace {
        let args = [&["trace", "--output", output][..], extra].concat();
        Self::start_command(faultline(), &args, "faultline: tracing")
    }

    /// [`Trace::start`] with every capability ([`faultline_full_root`]).
    pub fn start_full_root(extra: &[&str]) -> Trace {
        let args = [&["trace", "--output", "json"][..], extra].concat();
        Self::start_command(faultline_full_root(), &args, "faultline: tracing")
    }

    /// Starts `faultline top --output json` and waits until its programs are attached.
    pub fn start_top(extra: &[&str]) -> Trace {
        let args = [&["top", "--output", "json"][..], extra].concat();
        Self::start_command(faultline(), &args, "faultline: counting")
    }

    fn start_command(mut cmd: Command, args: &[&str], ready: &str) -> Trace {
        require_root();
        let mut child = cmd
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning faultline");
        let stdout = lines_of(child.stdout.take().expect("stdout"));
        let stderr = lines_of(child.stderr.take().expect("stderr"));
        let trace = Trace {
            child,
            stdout,
            stderr,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match trace.stderr.recv_timeout(left) {
                Ok(line) if line.starts_with(ready) => return trace,
                Ok(line) => eprintln!("faultline stderr: {line}"),
                Err(_) => {
                    panic!("faultline {args:?} did not report ready within {READY_TIMEOUT:?}")
                }
            }
        }
    }

    /// Names of the eBPF programs this faultline process holds (its `bpf-prog` file
    /// descriptors, named through bpftool).
    pub fn programs(&self) -> Vec<String> {
        let pid = self.child.id();
        let mut names = Vec::new();
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fds")
            .flatten()
        {
            let is_prog = std::fs::read_link(fd.path())
                .is_ok_and(|t| t.to_string_lossy().contains("bpf-prog"));
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            let Some(id) = info.lines().find_map(|l| l.strip_prefix("prog_id:")) else {
                continue;
            };
            if !is_prog {
                continue;
            }
            let out = Command::new("bpftool")
                .args(["prog", "show", "id", id.trim(), "--json"])
                .output()
                .expect("bpftool");
            let prog: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
            names.push(prog["name"].as_str().unwrap_or("?").to_owned());
        }
        names.sort();
        names
    }

    /// Reads JSON lines until one satisfies `pred`, for at most `timeout`; returns it.
    pub fn wait_for(&self, timeout: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    let v: Value = serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                    if pred(&v) {
                        return v;
                    }
                    last = Some(v);
                }
                Err(_) => panic!("no output line with {what} within {timeout:?}; last: {last:#?}"),
            }
        }
    }

    /// Stops the trace with SIGINT and returns its stdout lines and stderr text.
    pub fn stop(mut self) -> (Vec<String>, String) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for faultline") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "faultline trace did not stop within {STOP_TIMEOUT:?} of SIGINT"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let stdout: Vec<String> = self.stdout.iter().collect();
        let stderr: Vec<String> = self.stderr.iter().collect();
        assert!(
            status.success(),
            "faultline trace exited with {status}; stderr: {stderr:?}"
        );
        (stdout, stderr.join("\n"))
    }

    /// Stops the trace and parses its JSON lines into (events, summary).
    pub fn stop_json(self) -> (Vec<Value>, Value) {
        let (lines, stderr) = self.stop();
        let mut values: Vec<Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let summary = values.pop().expect("no summary line");
        assert_eq!(
            summary["kind"], "summary",
            "last line is not the summary; stderr: {stderr}"
        );
        assert!(
            values.iter().all(|v| [
                "clone_failure",
                "headroom_warning",
                "dns",
                "conntrack_drop",
                "conntrack_clash_resolved"
            ]
            .contains(&v["kind"].as_str().unwrap_or(""))),
            "{values:?}"
        );
        (values, summary)
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines_of(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// What faultline-lab printed.
#[derive(Debug)]
pub struct LabReport {
    pub pid: u64,
    pub created: u64,
    pub failures: u64,
    pub errnos: Vec<i64>,
}

/// Runs faultline-lab to completion (killed after 60 s at most) and parses its report.
pub fn lab(args: &[&str]) -> LabReport {
    Lab::spawn(args).finish()
}

/// `faultline run`'s event budget lifted: a line (and an OTLP record) for every event.
pub const NO_BUDGET: &[&str] = &[
    "--events-per-workload",
    "4000000000",
    "--events-per-second",
    "1e12",
];

/// A faultline-lab still running (holding its tasks, or leaking slowly).
pub struct Lab {
    child: Child,
    args: Vec<String>,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Lab {
    /// Arguments need not be UTF-8 (a cgroup directory's name is bytes).
    pub fn spawn(args: &[impl AsRef<std::ffi::OsStr>]) -> Lab {
        Self::spawn_in(None, args)
    }

    /// faultline-lab inside a named network namespace (`ip netns exec`), or in ours.
    pub fn spawn_in(netns: Option<&str>, args: &[impl AsRef<std::ffi::OsStr>]) -> Lab {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "timeout"]);
                c
            }
            None => Command::new("timeout"),
        };
        let mut child = cmd
            .args(["--signal=KILL", "60", &LAB])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning faultline-lab");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Lab {
            child,
            args: args
                .iter()
                .map(|s| s.as_ref().to_string_lossy().into_owned())
                .collect(),
            stdout,
        }
    }

    /// The next line the lab prints.
    pub fn line(&mut self) -> String {
        let mut out = String::new();
        self.stdout.read_line(&mut out).expect("reading lab stdout");
        out
    }

    /// The report, printed once the tasks are created (before --hold-ms).
    pub fn report(&mut self) -> LabReport {
        let out = self.line();
        assert!(
            !out.is_empty(),
            "faultline-lab {:?} printed no report",
            self.args
        );
        let v: Value = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("lab report not JSON ({e}): {out}"));
        LabReport {
            pid: v["pid"].as_u64().expect("pid"),
            created: v["created"].as_u64().expect("created"),
            failures: v["failures"].as_u64().expect("failures"),
            errnos: v["errnos"]
                .as_array()
                .expect("errnos")
                .iter()
                .filter_map(Value::as_i64)
                .collect(),
        }
    }

    /// The report, then the lab's end.
    pub fn finish(mut self) -> LabReport {
        let report = self.report();
        self.wait();
        report
    }

    pub fn wait(mut self) {
        let status = self.child.wait().expect("waiting for faultline-lab");
        assert!(
            status.success(),
            "faultline-lab {:?} failed: {status}",
            self.args
        );
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
/// Events of one comm.
pub fn by_comm<'a>(events: &'a [Value], comm: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["comm"] == comm).collect()
}

/// The mount of a cgroup hierarchy on this host, if any.
pub fn mount(h: Hierarchy) -> Option<(PathBuf, bool)> {
    let fs = CgroupFs::discover().expect("reading mountinfo");
    fs.mount(h).map(|m| (m.path.clone(), m.v2))
}

/// A cgroup directory made for one test; removed on drop after killing what is left in it.
/// On a cgroup v2 mount whose root does not yet hand the pids and memory controllers to its
/// children (a bare VM without systemd), it enables them there, and disables them again on
/// drop when nothing else uses them.
pub struct TempCgroup {
    pub dir: PathBuf,
    enabled: Vec<(PathBuf, &'static str)>,
}

impl TempCgroup {
    pub fn new(mount: &Path, name: &str) -> TempCgroup {
        Self::named(mount, std::ffi::OsStr::new(name))
    }

    /// [`TempCgroup::new`] with a name that need not be UTF-8 (cgroup names are bytes).
    pub fn named(mount: &Path, name: &std::ffi::OsStr) -> TempCgroup {
        let mut enabled = Vec::new();
        let available =
            std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
        let control = mount.join("cgroup.subtree_control");
        let active = std::fs::read_to_string(&control).unwrap_or_default();
        for controller in ["pids", "memory"] {
            let has = |list: &str| list.split_whitespace().any(|c| c == controller);
            if has(&available)
                && !has(&active)
                && std::fs::write(&control, format!("+{controller}")).is_ok()
            {
                enabled.push((control.clone(), controller));
            }
        }
        let dir = mount.join(name);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        TempCgroup { dir, enabled }
    }

    pub fn write(&self, file: &str, value: &str) {
        std::fs::write(self.dir.join(file), value)
            .unwrap_or_else(|e| panic!("writing {value} to {}/{file}: {e}", self.dir.display()));
    }
}

impl Drop for TempCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
                for pid in procs
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    // SAFETY: killing leftovers of this test's own cgroup.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if self.dir.exists() {
            eprintln!("warning: could not remove {}", self.dir.display());
        }
        for (control, controller) in &self.enabled {
            // Fails while another cgroup still uses it: then it stays, as someone needs it.
            let _ = std::fs::write(control, format!("-{controller}"));
        }
    }
}

/// A file written for one test, removed on drop.
pub struct TempFile(PathBuf);

impl TempFile {
    pub fn new(path: &Path, contents: &[u8]) -> TempFile {
        std::fs::write(path, contents)
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        TempFile(path.to_path_buf())
    }

    /// A file something else creates, removed on drop like the others.
    pub fn adopt(path: &Path) -> TempFile {
        TempFile(path.to_path_buf())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The kernel of the VM matrix these tests run in (`cargo xtask vm-test` sets it): a
/// disposable machine, where host-wide limits may be lowered. `None` on a real host.
pub fn vm_kernel() -> Option<String> {
    std::env::var("FAULTLINE_VM_KERNEL").ok()
}

/// How much slower than real hardware the machine is: an emulated VM (the kernel matrix
/// without KVM) runs programs several times slower, so paced workloads slow down with it.
pub fn pace() -> u64 {
    if vm_kernel().is_some() { 4 } else { 1 }
}

/// The running kernel's (major, minor).
pub fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Whether this kernel has a pid_max per pid namespace (Linux >= 6.14), from its BTF.
pub fn per_namespace_pid_max() -> bool {
    probe_user::kernel::btf::Btf::from_kernel()
        .is_ok_and(|btf| btf.member_offset("pid_namespace", "pid_max").is_ok())
}

/// Sets a sysctl for the test and restores the old value on drop.
pub struct SysctlGuard {
    path: PathBuf,
    old: String,
}

impl SysctlGuard {
    /// Restores the current value on drop, whoever changes it meanwhile.
    pub fn keep(path: &str) -> SysctlGuard {
        let old = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        SysctlGuard {
            path: path.into(),
            old: old.trim().to_owned(),
        }
    }

    pub fn set(path: &str, value: &str) -> SysctlGuard {
        let old = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        std::fs::write(path, value).unwrap_or_else(|e| panic!("writing {value} to {path}: {e}"));
        SysctlGuard {
            path: path.into(),
            old: old.trim().to_owned(),
        }
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(&self.path, &self.old) {
            eprintln!(
                "warning: could not restore {} to {}: {e}",
                self.path.display(),
                self.old
            );
        }
    }
}

/// Nested cgroup directories `rel` (a/b/c) under a mount; removed deepest first on drop. On
/// cgroup v2 with the pids controller, it is delegated down the tree so limits can be set.
pub struct CgroupTree {
    /// Shallowest first.
    levels: Vec<TempCgroup>,
}

impl CgroupTree {
    pub fn new(mount: &Path, rel: &str) -> CgroupTree {
        let mut levels: Vec<TempCgroup> = Vec::new();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            let Some(parent) = levels.last() else {
                levels.push(TempCgroup::new(mount, part));
                continue;
            };
            if std::fs::read_to_string(parent.dir.join("cgroup.controllers"))
                .is_ok_and(|c| c.contains("pids"))
            {
                let _ = std::fs::write(parent.dir.join("cgroup.subtree_control"), "+pids");
            }
            let dir = parent.dir.join(part);
            std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
            levels.push(TempCgroup {
                dir,
                enabled: Vec::new(),
            });
        }
        CgroupTree { levels }
    }

    pub fn leaf(&self) -> &TempCgroup {
        self.levels.last().expect("an empty cgroup tree")
    }

    /// The level at `depth` (0 = shallowest).
    pub fn level(&self, depth: usize) -> &TempCgroup {
        &self.levels[depth]
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        while let Some(level) = self.levels.pop() {
            drop(level);
        }
    }
}

/// A pod's container cgroup in the systemd driver's layout (burstable), under a unique top
/// directory: in cgroup v2, and on hybrid hosts also in the v1 pids hierarchy, where the pod
/// level gets `pids.max`.
pub struct PodCgroup {
    pub v2: CgroupTree,
    pub pids: Option<CgroupTree>,
}

impl PodCgroup {
    pub fn systemd(top: &str, uid: &str, container_id: &str, pids_max: u32) -> PodCgroup {
        let (unified, _) = mount(Hierarchy::Unified).expect("cgroup v2 mount");
        let (pids_mount, pids_v2) = mount(Hierarchy::Pids).expect("pids controller");
        let rel = format!(
            "{top}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{container_id}.scope",
            uid.replace('-', "_")
        );
        let v2 = CgroupTree::new(&unified, &rel);
        let pids = (!pids_v2).then(|| CgroupTree::new(&pids_mount, &rel));
        pids.as_ref()
            .unwrap_or(&v2)
            .level(3)
            .write("pids.max", &pids_max.to_string());
        PodCgroup { v2, pids }
    }
}

impl InCgroups for PodCgroup {
    fn dirs(&self) -> Vec<&Path> {
        let mut dirs = vec![self.v2.leaf().dir.as_path()];
        if let Some(p) = &self.pids {
            dirs.push(p.leaf().dir.as_path());
        }
        dirs
    }
}

/// Cgroups a lab can run in (each hierarchy's directory: v2, and v1 pids on hybrid hosts).
pub trait InCgroups {
    /// The directories (v2, and v1 pids where pids is v1).
    fn dirs(&self) -> Vec<&Path>;

    /// `--cgroup DIR` arguments that put a lab into them.
    fn join_args(&self) -> Vec<String> {
        self.dirs()
            .iter()
            .flat_map(|d| ["--cgroup".to_owned(), d.display().to_string()])
            .collect()
    }

    /// `faultline-lab args...` in them, to its end: its report.
    fn lab(&self, args: &[&str]) -> LabReport {
        self.spawn(args).finish()
    }

    /// `faultline-lab args...` started in them.
    fn spawn(&self, args: &[&str]) -> Lab {
        let join = self.join_args();
        Lab::spawn(&[args, &join.iter().map(String::as_str).collect::<Vec<_>>()].concat())
    }
}

/// The sum of the values of the exposition's series lines that `keep` takes.
pub fn sum_of(metrics: &str, keep: impl Fn(&str) -> bool) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && keep(l))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The value of the first series of `family` whose labels contain every one of `labels`.
pub fn sample(metrics: &str, family: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(family) && labels.iter().all(|x| l.contains(x)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A plain HTTP/1.0 GET on loopback with these header lines (`Name: value`): (status, the
/// response's head, body).
pub fn http_request(port: u16, path: &str, headers: &[&str]) -> Option<(u16, String, String)> {
    http_exchange(TcpStream::connect(("127.0.0.1", port)).ok()?, path, headers)
}

/// [`http_request`] from the loopback address `from` (e.g. 127.0.0.2: another peer).
pub fn http_request_from(
    from: Ipv4Addr,
    port: u16,
    path: &str,
    headers: &[&str],
) -> Option<(u16, String, String)> {
    let conn = connect_from(from, Ipv4Addr::LOCALHOST, port, None)?;
    http_exchange(conn, path, headers)
}

fn http_exchange(
    mut conn: TcpStream,
    path: &str,
    headers: &[&str],
) -> Option<(u16, String, String)> {
    conn.set_read_timeout(Some(Duration::from_secs(10 * pace())))
        .ok()?;
    let mut request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n");
    for h in headers {
        request += &format!("{h}\r\n");
    }
    write!(conn, "{request}\r\n").ok()?;
    let mut text = String::new();
    conn.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Some((status, head.to_owned(), body.to_owned()))
}

/// A plain HTTP/1.0 GET on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).ok()?;
    // Emulated VMs (pace) run the daemon and its programs many times slower.
    conn.set_read_timeout(Some(Duration::from_secs(10 * pace())))
        .ok()?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    conn.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// The finding of `kind` for the workload in `cgroup` in an explain report.
pub fn finding(report: &Value, kind: &str, cgroup: &str) -> Option<Value> {
    report["findings"]
        .as_array()?
        .iter()
        .find(|f| f["kind"] == kind && f["who"]["cgroup"] == cgroup)
        .cloned()
}

pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One HTTP/1.1 request a stand-in server read: its method, path and body.
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// The next request on a kept-alive connection (its body by `Content-Length`); none once the
/// A stand-in API's answer: `status` ("200 OK") and a JSON body (a peer gone meanwhile is
/// the test's to notice, not the writer's).
pub fn write_json(conn: &mut impl std::io::Write, status: &str, answer: &serde_json::Value) {
    let answer = answer.to_string();
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
        answer.len()
    );
}

/// peer closes or stops mid-request.
pub fn read_request(reader: &mut impl BufRead) -> Option<HttpRequest> {
    let mut first = String::new();
    if reader.read_line(&mut first).unwrap_or(0) == 0 {
        return None;
    }
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    let mut words = first.split_whitespace();
    Some(HttpRequest {
        method: words.next().unwrap_or("").to_owned(),
        path: words.next().unwrap_or("").to_owned(),
        body,
    })
}

/// Polls until `f` returns Some, for at most `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    within(timeout, f).unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Polls until `f` returns Some, for at most `timeout`; None if it never did.
pub fn within<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `faultline run` on a free loopback port, ready.
pub struct Daemon {
    pub child: Child,
    pub port: u16,
    /// Its health port (`--health-listen`), when it has one.
    pub health: Option<u16>,
}

impl Daemon {
    pub fn start(extra: &[&str]) -> Daemon {
        Self::start_with(&[], extra, Stdio::null())
    }

    /// `faultline run` with these environment variables set.
    pub fn start_with_env(env: &[(&str, &str)], extra: &[&str]) -> Daemon {
        Self::spawn(&[], env, extra, Stdio::null(), false)
    }

    /// [`Daemon::start_with_env`] with every capability ([`faultline_full_root`]).
    pub fn start_full_root(env: &[(&str, &str)], extra: &[&str]) -> Daemon {
        Self::spawn(&[], env, extra, Stdio::null(), true)
    }

    /// `faultline run` behind a command prefix (e.g. `prlimit ... --`), stdout as given. The
    /// prefix runs first, on the host, as a runtime sets a container's limits before starting
    /// it; the launcher (as deployed) runs after it and execs faultline: it keeps the prefix's
    /// limits but its own memlock, as a runtime's would, and the pid stays faultline's.
    pub fn start_with(prefix: &[&str], extra: &[&str], stdout: Stdio) -> Daemon {
        Self::spawn(prefix, &[], extra, stdout, false)
    }

    fn spawn(
        prefix: &[&str],
        env: &[(&str, &str)],
        extra: &[&str],
        stdout: Stdio,
        full_root: bool,
    ) -> Daemon {
        let (mut cmd, port, health) = Self::command(prefix, extra, full_root);
        let child = cmd
            .envs(env.iter().copied())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting faultline run");
        let d = Daemon {
            child,
            port,
            health: Some(health),
        };
        // On the health port: the main one may speak TLS (a web config file).
        eventually(Duration::from_secs(60), "/readyz", || {
            http_get(health, "/readyz").filter(|(s, _)| *s == 200)
        });
        d
    }

    /// `faultline run` as shipped, with the harness's departures and `extra`, on a free
    /// loopback port and a health port of its own (both returned).
    fn command(prefix: &[&str], extra: &[&str], full_root: bool) -> (Command, u16, u16) {
        require_root();
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let argv: Vec<String> = prefix
            .iter()
            .map(|a| a.to_string())
            .chain(faultline_argv(full_root))
            .collect();
        let mut cmd = command(&argv);
        as_shipped(&mut cmd);
        // Departure: a port of its own on loopback (tests run side by side on one node).
        cmd.args(["--listen", &listen]);
        let health = run_departures(&mut cmd);
        // Departure: no Kubernetes API unless the test starts a stand-in, never a cluster the
        // machine's kubeconfig may name (without one faultline says so and goes on the same).
        if !extra.contains(&"--kubeconfig") {
            cmd.arg("--no-kube-api");
        }
        cmd.args(extra);
        (cmd, port, health)
    }

    /// `faultline run` started as [`Daemon::start`] starts it, when it must refuse to: its
    /// exit code and log lines (as [`log_text`]). Fails if it still runs after `within`.
    pub fn refused(extra: &[&str], within: Duration) -> (Option<i32>, Vec<String>) {
        let (mut cmd, _, _) = Self::command(&[], extra, false);
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting faultline run");
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = child.try_wait().expect("waiting on faultline run") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("faultline run {extra:?} still runs after {within:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        (status.code(), stderr.lines().map(log_text).collect())
    }

    /// `faultline explain -o json` asked of this daemon, parsed (none if it did not answer
    /// with a report).
    pub fn explain(&self) -> Option<Value> {
        let out = faultline()
            .args([
                "explain",
                "--daemon",
                &format!("http://127.0.0.1:{}", self.port),
                "-o",
                "json",
            ])
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn metrics(&self) -> String {
        http_get(self.port, "/metrics")
            .expect("scraping /metrics")
            .1
    }

    /// SIGTERM; returns (exit status, stderr as [`log_text`], seconds it took).
    pub fn terminate(self) -> (std::process::ExitStatus, String, f64) {
        let (status, stderr, took) = self.terminate_raw();
        let text: Vec<String> = stderr.lines().map(log_text).collect();
        (status, text.join("\n"), took)
    }

    /// [`Daemon::terminate`] with stderr as faultline wrote it (the DaemonSet's JSON lines).
    pub fn terminate_raw(mut self) -> (std::process::ExitStatus, String, f64) {
        let start = Instant::now();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = eventually(Duration::from_secs(30), "faultline to exit", || {
            self.child.try_wait().ok().flatten()
        });
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        (status, stderr, start.elapsed().as_secs_f64())
    }
}

/// One line of faultline's own log as text: the DaemonSet's JSON lines
/// (`FAULTLINE_LOG_FORMAT=json`) as `LEVEL message`, any other line as it is.
pub fn log_text(line: &str) -> String {
    match serde_json::from_str::<Value>(line) {
        Ok(v) if v["message"].is_string() => format!(
            "{} {}",
            v["level"].as_str().unwrap_or("?"),
            v["message"].as_str().unwrap_or_default()
        ),
        _ => line.to_owned(),
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failed test shows the end of what the daemon said (the pipe, never read while it
        // ran, holds its first 64 KiB: a daemon that said more was left blocked writing).
        if std::thread::panicking() {
            let mut stderr = String::new();
            if let Some(mut e) = self.child.stderr.take() {
                let _ = e.read_to_string(&mut stderr);
            }
            let lines: Vec<&str> = stderr.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!("faultline run's last {} log lines:", tail.len());
            for l in tail {
                eprintln!("  {}", log_text(l));
            }
        }
    }
}

/// A real Prometheus scraping the daemon every second.
pub struct Prometheus {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Prometheus {
    pub fn start(target_port: u16) -> Prometheus {
        Self::start_with_job(&Self::job(&[(target_port, "test-node")]))
    }

    /// A static scrape job (YAML, a list item) of these agents, each with its node's name as
    /// the `node` label (what the ServiceMonitor's relabeling gives each target).
    pub fn job(targets: &[(u16, &str)]) -> String {
        let targets: String = targets
            .iter()
            .map(|(port, node)| {
                format!("  - targets: ['127.0.0.1:{port}']\n    labels:\n      node: {node}\n")
            })
            .collect();
        format!("- job_name: faultline\n  static_configs:\n{targets}")
    }

    /// A Prometheus scraping every second with this scrape job (YAML, a list item).
    pub fn start_with_job(job: &str) -> Prometheus {
        Self::start_with_rules(job, &[])
    }

    /// [`Prometheus::start_with_job`], evaluating these rule files every second.
    pub fn start_with_rules(job: &str, rule_files: &[&Path]) -> Prometheus {
        let port = free_port();
        let dir = std::env::temp_dir().join(unique(&format!("prometheus-{port}")));
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let rules: String = rule_files
            .iter()
            .map(|f| format!("  - {}\n", f.display()))
            .collect();
        let rules = if rules.is_empty() {
            String::new()
        } else {
            format!("rule_files:\n{rules}")
        };
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n{rules}scrape_configs:\n{job}"
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("prometheus config");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "starting prometheus (Debian package `prometheus`, installed by cargo xtask setup)",
            );
        let p = Prometheus { child, port, dir };
        eventually(Duration::from_secs(60), "prometheus ready", || {
            http_get(port, "/-/ready").filter(|(s, _)| *s == 200)
        });
        p
    }

    /// How many series an instant query returns.
    pub fn series(&self, query: &str) -> Option<usize> {
        let (_, body) = http_get(
            self.port,
            &format!("/api/v1/query?query={}", url_encode(query)),
        )?;
        let v: Value = serde_json::from_str(&body).ok()?;
        Some(v["data"]["result"].as_array()?.len())
    }

    /// The raw answer to an instant query (for a failed test's message).
    pub fn raw(&self, query: &str) -> String {
        http_get(
            self.port,
            &format!("/api/v1/query?query={}", url_encode(query)),
        )
        .map(|(_, body)| body)
        .unwrap_or_else(|| "no answer".to_owned())
    }

    /// The value of an instant query with exactly one result.
    pub fn value(&self, query: &str) -> Option<f64> {
        let (_, body) = http_get(
            self.port,
            &format!("/api/v1/query?query={}", url_encode(query)),
        )?;
        let v: Value = serde_json::from_str(&body).ok()?;
        let result = v["data"]["result"].as_array()?;
        (result.len() == 1).then(|| result[0]["value"][1].as_str()?.parse().ok())?
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A kubelet log root (`pods/`, `containers/`) naming pods (namespace, name, uid, container,
/// container id), removed on drop.
pub struct KubeletLogs {
    pub root: std::path::PathBuf,
}

impl KubeletLogs {
    pub fn new(pods: &[(&str, &str, &str, &str, &str)]) -> KubeletLogs {
        let root = std::env::temp_dir().join(unique("kubelet-logs"));
        for (ns, name, uid, container, cid) in pods {
            std::fs::create_dir_all(root.join(format!("pods/{ns}_{name}_{uid}/{container}")))
                .expect("pods dir");
            std::fs::create_dir_all(root.join("containers")).expect("containers dir");
            std::fs::write(
                root.join(format!("containers/{name}_{ns}_{container}-{cid}.log")),
                "",
            )
            .expect("log link");
        }
        KubeletLogs { root }
    }
}

impl Drop for KubeletLogs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

impl KubeletLogs {
    /// `--kubelet-logs <root>` for faultline.
    pub fn arg(&self) -> String {
        self.root.display().to_string()
    }
}

/// A connection the receiver reads a request from and answers on (plain or TLS).
pub trait ReadWrite: std::io::Read + std::io::Write + Send {}
impl<T: std::io::Read + std::io::Write + Send> ReadWrite for T {}

/// A CA, and a server certificate for 127.0.0.1 and a client certificate it signed, made by the
/// `openssl` CLI in `dir`.
pub struct TestCa {
    pub ca: std::path::PathBuf,
    pub server_cert: std::path::PathBuf,
    pub server_key: std::path::PathBuf,
    pub client_cert: std::path::PathBuf,
    pub client_key: std::path::PathBuf,
}

/// `openssl args...` in `dir`; it must succeed.
fn openssl_in(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl CLI is needed for the TLS tests (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn test_ca(dir: &std::path::Path) -> TestCa {
    let openssl = |args: &[&str]| openssl_in(dir, args);
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=faultline test CA",
    ]);
    for (name, subject, ext) in [
        ("server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1\n"),
        ("client", "/CN=faultline", "extendedKeyUsage=clientAuth\n"),
    ] {
        let (key, csr, pem, cnf) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.cnf"),
        );
        openssl(&[
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", subject,
        ]);
        std::fs::write(dir.join(&cnf), format!("{ext}basicConstraints=CA:FALSE\n"))
            .expect("extensions file");
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "1",
            "-extfile",
            &cnf,
        ]);
    }
    TestCa {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    }
}

/// A received log record with its resource's attributes.
pub type Received = (
    Vec<(String, String)>,
    opentelemetry_proto::tonic::logs::v1::LogRecord,
);

pub struct OtlpReceiver {
    pub port: u16,
    pub records: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    pub spans: std::sync::Arc<std::sync::Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>,
    /// Every request's header lines, lowercased, in arrival order (refused ones too).
    pub headers: std::sync::Arc<std::sync::Mutex<Vec<Vec<String>>>>,
}

pub fn attr_str(kv: &opentelemetry_proto::tonic::common::v1::KeyValue) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(V::StringValue(s)) => s.clone(),
        Some(V::IntValue(i)) => i.to_string(),
        other => format!("{other:?}"),
    }
}

impl OtlpReceiver {
    /// The log records received so far about the process named `comm`.
    pub fn records_of(&self, comm: &str) -> Vec<Received> {
        self.records
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, r)| {
                r.attributes
                    .iter()
                    .any(|kv| kv.key == "thread.name" && attr_str(kv) == comm)
            })
            .cloned()
            .collect()
    }

    pub fn start() -> OtlpReceiver {
        Self::start_refusing(0)
    }

    /// A receiver that answers its first `refuse` requests 503 with `Retry-After: 1` (a
    /// collector restarting), then takes everything.
    pub fn start_refusing(refuse: usize) -> OtlpReceiver {
        Self::serve(TcpListener::bind("127.0.0.1:0").expect("bind"), refuse)
    }

    /// A receiver on this loopback port (a collector coming back where it was).
    pub fn start_on(port: u16) -> OtlpReceiver {
        Self::serve(TcpListener::bind(("127.0.0.1", port)).expect("bind"), 0)
    }

    /// A receiver over TLS with the CA's server certificate that accepts only clients with a
    /// certificate the CA signed (mutual TLS).
    pub fn start_mutual_tls(ca: &TestCa) -> OtlpReceiver {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
        let pems = |path: &std::path::Path| {
            CertificateDer::pem_file_iter(path)
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        };
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in pems(&ca.ca) {
            roots.add(c).expect("the test CA");
        }
        let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            provider.clone(),
        )
        .build()
        .expect("client verifier");
        let key = PrivateKeyDer::from_pem_file(&ca.server_key).expect("server key");
        let config = std::sync::Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_client_cert_verifier(clients)
                .with_single_cert(pems(&ca.server_cert), key)
                .expect("server TLS config"),
        );
        Self::serve_with(
            TcpListener::bind("127.0.0.1:0").expect("bind"),
            0,
            move |conn| {
                let tls = rustls::ServerConnection::new(config.clone()).ok()?;
                Some(Box::new(rustls::StreamOwned::new(tls, conn)))
            },
        )
    }

    fn serve(listener: TcpListener, refuse: usize) -> OtlpReceiver {
        Self::serve_with(listener, refuse, |conn| Some(Box::new(conn)))
    }

    fn serve_with(
        listener: TcpListener,
        refuse: usize,
        wrap: impl Fn(TcpStream) -> Option<Box<dyn ReadWrite>> + Send + 'static,
    ) -> OtlpReceiver {
        use prost::Message as _;
        let port = listener.local_addr().expect("addr").port();
        let records = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let headers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (sink, span_sink, header_sink) = (records.clone(), spans.clone(), headers.clone());
        std::thread::spawn(move || {
            for (n, conn) in listener.incoming().take(1000).enumerate() {
                let Ok(conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let Some(conn) = wrap(conn) else { continue };
                let mut reader = std::io::BufReader::new(conn);
                let mut len = 0usize;
                let mut traces = false;
                let mut gzip = false;
                let mut lines = Vec::new();
                loop {
                    let mut line = String::new();
                    if std::io::BufRead::read_line(&mut reader, &mut line).unwrap_or(0) == 0
                        || line == "\r\n"
                    {
                        break;
                    }
                    if line.starts_with("POST /v1/traces") {
                        traces = true;
                    }
                    let lower = line.trim_end().to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    gzip |= lower == "content-encoding: gzip";
                    lines.push(lower);
                }
                header_sink.lock().unwrap().push(lines);
                let mut body = vec![0; len];
                if reader.read_exact(&mut body).is_err() {
                    continue;
                }
                if n < refuse {
                    let _ = reader.get_mut().write_all(
                        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    continue;
                }
                if gzip {
                    let mut plain = Vec::new();
                    if flate2::read::GzDecoder::new(body.as_slice())
                        .read_to_end(&mut plain)
                        .is_err()
                    {
                        continue;
                    }
                    body = plain;
                }
                if traces {
                    if let Ok(req) = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(body.as_slice()) {
                        for rs in req.resource_spans {
                            for ss in rs.scope_spans {
                                span_sink.lock().unwrap().extend(ss.spans);
                            }
                        }
                    }
                } else if let Ok(req) = opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest::decode(body.as_slice()) {
                    for rl in req.resource_logs {
                        let resource: Vec<(String, String)> =
                            rl.resource.iter().flat_map(|r| r.attributes.iter()).map(|kv| (kv.key.clone(), attr_str(kv))).collect();
                        for sl in rl.scope_logs {
                            for rec in sl.log_records {
                                sink.lock().unwrap().push((resource.clone(), rec));
                            }
                        }
                    }
                }
                let _ = reader.get_mut().write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        OtlpReceiver {
            port,
            records,
            spans,
            headers,
        }
    }
}

/// A TCP connection to `to`:`port` from the source address `from`; with `rcvbuf`, a small
/// receive buffer set first (a reader that never reads then stalls the daemon's sends at once).
pub fn connect_from(
    from: Ipv4Addr,
    to: Ipv4Addr,
    port: u16,
    rcvbuf: Option<i32>,
) -> Option<TcpStream> {
    let sockaddr = |addr: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a fresh socket, configured, bound and connected with valid structs; owned by
    // the TcpStream from then on (closed on drop), closed here on failure.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let local = sockaddr(from, 0);
        let remote = sockaddr(to, port);
        let small = rcvbuf.is_none_or(|size| {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&raw const size).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            ) == 0
        });
        if !small
            || libc::bind(fd, (&raw const local).cast(), len) != 0
            || libc::connect(fd, (&raw const remote).cast(), len) != 0
        {
            libc::close(fd);
            return None;
        }
        Some(TcpStream::from_raw_fd(fd))
    }
}

/// Waits for the daemon's `/healthz` to answer 200. Emulated VMs run every program (the raw
/// sys_exit one on every syscall) many times slower.
pub fn healthz_answers(daemon: &Daemon) {
    eventually(
        Duration::from_secs(10 * pace()),
        "/healthz to answer",
        || http_get(daemon.port, "/healthz").filter(|(s, _)| *s == 200),
    );
}

impl Daemon {
    /// `faultline run` listening on `listen` (whose port is `port`), with every capability
    /// when `full_root`; ready. For a test of the listening socket itself: the others take a
    /// free loopback port from [`Daemon::start`].
    pub fn start_listening(listen: &str, port: u16, full_root: bool, extra: &[&str]) -> Daemon {
        require_root();
        let child = command(&faultline_argv(full_root))
            .args([
                "run",
                "--listen",
                listen,
                "--refresh",
                "300ms",
                "--no-kube-api",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting faultline run");
        let d = Daemon {
            child,
            port,
            health: None,
        };
        eventually(Duration::from_secs(60), "/readyz", || {
            http_get(port, "/readyz").filter(|(s, _)| *s == 200)
        });
        d
    }

    /// The daemon's stderr line by line as it comes ([`Daemon::terminate`] then returns none
    /// of it).
    /// The daemon's log lines as they come, as [`log_text`].
    pub fn stderr_lines(&mut self) -> mpsc::Receiver<String> {
        let raw = lines_of(self.child.stderr.take().expect("stderr not taken yet"));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in raw {
                if tx.send(log_text(&line)).is_err() {
                    break;
                }
            }
        });
        rx
    }
}

/// The first line of `lines` that `pred` accepts, within `timeout`; fails with every line seen.
pub fn line_within(
    lines: &mpsc::Receiver<String>,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if pred(&line) => return line,
            Ok(line) => seen.push(line),
            Err(_) => panic!(
                "no line with {what} within {timeout:?}; saw:\n{}",
                seen.join("\n")
            ),
        }
    }
}

/// A certificate as the `openssl req -x509` one-liner most people try first makes it
/// (self-signed, and so a CA: basicConstraints CA:TRUE), for 127.0.0.1, with its key:
/// (certificate, key) in `dir`.
pub fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    openssl_in(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "self.key",
            "-out",
            "self.pem",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    (dir.join("self.pem"), dir.join("self.key"))
}

impl OtlpReceiver {
    /// A receiver over TLS with this certificate and key; with `clients`, it accepts only
    /// clients with a certificate that CA signed (mutual TLS).
    pub fn start_tls(cert: &Path, key: &Path, clients: Option<&Path>) -> OtlpReceiver {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
        let pems = |path: &Path| {
            CertificateDer::pem_file_iter(path)
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        };
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("TLS versions");
        let builder = match clients {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in pems(ca) {
                    roots.add(c).expect("the clients' CA");
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    std::sync::Arc::new(roots),
                    provider,
                )
                .build()
                .expect("client verifier");
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let key = PrivateKeyDer::from_pem_file(key).expect("server key");
        let config = std::sync::Arc::new(
            builder
                .with_single_cert(pems(cert), key)
                .expect("server TLS config"),
        );
        Self::serve_with(
            TcpListener::bind("127.0.0.1:0").expect("bind"),
            0,
            move |conn| {
                let tls = rustls::ServerConnection::new(config.clone()).ok()?;
                Some(Box::new(rustls::StreamOwned::new(tls, conn)))
            },
        )
    }
}

/// A collector on a loopback port that answers every request with `response` (a whole
/// HTTP/1.1 response) after reading it; its port.
pub fn collector_answering(response: &'static [u8]) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(1000) {
            let Ok(conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut reader = BufReader::new(conn);
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            if reader.read_exact(&mut body).is_ok() {
                let _ = reader.get_mut().write_all(response);
            }
        }
    });
    port
}

/// A client certificate (extendedKeyUsage clientAuth, CN=faultline) signed by the CA `ca`
/// whose key is `ca_key` (e.g. [`self_signed`]'s, a CA named other than [`test_ca`]'s):
/// (certificate, key) in `dir`.
pub fn client_certificate(dir: &Path, ca: &Path, ca_key: &Path) -> (PathBuf, PathBuf) {
    let openssl = |args: &[&str]| openssl_in(dir, args);
    let (ca, ca_key) = (ca.to_str().expect("utf-8"), ca_key.to_str().expect("utf-8"));
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "other-client.key",
        "-out",
        "other-client.csr",
        "-subj",
        "/CN=faultline",
    ]);
    std::fs::write(
        dir.join("other-client.cnf"),
        "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
    )
    .expect("extensions file");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "other-client.csr",
        "-CA",
        ca,
        "-CAkey",
        ca_key,
        "-CAcreateserial",
        "-out",
        "other-client.pem",
        "-days",
        "1",
        "-extfile",
        "other-client.cnf",
    ]);
    (dir.join("other-client.pem"), dir.join("other-client.key"))
}
