//! `cargo xtask bench --profile`: where faultline's time goes, so that each change to a hot
//! path is justified by a number. Each workload runs once beside `faultline run` under a
//! system-wide `perf record` (the eBPF programs show as `bpf_prog_<tag>_<name>`, the kernel
//! paths they sit on and the agent's own functions beside them; idle CPUs left out), and the
//! replay benchmark
//! (userspace only) under `perf record --call-graph dwarf`. Reports go to
//! target/bench/profile/<name>.txt; the first lines of each are printed.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use super::{
    Env, Tool, WORKLOADS, free_port, measure::Sysctl, replay_command, run_measured, start,
};

/// Lines of each report printed.
const SHOWN: usize = 25;

pub fn run(root: &Path, env: &Env) -> anyhow::Result<()> {
    let dir = root.join("target/bench/profile");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // JIT-compiled programs get symbols perf can name.
    let _kallsyms = Sysctl::set("/proc/sys/net/core/bpf_jit_kallsyms", "1")?;
    let port = free_port()?;
    for w in &WORKLOADS {
        let _setting = w.set_up(env)?;
        let agent = start(env, Tool::Faultline, port)?;
        let data = dir.join(format!("{}.data", slug(w.name)));
        let mut perf = Command::new("perf")
            .args(["record", "-a", "-g", "-F", "4999", "-o"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf (linux-perf, installed by cargo xtask setup)")?;
        // perf needs a moment to open its events on every CPU.
        std::thread::sleep(std::time::Duration::from_millis(500));
        let run = run_measured(&mut w.command(env, w.count));
        stop(&mut perf)?;
        if let Some(a) = agent {
            a.stop()?;
        }
        run?;
        // The workload, its DNS server and the agent: not the idle CPUs.
        report(
            &data,
            &[
                "--sort",
                "comm,sym",
                "-g",
                "none",
                "--comms",
                "faultline-lab,dnsmasq,faultline,event-lines",
                "--percentage",
                "relative",
            ],
            w.name,
        )?;
    }
    let data = dir.join("replay.data");
    let replay = replay_command(root, env, "200000")?;
    let status = Command::new("perf")
        .args(["record", "--call-graph", "dwarf,16384", "-F", "2000", "-o"])
        .arg(&data)
        .arg("--")
        .arg(replay.get_program())
        .args(replay.get_args())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running the replay under perf")?;
    if !status.success() {
        bail!("perf record of the replay failed ({status})");
    }
    report(
        &data,
        &["--sort", "sym", "-g", "caller,0.5,callee,function,percent"],
        "replay (userspace per event)",
    )?;
    eprintln!("bench: profiles in {}", dir.display());
    Ok(())
}

/// SIGINT, then waits: perf writes its data on the way out.
fn stop(perf: &mut std::process::Child) -> anyhow::Result<()> {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
    let status = perf.wait().context("waiting for perf")?;
    if !status.success() && status.code().is_some() {
        bail!("perf record failed ({status})");
    }
    Ok(())
}

/// `perf report` of `data` into `<data>.txt` (samples by self time, 0.5% and above, with the
/// eBPF programs' share on top), and its first lines on stdout.
fn report(data: &Path, sort: &[&str], title: &str) -> anyhow::Result<()> {
    let out = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--percent-limit",
            "0.5",
            "-i",
        ])
        .arg(data)
        .args(sort)
        .output()
        .context("running perf report")?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    // The eBPF programs' share, summed over their symbols (`bpf_prog_<tag>_<name>`).
    let bpf: f64 = text
        .lines()
        .filter(|l| l.contains("bpf_prog_"))
        .filter_map(|l| {
            l.split_whitespace()
                .next()?
                .strip_suffix('%')?
                .parse::<f64>()
                .ok()
        })
        .sum();
    if bpf > 0.0 {
        text.insert_str(
            0,
            &format!("# eBPF programs (bpf_prog_*): {bpf:.1}% of these samples\n"),
        );
    }
    let path = data.with_extension("txt");
    std::fs::write(&path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    println!("## {title} ({})\n", path.display());
    if bpf > 0.0 {
        println!("eBPF programs (bpf_prog_*): {bpf:.1}% of the samples below\n");
    }
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .take(SHOWN)
    {
        println!("{line}");
    }
    println!();
    Ok(())
}

/// A file name from a workload's name.
fn slug(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while s.contains("--") {
        s = s.replace("--", "-");
    }
    s.trim_matches('-').to_owned()
}
