//! The `AgentPolicy` custom resource (`enforcer.dev/v1alpha1`, namespaced).
//!
//! Its `spec` is the policy file's `spec` (`crate::policy::Spec`): the same
//! Rust type, serialized the same way, with the OpenAPI schema derived from
//! it. `deploy/10-crd.yaml` is the output of [`crd_yaml`] (`enforcer k8s crd`);
//! a test keeps the two equal, so the installed schema cannot drift from the
//! types the daemon deserializes.
//!
//! The schema is structural and has no `x-kubernetes-preserve-unknown-fields`:
//! with kubectl's default `--validate=strict` the API server rejects an
//! unknown field, and without it the field is pruned before it is stored
//! (the daemon never sees it either way). Value checks the schema cannot
//! express (host names, CIDR host bits, `ttl.min <= ttl.max`, ...) are made by
//! [`policy_from_object`] with the file validator; its errors go into the
//! `Accepted` condition of the object's status.
use std::path::PathBuf;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::{self, LoadedPolicy, PolicyError, PolicyErrors, Spec};

/// The condition type that says whether the daemon accepted the object.
pub const CONDITION_ACCEPTED: &str = "Accepted";

/// The `spec` of an `AgentPolicy` object: exactly a policy file's `spec`.
// clippy reads the repeated `type_ = ...` of the printcolumns as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "enforcer.dev",
    version = "v1alpha1",
    kind = "AgentPolicy",
    plural = "agentpolicies",
    singular = "agentpolicy",
    shortname = "agentpol",
    namespaced,
    status = "AgentPolicyStatus",
    derive = "PartialEq",
    doc = "Egress, DNS and file policy of an AI agent, enforced in the kernel by the enforcer daemon.",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(transparent)]
pub struct AgentPolicySpec(pub Spec);

/// What the daemons report about an `AgentPolicy` object.
///
/// Every node's daemon validates every object, so the status has two parts:
/// - node-independent (`observedGeneration`, the `Accepted` condition,
///   `policyHash`): a function of the spec alone (validator, namespace rule,
///   compiler), so all nodes compute the same value; a daemon writes it only
///   when it differs from what the object already says (ignoring
///   `lastTransitionTime`), so N nodes do not fight;
/// - per node (`nodes`, a map list keyed by `node`): what this node enforces.
///   Each daemon writes only its own entry (server-side apply with the field
///   manager `enforcer-node-<node>`, which owns that entry alone).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentPolicyStatus {
    /// `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`: `True` (reason `Valid`) when the spec validated, `False`
    /// with reason `Invalid` and the validator's errors (field:line:column of
    /// the spec rendered as YAML) in `message`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// SHA-256 of the accepted policy's canonical JSON (as in the audit log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_hash: Option<String>,
    /// One entry per node whose daemon reported on this object.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub nodes: Vec<NodeStatus>,
}

/// What one node's daemon enforces of an `AgentPolicy` object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// The node's name.
    pub node: String,
    /// Whether a version of this object is enforced on the node (after a
    /// rejected change, the previously accepted version stays enforced).
    pub enforced: bool,
    /// `policy_hash` of the version enforced on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_hash: Option<String>,
    /// Pods of the node bound to this policy.
    #[serde(default)]
    pub bound_pods: i32,
    /// Why the node does not enforce the current spec (e.g. no BPF LSM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl AgentPolicyStatus {
    /// The node-independent part of a status whose spec was accepted.
    pub fn accepted(generation: Option<i64>, hash: &str, now: Time) -> Self {
        Self {
            observed_generation: generation,
            conditions: vec![Condition {
                type_: CONDITION_ACCEPTED.into(),
                status: "True".into(),
                reason: "Valid".into(),
                message: "policy validated".into(),
                observed_generation: generation,
                last_transition_time: now,
            }],
            policy_hash: Some(hash.to_owned()),
            nodes: Vec::new(),
        }
    }

    /// The node-independent part of a status whose spec was rejected;
    /// `errors` are the validator's (one per line in the condition's message).
    pub fn rejected(generation: Option<i64>, errors: &[String], now: Time) -> Self {
        Self {
            observed_generation: generation,
            conditions: vec![Condition {
                type_: CONDITION_ACCEPTED.into(),
                status: "False".into(),
                reason: "Invalid".into(),
                message: errors.join("\n"),
                observed_generation: generation,
                last_transition_time: now,
            }],
            policy_hash: None,
            nodes: Vec::new(),
        }
    }

    /// The `Accepted` condition, if any.
    pub fn accepted_condition(&self) -> Option<&Condition> {
        self.conditions
            .iter()
            .find(|c| c.type_ == CONDITION_ACCEPTED)
    }
}

/// The CRD as the API server wants it.
pub fn crd(
) -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    AgentPolicy::crd()
}

/// The CRD as YAML (`enforcer k8s crd`, `deploy/10-crd.yaml`), emitted by
/// serde-saphyr, the YAML library the project already parses with.
pub fn crd_yaml() -> String {
    let body = serde_saphyr::to_string(&crd()).expect("the CRD serializes to YAML");
    format!(
        "# Generated by `enforcer k8s crd` from the Rust policy types; do not edit.\n\
         # The spec schema is the policy file's spec (enforcer/src/policy/types.rs).\n\
         {body}"
    )
}

/// Validate an object's `spec` (raw JSON, as the API server returns it) with
/// the policy file validator, so that an object gets exactly the checks and
/// messages a file gets. The spec is rendered as a policy document (YAML)
/// named `agentpolicy/<namespace>/<name>`; errors point at lines and columns
/// of that rendering. The policy's name is `name`.
pub fn policy_from_object(
    namespace: &str,
    name: &str,
    spec: &serde_json::Value,
) -> Result<LoadedPolicy, PolicyErrors> {
    let source = PathBuf::from(format!("agentpolicy/{namespace}/{name}"));
    let doc = serde_json::json!({
        "apiVersion": policy::API_VERSION,
        "kind": policy::KIND,
        "metadata": {"name": name},
        "spec": spec,
    });
    let text = serde_saphyr::to_string(&doc).map_err(|e| {
        PolicyErrors(vec![PolicyError {
            file: source.clone(),
            line: 0,
            column: 0,
            field: "spec".into(),
            message: format!("cannot render the spec as YAML: {e}"),
        }])
    })?;
    let mut loaded = policy::parse_str(&text, &source)?;
    Ok(loaded.remove(0))
}

/// The identity name of the policy of object `namespace`/`name`:
/// `<namespace>/<name>`. Namespaces and object names cannot contain `/`,
/// so two objects never share an identity name, and a file policy's name
/// (an RFC 1123 label) never equals an object's.
pub fn identity_name(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Whether an identity name is an object's (`<namespace>/<name>`; a file
/// policy's name is a DNS label, without `/`).
pub fn is_object_identity(name: &str) -> bool {
    name.contains('/')
}

/// The policy an `AgentPolicy` object declares, as the daemon enforces it:
/// [`policy_from_object`] (the file validator), then the namespace rule and
/// the identity name.
///
/// Namespace rule: an object only selects pods of its own namespace (whoever
/// may create an AgentPolicy in namespace A must not bind, and so control,
/// pods in B). An unset `spec.identity.kubernetes.namespace` becomes the
/// object's namespace; another namespace is an error located at that field.
/// An object without `spec.identity.kubernetes` selects no pod.
///
/// The policy is named [`identity_name`] (its audit, metric and status
/// identity); its hash is computed over the policy as enforced (with that
/// name and namespace).
pub fn object_policy(
    namespace: &str,
    name: &str,
    spec: &serde_json::Value,
    trust_domain: &str,
) -> Result<LoadedPolicy, PolicyErrors> {
    let mut p = policy_from_object(namespace, name, spec)?;
    if let Some(k) = p
        .policy
        .spec
        .identity
        .as_mut()
        .and_then(|i| i.kubernetes.as_mut())
    {
        match k.namespace.as_deref() {
            None => k.namespace = Some(namespace.to_owned()),
            Some(n) if n == namespace => {}
            Some(n) => {
                let n = n.to_owned();
                return Err(PolicyErrors(vec![p.error(
                    "spec.identity.kubernetes.namespace",
                    format!(
                        "{n:?} is not this object's namespace {namespace:?}: an AgentPolicy \
                         only selects pods of its own namespace (leave it unset, or create \
                         the object in {n:?})"
                    ),
                )]));
            }
        }
    }
    // The SPIFFE ID an object declares is one of its own namespace in the
    // cluster's trust domain, so that an object cannot label its pods'
    // audit records and metrics with another namespace's (or another trust
    // domain's) workload identity.
    if let Some(id) = p
        .policy
        .spec
        .identity
        .as_ref()
        .and_then(|i| i.spiffe_id.as_deref())
    {
        let want = format!("spiffe://{trust_domain}/ns/{namespace}/");
        if !id.starts_with(&want) {
            let id = id.to_owned();
            return Err(PolicyErrors(vec![p.error(
                "spec.identity.spiffeId",
                format!(
                    "{id:?} is not an identity of this object's namespace {namespace:?}: an \
                     AgentPolicy's spiffeId must start with {want} (or leave it unset: \
                     spiffe://{trust_domain}/ns/<namespace>/sa/<serviceAccount> is derived per pod)"
                ),
            )]));
        }
    }
    p.policy.metadata.name = identity_name(namespace, name);
    p.hash = policy::policy_hash(&p.policy);
    Ok(p)
}

#[cfg(test)]
mod tests;
