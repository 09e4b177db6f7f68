//! faultline-as-deployed: runs a program the way deploy/'s DaemonSet runs faultline, for the
//! tests and the kernel matrix (test tooling, never shipped).
//!
//! It owns the container half of "as deployed": what a container runtime (runc under containerd
//! or Docker) does between the pod spec and the program's first instruction, in runc's order,
//! from a profile that `cargo xtask` extracts from the rendered manifest
//! (`target/as-deployed/profile.json`, see xtask/src/deployed.rs; never a second copy):
//!
//! 1. join one shared cgroup v2 directory, `faultline-as-deployed`, under the cgroup v2 root,
//!    then a mount namespace and a cgroup namespace of its own (private cgroup namespace:
//!    containerd's and Docker's default on cgroup v2; `/proc/self/cgroup` reads `0::/`);
//! 2. a new root on a tmpfs: read-only stand-ins for the image's userland (`/usr`, `/bin`,
//!    `/sbin`, `/lib`, `/lib64`, `/etc` of this machine), the program's own directory
//!    (read-only), the host's `/tmp` (the tests' scratch files), a fresh procfs with a runtime's
//!    masked and read-only paths, sysfs read-only, a minimal `/dev`, then each of the manifest's
//!    volumes at its mountPath; `pivot_root` into it, read-only if readOnlyRootFilesystem;
//! 3. RLIMIT_MEMLOCK as a runtime hands it out (`--memlock`, 64 KiB by default: never
//!    unlimited), no_new_privs unless allowPrivilegeEscalation, then only the profile's
//!    capabilities (bounding, effective, permitted; inheritable and ambient cleared), uid 0;
//! 4. exec in place: the program keeps this process's pid (the tests signal it, read its fds).
//!
//! The pid and network namespaces stay the host's: the manifest says hostPID and hostNetwork,
//! and xtask refuses a profile that does not. `--without CAP` removes one capability of the
//! profile (what the manifest's comment says it is for is then shown by `faultline check`);
//! `--full-root` keeps every capability (the few tests that need more than the manifest).
//! `--cgroup DIR` joins that cgroup v2 directory (the caller's, made beforehand) instead of the
//! shared one: the benchmark's, under a memory limit of its own and out of reach of another
//! run's `--remove-cgroup`. `--remove-cgroup` ends what is left in the shared cgroup and
//! removes it (xtask and the VM script call it before and after a run).
//!
//! Success prints nothing; every failure is one line on stderr and exit status 125.

use std::{
    ffi::{CString, OsStr, OsString},
    os::unix::ffi::{OsStrExt as _, OsStringExt as _},
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use probe_common::caps;
use serde::Deserialize;

const EXIT_FAILURE: i32 = 125;
const CGROUP_NAME: &str = "faultline-as-deployed";
/// A container runtime's RLIMIT_MEMLOCK under systemd's default (containerd, dockerd).
const DEFAULT_MEMLOCK: u64 = 64 << 10;

/// One line, like every failure.
const USAGE: &str = "usage: --profile PROFILE.json [--memlock BYTES] [--without CAP]... \
[--full-root] [--cgroup DIR] -- PROGRAM ARGS..., or --remove-cgroup";

/// What the launcher needs of the DaemonSet (written by `cargo xtask`, xtask/src/deployed.rs).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Profile {
    /// The container's `securityContext.capabilities.add` (after `drop: ["ALL"]`).
    capabilities: Vec<String>,
    read_only_root_filesystem: bool,
    allow_privilege_escalation: bool,
    #[serde(rename = "hostPID")]
    host_pid: bool,
    host_network: bool,
    mounts: Vec<Volume>,
    /// The container's args and env: the tests' daemon harness starts `faultline run` with
    /// them; the launcher runs the command line it is given.
    #[serde(rename = "container")]
    _container: serde::de::IgnoredAny,
}

/// A volumeMount joined with its hostPath volume.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Volume {
    host_path: PathBuf,
    mount_path: PathBuf,
    read_only: bool,
    /// `recursiveReadOnly: Enabled`: without it Kubernetes makes only the top mount read-only
    /// (mounts below a hostPath, e.g. v1 hierarchies under /sys/fs/cgroup, stay writable).
    #[serde(default)]
    recursive_read_only: bool,
}

struct Args {
    profile: PathBuf,
    memlock: u64,
    without: Vec<String>,
    full_root: bool,
    /// The cgroup v2 directory to join instead of the shared one.
    cgroup: Option<PathBuf>,
    program: Vec<OsString>,
}

/// One failure: what was being done, and why it failed.
struct Fail(String, String);

type Result<T> = std::result::Result<T, Fail>;

/// The failure of the last system call.
fn os_fail(what: impl Into<String>) -> Fail {
    io_fail(what, std::io::Error::last_os_error())
}

fn io_fail(what: impl Into<String>, e: std::io::Error) -> Fail {
    let text = e.to_string();
    // "Operation not permitted (os error 1)": the errno's own text.
    let text = match text.rsplit_once(" (os error ") {
        Some((t, _)) => t.to_owned(),
        None => text,
    };
    Fail(what.into(), text)
}

fn fail(what: impl Into<String>, why: impl Into<String>) -> Fail {
    Fail(what.into(), why.into())
}

fn main() {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let result = if args.first().is_some_and(|a| a == "--remove-cgroup") && args.len() == 1 {
        remove_cgroup()
    } else {
        parse(args).and_then(launch)
    };
    // launch only returns on failure: exec replaced this process otherwise.
    if let Err(Fail(what, why)) = result {
        eprintln!("faultline-as-deployed: {what}: {why}");
        std::process::exit(EXIT_FAILURE);
    }
}

fn parse(args: Vec<OsString>) -> Result<Args> {
    let mut profile = None;
    let mut memlock = DEFAULT_MEMLOCK;
    let mut without = Vec::new();
    let mut full_root = false;
    let mut cgroup = None;
    let mut it = args.into_iter();
    let value = |it: &mut std::vec::IntoIter<OsString>, flag: &str| {
        it.next()
            .ok_or_else(|| fail(flag, format!("needs a value ({USAGE})")))
    };
    let program = loop {
        let Some(arg) = it.next() else {
            return Err(fail("usage", format!("no -- PROGRAM ({USAGE})")));
        };
        match arg.to_str() {
            Some("--profile") => profile = Some(PathBuf::from(value(&mut it, "--profile")?)),
            Some("--memlock") => {
                let v = value(&mut it, "--memlock")?;
                memlock = v
                    .to_str()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| fail("--memlock", format!("not a number of bytes: {v:?}")))?;
            }
            Some("--without") => {
                let v = value(&mut it, "--without")?;
                without.push(cap_name(&v.to_string_lossy()));
            }
            Some("--full-root") => full_root = true,
            Some("--cgroup") => cgroup = Some(PathBuf::from(value(&mut it, "--cgroup")?)),
            Some("--") => break it.collect::<Vec<_>>(),
            _ => return Err(fail("usage", format!("unexpected {arg:?} ({USAGE})"))),
        }
    };
    if program.is_empty() {
        return Err(fail("usage", format!("no PROGRAM after -- ({USAGE})")));
    }
    let profile = profile.ok_or_else(|| fail("usage", format!("no --profile ({USAGE})")))?;
    Ok(Args {
        profile,
        memlock,
        without,
        full_root,
        cgroup,
        program,
    })
}

/// `BPF`, `bpf` and `CAP_BPF` are one capability (the manifest may say either).
fn cap_name(s: &str) -> String {
    let upper = s.trim().to_ascii_uppercase();
    upper.strip_prefix("CAP_").unwrap_or(&upper).to_owned()
}

fn launch(args: Args) -> Result<()> {
    let text = std::fs::read_to_string(&args.profile)
        .map_err(|e| io_fail(format!("reading {}", args.profile.display()), e))?;
    let profile: Profile = serde_json::from_str(&text)
        .map_err(|e| fail(format!("parsing {}", args.profile.display()), e.to_string()))?;
    if !profile.host_pid || !profile.host_network {
        return Err(fail(
            "profile",
            "hostPID and hostNetwork must be true: pid and network namespaces of the \
             container's own are not emulated",
        ));
    }
    let mut keep = 0u64;
    let profile_caps: Vec<String> = profile.capabilities.iter().map(|c| cap_name(c)).collect();
    for w in &args.without {
        if !profile_caps.contains(w) {
            return Err(fail(
                format!("--without {w}"),
                format!("not in the profile's capabilities {profile_caps:?}"),
            ));
        }
    }
    for name in profile_caps.iter().filter(|c| !args.without.contains(c)) {
        let bit =
            caps::number(name).ok_or_else(|| fail(format!("capability {name}"), "unknown"))?;
        keep |= 1 << bit;
    }
    let program = resolve_program(&args.program[0])?;

    join_cgroup(args.cgroup.as_deref())?;
    check(
        // SAFETY: unshare(2) with flags only.
        unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWCGROUP) },
        "unshare(CLONE_NEWNS | CLONE_NEWCGROUP)",
    )?;
    // Nothing mounted from here on propagates back to the host.
    mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None)
        .map_err(|Fail(_, e)| fail("making / rprivate", e))?;
    let root = build_root(&profile, program.as_deref())?;
    pivot(&root)?;
    if profile.read_only_root_filesystem {
        mount(
            None,
            "/",
            None,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            None,
        )
        .map_err(|Fail(_, e)| fail("remounting / read-only (readOnlyRootFilesystem)", e))?;
    }
    let limit = libc::rlimit {
        rlim_cur: args.memlock,
        rlim_max: args.memlock,
    };
    // Before the capabilities go: raising the limit needs CAP_SYS_RESOURCE.
    check(
        // SAFETY: a valid rlimit.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) },
        format!("setting RLIMIT_MEMLOCK to {}", args.memlock),
    )?;
    if !profile.allow_privilege_escalation {
        check(
            // SAFETY: prctl with integer arguments.
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
            "setting no_new_privs (allowPrivilegeEscalation: false)",
        )?;
    }
    if !args.full_root {
        drop_capabilities(keep)?;
    }
    exec(program, &args.program)
}

fn check(rc: libc::c_int, what: impl Into<String>) -> Result<()> {
    if rc == 0 { Ok(()) } else { Err(os_fail(what)) }
}

/// A PROGRAM with a slash, made absolute (the new root's working directory is `/`): its
/// directory is bound into the new root at the same path. None: looked up in the new root's
/// PATH, as execvp does.
fn resolve_program(program: &OsStr) -> Result<Option<PathBuf>> {
    if !program.as_bytes().contains(&b'/') {
        return Ok(None);
    }
    let path = Path::new(program);
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = std::fs::canonicalize(dir.unwrap_or(Path::new(".")))
        .map_err(|e| io_fail(format!("finding {}", path.display()), e))?;
    let name = path
        .file_name()
        .ok_or_else(|| fail(format!("{}", path.display()), "not a file"))?;
    Ok(Some(dir.join(name)))
}

/// The cgroup v2 root: /sys/fs/cgroup on a v2-only machine, /sys/fs/cgroup/unified on a
/// hybrid one.
fn cgroup2_root() -> Result<PathBuf> {
    for dir in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        let c = CString::new(dir).expect("no NUL");
        // SAFETY: statfs into a zeroed struct.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: a NUL-terminated path and a valid out pointer.
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0
            && st.f_type == libc::CGROUP2_SUPER_MAGIC as libc::__fsword_t
        {
            return Ok(PathBuf::from(dir));
        }
    }
    Err(fail(
        "finding the cgroup v2 root",
        "no cgroup2 at /sys/fs/cgroup or /sys/fs/cgroup/unified",
    ))
}

/// Moves this process into the shared cgroup (created if need be), or `own`, as a runtime
/// puts a container into its own (the cgroup namespace made next has it as its root).
fn join_cgroup(own: Option<&Path>) -> Result<()> {
    let dir = match own {
        Some(dir) => dir.to_path_buf(),
        None => {
            let dir = cgroup2_root()?.join(CGROUP_NAME);
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_fail(format!("creating {}", dir.display()), e)),
            }
            dir
        }
    };
    std::fs::write(dir.join("cgroup.procs"), "0")
        .map_err(|e| io_fail(format!("joining {}", dir.display()), e))
}

/// Ends what is left in the shared cgroup (a launched program whose test was killed) and
/// removes it; nothing to do when it does not exist. At most 5 s.
fn remove_cgroup() -> Result<()> {
    let dir = cgroup2_root()?.join(CGROUP_NAME);
    let mut last = None;
    for _ in 0..50 {
        match std::fs::remove_dir(&dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => last = Some(e),
        }
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill(2); the pids are what this launcher put into its own cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(io_fail(
        format!("removing {}", dir.display()),
        last.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EBUSY)),
    ))
}

fn cstr(p: impl AsRef<OsStr>) -> Result<CString> {
    CString::new(p.as_ref().as_bytes()).map_err(|_| fail(format!("{:?}", p.as_ref()), "has NUL"))
}

fn mount(
    source: Option<&str>,
    target: impl AsRef<Path>,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<()> {
    let target = target.as_ref();
    let source = source.map(cstr).transpose()?;
    let fstype = fstype.map(cstr).transpose()?;
    let data = data.map(cstr).transpose()?;
    let t = cstr(target)?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: NUL-terminated strings or null, as mount(2) allows.
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            t.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    check(
        rc,
        format!(
            "mounting {} on {}",
            source
                .as_ref()
                .map_or("(remount)".into(), |s| s.to_string_lossy()),
            target.display()
        ),
    )
}

/// A bind mount (recursive with `rec`) of `source` at `target`.
fn bind(source: &Path, target: &Path, rec: bool) -> Result<()> {
    let flags = libc::MS_BIND | if rec { libc::MS_REC } else { 0 };
    let s = source
        .to_str()
        .ok_or_else(|| fail(format!("{}", source.display()), "not UTF-8"))?;
    mount(Some(s), target, None, flags, None)
}

/// Makes the mount at `target` read-only, and with `rec` every mount below it too (bind
/// mounts have per-mount flags: a remount of each; mount_setattr would need 5.12).
fn read_only(target: &Path, rec: bool) -> Result<()> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| io_fail("reading /proc/self/mountinfo", e))?;
    let mut done = false;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (Some(point), Some(options)) = (fields.get(4), fields.get(5)) else {
            continue;
        };
        let point = PathBuf::from(unescape(point));
        let below = rec && point.starts_with(target) && point != target;
        if point != target && !below {
            continue;
        }
        let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
        for o in options.split(',') {
            flags |= match o {
                "nosuid" => libc::MS_NOSUID,
                "nodev" => libc::MS_NODEV,
                "noexec" => libc::MS_NOEXEC,
                "noatime" => libc::MS_NOATIME,
                "nodiratime" => libc::MS_NODIRATIME,
                "relatime" => libc::MS_RELATIME,
                _ => 0,
            };
        }
        mount(None, &point, None, flags, None)
            .map_err(|Fail(_, e)| fail(format!("remounting {} read-only", point.display()), e))?;
        done |= point == target;
    }
    if done {
        Ok(())
    } else {
        Err(fail(
            format!("remounting {} read-only", target.display()),
            "not in mountinfo",
        ))
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> OsString {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).and_then(|o| {
            std::str::from_utf8(o)
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        });
        match (b[i], octal) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    OsString::from_vec(out)
}

fn mkdir_p(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| io_fail(format!("creating {}", dir.display()), e))
}

/// `path` inside the new root.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// The image's userland: this machine's, read-only (on merged-/usr systems /bin, /sbin, /lib
/// and /lib64 are symlinks into /usr, and are made so here too).
const USERLAND: [&str; 6] = ["/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc"];
/// containerd's default spec for a container that is not privileged (runc applies it):
/// masked (a file: /dev/null over it; a directory: an empty read-only tmpfs) and read-only.
const MASKED: [&str; 11] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
const READ_ONLY: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];
/// Where the new root's tmpfs is mounted (in this mount namespace only): a directory that no
/// bind source is under and, preferably, with nothing mounted below it.
const STAGING: [&str; 6] = ["/media", "/srv", "/opt", "/mnt", "/home", "/root"];

fn staging(sources: &[&Path]) -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| io_fail("reading /proc/self/mountinfo", e))?;
    let points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .collect();
    let usable = |c: &str| {
        let c = Path::new(c);
        std::fs::symlink_metadata(c).is_ok_and(|m| m.is_dir())
            && !sources.iter().any(|s| s.starts_with(c) || c.starts_with(s))
    };
    let quiet = |c: &str| !points.iter().any(|p| p.starts_with(c));
    STAGING
        .into_iter()
        .find(|c| usable(c) && quiet(c))
        .or_else(|| STAGING.into_iter().find(|c| usable(c)))
        .map(PathBuf::from)
        .ok_or_else(|| {
            fail(
                "finding a directory for the new root",
                format!("none of {STAGING:?}"),
            )
        })
}

fn build_root(profile: &Profile, program: Option<&Path>) -> Result<PathBuf> {
    let program_dir = program.and_then(Path::parent);
    let mut sources: Vec<&Path> = USERLAND.iter().map(Path::new).collect();
    sources.extend([Path::new("/tmp"), Path::new("/dev")]);
    sources.extend(profile.mounts.iter().map(|m| m.host_path.as_path()));
    sources.extend(program_dir);
    let root = staging(&sources)?;
    mount(
        Some("tmpfs"),
        &root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=755,size=16m"),
    )?;

    for dir in USERLAND.map(Path::new) {
        let Ok(meta) = std::fs::symlink_metadata(dir) else {
            continue;
        };
        let target = inside(&root, dir);
        if meta.file_type().is_symlink() {
            let link = std::fs::read_link(dir)
                .map_err(|e| io_fail(format!("reading {}", dir.display()), e))?;
            std::os::unix::fs::symlink(&link, &target)
                .map_err(|e| io_fail(format!("creating {}", target.display()), e))?;
        } else if meta.is_dir() {
            mkdir_p(&target)?;
            bind(dir, &target, true)?;
            read_only(&target, true)?;
        }
    }

    // The host's /tmp, writable: a stand-in for the scratch space a test shares with the
    // program (its files, kubelet log trees, BTF copies), as an emptyDir volume would be.
    let tmp = inside(&root, Path::new("/tmp"));
    mkdir_p(&tmp)?;
    bind(Path::new("/tmp"), &tmp, true)?;

    let proc = inside(&root, Path::new("/proc"));
    mkdir_p(&proc)?;
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // hostPID: the host's pid namespace, so this procfs shows every process of the node.
    mount(Some("proc"), &proc, Some("proc"), nosuid_nodev_noexec, None)?;
    let sys = inside(&root, Path::new("/sys"));
    mkdir_p(&sys)?;
    mount(
        Some("sysfs"),
        &sys,
        Some("sysfs"),
        nosuid_nodev_noexec | libc::MS_RDONLY,
        None,
    )?;

    let dev = inside(&root, Path::new("/dev"));
    mkdir_p(&dev)?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_STRICTATIME,
        Some("mode=755,size=64k"),
    )?;
    for name in DEVICES {
        let host = Path::new("/dev").join(name);
        if !host.exists() {
            continue;
        }
        let node = dev.join(name);
        std::fs::File::create(&node)
            .map_err(|e| io_fail(format!("creating {}", node.display()), e))?;
        bind(&host, &node, false)?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(name))
            .map_err(|e| io_fail(format!("creating /dev/{name}"), e))?;
    }

    for path in MASKED.map(Path::new) {
        let target = inside(&root, path);
        match std::fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => mount(
                Some("tmpfs"),
                &target,
                Some("tmpfs"),
                libc::MS_RDONLY,
                Some("size=0"),
            )?,
            Ok(_) => bind(&dev.join("null"), &target, false)?,
            Err(_) => {}
        }
    }
    for path in READ_ONLY.map(Path::new) {
        let target = inside(&root, path);
        if target.exists() {
            bind(&target, &target, true)?;
            read_only(&target, true)?;
        }
    }

    for v in &profile.mounts {
        let target = inside(&root, &v.mount_path);
        match std::fs::metadata(&v.host_path) {
            Ok(m) => {
                if !target.exists() && m.is_dir() {
                    mkdir_p(&target)?;
                } else if !target.exists() {
                    mkdir_p(target.parent().unwrap_or(&root))?;
                    std::fs::File::create(&target)
                        .map_err(|e| io_fail(format!("creating {}", target.display()), e))?;
                }
                // Kubernetes binds a hostPath recursively (rbind).
                bind(&v.host_path, &target, true)?;
            }
            // A runtime creates a missing hostPath directory on the node; this launcher does
            // not touch the host: an empty directory (what the program would see) instead,
            // made a mount of its own so that it can be read-only.
            Err(_) => {
                mkdir_p(&target)?;
                bind(&target, &target, false)?;
            }
        }
        if v.read_only {
            read_only(&target, v.recursive_read_only)?;
        }
    }

    // The program's directory, read-only at the same path, unless it is already there (in
    // /usr, /tmp, a volume).
    if let Some(dir) = program_dir {
        let target = inside(&root, dir);
        let same = |a: &Path, b: &Path| match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if !same(dir, &target) {
            mkdir_p(&target)?;
            bind(dir, &target, false)?;
            read_only(&target, false)?;
        }
    }
    Ok(root)
}

/// pivot_root into the new root and detach the old one, as runc does (`pivot_root(".", ".")`
/// stacks the old root on the new; unmounting "." then leaves the new one).
fn pivot(root: &Path) -> Result<()> {
    let open = |p: &Path| -> Result<std::fs::File> {
        std::fs::File::open(p).map_err(|e| io_fail(format!("opening {}", p.display()), e))
    };
    let old = open(Path::new("/"))?;
    let new = open(root)?;
    use std::os::fd::AsRawFd as _;
    check(
        // SAFETY: fchdir to an open directory.
        unsafe { libc::fchdir(new.as_raw_fd()) },
        "entering the new root",
    )?;
    // SAFETY: pivot_root(2) with two NUL-terminated paths.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) };
    check(
        rc as libc::c_int,
        format!("pivot_root to {}", root.display()),
    )?;
    check(
        // SAFETY: fchdir to an open directory (the old root, now stacked on /).
        unsafe { libc::fchdir(old.as_raw_fd()) },
        "entering the old root",
    )?;
    mount(None, ".", None, libc::MS_SLAVE | libc::MS_REC, None)?;
    check(
        // SAFETY: umount2 of a NUL-terminated path.
        unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) },
        "detaching the old root",
    )?;
    // SAFETY: chdir to a NUL-terminated path.
    check(unsafe { libc::chdir(c"/".as_ptr()) }, "entering /")
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Only `keep` in the bounding, effective and permitted sets; nothing inheritable or ambient.
/// As uid 0 the program's exec then grants it exactly the bounding set. A capability this
/// process does not hold itself (a sandbox whose own bounding set lacks it) cannot be given:
/// the program goes without it, as it would in a container on that machine; xtask's host
/// checks say so (`/proc/self/status`'s CapPrm is what the program got).
fn drop_capabilities(keep: u64) -> Result<()> {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .map_err(|e| io_fail("reading /proc/sys/kernel/cap_last_cap", e))?
        .trim()
        .parse()
        .map_err(|_| fail("reading /proc/sys/kernel/cap_last_cap", "not a number"))?;
    if let Some(bit) = (last + 1..64).find(|b| keep & (1 << b) != 0) {
        return Err(fail(
            format!("CAP_{}", caps::name(bit)),
            "not known to this kernel",
        ));
    }
    for cap in (0..=last).filter(|c| keep & (1 << c) == 0) {
        check(
            // SAFETY: prctl with integer arguments.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) },
            format!("dropping CAP_{} from the bounding set", caps::name(cap)),
        )?;
    }
    check(
        // SAFETY: prctl with integer arguments.
        unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            )
        },
        "clearing the ambient capabilities",
    )?;
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut held = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capget(2) with a v3 header and room for its two data structs.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, held.as_mut_ptr()) };
    check(rc as libc::c_int, "reading the capabilities (capget)")?;
    let keep = keep & (u64::from(held[0].permitted) | u64::from(held[1].permitted) << 32);
    let half = |shift: u32| CapData {
        effective: (keep >> shift) as u32,
        permitted: (keep >> shift) as u32,
        inheritable: 0,
    };
    let data = [half(0), half(32)];
    // SAFETY: capset(2) with a v3 header and its two data structs.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    check(rc as libc::c_int, "setting the capabilities (capset)")
}

fn exec(program: Option<PathBuf>, argv: &[OsString]) -> Result<()> {
    let file = match &program {
        Some(p) => cstr(p)?,
        None => cstr(&argv[0])?,
    };
    let args: Vec<CString> = argv.iter().map(cstr).collect::<Result<_>>()?;
    let mut ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: a NUL-terminated file name and a null-terminated argv of NUL-terminated strings.
    unsafe { libc::execvp(file.as_ptr(), ptrs.as_ptr()) };
    Err(os_fail(format!("executing {}", argv[0].to_string_lossy())))
}
