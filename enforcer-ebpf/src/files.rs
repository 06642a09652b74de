//! lsm/file_open, lsm/inode_link, lsm/inode_rename: the file policy.
//!
//! A file is identified by its inode (`i_ino` and `i_sb->s_dev`), not by a
//! path: symlinks, hard links, `..`, bind mounts, /proc/self/fd and
//! /proc/<pid>/root reopenings and io_uring all end in the same inode. A
//! directory rule covers its tree through a bounded walk of the opened
//! file's parent dentries (`d_parent`), so files created later inside it and
//! renames of the file or of its directories keep matching. The nearest
//! match wins (a rule on `~/.ssh/known_hosts` beats one on `~/.ssh`).
//!
//! `inode_link` and `inode_rename` refuse to give a protected file (or a
//! file inside a protected tree) a new name: a hard link or a move outside
//! the tree would leave the walk with nothing to find.
//!
//! Cost. The hooks are global (BPF LSM is not per cgroup) and run for every
//! open on the machine. They return at once while no identity has file
//! rules (`CONFIG.file_slots == 0`). Otherwise the opened file and each of
//! its parents cost three direct loads and a bit test in `FILE_BLOOM` (a
//! Bloom filter of every rule inode); only an inode whose bit is set costs
//! the identity lookup (cgroup -> slot -> policy) and a `FILE_RULES` lookup.
//! Struct member offsets are read-only globals set by userspace from the
//! running kernel's BTF, so the verifier sees constants and allows direct
//! (fault-safe) loads through the hook's typed arguments; without them
//! (`ENFORCER_OFF_VALID == 0`) the hooks fail closed for agents.
//!
//! A bound cgroup without a policy is denied the files that some policy
//! protects (its egress fails closed in the sock_addr hooks).
use aya_ebpf::{
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_task_btf,
        bpf_ktime_get_ns, bpf_send_signal,
    },
    macros::lsm,
    programs::LsmContext,
};
use enforcer_common::{
    action, bloom_bit, file_access, policy_flags, rule, verdict, FileKey, PolicyState,
    MAX_CGROUP_DEPTH, MAX_FILE_DEPTH, SLOT_UNKNOWN,
};

use crate::{
    identity::{self, Identity},
    maps::{CONFIG, FILE_BLOOM, FILE_READY, FILE_RULES, RESOLVED, TAINTED},
    report::{self, Decision},
};

const ALLOW: i32 = 0;
const EPERM: i32 = -1;

// Struct member offsets (bytes), set at load time (`enforcer_common::globals`).
#[unsafe(no_mangle)]
static ENFORCER_OFF_FILE_F_INODE: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_OFF_FILE_DENTRY: u32 = 0;
#[unsafe(no_mangle)]
pub(crate) static ENFORCER_OFF_INODE_I_INO: u32 = 0;
#[unsafe(no_mangle)]
pub(crate) static ENFORCER_OFF_INODE_I_SB: u32 = 0;
#[unsafe(no_mangle)]
pub(crate) static ENFORCER_OFF_SB_S_DEV: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_OFF_DENTRY_D_PARENT: u32 = 0;
#[unsafe(no_mangle)]
pub(crate) static ENFORCER_OFF_DENTRY_D_INODE: u32 = 0;
#[unsafe(no_mangle)]
pub(crate) static ENFORCER_OFF_VALID: u32 = 0;
// The exec hold (`bprm_check`): `task_struct.nsproxy`, `nsproxy.mnt_ns`,
// `mnt_namespace.ns.inum` (0: unknown, nothing is held), and the inode
// number of the host's mount namespace (pid 1's).
#[unsafe(no_mangle)]
static ENFORCER_OFF_TASK_NSPROXY: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_OFF_NSPROXY_MNT_NS: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_OFF_MNT_NS_INUM: u32 = 0;
#[unsafe(no_mangle)]
static ENFORCER_HOST_MNT_NS: u32 = 0;
// `inode.i_mode` (the resolver thread opens only files and directories).
#[unsafe(no_mangle)]
static ENFORCER_OFF_INODE_I_MODE: u32 = 0;

#[inline(always)]
pub(crate) fn off(v: &'static u32) -> usize {
    // Volatile: the value is patched into the object at load time.
    unsafe { core::ptr::read_volatile(v) as usize }
}

/// `*(base + off)` as a pointer; null stays null.
#[inline(always)]
pub(crate) fn load_ptr(base: *const u8, off: usize) -> *const u8 {
    if base.is_null() {
        return core::ptr::null();
    }
    unsafe { core::ptr::read(base.add(off) as *const *const u8) }
}

#[inline(always)]
pub(crate) fn load_u64(base: *const u8, off: usize) -> u64 {
    if base.is_null() {
        return 0;
    }
    unsafe { core::ptr::read(base.add(off) as *const u64) }
}

#[inline(always)]
pub(crate) fn load_u32(base: *const u8, off: usize) -> u32 {
    if base.is_null() {
        return 0;
    }
    unsafe { core::ptr::read(base.add(off) as *const u32) }
}

#[lsm(hook = "file_open")]
pub fn enforcer_file_open(ctx: LsmContext) -> i32 {
    crate::lsm::settle(file_open(ctx))
}

#[inline(always)]
fn file_open(ctx: LsmContext) -> i32 {
    // file_open(struct file *file), then the previous BPF program's verdict.
    let prev: i32 = ctx.arg(1);
    if prev != 0 {
        return crate::lsm::PRIOR_DENIAL;
    }
    let file: *const u8 = ctx.arg(0);
    let (dentry, inode) = if file.is_null() {
        (core::ptr::null(), core::ptr::null())
    } else {
        (
            load_ptr(file, off(&ENFORCER_OFF_FILE_DENTRY)),
            load_ptr(file, off(&ENFORCER_OFF_FILE_F_INODE)),
        )
    };
    check(action::FILE_OPEN, dentry, inode)
}

#[lsm(hook = "inode_link")]
pub fn enforcer_inode_link(ctx: LsmContext) -> i32 {
    crate::lsm::settle(inode_link(ctx))
}

#[inline(always)]
fn inode_link(ctx: LsmContext) -> i32 {
    // inode_link(struct dentry *old_dentry, struct inode *dir, struct dentry *new_dentry)
    let prev: i32 = ctx.arg(3);
    if prev != 0 {
        return crate::lsm::PRIOR_DENIAL;
    }
    let dentry: *const u8 = ctx.arg(0);
    let inode = load_ptr(dentry, off(&ENFORCER_OFF_DENTRY_D_INODE));
    check(action::FILE_LINK, dentry, inode)
}

#[lsm(hook = "inode_rename")]
pub fn enforcer_inode_rename(ctx: LsmContext) -> i32 {
    crate::lsm::settle(inode_rename(ctx))
}

#[inline(always)]
fn inode_rename(ctx: LsmContext) -> i32 {
    // inode_rename(struct inode *old_dir, struct dentry *old_dentry,
    //              struct inode *new_dir, struct dentry *new_dentry)
    let prev: i32 = ctx.arg(4);
    if prev != 0 {
        return crate::lsm::PRIOR_DENIAL;
    }
    let dentry: *const u8 = ctx.arg(1);
    let inode = load_ptr(dentry, off(&ENFORCER_OFF_DENTRY_D_INODE));
    check(action::FILE_RENAME, dentry, inode)
}

#[lsm(hook = "bprm_check_security")]
pub fn enforcer_bprm_check(ctx: LsmContext) -> i32 {
    crate::lsm::settle(bprm_check(ctx))
}

const SIGSTOP: u32 = 19;

/// Whether the current task is in the host's mount namespace (true when
/// the offsets are unknown: then nothing is held). A container's runtime
/// (the shim, `runc` before it enters the container) is; a program started
/// inside a container is not.
#[inline(always)]
fn in_host_mnt_ns() -> bool {
    let nsproxy_off = off(&ENFORCER_OFF_TASK_NSPROXY);
    if nsproxy_off == 0 {
        return true;
    }
    let task = unsafe { bpf_get_current_task_btf() }
        .cast::<u8>()
        .cast_const();
    let nsproxy = load_ptr(task, nsproxy_off);
    let mnt_ns = load_ptr(nsproxy, off(&ENFORCER_OFF_NSPROXY_MNT_NS));
    if mnt_ns.is_null() {
        return true;
    }
    let inum = load_u32(mnt_ns, off(&ENFORCER_OFF_MNT_NS_INUM));
    inum == unsafe { core::ptr::read_volatile(&ENFORCER_HOST_MNT_NS) }
}

/// The current cgroup or one of its ancestors is in `FILE_READY` (a
/// process in a cgroup a container made below its own is covered by it).
#[inline(always)]
fn ready(cgroup_id: u64) -> bool {
    if unsafe { FILE_READY.get(&cgroup_id) }.is_some() {
        return true;
    }
    let mut level: i32 = 0;
    while level < MAX_CGROUP_DEPTH {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 || id == cgroup_id {
            return false;
        }
        if unsafe { FILE_READY.get(&id) }.is_some() {
            return true;
        }
        level += 1;
    }
    false
}

/// Containers of an identity whose file rules name paths inside them
/// (`policy_flags::FILES_PER_ROOT`, pods): the daemon resolves the rule
/// paths in each container's root, which exists only once the runtime
/// made it, and marks the container's cgroup in `FILE_READY`. A program
/// started (execve) in a cgroup of such an identity that is not marked
/// yet is not refused, which would fail the container's start, but held:
/// the kernel sends the task SIGSTOP (a kernel signal: a pid namespace's
/// init gets it too), which stops it on its way back to user space, before
/// the new program's first instruction. The daemon resumes it (SIGCONT)
/// once the container's inodes are in the policy. Exec never fails here.
/// Only tasks outside the host's mount namespace are held: the runtime's
/// own processes (the shim, `runc` before it enters the container) are in
/// it.
#[inline(always)]
fn bprm_check(ctx: LsmContext) -> i32 {
    // bprm_check_security(struct linux_binprm *bprm), then the verdict so far.
    let prev: i32 = ctx.arg(1);
    if prev != 0 {
        return crate::lsm::PRIOR_DENIAL;
    }
    match CONFIG.get(0) {
        Some(c) if c.file_slots != 0 => {}
        _ => return ALLOW,
    }
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let id = identity::of_current_cgroup(cgroup_id);
    if id.slot == SLOT_UNKNOWN {
        return ALLOW;
    }
    let Some(p) = id.policy else {
        return ALLOW;
    };
    if p.flags & policy_flags::FILES_PER_ROOT == 0 {
        return ALLOW;
    }
    if ready(cgroup_id) {
        return ALLOW;
    }
    // The runtime's own processes (a shim in the pod cgroup, runc before
    // it enters the container) run in the host's mount namespace.
    if in_host_mnt_ns() {
        return ALLOW;
    }
    unsafe { bpf_send_signal(SIGSTOP) };
    ALLOW
}

#[inline(always)]
fn bloom_has(ino: u64, dev: u32) -> bool {
    let bit = bloom_bit(ino, dev);
    match FILE_BLOOM.get(bit >> 6) {
        Some(w) => *w & (1u64 << (bit & 63)) != 0,
        None => true,
    }
}

/// What the nearest protected ancestor-or-self of the file says.
enum Found {
    /// No rule, or not an agent.
    Nothing,
    /// (slot's identity, policy, rule value, inode number)
    Rule(Identity, PolicyState, enforcer_common::FileRuleValue, u64),
    /// A bound cgroup without a policy reached a protected inode.
    NoPolicy(Identity),
    TooDeep,
}

/// The agent behind the current task, resolved once per hook run.
enum Who {
    NotAgent,
    Agent(Identity, PolicyState),
    NoPolicy(Identity),
}

#[inline(always)]
fn who() -> Who {
    let id = identity::current();
    if id.slot == SLOT_UNKNOWN {
        return Who::NotAgent;
    }
    match id.policy {
        Some(p) if p.flags & policy_flags::FILES != 0 => Who::Agent(id, p),
        Some(_) => Who::NotAgent,
        None => Who::NoPolicy(id),
    }
}

/// Where a walk stopped.
enum Walk {
    /// Reached the filesystem root (or a null link) without a hit.
    End,
    /// An inode whose Bloom bit is set: (dentry, its number).
    Hit(*const u8, u64),
    TooDeep,
}

/// Walk from (dentry, inode) up the parents to the first inode whose
/// `FILE_BLOOM` bit is set.
#[inline(always)]
fn walk(mut dentry: *const u8, mut inode: *const u8, dev: u32) -> Walk {
    let mut depth = 0u32;
    while depth < MAX_FILE_DEPTH {
        if !inode.is_null() {
            let ino = load_u64(inode, off(&ENFORCER_OFF_INODE_I_INO));
            if bloom_has(ino, dev) {
                return Walk::Hit(dentry, ino);
            }
        }
        if dentry.is_null() {
            return Walk::End;
        }
        let parent = load_ptr(dentry, off(&ENFORCER_OFF_DENTRY_D_PARENT));
        if parent.is_null() || parent == dentry {
            // The root of this filesystem: nothing above it protects the file.
            return Walk::End;
        }
        dentry = parent;
        inode = load_ptr(dentry, off(&ENFORCER_OFF_DENTRY_D_INODE));
        depth += 1;
    }
    Walk::TooDeep
}

/// The nearest rule of (dentry, inode) for the current task. The identity
/// is resolved once, at the first Bloom hit, outside the walk loops (the
/// verifier explores each loop on its own instead of their product).
#[inline(always)]
fn find(dentry: *const u8, inode: *const u8) -> Found {
    let sb = load_ptr(inode, off(&ENFORCER_OFF_INODE_I_SB));
    let dev = load_u32(sb, off(&ENFORCER_OFF_SB_S_DEV));
    // Nothing from the first walk but (dentry, ino) flows on: the verifier
    // then sees one state here whatever level the hit was at, and explores
    // the identity lookup and the second walk once.
    let (mut d, mut ino) = match walk(dentry, inode, dev) {
        Walk::End => return Found::Nothing,
        Walk::TooDeep => return Found::TooDeep,
        Walk::Hit(d, ino) => (d, ino),
    };
    let (id, p) = match who() {
        Who::Agent(id, p) => (id, p),
        Who::NoPolicy(id) => return Found::NoPolicy(id),
        _ => return Found::Nothing,
    };
    let mut key = FileKey {
        ino,
        dev,
        table_id: p.table_id,
    };
    // From the first hit on, the same walk with a FILE_RULES lookup at
    // every Bloom hit (the hit itself first). Its own bound: at most
    // MAX_FILE_DEPTH levels above the hit.
    let mut hit = true;
    let mut depth = 0u32;
    while depth < MAX_FILE_DEPTH {
        if hit {
            key.ino = ino;
            if let Some(v) = unsafe { FILE_RULES.get(&key) } {
                return Found::Rule(id, p, *v, ino);
            }
        }
        if d.is_null() {
            return Found::Nothing;
        }
        let parent = load_ptr(d, off(&ENFORCER_OFF_DENTRY_D_PARENT));
        if parent.is_null() || parent == d {
            return Found::Nothing;
        }
        d = parent;
        let i = load_ptr(d, off(&ENFORCER_OFF_DENTRY_D_INODE));
        depth += 1;
        hit = false;
        if !i.is_null() {
            ino = load_u64(i, off(&ENFORCER_OFF_INODE_I_INO));
            hit = bloom_has(ino, dev);
        }
    }
    Found::TooDeep
}

#[inline(always)]
fn decision(id: &Identity, act: u8, rule_id: u32) -> Decision {
    Decision {
        cgroup_id: id.cgroup_id,
        slot: id.slot,
        rule_id,
        action: act,
        verdict: verdict::DENY,
        addr: [0; 16],
        port: 0,
        protocol: 0,
        family: 0,
        sock_type: 0,
        reason: 0,
    }
}

/// Judge the hook's file: `dentry` (of the name used) and `inode`.
#[inline(always)]
fn check(act: u8, dentry: *const u8, inode: *const u8) -> i32 {
    let Some(cfg) = CONFIG.get(0) else {
        return ALLOW;
    };
    if crate::identity::is_resolver(cfg) {
        if act == action::FILE_OPEN {
            // The resolver (root, possibly inside an agent's container)
            // opens files and directories only: a device or FIFO swapped
            // in after its stat is refused before its driver's open runs.
            if !file_or_dir(inode) {
                return EPERM;
            }
            resolve(inode);
        }
        return ALLOW;
    }
    if cfg.file_slots == 0 {
        return ALLOW;
    }
    if off(&ENFORCER_OFF_VALID) == 0 {
        // No struct offsets: every agent with file rules fails closed.
        return match who() {
            Who::Agent(id, p) => finish(
                &decision(&id, act, rule::FILE_NO_OFFSETS),
                p.flags & policy_flags::AUDIT != 0,
            ),
            _ => ALLOW,
        };
    }
    match find(dentry, inode) {
        Found::Nothing => ALLOW,
        Found::NoPolicy(id) => {
            report::record(&decision(&id, act, rule::NO_POLICY));
            EPERM
        }
        Found::TooDeep => match who() {
            Who::Agent(id, p) if p.flags & policy_flags::FILE_DIRS != 0 => finish(
                &decision(&id, act, rule::FILE_DEPTH),
                p.flags & policy_flags::AUDIT != 0,
            ),
            _ => ALLOW,
        },
        Found::Rule(id, p, v, ino) => {
            let audit = p.flags & policy_flags::AUDIT != 0;
            let sb = load_ptr(inode, off(&ENFORCER_OFF_INODE_I_SB));
            let dev = load_u32(sb, off(&ENFORCER_OFF_SB_S_DEV));
            let mut d = decision(&id, act, v.rule_id);
            d.addr[..8].copy_from_slice(&ino.to_le_bytes());
            d.addr[8..12].copy_from_slice(&dev.to_le_bytes());
            match v.access {
                file_access::AUDIT => {
                    d.verdict = verdict::AUDIT;
                    report::record(&d);
                    ALLOW
                }
                file_access::TAINT if act == action::FILE_OPEN => {
                    if let Some(t) = TAINTED.get_ptr_mut(id.slot) {
                        unsafe {
                            if *t == 0 {
                                *t = bpf_ktime_get_ns();
                                // After the taint: a verdict cached before
                                // it (a flow way) answers no more.
                                report::bump_gen();
                            }
                        }
                    }
                    // Opens the egress program's clamp gate (slot 0 is no
                    // identity's).
                    if let Some(any) = TAINTED.get_ptr_mut(0) {
                        unsafe { *any = 1 };
                    }
                    d.verdict = verdict::TAINT;
                    report::record(&d);
                    ALLOW
                }
                // deny rules, and a new name for a taint file (its later
                // opens through that name must still taint).
                _ => finish(&d, audit),
            }
        }
    }
}

/// The enforcer's resolver thread opened a rule path: record the inode the
/// hook sees (on overlayfs there are two opens, the overlay inode and the
/// real one, neither of which `stat` reports exactly).
/// A regular file or a directory (unknown `i_mode` offset: true).
#[inline(always)]
fn file_or_dir(inode: *const u8) -> bool {
    let mode_off = off(&ENFORCER_OFF_INODE_I_MODE);
    if mode_off == 0 || inode.is_null() {
        return true;
    }
    let mode = unsafe { core::ptr::read(inode.add(mode_off) as *const u16) } & 0o170000;
    mode == 0o100000 || mode == 0o040000
}

#[inline(always)]
fn resolve(inode: *const u8) {
    if off(&ENFORCER_OFF_VALID) == 0 || inode.is_null() {
        return;
    }
    let sb = load_ptr(inode, off(&ENFORCER_OFF_INODE_I_SB));
    let key = FileKey {
        ino: load_u64(inode, off(&ENFORCER_OFF_INODE_I_INO)),
        dev: load_u32(sb, off(&ENFORCER_OFF_SB_S_DEV)),
        table_id: 0,
    };
    let _ = RESOLVED.insert(&key, &1, 0);
}

/// A would-be denial: denied, or recorded as audit in `mode: audit`.
#[inline(always)]
fn finish(d: &Decision, audit: bool) -> i32 {
    let mut d = *d;
    if audit {
        d.verdict = verdict::AUDIT;
        report::record(&d);
        return ALLOW;
    }
    d.verdict = verdict::DENY;
    report::record(&d);
    EPERM
}
