//! Kubernetes integration, by concern:
//! - `watch`: the node's pods from the API server (kube runtime watcher,
//!   scoped to `spec.nodeName`), kept in a `PodCache`;
//! - `binding`: which AgentPolicy selects a pod (`spec.identity.kubernetes`)
//!   and its SPIFFE ID;
//! - `cgroups`: a pod's and its containers' cgroup v2 directories
//!   (containerd / CRI-O, systemd / cgroupfs drivers);
//! - `crd`: the `AgentPolicy` CRD, generated from the policy types.
//!
//! Not wired into the daemon yet: the daemon binds static cgroup paths and
//! reads policies from files.
pub mod binding;
pub mod cgroups;
pub mod crd;
pub mod watch;

#[cfg(test)]
mod deploy_tests;
