//! What the sources said of each pod on the node, kept for the pod's life: its namespace and
//! name (which never change for a uid), its containers' names (by container id) and the owner
//! the Kubernetes API gave first. A pod's labels then do not change when a source goes: the
//! API down or restarted, the pod deleted from the API or its log directories removed before
//! its cgroups are. A pod nothing ever named is not remembered (there is nothing to keep), so
//! cgroups made up to look like pods cost no memory here.
//!
//! An entry is forgotten [`FORGET_AFTER`] after the pod was last attributed: a pod with tasks
//! is attributed at every refresh, so that is as long after its cgroup went, as its series
//! are. At most [`MAX_PODS`] are kept, the least recently attributed dropped first.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::attribution::{kubeapi::Owner, pods::PodRef};

/// How long a pod not attributed is remembered (the series of a workload gone from the node
/// are dropped as long after their last update).
const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// How often forgotten pods are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// Pods remembered at once: a node runs a few hundred at most, with the churn of 15 minutes.
const MAX_PODS: usize = 4096;
/// Container names remembered per pod, the oldest dropped first: a pod's containers and the
/// last restarts of each (a restart is a new container id).
const MAX_CONTAINERS: usize = 8;

/// One pod's names and owner.
#[derive(Debug)]
struct Known {
    namespace: String,
    name: String,
    /// The first owner the API gave: kept when the API forgets the pod or gives another.
    owner: Option<Owner>,
    containers: Vec<KnownContainer>,
    seen: Instant,
}

/// A container's name, as a source gave it for its id.
#[derive(Debug)]
struct KnownContainer {
    id: String,
    name: String,
}

impl Known {
    /// Learns the container's name where a source gave it; gives it where none did.
    fn complete_container(&mut self, pod: &mut PodRef) {
        let Some(id) = &pod.container_id else {
            return;
        };
        match &pod.container {
            Some(name) => {
                if self.containers.iter().any(|c| &c.id == id) {
                    return;
                }
                if self.containers.len() >= MAX_CONTAINERS {
                    self.containers.remove(0);
                }
                self.containers.push(KnownContainer {
                    id: id.clone(),
                    name: name.clone(),
                });
            }
            None => {
                pod.container = self
                    .containers
                    .iter()
                    .find(|c| &c.id == id)
                    .map(|c| c.name.clone());
            }
        }
    }
}

/// Pods by uid.
#[derive(Debug)]
pub struct KnownPods {
    pods: HashMap<String, Known>,
    last_sweep: Instant,
}

impl KnownPods {
    pub fn new(now: Instant) -> Self {
        KnownPods {
            pods: HashMap::new(),
            last_sweep: now,
        }
    }

    /// Completes `pod` (as the sources name it now) with what was learned of it before, and
    /// learns what it says: names the sources no longer give are kept, and the first owner
    /// the API gave stays the pod's owner.
    pub fn complete(&mut self, pod: &mut PodRef, now: Instant) {
        self.sweep_if_due(now);
        if let Some(known) = self.pods.get_mut(&pod.uid) {
            known.seen = now;
            pod.namespace = Some(known.namespace.clone());
            pod.name = Some(known.name.clone());
            match (&known.owner, &pod.owner) {
                (Some(first), _) => pod.owner = Some(first.clone()),
                (None, Some(learned)) => known.owner = Some(learned.clone()),
                (None, None) => {}
            }
            known.complete_container(pod);
            return;
        }
        let (Some(namespace), Some(name)) = (&pod.namespace, &pod.name) else {
            return;
        };
        if self.pods.len() >= MAX_PODS {
            self.drop_least_recent();
        }
        let mut known = Known {
            namespace: namespace.clone(),
            name: name.clone(),
            owner: pod.owner.clone(),
            containers: Vec::new(),
            seen: now,
        };
        known.complete_container(pod);
        self.pods.insert(pod.uid.clone(), known);
    }

    fn sweep_if_due(&mut self, now: Instant) {
        if now.saturating_duration_since(self.last_sweep) < SWEEP_EVERY {
            return;
        }
        self.last_sweep = now;
        self.pods
            .retain(|_, k| now.saturating_duration_since(k.seen) <= FORGET_AFTER);
        crate::memory::shrink(&mut self.pods);
    }

    /// Makes room: the least recently attributed quarter goes (one sort per quarter of the
    /// bound, not one scan per new pod).
    fn drop_least_recent(&mut self) {
        let mut seen: Vec<Instant> = self.pods.values().map(|k| k.seen).collect();
        seen.sort_unstable();
        let Some(&cut) = seen.get(seen.len() / 4) else {
            return;
        };
        self.pods.retain(|_, k| k.seen > cut);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.pods.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(uid: &str, owner: Option<(&str, &str)>) -> PodRef {
        PodRef {
            namespace: Some("shop".into()),
            name: Some(format!("cart-{uid}")),
            uid: uid.into(),
            owner: owner.map(|(kind, name)| Owner {
                kind: kind.into(),
                name: name.into(),
            }),
            ..Default::default()
        }
    }

    fn unnamed(uid: &str) -> PodRef {
        PodRef {
            uid: uid.into(),
            ..Default::default()
        }
    }

    #[test]
    fn names_and_the_first_owner_outlive_their_sources() {
        let t0 = Instant::now();
        let mut known = KnownPods::new(t0);
        // Named by the log directories first (no owner), then by the API.
        known.complete(&mut named("a", None), t0);
        let mut from_api = named("a", Some(("Deployment", "cart")));
        known.complete(&mut from_api, t0);
        // The API gone and the log directory removed: the same names and owner.
        let mut later = unnamed("a");
        known.complete(&mut later, t0 + Duration::from_secs(5));
        assert_eq!(later, from_api);
        // Another owner later (an adoption, a bad answer): the first stays.
        let mut adopted = named("a", Some(("ReplicaSet", "other")));
        known.complete(&mut adopted, t0 + Duration::from_secs(6));
        assert_eq!(adopted.owner, from_api.owner);
        // What nothing named is not remembered, and stays unnamed.
        let mut stranger = unnamed("b");
        known.complete(&mut stranger, t0);
        assert_eq!(stranger, unnamed("b"));
        assert_eq!(known.len(), 1);
    }

    fn in_container(mut pod: PodRef, id: &str, name: Option<&str>) -> PodRef {
        pod.container_id = Some(id.into());
        pod.container = name.map(Into::into);
        pod
    }

    #[test]
    fn container_names_outlive_their_log_files_and_the_bound_holds() {
        let t0 = Instant::now();
        let mut known = KnownPods::new(t0);
        known.complete(&mut in_container(named("a", None), "c1", Some("app")), t0);
        // The container's log file removed (or the API gone): the same container name.
        let mut later = in_container(unnamed("a"), "c1", None);
        known.complete(&mut later, t0);
        assert_eq!(later.container.as_deref(), Some("app"));
        // Another container of the pod, named later: both known.
        known.complete(&mut in_container(unnamed("a"), "c2", Some("sidecar")), t0);
        let mut first = in_container(unnamed("a"), "c1", None);
        known.complete(&mut first, t0);
        assert_eq!(first.container.as_deref(), Some("app"));
        // A container id nothing named stays unnamed.
        let mut stranger = in_container(unnamed("a"), "c9", None);
        known.complete(&mut stranger, t0);
        assert_eq!(stranger.container, None);
        // Restart after restart: the most recent are kept, no more than the bound.
        for i in 0..MAX_CONTAINERS * 3 {
            let id = format!("r{i}");
            known.complete(&mut in_container(unnamed("a"), &id, Some("app")), t0);
        }
        assert_eq!(known.pods["a"].containers.len(), MAX_CONTAINERS);
        let last = format!("r{}", MAX_CONTAINERS * 3 - 1);
        let mut restarted = in_container(unnamed("a"), &last, None);
        known.complete(&mut restarted, t0);
        assert_eq!(restarted.container.as_deref(), Some("app"));
    }

    #[test]
    fn a_pod_not_attributed_for_long_is_forgotten_and_the_bound_holds() {
        let t0 = Instant::now();
        let mut known = KnownPods::new(t0);
        known.complete(&mut named("old", None), t0);
        known.complete(&mut named("busy", None), t0);
        // `busy` is attributed at every refresh; `old` no more.
        let mut t = t0;
        while t < t0 + FORGET_AFTER + 2 * SWEEP_EVERY {
            t += Duration::from_secs(5);
            known.complete(&mut unnamed("busy"), t);
        }
        let mut old = unnamed("old");
        known.complete(&mut old, t);
        assert_eq!(old.name, None, "forgotten");
        let mut busy = unnamed("busy");
        known.complete(&mut busy, t);
        assert_eq!(busy.name.as_deref(), Some("cart-busy"));

        let mut known = KnownPods::new(t0);
        for i in 0..MAX_PODS * 3 {
            let at = t0 + Duration::from_millis(i as u64);
            known.complete(&mut named(&i.to_string(), None), at);
            assert!(known.len() <= MAX_PODS);
        }
        // The most recent are kept.
        let mut last = unnamed(&(MAX_PODS * 3 - 1).to_string());
        known.complete(&mut last, t0);
        assert!(last.name.is_some());
        // Every one of them gone for long: forgotten, and the room they took returned.
        let later = t0 + FORGET_AFTER + 2 * SWEEP_EVERY + Duration::from_secs(10);
        known.complete(&mut unnamed("x"), later);
        assert_eq!(known.len(), 0);
        assert!(known.pods.capacity() <= 64, "{}", known.pods.capacity());
    }
}
