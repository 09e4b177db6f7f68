//! Pod names from the Kubernetes API, when there is one: a node-scoped watch of pods
//! (field selector `spec.nodeName`) giving namespace, name, container names by id, the owning
//! workload (Deployment from the ReplicaSet's pod-template-hash; CronJob through the Job and
//! other ReplicaSets with a read of the owner, where RBAC allows it; StatefulSet, DaemonSet),
//! pod IPs and allow-listed labels. Without the API, or while it fails, attribution keeps
//! working from the kubelet's directories; each change of state is said once, not per event.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use futures_util::StreamExt as _;
use k8s_openapi::{
    api::{apps::v1::ReplicaSet, batch::v1::Job, core::v1::Pod},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use serde::Serialize;

/// What the API knows about one pod on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApiPod {
    pub namespace: String,
    pub name: String,
    /// container id (without the `containerd://` prefix) -> container name
    pub containers: HashMap<String, String>,
    pub owner: Option<Owner>,
    pub ips: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

/// The workload that owns a pod, e.g. `Deployment/web`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Owner {
    pub kind: String,
    pub name: String,
}

/// Pods on this node by uid, kept current by the watch.
#[derive(Clone, Default)]
pub struct ApiPods {
    pods: Arc<RwLock<HashMap<String, ApiPod>>>,
    /// Failed requests of the watch since the start (`faultline_kube_api_errors_total`).
    errors: Arc<AtomicU64>,
}

impl ApiPods {
    /// The watch's failed requests since the start.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    pub fn get(&self, uid: &str) -> Option<ApiPod> {
        self.pods.read().ok()?.get(uid).cloned()
    }

    /// What a watch event does to the store: a pod added or changed (`Some`), or deleted.
    #[cfg(test)]
    pub(crate) fn set(&self, uid: &str, pod: Option<ApiPod>) {
        if let Ok(mut store) = self.pods.write() {
            match pod {
                Some(p) => store.insert(uid.to_owned(), p),
                None => store.remove(uid),
            };
        }
    }

    /// The one pod with this IP (uid, pod); none when no pod or several have it (pods on the
    /// host network share the node's IP).
    pub fn by_ip(&self, ip: &str) -> Option<(String, ApiPod)> {
        let pods = self.pods.read().ok()?;
        let mut matching = pods.iter().filter(|(_, p)| p.ips.iter().any(|i| i == ip));
        let (uid, pod) = matching.next()?;
        matching
            .next()
            .is_none()
            .then(|| (uid.clone(), pod.clone()))
    }
}

/// Where to find the API and what to keep.
#[derive(Clone, Debug)]
pub struct ApiOptions {
    /// A kubeconfig; without one, the in-cluster service account (or $KUBECONFIG,
    /// ~/.kube/config) is used when present.
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
    pub labels: Vec<String>,
}

/// Starts the watch in the background. Returns `None`, after saying why once, when no API is
/// configured at all.
pub async fn start(options: ApiOptions) -> Option<ApiPods> {
    let config = match &options.kubeconfig {
        Some(path) => match Kubeconfig::read_from(path) {
            Ok(kc) => Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
        None if !api_configured() => {
            tracing::info!(
                "no Kubernetes API configured (not in a pod, no kubeconfig): pod names come from the kubelet's log directories"
            );
            return None;
        }
        None => Config::infer().await.map_err(|e| e.to_string()),
    };
    let client = match config.and_then(|c| {
        let endpoint = c.cluster_url.to_string();
        Client::try_from(c)
            .map(|client| (client, endpoint))
            .map_err(|e| e.to_string())
    }) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(
                "no Kubernetes API ({e}); pod names come from the kubelet's log directories"
            );
            return None;
        }
    };
    let (client, endpoint) = client;
    let pods = ApiPods::default();
    tokio::spawn(watch(client, endpoint, options, pods.clone()));
    Some(pods)
}

/// A client of the API at `kubeconfig`, else in the pod's (or `$KUBECONFIG`'s); why not, in
/// words, when neither is there.
pub async fn client(kubeconfig: Option<&PathBuf>) -> Result<Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| e.to_string())?
        }
        None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none()
            && std::env::var_os("KUBECONFIG").is_none() =>
        {
            return Err("no Kubernetes API configured (not in a pod, no --kubeconfig)".to_owned());
        }
        None => Config::infer().await.map_err(|e| e.to_string())?,
    };
    Client::try_from(config).map_err(|e| e.to_string())
}

/// Whether any way to the API is set up: in a pod (the service's environment), `$KUBECONFIG`
/// or `~/.kube/config`. Without one, trying is pointless and its error chain is noise.
fn api_configured() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        || std::env::var_os("KUBECONFIG").is_some()
        || std::env::var_os("HOME")
            .is_some_and(|h| std::path::Path::new(&h).join(".kube/config").exists())
}

/// Keeps `pods` current; says once when the API at `endpoint` stops answering and once when
/// it answers again, and counts every failure.
async fn watch(client: Client, endpoint: String, options: ApiOptions, pods: ApiPods) {
    let api: Api<Pod> = Api::all(client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", options.node_name));
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut owners = OwnerCache::new(client);
    let mut relist: Option<HashMap<String, ApiPod>> = None;
    let mut healthy: Option<bool> = None;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            // 410 Gone: the watch fell too far behind; the watcher relists by itself.
            Err(watcher::Error::WatchError(status)) if status.code == 410 => continue,
            Err(e) => {
                pods.errors.fetch_add(1, Ordering::Relaxed);
                if healthy != Some(false) {
                    tracing::warn!(
                        "Kubernetes API at {endpoint} unreachable ({e}): pods are named from the kubelet's log directories (no owners, IPs or labels) until it answers"
                    );
                    healthy = Some(false);
                }
                continue;
            }
        };
        // `Init` only means a relist is being tried; data means the API answered.
        if !matches!(event, watcher::Event::Init) && healthy != Some(true) {
            if healthy == Some(false) {
                tracing::info!(
                    "Kubernetes API at {endpoint} answers again: pods are named from it"
                );
            }
            healthy = Some(true);
        }
        match event {
            watcher::Event::Init => relist = Some(HashMap::new()),
            watcher::Event::InitApply(pod) => {
                if let (Some(buffer), Some((uid, p))) = (
                    relist.as_mut(),
                    convert(&pod, &options.labels, &mut owners).await,
                ) {
                    buffer.insert(uid, p);
                }
            }
            watcher::Event::InitDone => {
                // A relist replaces everything: pods deleted while the watch was down go.
                if let (Some(buffer), Ok(mut store)) = (relist.take(), pods.pods.write()) {
                    *store = buffer;
                }
            }
            watcher::Event::Apply(pod) => {
                if let Some((uid, p)) = convert(&pod, &options.labels, &mut owners).await
                    && let Ok(mut store) = pods.pods.write()
                {
                    store.insert(uid, p);
                }
            }
            watcher::Event::Delete(pod) => {
                if let (Some(uid), Ok(mut store)) = (pod.metadata.uid.as_ref(), pods.pods.write()) {
                    store.remove(uid);
                }
            }
        }
    }
}

/// Converts a Pod object, resolving its owner through the API where one level is not enough.
async fn convert(
    pod: &Pod,
    labels: &[String],
    owners: &mut OwnerCache,
) -> Option<(String, ApiPod)> {
    let meta = &pod.metadata;
    let uid = meta.uid.clone()?;
    let namespace = meta.namespace.clone().unwrap_or_default();
    let status = pod.status.as_ref();
    let containers = status
        .into_iter()
        .flat_map(|s| {
            s.container_statuses
                .iter()
                .flatten()
                .chain(s.init_container_statuses.iter().flatten())
                .chain(s.ephemeral_container_statuses.iter().flatten())
        })
        .filter_map(|c| {
            let id = c.container_id.as_deref()?;
            let id = id.split_once("://").map_or(id, |(_, id)| id);
            Some((id.to_owned(), c.name.clone()))
        })
        .collect();
    let ips = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().map(|ip| ip.ip.clone()).collect())
        .unwrap_or_default();
    let owner = match controller(meta.owner_references.as_deref()) {
        Some(o) => Some(match deployment_of(o, meta.labels.as_ref()) {
            Some(d) => d,
            None => owners.resolve(&namespace, o).await,
        }),
        None => None,
    };
    let labels = meta
        .labels
        .iter()
        .flatten()
        .filter(|(k, _)| labels.iter().any(|l| l == *k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Some((
        uid,
        ApiPod {
            namespace,
            name: meta.name.clone().unwrap_or_default(),
            containers,
            owner,
            ips,
            labels,
        },
    ))
}

/// A Deployment's ReplicaSet is named `<deployment>-<pod-template-hash>` and its pods carry
/// that hash as a label: the Deployment is known without reading the ReplicaSet (so the
/// ClusterRole needs pods only).
fn deployment_of(
    owner: &OwnerReference,
    labels: Option<&BTreeMap<String, String>>,
) -> Option<Owner> {
    let hash = labels?.get("pod-template-hash")?;
    let name = owner.name.strip_suffix(hash.as_str())?.strip_suffix('-')?;
    (owner.kind == "ReplicaSet" && !name.is_empty()).then(|| Owner {
        kind: "Deployment".to_owned(),
        name: name.to_owned(),
    })
}

fn controller(refs: Option<&[OwnerReference]>) -> Option<&OwnerReference> {
    refs?.iter().find(|r| r.controller == Some(true))
}

/// ReplicaSet -> Deployment and Job -> CronJob, looked up once per ReplicaSet or Job.
struct OwnerCache {
    client: Client,
    resolved: HashMap<(String, String, String), Owner>,
}

/// Bound on remembered ReplicaSets and Jobs (a node has far fewer).
const MAX_OWNERS: usize = 10_000;

impl OwnerCache {
    fn new(client: Client) -> Self {
        OwnerCache {
            client,
            resolved: HashMap::new(),
        }
    }

    async fn resolve(&mut self, namespace: &str, r: &OwnerReference) -> Owner {
        let direct = Owner {
            kind: r.kind.clone(),
            name: r.name.clone(),
        };
        if r.kind != "ReplicaSet" && r.kind != "Job" {
            return direct;
        }
        let key = (namespace.to_owned(), r.kind.clone(), r.name.clone());
        if let Some(o) = self.resolved.get(&key) {
            return o.clone();
        }
        let parent = if r.kind == "ReplicaSet" {
            Api::<ReplicaSet>::namespaced(self.client.clone(), namespace)
                .get_opt(&r.name)
                .await
                .map(|rs| {
                    rs.and_then(|rs| controller(rs.metadata.owner_references.as_deref()).cloned())
                })
        } else {
            Api::<Job>::namespaced(self.client.clone(), namespace)
                .get_opt(&r.name)
                .await
                .map(|job| {
                    job.and_then(|job| {
                        controller(job.metadata.owner_references.as_deref()).cloned()
                    })
                })
        };
        // An API error is not an answer: try again for the next pod of that owner.
        let Ok(parent) = parent else { return direct };
        let owner = parent.map_or(direct, |p| Owner {
            kind: p.kind,
            name: p.name,
        });
        if self.resolved.len() >= MAX_OWNERS {
            self.resolved.clear();
        }
        self.resolved.insert(key, owner.clone());
        owner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rs(name: &str) -> OwnerReference {
        OwnerReference {
            kind: "ReplicaSet".into(),
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn deployment_from_the_pod_template_hash() {
        let labels: BTreeMap<String, String> =
            [("pod-template-hash".to_owned(), "7d9f8b".to_owned())].into();
        assert_eq!(
            deployment_of(&rs("web-api-7d9f8b"), Some(&labels)),
            Some(Owner {
                kind: "Deployment".into(),
                name: "web-api".into()
            })
        );
        // A ReplicaSet of its own (no matching hash), or no labels: unknown here.
        assert_eq!(deployment_of(&rs("standalone"), Some(&labels)), None);
        assert_eq!(deployment_of(&rs("web-api-7d9f8b"), None), None);
        assert_eq!(deployment_of(&rs("-7d9f8b"), Some(&labels)), None);
    }
}
