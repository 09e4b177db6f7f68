//! `cargo xtask vm-test`: the kernel matrix. Boots Debian's stock kernels (the ones production
//! nodes run) under QEMU with this machine's root filesystem shared read-only (virtme-ng), and
//! runs `faultline check` and the real-kernel integration tests inside each, against the same
//! build as the host suite. The tests run faultline as the DaemonSet does (xtask/src/deployed.rs),
//! and `check` runs so too, on this machine as well: with two runtime memlock limits and once
//! without each capability the manifest adds (the capability matrix of docs/kernels.md).
//!
//! Kernels come from Debian's own suites through a private apt configuration under
//! `target/vm/apt` (the host's apt sources are never touched) and are unpacked with `dpkg -x`
//! (never installed). KVM is used when it works; otherwise QEMU emulates (TCG): slower, but
//! nested KVM is not available on every machine.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::deployed;

/// One kernel of the matrix: the Debian suite that ships it and its image package. When the
/// pinned package has left the suite's index, the newest package with the same prefix is used
/// (and said).
pub struct Kernel {
    pub name: &'static str,
    suite: &'static str,
    package: &'static str,
    prefix: &'static str,
}

pub const KERNELS: [Kernel; 3] = [
    Kernel {
        name: "5.10",
        suite: "bullseye",
        package: "linux-image-5.10.0-32-amd64",
        prefix: "linux-image-5.10.0-",
    },
    Kernel {
        name: "6.1",
        suite: "bookworm",
        package: "linux-image-6.1.0-50-amd64",
        prefix: "linux-image-6.1.0-",
    },
    Kernel {
        name: "6.12",
        suite: "trixie",
        package: "linux-image-6.12.117+deb13-amd64",
        prefix: "linux-image-6.12.",
    },
];

/// virtme-ng from PyPI, in its own venv under target/vm.
const VIRTME_NG: &str = "virtme-ng==1.42";
const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// The integration tests that touch the kernel: every clone cause, task counting, DNS,
/// conntrack, the daemon, the CLI, the hostile-node attacks and `explain` (a leak's time to
/// exhaustion against its real failure, the kernel's refusal counts from before it watched),
/// the binding limit (RLIMIT_NPROC as the kernel counts it) (a SIGKILLed daemon must leave
/// nothing attached on every kernel). Attribution (pods, kube_api), Kubernetes Events
/// (kube_events: what they record is the clone signal's, proven here) and deploy/ are
/// userspace and run on the host only.
const KERNEL_TESTS: [&str; 9] = [
    "clone_failures",
    "tasks",
    "dns",
    "conntrack",
    "daemon",
    "cli",
    "hostile",
    "explain",
    "binding",
];
/// Tests of those binaries whose code under test is userspace only (HTTP serving, event-line
/// backpressure, OTLP encoding, diagnosis, forecasts, metrics, argument parsing): the host
/// runs them; in the emulated VMs, where every test costs four to seven times as long and the
/// whole matrix must fit CI's 90 minutes with the host's run, they are skipped. Each binary
/// keeps its kernel-facing tests (the probes' events and counts on that kernel; a leak's
/// headroom from its pids limit; the kernel's refusal counts and their cross-check).
const USERSPACE_ONLY: [(&str, &[&str]); 6] = [
    (
        "hostile",
        &[
            "eleven_hundred_idle_connections_under_a_1024_fd_limit",
            "silent_and_half_requests_are_cut_off",
            "only_get_and_head_are_served",
            "a_stalled_stdout_reader_costs_dropped_lines_not_a_stalled_daemon",
            "a_closed_stdout_ends_event_lines_not_the_daemon",
            "explain_in_a_loop_or_with_garbage_stays_cheap_and_safe",
            "an_events_file_that_is_a_link_or_a_fifo_is_refused_at_start",
            "a_fifo_in_place_of_the_events_file_after_sighup_is_said_once_and_counted",
            "signals_it_does_not_use_leave_the_daemon_serving",
            "a_kubernetes_event_note_carries_what_a_pod_names_escaped",
        ],
    ),
    (
        "explain",
        &[
            "a_recovered_leak_leaves_no_exhaustion_series",
            // The forecast is arithmetic on pids.current, which `tasks` reads on each kernel;
            // an emulated VM's pace says nothing of a node's.
            "a_20_s_leak_is_forecast_10_s_ahead_under_the_default_window",
            "a_leak_gets_an_eta_before_its_first_failure_and_explain_names_it_after",
            "a_quiet_node_has_no_finding_and_says_where_it_looked",
            "explain_rejects_bad_arguments_in_one_line",
        ],
    ),
    (
        "daemon",
        &[
            "a_port_below_1024_is_bound_before_the_capabilities_drop",
            "a_collector_with_a_self_signed_ca_certificate_is_said_in_rustls_words",
            "a_collector_certificate_of_an_unknown_ca_is_said_as_such",
            "a_client_certificate_the_collector_refuses_is_said_as_refused",
            "a_collector_answering_400_is_quoted_with_its_body",
            "otlp_records_still_queued_at_sigterm_are_counted_in_the_exit_line",
            "otlp_log_records_carry_k8s_attributes_and_real_times",
            "a_dead_otlp_collector_costs_dropped_events_not_a_stuck_daemon",
            "otlp_logs_only_with_per_signal_headers_and_compression",
            "an_otlp_collector_down_and_back_loses_nothing_within_the_queue",
            "otlp_over_mutual_tls_with_the_certificate_variables",
            "sighup_reopens_the_events_file_and_the_daemon_goes_on",
            "five_hundred_pods_stay_within_the_series_cap",
        ],
    ),
    (
        "conntrack",
        // The drops it exports are the ones `insert_failed_after_snat_...` proves.
        &["conntrack_drops_reach_otlp_configured_by_the_standard_variables"],
    ),
    (
        "dns",
        &[
            "dns_queries_become_otlp_client_spans_with_real_times",
            "explain_finds_search_path_amplification_and_timeouts_per_workload",
            "run_events_selects_the_lines_and_the_metrics_count_everything",
            "the_daemon_exports_dns_metrics_per_workload",
            "many_query_types_from_one_workload_leave_room_for_the_others",
        ],
    ),
    (
        "cli",
        &[
            "unknown_flags_and_bad_values_exit_2",
            "zero_intervals_and_closed_pipes",
            "man_page_and_completions",
            "pod_filters_and_their_short_flags",
            "run_refuses_what_the_user_typed_before_anything_loads",
        ],
    ),
];
/// One VM's whole run, boot to power-off; past it the VM is killed and the kernel fails.
const VM_TIMEOUT: Duration = Duration::from_secs(30 * 60);

struct Paths {
    root: PathBuf,
    vm: PathBuf,
}

impl Paths {
    fn new(root: &Path) -> Paths {
        Paths {
            root: root.to_path_buf(),
            vm: root.join("target/vm"),
        }
    }
    fn vng(&self) -> PathBuf {
        self.vm.join("venv/bin/vng")
    }
    fn kernel_dir(&self, k: &Kernel) -> PathBuf {
        self.vm.join("kernels").join(k.name)
    }
}

/// Installs what the matrix needs (virtme-ng, the kernel packages): the Debian packages
/// (QEMU, kmod, busybox) are in `cargo xtask setup`'s list.
pub fn setup(root: &Path, kernels: &[&Kernel]) -> anyhow::Result<()> {
    let p = Paths::new(root);
    if !p.vng().exists() {
        let venv = p.vm.join("venv");
        crate::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
            .context("creating the virtme-ng venv")?;
        crate::run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", VIRTME_NG]))
            .context("installing virtme-ng from PyPI")?;
    }
    for k in kernels {
        fetch_kernel(&p, k)?;
    }
    Ok(())
}

/// apt options that point every path at target/vm/apt: the host's sources, lists and
/// package state stay untouched.
fn apt_options(p: &Paths) -> Vec<String> {
    let apt = p.vm.join("apt");
    [
        format!(
            "Dir::Etc::SourceList={}",
            apt.join("sources.list").display()
        ),
        "Dir::Etc::SourceParts=/dev/null".to_owned(),
        format!("Dir::State::Lists={}", apt.join("lists").display()),
        format!("Dir::Cache={}", apt.join("cache").display()),
        "Dir::State::status=/dev/null".to_owned(),
    ]
    .into_iter()
    .flat_map(|o| ["-o".to_owned(), o])
    .collect()
}

fn fetch_kernel(p: &Paths, k: &Kernel) -> anyhow::Result<()> {
    let dir = p.kernel_dir(k);
    if vmlinuz(&dir).is_ok() {
        return Ok(());
    }
    let apt = p.vm.join("apt");
    if !apt.join("lists").exists() {
        fs::create_dir_all(apt.join("lists/partial"))?;
        fs::create_dir_all(apt.join("cache/archives/partial"))?;
        let sources: String = KERNELS
            .iter()
            .map(|k| {
                format!(
                    "deb [signed-by={DEBIAN_KEYRING}] {DEBIAN_MIRROR} {} main\n",
                    k.suite
                )
            })
            .collect();
        fs::write(apt.join("sources.list"), sources)?;
        crate::run(Command::new("apt-get").args(apt_options(p)).arg("update"))
            .context("reading Debian's kernel package lists")?;
    }
    let package = pick_package(p, k)?;
    let debs = p.vm.join("debs");
    fs::create_dir_all(&debs)?;
    crate::run(
        Command::new("apt-get")
            .current_dir(&debs)
            .args(apt_options(p))
            .args(["download", &package]),
    )
    .with_context(|| format!("downloading {package}"))?;
    let deb = fs::read_dir(&debs)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|d| {
            d.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")))
        })
        .with_context(|| format!("{package}: no .deb after the download"))?;
    let partial = dir.with_extension("partial");
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial)?;
    crate::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&partial))?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&partial, &dir)?;
    let _ = fs::remove_file(&deb);
    vmlinuz(&dir).map(|_| ())
}

/// The pinned package, or the newest of its series when the suite no longer lists it.
fn pick_package(p: &Paths, k: &Kernel) -> anyhow::Result<String> {
    let names = crate::stdout_of(
        Command::new("apt-cache")
            .args(apt_options(p))
            .args(["pkgnames", k.prefix]),
    );
    let mut candidates: Vec<&str> = names
        .lines()
        .filter(|n| n.ends_with("-amd64") && !n.contains("cloud") && !n.contains("-rt-"))
        .filter(|n| !n.contains("dbg") && !n.contains("unsigned"))
        .collect();
    if candidates.contains(&k.package) {
        return Ok(k.package.to_owned());
    }
    candidates.sort_by_key(|n| version_key(n));
    match candidates.last() {
        Some(newest) => {
            eprintln!(
                "xtask: {} is no longer in Debian {}; using {newest}",
                k.package, k.suite
            );
            Ok((*newest).to_owned())
        }
        None => bail!("no {}*-amd64 package in Debian {}", k.prefix, k.suite),
    }
}

/// Orders `linux-image-5.10.0-32-amd64` before `-46-` and `6.12.9+` before `6.12.117+`.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn vmlinuz(dir: &Path) -> anyhow::Result<PathBuf> {
    fs::read_dir(dir.join("boot"))
        .ok()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|f| {
            f.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz under {}", dir.display()))
}

/// The test binaries `cargo test --no-run` built, by target name.
fn test_binaries(root: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    crate::build_lab(root, false)?;
    let out = Command::new("cargo")
        .current_dir(root)
        .args([
            "test",
            "--no-run",
            "-p",
            "probe-user",
            "--message-format=json",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the tests failed");
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = msg["reason"] == "compiler-artifact"
            && msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(name), Some(exe)) = (
            is_test,
            msg["target"]["name"].as_str(),
            msg["executable"].as_str(),
        ) {
            bins.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    Ok(bins)
}

/// What one kernel's VM reported.
pub struct Outcome {
    pub kernel: String,
    pub uname: String,
    pub check: String,
    pub failed: Vec<String>,
    pub passed: Vec<String>,
    /// Tests that did not run what they test on this kernel, with why (tests/common, `skipped`).
    pub skipped: String,
    pub secs: f64,
    /// `faultline check` as deployed.
    pub deployed: deployed::Checks,
}

/// The docs/kernels.md section the matrix writes and checks: one row per kernel, from its `faultline
/// check` (which programs the kernel accepted, which older mechanisms stand in for newer ones).
const TABLE_BEGIN: &str = "<!-- kernel matrix: written by `cargo xtask vm-test --update-docs` -->";
const TABLE_END: &str = "<!-- end of kernel matrix -->";

/// The programs `faultline check` loads, by the words of its lines, and their names here.
const PROGRAMS: [(&str, &str); 4] = [
    ("clone programs", "failed task creation"),
    ("task counter programs", "task counts"),
    ("conntrack drop program", "conntrack drops"),
    ("DNS programs", "DNS"),
];

fn table_row(k: &Kernel, o: &Outcome) -> String {
    let lines: Vec<&str> = o.check.lines().collect();
    let programs: Vec<String> = PROGRAMS
        .iter()
        .map(|(words, name)| {
            let attached = lines
                .iter()
                .any(|l| l.starts_with("ok") && l.contains(words) && l.contains("attached"));
            if attached {
                (*name).to_owned()
            } else {
                format!("**{name}: refused**")
            }
        })
        .collect();
    let fallbacks: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("ok    older kernel"))
        .map(str::trim)
        .collect();
    let missing = lines
        .iter()
        .find_map(|l| l.strip_prefix("warn  kernel structs"))
        .map(|m| format!("; {}", m.trim()))
        .unwrap_or_default();
    format!(
        "| {} | `{}` | {} | {}{} |\n",
        k.name,
        k.package,
        programs.join(", "),
        if fallbacks.is_empty() {
            "newest mechanisms".to_owned()
        } else {
            fallbacks.join("; ")
        },
        missing
    )
}

/// Compares docs/kernels.md's kernel table with this run's, and rewrites it with `update`.
fn check_readme(root: &Path, rows: &str, update: bool) -> anyhow::Result<()> {
    let path = root.join("docs/kernels.md");
    let readme = fs::read_to_string(&path).context("reading docs/kernels.md")?;
    let (Some(b), Some(e)) = (readme.find(TABLE_BEGIN), readme.find(TABLE_END)) else {
        bail!("docs/kernels.md has no kernel matrix markers ({TABLE_BEGIN} ... {TABLE_END})");
    };
    let table = format!(
        "{TABLE_BEGIN}\n| kernel | Debian package | programs attached | older mechanisms in use |\n|---|---|---|---|\n{rows}"
    );
    if readme[b..e] == table {
        return Ok(());
    }
    if !update {
        bail!(
            "docs/kernels.md's kernel table differs from what the matrix found:\n{table}\nrun `cargo xtask vm-test --update-docs`"
        );
    }
    let updated = format!("{}{table}{}", &readme[..b], &readme[e..]);
    fs::write(&path, updated).context("writing docs/kernels.md")?;
    eprintln!("xtask: docs/kernels.md's kernel table updated");
    Ok(())
}

pub fn run(
    root: &Path,
    only: &[String],
    filter: &[String],
    update_docs: bool,
) -> anyhow::Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the kernel matrix boots VMs that load eBPF programs: run it as root");
    }
    let kernels: Vec<&Kernel> = KERNELS
        .iter()
        .filter(|k| only.is_empty() || only.iter().any(|o| o == k.name))
        .collect();
    if kernels.is_empty() {
        let names: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
        bail!("no kernel matches {only:?}; the matrix has {names:?}");
    }
    setup(root, &kernels)?;
    let bins = test_binaries(root)?;
    let p = Paths::new(root);
    let profile = deployed::write_profile(root)?;
    let host = deployed::host_checks(root, &profile, &p.vm.join("out/host"))?;
    let mut outcomes = Vec::new();
    for k in &kernels {
        outcomes.push(run_kernel(&p, k, &bins, filter, &profile)?);
    }
    // The capability matrix: each kernel's as-deployed checks, then this machine's.
    let mut checks: Vec<&deployed::Checks> = outcomes.iter().map(|o| &o.deployed).collect();
    checks.push(&host);
    let (cap_rows, unneeded) = deployed::matrix(&checks, &profile.caps);
    eprintln!("\nxtask: capability matrix (faultline check as deployed)\n{cap_rows}");
    let ran: Vec<&str> = checks.iter().map(|c| c.kernel.as_str()).collect();
    for cap in &unneeded {
        eprintln!(
            "xtask: warning: removing CAP_{cap} changed nothing on {}: the manifest should not ask for it",
            ran.join(", ")
        );
    }
    let broken = host.broken();
    let mut failed = !broken.is_empty();
    if failed {
        eprintln!(
            "xtask: faultline check as deployed on this machine failed to run: {} (target/vm/out/host/)",
            broken.join("; ")
        );
    }
    eprintln!("\nxtask: kernel matrix");
    for o in &outcomes {
        let status = if o.failed.is_empty() { "ok" } else { "FAILED" };
        eprintln!(
            "  {:<5} {:<28} {status:<6} {} test binaries passed in {:.0} s{}",
            o.kernel,
            o.uname,
            o.passed.len(),
            o.secs,
            if o.failed.is_empty() {
                String::new()
            } else {
                format!("; failed: {}", o.failed.join(", "))
            }
        );
        failed |= !o.failed.is_empty();
    }
    for o in &outcomes {
        crate::print_skips(&o.kernel, &o.skipped);
    }
    if failed {
        bail!("the kernel matrix failed (logs under target/vm/out/<kernel>/)");
    }
    if kernels.len() == KERNELS.len() {
        let rows: String = kernels
            .iter()
            .zip(&outcomes)
            .map(|(k, o)| table_row(k, o))
            .collect();
        check_readme(root, &rows, update_docs)?;
        deployed::check_readme(root, &profile.caps, &cap_rows, update_docs)?;
    }
    Ok(())
}

fn run_kernel(
    p: &Paths,
    k: &Kernel,
    bins: &[(String, PathBuf)],
    filter: &[String],
    profile: &deployed::Profile,
) -> anyhow::Result<Outcome> {
    let out = p.vm.join("out").join(k.name);
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    // The VM runs copies: a rebuild on the host during the run cannot swap them.
    let bin = p.vm.join("bin").join(k.name);
    let _ = fs::remove_dir_all(&bin);
    fs::create_dir_all(&bin)?;
    for name in ["faultline", "faultline-lab", deployed::LAUNCHER] {
        fs::copy(p.root.join("target/debug").join(name), bin.join(name))
            .with_context(|| format!("copying target/debug/{name}"))?;
    }
    let profile_copy = bin.join("profile.json");
    fs::copy(&profile.path, &profile_copy)
        .with_context(|| format!("copying {}", profile.path.display()))?;
    let launcher = bin.join(deployed::LAUNCHER);
    let mut script = format!(
        "#!/bin/sh\n\
         # Runs inside the VM as root; everything it reports goes to {out}.\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         export FAULTLINE_VM_KERNEL={name} FAULTLINE_BIN_DIR={bin} RUST_BACKTRACE=1\n\
         cd {pkg}\n\
         echo booted > {out}/booted\n\
         uname -r > {out}/uname\n\
         pid_max=$(cat /proc/sys/kernel/pid_max)\n\
         {bin}/faultline check --verbose > {out}/check.txt 2>&1; echo $? > {out}/check.rc\n\
         {launcher} --remove-cgroup > {out}/cgroup-cleanup.txt 2>&1\n",
        out = out.display(),
        name = k.name,
        bin = bin.display(),
        pkg = p.root.join("probe-user").display(),
        launcher = launcher.display(),
    );
    // `check` as deployed (after the root one, which mounts tracefs as a node's systemd does),
    // then every test binary runs faultline so.
    script += &deployed::capbnd_script(&out);
    script += &deployed::check_script(&bin, &profile_copy, &out, &profile.caps);
    script += &format!(
        "export FAULTLINE_AS_DEPLOYED={} FAULTLINE_AS_DEPLOYED_MEMLOCK={} \
         FAULTLINE_TEST_SKIPS={}/skips.txt\n",
        profile_copy.display(),
        deployed::MEMLOCK_64K,
        out.display()
    );
    let selected: Vec<&(String, PathBuf)> = bins
        .iter()
        .filter(|(name, _)| KERNEL_TESTS.contains(&name.as_str()))
        .collect();
    for (name, built) in &selected {
        let exe = bin.join(name);
        fs::copy(built, &exe).with_context(|| format!("copying {}", built.display()))?;
        let skip: String = USERSPACE_ONLY
            .iter()
            .filter(|(binary, _)| binary == name)
            .flat_map(|(_, tests)| tests.iter())
            .map(|t| format!(" --skip {t}"))
            .collect();
        script += &format!(
            "echo \"== {name}\" >> {out}/progress\n\
             {exe} --test-threads=1{skip} {filter} > {out}/{name}.log 2>&1; echo $? > {out}/{name}.rc\n\
             echo $pid_max > /proc/sys/kernel/pid_max\n",
            out = out.display(),
            exe = exe.display(),
            filter = filter.join(" "),
        );
    }
    script += &format!(
        "{} --remove-cgroup >> {out}/cgroup-cleanup.txt 2>&1\necho done > {out}/done\n",
        launcher.display(),
        out = out.display()
    );
    let script_path = out.join("guest.sh");
    fs::write(&script_path, script)?;

    let vmlinuz = vmlinuz(&p.kernel_dir(k))?;
    let started = Instant::now();
    eprintln!("xtask: booting {} ({})", k.name, vmlinuz.display());
    let kvm = kvm_works();
    boot(p, &vmlinuz, &out, &script_path, kvm)?;
    if !out.join("booted").exists() && kvm {
        eprintln!(
            "xtask: {}: no boot with KVM, retrying with emulation",
            k.name
        );
        boot(p, &vmlinuz, &out, &script_path, false)?;
    }
    let read = |f: &str| fs::read_to_string(out.join(f)).unwrap_or_default();
    if !out.join("booted").exists() {
        bail!(
            "kernel {} did not boot; console in {}",
            k.name,
            out.join("console.log").display()
        );
    }
    let mut outcome = Outcome {
        kernel: k.name.to_owned(),
        uname: read("uname").trim().to_owned(),
        check: read("check.txt"),
        failed: Vec::new(),
        passed: Vec::new(),
        skipped: read("skips.txt"),
        secs: started.elapsed().as_secs_f64(),
        deployed: deployed::Checks::read(k.name, &out, &profile.caps),
    };
    if read("check.rc").trim() != "0" {
        outcome.failed.push("check".to_owned());
    }
    // A check as deployed may fail (that is what the capability matrix shows); its launcher
    // may not.
    for broken in outcome.deployed.broken() {
        outcome.failed.push(format!("check as deployed ({broken})"));
    }
    for (name, _) in &selected {
        if read(&format!("{name}.rc")).trim() == "0" {
            outcome.passed.push(name.clone());
        } else {
            outcome.failed.push(name.clone());
            eprintln!("--- {} {name}: tail of {name}.log", k.name);
            let log = read(&format!("{name}.log"));
            let lines: Vec<&str> = log.lines().collect();
            for l in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{l}");
            }
        }
    }
    if !out.join("done").exists() {
        outcome
            .failed
            .push("(the VM stopped before the end)".to_owned());
    }
    Ok(outcome)
}

fn kvm_works() -> bool {
    std::env::var_os("FAULTLINE_VM_NO_KVM").is_none()
        && fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
}

fn boot(p: &Paths, vmlinuz: &Path, out: &Path, script: &Path, kvm: bool) -> anyhow::Result<()> {
    let console = fs::File::create(out.join("console.log"))?;
    let mut cmd = Command::new("timeout");
    cmd.arg(VM_TIMEOUT.as_secs().to_string())
        .arg(p.vng())
        .arg("--run")
        .arg(vmlinuz)
        .args(["--memory", "2G", "--cpus", "2", "--verbose"])
        .arg("--rwdir")
        .arg(out)
        .arg("--exec")
        .arg(format!("sh {}", script.display()))
        .stdin(std::process::Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console);
    if !kvm {
        cmd.arg("--disable-kvm");
    }
    // virtme-ng needs depmod and busybox from the sbin directories.
    let path = format!(
        "{}:/usr/sbin:/sbin:{}",
        p.vm.join("venv/bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    cmd.env("PATH", path);
    // vng's own exit status says nothing about the tests (without virtio script ports it ends
    // a clean power-off with 255): the guest reports through files. Only a timeout is news.
    let status = cmd.status().context("starting virtme-ng")?;
    if status.code() == Some(124) {
        eprintln!("xtask: the VM ran past {VM_TIMEOUT:?} and was stopped");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A renamed test must not silently run in the VMs again, nor a skip name go stale.
    #[test]
    fn every_skipped_test_exists_in_its_binary() {
        let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../probe-user/tests");
        for (binary, names) in USERSPACE_ONLY {
            assert!(
                KERNEL_TESTS.contains(&binary),
                "{binary} is not run in the VMs"
            );
            let source = fs::read_to_string(tests.join(format!("{binary}.rs")))
                .unwrap_or_else(|e| panic!("tests/{binary}.rs: {e}"));
            for name in names {
                assert!(
                    source.contains(&format!("fn {name}()")),
                    "tests/{binary}.rs has no test {name}"
                );
            }
        }
    }
}
