//! `spec.files` paths -> the inode keys the BPF LSM file hooks see: the
//! resolver thread (in the daemon's mount namespace or a container's),
//! and the containers whose file rules are resolved (`FILE_READY`).
use std::{fs, path::Path};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{HashMap, MapData};
use enforcer_common::{FileKey, FileRuleValue};

use super::{files, Kernel};

impl Kernel {
    /// Resolve `spec.files` to the inode keys the hooks will see: `stat`,
    /// plus, while the hooks are attached, what they record for this
    /// thread's own opens of each path (see `files` module docs).
    pub fn resolve_files(
        &mut self,
        rules: &[crate::policy::compile::CompiledFileRule],
    ) -> files::ResolvedFiles {
        match self.resolve_files_checked(rules) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("file rules resolved by stat only: {e:#}");
                files::resolve(rules, &mut files::StatOnly)
            }
        }
    }

    /// [`Kernel::resolve_files`], or an error if the hooks are attached but
    /// do not see this thread as the resolver (they record nothing of its
    /// open of `/`, checked first): stat's numbers alone can miss the
    /// inodes the hooks judge (overlayfs), so a caller that can wait (a
    /// held container) does not take them for a resolution.
    fn resolve_files_checked(
        &mut self,
        rules: &[crate::policy::compile::CompiledFileRule],
    ) -> Result<files::ResolvedFiles> {
        if rules.is_empty() {
            return Ok(files::ResolvedFiles::default());
        }
        if !self.lsm_hooks_attached() {
            return Ok(files::resolve(rules, &mut files::StatOnly));
        }
        self.resolver_tid = nix::unistd::gettid().as_raw() as u32;
        let out = self.write_config().and_then(|()| {
            let mut observer = KernelObserver {
                resolved: &mut self.resolved,
            };
            use files::Observer;
            if observer.kernel_view(Path::new("/"), true).is_empty() {
                bail!(
                    "the BPF LSM file hooks do not recognize the resolver thread (tid {} in \
                     PID namespace {}): they recorded nothing of its open of /",
                    self.resolver_tid,
                    self.pid_ns.1
                );
            }
            Ok(files::resolve(rules, &mut observer))
        });
        self.resolver_tid = 0;
        if let Err(e) = self.write_config() {
            tracing::error!("clearing the resolver thread id: {e:#}");
        }
        out
    }

    /// Resolve `spec.files` inside a container's mount namespace (`mnt`,
    /// an open `/proc/<pid>/ns/mnt`), as [`Kernel::resolve_files`] does in
    /// the daemon's own. A thread of its own takes a private file-system
    /// context (`unshare(CLONE_FS)`) and enters the namespace (`setns`, as
    /// `nsenter --mount` does): its root is then the namespace's root, the
    /// container's root file system with its mounts, whatever root a process
    /// of the container `chroot`ed to; every path, and every absolute symlink
    /// met on the way, resolves inside it, and the hooks record that thread's
    /// opens like the resolver thread's.
    ///
    /// `root`: `(st_dev, st_ino)` the namespace's root must have (the
    /// container's root as its process saw it): a runtime that did not
    /// pivot (`no_pivot`) leaves a copy of the host's tree there.
    pub fn resolve_files_in(
        &mut self,
        mnt: &fs::File,
        root: (u64, u64),
        rules: &[crate::policy::compile::CompiledFileRule],
    ) -> Result<files::ResolvedFiles> {
        std::thread::scope(|s| {
            s.spawn(|| -> Result<files::ResolvedFiles> {
                use std::os::unix::fs::MetadataExt;
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)
                    .context("unshare(CLONE_FS) for the resolver thread")?;
                nix::sched::setns(mnt, nix::sched::CloneFlags::CLONE_NEWNS)
                    .context("entering the container's mount namespace")?;
                let m = fs::metadata("/").context("stat / in the container's namespace")?;
                if (m.dev(), m.ino()) != root {
                    bail!(
                        "the mount namespace's root is not the container's root (a runtime \
                         that does not pivot_root?)"
                    );
                }
                self.resolve_files_checked(rules)
            })
            .join()
            .map_err(|_| anyhow!("the resolver thread panicked"))?
        })
    }

    /// The file entries of the generation installed for `slot` (adopted
    /// from the pinned maps after a restart, or this process's own).
    pub fn installed_file_entries(&self, slot: u32) -> Vec<(files::Inode, FileRuleValue)> {
        let Some(gen) = self.installed.get(&slot) else {
            return Vec::new();
        };
        gen.files
            .iter()
            .filter_map(|k| {
                self.file_rules.get(k, 0).ok().map(|v| {
                    (
                        files::Inode {
                            ino: k.ino,
                            dev: k.dev,
                        },
                        v,
                    )
                })
            })
            .collect()
    }

    /// Mark a container cgroup resolved (`FILE_READY`): programs started in
    /// it run at once from now on.
    pub fn mark_root_ready(&mut self, cgroup_id: u64, slot: u32) -> Result<()> {
        self.file_ready
            .insert(cgroup_id, slot, 0)
            .map_err(|e| anyhow!("marking cgroup {cgroup_id} in FILE_READY: {e}"))
    }

    pub fn unmark_root(&mut self, cgroup_id: u64) {
        let _ = self.file_ready.remove(&cgroup_id);
    }

    /// `FILE_READY` as (cgroup id, slot): the containers a previous daemon
    /// resolved, when the map is pinned.
    pub fn ready_roots(&self) -> Vec<(u64, u32)> {
        self.file_ready.iter().filter_map(|r| r.ok()).collect()
    }
}

/// Opens paths from the resolver thread and reads back the inodes the LSM
/// hook recorded for those opens.
struct KernelObserver<'a> {
    resolved: &'a mut HashMap<MapData, FileKey, u32>,
}

impl files::Observer for KernelObserver<'_> {
    fn kernel_view(&mut self, path: &Path, follow: bool) -> Vec<files::Inode> {
        use std::os::unix::fs::OpenOptionsExt;
        let stale: Vec<FileKey> = self.resolved.keys().filter_map(|k| k.ok()).collect();
        for k in stale {
            let _ = self.resolved.remove(&k);
        }
        let mut flags = libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
        if !follow {
            flags |= libc::O_NOFOLLOW;
        }
        match fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(path)
        {
            Ok(f) => drop(f),
            Err(e) => {
                tracing::debug!(path = %path.display(), "resolver open failed: {e}");
                return Vec::new();
            }
        }
        self.resolved
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| files::Inode {
                ino: k.ino,
                dev: k.dev,
            })
            .collect()
    }
}
