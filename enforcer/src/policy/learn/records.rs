//! Audit logs -> what one identity did ([`Observed`]).
//!
//! Reads the audit log of `enforcer run` or the daemon, JSON Lines (the
//! format of `crate::audit`) or OCSF events (`crate::ocsf`, mapped back to
//! the same fields), keeps the decision records of one identity
//! and sorts what they show into DNS answers, egress flows, file opens,
//! unix sockets and inbound peers. Nothing is judged here: the proposal is
//! `super::propose`'s.
use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader},
    net::IpAddr,
    path::PathBuf,
};

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::LearnError;

/// The fields of an audit record that learning reads; every other field is
/// ignored (lifecycle records and newer fields alike).
#[derive(Debug, Deserialize)]
struct Raw {
    ts: Option<DateTime<Utc>>,
    identity: Option<RawIdentity>,
    #[serde(default)]
    pid: u32,
    #[serde(default)]
    comm: String,
    action: Option<String>,
    ip: Option<IpAddr>,
    port: Option<u16>,
    protocol: Option<String>,
    host: Option<String>,
    path: Option<String>,
    namespace: Option<String>,
    verdict: Option<String>,
    #[serde(default)]
    rule: String,
    detail: Option<String>,
    reason: Option<String>,
    socket: Option<String>,
    socket_kind: Option<String>,
    flow: Option<RawFlow>,
    /// OCSF events carry this instead of `action`.
    class_uid: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct RawIdentity {
    name: String,
    spiffe_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawFlow {
    count: u64,
    first_seen: DateTime<Utc>,
    last_seen: DateTime<Utc>,
}

/// Which run a record belongs to: (file, `start` records of that file
/// before it). A DNS answer of one run explains nothing in another, and
/// each run has its own taint read.
pub type Run = (usize, usize);

/// Where a record came from, for evidence and errors.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct At {
    pub file: PathBuf,
    pub line: usize,
    /// Index of `file` in the files read.
    pub index: usize,
}

/// A DNS query the proxy answered (allowed, or would-be refused in audit
/// mode) and the addresses its answer carried.
#[derive(Debug, Clone)]
pub struct DnsSeen {
    pub run: Run,
    pub ts: DateTime<Utc>,
    pub name: String,
    pub qtype: String,
    pub answers: Vec<IpAddr>,
    pub tainted: bool,
}

/// An egress flow: `count` connects or datagrams to one destination.
#[derive(Debug, Clone)]
pub struct FlowSeen {
    pub run: Run,
    pub first: DateTime<Utc>,
    pub last: DateTime<Utc>,
    pub count: u64,
    pub ip: IpAddr,
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// The name the enforcer had learned the address from (enforce-mode
    /// logs of host rules).
    pub host: Option<String>,
    pub comm: String,
    pub pid: u32,
}

/// A file rule the agent hit: `path` is the rule's path (the audit log
/// names the rule, not the file under it).
#[derive(Debug, Clone)]
pub struct FileSeen {
    pub run: Run,
    pub ts: DateTime<Utc>,
    pub path: String,
    pub action: String,
    pub comm: String,
    pub pid: u32,
    /// `audit`, `allow`, `taint` (a `taint` rule's read).
    pub verdict: String,
}

/// A unix socket the agent connected or sent to.
#[derive(Debug, Clone)]
pub struct UnixSeen {
    pub ts: DateTime<Utc>,
    /// `path` or `abstract`.
    pub kind: String,
    pub socket: String,
    pub comm: String,
}

/// A peer outside the identity that reached one of its local ports.
#[derive(Debug, Clone)]
pub struct IngressSeen {
    pub ts: DateTime<Utc>,
    pub count: u64,
    pub peer: IpAddr,
    pub port: u16,
    pub protocol: String,
    pub comm: String,
}

/// A first-bytes judgement of a connection to a learned address that
/// failed (`not-tls-or-http`, `udp-not-inspectable`, ...).
#[derive(Debug, Clone)]
pub struct InspectSeen {
    pub ip: IpAddr,
    pub port: u16,
    pub reason: String,
}

/// Everything the logs show about one identity, in time order per kind.
#[derive(Debug, Default)]
pub struct Observed {
    pub identity: String,
    pub spiffe_ids: BTreeMap<String, u64>,
    pub namespaces: BTreeMap<String, u64>,
    pub dns: Vec<DnsSeen>,
    pub flows: Vec<FlowSeen>,
    pub files: Vec<FileSeen>,
    pub unix: Vec<UnixSeen>,
    pub ingress: Vec<IngressSeen>,
    pub inspect: Vec<InspectSeen>,
    /// When the identity was clamped (`taint_clamp` lifecycle records).
    pub taint_clamps: Vec<(Run, DateTime<Utc>)>,
    /// Decision records of the identity read.
    pub records: u64,
    /// Records not learned from, by why (`denied connect`, ...), with the
    /// first few examples.
    pub not_learned: BTreeMap<String, (u64, Vec<String>)>,
}

impl Observed {
    fn skip(&mut self, why: String, example: impl FnOnce() -> String) {
        let e = self.not_learned.entry(why).or_default();
        e.0 += 1;
        if e.1.len() < 3 {
            e.1.push(example());
        }
    }
}

/// The identities of the logs, with their decision record counts.
pub type Identities = BTreeMap<String, u64>;

/// Read every file; keep the records of `identity` (or of the only identity
/// the files name). A line that is not a JSON object, or a JSON object that
/// is not an audit record, is an error naming file and line: a truncated
/// or foreign file must not yield a silently smaller policy.
pub fn read(files: &[PathBuf], identity: Option<&str>) -> Result<Observed, LearnError> {
    let mut all: Vec<(At, Raw)> = Vec::new();
    let mut identities = Identities::new();
    for (index, f) in files.iter().enumerate() {
        let file = File::open(f).map_err(|e| LearnError::Read {
            file: f.clone(),
            error: e.to_string(),
        })?;
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let at = At {
                file: f.clone(),
                line: i + 1,
                index,
            };
            let line = line.map_err(|e| LearnError::Read {
                file: f.clone(),
                error: format!("line {}: {e}", i + 1),
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let raw = parse_line(&line, &at)?;
            if let (Some(id), Some(_)) = (&raw.identity, &raw.action) {
                if raw.verdict.is_some() {
                    *identities.entry(id.name.clone()).or_default() += 1;
                }
            }
            all.push((at, raw));
        }
    }
    let identity = match identity {
        Some(name) => {
            if !identities.contains_key(name) {
                return Err(LearnError::NoSuchIdentity {
                    name: name.to_string(),
                    seen: identities,
                });
            }
            name.to_string()
        }
        None => match identities.len() {
            0 => return Err(LearnError::NoDecisions),
            1 => identities.keys().next().cloned().unwrap_or_default(),
            _ => return Err(LearnError::SeveralIdentities(identities)),
        },
    };
    all.sort_by(|a, b| a.1.ts.cmp(&b.1.ts).then_with(|| a.0.cmp(&b.0)));
    let mut o = Observed {
        identity: identity.clone(),
        ..Observed::default()
    };
    // `start` records (of `enforcer run` or the daemon) split each file
    // into runs.
    let mut starts: Vec<Vec<DateTime<Utc>>> = vec![Vec::new(); files.len()];
    for (at, r) in &all {
        if let (Some("start"), None, Some(ts)) = (r.action.as_deref(), &r.verdict, r.ts) {
            starts[at.index].push(ts);
        }
    }
    for (at, r) in all {
        if r.identity.as_ref().map(|i| i.name.as_str()) != Some(identity.as_str()) {
            continue;
        }
        let run =
            |t: DateTime<Utc>| -> Run { (at.index, starts[at.index].partition_point(|s| *s <= t)) };
        observe(&mut o, &run, at.clone(), r);
    }
    Ok(o)
}

fn parse_line(line: &str, at: &At) -> Result<Raw, LearnError> {
    let bad = |message: String| LearnError::Record {
        at: at.clone(),
        message,
    };
    let raw: Raw = serde_json::from_str(line).map_err(|e| {
        bad(format!(
            "not an enforcer audit record: {e} (column {})",
            e.column()
        ))
    })?;
    if raw.class_uid.is_some() {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(format!("not an OCSF event: {e}")))?;
        return from_ocsf(&v).ok_or_else(|| {
            bad(
                "an OCSF event without `metadata.event_code` or `time`: not one of enforcer's"
                    .into(),
            )
        });
    }
    if raw.action.is_none() || raw.ts.is_none() {
        return Err(bad(
            "not an enforcer audit record: no `action` or `ts`".into()
        ));
    }
    Ok(raw)
}

/// An OCSF event of `enforcer --audit-format ocsf` (see `crate::ocsf`) as
/// the fields of the JSON record it was written from: `metadata.event_code`
/// is the action, `disposition_id` the verdict, `message` the detail, the
/// endpoints, query, file and `unmapped` the rest. Times are milliseconds.
fn from_ocsf(v: &serde_json::Value) -> Option<Raw> {
    use serde_json::Value;
    let s = |v: &Value| v.as_str().map(String::from);
    let ms = |v: &Value| v.as_i64().and_then(DateTime::<Utc>::from_timestamp_millis);
    let action = s(&v["metadata"]["event_code"])?;
    let ts = ms(&v["time"])?;
    let actor = &v["actor"];
    let identity = s(&actor["app_name"]).map(|name| RawIdentity {
        name,
        spiffe_id: s(&actor["app_uid"]),
    });
    let verdict = match v["disposition_id"].as_u64() {
        Some(1) => Some("allow"),
        Some(2) => Some("deny"),
        Some(15) => Some("audit"),
        Some(18) => Some("taint"),
        Some(_) => Some("unknown"),
        None => None,
    }
    .map(String::from);
    let (dst, src) = (&v["dst_endpoint"], &v["src_endpoint"]);
    let ingress = action == "ingress";
    let peer = if ingress { src } else { dst };
    let ip = peer["ip"].as_str().and_then(|a| a.parse().ok());
    let port = dst["port"]
        .as_u64()
        .or(src["port"].as_u64())
        .and_then(|p| u16::try_from(p).ok());
    let host = if action == "dns" {
        s(&v["query"]["hostname"])
    } else {
        s(&peer["hostname"])
    };
    let flow = match (
        v["count"].as_u64(),
        ms(&v["start_time"]),
        ms(&v["end_time"]),
    ) {
        (Some(count), Some(first_seen), Some(last_seen)) => Some(RawFlow {
            count,
            first_seen,
            last_seen,
        }),
        _ => None,
    };
    let un = &v["unmapped"];
    Some(Raw {
        ts: Some(ts),
        identity,
        pid: actor["process"]["pid"].as_u64().unwrap_or(0) as u32,
        comm: s(&actor["process"]["name"]).unwrap_or_default(),
        ip,
        port,
        protocol: s(&v["connection_info"]["protocol_name"]),
        host,
        path: s(&v["file"]["path"]),
        namespace: s(&un["namespace"]),
        verdict,
        rule: s(&v["firewall_rule"]["name"]).unwrap_or_default(),
        detail: s(&v["message"]),
        reason: s(&un["reason"]),
        socket: action
            .starts_with("unix_")
            .then(|| s(&dst["name"]))
            .flatten(),
        socket_kind: s(&un["socket_kind"]),
        flow,
        class_uid: None,
        action: Some(action),
    })
}

fn observe(o: &mut Observed, run: &dyn Fn(DateTime<Utc>) -> Run, at: At, r: Raw) {
    let (Some(action), Some(ts)) = (r.action.as_deref(), r.ts) else {
        return;
    };
    let Some(verdict) = r.verdict.as_deref() else {
        // A lifecycle record.
        if action == "taint_clamp" {
            o.taint_clamps.push((run(ts), ts));
        }
        return;
    };
    o.records += 1;
    if let Some(id) = r.identity.as_ref().and_then(|i| i.spiffe_id.clone()) {
        *o.spiffe_ids.entry(id).or_default() += 1;
    }
    if let Some(ns) = &r.namespace {
        *o.namespaces.entry(ns.clone()).or_default() += 1;
    }
    let place = || format!("{}:{}", at.file.display(), at.line);
    if verdict == "deny" {
        // Refused in enforce mode: the agent did not get it, and the
        // policy of the run said no. Learn from audit-mode runs.
        o.skip(format!("denied {action}"), || {
            format!("{} ({})", place(), describe(&r))
        });
        return;
    }
    match action {
        "dns" => {
            let Some(name) = r.host.clone() else { return };
            let detail = r.detail.as_deref().unwrap_or("");
            let mut answers = detail_list(detail, "learned");
            answers.extend(detail_list(detail, "answered"));
            answers.extend(detail_list(detail, "rebinding_blocked"));
            o.dns.push(DnsSeen {
                run: run(ts),
                ts,
                qtype: detail_word(detail, "qtype").unwrap_or("A").to_string(),
                tainted: detail.contains(" tainted=true"),
                name,
                answers,
            });
        }
        "connect" | "sendmsg" => {
            let (Some(ip), Some(port)) = (r.ip, r.port) else {
                return;
            };
            let protocol = r.protocol.clone().unwrap_or_default();
            if protocol != "tcp" && protocol != "udp" {
                o.skip(format!("{action} over {protocol}"), || {
                    format!("{} ({})", place(), describe(&r))
                });
                return;
            }
            let (first, last, count) = match &r.flow {
                Some(f) => (f.first_seen, f.last_seen, f.count.max(1)),
                None => (ts, ts, 1),
            };
            o.flows.push(FlowSeen {
                run: run(first),
                first,
                last,
                count,
                ip,
                port,
                protocol,
                host: r.host.clone(),
                comm: r.comm.clone(),
                pid: r.pid,
            });
        }
        "file_open" | "file_link" | "file_rename" => {
            let Some(path) = r.path.clone() else { return };
            o.files.push(FileSeen {
                run: run(ts),
                ts,
                path,
                action: action.to_string(),
                comm: r.comm.clone(),
                pid: r.pid,
                verdict: verdict.to_string(),
            });
        }
        "unix_connect" | "unix_send" => {
            let (Some(socket), Some(kind)) = (r.socket.clone(), r.socket_kind.clone()) else {
                return;
            };
            if r.rule == "resolver-ipc" || kind == "unreadable" {
                o.skip(format!("{action} ({})", r.rule), || {
                    format!("{} ({})", place(), describe(&r))
                });
                return;
            }
            o.unix.push(UnixSeen {
                ts,
                kind,
                socket,
                comm: r.comm.clone(),
            });
        }
        "ingress" => {
            let (Some(peer), Some(port)) = (r.ip, r.port) else {
                return;
            };
            o.ingress.push(IngressSeen {
                ts,
                count: r.flow.as_ref().map_or(1, |f| f.count.max(1)),
                peer,
                port,
                protocol: r.protocol.clone().unwrap_or_else(|| "tcp".into()),
                comm: r.comm.clone(),
            });
        }
        "inspect" => {
            if let (Some(ip), Some(port), Some(reason)) = (r.ip, r.port, r.reason.clone()) {
                if verdict != "allow" {
                    o.inspect.push(InspectSeen { ip, port, reason });
                }
            }
        }
        other => {
            // sock_create, syscall, packet, setsockopt, fd_receive: what
            // they refuse has no rule that allows it.
            let why = if r.rule.is_empty() {
                other.to_string()
            } else {
                format!("{other} ({})", r.rule)
            };
            o.skip(why, || format!("{} ({})", place(), describe(&r)));
        }
    }
}

fn describe(r: &Raw) -> String {
    let mut s = String::new();
    if let Some(h) = &r.host {
        s.push_str(h);
        s.push(' ');
    }
    if let (Some(ip), Some(port)) = (r.ip, r.port) {
        s.push_str(&std::net::SocketAddr::new(ip, port).to_string());
        s.push(' ');
    }
    if let Some(p) = &r.path {
        s.push_str(p);
        s.push(' ');
    }
    if let Some(d) = &r.detail {
        s.push_str(d);
        s.push(' ');
    }
    s.push_str(&format!(
        "by {}",
        if r.comm.is_empty() { "?" } else { &r.comm }
    ));
    s
}

/// `key=value` of a DNS record's detail (`qtype=A reason=... ...`).
fn detail_word<'a>(detail: &'a str, key: &str) -> Option<&'a str> {
    detail
        .split(' ')
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// `key=[a,b]` of a DNS record's detail, as addresses.
fn detail_list(detail: &str, key: &str) -> Vec<IpAddr> {
    detail_word(detail, key)
        .and_then(|v| v.strip_prefix('[')?.strip_suffix(']'))
        .map(|v| v.split(',').filter_map(|a| a.parse().ok()).collect())
        .unwrap_or_default()
}

/// For tests and callers that have the text already.
#[cfg(test)]
pub fn read_str(text: &str, identity: Option<&str>) -> Result<Observed, LearnError> {
    let dir = tempfile::tempdir().map_err(|e| LearnError::Read {
        file: PathBuf::from("tempdir"),
        error: e.to_string(),
    })?;
    let f = dir.path().join("audit.jsonl");
    std::fs::write(&f, text).map_err(|e| LearnError::Read {
        file: f.clone(),
        error: e.to_string(),
    })?;
    read(&[f], identity)
}
