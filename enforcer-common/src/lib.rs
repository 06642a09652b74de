//! `#[repr(C)]` types shared by the enforcer eBPF programs (`enforcer-ebpf`)
//! and the userspace controller (`enforcer`).
//!
//! Kernel tables (all maps are created by the eBPF object, names below):
//!
//! ```text
//! IDENTITIES  HashMap   cgroup_id (u64)        -> IdentityBinding { slot }
//! POLICIES    Array     slot (u32)             -> PolicyState { table_id, flags, .. }
//! EGRESS_V4   LpmTrie   {table_id BE, ipv4}    -> RuleSet   (prefix_len = 32 + cidr len)
//! EGRESS_V6   LpmTrie   {table_id BE, ipv6}    -> RuleSet   (prefix_len = 32 + cidr len)
//! COUNTERS    PerCpuArray slot*ACTIONS*VERDICTS+action*VERDICTS+verdict -> u64
//! STATS       PerCpuArray STAT_* -> u64
//! CONFIG      Array     0 -> GlobalConfig
//! EVENTS      RingBuf   Event records
//! DNS_ORIG    LruHash   socket cookie          -> OrigDst (resolver the agent asked)
//! LEARNED_V4  HashMap   {slot, ipv4}           -> Learned (address a DNS answer allowed)
//! LEARNED_V6  HashMap   {slot, ipv6}           -> Learned
//! ```
//!
//! DNS: a connect/sendmsg to port 53 (TCP or UDP, any address) of an identity
//! whose `PolicyState.dns_port` is set is rewritten to the enforcer's DNS
//! proxy for that identity (127.0.0.1 or ::1, that port); the original
//! destination is kept under the socket cookie and restored by the
//! recvmsg/getpeername hooks. Addresses that the proxy let through are
//! installed in `LEARNED_*` before the answer is released, with the host
//! rule's ports and protocols and an expiry (CLOCK_MONOTONIC ns).
//!
//! A cgroup is bound to an identity *slot*; the slot points at a *table id*
//! (a generation of that identity's compiled policy). A reload writes the new
//! generation's LPM entries under a fresh table id, then flips
//! `POLICIES[slot].table_id` in one map update (atomic for every cgroup of the
//! identity), then deletes the old generation's entries.
#![no_std]

/// Maximum port/protocol entries that one LPM prefix can carry. The compiler
/// folds every rule whose CIDR covers a prefix into that prefix's entry, so
/// this bounds overlapping rules at one prefix, not rules per policy.
pub const MAX_PORT_RULES: usize = 16;

/// Number of identity slots (size of `POLICIES`, bound of `COUNTERS`).
pub const MAX_SLOTS: u32 = 1024;
/// Slot 0 is reserved for "no identity found" (fail-closed denials).
pub const SLOT_UNKNOWN: u32 = 0;

/// Maximum cgroup nesting depth walked to find the nearest bound ancestor.
pub const MAX_CGROUP_DEPTH: i32 = 32;

pub mod map_names {
    pub const IDENTITIES: &str = "IDENTITIES";
    pub const POLICIES: &str = "POLICIES";
    pub const EGRESS_V4: &str = "EGRESS_V4";
    pub const EGRESS_V6: &str = "EGRESS_V6";
    pub const COUNTERS: &str = "COUNTERS";
    pub const STATS: &str = "STATS";
    pub const CONFIG: &str = "CONFIG";
    pub const EVENTS: &str = "EVENTS";
    pub const DNS_ORIG: &str = "DNS_ORIG";
    pub const LEARNED_V4: &str = "LEARNED_V4";
    pub const LEARNED_V6: &str = "LEARNED_V6";
    pub const ALL: [&str; 11] = [
        IDENTITIES, POLICIES, EGRESS_V4, EGRESS_V6, COUNTERS, STATS, CONFIG, EVENTS, DNS_ORIG,
        LEARNED_V4, LEARNED_V6,
    ];
}

pub mod prog_names {
    pub const CONNECT4: &str = "enforcer_connect4";
    pub const CONNECT6: &str = "enforcer_connect6";
    pub const SENDMSG4: &str = "enforcer_sendmsg4";
    pub const SENDMSG6: &str = "enforcer_sendmsg6";
    pub const SOCK_CREATE: &str = "enforcer_sock_create";
    pub const RECVMSG4: &str = "enforcer_recvmsg4";
    pub const RECVMSG6: &str = "enforcer_recvmsg6";
    pub const GETPEERNAME4: &str = "enforcer_getpeername4";
    pub const GETPEERNAME6: &str = "enforcer_getpeername6";
    /// Not in `ALL`: loaded on its own, only to probe for BPF LSM.
    pub const LSM_PROBE: &str = "enforcer_lsm_probe";
    pub const ALL: [&str; 9] = [
        CONNECT4,
        CONNECT6,
        SENDMSG4,
        SENDMSG6,
        SOCK_CREATE,
        RECVMSG4,
        RECVMSG6,
        GETPEERNAME4,
        GETPEERNAME6,
    ];
}

/// Max entries of the maps (userspace checks policies against these).
pub const MAX_IDENTITIES: u32 = 16384;
pub const MAX_EGRESS_V4: u32 = 1 << 20;
pub const MAX_EGRESS_V6: u32 = 1 << 18;
pub const EVENTS_BYTES: u32 = 1 << 20;
pub const MAX_DNS_ORIG: u32 = 65536;
pub const MAX_LEARNED_V4: u32 = 1 << 18;
pub const MAX_LEARNED_V6: u32 = 1 << 16;
/// The port DNS is steered from.
pub const DNS_PORT: u16 = 53;

/// Actions (what the agent tried).
pub mod action {
    pub const CONNECT: u8 = 0;
    pub const SENDMSG: u8 = 1;
    pub const SOCK_CREATE: u8 = 2;
    pub const DNS: u8 = 3;
    pub const FILE_OPEN: u8 = 4;
    pub const COUNT: u32 = 8;
}

/// Verdicts.
pub mod verdict {
    pub const ALLOW: u8 = 0;
    pub const DENY: u8 = 1;
    pub const AUDIT: u8 = 2;
    pub const COUNT: u32 = 4;
}

/// Rule ids with a fixed meaning. Policy rules are numbered from 1
/// (`egress[i]` has id `i + 1`).
pub mod rule {
    /// Nothing in the policy matched: default deny.
    pub const DEFAULT_DENY: u32 = 0;
    /// The cgroup is attached but no identity / policy is bound (fail closed).
    pub const NO_POLICY: u32 = 0xffff_ffff;
    /// Raw, packet or ICMP socket creation.
    pub const RAW_SOCKET: u32 = 0xffff_fffe;
    /// Socket family outside the allowed set (unix, inet, inet6, netlink).
    pub const SOCKET_FAMILY: u32 = 0xffff_fffd;
    /// Plain socket creation of an allowed family.
    pub const SOCKET_OK: u32 = 0xffff_fffc;
    /// An inet socket of another protocol than TCP or UDP (SCTP, MPTCP,
    /// UDP-Lite, ...): their multi-address connect paths are not all covered
    /// by the connect/sendmsg hooks, so they cannot be created at all.
    pub const SOCKET_PROTOCOL: u32 = 0xffff_fffb;
}

/// `PolicyState.flags` bits.
pub mod policy_flags {
    /// The slot holds a policy (otherwise: fail closed).
    pub const PRESENT: u32 = 1 << 0;
    /// mode: audit (would-be denials are recorded as `audit` and allowed).
    pub const AUDIT: u32 = 1 << 1;
}

/// Protocol mask bits in `PortRule.proto_mask`.
pub mod proto {
    pub const TCP: u8 = 1 << 0;
    pub const UDP: u8 = 1 << 1;
    /// Any other IP protocol (SCTP, UDP-lite, ...). Only `protocol: any` matches it.
    pub const OTHER: u8 = 1 << 2;
    pub const ANY: u8 = TCP | UDP | OTHER;
    /// IANA protocol numbers as seen in `bpf_sock_addr.protocol`.
    pub const IPPROTO_TCP: u32 = 6;
    pub const IPPROTO_UDP: u32 = 17;
}

/// STATS indexes.
pub mod stat {
    /// Events that could not be written to the ring buffer (it was full).
    pub const EVENTS_LOST: u32 = 0;
    /// Decisions made for a cgroup with no bound identity (fail closed).
    pub const NO_IDENTITY: u32 = 1;
    pub const COUNT: u32 = 8;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityBinding {
    pub slot: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    /// Generation of the identity's compiled tables (first 32 bits of LPM keys).
    pub table_id: u32,
    /// `policy_flags::*`.
    pub flags: u32,
    /// Port of this identity's DNS proxy on 127.0.0.1 and ::1 (0: no steering).
    pub dns_port: u16,
    pub _pad: [u8; 6],
}

/// Where a steered DNS socket really sent to (restored on recvmsg/getpeername).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// IPv4 stored v4-mapped.
    pub addr: [u8; 16],
    /// Original port, host byte order (53).
    pub port: u16,
    /// The proxy port the socket was rewritten to, host byte order.
    pub proxy_port: u16,
    pub _pad: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LearnedKey4 {
    pub slot: u32,
    pub addr: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LearnedKey6 {
    pub slot: u32,
    pub addr: [u8; 16],
}

/// An address a DNS answer allowed, until `expires_ns` (CLOCK_MONOTONIC).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Learned {
    pub expires_ns: u64,
    pub set: RuleSet,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRule {
    /// Inclusive port range, host byte order. 0..=65535 means all ports.
    pub port_lo: u16,
    pub port_hi: u16,
    /// `proto::*` mask.
    pub proto_mask: u8,
    pub _pad: [u8; 3],
    /// Rule id reported in events (`egress[i]` -> i + 1).
    pub rule_id: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleSet {
    pub count: u32,
    pub _pad: u32,
    pub rules: [PortRule; MAX_PORT_RULES],
}

impl Default for RuleSet {
    fn default() -> Self {
        Self {
            count: 0,
            _pad: 0,
            rules: [PortRule::default(); MAX_PORT_RULES],
        }
    }
}

/// LPM key data for IPv4: table id (big endian) then the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V4Key {
    pub table_id_be: [u8; 4],
    pub addr: [u8; 4],
}

/// LPM key data for IPv6: table id (big endian) then the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V6Key {
    pub table_id_be: [u8; 4],
    pub addr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalConfig {
    /// 0: allowed decisions are only counted; 1: every allow is sent as an
    /// event; N: about one allow in N is sent (denies and audits always are).
    pub allow_sample: u32,
    pub _pad: u32,
}

/// One decision, kernel -> userspace through the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub ts_ns: u64,
    pub cgroup_id: u64,
    /// Thread group id (the userspace "pid").
    pub pid: u32,
    pub tid: u32,
    pub slot: u32,
    pub rule_id: u32,
    /// Destination address. IPv4 is stored v4-mapped (`::ffff:a.b.c.d`).
    pub addr: [u8; 16],
    /// Destination port, host byte order.
    pub port: u16,
    pub action: u8,
    pub verdict: u8,
    /// IANA protocol number (6 tcp, 17 udp, 1 icmp, 255 raw, ...).
    pub protocol: u8,
    /// AF_INET (2) / AF_INET6 (10) / socket family for SOCK_CREATE.
    pub family: u8,
    /// Socket type (SOCK_STREAM 1, SOCK_DGRAM 2, SOCK_RAW 3, ...).
    pub sock_type: u8,
    pub _pad: u8,
    pub comm: [u8; 16],
}

/// Index into `COUNTERS` for (slot, action, verdict).
#[inline(always)]
pub const fn counter_index(slot: u32, action: u8, verdict: u8) -> u32 {
    slot * action::COUNT * verdict::COUNT + (action as u32) * verdict::COUNT + verdict as u32
}

pub const COUNTERS_LEN: u32 = MAX_SLOTS * action::COUNT * verdict::COUNT;

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are #[repr(C)] plain-old-data with explicit padding.
    unsafe impl aya::Pod for IdentityBinding {}
    unsafe impl aya::Pod for PolicyState {}
    unsafe impl aya::Pod for PortRule {}
    unsafe impl aya::Pod for RuleSet {}
    unsafe impl aya::Pod for V4Key {}
    unsafe impl aya::Pod for V6Key {}
    unsafe impl aya::Pod for GlobalConfig {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for LearnedKey4 {}
    unsafe impl aya::Pod for LearnedKey6 {}
    unsafe impl aya::Pod for Learned {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<IdentityBinding>(), 8);
        assert_eq!(size_of::<PolicyState>(), 16);
        assert_eq!(size_of::<OrigDst>(), 24);
        assert_eq!(size_of::<LearnedKey4>(), 8);
        assert_eq!(size_of::<LearnedKey6>(), 20);
        assert_eq!(size_of::<Learned>(), 8 + size_of::<RuleSet>());
        assert_eq!(size_of::<PortRule>(), 12);
        assert_eq!(size_of::<RuleSet>(), 8 + 12 * MAX_PORT_RULES);
        assert_eq!(size_of::<V4Key>(), 8);
        assert_eq!(size_of::<V6Key>(), 20);
        assert_eq!(size_of::<Event>(), 8 + 8 + 4 * 4 + 16 + 2 + 4 + 2 + 16);
    }

    #[test]
    fn counter_index_is_dense_and_in_bounds() {
        assert_eq!(counter_index(0, 0, 0), 0);
        assert_eq!(counter_index(0, 0, 1), 1);
        assert_eq!(counter_index(0, 1, 0), verdict::COUNT);
        assert_eq!(counter_index(1, 0, 0), action::COUNT * verdict::COUNT);
        assert!(counter_index(MAX_SLOTS - 1, 7, 3) < COUNTERS_LEN);
    }
}
