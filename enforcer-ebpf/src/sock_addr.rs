//! cgroup/connect4, connect6, sendmsg4, sendmsg6: the egress verdicts.
//!
//! connect covers TCP (including TCP Fast Open: `sendto(MSG_FASTOPEN)` and
//! `TCP_FASTOPEN_CONNECT` both pass through the connect hook) and connected
//! UDP; sendmsg covers unconnected UDP (`sendto`, `sendmsg`, `sendmmsg`).
//! An IPv4-mapped IPv6 destination (`::ffff:a.b.c.d`) is matched against the
//! identity's IPv4 table. Returning 0 makes the syscall fail with EPERM.
use aya_ebpf::{macros::cgroup_sock_addr, maps::lpm_trie::Key, programs::SockAddrContext};
use enforcer_common::{
    action, policy_flags, proto, rule, stat, verdict, RuleSet, V4Key, V6Key, MAX_PORT_RULES,
};

use crate::{
    identity,
    maps::{EGRESS_V4, EGRESS_V6},
    report::{self, Decision},
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

#[cgroup_sock_addr(connect4)]
pub fn enforcer_connect4(ctx: SockAddrContext) -> i32 {
    check4(&ctx, action::CONNECT)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn enforcer_sendmsg4(ctx: SockAddrContext) -> i32 {
    check4(&ctx, action::SENDMSG)
}

#[cgroup_sock_addr(connect6)]
pub fn enforcer_connect6(ctx: SockAddrContext) -> i32 {
    check6(&ctx, action::CONNECT)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn enforcer_sendmsg6(ctx: SockAddrContext) -> i32 {
    check6(&ctx, action::SENDMSG)
}

#[inline(always)]
fn proto_bit(protocol: u32) -> u8 {
    match protocol {
        proto::IPPROTO_TCP => proto::TCP,
        proto::IPPROTO_UDP => proto::UDP,
        _ => proto::OTHER,
    }
}

/// First rule of the set that admits (port, protocol), as its rule id.
#[inline(always)]
fn match_rules(set: &RuleSet, port: u16, bit: u8) -> Option<u32> {
    let count = set.count as usize;
    let mut i = 0usize;
    while i < MAX_PORT_RULES {
        if i >= count {
            break;
        }
        let r = &set.rules[i];
        if r.proto_mask & bit != 0 && port >= r.port_lo && port <= r.port_hi {
            return Some(r.rule_id);
        }
        i += 1;
    }
    None
}

#[inline(always)]
fn lookup_v4(table_id: u32, addr: [u8; 4], port: u16, bit: u8) -> Option<u32> {
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

#[inline(always)]
fn lookup_v6(table_id: u32, addr: [u8; 16], port: u16, bit: u8) -> Option<u32> {
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

/// Shared tail: identity, policy lookup, verdict, report.
#[inline(always)]
fn decide(
    action_kind: u8,
    family: u8,
    sock_type: u32,
    protocol: u32,
    port: u16,
    mapped: [u8; 16],
    lookup: impl FnOnce(u32, u16, u8) -> Option<u32>,
) -> i32 {
    let id = identity::current();
    let bit = proto_bit(protocol);
    let (verdict_kind, rule_id, ret) = match id.policy {
        None => {
            report::bump_stat(stat::NO_IDENTITY);
            (verdict::DENY, rule::NO_POLICY, DENY)
        }
        Some(p) => match lookup(p.table_id, port, bit) {
            Some(rule_id) => (verdict::ALLOW, rule_id, ALLOW),
            None if p.flags & policy_flags::AUDIT != 0 => {
                (verdict::AUDIT, rule::DEFAULT_DENY, ALLOW)
            }
            None => (verdict::DENY, rule::DEFAULT_DENY, DENY),
        },
    };
    report::record(&Decision {
        cgroup_id: id.cgroup_id,
        slot: id.slot,
        rule_id,
        action: action_kind,
        verdict: verdict_kind,
        addr: mapped,
        port,
        protocol: protocol as u8,
        family,
        sock_type: sock_type as u8,
    });
    ret
}

#[inline(always)]
fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

#[inline(always)]
fn check4(ctx: &SockAddrContext, action_kind: u8) -> i32 {
    let sa = ctx.sock_addr;
    // user_ip4 and user_port hold network byte order in memory.
    let (ip, port_raw, sock_type, protocol) =
        unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).type_, (*sa).protocol) };
    let addr = ip.to_ne_bytes();
    let port = u16::from_be(port_raw as u16);
    decide(
        action_kind,
        AF_INET,
        sock_type,
        protocol,
        port,
        v4_mapped(addr),
        |table, port, bit| lookup_v4(table, addr, port, bit),
    )
}

#[inline(always)]
fn check6(ctx: &SockAddrContext, action_kind: u8) -> i32 {
    let sa = ctx.sock_addr;
    // Context fields must be read as aligned 4-byte loads, one word at a time.
    let (w0, w1, w2, w3, port_raw, sock_type, protocol) = unsafe {
        (
            core::ptr::read_volatile(&(*sa).user_ip6[0]),
            core::ptr::read_volatile(&(*sa).user_ip6[1]),
            core::ptr::read_volatile(&(*sa).user_ip6[2]),
            core::ptr::read_volatile(&(*sa).user_ip6[3]),
            (*sa).user_port,
            (*sa).type_,
            (*sa).protocol,
        )
    };
    let (b0, b1, b2, b3) = (
        w0.to_ne_bytes(),
        w1.to_ne_bytes(),
        w2.to_ne_bytes(),
        w3.to_ne_bytes(),
    );
    let addr = [
        b0[0], b0[1], b0[2], b0[3], b1[0], b1[1], b1[2], b1[3], b2[0], b2[1], b2[2], b2[3], b3[0],
        b3[1], b3[2], b3[3],
    ];
    let port = u16::from_be(port_raw as u16);
    let is_v4_mapped = w0 == 0 && w1 == 0 && b2 == [0, 0, 0xff, 0xff];
    if is_v4_mapped {
        // ::ffff:a.b.c.d reaches an IPv4 host: judge it by the IPv4 rules.
        let v4 = b3;
        return decide(
            action_kind,
            AF_INET6,
            sock_type,
            protocol,
            port,
            addr,
            |t, p, b| lookup_v4(t, v4, p, b),
        );
    }
    decide(
        action_kind,
        AF_INET6,
        sock_type,
        protocol,
        port,
        addr,
        |t, p, b| lookup_v6(t, addr, p, b),
    )
}
