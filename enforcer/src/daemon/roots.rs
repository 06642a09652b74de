//! File policy for pods: `files:` paths name files inside the agent's
//! containers, so they are resolved in each container's root, not in the
//! daemon's mount namespace.
//!
//! Flow. A policy that selects pods and has file rules is installed with
//! `FILES_PER_ROOT` and the union of what its containers resolved to.
//! Every reconcile looks at the container cgroups of its bound pods (the
//! pod cgroup's children, which inotify on the pod cgroup reports as they
//! are made, and the processes of their own sub-cgroups): a container
//! with a process whose root is not the host's (the runtime has pivoted
//! into the container's root file system, volumes mounted) and that is
//! not resolved yet is resolved in that process's mount namespace, whose
//! root is the container's
//! ([`Kernel::resolve_files_in`](crate::kernel::Kernel::resolve_files_in);
//! the namespace stays open), the policy is reinstalled with the new
//! union, and only then is the cgroup marked in `FILE_READY` and its
//! processes resumed: the BPF LSM exec hook stops a program started in an
//! unmarked cgroup of such an identity outside the host's mount namespace
//! before its first instruction (see `enforcer-ebpf/src/files.rs`).
//!
//! The union only grows while the things it protects live, so that an
//! agent cannot shrink it by making the daemon resolve again after it
//! moved the protected file aside and planted a decoy at the rule path:
//! - a container's own inodes are re-resolved on every periodic resync
//!   (a secret volume's atomic update brings new inodes) and added to;
//! - a container that goes away leaves its inodes to its pod until the
//!   pod's cgroup goes (a restarted container sees the same volumes);
//! - a new version of the policy keeps the inodes of each rule whose path
//!   and access it keeps;
//! - a restarted daemon keeps the inodes of the generation it adopts from
//!   the pinned maps (`carried`) besides what it resolves again.
//!
//! After a daemon restart the pinned `FILE_READY` names the containers the
//! previous daemon resolved: they are found again in the cgroup tree and
//! resolved before the policy's first install. Each one is entered through
//! a process in the mount namespace recorded at its first resolution
//! (`<stateDir>/roots.json`, with the namespace root's identity, which the
//! resolver checks after entering): a process of the agent that made a
//! namespace of its own, or `chroot`ed, is not taken.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use enforcer_common::FileRuleValue;
use serde::{Deserialize, Serialize};

use crate::{
    kernel::{cgroup, files::ResolvedFiles},
    policy::compile::{CompiledFileRule, CompiledPolicy},
};

use super::State;

/// Per-container resolution of the file rules of pods' policies.
#[derive(Default)]
pub(super) struct Roots {
    /// Containers of pods whose policy has file rules, by cgroup id, with
    /// the rule paths resolved in their roots.
    pub(super) containers: BTreeMap<u64, Root>,
    /// Newly resolved containers: processes found stopped in them are
    /// resumed for a short while (see `reconcile_roots`).
    pub(super) resume_again: Vec<(PathBuf, Instant)>,
    /// Container cgroups of such pods with no process in a container root
    /// yet, since when (see `reconcile_roots`).
    pub(super) unpivoted: HashMap<u64, Instant>,
    /// Inodes per-root policies keep beyond their live containers: a gone
    /// container's, with its pod (policy, pod cgroup), and the adopted
    /// generation's (policy, empty path). See the module docs.
    pub(super) kept: BTreeMap<(String, PathBuf), Kept>,
    /// Per-root policies whose pinned generation was looked at.
    pub(super) adopted: HashSet<String>,
}

/// A container (cgroup) of a pod whose policy has file rules: what the
/// rule paths resolved to inside its root.
pub(super) struct Root {
    pub policy: String,
    /// The hash of the policy version whose rules were resolved.
    pub hash: String,
    pub cgroup: PathBuf,
    pub files: ResolvedFiles,
    /// The container's mount namespace (open: entered again for a new
    /// version of the policy and on every resync) and what is recorded.
    pub mnt: std::fs::File,
    pub record: Record,
}

/// What `<stateDir>/roots.json` keeps of a resolved container.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Record {
    /// Inode number of its mount namespace.
    pub mnt: u64,
    /// `(st_dev, st_ino)` of the namespace's root directory.
    pub root: (u64, u64),
}

/// Inodes a policy keeps beyond its live containers (see module docs).
pub(super) struct Kept {
    /// The rules they were resolved under (for a new policy version).
    pub rules: Vec<CompiledFileRule>,
    pub files: ResolvedFiles,
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
/// Sub-cgroups of a container cgroup looked into for its processes.
const SUB_DEPTH: usize = 3;
const SUB_DIRS: usize = 64;

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

/// The directories directly under `dir` (child cgroups).
fn child_dirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// The processes of a container cgroup and of the sub-cgroups it made
/// (bounded).
fn procs_deep(dir: &Path) -> Vec<u32> {
    let mut out = procs(dir);
    let mut level = vec![dir.to_path_buf()];
    let mut seen = 0usize;
    for _ in 0..SUB_DEPTH {
        let mut next = Vec::new();
        for d in level {
            for p in child_dirs(&d) {
                if seen >= SUB_DIRS {
                    break;
                }
                seen += 1;
                out.extend(procs(&p));
                next.push(p);
            }
        }
        level = next;
    }
    out
}

/// A process of the container that lives in a container's root (not the
/// host's root, which the runtime's own processes have until they pivot).
fn container_pid(dir: &Path, host_root: Option<(u64, u64)>) -> Option<u32> {
    procs_deep(dir).into_iter().find(|pid| match root_of(*pid) {
        Some(r) => Some(r) != host_root,
        None => false,
    })
}

/// `/proc/<pid>/ns/mnt`, open, and its inode number.
fn open_mnt(pid: u32) -> std::io::Result<(std::fs::File, u64)> {
    let f = std::fs::File::open(format!("/proc/{pid}/ns/mnt"))?;
    let ino = f.metadata()?.ino();
    Ok((f, ino))
}

/// `<stateDir>/roots.json`: cgroup id -> the container's [`Record`].
fn recorded(path: &Path) -> HashMap<u64, Record> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The pod cgroup (when it has processes of its own: the runtime's shim
/// may live there) and its child cgroups (containers) with processes in
/// them or below; `true` for a child.
fn populated_cgroups(pod: &Path) -> Vec<(PathBuf, bool)> {
    let mut out = Vec::new();
    if !procs(pod).is_empty() {
        out.push((pod.to_path_buf(), false));
    }
    out.extend(
        child_dirs(pod)
            .into_iter()
            .filter(|p| !procs_deep(p).is_empty())
            .map(|p| (p, true)),
    );
    out
}

/// Resume the stopped processes of a container (all of them with `all`:
/// SIGCONT also drops a SIGSTOP not acted on yet).
fn resume(dir: &Path, all: bool) -> usize {
    let mut n = 0;
    for pid in procs_deep(dir) {
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

/// `files` under `new` rules: the entries of each old rule whose path and
/// access a new rule has, with the new rule's id (others dropped).
fn remap(
    files: &ResolvedFiles,
    old: &[CompiledFileRule],
    new: &[CompiledFileRule],
) -> ResolvedFiles {
    let id_map: HashMap<u32, u32> = old
        .iter()
        .filter_map(|o| {
            new.iter()
                .find(|n| n.path == o.path && n.access == o.access)
                .map(|n| (o.rule_id, n.rule_id))
        })
        .collect();
    let mut out = ResolvedFiles {
        per_root: true,
        dirs: files.dirs,
        ..Default::default()
    };
    out.entries = files
        .entries
        .iter()
        .filter_map(|(i, v)| {
            id_map
                .get(&v.rule_id)
                .map(|id| (*i, FileRuleValue { rule_id: *id, ..*v }))
        })
        .collect();
    out
}

impl State {
    /// Whether a policy's file rules are resolved per container.
    pub(super) fn per_root(&self, c: &CompiledPolicy) -> bool {
        self.k8s.is_some() && c.kubernetes.is_some() && !c.files.is_empty()
    }

    /// What a per-root policy's file rules resolve to now: the union of its
    /// containers' and of what it keeps.
    pub(super) fn root_files(&self, policy: &str) -> ResolvedFiles {
        ResolvedFiles::union(
            self.roots
                .containers
                .values()
                .filter(|r| r.policy == policy)
                .map(|r| &r.files)
                .chain(
                    self.roots
                        .kept
                        .iter()
                        .filter(|((p, _), _)| p == policy)
                        .map(|(_, k)| &k.files),
                ),
        )
    }

    /// Before a per-root policy's first install by this daemon: the
    /// inodes of the generation adopted from the pinned maps are kept, and
    /// the containers a previous daemon resolved for its slot (pinned
    /// `FILE_READY`) are found in the cgroup tree and resolved again now.
    pub(super) fn adopt_roots(&mut self, name: &str, slot: u32, compiled: &CompiledPolicy) {
        if self.roots.adopted.insert(name.to_string()) {
            let entries = self.kernel.installed_file_entries(slot);
            if !entries.is_empty() {
                tracing::info!(policy = %name, file_inodes = entries.len(), "file inodes of the previous run's generation kept");
                self.roots.kept.insert(
                    (name.to_string(), PathBuf::new()),
                    Kept {
                        rules: compiled.files.clone(),
                        files: ResolvedFiles {
                            entries,
                            per_root: true,
                            // (Rule paths are the containers': walk parents.)
                            dirs: true,
                            ..Default::default()
                        },
                    },
                );
            }
        }
        let wanted: HashSet<u64> = self
            .kernel
            .ready_roots()
            .into_iter()
            .filter(|(id, s)| *s == slot && !self.roots.containers.contains_key(id))
            .map(|(id, _)| id)
            .collect();
        if wanted.is_empty() {
            return;
        }
        let mut found: BTreeMap<u64, PathBuf> = BTreeMap::new();
        let mut level = vec![self.node.mount.clone()];
        for _ in 0..ADOPT_DEPTH {
            let mut next = Vec::new();
            for dir in level {
                for p in child_dirs(&dir) {
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
        let known = recorded(&self.roots_path());
        for id in wanted {
            // Only through a process in the namespace recorded at the first
            // resolution; nothing recorded, or no such process: the
            // container stays marked and its inodes stay kept (above).
            let entered = found.get(&id).zip(known.get(&id)).and_then(|(dir, rec)| {
                procs_deep(dir).into_iter().find_map(|p| match open_mnt(p) {
                    Ok((f, ino)) if ino == rec.mnt => Some((dir.clone(), f, *rec)),
                    _ => None,
                })
            });
            let Some((dir, mnt, record)) = entered else {
                if !found.contains_key(&id) {
                    self.kernel.unmark_root(id);
                } else {
                    tracing::warn!(policy = %name, cgroup_id = id, "a container a previous run resolved has no process in its recorded mount namespace: not resolved again (the previous run's inodes stay)");
                }
                continue;
            };
            match self
                .kernel
                .resolve_files_in(&mnt, record.root, &compiled.files)
            {
                Ok(files) => {
                    tracing::info!(policy = %name, cgroup = %dir.display(), file_inodes = files.entries.len(), "container of a previous run: file rules resolved in its root again");
                    self.roots.containers.insert(
                        id,
                        Root {
                            policy: name.to_string(),
                            hash: compiled.hash.clone(),
                            cgroup: dir,
                            files,
                            mnt,
                            record,
                        },
                    );
                }
                Err(e) => {
                    tracing::error!(policy = %name, cgroup = %dir.display(), "resolving the file rules in a container of a previous run: {e:#} (the previous run's inodes stay)")
                }
            }
        }
    }

    /// A new version of a per-root policy (`old`: the rules in force): its
    /// containers are resolved again now, before it is installed, keeping
    /// the inodes of every rule whose path and access the new version
    /// keeps; what the policy keeps is carried over the same way.
    pub(super) fn refresh_roots(
        &mut self,
        name: &str,
        old: &[CompiledFileRule],
        compiled: &CompiledPolicy,
    ) {
        for ((p, _), k) in self.roots.kept.iter_mut() {
            if p == name && k.rules != compiled.files {
                k.files = remap(&k.files, &k.rules, &compiled.files);
                k.rules = compiled.files.clone();
            }
        }
        let stale: Vec<u64> = self
            .roots
            .containers
            .iter()
            .filter(|(_, r)| r.policy == name && r.hash != compiled.hash)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            let Some(r) = self.roots.containers.get(&id) else {
                continue;
            };
            let previous = remap(&r.files, old, &compiled.files);
            let (dir, record) = (r.cgroup.clone(), r.record);
            let resolved = r
                .mnt
                .try_clone()
                .map_err(anyhow::Error::from)
                .and_then(|mnt| {
                    self.kernel
                        .resolve_files_in(&mnt, record.root, &compiled.files)
                });
            let files = match resolved {
                Ok(new) => ResolvedFiles::union([&new, &previous]),
                Err(e) => {
                    tracing::warn!(policy = %name, cgroup = %dir.display(), "container not resolved again for the new policy version ({e:#}): the inodes of its unchanged rules stay");
                    previous
                }
            };
            if let Some(r) = self.roots.containers.get_mut(&id) {
                r.files = files;
                r.hash = compiled.hash.clone();
            }
        }
    }

    /// Periodic resync: every container is resolved again and what it
    /// gives is added (a file replaced by a new inode, as a secret volume's
    /// update does, is protected from then on); policies that grew are
    /// reinstalled.
    pub(super) fn grow_roots(&mut self) {
        let ids: Vec<u64> = self.roots.containers.keys().copied().collect();
        let mut grown = BTreeSet::new();
        for id in ids {
            let Some(r) = self.roots.containers.get(&id) else {
                continue;
            };
            let Some(rules) = self
                .policies
                .active
                .get(&r.policy)
                .filter(|a| a.compiled.hash == r.hash)
                .map(|a| a.compiled.files.clone())
            else {
                continue;
            };
            let record = r.record;
            let resolved = r
                .mnt
                .try_clone()
                .map_err(anyhow::Error::from)
                .and_then(|mnt| self.kernel.resolve_files_in(&mnt, record.root, &rules));
            let Ok(new) = resolved else {
                continue;
            };
            if let Some(r) = self.roots.containers.get_mut(&id) {
                let before = r.files.entries.len();
                r.files = ResolvedFiles::union([&r.files, &new]);
                if r.files.entries.len() > before {
                    grown.insert(r.policy.clone());
                }
            }
        }
        for name in grown {
            self.install_root_files(&name);
        }
    }

    /// Install a per-root policy again with its current union; false if
    /// that failed (the installed version stays).
    fn install_root_files(&mut self, name: &str) -> bool {
        let files = self.root_files(name);
        let Some(a) = self.policies.active.get(name) else {
            return true;
        };
        if files == a.files {
            return true;
        }
        let (slot, compiled) = (a.slot, a.compiled.clone());
        match self.kernel.install_policy(slot, &compiled, &files) {
            Ok(()) => {
                tracing::info!(policy = %name, file_inodes = files.entries.len(), "policy reinstalled with its containers' file inodes");
                self.node
                    .metrics
                    .set_file_rules(name, files.entries.len() as u64);
                if let Some(a) = self.policies.active.get_mut(name) {
                    a.files = files;
                }
                true
            }
            Err(e) => {
                tracing::error!(policy = %name, "reinstalling with its containers' file inodes failed; the installed version stays, new containers stay held: {e:#}");
                false
            }
        }
    }

    /// Resolve the containers of bound pods whose policy has file rules,
    /// let go of the ones gone, reinstall what changed, then let the newly
    /// resolved containers run (see the module docs).
    pub(super) fn reconcile_roots(&mut self) {
        if self.k8s.is_none() {
            return;
        }
        let wanted: Vec<(PathBuf, String)> = self.per_root_pods();
        let live = |s: &State, policy: &str| {
            s.policies
                .active
                .get(policy)
                .is_some_and(|a| s.per_root(&a.compiled))
        };
        let mut changed: BTreeSet<String> = BTreeSet::new();
        // A container leaves when its cgroup is gone (its inodes stay with
        // its pod), its policy no longer resolves per container, or its pod
        // is bound to another policy. (A pod not known yet, as after a
        // restart, keeps its containers.)
        let gone: Vec<u64> = self
            .roots
            .containers
            .iter()
            .filter(|(_, r)| {
                !r.cgroup.is_dir()
                    || !live(self, &r.policy)
                    || self
                        .bindings
                        .pods
                        .iter()
                        .any(|(pod, b)| r.cgroup.starts_with(pod) && b.policy != r.policy)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            let Some(r) = self.roots.containers.remove(&id) else {
                continue;
            };
            self.kernel.unmark_root(id);
            changed.insert(r.policy.clone());
            let pod = r.cgroup.parent().map(Path::to_path_buf).unwrap_or_default();
            if !r.cgroup.is_dir() && pod.is_dir() && live(self, &r.policy) {
                tracing::info!(policy = %r.policy, cgroup = %r.cgroup.display(), "container gone: its inodes stay with its pod");
                let rules = self
                    .policies
                    .active
                    .get(&r.policy)
                    .map(|a| a.compiled.files.clone())
                    .unwrap_or_default();
                let k = self
                    .roots
                    .kept
                    .entry((r.policy.clone(), pod))
                    .or_insert(Kept {
                        rules,
                        files: ResolvedFiles::default(),
                    });
                k.files = ResolvedFiles::union([&k.files, &r.files]);
            } else {
                tracing::info!(policy = %r.policy, cgroup = %r.cgroup.display(), "container gone: its inodes leave the policy");
            }
        }
        // What pods kept goes with the pod's cgroup (or its policy).
        let dropped: Vec<(String, PathBuf)> = self
            .roots
            .kept
            .keys()
            .filter(|(p, scope)| {
                !live(self, p) || (!scope.as_os_str().is_empty() && !scope.is_dir())
            })
            .cloned()
            .collect();
        for key in dropped {
            self.roots.kept.remove(&key);
            changed.insert(key.0);
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
                if self.roots.containers.contains_key(&id) {
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
                            .roots
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
                    .policies
                    .active
                    .get(policy)
                    .map(|a| (a.compiled.files.clone(), a.compiled.hash.clone()))
                else {
                    continue;
                };
                let resolved = root_of(pid)
                    .ok_or_else(|| anyhow::anyhow!("process {pid} is gone"))
                    .and_then(|root| {
                        let (mnt, ino) = open_mnt(pid)?;
                        let files = self.kernel.resolve_files_in(&mnt, root, &rules)?;
                        Ok((files, mnt, Record { mnt: ino, root }))
                    });
                match resolved {
                    Ok((files, mnt, record)) => {
                        for (rule, path, why) in &files.unresolved {
                            tracing::warn!(policy = %policy, cgroup = %dir.display(), rule, path = %path.display(), "file rule path not in this container ({why})");
                        }
                        tracing::info!(policy = %policy, cgroup = %dir.display(), pid, file_inodes = files.entries.len(), "file rules resolved in the container's root");
                        self.roots.containers.insert(
                            id,
                            Root {
                                policy: policy.clone(),
                                hash,
                                cgroup: dir,
                                files,
                                mnt,
                                record,
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
        self.roots.unpivoted = unpivoted;
        let mut failed: BTreeSet<String> = BTreeSet::new();
        for name in &changed {
            if !self.install_root_files(name) {
                failed.insert(name.clone());
            }
        }
        if !changed.is_empty() {
            self.save_roots();
        }
        let now = Instant::now();
        for id in fresh {
            let Some(r) = self.roots.containers.get(&id) else {
                continue;
            };
            if failed.contains(&r.policy) {
                // Not in the kernel: resolved again (and held) next time.
                self.roots.containers.remove(&id);
                pending = true;
                continue;
            }
            let Some(slot) = self.policies.active.get(&r.policy).map(|a| a.slot) else {
                continue;
            };
            if let Err(e) = self.kernel.mark_root_ready(id, slot) {
                tracing::error!("{e:#}");
                self.roots.containers.remove(&id);
                pending = true;
                continue;
            }
            let n = resume(&r.cgroup, true);
            if n > 0 {
                tracing::info!(cgroup = %r.cgroup.display(), processes = n, "held programs resumed (file rules in force)");
            }
            self.roots.resume_again.push((r.cgroup.clone(), now));
        }
        self.roots.resume_again.retain(|(dir, at)| {
            let n = resume(dir, false);
            if n > 0 {
                tracing::info!(cgroup = %dir.display(), processes = n, "held programs resumed (file rules in force)");
            }
            at.elapsed() < RESUME_WINDOW
        });
        if (pending && failed.is_empty()) || !self.roots.resume_again.is_empty() {
            if let Some(k) = &self.k8s {
                let wake = k.wake.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(POLL);
                    wake.notify_one();
                });
            }
        }
    }

    /// The bound pods whose containers are resolved per root, with their
    /// policy (their cgroups are watched for new container cgroups).
    pub(super) fn per_root_pods(&self) -> Vec<(PathBuf, String)> {
        self.bindings
            .pods
            .iter()
            .filter(|(_, b)| {
                self.policies
                    .active
                    .get(&b.policy)
                    .is_some_and(|a| self.per_root(&a.compiled))
            })
            .map(|(p, b)| (p.clone(), b.policy.clone()))
            .collect()
    }

    /// A resolved container's file inodes (status).
    pub(super) fn root_inodes(&self, cgroup: &Path) -> Option<usize> {
        self.roots
            .containers
            .values()
            .find(|r| r.cgroup == cgroup)
            .map(|r| r.files.entries.len())
    }

    fn roots_path(&self) -> PathBuf {
        self.node.cfg.state_dir.join("roots.json")
    }

    /// Record each resolved container's mount namespace (see module docs).
    fn save_roots(&self) {
        let map: BTreeMap<u64, Record> = self
            .roots
            .containers
            .iter()
            .map(|(id, r)| (*id, r.record))
            .collect();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{kernel::files::Inode, policy::FileAccess};

    fn rule(rule_id: u32, path: &str, access: FileAccess) -> CompiledFileRule {
        CompiledFileRule {
            rule_id,
            path: path.into(),
            access,
        }
    }

    fn value(rule_id: u32, access: u8) -> FileRuleValue {
        FileRuleValue {
            rule_id,
            access,
            _pad: [0; 3],
        }
    }

    #[test]
    fn a_new_policy_version_keeps_the_inodes_of_the_rules_it_keeps() {
        let (a, b) = (Inode { ino: 1, dev: 9 }, Inode { ino: 2, dev: 9 });
        let files = ResolvedFiles {
            entries: vec![(a, value(1, 0)), (b, value(2, 2))],
            dirs: true,
            ..Default::default()
        };
        let old = [
            rule(1, "/a", FileAccess::Deny),
            rule(2, "/b", FileAccess::Taint),
        ];
        let new = [
            rule(5, "/b", FileAccess::Taint),
            rule(6, "/a", FileAccess::Audit),
        ];
        let r = remap(&files, &old, &new);
        // /a changed its access: its inode goes; /b keeps it under id 5.
        assert_eq!(r.entries, vec![(b, value(5, 2))]);
        assert!(r.dirs && r.per_root);
    }

    #[test]
    fn the_union_adds_and_keeps_the_first_rule_of_an_inode() {
        let (a, b) = (Inode { ino: 1, dev: 9 }, Inode { ino: 2, dev: 9 });
        let x = ResolvedFiles {
            entries: vec![(a, value(1, 0))],
            ..Default::default()
        };
        let y = ResolvedFiles {
            entries: vec![(a, value(3, 1)), (b, value(2, 0))],
            dirs: true,
            ..Default::default()
        };
        let u = ResolvedFiles::union([&x, &y]);
        assert_eq!(u.entries, vec![(a, value(1, 0)), (b, value(2, 0))]);
        assert!(u.dirs && u.per_root && u.unresolved.is_empty());
        assert_eq!(ResolvedFiles::union([]).entries, vec![]);
    }
}
