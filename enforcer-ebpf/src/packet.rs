//! IP and transport headers of a cgroup_skb packet (the data starts at the
//! network header, in both directions).
use aya_ebpf::{bindings::__sk_buff, helpers::bpf_skb_load_bytes};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_DSTOPTS: u8 = 60;

/// `N` bytes of the packet at `off`. The buffer is not zeroed first (the
/// helper writes it, or fails): a zeroing loop per call would cost the
/// verifier a walk of N stores at every call site.
#[inline(always)]
pub fn load<const N: usize>(skb: *mut __sk_buff, off: usize) -> Option<[u8; N]> {
    let mut out = core::mem::MaybeUninit::<[u8; N]>::uninit();
    let r =
        unsafe { bpf_skb_load_bytes(skb.cast(), off as u32, out.as_mut_ptr().cast(), N as u32) };
    if r == 0 {
        // SAFETY: the helper wrote all N bytes.
        Some(unsafe { out.assume_init() })
    } else {
        None
    }
}

/// The IP header's facts. Addresses are 16 bytes; IPv4 is v4-mapped.
/// (Plain fields written on every path, no `Option`: LLVM may move an
/// `Option`'s undefined payload, which the verifier rejects.)
#[derive(Clone, Copy)]
pub struct Ip {
    /// An IPv4 or IPv6 packet whose header could be read.
    pub ok: bool,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// The transport protocol (IPv6: after the extension headers walked).
    pub proto: u8,
    /// Offset of the transport header (IPv6: after at most three extension
    /// headers of the `options` kinds).
    pub l4: usize,
    /// IPv4 options, or an IPv6 hop-by-hop, routing or destination options
    /// header: a first hop or handling the socket's hooks did not judge.
    pub options: bool,
    /// A fragment other than the first (no transport header).
    pub later_fragment: bool,
}

const NOT_IP: Ip = Ip {
    ok: false,
    family: 0,
    src: [0; 16],
    dst: [0; 16],
    proto: 0,
    l4: 0,
    options: false,
    later_fragment: false,
};

/// IPv4 options or an IPv6 extension header of the refused kinds, from one
/// byte read directly from the packet (no helper call; an unreadable header
/// counts as options: the full parse decides).
#[inline(always)]
pub fn has_options(skb: *mut __sk_buff) -> bool {
    let protocol = u16::from_be(unsafe { (*skb).protocol } as u16);
    let (data, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    // Bounds over the whole fixed header (a `+ 1` bound would be folded
    // by LLVM into `data >= end`, which the verifier cannot use).
    if protocol == ETH_P_IP {
        if data + 20 > end {
            return true;
        }
        unsafe { *(data as *const u8) != 0x45 }
    } else if protocol == ETH_P_IPV6 {
        if data + 40 > end {
            return true;
        }
        is_ext(unsafe { *((data + 6) as *const u8) })
    } else {
        false
    }
}

/// The IP header (`ok` false for another protocol or an unreadable packet).
#[inline(always)]
pub fn ip(skb: *mut __sk_buff) -> Ip {
    let protocol = u16::from_be(unsafe { (*skb).protocol } as u16);
    if protocol == ETH_P_IP {
        let Some(h) = load::<20>(skb, 0) else {
            return NOT_IP;
        };
        let ihl = ((h[0] & 0x0f) as usize) * 4;
        let src = [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, h[12], h[13], h[14], h[15],
        ];
        let dst = [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, h[16], h[17], h[18], h[19],
        ];
        Ip {
            ok: true,
            family: 2,
            src,
            dst,
            proto: h[9],
            l4: ihl,
            options: ihl != 20,
            later_fragment: (h[6] & 0x1f) != 0 || h[7] != 0,
        }
    } else if protocol == ETH_P_IPV6 {
        let Some(h) = load::<40>(skb, 0) else {
            return NOT_IP;
        };
        let Some(src) = h[8..24].try_into().ok() else {
            return NOT_IP;
        };
        let Some(dst) = h[24..40].try_into().ok() else {
            return NOT_IP;
        };
        // Up to three extension headers of the kinds this guard refuses
        // (hop-by-hop, routing, destination options), to find the ports.
        let mut next = h[6];
        let mut l4 = 40usize;
        let options = is_ext(next);
        let mut i = 0;
        while i < 3 && is_ext(next) {
            let Some(e) = load::<2>(skb, l4) else {
                break;
            };
            next = e[0];
            l4 += (e[1] as usize + 1) * 8;
            i += 1;
        }
        Ip {
            ok: true,
            family: 10,
            src,
            dst,
            proto: next,
            l4,
            options,
            later_fragment: false,
        }
    } else {
        NOT_IP
    }
}

/// The ports of a TCP or UDP packet (`ok` false for anything else).
#[derive(Clone, Copy)]
pub struct Ports {
    pub ok: bool,
    pub src: u16,
    pub dst: u16,
}

#[inline(always)]
pub fn ports(skb: *mut __sk_buff, ip: &Ip) -> Ports {
    let none = Ports {
        ok: false,
        src: 0,
        dst: 0,
    };
    if !ip.ok || ip.later_fragment || (ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP) {
        return none;
    }
    let Some(p) = load::<4>(skb, ip.l4) else {
        return none;
    };
    Ports {
        ok: true,
        src: u16::from_be_bytes([p[0], p[1]]),
        dst: u16::from_be_bytes([p[2], p[3]]),
    }
}

#[inline(always)]
fn is_ext(next: u8) -> bool {
    next == IPV6_HOPOPTS || next == IPV6_ROUTING || next == IPV6_DSTOPTS
}

#[inline(always)]
pub fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[0] == 0
        && a[1] == 0
        && a[2] == 0
        && a[3] == 0
        && a[4] == 0
        && a[5] == 0
        && a[6] == 0
        && a[7] == 0
        && a[8] == 0
        && a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
}

/// 127.0.0.1 or ::1: the addresses the identity's DNS proxy listens on
/// (`enforcer::dns::proxy`); another loopback address on the proxy's port
/// is someone else.
#[inline(always)]
pub fn is_proxy_addr(a: &[u8; 16]) -> bool {
    if is_v4_mapped(a) {
        return a[12] == 127 && a[13] == 0 && a[14] == 0 && a[15] == 1;
    }
    *a == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
}
