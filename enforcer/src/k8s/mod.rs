//! Kubernetes integration, by concern:
//! - `watch`: the node's pods from the API server (kube runtime watcher,
//!   scoped to `spec.nodeName`), kept in a `PodCache`;
//! - `binding`: which AgentPolicy selects a pod (`spec.identity.kubernetes`)
//!   and its SPIFFE ID;
//! - `cgroups`: a pod's and its containers' cgroup v2 directories
//!   (containerd / CRI-O, systemd / cgroupfs drivers);
//! - `crd`: the `AgentPolicy` CRD, generated from the policy types.
//!
//! The daemon's `kubernetes:` mode uses `watch`, `binding` and `cgroups`:
//! each pod of its node that an active policy selects has its pod-level
//! cgroup bound to that policy (released when the pod goes). Policies still
//! come from files (e.g. a ConfigMap); reading `AgentPolicy` objects (the
//! CRD) is not wired yet.
pub mod binding;
pub mod cgroups;
pub mod crd;
pub mod watch;

#[cfg(test)]
mod deploy_tests;
