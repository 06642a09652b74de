//! What one identity did ([`Observed`]) -> the rules that allow exactly
//! that ([`Proposal`]), each with its evidence.
//!
//! - A connect or datagram to an address that a DNS answer of the same
//!   identity carried shortly before (same run, and after the taint read
//!   for onTaint) is explained by that name: a `host` rule with the ports
//!   and protocol used. Anything else becomes a `cidr` rule for the exact
//!   address (or the `--cidr-prefix` network around it).
//! - Names that resolve into rebinding space (loopback, private, ...) also
//!   get a `cidr` rule for the address: the DNS proxy installs such an
//!   answer only when a `cidr` rule vouches for it.
//! - Sibling names collapse into `*.parent` once at least `threshold` of
//!   them were connected to, and never above a registrable domain (Public
//!   Suffix List, the `psl` crate): `*.com` or `*.co.uk` cannot come out.
//!   Names only resolved never count (a DNS tunnel resolves many unique
//!   names and connects to none of them).
//! - TCP to ports other than 80/443/8080/8443, and UDP, get `inspect: none`
//!   (their first bytes carry no name; QUIC is refused by the inspection).
//! - Files the agent opened under a secret location are proposed as
//!   `taint`, with the `onTaint` egress the run showed after the first such
//!   read; secret locations the run's policy watched (`--from`) but the
//!   agent never opened as `deny`.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use chrono::{DateTime, Duration, Utc};
use ipnet::IpNet;

use super::{
    records::{FlowSeen, Observed},
    secrets::{self, Secret},
    Exclude, LearnOptions,
};
use crate::{
    dns::message::is_rebinding_address,
    policy::{
        validate::host_pattern, Dns, EgressRule, FileAccess, FileRule, IngressRule, Inspect,
        LocalRule, PortRange, Protocol,
    },
};

/// A DNS answer and the connect it explains may be recorded in either
/// order (the proxy records right after the reply; the agent connects at
/// once): an answer up to this long after a connect still explains it.
const ANSWER_SLACK_MS: i64 = 500;
/// Ports whose first bytes are TLS or HTTP: `inspect: name` (the default).
const WEB_PORTS: [u16; 4] = [80, 443, 8080, 8443];
/// Most processes named in one evidence comment.
const MAX_PROCS: usize = 4;

/// First seen, last seen, how many, by which processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    pub first: DateTime<Utc>,
    pub last: DateTime<Utc>,
    pub count: u64,
    pub procs: BTreeSet<String>,
}

impl Evidence {
    pub fn new(first: DateTime<Utc>, last: DateTime<Utc>, count: u64, comm: &str) -> Self {
        let mut procs = BTreeSet::new();
        if !comm.is_empty() {
            procs.insert(comm.to_string());
        }
        Self {
            first,
            last,
            count,
            procs,
        }
    }

    pub fn merge(&mut self, o: &Evidence) {
        self.first = self.first.min(o.first);
        self.last = self.last.max(o.last);
        self.count += o.count;
        self.procs.extend(o.procs.iter().cloned());
    }

    /// `connects: 3, first 2026-12-05T10:00:01Z, last ..., by curl, python3`.
    pub fn text(&self, what: &str) -> String {
        let ts = |t: &DateTime<Utc>| t.format("%Y-%m-%dT%H:%M:%SZ").to_string();
        let mut s = format!("{what}: {}, first {}", self.count, ts(&self.first));
        if self.last != self.first {
            s.push_str(&format!(", last {}", ts(&self.last)));
        }
        if !self.procs.is_empty() {
            let mut p: Vec<&str> = self.procs.iter().map(String::as_str).collect();
            let more = p.len().saturating_sub(MAX_PROCS);
            p.truncate(MAX_PROCS);
            s.push_str(&format!(", by {}", p.join(", ")));
            if more > 0 {
                s.push_str(&format!(" and {more} more"));
            }
        }
        s
    }
}

/// A rule with the comment lines that explain it.
#[derive(Debug, Clone, PartialEq)]
pub struct Item<T> {
    pub rule: T,
    pub why: Vec<String>,
}

/// The learned policy's sections.
#[derive(Debug, Default)]
pub struct Proposal {
    pub egress: Vec<Item<EgressRule>>,
    /// `Some` when a file rule is `taint`.
    pub on_taint: Option<Vec<Item<EgressRule>>>,
    pub ingress: Vec<Item<IngressRule>>,
    pub files: Vec<Item<FileRule>>,
    pub local: Vec<Item<LocalRule>>,
    pub dns: Dns,
    /// Comment lines of the `dns` section, by field.
    pub dns_why: BTreeMap<&'static str, String>,
    /// Names resolved but never connected to: not allowed (commented out).
    pub resolved_only: Vec<(String, Evidence)>,
    pub resolved_only_taint: Vec<(String, Evidence)>,
    /// For the user, on stderr and at the top of the file.
    pub warnings: Vec<String>,
    /// What was excluded, per `--exclude`.
    pub excluded: Vec<(String, u64)>,
}

/// The taint read that clamps a run, if any.
#[derive(Debug, Clone)]
struct Taint {
    at: DateTime<Utc>,
    what: String,
}

/// Which run (of several in one log) a moment belongs to: runs are split at
/// `start` records.
fn run_of(starts: &[DateTime<Utc>], t: DateTime<Utc>) -> usize {
    starts.partition_point(|s| *s <= t)
}

pub fn propose(o: &Observed, opts: &LearnOptions) -> Proposal {
    let mut p = Proposal::default();
    let secrets_list: Vec<Secret> = secrets::builtin()
        .into_iter()
        .chain(opts.secrets.iter().cloned())
        .collect();

    // --exclude: drop what it names before anything is learned from it.
    let mut excluded: Vec<u64> = vec![0; opts.excludes.len()];
    let mut hit = |name: Option<&str>, ip: Option<IpAddr>, comm: &str| -> bool {
        for (i, e) in opts.excludes.iter().enumerate() {
            if e.matches(name, ip, comm) {
                excluded[i] += 1;
                return true;
            }
        }
        false
    };
    let dns: Vec<_> = o
        .dns
        .iter()
        .filter(|d| !hit(Some(&d.name), None, ""))
        .cloned()
        .collect();
    // A flow is excluded with the name that explains it (from every
    // answer, excluded ones included).
    let all_answers = AnswerIndex::new(&o.dns, &o.starts);
    let mut flows: Vec<FlowSeen> = Vec::new();
    for f in &o.flows {
        if f.port == enforcer_common::DNS_PORT {
            // Steered to the DNS proxy: covered by the host rules.
            continue;
        }
        let name = f
            .host
            .clone()
            .or_else(|| all_answers.explain(f.ip, run_of(&o.starts, f.first), None, f.first));
        if !hit(name.as_deref(), Some(f.ip), &f.comm) {
            flows.push(f.clone());
        }
    }
    let files: Vec<_> = o
        .files
        .iter()
        .filter(|f| !hit(None, None, &f.comm))
        .cloned()
        .collect();

    // Taint reads: the first read of a secret location per run (or the
    // kernel's own `taint_clamp` record).
    let mut taints: BTreeMap<usize, Taint> = BTreeMap::new();
    let mut note_taint = |run: usize, at: DateTime<Utc>, what: String| {
        let e = taints.entry(run).or_insert(Taint {
            at,
            what: what.clone(),
        });
        if at < e.at {
            *e = Taint { at, what };
        }
    };
    for f in &files {
        if let Some(s) = secrets::classify(&secrets_list, Path::new(&f.path)) {
            note_taint(
                run_of(&o.starts, f.ts),
                f.ts,
                format!("{} ({}) by {}", f.path, s.what, f.comm),
            );
        }
    }
    for &t in &o.taint_clamps {
        note_taint(run_of(&o.starts, t), t, "a `taint` file".into());
    }
    let taint_of = |t: DateTime<Utc>| -> Option<&Taint> {
        taints.get(&run_of(&o.starts, t)).filter(|tn| tn.at <= t)
    };

    // Which name explains each flow, before and after the taint read.
    let index = AnswerIndex::new(&dns, &o.starts);
    let mut before = Builder::new(opts);
    let mut after = Builder::new(opts);
    for f in &flows {
        let run = run_of(&o.starts, f.first);
        let taint = taints.get(&run);
        let pre = taint.is_none_or(|t| f.first < t.at);
        let post = taint.is_some_and(|t| f.last >= t.at);
        if pre {
            let name = f
                .host
                .clone()
                .or_else(|| index.explain(f.ip, run, None, f.first));
            before.flow(f, name, None, &o.inspect);
        }
        if let (true, Some(t)) = (post, taint) {
            let at = f.first.max(t.at);
            let name = index.explain(f.ip, run, Some(t.at), at);
            let cached = if name.is_none() {
                index.explain(f.ip, run, None, at)
            } else {
                None
            };
            after.flow(f, name, cached, &o.inspect);
        }
    }
    // Names resolved in each phase (for DNS settings and resolved-only).
    for d in &dns {
        match taint_of(d.ts) {
            None => before.resolved(&d.name, d.ts, &d.qtype),
            Some(_) => after.resolved(&d.name, d.ts, &d.qtype),
        }
    }

    let mut phase = before.finish(opts.wildcard_threshold);
    p.egress = phase.rules;
    p.resolved_only = phase.resolved_only;
    p.warnings.append(&mut phase.warnings);

    // Files.
    let mut by_path: BTreeMap<String, Evidence> = BTreeMap::new();
    for f in &files {
        let ev = Evidence::new(f.ts, f.ts, 1, &f.comm);
        by_path
            .entry(f.path.clone())
            .and_modify(|e| e.merge(&ev))
            .or_insert(ev);
    }
    let mut any_taint = false;
    for (path, ev) in &by_path {
        let rule_path = PathBuf::from(path);
        match secrets::classify(&secrets_list, &rule_path) {
            Some(s) => {
                any_taint = true;
                p.files.push(Item {
                    rule: FileRule {
                        path: rule_path,
                        access: FileAccess::Taint,
                    },
                    why: vec![
                        format!("{}: {}", s.what, ev.text("reads")),
                        "taint: the agent's reads keep working; after the first one its egress \
                         narrows to onTaint (deny would break it)"
                            .into(),
                    ],
                });
            }
            None => p.files.push(Item {
                rule: FileRule {
                    path: rule_path,
                    access: FileAccess::Audit,
                },
                why: vec![format!(
                    "{} (not a known secret location: audited)",
                    ev.text("opens")
                )],
            }),
        }
    }
    if let Some(base) = &opts.base {
        for f in &base.spec.files {
            let path = f.path.display().to_string();
            if by_path.contains_key(&path) {
                continue;
            }
            match secrets::classify(&secrets_list, &f.path) {
                Some(s) => p.files.push(Item {
                    rule: FileRule {
                        path: f.path.clone(),
                        access: FileAccess::Deny,
                    },
                    why: vec![format!(
                        "{}: watched by the run's policy, never opened: deny",
                        s.what
                    )],
                }),
                None => p.files.push(Item {
                    rule: f.clone(),
                    why: vec!["from the run's policy (not opened in the run)".into()],
                }),
            }
        }
    }
    p.files.sort_by(|a, b| a.rule.path.cmp(&b.rule.path));

    if any_taint || !taints.is_empty() {
        let mut phase = after.finish(opts.wildcard_threshold);
        p.warnings.append(&mut phase.warnings);
        p.resolved_only_taint = phase.resolved_only;
        p.on_taint = Some(phase.rules);
        once_after_taint(&mut p, &flows, &index, &o.starts, &taints);
    }

    // Unix sockets and inbound peers.
    let mut unix: BTreeMap<(String, String), Evidence> = BTreeMap::new();
    for u in &o.unix {
        if hit(None, None, &u.comm) {
            continue;
        }
        let ev = Evidence::new(u.ts, u.ts, 1, &u.comm);
        unix.entry((u.kind.clone(), u.socket.clone()))
            .and_modify(|e| e.merge(&ev))
            .or_insert(ev);
    }
    for ((kind, socket), ev) in unix {
        let rule = if kind == "abstract" {
            LocalRule {
                path: None,
                abstract_name: Some(socket),
            }
        } else {
            LocalRule {
                path: Some(PathBuf::from(socket)),
                abstract_name: None,
            }
        };
        p.local.push(Item {
            rule,
            why: vec![ev.text("connects/sends")],
        });
    }
    let mut ingress: BTreeMap<(IpNet, String), (BTreeSet<u16>, Evidence)> = BTreeMap::new();
    for i in &o.ingress {
        if hit(None, Some(i.peer), &i.comm) {
            continue;
        }
        let net = widen(i.peer, opts);
        let ev = Evidence::new(i.ts, i.ts, i.count, &i.comm);
        let e = ingress
            .entry((net, i.protocol.clone()))
            .or_insert_with(|| (BTreeSet::new(), ev.clone()));
        if e.0.insert(i.port) || e.1 != ev {
            e.1.merge(&ev);
        }
    }
    for ((net, proto), (ports, ev)) in ingress {
        p.ingress.push(Item {
            rule: IngressRule {
                cidr: net,
                ports: port_ranges(&ports),
                protocol: protocol(&proto),
            },
            why: vec![format!("from {net}: {}", ev.text("connections"))],
        });
    }

    // DNS settings, from the queries of the names the policy allows.
    dns_settings(&mut p, &dns, opts);

    p.excluded = opts
        .excludes
        .iter()
        .zip(excluded)
        .map(|(e, n)| (e.to_string(), n))
        .collect();
    p
}

/// Destinations contacted exactly once, and only after a taint read: the
/// shape of an exfiltration. Listed as warnings and next to their rules.
fn once_after_taint(
    p: &mut Proposal,
    flows: &[FlowSeen],
    index: &AnswerIndex,
    starts: &[DateTime<Utc>],
    taints: &BTreeMap<usize, Taint>,
) {
    let mut per: BTreeMap<String, (u64, bool, Option<&Taint>)> = BTreeMap::new();
    for f in flows {
        let run = run_of(starts, f.first);
        let taint = taints.get(&run).filter(|t| f.first >= t.at);
        let name = f
            .host
            .clone()
            .or_else(|| index.explain(f.ip, run, None, f.first));
        let key = match name {
            Some(n) => format!("{n} port {}", f.port),
            None => format!("{}", std::net::SocketAddr::new(f.ip, f.port)),
        };
        let e = per.entry(key).or_insert((0, true, None));
        e.0 += f.count;
        e.1 &= taint.is_some();
        if e.2.is_none() {
            e.2 = taint;
        }
    }
    for (dest, (count, all_after, taint)) in per {
        if count == 1 && all_after {
            let t = taint.map(|t| t.what.clone()).unwrap_or_default();
            p.warnings.push(format!(
                "{dest} was contacted once, only after reading {t}: an exfiltration? \
                 It is in the onTaint rules below; drop it with --exclude if it is not \
                 the agent's own"
            ));
            let host = dest.split(" port ").next().unwrap_or("");
            if let Some(rules) = p.on_taint.as_mut() {
                mark(rules, host);
            }
        }
    }
}

fn mark(rules: &mut [Item<EgressRule>], dest: &str) {
    for r in rules.iter_mut() {
        let matches = match (&r.rule.host, &r.rule.cidr) {
            (Some(h), _) => h == dest,
            (None, Some(net)) => dest
                .parse::<std::net::SocketAddr>()
                .is_ok_and(|a| net.contains(&a.ip())),
            _ => false,
        };
        let warn = "WARNING: contacted once, only after a taint read: an exfiltration?";
        if matches && !r.why.iter().any(|w| w == warn) {
            r.why.insert(0, warn.into());
        }
    }
}

/// The addresses each DNS answer carried: ip -> (when, name, run).
struct AnswerIndex {
    by_ip: BTreeMap<IpAddr, Vec<(DateTime<Utc>, String, usize)>>,
}

impl AnswerIndex {
    fn new(dns: &[super::records::DnsSeen], starts: &[DateTime<Utc>]) -> Self {
        let mut by_ip: BTreeMap<IpAddr, Vec<_>> = BTreeMap::new();
        for d in dns {
            for ip in &d.answers {
                by_ip.entry(canonical(*ip)).or_default().push((
                    d.ts,
                    d.name.clone(),
                    run_of(starts, d.ts),
                ));
            }
        }
        Self { by_ip }
    }

    /// The name whose answer (in run `run`, not before `since`) most
    /// recently carried `ip` before `at` (with [`ANSWER_SLACK_MS`]).
    fn explain(
        &self,
        ip: IpAddr,
        run: usize,
        since: Option<DateTime<Utc>>,
        at: DateTime<Utc>,
    ) -> Option<String> {
        let until = at + Duration::milliseconds(ANSWER_SLACK_MS);
        self.by_ip
            .get(&canonical(ip))?
            .iter()
            .filter(|(t, _, r)| *r == run && *t <= until && since.is_none_or(|s| *t >= s))
            .max_by_key(|(t, _, _)| *t)
            .map(|(_, n, _)| n.clone())
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// One destination's accumulated use.
#[derive(Debug, Clone)]
struct Use {
    ports: BTreeSet<u16>,
    ev: Evidence,
    /// Names collapsed into a wildcard, or the names a vouching cidr rule
    /// is for.
    names: BTreeSet<String>,
    notes: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Dest {
    Host(String),
    Cidr(IpNet),
}

/// (destination, `tcp`/`udp`, inspect none)
type Key = (Dest, String, bool);

/// The rules of one phase, the names it resolved that no rule covers, and
/// warnings.
struct Phase {
    rules: Vec<Item<EgressRule>>,
    resolved_only: Vec<(String, Evidence)>,
    warnings: Vec<String>,
}

/// Rules of one phase (before the taint read, or onTaint).
struct Builder<'a> {
    opts: &'a LearnOptions,
    uses: BTreeMap<Key, Use>,
    /// Name -> resolutions (count, first, last), qtypes.
    resolved: BTreeMap<String, (Evidence, BTreeSet<String>)>,
    connected: BTreeSet<String>,
    warnings: Vec<String>,
}

impl<'a> Builder<'a> {
    fn new(opts: &'a LearnOptions) -> Self {
        Self {
            opts,
            uses: BTreeMap::new(),
            resolved: BTreeMap::new(),
            connected: BTreeSet::new(),
            warnings: Vec::new(),
        }
    }

    fn add(
        &mut self,
        key: Key,
        port: u16,
        ev: &Evidence,
        name: Option<&str>,
        note: Option<String>,
    ) {
        let u = self.uses.entry(key).or_insert_with(|| Use {
            ports: BTreeSet::new(),
            ev: ev.clone(),
            names: BTreeSet::new(),
            notes: BTreeSet::new(),
        });
        if !u.ports.is_empty() || u.ev != *ev {
            u.ev.merge(ev);
        }
        u.ports.insert(port);
        if let Some(n) = name {
            u.names.insert(n.to_string());
        }
        if let Some(n) = note {
            u.notes.insert(n);
        }
    }

    /// A flow, explained by `name` (or not); `cached`: a name whose answer
    /// came before the taint read (onTaint only).
    fn flow(
        &mut self,
        f: &FlowSeen,
        name: Option<String>,
        cached: Option<String>,
        inspect: &[super::records::InspectSeen],
    ) {
        let ev = Evidence::new(f.first, f.last, f.count, &f.comm);
        let udp = f.protocol == "udp";
        let name = name.filter(|n| match host_pattern(n) {
            Ok(_) => true,
            Err(_) => {
                self.warnings.push(format!(
                    "{n:?} is not a name a host rule can hold: its address {} is learned as a cidr rule",
                    f.ip
                ));
                false
            }
        });
        match name {
            Some(n) => {
                let refused = inspect
                    .iter()
                    .any(|i| canonical(i.ip) == canonical(f.ip) && i.port == f.port);
                let none = udp || !WEB_PORTS.contains(&f.port) || refused;
                self.connected.insert(n.clone());
                self.add(
                    (Dest::Host(n.clone()), f.protocol.clone(), none),
                    f.port,
                    &ev,
                    Some(&n),
                    None,
                );
                if is_rebinding_address(f.ip) {
                    let net = IpNet::from(canonical(f.ip));
                    self.add(
                        (Dest::Cidr(net), f.protocol.clone(), false),
                        f.port,
                        &ev,
                        Some(&n),
                        Some(format!(
                            "vouches for {n}: its answer is in {} space, which the DNS proxy \
                             installs only under a cidr rule (this rule also admits the \
                             address itself)",
                            range_kind(f.ip)
                        )),
                    );
                }
            }
            None => {
                let net = widen(f.ip, self.opts);
                let mut note = range_note(f.ip);
                if let Some(c) = &cached {
                    note = Some(format!(
                        "{c} resolved to it before the taint read: onTaint host rules learn \
                         only answers that come after it, and the agent did not ask again"
                    ));
                }
                self.add(
                    (Dest::Cidr(net), f.protocol.clone(), false),
                    f.port,
                    &ev,
                    cached.as_deref(),
                    note,
                );
                if net.addr().is_loopback() || is_link_local(f.ip) {
                    self.warnings.push(format!(
                        "{}: {} — review this rule",
                        std::net::SocketAddr::new(f.ip, f.port),
                        range_kind(f.ip)
                    ));
                }
            }
        }
    }

    fn resolved(&mut self, name: &str, ts: DateTime<Utc>, qtype: &str) {
        let ev = Evidence::new(ts, ts, 1, "");
        let e = self
            .resolved
            .entry(name.to_string())
            .or_insert_with(|| (Evidence::new(ts, ts, 0, ""), BTreeSet::new()));
        e.0.merge(&ev);
        e.1.insert(qtype.to_string());
    }

    /// Collapse siblings, then write the rules. Returns the rules, the
    /// names resolved but not covered by any rule, and warnings.
    fn finish(mut self, threshold: usize) -> Phase {
        self.collapse(threshold);
        let mut out = Vec::new();
        for ((dest, proto, none), u) in &self.uses {
            let mut why = Vec::new();
            let rule = match dest {
                Dest::Host(h) => {
                    if h.starts_with("*.") {
                        let list: Vec<&str> = u.names.iter().map(String::as_str).take(6).collect();
                        why.push(format!(
                            "{} sibling names connected to ({}{}): collapsed",
                            u.names.len(),
                            list.join(", "),
                            if u.names.len() > list.len() {
                                ", ..."
                            } else {
                                ""
                            }
                        ));
                    }
                    why.push(format!("{h}: {}", u.ev.text(verb(proto))));
                    if *none {
                        why.push(if proto == "udp" {
                            "inspect: none: UDP to a name (QUIC) cannot be inspected".into()
                        } else {
                            format!(
                                "inspect: none: port {} is not TLS/HTTP, its first bytes name no host",
                                ports_text(&u.ports)
                            )
                        });
                    }
                    EgressRule {
                        cidr: None,
                        host: Some(h.clone()),
                        ports: port_ranges(&u.ports),
                        protocol: protocol(proto),
                        inspect: if *none { Inspect::None } else { Inspect::Name },
                    }
                }
                Dest::Cidr(net) => {
                    why.push(format!("{net}: {}", u.ev.text(verb(proto))));
                    if u.names.is_empty() {
                        why.push("no DNS answer of the agent named this address".into());
                    }
                    EgressRule {
                        cidr: Some(*net),
                        host: None,
                        ports: port_ranges(&u.ports),
                        protocol: protocol(proto),
                        inspect: Inspect::Name,
                    }
                }
            };
            why.extend(u.notes.iter().cloned());
            out.push(Item { rule, why });
        }
        // Host rules first (by name), then cidr rules.
        out.sort_by_key(|i| (i.rule.host.is_none(), i.rule.host.clone(), i.rule.cidr));
        let covered = |n: &str| {
            self.uses.keys().any(|(d, _, _)| match d {
                Dest::Host(h) => match h.strip_prefix("*.") {
                    Some(base) => n.ends_with(&format!(".{base}")),
                    None => h == n,
                },
                Dest::Cidr(_) => false,
            })
        };
        let mut resolved_only = Vec::new();
        let mut per_domain: BTreeMap<String, usize> = BTreeMap::new();
        for (name, (ev, _)) in &self.resolved {
            if !covered(name) {
                resolved_only.push((name.clone(), ev.clone()));
                let d = psl::domain_str(name).unwrap_or(name).to_string();
                *per_domain.entry(d).or_default() += 1;
            }
        }
        for (d, n) in per_domain {
            if threshold > 0 && n >= threshold.max(8) {
                self.warnings.push(format!(
                    "{n} distinct names under {d} were resolved and never connected to: \
                     a DNS tunnel? None of them is allowed"
                ));
            }
        }
        Phase {
            rules: out,
            resolved_only,
            warnings: self.warnings,
        }
    }

    /// `threshold` or more connected names with the same parent, at or
    /// below a registrable domain, become `*.parent`.
    fn collapse(&mut self, threshold: usize) {
        if threshold == 0 {
            return;
        }
        loop {
            let mut siblings: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (d, _, _) in self.uses.keys() {
                let Dest::Host(h) = d else { continue };
                if let Some(parent) = wildcard_parent(h) {
                    siblings.entry(parent).or_default().insert(h.clone());
                }
            }
            let Some((parent, _)) = siblings
                .into_iter()
                .filter(|(_, s)| s.len() >= threshold)
                .max_by_key(|(p, s)| (s.len(), p.len()))
            else {
                return;
            };
            let wild = format!("*.{parent}");
            let keys: Vec<Key> = self
                .uses
                .keys()
                .filter(|(d, _, _)| match d {
                    Dest::Host(h) => h.ends_with(&format!(".{parent}")),
                    Dest::Cidr(_) => false,
                })
                .cloned()
                .collect();
            for k in keys {
                let Some(u) = self.uses.remove(&k) else {
                    continue;
                };
                let (_, proto, none) = k;
                let key = (Dest::Host(wild.clone()), proto, none);
                match self.uses.get_mut(&key) {
                    Some(w) => {
                        w.ports.extend(u.ports.iter().copied());
                        w.ev.merge(&u.ev);
                        w.names.extend(u.names.iter().cloned());
                        w.notes.extend(u.notes.iter().cloned());
                    }
                    None => {
                        self.uses.insert(key, u);
                    }
                }
            }
        }
    }
}

/// The parent a name's siblings would share as `*.parent`, if that parent
/// is a registrable domain or below one (never a public suffix).
pub fn wildcard_parent(name: &str) -> Option<String> {
    let base = name.strip_prefix("*.").unwrap_or(name);
    let (_, parent) = base.split_once('.')?;
    let registrable = psl::domain_str(parent)?;
    (parent.len() >= registrable.len()).then(|| parent.to_string())
}

fn verb(proto: &str) -> &'static str {
    if proto == "udp" {
        "datagram flows"
    } else {
        "connects"
    }
}

fn protocol(p: &str) -> Protocol {
    match p {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => Protocol::Any,
    }
}

/// Sorted ports, runs of consecutive ones as ranges.
pub fn port_ranges(ports: &BTreeSet<u16>) -> Vec<PortRange> {
    let mut out: Vec<PortRange> = Vec::new();
    for &p in ports {
        match out.last_mut() {
            Some(r) if r.hi.checked_add(1) == Some(p) => r.hi = p,
            _ => out.push(PortRange { lo: p, hi: p }),
        }
    }
    out
}

fn ports_text(ports: &BTreeSet<u16>) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn widen(ip: IpAddr, opts: &LearnOptions) -> IpNet {
    let ip = canonical(ip);
    let prefix = match ip {
        IpAddr::V4(_) => opts.cidr_prefix_v4,
        IpAddr::V6(_) => opts.cidr_prefix_v6,
    };
    IpNet::new(ip, prefix)
        .map(|n| n.trunc())
        .unwrap_or_else(|_| IpNet::from(ip))
}

fn is_link_local(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80,
    }
}

fn range_kind(ip: IpAddr) -> &'static str {
    let ip = canonical(ip);
    if ip.is_loopback() {
        "loopback"
    } else if ip == IpAddr::from([169, 254, 169, 254]) {
        "link-local: the cloud metadata service (instance credentials)"
    } else if is_link_local(ip) {
        "link-local"
    } else if is_rebinding_address(ip) {
        "private/internal"
    } else {
        "public"
    }
}

fn range_note(ip: IpAddr) -> Option<String> {
    let ip = canonical(ip);
    (ip.is_loopback() || is_link_local(ip)).then(|| {
        format!(
            "{}: a service on this machine or link, reached without DNS",
            range_kind(ip)
        )
    })
}

/// `dns:` from the queries of the names the proposal allows: query types
/// seen (A and AAAA always), the longest name with 50 % headroom, distinct
/// names per rule per minute doubled.
fn dns_settings(p: &mut Proposal, dns: &[super::records::DnsSeen], opts: &LearnOptions) {
    let patterns: Vec<String> = p
        .egress
        .iter()
        .chain(p.on_taint.iter().flatten())
        .filter_map(|i| i.rule.host.clone())
        .collect();
    let rule_of = |n: &str| {
        patterns.iter().position(|h| match h.strip_prefix("*.") {
            Some(base) => n.ends_with(&format!(".{base}")),
            None => h == n,
        })
    };
    let mut qtypes: BTreeMap<String, u64> = BTreeMap::new();
    let mut longest: Option<&str> = None;
    let mut per_rule: BTreeMap<usize, Vec<(DateTime<Utc>, &str)>> = BTreeMap::new();
    for d in dns {
        let Some(r) = rule_of(&d.name) else { continue };
        *qtypes.entry(d.qtype.clone()).or_default() += 1;
        if longest.is_none_or(|l| d.name.len() > l.len()) {
            longest = Some(&d.name);
        }
        per_rule.entry(r).or_default().push((d.ts, &d.name));
    }
    if let Some(base) = opts.base.as_ref().and_then(|b| b.spec.dns.as_ref()) {
        p.dns.upstream.clone_from(&base.upstream);
        p.dns.ttl = base.ttl;
        if !base.upstream.is_empty() {
            p.dns_why
                .insert("upstream", "from the run's policy (--from)".into());
        }
    }
    let Some(longest) = longest else {
        return;
    };
    let mut types: BTreeSet<String> = ["A".to_string(), "AAAA".to_string()].into();
    types.extend(qtypes.keys().filter(|t| !t.contains(':')).cloned());
    p.dns.query_types = types.into_iter().collect();
    p.dns_why.insert(
        "queryTypes",
        format!(
            "seen: {} (A and AAAA are always kept)",
            qtypes
                .iter()
                .map(|(t, n)| format!("{t} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    let len = longest.len();
    let max = (len + len / 2).clamp(64, 253).max(len) as u16;
    p.dns.max_query_length = Some(max);
    p.dns_why.insert(
        "maxQueryLength",
        format!("longest name asked: {len} ({longest}), +50%, at least 64"),
    );
    let mut most = 0usize;
    for qs in per_rule.values() {
        // Distinct names in any 60 s window starting at a query.
        for (i, (t0, _)) in qs.iter().enumerate() {
            let names: BTreeSet<&str> = qs[i..]
                .iter()
                .take_while(|(t, _)| *t < *t0 + Duration::seconds(60))
                .map(|(_, n)| *n)
                .collect();
            most = most.max(names.len());
        }
    }
    let per_minute = (most * 2).max(16) as u32;
    p.dns.names_per_minute = Some(per_minute);
    p.dns_why.insert(
        "namesPerMinute",
        format!("most distinct names under one rule in a minute: {most}, doubled, at least 16"),
    );
}

impl Exclude {
    fn matches(&self, name: Option<&str>, ip: Option<IpAddr>, comm: &str) -> bool {
        match self {
            Exclude::Host(pattern) => name.is_some_and(|n| match pattern.strip_prefix("*.") {
                Some(base) => n.ends_with(&format!(".{base}")),
                None => n == pattern,
            }),
            Exclude::Ip(net) => ip.is_some_and(|ip| net.contains(&canonical(ip))),
            Exclude::Process(p) => comm == p,
        }
    }
}
