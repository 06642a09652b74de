//! What the daemon enforces, for `enforcer status`, the `AgentPolicy`
//! objects' status reports, and the workload attribution of events.
use super::{bindings::container_cgroups, *};

impl State {
    /// Kubernetes mode: what this node reports on each `AgentPolicy` object
    /// (written by `k8s::policies::StatusWriter`, outside the state lock).
    pub(super) fn policy_reports(&self) -> Vec<crate::k8s::policies::Report> {
        use crate::k8s::{
            crd::{identity_name, NodeStatus},
            policies::{Report, Verdict},
        };
        let mut out = Vec::new();
        for o in sources::policy_objects(self.k8s.as_ref()) {
            // Not evaluated yet, or an older generation: the next reload reports.
            let Some(r) = self
                .policies
                .object_result(&o.uid)
                .filter(|r| r.generation == o.generation)
            else {
                continue;
            };
            let name = identity_name(&o.namespace, &o.name);
            let active = self
                .policies
                .get(&name)
                .filter(|a| matches!(&a.source, Source::Object { uid, .. } if *uid == o.uid));
            let bound = self
                .bindings
                .pods()
                .iter()
                .filter(|(path, p)| p.policy == name && self.bindings.bound().contains_key(*path))
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

    /// The pods bound to `policy` on this node, and those selected whose
    /// pod-level cgroup does not exist yet (`cgroup` empty).
    pub(super) fn pod_status(&self, policy: &str) -> Vec<control::PodStatus> {
        let row = |p: &PodBinding, cgroup: String| control::PodStatus {
            namespace: p.entry.info.namespace.clone(),
            name: p.entry.info.name.clone(),
            uid: p.entry.info.uid.clone(),
            spiffe_id: p.spiffe_id.clone(),
            cgroup,
            containers: container_cgroups(&self.node.mount, self.k8s.as_ref(), &p.entry)
                .into_iter()
                .map(|(c, dir)| control::ContainerStatusOut {
                    name: c.name.clone(),
                    kind: format!("{:?}", c.kind).to_lowercase(),
                    container_id: c.container_id.clone(),
                    file_inodes: dir.as_deref().and_then(|d| self.roots.inodes_of(d)),
                    cgroup: dir.map(|d| d.display().to_string()),
                })
                .collect(),
        };
        let bound = self
            .bindings
            .pods()
            .iter()
            .filter(|(_, p)| p.policy == policy)
            .map(|(path, p)| {
                let cgroup = if self.bindings.bound().contains_key(path) {
                    path.display().to_string()
                } else {
                    String::new()
                };
                row(p, cgroup)
            });
        let pending = self
            .bindings
            .pending_pods()
            .iter()
            .filter(|p| p.policy == policy)
            .map(|p| row(p, String::new()));
        let mut out: Vec<control::PodStatus> = bound.chain(pending).collect();
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        out
    }

    /// One identity's line of `enforcer status`.
    fn identity_status(
        &self,
        name: &String,
        a: &install::Active,
        tainted: &HashMap<String, String>,
    ) -> control::IdentityStatus {
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
        control::IdentityStatus {
            name: name.clone(),
            spiffe_id: a.compiled.spiffe_id.clone(),
            mode: if a.compiled.audit { "audit" } else { "enforce" }.into(),
            policy_hash: a.compiled.hash.clone(),
            source: a.source.to_string(),
            slot: a.slot,
            rules: a.compiled.rules.len(),
            entries: a.compiled.entry_count(),
            cgroups: self
                .bindings
                .bound()
                .iter()
                .filter(|(_, b)| &b.policy == name)
                .map(|(p, b)| control::CgroupStatus {
                    path: p.display().to_string(),
                    cgroup_id: b.attachment.cgroup_id,
                })
                .collect(),
            dns_port: self.kernel.dns_port(a.slot),
            dns_netns: dns_netns::status(&self.bindings.dns_netns, a.slot),
            learned_addresses: self.node.dns.learned_count(a.slot),
            decisions,
            recent_denials: self.node.sinks.recent(name),
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
        }
    }

    pub fn status(&self) -> control::Status {
        let tainted = self.node.sinks.tainted();
        let identities = self
            .policies
            .iter()
            .map(|(name, a)| self.identity_status(name, a, &tainted))
            .collect();
        let fail_closed = self
            .bindings
            .bound()
            .iter()
            .filter(|(_, b)| b.slot == enforcer_common::SLOT_UNKNOWN)
            .map(|(p, b)| format!("{} (policy {:?} not loaded)", p.display(), b.policy))
            .collect();
        control::Status {
            version: env!("CARGO_PKG_VERSION").into(),
            started: self.node.started.to_rfc3339(),
            policies_dir: self.node.cfg.policies_dir.display().to_string(),
            identities,
            fail_closed_cgroups: fail_closed,
            waiting_cgroups: self
                .bindings
                .waiting()
                .map(|p| p.display().to_string())
                .collect(),
            rejected: self.policies.rejected().cloned().collect(),
            reloads_ok: self.policies.reloads().0,
            reloads_rejected: self.policies.reloads().1,
            events_lost: self.kernel.stat(enforcer_common::stat::EVENTS_LOST),
            net_raw_processes: self.bindings.net_raw().cloned().collect(),
            capabilities: BTreeMap::from([
                (
                    "bpf_lsm".to_string(),
                    control::Capability {
                        available: self.node.lsm.available,
                        detail: self.node.lsm.detail.clone(),
                    },
                ),
                (
                    "unix_sockets".to_string(),
                    control::Capability {
                        available: self.node.unix.available,
                        detail: if self.node.unix.available {
                            format!(
                                "{}; spec.local enforced; resolver sockets refused: {}",
                                self.node.unix.detail,
                                self.node
                                    .resolvers
                                    .iter()
                                    .map(|p| p.display().to_string())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        } else {
                            format!(
                                "{}; {}",
                                self.node.unix.detail,
                                crate::kernel::UNIX_REQUIREMENT
                            )
                        },
                    },
                ),
            ]),
            degraded: self.policies.degraded().cloned().collect(),
        }
    }
}

impl Bindings {
    /// Kubernetes mode: tell the event attribution which cgroup ids are
    /// which pod and container (audit records and `enforcer_pod_events_total`
    /// carry namespace, pod and container), and export the bound pods.
    /// The pods' cgroup directories go along, so that a container cgroup
    /// created after this call is placed at its first event
    /// (`Attribution::workload`).
    pub(super) fn publish_workloads(&self, node: &Node, k8s: &K8s) {
        use crate::events::reader::PodScope;
        let mut map = HashMap::new();
        let mut info = Vec::new();
        let mut scopes = Vec::new();
        for (path, p) in self.pods() {
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
            for (c, dir) in container_cgroups(&node.mount, Some(k8s), &p.entry) {
                let Some(id) = dir.and_then(|d| cgroup::cgroup_id(&d).ok()) else {
                    continue;
                };
                map.insert(id, p.workload(Some(c.name.clone())));
            }
        }
        node.attribution.set_workloads(map, scopes);
        node.metrics.set_pods(&info);
    }
}
