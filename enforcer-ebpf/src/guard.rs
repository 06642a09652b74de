//! The egress program's guard, run on every packet of an agent's sockets
//! before the first-bytes judge (`inspect.rs`):
//!
//! - **IP options and IPv6 extension headers**: a packet carrying IPv4
//!   options (source routing or Record Route: `IP_OPTIONS`, an
//!   `IP_RETOPTS` cmsg) or an IPv6 hop-by-hop, routing or
//!   destination-options header (`IPV6_RTHDR`, ...) goes first to a hop the
//!   connect/sendmsg hooks never judged, or carries bytes they never saw.
//!   It is dropped and recorded (`rule::IP_OPTIONS`). The socket options
//!   are refused when they are set (`sockopt.rs`); what reaches this check
//!   is per-message options (cmsgs) and anything that set them some other
//!   way. Every packet is read, TCP included, and a listener's SYN-ACK
//!   (Linux >= 6.5 runs the program for it, with a request socket, not a
//!   full one). A SYN-ACK sent under SYN cookies has no socket and passes
//!   no cgroup program: that is why the setsockopt refusal stays.
//! - **The taint clamp on open sockets**: the connect/sendmsg hooks read
//!   `TAINTED` when a connection is opened or a datagram addressed; a socket
//!   opened before the identity read a `taint` file would keep sending. Once
//!   any slot is tainted (`TAINTED[0]`, one array lookup per packet until
//!   then), each packet's identity (the socket's cgroup) is checked: if it is
//!   tainted, the packet's destination must be admitted by the onTaint
//!   generation (by address, or by a learned address whose first bytes need
//!   no judging; a connection judged under the onTaint generation is left to
//!   the judge). Otherwise the socket is cut (`inspect_status::CLAMPED`, one
//!   record, every later packet dropped; userspace resets a TCP one).
//!   Packets to the identity's DNS proxy pass.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{bpf_sock, BPF_SK_STORAGE_GET_F_CREATE},
    helpers::bpf_sk_storage_get,
};
use enforcer_common::{
    action, inspect_status, policy_flags, proto, rule, stat, verdict, InspectState, TAINT_SLOT_BIT,
};

use crate::{
    identity,
    maps::{INSPECT, TAINTED},
    packet::{self, Ip},
    report::{self, Decision},
    sock_addr::{lookup_in, Dst},
};

/// What the guard says about a packet.
#[repr(u32)]
pub enum Guard {
    /// Not the guard's business: go on to the first-bytes judge.
    Next,
    Drop,
    /// Allowed (audit mode): go on.
    Audit,
}

/// A subprogram of its own (`inline(never)`): its paths end in one return,
/// so the verifier sees the same caller state after it whatever the guard
/// did, and the first-bytes judge after it is not explored once per guard
/// path (Linux 6.1 refused the inlined version as too complex).
///
/// `full` is the packet's full socket, or null for a request socket's
/// SYN-ACK (only the options are judged then).
#[inline(never)]
pub fn egress(skb: *mut aya_ebpf::bindings::__sk_buff, full: *mut bpf_sock) -> Guard {
    // The common case costs one byte read from the packet and one array
    // lookup: the header is parsed only for a packet with options or while
    // a slot is tainted.
    let options = packet::has_options(skb);
    let tainted = matches!(TAINTED.get(0), Some(any) if *any != 0);
    if !options && !tainted {
        return Guard::Next;
    }
    let ip = packet::ip(skb);
    if !ip.ok {
        return Guard::Next;
    }
    if ip.options {
        // Recorded per packet; the socket keeps its state.
        let id = identity::of_skb(skb);
        let audit = matches!(id.policy, Some(p) if p.flags & policy_flags::AUDIT != 0);
        return refuse(
            skb,
            full,
            &ip,
            rule::IP_OPTIONS,
            id.cgroup_id,
            id.slot,
            audit,
        );
    }
    if full.is_null() || !tainted {
        return Guard::Next;
    }
    clamp(skb, full, &ip)
}

#[inline(always)]
fn clamp(skb: *mut aya_ebpf::bindings::__sk_buff, sk: *mut bpf_sock, ip: &Ip) -> Guard {
    let id = identity::of_skb(skb);
    let Some(p) = id.policy else {
        return Guard::Next;
    };
    let audit = p.flags & policy_flags::AUDIT != 0;
    if p.flags & policy_flags::TAINT_CLAMP == 0 {
        return Guard::Next;
    }
    match TAINTED.get(id.slot) {
        Some(t) if *t != 0 => {}
        _ => return Guard::Next,
    }
    let map = core::ptr::from_ref(&INSPECT).cast_mut().cast::<c_void>();
    let st = unsafe { bpf_sk_storage_get(map, sk.cast(), core::ptr::null_mut(), 0) }
        .cast::<InspectState>();
    if !st.is_null() {
        let st = unsafe { &*st };
        if st.status == inspect_status::CLAMPED {
            report::bump_stat(stat::PACKET_DROPPED);
            return Guard::Drop;
        }
        if st.tainted != 0 {
            // Opened under the onTaint generation: judged by it already.
            return Guard::Next;
        }
    }
    let ports = packet::ports(skb, ip);
    if !ports.ok {
        // Not TCP or UDP (or unreadable): nothing of a tainted identity
        // leaves unjudged.
        return refuse(skb, sk, ip, rule::TAINT_CLAMP, id.cgroup_id, id.slot, audit);
    }
    let dport = ports.dst;
    if p.dns_port != 0 && dport == p.dns_port && packet::is_proxy_addr(&ip.dst) {
        return Guard::Next;
    }
    let bit = if ip.proto == packet::IPPROTO_TCP {
        proto::TCP
    } else {
        proto::UDP
    };
    let dst = if packet::is_v4_mapped(&ip.dst) {
        Dst::V4([ip.dst[12], ip.dst[13], ip.dst[14], ip.dst[15]])
    } else {
        Dst::V6(ip.dst)
    };
    let m = lookup_in(p.taint_table_id, id.slot | TAINT_SLOT_BIT, dst, dport, bit);
    if m.found && !m.judge {
        return Guard::Next;
    }
    refuse(skb, sk, ip, rule::TAINT_CLAMP, id.cgroup_id, id.slot, audit)
}

/// Drop (or, in audit mode, record and pass) a packet. The taint clamp cuts
/// the socket for good and records it once; IP options are recorded per
/// packet.
#[inline(always)]
fn refuse(
    skb: *mut aya_ebpf::bindings::__sk_buff,
    sk: *mut bpf_sock,
    ip: &Ip,
    rule_id: u32,
    cgroup_id: u64,
    slot: u32,
    audit: bool,
) -> Guard {
    let mut pid = 0;
    let mut comm = [0u8; 16];
    if rule_id == rule::TAINT_CLAMP {
        // One record per socket: the state says it was cut (or, in audit
        // mode, recorded).
        let map = core::ptr::from_ref(&INSPECT).cast_mut().cast::<c_void>();
        let st = unsafe {
            bpf_sk_storage_get(
                map,
                sk.cast(),
                core::ptr::null_mut(),
                u64::from(BPF_SK_STORAGE_GET_F_CREATE),
            )
        }
        .cast::<InspectState>();
        if !st.is_null() {
            let st = unsafe { &mut *st };
            let seen = st.clamp_seen != 0;
            st.clamp_seen = 1;
            if st.status == 0 {
                // New state: the socket's first bytes are not judged.
                st.status = inspect_status::PASSED;
                st.cgroup_id = cgroup_id;
                st.slot = slot;
            }
            if !audit {
                st.status = inspect_status::CLAMPED;
            }
            if seen {
                return if audit {
                    Guard::Audit
                } else {
                    report::bump_stat(stat::PACKET_DROPPED);
                    Guard::Drop
                };
            }
            pid = st.pid;
            comm = st.comm;
        }
    }
    let ports = packet::ports(skb, ip);
    let (sport, dport) = (ports.src, ports.dst);
    let sock_type = if ip.proto == packet::IPPROTO_TCP {
        1
    } else {
        2
    };
    report::record_packet(
        &Decision {
            cgroup_id,
            slot,
            rule_id,
            action: action::PACKET,
            verdict: if audit { verdict::AUDIT } else { verdict::DENY },
            addr: ip.dst,
            port: dport,
            protocol: ip.proto,
            family: ip.family,
            sock_type,
            reason: 0,
        },
        &ip.src,
        sport,
        pid,
        &comm,
    );
    if audit {
        Guard::Audit
    } else {
        report::bump_stat(stat::PACKET_DROPPED);
        Guard::Drop
    }
}
