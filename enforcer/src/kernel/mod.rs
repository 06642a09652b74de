//! Kernel side of userspace: load the eBPF object, attach it to cgroups,
//! and keep its tables (identities, policy generations, LPM tries).
//!
//! Table updates follow one rule: the kernel always sees a complete policy.
//! A new generation is written under a fresh table id, then one
//! `POLICIES[slot]` update flips every cgroup of that identity to it, then
//! the old generation is deleted. A failure before the flip leaves the old
//! generation in force and removes the partial new one.
//!
//! This file holds the types (`Kernel`, `Attachment`, what the kernel
//! supports) and small accessors; the methods of `Kernel` are in one file
//! per concern: `load` (with `program_globals` and `programs`), `attach`
//! (cgroups), `lsm` (BPF LSM hooks), `install` (the rule above), `unix`
//! (unix socket inodes), `resolve` (file rule paths) and `counters`.
pub mod btf;
pub mod cgroup;
pub mod files;
pub mod learned;
pub mod link;
pub mod reset;

mod attach;
mod counters;
mod install;
mod load;
mod lsm;
mod program_globals;
mod programs;
mod resolve;
mod unix;

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf},
    programs::links::{FdLink, PinnedLink},
    Ebpf,
};
use enforcer_common::{
    action, cache_gen, policy_flags, verdict, FileKey, FileOffsets, FileRuleValue, GlobalConfig,
    IdentityBinding, NameKey, PolicyState, RuleSet, UnixKey, UnixRule, V4Key, V6Key,
};

/// Return the heap memory freed so far to the kernel (glibc's `malloc_trim`):
/// loading parses the kernel's BTF and the eBPF object into many small
/// allocations that the allocator keeps after they are freed.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns unused heap pages; no pointer is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Per-slot bookkeeping of what is installed in the tables (one generation:
/// its main and onTaint LPM entries and its file rules).
#[derive(Default)]
struct Installed {
    v4: Vec<Key<V4Key>>,
    v6: Vec<Key<V6Key>>,
    files: Vec<FileKey>,
    names: Vec<Key<NameKey>>,
    /// `spec.local` entries (`UNIX_RULES`).
    unix: Vec<UnixKey>,
    /// `spec.local` paths as socket inodes (`UNIX_INODES`, BPF LSM hooks).
    unix_inodes: Vec<FileKey>,
}

/// `TAINTED[slot]`: set by the kernel when an identity opens a `taint`
/// file; shared with the DNS proxy (which then answers onTaint names only).
pub struct TaintTable {
    map: Array<MapData, u64>,
}

impl TaintTable {
    /// CLOCK_MONOTONIC ns of the taint, if `slot` is tainted.
    pub fn tainted_since(&self, slot: u32) -> Option<u64> {
        self.map.get(&slot, 0).ok().filter(|t| *t != 0)
    }

    pub fn is_tainted(&self, slot: u32) -> bool {
        self.tainted_since(slot).is_some()
    }

    /// The identity's workload ended: the next one starts clean.
    pub fn clear(&mut self, slot: u32) -> Result<()> {
        self.map.set(slot, 0, 0).context("writing TAINTED")
    }
}

/// What a previous daemon pinned (`Kernel::take_pinned`).
enum Pinned {
    None,
    /// Every link, each running the program this process loaded.
    Same(Vec<PinnedLink>),
    /// Links of other programs or an incomplete set: unpinned, still open.
    Other(Vec<FdLink>),
}

pub struct Kernel {
    ebpf: Ebpf,
    /// The kernel's BTF as aya reads it, parsed once for every BPF LSM
    /// program's load (the LSM probe, the file, socket and unix sets: a
    /// parse takes over a second under the VM runner's emulation; aya's
    /// `EbpfLoader::new` parses its own copy as well). ~9 MB: dropped by
    /// [`Self::release_btf`] once start-up attached what it attaches, parsed
    /// again if a later load needs it (`None`). An error says why there is
    /// none.
    aya_btf: Option<std::result::Result<aya::Btf, String>>,
    /// Another build's cgroup links being replaced (`adopt_pinned`): open
    /// (attached) until `attach` has attached this build's.
    retiring: Vec<FdLink>,
    identities: HashMap<MapData, u64, IdentityBinding>,
    /// `CACHE_GEN` (`enforcer_common::cache_gen`): its verdict generation
    /// is moved on after every change of `identities`, `policies` and a
    /// taint's clearing (it invalidates the programs' per-CPU identity
    /// cache and flow ways).
    cache_gen: Array<MapData, u64>,
    policies: Array<MapData, PolicyState>,
    v4: LpmTrie<MapData, V4Key, RuleSet>,
    v6: LpmTrie<MapData, V6Key, RuleSet>,
    names: LpmTrie<MapData, NameKey, RuleSet>,
    counters: PerCpuArray<MapData, u64>,
    /// `ALLOW_HITS` (the flow drainer writes it; added to `COUNTERS`'
    /// allows).
    allow_hits: Arc<Mutex<Array<MapData, u64>>>,
    reasons: PerCpuArray<MapData, u64>,
    stats: PerCpuArray<MapData, u64>,
    config: Array<MapData, GlobalConfig>,
    events: Option<RingBuf<MapData>>,
    allow_events: Option<RingBuf<MapData>>,
    flows: Option<crate::events::flows::FlowTables>,
    learned: Option<learned::LearnedTable>,
    file_rules: HashMap<MapData, FileKey, FileRuleValue>,
    /// Struct member offsets given to the file hooks (valid == 0: none).
    offsets: FileOffsets,
    file_bloom: Array<MapData, u64>,
    /// What `FILE_BLOOM` holds (mirror).
    bloom_words: Vec<u64>,
    resolved: HashMap<MapData, FileKey, u32>,
    /// `FILE_READY`: container cgroups resolved for `FILES_PER_ROOT` slots.
    file_ready: HashMap<MapData, u64, u32>,
    resolver_tid: u32,
    /// This process's PID namespace (kernel `dev_t` of nsfs, inode): the
    /// hooks recognize the resolver thread by its id in it.
    pid_ns: (u32, u32),
    taint: Arc<Mutex<TaintTable>>,
    /// Slots whose policy has file rules (`CONFIG.file_slots`).
    file_slots: HashSet<u32>,
    allow_sample: u32,
    /// The BPF LSM file hooks, while attached.
    lsm_links: Vec<FdLink>,
    lsm_pinned: Vec<PinnedLink>,
    installed: StdHashMap<u32, Installed>,
    unix_rules: HashMap<MapData, UnixKey, UnixRule>,
    unix_inodes: HashMap<MapData, FileKey, UnixRule>,
    /// Whether the unix socket hooks loaded (Linux >= 6.7).
    unix: UnixSupport,
    /// The BPF LSM unix hooks are attached: they judge unix sockets, and
    /// the cgroup unix hooks are not attached.
    unix_lsm: bool,
    unix_lsm_links: Vec<FdLink>,
    unix_lsm_pinned: Vec<PinnedLink>,
    unix_lsm_offsets_valid: bool,
    /// The resolver sockets (re-resolved to inodes with each install).
    resolvers: Vec<PathBuf>,
    /// DNS proxy port per slot (kept across policy swaps).
    dns_ports: StdHashMap<u32, u16>,
    next_table_id: u32,
}

/// Programs attached to one cgroup. Dropping it detaches them, unless they
/// were pinned (then `release` unpins and detaches).
pub struct Attachment {
    pub cgroup_id: u64,
    links: Vec<FdLink>,
    pinned: Vec<PinnedLink>,
    /// Links made by hand (`link.rs`), not pinned: closing them detaches.
    raw: Vec<std::os::fd::OwnedFd>,
    pin_dir: Option<PathBuf>,
}

impl Attachment {
    /// Unpin (if pinned) and detach every program from the cgroup.
    pub fn release(mut self) {
        for p in self.pinned.drain(..) {
            match p.unpin() {
                Ok(link) => drop(link),
                Err(e) => tracing::warn!("unpinning link: {e}"),
            }
        }
        self.links.clear();
        self.raw.clear();
        if let Some(d) = self.pin_dir.take() {
            let _ = fs::remove_dir(&d);
        }
    }
}

/// Whether the running kernel accepts BPF LSM programs (file policy needs it).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct LsmSupport {
    pub available: bool,
    /// What the probe saw: the error, or "lsm/file_open loaded and attached".
    pub detail: String,
}

/// Whether unix socket policy is enforced: the BPF LSM unix hooks are
/// attached, or the cgroup unix hooks (`cgroup/connect_unix`,
/// `cgroup/sendmsg_unix`, Linux >= 6.7) loaded. Without either
/// `spec.local` is not enforced and agents reach every unix socket.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct UnixSupport {
    pub available: bool,
    pub detail: String,
}

/// What is lost without the unix socket hooks, in the words a user can act on.
pub const UNIX_REQUIREMENT: &str = "unix socket policy (`spec.local`, the resolver IPC refusal) \
    needs BPF LSM (lsm/unix_stream_connect, lsm/unix_may_send) or the cgroup/connect_unix and \
    cgroup/sendmsg_unix hooks of Linux >= 6.7; without them agents can connect to every unix \
    socket (local proxies, docker.sock, D-Bus, systemd-resolved's varlink socket)";

/// The kernel requirement, in the words a user can act on.
pub const LSM_REQUIREMENT: &str = "file policy (`files:`, `onTaint:`) needs BPF LSM: a kernel \
    built with CONFIG_BPF_LSM, booted with `bpf` in the lsm= list (e.g. \
    lsm=lockdown,capability,landlock,yama,apparmor,bpf), that lets enforcer load and attach \
    lsm/ programs";

/// Counters of one identity slot: `[action][verdict]`.
pub type SlotCounters = [[u64; verdict::COUNT as usize]; action::COUNT as usize];

impl Kernel {
    /// The ring buffers of decisions, (denials and audits, allow records)
    /// (taken once by the event reader).
    pub fn take_events(&mut self) -> Option<(RingBuf<MapData>, RingBuf<MapData>)> {
        Some((self.events.take()?, self.allow_events.take()?))
    }

    /// The allowed-flow tables (taken once by the flow drainer).
    pub fn take_flows(&mut self) -> Option<crate::events::flows::FlowTables> {
        self.flows.take()
    }

    /// The learned-address table (taken once, shared with the DNS proxy).
    pub fn take_learned(&mut self) -> Option<learned::LearnedTable> {
        self.learned.take()
    }

    /// Steer identity `slot`'s port-53 traffic to its DNS proxy on `port`
    /// (0: no steering).
    pub fn set_dns_port(&mut self, slot: u32, port: u16) -> Result<()> {
        self.dns_ports.insert(slot, port);
        let mut st = self.policies.get(&slot, 0).context("reading POLICIES")?;
        if st.flags & policy_flags::PRESENT == 0 {
            // Applied with the policy when it is installed.
            return Ok(());
        }
        st.dns_port = port;
        self.policies.set(slot, st, 0).context("writing POLICIES")?;
        self.bump_gen()
    }

    /// Whether `POLICIES[slot]` holds a policy (one this process installed,
    /// or a previous daemon's, pinned).
    pub fn policy_present(&self, slot: u32) -> bool {
        self.policies
            .get(&slot, 0)
            .is_ok_and(|p| p.flags & policy_flags::PRESENT != 0)
    }

    /// The DNS proxy port of `slot` (0: none).
    pub fn dns_port(&self, slot: u32) -> u16 {
        self.dns_ports.get(&slot).copied().unwrap_or(0)
    }

    pub fn set_allow_sample(&mut self, allow_sample: u32) -> Result<()> {
        self.allow_sample = allow_sample;
        self.write_config()
    }

    fn write_config(&mut self) -> Result<()> {
        self.config
            .set(
                0,
                GlobalConfig {
                    allow_sample: self.allow_sample,
                    file_slots: self.file_slots.len() as u32,
                    resolver_tid: self.resolver_tid,
                    resolver_pidns_ino: self.pid_ns.1,
                    resolver_pidns_dev: self.pid_ns.0,
                    _pad: 0,
                },
                0,
            )
            .context("writing CONFIG")
    }

    /// The taint flags (shared with the DNS proxy and the status report).
    pub fn taint_table(&self) -> Arc<Mutex<TaintTable>> {
        self.taint.clone()
    }

    /// After a change of `IDENTITIES`, `POLICIES` or `TAINTED` (written
    /// before this reads the generation): every CPU's cached identity
    /// resolution and every flow way that answers verdicts are stale from
    /// now on (see `enforcer-ebpf/src/identity.rs` and `report.rs`). Only
    /// this process writes `USER_GEN` (the file hook adds to `TAINT_GEN`).
    fn bump_gen(&mut self) -> Result<()> {
        let gen = self
            .cache_gen
            .get(&cache_gen::USER_GEN, 0)
            .context("reading the verdict generation")?;
        self.cache_gen
            .set(cache_gen::USER_GEN, gen.wrapping_add(1), 0)
            .context("moving the verdict generation on")
    }
}

/// The oldest Linux whose BPF helpers cover every program this enforcer
/// loads (`bpf_loop`, the newest of them, came in 5.17).
pub const MIN_LINUX: &str = "5.17";

/// Create `dir` (and missing parents) for pinned objects: owned by root,
/// mode 0700, so that no other uid can open a pin (`BPF_OBJ_GET` checks
/// only the file's permissions since Linux 6.5). An existing directory with
/// wider permissions is tightened (and said so). Parents made here are 0700
/// too. uid 0 without capabilities is still the owner: workloads must not
/// see the bpffs at all (`enforcer run` hides it; pods do not mount it).
pub fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = fs::metadata(dir)?;
    if meta.mode() & 0o077 != 0 || meta.uid() != 0 {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{:o}", meta.mode() & 0o7777),
            uid = meta.uid(),
            "pin directory was open to other users: now root-owned, mode 0700"
        );
        std::os::unix::fs::chown(dir, Some(0), Some(0))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}
