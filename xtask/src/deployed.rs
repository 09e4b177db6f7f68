//! faultline as deployed: the DaemonSet's privileges, read from the rendered manifest
//! (`kubectl kustomize deploy/`, never a second copy) into `target/as-deployed/profile.json`
//! for the launcher (`faultline-as-deployed`, lab/src/bin/faultline-as-deployed.rs), which the
//! tests and the kernel matrix run faultline through; `faultline check` run that way (two
//! runtime memlock limits, and once without each capability the manifest adds); and the
//! the capability matrix of docs/kernels.md written from those checks.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

/// The launcher's binary, built by `cargo build -p faultline-lab`.
pub const LAUNCHER: &str = "faultline-as-deployed";
/// A container runtime's RLIMIT_MEMLOCK (containerd or dockerd under systemd): 64 KiB, and
/// 8 MiB where the unit raises it; never unlimited.
pub const MEMLOCK_64K: u64 = 64 << 10;
const MEMLOCKS: [(&str, u64); 2] = [("check-64k", MEMLOCK_64K), ("check-8m", 8 << 20)];

/// The profile the launcher reads, and the capabilities the manifest adds.
pub struct Profile {
    pub path: PathBuf,
    pub caps: Vec<String>,
}

/// Renders deploy/ and writes the DaemonSet's faultline container as the launcher's profile.
pub fn write_profile(root: &Path) -> anyhow::Result<Profile> {
    let tools = root.join("target/deploy-tools/bin");
    let rendered = Command::new(tools.join("kubectl"))
        .arg("kustomize")
        .arg(root.join("deploy"))
        .output()
        .context("running target/deploy-tools/bin/kubectl (installed by `cargo xtask setup`)")?;
    if !rendered.status.success() {
        bail!(
            "kubectl kustomize deploy/ failed: {}",
            String::from_utf8_lossy(&rendered.stderr)
        );
    }
    let mut python = Command::new(tools.join("python3"))
        .args(["-c", "import sys, yaml, json; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d is not None]))"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running target/deploy-tools/bin/python3")?;
    std::io::Write::write_all(
        &mut python.stdin.take().context("python's stdin")?,
        &rendered.stdout,
    )?;
    let out = python.wait_with_output()?;
    if !out.status.success() {
        bail!("the rendered manifest is not YAML");
    }
    let docs: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    let profile = profile_of(&docs)?;
    let caps = profile["capabilities"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    let path = root.join("target/as-deployed/profile.json");
    fs::create_dir_all(path.parent().unwrap_or(root))?;
    fs::write(&path, serde_json::to_string_pretty(&profile)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(Profile { path, caps })
}

/// The DaemonSet's faultline container as a profile carries it: its args, and the environment
/// variables the manifest gives a literal value (those from the API, the node's name and the
/// pod's own, are left to faultline's fallbacks, as in the tests).
pub struct Container {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// Reads the container of a profile [`write_profile`] wrote.
pub fn container(profile: &Path) -> anyhow::Result<Container> {
    let text =
        fs::read_to_string(profile).with_context(|| format!("reading {}", profile.display()))?;
    let profile: Value = serde_json::from_str(&text).context("the profile is not JSON")?;
    let c = &profile["container"];
    let args = c["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    let env = c["env"]
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
    Ok(Container { args, env })
}

/// What the launcher needs of the DaemonSet's faultline container and its pod, or why the
/// launcher cannot reproduce it.
fn profile_of(docs: &[Value]) -> anyhow::Result<Value> {
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .context("the rendered manifest has no DaemonSet")?;
    let pod = &ds["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().context("no containers")?;
    let c = containers
        .iter()
        .find(|c| c["name"] == "faultline")
        .or(containers.first())
        .context("no containers")?;
    let sc = &c["securityContext"];
    if sc["privileged"] == true {
        bail!(
            "the DaemonSet says privileged: true: the as-deployed runs reproduce a container with \
             only its capabilities (a privileged one has every capability, device and path)"
        );
    }
    if pod["hostPID"] != true || pod["hostNetwork"] != true {
        bail!(
            "the DaemonSet lacks hostPID: true or hostNetwork: true: the launcher keeps the host's \
             pid and network namespaces and does not emulate a pod's own"
        );
    }
    for user in [&sc["runAsUser"], &pod["securityContext"]["runAsUser"]] {
        if !user.is_null() && *user != 0 {
            bail!("the DaemonSet runs faultline as uid {user}: the launcher runs it as uid 0");
        }
    }
    let caps = &sc["capabilities"];
    let drops_all = caps["drop"]
        .as_array()
        .is_some_and(|d| d.iter().any(|c| c == "ALL"));
    if !drops_all {
        bail!(
            "the DaemonSet's container does not drop ALL capabilities: the launcher gives exactly \
             capabilities.add (a runtime's default set is not reproduced)"
        );
    }
    let add: Vec<String> = caps["add"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let c = c.as_str().unwrap_or("").to_ascii_uppercase();
            c.strip_prefix("CAP_").unwrap_or(&c).to_owned()
        })
        .collect();
    let volumes = pod["volumes"].as_array().cloned().unwrap_or_default();
    let mut mounts = Vec::new();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let name = m["name"].as_str().unwrap_or("?");
        let v = volumes
            .iter()
            .find(|v| v["name"] == name)
            .with_context(|| format!("volumeMount {name} has no volume"))?;
        let Some(host_path) = v["hostPath"]["path"].as_str() else {
            bail!("volume {name} is not a hostPath: the launcher reproduces hostPath volumes only");
        };
        for unsupported in ["subPath", "subPathExpr", "mountPropagation"] {
            if !m[unsupported].is_null() {
                bail!("volumeMount {name} sets {unsupported}: not reproduced by the launcher");
            }
        }
        mounts.push(json!({
            "hostPath": host_path,
            "mountPath": m["mountPath"].as_str().with_context(|| format!("volumeMount {name}: no mountPath"))?,
            "readOnly": m["readOnly"] == true,
            "recursiveReadOnly": m["recursiveReadOnly"] == "Enabled" || m["recursiveReadOnly"] == "IfPossible",
        }));
    }
    Ok(json!({
        "capabilities": add,
        "readOnlyRootFilesystem": sc["readOnlyRootFilesystem"] == true,
        // Kubernetes' default when the field is absent: true.
        "allowPrivilegeEscalation": sc["allowPrivilegeEscalation"] != false,
        "hostPID": true,
        "hostNetwork": true,
        "mounts": mounts,
        // What the container runs with, as the manifest writes them: the tests start the
        // daemon with them (the shipped defaults).
        "container": { "args": c["args"], "env": c["env"] },
    }))
}

/// `faultline check --verbose` runs as deployed: (file stem, launcher arguments).
pub fn check_runs(caps: &[String]) -> Vec<(String, Vec<String>)> {
    let mut runs: Vec<(String, Vec<String>)> = MEMLOCKS
        .iter()
        .map(|(stem, bytes)| {
            (
                (*stem).to_owned(),
                vec!["--memlock".into(), bytes.to_string()],
            )
        })
        .collect();
    for cap in caps {
        runs.push((
            format!("check-without-{cap}"),
            vec![
                "--memlock".into(),
                MEMLOCK_64K.to_string(),
                "--without".into(),
                cap.clone(),
            ],
        ));
    }
    runs
}

/// The shell lines that run every check of `check_runs` into `out` (`<stem>.txt`, `.rc`).
pub fn check_script(bin: &Path, profile: &Path, out: &Path, caps: &[String]) -> String {
    check_runs(caps)
        .iter()
        .map(|(stem, args)| {
            format!(
                "{bin}/{LAUNCHER} --profile {profile} {args} -- {bin}/faultline check --verbose > {out}/{stem}.txt 2>&1; echo $? > {out}/{stem}.rc\n",
                bin = bin.display(),
                profile = profile.display(),
                args = args.join(" "),
                out = out.display(),
            )
        })
        .collect()
}

/// Ends what is left in the launcher's shared cgroup and removes it.
pub fn remove_cgroup(launcher: &Path) -> anyhow::Result<()> {
    crate::run(Command::new(launcher).arg("--remove-cgroup"))
}

/// The same checks on this machine (into `out`), with the root `check.txt` first (as in each
/// VM: it also mounts tracefs where nothing has, as a node's systemd does).
pub fn host_checks(root: &Path, profile: &Profile, out: &Path) -> anyhow::Result<Checks> {
    let bin = root.join("target/debug");
    let launcher = bin.join(LAUNCHER);
    let _ = fs::remove_dir_all(out);
    fs::create_dir_all(out)?;
    remove_cgroup(&launcher)?;
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let capbnd = status
        .lines()
        .find(|l| l.starts_with("CapBnd:"))
        .unwrap_or("");
    fs::write(out.join("capbnd.txt"), format!("{capbnd}\n"))?;
    let run = |stem: &str, cmd: &mut Command| -> anyhow::Result<()> {
        let log = fs::File::create(out.join(format!("{stem}.txt")))?;
        let status = cmd
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .with_context(|| format!("running {cmd:?}"))?;
        let rc = status.code().map_or("killed".to_owned(), |c| c.to_string());
        fs::write(out.join(format!("{stem}.rc")), rc + "\n")?;
        Ok(())
    };
    let mut result = run(
        "check",
        Command::new("timeout")
            .args(["300"])
            .arg(bin.join("faultline"))
            .args(["check", "--verbose"]),
    );
    for (stem, args) in check_runs(&profile.caps) {
        if result.is_err() {
            break;
        }
        eprintln!("xtask: host: faultline check as deployed ({stem})");
        result = run(
            &stem,
            Command::new("timeout")
                .arg("300")
                .arg(&launcher)
                .arg("--profile")
                .arg(&profile.path)
                .args(&args)
                .arg("--")
                .arg(bin.join("faultline"))
                .args(["check", "--verbose"]),
        );
    }
    let removed = remove_cgroup(&launcher);
    result.and(removed)?;
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let minor: Vec<&str> = release.trim().split(['.', '-']).take(2).collect();
    Ok(Checks::read(
        &format!("{} (host)", minor.join(".")),
        out,
        &profile.caps,
    ))
}

/// One kernel's as-deployed checks: by file stem, (exit status, output).
pub struct Checks {
    pub kernel: String,
    pub runs: BTreeMap<String, (String, String)>,
    /// Capabilities of the profile that the machine's own bounding set lacks (`capbnd.txt`):
    /// the launcher cannot give them, so what they cost is unknown there.
    pub unheld: Vec<String>,
}

/// The shell line that records the bounding set the launcher starts from.
pub fn capbnd_script(out: &Path) -> String {
    format!(
        "grep CapBnd /proc/self/status > {}/capbnd.txt\n",
        out.display()
    )
}

/// The profile's capabilities missing from a `CapBnd:` line.
fn unheld(capbnd: &str, caps: &[String]) -> Vec<String> {
    let Some(mask) = capbnd
        .split_whitespace()
        .last()
        .and_then(|h| u64::from_str_radix(h, 16).ok())
    else {
        return Vec::new();
    };
    caps.iter()
        .filter(|c| probe_common::caps::number(c).is_some_and(|bit| mask & (1 << bit) == 0))
        .cloned()
        .collect()
}

impl Checks {
    pub fn read(kernel: &str, out: &Path, caps: &[String]) -> Checks {
        let read = |f: String| fs::read_to_string(out.join(f)).unwrap_or_default();
        let runs = check_runs(caps)
            .into_iter()
            .map(|(stem, _)| {
                let rc = read(format!("{stem}.rc")).trim().to_owned();
                let text = read(format!("{stem}.txt"));
                (stem, (rc, text))
            })
            .collect();
        Checks {
            kernel: kernel.to_owned(),
            runs,
            unheld: unheld(&read("capbnd.txt".into()), caps),
        }
    }

    /// The runs whose launcher itself failed (exit 125) or that never reported: harness
    /// failures, not findings.
    pub fn broken(&self) -> Vec<String> {
        self.runs
            .iter()
            .filter(|(_, (rc, text))| {
                rc.is_empty() || (rc == "125" && text.starts_with("faultline-as-deployed:"))
            })
            .map(|(stem, (rc, text))| {
                if rc.is_empty() {
                    format!("{stem}: no exit status")
                } else {
                    format!("{stem}: {}", text.lines().next().unwrap_or(""))
                }
            })
            .collect()
    }
}

/// A status line of `check`: (status, item, detail).
fn status_lines(text: &str) -> Vec<(&str, &str, &str)> {
    text.lines()
        .filter_map(|l| {
            let status = ["ok", "warn", "FAIL"]
                .into_iter()
                .find(|s| l.starts_with(&format!("{s} ")))?;
            // `{tag:<4}  {item:<22} {detail}`
            let rest = l.get(6..)?;
            let (item, detail) = if rest.len() > 23 && rest.as_bytes()[22] == b' ' {
                (rest[..22].trim_end(), rest[23..].trim())
            } else {
                rest.split_once(' ').unwrap_or((rest, ""))
            };
            Some((status, item.trim(), detail))
        })
        .collect()
}

/// `check` as deployed in one cell: pass, or the items that failed.
fn verdict(rc: &str, text: &str) -> String {
    let fails: Vec<&str> = status_lines(text)
        .into_iter()
        .filter(|(s, _, _)| *s == "FAIL")
        .map(|(_, item, _)| item)
        .fold(Vec::new(), |mut v, i| {
            if !v.contains(&i) {
                v.push(i);
            }
            v
        });
    match (rc, fails.is_empty()) {
        ("0", true) => "pass".to_owned(),
        (_, false) => format!("**FAIL**: {}", fails.join(", ")),
        ("125", true) => format!("launcher failed: {}", text.lines().next().unwrap_or("")),
        (rc, true) => format!("exit {rc}"),
    }
}

/// Whitespace collapsed, pipes escaped, numbers as `#` (for comparing two runs).
fn cell(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

fn shape(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_digit() { '#' } else { c })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// What removing `cap` costs: the FAIL and warn lines of the run without it that name
/// CAP_<cap> or that the full set's run does not have. None: nothing (not needed).
fn cost(full: &(String, String), without: &(String, String), cap: &str) -> Option<String> {
    let named = format!("CAP_{cap}");
    let before: Vec<String> = status_lines(&full.1)
        .into_iter()
        .map(|(s, i, d)| shape(&format!("{s} {i} {d}")))
        .collect();
    let lines: Vec<String> = status_lines(&without.1)
        .into_iter()
        .filter(|(s, _, _)| *s != "ok")
        .filter(|(s, i, d)| d.contains(&named) || !before.contains(&shape(&format!("{s} {i} {d}"))))
        .map(|(s, i, d)| cell(&format!("{s} {i}: {d}")))
        .collect();
    if !lines.is_empty() {
        return Some(lines.join("; "));
    }
    if without.0 != full.0 {
        return Some(format!("check exits {} (with it: {})", without.0, full.0));
    }
    None
}

/// The docs/kernels.md section the matrix writes and checks (like the kernel table in vm.rs).
const TABLE_BEGIN: &str =
    "<!-- capability matrix: written by cargo xtask vm-test --update-docs -->";
const TABLE_END: &str = "<!-- end of capability matrix -->";

/// The table's rows, and the capabilities whose removal changed nothing on any of them.
pub fn matrix(checks: &[&Checks], caps: &[String]) -> (String, Vec<String>) {
    let mut rows = String::new();
    let mut needed_somewhere = vec![false; caps.len()];
    for k in checks {
        let get = |stem: &str| k.runs.get(stem).cloned().unwrap_or_default();
        let full = get("check-64k");
        let big = get("check-8m");
        let mut row = format!(
            "| {} | 64 KiB: {}; 8 MiB: {} |",
            k.kernel,
            verdict(&full.0, &full.1),
            verdict(&big.0, &big.1)
        );
        for (i, cap) in caps.iter().enumerate() {
            if k.unheld.contains(cap) {
                // Unknown here: neither needed nor not.
                needed_somewhere[i] = true;
                row += " unknown: this machine's own bounding set lacks it |";
                continue;
            }
            let without = get(&format!("check-without-{cap}"));
            match cost(&full, &without, cap) {
                Some(lines) => {
                    needed_somewhere[i] = true;
                    row += &format!(" needed: {lines} |");
                }
                None => row += " not needed |",
            }
        }
        rows += &row;
        rows.push('\n');
    }
    let unneeded = caps
        .iter()
        .zip(needed_somewhere)
        .filter(|(_, needed)| !needed)
        .map(|(c, _)| c.clone())
        .collect();
    (rows, unneeded)
}

/// Compares the capability matrix of docs/kernels.md with this run's, and rewrites it with `update`.
pub fn check_readme(root: &Path, caps: &[String], rows: &str, update: bool) -> anyhow::Result<()> {
    let path = root.join("docs/kernels.md");
    let readme = fs::read_to_string(&path).context("reading docs/kernels.md")?;
    let (Some(b), Some(e)) = (readme.find(TABLE_BEGIN), readme.find(TABLE_END)) else {
        bail!("docs/kernels.md has no capability matrix markers ({TABLE_BEGIN} ... {TABLE_END})");
    };
    let header: String = caps.iter().map(|c| format!(" without CAP_{c} |")).collect();
    let rule: String = caps.iter().map(|_| "---|").collect();
    let table =
        format!("{TABLE_BEGIN}\n| kernel | `check` as deployed |{header}\n|---|---|{rule}\n{rows}");
    if readme[b..e] == table {
        return Ok(());
    }
    if !update {
        bail!(
            "docs/kernels.md's capability matrix differs from what the matrix found:\n{table}\nrun `cargo xtask vm-test --update-docs`"
        );
    }
    let updated = format!("{}{table}{}", &readme[..b], &readme[e..]);
    fs::write(&path, updated).context("writing docs/kernels.md")?;
    eprintln!("xtask: docs/kernels.md's capability matrix updated");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = "ok    kernel                 6.1.0-50-amd64\n\
        ok    privileges             can load eBPF programs\n\
        ok    conntrack counters     node namespace via Netlink: entries=3 max=262144\n\
        faultline: failed task creation tracing works on this node\n";

    #[test]
    fn a_capability_costs_its_named_lines_and_the_new_failures() {
        let without = "ok    kernel                 6.1.0-50-amd64\n\
            warn  privileges             no CAP_SYSLOG: kernel addresses hidden\n\
            FAIL  tracepoint programs    clone programs: perf_event_open failed | EACCES\n\
            ok    conntrack counters     node namespace via Netlink: entries=9 max=262144\n";
        let full = ("0".to_owned(), FULL.to_owned());
        let cost = cost(&full, &("1".to_owned(), without.to_owned()), "SYSLOG").unwrap();
        assert_eq!(
            cost,
            "warn privileges: no CAP_SYSLOG: kernel addresses hidden; \
             FAIL tracepoint programs: clone programs: perf_event_open failed \\| EACCES"
        );
        // Counters that moved between the runs are no cost.
        let same = FULL.replace("entries=3", "entries=7");
        assert_eq!(cost_of(&full, &same), None);
    }

    fn cost_of(full: &(String, String), text: &str) -> Option<String> {
        cost(full, &("0".to_owned(), text.to_owned()), "BPF")
    }

    #[test]
    fn verdicts() {
        assert_eq!(verdict("0", FULL), "pass");
        let failed = "FAIL  eBPF object            failed to create map CT_EVENTS\n";
        assert_eq!(verdict("1", failed), "**FAIL**: eBPF object");
        assert_eq!(
            verdict(
                "125",
                "faultline-as-deployed: unshare: Operation not permitted\n"
            ),
            "launcher failed: faultline-as-deployed: unshare: Operation not permitted"
        );
    }

    #[test]
    fn the_manifest_becomes_a_profile_and_privileged_is_refused() {
        let ds = |sc: Value| {
            vec![json!({"kind": "DaemonSet", "spec": {"template": {"spec": {
                "hostPID": true, "hostNetwork": true,
                "containers": [{"name": "faultline", "securityContext": sc,
                    "volumeMounts": [{"name": "btf", "mountPath": "/sys/kernel/btf", "readOnly": true}]}],
                "volumes": [{"name": "btf", "hostPath": {"path": "/sys/kernel/btf"}}]}}}})]
        };
        let p = profile_of(&ds(json!({
            "readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"], "add": ["BPF", "CAP_PERFMON"]}})))
        .unwrap();
        assert_eq!(p["capabilities"], json!(["BPF", "PERFMON"]));
        assert_eq!(p["allowPrivilegeEscalation"], false);
        assert_eq!(
            p["mounts"][0],
            json!({"hostPath": "/sys/kernel/btf", "mountPath": "/sys/kernel/btf", "readOnly": true, "recursiveReadOnly": false})
        );
        let err = profile_of(&ds(json!({"privileged": true}))).unwrap_err();
        assert!(err.to_string().contains("privileged: true"), "{err}");
    }
}
