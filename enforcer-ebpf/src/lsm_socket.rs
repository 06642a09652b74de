//! lsm/socket_create (BPF LSM, global): sockets of families no cgroup hook
//! judges.
//!
//! `cgroup/sock_create` and the connect/sendmsg hooks cover AF_INET and
//! AF_INET6 only. A process in a bound cgroup could otherwise send through
//! AF_PACKET or AF_XDP (with CAP_NET_RAW: frames that skip every cgroup
//! hook, and tc egress with PACKET_QDISC_BYPASS), AF_VSOCK (no capability:
//! the host or hypervisor of a VM-isolated runtime such as Kata), or
//! AF_TIPC, AF_RDS, AF_CAN, ... Where BPF LSM works the daemon attaches
//! this hook with the file hooks, and an agent may create sockets of
//! AF_UNIX, AF_INET, AF_INET6 and AF_NETLINK only; any other family is
//! refused (EPERM; rule `raw-socket` for AF_PACKET and AF_XDP, else
//! `socket-family`; recorded as audit and allowed in `mode: audit`), also
//! when its cgroup is bound to no policy (fail closed). Kernel-internal
//! sockets (`kern`) are not judged. Sockets of those four families cost one
//! comparison; a refused family of a process outside every bound cgroup
//! costs the identity lookup and is allowed.
use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_probe_read_kernel},
    macros::lsm,
    programs::LsmContext,
};
use enforcer_common::{action, policy_flags, rule, verdict};

use crate::{
    identity,
    maps::IDENTITIES,
    report::{self, Decision},
};

const AF_UNIX: i32 = 1;
const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;
const AF_NETLINK: i32 = 16;
const AF_PACKET: i32 = 17;
const AF_XDP: i32 = 44;
const EPERM: i32 = -1;

#[lsm(hook = "socket_create")]
pub fn enforcer_socket_create(ctx: LsmContext) -> i32 {
    crate::lsm::settle(socket_create(ctx))
}

#[inline(always)]
fn socket_create(ctx: LsmContext) -> i32 {
    // socket_create(int family, int type, int protocol, int kern), then the
    // previous BPF program's verdict.
    let prev: i32 = ctx.arg(4);
    if prev != 0 {
        return crate::lsm::PRIOR_DENIAL;
    }
    let family: i32 = ctx.arg(0);
    let kern: i32 = ctx.arg(3);
    if kern != 0 || matches!(family, AF_UNIX | AF_INET | AF_INET6 | AF_NETLINK) {
        return 0;
    }
    let id = identity::current();
    if !id.bound {
        return 0;
    }
    let sock_type: i32 = ctx.arg(1);
    let protocol: i32 = ctx.arg(2);
    let audit = matches!(id.policy, Some(p) if p.flags & policy_flags::AUDIT != 0);
    report::record(&Decision {
        cgroup_id: id.cgroup_id,
        slot: id.slot,
        rule_id: if family == AF_PACKET || family == AF_XDP {
            rule::RAW_SOCKET
        } else {
            rule::SOCKET_FAMILY
        },
        action: action::SOCK_CREATE,
        verdict: if audit { verdict::AUDIT } else { verdict::DENY },
        addr: [0; 16],
        port: 0,
        // The low byte, as the inet hooks keep it (for AF_PACKET the
        // protocol is an ethertype in network byte order).
        protocol: protocol as u8,
        family: family as u8,
        sock_type: sock_type as u8,
        reason: 0,
    });
    if audit {
        0
    } else {
        EPERM
    }
}

// Struct member offsets (bytes), set at load time (`enforcer_common::globals::SOCK`).
#[unsafe(no_mangle)]
static ENFORCER_SOFF_SOCKET_SK: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_SOFF_SOCK_FAMILY: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_SOFF_SOCK_CGROUP: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_SOFF_CGROUP_KN: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_SOFF_KN_ID: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_SOFF_KN_PARENT: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_SOFF_FILE_F_INODE: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_SOFF_FILE_PRIVATE_DATA: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_SOFF_INODE_I_MODE: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_SOFF_VALID: u32 = 0;

#[inline(always)]
fn off(v: &'static u32) -> usize {
    // Volatile: the value is patched into the object at load time.
    unsafe { core::ptr::read_volatile(v) as usize }
}

/// `*(base + off)` read with `bpf_probe_read_kernel` (0 when unreadable).
#[inline(always)]
fn read_u64(base: u64, off: usize) -> u64 {
    if base == 0 {
        return 0;
    }
    unsafe { bpf_probe_read_kernel((base as usize + off) as *const u64) }.unwrap_or(0)
}

/// lsm/socket_connect and lsm/socket_sendmsg (and `file_receive` above): an inet socket that a process
/// of an identity did not create within that identity (received over
/// SCM_RIGHTS, taken with `pidfd_getfd`, inherited from outside) is judged
/// by its creator's cgroup by every cgroup hook: a host process's socket
/// would carry the agent's data past its policy. Refused (EPERM, rule
/// `foreign-socket`; recorded as audit and allowed in `mode: audit`).
///
/// Cost for every other send on the host: two offsets, three kernel reads
/// and one helper call; a socket of the sender's own cgroup (the usual
/// case) passes there. A cgroup mismatch looks up both identities.
#[lsm(hook = "socket_connect")]
pub fn enforcer_socket_connect(ctx: LsmContext) -> i32 {
    crate::lsm::settle(socket_connect(ctx))
}

#[inline(always)]
fn socket_connect(ctx: LsmContext) -> i32 {
    // socket_connect(struct socket *sock, struct sockaddr *address, int addrlen)
    let prev: i32 = ctx.arg(3);
    if prev != 0 {
        return crate::lsm::PRIOR_DENIAL;
    }
    foreign(ctx.arg::<u64>(0), action::CONNECT)
}

#[lsm(hook = "socket_sendmsg")]
pub fn enforcer_socket_sendmsg(ctx: LsmContext) -> i32 {
    crate::lsm::settle(socket_sendmsg(ctx))
}

#[inline(always)]
fn socket_sendmsg(ctx: LsmContext) -> i32 {
    // socket_sendmsg(struct socket *sock, struct msghdr *msg, int size)
    let prev: i32 = ctx.arg(3);
    if prev != 0 {
        return crate::lsm::PRIOR_DENIAL;
    }
    foreign(ctx.arg::<u64>(0), action::SENDMSG)
}

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;

/// lsm/file_receive: the door itself. A process of an identity receiving
/// an inet socket made outside it (SCM_RIGHTS, `pidfd_getfd`) is refused
/// the descriptor (EPERM; `recvmsg` reports `MSG_CTRUNC`). Without this, a
/// received socket could still carry data with no send call the hooks see:
/// `sendfile`/`splice` (before Linux 6.5 they skip `socket_sendmsg`), IP
/// options set on it (every ACK carries them), or `listen` on a fresh one.
/// Other files pass after two reads.
#[lsm(hook = "file_receive")]
pub fn enforcer_file_receive(ctx: LsmContext) -> i32 {
    crate::lsm::settle(file_receive(ctx))
}

#[inline(always)]
fn file_receive(ctx: LsmContext) -> i32 {
    // file_receive(struct file *file)
    let prev: i32 = ctx.arg(1);
    if prev != 0 {
        return crate::lsm::PRIOR_DENIAL;
    }
    if off(&ENFORCER_SOFF_VALID) == 0 {
        return 0;
    }
    let file: u64 = ctx.arg(0);
    let inode = read_u64(file, off(&ENFORCER_SOFF_FILE_F_INODE));
    if inode == 0 {
        return 0;
    }
    let mode = unsafe {
        bpf_probe_read_kernel((inode as usize + off(&ENFORCER_SOFF_INODE_I_MODE)) as *const u16)
    }
    .unwrap_or(0);
    if mode & S_IFMT != S_IFSOCK {
        return 0;
    }
    let sock = read_u64(file, off(&ENFORCER_SOFF_FILE_PRIVATE_DATA));
    foreign(sock, action::FD_RECEIVE)
}

#[inline(always)]
fn foreign(sock: u64, act: u8) -> i32 {
    if off(&ENFORCER_SOFF_VALID) == 0 {
        return 0;
    }
    let sk = read_u64(sock, off(&ENFORCER_SOFF_SOCKET_SK));
    if sk == 0 {
        return 0;
    }
    let family = unsafe {
        bpf_probe_read_kernel((sk as usize + off(&ENFORCER_SOFF_SOCK_FAMILY)) as *const u16)
    }
    .unwrap_or(0);
    if family != AF_INET as u16 && family != AF_INET6 as u16 {
        return 0;
    }
    let cgrp = read_u64(sk, off(&ENFORCER_SOFF_SOCK_CGROUP));
    let kn = read_u64(cgrp, off(&ENFORCER_SOFF_CGROUP_KN));
    let sock_cgroup = read_u64(kn, off(&ENFORCER_SOFF_KN_ID));
    if sock_cgroup == unsafe { bpf_get_current_cgroup_id() } {
        return 0;
    }
    let id = identity::current();
    if !id.bound {
        return 0;
    }
    // The socket's identity: its cgroup or the nearest bound ancestor.
    let mut node = kn;
    let mut sock_slot = enforcer_common::SLOT_UNKNOWN;
    let mut level = 0;
    while level < enforcer_common::MAX_CGROUP_DEPTH {
        if node == 0 {
            break;
        }
        let cg = read_u64(node, off(&ENFORCER_SOFF_KN_ID));
        if let Some(b) = IDENTITIES.get_ptr(cg) {
            sock_slot = unsafe { (*b).slot };
            break;
        }
        node = read_u64(node, off(&ENFORCER_SOFF_KN_PARENT));
        level += 1;
    }
    if sock_slot == id.slot {
        return 0;
    }
    let audit = matches!(id.policy, Some(p) if p.flags & policy_flags::AUDIT != 0);
    report::record(&Decision {
        cgroup_id: id.cgroup_id,
        slot: id.slot,
        rule_id: rule::FOREIGN_SOCKET,
        action: act,
        verdict: if audit { verdict::AUDIT } else { verdict::DENY },
        addr: [0; 16],
        port: 0,
        protocol: 0,
        family: family as u8,
        sock_type: 0,
        reason: 0,
    });
    if audit {
        0
    } else {
        EPERM
    }
}
