//! Loading the eBPF object: pinned maps checked against this build's (and
//! reused across restarts), the programs' globals from the kernel's BTF,
//! the programs, and the `Kernel` around the maps, with a previous
//! daemon's policy generations adopted.
use std::{
    collections::{HashMap as StdHashMap, HashSet},
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData},
    Ebpf, EbpfLoader,
};
use enforcer_common::{
    cache_gen, globals, map_names, policy_flags, FileKey, FileOffsets, FileRuleValue, GlobalConfig,
    NameKey, PolicyState, RuleSet, UnixKey, UnixRule, V4Key, V6Key, BLOOM_WORDS, MAX_SLOTS,
};

use super::{
    btf, learned,
    lsm::{bpf_lsm_listed, parse_aya_btf},
    private_dir,
    programs::{load_cgroup_programs, load_unix_programs},
    Installed, Kernel, TaintTable, UnixSupport,
};

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
