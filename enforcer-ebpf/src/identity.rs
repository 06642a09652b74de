//! cgroup -> identity slot -> policy generation.
//!
//! The programs are attached to an agent's cgroup and run for every
//! descendant cgroup too. The nearest ancestor (or the cgroup itself) that
//! userspace bound in `IDENTITIES` names the identity. When none is bound, or
//! the slot holds no policy, the caller fails closed.
use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_sk_ancestor_cgroup_id,
        bpf_sk_cgroup_id, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
};
use enforcer_common::{policy_flags, PolicyState, MAX_CGROUP_DEPTH, SLOT_UNKNOWN};

use crate::maps::{IDENTITIES, POLICIES};

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

/// The identity of the current task.
#[inline(always)]
pub fn current() -> Identity {
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
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

#[inline(always)]
fn find(cgroup_id: u64, ancestor: impl Fn(i32) -> u64) -> Identity {
    // (bound, slot) as two always-initialized values rather than an
    // Option<u32>: LLVM may read an Option's payload on the None path, and
    // the verifier rejects a read of a register that was never written.
    let mut bound = false;
    let mut slot = SLOT_UNKNOWN;
    if let Some(s) = slot_of(cgroup_id) {
        bound = true;
        slot = s;
    } else {
        // Nested cgroup: walk root -> leaf and keep the deepest bound ancestor.
        let mut level: i32 = 0;
        while level < MAX_CGROUP_DEPTH {
            let id = ancestor(level);
            if id == 0 || id == cgroup_id {
                break;
            }
            if let Some(s) = slot_of(id) {
                bound = true;
                slot = s;
            }
            level += 1;
        }
    }
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
