//! `enforcer daemon --config FILE`: the node daemon.
//!
//! Reconcile loop: policies directory + static bindings (config) ->
//! compiled tables -> kernel. Runs at start, on SIGHUP, on any change in the
//! policies directory (inotify, debounced) and every few seconds (for bound
//! cgroups that did not exist yet).
//!
//! Reload semantics: each file is validated on its own. A file with any
//! error is rejected as a whole, reported (log, audit record,
//! `enforcer_policy_reloads_total{result="rejected"}`, `enforcer status`) and
//! the policies it held before stay in force. Valid changes replace an
//! identity's tables atomically (see `kernel`). A policy that disappears
//! leaves its bound cgroups failing closed.
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
        reader::{self, Attribution, Clock, SlotInfo},
        sink::{self, Sinks},
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
    source: PathBuf,
    slot: u32,
    /// `spec.files` resolved to inodes when installed (re-resolved on every
    /// reconcile: a protected path created later gets its inode protected).
    files: crate::kernel::files::ResolvedFiles,
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
    trust_domain: String,
    kubelet_root: Option<PathBuf>,
}

/// A pod bound through its pod-level cgroup.
#[derive(Clone, Debug)]
struct PodBinding {
    entry: crate::k8s::watch::PodEntry,
    policy: String,
    spiffe_id: String,
}

/// Slot assignment, persisted in `stateDir` (bpffs holds only pins) so that a
/// restarted daemon keeps every identity in the slot its cgroups already
/// point to.
#[derive(Default, Serialize, Deserialize)]
struct SlotTable {
    slots: BTreeMap<String, u32>,
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
    rejected: BTreeMap<PathBuf, Rejection>,
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
    /// Per policy: what is not enforced because the kernel lacks BPF LSM.
    degraded: BTreeMap<String, String>,
    /// Kubernetes mode: the node's pods (filled by the watcher task).
    k8s: Option<K8s>,
    /// Kubernetes mode: pod-level cgroup -> the pod bound there (status).
    pods: HashMap<PathBuf, PodBinding>,
    /// DNS proxies to (re)start after a reload (async, outside the lock).
    pending_dns: Vec<(u32, Arc<DnsPolicy>)>,
    /// The daemon's own network namespace (its proxy's home listeners).
    own_netns: Option<crate::netns::NetnsId>,
    /// (slot, namespace) used by bound processes, served by the DNS proxy
    /// there or not (see `dns_netns`).
    dns_netns: BTreeMap<(u32, crate::netns::NetnsId), dns_netns::NetnsUse>,
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

    /// Read every policy file; apply what is valid, keep the old version of
    /// what is not.
    fn reload_policies(&mut self) {
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&self.cfg.policies_dir) {
            Ok(rd) => rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.is_file()
                        && matches!(
                            p.extension().and_then(|e| e.to_str()),
                            Some("yaml") | Some("yml")
                        )
                })
                .collect(),
            Err(e) => {
                tracing::error!(dir = %self.cfg.policies_dir.display(), "reading policies directory: {e}");
                return;
            }
        };
        files.sort();
        let now = chrono::Utc::now().to_rfc3339();
        // name -> (compiled, source, dns view)
        let mut desired: BTreeMap<String, (CompiledPolicy, PathBuf, Arc<DnsPolicy>)> =
            BTreeMap::new();
        let mut rejected_files: HashSet<PathBuf> = HashSet::new();
        let mut new_rejections: BTreeMap<PathBuf, Rejection> = BTreeMap::new();
        for file in &files {
            let result: Result<Vec<Compiled>, Vec<String>> =
                match policy::load_files(std::slice::from_ref(file)) {
                    Err(e) => Err(e.0.iter().map(|x| x.to_string()).collect()),
                    Ok(list) => {
                        let mut out = Vec::new();
                        let mut errs = Vec::new();
                        for mut p in list {
                            match crate::run::gate_file_policy(
                                &mut p,
                                &self.lsm,
                                self.cfg.allow_degraded,
                            ) {
                                Ok(Some(note)) => {
                                    if self.degraded.get(&p.policy.metadata.name) != Some(&note) {
                                        tracing::warn!("{note}");
                                    }
                                    self.degraded.insert(p.policy.metadata.name.clone(), note);
                                }
                                Ok(None) => {
                                    self.degraded.remove(&p.policy.metadata.name);
                                }
                                Err(e) => {
                                    errs.push(format!("{e:#}"));
                                    continue;
                                }
                            }
                            if let Err(e) = policy::check_supported(&p) {
                                errs.extend(e.0.iter().map(|x| x.to_string()));
                                continue;
                            }
                            match policy::compile::compile(&p) {
                                Ok(c) => {
                                    let d = Arc::new(crate::dns::compile_dns(&p, &c));
                                    out.push((p, c, d))
                                }
                                Err(e) => errs.extend(e.0.iter().map(|x| x.to_string())),
                            }
                        }
                        for (p, _, _) in &out {
                            let name = &p.policy.metadata.name;
                            if let Some((_, other, _)) = desired.get(name) {
                                errs.push(format!(
                                "{}:{}: metadata.name: duplicate policy name {name:?} (also in {})",
                                file.display(),
                                p.line,
                                other.display()
                            ));
                            }
                        }
                        if errs.is_empty() {
                            Ok(out)
                        } else {
                            Err(errs)
                        }
                    }
                };
            match result {
                Ok(list) => {
                    for (_, c, d) in list {
                        desired.insert(c.name.clone(), (c, file.clone(), d));
                    }
                }
                Err(errors) => {
                    rejected_files.insert(file.clone());
                    new_rejections.insert(
                        file.clone(),
                        Rejection {
                            file: file.display().to_string(),
                            errors,
                            at: now.clone(),
                        },
                    );
                }
            }
        }
        // A rejected file keeps its previously active policies in force.
        for (name, a) in &self.active {
            if rejected_files.contains(&a.source) && !desired.contains_key(name) {
                desired.insert(
                    name.clone(),
                    (a.compiled.clone(), a.source.clone(), a.dns.clone()),
                );
            }
        }
        for (file, r) in &new_rejections {
            let is_new = self
                .rejected
                .get(file)
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
                    &format!("{}: {}", file.display(), r.errors.join("; ")),
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
            let previous = self
                .active
                .get(name)
                .filter(|a| a.compiled.hash == compiled.hash);
            let files = match previous {
                Some(a) if a.files.unresolved.is_empty() => a.files.clone(),
                _ => self.kernel.resolve_files(&compiled.files),
            };
            let same = previous.is_some_and(|a| a.files == files);
            if same {
                if let Some(a) = self.active.get_mut(name) {
                    a.source = source.clone();
                }
                continue;
            }
            let Some(slot) = self.slots.get_or_alloc(name) else {
                tracing::error!(policy = %name, "no free identity slot");
                continue;
            };
            let fresh = !self.active.contains_key(name);
            if fresh {
                self.kernel.reset_slot_counters(slot);
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
                        &format!("{} ({} entries)", source.display(), compiled.entry_count()),
                    );
                    if !fresh {
                        self.dns.forget(slot);
                    }
                    self.pending_dns.push((slot, dns.clone()));
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
                    &format!("{} removed; bound cgroups fail closed", a.source.display()),
                );
            }
        }
        if changed {
            self.metrics.record_policy_reload(ReloadResult::Ok);
            self.reloads_ok += 1;
        }
        self.slots.save(&self.slots_file());
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
        let pods = self.pod_bindings();
        for (path, p) in &pods {
            wanted
                .entry(path.clone())
                .or_insert_with(|| p.policy.clone());
        }
        self.pods = pods;
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
    }

    /// Kubernetes mode: the pod-level cgroup of every pod of this node that
    /// an active policy selects. Binding the pod-level cgroup (created with
    /// the pod sandbox, before any app container starts) means init, app and
    /// ephemeral containers start already enforced (the programs run for
    /// every descendant cgroup). Pods two policies select are bound to a
    /// policy name that cannot exist, so they fail closed.
    fn pod_bindings(&self) -> HashMap<PathBuf, PodBinding> {
        use crate::k8s::{binding, cgroups};
        let mut out = HashMap::new();
        let Some(k) = &self.k8s else {
            return out;
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
            let (policy, id) = match binding::bind(
                identities.iter().map(|(n, i)| (n.as_str(), Some(i))),
                &pod.info,
            ) {
                binding::Binding::None => continue,
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
            let Some((path, _driver)) =
                cgroups::resolve_pod(&self.mount, k.kubelet_root.as_deref(), &pod.pod_ref())
            else {
                tracing::debug!(pod = %pod.info.name, "pod cgroup not found yet");
                continue;
            };
            let spiffe_id = binding::spiffe_id(id.as_ref(), &k.trust_domain, &pod.info);
            out.insert(
                path,
                PodBinding {
                    entry: pod.clone(),
                    policy,
                    spiffe_id,
                },
            );
        }
        out
    }

    /// `cgroup/sock_create` only runs for inet sockets: a process holding
    /// CAP_NET_RAW can open an AF_PACKET socket that no cgroup hook sees, and
    /// tc egress can be bypassed (PACKET_QDISC_BYPASS). Without BPF LSM
    /// (`lsm_cgroup/socket_create`) the daemon cannot refuse it, so it finds
    /// such processes and says so loudly: log (once per process), metric,
    /// `enforcer status`. Containers should drop NET_RAW.
    fn scan_net_raw(&mut self) {
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
                         sockets cannot be refused without BPF LSM; drop NET_RAW from the workload",
                        path.display(),
                        b.policy
                    );
                    if !self.net_raw.contains_key(&pid) {
                        tracing::warn!("{what}");
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
    fn publish_workloads(&self) {
        use crate::events::Workload;
        let mut map = HashMap::new();
        let mut info = Vec::new();
        for (path, p) in &self.pods {
            let (ns, pod) = (&p.entry.info.namespace, &p.entry.info.name);
            info.push((
                p.policy.clone(),
                p.spiffe_id.clone(),
                ns.clone(),
                pod.clone(),
                p.entry.info.uid.clone(),
            ));
            if let Ok(id) = cgroup::cgroup_id(path) {
                map.insert(
                    id,
                    Workload {
                        namespace: ns.clone(),
                        pod: pod.clone(),
                        container: None,
                    },
                );
            }
            for (c, dir) in self.container_cgroups(&p.entry) {
                let Some(id) = dir.and_then(|d| cgroup::cgroup_id(&d).ok()) else {
                    continue;
                };
                map.insert(
                    id,
                    Workload {
                        namespace: ns.clone(),
                        pod: pod.clone(),
                        container: Some(c.name.clone()),
                    },
                );
            }
        }
        self.attribution.set_workloads(map);
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

    fn pod_status(&self, policy: &str) -> Vec<control::PodStatus> {
        let mut out: Vec<control::PodStatus> = self
            .pods
            .iter()
            .filter(|(_, p)| p.policy == policy)
            .map(|(path, p)| control::PodStatus {
                namespace: p.entry.info.namespace.clone(),
                name: p.entry.info.name.clone(),
                uid: p.entry.info.uid.clone(),
                spiffe_id: p.spiffe_id.clone(),
                cgroup: if self.bound.contains_key(path) {
                    path.display().to_string()
                } else {
                    String::new()
                },
                containers: self
                    .container_cgroups(&p.entry)
                    .into_iter()
                    .map(|(c, dir)| control::ContainerStatusOut {
                        name: c.name.clone(),
                        kind: format!("{:?}", c.kind).to_lowercase(),
                        container_id: c.container_id.clone(),
                        cgroup: dir.map(|d| d.display().to_string()),
                    })
                    .collect(),
            })
            .collect();
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
                source: a.source.display().to_string(),
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
            capabilities: BTreeMap::from([(
                "bpf_lsm".to_string(),
                control::Capability {
                    available: self.lsm.available,
                    detail: self.lsm.detail.clone(),
                },
            )]),
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
        if let Err(e) = kernel.attach_file_hooks(Some(&cfg.pin_dir.join("lsm"))) {
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
    kernel.set_allow_sample(cfg.allow_events)?;
    let ring = kernel.take_events().context("event ring buffer")?;
    let metrics = Arc::new(Metrics::new());
    metrics.set_capability("bpf_lsm", lsm.available);
    let audit = match &cfg.audit_log {
        Some(p) => {
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).ok();
            }
            Some(AuditLog::open(p).with_context(|| format!("opening audit log {}", p.display()))?)
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
        degraded: BTreeMap::new(),
        pending_dns: Vec::new(),
        own_netns: crate::netns::NetnsId::own()
            .map_err(|e| {
                tracing::error!("reading /proc/self/ns/net: {e}; DNS proxy listeners in workload network namespaces are disabled")
            })
            .ok(),
        dns_netns: BTreeMap::new(),
        k8s: None,
        pods: HashMap::new(),
    };
    let state = Arc::new(Mutex::new(state));
    // Kubernetes mode: this node's pods, watched in the background; a change
    // wakes the reconcile loop.
    let pods_changed = Arc::new(tokio::sync::Notify::new());
    let _pod_watcher = match &cfg.kubernetes {
        Some(kc) => {
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
            state.lock().unwrap_or_else(|e| e.into_inner()).k8s = Some(K8s {
                cache: cache.clone(),
                trust_domain: kc.trust_domain.clone(),
                kubelet_root: kc.kubelet_cgroup_root.clone(),
            });
            tracing::info!(node = %node, "kubernetes: watching this node's pods");
            let notify = pods_changed.clone();
            Some(tokio::spawn(crate::k8s::watch::run(
                client,
                node,
                cache,
                move || notify.notify_one(),
            )))
        }
        None => None,
    };
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
    sinks.lifecycle(
        LifecycleAction::Start,
        None,
        "",
        &format!("enforcer daemon, config {}", config_path.display()),
    );
    {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        s.reload_policies();
    }
    start_dns(&state, &dns).await;
    {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        s.reconcile_bindings();
        s.scan_net_raw();
    }
    dns_netns::sync(&state, &dns, &metrics).await;

    let _metrics_server = match cfg.metrics_addr {
        Some(addr) => {
            let (bound, handle) = metrics::serve(metrics.clone(), addr, Arc::new(|| true)).await?;
            tracing::info!("metrics on http://{bound}/metrics");
            Some(handle)
        }
        None => None,
    };
    let clock = Clock::new();
    let reader_task = {
        let sinks_h = sinks.clone();
        let sinks_f = sinks.clone();
        let attribute = dns.attributor(attribution);
        tokio::spawn(reader::run(
            ring,
            move |ev| sinks_h.handle(&attribute(&ev, &clock)),
            move || sinks_f.flush(),
        ))
    };
    let control_task = control::serve(&cfg.control_socket, state.clone()).await?;

    // Reload triggers: SIGHUP, file changes (debounced), periodic tick.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<&'static str>(16);
    let _watcher = watch_dir(&cfg.policies_dir, tx.clone());
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
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
            }
        }
        start_dns(&state, &dns).await;
        {
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            s.reconcile_bindings();
            s.scan_net_raw();
            // Kernel counters reach the metrics at scrape time (the collector).
            dns.gc(&metrics, &s.slot_names());
        }
        dns_netns::sync(&state, &dns, &metrics).await;
    }
    tracing::info!("shutting down; pinned programs stay attached (enforcement continues)");
    sinks.lifecycle(
        LifecycleAction::Stop,
        None,
        "",
        "daemon stopped; pinned links keep enforcing",
    );
    reader_task.abort();
    control_task.abort();
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
    std::fs::create_dir_all(pin_dir.join("links"))?;
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
