//! File policy for pods: `files:` paths name files inside the agent's
//! containers, so they are resolved in each container's root, not in the
//! daemon's mount namespace.
//!
//! Flow. A policy that selects pods and has file rules is installed with
//! `FILES_PER_ROOT` and the union of what its resolved containers gave
//! (nothing before the first one). Every reconcile looks at the cgroups of
//! its bound pods (the pod cgroup and each container cgroup below it, which
//! inotify on the pod cgroup reports as they are made): a cgroup with a
//! process whose root is not the host's (the runtime has pivoted into the
//! container's root file system, with its volumes mounted) and that is not
//! resolved yet is resolved in that process's mount namespace, whose root
//! is the container's root file system
//! ([`Kernel::resolve_files_in`](crate::kernel::Kernel::resolve_files_in);
//! the namespace is kept open for later versions of the policy),
//! the policy is reinstalled with the new union, and only then is the cgroup
//! marked in `FILE_READY` and its processes resumed: the BPF LSM exec hook
//! stops a program started in an unmarked cgroup of such an identity before
//! its first instruction (see `enforcer-ebpf/src/files.rs`). A container
//! whose cgroup went away leaves the union (policy reinstalled).
//!
//! After a daemon restart the pinned `FILE_READY` names the containers the
//! previous daemon resolved: they are found again in the cgroup tree and
//! resolved before the policy's first install, so running containers keep
//! their protection across the restart. Each one is entered through a
//! process in the mount namespace recorded at its first resolution
//! (`<stateDir>/roots.json`): a process of the agent that made a namespace
//! of its own (with fake files at the rule paths) is not taken.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    kernel::{cgroup, files::ResolvedFiles},
    policy::compile::CompiledPolicy,
};

use super::State;

/// A container (cgroup) of a pod whose policy has file rules: what the
/// rule paths resolved to inside its root.
pub(super) struct Root {
    pub policy: String,
    /// The hash of the policy version whose rules were resolved.
    pub hash: String,
    pub cgroup: PathBuf,
    pub files: ResolvedFiles,
    /// The container's mount namespace (open: entered again for a new
    /// version of the policy) and its inode number (recorded).
    pub mnt: std::fs::File,
    pub mnt_ino: u64,
}

/// `/proc/<pid>/ns/mnt`, open, and its inode number.
fn open_mnt(pid: u32) -> std::io::Result<(std::fs::File, u64)> {
    let f = std::fs::File::open(format!("/proc/{pid}/ns/mnt"))?;
    let ino = f.metadata()?.ino();
    Ok((f, ino))
}

/// `<stateDir>/roots.json`: cgroup id -> mount namespace inode of each
/// resolved container.
fn recorded(path: &Path) -> HashMap<u64, u64> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// How long processes of a newly resolved container are still resumed if
/// found stopped (an exec whose hook ran just before the cgroup was marked
/// may stop after the first SIGCONT).
const RESUME_WINDOW: Duration = Duration::from_secs(2);
/// Re-check interval while a container of such a pod is not resolved yet.
const POLL: Duration = Duration::from_millis(50);
/// How long a container cgroup without a process in a container root is
/// re-checked at [`POLL`] (then at every reconcile).
const YOUNG: Duration = Duration::from_secs(60);
/// Depth of the cgroup tree searched for a previous daemon's containers
/// (`kubepods/<qos>/pod<uid>/<container>` and the systemd layout's slices).
const ADOPT_DEPTH: usize = 6;

/// `(dev, ino)` of a process's root directory.
fn root_of(pid: u32) -> Option<(u64, u64)> {
    std::fs::metadata(format!("/proc/{pid}/root/"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The processes of a cgroup (its own, not its descendants').
fn procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// A process of the cgroup that lives in a container's root (not the
/// host's root, which the runtime's own processes have until they pivot).
fn container_pid(dir: &Path, host_root: Option<(u64, u64)>) -> Option<u32> {
    procs(dir).into_iter().find(|pid| match root_of(*pid) {
        Some(r) => Some(r) != host_root,
        None => false,
    })
}

/// The pod cgroup (when it has processes: the runtime's shim may live
/// there) and its child cgroups (containers) that have processes; `true`
/// for a child.
fn populated_cgroups(pod: &Path) -> Vec<(PathBuf, bool)> {
    let mut out = Vec::new();
    if !procs(pod).is_empty() {
        out.push((pod.to_path_buf(), false));
    }
    if let Ok(rd) = std::fs::read_dir(pod) {
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) && !procs(&p).is_empty() {
                out.push((p, true));
            }
        }
    }
    out
}

/// Resume the stopped processes of a cgroup (all of them with `all`:
/// SIGCONT also drops a SIGSTOP not acted on yet).
fn resume(dir: &Path, all: bool) -> usize {
    let mut n = 0;
    for pid in procs(dir) {
        let stopped = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st == "T"))
            })
            .unwrap_or(false);
        if all || stopped {
            let r = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGCONT,
            );
            n += usize::from(r.is_ok() && stopped);
        }
    }
    n
}

impl State {
    /// Whether a policy's file rules are resolved per container.
    pub(super) fn per_root(&self, c: &CompiledPolicy) -> bool {
        self.k8s.is_some() && c.kubernetes.is_some() && !c.files.is_empty()
    }

    /// What a per-root policy's file rules resolve to now: the union of its
    /// resolved containers.
    pub(super) fn root_files(&self, policy: &str) -> ResolvedFiles {
        ResolvedFiles::union(
            self.roots
                .values()
                .filter(|r| r.policy == policy)
                .map(|r| &r.files),
        )
    }

    /// Before a per-root policy's first install by this daemon: the
    /// containers a previous daemon resolved for its slot (pinned
    /// `FILE_READY`), found in the cgroup tree and resolved again now. One
    /// that is gone is unmarked.
    pub(super) fn adopt_roots(&mut self, name: &str, slot: u32, compiled: &CompiledPolicy) {
        let wanted: HashSet<u64> = self
            .kernel
            .ready_roots()
            .into_iter()
            .filter(|(id, s)| *s == slot && !self.roots.contains_key(id))
            .map(|(id, _)| id)
            .collect();
        if wanted.is_empty() {
            return;
        }
        let mut found: BTreeMap<u64, PathBuf> = BTreeMap::new();
        let mut level = vec![self.mount.clone()];
        for _ in 0..ADOPT_DEPTH {
            let mut next = Vec::new();
            for dir in level {
                let Ok(rd) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for e in rd.flatten() {
                    if !e.file_type().is_ok_and(|t| t.is_dir()) {
                        continue;
                    }
                    let p = e.path();
                    if let Ok(id) = cgroup::cgroup_id(&p) {
                        if wanted.contains(&id) {
                            found.insert(id, p.clone());
                        }
                    }
                    next.push(p);
                }
            }
            if found.len() == wanted.len() {
                break;
            }
            level = next;
        }
        let host_root = root_of(1);
        let known = recorded(&self.roots_path());
        for id in wanted {
            // A process in the namespace recorded at the first resolution
            // (none recorded: one in a container root).
            let mnt = found.get(&id).and_then(|dir| {
                let pid = match known.get(&id) {
                    Some(ino) => procs(dir)
                        .into_iter()
                        .find(|p| open_mnt(*p).is_ok_and(|(_, i)| i == *ino)),
                    None => container_pid(dir, host_root),
                }?;
                open_mnt(pid).ok().map(|m| (dir, m))
            });
            let Some((dir, (mnt, mnt_ino))) = mnt else {
                tracing::warn!(policy = %name, cgroup_id = id, "a container a previous run resolved is gone or has no process in its mount namespace: unmarked (its programs are held until resolved again)");
                self.kernel.unmark_root(id);
                continue;
            };
            match self.kernel.resolve_files_in(&mnt, &compiled.files) {
                Ok(files) => {
                    tracing::info!(policy = %name, cgroup = %dir.display(), file_inodes = files.entries.len(), "container of a previous run: file rules resolved in its root again");
                    self.roots.insert(
                        id,
                        Root {
                            policy: name.to_string(),
                            hash: compiled.hash.clone(),
                            cgroup: dir.clone(),
                            files,
                            mnt,
                            mnt_ino,
                        },
                    );
                }
                Err(e) => {
                    tracing::error!(policy = %name, cgroup = %dir.display(), "resolving the file rules in a container of a previous run: {e:#}; resolved again on the next reconcile")
                }
            }
        }
    }

    /// A new version of a per-root policy: its containers resolved under
    /// the previous rules are resolved again now, before it is installed
    /// (one gone is dropped and unmarked).
    pub(super) fn refresh_roots(&mut self, name: &str, compiled: &CompiledPolicy) {
        let stale: Vec<u64> = self
            .roots
            .iter()
            .filter(|(_, r)| r.policy == name && r.hash != compiled.hash)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            let Some(r) = self.roots.get(&id) else {
                continue;
            };
            let dir = r.cgroup.clone();
            let resolved = r
                .mnt
                .try_clone()
                .map_err(anyhow::Error::from)
                .and_then(|mnt| self.kernel.resolve_files_in(&mnt, &compiled.files));
            match resolved {
                Ok(files) => {
                    if let Some(r) = self.roots.get_mut(&id) {
                        r.files = files;
                        r.hash = compiled.hash.clone();
                    }
                }
                Err(e) => {
                    tracing::info!(policy = %name, cgroup = %dir.display(), "container not resolved for the new policy version ({e:#}): dropped");
                    self.roots.remove(&id);
                    self.kernel.unmark_root(id);
                }
            }
        }
        self.save_roots();
    }

    /// Resolve the containers of bound pods whose policy has file rules,
    /// drop the ones gone, reinstall what changed, then let the newly
    /// resolved containers run (see the module docs).
    pub(super) fn reconcile_roots(&mut self) {
        if self.k8s.is_none() {
            return;
        }
        let wanted: Vec<(PathBuf, String)> = self
            .pods
            .iter()
            .filter(|(_, b)| {
                self.active
                    .get(&b.policy)
                    .is_some_and(|a| self.per_root(&a.compiled))
            })
            .map(|(p, b)| (p.clone(), b.policy.clone()))
            .collect();
        let mut changed: BTreeSet<String> = BTreeSet::new();
        // A container leaves when its cgroup is gone, its policy no longer
        // resolves per container, or its pod is bound to another policy. (A
        // pod not known yet, as after a restart, keeps its containers.)
        let gone: Vec<u64> = self
            .roots
            .iter()
            .filter(|(_, r)| {
                !r.cgroup.is_dir()
                    || !self
                        .active
                        .get(&r.policy)
                        .is_some_and(|a| self.per_root(&a.compiled))
                    || self
                        .pods
                        .iter()
                        .any(|(pod, b)| r.cgroup.starts_with(pod) && b.policy != r.policy)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(r) = self.roots.remove(&id) {
                tracing::info!(policy = %r.policy, cgroup = %r.cgroup.display(), "container gone: its inodes leave the policy");
                changed.insert(r.policy);
                self.kernel.unmark_root(id);
            }
        }
        let host_root = root_of(1);
        let mut pending = false;
        let mut fresh: Vec<u64> = Vec::new();
        let mut unpivoted: HashMap<u64, Instant> = HashMap::new();
        for (pod, policy) in &wanted {
            for (dir, container) in populated_cgroups(pod) {
                let Ok(id) = cgroup::cgroup_id(&dir) else {
                    continue;
                };
                if self.roots.contains_key(&id) {
                    continue;
                }
                let Some(pid) = container_pid(&dir, host_root) else {
                    // Only the runtime's processes (host root) so far: a
                    // new container's runc has not pivoted into its root
                    // yet. Looked at again soon while the cgroup is young
                    // (its program is held until then), then on every
                    // reconcile.
                    if container {
                        let since = self
                            .unpivoted
                            .get(&id)
                            .copied()
                            .unwrap_or_else(Instant::now);
                        if since.elapsed() < YOUNG {
                            pending = true;
                        }
                        unpivoted.insert(id, since);
                    }
                    continue;
                };
                let Some((rules, hash)) = self
                    .active
                    .get(policy)
                    .map(|a| (a.compiled.files.clone(), a.compiled.hash.clone()))
                else {
                    continue;
                };
                let resolved = open_mnt(pid)
                    .map_err(anyhow::Error::from)
                    .and_then(|(mnt, ino)| {
                        Ok((self.kernel.resolve_files_in(&mnt, &rules)?, mnt, ino))
                    });
                match resolved {
                    Ok((files, mnt, mnt_ino)) => {
                        for (rule, path, why) in &files.unresolved {
                            tracing::warn!(policy = %policy, cgroup = %dir.display(), rule, path = %path.display(), "file rule path not in this container ({why})");
                        }
                        tracing::info!(policy = %policy, cgroup = %dir.display(), pid, file_inodes = files.entries.len(), "file rules resolved in the container's root");
                        self.roots.insert(
                            id,
                            Root {
                                policy: policy.clone(),
                                hash,
                                cgroup: dir,
                                files,
                                mnt,
                                mnt_ino,
                            },
                        );
                        changed.insert(policy.clone());
                        fresh.push(id);
                    }
                    Err(e) => {
                        // The process may have exited meanwhile: retried.
                        tracing::warn!(policy = %policy, cgroup = %dir.display(), pid, "resolving the file rules in the container: {e:#}");
                        pending = true;
                    }
                }
            }
        }
        self.unpivoted = unpivoted;
        if !fresh.is_empty() || !changed.is_empty() {
            self.save_roots();
        }
        let mut failed: BTreeSet<String> = BTreeSet::new();
        for name in changed {
            let files = self.root_files(&name);
            let Some(a) = self.active.get(&name) else {
                continue;
            };
            if files == a.files {
                continue;
            }
            let (slot, compiled) = (a.slot, a.compiled.clone());
            match self.kernel.install_policy(slot, &compiled, &files) {
                Ok(()) => {
                    tracing::info!(policy = %name, file_inodes = files.entries.len(), "policy reinstalled with its containers' file inodes");
                    self.metrics
                        .set_file_rules(&name, files.entries.len() as u64);
                    if let Some(a) = self.active.get_mut(&name) {
                        a.files = files;
                    }
                }
                Err(e) => {
                    tracing::error!(policy = %name, "reinstalling with its containers' file inodes failed; the installed version stays, new containers stay held: {e:#}");
                    failed.insert(name);
                }
            }
        }
        let now = Instant::now();
        for id in fresh {
            let Some(r) = self.roots.get(&id) else {
                continue;
            };
            if failed.contains(&r.policy) {
                self.roots.remove(&id);
                pending = true;
                continue;
            }
            let Some(slot) = self.active.get(&r.policy).map(|a| a.slot) else {
                continue;
            };
            if let Err(e) = self.kernel.mark_root_ready(id, slot) {
                tracing::error!("{e:#}");
                self.roots.remove(&id);
                pending = true;
                continue;
            }
            let n = resume(&r.cgroup, true);
            if n > 0 {
                tracing::info!(cgroup = %r.cgroup.display(), processes = n, "held programs resumed (file rules in force)");
            }
            self.resume_again.push((r.cgroup.clone(), now));
        }
        self.resume_again.retain(|(dir, at)| {
            let n = resume(dir, false);
            if n > 0 {
                tracing::info!(cgroup = %dir.display(), processes = n, "held programs resumed (file rules in force)");
            }
            at.elapsed() < RESUME_WINDOW
        });
        if pending || !self.resume_again.is_empty() {
            if let Some(k) = &self.k8s {
                let wake = k.wake.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(POLL);
                    wake.notify_one();
                });
            }
        }
    }

    /// The pod cgroups whose containers are resolved per root (watched for
    /// new container cgroups).
    pub(super) fn per_root_pods(&self) -> Vec<PathBuf> {
        self.pods
            .iter()
            .filter(|(_, b)| {
                self.active
                    .get(&b.policy)
                    .is_some_and(|a| self.per_root(&a.compiled))
            })
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// A resolved container's file inodes (status).
    pub(super) fn root_inodes(&self, cgroup: &Path) -> Option<usize> {
        self.roots
            .values()
            .find(|r| r.cgroup == cgroup)
            .map(|r| r.files.entries.len())
    }

    fn roots_path(&self) -> PathBuf {
        self.cfg.state_dir.join("roots.json")
    }

    /// Record each resolved container's mount namespace (see module docs).
    pub(super) fn save_roots(&self) {
        let map: BTreeMap<u64, u64> = self.roots.iter().map(|(id, r)| (*id, r.mnt_ino)).collect();
        let path = self.roots_path();
        let tmp = path.with_extension("tmp");
        let written = serde_json::to_vec(&map)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), "recording the containers' mount namespaces: {e}");
        }
    }
}
