//! A test upstream DNS server on loopback (UDP and TCP on the same port).
//!
//! It serves a small zone that the test configures (A/AAAA addresses, CNAME
//! chains, TXT, suffix wildcards) with one TTL, answers built with
//! `hickory-proto`, and logs every query it received, so that a test can
//! assert that a name the enforcer's proxy refused NEVER reached it (and
//! in what letter case a forwarded name arrived: [`LoggedQuery::raw`]).
//!
//! Threads only (no async runtime): one UDP loop, one TCP accept loop, one
//! thread per TCP connection. Everything stops when the server is dropped.
use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    str::FromStr,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{
        rdata::{A, AAAA, CNAME, TXT},
        Name, RData, Record, RecordType,
    },
};

/// One record of the zone.
#[derive(Clone, Debug)]
pub enum Answer {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Cname(String),
    Txt(String),
}

/// A query the server received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedQuery {
    /// Lower case, without the trailing dot.
    pub name: String,
    /// The name as it arrived (letter case kept), without the trailing dot.
    pub raw: String,
    /// `A`, `AAAA`, `TXT`, `ANY`, ...
    pub qtype: String,
    pub tcp: bool,
    pub from: SocketAddr,
}

#[derive(Default)]
struct Zone {
    names: HashMap<String, Vec<Answer>>,
    /// (suffix without leading dot, answers) for any name strictly under it.
    suffixes: Vec<(String, Vec<Answer>)>,
}

impl Zone {
    fn lookup(&self, name: &str) -> Option<Vec<Answer>> {
        if let Some(a) = self.names.get(name) {
            return Some(a.clone());
        }
        self.suffixes
            .iter()
            .find(|(s, _)| name.len() > s.len() + 1 && name.ends_with(&format!(".{s}")))
            .map(|(_, a)| a.clone())
    }
}

/// The server. Clone-free: share it by reference.
pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    log: Arc<Mutex<Vec<LoggedQuery>>>,
    ttl: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
}

pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl DnsServer {
    /// Bind UDP and TCP on the same free port of 127.0.0.1 and serve.
    pub fn start() -> Self {
        Self::start_on("127.0.0.1".parse().unwrap())
    }

    /// Bind UDP and TCP on the same free port of `ip` and serve.
    pub fn start_on(ip: IpAddr) -> Self {
        let (udp, tcp) = (0..100)
            .find_map(|_| {
                let udp = UdpSocket::bind(SocketAddr::new(ip, 0)).ok()?;
                let tcp = TcpListener::bind(udp.local_addr().ok()?).ok()?;
                Some((udp, tcp))
            })
            .expect("no port free for both UDP and TCP");
        Self::serve(udp, tcp)
    }

    /// Bind UDP and TCP on exactly `addr` and serve (e.g. a fake resolver
    /// at another server's address, in another network namespace).
    pub fn start_at(addr: SocketAddr) -> Self {
        let udp = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("UDP {addr}: {e}"));
        let tcp = TcpListener::bind(addr).unwrap_or_else(|e| panic!("TCP {addr}: {e}"));
        Self::serve(udp, tcp)
    }

    fn serve(udp: UdpSocket, tcp: TcpListener) -> Self {
        let addr = udp.local_addr().unwrap();
        let s = Self {
            addr,
            zone: Default::default(),
            log: Default::default(),
            ttl: Arc::new(AtomicU32::new(60)),
            stop: Default::default(),
        };
        udp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        {
            let (zone, log, ttl, stop) = s.shared();
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = udp.recv_from(&mut buf) else {
                        continue;
                    };
                    if let Some(resp) = answer(&buf[..n], false, from, &zone, &log, &ttl) {
                        let _ = udp.send_to(&resp, from);
                    }
                }
            });
        }
        tcp.set_nonblocking(true).unwrap();
        {
            let (zone, log, ttl, stop) = s.shared();
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((c, from)) => {
                            let (zone, log, ttl) = (zone.clone(), log.clone(), ttl.clone());
                            thread::spawn(move || serve_tcp(c, from, &zone, &log, &ttl));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            });
        }
        s
    }

    #[allow(clippy::type_complexity)]
    fn shared(
        &self,
    ) -> (
        Arc<Mutex<Zone>>,
        Arc<Mutex<Vec<LoggedQuery>>>,
        Arc<AtomicU32>,
        Arc<AtomicBool>,
    ) {
        (
            self.zone.clone(),
            self.log.clone(),
            self.ttl.clone(),
            self.stop.clone(),
        )
    }

    /// `ip:port` as a policy's `dns.upstream` entry wants it.
    pub fn upstream(&self) -> String {
        self.addr.to_string()
    }

    /// TTL of every record served from now on (default 60).
    pub fn set_ttl(&self, secs: u32) -> &Self {
        self.ttl.store(secs, Ordering::SeqCst);
        self
    }

    pub fn add(&self, name: &str, a: Answer) -> &Self {
        self.zone
            .lock()
            .unwrap()
            .names
            .entry(normalize(name))
            .or_default()
            .push(a);
        self
    }

    /// `name` -> one or more IPv4/IPv6 addresses.
    pub fn add_addrs(&self, name: &str, ips: &[&str]) -> &Self {
        for ip in ips {
            match ip.parse::<IpAddr>().expect("an IP address") {
                IpAddr::V4(v4) => self.add(name, Answer::A(v4)),
                IpAddr::V6(v6) => self.add(name, Answer::Aaaa(v6)),
            };
        }
        self
    }

    pub fn add_cname(&self, name: &str, target: &str) -> &Self {
        self.add(name, Answer::Cname(normalize(target)))
    }

    pub fn add_txt(&self, name: &str, text: &str) -> &Self {
        self.add(name, Answer::Txt(text.to_string()))
    }

    /// Every name strictly under `suffix` (e.g. `t.example.com`) answers `ips`.
    pub fn add_suffix(&self, suffix: &str, ips: &[&str]) -> &Self {
        let answers = ips
            .iter()
            .map(|ip| match ip.parse::<IpAddr>().expect("an IP address") {
                IpAddr::V4(v4) => Answer::A(v4),
                IpAddr::V6(v6) => Answer::Aaaa(v6),
            })
            .collect();
        self.zone
            .lock()
            .unwrap()
            .suffixes
            .push((normalize(suffix), answers));
        self
    }

    /// Every query received so far.
    pub fn queries(&self) -> Vec<LoggedQuery> {
        self.log.lock().unwrap().clone()
    }

    /// Queries for `name` (any type) received so far.
    pub fn count(&self, name: &str) -> usize {
        let n = normalize(name);
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|q| q.name == n)
            .count()
    }

    /// The names of every query received so far as they arrived (letter
    /// case kept, no trailing dot).
    pub fn raw_names(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|q| q.raw.clone())
            .collect()
    }

    pub fn saw(&self, name: &str) -> bool {
        self.count(name) > 0
    }

    pub fn saw_type(&self, name: &str, qtype: &str) -> bool {
        let n = normalize(name);
        self.log
            .lock()
            .unwrap()
            .iter()
            .any(|q| q.name == n && q.qtype.eq_ignore_ascii_case(qtype))
    }

    /// The query log, one line per query (for assertion messages).
    pub fn describe(&self) -> String {
        let log = self.log.lock().unwrap();
        let mut s = format!("{} queries at {}:", log.len(), self.addr);
        for q in log.iter().take(200) {
            s.push_str(&format!(
                "\n  {} {} {} from {}",
                if q.tcp { "tcp" } else { "udp" },
                q.qtype,
                q.raw,
                q.from
            ));
        }
        s
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_tcp(
    mut c: TcpStream,
    from: SocketAddr,
    zone: &Mutex<Zone>,
    log: &Mutex<Vec<LoggedQuery>>,
    ttl: &AtomicU32,
) {
    let _ = c.set_nonblocking(false);
    let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
    loop {
        let mut len = [0u8; 2];
        if c.read_exact(&mut len).is_err() {
            return;
        }
        let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
        if c.read_exact(&mut msg).is_err() {
            return;
        }
        let Some(resp) = answer(&msg, true, from, zone, log, ttl) else {
            return;
        };
        let mut out = (resp.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&resp);
        if c.write_all(&out).is_err() {
            return;
        }
    }
}

fn rdata(a: &Answer) -> RData {
    match a {
        Answer::A(ip) => RData::A(A(*ip)),
        Answer::Aaaa(ip) => RData::AAAA(AAAA(*ip)),
        Answer::Cname(t) => RData::CNAME(CNAME(Name::from_str(&format!("{t}.")).unwrap())),
        Answer::Txt(t) => RData::TXT(TXT::new(vec![t.clone()])),
    }
}

fn matches(a: &Answer, qtype: RecordType) -> bool {
    let any = qtype == RecordType::ANY;
    match a {
        Answer::A(_) => any || qtype == RecordType::A,
        Answer::Aaaa(_) => any || qtype == RecordType::AAAA,
        Answer::Txt(_) => any || qtype == RecordType::TXT,
        Answer::Cname(_) => any || qtype == RecordType::CNAME,
    }
}

/// Build the answer to one query message (None: not a parsable query).
fn answer(
    raw: &[u8],
    tcp: bool,
    from: SocketAddr,
    zone: &Mutex<Zone>,
    log: &Mutex<Vec<LoggedQuery>>,
    ttl: &AtomicU32,
) -> Option<Vec<u8>> {
    let req = Message::from_vec(raw).ok()?;
    if req.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.authoritative = true;
    let Some(q) = req.queries.first().cloned() else {
        resp.metadata.response_code = ResponseCode::FormErr;
        return resp.to_vec().ok();
    };
    let raw = q.name.to_ascii();
    let qname = normalize(&raw);
    log.lock().unwrap().push(LoggedQuery {
        name: qname.clone(),
        raw: raw.trim_end_matches('.').to_string(),
        qtype: q.query_type.to_string(),
        tcp,
        from,
    });
    resp.add_query(q.clone());
    if req.metadata.op_code != OpCode::Query {
        resp.metadata.response_code = ResponseCode::NotImp;
        return resp.to_vec().ok();
    }
    let ttl = ttl.load(Ordering::SeqCst);
    let zone = zone.lock().unwrap();
    let mut name = qname;
    let mut found_any = false;
    // Follow CNAMEs inside the zone (at most 8 hops).
    for _ in 0..8 {
        let Some(answers) = zone.lookup(&name) else {
            break;
        };
        found_any = true;
        let owner = Name::from_str(&format!("{name}.")).ok()?;
        let mut next = None;
        for a in &answers {
            if let Answer::Cname(t) = a {
                resp.add_answer(Record::from_rdata(owner.clone(), ttl, rdata(a)));
                if q.query_type != RecordType::CNAME {
                    next = Some(t.clone());
                }
            } else if matches(a, q.query_type) {
                resp.add_answer(Record::from_rdata(owner.clone(), ttl, rdata(a)));
            }
        }
        match next {
            Some(t) => name = t,
            None => break,
        }
    }
    if !found_any {
        resp.metadata.response_code = ResponseCode::NXDomain;
    }
    resp.to_vec().ok()
}
