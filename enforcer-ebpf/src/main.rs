//! enforcer eBPF programs. One module per hook family:
//! - `sock_addr`: cgroup/connect4, connect6, sendmsg4, sendmsg6 (egress verdicts)
//! - `sock`: cgroup/sock_create (raw, packet and ICMP sockets)
//! - `sockopt`: cgroup/setsockopt (IP options, IPv6 routing headers)
//! - `inspect`: cgroup_skb/egress (first bytes of connections to learned
//!   addresses), after `guard` (IP options, the taint clamp on open sockets)
//! - `ingress`: cgroup_skb/ingress (connections and datagrams from peers
//!   outside the identity)
//! - `files`: lsm/file_open, inode_link, inode_rename (file policy, taint)
//! - `lsm_socket`: lsm/socket_create (packet sockets of agents),
//!   socket_connect, socket_sendmsg, file_receive (inet sockets created
//!   outside the identity)
//! - `lsm_probe`: lsm/file_open, the BPF LSM capability probe
//! - `unix`: cgroup/connect_unix, cgroup/sendmsg_unix (unix sockets by `spec.local`)
//! - `unix_lsm`: lsm/unix_stream_connect, lsm/unix_may_send (the same, seeing the peer)
//!
//! Shared pieces: `maps` (every map), `lsm` (what the LSM hooks share), `identity` (cgroup -> identity slot ->
//! policy generation, fail closed), `report` (counters and ring-buffer
//! events), `packet` (IP and transport headers of cgroup_skb packets).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// `report::bump_gen`: an atomic add (the target has no atomic types with
// read-modify-write methods).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
// `lsm::settle`: constants the verifier sees on every path (inline asm).
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod files;
#[cfg(target_arch = "bpf")]
mod guard;
#[cfg(target_arch = "bpf")]
mod identity;
#[cfg(target_arch = "bpf")]
mod ingress;
#[cfg(target_arch = "bpf")]
mod inspect;
#[cfg(target_arch = "bpf")]
mod lsm;
#[cfg(target_arch = "bpf")]
mod lsm_probe;
#[cfg(target_arch = "bpf")]
mod lsm_socket;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod report;
#[cfg(target_arch = "bpf")]
mod sock;
#[cfg(target_arch = "bpf")]
mod sock_addr;
#[cfg(target_arch = "bpf")]
mod sockopt;
#[cfg(target_arch = "bpf")]
mod unix;
#[cfg(target_arch = "bpf")]
mod unix_lsm;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path; this is never executed.
    unsafe { core::hint::unreachable_unchecked() }
}

/// GPL-compatible license: needed for some helpers (and for LSM programs later).
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // The eBPF object is only meaningful for the bpfel target (see enforcer/build.rs).
}
