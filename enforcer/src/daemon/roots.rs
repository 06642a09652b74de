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
    kernel::{cgroup, files::ResolvedFiles, Kernel},
    policy::compile::{CompiledFileRule, CompiledPolicy},
};

use super::{install::Policies, Node, State};

/// Per-container resolution of the file rules of pods' policies.
#[derive(Default)]
pub(super) struct Roots {
    /// Containers of pods whose policy has file rules, by cgroup id, with
    /// the rule paths resolved in their roots.
    containers: BTreeMap<u64, Root>,
    /// Newly resolved containers: processes found stopped in them are
    /// resumed for a short while (see `reconcile_roots`).
    resume_again: Vec<(PathBuf, Instant)>,
    /// Container cgroups of such pods with no process in a container root
    /// yet, since when (see `reconcile_roots`).
    unpivoted: HashMap<u64, Instant>,
    /// Inodes per-root policies keep beyond their live containers: a gone
    /// container's, with its pod (policy, pod cgroup), and the adopted
    /// generation's (policy, empty path). See the module docs.
    kept: BTreeMap<(String, PathBuf), Kept>,
    /// Per-root policies whose pinned generation was looked at.
    adopted: HashSet<String>,
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

/// Whether a policy's file rules are resolved per container (Kubernetes
/// mode, a policy that selects pods and has file rules).
pub(super) fn per_root(kubernetes: bool, c: &CompiledPolicy) -> bool {
    kubernetes && c.kubernetes.is_some() && !c.files.is_empty()
}

impl State {
    /// Periodic resync: every container is resolved again and what it
    /// gives is added (a file replaced by a new inode, as a secret volume's
    /// update does, is protected from then on); policies that grew are
    /// reinstalled.
    pub(super) fn grow_roots(&mut self) {
        for name in self.roots.grow(&mut self.kernel, &self.policies) {
            self.install_root_files(&name);
        }
    }

    /// Install a per-root policy again with its current union; false if
    /// that failed (the installed version stays).
    fn install_root_files(&mut self, name: &str) -> bool {
        let files = self.roots.files_of(name);
        self.policies
            .reinstall_with_files(&mut self.kernel, &self.node.metrics, name, files)
    }

    /// Resolve the containers of bound pods whose policy has file rules,
    /// let go of the ones gone, reinstall what changed, then let the newly
    /// resolved containers run (see the module docs).
    pub(super) fn reconcile_roots(&mut self) {
        if self.k8s.is_none() {
            return;
        }
        let wanted = self.bindings.per_root_pods(&self.policies, true);
        let mut changed = self
            .roots
            .let_go(&mut self.kernel, &self.policies, self.bindings.pods());
        let (fresh, mut pending) =
            self.roots
                .resolve_new(&mut self.kernel, &self.policies, &wanted, &mut changed);
        let mut failed: BTreeSet<String> = BTreeSet::new();
        for name in &changed {
            if !self.install_root_files(name) {
                failed.insert(name.clone());
            }
        }
        if !changed.is_empty() {
            self.roots.save(&self.node.cfg.state_dir);
        }
        pending |= self
            .roots
            .release(&mut self.kernel, &self.policies, fresh, &failed);
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
}

/// Whether `policy` is loaded and resolved per container.
fn live(policies: &Policies, policy: &str) -> bool {
    policies
        .get(policy)
        .is_some_and(|a| per_root(true, &a.compiled))
}

impl Roots {
    /// What a per-root policy's file rules resolve to now: the union of its
    /// containers' and of what it keeps.
    pub(super) fn files_of(&self, policy: &str) -> ResolvedFiles {
        ResolvedFiles::union(
            self.containers
                .values()
                .filter(|r| r.policy == policy)
                .map(|r| &r.files)
                .chain(
                    self.kept
                        .iter()
                        .filter(|((p, _), _)| p == policy)
                        .map(|(_, k)| &k.files),
                ),
        )
    }

    /// A resolved container's file inodes (status).
    pub(super) fn inodes_of(&self, cgroup: &Path) -> Option<usize> {
        self.containers
            .values()
            .find(|r| r.cgroup == cgroup)
            .map(|r| r.files.entries.len())
    }

    /// Before a per-root policy's first install by this daemon: the
    /// inodes of the generation adopted from the pinned maps are kept, and
    /// the containers a previous daemon resolved for its slot (pinned
    /// `FILE_READY`) are found in the cgroup tree and resolved again now.
    pub(super) fn adopt(
        &mut self,
        node: &Node,
        kernel: &mut Kernel,
        name: &str,
        slot: u32,
        compiled: &CompiledPolicy,
    ) {
        if self.adopted.insert(name.to_string()) {
            let entries = kernel.installed_file_entries(slot);
            if !entries.is_empty() {
                tracing::info!(policy = %name, file_inodes = entries.len(), "file inodes of the previous run's generation kept");
                self.kept.insert(
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
        let wanted: HashSet<u64> = kernel
            .ready_roots()
            .into_iter()
            .filter(|(id, s)| *s == slot && !self.containers.contains_key(id))
            .map(|(id, _)| id)
            .collect();
        if wanted.is_empty() {
            return;
        }
        let found = find_cgroups(&node.mount, &wanted);
        let known = recorded(&roots_path(&node.cfg.state_dir));
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
                    kernel.unmark_root(id);
                } else {
                    tracing::warn!(policy = %name, cgroup_id = id, "a container a previous run resolved has no process in its recorded mount namespace: not resolved again (the previous run's inodes stay)");
                }
                continue;
            };
            match kernel.resolve_files_in(&mnt, record.root, &compiled.files) {
                Ok(files) => {
                    tracing::info!(policy = %name, cgroup = %dir.display(), file_inodes = files.entries.len(), "container of a previous run: file rules resolved in its root again");
                    self.containers.insert(
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
    pub(super) fn refresh(
        &mut self,
        kernel: &mut Kernel,
        name: &str,
        old: &[CompiledFileRule],
        compiled: &CompiledPolicy,
    ) {
        for ((p, _), k) in self.kept.iter_mut() {
            if p == name && k.rules != compiled.files {
                k.files = remap(&k.files, &k.rules, &compiled.files);
                k.rules = compiled.files.clone();
            }
        }
        let stale: Vec<u64> = self
            .containers
            .iter()
            .filter(|(_, r)| r.policy == name && r.hash != compiled.hash)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            let Some(r) = self.containers.get(&id) else {
                continue;
            };
            let previous = remap(&r.files, old, &compiled.files);
            let (dir, record) = (r.cgroup.clone(), r.record);
            let resolved = r
                .mnt
                .try_clone()
                .map_err(anyhow::Error::from)
                .and_then(|mnt| kernel.resolve_files_in(&mnt, record.root, &compiled.files));
            let files = match resolved {
                Ok(new) => ResolvedFiles::union([&new, &previous]),
                Err(e) => {
                    tracing::warn!(policy = %name, cgroup = %dir.display(), "container not resolved again for the new policy version ({e:#}): the inodes of its unchanged rules stay");
                    previous
                }
            };
            if let Some(r) = self.containers.get_mut(&id) {
                r.files = files;
                r.hash = compiled.hash.clone();
            }
        }
    }

    /// Resolve every container again and add what it gives; the policies
    /// that grew.
    fn grow(&mut self, kernel: &mut Kernel, policies: &Policies) -> BTreeSet<String> {
        let ids: Vec<u64> = self.containers.keys().copied().collect();
        let mut grown = BTreeSet::new();
        for id in ids {
            let Some(r) = self.containers.get(&id) else {
                continue;
            };
            let Some(rules) = policies
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
                .and_then(|mnt| kernel.resolve_files_in(&mnt, record.root, &rules));
            let Ok(new) = resolved else {
                continue;
            };
            if let Some(r) = self.containers.get_mut(&id) {
                let before = r.files.entries.len();
                r.files = ResolvedFiles::union([&r.files, &new]);
                if r.files.entries.len() > before {
                    grown.insert(r.policy.clone());
                }
            }
        }
        grown
    }

    /// Let go of the containers that left (their inodes stay with their
    /// pod while it lives), and of what pods kept once the pod's cgroup
    /// or its policy is gone; the policies whose union changed.
    fn let_go(
        &mut self,
        kernel: &mut Kernel,
        policies: &Policies,
        pods: &HashMap<PathBuf, super::PodBinding>,
    ) -> BTreeSet<String> {
        let mut changed: BTreeSet<String> = BTreeSet::new();
        // A container leaves when its cgroup is gone (its inodes stay with
        // its pod), its policy no longer resolves per container, or its pod
        // is bound to another policy. (A pod not known yet, as after a
        // restart, keeps its containers.)
        let gone: Vec<u64> = self
            .containers
            .iter()
            .filter(|(_, r)| {
                !r.cgroup.is_dir()
                    || !live(policies, &r.policy)
                    || pods
                        .iter()
                        .any(|(pod, b)| r.cgroup.starts_with(pod) && b.policy != r.policy)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            let Some(r) = self.containers.remove(&id) else {
                continue;
            };
            kernel.unmark_root(id);
            changed.insert(r.policy.clone());
            let pod = r.cgroup.parent().map(Path::to_path_buf).unwrap_or_default();
            if !r.cgroup.is_dir() && pod.is_dir() && live(policies, &r.policy) {
                tracing::info!(policy = %r.policy, cgroup = %r.cgroup.display(), "container gone: its inodes stay with its pod");
                let rules = policies
                    .get(&r.policy)
                    .map(|a| a.compiled.files.clone())
                    .unwrap_or_default();
                let k = self.kept.entry((r.policy.clone(), pod)).or_insert(Kept {
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
            .kept
            .keys()
            .filter(|(p, scope)| {
                !live(policies, p) || (!scope.as_os_str().is_empty() && !scope.is_dir())
            })
            .cloned()
            .collect();
        for key in dropped {
            self.kept.remove(&key);
            changed.insert(key.0);
        }
        changed
    }

    /// Resolve, in its root, each container of `wanted` (pod cgroup,
    /// policy) not resolved yet whose runtime has pivoted; adds their
    /// policies to `changed`. Returns the containers resolved now, and
    /// whether some are to be looked at again soon.
    fn resolve_new(
        &mut self,
        kernel: &mut Kernel,
        policies: &Policies,
        wanted: &[(PathBuf, String)],
        changed: &mut BTreeSet<String>,
    ) -> (Vec<u64>, bool) {
        let host_root = root_of(1);
        let mut pending = false;
        let mut fresh: Vec<u64> = Vec::new();
        let mut unpivoted: HashMap<u64, Instant> = HashMap::new();
        for (pod, policy) in wanted {
            for (dir, container) in populated_cgroups(pod) {
                let Ok(id) = cgroup::cgroup_id(&dir) else {
                    continue;
                };
                if self.containers.contains_key(&id) {
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
                let Some((rules, hash)) = policies
                    .get(policy)
                    .map(|a| (a.compiled.files.clone(), a.compiled.hash.clone()))
                else {
                    continue;
                };
                let resolved = root_of(pid)
                    .ok_or_else(|| anyhow::anyhow!("process {pid} is gone"))
                    .and_then(|root| {
                        let (mnt, ino) = open_mnt(pid)?;
                        let files = kernel.resolve_files_in(&mnt, root, &rules)?;
                        Ok((files, mnt, Record { mnt: ino, root }))
                    });
                match resolved {
                    Ok((files, mnt, record)) => {
                        for (rule, path, why) in &files.unresolved {
                            tracing::warn!(policy = %policy, cgroup = %dir.display(), rule, path = %path.display(), "file rule path not in this container ({why})");
                        }
                        tracing::info!(policy = %policy, cgroup = %dir.display(), pid, file_inodes = files.entries.len(), "file rules resolved in the container's root");
                        self.containers.insert(
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
        self.unpivoted = unpivoted;
        (fresh, pending)
    }

    /// The containers resolved now whose policy went in: marked ready in
    /// the kernel and their held programs resumed (again for a while);
    /// whether some are to be looked at again soon (their policy failed to
    /// install, or the mark did).
    fn release(
        &mut self,
        kernel: &mut Kernel,
        policies: &Policies,
        fresh: Vec<u64>,
        failed: &BTreeSet<String>,
    ) -> bool {
        let mut pending = false;
        let now = Instant::now();
        for id in fresh {
            let Some(r) = self.containers.get(&id) else {
                continue;
            };
            if failed.contains(&r.policy) {
                // Not in the kernel: resolved again (and held) next time.
                self.containers.remove(&id);
                pending = true;
                continue;
            }
            let Some(slot) = policies.get(&r.policy).map(|a| a.slot) else {
                continue;
            };
            if let Err(e) = kernel.mark_root_ready(id, slot) {
                tracing::error!("{e:#}");
                self.containers.remove(&id);
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
        pending
    }

    /// Record each resolved container's mount namespace (see module docs).
    fn save(&self, state_dir: &Path) {
        let map: BTreeMap<u64, Record> = self
            .containers
            .iter()
            .map(|(id, r)| (*id, r.record))
            .collect();
        let path = roots_path(state_dir);
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

fn roots_path(state_dir: &Path) -> PathBuf {
    state_dir.join("roots.json")
}

/// The cgroups of `wanted` (ids), found by a bounded walk of the tree.
fn find_cgroups(mount: &Path, wanted: &HashSet<u64>) -> BTreeMap<u64, PathBuf> {
    let mut found: BTreeMap<u64, PathBuf> = BTreeMap::new();
    let mut level = vec![mount.to_path_buf()];
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
    found
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
