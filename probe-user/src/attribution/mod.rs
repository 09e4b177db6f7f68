//! Who an event belongs to: `cgroups` (ids to paths, limits, the hierarchies), `pods` (cgroup
//! paths and the kubelet's log directories to pods and workloads), `kubeapi` (names, owners
//! and labels from the Kubernetes API), `known` (what they said of each pod, kept for its
//! life), `netns` (network namespaces to pods).

pub mod cgroups;
pub mod known;
pub mod kubeapi;
pub mod netns;
pub mod pods;
