//! `faultline run` as the DaemonSet runs it, for the measurements that need it so (a busy
//! node, memory as pods come and go): through `faultline-as-deployed` with the manifest's
//! capabilities, mounts and namespaces, a runtime's 64 KiB RLIMIT_MEMLOCK, the container's args
//! and environment, in a cgroup of its own with the manifest's memory limit.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use super::{
    Env, free_port,
    measure::{Agent, BenchCgroup, Ready, cgroup2_root},
};
use crate::deployed;

/// deploy/daemonset.yaml's `resources.limits.memory`.
pub const DAEMONSET_MEMORY: u64 = 128 << 20;

/// The agent's cgroups: a v2 directory of its own, which the launcher joins (out of the shared
/// one, which another run's `--remove-cgroup` empties), and the DaemonSet's memory limit on
/// it, or on a v1 memory cgroup of its own (hybrid hosts: the memory controller is v1's) that
/// it joins before the launcher runs.
pub struct AgentCgroups {
    v2: BenchCgroup,
    /// The limited memory cgroup and whether it is v2's.
    memory: Option<(PathBuf, bool)>,
    v1_memory: Option<BenchCgroup>,
}

impl AgentCgroups {
    fn create() -> anyhow::Result<AgentCgroups> {
        let root = cgroup2_root()?;
        let v2 = BenchCgroup::create(&root, "faultline-bench-busy-agent")?;
        let mut cg = AgentCgroups {
            v2,
            memory: None,
            v1_memory: None,
        };
        let v1 = Path::new("/sys/fs/cgroup/memory");
        let controllers = std::fs::read_to_string(root.join("cgroup.controllers"))
            .context("reading the cgroup v2 root's controllers")?;
        if controllers.split_whitespace().any(|c| c == "memory") {
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory");
            std::fs::write(cg.v2.dir.join("memory.max"), DAEMONSET_MEMORY.to_string())
                .with_context(|| format!("limiting {}", cg.v2.dir.display()))?;
            cg.memory = Some((cg.v2.dir.clone(), true));
        } else if v1.join("cgroup.procs").exists() {
            let m = BenchCgroup::create(v1, "faultline-bench-busy-agent")?;
            std::fs::write(
                m.dir.join("memory.limit_in_bytes"),
                DAEMONSET_MEMORY.to_string(),
            )
            .with_context(|| format!("limiting {}", m.dir.display()))?;
            cg.memory = Some((m.dir.clone(), false));
            cg.v1_memory = Some(m);
        }
        Ok(cg)
    }

    /// The command that runs what follows in the v1 memory cgroup, if that is where the limit
    /// is (a runtime sets it before starting the container); the launcher otherwise.
    fn command(&self, launcher: &Path) -> Command {
        match &self.v1_memory {
            Some(m) => {
                let mut cmd = Command::new("sh");
                cmd.args(["-c", r#"echo $$ > "$0" && exec "$@""#])
                    .arg(m.dir.join("cgroup.procs"))
                    .arg(launcher);
                cmd
            }
            None => Command::new(launcher),
        }
    }

    /// OOM kills and the peak usage (bytes) of the memory cgroup.
    pub fn memory(&self) -> Option<(u64, u64)> {
        let (dir, v2) = self.memory.as_ref()?;
        let (events, peak) = if *v2 {
            ("memory.events", "memory.peak")
        } else {
            ("memory.oom_control", "memory.max_usage_in_bytes")
        };
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let kills = read(events)
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            .unwrap_or(0);
        let peak = read(peak).trim().parse().unwrap_or(0);
        Some((kills, peak))
    }
}

/// `faultline run` as deployed, its cgroups after it (fields drop in order: the agent first).
pub struct Deployed {
    pub agent: Agent,
    pub cgroups: AgentCgroups,
    pub port: u16,
}

impl Deployed {
    pub fn start(root: &Path, env: &Env, kubelet_logs: &Path) -> anyhow::Result<Deployed> {
        let profile = deployed::write_profile(root)?;
        let container = deployed::container(&profile.path)?;
        let cgroups = AgentCgroups::create()?;
        let (port, health) = (free_port()?, free_port()?);
        let mut cmd = cgroups.command(&env.bin.join(deployed::LAUNCHER));
        cmd.arg("--profile")
            .arg(&profile.path)
            .args(["--memlock", &deployed::MEMLOCK_64K.to_string(), "--cgroup"])
            .arg(&cgroups.v2.dir)
            .arg("--")
            .arg(env.bin.join("faultline"))
            .args(&container.args)
            .envs(container.env.iter().map(|(k, v)| (k, v)))
            // The departures, as the tests': ports of its own on loopback (the DaemonSet's are
            // one per node), no bearer token asked for on /metrics (no API here reviews
            // tokens), no Kubernetes API (pods named from the kubelet's log directories).
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--health-listen", &format!("127.0.0.1:{health}")])
            .env("FAULTLINE_KUBE_RBAC", "false")
            .arg("--no-kube-api")
            .arg("--kubelet-logs")
            .arg(kubelet_logs);
        let agent = Agent::start(
            "faultline run as deployed",
            &mut cmd,
            Ready::Stderr("running on node"),
        )?;
        eprintln!(
            "bench: faultline run as deployed: pid {}, port {port}",
            agent.pid()
        );
        Ok(Deployed {
            agent,
            cgroups,
            port,
        })
    }
}
