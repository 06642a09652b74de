//! Kernel side of userspace: load the eBPF object, attach it to cgroups,
//! and keep its tables (identities, policy generations, LPM tries).
//!
//! Table updates follow one rule: the kernel always sees a complete policy.
//! A new generation is written under a fresh table id, then one
//! `POLICIES[slot]` update flips every cgroup of that identity to it, then
//! the old generation is deleted. A failure before the flip leaves the old
//! generation in force and removes the partial new one.
pub mod btf;
pub mod cgroup;
pub mod files;
pub mod learned;
pub mod link;
pub mod reset;

mod attach;
mod counters;
mod install;
mod lsm;
mod programs;
mod resolve;
mod unix;

use lsm::{bpf_lsm_listed, parse_aya_btf};
use programs::{load_cgroup_programs, load_unix_programs};

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf},
    programs::links::{FdLink, PinnedLink},
    Ebpf, EbpfLoader,
};
use enforcer_common::{
    action, cache_gen, globals, map_names, policy_flags, verdict, FileKey, FileOffsets,
    FileRuleValue, GlobalConfig, IdentityBinding, NameKey, PolicyState, RuleSet, UnixKey, UnixRule,
    V4Key, V6Key, BLOOM_WORDS, MAX_SLOTS,
};

/// The eBPF object built by build.rs (empty when built with AYA_BUILD_SKIP=1).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer-ebpf"));

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

fn map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<T> {
    let m = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("eBPF object has no map {name}"))?;
    T::try_from(m).with_context(|| format!("map {name} has an unexpected type"))
}

/// This process's PID namespace as the kernel names it: (nsfs `dev_t` in
/// the kernel's encoding, inode). (0, 0) if `/proc/self/ns/pid` cannot be
/// read: then no task matches the resolver thread, and rule paths resolve
/// by `stat` only (said by the resolver's callers).
fn own_pid_ns() -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata("/proc/self/ns/pid") {
        Ok(m) => {
            let dev = m.dev();
            let (major, minor) = (libc::major(dev), libc::minor(dev));
            ((major << 20) | minor, m.ino() as u32)
        }
        Err(e) => {
            tracing::error!("reading /proc/self/ns/pid: {e}; file rule paths resolve by stat only");
            (0, 0)
        }
    }
}

/// A pinned map whose definition is not the one this build's object
/// declares (an older build's: a value that grew, a bigger table) would be
/// reused as it is, and the programs would load against it or be refused
/// by the verifier with a message that names no map. Such a pin is
/// removed (loudly) so that the load creates the map anew: the old
/// programs keep their own reference until they are replaced, and the
/// daemon installs every policy and binding again.
fn unpin_mismatched(pins: &[(&str, PathBuf)]) {
    let obj = match aya_obj::Object::parse(EBPF_OBJECT) {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!("cannot read the eBPF object's map definitions: {e}");
            return;
        }
    };
    for (name, path) in pins {
        if !path.exists() {
            continue;
        }
        let Some(want) = obj.maps.get(*name) else {
            continue;
        };
        let have = match aya::maps::MapInfo::from_pin(path) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(
                    "pinned map {} unreadable ({e}): replacing it",
                    path.display()
                );
                let _ = std::fs::remove_file(path);
                continue;
            }
        };
        let (k, v, n) = (want.key_size(), want.value_size(), want.max_entries());
        // aya reuses a pinned map whatever its type: a type changed between
        // builds with the sizes kept would fail every program load.
        let have_type = have.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        let why = if have_type != want.map_type() {
            Some(format!("map type {have_type} != {}", want.map_type()))
        } else {
            pin_mismatch(
                (k, v, n),
                (have.key_size(), have.value_size(), have.max_entries()),
            )
        };
        if let Some(why) = why {
            tracing::warn!(
                "pinned map {} was made by another enforcer build ({why}): replacing it \
                 (its contents are installed again)",
                path.display()
            );
            if let Err(e) = std::fs::remove_file(path) {
                tracing::error!("removing {}: {e}", path.display());
            }
        }
    }
}

/// `f()`, its time logged at debug level (loading under the VM runner's
/// emulation is slow; this says where the time goes).
fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    tracing::debug!("{what} took {:?}", started.elapsed());
    out
}

/// Why a pinned map's (key size, value size, max entries) is not the
/// object's, or `None`. An object's `max_entries` of 0 is filled in at load
/// (not compared).
fn pin_mismatch(want: (u32, u32, u32), have: (u32, u32, u32)) -> Option<String> {
    if want.0 != have.0 {
        return Some(format!("key size {} != {}", have.0, want.0));
    }
    if want.1 != have.1 {
        return Some(format!("value size {} != {}", have.1, want.1));
    }
    if want.2 != 0 && want.2 != have.2 {
        return Some(format!("max entries {} != {}", have.2, want.2));
    }
    None
}

impl Kernel {
    /// Load the object and every program. `pin_maps`: a bpffs directory where
    /// the maps are pinned by name and reused across restarts (daemon).
    pub fn load(pin_maps: Option<&Path>) -> Result<Self> {
        if EBPF_OBJECT.is_empty() {
            bail!(
                "this enforcer binary was built without its eBPF object (AYA_BUILD_SKIP=1); \
                 rebuild after running scripts/setup.sh"
            );
        }
        raise_memlock();
        let aya_btf = parse_aya_btf();
        let mut loader = EbpfLoader::new();
        loader.btf(aya_btf.as_ref().ok());
        let pin_paths: Vec<(&str, PathBuf)> = match pin_maps {
            Some(dir) => {
                private_dir(dir)
                    .with_context(|| format!("creating pin directory {}", dir.display()))?;
                map_names::ALL
                    .into_iter()
                    .map(|n| (n, dir.join(n)))
                    .collect()
            }
            None => Vec::new(),
        };
        if !pin_paths.is_empty() {
            unpin_mismatched(&pin_paths);
        }
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        // The kernel's BTF, parsed once (under the VM runner's emulation a
        // parse takes seconds).
        let kbtf = timed("parsing the kernel's BTF", || {
            btf::Btf::from_sys_fs().map_err(|e| e.to_string())
        });
        // The file hooks read kernel structs at these offsets (constants to
        // the verifier). Without BTF they stay 0 and the hooks fail closed.
        let offsets = match with_btf(&kbtf, btf::file_offsets) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(
                    "no struct offsets for the file hooks (file policy fails closed): {e}"
                );
                FileOffsets::default()
            }
        };
        let sock_addr = with_btf(&kbtf, btf::sock_addr_offsets);
        let (uaddr_off, uaddrlen_off) = match &sock_addr {
            Ok(o) => *o,
            Err(_) => (0, 0),
        };
        loader.override_global(globals::SOCK_ADDR_UADDR, &uaddr_off, true);
        loader.override_global(globals::SOCK_ADDR_UADDRLEN, &uaddrlen_off, true);
        let unix_lsm = match with_btf(&kbtf, btf::unix_lsm_offsets) {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!("no struct offsets for the BPF LSM unix hooks: {e}");
                enforcer_common::UnixLsmOffsets::default()
            }
        };
        for (name, value) in [
            (globals::SOCKET_SK, &unix_lsm.socket_sk),
            (globals::SOCK_CGROUP, &unix_lsm.sock_cgroup),
            (globals::CGROUP_KN, &unix_lsm.cgroup_kn),
            (globals::KN_ID, &unix_lsm.kn_id),
            (globals::KN_PARENT, &unix_lsm.kn_parent),
            (globals::UNIX_SOCK_ADDR, &unix_lsm.unix_sock_addr),
            (globals::UNIX_SOCK_DENTRY, &unix_lsm.unix_sock_dentry),
            (globals::UNIX_ADDRESS_LEN, &unix_lsm.unix_address_len),
            (globals::UNIX_ADDRESS_NAME, &unix_lsm.unix_address_name),
        ] {
            loader.override_global(name, value, true);
        }
        for (name, value) in [
            (globals::FILE_F_INODE, &offsets.file_f_inode),
            (globals::FILE_DENTRY, &offsets.file_dentry),
            (globals::INODE_I_INO, &offsets.inode_i_ino),
            (globals::INODE_I_SB, &offsets.inode_i_sb),
            (globals::SB_S_DEV, &offsets.sb_s_dev),
            (globals::DENTRY_D_PARENT, &offsets.dentry_d_parent),
            (globals::DENTRY_D_INODE, &offsets.dentry_d_inode),
            (globals::VALID, &offsets.valid),
        ] {
            loader.override_global(name, value, true);
        }
        // The exec hold of per-container file rules: the current task's
        // mount namespace against the host's (pid 1's).
        let (nsproxy, mnt_ns, inum) = match with_btf(&kbtf, btf::mnt_ns_offsets) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!("no struct offsets for a task's mount namespace: programs started in pod containers are not held until their file rules are resolved: {e}");
                (0, 0, 0)
            }
        };
        // The node's mount namespace is taken to be /proc/1's: the node's
        // init, whose namespace the container runtime shares. That holds
        // where the daemon sees the node's PID namespace (hostPID, as
        // deploy/ ships it).
        let host_mnt_ns = match fs::metadata("/proc/1/ns/mnt") {
            Ok(m) => std::os::unix::fs::MetadataExt::ino(&m) as u32,
            // Without BPF LSM there is no exec hold to configure (the
            // capability is reported on its own, loudly): no error for
            // every `enforcer run` on such a host.
            Err(e) if !bpf_lsm_listed() => {
                tracing::debug!("reading /proc/1/ns/mnt: {e} (no BPF LSM: no exec hold)");
                0
            }
            Err(e) => {
                tracing::error!(
                    "reading /proc/1/ns/mnt: {e}: every program started in a pod container \
                     with file rules is held until a daemon resolves its container"
                );
                0
            }
        };
        const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;
        if fs::metadata("/proc/1/ns/pid")
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) != PROC_PID_INIT_INO)
        {
            tracing::warn!(
                "/proc/1 is not the kernel's first process (this daemon does not see the \
                 initial PID namespace): file rules for pods take /proc/1 for the node's init, \
                 whose root and mount namespace the container runtime must share; run the \
                 daemon with hostPID"
            );
        }
        let i_mode = with_btf(&kbtf, |b| b.member_offset("inode", "i_mode")).unwrap_or(0);
        let hold = [
            (globals::TASK_NSPROXY, nsproxy),
            (globals::NSPROXY_MNT_NS, mnt_ns),
            (globals::MNT_NS_INUM, inum),
            (globals::HOST_MNT_NS, host_mnt_ns),
            (globals::INODE_I_MODE, i_mode),
        ];
        for (name, value) in &hold {
            loader.override_global(name, value, true);
        }
        // The current task's cgroup id and process id through the task
        // (one helper call instead of two on every decision); without them
        // the programs call the helpers.
        let task = match with_btf(&kbtf, btf::task_offsets) {
            Ok(o) => match timed("the task-walk probe", || btf::task_walk_loads(&o)) {
                Ok(()) => o,
                Err(e) => {
                    tracing::info!(
                        "cgroup programs cannot read the current task on this kernel (they \
                         call bpf_get_current_cgroup_id instead): {e}"
                    );
                    enforcer_common::TaskOffsets::default()
                }
            },
            Err(e) => {
                tracing::info!(
                    "no struct offsets for reading the current task (the programs call \
                     bpf_get_current_cgroup_id instead): {e}"
                );
                enforcer_common::TaskOffsets::default()
            }
        };
        for (name, value) in globals::TASK.iter().zip([
            &task.task_tgid,
            &task.task_cgroups,
            &task.css_set_dfl_cgrp,
            &task.cgroup_kn,
            &task.kn_id,
            &task.valid,
        ]) {
            loader.override_global(name, value, true);
        }
        // The socket hooks' offsets (a socket's cgroup); without them the
        // foreign-socket check is off (said in the log).
        let sock = match with_btf(&kbtf, btf::sock_offsets) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(
                    "no struct offsets for the socket hooks (foreign inet sockets not judged): {e}"
                );
                enforcer_common::SockOffsets::default()
            }
        };
        let sock_values = [
            sock.socket_sk,
            sock.sock_family,
            sock.sock_cgroup,
            sock.cgroup_kn,
            sock.kn_id,
            sock.kn_parent,
            sock.file_f_inode,
            sock.file_private_data,
            sock.inode_i_mode,
            sock.valid,
        ];
        for (name, value) in globals::SOCK.iter().zip(sock_values.iter()) {
            loader.override_global(name, value, true);
        }
        let mut ebpf =
            timed("loading the eBPF object", || loader.load(EBPF_OBJECT)).map_err(|e| {
                let hint = if matches!(nix::unistd::geteuid().as_raw(), 0) {
                    ""
                } else {
                    " (enforcer must run as root, with CAP_BPF and CAP_SYS_ADMIN)"
                };
                anyhow!("loading the eBPF object failed: {e}{hint}")
            })?;
        load_cgroup_programs(&mut ebpf)?;
        let unix = match sock_addr {
            Err(e) => UnixSupport {
                available: false,
                detail: format!(
                    "no struct bpf_sock_addr_kern.uaddrlen in the kernel's BTF (Linux < 6.7?): {e}"
                ),
            },
            Ok(_) => load_unix_programs(&mut ebpf),
        };
        let mut unix_rules: HashMap<MapData, UnixKey, UnixRule> =
            map(&mut ebpf, map_names::UNIX_RULES)?;
        let mut unix_inodes: HashMap<MapData, FileKey, UnixRule> =
            map(&mut ebpf, map_names::UNIX_INODES)?;
        let identities = map(&mut ebpf, map_names::IDENTITIES)?;
        let gen_map = ebpf
            .take_map(map_names::CACHE_GEN)
            .ok_or_else(|| anyhow!("eBPF object has no map {}", map_names::CACHE_GEN))?;
        // The drainer's own handle on `CACHE_GEN` (it writes the epoch
        // entry only).
        let gen_dup = match &gen_map {
            aya::maps::Map::Array(d) => std::os::fd::AsFd::as_fd(d.fd())
                .try_clone_to_owned()
                .context("duplicating CACHE_GEN's fd")?,
            _ => bail!("map {} has an unexpected type", map_names::CACHE_GEN),
        };
        let mut cache_gen: Array<MapData, u64> =
            Array::try_from(gen_map).context("CACHE_GEN as an array")?;
        if cache_gen.get(&cache_gen::SECRET, 0).unwrap_or(0) == 0 {
            // Once per map (a pinned one keeps its secret: the ways filled
            // with it stay checkable).
            cache_gen
                .set(cache_gen::SECRET, u64::from(random_u32() | 1), 0)
                .context("writing the flow cache's secret")?;
        }
        let policies: Array<MapData, PolicyState> = map(&mut ebpf, map_names::POLICIES)?;
        let mut v4: LpmTrie<MapData, V4Key, RuleSet> = map(&mut ebpf, map_names::EGRESS_V4)?;
        let mut v6: LpmTrie<MapData, V6Key, RuleSet> = map(&mut ebpf, map_names::EGRESS_V6)?;
        let mut names: LpmTrie<MapData, NameKey, RuleSet> = map(&mut ebpf, map_names::NAMES)?;
        let counters = map(&mut ebpf, map_names::COUNTERS)?;
        let reasons = map(&mut ebpf, map_names::REASONS)?;
        let stats = map(&mut ebpf, map_names::STATS)?;
        let config: Array<MapData, GlobalConfig> = map(&mut ebpf, map_names::CONFIG)?;
        let events = Some(map(&mut ebpf, map_names::EVENTS)?);
        let allow_events = Some(map(&mut ebpf, map_names::ALLOW_EVENTS)?);
        // One handle, shared with the flow drainer (which adds to it) under
        // a lock: a slot's reset cannot fall between a drain's read and write.
        let allow_hits: Arc<Mutex<Array<MapData, u64>>> =
            Arc::new(Mutex::new(map(&mut ebpf, map_names::ALLOW_HITS)?));
        let mut side: Array<MapData, u64> = Array::try_from(aya::maps::Map::Array(
            MapData::from_fd(gen_dup).context("a second handle on CACHE_GEN")?,
        ))
        .context("CACHE_GEN as an array")?;
        if pin_maps.is_some() {
            // A previous daemon's ways (pinned) may be live in this epoch,
            // and a way answers decisions (`report::repeat_allow`) by table
            // id: a table id of a policy it removed may be handed out again
            // (ids continue after the highest *present* one). Two epochs
            // on, every way is empty. (What they counted since the last
            // drain is lost, as when a daemon is killed.)
            let epoch = side.get(&cache_gen::EPOCH, 0).unwrap_or(0);
            side.set(cache_gen::EPOCH, epoch.wrapping_add(2), 0)
                .context("advancing the flow epoch past a previous daemon's ways")?;
        }
        let flows = Some(crate::events::flows::FlowTables {
            ways: map(&mut ebpf, map_names::FLOWS)?,
            side,
            spill: map(&mut ebpf, map_names::FLOW_SPILL)?,
            hits: allow_hits.clone(),
        });
        let learned = Some(learned::LearnedTable::new(
            map(&mut ebpf, map_names::LEARNED_V4)?,
            map(&mut ebpf, map_names::LEARNED_V6)?,
        ));
        let mut file_rules: HashMap<MapData, FileKey, FileRuleValue> =
            map(&mut ebpf, map_names::FILE_RULES)?;
        let file_bloom: Array<MapData, u64> = map(&mut ebpf, map_names::FILE_BLOOM)?;
        let mut bloom_words = vec![0u64; BLOOM_WORDS as usize];
        if pin_maps.is_some() {
            // A previous daemon's bits stay until every policy is reinstalled.
            for (i, w) in bloom_words.iter_mut().enumerate() {
                *w = file_bloom.get(&(i as u32), 0).unwrap_or(0);
            }
        }
        let resolved = map(&mut ebpf, map_names::RESOLVED)?;
        let file_ready = map(&mut ebpf, map_names::FILE_READY)?;
        let taint = Arc::new(Mutex::new(TaintTable {
            map: map(&mut ebpf, map_names::TAINTED)?,
        }));
        // Continue after the highest generation already present (pinned
        // maps), and keep steering DNS where a previous daemon's proxies were
        // until the new ones take over (ideally on the same ports).
        let mut next_table_id = 1;
        let mut dns_ports = StdHashMap::new();
        let mut file_slots = HashSet::new();
        // table id -> the slot whose present generation uses it.
        let mut owner: StdHashMap<u32, u32> = StdHashMap::new();
        for s in 0..MAX_SLOTS {
            if let Ok(p) = policies.get(&s, 0) {
                if p.flags & policy_flags::PRESENT != 0 {
                    owner.insert(p.table_id, s);
                    if p.taint_table_id != 0 {
                        owner.insert(p.taint_table_id, s);
                    }
                    if p.ingress_table_id != 0 {
                        owner.insert(p.ingress_table_id, s);
                    }
                    next_table_id = next_table_id
                        .max(p.table_id.wrapping_add(1))
                        .max(p.taint_table_id.wrapping_add(1))
                        .max(p.ingress_table_id.wrapping_add(1));
                    if p.dns_port != 0 {
                        dns_ports.insert(s, p.dns_port);
                    }
                    if p.flags & policy_flags::FILES != 0 {
                        file_slots.insert(s);
                    }
                }
            }
        }
        // A previous daemon's generations (pinned maps): adopted as installed,
        // so that the next install or a removal of that slot deletes them;
        // entries of no present generation (an install interrupted by a
        // crash) are deleted now.
        let mut installed: StdHashMap<u32, Installed> = StdHashMap::new();
        if pin_maps.is_some() {
            let mut orphans = 0usize;
            let keys: Vec<Key<V4Key>> = v4.keys().flatten().collect();
            for k in keys {
                match owner.get(&u32::from_be_bytes(k.data().table_id_be)) {
                    Some(s) => installed.entry(*s).or_default().v4.push(k),
                    None => orphans += usize::from(v4.remove(&k).is_ok()),
                }
            }
            let keys: Vec<Key<V6Key>> = v6.keys().flatten().collect();
            for k in keys {
                match owner.get(&u32::from_be_bytes(k.data().table_id_be)) {
                    Some(s) => installed.entry(*s).or_default().v6.push(k),
                    None => orphans += usize::from(v6.remove(&k).is_ok()),
                }
            }
            let keys: Vec<Key<NameKey>> = names.keys().flatten().collect();
            for k in keys {
                match owner.get(&u32::from_be_bytes(k.data().table_id_be)) {
                    Some(s) => installed.entry(*s).or_default().names.push(k),
                    None => orphans += usize::from(names.remove(&k).is_ok()),
                }
            }
            let keys: Vec<FileKey> = file_rules.keys().flatten().collect();
            for k in keys {
                match owner.get(&k.table_id) {
                    Some(s) => installed.entry(*s).or_default().files.push(k),
                    None => orphans += usize::from(file_rules.remove(&k).is_ok()),
                }
            }
            // (Table id 0: the resolver sockets, rewritten by set_resolver_sockets.)
            let keys: Vec<UnixKey> = unix_rules.keys().flatten().collect();
            for k in keys.into_iter().filter(|k| k.table_id != 0) {
                match owner.get(&k.table_id) {
                    Some(s) => installed.entry(*s).or_default().unix.push(k),
                    None => orphans += usize::from(unix_rules.remove(&k).is_ok()),
                }
            }
            let keys: Vec<FileKey> = unix_inodes.keys().flatten().collect();
            for k in keys.into_iter().filter(|k| k.table_id != 0) {
                match owner.get(&k.table_id) {
                    Some(s) => installed.entry(*s).or_default().unix_inodes.push(k),
                    None => orphans += usize::from(unix_inodes.remove(&k).is_ok()),
                }
            }
            if orphans > 0 {
                tracing::info!(
                    entries = orphans,
                    "deleted pinned table entries of no present policy generation"
                );
            }
        }
        let allow_sample = config.get(&0, 0).map(|c| c.allow_sample).unwrap_or(0);
        Ok(Self {
            ebpf,
            aya_btf: Some(aya_btf),
            retiring: Vec::new(),
            identities,
            cache_gen,
            policies,
            v4,
            v6,
            names,
            counters,
            allow_hits,
            reasons,
            stats,
            config,
            events,
            allow_events,
            flows,
            learned,
            file_rules,
            offsets,
            file_bloom,
            bloom_words,
            resolved,
            file_ready,
            resolver_tid: 0,
            pid_ns: own_pid_ns(),
            taint,
            file_slots,
            allow_sample,
            lsm_links: Vec::new(),
            lsm_pinned: Vec::new(),
            installed,
            unix_rules,
            unix_inodes,
            unix,
            unix_lsm: false,
            unix_lsm_links: Vec::new(),
            unix_lsm_pinned: Vec::new(),
            unix_lsm_offsets_valid: unix_lsm.valid != 0,
            resolvers: Vec::new(),
            dns_ports,
            next_table_id,
        })
    }

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

fn raise_memlock() {
    // Kernels >= 5.11 account BPF memory to the cgroup; older ones need this.
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
}

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

/// `f` of the kernel's BTF (or why there is none).
fn with_btf<T>(
    btf: &std::result::Result<btf::Btf, String>,
    f: impl FnOnce(&btf::Btf) -> std::result::Result<T, btf::BtfError>,
) -> std::result::Result<T, String> {
    match btf {
        Ok(b) => f(b).map_err(|e| e.to_string()),
        Err(e) => Err(e.clone()),
    }
}

/// A random u32 from the kernel (`getrandom`), for secrets the programs
/// use; the time as a fallback when it fails.
fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n == 4 {
        u32::from_ne_bytes(b)
    } else {
        crate::kernel::learned::monotonic_ns() as u32
    }
}
