//! Which AgentPolicy a pod belongs to, and its SPIFFE ID.
//!
//! A policy's `spec.identity.kubernetes` names the pods it binds:
//! `namespace` (if set: equal), `serviceAccount` (if set: equal; a pod
//! without one runs as `default`), `podSelector` (`matchLabels` and
//! `matchExpressions`, ANDed, with Kubernetes semantics: `In`, `NotIn`,
//! `Exists`, `DoesNotExist`; `NotIn` and `DoesNotExist` also match a pod
//! without the key). An absent field does not constrain; a policy without
//! `identity.kubernetes` binds no pod (it is for `enforcer run` or static
//! daemon bindings).
//!
//! A pod that two policies select is a configuration error. It is not left
//! unenforced: [`Binding::Conflict`] names both, and the daemon attaches
//! the pod's cgroup without an identity, so it fails closed until the
//! selectors are fixed.
//!
//! The identity's SPIFFE ID is `spec.identity.spiffeId` when given, else
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceAccount>` (the
//! Kubernetes form that SPIRE and WIMSE workload identities use).
use std::collections::BTreeMap;

use crate::policy::{Identity, KubernetesIdentity, LabelSelector, SelectorOperator};

/// What the pod watcher knows of a pod (filled from the API's Pod object).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `spec.serviceAccountName` (`default` when empty).
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
}

impl PodInfo {
    fn service_account(&self) -> &str {
        if self.service_account.is_empty() {
            "default"
        } else {
            &self.service_account
        }
    }
}

/// The binding of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// No policy selects the pod: it is not an agent.
    None,
    /// Exactly one policy selects it.
    Policy(String),
    /// More than one policy selects it (names sorted): fail closed.
    Conflict(Vec<String>),
}

/// `matchLabels` and `matchExpressions` against `labels`.
pub fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    sel.match_labels
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
        && sel.match_expressions.iter().all(|r| {
            let got = labels.get(&r.key);
            match r.operator {
                SelectorOperator::In => got.is_some_and(|v| r.values.contains(v)),
                SelectorOperator::NotIn => got.is_none_or(|v| !r.values.contains(v)),
                SelectorOperator::Exists => got.is_some(),
                SelectorOperator::DoesNotExist => got.is_none(),
            }
        })
}

/// Whether `k` selects `pod`.
pub fn selects(k: &KubernetesIdentity, pod: &PodInfo) -> bool {
    k.namespace.as_deref().is_none_or(|n| n == pod.namespace)
        && k.service_account
            .as_deref()
            .is_none_or(|sa| sa == pod.service_account())
        && k.pod_selector
            .as_ref()
            .is_none_or(|s| selector_matches(s, &pod.labels))
}

/// The policy of `pod` among `policies` (name, identity).
pub fn bind<'a>(
    policies: impl IntoIterator<Item = (&'a str, Option<&'a Identity>)>,
    pod: &PodInfo,
) -> Binding {
    let mut hits: Vec<String> = policies
        .into_iter()
        .filter(|(_, id)| {
            id.and_then(|i| i.kubernetes.as_ref())
                .is_some_and(|k| selects(k, pod))
        })
        .map(|(n, _)| n.to_string())
        .collect();
    hits.sort();
    hits.dedup();
    match hits.len() {
        0 => Binding::None,
        1 => Binding::Policy(hits.remove(0)),
        _ => Binding::Conflict(hits),
    }
}

/// The SPIFFE ID of `pod` under a policy with identity `id`.
pub fn spiffe_id(id: Option<&Identity>, trust_domain: &str, pod: &PodInfo) -> String {
    if let Some(s) = id.and_then(|i| i.spiffe_id.as_deref()) {
        return s.to_string();
    }
    format!(
        "spiffe://{}/ns/{}/sa/{}",
        trust_domain.trim_end_matches('/'),
        pod.namespace,
        pod.service_account()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::LabelSelectorRequirement;

    fn pod(ns: &str, sa: &str, labels: &[(&str, &str)]) -> PodInfo {
        PodInfo {
            namespace: ns.into(),
            name: "p".into(),
            uid: "0b7c1f0e-6d2a-4f6e-9a0b-3c1d2e4f5a6b".into(),
            service_account: sa.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn req(key: &str, op: SelectorOperator, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op,
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    fn ident(ns: Option<&str>, sa: Option<&str>, sel: Option<LabelSelector>) -> Identity {
        Identity {
            spiffe_id: None,
            kubernetes: Some(KubernetesIdentity {
                namespace: ns.map(String::from),
                service_account: sa.map(String::from),
                pod_selector: sel,
            }),
        }
    }

    #[test]
    fn selector_semantics_are_kubernetes() {
        let labels = pod("a", "", &[("app", "research"), ("tier", "agent")]).labels;
        let sel = |ml: &[(&str, &str)], me: Vec<LabelSelectorRequirement>| LabelSelector {
            match_labels: ml
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            match_expressions: me,
        };
        use SelectorOperator::*;
        // Empty selector: everything.
        assert!(selector_matches(&sel(&[], vec![]), &labels));
        assert!(selector_matches(
            &sel(&[("app", "research")], vec![]),
            &labels
        ));
        assert!(!selector_matches(
            &sel(&[("app", "other")], vec![]),
            &labels
        ));
        assert!(!selector_matches(
            &sel(&[("missing", "x")], vec![]),
            &labels
        ));
        assert!(selector_matches(
            &sel(&[], vec![req("tier", In, &["agent", "x"])]),
            &labels
        ));
        assert!(!selector_matches(
            &sel(&[], vec![req("tier", In, &["x"])]),
            &labels
        ));
        assert!(!selector_matches(
            &sel(&[], vec![req("nokey", In, &["x"])]),
            &labels
        ));
        assert!(selector_matches(
            &sel(&[], vec![req("tier", NotIn, &["x"])]),
            &labels
        ));
        assert!(!selector_matches(
            &sel(&[], vec![req("tier", NotIn, &["agent"])]),
            &labels
        ));
        // NotIn and DoesNotExist match a pod without the key.
        assert!(selector_matches(
            &sel(&[], vec![req("nokey", NotIn, &["x"])]),
            &labels
        ));
        assert!(selector_matches(
            &sel(&[], vec![req("nokey", DoesNotExist, &[])]),
            &labels
        ));
        assert!(!selector_matches(
            &sel(&[], vec![req("app", DoesNotExist, &[])]),
            &labels
        ));
        assert!(selector_matches(
            &sel(&[], vec![req("app", Exists, &[])]),
            &labels
        ));
        // ANDed.
        assert!(!selector_matches(
            &sel(&[("app", "research")], vec![req("tier", In, &["x"])]),
            &labels
        ));
    }

    #[test]
    fn namespace_service_account_and_selector_bind_one_policy() {
        let research = ident(
            Some("agents"),
            Some("research"),
            Some(LabelSelector {
                match_labels: [("app".to_string(), "research".to_string())].into(),
                match_expressions: vec![],
            }),
        );
        let any_in_ns = ident(Some("tools"), None, None);
        let default_sa = ident(Some("batch"), Some("default"), None);
        let no_k8s = Identity::default();
        let policies = || {
            vec![
                ("research", Some(&research)),
                ("tools", Some(&any_in_ns)),
                ("batch", Some(&default_sa)),
                ("local-only", Some(&no_k8s)),
                ("no-identity", None),
            ]
        };
        let b = |p: &PodInfo| bind(policies(), p);
        assert_eq!(
            b(&pod("agents", "research", &[("app", "research")])),
            Binding::Policy("research".into())
        );
        // Wrong service account, wrong labels, wrong namespace: not bound.
        assert_eq!(
            b(&pod("agents", "other", &[("app", "research")])),
            Binding::None
        );
        assert_eq!(
            b(&pod("agents", "research", &[("app", "x")])),
            Binding::None
        );
        assert_eq!(
            b(&pod("default", "research", &[("app", "research")])),
            Binding::None
        );
        assert_eq!(
            b(&pod("tools", "whatever", &[])),
            Binding::Policy("tools".into())
        );
        // A pod without a service account name runs as `default`.
        assert_eq!(b(&pod("batch", "", &[])), Binding::Policy("batch".into()));
    }

    #[test]
    fn two_policies_selecting_a_pod_are_a_conflict() {
        let a = ident(Some("agents"), None, None);
        let b = ident(None, Some("research"), None);
        let p = pod("agents", "research", &[]);
        assert_eq!(
            bind([("b-policy", Some(&b)), ("a-policy", Some(&a))], &p),
            Binding::Conflict(vec!["a-policy".into(), "b-policy".into()])
        );
    }

    #[test]
    fn spiffe_id_is_explicit_or_derived() {
        let p = pod("agents", "research", &[]);
        let mut id = ident(Some("agents"), None, None);
        assert_eq!(
            spiffe_id(Some(&id), "example.org", &p),
            "spiffe://example.org/ns/agents/sa/research"
        );
        assert_eq!(
            spiffe_id(Some(&id), "example.org", &pod("agents", "", &[])),
            "spiffe://example.org/ns/agents/sa/default"
        );
        id.spiffe_id = Some("spiffe://corp.example/agent/research".into());
        assert_eq!(
            spiffe_id(Some(&id), "example.org", &p),
            "spiffe://corp.example/agent/research"
        );
    }
}
