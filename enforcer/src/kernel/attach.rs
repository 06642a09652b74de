//! The programs on cgroups: attach every cgroup program to a cgroup (and
//! pin the links), adopt links a previous daemon pinned, and bind cgroups
//! to identity slots (`IDENTITIES`).
use std::{fs, path::Path};

use anyhow::{anyhow, bail, Context, Result};
use aya::programs::{
    cgroup_skb::CgroupSkbAttachType,
    links::{FdLink, PinnedLink},
    CgroupAttachMode, Program,
};
use enforcer_common::{prog_names, IdentityBinding};

use super::{cgroup, link, private_dir, Attachment, Kernel, Pinned};

impl Kernel {
    /// The links a previous daemon pinned in `dir` for `names` (all of them
    /// loaded in this process): `Same` when every one is there and runs
    /// the program this process loaded under that name (same
    /// instructions: the kernel's tag), so it may be adopted; else the
    /// pins found are removed and their links returned still open
    /// (`Other`: they stay attached until the caller drops them, after it
    /// attached its own).
    pub(super) fn take_pinned(&self, dir: &Path, names: &[&str]) -> Pinned {
        let mut same = true;
        let mut found = Vec::new();
        for name in names {
            let path = dir.join(name);
            let Ok(link) = PinnedLink::from_pin(&path) else {
                same = false;
                continue;
            };
            let ours = self
                .ebpf
                .program(name)
                .and_then(|p| p.info().ok())
                .map(|i| i.tag());
            let theirs = PinnedLink::from_pin(&path)
                .ok()
                .map(FdLink::from)
                .and_then(|l| l.info().ok())
                .map(|i| i.program_id())
                .and_then(|id| {
                    aya::programs::loaded_programs()
                        .filter_map(|p| p.ok())
                        .find(|p| p.id() == id)
                        .map(|p| p.tag())
                });
            if ours.is_none() || ours != theirs {
                same = false;
            }
            found.push(link);
        }
        if found.is_empty() {
            return Pinned::None;
        }
        if same {
            return Pinned::Same(found);
        }
        tracing::info!(
            dir = %dir.display(),
            "pinned links of another enforcer build (or an incomplete set): replacing them"
        );
        Pinned::Other(found.into_iter().filter_map(|p| p.unpin().ok()).collect())
    }

    /// The cgroup programs this kernel attaches: every one of
    /// `prog_names::ALL`, and the unix socket hooks where they loaded.
    fn cgroup_programs(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = prog_names::ALL.to_vec();
        if self.unix.available && !self.unix_lsm {
            names.extend(prog_names::UNIX);
        }
        names
    }

    /// Attach every program to `cgroup`. With `pin_dir`, the links are pinned
    /// there so that enforcement outlives this process.
    pub fn attach(&mut self, cgroup: &Path, pin_dir: Option<&Path>) -> Result<Attachment> {
        let cgroup_id = cgroup::cgroup_id(cgroup)?;
        let file = fs::File::open(cgroup)
            .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        let mut links = Vec::new();
        // Every cgroup program but cgroup/setsockopt (linked by hand below).
        let names: Vec<&'static str> = self
            .cgroup_programs()
            .into_iter()
            .filter(|n| *n != prog_names::SETSOCKOPT)
            .collect();
        for name in names.iter().copied() {
            let prog = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("no program {name}"))?;
            let link: FdLink = match prog {
                Program::CgroupSockAddr(p) => {
                    let id = p
                        .attach(&file, CgroupAttachMode::Single)
                        .map_err(|e| anyhow!("attaching {name} to {}: {e:#}", cgroup.display()))?;
                    p.take_link(id)?
                        .try_into()
                        .map_err(|e| anyhow!("{name}: {e}"))?
                }
                Program::CgroupSock(p) => {
                    let id = p
                        .attach(&file, CgroupAttachMode::Single)
                        .map_err(|e| anyhow!("attaching {name} to {}: {e:#}", cgroup.display()))?;
                    p.take_link(id)?
                        .try_into()
                        .map_err(|e| anyhow!("{name}: {e}"))?
                }
                Program::CgroupSkb(p) => {
                    let kind = if name == prog_names::INGRESS {
                        CgroupSkbAttachType::Ingress
                    } else {
                        CgroupSkbAttachType::Egress
                    };
                    let id = p
                        .attach(&file, kind, CgroupAttachMode::Single)
                        .map_err(|e| anyhow!("attaching {name} to {}: {e:#}", cgroup.display()))?;
                    p.take_link(id)?
                        .try_into()
                        .map_err(|e| anyhow!("{name}: {e}"))?
                }
                _ => bail!("program {name} has an unexpected type"),
            };
            links.push(link);
        }
        // cgroup/setsockopt: linked by hand (see link.rs).
        let sockopt = {
            let Some(Program::CgroupSockopt(p)) = self.ebpf.program(prog_names::SETSOCKOPT) else {
                bail!("no program {}", prog_names::SETSOCKOPT);
            };
            let fd = p
                .fd()
                .map_err(|e| anyhow!("{}: {e}", prog_names::SETSOCKOPT))?;
            link::cgroup_link(
                std::os::fd::AsFd::as_fd(fd),
                std::os::fd::AsFd::as_fd(&file),
                link::BPF_CGROUP_SETSOCKOPT,
            )
            .map_err(|e| {
                anyhow!(
                    "attaching {} to {}: {e}",
                    prog_names::SETSOCKOPT,
                    cgroup.display()
                )
            })?
        };
        let mut att = Attachment {
            cgroup_id,
            links,
            pinned: Vec::new(),
            raw: Vec::new(),
            pin_dir: None,
        };
        if let Some(dir) = pin_dir {
            private_dir(dir)
                .with_context(|| format!("creating link pin directory {}", dir.display()))?;
            let path = dir.join(prog_names::SETSOCKOPT);
            let _ = fs::remove_file(&path);
            link::pin(std::os::fd::AsFd::as_fd(&sockopt), &path)
                .map_err(|e| anyhow!("pinning link {}: {e}", path.display()))?;
            drop(sockopt);
            att.pinned.push(
                PinnedLink::from_pin(&path)
                    .map_err(|e| anyhow!("reopening pinned link {}: {e}", path.display()))?,
            );
            for (link, name) in std::mem::take(&mut att.links).into_iter().zip(names) {
                let path = dir.join(name);
                let _ = fs::remove_file(&path);
                let pinned = link
                    .pin(&path)
                    .map_err(|e| anyhow!("pinning link {}: {e}", path.display()))?;
                att.pinned.push(pinned);
            }
            att.pin_dir = Some(dir.to_path_buf());
        } else {
            att.raw.push(sockopt);
        }
        // Another build's links for this cgroup (`adopt_pinned`) go now:
        // this build's are attached.
        self.retiring.clear();
        Ok(att)
    }

    /// Re-adopt links that a previous daemon of this build pinned in `dir`
    /// for `cgroup` (enforcement survived the restart). `None` when nothing
    /// complete of this build is pinned there: a partial set (crash
    /// mid-attach) or another build's (an upgrade: its programs read maps
    /// this build no longer keeps up) is unpinned and stays attached until
    /// the caller's `attach` has attached this build's.
    pub fn adopt_pinned(&mut self, cgroup: &Path, dir: &Path) -> Result<Option<Attachment>> {
        if !dir.is_dir() {
            return Ok(None);
        }
        let cgroup_id = cgroup::cgroup_id(cgroup)?;
        let names = self.cgroup_programs();
        let pinned = match self.take_pinned(dir, &names) {
            Pinned::Same(p) => p,
            Pinned::Other(old) => {
                // Attached until `attach` has attached this build's.
                self.retiring.extend(old);
                return Ok(None);
            }
            Pinned::None => return Ok(None),
        };
        Ok(Some(Attachment {
            cgroup_id,
            links: Vec::new(),
            pinned,
            raw: Vec::new(),
            pin_dir: Some(dir.to_path_buf()),
        }))
    }

    /// Bind a cgroup (and its descendants) to identity `slot`.
    pub fn bind_cgroup(&mut self, cgroup_id: u64, slot: u32) -> Result<()> {
        self.identities
            .insert(cgroup_id, IdentityBinding { slot, _pad: 0 }, 0)
            .with_context(|| format!("binding cgroup {cgroup_id} to slot {slot}"))?;
        self.bump_gen()
    }

    /// The identity slots some cgroup is bound to (the binding map, pinned:
    /// it also holds cgroups of a previous run); `None` when the map cannot
    /// be read completely.
    pub fn slots_in_use(&self) -> Option<std::collections::HashSet<u32>> {
        let mut out = std::collections::HashSet::new();
        for r in self.identities.iter() {
            let (_, b) = r.ok()?;
            out.insert(b.slot);
        }
        Some(out)
    }

    pub fn unbind_cgroup(&mut self, cgroup_id: u64) -> Result<()> {
        match self.identities.remove(&cgroup_id) {
            Ok(()) => self.bump_gen(),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
