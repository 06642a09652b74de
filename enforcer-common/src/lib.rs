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
//! DNS_ORIG    SkStorage socket                 -> OrigDst (resolver the agent asked)
//! LEARNED_V4  HashMap   {slot, ipv4}           -> Learned (address a DNS answer allowed)
//! LEARNED_V6  HashMap   {slot, ipv6}           -> Learned
//! FILE_RULES  HashMap   {ino, dev, table_id}   -> FileRuleValue (file policy, BPF LSM)
//! NAMES       LpmTrie   {table_id BE, reversed name} -> RuleSet (host rules, for first-bytes checks)
//! INSPECT     SkStorage socket                 -> InspectState (connections whose first bytes are judged)
//! SCRATCH     PerCpuArray 0                    -> Scratch (ClientHello / request head gathered)
//! GENERATION  PerCpuArray 0                    -> u64 (bumped at each run's start and end: guards SCRATCH)
//! OPAQUE      Array     0                      -> u64 (always 0; an opaque zero for the verifier)
//! REASONS     PerCpuArray reason_index(slot, reason, audit) -> u64 (refused first bytes)
//! FILE_BLOOM  Array     word -> u64 (Bloom filter of every FILE_RULES inode: `bloom_bit`)
//! TAINTED     Array     slot (u32)             -> u64 (0: clean; else ktime of the taint);
//!                                                 [0] (no slot): nonzero once any slot was
//!                                                 tainted (the egress program's clamp gate)
//! RESOLVED    HashMap   {ino, dev, 0}          -> u32 (inodes the resolver thread's open showed)
//! UNIX_RULES  HashMap   {table_id, kind, len, name[108]} -> UnixRule (spec.local; table 0: resolver IPC)
//! ```
//!
//! Unix sockets (`cgroup/connect_unix`, `cgroup/sendmsg_unix`, Linux >= 6.7):
//! the address the agent gave (`sun_path` as a string: a path up to its
//! first NUL, or an abstract name) is looked up exactly, first under table
//! id 0 (the resolver IPC sockets: always refused, rule `UNIX_RESOLVER`),
//! then under the identity's current generation (`spec.local`); anything
//! else is refused (`DEFAULT_DENY`), or recorded in audit mode.
//!
//! Files (BPF LSM `file_open`, `inode_link`, `inode_rename`): a file is
//! matched by the identity of its inode (`i_ino`, `i_sb->s_dev`) and of its
//! parent dentries' inodes, up to `MAX_FILE_DEPTH` levels, against
//! `FILE_RULES` under the identity's current generation (`table_id`). The
//! nearest match wins. Reading a `taint` file sets `TAINTED[slot]`; from then
//! on the sock_addr hooks judge the identity by its onTaint generation
//! (`PolicyState.taint_table_id`) and by the addresses learned for its
//! onTaint host rules (learned keys with `TAINT_SLOT_BIT`).
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

pub mod first_bytes;

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
    pub const FILE_RULES: &str = "FILE_RULES";
    pub const FILE_BLOOM: &str = "FILE_BLOOM";
    pub const TAINTED: &str = "TAINTED";
    pub const RESOLVED: &str = "RESOLVED";
    pub const NAMES: &str = "NAMES";
    pub const INSPECT: &str = "INSPECT";
    pub const SCRATCH: &str = "SCRATCH";
    pub const GENERATION: &str = "GENERATION";
    pub const OPAQUE: &str = "OPAQUE";
    pub const REASONS: &str = "REASONS";
    pub const UNIX_RULES: &str = "UNIX_RULES";
    pub const UNIX_INODES: &str = "UNIX_INODES";
    /// Container cgroups whose root the daemon resolved the file rules in
    /// (cgroup id -> identity slot; see `policy_flags::FILES_PER_ROOT`).
    pub const FILE_READY: &str = "FILE_READY";
    /// What the per-CPU caches are validated by, one array in one cache
    /// line (see [`cache_gen`]): the flow epoch, the generation of every
    /// input of a verdict (bindings, policies, taints) and the flow cache's
    /// secret. (Replaces `IDENTITY_GEN` and `FLOW_SIDE`.)
    pub const CACHE_GEN: &str = "CACHE_GEN";
    /// Per CPU: the last cgroup -> identity resolution (not pinned: each
    /// program set keeps its own; `CACHE_GEN`, pinned, validates it).
    pub const IDENTITY_CACHE: &str = "IDENTITY_CACHE";
    /// Allowed flows: per CPU, two sides of cache ways; the programs count
    /// in the side of the epoch (`CACHE_GEN[EPOCH] & 1`), userspace
    /// advances the epoch and drains the other side. A flow evicted from a
    /// way goes to `FLOW_SPILL`.
    /// (Named `FLOW_WAYS` since a way answers by the verdict generation,
    /// not the table id: a pin of the older `FLOW_CACHE` is not reused.)
    pub const FLOWS: &str = "FLOW_WAYS";
    pub const FLOW_SPILL: &str = "FLOW_SPILL";
    /// Allow records that are not flows (first bytes, unix, sampled, and
    /// flows when the spill ring is full): never wakes the reader and never
    /// takes room from a denial in `EVENTS`.
    pub const ALLOW_EVENTS: &str = "ALLOW_EVENTS";
    /// Allowed decisions the flow cache answered (`FlowValue::hits`),
    /// which the programs count in the way only: the flow drainer adds
    /// them here (indexed like `COUNTERS`, verdict allow; one writer, so a
    /// plain array), and the metrics read `COUNTERS` plus this.
    pub const ALLOW_HITS: &str = "ALLOW_HITS";
    /// Pinned by the daemon (SCRATCH, GENERATION, OPAQUE and IDENTITY_CACHE
    /// are per-program-set scratch, not pinned).
    pub const ALL: [&str; 26] = [
        IDENTITIES,
        POLICIES,
        EGRESS_V4,
        EGRESS_V6,
        COUNTERS,
        STATS,
        CONFIG,
        EVENTS,
        DNS_ORIG,
        LEARNED_V4,
        LEARNED_V6,
        FILE_RULES,
        FILE_BLOOM,
        TAINTED,
        RESOLVED,
        NAMES,
        INSPECT,
        REASONS,
        UNIX_RULES,
        UNIX_INODES,
        CACHE_GEN,
        FLOWS,
        FLOW_SPILL,
        ALLOW_EVENTS,
        ALLOW_HITS,
        FILE_READY,
    ];
}

/// Entries of `CACHE_GEN` (an array of `u64`: each writer writes only its
/// own entry, so no writer's update is lost to another's).
pub mod cache_gen {
    /// The flow epoch: advanced by userspace's flow drainer (its parity is
    /// the side of the flow cache the programs count in).
    pub const EPOCH: u32 = 0;
    /// The verdict generation is the (wrapping) sum of this entry and
    /// `TAINT_GEN`: it changes after every change of an input of a verdict
    /// that a cache may hold. This entry is userspace's: it adds 1 after
    /// each change of `IDENTITIES` or `POLICIES` and each clearing of
    /// `TAINTED` (written before). A per-CPU cache entry (the identity
    /// cache, a flow way) is valid only under the generation it was filled
    /// in.
    pub const USER_GEN: u32 = 1;
    /// Random per load of a fresh map: seeds the check word of the flow
    /// cache's ways, so that no one can compute a key whose check collides
    /// with another's.
    pub const SECRET: u32 = 2;
    /// The kernel's part of the verdict generation: the file hook adds 1
    /// (atomically, after it set `TAINTED`). Two counters that each only
    /// grow, each with one kind of writer: their sum never repeats (a
    /// single entry written by both could go back, userspace writing its
    /// read-plus-one over the kernel's adds).
    pub const TAINT_GEN: u32 = 3;
    pub const LEN: u32 = 4;
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
    /// cgroup_skb/egress: the first bytes of connections to learned addresses.
    pub const INSPECT: &str = "enforcer_inspect";
    /// cgroup_skb/ingress: connections and datagrams from peers outside the
    /// identity (`spec.ingress`).
    pub const INGRESS: &str = "enforcer_ingress";
    /// cgroup/setsockopt: IP options and IPv6 routing headers refused.
    pub const SETSOCKOPT: &str = "enforcer_setsockopt";
    /// Not in `ALL`: loaded on its own, only to probe for BPF LSM.
    pub const LSM_PROBE: &str = "enforcer_lsm_probe";
    /// BPF LSM hooks (not in `ALL`: global hooks, loaded only where BPF
    /// LSM is available: by the daemon at start, by `enforcer run` when the
    /// policy has `files:`). File policy:
    pub const FILE_OPEN: &str = "enforcer_file_open";
    pub const INODE_LINK: &str = "enforcer_inode_link";
    pub const INODE_RENAME: &str = "enforcer_inode_rename";
    /// Packet sockets of agents (no cgroup hook sees AF_PACKET).
    pub const SOCKET_CREATE: &str = "enforcer_socket_create";
    /// Inet sockets created outside the identity (SCM_RIGHTS, pidfd_getfd).
    pub const SOCKET_CONNECT: &str = "enforcer_socket_connect";
    pub const SOCKET_SENDMSG: &str = "enforcer_socket_sendmsg";
    pub const FILE_RECEIVE: &str = "enforcer_file_receive";
    /// Holds a program's start in a container whose file rules are not
    /// resolved yet (`policy_flags::FILES_PER_ROOT`).
    pub const BPRM_CHECK: &str = "enforcer_bprm_check";
    /// (program, LSM hook)
    pub const LSM: [(&str, &str); 8] = [
        (FILE_OPEN, "file_open"),
        (INODE_LINK, "inode_link"),
        (INODE_RENAME, "inode_rename"),
        (SOCKET_CREATE, "socket_create"),
        (SOCKET_CONNECT, "socket_connect"),
        (SOCKET_SENDMSG, "socket_sendmsg"),
        (FILE_RECEIVE, "file_receive"),
        (BPRM_CHECK, "bprm_check_security"),
    ];
    /// cgroup/connect_unix and cgroup/sendmsg_unix (Linux >= 6.7; not in
    /// `ALL`: loaded when the kernel has them, see `enforcer::kernel`).
    pub const CONNECT_UNIX: &str = "enforcer_connect_unix";
    pub const SENDMSG_UNIX: &str = "enforcer_sendmsg_unix";
    pub const UNIX: [&str; 2] = [CONNECT_UNIX, SENDMSG_UNIX];
    /// BPF LSM unix hooks (they see the peer socket): preferred over the
    /// cgroup unix hooks where BPF LSM works. (program, LSM hook)
    pub const UNIX_STREAM_CONNECT: &str = "enforcer_unix_stream_connect";
    pub const UNIX_MAY_SEND: &str = "enforcer_unix_may_send";
    pub const UNIX_LSM: [(&str, &str); 2] = [
        (UNIX_STREAM_CONNECT, "unix_stream_connect"),
        (UNIX_MAY_SEND, "unix_may_send"),
    ];
    pub const ALL: [&str; 12] = [
        CONNECT4,
        CONNECT6,
        SENDMSG4,
        SENDMSG6,
        SOCK_CREATE,
        RECVMSG4,
        RECVMSG6,
        GETPEERNAME4,
        GETPEERNAME6,
        INSPECT,
        INGRESS,
        SETSOCKOPT,
    ];
}

/// Max entries of the maps (userspace checks policies against these).
pub const MAX_IDENTITIES: u32 = 16384;
pub const MAX_EGRESS_V4: u32 = 1 << 20;
pub const MAX_EGRESS_V6: u32 = 1 << 18;
pub const EVENTS_BYTES: u32 = 1 << 20;
pub const MAX_LEARNED_V4: u32 = 1 << 18;
pub const MAX_LEARNED_V6: u32 = 1 << 16;
pub const MAX_FILE_RULES: u32 = 1 << 18;
pub const MAX_RESOLVED: u32 = 64;
/// `NAMES` entries (host patterns of every generation).
pub const MAX_NAMES: u32 = 1 << 16;
/// `UNIX_RULES` entries (`spec.local` of every generation, resolver sockets).
pub const MAX_UNIX_RULES: u32 = 1 << 14;
/// Ways of each CPU's flow cache per side and context (`FLOWS`: 2 sides x
/// 2 contexts x FLOW_WAYS entries; the ingress program, which may run in
/// softirq on top of another program, has its own ways).
pub const FLOW_WAYS: u32 = 16;
/// Bytes of `FLOW_SPILL`, the ring of flows moved out of a cache way.
pub const FLOW_SPILL_BYTES: u32 = 1 << 18;
/// `sun_path` bytes (`struct sockaddr_un`).
pub const UNIX_NAME_MAX: usize = 108;
/// `FILE_BLOOM`: 2^23 bits in 2^17 u64 words (1 MiB).
pub const BLOOM_BITS_LOG2: u32 = 23;
pub const BLOOM_WORDS: u32 = 1 << (BLOOM_BITS_LOG2 - 6);

/// The `FILE_BLOOM` bit of an inode. The file hooks look an inode up in
/// `FILE_RULES` only when its bit is set, so the opened file and each
/// parent directory cost a few loads and a bit test, not a hash lookup.
#[inline(always)]
pub const fn bloom_bit(ino: u64, dev: u32) -> u32 {
    ((ino ^ ((dev as u64) << 40)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - BLOOM_BITS_LOG2))
        as u32
}

/// Names of the read-only globals of the eBPF object that carry the struct
/// member offsets (set by userspace at load, from the running kernel's BTF;
/// the verifier then sees them as constants, so the hooks read kernel
/// structs with direct loads).
pub mod globals {
    pub const FILE_F_INODE: &str = "ENFORCER_OFF_FILE_F_INODE";
    pub const FILE_DENTRY: &str = "ENFORCER_OFF_FILE_DENTRY";
    pub const INODE_I_INO: &str = "ENFORCER_OFF_INODE_I_INO";
    pub const INODE_I_SB: &str = "ENFORCER_OFF_INODE_I_SB";
    pub const SB_S_DEV: &str = "ENFORCER_OFF_SB_S_DEV";
    pub const DENTRY_D_PARENT: &str = "ENFORCER_OFF_DENTRY_D_PARENT";
    pub const DENTRY_D_INODE: &str = "ENFORCER_OFF_DENTRY_D_INODE";
    pub const VALID: &str = "ENFORCER_OFF_VALID";
    /// The exec hold: `task_struct.nsproxy`, `nsproxy.mnt_ns`,
    /// `mnt_namespace.ns.inum`, and the host's mount namespace inode (u32s).
    pub const TASK_NSPROXY: &str = "ENFORCER_OFF_TASK_NSPROXY";
    pub const NSPROXY_MNT_NS: &str = "ENFORCER_OFF_NSPROXY_MNT_NS";
    pub const MNT_NS_INUM: &str = "ENFORCER_OFF_MNT_NS_INUM";
    pub const HOST_MNT_NS: &str = "ENFORCER_HOST_MNT_NS";
    /// `inode.i_mode` (the resolver thread's opens).
    pub const INODE_I_MODE: &str = "ENFORCER_OFF_INODE_I_MODE";
    /// [`super::SockOffsets`], in its field order.
    pub const SOCK: [&str; 10] = [
        "ENFORCER_SOFF_SOCKET_SK",
        "ENFORCER_SOFF_SOCK_FAMILY",
        "ENFORCER_SOFF_SOCK_CGROUP",
        "ENFORCER_SOFF_CGROUP_KN",
        "ENFORCER_SOFF_KN_ID",
        "ENFORCER_SOFF_KN_PARENT",
        "ENFORCER_SOFF_FILE_F_INODE",
        "ENFORCER_SOFF_FILE_PRIVATE_DATA",
        "ENFORCER_SOFF_INODE_I_MODE",
        "ENFORCER_SOFF_VALID",
    ];
    /// [`super::TaskOffsets`], in its field order.
    pub const TASK: [&str; 6] = [
        "ENFORCER_TOFF_TASK_TGID",
        "ENFORCER_TOFF_TASK_CGROUPS",
        "ENFORCER_TOFF_CSS_SET_DFL_CGRP",
        "ENFORCER_TOFF_CGROUP_KN",
        "ENFORCER_TOFF_KN_ID",
        "ENFORCER_TOFF_VALID",
    ];
    /// `struct bpf_sock_addr_kern.uaddr` and `.uaddrlen` (the unix hooks).
    pub const SOCK_ADDR_UADDR: &str = "ENFORCER_OFF_SOCK_ADDR_UADDR";
    pub const SOCK_ADDR_UADDRLEN: &str = "ENFORCER_OFF_SOCK_ADDR_UADDRLEN";
    /// The BPF LSM unix hooks (`UnixLsmOffsets`).
    pub const SOCKET_SK: &str = "ENFORCER_OFF_SOCKET_SK";
    pub const SOCK_CGROUP: &str = "ENFORCER_OFF_SOCK_CGROUP";
    pub const CGROUP_KN: &str = "ENFORCER_OFF_CGROUP_KN";
    pub const KN_ID: &str = "ENFORCER_OFF_KN_ID";
    pub const KN_PARENT: &str = "ENFORCER_OFF_KN_PARENT";
    pub const UNIX_SOCK_ADDR: &str = "ENFORCER_OFF_UNIX_SOCK_ADDR";
    pub const UNIX_SOCK_DENTRY: &str = "ENFORCER_OFF_UNIX_SOCK_DENTRY";
    pub const UNIX_ADDRESS_LEN: &str = "ENFORCER_OFF_UNIX_ADDRESS_LEN";
    pub const UNIX_ADDRESS_NAME: &str = "ENFORCER_OFF_UNIX_ADDRESS_NAME";
}
/// Parent dentries walked from an opened file to find a directory rule.
pub const MAX_FILE_DEPTH: u32 = 48;
/// Entries of `FILE_READY` (resolved container cgroups).
pub const MAX_FILE_READY: u32 = 16384;
/// `LearnedKey*.slot` bit of addresses learned for an identity's onTaint
/// host rules (used once the identity is tainted).
pub const TAINT_SLOT_BIT: u32 = 1 << 31;
/// The port DNS is steered from.
pub const DNS_PORT: u16 = 53;

/// Actions (what the agent tried).
pub mod action {
    pub const CONNECT: u8 = 0;
    pub const SENDMSG: u8 = 1;
    pub const SOCK_CREATE: u8 = 2;
    pub const DNS: u8 = 3;
    pub const FILE_OPEN: u8 = 4;
    /// link(2) of a protected file (a new name outside its tree).
    pub const FILE_LINK: u8 = 5;
    /// rename(2) of a protected file or directory.
    pub const FILE_RENAME: u8 = 6;
    /// The first bytes of a connection to a learned address (TLS SNI or
    /// HTTP Host), or UDP to such an address (not inspectable).
    pub const INSPECT: u8 = 7;
    /// A packet of an open socket, refused by the egress program: IPv4
    /// options or an IPv6 routing header (`rule::IP_OPTIONS`), or a
    /// destination outside `onTaint.egress` once the identity is tainted
    /// (`rule::TAINT_CLAMP`).
    pub const PACKET: u8 = 8;
    /// A connection or datagram from a peer outside the identity
    /// (`spec.ingress`): `addr` is the peer, `port` the local port.
    pub const INGRESS: u8 = 9;
    /// A socket option refused (`rule::IP_OPTIONS`): `port` holds the
    /// option name, `protocol` its level.
    pub const SETSOCKOPT: u8 = 10;
    /// An inet socket made outside the identity, refused at receipt
    /// (SCM_RIGHTS, pidfd_getfd; `rule::FOREIGN_SOCKET`).
    pub const FD_RECEIVE: u8 = 11;
    /// connect(2) of a unix socket (stream, seqpacket or datagram).
    pub const UNIX_CONNECT: u8 = 12;
    /// sendto/sendmsg of a unix datagram socket with a destination address.
    pub const UNIX_SEND: u8 = 13;
    pub const COUNT: u32 = 14;
}

/// Verdicts.
pub mod verdict {
    pub const ALLOW: u8 = 0;
    pub const DENY: u8 = 1;
    pub const AUDIT: u8 = 2;
    /// A `taint` file was opened (allowed): the identity's egress is clamped.
    pub const TAINT: u8 = 3;
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
    /// An inet socket created outside the identity (passed in with
    /// SCM_RIGHTS, taken with pidfd_getfd, inherited): the agent may not
    /// connect or send on it (BPF LSM).
    pub const FOREIGN_SOCKET: u32 = 0xffff_fff6;
    /// A socket option pinning the socket to an interface (SO_BINDTODEVICE,
    /// SO_BINDTOIFINDEX, IP(V6)_UNICAST_IF): the same address through
    /// another interface or VRF is another host.
    pub const BIND_DEVICE: u32 = 0xffff_fff5;
    /// Socket family outside the allowed set (unix, inet, inet6, netlink).
    pub const SOCKET_FAMILY: u32 = 0xffff_fffd;
    /// Plain socket creation of an allowed family.
    pub const SOCKET_OK: u32 = 0xffff_fffc;
    /// An inet socket of another protocol than TCP or UDP (SCTP, MPTCP,
    /// UDP-Lite, ...): their multi-address connect paths are not all covered
    /// by the connect/sendmsg hooks, so they cannot be created at all.
    pub const SOCKET_PROTOCOL: u32 = 0xffff_fffb;
    /// An opened file sits deeper than `MAX_FILE_DEPTH` below any directory
    /// the walk could check (fail closed for identities with directory rules).
    pub const FILE_DEPTH: u32 = 0xffff_fffa;
    /// The kernel's struct offsets are unknown (no BTF): file policy fails closed.
    pub const FILE_NO_OFFSETS: u32 = 0xffff_fff9;
    /// An IPv4 packet with options or an IPv6 packet with a routing (or
    /// hop-by-hop, destination options) header: its first hop is not the
    /// destination the connect/sendmsg hooks judged.
    pub const IP_OPTIONS: u32 = 0xffff_fff8;
    /// A packet of a socket opened before the identity was tainted, to a
    /// destination `onTaint.egress` does not admit.
    pub const TAINT_CLAMP: u32 = 0xffff_fff7;
    /// A resolver IPC socket (systemd-resolved varlink, nscd): always
    /// refused, since the resolver would resolve names outside the DNS proxy.
    pub const UNIX_RESOLVER: u32 = 0xffff_fff4;
    /// A unix socket address the hook could not read (fail closed).
    pub const UNIX_UNREADABLE: u32 = 0xffff_fff3;
    /// BPF LSM unix hooks: the peer socket belongs to the same identity
    /// (its cgroup is bound to the caller's slot): the agent's own helpers.
    pub const UNIX_SAME_IDENTITY: u32 = 0xffff_fff2;
    /// `spec.local[i]` has id `LOCAL_BASE + i + 1`.
    pub const LOCAL_BASE: u32 = 0x0800_0000;
    pub const LOCAL_END: u32 = 0x1000_0000;
    /// `spec.onTaint.egress[i]` has id `TAINT_BASE + i + 1`.
    pub const TAINT_BASE: u32 = 0x4000_0000;
    /// `spec.files[i]` has id `FILE_BASE + i + 1`.
    pub const FILE_BASE: u32 = 0x2000_0000;
    /// `spec.ingress[i]` has id `INGRESS_BASE + i + 1`.
    pub const INGRESS_BASE: u32 = 0x1000_0000;
}

/// `FileRuleValue.access`.
pub mod file_access {
    pub const DENY: u8 = 1;
    pub const AUDIT: u8 = 2;
    pub const TAINT: u8 = 3;
}

/// `UnixKey.kind`.
pub mod unix_kind {
    /// A file-system path (`sun_path` up to its first NUL).
    pub const PATH: u8 = 1;
    /// An abstract name (`sun_path[0] == 0`; every byte of the address counts).
    pub const ABSTRACT: u8 = 2;
}

/// `PolicyState.flags` bits.
pub mod policy_flags {
    /// The slot holds a policy (otherwise: fail closed).
    pub const PRESENT: u32 = 1 << 0;
    /// mode: audit (would-be denials are recorded as `audit` and allowed).
    pub const AUDIT: u32 = 1 << 1;
    /// The policy has `files:` rules (the LSM hooks look them up).
    pub const FILES: u32 = 1 << 2;
    /// Some file rule is a directory (walk parent dentries).
    pub const FILE_DIRS: u32 = 1 << 3;
    /// Judge egress by the onTaint generation once `TAINTED[slot]` is set.
    pub const TAINT_CLAMP: u32 = 1 << 4;
    /// The file rules name paths inside containers (a policy that selects
    /// Kubernetes pods): they are resolved in each container's root, and a
    /// program started in a cgroup of the identity that is not in
    /// `FILE_READY` yet is stopped before its first instruction until the
    /// daemon has resolved that container and resumes it.
    pub const FILES_PER_ROOT: u32 = 1 << 5;
}

/// `PortRule.flags` bits.
pub mod rule_flags {
    /// `inspect: none`: connections to the rule's learned addresses are not
    /// judged by their first bytes (and UDP to them is allowed).
    pub const RAW: u8 = 1 << 0;
}

/// `InspectState.status`.
pub mod inspect_status {
    /// Waiting for the first bytes: nothing may leave.
    pub const PENDING: u8 = 1;
    pub const PASSED: u8 = 2;
    /// Refused: every later payload is dropped.
    pub const REFUSED: u8 = 3;
    /// Cut by the taint clamp: every later packet is dropped.
    pub const CLAMPED: u8 = 4;
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
    /// Segments held (dropped before they left) because the first bytes
    /// were not complete yet; TCP sends them again with what follows.
    pub const INSPECT_HELD: u32 = 2;
    /// Segments of refused connections dropped after the refusal.
    pub const INSPECT_DROPPED: u32 = 3;
    /// Another run of the egress program used the per-CPU scratch space
    /// during a judgement (a softirq or a preempting task): the segment was
    /// held and TCP sends it again.
    pub const INSPECT_NESTED: u32 = 4;
    /// A connect to a learned address refused because its socket state
    /// could not be created (fail closed).
    pub const INSPECT_NO_STATE: u32 = 5;
    /// Packets dropped by the egress program's guard (IP options, routing
    /// headers, the taint clamp on open sockets), each.
    pub const PACKET_DROPPED: u32 = 6;
    /// Packets from peers outside the identity dropped at ingress, each.
    pub const INGRESS_DROPPED: u32 = 7;
    /// Sends and connects to port 53 steered to an identity's DNS proxy.
    pub const DNS_STEERED: u32 = 8;
    /// Of those, refused (EPERM) because the socket's storage for the
    /// resolver it addressed could not be created (its reply could not be
    /// restored; fail closed).
    pub const DNS_NO_STATE: u32 = 9;
    pub const COUNT: u32 = 10;
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
    pub _pad: [u8; 2],
    /// Generation of the onTaint egress tables (used once tainted).
    pub taint_table_id: u32,
    /// Generation of the `spec.ingress` tables (peer address -> local
    /// ports), in the `EGRESS_*` maps; 0: none (every peer refused).
    pub ingress_table_id: u32,
    /// Unused (the flow cache's secret was here before it had to be known
    /// before the identity: now `CACHE_GEN[SECRET]`). Kept so that a
    /// pinned `POLICIES` keeps its layout.
    pub _unused: u32,
}

/// `FILE_RULES` key: an inode, by number and device (kernel `dev_t`:
/// major << 20 | minor), in one generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FileKey {
    pub ino: u64,
    pub dev: u32,
    pub table_id: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileRuleValue {
    /// `files[i]` -> `rule::FILE_BASE + i + 1`.
    pub rule_id: u32,
    /// `file_access::*`.
    pub access: u8,
    pub _pad: [u8; 3],
}

/// Byte offsets through which the cgroup programs read the current task's
/// cgroup id and process id from the task (`bpf_get_current_task_btf`):
/// the same values as `bpf_get_current_cgroup_id` and
/// `bpf_get_current_pid_tgid() >> 32`, for one helper call instead of
/// two (each call costs ~20 ns on this project's host). From BTF like
/// [`FileOffsets`]; `valid` 0: the programs call those helpers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskOffsets {
    /// `struct task_struct.tgid`
    pub task_tgid: u32,
    /// `struct task_struct.cgroups` (the task's `css_set`)
    pub task_cgroups: u32,
    /// `struct css_set.dfl_cgrp` (its cgroup v2 cgroup)
    pub css_set_dfl_cgrp: u32,
    /// `struct cgroup.kn`
    pub cgroup_kn: u32,
    /// `struct kernfs_node.id` (the cgroup id)
    pub kn_id: u32,
    pub valid: u32,
}

/// Byte offsets the LSM socket hooks read (a socket's cgroup), from BTF
/// like [`FileOffsets`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOffsets {
    /// `struct socket.sk`
    pub socket_sk: u32,
    /// `struct sock.__sk_common.skc_family`
    pub sock_family: u32,
    /// `struct sock.sk_cgrp_data.cgroup`
    pub sock_cgroup: u32,
    /// `struct cgroup.kn`
    pub cgroup_kn: u32,
    /// `struct kernfs_node.id`
    pub kn_id: u32,
    /// `struct kernfs_node.parent` (`__parent` since Linux 6.15)
    pub kn_parent: u32,
    /// `struct file.f_inode`
    pub file_f_inode: u32,
    /// `struct file.private_data` (a socket file's `struct socket`)
    pub file_private_data: u32,
    /// `struct inode.i_mode`
    pub inode_i_mode: u32,
    /// 1 when the offsets above are filled in.
    pub valid: u32,
}

/// Byte offsets of the struct members the LSM hooks read, taken from the
/// running kernel's BTF by userspace (aya has no CO-RE field relocations)
/// and set as the object's read-only globals ([`globals`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileOffsets {
    /// `struct file.f_inode`
    pub file_f_inode: u32,
    /// `struct file.f_path` + `struct path.dentry`
    pub file_dentry: u32,
    /// `struct inode.i_ino`
    pub inode_i_ino: u32,
    /// `struct inode.i_sb`
    pub inode_i_sb: u32,
    /// `struct super_block.s_dev`
    pub sb_s_dev: u32,
    /// `struct dentry.d_parent`
    pub dentry_d_parent: u32,
    /// `struct dentry.d_inode`
    pub dentry_d_inode: u32,
    /// 1 when the offsets above are filled in.
    pub valid: u32,
}

/// `UNIX_RULES` key: a unix socket address as the agent wrote it, in one
/// generation (table id 0: the resolver sockets, for every identity).
/// `name` is `sun_path`'s first `len` bytes, zero-padded: for a path, up to
/// (without) its first NUL; for an abstract name, the leading NUL and the
/// name (`len` = address length - 2).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UnixKey {
    pub table_id: u32,
    /// `unix_kind::*`.
    pub kind: u8,
    pub len: u8,
    pub _pad: [u8; 2],
    pub name: [u8; UNIX_NAME_MAX],
}

impl Default for UnixKey {
    fn default() -> Self {
        Self {
            table_id: 0,
            kind: 0,
            len: 0,
            _pad: [0; 2],
            name: [0; UNIX_NAME_MAX],
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnixRule {
    /// `spec.local[i]` -> `rule::LOCAL_BASE + i + 1`; `rule::UNIX_RESOLVER`.
    pub rule_id: u32,
    pub _pad: u32,
}

/// An `action::UNIX_CONNECT` / `UNIX_SEND` decision with the address
/// (ring buffer; told apart from `Event` and `InspectEvent` by its size).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixEvent {
    pub event: Event,
    /// `unix_kind::*` (0: the address could not be read).
    pub kind: u8,
    /// Bytes of `name` used (as in `UnixKey`).
    pub len: u8,
    pub _pad: [u8; 6],
    pub name: [u8; UNIX_NAME_MAX],
    pub _pad2: [u8; 4],
}

impl Default for UnixEvent {
    fn default() -> Self {
        Self {
            event: Event::default(),
            kind: 0,
            len: 0,
            _pad: [0; 6],
            name: [0; UNIX_NAME_MAX],
            _pad2: [0; 4],
        }
    }
}

/// Struct member offsets the BPF LSM unix hooks read (from the kernel's BTF).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnixLsmOffsets {
    /// `struct socket.sk`
    pub socket_sk: u32,
    /// `struct sock.sk_cgrp_data.cgroup`
    pub sock_cgroup: u32,
    /// `struct cgroup.kn`
    pub cgroup_kn: u32,
    /// `struct kernfs_node.id`
    pub kn_id: u32,
    /// `struct kernfs_node.parent`
    pub kn_parent: u32,
    /// `struct unix_sock.addr`
    pub unix_sock_addr: u32,
    /// `struct unix_sock.path.dentry`
    pub unix_sock_dentry: u32,
    /// `struct unix_address.len`
    pub unix_address_len: u32,
    /// `struct unix_address.name`
    pub unix_address_name: u32,
    /// 1 when the offsets above are filled in.
    pub valid: u32,
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
    /// `rule_flags::*`.
    pub flags: u8,
    pub _pad: [u8; 2],
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
    /// 0: allowed decisions are only counted; 1: every allow is accounted in
    /// a flow (`FLOWS`, `FLOW_SPILL`) or, for allows that carry more than a
    /// flow key (first bytes, unix addresses), sent as an event without
    /// waking the reader; N: about one allow in N is sent as an event
    /// (denies and audits always are, waking the reader).
    pub allow_sample: u32,
    /// Number of slots with file rules: the LSM hooks return at once while 0.
    pub file_slots: u32,
    /// Thread id of the enforcer thread resolving rule paths (0: none): the
    /// file hooks record the inodes that thread's opens present in
    /// `RESOLVED` instead of judging them (see `enforcer::kernel::files`).
    /// As the enforcer's PID namespace numbers it (a DaemonSet without
    /// `hostPID`, or one under a container's init, is not in the initial
    /// one): the hooks compare it with the current task's thread id in that
    /// namespace, and only a task of that namespace matches.
    pub resolver_tid: u32,
    /// That PID namespace: its nsfs inode and device (the kernel's `dev_t`
    /// encoding, as `bpf_get_ns_current_pid_tgid` takes it).
    pub resolver_pidns_ino: u32,
    pub resolver_pidns_dev: u32,
    pub _pad: u32,
}

/// An allowed flow, aggregated in the kernel (`FLOWS`, per CPU): the
/// decision fields that name it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub cgroup_id: u64,
    pub slot: u32,
    /// The CIDR table (`EGRESS_V4`/`EGRESS_V6` generation) whose entry
    /// admitted the flow, or 0: the flow was admitted otherwise (a learned
    /// address, which expires, or an inbound peer). A table never changes
    /// under its id, and the identity's table changes only with
    /// `CACHE_GEN[GEN]`: a live way of a table-admitted flow filled under
    /// the current generation answers the next decision of the same key
    /// without a lookup (see `enforcer-ebpf`'s `report::repeat_allow`).
    pub table_id: u32,
    /// As `Event::addr` (IPv4 v4-mapped).
    pub addr: [u8; 16],
    pub port: u16,
    pub action: u8,
    pub protocol: u8,
    pub family: u8,
    pub sock_type: u8,
    /// 1: the way may answer the next decisions of this key (a CIDR
    /// table admitted it; see `table_id`); 0: every decision is looked up.
    pub cacheable: u8,
    pub _pad: u8,
    /// The process (thread group id): each process its own flow.
    pub pid: u32,
    /// `CACHE_GEN[GEN]` when the way was filled (a way answers only under
    /// the generation it was filled in). Userspace ignores it and
    /// `cacheable` when it merges the parts of a flow.
    pub gen: u32,
}

/// What one way of one CPU counted of a flow (an aggregate that userspace
/// merges with the flow's other ways and spilled aggregates).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// Allowed decisions judged by a lookup (0: the way is empty); each
    /// also counted in `COUNTERS`.
    pub count: u64,
    /// Allowed decisions the way answered itself (`repeat_allow`): counted
    /// here only, in the way's own cache line (the drainer adds them to
    /// `ALLOW_HITS`). The flow's decisions are `count + hits`.
    pub hits: u64,
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC, jiffy resolution) of
    /// the first of them, and of the last: the programs stamp it when they
    /// fill the way and when they spill it (the eviction time), never
    /// when they count (userspace raises a drained way's to its epoch's
    /// end).
    pub first_ns: u64,
    pub last_ns: u64,
    /// The epoch (`CACHE_GEN[EPOCH]`) the way was filled in (a way of an older
    /// epoch is empty: userspace drained it and never clears it).
    pub epoch: u32,
    /// The admitting rule.
    pub rule_id: u32,
    /// The process's `comm` at its first decision of the flow.
    pub comm: [u8; 16],
    /// A 64-bit hash of the key (seeded with `CACHE_GEN[SECRET]`),
    /// written last when a way is filled (0 first): a way answers a
    /// decision only if its words equal the decision's key *and* this
    /// word is the key's hash, so a way torn by a program preempted in
    /// the middle of a fill (words of two flows) answers nothing.
    pub check: u64,
}

impl FlowValue {
    /// Every allowed decision the way (or spilled record) stands for.
    #[inline(always)]
    pub const fn decisions(&self) -> u64 {
        self.count.wrapping_add(self.hits)
    }
}

/// One way of a CPU's flow cache (`FLOWS`), and a record of `FLOW_SPILL`:
/// a flow counted in place until a decision of another flow that maps to
/// the same way moves it to the spill ring. `value.count == 0`: empty.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    pub key: FlowKey,
    pub value: FlowValue,
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
    /// File actions: bytes 0..8 the inode number, 8..12 the kernel dev_t
    /// (little endian) of the file that matched.
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
    /// `first_bytes::reason::*` (action INSPECT), else 0.
    pub reason: u8,
    pub comm: [u8; 16],
}

/// Socket storage of a connection whose first bytes are judged (created by
/// the connect hook, read by the egress program).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InspectState {
    pub cgroup_id: u64,
    pub slot: u32,
    /// The learned-address rule that admitted the connect.
    pub rule_id: u32,
    /// Destination port, host byte order.
    pub port: u16,
    /// `inspect_status::*`.
    pub status: u8,
    /// The identity was in audit mode at connect time.
    pub audit: u8,
    /// The connecting process (thread group id) and its `comm`, for the
    /// record (the egress program may run in softirq context, and before
    /// Linux 6.4 cgroup_skb programs cannot read the current task).
    pub pid: u32,
    pub comm: [u8; 16],
    /// Sequence number of the SYN (`isn`), seen by the egress program;
    /// `seq_known` once it was.
    pub isn: u32,
    pub seq_known: u8,
    /// Created while the identity was tainted (judged by its onTaint
    /// generation): the taint clamp leaves it to the first-bytes judge.
    pub tainted: u8,
    /// The taint clamp recorded this socket (once per socket).
    pub clamp_seen: u8,
    pub _pad: u8,
}

/// `NAMES` LPM key data: table id (big endian), then the host name reversed
/// (`first_bytes::name_key`, `first_bytes::pattern_key`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NameKey {
    pub table_id_be: [u8; 4],
    pub name: [u8; first_bytes::KEY_NAME],
}

impl Default for NameKey {
    fn default() -> Self {
        Self {
            table_id_be: [0; 4],
            name: [0; first_bytes::KEY_NAME],
        }
    }
}

/// An `action::INSPECT` decision with the name the first bytes presented
/// and the connection's local end (ring buffer; told apart from `Event` by
/// its size).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InspectEvent {
    pub event: Event,
    /// `first_bytes::kind::*`.
    pub kind: u8,
    /// Bytes of `name` used.
    pub name_len: u8,
    /// The presented name was longer than `name`.
    pub truncated: u8,
    pub _pad: [u8; 3],
    /// Local port, host byte order (0: unknown, e.g. UDP refused at connect).
    pub src_port: u16,
    /// Local address (IPv4 v4-mapped).
    pub src: [u8; 16],
    /// The name as presented (raw bytes, not validated).
    pub name: [u8; first_bytes::PRESENTED_MAX],
}

impl Default for InspectEvent {
    fn default() -> Self {
        Self {
            event: Event::default(),
            kind: 0,
            name_len: 0,
            truncated: 0,
            _pad: [0; 3],
            src_port: 0,
            src: [0; 16],
            name: [0; first_bytes::PRESENTED_MAX],
        }
    }
}

/// Index into `REASONS` for (slot, reason, audit).
#[inline(always)]
pub const fn reason_index(slot: u32, reason: u8, audit: bool) -> u32 {
    (slot * first_bytes::reason::COUNT + reason as u32) * 2 + audit as u32
}

pub const REASONS_LEN: u32 = MAX_SLOTS * first_bytes::reason::COUNT * 2;

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
    unsafe impl aya::Pod for FileKey {}
    unsafe impl aya::Pod for FileRuleValue {}
    unsafe impl aya::Pod for FileOffsets {}
    unsafe impl aya::Pod for SockOffsets {}
    unsafe impl aya::Pod for InspectState {}
    unsafe impl aya::Pod for NameKey {}
    unsafe impl aya::Pod for InspectEvent {}
    unsafe impl aya::Pod for UnixKey {}
    unsafe impl aya::Pod for UnixRule {}
    unsafe impl aya::Pod for UnixEvent {}
    unsafe impl aya::Pod for UnixLsmOffsets {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for FlowEntry {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<IdentityBinding>(), 8);
        assert_eq!(size_of::<PolicyState>(), 24);
        assert_eq!(size_of::<SockOffsets>(), 40);
        assert_eq!(size_of::<OrigDst>(), 24);
        assert_eq!(size_of::<LearnedKey4>(), 8);
        assert_eq!(size_of::<LearnedKey6>(), 20);
        assert_eq!(size_of::<Learned>(), 8 + size_of::<RuleSet>());
        assert_eq!(size_of::<PortRule>(), 12);
        assert_eq!(size_of::<RuleSet>(), 8 + 12 * MAX_PORT_RULES);
        assert_eq!(size_of::<V4Key>(), 8);
        assert_eq!(size_of::<V6Key>(), 20);
        assert_eq!(size_of::<FileKey>(), 16);
        assert_eq!(size_of::<FileRuleValue>(), 8);
        assert_eq!(size_of::<FileOffsets>(), 32);
        assert_eq!(size_of::<Event>(), 8 + 8 + 4 * 4 + 16 + 2 + 4 + 2 + 16);
        assert_eq!(size_of::<InspectState>(), 48);
        assert_eq!(size_of::<NameKey>(), 256);
        assert_eq!(size_of::<InspectEvent>(), size_of::<Event>() + 8 + 16 + 128);
        assert_eq!(size_of::<UnixKey>(), 8 + UNIX_NAME_MAX);
        assert_eq!(size_of::<UnixRule>(), 8);
        assert_eq!(
            size_of::<UnixEvent>(),
            size_of::<Event>() + 8 + UNIX_NAME_MAX + 4
        );
        // The reader tells records apart by size.
        assert_ne!(size_of::<UnixEvent>(), size_of::<InspectEvent>());
        assert!(size_of::<UnixEvent>() < size_of::<InspectEvent>());
    }

    #[test]
    fn counter_index_is_dense_and_in_bounds() {
        assert_eq!(counter_index(0, 0, 0), 0);
        assert_eq!(counter_index(0, 0, 1), 1);
        assert_eq!(counter_index(0, 1, 0), verdict::COUNT);
        assert_eq!(counter_index(1, 0, 0), action::COUNT * verdict::COUNT);
        assert!(counter_index(MAX_SLOTS - 1, 9, 3) < COUNTERS_LEN);
    }
}
