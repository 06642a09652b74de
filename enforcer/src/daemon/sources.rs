//! Policy sources -> validated, compiled policies: the policies directory's
//! files and (Kubernetes mode) the `AgentPolicy` objects, each validated,
//! checked, compiled and passed through the BPF LSM gate on its own
//! ([`Prepared`]: what a source holds, or why it was rejected).
use super::*;

impl State {
    /// The policy files of the policies directory (sorted); `None` when the
    /// directory cannot be read (the file policies then stay as they are).
    pub(super) fn policy_files(&self) -> Option<Vec<PathBuf>> {
        match std::fs::read_dir(&self.node.cfg.policies_dir) {
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
                tracing::error!(dir = %self.node.cfg.policies_dir.display(), "reading policies directory: {e}");
                None
            }
        }
    }

    /// Kubernetes mode with `agentPolicies`: the `AgentPolicy` objects.
    pub(super) fn policy_objects(&self) -> Vec<crate::k8s::policies::PolicyObject> {
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
    pub(super) fn load_source(
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
    pub(super) fn prepare(&mut self, list: Vec<LoadedPolicy>) -> Prepared {
        let mut out = Prepared::default();
        for mut p in list {
            if let Err(e) = policy::check_supported(&p) {
                out.spec_errors.extend(e.0.iter().map(|x| x.to_string()));
                continue;
            }
            if let Err(e) = crate::run::check_local_resolvers(&p, &self.node.resolvers) {
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
            let lsm_note = match crate::run::gate_file_policy(
                &mut p,
                &self.node.lsm,
                self.node.cfg.allow_degraded,
            ) {
                Ok(n) => n,
                Err(e) => {
                    out.node_errors.push(format!("{e:#}"));
                    continue;
                }
            };
            let c = match lsm_note {
                Some(note) => {
                    if self.policies.degraded.get(&name) != Some(&note) {
                        tracing::warn!("{note}");
                    }
                    self.policies.degraded.insert(name, note);
                    match policy::compile::compile(&p) {
                        Ok(c) => c,
                        Err(e) => {
                            out.node_errors.extend(e.0.iter().map(|x| x.to_string()));
                            continue;
                        }
                    }
                }
                None => {
                    self.policies.degraded.remove(&name);
                    full
                }
            };
            let d = Arc::new(crate::dns::compile_dns(&p, &c));
            out.compiled.push((p, c, d));
        }
        out
    }
}
