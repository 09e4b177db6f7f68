//! Pods coming and going as the kubelet lays them out, for the memory soak of `cargo xtask
//! bench` (and anyone checking that faultline forgets what is gone).
//!
//! Each pod is what a node shows of one: a pod slice and a container scope in the systemd
//! driver's layout (`kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with
//! _>.slice/cri-containerd-<64 hex>.scope`) under each root given (cgroup v2 first, then the
//! v1 pids hierarchy where pids is v1), a pids limit of 2 on the pod, its kubelet log
//! directory (`pods/<ns>_<name>_<uid>/<container>/` and `containers/<pod>_<ns>_<container>-<id>.log`),
//! and one process in the scope, which creates a thread, has a fork refused by the pids limit
//! while the thread lives, optionally asks one DNS question and moves into a network namespace
//! of its own as uid 65535 (a pause container's), then sleeps until the pod is removed. At
//! most `live` pods exist at once: each new pod past them replaces the oldest; at most `rate`
//! are made per second, when given. Everything a pod
//! made is removed when it goes, on success and on failure alike; its process also dies with
//! this one (PR_SET_DEATHSIG). As it goes it prints `{"made":n}` twenty times, so that a
//! measurement can tell how far the churn is.

use std::{
    collections::VecDeque,
    io::{BufRead as _, Read as _},
    net::{SocketAddr, UdpSocket},
    os::fd::{FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// The pod level's pids limit: the pod's process and one thread.
const PIDS_MAX: &str = "2";
/// The QoS levels every pod is made under (the systemd driver's burstable class).
const QOS_LEVELS: &str = "kubepods.slice/kubepods-burstable.slice";
/// The namespace every churned pod is in.
const NAMESPACE: &str = "churn";
const CONTAINER: &str = "app";
/// A pause container's uid: what the process runs as once in its own network namespace.
const PAUSE_UID: libc::uid_t = 65535;
/// How long a pod's DNS question waits for its answer.
const DNS_WAIT: Duration = Duration::from_secs(1);
/// What a pod's process says once it has done its work: bits of what happened, or FAILED.
const REFUSED_FORK: u8 = 1;
const ANSWERED: u8 = 2;
const FAILED: u8 = 0xff;
/// Progress lines per churn.
const PROGRESS_LINES: u32 = 20;

/// What pod-churn is asked to do.
pub struct Churn<'a> {
    /// Pods made and removed in all.
    pub count: u32,
    /// Most pods alive at once.
    pub live: u32,
    /// Pods made per second at most (None: as fast as it can).
    pub rate: Option<f64>,
    /// The cgroup directories the pods are laid out under: v2, then v1 pids where pids is v1.
    pub roots: &'a [PathBuf],
    /// The kubelet's log root (`pods/`, `containers/` are made in it).
    pub kubelet_logs: &'a Path,
    /// Where each pod asks its one DNS question, if anywhere.
    pub dns_server: Option<SocketAddr>,
    /// Each pod's process moves into a network namespace of its own.
    pub netns: bool,
    /// Once the last pod is made, print `{"live":n}` and keep the pods until stdin ends.
    pub hold: bool,
}

/// What pod-churn reports when done.
#[derive(serde::Serialize, Default)]
struct ChurnReport {
    /// pid of the churning process, in the initial pid namespace.
    pid: u32,
    pods: u32,
    /// Forks refused by a pod's pids limit (one per pod).
    refused_forks: u32,
    /// DNS questions answered (one per pod at most).
    dns_answered: u32,
    elapsed_ns: u64,
}

/// Makes `count` pods, at most `live` at once, then removes them all.
pub fn churn(c: &Churn<'_>) -> anyhow::Result<()> {
    if c.roots.is_empty() {
        bail!("pod-churn needs --pods-root (a cgroup v2 directory)");
    }
    let _levels = Levels::make(c.roots)?;
    for dir in ["pods", "containers"] {
        let path = c.kubelet_logs.join(dir);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    }
    let mut report = ChurnReport {
        pid: super::node_pid(),
        ..Default::default()
    };
    let start = Instant::now();
    let pace = super::Pace::new(c.rate)?;
    let mut pods = VecDeque::new();
    let every = (c.count / PROGRESS_LINES).max(1);
    for i in 0..c.count {
        pace.wait(i);
        if pods.len() >= c.live.max(1) as usize {
            drop(pods.pop_front());
        }
        let (pod, outcome) = Pod::make(c, i)?;
        report.pods += 1;
        report.refused_forks += u32::from(outcome & REFUSED_FORK != 0);
        report.dns_answered += u32::from(outcome & ANSWERED != 0);
        pods.push_back(pod);
        if report.pods.is_multiple_of(every) {
            super::print_json(&serde_json::json!({ "made": report.pods }))?;
        }
    }
    if c.hold {
        super::print_json(&serde_json::json!({ "live": pods.len() }))?;
        // Until the caller has measured: a line or the end of stdin.
        let _ = std::io::stdin().lock().read_line(&mut String::new());
    }
    drop(pods);
    report.elapsed_ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    super::print_json(&report)
}

/// The QoS levels above the pods, in each root: made first, removed last.
struct Levels(Vec<PathBuf>);

impl Levels {
    fn make(roots: &[PathBuf]) -> anyhow::Result<Levels> {
        let mut made = Levels(Vec::new());
        for root in roots {
            let dir = root.join(QOS_LEVELS);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            made.0.push(root.clone());
            // cgroup v2: the pods' pids limits need the controller below (v1 has it anyway).
            for level in [root.clone(), root.join("kubepods.slice"), dir] {
                let _ = std::fs::write(level.join("cgroup.subtree_control"), "+pids");
            }
        }
        Ok(made)
    }
}

impl Drop for Levels {
    fn drop(&mut self) {
        for root in &self.0 {
            let _ = std::fs::remove_dir(root.join(QOS_LEVELS));
            let _ = std::fs::remove_dir(root.join("kubepods.slice"));
        }
    }
}

/// One pod: its cgroups, log directory and process, all removed on drop.
struct Pod {
    /// The pod slice in each root, and the container scope below it.
    slices: Vec<(PathBuf, PathBuf)>,
    log_dir: PathBuf,
    container_log: PathBuf,
    process: Option<libc::pid_t>,
}

impl Pod {
    /// Pod `i`, its process done with its work: the pod and what the process reported.
    fn make(c: &Churn<'_>, i: u32) -> anyhow::Result<(Pod, u8)> {
        // Unique across runs: this process's pid and the pod's number.
        let uid = format!(
            "{:08x}-{:04x}-4{:03x}-8000-{:012x}",
            std::process::id(),
            (i >> 12) & 0xffff,
            i & 0xfff,
            i
        );
        let container_id = format!("{:016x}{:048x}", std::process::id(), u64::from(i) + 1);
        let name = format!("job-{i}");
        let mut pod = Pod {
            slices: Vec::new(),
            log_dir: c
                .kubelet_logs
                .join(format!("pods/{NAMESPACE}_{name}_{uid}")),
            container_log: c.kubelet_logs.join(format!(
                "containers/{name}_{NAMESPACE}_{CONTAINER}-{container_id}.log"
            )),
            process: None,
        };
        for root in c.roots {
            let slice = root.join(format!(
                "{QOS_LEVELS}/kubepods-burstable-pod{}.slice",
                uid.replace('-', "_")
            ));
            let scope = slice.join(format!("cri-containerd-{container_id}.scope"));
            std::fs::create_dir(&slice).with_context(|| format!("creating {}", slice.display()))?;
            pod.slices.push((slice.clone(), scope.clone()));
            let _ = std::fs::write(slice.join("cgroup.subtree_control"), "+pids");
            if slice.join("pids.max").exists() {
                std::fs::write(slice.join("pids.max"), PIDS_MAX)
                    .with_context(|| format!("limiting {}", slice.display()))?;
            }
            std::fs::create_dir(&scope).with_context(|| format!("creating {}", scope.display()))?;
        }
        let container_dir = pod.log_dir.join(CONTAINER);
        std::fs::create_dir_all(&container_dir)
            .with_context(|| format!("creating {}", container_dir.display()))?;
        std::fs::write(&pod.container_log, "")
            .with_context(|| format!("creating {}", pod.container_log.display()))?;
        let scopes: Vec<&Path> = pod.slices.iter().map(|(_, s)| s.as_path()).collect();
        let question = format!("{name}.{NAMESPACE}.svc.cluster.local");
        let (pid, outcome) = spawn(&scopes, c.dns_server.map(|s| (s, question)), c.netns)?;
        pod.process = Some(pid);
        if outcome == FAILED {
            bail!("pod {i}: its process failed (its stderr says why)");
        }
        Ok((pod, outcome))
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Some(pid) = self.process.take() {
            // SAFETY: our own child, killed and reaped.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
        for (slice, scope) in self.slices.iter().rev() {
            for dir in [scope, slice] {
                // Reaped: the cgroup is empty; the kernel may take a moment to say so.
                for _ in 0..50 {
                    if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.log_dir);
        let _ = std::fs::remove_file(&self.container_log);
    }
}

/// Forks the pod's process into `scopes` and waits until it has done its work: its pid and
/// what it reported (bits, or FAILED).
fn spawn(
    scopes: &[&Path],
    dns: Option<(SocketAddr, String)>,
    netns: bool,
) -> anyhow::Result<(libc::pid_t, u8)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 with a two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe2: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors, owned from here on.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: this process is single-threaded, so the child may do anything after fork.
    match unsafe { libc::fork() } {
        -1 => bail!("fork: {}", std::io::Error::last_os_error()),
        0 => {
            drop(read);
            pod_process(scopes, dns, netns, write)
        }
        pid => {
            drop(write);
            let mut byte = [FAILED];
            let mut pipe = std::fs::File::from(read);
            if pipe.read_exact(&mut byte).is_err() {
                byte = [FAILED];
            }
            Ok((pid, byte[0]))
        }
    }
}

/// The pod's process: its work, one byte on `ready`, then sleep until killed.
fn pod_process(
    scopes: &[&Path],
    dns: Option<(SocketAddr, String)>,
    netns: bool,
    ready: OwnedFd,
) -> ! {
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let outcome = work(scopes, dns, netns).unwrap_or_else(|e| {
        eprintln!("faultline-lab: pod-churn: a pod's process: {e:#}");
        FAILED
    });
    let mut pipe = std::fs::File::from(ready);
    let _ = std::io::Write::write_all(&mut pipe, &[outcome]);
    drop(pipe);
    loop {
        // SAFETY: pause has no arguments; the process ends by SIGKILL.
        unsafe { libc::pause() };
    }
}

/// In the pod: a thread, a fork the pids limit refuses while it lives, the DNS question, and
/// the network namespace.
fn work(scopes: &[&Path], dns: Option<(SocketAddr, String)>, netns: bool) -> anyhow::Result<u8> {
    for scope in scopes {
        super::join(scope)?;
    }
    let mut outcome = 0;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .stack_size(64 * 1024)
        .spawn(move || {
            let _ = rx.recv();
        })
        .context("creating the pod's thread")?;
    // SAFETY: the child only calls _exit.
    match unsafe { libc::fork() } {
        -1 => outcome |= REFUSED_FORK,
        // SAFETY: _exit ends the child at once.
        0 => unsafe { libc::_exit(0) },
        child => super::wait_ok(child)?,
    }
    drop(tx);
    thread
        .join()
        .map_err(|_| anyhow::anyhow!("the pod's thread panicked"))?;
    if let Some((server, name)) = dns
        && ask(server, &name)?
    {
        outcome |= ANSWERED;
    }
    if netns {
        super::check(
            // SAFETY: unshare with a flag.
            unsafe { libc::unshare(libc::CLONE_NEWNET) },
            "unshare(CLONE_NEWNET)",
        )?;
        // The gid first, while still privileged.
        super::check(
            // SAFETY: a plain syscall on integers.
            unsafe { libc::setresgid(PAUSE_UID, PAUSE_UID, PAUSE_UID) },
            "setresgid",
        )?;
        super::check(
            // SAFETY: as above.
            unsafe { libc::setresuid(PAUSE_UID, PAUSE_UID, PAUSE_UID) },
            "setresuid",
        )?;
        // As after a pause container's exec: its /proc files are its own uid's.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1) };
    }
    Ok(outcome)
}

/// One A question for `name` to `server`: whether an answer came within DNS_WAIT.
fn ask(server: SocketAddr, name: &str) -> anyhow::Result<bool> {
    let any = if server.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let socket = UdpSocket::bind(any).context("binding a UDP socket")?;
    socket
        .connect(server)
        .with_context(|| format!("connecting to {server}"))?;
    socket.set_read_timeout(Some(DNS_WAIT))?;
    let id = (std::process::id() & 0xffff) as u16;
    let mut query = id.to_be_bytes().to_vec();
    query.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    socket.send(&query).context("sending the question")?;
    let mut answer = [0u8; 512];
    Ok(socket
        .recv(&mut answer)
        .is_ok_and(|n| n >= 2 && answer[..2] == query[..2]))
}
