//! `spec.files` paths -> the inode keys of `FILE_RULES`.
//!
//! The kernel matches a file by its inode (number and the kernel `dev_t` of
//! its superblock) and by the inodes of its parent directories (bounded
//! walk). Here each rule's path is resolved (following symlinks: a rule on
//! a symlink protects its target) in two ways: `stat`, and — when the LSM
//! hooks are attached — by opening the path from a *resolver thread* whose
//! opens the hooks record in `RESOLVED` instead of judging ([`Observer`]).
//! The second is what makes overlayfs (container root filesystems) and
//! other stacked filesystems work: there an open presents the overlay inode
//! and then the real one, and `stat` reports neither exactly (overlayfs
//! without xino gives the overlay inode a private number and `stat` a
//! per-layer pseudo device). A directory rule also
//! lists the non-directory inodes already inside its tree (same filesystem,
//! symlinks not followed, at most [`MAX_TREE_ENTRIES`] per policy), so that
//! a hard link to one of them made elsewhere *before* the policy was loaded
//! matches too; hard links made while the policy is in force are refused by
//! the `inode_link` hook. A nested rule overrides the rule of a directory
//! above it (the most specific path wins, like the kernel's walk).
use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use enforcer_common::{file_access, FileRuleValue};

use crate::policy::{compile::CompiledFileRule, FileAccess};

/// Inodes listed from directory trees, per policy.
pub const MAX_TREE_ENTRIES: usize = 100_000;

/// A file identity as the kernel sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Inode {
    pub ino: u64,
    /// Kernel-internal `dev_t` (major << 20 | minor), as in `i_sb->s_dev`.
    pub dev: u32,
}

impl Inode {
    pub fn of(meta: &fs::Metadata) -> Self {
        Self {
            ino: meta.ino(),
            dev: kernel_dev(meta.dev()),
        }
    }
}

/// Userspace `st_dev` (glibc encoding) -> the kernel's internal `dev_t`.
pub fn kernel_dev(st_dev: u64) -> u32 {
    let major = libc::major(st_dev) as u32;
    let minor = libc::minor(st_dev) as u32;
    (major << 20) | (minor & 0xf_ffff)
}

/// What `spec.files` resolved to.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ResolvedFiles {
    pub entries: Vec<(Inode, FileRuleValue)>,
    /// Some rule is a directory: the kernel walks parent dentries.
    pub dirs: bool,
    /// Rules whose path does not exist (or cannot be read): (rule id, path, why).
    pub unresolved: Vec<(u32, PathBuf, String)>,
    /// Directory trees not listed completely ([`MAX_TREE_ENTRIES`]).
    pub truncated: Vec<PathBuf>,
    /// The paths name files inside containers, resolved in each one's root
    /// (`policy_flags::FILES_PER_ROOT`): these entries are the union of
    /// every resolved container's.
    pub per_root: bool,
}

impl ResolvedFiles {
    /// The union of what several container roots resolved to (an inode two
    /// roots share, a lower layer of one image, keeps the first rule found:
    /// the rule paths are the same in every root).
    pub fn union<'a>(parts: impl IntoIterator<Item = &'a ResolvedFiles>) -> Self {
        let mut map: HashMap<Inode, FileRuleValue> = HashMap::new();
        let mut out = ResolvedFiles {
            per_root: true,
            ..Default::default()
        };
        for p in parts {
            out.dirs |= p.dirs;
            for (i, v) in &p.entries {
                map.entry(*i).or_insert(*v);
            }
        }
        out.entries = map.into_iter().collect();
        out.entries.sort_by_key(|(i, _)| *i);
        out
    }
}

fn access_code(a: FileAccess) -> u8 {
    match a {
        FileAccess::Deny => file_access::DENY,
        FileAccess::Audit => file_access::AUDIT,
        FileAccess::Taint => file_access::TAINT,
    }
}

/// Shows which inodes the kernel's hooks see when `path` is opened.
pub trait Observer {
    /// `follow`: follow a final symlink (rule paths) or not (tree entries).
    fn kernel_view(&mut self, path: &Path, follow: bool) -> Vec<Inode>;
}

/// No kernel view (hooks not attached): `stat` only.
pub struct StatOnly;

impl Observer for StatOnly {
    fn kernel_view(&mut self, _path: &Path, _follow: bool) -> Vec<Inode> {
        Vec::new()
    }
}

/// Every key of one path: its `stat` identity and what the kernel saw.
fn keys(obs: &mut dyn Observer, path: &Path, meta: &fs::Metadata, follow: bool) -> Vec<Inode> {
    let mut k = vec![Inode::of(meta)];
    // Only regular files and directories are opened: a FIFO or a device
    // could block or act on open.
    if meta.is_file() || meta.is_dir() {
        for i in obs.kernel_view(path, follow) {
            if !k.contains(&i) {
                k.push(i);
            }
        }
    }
    k
}

/// Resolve every rule (see module docs).
pub fn resolve(rules: &[CompiledFileRule], obs: &mut dyn Observer) -> ResolvedFiles {
    let mut out = ResolvedFiles::default();
    // Shallow paths first: a deeper rule then overrides what a directory
    // above it listed.
    let mut order: Vec<&CompiledFileRule> = rules.iter().collect();
    order.sort_by_key(|r| r.path.components().count());
    let mut map: HashMap<Inode, FileRuleValue> = HashMap::new();
    let mut listed = 0usize;
    for r in order {
        let value = FileRuleValue {
            rule_id: r.rule_id,
            access: access_code(r.access),
            _pad: [0; 3],
        };
        let meta = match fs::metadata(&r.path) {
            Ok(m) => m,
            Err(e) => {
                out.unresolved
                    .push((r.rule_id, r.path.clone(), e.to_string()));
                continue;
            }
        };
        let root = Inode::of(&meta);
        if meta.is_dir() {
            out.dirs = true;
            let mut found = Vec::new();
            if !list_tree(
                &r.path,
                root.dev,
                &mut found,
                MAX_TREE_ENTRIES - listed.min(MAX_TREE_ENTRIES),
            ) {
                out.truncated.push(r.path.clone());
            }
            listed += found.len();
            for (path, meta) in found {
                for i in keys(obs, &path, &meta, false) {
                    map.insert(i, value);
                }
            }
        }
        for i in keys(obs, &r.path, &meta, true) {
            map.insert(i, value);
        }
    }
    // Explicit rules win over what a tree listing found at the same inode
    // (a hard link of a rule's file inside another rule's tree).
    for r in rules {
        if let Ok(meta) = fs::metadata(&r.path) {
            if !meta.is_dir() {
                let value = FileRuleValue {
                    rule_id: r.rule_id,
                    access: access_code(r.access),
                    _pad: [0; 3],
                };
                for i in keys(obs, &r.path, &meta, true) {
                    map.insert(i, value);
                }
            }
        }
    }
    out.entries = map.into_iter().collect();
    out.entries.sort_by_key(|(i, _)| *i);
    out
}

/// Non-directory entries under `dir`, not crossing into directories of
/// another device (symlinks are not followed nor listed); false when `budget` ran out first.
fn list_tree(dir: &Path, dev: u32, out: &mut Vec<(PathBuf, fs::Metadata)>, budget: usize) -> bool {
    let mut stack = vec![dir.to_path_buf()];
    let mut dirs = 0usize;
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for entry in rd.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                // Directories count too: a tree of empty directories must
                // not make the walk unbounded.
                if out.len() + dirs >= budget {
                    return false;
                }
                dirs += 1;
                // Directories on another device are other mounts: not
                // descended into. (Files are not compared: overlayfs
                // reports per-layer pseudo devices for them.)
                if Inode::of(&meta).dev == dev {
                    stack.push(entry.path());
                }
            } else if !meta.file_type().is_symlink() {
                if out.len() + dirs >= budget {
                    return false;
                }
                out.push((entry.path(), meta));
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(id: u32, path: &Path, access: FileAccess) -> CompiledFileRule {
        CompiledFileRule {
            rule_id: id,
            path: path.to_path_buf(),
            access,
        }
    }

    #[test]
    fn dev_encoding_matches_the_kernel() {
        // st_dev of major 8, minor 1 (glibc: (minor & 0xff) | (major << 8) | ...).
        assert_eq!(kernel_dev(libc::makedev(8, 1)), (8 << 20) | 1);
        assert_eq!(kernel_dev(libc::makedev(259, 300)), (259 << 20) | 300);
        assert_eq!(kernel_dev(libc::makedev(0, 52)), 52);
    }

    #[test]
    fn resolves_files_trees_links_and_missing_paths() {
        let t = tempfile::tempdir().unwrap();
        let ssh = t.path().join("ssh");
        fs::create_dir_all(ssh.join("sub")).unwrap();
        fs::write(ssh.join("id_rsa"), "k").unwrap();
        fs::write(ssh.join("sub/deep"), "k").unwrap();
        fs::write(ssh.join("known_hosts"), "h").unwrap();
        // A hard link made before the policy, outside the tree.
        fs::hard_link(ssh.join("id_rsa"), t.path().join("outside")).unwrap();
        std::os::unix::fs::symlink(ssh.join("known_hosts"), t.path().join("kh-link")).unwrap();
        let rules = vec![
            rule(1, &ssh, FileAccess::Deny),
            // Through a symlink: protects the target.
            rule(2, &t.path().join("kh-link"), FileAccess::Audit),
            rule(3, &t.path().join("missing"), FileAccess::Deny),
        ];
        let r = resolve(&rules, &mut StatOnly);
        assert!(r.dirs);
        let get = |p: &Path| {
            let i = Inode::of(&fs::metadata(p).unwrap());
            r.entries.iter().find(|(k, _)| *k == i).map(|(_, v)| *v)
        };
        assert_eq!(get(&ssh).unwrap().rule_id, 1);
        assert_eq!(get(&ssh.join("sub/deep")).unwrap().rule_id, 1);
        assert_eq!(
            get(&t.path().join("outside")).unwrap().access,
            file_access::DENY
        );
        let kh = get(&ssh.join("known_hosts")).unwrap();
        assert_eq!((kh.rule_id, kh.access), (2, file_access::AUDIT));
        // The directory "sub" is covered by the kernel's walk, not listed.
        assert!(get(&ssh.join("sub")).is_none());
        assert_eq!(r.unresolved.len(), 1);
        assert_eq!(r.unresolved[0].0, 3);
        assert!(r.truncated.is_empty());
    }
}
