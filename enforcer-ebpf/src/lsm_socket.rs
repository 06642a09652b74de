//! lsm/socket_create (BPF LSM, global): sockets of families no cgroup hook
//! judges.
//!
//! `cgroup/sock_create` and the connect/sendmsg hooks cover AF_INET and
//! AF_INET6 only. A process in a bound cgroup could otherwise send through
//! AF_PACKET or AF_XDP (with CAP_NET_RAW: frames that skip every cgroup
//! hook, and tc egress with PACKET_QDISC_BYPASS), AF_VSOCK (no capability:
//! the host or hypervisor of a VM-isolated runtime such as Kata), or
//! AF_TIPC, AF_RDS, AF_CAN, ... Where BPF LSM works the daemon attaches
//! this hook with the file hooks, and an agent may create sockets of
//! AF_UNIX, AF_INET, AF_INET6 and AF_NETLINK only; any other family is
//! refused (EPERM; rule `raw-socket` for AF_PACKET and AF_XDP, else
//! `socket-family`; recorded as audit and allowed in `mode: audit`), also
//! when its cgroup is bound to no policy (fail closed). Kernel-internal
//! sockets (`kern`) are not judged. Sockets of those four families cost one
//! comparison; a refused family of a process outside every bound cgroup
//! costs the identity lookup and is allowed.
use aya_ebpf::{macros::lsm, programs::LsmContext};
use enforcer_common::{action, policy_flags, rule, verdict};

use crate::{
    identity,
    report::{self, Decision},
};

const AF_UNIX: i32 = 1;
const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;
const AF_NETLINK: i32 = 16;
const AF_PACKET: i32 = 17;
const AF_XDP: i32 = 44;
const EPERM: i32 = -1;

#[lsm(hook = "socket_create")]
pub fn enforcer_socket_create(ctx: LsmContext) -> i32 {
    // socket_create(int family, int type, int protocol, int kern), then the
    // previous BPF program's verdict.
    let prev: i32 = ctx.arg(4);
    if prev != 0 {
        return prev;
    }
    let family: i32 = ctx.arg(0);
    let kern: i32 = ctx.arg(3);
    if kern != 0 || matches!(family, AF_UNIX | AF_INET | AF_INET6 | AF_NETLINK) {
        return 0;
    }
    let id = identity::current();
    if !id.bound {
        return 0;
    }
    let sock_type: i32 = ctx.arg(1);
    let protocol: i32 = ctx.arg(2);
    let audit = matches!(id.policy, Some(p) if p.flags & policy_flags::AUDIT != 0);
    report::record(&Decision {
        cgroup_id: id.cgroup_id,
        slot: id.slot,
        rule_id: if family == AF_PACKET || family == AF_XDP {
            rule::RAW_SOCKET
        } else {
            rule::SOCKET_FAMILY
        },
        action: action::SOCK_CREATE,
        verdict: if audit { verdict::AUDIT } else { verdict::DENY },
        addr: [0; 16],
        port: 0,
        // The low byte, as the inet hooks keep it (for AF_PACKET the
        // protocol is an ethertype in network byte order).
        protocol: protocol as u8,
        family: family as u8,
        sock_type: sock_type as u8,
        reason: 0,
    });
    if audit {
        0
    } else {
        EPERM
    }
}
