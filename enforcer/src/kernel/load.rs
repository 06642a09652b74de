//! Loading the eBPF object: pinned maps checked against this build's (and
//! reused across restarts), the programs' globals (`program_globals.rs`),
//! the programs, and the `Kernel` around the maps, with a previous
//! daemon's policy generations adopted.
use std::{
    collections::{HashMap as StdHashMap, HashSet},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{lpm_trie::Key, Array, MapData},
    Ebpf, EbpfLoader,
};
use enforcer_common::{
    cache_gen, map_names, policy_flags, FileKey, NameKey, UnixKey, V4Key, V6Key, BLOOM_WORDS,
    MAX_SLOTS,
};

use super::{
    learned,
    lsm::parse_aya_btf,
    private_dir,
    program_globals::ProgramGlobals,
    programs::{load_cgroup_programs, load_unix_programs},
    Kernel, TaintTable, UnixSupport,
};
use crate::events::flows::FlowTables;

/// The eBPF object built by build.rs (empty when built with AYA_BUILD_SKIP=1).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer-ebpf"));

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
pub(super) fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
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
    ///
    /// In phases: the map pins are checked, the programs' globals read from
    /// the kernel's BTF, the object loaded, its cgroup programs and then
    /// the optional unix socket hooks; the `Kernel` is built around its
    /// maps, and a previous daemon's policy generations (pinned maps) are
    /// adopted.
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
        let pin_paths = map_pin_paths(pin_maps)?;
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let program_globals = ProgramGlobals::read();
        program_globals.set(&mut loader);
        let mut ebpf = load_object(&mut loader)?;
        load_cgroup_programs(&mut ebpf)?;
        let unix = match &program_globals.sock_addr {
            Err(e) => UnixSupport {
                available: false,
                detail: format!(
                    "no struct bpf_sock_addr_kern.uaddrlen in the kernel's BTF (Linux < 6.7?): {e}"
                ),
            },
            Ok(_) => load_unix_programs(&mut ebpf),
        };
        let pinned = pin_maps.is_some();
        let mut kernel = Self::with_maps(ebpf, aya_btf, &program_globals, unix, pinned)?;
        let owner = kernel.read_present_policies();
        if pinned {
            kernel.adopt_pinned_generations(&owner);
        }
        kernel.allow_sample = kernel
            .config
            .get(&0, 0)
            .map(|c| c.allow_sample)
            .unwrap_or(0);
        kernel.pid_ns = own_pid_ns();
        Ok(kernel)
    }

    /// The `Kernel` around the loaded object's maps, taken one by one (an
    /// error names the first one missing). `pinned`: the maps are pinned,
    /// and may hold a previous daemon's flow ways and bloom bits. What
    /// `load` reads from the maps afterwards (the present generations, the
    /// sampling rate) and this process's PID namespace start empty here.
    fn with_maps(
        mut ebpf: Ebpf,
        aya_btf: std::result::Result<aya::Btf, String>,
        program_globals: &ProgramGlobals,
        unix: UnixSupport,
        pinned: bool,
    ) -> Result<Self> {
        let unix_rules = map(&mut ebpf, map_names::UNIX_RULES)?;
        let unix_inodes = map(&mut ebpf, map_names::UNIX_INODES)?;
        let identities = map(&mut ebpf, map_names::IDENTITIES)?;
        let (cache_gen, gen_dup) = cache_gen_map(&mut ebpf)?;
        let policies = map(&mut ebpf, map_names::POLICIES)?;
        let v4 = map(&mut ebpf, map_names::EGRESS_V4)?;
        let v6 = map(&mut ebpf, map_names::EGRESS_V6)?;
        let names = map(&mut ebpf, map_names::NAMES)?;
        let counters = map(&mut ebpf, map_names::COUNTERS)?;
        let reasons = map(&mut ebpf, map_names::REASONS)?;
        let stats = map(&mut ebpf, map_names::STATS)?;
        let config = map(&mut ebpf, map_names::CONFIG)?;
        let events = Some(map(&mut ebpf, map_names::EVENTS)?);
        let allow_events = Some(map(&mut ebpf, map_names::ALLOW_EVENTS)?);
        let flows = flow_tables(&mut ebpf, gen_dup, pinned)?;
        let allow_hits = flows.hits.clone();
        let learned = Some(learned::LearnedTable::new(
            map(&mut ebpf, map_names::LEARNED_V4)?,
            map(&mut ebpf, map_names::LEARNED_V6)?,
        ));
        let file_rules = map(&mut ebpf, map_names::FILE_RULES)?;
        let file_bloom: Array<MapData, u64> = map(&mut ebpf, map_names::FILE_BLOOM)?;
        let bloom_words = bloom_mirror(&file_bloom, pinned);
        let resolved = map(&mut ebpf, map_names::RESOLVED)?;
        let file_ready = map(&mut ebpf, map_names::FILE_READY)?;
        let taint = Arc::new(Mutex::new(TaintTable {
            map: map(&mut ebpf, map_names::TAINTED)?,
        }));
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
            flows: Some(flows),
            learned,
            file_rules,
            offsets: program_globals.files,
            file_bloom,
            bloom_words,
            resolved,
            file_ready,
            resolver_tid: 0,
            pid_ns: (0, 0),
            taint,
            file_slots: HashSet::new(),
            allow_sample: 0,
            lsm_links: Vec::new(),
            lsm_pinned: Vec::new(),
            installed: StdHashMap::new(),
            unix_rules,
            unix_inodes,
            unix,
            unix_lsm: false,
            unix_lsm_links: Vec::new(),
            unix_lsm_pinned: Vec::new(),
            unix_lsm_offsets_valid: program_globals.unix_lsm.valid != 0,
            resolvers: Vec::new(),
            dns_ports: StdHashMap::new(),
            next_table_id: 1,
        })
    }

    /// The policies already present in `POLICIES` (pinned maps): continue
    /// after the highest generation already present, and keep steering DNS
    /// where a previous daemon's proxies were until the new ones take over
    /// (ideally on the same ports). Returns table id -> the slot whose
    /// present generation uses it.
    fn read_present_policies(&mut self) -> StdHashMap<u32, u32> {
        let mut owner: StdHashMap<u32, u32> = StdHashMap::new();
        for s in 0..MAX_SLOTS {
            if let Ok(p) = self.policies.get(&s, 0) {
                if p.flags & policy_flags::PRESENT != 0 {
                    owner.insert(p.table_id, s);
                    if p.taint_table_id != 0 {
                        owner.insert(p.taint_table_id, s);
                    }
                    if p.ingress_table_id != 0 {
                        owner.insert(p.ingress_table_id, s);
                    }
                    self.next_table_id = self
                        .next_table_id
                        .max(p.table_id.wrapping_add(1))
                        .max(p.taint_table_id.wrapping_add(1))
                        .max(p.ingress_table_id.wrapping_add(1));
                    if p.dns_port != 0 {
                        self.dns_ports.insert(s, p.dns_port);
                    }
                    if p.flags & policy_flags::FILES != 0 {
                        self.file_slots.insert(s);
                    }
                }
            }
        }
        owner
    }

    /// A previous daemon's generations (pinned maps): adopted as installed,
    /// so that the next install or a removal of that slot deletes them;
    /// entries of no present generation (an install interrupted by a
    /// crash) are deleted now. `owner`: table id -> slot.
    fn adopt_pinned_generations(&mut self, owner: &StdHashMap<u32, u32>) {
        let installed = &mut self.installed;
        let mut orphans = 0usize;
        let keys: Vec<Key<V4Key>> = self.v4.keys().flatten().collect();
        for k in keys {
            match owner.get(&u32::from_be_bytes(k.data().table_id_be)) {
                Some(s) => installed.entry(*s).or_default().v4.push(k),
                None => orphans += usize::from(self.v4.remove(&k).is_ok()),
            }
        }
        let keys: Vec<Key<V6Key>> = self.v6.keys().flatten().collect();
        for k in keys {
            match owner.get(&u32::from_be_bytes(k.data().table_id_be)) {
                Some(s) => installed.entry(*s).or_default().v6.push(k),
                None => orphans += usize::from(self.v6.remove(&k).is_ok()),
            }
        }
        let keys: Vec<Key<NameKey>> = self.names.keys().flatten().collect();
        for k in keys {
            match owner.get(&u32::from_be_bytes(k.data().table_id_be)) {
                Some(s) => installed.entry(*s).or_default().names.push(k),
                None => orphans += usize::from(self.names.remove(&k).is_ok()),
            }
        }
        let keys: Vec<FileKey> = self.file_rules.keys().flatten().collect();
        for k in keys {
            match owner.get(&k.table_id) {
                Some(s) => installed.entry(*s).or_default().files.push(k),
                None => orphans += usize::from(self.file_rules.remove(&k).is_ok()),
            }
        }
        // (Table id 0: the resolver sockets, rewritten by set_resolver_sockets.)
        let keys: Vec<UnixKey> = self.unix_rules.keys().flatten().collect();
        for k in keys.into_iter().filter(|k| k.table_id != 0) {
            match owner.get(&k.table_id) {
                Some(s) => installed.entry(*s).or_default().unix.push(k),
                None => orphans += usize::from(self.unix_rules.remove(&k).is_ok()),
            }
        }
        let keys: Vec<FileKey> = self.unix_inodes.keys().flatten().collect();
        for k in keys.into_iter().filter(|k| k.table_id != 0) {
            match owner.get(&k.table_id) {
                Some(s) => installed.entry(*s).or_default().unix_inodes.push(k),
                None => orphans += usize::from(self.unix_inodes.remove(&k).is_ok()),
            }
        }
        if orphans > 0 {
            tracing::info!(
                entries = orphans,
                "deleted pinned table entries of no present policy generation"
            );
        }
    }
}

/// Where each map is pinned in `pin_maps` (by name), the directory made
/// private first; pins whose definition is not this build's are removed
/// (`unpin_mismatched`). Empty without `pin_maps`.
fn map_pin_paths(pin_maps: Option<&Path>) -> Result<Vec<(&'static str, PathBuf)>> {
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
    Ok(pin_paths)
}

/// The object, its maps created (or pinned ones reused) and its globals
/// set; its programs are not loaded yet.
fn load_object(loader: &mut EbpfLoader) -> Result<Ebpf> {
    timed("loading the eBPF object", || loader.load(EBPF_OBJECT)).map_err(|e| {
        let hint = if matches!(nix::unistd::geteuid().as_raw(), 0) {
            ""
        } else {
            " (enforcer must run as root, with CAP_BPF and CAP_SYS_ADMIN)"
        };
        anyhow!("loading the eBPF object failed: {e}{hint}")
    })
}

/// `CACHE_GEN`, with its flow cache secret written once per map, and a
/// second fd on it for the flow drainer.
fn cache_gen_map(ebpf: &mut Ebpf) -> Result<(Array<MapData, u64>, OwnedFd)> {
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
    Ok((cache_gen, gen_dup))
}

/// The allowed-flow tables (with `ALLOW_HITS`, shared with `Kernel`), whose
/// side handle on `CACHE_GEN` is `gen_dup`. `pinned`: a previous daemon's
/// ways are made stale.
fn flow_tables(ebpf: &mut Ebpf, gen_dup: OwnedFd, pinned: bool) -> Result<FlowTables> {
    // One handle, shared with the flow drainer (which adds to it) under
    // a lock: a slot's reset cannot fall between a drain's read and write.
    let allow_hits: Arc<Mutex<Array<MapData, u64>>> =
        Arc::new(Mutex::new(map(ebpf, map_names::ALLOW_HITS)?));
    let mut side: Array<MapData, u64> = Array::try_from(aya::maps::Map::Array(
        MapData::from_fd(gen_dup).context("a second handle on CACHE_GEN")?,
    ))
    .context("CACHE_GEN as an array")?;
    if pinned {
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
    Ok(FlowTables {
        ways: map(ebpf, map_names::FLOWS)?,
        side,
        spill: map(ebpf, map_names::FLOW_SPILL)?,
        hits: allow_hits,
    })
}

/// What `FILE_BLOOM` holds (the mirror `Kernel` keeps): zeros for a new
/// map; a pinned one's words.
fn bloom_mirror(file_bloom: &Array<MapData, u64>, pinned: bool) -> Vec<u64> {
    let mut bloom_words = vec![0u64; BLOOM_WORDS as usize];
    if pinned {
        // A previous daemon's bits stay until every policy is reinstalled.
        for (i, w) in bloom_words.iter_mut().enumerate() {
            *w = file_bloom.get(&(i as u32), 0).unwrap_or(0);
        }
    }
    bloom_words
}

fn raise_memlock() {
    // Kernels >= 5.11 account BPF memory to the cgroup; older ones need this.
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
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
