//! cgroup/connect4, connect6, sendmsg4, sendmsg6: the egress verdicts;
//! cgroup/recvmsg4, recvmsg6, getpeername4, getpeername6: DNS source restore.
//!
//! connect covers TCP (including TCP Fast Open: `sendto(MSG_FASTOPEN)` and
//! `TCP_FASTOPEN_CONNECT` both pass through the connect hook) and connected
//! UDP; sendmsg covers unconnected UDP (`sendto`, `sendmsg`, `sendmmsg`).
//! An IPv4-mapped IPv6 destination (`::ffff:a.b.c.d`) is matched against the
//! identity's IPv4 table. Returning 0 makes the syscall fail with EPERM.
//!
//! Verdict order: (1) port 53 of an identity with a DNS proxy is steered to
//! the proxy (never judged by the CIDR table: names are judged by the
//! proxy); (2) the identity's CIDR table (one LPM lookup); (3) addresses a
//! DNS answer allowed (`LEARNED_*`, until they expire); else deny (or audit).
//! Once the identity read a `taint` file (`TAINTED[slot]`), (2) and (3) use
//! its onTaint generation and onTaint learned addresses instead.
//! Before all of them: a repeat of a TCP/UDP flow that (2) admitted in
//! this epoch under the current verdict generation is allowed by its way
//! in the flow cache, without resolving the identity or any lookup
//! (`report::repeat_allow`: under one generation the identity, its
//! policy and its taint are unchanged, and a table never changes under
//! its id).
//!
//! An address allowed only by (3) is a name's: unless the admitting host
//! rule says `inspect: none`, a TCP connect gets socket storage (`INSPECT`,
//! pending) and the egress program (`inspect.rs`) judges its first bytes;
//! UDP to it is refused (QUIC's first bytes are encrypted).
use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE,
    helpers::{bpf_ktime_get_ns, bpf_sk_storage_get},
    macros::cgroup_sock_addr,
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use enforcer_common::{
    action, first_bytes::reason, inspect_status, policy_flags, proto, rule, rule_flags, stat,
    verdict, InspectState, LearnedKey4, LearnedKey6, OrigDst, PolicyState, RuleSet, V4Key, V6Key,
    DNS_PORT, MAX_PORT_RULES, TAINT_SLOT_BIT,
};

use crate::{
    identity,
    maps::{DNS_ORIG, EGRESS_V4, EGRESS_V6, INSPECT, LEARNED_V4, LEARNED_V6, TAINTED},
    packet,
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

#[cgroup_sock_addr(recvmsg4)]
pub fn enforcer_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn enforcer_getpeername4(ctx: SockAddrContext) -> i32 {
    restore4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn enforcer_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore6(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn enforcer_getpeername6(ctx: SockAddrContext) -> i32 {
    restore6(&ctx);
    ALLOW
}

#[inline(always)]
pub(crate) fn proto_bit(protocol: u32) -> u8 {
    match protocol {
        proto::IPPROTO_TCP => proto::TCP,
        proto::IPPROTO_UDP => proto::UDP,
        _ => proto::OTHER,
    }
}

/// First rule of the set that admits (port, protocol), as its rule id.
#[inline(always)]
pub(crate) fn match_rules(set: &RuleSet, port: u16, bit: u8) -> Option<u32> {
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

/// The admitting rule of a lookup. Plain fields, every one written on
/// every path (no `Option` of a tuple: LLVM may move an `Option`'s
/// undefined payload on the `None` path, which the verifier rejects).
#[derive(Clone, Copy)]
pub(crate) struct Match {
    pub found: bool,
    pub rule_id: u32,
    /// The first bytes must be judged (a learned address, no `inspect: none`).
    pub judge: bool,
    /// The CIDR table admitted it (not a learned address, which expires).
    pub table: bool,
}

const NO_MATCH: Match = Match {
    found: false,
    rule_id: 0,
    judge: false,
    table: false,
};

/// A learned address's admitting rule: the first with `inspect: none` if
/// any admits (port, protocol) (then nothing is judged), else the first.
#[inline(always)]
fn match_learned(set: &RuleSet, port: u16, bit: u8) -> Match {
    let count = set.count as usize;
    // Two plain values, not an Option<u32>: LLVM may read an Option's
    // payload on the None path, which the verifier rejects.
    let mut found = false;
    let mut first: u32 = 0;
    let mut i = 0usize;
    while i < MAX_PORT_RULES {
        if i >= count {
            break;
        }
        let r = &set.rules[i];
        if r.proto_mask & bit != 0 && port >= r.port_lo && port <= r.port_hi {
            if r.flags & rule_flags::RAW != 0 {
                return Match {
                    found: true,
                    rule_id: r.rule_id,
                    judge: false,
                    table: false,
                };
            }
            if !found {
                found = true;
                first = r.rule_id;
            }
        }
        i += 1;
    }
    Match {
        found,
        rule_id: first,
        judge: found,
        table: false,
    }
}

/// The destination, as the tables see it.
#[derive(Clone, Copy)]
pub(crate) enum Dst {
    V4([u8; 4]),
    V6([u8; 16]),
}

/// The generation and learned-address slot that judge the identity now:
/// the onTaint ones once a `taint` file was read.
#[inline(always)]
pub(crate) fn tables(p: &PolicyState, slot: u32) -> (u32, u32) {
    if p.flags & policy_flags::TAINT_CLAMP != 0 {
        if let Some(t) = TAINTED.get(slot) {
            if *t != 0 {
                return (p.taint_table_id, slot | TAINT_SLOT_BIT);
            }
        }
    }
    (p.table_id, slot)
}

/// The admitting rule.
#[inline(always)]
pub(crate) fn lookup(p: &PolicyState, slot: u32, dst: Dst, port: u16, bit: u8) -> Match {
    let (table_id, slot) = tables(p, slot);
    lookup_in(table_id, slot, dst, port, bit)
}

/// The admitting rule in one generation (`table_id`) and learned slot.
#[inline(always)]
pub(crate) fn lookup_in(table_id: u32, slot: u32, dst: Dst, port: u16, bit: u8) -> Match {
    match dst {
        Dst::V4(addr) => {
            let key = Key::new(
                64,
                V4Key {
                    table_id_be: table_id.to_be_bytes(),
                    addr,
                },
            );
            if let Some(r) = EGRESS_V4
                .get(&key)
                .and_then(|set| match_rules(set, port, bit))
            {
                return Match {
                    found: true,
                    rule_id: r,
                    judge: false,
                    table: true,
                };
            }
            let Some(learned) = LEARNED_V4.get_ptr(LearnedKey4 { slot, addr }) else {
                return NO_MATCH;
            };
            let learned = unsafe { &*learned };
            if learned.expires_ns <= unsafe { bpf_ktime_get_ns() } {
                return NO_MATCH;
            }
            match_learned(&learned.set, port, bit)
        }
        Dst::V6(addr) => {
            let key = Key::new(
                160,
                V6Key {
                    table_id_be: table_id.to_be_bytes(),
                    addr,
                },
            );
            if let Some(r) = EGRESS_V6
                .get(&key)
                .and_then(|set| match_rules(set, port, bit))
            {
                return Match {
                    found: true,
                    rule_id: r,
                    judge: false,
                    table: true,
                };
            }
            let Some(learned) = LEARNED_V6.get_ptr(LearnedKey6 { slot, addr }) else {
                return NO_MATCH;
            };
            let learned = unsafe { &*learned };
            if learned.expires_ns <= unsafe { bpf_ktime_get_ns() } {
                return NO_MATCH;
            }
            match_learned(&learned.set, port, bit)
        }
    }
}

/// What the hook should do with the call.
enum Outcome {
    /// Allow or deny; for an allowed TCP connect, the socket state to keep
    /// (`Some`: judge its first bytes; `None`: clear a previous connect's).
    /// (Plain values, no `Option`: LLVM may move an `Option`'s undefined
    /// payload, which the verifier rejects.)
    Verdict(i32, bool, InspectState),
    /// Rewrite the destination to the identity's DNS proxy on this port.
    SteerDns(u16),
}

#[inline(always)]
fn decide(
    action_kind: u8,
    family: u8,
    sock_type: u32,
    protocol: u32,
    port: u16,
    mapped: [u8; 16],
    dst: Dst,
) -> Outcome {
    let (cgroup_id, pid) = identity::current_ids();
    let bit = proto_bit(protocol);
    let mut d = Decision {
        cgroup_id,
        slot: 0,
        rule_id: 0,
        action: action_kind,
        verdict: verdict::ALLOW,
        addr: mapped,
        port,
        protocol: protocol as u8,
        family,
        sock_type: sock_type as u8,
        reason: 0,
    };
    // Read before the identity and the policy (see `report::gens`).
    let g = report::gens();
    // A repeat of a flow a table admitted under this verdict generation:
    // no identity, no lookup. (Only TCP and UDP: the key keeps the
    // protocol in a byte. Port 53 of an identity with a DNS proxy is never
    // a cached flow: it is steered below, and the proxy port is policy,
    // so a change of it moves the generation on.)
    if bit != proto::OTHER && report::repeat_allow(&d, pid, &g) {
        return Outcome::Verdict(ALLOW, false, InspectState::default());
    }
    let id = identity::of_current_cgroup(cgroup_id);
    d.slot = id.slot;
    // The generation and learned slot that judge the identity now.
    let mut table_id = 0u32;
    let mut learned_slot = id.slot;
    if let Some(p) = id.policy {
        if port == DNS_PORT && p.dns_port != 0 && (bit == proto::TCP || bit == proto::UDP) {
            return Outcome::SteerDns(p.dns_port);
        }
        (table_id, learned_slot) = tables(&p, id.slot);
    }
    // Set in the `Some` arm (read only there).
    let audit: bool;
    let mut judge_it = false;
    let mut inspect = InspectState::default();
    // The table that admitted the call, for the flow cache (0: none).
    let mut admitted_by = 0u32;
    let (verdict_kind, rule_id, ret) = match id.policy {
        None => {
            report::bump_stat(stat::NO_IDENTITY);
            (verdict::DENY, rule::NO_POLICY, DENY)
        }
        Some(p) => match {
            audit = p.flags & policy_flags::AUDIT != 0;
            lookup_in(table_id, learned_slot, dst, port, bit)
        } {
            Match {
                found: true,
                rule_id,
                judge: true,
                ..
            } if bit != proto::TCP => {
                // UDP to a name's address: its first bytes cannot be judged.
                d.action = action::INSPECT;
                d.reason = reason::UDP;
                if audit {
                    (verdict::AUDIT, rule_id, ALLOW)
                } else {
                    (verdict::DENY, rule_id, DENY)
                }
            }
            Match {
                found: true,
                rule_id,
                judge,
                table,
            } => {
                if table && bit != proto::OTHER {
                    admitted_by = table_id;
                }
                if judge {
                    judge_it = true;
                    inspect = InspectState {
                        cgroup_id: id.cgroup_id,
                        slot: id.slot,
                        rule_id,
                        port,
                        status: inspect_status::PENDING,
                        audit: u8::from(audit),
                        // Filled in by `keep_state` (connect only).
                        pid: 0,
                        comm: [0; 16],
                        isn: 0,
                        seq_known: 0,
                        tainted: u8::from(table_id != p.table_id),
                        clamp_seen: 0,
                        _pad: 0,
                    };
                }
                (verdict::ALLOW, rule_id, ALLOW)
            }
            _ if audit => (verdict::AUDIT, rule::DEFAULT_DENY, ALLOW),
            _ => (verdict::DENY, rule::DEFAULT_DENY, DENY),
        },
    };
    d.rule_id = rule_id;
    d.verdict = verdict_kind;
    report::record_admitted(&d, admitted_by, pid, &g);
    Outcome::Verdict(ret, judge_it, inspect)
}

/// Keep (or clear) the socket's first-bytes state for an allowed TCP
/// connect. False: the state could not be created (the caller fails closed).
#[inline(always)]
fn keep_state(ctx: &SockAddrContext, protocol: u32, judge: bool, st: &InspectState) -> bool {
    if protocol != proto::IPPROTO_TCP {
        return true;
    }
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    let map = core::ptr::from_ref(&INSPECT).cast_mut().cast();
    match judge {
        true => {
            let p = unsafe {
                bpf_sk_storage_get(
                    map,
                    sk.cast(),
                    core::ptr::null_mut(),
                    u64::from(BPF_SK_STORAGE_GET_F_CREATE),
                )
            }
            .cast::<InspectState>();
            if p.is_null() {
                return false;
            }
            unsafe {
                *p = *st;
                (*p).pid = (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32;
                if let Ok(c) = aya_ebpf::helpers::bpf_get_current_comm() {
                    (*p).comm = c;
                }
            }
            true
        }
        false => {
            // A socket connecting again (after a failed connect) to an
            // address that needs no judging.
            let p = unsafe { bpf_sk_storage_get(map, sk.cast(), core::ptr::null_mut(), 0) }
                .cast::<InspectState>();
            if !p.is_null() {
                unsafe { (*p).status = inspect_status::PASSED };
            }
            true
        }
    }
}

/// The verdict of an allowed call after its socket state is kept.
#[inline(always)]
fn finish(ctx: &SockAddrContext, action_kind: u8, ret: i32, judge: bool, st: &InspectState) -> i32 {
    if ret != ALLOW || action_kind != action::CONNECT {
        return ret;
    }
    let protocol = unsafe { (*ctx.sock_addr).protocol };
    if keep_state(ctx, protocol, judge, st) {
        ALLOW
    } else {
        report::bump_stat(enforcer_common::stat::INSPECT_NO_STATE);
        DENY
    }
}

#[inline(always)]
fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

const LOOPBACK4: [u8; 4] = [127, 0, 0, 1];
const LOOPBACK6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// Remember where the socket really sent to (for recvmsg/getpeername).
#[inline(always)]
/// The socket's storage is created here and freed by the kernel with the
/// socket. False: it could not be created (no memory, or the socket's
/// option memory is used up): the caller refuses the send (a reply could
/// not be restored, and the agent's resolver would wait for it in vain).
fn remember(ctx: &SockAddrContext, addr: [u8; 16], port: u16, proxy_port: u16) -> bool {
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    let map = core::ptr::from_ref(&DNS_ORIG).cast_mut().cast();
    let p = unsafe {
        bpf_sk_storage_get(
            map,
            sk.cast(),
            core::ptr::null_mut(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
    }
    .cast::<OrigDst>();
    if p.is_null() {
        report::bump_stat(stat::DNS_NO_STATE);
        return false;
    }
    unsafe {
        *p = OrigDst {
            addr,
            port,
            proxy_port,
            _pad: [0; 4],
        }
    };
    report::bump_stat(stat::DNS_STEERED);
    true
}

#[inline(always)]
fn check4(ctx: &SockAddrContext, action_kind: u8) -> i32 {
    let sa = ctx.sock_addr;
    // user_ip4 and user_port hold network byte order in memory.
    let (ip, port_raw, sock_type, protocol) =
        unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).type_, (*sa).protocol) };
    let addr = ip.to_ne_bytes();
    let port = u16::from_be(port_raw as u16);
    let mapped = v4_mapped(addr);
    match decide(
        action_kind,
        AF_INET,
        sock_type,
        protocol,
        port,
        mapped,
        Dst::V4(addr),
    ) {
        Outcome::Verdict(v, judge, st) => finish(ctx, action_kind, v, judge, &st),
        Outcome::SteerDns(proxy_port) => {
            if !remember(ctx, mapped, port, proxy_port) {
                return DENY;
            }
            unsafe {
                (*sa).user_ip4 = u32::from_ne_bytes(LOOPBACK4);
                (*sa).user_port = u32::from(proxy_port.to_be());
            }
            ALLOW
        }
    }
}

#[inline(always)]
fn read_ip6(ctx: &SockAddrContext) -> [u8; 16] {
    let sa = ctx.sock_addr;
    // Context fields must be read as aligned 4-byte loads, one word at a time.
    let (w0, w1, w2, w3) = unsafe {
        (
            core::ptr::read_volatile(&(*sa).user_ip6[0]),
            core::ptr::read_volatile(&(*sa).user_ip6[1]),
            core::ptr::read_volatile(&(*sa).user_ip6[2]),
            core::ptr::read_volatile(&(*sa).user_ip6[3]),
        )
    };
    let (b0, b1, b2, b3) = (
        w0.to_ne_bytes(),
        w1.to_ne_bytes(),
        w2.to_ne_bytes(),
        w3.to_ne_bytes(),
    );
    [
        b0[0], b0[1], b0[2], b0[3], b1[0], b1[1], b1[2], b1[3], b2[0], b2[1], b2[2], b2[3], b3[0],
        b3[1], b3[2], b3[3],
    ]
}

#[inline(always)]
fn write_ip6(ctx: &SockAddrContext, a: [u8; 16]) {
    let sa = ctx.sock_addr;
    unsafe {
        core::ptr::write_volatile(
            &mut (*sa).user_ip6[0],
            u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        );
        core::ptr::write_volatile(
            &mut (*sa).user_ip6[1],
            u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        );
        core::ptr::write_volatile(
            &mut (*sa).user_ip6[2],
            u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        );
        core::ptr::write_volatile(
            &mut (*sa).user_ip6[3],
            u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
        );
    }
}

#[inline(always)]
fn check6(ctx: &SockAddrContext, action_kind: u8) -> i32 {
    let sa = ctx.sock_addr;
    let addr = read_ip6(ctx);
    let (port_raw, sock_type, protocol) = unsafe { ((*sa).user_port, (*sa).type_, (*sa).protocol) };
    let port = u16::from_be(port_raw as u16);
    // ::ffff:a.b.c.d reaches an IPv4 host: judge it by the IPv4 rules.
    let mapped = packet::is_v4_mapped(&addr);
    let dst = if mapped {
        Dst::V4([addr[12], addr[13], addr[14], addr[15]])
    } else {
        Dst::V6(addr)
    };
    match decide(action_kind, AF_INET6, sock_type, protocol, port, addr, dst) {
        Outcome::Verdict(v, judge, st) => finish(ctx, action_kind, v, judge, &st),
        Outcome::SteerDns(proxy_port) => {
            if !remember(ctx, addr, port, proxy_port) {
                return DENY;
            }
            // A dual-stack socket that asked a v4 resolver keeps talking v4.
            let to = if mapped {
                v4_mapped(LOOPBACK4)
            } else {
                LOOPBACK6
            };
            write_ip6(ctx, to);
            unsafe { (*sa).user_port = u32::from(proxy_port.to_be()) };
            ALLOW
        }
    }
}

/// If this socket was steered to a DNS proxy and the peer is that proxy,
/// report the resolver it originally addressed.
#[inline(always)]
fn orig_for(ctx: &SockAddrContext, from: [u8; 16], port: u16) -> Option<OrigDst> {
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    let map = core::ptr::from_ref(&DNS_ORIG).cast_mut().cast();
    let p =
        unsafe { bpf_sk_storage_get(map, sk.cast(), core::ptr::null_mut(), 0) }.cast::<OrigDst>();
    if p.is_null() {
        return None;
    }
    let orig = unsafe { *p };
    let from_proxy = port == orig.proxy_port && (from == v4_mapped(LOOPBACK4) || from == LOOPBACK6);
    if from_proxy {
        Some(orig)
    } else {
        None
    }
}

#[inline(always)]
fn restore4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    let (ip, port_raw) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let port = u16::from_be(port_raw as u16);
    if port == 0 {
        return;
    }
    let Some(orig) = orig_for(ctx, v4_mapped(ip.to_ne_bytes()), port) else {
        return;
    };
    let a = orig.addr;
    // Only a v4 resolver's address fits (a v6 socket turned v4 by
    // IPV6_ADDRFORM may hold a v6 one).
    if !packet::is_v4_mapped(&a) {
        return;
    }
    unsafe {
        (*sa).user_ip4 = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
        (*sa).user_port = u32::from(orig.port.to_be());
    }
}

#[inline(always)]
fn restore6(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    let from = read_ip6(ctx);
    let port = u16::from_be(unsafe { (*sa).user_port } as u16);
    if port == 0 {
        return;
    }
    let Some(orig) = orig_for(ctx, from, port) else {
        return;
    };
    write_ip6(ctx, orig.addr);
    unsafe { (*sa).user_port = u32::from(orig.port.to_be()) };
}
