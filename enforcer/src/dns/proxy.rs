//! The proxy's sockets and tasks.
//!
//! Per served identity:
//! - one UDP socket on 127.0.0.1 and one on [::1] (same port), each read by
//!   one task in a loop. Malformed and refused queries are answered inline
//!   (no task, no upstream traffic); an allowed query is sent upstream by
//!   the same task and parked in the upstream socket's pending map; the task
//!   reading that socket learns the answer and replies from the socket the
//!   query came in on (no task per query). A timeout, a truncated answer or
//!   one that does not fit the question hands the query to a task that goes
//!   on as a TCP client's query does (next upstream, TCP retry);
//! - one TCP listener on each of the two addresses; each connection is a
//!   task (at most [`MAX_TCP_CONNS`] per listener) answering its queries in
//!   order, forwarding over TCP;
//! - one upstream UDP socket per address family, shared by all queries of
//!   the identity, read by one task that hands each answer to the waiting
//!   query by message id (a pending map; ids are random, an answer must come
//!   from the upstream address the query went to; at most [`MAX_PENDING`]
//!   waiting, more get SERVFAIL). No per-query socket. A sweeper task, awake
//!   only while UDP clients' queries are pending, times them out
//!   ([`UPSTREAM_TIMEOUT`], checked every [`SWEEP_EVERY`]).
//!
//! A decision is recorded (metrics, audit log) right after its UDP reply is
//! handed to the kernel, or before its TCP reply is written: a client that
//! does not read cannot hold its record back.
//!   Truncated (TC) upstream answers are retried over TCP, one connection per
//!   retry.
//!
//! Network namespaces: the kernel steers to `127.0.0.1:<port>` in the
//! *caller's* network namespace. The set above (the "home" set) serves the
//! proxy's own namespace; [`DnsProxy::serve_netns`] adds, for one identity,
//! the same listeners (same port, same per-identity logic, budget and
//! policy) inside another namespace (a Kubernetes pod's), bound there on a
//! short-lived thread ([`crate::netns::Netns::run`]). Only the listeners
//! live there: every query, whichever set it came in on, goes upstream from
//! the proxy's own namespace, through the identity's one pair of upstream
//! UDP sockets (and TCP connections made here). An agent controls its own
//! namespace (with a user namespace it may create one, add the upstream's
//! address to an interface there and answer as the resolver): forwarding
//! from there would let it choose the addresses the proxy learns for an
//! allowed name. So an upstream only reachable inside a pod (a loopback
//! resolver in the pod) is not supported. At most [`MAX_NETNS_PER_IDENTITY`]
//! namespaces are served per identity (more: `limit`).
//! [`DnsProxy::close_netns`] closes such a set (and the namespace fd it
//! holds); stopping the identity closes all of them.
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
        Arc, Mutex, RwLock, Weak,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use enforcer_common::TAINT_SLOT_BIT;
use hickory_proto::op::{Message, ResponseCode};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{oneshot, Notify},
    task::{JoinHandle, JoinSet},
    time::timeout,
};

use super::{
    message::{
        answers_question, decide, error_reply, parse_query, release, rule_text, upstream_query,
        vouched, Budget, Decision, Query, Released, MAX_QUERY_BYTES,
    },
    DnsEvent, DnsPolicy, DnsSink, Learner, TaintView,
};
use crate::{
    events::Verdict,
    netns::{Netns, NetnsId},
};

/// How long one upstream gets before the next one is tried.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How often pending UDP clients' queries are checked for their timeout
/// (so an upstream gets up to this much more than [`UPSTREAM_TIMEOUT`]).
pub const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// A TCP client connection idle (or stalled in a message) this long is closed.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent TCP client connections per listener; more are closed at once.
pub const MAX_TCP_CONNS: usize = 256;
/// Attempts at finding a port free on all four sockets.
const BIND_ATTEMPTS: usize = 64;
/// Queries of one identity waiting for an upstream's UDP answer, per
/// address family, at most; more get SERVFAIL at once. Far above what a
/// resolver keeps in flight; it bounds what an agent flooding allowed names
/// at a slow upstream holds in the daemon (each waiting query keeps its
/// message, at most `message::MAX_QUERY_BYTES` on the wire).
pub const MAX_PENDING: usize = 4096;
/// Receive buffer asked for an upstream socket (the kernel doubles it, for
/// its bookkeeping: 4 MiB): answers wait there while the reader learns and
/// records the ones before them.
const UPSTREAM_RCVBUF: usize = 2 << 20;
/// Network namespaces (besides the proxy's own) one identity is served in,
/// at most. Each costs a namespace fd, up to four sockets and their tasks;
/// an agent holding many namespaces (sleeping processes in namespaces of
/// its own) must not exhaust the daemon's fds for every identity. More are
/// refused (`limit`: their DNS fails, closed). 128 is above the kubelet's
/// default of 110 pods per node: one identity's pods on one node all fit.
pub const MAX_NETNS_PER_IDENTITY: usize = 128;

/// The per-identity DNS proxy (see the module docs of `crate::dns`).
pub struct DnsProxy {
    learner: Arc<dyn Learner>,
    sink: Arc<dyn DnsSink>,
    taint: Arc<dyn TaintView>,
    served: Mutex<HashMap<u32, Served>>,
    /// [`MAX_NETNS_PER_IDENTITY`] (lower in tests).
    netns_limit: usize,
}

struct Served {
    port: u16,
    /// The home set serves [::1] too (the netns sets try to).
    v6: bool,
    ident: Arc<Ident>,
    /// The identity's upstream sockets (in the proxy's own namespace), used
    /// by every listener set of the identity.
    egress: Arc<Egress>,
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

/// One identity's listeners in another network namespace. Dropping it
/// closes the namespace fd and stops its tasks, which closes its listening
/// sockets (a forward still in flight keeps its UDP listener until it
/// replied, never the namespace fd).
struct NetnsSet {
    v6: bool,
    tasks: Vec<JoinHandle<()>>,
    /// The namespace, held open with the listeners (the only fd to it).
    _ns: Arc<Netns>,
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
    /// port), `limit` (the identity is served in
    /// [`MAX_NETNS_PER_IDENTITY`] namespaces already), `not-served` (the
    /// identity has no proxy), `setns`, `other`.
    pub reason: &'static str,
    pub detail: String,
}

impl std::fmt::Display for NetnsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

/// Where an identity's queries go out: its upstream UDP sockets, made in
/// the proxy's own namespace and shared by all its listener sets (TCP
/// upstream connections are made in the proxy's namespace too). Holds no
/// namespace.
struct Egress {
    up4: Option<Arc<UpSock>>,
    up6: Option<Arc<UpSock>>,
}

impl Egress {
    /// The socket queries to `up` leave from.
    fn sock_for(&self, up: SocketAddr) -> Option<&Arc<UpSock>> {
        match up.ip() {
            IpAddr::V4(_) => self.up4.as_ref(),
            IpAddr::V6(_) => self.up6.as_ref(),
        }
    }
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
            netns_limit: MAX_NETNS_PER_IDENTITY,
        }
    }

    /// At most `n` namespaces per identity instead of
    /// [`MAX_NETNS_PER_IDENTITY`] (tests).
    #[cfg(test)]
    pub(crate) fn with_netns_limit(mut self, n: usize) -> Self {
        self.netns_limit = n;
        self
    }

    /// How many namespaces (besides its own) an identity is served in, at
    /// most.
    pub fn netns_limit(&self) -> usize {
        self.netns_limit
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
        let (port, udp, tcp) = bind_home(preferred)?;
        let v6 = udp.len() > 1;
        let up4 = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
            .await
            .context("binding the IPv4 upstream socket")?;
        let up6 = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).await.ok();
        let (egress, mut tasks) = spawn_egress(up4, up6);
        let ident = Arc::new(Ident {
            slot,
            policy: RwLock::new(policy.clone()),
            budget: Mutex::new(Budget::new(Instant::now())),
            stopped: AtomicBool::new(false),
            learner: self.learner.clone(),
            sink: self.sink.clone(),
            taint: self.taint.clone(),
        });
        tasks.extend(spawn_set(&ident, &egress, udp, tcp, None));
        let served = Served {
            port,
            v6,
            ident,
            egress,
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

    /// Replace served identity `slot`'s policy and call `forget` while no
    /// query can read the policy (the write lock is held): a query reads the
    /// policy and its learning epoch together ([`Ident::begin`]), so it
    /// pairs the old policy with the old epoch or the new with the new.
    /// False if `slot` is not served.
    pub fn replace_policy(&self, slot: u32, policy: Arc<DnsPolicy>, forget: impl FnOnce()) -> bool {
        let map = lock(&self.served);
        let Some(s) = map.get(&slot) else {
            return false;
        };
        let mut current = s.ident.policy.write().unwrap_or_else(|e| e.into_inner());
        *current = policy;
        forget();
        true
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
    /// listeners on 127.0.0.1 (and [::1] when the home set serves it and
    /// `ns` has it) at the identity's port, bound in `ns` on a short-lived
    /// thread. Queries arriving there go upstream from the proxy's own
    /// namespace, through the identity's upstream sockets (module docs). A
    /// no-op if already served there; `limit` once the identity is served
    /// in [`MAX_NETNS_PER_IDENTITY`] namespaces. The set, and with it `ns`
    /// (the fd), lives until [`Self::close_netns`] or
    /// [`Self::stop_identity`].
    pub async fn serve_netns(&self, slot: u32, ns: Arc<Netns>) -> Result<(), NetnsFailure> {
        let limit = |n: usize| NetnsFailure {
            reason: "limit",
            detail: format!(
                "the identity's DNS proxy already serves {n} namespaces (at most {})",
                self.netns_limit
            ),
        };
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
            if s.netns.len() >= self.netns_limit {
                return Err(limit(s.netns.len()));
            }
            (s.port, s.v6, s.ident.clone())
        };
        let v6 = if want_v6 { V6::BestEffort } else { V6::No };
        let (_, udp, tcp) = ns
            .run(move || Ok(bind_in_netns(port, v6)))
            .await
            .map_err(|e| NetnsFailure {
                reason: "setns",
                detail: format!("entering {}: {e}", ns.id),
            })??;
        let (udp, tcp) = into_tokio(udp, tcp).map_err(|e| NetnsFailure {
            reason: "other",
            detail: format!("registering the sockets made in {}: {e}", ns.id),
        })?;
        let v6 = udp.len() > 1;
        let id = ns.id;
        let mut map = lock(&self.served);
        match map.get_mut(&slot) {
            // Still the same proxy (not stopped and restarted meanwhile).
            Some(s) if Arc::ptr_eq(&s.ident, &ident) => {
                if s.netns.contains_key(&id) {
                    return Ok(());
                }
                if s.netns.len() >= self.netns_limit {
                    return Err(limit(s.netns.len()));
                }
                let tasks = spawn_set(&ident, &s.egress, udp, tcp, Some(id));
                s.netns.insert(id, NetnsSet { v6, tasks, _ns: ns });
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

/// An identity's egress (its upstream UDP sockets, made in the proxy's own
/// namespace) and the tasks reading them.
fn spawn_egress(up4: UdpSocket, up6: Option<UdpSocket>) -> (Arc<Egress>, Vec<JoinHandle<()>>) {
    let up4 = Some(Arc::new(UpSock::new(up4)));
    let up6 = up6.map(|s| Arc::new(UpSock::new(s)));
    let egress = Arc::new(Egress {
        up4: up4.clone(),
        up6: up6.clone(),
    });
    // The tasks hold the egress weakly: parked queries hold no egress, so
    // dropping the identity's `Served` frees the sockets and what waits.
    let tasks = up4
        .iter()
        .chain(up6.iter())
        .flat_map(|u| {
            [
                tokio::spawn(upstream_reader(u.clone(), Arc::downgrade(&egress))),
                tokio::spawn(sweeper(u.clone(), Arc::downgrade(&egress))),
            ]
        })
        .collect();
    (egress, tasks)
}

/// Start the tasks of one listener set: one per UDP socket, one per TCP
/// listener. `netns`: the namespace the listeners live in (`None`: the
/// proxy's own), named in the audit records; queries go out through
/// `egress` whatever it is.
fn spawn_set(
    ident: &Arc<Ident>,
    egress: &Arc<Egress>,
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
    netns: Option<NetnsId>,
) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    for s in udp {
        tasks.push(tokio::spawn(udp_loop(
            ident.clone(),
            egress.clone(),
            Arc::new(s),
            netns,
        )));
    }
    for l in tcp {
        tasks.push(tokio::spawn(tcp_loop(
            ident.clone(),
            egress.clone(),
            l,
            netns,
        )));
    }
    tasks
}

/// Std sockets (non-blocking) into tokio ones.
fn into_tokio(
    udp: Vec<std::net::UdpSocket>,
    tcp: Vec<std::net::TcpListener>,
) -> io::Result<(Vec<UdpSocket>, Vec<TcpListener>)> {
    let udp = udp
        .into_iter()
        .map(UdpSocket::from_std)
        .collect::<io::Result<Vec<_>>>()?;
    let tcp = tcp
        .into_iter()
        .map(TcpListener::from_std)
        .collect::<io::Result<Vec<_>>>()?;
    Ok((udp, tcp))
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

/// What to do about [::1] when binding a listener set.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum V6 {
    /// 127.0.0.1 only.
    No,
    /// Serve [::1] too unless the host has no IPv6; any other failure
    /// fails the whole set (the home set: its port is chosen freely, so a
    /// taken [::1] port means "try another port").
    Strict,
    /// Serve [::1] too if it binds at all (a namespace's set: the port is
    /// the identity's, fixed; a failure is logged and the set serves
    /// 127.0.0.1 only).
    BestEffort,
}

/// Why [`bind_listeners`] failed: which socket, and the error.
struct BindError {
    what: String,
    err: io::Error,
}

type StdListeners = (u16, Vec<std::net::UdpSocket>, Vec<std::net::TcpListener>);

/// Bind one listener set in the calling thread's network namespace: UDP
/// and TCP on 127.0.0.1 at `port` (0: UDP picks it, the rest follow), and
/// [::1] as `v6` says. Sockets are non-blocking. Returns the port.
fn bind_listeners(port: u16, v6: V6) -> Result<StdListeners, BindError> {
    let err = |what: String| move |err| BindError { what, err };
    let u4 = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, port))
        .map_err(err(format!("UDP 127.0.0.1:{port}")))?;
    let port = u4
        .local_addr()
        .map_err(err("UDP 127.0.0.1 (local address)".into()))?
        .port();
    let t4 = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .map_err(err(format!("TCP 127.0.0.1:{port}")))?;
    let mut udp = vec![u4];
    let mut tcp = vec![t4];
    let six = || {
        let u = std::net::UdpSocket::bind((Ipv6Addr::LOCALHOST, port))
            .map_err(err(format!("UDP [::1]:{port}")))?;
        let t = std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, port))
            .map_err(err(format!("TCP [::1]:{port}")))?;
        Ok::<_, BindError>((u, t))
    };
    match v6 {
        V6::No => {}
        V6::Strict => match six() {
            Ok((u, t)) => {
                udp.push(u);
                tcp.push(t);
            }
            Err(e) if no_ipv6(&e.err) => {
                tracing::warn!(port, "no IPv6 loopback: DNS proxy serves 127.0.0.1 only")
            }
            Err(e) => return Err(e),
        },
        V6::BestEffort => match six() {
            Ok((u, t)) => {
                udp.push(u);
                tcp.push(t);
            }
            // The caller reports a set without [::1] (`NetnsServed::v6`).
            Err(e) => tracing::warn!(
                port,
                "DNS proxy in a namespace: [::1]:{port} not served: binding {}: {}",
                e.what,
                e.err
            ),
        },
    }
    for u in &udp {
        u.set_nonblocking(true)
            .map_err(err("UDP (set_nonblocking)".into()))?;
    }
    for t in &tcp {
        t.set_nonblocking(true)
            .map_err(err("TCP (set_nonblocking)".into()))?;
    }
    Ok((port, udp, tcp))
}

/// Runs inside the target namespace: the listeners at the identity's
/// `port` ([`bind_listeners`]), and `lo` must be up. No upstream socket is
/// made here.
fn bind_in_netns(port: u16, v6: V6) -> Result<StdListeners, NetnsFailure> {
    let bound = bind_listeners(port, v6).map_err(|BindError { what, err }| NetnsFailure {
        reason: if in_use(&err) {
            "port-in-use"
        } else if err.kind() == io::ErrorKind::AddrNotAvailable {
            "loopback-unavailable"
        } else {
            "other"
        },
        detail: format!("binding {what}: {err}"),
    })?;
    // 127.0.0.1 binds even while `lo` is down, but nothing reaches it then.
    match loopback_up(&bound.1[0]) {
        Ok(true) => Ok(bound),
        Ok(false) => Err(NetnsFailure {
            reason: "loopback-unavailable",
            detail: "the loopback interface `lo` is down in the namespace".into(),
        }),
        Err(e) => Err(NetnsFailure {
            reason: "loopback-unavailable",
            detail: format!("reading the flags of `lo`: {e}"),
        }),
    }
}

fn in_use(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::AddrInUse
}

fn no_ipv6(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::AddrNotAvailable || e.raw_os_error() == Some(libc::EAFNOSUPPORT)
}

/// The home set, in the proxy's own namespace: a port free on UDP and TCP,
/// 127.0.0.1 and [::1] (`preferred` first), else try again.
fn bind_home(preferred: Option<u16>) -> anyhow::Result<(u16, Vec<UdpSocket>, Vec<TcpListener>)> {
    for attempt in 0..BIND_ATTEMPTS {
        let want = match (attempt, preferred) {
            (0, Some(p)) => p,
            _ => 0,
        };
        match bind_listeners(want, V6::Strict) {
            Ok((port, udp, tcp)) => {
                let (udp, tcp) = into_tokio(udp, tcp).context("registering the DNS sockets")?;
                return Ok((port, udp, tcp));
            }
            // A taken port (the preferred one, or the one UDP 127.0.0.1
            // got on another socket): another try.
            Err(e) if in_use(&e.err) => continue,
            Err(BindError { what, err }) => {
                return Err(err).with_context(|| format!("binding {what}"))
            }
        }
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
    /// Reply right away (REFUSED), then report.
    Reply(Vec<u8>, Box<Report>),
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
    /// The identity's learning epoch when the query arrived.
    epoch: u64,
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
        // The policy and the learning epoch together, under the policy's
        // lock: a reload swaps the policy and advances the epoch under its
        // write lock (`DnsProxy::replace_policy`), so a query judged by the
        // old policy carries the old epoch and learns nothing after that.
        let (policy, epoch) = self.in_force();
        let decision = self.judge(&policy, &q, start);
        if decision.verdict == Verdict::Deny {
            let reply = error_reply(&q, ResponseCode::Refused);
            return Step::Reply(
                reply,
                Box::new(Report::new(policy, q, decision, origin, start)),
            );
        }
        let upstream = upstream_query(&q);
        Step::Forward(Box::new(Fwd {
            q,
            decision,
            policy,
            epoch,
            upstream,
            origin,
            start,
        }))
    }

    /// The policy in force and the learning epoch that goes with it, read
    /// together under the policy's lock (see [`DnsProxy::replace_policy`]).
    fn in_force(&self) -> (Arc<DnsPolicy>, u64) {
        let p = self.policy.read().unwrap_or_else(|e| e.into_inner());
        (p.clone(), self.learner.epoch(self.slot))
    }

    /// Judge `q` by `policy`. The taint is asked after the policy is read:
    /// a query sent once the taint file was opened is judged clamped.
    fn judge(&self, policy: &DnsPolicy, q: &Query, start: Instant) -> Decision {
        let tainted = policy.taint_hosts.is_some() && self.taint.is_tainted(self.slot);
        decide(policy, tainted, q, &mut lock(&self.budget), start)
    }

    /// Record a decision (metrics, audit log): right after a UDP reply is
    /// handed to the kernel (off the client's path), before a TCP reply is
    /// written (a client that does not read cannot hold it back).
    fn report(&self, r: Report) {
        let Report {
            policy,
            q,
            d,
            origin,
            start,
            answers,
            answered,
            rebinding_blocked,
        } = r;
        let qtype = q.qtype_text();
        self.sink.record(&DnsEvent {
            slot: self.slot,
            identity: policy.identity.clone(),
            policy_hash: policy.policy_hash.clone(),
            client: origin.client,
            transport: origin.transport,
            netns: origin.netns,
            qname: q.qname,
            qtype,
            verdict: d.verdict,
            reason: d.reason,
            rule: d.rule.map(|i| rule_text(&policy.rules(d.tainted).hosts[i])),
            tainted: d.tainted,
            answers,
            answered,
            rebinding_blocked,
            latency: start.elapsed(),
        });
    }

    /// Ask the upstreams in order until one answers the question, from the
    /// proxy's own namespace (whichever set the query came in on).
    async fn resolve(&self, eg: &Egress, f: &Fwd, tcp: bool) -> Option<Message> {
        self.resolve_from(eg, f, tcp, 0).await
    }

    /// [`Self::resolve`] from the upstream at index `from` on.
    async fn resolve_from(&self, eg: &Egress, f: &Fwd, tcp: bool, from: usize) -> Option<Message> {
        for &up in f.policy.upstreams.iter().skip(from) {
            if self.stopped.load(Ordering::SeqCst) {
                return None;
            }
            let m = if tcp {
                tcp_exchange(up, &f.upstream).await
            } else {
                match udp_exchange(eg, up, &f.upstream).await {
                    Some(m) if m.metadata.truncation => tcp_exchange(up, &f.upstream).await,
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

    /// Build the released answer, learning its addresses first, and the
    /// report to make once it is sent. `None` when the identity was stopped
    /// meanwhile. `udp_limit`: the client's UDP size limit (a bigger answer
    /// is released truncated, unlearned).
    fn finish(
        &self,
        f: Box<Fwd>,
        resp: Option<Message>,
        udp_limit: Option<usize>,
    ) -> Option<(Vec<u8>, Report)> {
        if self.stopped.load(Ordering::SeqCst) {
            return None;
        }
        let Fwd {
            q,
            mut decision,
            mut policy,
            origin,
            start,
            mut epoch,
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
            return Some((reply, Report::new(policy, q, d, origin, start)));
        };
        if self.learner.epoch(self.slot) != epoch {
            // Judged by a policy replaced since: judged again by the one in
            // force, whose learning epoch it then carries. Refused if that
            // policy refuses the name; SERVFAIL if it asks other upstreams
            // than the one that answered.
            let (now, now_epoch) = self.in_force();
            if now.upstreams != policy.upstreams {
                let d = Decision {
                    verdict: Verdict::Deny,
                    reason: "policy-changed",
                    ..decision
                };
                let reply = error_reply(&q, ResponseCode::ServFail);
                return Some((reply, Report::new(policy, q, d, origin, start)));
            }
            let d = self.judge(&now, &q, start);
            if d.verdict == Verdict::Deny {
                let reply = error_reply(&q, ResponseCode::Refused);
                return Some((reply, Report::new(now, q, d, origin, start)));
            }
            (policy, epoch, decision) = (now, now_epoch, d);
        }
        let view = policy.rules(decision.tainted);
        let rule = decision.rule.map(|i| &view.hosts[i]);
        let Released {
            mut bytes,
            learn,
            blocked,
        } = release(
            &policy,
            view.cidrs,
            &q,
            resp,
            // `mode: audit`: a would-be refusal's addresses are collected
            // (never installed) for its record (`enforcer policy learn`).
            rule.is_some() || decision.verdict == Verdict::Audit,
            udp_limit,
        )?;
        let mut d = decision;
        let mut installed = Vec::with_capacity(learn.len());
        let mut answered = Vec::new();
        if rule.is_none() {
            answered = learn.iter().map(|&(ip, _)| ip).collect();
        } else if let Some(rule) = rule {
            // onTaint addresses live under their own key, which the kernel
            // looks up (instead of the plain one) once the identity is
            // tainted (see the enforcer-common docs).
            let slot = if view.tainted {
                self.slot | TAINT_SLOT_BIT
            } else {
                self.slot
            };
            for &(ip, ttl) in &learn {
                match self
                    .learner
                    .learn(slot, ip, &rule.set, ttl, &q.qname, epoch)
                {
                    Ok(()) => installed.push(ip),
                    Err(e) => {
                        if e.downcast_ref::<super::StaleEpoch>().is_some() {
                            tracing::debug!(slot, %ip, "{e}");
                            d.reason = "policy-changed";
                        } else {
                            tracing::warn!(slot, %ip, "learning a DNS answer failed: {e:#}");
                            d.reason = "learn-error";
                        }
                        d.verdict = Verdict::Deny;
                        bytes = error_reply(&q, ResponseCode::ServFail);
                        break;
                    }
                }
            }
            if !view.tainted && d.verdict == Verdict::Allow {
                self.learn_ahead_of_taint(&policy, &q.qname, &learn, epoch);
            }
        }
        let mut report = Report::new(policy, q, d, origin, start);
        report.answers = installed;
        report.answered = answered;
        report.rebinding_blocked = blocked;
        Some((bytes, report))
    }
}

impl Ident {
    /// A name the onTaint rules also allow, answered before the taint
    /// read: its addresses go under the taint key as well (with the onTaint
    /// rule's ports; a rebinding address only if an onTaint `cidr` rule
    /// vouches for it), so that an agent that cached the answer still
    /// reaches what onTaint allows after the clamp, without asking again.
    /// Best effort: the plain answer is already installed.
    fn learn_ahead_of_taint(
        &self,
        policy: &DnsPolicy,
        qname: &str,
        learn: &[(IpAddr, Duration)],
        epoch: u64,
    ) {
        let Some(rule) = policy.match_taint_host(qname) else {
            return;
        };
        let cidrs = policy.rules(true).cidrs;
        for &(ip, ttl) in learn {
            if !vouched(cidrs, ip) {
                continue;
            }
            let slot = self.slot | TAINT_SLOT_BIT;
            if let Err(e) = self.learner.learn(slot, ip, &rule.set, ttl, qname, epoch) {
                tracing::debug!(slot, %ip, "learning an answer for the onTaint rules: {e:#}");
            }
        }
    }
}

/// A decision to record once its reply is sent ([`Ident::report`]).
struct Report {
    policy: Arc<DnsPolicy>,
    q: Query,
    d: Decision,
    origin: Origin,
    start: Instant,
    /// Addresses learned from the answer.
    answers: Vec<IpAddr>,
    /// `mode: audit`: addresses of a would-be refused answer (not learned).
    answered: Vec<IpAddr>,
    rebinding_blocked: Vec<IpAddr>,
}

impl Report {
    fn new(policy: Arc<DnsPolicy>, q: Query, d: Decision, origin: Origin, start: Instant) -> Self {
        Self {
            policy,
            q,
            d,
            origin,
            start,
            answers: Vec::new(),
            answered: Vec::new(),
            rebinding_blocked: Vec::new(),
        }
    }
}

async fn udp_loop(
    ident: Arc<Ident>,
    eg: Arc<Egress>,
    sock: Arc<UdpSocket>,
    netns: Option<NetnsId>,
) {
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
            netns,
        };
        match ident.begin(&buf[..n], origin, start) {
            Step::Drop => {}
            Step::Reply(b, report) => reply_udp(&ident, &sock, b, src, *report),
            Step::Forward(fwd) => ask_udp(
                &eg,
                Box::new(UdpQuery {
                    ident: ident.clone(),
                    fwd,
                    reply: sock.clone(),
                    client: src,
                    tried: 0,
                    deadline: start,
                }),
            ),
        }
    }
}

/// A UDP client's allowed query on its way: parked in an upstream
/// socket's pending map while an upstream is asked (the reader of that
/// socket answers it), or carried by a task on the slow paths.
struct UdpQuery {
    ident: Arc<Ident>,
    fwd: Box<Fwd>,
    /// The listener the query came in on, and the client: where the reply
    /// goes from and to.
    reply: Arc<UdpSocket>,
    client: SocketAddr,
    /// Index (in the policy's upstreams) of the upstream asked.
    tried: usize,
    /// When the upstream asked has had [`UPSTREAM_TIMEOUT`].
    deadline: Instant,
}

#[allow(clippy::boxed_local)] // it lives boxed, parked in a map
impl UdpQuery {
    /// Learn and release `resp` (SERVFAIL when `None`), reply without
    /// waiting ([`reply_udp`]).
    fn answer(self: Box<Self>, resp: Option<Message>) {
        let UdpQuery {
            ident,
            fwd,
            reply,
            client,
            ..
        } = *self;
        let limit = fwd.q.udp_limit();
        let Some((b, report)) = ident.finish(fwd, resp, Some(limit)) else {
            return;
        };
        reply_udp(&ident, &reply, b, client, report);
    }
}

/// Send a UDP reply without waiting, then record the decision. With the
/// socket's buffer full the reply is dropped, as UDP may (the client asks
/// again): nothing waits on a client, so a flood holds no task and no
/// record back.
fn reply_udp(ident: &Ident, sock: &UdpSocket, bytes: Vec<u8>, client: SocketAddr, report: Report) {
    if let Err(e) = sock.try_send_to(&bytes, client) {
        tracing::debug!(%client, "DNS proxy: reply not sent: {e}");
    }
    ident.report(report);
}

/// How a query handed to a task goes on.
enum Resume {
    /// Ask the upstreams from `tried` on (awaiting each).
    From,
    /// `tried` sent a truncated answer: ask it over TCP, then the rest.
    Tcp,
}

/// Send `q` to the upstream at `q.tried` (or the next one that has a
/// socket) and park it there; with none left, answer SERVFAIL. A send that
/// would block or fails goes on in a task.
fn ask_udp(eg: &Arc<Egress>, mut q: Box<UdpQuery>) {
    loop {
        let Some(&up) = q.fwd.policy.upstreams.get(q.tried) else {
            return q.answer(None);
        };
        let Some(us) = eg.sock_for(up) else {
            tracing::debug!(%up, "upstream did not answer");
            q.tried += 1;
            continue;
        };
        if let Err(q) = us.send_parked(up, q) {
            resume(eg.clone(), q, Resume::From);
        }
        return;
    }
}

/// Go on with `q` in a task (the slow paths: timeouts, TCP retries, a full
/// socket buffer).
fn resume(eg: Arc<Egress>, q: Box<UdpQuery>, how: Resume) {
    tokio::spawn(async move {
        if q.ident.stopped.load(Ordering::SeqCst) {
            return;
        }
        let f = &q.fwd;
        let resp = match how {
            Resume::From => q.ident.resolve_from(&eg, f, false, q.tried).await,
            Resume::Tcp => {
                let up = f.policy.upstreams.get(q.tried).copied();
                match up {
                    Some(up) => match tcp_exchange(up, &f.upstream).await {
                        Some(m) if answers_question(&f.q, &m) => Some(m),
                        _ => {
                            tracing::debug!(%up, "upstream did not answer over TCP");
                            q.ident.resolve_from(&eg, f, false, q.tried + 1).await
                        }
                    },
                    None => None,
                }
            }
        };
        q.answer(resp);
    });
}

/// An upstream's answer to a parked query.
fn on_answer(eg: &Arc<Egress>, mut q: Box<UdpQuery>, bytes: &[u8]) {
    let up = q.fwd.policy.upstreams.get(q.tried).copied();
    match Message::from_vec(bytes) {
        Ok(m) if m.metadata.truncation => resume(eg.clone(), q, Resume::Tcp),
        Ok(m) if answers_question(&q.fwd.q, &m) => q.answer(Some(m)),
        _ => {
            tracing::debug!(?up, "upstream answer does not match the question");
            q.tried += 1;
            ask_udp(eg, q);
        }
    }
}

async fn tcp_loop(
    ident: Arc<Ident>,
    eg: Arc<Egress>,
    listener: TcpListener,
    netns: Option<NetnsId>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, peer)) if conns.len() < MAX_TCP_CONNS => {
                    conns.spawn(tcp_conn(ident.clone(), eg.clone(), s, peer, netns));
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

async fn tcp_conn(
    ident: Arc<Ident>,
    eg: Arc<Egress>,
    mut s: TcpStream,
    peer: SocketAddr,
    netns: Option<NetnsId>,
) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        let len = match timeout(TCP_IDLE_TIMEOUT, s.read_u16()).await {
            Ok(Ok(l)) => usize::from(l),
            _ => return,
        };
        if len > MAX_QUERY_BYTES {
            // No query is that long: nothing is allocated for it, the
            // connection is closed.
            ident.sink.malformed(ident.slot);
            return;
        }
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
            netns,
        };
        let (reply, report) = match ident.begin(&buf, origin, start) {
            Step::Drop => continue,
            Step::Reply(b, report) => (b, *report),
            Step::Forward(f) => {
                let resp = ident.resolve(&eg, &f, true).await;
                match ident.finish(f, resp, None) {
                    Some(r) => r,
                    None => return,
                }
            }
        };
        // Recorded before the write: a client that does not read cannot
        // hold its record back.
        ident.report(report);
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut out = Vec::with_capacity(reply.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&reply);
        if !matches!(
            timeout(TCP_IDLE_TIMEOUT, s.write_all(&out)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
}

async fn udp_exchange(eg: &Egress, up: SocketAddr, query: &[u8]) -> Option<Message> {
    let us = eg.sock_for(up)?;
    let (id, rx, _guard) = us.register(up)?;
    let mut buf = query.to_vec();
    buf.get_mut(..2)?.copy_from_slice(&id.to_be_bytes());
    us.sock.send_to(&buf, up).await.ok()?;
    let data = timeout(UPSTREAM_TIMEOUT, rx).await.ok()?.ok()?;
    Message::from_vec(&data).ok()
}

/// One query over a fresh TCP connection to `up`, from the proxy's own
/// namespace (random id, checked).
async fn tcp_exchange(up: SocketAddr, query: &[u8]) -> Option<Message> {
    let id = (RandomState::new().hash_one(Instant::now()) & 0xffff) as u16;
    let len = u16::try_from(query.len()).ok()?;
    let mut out = Vec::with_capacity(query.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(query);
    out.get_mut(2..4)?.copy_from_slice(&id.to_be_bytes());
    let exchange = async {
        let mut s = TcpStream::connect(up).await.ok()?;
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
    /// Wakes the sweeper when a UDP client's query is parked while none was.
    parked_first: Notify,
}

/// Who waits for an answer.
enum Waiter {
    /// A task (TCP clients, the slow paths).
    Task(oneshot::Sender<Vec<u8>>),
    /// A UDP client's query, answered by the socket's reader.
    Parked(Box<UdpQuery>),
}

struct Pending {
    /// id -> (upstream it was sent to, generation, waiter)
    map: HashMap<u16, (SocketAddr, u64, Waiter)>,
    /// How many of `map`'s waiters are `Parked`.
    parked: usize,
    rng: u64,
    generation: u64,
}

impl Pending {
    /// A random id no pending query has, and a new generation. `None` at
    /// [`MAX_PENDING`] queries (the query gets SERVFAIL).
    fn free_id(&mut self) -> Option<(u16, u64)> {
        if self.map.len() >= MAX_PENDING {
            return None;
        }
        for _ in 0..16 {
            // xorshift64
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let id = (self.rng >> 24) as u16;
            if self.map.contains_key(&id) {
                continue;
            }
            self.generation += 1;
            return Some((id, self.generation));
        }
        None
    }

    /// Take the waiter of `id` (of generation `generation`, if given).
    fn take(&mut self, id: u16, generation: Option<u64>) -> Option<(SocketAddr, Waiter)> {
        let e = self.map.get(&id)?;
        if generation.is_some_and(|g| g != e.1) {
            return None;
        }
        let (up, _, w) = self.map.remove(&id)?;
        if matches!(w, Waiter::Parked(_)) {
            self.parked -= 1;
        }
        Some((up, w))
    }
}

/// Removes a pending query (only its own generation) when dropped.
struct PendingGuard<'a> {
    us: &'a UpSock,
    id: u16,
    generation: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.us.pending).take(self.id, Some(self.generation));
    }
}

impl UpSock {
    fn new(sock: UdpSocket) -> Self {
        // Past net.core.rmem_max with CAP_NET_ADMIN; else the kernel's cap.
        let fd = std::os::fd::AsFd::as_fd(&sock);
        if nix::sys::socket::setsockopt(
            &fd,
            nix::sys::socket::sockopt::RcvBufForce,
            &UPSTREAM_RCVBUF,
        )
        .is_err()
        {
            let _ = nix::sys::socket::setsockopt(
                &fd,
                nix::sys::socket::sockopt::RcvBuf,
                &UPSTREAM_RCVBUF,
            );
        }
        Self {
            sock,
            pending: Mutex::new(Pending {
                map: HashMap::new(),
                parked: 0,
                rng: RandomState::new().hash_one(0u8) | 1,
                generation: 0,
            }),
            parked_first: Notify::new(),
        }
    }

    /// A free random id for a query to `up`.
    fn register(
        &self,
        up: SocketAddr,
    ) -> Option<(u16, oneshot::Receiver<Vec<u8>>, PendingGuard<'_>)> {
        let mut p = lock(&self.pending);
        let (id, generation) = p.free_id()?;
        let (tx, rx) = oneshot::channel();
        p.map.insert(id, (up, generation, Waiter::Task(tx)));
        Some((
            id,
            rx,
            PendingGuard {
                us: self,
                id,
                generation,
            },
        ))
    }

    /// Park `q` under a free id and send its query to `up` without
    /// waiting. `Err(q)` (nothing left parked) when no id is free or the
    /// send would block or failed.
    fn send_parked(&self, up: SocketAddr, mut q: Box<UdpQuery>) -> Result<(), Box<UdpQuery>> {
        q.deadline = Instant::now() + UPSTREAM_TIMEOUT;
        // Parked before the send: a reader on another worker thread may
        // read the answer before this thread is back from `sendto`.
        let (id, generation, out) = {
            let mut p = lock(&self.pending);
            let Some((id, generation)) = p.free_id() else {
                return Err(q);
            };
            if let Some(h) = q.fwd.upstream.get_mut(..2) {
                h.copy_from_slice(&id.to_be_bytes());
            }
            let out = q.fwd.upstream.clone();
            p.map.insert(id, (up, generation, Waiter::Parked(q)));
            p.parked += 1;
            if p.parked == 1 {
                self.parked_first.notify_one();
            }
            (id, generation, out)
        };
        if self.sock.try_send_to(&out, up).is_ok() {
            return Ok(());
        }
        match lock(&self.pending).take(id, Some(generation)) {
            Some((_, Waiter::Parked(q))) => Err(q),
            // Answered (or timed out) meanwhile, by whoever took it.
            _ => Ok(()),
        }
    }
}

async fn upstream_reader(us: Arc<UpSock>, eg: Weak<Egress>) {
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
                p.take(id, None)
            } else {
                None
            }
        };
        match waiter {
            Some((_, Waiter::Task(tx))) => {
                let _ = tx.send(buf[..n].to_vec());
            }
            Some((_, Waiter::Parked(q))) => {
                if let Some(eg) = eg.upgrade() {
                    // A bug in one answer's handling must not end the
                    // identity's reader (its parked queries would wait on).
                    let work = std::panic::AssertUnwindSafe(|| on_answer(&eg, q, &buf[..n]));
                    if std::panic::catch_unwind(work).is_err() {
                        tracing::error!("DNS proxy: handling an upstream answer panicked");
                    }
                }
            }
            None => {}
        }
    }
}

/// Times parked queries out: awake only while some are parked, it hands
/// each one past its deadline to the next upstream.
async fn sweeper(us: Arc<UpSock>, eg: Weak<Egress>) {
    loop {
        us.parked_first.notified().await;
        loop {
            tokio::time::sleep(SWEEP_EVERY).await;
            let now = Instant::now();
            let (late, left) = {
                let mut p = lock(&us.pending);
                let ids: Vec<u16> = p
                    .map
                    .iter()
                    .filter(|(_, e)| matches!(&e.2, Waiter::Parked(q) if q.deadline <= now))
                    .map(|(id, _)| *id)
                    .collect();
                let late: Vec<Box<UdpQuery>> = ids
                    .into_iter()
                    .filter_map(|id| match p.take(id, None) {
                        Some((_, Waiter::Parked(q))) => Some(q),
                        _ => None,
                    })
                    .collect();
                (late, p.parked)
            };
            let Some(eg) = eg.upgrade() else { return };
            for mut q in late {
                let up = q.fwd.policy.upstreams.get(q.tried).copied();
                tracing::debug!(?up, "upstream did not answer");
                q.tried += 1;
                let work = std::panic::AssertUnwindSafe(|| ask_udp(&eg, q));
                if std::panic::catch_unwind(work).is_err() {
                    tracing::error!("DNS proxy: a timed-out query's next step panicked");
                }
            }
            if left == 0 {
                break;
            }
        }
    }
}

#[cfg(test)]
mod pending_tests {
    use super::*;

    #[test]
    fn at_most_max_pending_queries_wait_per_socket() {
        let mut p = Pending {
            map: HashMap::new(),
            parked: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
            generation: 0,
        };
        let up: SocketAddr = "127.0.0.1:53".parse().unwrap();
        let mut waiting = Vec::new();
        while let Some((id, generation)) = p.free_id() {
            let (tx, rx) = oneshot::channel();
            p.map.insert(id, (up, generation, Waiter::Task(tx)));
            waiting.push((id, generation, rx));
            assert!(waiting.len() <= MAX_PENDING);
        }
        assert_eq!(waiting.len(), MAX_PENDING, "the cap, not the id space");
        // One answered (or timed out): room for one more, under a new
        // generation; the old guard's generation no longer takes it.
        let (id, old_generation, _rx) = waiting.pop().unwrap();
        assert!(p.take(id, Some(old_generation)).is_some());
        assert!(p.take(id, Some(old_generation)).is_none());
        let (_, generation) = p.free_id().expect("room for one");
        assert!(generation > old_generation);
    }
}
