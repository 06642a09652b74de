//! Ring-buffer reader: raw `enforcer_common::Event` records -> `Decision`s.
//!
//! The reader drains the `EVENTS` ring buffer whenever its fd is readable
//! and hands each decoded event to a handler in the same task (no queue that
//! could grow without bound). Attribution (slot -> identity, rule id -> rule
//! name, policy hash) is looked up in a shared table that the controller
//! updates when policies change.
use std::{
    collections::{HashMap, HashSet},
    mem::size_of,
    net::{IpAddr, Ipv6Addr},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use enforcer_common::{
    action, first_bytes, rule, unix_kind, verdict, Event, InspectEvent, UnixEvent, UNIX_NAME_MAX,
};
use tokio::io::unix::AsyncFd;

use super::{Action, Decision, FirstBytes, IdentityRef, Verdict};

/// Decode one ring-buffer record. Short records are rejected (never read past the end).
pub fn decode(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < size_of::<Event>() {
        return None;
    }
    // SAFETY: length checked; Event is plain old data; unaligned read.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

/// One ring-buffer record: the event, and for action `inspect` what the
/// first bytes were.
#[derive(Clone, Debug)]
pub struct Decoded {
    pub ev: Event,
    pub first: Option<FirstBytes>,
    /// Judged first bytes: the connection's (local, peer) ends.
    pub conn: Option<(std::net::SocketAddr, std::net::SocketAddr)>,
    /// Unix socket decisions: the address.
    pub unix: Option<super::UnixAddress>,
}

impl Decoded {
    /// Reset a connection whose first bytes were refused (the agent's next
    /// read or write fails at once; see `kernel::reset`).
    pub fn reset_refused(&self) {
        // First bytes refused, or a socket cut by the taint clamp (TCP: a
        // connection; IP options leave the socket usable).
        let cut = match self.ev.action {
            action::INSPECT => true,
            action::PACKET => self.ev.rule_id == enforcer_common::rule::TAINT_CLAMP,
            _ => false,
        };
        if self.ev.verdict != verdict::DENY || !cut || self.ev.protocol != 6 {
            return;
        }
        if let Some((src, dst)) = self.conn {
            if let Err(e) = crate::kernel::reset::destroy_tcp(src, dst) {
                tracing::debug!(%src, %dst, "resetting a refused connection: {e}");
            }
        }
    }
}

fn endpoint(addr: [u8; 16], port: u16) -> std::net::SocketAddr {
    let v6 = Ipv6Addr::from(addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => std::net::SocketAddr::new(IpAddr::V4(v4), port),
        None => std::net::SocketAddr::new(IpAddr::V6(v6), port),
    }
}

/// Decode a record of either size (`Event`, or `InspectEvent` for judged first bytes).
pub fn decode_record(bytes: &[u8]) -> Option<Decoded> {
    if bytes.len() >= size_of::<InspectEvent>() {
        // SAFETY: length checked; InspectEvent is plain old data; unaligned read.
        let ie = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<InspectEvent>()) };
        let n = usize::from(ie.name_len).min(first_bytes::PRESENTED_MAX);
        let mut name = escape_name(&ie.name[..n]);
        if ie.truncated != 0 {
            name.push_str("...");
        }
        let kind = match ie.kind {
            first_bytes::kind::TLS => "tls",
            first_bytes::kind::HTTP => "http",
            _ => "other",
        };
        let reason = first_bytes::reason::as_str(ie.event.reason);
        let conn = (ie.src_port != 0).then(|| {
            (
                endpoint(ie.src, ie.src_port),
                endpoint(ie.event.addr, ie.event.port),
            )
        });
        if ie.event.action != action::INSPECT {
            // A packet refused by a cgroup_skb program: no first bytes.
            return Some(Decoded {
                conn,
                unix: None,
                ev: ie.event,
                first: None,
            });
        }
        return Some(Decoded {
            conn,
            unix: None,
            ev: ie.event,
            first: Some(FirstBytes {
                kind,
                reason: (!reason.is_empty()).then_some(reason),
                name: (n > 0).then_some(name),
            }),
        });
    }
    if bytes.len() >= size_of::<UnixEvent>() {
        // SAFETY: length checked; UnixEvent is plain old data; unaligned read.
        let ue = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<UnixEvent>()) };
        let n = usize::from(ue.len).min(UNIX_NAME_MAX);
        let kind = match ue.kind {
            unix_kind::PATH => "path",
            unix_kind::ABSTRACT => "abstract",
            _ => "unreadable",
        };
        return Some(Decoded {
            ev: ue.event,
            first: None,
            conn: None,
            unix: Some(super::UnixAddress {
                kind,
                name: crate::policy::local::display_name(ue.kind, &ue.name[..n]),
            }),
        });
    }
    let ev = decode(bytes)?;
    let first = (ev.action == action::INSPECT).then(|| {
        let reason = first_bytes::reason::as_str(ev.reason);
        FirstBytes {
            kind: if ev.reason == first_bytes::reason::UDP {
                "udp"
            } else {
                "other"
            },
            reason: (!reason.is_empty()).then_some(reason),
            name: None,
        }
    });
    Some(Decoded {
        ev,
        first,
        conn: None,
        unix: None,
    })
}

/// A presented name for the log: printable ASCII kept, the rest `\xNN`.
pub fn escape_name(raw: &[u8]) -> String {
    let mut s = String::with_capacity(raw.len());
    for &c in raw {
        if c.is_ascii_graphic() && c != b'\\' && c != b'"' {
            s.push(c as char);
        } else {
            s.push_str(&format!("\\x{c:02x}"));
        }
    }
    s
}

/// What the controller knows about an identity slot.
#[derive(Clone, Debug)]
pub struct SlotInfo {
    pub identity: IdentityRef,
    pub policy_hash: String,
    /// `rules[rule_id - 1]` is the name of rule `rule_id`.
    pub rules: Vec<String>,
    /// Names of `spec.onTaint.egress[i]` (rule `TAINT_BASE + i + 1`).
    pub taint_rules: Vec<String>,
    /// Paths of `spec.files[i]` (rule `FILE_BASE + i + 1`).
    pub files: Vec<String>,
    /// Descriptions of `spec.ingress[i]` (rule `INGRESS_BASE + i + 1`).
    pub ingress_rules: Vec<String>,
    /// Descriptions of `spec.local[i]` (rule `LOCAL_BASE + i + 1`).
    pub local: Vec<String>,
}

impl SlotInfo {
    pub fn new(identity: IdentityRef, compiled: &crate::policy::CompiledPolicy) -> Self {
        Self {
            identity,
            policy_hash: compiled.hash.clone(),
            rules: compiled.rules.clone(),
            taint_rules: compiled.taint_rules.clone(),
            ingress_rules: compiled.ingress_rules.clone(),
            files: compiled
                .files
                .iter()
                .map(|f| f.path.display().to_string())
                .collect(),
            local: compiled
                .local
                .iter()
                .map(|l| l.description.clone())
                .collect(),
        }
    }
}

/// slot -> SlotInfo, shared between the controller (writer) and the reader.
#[derive(Clone, Default)]
pub struct Attribution {
    slots: Arc<RwLock<HashMap<u32, SlotInfo>>>,
    /// Kubernetes mode: which pod and container a cgroup id is.
    workloads: Arc<RwLock<Workloads>>,
    /// (slot, network namespace) -> the pod whose namespace it is (DNS
    /// decisions: the proxy knows the namespace a query came in on).
    netns: Arc<RwLock<HashMap<(u32, crate::netns::NetnsId), super::Workload>>>,
}

/// cgroup id -> Kubernetes workload, published by the daemon on each
/// reconcile, plus what it needs to place a cgroup it has not mapped yet.
#[derive(Default)]
struct Workloads {
    known: HashMap<u64, super::Workload>,
    pods: Vec<PodScope>,
    /// Ids looked up under every pod without a match, until the next publish.
    missed: HashSet<u64>,
}

/// A bound pod as the event attribution sees it: its pod-level cgroup
/// directory and its containers' runtime IDs (64 hex digits) with names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodScope {
    pub dir: PathBuf,
    pub spiffe_id: String,
    pub namespace: String,
    pub pod: String,
    /// (container ID without the `<runtime>://` prefix, container name).
    pub containers: Vec<(String, String)>,
}

/// Bound on the cgroups examined per miss (children of one pod directory).
const MAX_SCOPE_CHILDREN: usize = 256;

impl Attribution {
    /// Replace the cgroup id -> workload map and the bound pods (daemon,
    /// Kubernetes mode; on every reconcile).
    pub fn set_workloads(&self, known: HashMap<u64, super::Workload>, pods: Vec<PodScope>) {
        *self.workloads.write().unwrap_or_else(|e| e.into_inner()) = Workloads {
            known,
            pods,
            missed: HashSet::new(),
        };
    }

    /// Replace the (slot, network namespace) -> pod map (daemon, on every
    /// sync of the DNS listeners in workload namespaces).
    pub fn set_netns_workloads(&self, m: HashMap<(u32, crate::netns::NetnsId), super::Workload>) {
        *self.netns.write().unwrap_or_else(|e| e.into_inner()) = m;
    }

    /// The pod whose network namespace `id` is, for identity `slot`.
    pub fn netns_workload(&self, slot: u32, id: crate::netns::NetnsId) -> Option<super::Workload> {
        self.netns
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(slot, id))
            .cloned()
    }

    /// The pod (and container) of `cgroup_id`. A container cgroup created
    /// since the last publish (the daemon maps containers on its 2 s
    /// reconcile tick and on pod events, and the kubelet reports a new
    /// container's ID only after it started) is placed here on first sight:
    /// it is a child directory of a bound pod's cgroup whose inode is the id;
    /// its name holds the container ID, which names the container once the
    /// pod's status lists it (until then: the pod, no container). Found ids
    /// are remembered; ids under no pod are remembered as misses until the
    /// next publish, so a flood of events costs one directory scan.
    pub fn workload(&self, cgroup_id: u64) -> Option<super::Workload> {
        {
            let w = self.workloads.read().unwrap_or_else(|e| e.into_inner());
            if let Some(found) = w.known.get(&cgroup_id) {
                return Some(found.clone());
            }
            if w.pods.is_empty() || w.missed.contains(&cgroup_id) {
                return None;
            }
        }
        let mut w = self.workloads.write().unwrap_or_else(|e| e.into_inner());
        let found = w.pods.iter().find_map(|p| p.place(cgroup_id));
        match &found {
            Some(found) => {
                w.known.insert(cgroup_id, found.clone());
            }
            None => {
                w.missed.insert(cgroup_id);
            }
        }
        found
    }

    pub fn set(&self, slot: u32, info: SlotInfo) {
        self.slots
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(slot, info);
    }
    pub fn get(&self, slot: u32) -> Option<SlotInfo> {
        self.slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&slot)
            .cloned()
    }

    /// Turn a kernel event into an attributed decision.
    pub fn decision(&self, ev: &Event, clock: &Clock) -> Decision {
        let info = self.get(ev.slot);
        let mut identity = info
            .as_ref()
            .map(|i| i.identity.clone())
            .unwrap_or(IdentityRef {
                name: "unknown".into(),
                spiffe_id: None,
            });
        // Kubernetes mode: the pod's own SPIFFE ID (derived per namespace
        // and service account when the policy does not set one).
        let workload = self.workload(ev.cgroup_id);
        if let Some(w) = workload.as_ref().filter(|w| !w.spiffe_id.is_empty()) {
            identity.spiffe_id = Some(w.spiffe_id.clone());
        }
        let rule = slot_rule_name(ev.rule_id, info.as_ref());
        let act = Action::from_kernel(ev.action).unwrap_or(Action::Connect);
        let mut path = None;
        let (ip, port, detail) = if act.is_file() {
            let file_index = ev.rule_id.wrapping_sub(rule::FILE_BASE + 1) as usize;
            path = info.as_ref().and_then(|i| i.files.get(file_index)).cloned();
            let ino = u64::from_le_bytes(ev.addr[..8].try_into().unwrap_or_default());
            let dev = u32::from_le_bytes(ev.addr[8..12].try_into().unwrap_or_default());
            let mut detail = format!("inode {ino} on device {}:{}", dev >> 20, dev & 0xf_ffff);
            if ev.verdict == verdict::TAINT {
                detail.push_str("; identity tainted: egress clamped to spec.onTaint.egress");
            }
            if ev.rule_id == rule::FILE_DEPTH {
                detail = format!(
                    "file deeper than {} directories below any checked ancestor (fail closed)",
                    enforcer_common::MAX_FILE_DEPTH
                );
            }
            (None, None, Some(detail))
        } else if ev.action == action::SETSOCKOPT {
            let level = match ev.protocol {
                0 => "SOL_IP",
                1 => "SOL_SOCKET",
                _ => "SOL_IPV6",
            };
            let why = if ev.rule_id == rule::BIND_DEVICE {
                "pins the socket to an interface: the same address elsewhere"
            } else {
                "IP options / IPv6 extension headers route past the judged destination"
            };
            (
                None,
                None,
                Some(format!("setsockopt({level}, {}): {why}", ev.port)),
            )
        } else if act.is_unix() {
            let detail = match ev.rule_id {
                rule::UNIX_RESOLVER => Some(format!(
                    "resolver IPC socket refused: {}",
                    crate::policy::local::RESOLVER_REASON
                )),
                rule::DEFAULT_DENY => Some("unix socket not listed in spec.local".to_string()),
                _ => None,
            };
            (None, None, detail)
        } else if ev.action == action::SOCK_CREATE {
            (
                None,
                None,
                Some(format!(
                    "family={} type={} protocol={}",
                    family_name(ev.family),
                    sock_type_name(ev.sock_type),
                    ev.protocol
                )),
            )
        } else {
            let v6 = Ipv6Addr::from(ev.addr);
            let ip = match v6.to_ipv4_mapped() {
                Some(v4) if ev.family == 2 => IpAddr::V4(v4),
                _ => IpAddr::V6(v6),
            };
            let detail = match (ev.action, ev.rule_id) {
                (action::INGRESS, _) => Some(format!(
                    "from peer {ip} to local port {} (spec.ingress)",
                    ev.port
                )),
                (action::PACKET, rule::IP_OPTIONS) => Some(
                    "IPv4 options or an IPv6 routing/hop-by-hop/destination-options header: \
                     the first hop would not be the judged destination"
                        .to_string(),
                ),
                (action::PACKET, rule::TAINT_CLAMP) => Some(
                    "socket opened before the taint read; destination outside \
                     spec.onTaint.egress: cut"
                        .to_string(),
                ),
                _ => None,
            };
            (Some(ip), Some(ev.port), detail)
        };
        Decision {
            ts: clock.wall(ev.ts_ns),
            identity,
            cgroup_id: ev.cgroup_id,
            pid: ev.pid,
            comm: comm_str(&ev.comm),
            action: act,
            ip,
            port,
            protocol: (!act.is_file() && !act.is_unix())
                .then(|| protocol_name(ev.protocol, ev.sock_type)),
            host: None,
            path,
            workload,
            verdict: Verdict::from_kernel(ev.verdict).unwrap_or(Verdict::Deny),
            rule,
            policy_hash: info.map(|i| i.policy_hash).unwrap_or_default(),
            detail,
            first_bytes: None,
            unix: None,
            flow: None,
        }
    }
}

impl PodScope {
    /// The workload of `cgroup_id` if it is this pod's cgroup or one of its
    /// direct children (the container cgroups, in every kubelet layout).
    fn place(&self, cgroup_id: u64) -> Option<super::Workload> {
        let workload = |container: Option<String>| super::Workload {
            spiffe_id: self.spiffe_id.clone(),
            namespace: self.namespace.clone(),
            pod: self.pod.clone(),
            container,
        };
        if std::fs::metadata(&self.dir).ok()?.ino() == cgroup_id {
            return Some(workload(None));
        }
        let rd = std::fs::read_dir(&self.dir).ok()?;
        for e in rd.flatten().take(MAX_SCOPE_CHILDREN) {
            let Ok(md) = e.metadata() else { continue };
            if !md.is_dir() || md.ino() != cgroup_id {
                continue;
            }
            let name = e.file_name();
            let name = name.to_string_lossy();
            let container = self
                .containers
                .iter()
                .find(|(id, _)| name.contains(id.as_str()))
                .map(|(_, n)| n.clone());
            return Some(workload(container));
        }
        None
    }
}

/// The name of `rule_id` for this slot's policy (egress, onTaint and files
/// rules have their own id ranges).
pub fn slot_rule_name(rule_id: u32, info: Option<&SlotInfo>) -> String {
    let index = |base: u32| rule_id.wrapping_sub(base + 1) as usize;
    if rule_id > rule::TAINT_BASE && rule_id < rule::TAINT_BASE + rule::FILE_BASE {
        return info
            .and_then(|i| i.taint_rules.get(index(rule::TAINT_BASE)))
            .cloned()
            .unwrap_or_else(|| format!("onTaint.egress[{}]", index(rule::TAINT_BASE)));
    }
    if rule_id > rule::INGRESS_BASE && rule_id < rule::FILE_BASE {
        return info
            .and_then(|i| i.ingress_rules.get(index(rule::INGRESS_BASE)))
            .cloned()
            .unwrap_or_else(|| format!("ingress[{}]", index(rule::INGRESS_BASE)));
    }
    if rule_id > rule::LOCAL_BASE && rule_id < rule::LOCAL_END {
        let i = index(rule::LOCAL_BASE);
        return info
            .and_then(|s| s.local.get(i))
            .cloned()
            .unwrap_or_else(|| format!("local[{i}]"));
    }
    if rule_id > rule::FILE_BASE && rule_id < rule::TAINT_BASE {
        let i = index(rule::FILE_BASE);
        return match info.and_then(|s| s.files.get(i)) {
            Some(p) => format!("files[{i}] {p}"),
            None => format!("files[{i}]"),
        };
    }
    rule_name(rule_id, info.map(|i| i.rules.as_slice()))
}

pub fn rule_name(rule_id: u32, rules: Option<&[String]>) -> String {
    if let Some(fixed) = crate::policy::rule_name(rule_id) {
        return fixed.to_string();
    }
    rules
        .and_then(|r| r.get(rule_id as usize - 1))
        .cloned()
        .unwrap_or_else(|| format!("egress[{}]", rule_id - 1))
}

pub fn protocol_name(p: u8, sock_type: u8) -> String {
    match (p, sock_type) {
        (6, _) => "tcp".into(),
        (17, _) => "udp".into(),
        (1, _) => "icmp".into(),
        (58, _) => "icmpv6".into(),
        (_, 3) => "raw".into(),
        (n, _) => n.to_string(),
    }
}

fn family_name(f: u8) -> String {
    match f {
        1 => "unix".into(),
        2 => "inet".into(),
        10 => "inet6".into(),
        16 => "netlink".into(),
        17 => "packet".into(),
        n => n.to_string(),
    }
}

fn sock_type_name(t: u8) -> String {
    match t {
        1 => "stream".into(),
        2 => "dgram".into(),
        3 => "raw".into(),
        5 => "seqpacket".into(),
        10 => "packet".into(),
        n => n.to_string(),
    }
}

/// A task's `comm` as the records carry it: printable ASCII as it is,
/// every other byte (controls, UTF-8, `\\`) as `\xNN`. The agent names its
/// own processes: a name must not carry a line break a consumer splits on
/// (U+0085, U+2028), terminal escapes or bidi controls.
pub fn comm_str(c: &[u8]) -> String {
    let end = c.iter().position(|&b| b == 0).unwrap_or(c.len());
    let mut s = String::with_capacity(end);
    for &b in &c[..end] {
        if (0x20..0x7f).contains(&b) && b != b'\\' {
            s.push(b as char);
        } else {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    s
}

/// Converts `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    offset_ns: i128,
}

impl Clock {
    pub fn new() -> Self {
        let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128)
            .unwrap_or(0);
        let wall = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0) as i128;
        Self {
            offset_ns: wall - mono,
        }
    }
    pub fn wall(&self, mono_ns: u64) -> chrono::DateTime<chrono::Utc> {
        let ns = mono_ns as i128 + self.offset_ns;
        chrono::DateTime::from_timestamp_nanos(ns.clamp(0, i64::MAX as i128) as i64)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// How often the reader drains the rings without being woken: allow
/// records (`ALLOW_EVENTS`) never wake it (see
/// `enforcer-ebpf/src/report.rs`), so this is the bound on their delay;
/// every record of `EVENTS` (denials, audits, taints) wakes it at once.
pub const POLL: Duration = Duration::from_millis(50);

/// Drain both rings whenever the kernel wakes the reader and every `POLL`,
/// calling `handle` for each event and `flush` after each drained batch,
/// until `stop` is notified (then once more, and return). `EVENTS` is read
/// first each time.
pub async fn run(
    rings: (RingBuf<MapData>, RingBuf<MapData>),
    stop: Arc<tokio::sync::Notify>,
    mut handle: impl FnMut(Decoded) + Send,
    mut flush: impl FnMut() + Send,
) -> anyhow::Result<()> {
    let (ring, mut allows) = rings;
    // SAFETY: RingBuf owns its map fd; it stays open and unchanged for the
    // lifetime of the AsyncFd, which owns the RingBuf.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    let mut more = false;
    let mut stopping = false;
    loop {
        stopping |= if more {
            // A full batch was read: give the runtime its turn (timers, IO,
            // the daemon's other tasks) and read on without waiting.
            tokio::task::yield_now().await;
            false
        } else {
            tokio::select! {
                r = fd.readable_mut() => {
                    // Cleared before draining: a record committed meanwhile
                    // makes the fd readable again.
                    r?.clear_ready();
                    false
                }
                _ = tokio::time::sleep(POLL) => false,
                _ = stop.notified() => true,
            }
        };
        let mut n = 0usize;
        more = false;
        for ring in [fd.get_mut(), &mut allows] {
            let mut taken = 0;
            // At most BATCH records per ring per turn: a flood that fills
            // the ring as fast as it is read must not hold this worker
            // thread (and the runtime's timers and IO) forever.
            while taken < BATCH {
                let Some(item) = ring.next() else { break };
                if let Some(d) = decode_record(&item) {
                    handle(d);
                }
                taken += 1;
            }
            more |= taken == BATCH;
            n += taken;
        }
        if n > 0 {
            flush();
        }
        if stopping && !more {
            return Ok(());
        }
    }
}

/// Records read from one ring before the reader yields to the runtime.
const BATCH: usize = 4096;

/// How long shutdown waits for the reader's and the flow drainer's last
/// batch.
pub const DRAIN_GRACE: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comm_is_printable_ascii_or_escaped() {
        assert_eq!(comm_str(b"python3\0\0\0\0\0\0\0\0\0"), "python3");
        assert_eq!(comm_str(b"Web Content"), "Web Content");
        // A line break a consumer splits on (U+2028 in UTF-8), terminal
        // escapes, a backslash: escaped, never raw.
        assert_eq!(
            comm_str(b"a\xe2\x80\xa8b\x1b[2K\\\r"),
            "a\\xe2\\x80\\xa8b\\x1b[2K\\x5c\\x0d"
        );
    }

    #[test]
    fn decode_rejects_short_records() {
        assert!(decode(&[0u8; 10]).is_none());
        assert!(decode(&[]).is_none());
        let ev = Event {
            port: 443,
            rule_id: 3,
            ..Default::default()
        };
        let bytes: [u8; size_of::<Event>()] = unsafe { std::mem::transmute(ev) };
        assert_eq!(decode(&bytes), Some(ev));
    }

    /// A container cgroup made after the daemon's last publish is placed at
    /// its first event: by inode under a bound pod's directory, named once
    /// the pod's status lists its container ID, and cached; ids under no
    /// pod are misses until the next publish.
    #[test]
    fn unmapped_container_cgroup_is_placed_under_its_pod() {
        let tmp = tempfile::tempdir().unwrap();
        let pod_dir = tmp.path().join("kubepods-besteffort-poduid.slice");
        let id = "a".repeat(64);
        let named = pod_dir.join(format!("cri-containerd-{id}.scope"));
        let unnamed = pod_dir.join(format!("cri-containerd-{}.scope", "b".repeat(64)));
        let elsewhere = tmp.path().join("other");
        for d in [&named, &unnamed, &elsewhere] {
            std::fs::create_dir_all(d).unwrap();
        }
        let ino = |p: &std::path::Path| std::fs::metadata(p).unwrap().ino();
        let a = Attribution::default();
        // Nothing published (not Kubernetes mode): no workload, no scan.
        assert_eq!(a.workload(ino(&named)), None);
        a.set_workloads(
            HashMap::new(),
            vec![PodScope {
                dir: pod_dir.clone(),
                spiffe_id: "spiffe://example.org/ns/agents/sa/coder".into(),
                namespace: "agents".into(),
                pod: "coder-0".into(),
                containers: vec![(id.clone(), "agent".into())],
            }],
        );
        let w = |c: Option<&str>| {
            Some(crate::events::Workload {
                spiffe_id: "spiffe://example.org/ns/agents/sa/coder".into(),
                namespace: "agents".into(),
                pod: "coder-0".into(),
                container: c.map(str::to_string),
            })
        };
        assert_eq!(a.workload(ino(&named)), w(Some("agent")));
        assert_eq!(
            a.workload(ino(&unnamed)),
            w(None),
            "ID not in the pod status yet"
        );
        assert_eq!(a.workload(ino(&pod_dir)), w(None));
        assert_eq!(a.workload(ino(&elsewhere)), None);
        // A decision of a process in the pod carries the pod's SPIFFE ID.
        let ev = Event {
            cgroup_id: ino(&named),
            ..Default::default()
        };
        let d = a.decision(&ev, &Clock::new());
        assert_eq!(
            d.identity.spiffe_id.as_deref(),
            Some("spiffe://example.org/ns/agents/sa/coder")
        );
        assert_eq!(d.workload, w(Some("agent")));
        // Cached: the answer survives the directory going away...
        let named_ino = ino(&named);
        std::fs::remove_dir(&named).unwrap();
        assert_eq!(a.workload(named_ino), w(Some("agent")));
        let gone = ino(&elsewhere);
        // ...and a miss stays a miss until the next publish.
        assert!(a.workloads.read().unwrap().missed.contains(&gone));
        a.set_workloads(HashMap::new(), Vec::new());
        assert_eq!(a.workload(gone), None);
        assert!(a.workloads.read().unwrap().missed.is_empty());
    }

    #[test]
    fn attribution_names_rules_and_mapped_addresses() {
        let a = Attribution::default();
        a.set(
            1,
            SlotInfo {
                ingress_rules: Vec::new(),
                identity: IdentityRef {
                    name: "demo".into(),
                    spiffe_id: Some("spiffe://x/y".into()),
                },
                policy_hash: "abc".into(),
                rules: vec!["egress[0] cidr 127.0.0.1/32".into()],
                taint_rules: vec!["onTaint.egress[0] cidr 127.0.0.2/32".into()],
                files: vec!["/home/agent/.ssh".into()],
                local: vec![],
            },
        );
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..].copy_from_slice(&[127, 0, 0, 2]);
        let ev = Event {
            slot: 1,
            rule_id: 0,
            addr,
            port: 9,
            family: 2,
            protocol: 6,
            verdict: enforcer_common::verdict::DENY,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            ..Default::default()
        };
        let d = a.decision(&ev, &Clock::new());
        assert_eq!(d.identity.name, "demo");
        assert_eq!(d.ip, Some("127.0.0.2".parse().unwrap()));
        assert_eq!(d.rule, "default-deny");
        assert_eq!(d.comm, "curl");
        assert_eq!(d.protocol.as_deref(), Some("tcp"));
        assert_eq!(d.verdict, Verdict::Deny);
        let allowed = Event {
            rule_id: 1,
            verdict: 0,
            ..ev
        };
        assert_eq!(
            a.decision(&allowed, &Clock::new()).rule,
            "egress[0] cidr 127.0.0.1/32"
        );
        let unknown = Event { slot: 7, ..ev };
        assert_eq!(a.decision(&unknown, &Clock::new()).identity.name, "unknown");
    }

    #[test]
    fn file_events_name_the_rule_path_inode_and_taint() {
        let a = Attribution::default();
        a.set(
            1,
            SlotInfo {
                ingress_rules: Vec::new(),
                identity: IdentityRef {
                    name: "demo".into(),
                    spiffe_id: None,
                },
                policy_hash: "abc".into(),
                rules: vec![],
                taint_rules: vec!["onTaint.egress[0] host api.example".into()],
                files: vec!["/home/agent/.ssh".into(), "/run/token".into()],
                local: vec![],
            },
        );
        let mut addr = [0u8; 16];
        addr[..8].copy_from_slice(&77u64.to_le_bytes());
        addr[8..12].copy_from_slice(&((8u32 << 20) | 1).to_le_bytes());
        let ev = Event {
            slot: 1,
            rule_id: rule::FILE_BASE + 2,
            action: action::FILE_OPEN,
            verdict: verdict::TAINT,
            addr,
            ..Event::default()
        };
        let d = a.decision(&ev, &Clock::new());
        assert_eq!(d.action, Action::FileOpen);
        assert_eq!(d.verdict, Verdict::Taint);
        assert_eq!(d.rule, "files[1] /run/token");
        assert_eq!(d.path.as_deref(), Some("/run/token"));
        assert_eq!((d.ip, d.port, d.protocol.as_deref()), (None, None, None));
        let detail = d.detail.unwrap();
        assert!(detail.contains("inode 77 on device 8:1"), "{detail}");
        assert!(detail.contains("clamped"), "{detail}");
        let ev = Event {
            slot: 1,
            rule_id: rule::TAINT_BASE + 1,
            action: action::CONNECT,
            verdict: verdict::ALLOW,
            ..Event::default()
        };
        assert_eq!(
            a.decision(&ev, &Clock::new()).rule,
            "onTaint.egress[0] host api.example"
        );
    }

    #[test]
    fn unix_events_carry_the_address_and_name_the_rule() {
        use enforcer_common::{unix_kind, UnixEvent};
        let a = Attribution::default();
        a.set(
            1,
            SlotInfo {
                ingress_rules: Vec::new(),
                identity: IdentityRef {
                    name: "demo".into(),
                    spiffe_id: None,
                },
                policy_hash: "abc".into(),
                rules: vec![],
                taint_rules: vec![],
                files: vec![],
                local: vec!["local[0] abstract bus".into()],
            },
        );
        let mut ue = UnixEvent::default();
        ue.event.slot = 1;
        ue.event.action = action::UNIX_CONNECT;
        ue.event.verdict = verdict::ALLOW;
        ue.event.rule_id = rule::LOCAL_BASE + 1;
        ue.kind = unix_kind::ABSTRACT;
        ue.len = 4;
        ue.name[..4].copy_from_slice(b"\0bus");
        // SAFETY: plain old data.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&ue as *const UnixEvent).cast::<u8>(),
                size_of::<UnixEvent>(),
            )
        };
        let r = decode_record(bytes).unwrap();
        let u = r.unix.clone().unwrap();
        assert_eq!((u.kind, u.name.as_str()), ("abstract", "bus"));
        let d = a.decision(&r.ev, &Clock::new());
        assert_eq!(d.action, super::super::Action::UnixConnect);
        assert_eq!(d.rule, "local[0] abstract bus");
        assert_eq!(d.protocol, None);

        ue.kind = unix_kind::PATH;
        ue.name = [0; enforcer_common::UNIX_NAME_MAX];
        ue.name[..12].copy_from_slice(b"/run/x\x01.sock");
        ue.len = 11;
        ue.event.rule_id = rule::UNIX_RESOLVER;
        ue.event.verdict = verdict::DENY;
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&ue as *const UnixEvent).cast::<u8>(),
                size_of::<UnixEvent>(),
            )
        };
        let r = decode_record(bytes).unwrap();
        assert_eq!(r.unix.as_ref().unwrap().name, "/run/x\\x01.soc");
        let d = a.decision(&r.ev, &Clock::new());
        assert_eq!(d.rule, "resolver-ipc");
        assert!(d.detail.unwrap().contains("bypass the DNS proxy"));
    }
}
