//! Attribution: from a cgroup path to the workload an SRE knows — pod (namespace, name, uid,
//! container, QoS) or, off Kubernetes, the systemd unit, user session or root.
//!
//! Paths are parsed for both kubelet cgroup drivers (systemd: `kubepods-burstable-pod<uid>.slice`
//! / `cri-containerd-<id>.scope`; cgroupfs: `/kubepods/burstable/pod<uid>/<id>`). Names come
//! from the kubelet's log directories, which need no API access: `pods/<ns>_<name>_<uid>/` and
//! `containers/<pod>_<ns>_<container>-<id>.log`. What a source said of a pod is kept for the
//! pod's life (`known`). A pod nothing named is shown as namespace `unknown` and pod
//! `pod-<first 8 of its uid>` ([`PodRef::shown_namespace`], [`PodRef::shown_name`]), never by
//! its bare uid. The container runtime's state is not read: its directories also hold the
//! containers' root filesystems and the runtime's sockets and FIFOs, which a read-only hostPath
//! does not protect.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Args;
use serde::Serialize;

use crate::{
    attribution::cgroups::{CgroupFs, Hierarchy},
    attribution::known::KnownPods,
    attribution::kubeapi::{ApiOptions, ApiPods, Owner},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// What a cgroup path says by itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupKind {
    Pod {
        uid: String,
        qos: Qos,
        /// The container's id when the path goes down to a container.
        container_id: Option<String>,
        /// containerd, crio or docker, when the path names the runtime.
        runtime: Option<&'static str>,
    },
    /// `system.slice/kubelet.service` -> `kubelet.service`.
    SystemdUnit(String),
    /// `user.slice/user-1000.slice/session-3.scope` -> `session-3.scope`, uid 1000.
    UserSession {
        uid: Option<u32>,
        session: String,
    },
    Root,
    /// Anything else: the path is the best name it has.
    Other(String),
}

/// Runtimes' container scope prefixes under the systemd driver.
const RUNTIME_PREFIXES: [(&str, &str); 4] = [
    ("cri-containerd-", "containerd"),
    ("crio-", "crio"),
    ("docker-", "docker"),
    ("containerd-", "containerd"),
];

fn is_container_id(s: &str) -> bool {
    s.len() >= 12 && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A pod uid as kubelet writes it in cgroup names: with `_` for `-` under the systemd driver.
fn pod_uid(s: &str) -> Option<String> {
    let uid = s.replace('_', "-");
    let ok = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        });
    ok.then_some(uid)
}

pub fn parse_cgroup_path(path: &str) -> CgroupKind {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        return CgroupKind::Root;
    }
    if let Some(kind) = parse_pod(&parts) {
        return kind;
    }
    let last = parts[parts.len() - 1];
    if parts[0] == "user.slice" {
        let uid = parts.iter().find_map(|p| {
            p.strip_prefix("user-")?
                .strip_suffix(".slice")?
                .parse()
                .ok()
        });
        return CgroupKind::UserSession {
            uid,
            session: last.to_owned(),
        };
    }
    if last.ends_with(".service") || last.ends_with(".scope") || last.ends_with(".slice") {
        return CgroupKind::SystemdUnit(last.to_owned());
    }
    CgroupKind::Other(path.to_owned())
}

/// Finds `kubepods` and the pod level below it, for either driver.
fn parse_pod(parts: &[&str]) -> Option<CgroupKind> {
    let start = parts
        .iter()
        .position(|p| *p == "kubepods" || *p == "kubepods.slice")?;
    let mut qos = Qos::Guaranteed;
    let mut uid = None;
    let mut rest = parts[start + 1..].iter();
    for p in rest.by_ref() {
        // QoS level: `burstable`, `besteffort` (cgroupfs) or `kubepods-burstable.slice`.
        let name = p.strip_suffix(".slice").unwrap_or(p);
        let name = name.strip_prefix("kubepods-").unwrap_or(name);
        match name {
            "burstable" => {
                qos = Qos::Burstable;
                continue;
            }
            "besteffort" => {
                qos = Qos::BestEffort;
                continue;
            }
            _ => {}
        }
        // Pod level: `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid>.slice` (systemd).
        let pod = name.rsplit_once("pod")?;
        if !(pod.0.is_empty() || pod.0.ends_with('-')) {
            return None;
        }
        uid = Some(pod_uid(pod.1)?);
        break;
    }
    let uid = uid?;
    let (container_id, runtime) = match rest.next() {
        None => (None, None),
        Some(c) => {
            let scope = c.strip_suffix(".scope").unwrap_or(c);
            RUNTIME_PREFIXES
                .iter()
                .find_map(|(prefix, runtime)| {
                    let id = scope.strip_prefix(prefix)?;
                    is_container_id(id).then(|| (Some(id.to_owned()), Some(*runtime)))
                })
                .or_else(|| is_container_id(scope).then(|| (Some(scope.to_owned()), None)))
                .unwrap_or((None, None))
        }
    };
    Some(CgroupKind::Pod {
        uid,
        qos,
        container_id,
        runtime,
    })
}

/// A pod and container by name, as reported with every event.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PodRef {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub uid: String,
    pub container: Option<String>,
    pub container_id: Option<String>,
    pub qos: Option<Qos>,
    /// From the API only: the owning workload, pod IPs, allow-listed labels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// The namespace shown for a pod that nothing (the API, the kubelet's directories, what was
/// learned before) named.
const UNKNOWN_NAMESPACE: &str = "unknown";

impl PodRef {
    /// The namespace as labels, tables and filters show it: `unknown` for a pod nothing named.
    pub fn shown_namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or(UNKNOWN_NAMESPACE)
    }

    /// The name as labels, tables and filters show it. A pod nothing named is `pod-` and the
    /// first 8 characters of its uid: enough to find it among the node's pods, and not a bare
    /// uid, which reads as a name (the whole uid stays in `uid`).
    pub fn shown_name(&self) -> Cow<'_, str> {
        match &self.name {
            Some(name) => Cow::Borrowed(name),
            None => Cow::Owned(format!(
                "pod-{}",
                self.uid.chars().take(8).collect::<String>()
            )),
        }
    }
}

/// Who a cgroup belongs to: a pod, or a readable name for anything else.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Attribution {
    /// `namespace/pod/container` for pods, the unit or session otherwise.
    pub workload: String,
    pub pod: Option<Arc<PodRef>>,
}

/// Names of pods and containers from the kubelet's log directories.
pub struct PodDirectory {
    root: PathBuf,
    /// pod uid -> (namespace, name)
    pods: HashMap<String, (String, String)>,
    /// container id -> container name
    containers: HashMap<String, String>,
    last_scan: Option<Instant>,
}

/// A miss rescans the directories at most this often.
const RESCAN_INTERVAL: Duration = Duration::from_secs(1);

impl PodDirectory {
    /// `root` holds `pods/` and `containers/` (the kubelet's /var/log).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        PodDirectory {
            root: root.into(),
            pods: HashMap::new(),
            containers: HashMap::new(),
            last_scan: None,
        }
    }

    fn rescan_if_due(&mut self) {
        if self
            .last_scan
            .is_some_and(|t| t.elapsed() < RESCAN_INTERVAL)
        {
            return;
        }
        self.last_scan = Some(Instant::now());
        self.pods = scan_pods(&self.root.join("pods"));
        self.containers = scan_containers(&self.root.join("containers"));
    }

    /// Names a pod (and container) from the directories, rescanning them on a miss.
    fn name(&mut self, pod: &mut PodRef) {
        if !self.pods.contains_key(&pod.uid)
            || pod
                .container_id
                .as_ref()
                .is_some_and(|id| !self.containers.contains_key(id))
        {
            self.rescan_if_due();
        }
        if let Some((ns, name)) = self.pods.get(&pod.uid) {
            pod.namespace = Some(ns.clone());
            pod.name = Some(name.clone());
        }
        pod.container = pod
            .container_id
            .as_ref()
            .and_then(|id| self.containers.get(id).cloned());
    }
}

/// Who a cgroup path belongs to; pods are named by `name_pod`.
fn attribute(path: &str, name_pod: impl FnOnce(&mut PodRef)) -> Attribution {
    match parse_cgroup_path(path) {
        CgroupKind::Pod {
            uid,
            qos,
            container_id,
            ..
        } => {
            let mut pod = PodRef {
                uid,
                container_id,
                qos: Some(qos),
                ..Default::default()
            };
            name_pod(&mut pod);
            Attribution {
                workload: pod_workload(&pod),
                pod: Some(Arc::new(pod)),
            }
        }
        CgroupKind::SystemdUnit(unit) => Attribution {
            workload: unit,
            pod: None,
        },
        CgroupKind::UserSession { uid, session } => Attribution {
            workload: match uid {
                Some(uid) => format!("{session} (uid {uid})"),
                None => session,
            },
            pod: None,
        },
        CgroupKind::Root => Attribution {
            workload: "/".to_owned(),
            pod: None,
        },
        CgroupKind::Other(p) => Attribution {
            workload: p,
            pod: None,
        },
    }
}

/// The pod filters of the commands that print (trace, top, explain), as kubectl names them.
#[derive(Args, Debug, Clone, Default)]
pub struct PodFilters {
    /// Only this Kubernetes namespace.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Only pods whose name is this or starts with it.
    #[arg(long)]
    pub pod: Option<String>,
    /// Only this container name.
    #[arg(long)]
    pub container: Option<String>,
}

impl PodFilters {
    pub fn any(&self) -> bool {
        self.namespace.is_some() || self.pod.is_some() || self.container.is_some()
    }

    /// Whether names (namespace, pod, container) pass the filters; the pod's is a prefix.
    pub fn matches_names(
        &self,
        namespace: Option<&str>,
        pod: Option<&str>,
        container: Option<&str>,
    ) -> bool {
        let eq = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| have == Some(w))
        };
        eq(&self.namespace, namespace)
            && eq(&self.container, container)
            && self
                .pod
                .as_deref()
                .is_none_or(|w| pod.is_some_and(|n| n.starts_with(w)))
    }

    /// Whether a pod (or a non-pod, `None`) passes the filters, by the names its labels show
    /// (`-n unknown --pod pod-0d3e2f1a` selects a pod nothing named, as its alert says).
    pub fn matches(&self, pod: Option<&PodRef>) -> bool {
        if !self.any() {
            return true;
        }
        let Some(p) = pod else { return false };
        self.matches_names(
            Some(p.shown_namespace()),
            Some(&p.shown_name()),
            p.container.as_deref(),
        )
    }
}

/// Where pod names come from, shared by every command that attributes.
#[derive(Args, Debug, Clone)]
pub struct PodArgs {
    /// The kubelet's log directory (with pods/ and containers/), for pod and container names.
    #[arg(long, env = "FAULTLINE_KUBELET_LOGS", default_value = "/var/log")]
    pub kubelet_logs: PathBuf,
    /// kubeconfig for the Kubernetes API; default: in-cluster service account, $KUBECONFIG
    /// or ~/.kube/config, when present.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Do not use the Kubernetes API even when one is configured.
    #[arg(long, env = "FAULTLINE_NO_KUBE_API")]
    pub no_kube_api: bool,
    /// This node's name, for the node-scoped pod watch (downward API: NODE_NAME).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Pod labels to report, comma-separated (e.g. app,team); others are never exported.
    #[arg(long, env = "FAULTLINE_POD_LABELS", value_delimiter = ',')]
    pub pod_labels: Vec<String>,
}

/// Resolves kernel cgroup ids to paths and workloads.
pub struct Attributor {
    pub cgroups: CgroupFs,
    pods: PodDirectory,
    api: Option<ApiPods>,
    /// What the sources said of each pod, for the pod's life.
    known: KnownPods,
    /// Recent answers by (cgroup id, pids cgroup inode): an event storm from one cgroup
    /// resolves it once per `REUSE`, not once per event.
    recent: HashMap<(u64, Option<u64>), Recent>,
}

/// When an attribution was made, the cgroup path and who.
type Recent = (Instant, Option<String>, Attribution);

/// How long an attribution is reused (pod names from the API may arrive this much later).
const REUSE: Duration = Duration::from_secs(1);
const MAX_RECENT: usize = 4096;

impl Attributor {
    /// Node-local sources, plus the Kubernetes API unless disabled or absent.
    pub async fn new(cgroups: CgroupFs, args: &PodArgs) -> Self {
        let api = if args.no_kube_api {
            None
        } else {
            crate::attribution::kubeapi::start(ApiOptions {
                kubeconfig: args.kubeconfig.clone(),
                node_name: args.node_name.clone().unwrap_or_else(hostname),
                labels: args.pod_labels.clone(),
            })
            .await
        };
        Attributor {
            cgroups,
            pods: PodDirectory::new(&args.kubelet_logs),
            api,
            known: KnownPods::new(Instant::now()),
            recent: HashMap::new(),
        }
    }

    /// Node-local sources only, none of them present: what the property tests attribute with.
    #[cfg(test)]
    pub(crate) fn offline() -> Self {
        Attributor {
            cgroups: CgroupFs::none(),
            pods: PodDirectory::new("/nonexistent"),
            api: None,
            known: KnownPods::new(Instant::now()),
            recent: HashMap::new(),
        }
    }

    /// The cgroup v2 path of `cgroup_id` and who it belongs to. Where the v2 path is not a
    /// pod's (hybrid hosts with the cgroupfs driver keep pods in v1 only), the task's own pids
    /// cgroup, when given, is tried too.
    pub fn attribute(
        &mut self,
        cgroup_id: u64,
        own_pids_ino: Option<u64>,
    ) -> (Option<String>, Attribution) {
        let key = (cgroup_id, own_pids_ino);
        if let Some((at, path, who)) = self.recent.get(&key)
            && at.elapsed() < REUSE
        {
            return (path.clone(), who.clone());
        }
        let (path, who) = self.resolve(cgroup_id, own_pids_ino);
        // An unknown cgroup is not remembered: it may appear at the next rescan.
        if path.is_some() {
            if self.recent.len() >= MAX_RECENT {
                self.expire();
                if self.recent.len() >= MAX_RECENT {
                    self.recent.clear();
                }
            }
            self.recent
                .insert(key, (Instant::now(), path.clone(), who.clone()));
        }
        (path, who)
    }

    /// Forgets the answers too old to be reused, and the room they took: the pipeline calls it
    /// on every refresh, so what is kept is the last second's cgroups, not every cgroup that
    /// had an event since the cache last filled up.
    pub fn expire(&mut self) {
        self.recent.retain(|_, (at, _, _)| at.elapsed() < REUSE);
        crate::memory::shrink(&mut self.recent);
    }

    fn resolve(
        &mut self,
        cgroup_id: u64,
        own_pids_ino: Option<u64>,
    ) -> (Option<String>, Attribution) {
        let path = self
            .cgroups
            .path(Hierarchy::Unified, cgroup_id)
            .map(|p| p.text());
        let mut attribution = match &path {
            Some(p) => self.attribute_path(p),
            None => Attribution {
                workload: "?".to_owned(),
                pod: None,
            },
        };
        if attribution.pod.is_none()
            && let Some(pids_path) =
                own_pids_ino.and_then(|ino| self.cgroups.path(Hierarchy::Pids, ino))
        {
            let by_pids = self.attribute_path(&pids_path.text());
            if by_pids.pod.is_some() {
                attribution = by_pids;
            }
        }
        (path, attribution)
    }

    /// The Kubernetes API's failed requests since the start (none: no API in use).
    pub fn kube_api_errors(&self) -> Option<u64> {
        self.api.as_ref().map(ApiPods::errors)
    }

    /// The pod that has `ip`, from the API (for packets whose socket faultline did not see).
    pub fn attribute_ip(&mut self, ip: &str) -> Option<Attribution> {
        let (uid, p) = self.api.as_ref()?.by_ip(ip)?;
        let mut pod = PodRef {
            namespace: Some(p.namespace),
            name: Some(p.name),
            uid,
            owner: p.owner,
            ips: p.ips,
            labels: p.labels,
            ..Default::default()
        };
        self.known.complete(&mut pod, Instant::now());
        Some(Attribution {
            workload: pod_workload(&pod),
            pod: Some(Arc::new(pod)),
        })
    }

    /// Attribution of a cgroup path: names from the API when it knows the pod, else from the
    /// kubelet's directories; then completed with what was learned of the pod before.
    pub fn attribute_path(&mut self, path: &str) -> Attribution {
        let (api, dir, known) = (&self.api, &mut self.pods, &mut self.known);
        attribute(path, |pod| {
            match api.as_ref().and_then(|a| a.get(&pod.uid)) {
                Some(p) => {
                    pod.container = pod
                        .container_id
                        .as_ref()
                        .and_then(|id| p.containers.get(id).cloned());
                    pod.namespace = Some(p.namespace);
                    pod.name = Some(p.name);
                    pod.owner = p.owner;
                    pod.ips = p.ips;
                    pod.labels = p.labels;
                }
                None => dir.name(pod),
            }
            known.complete(pod, Instant::now());
        })
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// `namespace/name/container`; a pod nothing named is `pod <uid>/...`: its uid is all that
/// tells it from others, and stays its own for its life.
fn pod_workload(p: &PodRef) -> String {
    let pod = match (&p.namespace, &p.name) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        _ => format!("pod {}", p.uid),
    };
    match (&p.container, &p.container_id) {
        (Some(c), _) => format!("{pod}/{c}"),
        (None, Some(id)) => format!("{pod}/{}", &id[..id.len().min(12)]),
        (None, None) => pod,
    }
}

fn dir_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn scan_pods(dir: &Path) -> HashMap<String, (String, String)> {
    dir_names(dir)
        .iter()
        .filter_map(|n| pod_dir_entry(n))
        .collect()
}

/// `pods/<namespace>_<name>_<uid>` (namespaces and names cannot contain `_`): the uid, and
/// the namespace and name.
pub(crate) fn pod_dir_entry(n: &str) -> Option<(String, (String, String))> {
    let mut it = n.splitn(3, '_');
    let (ns, name, uid) = (it.next()?, it.next()?, it.next()?);
    Some((pod_uid(uid)?, (ns.to_owned(), name.to_owned())))
}

fn scan_containers(dir: &Path) -> HashMap<String, String> {
    dir_names(dir)
        .iter()
        .filter_map(|n| container_log_entry(n))
        .collect()
}

/// `containers/<pod>_<namespace>_<container>-<id>.log`: the container id and name.
pub(crate) fn container_log_entry(n: &str) -> Option<(String, String)> {
    let stem = n.strip_suffix(".log")?;
    let (rest, id) = stem.rsplit_once('-')?;
    let container = rest.splitn(3, '_').nth(2)?;
    is_container_id(id).then(|| (id.to_owned(), container.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0d3e2f1a-8b7c-4d6e-9f00-112233445566";
    const CID: &str = "4f8e0c6b1a2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f";

    fn pod(qos: Qos, container: bool, runtime: Option<&'static str>) -> CgroupKind {
        CgroupKind::Pod {
            uid: UID.into(),
            qos,
            container_id: container.then(|| CID.into()),
            runtime,
        }
    }

    #[test]
    fn real_world_paths() {
        let u = UID.replace('-', "_");
        let cases: Vec<(String, CgroupKind)> = vec![
            // systemd driver, containerd, every QoS class
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{CID}.scope"
                ),
                pod(Qos::Burstable, true, Some("containerd")),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope"
                ),
                pod(Qos::BestEffort, true, Some("containerd")),
            ),
            // guaranteed pods have no QoS slice
            (
                format!("/kubepods.slice/kubepods-pod{u}.slice/crio-{CID}.scope"),
                pod(Qos::Guaranteed, true, Some("crio")),
            ),
            (
                format!("/kubepods.slice/kubepods-pod{u}.slice/docker-{CID}.scope"),
                pod(Qos::Guaranteed, true, Some("docker")),
            ),
            // the pod level itself
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"),
                pod(Qos::Burstable, false, None),
            ),
            // cgroupfs driver
            (
                format!("/kubepods/burstable/pod{UID}/{CID}"),
                pod(Qos::Burstable, true, None),
            ),
            (
                format!("/kubepods/besteffort/pod{UID}/{CID}"),
                pod(Qos::BestEffort, true, None),
            ),
            (
                format!("/kubepods/pod{UID}/{CID}"),
                pod(Qos::Guaranteed, true, None),
            ),
            (
                format!("/kubepods/pod{UID}"),
                pod(Qos::Guaranteed, false, None),
            ),
            // nested under a node-level slice (kind, some distributions)
            (
                format!("/kubelet.slice/kubelet-kubepods.slice/kubepods/burstable/pod{UID}/{CID}"),
                pod(Qos::Burstable, true, None),
            ),
            // non-pod cgroups
            (
                "/system.slice/kubelet.service".into(),
                CgroupKind::SystemdUnit("kubelet.service".into()),
            ),
            (
                "/system.slice/containerd.service".into(),
                CgroupKind::SystemdUnit("containerd.service".into()),
            ),
            (
                "/user.slice/user-1000.slice/session-3.scope".into(),
                CgroupKind::UserSession {
                    uid: Some(1000),
                    session: "session-3.scope".into(),
                },
            ),
            ("/".into(), CgroupKind::Root),
            ("".into(), CgroupKind::Root),
            // the QoS level alone, and malformed pod paths: no pod, no panic
            (
                "/kubepods.slice/kubepods-burstable.slice".into(),
                CgroupKind::SystemdUnit("kubepods-burstable.slice".into()),
            ),
            (
                "/kubepods/burstable/podnot-a-uid/x".into(),
                CgroupKind::Other("/kubepods/burstable/podnot-a-uid/x".into()),
            ),
            (
                "/kubepods/pod".into(),
                CgroupKind::Other("/kubepods/pod".into()),
            ),
            (
                "/faultline-test/x".into(),
                CgroupKind::Other("/faultline-test/x".into()),
            ),
            ("//\u{0}/ü".into(), CgroupKind::Other("//\u{0}/ü".into())),
        ];
        for (path, want) in cases {
            assert_eq!(parse_cgroup_path(&path), want, "{path}");
        }
    }

    #[test]
    fn a_container_scope_that_is_not_an_id_leaves_the_container_unknown() {
        let u = UID.replace('-', "_");
        let kind = parse_cgroup_path(&format!(
            "/kubepods.slice/kubepods-pod{u}.slice/crio-conmon-{CID}.scope"
        ));
        assert_eq!(kind, pod(Qos::Guaranteed, false, None));
    }

    #[test]
    fn names_from_kubelet_log_directories() {
        let root = std::env::temp_dir().join(format!("faultline-unit-logs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join(format!("pods/shop_cart-7d9f_{UID}/app"))).expect("test");
        std::fs::create_dir_all(root.join("pods/garbage")).expect("test");
        std::fs::create_dir_all(root.join("containers")).expect("test");
        std::fs::write(
            root.join(format!("containers/cart-7d9f_shop_app-{CID}.log")),
            "",
        )
        .expect("test");
        std::fs::write(root.join("containers/junk.log"), "").expect("test");
        let mut dir = PodDirectory::new(&root);
        let mut named = |path: &str| attribute(path, |p| dir.name(p));
        let a = named(&format!("/kubepods/burstable/pod{UID}/{CID}"));
        assert_eq!(a.workload, "shop/cart-7d9f/app");
        let p = a.pod.expect("test");
        assert_eq!(
            (
                p.namespace.as_deref(),
                p.name.as_deref(),
                p.container.as_deref()
            ),
            (Some("shop"), Some("cart-7d9f"), Some("app"))
        );
        assert_eq!(p.qos, Some(Qos::Burstable));
        // Unknown pod: still a pod, named by uid.
        let other = "11111111-2222-3333-4444-555555555555";
        let a = named(&format!("/kubepods/pod{other}"));
        assert_eq!(a.workload, format!("pod {other}"));
        assert_eq!(
            named("/system.slice/kubelet.service").workload,
            "kubelet.service"
        );
        assert_eq!(
            named("/user.slice/user-0.slice/session-1.scope").workload,
            "session-1.scope (uid 0)"
        );
        std::fs::remove_dir_all(&root).expect("test");
    }

    #[test]
    fn a_pod_nothing_named_is_unknown_and_pod_uid_prefix_never_its_bare_uid() {
        let unnamed = PodRef {
            uid: UID.into(),
            container_id: Some(CID.into()),
            ..Default::default()
        };
        assert_eq!(unnamed.shown_namespace(), "unknown");
        assert_eq!(unnamed.shown_name(), "pod-0d3e2f1a");
        // The filters take what the labels show: the alert's `--pod pod-0d3e2f1a` finds it.
        let filter = |namespace: Option<&str>, pod: Option<&str>| PodFilters {
            namespace: namespace.map(str::to_owned),
            pod: pod.map(str::to_owned),
            container: None,
        };
        assert!(filter(Some("unknown"), Some("pod-0d3e2f1a")).matches(Some(&unnamed)));
        assert!(filter(None, Some("pod-0d3e")).matches(Some(&unnamed)));
        assert!(!filter(Some("shop"), None).matches(Some(&unnamed)));
        assert!(!filter(None, Some(UID)).matches(Some(&unnamed)));
        let named = PodRef {
            namespace: Some("shop".into()),
            name: Some("cart-1".into()),
            ..unnamed.clone()
        };
        assert_eq!(
            (named.shown_namespace(), &*named.shown_name()),
            ("shop", "cart-1")
        );
        assert!(!filter(Some("unknown"), None).matches(Some(&named)));
        // A uid from the API need not be a UUID: no panic on a short or multibyte one.
        let odd = PodRef {
            uid: "ü".into(),
            ..Default::default()
        };
        assert_eq!(odd.shown_name(), "pod-ü");
    }

    /// An attributor whose API knows what the test says, over a kubelet log root.
    fn attributor(logs: &Path, api: &ApiPods) -> Attributor {
        Attributor {
            cgroups: CgroupFs::none(),
            pods: PodDirectory::new(logs),
            api: Some(api.clone()),
            known: KnownPods::new(Instant::now()),
            recent: HashMap::new(),
        }
    }

    #[test]
    fn recent_answers_of_cgroups_gone_are_forgotten_with_their_room() {
        let mut a = Attributor::offline();
        let who = Attribution {
            workload: "w".into(),
            pod: None,
        };
        let old = Instant::now() - REUSE;
        for id in 0..MAX_RECENT as u64 {
            a.recent
                .insert((id, None), (old, Some("/x".into()), who.clone()));
        }
        let room = a.recent.capacity();
        a.recent
            .insert((u64::MAX, None), (Instant::now(), Some("/y".into()), who));
        a.expire();
        assert_eq!(a.recent.len(), 1, "only the last second's answer");
        assert!(a.recent.capacity() < room / 8, "{}", a.recent.capacity());
    }

    #[test]
    fn workload_labels_stay_when_the_api_and_the_log_directories_go() {
        let root =
            std::env::temp_dir().join(format!("faultline-unit-known-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let pod_dir = root.join(format!("pods/shop_cart-7d9f-b_{UID}"));
        std::fs::create_dir_all(&pod_dir).expect("test");
        std::fs::create_dir_all(root.join("containers")).expect("test");
        std::fs::write(
            root.join(format!("containers/cart-7d9f-b_shop_app-{CID}.log")),
            "",
        )
        .expect("test");
        let api = ApiPods::default();
        let mut a = attributor(&root, &api);
        let path = format!("/kubepods/burstable/pod{UID}/{CID}");
        let labels = |a: &mut Attributor| {
            // The directories as they are now (another pod's miss rescans them).
            a.pods.last_scan = None;
            a.pods.rescan_if_due();
            let who = a.attribute_path(&path);
            crate::export::metrics::who(&who.workload, who.pod.as_deref())
        };
        let expect = |workload: &str| {
            crate::export::metrics::WhoLabels::from(["shop", "cart-7d9f-b", "app", workload])
        };
        // The API has not told of the pod yet: the kubelet's directories name it.
        assert_eq!(labels(&mut a), expect("shop/cart-7d9f-b/app"));
        // The API names it, with its owner: the owner is its workload from now on...
        let from_api = crate::attribution::kubeapi::ApiPod {
            namespace: "shop".into(),
            name: "cart-7d9f-b".into(),
            containers: [(CID.to_owned(), "app".to_owned())].into(),
            owner: Some(Owner {
                kind: "Deployment".into(),
                name: "cart".into(),
            }),
            ..Default::default()
        };
        api.set(UID, Some(from_api));
        assert_eq!(labels(&mut a), expect("Deployment/cart"));
        // ...when the API forgets the pod (deleted, a relist without it, a restart)...
        api.set(UID, None);
        assert_eq!(labels(&mut a), expect("Deployment/cart"));
        // ...and when its log directory is removed before its cgroup: nothing flaps back.
        std::fs::remove_dir_all(&pod_dir).expect("test");
        assert_eq!(labels(&mut a), expect("Deployment/cart"));
        // Nor when the container's log file goes too: the container keeps its name.
        std::fs::remove_dir_all(root.join("containers")).expect("test");
        assert_eq!(labels(&mut a), expect("Deployment/cart"));
        std::fs::remove_dir_all(&root).expect("test");
    }
}
