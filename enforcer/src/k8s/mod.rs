//! Kubernetes integration.
pub mod crd;
