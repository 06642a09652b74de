//! lsm/socket_create (BPF LSM, global): packet sockets of agents.
//!
//! `cgroup/sock_create` runs for AF_INET/AF_INET6 only, so a process in a
//! bound cgroup that holds CAP_NET_RAW could open an AF_PACKET socket and
//! send frames that no cgroup hook judges (tc egress can be skipped with
//! PACKET_QDISC_BYPASS). Where BPF LSM works the daemon attaches this hook
//! with the file hooks: an agent's AF_PACKET socket is refused (EPERM, rule
//! `raw-socket`; recorded as audit and allowed in `mode: audit`), also when
//! its cgroup is bound to no policy (fail closed). Every other socket of
//! the machine costs one comparison; a packet socket of a process outside
//! every bound cgroup costs the identity lookup and is allowed.
use aya_ebpf::{macros::lsm, programs::LsmContext};
use enforcer_common::{action, policy_flags, rule, verdict};

use crate::{
    identity,
    report::{self, Decision},
};

const AF_PACKET: i32 = 17;
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
    if family != AF_PACKET || kern != 0 {
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
        rule_id: rule::RAW_SOCKET,
        action: action::SOCK_CREATE,
        verdict: if audit { verdict::AUDIT } else { verdict::DENY },
        addr: [0; 16],
        port: 0,
        // The protocol is an ethertype in network byte order (ETH_P_ALL =
        // htons(3)): the event keeps its low byte as the inet hooks do.
        protocol: protocol as u8,
        family: AF_PACKET as u8,
        sock_type: sock_type as u8,
    });
    if audit {
        0
    } else {
        EPERM
    }
}
