//! Policy files: parsing, validation and compilation of `AgentPolicy`
//! documents (`enforcer.dev/v1alpha1`, DESIGN.md section 5).
//!
//! Pipeline: YAML text -> [`tree`] (nodes with line/column) -> [`validate`]
//! (schema check, every error collected, typed [`AgentPolicy`]) ->
//! [`check_supported`] (cross-section checks) -> [`compile`]
//! (per-prefix LPM entries for the kernel tables; `host:` rules and `dns:`
//! are compiled for the DNS proxy by `crate::dns::compile_dns`).
//!
//! # Why `serde-saphyr`
//!
//! `serde_yaml` 0.9 is deprecated and unmaintained. `serde-saphyr` is a
//! maintained serde front end to a YAML 1.2 parser (`granit-parser`, a saphyr
//! fork) whose errors carry a line and column, and, crucially, it offers
//! `Spanned<T>`: any deserialized value can come with the location of the YAML
//! node it was read from. That is what lets *semantic* errors (a CIDR with
//! host bits, `ports: ["90-80"]`, a duplicate policy name) point at
//! `file:line:column` just like syntax errors do. It also refuses duplicate
//! mapping keys by default and bounds alias expansion (billion laughs).
//! `saphyr`/`yaml-rust2` would give markers too, but only through their own
//! node types, without serde.
//!
//! We deserialize each document into a spanned node tree rather than straight
//! into `#[serde(deny_unknown_fields)]` structs: serde stops at the first
//! error of a document, while walking the tree lets [`validate`] report every
//! unknown field and every bad value of a file in one run, each with its exact
//! field path (`spec.egress[1].cidr`). The YAML itself is only ever parsed by
//! the library.
pub mod aip;
pub mod compile;
pub mod learn;
pub mod local;
mod tree;
pub mod types;
mod validate;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};

// The API used by the daemon and the CLI (`enforcer policy check`).
#[allow(unused_imports)]
pub use compile::{compile, CompiledPolicy};
pub use types::*;

/// Source location (line, column; 1-based) of each field of a policy, keyed
/// by field path as used in error messages (`spec.egress[0].cidr`).
pub type FieldSpans = BTreeMap<String, (usize, usize)>;

/// One policy document, validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadedPolicy {
    pub policy: AgentPolicy,
    /// File the document came from (as given to the loader).
    pub source: PathBuf,
    /// Line where the document's content starts (1-based).
    pub line: usize,
    /// SHA-256 (hex) of the canonical JSON of `policy` (`serde_json::to_vec`).
    pub hash: String,
    /// Where each field was written, for errors found after parsing
    /// ([`check_supported`], [`compile`]). Empty for policies built in code.
    pub spans: FieldSpans,
}

impl LoadedPolicy {
    /// Wrap a policy built in code (no source file): computes the hash.
    pub fn from_policy(policy: AgentPolicy, source: impl Into<PathBuf>) -> Self {
        let hash = policy_hash(&policy);
        Self {
            policy,
            source: source.into(),
            line: 0,
            hash,
            spans: FieldSpans::new(),
        }
    }

    /// Location of `field` (or of its nearest recorded parent), else the document start.
    pub fn span(&self, field: &str) -> (usize, usize) {
        let mut f = field;
        loop {
            if let Some(&s) = self.spans.get(f) {
                return s;
            }
            match f.rfind(['.', '[']) {
                Some(i) => f = &f[..i],
                None => return (self.line, 1),
            }
        }
    }

    /// An error about `field` of this policy, located where it was written.
    /// Where the policy's file part (`files:`, else `onTaint:`) starts, or
    /// `None` when it has none: what needs BPF LSM (and, for pods, per-pod
    /// path resolution).
    pub fn file_policy_span(&self) -> Option<(usize, usize)> {
        let spec = &self.policy.spec;
        if !spec.files.is_empty() {
            Some(self.span("spec.files"))
        } else if spec.on_taint.is_some() {
            Some(self.span("spec.onTaint"))
        } else {
            None
        }
    }

    /// Drop the file part (`files:`, `onTaint:`): the network part of a
    /// policy run degraded.
    pub fn strip_file_policy(&mut self) {
        self.policy.spec.files.clear();
        self.policy.spec.on_taint = None;
    }

    pub fn error(&self, field: &str, message: impl Into<String>) -> PolicyError {
        let (line, column) = self.span(field);
        PolicyError {
            file: self.source.clone(),
            line,
            column,
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

/// SHA-256 hex of `serde_json::to_vec(policy)`.
pub fn policy_hash(policy: &AgentPolicy) -> String {
    let json = serde_json::to_vec(policy).expect("AgentPolicy serializes to JSON");
    hex::encode(Sha256::digest(&json))
}

/// A problem in a policy file, at a position, about a field.
/// Displayed as `{file}:{line}:{column}: {field}: {message}` (the field part
/// is left out for whole-file problems such as YAML syntax errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem has no position (e.g. unreadable file).
    pub line: usize,
    pub column: usize,
    /// Field path such as `spec.egress[1].cidr`; empty for whole-file problems.
    pub field: String,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for PolicyError {}

/// All problems found (at least one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

impl From<PolicyError> for PolicyErrors {
    fn from(e: PolicyError) -> Self {
        PolicyErrors(vec![e])
    }
}

/// Parse and validate every document of `text`; `file` is only used in
/// error messages and `LoadedPolicy::source`. Names must be unique among
/// the documents.
pub fn parse_str(text: &str, file: &Path) -> Result<Vec<LoadedPolicy>, PolicyErrors> {
    let docs = tree::parse_documents(text).map_err(|e| PolicyError {
        file: file.to_owned(),
        line: e.line,
        column: e.column,
        field: String::new(),
        message: format!("invalid YAML: {}", e.message),
    })?;
    let mut errors = Vec::new();
    let mut out = Vec::new();
    for doc in &docs {
        let mut v = validate::Validator::new(file);
        let policy = v.document(doc);
        errors.append(&mut v.errors);
        if let Some(policy) = policy {
            let hash = policy_hash(&policy);
            out.push(LoadedPolicy {
                policy,
                source: file.to_owned(),
                line: doc.line,
                hash,
                spans: v.spans,
            });
        }
    }
    if docs.is_empty() {
        errors.push(PolicyError {
            file: file.to_owned(),
            line: 1,
            column: 1,
            field: String::new(),
            message: "no policy document in file".into(),
        });
    }
    errors.extend(duplicate_names(&out));
    if errors.is_empty() {
        Ok(out)
    } else {
        errors.sort_by_key(|e| (e.line, e.column));
        Err(PolicyErrors(errors))
    }
}

/// Errors for every policy whose name was already used by an earlier one.
fn duplicate_names(policies: &[LoadedPolicy]) -> Vec<PolicyError> {
    let mut first: HashMap<&str, &LoadedPolicy> = HashMap::new();
    let mut errors = Vec::new();
    for p in policies {
        let name = p.policy.metadata.name.as_str();
        if let Some(prev) = first.get(name) {
            let (l, c) = prev.span("metadata.name");
            errors.push(p.error(
                "metadata.name",
                format!(
                    "duplicate policy name {name:?}: already defined at {}:{l}:{c}",
                    prev.source.display()
                ),
            ));
        } else {
            first.insert(name, p);
        }
    }
    errors
}

/// Load policy files; a directory stands for all `*.yaml`/`*.yml` files
/// directly inside it, in name order. Every error of every file is
/// reported; names must be unique across all of them.
pub fn load_files(paths: &[PathBuf]) -> Result<Vec<LoadedPolicy>, PolicyErrors> {
    let mut errors = Vec::new();
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            match std::fs::read_dir(path) {
                Ok(rd) => {
                    let mut found: Vec<PathBuf> = rd
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| {
                            p.is_file()
                                && matches!(
                                    p.extension().and_then(|x| x.to_str()),
                                    Some("yaml" | "yml")
                                )
                        })
                        .collect();
                    found.sort();
                    files.extend(found);
                }
                Err(e) => errors.push(io_error(path, &e)),
            }
        } else {
            files.push(path.clone());
        }
    }
    let mut out = Vec::new();
    for file in &files {
        match std::fs::read_to_string(file) {
            Ok(text) => match parse_str(&text, file) {
                Ok(mut ps) => out.append(&mut ps),
                Err(PolicyErrors(mut es)) => errors.append(&mut es),
            },
            Err(e) => errors.push(io_error(file, &e)),
        }
    }
    // Within one file parse_str already checked; this adds cross-file clashes.
    let clashes: Vec<PolicyError> = duplicate_names(&out)
        .into_iter()
        .filter(|e| !errors.contains(e))
        .collect();
    errors.extend(clashes);
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(PolicyErrors(errors))
    }
}

fn io_error(path: &Path, e: &std::io::Error) -> PolicyError {
    PolicyError {
        file: path.to_owned(),
        line: 0,
        column: 0,
        field: String::new(),
        message: format!("cannot read: {e}"),
    }
}

/// Checks across sections that the schema alone cannot make (a file path
/// listed twice). An `onTaint` without any `access: taint` file is valid
/// and inert. Whether the kernel can enforce `files:` (BPF LSM) is decided
/// by `run`/`daemon` at start, not here.
pub fn check_supported(p: &LoadedPolicy) -> Result<(), PolicyErrors> {
    let mut errors = Vec::new();
    let spec = &p.policy.spec;
    let mut seen: HashMap<&Path, usize> = HashMap::new();
    for (i, f) in spec.files.iter().enumerate() {
        if let Some(first) = seen.insert(f.path.as_path(), i) {
            errors.push(p.error(
                &format!("spec.files[{i}].path"),
                format!(
                    "{} is already listed as spec.files[{first}]",
                    f.path.display()
                ),
            ));
        }
    }
    // spec.local again (a CRD object did not pass the YAML validator), and
    // duplicates.
    let resolvers = local::default_resolver_sockets();
    let mut seen_local: HashMap<(Option<&Path>, Option<&str>), usize> = HashMap::new();
    for (i, r) in spec.local.iter().enumerate() {
        if let Err((field, m)) = local::check_rule(r, &resolvers) {
            let f = if field.is_empty() {
                format!("spec.local[{i}]")
            } else {
                format!("spec.local[{i}].{field}")
            };
            errors.push(p.error(&f, m));
            continue;
        }
        let key = (r.path.as_deref(), r.abstract_name.as_deref());
        if let Some(first) = seen_local.insert(key, i) {
            errors.push(p.error(
                &format!("spec.local[{i}]"),
                format!("the same socket is already listed as spec.local[{first}]"),
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        errors.sort_by_key(|e| (e.line, e.column));
        Err(PolicyErrors(errors))
    }
}

/// Names of the rule ids with a fixed meaning (`None` for policy rules).
pub fn rule_name(rule_id: u32) -> Option<&'static str> {
    use enforcer_common::rule;
    match rule_id {
        rule::DEFAULT_DENY => Some("default-deny"),
        rule::NO_POLICY => Some("no-policy"),
        rule::RAW_SOCKET => Some("raw-socket"),
        rule::SOCKET_FAMILY => Some("socket-family"),
        rule::SOCKET_OK => Some("socket-ok"),
        rule::SOCKET_PROTOCOL => Some("socket-protocol"),
        rule::FILE_DEPTH => Some("file-depth"),
        rule::FILE_NO_OFFSETS => Some("file-no-btf-offsets"),
        rule::IP_OPTIONS => Some("ip-options"),
        rule::TAINT_CLAMP => Some("taint-clamp"),
        rule::FOREIGN_SOCKET => Some("foreign-socket"),
        rule::BIND_DEVICE => Some("bind-device"),
        rule::UNIX_RESOLVER => Some("resolver-ipc"),
        rule::UNIX_UNREADABLE => Some("unix-address-unreadable"),
        rule::UNIX_SAME_IDENTITY => Some("unix-same-identity"),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
