//! The bench's floor: an empty program (`r0 = 1; exit`) on each cgroup hook
//! the enforcer attached to an enforced cgroup, attached to another cgroup.
//! A worker there pays what the kernel charges for running a program on
//! each hook at all, and nothing of the enforcer's own work.
//!
//! Written with the raw `bpf(2)` syscall on purpose: two instructions need
//! no object file, and the hook list is read back from the kernel
//! (`BPF_PROG_QUERY` with `BPF_F_QUERY_EFFECTIVE`), so the floor follows
//! whatever the enforcer attaches on this kernel.
//!
//! The cost probes (`attach_cost_probes`) are the empty program plus one
//! helper call or one map lookup each, attached next to the empty programs:
//! they run in the same calls, so what each adds to the empty program is
//! read without the run-to-run noise of a shared machine.
use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{bail, Context, Result};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_F_ALLOW_MULTI: u32 = 1 << 1;
const BPF_F_QUERY_EFFECTIVE: u32 = 1 << 0;

const PROG_CGROUP_SKB: u32 = 8;
const PROG_CGROUP_SOCK: u32 = 9;
const PROG_CGROUP_SOCK_ADDR: u32 = 18;
const PROG_CGROUP_SOCKOPT: u32 = 25;

/// (attach type, program type, name) of the cgroup hooks the enforcer uses.
const HOOKS: &[(u32, u32, &str)] = &[
    (0, PROG_CGROUP_SKB, "ingress"),
    (1, PROG_CGROUP_SKB, "egress"),
    (2, PROG_CGROUP_SOCK, "sock_create"),
    (10, PROG_CGROUP_SOCK_ADDR, "connect4"),
    (11, PROG_CGROUP_SOCK_ADDR, "connect6"),
    (14, PROG_CGROUP_SOCK_ADDR, "sendmsg4"),
    (15, PROG_CGROUP_SOCK_ADDR, "sendmsg6"),
    (19, PROG_CGROUP_SOCK_ADDR, "recvmsg4"),
    (20, PROG_CGROUP_SOCK_ADDR, "recvmsg6"),
    (22, PROG_CGROUP_SOCKOPT, "setsockopt"),
    (29, PROG_CGROUP_SOCK_ADDR, "getpeername4"),
    (30, PROG_CGROUP_SOCK_ADDR, "getpeername6"),
    (49, PROG_CGROUP_SOCK_ADDR, "connect_unix"),
    (50, PROG_CGROUP_SOCK_ADDR, "sendmsg_unix"),
];

#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

#[repr(C)]
#[derive(Default)]
struct ProgQuery {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *mut T).cast::<libc::c_void>(),
            std::mem::size_of::<T>(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn open_dir(p: &Path) -> Result<OwnedFd> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())?;
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        bail!("open {}: {}", p.display(), std::io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Load `insns` as a program named `name` (15 characters kept) and attach
/// it to the cgroup `target` with `BPF_F_ALLOW_MULTI`. The attachment
/// keeps the program (it goes away with the cgroup).
fn load_and_attach(
    name: &str,
    prog_type: u32,
    attach_type: u32,
    insns: &[u64],
    target: &OwnedFd,
) -> Result<()> {
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    let len = name.len().min(15);
    prog_name[..len].copy_from_slice(&name.as_bytes()[..len]);
    let mut load = ProgLoad {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        expected_attach_type: if prog_type == PROG_CGROUP_SKB {
            0
        } else {
            attach_type
        },
        ..Default::default()
    };
    let fd = bpf(BPF_PROG_LOAD, &mut load).with_context(|| format!("loading {name}"))?;
    let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut attach = ProgAttach {
        target_fd: target.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type,
        attach_flags: BPF_F_ALLOW_MULTI,
        ..Default::default()
    };
    bpf(BPF_PROG_ATTACH, &mut attach).with_context(|| format!("attaching {name}"))?;
    Ok(())
}

/// Programs in effect on `cgroup` for one attach type.
fn effective(cgroup: &OwnedFd, attach_type: u32) -> Result<u32> {
    Ok(effective_ids(cgroup, attach_type)?.len() as u32)
}

/// Their ids.
fn effective_ids(cgroup: &OwnedFd, attach_type: u32) -> Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    let mut q = ProgQuery {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        query_flags: BPF_F_QUERY_EFFECTIVE,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    match bpf(BPF_PROG_QUERY, &mut q) {
        Ok(_) => Ok(ids[..(q.prog_cnt as usize).min(ids.len())].to_vec()),
        // An attach type this kernel does not know: nothing attached there.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("BPF_PROG_QUERY attach type {attach_type}")),
    }
}

/// Attach an empty program to `target` on every hook where `like` has a
/// program in effect. Returns the hooks' names. The programs go away with
/// the cgroup.
pub fn mirror(like: &Path, target: &Path) -> Result<Vec<&'static str>> {
    let like_fd = open_dir(like)?;
    let target_fd = open_dir(target)?;
    let mut names = Vec::new();
    for &(attach_type, prog_type, name) in HOOKS {
        if effective(&like_fd, attach_type)? == 0 {
            continue;
        }
        load_and_attach(
            &format!("empty_{name}"),
            prog_type,
            attach_type,
            &RET1,
            &target_fd,
        )?;
        names.push(name);
    }
    if names.is_empty() {
        bail!("no enforcer program in effect on {}", like.display());
    }
    Ok(names)
}

#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct MapUpdate {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const MAP_HASH: u32 = 1;
const MAP_LPM_TRIE: u32 = 11;
const BPF_F_NO_PREALLOC: u32 = 1;
/// Every probe's name starts with this (the bench keeps them out of the
/// empty programs' column).
pub const COST_PREFIX: &str = "cost_";

/// One eBPF instruction.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | (u64::from(dst | (src << 4)) << 8)
        | (u64::from(off as u16) << 16)
        | (u64::from(imm as u32) << 32)
}

fn call(helper: i32) -> u64 {
    insn(0x85, 0, 0, 0, helper)
}

/// `r0 = 1; exit`
const RET1: [u64; 2] = [0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];

fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max: u32,
    flags: u32,
) -> Result<OwnedFd> {
    let mut a = MapCreate {
        map_type,
        key_size,
        value_size,
        max_entries: max,
        map_flags: flags,
    };
    let fd = bpf(BPF_MAP_CREATE, &mut a).context("BPF_MAP_CREATE")?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn map_update(map: &OwnedFd, key: &[u8], value: &[u8]) -> Result<()> {
    let mut a = MapUpdate {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        ..Default::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut a).context("BPF_MAP_UPDATE_ELEM")?;
    Ok(())
}

/// A lookup of the key the instructions `key` store at `r10 + off`.
fn lookup(map: &OwnedFd, key: &[u64], off: i32) -> Vec<u64> {
    let mut v = key.to_vec();
    v.push(insn(0xbf, 2, 10, 0, 0)); // r2 = r10
    v.push(insn(0x07, 2, 0, 0, off)); // r2 += off
    v.push(insn(0x18, 1, 1, 0, map.as_raw_fd())); // r1 = map (ld_imm64)
    v.push(0);
    v.push(call(1)); // bpf_map_lookup_elem
    v
}

/// Attach the cost probes to `target`'s `connect4` and `sendmsg4`
/// (`BPF_F_ALLOW_MULTI`, next to the empty programs): the empty program
/// plus one of `bpf_get_current_cgroup_id`, `bpf_get_current_pid_tgid`,
/// `bpf_ktime_get_coarse_ns` (`coarse_ns`), `bpf_get_current_comm`, a hash lookup that
/// hits, and a lookup that hits a /32 in an LPM trie of `lpm_prefixes`
/// random prefixes (the shape of `EGRESS_V4`). They go away with the
/// cgroup.
pub fn attach_cost_probes(target: &Path, lpm_prefixes: u32) -> Result<()> {
    let target_fd = open_dir(target)?;
    // EGRESS_V4's key: prefix length, table id (big endian), address.
    let lpm = map_create(MAP_LPM_TRIE, 12, 64, lpm_prefixes + 1, BPF_F_NO_PREALLOC)?;
    let value = [0u8; 64];
    let key = |bits: u32, addr: [u8; 4]| {
        let mut k = Vec::with_capacity(12);
        k.extend_from_slice(&(32 + bits).to_ne_bytes());
        k.extend_from_slice(&1u32.to_be_bytes());
        k.extend_from_slice(&addr);
        k
    };
    map_update(&lpm, &key(32, [127, 0, 0, 1]), &value)?;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..lpm_prefixes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bits = [16, 24, 28, 32][(x >> 40) as usize % 4];
        map_update(&lpm, &key(bits, (x as u32).to_be_bytes()), &value)?;
    }
    let hash = map_create(MAP_HASH, 8, 64, 16, 0)?;
    map_update(&hash, &5u64.to_ne_bytes(), &value)?;
    let st_w = |off: i16, imm: i32| insn(0x62, 10, 0, off, imm);
    let lpm_key = [
        st_w(-16, 64),
        st_w(-12, i32::from_ne_bytes(1u32.to_be_bytes())),
        st_w(-8, i32::from_ne_bytes([127, 0, 0, 1])),
    ];
    let probes: Vec<(&str, Vec<u64>)> = vec![
        ("cgroup_id", vec![call(80)]),
        ("pid_tgid", vec![call(14)]),
        ("coarse_ns", vec![call(160)]),
        (
            "comm",
            vec![
                insn(0xbf, 1, 10, 0, 0),
                insn(0x07, 1, 0, 0, -16),
                insn(0xb7, 2, 0, 0, 16),
                call(16),
            ],
        ),
        ("hash_hit", lookup(&hash, &[insn(0x7a, 10, 0, -8, 5)], -8)),
        ("lpm_hit", lookup(&lpm, &lpm_key, -16)),
    ];
    for attach_type in [10u32, 14] {
        for (name, body) in &probes {
            let mut insns = body.clone();
            insns.extend_from_slice(&RET1);
            load_and_attach(
                &format!("{COST_PREFIX}{name}"),
                PROG_CGROUP_SOCK_ADDR,
                attach_type,
                &insns,
                &target_fd,
            )?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// per-program statistics (`kernel.bpf_stats_enabled`)

const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `struct bpf_prog_info` (linux/bpf.h): size and member offsets.
const PROG_INFO_LEN: usize = 232;
const INFO_NAME: usize = 64;
const INFO_RUN_TIME_NS: usize = 192;
const INFO_RUN_CNT: usize = 200;

#[repr(C)]
#[derive(Default)]
struct GetFdById {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct GetInfo {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// What the kernel counted for one program: (run time ns, runs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Runs {
    pub ns: u64,
    pub cnt: u64,
}

impl Runs {
    /// ns per run of the runs between `before` and `self`.
    pub fn ns_per_run_since(&self, before: &Runs) -> Option<f64> {
        let cnt = self.cnt.checked_sub(before.cnt)?;
        (cnt > 0).then(|| self.ns.saturating_sub(before.ns) as f64 / cnt as f64)
    }
}

fn prog_runs(id: u32) -> Result<(String, Runs)> {
    let mut by_id = GetFdById {
        id,
        ..Default::default()
    };
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut by_id)
        .with_context(|| format!("BPF_PROG_GET_FD_BY_ID {id}"))?;
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut buf = [0u8; PROG_INFO_LEN];
    let mut get = GetInfo {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: PROG_INFO_LEN as u32,
        info: buf.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut get).with_context(|| format!("prog info of {id}"))?;
    let name = &buf[INFO_NAME..INFO_NAME + 16];
    let name = String::from_utf8_lossy(&name[..name.iter().position(|&b| b == 0).unwrap_or(16)])
        .to_string();
    let u64_at = |o: usize| u64::from_ne_bytes(buf[o..o + 8].try_into().unwrap_or_default());
    Ok((
        name,
        Runs {
            ns: u64_at(INFO_RUN_TIME_NS),
            cnt: u64_at(INFO_RUN_CNT),
        },
    ))
}

/// Every loaded program whose name starts with `prefix`: (name and id,
/// runs). (BPF LSM programs are global: they are found by name, not by
/// cgroup; the kernel keeps 15 characters of a name, hence the id.)
pub fn named_runs(prefix: &str) -> Result<Vec<(String, Runs)>> {
    let mut out = Vec::new();
    let mut next = GetFdById::default();
    loop {
        match bpf(BPF_PROG_GET_NEXT_ID, &mut next) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e).context("BPF_PROG_GET_NEXT_ID"),
        }
        next.id = next.next_id;
        // A program unloaded since the id was listed is skipped.
        if let Ok((name, runs)) = prog_runs(next.id) {
            if name.starts_with(prefix) {
                out.push((format!("{name}#{}", next.id), runs));
            }
        }
    }
    Ok(out)
}

/// Every program in effect on `cgroup`'s hooks: (hook, program name, runs).
pub fn cgroup_runs(cgroup: &Path) -> Result<Vec<(&'static str, String, Runs)>> {
    let fd = open_dir(cgroup)?;
    let mut out = Vec::new();
    for &(attach_type, _, hook) in HOOKS {
        for id in effective_ids(&fd, attach_type)? {
            let (name, runs) = prog_runs(id)?;
            out.push((hook, name, runs));
        }
    }
    Ok(out)
}

/// `kernel.bpf_stats_enabled` on while this lives (the previous value
/// comes back on drop). The statistics cost every program two clock reads:
/// rates are never measured while it is on.
pub struct StatsOn {
    before: String,
}

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl StatsOn {
    pub fn enable() -> Result<Self> {
        let before = std::fs::read_to_string(STATS_SYSCTL)
            .with_context(|| format!("reading {STATS_SYSCTL}"))?;
        std::fs::write(STATS_SYSCTL, "1").with_context(|| format!("writing {STATS_SYSCTL}"))?;
        Ok(Self { before })
    }
}

impl Drop for StatsOn {
    fn drop(&mut self) {
        let _ = std::fs::write(STATS_SYSCTL, self.before.trim());
    }
}
