//! Shared by the BPF LSM hook families (`files`, `lsm_socket`, `unix_lsm`).

use core::arch::asm;

/// The value an LSM program returns, in a form the verifier can check:
/// 0 (allow) or -EPERM.
///
/// Linux >= 6.10 refuses at load an LSM program whose return value it
/// cannot prove to be within [-4095, 0]. LLVM turns `if deny { -1 } else
/// { 0 }` into `r &= 1; r = -r`, and the verifier of 6.12 does not follow
/// a negation (the value becomes "unknown scalar"): Debian 13's kernel
/// refused every hook of ours that way. Each arm here writes its constant
/// with an instruction of its own, which LLVM cannot merge into arithmetic,
/// so R0 is a known constant on every path to the exit.
#[inline(always)]
pub fn settle(verdict: i32) -> i32 {
    let r: i64;
    if verdict == 0 {
        unsafe { asm!("{0} = 0", out(reg) r, options(pure, nomem, nostack)) };
    } else {
        unsafe { asm!("{0} = -1", out(reg) r, options(pure, nomem, nostack)) };
    }
    r as i32
}

/// What a hook of ours returns when the BPF LSM program before it on the
/// same hook already refused (its verdict is the hook's last argument):
/// -EPERM, whatever errno that program chose, since [`settle`] can only
/// prove 0 and -EPERM to the verifier. Nothing is lost in practice: the
/// kernel's trampoline runs int-returning LSM programs as `fmod_ret` and
/// stops the chain at the first non-zero verdict, so ours see a non-zero
/// one only where a kernel passes it on.
pub const PRIOR_DENIAL: i32 = -1; // -EPERM
