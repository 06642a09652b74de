//! OCSF form of audit records (`--audit-format ocsf`, `audit tail --format ocsf`).
//!
//! One audit record becomes one [OCSF](https://schema.ocsf.io) 1.3.0 event
//! ([`OCSF_VERSION`], in `metadata.version`), one JSON object per line. The
//! same mapping serves the writer ([`crate::audit::AuditLog`] in
//! [`crate::audit::AuditFormat::Ocsf`]) and the conversion of JSON records
//! ([`json_to_ocsf`], used by `enforcer audit tail`), so both give the same
//! bytes for the same record.
//!
//! # Classes
//!
//! | record `action` | OCSF class | `activity_id` |
//! |---|---|---|
//! | `connect`, `unix_connect`, `ingress` | Network Activity 4001 | 1 Open; 5 Refuse when denied |
//! | `sendmsg`, `packet`, `inspect`, `unix_send` | Network Activity 4001 | 6 Traffic |
//! | `fd_receive` | Network Activity 4001 | 99 Other (`Receive Socket`) |
//! | `dns` | DNS Activity 4003 | 2 Response (1 Query when neither answers nor rcode are known) |
//! | `file_open` / `file_link` / `file_rename` | File System Activity 1001 | 14 Open / 1 Create / 5 Rename |
//! | `sock_create`, `setsockopt`, `syscall` | Kernel Activity 1003 | 4 Invoke (`kernel`: the system call) |
//! | `start` / `stop` | Application Lifecycle 6002 | 3 Start / 4 Stop |
//! | `policy_load`, `policy_reload`, `policy_remove`, `policy_reload_rejected` | Application Lifecycle 6002 | 8 Update (`status_id` 2 Failure when rejected) |
//! | `attach`, `detach`, `chain_resume`, `taint_clamp` | Application Lifecycle 6002 | 99 Other (`Attach`, `Detach`, `Chain Resume`, `Taint Clamp`) |
//! | an action this version does not know | 4001 (a record with a verdict) or 6002 | 99 Other |
//!
//! `sock_create`, `setsockopt` and `syscall` have no destination (Network
//! Activity requires `dst_endpoint`): they are refused system calls, which is
//! what Kernel Activity "Invoke" of a `kernel` object of type System Call
//! describes.
//!
//! # Attributes
//!
//! - `time`: `ts` in ms since the epoch; `metadata.sequence`: `seq`;
//!   `metadata.event_code`: the record's `action`; `unmapped.prev_hash`:
//!   `prev_hash` (see "Hash chain").
//! - verdict -> `action_id` / `disposition_id` / `severity_id`: allow -> 1
//!   Allowed / 1 Allowed / 1 Informational; deny -> 2 Denied / 2 Blocked / 3
//!   Medium; audit (would have been denied, `mode: audit`) -> 1 Allowed / 15
//!   Detected / 2 Low; taint (a `taint` file was read) -> 1 Allowed / 18
//!   Tagged / 3 Medium.
//! - Workload identity: `actor.app_name` = `identity.name` (the AgentPolicy),
//!   `actor.app_uid` = `identity.spiffe_id`. OCSF's actor names the user,
//!   process, session or *application/service* that acted; a SPIFFE ID
//!   identifies a workload (a service), not a person or an account, so it is
//!   the application uid, not `actor.user`.
//! - `actor.process`: `pid`, `name` = `comm`; in Kubernetes mode
//!   `actor.process.container.name` = `container` (profile `container`);
//!   the pod and namespace, which OCSF 1.3 has no attribute for, go to
//!   `unmapped.pod` / `unmapped.namespace`.
//! - The policy: `firewall_rule.name` = `rule`, and
//!   `authorizations[0]` = `{decision: verdict, policy: {name: identity.name,
//!   uid: policy_hash}}` (profile `security_control`). Lifecycle events
//!   (Application Lifecycle has no such profile) keep `policy_hash` in
//!   `unmapped`.
//! - Destinations: `dst_endpoint` `ip`/`port`/`hostname` (= `host`); unix
//!   sockets: `dst_endpoint.name` = the socket address,
//!   `connection_info.protocol_name` `unix`; `ingress`: the peer is
//!   `src_endpoint`, the local port `dst_endpoint` (named by the identity),
//!   `direction_id` 1 Inbound; everything else 2 Outbound.
//! - DNS: `query.hostname` = `host`, `query.type`/`class` from `qtype=`,
//!   `answers` from `learned=[..]` (and `answered=[..]`, `mode: audit`), `rcode_id` 5 Refused / 2 ServError when
//!   the proxy answered itself; `src_endpoint` is the agent's socket.
//! - Files: `file.path` = `path` (the `files:` rule's path, a file or a
//!   directory tree), `file.name` its last component, `file.uid` the inode.
//! - Flow records (aggregated allows): `count`, `start_time`, `end_time`.
//! - `detail` -> `message`; `device.hostname`: the node that wrote (or
//!   converted) the record. Every other field (`cgroup_id`, `namespace`, `pod`,
//!   `first_bytes`, `reason`, `presented`, `socket_kind`, fields unknown to
//!   this version) is kept under `unmapped` with its JSON name.
//!
//! Events list the profiles they use in `metadata.profiles` (`host`,
//! `security_control`, and `container` when they carry one); the tests
//! validate them against the JSON Schema of OCSF 1.3.0
//! (`enforcer/tests/data/ocsf/`).
//!
//! # Hash chain
//!
//! In the OCSF format a line carries its `seq` in `metadata.sequence` and the
//! SHA-256 of the previous line in `unmapped.prev_hash`; the chain is the
//! same as the JSON format's (over the exact bytes of the previous line,
//! without its newline), so `enforcer audit verify` checks either.
use std::{borrow::Cow, collections::BTreeMap, net::IpAddr};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    audit::{LifecycleAction, LifecycleEvent},
    events::{Action, Decision, Verdict},
};

/// The OCSF version of the events (`metadata.version`).
pub const OCSF_VERSION: &str = "1.3.0";
const PRODUCT: &str = "enforcer";

/// What the mapping needs besides the record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Context {
    /// `device.hostname`: the node.
    pub hostname: String,
    /// `metadata.product.version`.
    pub product_version: &'static str,
}

impl Context {
    /// This machine and this build.
    pub fn local() -> Self {
        let hostname = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_string());
        Self {
            hostname,
            product_version: env!("CARGO_PKG_VERSION"),
        }
    }
}

// ---------------------------------------------------------------------------
// The record, as the JSON format writes it.

/// `identity` of a record.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Identity<'a> {
    pub name: Cow<'a, str>,
    #[serde(default)]
    pub spiffe_id: Option<Cow<'a, str>>,
}

/// `flow` of an aggregated allow record.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Flow {
    pub count: u64,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
}

/// One audit record (decision or lifecycle), field for field as the JSON
/// format writes it; borrowed from a [`Decision`] / [`LifecycleEvent`] by the
/// writer, owned when parsed from a JSON line.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Record<'a> {
    pub seq: u64,
    pub ts: DateTime<Utc>,
    #[serde(default)]
    pub identity: Option<Identity<'a>>,
    #[serde(default)]
    pub cgroup_id: Option<u64>,
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub comm: Option<Cow<'a, str>>,
    pub action: Cow<'a, str>,
    #[serde(default)]
    pub ip: Option<IpAddr>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub protocol: Option<Cow<'a, str>>,
    #[serde(default)]
    pub host: Option<Cow<'a, str>>,
    #[serde(default)]
    pub path: Option<Cow<'a, str>>,
    #[serde(default)]
    pub namespace: Option<Cow<'a, str>>,
    #[serde(default)]
    pub pod: Option<Cow<'a, str>>,
    #[serde(default)]
    pub container: Option<Cow<'a, str>>,
    /// `None` for lifecycle records.
    #[serde(default)]
    pub verdict: Option<Cow<'a, str>>,
    #[serde(default)]
    pub rule: Option<Cow<'a, str>>,
    #[serde(default)]
    pub policy_hash: Option<Cow<'a, str>>,
    #[serde(default)]
    pub detail: Option<Cow<'a, str>>,
    #[serde(default)]
    pub first_bytes: Option<Cow<'a, str>>,
    #[serde(default)]
    pub reason: Option<Cow<'a, str>>,
    #[serde(default)]
    pub presented: Option<Cow<'a, str>>,
    #[serde(default)]
    pub socket: Option<Cow<'a, str>>,
    #[serde(default)]
    pub socket_kind: Option<Cow<'a, str>>,
    #[serde(default)]
    pub flow: Option<Flow>,
    pub prev_hash: Cow<'a, str>,
    /// Fields this version does not know: kept in `unmapped`.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl<'a> Record<'a> {
    /// The record the JSON format writes for decision `d` (borrowed).
    pub fn from_decision(seq: u64, prev_hash: &'a str, d: &'a Decision) -> Self {
        // Destructured without `..`: a new Decision field fails to compile
        // here until the OCSF form decides where it goes.
        let Decision {
            ts,
            identity,
            cgroup_id,
            pid,
            comm,
            action,
            ip,
            port,
            protocol,
            host,
            path,
            workload,
            verdict,
            rule,
            policy_hash,
            detail,
            first_bytes,
            unix,
            flow,
        } = d;
        let b = |s: &'a Option<String>| s.as_deref().map(Cow::Borrowed);
        Self {
            seq,
            ts: *ts,
            identity: Some(Identity {
                name: Cow::Borrowed(&identity.name),
                spiffe_id: b(&identity.spiffe_id),
            }),
            cgroup_id: Some(*cgroup_id),
            pid: Some(*pid),
            comm: Some(Cow::Borrowed(comm)),
            action: Cow::Borrowed(action.as_str()),
            ip: *ip,
            port: *port,
            protocol: b(protocol),
            host: b(host),
            path: b(path),
            namespace: workload.as_ref().map(|w| Cow::Borrowed(&*w.namespace)),
            pod: workload.as_ref().map(|w| Cow::Borrowed(&*w.pod)),
            container: workload
                .as_ref()
                .and_then(|w| w.container.as_deref())
                .map(Cow::Borrowed),
            verdict: Some(Cow::Borrowed(verdict.as_str())),
            rule: Some(Cow::Borrowed(rule)),
            policy_hash: Some(Cow::Borrowed(policy_hash)),
            detail: b(detail),
            first_bytes: first_bytes.as_ref().map(|f| Cow::Borrowed(f.kind)),
            reason: first_bytes
                .as_ref()
                .and_then(|f| f.reason)
                .map(Cow::Borrowed),
            presented: first_bytes
                .as_ref()
                .and_then(|f| f.name.as_deref())
                .map(Cow::Borrowed),
            socket: unix.as_ref().map(|u| Cow::Borrowed(&*u.name)),
            socket_kind: unix.as_ref().map(|u| Cow::Borrowed(u.kind)),
            flow: flow.as_ref().map(|f| Flow {
                count: f.count,
                first_seen: f.first_seen,
                last_seen: f.last_seen,
            }),
            prev_hash: Cow::Borrowed(prev_hash),
            extra: BTreeMap::new(),
        }
    }

    /// The record the JSON format writes for lifecycle event `ev` (borrowed).
    pub fn from_lifecycle(seq: u64, prev_hash: &'a str, ev: &'a LifecycleEvent) -> Self {
        Self {
            seq,
            ts: ev.ts,
            identity: ev.identity.as_ref().map(|i| Identity {
                name: Cow::Borrowed(&i.name),
                spiffe_id: i.spiffe_id.as_deref().map(Cow::Borrowed),
            }),
            cgroup_id: ev.cgroup_id,
            pid: None,
            comm: None,
            action: Cow::Borrowed(ev.action.as_str()),
            ip: None,
            port: None,
            protocol: None,
            host: None,
            path: None,
            namespace: None,
            pod: None,
            container: None,
            verdict: None,
            rule: None,
            policy_hash: ev.policy_hash.as_deref().map(Cow::Borrowed),
            detail: Some(Cow::Borrowed(&ev.detail)),
            first_bytes: None,
            reason: None,
            presented: None,
            socket: None,
            socket_kind: None,
            flow: None,
            prev_hash: Cow::Borrowed(prev_hash),
            extra: BTreeMap::new(),
        }
    }
}

// ---------------------------------------------------------------------------
// The OCSF event.

/// One OCSF 1.3.0 event: the attributes this mapping uses of classes 4001,
/// 4003, 1001, 1003 and 6002 (absent ones are not written).
#[derive(Debug, Serialize)]
pub struct Event<'a> {
    pub class_uid: u32,
    pub class_name: &'static str,
    pub category_uid: u32,
    pub category_name: &'static str,
    pub activity_id: u32,
    pub activity_name: &'static str,
    pub type_uid: u64,
    pub type_name: String,
    pub severity_id: u32,
    pub severity: &'static str,
    pub time: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_time: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disposition_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disposition: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<&'a str>,
    pub metadata: Metadata<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<Actor<'a>>,
    pub device: Device<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_endpoint: Option<Endpoint<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_endpoint: Option<Endpoint<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_info: Option<ConnectionInfo<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<DnsQuery<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub answers: Vec<DnsAnswer<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rcode_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rcode: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<File<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<Kernel<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app: Option<Product<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub firewall_rule: Option<FirewallRule<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub authorizations: Vec<Authorization<'a>>,
    pub unmapped: Unmapped<'a>,
}

#[derive(Debug, Serialize)]
pub struct Metadata<'a> {
    pub version: &'static str,
    pub product: Product<'a>,
    pub profiles: Vec<&'static str>,
    /// The record's `seq`.
    pub sequence: u64,
    /// The record's `action`.
    pub event_code: &'a str,
}

#[derive(Debug, Serialize)]
pub struct Product<'a> {
    pub name: &'static str,
    pub vendor_name: &'static str,
    pub version: &'a str,
}

#[derive(Debug, Serialize)]
pub struct Actor<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_uid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<Process<'a>>,
}

#[derive(Debug, Serialize)]
pub struct Process<'a> {
    pub pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<Container<'a>>,
}

#[derive(Debug, Serialize)]
pub struct Container<'a> {
    pub name: &'a str,
    pub orchestrator: &'static str,
}

#[derive(Debug, Serialize)]
pub struct Device<'a> {
    pub type_id: u32,
    #[serde(rename = "type")]
    pub type_: &'static str,
    pub hostname: &'a str,
}

#[derive(Debug, Default, Serialize)]
pub struct Endpoint<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct ConnectionInfo<'a> {
    pub direction_id: u32,
    pub direction: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol_num: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct DnsQuery<'a> {
    pub hostname: &'a str,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct DnsAnswer<'a> {
    pub rdata: &'a str,
    #[serde(rename = "type")]
    pub type_: &'static str,
}

#[derive(Debug, Serialize)]
pub struct File<'a> {
    pub name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<&'a str>,
    pub type_id: u32,
    #[serde(rename = "type")]
    pub type_: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct Kernel<'a> {
    pub name: &'a str,
    pub type_id: u32,
    #[serde(rename = "type")]
    pub type_: &'static str,
    pub system_call: &'a str,
}

#[derive(Debug, Serialize)]
pub struct FirewallRule<'a> {
    pub name: &'a str,
}

#[derive(Debug, Serialize)]
pub struct Authorization<'a> {
    pub decision: &'a str,
    pub policy: Policy<'a>,
}

#[derive(Debug, Serialize)]
pub struct Policy<'a> {
    pub name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<&'a str>,
}

/// Record fields without an OCSF attribute, under their JSON names.
#[derive(Debug, Serialize)]
pub struct Unmapped<'a> {
    /// SHA-256 of the previous line: the hash chain.
    pub prev_hash: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_hash: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_bytes: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presented: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_kind: Option<&'a str>,
    #[serde(flatten)]
    pub extra: &'a BTreeMap<String, Value>,
}

// ---------------------------------------------------------------------------
// Mapping.

mod class {
    /// (uid, name, category uid, category name)
    pub type Class = (u32, &'static str, u32, &'static str);
    pub const NETWORK: Class = (4001, "Network Activity", 4, "Network Activity");
    pub const DNS: Class = (4003, "DNS Activity", 4, "Network Activity");
    pub const FILE: Class = (1001, "File System Activity", 1, "System Activity");
    pub const KERNEL: Class = (1003, "Kernel Activity", 1, "System Activity");
    pub const APP: Class = (6002, "Application Lifecycle", 6, "Application Activity");
}

const fn severity_name(id: u32) -> &'static str {
    match id {
        1 => "Informational",
        2 => "Low",
        3 => "Medium",
        4 => "High",
        _ => "Unknown",
    }
}

/// (action_id, action, disposition_id, disposition, severity_id)
fn outcome(v: Verdict) -> (u32, &'static str, u32, &'static str, u32) {
    match v {
        Verdict::Allow => (1, "Allowed", 1, "Allowed", 1),
        Verdict::Deny => (2, "Denied", 2, "Blocked", 3),
        Verdict::Audit => (1, "Allowed", 15, "Detected", 2),
        Verdict::Taint => (1, "Allowed", 18, "Tagged", 3),
    }
}

/// The value of `key=` in a space-separated `detail` (a `[..]` list whole).
fn detail_field<'d>(detail: &'d str, key: &str) -> Option<&'d str> {
    let mut rest = detail;
    loop {
        let at = rest.find(key)?;
        let before_ok = at == 0 || rest.as_bytes()[at - 1] == b' ';
        let after = &rest[at + key.len()..];
        if before_ok {
            if let Some(v) = after.strip_prefix('=') {
                let end = if v.starts_with('[') {
                    v.find(']').map_or(v.len(), |i| i + 1)
                } else {
                    v.find(' ').unwrap_or(v.len())
                };
                return Some(&v[..end]);
            }
        }
        rest = after;
    }
}

fn protocol_num(name: &str) -> Option<u32> {
    match name {
        "icmp" => Some(1),
        "tcp" => Some(6),
        "udp" => Some(17),
        "icmpv6" => Some(58),
        n => n.parse().ok(),
    }
}

fn ms(t: &DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// Map `r` to its OCSF event (see the module docs for the table).
pub fn event<'a>(r: &'a Record<'a>, ctx: &'a Context) -> Event<'a> {
    let verdict = r.verdict.as_deref().and_then(Verdict::from_name);
    let detail = r.detail.as_deref();
    let identity = r.identity.as_ref();
    let mut profiles = vec!["host"];
    let mut ev = Event {
        class_uid: 0,
        class_name: "",
        category_uid: 0,
        category_name: "",
        activity_id: 0,
        activity_name: "",
        type_uid: 0,
        type_name: String::new(),
        severity_id: 1,
        severity: "",
        time: ms(&r.ts),
        start_time: r.flow.as_ref().map(|f| ms(&f.first_seen)),
        end_time: r.flow.as_ref().map(|f| ms(&f.last_seen)),
        count: r.flow.as_ref().map(|f| f.count),
        action_id: None,
        action: None,
        disposition_id: None,
        disposition: None,
        status_id: None,
        status: None,
        message: detail,
        metadata: Metadata {
            version: OCSF_VERSION,
            product: Product {
                name: PRODUCT,
                vendor_name: PRODUCT,
                version: ctx.product_version,
            },
            profiles: Vec::new(),
            sequence: r.seq,
            event_code: &r.action,
        },
        actor: None,
        device: Device {
            type_id: 0,
            type_: "Unknown",
            hostname: &ctx.hostname,
        },
        src_endpoint: None,
        dst_endpoint: None,
        connection_info: None,
        query: None,
        answers: Vec::new(),
        rcode_id: None,
        rcode: None,
        file: None,
        kernel: None,
        app: None,
        firewall_rule: None,
        authorizations: Vec::new(),
        unmapped: Unmapped {
            prev_hash: &r.prev_hash,
            cgroup_id: r.cgroup_id,
            namespace: r.namespace.as_deref(),
            pod: r.pod.as_deref(),
            policy_hash: None,
            first_bytes: r.first_bytes.as_deref(),
            reason: r.reason.as_deref(),
            presented: r.presented.as_deref(),
            socket_kind: r.socket_kind.as_deref(),
            extra: &r.extra,
        },
    };
    let process = r.pid.filter(|&p| p != 0).map(|pid| Process {
        pid,
        name: r.comm.as_deref().filter(|c| !c.is_empty()),
        container: r.container.as_deref().map(|name| Container {
            name,
            orchestrator: "kubernetes",
        }),
    });
    if process.as_ref().is_some_and(|p| p.container.is_some()) {
        profiles.push("container");
    }
    let actor = (identity.is_some() || process.is_some()).then(|| Actor {
        app_name: identity.map(|i| &*i.name),
        app_uid: identity.and_then(|i| i.spiffe_id.as_deref()),
        process,
    });
    ev.actor = actor;

    let (class, activity_id, activity_name) = match verdict {
        Some(v) => {
            profiles.push("security_control");
            let (aid, aname, did, dname, sev) = outcome(v);
            ev.action_id = Some(aid);
            ev.action = Some(aname);
            ev.disposition_id = Some(did);
            ev.disposition = Some(dname);
            ev.severity_id = sev;
            if let Some(rule) = r.rule.as_deref() {
                ev.firewall_rule = Some(FirewallRule { name: rule });
            }
            if let Some(i) = identity {
                ev.authorizations.push(Authorization {
                    decision: v.as_str(),
                    policy: Policy {
                        name: &i.name,
                        uid: r.policy_hash.as_deref().filter(|h| !h.is_empty()),
                    },
                });
            } else {
                ev.unmapped.policy_hash = r.policy_hash.as_deref();
            }
            decision_class(r, v, &mut ev)
        }
        None => {
            ev.unmapped.policy_hash = r.policy_hash.as_deref();
            lifecycle_class(r, &mut ev)
        }
    };
    let (uid, name, cat_uid, cat_name) = class;
    ev.class_uid = uid;
    ev.class_name = name;
    ev.category_uid = cat_uid;
    ev.category_name = cat_name;
    ev.activity_id = activity_id;
    ev.activity_name = activity_name;
    ev.type_uid = u64::from(uid) * 100 + u64::from(activity_id);
    ev.type_name = format!("{name}: {activity_name}");
    ev.severity = severity_name(ev.severity_id);
    profiles.sort_unstable();
    ev.metadata.profiles = profiles;
    ev
}

fn outbound<'a>(protocol: Option<&'a str>) -> ConnectionInfo<'a> {
    ConnectionInfo {
        direction_id: 2,
        direction: "Outbound",
        protocol_name: protocol,
        protocol_num: protocol.and_then(protocol_num),
    }
}

/// An endpoint OCSF accepts (it needs an address or a name).
fn endpoint<'a>(ip: Option<IpAddr>, port: Option<u16>, host: Option<&'a str>) -> Endpoint<'a> {
    Endpoint {
        ip,
        port,
        hostname: host,
        name: (ip.is_none() && host.is_none()).then_some("unknown"),
    }
}

fn decision_class<'a>(
    r: &'a Record<'a>,
    v: Verdict,
    ev: &mut Event<'a>,
) -> (class::Class, u32, &'static str) {
    let denied = v == Verdict::Deny;
    let open = if denied { (5, "Refuse") } else { (1, "Open") };
    let traffic = (6, "Traffic");
    let protocol = r.protocol.as_deref();
    let host = r.host.as_deref();
    let Some(action) = Action::from_name(&r.action) else {
        ev.dst_endpoint = Some(endpoint(r.ip, r.port, host));
        ev.connection_info = Some(outbound(protocol));
        return (class::NETWORK, 99, "Other");
    };
    let (activity_id, activity_name) = match action {
        Action::Dns => return dns(r, v, ev),
        Action::FileOpen | Action::FileLink | Action::FileRename => {
            let path = r.path.as_deref();
            let name = path
                .and_then(|p| p.trim_end_matches('/').rsplit('/').next())
                .filter(|n| !n.is_empty())
                .or(path)
                .unwrap_or("unknown");
            // "inode N on device M:m" (events/reader.rs).
            let inode = r
                .detail
                .as_deref()
                .and_then(|d| d.strip_prefix("inode "))
                .and_then(|d| d.split(' ').next());
            ev.file = Some(File {
                name,
                path,
                type_id: 0,
                type_: "Unknown",
                uid: inode,
            });
            let activity = match action {
                Action::FileOpen => (14, "Open"),
                Action::FileLink => (1, "Create"),
                _ => (5, "Rename"),
            };
            return (class::FILE, activity.0, activity.1);
        }
        Action::SockCreate | Action::Setsockopt | Action::Syscall => {
            let call = match action {
                Action::SockCreate => "socket",
                Action::Setsockopt => "setsockopt",
                _ => r
                    .rule
                    .as_deref()
                    .and_then(|rule| rule.strip_prefix("seccomp:"))
                    .unwrap_or("unknown"),
            };
            ev.kernel = Some(Kernel {
                name: call,
                type_id: 2,
                type_: "System Call",
                system_call: call,
            });
            return (class::KERNEL, 4, "Invoke");
        }
        Action::Connect => open,
        Action::Sendmsg | Action::Packet | Action::Inspect => traffic,
        Action::FdReceive => (99, "Receive Socket"),
        Action::Ingress => {
            ev.src_endpoint = Some(endpoint(r.ip, None, host));
            ev.dst_endpoint = Some(Endpoint {
                port: r.port,
                name: Some(r.identity.as_ref().map_or("unknown", |i| &*i.name)),
                ..Endpoint::default()
            });
            ev.connection_info = Some(ConnectionInfo {
                direction_id: 1,
                direction: "Inbound",
                protocol_name: protocol,
                protocol_num: protocol.and_then(protocol_num),
            });
            return (class::NETWORK, open.0, open.1);
        }
        Action::UnixConnect | Action::UnixSend => {
            ev.dst_endpoint = Some(Endpoint {
                name: Some(r.socket.as_deref().unwrap_or("unknown")),
                ..Endpoint::default()
            });
            ev.connection_info = Some(outbound(Some("unix")));
            let (id, name) = if action == Action::UnixConnect {
                open
            } else {
                traffic
            };
            return (class::NETWORK, id, name);
        }
    };
    ev.dst_endpoint = Some(endpoint(r.ip, r.port, host));
    ev.connection_info = Some(outbound(protocol));
    (class::NETWORK, activity_id, activity_name)
}

fn dns<'a>(r: &'a Record<'a>, v: Verdict, ev: &mut Event<'a>) -> (class::Class, u32, &'static str) {
    let detail = r.detail.as_deref().unwrap_or("");
    let reason = detail_field(detail, "reason");
    ev.src_endpoint = Some(endpoint(r.ip, r.port, None));
    ev.connection_info = Some(outbound(r.protocol.as_deref()));
    if let Some(host) = r.host.as_deref() {
        let (class, qtype) = match detail_field(detail, "qtype") {
            Some(t) => match t.split_once(':') {
                Some((c, t)) => (Some(c), Some(t)),
                None => (Some("IN"), Some(t)),
            },
            None => (None, None),
        };
        ev.query = Some(DnsQuery {
            hostname: host,
            type_: qtype,
            class,
        });
    }
    // `learned=[..]`: the answer's addresses, installed; `answered=[..]`
    // (`mode: audit`): those of an answer to a would-be refused name.
    for key in ["learned", "answered"] {
        let Some(list) = detail_field(detail, key) else {
            continue;
        };
        let inner = list.trim_start_matches('[').trim_end_matches(']');
        ev.answers.extend(inner.split(',').filter_map(|a| {
            let ip: IpAddr = a.parse().ok()?;
            Some(DnsAnswer {
                rdata: a,
                type_: if ip.is_ipv4() { "A" } else { "AAAA" },
            })
        }));
    }
    // The proxy's own reply, when it made one.
    let servfail = matches!(
        reason,
        Some("learn-error" | "policy-changed" | "upstream-error")
    );
    let rcode = match v {
        _ if servfail => Some((2, "ServError")),
        Verdict::Deny => Some((5, "Refused")),
        _ => None,
    };
    if let Some((id, name)) = rcode {
        ev.rcode_id = Some(id);
        ev.rcode = Some(name);
    }
    if rcode.is_some() || !ev.answers.is_empty() {
        (class::DNS, 2, "Response")
    } else {
        (class::DNS, 1, "Query")
    }
}

fn lifecycle_class<'a>(r: &'a Record<'a>, ev: &mut Event<'a>) -> (class::Class, u32, &'static str) {
    ev.app = Some(Product {
        name: PRODUCT,
        vendor_name: PRODUCT,
        version: ev.metadata.product.version,
    });
    ev.status_id = Some(1);
    ev.status = Some("Success");
    use LifecycleAction as L;
    let (id, name) = match LifecycleAction::from_name(&r.action) {
        Some(L::Start) => (3, "Start"),
        Some(L::Stop) => (4, "Stop"),
        Some(L::PolicyLoad | L::PolicyReload | L::PolicyRemove) => (8, "Update"),
        Some(L::PolicyReloadRejected) => {
            ev.status_id = Some(2);
            ev.status = Some("Failure");
            ev.severity_id = 2;
            (8, "Update")
        }
        Some(L::Attach) => (99, "Attach"),
        Some(L::Detach) => (99, "Detach"),
        Some(L::ChainResume) => {
            ev.severity_id = 3;
            (99, "Chain Resume")
        }
        Some(L::TaintClamp) => {
            ev.severity_id = 3;
            (99, "Taint Clamp")
        }
        None => {
            ev.status_id = None;
            ev.status = None;
            (99, "Other")
        }
    };
    (class::APP, id, name)
}

// ---------------------------------------------------------------------------
// Conversion of whole lines.

/// Why a line could not be converted.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("not a JSON audit record: {0}")]
    Parse(#[from] serde_json::Error),
}

/// Write the OCSF event of record `r` into `out` (no newline).
pub fn write_event(out: &mut Vec<u8>, r: &Record<'_>, ctx: &Context) -> serde_json::Result<()> {
    serde_json::to_writer(out, &event(r, ctx))
}

/// The OCSF line (no newline) of one JSON-format audit line.
pub fn json_to_ocsf(line: &[u8], ctx: &Context) -> Result<Vec<u8>, ConvertError> {
    let r: Record<'_> = serde_json::from_slice(line)?;
    let mut out = Vec::with_capacity(line.len() * 2);
    write_event(&mut out, &r, ctx)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{FirstBytes, FlowSpan, IdentityRef, UnixAddress, Workload};
    use serde_json::json;
    use std::{collections::HashMap, path::Path, sync::OnceLock};

    const CLASSES: [(u64, &str); 5] = [
        (4001, "network_activity"),
        (4003, "dns_activity"),
        (1001, "file_activity"),
        (1003, "kernel_activity"),
        (6002, "application_lifecycle"),
    ];

    /// The JSON Schema of each class (tests/data/ocsf, see its README).
    fn validators() -> &'static HashMap<u64, jsonschema::Validator> {
        static V: OnceLock<HashMap<u64, jsonschema::Validator>> = OnceLock::new();
        V.get_or_init(|| {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data/ocsf")
                .join(OCSF_VERSION);
            CLASSES
                .iter()
                .map(|(uid, name)| {
                    let text = std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap();
                    let schema: Value = serde_json::from_str(&text).unwrap();
                    (*uid, jsonschema::draft7::new(&schema).unwrap())
                })
                .collect()
        })
    }

    /// Schema errors of `ev` for its class (the class must be one we ship).
    fn schema_errors(ev: &Value) -> Vec<String> {
        let uid = ev["class_uid"].as_u64().expect("class_uid");
        let v = validators()
            .get(&uid)
            .unwrap_or_else(|| panic!("no schema for class {uid}"));
        v.iter_errors(ev)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect()
    }

    fn assert_valid(ev: &Value) {
        let errors = schema_errors(ev);
        assert!(errors.is_empty(), "{errors:#?}\n{ev:#}");
        // Rules the schema cannot say (type_uid is a long_t without enum).
        let (class, activity) = (ev["class_uid"].as_u64(), ev["activity_id"].as_u64());
        assert_eq!(
            ev["type_uid"].as_u64(),
            Some(class.unwrap() * 100 + activity.unwrap())
        );
        assert_eq!(ev["metadata"]["version"], OCSF_VERSION);
        let profiles = ev["metadata"]["profiles"].as_array().unwrap();
        for (attr, profile) in [
            ("action_id", "security_control"),
            ("firewall_rule", "security_control"),
        ] {
            if ev.get(attr).is_some() {
                assert!(profiles.contains(&json!(profile)), "{attr} needs {profile}");
            }
        }
        if ev["actor"]["process"].get("container").is_some() {
            assert!(profiles.contains(&json!("container")));
        }
    }

    fn ctx() -> Context {
        Context {
            hostname: "node-a".into(),
            product_version: "0.1.0",
        }
    }

    const PREV: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn decision(action: Action, verdict: Verdict) -> Decision {
        Decision {
            ts: DateTime::from_timestamp(1_800_000_000, 123_000_000).unwrap(),
            identity: IdentityRef {
                name: "research-agent".into(),
                spiffe_id: Some("spiffe://example.org/ns/agents/sa/research".into()),
            },
            cgroup_id: 4242,
            pid: 311,
            comm: "curl".into(),
            action,
            ip: Some("203.0.113.9".parse().unwrap()),
            port: Some(443),
            protocol: Some("tcp".into()),
            host: Some("api.example.com".into()),
            path: None,
            workload: None,
            verdict,
            rule: "egress[2]".into(),
            policy_hash: "ab".repeat(32),
            detail: None,
            first_bytes: None,
            unix: None,
            flow: None,
        }
    }

    /// A decision of `action` shaped as the event reader / DNS proxy / seccomp
    /// notifier make it.
    fn realistic(action: Action, verdict: Verdict) -> Decision {
        let mut d = decision(action, verdict);
        match action {
            Action::Dns => {
                d.pid = 0;
                d.comm = String::new();
                d.cgroup_id = 0;
                d.ip = Some("10.0.0.7".parse().unwrap());
                d.port = Some(40_000);
                d.protocol = Some("udp".into());
                d.detail = Some(if verdict == Verdict::Deny {
                    "qtype=A reason=name-not-allowed transport=udp latency_us=40".into()
                } else {
                    "qtype=AAAA reason=allowed transport=udp latency_us=75 \
                     learned=[93.184.216.34,2606:2800:220:1::1]"
                        .into()
                });
                d.host = Some("example.com".into());
            }
            a if a.is_file() => {
                (d.ip, d.port, d.protocol, d.host) = (None, None, None, None);
                d.path = Some("/home/agent/.ssh".into());
                d.detail = Some("inode 77 on device 8:1".into());
            }
            a if a.is_unix() => {
                (d.ip, d.port, d.protocol, d.host) = (None, None, None, None);
                d.unix = Some(UnixAddress {
                    kind: "path",
                    name: "/run/docker.sock".into(),
                });
                d.detail = Some("unix socket not listed in spec.local".into());
            }
            Action::SockCreate | Action::Setsockopt => {
                (d.ip, d.port, d.host) = (None, None, None);
                d.protocol = Some("raw".into());
                d.detail = Some("family=inet type=raw protocol=255".into());
            }
            Action::Syscall => {
                (d.ip, d.port, d.protocol, d.host) = (None, None, None, None);
                d.rule = "seccomp:io_uring_setup".into();
                d.detail = Some("io_uring_setup(32, ..)".into());
            }
            Action::Inspect => {
                d.first_bytes = Some(FirstBytes {
                    kind: "tls",
                    reason: Some("name-mismatch"),
                    name: Some("evil.example".into()),
                });
            }
            Action::Ingress => {
                d.detail = Some("from peer 203.0.113.9 to local port 443 (spec.ingress)".into());
                d.host = None;
            }
            _ => {}
        }
        d
    }

    fn ocsf_of(d: &Decision) -> Value {
        let mut out = Vec::new();
        write_event(&mut out, &Record::from_decision(7, PREV, d), &ctx()).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    fn ocsf_of_lifecycle(ev: &LifecycleEvent) -> Value {
        let mut out = Vec::new();
        write_event(&mut out, &Record::from_lifecycle(3, PREV, ev), &ctx()).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    fn all_actions() -> impl Iterator<Item = Action> {
        Action::ALL.into_iter().chain([Action::Syscall])
    }

    #[test]
    fn every_action_and_verdict_maps_to_a_valid_event_of_its_class() {
        for action in all_actions() {
            for verdict in Verdict::ALL {
                let d = realistic(action, verdict);
                let ev = ocsf_of(&d);
                assert_valid(&ev);
                let (class, activity) = (
                    ev["class_uid"].as_u64().unwrap(),
                    ev["activity_id"].as_u64().unwrap(),
                );
                let denied = verdict == Verdict::Deny;
                let expected: (u64, u64) = match action {
                    Action::Connect | Action::Ingress | Action::UnixConnect => {
                        (4001, if denied { 5 } else { 1 })
                    }
                    Action::Sendmsg | Action::Packet | Action::Inspect | Action::UnixSend => {
                        (4001, 6)
                    }
                    Action::FdReceive => (4001, 99),
                    Action::Dns => (4003, 2),
                    Action::FileOpen => (1001, 14),
                    Action::FileLink => (1001, 1),
                    Action::FileRename => (1001, 5),
                    Action::SockCreate | Action::Setsockopt | Action::Syscall => (1003, 4),
                };
                assert_eq!(
                    (class, activity),
                    expected,
                    "{action:?} {verdict:?}: {ev:#}"
                );
                // Common to every decision.
                assert_eq!(ev["time"], 1_800_000_000_123i64);
                assert_eq!(ev["metadata"]["sequence"], 7);
                assert_eq!(ev["metadata"]["event_code"], action.as_str());
                assert_eq!(ev["metadata"]["product"]["name"], "enforcer");
                assert_eq!(ev["unmapped"]["prev_hash"], PREV);
                assert_eq!(ev["actor"]["app_name"], "research-agent");
                assert_eq!(
                    ev["actor"]["app_uid"],
                    "spiffe://example.org/ns/agents/sa/research"
                );
                assert_eq!(ev["device"]["hostname"], "node-a");
                assert_eq!(ev["firewall_rule"]["name"], d.rule.as_str());
                assert_eq!(ev["authorizations"][0]["decision"], verdict.as_str());
                assert_eq!(ev["authorizations"][0]["policy"]["name"], "research-agent");
                assert_eq!(ev["authorizations"][0]["policy"]["uid"], "ab".repeat(32));
                let (action_id, disposition_id, severity_id) = match verdict {
                    Verdict::Allow => (1, 1, 1),
                    Verdict::Deny => (2, 2, 3),
                    Verdict::Audit => (1, 15, 2),
                    Verdict::Taint => (1, 18, 3),
                };
                assert_eq!(
                    (&ev["action_id"], &ev["disposition_id"], &ev["severity_id"]),
                    (
                        &json!(action_id),
                        &json!(disposition_id),
                        &json!(severity_id)
                    )
                );
                assert_eq!(
                    ev["message"].as_str(),
                    d.detail.as_deref(),
                    "detail is the message"
                );
                if action == Action::Dns {
                    assert!(ev.get("actor").unwrap().get("process").is_none());
                    assert!(ev["unmapped"].get("cgroup_id").is_some());
                } else {
                    assert_eq!(ev["actor"]["process"]["pid"], 311);
                    assert_eq!(ev["actor"]["process"]["name"], "curl");
                    assert_eq!(ev["unmapped"]["cgroup_id"], 4242);
                }
            }
        }
    }

    #[test]
    fn network_dns_file_and_kernel_details() {
        let ev = ocsf_of(&realistic(Action::Connect, Verdict::Deny));
        assert_eq!(
            ev["dst_endpoint"],
            json!({"ip": "203.0.113.9", "port": 443, "hostname": "api.example.com"})
        );
        assert_eq!(
            ev["connection_info"],
            json!({"direction_id": 2, "direction": "Outbound", "protocol_name": "tcp",
                   "protocol_num": 6})
        );
        assert_eq!(ev["type_uid"], 400105);
        assert_eq!(ev["type_name"], "Network Activity: Refuse");

        let ev = ocsf_of(&realistic(Action::Ingress, Verdict::Deny));
        assert_eq!(ev["src_endpoint"], json!({"ip": "203.0.113.9"}));
        assert_eq!(
            ev["dst_endpoint"],
            json!({"port": 443, "name": "research-agent"})
        );
        assert_eq!(ev["connection_info"]["direction_id"], 1);

        let ev = ocsf_of(&realistic(Action::UnixConnect, Verdict::Deny));
        assert_eq!(ev["dst_endpoint"], json!({"name": "/run/docker.sock"}));
        assert_eq!(ev["connection_info"]["protocol_name"], "unix");
        assert_eq!(ev["unmapped"]["socket_kind"], "path");

        let ev = ocsf_of(&realistic(Action::Inspect, Verdict::Deny));
        assert_eq!(ev["unmapped"]["first_bytes"], "tls");
        assert_eq!(ev["unmapped"]["reason"], "name-mismatch");
        assert_eq!(ev["unmapped"]["presented"], "evil.example");

        let ev = ocsf_of(&realistic(Action::Dns, Verdict::Allow));
        assert_eq!(
            ev["query"],
            json!({"hostname": "example.com", "type": "AAAA", "class": "IN"})
        );
        assert_eq!(
            ev["answers"],
            json!([{"rdata": "93.184.216.34", "type": "A"},
                   {"rdata": "2606:2800:220:1::1", "type": "AAAA"}])
        );
        assert!(
            ev.get("rcode_id").is_none(),
            "the upstream's rcode is not known"
        );
        assert_eq!(ev["src_endpoint"], json!({"ip": "10.0.0.7", "port": 40000}));
        let ev = ocsf_of(&realistic(Action::Dns, Verdict::Deny));
        assert_eq!(
            (&ev["rcode_id"], &ev["rcode"]),
            (&json!(5), &json!("Refused"))
        );
        assert!(ev.get("answers").is_none());
        let mut d = realistic(Action::Dns, Verdict::Audit);
        d.detail = Some("qtype=CH:TXT reason=query-type transport=tcp latency_us=9".into());
        let ev = ocsf_of(&d);
        assert_eq!(
            (&ev["query"]["class"], &ev["query"]["type"]),
            (&json!("CH"), &json!("TXT"))
        );
        assert_eq!(ev["activity_id"], 1, "no answer, no rcode: a query");
        assert_valid(&ev);
        // mode: audit, a would-be refused name answered anyway.
        d.detail = Some(
            "qtype=A reason=name-not-allowed transport=udp latency_us=9 \
             answered=[203.0.113.7]"
                .into(),
        );
        let ev = ocsf_of(&d);
        assert_eq!(
            ev["answers"],
            json!([{"rdata": "203.0.113.7", "type": "A"}])
        );
        assert_eq!(
            (&ev["activity_id"], &ev["disposition_id"]),
            (&json!(2), &json!(15))
        );
        assert_valid(&ev);

        let ev = ocsf_of(&realistic(Action::FileOpen, Verdict::Taint));
        assert_eq!(
            ev["file"],
            json!({"name": ".ssh", "path": "/home/agent/.ssh", "type_id": 0, "type": "Unknown",
                   "uid": "77"})
        );
        assert_eq!(ev["disposition"], "Tagged");

        let ev = ocsf_of(&realistic(Action::Syscall, Verdict::Deny));
        assert_eq!(
            ev["kernel"],
            json!({"name": "io_uring_setup", "type_id": 2, "type": "System Call",
                   "system_call": "io_uring_setup"})
        );
        let ev = ocsf_of(&realistic(Action::SockCreate, Verdict::Deny));
        assert_eq!(ev["kernel"]["name"], "socket");
    }

    #[test]
    fn kubernetes_workload_flow_counts_and_no_spiffe_id() {
        let mut d = realistic(Action::Connect, Verdict::Allow);
        d.workload = Some(Workload {
            spiffe_id: String::new(),
            namespace: "agents".into(),
            pod: "research-7d9".into(),
            container: Some("agent".into()),
        });
        d.flow = Some(FlowSpan {
            count: 12,
            first_seen: DateTime::from_timestamp(1_799_999_990, 0).unwrap(),
            last_seen: DateTime::from_timestamp(1_800_000_000, 123_000_000).unwrap(),
        });
        let ev = ocsf_of(&d);
        assert_valid(&ev);
        assert_eq!(
            ev["actor"]["process"]["container"],
            json!({"name": "agent", "orchestrator": "kubernetes"})
        );
        assert_eq!(ev["unmapped"]["namespace"], "agents");
        assert_eq!(ev["unmapped"]["pod"], "research-7d9");
        assert_eq!(
            ev["metadata"]["profiles"],
            json!(["container", "host", "security_control"])
        );
        assert_eq!(
            (&ev["count"], &ev["start_time"], &ev["end_time"]),
            (
                &json!(12),
                &json!(1_799_999_990_000i64),
                &json!(1_800_000_000_123i64)
            )
        );

        // An unbound cgroup: no SPIFFE ID, no policy.
        let mut d = realistic(Action::Connect, Verdict::Deny);
        d.identity = IdentityRef {
            name: "unknown".into(),
            spiffe_id: None,
        };
        d.policy_hash = String::new();
        d.rule = "no-policy".into();
        let ev = ocsf_of(&d);
        assert_valid(&ev);
        assert!(ev["actor"].get("app_uid").is_none());
        assert_eq!(
            ev["authorizations"][0]["policy"],
            json!({"name": "unknown"})
        );
    }

    #[test]
    fn every_lifecycle_action_maps_to_application_lifecycle() {
        for action in LifecycleAction::ALL {
            for with_identity in [false, true] {
                let mut ev = LifecycleEvent::new(action, "policies/research.yaml");
                ev.ts = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
                if with_identity {
                    ev = ev
                        .with_identity(IdentityRef {
                            name: "research-agent".into(),
                            spiffe_id: Some("spiffe://example.org/a".into()),
                        })
                        .with_cgroup_id(4242)
                        .with_policy_hash("cd".repeat(32));
                }
                let o = ocsf_of_lifecycle(&ev);
                assert_valid(&o);
                assert_eq!(o["class_uid"], 6002);
                assert_eq!(o["metadata"]["event_code"], action.as_str());
                assert_eq!(o["metadata"]["sequence"], 3);
                assert_eq!(o["app"]["name"], "enforcer");
                assert_eq!(o["message"], "policies/research.yaml");
                let expected = match action {
                    LifecycleAction::Start => (3, "Start"),
                    LifecycleAction::Stop => (4, "Stop"),
                    LifecycleAction::PolicyLoad
                    | LifecycleAction::PolicyReload
                    | LifecycleAction::PolicyRemove
                    | LifecycleAction::PolicyReloadRejected => (8, "Update"),
                    LifecycleAction::Attach => (99, "Attach"),
                    LifecycleAction::Detach => (99, "Detach"),
                    LifecycleAction::ChainResume => (99, "Chain Resume"),
                    LifecycleAction::TaintClamp => (99, "Taint Clamp"),
                };
                assert_eq!(
                    (&o["activity_id"], &o["activity_name"]),
                    (&json!(expected.0), &json!(expected.1)),
                    "{action:?}"
                );
                let failed = action == LifecycleAction::PolicyReloadRejected;
                assert_eq!(o["status_id"], if failed { 2 } else { 1 });
                if with_identity {
                    assert_eq!(o["actor"]["app_name"], "research-agent");
                    assert_eq!(o["actor"]["app_uid"], "spiffe://example.org/a");
                    assert_eq!(o["unmapped"]["cgroup_id"], 4242);
                    assert_eq!(o["unmapped"]["policy_hash"], "cd".repeat(32));
                } else {
                    assert!(o.get("actor").is_none());
                }
            }
        }
    }

    #[test]
    fn json_records_convert_to_what_the_ocsf_writer_writes() {
        // The JSON line of a decision, as audit.rs writes it, converted...
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let mut log = crate::audit::AuditLog::open(&path).unwrap();
        let mut decisions = Vec::new();
        for action in all_actions() {
            decisions.push(realistic(action, Verdict::Deny));
        }
        for d in &decisions {
            log.append_decision(d).unwrap();
        }
        let life = LifecycleEvent::new(LifecycleAction::Start, "v0.1.0");
        log.append_lifecycle(&life).unwrap();
        log.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let converted: Value =
                serde_json::from_slice(&json_to_ocsf(line.as_bytes(), &ctx()).unwrap()).unwrap();
            let record: Value = serde_json::from_str(line).unwrap();
            let prev = record["prev_hash"].as_str().unwrap();
            // ... equals the writer's event of the same record.
            let mut direct = Vec::new();
            let r = match decisions.get(i) {
                Some(d) => Record::from_decision(i as u64, prev, d),
                None => Record::from_lifecycle(i as u64, prev, &life),
            };
            write_event(&mut direct, &r, &ctx()).unwrap();
            let direct: Value = serde_json::from_slice(&direct).unwrap();
            // Only `ts` precision differs: none, both in ms.
            assert_eq!(converted, direct, "line {}", i + 1);
            assert_valid(&converted);
        }

        // Fields this version does not know are kept in `unmapped`.
        let mut v: Value = serde_json::from_str(lines[0]).unwrap();
        v["sni_hint"] = json!("x");
        v["extra_count"] = json!(3);
        let o: Value =
            serde_json::from_slice(&json_to_ocsf(v.to_string().as_bytes(), &ctx()).unwrap())
                .unwrap();
        assert_eq!(o["unmapped"]["sni_hint"], "x");
        assert_eq!(o["unmapped"]["extra_count"], 3);
        assert_valid(&o);
        // An action of a later version: Other, its name kept.
        v["action"] = json!("quantum_entangle");
        let o: Value =
            serde_json::from_slice(&json_to_ocsf(v.to_string().as_bytes(), &ctx()).unwrap())
                .unwrap();
        assert_eq!(
            (&o["class_uid"], &o["activity_id"]),
            (&json!(4001), &json!(99))
        );
        assert_eq!(o["metadata"]["event_code"], "quantum_entangle");
        assert_valid(&o);
        // Not a record: a clear error, no panic.
        for bad in [&b"{}"[..], b"not json", b"{\"seq\":1,\"ts\":5}", b"[]"] {
            let e = json_to_ocsf(bad, &ctx()).unwrap_err();
            assert!(e.to_string().starts_with("not a JSON audit record"), "{e}");
        }
    }

    #[test]
    fn the_schema_rejects_missing_required_attributes_and_wrong_types() {
        let good = ocsf_of(&realistic(Action::Connect, Verdict::Deny));
        assert!(schema_errors(&good).is_empty());
        type Change = fn(&mut Value);
        let broken: [(&str, Change); 7] = [
            ("no time", |v| {
                v.as_object_mut().unwrap().remove("time");
            }),
            ("no metadata.version", |v| {
                v["metadata"].as_object_mut().unwrap().remove("version");
            }),
            ("no dst_endpoint", |v| {
                v.as_object_mut().unwrap().remove("dst_endpoint");
            }),
            ("port is a string", |v| {
                v["dst_endpoint"]["port"] = json!("443")
            }),
            ("pid is a string", |v| {
                v["actor"]["process"]["pid"] = json!("311")
            }),
            ("unknown attribute", |v| v["verdict"] = json!("deny")),
            ("activity of another class", |v| {
                v["activity_id"] = json!(14)
            }),
        ];
        for (what, change) in broken {
            let mut v = good.clone();
            change(&mut v);
            assert!(!schema_errors(&v).is_empty(), "{what}: accepted");
        }
        let mut v = ocsf_of(&realistic(Action::FileOpen, Verdict::Deny));
        v["file"].as_object_mut().unwrap().remove("type_id");
        assert!(
            !schema_errors(&v).is_empty(),
            "file without type_id accepted"
        );
        let mut v = ocsf_of(&realistic(Action::Dns, Verdict::Allow));
        v["answers"][0].as_object_mut().unwrap().remove("rdata");
        assert!(
            !schema_errors(&v).is_empty(),
            "answer without rdata accepted"
        );
    }

    #[test]
    fn detail_fields() {
        let d = "qtype=A reason=allowed transport=udp latency_us=75 learned=[1.2.3.4,::1] x=y";
        assert_eq!(detail_field(d, "qtype"), Some("A"));
        assert_eq!(detail_field(d, "reason"), Some("allowed"));
        assert_eq!(detail_field(d, "learned"), Some("[1.2.3.4,::1]"));
        assert_eq!(detail_field(d, "x"), Some("y"));
        assert_eq!(detail_field(d, "type"), None, "not a suffix of qtype");
        assert_eq!(detail_field("learned=[1.2", "learned"), Some("[1.2"));
        assert_eq!(detail_field("", "qtype"), None);
    }
}
