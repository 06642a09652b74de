//! Kubernetes integration, by concern:
//! - `watch`: the node's pods from the API server (kube runtime watcher,
//!   scoped to `spec.nodeName`), kept in a `PodCache`;
//! - `binding`: which AgentPolicy selects a pod (`spec.identity.kubernetes`)
//!   and its SPIFFE ID;
//! - `cgroups`: a pod's and its containers' cgroup v2 directories
//!   (containerd / CRI-O, systemd / cgroupfs drivers);
//! - `crd`: the `AgentPolicy` CRD, generated from the policy types, and the
//!   policy an object declares (`object_policy`: identity name
//!   `<namespace>/<name>`, only pods of the object's own namespace);
//! - `policies`: the cluster's `AgentPolicy` objects (watcher, all
//!   namespaces, kept in a `PolicyCache`) and the status and events the
//!   daemon writes about them;
//! - `cache`: the by-UID cache both watchers keep (relist replaces it).
//!
//! The daemon's `kubernetes:` mode uses all of them: policies come from the
//! policy files (e.g. a ConfigMap) and from `AgentPolicy` objects
//! (`kubernetes.agentPolicies`, default on); each pod of its node that an
//! active policy selects has its pod-level cgroup bound to that policy
//! (released when the pod goes).
pub mod binding;
pub mod cache;
pub mod cgroups;
pub mod crd;
pub mod policies;
pub mod watch;

#[cfg(test)]
mod deploy_tests;
#[cfg(test)]
mod mock_api;
