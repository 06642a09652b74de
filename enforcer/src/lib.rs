//! enforcer: kernel-level egress enforcement for AI-agent workloads.
//!
//! Data flows one way: policy files (`policy/`) + workload bindings
//! (`daemon/`, `run`) -> compiled tables (`policy::compile`) -> BPF maps
//! (`kernel/`) -> kernel verdicts -> ring buffer (`events/`) -> audit log
//! (`audit`) and metrics (`metrics`).
pub mod audit;
pub mod audit_tail;
pub mod daemon;
pub mod dns;
pub mod dns_bridge;
pub mod events;
pub mod k8s;
pub mod kernel;
pub mod metrics;
pub mod netns;
pub mod ocsf;
pub mod policy;
pub mod run;
pub mod sandbox;

#[cfg(test)]
mod architecture_tests;
