//! Daemon configuration (YAML). Unknown fields are errors, with line:column.
//!
//! ```yaml
//! policiesDir: /etc/enforcer/policies      # *.yaml / *.yml AgentPolicy files
//! bindings:                                # static cgroup -> policy bindings
//!   - cgroup: agents/research              # absolute, or relative to the cgroup2 mount
//!     policy: research-agent               # metadata.name of an AgentPolicy
//! metricsAddr: 127.0.0.1:9090              # /metrics and /healthz
//! auditLog: /var/log/enforcer/audit.jsonl
//! auditFormat: json                        # json (default) | ocsf: OCSF 1.3.0 events, same hash chain
//! pinDir: /sys/fs/bpf/enforcer             # bpffs: maps and links pinned here
//! controlSocket: /run/enforcer/enforcer.sock
//! stateDir: /run/enforcer                  # identity slot table (survives daemon restarts)
//! allowEvents: 1                           # allowed decisions in the audit log: 1 all, as flow records (default), 0 counted only, N ~1 in N as records
//! allowDegraded: false                     # no BPF LSM: run file policies' network part only
//! resyncSeconds: 2                         # periodic reconcile (bindings that did not exist yet)
//! resolverSockets: [/run/systemd/resolve/io.systemd.Resolve, ...]  # resolver IPC sockets agents may never reach (default: resolved's varlink + nscd, /run and /var/run)
//! kubernetes:                              # optional: bind this node's pods (DaemonSet)
//!   nodeName: node-a                       # default: $NODE_NAME (downward API)
//!   trustDomain: cluster.local             # SPIFFE trust domain of derived IDs
//!   kubeletCgroupRoot: /kubelet            # the kubelet's --cgroup-root, if any
//!   apiServer: https://10.0.0.1:443        # default: in-cluster config / kubeconfig
//!   agentPolicies: true                    # also read AgentPolicy objects (default true)
//! ```
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    pub policies_dir: PathBuf,
    #[serde(default)]
    pub bindings: Vec<Binding>,
    #[serde(default)]
    pub metrics_addr: Option<SocketAddr>,
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    /// How `auditLog` records are written: `json` (default) or `ocsf`.
    #[serde(default)]
    pub audit_format: crate::audit::AuditFormat,
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Small daemon state that must survive a restart (identity slots).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_allow_events")]
    pub allow_events: u32,
    /// On a kernel without BPF LSM, enforce the network part of policies that
    /// use `files:`/`onTaint:` instead of rejecting them (said everywhere).
    #[serde(default)]
    pub allow_degraded: bool,
    /// Seconds between periodic reconciles (bound cgroups that did not
    /// exist yet, file rule paths, pods whose cgroup is not watched). Pod
    /// events, policy changes and a selected pod's cgroup appearing trigger
    /// a reconcile at once.
    #[serde(default = "default_resync_seconds")]
    pub resync_seconds: u64,
    /// Resolver IPC sockets no agent may connect or send to (resolving
    /// through one would bypass the DNS proxy); `spec.local` cannot list
    /// one. Empty (the default): systemd-resolved's varlink sockets and
    /// nscd's (`policy::local::DEFAULT_RESOLVER_SOCKETS`). Needs Linux >= 6.7.
    #[serde(default)]
    pub resolver_sockets: Vec<PathBuf>,
    /// Kubernetes mode: watch this node's pods and bind those an
    /// AgentPolicy selects (`spec.identity.kubernetes`).
    #[serde(default)]
    pub kubernetes: Option<KubernetesConfig>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubernetesConfig {
    /// Default: the `NODE_NAME` environment variable.
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    #[serde(default)]
    pub kubelet_cgroup_root: Option<PathBuf>,
    /// API server URL; default: in-cluster service account, else kubeconfig.
    #[serde(default)]
    pub api_server: Option<String>,
    /// Watch `AgentPolicy` objects (all namespaces) and enforce them next
    /// to the policy files. Default true; false for clusters without the CRD.
    #[serde(default = "default_true")]
    pub agent_policies: bool,
}

fn default_true() -> bool {
    true
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    pub cgroup: PathBuf,
    pub policy: String,
}

fn default_resync_seconds() -> u64 {
    2
}

fn default_allow_events() -> u32 {
    1
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/enforcer")
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/run/enforcer")
}

fn default_control_socket() -> PathBuf {
    PathBuf::from(super::DEFAULT_CONTROL_SOCKET)
}

impl Config {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading daemon config {}", path.display()))?;
        let mut cfg = Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        // Relative paths in the config are relative to the config file.
        let base = path.parent().unwrap_or(Path::new("."));
        if cfg.policies_dir.is_relative() {
            cfg.policies_dir = base.join(&cfg.policies_dir);
        }
        if cfg.state_dir.is_relative() {
            cfg.state_dir = base.join(&cfg.state_dir);
        }
        if let Some(a) = &cfg.audit_log {
            if a.is_relative() {
                cfg.audit_log = Some(base.join(a));
            }
        }
        Ok(cfg)
    }

    pub fn parse(text: &str) -> Result<Self> {
        let cfg: Config = serde_saphyr::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut seen = std::collections::HashSet::new();
        for b in &cfg.bindings {
            if !seen.insert(&b.cgroup) {
                bail!("bindings: cgroup {} is bound twice", b.cgroup.display());
            }
        }
        if cfg.resync_seconds == 0 {
            bail!("resyncSeconds: must be at least 1");
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_config() {
        let c = Config::parse(
            "policiesDir: /p\nbindings:\n  - cgroup: agents/a\n    policy: a\n\
             metricsAddr: 127.0.0.1:9090\nauditLog: /tmp/a.jsonl\npinDir: /sys/fs/bpf/x\n\
             controlSocket: /tmp/s.sock\nallowEvents: 1\n",
        )
        .unwrap();
        assert_eq!(c.bindings.len(), 1);
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(c.allow_events, 1);
    }

    #[test]
    fn defaults() {
        let c = Config::parse("policiesDir: /p\n").unwrap();
        assert_eq!(c.pin_dir, PathBuf::from("/sys/fs/bpf/enforcer"));
        assert!(c.bindings.is_empty());
        assert_eq!(c.allow_events, 1);
        assert_eq!(c.resync_seconds, 2);
        let e = Config::parse("policiesDir: /p\nresyncSeconds: 0\n").unwrap_err();
        assert!(e.to_string().contains("resyncSeconds"), "{e}");
    }

    #[test]
    fn audit_format() {
        use crate::audit::AuditFormat;
        let c = Config::parse("policiesDir: /p\n").unwrap();
        assert_eq!(c.audit_format, AuditFormat::Json);
        let c = Config::parse("policiesDir: /p\nauditFormat: ocsf\n").unwrap();
        assert_eq!(c.audit_format, AuditFormat::Ocsf);
        let e = Config::parse("policiesDir: /p\nauditFormat: xml\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("xml") && e.contains("ocsf"), "{e}");
    }

    #[test]
    fn unknown_field_is_an_error_with_location() {
        let e = Config::parse("policiesDir: /p\nbogus: 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        assert!(e.contains('2'), "line expected: {e}");
    }

    #[test]
    fn duplicate_binding_is_an_error() {
        let e = Config::parse(
            "policiesDir: /p\nbindings:\n  - {cgroup: a, policy: x}\n  - {cgroup: a, policy: y}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("bound twice"), "{e}");
    }

    #[test]
    fn agent_policies_default_on_in_kubernetes_mode() {
        let c = Config::parse("policiesDir: /p\nkubernetes: {nodeName: n}\n").unwrap();
        assert!(c.kubernetes.unwrap().agent_policies);
        let c = Config::parse("policiesDir: /p\nkubernetes: {nodeName: n, agentPolicies: false}\n")
            .unwrap();
        assert!(!c.kubernetes.unwrap().agent_policies);
    }
}
