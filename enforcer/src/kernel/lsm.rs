//! The BPF LSM hooks: the `lsm/file_open` capability probe, the file hooks
//! and the unix socket hooks (loaded, attached, pinned or adopted as a set),
//! and the kernel BTF their loads need.
use std::{fs, path::Path, time::Instant};

use anyhow::{anyhow, bail, Context, Result};
use aya::programs::{
    links::{FdLink, PinnedLink},
    Program,
};
use enforcer_common::prog_names;

use super::{
    load::timed, private_dir, programs::short_load_error, Kernel, LsmSupport, Pinned, UnixSupport,
};

/// The kernel's BTF as aya reads it (for loading BPF LSM programs).
pub(super) fn parse_aya_btf() -> std::result::Result<aya::Btf, String> {
    timed("parsing the kernel's BTF (aya)", aya::Btf::from_sys_fs).map_err(|e| format!("{e:#}"))
}

impl Kernel {
    /// Whether the BPF LSM unix hooks judge unix sockets.
    pub fn unix_lsm_attached(&self) -> bool {
        self.unix_lsm
    }

    /// Load and attach `lsm/unix_stream_connect` and `lsm/unix_may_send`
    /// (BPF LSM must work): they see the peer socket, so they replace the
    /// cgroup unix hooks (which are then not attached to new cgroups).
    /// With `pin_dir`, the links are pinned (and adopted) like the file hooks'.
    pub fn attach_unix_lsm_hooks(&mut self, pin_dir: Option<&Path>) -> Result<()> {
        if self.unix_lsm {
            return Ok(());
        }
        if !self.unix_lsm_offsets_valid {
            bail!(
                "the BPF LSM unix hooks need struct offsets from the kernel's BTF \
                 (/sys/kernel/btf/vmlinux), which could not be read"
            );
        }
        let (links, pinned) = self.attach_lsm_set(&prog_names::UNIX_LSM, pin_dir)?;
        self.unix_lsm_links = links;
        self.unix_lsm_pinned = pinned;
        self.set_unix_lsm();
        Ok(())
    }

    /// Load and attach the LSM programs `progs` ((program, hook)). With
    /// `pin_dir`, their links are pinned there, and a complete set a
    /// previous daemon pinned there is adopted instead (a partial one is
    /// removed first). Returns the links (unpinned) or the pins.
    fn attach_lsm_set(
        &mut self,
        progs: &[(&'static str, &'static str)],
        pin_dir: Option<&Path>,
    ) -> Result<(Vec<FdLink>, Vec<PinnedLink>)> {
        let kbtf = match self.aya_btf.get_or_insert_with(parse_aya_btf) {
            Ok(b) => &*b,
            Err(e) => bail!("reading kernel BTF: {e}"),
        };
        for (name, hook) in progs {
            let Some(Program::Lsm(prog)) = self.ebpf.program_mut(name) else {
                bail!("eBPF object has no LSM program {name}");
            };
            let started = Instant::now();
            let res = prog.load(hook, kbtf);
            tracing::debug!("loading {name} (lsm/{hook}) took {:?}", started.elapsed());
            res.map_err(|e| {
                let e = format!("{e:#}");
                tracing::debug!("loading {name} (lsm/{hook}): {e}");
                anyhow!("loading {name} (lsm/{hook}): {}", short_load_error(&e))
            })?;
        }
        // A previous daemon's links: adopted when they hold these very
        // programs; else (another version's, or a partial set) they stay
        // attached until this process's replace them (then dropped).
        let mut retiring = Vec::new();
        if let Some(dir) = pin_dir {
            let names: Vec<&str> = progs.iter().map(|(n, _)| *n).collect();
            match self.take_pinned(dir, &names) {
                Pinned::Same(pinned) => return Ok((Vec::new(), pinned)),
                Pinned::Other(old) => retiring = old,
                Pinned::None => {}
            }
        }
        let mut links = Vec::new();
        for (name, hook) in progs {
            let Some(Program::Lsm(prog)) = self.ebpf.program_mut(name) else {
                bail!("eBPF object has no LSM program {name}");
            };
            let id = prog
                .attach()
                .map_err(|e| anyhow!("attaching {name} (lsm/{hook}): {e:#}"))?;
            links.push(FdLink::from(prog.take_link(id)?));
        }
        let Some(dir) = pin_dir else {
            return Ok((links, Vec::new()));
        };
        private_dir(dir)
            .with_context(|| format!("creating link pin directory {}", dir.display()))?;
        let mut pinned = Vec::new();
        for (link, (name, _)) in links.into_iter().zip(progs) {
            let path = dir.join(name);
            let _ = fs::remove_file(&path);
            pinned.push(
                link.pin(&path)
                    .map_err(|e| anyhow!("pinning link {}: {e}", path.display()))?,
            );
        }
        // Ours are attached: the old ones go (closing the last fd detaches).
        drop(retiring);
        Ok((Vec::new(), pinned))
    }

    fn set_unix_lsm(&mut self) {
        self.unix_lsm = true;
        self.unix = UnixSupport {
            available: true,
            detail: format!(
                "BPF LSM unix_stream_connect and unix_may_send attached (the peer socket is \
                 judged: same identity, path by inode, abstract name){}",
                if self.unix.available {
                    "; the cgroup unix hooks are not attached"
                } else {
                    ""
                }
            ),
        };
    }

    /// Load and attach the `lsm/file_open` probe once, then detach it: does
    /// this kernel accept BPF LSM programs?
    pub fn probe_lsm(&mut self) -> LsmSupport {
        let listed = bpf_lsm_listed();
        let no = |detail: String| LsmSupport {
            available: false,
            detail: format!(
                "{} (`bpf` {} in /sys/kernel/security/lsm)",
                detail.trim_end_matches(" Verifier output: ").trim_end(),
                if listed { "is" } else { "is not" }
            ),
        };
        let btf = match self.aya_btf.get_or_insert_with(parse_aya_btf) {
            Ok(b) => &*b,
            Err(e) => return no(format!("no kernel BTF: {e}")),
        };
        let Some(Program::Lsm(prog)) = self.ebpf.program_mut(prog_names::LSM_PROBE) else {
            return no("the eBPF object has no LSM probe program".into());
        };
        if let Err(e) = prog.load("file_open", btf) {
            return no(format!("loading an lsm/file_open program failed: {e}"));
        }
        match prog.attach() {
            Ok(id) => {
                let _ = prog.detach(id);
                LsmSupport {
                    available: true,
                    detail: "lsm/file_open loaded and attached".into(),
                }
            }
            Err(e) => no(format!("attaching an lsm/file_open program failed: {e}")),
        }
    }

    /// Drop the parsed kernel BTF (~9 MB): start-up has loaded what it
    /// loads. A later LSM load parses it again.
    pub fn release_btf(&mut self) {
        self.aya_btf = None;
    }

    /// Whether the BPF LSM file hooks are attached by this process (or
    /// adopted from pins).
    pub fn lsm_hooks_attached(&self) -> bool {
        !self.lsm_links.is_empty() || !self.lsm_pinned.is_empty()
    }

    /// Give the LSM file hooks the running kernel's struct offsets, load
    /// them and attach them (global hooks). With `pin_dir`, the links are
    /// pinned there (and links a previous daemon pinned are adopted), so
    /// file enforcement outlives this process like the cgroup programs do.
    pub fn attach_lsm_hooks(&mut self, pin_dir: Option<&Path>) -> Result<()> {
        if self.lsm_hooks_attached() {
            return Ok(());
        }
        if self.offsets.valid == 0 {
            bail!(
                "the file hooks need struct offsets from the kernel's BTF \
                 (/sys/kernel/btf/vmlinux), which could not be read"
            );
        }
        let (links, pinned) = self.attach_lsm_set(&prog_names::LSM, pin_dir)?;
        self.lsm_links = links;
        self.lsm_pinned = pinned;
        Ok(())
    }

    /// Detach the BPF LSM file hooks and unix hooks (and remove their pins).
    pub fn detach_file_hooks(&mut self) {
        self.lsm_links.clear();
        for p in self.lsm_pinned.drain(..) {
            if let Ok(l) = p.unpin() {
                drop(l);
            }
        }
        self.unix_lsm_links.clear();
        for p in self.unix_lsm_pinned.drain(..) {
            if let Ok(l) = p.unpin() {
                drop(l);
            }
        }
    }
}

/// Whether `bpf` is among the active LSMs (`/sys/kernel/security/lsm`).
pub(super) fn bpf_lsm_listed() -> bool {
    fs::read_to_string("/sys/kernel/security/lsm")
        .map(|l| l.trim().split(',').any(|m| m == "bpf"))
        .unwrap_or(false)
}
