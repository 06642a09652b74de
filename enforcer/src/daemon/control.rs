//! Control socket: `enforcer status` asks the running daemon what it enforces.
//!
//! A unix stream socket, mode 0600 in a 0700 directory (root only). The
//! client writes one line (`status`) and reads one JSON document.
use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::{Rejection, State};
use crate::events::sink::RecentDenial;

#[derive(Debug, Serialize, Deserialize)]
pub struct CgroupStatus {
    pub path: String,
    pub cgroup_id: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct IdentityStatus {
    pub name: String,
    pub spiffe_id: Option<String>,
    pub mode: String,
    pub policy_hash: String,
    pub source: String,
    pub slot: u32,
    pub rules: usize,
    pub entries: usize,
    pub cgroups: Vec<CgroupStatus>,
    /// Port of the identity's DNS proxy on 127.0.0.1 and ::1 (0: none).
    #[serde(default)]
    pub dns_port: u16,
    /// Network namespaces other than the daemon's (Kubernetes pods) where
    /// bound processes of the identity live, and whether the proxy listens
    /// there (at `dns_port`).
    #[serde(default)]
    pub dns_netns: Vec<NetnsStatus>,
    /// Addresses currently reachable because a DNS answer allowed them.
    #[serde(default)]
    pub learned_addresses: usize,
    /// action -> verdict -> count (kernel counters; allows the flow cache
    /// answered once their flow is drained)
    pub decisions: BTreeMap<String, BTreeMap<String, u64>>,
    pub recent_denials: Vec<RecentDenialOut>,
    /// `spec.files` rules, and the inodes they resolved to.
    #[serde(default)]
    pub file_rules: usize,
    #[serde(default)]
    pub file_inodes: usize,
    /// Rule paths that do not exist yet (not in force until they do).
    #[serde(default)]
    pub unresolved_files: Vec<String>,
    /// Set once the identity read a `taint` file: what it read, when.
    #[serde(default)]
    pub tainted: Option<String>,
    /// Kubernetes mode: the bound pods of this identity.
    #[serde(default)]
    pub pods: Vec<PodStatus>,
    /// First-bytes checks of host rules: on, and the `inspect: none` opt-outs.
    #[serde(default)]
    pub first_bytes: String,
    /// Refused first bytes (TLS SNI / HTTP Host) by reason (`reason` or
    /// `reason (audit)`).
    #[serde(default)]
    pub first_bytes_refused: BTreeMap<String, u64>,
}

/// The DNS proxy in one workload network namespace.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetnsStatus {
    /// `net:[<inode>]`, as `readlink /proc/<pid>/ns/net` prints it.
    pub netns: String,
    pub dev: u64,
    pub inode: u64,
    /// A bound process in that namespace.
    pub pid: u32,
    /// The bound cgroup it was found under.
    pub cgroup: String,
    /// Kubernetes mode: `namespace/pod`.
    pub pod: Option<String>,
    /// The proxy listens there.
    pub serving: bool,
    /// [::1] is served there too.
    pub ipv6: bool,
    /// Why it does not (retried on every reconcile).
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodStatus {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub spiffe_id: String,
    /// The pod-level cgroup the programs are attached to (empty: not yet).
    pub cgroup: String,
    pub containers: Vec<ContainerStatusOut>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerStatusOut {
    pub name: String,
    pub kind: String,
    pub container_id: Option<String>,
    /// The container's own cgroup, once it exists.
    pub cgroup: Option<String>,
    /// Pods whose policy has file rules: the inodes its rule paths resolved
    /// to in this container's root (absent until resolved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_inodes: Option<usize>,
}

pub type RecentDenialOut = RecentDenial;

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub started: String,
    pub policies_dir: String,
    pub identities: Vec<IdentityStatus>,
    pub fail_closed_cgroups: Vec<String>,
    pub waiting_cgroups: Vec<String>,
    pub rejected: Vec<Rejection>,
    pub reloads_ok: u64,
    pub reloads_rejected: u64,
    pub events_lost: u64,
    /// Processes whose packet sockets cannot be refused on this kernel.
    #[serde(default)]
    pub net_raw_processes: Vec<String>,
    /// Kernel capabilities probed at start (e.g. "bpf_lsm").
    #[serde(default)]
    pub capabilities: BTreeMap<String, Capability>,
    /// Policies enforced without their file part (no BPF LSM, allowDegraded).
    #[serde(default)]
    pub degraded: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Capability {
    pub available: bool,
    pub detail: String,
}

pub async fn serve(path: &Path, state: Arc<Mutex<State>>) -> Result<tokio::task::JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut line = String::new();
                let mut r = BufReader::new(r.take(256));
                if r.read_line(&mut line).await.is_err() {
                    return;
                }
                let reply = match line.trim() {
                    "status" => {
                        let s = state.lock().unwrap_or_else(|e| e.into_inner()).status();
                        serde_json::to_string(&s)
                            .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
                    }
                    other => serde_json::json!({ "error": format!("unknown request {other:?}") })
                        .to_string(),
                };
                let _ = w.write_all(reply.as_bytes()).await;
                let _ = w.shutdown().await;
            });
        }
    }))
}

/// `enforcer status`.
pub fn status(socket: &Path, json: bool) -> Result<i32> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the daemon at {} (is `enforcer daemon` running? status needs root)",
            socket.display()
        )
    })?;
    s.write_all(b"status\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    if json {
        println!("{buf}");
        return Ok(0);
    }
    let st: Status = serde_json::from_str(&buf).context("decoding daemon status")?;
    print!("{}", render(&st));
    Ok(0)
}

pub fn render(st: &Status) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "enforcer {} — up since {} — policies from {}",
        st.version, st.started, st.policies_dir
    );
    let _ = writeln!(
        o,
        "reloads: {} ok, {} rejected; events lost: {}",
        st.reloads_ok, st.reloads_rejected, st.events_lost
    );
    for i in &st.identities {
        let _ = writeln!(
            o,
            "\nidentity {} {}\n  mode {}  policy {} ({})  rules {}  kernel entries {}",
            i.name,
            i.spiffe_id.as_deref().unwrap_or("(no spiffe id)"),
            i.mode,
            &i.policy_hash[..i.policy_hash.len().min(12)],
            i.source,
            i.rules,
            i.entries
        );
        if i.dns_port != 0 {
            let _ = writeln!(
                o,
                "  dns proxy 127.0.0.1/[::1]:{}  learned addresses {}",
                i.dns_port, i.learned_addresses
            );
        }
        if !i.first_bytes.is_empty() {
            let _ = writeln!(o, "  {}", i.first_bytes);
        }
        if !i.first_bytes_refused.is_empty() {
            let by: Vec<String> = i
                .first_bytes_refused
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect();
            let _ = writeln!(o, "  first bytes refused: {}", by.join(", "));
        }
        for n in &i.dns_netns {
            let who = match &n.pod {
                Some(p) => format!("pod {p}, cgroup {}, pid {}", n.cgroup, n.pid),
                None => format!("cgroup {}, pid {}", n.cgroup, n.pid),
            };
            match &n.error {
                None => {
                    let _ = writeln!(
                        o,
                        "  dns proxy also in {} ({who}){}",
                        n.netns,
                        if n.ipv6 { "" } else { " 127.0.0.1 only" }
                    );
                }
                Some(e) => {
                    let _ = writeln!(o, "  dns proxy NOT in {} ({who}): {e}", n.netns);
                }
            }
        }
        if i.cgroups.is_empty() {
            let _ = writeln!(o, "  cgroups: none bound");
        }
        for c in &i.cgroups {
            let _ = writeln!(o, "  cgroup {} (id {})", c.path, c.cgroup_id);
        }
        for (action, m) in &i.decisions {
            let total: u64 = m.values().sum();
            if total > 0 {
                let _ = writeln!(
                    o,
                    "  {action:<12} allow {:>8}  deny {:>8}  audit {:>8}",
                    m.get("allow").unwrap_or(&0),
                    m.get("deny").unwrap_or(&0),
                    m.get("audit").unwrap_or(&0)
                );
            }
        }
        if i.file_rules > 0 {
            let _ = writeln!(
                o,
                "  files: {} rules, {} inodes",
                i.file_rules, i.file_inodes
            );
        }
        for u in &i.unresolved_files {
            let _ = writeln!(o, "  file rule NOT IN FORCE (path missing): {u}");
        }
        if let Some(t) = &i.tainted {
            let _ = writeln!(o, "  TAINTED: {t}");
        }
        for p in &i.pods {
            let _ = writeln!(
                o,
                "  pod {}/{} ({}) cgroup {}",
                p.namespace,
                p.name,
                p.spiffe_id,
                if p.cgroup.is_empty() {
                    "(not yet)"
                } else {
                    &p.cgroup
                }
            );
            for c in &p.containers {
                let _ = writeln!(
                    o,
                    "    {} {} {}",
                    c.kind,
                    c.name,
                    c.cgroup.as_deref().unwrap_or("(no cgroup yet)")
                );
            }
        }
        if !i.recent_denials.is_empty() {
            let _ = writeln!(o, "  recent denials:");
            for d in i.recent_denials.iter().rev().take(10) {
                let _ = writeln!(
                    o,
                    "    {} {} {} {} {} ({} pid {})",
                    d.ts, d.verdict, d.action, d.destination, d.rule, d.comm, d.pid
                );
            }
        }
    }
    for c in &st.fail_closed_cgroups {
        let _ = writeln!(o, "\nFAIL CLOSED: {c}");
    }
    for (name, c) in &st.capabilities {
        let _ = writeln!(
            o,
            "capability {name}: {} ({})",
            if c.available { "available" } else { "MISSING" },
            c.detail
        );
    }
    for d in &st.degraded {
        let _ = writeln!(o, "\n{d}");
    }
    for p in &st.net_raw_processes {
        let _ = writeln!(o, "\nWARNING: {p}");
    }
    for c in &st.waiting_cgroups {
        let _ = writeln!(o, "\nwaiting for cgroup {c} to appear");
    }
    for r in &st.rejected {
        let _ = writeln!(
            o,
            "\nREJECTED {} at {} (previous version stays in force):",
            r.file, r.at
        );
        for e in &r.errors {
            let _ = writeln!(o, "  {e}");
        }
    }
    o
}
