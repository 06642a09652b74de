//! The egress program's guard, run on every packet of an agent's sockets
//! before the first-bytes judge (`inspect.rs`):
//!
//! - **IP options and IPv6 routing headers**: a packet carrying IPv4
//!   options (source routing: `IP_OPTIONS`, an `IP_RETOPTS` cmsg) or an
//!   IPv6 hop-by-hop, routing or destination-options header
//!   (`IPV6_RTHDR`, ...) goes first to a hop the connect/sendmsg hooks
//!   never judged. It is dropped and recorded (`rule::IP_OPTIONS`).
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
#[inline(never)]
pub fn egress(skb: *mut aya_ebpf::bindings::__sk_buff, sk: *mut bpf_sock) -> Guard {
    // The common case costs one array lookup (TCP) or one byte read and one
    // array lookup (UDP): the whole header is parsed only for a packet with
    // options or while a slot is tainted. A TCP socket of an agent cannot
    // carry options: the setsockopt program refuses them and TCP takes no
    // per-message IP options (cmsgs); datagram sockets can take them per
    // message (`IP_RETOPTS`, an `IPV6_RTHDR` cmsg), so their packets are
    // read.
    let tcp = unsafe { (*sk).protocol } == u32::from(packet::IPPROTO_TCP);
    let options = !tcp && packet::has_options(skb);
    let tainted = matches!(TAINTED.get(0), Some(any) if *any != 0);
    if !options && !tainted {
        return Guard::Next;
    }
    let ip = packet::ip(skb);
    if !ip.ok {
        return Guard::Next;
    }
    if ip.options {
        let id = identity::of_skb(skb);
        let audit = matches!(id.policy, Some(p) if p.flags & policy_flags::AUDIT != 0);
        return refuse(skb, sk, &ip, rule::IP_OPTIONS, id.cgroup_id, id.slot, audit);
    }
    clamp(skb, sk, &ip)
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
