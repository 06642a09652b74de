//! enforcer: kernel-level egress enforcement for AI-agent workloads.
//!
//! Data flows one way: policy (`policy/`) + workload discovery -> compiled
//! tables -> BPF maps (`kernel/`) -> kernel verdicts -> ring buffer
//! (`events/`) -> audit log (`audit`) and metrics (`metrics`).
#![allow(dead_code)]
mod audit;
mod events;
mod metrics;

fn main() {}
