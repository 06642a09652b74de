//! cgroup -> identity slot -> policy generation.
//!
//! The programs are attached to an agent's cgroup and run for every
//! descendant cgroup too. The nearest ancestor (or the cgroup itself) that
//! userspace bound in `IDENTITIES` names the identity. When none is bound, or
//! the slot holds no policy, the caller fails closed.
//!
//! Every hook resolves the identity of each call, so the resolution is
//! cached per CPU (`IDENTITY_CACHE`): `[cgroup id, packed]`, where `packed`
//! holds the low 32 bits of that cgroup id, the verdict generation
//! (`report::gens`, which changes after every change of `IDENTITIES`),
//! the bound flag and the slot.
//! A hit costs two array reads instead of a hash lookup (and, for a nested
//! cgroup, the walk). A program may interrupt another on the same CPU
//! (softirq) between its two writes, so a reader may see the id of one
//! write and the packed word of another: the packed word names its own
//! cgroup (the low 32 bits of a cgroup id are its kernfs inode number,
//! unique among live cgroups), and a mismatch is a miss.
//!
use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_sk_ancestor_cgroup_id, bpf_sk_cgroup_id, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
        generated::bpf_get_current_task_btf,
    },
};
use enforcer_common::{policy_flags, PolicyState, MAX_CGROUP_DEPTH, SLOT_UNKNOWN};

use crate::{
    files::{load_ptr, load_u32, load_u64, off},
    maps::{IDENTITIES, IDENTITY_CACHE, POLICIES},
};

pub struct Identity {
    pub cgroup_id: u64,
    /// The cgroup or an ancestor is bound (an agent), even to no policy.
    pub bound: bool,
    pub slot: u32,
    /// `None`: no identity or no policy for it (fail closed).
    pub policy: Option<PolicyState>,
}

#[inline(always)]
fn slot_of(cgroup_id: u64) -> Option<u32> {
    IDENTITIES.get_ptr(cgroup_id).map(|b| unsafe { (*b).slot })
}

// `enforcer_common::TaskOffsets`, set at load time (constants to the
// verifier: with `VALID` 0 the task path is dead code).
#[unsafe(no_mangle)]
static ENFORCER_TOFF_TASK_TGID: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_TOFF_TASK_CGROUPS: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_TOFF_CSS_SET_DFL_CGRP: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_TOFF_CGROUP_KN: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_TOFF_KN_ID: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_TOFF_VALID: u32 = 0;

/// The current task's cgroup id and process id (thread group id): read
/// through the task (`bpf_get_current_task_btf`, then
/// `task->cgroups->dfl_cgrp->kn->id` and `task->tgid`, what
/// `bpf_get_current_cgroup_id` and `bpf_get_current_pid_tgid` read), one
/// helper call instead of two; without the offsets, those two helpers.
#[inline(always)]
pub fn current_ids() -> (u64, u32) {
    if off(&ENFORCER_TOFF_VALID) != 0 {
        let t = unsafe { bpf_get_current_task_btf() }
            .cast::<u8>()
            .cast_const();
        let tgid = load_u32(t, off(&ENFORCER_TOFF_TASK_TGID));
        let cset = load_ptr(t, off(&ENFORCER_TOFF_TASK_CGROUPS));
        let cgrp = load_ptr(cset, off(&ENFORCER_TOFF_CSS_SET_DFL_CGRP));
        let kn = load_ptr(cgrp, off(&ENFORCER_TOFF_CGROUP_KN));
        (load_u64(kn, off(&ENFORCER_TOFF_KN_ID)), tgid)
    } else {
        (
            unsafe { bpf_get_current_cgroup_id() },
            (bpf_get_current_pid_tgid() >> 32) as u32,
        )
    }
}

/// The identity of the current task. (The hooks other than connect and
/// sendmsg call the helper: the task walk is inlined where it is used, and
/// every copy of it costs the verifier time at load.)
#[inline(always)]
pub fn current() -> Identity {
    of_current_cgroup(unsafe { bpf_get_current_cgroup_id() })
}

/// The identity of the current task, whose cgroup id the caller read.
#[inline(always)]
pub fn of_current_cgroup(cgroup_id: u64) -> Identity {
    find(cgroup_id, |level| unsafe {
        bpf_get_current_ancestor_cgroup_id(level)
    })
}

/// The identity of a packet's socket (the cgroup of the socket's creator):
/// cgroup_skb programs may run in softirq context, on no task of the agent.
#[inline(always)]
pub fn of_skb(skb: *mut __sk_buff) -> Identity {
    let cgroup_id = unsafe { bpf_skb_cgroup_id(skb.cast()) };
    find(cgroup_id, |level| unsafe {
        bpf_skb_ancestor_cgroup_id(skb.cast(), level)
    })
}

/// The identity of a socket (a full socket the program holds a reference to).
#[inline(always)]
pub fn of_sk(sk: *mut aya_ebpf::bindings::bpf_sock) -> Identity {
    let cgroup_id = unsafe { bpf_sk_cgroup_id(sk.cast()) };
    find(cgroup_id, |level| unsafe {
        bpf_sk_ancestor_cgroup_id(sk.cast(), level)
    })
}

/// `packed`: cgroup id low 32 bits << 32 | gen (21 bits) << 11 | bound << 10 | slot.
const CACHE_BOUND: u64 = 1 << 10;
const CACHE_SLOT: u64 = CACHE_BOUND - 1;
const TAG_GEN_SHIFT: u32 = 11;
const TAG_GEN: u64 = (1 << 21) - 1;
const _: () = assert!(enforcer_common::MAX_SLOTS as u64 <= CACHE_SLOT + 1);

/// `bound << 10 | slot` of the nearest bound cgroup (the cgroup itself or
/// an ancestor), from `IDENTITIES`.
#[inline(always)]
fn resolve(cgroup_id: u64, ancestor: impl Fn(i32) -> u64) -> u64 {
    if let Some(s) = slot_of(cgroup_id) {
        return CACHE_BOUND | (u64::from(s) & CACHE_SLOT);
    }
    // Nested cgroup: walk root -> leaf and keep the deepest bound ancestor.
    let mut res = 0u64;
    let mut level: i32 = 0;
    while level < MAX_CGROUP_DEPTH {
        let id = ancestor(level);
        if id == 0 || id == cgroup_id {
            break;
        }
        if let Some(s) = slot_of(id) {
            res = CACHE_BOUND | (u64::from(s) & CACHE_SLOT);
        }
        level += 1;
    }
    res
}

#[inline(always)]
fn find(cgroup_id: u64, ancestor: impl Fn(i32) -> u64) -> Identity {
    let gen = u64::from(crate::report::gens().gen);
    let cache = match IDENTITY_CACHE.get_ptr_mut(0) {
        Some(c) if cgroup_id != 0 => c,
        _ => core::ptr::null_mut(),
    };
    // `bound << 10 | slot` in one always-initialized value (MISS until
    // resolved): LLVM may read an Option's payload on the None path, and
    // the verifier rejects a read of a register that was never written.
    const MISS: u64 = u64::MAX;
    let tag = ((cgroup_id & 0xffff_ffff) << 32) | ((gen & TAG_GEN) << TAG_GEN_SHIFT);
    let mut res = MISS;
    if !cache.is_null() {
        let (k, v) = unsafe {
            (
                core::ptr::read_volatile(&(*cache)[0]),
                core::ptr::read_volatile(&(*cache)[1]),
            )
        };
        if k == cgroup_id && v & !(CACHE_BOUND | CACHE_SLOT) == tag {
            res = v & (CACHE_BOUND | CACHE_SLOT);
        }
    }
    if res == MISS {
        res = resolve(cgroup_id, ancestor);
        if !cache.is_null() {
            unsafe {
                core::ptr::write_volatile(&mut (*cache)[1], tag | res);
                core::ptr::write_volatile(&mut (*cache)[0], cgroup_id);
            }
        }
    }
    let bound = res & CACHE_BOUND != 0;
    let slot = (res & CACHE_SLOT) as u32;
    if !bound {
        return Identity {
            cgroup_id,
            bound: false,
            slot: SLOT_UNKNOWN,
            policy: None,
        };
    }
    let policy = POLICIES
        .get(slot)
        .copied()
        .filter(|p| p.flags & policy_flags::PRESENT != 0);
    Identity {
        cgroup_id,
        bound: true,
        slot,
        policy,
    }
}

/// Whether the current task is the enforcer's resolver thread (`cfg`'s
/// `resolver_tid`, numbered in the enforcer's PID namespace): a task of
/// another PID namespace never is, whatever its number there.
#[inline(always)]
pub fn is_resolver(cfg: &enforcer_common::GlobalConfig) -> bool {
    if cfg.resolver_tid == 0 {
        return false;
    }
    let mut info = aya_ebpf::bindings::bpf_pidns_info { pid: 0, tgid: 0 };
    let rc = unsafe {
        aya_ebpf::helpers::bpf_get_ns_current_pid_tgid(
            u64::from(cfg.resolver_pidns_dev),
            u64::from(cfg.resolver_pidns_ino),
            &mut info,
            core::mem::size_of::<aya_ebpf::bindings::bpf_pidns_info>() as u32,
        )
    };
    rc == 0 && info.pid == cfg.resolver_tid
}
