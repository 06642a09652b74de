//! Well-known secret locations: what `enforcer policy learn` proposes to
//! `taint` (the agent read it) or `deny` (it did not), and what
//! `enforcer policy discover` watches in an audit-mode run.
//!
//! The list is documented in docs/policy-learn.md and extended with
//! `--secret PATH[=WHAT]` (an absolute path, or `~/` relative to each home).
use std::path::{Component, Path, PathBuf};

/// One location: where it is and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    pub place: Place,
    pub what: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// Relative to a home directory (`.ssh`, `.aws/credentials`).
    Home(PathBuf),
    /// An absolute path (a file or a directory tree).
    Absolute(PathBuf),
    /// A file name anywhere, exact or as a prefix followed by `.`
    /// (`.env` covers `.env.local`).
    Name(String),
}

/// The built-in list.
pub fn builtin() -> Vec<Secret> {
    let home = |p: &str, what: &str| Secret {
        place: Place::Home(PathBuf::from(p)),
        what: what.into(),
    };
    let abs = |p: &str, what: &str| Secret {
        place: Place::Absolute(PathBuf::from(p)),
        what: what.into(),
    };
    vec![
        home(".ssh", "SSH keys"),
        home(".gnupg", "GnuPG keys"),
        home(".aws", "AWS credentials"),
        home(".config/gcloud", "Google Cloud credentials"),
        home(".azure", "Azure credentials"),
        home(".kube", "Kubernetes client credentials"),
        home(".docker/config.json", "container registry credentials"),
        home(".netrc", "netrc passwords"),
        home(".git-credentials", "git credentials"),
        home(".config/gh", "GitHub CLI tokens"),
        home(".npmrc", "npm tokens"),
        home(".pypirc", "PyPI tokens"),
        home(".cargo/credentials.toml", "crates.io tokens"),
        home(
            ".mozilla/firefox",
            "Firefox profiles (cookies, saved passwords)",
        ),
        home(
            ".config/google-chrome",
            "Chrome profiles (cookies, saved passwords)",
        ),
        home(
            ".config/chromium",
            "Chromium profiles (cookies, saved passwords)",
        ),
        home(
            ".config/BraveSoftware",
            "Brave profiles (cookies, saved passwords)",
        ),
        abs(
            "/var/run/secrets/kubernetes.io/serviceaccount",
            "Kubernetes service-account token",
        ),
        abs(
            "/run/secrets/kubernetes.io/serviceaccount",
            "Kubernetes service-account token",
        ),
        abs("/run/secrets", "mounted secrets"),
        abs("/etc/shadow", "password hashes"),
        abs("/etc/ssh", "SSH host keys"),
        Secret {
            place: Place::Name(".env".into()),
            what: "dotenv secrets".into(),
        },
    ]
}

/// `--secret PATH[=WHAT]`: `~/x` (home-relative), `/abs/path` or a bare
/// file name (anywhere).
pub fn parse(s: &str) -> Result<Secret, String> {
    let (path, what) = match s.split_once('=') {
        Some((p, w)) if !w.trim().is_empty() => (p.trim(), w.trim().to_string()),
        _ => (s.trim(), "secret (--secret)".to_string()),
    };
    if path.is_empty() || path.contains('\0') {
        return Err(format!("invalid secret location {s:?}"));
    }
    let clean = |p: &Path| -> Result<PathBuf, String> {
        if p.components().any(|c| c == Component::ParentDir) {
            return Err(format!("secret location {s:?} must not contain `..`"));
        }
        Ok(p.components().collect())
    };
    let place = if let Some(rel) = path.strip_prefix("~/") {
        Place::Home(clean(Path::new(rel))?)
    } else if path.starts_with('/') {
        Place::Absolute(clean(Path::new(path))?)
    } else if !path.contains('/') {
        Place::Name(path.to_string())
    } else {
        return Err(format!(
            "secret location {s:?}: expected ~/relative/path, /absolute/path or a file name"
        ));
    };
    Ok(Secret { place, what })
}

impl Secret {
    /// Does the file rule path `p` name this location or something under it?
    pub fn covers(&self, p: &Path) -> bool {
        match &self.place {
            Place::Absolute(a) => p.starts_with(a),
            Place::Home(rel) => {
                // `<anything>/<rel>[/...]`: the home is not known from the
                // log, only that the path has these components in a row.
                let want: Vec<_> = rel.components().collect();
                let have: Vec<_> = p.components().collect();
                !want.is_empty() && have.windows(want.len()).any(|w| w == want.as_slice())
            }
            Place::Name(n) => p.components().any(|c| match c {
                Component::Normal(c) => c.to_str().is_some_and(|c| {
                    c == n
                        || c.strip_prefix(n.as_str())
                            .is_some_and(|r| r.starts_with('.'))
                }),
                _ => false,
            }),
        }
    }

    /// Where this location is for the given homes (for `enforcer policy discover`).
    pub fn paths(&self, homes: &[PathBuf]) -> Vec<PathBuf> {
        match &self.place {
            Place::Absolute(a) => vec![a.clone()],
            Place::Home(rel) => homes.iter().map(|h| h.join(rel)).collect(),
            Place::Name(_) => Vec::new(),
        }
    }

    /// How it is written in docs and comments.
    pub fn spelled(&self) -> String {
        match &self.place {
            Place::Absolute(a) => a.display().to_string(),
            Place::Home(rel) => format!("~/{}", rel.display()),
            Place::Name(n) => format!("{n}, {n}.* (any directory)"),
        }
    }
}

/// The first location of `list` that covers `p`.
pub fn classify<'a>(list: &'a [Secret], p: &Path) -> Option<&'a Secret> {
    list.iter().find(|s| s.covers(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_locations_are_recognised_under_any_home() {
        let list = builtin();
        let what = |p: &str| classify(&list, Path::new(p)).map(|s| s.what.as_str());
        assert_eq!(what("/home/agent/.ssh"), Some("SSH keys"));
        assert_eq!(what("/root/.ssh/id_ed25519"), Some("SSH keys"));
        assert_eq!(what("/home/a/.aws/credentials"), Some("AWS credentials"));
        assert_eq!(
            what("/var/run/secrets/kubernetes.io/serviceaccount/token"),
            Some("Kubernetes service-account token")
        );
        assert_eq!(what("/srv/app/.env"), Some("dotenv secrets"));
        assert_eq!(what("/srv/app/.env.production"), Some("dotenv secrets"));
        assert_eq!(what("/srv/app/.envrc"), None, ".envrc is not .env");
        assert_eq!(what("/home/agent/ssh"), None);
        assert_eq!(what("/home/agent"), None, "a home is not a secret");
        assert_eq!(
            what("/home/agent/.docker/config.json"),
            Some("container registry credentials")
        );
        assert_eq!(what("/home/agent/.docker"), None);
    }

    #[test]
    fn extra_locations_parse() {
        let s = parse("~/.config/acme/token=ACME API token").unwrap();
        assert_eq!(s.place, Place::Home(".config/acme/token".into()));
        assert_eq!(s.what, "ACME API token");
        assert!(s.covers(Path::new("/home/x/.config/acme/token")));
        let s = parse("/srv/keys").unwrap();
        assert!(s.covers(Path::new("/srv/keys/a.pem")));
        assert!(!s.covers(Path::new("/srv/keys2")));
        assert_eq!(parse("id_rsa").unwrap().place, Place::Name("id_rsa".into()));
        assert!(parse("rel/path").is_err());
        assert!(parse("/a/../b").is_err());
        assert_eq!(
            s.paths(&[PathBuf::from("/home/x")]),
            vec![PathBuf::from("/srv/keys")]
        );
    }
}
