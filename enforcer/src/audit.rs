//! Tamper-evident audit log (events/ -> audit).
//!
//! # Format
//!
//! JSON Lines, one record per line, `\n`-terminated, appended to one file.
//! Every record carries
//!
//! - `seq`: `u64`, 0 for the first record of a file, then +1 per record;
//! - `prev_hash`: SHA-256 (lowercase hex) of the previous record's exact line
//!   bytes without the trailing newline; 64 zeros ([`ZERO_HASH`]) for `seq` 0.
//!
//! A decision record is the [`Decision`] flattened (DESIGN.md section 5):
//!
//! ```json
//! {"seq":7,"ts":"2026-11-02T10:00:00.123Z","identity":{"name":"research-agent",
//!  "spiffe_id":"spiffe://example.org/ns/agents/sa/research"},"cgroup_id":4242,
//!  "pid":311,"comm":"curl","action":"connect","ip":"203.0.113.9","port":443,
//!  "protocol":"tcp","host":null,"verdict":"deny","rule":"default-deny",
//!  "policy_hash":"ab12...","prev_hash":"9f86..."}
//! ```
//!
//! (one line in the file; `ip`, `port`, `protocol` and `host` are `null` when
//! unknown, `detail` is present only when the decision has one).
//!
//! A lifecycle record ([`LifecycleEvent`]) shares the chain and has `seq`, `ts`,
//! `identity` (`null` for daemon-wide events such as `start`), `action` (one
//! of [`LifecycleAction`]: `policy_load`, `policy_reload_rejected`, `attach`,
//! `detach`, `start`, `stop`, `chain_resume`), optional `cgroup_id` and
//! `policy_hash`, `detail` and `prev_hash`. The two kinds never share an
//! `action` value.
//!
//! # The OCSF format
//!
//! With [`AuditFormat::Ocsf`] (`--audit-format ocsf`, `auditFormat: ocsf`)
//! each line is instead the OCSF 1.3.0 event of the same record
//! ([`crate::ocsf`]): the record's `seq` is `metadata.sequence`, its `action`
//! `metadata.event_code`, and `prev_hash` is `unmapped.prev_hash`, the same
//! SHA-256 over the previous line's exact bytes. Everything below (reopening,
//! torn tails, `chain_resume`, [`verify`]) works the same on both; a file
//! holds one format: opening a file whose last record is of the other format
//! fails ([`AuditError::FormatMismatch`]) and [`verify`] reports a record of
//! the other format ([`Problem::MixedFormat`]). The JSON path does not build
//! OCSF events: the format is chosen once, at open.
//!
//! # Reopening and torn tails
//!
//! [`AuditLog::open`] continues an existing file: it reads only the last line
//! (its `seq` and hash); it does not re-verify the whole file (use [`verify`]).
//! If the file does not end in `\n` the previous writer died mid-write:
//!
//! - if the unterminated line is nevertheless a complete record correctly
//!   chained to the line before it, only the missing `\n` is added;
//! - otherwise the torn bytes are **truncated** and the first record written is
//!   a `chain_resume` lifecycle record, chained to the last good line, whose
//!   `detail` gives the offset, length and SHA-256 of the removed bytes and a
//!   (lossy, bounded) copy of them. Truncating keeps the invariant that every
//!   line of the file is a valid record, so [`verify`] stays strict, while the
//!   `chain_resume` record keeps the evidence that something was cut.
//!
//! A complete last line that is not a valid record is not a crash artefact: the
//! file is refused ([`AuditError::Corrupt`]) rather than silently "repaired".
//!
//! # What the chain proves
//!
//! Any change to, removal of, insertion or reordering of a record *followed by
//! at least one other record* is detected by [`verify`]. Removing records from
//! the **end** of the file (or rewriting the last record) cannot be detected
//! from the file alone: anchor [`VerifyReport::head`] (the hash of the last
//! record) and its `seq` somewhere the agent cannot write (printed by the CLI,
//! shipped to a log collector) and compare later. The chain is not keyed:
//! someone able to rewrite the whole file can recompute it; the anchor is what
//! makes that detectable.
//!
//! # Cost
//!
//! A record is serialized into a reused buffer, hashed once and copied into a
//! 64 KiB [`BufWriter`]; nothing is flushed until [`AuditLog::flush`] (call it
//! once per ring-buffer batch, or use [`AuditLog::append_batch`]).
//! `fsync` after a flush is optional ([`AuditOptions::fsync`]).
//!
//! One writer per file: `open` takes an exclusive `flock(2)` on the file, so a
//! second daemon pointed at the same path fails instead of forking the chain.
use std::{
    borrow::Cow,
    fs::{File, OpenOptions},
    io::{self, BufRead, BufReader, BufWriter, Write},
    net::IpAddr,
    os::unix::{fs::FileExt, io::AsRawFd},
    path::{Path, PathBuf},
};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    events::{Action, Decision, IdentityRef, Verdict},
    ocsf,
};

/// `prev_hash` of the first record of a file.
pub const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// An unterminated tail longer than this is not a torn record (records are a
/// few hundred bytes): the file is refused instead of truncated.
const MAX_TORN_TAIL: u64 = 1 << 20;
/// The last complete line is read back on open; a longer one is not ours.
pub(crate) const MAX_LINE: u64 = 1 << 20;
/// How much of a truncated torn tail is copied into the `chain_resume` record.
const TORN_PREVIEW: usize = 4096;
const WRITE_BUFFER: usize = 64 * 1024;

type Hash = [u8; 32];

/// How the records of a log are written; one format per file.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum AuditFormat {
    /// JSON Lines records (DESIGN.md section 5).
    #[default]
    Json,
    /// OCSF 1.3.0 events, one per line (`ocsf.rs`), with the same hash chain.
    Ocsf,
}

impl AuditFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Ocsf => "ocsf",
        }
    }
}

impl std::fmt::Display for AuditFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AuditFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "json" => Ok(Self::Json),
            "ocsf" => Ok(Self::Ocsf),
            other => Err(format!(
                "unknown audit log format {other:?}: expected json or ocsf"
            )),
        }
    }
}

/// Non-decision events recorded in the same chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleAction {
    PolicyLoad,
    /// A new version of an already loaded policy replaced the old one.
    PolicyReload,
    PolicyReloadRejected,
    /// A policy disappeared; its bound cgroups fail closed.
    PolicyRemove,
    Attach,
    Detach,
    Start,
    Stop,
    /// Written by [`AuditLog::open`] itself after truncating a torn tail.
    ChainResume,
    /// An identity read a `taint` file: its egress is now `onTaint` only.
    TaintClamp,
}

impl LifecycleAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PolicyLoad => "policy_load",
            Self::PolicyReload => "policy_reload",
            Self::PolicyRemove => "policy_remove",
            Self::PolicyReloadRejected => "policy_reload_rejected",
            Self::Attach => "attach",
            Self::Detach => "detach",
            Self::Start => "start",
            Self::Stop => "stop",
            Self::ChainResume => "chain_resume",
            Self::TaintClamp => "taint_clamp",
        }
    }
    pub const ALL: [LifecycleAction; 10] = [
        Self::PolicyLoad,
        Self::PolicyReload,
        Self::PolicyReloadRejected,
        Self::PolicyRemove,
        Self::Attach,
        Self::Detach,
        Self::Start,
        Self::Stop,
        Self::ChainResume,
        Self::TaintClamp,
    ];
    /// The lifecycle action named `name` in an audit record (`as_str`'s inverse).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == name)
    }
}

/// A lifecycle record: policy loads, attach/detach, daemon start/stop.
#[derive(Clone, Debug, PartialEq)]
pub struct LifecycleEvent {
    pub ts: DateTime<Utc>,
    pub action: LifecycleAction,
    /// `None` for daemon-wide events (serialized as `null`).
    pub identity: Option<IdentityRef>,
    pub cgroup_id: Option<u64>,
    pub policy_hash: Option<String>,
    pub detail: String,
}

impl LifecycleEvent {
    /// A daemon-wide event stamped now; add context with the `with_*` methods.
    pub fn new(action: LifecycleAction, detail: impl Into<String>) -> Self {
        Self {
            ts: Utc::now(),
            action,
            identity: None,
            cgroup_id: None,
            policy_hash: None,
            detail: detail.into(),
        }
    }
    pub fn with_identity(mut self, identity: IdentityRef) -> Self {
        self.identity = Some(identity);
        self
    }
    pub fn with_cgroup_id(mut self, cgroup_id: u64) -> Self {
        self.cgroup_id = Some(cgroup_id);
        self
    }
    pub fn with_policy_hash(mut self, policy_hash: impl Into<String>) -> Self {
        self.policy_hash = Some(policy_hash.into());
        self
    }
}

/// On-disk form of a decision. Borrowed, so serializing allocates nothing.
#[derive(Serialize)]
struct DecisionRecord<'a> {
    seq: u64,
    ts: &'a DateTime<Utc>,
    identity: &'a IdentityRef,
    cgroup_id: u64,
    pid: u32,
    comm: &'a str,
    action: Action,
    ip: Option<IpAddr>,
    port: Option<u16>,
    protocol: Option<&'a str>,
    host: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<&'a str>,
    verdict: Verdict,
    rule: &'a str,
    policy_hash: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
    /// Action `inspect`: `tls`, `http`, `other`, `udp`.
    #[serde(skip_serializing_if = "Option::is_none")]
    first_bytes: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    /// The name the first bytes presented (SNI or Host), escaped.
    #[serde(skip_serializing_if = "Option::is_none")]
    presented: Option<&'a str>,
    /// Unix socket actions: the address the agent gave (a path, or an
    /// abstract name without its leading NUL; non-printable bytes `\xNN`).
    #[serde(skip_serializing_if = "Option::is_none")]
    socket: Option<&'a str>,
    /// `path`, `abstract` or `unreadable`.
    #[serde(skip_serializing_if = "Option::is_none")]
    socket_kind: Option<&'a str>,
    /// An allowed flow: how many decisions this record stands for, first
    /// and last seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    flow: Option<&'a crate::events::FlowSpan>,
    prev_hash: &'a str,
}

#[derive(Serialize)]
struct LifecycleRecord<'a> {
    seq: u64,
    ts: &'a DateTime<Utc>,
    identity: Option<&'a IdentityRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup_id: Option<u64>,
    action: LifecycleAction,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy_hash: Option<&'a str>,
    detail: &'a str,
    prev_hash: &'a str,
}

/// The chain fields of a record of either format: `seq`, `prev_hash` and
/// `action` (JSON), or `metadata.sequence`, `unmapped.prev_hash` and
/// `metadata.event_code` (OCSF). Other fields are skipped (but the whole
/// line must still be valid JSON).
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(default)]
    seq: Option<u64>,
    #[serde(borrow, default)]
    prev_hash: Option<&'a str>,
    #[serde(borrow, default)]
    action: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    metadata: Option<OcsfMetadataHead<'a>>,
    #[serde(borrow, default)]
    unmapped: Option<OcsfUnmappedHead<'a>>,
}

#[derive(Deserialize)]
struct OcsfMetadataHead<'a> {
    #[serde(default)]
    sequence: Option<u64>,
    #[serde(borrow, default)]
    event_code: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct OcsfUnmappedHead<'a> {
    #[serde(borrow, default)]
    prev_hash: Option<&'a str>,
}

struct ParsedHead {
    format: AuditFormat,
    seq: u64,
    prev: Hash,
    resume: bool,
}

fn parse_head(line: &[u8]) -> Result<ParsedHead, String> {
    let head: Head<'_> = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    let (format, seq, prev_hash, action) = match (head.seq, head.metadata) {
        (Some(seq), _) => (
            AuditFormat::Json,
            seq,
            head.prev_hash.ok_or("missing field `prev_hash`")?,
            head.action,
        ),
        (
            None,
            Some(OcsfMetadataHead {
                sequence: Some(seq),
                event_code,
            }),
        ) => (
            AuditFormat::Ocsf,
            seq,
            head.unmapped
                .and_then(|u| u.prev_hash)
                .ok_or("OCSF event without `unmapped.prev_hash`")?,
            event_code,
        ),
        _ => {
            return Err("neither a JSON record (no `seq`) nor an OCSF event (no \
                        `metadata.sequence`)"
                .to_string())
        }
    };
    let mut prev = [0u8; 32];
    hex::decode_to_slice(prev_hash.as_bytes(), &mut prev)
        .map_err(|_| "prev_hash is not 64 hex digits".to_string())?;
    Ok(ParsedHead {
        format,
        seq,
        prev,
        resume: action.as_deref() == Some(LifecycleAction::ChainResume.as_str()),
    })
}

/// The format of one record (a line without its newline), or why it is none.
pub fn record_format(line: &[u8]) -> Result<AuditFormat, String> {
    parse_head(line).map(|h| h.format)
}

fn sha256(bytes: &[u8]) -> Hash {
    Sha256::digest(bytes).into()
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("audit log {path} is already open by another writer (flock)")]
    Locked { path: PathBuf },
    #[error("audit log {path}: cannot continue the chain: {reason} (at byte {offset}); move the file aside")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("audit record could not be serialized: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error(
        "audit log {path}: an earlier write failed, the chain state is unknown; reopen the log"
    )]
    Poisoned { path: PathBuf },
    /// The file holds records of the other format: one format per file.
    #[error(
        "audit log {path} is written in the {found} format, not {expected}: one format per file; \
         write to another file or keep the format {found}"
    )]
    FormatMismatch {
        path: PathBuf,
        found: AuditFormat,
        expected: AuditFormat,
    },
}

/// Options for [`AuditLog::open_with`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuditOptions {
    /// `fdatasync` the file after every [`AuditLog::flush`].
    pub fsync: bool,
    /// How records are written (a file already in the other format is refused).
    pub format: AuditFormat,
}

/// What [`AuditLog::open`] removed from the end of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// Byte offset where the torn line started (the new file length).
    pub offset: u64,
    pub len: u64,
    /// SHA-256 (hex) of the removed bytes.
    pub sha256: String,
}

/// Append-only writer of the hash-chained audit log. Not `Sync`: wrap it in a
/// mutex or give it to one task.
pub struct AuditLog {
    path: PathBuf,
    out: BufWriter<File>,
    fsync: bool,
    /// `Some` in [`AuditFormat::Ocsf`]: what the OCSF events say of the node.
    ocsf: Option<std::sync::Arc<ocsf::Context>>,
    next_seq: u64,
    prev_hex: [u8; 64],
    buf: Vec<u8>,
    appended: u64,
    torn: Option<TornTail>,
    /// A write failed (a full disk): records are refused until the file is
    /// reopened ([`AuditLog::recover`], tried at most once per
    /// [`RECOVER_EVERY`]).
    poisoned: bool,
    /// Records appended since the last successful flush (lost with the
    /// buffer if the log has to be reopened).
    unflushed: u64,
    /// Records refused while poisoned.
    lost: u64,
    last_recovery: Option<std::time::Instant>,
}

/// How often a poisoned log tries to reopen its file.
pub const RECOVER_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .field("next_seq", &self.next_seq)
            .field("head", &self.head())
            .finish_non_exhaustive()
    }
}

/// Where the chain continues after the existing content of a file.
struct Resume {
    next_seq: u64,
    prev: Hash,
    torn: Option<(TornTail, String)>,
}

impl AuditLog {
    /// Open (create, or continue) the log at `path` without fsync.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        Self::open_with(path, AuditOptions::default())
    }

    pub fn open_with(path: &Path, options: AuditOptions) -> Result<Self, AuditError> {
        let io_err = |source| AuditError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io_err)?;
        // SAFETY: flock on a valid, owned descriptor; the lock lives as long
        // as the descriptor (released when the AuditLog is dropped).
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.kind() == io::ErrorKind::WouldBlock {
                AuditError::Locked {
                    path: path.to_path_buf(),
                }
            } else {
                io_err(e)
            });
        }
        let resume = resume_point(path, &file, options)?;
        let mut log = Self {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(WRITE_BUFFER, file),
            fsync: options.fsync,
            ocsf: (options.format == AuditFormat::Ocsf)
                .then(|| std::sync::Arc::new(ocsf::Context::local())),
            next_seq: resume.next_seq,
            prev_hex: [0; 64],
            buf: Vec::with_capacity(1024),
            appended: 0,
            torn: None,
            poisoned: false,
            unflushed: 0,
            lost: 0,
            last_recovery: None,
        };
        log.set_prev(&resume.prev);
        if let Some((torn, preview)) = resume.torn {
            let detail = format!(
                "previous writer stopped mid-record: removed an unterminated tail of {} bytes at \
                 offset {} (sha256 {}); it began with {:?}",
                torn.len, torn.offset, torn.sha256, preview
            );
            log.append_lifecycle(&LifecycleEvent::new(LifecycleAction::ChainResume, detail))?;
            log.flush()?;
            log.torn = Some(torn);
        }
        Ok(log)
    }

    /// Append one decision; returns its `seq`. Buffered: call [`Self::flush`].
    pub fn append_decision(&mut self, d: &Decision) -> Result<u64, AuditError> {
        if let Some(ctx) = self.ocsf.clone() {
            return self.append_with(|buf, seq, prev_hash| {
                ocsf::write_event(buf, &ocsf::Record::from_decision(seq, prev_hash, d), &ctx)
            });
        }
        // Destructured without `..` so that a new Decision field fails to
        // compile here instead of silently missing from the audit log.
        let Decision {
            ts,
            identity,
            cgroup_id,
            pid,
            comm,
            action,
            ip,
            port,
            protocol,
            host,
            path,
            workload,
            verdict,
            rule,
            policy_hash,
            detail,
            first_bytes,
            unix,
            flow,
        } = d;
        self.append_with(|buf, seq, prev_hash| {
            serde_json::to_writer(
                buf,
                &DecisionRecord {
                    seq,
                    ts,
                    identity,
                    cgroup_id: *cgroup_id,
                    pid: *pid,
                    comm,
                    action: *action,
                    ip: *ip,
                    port: *port,
                    protocol: protocol.as_deref(),
                    host: host.as_deref(),
                    path: path.as_deref(),
                    namespace: workload.as_ref().map(|w| w.namespace.as_str()),
                    pod: workload.as_ref().map(|w| w.pod.as_str()),
                    container: workload.as_ref().and_then(|w| w.container.as_deref()),
                    verdict: *verdict,
                    rule,
                    policy_hash,
                    detail: detail.as_deref(),
                    first_bytes: first_bytes.as_ref().map(|f| f.kind),
                    reason: first_bytes.as_ref().and_then(|f| f.reason),
                    presented: first_bytes.as_ref().and_then(|f| f.name.as_deref()),
                    socket: unix.as_ref().map(|u| u.name.as_str()),
                    socket_kind: unix.as_ref().map(|u| u.kind),
                    flow: flow.as_ref(),
                    prev_hash,
                },
            )
        })
    }

    /// Append one lifecycle record; returns its `seq`. Buffered.
    pub fn append_lifecycle(&mut self, ev: &LifecycleEvent) -> Result<u64, AuditError> {
        if let Some(ctx) = self.ocsf.clone() {
            return self.append_with(|buf, seq, prev_hash| {
                ocsf::write_event(buf, &ocsf::Record::from_lifecycle(seq, prev_hash, ev), &ctx)
            });
        }
        self.append_with(|buf, seq, prev_hash| {
            serde_json::to_writer(
                buf,
                &LifecycleRecord {
                    seq,
                    ts: &ev.ts,
                    identity: ev.identity.as_ref(),
                    cgroup_id: ev.cgroup_id,
                    action: ev.action,
                    policy_hash: ev.policy_hash.as_deref(),
                    detail: &ev.detail,
                    prev_hash,
                },
            )
        })
    }

    /// Append a batch of decisions and flush once; returns how many were written.
    pub fn append_batch<'a, I>(&mut self, decisions: I) -> Result<u64, AuditError>
    where
        I: IntoIterator<Item = &'a Decision>,
    {
        let mut n = 0;
        for d in decisions {
            self.append_decision(d)?;
            n += 1;
        }
        self.flush()?;
        Ok(n)
    }

    /// Write buffered records to the file (and `fdatasync` if configured).
    pub fn flush(&mut self) -> Result<(), AuditError> {
        let res = self.out.flush().and_then(|()| {
            if self.fsync {
                self.out.get_ref().sync_data()
            } else {
                Ok(())
            }
        });
        if res.is_ok() {
            self.unflushed = 0;
        }
        res.map_err(|source| AuditError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// `seq` the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// SHA-256 (hex) of the last record written, [`ZERO_HASH`] for an empty log.
    pub fn head(&self) -> &str {
        std::str::from_utf8(&self.prev_hex).expect("hex is ASCII")
    }

    /// Records appended by this handle (including a `chain_resume`).
    pub fn appended(&self) -> u64 {
        self.appended
    }

    /// The torn tail truncated by `open`, if there was one.
    pub fn torn_tail(&self) -> Option<&TornTail> {
        self.torn.as_ref()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> AuditFormat {
        if self.ocsf.is_some() {
            AuditFormat::Ocsf
        } else {
            AuditFormat::Json
        }
    }

    fn set_prev(&mut self, hash: &Hash) {
        hex::encode_to_slice(hash, &mut self.prev_hex).expect("32 bytes -> 64 hex digits");
    }

    fn append_with<F>(&mut self, serialize: F) -> Result<u64, AuditError>
    where
        F: FnOnce(&mut Vec<u8>, u64, &str) -> serde_json::Result<()>,
    {
        if self.poisoned {
            self.recover()?;
        }
        let seq = self.next_seq;
        self.buf.clear();
        let prev_hash = std::str::from_utf8(&self.prev_hex).expect("hex is ASCII");
        serialize(&mut self.buf, seq, prev_hash)?;
        let hash = sha256(&self.buf);
        self.buf.push(b'\n');
        if let Err(source) = self.out.write_all(&self.buf) {
            // Part of the line may have reached the file; the next open
            // repairs that, this handle must not go on.
            self.poisoned = true;
            return Err(AuditError::Io {
                path: self.path.clone(),
                source,
            });
        }
        self.set_prev(&hash);
        self.next_seq += 1;
        self.appended += 1;
        self.unflushed += 1;
        Ok(seq)
    }

    /// A poisoned log (a write failed: the disk was full, say) reopens its
    /// file, at most once per [`RECOVER_EVERY`]: the unwritten buffer is
    /// dropped, the lock released, and [`AuditLog::open_with`] repairs a
    /// torn last line and continues the chain; a `chain_resume` record then
    /// says how many records were lost. Until it succeeds every record is
    /// refused (and counted).
    fn recover(&mut self) -> Result<(), AuditError> {
        let poisoned = || AuditError::Poisoned {
            path: self.path.clone(),
        };
        let now = std::time::Instant::now();
        if self
            .last_recovery
            .is_some_and(|t| now.duration_since(t) < RECOVER_EVERY)
        {
            self.lost += 1;
            return Err(poisoned());
        }
        self.last_recovery = Some(now);
        let options = AuditOptions {
            fsync: self.fsync,
            format: if self.ocsf.is_some() {
                AuditFormat::Ocsf
            } else {
                AuditFormat::Json
            },
        };
        let Ok(devnull) = File::options().write(true).open("/dev/null") else {
            self.lost += 1;
            return Err(poisoned());
        };
        // Drop what is buffered without writing it (part of it may be in
        // the file already: the reopen cuts a torn line), and the lock.
        let old = std::mem::replace(&mut self.out, BufWriter::with_capacity(0, devnull));
        drop(old.into_parts());
        match Self::open_with(&self.path, options) {
            Ok(fresh) => {
                let lost = self.lost + self.unflushed;
                let appended = self.appended;
                *self = fresh;
                self.appended += appended;
                self.append_lifecycle(&LifecycleEvent::new(
                    LifecycleAction::ChainResume,
                    format!(
                        "the audit log could not be written for a while (a write failed): up to \
                         {lost} records were lost before it was reopened"
                    ),
                ))?;
                self.flush()
            }
            Err(e) => {
                self.lost += 1;
                tracing::debug!("reopening the audit log: {e}");
                Err(poisoned())
            }
        }
    }
}

fn read_exact_at(file: &File, start: u64, end: u64) -> io::Result<Vec<u8>> {
    let mut v = vec![0; (end - start) as usize];
    file.read_exact_at(&mut v, start)?;
    Ok(v)
}

/// Start offset of the line that ends (exclusive) at `end`: one past the last
/// `\n` before `end`, or 0. `None` if that line is longer than `max`.
fn line_start(file: &File, end: u64, max: u64) -> io::Result<Option<u64>> {
    let mut chunk = [0u8; 8192];
    let mut pos = end;
    while pos > 0 {
        if end - pos > max {
            return Ok(None);
        }
        let n = pos.min(chunk.len() as u64) as usize;
        let from = pos - n as u64;
        file.read_exact_at(&mut chunk[..n], from)?;
        if let Some(i) = chunk[..n].iter().rposition(|&b| b == b'\n') {
            let start = from + i as u64 + 1;
            return Ok((end - start <= max).then_some(start));
        }
        pos = from;
    }
    Ok((end <= max).then_some(0))
}

/// Find where the chain continues; repair a torn tail (see module docs).
fn resume_point(path: &Path, file: &File, options: AuditOptions) -> Result<Resume, AuditError> {
    let fsync = options.fsync;
    let mismatch = |found| AuditError::FormatMismatch {
        path: path.to_path_buf(),
        found,
        expected: options.format,
    };
    let io_err = |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    };
    let corrupt = |offset, reason: String| AuditError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason,
    };
    let seq_overflow = |offset| corrupt(offset, "seq is at its maximum".into());
    // The complete line ending (exclusive) at `end`, as (seq after it, hash).
    let complete_line = |end: u64| -> Result<(u64, Hash), AuditError> {
        let start = line_start(file, end, MAX_LINE)
            .map_err(io_err)?
            .ok_or_else(|| corrupt(end, "last line is too long to be a record".into()))?;
        let line = read_exact_at(file, start, end).map_err(io_err)?;
        let head = parse_head(&line)
            .map_err(|e| corrupt(start, format!("last record is not valid: {e}")))?;
        if head.format != options.format {
            return Err(mismatch(head.format));
        }
        let next = head.seq.checked_add(1).ok_or_else(|| seq_overflow(start))?;
        Ok((next, sha256(&line)))
    };

    let len = file.metadata().map_err(io_err)?.len();
    if len == 0 {
        return Ok(Resume {
            next_seq: 0,
            prev: [0; 32],
            torn: None,
        });
    }
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, len - 1).map_err(io_err)?;
    if last[0] == b'\n' {
        let (next_seq, prev) = complete_line(len - 1)?;
        return Ok(Resume {
            next_seq,
            prev,
            torn: None,
        });
    }

    // Unterminated last line: the previous writer died mid-write.
    let tail_start = line_start(file, len, MAX_TORN_TAIL)
        .map_err(io_err)?
        .ok_or_else(|| {
            corrupt(
                len,
                format!("unterminated tail longer than {MAX_TORN_TAIL} bytes is not a torn record"),
            )
        })?;
    let tail = read_exact_at(file, tail_start, len).map_err(io_err)?;
    let (next_seq, prev) = if tail_start == 0 {
        (0, [0; 32])
    } else {
        complete_line(tail_start - 1)?
    };
    if let Ok(head) = parse_head(&tail) {
        if head.seq == next_seq && head.prev == prev {
            if head.format != options.format {
                return Err(mismatch(head.format));
            }
            // Whole record, only the newline is missing.
            let mut f = file;
            f.write_all(b"\n").map_err(io_err)?;
            return Ok(Resume {
                next_seq: next_seq
                    .checked_add(1)
                    .ok_or_else(|| seq_overflow(tail_start))?,
                prev: sha256(&tail),
                torn: None,
            });
        }
    }
    file.set_len(tail_start).map_err(io_err)?;
    if fsync {
        file.sync_data().map_err(io_err)?;
    }
    let preview = String::from_utf8_lossy(&tail[..tail.len().min(TORN_PREVIEW)]).into_owned();
    Ok(Resume {
        next_seq,
        prev,
        torn: Some((
            TornTail {
                offset: tail_start,
                len: tail.len() as u64,
                sha256: hex::encode(sha256(&tail)),
            },
            preview,
        )),
    })
}

// ---------------------------------------------------------------------------
// Verification

/// Result of a successful [`verify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Complete records checked.
    pub records: u64,
    /// `seq` of the last record (`None` for an empty log).
    pub last_seq: Option<u64>,
    /// SHA-256 (hex) of the last record's line: the value to anchor externally,
    /// since truncation of the tail cannot be detected from the file alone.
    /// [`ZERO_HASH`] for an empty log.
    pub head: String,
    /// `seq` of each `chain_resume` record (a torn tail was cut there).
    pub chain_resumes: Vec<u64>,
    /// Bytes after the last `\n`: a write in progress or a crash, not checked.
    pub unterminated_tail_bytes: u64,
    /// The format of the records (`None` for an empty log).
    pub format: Option<AuditFormat>,
}

/// Why the chain is broken. Record numbers are `seq` values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("not a valid audit record: {0}")]
    Malformed(String),
    #[error(
        "chain does not start at seq 0 with a zero prev_hash (first record has seq {seq}): \
         records before it were removed or it was modified"
    )]
    BadStart { seq: u64 },
    /// The record's line changed: the next record's `prev_hash` no longer matches it.
    #[error("record {seq} modified: prev_hash of record {next} does not match")]
    Modified { seq: u64, next: u64 },
    /// The record's own `prev_hash` was changed (both links around it break).
    #[error(
        "record {seq} modified: its prev_hash does not match record {prev} and the prev_hash of \
         record {next} does not match it"
    )]
    PrevHashModified { seq: u64, prev: u64, next: u64 },
    /// The `seq` field was changed while the hash link still holds.
    #[error("record modified: seq is {found}, expected {expected} (prev_hash link intact)")]
    SeqModified { found: u64, expected: u64 },
    #[error("{}", missing_message(*from, *to))]
    Missing { from: u64, to: u64 },
    #[error("records out of order or duplicated: seq {prev} is followed by seq {seq}")]
    OutOfOrder { prev: u64, seq: u64 },
    /// A record of the other format: a log is written in one format.
    #[error("{found} record in a log whose first record is {expected}: one format per file")]
    MixedFormat {
        expected: AuditFormat,
        found: AuditFormat,
    },
}

fn missing_message(from: u64, to: u64) -> String {
    let (first, last) = (from.saturating_add(1), to.saturating_sub(1));
    if first == last {
        format!("record {first} missing: seq jumps {from} -> {to}")
    } else {
        format!("records {first}..={last} missing: seq jumps {from} -> {to}")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `line` is 1-based: the first line where the chain is broken.
    #[error("line {line}: {problem}")]
    Broken { line: u64, problem: Problem },
}

impl VerifyError {
    /// The first broken line (1-based), if the log was readable.
    pub fn line(&self) -> Option<u64> {
        match self {
            Self::Io { .. } => None,
            Self::Broken { line, .. } => Some(*line),
        }
    }
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            Self::Io { .. } => None,
            Self::Broken { problem, .. } => Some(problem),
        }
    }
}

struct Rec {
    format: AuditFormat,
    line: u64,
    seq: u64,
    prev: Hash,
    hash: Hash,
    resume: bool,
}

struct Lines<R> {
    r: R,
    buf: Vec<u8>,
    line: u64,
    tail: u64,
    path: PathBuf,
}

impl<R: BufRead> Lines<R> {
    fn next(&mut self) -> Result<Option<Rec>, VerifyError> {
        self.buf.clear();
        let n = self
            .r
            .read_until(b'\n', &mut self.buf)
            .map_err(|source| VerifyError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Ok(None);
        }
        if self.buf.last() != Some(&b'\n') {
            self.tail = n as u64;
            return Ok(None);
        }
        self.line += 1;
        let body = &self.buf[..n - 1];
        let head = parse_head(body).map_err(|e| VerifyError::Broken {
            line: self.line,
            problem: Problem::Malformed(e),
        })?;
        Ok(Some(Rec {
            format: head.format,
            line: self.line,
            seq: head.seq,
            prev: head.prev,
            hash: sha256(body),
            resume: head.resume,
        }))
    }
}

/// Check the link from `prev` to `cur`; `next` (when readable) disambiguates
/// which record was changed.
fn check_link(prev: Option<&Rec>, cur: &Rec, next: Option<&Rec>) -> Result<(), VerifyError> {
    let broken = |line, problem| Err(VerifyError::Broken { line, problem });
    let Some(p) = prev else {
        if cur.seq == 0 && cur.prev == [0; 32] {
            return Ok(());
        }
        return broken(cur.line, Problem::BadStart { seq: cur.seq });
    };
    let expected = p.seq.wrapping_add(1);
    let hash_ok = cur.prev == p.hash;
    match (cur.seq == expected, hash_ok) {
        (true, true) => Ok(()),
        (false, true) => broken(
            cur.line,
            Problem::SeqModified {
                found: cur.seq,
                expected,
            },
        ),
        (true, false) => {
            // Either p's line changed, or cur's own prev_hash did; in the
            // latter case cur's hash changed too and the next link breaks.
            if let Some(n) = next {
                if n.seq == cur.seq.wrapping_add(1) && n.prev != cur.hash {
                    return broken(
                        cur.line,
                        Problem::PrevHashModified {
                            seq: cur.seq,
                            prev: p.seq,
                            next: n.seq,
                        },
                    );
                }
            }
            broken(
                p.line,
                Problem::Modified {
                    seq: p.seq,
                    next: cur.seq,
                },
            )
        }
        (false, false) => {
            let reordered = next.is_some_and(|n| n.seq < cur.seq);
            if cur.seq > expected && !reordered {
                broken(
                    cur.line,
                    Problem::Missing {
                        from: p.seq,
                        to: cur.seq,
                    },
                )
            } else {
                broken(
                    cur.line,
                    Problem::OutOfOrder {
                        prev: p.seq,
                        seq: cur.seq,
                    },
                )
            }
        }
    }
}

/// Verify the whole chain of the log at `path`: every complete line is a
/// valid record, `seq` starts at 0 and increments by 1, and every `prev_hash`
/// is the SHA-256 of the line before it (zeros for the first).
///
/// Removal of records at the end of the file is **not** detectable here:
/// compare [`VerifyReport::head`] / `last_seq` with an anchor kept elsewhere.
pub fn verify(path: &Path) -> Result<VerifyReport, VerifyError> {
    let file = File::open(path).map_err(|source| VerifyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    verify_reader(BufReader::with_capacity(256 * 1024, file), path)
}

/// [`verify`] over the log's bytes from `r` (`path` names it in errors):
/// the fuzzer's entry point, and what `verify` does after opening the file.
pub fn verify_reader(r: impl BufRead, path: &Path) -> Result<VerifyReport, VerifyError> {
    let mut lines = Lines {
        r,
        buf: Vec::with_capacity(1024),
        line: 0,
        tail: 0,
        path: path.to_path_buf(),
    };
    let mut report = VerifyReport {
        records: 0,
        last_seq: None,
        head: ZERO_HASH.to_string(),
        chain_resumes: Vec::new(),
        unterminated_tail_bytes: 0,
        format: None,
    };
    let mut prev: Option<Rec> = None;
    let mut cur = lines.next()?;
    while let Some(c) = cur {
        let expected = *report.format.get_or_insert(c.format);
        if c.format != expected {
            return Err(VerifyError::Broken {
                line: c.line,
                problem: Problem::MixedFormat {
                    expected,
                    found: c.format,
                },
            });
        }
        // Read one record ahead; a bad next line is reported after `c`.
        let next = lines.next();
        check_link(
            prev.as_ref(),
            &c,
            next.as_ref().ok().and_then(Option::as_ref),
        )?;
        report.records += 1;
        if c.resume {
            report.chain_resumes.push(c.seq);
        }
        prev = Some(c);
        cur = next?;
    }
    if let Some(p) = prev {
        report.last_seq = Some(p.seq);
        report.head = hex::encode(p.hash);
    }
    report.unterminated_tail_bytes = lines.tail;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A full disk (the agent can fill the file system the log is on): the
    /// writes fail, the log refuses records, then reopens its file on a
    /// later record, cuts the torn line, says what was lost in a
    /// `chain_resume` record and goes on; the chain verifies.
    #[test]
    fn a_log_whose_writes_failed_reopens_and_goes_on() {
        use std::os::unix::io::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut log = AuditLog::open(&path).unwrap();
        for i in 0..3 {
            log.append_decision(&decision(i)).unwrap();
        }
        log.flush().unwrap();
        // From now on the file is "full": its descriptor writes to /dev/full.
        let full = File::options().write(true).open("/dev/full").unwrap();
        let fd = log.out.get_ref().as_raw_fd();
        assert!(unsafe { libc::dup2(full.as_raw_fd(), fd) } >= 0);
        let mut failed = false;
        for i in 3..1000 {
            if log.append_decision(&decision(i)).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed && log.poisoned, "a 64 KiB buffer must fill");
        // Recovery on the next record: the path is a writable file again.
        let seq = log.append_decision(&decision(2000)).unwrap();
        log.flush().unwrap();
        assert!(!log.poisoned);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert_eq!(lines[3]["action"], "chain_resume");
        assert!(
            lines[3]["detail"]
                .as_str()
                .unwrap()
                .contains("records were lost before it was reopened"),
            "{}",
            lines[3]
        );
        assert_eq!(lines[4]["seq"].as_u64(), Some(seq));
        assert_eq!(lines[4]["pid"], decision(2000).pid);
        verify(&path).unwrap();
        // A log that cannot reopen (yet: here its path is a directory now)
        // refuses records, and tries again only after RECOVER_EVERY.
        let fd = log.out.get_ref().as_raw_fd();
        assert!(unsafe { libc::dup2(full.as_raw_fd(), fd) } >= 0);
        std::fs::rename(&path, dir.path().join("moved.jsonl")).unwrap();
        std::fs::create_dir(&path).unwrap();
        let mut refused = 0;
        for i in 0..1000 {
            if log.append_decision(&decision(3000 + i)).is_err() {
                refused += 1;
            }
        }
        assert!(refused > 800 && log.poisoned, "{refused}");
        let tried = log.last_recovery.unwrap();
        assert!(log.append_decision(&decision(5000)).is_err());
        assert_eq!(
            log.last_recovery,
            Some(tried),
            "no retry within RECOVER_EVERY"
        );
        assert!(log.lost >= 800);
    }

    fn decision(i: u64) -> Decision {
        Decision {
            ts: DateTime::from_timestamp(1_800_000_000 + i as i64, 0).unwrap(),
            identity: IdentityRef {
                name: "research-agent".into(),
                spiffe_id: Some("spiffe://example.org/ns/agents/sa/research".into()),
            },
            cgroup_id: 4242,
            pid: 300 + i as u32,
            comm: "curl".into(),
            action: Action::Connect,
            ip: Some("203.0.113.9".parse().unwrap()),
            port: Some(443),
            protocol: Some("tcp".into()),
            host: None,
            path: None,
            workload: None,
            verdict: if i.is_multiple_of(2) {
                Verdict::Deny
            } else {
                Verdict::Allow
            },
            rule: "default-deny".into(),
            policy_hash: "ab".repeat(32),
            detail: (i == 3).then(|| "family=inet".to_string()),
            first_bytes: None,
            unix: None,
            flow: None,
        }
    }

    fn write_n(path: &Path, n: u64) {
        let mut log = AuditLog::open(path).unwrap();
        let ds: Vec<_> = (0..n).map(decision).collect();
        assert_eq!(log.append_batch(&ds).unwrap(), n);
    }

    fn lines(path: &Path) -> Vec<String> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        let mut s = lines.join("\n");
        s.push('\n');
        fs::write(path, s).unwrap();
    }

    fn broken(path: &Path) -> (u64, Problem) {
        match verify(path) {
            Err(VerifyError::Broken { line, problem }) => (line, problem),
            other => panic!("expected a broken chain, got {other:?}"),
        }
    }

    #[test]
    fn audit_records_have_contract_fields_and_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_n(&path, 5);
        let ls = lines(&path);
        assert_eq!(ls.len(), 5);
        let mut prev = ZERO_HASH.to_string();
        for (i, l) in ls.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["seq"], i as u64);
            assert_eq!(v["prev_hash"], prev.as_str());
            for k in [
                "ts",
                "cgroup_id",
                "pid",
                "comm",
                "action",
                "ip",
                "port",
                "protocol",
                "host",
                "verdict",
                "rule",
                "policy_hash",
            ] {
                assert!(v.get(k).is_some(), "missing {k} in {l}");
            }
            assert_eq!(v["identity"]["name"], "research-agent");
            assert_eq!(
                v["identity"]["spiffe_id"],
                "spiffe://example.org/ns/agents/sa/research"
            );
            assert_eq!(v["action"], "connect");
            assert_eq!(v["ip"], "203.0.113.9");
            assert_eq!(v["port"], 443);
            assert_eq!(v.get("detail").is_some(), i == 3);
            prev = hex::encode(Sha256::digest(l.as_bytes()));
        }
        let report = verify(&path).unwrap();
        assert_eq!(report.records, 5);
        assert_eq!(report.last_seq, Some(4));
        assert_eq!(report.head, prev);
        assert!(report.chain_resumes.is_empty());
    }

    #[test]
    fn audit_verify_ok_many_and_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        write_n(&path, 1000);
        let r = verify(&path).unwrap();
        assert_eq!((r.records, r.last_seq), (1000, Some(999)));

        let empty = dir.path().join("empty.jsonl");
        drop(AuditLog::open(&empty).unwrap());
        let r = verify(&empty).unwrap();
        assert_eq!((r.records, r.last_seq), (0, None));
        assert_eq!(r.head, ZERO_HASH);
    }

    #[test]
    fn audit_detects_modified_byte_in_middle_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        write_n(&path, 10);
        let mut ls = lines(&path);
        ls[4] = ls[4].replacen("\"curl\"", "\"curm\"", 1); // line 5 = seq 4
        write_lines(&path, &ls);
        let (line, problem) = broken(&path);
        assert_eq!(line, 5);
        assert_eq!(problem, Problem::Modified { seq: 4, next: 5 });
        assert_eq!(
            problem.to_string(),
            "record 4 modified: prev_hash of record 5 does not match"
        );
    }

    #[test]
    fn audit_detects_modified_prev_hash_and_seq_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        write_n(&path, 10);
        let orig = lines(&path);

        let mut ls = orig.clone();
        let v: serde_json::Value = serde_json::from_str(&ls[6]).unwrap();
        let ph = v["prev_hash"].as_str().unwrap().to_string();
        let mut flipped = ph.clone().into_bytes();
        flipped[10] = if flipped[10] == b'0' { b'1' } else { b'0' };
        ls[6] = ls[6].replace(&ph, std::str::from_utf8(&flipped).unwrap());
        write_lines(&path, &ls);
        assert_eq!(
            broken(&path),
            (
                7,
                Problem::PrevHashModified {
                    seq: 6,
                    prev: 5,
                    next: 7
                }
            )
        );

        let mut ls = orig.clone();
        ls[6] = ls[6].replacen("\"seq\":6", "\"seq\":60", 1);
        write_lines(&path, &ls);
        assert_eq!(
            broken(&path),
            (
                7,
                Problem::SeqModified {
                    found: 60,
                    expected: 6
                }
            )
        );

        let mut ls = orig;
        ls[2] = ls[2].replacen("\"seq\":2", "\"seq\":2,", 1); // no longer JSON
        write_lines(&path, &ls);
        let (line, problem) = broken(&path);
        assert_eq!(line, 3);
        assert!(matches!(problem, Problem::Malformed(_)), "{problem:?}");
    }

    #[test]
    fn audit_detects_deleted_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        write_n(&path, 10);
        let orig = lines(&path);

        let mut ls = orig.clone();
        ls.remove(5); // seq 5
        write_lines(&path, &ls);
        let (line, problem) = broken(&path);
        assert_eq!(
            (line, problem.clone()),
            (6, Problem::Missing { from: 4, to: 6 })
        );
        assert_eq!(problem.to_string(), "record 5 missing: seq jumps 4 -> 6");

        let mut ls = orig.clone();
        ls.drain(3..6);
        write_lines(&path, &ls);
        let (line, problem) = broken(&path);
        assert_eq!(line, 4);
        assert_eq!(
            problem.to_string(),
            "records 3..=5 missing: seq jumps 2 -> 6"
        );

        let mut ls = orig.clone();
        ls.remove(0);
        write_lines(&path, &ls);
        assert_eq!(broken(&path), (1, Problem::BadStart { seq: 1 }));

        // Cutting the tail is only visible against an anchored head.
        let full_head = {
            write_lines(&path, &orig);
            verify(&path).unwrap().head
        };
        write_lines(&path, &orig[..8]);
        let r = verify(&path).unwrap();
        assert_eq!(r.last_seq, Some(7));
        assert_ne!(r.head, full_head);
    }

    #[test]
    fn audit_detects_reordered_and_duplicated_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        write_n(&path, 10);
        let orig = lines(&path);

        let mut ls = orig.clone();
        ls.swap(3, 4);
        write_lines(&path, &ls);
        assert_eq!(broken(&path), (4, Problem::OutOfOrder { prev: 2, seq: 4 }));

        let mut ls = orig.clone();
        ls.swap(2, 7);
        write_lines(&path, &ls);
        assert_eq!(broken(&path), (3, Problem::OutOfOrder { prev: 1, seq: 7 }));

        let mut ls = orig;
        ls.insert(5, ls[4].clone());
        write_lines(&path, &ls);
        assert_eq!(broken(&path), (6, Problem::OutOfOrder { prev: 4, seq: 4 }));
    }

    #[test]
    fn audit_reopen_continues_chain_with_lifecycle_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        {
            let mut log = AuditLog::open(&path).unwrap();
            log.append_lifecycle(&LifecycleEvent::new(LifecycleAction::Start, "v0.1.0"))
                .unwrap();
            log.append_decision(&decision(0)).unwrap();
            log.flush().unwrap();
        }
        let head_before = verify(&path).unwrap().head;
        {
            let mut log = AuditLog::open(&path).unwrap();
            assert_eq!(log.next_seq(), 2);
            assert_eq!(log.head(), head_before);
            let id = decision(0).identity;
            let seq = log
                .append_lifecycle(
                    &LifecycleEvent::new(LifecycleAction::PolicyLoad, "policies/research.yaml")
                        .with_identity(id)
                        .with_cgroup_id(4242)
                        .with_policy_hash("cd".repeat(32)),
                )
                .unwrap();
            assert_eq!(seq, 2);
            log.append_decision(&decision(1)).unwrap();
            log.append_lifecycle(&LifecycleEvent::new(LifecycleAction::Stop, "signal"))
                .unwrap();
            log.flush().unwrap();
            assert_eq!(log.appended(), 3);
        }
        let r = verify(&path).unwrap();
        assert_eq!((r.records, r.last_seq), (5, Some(4)));
        let ls = lines(&path);
        let start: serde_json::Value = serde_json::from_str(&ls[0]).unwrap();
        assert_eq!(start["action"], "start");
        assert!(start["identity"].is_null());
        let load: serde_json::Value = serde_json::from_str(&ls[2]).unwrap();
        assert_eq!(load["action"], "policy_load");
        assert_eq!(load["identity"]["name"], "research-agent");
        assert_eq!(load["cgroup_id"], 4242);
        assert_eq!(load["detail"], "policies/research.yaml");
    }

    #[test]
    fn audit_torn_tail_is_truncated_and_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        write_n(&path, 4);
        let good_len = fs::metadata(&path).unwrap().len();
        let good_head = verify(&path).unwrap().head;
        // Crash mid-record.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"seq":4,"ts":"2027-01-"#).unwrap();
        drop(f);
        // verify reports the tail without failing.
        let r = verify(&path).unwrap();
        assert_eq!((r.records, r.unterminated_tail_bytes), (4, 23));

        let mut log = AuditLog::open(&path).unwrap();
        let torn = log.torn_tail().unwrap().clone();
        assert_eq!((torn.offset, torn.len), (good_len, 23));
        assert_eq!(log.next_seq(), 5);
        log.append_decision(&decision(5)).unwrap();
        log.flush().unwrap();
        drop(log);

        let r = verify(&path).unwrap();
        assert_eq!((r.records, r.last_seq), (6, Some(5)));
        assert_eq!(r.chain_resumes, vec![4]);
        assert_eq!(r.unterminated_tail_bytes, 0);
        let resume: serde_json::Value = serde_json::from_str(&lines(&path)[4]).unwrap();
        assert_eq!(resume["action"], "chain_resume");
        assert_eq!(resume["prev_hash"], good_head.as_str());
        let detail = resume["detail"].as_str().unwrap();
        assert!(detail.contains("23 bytes"), "{detail}");
        assert!(detail.contains("2027-01-"), "{detail}");
    }

    #[test]
    fn audit_torn_tail_edge_cases() {
        let dir = tempfile::tempdir().unwrap();

        // Torn first line: new chain starting with chain_resume at seq 0.
        let path = dir.path().join("first.jsonl");
        fs::write(&path, b"\0\0\0\0").unwrap();
        let log = AuditLog::open(&path).unwrap();
        assert_eq!(log.next_seq(), 1);
        drop(log);
        let r = verify(&path).unwrap();
        assert_eq!((r.records, r.chain_resumes.clone()), (1, vec![0]));

        // Complete record whose newline was lost: kept, only "\n" added.
        let path = dir.path().join("nl.jsonl");
        write_n(&path, 3);
        let content = fs::read(&path).unwrap();
        fs::write(&path, &content[..content.len() - 1]).unwrap();
        let log = AuditLog::open(&path).unwrap();
        assert!(log.torn_tail().is_none());
        assert_eq!(log.next_seq(), 3);
        drop(log);
        assert_eq!(fs::read(&path).unwrap(), content);

        // A complete but invalid last line is refused, not repaired.
        let path = dir.path().join("bad.jsonl");
        write_n(&path, 2);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"not json\n").unwrap();
        drop(f);
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::Corrupt { .. })
        ));
    }

    #[test]
    fn audit_extreme_seq_does_not_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let max = format!("{{\"seq\":{},\"prev_hash\":\"{ZERO_HASH}\"}}", u64::MAX);
        write_lines(&path, &[max.clone(), max]);
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::Corrupt { .. })
        ));
        let err = verify(&path).unwrap_err();
        assert_eq!(err.line(), Some(1));
        let _ = err.to_string();
    }

    #[test]
    fn audit_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let _first = AuditLog::open(&path).unwrap();
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::Locked { .. })
        ));
    }

    /// Throughput check for the ring-buffer path (not a regression gate):
    /// `cargo test --release -p enforcer -- --ignored audit_throughput --nocapture`.
    #[test]
    #[ignore]
    fn audit_throughput() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let mut log = AuditLog::open(&path).unwrap();
        let batch: Vec<_> = (0..1000).map(decision).collect();
        let start = std::time::Instant::now();
        for _ in 0..200 {
            log.append_batch(&batch).unwrap();
        }
        let per_sec = 200_000.0 / start.elapsed().as_secs_f64();
        eprintln!("audit: {per_sec:.0} records/s");
        let start = std::time::Instant::now();
        verify(&path).unwrap();
        eprintln!(
            "verify: {:.0} records/s",
            200_000.0 / start.elapsed().as_secs_f64()
        );
    }

    fn open_ocsf(path: &Path) -> Result<AuditLog, AuditError> {
        AuditLog::open_with(
            path,
            AuditOptions {
                format: AuditFormat::Ocsf,
                ..AuditOptions::default()
            },
        )
    }

    #[test]
    fn audit_ocsf_log_verifies_and_detects_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.ocsf.jsonl");
        {
            let mut log = open_ocsf(&path).unwrap();
            assert_eq!(log.format(), AuditFormat::Ocsf);
            log.append_lifecycle(&LifecycleEvent::new(LifecycleAction::Start, "v0.1.0"))
                .unwrap();
            let ds: Vec<_> = (1..10).map(decision).collect();
            log.append_batch(&ds).unwrap();
        }
        let orig = lines(&path);
        assert_eq!(orig.len(), 10);
        let mut prev = ZERO_HASH.to_string();
        for (i, l) in orig.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["metadata"]["sequence"], i as u64);
            assert_eq!(v["metadata"]["version"], crate::ocsf::OCSF_VERSION);
            assert_eq!(v["unmapped"]["prev_hash"], prev.as_str());
            assert_eq!(v["class_uid"], if i == 0 { 6002 } else { 4001 });
            assert!(v.get("seq").is_none() && v.get("prev_hash").is_none());
            prev = hex::encode(Sha256::digest(l.as_bytes()));
        }
        let r = verify(&path).unwrap();
        assert_eq!((r.records, r.last_seq), (10, Some(9)));
        assert_eq!(
            (r.head.as_str(), r.format),
            (prev.as_str(), Some(AuditFormat::Ocsf))
        );

        // One byte of a middle record.
        let mut ls = orig.clone();
        ls[4] = ls[4].replacen("\"curl\"", "\"curm\"", 1); // line 5 = seq 4
        write_lines(&path, &ls);
        let err = verify(&path).unwrap_err();
        assert_eq!(err.line(), Some(5));
        assert_eq!(err.problem(), Some(&Problem::Modified { seq: 4, next: 5 }));
        assert_eq!(
            err.to_string(),
            "line 5: record 4 modified: prev_hash of record 5 does not match"
        );

        // Its prev_hash, its sequence, a record removed.
        let mut ls = orig.clone();
        let v: serde_json::Value = serde_json::from_str(&ls[6]).unwrap();
        let ph = v["unmapped"]["prev_hash"].as_str().unwrap().to_string();
        let flipped = format!(
            "{}{}",
            if ph.starts_with('0') { "1" } else { "0" },
            &ph[1..]
        );
        ls[6] = ls[6].replace(&ph, &flipped);
        write_lines(&path, &ls);
        assert_eq!(
            broken(&path),
            (
                7,
                Problem::PrevHashModified {
                    seq: 6,
                    prev: 5,
                    next: 7
                }
            )
        );
        let mut ls = orig.clone();
        ls[6] = ls[6].replacen("\"sequence\":6", "\"sequence\":60", 1);
        write_lines(&path, &ls);
        assert_eq!(
            broken(&path),
            (
                7,
                Problem::SeqModified {
                    found: 60,
                    expected: 6
                }
            )
        );
        let mut ls = orig.clone();
        ls.remove(5);
        write_lines(&path, &ls);
        assert_eq!(broken(&path), (6, Problem::Missing { from: 4, to: 6 }));

        // A JSON record among OCSF events.
        let json_path = dir.path().join("a.jsonl");
        write_n(&json_path, 3);
        let mut ls = orig;
        ls.insert(3, lines(&json_path)[1].clone());
        write_lines(&path, &ls);
        assert_eq!(
            broken(&path),
            (
                4,
                Problem::MixedFormat {
                    expected: AuditFormat::Ocsf,
                    found: AuditFormat::Json
                }
            )
        );
    }

    #[test]
    fn audit_ocsf_reopen_torn_tail_and_format_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.ocsf.jsonl");
        {
            let mut log = open_ocsf(&path).unwrap();
            log.append_batch(&[decision(0), decision(1)]).unwrap();
        }
        let head = verify(&path).unwrap().head;
        {
            let mut log = open_ocsf(&path).unwrap();
            assert_eq!((log.next_seq(), log.head()), (2, head.as_str()));
            log.append_batch(&[decision(2)]).unwrap();
        }
        assert_eq!(verify(&path).unwrap().records, 3);

        // The other format is refused both ways, and nothing is written.
        let before = fs::read(&path).unwrap();
        let e = AuditLog::open(&path).unwrap_err();
        assert!(
            matches!(
                e,
                AuditError::FormatMismatch {
                    found: AuditFormat::Ocsf,
                    expected: AuditFormat::Json,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .contains("written in the ocsf format, not json"),
            "{e}"
        );
        assert_eq!(fs::read(&path).unwrap(), before);
        let json_path = dir.path().join("a.jsonl");
        write_n(&json_path, 2);
        assert!(matches!(
            open_ocsf(&json_path),
            Err(AuditError::FormatMismatch {
                found: AuditFormat::Json,
                expected: AuditFormat::Ocsf,
                ..
            })
        ));

        // Torn tail: truncated, and an OCSF chain_resume event written.
        let good_len = fs::metadata(&path).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"class_uid":4001,"metad"#).unwrap();
        drop(f);
        let mut log = open_ocsf(&path).unwrap();
        assert_eq!(log.torn_tail().unwrap().offset, good_len);
        log.append_decision(&decision(4)).unwrap();
        log.flush().unwrap();
        drop(log);
        let r = verify(&path).unwrap();
        assert_eq!((r.records, r.chain_resumes.clone()), (5, vec![3]));
        let resume: serde_json::Value = serde_json::from_str(&lines(&path)[3]).unwrap();
        assert_eq!(resume["metadata"]["event_code"], "chain_resume");
        assert_eq!(resume["class_uid"], 6002);
        assert!(resume["message"].as_str().unwrap().contains("metad"));

        // A complete OCSF record that only lost its newline is kept.
        let content = fs::read(&path).unwrap();
        fs::write(&path, &content[..content.len() - 1]).unwrap();
        let log = open_ocsf(&path).unwrap();
        assert!(log.torn_tail().is_none());
        drop(log);
        assert_eq!(fs::read(&path).unwrap(), content);
    }

    #[test]
    fn audit_fsync_option_writes_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let mut log = AuditLog::open_with(
            &path,
            AuditOptions {
                fsync: true,
                ..AuditOptions::default()
            },
        )
        .unwrap();
        log.append_decision(&decision(0)).unwrap();
        log.flush().unwrap();
        assert_eq!(verify(&path).unwrap().head, log.head());
    }
}
