//! Counters, flows and ring-buffer events. Never blocks a verdict: a full
//! ring buffer only increments `STATS[EVENTS_LOST]`.
//!
//! Allowed decisions are cheap: with `allow_sample` 1 (the default) the
//! plain ones (connect, sendmsg, ingress) are counted in a per-CPU flow
//! cache that userspace drains every second; those that carry more than a
//! flow key (first bytes, unix addresses), sampled ones, and flows the
//! full spill ring cannot take are records in `ALLOW_EVENTS`, which never
//! wakes the reader (it polls). Denials, audits and taints go to `EVENTS`,
//! where allows never take their room, and wake the reader at once.
use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_prandom_u32,
        bpf_ktime_get_coarse_ns, bpf_ktime_get_ns,
    },
};
use enforcer_common::{
    action, cache_gen, counter_index, first_bytes::PRESENTED_MAX, reason_index, stat, verdict,
    Event, FlowEntry, FlowKey, InspectEvent, FLOW_WAYS,
};

use crate::maps::{
    ALLOW_EVENTS, CACHE_GEN, CONFIG, COUNTERS, EVENTS, FLOWS, FLOW_SPILL, REASONS, STATS,
};

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

/// The process a flow names: the current task's (`current`: its `comm`
/// is read when a way is filled), or (cgroup_skb programs, which may run
/// in softirq context) the one the socket kept.
#[derive(Clone, Copy)]
struct Process<'a> {
    current: bool,
    pid: u32,
    comm: &'a [u8; 16],
}

/// What the per-CPU caches are validated by (`CACHE_GEN`, one line).
#[derive(Clone, Copy)]
pub struct Gens {
    pub epoch: u32,
    /// The verdict generation (`cache_gen::USER_GEN` + `TAINT_GEN`).
    pub gen: u32,
    pub secret: u32,
}

/// Read `CACHE_GEN`. A decision that may fill a flow way that answers
/// later decisions reads it *before* it resolves its identity and reads
/// its policy: a change after that read moves the generation on, and the
/// way (stamped with the older one) answers nothing.
#[inline(always)]
pub fn gens() -> Gens {
    let at = |i: u32| match CACHE_GEN.get(i) {
        Some(v) => *v as u32,
        None => 0,
    };
    Gens {
        epoch: at(cache_gen::EPOCH),
        gen: at(cache_gen::USER_GEN).wrapping_add(at(cache_gen::TAINT_GEN)),
        secret: at(cache_gen::SECRET),
    }
}

/// Move the verdict generation on (`cache_gen::TAINT_GEN`), after a
/// change of an input of verdicts (the file hook's taint). Atomic: other
/// CPUs add too, and a lost add could let a way filled before this change
/// answer after it.
#[inline(always)]
pub fn bump_gen() {
    if let Some(p) = CACHE_GEN.get_ptr_mut(cache_gen::TAINT_GEN) {
        // The BPF target has no `AtomicU64::fetch_add` (no CAS): the
        // intrinsic, whose result is unused, is one `BPF_XADD` (any kernel).
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::SeqCst }>(
                p, 1,
            );
        }
    }
}

/// Whether `d` becomes a ring-buffer record. `flows`: an allow may be
/// accounted in the flow table instead (its record would say no more),
/// under the generations read before the decision; `table_id`: the CIDR
/// table that admitted it (0: none, see `FlowKey::table_id`).
#[inline(always)]
fn wants_event(d: &Decision, flows: Option<(Process, &Gens)>, table_id: u32) -> bool {
    if d.verdict != verdict::ALLOW {
        return true;
    }
    match allow_sample() {
        0 => false,
        1 => match flows {
            Some((p, g)) => !account_flow(d, &p, table_id, g),
            None => true,
        },
        n => (unsafe { bpf_get_prandom_u32() }) % n == 0,
    }
}

#[inline(always)]
fn allow_sample() -> u32 {
    match CONFIG.get(0) {
        Some(c) => c.allow_sample,
        None => 0,
    }
}

/// Ring-buffer submit flags: an allow does not wake the reader (it polls
/// `ALLOW_EVENTS`, see `enforcer::events::reader`); anything else wakes it
/// at once.
#[inline(always)]
fn wakeup(v: u8) -> u64 {
    if v == verdict::ALLOW {
        u64::from(BPF_RB_NO_WAKEUP)
    } else {
        u64::from(BPF_RB_FORCE_WAKEUP)
    }
}

/// Room for a record of verdict `v`: allows in `ALLOW_EVENTS`, the rest in
/// `EVENTS`.
#[inline(always)]
fn reserve<T: 'static>(v: u8) -> Option<aya_ebpf::maps::ring_buf::RingBufEntry<T>> {
    let entry = if v == verdict::ALLOW {
        ALLOW_EVENTS.reserve::<T>(0)
    } else {
        EVENTS.reserve::<T>(0)
    };
    if entry.is_none() {
        bump_stat(stat::EVENTS_LOST);
    }
    entry
}

/// The key as six words.
#[inline(always)]
fn words(k: &FlowKey) -> &[u64; 6] {
    // SAFETY: FlowKey is 48 bytes of plain data, 8-byte aligned.
    unsafe { &*(k as *const FlowKey).cast::<[u64; 6]>() }
}

/// The flow key of `d` (`table_id` 0: not cacheable).
#[inline(always)]
fn flow_key(d: &Decision, pid: u32, table_id: u32, gen: u32) -> FlowKey {
    FlowKey {
        cgroup_id: d.cgroup_id,
        slot: d.slot,
        table_id,
        addr: d.addr,
        port: d.port,
        action: d.action,
        protocol: d.protocol,
        family: d.family,
        sock_type: d.sock_type,
        cacheable: u8::from(table_id != 0),
        _pad: 0,
        pid,
        gen,
    }
}

/// One round of the key hash: xor a word, multiply by an odd constant,
/// xor-shift. Each is a bijection of the state.
#[inline(always)]
fn round(h: u64, w: u64) -> u64 {
    let h = (h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^ (h >> 32)
}

/// The hash of the words a decision knows before it resolves its
/// identity: every word but the second (slot and table id), seeded with
/// the secret. It picks the way; keys that differ in one of these words
/// never collide.
#[inline(always)]
fn probe_hash(w: &[u64; 6], secret: u32) -> u64 {
    let mut h = u64::from(secret) ^ 0x243f_6a88_85a3_08d3;
    h = round(h, w[0]);
    h = round(h, w[2]);
    h = round(h, w[3]);
    h = round(h, w[4]);
    round(h, w[5])
}

/// The check word of a way: the probe hash and the second word (slot and
/// table id) hashed on. Never 0 (0 marks a way being filled).
#[inline(always)]
fn check_of(probe: u64, w1: u64) -> u64 {
    round(probe, w1) | 1
}

/// The way of this CPU's cache that a key of hash `h` maps to: side
/// (epoch parity), then context (a cgroup_skb program may run in softirq
/// on top of a process-context program on this CPU, so it has ways of its
/// own), then the hash.
#[inline(always)]
fn way_of(h: u64, epoch: u32, current: bool) -> u32 {
    let base = ((epoch & 1) * 2 + u32::from(!current)) * FLOW_WAYS;
    base + ((h >> 60) as u32 & (FLOW_WAYS - 1))
}

/// Whether way `e` holds the live flow of `epoch` whose words other than
/// the second are `w`'s (`probe`: their hash): those words are equal and
/// the check word is the hash of the way's own words. A program
/// preempted in the middle of a fill can leave a way with the words of
/// two flows; the check word, written last by every fill (and zeroed
/// first), is one complete fill's, so such a way matches no key (short of
/// a 64-bit collision under a secret seed).
#[inline(always)]
unsafe fn holds(e: *const FlowEntry, w: &[u64; 6], probe: u64, epoch: u32) -> bool {
    let c = words(&(*e).key);
    (*e).value.count != 0
        && (*e).value.epoch == epoch
        && c[0] == w[0]
        && c[2] == w[2]
        && c[3] == w[3]
        && c[4] == w[4]
        && c[5] == w[5]
        && core::ptr::read_volatile(&(*e).value.check) == check_of(probe, c[1])
}

/// The decision cache, asked before anything else: `d` (a decision of
/// the current task; its slot, rule and verdict unknown yet) repeats a
/// flow that a CIDR table admitted on this CPU in this epoch *under the
/// current verdict generation* `g.gen`. Then the way counts it (in its
/// `hits`, not in `COUNTERS`) and the caller allows without resolving
/// the identity or looking anything up: under one generation the
/// cgroup's identity, its policy, its taint and so its table are what
/// they were when the way was filled, and a table never changes under
/// its id. The cost of a repeated allow is this probe: the cgroup id and
/// pid, `CACHE_GEN` and the way. Ways are filled only with flow
/// accounting (`allow_sample` 1, the default), and drained whatever it
/// is: a probe needs not read it. A learned address's flow (it expires)
/// is never cacheable.
#[inline(always)]
pub fn repeat_allow(d: &Decision, pid: u32, g: &Gens) -> bool {
    // Table id 1 only marks the key cacheable: the second word is not
    // compared (the way's own is checked by the check word).
    let key = flow_key(d, pid, 1, g.gen);
    let w = words(&key);
    let h = probe_hash(w, g.secret);
    let Some(e) = FLOWS.get_ptr_mut(way_of(h, g.epoch, true)) else {
        return false;
    };
    unsafe {
        if !holds(e, w, h, g.epoch) {
            return false;
        }
        // In the way's own line only: `COUNTERS` would be one more line
        // (~10 ns on a cached datagram); the drainer adds the hits to
        // `ALLOW_HITS`, which the metrics read with `COUNTERS`.
        (*e).value.hits += 1;
    }
    true
}

/// Account an allowed decision in its flow, in this CPU's flow cache: the
/// way the key hashes to counts it in place (the hot path: two array
/// lookups, six compares, one add; no clock is read: a way's `last_ns`
/// is its fill time until it is spilled, when it becomes the eviction
/// time, or drained, when userspace raises it to the epoch's end). A decision of another flow moves
/// the way's flow to `FLOW_SPILL` (userspace merges it) and takes the way.
/// A way of an older epoch is empty (userspace drained it; it never
/// writes the ways). False when the spill ring is full (the caller sends
/// a record; the way keeps its flow): nothing is dropped.
#[inline(always)]
fn account_flow(d: &Decision, who: &Process, table_id: u32, g: &Gens) -> bool {
    let key = flow_key(d, who.pid, table_id, g.gen);
    let epoch = g.epoch;
    let w = words(&key);
    let h = probe_hash(w, g.secret);
    let check = check_of(h, w[1]);
    let Some(e) = FLOWS.get_ptr_mut(way_of(h, epoch, who.current)) else {
        return false;
    };
    unsafe {
        if holds(e, w, h, epoch) && words(&(*e).key)[1] == w[1] && (*e).value.rule_id == d.rule_id {
            (*e).value.count += 1;
            return true;
        }
    }
    // A new flow in the way (the slow path).
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    unsafe {
        // A live flow of this epoch is moved to the spill ring: its room
        // first (a full ring leaves the way as it is, and the caller sends
        // a record).
        let live = (*e).value.count != 0 && (*e).value.epoch == epoch;
        let out = if live {
            match FLOW_SPILL.reserve::<FlowEntry>(0) {
                Some(out) => Some(out),
                None => return false,
            }
        } else {
            None
        };
        // Then the check word: from here until the fill's last write the
        // way answers nothing (`repeat_allow` cannot count a hit in it
        // between the spill's copy and the reset below).
        core::ptr::write_volatile(&mut (*e).value.check, 0);
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
        if let Some(mut out) = out {
            // The evicted flow's last decision was no later than now (a
            // flow of one decision keeps its time).
            if (*e).value.count + (*e).value.hits > 1 {
                (*e).value.last_ns = now;
            }
            out.write(*e);
            out.submit(u64::from(BPF_RB_NO_WAKEUP));
            // Spilled: empty before anything else is written, so a fill
            // interrupted here and resumed later never spills (and
            // counts) this flow twice.
            (*e).value.count = 0;
            (*e).value.hits = 0;
            core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
        }
        // The check word last (zeroed above; see `holds`).
        (*e).key = key;
        (*e).value.count = 1;
        (*e).value.hits = 0;
        (*e).value.first_ns = now;
        (*e).value.last_ns = now;
        (*e).value.epoch = epoch;
        (*e).value.rule_id = d.rule_id;
        (*e).value.comm = if who.current {
            bpf_get_current_comm().unwrap_or([0u8; 16])
        } else {
            *who.comm
        };
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
        core::ptr::write_volatile(&mut (*e).value.check, check);
    }
    true
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
    if !wants_event(d, None, 0) {
        return;
    }
    let Some(mut entry) = reserve::<InspectEvent>(d.verdict) else {
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
    entry.submit(wakeup(d.verdict));
}

#[inline(always)]
pub fn record(d: &Decision) {
    record_admitted(d, 0, (bpf_get_current_pid_tgid() >> 32) as u32, &gens());
}

/// `record` of a decision of the current task (process `pid`) that CIDR
/// table `table_id` admitted (0: none) under the generations `g` (read before the
/// decision's identity and policy): its flow's way can answer the flow's
/// next decisions (`repeat_allow`).
#[inline(always)]
pub fn record_admitted(d: &Decision, table_id: u32, pid: u32, g: &Gens) {
    count(d);
    let current = Process {
        current: true,
        pid,
        comm: &[0; 16],
    };
    if !wants_event(d, Some((current, g)), table_id) {
        return;
    }
    let Some(mut entry) = reserve::<Event>(d.verdict) else {
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let comm = bpf_get_current_comm().unwrap_or([0u8; 16]);
    entry.write(event(d, pid_tgid, comm));
    entry.submit(wakeup(d.verdict));
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
    if !wants_event(
        d,
        Some((
            Process {
                current: false,
                pid,
                comm,
            },
            &gens(),
        )),
        0,
    ) {
        return;
    }
    let Some(mut entry) = reserve::<InspectEvent>(d.verdict) else {
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
    entry.submit(wakeup(d.verdict));
}

/// Record a unix socket decision with the address the agent gave.
#[inline(always)]
pub fn record_unix(d: &Decision, key: &enforcer_common::UnixKey) {
    count(d);
    if !wants_event(d, None, 0) {
        return;
    }
    let Some(mut entry) = reserve::<enforcer_common::UnixEvent>(d.verdict) else {
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
    entry.submit(wakeup(d.verdict));
}
