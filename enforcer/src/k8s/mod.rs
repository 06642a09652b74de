//! Kubernetes: which pods are agents (binding), the node's pods (watch).
pub mod binding;
pub mod watch;
