//! What one identity did ([`Observed`]) -> the rules that allow exactly
//! that ([`Proposal`]), each with its evidence.
//!
//! - A connect or datagram to an address that a DNS answer of the same
//!   identity carried (same run; not expired under the TTL clamp; after
//!   the taint read for onTaint) is explained by that name: a `host` rule
//!   with the ports and protocol used. Every name whose answer carried the
//!   address explains it (a CDN address serves many names); names of
//!   different registrable domains sharing an address are called out.
//!   Anything else becomes a `cidr` rule for the exact address (or the
//!   `--cidr-prefix` network around it).
//! - Names that resolve into rebinding space (loopback, private, ...) also
//!   get a `cidr` rule for the address: the DNS proxy installs such an
//!   answer only when a `cidr` rule vouches for it.
//! - Sibling names collapse into `*.parent` once at least `threshold` of
//!   them were connected to, never above a registrable domain (Public
//!   Suffix List, the `psl` crate) nor under a multi-tenant domain
//!   ([`MULTI_TENANT`]). Names only resolved never count (a DNS tunnel
//!   resolves many unique names and connects to none of them).
//! - Host rules keep the TLS SNI / HTTP Host check (`inspect: name`) unless
//!   the port is a well-known protocol without a name in its first bytes
//!   ([`NAMELESS_PORTS`]), the datagrams are UDP to a port other than 443,
//!   or a run under host rules recorded first bytes that were neither TLS
//!   nor HTTP there. UDP to port 443 (QUIC) is not learned: clients fall
//!   back to TCP.
//! - Files the agent opened under a secret location (or whose rule was
//!   `taint` in the run) are proposed as `taint`, with the `onTaint` egress
//!   the run showed after the first such read; secret locations the run's
//!   policy watched (`--from`) but the agent never opened as `deny`. A
//!   rule of the run's policy is never weakened.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use chrono::{DateTime, Duration, Utc};
use enforcer_common::MAX_PORT_RULES;
use ipnet::IpNet;

use super::{
    records::{DnsSeen, FileSeen, FlowSeen, InspectSeen, Observed, Run},
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
/// The default `dns.ttl.max`: a learned address expires at most this long
/// after its answer, so an older answer explains no connect.
const DEFAULT_TTL_MAX_S: i64 = 300;
/// At most this many of the latest answers carrying an address are looked
/// at per connect (bounds the work on a log of a flood).
const MAX_CANDIDATES: usize = 64;
/// Protocols whose first bytes name no host (or start in plain text, as
/// STARTTLS does): their host rules get `inspect: none`.
pub const NAMELESS_PORTS: [u16; 24] = [
    21, 22, 23, 25, 110, 143, 389, 445, 587, 1433, 1521, 2049, 2181, 3306, 3389, 4222, 5222, 5432,
    5672, 6379, 9042, 9092, 9418, 27017,
];
/// Domains under which every name belongs to another tenant (buckets,
/// apps, tunnels, wildcard DNS): a wildcard never forms at or under them,
/// whatever the Public Suffix List says.
pub const MULTI_TENANT: [&str; 40] = [
    "amazonaws.com",
    "appspot.com",
    "azureedge.net",
    "azurewebsites.net",
    "cloudflareworkers.com",
    "cloudfront.net",
    "cloudfunctions.net",
    "core.windows.net",
    "deno.dev",
    "firebaseapp.com",
    "firebaseio.com",
    "fly.dev",
    "github.io",
    "githubusercontent.com",
    "gitlab.io",
    "glitch.me",
    "googleapis.com",
    "googleusercontent.com",
    "herokuapp.com",
    "hf.space",
    "localtest.me",
    "modal.run",
    "netlify.app",
    "ngrok-free.app",
    "ngrok.app",
    "ngrok.io",
    "nip.io",
    "onrender.com",
    "pages.dev",
    "pythonanywhere.com",
    "railway.app",
    "repl.co",
    "replit.dev",
    "run.app",
    "sslip.io",
    "supabase.co",
    "trycloudflare.com",
    "vercel.app",
    "web.app",
    "workers.dev",
];
/// Most processes named in one evidence comment.
const MAX_PROCS: usize = 4;
/// Distinct names of one registrable domain resolved and never connected
/// to before they are called a possible tunnel.
const BULK_NAMES: usize = 8;
/// Unix sockets that hand out the machine (or the user's keys).
const DANGEROUS_SOCKETS: [(&str, &str); 9] = [
    ("docker.sock", "the Docker API: root on the host"),
    ("containerd.sock", "the containerd API: root on the host"),
    ("crio.sock", "the CRI-O API: root on the host"),
    ("podman.sock", "the Podman API"),
    (
        "S.gpg-agent",
        "the GnuPG agent: signs and decrypts with the user's keys",
    ),
    ("ssh-agent", "an SSH agent: authenticates as the user"),
    ("agent.", "an SSH agent: authenticates as the user"),
    ("system_bus_socket", "the system D-Bus"),
    ("/run/systemd/private", "systemd's private API"),
];

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
    /// For the user, on stderr and at the top of the file (deduplicated).
    pub warnings: Vec<String>,
    /// What was excluded, per `--exclude`.
    pub excluded: Vec<(String, u64)>,
}

impl Proposal {
    fn warn(&mut self, w: String) {
        if !self.warnings.contains(&w) {
            self.warnings.push(w);
        }
    }
}

/// The taint read that clamps a run, if any.
#[derive(Debug, Clone)]
struct Taint {
    at: DateTime<Utc>,
    what: String,
}

/// `--exclude`, with how many records each one dropped.
struct Excluder<'a> {
    list: &'a [Exclude],
    counts: Vec<u64>,
}

impl Excluder<'_> {
    /// Is a record with these names (all of them excluded), address and
    /// process excluded?
    fn hit(&mut self, names: &[String], ip: Option<IpAddr>, comm: &str) -> bool {
        for (i, e) in self.list.iter().enumerate() {
            let by_name = !names.is_empty() && names.iter().all(|n| e.matches(Some(n), None, ""));
            if by_name || e.matches(None, ip, comm) {
                self.counts[i] += 1;
                return true;
            }
        }
        false
    }

    /// The names no `host=` exclusion names.
    fn keep(&self, names: Vec<String>) -> Vec<String> {
        names
            .into_iter()
            .filter(|n| !self.list.iter().any(|e| e.matches(Some(n), None, "")))
            .collect()
    }
}

pub fn propose(o: &Observed, opts: &LearnOptions, port_budget: usize) -> Proposal {
    let mut p = Proposal::default();
    let ctx = Ctx::new(opts);
    let mut ex = Excluder {
        list: &opts.excludes,
        counts: vec![0; opts.excludes.len()],
    };
    let kept = keep(o, &ctx, &mut ex);
    let taints = taint_reads(o, &ctx, &kept.files);
    let (before, after, contacts) = egress_phases(o, &ctx, &kept, &taints, &ex);

    let phase = before.finish(opts.wildcard_threshold, port_budget);
    p.egress = phase.rules;
    p.resolved_only = phase.resolved_only;
    for w in phase.warnings {
        p.warn(w);
    }
    let mut connected = phase.connected;

    file_rules(&mut p, &ctx, &kept.files);
    let any_taint = p.files.iter().any(|f| f.rule.access == FileAccess::Taint);
    if any_taint || !taints.is_empty() {
        let phase = after.finish(opts.wildcard_threshold, port_budget);
        for w in phase.warnings {
            p.warn(w);
        }
        p.resolved_only_taint = phase.resolved_only;
        connected.extend(phase.connected);
        let mut rules = phase.rules;
        flag_after_taint(&mut p, &mut rules, &contacts);
        p.on_taint = Some(rules);
    }
    local_rules(&mut p, o, &mut ex);
    ingress_rules(&mut p, o, opts, &mut ex, port_budget);

    // DNS settings, from the queries of the names connected to.
    dns_settings(&mut p, &kept.dns, &connected, opts);
    bulk_names(&mut p, &kept.dns, &connected);

    p.excluded = opts
        .excludes
        .iter()
        .zip(ex.counts)
        .map(|(e, n)| (e.to_string(), n))
        .collect();
    p
}

/// What every step reads: the options, the secret list, the TTL clamp and
/// the run's policy's file rules.
struct Ctx<'a> {
    opts: &'a LearnOptions,
    secrets: Vec<Secret>,
    ttl: Duration,
    base_files: BTreeMap<String, FileAccess>,
}

impl<'a> Ctx<'a> {
    fn new(opts: &'a LearnOptions) -> Self {
        Self {
            opts,
            secrets: secrets::builtin()
                .into_iter()
                .chain(opts.secrets.iter().cloned())
                .collect(),
            ttl: opts
                .base
                .as_ref()
                .and_then(|b| b.spec.dns.as_ref())
                .and_then(|d| d.ttl)
                .map(|t| Duration::seconds(t.max.as_secs().min(1 << 31) as i64))
                .unwrap_or(Duration::seconds(DEFAULT_TTL_MAX_S)),
            base_files: opts
                .base
                .iter()
                .flat_map(|b| &b.spec.files)
                .map(|f| (f.path.display().to_string(), f.access))
                .collect(),
        }
    }
}

/// The records `--exclude` leaves.
struct Kept {
    dns: Vec<DnsSeen>,
    flows: Vec<FlowSeen>,
    files: Vec<FileSeen>,
}

/// Destination -> (first contact after the taint read?, contacts, what
/// was read).
type Contacts = BTreeMap<String, (bool, u64, Option<String>)>;

/// `--exclude`: drop what it names before anything is learned from it.
fn keep(o: &Observed, ctx: &Ctx, ex: &mut Excluder) -> Kept {
    let all_answers = AnswerIndex::new(&o.dns, ctx.ttl);
    let mut dns: Vec<DnsSeen> = Vec::new();
    for d in &o.dns {
        if !ex.hit(std::slice::from_ref(&d.name), None, "") {
            dns.push(d.clone());
        }
    }
    let mut flows: Vec<FlowSeen> = Vec::new();
    for f in &o.flows {
        if f.port == enforcer_common::DNS_PORT {
            // Steered to the DNS proxy: covered by the host rules.
            continue;
        }
        // Excluded with the names that explain it (from every answer,
        // excluded ones included) if all of them are excluded.
        let names = match &f.host {
            Some(h) => vec![h.clone()],
            None => all_answers.explain(f.ip, f.run, None, f.first),
        };
        if !ex.hit(&names, Some(f.ip), &f.comm) {
            flows.push(f.clone());
        }
    }
    let files: Vec<FileSeen> = o
        .files
        .iter()
        .filter(|f| !ex.hit(&[], None, &f.comm))
        .cloned()
        .collect();
    Kept { dns, flows, files }
}

/// Taint reads: the first read per run of a secret location or of a
/// `taint` rule (or the kernel's own `taint_clamp` record).
fn taint_reads(o: &Observed, ctx: &Ctx, files: &[FileSeen]) -> BTreeMap<Run, Taint> {
    let mut taints: BTreeMap<Run, Taint> = BTreeMap::new();
    let mut note_taint = |run: Run, at: DateTime<Utc>, what: String| {
        let e = taints.entry(run).or_insert(Taint {
            at,
            what: what.clone(),
        });
        if at < e.at {
            *e = Taint { at, what };
        }
    };
    for f in files {
        let secret = secrets::classify(&ctx.secrets, Path::new(&f.path));
        let taint_rule =
            f.verdict == "taint" || ctx.base_files.get(&f.path) == Some(&FileAccess::Taint);
        if secret.is_some() || taint_rule {
            let what = secret.map_or("a `taint` file", |s| s.what.as_str());
            note_taint(f.run, f.ts, format!("{} ({what}) by {}", f.path, f.comm));
        }
    }
    for &(run, t) in &o.taint_clamps {
        note_taint(run, t, "a `taint` file".into());
    }
    taints
}

/// Which names explain each flow, before and after the taint read: the
/// two phases' builders and every destination's contacts.
fn egress_phases<'a>(
    o: &'a Observed,
    ctx: &Ctx<'a>,
    kept: &Kept,
    taints: &BTreeMap<Run, Taint>,
    ex: &Excluder,
) -> (Builder<'a>, Builder<'a>, Contacts) {
    let index = AnswerIndex::new(&kept.dns, ctx.ttl);
    let mut before = Builder::new(ctx.opts, &o.inspect);
    let mut after = Builder::new(ctx.opts, &o.inspect);
    let mut contacts = Contacts::new();
    for f in &kept.flows {
        let taint = taints.get(&f.run);
        let pre = taint.is_none_or(|t| f.first < t.at);
        let post = taint.is_some_and(|t| f.last >= t.at);
        let names = ex.keep(match &f.host {
            Some(h) => vec![h.clone()],
            None => index.explain(f.ip, f.run, None, f.first),
        });
        for dest in destinations(&names, f) {
            let e = contacts.entry(dest).or_insert((
                taint.is_some_and(|t| f.first >= t.at),
                0,
                taint.map(|t| t.what.clone()),
            ));
            e.1 += f.count;
        }
        if pre {
            before.flow(f, &names, &[]);
        }
        if let (true, Some(t)) = (post, taint) {
            let at = f.first.max(t.at);
            let fresh = ex.keep(index.explain(f.ip, f.run, Some(t.at), at));
            // An answer from before the read: the DNS proxy installs answers
            // of names the onTaint rules allow under the taint key as well.
            let cached = if fresh.is_empty() {
                names.clone()
            } else {
                Vec::new()
            };
            after.flow(f, &fresh, &cached);
        }
    }
    // Names resolved in each phase (for resolved-only names and tunnels).
    for d in &kept.dns {
        if taints.get(&d.run).is_some_and(|tn| tn.at <= d.ts) {
            after.resolved(&d.name, d.ts);
        } else {
            before.resolved(&d.name, d.ts);
        }
    }

    (before, after, contacts)
}

/// Files: one rule per path the agent opened (the rule's path), and the
/// run's policy's rules it did not open. Never weaker than the run's.
fn file_rules(p: &mut Proposal, ctx: &Ctx, files: &[FileSeen]) {
    let mut by_path: BTreeMap<String, (Evidence, BTreeSet<String>)> = BTreeMap::new();
    for f in files {
        let ev = Evidence::new(f.ts, f.ts, 1, &f.comm);
        let e = by_path
            .entry(f.path.clone())
            .or_insert_with(|| (Evidence::new(f.ts, f.ts, 0, ""), BTreeSet::new()));
        e.0.merge(&ev);
        e.1.insert(f.verdict.clone());
    }
    for (path, (ev, verdicts)) in &by_path {
        let rule_path = PathBuf::from(path);
        let secret = secrets::classify(&ctx.secrets, &rule_path);
        let (access, why) = match (ctx.base_files.get(path), secret) {
            (Some(FileAccess::Deny), _) => {
                p.warn(format!(
                    "{path}: the run's policy denies it and the agent opened it ({}): kept \
                     `deny`, the enforced agent gets EPERM there",
                    ev.text("opens")
                ));
                (
                    FileAccess::Deny,
                    "deny: as in the run's policy (the agent opened it: it will get EPERM)".into(),
                )
            }
            (Some(FileAccess::Taint), _) => (
                FileAccess::Taint,
                "taint: as in the run's policy; after the first read egress narrows to onTaint"
                    .to_string(),
            ),
            (_, Some(_)) => (
                FileAccess::Taint,
                "taint: the agent's reads keep working; after the first one its egress narrows \
                 to onTaint (deny would break it)"
                    .to_string(),
            ),
            _ if verdicts.contains("taint") => (
                FileAccess::Taint,
                "taint: a `taint` rule in the run".to_string(),
            ),
            _ => (
                FileAccess::Audit,
                "not a known secret location: audited".to_string(),
            ),
        };
        let what = secret.map_or_else(String::new, |s| format!("{}: ", s.what));
        p.files.push(Item {
            rule: FileRule {
                path: rule_path,
                access,
            },
            why: vec![format!("{what}{}", ev.text("opens")), why],
        });
    }
    for (path, access) in &ctx.base_files {
        if by_path.contains_key(path) {
            continue;
        }
        let rule_path = PathBuf::from(path);
        let (access, why) = match secrets::classify(&ctx.secrets, &rule_path) {
            Some(s) if *access != FileAccess::Taint => (
                FileAccess::Deny,
                format!(
                    "{}: watched by the run's policy, never opened: deny",
                    s.what
                ),
            ),
            _ => (
                *access,
                "from the run's policy (not opened in the run)".to_string(),
            ),
        };
        p.files.push(Item {
            rule: FileRule {
                path: rule_path,
                access,
            },
            why: vec![why],
        });
    }
    p.files.sort_by(|a, b| a.rule.path.cmp(&b.rule.path));
}

/// Destinations first contacted after the taint read: the shape of an
/// exfiltration (whatever the count; once is the classic one).
fn flag_after_taint(p: &mut Proposal, rules: &mut [Item<EgressRule>], contacts: &Contacts) {
    for (dest, (first_after, count, what)) in contacts {
        if !first_after {
            continue;
        }
        let what = what.as_deref().unwrap_or("a secret");
        let once = if *count == 1 { "once, " } else { "" };
        p.warn(format!(
            "{dest} was contacted {once}only after reading {what} ({count} contact(s)): \
             an exfiltration? It is in the onTaint rules; drop it with --exclude if it is not \
             the agent's own"
        ));
        mark(rules, dest, *count == 1);
    }
}

/// Unix sockets connected or sent to.
fn local_rules(p: &mut Proposal, o: &Observed, ex: &mut Excluder) {
    let mut unix: BTreeMap<(String, String), Evidence> = BTreeMap::new();
    for u in &o.unix {
        if ex.hit(&[], None, &u.comm) {
            continue;
        }
        if u.kind == "abstract" && u.socket.contains("\\x") {
            p.warn(format!(
                "abstract unix socket {:?}: its name has bytes a policy cannot spell; not learned",
                u.socket
            ));
            continue;
        }
        let ev = Evidence::new(u.ts, u.ts, 1, &u.comm);
        unix.entry((u.kind.clone(), u.socket.clone()))
            .and_modify(|e| e.merge(&ev))
            .or_insert(ev);
    }
    for ((kind, socket), ev) in unix {
        let mut why = vec![ev.text("connects/sends")];
        if let Some((_, what)) = DANGEROUS_SOCKETS.iter().find(|(s, _)| socket.contains(s)) {
            p.warn(format!("unix socket {socket}: {what} — review this rule"));
            why.insert(0, format!("WARNING: {what}"));
        }
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
        p.local.push(Item { rule, why });
    }
}

/// Inbound peers.
fn ingress_rules(
    p: &mut Proposal,
    o: &Observed,
    opts: &LearnOptions,
    ex: &mut Excluder,
    port_budget: usize,
) {
    let mut ingress: BTreeMap<(IpNet, String), (BTreeSet<u16>, Option<Evidence>)> = BTreeMap::new();
    for i in &o.ingress {
        if ex.hit(&[], Some(i.peer), &i.comm) {
            continue;
        }
        let net = widen(i.peer, opts);
        let ev = Evidence::new(i.ts, i.ts, i.count, &i.comm);
        let e = ingress.entry((net, i.protocol.clone())).or_default();
        e.0.insert(i.port);
        match &mut e.1 {
            Some(have) => have.merge(&ev),
            None => e.1 = Some(ev),
        }
    }
    for ((net, proto), (ports, ev)) in ingress {
        p.ingress.push(Item {
            rule: IngressRule {
                cidr: net,
                ports: fit_ports(&ports, port_budget),
                protocol: protocol(&proto),
            },
            why: vec![format!(
                "from {net}: {}",
                ev.map(|e| e.text("connections")).unwrap_or_default()
            )],
        });
    }
}

/// How a flow's destination is named in warnings: `name port N` for each
/// name, else `ip:port`.
fn destinations(names: &[String], f: &FlowSeen) -> Vec<String> {
    if names.is_empty() {
        vec![SocketAddr::new(canonical(f.ip), f.port).to_string()]
    } else {
        names
            .iter()
            .map(|n| format!("{n} port {}", f.port))
            .collect()
    }
}

/// Put a warning comment on the onTaint rules (exact or wildcard) that
/// admit `dest` (`name port N` or `ip:port`).
fn mark(rules: &mut [Item<EgressRule>], dest: &str, once: bool) {
    let (host, port) = match dest.split_once(" port ") {
        Some((h, p)) => (Some(h), p.parse::<u16>().ok()),
        None => (None, dest.parse::<SocketAddr>().ok().map(|a| a.port())),
    };
    let addr = dest.parse::<SocketAddr>().ok().map(|a| a.ip());
    let warn = if once {
        "WARNING: contacted once, only after a taint read: an exfiltration?"
    } else {
        "WARNING: first contacted after a taint read: an exfiltration?"
    };
    for r in rules.iter_mut() {
        let port_ok = r.rule.ports.is_empty()
            || port.is_some_and(|p| r.rule.ports.iter().any(|pr| pr.lo <= p && p <= pr.hi));
        let matches = match (&r.rule.host, &r.rule.cidr, host, addr) {
            (Some(h), _, Some(name), _) => matches_pattern(h, name),
            (None, Some(net), None, Some(ip)) => net.contains(&ip),
            _ => false,
        };
        if matches && port_ok && !r.why.iter().any(|w| w.starts_with("WARNING: ")) {
            r.why.insert(0, warn.into());
        }
    }
}

/// `pattern` (exact or `*.base`) matches `name`.
fn matches_pattern(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(base) => name.len() > base.len() + 1 && name.ends_with(&format!(".{base}")),
        None => pattern == name,
    }
}

/// The addresses each DNS answer carried: ip -> [(when, name, run)] in
/// time order.
struct AnswerIndex {
    by_ip: HashMap<IpAddr, Vec<(DateTime<Utc>, String, Run)>>,
    ttl: Duration,
}

impl AnswerIndex {
    fn new(dns: &[DnsSeen], ttl: Duration) -> Self {
        let mut by_ip: HashMap<IpAddr, Vec<_>> = HashMap::new();
        for d in dns {
            for ip in &d.answers {
                by_ip
                    .entry(canonical(*ip))
                    .or_default()
                    .push((d.ts, d.name.clone(), d.run));
            }
        }
        for v in by_ip.values_mut() {
            v.sort_by_key(|e| e.0);
        }
        Self { by_ip, ttl }
    }

    /// The names whose answers (in `run`, not before `since`, not expired
    /// at `at` under the TTL clamp) carried `ip` before `at` (with
    /// [`ANSWER_SLACK_MS`]): the most recent first.
    fn explain(
        &self,
        ip: IpAddr,
        run: Run,
        since: Option<DateTime<Utc>>,
        at: DateTime<Utc>,
    ) -> Vec<String> {
        let Some(list) = self.by_ip.get(&canonical(ip)) else {
            return Vec::new();
        };
        let slack = Duration::milliseconds(ANSWER_SLACK_MS);
        let until = list.partition_point(|(t, _, _)| *t <= at + slack);
        let from = at - self.ttl - slack;
        let mut names: Vec<String> = Vec::new();
        for (t, n, r) in list[..until].iter().rev().take(MAX_CANDIDATES) {
            if *t < from {
                break;
            }
            if *r == run && since.is_none_or(|s| *t >= s) && !names.contains(n) {
                names.push(n.clone());
            }
        }
        names
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
    ev: Option<Evidence>,
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

/// The rules of one phase, the names it resolved that no rule covers, the
/// names it connected to, and warnings.
struct Phase {
    rules: Vec<Item<EgressRule>>,
    resolved_only: Vec<(String, Evidence)>,
    connected: BTreeSet<String>,
    warnings: Vec<String>,
}

/// Rules of one phase (before the taint read, or onTaint).
struct Builder<'a> {
    opts: &'a LearnOptions,
    inspect: &'a [InspectSeen],
    uses: BTreeMap<Key, Use>,
    resolved: BTreeMap<String, Evidence>,
    connected: BTreeSet<String>,
    warnings: Vec<String>,
}

impl<'a> Builder<'a> {
    fn new(opts: &'a LearnOptions, inspect: &'a [InspectSeen]) -> Self {
        Self {
            opts,
            inspect,
            uses: BTreeMap::new(),
            resolved: BTreeMap::new(),
            connected: BTreeSet::new(),
            warnings: Vec::new(),
        }
    }

    fn warn(&mut self, w: String) {
        if !self.warnings.contains(&w) {
            self.warnings.push(w);
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
            ev: None,
            names: BTreeSet::new(),
            notes: BTreeSet::new(),
        });
        match &mut u.ev {
            Some(have) => have.merge(ev),
            None => u.ev = Some(ev.clone()),
        }
        u.ports.insert(port);
        if let Some(n) = name {
            u.names.insert(n.to_string());
        }
        if let Some(n) = note {
            u.notes.insert(n);
        }
    }

    /// A flow, explained by `names` (or not); `cached`: names whose answer
    /// came before the taint read (onTaint only).
    fn flow(&mut self, f: &FlowSeen, names: &[String], cached: &[String]) {
        let ev = Evidence::new(f.first, f.last, f.count, &f.comm);
        let udp = f.protocol == "udp";
        let mut valid: Vec<(String, bool)> = Vec::new();
        for (n, is_cached) in names
            .iter()
            .map(|n| (n, false))
            .chain(cached.iter().map(|n| (n, true)))
        {
            if host_pattern(n).is_ok() {
                valid.push((n.clone(), is_cached));
            } else {
                self.warn(format!(
                    "{n:?} is not a name a host rule can hold: connects to its addresses are \
                     learned as cidr rules"
                ));
            }
        }
        let domains: BTreeSet<&str> = valid
            .iter()
            .map(|(n, _)| psl::domain_str(n).unwrap_or(n))
            .collect();
        if domains.len() > 1 {
            let list: Vec<&str> = valid.iter().map(|(n, _)| n.as_str()).collect();
            self.warn(format!(
                "{} was answered for names of different domains ({}): each is learned; a name \
                 that only ever resolves to another's addresses may be a decoy — review them",
                canonical(f.ip),
                list.join(", ")
            ));
        }
        if valid.is_empty() {
            let net = widen(f.ip, self.opts);
            self.add(
                (Dest::Cidr(net), f.protocol.clone(), false),
                f.port,
                &ev,
                None,
                range_note(f.ip),
            );
            if net.addr().is_loopback() || is_link_local(f.ip) {
                self.warn(format!(
                    "{}: {} — review this rule",
                    SocketAddr::new(canonical(f.ip), f.port),
                    range_kind(f.ip)
                ));
            }
            return;
        }
        for (n, is_cached) in valid {
            if udp && f.port == 443 {
                self.warn(format!(
                    "UDP to {n} port 443 (QUIC) is not learned: QUIC cannot be inspected and \
                     clients fall back to TCP"
                ));
                continue;
            }
            let refused = self.inspect.iter().any(|i| {
                canonical(i.ip) == canonical(f.ip)
                    && i.port == f.port
                    && i.reason == "not-tls-or-http"
            });
            let none = udp || NAMELESS_PORTS.contains(&f.port) || refused;
            self.connected.insert(n.clone());
            let note = if refused {
                Some(format!(
                    "inspect: none: a run recorded first bytes on port {} that were neither TLS \
                     nor HTTP",
                    f.port
                ))
            } else if is_cached {
                Some(
                    "answered before the taint read: the DNS proxy installs answers of names the \
                     onTaint rules allow under the taint key too"
                        .to_string(),
                )
            } else {
                None
            };
            self.add(
                (Dest::Host(n.clone()), f.protocol.clone(), none),
                f.port,
                &ev,
                Some(&n),
                note,
            );
            if none {
                self.warn(format!(
                    "{n} port {} ({}): inspect: none — its connections are not checked for \
                     the name they present",
                    f.port, f.protocol
                ));
            }
            if is_rebinding_address(f.ip) {
                let ip = canonical(f.ip);
                self.add(
                    (Dest::Cidr(IpNet::from(ip)), f.protocol.clone(), false),
                    f.port,
                    &ev,
                    Some(&n),
                    Some(format!(
                        "vouches for {n}: its answer is in {} space, which the DNS proxy \
                         installs only under a cidr rule (this rule also admits the address \
                         itself)",
                        range_kind(ip)
                    )),
                );
                if ip.is_loopback() || is_link_local(ip) {
                    self.warn(format!(
                        "{n} resolves to {ip} ({}): the cidr rule that vouches for it admits {} \
                         port {} — review it",
                        range_kind(ip),
                        ip,
                        f.port
                    ));
                }
            }
        }
    }

    fn resolved(&mut self, name: &str, ts: DateTime<Utc>) {
        let ev = Evidence::new(ts, ts, 1, "");
        self.resolved
            .entry(name.to_string())
            .and_modify(|e| e.merge(&ev))
            .or_insert(ev);
    }

    /// Collapse siblings, then write the rules.
    fn finish(mut self, threshold: usize, port_budget: usize) -> Phase {
        self.collapse(threshold);
        let mut per_dest: BTreeMap<Dest, usize> = BTreeMap::new();
        for (d, _, _) in self.uses.keys() {
            *per_dest.entry(d.clone()).or_default() += 1;
        }
        let mut out = Vec::new();
        for ((dest, proto, none), u) in &self.uses {
            let budget = (port_budget / per_dest.get(dest).copied().unwrap_or(1)).max(1);
            let ports = fit_ports(&u.ports, budget);
            let ev =
                u.ev.as_ref()
                    .map(|e| e.text(verb(proto)))
                    .unwrap_or_default();
            let mut why = Vec::new();
            let rule = match dest {
                Dest::Host(h) => {
                    if h.starts_with("*.") {
                        let list: Vec<&str> = u.names.iter().map(String::as_str).collect();
                        why.push(format!(
                            "{} sibling names connected to, collapsed: {}",
                            u.names.len(),
                            list.join(", ")
                        ));
                    }
                    why.push(format!("{h}: {ev}"));
                    if *none && proto == "udp" {
                        why.push("inspect: none: UDP first bytes cannot be inspected".into());
                    } else if *none {
                        why.push(format!(
                            "inspect: none: port {} carries a protocol whose first bytes name \
                             no host",
                            ports_text(&u.ports)
                        ));
                    }
                    EgressRule {
                        cidr: None,
                        host: Some(h.clone()),
                        ports: ports.clone(),
                        protocol: protocol(proto),
                        inspect: if *none { Inspect::None } else { Inspect::Name },
                    }
                }
                Dest::Cidr(net) => {
                    why.push(format!("{net}: {ev}"));
                    if u.names.is_empty() {
                        why.push("no DNS answer of the agent named this address".into());
                    }
                    EgressRule {
                        cidr: Some(*net),
                        host: None,
                        ports: ports.clone(),
                        protocol: protocol(proto),
                        inspect: Inspect::Name,
                    }
                }
            };
            if ports.len() < port_ranges(&u.ports).len() {
                why.push(format!(
                    "{} ports merged into {} ranges (a name or prefix holds at most {} port \
                     entries): the ranges include ports the agent did not use",
                    u.ports.len(),
                    ports.len(),
                    MAX_PORT_RULES
                ));
            }
            why.extend(u.notes.iter().cloned());
            out.push(Item { rule, why });
        }
        // Host rules first (by name), then cidr rules.
        out.sort_by_key(|i| (i.rule.host.is_none(), i.rule.host.clone(), i.rule.cidr));
        let hosts: Vec<&str> = self
            .uses
            .keys()
            .filter_map(|(d, _, _)| match d {
                Dest::Host(h) => Some(h.as_str()),
                Dest::Cidr(_) => None,
            })
            .collect();
        let resolved_only = self
            .resolved
            .iter()
            .filter(|(n, _)| !hosts.iter().any(|h| matches_pattern(h, n)))
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect();
        Phase {
            rules: out,
            resolved_only,
            connected: self.connected,
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
                        match (&mut w.ev, &u.ev) {
                            (Some(a), Some(b)) => a.merge(b),
                            (None, b) => w.ev.clone_from(b),
                            _ => {}
                        }
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
/// is a registrable domain or below one (never a public suffix) and not at
/// or under a multi-tenant domain ([`MULTI_TENANT`]).
pub fn wildcard_parent(name: &str) -> Option<String> {
    let base = name.strip_prefix("*.").unwrap_or(name);
    let (_, parent) = base.split_once('.')?;
    let registrable = psl::domain_str(parent)?;
    let shared = MULTI_TENANT
        .iter()
        .any(|m| parent == *m || parent.ends_with(&format!(".{m}")));
    (parent.len() >= registrable.len() && !shared).then(|| parent.to_string())
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

/// [`port_ranges`], with the closest neighbours merged until at most
/// `budget` ranges remain (a name or prefix holds [`MAX_PORT_RULES`]).
fn fit_ports(ports: &BTreeSet<u16>, budget: usize) -> Vec<PortRange> {
    let mut r = port_ranges(ports);
    while r.len() > budget.max(1) {
        let Some(i) = (0..r.len() - 1).min_by_key(|&i| r[i + 1].lo - r[i].hi) else {
            break;
        };
        r[i].hi = r[i + 1].hi;
        r.remove(i + 1);
    }
    r
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

/// `dns:` from the queries of the names connected to: their query types
/// (A and AAAA always; others called out), the longest with 50 % headroom,
/// the most distinct names per rule in a minute, doubled.
fn dns_settings(
    p: &mut Proposal,
    dns: &[DnsSeen],
    connected: &BTreeSet<String>,
    opts: &LearnOptions,
) {
    let patterns: Vec<String> = p
        .egress
        .iter()
        .chain(p.on_taint.iter().flatten())
        .filter_map(|i| i.rule.host.clone())
        .collect();
    let rule_of = |n: &str| patterns.iter().position(|h| matches_pattern(h, n));
    let mut qtypes: BTreeMap<String, u64> = BTreeMap::new();
    let mut longest: Option<&str> = None;
    let mut per_rule: BTreeMap<usize, Vec<(DateTime<Utc>, &str)>> = BTreeMap::new();
    for d in dns {
        if !connected.contains(&d.name) {
            continue;
        }
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
    for t in qtypes.keys().filter(|t| !t.contains(':')) {
        if types.insert(t.clone()) {
            p.warn(format!(
                "dns.queryTypes gets {t}: the agent asked it of a name it connected to; types \
                 other than A/AAAA can carry data out (tunnels) — review it"
            ));
        }
    }
    p.dns.query_types = types.into_iter().collect();
    p.dns_why.insert(
        "queryTypes",
        format!(
            "seen for names connected to: {} (A and AAAA are always kept)",
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
    // Distinct names in any 60 s window (two pointers over time order).
    let mut most = 0usize;
    for qs in per_rule.values_mut() {
        qs.sort();
        let mut count: HashMap<&str, usize> = HashMap::new();
        let mut lo = 0;
        for hi in 0..qs.len() {
            *count.entry(qs[hi].1).or_default() += 1;
            while qs[hi].0 - qs[lo].0 >= Duration::seconds(60) {
                if let Some(c) = count.get_mut(qs[lo].1) {
                    *c -= 1;
                    if *c == 0 {
                        count.remove(qs[lo].1);
                    }
                }
                lo += 1;
            }
            most = most.max(count.len());
        }
    }
    let per_minute = (most * 2).max(16) as u32;
    p.dns.names_per_minute = Some(per_minute);
    p.dns_why.insert(
        "namesPerMinute",
        format!("most distinct names under one rule in a minute: {most}, doubled, at least 16"),
    );
}

/// Many distinct names of one registrable domain resolved and never
/// connected to: a tunnel's shape, even under a learned wildcard.
fn bulk_names(p: &mut Proposal, dns: &[DnsSeen], connected: &BTreeSet<String>) {
    let mut per_domain: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for d in dns {
        if !connected.contains(&d.name) {
            let dom = psl::domain_str(&d.name).unwrap_or(&d.name);
            per_domain.entry(dom).or_default().insert(&d.name);
        }
    }
    for (dom, names) in per_domain {
        if names.len() >= BULK_NAMES {
            p.warn(format!(
                "{} distinct names under {dom} were resolved and never connected to: a DNS \
                 tunnel? They are not learned, but a wildcard over {dom} would let them through",
                names.len()
            ));
        }
    }
}

impl Exclude {
    fn matches(&self, name: Option<&str>, ip: Option<IpAddr>, comm: &str) -> bool {
        match self {
            Exclude::Host(pattern) => name.is_some_and(|n| matches_pattern(pattern, n)),
            Exclude::Ip(net) => ip.is_some_and(|ip| net.contains(&canonical(ip))),
            Exclude::Process(p) => !comm.is_empty() && comm == p,
        }
    }
}
