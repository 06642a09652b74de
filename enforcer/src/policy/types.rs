//! The `enforcer.dev/v1alpha1` `AgentPolicy` schema as Rust types.
//!
//! These are the *validated* types: every value in them has passed the checks
//! of [`super::validate`] (a CIDR has no host bits, a port range has
//! `lo <= hi`, exactly one of `cidr`/`host` is set, ...). They derive serde so
//! that the canonical JSON of a policy (its hash) and a JSON round trip (for
//! `enforcer status`) are available; unknown fields are refused in JSON too.
//!
//! The serde form of every type is the policy file's own form (a port is
//! `443` or `"8000-8100"`, a duration `"5s"`, a CIDR `"10.0.0.0/8"` or a bare
//! address), and the `JsonSchema` derives describe exactly that form: the
//! `AgentPolicy` CRD (`crate::k8s::crd`) uses [`Spec`] as its spec, so a
//! policy file's `spec:` and a CRD object's `spec:` are the same document.
//! Deserializing runs the same value checks as the file validator (CIDR in
//! network form, `lo <= hi`, durations with a unit), so JSON from the API
//! server cannot smuggle in a value a file could not hold.
use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The only accepted `apiVersion`.
pub const API_VERSION: &str = "enforcer.dev/v1alpha1";
/// The only accepted `kind`.
pub const KIND: &str = "AgentPolicy";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentPolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: Spec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    /// RFC 1123 DNS label (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 bytes),
    /// unique among all loaded policies.
    pub name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Spec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Identity>,
    #[serde(default)]
    pub mode: Mode,
    /// Allowlist; anything not matched is denied (`enforce`) or recorded (`audit`).
    #[serde(default)]
    pub egress: Vec<EgressRule>,
    /// Peers that may open a connection to (or send a datagram to an
    /// unconnected socket of) the agent; anything else from outside the
    /// identity is dropped before the agent's socket sees it. Empty: no
    /// inbound connection at all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<IngressRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_taint: Option<OnTaint>,
    /// `enforcer run` with `--user root` only: absolute paths the agent may
    /// write besides its working directory and its private `/tmp` (the rest
    /// of the file system is read-only for a uid-0 agent). Ignored by the
    /// daemon (a pod has its own file system).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub writable: Vec<PathBuf>,
    /// Unix sockets the agent may connect or send to (by the address it
    /// writes); every other unix socket address is refused (`enforce`) or
    /// recorded (`audit`). Resolver IPC sockets cannot be listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub local: Vec<LocalRule>,
}

/// `spec.local[i]`: one unix socket. Exactly one of `path` and `abstract` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.path) != has(self.abstract)",
    "message": "exactly one of path and abstract must be set"
}]))]
pub struct LocalRule {
    /// Absolute, normalized socket path, at most 108 bytes, matched as the
    /// exact string the agent connects to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Abstract-namespace name (without the leading NUL), 1..=107 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "abstract")]
    pub abstract_name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Identity {
    /// `spiffe://<trust-domain>/<path>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesIdentity>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    /// Non-empty for `In`/`NotIn`, empty for `Exists`/`DoesNotExist`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Undeclared egress fails with EPERM.
    #[default]
    Enforce,
    /// Undeclared egress is allowed and recorded with verdict `audit`.
    Audit,
}

/// One allowlist entry. Exactly one of `cidr` and `host` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.cidr) != has(self.host)",
    "message": "exactly one of cidr and host must be set"
}]))]
pub struct EgressRule {
    /// Network form (no host bits set); a bare address is a /32 or /128.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "cidr_serde")]
    #[schemars(schema_with = "cidr_schema")]
    pub cidr: Option<IpNet>,
    /// Lower-case DNS name, or `*.` followed by one (matches one or more labels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Empty = all ports (the YAML field was omitted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRange>,
    #[serde(default)]
    pub protocol: Protocol,
    /// `host:` rules only: whether a connection to the name's addresses
    /// must first present the name (TLS SNI or HTTP Host), judged in the
    /// kernel before any byte leaves (`name`, the default), or may carry
    /// anything (`none`: SSH and other protocols without a name; also
    /// allows UDP to the addresses).
    #[serde(default, skip_serializing_if = "Inspect::is_default")]
    pub inspect: Inspect,
}

/// One `spec.ingress` rule: peers in `cidr` may connect to the agent's
/// `ports` (its local ports) over `protocol`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IngressRule {
    /// Peer addresses. Network form (no host bits set); a bare address is a
    /// /32 or /128.
    #[serde(with = "cidr_serde_required")]
    #[schemars(schema_with = "cidr_schema")]
    pub cidr: IpNet,
    /// The agent's local ports. Empty = all ports (the YAML field was omitted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRange>,
    #[serde(default)]
    pub protocol: Protocol,
}

impl IngressRule {
    /// The same rule in the egress compiler's form (a peer CIDR and ports).
    pub fn as_egress(&self) -> EgressRule {
        EgressRule {
            cidr: Some(self.cidr),
            host: None,
            ports: self.ports.clone(),
            protocol: self.protocol,
            inspect: Inspect::default(),
        }
    }
}

/// `EgressRule.inspect`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Inspect {
    /// The first bytes must be a TLS ClientHello or an HTTP/1.x request
    /// naming a host rule of the identity that admits the port.
    #[default]
    Name,
    /// No check of the first bytes (opt-out, shown by `policy check`,
    /// `status` and the audit start record).
    None,
}

impl Inspect {
    pub fn is_default(&self) -> bool {
        *self == Self::Name
    }
}

/// Inclusive port range, `1 <= lo <= hi <= 65535`. Written (and serialized)
/// as a number `443` when `lo == hi`, else as a string `"8000-8100"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    /// TCP, UDP and every other IP protocol.
    #[default]
    Any,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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

/// TTL clamp for learned addresses, `min <= max`. Each is written `<n>s`,
/// `<n>m` or `<n>h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DnsTtl {
    #[serde(with = "duration_serde")]
    #[schemars(schema_with = "duration_schema")]
    pub min: Duration,
    #[serde(with = "duration_serde")]
    #[schemars(schema_with = "duration_schema")]
    pub max: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileRule {
    /// Absolute path of a file or a directory tree.
    pub path: PathBuf,
    pub access: FileAccess,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileAccess {
    Deny,
    Audit,
    /// Reading it clamps egress to `spec.onTaint.egress`.
    Taint,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OnTaint {
    #[serde(default)]
    pub egress: Vec<EgressRule>,
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.lo == self.hi {
            s.serialize_u16(self.lo)
        } else {
            s.collect_str(&format_args!("{}-{}", self.lo, self.hi))
        }
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Str(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Int(i) => i.to_string(),
            Raw::Str(s) => s,
        };
        super::validate::port_range(&text).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for PortRange {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PortRange".into()
    }

    fn inline_schema() -> bool {
        true
    }

    /// Kubernetes' structural form of "int or string" (the API server then
    /// accepts exactly these two types here; deserializing checks the
    /// range). No `anyOf`: kube's structural rewriter would empty its
    /// branches anyway, and `x-kubernetes-int-or-string` alone says it all.
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A port (1-65535) as a number, or an inclusive range \"lo-hi\" as a string.",
            "x-kubernetes-int-or-string": true
        })
    }
}

fn cidr_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "IPv4/IPv6 CIDR in network form (no host bits), or a bare address (/32, /128).",
        "type": "string"
    })
}

fn duration_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "A whole number with a unit: s, m or h (5s, 300s, 5m).",
        "type": "string",
        "pattern": "^[0-9]+[smh]$"
    })
}

/// `cidr:` as the file writes it; parsed with the file validator's rules.
mod cidr_serde {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<IpNet>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(net) => s.collect_str(net),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpNet>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|t| super::super::validate::parse_cidr(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

mod cidr_serde_required {
    use super::*;

    pub fn serialize<S: Serializer>(v: &IpNet, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<IpNet, D::Error> {
        let t = String::deserialize(d)?;
        super::super::validate::parse_cidr(&t).map_err(serde::de::Error::custom)
    }
}

/// A duration as the file writes it: `"300s"` (serialized in seconds).
mod duration_serde {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}s", v.as_secs()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let t = String::deserialize(d)?;
        super::super::validate::duration(&t).map_err(serde::de::Error::custom)
    }
}
