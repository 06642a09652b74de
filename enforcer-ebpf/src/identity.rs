//! cgroup -> identity slot -> policy generation.
//!
//! The programs are attached to an agent's cgroup and run for every
//! descendant cgroup too. The nearest ancestor (or the cgroup itself) that
//! userspace bound in `IDENTITIES` names the identity. When none is bound, or
//! the slot holds no policy, the caller fails closed.
use aya_ebpf::helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id};
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

#[inline(always)]
pub fn current() -> Identity {
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
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
            let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
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
