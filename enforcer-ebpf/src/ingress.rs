//! cgroup_skb/ingress: connections and datagrams from peers outside the
//! identity (`spec.ingress`).
//!
//! The kernel runs this program from `sk_filter` for a packet about to be
//! queued on one of the cgroup's sockets, before the socket sees it. What
//! opens an inbound channel is judged:
//!
//! - every packet to a **listening TCP socket** (a SYN, or the ACK of a SYN
//!   cookie): refused, no connection is ever created, unless the peer is
//!   admitted;
//! - every datagram to an **unconnected UDP socket** (a connected one only
//!   receives from the peer its connect was judged for).
//!
//! Packets of connected sockets pass after one field read. A peer is
//! admitted when (1) an `ingress` rule's CIDR holds its address and the rule
//! admits the local port and protocol (`PolicyState.ingress_table_id`, one
//! LPM lookup in `EGRESS_*`); (2) it is a socket of the same identity on
//! this host (the packet came in on loopback and the socket that sent it,
//! found by its 4-tuple, has the identity's cgroup: the agent's own helpers;
//! TCP only); (3) for UDP, it is the identity's DNS proxy, or a peer the
//! identity may send to (a reply; the egress tables, current generation).
//! Anything else is dropped and recorded (`action::INGRESS`, the peer's
//! address and the local port), or recorded and passed in audit mode. A
//! socket whose cgroup is bound to no policy receives nothing (fail closed).
use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock, bpf_sock_tuple, BPF_F_CURRENT_NETNS},
    helpers::{bpf_sk_fullsock, bpf_sk_lookup_tcp, bpf_sk_release},
    macros::cgroup_skb,
    maps::lpm_trie::Key,
    programs::SkBuffContext,
};
use enforcer_common::{
    action, policy_flags, proto, rule, stat, verdict, PolicyState, V4Key, V6Key,
};

use crate::{
    identity,
    maps::{EGRESS_V4, EGRESS_V6},
    packet::{self, Ip, IPPROTO_TCP, IPPROTO_UDP},
    report::{self, Decision},
    sock_addr::{lookup, match_rules, Dst},
};

const PASS: i32 = 1;
const DROP: i32 = 0;
const TCP_ESTABLISHED: u32 = 1;
const TCP_LISTEN: u32 = 10;
/// `lo` has index 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

#[cgroup_skb(ingress)]
pub fn enforcer_ingress(ctx: SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return PASS;
    }
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return PASS;
    }
    let (protocol, state) = unsafe { ((*full).protocol, (*full).state) };
    let inbound = match protocol {
        6 => state == TCP_LISTEN,
        17 => state != TCP_ESTABLISHED,
        _ => false,
    };
    if !inbound {
        return PASS;
    }
    judge(skb)
}

#[inline(always)]
fn judge(skb: *mut __sk_buff) -> i32 {
    let id = identity::of_skb(skb);
    if !id.bound {
        return PASS;
    }
    let who = Who {
        cgroup_id: id.cgroup_id,
        slot: id.slot,
    };
    // The policy is taken out of its `Option` first: LLVM may otherwise
    // move the undefined payload on the `None` path, which the verifier
    // rejects.
    let Some(p) = id.policy else {
        return refuse_no_policy(&who);
    };
    let ip = packet::ip(skb);
    if !ip.ok {
        return PASS;
    }
    let ports = packet::ports(skb, &ip);
    if !ports.ok || ip.options {
        // IP options, a later fragment or another protocol: unjudgeable.
        return refuse(&who, &ip, 0, rule::DEFAULT_DENY);
    }
    let (sport, dport) = (ports.src, ports.dst);
    let bit = if ip.proto == IPPROTO_TCP {
        proto::TCP
    } else {
        proto::UDP
    };
    let peer = if packet::is_v4_mapped(&ip.src) {
        Dst::V4([ip.src[12], ip.src[13], ip.src[14], ip.src[15]])
    } else {
        Dst::V6(ip.src)
    };
    // (1) an ingress rule.
    if p.ingress_table_id != 0 {
        if let Some(rule_id) = ingress_rule(p.ingress_table_id, peer, dport, bit) {
            if allowed_counted(&who, &ip, dport, rule_id) {
                return PASS;
            }
        }
    }
    let local = unsafe { (*skb).ingress_ifindex } == LOOPBACK_IFINDEX;
    if ip.proto == IPPROTO_TCP {
        // (2) the agent's own connection over loopback.
        if local && same_identity_tcp(skb, &ip, sport, dport, id.slot) {
            return PASS;
        }
    } else {
        // (3) the identity's DNS proxy, or a reply from a peer it may send to.
        if local && p.dns_port != 0 && sport == p.dns_port && packet::is_proxy_addr(&ip.src) {
            return PASS;
        }
        if may_send_to(&p, id.slot, peer, sport, bit) {
            return PASS;
        }
    }
    if p.flags & policy_flags::AUDIT != 0 {
        record(&who, &ip, dport, rule::DEFAULT_DENY, verdict::AUDIT);
        return PASS;
    }
    refuse(&who, &ip, dport, rule::DEFAULT_DENY)
}

// The lookups are subprograms of their own (`inline(never)`): inlined, their
// keys and tuples would share one stack frame past the 512-byte limit.
#[inline(never)]
fn ingress_rule(table_id: u32, peer: Dst, port: u16, bit: u8) -> Option<u32> {
    match peer {
        Dst::V4(addr) => {
            let key = Key::new(
                64,
                V4Key {
                    table_id_be: table_id.to_be_bytes(),
                    addr,
                },
            );
            EGRESS_V4
                .get(&key)
                .and_then(|set| match_rules(set, port, bit))
        }
        Dst::V6(addr) => {
            let key = Key::new(
                160,
                V6Key {
                    table_id_be: table_id.to_be_bytes(),
                    addr,
                },
            );
            EGRESS_V6
                .get(&key)
                .and_then(|set| match_rules(set, port, bit))
        }
    }
}

/// A datagram's sender is a peer the identity may send to (a reply).
#[inline(never)]
fn may_send_to(p: &PolicyState, slot: u32, peer: Dst, port: u16, bit: u8) -> bool {
    // A learned address whose first bytes must be judged is not one the
    // identity may send UDP to (sock_addr refuses it): not a reply either.
    let m = lookup(p, slot, peer, port, bit);
    m.found && !m.judge
}

/// An admitted connection is recorded like an allowed connect (sampled by
/// `--allow-events`). Always true.
#[inline(always)]
fn allowed_counted(who: &Who, ip: &Ip, port: u16, rule_id: u32) -> bool {
    record(who, ip, port, rule_id, verdict::ALLOW);
    true
}

/// Is the sender of this loopback packet a socket of the same identity?
/// The socket connected from (src, sport) to (dst, dport), found by that
/// 4-tuple (a listener bound to the peer's port does not count).
#[inline(never)]
fn same_identity_tcp(skb: *mut __sk_buff, ip: &Ip, sport: u16, dport: u16, slot: u32) -> bool {
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size;
    // The peer's socket receives packets from us: source = our end.
    unsafe {
        if packet::is_v4_mapped(&ip.src) {
            let t = &mut tuple.__bindgen_anon_1.ipv4;
            t.saddr = u32::from_ne_bytes([ip.dst[12], ip.dst[13], ip.dst[14], ip.dst[15]]);
            t.daddr = u32::from_ne_bytes([ip.src[12], ip.src[13], ip.src[14], ip.src[15]]);
            t.sport = dport.to_be();
            t.dport = sport.to_be();
            size = core::mem::size_of_val(t) as u32;
        } else {
            let t = &mut tuple.__bindgen_anon_1.ipv6;
            t.saddr = words(&ip.dst);
            t.daddr = words(&ip.src);
            t.sport = dport.to_be();
            t.dport = sport.to_be();
            size = core::mem::size_of_val(t) as u32;
        }
    }
    let peer =
        unsafe { bpf_sk_lookup_tcp(skb.cast(), &mut tuple, size, BPF_F_CURRENT_NETNS as u64, 0) };
    if peer.is_null() {
        return false;
    }
    let ok = connected_to(peer, sport, dport) && {
        let other = identity::of_sk(peer);
        other.bound && other.slot == slot
    };
    unsafe { bpf_sk_release(peer.cast()) };
    ok
}

/// The found socket is the sending end of this packet's connection (not a
/// listener that a lookup by address and port also finds).
#[inline(always)]
fn connected_to(peer: *mut bpf_sock, sport: u16, dport: u16) -> bool {
    let (state, src_port, dst_port) =
        unsafe { ((*peer).state, (*peer).src_port, (*peer).dst_port) };
    state != TCP_LISTEN && src_port == u32::from(sport) && u16::from_be(dst_port) == dport
}

#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// The receiving socket's cgroup and identity slot.
struct Who {
    cgroup_id: u64,
    slot: u32,
}

#[inline(always)]
fn record(who: &Who, ip: &Ip, port: u16, rule_id: u32, v: u8) {
    report::record_packet(
        &Decision {
            cgroup_id: who.cgroup_id,
            slot: who.slot,
            rule_id,
            action: action::INGRESS,
            verdict: v,
            addr: ip.src,
            port,
            protocol: ip.proto,
            family: ip.family,
            sock_type: if ip.proto == IPPROTO_UDP { 2 } else { 1 },
            reason: 0,
        },
        &ip.dst,
        port,
        0,
        &[0; 16],
    );
}

/// A bound cgroup without a policy receives nothing (fail closed). Recorded
/// without the packet's addresses: parsing them here would put a second
/// packet parse on the entry's stack frame (512 bytes for the whole call
/// chain).
#[inline(never)]
fn refuse_no_policy(who: &Who) -> i32 {
    report::bump_stat(stat::NO_IDENTITY);
    let none = Ip {
        ok: false,
        family: 0,
        src: [0; 16],
        dst: [0; 16],
        proto: 0,
        l4: 0,
        options: false,
        later_fragment: false,
    };
    refuse(who, &none, 0, rule::NO_POLICY)
}

#[inline(always)]
fn refuse(who: &Who, ip: &Ip, port: u16, rule_id: u32) -> i32 {
    record(who, ip, port, rule_id, verdict::DENY);
    report::bump_stat(stat::INGRESS_DROPPED);
    DROP
}
