//! Kubernetes integration.
pub mod crd;

#[cfg(test)]
mod deploy_tests;
