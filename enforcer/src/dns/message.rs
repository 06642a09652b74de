//! The proxy's decisions on DNS messages, free of I/O: parse a query, judge
//! it against a [`DnsPolicy`], build REFUSED/SERVFAIL replies and the
//! sanitized upstream query, and turn an upstream answer into the released
//! answer plus the addresses to learn. Messages are parsed and built with
//! hickory-proto only.
//!
//! Letter case: a name is judged, counted and forwarded in its canonical
//! form (ASCII lower case, [`Name::to_lowercase`]); the agent's spelling
//! never leaves the proxy. Otherwise the case pattern of an allowed name
//! (`aPi.ExAmple.com`, "0x20 encoding") would carry up to one bit per
//! letter to the upstream past the name budget. The client still gets its
//! question back exactly as it asked it (stub resolvers compare the
//! question, and 0x20-checking ones compare its case), and the answer
//! records owned by the queried name carry that spelling too, as a
//! resolver that compresses them against the question would send them.
use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode},
    rr::{DNSClass, Name, RData, RecordType},
};

use enforcer_common::rule::TAINT_BASE;
use ipnet::IpNet;

use super::{match_in, DnsPolicy, HostRule};
use crate::events::Verdict;

/// EDNS payload size the proxy advertises (upstream and to clients): the
/// DNS flag day 2020 value, safe from IP fragmentation.
pub const EDNS_PAYLOAD: u16 = 1232;
/// Largest UDP reply to a client without EDNS.
const CLASSIC_UDP_LIMIT: usize = 512;

/// A client query that parsed as one standard question.
#[derive(Debug)]
pub struct Query {
    /// The client's message; its question keeps the client's spelling.
    pub msg: Message,
    /// The question's name in canonical form (ASCII lower case): the name
    /// asked upstream.
    pub canonical: Name,
    /// Lower case, no trailing dot, odd bytes escaped (`\DDD`).
    pub qname: String,
    /// Every label is `[a-z0-9_-]` only (so the name can match a rule).
    pub matchable: bool,
    /// Length of the text form without trailing dot (escapes not counted).
    pub text_len: usize,
    pub qtype: RecordType,
    pub qclass: DNSClass,
    /// The client's EDNS (payload size, DO bit), if it sent one.
    pub edns: Option<(u16, bool)>,
}

impl Query {
    /// `A`, `TXT`, ... or `CH:TXT` for a class other than IN.
    pub fn qtype_text(&self) -> String {
        if self.qclass == DNSClass::IN {
            self.qtype.to_string()
        } else {
            format!("{}:{}", self.qclass, self.qtype)
        }
    }

    /// Largest reply this client takes over UDP.
    pub fn udp_limit(&self) -> usize {
        match self.edns {
            Some((payload, _)) => usize::from(payload.clamp(512, EDNS_PAYLOAD)),
            None => CLASSIC_UDP_LIMIT,
        }
    }
}

/// The largest client query accepted (one question of at most 255 bytes,
/// an EDNS OPT record with its options, e.g. a cookie or padding).
pub const MAX_QUERY_BYTES: usize = 1232;

/// Parse a client message; `None` unless it is one standard query with
/// exactly one question (responses, other opcodes and garbage are malformed).
///
/// The header is checked before anything is parsed: a query has no answer
/// or authority records, at most one additional record (its EDNS OPT) and
/// at most [`MAX_QUERY_BYTES`] bytes. A message of many records would
/// otherwise parse into megabytes (compression pointers make a record a
/// few bytes on the wire), held while the query waits for its upstream.
pub fn parse_query(bytes: &[u8]) -> Option<Query> {
    let count = |at: usize| Some(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]));
    if bytes.len() > MAX_QUERY_BYTES
        || count(4)? != 1
        || count(6)? != 0
        || count(8)? != 0
        || count(10)? > 1
    {
        return None;
    }
    let msg = Message::from_vec(bytes).ok()?;
    // The one additional record may only be the EDNS OPT record (parsed
    // into `edns`), not another record or a signature.
    if msg.metadata.message_type != MessageType::Query
        || msg.metadata.op_code != OpCode::Query
        || msg.queries.len() != 1
        || !msg.additionals.is_empty()
        || msg.signature.is_some()
    {
        return None;
    }
    let q = &msg.queries[0];
    let canonical = q.name().to_lowercase();
    let (qname, matchable, text_len) = name_text(&canonical);
    let (qtype, qclass) = (q.query_type(), q.query_class());
    let edns = msg
        .edns
        .as_ref()
        .map(|e| (e.max_payload(), e.flags().dnssec_ok));
    Some(Query {
        msg,
        canonical,
        qname,
        matchable,
        text_len,
        qtype,
        qclass,
        edns,
    })
}

/// (lower-case text with `\DDD` escapes, all labels `[a-z0-9_-]`, raw text length).
fn name_text(name: &Name) -> (String, bool, usize) {
    let mut s = String::with_capacity(name.len());
    let mut matchable = true;
    let mut len = 0usize;
    for (i, label) in name.iter().enumerate() {
        if i > 0 {
            s.push('.');
            len += 1;
        }
        len += label.len();
        for &b in label {
            let b = b.to_ascii_lowercase();
            if b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' {
                s.push(char::from(b));
            } else {
                matchable = false;
                let _ = write!(s, "\\{b:03}");
            }
        }
    }
    (s, matchable, len)
}

/// Per-identity budget of distinct names per host pattern, in fixed
/// one-minute windows. A name already seen in the window never counts twice.
/// Names and patterns are compared ASCII case-insensitively (case variants
/// of one name are one name).
#[derive(Debug)]
pub struct Budget {
    start: Instant,
    seen: HashMap<String, HashSet<String>>,
}

pub const BUDGET_WINDOW: Duration = Duration::from_secs(60);

impl Budget {
    pub fn new(now: Instant) -> Self {
        Self {
            start: now,
            seen: HashMap::new(),
        }
    }

    /// May `qname` be resolved under `pattern` now (and record it)?
    pub fn admit(&mut self, pattern: &str, qname: &str, limit: u32, now: Instant) -> bool {
        if now.duration_since(self.start) >= BUDGET_WINDOW {
            self.start = now;
            self.seen.clear();
        }
        // Callers pass lower-case names already ([`Query::qname`]); the
        // budget does not rely on it.
        let lower = |s: &str| -> Option<String> {
            s.bytes()
                .any(|b| b.is_ascii_uppercase())
                .then(|| s.to_ascii_lowercase())
        };
        let (pattern_lc, qname_lc) = (lower(pattern), lower(qname));
        let pattern = pattern_lc.as_deref().unwrap_or(pattern);
        let qname = qname_lc.as_deref().unwrap_or(qname);
        let names = match self.seen.get_mut(pattern) {
            Some(n) => n,
            None => self.seen.entry(pattern.to_owned()).or_default(),
        };
        if names.contains(qname) {
            return true;
        }
        if names.len() >= limit as usize {
            return false;
        }
        names.insert(qname.to_owned());
        true
    }
}

/// The verdict on a query before it is forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// `Allow`: forward. `Deny`: REFUSED. `Audit`: forward, report.
    pub verdict: Verdict,
    pub reason: &'static str,
    /// Index into `policy.rules(tainted).hosts`.
    pub rule: Option<usize>,
    /// Judged by the onTaint rules (the identity is tainted and the policy
    /// has a taint clamp).
    pub tainted: bool,
}

/// Judge `q` by `policy`'s rules, its onTaint rules if `tainted` (see
/// [`DnsPolicy::rules`]); updates the budget when the name is otherwise
/// allowed.
pub fn decide(
    policy: &DnsPolicy,
    tainted: bool,
    q: &Query,
    budget: &mut Budget,
    now: Instant,
) -> Decision {
    let view = policy.rules(tainted);
    let rule = if q.matchable {
        match_in(view.hosts, &q.qname)
    } else {
        None
    };
    let refuse = |reason| Decision {
        verdict: if policy.audit {
            Verdict::Audit
        } else {
            Verdict::Deny
        },
        reason,
        rule,
        tainted: view.tainted,
    };
    if q.text_len > policy.max_query_length {
        return refuse("too-long");
    }
    let Some(idx) = rule else {
        return refuse(if view.tainted {
            "tainted"
        } else {
            "name-not-allowed"
        });
    };
    if q.qclass != DNSClass::IN || !policy.query_types.contains(&q.qtype) {
        return refuse("query-type");
    }
    let h = &view.hosts[idx];
    if !budget.admit(&h.pattern, &q.qname, policy.names_per_minute, now) {
        return refuse("budget");
    }
    Decision {
        verdict: Verdict::Allow,
        reason: "allowed",
        rule,
        tainted: view.tainted,
    }
}

/// `egress[i] host <pattern>`, or `onTaint.egress[i] host <pattern>`.
pub fn rule_text(h: &HostRule) -> String {
    match h.rule_id.checked_sub(TAINT_BASE + 1) {
        Some(i) => format!("onTaint.egress[{i}] host {}", h.pattern),
        None => format!("egress[{}] host {}", h.rule_id.saturating_sub(1), h.pattern),
    }
}

/// A reply to `q` carrying only its question and `rcode`.
pub fn error_reply(q: &Query, rcode: ResponseCode) -> Vec<u8> {
    let mut m = Message::new(q.msg.metadata.id, MessageType::Response, OpCode::Query);
    m.metadata = Metadata::response_from_request(&q.msg.metadata);
    m.metadata.recursion_available = true;
    m.metadata.response_code = rcode;
    m.queries.clone_from(&q.msg.queries);
    if let Some((_, dnssec_ok)) = q.edns {
        m.edns = Some(edns(dnssec_ok));
    }
    // Cannot fail: a question that was just parsed re-encodes.
    m.to_vec().unwrap_or_default()
}

fn edns(dnssec_ok: bool) -> Edns {
    let mut e = Edns::new();
    e.set_max_payload(EDNS_PAYLOAD);
    e.set_dnssec_ok(dnssec_ok);
    e
}

/// The query sent upstream (id 0; the forwarder sets the id in the first
/// two bytes): the client's RD/CD/AD flags and its one question with the
/// name in canonical form (lower case: the client's letter case is not
/// forwarded), with a bare EDNS record. Nothing else of the client's
/// message (other sections, EDNS options, the case of its name) leaves the
/// proxy.
pub fn upstream_query(q: &Query) -> Vec<u8> {
    let mut m = Message::new(0, MessageType::Query, OpCode::Query);
    let md = &q.msg.metadata;
    m.metadata.recursion_desired = md.recursion_desired;
    m.metadata.checking_disabled = md.checking_disabled;
    m.metadata.authentic_data = md.authentic_data;
    let mut question = q.msg.queries[0].clone();
    question.set_name(q.canonical.clone());
    m.queries.push(question);
    m.edns = Some(edns(q.edns.is_some_and(|(_, d)| d)));
    m.to_vec().unwrap_or_default()
}

/// Is `resp` an answer to the question of `q` (ids are checked by the
/// forwarder)? Names compare case-insensitively (hickory's `Name` equality):
/// an upstream may echo the canonical name in any case.
pub fn answers_question(q: &Query, resp: &Message) -> bool {
    resp.metadata.message_type == MessageType::Response
        && resp.queries.len() == 1
        && resp.queries[0].name() == &q.canonical
        && resp.queries[0].query_type() == q.qtype
        && resp.queries[0].query_class() == q.qclass
}

/// An upstream answer turned into what the client gets.
#[derive(Debug)]
pub struct Processed {
    pub reply: Message,
    /// (address, clamped TTL) to install, deduplicated.
    pub learn: Vec<(IpAddr, Duration)>,
    /// Rebinding-space addresses: stripped, not installed.
    pub blocked: Vec<IpAddr>,
}

/// An upstream answer as the proxy releases it: the bytes for the client and
/// what to learn from them.
#[derive(Debug)]
pub struct Released {
    pub bytes: Vec<u8>,
    /// (address, clamped TTL) to install; empty when the reply was truncated.
    pub learn: Vec<(IpAddr, Duration)>,
    /// Rebinding-space addresses: stripped, not installed.
    pub blocked: Vec<IpAddr>,
}

/// [`process_answer`], then the reply's bytes: past the client's UDP size
/// limit `udp_limit` the reply is released truncated and nothing is learned
/// (the client retries over TCP, whose answer is learned). `None` when the
/// reply cannot be encoded.
pub fn release(
    policy: &DnsPolicy,
    cidrs: &[IpNet],
    q: &Query,
    resp: Message,
    learn: bool,
    udp_limit: Option<usize>,
) -> Option<Released> {
    let p = process_answer(policy, cidrs, q, resp, learn);
    let mut bytes = p.reply.to_vec().ok()?;
    let mut learn = p.learn;
    if udp_limit.is_some_and(|l| bytes.len() > l) {
        bytes = p.reply.truncate().to_vec().ok()?;
        learn.clear();
    }
    Some(Released {
        bytes,
        learn,
        blocked: p.blocked,
    })
}

/// Clamp answer TTLs, follow the CNAME chain of the question through the
/// answer section, collect its A/AAAA addresses and strip those in rebinding
/// space that none of `cidrs` (the `cidr` rules the query is judged by)
/// covers (`mode: audit`: report them, keep them in the reply). The reply keeps the client's id and question (its spelling, as
/// it asked), and records owned by the queried name are given that spelling
/// too. Addresses are only collected when `learn` is true.
pub fn process_answer(
    policy: &DnsPolicy,
    cidrs: &[IpNet],
    q: &Query,
    mut resp: Message,
    learn: bool,
) -> Processed {
    let (min, max) = (
        policy.ttl_min.as_secs().min(u64::from(u32::MAX)) as u32,
        policy.ttl_max.as_secs().min(u64::from(u32::MAX)) as u32,
    );
    for r in &mut resp.answers {
        r.ttl = r.ttl.clamp(min, max.max(min));
    }
    // Names of the chain: the question, then every CNAME target reached
    // from it (in any record order; bounded by the answer size). `Name`
    // equality ignores ASCII case, so the upstream's spelling does not matter.
    let mut chain: Vec<&Name> = vec![&q.canonical];
    loop {
        let before = chain.len();
        for r in &resp.answers {
            if let RData::CNAME(c) = &r.data {
                if chain.contains(&&r.name) && !chain.contains(&&c.0) {
                    chain.push(&c.0);
                }
            }
        }
        if chain.len() == before {
            break;
        }
    }
    let mut keep = Vec::with_capacity(resp.answers.len());
    let mut learned: Vec<(IpAddr, Duration)> = Vec::new();
    let mut blocked = Vec::new();
    for r in &resp.answers {
        let ip = match &r.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => {
                keep.push(true);
                continue;
            }
        };
        if !chain.contains(&&r.name) {
            // Not an address of the queried name: released, never installed.
            keep.push(true);
            continue;
        }
        if is_rebinding_address(ip) && !cidrs.iter().any(|n| covers(n, ip)) {
            if !blocked.contains(&ip) {
                blocked.push(ip);
            }
            // `mode: audit` refuses nothing: the address stays in the reply
            // (reported as it would have been stripped), never installed.
            keep.push(policy.audit);
            continue;
        }
        keep.push(true);
        if learn {
            let ttl = Duration::from_secs(u64::from(r.ttl));
            match learned.iter_mut().find(|(a, _)| *a == ip) {
                Some((_, t)) => *t = (*t).max(ttl),
                None => learned.push((ip, ttl)),
            }
        }
    }
    let mut k = keep.into_iter();
    resp.answers.retain(|_| k.next().unwrap_or(true));
    // The client's id and question (in its spelling), our EDNS if it had one.
    resp.metadata.id = q.msg.metadata.id;
    resp.queries.clone_from(&q.msg.queries);
    let asked = q.msg.queries[0].name();
    for r in resp
        .answers
        .iter_mut()
        .chain(&mut resp.authorities)
        .chain(&mut resp.additionals)
    {
        if r.name == *asked {
            r.name.clone_from(asked);
        }
    }
    resp.edns = q.edns.map(|(_, d)| {
        let mut e = edns(d);
        if let Some(up) = &resp.edns {
            e.set_rcode_high(up.rcode_high());
        }
        e
    });
    resp.signature = None;
    Processed {
        reply: resp,
        learn: learned,
        blocked,
    }
}

/// Does `net` contain `ip` (an IPv4-mapped IPv6 address counts as IPv4)?
/// May `ip` be installed under rules whose `cidr` rules are `cidrs`: not
/// in rebinding space, or vouched for by one of them.
pub fn vouched(cidrs: &[IpNet], ip: IpAddr) -> bool {
    !is_rebinding_address(ip) || cidrs.iter().any(|n| covers(n, ip))
}

fn covers(net: &IpNet, ip: IpAddr) -> bool {
    net.contains(&ip) || net.contains(&canonical(ip))
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Loopback (127/8, ::1), link-local (169.254/16, fe80::/10), private
/// (10/8, 172.16/12, 192.168/16, fc00::/7), CGNAT (100.64/10), unspecified
/// and "this network" (0/8, ::), multicast (224/4, ff00::/8) and broadcast.
/// IPv4-mapped IPv6 addresses are judged as IPv4.
pub fn is_rebinding_address(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(a) => v4_rebinding(a),
        IpAddr::V6(a) => v6_rebinding(a),
    }
}

fn v4_rebinding(a: Ipv4Addr) -> bool {
    let o = a.octets();
    a.is_loopback()
        || a.is_link_local()
        || a.is_private()
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
        || o[0] == 0
        || a.is_multicast()
        || a.is_broadcast()
}

fn v6_rebinding(a: Ipv6Addr) -> bool {
    let s = a.segments();
    a.is_loopback()
        || a.is_unspecified()
        || a.is_multicast()
        || (s[0] & 0xffc0) == 0xfe80
        || (s[0] & 0xfe00) == 0xfc00
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebinding_space() {
        for a in [
            "127.0.0.1",
            "127.255.0.9",
            "::1",
            "169.254.169.254",
            "fe80::1",
            "febf::1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "fc00::1",
            "fdff::1",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "0.1.2.3",
            "::",
            "224.0.0.1",
            "239.1.1.1",
            "ff02::1",
            "255.255.255.255",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_rebinding_address(a.parse().unwrap()), "{a}");
        }
        for a in [
            "1.1.1.1",
            "93.184.216.34",
            "172.32.0.1",
            "100.128.0.1",
            "100.63.255.255",
            "2606:4700::1111",
            "fec0::1",
            "::ffff:8.8.8.8",
        ] {
            assert!(!is_rebinding_address(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn budget_counts_distinct_names_per_pattern_and_window() {
        let t0 = Instant::now();
        let mut b = Budget::new(t0);
        assert!(b.admit("*.x", "a.x", 2, t0));
        assert!(b.admit("*.x", "a.x", 2, t0));
        assert!(b.admit("*.x", "b.x", 2, t0));
        assert!(!b.admit("*.x", "c.x", 2, t0));
        assert!(b.admit("*.x", "a.x", 2, t0), "a seen name stays allowed");
        assert!(
            b.admit("*.y", "c.y", 2, t0),
            "another pattern has its own budget"
        );
        assert!(b.admit("*.x", "c.x", 2, t0 + BUDGET_WINDOW));
    }

    #[test]
    fn budget_ignores_letter_case() {
        let t0 = Instant::now();
        let mut b = Budget::new(t0);
        assert!(b.admit("*.x", "a.x", 1, t0));
        for variant in ["A.x", "a.X", "A.X"] {
            assert!(b.admit("*.x", variant, 1, t0), "{variant} is a.x");
        }
        assert!(b.admit("*.X", "a.x", 1, t0), "patterns too");
        assert!(!b.admit("*.x", "b.x", 1, t0));
        assert!(!b.admit("*.x", "B.x", 1, t0));
    }

    /// A mixed-case query as a stub resolver sends it (RD, EDNS).
    fn mixed_case_query(name: &str) -> (Vec<u8>, Query) {
        let mut m = Message::new(0x5a5a, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(hickory_proto::op::Query::query(
            Name::from_ascii(name).unwrap(),
            RecordType::A,
        ));
        m.edns = Some(edns(false));
        let bytes = m.to_vec().unwrap();
        let q = parse_query(&bytes).unwrap();
        (bytes, q)
    }

    #[test]
    fn the_upstream_query_carries_the_canonical_name_only() {
        let (_, q) = mixed_case_query("aPi.ExAmple.COM.");
        assert_eq!(q.qname, "api.example.com");
        assert!(q
            .canonical
            .eq_case(&Name::from_ascii("api.example.com.").unwrap()));
        assert!(
            q.msg.queries[0]
                .name()
                .eq_case(&Name::from_ascii("aPi.ExAmple.COM.").unwrap()),
            "the client's message keeps its spelling"
        );
        let up = upstream_query(&q);
        let fwd = Message::from_vec(&up).unwrap();
        assert_eq!(fwd.queries.len(), 1);
        assert!(fwd.queries[0].name().eq_case(&q.canonical));
        assert_eq!(fwd.queries[0].query_type(), RecordType::A);
        assert!(fwd.metadata.recursion_desired);
        // Not a byte of the upstream query is an upper-case letter.
        assert!(!up.iter().any(u8::is_ascii_uppercase), "{up:?}");
        // Case variants of one name are one upstream query.
        let (_, q2) = mixed_case_query("API.example.com.");
        assert_eq!(upstream_query(&q2), up);
    }

    fn test_policy() -> DnsPolicy {
        DnsPolicy {
            identity: crate::events::IdentityRef {
                name: "t".into(),
                spiffe_id: None,
            },
            policy_hash: String::new(),
            hosts: Vec::new(),
            upstreams: Vec::new(),
            ttl_min: Duration::from_secs(5),
            ttl_max: Duration::from_secs(300),
            max_query_length: 253,
            query_types: vec![RecordType::A],
            names_per_minute: 64,
            cidrs: Vec::new(),
            audit: false,
            taint_hosts: None,
            taint_cidrs: Vec::new(),
        }
    }

    /// The upstream's answer to `up` (the canonical query): the question
    /// as received, `answers` in lower case.
    fn upstream_answer(up: &[u8], answers: Vec<hickory_proto::rr::Record>) -> Message {
        let fwd = Message::from_vec(up).unwrap();
        let mut r = Message::new(fwd.metadata.id, MessageType::Response, OpCode::Query);
        r.metadata.recursion_available = true;
        r.queries = fwd.queries;
        r.answers = answers;
        r
    }

    fn rec(name: &str, data: RData) -> hickory_proto::rr::Record {
        hickory_proto::rr::Record::from_rdata(Name::from_ascii(name).unwrap(), 60, data)
    }

    #[test]
    fn the_reply_carries_the_question_as_the_client_asked_it() {
        use hickory_proto::rr::rdata::{A, CNAME};
        let (bytes, q) = mixed_case_query("WwW.ExAmple.COM.");
        let resp = upstream_answer(
            &upstream_query(&q),
            vec![
                rec(
                    "www.example.com.",
                    RData::CNAME(CNAME(Name::from_ascii("edge.example.net.").unwrap())),
                ),
                rec(
                    "edge.example.net.",
                    RData::A(A("93.184.216.40".parse().unwrap())),
                ),
                rec(
                    "www.example.com.",
                    RData::A(A("93.184.216.41".parse().unwrap())),
                ),
            ],
        );
        assert!(answers_question(&q, &resp), "a lower-case echo answers it");
        let p = process_answer(&test_policy(), &[], &q, resp, true);
        let learned: Vec<IpAddr> = p.learn.iter().map(|(ip, _)| *ip).collect();
        assert_eq!(
            learned,
            vec![
                "93.184.216.40".parse::<IpAddr>().unwrap(),
                "93.184.216.41".parse().unwrap()
            ],
            "the CNAME chain is followed from the canonical name"
        );
        let out = p.reply.to_vec().unwrap();
        // Header (12 bytes), then the question: byte for byte the client's.
        let name = q.msg.queries[0].name();
        let qlen = name.iter().map(|l| l.len() + 1).sum::<usize>() + 1 + 4;
        assert_eq!(qlen, 21);
        assert_eq!(&out[12..12 + qlen], &bytes[12..12 + qlen]);
        assert_eq!(&out[..2], &bytes[..2], "the client's id");
        // Records owned by the queried name carry the client's spelling;
        // others are as the upstream sent them.
        let reply = Message::from_vec(&out).unwrap();
        let asked = Name::from_ascii("WwW.ExAmple.COM.").unwrap();
        assert!(reply.queries[0].name().eq_case(&asked));
        assert!(reply.answers[0].name.eq_case(&asked));
        assert!(reply.answers[1]
            .name
            .eq_case(&Name::from_ascii("edge.example.net.").unwrap()));
        assert!(reply.answers[2].name.eq_case(&asked));
        // Refusals, SERVFAIL and truncated answers carry it too.
        for r in [
            error_reply(&q, ResponseCode::Refused),
            p.reply.truncate().to_vec().unwrap(),
        ] {
            assert_eq!(&r[12..12 + qlen], &bytes[12..12 + qlen]);
        }
    }

    #[test]
    fn an_upstream_echo_in_another_case_still_answers() {
        let (_, q) = mixed_case_query("api.example.com.");
        let mut resp = upstream_answer(&upstream_query(&q), Vec::new());
        resp.queries[0].set_name(Name::from_ascii("API.EXAMPLE.COM.").unwrap());
        assert!(answers_question(&q, &resp));
        resp.queries[0].set_name(Name::from_ascii("apj.example.com.").unwrap());
        assert!(!answers_question(&q, &resp));
    }

    #[test]
    fn garbage_and_truncated_messages_do_not_parse() {
        assert!(parse_query(&[]).is_none());
        assert!(parse_query(&[0; 5]).is_none());
        assert!(parse_query(&[0xff; 300]).is_none());
        let mut m = Message::new(7, MessageType::Query, OpCode::Query);
        m.add_query(hickory_proto::op::Query::query(
            Name::from_ascii("a.example.com.").unwrap(),
            RecordType::A,
        ));
        let bytes = m.to_vec().unwrap();
        assert!(parse_query(&bytes).is_some());
        for n in 0..bytes.len() {
            assert!(parse_query(&bytes[..n]).is_none(), "prefix {n}");
        }
        // A response, or two questions, is not a query.
        let mut r = m.clone();
        r.metadata.message_type = MessageType::Response;
        assert!(parse_query(&r.to_vec().unwrap()).is_none());
        let mut two = m.clone();
        two.add_query(hickory_proto::op::Query::query(
            Name::from_ascii("b.example.com.").unwrap(),
            RecordType::A,
        ));
        assert!(parse_query(&two.to_vec().unwrap()).is_none());
    }

    #[test]
    fn odd_label_bytes_are_escaped_and_never_match() {
        let name = Name::from_labels(vec![&b"a.b"[..], b"Example", b"com"]).unwrap();
        let (s, matchable, len) = name_text(&name);
        assert_eq!(s, "a\\046b.example.com");
        assert!(!matchable);
        assert_eq!(len, 15);
    }
}
