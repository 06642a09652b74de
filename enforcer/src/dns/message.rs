//! The proxy's decisions on DNS messages, free of I/O: parse a query, judge
//! it against a [`DnsPolicy`], build REFUSED/SERVFAIL replies and the
//! sanitized upstream query, and turn an upstream answer into the released
//! answer plus the addresses to learn. Messages are parsed and built with
//! hickory-proto only.
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
    pub msg: Message,
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

/// Parse a client message; `None` unless it is one standard query with
/// exactly one question (responses, other opcodes and garbage are malformed).
pub fn parse_query(bytes: &[u8]) -> Option<Query> {
    let msg = Message::from_vec(bytes).ok()?;
    if msg.metadata.message_type != MessageType::Query
        || msg.metadata.op_code != OpCode::Query
        || msg.queries.len() != 1
    {
        return None;
    }
    let q = &msg.queries[0];
    let (qname, matchable, text_len) = name_text(q.name());
    let (qtype, qclass) = (q.query_type(), q.query_class());
    let edns = msg
        .edns
        .as_ref()
        .map(|e| (e.max_payload(), e.flags().dnssec_ok));
    Some(Query {
        msg,
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
/// two bytes): the client's RD/CD/AD flags and its one question, with a
/// bare EDNS record. Nothing else of the client's message (other sections,
/// EDNS options) leaves the proxy.
pub fn upstream_query(q: &Query) -> Vec<u8> {
    let mut m = Message::new(0, MessageType::Query, OpCode::Query);
    let md = &q.msg.metadata;
    m.metadata.recursion_desired = md.recursion_desired;
    m.metadata.checking_disabled = md.checking_disabled;
    m.metadata.authentic_data = md.authentic_data;
    m.queries.clone_from(&q.msg.queries);
    m.edns = Some(edns(q.edns.is_some_and(|(_, d)| d)));
    m.to_vec().unwrap_or_default()
}

/// Is `resp` an answer to the question of `q` (ids are checked by the forwarder)?
pub fn answers_question(q: &Query, resp: &Message) -> bool {
    resp.metadata.message_type == MessageType::Response
        && resp.queries.len() == 1
        && resp.queries[0].name() == q.msg.queries[0].name()
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

/// Clamp answer TTLs, follow the CNAME chain of the question through the
/// answer section, collect its A/AAAA addresses and strip those in rebinding
/// space that none of `cidrs` (the `cidr` rules the query is judged by)
/// covers. The reply keeps the client's id and question. Addresses are only
/// collected when `learn` is true.
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
    // from it (in any record order; bounded by the answer size).
    let mut chain: Vec<&Name> = vec![q.msg.queries[0].name()];
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
            keep.push(false);
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
