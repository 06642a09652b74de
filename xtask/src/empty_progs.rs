//! The bench's floor: an empty program (`r0 = 1; exit`) on each cgroup hook
//! the enforcer attached to an enforced cgroup, attached to another cgroup.
//! A worker there pays what the kernel charges for running a program on
//! each hook at all, and nothing of the enforcer's own work.
//!
//! Written with the raw `bpf(2)` syscall on purpose: two instructions need
//! no object file, and the hook list is read back from the kernel
//! (`BPF_PROG_QUERY` with `BPF_F_QUERY_EFFECTIVE`), so the floor follows
//! whatever the enforcer attaches on this kernel.
use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{bail, Context, Result};

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

/// Programs in effect on `cgroup` for one attach type.
fn effective(cgroup: &OwnedFd, attach_type: u32) -> Result<u32> {
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
        Ok(_) => Ok(q.prog_cnt),
        // An attach type this kernel does not know: nothing attached there.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(0),
        Err(e) => Err(e).with_context(|| format!("BPF_PROG_QUERY attach type {attach_type}")),
    }
}

/// Attach an empty program to `target` on every hook where `like` has a
/// program in effect. Returns the hooks' names. The programs go away with
/// the cgroup.
pub fn mirror(like: &Path, target: &Path) -> Result<Vec<&'static str>> {
    let like_fd = open_dir(like)?;
    let target_fd = open_dir(target)?;
    // mov64 r0, 1; exit
    let insns: [u64; 2] = [0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];
    let license = c"GPL";
    let mut names = Vec::new();
    for &(attach_type, prog_type, name) in HOOKS {
        if effective(&like_fd, attach_type)? == 0 {
            continue;
        }
        let mut prog_name = [0u8; 16];
        let n = format!("empty_{name}");
        let len = n.len().min(15);
        prog_name[..len].copy_from_slice(&n.as_bytes()[..len]);
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
        let fd = bpf(BPF_PROG_LOAD, &mut load)
            .with_context(|| format!("loading an empty {name} program"))?;
        let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut attach = ProgAttach {
            target_fd: target_fd.as_raw_fd() as u32,
            attach_bpf_fd: prog.as_raw_fd() as u32,
            attach_type,
            attach_flags: BPF_F_ALLOW_MULTI,
            ..Default::default()
        };
        bpf(BPF_PROG_ATTACH, &mut attach)
            .with_context(|| format!("attaching the empty {name} program"))?;
        names.push(name);
    }
    if names.is_empty() {
        bail!("no enforcer program in effect on {}", like.display());
    }
    Ok(names)
}
