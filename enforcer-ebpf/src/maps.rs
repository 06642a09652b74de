//! Every map of the object. Names, key and value types come from
//! `enforcer-common` so that userspace and kernel agree on one layout.
use aya_ebpf::{
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray, RingBuf},
};
use enforcer_common::{
    cache_gen, first_bytes::BUF, stat, FileKey, FileRuleValue, FlowEntry, GlobalConfig,
    IdentityBinding, InspectState, Learned, LearnedKey4, LearnedKey6, NameKey, OrigDst,
    PolicyState, RuleSet, UnixKey, UnixRule, V4Key, V6Key, BLOOM_WORDS, COUNTERS_LEN, EVENTS_BYTES,
    FLOW_SPILL_BYTES, FLOW_WAYS, MAX_EGRESS_V4, MAX_EGRESS_V6, MAX_FILE_READY, MAX_FILE_RULES,
    MAX_IDENTITIES, MAX_LEARNED_V4, MAX_LEARNED_V6, MAX_NAMES, MAX_RESOLVED, MAX_SLOTS,
    MAX_UNIX_RULES, REASONS_LEN,
};

#[map(name = "IDENTITIES")]
pub static IDENTITIES: HashMap<u64, IdentityBinding> = HashMap::with_max_entries(MAX_IDENTITIES, 0);

/// The flow epoch, the verdict generation and the flow cache's secret
/// (`enforcer_common::cache_gen`): adjacent `u64`s, one cache line.
#[map(name = "CACHE_GEN")]
pub static CACHE_GEN: Array<u64> = Array::with_max_entries(cache_gen::LEN, 0);

/// Per CPU: the last cgroup -> identity resolution (see `identity`).
#[map(name = "IDENTITY_CACHE")]
pub static IDENTITY_CACHE: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "POLICIES")]
pub static POLICIES: Array<PolicyState> = Array::with_max_entries(MAX_SLOTS, 0);

#[map(name = "EGRESS_V4")]
pub static EGRESS_V4: LpmTrie<V4Key, RuleSet> = LpmTrie::with_max_entries(MAX_EGRESS_V4, 0);

#[map(name = "EGRESS_V6")]
pub static EGRESS_V6: LpmTrie<V6Key, RuleSet> = LpmTrie::with_max_entries(MAX_EGRESS_V6, 0);

#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

/// Written by userspace only (the flow drainer adds the flow cache's
/// answers, `FlowValue::hits`); no program reads or writes it.
#[map(name = "ALLOW_HITS")]
pub static ALLOW_HITS: Array<u64> = Array::with_max_entries(COUNTERS_LEN, 0);

#[map(name = "STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

#[map(name = "CONFIG")]
pub static CONFIG: Array<GlobalConfig> = Array::with_max_entries(1, 0);

#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Where a socket steered to its DNS proxy really sent to: socket storage,
/// freed with the socket. (An LRU hash keyed by socket cookie held it
/// before: nothing removed an entry when its socket closed, so it filled
/// within a minute, and one agent's burst of fresh sockets evicted the
/// in-flight queries of every identity, whose replies then came from the
/// proxy's port and were dropped by their resolvers.)
#[btf_map]
pub static DNS_ORIG: SkStorage<OrigDst> = SkStorage::new();

#[map(name = "LEARNED_V4")]
pub static LEARNED_V4: HashMap<LearnedKey4, Learned> = HashMap::with_max_entries(MAX_LEARNED_V4, 0);

#[map(name = "LEARNED_V6")]
pub static LEARNED_V6: HashMap<LearnedKey6, Learned> = HashMap::with_max_entries(MAX_LEARNED_V6, 0);

#[map(name = "FILE_RULES")]
pub static FILE_RULES: HashMap<FileKey, FileRuleValue> =
    HashMap::with_max_entries(MAX_FILE_RULES, 0);

#[map(name = "FILE_BLOOM")]
pub static FILE_BLOOM: Array<u64> = Array::with_max_entries(BLOOM_WORDS, 0);

#[map(name = "TAINTED")]
pub static TAINTED: Array<u64> = Array::with_max_entries(MAX_SLOTS, 0);

#[map(name = "RESOLVED")]
pub static RESOLVED: HashMap<FileKey, u32> = HashMap::with_max_entries(MAX_RESOLVED, 0);

/// Container cgroups resolved for `FILES_PER_ROOT` identities: cgroup id -> slot.
#[map(name = "FILE_READY")]
pub static FILE_READY: HashMap<u64, u32> = HashMap::with_max_entries(MAX_FILE_READY, 0);

#[map(name = "NAMES")]
pub static NAMES: LpmTrie<NameKey, RuleSet> = LpmTrie::with_max_entries(MAX_NAMES, 0);

/// Socket storage (a BTF map: the kernel requires BTF for it).
#[btf_map]
pub static INSPECT: SkStorage<InspectState> = SkStorage::new();

#[map(name = "REASONS")]
pub static REASONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REASONS_LEN, 0);

/// Scratch space of the egress program, per CPU (guarded by `GENERATION`).
#[repr(C)]
pub struct Scratch {
    pub buf: [u8; 2 * BUF],
    pub key: Key<NameKey>,
    /// `first_bytes::name_key` writes 256 bytes from `key.data.name`.
    pub slack: [u8; 8],
}

#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Bumped by each run of the egress program at its start and end: a run
/// whose scratch space another run used meanwhile sees it changed.
#[map(name = "GENERATION")]
pub static GENERATION: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// One u64 that stays 0: an opaque zero for the egress program's loop state
/// (see `first_bytes::Loops::num`). Never written.
#[map(name = "OPAQUE")]
pub static OPAQUE: Array<u64> = Array::with_max_entries(1, 0);

#[map(name = "UNIX_RULES")]
pub static UNIX_RULES: HashMap<UnixKey, UnixRule> = HashMap::with_max_entries(MAX_UNIX_RULES, 0);

/// BPF LSM unix hooks: socket inodes of `spec.local` paths (per generation)
/// and of the resolver sockets (table id 0).
#[map(name = "UNIX_INODES")]
pub static UNIX_INODES: HashMap<FileKey, UnixRule> = HashMap::with_max_entries(MAX_UNIX_RULES, 0);

/// Per CPU: the flow cache, `FLOW_WAYS` ways for each side (see
/// `report::account_flow`).
#[map(name = "FLOW_WAYS")]
pub static FLOWS: PerCpuArray<FlowEntry> = PerCpuArray::with_max_entries(4 * FLOW_WAYS, 0);

/// Flows moved out of a cache way (never wakes the reader).
#[map(name = "FLOW_SPILL")]
pub static FLOW_SPILL: RingBuf = RingBuf::with_byte_size(FLOW_SPILL_BYTES, 0);

/// Allow records that are not flows (see `report`): a ring of their own so
/// that an agent's allowed traffic never takes the room of a denial.
#[map(name = "ALLOW_EVENTS")]
pub static ALLOW_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
