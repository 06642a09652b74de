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
//! The hooks are global (BPF LSM is not per cgroup): they return at once
//! while no identity has file rules (`CONFIG.file_slots == 0`) and for
//! processes outside every bound cgroup. A bound cgroup without a policy
//! fails closed. Struct member offsets come from userspace, which reads them
//! from the running kernel's BTF (`FILE_OFFSETS`); without them the hooks
//! fail closed for identities with file rules.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::lsm,
    programs::LsmContext,
    EbpfContext,
};
use enforcer_common::{
    action, file_access, policy_flags, rule, verdict, FileKey, FileOffsets, FileRuleValue,
    MAX_FILE_DEPTH, SLOT_UNKNOWN,
};

use crate::{
    identity,
    maps::{CONFIG, FILE_OFFSETS, FILE_RULES, RESOLVED, TAINTED},
    report::{self, Decision},
};

const ALLOW: i32 = 0;
const EPERM: i32 = -1;

/// Hook argument `n` as a plain number. Read through probe_read so that
/// the verifier sees a scalar: offsets taken from a map may then be added
/// to it, which it refuses on a typed (BTF) pointer.
#[inline(always)]
fn arg(ctx: &LsmContext, n: usize) -> u64 {
    let p = ctx.as_ptr() as *const u64;
    unsafe { bpf_probe_read_kernel(p.wrapping_add(n)) }.unwrap_or(0)
}

#[inline(always)]
fn read_u64(base: u64, off: u32) -> u64 {
    if base == 0 {
        return 0;
    }
    unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const u64) }.unwrap_or(0)
}

#[inline(always)]
fn read_u32(base: u64, off: u32) -> u32 {
    if base == 0 {
        return 0;
    }
    unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const u32) }.unwrap_or(0)
}

#[lsm(hook = "file_open")]
pub fn enforcer_file_open(ctx: LsmContext) -> i32 {
    // file_open(struct file *file), then the previous BPF program's verdict.
    let prev = arg(&ctx, 1) as i32;
    if prev != 0 {
        return prev;
    }
    check(&ctx, action::FILE_OPEN, 0)
}

#[lsm(hook = "inode_link")]
pub fn enforcer_inode_link(ctx: LsmContext) -> i32 {
    // inode_link(struct dentry *old_dentry, struct inode *dir, struct dentry *new_dentry)
    let prev = arg(&ctx, 3) as i32;
    if prev != 0 {
        return prev;
    }
    check(&ctx, action::FILE_LINK, 0)
}

#[lsm(hook = "inode_rename")]
pub fn enforcer_inode_rename(ctx: LsmContext) -> i32 {
    // inode_rename(struct inode *old_dir, struct dentry *old_dentry,
    //              struct inode *new_dir, struct dentry *new_dentry)
    let prev = arg(&ctx, 4) as i32;
    if prev != 0 {
        return prev;
    }
    check(&ctx, action::FILE_RENAME, 1)
}

enum Found {
    Nothing,
    Rule(FileRuleValue, u64),
    TooDeep,
}

/// The rule of the nearest protected ancestor-or-self of (dentry, inode).
#[inline(always)]
fn find(
    off: &FileOffsets,
    mut dentry: u64,
    mut inode: u64,
    key: &mut FileKey,
    dirs: bool,
) -> Found {
    let mut depth = 0u32;
    while depth < MAX_FILE_DEPTH {
        if inode != 0 {
            key.ino = read_u64(inode, off.inode_i_ino);
            if let Some(v) = unsafe { FILE_RULES.get(&*key) } {
                return Found::Rule(*v, key.ino);
            }
        }
        if !dirs || dentry == 0 {
            return Found::Nothing;
        }
        let parent = read_u64(dentry, off.dentry_d_parent);
        if parent == 0 || parent == dentry {
            // The root of this filesystem: nothing above it protects the file.
            return Found::Nothing;
        }
        dentry = parent;
        inode = read_u64(dentry, off.dentry_d_inode);
        depth += 1;
    }
    Found::TooDeep
}

/// Judge the hook's file. Open: arg 0 is the `struct file *`; link and
/// rename: arg `dentry_arg` is the `struct dentry *` of the existing name.
#[inline(always)]
fn check(ctx: &LsmContext, act: u8, dentry_arg: usize) -> i32 {
    let Some(cfg) = CONFIG.get(0) else {
        return ALLOW;
    };
    if cfg.resolver_tid != 0 && cfg.resolver_tid == bpf_get_current_pid_tgid() as u32 {
        if act == action::FILE_OPEN {
            resolve(ctx);
        }
        return ALLOW;
    }
    if cfg.file_slots == 0 {
        return ALLOW;
    }
    let id = identity::current();
    if id.slot == SLOT_UNKNOWN {
        // Not an agent: no binding in this cgroup or above.
        return ALLOW;
    }
    let mut d = Decision {
        cgroup_id: id.cgroup_id,
        slot: id.slot,
        rule_id: rule::NO_POLICY,
        action: act,
        verdict: verdict::DENY,
        addr: [0; 16],
        port: 0,
        protocol: 0,
        family: 0,
        sock_type: 0,
    };
    let Some(p) = id.policy else {
        report::record(&d);
        return EPERM;
    };
    if p.flags & policy_flags::FILES == 0 {
        return ALLOW;
    }
    let audit = p.flags & policy_flags::AUDIT != 0;
    let Some(off) = FILE_OFFSETS.get(0) else {
        return ALLOW;
    };
    if off.valid == 0 {
        d.rule_id = rule::FILE_NO_OFFSETS;
        return finish(&d, audit);
    }
    let (dentry, inode) = if act == action::FILE_OPEN {
        let file = arg(ctx, 0);
        (
            read_u64(file, off.file_dentry),
            read_u64(file, off.file_f_inode),
        )
    } else {
        let dentry = arg(ctx, dentry_arg);
        (dentry, read_u64(dentry, off.dentry_d_inode))
    };
    let sb = read_u64(inode, off.inode_i_sb);
    let dev = read_u32(sb, off.sb_s_dev);
    let mut key = FileKey {
        ino: 0,
        dev,
        table_id: p.table_id,
    };
    let dirs = p.flags & policy_flags::FILE_DIRS != 0;
    match find(off, dentry, inode, &mut key, dirs) {
        Found::Nothing => ALLOW,
        Found::TooDeep => {
            d.rule_id = rule::FILE_DEPTH;
            finish(&d, audit)
        }
        Found::Rule(v, ino) => {
            d.rule_id = v.rule_id;
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
                            }
                        }
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
#[inline(always)]
fn resolve(ctx: &LsmContext) {
    let Some(off) = FILE_OFFSETS.get(0) else {
        return;
    };
    let inode = read_u64(arg(ctx, 0), off.file_f_inode);
    let sb = read_u64(inode, off.inode_i_sb);
    let key = FileKey {
        ino: read_u64(inode, off.inode_i_ino),
        dev: read_u32(sb, off.sb_s_dev),
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
