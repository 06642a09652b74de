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
    printcolumn(name = "Pods", type_ = "integer", json_path = ".status.boundPods"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(transparent)]
pub struct AgentPolicySpec(pub Spec);

/// What the daemon reports about an `AgentPolicy` object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentPolicyStatus {
    /// `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`: `True` when the spec validated and is enforced, `False`
    /// with reason `Invalid` and the validator's errors (field:line:column of
    /// the spec rendered as YAML) in `message`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// SHA-256 of the policy's canonical JSON (as in the audit log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_hash: Option<String>,
    /// Pods this policy is bound to on the reporting node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_pods: Option<i32>,
}

impl AgentPolicyStatus {
    /// Status of an object whose spec was accepted and is enforced.
    pub fn accepted(generation: Option<i64>, hash: &str, bound_pods: i32, now: Time) -> Self {
        Self {
            observed_generation: generation,
            conditions: vec![Condition {
                type_: CONDITION_ACCEPTED.into(),
                status: "True".into(),
                reason: "Valid".into(),
                message: "policy validated and installed".into(),
                observed_generation: generation,
                last_transition_time: now,
            }],
            policy_hash: Some(hash.to_owned()),
            bound_pods: Some(bound_pods),
        }
    }

    /// Status of an object whose spec was rejected; `errors` are the
    /// validator's (one per line in the condition's message).
    pub fn rejected(generation: Option<i64>, errors: &PolicyErrors, now: Time) -> Self {
        Self {
            observed_generation: generation,
            conditions: vec![Condition {
                type_: CONDITION_ACCEPTED.into(),
                status: "False".into(),
                reason: "Invalid".into(),
                message: errors.to_string(),
                observed_generation: generation,
                last_transition_time: now,
            }],
            policy_hash: None,
            bound_pods: Some(0),
        }
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

#[cfg(test)]
mod tests;
