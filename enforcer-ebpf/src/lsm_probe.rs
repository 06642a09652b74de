//! lsm/file_open capability probe.
//!
//! Userspace loads and attaches this program once at start to find out
//! whether the running kernel accepts BPF LSM programs (it needs `bpf` in
//! the `lsm=` boot parameter; some kernels refuse them with EPERM even
//! then), reports the answer (`enforcer status`, logs,
//! `enforcer_capability{name="bpf_lsm"}`), and detaches it right away. It
//! allows every open: the file policy itself needs this capability and is
//! refused, or degraded on request, where the probe fails.
use aya_ebpf::{macros::lsm, programs::LsmContext};

#[lsm(hook = "file_open")]
pub fn enforcer_lsm_probe(_ctx: LsmContext) -> i32 {
    0
}
