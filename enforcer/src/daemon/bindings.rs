//! Cgroups and pods -> identities: the static bindings of the config, the
//! node's pods (Kubernetes mode) and their containers, pods whose cgroup
//! does not exist yet, and the CAP_NET_RAW scan of bound processes.
use super::*;

/// Cgroups and pods -> identities: what is bound where. Other steps read
/// it through its methods; only this file changes it (but `dns_netns`,
/// which `dns_netns::sync` records).
#[derive(Default)]
pub(super) struct Bindings {
    bound: HashMap<PathBuf, Bound>,
    /// Bound cgroups that do not exist yet, with their policy.
    waiting: BTreeMap<PathBuf, String>,
    /// Kubernetes mode: pod-level cgroup -> the pod bound there (status).
    pods: HashMap<PathBuf, PodBinding>,
    /// Kubernetes mode: pods a policy selects whose pod-level cgroup does
    /// not exist yet (sandbox not made; bound when it appears, see
    /// `watch_pending_pods`).
    pending_pods: Vec<PodBinding>,
    /// Processes in bound cgroups holding CAP_NET_RAW (see `scan_net_raw`).
    net_raw: BTreeMap<u32, String>,
    /// (slot, namespace) used by bound processes, served by the DNS proxy
    /// there or not (see `dns_netns`).
    pub(super) dns_netns: BTreeMap<(u32, crate::netns::NetnsId), dns_netns::NetnsUse>,
}

/// One bound cgroup.
pub(super) struct Bound {
    pub(super) attachment: Attachment,
    pub(super) policy: String,
    pub(super) slot: u32,
}

impl State {
    /// Attach to bound cgroups that exist, bind them to their identity slot
    /// (slot 0 = no policy: fail closed), release removed bindings.
    pub(super) fn reconcile_bindings(&mut self) {
        let (pods, pending) = match &self.k8s {
            Some(k) => pod_bindings(&self.node.mount, k, &self.policies, &self.bindings.pods),
            None => Default::default(),
        };
        let wanted = wanted_cgroups(&self.node, &pods);
        self.bindings.pods = pods;
        self.bindings.pending_pods = pending;
        if let Some(k) = self.k8s.as_mut() {
            let per_root = self.bindings.per_root_pods(&self.policies, true);
            k.watch_pending_pods(&self.node.mount, &self.bindings, per_root);
            self.bindings.publish_workloads(&self.node, k);
        }
        self.bindings
            .bind(&self.node, &mut self.kernel, &self.policies, wanted);
        self.reconcile_roots();
    }
}

/// Every cgroup to bind, with its policy: the config's bindings, then
/// the pods'.
fn wanted_cgroups(node: &Node, pods: &HashMap<PathBuf, PodBinding>) -> HashMap<PathBuf, String> {
    let mut wanted: HashMap<PathBuf, String> = HashMap::new();
    for b in &node.cfg.bindings {
        let path = if b.cgroup.is_absolute() {
            b.cgroup.clone()
        } else {
            node.mount.join(&b.cgroup)
        };
        wanted.insert(path, b.policy.clone());
    }
    for (path, p) in pods {
        wanted
            .entry(path.clone())
            .or_insert_with(|| p.policy.clone());
    }
    wanted
}

impl Bindings {
    /// Release the bindings not wanted any more (or whose cgroup is gone),
    /// then bind every wanted cgroup that exists; the others wait.
    fn bind(
        &mut self,
        node: &Node,
        kernel: &mut Kernel,
        policies: &Policies,
        wanted: HashMap<PathBuf, String>,
    ) {
        let gone: Vec<PathBuf> = self
            .bound
            .keys()
            .filter(|p| !wanted.contains_key(*p) || !p.is_dir())
            .cloned()
            .collect();
        for p in gone {
            if let Some(b) = self.bound.remove(&p) {
                let _ = kernel.unbind_cgroup(b.attachment.cgroup_id);
                tracing::info!(cgroup = %p.display(), "binding released");
                node.sinks
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
            let slot = policies.slot_or_unknown(&policy);
            if let Some(b) = self.bound.get_mut(&path) {
                if b.slot != slot || b.policy != policy {
                    if let Err(e) = kernel.bind_cgroup(b.attachment.cgroup_id, slot) {
                        tracing::error!(cgroup = %path.display(), "rebinding: {e:#}");
                    }
                    b.slot = slot;
                    b.policy = policy;
                }
                continue;
            }
            self.attach(node, kernel, policies, path, policy, slot);
        }
        node.metrics.set_attached_cgroups(self.bound.len() as u64);
    }

    /// Bind a cgroup not bound yet to `slot` and attach the programs to it
    /// (adopting a previous run's pinned links).
    fn attach(
        &mut self,
        node: &Node,
        kernel: &mut Kernel,
        policies: &Policies,
        path: PathBuf,
        policy: String,
        slot: u32,
    ) {
        let id = match cgroup::cgroup_id(&path) {
            Ok(id) => id,
            Err(e) => {
                tracing::error!("{e:#}");
                return;
            }
        };
        // Bind first: from the first program run on, the cgroup has an identity.
        if let Err(e) = kernel.bind_cgroup(id, slot) {
            tracing::error!(cgroup = %path.display(), "binding: {e:#}");
            return;
        }
        let dir = node.links_dir(id);
        let attachment = match kernel.adopt_pinned(&path, &dir) {
            Ok(Some(a)) => {
                tracing::info!(cgroup = %path.display(), "adopted pinned links from a previous run");
                Ok(a)
            }
            _ => kernel.attach(&path, Some(&dir)),
        };
        match attachment {
            Ok(attachment) => {
                if slot == enforcer_common::SLOT_UNKNOWN {
                    tracing::warn!(cgroup = %path.display(), policy = %policy, "bound policy is not loaded: cgroup fails closed");
                }
                tracing::info!(cgroup = %path.display(), cgroup_id = id, policy = %policy, "attached");
                let active = policies.get(&policy);
                node.sinks.lifecycle(
                    LifecycleAction::Attach,
                    active.map(|a| identity(&a.compiled)).as_ref(),
                    active.map(|a| a.compiled.hash.as_str()).unwrap_or(""),
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

    pub(super) fn bound(&self) -> &HashMap<PathBuf, Bound> {
        &self.bound
    }

    /// Whether a cgroup this daemon bound points to `slot`.
    pub(super) fn uses_slot(&self, slot: u32) -> bool {
        self.bound.values().any(|b| b.slot == slot)
    }

    pub(super) fn waiting(&self) -> impl Iterator<Item = &PathBuf> {
        self.waiting.keys()
    }

    pub(super) fn pods(&self) -> &HashMap<PathBuf, PodBinding> {
        &self.pods
    }

    pub(super) fn pending_pods(&self) -> &[PodBinding] {
        &self.pending_pods
    }

    pub(super) fn net_raw(&self) -> impl Iterator<Item = &String> {
        self.net_raw.values()
    }

    /// The bound pods whose containers are resolved per root, with their
    /// policy (their cgroups are watched for new container cgroups).
    pub(super) fn per_root_pods(
        &self,
        policies: &Policies,
        kubernetes: bool,
    ) -> Vec<(PathBuf, String)> {
        self.pods
            .iter()
            .filter(|(_, b)| {
                policies
                    .get(&b.policy)
                    .is_some_and(|a| roots::per_root(kubernetes, &a.compiled))
            })
            .map(|(p, b)| (p.clone(), b.policy.clone()))
            .collect()
    }

    /// `cgroup/sock_create` only runs for inet sockets: a process holding
    /// CAP_NET_RAW can open an AF_PACKET socket that no cgroup hook sees, and
    /// tc egress can be bypassed (PACKET_QDISC_BYPASS). With BPF LSM the
    /// daemon's `lsm/socket_create` hook refuses those sockets; without it
    /// the daemon cannot, so it finds such processes and says so loudly: log
    /// (once per process), metric, `enforcer status`. Containers should drop
    /// NET_RAW either way (the metric counts them in both cases).
    pub(super) fn scan_net_raw(&mut self, kernel: &Kernel, metrics: &Metrics, policies: &Policies) {
        let refused = kernel.lsm_hooks_attached();
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
        for (name, _) in policies.iter() {
            metrics.set_net_raw_processes(name, per_identity.get(name).copied().unwrap_or(0));
        }
        self.net_raw = found;
    }
}

/// Kubernetes mode: the pod-level cgroup of every pod of this node that
/// an active policy selects. Binding the pod-level cgroup (created with
/// the pod sandbox, before any app container starts) means init, app and
/// ephemeral containers start already enforced (the programs run for
/// every descendant cgroup). Pods two policies select are bound to a
/// policy name that cannot exist, so they fail closed; so do bound pods
/// whose policy was removed (until the pod goes).
fn pod_bindings(
    mount: &Path,
    k: &K8s,
    policies: &Policies,
    bound_pods: &HashMap<PathBuf, PodBinding>,
) -> (HashMap<PathBuf, PodBinding>, Vec<PodBinding>) {
    use crate::k8s::{binding, cgroups};
    let mut out = HashMap::new();
    let mut pending = Vec::new();
    let identities: Vec<(String, crate::policy::Identity)> = policies
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
            binding::Binding::None => match bound_pods
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
        match cgroups::resolve_pod(mount, k.kubelet_root.as_deref(), &pod.pod_ref()) {
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

impl K8s {
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
    fn watch_pending_pods(
        &mut self,
        mount: &Path,
        bindings: &Bindings,
        per_root: Vec<(PathBuf, String)>,
    ) {
        use notify::{RecursiveMode, Watcher};
        let k = self;
        let mut wanted: HashSet<PathBuf> = HashSet::new();
        for p in &bindings.pending_pods {
            for dir in crate::k8s::cgroups::pod_parent_dirs(
                mount,
                k.kubelet_root.as_deref(),
                &p.entry.pod_ref(),
            ) {
                if dir.is_dir() {
                    wanted.insert(dir);
                }
            }
        }
        for path in bindings.pods.keys() {
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
}

/// Each container of `e` with its cgroup directory, once it exists.
pub(super) fn container_cgroups<'e>(
    mount: &Path,
    k8s: Option<&K8s>,
    e: &'e crate::k8s::watch::PodEntry,
) -> Vec<(&'e crate::k8s::watch::ContainerEntry, Option<PathBuf>)> {
    use crate::k8s::cgroups;
    let kubelet_root = k8s.and_then(|k| k.kubelet_root.as_deref());
    let pod = e.pod_ref();
    e.containers
        .iter()
        .map(|c| {
            let dir = c
                .container_id
                .as_deref()
                .and_then(|id| id.parse::<cgroups::ContainerId>().ok())
                .and_then(|id| cgroups::resolve_container(mount, kubelet_root, &pod, &id));
            (c, dir)
        })
        .collect()
}
