//! A small authoritative DNS responder on loopback (answers built with
//! hickory-proto) that stands for the real upstream resolver in the demo and
//! the DNS benchmark. It logs the names it was asked, so the demo can show
//! that a refused name never reached it.
use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    str::FromStr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{rdata::A, Name, RData, Record, RecordType},
};

/// name -> IPv4. A name starting with `*.` answers every name under it.
/// An entry with a span > 1 answers the next of `span` consecutive
/// addresses from its base at each query (every answer a fresh address, as
/// a CDN's rotating front ends are).
#[derive(Clone, Default)]
pub struct Zone {
    entries: Vec<(String, Ipv4Addr, u32)>,
    ttl: u32,
    next: Arc<AtomicU64>,
}

impl Zone {
    pub fn new(ttl: u32) -> Self {
        Self {
            ttl,
            ..Self::default()
        }
    }

    pub fn with(self, name: &str, ip: Ipv4Addr) -> Self {
        self.with_rotating(name, ip, 1)
    }

    /// `name` answers `base`, `base + 1`, ... `base + span - 1`, in turn.
    pub fn with_rotating(mut self, name: &str, base: Ipv4Addr, span: u32) -> Self {
        self.entries
            .push((name.to_ascii_lowercase(), base, span.max(1)));
        self
    }

    fn lookup(&self, name: &str) -> Option<Ipv4Addr> {
        self.entries.iter().find_map(|(n, ip, span)| {
            let hit = match n.strip_prefix("*.") {
                Some(suffix) => name.len() > suffix.len() && name.ends_with(&format!(".{suffix}")),
                None => name == n,
            };
            hit.then(|| {
                let k = if *span > 1 {
                    (self.next.fetch_add(1, Ordering::Relaxed) % *span as u64) as u32
                } else {
                    0
                };
                Ipv4Addr::from(u32::from(*ip).wrapping_add(k))
            })
        })
    }
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub answered: Arc<AtomicU64>,
    log: Option<Arc<Mutex<Vec<String>>>>,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    /// Serve `zone` on UDP `bind` with `threads` threads sharing one socket.
    /// With `log`, every query name (and type) is recorded.
    pub fn start(bind: &str, threads: usize, zone: Zone, log: bool) -> Result<Self> {
        let sock =
            UdpSocket::bind(bind).with_context(|| format!("binding the DNS upstream on {bind}"))?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        let me = Self {
            addr: sock.local_addr()?,
            answered: Default::default(),
            log: log.then(Default::default),
            stop: Default::default(),
        };
        let zone = Arc::new(zone);
        for _ in 0..threads.max(1) {
            let sock = sock.try_clone()?;
            let (answered, stop, zone, log) = (
                me.answered.clone(),
                me.stop.clone(),
                zone.clone(),
                me.log.clone(),
            );
            std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    if let Some(resp) = respond(&buf[..n], &zone, log.as_deref()) {
                        if sock.send_to(&resp, from).is_ok() {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        Ok(me)
    }

    /// The queries received so far ("name TYPE"), if logging.
    pub fn queries(&self) -> Vec<String> {
        self.log
            .as_ref()
            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default()
    }

    /// The queries received since the last call (a long run drains the log).
    pub fn take_queries(&self) -> Vec<String> {
        self.log
            .as_ref()
            .map(|l| std::mem::take(&mut *l.lock().unwrap_or_else(|e| e.into_inner())))
            .unwrap_or_default()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn respond(raw: &[u8], zone: &Zone, log: Option<&Mutex<Vec<String>>>) -> Option<Vec<u8>> {
    let req = Message::from_vec(raw).ok()?;
    if req.metadata.message_type != MessageType::Query {
        return None;
    }
    let q = req.queries.first()?.clone();
    let name = q.name.to_ascii().trim_end_matches('.').to_ascii_lowercase();
    if let Some(log) = log {
        log.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("{name} {}", q.query_type));
    }
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.add_query(q.clone());
    match zone.lookup(&name) {
        Some(ip) => {
            if q.query_type == RecordType::A {
                resp.add_answer(Record::from_rdata(
                    Name::from_str(&format!("{name}.")).ok()?,
                    zone.ttl,
                    RData::A(A(ip)),
                ));
            }
        }
        None => resp.metadata.response_code = ResponseCode::NXDomain,
    }
    resp.to_vec().ok()
}
