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
pub mod config;
pub mod control;
pub mod dns_netns;
pub mod heartbeat;
mod roots;

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

/// A policy document as loaded, compiled for the kernel and for the DNS proxy.
type Compiled = (LoadedPolicy, CompiledPolicy, Arc<DnsPolicy>);

/// One active policy.
struct Active {
    compiled: CompiledPolicy,
    dns: Arc<DnsPolicy>,
    source: Source,
    slot: u32,
    /// `spec.files` resolved to inodes when installed (re-resolved on every
    /// reconcile: a protected path created later gets its inode protected).
    files: crate::kernel::files::ResolvedFiles,
}

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

/// A source's policies ready for the kernel, and what stops them.
#[derive(Default)]
struct Prepared {
    compiled: Vec<Compiled>,
    /// Hashes of the policies that validated and compiled (before the gate).
    hashes: Vec<String>,
    /// Errors of the spec itself (validator, namespace rule, compiler): the
    /// same on every node.
    spec_errors: Vec<String>,
    /// Errors of this node (no BPF LSM, the name is taken by another source).
    node_errors: Vec<String>,
}

/// The last evaluation of an `AgentPolicy` object (for its status).
struct ObjectResult {
    generation: Option<i64>,
    verdict: crate::k8s::policies::Verdict,
    node_errors: Vec<String>,
}

/// One bound cgroup.
struct Bound {
    attachment: Attachment,
    policy: String,
    slot: u32,
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

/// Slot assignment, persisted in `stateDir` (bpffs holds only pins) so that a
/// restarted daemon keeps every identity in the slot its cgroups already
/// point to.
#[derive(Default, Serialize, Deserialize)]
struct SlotTable {
    slots: BTreeMap<String, u32>,
    /// The hash of the policy last installed under each name: a restarted
    /// daemon forgets the addresses a slot learned (adopted from the pins)
    /// unless its identity comes back with the same policy.
    #[serde(default)]
    hashes: BTreeMap<String, String>,
}

impl SlotTable {
    fn load(path: &Path) -> Self {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
    fn save(&self, path: &Path) {
        if let Ok(b) = serde_json::to_vec_pretty(self) {
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, b).is_ok() {
                let _ = std::fs::rename(&tmp, path);
            }
        }
    }
    /// Drop the entries `keep` refuses; returns them.
    fn reclaim(&mut self, mut keep: impl FnMut(&str, u32) -> bool) -> Vec<(String, u32)> {
        let mut freed = Vec::new();
        self.slots.retain(|n, s| {
            let k = keep(n, *s);
            if !k {
                freed.push((n.clone(), *s));
            }
            k
        });
        for (n, _) in &freed {
            self.hashes.remove(n);
        }
        freed
    }
    fn get_or_alloc(&mut self, name: &str) -> Option<u32> {
        if let Some(s) = self.slots.get(name) {
            return Some(*s);
        }
        let used: HashSet<u32> = self.slots.values().copied().collect();
        let slot = (1..enforcer_common::MAX_SLOTS).find(|s| !used.contains(s))?;
        self.slots.insert(name.to_string(), slot);
        Some(slot)
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Rejection {
    pub file: String,
    pub errors: Vec<String>,
    pub at: String,
}

pub struct State {
    cfg: Config,
    kernel: Kernel,
    mount: PathBuf,
    active: BTreeMap<String, Active>,
    bound: HashMap<PathBuf, Bound>,
    slots: SlotTable,
    rejected: BTreeMap<Source, Rejection>,
    /// `AgentPolicy` objects by UID: the last reload's verdict.
    object_results: BTreeMap<String, ObjectResult>,
    waiting: BTreeMap<PathBuf, String>,
    attribution: Attribution,
    sinks: Arc<Sinks>,
    metrics: Arc<Metrics>,
    started: chrono::DateTime<chrono::Utc>,
    reloads_ok: u64,
    reloads_rejected: u64,
    /// Processes in bound cgroups holding CAP_NET_RAW (see `scan_net_raw`).
    net_raw: BTreeMap<u32, String>,
    dns: Arc<DnsService>,
    lsm: crate::kernel::LsmSupport,
    /// Whether the cgroup unix socket hooks loaded (`spec.local`).
    unix: crate::kernel::UnixSupport,
    /// The resolver IPC sockets in force (config, else the default list).
    resolvers: Vec<PathBuf>,
    /// Per policy: what is not enforced because the kernel lacks BPF LSM.
    degraded: BTreeMap<String, String>,
    /// Kubernetes mode: the node's pods (filled by the watcher task).
    k8s: Option<K8s>,
    /// Policies of a previous daemon that are gone were removed from the
    /// kernel: file policies (after the first reload), objects (after the
    /// first complete list). See `sweep_stale_policies`.
    swept_files: bool,
    swept_objects: bool,
    /// Kubernetes mode: pod-level cgroup -> the pod bound there (status).
    pods: HashMap<PathBuf, PodBinding>,
    /// Kubernetes mode: pods a policy selects whose pod-level cgroup does
    /// not exist yet (sandbox not made; bound when it appears, see
    /// `watch_pending_pods`).
    pending_pods: Vec<PodBinding>,
    /// DNS proxies to (re)start after a reload (async, outside the lock).
    pending_dns: Vec<(u32, Arc<DnsPolicy>)>,
    /// The daemon's own network namespace (its proxy's home listeners).
    own_netns: Option<crate::netns::NetnsId>,
    /// (slot, namespace) used by bound processes, served by the DNS proxy
    /// there or not (see `dns_netns`).
    dns_netns: BTreeMap<(u32, crate::netns::NetnsId), dns_netns::NetnsUse>,
    /// Kubernetes mode: containers of pods whose policy has file rules, by
    /// cgroup id, with the rule paths resolved in their roots (`roots`).
    roots: BTreeMap<u64, roots::Root>,
    /// Newly resolved containers: processes found stopped in them are
    /// resumed for a short while (see `roots::reconcile_roots`).
    resume_again: Vec<(PathBuf, std::time::Instant)>,
    /// Container cgroups of such pods with no process in a container root
    /// yet, since when (see `roots::reconcile_roots`).
    unpivoted: HashMap<u64, std::time::Instant>,
    /// Inodes per-root policies keep beyond their live containers: a gone
    /// container's, with its pod (policy, pod cgroup), and the adopted
    /// generation's (policy, empty path). See `roots`.
    kept: BTreeMap<(String, PathBuf), roots::Kept>,
    /// Per-root policies whose pinned generation was looked at.
    adopted: HashSet<String>,
}

impl State {
    fn links_dir(&self, cgroup_id: u64) -> PathBuf {
        self.cfg.pin_dir.join("links").join(cgroup_id.to_string())
    }
    fn slots_file(&self) -> PathBuf {
        self.cfg.state_dir.join("slots.json")
    }

    fn identity(c: &CompiledPolicy) -> IdentityRef {
        IdentityRef {
            name: c.name.clone(),
            spiffe_id: c.spiffe_id.clone(),
        }
    }

    /// The policy files of the policies directory (sorted); `None` when the
    /// directory cannot be read (the file policies then stay as they are).
    fn policy_files(&self) -> Option<Vec<PathBuf>> {
        match std::fs::read_dir(&self.cfg.policies_dir) {
            Ok(rd) => {
                let mut files: Vec<PathBuf> = rd
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.is_file()
                            && matches!(
                                p.extension().and_then(|e| e.to_str()),
                                Some("yaml") | Some("yml")
                            )
                    })
                    .collect();
                files.sort();
                Some(files)
            }
            Err(e) => {
                tracing::error!(dir = %self.cfg.policies_dir.display(), "reading policies directory: {e}");
                None
            }
        }
    }

    /// Kubernetes mode with `agentPolicies`: the `AgentPolicy` objects.
    fn policy_objects(&self) -> Vec<crate::k8s::policies::PolicyObject> {
        match self.k8s.as_ref().and_then(|k| k.policies.as_ref()) {
            Some(c) => c
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .objects()
                .cloned()
                .collect(),
            None => Vec::new(),
        }
    }

    /// The policies of one source, as validated, or its errors.
    fn load_source(
        src: &Source,
        objects: &[crate::k8s::policies::PolicyObject],
        trust_domain: &str,
    ) -> Result<Vec<LoadedPolicy>, Vec<String>> {
        let strings = |e: policy::PolicyErrors| e.0.iter().map(|x| x.to_string()).collect();
        match src {
            Source::File(file) => policy::load_files(std::slice::from_ref(file)).map_err(strings),
            Source::Object { uid, .. } => {
                let Some(o) = objects.iter().find(|o| &o.uid == uid) else {
                    return Err(vec![format!("{src}: the object is gone")]);
                };
                crate::k8s::crd::object_policy(&o.namespace, &o.name, &o.spec, trust_domain)
                    .map(|p| vec![p])
                    .map_err(strings)
            }
        }
    }

    /// check -> compile -> BPF LSM gate: a source's policies ready for the
    /// kernel, or why not. The spec's own errors come first and are the
    /// same on every node (the gate may strip `files:` on this node only, so
    /// the spec is compiled before it, and again when it stripped).
    fn prepare(&mut self, list: Vec<LoadedPolicy>) -> Prepared {
        let mut out = Prepared::default();
        for mut p in list {
            if let Err(e) = policy::check_supported(&p) {
                out.spec_errors.extend(e.0.iter().map(|x| x.to_string()));
                continue;
            }
            if let Err(e) = crate::run::check_local_resolvers(&p, &self.resolvers) {
                out.node_errors.push(format!("{e:#}"));
                continue;
            }
            let full = match policy::compile::compile(&p) {
                Ok(c) => c,
                Err(e) => {
                    out.spec_errors.extend(e.0.iter().map(|x| x.to_string()));
                    continue;
                }
            };
            out.hashes.push(full.hash.clone());
            let name = p.policy.metadata.name.clone();
            // BPF LSM: may strip files:/onTaint: under allowDegraded, or refuse.
            let lsm_note =
                match crate::run::gate_file_policy(&mut p, &self.lsm, self.cfg.allow_degraded) {
                    Ok(n) => n,
                    Err(e) => {
                        out.node_errors.push(format!("{e:#}"));
                        continue;
                    }
                };
            let c = match lsm_note {
                Some(note) => {
                    if self.degraded.get(&name) != Some(&note) {
                        tracing::warn!("{note}");
                    }
                    self.degraded.insert(name, note);
                    match policy::compile::compile(&p) {
                        Ok(c) => c,
                        Err(e) => {
                            out.node_errors.extend(e.0.iter().map(|x| x.to_string()));
                            continue;
                        }
                    }
                }
                None => {
                    self.degraded.remove(&name);
                    full
                }
            };
            let d = Arc::new(crate::dns::compile_dns(&p, &c));
            out.compiled.push((p, c, d));
        }
        out
    }

    /// A `files:` rule path that did not exist when its policy was
    /// installed: resolve that policy's paths again (periodic resync), and
    /// install the policy again, atomically, only if something now
    /// resolves differently. Other policies are not touched.
    fn retry_unresolved_files(&mut self) {
        let waiting: Vec<String> = self
            .active
            .iter()
            .filter(|(_, a)| !a.files.unresolved.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        for name in waiting {
            let Some(a) = self.active.get(&name) else {
                continue;
            };
            let files = self.kernel.resolve_files(&a.compiled.files);
            if files == a.files {
                continue;
            }
            let (slot, compiled) = (a.slot, a.compiled.clone());
            match self.kernel.install_policy(slot, &compiled, &files) {
                Ok(()) => {
                    tracing::info!(policy = %name, file_inodes = files.entries.len(), unresolved = files.unresolved.len(), "file rule paths resolved again; policy reinstalled");
                    self.metrics
                        .set_file_rules(&name, files.entries.len() as u64);
                    if let Some(a) = self.active.get_mut(&name) {
                        a.files = files;
                    }
                }
                Err(e) => {
                    tracing::error!(policy = %name, "reinstalling with the newly resolved paths failed; the installed version stays: {e:#}")
                }
            }
        }
    }

    /// BPF LSM unix hooks match `spec.local` paths by socket inode: a
    /// service that re-created its socket (or one that appeared since) needs
    /// the policy installed again (periodic resync); the resolver sockets
    /// likewise.
    fn retry_moved_unix_sockets(&mut self) {
        self.kernel.refresh_resolver_inodes();
        let moved: Vec<String> = self
            .active
            .iter()
            .filter(|(_, a)| self.kernel.unix_sockets_moved(a.slot, &a.compiled))
            .map(|(n, _)| n.clone())
            .collect();
        for name in moved {
            let Some(a) = self.active.get(&name) else {
                continue;
            };
            let (slot, compiled, files) = (a.slot, a.compiled.clone(), a.files.clone());
            match self.kernel.install_policy(slot, &compiled, &files) {
                Ok(()) => tracing::info!(
                    policy = %name,
                    "a spec.local socket is a new inode (re-created); policy reinstalled"
                ),
                Err(e) => tracing::error!(
                    policy = %name,
                    "reinstalling for a re-created spec.local socket failed; the installed \
                     version stays: {e:#}"
                ),
            }
        }
    }

    /// Read every policy source (files, then `AgentPolicy` objects); apply
    /// what is valid, keep the old version of what is not.
    fn reload_policies(&mut self) {
        let files = self.policy_files();
        let objects = self.policy_objects();
        let mut sources: Vec<Source> = files
            .iter()
            .flatten()
            .map(|f| Source::File(f.clone()))
            .collect();
        let mut objs: Vec<Source> = objects
            .iter()
            .map(|o| Source::Object {
                namespace: o.namespace.clone(),
                name: o.name.clone(),
                uid: o.uid.clone(),
            })
            .collect();
        objs.sort();
        sources.extend(objs);
        let now = chrono::Utc::now().to_rfc3339();
        // name -> (compiled, source, dns view)
        let mut desired: BTreeMap<String, (CompiledPolicy, Source, Arc<DnsPolicy>)> =
            BTreeMap::new();
        let mut rejected_sources: HashSet<Source> = HashSet::new();
        let mut new_rejections: BTreeMap<Source, Rejection> = BTreeMap::new();
        let mut object_results: BTreeMap<String, ObjectResult> = BTreeMap::new();
        for src in &sources {
            let trust_domain = self
                .k8s
                .as_ref()
                .map(|k| k.trust_domain.clone())
                .unwrap_or_default();
            let mut prep = match Self::load_source(src, &objects, &trust_domain) {
                Err(errors) => Prepared {
                    spec_errors: errors,
                    ..Prepared::default()
                },
                Ok(list) => self.prepare(list),
            };
            // The first source that defines a name keeps it (files come
            // before objects; an object's name `<ns>/<name>` cannot be a
            // file policy's name, which is a DNS label).
            for (p, _, _) in &prep.compiled {
                let name = &p.policy.metadata.name;
                if let Some((_, other, _)) = desired.get(name) {
                    prep.node_errors.push(format!(
                        "{src}:{}: metadata.name: duplicate policy name {name:?}: {other} defines \
                         it first and stays in force",
                        p.line,
                    ));
                }
            }
            if let Source::Object { uid, .. } = src {
                let generation = objects
                    .iter()
                    .find(|o| &o.uid == uid)
                    .and_then(|o| o.generation);
                object_results.insert(
                    uid.clone(),
                    ObjectResult {
                        generation,
                        verdict: match prep.hashes.first() {
                            Some(h) if prep.spec_errors.is_empty() => {
                                crate::k8s::policies::Verdict::Valid(h.clone())
                            }
                            _ => crate::k8s::policies::Verdict::Invalid(prep.spec_errors.clone()),
                        },
                        node_errors: prep.node_errors.clone(),
                    },
                );
            }
            if prep.spec_errors.is_empty() && prep.node_errors.is_empty() {
                for (_, c, d) in prep.compiled {
                    desired.insert(c.name.clone(), (c, src.clone(), d));
                }
            } else {
                rejected_sources.insert(src.clone());
                let mut errors = prep.spec_errors;
                errors.extend(prep.node_errors);
                new_rejections.insert(
                    src.clone(),
                    Rejection {
                        file: src.to_string(),
                        errors,
                        at: now.clone(),
                    },
                );
            }
        }
        self.object_results = object_results;
        // A rejected source keeps its previously active policies in force
        // (an object: the version last accepted of that UID); so do all
        // file policies while the directory cannot be read.
        for (name, a) in &self.active {
            let keep = rejected_sources.contains(&a.source)
                || (files.is_none() && matches!(a.source, Source::File(_)));
            if keep && !desired.contains_key(name) {
                desired.insert(
                    name.clone(),
                    (a.compiled.clone(), a.source.clone(), a.dns.clone()),
                );
            }
        }
        for (src, r) in &new_rejections {
            let is_new = self
                .rejected
                .get(src)
                .map(|old| old.errors != r.errors)
                .unwrap_or(true);
            if is_new {
                for e in &r.errors {
                    tracing::error!("policy rejected, previous version stays in force: {e}");
                }
                self.metrics.record_policy_reload(ReloadResult::Rejected);
                self.reloads_rejected += 1;
                self.sinks.lifecycle(
                    LifecycleAction::PolicyReloadRejected,
                    None,
                    "",
                    &format!("{src}: {}", r.errors.join("; ")),
                );
            }
        }
        self.rejected = new_rejections;

        // Apply changes.
        let mut changed = false;
        for (name, (compiled, source, dns)) in &desired {
            // Paths are resolved again only for a new policy or while some
            // rule path is missing (a protected path created later gets
            // protected); a complete resolution stays valid (inodes).
            let previous: Option<crate::kernel::files::ResolvedFiles> = self
                .active
                .get(name)
                .filter(|a| a.compiled.hash == compiled.hash)
                .map(|a| a.files.clone());
            let files = match &previous {
                Some(f) if f.unresolved.is_empty() => f.clone(),
                // Pods: the paths are resolved in each container's root.
                _ if self.per_root(compiled) => {
                    if let Some(slot) = self.slots.slots.get(name).copied() {
                        self.adopt_roots(name, slot, compiled);
                    }
                    let old = self
                        .active
                        .get(name)
                        .map(|a| a.compiled.files.clone())
                        .unwrap_or_default();
                    self.refresh_roots(name, &old, compiled);
                    self.root_files(name)
                }
                _ => self.kernel.resolve_files(&compiled.files),
            };
            let same = previous.as_ref() == Some(&files);
            if same {
                if let Some(a) = self.active.get_mut(name) {
                    a.source = source.clone();
                }
                continue;
            }
            let slot = match self.slots.get_or_alloc(name) {
                Some(s) => Some(s),
                None => {
                    self.reclaim_slots();
                    self.slots.get_or_alloc(name)
                }
            };
            let Some(slot) = slot else {
                let why = format!(
                    "policy {name:?}: no free identity slot ({} in use, none reclaimable); \
                     not installed",
                    enforcer_common::MAX_SLOTS - 1
                );
                tracing::error!("{why}");
                self.metrics.record_policy_reload(ReloadResult::Rejected);
                self.reloads_rejected += 1;
                self.rejected.insert(
                    source.clone(),
                    Rejection {
                        file: source.to_string(),
                        errors: vec![why],
                        at: chrono::Utc::now().to_rfc3339(),
                    },
                );
                continue;
            };
            let fresh = !self.active.contains_key(name);
            if fresh {
                self.kernel.reset_slot_counters(slot);
                // First install in this daemon's life. Addresses in the slot
                // were learned under the policy last installed there (pins
                // of a previous daemon): kept only if it is this one.
                if self.slots.hashes.get(name) != Some(&compiled.hash) {
                    self.dns.forget(slot);
                }
            }
            let unresolved_before = self.active.get(name).map(|a| a.files.unresolved.clone());
            if unresolved_before.as_ref() != Some(&files.unresolved) {
                for (id, path, why) in &files.unresolved {
                    tracing::warn!(policy = %name, rule = %compiled.rule_name(*id), path = %path.display(), "file rule not in force until the path exists ({why}); re-checked on every reconcile");
                }
            }
            for path in &files.truncated {
                tracing::warn!(policy = %name, path = %path.display(), "directory tree larger than {} entries: hard links made before the policy loaded to files beyond that are not matched", crate::kernel::files::MAX_TREE_ENTRIES);
            }
            match self.kernel.install_policy(slot, compiled, &files) {
                Ok(()) => {
                    changed = true;
                    tracing::info!(policy = %name, slot, entries = compiled.entry_count(), file_inodes = files.entries.len(), hash = %compiled.hash, "policy installed");
                    self.slots
                        .hashes
                        .insert(name.clone(), compiled.hash.clone());
                    self.attribution
                        .set(slot, SlotInfo::new(Self::identity(compiled), compiled));
                    self.metrics.set_policy_info(
                        name,
                        compiled.spiffe_id.as_deref(),
                        if compiled.audit { "audit" } else { "enforce" },
                        &compiled.hash,
                    );
                    self.metrics
                        .set_policy_entries(name, compiled.entry_count() as u64);
                    self.metrics
                        .set_file_rules(name, files.entries.len() as u64);
                    self.sinks.lifecycle(
                        if fresh {
                            LifecycleAction::PolicyLoad
                        } else {
                            LifecycleAction::PolicyReload
                        },
                        Some(&Self::identity(compiled)),
                        &compiled.hash,
                        &format!("{source} ({} entries)", compiled.entry_count()),
                    );
                    // A served identity's proxy takes the new policy now,
                    // and forgets what the old one learned in the same step
                    // (`DnsService::reload`); a new one starts after the
                    // installs (`start_dns`: it binds sockets).
                    let swapped = !fresh && self.dns.reload(slot, dns.clone());
                    if !swapped {
                        if !fresh {
                            self.dns.forget(slot);
                        }
                        self.pending_dns.push((slot, dns.clone()));
                    }
                    self.active.insert(
                        name.clone(),
                        Active {
                            compiled: compiled.clone(),
                            dns: dns.clone(),
                            source: source.clone(),
                            slot,
                            files,
                        },
                    );
                }
                Err(e) => {
                    tracing::error!(policy = %name, "installing policy failed, previous version stays: {e:#}");
                    self.metrics.record_policy_reload(ReloadResult::Rejected);
                    self.reloads_rejected += 1;
                }
            }
        }
        let removed: Vec<String> = self
            .active
            .keys()
            .filter(|n| !desired.contains_key(*n))
            .cloned()
            .collect();
        for name in removed {
            if let Some(a) = self.active.remove(&name) {
                changed = true;
                tracing::warn!(policy = %name, "policy removed: its bound cgroups now fail closed");
                let _ = self.kernel.remove_policy(a.slot);
                self.sinks.forget_taint(&name);
                self.dns.stop(a.slot);
                self.metrics.forget_identity(&name);
                self.sinks.lifecycle(
                    LifecycleAction::PolicyRemove,
                    Some(&Self::identity(&a.compiled)),
                    &a.compiled.hash,
                    &format!("{} removed; bound cgroups fail closed", a.source),
                );
            }
        }
        if changed {
            self.metrics.record_policy_reload(ReloadResult::Ok);
            self.reloads_ok += 1;
        }
        // Degradation notes of policies no longer loaded go with them.
        let active = &self.active;
        self.degraded.retain(|name, _| active.contains_key(name));
        self.sweep_stale_policies();
        self.slots.save(&self.slots_file());
    }

    /// After a restart the pinned kernel state still enforces every policy
    /// the previous daemon had installed. Once this daemon knows every
    /// source of a kind (files: after its first reload; objects: after the
    /// first complete list), a policy of that kind that it did not load
    /// (deleted while the daemon was down, or invalid now) is removed from
    /// the kernel: its cgroups fail closed rather than keep a deleted
    /// policy in force. (The version last accepted for an object that is
    /// invalid now is not kept across a restart: it fails closed too.)
    fn sweep_stale_policies(&mut self) {
        let objects_known = match &self.k8s {
            Some(K8s {
                policies: Some(c), ..
            }) => c.lock().unwrap_or_else(|e| e.into_inner()).synced(),
            _ => true,
        };
        let sweep_files = !self.swept_files;
        let sweep_objects = !self.swept_objects && objects_known;
        if !sweep_files && !sweep_objects {
            return;
        }
        let stale: Vec<(String, u32)> = self
            .slots
            .slots
            .iter()
            .filter(|(name, _)| !self.active.contains_key(*name))
            .filter(|(name, _)| {
                if crate::k8s::crd::is_object_identity(name) {
                    sweep_objects
                } else {
                    sweep_files
                }
            })
            .map(|(n, s)| (n.clone(), *s))
            .collect();
        for (name, slot) in stale {
            if !self.kernel.policy_present(slot) {
                continue;
            }
            tracing::warn!(policy = %name, slot, "a previous daemon's policy is not loaded any more (removed while the daemon was down, or invalid now): removed from the kernel; its cgroups fail closed");
            if let Err(e) = self.kernel.remove_policy(slot) {
                tracing::error!(policy = %name, slot, "removing it: {e:#}");
                continue;
            }
            self.dns.stop(slot);
            self.sinks.lifecycle(
                LifecycleAction::PolicyRemove,
                Some(&IdentityRef {
                    name: name.clone(),
                    spiffe_id: None,
                }),
                "",
                "not loaded after a daemon restart; bound cgroups fail closed",
            );
        }
        self.swept_files = true;
        if objects_known {
            self.swept_objects = true;
        }
    }

    /// The slot table is full (identities come and go with AgentPolicy
    /// objects, and the table outlives daemon restarts): free the slots of
    /// identities that are not loaded and that no cgroup points to any more,
    /// neither one this daemon bound nor one in the kernel's pinned binding
    /// map (cgroups of a previous run not adopted yet). A slot is reused
    /// only once nothing can still be enforced through it; nothing is freed
    /// when the binding map cannot be read.
    fn reclaim_slots(&mut self) {
        let Some(in_use) = self.kernel.slots_in_use() else {
            tracing::warn!("identity slots full and the binding map unreadable: nothing reclaimed");
            return;
        };
        let (active, bound) = (&self.active, &self.bound);
        let freed = self.slots.reclaim(|name, slot| {
            active.contains_key(name)
                || in_use.contains(&slot)
                || bound.values().any(|b| b.slot == slot)
        });
        for (name, slot) in freed {
            tracing::info!(policy = %name, slot, "identity slot reclaimed (policy gone, no cgroup bound to it)");
        }
    }

    /// Attach to bound cgroups that exist, bind them to their identity slot
    /// (slot 0 = no policy: fail closed), release removed bindings.
    fn reconcile_bindings(&mut self) {
        let mut wanted: HashMap<PathBuf, String> = HashMap::new();
        for b in &self.cfg.bindings {
            let path = if b.cgroup.is_absolute() {
                b.cgroup.clone()
            } else {
                self.mount.join(&b.cgroup)
            };
            wanted.insert(path, b.policy.clone());
        }
        let (pods, pending) = self.pod_bindings();
        for (path, p) in &pods {
            wanted
                .entry(path.clone())
                .or_insert_with(|| p.policy.clone());
        }
        self.pods = pods;
        self.pending_pods = pending;
        self.watch_pending_pods();
        if self.k8s.is_some() {
            self.publish_workloads();
        }
        let gone: Vec<PathBuf> = self
            .bound
            .keys()
            .filter(|p| !wanted.contains_key(*p) || !p.is_dir())
            .cloned()
            .collect();
        for p in gone {
            if let Some(b) = self.bound.remove(&p) {
                let _ = self.kernel.unbind_cgroup(b.attachment.cgroup_id);
                tracing::info!(cgroup = %p.display(), "binding released");
                self.sinks
                    .lifecycle(LifecycleAction::Detach, None, "", &p.display().to_string());
                b.attachment.release();
            }
        }
        self.waiting.clear();
        for (path, policy) in wanted {
            if !path.is_dir() {
                self.waiting.insert(path, policy);
                continue;
            }
            let slot = self
                .active
                .get(&policy)
                .map(|a| a.slot)
                .unwrap_or(enforcer_common::SLOT_UNKNOWN);
            if let Some(b) = self.bound.get_mut(&path) {
                if b.slot != slot || b.policy != policy {
                    if let Err(e) = self.kernel.bind_cgroup(b.attachment.cgroup_id, slot) {
                        tracing::error!(cgroup = %path.display(), "rebinding: {e:#}");
                    }
                    b.slot = slot;
                    b.policy = policy;
                }
                continue;
            }
            let id = match cgroup::cgroup_id(&path) {
                Ok(id) => id,
                Err(e) => {
                    tracing::error!("{e:#}");
                    continue;
                }
            };
            // Bind first: from the first program run on, the cgroup has an identity.
            if let Err(e) = self.kernel.bind_cgroup(id, slot) {
                tracing::error!(cgroup = %path.display(), "binding: {e:#}");
                continue;
            }
            let dir = self.links_dir(id);
            let attachment = match self.kernel.adopt_pinned(&path, &dir) {
                Ok(Some(a)) => {
                    tracing::info!(cgroup = %path.display(), "adopted pinned links from a previous run");
                    Ok(a)
                }
                _ => self.kernel.attach(&path, Some(&dir)),
            };
            match attachment {
                Ok(attachment) => {
                    if slot == enforcer_common::SLOT_UNKNOWN {
                        tracing::warn!(cgroup = %path.display(), policy = %policy, "bound policy is not loaded: cgroup fails closed");
                    }
                    tracing::info!(cgroup = %path.display(), cgroup_id = id, policy = %policy, "attached");
                    self.sinks.lifecycle(
                        LifecycleAction::Attach,
                        self.active
                            .get(&policy)
                            .map(|a| Self::identity(&a.compiled))
                            .as_ref(),
                        self.active
                            .get(&policy)
                            .map(|a| a.compiled.hash.as_str())
                            .unwrap_or(""),
                        &match self.pods.get(&path) {
                            Some(p) => format!(
                                "{} (cgroup id {id}): pod {}/{} uid {} ({})",
                                path.display(),
                                p.entry.info.namespace,
                                p.entry.info.name,
                                p.entry.info.uid,
                                p.spiffe_id
                            ),
                            None => format!("{} (cgroup id {id})", path.display()),
                        },
                    );
                    self.bound.insert(
                        path,
                        Bound {
                            attachment,
                            policy,
                            slot,
                        },
                    );
                }
                Err(e) => tracing::error!(cgroup = %path.display(), "attach failed: {e:#}"),
            }
        }
        self.metrics.set_attached_cgroups(self.bound.len() as u64);
        self.reconcile_roots();
    }

    /// Kubernetes mode: the pod-level cgroup of every pod of this node that
    /// an active policy selects. Binding the pod-level cgroup (created with
    /// the pod sandbox, before any app container starts) means init, app and
    /// ephemeral containers start already enforced (the programs run for
    /// every descendant cgroup). Pods two policies select are bound to a
    /// policy name that cannot exist, so they fail closed; so do bound pods
    /// whose policy was removed (until the pod goes).
    fn pod_bindings(&self) -> (HashMap<PathBuf, PodBinding>, Vec<PodBinding>) {
        use crate::k8s::{binding, cgroups};
        let mut out = HashMap::new();
        let mut pending = Vec::new();
        let Some(k) = &self.k8s else {
            return (out, pending);
        };
        let identities: Vec<(String, crate::policy::Identity)> = self
            .active
            .iter()
            .map(|(n, a)| {
                (
                    n.clone(),
                    crate::policy::Identity {
                        spiffe_id: a.compiled.spiffe_id.clone(),
                        kubernetes: a.compiled.kubernetes.clone(),
                    },
                )
            })
            .collect();
        let cache = k.cache.lock().unwrap_or_else(|e| e.into_inner());
        for pod in cache.pods() {
            // A finished pod (a Job's, say) has no processes and, soon, no
            // cgroup: neither bound nor waiting for one.
            if matches!(pod.phase.as_deref(), Some("Succeeded" | "Failed")) {
                continue;
            }
            let (policy, id) = match binding::bind(
                identities.iter().map(|(n, i)| (n.as_str(), Some(i))),
                &pod.info,
            ) {
                // A pod this daemon bound stays bound while it lives: when
                // its policy goes away (file or object deleted) or stops
                // selecting it, it keeps its binding to that name, which is
                // no longer loaded, so it fails closed instead of being let
                // go unenforced.
                binding::Binding::None => match self
                    .pods
                    .values()
                    .find(|b| b.entry.info.uid == pod.info.uid)
                {
                    Some(prev) => (prev.policy.clone(), None),
                    None => continue,
                },
                binding::Binding::Policy(p) => {
                    let id = identities
                        .iter()
                        .find(|(n, _)| *n == p)
                        .map(|(_, i)| i.clone());
                    (p, id)
                }
                binding::Binding::Conflict(names) => {
                    tracing::error!(pod = %format!("{}/{}", pod.info.namespace, pod.info.name), policies = ?names, "pod selected by more than one AgentPolicy: it fails closed until that is fixed");
                    (format!("conflict: {}", names.join(", ")), None)
                }
            };
            let spiffe_id = binding::spiffe_id(id.as_ref(), &k.trust_domain, &pod.info);
            let b = PodBinding {
                entry: pod.clone(),
                policy,
                spiffe_id,
            };
            match cgroups::resolve_pod(&self.mount, k.kubelet_root.as_deref(), &pod.pod_ref()) {
                Some((path, _driver)) => {
                    out.insert(path, b);
                }
                None => {
                    tracing::debug!(pod = %pod.info.name, "pod cgroup not found yet");
                    pending.push(b);
                }
            }
        }
        (out, pending)
    }

    /// A selected pod whose cgroup does not exist yet is bound the moment the
    /// kubelet creates it: inotify on its QoS-level parent directories wakes
    /// the reconcile loop (`IN_CREATE`; mkdir on cgroupfs is reported like on
    /// any file system), instead of waiting for the periodic resync. The
    /// kubelet creates the pod cgroup before the sandbox and the containers,
    /// so the pod's first process starts in a bound cgroup unless the
    /// sandbox is created faster than the daemon reacts. Watches are dropped
    /// when no pending pod needs them.
    ///
    /// Each bound pod's `cgroup.events` is watched too: it changes when the
    /// pod's first process arrives (`populated 1`, the sandbox) and when its
    /// last one leaves, which wakes the loop to serve DNS in the pod's
    /// network namespace at once (see `dns_netns`) and to close it after.
    fn watch_pending_pods(&mut self) {
        use notify::{RecursiveMode, Watcher};
        let per_root = self.per_root_pods();
        let Some(k) = self.k8s.as_mut() else {
            return;
        };
        let mut wanted: HashSet<PathBuf> = HashSet::new();
        for p in &self.pending_pods {
            for dir in crate::k8s::cgroups::pod_parent_dirs(
                &self.mount,
                k.kubelet_root.as_deref(),
                &p.entry.pod_ref(),
            ) {
                if dir.is_dir() {
                    wanted.insert(dir);
                }
            }
        }
        for path in self.pods.keys() {
            let events = path.join("cgroup.events");
            if events.is_file() {
                wanted.insert(events);
            }
        }
        // Pods whose containers' roots resolve their file rules: a new
        // container cgroup is to be resolved at once.
        for (path, _) in per_root {
            wanted.insert(path);
        }
        if wanted.is_empty() && k.watched.is_empty() {
            return;
        }
        if k.parents.is_none() {
            let wake = k.wake.clone();
            match notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                if res.is_ok_and(|ev| ev.kind.is_create() || ev.kind.is_modify()) {
                    wake.notify_one();
                }
            }) {
                Ok(w) => k.parents = Some(w),
                Err(e) => {
                    tracing::warn!(
                        "inotify unavailable ({e}): pods are bound on the periodic resync"
                    );
                    return;
                }
            }
        }
        let Some(w) = k.parents.as_mut() else {
            return;
        };
        for gone in k.watched.difference(&wanted).cloned().collect::<Vec<_>>() {
            let _ = w.unwatch(&gone);
            k.watched.remove(&gone);
        }
        for dir in wanted {
            if k.watched.contains(&dir) {
                continue;
            }
            match w.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    tracing::debug!(dir = %dir.display(), "watching for pod cgroups");
                    k.watched.insert(dir);
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), "watching for pod cgroups: {e}; bound on the periodic resync")
                }
            }
        }
    }

    /// Kubernetes mode: what this node reports on each `AgentPolicy` object
    /// (written by `k8s::policies::StatusWriter`, outside the state lock).
    fn policy_reports(&self) -> Vec<crate::k8s::policies::Report> {
        use crate::k8s::{
            crd::{identity_name, NodeStatus},
            policies::{Report, Verdict},
        };
        let mut out = Vec::new();
        for o in self.policy_objects() {
            // Not evaluated yet, or an older generation: the next reload reports.
            let Some(r) = self
                .object_results
                .get(&o.uid)
                .filter(|r| r.generation == o.generation)
            else {
                continue;
            };
            let name = identity_name(&o.namespace, &o.name);
            let active = self
                .active
                .get(&name)
                .filter(|a| matches!(&a.source, Source::Object { uid, .. } if *uid == o.uid));
            let bound = self
                .pods
                .iter()
                .filter(|(path, p)| p.policy == name && self.bound.contains_key(*path))
                .count();
            let message = if !r.node_errors.is_empty() {
                Some(r.node_errors.join("\n"))
            } else if active.is_none() && matches!(r.verdict, Verdict::Valid(_)) {
                Some("not installed on this node (see the daemon's log)".into())
            } else {
                None
            };
            out.push(Report {
                uid: o.uid.clone(),
                namespace: o.namespace.clone(),
                name: o.name.clone(),
                generation: o.generation,
                current: o.status.clone(),
                verdict: r.verdict.clone(),
                node: NodeStatus {
                    node: String::new(),
                    enforced: active.is_some(),
                    policy_hash: active.map(|a| a.compiled.hash.clone()),
                    bound_pods: i32::try_from(bound).unwrap_or(i32::MAX),
                    message,
                },
            });
        }
        out
    }

    /// `cgroup/sock_create` only runs for inet sockets: a process holding
    /// CAP_NET_RAW can open an AF_PACKET socket that no cgroup hook sees, and
    /// tc egress can be bypassed (PACKET_QDISC_BYPASS). With BPF LSM the
    /// daemon's `lsm/socket_create` hook refuses those sockets; without it
    /// the daemon cannot, so it finds such processes and says so loudly: log
    /// (once per process), metric, `enforcer status`. Containers should drop
    /// NET_RAW either way (the metric counts them in both cases).
    fn scan_net_raw(&mut self) {
        let refused = self.kernel.lsm_hooks_attached();
        let mut found: BTreeMap<u32, String> = BTreeMap::new();
        let mut per_identity: BTreeMap<String, u64> = BTreeMap::new();
        for (path, b) in &self.bound {
            for pid in cgroup::pids_in_tree(path) {
                if cgroup::holds_net_raw(pid) {
                    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .unwrap_or_default()
                        .trim()
                        .to_string();
                    let what = format!(
                        "pid {pid} ({comm}) in {} [policy {}] holds CAP_NET_RAW: its packet \
                         sockets {}; drop NET_RAW from the workload",
                        path.display(),
                        b.policy,
                        if refused {
                            "are refused by the BPF LSM socket_create hook"
                        } else {
                            "cannot be refused without BPF LSM"
                        }
                    );
                    if !self.net_raw.contains_key(&pid) {
                        if refused {
                            tracing::info!("{what}");
                        } else {
                            tracing::warn!("{what}");
                        }
                    }
                    found.insert(pid, what);
                    *per_identity.entry(b.policy.clone()).or_default() += 1;
                }
            }
        }
        for name in self.active.keys() {
            self.metrics
                .set_net_raw_processes(name, per_identity.get(name).copied().unwrap_or(0));
        }
        self.net_raw = found;
    }

    fn slot_names(&self) -> Vec<(u32, String)> {
        self.active
            .iter()
            .map(|(n, a)| (a.slot, n.clone()))
            .collect()
    }

    /// Kubernetes mode: tell the event attribution which cgroup ids are
    /// which pod and container (audit records and `enforcer_pod_events_total`
    /// carry namespace, pod and container), and export the bound pods.
    /// The pods' cgroup directories go along, so that a container cgroup
    /// created after this call is placed at its first event
    /// (`Attribution::workload`).
    fn publish_workloads(&self) {
        use crate::events::reader::PodScope;
        let mut map = HashMap::new();
        let mut info = Vec::new();
        let mut scopes = Vec::new();
        for (path, p) in &self.pods {
            let (ns, pod) = (&p.entry.info.namespace, &p.entry.info.name);
            info.push((
                p.policy.clone(),
                p.spiffe_id.clone(),
                ns.clone(),
                pod.clone(),
                p.entry.info.uid.clone(),
            ));
            scopes.push(PodScope {
                dir: path.clone(),
                spiffe_id: p.spiffe_id.clone(),
                namespace: ns.clone(),
                pod: pod.clone(),
                containers: p
                    .entry
                    .containers
                    .iter()
                    .filter_map(|c| {
                        let id = c.container_id.as_deref()?;
                        let id = id.parse::<crate::k8s::cgroups::ContainerId>().ok()?;
                        Some((id.id, c.name.clone()))
                    })
                    .collect(),
            });
            if let Ok(id) = cgroup::cgroup_id(path) {
                map.insert(id, p.workload(None));
            }
            for (c, dir) in self.container_cgroups(&p.entry) {
                let Some(id) = dir.and_then(|d| cgroup::cgroup_id(&d).ok()) else {
                    continue;
                };
                map.insert(id, p.workload(Some(c.name.clone())));
            }
        }
        self.attribution.set_workloads(map, scopes);
        self.metrics.set_pods(&info);
    }

    /// Each container of `e` with its cgroup directory, once it exists.
    fn container_cgroups<'e>(
        &self,
        e: &'e crate::k8s::watch::PodEntry,
    ) -> Vec<(&'e crate::k8s::watch::ContainerEntry, Option<PathBuf>)> {
        use crate::k8s::cgroups;
        let kubelet_root = self.k8s.as_ref().and_then(|k| k.kubelet_root.as_deref());
        let pod = e.pod_ref();
        e.containers
            .iter()
            .map(|c| {
                let dir = c
                    .container_id
                    .as_deref()
                    .and_then(|id| id.parse::<cgroups::ContainerId>().ok())
                    .and_then(|id| {
                        cgroups::resolve_container(&self.mount, kubelet_root, &pod, &id)
                    });
                (c, dir)
            })
            .collect()
    }

    /// The pods bound to `policy` on this node, and those selected whose
    /// pod-level cgroup does not exist yet (`cgroup` empty).
    fn pod_status(&self, policy: &str) -> Vec<control::PodStatus> {
        let row = |p: &PodBinding, cgroup: String| control::PodStatus {
            namespace: p.entry.info.namespace.clone(),
            name: p.entry.info.name.clone(),
            uid: p.entry.info.uid.clone(),
            spiffe_id: p.spiffe_id.clone(),
            cgroup,
            containers: self
                .container_cgroups(&p.entry)
                .into_iter()
                .map(|(c, dir)| control::ContainerStatusOut {
                    name: c.name.clone(),
                    kind: format!("{:?}", c.kind).to_lowercase(),
                    container_id: c.container_id.clone(),
                    file_inodes: dir.as_deref().and_then(|d| self.root_inodes(d)),
                    cgroup: dir.map(|d| d.display().to_string()),
                })
                .collect(),
        };
        let bound = self
            .pods
            .iter()
            .filter(|(_, p)| p.policy == policy)
            .map(|(path, p)| {
                let cgroup = if self.bound.contains_key(path) {
                    path.display().to_string()
                } else {
                    String::new()
                };
                row(p, cgroup)
            });
        let pending = self
            .pending_pods
            .iter()
            .filter(|p| p.policy == policy)
            .map(|p| row(p, String::new()));
        let mut out: Vec<control::PodStatus> = bound.chain(pending).collect();
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        out
    }

    pub fn status(&self) -> control::Status {
        let mut identities = Vec::new();
        let tainted = self.sinks.tainted();
        for (name, a) in &self.active {
            let counters = self.kernel.slot_counters(a.slot);
            let mut decisions = BTreeMap::new();
            for act in crate::events::Action::ALL {
                let row = &counters[act.kernel_code() as usize];
                let mut m = BTreeMap::new();
                for v in crate::events::Verdict::ALL {
                    m.insert(v.as_str().to_string(), row[v.kernel_code() as usize]);
                }
                decisions.insert(act.as_str().to_string(), m);
            }
            identities.push(control::IdentityStatus {
                name: name.clone(),
                spiffe_id: a.compiled.spiffe_id.clone(),
                mode: if a.compiled.audit { "audit" } else { "enforce" }.into(),
                policy_hash: a.compiled.hash.clone(),
                source: a.source.to_string(),
                slot: a.slot,
                rules: a.compiled.rules.len(),
                entries: a.compiled.entry_count(),
                cgroups: self
                    .bound
                    .iter()
                    .filter(|(_, b)| &b.policy == name)
                    .map(|(p, b)| control::CgroupStatus {
                        path: p.display().to_string(),
                        cgroup_id: b.attachment.cgroup_id,
                    })
                    .collect(),
                dns_port: self.kernel.dns_port(a.slot),
                dns_netns: self.netns_status(a.slot),
                learned_addresses: self.dns.learned_count(a.slot),
                decisions,
                recent_denials: self.sinks.recent(name),
                file_rules: a.compiled.files.len(),
                file_inodes: a.files.entries.len(),
                unresolved_files: a
                    .files
                    .unresolved
                    .iter()
                    .map(|(_, p, why)| format!("{} ({why})", p.display()))
                    .collect(),
                pods: self.pod_status(name),
                first_bytes: a.compiled.inspection_note(),
                first_bytes_refused: self
                    .kernel
                    .slot_reasons(a.slot)
                    .into_iter()
                    .map(|(r, audit, n)| {
                        let r = enforcer_common::first_bytes::reason::as_str(r);
                        (if audit { format!("{r} (audit)") } else { r.to_string() }, n)
                    })
                    .collect(),
                tainted: tainted.get(name).cloned().or_else(|| {
                    let t = self.kernel.taint_table();
                    let t = t.lock().unwrap_or_else(|e| e.into_inner());
                    t.is_tainted(a.slot)
                        .then(|| "tainted (the kernel's flag; the read was recorded before this daemon started)".to_string())
                }),
            });
        }
        let fail_closed = self
            .bound
            .iter()
            .filter(|(_, b)| b.slot == enforcer_common::SLOT_UNKNOWN)
            .map(|(p, b)| format!("{} (policy {:?} not loaded)", p.display(), b.policy))
            .collect();
        control::Status {
            version: env!("CARGO_PKG_VERSION").into(),
            started: self.started.to_rfc3339(),
            policies_dir: self.cfg.policies_dir.display().to_string(),
            identities,
            fail_closed_cgroups: fail_closed,
            waiting_cgroups: self
                .waiting
                .keys()
                .map(|p| p.display().to_string())
                .collect(),
            rejected: self.rejected.values().cloned().collect(),
            reloads_ok: self.reloads_ok,
            reloads_rejected: self.reloads_rejected,
            events_lost: self.kernel.stat(enforcer_common::stat::EVENTS_LOST),
            net_raw_processes: self.net_raw.values().cloned().collect(),
            capabilities: BTreeMap::from([
                (
                    "bpf_lsm".to_string(),
                    control::Capability {
                        available: self.lsm.available,
                        detail: self.lsm.detail.clone(),
                    },
                ),
                (
                    "unix_sockets".to_string(),
                    control::Capability {
                        available: self.unix.available,
                        detail: if self.unix.available {
                            format!(
                                "{}; spec.local enforced; resolver sockets refused: {}",
                                self.unix.detail,
                                self.resolvers
                                    .iter()
                                    .map(|p| p.display().to_string())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        } else {
                            format!("{}; {}", self.unix.detail, crate::kernel::UNIX_REQUIREMENT)
                        },
                    },
                ),
            ]),
            degraded: self.degraded.values().cloned().collect(),
        }
    }
}

pub fn main(config_path: &Path) -> Result<i32> {
    crate::run::require_root("daemon")?;
    let cfg = Config::load(config_path)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(serve(cfg, config_path.to_path_buf()))
}

async fn serve(cfg: Config, config_path: PathBuf) -> Result<i32> {
    let mount = cgroup::cgroup2_mount()?;
    ensure_bpffs(&cfg.pin_dir)?;
    let mut kernel = Kernel::load(Some(&cfg.pin_dir.join("maps")))?;
    let mut lsm = kernel.probe_lsm();
    if lsm.available {
        // Global hooks, idle (one array lookup) while no policy has files:.
        if let Err(e) = kernel.attach_lsm_hooks(Some(&cfg.pin_dir.join("lsm"))) {
            lsm = crate::kernel::LsmSupport {
                available: false,
                detail: format!("BPF LSM probe passed, but the file hooks failed: {e:#}"),
            };
        }
    }
    if lsm.available {
        tracing::info!("BPF LSM available: {}", lsm.detail);
    } else {
        tracing::warn!(
            "BPF LSM unavailable: {}; policies with files:/onTaint: are {}",
            lsm.detail,
            if cfg.allow_degraded {
                "enforced for network egress only (allowDegraded)"
            } else {
                "rejected"
            }
        );
    }
    if lsm.available {
        // The BPF LSM unix hooks see the peer socket: preferred over the
        // cgroup unix hooks (which are then not attached to cgroups).
        if let Err(e) = kernel.attach_unix_lsm_hooks(Some(&cfg.pin_dir.join("unix-lsm"))) {
            tracing::warn!("BPF LSM unix hooks: {e:#}");
        }
    }
    // Every BPF LSM program the daemon loads is loaded: the parsed kernel
    // BTF (~9 MB) goes (released to the kernel below, once start-up is over).
    kernel.release_btf();
    let unix = kernel.unix_support();
    let resolvers = if cfg.resolver_sockets.is_empty() {
        policy::local::default_resolver_sockets()
    } else {
        cfg.resolver_sockets.clone()
    };
    if unix.available {
        tracing::info!("unix socket hooks available: {}", unix.detail);
    } else {
        tracing::warn!(
            "unix socket hooks unavailable: {}; {}: spec.local is NOT enforced",
            unix.detail,
            crate::kernel::UNIX_REQUIREMENT
        );
    }
    kernel
        .set_resolver_sockets(&resolvers)
        .context("installing the resolver socket list")?;
    kernel.set_allow_sample(cfg.allow_events)?;
    let ring = kernel.take_events().context("event ring buffer")?;
    let flows = kernel.take_flows().context("flow tables")?;
    let metrics = Arc::new(Metrics::new());
    metrics.set_capability("bpf_lsm", lsm.available);
    metrics.set_capability("unix_sockets", unix.available);
    let audit = match &cfg.audit_log {
        Some(p) => {
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).ok();
            }
            let options = crate::audit::AuditOptions {
                format: cfg.audit_format,
                ..Default::default()
            };
            Some(
                AuditLog::open_with(p, options)
                    .with_context(|| format!("opening audit log {}", p.display()))?,
            )
        }
        None => None,
    };
    let sinks = Arc::new(Sinks::new(metrics.clone(), audit));
    let attribution = Attribution::default();
    let dns = Arc::new(DnsService::new(
        &mut kernel,
        sinks.clone(),
        metrics.clone(),
        attribution.clone(),
    )?);
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating stateDir {}", cfg.state_dir.display()))?;
    let slots = SlotTable::load(&cfg.state_dir.join("slots.json"));
    let state = State {
        cfg: cfg.clone(),
        kernel,
        mount,
        active: BTreeMap::new(),
        bound: HashMap::new(),
        slots,
        rejected: BTreeMap::new(),
        object_results: BTreeMap::new(),
        waiting: BTreeMap::new(),
        attribution: attribution.clone(),
        sinks: sinks.clone(),
        metrics: metrics.clone(),
        started: chrono::Utc::now(),
        reloads_ok: 0,
        reloads_rejected: 0,
        net_raw: BTreeMap::new(),
        dns: dns.clone(),
        lsm: lsm.clone(),
        unix,
        resolvers,
        degraded: BTreeMap::new(),
        pending_dns: Vec::new(),
        own_netns: crate::netns::NetnsId::own()
            .map_err(|e| {
                tracing::error!("reading /proc/self/ns/net: {e}; DNS proxy listeners in workload network namespaces are disabled")
            })
            .ok(),
        dns_netns: BTreeMap::new(),
        roots: BTreeMap::new(),
        resume_again: Vec::new(),
        unpivoted: HashMap::new(),
        kept: BTreeMap::new(),
        adopted: HashSet::new(),
        k8s: None,
        swept_files: false,
        swept_objects: false,
        pods: HashMap::new(),
        pending_pods: Vec::new(),
    };
    let state = Arc::new(Mutex::new(state));
    // Kubernetes mode: this node's pods and the AgentPolicy objects, watched
    // in the background; a change wakes the reconcile loop. Status reports
    // go to a writer task (API calls never hold the state lock or block
    // the loop).
    let pods_changed = Arc::new(tokio::sync::Notify::new());
    let policies_changed = Arc::new(tokio::sync::Notify::new());
    let mut k8s_tasks = Vec::new();
    let mut status_tx: Option<tokio::sync::watch::Sender<Vec<crate::k8s::policies::Report>>> = None;
    if let Some(kc) = &cfg.kubernetes {
        let node = kc
            .node_name
            .clone()
            .or_else(|| std::env::var("NODE_NAME").ok())
            .filter(|n| !n.is_empty())
            .context(
                "kubernetes: no node name (set kubernetes.nodeName or NODE_NAME from the \
                 downward API: fieldRef spec.nodeName)",
            )?;
        let client = match &kc.api_server {
            Some(url) => {
                let uri = url
                    .parse()
                    .map_err(|e| anyhow::anyhow!("kubernetes.apiServer {url:?}: {e}"))?;
                kube::Client::try_from(kube::Config::new(uri)).context("kubernetes client")?
            }
            None => kube::Client::try_default()
                .await
                .context("kubernetes client (in-cluster service account or kubeconfig)")?,
        };
        let cache = Arc::new(Mutex::new(crate::k8s::watch::PodCache::default()));
        let policies = kc
            .agent_policies
            .then(|| Arc::new(Mutex::new(crate::k8s::policies::PolicyCache::default())));
        state.lock().unwrap_or_else(|e| e.into_inner()).k8s = Some(K8s {
            cache: cache.clone(),
            policies: policies.clone(),
            trust_domain: kc.trust_domain.clone(),
            kubelet_root: kc.kubelet_cgroup_root.clone(),
            wake: pods_changed.clone(),
            parents: None,
            watched: HashSet::new(),
        });
        tracing::info!(node = %node, "kubernetes: watching this node's pods");
        let notify = pods_changed.clone();
        k8s_tasks.push(tokio::spawn(crate::k8s::watch::run(
            client.clone(),
            node.clone(),
            cache,
            move || notify.notify_one(),
        )));
        if let Some(policies) = policies {
            tracing::info!("kubernetes: watching AgentPolicy objects (all namespaces)");
            let notify = policies_changed.clone();
            k8s_tasks.push(tokio::spawn(crate::k8s::policies::run(
                client.clone(),
                policies,
                move || notify.notify_one(),
            )));
            let (tx, mut rx) = tokio::sync::watch::channel(Vec::new());
            status_tx = Some(tx);
            let mut writer = crate::k8s::policies::StatusWriter::new(client, &node);
            k8s_tasks.push(tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    let reports = rx.borrow_and_update().clone();
                    writer.sync(&reports).await;
                }
            }));
        }
    }
    {
        // Scrapes read the kernel counters at scrape time.
        let weak_state = Arc::downgrade(&state);
        let weak_metrics = Arc::downgrade(&metrics);
        metrics.set_collector(Box::new(move || {
            if let (Some(st), Some(m)) = (weak_state.upgrade(), weak_metrics.upgrade()) {
                let s = st.lock().unwrap_or_else(|e| e.into_inner());
                sink::publish_kernel_counters(&s.kernel, &m, &s.slot_names());
            }
        }));
    }
    // How long the node ran without a daemon (pins kept enforcing).
    let gap = heartbeat::previous(&cfg.state_dir).map(|prev| {
        let lost = state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .kernel
            .stat(enforcer_common::stat::EVENTS_LOST);
        heartbeat::describe_gap(prev, chrono::Utc::now().timestamp(), lost)
    });
    if let Some(g) = &gap {
        tracing::warn!("{g}");
    }
    heartbeat::beat(&cfg.state_dir, false);
    sinks.lifecycle(
        LifecycleAction::Start,
        None,
        "",
        &format!(
            "enforcer daemon, config {}{}",
            config_path.display(),
            gap.as_deref().map(|g| format!("; {g}")).unwrap_or_default()
        ),
    );
    // Reload triggers: SIGHUP, file changes (debounced), periodic tick.
    // The directory is watched before the first read of its policies: a
    // file changed while the daemon starts (seconds with many bindings) is
    // either read by that first reload or wakes the loop below for another
    // (the watcher's events queue until the loop runs).
    let (tx, mut rx) = tokio::sync::mpsc::channel::<&'static str>(16);
    let _watcher = watch_dir(&cfg.policies_dir, tx.clone());
    {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        s.reload_policies();
    }
    start_dns(&state, &dns).await;
    {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        s.reconcile_bindings();
        s.scan_net_raw();
        if let Some(tx) = &status_tx {
            tx.send_replace(s.policy_reports());
        }
    }
    dns_netns::sync(&state, &dns, &metrics).await;
    // Start-up parsed the kernel's BTF twice (struct offsets; aya's, for the
    // BPF LSM loads) and the eBPF object: ~20 MB of small allocations, freed
    // now but kept by the allocator. Hand them back to the kernel (a long-lived node
    // daemon's RSS is what operators watch).
    crate::kernel::release_free_memory();

    let _metrics_server = match cfg.metrics_addr {
        Some(addr) => {
            let (bound, handle) = metrics::serve(metrics.clone(), addr, Arc::new(|| true)).await?;
            tracing::info!("metrics on http://{bound}/metrics");
            Some(handle)
        }
        None => None,
    };
    let readers = Readers::spawn(ring, flows, sinks.clone(), dns.attributor(attribution));
    let control_task = control::serve(&cfg.control_socket, state.clone()).await?;

    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_secs(cfg.resync_seconds));
    println!(
        "enforcer daemon: ready (control socket {})",
        cfg.control_socket.display()
    );
    loop {
        let why = tokio::select! {
            _ = hup.recv() => "sighup",
            Some(w) = rx.recv() => {
                // Debounce bursts of file events (editors write in several steps).
                tokio::time::sleep(Duration::from_millis(200)).await;
                while rx.try_recv().is_ok() {}
                w
            }
            _ = tick.tick() => "tick",
            _ = pods_changed.notified() => "pods",
            _ = policies_changed.notified() => "agentpolicies",
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        {
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            if why == "sighup" {
                match Config::load(&config_path) {
                    Ok(new) => {
                        if new.bindings != s.cfg.bindings {
                            tracing::info!("bindings changed in config");
                        }
                        s.cfg.bindings = new.bindings;
                    }
                    Err(e) => tracing::error!("config reload rejected, keeping the old one: {e:#}"),
                }
            }
            if why != "tick" && why != "pods" {
                tracing::info!(trigger = why, "reloading policies");
                s.reload_policies();
            } else {
                s.retry_unresolved_files();
                s.retry_moved_unix_sockets();
                if why == "tick" {
                    s.grow_roots();
                }
            }
        }
        start_dns(&state, &dns).await;
        {
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            s.reconcile_bindings();
            s.scan_net_raw();
            if let Some(tx) = &status_tx {
                tx.send_replace(s.policy_reports());
            }
            // Kernel counters reach the metrics at scrape time (the collector).
            dns.gc(&metrics, &s.slot_names());
        }
        dns_netns::sync(&state, &dns, &metrics).await;
        if why == "tick" {
            heartbeat::beat(&cfg.state_dir, false);
        }
    }
    heartbeat::beat(&cfg.state_dir, true);
    tracing::info!("shutting down; pinned programs stay attached (enforcement continues)");
    sinks.lifecycle(
        LifecycleAction::Stop,
        None,
        "",
        "daemon stopped; pinned links keep enforcing",
    );
    readers.finish().await;
    control_task.abort();
    for t in k8s_tasks {
        t.abort();
    }
    let _ = std::fs::remove_file(&cfg.control_socket);
    // Attachments are pinned: dropping them here closes our fds only.
    Ok(0)
}

/// (Re)start the DNS proxies a reload asked for, then point each identity's
/// steering at its proxy port. The state lock is not held across the await.
async fn start_dns(state: &Mutex<State>, dns: &DnsService) {
    let pending = std::mem::take(&mut state.lock().unwrap_or_else(|e| e.into_inner()).pending_dns);
    for (slot, policy) in pending {
        let name = policy.identity.name.clone();
        // After a restart the pinned kernel state still steers to the old
        // proxy's port: take the same one if it is free.
        let preferred = {
            let s = state.lock().unwrap_or_else(|e| e.into_inner());
            Some(s.kernel.dns_port(slot)).filter(|p| *p != 0)
        };
        match dns.start(slot, policy, preferred).await {
            Ok(port) => {
                let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                match s.kernel.set_dns_port(slot, port) {
                    Ok(()) => tracing::info!(policy = %name, port, "DNS proxy serving"),
                    Err(e) => tracing::error!(policy = %name, "steering DNS to the proxy: {e:#}"),
                }
            }
            Err(e) => tracing::error!(policy = %name, "starting the DNS proxy: {e:#}"),
        }
    }
}

fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let on_bpffs = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[2] == "bpf" && pin_dir.starts_with(f[1])
    });
    if !on_bpffs {
        anyhow::bail!(
            "pinDir {} is not on a bpffs mount; mount one with `mount -t bpf bpf /sys/fs/bpf` \
             (the DaemonSet mounts the host's /sys/fs/bpf)",
            pin_dir.display()
        );
    }
    crate::kernel::private_dir(pin_dir)?;
    crate::kernel::private_dir(&pin_dir.join("links"))?;
    Ok(())
}

fn watch_dir(
    dir: &Path,
    tx: tokio::sync::mpsc::Sender<&'static str>,
) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if !ev.kind.is_access() {
                let _ = tx.try_send("file-change");
            }
        }
    })
    .map_err(|e| tracing::warn!("file watcher unavailable ({e}); reload with SIGHUP"))
    .ok()?;
    w.watch(dir, RecursiveMode::NonRecursive)
        .map_err(|e| tracing::warn!("watching {}: {e}; reload with SIGHUP", dir.display()))
        .ok()?;
    Some(w)
}

#[cfg(test)]
mod slot_tests {
    use super::SlotTable;

    #[test]
    fn a_full_slot_table_reuses_only_what_reclaim_frees() {
        let mut t = SlotTable::default();
        let max = enforcer_common::MAX_SLOTS;
        for i in 1..max {
            assert_eq!(t.get_or_alloc(&format!("ns/p{i}")), Some(i));
        }
        assert_eq!(t.get_or_alloc("ns/new"), None, "full");
        assert_eq!(
            t.get_or_alloc("ns/p7"),
            Some(7),
            "existing names keep their slot"
        );
        // Only p7 and p9 are gone and unreferenced.
        let freed = t.reclaim(|n, _| n != "ns/p7" && n != "ns/p9");
        assert_eq!(
            freed,
            vec![("ns/p7".to_string(), 7), ("ns/p9".to_string(), 9)]
        );
        assert_eq!(t.get_or_alloc("ns/new"), Some(7));
        assert_eq!(t.get_or_alloc("ns/new2"), Some(9));
        assert_eq!(t.get_or_alloc("ns/new3"), None);
        assert_eq!(t.get_or_alloc("ns/p8"), Some(8));
    }
}
