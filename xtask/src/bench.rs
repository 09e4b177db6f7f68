//! `cargo xtask bench`: each workload without a probe and with faultline attached, in the same
//! run, alternating so that machine noise hits every configuration alike. Reports medians and
//! ratios against the no-probe baseline, and writes BENCHMARKS.md.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// A way of running the node while the workload runs.
struct Config {
    name: &'static str,
    /// `faultline` arguments, or none for the baseline.
    faultline: Option<&'static [&'static str]>,
}

const CONFIGS: [Config; 3] = [
    Config {
        name: "no probe",
        faultline: None,
    },
    Config {
        name: "faultline top (task counters)",
        faultline: Some(&["top", "--output", "json"]),
    },
    Config {
        name: "faultline trace --headroom-warn (all programs)",
        faultline: Some(&["trace", "--output", "json", "--headroom-warn", "10%"]),
    },
];

struct Workload {
    name: &'static str,
    /// faultline-lab arguments, with the count last.
    lab: &'static [&'static str],
    /// A faultline-lab helper running for the whole workload (a DNS server), if any.
    helper: Option<&'static [&'static str]>,
    count: u32,
    quick_count: u32,
    unit: &'static str,
}

const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "thread create+join",
        lab: &["spin-threads"],
        helper: None,
        count: 20_000,
        quick_count: 500,
        unit: "threads/s",
    },
    Workload {
        name: "fork+wait",
        lab: &["spin-forks"],
        helper: None,
        count: 3_000,
        quick_count: 100,
        unit: "forks/s",
    },
    Workload {
        name: "DNS query+answer over UDP (loopback, port 53)",
        lab: &["dns-client", "--dns-server", "127.53.0.1:53"],
        helper: Some(&["dns-server", "600", "--dns-listen", "127.53.0.1:53"]),
        count: 20_000,
        quick_count: 500,
        unit: "queries/s",
    },
];

const REPS: usize = 5;

pub fn run(root: &Path, quick: bool) -> anyhow::Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark attaches eBPF programs: run it as root");
    }
    crate::run(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "-p",
        "probe-user",
    ]))?;
    let bin = root.join("target/release");
    let reps = if quick { 1 } else { REPS };
    let mut rows = Vec::new();
    for w in &WORKLOADS {
        let count = if quick { w.quick_count } else { w.count };
        let mut helper = match w.helper {
            Some(args) => Some(
                Command::new(bin.join("faultline-lab"))
                    .args(args)
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting the workload's helper")?,
            ),
            None => None,
        };
        std::thread::sleep(Duration::from_millis(300));
        // rates[config][rep]
        let mut rates = vec![Vec::new(); CONFIGS.len()];
        for rep in 0..reps {
            for (i, c) in CONFIGS.iter().enumerate() {
                let probe = c
                    .faultline
                    .map(|args| Probe::start(&bin.join("faultline"), args))
                    .transpose()?;
                let rate = run_lab(&bin.join("faultline-lab"), w.lab, count)?;
                if let Some(p) = probe {
                    p.stop()?;
                }
                eprintln!(
                    "bench: {} / {} / rep {}: {rate:.0} {}",
                    w.name,
                    c.name,
                    rep + 1,
                    w.unit
                );
                rates[i].push(rate);
            }
        }
        if let Some(h) = helper.as_mut() {
            let _ = h.kill();
            let _ = h.wait();
        }
        let medians: Vec<f64> = rates.iter_mut().map(|r| median(r)).collect();
        for (i, c) in CONFIGS.iter().enumerate() {
            rows.push(format!(
                "| {} ({count} ops) | {} | {:.0} {} | {:.3} |",
                w.name,
                c.name,
                medians[i],
                w.unit,
                medians[i] / medians[0]
            ));
        }
    }
    let table = format!(
        "| workload | configuration | median of {reps} | ratio to no probe |\n|---|---|---|---|\n{}\n",
        rows.join("\n")
    );
    println!("{table}");
    if quick {
        return Ok(());
    }
    let report = format!(
        "# Benchmarks\n\nWritten by `cargo xtask bench` on {date}.\n\n- machine: {cpus} CPUs, {mem}\n- kernel: {kernel}\n- method: each workload runs {REPS} times per configuration, configurations alternating within each repetition; the table shows the median rate and its ratio to the no-probe median of the same run. A ratio of 1.000 means no measurable cost. The spread between repetitions on a 2-core machine shared with the probe can exceed 10% (scheduling, CPU placement of client and server): read ratios within about ±10% as no measurable difference, and the per-repetition lines printed by the run for the spread.\n\n{table}\nWorkloads are `faultline-lab spin-threads N` (pthread_create + join, one at a time), `faultline-lab spin-forks N` (fork + waitpid) and `faultline-lab dns-client N` (a UDP query and its answer, one at a time, against `faultline-lab dns-server` on 127.53.0.1:53; the cgroup_skb programs see both packets). Targets: thread creation >= 0.98 and DNS >= 0.95 of no probe.\n",
        date = stdout_of(Command::new("date").arg("-u").arg("+%Y-%m-%d %H:%M UTC")).trim(),
        cpus = std::thread::available_parallelism().map_or(0, |n| n.get()),
        mem = stdout_of(
            Command::new("sh").args(["-c", "free -h | awk '/Mem:/ {print $2 \" memory\"}'"])
        )
        .trim(),
        kernel = stdout_of(Command::new("uname").arg("-r")).trim(),
    );
    std::fs::write(root.join("BENCHMARKS.md"), report).context("writing BENCHMARKS.md")?;
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

/// Runs one timed lab workload; returns operations per second.
fn run_lab(lab: &Path, mode: &[&str], count: u32) -> anyhow::Result<f64> {
    let out = Command::new(lab)
        .args(mode)
        .arg(count.to_string())
        .output()
        .context("running faultline-lab")?;
    if !out.status.success() {
        bail!(
            "faultline-lab {mode:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> Option<f64> {
        let start = text.find(&format!("\"{name}\":"))? + name.len() + 3;
        text[start..].split([',', '}']).next()?.trim().parse().ok()
    };
    let (Some(created), Some(ns)) = (field("created"), field("elapsed_ns")) else {
        bail!("unexpected faultline-lab output: {text}");
    };
    Ok(created / (ns / 1e9))
}

/// faultline running in the background with its programs attached.
struct Probe {
    child: Child,
}

impl Probe {
    fn start(faultline: &Path, args: &[&str]) -> anyhow::Result<Probe> {
        let mut child = Command::new(faultline)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting faultline")?;
        let mut stderr = BufReader::new(child.stderr.take().context("no stderr")?);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut line = String::new();
        // Ready once it says what it is doing (after attaching).
        while !line.starts_with("faultline: tracing") && !line.starts_with("faultline: counting") {
            line.clear();
            if stderr.read_line(&mut line)? == 0 || Instant::now() > deadline {
                let _ = child.kill();
                bail!("faultline {args:?} did not start: {line}");
            }
        }
        Ok(Probe { child })
    }

    fn stop(mut self) -> anyhow::Result<()> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait()?;
        if !status.success() {
            bail!("faultline exited with {status}");
        }
        Ok(())
    }
}
