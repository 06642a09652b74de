//! Unix socket policy in the tables: the resolver IPC sockets (table id 0
//! of `UNIX_RULES` and `UNIX_INODES`), and `spec.local` paths as the socket
//! inodes the BPF LSM unix hooks see.
use std::{
    fs,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData};
use enforcer_common::{FileKey, UnixRule};

use super::{files, Kernel, UnixSupport};
use crate::policy::CompiledPolicy;

impl Kernel {
    /// Whether the unix socket hooks loaded (they are attached with the
    /// other cgroup programs).
    pub fn unix_support(&self) -> UnixSupport {
        self.unix.clone()
    }

    /// Replace the resolver IPC sockets (`UNIX_RULES` table id 0): refused
    /// for every identity with rule `UNIX_RESOLVER`.
    pub fn set_resolver_sockets(&mut self, sockets: &[PathBuf]) -> Result<()> {
        let keys = crate::policy::local::resolver_keys(sockets);
        replace_resolver_entries(&mut self.unix_rules, &keys, |k| k.table_id, "UNIX_RULES")?;
        self.resolvers = sockets.to_vec();
        self.write_resolver_inodes()
    }

    /// The resolver sockets' inodes (`UNIX_INODES` table id 0) for the BPF
    /// LSM unix hooks: those that exist now.
    pub(super) fn write_resolver_inodes(&mut self) -> Result<()> {
        let resolvers = self.resolvers.clone();
        let mut keys: Vec<FileKey> = Vec::new();
        for p in &resolvers {
            for k in self.socket_inodes(p, 0) {
                if !keys.contains(&k) {
                    keys.push(k);
                }
            }
        }
        replace_resolver_entries(&mut self.unix_inodes, &keys, |k| k.table_id, "UNIX_INODES")
    }

    /// The inode keys of the unix socket at `path` as the BPF LSM unix
    /// hooks will see it: what `stat` says, and what the hooks record when
    /// this thread connects to it (refused by them: nothing reaches the
    /// service). They differ on stacked file systems (overlayfs).
    pub(super) fn socket_inodes(&mut self, path: &Path, table_id: u32) -> Vec<FileKey> {
        let mut out: Vec<FileKey> = socket_inode(path, table_id).into_iter().collect();
        if !self.unix_lsm || out.is_empty() {
            return out;
        }
        self.resolver_tid = nix::unistd::gettid().as_raw() as u32;
        if self.write_config().is_ok() {
            let stale: Vec<FileKey> = self.resolved.keys().filter_map(|k| k.ok()).collect();
            for k in stale {
                let _ = self.resolved.remove(&k);
            }
            for ty in [libc::SOCK_STREAM, libc::SOCK_SEQPACKET, libc::SOCK_DGRAM] {
                probe_connect(path, ty);
                let seen: Vec<FileKey> = self.resolved.keys().filter_map(|k| k.ok()).collect();
                if !seen.is_empty() {
                    for k in seen {
                        let k = FileKey { table_id, ..k };
                        if !out.contains(&k) {
                            out.push(k);
                        }
                    }
                    break;
                }
            }
        }
        self.resolver_tid = 0;
        if let Err(e) = self.write_config() {
            tracing::error!("clearing the resolver thread id: {e:#}");
        }
        out
    }

    /// BPF LSM unix hooks: whether a `spec.local` path of `slot`'s
    /// installed generation now names a socket inode that generation does
    /// not hold (the service re-created its socket, or it appeared): the
    /// policy must be installed again. Cheap: one `stat` per path.
    pub fn unix_sockets_moved(&self, slot: u32, compiled: &CompiledPolicy) -> bool {
        if !self.unix_lsm {
            return false;
        }
        let Some(g) = self.installed.get(&slot) else {
            return false;
        };
        compiled
            .local
            .iter()
            .filter(|l| l.kind == enforcer_common::unix_kind::PATH)
            .filter_map(|l| socket_inode(Path::new(std::ffi::OsStr::from_bytes(&l.name)), 0))
            .any(|k| {
                !g.unix_inodes
                    .iter()
                    .any(|i| i.ino == k.ino && i.dev == k.dev)
            })
    }

    /// BPF LSM unix hooks: resolve the resolver sockets again when one of
    /// them now is a socket inode not in `UNIX_INODES` (re-created).
    pub fn refresh_resolver_inodes(&mut self) {
        if !self.unix_lsm {
            return;
        }
        let moved = self
            .resolvers
            .iter()
            .filter_map(|p| socket_inode(p, 0))
            .any(|k| self.unix_inodes.get(&k, 0).is_err());
        if moved {
            if let Err(e) = self.write_resolver_inodes() {
                tracing::warn!("resolving the resolver sockets again: {e:#}");
            }
        }
    }
}

/// connect(2) a unix socket of type `ty` to `path` (the BPF LSM unix hooks
/// refuse it for the resolver thread after recording the peer's inode).
fn probe_connect(path: &Path, ty: i32) {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: plain syscalls on a socket this function owns; the address is
    // a local sockaddr_un whose path fits (checked).
    unsafe {
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        if bytes.len() >= addr.sun_path.len() {
            return;
        }
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        let fd = libc::socket(
            libc::AF_UNIX,
            ty | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        );
        if fd < 0 {
            return;
        }
        let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
        libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len);
        libc::close(fd);
    }
}

/// The inode key of the unix socket at `path` (symlinks followed).
fn socket_inode(path: &Path, table_id: u32) -> Option<FileKey> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = fs::metadata(path).ok()?;
    if !m.file_type().is_socket() {
        return None;
    }
    Some(FileKey {
        ino: m.ino(),
        dev: files::kernel_dev(m.dev()),
        table_id,
    })
}

/// Make `keys` the whole of table id 0 (the resolver sockets) in `map`:
/// insert each with rule `UNIX_RESOLVER`, then drop the table-0 keys that
/// are no longer among them.
fn replace_resolver_entries<K: aya::Pod + PartialEq>(
    map: &mut HashMap<MapData, K, UnixRule>,
    keys: &[K],
    table_id: impl Fn(&K) -> u32,
    map_name: &str,
) -> Result<()> {
    let stale: Vec<K> = map
        .keys()
        .flatten()
        .filter(|k| table_id(k) == 0 && !keys.contains(k))
        .collect();
    let value = UnixRule {
        rule_id: enforcer_common::rule::UNIX_RESOLVER,
        _pad: 0,
    };
    for k in keys {
        map.insert(k, value, 0)
            .with_context(|| format!("inserting a resolver socket into {map_name}"))?;
    }
    for k in stale {
        let _ = map.remove(&k);
    }
    Ok(())
}
