//! The proxy against a tiny in-test upstream (UDP and TCP on one loopback
//! port, answers built with hickory-proto), a recording [`Learner`], a
//! recording [`DnsSink`] and a switchable [`TaintView`].
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    str::FromStr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        rdata::{A, AAAA, CNAME, TXT},
        DNSClass, Name, RData, Record, RecordType,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
};

use super::*;
use crate::policy::{compile, parse_str};
use enforcer_common::{rule::TAINT_BASE, TAINT_SLOT_BIT};

// ---------------------------------------------------------------- upstream

/// What the fake upstream saw: (transport, lower-case name, type, the name
/// as it arrived, letter case kept).
type Seen = Arc<Mutex<Vec<(&'static str, String, RecordType, String)>>>;

fn rec(name: &str, ttl: u32, data: RData) -> Record {
    Record::from_rdata(Name::from_ascii(name).unwrap(), ttl, data)
}

fn a(s: &str) -> RData {
    RData::A(A(s.parse().unwrap()))
}

/// The fake zone. `tc.example.com` is truncated over UDP.
fn zone(name: &str, t: RecordType) -> Option<Vec<Record>> {
    let n = name.trim_end_matches('.');
    Some(match (n, t) {
        ("api.example.com", RecordType::A) => vec![rec(n, 1, a("93.184.216.34"))],
        ("api.example.com", RecordType::AAAA) => vec![rec(
            n,
            100_000,
            RData::AAAA(AAAA("2606:4700::1".parse().unwrap())),
        )],
        ("api.example.com", RecordType::TXT) => {
            vec![rec(n, 60, RData::TXT(TXT::new(vec!["hello".into()])))]
        }
        ("www.example.com", RecordType::A) => vec![
            // Out of chain order on purpose, plus an unrelated address.
            rec("e1.cdn.example.net", 30, a("93.184.216.35")),
            rec(
                "edge.cdn.example.net",
                30,
                RData::CNAME(CNAME(Name::from_ascii("e1.cdn.example.net.").unwrap())),
            ),
            rec(
                n,
                30,
                RData::CNAME(CNAME(Name::from_ascii("edge.cdn.example.net.").unwrap())),
            ),
            rec("other.example.org", 30, a("1.2.3.4")),
        ],
        ("rebind.example.com", RecordType::A) => vec![
            rec(n, 30, a("127.0.0.1")),
            rec(n, 30, a("10.1.2.3")),
            rec(n, 30, a("169.254.169.254")),
            rec(n, 30, a("93.184.216.36")),
        ],
        ("rebind.example.com", RecordType::AAAA) => vec![
            rec(n, 30, RData::AAAA(AAAA(Ipv6Addr::LOCALHOST))),
            rec(
                n,
                30,
                RData::AAAA(AAAA("::ffff:192.168.0.1".parse().unwrap())),
            ),
        ],
        ("tc.example.com", RecordType::A) => vec![rec(n, 30, a("93.184.216.37"))],
        ("a.example", RecordType::A) => vec![rec(n, 30, a("198.51.100.1"))],
        ("b.example", RecordType::A) => vec![rec(n, 30, a("203.0.113.2"))],
        _ => return None,
    })
}

fn answer(query: &[u8], transport: &'static str, seen: &Seen) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let question = q.queries.first()?.clone();
    let raw = question.name().to_ascii();
    let name = raw.to_ascii_lowercase();
    let t = question.query_type();
    seen.lock().unwrap().push((
        transport,
        name.trim_end_matches('.').to_owned(),
        t,
        raw.trim_end_matches('.').to_owned(),
    ));
    let mut r = Message::response(q.metadata.id, OpCode::Query);
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    r.add_query(question);
    if name == "tc.example.com." && transport == "udp" {
        r.metadata.truncation = true;
    } else {
        match zone(&name, t) {
            Some(rs) => {
                r.add_answers(rs);
            }
            None => r.metadata.response_code = ResponseCode::NXDomain,
        }
    }
    if q.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        r.set_edns(e);
    }
    r.to_vec().ok()
}

struct Upstream {
    addr: SocketAddr,
    seen: Seen,
}

impl Upstream {
    fn names(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.1.clone())
            .collect()
    }
    /// The names as they arrived (letter case kept).
    fn raw_names(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.3.clone())
            .collect()
    }
    fn transports(&self) -> Vec<&'static str> {
        self.seen.lock().unwrap().iter().map(|s| s.0).collect()
    }
}

async fn upstream() -> Upstream {
    let seen: Seen = Arc::default();
    let (udp, tcp) = loop {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = udp.local_addr().unwrap().port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)).await {
            break (udp, tcp);
        }
    };
    let addr = udp.local_addr().unwrap();
    let s = seen.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        while let Ok((n, src)) = udp.recv_from(&mut buf).await {
            if let Some(r) = answer(&buf[..n], "udp", &s) {
                let _ = udp.send_to(&r, src).await;
            }
        }
    });
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = tcp.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                while let Ok(len) = c.read_u16().await {
                    let mut b = vec![0u8; usize::from(len)];
                    if c.read_exact(&mut b).await.is_err() {
                        return;
                    }
                    let Some(r) = answer(&b, "tcp", &s) else {
                        return;
                    };
                    let mut out = (r.len() as u16).to_be_bytes().to_vec();
                    out.extend_from_slice(&r);
                    let _ = c.write_all(&out).await;
                }
            });
        }
    });
    Upstream { addr, seen }
}

// ---------------------------------------------------------------- fakes

/// (slot, ip, set, ttl, host) of one `learn` call.
type LearnCall = (u32, IpAddr, enforcer_common::RuleSet, Duration, String);

#[derive(Default)]
struct FakeLearner {
    calls: Mutex<Vec<LearnCall>>,
    /// Shared with the test client: "learn <ip>" / "recv".
    log: Arc<Mutex<Vec<String>>>,
    fail: AtomicBool,
    /// Sleep this long in `learn` (ms).
    delay_ms: AtomicU64,
    epoch: AtomicU64,
}

impl Learner for FakeLearner {
    fn epoch(&self, _slot: u32) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    fn learn(
        &self,
        slot: u32,
        ip: IpAddr,
        set: &enforcer_common::RuleSet,
        ttl: Duration,
        host: &str,
        epoch: u64,
    ) -> anyhow::Result<()> {
        if epoch != self.epoch.load(Ordering::SeqCst) {
            return Err(StaleEpoch.into());
        }
        if self.fail.load(Ordering::SeqCst) {
            anyhow::bail!("table full");
        }
        // Slow on purpose (in the ordering test): an answer released before
        // this returns would be received (and logged) first.
        std::thread::sleep(Duration::from_millis(self.delay_ms.load(Ordering::SeqCst)));
        self.calls
            .lock()
            .unwrap()
            .push((slot, ip, *set, ttl, host.to_owned()));
        self.log.lock().unwrap().push(format!("learn {ip}"));
        Ok(())
    }
}

impl FakeLearner {
    fn ips(&self) -> Vec<IpAddr> {
        self.calls.lock().unwrap().iter().map(|c| c.1).collect()
    }
}

#[derive(Default)]
struct RecSink {
    events: Mutex<Vec<DnsEvent>>,
    malformed: AtomicU64,
}

impl DnsSink for RecSink {
    fn record(&self, ev: &DnsEvent) {
        self.events.lock().unwrap().push(ev.clone());
    }
    fn malformed(&self, _slot: u32) {
        self.malformed.fetch_add(1, Ordering::SeqCst);
    }
}

impl RecSink {
    fn last(&self) -> DnsEvent {
        self.events
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("an event")
    }
}

/// A taint flag the test flips; records which slots were asked about.
#[derive(Default)]
struct FakeTaint {
    tainted: AtomicBool,
    asked: Mutex<Vec<u32>>,
}

impl TaintView for FakeTaint {
    fn is_tainted(&self, slot: u32) -> bool {
        self.asked.lock().unwrap().push(slot);
        self.tainted.load(Ordering::SeqCst)
    }
}

impl FakeTaint {
    fn taint(&self) {
        self.tainted.store(true, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------- harness

const SLOT: u32 = 7;

struct Harness {
    proxy: DnsProxy,
    learner: Arc<FakeLearner>,
    sink: Arc<RecSink>,
    taint: Arc<FakeTaint>,
    up: Upstream,
    port: u16,
}

/// A policy document with `egress` and `dns` bodies (YAML, indented for `spec:`).
fn policy(egress: &str, dns: &str, up: SocketAddr) -> Arc<DnsPolicy> {
    policy_with(egress, dns, "", up)
}

/// [`policy`] with more `spec:` fields (`rest`, YAML indented by two:
/// `files:`, `onTaint:`, `mode:`).
fn policy_with(egress: &str, dns: &str, rest: &str, up: SocketAddr) -> Arc<DnsPolicy> {
    let yaml = format!(
        "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: agent\n\
         spec:\n  identity:\n    spiffeId: spiffe://t/agent\n  egress:\n{egress}  dns:\n    \
         upstream: [\"{up}\"]\n{dns}{rest}"
    );
    let p = parse_str(&yaml, Path::new("t.yaml")).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    Arc::new(compile_dns(&p[0], &compiled(&p[0])))
}

/// What `compile_dns` reads of a compiled policy (name, identity, mode,
/// hash), also for a policy with `files:` / `onTaint:`, which
/// `check_supported` may refuse.
fn compiled(p: &LoadedPolicy) -> CompiledPolicy {
    let mut bare = p.clone();
    bare.policy.spec.files.clear();
    bare.policy.spec.on_taint = None;
    compile(&bare).unwrap()
}

const EGRESS: &str = "    - host: api.example.com\n      ports: [443]\n      protocol: tcp\n    \
                      - host: www.example.com\n    - host: rebind.example.com\n    \
                      - host: '*.example.com'\n      ports: [80]\n";

async fn harness(egress: &str, dns: &str) -> Harness {
    harness_with(|up| policy(egress, dns, up)).await
}

/// A proxy serving `SLOT` with the policy `make` builds for the upstream's address.
async fn harness_with(make: impl FnOnce(SocketAddr) -> Arc<DnsPolicy>) -> Harness {
    let up = upstream().await;
    let learner = Arc::new(FakeLearner::default());
    let sink = Arc::new(RecSink::default());
    let taint = Arc::new(FakeTaint::default());
    let proxy = DnsProxy::new(learner.clone(), sink.clone(), taint.clone());
    let port = proxy.serve_identity(SLOT, make(up.addr)).await.unwrap();
    Harness {
        proxy,
        learner,
        sink,
        taint,
        up,
        port,
    }
}

fn query_bytes(id: u16, name: &str, t: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

/// `query` (no EDNS) with an EDNS OPT record carrying a padding option of
/// `pad` zero bytes (RFC 7830).
fn padded(query: &[u8], pad: usize) -> Vec<u8> {
    with_edns_option(query, 12, &vec![0u8; pad])
}

/// `query` (no EDNS) with an EDNS OPT record carrying option `code`.
fn with_edns_option(query: &[u8], code: u16, data: &[u8]) -> Vec<u8> {
    let mut q = query.to_vec();
    q[10..12].copy_from_slice(&1u16.to_be_bytes()); // ARCOUNT
    q.push(0); // root name
    q.extend_from_slice(&41u16.to_be_bytes()); // OPT
    q.extend_from_slice(&1232u16.to_be_bytes()); // payload size
    q.extend_from_slice(&[0; 4]); // extended rcode, version, flags
    q.extend_from_slice(&(data.len() as u16 + 4).to_be_bytes()); // rdlen
    q.extend_from_slice(&code.to_be_bytes());
    q.extend_from_slice(&(data.len() as u16).to_be_bytes());
    q.extend_from_slice(data);
    q
}

/// Send raw bytes over UDP to the proxy at `ip`; the reply, if one comes.
async fn udp_raw(ip: IpAddr, port: u16, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let local: SocketAddr = if ip.is_ipv4() {
        "127.0.0.1:0".parse().unwrap()
    } else {
        "[::1]:0".parse().unwrap()
    };
    let s = UdpSocket::bind(local).await.unwrap();
    s.send_to(bytes, (ip, port)).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(wait, s.recv_from(&mut buf))
        .await
        .ok()?
        .unwrap();
    Some(buf[..n].to_vec())
}

impl Harness {
    async fn udp(&self, name: &str, t: RecordType) -> Message {
        self.udp_at(IpAddr::V4(Ipv4Addr::LOCALHOST), name, t).await
    }

    async fn udp_at(&self, ip: IpAddr, name: &str, t: RecordType) -> Message {
        let q = query_bytes(0x1234, name, t, true);
        let r = udp_raw(ip, self.port, &q, Duration::from_secs(5))
            .await
            .expect("a reply");
        self.learner.log.lock().unwrap().push("recv".into());
        let m = Message::from_vec(&r).unwrap();
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert_eq!(m.queries.len(), 1);
        let fqdn = Name::from_ascii(format!("{}.", name.trim_end_matches('.'))).unwrap();
        assert!(
            m.queries[0].name().eq_case(&fqdn),
            "the question as asked: {} for {fqdn}",
            m.queries[0].name()
        );
        assert_eq!(m.queries[0].query_type(), t);
        m
    }

    async fn tcp(&self, name: &str, t: RecordType) -> Message {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        let q = query_bytes(0x4321, name, t, false);
        let mut out = (q.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&q);
        s.write_all(&out).await.unwrap();
        let len = s.read_u16().await.unwrap();
        let mut b = vec![0u8; usize::from(len)];
        s.read_exact(&mut b).await.unwrap();
        let m = Message::from_vec(&b).unwrap();
        assert_eq!(m.metadata.id, 0x4321);
        m
    }
}

fn addrs(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn assert_refused(m: &Message) {
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert!(m.answers.is_empty() && m.authorities.is_empty());
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn allowed_name_is_learned_before_release_with_clamped_ttl() {
    let h = harness(EGRESS, "").await;
    h.learner.delay_ms.store(30, Ordering::SeqCst);
    let m = h.udp("api.example.com", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&m), vec![ip("93.184.216.34")]);
    assert_eq!(m.answers[0].ttl, 5, "ttl 1 clamped up to dns.ttl.min");
    assert_eq!(
        *h.learner.log.lock().unwrap(),
        vec!["learn 93.184.216.34".to_string(), "recv".into()]
    );
    let calls = h.learner.calls.lock().unwrap().clone();
    let (slot, _, set, ttl, host) = &calls[0];
    assert_eq!(
        (*slot, *ttl, host.as_str()),
        (SLOT, Duration::from_secs(5), "api.example.com")
    );
    assert_eq!(set.count, 1);
    let r = set.rules[0];
    assert_eq!(
        (r.port_lo, r.port_hi, r.proto_mask, r.rule_id),
        (443, 443, enforcer_common::proto::TCP, 1)
    );
    let ev = h.sink.last();
    assert_eq!(
        (ev.verdict, ev.reason, ev.transport, ev.qtype.as_str()),
        (Verdict::Allow, "allowed", "udp", "A")
    );
    assert_eq!(ev.rule.as_deref(), Some("egress[0] host api.example.com"));
    assert_eq!(ev.answers, vec![ip("93.184.216.34")]);
    assert_eq!(ev.identity.name, "agent");
    assert_eq!(ev.identity.spiffe_id.as_deref(), Some("spiffe://t/agent"));

    let m = h.udp("API.Example.COM.", RecordType::AAAA).await;
    assert_eq!(addrs(&m), vec![ip("2606:4700::1")]);
    assert_eq!(m.answers[0].ttl, 300, "clamped down to dns.ttl.max");
    assert_eq!(
        h.learner.calls.lock().unwrap()[1].3,
        Duration::from_secs(300)
    );
}

#[tokio::test]
async fn disallowed_name_is_refused_and_never_forwarded() {
    let h = harness(EGRESS, "").await;
    for name in [
        "secret123.attacker.example",
        "example.com",
        "example.com.evil.org",
    ] {
        let m = h.udp(name, RecordType::A).await;
        assert_refused(&m);
        let ev = h.sink.last();
        assert_eq!((ev.verdict, ev.reason), (Verdict::Deny, "name-not-allowed"));
        assert_eq!(ev.rule, None);
    }
    assert!(h.up.names().is_empty(), "{:?}", h.up.names());
    assert!(h.learner.ips().is_empty());
}

#[tokio::test]
async fn cname_chain_is_followed_and_unrelated_addresses_are_not_learned() {
    let h = harness(EGRESS, "").await;
    let m = h.udp("www.example.com", RecordType::A).await;
    assert_eq!(addrs(&m), vec![ip("93.184.216.35"), ip("1.2.3.4")]);
    assert_eq!(m.answers.len(), 4, "the answer is otherwise intact");
    assert_eq!(h.learner.ips(), vec![ip("93.184.216.35")]);
    // `www.example.com` has its own rule (all ports, any protocol, id 2).
    let set = h.learner.calls.lock().unwrap()[0].2;
    assert_eq!(
        (
            set.rules[0].port_lo,
            set.rules[0].port_hi,
            set.rules[0].rule_id
        ),
        (0, 65535, 2)
    );
}

#[tokio::test]
async fn txt_is_refused_unless_allowed_and_a_swap_keeps_the_port() {
    let h = harness(EGRESS, "").await;
    for t in [
        RecordType::TXT,
        RecordType::NULL,
        RecordType::ANY,
        RecordType::MX,
    ] {
        assert_refused(&h.udp("api.example.com", t).await);
        assert_eq!(h.sink.last().reason, "query-type");
    }
    assert!(h.up.names().is_empty());
    let p = policy(EGRESS, "    queryTypes: [A, aaaa, txt]\n", h.up.addr);
    let port = h.proxy.serve_identity(SLOT, p).await.unwrap();
    assert_eq!(port, h.port);
    assert_eq!(h.proxy.port(SLOT), Some(h.port));
    let m = h.udp("api.example.com", RecordType::TXT).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(matches!(m.answers[0].data, RData::TXT(_)));
    assert_eq!(m.answers[0].ttl, 60);
    assert!(h.learner.ips().is_empty(), "TXT carries no address");
    assert_refused(&h.udp("api.example.com", RecordType::NULL).await);
}

#[tokio::test]
async fn a_reload_swaps_the_policy_and_forgets_in_one_step() {
    let h = harness(EGRESS, "").await;
    // Not served: nothing swapped, nothing forgotten.
    let forgotten = AtomicBool::new(false);
    let p = policy(EGRESS, "    queryTypes: [A, aaaa, txt]\n", h.up.addr);
    assert!(!h.proxy.replace_policy(SLOT + 7, p.clone(), || forgotten
        .store(true, Ordering::SeqCst)));
    assert!(!forgotten.load(Ordering::SeqCst));
    // Served: the new policy judges the next query, and the forget ran
    // (here: the learner's epoch advanced) while it was swapped in.
    let learner = h.learner.clone();
    assert!(h.proxy.replace_policy(SLOT, p, || {
        learner.epoch.fetch_add(1, Ordering::SeqCst);
    }));
    let m = h.udp("api.example.com", RecordType::TXT).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    // A query after the reload learns under the new epoch.
    let m = h.udp("api.example.com", RecordType::A).await;
    assert_eq!(addrs(&m), vec![ip("93.184.216.34")]);
    assert_eq!(h.learner.ips(), vec![ip("93.184.216.34")]);
}

#[tokio::test]
async fn too_long_names_are_refused() {
    let h = harness(EGRESS, "    maxQueryLength: 30\n").await;
    let name = format!("{}.example.com", "a".repeat(18)); // 30 characters
    assert_eq!(name.len(), 30);
    let m = h.udp(&name, RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let m = h.udp(&format!("b{name}"), RecordType::A).await;
    assert_refused(&m);
    assert_eq!(h.sink.last().reason, "too-long");
    assert_eq!(h.up.names(), vec![name]);
}

#[tokio::test]
async fn budget_cuts_off_after_n_distinct_names() {
    let h = harness(EGRESS, "    namesPerMinute: 3\n").await;
    for n in ["a", "b", "a", "c", "b"] {
        let m = h.udp(&format!("{n}.example.com"), RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{n}");
    }
    let m = h.udp("d.example.com", RecordType::A).await;
    assert_refused(&m);
    let ev = h.sink.last();
    assert_eq!((ev.verdict, ev.reason), (Verdict::Deny, "budget"));
    assert_eq!(ev.rule.as_deref(), Some("egress[3] host *.example.com"));
    // Seen names still resolve; other rules have their own budget.
    assert_eq!(
        h.udp("c.example.com", RecordType::A)
            .await
            .metadata
            .response_code,
        ResponseCode::NXDomain
    );
    assert_eq!(
        addrs(&h.udp("api.example.com", RecordType::A).await).len(),
        1
    );
    assert!(!h.up.names().contains(&"d.example.com".to_string()));
    let budget = h
        .sink
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.reason == "budget")
        .count();
    assert_eq!(budget, 1);
}

#[tokio::test]
async fn rebinding_addresses_are_stripped_unless_a_cidr_covers_them() {
    let h = harness(EGRESS, "").await;
    let m = h.udp("rebind.example.com", RecordType::A).await;
    assert_eq!(addrs(&m), vec![ip("93.184.216.36")]);
    assert_eq!(h.learner.ips(), vec![ip("93.184.216.36")]);
    let ev = h.sink.last();
    assert_eq!(
        ev.rebinding_blocked,
        vec![ip("127.0.0.1"), ip("10.1.2.3"), ip("169.254.169.254")]
    );
    assert_eq!(ev.verdict, Verdict::Allow);
    let m = h.udp("rebind.example.com", RecordType::AAAA).await;
    assert!(addrs(&m).is_empty());
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(h.sink.last().rebinding_blocked.len(), 2);

    let egress = format!("{EGRESS}    - cidr: 10.0.0.0/8\n    - cidr: ::ffff:192.168.0.0/112\n");
    let h = harness(&egress, "").await;
    let m = h.udp("rebind.example.com", RecordType::A).await;
    assert_eq!(addrs(&m), vec![ip("10.1.2.3"), ip("93.184.216.36")]);
    assert_eq!(h.learner.ips(), vec![ip("10.1.2.3"), ip("93.184.216.36")]);
    let m = h.udp("rebind.example.com", RecordType::AAAA).await;
    assert_eq!(addrs(&m), vec![ip("::ffff:192.168.0.1")]);
}

/// `mode: audit` refuses nothing: rebinding addresses stay in the reply
/// (a discovery run must not break an agent whose services are internal),
/// are reported as they would have been stripped, and are never installed.
#[tokio::test]
async fn audit_mode_keeps_rebinding_addresses_and_reports_them() {
    let h = harness_with(|up| {
        let mut p = (*policy(EGRESS, "", up)).clone();
        p.audit = true;
        Arc::new(p)
    })
    .await;
    let m = h.udp("rebind.example.com", RecordType::A).await;
    assert_eq!(
        addrs(&m),
        vec![
            ip("127.0.0.1"),
            ip("10.1.2.3"),
            ip("169.254.169.254"),
            ip("93.184.216.36")
        ]
    );
    let ev = h.sink.last();
    assert_eq!(
        ev.rebinding_blocked,
        vec![ip("127.0.0.1"), ip("10.1.2.3"), ip("169.254.169.254")]
    );
    assert_eq!(
        h.learner.ips(),
        vec![ip("93.184.216.36")],
        "only the public one"
    );
}

#[tokio::test]
async fn malformed_messages_are_dropped_and_counted() {
    let h = harness(EGRESS, "").await;
    let good = query_bytes(9, "api.example.com", RecordType::A, false);
    let mut response = Message::from_vec(&good).unwrap();
    response.metadata.message_type = MessageType::Response;
    // Queries that carry records: parsed, each would cost memory while it
    // waits for its upstream (compression pointers make a record a few
    // bytes on the wire).
    let mut with_answer = Message::from_vec(&good).unwrap();
    with_answer.add_answer(rec(
        "api.example.com",
        60,
        RData::A("93.184.216.34".parse().unwrap()),
    ));
    let mut two_additional = Message::from_vec(&good).unwrap();
    for _ in 0..2 {
        two_additional.add_additional(rec(
            "api.example.com",
            60,
            RData::A("93.184.216.34".parse().unwrap()),
        ));
    }
    let garbage: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff],
        vec![0xab; 11],
        vec![0x5a; 512],
        good[..good.len() - 3].to_vec(),
        good[..12].iter().chain([0x3f].iter()).copied().collect(),
        response.to_vec().unwrap(),
        with_answer.to_vec().unwrap(),
        two_additional.to_vec().unwrap(),
        // Well formed, but longer than any query needs.
        padded(&good, message::MAX_QUERY_BYTES),
    ];
    // A padded query within the bound is answered.
    let fits = padded(&good, message::MAX_QUERY_BYTES - good.len() - 15);
    assert!(fits.len() <= message::MAX_QUERY_BYTES);
    let m = Message::from_vec(
        &udp_raw(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            h.port,
            &fits,
            Duration::from_secs(5),
        )
        .await
        .expect("a padded query is answered"),
    )
    .unwrap();
    assert_eq!(addrs(&m), vec![ip("93.184.216.34")]);
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    for g in &garbage {
        assert!(udp_raw(lo, h.port, g, Duration::from_millis(200))
            .await
            .is_none());
    }
    assert_eq!(
        h.sink.malformed.load(Ordering::SeqCst),
        garbage.len() as u64
    );
    // TCP: a garbage message is dropped, the connection keeps serving.
    let mut s = TcpStream::connect(("127.0.0.1", h.port)).await.unwrap();
    s.write_all(&[0, 3, 1, 2, 3]).await.unwrap();
    let q = query_bytes(10, "api.example.com", RecordType::A, false);
    let mut out = (q.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(&q);
    s.write_all(&out).await.unwrap();
    let len = s.read_u16().await.unwrap();
    let mut b = vec![0u8; usize::from(len)];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(Message::from_vec(&b).unwrap().metadata.id, 10);
    // A connection cut inside a message counts too.
    let mut s = TcpStream::connect(("127.0.0.1", h.port)).await.unwrap();
    s.write_all(&[0, 40, 1, 2]).await.unwrap();
    drop(s);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        h.sink.malformed.load(Ordering::SeqCst),
        garbage.len() as u64 + 2
    );
    // A length no query has: closed at once, nothing read or kept for it.
    let mut s = TcpStream::connect(("127.0.0.1", h.port)).await.unwrap();
    s.write_all(&4000u16.to_be_bytes()).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    assert_eq!(
        h.sink.malformed.load(Ordering::SeqCst),
        garbage.len() as u64 + 3
    );
    // Still serving over UDP.
    assert_eq!(
        addrs(&h.udp("api.example.com", RecordType::A).await).len(),
        1
    );
    assert!(h
        .sink
        .events
        .lock()
        .unwrap()
        .iter()
        .all(|e| e.reason != "malformed"));
}

#[tokio::test]
async fn tcp_clients_are_forwarded_over_tcp() {
    let h = harness(EGRESS, "").await;
    let m = h.tcp("api.example.com", RecordType::A).await;
    assert_eq!(addrs(&m), vec![ip("93.184.216.34")]);
    assert_eq!(h.up.transports(), vec!["tcp"]);
    assert_eq!(h.learner.ips(), vec![ip("93.184.216.34")]);
    assert_eq!(h.sink.last().transport, "tcp");
    assert_refused(&h.tcp("evil.example.org", RecordType::A).await);
}

#[tokio::test]
async fn truncated_upstream_answers_are_retried_over_tcp() {
    let h = harness(EGRESS, "").await;
    let m = h.udp("tc.example.com", RecordType::A).await;
    assert!(!m.metadata.truncation);
    assert_eq!(addrs(&m), vec![ip("93.184.216.37")]);
    assert_eq!(h.up.transports(), vec!["udp", "tcp"]);
    assert_eq!(h.learner.ips(), vec![ip("93.184.216.37")]);
}

/// The owner names of `m`'s answer records, as sent.
fn owners(m: &Message) -> Vec<String> {
    m.answers.iter().map(|r| r.name.to_ascii()).collect()
}

#[tokio::test]
async fn mixed_case_names_go_upstream_in_lower_case() {
    // The case pattern of an allowed name ("0x20 encoding") would carry a
    // bit per letter to the upstream: only the canonical name goes there,
    // and the client still gets its question, in its spelling, answered.
    let h = harness(EGRESS, "").await;
    let m = h.udp("aPi.ExAmple.COM", RecordType::A).await;
    assert_eq!(addrs(&m), vec![ip("93.184.216.34")]);
    assert_eq!(owners(&m), vec!["aPi.ExAmple.COM."]);
    let m = h.udp("WwW.eXample.com", RecordType::A).await;
    assert_eq!(addrs(&m), vec![ip("93.184.216.35"), ip("1.2.3.4")]);
    assert_eq!(
        owners(&m),
        vec![
            "e1.cdn.example.net.",
            "edge.cdn.example.net.",
            "WwW.eXample.com.",
            "other.example.org."
        ],
        "only the queried name's records take the client's spelling"
    );
    let m = h.udp("TC.example.COM", RecordType::A).await;
    assert_eq!(addrs(&m), vec![ip("93.184.216.37")]);
    let m = h.tcp("API.EXAMPLE.COM", RecordType::AAAA).await;
    assert!(m.queries[0]
        .name()
        .eq_case(&Name::from_ascii("API.EXAMPLE.COM.").unwrap()));
    assert_eq!(addrs(&m), vec![ip("2606:4700::1")]);
    assert_eq!(
        h.up.raw_names(),
        vec![
            "api.example.com",
            "www.example.com",
            "tc.example.com",
            "tc.example.com",
            "api.example.com"
        ]
    );
    assert_eq!(h.up.transports(), vec!["udp", "udp", "udp", "tcp", "tcp"]);
    assert_eq!(
        h.learner.ips(),
        vec![
            ip("93.184.216.34"),
            ip("93.184.216.35"),
            ip("93.184.216.37"),
            ip("2606:4700::1")
        ],
        "learned through the CNAME chain as well"
    );
    let hosts: Vec<String> = h
        .learner
        .calls
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.4.clone())
        .collect();
    assert_eq!(
        hosts,
        vec![
            "api.example.com",
            "www.example.com",
            "tc.example.com",
            "api.example.com"
        ]
    );
    assert_eq!(h.sink.last().qname, "api.example.com");

    // Byte for byte: the reply's question section is the client's.
    let q = query_bytes(0x0b0b, "aPI.exAMPLE.cOm", RecordType::A, false);
    let r = udp_raw(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        h.port,
        &q,
        Duration::from_secs(5),
    )
    .await
    .expect("a reply");
    assert_eq!(&r[..2], &q[..2]);
    assert_eq!(&r[4..6], &q[4..6], "one question");
    assert_eq!(&r[12..q.len()], &q[12..], "the question, as asked");
    assert_eq!(h.up.raw_names().last().unwrap(), "api.example.com");
}

#[tokio::test]
async fn case_variants_of_a_name_are_one_name_in_the_budget() {
    let h = harness(EGRESS, "    namesPerMinute: 1\n").await;
    for n in [
        "a.example.com",
        "A.example.com",
        "a.EXAMPLE.COM",
        "A.ExAmPlE.cOm",
    ] {
        let m = h.udp(n, RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{n}");
        assert_eq!(h.sink.last().reason, "allowed", "{n}");
    }
    assert_refused(&h.udp("B.example.com", RecordType::A).await);
    assert_eq!(h.sink.last().reason, "budget");
    assert_eq!(h.up.raw_names(), vec!["a.example.com"; 4]);
}

#[tokio::test]
async fn ipv6_loopback_is_served_on_the_same_port() {
    let h = harness(EGRESS, "").await;
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        return; // no IPv6 on this host
    }
    let m = h
        .udp_at(
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            "api.example.com",
            RecordType::A,
        )
        .await;
    assert_eq!(addrs(&m), vec![ip("93.184.216.34")]);
    TcpStream::connect(("::1", h.port)).await.unwrap();
}

#[tokio::test]
async fn next_upstream_after_a_timeout() {
    // A socket that never answers, then the real upstream.
    let dead = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let h = harness(EGRESS, "").await;
    let mut p = (*policy(EGRESS, "", h.up.addr)).clone();
    p.upstreams.insert(0, dead.local_addr().unwrap());
    h.proxy.serve_identity(SLOT, Arc::new(p)).await.unwrap();
    let t = std::time::Instant::now();
    let m = h.udp("api.example.com", RecordType::A).await;
    assert_eq!(addrs(&m).len(), 1);
    assert!(t.elapsed() >= Duration::from_millis(1900));

    // No upstream answers at all: SERVFAIL, reported as upstream-error.
    let mut p = (*policy(EGRESS, "", h.up.addr)).clone();
    p.upstreams = vec![dead.local_addr().unwrap()];
    h.proxy.serve_identity(SLOT, Arc::new(p)).await.unwrap();
    let m = h.udp("api.example.com", RecordType::AAAA).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    let ev = h.sink.last();
    assert_eq!((ev.verdict, ev.reason), (Verdict::Allow, "upstream-error"));
}

#[tokio::test]
async fn a_query_in_flight_across_a_reload_is_judged_by_the_new_policy() {
    // The first upstream never answers: a query is in flight for 2 s,
    // during which the policy is replaced (and what the identity learned
    // forgotten, here: the learner's epoch advances). Its answer, from the
    // second upstream, is judged again by the policy in force.
    let dead = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let h = harness(EGRESS, "").await;
    let with_dead = |egress: &str| {
        let mut p = (*policy(egress, "", h.up.addr)).clone();
        p.upstreams.insert(0, dead.local_addr().unwrap());
        Arc::new(p)
    };
    h.proxy
        .serve_identity(SLOT, with_dead(EGRESS))
        .await
        .unwrap();
    let reload = |egress: &'static str| {
        let p = with_dead(egress);
        let proxy = &h.proxy;
        let learner = h.learner.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(proxy.replace_policy(SLOT, p, || {
                learner.epoch.fetch_add(1, Ordering::SeqCst);
            }));
        }
    };
    // The new policy allows the name too: answered, learned under the new
    // epoch.
    let (m, ()) = tokio::join!(h.udp("api.example.com", RecordType::A), reload(EGRESS));
    assert_eq!(addrs(&m), vec![ip("93.184.216.34")]);
    assert_eq!(h.learner.ips(), vec![ip("93.184.216.34")]);
    // The new policy no longer allows it: refused, nothing learned.
    let (m, ()) = tokio::join!(
        h.udp("www.example.com", RecordType::A),
        reload("    - host: other.example.org\n")
    );
    assert_refused(&m);
    assert_eq!(h.learner.ips(), vec![ip("93.184.216.34")], "nothing more");
    let ev = h.sink.last();
    assert_eq!((ev.verdict, ev.reason), (Verdict::Deny, "name-not-allowed"));
}

#[tokio::test]
async fn a_failing_learner_gives_servfail() {
    let h = harness(EGRESS, "").await;
    h.learner.fail.store(true, Ordering::SeqCst);
    let m = h.udp("api.example.com", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(m.answers.is_empty());
    let ev = h.sink.last();
    assert_eq!((ev.verdict, ev.reason), (Verdict::Deny, "learn-error"));
}

#[tokio::test]
async fn audit_mode_forwards_and_reports_would_be_refusals() {
    let up = upstream().await;
    let mut p = (*policy(EGRESS, "", up.addr)).clone();
    p.audit = true;
    let learner = Arc::new(FakeLearner::default());
    let sink = Arc::new(RecSink::default());
    let proxy = DnsProxy::new(learner.clone(), sink.clone(), Arc::new(NeverTainted));
    let port = proxy.serve_identity(1, Arc::new(p)).await.unwrap();
    let q = query_bytes(1, "evil.example.org", RecordType::A, false);
    let r = udp_raw(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        port,
        &q,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(
        Message::from_vec(&r).unwrap().metadata.response_code,
        ResponseCode::NXDomain
    );
    let ev = sink.last();
    assert_eq!(
        (ev.verdict, ev.reason),
        (Verdict::Audit, "name-not-allowed")
    );
    assert_eq!(up.names(), vec!["evil.example.org"]);
    assert!(ev.answered.is_empty(), "NXDOMAIN: no addresses");

    // A would-be refused name that resolves: the reply carries its address,
    // the record names it (`answered`, for `enforcer policy learn`), and
    // nothing is learned.
    let q = query_bytes(2, "b.example", RecordType::A, false);
    let r = udp_raw(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        port,
        &q,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(Message::from_vec(&r).unwrap().answers.len(), 1);
    let ev = sink.last();
    assert_eq!(
        (ev.qname.as_str(), ev.verdict),
        ("b.example", Verdict::Audit)
    );
    assert_eq!(ev.answered, vec![IpAddr::from([203, 0, 113, 2])]);
    assert!(ev.answers.is_empty());
    assert!(learner.calls.lock().unwrap().is_empty(), "nothing learned");
}

#[tokio::test]
async fn stopped_identities_are_not_served() {
    let h = harness(EGRESS, "").await;
    h.proxy.stop_identity(SLOT);
    assert_eq!(h.proxy.port(SLOT), None);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let q = query_bytes(1, "api.example.com", RecordType::A, false);
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    assert!(udp_raw(lo, h.port, &q, Duration::from_millis(300))
        .await
        .is_none());
    assert!(h.learner.ips().is_empty());
}

#[tokio::test]
async fn identities_are_isolated() {
    let h = harness(EGRESS, "").await;
    let other = policy("    - host: other.example.org\n", "", h.up.addr);
    let port2 = h.proxy.serve_identity(SLOT + 1, other).await.unwrap();
    assert_ne!(port2, h.port);
    let q = query_bytes(1, "api.example.com", RecordType::A, false);
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let r = udp_raw(lo, port2, &q, Duration::from_secs(5))
        .await
        .unwrap();
    assert_refused(&Message::from_vec(&r).unwrap());
    assert_eq!(h.sink.last().slot, SLOT + 1);
    assert!(h.up.names().is_empty());
}

#[tokio::test]
async fn forwarded_queries_are_rebuilt() {
    // Extra records of the agent's query are malformed (nothing is
    // forwarded); EDNS options never leave the proxy: the upstream gets only
    // the question (and a bare OPT record).
    let up_sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let up_addr = up_sock.local_addr().unwrap();
    let learner = Arc::new(FakeLearner::default());
    let sink = Arc::new(RecSink::default());
    let proxy = DnsProxy::new(learner, sink.clone(), Arc::new(NeverTainted));
    let port = proxy
        .serve_identity(1, policy(EGRESS, "", up_addr))
        .await
        .unwrap();
    let mut m = Message::new(77, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(
        Name::from_ascii("api.example.com.").unwrap(),
        RecordType::A,
    ));
    let bare = m.to_vec().unwrap();
    m.add_additional(rec(
        "x.example.com",
        1,
        RData::TXT(TXT::new(vec!["the-secret".into()])),
    ));
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client
        .send_to(&m.to_vec().unwrap(), ("127.0.0.1", port))
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), up_sock.recv_from(&mut buf))
            .await
            .is_err(),
        "a query with an extra record went upstream"
    );
    assert_eq!(sink.malformed.load(Ordering::SeqCst), 1);
    // An EDNS option (experimental code 65001) carrying the secret.
    client
        .send_to(
            &with_edns_option(&bare, 65001, b"the-secret"),
            ("127.0.0.1", port),
        )
        .await
        .unwrap();
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), up_sock.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let fwd = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(fwd.queries.len(), 1);
    assert!(fwd.additionals.is_empty() && fwd.answers.is_empty() && fwd.authorities.is_empty());
    assert!(fwd
        .edns
        .as_ref()
        .is_some_and(|e| e.options().as_ref().is_empty()));
    assert!(!buf[..n].windows(10).any(|w| w == b"the-secret"));
}

// ---------------------------------------------------------------- taint clamp

/// A host rule for `a.example` (all ports).
const TAINT_EGRESS: &str = "    - host: a.example\n";
/// A taint file and an onTaint section allowing `b.example` port 443.
const TAINT_REST: &str = "  files:\n    - path: /home/agent/.ssh\n      access: taint\n  \
                          onTaint:\n    egress:\n      - host: b.example\n        ports: [443]\n";
/// A taint file and no onTaint section.
const TAINT_FILES_ONLY: &str = "  files:\n    - path: /home/agent/.ssh\n      access: taint\n";

#[tokio::test]
async fn taint_clamps_names_to_on_taint_rules() {
    let h = harness_with(|up| policy_with(TAINT_EGRESS, "", TAINT_REST, up)).await;

    // Clean: the policy's own rules.
    let m = h.udp("a.example", RecordType::A).await;
    assert_eq!(addrs(&m), vec![ip("198.51.100.1")]);
    let calls = h.learner.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1);
    let (slot, learned, set, _, host) = &calls[0];
    assert_eq!(
        (*slot, *learned, host.as_str()),
        (SLOT, ip("198.51.100.1"), "a.example")
    );
    assert_eq!(
        (
            set.count,
            set.rules[0].port_lo,
            set.rules[0].port_hi,
            set.rules[0].rule_id
        ),
        (1, 0, 65535, 1)
    );
    let ev = h.sink.last();
    assert_eq!(
        (ev.verdict, ev.reason, ev.tainted),
        (Verdict::Allow, "allowed", false)
    );
    assert_eq!(ev.rule.as_deref(), Some("egress[0] host a.example"));

    assert_refused(&h.udp("b.example", RecordType::A).await);
    let ev = h.sink.last();
    assert_eq!(
        (ev.verdict, ev.reason, ev.tainted),
        (Verdict::Deny, "name-not-allowed", false)
    );
    assert_eq!(h.up.names(), vec!["a.example"]);

    // Tainted: the onTaint rules only.
    h.taint.taint();
    assert_refused(&h.udp("a.example", RecordType::A).await);
    let ev = h.sink.last();
    assert_eq!(
        (ev.verdict, ev.reason, ev.tainted),
        (Verdict::Deny, "tainted", true)
    );
    assert_eq!(ev.rule, None);
    assert_refused(&h.tcp("a.example", RecordType::A).await);
    assert_eq!(h.sink.last().reason, "tainted");
    assert_eq!(
        h.up.names(),
        vec!["a.example"],
        "never forwarded once tainted"
    );

    let m = h.udp("b.example", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&m), vec![ip("203.0.113.2")]);
    let calls = h.learner.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "{calls:?}");
    let (slot, learned, set, ttl, host) = &calls[1];
    assert_eq!(
        (*slot, *learned, *ttl, host.as_str()),
        (
            SLOT | TAINT_SLOT_BIT,
            ip("203.0.113.2"),
            Duration::from_secs(30),
            "b.example"
        )
    );
    assert_eq!(set.count, 1);
    let r = set.rules[0];
    assert_eq!(
        (r.port_lo, r.port_hi, r.proto_mask, r.rule_id),
        (443, 443, enforcer_common::proto::ANY, TAINT_BASE + 1)
    );
    let ev = h.sink.last();
    assert_eq!(
        (ev.verdict, ev.reason, ev.tainted),
        (Verdict::Allow, "allowed", true)
    );
    assert_eq!(ev.rule.as_deref(), Some("onTaint.egress[0] host b.example"));
    assert_eq!(ev.answers, vec![ip("203.0.113.2")]);
    assert_eq!(h.up.names(), vec!["a.example", "b.example"]);
    assert!(h.taint.asked.lock().unwrap().iter().all(|s| *s == SLOT));
}

#[tokio::test]
async fn taint_without_on_taint_refuses_every_name() {
    let h = harness_with(|up| policy_with(TAINT_EGRESS, "", TAINT_FILES_ONLY, up)).await;
    let m = h.udp("a.example", RecordType::A).await;
    assert_eq!(addrs(&m), vec![ip("198.51.100.1")]);
    h.taint.taint();
    for name in ["a.example", "b.example", "api.example.com"] {
        for t in [RecordType::A, RecordType::AAAA] {
            assert_refused(&h.udp(name, t).await);
            let ev = h.sink.last();
            assert_eq!(
                (ev.verdict, ev.reason, ev.tainted),
                (Verdict::Deny, "tainted", true),
                "{name} {t}"
            );
        }
    }
    assert_eq!(h.up.names(), vec!["a.example"]);
    assert_eq!(h.learner.ips(), vec![ip("198.51.100.1")]);
}

#[tokio::test]
async fn tainted_rebinding_is_vouched_by_on_taint_cidrs_only() {
    let egress = "    - host: rebind.example.com\n    - cidr: 10.0.0.0/8\n";
    let rest = "  onTaint:\n    egress:\n      - host: rebind.example.com\n      \
                - cidr: 127.0.0.0/8\n";
    let h = harness_with(|up| policy_with(egress, "", rest, up)).await;
    let m = h.udp("rebind.example.com", RecordType::A).await;
    assert_eq!(addrs(&m), vec![ip("10.1.2.3"), ip("93.184.216.36")]);
    h.taint.taint();
    let m = h.udp("rebind.example.com", RecordType::A).await;
    assert_eq!(addrs(&m), vec![ip("127.0.0.1"), ip("93.184.216.36")]);
    let ev = h.sink.last();
    assert!(ev.tainted);
    assert_eq!(
        ev.rebinding_blocked,
        vec![ip("10.1.2.3"), ip("169.254.169.254")]
    );
    let calls = h.learner.calls.lock().unwrap().clone();
    let all: Vec<(u32, IpAddr)> = calls.iter().map(|c| (c.0, c.1)).collect();
    assert_eq!(
        all,
        vec![
            (SLOT, ip("10.1.2.3")),
            (SLOT, ip("93.184.216.36")),
            // Before the taint, ahead of it: the onTaint rules allow the
            // name; 10.1.2.3 is not vouched for by an onTaint cidr rule.
            (SLOT | TAINT_SLOT_BIT, ip("93.184.216.36")),
            (SLOT | TAINT_SLOT_BIT, ip("127.0.0.1")),
            (SLOT | TAINT_SLOT_BIT, ip("93.184.216.36"))
        ]
    );
    assert_eq!(calls[2].2.rules[0].rule_id, TAINT_BASE + 1);
    assert_eq!(calls[3].2.rules[0].rule_id, TAINT_BASE + 1);
}

#[tokio::test]
async fn tainted_audit_mode_forwards_and_reports() {
    let h = harness_with(|up| {
        let mut p = (*policy_with(TAINT_EGRESS, "", TAINT_REST, up)).clone();
        p.audit = true;
        Arc::new(p)
    })
    .await;
    h.taint.taint();
    let m = h.udp("a.example", RecordType::A).await;
    assert_eq!(addrs(&m), vec![ip("198.51.100.1")]);
    let ev = h.sink.last();
    assert_eq!(
        (ev.verdict, ev.reason, ev.tainted),
        (Verdict::Audit, "tainted", true)
    );
    assert!(
        h.learner.ips().is_empty(),
        "no onTaint rule: nothing learned"
    );
    let m = h.udp("b.example", RecordType::A).await;
    assert_eq!(addrs(&m), vec![ip("203.0.113.2")]);
    assert_eq!(h.sink.last().verdict, Verdict::Allow);
    assert_eq!(h.learner.calls.lock().unwrap()[0].0, SLOT | TAINT_SLOT_BIT);
    assert_eq!(h.up.names(), vec!["a.example", "b.example"]);
}

#[tokio::test]
async fn without_a_taint_clamp_the_taint_view_is_not_asked() {
    let h = harness(EGRESS, "").await;
    h.taint.taint();
    let m = h.udp("api.example.com", RecordType::A).await;
    assert_eq!(addrs(&m), vec![ip("93.184.216.34")]);
    assert_eq!(h.learner.calls.lock().unwrap()[0].0, SLOT);
    assert!(!h.sink.last().tainted);
    assert!(h.taint.asked.lock().unwrap().is_empty());
}

/// Load check (run in release: `cargo test --release -p enforcer --lib
/// dns::tests::throughput -- --ignored --nocapture`): closed-loop clients
/// against a loopback upstream, directly and through the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load check, run by hand in release"]
async fn throughput() {
    let h = harness(EGRESS, "").await;
    async fn run(target: SocketAddr, clients: usize, secs: u64) -> (f64, Duration, Duration) {
        let q = query_bytes(1, "api.example.com", RecordType::A, true);
        let until = std::time::Instant::now() + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let q = q.clone();
            tasks.push(tokio::spawn(async move {
                let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                s.connect(target).await.unwrap();
                let mut lat = Vec::new();
                let mut buf = vec![0u8; 2048];
                while std::time::Instant::now() < until {
                    let t = std::time::Instant::now();
                    s.send(&q).await.unwrap();
                    if tokio::time::timeout(Duration::from_secs(1), s.recv(&mut buf))
                        .await
                        .is_ok()
                    {
                        lat.push(t.elapsed());
                    }
                }
                lat
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.unwrap());
        }
        lat.sort();
        let qps = lat.len() as f64 / secs as f64;
        (qps, lat[lat.len() / 2], lat[lat.len() * 99 / 100])
    }
    let direct = run(h.up.addr, 16, 3).await;
    let proxied = run(SocketAddr::from(([127, 0, 0, 1], h.port)), 16, 3).await;
    println!(
        "direct:  {:.0} q/s, p50 {:?}, p99 {:?}",
        direct.0, direct.1, direct.2
    );
    println!(
        "proxied: {:.0} q/s, p50 {:?}, p99 {:?}",
        proxied.0, proxied.1, proxied.2
    );
    println!("added p99: {:?}", proxied.2.saturating_sub(direct.2));
}

// ---------------------------------------------------------------- pure parts

fn dp(patterns: &[&str]) -> DnsPolicy {
    DnsPolicy {
        identity: IdentityRef {
            name: "t".into(),
            spiffe_id: None,
        },
        policy_hash: String::new(),
        hosts: patterns
            .iter()
            .enumerate()
            .map(|(i, p)| HostRule {
                pattern: (*p).into(),
                rule_id: i as u32 + 1,
                set: Default::default(),
            })
            .collect(),
        upstreams: vec![],
        ttl_min: DEFAULT_TTL_MIN,
        ttl_max: DEFAULT_TTL_MAX,
        max_query_length: 253,
        query_types: DEFAULT_QUERY_TYPES.to_vec(),
        names_per_minute: 64,
        cidrs: vec![],
        audit: false,
        taint_hosts: None,
        taint_cidrs: vec![],
    }
}

#[test]
fn match_host_prefers_exact_then_longest_wildcard() {
    let p = dp(&[
        "*.example.com",
        "api.example.com",
        "*.eu.example.com",
        "*.eu.example.com",
    ]);
    let m = |q: &str| p.match_host(q).map(|h| h.rule_id);
    assert_eq!(m("api.example.com"), Some(2));
    assert_eq!(m("API.EXAMPLE.COM."), Some(2));
    assert_eq!(m("a.example.com"), Some(1));
    assert_eq!(m("a.b.example.com"), Some(1));
    assert_eq!(
        m("x.eu.example.com"),
        Some(3),
        "longer base, first in file order"
    );
    assert_eq!(m("eu.example.com"), Some(1));
    assert_eq!(m("example.com"), None);
    assert_eq!(m(".example.com"), None);
    assert_eq!(m("aexample.com"), None);
    assert_eq!(m("example.com.evil.org"), None);
    assert_eq!(m(""), None);
    assert_eq!(m("."), None);
    assert_eq!(m("é.example.com"), Some(1), "non-ASCII never panics");

    // The onTaint rules are matched the same way.
    let t = DnsPolicy {
        hosts: vec![],
        taint_hosts: Some(p.hosts.clone()),
        ..p.clone()
    };
    for q in [
        "api.example.com",
        "API.EXAMPLE.COM.",
        "a.b.example.com",
        "x.eu.example.com",
        "eu.example.com",
        "example.com",
        "aexample.com",
        "",
        "é.example.com",
    ] {
        assert_eq!(t.match_taint_host(q), p.match_host(q), "{q}");
        assert_eq!(t.match_host(q), None);
        assert_eq!(p.match_taint_host(q), None, "no taint clamp");
    }
}

#[test]
fn compile_dns_defaults_and_fields() {
    let yaml = "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: a\n\
                spec:\n  mode: audit\n  egress:\n    - cidr: ::ffff:10.0.0.0/104\n    \
                - host: x.example\n      ports: [443]\n    - host: x.example\n      \
                protocol: udp\n      ports: [53]\n    - host: '*.y.example'\n";
    let p = parse_str(yaml, Path::new("t.yaml")).unwrap();
    let c = compile(&p[0]).unwrap();
    let d = compile_dns(&p[0], &c);
    assert_eq!(d.hosts.len(), 2);
    assert_eq!(
        (d.hosts[0].pattern.as_str(), d.hosts[0].rule_id),
        ("x.example", 2)
    );
    assert_eq!(d.hosts[0].set.count, 2, "both rules of the pattern");
    assert_eq!(
        (d.hosts[1].pattern.as_str(), d.hosts[1].rule_id),
        ("*.y.example", 4)
    );
    assert_eq!((d.ttl_min, d.ttl_max), (DEFAULT_TTL_MIN, DEFAULT_TTL_MAX));
    assert_eq!(d.max_query_length, 253);
    assert_eq!(d.query_types, vec![RecordType::A, RecordType::AAAA]);
    assert_eq!(d.names_per_minute, 64);
    assert_eq!(d.cidrs, vec![ipnet::IpNet::from_str("10.0.0.0/8").unwrap()]);
    assert!(d.audit);
    assert_eq!(d.identity.name, "a");
    assert_eq!(d.policy_hash, p[0].hash);
    assert!(
        !d.upstreams.is_empty(),
        "from /etc/resolv.conf or 127.0.0.1"
    );
    let _ = DNSClass::IN;
}

#[test]
fn compile_dns_taint_hosts_have_taint_rule_ids() {
    let doc = |rest: &str| {
        let yaml = format!(
            "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: a\n\
             spec:\n  egress:\n    - cidr: 10.0.0.0/8\n    - host: x.example\n{rest}"
        );
        let p = parse_str(&yaml, Path::new("t.yaml")).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        compile_dns(&p[0], &compiled(&p[0]))
    };
    let d = doc(
        "  files:\n    - path: /etc/secret\n      access: taint\n  onTaint:\n    egress:\n      \
         - cidr: ::ffff:192.168.0.0/112\n      - host: b.example\n        ports: [443]\n      \
         - host: b.example\n        protocol: udp\n        ports: [53]\n      \
         - host: '*.c.example'\n",
    );
    assert_eq!(d.hosts.len(), 1);
    assert_eq!(d.hosts[0].rule_id, 2, "own rules keep their ids");
    assert_eq!(d.cidrs, vec![ipnet::IpNet::from_str("10.0.0.0/8").unwrap()]);
    let t = d.taint_hosts.as_ref().expect("a taint clamp");
    assert_eq!(t.len(), 2);
    assert_eq!(
        (t[0].pattern.as_str(), t[0].rule_id),
        ("b.example", TAINT_BASE + 2)
    );
    let set = t[0].set;
    let rules: Vec<(u16, u16, u8, u32)> = set.rules[..set.count as usize]
        .iter()
        .map(|r| (r.port_lo, r.port_hi, r.proto_mask, r.rule_id))
        .collect();
    assert_eq!(
        rules,
        vec![
            (443, 443, enforcer_common::proto::ANY, TAINT_BASE + 2),
            (53, 53, enforcer_common::proto::UDP, TAINT_BASE + 3)
        ]
    );
    assert_eq!(
        (t[1].pattern.as_str(), t[1].rule_id, t[1].set.count),
        ("*.c.example", TAINT_BASE + 4, 1)
    );
    assert_eq!(t[1].set.rules[0].rule_id, TAINT_BASE + 4);
    assert_eq!(
        d.taint_cidrs,
        vec![ipnet::IpNet::from_str("192.168.0.0/16").unwrap()]
    );
    assert_eq!(
        d.match_taint_host("x.c.example").map(|h| h.rule_id),
        Some(TAINT_BASE + 4)
    );
    assert_eq!(d.match_taint_host("x.example"), None);
    assert_eq!(d.match_host("b.example"), None);
    assert_eq!(
        message::rule_text(&t[1]),
        "onTaint.egress[3] host *.c.example"
    );
    assert_eq!(message::rule_text(&d.hosts[0]), "egress[1] host x.example");

    // A taint file without onTaint: nothing is allowed after taint.
    let d = doc("  files:\n    - path: /etc/secret\n      access: taint\n");
    assert_eq!(d.taint_hosts, Some(vec![]));
    assert!(d.taint_cidrs.is_empty());
    // onTaint without a taint file still declares the clamp.
    let d = doc("  onTaint:\n    egress:\n      - host: b.example\n");
    assert_eq!(d.taint_hosts.map(|t| t.len()), Some(1));
    // No taint file, no onTaint: no clamp.
    let d = doc("  files:\n    - path: /etc/secret\n      access: deny\n");
    assert_eq!(d.taint_hosts, None);
    assert_eq!(doc("").taint_hosts, None);
}

#[test]
fn resolv_conf_parsing() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("resolv.conf");
    std::fs::write(
        &f,
        "# comment\nsearch example.com\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\n\
         nameserver   ::1 \nnameserver bogus\noptions ndots:5\n",
    )
    .unwrap();
    assert_eq!(
        resolv_conf_nameservers(&f),
        vec![
            "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
            "[fe80::1]:53".parse().unwrap(),
            "[::1]:53".parse().unwrap()
        ]
    );
    assert_eq!(
        resolv_conf_nameservers(&dir.path().join("missing")),
        vec!["127.0.0.1:53".parse::<SocketAddr>().unwrap()]
    );
}

/// A listener set in a namespace where the identity's port is taken (here:
/// the proxy's own, where the home set holds it) is refused with a reason,
/// not half made; an identity without a proxy is `not-served`.
#[tokio::test]
async fn serve_netns_reports_a_taken_port_and_an_unserved_identity() {
    let h = harness(EGRESS, "").await;
    let own = Arc::new(crate::netns::Netns::open_pid(std::process::id()).unwrap());
    let e = h
        .proxy
        .serve_netns(SLOT + 1, own.clone())
        .await
        .unwrap_err();
    assert_eq!(e.reason, "not-served", "{e}");
    match h.proxy.serve_netns(SLOT, own).await {
        Err(e) if e.reason == "setns" => {} // not root: cannot enter a namespace
        Err(e) => assert_eq!(e.reason, "port-in-use", "{e}"),
        Ok(()) => panic!("the home set's port was bound twice"),
    }
    assert!(h.proxy.netns_of(SLOT).is_empty());
    // The home set still answers.
    let m = h.udp("api.example.com", RecordType::A).await;
    assert_eq!(addrs(&m), vec![ip("93.184.216.34")]);
}

/// An identity already served in as many namespaces as its cap allows is
/// refused with `limit` before anything is bound (here the cap is 0); the
/// home set still answers.
#[tokio::test]
async fn serve_netns_beyond_the_cap_is_refused_with_limit() {
    let up = upstream().await;
    let proxy = DnsProxy::new(
        Arc::new(FakeLearner::default()),
        Arc::new(RecSink::default()),
        Arc::new(FakeTaint::default()),
    )
    .with_netns_limit(0);
    let port = proxy
        .serve_identity(SLOT, policy(EGRESS, "", up.addr))
        .await
        .unwrap();
    assert_eq!(proxy.netns_limit(), 0);
    let own = Arc::new(crate::netns::Netns::open_pid(std::process::id()).unwrap());
    let e = proxy.serve_netns(SLOT, own).await.unwrap_err();
    assert_eq!(e.reason, "limit", "{e}");
    assert!(proxy.netns_of(SLOT).is_empty());
    assert_eq!(proxy.port(SLOT), Some(port));
    assert_eq!(
        super::MAX_NETNS_PER_IDENTITY,
        DnsProxy::new(
            Arc::new(FakeLearner::default()),
            Arc::new(RecSink::default()),
            Arc::new(FakeTaint::default()),
        )
        .netns_limit()
    );
}
