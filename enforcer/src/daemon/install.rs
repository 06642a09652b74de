//! Prepared policies -> kernel: install and replace identities' tables,
//! the sweep of stale pinned state after a restart, slots (`slots.json`,
//! [`SlotTable`]) and their reclaiming, and the retries of `files:` paths
//! and unix socket rules that did not resolve yet.
use super::{
    sources::{Desired, Sources},
    *,
};

/// Sources -> kernel: the policies in force and what the last reload
/// refused. Other steps read it through its methods; only this file
/// changes it.
#[derive(Default)]
pub(super) struct Policies {
    active: BTreeMap<String, Active>,
    slots: SlotTable,
    rejected: BTreeMap<Source, Rejection>,
    /// `AgentPolicy` objects by UID: the last reload's verdict.
    object_results: BTreeMap<String, ObjectResult>,
    /// Per policy: what is not enforced because the kernel lacks BPF LSM.
    degraded: BTreeMap<String, String>,
    reloads_ok: u64,
    reloads_rejected: u64,
    /// DNS proxies to (re)start after a reload (async, outside the lock).
    pending_dns: Vec<(u32, Arc<DnsPolicy>)>,
    /// Policies of a previous daemon that are gone were removed from the
    /// kernel: file policies (after the first reload), objects (after the
    /// first complete list). See `sweep_stale`.
    swept_files: bool,
    swept_objects: bool,
}

/// One active policy.
pub(super) struct Active {
    pub(super) compiled: CompiledPolicy,
    pub(super) dns: Arc<DnsPolicy>,
    pub(super) source: Source,
    pub(super) slot: u32,
    /// `spec.files` resolved to inodes when installed (re-resolved on every
    /// reconcile: a protected path created later gets its inode protected).
    pub(super) files: crate::kernel::files::ResolvedFiles,
}

impl State {
    /// Read every policy source (files, then `AgentPolicy` objects); apply
    /// what is valid, keep the old version of what is not.
    pub(super) fn reload_policies(&mut self) {
        let sources = Sources::read(&self.node.cfg.policies_dir, self.k8s.as_ref());
        let trust_domain = self
            .k8s
            .as_ref()
            .map(|k| k.trust_domain.clone())
            .unwrap_or_default();
        let evaluation = sources.evaluate(&self.node, &mut self.policies.degraded, &trust_domain);
        self.policies.object_results = evaluation.object_results;
        let desired = self.policies.keep_in_force(
            evaluation.desired,
            &evaluation.rejected,
            sources.files.is_some(),
        );
        self.policies
            .report_rejections(&self.node, evaluation.rejected);
        let mut changed = false;
        for (name, want) in &desired {
            changed |= self.put_in_force(name, want);
        }
        changed |= self
            .policies
            .remove_undesired(&self.node, &mut self.kernel, &desired);
        let objects_known = match &self.k8s {
            Some(K8s {
                policies: Some(c), ..
            }) => c.lock().unwrap_or_else(|e| e.into_inner()).synced(),
            _ => true,
        };
        self.policies
            .finish_reload(&self.node, &mut self.kernel, changed, objects_known);
    }

    /// Install one desired policy unless it is in force already, with its
    /// paths resolved; whether the kernel changed.
    fn put_in_force(&mut self, name: &str, want: &Desired) -> bool {
        let compiled = &want.compiled;
        // Paths are resolved again only for a new policy or while some
        // rule path is missing (a protected path created later gets
        // protected); a complete resolution stays valid (inodes).
        let previous = self.policies.files_if_same(name, &compiled.hash);
        let files = match &previous {
            Some(f) if f.unresolved.is_empty() => f.clone(),
            // Pods: the paths are resolved in each container's root.
            _ if roots::per_root(self.k8s.is_some(), compiled) => {
                self.resolve_in_roots(name, compiled)
            }
            _ => self.kernel.resolve_files(&compiled.files),
        };
        if previous.as_ref() == Some(&files) {
            self.policies.set_source(name, &want.source);
            return false;
        }
        let Some(slot) = self.slot_for(name, &want.source) else {
            return false;
        };
        self.policies
            .install(&self.node, &mut self.kernel, name, want, slot, files)
    }

    /// A per-root policy's files: what its containers resolve to, after
    /// adopting a previous run's (first install) and carrying over what
    /// the rules the new version keeps resolved to.
    fn resolve_in_roots(
        &mut self,
        name: &str,
        compiled: &CompiledPolicy,
    ) -> crate::kernel::files::ResolvedFiles {
        if let Some(slot) = self.policies.slots.slot_of(name) {
            self.roots
                .adopt(&self.node, &mut self.kernel, name, slot, compiled);
        }
        let old = self
            .policies
            .get(name)
            .map(|a| a.compiled.files.clone())
            .unwrap_or_default();
        self.roots.refresh(&mut self.kernel, name, &old, compiled);
        self.roots.files_of(name)
    }

    /// The identity slot of `name`: its own, a free one, or one reclaimed;
    /// `None` (the policy refused) when the table is full.
    fn slot_for(&mut self, name: &str, source: &Source) -> Option<u32> {
        if let Some(s) = self.policies.slots.get_or_alloc(name) {
            return Some(s);
        }
        self.policies.reclaim_slots(&self.kernel, &self.bindings);
        if let Some(s) = self.policies.slots.get_or_alloc(name) {
            return Some(s);
        }
        let why = format!(
            "policy {name:?}: no free identity slot ({} in use, none reclaimable); \
             not installed",
            enforcer_common::MAX_SLOTS - 1
        );
        tracing::error!("{why}");
        self.policies.refused(&self.node);
        self.policies.rejected.insert(
            source.clone(),
            Rejection {
                file: source.to_string(),
                errors: vec![why],
                at: chrono::Utc::now().to_rfc3339(),
            },
        );
        None
    }
}

impl Policies {
    pub(super) fn new(slots: SlotTable) -> Self {
        Self {
            slots,
            ..Self::default()
        }
    }

    pub(super) fn get(&self, name: &str) -> Option<&Active> {
        self.active.get(name)
    }

    /// The active policies, by name.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&String, &Active)> {
        self.active.iter()
    }

    /// The identity slot `name` is installed in (`SLOT_UNKNOWN`, which
    /// fails closed, when it is not loaded).
    pub(super) fn slot_or_unknown(&self, name: &str) -> u32 {
        self.active
            .get(name)
            .map(|a| a.slot)
            .unwrap_or(enforcer_common::SLOT_UNKNOWN)
    }

    pub(super) fn slot_names(&self) -> Vec<(u32, String)> {
        self.active
            .iter()
            .map(|(n, a)| (a.slot, n.clone()))
            .collect()
    }

    pub(super) fn rejected(&self) -> impl Iterator<Item = &Rejection> {
        self.rejected.values()
    }

    pub(super) fn object_result(&self, uid: &str) -> Option<&ObjectResult> {
        self.object_results.get(uid)
    }

    pub(super) fn degraded(&self) -> impl Iterator<Item = &String> {
        self.degraded.values()
    }

    /// Reloads that changed the kernel, and rejections.
    pub(super) fn reloads(&self) -> (u64, u64) {
        (self.reloads_ok, self.reloads_rejected)
    }

    /// The DNS proxies the last reload asked to (re)start.
    pub(super) fn take_pending_dns(&mut self) -> Vec<(u32, Arc<DnsPolicy>)> {
        std::mem::take(&mut self.pending_dns)
    }

    fn refused(&mut self, node: &Node) {
        node.metrics.record_policy_reload(ReloadResult::Rejected);
        self.reloads_rejected += 1;
    }

    /// `name`'s resolved files, if the policy in force is `hash`.
    fn files_if_same(&self, name: &str, hash: &str) -> Option<crate::kernel::files::ResolvedFiles> {
        self.active
            .get(name)
            .filter(|a| a.compiled.hash == hash)
            .map(|a| a.files.clone())
    }

    fn set_source(&mut self, name: &str, source: &Source) {
        if let Some(a) = self.active.get_mut(name) {
            a.source = source.clone();
        }
    }

    /// A rejected source keeps its previously active policies in force
    /// (an object: the version last accepted of that UID); so do all
    /// file policies while the directory cannot be read.
    fn keep_in_force(
        &self,
        mut desired: BTreeMap<String, Desired>,
        rejected: &BTreeMap<Source, Rejection>,
        files_read: bool,
    ) -> BTreeMap<String, Desired> {
        for (name, a) in &self.active {
            let keep = rejected.contains_key(&a.source)
                || (!files_read && matches!(a.source, Source::File(_)));
            if keep && !desired.contains_key(name) {
                desired.insert(
                    name.clone(),
                    Desired {
                        compiled: a.compiled.clone(),
                        source: a.source.clone(),
                        dns: a.dns.clone(),
                    },
                );
            }
        }
        desired
    }

    /// Log, count and record each rejection that is new (or whose errors
    /// changed); the rejections become the ones in force.
    fn report_rejections(&mut self, node: &Node, rejected: BTreeMap<Source, Rejection>) {
        for (src, r) in &rejected {
            let is_new = self
                .rejected
                .get(src)
                .map(|old| old.errors != r.errors)
                .unwrap_or(true);
            if is_new {
                for e in &r.errors {
                    tracing::error!("policy rejected, previous version stays in force: {e}");
                }
                self.refused(node);
                node.sinks.lifecycle(
                    LifecycleAction::PolicyReloadRejected,
                    None,
                    "",
                    &format!("{src}: {}", r.errors.join("; ")),
                );
            }
        }
        self.rejected = rejected;
    }

    /// Install `want` in `slot` with `files`; whether it went in (a failure
    /// leaves the previous version in force).
    fn install(
        &mut self,
        node: &Node,
        kernel: &mut Kernel,
        name: &str,
        want: &Desired,
        slot: u32,
        files: crate::kernel::files::ResolvedFiles,
    ) -> bool {
        let compiled = &want.compiled;
        let fresh = !self.active.contains_key(name);
        if fresh {
            kernel.reset_slot_counters(slot);
            // First install in this daemon's life. Addresses in the slot
            // were learned under the policy last installed there (pins
            // of a previous daemon): kept only if it is this one.
            if self.slots.hashes.get(name) != Some(&compiled.hash) {
                node.dns.forget(slot);
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
        if let Err(e) = kernel.install_policy(slot, compiled, &files) {
            tracing::error!(policy = %name, "installing policy failed, previous version stays: {e:#}");
            self.refused(node);
            return false;
        }
        tracing::info!(policy = %name, slot, entries = compiled.entry_count(), file_inodes = files.entries.len(), hash = %compiled.hash, "policy installed");
        self.slots
            .hashes
            .insert(name.to_string(), compiled.hash.clone());
        node.attribution
            .set(slot, SlotInfo::new(identity(compiled), compiled));
        node.metrics.set_policy_info(
            name,
            compiled.spiffe_id.as_deref(),
            if compiled.audit { "audit" } else { "enforce" },
            &compiled.hash,
        );
        node.metrics
            .set_policy_entries(name, compiled.entry_count() as u64);
        node.metrics
            .set_file_rules(name, files.entries.len() as u64);
        node.sinks.lifecycle(
            if fresh {
                LifecycleAction::PolicyLoad
            } else {
                LifecycleAction::PolicyReload
            },
            Some(&identity(compiled)),
            &compiled.hash,
            &format!("{} ({} entries)", want.source, compiled.entry_count()),
        );
        // A served identity's proxy takes the new policy now, and forgets
        // what the old one learned in the same step
        // (`DnsService::reload`); a new one starts after the installs
        // (`start_dns`: it binds sockets).
        let swapped = !fresh && node.dns.reload(slot, want.dns.clone());
        if !swapped {
            if !fresh {
                node.dns.forget(slot);
            }
            self.pending_dns.push((slot, want.dns.clone()));
        }
        self.active.insert(
            name.to_string(),
            Active {
                compiled: compiled.clone(),
                dns: want.dns.clone(),
                source: want.source.clone(),
                slot,
                files,
            },
        );
        true
    }

    /// Remove the active policies not desired any more (their bound
    /// cgroups fail closed); whether any was.
    fn remove_undesired(
        &mut self,
        node: &Node,
        kernel: &mut Kernel,
        desired: &BTreeMap<String, Desired>,
    ) -> bool {
        let removed: Vec<String> = self
            .active
            .keys()
            .filter(|n| !desired.contains_key(*n))
            .cloned()
            .collect();
        let mut changed = false;
        for name in removed {
            if let Some(a) = self.active.remove(&name) {
                changed = true;
                tracing::warn!(policy = %name, "policy removed: its bound cgroups now fail closed");
                let _ = kernel.remove_policy(a.slot);
                node.sinks.forget_taint(&name);
                node.dns.stop(a.slot);
                node.metrics.forget_identity(&name);
                node.sinks.lifecycle(
                    LifecycleAction::PolicyRemove,
                    Some(&identity(&a.compiled)),
                    &a.compiled.hash,
                    &format!("{} removed; bound cgroups fail closed", a.source),
                );
            }
        }
        changed
    }

    /// After the installs: count the reload, drop the degradation notes of
    /// policies gone, sweep a previous daemon's stale policies, save the
    /// slot table.
    fn finish_reload(
        &mut self,
        node: &Node,
        kernel: &mut Kernel,
        changed: bool,
        objects_known: bool,
    ) {
        if changed {
            node.metrics.record_policy_reload(ReloadResult::Ok);
            self.reloads_ok += 1;
        }
        // Degradation notes of policies no longer loaded go with them.
        let active = &self.active;
        self.degraded.retain(|name, _| active.contains_key(name));
        self.sweep_stale(node, kernel, objects_known);
        self.slots.save(&node.slots_file());
    }

    /// A `files:` rule path that did not exist when its policy was
    /// installed: resolve that policy's paths again (periodic resync), and
    /// install the policy again, atomically, only if something now
    /// resolves differently. Other policies are not touched.
    pub(super) fn retry_unresolved_files(&mut self, kernel: &mut Kernel, metrics: &Metrics) {
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
            let files = kernel.resolve_files(&a.compiled.files);
            if files == a.files {
                continue;
            }
            let (slot, compiled) = (a.slot, a.compiled.clone());
            match kernel.install_policy(slot, &compiled, &files) {
                Ok(()) => {
                    tracing::info!(policy = %name, file_inodes = files.entries.len(), unresolved = files.unresolved.len(), "file rule paths resolved again; policy reinstalled");
                    metrics.set_file_rules(&name, files.entries.len() as u64);
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
    pub(super) fn retry_moved_unix_sockets(&self, kernel: &mut Kernel) {
        kernel.refresh_resolver_inodes();
        let moved: Vec<&String> = self
            .active
            .iter()
            .filter(|(_, a)| kernel.unix_sockets_moved(a.slot, &a.compiled))
            .map(|(n, _)| n)
            .collect();
        for name in moved {
            let Some(a) = self.active.get(name) else {
                continue;
            };
            match kernel.install_policy(a.slot, &a.compiled, &a.files) {
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

    /// A per-root policy's files changed (its containers'): install it
    /// again with `files`; false if that failed (the installed version
    /// stays). A policy not loaded, or with these files already, is left.
    pub(super) fn reinstall_with_files(
        &mut self,
        kernel: &mut Kernel,
        metrics: &Metrics,
        name: &str,
        files: crate::kernel::files::ResolvedFiles,
    ) -> bool {
        let Some(a) = self.active.get_mut(name) else {
            return true;
        };
        if files == a.files {
            return true;
        }
        match kernel.install_policy(a.slot, &a.compiled, &files) {
            Ok(()) => {
                tracing::info!(policy = %name, file_inodes = files.entries.len(), "policy reinstalled with its containers' file inodes");
                metrics.set_file_rules(name, files.entries.len() as u64);
                a.files = files;
                true
            }
            Err(e) => {
                tracing::error!(policy = %name, "reinstalling with its containers' file inodes failed; the installed version stays, new containers stay held: {e:#}");
                false
            }
        }
    }

    /// After a restart the pinned kernel state still enforces every policy
    /// the previous daemon had installed. Once this daemon knows every
    /// source of a kind (files: after its first reload; objects: after the
    /// first complete list), a policy of that kind that it did not load
    /// (deleted while the daemon was down, or invalid now) is removed from
    /// the kernel: its cgroups fail closed rather than keep a deleted
    /// policy in force. (The version last accepted for an object that is
    /// invalid now is not kept across a restart: it fails closed too.)
    fn sweep_stale(&mut self, node: &Node, kernel: &mut Kernel, objects_known: bool) {
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
            if !kernel.policy_present(slot) {
                continue;
            }
            tracing::warn!(policy = %name, slot, "a previous daemon's policy is not loaded any more (removed while the daemon was down, or invalid now): removed from the kernel; its cgroups fail closed");
            if let Err(e) = kernel.remove_policy(slot) {
                tracing::error!(policy = %name, slot, "removing it: {e:#}");
                continue;
            }
            node.dns.stop(slot);
            node.sinks.lifecycle(
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
    fn reclaim_slots(&mut self, kernel: &Kernel, bindings: &Bindings) {
        let Some(in_use) = kernel.slots_in_use() else {
            tracing::warn!("identity slots full and the binding map unreadable: nothing reclaimed");
            return;
        };
        let active = &self.active;
        let freed = self.slots.reclaim(|name, slot| {
            active.contains_key(name) || in_use.contains(&slot) || bindings.uses_slot(slot)
        });
        for (name, slot) in freed {
            tracing::info!(policy = %name, slot, "identity slot reclaimed (policy gone, no cgroup bound to it)");
        }
    }
}

/// Slot assignment, persisted in `stateDir` (bpffs holds only pins) so that a
/// restarted daemon keeps every identity in the slot its cgroups already
/// point to.
#[derive(Default, Serialize, Deserialize)]
pub(super) struct SlotTable {
    slots: BTreeMap<String, u32>,
    /// The hash of the policy last installed under each name: a restarted
    /// daemon forgets the addresses a slot learned (adopted from the pins)
    /// unless its identity comes back with the same policy.
    #[serde(default)]
    hashes: BTreeMap<String, String>,
}

impl SlotTable {
    pub(super) fn load(path: &Path) -> Self {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
    pub(super) fn save(&self, path: &Path) {
        if let Ok(b) = serde_json::to_vec_pretty(self) {
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, b).is_ok() {
                let _ = std::fs::rename(&tmp, path);
            }
        }
    }
    /// Drop the entries `keep` refuses; returns them.
    pub(super) fn reclaim(
        &mut self,
        mut keep: impl FnMut(&str, u32) -> bool,
    ) -> Vec<(String, u32)> {
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
    pub(super) fn slot_of(&self, name: &str) -> Option<u32> {
        self.slots.get(name).copied()
    }
    pub(super) fn get_or_alloc(&mut self, name: &str) -> Option<u32> {
        if let Some(s) = self.slots.get(name) {
            return Some(*s);
        }
        let used: HashSet<u32> = self.slots.values().copied().collect();
        let slot = (1..enforcer_common::MAX_SLOTS).find(|s| !used.contains(s))?;
        self.slots.insert(name.to_string(), slot);
        Some(slot)
    }
}

#[cfg(test)]
mod slot_tests {
    use super::SlotTable;

    #[test]
    pub(super) fn a_full_slot_table_reuses_only_what_reclaim_frees() {
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
