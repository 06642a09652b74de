use std::path::{Path, PathBuf};

use super::*;
use crate::policy::load_files;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn shipped_policies() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo().join("policies"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    assert!(!v.is_empty());
    v
}

#[test]
fn deploy_crd_yaml_is_generated_from_the_types() {
    let path = repo().join("deploy/10-crd.yaml");
    let on_disk = std::fs::read_to_string(&path).unwrap();
    assert!(
        on_disk == crd_yaml(),
        "{} is stale: regenerate it with `cargo run -p enforcer -- k8s crd > deploy/10-crd.yaml`",
        path.display()
    );
}

#[test]
fn crd_identity_and_status_subresource() {
    let c = crd();
    assert_eq!(
        c.metadata.name.as_deref(),
        Some("agentpolicies.enforcer.dev")
    );
    assert_eq!(c.spec.group, "enforcer.dev");
    assert_eq!(c.spec.scope, "Namespaced");
    assert_eq!(c.spec.names.kind, "AgentPolicy");
    assert_eq!(c.spec.names.plural, "agentpolicies");
    assert_eq!(c.spec.versions.len(), 1);
    let v = &c.spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    assert!(v.served && v.storage);
    assert!(v.subresources.as_ref().unwrap().status.is_some());
}

/// Walk the schema as JSON: structural (every object node has `properties`
/// or `additionalProperties` with a schema), nothing preserves unknown
/// fields, every spec object lists its properties (so unknown ones are
/// rejected or pruned), and `additionalProperties: false` is gone (the API
/// server refuses it next to `properties`).
#[test]
fn schema_is_structural_and_closed() {
    let c = crd();
    let schema = serde_json::to_value(
        &c.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema,
    )
    .unwrap();
    fn walk(v: &serde_json::Value, path: &str, objects: &mut usize) {
        let Some(m) = v.as_object() else { return };
        assert!(
            !m.contains_key("x-kubernetes-preserve-unknown-fields"),
            "{path} preserves unknown fields"
        );
        assert_ne!(
            m.get("additionalProperties"),
            Some(&serde_json::Value::Bool(false)),
            "{path}"
        );
        for k in ["$ref", "definitions", "$defs", "oneOf", "anyOf", "allOf"] {
            assert!(!m.contains_key(k), "{path} has {k}");
        }
        if m.get("type").and_then(|t| t.as_str()) == Some("object") {
            *objects += 1;
            assert!(
                m.contains_key("properties")
                    || m.get("additionalProperties").is_some_and(|a| a.is_object()),
                "{path}: object without properties"
            );
        }
        for (k, child) in m {
            match child {
                serde_json::Value::Object(_) => walk(child, &format!("{path}.{k}"), objects),
                serde_json::Value::Array(a) => {
                    for (i, c) in a.iter().enumerate() {
                        walk(c, &format!("{path}.{k}[{i}]"), objects)
                    }
                }
                _ => {}
            }
        }
    }
    let mut objects = 0;
    walk(&schema, "", &mut objects);
    assert!(objects > 10, "{objects}");
    // The spec's fields are the file format's.
    let spec = &schema["properties"]["spec"]["properties"];
    let mut keys: Vec<&str> = spec
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        ["dns", "egress", "files", "identity", "ingress", "local", "mode", "onTaint", "writable"]
    );
    assert_eq!(
        spec["local"]["items"]["x-kubernetes-validations"][0]["rule"],
        "has(self.path) != has(self.abstract)"
    );
    let egress = &spec["egress"]["items"];
    assert_eq!(
        egress["properties"]["ports"]["items"]["x-kubernetes-int-or-string"],
        true
    );
    assert_eq!(
        egress["x-kubernetes-validations"][0]["rule"],
        "has(self.cidr) != has(self.host)"
    );
    assert_eq!(
        spec["dns"]["properties"]["ttl"]["properties"]["min"]["type"],
        "string"
    );
    assert_eq!(
        spec["mode"]["enum"],
        serde_json::json!(["enforce", "audit"])
    );
}

/// Every shipped policy file's spec is a valid CRD spec: the document as
/// kubectl would send it (the YAML's own `spec`, not re-serialized) and the
/// validated spec's JSON both deserialize into `AgentPolicySpec`, equal to
/// what the file loader produced, and serialize back unchanged.
#[test]
fn shipped_policies_convert_to_the_crd_and_back() {
    for file in shipped_policies() {
        let loaded = load_files(std::slice::from_ref(&file)).unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        let raw: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        for p in &loaded {
            let json = serde_json::to_value(&p.policy.spec).unwrap();
            let crd_spec: AgentPolicySpec = serde_json::from_value(json.clone())
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert_eq!(crd_spec.0, p.policy.spec, "{}", file.display());
            assert_eq!(serde_json::to_value(&crd_spec).unwrap(), json);

            let as_written: AgentPolicySpec = serde_json::from_value(raw["spec"].clone())
                .unwrap_or_else(|e| panic!("{} as written: {e}", file.display()));
            assert_eq!(as_written.0, p.policy.spec, "{}", file.display());

            // And an object carrying it validates to the same policy (same hash).
            let again =
                policy_from_object("agents", &p.policy.metadata.name, &raw["spec"]).unwrap();
            assert_eq!(again.policy, p.policy);
            assert_eq!(again.hash, p.hash);

            let obj = AgentPolicy::new(&p.policy.metadata.name, crd_spec);
            let back: AgentPolicy =
                serde_json::from_value(serde_json::to_value(&obj).unwrap()).unwrap();
            assert_eq!(back, obj);
        }
    }
}

#[test]
fn unknown_spec_field_is_refused_by_the_type() {
    let e = serde_json::from_value::<AgentPolicySpec>(serde_json::json!({
        "egress": [{"cidr": "10.0.0.0/8", "prot": "tcp"}]
    }))
    .unwrap_err()
    .to_string();
    assert!(e.contains("prot"), "{e}");
}

#[test]
fn file_format_values_are_checked_on_deserialize() {
    for (bad, needle) in [
        (
            serde_json::json!({"egress": [{"cidr": "10.0.0.1/8"}]}),
            "host bits",
        ),
        (
            serde_json::json!({"egress": [{"cidr": "10.0.0.0/8", "ports": ["90-80"]}]}),
            "greater",
        ),
        (
            serde_json::json!({"egress": [{"cidr": "10.0.0.0/8", "ports": [0]}]}),
            "0",
        ),
        (
            serde_json::json!({"dns": {"ttl": {"min": 5, "max": "10s"}}}),
            "string",
        ),
        (
            serde_json::json!({"dns": {"ttl": {"min": "5x", "max": "10s"}}}),
            "duration",
        ),
    ] {
        let e = serde_json::from_value::<AgentPolicySpec>(bad.clone())
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{bad}: {e}");
    }
    let ok: AgentPolicySpec = serde_json::from_value(serde_json::json!({
        "egress": [{"cidr": "10.0.0.1", "ports": [443, "8000-8100"]}],
        "dns": {"ttl": {"min": "5s", "max": "5m"}}
    }))
    .unwrap();
    assert_eq!(
        serde_json::to_value(&ok).unwrap(),
        serde_json::json!({
            "mode": "enforce",
            "egress": [{"cidr": "10.0.0.1/32", "ports": [443, "8000-8100"], "protocol": "any"}],
            "dns": {"ttl": {"min": "5s", "max": "300s"}}
        })
    );
}

#[test]
fn invalid_object_is_rejected_with_location_in_the_status() {
    let spec = serde_json::json!({
        "egress": [{"cidr": "10.0.0.0/8"}, {"host": "Bad..Name", "ports": [443]}]
    });
    let errors = policy_from_object("agents", "research", &spec).unwrap_err();
    let msg = errors.to_string();
    assert!(
        msg.starts_with("agentpolicy/agents/research:") && msg.contains("spec.egress[1].host"),
        "{msg}"
    );
    let now = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    let lines: Vec<String> = errors.0.iter().map(|e| e.to_string()).collect();
    let st = AgentPolicyStatus::rejected(Some(3), &lines, now.clone());
    assert_eq!(st.conditions[0].type_, CONDITION_ACCEPTED);
    assert_eq!(st.conditions[0].status, "False");
    assert_eq!(st.conditions[0].message, msg);
    let ok = policy_from_object("agents", "research", &serde_json::json!({})).unwrap();
    let st = AgentPolicyStatus::accepted(Some(3), &ok.hash, now);
    let v = serde_json::to_value(&st).unwrap();
    assert_eq!(v["observedGeneration"], 3);
    assert_eq!(v["policyHash"], ok.hash);
    assert_eq!(v["conditions"][0]["status"], "True");
}

#[test]
fn object_policy_is_named_by_namespace_and_selects_only_its_namespace() {
    // Unset namespace: the object's own.
    let spec = serde_json::json!({
        "identity": {"kubernetes": {"podSelector": {"matchLabels": {"app": "research"}}}},
        "egress": [{"cidr": "10.0.0.0/8"}]
    });
    let p = object_policy("agents", "research", &spec, "example.org").unwrap();
    assert_eq!(p.policy.metadata.name, "agents/research");
    assert_eq!(
        p.policy
            .spec
            .identity
            .as_ref()
            .unwrap()
            .kubernetes
            .as_ref()
            .unwrap()
            .namespace
            .as_deref(),
        Some("agents")
    );
    assert_eq!(p.hash, crate::policy::policy_hash(&p.policy));
    let same_ns = serde_json::json!({
        "identity": {"kubernetes": {"namespace": "agents"}}
    });
    assert!(object_policy("agents", "research", &same_ns, "example.org").is_ok());
    // Without identity.kubernetes it selects nothing and stays so.
    let none = object_policy("agents", "research", &serde_json::json!({}), "example.org").unwrap();
    assert!(none.policy.spec.identity.is_none());

    // Another namespace: rejected, at the field, with line:column.
    let other = serde_json::json!({
        "identity": {"kubernetes": {"namespace": "payments", "serviceAccount": "x"}},
        "egress": [{"cidr": "10.0.0.0/8"}]
    });
    let e = object_policy("agents", "research", &other, "example.org").unwrap_err();
    assert_eq!(e.0.len(), 1, "{e}");
    let err = &e.0[0];
    assert_eq!(err.field, "spec.identity.kubernetes.namespace");
    assert!(err.line > 1 && err.column > 1, "{err}");
    let msg = err.to_string();
    assert!(
        msg.starts_with("agentpolicy/agents/research:")
            && msg.contains("\"payments\" is not this object's namespace \"agents\""),
        "{msg}"
    );
    // The rendered line at that position is the namespace field.
    let doc = serde_saphyr::to_string(&serde_json::json!({
        "apiVersion": crate::policy::API_VERSION,
        "kind": crate::policy::KIND,
        "metadata": {"name": "research"},
        "spec": other,
    }))
    .unwrap();
    let line = doc.lines().nth(err.line - 1).unwrap();
    assert!(line.contains("namespace: payments"), "{line:?} in\n{doc}");
}

#[test]
fn object_spiffe_id_must_name_its_namespace() {
    let ok = serde_json::json!({
        "identity": {"spiffeId": "spiffe://example.org/ns/agents/sa/research"}
    });
    assert!(object_policy("agents", "research", &ok, "example.org").is_ok());
    for bad in [
        "spiffe://example.org/ns/payments/sa/research",
        "spiffe://example.org/ns/agents-2/sa/research",
        "spiffe://example.org/workload/research",
        "spiffe://other.example/ns/agents/sa/research",
    ] {
        let spec = serde_json::json!({"identity": {"spiffeId": bad}});
        let errs = object_policy("agents", "research", &spec, "example.org").unwrap_err();
        let err = &errs.0[0];
        assert_eq!(err.field, "spec.identity.spiffeId", "{bad}");
        assert!(err.line > 0, "{bad}: a position");
        assert!(
            err.message
                .contains("must start with spiffe://example.org/ns/agents/"),
            "{bad}: {}",
            err.message
        );
    }
}
