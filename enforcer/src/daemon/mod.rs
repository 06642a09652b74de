//! `enforcer daemon --config FILE`: the node daemon.
//!
//! Reconcile loop: policy sources + static bindings (config) + (Kubernetes
//! mode) the node's pods -> compiled tables -> kernel. Runs at start, on
//! SIGHUP, on any change in the policies directory (inotify, debounced), on
//! a change of the node's pods or of the `AgentPolicy` objects, when a
//! selected pod's cgroup appears, and every `resyncSeconds` (for bound
//! cgroups that did not exist yet, and `files:` paths that did not).
//!
//! Policy sources ([`Source`]): the files of the policies directory and, in
//! Kubernetes mode with `agentPolicies` (default), the cluster's
//! `AgentPolicy` objects (`k8s::policies`). Both go through one path:
//! validate (an object: the file validator on its spec, then the namespace
//! rule of `k8s::crd::object_policy`) -> check -> compile -> BPF LSM gate ->
//! install. An object's identity is `<namespace>/<name>`; it only selects
//! pods of its own namespace. Files come first: a name two sources define
//! stays with the first one (an object's name cannot be a file policy's).
//!
//! Reload semantics: each source is validated on its own. A source with any
//! error is rejected as a whole, reported (log, audit record,
//! `enforcer_policy_reloads_total{result="rejected"}`, `enforcer status`;
//! an object also in its status and an Event) and the policies it held
//! before stay in force (an object: the version last accepted for its UID).
//! Valid changes replace an identity's tables atomically (see `kernel`). A
//! policy that disappears (file removed, object deleted) leaves its bound
//! cgroups, and the pods bound to it, failing closed.
//!
//! Kubernetes mode writes each object's status (`k8s::policies::StatusWriter`,
//! in a task of its own, fed after each reconcile) only when it changes.
//!
//! After each reconcile the DNS proxy's listeners follow the network
//! namespaces of the bound processes (`dns_netns`): a Kubernetes pod's DNS
//! is steered to its own loopback, where the daemon must listen too.
//!
//! Maps and links are pinned under `pinDir`: enforcement continues while the
//! daemon is down or restarting, and a restarted daemon adopts what it finds.
//!
//! The house: this file holds the daemon's state ([`State`]) and the types
//! the steps pass along. Each step is a file of its own and owns one part
//! of the state; data flows one way between them:
//!
//! | step | file | owns | reads |
//! |---|---|---|---|
//! | policy files and objects -> evaluated policies | `sources` | – (writes the BPF LSM notes, `Policies::degraded`, handed to it by `install`) | `Node`, `K8s` |
//! | evaluated policies -> kernel tables, slots, the restart sweep | `install` | `Policies` | `Node`, `Bindings` (slots in use) |
//! | cgroups and pods -> identities | `bindings` | `Bindings`, `K8s`'s cgroup watches | `Node`, `Policies`, `K8s` |
//! | pods' file rules resolved in container roots | `roots` | `Roots` | `Node`, `Policies`, `Bindings` |
//! | `enforcer status`, object reports, event attribution | `status` | – | all |
//! | DNS listeners in workload namespaces | `dns_netns` | `Bindings::dns_netns` | `Node`, `Bindings` |
//! | start-up, what wakes a reconcile, the order of the steps, shutdown | `serve` | `Node` and `K8s` (made at start-up; `Node`'s config bindings again on SIGHUP) | – |
//!
//! The fields of `Policies`, `Bindings` and `Roots` are private to their
//! file: the other steps read them through methods (`Node` and `K8s`,
//! defined here, are plain data every step reads). Methods that cross
//! parts are `State`'s and do nothing but hand each step the parts it
//! needs (`reload_policies`, `reconcile_bindings`, `reconcile_roots`).
pub mod config;
pub mod control;
pub mod dns_netns;
pub mod heartbeat;
mod roots;

// The reconcile loop's steps, in the order data flows through them:
// policy sources -> kernel installation -> cgroup/pod bindings -> status;
// `serve` is the loop that runs them.
mod bindings;
mod install;
mod serve;
mod sources;
mod status;

use bindings::Bindings;
use install::{Policies, SlotTable};
pub use serve::main;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::{
    audit::{AuditLog, LifecycleAction},
    dns::DnsPolicy,
    dns_bridge::DnsService,
    events::{
        reader::{Attribution, SlotInfo},
        sink::{self, Readers, Sinks},
        IdentityRef,
    },
    kernel::{cgroup, Attachment, Kernel},
    metrics::{self, Metrics, ReloadResult},
    policy::{self, compile::CompiledPolicy, LoadedPolicy},
};
use config::Config;

pub const DEFAULT_CONTROL_SOCKET: &str = "/run/enforcer/enforcer.sock";

/// Where a policy comes from: a policy file, or an `AgentPolicy` object
/// (keyed by UID: a deleted and re-created object is another source).
/// Shown (status, audit records, logs) as the path, or as
/// `agentpolicy/<namespace>/<name>`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    File(PathBuf),
    Object {
        namespace: String,
        name: String,
        uid: String,
    },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Object {
                namespace, name, ..
            } => write!(f, "agentpolicy/{namespace}/{name}"),
        }
    }
}

/// The last evaluation of an `AgentPolicy` object (for its status).
struct ObjectResult {
    generation: Option<i64>,
    verdict: crate::k8s::policies::Verdict,
    node_errors: Vec<String>,
}

/// Kubernetes mode (config `kubernetes:`).
pub struct K8s {
    cache: Arc<Mutex<crate::k8s::watch::PodCache>>,
    /// `AgentPolicy` objects (`None` with `agentPolicies: false`).
    policies: Option<Arc<Mutex<crate::k8s::policies::PolicyCache>>>,
    trust_domain: String,
    kubelet_root: Option<PathBuf>,
    /// Wakes the reconcile loop (pod events, a pod cgroup appearing).
    wake: Arc<tokio::sync::Notify>,
    /// inotify on the QoS-level directories where selected pods without a
    /// cgroup yet will get theirs (see `watch_pending_pods`).
    parents: Option<notify::RecommendedWatcher>,
    watched: HashSet<PathBuf>,
}

/// A pod bound through its pod-level cgroup.
#[derive(Clone, Debug)]
struct PodBinding {
    entry: crate::k8s::watch::PodEntry,
    policy: String,
    spiffe_id: String,
}

impl PodBinding {
    /// The pod (and a container of it) as decisions name it.
    fn workload(&self, container: Option<String>) -> crate::events::Workload {
        crate::events::Workload {
            spiffe_id: self.spiffe_id.clone(),
            namespace: self.entry.info.namespace.clone(),
            pod: self.entry.info.name.clone(),
            container,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Rejection {
    pub file: String,
    pub errors: Vec<String>,
    pub at: String,
}

/// The daemon's state: a few plain parts, one per step of the reconcile
/// loop, each owned by the file of that step. A step's methods take the
/// parts they read and write as arguments (`State`'s own methods only
/// split it and call them in order), so a signature says what a step can
/// touch.
pub struct State {
    /// What start-up settled: config, the node's capabilities, the outputs.
    node: Node,
    kernel: Kernel,
    /// Sources -> kernel: the policies in force, slots, rejections (`install`).
    policies: Policies,
    /// Cgroups and pods -> identities (`bindings`).
    bindings: Bindings,
    /// Kubernetes mode: file rules resolved in containers' roots (`roots`).
    roots: roots::Roots,
    /// Kubernetes mode: the node's pods and `AgentPolicy` objects.
    k8s: Option<K8s>,
}

/// What start-up settled: read by every step, changed by none (but the
/// config's bindings on SIGHUP).
struct Node {
    cfg: Config,
    mount: PathBuf,
    lsm: crate::kernel::LsmSupport,
    /// Whether the cgroup unix socket hooks loaded (`spec.local`).
    unix: crate::kernel::UnixSupport,
    /// The resolver IPC sockets in force (config, else the default list).
    resolvers: Vec<PathBuf>,
    /// The daemon's own network namespace (its proxy's home listeners).
    own_netns: Option<crate::netns::NetnsId>,
    started: chrono::DateTime<chrono::Utc>,
    /// Where decisions and lifecycle records go.
    sinks: Arc<Sinks>,
    metrics: Arc<Metrics>,
    dns: Arc<DnsService>,
    attribution: Attribution,
}

impl Node {
    fn links_dir(&self, cgroup_id: u64) -> PathBuf {
        self.cfg.pin_dir.join("links").join(cgroup_id.to_string())
    }
    fn slots_file(&self) -> PathBuf {
        self.cfg.state_dir.join("slots.json")
    }
}

/// A policy's identity as decisions and lifecycle records name it.
fn identity(c: &CompiledPolicy) -> IdentityRef {
    IdentityRef {
        name: c.name.clone(),
        spiffe_id: c.spiffe_id.clone(),
    }
}
