//! Counters and ring-buffer events. Never blocks a verdict: a full ring
//! buffer only increments `STATS[EVENTS_LOST]`.
use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns,
};
use enforcer_common::{counter_index, stat, verdict, Event};

use crate::maps::{CONFIG, COUNTERS, EVENTS, STATS};

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

#[inline(always)]
pub fn record(d: &Decision) {
    bump_counter(d.slot, d.action, d.verdict);
    if !wants_event(d.verdict) {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        bump_stat(stat::EVENTS_LOST);
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let comm = bpf_get_current_comm().unwrap_or([0u8; 16]);
    entry.write(Event {
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
        _pad: 0,
        comm,
    });
    entry.submit(0);
}
