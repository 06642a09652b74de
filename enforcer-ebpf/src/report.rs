//! Counters and ring-buffer events. Never blocks a verdict: a full ring
//! buffer only increments `STATS[EVENTS_LOST]`.
use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns,
};
use enforcer_common::{
    action, counter_index, first_bytes::PRESENTED_MAX, reason_index, stat, verdict, Event,
    InspectEvent,
};

use crate::maps::{CONFIG, COUNTERS, EVENTS, REASONS, STATS};

#[inline(always)]
pub fn bump_stat(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn bump_counter(slot: u32, action: u8, verdict: u8) {
    if let Some(p) = COUNTERS.get_ptr_mut(counter_index(slot, action, verdict)) {
        unsafe { *p += 1 };
    }
}

/// What a program decided, for counters and the event stream.
#[derive(Clone, Copy)]
pub struct Decision {
    pub cgroup_id: u64,
    pub slot: u32,
    pub rule_id: u32,
    pub action: u8,
    pub verdict: u8,
    pub addr: [u8; 16],
    pub port: u16,
    pub protocol: u8,
    pub family: u8,
    pub sock_type: u8,
    /// `first_bytes::reason::*` (action INSPECT), else 0.
    pub reason: u8,
}

#[inline(always)]
fn wants_event(v: u8) -> bool {
    if v != verdict::ALLOW {
        return true;
    }
    let sample = match CONFIG.get(0) {
        Some(c) => c.allow_sample,
        None => 0,
    };
    match sample {
        0 => false,
        1 => true,
        n => (unsafe { bpf_get_prandom_u32() }) % n == 0,
    }
}

/// Count a decision: refused first bytes by reason, the rest by (action, verdict).
#[inline(always)]
fn count(d: &Decision) {
    if d.action == action::INSPECT && d.verdict != verdict::ALLOW {
        let i = reason_index(d.slot, d.reason, d.verdict == verdict::AUDIT);
        if let Some(p) = REASONS.get_ptr_mut(i) {
            unsafe { *p += 1 };
        }
    } else {
        bump_counter(d.slot, d.action, d.verdict);
    }
}

#[inline(always)]
fn event(d: &Decision, pid_tgid: u64, comm: [u8; 16]) -> Event {
    Event {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: d.cgroup_id,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        slot: d.slot,
        rule_id: d.rule_id,
        addr: d.addr,
        port: d.port,
        action: d.action,
        verdict: d.verdict,
        protocol: d.protocol,
        family: d.family,
        sock_type: d.sock_type,
        reason: d.reason,
        comm,
    }
}

/// The local end and the presented name of an INSPECT decision.
pub struct Presented<'a> {
    pub kind: u8,
    pub src: [u8; 16],
    pub src_port: u16,
    /// The scratch buffer and the name's place in it (len 0: none).
    pub buf: &'a [u8; 2 * enforcer_common::first_bytes::BUF],
    pub off: usize,
    pub len: usize,
}

/// Record a judgement of the egress program: `pid` and `comm` are the
/// connecting process's (kept at connect; cgroup_skb programs cannot read
/// the current task before Linux 6.4, and may run in softirq context).
#[inline(always)]
pub fn record_inspect(d: &Decision, p: &Presented, pid: u32, comm: [u8; 16]) {
    count(d);
    if !wants_event(d.verdict) {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<InspectEvent>(0) else {
        bump_stat(stat::EVENTS_LOST);
        return;
    };
    let out = entry.as_mut_ptr();
    unsafe {
        (*out).event = event(d, (u64::from(pid) << 32) | u64::from(pid), comm);
        (*out).kind = p.kind;
        (*out).truncated = u8::from(p.len > PRESENTED_MAX);
        (*out)._pad = [0; 3];
        (*out).src_port = p.src_port;
        (*out).src = p.src;
        let n = if p.len > PRESENTED_MAX {
            PRESENTED_MAX
        } else {
            p.len
        };
        (*out).name_len = n as u8;
        // A fixed-size copy (no loop for the verifier to walk): the bytes
        // past `name_len` are whatever followed the name.
        let src = p
            .buf
            .as_ptr()
            .add(p.off & enforcer_common::first_bytes::MASK);
        core::ptr::copy_nonoverlapping(src, (*out).name.as_mut_ptr(), PRESENTED_MAX);
    }
    entry.submit(0);
}

#[inline(always)]
pub fn record(d: &Decision) {
    count(d);
    if !wants_event(d.verdict) {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        bump_stat(stat::EVENTS_LOST);
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let comm = bpf_get_current_comm().unwrap_or([0u8; 16]);
    entry.write(event(d, pid_tgid, comm));
    entry.submit(0);
}

/// Record a packet refused by a cgroup_skb program (no current task there:
/// `pid` and `comm` are what the socket's state kept, else 0), with the
/// packet's local end so that userspace can reset the connection. Fields
/// are written one by one into the reserved record (no copy of the whole
/// record on the stack: the cgroup_skb programs' call chains are near the
/// 512-byte limit); `name` is left unwritten (`name_len` 0).
#[inline(always)]
pub fn record_packet(d: &Decision, src: &[u8; 16], src_port: u16, pid: u32, comm: &[u8; 16]) {
    count(d);
    if !wants_event(d.verdict) {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<InspectEvent>(0) else {
        bump_stat(stat::EVENTS_LOST);
        return;
    };
    let out = entry.as_mut_ptr();
    unsafe {
        let e = &mut (*out).event;
        e.ts_ns = bpf_ktime_get_ns();
        e.cgroup_id = d.cgroup_id;
        e.pid = pid;
        e.tid = pid;
        e.slot = d.slot;
        e.rule_id = d.rule_id;
        e.addr = d.addr;
        e.port = d.port;
        e.action = d.action;
        e.verdict = d.verdict;
        e.protocol = d.protocol;
        e.family = d.family;
        e.sock_type = d.sock_type;
        e.reason = d.reason;
        e.comm = *comm;
        (*out).kind = 0;
        (*out).truncated = 0;
        (*out)._pad = [0; 3];
        (*out).src_port = src_port;
        (*out).src = *src;
        (*out).name_len = 0;
    }
    entry.submit(0);
}

/// Record a unix socket decision with the address the agent gave.
#[inline(always)]
pub fn record_unix(d: &Decision, key: &enforcer_common::UnixKey) {
    count(d);
    if !wants_event(d.verdict) {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<enforcer_common::UnixEvent>(0) else {
        bump_stat(stat::EVENTS_LOST);
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let comm = bpf_get_current_comm().unwrap_or([0u8; 16]);
    let out = entry.as_mut_ptr();
    unsafe {
        (*out).event = event(d, pid_tgid, comm);
        (*out).kind = key.kind;
        (*out).len = key.len;
        (*out)._pad = [0; 6];
        (*out).name = key.name;
        (*out)._pad2 = [0; 4];
    }
    entry.submit(0);
}
