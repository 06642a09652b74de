//! `spec.local`: the unix sockets an agent may connect or send to.
//!
//! A rule names a socket by the address the agent will write: `path:` (an
//! absolute, normalized file-system path, matched as a string by the
//! cgroup hooks) or `abstract:` (an abstract-namespace name, without its
//! leading NUL). Everything else is refused; the resolver IPC sockets
//! ([`DEFAULT_RESOLVER_SOCKETS`], or the list the operator configured) are
//! refused with their own rule, and listing one is an error.
use std::path::{Component, Path, PathBuf};

use enforcer_common::{unix_kind, UnixKey, UNIX_NAME_MAX};

use super::LocalRule;

/// Unix sockets through which a local resolver answers names for its
/// clients (systemd-resolved's varlink API, nscd): a connect to one would
/// resolve names outside the enforcer's DNS proxy, so they are always
/// refused. `/var/run` aliases are listed because the policy side matches
/// strings (`/var/run` is a symlink to `/run`).
pub const DEFAULT_RESOLVER_SOCKETS: [&str; 6] = [
    "/run/systemd/resolve/io.systemd.Resolve",
    "/run/systemd/resolve/io.systemd.Resolve.Monitor",
    "/var/run/systemd/resolve/io.systemd.Resolve",
    "/var/run/systemd/resolve/io.systemd.Resolve.Monitor",
    "/run/nscd/socket",
    "/var/run/nscd/socket",
];

/// Why resolver sockets are refused (errors, audit detail, README).
pub const RESOLVER_REASON: &str = "resolver IPC would bypass the DNS proxy";

/// The default resolver sockets as paths.
pub fn default_resolver_sockets() -> Vec<PathBuf> {
    DEFAULT_RESOLVER_SOCKETS.iter().map(PathBuf::from).collect()
}

/// A `path:` value: absolute, normalized (no `.`, `..`, `//` or trailing
/// `/`: the kernel hook compares the exact string the agent wrote), no NUL,
/// at most 108 bytes (`sun_path`).
pub fn local_path(s: &str) -> Result<PathBuf, String> {
    let p = Path::new(s);
    if !p.is_absolute() {
        return Err(format!(
            "socket path {s:?} must be absolute (relative addresses are refused)"
        ));
    }
    if s.contains('\0') {
        return Err(format!("socket path {s:?} must not contain NUL"));
    }
    let normal: PathBuf = p.components().collect();
    if p.components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        || normal.as_os_str() != p.as_os_str()
    {
        return Err(format!(
            "socket path {s:?} must be normalized (no '.', '..', '//' or trailing '/'): it is \
             matched as the exact string the agent connects to"
        ));
    }
    if s.len() > UNIX_NAME_MAX {
        return Err(format!(
            "socket path {s:?} is {} bytes, longer than the {UNIX_NAME_MAX} of sun_path",
            s.len()
        ));
    }
    Ok(p.to_path_buf())
}

/// An `abstract:` value: 1..=107 bytes (the leading NUL takes one of
/// sun_path's 108), no NUL.
pub fn local_abstract(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("an abstract socket name must not be empty".into());
    }
    if s.contains('\0') {
        return Err(format!("abstract socket name {s:?} must not contain NUL"));
    }
    if s.len() > UNIX_NAME_MAX - 1 {
        return Err(format!(
            "abstract socket name {s:?} is {} bytes, longer than {}",
            s.len(),
            UNIX_NAME_MAX - 1
        ));
    }
    Ok(s.to_owned())
}

/// The error for a rule naming a resolver socket (`None` if it does not).
pub fn resolver_conflict(path: &Path, resolvers: &[PathBuf]) -> Option<String> {
    let hit = resolvers.iter().any(|r| r == path)
        || std::fs::canonicalize(path).ok().is_some_and(|c| {
            resolvers
                .iter()
                .any(|r| std::fs::canonicalize(r).ok() == Some(c.clone()))
        });
    hit.then(|| {
        format!(
            "{} is a resolver IPC socket and cannot be allowed: {RESOLVER_REASON} (names must \
             be resolved through the enforcer's DNS proxy, which judges them by spec.egress)",
            path.display()
        )
    })
}

/// Every check of one rule (for policies that did not come through the
/// YAML validator, e.g. CRD objects).
pub fn check_rule(r: &LocalRule, resolvers: &[PathBuf]) -> Result<(), (&'static str, String)> {
    match (&r.path, &r.abstract_name) {
        (Some(p), None) => {
            let s = p
                .to_str()
                .ok_or(("path", "socket path is not UTF-8".to_string()))?;
            local_path(s).map_err(|m| ("path", m))?;
            if let Some(m) = resolver_conflict(p, resolvers) {
                return Err(("path", m));
            }
            Ok(())
        }
        (None, Some(a)) => local_abstract(a).map(|_| ()).map_err(|m| ("abstract", m)),
        (Some(_), Some(_)) => Err((
            "abstract",
            "a rule has either `path` or `abstract`, not both; split it into two rules".into(),
        )),
        (None, None) => Err(("", "a rule needs `path` or `abstract`".into())),
    }
}

/// One compiled `spec.local` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledLocal {
    /// `rule::LOCAL_BASE + i + 1`.
    pub rule_id: u32,
    /// `unix_kind::*`.
    pub kind: u8,
    /// The `sun_path` bytes the agent writes (an abstract name with its leading NUL).
    pub name: Vec<u8>,
    /// `local[i] path /run/x.sock` / `local[i] abstract name`.
    pub description: String,
}

impl CompiledLocal {
    pub fn from_rule(i: usize, r: &LocalRule) -> Option<Self> {
        let rule_id = enforcer_common::rule::LOCAL_BASE
            + u32::try_from(i + 1).expect("fewer than 2^28 rules");
        if let Some(p) = &r.path {
            let s = p.to_str()?;
            return Some(Self {
                rule_id,
                kind: unix_kind::PATH,
                name: s.as_bytes().to_vec(),
                description: format!("local[{i}] path {s}"),
            });
        }
        let a = r.abstract_name.as_ref()?;
        let mut name = vec![0u8];
        name.extend_from_slice(a.as_bytes());
        Some(Self {
            rule_id,
            kind: unix_kind::ABSTRACT,
            name,
            description: format!("local[{i}] abstract {a}"),
        })
    }

    /// Its `UNIX_RULES` key in generation `table_id`.
    pub fn key(&self, table_id: u32) -> UnixKey {
        unix_key(table_id, self.kind, &self.name)
    }
}

/// A `UNIX_RULES` key (`name` at most 108 bytes; longer is cut, which the
/// validators never let through).
pub fn unix_key(table_id: u32, kind: u8, name: &[u8]) -> UnixKey {
    let n = name.len().min(UNIX_NAME_MAX);
    let mut key = UnixKey {
        table_id,
        kind,
        len: n as u8,
        ..UnixKey::default()
    };
    key.name[..n].copy_from_slice(&name[..n]);
    key
}

/// The resolver sockets' keys (table id 0): each path as given and, when it
/// exists, as its canonical path.
pub fn resolver_keys(resolvers: &[PathBuf]) -> Vec<UnixKey> {
    let mut out: Vec<UnixKey> = Vec::new();
    for r in resolvers {
        let mut forms = vec![r.clone()];
        if let Ok(c) = std::fs::canonicalize(r) {
            forms.push(c);
        }
        for f in forms {
            let Some(s) = f.to_str() else { continue };
            if s.is_empty() || s.len() > UNIX_NAME_MAX {
                continue;
            }
            let k = unix_key(0, unix_kind::PATH, s.as_bytes());
            if !out.contains(&k) {
                out.push(k);
            }
        }
    }
    out
}

/// `sun_path` bytes of a record for the audit log: the path, or `@name`
/// style is not used; the caller says which kind it is.
pub fn display_name(kind: u8, name: &[u8]) -> String {
    let body = if kind == unix_kind::ABSTRACT && !name.is_empty() {
        &name[1..]
    } else {
        name
    };
    crate::events::reader::escape_name(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_absolute_normal_and_short() {
        assert!(local_path("/run/x.sock").is_ok());
        assert!(local_path("run/x.sock").is_err());
        assert!(local_path("/run//x.sock").is_err());
        assert!(local_path("/run/./x.sock").is_err());
        assert!(local_path("/run/../x.sock").is_err());
        assert!(local_path("/run/x/").is_err());
        assert!(local_path(&format!("/{}", "a".repeat(107))).is_ok());
        assert!(local_path(&format!("/{}", "a".repeat(108))).is_err());
        assert!(local_abstract("x").is_ok());
        assert!(local_abstract("").is_err());
        assert!(local_abstract(&"a".repeat(107)).is_ok());
        assert!(local_abstract(&"a".repeat(108)).is_err());
    }

    #[test]
    fn resolver_sockets_are_refused() {
        let r = default_resolver_sockets();
        let m =
            resolver_conflict(Path::new("/run/systemd/resolve/io.systemd.Resolve"), &r).unwrap();
        assert!(m.contains(RESOLVER_REASON), "{m}");
        assert!(resolver_conflict(Path::new("/run/other.sock"), &r).is_none());
    }

    #[test]
    fn keys_are_exact() {
        let rule = LocalRule {
            path: None,
            abstract_name: Some("bus".into()),
        };
        let c = CompiledLocal::from_rule(2, &rule).unwrap();
        assert_eq!(c.rule_id, enforcer_common::rule::LOCAL_BASE + 3);
        let k = c.key(7);
        assert_eq!((k.table_id, k.kind, k.len), (7, unix_kind::ABSTRACT, 4));
        assert_eq!(&k.name[..5], b"\0bus\0");
        assert_eq!(display_name(k.kind, &k.name[..k.len as usize]), "bus");
    }
}
