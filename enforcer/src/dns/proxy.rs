//! The proxy's sockets and tasks.
//!
//! Per served identity:
//! - one UDP socket on 127.0.0.1 and one on [::1] (same port), each read by
//!   one task in a loop. Malformed and refused queries are answered inline
//!   (no task, no upstream traffic); an allowed query gets one spawned task
//!   that waits for the upstream answer, learns, and replies from the socket
//!   the query came in on;
//! - one TCP listener on each of the two addresses; each connection is a
//!   task (at most [`MAX_TCP_CONNS`] per listener) answering its queries in
//!   order, forwarding over TCP;
//! - one upstream UDP socket per address family, shared by all queries of
//!   the identity, read by one task that hands each answer to the waiting
//!   query by message id (a pending map; ids are random, an answer must come
//!   from the upstream address the query went to). No per-query socket.
//!   Truncated (TC) upstream answers are retried over TCP, one connection per
//!   retry.
//!
//! Network namespaces: the kernel steers to `127.0.0.1:<port>` in the
//! *caller's* network namespace. The set above (the "home" set) serves the
//! proxy's own namespace; [`DnsProxy::serve_netns`] adds, for one identity,
//! the same listeners (same port, same per-identity logic, budget and
//! policy) inside another namespace (a Kubernetes pod's), created there on a
//! short-lived thread ([`crate::netns::Netns::run`]), with upstream UDP
//! sockets of their own made in that namespace too; TCP upstream
//! connections of that set are made there as well. So a pod's queries leave
//! from the pod's namespace and reach its resolver as the pod would (its
//! routes, a node-local or loopback resolver, NetworkPolicies).
//! [`DnsProxy::close_netns`] closes such a set; stopping the identity closes
//! all of them.
//!
//! Nothing is cached, so nothing is shared across identities. A policy swap
//! (`serve_identity` again) replaces the policy under a lock read once per
//! query; the sockets, the port and the name budget stay. Whether the
//! identity is tainted is asked of the [`TaintView`] once per query (only if
//! its policy has a taint clamp), right after the policy is read; that
//! query's decision, learning and report all follow that one answer.
use std::{
    collections::{hash_map::RandomState, HashMap},
    hash::BuildHasher,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use enforcer_common::TAINT_SLOT_BIT;
use hickory_proto::op::{Message, ResponseCode};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::oneshot,
    task::{JoinHandle, JoinSet},
    time::timeout,
};

use super::{
    message::{
        answers_question, decide, error_reply, parse_query, process_answer, rule_text,
        upstream_query, Budget, Decision, Query,
    },
    DnsEvent, DnsPolicy, DnsSink, Learner, TaintView,
};
use crate::{
    events::Verdict,
    netns::{Netns, NetnsId},
};

/// How long one upstream gets before the next one is tried.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// A TCP client connection idle (or stalled in a message) this long is closed.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent TCP client connections per listener; more are closed at once.
pub const MAX_TCP_CONNS: usize = 256;
/// Attempts at finding a port free on all four sockets.
const BIND_ATTEMPTS: usize = 64;

/// The per-identity DNS proxy (see the module docs of `crate::dns`).
pub struct DnsProxy {
    learner: Arc<dyn Learner>,
    sink: Arc<dyn DnsSink>,
    taint: Arc<dyn TaintView>,
    served: Mutex<HashMap<u32, Served>>,
}

struct Served {
    port: u16,
    /// The home set serves [::1] too (the netns sets try to).
    v6: bool,
    ident: Arc<Ident>,
    tasks: Vec<JoinHandle<()>>,
    /// Listener sets in other network namespaces.
    netns: HashMap<NetnsId, NetnsSet>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.ident.stopped.store(true, Ordering::SeqCst);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// One identity's listeners (and upstream sockets) in another network
/// namespace. Dropping it stops its tasks, which closes its sockets and,
/// with the last reference, the namespace fd.
struct NetnsSet {
    v6: bool,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for NetnsSet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A listener set in another network namespace, as [`DnsProxy::netns_of`]
/// reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetnsServed {
    pub id: NetnsId,
    /// [::1] is served there too.
    pub v6: bool,
}

/// Why [`DnsProxy::serve_netns`] could not serve a namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetnsFailure {
    /// `loopback-unavailable` (127.0.0.1 cannot be bound: the pod's `lo` is
    /// down), `port-in-use` (something in the pod holds the identity's
    /// port), `not-served` (the identity has no proxy), `setns`, `other`.
    pub reason: &'static str,
    pub detail: String,
}

impl std::fmt::Display for NetnsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

/// Where the queries of one listener set go out: upstream UDP sockets made
/// in the set's namespace, and that namespace for TCP upstream connections
/// (`None`: the proxy's own).
struct Egress {
    up4: Option<Arc<UpSock>>,
    up6: Option<Arc<UpSock>>,
    netns: Option<Arc<Netns>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DnsProxy {
    /// `taint` tells, per query, whether an identity is tainted (the proxy
    /// then judges it by its policy's onTaint rules).
    pub fn new(
        learner: Arc<dyn Learner>,
        sink: Arc<dyn DnsSink>,
        taint: Arc<dyn TaintView>,
    ) -> Self {
        Self {
            learner,
            sink,
            taint,
            served: Mutex::new(HashMap::new()),
        }
    }

    /// Start serving identity `slot` (or swap its policy atomically if it is
    /// already served): binds UDP and TCP on 127.0.0.1 and [::1] at one port
    /// chosen by the OS ([::1] is skipped when the host has no IPv6).
    /// Returns the port.
    pub async fn serve_identity(&self, slot: u32, policy: Arc<DnsPolicy>) -> anyhow::Result<u16> {
        self.serve_identity_on(slot, policy, None).await
    }

    /// [`Self::serve_identity`], trying `preferred` first: a restarted daemon
    /// gets back the port the kernel's pinned steering still points at.
    pub async fn serve_identity_on(
        &self,
        slot: u32,
        policy: Arc<DnsPolicy>,
        preferred: Option<u16>,
    ) -> anyhow::Result<u16> {
        if let Some(port) = self.swap(slot, &policy) {
            return Ok(port);
        }
        let (port, udp, tcp) = bind_all(preferred).await?;
        let v6 = udp.len() > 1;
        let up4 = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
            .await
            .context("binding the IPv4 upstream socket")?;
        let up6 = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).await.ok();
        let ident = Arc::new(Ident {
            slot,
            policy: RwLock::new(policy.clone()),
            budget: Mutex::new(Budget::new(Instant::now())),
            stopped: AtomicBool::new(false),
            learner: self.learner.clone(),
            sink: self.sink.clone(),
            taint: self.taint.clone(),
        });
        let tasks = spawn_set(&ident, udp, tcp, Some(up4), up6, None);
        let served = Served {
            port,
            v6,
            ident,
            tasks,
            netns: HashMap::new(),
        };
        let mut map = lock(&self.served);
        if let Some(existing) = map.get(&slot) {
            // A concurrent call won: keep its sockets, take our policy.
            *existing
                .ident
                .policy
                .write()
                .unwrap_or_else(|e| e.into_inner()) = policy;
            return Ok(existing.port);
        }
        map.insert(slot, served);
        tracing::debug!(slot, port, "DNS proxy serving identity");
        Ok(port)
    }

    fn swap(&self, slot: u32, policy: &Arc<DnsPolicy>) -> Option<u16> {
        let map = lock(&self.served);
        let s = map.get(&slot)?;
        *s.ident.policy.write().unwrap_or_else(|e| e.into_inner()) = policy.clone();
        Some(s.port)
    }

    /// Stop serving `slot`: its sockets close, answers still in flight are
    /// neither learned nor released.
    pub fn stop_identity(&self, slot: u32) {
        let removed = lock(&self.served).remove(&slot);
        drop(removed);
    }

    /// The port `slot` is served on.
    pub fn port(&self, slot: u32) -> Option<u16> {
        lock(&self.served).get(&slot).map(|s| s.port)
    }

    /// Serve identity `slot` inside network namespace `ns` too: UDP and TCP
    /// on 127.0.0.1 (and [::1] when the home set serves it and `ns` has it)
    /// at the identity's port, bound in `ns` on a short-lived thread, plus
    /// upstream sockets made in `ns` (queries arriving there are forwarded
    /// from there). A no-op if already served there. The set lives until
    /// [`Self::close_netns`] or [`Self::stop_identity`].
    pub async fn serve_netns(&self, slot: u32, ns: Arc<Netns>) -> Result<(), NetnsFailure> {
        let (port, want_v6, ident) = {
            let map = lock(&self.served);
            let Some(s) = map.get(&slot) else {
                return Err(NetnsFailure {
                    reason: "not-served",
                    detail: format!("identity slot {slot} has no DNS proxy"),
                });
            };
            if s.netns.contains_key(&ns.id) {
                return Ok(());
            }
            (s.port, s.v6, s.ident.clone())
        };
        let socks = ns
            .run(move || Ok(bind_netns(port, want_v6)))
            .await
            .map_err(|e| NetnsFailure {
                reason: "setns",
                detail: format!("entering {}: {e}", ns.id),
            })??;
        let NetnsSockets { udp, tcp, up4, up6 } = socks;
        let into_tokio = || -> io::Result<_> {
            let udp = udp
                .into_iter()
                .map(UdpSocket::from_std)
                .collect::<io::Result<Vec<_>>>()?;
            let tcp = tcp
                .into_iter()
                .map(TcpListener::from_std)
                .collect::<io::Result<Vec<_>>>()?;
            let up4 = UdpSocket::from_std(up4)?;
            let up6 = up6.map(UdpSocket::from_std).transpose()?;
            Ok((udp, tcp, up4, up6))
        };
        let (udp, tcp, up4, up6) = into_tokio().map_err(|e| NetnsFailure {
            reason: "other",
            detail: format!("registering the sockets made in {}: {e}", ns.id),
        })?;
        let v6 = udp.len() > 1;
        let id = ns.id;
        let tasks = spawn_set(&ident, udp, tcp, Some(up4), up6, Some(ns));
        let set = NetnsSet { v6, tasks };
        let mut map = lock(&self.served);
        match map.get_mut(&slot) {
            // Still the same proxy (not stopped and restarted meanwhile).
            Some(s) if Arc::ptr_eq(&s.ident, &ident) => {
                s.netns.entry(id).or_insert(set);
                tracing::debug!(slot, port, netns = %id, "DNS proxy serving identity in a namespace");
                Ok(())
            }
            _ => Err(NetnsFailure {
                reason: "not-served",
                detail: format!(
                    "identity slot {slot} stopped while its listeners in {id} were made"
                ),
            }),
        }
    }

    /// Close identity `slot`'s listener set in namespace `id` (the namespace
    /// is no longer used by its processes).
    pub fn close_netns(&self, slot: u32, id: NetnsId) -> bool {
        let removed = lock(&self.served)
            .get_mut(&slot)
            .and_then(|s| s.netns.remove(&id));
        removed.is_some()
    }

    /// The other namespaces identity `slot` is served in.
    pub fn netns_of(&self, slot: u32) -> Vec<NetnsServed> {
        let map = lock(&self.served);
        let mut v: Vec<NetnsServed> = map
            .get(&slot)
            .map(|s| {
                s.netns
                    .iter()
                    .map(|(id, set)| NetnsServed {
                        id: *id,
                        v6: set.v6,
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by_key(|n| n.id);
        v
    }
}

/// Start the tasks of one listener set: its upstream readers, one task per
/// UDP socket, one per TCP listener.
fn spawn_set(
    ident: &Arc<Ident>,
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
    up4: Option<UdpSocket>,
    up6: Option<UdpSocket>,
    netns: Option<Arc<Netns>>,
) -> Vec<JoinHandle<()>> {
    let up4 = up4.map(|s| Arc::new(UpSock::new(s)));
    let up6 = up6.map(|s| Arc::new(UpSock::new(s)));
    let mut tasks = Vec::new();
    for u in up4.iter().chain(up6.iter()) {
        tasks.push(tokio::spawn(upstream_reader(u.clone())));
    }
    let egress = Arc::new(Egress { up4, up6, netns });
    for s in udp {
        tasks.push(tokio::spawn(udp_loop(
            ident.clone(),
            egress.clone(),
            Arc::new(s),
        )));
    }
    for l in tcp {
        tasks.push(tokio::spawn(tcp_loop(ident.clone(), egress.clone(), l)));
    }
    tasks
}

/// The std sockets of one namespace's listener set (non-blocking).
struct NetnsSockets {
    udp: Vec<std::net::UdpSocket>,
    tcp: Vec<std::net::TcpListener>,
    up4: std::net::UdpSocket,
    up6: Option<std::net::UdpSocket>,
}

/// Whether `lo` is up in the namespace of `sock` (SIOCGIFFLAGS on it).
fn loopback_up(sock: &std::net::UdpSocket) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: ifreq is plain data; the ioctl fills ifru_flags for the name.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, c) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *c as libc::c_char;
    }
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut ifr) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    Ok(i32::from(flags) & libc::IFF_UP != 0)
}

/// Runs inside the target namespace: bind the listeners at `port` and the
/// upstream sockets. 127.0.0.1 must work; [::1] is best effort.
fn bind_netns(port: u16, want_v6: bool) -> Result<NetnsSockets, NetnsFailure> {
    let fail = |what: &str, e: io::Error| NetnsFailure {
        reason: if in_use(&e) {
            "port-in-use"
        } else if e.kind() == io::ErrorKind::AddrNotAvailable {
            "loopback-unavailable"
        } else {
            "other"
        },
        detail: format!("binding {what}: {e}"),
    };
    let nb = |what: &str, e: io::Error| NetnsFailure {
        reason: "other",
        detail: format!("{what}: set_nonblocking: {e}"),
    };
    let u4 = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, port))
        .map_err(|e| fail(&format!("UDP 127.0.0.1:{port}"), e))?;
    // 127.0.0.1 binds even while `lo` is down, but nothing reaches it then.
    match loopback_up(&u4) {
        Ok(true) => {}
        Ok(false) => {
            return Err(NetnsFailure {
                reason: "loopback-unavailable",
                detail: "the loopback interface `lo` is down in the namespace".into(),
            })
        }
        Err(e) => {
            return Err(NetnsFailure {
                reason: "loopback-unavailable",
                detail: format!("reading the flags of `lo`: {e}"),
            })
        }
    }
    let t4 = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .map_err(|e| fail(&format!("TCP 127.0.0.1:{port}"), e))?;
    let mut udp = vec![u4];
    let mut tcp = vec![t4];
    if want_v6 {
        let v6 = std::net::UdpSocket::bind((Ipv6Addr::LOCALHOST, port))
            .and_then(|u| std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, port)).map(|t| (u, t)));
        match v6 {
            Ok((u, t)) => {
                udp.push(u);
                tcp.push(t);
            }
            // The caller reports a set without [::1] (`NetnsServed::v6`).
            Err(e) => tracing::warn!(
                port,
                "DNS proxy in a namespace: [::1]:{port} not served: {e}"
            ),
        }
    }
    let up4 = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .map_err(|e| fail("the IPv4 upstream socket", e))?;
    let up6 = std::net::UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).ok();
    for u in udp.iter().chain(std::iter::once(&up4)).chain(up6.iter()) {
        u.set_nonblocking(true).map_err(|e| nb("UDP", e))?;
    }
    for t in &tcp {
        t.set_nonblocking(true).map_err(|e| nb("TCP", e))?;
    }
    Ok(NetnsSockets { udp, tcp, up4, up6 })
}

fn in_use(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::AddrInUse
}

fn no_ipv6(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::AddrNotAvailable || e.raw_os_error() == Some(libc::EAFNOSUPPORT)
}

/// UDP 127.0.0.1:0 picks the port; UDP/TCP [::1] and TCP 127.0.0.1 must get
/// the same one, else try again.
async fn bind_all(
    preferred: Option<u16>,
) -> anyhow::Result<(u16, Vec<UdpSocket>, Vec<TcpListener>)> {
    for attempt in 0..BIND_ATTEMPTS {
        let want = match (attempt, preferred) {
            (0, Some(p)) => p,
            _ => 0,
        };
        let u4 = match UdpSocket::bind((Ipv4Addr::LOCALHOST, want)).await {
            Ok(s) => s,
            Err(e) if want != 0 && in_use(&e) => continue,
            Err(e) => return Err(e).context("binding UDP 127.0.0.1"),
        };
        let port = u4.local_addr()?.port();
        let t4 = match TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await {
            Ok(t) => t,
            Err(e) if in_use(&e) => continue,
            Err(e) => return Err(e).context("binding TCP 127.0.0.1"),
        };
        let u6 = match UdpSocket::bind((Ipv6Addr::LOCALHOST, port)).await {
            Ok(s) => Some(s),
            Err(e) if in_use(&e) => continue,
            Err(e) if no_ipv6(&e) => None,
            Err(e) => return Err(e).context("binding UDP [::1]"),
        };
        let mut udp = vec![u4];
        let mut tcp = vec![t4];
        if let Some(u6) = u6 {
            match TcpListener::bind((Ipv6Addr::LOCALHOST, port)).await {
                Ok(t) => tcp.push(t),
                Err(e) if in_use(&e) => continue,
                Err(e) => return Err(e).context("binding TCP [::1]"),
            }
            udp.push(u6);
        } else {
            tracing::warn!(port, "no IPv6 loopback: DNS proxy serves 127.0.0.1 only");
        }
        return Ok((port, udp, tcp));
    }
    anyhow::bail!("no port free on UDP and TCP, 127.0.0.1 and [::1], after {BIND_ATTEMPTS} tries")
}

/// One identity being served.
struct Ident {
    slot: u32,
    policy: RwLock<Arc<DnsPolicy>>,
    budget: Mutex<Budget>,
    stopped: AtomicBool,
    learner: Arc<dyn Learner>,
    sink: Arc<dyn DnsSink>,
    taint: Arc<dyn TaintView>,
}

/// What to do with a client message.
enum Step {
    /// Dropped (malformed, already counted).
    Drop,
    /// Reply right away (REFUSED).
    Reply(Vec<u8>),
    /// Ask the upstreams.
    Forward(Box<Fwd>),
}

/// Where a query came from: the agent's socket, the transport, and the
/// network namespace of the listener set it came in on (`None`: the
/// proxy's own), which names the workload (pod) in the audit record.
#[derive(Clone, Copy)]
struct Origin {
    client: SocketAddr,
    transport: &'static str,
    netns: Option<NetnsId>,
}

struct Fwd {
    q: Query,
    decision: Decision,
    policy: Arc<DnsPolicy>,
    /// The sanitized upstream query (id 0).
    upstream: Vec<u8>,
    origin: Origin,
    start: Instant,
}

impl Ident {
    fn begin(&self, bytes: &[u8], origin: Origin, start: Instant) -> Step {
        let Some(q) = parse_query(bytes) else {
            self.sink.malformed(self.slot);
            return Step::Drop;
        };
        let policy = self
            .policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // Asked after the policy is read: a query sent once the taint file
        // was opened is judged clamped.
        let tainted = policy.taint_hosts.is_some() && self.taint.is_tainted(self.slot);
        let decision = decide(&policy, tainted, &q, &mut lock(&self.budget), start);
        if decision.verdict == Verdict::Deny {
            let reply = error_reply(&q, ResponseCode::Refused);
            self.report(&policy, &q, decision, origin, start, |ev| ev);
            return Step::Reply(reply);
        }
        let upstream = upstream_query(&q);
        Step::Forward(Box::new(Fwd {
            q,
            decision,
            policy,
            upstream,
            origin,
            start,
        }))
    }

    #[allow(clippy::too_many_arguments)]
    fn report(
        &self,
        policy: &DnsPolicy,
        q: &Query,
        d: Decision,
        origin: Origin,
        start: Instant,
        fill: impl FnOnce(DnsEvent) -> DnsEvent,
    ) {
        let ev = DnsEvent {
            slot: self.slot,
            identity: policy.identity.clone(),
            policy_hash: policy.policy_hash.clone(),
            client: origin.client,
            transport: origin.transport,
            netns: origin.netns,
            qname: q.qname.clone(),
            qtype: q.qtype_text(),
            verdict: d.verdict,
            reason: d.reason,
            rule: d.rule.map(|i| rule_text(&policy.rules(d.tainted).hosts[i])),
            tainted: d.tainted,
            answers: Vec::new(),
            rebinding_blocked: Vec::new(),
            latency: Duration::ZERO,
        };
        let mut ev = fill(ev);
        ev.latency = start.elapsed();
        self.sink.record(&ev);
    }

    /// Ask the upstreams in order until one answers the question, through
    /// the sockets of the listener set the query came in on.
    async fn resolve(&self, eg: &Egress, f: &Fwd, tcp: bool) -> Option<Message> {
        let ns = eg.netns.as_ref();
        for &up in &f.policy.upstreams {
            let m = if tcp {
                tcp_exchange(ns, up, &f.upstream).await
            } else {
                match udp_exchange(eg, up, &f.upstream).await {
                    Some(m) if m.metadata.truncation => tcp_exchange(ns, up, &f.upstream).await,
                    other => other,
                }
            };
            match m {
                Some(m) if answers_question(&f.q, &m) => return Some(m),
                Some(_) => tracing::debug!(%up, "upstream answer does not match the question"),
                None => tracing::debug!(%up, "upstream did not answer"),
            }
        }
        None
    }

    /// Build the released answer, learning its addresses first. `None`
    /// when the identity was stopped meanwhile. `udp_limit`: the client's
    /// UDP size limit (a bigger answer is released truncated, unlearned).
    fn finish(
        &self,
        f: Box<Fwd>,
        resp: Option<Message>,
        udp_limit: Option<usize>,
    ) -> Option<Vec<u8>> {
        if self.stopped.load(Ordering::SeqCst) {
            return None;
        }
        let Fwd {
            q,
            decision,
            policy,
            origin,
            start,
            ..
        } = *f;
        let Some(resp) = resp else {
            let reply = error_reply(&q, ResponseCode::ServFail);
            let d = Decision {
                reason: if decision.verdict == Verdict::Allow {
                    "upstream-error"
                } else {
                    decision.reason
                },
                ..decision
            };
            self.report(&policy, &q, d, origin, start, |ev| ev);
            return Some(reply);
        };
        let view = policy.rules(decision.tainted);
        let rule = decision.rule.map(|i| &view.hosts[i]);
        let p = process_answer(&policy, view.cidrs, &q, resp, rule.is_some());
        let mut bytes = p.reply.to_vec().ok()?;
        let mut learn = p.learn;
        if udp_limit.is_some_and(|l| bytes.len() > l) {
            bytes = p.reply.truncate().to_vec().ok()?;
            learn.clear();
        }
        let mut d = decision;
        let mut installed = Vec::with_capacity(learn.len());
        if let Some(rule) = rule {
            // onTaint addresses live under their own key, which the kernel
            // looks up (instead of the plain one) once the identity is
            // tainted (see the enforcer-common docs).
            let slot = if view.tainted {
                self.slot | TAINT_SLOT_BIT
            } else {
                self.slot
            };
            for (ip, ttl) in learn {
                match self.learner.learn(slot, ip, &rule.set, ttl, &q.qname) {
                    Ok(()) => installed.push(ip),
                    Err(e) => {
                        tracing::warn!(slot, %ip, "learning a DNS answer failed: {e:#}");
                        d.verdict = Verdict::Deny;
                        d.reason = "learn-error";
                        bytes = error_reply(&q, ResponseCode::ServFail);
                        break;
                    }
                }
            }
        }
        let blocked = p.blocked;
        self.report(&policy, &q, d, origin, start, |mut ev| {
            ev.answers = installed;
            ev.rebinding_blocked = blocked;
            ev
        });
        Some(bytes)
    }
}

async fn udp_loop(ident: Arc<Ident>, eg: Arc<Egress>, sock: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, src) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("DNS proxy UDP receive: {e}");
                tokio::task::yield_now().await;
                continue;
            }
        };
        let start = Instant::now();
        let origin = Origin {
            client: src,
            transport: "udp",
            netns: eg.netns.as_ref().map(|n| n.id),
        };
        match ident.begin(&buf[..n], origin, start) {
            Step::Drop => {}
            Step::Reply(b) => {
                let _ = sock.send_to(&b, src).await;
            }
            Step::Forward(f) => {
                let ident = ident.clone();
                let eg = eg.clone();
                let sock = sock.clone();
                tokio::spawn(async move {
                    let limit = f.q.udp_limit();
                    let resp = ident.resolve(&eg, &f, false).await;
                    if let Some(b) = ident.finish(f, resp, Some(limit)) {
                        let _ = sock.send_to(&b, src).await;
                    }
                });
            }
        }
    }
}

async fn tcp_loop(ident: Arc<Ident>, eg: Arc<Egress>, listener: TcpListener) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, peer)) if conns.len() < MAX_TCP_CONNS => {
                    conns.spawn(tcp_conn(ident.clone(), eg.clone(), s, peer));
                }
                Ok(_) => tracing::debug!("DNS proxy: too many TCP connections"),
                Err(e) => {
                    tracing::debug!("DNS proxy TCP accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn tcp_conn(ident: Arc<Ident>, eg: Arc<Egress>, mut s: TcpStream, peer: SocketAddr) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        let len = match timeout(TCP_IDLE_TIMEOUT, s.read_u16()).await {
            Ok(Ok(l)) => usize::from(l),
            _ => return,
        };
        buf.resize(len, 0);
        if !matches!(
            timeout(TCP_IDLE_TIMEOUT, s.read_exact(&mut buf)).await,
            Ok(Ok(_))
        ) {
            // The connection ended inside a message.
            ident.sink.malformed(ident.slot);
            return;
        }
        let start = Instant::now();
        let origin = Origin {
            client: peer,
            transport: "tcp",
            netns: eg.netns.as_ref().map(|n| n.id),
        };
        let reply = match ident.begin(&buf, origin, start) {
            Step::Drop => continue,
            Step::Reply(b) => b,
            Step::Forward(f) => {
                let resp = ident.resolve(&eg, &f, true).await;
                match ident.finish(f, resp, None) {
                    Some(b) => b,
                    None => return,
                }
            }
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut out = Vec::with_capacity(reply.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&reply);
        if s.write_all(&out).await.is_err() {
            return;
        }
    }
}

async fn udp_exchange(eg: &Egress, up: SocketAddr, query: &[u8]) -> Option<Message> {
    let us = match up.ip() {
        IpAddr::V4(_) => eg.up4.as_ref()?,
        IpAddr::V6(_) => eg.up6.as_ref()?,
    };
    let (id, rx, _guard) = us.register(up)?;
    let mut buf = query.to_vec();
    buf.get_mut(..2)?.copy_from_slice(&id.to_be_bytes());
    us.sock.send_to(&buf, up).await.ok()?;
    let data = timeout(UPSTREAM_TIMEOUT, rx).await.ok()?.ok()?;
    Message::from_vec(&data).ok()
}

/// A TCP connection to `up` from namespace `ns` (`None`: the proxy's own):
/// the socket is made there, then connected from here.
async fn tcp_connect(ns: Option<&Arc<Netns>>, up: SocketAddr) -> Option<TcpStream> {
    let Some(ns) = ns else {
        return TcpStream::connect(up).await.ok();
    };
    let domain = if up.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd = ns
        .run(move || crate::netns::socket(domain, libc::SOCK_STREAM))
        .await
        .map_err(|e| tracing::debug!(netns = %ns.id, "TCP upstream socket: {e}"))
        .ok()?;
    tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd))
        .connect(up)
        .await
        .ok()
}

/// One query over a fresh TCP connection to `up` (random id, checked).
async fn tcp_exchange(ns: Option<&Arc<Netns>>, up: SocketAddr, query: &[u8]) -> Option<Message> {
    let id = (RandomState::new().hash_one(Instant::now()) & 0xffff) as u16;
    let len = u16::try_from(query.len()).ok()?;
    let mut out = Vec::with_capacity(query.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(query);
    out.get_mut(2..4)?.copy_from_slice(&id.to_be_bytes());
    let exchange = async {
        let mut s = tcp_connect(ns, up).await?;
        let _ = s.set_nodelay(true);
        s.write_all(&out).await.ok()?;
        let n = usize::from(s.read_u16().await.ok()?);
        let mut b = vec![0u8; n];
        s.read_exact(&mut b).await.ok()?;
        let m = Message::from_vec(&b).ok()?;
        (m.metadata.id == id).then_some(m)
    };
    timeout(UPSTREAM_TIMEOUT, exchange).await.ok()?
}

/// An upstream UDP socket shared by the queries of one identity.
struct UpSock {
    sock: UdpSocket,
    pending: Mutex<Pending>,
}

struct Pending {
    /// id -> (upstream it was sent to, generation, waiter)
    map: HashMap<u16, (SocketAddr, u64, oneshot::Sender<Vec<u8>>)>,
    rng: u64,
    generation: u64,
}

/// Removes a pending query (only its own generation) when dropped.
struct PendingGuard<'a> {
    us: &'a UpSock,
    id: u16,
    generation: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let mut p = lock(&self.us.pending);
        if p.map.get(&self.id).is_some_and(|e| e.1 == self.generation) {
            p.map.remove(&self.id);
        }
    }
}

impl UpSock {
    fn new(sock: UdpSocket) -> Self {
        Self {
            sock,
            pending: Mutex::new(Pending {
                map: HashMap::new(),
                rng: RandomState::new().hash_one(0u8) | 1,
                generation: 0,
            }),
        }
    }

    /// A free random id for a query to `up`.
    fn register(
        &self,
        up: SocketAddr,
    ) -> Option<(u16, oneshot::Receiver<Vec<u8>>, PendingGuard<'_>)> {
        let mut p = lock(&self.pending);
        for _ in 0..16 {
            // xorshift64
            p.rng ^= p.rng << 13;
            p.rng ^= p.rng >> 7;
            p.rng ^= p.rng << 17;
            let id = (p.rng >> 24) as u16;
            if p.map.contains_key(&id) {
                continue;
            }
            p.generation += 1;
            let generation = p.generation;
            let (tx, rx) = oneshot::channel();
            p.map.insert(id, (up, generation, tx));
            return Some((
                id,
                rx,
                PendingGuard {
                    us: self,
                    id,
                    generation,
                },
            ));
        }
        None
    }
}

async fn upstream_reader(us: Arc<UpSock>) {
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, src) = match us.sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(_) => {
                tokio::task::yield_now().await;
                continue;
            }
        };
        if n < 12 {
            continue;
        }
        let id = u16::from_be_bytes([buf[0], buf[1]]);
        let waiter = {
            let mut p = lock(&us.pending);
            if p.map.get(&id).is_some_and(|e| e.0 == src) {
                p.map.remove(&id)
            } else {
                None
            }
        };
        if let Some((_, _, tx)) = waiter {
            let _ = tx.send(buf[..n].to_vec());
        }
    }
}
