//! Kernel events -> decoded decisions. The ring-buffer reader lives in
//! `reader.rs`; this module holds the userspace form of one decision that the
//! audit log and the metrics consume.
use std::net::IpAddr;

use serde::Serialize;

pub mod flows;
pub mod reader;
pub mod sink;

/// What the agent tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Connect,
    Sendmsg,
    SockCreate,
    Dns,
    FileOpen,
    FileLink,
    FileRename,
    /// The first bytes of a connection to a learned address (TLS SNI or
    /// HTTP Host), or UDP to such an address.
    Inspect,
    /// A packet of an open socket refused by the egress program (IP
    /// options / routing header, or the taint clamp).
    Packet,
    /// A connection or datagram from a peer outside the identity
    /// (`spec.ingress`): the address is the peer's, the port the local one.
    Ingress,
    /// A socket option refused (IP options, IPv6 routing headers).
    Setsockopt,
    /// An inet socket made outside the identity, refused when the agent
    /// would receive it (SCM_RIGHTS, pidfd_getfd).
    FdReceive,
    /// connect(2) of a unix socket (`spec.local`).
    UnixConnect,
    /// sendto/sendmsg of a unix datagram socket to an address (`spec.local`).
    UnixSend,
    /// A system call the agent's seccomp filter refused (`enforcer run`);
    /// decided in userspace, never counted by the kernel.
    Syscall,
}

impl Action {
    pub fn from_kernel(a: u8) -> Option<Self> {
        use enforcer_common::action as k;
        Some(match a {
            k::CONNECT => Self::Connect,
            k::SENDMSG => Self::Sendmsg,
            k::SOCK_CREATE => Self::SockCreate,
            k::DNS => Self::Dns,
            k::FILE_OPEN => Self::FileOpen,
            k::FILE_LINK => Self::FileLink,
            k::FILE_RENAME => Self::FileRename,
            k::INSPECT => Self::Inspect,
            k::PACKET => Self::Packet,
            k::INGRESS => Self::Ingress,
            k::SETSOCKOPT => Self::Setsockopt,
            k::FD_RECEIVE => Self::FdReceive,
            k::UNIX_CONNECT => Self::UnixConnect,
            k::UNIX_SEND => Self::UnixSend,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Sendmsg => "sendmsg",
            Self::SockCreate => "sock_create",
            Self::Dns => "dns",
            Self::FileOpen => "file_open",
            Self::FileLink => "file_link",
            Self::FileRename => "file_rename",
            Self::Inspect => "inspect",
            Self::Packet => "packet",
            Self::Ingress => "ingress",
            Self::Setsockopt => "setsockopt",
            Self::FdReceive => "fd_receive",
            Self::UnixConnect => "unix_connect",
            Self::UnixSend => "unix_send",
            Self::Syscall => "syscall",
        }
    }
    /// The action named `name` in an audit record (`as_str`'s inverse).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .chain([Self::Syscall])
            .find(|a| a.as_str() == name)
    }
    /// The actions the kernel decides and counts.
    pub const ALL: [Action; 14] = [
        Self::Connect,
        Self::Sendmsg,
        Self::SockCreate,
        Self::Dns,
        Self::FileOpen,
        Self::FileLink,
        Self::FileRename,
        Self::Inspect,
        Self::Packet,
        Self::Ingress,
        Self::Setsockopt,
        Self::FdReceive,
        Self::UnixConnect,
        Self::UnixSend,
    ];
    pub fn is_file(self) -> bool {
        matches!(self, Self::FileOpen | Self::FileLink | Self::FileRename)
    }
    pub fn is_unix(self) -> bool {
        matches!(self, Self::UnixConnect | Self::UnixSend)
    }
    pub fn kernel_code(self) -> u8 {
        use enforcer_common::action as k;
        match self {
            Self::Connect => k::CONNECT,
            Self::Sendmsg => k::SENDMSG,
            Self::SockCreate => k::SOCK_CREATE,
            Self::Dns => k::DNS,
            Self::FileOpen => k::FILE_OPEN,
            Self::FileLink => k::FILE_LINK,
            Self::FileRename => k::FILE_RENAME,
            Self::Inspect => k::INSPECT,
            Self::Packet => k::PACKET,
            Self::Ingress => k::INGRESS,
            Self::Setsockopt => k::SETSOCKOPT,
            Self::FdReceive => k::FD_RECEIVE,
            Self::UnixConnect => k::UNIX_CONNECT,
            Self::UnixSend => k::UNIX_SEND,
            // Not a kernel action: never in ALL, never an index.
            Self::Syscall => u8::MAX,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
    Audit,
    /// A `taint` file was read (allowed); the identity's egress is clamped.
    Taint,
}

impl Verdict {
    pub fn from_kernel(v: u8) -> Option<Self> {
        use enforcer_common::verdict as k;
        Some(match v {
            k::ALLOW => Self::Allow,
            k::DENY => Self::Deny,
            k::AUDIT => Self::Audit,
            k::TAINT => Self::Taint,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Audit => "audit",
            Self::Taint => "taint",
        }
    }
    pub const ALL: [Verdict; 4] = [Self::Allow, Self::Deny, Self::Audit, Self::Taint];
    /// The verdict named `name` in an audit record (`as_str`'s inverse).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == name)
    }
    pub fn kernel_code(self) -> u8 {
        use enforcer_common::verdict as k;
        match self {
            Self::Allow => k::ALLOW,
            Self::Deny => k::DENY,
            Self::Audit => k::AUDIT,
            Self::Taint => k::TAINT,
        }
    }
}

/// Who made the decision happen (the workload identity).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct IdentityRef {
    /// AgentPolicy metadata.name, or "unknown" for an unbound cgroup.
    pub name: String,
    pub spiffe_id: Option<String>,
}

/// The Kubernetes workload of a decision (daemon in Kubernetes mode): the
/// pod, and the container when the process ran in a container's cgroup.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Workload {
    /// The pod's SPIFFE ID (the policy's `spiffeId`, or derived from the
    /// pod's namespace and service account); it becomes the decision's
    /// `identity.spiffe_id`.
    #[serde(skip)]
    pub spiffe_id: String,
    pub namespace: String,
    pub pod: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// One decision, decoded and attributed, ready for the audit log / metrics.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decision {
    /// Wall-clock time of the decision (RFC 3339, UTC).
    pub ts: chrono::DateTime<chrono::Utc>,
    pub identity: IdentityRef,
    pub cgroup_id: u64,
    pub pid: u32,
    pub comm: String,
    pub action: Action,
    pub ip: Option<IpAddr>,
    pub port: Option<u16>,
    /// "tcp", "udp", "icmp", "raw", or the protocol number.
    pub protocol: Option<String>,
    /// DNS name the address was learned from, when known.
    pub host: Option<String>,
    /// File actions: the path of the `files:` rule that matched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Kubernetes mode: the pod (and container) the process ran in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<Workload>,
    pub verdict: Verdict,
    /// Human-readable rule: "egress[2]", "default-deny", "no-policy", "raw-socket", ...
    pub rule: String,
    /// SHA-256 (hex) of the policy document in force for this identity.
    pub policy_hash: String,
    /// Extra detail (socket family/type for sock_create, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Action `inspect`: what the first bytes were and said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_bytes: Option<FirstBytes>,
    /// Actions `unix_connect` / `unix_send`: the socket address the agent gave.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unix: Option<UnixAddress>,
    /// An allowed flow aggregated in the kernel: this record stands for
    /// `count` decisions (`ts` is the last one's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow: Option<FlowSpan>,
}

/// The decisions an allow record of a flow stands for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlowSpan {
    pub count: u64,
    pub first_seen: chrono::DateTime<chrono::Utc>,
    pub last_seen: chrono::DateTime<chrono::Utc>,
}

/// A unix socket address as the agent wrote it (actions `unix_connect`, `unix_send`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UnixAddress {
    /// `path`, `abstract`, or `unreadable` (the hook could not read it).
    pub kind: &'static str,
    /// The path, or the abstract name without its leading NUL;
    /// non-printable bytes escaped as `\xNN`.
    pub name: String,
}

/// What a connection's first bytes were (action `inspect`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FirstBytes {
    /// `tls`, `http`, or `other` (`udp` for UDP refused at connect/sendmsg).
    pub kind: &'static str,
    /// Why they were refused (`name-mismatch`, `no-sni`, `ech`,
    /// `not-tls-or-http`, ...); `None` when allowed.
    pub reason: Option<&'static str>,
    /// The name presented (TLS SNI or HTTP Host), non-printable bytes
    /// escaped, at most 128 bytes of it (`...` when cut).
    pub name: Option<String>,
}
