//! Compilation of a policy's `cidr` rules into LPM-trie entries.
//!
//! `host:` rules are no LPM entries: the DNS proxy (`crate::dns`) installs
//! the addresses the agent's own DNS answers return for them, each with the
//! [`host_rule_set`] of the rule (checked here to fit one kernel value).
//! They keep their rule ids (`spec.egress[i]` is `i + 1` for every rule).
//!
//! The kernel does **one** longest-prefix-match lookup per destination in the
//! identity's table and then scans that prefix's [`RuleSet`] for the first
//! entry admitting (port, protocol). So the entry of a prefix `P` must carry
//! the port/protocol entries of every rule whose CIDR contains `P` (`P`
//! itself and every less specific prefix covering it): a lookup that lands on
//! the most specific prefix must still see the broader rules.
//!
//! Rule ids: `spec.egress[i]` is `i + 1`; entries are ordered by rule id, so
//! the kernel reports the *first* rule of the policy (in file order) that
//! admits the connection, exactly like a brute-force evaluation of the rules
//! in order. Reductions keep that exact: ranges of one rule and protocol mask
//! are merged when they overlap or touch, and the protocols of an entry that
//! an earlier rule already admits on a covering port range are removed
//! (dropping the entry when none is left). Nothing is merged across rule
//! ids, so a reported rule id always names a rule that admits the
//! connection.
//!
//! Algorithm: the distinct prefixes of each family are sorted by (network
//! address, length). In that order every prefix comes right after the chain
//! of prefixes containing it, so one walk with a stack of nested prefixes
//! finds each prefix's nearest container, and the prefix's entries are the
//! container's (already complete) entries plus its own. O(n log n) for n
//! rules; each step handles at most `MAX_PORT_RULES` + own entries.
//!
//! IPv4-mapped IPv6 CIDRs (`::ffff:10.0.0.0/104`) become IPv4 rules
//! (`10.0.0.0/8`), because the kernel judges a mapped destination by the
//! IPv4 table. For the same reason an IPv6 rule such as `::/0` does not admit
//! IPv4 traffic sent through a mapped address.
use std::fmt::Write as _;

use enforcer_common::{first_bytes, proto, rule, rule_flags, PortRule, RuleSet, MAX_PORT_RULES};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{
    check_supported, EgressRule, FileAccess, Inspect, LoadedPolicy, Mode, PolicyError,
    PolicyErrors, Protocol,
};

/// What the daemon writes into the kernel tables for one identity.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledPolicy {
    pub name: String,
    pub spiffe_id: Option<String>,
    /// `mode: audit`.
    pub audit: bool,
    /// [`LoadedPolicy::hash`].
    pub hash: String,
    /// LPM entries, sorted by (network, prefix length).
    pub v4: Vec<(Ipv4Net, RuleSet)>,
    pub v6: Vec<(Ipv6Net, RuleSet)>,
    /// `rules[rule_id - 1]`: a short description of `spec.egress[rule_id - 1]`.
    pub rules: Vec<String>,
    /// The onTaint generation (`spec.onTaint.egress`, ids `TAINT_BASE + i + 1`):
    /// present when some file rule has `access: taint` (an absent onTaint
    /// section then means: no egress at all once tainted).
    pub taint: Option<CidrTables>,
    /// Descriptions of `spec.onTaint.egress[i]`.
    pub taint_rules: Vec<String>,
    /// `spec.ingress` (ids `INGRESS_BASE + i + 1`): peer prefix -> local
    /// ports, in their own generation (`PolicyState.ingress_table_id`).
    pub ingress: CidrTables,
    /// Descriptions of `spec.ingress[i]`.
    pub ingress_rules: Vec<String>,
    /// `NAMES` entries of `spec.egress`'s host rules (first-bytes checks).
    pub names: Vec<NameEntry>,
    /// `NAMES` entries of `spec.onTaint.egress`'s host rules (ids `TAINT_BASE + i + 1`).
    pub taint_names: Vec<NameEntry>,
    /// Host rules with `inspect: none` (descriptions), shown by `policy
    /// check`, `status` and the audit start record.
    pub uninspected: Vec<String>,
    /// `spec.files`, in order (ids `FILE_BASE + i + 1`). Paths are resolved
    /// to inodes when the policy is installed (`crate::kernel::files`).
    pub files: Vec<CompiledFileRule>,
    /// `spec.identity.kubernetes`: the pods this policy binds (daemon in
    /// Kubernetes mode, `crate::k8s::binding`).
    pub kubernetes: Option<super::KubernetesIdentity>,
    /// `spec.local`, in order (ids `LOCAL_BASE + i + 1`): `UNIX_RULES`
    /// entries of the main generation.
    pub local: Vec<super::local::CompiledLocal>,
}

/// One host pattern in the kernel's `NAMES` trie: its reversed key (see
/// `enforcer_common::first_bytes`) and the port rules of every host rule
/// whose pattern covers it (its own, and those of shorter wildcards).
#[derive(Debug, Clone, PartialEq)]
pub struct NameEntry {
    pub pattern: String,
    pub key: [u8; first_bytes::KEY_NAME],
    /// Key bytes used (the LPM prefix is `32 + 8 * len` bits with the table id).
    pub len: usize,
    pub set: RuleSet,
}

/// LPM entries of one list of egress rules.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CidrTables {
    pub v4: Vec<(Ipv4Net, RuleSet)>,
    pub v6: Vec<(Ipv6Net, RuleSet)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CompiledFileRule {
    pub rule_id: u32,
    pub path: std::path::PathBuf,
    pub access: FileAccess,
}

impl CompiledPolicy {
    /// `egress[i]` for policy rules, fixed names for the reserved ids.
    pub fn rule_name(&self, rule_id: u32) -> String {
        if let Some(n) = super::rule_name(rule_id) {
            return n.to_owned();
        }
        if rule_id > rule::TAINT_BASE && rule_id < rule::TAINT_BASE + 0x1000_0000 {
            return format!("onTaint.egress[{}]", rule_id - rule::TAINT_BASE - 1);
        }
        if rule_id > rule::INGRESS_BASE && rule_id < rule::INGRESS_BASE + 0x1000_0000 {
            return format!("ingress[{}]", rule_id - rule::INGRESS_BASE - 1);
        }
        if rule_id > rule::FILE_BASE && rule_id < rule::FILE_BASE + 0x1000_0000 {
            return format!("files[{}]", rule_id - rule::FILE_BASE - 1);
        }
        if rule_id > rule::LOCAL_BASE && rule_id < rule::LOCAL_END {
            let i = (rule_id - rule::LOCAL_BASE - 1) as usize;
            return self
                .local
                .get(i)
                .map(|l| l.description.clone())
                .unwrap_or_else(|| format!("local[{i}]"));
        }
        if rule_id as usize <= self.rules.len() {
            format!("egress[{}]", rule_id - 1)
        } else {
            format!("unknown-rule-{rule_id}")
        }
    }

    /// What `policy check`, `status` and the audit start record say of
    /// first-bytes checks: on for every host rule but the listed opt-outs.
    pub fn inspection_note(&self) -> String {
        if self.uninspected.is_empty() {
            "first bytes (TLS SNI / HTTP Host) checked for every host rule".to_string()
        } else {
            format!(
                "first bytes (TLS SNI / HTTP Host) checked for every host rule except: {}",
                self.uninspected.join("; ")
            )
        }
    }

    /// Number of LPM entries (both families).
    pub fn entry_count(&self) -> usize {
        self.v4.len() + self.v6.len()
    }
}

/// One port/protocol entry of a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    id: u32,
    mask: u8,
    lo: u16,
    hi: u16,
    /// `rule_flags::*` of the rule (a function of `id`).
    flags: u8,
}

/// A prefix with its address left-aligned in 128 bits (IPv4 in the top 32),
/// so one code path serves both families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Prefix {
    addr: u128,
    len: u8,
}

impl Prefix {
    fn mask(len: u8) -> u128 {
        if len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(len))
        }
    }
    fn contains(&self, other: &Prefix) -> bool {
        self.len <= other.len && (other.addr & Self::mask(self.len)) == self.addr
    }
}

fn proto_mask(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => proto::TCP,
        Protocol::Udp => proto::UDP,
        Protocol::Any => proto::ANY,
    }
}

/// The family-specific form of a rule's CIDR (mapped IPv6 -> IPv4).
pub(crate) fn family_net(net: IpNet) -> IpNet {
    if let IpNet::V6(n) = net {
        if n.prefix_len() >= 96 {
            if let Some(v4) = n.network().to_ipv4_mapped() {
                return IpNet::V4(Ipv4Net::new(v4, n.prefix_len() - 96).expect("len <= 32"));
            }
        }
    }
    net
}

/// Short description of a rule for logs and `enforcer status`.
pub fn describe_rule(index: usize, r: &EgressRule) -> String {
    let mut s = format!("egress[{index}]");
    if let Some(net) = r.cidr {
        let _ = write!(s, " cidr {net}");
        let fam = family_net(net);
        if fam != net {
            let _ = write!(s, " (as {fam})");
        }
    }
    if let Some(h) = &r.host {
        let _ = write!(s, " host {h}");
    }
    if r.ports.is_empty() {
        s.push_str(" ports all");
    } else {
        let ports: Vec<String> = r
            .ports
            .iter()
            .map(|p| {
                if p.lo == p.hi {
                    p.lo.to_string()
                } else {
                    format!("{}-{}", p.lo, p.hi)
                }
            })
            .collect();
        let _ = write!(s, " ports {}", ports.join(","));
    }
    s.push_str(match r.protocol {
        Protocol::Tcp => " tcp",
        Protocol::Udp => " udp",
        Protocol::Any => " any",
    });
    if r.host.is_some() && r.inspect == Inspect::None {
        s.push_str(" inspect none");
    }
    s
}

/// One list of egress rules being compiled: `spec.egress` or
/// `spec.onTaint.egress`.
struct Section<'a> {
    rules: &'a [EgressRule],
    /// Field path for errors (`spec.egress`).
    field: &'a str,
    /// Name in rule lists (`egress`).
    short: &'a str,
    /// Added to the 1-based index to make a rule id.
    id_base: u32,
}

/// LPM entries of one section's `cidr` rules, plus the check that its
/// `host:` rules fit one learned-address value.
fn compile_section(
    p: &LoadedPolicy,
    section: &Section,
    errors: &mut Vec<PolicyError>,
) -> CidrTables {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for (i, r) in section.rules.iter().enumerate() {
        let Some(net) = r.cidr else { continue };
        let id = u32::try_from(i + 1).expect("fewer than 2^32 rules");
        match family_net(net) {
            IpNet::V4(n) => v4.push((
                Prefix {
                    addr: u128::from(u32::from(n.network())) << 96,
                    len: n.prefix_len(),
                },
                id,
            )),
            IpNet::V6(n) => v6.push((
                Prefix {
                    addr: u128::from(n.network()),
                    len: n.prefix_len(),
                },
                id,
            )),
        }
    }
    // `host:` rules are not LPM entries (the DNS proxy learns their
    // addresses), but their port sets must fit one kernel entry as well.
    for (pattern, ids) in host_groups(section.rules) {
        if let Err(n) = host_rule_set(section.rules, &ids) {
            let field = format!("{}[{}].ports", section.field, ids[0] - 1);
            let rules: Vec<String> = ids
                .iter()
                .map(|id| format!("{}[{}]", section.short, id - 1))
                .collect();
            errors.push(p.error(
                &field,
                format!(
                    "host {pattern} needs {n} port/protocol entries, more than the \
                     {MAX_PORT_RULES} one learned address can hold (rules {}); merge port ranges",
                    rules.join(", ")
                ),
            ));
        }
    }
    let v4 = build(p, section, v4, errors, |pf| {
        Ipv4Net::new(((pf.addr >> 96) as u32).into(), pf.len).expect("valid v4 prefix")
    });
    let v6 = build(p, section, v6, errors, |pf| {
        Ipv6Net::new(pf.addr.into(), pf.len).expect("valid v6 prefix")
    });
    CidrTables { v4, v6 }
}

/// Compile `p` (which must pass [`check_supported`]) into kernel entries.
pub fn compile(p: &LoadedPolicy) -> Result<CompiledPolicy, PolicyErrors> {
    check_supported(p)?;
    let spec = &p.policy.spec;
    let mut errors = Vec::new();
    let main = compile_section(
        p,
        &Section {
            rules: &spec.egress,
            field: "spec.egress",
            short: "egress",
            id_base: 0,
        },
        &mut errors,
    );
    let taints = spec.files.iter().any(|f| f.access == FileAccess::Taint);
    let on_taint_rules: &[EgressRule] = spec.on_taint.as_ref().map_or(&[], |t| &t.egress);
    let taint = taints.then(|| {
        compile_section(
            p,
            &Section {
                rules: on_taint_rules,
                field: "spec.onTaint.egress",
                short: "onTaint.egress",
                id_base: rule::TAINT_BASE,
            },
            &mut errors,
        )
    });
    let ingress_as_egress: Vec<EgressRule> = spec.ingress.iter().map(|r| r.as_egress()).collect();
    let ingress = compile_section(
        p,
        &Section {
            rules: &ingress_as_egress,
            field: "spec.ingress",
            short: "ingress",
            id_base: rule::INGRESS_BASE,
        },
        &mut errors,
    );
    let mut names = Vec::new();
    let mut taint_names = Vec::new();
    // (A host rule that does not fit was reported above; its names would not either.)
    for (rules, id_base, field, out) in [
        (&spec.egress[..], 0, "spec.egress", &mut names),
        (
            on_taint_rules,
            rule::TAINT_BASE,
            "spec.onTaint.egress",
            &mut taint_names,
        ),
    ] {
        if (id_base != 0 && !taints) || !errors.is_empty() {
            continue;
        }
        match name_entries(rules, id_base) {
            Ok(e) => *out = e,
            Err((pattern, n)) => {
                let i = rules
                    .iter()
                    .position(|r| r.host.as_deref() == Some(pattern.as_str()))
                    .unwrap_or(0);
                errors.push(p.error(
                    &format!("{field}[{i}].host"),
                    format!(
                        "the names covered by {pattern} (with the wildcards above it) need {n} \
                         port/protocol entries, more than the {MAX_PORT_RULES} one name can hold; \
                         merge port ranges"
                    ),
                ));
            }
        }
    }
    if !errors.is_empty() {
        return Err(PolicyErrors(errors));
    }
    let mut uninspected_rules = uninspected(&spec.egress, "");
    if taints {
        uninspected_rules.extend(uninspected(on_taint_rules, "onTaint."));
    }
    let files = spec
        .files
        .iter()
        .enumerate()
        .map(|(i, f)| CompiledFileRule {
            rule_id: rule::FILE_BASE + u32::try_from(i + 1).expect("fewer than 2^28 rules"),
            path: f.path.clone(),
            access: f.access,
        })
        .collect();
    let identity = spec.identity.as_ref();
    Ok(CompiledPolicy {
        name: p.policy.metadata.name.clone(),
        spiffe_id: identity.and_then(|i| i.spiffe_id.clone()),
        audit: spec.mode == Mode::Audit,
        hash: p.hash.clone(),
        v4: main.v4,
        v6: main.v6,
        rules: spec
            .egress
            .iter()
            .enumerate()
            .map(|(i, r)| describe_rule(i, r))
            .collect(),
        taint,
        taint_rules: on_taint_rules
            .iter()
            .enumerate()
            .map(|(i, r)| format!("onTaint.{}", describe_rule(i, r)))
            .collect(),
        ingress,
        ingress_rules: ingress_as_egress
            .iter()
            .enumerate()
            .map(|(i, r)| describe_rule(i, r).replacen("egress", "ingress", 1))
            .collect(),
        names,
        taint_names,
        uninspected: uninspected_rules,
        files,
        kubernetes: identity.and_then(|i| i.kubernetes.clone()),
        local: spec
            .local
            .iter()
            .enumerate()
            .filter_map(|(i, r)| super::local::CompiledLocal::from_rule(i, r))
            .collect(),
    })
}

/// The `host:` rules of `egress` grouped by pattern, in file order of each
/// pattern's first rule: (pattern, rule ids ascending).
pub fn host_groups(egress: &[EgressRule]) -> Vec<(String, Vec<u32>)> {
    let mut groups: Vec<(String, Vec<u32>)> = Vec::new();
    for (i, r) in egress.iter().enumerate() {
        let Some(h) = &r.host else { continue };
        let id = u32::try_from(i + 1).expect("fewer than 2^32 rules");
        match groups.iter_mut().find(|(p, _)| p == h) {
            Some((_, ids)) => ids.push(id),
            None => groups.push((h.clone(), vec![id])),
        }
    }
    groups
}

/// The `NAMES` entries of `egress`'s host rules, rule ids offset by
/// `id_base`: one per pattern, carrying its own rules and those of every
/// wildcard pattern that covers it (the kernel's longest-prefix lookup
/// returns only the most specific entry). `Err((pattern, n))` when an
/// entry needs `n > MAX_PORT_RULES` port rules.
pub fn name_entries(
    egress: &[EgressRule],
    id_base: u32,
) -> Result<Vec<NameEntry>, (String, usize)> {
    let keyed: Vec<(String, [u8; first_bytes::KEY_NAME], usize, Vec<u32>)> = host_groups(egress)
        .into_iter()
        .filter_map(|(pattern, ids)| {
            let (key, len) = first_bytes::pattern_key(&pattern)?;
            Some((pattern, key, len, ids))
        })
        .collect();
    let mut out = Vec::with_capacity(keyed.len());
    for (pattern, key, len, ids) in &keyed {
        let mut all = ids.clone();
        for (other, okey, olen, oids) in &keyed {
            let wildcard = okey[olen - 1] == b'.';
            if other != pattern && wildcard && olen <= len && okey[..*olen] == key[..*olen] {
                all.extend(oids);
            }
        }
        all.sort_unstable();
        all.dedup();
        let mut set = host_rule_set(egress, &all).map_err(|n| (pattern.clone(), n))?;
        for r in &mut set.rules[..set.count as usize] {
            r.rule_id += id_base;
        }
        out.push(NameEntry {
            pattern: pattern.clone(),
            key: *key,
            len: *len,
            set,
        });
    }
    Ok(out)
}

/// Descriptions of the host rules of `egress` with `inspect: none`.
fn uninspected(egress: &[EgressRule], prefix: &str) -> Vec<String> {
    egress
        .iter()
        .enumerate()
        .filter(|(_, r)| r.host.is_some() && r.inspect == Inspect::None)
        .map(|(i, r)| format!("{prefix}{}", describe_rule(i, r)))
        .collect()
}

/// The kernel value for an address learned for the rules `ids` (rule ids of
/// `egress`, ascending; normally the rules of one host pattern): one
/// [`PortRule`] per merged port range and protocol mask, each with its rule
/// id, reduced exactly like the entries of a prefix. `Err(n)` when that
/// needs `n > MAX_PORT_RULES` entries.
pub fn host_rule_set(egress: &[EgressRule], ids: &[u32]) -> Result<RuleSet, usize> {
    let mut entries = Vec::new();
    for &id in ids {
        push_entries(&mut entries, &egress[id as usize - 1], id);
    }
    to_rule_set(&reduce(entries))
}

/// The port/protocol entries of rule `r` (id `id`).
fn push_entries(entries: &mut Vec<Entry>, r: &EgressRule, id: u32) {
    let mask = proto_mask(r.protocol);
    let flags = if r.host.is_some() && r.inspect == Inspect::None {
        rule_flags::RAW
    } else {
        0
    };
    if r.ports.is_empty() {
        entries.push(Entry {
            id,
            mask,
            lo: 0,
            hi: u16::MAX,
            flags,
        });
    } else {
        entries.extend(r.ports.iter().map(|pr| Entry {
            id,
            mask,
            lo: pr.lo,
            hi: pr.hi,
            flags,
        }));
    }
}

/// Reduced entries -> kernel value; `Err(len)` if they do not fit.
fn to_rule_set(entries: &[Entry]) -> Result<RuleSet, usize> {
    if entries.len() > MAX_PORT_RULES {
        return Err(entries.len());
    }
    let mut set = RuleSet {
        count: entries.len() as u32,
        ..RuleSet::default()
    };
    for (slot, e) in set.rules.iter_mut().zip(entries) {
        *slot = PortRule {
            port_lo: e.lo,
            port_hi: e.hi,
            proto_mask: e.mask,
            flags: e.flags,
            _pad: [0; 2],
            rule_id: e.id,
        };
    }
    Ok(set)
}

/// At most this many overflow errors are listed for one policy.
const MAX_OVERFLOW_ERRORS: usize = 20;

/// The sorted-walk construction for one family (see module docs).
fn build<N: std::fmt::Display>(
    p: &LoadedPolicy,
    section: &Section,
    mut rules: Vec<(Prefix, u32)>,
    errors: &mut Vec<PolicyError>,
    to_net: impl Fn(Prefix) -> N,
) -> Vec<(N, RuleSet)> {
    rules.sort_unstable();
    let egress = section.rules;
    let field_base = section.field;
    let mut out = Vec::new();
    // Chain of nested prefixes: (prefix, its complete entries, its own rule ids).
    let mut stack: Vec<(Prefix, Vec<Entry>, Vec<u32>)> = Vec::new();
    let mut overflows = 0usize;
    let mut i = 0;
    while i < rules.len() {
        let pfx = rules[i].0;
        let mut own_ids = Vec::new();
        let mut entries = Vec::new();
        while i < rules.len() && rules[i].0 == pfx {
            let id = rules[i].1;
            own_ids.push(id);
            push_entries(&mut entries, &egress[id as usize - 1], id);
            i += 1;
        }
        while stack.last().is_some_and(|(top, _, _)| !top.contains(&pfx)) {
            stack.pop();
        }
        if let Some((_, parent, _)) = stack.last() {
            entries.extend_from_slice(parent);
        }
        let entries = reduce(entries);
        let set = to_rule_set(&entries);
        if set.is_err() {
            overflows += 1;
            if overflows <= MAX_OVERFLOW_ERRORS {
                let mut involved: Vec<String> = stack
                    .iter()
                    .flat_map(|(sp, _, ids)| ids.iter().map(move |id| (*sp, *id)))
                    .chain(own_ids.iter().map(|id| (pfx, *id)))
                    .map(|(sp, id)| format!("{}[{}] ({})", section.short, id - 1, to_net(sp)))
                    .collect();
                involved.sort();
                let field = format!("{field_base}[{}].cidr", own_ids[0] - 1);
                errors.push(p.error(
                    &field,
                    format!(
                        "prefix {} needs {} port/protocol entries, more than the {} one prefix \
                         can hold; rules covering it: {}; merge their port ranges or use fewer \
                         overlapping rules",
                        to_net(pfx),
                        entries.len(),
                        MAX_PORT_RULES,
                        involved.join(", ")
                    ),
                ));
            }
        } else if let Ok(mut set) = set {
            for r in &mut set.rules[..set.count as usize] {
                r.rule_id += section.id_base;
            }
            out.push((to_net(pfx), set));
        }
        stack.push((pfx, entries, own_ids));
    }
    if overflows > MAX_OVERFLOW_ERRORS {
        let (line, column) = p.span(field_base);
        errors.push(PolicyError {
            file: p.source.clone(),
            line,
            column,
            field: field_base.into(),
            message: format!(
                "... and {} more prefixes over the {MAX_PORT_RULES}-entry limit",
                overflows - MAX_OVERFLOW_ERRORS
            ),
        });
    }
    out
}

/// Order entries by rule id and drop what first-match never reaches, keeping
/// the first matching rule id of every (port, protocol) unchanged.
fn reduce(mut entries: Vec<Entry>) -> Vec<Entry> {
    entries.sort_unstable();
    let mut out: Vec<Entry> = Vec::with_capacity(entries.len());
    for mut e in entries {
        // Protocols an earlier (lower id) entry already admits on all of e's ports.
        for k in out.iter().filter(|k| k.id < e.id) {
            if k.lo <= e.lo && e.hi <= k.hi {
                e.mask &= !k.mask;
            }
        }
        if e.mask == 0 {
            continue;
        }
        // Same rule and protocols: merge overlapping or touching ranges (sorted by lo).
        if let Some(last) = out.last_mut() {
            if last.id == e.id
                && last.mask == e.mask
                && u32::from(e.lo) <= u32::from(last.hi) + 1
                && u32::from(last.lo) <= u32::from(e.hi) + 1
            {
                last.lo = last.lo.min(e.lo);
                last.hi = last.hi.max(e.hi);
                continue;
            }
        }
        out.push(e);
    }
    out
}

#[cfg(test)]
mod tests;
