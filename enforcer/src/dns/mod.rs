//! DNS-aware egress: the per-identity DNS proxy.
//!
//! Every DNS query of an agent (UDP or TCP, any address, port 53) is steered
//! in the kernel to this proxy, at a loopback port of the agent's identity,
//! on the loopback of the agent's own network namespace: the proxy listens
//! in its own namespace and, per identity, in the other namespaces its
//! agents use (Kubernetes pods; see `proxy` and `daemon::dns_netns`).
//! The proxy decides by the identity's `host:` rules and `dns:` block:
//!
//! - names no `host:` rule matches, names longer than `maxQueryLength`, query
//!   types outside `queryTypes` (default A, AAAA) and names over the
//!   `namesPerMinute` budget of their rule are answered REFUSED and never
//!   reach the upstream;
//! - allowed queries are forwarded (a rebuilt query: header flags, the one
//!   question with its name in canonical lower case, and a bare EDNS record,
//!   nothing else of the agent's bytes, not even its letter case) to
//!   the upstreams, and before the answer is released every A/AAAA address of
//!   the queried name (CNAME chains followed) is installed through the
//!   [`Learner`] with the rule's ports/protocols, for the record's TTL clamped
//!   to `dns.ttl` (the released answer carries the clamped TTLs too);
//! - rebinding defence: an answer address in loopback, link-local (incl. the
//!   cloud metadata address), private, CGNAT, unspecified, multicast or
//!   broadcast space is not installed unless one of the identity's `cidr`
//!   rules contains it, and it is **stripped from the released answer** (the
//!   agent would only get EPERM for it; without it a client moves on to the
//!   remaining addresses, and the rest of the answer is left intact);
//! - malformed messages are dropped and counted ([`DnsSink::malformed`]).
//!
//! Taint clamp: a policy with `access: taint` files or an `onTaint:` section
//! has [`DnsPolicy::taint_hosts`]. Once the identity is tainted (asked of a
//! [`TaintView`] per query, so a query sent after the taint file was opened
//! is judged clamped) its queries are judged by the onTaint `host:` rules
//! only: other names are refused with reason `tainted`, allowed names are
//! learned under `slot | TAINT_SLOT_BIT` with the onTaint rule's ports
//! (rule ids `TAINT_BASE + i + 1`), and only onTaint `cidr` rules vouch for
//! rebinding-space addresses. The event says `tainted`.
//!
//! In `mode: audit` nothing is refused: a query that would be refused is
//! forwarded and reported with verdict `Audit` and the reason it would have
//! been refused for.
//!
//! Every decision is reported to a [`DnsSink`] as a [`DnsEvent`].
pub mod message;
mod proxy;

#[cfg(test)]
mod tests;

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use hickory_proto::rr::RecordType;
use ipnet::IpNet;

use crate::{
    events::{IdentityRef, Verdict},
    policy::{
        compile::{family_net, host_groups, host_rule_set},
        CompiledPolicy, EgressRule, FileAccess, LoadedPolicy,
    },
};

pub use message::is_rebinding_address;
pub use proxy::{DnsProxy, NetnsFailure, NetnsServed, MAX_NETNS_PER_IDENTITY};

/// Default `dns.ttl.min`.
pub const DEFAULT_TTL_MIN: Duration = Duration::from_secs(5);
/// Default `dns.ttl.max`.
pub const DEFAULT_TTL_MAX: Duration = Duration::from_secs(300);
/// Default `dns.maxQueryLength` (the longest valid DNS name).
pub const DEFAULT_MAX_QUERY_LENGTH: usize = 253;
/// Default `dns.namesPerMinute`.
pub const DEFAULT_NAMES_PER_MINUTE: u32 = 64;
/// Default `dns.queryTypes`.
pub const DEFAULT_QUERY_TYPES: [RecordType; 2] = [RecordType::A, RecordType::AAAA];
/// Where the default upstreams come from.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The `host:` rules of one pattern, as the proxy uses them.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRule {
    /// `api.example.com` or `*.example.com` (lower case, no trailing dot).
    pub pattern: String,
    /// Rule id of the first rule with this pattern (`egress[i]` -> i + 1,
    /// `onTaint.egress[i]` -> `TAINT_BASE + i + 1`).
    pub rule_id: u32,
    /// Ports/protocols of every rule with this pattern, encoded like
    /// [`crate::policy::compile`] does for a prefix (one `PortRule` per merged
    /// port range and protocol mask, each with its rule id).
    pub set: enforcer_common::RuleSet,
}

/// The DNS proxy's view of one identity's policy.
#[derive(Debug, Clone, PartialEq)]
pub struct DnsPolicy {
    pub identity: IdentityRef,
    pub policy_hash: String,
    /// One entry per distinct pattern, in file order of the pattern's first rule.
    pub hosts: Vec<HostRule>,
    /// Tried in order (the next one after a timeout).
    pub upstreams: Vec<SocketAddr>,
    pub ttl_min: Duration,
    pub ttl_max: Duration,
    /// Longest query name (text form, no trailing dot) answered.
    pub max_query_length: usize,
    /// Query types forwarded; every other type is REFUSED.
    pub query_types: Vec<RecordType>,
    /// Distinct names per host rule (pattern) and minute.
    pub names_per_minute: u32,
    /// The identity's `cidr` rules (IPv4-mapped IPv6 CIDRs as IPv4): a
    /// rebinding-space answer address inside one of them is installed.
    pub cidrs: Vec<IpNet>,
    /// `mode: audit`: nothing is refused, would-be refusals are reported
    /// with verdict `Audit`.
    pub audit: bool,
    /// The `host:` rules of `spec.onTaint.egress` (like `hosts`, rule ids
    /// `TAINT_BASE + i + 1`), used instead of `hosts` once the identity is
    /// tainted. `Some` when the policy has an `access: taint` file or an
    /// `onTaint` section (`Some(vec![])`: no name is answered after taint);
    /// `None`: the policy has no taint clamp.
    pub taint_hosts: Option<Vec<HostRule>>,
    /// The `cidr` rules of `spec.onTaint.egress` (as `cidrs`): they alone
    /// vouch for rebinding-space answers once the identity is tainted.
    pub taint_cidrs: Vec<IpNet>,
}

/// The rules one query is judged by: the policy's own, or its onTaint rules
/// when the identity is tainted.
#[derive(Debug, Clone, Copy)]
pub struct RuleView<'a> {
    pub hosts: &'a [HostRule],
    pub cidrs: &'a [IpNet],
    /// These are the onTaint rules.
    pub tainted: bool,
}

impl DnsPolicy {
    /// The rule for `qname`: an exact pattern beats every wildcard, a longer
    /// wildcard base beats a shorter one, then file order. `*.example.com`
    /// matches `a.example.com` and `a.b.example.com`, not `example.com`.
    /// Case-insensitive; a trailing dot is ignored.
    pub fn match_host(&self, qname: &str) -> Option<&HostRule> {
        match_in(&self.hosts, qname).map(|i| &self.hosts[i])
    }

    /// [`Self::match_host`] among the onTaint rules (`None` also when the
    /// policy has no taint clamp).
    pub fn match_taint_host(&self, qname: &str) -> Option<&HostRule> {
        let hosts = self.taint_hosts.as_deref()?;
        match_in(hosts, qname).map(|i| &hosts[i])
    }

    /// The rules to judge by: the onTaint ones if the policy has a taint
    /// clamp and the identity is `tainted`, else the policy's own.
    pub fn rules(&self, tainted: bool) -> RuleView<'_> {
        match (&self.taint_hosts, tainted) {
            (Some(hosts), true) => RuleView {
                hosts,
                cidrs: &self.taint_cidrs,
                tainted: true,
            },
            _ => RuleView {
                hosts: &self.hosts,
                cidrs: &self.cidrs,
                tainted: false,
            },
        }
    }
}

/// [`DnsPolicy::match_host`] over `hosts`, as an index into it.
pub(crate) fn match_in(hosts: &[HostRule], qname: &str) -> Option<usize> {
    let name = qname.strip_suffix('.').unwrap_or(qname);
    if name.is_empty() {
        return None;
    }
    let mut best: Option<(usize, usize)> = None;
    for (i, h) in hosts.iter().enumerate() {
        let pat = h.pattern.strip_suffix('.').unwrap_or(&h.pattern);
        if let Some(base) = pat.strip_prefix("*.") {
            let fits = name.len() > base.len() + 1
                && name.as_bytes()[name.len() - base.len() - 1] == b'.'
                && name.is_char_boundary(name.len() - base.len())
                && name[name.len() - base.len()..].eq_ignore_ascii_case(base);
            if fits && best.is_none_or(|(len, _)| base.len() > len) {
                best = Some((base.len(), i));
            }
        } else if pat.eq_ignore_ascii_case(name) {
            return Some(i);
        }
    }
    best.map(|(_, i)| i)
}

/// The `host:` rules of `egress`, one per pattern (see [`HostRule`]), with
/// every rule id (the rule's and each `PortRule`'s) offset by `id_base`.
fn host_rules(egress: &[EgressRule], id_base: u32) -> Vec<HostRule> {
    host_groups(egress)
        .into_iter()
        .filter_map(|(pattern, ids)| match host_rule_set(egress, &ids) {
            Ok(mut set) => {
                for r in &mut set.rules[..set.count as usize] {
                    r.rule_id += id_base;
                }
                Some(HostRule {
                    pattern,
                    rule_id: id_base + ids[0],
                    set,
                })
            }
            Err(n) => {
                // compile() refuses this; fail closed if it was skipped.
                tracing::warn!(%pattern, entries = n, "host rule does not fit, ignored");
                None
            }
        })
        .collect()
}

/// The `cidr` rules of `egress` in family form (mapped IPv6 -> IPv4).
fn cidr_rules(egress: &[EgressRule]) -> Vec<IpNet> {
    egress
        .iter()
        .filter_map(|r| r.cidr)
        .map(family_net)
        .collect()
}

/// The DNS proxy's view of `p` (which `compiled` was compiled from).
/// Missing `dns:` fields take the defaults (`DEFAULT_*`, upstreams from
/// `/etc/resolv.conf`).
pub fn compile_dns(p: &LoadedPolicy, compiled: &CompiledPolicy) -> DnsPolicy {
    let spec = &p.policy.spec;
    let dns = spec.dns.clone().unwrap_or_default();
    let hosts = host_rules(&spec.egress, 0);
    let taint_egress = spec.on_taint.as_ref().map_or(&[][..], |t| &t.egress[..]);
    let clamp = spec.on_taint.is_some() || spec.files.iter().any(|f| f.access == FileAccess::Taint);
    let taint_hosts = clamp.then(|| host_rules(taint_egress, enforcer_common::rule::TAINT_BASE));
    let upstreams = if dns.upstream.is_empty() {
        resolv_conf_nameservers(Path::new(RESOLV_CONF))
    } else {
        dns.upstream.clone()
    };
    let mut query_types: Vec<RecordType> = dns
        .query_types
        .iter()
        .filter_map(|t| t.parse().ok())
        .collect();
    if query_types.is_empty() {
        query_types = DEFAULT_QUERY_TYPES.to_vec();
    }
    let cidrs = cidr_rules(&spec.egress);
    DnsPolicy {
        identity: IdentityRef {
            name: compiled.name.clone(),
            spiffe_id: compiled.spiffe_id.clone(),
        },
        policy_hash: compiled.hash.clone(),
        hosts,
        upstreams,
        ttl_min: dns.ttl.map_or(DEFAULT_TTL_MIN, |t| t.min),
        ttl_max: dns.ttl.map_or(DEFAULT_TTL_MAX, |t| t.max),
        max_query_length: dns
            .max_query_length
            .map_or(DEFAULT_MAX_QUERY_LENGTH, usize::from),
        query_types,
        names_per_minute: dns.names_per_minute.unwrap_or(DEFAULT_NAMES_PER_MINUTE),
        cidrs,
        audit: compiled.audit,
        taint_hosts,
        taint_cidrs: cidr_rules(taint_egress),
    }
}

/// The `nameserver` addresses of a resolv.conf file, port 53, in file order
/// (IPv6 zone suffixes such as `%eth0` are dropped). Like glibc, a missing or
/// empty file means `127.0.0.1`.
pub fn resolv_conf_nameservers(path: &Path) -> Vec<SocketAddr> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out: Vec<SocketAddr> = text
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let addr = words.next()?;
            let addr = addr.split_once('%').map_or(addr, |(a, _)| a);
            addr.parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .collect();
    out.dedup();
    if out.is_empty() {
        out.push(SocketAddr::from(([127, 0, 0, 1], 53)));
    }
    out
}

/// Installs learned addresses into an identity's kernel allow table.
pub trait Learner: Send + Sync + 'static {
    /// Identity `slot`'s learning epoch: it advances each time what the
    /// identity learned is forgotten (policy reload, stop). A query takes it
    /// when it arrives, with the policy (under the policy's lock).
    fn epoch(&self, slot: u32) -> u64;

    /// Make `ip` reachable for identity `slot` with `set`'s ports/protocols
    /// for `ttl`, learned from `host`. Called before the answer is released;
    /// must be complete when it returns. Refused with [`StaleEpoch`] when
    /// `epoch` is no longer the identity's: the query was judged under a
    /// policy that has been replaced (or the identity stopped) since, and
    /// what it would learn must not outlive that (the proxy judges such an
    /// answer again by the policy in force, with its epoch).
    fn learn(
        &self,
        slot: u32,
        ip: IpAddr,
        set: &enforcer_common::RuleSet,
        ttl: Duration,
        host: &str,
        epoch: u64,
    ) -> anyhow::Result<()>;
}

/// [`Learner::learn`] for a query that arrived before the identity's
/// learned addresses were last forgotten.
#[derive(Debug, thiserror::Error)]
#[error("the identity's policy changed while the query was answered")]
pub struct StaleEpoch;

/// Whether an identity is tainted (a `taint` file was opened by one of its
/// processes): the kernel's `TAINTED[slot]`. Asked once per query of an
/// identity whose policy has a taint clamp.
pub trait TaintView: Send + Sync + 'static {
    fn is_tainted(&self, slot: u32) -> bool;
}

/// No identity is ever tainted.
pub struct NeverTainted;

impl TaintView for NeverTainted {
    fn is_tainted(&self, _: u32) -> bool {
        false
    }
}

/// One decision of the proxy.
#[derive(Clone, Debug)]
pub struct DnsEvent {
    pub slot: u32,
    pub identity: IdentityRef,
    pub policy_hash: String,
    /// The agent's socket.
    pub client: SocketAddr,
    /// The network namespace of the listener the query came in on (a
    /// workload's, see `DnsProxy::serve_netns`); `None`: the proxy's own.
    pub netns: Option<crate::netns::NetnsId>,
    /// `"udp"` or `"tcp"`.
    pub transport: &'static str,
    /// Lower case, no trailing dot; bytes outside `[a-z0-9_-]` of a label are
    /// escaped as `\DDD` (such names never match a rule).
    pub qname: String,
    /// `A`, `AAAA`, `TXT`, ... (`CH:TXT` style prefix for a class other than IN).
    pub qtype: String,
    /// `Allow` (forwarded), `Deny` (REFUSED, or SERVFAIL for `learn-error`)
    /// or `Audit` (would have been refused, forwarded in `mode: audit`).
    pub verdict: Verdict,
    /// `allowed`, `name-not-allowed`, `tainted` (the identity is tainted
    /// and no onTaint host rule matches the name), `query-type`, `too-long`,
    /// `budget`, `upstream-error` (verdict Allow, the agent got SERVFAIL),
    /// `learn-error` (the Learner failed: SERVFAIL), `policy-changed` (the
    /// policy was replaced, with other upstreams, while the query was
    /// answered: SERVFAIL, the client asks again), `malformed`.
    pub reason: &'static str,
    /// `egress[i] host <pattern>` (or `onTaint.egress[i] host <pattern>`)
    /// of the matching rule.
    pub rule: Option<String>,
    /// The identity was tainted: the query was judged by the onTaint rules
    /// and its addresses learned under `slot | TAINT_SLOT_BIT`.
    pub tainted: bool,
    /// Addresses installed before the answer was released.
    pub answers: Vec<IpAddr>,
    /// `mode: audit`, verdict `Audit`: the answer's addresses (forwarded,
    /// not learned), so that the record says what the name resolved to.
    pub answered: Vec<IpAddr>,
    /// Answer addresses in rebinding space: not installed, stripped.
    pub rebinding_blocked: Vec<IpAddr>,
    /// From receipt of the query to the reply being handed to the socket.
    pub latency: Duration,
}

/// Where decisions go (audit log, metrics).
pub trait DnsSink: Send + Sync + 'static {
    fn record(&self, ev: &DnsEvent);
    /// A message of identity `slot` that could not be parsed as one
    /// standard query was dropped.
    fn malformed(&self, slot: u32);
}

/// A sink that drops everything.
pub struct NullSink;

impl DnsSink for NullSink {
    fn record(&self, _: &DnsEvent) {}
    fn malformed(&self, _: u32) {}
}
