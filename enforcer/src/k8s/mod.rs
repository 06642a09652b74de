//! Kubernetes integration: mapping pods and their containers onto the cgroup
//! v2 directories the enforcer binds (`cgroups`). The pod watcher that fills
//! these types from Pod objects lives elsewhere; nothing here talks to the
//! API server.
pub mod cgroups;
