//! `enforcer policy import-aip`: convert an AIP `AgentPolicy` manifest into an
//! enforcer policy (`enforcer.dev/v1alpha1`), and say what cannot be carried
//! over.
//!
//! # The source format
//!
//! AIP (the "Agent Identity Protocol" draft) describes what an agent may do
//! through MCP, enforced by `aip-proxy` in front of the MCP server. The schema
//! used here was read from the draft's own repositories:
//!
//! - `openagentidentityprotocol/agentidentityprotocol`: `spec/aip-v1alpha1.md`,
//!   `docs/specs/aip-v1alpha2.mdx`, `docs/specs/aip-v1alpha3.mdx` (Appendix A,
//!   "Complete Schema Reference"), `spec/schema/agent-policy.schema.json`
//!   (v1alpha1) and `spec/schema/agent-policy-v1alpha2.schema.json`;
//! - `openagentidentityprotocol/aip-go`: `pkg/policy/engine.go`, the
//!   reference `aip-proxy`, for what the fields mean in practice.
//!
//! ```yaml
//! apiVersion: aip.io/v1alpha1        # v1alpha2, v1alpha3 add fields
//! kind: AgentPolicy
//! metadata: {name, version, owner, signature}
//! spec:
//!   mode: enforce | monitor          # default enforce
//!   allowed_tools, denied_tools, allowed_methods, denied_methods: [string]
//!   tool_rules: [{tool, action, rate_limit, strict_args, schema_hash, allow_args}]
//!   protected_paths: [string]
//!   strict_args_default: bool
//!   dlp, identity, server, registry, aat: {...}
//! ```
//!
//! # Mapping
//!
//! | AIP | enforcer |
//! |---|---|
//! | `metadata.name` | `metadata.name`, made an RFC 1123 label if it is not one (with a note) |
//! | `spec.mode: enforce` (or absent) | `spec.mode: enforce` |
//! | `spec.mode: monitor` | `spec.mode: audit` |
//! | `spec.protected_paths[]` | `spec.files[]: {path, access: deny}` |
//! | (nothing) | `spec.egress: []`: **all network egress is denied** (a note says so) |
//! | every other field | listed as not carried over, with the reason |
//!
//! Like aip-proxy (`engine.go`), `mode` is matched after trimming and
//! lower-casing. Protected paths are mapped as aip-proxy resolves them:
//! `~/...` is the home directory of the user aip-proxy runs as, a relative
//! path is resolved against aip-proxy's working directory, and the result is
//! cleaned lexically (`..` removed). The converter cannot know either
//! directory, so `~` paths need `--home DIR` and relative paths `--workdir
//! DIR`; without them they are reported as not carried over. `~user/...` and
//! paths with glob characters (`*`, `?`, `[`) are never carried over:
//! aip-proxy expands neither, and an enforcer file rule is one literal file or
//! directory tree.
//!
//! The meaning changes on the way, and the output says so in a comment:
//! aip-proxy blocks tool calls whose *arguments* mention a protected path;
//! an enforcer `deny` file rule makes the kernel refuse every open of the file
//! (or of anything under the directory) by any process of the agent.
use std::{
    fmt,
    path::{Component, Path, PathBuf},
};

use super::{
    parse_str,
    tree::{self, Node, Value},
    types::*,
    validate::dns_label,
    PolicyError, PolicyErrors,
};

/// The AIP versions whose fields this converter knows.
pub const KNOWN_VERSIONS: [&str; 3] = ["aip.io/v1alpha1", "aip.io/v1alpha2", "aip.io/v1alpha3"];
/// The only AIP kind that is a policy.
pub const AIP_KIND: &str = "AgentPolicy";

/// Where `~/` and relative protected paths point on the agent's machine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportOptions {
    /// What `~` stands for (absolute).
    pub home: Option<PathBuf>,
    /// What relative paths are relative to (absolute).
    pub workdir: Option<PathBuf>,
}

/// Parse a `--home` / `--workdir` value: an absolute path, cleaned.
pub fn base_dir(s: &str) -> Result<PathBuf, String> {
    let p = Path::new(s);
    if !p.is_absolute() || s.contains('\0') {
        return Err(format!("{s:?} is not an absolute path"));
    }
    Ok(clean(p))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoteKind {
    /// An AIP field (or an element of one) that has no place in the result.
    NotCarried { field: String, why: String },
    /// Something the user should know about the result.
    Info(String),
}

/// A remark about the conversion, at a position of the AIP file (line 0:
/// about the file as a whole). Displayed as `{file}:{line}:{column}: not
/// carried over: {field} ({why})` or `{file}:{line}:{column}: note: {text}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub kind: NoteKind,
}

impl Note {
    /// The note without its location.
    pub fn text(&self) -> String {
        match &self.kind {
            NoteKind::NotCarried { field, why } => format!("not carried over: {field} ({why})"),
            NoteKind::Info(text) => format!("note: {text}"),
        }
    }
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        } else {
            write!(f, "{}: ", self.file.display())?;
        }
        f.write_str(&self.text())
    }
}

/// A converted manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversion {
    /// The enforcer policy. It passes [`parse_str`] (checked by [`convert_str`]).
    pub policy: AgentPolicy,
    /// `policy` as a YAML document, with comments on where it came from.
    pub yaml: String,
    /// In file order, then the notes about the result as a whole.
    pub notes: Vec<Note>,
}

impl Conversion {
    /// The fields reported as not carried over, in order.
    pub fn not_carried(&self) -> Vec<&str> {
        self.notes
            .iter()
            .filter_map(|n| match &n.kind {
                NoteKind::NotCarried { field, .. } => Some(field.as_str()),
                NoteKind::Info(_) => None,
            })
            .collect()
    }
}

/// Convert the AIP manifest `text` (one YAML document); `file` is only used
/// in messages. Errors (YAML syntax, not an AIP `AgentPolicy`, a missing or
/// malformed field that is carried over) name file, line, column and field.
pub fn convert_str(
    text: &str,
    file: &Path,
    opts: &ImportOptions,
) -> Result<Conversion, PolicyErrors> {
    let error = |line, column, message: String| PolicyError {
        file: file.to_owned(),
        line,
        column,
        field: String::new(),
        message,
    };
    let docs = tree::parse_documents(text)
        .map_err(|e| error(e.line, e.column, format!("invalid YAML: {}", e.message)))?;
    let doc = match docs.as_slice() {
        [] => return Err(error(1, 1, "no AIP AgentPolicy document in file".into()).into()),
        [doc] => doc,
        [_, second, ..] => {
            return Err(error(
                second.line,
                second.column,
                format!(
                    "expected one AIP AgentPolicy document, found {} (aip-proxy reads only \
                     the first): convert them one file at a time",
                    docs.len()
                ),
            )
            .into())
        }
    };
    let mut c = Converter {
        file,
        opts,
        errors: Vec::new(),
        notes: Vec::new(),
    };
    let draft = c.document(doc);
    let draft = match draft {
        Some(d) if c.errors.is_empty() => d,
        _ => {
            c.errors.sort_by_key(|e| (e.line, e.column));
            return Err(PolicyErrors(c.errors));
        }
    };
    c.notes.sort_by_key(|n| (n.line, n.column));
    c.notes.push(c.whole_file(
        "aip-proxy always protects its own policy file",
        "where it lives on the agent's machine is not known here: add a `files` rule \
         for it if the agent can reach it",
    ));
    let policy = AgentPolicy {
        api_version: API_VERSION.into(),
        kind: KIND.into(),
        metadata: Metadata {
            name: draft.name.clone(),
        },
        spec: Spec {
            mode: draft.mode,
            egress: Vec::new(),
            files: draft
                .files
                .iter()
                .map(|f| FileRule {
                    path: f.path.clone(),
                    access: FileAccess::Deny,
                })
                .collect(),
            ..Spec::default()
        },
    };
    let egress = match draft.mode {
        Mode::Enforce => "the converted policy denies ALL network egress (DNS included)",
        Mode::Audit => "the converted policy records all network egress as `audit`",
    };
    c.notes.push(c.info(format!(
        "spec.egress is empty: an AIP manifest says nothing about the network, so {egress}; \
         add egress rules for what the agent must reach"
    )));
    if !policy.spec.files.is_empty() {
        c.notes.push(c.info(format!(
            "spec.files needs BPF LSM ({}); on a kernel without it `enforcer run` and `enforcer \
             daemon` refuse this policy unless `--allow-degraded` (daemon: `allowDegraded: \
             true`), which runs its network part only",
            crate::kernel::LSM_REQUIREMENT
        )));
    }
    let yaml = render(&policy, &draft, file, &c.notes);
    // The output must be a valid enforcer policy, and mean exactly `policy`.
    match parse_str(&yaml, file) {
        Ok(p) if p.len() == 1 && p[0].policy == policy => {}
        Ok(_) => {
            return Err(error(
                0,
                0,
                "internal error: the converted policy reads back differently".into(),
            )
            .into())
        }
        Err(e) => {
            return Err(error(
                0,
                0,
                format!("internal error: the converted policy does not validate: {e}"),
            )
            .into())
        }
    }
    Ok(Conversion {
        policy,
        yaml,
        notes: c.notes,
    })
}

/// A protected path that became a file rule.
#[derive(Debug)]
struct CarriedPath {
    path: PathBuf,
    /// As written in the AIP manifest.
    from: String,
    index: usize,
}

#[derive(Debug)]
struct Draft {
    aip_name: String,
    api_version: String,
    name: String,
    mode: Mode,
    files: Vec<CarriedPath>,
}

/// The top-level fields of an AIP document.
const TOP: [&str; 4] = ["apiVersion", "kind", "metadata", "spec"];

/// AIP `metadata` fields other than `name`, and why they are dropped.
const METADATA_DROPPED: &[(&str, &str)] = &[
    (
        "version",
        "enforcer policies have no version; the audit log's policy_hash identifies each revision",
    ),
    ("owner", "enforcer policies have no owner field"),
    (
        "signature",
        "it signs the AIP document, not the converted policy; enforcer trusts a policy file by \
         where it is read from",
    ),
];

/// AIP `spec` fields other than `mode` and `protected_paths`, and why they are dropped.
const SPEC_DROPPED: &[(&str, &str)] = &[
    (
        "allowed_tools",
        "an allowlist of MCP tools: enforcer sees the agent's sockets and files, not MCP tool \
         calls; keep aip-proxy in front of the MCP server for it",
    ),
    (
        "denied_tools",
        "a denylist of MCP tools: enforcer sees the agent's sockets and files, not MCP tool calls",
    ),
    (
        "allowed_methods",
        "a filter of MCP JSON-RPC methods, which enforcer does not see",
    ),
    (
        "denied_methods",
        "a filter of MCP JSON-RPC methods, which enforcer does not see",
    ),
    (
        "tool_rules",
        "actions, argument patterns and rate limits of MCP tool calls, which enforcer does not \
         see; hosts that URL arguments are limited to are candidates for `egress` host rules",
    ),
    (
        "strict_args_default",
        "argument checking of MCP tool calls, which enforcer does not see",
    ),
    (
        "dlp",
        "it scans MCP requests and responses; enforcer does not read payloads, it limits where \
         data can go (narrow `egress` rules)",
    ),
    (
        "identity",
        "AIP identity tokens bind MCP sessions; an enforcer policy binds to a workload \
         (spec.identity.spiffeId, a Kubernetes service account, or a daemon binding): set it by hand",
    ),
    (
        "server",
        "aip-proxy's HTTP validation endpoint has no enforcer counterpart",
    ),
    (
        "registry",
        "the AIP agent registry has no enforcer counterpart",
    ),
    (
        "aat",
        "Agent Authentication Tokens authenticate MCP calls; enforcer has no counterpart",
    ),
];

const UNKNOWN: &str = "not a field of the AIP drafts this converter knows (v1alpha1..v1alpha3)";

type Entries = [(Node, Node)];

fn key_str(k: &Node) -> Option<&str> {
    match &k.value {
        Value::Str(s) => Some(s),
        _ => None,
    }
}

fn find<'n>(m: &'n Entries, key: &str) -> Option<(&'n Node, &'n Node)> {
    m.iter()
        .find(|(k, _)| key_str(k) == Some(key))
        .map(|(k, v)| (k, v))
}

fn join(parent: &str, key: &str) -> String {
    // Keys that are not plain identifiers are quoted, so that a note is one line.
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let key = if plain {
        key.to_owned()
    } else {
        format!("{key:?}")
    };
    if parent.is_empty() {
        key
    } else {
        format!("{parent}.{key}")
    }
}

struct Converter<'a> {
    file: &'a Path,
    opts: &'a ImportOptions,
    errors: Vec<PolicyError>,
    notes: Vec<Note>,
}

impl Converter<'_> {
    fn err(&mut self, at: &Node, field: &str, message: impl Into<String>) {
        self.errors.push(PolicyError {
            file: self.file.to_owned(),
            line: at.line,
            column: at.column,
            field: field.to_owned(),
            message: message.into(),
        });
    }

    fn note(&mut self, at: &Node, kind: NoteKind) {
        self.notes.push(Note {
            file: self.file.to_owned(),
            line: at.line,
            column: at.column,
            kind,
        });
    }

    fn dropped(&mut self, at: &Node, field: String, why: impl Into<String>) {
        let why = why.into();
        self.note(at, NoteKind::NotCarried { field, why });
    }

    fn info(&self, text: String) -> Note {
        Note {
            file: self.file.to_owned(),
            line: 0,
            column: 0,
            kind: NoteKind::Info(text),
        }
    }

    fn whole_file(&self, field: &str, why: &str) -> Note {
        Note {
            file: self.file.to_owned(),
            line: 0,
            column: 0,
            kind: NoteKind::NotCarried {
                field: field.into(),
                why: why.into(),
            },
        }
    }

    /// The entries of a mapping (null counts as an empty one).
    fn map<'n>(&mut self, node: &'n Node, field: &str) -> Option<&'n Entries> {
        match &node.value {
            Value::Map(m) => Some(m),
            Value::Null => Some(&[]),
            v => {
                let what = if field.is_empty() {
                    "an AIP AgentPolicy document (a mapping)".to_owned()
                } else {
                    "a mapping".to_owned()
                };
                let found = v.describe();
                self.err(node, field, format!("expected {what}, found {found}"));
                None
            }
        }
    }

    /// Field `key` of mapping `m`; reports it missing at `at` (the mapping's key, or the document).
    fn required<'n>(
        &mut self,
        m: &'n Entries,
        at: &Node,
        parent: &str,
        key: &str,
    ) -> Option<(&'n Node, &'n Node)> {
        let found = find(m, key);
        if found.is_none() {
            let field = join(parent, key);
            self.err(at, &field, format!("missing required field `{field}`"));
        }
        found
    }

    /// A required, non-empty string field.
    fn required_str<'n>(
        &mut self,
        m: &'n Entries,
        at: &Node,
        parent: &str,
        key: &str,
    ) -> Option<(&'n Node, &'n str)> {
        let (_, v) = self.required(m, at, parent, key)?;
        let field = join(parent, key);
        match &v.value {
            Value::Str(s) if !s.trim().is_empty() => Some((v, s)),
            Value::Str(_) | Value::Null => {
                self.err(v, &field, format!("`{field}` must not be empty"));
                None
            }
            other => {
                let found = other.describe();
                self.err(v, &field, format!("expected a string, found {found}"));
                None
            }
        }
    }

    /// Report the keys of `m` other than `handled` as not carried over.
    fn drop_rest(&mut self, m: &Entries, parent: &str, handled: &[&str], reasons: &[(&str, &str)]) {
        for (k, _) in m {
            let Some(key) = key_str(k) else {
                let field = format!("{parent} key {}", k.value.describe());
                self.dropped(k, field, UNKNOWN);
                continue;
            };
            if handled.contains(&key) {
                continue;
            }
            let why = reasons
                .iter()
                .find(|(f, _)| *f == key)
                .map_or(UNKNOWN, |(_, why)| why);
            self.dropped(k, join(parent, key), why);
        }
    }

    fn document(&mut self, doc: &Node) -> Option<Draft> {
        let top = self.map(doc, "")?;
        let api_version = self
            .required_str(top, doc, "", "apiVersion")
            .and_then(|(n, s)| self.api_version(n, s));
        if let Some((n, kind)) = self.required_str(top, doc, "", "kind") {
            if kind != AIP_KIND {
                self.err(
                    n,
                    "kind",
                    format!("unsupported kind {kind:?}: expected {AIP_KIND}"),
                );
            }
        }
        let names = self
            .required(top, doc, "", "metadata")
            .and_then(|(k, v)| self.metadata(k, v));
        let spec = self
            .required(top, doc, "", "spec")
            .and_then(|(_, v)| self.spec(v));
        self.drop_rest(top, "", &TOP, &[]);
        let (aip_name, name) = names?;
        let (mode, files) = spec?;
        Some(Draft {
            aip_name,
            api_version: api_version?,
            name,
            mode,
            files,
        })
    }

    fn api_version(&mut self, at: &Node, s: &str) -> Option<String> {
        let alpha = s.strip_prefix("aip.io/v1alpha").is_some_and(|n| {
            !n.is_empty() && !n.starts_with('0') && n.bytes().all(|b| b.is_ascii_digit())
        });
        if s == API_VERSION {
            self.err(
                at,
                "apiVersion",
                format!(
                    "{s:?} is already an enforcer policy (check it with `enforcer policy check`)"
                ),
            );
            return None;
        }
        if !alpha {
            self.err(
                at,
                "apiVersion",
                format!(
                    "unsupported apiVersion {s:?}: expected an AIP draft version, aip.io/v1alpha* \
                     ({})",
                    KNOWN_VERSIONS.join(", ")
                ),
            );
            return None;
        }
        if !KNOWN_VERSIONS.contains(&s) {
            self.note(
                at,
                NoteKind::Info(format!(
                    "apiVersion {s:?} is newer than the AIP drafts this converter knows \
                     ({}): fields it does not know are listed as not carried over",
                    KNOWN_VERSIONS.join(", ")
                )),
            );
        }
        Some(s.to_owned())
    }

    /// (name in the AIP manifest, enforcer policy name).
    fn metadata(&mut self, key: &Node, node: &Node) -> Option<(String, String)> {
        let m = self.map(node, "metadata")?;
        let name = self.required_str(m, key, "metadata", "name");
        self.drop_rest(m, "metadata", &["name"], METADATA_DROPPED);
        let (at, aip_name) = name?;
        let mut name = sanitize_name(aip_name);
        if name.is_empty() {
            name = "aip-policy".into();
        }
        if name != aip_name {
            self.note(
                at,
                NoteKind::Info(format!(
                    "metadata.name {aip_name:?} is not an RFC 1123 DNS label (lower-case \
                     letters, digits and '-', at most 63 characters): the policy is named {name:?}"
                )),
            );
        }
        Some((aip_name.to_owned(), name))
    }

    fn spec(&mut self, node: &Node) -> Option<(Mode, Vec<CarriedPath>)> {
        let m = self.map(node, "spec")?;
        let mode = match find(m, "mode") {
            Some((_, v)) => self.mode(v),
            None => Some(Mode::Enforce),
        };
        let files = match find(m, "protected_paths") {
            Some((_, v)) => self.protected_paths(v),
            None => Some(Vec::new()),
        };
        self.drop_rest(m, "spec", &["mode", "protected_paths"], SPEC_DROPPED);
        Some((mode?, files?))
    }

    fn mode(&mut self, node: &Node) -> Option<Mode> {
        let s = match &node.value {
            Value::Null => return Some(Mode::Enforce),
            Value::Str(s) => s,
            other => {
                let found = other.describe();
                self.err(
                    node,
                    "spec.mode",
                    format!("expected enforce or monitor, found {found}"),
                );
                return None;
            }
        };
        // aip-proxy trims and lower-cases the mode; empty means enforce.
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "enforce" => Some(Mode::Enforce),
            "monitor" => {
                self.note(
                    node,
                    NoteKind::Info(
                        "spec.mode: monitor becomes `audit`: would-be denials are allowed and \
                         recorded with verdict `audit`"
                            .into(),
                    ),
                );
                Some(Mode::Audit)
            }
            _ => {
                self.err(
                    node,
                    "spec.mode",
                    format!("invalid mode {s:?}: expected enforce or monitor"),
                );
                None
            }
        }
    }

    fn protected_paths(&mut self, node: &Node) -> Option<Vec<CarriedPath>> {
        let items = match &node.value {
            Value::Null => return Some(Vec::new()),
            Value::Seq(items) => items,
            other => {
                let found = other.describe();
                self.err(
                    node,
                    "spec.protected_paths",
                    format!("expected a list of paths, found {found}"),
                );
                return None;
            }
        };
        let before = self.errors.len();
        let mut out: Vec<CarriedPath> = Vec::new();
        for (index, item) in items.iter().enumerate() {
            let field = format!("spec.protected_paths[{index}]");
            let Value::Str(s) = &item.value else {
                let found = item.value.describe();
                self.err(item, &field, format!("expected a path, found {found}"));
                continue;
            };
            match map_path(s, self.opts) {
                Err(why) => self.dropped(item, format!("{field} {s:?}"), why),
                Ok(path) => {
                    if let Some(first) = out.iter().find(|c| c.path == path) {
                        let text = format!(
                            "{field} {s:?} names the same path as spec.protected_paths[{}] \
                             ({:?}): one file rule",
                            first.index,
                            path.display().to_string()
                        );
                        self.note(item, NoteKind::Info(text));
                    } else {
                        out.push(CarriedPath {
                            path,
                            from: s.clone(),
                            index,
                        });
                    }
                }
            }
        }
        (self.errors.len() == before).then_some(out)
    }
}

/// Where a protected path points on the agent's machine, or why that is not known.
fn map_path(s: &str, opts: &ImportOptions) -> Result<PathBuf, String> {
    if s.contains('\0') {
        return Err("it contains a NUL byte".into());
    }
    if s.contains(['*', '?', '[']) {
        return Err(
            "it has glob characters: aip-proxy matches them literally and an enforcer \
                    file rule is one literal file or directory tree; list what it should cover"
                .into(),
        );
    }
    let path = if s == "~" || s.starts_with("~/") {
        let Some(home) = &opts.home else {
            return Err(
                "`~` is the home directory of the user aip-proxy runs as, which is not \
                        known here; pass --home DIR (e.g. --home /home/agent)"
                    .into(),
            );
        };
        home.join(s[1..].trim_start_matches('/'))
    } else if s.starts_with('~') {
        return Err("`~user` is not expanded by aip-proxy; write the absolute path".into());
    } else if Path::new(s).is_absolute() {
        PathBuf::from(s)
    } else {
        let Some(workdir) = &opts.workdir else {
            return Err(
                "a relative path is resolved against aip-proxy's working directory, \
                        which is not known here; pass --workdir DIR or write an absolute path"
                    .into(),
            );
        };
        workdir.join(s)
    };
    Ok(clean(&path))
}

/// Lexical cleaning of an absolute path, like Go's `filepath.Clean` (which
/// aip-proxy applies): no `.`, no `..`, no repeated or trailing `/`.
fn clean(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(x) => out.push(x),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// An RFC 1123 label made from `s`: lower-cased, every run of other
/// characters replaced by one '-', at most 63 bytes. Empty if `s` has no
/// ASCII letter or digit.
fn sanitize_name(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    out.truncate(63);
    let out = out.trim_end_matches('-').to_owned();
    debug_assert!(out.is_empty() || dns_label(&out, "name").is_ok());
    out
}

/// A YAML double-quoted scalar.
pub(super) fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() || matches!(c, '\u{feff}' | '\u{2028}' | '\u{2029}') => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// One line of a YAML comment (control characters blanked).
pub(super) fn comment(s: &str) -> String {
    // YAML breaks lines at \n, \r, U+0085, U+2028 and U+2029.
    s.chars()
        .map(|c| {
            if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}') {
                ' '
            } else {
                c
            }
        })
        .collect()
}

fn render(policy: &AgentPolicy, draft: &Draft, file: &Path, notes: &[Note]) -> String {
    let mut y = String::new();
    let mut c = |s: &str| {
        y.push_str(&comment(s));
        y.push('\n');
    };
    c(&format!(
        "# Converted by `enforcer policy import-aip` from the AIP AgentPolicy {:?}",
        draft.aip_name
    ));
    c(&format!(
        "# ({}, {}). Review it before use:",
        quoted(&file.display().to_string()),
        draft.api_version
    ));
    for n in notes {
        let at = if n.line > 0 {
            format!("line {}: ", n.line)
        } else {
            String::new()
        };
        c(&format!("#   - {at}{}", n.text()));
    }
    if !draft.files.is_empty() {
        c("# AIP protected paths became `deny` file rules: aip-proxy blocks MCP tool calls");
        c("# whose arguments name them; enforcer denies every open of them (or of anything");
        c("# under a directory) by any process of the agent, whatever it goes through.");
    }
    let mode = match policy.spec.mode {
        Mode::Enforce => "enforce",
        Mode::Audit => "audit",
    };
    y.push_str(&format!(
        "apiVersion: {API_VERSION}\nkind: {KIND}\nmetadata:\n  name: {}\nspec:\n  mode: {mode}\n",
        policy.metadata.name
    ));
    y.push_str(
        "  # AIP says nothing about the network: without rules, all egress is denied\n  \
         # (recorded, in audit mode). Add the destinations the agent needs.\n  egress: []\n",
    );
    if !draft.files.is_empty() {
        y.push_str("  files:\n");
        for f in &draft.files {
            y.push_str(&comment(&format!(
                "    # spec.protected_paths[{}]: {:?}",
                f.index, f.from
            )));
            y.push_str(&format!(
                "\n    - path: {}\n      access: deny\n",
                quoted(&f.path.display().to_string())
            ));
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    const REALISTIC: &str = include_str!("testdata/aip/realistic.yaml");
    const MONITOR: &str = include_str!("testdata/aip/monitor.yaml");
    const BAD_API_VERSION: &str = include_str!("testdata/aip/bad-api-version.yaml");
    const MISSING_FIELDS: &str = include_str!("testdata/aip/missing-fields.yaml");
    const TILDE: &str = include_str!("testdata/aip/tilde.yaml");

    fn home(dir: &str) -> ImportOptions {
        ImportOptions {
            home: Some(dir.into()),
            workdir: None,
        }
    }

    fn convert(text: &str, opts: &ImportOptions) -> Conversion {
        convert_str(text, Path::new("agent.yaml"), opts)
            .unwrap_or_else(|e| panic!("unexpected errors:\n{e}"))
    }

    fn errors(text: &str) -> Vec<PolicyError> {
        match convert_str(text, Path::new("agent.yaml"), &ImportOptions::default()) {
            Ok(c) => panic!("expected errors, converted:\n{}", c.yaml),
            Err(PolicyErrors(e)) => e,
        }
    }

    fn files(c: &Conversion) -> Vec<&str> {
        c.policy
            .spec
            .files
            .iter()
            .map(|f| {
                assert_eq!(f.access, FileAccess::Deny);
                f.path.to_str().unwrap()
            })
            .collect()
    }

    fn note_lines(c: &Conversion) -> Vec<String> {
        c.notes.iter().map(|n| n.to_string()).collect()
    }

    /// The output is a valid enforcer policy that reads back as `c.policy`.
    fn assert_round_trip(c: &Conversion) {
        let back = parse_str(&c.yaml, Path::new("out.yaml"))
            .unwrap_or_else(|e| panic!("output does not validate:\n{e}\n{}", c.yaml));
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].policy, c.policy, "{}", c.yaml);
    }

    #[test]
    fn aip_realistic_manifest() {
        let c = convert(REALISTIC, &home("/home/agent"));
        assert_eq!(c.policy.api_version, API_VERSION);
        assert_eq!(c.policy.metadata.name, "repo-assistant");
        assert_eq!(c.policy.spec.mode, Mode::Enforce);
        assert!(c.policy.spec.egress.is_empty());
        assert_eq!(
            files(&c),
            [
                "/home/agent/.ssh",
                "/home/agent/.aws/credentials",
                "/etc/agent/secrets",
                "/var/run/docker.sock",
            ]
        );
        assert_round_trip(&c);
    }

    #[test]
    fn aip_not_carried_over_list() {
        let c = convert(REALISTIC, &home("/home/agent"));
        assert_eq!(
            c.not_carried(),
            [
                "metadata.version",
                "metadata.owner",
                "metadata.signature",
                "spec.allowed_tools",
                "spec.allowed_methods",
                "spec.denied_methods",
                "spec.strict_args_default",
                "spec.tool_rules",
                "spec.protected_paths[4] \".env\"",
                "spec.protected_paths[5] \"/srv/keys/*.pem\"",
                "spec.dlp",
                "spec.identity",
                "spec.server",
                "aip-proxy always protects its own policy file",
            ]
        );
        let lines = note_lines(&c);
        // One line each, located, with the reason.
        assert!(lines.contains(
            &"agent.yaml:12:3: not carried over: spec.allowed_tools (an allowlist of MCP \
              tools: enforcer sees the agent's sockets and files, not MCP tool calls; keep \
              aip-proxy in front of the MCP server for it)"
                .to_owned()
        ));
        assert!(lines.iter().all(|l| !l.contains('\n')));
        assert!(lines.iter().any(|l| l.contains("--workdir")), "{lines:#?}");
        // The egress note and the BPF LSM note of the file rules.
        assert!(lines
            .iter()
            .any(|l| l.starts_with("agent.yaml: note: spec.egress is empty")
                && l.contains("denies ALL network egress")));
        assert!(lines.iter().any(|l| l.contains("spec.files needs BPF LSM")));
        // The notes are also in the output, as comments.
        assert!(c
            .yaml
            .contains("#   - line 12: not carried over: spec.allowed_tools"));
    }

    #[test]
    fn aip_monitor_becomes_audit() {
        let c = convert(MONITOR, &ImportOptions::default());
        assert_eq!(c.policy.metadata.name, "research-agent-dry-run");
        assert_eq!(c.policy.spec.mode, Mode::Audit);
        assert!(c.yaml.contains("\n  mode: audit\n"));
        // `..` is cleaned away as aip-proxy does; the repeated path is one rule.
        assert_eq!(files(&c), ["/home/agent/.ssh", "/home/agent/.netrc"]);
        let lines = note_lines(&c);
        assert!(lines
            .iter()
            .any(|l| l.starts_with("agent.yaml:7:9: note: spec.mode: monitor becomes `audit`")));
        assert!(lines
            .iter()
            .any(|l| l.starts_with("agent.yaml:12:7: note: spec.protected_paths[2] \"/home/agent/.ssh\" names the same path as spec.protected_paths[0]")));
        assert!(lines
            .iter()
            .any(|l| l.contains("records all network egress")));
        assert_eq!(
            c.not_carried(),
            [
                "spec.allowed_tools",
                "aip-proxy always protects its own policy file"
            ]
        );
        assert_round_trip(&c);
    }

    #[test]
    fn aip_mode_values() {
        let doc = |mode: &str| {
            format!(
                "apiVersion: aip.io/v1alpha1\nkind: AgentPolicy\nmetadata: {{name: a}}\nspec:\n  mode: {mode}\n"
            )
        };
        let opts = ImportOptions::default();
        assert_eq!(
            convert(&doc("enforce"), &opts).policy.spec.mode,
            Mode::Enforce
        );
        assert_eq!(
            convert(&doc("\" ENFORCE \""), &opts).policy.spec.mode,
            Mode::Enforce
        );
        assert_eq!(convert(&doc("\"\""), &opts).policy.spec.mode, Mode::Enforce);
        assert_eq!(convert(&doc("~"), &opts).policy.spec.mode, Mode::Enforce);
        assert_eq!(
            convert(&doc("MONITOR"), &opts).policy.spec.mode,
            Mode::Audit
        );
        let e = errors(&doc("audit"));
        assert_eq!(e.len(), 1);
        assert_eq!(
            e[0].to_string(),
            "agent.yaml:5:9: spec.mode: invalid mode \"audit\": expected enforce or monitor"
        );
    }

    #[test]
    fn aip_unknown_api_version_is_an_error() {
        let e = errors(BAD_API_VERSION);
        assert_eq!(e.len(), 1, "{}", PolicyErrors(e.clone()));
        assert_eq!(
            e[0].to_string(),
            "agent.yaml:1:13: apiVersion: unsupported apiVersion \"aip.io/v1beta1\": expected an \
             AIP draft version, aip.io/v1alpha* (aip.io/v1alpha1, aip.io/v1alpha2, aip.io/v1alpha3)"
        );
        for v in [
            "aip.io/v1alpha",
            "aip.io/v1alpha0",
            "aip.io/v1",
            "v1alpha1",
            "aip.io/v1alpha1x",
        ] {
            let text = BAD_API_VERSION.replace("aip.io/v1beta1", v);
            assert!(
                errors(&text)[0].message.contains("unsupported apiVersion"),
                "{v}"
            );
        }
        let enforcer = BAD_API_VERSION.replace("aip.io/v1beta1", API_VERSION);
        assert!(errors(&enforcer)[0]
            .message
            .contains("already an enforcer policy"));
    }

    #[test]
    fn aip_newer_alpha_is_converted_with_a_note() {
        let text = BAD_API_VERSION.replace("aip.io/v1beta1", "aip.io/v1alpha12");
        let c = convert(&text, &ImportOptions::default());
        assert!(note_lines(&c)[0].starts_with(
            "agent.yaml:1:13: note: apiVersion \"aip.io/v1alpha12\" is newer than the AIP drafts"
        ));
        assert_round_trip(&c);
    }

    #[test]
    fn aip_missing_and_malformed_fields() {
        let e: Vec<String> = errors(MISSING_FIELDS)
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(
            e,
            [
                "agent.yaml:1:1: kind: missing required field `kind`",
                "agent.yaml:2:1: metadata.name: missing required field `metadata.name`",
                "agent.yaml:5:9: spec.mode: invalid mode \"block\": expected enforce or monitor",
                "agent.yaml:6:20: spec.protected_paths: expected a list of paths, found string \"~/.ssh\"",
            ]
        );
        let e = errors("apiVersion: aip.io/v1alpha1\nkind: AgentPolicy\n");
        let e: Vec<String> = e.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            e,
            [
                "agent.yaml:1:1: metadata: missing required field `metadata`",
                "agent.yaml:1:1: spec: missing required field `spec`",
            ]
        );
        let e = errors(
            "apiVersion: aip.io/v1alpha1\nkind: AgentManifest\nmetadata:\n  name: \"\"\nspec:\n  protected_paths: [/a, 7]\n",
        );
        let e: Vec<String> = e.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            e,
            [
                "agent.yaml:2:7: kind: unsupported kind \"AgentManifest\": expected AgentPolicy",
                "agent.yaml:4:9: metadata.name: `metadata.name` must not be empty",
                "agent.yaml:6:25: spec.protected_paths[1]: expected a path, found integer `7`",
            ]
        );
    }

    #[test]
    fn aip_not_a_manifest() {
        let e = errors("- a\n- b\n");
        assert!(
            e[0].message
                .contains("expected an AIP AgentPolicy document"),
            "{e:?}"
        );
        let e = errors("a: [\n");
        assert!(e[0].message.starts_with("invalid YAML"), "{e:?}");
        let e = errors("");
        assert_eq!(e[0].message, "no AIP AgentPolicy document in file");
        let two = format!("{MONITOR}---\n{MONITOR}");
        let e = errors(&two);
        assert_eq!((e[0].line, e.len()), (15, 1), "{e:?}");
        assert!(e[0]
            .message
            .contains("expected one AIP AgentPolicy document, found 2"));
    }

    #[test]
    fn aip_tilde_paths_need_home() {
        let c = convert(TILDE, &ImportOptions::default());
        assert_eq!(files(&c), ["/opt/app/credentials.json"]);
        let lines = note_lines(&c);
        for (line, path, why) in [
            (7, "[0] \"~\"", "pass --home DIR (e.g. --home /home/agent)"),
            (8, "[1] \"~/.ssh/\"", "pass --home DIR"),
            (
                9,
                "[2] \"~bob/.ssh\"",
                "`~user` is not expanded by aip-proxy",
            ),
            (10, "[3] \".env\"", "pass --workdir DIR"),
            (11, "[4] \"./config/../secrets\"", "pass --workdir DIR"),
        ] {
            let start =
                format!("agent.yaml:{line}:7: not carried over: spec.protected_paths{path} (");
            assert!(
                lines
                    .iter()
                    .any(|l| l.starts_with(&start) && l.contains(why)),
                "{start} {why}\n{lines:#?}"
            );
        }
        assert_round_trip(&c);
    }

    #[test]
    fn aip_tilde_paths_with_home_and_workdir() {
        let opts = ImportOptions {
            home: Some(base_dir("/home/agent/").unwrap()),
            workdir: Some(base_dir("/srv/app").unwrap()),
        };
        let c = convert(TILDE, &opts);
        assert_eq!(
            files(&c),
            [
                "/home/agent",
                "/home/agent/.ssh",
                "/srv/app/.env",
                "/srv/app/secrets",
                "/opt/app/credentials.json",
            ]
        );
        assert_eq!(
            c.not_carried(),
            [
                "spec.protected_paths[2] \"~bob/.ssh\"",
                "spec.registry",
                "spec.aat",
                "spec.x_vendor_extension",
                "aip-proxy always protects its own policy file",
            ]
        );
        assert!(note_lines(&c).contains(
            &"agent.yaml:18:3: not carried over: spec.x_vendor_extension (not a field of the AIP \
              drafts this converter knows (v1alpha1..v1alpha3))"
                .to_owned()
        ));
        assert_round_trip(&c);
    }

    #[test]
    fn aip_name_is_made_a_dns_label() {
        let c = convert(TILDE, &ImportOptions::default());
        assert_eq!(c.policy.metadata.name, "tilde-agent-v3");
        assert!(note_lines(&c).contains(
            &"agent.yaml:4:9: note: metadata.name \"Tilde Agent (v3)\" is not an RFC 1123 DNS \
              label (lower-case letters, digits and '-', at most 63 characters): the policy is \
              named \"tilde-agent-v3\""
                .to_owned()
        ));
        assert_eq!(sanitize_name("--A__b--"), "a-b");
        assert_eq!(sanitize_name("été"), "t");
        assert_eq!(sanitize_name("%%%"), "");
        let long = "x".repeat(62) + "-yz";
        assert_eq!(sanitize_name(&long), "x".repeat(62));
        let odd = MONITOR.replace("research-agent-dry-run", "\"***\"");
        assert_eq!(
            convert(&odd, &ImportOptions::default())
                .policy
                .metadata
                .name,
            "aip-policy"
        );
    }

    #[test]
    fn aip_odd_paths_round_trip() {
        let text = "apiVersion: aip.io/v1alpha1\nkind: AgentPolicy\nmetadata: {name: odd}\n\
                    spec:\n  protected_paths:\n    - \"/tmp/q\\\"uo te\\\\d\\t#x: y\\u007f\\u0085\"\n    \
                    - \"/a/./b//c/../../../..\"\n    - \"/nul\\0byte\"\n";
        let c = convert(text, &ImportOptions::default());
        assert_eq!(files(&c), ["/tmp/q\"uo te\\d\t#x: y\u{7f}\u{85}", "/"]);
        assert_eq!(
            c.not_carried()[0],
            "spec.protected_paths[2] \"/nul\\0byte\""
        );
        assert!(c
            .yaml
            .lines()
            .all(|l| !l.contains('\u{85}') || !l.starts_with('#')));
        assert_round_trip(&c);
    }

    #[test]
    fn aip_no_protected_paths() {
        let c = convert(
            "apiVersion: aip.io/v1alpha1\nkind: AgentPolicy\nmetadata: {name: bare}\nspec:\n",
            &ImportOptions::default(),
        );
        assert!(c.policy.spec.files.is_empty());
        assert!(!c.yaml.contains("files:"));
        // No file rules: nothing this release refuses.
        assert!(!note_lines(&c).iter().any(|l| l.contains("refuse")));
        assert_round_trip(&c);
    }

    #[test]
    fn aip_base_dir() {
        assert_eq!(base_dir("/home/a/../b/").unwrap(), Path::new("/home/b"));
        assert!(base_dir("home/agent").is_err());
        assert!(base_dir("~").is_err());
    }
}
