//! cgroup/connect_unix, cgroup/sendmsg_unix (Linux >= 6.7): unix sockets by
//! `spec.local`.
//!
//! Where the kernel runs them (net/unix/af_unix.c): `unix_stream_connect`
//! (SOCK_STREAM and SOCK_SEQPACKET connect) and `unix_dgram_connect` run the
//! connect hook, `unix_dgram_sendmsg` runs the sendmsg hook when the call
//! names a destination (`sendto`, `sendmsg` with `msg_name`); both after
//! `unix_validate_addr` (so `2 < uaddrlen <= 110` and the family is
//! AF_UNIX), before the peer is looked up. Returning 0 fails the call with
//! EPERM. `socketpair`, sends on a connected socket and inherited
//! descriptors are not judged here (no address).
//!
//! The context is really `struct bpf_sock_addr_kern`; its `uaddr` and
//! `uaddrlen` are read with `bpf_probe_read_kernel` at offsets that userspace
//! takes from the kernel's BTF (read-only globals). `uaddr` points at the
//! kernel's copy of the address (a `sockaddr_storage`, 128 bytes), which may
//! hold garbage after `uaddrlen`: the name is bounded by `uaddrlen`, and a
//! path also by its first NUL (as `unix_mkname_bsd` does). An abstract name
//! starts with a NUL and is every byte up to `uaddrlen`.
//!
//! Verdict: the resolver IPC sockets (table id 0) are refused with rule
//! `UNIX_RESOLVER`; the identity's `spec.local` entries (its current
//! generation) allow; anything else is refused (`DEFAULT_DENY`), or only
//! recorded in audit mode. A tainted identity is judged by its onTaint
//! generation, which holds no `spec.local` entries: every unix connect and
//! send is refused then.
use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::generated::{bpf_probe_read_kernel, bpf_probe_read_kernel_str},
};
use enforcer_common::{
    action, policy_flags, rule, stat, unix_kind, verdict, UnixKey, UNIX_NAME_MAX,
};

use crate::{
    identity,
    maps::UNIX_RULES,
    report::{self, Decision},
    sock_addr::tables,
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const AF_UNIX: u8 = 1;
/// `offsetof(struct sockaddr_un, sun_path)`.
const SUN_PATH: u32 = 2;

// `struct bpf_sock_addr_kern` member offsets, set at load time
// (`enforcer_common::globals`). 0 for `uaddr` means unknown: the userspace
// loader does not load these programs then.
#[unsafe(no_mangle)]
static ENFORCER_OFF_SOCK_ADDR_UADDR: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_OFF_SOCK_ADDR_UADDRLEN: u32 = 0;

#[inline(always)]
fn off(v: &'static u32) -> usize {
    // Volatile: the value is patched into the object at load time.
    unsafe { core::ptr::read_volatile(v) as usize }
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "cgroup/connect_unix")]
pub fn enforcer_connect_unix(ctx: *mut bpf_sock_addr) -> i32 {
    check(ctx, action::UNIX_CONNECT)
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "cgroup/sendmsg_unix")]
pub fn enforcer_sendmsg_unix(ctx: *mut bpf_sock_addr) -> i32 {
    check(ctx, action::UNIX_SEND)
}

/// A `UnixKey` with room after `name` for the NUL that
/// `bpf_probe_read_kernel_str` writes after a 108-byte path.
#[repr(C)]
pub(crate) struct KeyBuf {
    pub(crate) key: UnixKey,
    /// Room for copies of up to 128 bytes from `key.name` (the verifier
    /// knows the copy length only as a 7-bit value).
    pub(crate) slack: [u8; 24],
}

/// The address of the call as a `UnixKey` (table id 0); `kind == 0` when it
/// could not be read. No loop over the name: the helpers bound the copy
/// (a loop whose exit depends on the bytes makes the verifier walk every
/// length).
#[inline(always)]
fn read_key(ctx: *mut bpf_sock_addr, buf: &mut KeyBuf) {
    let base = ctx as *const u8;
    let mut uaddr: u64 = 0;
    let mut alen: u32 = 0;
    let r1 = unsafe {
        bpf_probe_read_kernel(
            (&mut uaddr as *mut u64).cast(),
            8,
            base.add(off(&ENFORCER_OFF_SOCK_ADDR_UADDR)).cast(),
        )
    };
    let r2 = unsafe {
        bpf_probe_read_kernel(
            (&mut alen as *mut u32).cast(),
            4,
            base.add(off(&ENFORCER_OFF_SOCK_ADDR_UADDRLEN)).cast(),
        )
    };
    if r1 != 0 || r2 != 0 || uaddr == 0 || alen <= SUN_PATH {
        return;
    }
    read_sun_path(uaddr + u64::from(SUN_PATH), u64::from(alen - SUN_PATH), buf);
}

/// `sun_path` of an address of `n` path bytes at kernel address `src` into
/// `buf` (`kind` stays 0 when it cannot be read): an abstract name is every
/// byte; a path stops at its first NUL, at most `n` bytes, as
/// `unix_mkname_bsd` terminates the kernel's copy. Shared with the BPF LSM
/// hooks (the peer's bound address).
#[inline(always)]
pub(crate) fn read_sun_path(src: u64, n: u64, buf: &mut KeyBuf) {
    // 1..=108 bytes. Masked after a volatile read so that LLVM cannot drop
    // the mask as redundant: the verifier must see the bound on the very
    // register passed to the helpers.
    if n == 0 || n > UNIX_NAME_MAX as u64 {
        return;
    }
    let n = (unsafe { core::ptr::read_volatile(&n) } & 0x7f) as u32;
    let src = src as *const core::ffi::c_void;
    let mut first: u8 = 0;
    if unsafe { bpf_probe_read_kernel((&mut first as *mut u8).cast(), 1, src) } != 0 {
        return;
    }
    if first == 0 {
        // Abstract: every byte up to the address length (the rest stays zero).
        if unsafe { bpf_probe_read_kernel(buf.key.name.as_mut_ptr().cast(), n, src) } != 0 {
            return;
        }
        buf.key.len = n as u8;
        buf.key.kind = unix_kind::ABSTRACT;
        return;
    }
    // A path: the helper copies at most `n` bytes and then a NUL (into
    // `slack` for a 108-byte path).
    let r = unsafe { bpf_probe_read_kernel_str(buf.key.name.as_mut_ptr().cast(), n + 1, src) };
    if r <= 1 {
        return;
    }
    buf.key.len = (r - 1) as u8;
    buf.key.kind = unix_kind::PATH;
}

#[inline(always)]
fn check(ctx: *mut bpf_sock_addr, action_kind: u8) -> i32 {
    let id = identity::current();
    let mut buf = KeyBuf {
        key: UnixKey::default(),
        slack: [0; 24],
    };
    read_key(ctx, &mut buf);
    let mut key = buf.key;
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
    let Some(p) = id.policy else {
        report::bump_stat(stat::NO_IDENTITY);
        d.rule_id = rule::NO_POLICY;
        report::record_unix(&d, &key);
        return DENY;
    };
    let audit = p.flags & policy_flags::AUDIT != 0;
    let mut allowed = false;
    if key.kind == 0 {
        d.rule_id = rule::UNIX_UNREADABLE;
    } else if let Some(r) = UNIX_RULES.get_ptr(&key) {
        // Table id 0: a resolver IPC socket.
        d.rule_id = unsafe { (*r).rule_id };
    } else {
        let (table_id, _) = tables(&p, id.slot);
        key.table_id = table_id;
        if let Some(r) = UNIX_RULES.get_ptr(&key) {
            d.rule_id = unsafe { (*r).rule_id };
            allowed = true;
        }
        key.table_id = 0;
    }
    let ret = if allowed {
        d.verdict = verdict::ALLOW;
        ALLOW
    } else if audit {
        d.verdict = verdict::AUDIT;
        ALLOW
    } else {
        DENY
    };
    report::record_unix(&d, &key);
    ret
}
