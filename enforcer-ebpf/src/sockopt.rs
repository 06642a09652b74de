//! cgroup/setsockopt: socket options that route an agent's packets past
//! the hooks are refused (EPERM; rule `ip-options`, recorded; allowed and
//! recorded as audit in `mode: audit`).
//!
//! IPv4 options (`IP_OPTIONS`: loose/strict source routes, record route
//! carrying data) and IPv6 extension headers (`IPV6_RTHDR`,
//! `IPV6_HOPOPTS`, `IPV6_DSTOPTS`, `IPV6_RTHDRDSTOPTS` and their RFC 2292
//! forms): the egress program drops the packets of the agent's sockets that
//! carry them, but a listener's SYN-ACKs leave without passing any cgroup
//! egress program, with the listener's options. Refusing the option at
//! `setsockopt` closes that; options given per message as control messages
//! (`IP_RETOPTS`, `IPV6_RTHDR` cmsgs) stay the egress program's job.
//!
//! Interface pinning (`SO_BINDTODEVICE`, `SO_BINDTOIFINDEX`,
//! `IP_UNICAST_IF`, `IPV6_UNICAST_IF`; rule `bind-device`): the policy
//! judges destination addresses, not routes, and a socket bound to another
//! interface (a VRF, a VPN's tunnel) reaches the same address somewhere
//! else. An unprivileged process may set them once per socket.
//!
//! The kernel runs this program for sockets of the attached cgroups (the
//! socket's cgroup, whoever calls): one comparison for any other option.
use aya_ebpf::{macros::cgroup_sockopt, programs::SockoptContext};
use enforcer_common::{action, policy_flags, rule, verdict};

use crate::{
    identity,
    report::{self, Decision},
};

const SOL_SOCKET: i32 = 1;
const SO_BINDTODEVICE: i32 = 25;
const SO_BINDTOIFINDEX: i32 = 62;
const IP_UNICAST_IF: i32 = 50;
const IPV6_UNICAST_IF: i32 = 76;
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
const IP_OPTIONS: i32 = 4;
const IPV6_2292HOPOPTS: i32 = 3;
const IPV6_2292DSTOPTS: i32 = 4;
const IPV6_2292RTHDR: i32 = 5;
const IPV6_2292PKTOPTIONS: i32 = 6;
const IPV6_HOPOPTS: i32 = 54;
const IPV6_RTHDRDSTOPTS: i32 = 55;
const IPV6_RTHDR: i32 = 57;
const IPV6_DSTOPTS: i32 = 59;
const PROCEED: i32 = 1;
const REFUSE: i32 = 0;

#[cgroup_sockopt(setsockopt)]
pub fn enforcer_setsockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    let (level, name) = unsafe { ((*so).level, (*so).optname) };
    let (refused, rule_id) = match level {
        SOL_IP if name == IP_OPTIONS => (true, rule::IP_OPTIONS),
        SOL_IP if name == IP_UNICAST_IF => (true, rule::BIND_DEVICE),
        SOL_SOCKET if name == SO_BINDTODEVICE || name == SO_BINDTOIFINDEX => {
            (true, rule::BIND_DEVICE)
        }
        SOL_IPV6 if name == IPV6_UNICAST_IF => (true, rule::BIND_DEVICE),
        SOL_IPV6 => (
            matches!(
                name,
                IPV6_2292HOPOPTS
                    | IPV6_2292DSTOPTS
                    | IPV6_2292RTHDR
                    | IPV6_2292PKTOPTIONS
                    | IPV6_HOPOPTS
                    | IPV6_RTHDRDSTOPTS
                    | IPV6_RTHDR
                    | IPV6_DSTOPTS
            ),
            rule::IP_OPTIONS,
        ),
        _ => (false, 0),
    };
    if !refused {
        return PROCEED;
    }
    let id = identity::current();
    let audit = matches!(id.policy, Some(p) if p.flags & policy_flags::AUDIT != 0);
    report::record(&Decision {
        cgroup_id: id.cgroup_id,
        slot: id.slot,
        rule_id,
        action: action::SETSOCKOPT,
        verdict: if audit { verdict::AUDIT } else { verdict::DENY },
        addr: [0; 16],
        // The option, for the record: level and name.
        port: name as u16,
        protocol: level as u8,
        family: if level == SOL_IPV6 { 10 } else { 2 },
        sock_type: 0,
        reason: 0,
    });
    if audit {
        PROCEED
    } else {
        REFUSE
    }
}
