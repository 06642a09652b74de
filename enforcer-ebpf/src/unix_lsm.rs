//! lsm/unix_stream_connect, lsm/unix_may_send (BPF LSM, global): unix
//! sockets by `spec.local` where BPF LSM works. Unlike the cgroup unix
//! hooks (which see the address string the agent wrote), these run once the
//! kernel found the peer socket (net/unix/af_unix.c: `unix_stream_connect`
//! for stream and seqpacket connects; `unix_dgram_connect` and every
//! `unix_dgram_sendmsg`, connected or not, for datagrams), so they judge
//! the real peer:
//!
//! 1. the peer socket's cgroup (`sk_cgrp_data`, set when it was created)
//!    or an ancestor is bound to the caller's identity slot: the agent's
//!    own helper, allowed (rule `UNIX_SAME_IDENTITY`);
//! 2. a socket bound to a path: its inode (`unix_sk(other)->path.dentry`,
//!    `i_ino`, `i_sb->s_dev`) against `UNIX_INODES` (resolver sockets under
//!    table id 0: refused; the identity's `spec.local` paths, resolved to
//!    inodes by userspace: allowed), so any alias of an allowed socket works
//!    and an allowed-looking path that leads elsewhere does not;
//! 3. an abstract socket: its name (`unix_sk(other)->addr`) against
//!    `UNIX_RULES`, as the cgroup hooks do;
//! 4. anything else is refused (EPERM), or recorded in audit mode.
//!
//! Processes outside every bound cgroup cost the identity lookup and are
//! allowed. Struct member offsets come from the kernel's BTF (globals set
//! at load); kernel memory is read with `bpf_probe_read_kernel`.
use aya_ebpf::{helpers::generated::bpf_probe_read_kernel, macros::lsm, programs::LsmContext};
use enforcer_common::{action, policy_flags, rule, stat, unix_kind, verdict, FileKey, UnixKey};

use crate::{
    files::{
        ENFORCER_OFF_DENTRY_D_INODE, ENFORCER_OFF_INODE_I_INO, ENFORCER_OFF_INODE_I_SB,
        ENFORCER_OFF_SB_S_DEV, ENFORCER_OFF_VALID,
    },
    identity,
    maps::{CONFIG, IDENTITIES, RESOLVED, UNIX_INODES, UNIX_RULES},
    report::{self, Decision},
    sock_addr::tables,
    unix::{read_sun_path, KeyBuf},
};

const EPERM: i32 = -1;
const AF_UNIX: u8 = 1;
/// Ancestors of the peer's cgroup looked up for a binding.
const MAX_PEER_DEPTH: u32 = 16;

#[unsafe(no_mangle)]
static ENFORCER_OFF_SOCKET_SK: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_OFF_SOCK_CGROUP: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_OFF_CGROUP_KN: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_OFF_KN_ID: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_OFF_KN_PARENT: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_OFF_UNIX_SOCK_ADDR: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_OFF_UNIX_SOCK_DENTRY: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_OFF_UNIX_ADDRESS_LEN: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_OFF_UNIX_ADDRESS_NAME: u32 = 0;

#[inline(always)]
fn off(v: &'static u32) -> u64 {
    // Volatile: the value is patched into the object at load time.
    unsafe { core::ptr::read_volatile(v) as u64 }
}

/// `*(base + off)` (8 bytes), 0 when unreadable.
#[inline(always)]
fn read_u64(base: u64, off: u64) -> u64 {
    let mut v: u64 = 0;
    if base == 0 {
        return 0;
    }
    let r = unsafe {
        bpf_probe_read_kernel(
            (&mut v as *mut u64).cast(),
            8,
            (base + off) as *const core::ffi::c_void,
        )
    };
    if r != 0 {
        return 0;
    }
    v
}

#[inline(always)]
fn read_u32(base: u64, off: u64) -> u32 {
    let mut v: u32 = 0;
    if base == 0 {
        return 0;
    }
    let r = unsafe {
        bpf_probe_read_kernel(
            (&mut v as *mut u32).cast(),
            4,
            (base + off) as *const core::ffi::c_void,
        )
    };
    if r != 0 {
        return 0;
    }
    v
}

#[lsm(hook = "unix_stream_connect")]
pub fn enforcer_unix_stream_connect(ctx: LsmContext) -> i32 {
    crate::lsm::settle(unix_stream_connect(ctx))
}

#[inline(always)]
fn unix_stream_connect(ctx: LsmContext) -> i32 {
    // unix_stream_connect(struct sock *sock, struct sock *other, struct sock
    // *newsk), then the previous BPF program's verdict.
    let prev: i32 = ctx.arg(3);
    if prev != 0 {
        return crate::lsm::PRIOR_DENIAL;
    }
    let other: u64 = ctx.arg(1);
    judge(action::UNIX_CONNECT, other)
}

#[lsm(hook = "unix_may_send")]
pub fn enforcer_unix_may_send(ctx: LsmContext) -> i32 {
    crate::lsm::settle(unix_may_send(ctx))
}

#[inline(always)]
fn unix_may_send(ctx: LsmContext) -> i32 {
    // unix_may_send(struct socket *sock, struct socket *other).
    let prev: i32 = ctx.arg(2);
    if prev != 0 {
        return crate::lsm::PRIOR_DENIAL;
    }
    let other: u64 = ctx.arg(1);
    let sk = read_u64(other, off(&ENFORCER_OFF_SOCKET_SK));
    judge(action::UNIX_SEND, sk)
}

/// The identity slot the peer socket's cgroup (or its nearest bound
/// ancestor) is bound to.
#[inline(always)]
fn peer_slot(sk: u64) -> Option<u32> {
    let cgrp = read_u64(sk, off(&ENFORCER_OFF_SOCK_CGROUP));
    let mut kn = read_u64(cgrp, off(&ENFORCER_OFF_CGROUP_KN));
    let mut level = 0u32;
    while level < MAX_PEER_DEPTH {
        if kn == 0 {
            return None;
        }
        let id = read_u64(kn, off(&ENFORCER_OFF_KN_ID));
        if let Some(b) = IDENTITIES.get_ptr(id) {
            return Some(unsafe { (*b).slot });
        }
        kn = read_u64(kn, off(&ENFORCER_OFF_KN_PARENT));
        level += 1;
    }
    None
}

/// The peer's bound address (as the server bound it) into `buf`.
#[inline(always)]
fn peer_name(sk: u64, buf: &mut KeyBuf) {
    let addr = read_u64(sk, off(&ENFORCER_OFF_UNIX_SOCK_ADDR));
    if addr == 0 {
        return;
    }
    // `unix_address.len` is the whole sockaddr_un's length.
    let len = u64::from(read_u32(addr, off(&ENFORCER_OFF_UNIX_ADDRESS_LEN)));
    if len <= 2 {
        return;
    }
    read_sun_path(
        addr + off(&ENFORCER_OFF_UNIX_ADDRESS_NAME) + 2,
        len - 2,
        buf,
    );
}

/// The peer's socket inode, if it is bound to a path.
#[inline(always)]
fn peer_inode(sk: u64) -> Option<(u64, u32)> {
    let dentry = read_u64(sk, off(&ENFORCER_OFF_UNIX_SOCK_DENTRY));
    let inode = read_u64(dentry, off(&ENFORCER_OFF_DENTRY_D_INODE));
    if inode == 0 {
        return None;
    }
    let ino = read_u64(inode, off(&ENFORCER_OFF_INODE_I_INO));
    let sb = read_u64(inode, off(&ENFORCER_OFF_INODE_I_SB));
    let dev = read_u32(sb, off(&ENFORCER_OFF_SB_S_DEV));
    Some((ino, dev))
}

#[inline(always)]
fn judge(action_kind: u8, sk: u64) -> i32 {
    // The enforcer thread resolving `spec.local` paths connects to each:
    // record the socket inode the kernel sees (overlayfs and other stacked
    // file systems report other numbers to stat) and refuse, so that
    // nothing reaches the service.
    if let Some(c) = CONFIG.get(0) {
        if crate::identity::is_resolver(c) {
            if let Some((ino, dev)) = peer_inode(sk) {
                let key = FileKey {
                    ino,
                    dev,
                    table_id: 0,
                };
                let _ = RESOLVED.insert(&key, &1, 0);
            }
            return EPERM;
        }
    }
    let id = identity::current();
    if !id.bound {
        return 0;
    }
    let mut buf = KeyBuf {
        key: UnixKey::default(),
        slack: [0; 24],
    };
    let mut d = Decision {
        cgroup_id: id.cgroup_id,
        slot: id.slot,
        rule_id: rule::DEFAULT_DENY,
        action: action_kind,
        verdict: verdict::DENY,
        addr: [0; 16],
        port: 0,
        protocol: 0,
        family: AF_UNIX,
        sock_type: 0,
        reason: 0,
    };
    let valid = unsafe { core::ptr::read_volatile(&ENFORCER_OFF_VALID) } != 0
        && off(&ENFORCER_OFF_SOCK_CGROUP) != 0;
    let Some(p) = id.policy.filter(|_| valid) else {
        if id.policy.is_none() {
            report::bump_stat(stat::NO_IDENTITY);
            d.rule_id = rule::NO_POLICY;
        } else {
            d.rule_id = rule::UNIX_UNREADABLE;
        }
        peer_name(sk, &mut buf);
        report::record_unix(&d, &buf.key);
        return EPERM;
    };
    let audit = p.flags & policy_flags::AUDIT != 0;
    let (table_id, _) = tables(&p, id.slot);
    let mut allowed = false;
    let mut resolver = false;
    if peer_slot(sk) == Some(id.slot) {
        d.rule_id = rule::UNIX_SAME_IDENTITY;
        allowed = true;
    } else if let Some((ino, dev)) = peer_inode(sk) {
        let mut key = FileKey {
            ino,
            dev,
            table_id: 0,
        };
        if let Some(r) = UNIX_INODES.get_ptr(&key) {
            d.rule_id = unsafe { (*r).rule_id };
            resolver = true;
        } else {
            key.table_id = table_id;
            if let Some(r) = UNIX_INODES.get_ptr(&key) {
                d.rule_id = unsafe { (*r).rule_id };
                allowed = true;
            }
        }
    }
    peer_name(sk, &mut buf);
    if !allowed && !resolver && buf.key.kind == unix_kind::ABSTRACT {
        if let Some(r) = UNIX_RULES.get_ptr(&buf.key) {
            d.rule_id = unsafe { (*r).rule_id };
        } else {
            buf.key.table_id = table_id;
            if let Some(r) = UNIX_RULES.get_ptr(&buf.key) {
                d.rule_id = unsafe { (*r).rule_id };
                allowed = true;
            }
            buf.key.table_id = 0;
        }
    }
    let ret = if allowed {
        d.verdict = verdict::ALLOW;
        0
    } else if audit {
        d.verdict = verdict::AUDIT;
        0
    } else {
        EPERM
    };
    report::record_unix(&d, &buf.key);
    ret
}
