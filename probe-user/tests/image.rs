//! The shipped image, run the way the DaemonSet runs it, with a real container runtime.
//!
//! `deploy/Dockerfile` cannot be built here (no image registry is reachable for its `debian:12`
//! bases), so it is checked by reading: its build stage installs what building needs and no
//! test tool, its pins are the repository's, every file it copies exists, and its dependency
//! layer fetches every crate from the manifests alone (run here, offline, from the cache).
//!
//! Then its runtime stage is built for real: on a base made from Debian's packages (mmdebstrap:
//! a minimal bookworm with ca-certificates, what `debian:12-slim` plus the stage's `apt-get`
//! give; cached under target/image/) with the release binary, and run by podman under the
//! security context, mounts, environment and namespaces translated here from the rendered
//! manifest (`kubectl kustomize deploy/`). Workloads run as sibling containers of the same
//! base, with the runtime's own `--pids-limit` and network namespaces of their own (on a bridge
//! in a namespace of their own: no traffic touches the host's). From the agent's side: a
//! workload's pids-limit failure with its cause and the container named (its cgroup, which
//! carries the container id: no Kubernetes here to name a pod); DNS per container to a real
//! resolver (dnsmasq) in another container; a conntrack drop in a container's own namespace; a
//! real Prometheus scraping the agent with the shipped rules firing `FaultlineCloneFailures`;
//! `faultline explain` through `podman exec` naming the pids limit. The image's size and its
//! start-to-ready time are printed (BENCHMARKS.md holds them).
//!
//! The runtime is Debian's podman: Debian's docker.io (20.10) refuses `--cap-add BPF` and
//! `--cap-add PERFMON` ("unknown capability"; moby 20.10 cuts its capability list at
//! CAP_AUDIT_READ), so it cannot run the manifest's security context at all. podman needs no
//! daemon; everything it keeps (storage, run state, the containers' cgroups) lives under this
//! run's own directories and cgroup parent and is removed at the end, also when a check fails.
//! Root only. Needs `podman` and `mmdebstrap` (`cargo xtask setup`), and deb.debian.org for
//! the first (uncached) base.
#![allow(clippy::unwrap_used)] // a test fails by panicking: helpers outside #[test] fns unwrap too

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{manifest::*, *};
use serde_json::Value;

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

// ---------------------------------------------------------------------------------------
// deploy/Dockerfile, read

#[derive(Debug, Clone)]
struct Instruction {
    op: String,
    args: String,
}

/// The Dockerfile's stages, each a list of instructions (continuation lines joined, comments
/// dropped).
fn dockerfile() -> Vec<Vec<Instruction>> {
    let mut stages: Vec<Vec<Instruction>> = Vec::new();
    let mut logical = String::new();
    for line in read("deploy/Dockerfile").lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                logical.push_str(part);
                logical.push(' ');
            }
            None => {
                logical.push_str(t);
                let (op, args) = logical
                    .split_once(char::is_whitespace)
                    .unwrap_or((logical.as_str(), ""));
                let inst = Instruction {
                    op: op.to_uppercase(),
                    args: args.split_whitespace().collect::<Vec<_>>().join(" "),
                };
                if inst.op == "FROM" {
                    stages.push(Vec::new());
                }
                stages
                    .last_mut()
                    .expect("an instruction before the first FROM")
                    .push(inst);
                logical.clear();
            }
        }
    }
    stages
}

/// The packages every `apt-get install` of a RUN installs.
fn apt_installs(run: &str) -> Vec<String> {
    run.split("&&")
        .filter_map(|cmd| cmd.split_once("apt-get install"))
        .flat_map(|(_, rest)| {
            rest.split_whitespace()
                .filter(|w| !w.starts_with('-'))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A `const NAME: &str = "...";` of a Rust source.
fn rust_const(source: &str, name: &str) -> String {
    let prefix = format!("const {name}: &str = \"");
    source
        .lines()
        .find_map(|l| l.trim().strip_prefix(&prefix)?.strip_suffix("\";"))
        .unwrap_or_else(|| panic!("no {name} constant"))
        .to_owned()
}

/// xtask's Debian packages: `BUILD_PACKAGES` (what `setup` installs) and `TEST_PACKAGES`
/// (what `setup --tests` adds), in xtask/src/main.rs.
fn xtask_packages() -> Vec<String> {
    let source = read("xtask/src/main.rs");
    ["BUILD_PACKAGES", "TEST_PACKAGES"]
        .iter()
        .flat_map(|name| {
            let start = source
                .find(&format!("const {name}"))
                .unwrap_or_else(|| panic!("no {name} in xtask"));
            let body = &source[start..];
            let body = &body[..body.find("];").unwrap_or_else(|| panic!("end of {name}"))];
            body.lines()
                .skip(1)
                .filter(|l| !l.trim_start().starts_with("//"))
                .filter_map(|l| Some(l.split('"').nth(1)?.to_owned()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// What bpf-linker links against (KERNEL-FACTS.md): the only xtask packages a build needs.
const BUILD_PACKAGES: [&str; 4] = [
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
];
/// What else the build stage may install: certificates and curl for rustup, a C toolchain for
/// the build scripts.
const BUILD_TOOLS: [&str; 4] = ["ca-certificates", "curl", "build-essential", "pkg-config"];

fn arg_default(stage: &[Instruction], name: &str) -> String {
    stage
        .iter()
        .filter(|i| i.op == "ARG")
        .find_map(|i| i.args.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no ARG {name}=... in the build stage"))
        .to_owned()
}

#[test]
fn the_build_stage_installs_only_what_building_needs_with_the_repositorys_pins() {
    let stages = dockerfile();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    let build = &stages[0];
    let installed: Vec<String> = build
        .iter()
        .filter(|i| i.op == "RUN")
        .flat_map(|i| apt_installs(&i.args))
        .collect();
    let xtask = xtask_packages();
    for p in BUILD_PACKAGES {
        assert!(xtask.contains(&p.to_owned()), "{p} is not xtask's any more");
        assert!(installed.contains(&p.to_owned()), "the build needs {p}");
    }
    for p in &installed {
        assert!(
            BUILD_PACKAGES.contains(&p.as_str()) || BUILD_TOOLS.contains(&p.as_str()),
            "the build stage installs {p}, which building does not need"
        );
    }
    // None of xtask's test tools, by package or by the commands that install them.
    let text: String = build
        .iter()
        .map(|i| format!("{} {}\n", i.op, i.args))
        .collect();
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c == '"' || c == '\'')
        .collect();
    for p in xtask
        .iter()
        .filter(|p| !BUILD_PACKAGES.contains(&p.as_str()))
    {
        assert!(
            !words.contains(&p.as_str()),
            "test tool {p} in the build stage"
        );
    }
    for tool in ["xtask setup", "pip ", "venv", "python3"] {
        assert!(
            !text.contains(tool),
            "the build stage runs {tool:?}:\n{text}"
        );
    }
    // The pins are the repository's.
    let ebpf = rust_const(&read("probe-user/build.rs"), "EBPF_TOOLCHAIN");
    assert_eq!(
        ebpf,
        rust_const(&read("xtask/src/main.rs"), "EBPF_TOOLCHAIN")
    );
    assert_eq!(arg_default(build, "EBPF_TOOLCHAIN"), ebpf);
    assert_eq!(
        arg_default(build, "BPF_LINKER_VERSION"),
        rust_const(&read("xtask/src/main.rs"), "BPF_LINKER_VERSION")
    );
    assert!(text.contains("--component rust-src"), "{text}");
    assert!(text.contains("--features llvm-22"), "{text}");
    // rust-toolchain.toml's toolchain, through the script that installs it on a node.
    let runs_bootstrap = build
        .iter()
        .position(|i| i.op == "RUN" && i.args.contains("xtask/bootstrap.sh"));
    let copies = |src: &str| {
        build
            .iter()
            .position(|i| i.op == "COPY" && i.args.split(' ').next() == Some(src))
    };
    assert!(
        copies("rust-toolchain.toml") < runs_bootstrap && runs_bootstrap.is_some(),
        "bootstrap.sh reads rust-toolchain.toml"
    );
    // Every file copied from the context exists and is sent (.dockerignore).
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.trim().trim_start_matches("**/").to_owned())
        .collect();
    for stage in &stages {
        for copy in stage.iter().filter(|i| i.op == "COPY" || i.op == "ADD") {
            let parts: Vec<&str> = copy.args.split(' ').collect();
            if parts.iter().any(|p| p.starts_with("--from")) {
                continue;
            }
            for src in &parts[..parts.len() - 1] {
                assert!(
                    root().join(src).exists(),
                    "COPY {src}: no such file in the repository"
                );
                assert!(
                    *src == "." || !ignored.iter().any(|i| src.starts_with(i.as_str())),
                    "COPY {src} is excluded by .dockerignore"
                );
            }
        }
    }
    // The dependency layer: every workspace member's manifest and the lock file, then the
    // fetch, all before the sources.
    let sources = build
        .iter()
        .position(|i| i.op == "COPY" && i.args == ". .")
        .expect("COPY . .");
    let fetch = build
        .iter()
        .position(|i| i.op == "RUN" && i.args.contains("cargo fetch --locked"))
        .expect("a cargo fetch --locked layer");
    assert!(fetch < sources, "the crates are fetched before the sources");
    for member in workspace_members() {
        let manifest = format!("{member}/Cargo.toml");
        assert!(
            copies(&manifest).is_some_and(|i| i < fetch),
            "{manifest} is not copied before the fetch"
        );
    }
    assert!(
        build[..fetch]
            .iter()
            .any(|i| i.op == "COPY" && i.args == "Cargo.toml Cargo.lock ./"),
        "the workspace manifest and lock file before the fetch"
    );
    assert!(
        build[sources..]
            .iter()
            .any(|i| i.op == "RUN" && i.args.contains("cargo build --release --locked")),
        "a locked release build of the sources"
    );
    // The runtime stage: the slim base, certificates, the binary.
    let runtime = &stages[1];
    assert_eq!(runtime[0].args, "debian:12-slim");
    let runtime_installs: Vec<String> = runtime
        .iter()
        .filter(|i| i.op == "RUN")
        .flat_map(|i| apt_installs(&i.args))
        .collect();
    assert_eq!(runtime_installs, ["ca-certificates"]);
}

fn workspace_members() -> Vec<String> {
    let manifest = read("Cargo.toml");
    let line = manifest
        .lines()
        .find(|l| l.starts_with("members"))
        .expect("workspace members");
    line.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The build stage's dependency layer, replayed: its COPYs into an empty directory, then its
/// RUN, offline (every crate must come from the manifests and the lock file alone, and the
/// cache the workspace's own build filled has them).
#[test]
fn the_dependency_layer_fetches_every_crate_from_the_manifests_alone() {
    let stages = dockerfile();
    let build = &stages[0];
    let fetch = build
        .iter()
        .position(|i| i.op == "RUN" && i.args.contains("cargo fetch"))
        .expect("the fetch layer");
    let dir = std::env::temp_dir().join(unique("dockerfile-fetch"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let workdir = build
        .iter()
        .rfind(|i| i.op == "WORKDIR")
        .map(|i| i.args.clone())
        .expect("WORKDIR");
    for copy in build[..fetch].iter().filter(|i| i.op == "COPY") {
        let parts: Vec<&str> = copy.args.split(' ').collect();
        let (dest, srcs) = parts.split_last().expect("COPY args");
        let dest = dir.join(dest.trim_start_matches(&workdir).trim_start_matches('/'));
        for src in srcs {
            let to = if dest.to_string_lossy().ends_with('/') || srcs.len() > 1 {
                std::fs::create_dir_all(&dest).expect("COPY destination");
                dest.join(Path::new(src).file_name().expect("a file"))
            } else {
                std::fs::create_dir_all(dest.parent().expect("parent")).expect("parent");
                dest.clone()
            };
            std::fs::copy(root().join(src), &to)
                .unwrap_or_else(|e| panic!("COPY {src} {}: {e}", to.display()));
        }
    }
    let script = &build[fetch].args;
    let out = Command::new("sh")
        .args(["-c", script])
        .current_dir(&dir)
        .env("CARGO_NET_OFFLINE", "true")
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .output()
        .expect("sh");
    let leftovers: Vec<String> = workspace_members()
        .iter()
        .filter(|m| dir.join(m).join("src").exists())
        .cloned()
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "the fetch layer failed:\n{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        leftovers.is_empty(),
        "stub sources left for COPY . . to mix with: {leftovers:?}"
    );
}

// ---------------------------------------------------------------------------------------
// The base image, from Debian's packages, cached

const MIRROR: &str = "http://deb.debian.org/debian";

/// mmdebstrap's arguments for the base (`{tar}` and `{debs}` stand for the outputs): a
/// minimal bookworm with apt and ca-certificates, documentation and locales excluded as
/// `debian:12-slim` does, and the packages of dnsmasq-base (with those of its dependencies the
/// base lacks) kept aside for the resolver's image.
fn base_recipe() -> Vec<String> {
    [
        "--variant=apt",
        "--include=ca-certificates",
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/info/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-exclude=/usr/share/lintian/*",
        "--customize-hook=rm -f \"$1\"/var/cache/apt/archives/*.deb",
        "--customize-hook=chroot \"$1\" apt-get install -y --download-only --no-install-recommends dnsmasq-base",
        "--customize-hook=sync-out /var/cache/apt/archives {debs}",
        "bookworm",
        "{tar}",
        MIRROR,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The cached base: (rootfs tarball, directory of dnsmasq's packages). Built once (about 25 s
/// and 40 MB from deb.debian.org), then reused while the recipe is the same; one builder at a
/// time (a lock file), written under a temporary name and renamed.
fn base() -> (PathBuf, PathBuf) {
    let dir = root().join("target/image");
    std::fs::create_dir_all(&dir).expect("target/image");
    let cached = dir.join("base");
    let recipe = base_recipe().join("\n");
    let lock = std::fs::File::create(dir.join("base.lock")).expect("lock file");
    assert_eq!(
        // SAFETY: a lock on a file we hold open; released when it closes.
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) },
        0
    );
    let ok = |d: &Path| {
        std::fs::read_to_string(d.join("recipe")).is_ok_and(|r| r == recipe)
            && d.join("rootfs.tar").exists()
            && debs(&d.join("debs")).iter().any(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("dnsmasq-base_"))
            })
    };
    if ok(&cached) {
        return (cached.join("rootfs.tar"), cached.join("debs"));
    }
    assert!(
        Command::new("mmdebstrap")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "mmdebstrap is missing: run `cargo xtask setup` (Debian package mmdebstrap)"
    );
    let tmp = dir.join(format!("base.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.join("debs")).expect("temp base dir");
    let started = Instant::now();
    let args: Vec<String> = base_recipe()
        .into_iter()
        .map(|a| {
            a.replace("{debs}", &tmp.join("debs").display().to_string())
                .replace("{tar}", &tmp.join("rootfs.tar").display().to_string())
        })
        .collect();
    let out = Command::new("timeout")
        .args(["--signal=KILL", "900", "mmdebstrap", "--quiet"])
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .expect("running mmdebstrap");
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        panic!(
            "mmdebstrap failed ({}; it needs {MIRROR}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::write(tmp.join("recipe"), &recipe).expect("recipe");
    let _ = std::fs::remove_dir_all(&cached);
    std::fs::rename(&tmp, &cached).expect("caching the base");
    eprintln!(
        "image: built the base with mmdebstrap in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    (cached.join("rootfs.tar"), cached.join("debs"))
}

fn debs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "deb"))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// The runtime

/// Mount points (from /proc/self/mountinfo) of these file system types, or under `prefix`.
fn mounts(filter: impl Fn(&str, &str) -> bool) -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = left.split(' ').nth(4)?.replace("\\040", " ");
            let fstype = right.split(' ').next()?;
            filter(&point, fstype).then(|| PathBuf::from(point))
        })
        .collect()
}

/// Removes a cgroup directory tree deepest first, killing what is left in it.
fn remove_cgroup_tree(dir: &Path) {
    fn dirs(d: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                dirs(&e.path(), out);
            }
        }
        out.push(d.to_path_buf());
    }
    let mut all = Vec::new();
    dirs(dir, &mut all);
    for d in all {
        for _ in 0..50 {
            for pid in std::fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: killing what is left in this test's own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if std::fs::remove_dir(&d).is_ok() || !d.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if d.exists() {
            eprintln!("warning: could not remove {}", d.display());
        }
    }
}

/// Host paths that did not exist before this run: removed at its end (files, and
/// directories once empty), deepest first.
#[derive(Default)]
struct Created(Vec<PathBuf>);

impl Created {
    /// Remembers the ones of `paths` (shallowest first) that do not exist yet.
    fn watch(&mut self, paths: &[&str]) {
        self.0.extend(
            paths
                .iter()
                .map(PathBuf::from)
                .filter(|p| !p.exists() && !p.is_symlink()),
        );
    }

    /// Creates a directory, remembering each component it created.
    fn dir(&mut self, path: &Path) {
        let mut missing: Vec<PathBuf> = path
            .ancestors()
            .take_while(|p| !p.exists())
            .map(Path::to_path_buf)
            .collect();
        missing.reverse();
        std::fs::create_dir_all(path).unwrap_or_else(|e| panic!("creating {path:?}: {e}"));
        self.0.extend(missing);
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            if p.is_dir() {
                let _ = std::fs::remove_dir(p);
            } else {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// crun refuses a hybrid cgroup layout whose v2 hierarchy holds any controller ("cgroups in
/// hybrid mode not supported, drop all controllers from cgroupv2"); this machine boots with
/// hugetlb there, unlike a systemd hybrid host, which mounts every controller as v1. For the
/// run, each such controller is mounted as a v1 hierarchy at /sys/fs/cgroup/<name> (as systemd
/// would); on drop it is unmounted until the kernel hands the controller back to v2.
struct HybridForCrun {
    /// Controller and mount point.
    mounted: Vec<(String, PathBuf)>,
}

const UNIFIED_CONTROLLERS: &str = "/sys/fs/cgroup/unified/cgroup.controllers";

/// The controllers of a hybrid host's cgroup v2 hierarchy (none on a pure v1 or v2 host).
fn unified_controllers() -> Vec<String> {
    std::fs::read_to_string(UNIFIED_CONTROLLERS)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn mount_v1(controller: &str, dir: &Path) -> bool {
    Command::new("mount")
        .args(["-t", "cgroup", "-o", controller, "cgroup"])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success())
}

impl HybridForCrun {
    fn new() -> HybridForCrun {
        let mut mounted = Vec::new();
        for name in unified_controllers() {
            let dir = Path::new("/sys/fs/cgroup").join(&name);
            assert!(
                !dir.exists(),
                "{name} is in cgroup v2 and {} exists: crun refuses this layout",
                dir.display()
            );
            std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
            if !mount_v1(&name, &dir) {
                let _ = std::fs::remove_dir(&dir);
                panic!("mounting the {name} controller as cgroup v1 for crun failed");
            }
            mounted.push((name, dir));
        }
        HybridForCrun { mounted }
    }
}

impl Drop for HybridForCrun {
    fn drop(&mut self) {
        for (name, dir) in &self.mounted {
            // A v1 hierarchy unmounted while a removed cgroup is still dying stays bound
            // (unmounted) for good; mounting it again and unmounting later releases it.
            let mut back = false;
            for _ in 0..30 {
                let _ = Command::new("umount").arg(dir).status();
                std::thread::sleep(Duration::from_millis(200));
                back = unified_controllers().contains(name);
                if back || !mount_v1(name, dir) {
                    break;
                }
            }
            let _ = std::fs::remove_dir(dir);
            if !back {
                eprintln!("warning: the {name} controller did not return to cgroup v2");
            }
        }
    }
}

/// podman with this run's own storage, run state, network configuration directory and cgroup
/// parent; on drop every container is removed, what podman left mounted unmounted, its
/// directories and cgroups removed.
struct Podman {
    storage: PathBuf,
    state: PathBuf,
    /// The containers' cgroup parent (`/<name>` in every hierarchy).
    parent: String,
    /// rlimits every container needs here (see `new`).
    ulimits: Vec<String>,
    /// Host files podman creates outside its directories whatever it is told.
    _created: Created,
    /// Dropped after the containers' cgroups are removed (fields drop after `drop`).
    _hybrid: HybridForCrun,
}

impl Podman {
    fn new() -> Podman {
        let version = Command::new("podman").arg("--version").output();
        assert!(
            version.as_ref().is_ok_and(|o| o.status.success()),
            "podman does not run here ({version:?}): run `cargo xtask setup` (Debian package podman)"
        );
        let mut created = Created::default();
        // The blob-info cache of containers/image has no option for root.
        created.watch(&[
            "/var/lib/containers",
            "/var/lib/containers/cache",
            "/var/lib/containers/cache/blob-info-cache-v1.boltdb",
        ]);
        let name = unique("image");
        // The run state holds conmon's sockets: a short path (sun_path is 108 bytes).
        let state = PathBuf::from(format!("/run/flimg-{}", std::process::id()));
        let storage = root()
            .join("target/image")
            .join(format!("run-{}", std::process::id()));
        for d in [&state, &storage] {
            let _ = std::fs::remove_dir_all(d);
            std::fs::create_dir_all(d).expect("podman directories");
        }
        std::fs::create_dir_all(storage.join("networks")).expect("network config dir");
        // podman's rootful defaults (nofile 1048576, nproc 4194304) exceed the hard limits
        // here, and raising a hard limit needs CAP_SYS_RESOURCE, which this machine's root
        // lacks: the containers get this process's NOFILE, and at most the 32768 processes
        // podman keeps for itself (RLIMIT_NPROC does not bind root anyway).
        let mut nofile = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        let mut nproc = nofile;
        // SAFETY: reading this process's own limits into valid structs.
        unsafe {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile);
            libc::getrlimit(libc::RLIMIT_NPROC, &mut nproc);
        }
        let nproc = nproc.rlim_max.min(32768);
        Podman {
            storage,
            state,
            parent: name,
            ulimits: vec![
                "--ulimit".into(),
                format!("nofile={0}:{0}", nofile.rlim_max),
                "--ulimit".into(),
                format!("nproc={nproc}:{nproc}"),
            ],
            _created: created,
            _hybrid: HybridForCrun::new(),
        }
    }

    /// `podman` with this run's global options, killed after `secs`.
    fn cmd(&self, secs: u32) -> Command {
        let mut c = Command::new("timeout");
        c.args(["--signal=KILL", &secs.to_string(), "podman"])
            .arg("--root")
            .arg(self.storage.join("storage"))
            .arg("--runroot")
            .arg(self.state.join("r"))
            .arg("--tmpdir")
            .arg(self.state.join("t"))
            .arg("--network-config-dir")
            .arg(self.storage.join("networks"))
            .args([
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
                "--storage-driver",
                "overlay",
                "--log-level",
                "error",
            ])
            .stdin(Stdio::null());
        c
    }

    /// Runs podman with `args`; its stdout, trimmed.
    fn ok(&self, args: &[&str]) -> String {
        output(self.cmd(300).args(args)).trim().to_owned()
    }

    /// The options every container gets: this run's cgroup parent and the rlimits.
    fn common(&self) -> Vec<String> {
        let mut v = vec![format!("--cgroup-parent=/{}", self.parent)];
        v.extend(self.ulimits.iter().cloned());
        v
    }

    /// A container of `image` started detached: its id.
    fn start(&self, opts: &[String], image: &str, command: &[&str]) -> String {
        let mut args: Vec<&str> = vec!["run", "-d"];
        let common = self.common();
        args.extend(common.iter().map(String::as_str));
        args.extend(opts.iter().map(String::as_str));
        args.push(image);
        args.extend(command);
        let id = self.ok(&args);
        assert!(
            id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "podman run printed {id:?}"
        );
        id
    }

    /// What a container printed, once it printed `done` (at most `secs`). A workload here keeps
    /// running after its work (`exec sleep`): the agent names a cgroup by its path, which must
    /// still exist when the agent looks it up.
    fn output_until_done(&self, id: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let out = self.ok(&["logs", id]);
            if out.contains("done") {
                return out.split_whitespace().collect::<Vec<_>>().join(" ");
            }
            assert!(
                Instant::now() < deadline,
                "container {id} did not finish within {secs} s: {out:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn pid(&self, id: &str) -> u32 {
        self.ok(&["inspect", "--format", "{{.State.Pid}}", id])
            .parse()
            .expect("a pid")
    }

    /// The cgroup path (as faultline sees it: the host's) of a container of this run.
    fn cgroup(&self, id: &str) -> String {
        format!("/{}/libpod-{id}", self.parent)
    }

    /// An image built from a Dockerfile's text and a context directory.
    fn build(&self, tag: &str, dockerfile: &str, context: &Path) {
        std::fs::write(context.join("Dockerfile"), dockerfile).expect("Dockerfile");
        let mut args = vec![
            "build".to_owned(),
            "--quiet".to_owned(),
            "--network".to_owned(),
            "none".to_owned(),
            format!("--cgroup-parent=/{}", self.parent),
            "-t".to_owned(),
            tag.to_owned(),
        ];
        args.extend(self.ulimits.iter().cloned());
        args.push(context.display().to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ok(&args);
    }

    fn image_size(&self, tag: &str) -> u64 {
        self.ok(&["image", "inspect", "--format", "{{.Size}}", tag])
            .parse()
            .expect("an image size")
    }
}

impl Podman {
    /// This run's podman processes: conmon, and the `container cleanup` each container's exit
    /// starts (their command lines name the run state directory).
    fn processes(&self) -> Vec<i32> {
        // With the slash: /run/flimg-12 must not match /run/flimg-123's processes.
        let state = format!("{}/", self.state.display());
        let me = std::process::id() as i32;
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| *pid != me)
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&state))
            })
            .collect()
    }

    /// Unmounts what podman left mounted under this run's directories (the overlay home,
    /// shm), deepest first.
    fn unmount_all(&self) {
        let mut left = mounts(|point, _| {
            Path::new(point).starts_with(&self.storage) || Path::new(point).starts_with(&self.state)
        });
        left.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for m in left {
            if let Ok(c) = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()) {
                // SAFETY: unmounting a mount of this run's own directories.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self
            .cmd(120)
            .args(["rm", "--all", "--force", "--time", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // The cleanup processes the exits started open the storage again (and mount its
        // home): they end first (10 s at most, then they are killed).
        for i in 0..100 {
            let left = self.processes();
            if left.is_empty() {
                break;
            }
            if i == 99 {
                for pid in left {
                    // SAFETY: killing this run's own podman processes.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for d in [&self.storage, &self.state] {
            let mut removed = Ok(());
            for _ in 0..3 {
                self.unmount_all();
                removed = std::fs::remove_dir_all(d);
                if removed.is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            if let Err(e) = removed {
                eprintln!("warning: could not remove {}: {e}", d.display());
            }
        }
        for m in mounts(|_, fstype| fstype == "cgroup" || fstype == "cgroup2") {
            let dir = m.join(&self.parent);
            if dir.exists() {
                remove_cgroup_tree(&dir);
            }
        }
    }
}

/// Network namespaces for the workload containers, on a bridge inside a namespace of its own
/// (nothing in the host's); removed on drop, their links with them.
struct Lan {
    switch: String,
    spaces: Vec<String>,
}

impl Lan {
    fn new() -> Lan {
        let switch = format!("flimg{}sw", std::process::id());
        sh(&format!("ip netns add {switch}"));
        let lan = Lan {
            switch,
            spaces: Vec::new(),
        };
        sh(&format!(
            "ip -n {s} link add br0 type bridge && ip -n {s} link set br0 up && ip -n {s} link set lo up",
            s = lan.switch
        ));
        lan
    }

    /// A namespace with `eth0` at `addr`/24 on the bridge: its path, for `--network ns:`.
    fn space(&mut self, name: &str, addr: &str) -> String {
        let ns = format!("flimg{}{name}", std::process::id());
        sh(&format!("ip netns add {ns}"));
        self.spaces.push(ns.clone());
        let port = format!("p{name}");
        sh(&format!(
            "ip link add eth0 netns {ns} type veth peer name {port} netns {sw} \
             && ip -n {sw} link set {port} master br0 up \
             && ip -n {ns} addr add {addr}/24 dev eth0 && ip -n {ns} link set eth0 up \
             && ip -n {ns} link set lo up",
            sw = self.switch
        ));
        format!("/run/netns/{ns}")
    }

    fn netns(&self, name: &str) -> String {
        format!("flimg{}{name}", std::process::id())
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.spaces.iter().chain(std::iter::once(&self.switch)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The manifest, translated

/// The DaemonSet as `kubectl kustomize deploy/` renders it.
fn daemonset() -> Value {
    rendered()
        .into_iter()
        .find(|o| o["kind"] == "DaemonSet")
        .expect("a DaemonSet in the rendered base")
}

fn cap_bit(name: &str) -> u64 {
    let n = probe_common::caps::number(name).unwrap_or_else(|| panic!("unknown capability {name}"));
    1 << n
}

/// A `Cap*:` mask of /proc/<pid>/status.
fn cap_mask(pid: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .expect("a capability mask")
        .trim();
    u64::from_str_radix(hex, 16).expect("hex")
}

fn bytes(quantity: &str) -> u64 {
    for (suffix, unit) in [("Ki", 1u64 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30)] {
        if let Some(n) = quantity.strip_suffix(suffix) {
            return n.parse::<u64>().expect("a quantity") * unit;
        }
    }
    quantity
        .parse()
        .expect("a memory quantity in bytes, Ki, Mi or Gi")
}

fn millicores(quantity: &str) -> u64 {
    match quantity.strip_suffix('m') {
        Some(m) => m.parse().expect("millicores"),
        None => (quantity.parse::<f64>().expect("cores") * 1000.0) as u64,
    }
}

/// What the agent's container is given, translated from the DaemonSet.
struct Agent {
    /// podman run options (before the image).
    opts: Vec<String>,
    /// The container's args (after the image).
    args: Vec<String>,
    /// Capabilities the manifest adds.
    caps: Vec<String>,
    /// The readiness probe's path.
    ready: String,
    port: u16,
}

const NODE: &str = "image-test-node";

/// The DaemonSet's pod template as podman options, by Kubernetes' semantics: every field is
/// translated or said not to apply, and an unknown one fails the test (so the translation
/// cannot silently fall behind the manifest). `FAULTLINE_LISTEN` and `FAULTLINE_HEALTH_LISTEN`
/// move to free loopback ports (parallel tests, and nothing listens on the machine's own
/// interfaces).
fn translate(ds: &Value, host: &mut Created) -> Agent {
    let spec = &ds["spec"]["template"]["spec"];
    let containers = spec["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "one container");
    let c = &containers[0];
    let mut opts: Vec<String> = vec![
        // What containerd and CRI-O give a container on cgroup v2, the production nodes'
        // layout, and a runtime's memlock (KERNEL-FACTS: 64 KiB, not unlimited).
        "--cgroupns=private".into(),
        "--ulimit".into(),
        "memlock=65536:65536".into(),
        // The kubelet sets no pids limit of its own (podPidsLimit -1 by default).
        "--pids-limit=-1".into(),
    ];
    for (key, v) in spec.as_object().expect("pod spec") {
        match key.as_str() {
            "hostPID" if v == true => opts.push("--pid=host".into()),
            "hostNetwork" if v == true => opts.push("--network=host".into()),
            "hostIPC" if v == true => opts.push("--ipc=host".into()),
            "hostPID" | "hostNetwork" | "hostIPC" | "containers" | "volumes" => {}
            // Kubernetes-only: no API server, scheduler or kubelet probes here (the agent
            // finds no service account token and names workloads by their cgroups).
            "serviceAccountName"
            | "priorityClassName"
            | "dnsPolicy"
            | "nodeSelector"
            | "tolerations"
            | "affinity"
            | "terminationGracePeriodSeconds" => {}
            other => panic!("the pod spec's {other} is not translated: add it to translate()"),
        }
    }
    let mut caps = Vec::new();
    let sc = &c["securityContext"];
    let mut seccomp = false;
    for (key, v) in sc.as_object().into_iter().flatten() {
        match key.as_str() {
            "privileged" => assert_ne!(v, true, "the shipped DaemonSet is not privileged"),
            "readOnlyRootFilesystem" if v == true => {
                // Kubernetes mounts no tmpfs of its own over a read-only root.
                opts.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
            }
            "allowPrivilegeEscalation" if v == false => {
                opts.push("--security-opt=no-new-privileges".into())
            }
            "readOnlyRootFilesystem" | "allowPrivilegeEscalation" => {}
            "runAsUser" => opts.push(format!("--user={v}")),
            "capabilities" => {
                for d in v["drop"].as_array().into_iter().flatten() {
                    opts.push(format!("--cap-drop={}", d.as_str().expect("a capability")));
                }
                for a in v["add"].as_array().into_iter().flatten() {
                    let a = a.as_str().expect("a capability").to_owned();
                    opts.push(format!("--cap-add={a}"));
                    caps.push(a);
                }
            }
            "seccompProfile" => {
                seccomp = true;
                match v["type"].as_str() {
                    Some("RuntimeDefault") => {}
                    Some("Unconfined") => opts.push("--security-opt=seccomp=unconfined".into()),
                    other => panic!("seccompProfile {other:?} is not translated"),
                }
            }
            other => panic!("securityContext.{other} is not translated: add it to translate()"),
        }
    }
    // Without a seccompProfile the kubelet runs the container unconfined (unless the node
    // sets --seccomp-default); podman would apply its default profile.
    if !seccomp {
        opts.push("--security-opt=seccomp=unconfined".into());
    }
    let volumes = spec["volumes"].as_array().expect("volumes");
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let name = m["name"].as_str().expect("a volume name");
        let v = volumes
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"));
        let path = v["hostPath"]["path"]
            .as_str()
            .unwrap_or_else(|| panic!("volume {name} is not a hostPath: not translated"));
        match v["hostPath"]["type"].as_str().unwrap_or("") {
            // Created by the runtime when missing (containerd and docker do; the kubelet
            // checks nothing for the empty type): created here, and removed at the end.
            "" | "DirectoryOrCreate" if !Path::new(path).exists() => host.dir(Path::new(path)),
            "" | "DirectoryOrCreate" | "Directory" => {}
            other => panic!("hostPath type {other} is not translated"),
        }
        let ro = if m["readOnly"] == true { ":ro" } else { "" };
        opts.push(format!(
            "--volume={path}:{}{ro}",
            m["mountPath"].as_str().expect("mountPath")
        ));
    }
    let port = free_port();
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().expect("an env name");
        let value = match (
            e["value"].as_str(),
            e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        ) {
            _ if name == "FAULTLINE_LISTEN" => format!("127.0.0.1:{port}"),
            _ if name == "FAULTLINE_HEALTH_LISTEN" => format!("127.0.0.1:{}", free_port()),
            // No API server here reviews bearer tokens (the agent finds no service account
            // token): the port asks for none. tests/auth.rs runs the shipped setting.
            _ if name == "FAULTLINE_KUBE_RBAC" => "false".to_owned(),
            (Some(v), _) => v.to_owned(),
            (None, Some("spec.nodeName")) => NODE.to_owned(),
            (None, Some("metadata.name")) => "faultline-image-test".to_owned(),
            (None, Some("metadata.namespace")) => ds["metadata"]["namespace"]
                .as_str()
                .expect("the rendered namespace")
                .to_owned(),
            other => panic!("env {name} from {other:?} is not translated"),
        };
        opts.push(format!("--env={name}={value}"));
    }
    let mut ready = None;
    let mut args: Vec<String> = Vec::new();
    for (key, v) in c.as_object().expect("container") {
        match key.as_str() {
            "args" => {
                args = v
                    .as_array()
                    .expect("args")
                    .iter()
                    .map(|a| a.as_str().expect("an arg").to_owned())
                    .collect()
            }
            "command" => panic!("a command override is not translated"),
            "resources" => {
                if let Some(mem) = v["limits"]["memory"].as_str() {
                    opts.push(format!("--memory={}", bytes(mem)));
                }
                if let Some(cpu) = v["limits"]["cpu"].as_str() {
                    opts.push(format!("--cpus={}", millicores(cpu) as f64 / 1000.0));
                }
                // The kubelet's cpu.shares for a request (a memory request only schedules).
                if let Some(cpu) = v["requests"]["cpu"].as_str() {
                    opts.push(format!(
                        "--cpu-shares={}",
                        (millicores(cpu) * 1024 / 1000).max(2)
                    ));
                }
            }
            "readinessProbe" => {
                ready = Some(
                    v["httpGet"]["path"]
                        .as_str()
                        .expect("an HTTP readiness probe")
                        .to_owned(),
                )
            }
            // The image is the one built here; the kubelet's liveness probe has no runtime
            // equivalent; the ports are the host's (hostNetwork).
            "name" | "image" | "imagePullPolicy" | "env" | "securityContext" | "volumeMounts"
            | "livenessProbe" | "ports" => {}
            other => panic!("the container's {other} is not translated: add it to translate()"),
        }
    }
    Agent {
        opts,
        args,
        caps,
        ready: ready.expect("a readiness probe"),
        port,
    }
}

/// deploy/Dockerfile's runtime stage on the local base: FROM the base (debian:12-slim's
/// stand-in), its `apt-get install ca-certificates` already in the base (no registry or
/// mirror in a build here), the binary (which the caller puts in `ctx`) and the repository's
/// files the build stage holds (copied into `ctx` here) from the context instead of the build
/// stage.
fn runtime_stage(base: &str, ctx: &Path) -> String {
    let stages = dockerfile();
    let mut out = String::new();
    for i in stages.last().expect("a runtime stage") {
        match i.op.as_str() {
            "FROM" => out += &format!("FROM {base}\n"),
            "RUN" => assert_eq!(
                apt_installs(&i.args),
                ["ca-certificates"],
                "the runtime stage runs more than the base has: {}",
                i.args
            ),
            "COPY" if i.args.starts_with("--from=build ") => {
                let parts: Vec<&str> = i.args.split(' ').collect();
                let (dest, sources) = parts[1..].split_last().expect("COPY's destination");
                if let [binary] = sources
                    && binary.ends_with("/target/release/faultline")
                {
                    out += &format!("COPY faultline {dest}\n");
                    continue;
                }
                // The build stage's WORKDIR holds the repository (`COPY . .`).
                let mut names = Vec::new();
                for src in sources {
                    let rel = src.strip_prefix("/src/").unwrap_or_else(|| {
                        panic!("the runtime stage copies {src}, not a repository file")
                    });
                    assert!(!rel.starts_with("target/"), "{}", i.args);
                    let name = Path::new(rel).file_name().expect("a file name");
                    std::fs::copy(root().join(rel), ctx.join(name))
                        .unwrap_or_else(|e| panic!("{rel} into the context: {e}"));
                    names.push(name.to_string_lossy().into_owned());
                }
                out += &format!("COPY {} {dest}\n", names.join(" "));
            }
            "COPY" | "ADD" => panic!("the runtime stage copies more than the binary: {}", i.args),
            _ => out += &format!("{} {}\n", i.op, i.args),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// What the agent says

/// The sum of the samples of `family` whose labels include every `labels` pair.
fn family_sum(metrics: &str, family: &str, labels: &[(&str, &str)]) -> f64 {
    sum_of(metrics, |l| {
        l.strip_prefix(family).is_some_and(|r| r.starts_with('{'))
            && labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
    })
}

/// The series (histogram buckets aside) that mention `about`, for messages.
fn lines_of(metrics: &str, about: &str) -> String {
    metrics
        .lines()
        .filter(|l| l.contains(about) && !l.contains("_bucket{"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A namespace's conntrack counters, summed over CPUs.
fn ct_counters(netns: &str) -> std::collections::HashMap<String, u64> {
    let text = output(Command::new("ip").args([
        "netns",
        "exec",
        netns,
        "cat",
        "/proc/net/stat/nf_conntrack",
    ]));
    let mut lines = text.lines();
    let names: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
    let mut sums = std::collections::HashMap::new();
    for line in lines {
        for (name, hex) in names.iter().zip(line.split_whitespace()) {
            *sums.entry(name.to_string()).or_default() +=
                u64::from_str_radix(hex, 16).expect("hex");
        }
    }
    sums
}

/// Polls the agent's `/metrics` until `done` holds, for at most `secs`: the last scrape. On a
/// timeout it fails naming `what`, with the agent's series about `about` and its log.
fn wait_metrics(
    podman: &Podman,
    agent: &str,
    port: u16,
    secs: u64,
    what: &str,
    about: &str,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Some((200, m)) = http_get(port, "/metrics") {
            if done(&m) {
                return m;
            }
            last = m;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // Its event lines (stdout) and messages (stderr), the last ones.
    let log = podman
        .cmd(30)
        .args(["logs", "--tail", "60", agent])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
        })
        .unwrap_or_default();
    panic!(
        "no {what} in the agent's /metrics within {secs} s; its series about {about}:\n{}\nits log:\n{log}",
        lines_of(&last, about)
    );
}

const DNS_IP: &str = "10.78.0.53";
const ANSWER_IP: &str = "10.78.0.99";

/// The release binary (what the image ships), refusing one older than a source file.
fn release_binary() -> PathBuf {
    let bin = root().join("target/release/faultline");
    let rebuild = "run `cargo build --release -p probe-user` (`cargo xtask test` does)";
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("{} is missing: {rebuild}", bin.display()));
    fn newest(dir: &Path, best: &mut Option<(std::time::SystemTime, PathBuf)>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                newest(&p, best);
            } else if p.extension().is_some_and(|x| x == "rs")
                && let Ok(t) = e.metadata().and_then(|m| m.modified())
                && best.as_ref().is_none_or(|(b, _)| t > *b)
            {
                *best = Some((t, p));
            }
        }
    }
    let mut best = None;
    for dir in ["probe-user/src", "probe-ebpf/src", "probe-common/src"] {
        newest(&root().join(dir), &mut best);
    }
    if let Some((t, p)) = best {
        assert!(
            built >= t,
            "{} is older than {}: {rebuild}",
            bin.display(),
            p.display()
        );
    }
    bin
}

#[test]
fn the_image_runs_as_the_daemonset_says_and_names_each_containers_failure() {
    require_root();
    let started = Instant::now();
    let ds = daemonset();
    let release = release_binary();
    let release = release.as_path();
    let (rootfs, debs_dir) = base();
    let base_ready = started.elapsed();

    // Dropped in reverse: the containers first, then their namespaces and host directories.
    let mut host = Created::default();
    let mut lan = Lan::new();
    let podman = Podman::new();
    let ctx = podman.storage.join("context");
    std::fs::create_dir_all(&ctx).expect("build context");
    // The base, then deploy/Dockerfile's runtime stage on it with the binary under test.
    let base = "localhost/faultline-test-base:bookworm";
    podman.ok(&["import", &rootfs.display().to_string(), base]);
    std::fs::copy(release, ctx.join("faultline")).expect("the binary into the context");
    let agent_image = "localhost/faultline:test";
    podman.build(agent_image, &runtime_stage(base, &ctx), &ctx);
    // Read from the image's layers, not a container: a container run under the run's cgroup
    // parent before the resolver's build made that build's `RUN` fail in crun (writing
    // `devices.deny`: Invalid argument, as v1 devices answers for a cgroup with children).
    let layers = PathBuf::from(podman.ok(&["image", "mount", agent_image]));
    let mut docs: Vec<String> = std::fs::read_dir(layers.join("usr/share/doc/faultline"))
        .expect("/usr/share/doc/faultline in the image")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    docs.sort();
    podman.ok(&["image", "unmount", agent_image]);
    assert_eq!(
        docs,
        ["LICENSE-APACHE", "LICENSE-GPL-2.0", "LICENSE-MIT"],
        "the image carries the license texts"
    );
    // The resolver's image: the same base with dnsmasq-base installed from its packages.
    let dns_ctx = podman.storage.join("dns-context");
    std::fs::create_dir_all(&dns_ctx).expect("dns context");
    for deb in debs(&debs_dir) {
        std::fs::copy(&deb, dns_ctx.join(deb.file_name().expect("name"))).expect("a package");
    }
    let dns_image = "localhost/faultline-test-dnsmasq:bookworm";
    podman.build(
        dns_image,
        &format!(
            "FROM {base}\nCOPY *.deb /tmp/debs/\nRUN dpkg -i /tmp/debs/*.deb && rm -r /tmp/debs\n"
        ),
        &dns_ctx,
    );
    let images_ready = started.elapsed();
    let image_size = podman.image_size(agent_image);
    let base_size = podman.image_size(base);
    let binary_size = std::fs::metadata(release).expect("binary").len();

    // The agent, as the DaemonSet runs it.
    let agent = translate(&ds, &mut host);
    let mut opts = agent.opts.clone();
    opts.push(format!("--name={}", unique("agent")));
    let args: Vec<&str> = agent.args.iter().map(String::as_str).collect();
    let t0 = Instant::now();
    let agent_id = podman.start(&opts, agent_image, &args);
    let run_returned = t0.elapsed();
    let deadline = t0 + Duration::from_secs(60);
    loop {
        if http_get(agent.port, &agent.ready).is_some_and(|(s, _)| s == 200) {
            break;
        }
        if Instant::now() > deadline {
            let logs = podman
                .cmd(30)
                .args(["logs", &agent_id])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned());
            panic!("the agent was not ready within 60 s; its log: {logs:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let to_ready = t0.elapsed();
    let agent_pid = podman.pid(&agent_id).to_string();
    // Exactly the manifest's capabilities (the bounding set), less those this machine's root
    // has not got to give.
    let bounding = cap_mask("self", "CapBnd");
    let asked: u64 = agent.caps.iter().map(|c| cap_bit(c)).fold(0, |a, b| a | b);
    let missing: Vec<&String> = agent
        .caps
        .iter()
        .filter(|c| bounding & cap_bit(c) == 0)
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "image: this machine's root lacks {missing:?} in its bounding set: no runtime can grant them here"
        );
    }
    assert_eq!(
        cap_mask(&agent_pid, "CapBnd"),
        asked & bounding,
        "the agent's capability bounding set is not the manifest's {:?}",
        agent.caps
    );
    // Once attached it keeps only what reading needs.
    assert_eq!(
        cap_mask(&agent_pid, "CapEff"),
        (cap_bit("BPF") | cap_bit("NET_ADMIN")) & bounding,
        "the agent kept more than CAP_BPF and CAP_NET_ADMIN after attaching"
    );
    let limits = std::fs::read_to_string(format!("/proc/{agent_pid}/limits")).expect("limits");
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max locked memory") && l.contains(" 65536 ")),
        "{limits}"
    );
    let metrics = http_get(agent.port, "/metrics").expect("/metrics").1;
    for probe in ["clone", "tasks", "dns", "conntrack"] {
        assert!(
            metrics.contains(&format!("faultline_probe_attached{{probe=\"{probe}\"}} 1")),
            "{probe} not attached in the container:\n{metrics}"
        );
    }

    // Prometheus scraping the agent, with the shipped rules (a top-level `rule_files` after
    // the harness's scrape job).
    let rules = root().join("deploy/alerts/faultline-rules.yaml");
    let prom = Prometheus::start_with_job(&format!(
        "- job_name: faultline\n  static_configs:\n  - targets: ['127.0.0.1:{}']\n    labels:\n      node: {NODE}\nrule_files:\n- '{}'\n",
        agent.port,
        rules.display()
    ));

    // (a) A workload container at its runtime pids limit.
    let forker = podman.start(
        &[
            "--network=none".into(),
            "--pids-limit=20".into(),
            format!("--name={}", unique("forker")),
        ],
        base,
        &["sh", "-c", "for i in $(seq 100); do sleep 30 & done; wait"],
    );
    let forker_cg = podman.cgroup(&forker);
    let m = wait_metrics(
        &podman,
        &agent_id,
        agent.port,
        30,
        "pids_limit failure of the forker",
        &forker,
        |m| {
            family_sum(
                m,
                "faultline_clone_failures_total",
                &[("workload", &forker_cg), ("cause", "pids_limit")],
            ) >= 1.0
        },
    );
    let failures = family_sum(
        &m,
        "faultline_clone_failures_total",
        &[("workload", &forker_cg), ("cause", "pids_limit")],
    );

    // (b) DNS from a workload container to dnsmasq in another one.
    let dns_ns = lan.space("d", DNS_IP);
    let client_ns = lan.space("q", "10.78.0.10");
    let ct_ns = lan.space("c", "10.78.0.11");
    let _dnsmasq = podman.start(
        &[
            format!("--network=ns:{dns_ns}"),
            format!("--name={}", unique("dnsmasq")),
        ],
        dns_image,
        &[
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--user=root",
            &format!("--listen-address={DNS_IP}"),
            "--bind-interfaces",
            &format!("--address=/image.test/{ANSWER_IP}"),
        ],
    );
    eventually(Duration::from_secs(30), "dnsmasq listening", || {
        let udp = output(Command::new("ip").args([
            "netns",
            "exec",
            &lan.netns("d"),
            "cat",
            "/proc/net/udp",
        ]));
        udp.lines()
            .any(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|a| a.ends_with(":0035"))
            })
            .then_some(())
    });
    let resolv = |ns: &str| {
        vec![
            format!("--network=ns:{ns}"),
            format!("--dns={DNS_IP}"),
            "--dns-option=timeout:1".into(),
            "--dns-option=attempts:1".into(),
        ]
    };
    let mut client_opts = resolv(&client_ns);
    client_opts.push(format!("--name={}", unique("resolver-client")));
    let client = podman.start(
        &client_opts,
        base,
        &[
            "sh",
            "-c",
            "for i in 1 2 3 4 5; do getent ahostsv4 q$i.image.test >/dev/null || exit 1; done; \
             echo done; exec sleep 120",
        ],
    );
    assert_eq!(
        podman.output_until_done(&client, 30),
        "done",
        "the client's lookups"
    );
    let client_cg = podman.cgroup(&client);
    wait_metrics(
        &podman,
        &agent_id,
        agent.port,
        20,
        "5 answered queries of the client",
        "faultline_dns_queries_total",
        |m| {
            family_sum(
                m,
                "faultline_dns_queries_total",
                &[
                    ("workload", &client_cg),
                    ("qtype", "A"),
                    ("rcode", "NOERROR"),
                    ("outcome", "answered"),
                ],
            ) == 5.0
        },
    );

    // (c) A conntrack drop in a workload container's own namespace: its DNS SNATed to one
    // source port, so each lookup after the first (a new socket, a new flow) loses the clash
    // at confirmation.
    sh(&format!(
        "ip netns exec {} iptables -t nat -A POSTROUTING -p udp -d {DNS_IP} --dport 53 -j SNAT --to-source 10.78.0.11:40000",
        lan.netns("c")
    ));
    let before = ct_counters(&lan.netns("c"));
    let mut ct_opts = resolv(&ct_ns);
    ct_opts.push(format!("--name={}", unique("snat-client")));
    let snat = podman.start(
        &ct_opts,
        base,
        &[
            "sh",
            "-c",
            "for i in 1 2 3; do getent ahostsv4 c$i.image.test >/dev/null && echo -n 'ok ' || echo -n 'lost '; done; \
             echo done; exec sleep 120",
        ],
    );
    assert_eq!(
        podman.output_until_done(&snat, 30),
        "ok lost lost done",
        "the SNAT client's lookups: the first takes the port"
    );
    let lost = ct_counters(&lan.netns("c"))["insert_failed"] - before["insert_failed"];
    assert_eq!(
        lost, 2,
        "the kernel's insert_failed in the container's namespace"
    );
    let snat_cg = podman.cgroup(&snat);
    // Telling an insert failure from a rule needs the namespace's counters: the manifest
    // gives no capability to enter it, so they are read through /proc/<pid>/net of a process
    // in it. The kernel names the sender, which here exits at once (its send fails with
    // EPERM), so that read goes through another process a rescan finds (the container's
    // shell): both drops are insert failures, whoever reads first.
    let cause = "insert_failed";
    let drops = wait_metrics(
        &podman,
        &agent_id,
        agent.port,
        20,
        "conntrack drops of the SNAT client",
        "faultline_conntrack_drops_total",
        |m| {
            family_sum(
                m,
                "faultline_conntrack_drops_total",
                &[("workload", &snat_cg)],
            ) >= lost as f64
        },
    );
    assert_eq!(
        family_sum(
            &drops,
            "faultline_conntrack_drops_total",
            &[("workload", &snat_cg), ("cause", cause)]
        ),
        lost as f64,
        "{}",
        lines_of(&drops, &snat_cg)
    );

    // (d) The shipped rules fire on the forker's failure.
    eventually(
        Duration::from_secs(60),
        "FaultlineCloneFailures firing in Prometheus",
        || {
            (prom.series(r#"ALERTS{alertname="FaultlineCloneFailures",alertstate="firing",cause="pids_limit",node="image-test-node"}"#)? >= 1)
                .then_some(())
        },
    );
    let scraped = prom
        .value(&format!(
            r#"sum(faultline_clone_failures_total{{workload="{forker_cg}",cause="pids_limit"}})"#
        ))
        .expect("the forker's series in Prometheus");
    assert!(scraped >= 1.0, "{scraped}");

    // (e) `faultline explain` in the agent's container, as on call.
    let daemon = format!("--daemon=http://127.0.0.1:{}", agent.port);
    let text = podman.ok(&["exec", &agent_id, "faultline", "explain", &daemon]);
    assert!(
        text.lines()
            .any(|l| l.contains("pids_limit") && l.contains("CRITICAL"))
            && text.contains(&forker_cg),
        "explain does not name the forker's pids limit:\n{text}"
    );
    let report: Value = serde_json::from_str(&podman.ok(&[
        "exec",
        &agent_id,
        "faultline",
        "explain",
        &daemon,
        "-o",
        "json",
    ]))
    .expect("explain -o json");
    let f = finding(&report, "pids_limit", &forker_cg)
        .unwrap_or_else(|| panic!("no pids_limit finding for {forker_cg}: {report:#}"));
    assert!(
        f["why"].as_str().is_some_and(|w| w.contains("pids.max=20")),
        "{f:#}"
    );

    // What the agent said, for the log.
    let last = http_get(agent.port, "/metrics").expect("/metrics").1;
    for (what, id) in [
        ("pids limit", &forker),
        ("DNS", &client),
        ("conntrack", &snat),
    ] {
        eprintln!("image: {what}:\n{}", lines_of(&last, id));
    }
    eprintln!(
        "image: FaultlineCloneFailures firing for pids_limit on {NODE}: {:?} series",
        prom.series(
            r#"ALERTS{alertname="FaultlineCloneFailures",alertstate="firing",cause="pids_limit"}"#
        )
    );
    eprintln!("image: explain:\n{text}");
    let status = std::fs::read_to_string(format!("/proc/{agent_pid}/status")).unwrap_or_default();
    let kib = |field: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "image: {:.1} MiB (base {:.1} MiB + binary {:.1} MiB); podman run returned in {} ms, \
         /readyz 200 {} ms after it was started; agent RSS {:.1} MiB (peak {:.1} MiB); \
         base ready at {:.1} s, images at {:.1} s, whole test {:.1} s; \
         forker: {failures} pids_limit failure(s); conntrack: {lost} lost, cause {cause}",
        mib(image_size),
        mib(base_size),
        mib(binary_size),
        run_returned.as_millis(),
        to_ready.as_millis(),
        kib("VmRSS:") as f64 / 1024.0,
        kib("VmHWM:") as f64 / 1024.0,
        base_ready.as_secs_f64(),
        images_ready.as_secs_f64(),
        started.elapsed().as_secs_f64(),
    );
    drop(prom);
    drop(podman);
    drop(lan);
    drop(host);
}
