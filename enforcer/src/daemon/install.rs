//! Prepared policies -> kernel: install and replace identities' tables,
//! the sweep of stale pinned state after a restart, slots (`slots.json`,
//! [`SlotTable`]) and their reclaiming, and the retries of `files:` paths
//! and unix socket rules that did not resolve yet.
use super::*;

/// Sources -> kernel: the policies in force and what the last reload
/// refused.
#[derive(Default)]
pub(super) struct Policies {
    pub(super) active: BTreeMap<String, Active>,
    pub(super) slots: SlotTable,
    pub(super) rejected: BTreeMap<Source, Rejection>,
    /// `AgentPolicy` objects by UID: the last reload's verdict.
    pub(super) object_results: BTreeMap<String, ObjectResult>,
    /// Per policy: what is not enforced because the kernel lacks BPF LSM.
    pub(super) degraded: BTreeMap<String, String>,
    pub(super) reloads_ok: u64,
    pub(super) reloads_rejected: u64,
    /// DNS proxies to (re)start after a reload (async, outside the lock).
    pub(super) pending_dns: Vec<(u32, Arc<DnsPolicy>)>,
    /// Policies of a previous daemon that are gone were removed from the
    /// kernel: file policies (after the first reload), objects (after the
    /// first complete list). See `sweep_stale_policies`.
    pub(super) swept_files: bool,
    pub(super) swept_objects: bool,
}

impl Policies {
    pub(super) fn new(slots: SlotTable) -> Self {
        Self {
            slots,
            ..Self::default()
        }
    }
}

impl State {
    /// A `files:` rule path that did not exist when its policy was
    /// installed: resolve that policy's paths again (periodic resync), and
    /// install the policy again, atomically, only if something now
    /// resolves differently. Other policies are not touched.
    pub(super) fn retry_unresolved_files(&mut self) {
        let waiting: Vec<String> = self
            .policies
            .active
            .iter()
            .filter(|(_, a)| !a.files.unresolved.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        for name in waiting {
            let Some(a) = self.policies.active.get(&name) else {
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
                    self.node
                        .metrics
                        .set_file_rules(&name, files.entries.len() as u64);
                    if let Some(a) = self.policies.active.get_mut(&name) {
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
    pub(super) fn retry_moved_unix_sockets(&mut self) {
        self.kernel.refresh_resolver_inodes();
        let moved: Vec<String> = self
            .policies
            .active
            .iter()
            .filter(|(_, a)| self.kernel.unix_sockets_moved(a.slot, &a.compiled))
            .map(|(n, _)| n.clone())
            .collect();
        for name in moved {
            let Some(a) = self.policies.active.get(&name) else {
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
    pub(super) fn reload_policies(&mut self) {
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
        self.policies.object_results = object_results;
        // A rejected source keeps its previously active policies in force
        // (an object: the version last accepted of that UID); so do all
        // file policies while the directory cannot be read.
        for (name, a) in &self.policies.active {
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
                .policies
                .rejected
                .get(src)
                .map(|old| old.errors != r.errors)
                .unwrap_or(true);
            if is_new {
                for e in &r.errors {
                    tracing::error!("policy rejected, previous version stays in force: {e}");
                }
                self.node
                    .metrics
                    .record_policy_reload(ReloadResult::Rejected);
                self.policies.reloads_rejected += 1;
                self.node.sinks.lifecycle(
                    LifecycleAction::PolicyReloadRejected,
                    None,
                    "",
                    &format!("{src}: {}", r.errors.join("; ")),
                );
            }
        }
        self.policies.rejected = new_rejections;

        // Apply changes.
        let mut changed = false;
        for (name, (compiled, source, dns)) in &desired {
            // Paths are resolved again only for a new policy or while some
            // rule path is missing (a protected path created later gets
            // protected); a complete resolution stays valid (inodes).
            let previous: Option<crate::kernel::files::ResolvedFiles> = self
                .policies
                .active
                .get(name)
                .filter(|a| a.compiled.hash == compiled.hash)
                .map(|a| a.files.clone());
            let files = match &previous {
                Some(f) if f.unresolved.is_empty() => f.clone(),
                // Pods: the paths are resolved in each container's root.
                _ if self.per_root(compiled) => {
                    if let Some(slot) = self.policies.slots.slots.get(name).copied() {
                        self.adopt_roots(name, slot, compiled);
                    }
                    let old = self
                        .policies
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
                if let Some(a) = self.policies.active.get_mut(name) {
                    a.source = source.clone();
                }
                continue;
            }
            let slot = match self.policies.slots.get_or_alloc(name) {
                Some(s) => Some(s),
                None => {
                    self.reclaim_slots();
                    self.policies.slots.get_or_alloc(name)
                }
            };
            let Some(slot) = slot else {
                let why = format!(
                    "policy {name:?}: no free identity slot ({} in use, none reclaimable); \
                     not installed",
                    enforcer_common::MAX_SLOTS - 1
                );
                tracing::error!("{why}");
                self.node
                    .metrics
                    .record_policy_reload(ReloadResult::Rejected);
                self.policies.reloads_rejected += 1;
                self.policies.rejected.insert(
                    source.clone(),
                    Rejection {
                        file: source.to_string(),
                        errors: vec![why],
                        at: chrono::Utc::now().to_rfc3339(),
                    },
                );
                continue;
            };
            let fresh = !self.policies.active.contains_key(name);
            if fresh {
                self.kernel.reset_slot_counters(slot);
                // First install in this daemon's life. Addresses in the slot
                // were learned under the policy last installed there (pins
                // of a previous daemon): kept only if it is this one.
                if self.policies.slots.hashes.get(name) != Some(&compiled.hash) {
                    self.node.dns.forget(slot);
                }
            }
            let unresolved_before = self
                .policies
                .active
                .get(name)
                .map(|a| a.files.unresolved.clone());
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
                    self.policies
                        .slots
                        .hashes
                        .insert(name.clone(), compiled.hash.clone());
                    self.node
                        .attribution
                        .set(slot, SlotInfo::new(Self::identity(compiled), compiled));
                    self.node.metrics.set_policy_info(
                        name,
                        compiled.spiffe_id.as_deref(),
                        if compiled.audit { "audit" } else { "enforce" },
                        &compiled.hash,
                    );
                    self.node
                        .metrics
                        .set_policy_entries(name, compiled.entry_count() as u64);
                    self.node
                        .metrics
                        .set_file_rules(name, files.entries.len() as u64);
                    self.node.sinks.lifecycle(
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
                    let swapped = !fresh && self.node.dns.reload(slot, dns.clone());
                    if !swapped {
                        if !fresh {
                            self.node.dns.forget(slot);
                        }
                        self.policies.pending_dns.push((slot, dns.clone()));
                    }
                    self.policies.active.insert(
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
                    self.node
                        .metrics
                        .record_policy_reload(ReloadResult::Rejected);
                    self.policies.reloads_rejected += 1;
                }
            }
        }
        let removed: Vec<String> = self
            .policies
            .active
            .keys()
            .filter(|n| !desired.contains_key(*n))
            .cloned()
            .collect();
        for name in removed {
            if let Some(a) = self.policies.active.remove(&name) {
                changed = true;
                tracing::warn!(policy = %name, "policy removed: its bound cgroups now fail closed");
                let _ = self.kernel.remove_policy(a.slot);
                self.node.sinks.forget_taint(&name);
                self.node.dns.stop(a.slot);
                self.node.metrics.forget_identity(&name);
                self.node.sinks.lifecycle(
                    LifecycleAction::PolicyRemove,
                    Some(&Self::identity(&a.compiled)),
                    &a.compiled.hash,
                    &format!("{} removed; bound cgroups fail closed", a.source),
                );
            }
        }
        if changed {
            self.node.metrics.record_policy_reload(ReloadResult::Ok);
            self.policies.reloads_ok += 1;
        }
        // Degradation notes of policies no longer loaded go with them.
        let active = &self.policies.active;
        self.policies
            .degraded
            .retain(|name, _| active.contains_key(name));
        self.sweep_stale_policies();
        self.policies.slots.save(&self.node.slots_file());
    }

    /// After a restart the pinned kernel state still enforces every policy
    /// the previous daemon had installed. Once this daemon knows every
    /// source of a kind (files: after its first reload; objects: after the
    /// first complete list), a policy of that kind that it did not load
    /// (deleted while the daemon was down, or invalid now) is removed from
    /// the kernel: its cgroups fail closed rather than keep a deleted
    /// policy in force. (The version last accepted for an object that is
    /// invalid now is not kept across a restart: it fails closed too.)
    pub(super) fn sweep_stale_policies(&mut self) {
        let objects_known = match &self.k8s {
            Some(K8s {
                policies: Some(c), ..
            }) => c.lock().unwrap_or_else(|e| e.into_inner()).synced(),
            _ => true,
        };
        let sweep_files = !self.policies.swept_files;
        let sweep_objects = !self.policies.swept_objects && objects_known;
        if !sweep_files && !sweep_objects {
            return;
        }
        let stale: Vec<(String, u32)> = self
            .policies
            .slots
            .slots
            .iter()
            .filter(|(name, _)| !self.policies.active.contains_key(*name))
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
            self.node.dns.stop(slot);
            self.node.sinks.lifecycle(
                LifecycleAction::PolicyRemove,
                Some(&IdentityRef {
                    name: name.clone(),
                    spiffe_id: None,
                }),
                "",
                "not loaded after a daemon restart; bound cgroups fail closed",
            );
        }
        self.policies.swept_files = true;
        if objects_known {
            self.policies.swept_objects = true;
        }
    }

    /// The slot table is full (identities come and go with AgentPolicy
    /// objects, and the table outlives daemon restarts): free the slots of
    /// identities that are not loaded and that no cgroup points to any more,
    /// neither one this daemon bound nor one in the kernel's pinned binding
    /// map (cgroups of a previous run not adopted yet). A slot is reused
    /// only once nothing can still be enforced through it; nothing is freed
    /// when the binding map cannot be read.
    pub(super) fn reclaim_slots(&mut self) {
        let Some(in_use) = self.kernel.slots_in_use() else {
            tracing::warn!("identity slots full and the binding map unreadable: nothing reclaimed");
            return;
        };
        let (active, bound) = (&self.policies.active, &self.bindings.bound);
        let freed = self.policies.slots.reclaim(|name, slot| {
            active.contains_key(name)
                || in_use.contains(&slot)
                || bound.values().any(|b| b.slot == slot)
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
