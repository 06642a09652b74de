//! Policy sources -> validated, compiled policies: the policies directory's
//! files and (Kubernetes mode) the `AgentPolicy` objects, each validated,
//! checked, compiled and passed through the BPF LSM gate on its own
//! ([`Prepared`]: what a source holds, or why it was rejected).
use super::*;

/// A policy document as loaded, compiled for the kernel and for the DNS proxy.
type Compiled = (LoadedPolicy, CompiledPolicy, Arc<DnsPolicy>);

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

/// What the policy sources hold now.
pub(super) struct Sources {
    /// The policy files of the policies directory (sorted); `None` when the
    /// directory cannot be read (the file policies then stay as they are).
    pub(super) files: Option<Vec<PathBuf>>,
    /// Kubernetes mode with `agentPolicies`: the `AgentPolicy` objects.
    objects: Vec<crate::k8s::policies::PolicyObject>,
}

/// What the sources hold, evaluated: the policies to put in force, the
/// sources refused and, per `AgentPolicy` object, its verdict.
#[derive(Default)]
pub(super) struct Evaluation {
    pub(super) desired: BTreeMap<String, Desired>,
    /// Rejected sources: none of their policies is in `desired`.
    pub(super) rejected: BTreeMap<Source, Rejection>,
    /// `AgentPolicy` objects by UID.
    pub(super) object_results: BTreeMap<String, ObjectResult>,
}

/// A policy to put in force: compiled, where it comes from, its DNS view.
pub(super) struct Desired {
    pub(super) compiled: CompiledPolicy,
    pub(super) source: Source,
    pub(super) dns: Arc<DnsPolicy>,
}

impl Sources {
    /// Read the policies directory and (Kubernetes mode) the object cache.
    pub(super) fn read(dir: &Path, k8s: Option<&K8s>) -> Self {
        Self {
            files: policy_files(dir),
            objects: policy_objects(k8s),
        }
    }

    /// Every source in order: files, then objects (sorted).
    fn list(&self) -> Vec<Source> {
        let mut sources: Vec<Source> = self
            .files
            .iter()
            .flatten()
            .map(|f| Source::File(f.clone()))
            .collect();
        let mut objs: Vec<Source> = self
            .objects
            .iter()
            .map(|o| Source::Object {
                namespace: o.namespace.clone(),
                name: o.name.clone(),
                uid: o.uid.clone(),
            })
            .collect();
        objs.sort();
        sources.extend(objs);
        sources
    }

    /// Each source validated on its own: a source with any error is
    /// rejected as a whole. `degraded` gets the BPF LSM notes of the
    /// policies the gate stripped (see [`prepare`]).
    pub(super) fn evaluate(
        &self,
        node: &Node,
        degraded: &mut BTreeMap<String, String>,
        trust_domain: &str,
    ) -> Evaluation {
        let now = chrono::Utc::now().to_rfc3339();
        let mut out = Evaluation::default();
        for src in self.list() {
            let mut prep = match load_source(&src, &self.objects, trust_domain) {
                Err(errors) => Prepared {
                    spec_errors: errors,
                    ..Prepared::default()
                },
                Ok(list) => prepare(node, degraded, list),
            };
            // The first source that defines a name keeps it (files come
            // before objects; an object's name `<ns>/<name>` cannot be a
            // file policy's name, which is a DNS label).
            for (p, _, _) in &prep.compiled {
                let name = &p.policy.metadata.name;
                if let Some(other) = out.desired.get(name) {
                    prep.node_errors.push(format!(
                        "{src}:{}: metadata.name: duplicate policy name {name:?}: {} defines \
                         it first and stays in force",
                        p.line, other.source,
                    ));
                }
            }
            if let Source::Object { uid, .. } = &src {
                out.object_results
                    .insert(uid.clone(), self.object_result(uid, &prep));
            }
            if prep.spec_errors.is_empty() && prep.node_errors.is_empty() {
                for (_, compiled, dns) in prep.compiled {
                    out.desired.insert(
                        compiled.name.clone(),
                        Desired {
                            compiled,
                            source: src.clone(),
                            dns,
                        },
                    );
                }
            } else {
                let mut errors = prep.spec_errors;
                errors.extend(prep.node_errors);
                out.rejected.insert(
                    src.clone(),
                    Rejection {
                        file: src.to_string(),
                        errors,
                        at: now.clone(),
                    },
                );
            }
        }
        out
    }

    /// An object's verdict: its spec's, and this node's errors.
    fn object_result(&self, uid: &str, prep: &Prepared) -> ObjectResult {
        let generation = self
            .objects
            .iter()
            .find(|o| o.uid == uid)
            .and_then(|o| o.generation);
        ObjectResult {
            generation,
            verdict: match prep.hashes.first() {
                Some(h) if prep.spec_errors.is_empty() => {
                    crate::k8s::policies::Verdict::Valid(h.clone())
                }
                _ => crate::k8s::policies::Verdict::Invalid(prep.spec_errors.clone()),
            },
            node_errors: prep.node_errors.clone(),
        }
    }
}

/// The policy files of the policies directory (sorted); `None` when the
/// directory cannot be read (the file policies then stay as they are).
fn policy_files(dir: &Path) -> Option<Vec<PathBuf>> {
    match std::fs::read_dir(dir) {
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
            tracing::error!(dir = %dir.display(), "reading policies directory: {e}");
            None
        }
    }
}

/// Kubernetes mode with `agentPolicies`: the `AgentPolicy` objects.
pub(super) fn policy_objects(k8s: Option<&K8s>) -> Vec<crate::k8s::policies::PolicyObject> {
    match k8s.and_then(|k| k.policies.as_ref()) {
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
fn prepare(
    node: &Node,
    degraded: &mut BTreeMap<String, String>,
    list: Vec<LoadedPolicy>,
) -> Prepared {
    let mut out = Prepared::default();
    for mut p in list {
        if let Err(e) = policy::check_supported(&p) {
            out.spec_errors.extend(e.0.iter().map(|x| x.to_string()));
            continue;
        }
        if let Err(e) = crate::run::check_local_resolvers(&p, &node.resolvers) {
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
            match crate::run::gate_file_policy(&mut p, &node.lsm, node.cfg.allow_degraded) {
                Ok(n) => n,
                Err(e) => {
                    out.node_errors.push(format!("{e:#}"));
                    continue;
                }
            };
        let c = match lsm_note {
            Some(note) => {
                if degraded.get(&name) != Some(&note) {
                    tracing::warn!("{note}");
                }
                degraded.insert(name, note);
                match policy::compile::compile(&p) {
                    Ok(c) => c,
                    Err(e) => {
                        out.node_errors.extend(e.0.iter().map(|x| x.to_string()));
                        continue;
                    }
                }
            }
            None => {
                degraded.remove(&name);
                full
            }
        };
        let d = Arc::new(crate::dns::compile_dns(&p, &c));
        out.compiled.push((p, c, d));
    }
    out
}
