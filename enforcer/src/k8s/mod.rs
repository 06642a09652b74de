//! Kubernetes: which pods are agents (binding), where their cgroups are.
pub mod binding;
