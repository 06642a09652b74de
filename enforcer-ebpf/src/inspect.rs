//! cgroup_skb/egress: the first bytes of connections to learned addresses.
//!
//! The connect hook gave such a socket pending state (`INSPECT`). Until its
//! first bytes were judged, no segment carrying payload leaves: each is
//! dropped here (the sender's TCP keeps the bytes queued, appends what the
//! agent writes next and sends the lot again, so a ClientHello written in
//! pieces arrives here whole). Segments without payload (SYN, ACK, FIN,
//! RST) pass. A data-carrying SYN (TCP Fast Open) is judged like any segment.
//! The judge (`enforcer_common::first_bytes`) reads the TLS ClientHello's
//! server name or the HTTP/1.x request's Host, and the name must match one
//! of the identity's host rules that admits the port (`NAMES`, one LPM
//! lookup under the identity's current generation: the onTaint one once
//! tainted). Then the socket is passed (one storage lookup per segment from
//! then on; a retransmission from the stream's start is judged again) or
//! refused (its payload is dropped for good). Segments of a judged socket
//! must start at the stream's start while pending (sequence numbers from
//! the SYN seen here) and must not carry urgent data.
//!
//! Sockets without state (every other connection of the cgroup) cost one
//! socket-storage lookup per segment.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{bpf_loop, bpf_sk_fullsock, bpf_sk_storage_get, bpf_skb_load_bytes},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use enforcer_common::{
    action,
    first_bytes::{self, kind, name_key, reason, Body, Loops, Outcome, Stream, BUF, MASK},
    inspect_status, policy_flags, proto, stat, verdict, InspectState, PolicyState,
};

use crate::{
    guard::{self, Guard},
    maps::{Scratch, GENERATION, INSPECT, NAMES, OPAQUE, POLICIES, SCRATCH},
    packet::{load, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP},
    report::{self, Decision, Presented},
    sock_addr::{match_rules, tables},
};

const PASS: i32 = 1;
const DROP: i32 = 0;

#[cgroup_skb(egress)]
pub fn enforcer_inspect(ctx: SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return PASS;
    }
    // Null for a request socket (a listener's SYN-ACK): the guard judges
    // its options, nothing else applies.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if let Guard::Drop = guard::egress(skb, full) {
        return DROP;
    }
    if full.is_null() {
        return PASS;
    }
    // Only TCP sockets get first-bytes state (the connect hook refuses UDP
    // to a learned address; a UDP socket cut by the taint clamp is the
    // guard's): a datagram skips the storage lookup.
    if unsafe { (*full).protocol } != u32::from(IPPROTO_TCP) {
        return PASS;
    }
    // A segment with no payload and no SYN changes no first-bytes state
    // (the judge passes it whatever the state): no storage lookup for the
    // ACKs, FINs and RSTs of every connection.
    if bare_segment(skb) {
        return PASS;
    }
    first_bytes(skb, full)
}

/// A plain TCP segment (no IP options or extension headers) without SYN and
/// without payload, read directly from the packet. False when unsure (the
/// judge then reads it in full).
#[inline(always)]
fn bare_segment(skb: *mut __sk_buff) -> bool {
    let protocol = u16::from_be(unsafe { (*skb).protocol } as u16);
    let (data, end, len) = unsafe {
        (
            (*skb).data as usize,
            (*skb).data_end as usize,
            (*skb).len as usize,
        )
    };
    let (l4, doff, flags) = if protocol == ETH_P_IP {
        if data + 40 > end {
            return false;
        }
        let (vihl, proto, doff, flags) = unsafe {
            (
                *(data as *const u8),
                *((data + 9) as *const u8),
                *((data + 32) as *const u8),
                *((data + 33) as *const u8),
            )
        };
        if vihl != 0x45 || proto != IPPROTO_TCP {
            return false;
        }
        (20usize, doff, flags)
    } else if protocol == ETH_P_IPV6 {
        if data + 60 > end {
            return false;
        }
        let (next, doff, flags) = unsafe {
            (
                *((data + 6) as *const u8),
                *((data + 52) as *const u8),
                *((data + 53) as *const u8),
            )
        };
        if next != IPPROTO_TCP {
            return false;
        }
        (40usize, doff, flags)
    } else {
        return false;
    };
    let headers = l4 + ((doff >> 4) as usize) * 4;
    flags & TCP_SYN == 0 && len == headers
}

/// The judge of a socket with first-bytes state. A subprogram of its own,
/// like the guard: the entry's frame stays small, and the verifier's limit
/// on the stack of a call chain (512 bytes) applies to each separately.
#[inline(never)]
fn first_bytes(skb: *mut __sk_buff, full: *mut aya_ebpf::bindings::bpf_sock) -> i32 {
    let map = core::ptr::from_ref(&INSPECT).cast_mut().cast::<c_void>();
    let st = unsafe { bpf_sk_storage_get(map, full.cast(), core::ptr::null_mut(), 0) }
        .cast::<InspectState>();
    if st.is_null() {
        return PASS;
    }
    let st = unsafe { &mut *st };
    let Some(seg) = segment(skb) else {
        // Not a TCP segment we can read: nothing of a judged socket leaves
        // unread (IPv6 extension headers, fragments).
        return DROP;
    };
    if seg.flags & TCP_SYN != 0 && seg.flags & TCP_ACK == 0 {
        // The connection's first sequence number: payload starts at isn + 1.
        st.isn = seg.seq;
        st.seq_known = 1;
    }
    if seg.payload_len == 0 {
        return PASS;
    }
    // Stream offset of the payload's first byte (a SYN takes one number).
    let start = seg
        .seq
        .wrapping_add(u32::from(seg.flags & TCP_SYN != 0))
        .wrapping_sub(st.isn.wrapping_add(1));
    match st.status {
        inspect_status::PASSED => {
            // A retransmission from the stream's start is judged again: the
            // bytes TCP sends again may not be the ones judged (pages shared
            // with the agent through sendfile, splice or MSG_ZEROCOPY).
            if start != 0 || st.seq_known == 0 {
                return PASS;
            }
        }
        inspect_status::PENDING => {
            if st.seq_known == 0 || start != 0 {
                // Nothing passed yet, so TCP sends from the start; anything
                // else (a queue between TCP and here) is held.
                report::bump_stat(stat::INSPECT_HELD);
                return DROP;
            }
        }
        _ => {
            report::bump_stat(stat::INSPECT_DROPPED);
            return DROP;
        }
    }
    let Some(gen) = GENERATION.get_ptr_mut(0) else {
        return DROP;
    };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return DROP;
    };
    if seg.flags & TCP_URG != 0 {
        // Urgent data: a receiver without SO_OOBINLINE takes one byte out of
        // the stream, so it would read other first bytes than the judge.
        return refuse_urgent(st, &seg, unsafe { &*scratch });
    }
    // The scratch space is per CPU. Another run on this CPU (a softirq
    // interrupting this one, or a task preempting it) bumps the generation
    // at its start and end: if it changed while this run used the scratch
    // space, the result is not trusted and the segment is held (TCP sends
    // it again).
    let mine = unsafe { *gen }.wrapping_add(1);
    unsafe { *gen = mine };
    let verdict = judge(skb, st, &seg, unsafe { &mut *scratch }, gen, mine);
    unsafe { *gen = (*gen).wrapping_add(1) };
    verdict
}

const TCP_SYN: u8 = 0x02;
const TCP_URG: u8 = 0x20;
const TCP_ACK: u8 = 0x10;

/// Urgent data on a connection being judged: refused.
#[inline(always)]
fn refuse_urgent(st: &mut InspectState, seg: &Segment, scratch: &Scratch) -> i32 {
    st.status = inspect_status::REFUSED;
    report::record_inspect(
        &Decision {
            cgroup_id: st.cgroup_id,
            slot: st.slot,
            rule_id: st.rule_id,
            action: action::INSPECT,
            verdict: verdict::DENY,
            addr: seg.dst,
            port: seg.dst_port,
            protocol: IPPROTO_TCP,
            family: seg.family,
            sock_type: 1,
            reason: reason::MALFORMED,
        },
        &Presented {
            kind: kind::UNKNOWN,
            src: seg.src,
            src_port: seg.src_port,
            buf: &scratch.buf,
            off: 0,
            len: 0,
        },
        st.pid,
        st.comm,
    );
    DROP
}

/// Where a segment's payload starts and its addresses.
struct Segment {
    payload_off: usize,
    payload_len: usize,
    family: u8,
    src: [u8; 16],
    dst: [u8; 16],
    src_port: u16,
    dst_port: u16,
    seq: u32,
    /// TCP flags byte.
    flags: u8,
}

#[inline(always)]
fn segment(skb: *mut __sk_buff) -> Option<Segment> {
    let len = unsafe { (*skb).len } as usize;
    let protocol = u16::from_be(unsafe { (*skb).protocol } as u16);
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    let (l4, family) = if protocol == ETH_P_IP {
        let h: [u8; 20] = load(skb, 0)?;
        let ihl = ((h[0] & 0x0f) as usize) * 4;
        // TCP, not a fragment (MF or an offset).
        if h[9] != IPPROTO_TCP || ihl < 20 || (h[6] & 0x3f) != 0 || h[7] != 0 {
            return None;
        }
        src[10] = 0xff;
        src[11] = 0xff;
        dst[10] = 0xff;
        dst[11] = 0xff;
        src[12..16].copy_from_slice(&h[12..16]);
        dst[12..16].copy_from_slice(&h[16..20]);
        (ihl, 2u8)
    } else if protocol == ETH_P_IPV6 {
        let h: [u8; 40] = load(skb, 0)?;
        // TCP right after the fixed header (no extension headers).
        if h[6] != IPPROTO_TCP {
            return None;
        }
        src.copy_from_slice(&h[8..24]);
        dst.copy_from_slice(&h[24..40]);
        (40usize, 10u8)
    } else {
        return None;
    };
    let t: [u8; 20] = load(skb, l4)?;
    let doff = ((t[12] >> 4) as usize) * 4;
    let payload_off = l4 + doff;
    if doff < 20 || payload_off > len {
        return None;
    }
    Some(Segment {
        payload_off,
        payload_len: len - payload_off,
        family,
        src,
        dst,
        src_port: u16::from_be_bytes([t[0], t[1]]),
        dst_port: u16::from_be_bytes([t[2], t[3]]),
        seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        flags: t[13],
    })
}

/// Long loops through `bpf_loop` (Linux 5.17): the verifier checks the
/// step once.
struct BpfLoops;

impl Loops for BpfLoops {
    // A subprogram of its own per body type: one `bpf_loop` call site per
    // callback (LLVM would otherwise be free to merge call sites of
    // different callbacks, which the kernel's bpf_loop inlining keys on).
    #[inline(never)]
    fn repeat<B: Body>(n: u32, body: &mut B) {
        let f: extern "C" fn(u32, *mut c_void) -> i64 = step::<B>;
        unsafe { bpf_loop(n, f as *mut c_void, core::ptr::from_mut(body).cast(), 0) };
    }

    #[inline(always)]
    fn num(v: usize) -> usize {
        v.wrapping_add(opaque_zero() as usize)
    }

    #[inline(always)]
    fn flag(v: bool) -> bool {
        v ^ (opaque_zero() != 0)
    }
}

/// 0, read from a map the verifier cannot see into (`OPAQUE` is never written).
#[inline(always)]
fn opaque_zero() -> u64 {
    OPAQUE.get(0).copied().unwrap_or(0)
}

extern "C" fn step<B: Body>(i: u32, ctx: *mut c_void) -> i64 {
    let body = unsafe { &mut *ctx.cast::<B>() };
    if body.step(i as usize) {
        0
    } else {
        1
    }
}

/// The segment's payload as the stream's first bytes (nothing passed yet,
/// so the payload starts at stream offset 0).
struct Payload {
    skb: *mut __sk_buff,
    off: usize,
    len: usize,
}

impl Stream for Payload {
    #[inline(always)]
    fn len(&self) -> usize {
        self.len
    }

    #[inline(always)]
    fn copy(&self, off: usize, buf: &mut [u8; 2 * BUF], at: usize, len: usize) -> bool {
        let at = at & MASK;
        let len = (len.wrapping_sub(1) & MASK) + 1;
        let dst = unsafe { buf.as_mut_ptr().add(at) };
        unsafe {
            bpf_skb_load_bytes(
                self.skb.cast(),
                (self.off + off) as u32,
                dst.cast(),
                len as u32,
            ) == 0
        }
    }

    #[inline(always)]
    fn copy_small<const N: usize>(&self, off: usize, out: &mut [u8; N]) -> bool {
        unsafe {
            bpf_skb_load_bytes(
                self.skb.cast(),
                (self.off + off) as u32,
                out.as_mut_ptr().cast(),
                N as u32,
            ) == 0
        }
    }
}

#[inline(always)]
fn judge(
    skb: *mut __sk_buff,
    st: &mut InspectState,
    seg: &Segment,
    scratch: &mut Scratch,
    gen: *mut u64,
    mine: u64,
) -> i32 {
    let again = st.status == inspect_status::PASSED;
    let stream = Payload {
        skb,
        off: seg.payload_off,
        len: seg.payload_len,
    };
    let outcome = first_bytes::judge::<_, BpfLoops>(&stream, &mut scratch.buf);
    let (k, why, off, len, rule_id) = match outcome {
        Outcome::NeedMore => {
            report::bump_stat(stat::INSPECT_HELD);
            return DROP;
        }
        Outcome::Refuse {
            kind,
            reason,
            off,
            len,
        } => (kind, reason, off, len, st.rule_id),
        Outcome::Name { kind, off, len } => match allowed(st, scratch, off, len) {
            Ok(rule_id) => (kind, reason::NONE, off, len, rule_id),
            Err(r) => (kind, r, off, len, st.rule_id),
        },
    };
    if unsafe { *gen } != mine {
        // Another run used the scratch space meanwhile: hold, judge again.
        report::bump_stat(stat::INSPECT_NESTED);
        return DROP;
    }
    if again && why == reason::NONE {
        // A retransmission from the start that still names an allowed host.
        return PASS;
    }
    let policy: Option<PolicyState> = POLICIES
        .get(st.slot)
        .copied()
        .filter(|p| p.flags & policy_flags::PRESENT != 0);
    let audit = matches!(policy, Some(p) if p.flags & policy_flags::AUDIT != 0);
    let (v, ret) = if why == reason::NONE {
        st.status = inspect_status::PASSED;
        (verdict::ALLOW, PASS)
    } else if audit {
        st.status = inspect_status::PASSED;
        (verdict::AUDIT, PASS)
    } else {
        st.status = inspect_status::REFUSED;
        (verdict::DENY, DROP)
    };
    report::record_inspect(
        &Decision {
            cgroup_id: st.cgroup_id,
            slot: st.slot,
            rule_id,
            action: action::INSPECT,
            verdict: v,
            addr: seg.dst,
            port: seg.dst_port,
            protocol: IPPROTO_TCP,
            family: seg.family,
            sock_type: 1,
            reason: why,
        },
        &Presented {
            kind: k,
            src: seg.src,
            src_port: seg.src_port,
            buf: &scratch.buf,
            off,
            len,
        },
        st.pid,
        st.comm,
    );
    ret
}

/// Does the presented name match a host rule of the identity (its current
/// generation) that admits the port? The rule id, or the refusal reason.
#[inline(always)]
fn allowed(st: &InspectState, scratch: &mut Scratch, off: usize, len: usize) -> Result<u32, u8> {
    // The name plus the slack behind the key: 256 bytes of the map value.
    let out = unsafe {
        &mut *scratch
            .key
            .data
            .name
            .as_mut_ptr()
            .cast::<[u8; first_bytes::KEY_BUF]>()
    };
    let n = name_key::<BpfLoops>(&scratch.buf, off, len, out)?;
    let Some(p) = POLICIES
        .get(st.slot)
        .copied()
        .filter(|p| p.flags & policy_flags::PRESENT != 0)
    else {
        return Err(reason::NO_STATE);
    };
    let (table_id, _) = tables(&p, st.slot);
    scratch.key.data.table_id_be = table_id.to_be_bytes();
    scratch.key.prefix_len = 32 + 8 * n as u32;
    NAMES
        .get(&scratch.key)
        .and_then(|set| match_rules(set, st.port, proto::TCP))
        .ok_or(reason::NAME_MISMATCH)
}
