//! The `enforcer.dev/v1alpha1` `AgentPolicy` schema as Rust types.
//!
//! These are the *validated* types: every value in them has passed the checks
//! of [`super::validate`] (a CIDR has no host bits, a port range has
//! `lo <= hi`, exactly one of `cidr`/`host` is set, ...). They derive serde so
//! that the canonical JSON of a policy (its hash) and a JSON round trip (for
//! `enforcer status`) are available; unknown fields are refused in JSON too.
use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The only accepted `apiVersion`.
pub const API_VERSION: &str = "enforcer.dev/v1alpha1";
/// The only accepted `kind`.
pub const KIND: &str = "AgentPolicy";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentPolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: Spec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    /// RFC 1123 DNS label (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 bytes),
    /// unique among all loaded policies.
    pub name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Spec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Identity>,
    #[serde(default)]
    pub mode: Mode,
    /// Allowlist; anything not matched is denied (`enforce`) or recorded (`audit`).
    #[serde(default)]
    pub egress: Vec<EgressRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_taint: Option<OnTaint>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Identity {
    /// `spiffe://<trust-domain>/<path>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesIdentity>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubernetesIdentity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
}

/// A Kubernetes label selector (`matchLabels` and `matchExpressions` are ANDed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    /// Non-empty for `In`/`NotIn`, empty for `Exists`/`DoesNotExist`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Undeclared egress fails with EPERM.
    #[default]
    Enforce,
    /// Undeclared egress is allowed and recorded with verdict `audit`.
    Audit,
}

/// One allowlist entry. Exactly one of `cidr` and `host` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressRule {
    /// Network form (no host bits set); a bare address is a /32 or /128.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<IpNet>,
    /// Lower-case DNS name, or `*.` followed by one (matches one or more labels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Empty = all ports (the YAML field was omitted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRange>,
    #[serde(default)]
    pub protocol: Protocol,
}

/// Inclusive port range, `1 <= lo <= hi <= 65535`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    /// TCP, UDP and every other IP protocol.
    #[default]
    Any,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Dns {
    /// Empty = the nameservers of `/etc/resolv.conf`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstream: Vec<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<DnsTtl>,
    /// 1..=253; `None` = 253.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_query_length: Option<u16>,
    /// Record types the agent may query, canonical upper-case names as
    /// hickory's `RecordType` spells them (`A`, `AAAA`, `TXT`, ...), without
    /// duplicates. The list is the complete set (it replaces the default).
    /// Empty = `[A, AAAA]` (the YAML field was omitted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_types: Vec<String>,
    /// Distinct names per host rule and minute an identity may resolve,
    /// `>= 1`; `None` = 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names_per_minute: Option<u32>,
}

/// TTL clamp for learned addresses, `min <= max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsTtl {
    pub min: Duration,
    pub max: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileRule {
    /// Absolute path of a file or a directory tree.
    pub path: PathBuf,
    pub access: FileAccess,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileAccess {
    Deny,
    Audit,
    /// Reading it clamps egress to `spec.onTaint.egress`.
    Taint,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OnTaint {
    #[serde(default)]
    pub egress: Vec<EgressRule>,
}
