//! Every map of the object. Names, key and value types come from
//! `enforcer-common` so that userspace and kernel agree on one layout.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use enforcer_common::{
    stat, FileKey, FileRuleValue, GlobalConfig, IdentityBinding, Learned, LearnedKey4, LearnedKey6,
    OrigDst, PolicyState, RuleSet, V4Key, V6Key, BLOOM_WORDS, COUNTERS_LEN, EVENTS_BYTES,
    MAX_DNS_ORIG, MAX_EGRESS_V4, MAX_EGRESS_V6, MAX_FILE_RULES, MAX_IDENTITIES, MAX_LEARNED_V4,
    MAX_LEARNED_V6, MAX_RESOLVED, MAX_SLOTS,
};

#[map(name = "IDENTITIES")]
pub static IDENTITIES: HashMap<u64, IdentityBinding> = HashMap::with_max_entries(MAX_IDENTITIES, 0);

#[map(name = "POLICIES")]
pub static POLICIES: Array<PolicyState> = Array::with_max_entries(MAX_SLOTS, 0);

#[map(name = "EGRESS_V4")]
pub static EGRESS_V4: LpmTrie<V4Key, RuleSet> = LpmTrie::with_max_entries(MAX_EGRESS_V4, 0);

#[map(name = "EGRESS_V6")]
pub static EGRESS_V6: LpmTrie<V6Key, RuleSet> = LpmTrie::with_max_entries(MAX_EGRESS_V6, 0);

#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

#[map(name = "STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

#[map(name = "CONFIG")]
pub static CONFIG: Array<GlobalConfig> = Array::with_max_entries(1, 0);

#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map(name = "DNS_ORIG")]
pub static DNS_ORIG: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(MAX_DNS_ORIG, 0);

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
