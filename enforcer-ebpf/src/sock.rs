//! cgroup/sock_create: the kernel runs this hook from `inet_create` and
//! `inet6_create`, i.e. for AF_INET and AF_INET6 sockets only. Of those the
//! agent may create TCP and UDP sockets. Raw IP sockets and ICMP "ping"
//! sockets are refused (EPERM) even to a process holding CAP_NET_RAW: they
//! bypass the connect/sendmsg hooks and carry ICMP exfiltration. Inet
//! sockets of other protocols (SCTP, MPTCP, UDP-Lite) are refused because
//! their connect paths are not all covered by the sock_addr hooks.
//!
//! Other families never reach this hook. AF_PACKET needs CAP_NET_RAW, which
//! `enforcer run` never leaves to the agent; the daemon reports processes
//! in bound cgroups that hold it (BPF LSM's `lsm_cgroup/socket_create` is
//! the kernel-side answer where available).
use aya_ebpf::{macros::cgroup_sock, programs::SockContext};
use enforcer_common::{action, policy_flags, rule, verdict};

use crate::{
    identity,
    report::{self, Decision},
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;

const AF_UNIX: u32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const AF_NETLINK: u32 = 16;
const AF_PACKET: u32 = 17;
const SOCK_RAW: u32 = 3;
const IPPROTO_ICMP: u32 = 1;
const IPPROTO_ICMPV6: u32 = 58;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

#[cgroup_sock(sock_create)]
pub fn enforcer_sock_create(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    let (family, sock_type, protocol) = unsafe { ((*sk).family, (*sk).type_, (*sk).protocol) };
    let refused_rule = match family {
        AF_UNIX | AF_NETLINK => None,
        AF_INET | AF_INET6 => {
            // The kernel has already resolved protocol 0 to the type's default.
            if sock_type == SOCK_RAW || protocol == IPPROTO_ICMP || protocol == IPPROTO_ICMPV6 {
                Some(rule::RAW_SOCKET)
            } else if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
                Some(rule::SOCKET_PROTOCOL)
            } else {
                None
            }
        }
        // Not reached on current kernels (see the module doc); refused in
        // case a kernel ever runs the hook for them.
        AF_PACKET => Some(rule::RAW_SOCKET),
        _ => Some(rule::SOCKET_FAMILY),
    };
    let Some(rule_id) = refused_rule else {
        // Ordinary sockets are not decisions worth an event; egress is judged
        // at connect/sendmsg.
        return ALLOW;
    };
    let id = identity::current();
    let audit = matches!(id.policy, Some(p) if p.flags & policy_flags::AUDIT != 0);
    let (v, ret) = if audit {
        (verdict::AUDIT, ALLOW)
    } else {
        (verdict::DENY, DENY)
    };
    report::record(&Decision {
        cgroup_id: id.cgroup_id,
        slot: id.slot,
        rule_id,
        action: action::SOCK_CREATE,
        verdict: v,
        addr: [0; 16],
        port: 0,
        protocol: protocol as u8,
        family: family as u8,
        sock_type: sock_type as u8,
        reason: 0,
    });
    ret
}
