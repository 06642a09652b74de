//! `enforcer policy learn`: audit logs of runs in `mode: audit` -> the
//! minimal `AgentPolicy` that would have allowed what the identity did,
//! every rule commented with its evidence.
//!
//! Flow: [`records`] (audit JSON Lines -> what one identity did) ->
//! [`propose`] (-> rules with evidence) -> [`render`] (-> YAML, `--diff`).
//! The result is checked with the same validation and compilation as
//! `enforcer policy check` before it is returned.
//!
//! `enforcer policy discover` writes the policy to run the agent under first: audit
//! mode, no egress rules (so everything is recorded), and an `audit` file
//! rule for each well-known secret location ([`secrets`]) that exists.
mod propose;
pub mod records;
mod render;
pub mod secrets;

#[cfg(test)]
mod tests;

use std::{
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
};

use ipnet::IpNet;

pub use propose::wildcard_parent;
pub use render::diff;

use super::{
    AgentPolicy, Dns, LoadedPolicy, Metadata, Mode, OnTaint, PolicyErrors, Spec, API_VERSION, KIND,
};

/// Default: this many connected sibling names become `*.parent`.
pub const DEFAULT_WILDCARD_THRESHOLD: usize = 5;

#[derive(Debug, Clone)]
pub struct LearnOptions {
    /// The identity to learn (required when the logs name several).
    pub identity: Option<String>,
    /// Sibling names connected to before they collapse into a wildcard
    /// (0: never).
    pub wildcard_threshold: usize,
    /// Prefix of `cidr` rules for addresses no name explained (32: exact).
    pub cidr_prefix_v4: u8,
    pub cidr_prefix_v6: u8,
    pub excludes: Vec<Exclude>,
    /// Secret locations besides the built-in list.
    pub secrets: Vec<secrets::Secret>,
    /// The policy the runs were made under (`--from`): its name, identity
    /// and DNS upstreams are kept; its secret file rules that the agent
    /// never opened become `deny`.
    pub base: Option<AgentPolicy>,
}

impl Default for LearnOptions {
    fn default() -> Self {
        Self {
            identity: None,
            wildcard_threshold: DEFAULT_WILDCARD_THRESHOLD,
            cidr_prefix_v4: 32,
            cidr_prefix_v6: 128,
            excludes: Vec::new(),
            secrets: Vec::new(),
            base: None,
        }
    }
}

/// `--exclude`: records that must not be learned (the hostile part of a run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exclude {
    /// `host=NAME` or `host=*.example.com`: DNS answers for it and the
    /// connections they explain.
    Host(String),
    /// `ip=ADDR` or `ip=CIDR`: connections to it.
    Ip(IpNet),
    /// `process=COMM`: everything this process (by `comm`) did.
    Process(String),
}

impl FromStr for Exclude {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let help = "expected host=NAME, host=*.DOMAIN, ip=ADDRESS[/PREFIX] or process=COMM";
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| format!("invalid --exclude {s:?}: {help}"))?;
        let v = v.trim();
        match k.trim() {
            "host" => super::validate::host_pattern(v)
                .map(Exclude::Host)
                .map_err(|e| format!("invalid --exclude {s:?}: {e}")),
            "ip" => v
                .parse::<IpAddr>()
                .map(IpNet::from)
                .or_else(|_| v.parse::<IpNet>().map(|n| n.trunc()))
                .map(Exclude::Ip)
                .map_err(|_| format!("invalid --exclude {s:?}: {help}")),
            "process" if !v.is_empty() && v.len() <= 15 => Ok(Exclude::Process(v.to_string())),
            "process" => Err(format!(
                "invalid --exclude {s:?}: a process name (comm) has 1 to 15 bytes"
            )),
            _ => Err(format!("invalid --exclude {s:?}: {help}")),
        }
    }
}

impl fmt::Display for Exclude {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exclude::Host(h) => write!(f, "host={h}"),
            Exclude::Ip(n) => write!(f, "ip={n}"),
            Exclude::Process(p) => write!(f, "process={p}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error("{}: cannot read: {error}", file.display())]
    Read { file: PathBuf, error: String },
    #[error("{}:{}: {message}", at.file.display(), at.line)]
    Record { at: records::At, message: String },
    #[error("the audit logs hold no decision records (was the agent run with --audit-log?)")]
    NoDecisions,
    #[error("the audit logs name several identities; choose one with --identity: {}", list(.0))]
    SeveralIdentities(records::Identities),
    #[error("no decision records of identity {name:?} in the audit logs (they name: {})", list(.seen))]
    NoSuchIdentity {
        name: String,
        seen: records::Identities,
    },
    #[error("the learned policy does not validate (a bug in `policy learn`):\n{0}")]
    Invalid(PolicyErrors),
}

fn list(ids: &records::Identities) -> String {
    ids.iter()
        .map(|(n, c)| format!("{n} ({c} records)"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A learned policy.
#[derive(Debug)]
pub struct Learned {
    pub policy: AgentPolicy,
    /// The policy as YAML with evidence comments; passes `policy check`.
    pub yaml: String,
    /// For stderr: exfiltration suspects, link-local destinations, ...
    pub warnings: Vec<String>,
    /// One line: what was learned from what.
    pub summary: String,
}

/// Learn the policy of one identity from audit logs.
pub fn learn(files: &[PathBuf], opts: &LearnOptions) -> Result<Learned, LearnError> {
    let observed = records::read(files, opts.identity.as_deref())?;
    build(&observed, files, opts)
}

fn build(
    o: &records::Observed,
    files: &[PathBuf],
    opts: &LearnOptions,
) -> Result<Learned, LearnError> {
    // A name or prefix holds at most MAX_PORT_RULES port entries, wildcards
    // above a name included: merge ranges harder until the policy compiles.
    let mut last = None;
    for budget in [enforcer_common::MAX_PORT_RULES, 4, 1] {
        match build_with(o, files, opts, budget) {
            Err(LearnError::Invalid(e)) => last = Some(e),
            other => return other,
        }
    }
    Err(LearnError::Invalid(
        last.unwrap_or_else(|| PolicyErrors(Vec::new())),
    ))
}

fn build_with(
    o: &records::Observed,
    files: &[PathBuf],
    opts: &LearnOptions,
    port_budget: usize,
) -> Result<Learned, LearnError> {
    let mut p = propose::propose(o, opts, port_budget);
    // Names, paths and process names come from the agent: nothing it chose
    // may move a terminal's cursor or break a line of the YAML.
    for w in &mut p.warnings {
        *w = printable(w);
    }
    let base = opts.base.as_ref();
    let dns = (p.dns != Dns::default()).then(|| p.dns.clone());
    let policy = AgentPolicy {
        api_version: API_VERSION.into(),
        kind: KIND.into(),
        metadata: Metadata {
            name: base
                .map(|b| b.metadata.name.clone())
                .unwrap_or_else(|| o.identity.clone()),
        },
        spec: Spec {
            identity: base.and_then(|b| b.spec.identity.clone()),
            mode: Mode::Enforce,
            egress: p.egress.iter().map(|i| i.rule.clone()).collect(),
            ingress: p.ingress.iter().map(|i| i.rule.clone()).collect(),
            dns,
            files: p.files.iter().map(|i| i.rule.clone()).collect(),
            on_taint: p.on_taint.as_ref().map(|r| OnTaint {
                egress: r.iter().map(|i| i.rule.clone()).collect(),
            }),
            writable: base.map(|b| b.spec.writable.clone()).unwrap_or_default(),
            local: p.local.iter().map(|i| i.rule.clone()).collect(),
        },
    };
    let header = header(o, files, &p);
    let yaml = render::yaml(&policy, &p, &header);
    // The output must be what `enforcer policy check` accepts, and read
    // back as the policy built here.
    let loaded: Vec<LoadedPolicy> =
        super::parse_str(&yaml, Path::new("learned.yaml")).map_err(LearnError::Invalid)?;
    if let Some(l) = loaded.first() {
        if let Err(e) = super::compile(l) {
            return Err(LearnError::Invalid(e));
        }
    }
    let summary = format!(
        "identity {}: {} decision records -> {} egress rule(s), {} onTaint, {} file, {} local, \
         {} ingress; {} name(s) resolved but never connected to left out",
        o.identity,
        o.records,
        policy.spec.egress.len(),
        policy.spec.on_taint.as_ref().map_or(0, |t| t.egress.len()),
        policy.spec.files.len(),
        policy.spec.local.len(),
        policy.spec.ingress.len(),
        p.resolved_only.len() + p.resolved_only_taint.len(),
    );
    Ok(Learned {
        policy,
        yaml,
        warnings: p.warnings,
        summary,
    })
}

fn header(o: &records::Observed, files: &[PathBuf], p: &propose::Proposal) -> Vec<String> {
    let mut h = vec![format!(
        "Learned by `enforcer policy learn` from {} ({} decision records of identity {:?}).",
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        o.records,
        o.identity
    )];
    h.push(
        "Each rule says what it was learned from. Review it, then enforce it (or run it in \
         audit mode first)."
            .into(),
    );
    if !o.spiffe_ids.is_empty() || !o.namespaces.is_empty() {
        let ids: Vec<&str> = o.spiffe_ids.keys().map(String::as_str).collect();
        let ns: Vec<&str> = o.namespaces.keys().map(String::as_str).collect();
        h.push(format!(
            "Workload identity seen: SPIFFE ID {}{}; bind the policy with spec.identity or the \
             daemon's bindings.",
            if ids.is_empty() {
                "-".into()
            } else {
                ids.join(", ")
            },
            if ns.is_empty() {
                String::new()
            } else {
                format!(", namespace {}", ns.join(", "))
            }
        ));
    }
    for (why, (n, examples)) in &o.not_learned {
        h.push(format!(
            "Not learned: {n} {why} record(s), e.g. {}",
            examples.join("; ")
        ));
    }
    for (e, n) in &p.excluded {
        h.push(format!("Excluded (--exclude {e}): {n} record(s)"));
    }
    for w in &p.warnings {
        h.push(format!("WARNING: {w}"));
    }
    h
}

/// `s` with control characters and Unicode line breaks escaped (`\u{1b}`).
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A policy name (`metadata.name`) is an RFC 1123 DNS label.
pub fn check_name(name: &str) -> Result<(), String> {
    super::validate::dns_label(name, "policy name").map(|_| ())
}

/// `enforcer policy discover`: the policy to run the agent under before
/// learning.
pub fn discovery(
    name: &str,
    homes: &[PathBuf],
    extra: &[secrets::Secret],
    upstream: &[std::net::SocketAddr],
) -> String {
    let mut y = String::new();
    y.push_str(
        "# Discovery policy (`enforcer policy discover`): run the agent under it with an\n\
         # audit log, then `enforcer policy learn AUDIT.jsonl`. Audit mode: nothing is\n\
         # refused, every would-be denial is recorded; the file rules record opens of\n\
         # well-known secret locations (they need BPF LSM).\n",
    );
    y.push_str(&format!(
        "apiVersion: {API_VERSION}\nkind: {KIND}\nmetadata:\n  name: {name}\nspec:\n  mode: audit\n  egress: []\n"
    ));
    if !upstream.is_empty() {
        let list: Vec<String> = upstream
            .iter()
            .map(|u| super::aip::quoted(&u.to_string()))
            .collect();
        y.push_str(&format!("  dns:\n    upstream: [{}]\n", list.join(", ")));
    }
    let mut paths = Vec::new();
    let mut missing = Vec::new();
    for s in secrets::builtin().iter().chain(extra) {
        for p in s.paths(homes) {
            if paths.iter().any(|(q, _): &(PathBuf, String)| q == &p) {
                continue;
            }
            if p.exists() {
                paths.push((p, s.what.clone()));
            } else {
                missing.push(p);
            }
        }
    }
    if !paths.is_empty() {
        y.push_str("  files:\n");
        for (p, what) in &paths {
            y.push_str(&format!(
                "    - path: {}   # {}\n      access: audit\n",
                super::aip::quoted(&p.display().to_string()),
                super::aip::comment(what)
            ));
        }
    }
    if !missing.is_empty() {
        y.push_str("  # not on this machine, not watched:\n");
        for p in missing {
            y.push_str(&super::aip::comment(&format!("  #   {}", p.display())));
            y.push('\n');
        }
    }
    y
}
