//! `cargo xtask soak --minutes M`: the daemon under load and faults, on the
//! real kernel (root).
//!
//! - One `enforcer daemon` (default configuration apart from paths and a
//!   metrics address) binds `--identities` cgroups under
//!   `<cgroup2>/enforcer-soak/`, one policy file each: TCP and UDP to one
//!   port of 127.0.0.1, the names under `soak.example` (host rule), the
//!   DNS upstream the responder of `dns_upstream.rs` in this process (every
//!   answer a fresh address of 4096, TTL 5 s: learned addresses come and go).
//! - One `xtask soak-agent` per cgroup loops over allowed and denied TCP
//!   connects, UDP sendto and DNS queries (to port 53: the kernel steers
//!   them to the identity's proxy); `--flood-agents` of them also hammer a
//!   denied connect as fast as they can during flood bursts and every
//!   restart window (the ring buffer overflows: lost events are allowed).
//! - Attacker listeners in this process, on 127.0.0.2 (the allowed ports)
//!   and on other ports of 127.0.0.1, count every accepted connection,
//!   byte and datagram: all must stay 0, daemon up or down.
//! - Every `--reload-every-ms`, one policy file is rewritten: invalid (a bad
//!   CIDR, an unknown field, a port out of range, in turn) and then valid
//!   again with another extra port. Each is checked through `enforcer
//!   status` before the next: an invalid file is rejected and the policy in
//!   force keeps its hash; a valid one is installed (new hash).
//!   `SIGHUP` every `--hup-every-secs`.
//! - Every `--restart-every-secs`, once the files are valid: figures of the
//!   daemon (RSS, fds, pinned objects, programs attached to the soak's
//!   cgroups, entries of the kernel maps that could leak, reloads, lost
//!   events), then `kill -9`; `--down-secs` without a daemon (the pins
//!   enforce alone; DNS is unanswered), then a new daemon on the same
//!   configuration, which must adopt the pinned links of every cgroup
//!   (its log) and list every binding with the same policy (`enforcer
//!   status --json`). The agents count every result under the phase the
//!   soak told them: `up` or `down`.
//! - At the end: a clean stop, `enforcer audit verify` over the whole log.
//!
//! Figures of cycles 2.. are held to bounds over cycle 1's (`BOUNDS`).
//! Exits 1 on any violated check; writes `target/soak/results.json`.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Read,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::{
    daemon_harness::{remove_pins, status_json, Cgroups, Daemon, DaemonFiles, Worker},
    dns_upstream::{Upstream, Zone},
    soak_agent::PHASES,
    util, BinArgs,
};

const PIN_DIR: &str = "/sys/fs/bpf/enforcer-soak";
const CGROUP_DIR: &str = "enforcer-soak";
const ALLOWED_ZONE: &str = "soak.example";
const REFUSED_ZONE: &str = "evil.example";
/// Extra allowed TCP ports the valid rewrites alternate between (nobody
/// listens there; the attacker listeners are on ephemeral ports).
const EXTRA_PORTS: [u16; 2] = [9, 13];
/// Maps whose entries come and go with policies, bindings and DNS answers
/// (arrays have a fixed size; ring buffers have no entries).
const MAPS: &[&str] = &[
    "IDENTITIES",
    "EGRESS_V4",
    "EGRESS_V6",
    "NAMES",
    "LEARNED_V4",
    "LEARNED_V6",
    "FILE_RULES",
    "UNIX_RULES",
];

#[derive(clap::Args)]
pub struct SoakArgs {
    #[command(flatten)]
    bin: BinArgs,
    /// Minutes of load (the CI form: 3).
    #[arg(long, default_value_t = 3.0)]
    minutes: f64,
    /// Seconds between `kill -9`s of the daemon (one cycle each).
    #[arg(long, default_value_t = 60)]
    restart_every_secs: u64,
    /// Seconds without a daemon after each `kill -9`.
    #[arg(long, default_value_t = 2.0)]
    down_secs: f64,
    /// Identities (cgroup + policy file + agent).
    #[arg(long, default_value_t = 20)]
    identities: usize,
    /// Pause after each op of an agent's loops (microseconds).
    #[arg(long, default_value_t = 10_000)]
    pace_us: u64,
    /// Agents that also flood denied connects.
    #[arg(long, default_value_t = 1)]
    flood_agents: usize,
    /// A flood burst of this many seconds every `--flood-every-secs` (and
    /// during every restart window).
    #[arg(long, default_value_t = 3)]
    flood_secs: u64,
    #[arg(long, default_value_t = 20)]
    flood_every_secs: u64,
    /// One policy file rewritten (invalid, then valid) this often.
    #[arg(long, default_value_t = 1000)]
    reload_every_ms: u64,
    #[arg(long, default_value_t = 7)]
    hup_every_secs: u64,
}

// ---------------------------------------------------------------------------
// policies

fn policy_name(i: usize) -> String {
    format!("soak-{i:02}")
}

struct Ports {
    tcp: u16,
    udp: u16,
    upstream: std::net::SocketAddr,
}

/// Identity `i`'s policy, version `v` (the extra port alternates with it);
/// `invalid`: 1..=3 one of three ways to be rejected, 0 valid.
fn policy_yaml(i: usize, v: u64, invalid: u8, p: &Ports) -> String {
    let name = policy_name(i);
    let mut y = format!(
        "# soak policy {name}, version {v}\napiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\n\
         metadata:\n  name: {name}\nspec:\n  identity:\n    spiffeId: spiffe://enforcer.soak/{name}\n  \
         mode: enforce\n  egress:\n    - {{cidr: 127.0.0.1/32, ports: [{}], protocol: tcp}}\n    \
         - {{cidr: 127.0.0.1/32, ports: [{}], protocol: udp}}\n    \
         - {{host: \"*.{ALLOWED_ZONE}\", ports: [443], protocol: tcp}}\n    \
         - {{cidr: 127.0.0.1/32, ports: [{}], protocol: tcp}}\n",
        p.tcp,
        p.udp,
        EXTRA_PORTS[(v % 2) as usize]
    );
    match invalid {
        1 => y.push_str("    - {cidr: 10.0.0.0/33, ports: [443], protocol: tcp}\n"),
        2 => y.push_str("    - {cidr: 10.0.0.0/8, ports: [443], protocol: tcp, bogus: 1}\n"),
        3 => y.push_str("    - {cidr: 10.0.0.0/8, ports: [70000], protocol: tcp}\n"),
        _ => {}
    }
    let _ = write!(y, "  dns:\n    upstream: [\"{}\"]\n", p.upstream);
    y
}

/// Write atomically (a rename): the daemon never reads half a file.
fn write_policy(dir: &Path, i: usize, yaml: &str) -> Result<()> {
    let name = policy_name(i);
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, yaml)?;
    std::fs::rename(&tmp, dir.join(format!("{name}.yaml")))?;
    Ok(())
}

// ---------------------------------------------------------------------------
// listeners

/// Per phase: what reached a listener no policy allows.
#[derive(Default)]
struct Attacks {
    tcp_accepts: [AtomicU64; 2],
    tcp_bytes: [AtomicU64; 2],
    udp_datagrams: [AtomicU64; 2],
    udp_bytes: [AtomicU64; 2],
}

impl Attacks {
    fn total(&self) -> u64 {
        [
            &self.tcp_accepts,
            &self.tcp_bytes,
            &self.udp_datagrams,
            &self.udp_bytes,
        ]
        .iter()
        .flat_map(|a| a.iter())
        .map(|x| x.load(Ordering::Relaxed))
        .sum()
    }
    fn json(&self) -> serde_json::Value {
        let per = |a: &[AtomicU64; 2]| json!({"up": a[0].load(Ordering::Relaxed), "down": a[1].load(Ordering::Relaxed)});
        json!({
            "tcp_accepts": per(&self.tcp_accepts),
            "tcp_bytes": per(&self.tcp_bytes),
            "udp_datagrams": per(&self.udp_datagrams),
            "udp_bytes": per(&self.udp_bytes),
        })
    }
}

struct Listeners {
    tcp_allowed: SocketAddrV4,
    udp_allowed: SocketAddrV4,
    tcp_denied: Vec<SocketAddrV4>,
    udp_denied: Vec<SocketAddrV4>,
    attacks: Arc<Attacks>,
}

fn local(a: std::net::SocketAddr) -> SocketAddrV4 {
    match a {
        std::net::SocketAddr::V4(a) => a,
        std::net::SocketAddr::V6(_) => unreachable!("IPv4 listeners"),
    }
}

fn attacker_tcp(l: TcpListener, attacks: Arc<Attacks>, phase: Arc<AtomicUsize>) {
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let p = phase.load(Ordering::Relaxed);
            attacks.tcp_accepts[p].fetch_add(1, Ordering::Relaxed);
            let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = [0u8; 4096];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 {
                    break;
                }
                attacks.tcp_bytes[p].fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    });
}

fn attacker_udp(s: UdpSocket, attacks: Arc<Attacks>, phase: Arc<AtomicUsize>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        loop {
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                let p = phase.load(Ordering::Relaxed);
                attacks.udp_datagrams[p].fetch_add(1, Ordering::Relaxed);
                attacks.udp_bytes[p].fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    });
}

impl Listeners {
    /// Allowed: TCP accept + close and UDP drain on 127.0.0.1. Denied: the
    /// same ports on 127.0.0.2, and other ports of 127.0.0.1.
    fn start(phase: &Arc<AtomicUsize>) -> Result<Self> {
        let tcp = util::deep_listener(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?;
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let (ta, ua) = (local(tcp.local_addr()?), local(udp.local_addr()?));
        std::thread::spawn(move || {
            for c in tcp.incoming() {
                drop(c);
            }
        });
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                let _ = udp.recv_from(&mut buf);
            }
        });
        let attacks = Arc::new(Attacks::default());
        let other = Ipv4Addr::new(127, 0, 0, 2);
        let mut tcp_denied = Vec::new();
        for a in [
            SocketAddrV4::new(other, ta.port()),
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
        ] {
            let l = util::deep_listener(a).with_context(|| format!("attacker listener {a}"))?;
            tcp_denied.push(local(l.local_addr()?));
            attacker_tcp(l, attacks.clone(), phase.clone());
        }
        let mut udp_denied = Vec::new();
        for a in [
            SocketAddrV4::new(other, ua.port()),
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
        ] {
            let s = UdpSocket::bind(a).with_context(|| format!("attacker socket {a}"))?;
            udp_denied.push(local(s.local_addr()?));
            attacker_udp(s, attacks.clone(), phase.clone());
        }
        Ok(Self {
            tcp_allowed: ta,
            udp_allowed: ua,
            tcp_denied,
            udp_denied,
            attacks,
        })
    }
}

// ---------------------------------------------------------------------------
// figures of one daemon lifetime, and their bounds

#[derive(Clone, Debug, Default)]
struct Cycle {
    n: usize,
    pid: u32,
    /// Seconds from `kill -9` of the previous daemon to this one ready
    /// (cycle 1: from start to ready).
    window_s: f64,
    /// Of that: from spawn to ready.
    startup_s: f64,
    lifetime_s: f64,
    /// Figures at the end of the lifetime (before the kill).
    figures: BTreeMap<String, u64>,
    rss_mid_kib: u64,
    /// Pinned objects while no daemon ran after this one's kill.
    pins_down: Option<u64>,
    adopted: usize,
    hashes_kept: bool,
    reloads_ok: u64,
    reloads_rejected: u64,
    events_lost: u64,
    valid_writes: u64,
    invalid_writes: u64,
    hups: u64,
}

/// Bound of a figure on cycles 2..: at most `factor` x cycle 1 + `slack`,
/// or `cap` on every cycle (1 included) where there is one.
struct Bound {
    figure: &'static str,
    factor: f64,
    slack: u64,
    cap: Option<u64>,
    why: &'static str,
}

const BOUNDS: &[Bound] = &[
    Bound {
        figure: "rss_kib",
        factor: 1.25,
        slack: 8 * 1024,
        cap: None,
        why: "a fresh process: same state, same size (+25% + 8 MiB allocator noise)",
    },
    Bound {
        figure: "fds",
        factor: 1.0,
        slack: 16,
        cap: None,
        why: "same sockets, links and maps (+16 transient: status, TCP upstreams)",
    },
    Bound {
        figure: "pins",
        factor: 1.0,
        slack: 0,
        cap: None,
        why: "adopted, never duplicated",
    },
    Bound {
        figure: "progs_attached",
        factor: 1.0,
        slack: 0,
        cap: None,
        why: "adopted links: no second attachment",
    },
    Bound {
        figure: "IDENTITIES",
        factor: 1.0,
        slack: 0,
        cap: None,
        why: "one entry per bound cgroup",
    },
    Bound {
        figure: "EGRESS_V4",
        factor: 1.0,
        slack: 64,
        cap: None,
        why: "one generation per identity (old ones deleted)",
    },
    Bound {
        figure: "EGRESS_V6",
        factor: 1.0,
        slack: 64,
        cap: None,
        why: "one generation per identity",
    },
    Bound {
        figure: "NAMES",
        factor: 1.0,
        slack: 64,
        cap: None,
        why: "one generation per identity",
    },
    Bound {
        figure: "LEARNED_V4",
        factor: 3.0,
        slack: 2048,
        cap: None,
        why: "live answers: DNS rate x (TTL 5 s + gc); the rate moves with the host's load",
    },
    Bound {
        figure: "LEARNED_V4 expired",
        factor: 0.0,
        slack: 0,
        cap: Some(0),
        why: "entries expired > 10 s ago: gc (every 2 s) missed them, a leak",
    },
    Bound {
        figure: "LEARNED_V6",
        factor: 1.0,
        slack: 0,
        cap: None,
        why: "no AAAA answers",
    },
    Bound {
        figure: "FILE_RULES",
        factor: 1.0,
        slack: 0,
        cap: None,
        why: "no file rules",
    },
    Bound {
        figure: "UNIX_RULES",
        factor: 1.0,
        slack: 0,
        cap: None,
        why: "no unix rules",
    },
];

impl Bound {
    fn limit(&self, base: u64) -> u64 {
        match self.cap {
            Some(c) => c,
            None => (base as f64 * self.factor).ceil() as u64 + self.slack,
        }
    }
}

/// Violations of `BOUNDS` by cycles 2.. (cycle 1 is the baseline); a
/// figure missing from a cycle is a violation too.
fn check_bounds(cycles: &[Cycle]) -> Vec<String> {
    let mut out = Vec::new();
    let Some(first) = cycles.first() else {
        return out;
    };
    for b in BOUNDS {
        let Some(&base) = first.figures.get(b.figure) else {
            out.push(format!("cycle 1: no figure {}", b.figure));
            continue;
        };
        let from = if b.cap.is_some() { 0 } else { 1 };
        for c in &cycles[from..] {
            match c.figures.get(b.figure) {
                None => out.push(format!("cycle {}: no figure {}", c.n, b.figure)),
                Some(&v) if v > b.limit(base) => out.push(format!(
                    "cycle {}: {} = {v} > bound {} (cycle 1: {base}; {})",
                    c.n,
                    b.figure,
                    b.limit(base),
                    b.why
                )),
                _ => {}
            }
        }
    }
    out
}

fn count_files(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

fn bpftool_json(args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("running bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Entries of a pinned map (`bpftool map dump`).
fn map_entries(pin_dir: &Path, name: &str) -> Result<u64> {
    let p = pin_dir.join("maps").join(name);
    let v = bpftool_json(&["map", "dump", "pinned", &p.to_string_lossy()])?;
    Ok(v.as_array().map(|a| a.len() as u64).unwrap_or(0))
}

/// Programs attached to the soak's cgroups, all of them.
fn progs_attached(cgroups: &[PathBuf]) -> Result<u64> {
    let mut n = 0;
    for cg in cgroups {
        let v = bpftool_json(&["cgroup", "show", &cg.to_string_lossy()])?;
        n += v.as_array().map(|a| a.len() as u64).unwrap_or(0);
    }
    Ok(n)
}

fn fd_count(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| rd.count() as u64)
        .unwrap_or(0)
}

/// The value of a metric line `name{labels} value` (labels exact, or none).
fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == series).then(|| v.parse::<f64>().ok().map(|f| f as u64))?
    })
}

/// The first 8 bytes of a `bpftool -j map dump` value (hex strings), little endian.
fn value_u64(entry: &serde_json::Value) -> Option<u64> {
    let bytes: Vec<u8> = entry["value"]
        .as_array()?
        .iter()
        .take(8)
        .map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
        .collect::<Option<_>>()?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

fn kernel_figures(pin_dir: &Path, cgroups: &[PathBuf]) -> Result<BTreeMap<String, u64>> {
    let mut f = BTreeMap::new();
    f.insert("pins".into(), count_files(pin_dir));
    f.insert("progs_attached".into(), progs_attached(cgroups)?);
    for m in MAPS {
        f.insert(m.to_string(), map_entries(pin_dir, m)?);
    }
    // Learned addresses whose expiry (`Learned.expires_ns`, CLOCK_MONOTONIC,
    // the value's first field) passed more than 10 s ago.
    let p = pin_dir.join("maps/LEARNED_V4");
    let dump = bpftool_json(&["map", "dump", "pinned", &p.to_string_lossy()])?;
    let old = util::monotonic_ns().saturating_sub(10_000_000_000);
    let expired = dump
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| value_u64(e).is_some_and(|t| t < old))
        .count();
    f.insert("LEARNED_V4 expired".into(), expired as u64);
    Ok(f)
}

// ---------------------------------------------------------------------------
// the reloads

/// Rewrites one policy file per step, invalid then valid, and checks each
/// step took effect (through `enforcer status`) before the next.
struct Reloader {
    policies: PathBuf,
    ports: Ports,
    n: usize,
    step: u64,
    /// Per identity: its version (the extra port), and the policy hash in force.
    version: Vec<u64>,
    hash: Vec<String>,
    /// The last write (identity, valid), until it was checked.
    last: Option<(usize, bool)>,
    /// Every file is valid (no invalid write since the last valid one).
    valid_now: bool,
    valid_writes: u64,
    invalid_writes: u64,
    violations: Vec<String>,
}

fn identity_hash(status: &serde_json::Value, name: &str) -> Option<String> {
    status["identities"]
        .as_array()?
        .iter()
        .find(|i| i["name"] == name)
        .and_then(|i| i["policy_hash"].as_str().map(String::from))
}

fn rejected_file(status: &serde_json::Value, file: &str) -> bool {
    status["rejected"].as_array().is_some_and(|r| {
        r.iter()
            .any(|x| x["file"].as_str().is_some_and(|f| f.ends_with(file)))
    })
}

impl Reloader {
    /// Files are valid (the last step wrote a valid one, or none ran).
    fn files_valid(&self) -> bool {
        self.valid_now
    }

    fn hashes_from(&mut self, status: &serde_json::Value) {
        for i in 0..self.n {
            if let Some(h) = identity_hash(status, &policy_name(i)) {
                self.hash[i] = h;
            }
        }
    }

    /// Wait (up to 5 s) until the last write shows in the status.
    fn verify_last(&mut self, enforcer: &Path, sock: &Path) {
        let Some((i, valid)) = self.last.take() else {
            return;
        };
        let name = policy_name(i);
        let file = format!("{name}.yaml");
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = String::new();
        while Instant::now() < deadline {
            if let Ok(st) = status_json(enforcer, sock) {
                let h = identity_hash(&st, &name).unwrap_or_default();
                let rej = rejected_file(&st, &file);
                seen = format!("hash {h}, rejected {rej}");
                if valid && !rej && !h.is_empty() && h != self.hash[i] {
                    self.hash[i] = h;
                    return;
                }
                if !valid && rej && h == self.hash[i] {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.violations.push(format!(
            "{} write of {file} not in force after 5 s ({seen}; hash before {})",
            if valid { "valid" } else { "invalid" },
            self.hash[i]
        ));
    }

    fn step(&mut self, enforcer: &Path, sock: &Path) -> Result<()> {
        self.verify_last(enforcer, sock);
        let i = (self.step / 2) as usize % self.n;
        let valid = self.step % 2 == 1;
        let yaml = if valid {
            self.version[i] += 1;
            self.valid_writes += 1;
            policy_yaml(i, self.version[i], 0, &self.ports)
        } else {
            self.invalid_writes += 1;
            let kind = 1 + ((self.step / 2) % 3) as u8;
            policy_yaml(i, self.version[i] + 1, kind, &self.ports)
        };
        write_policy(&self.policies, i, &yaml)?;
        self.last = Some((i, valid));
        self.valid_now = valid;
        self.step += 1;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// the run

struct Agents(Vec<Worker>);

/// phase -> counter -> n, summed over the agents.
type Ops = BTreeMap<String, BTreeMap<String, u64>>;

impl Agents {
    fn all(&mut self, cmd: &str) -> Result<()> {
        for a in &mut self.0 {
            let r = a.ask(cmd)?;
            if r != "ok" {
                bail!("agent {}: {cmd:?} answered {r:?}", a.name);
            }
        }
        Ok(())
    }
    fn flood(&mut self, on: bool, n: usize) -> Result<()> {
        for a in self.0.iter_mut().take(n) {
            a.ask(if on { "flood on" } else { "flood off" })?;
        }
        Ok(())
    }
    /// phase -> counter -> sum over agents; and counter -> last errno seen.
    fn stats(&mut self) -> Result<(Ops, serde_json::Value)> {
        let mut sum = Ops::new();
        let mut errnos = serde_json::Map::new();
        for a in &mut self.0 {
            let v: serde_json::Value = serde_json::from_str(&a.ask("stats")?)?;
            for p in PHASES {
                for (k, n) in v[p].as_object().into_iter().flatten() {
                    *sum.entry(p.to_string())
                        .or_default()
                        .entry(k.clone())
                        .or_default() += n.as_u64().unwrap_or(0);
                }
            }
            for (k, e) in v["last_errno"].as_object().into_iter().flatten() {
                errnos.insert(format!("{} {k}", a.name), e.clone());
            }
        }
        Ok((sum, errnos.into()))
    }
}

/// Pins are removed on every way out (a daemon killed -9 leaves them).
struct PinGuard(PathBuf);
impl Drop for PinGuard {
    fn drop(&mut self) {
        remove_pins(&self.0);
    }
}

pub fn run(args: &SoakArgs) -> Result<u8> {
    let root = util::repo_root();
    util::require_root("soak")?;
    if args.identities == 0 || args.restart_every_secs == 0 {
        bail!("--identities and --restart-every-secs must be > 0");
    }
    let enforcer = util::enforcer_bin(&root, &args.bin)?;
    util::ensure_bpffs()?;
    which_bpftool()?;
    let mount = util::cgroup2_mount()?;
    let out_dir = root.join("target/soak");
    let work = out_dir.join("work");
    std::fs::create_dir_all(&out_dir)?;
    let r = run_inner(args, &enforcer, &mount, &work, &out_dir);
    match &r {
        Ok(0) => {
            // The audit log is the big one; the logs stay for a look.
            let _ = std::fs::remove_file(work.join("audit.jsonl"));
        }
        _ => eprintln!(
            "soak: kept {} (config, policies, logs, audit log)",
            work.display()
        ),
    }
    r
}

fn which_bpftool() -> Result<()> {
    match Command::new("bpftool").arg("version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => bail!("soak needs bpftool (map entries, attached programs): apt-get install bpftool"),
    }
}

fn run_inner(
    args: &SoakArgs,
    enforcer: &Path,
    mount: &Path,
    work: &Path,
    out_dir: &Path,
) -> Result<u8> {
    let n = args.identities;
    let names: Vec<String> = (0..n).map(policy_name).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    // Drop order (reverse): agents, daemon, pins, cgroups.
    let cgs = Cgroups::create(mount, CGROUP_DIR, &name_refs)?;
    let cg_paths: Vec<PathBuf> = names.iter().map(|x| cgs.path(x)).collect();
    let _pins = PinGuard(PathBuf::from(PIN_DIR));
    let phase = Arc::new(AtomicUsize::new(0));
    let l = Listeners::start(&phase)?;
    let upstream = Upstream::start(
        "127.0.0.1:0",
        2,
        Zone::new(5)
            .with_rotating(
                &format!("*.{ALLOWED_ZONE}"),
                Ipv4Addr::new(192, 0, 2, 0),
                4096,
            )
            .with(&format!("*.{REFUSED_ZONE}"), Ipv4Addr::new(192, 0, 2, 1)),
        true,
    )?;
    let ports = Ports {
        tcp: l.tcp_allowed.port(),
        udp: l.udp_allowed.port(),
        upstream: upstream.addr,
    };
    let metrics_addr = {
        let s = TcpListener::bind("127.0.0.1:0")?;
        s.local_addr()?
    };
    let files = DaemonFiles::new(work, Path::new(PIN_DIR));
    let yamls: Vec<String> = (0..n).map(|i| policy_yaml(i, 0, 0, &ports)).collect();
    let policies: Vec<(&str, &str)> = names
        .iter()
        .zip(&yamls)
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let bindings: Vec<(PathBuf, &str)> = cg_paths
        .iter()
        .cloned()
        .zip(name_refs.iter().copied())
        .collect();
    files.write(
        &policies,
        &bindings,
        &format!("metricsAddr: {metrics_addr}\n"),
    )?;
    eprintln!(
        "soak: enforcer {}; {n} identities under {}; allowed tcp {} udp {}; denied tcp {:?} udp {:?}; \
         DNS upstream {}; metrics {metrics_addr}; {} min, kill -9 every {} s",
        enforcer.display(),
        cgs.root.display(),
        l.tcp_allowed,
        l.udp_allowed,
        l.tcp_denied,
        l.udp_denied,
        upstream.addr,
        args.minutes,
        args.restart_every_secs
    );

    let ready_timeout = Duration::from_secs(180);
    let t_start = Instant::now();
    let log = |k: usize| work.join(format!("daemon-{k}.log"));
    let mut daemon = Some(Daemon::spawn(enforcer, &files, &log(1))?);
    let status =
        daemon
            .as_mut()
            .unwrap()
            .wait_ready(enforcer, &bindings, t_start + ready_timeout)?;
    let mut cycle = Cycle {
        n: 1,
        pid: daemon.as_ref().unwrap().pid(),
        window_s: t_start.elapsed().as_secs_f64(),
        startup_s: t_start.elapsed().as_secs_f64(),
        hashes_kept: true,
        ..Cycle::default()
    };
    eprintln!("soak: daemon ready in {:.2}s", cycle.startup_s);
    let mut reloader = Reloader {
        policies: files.policies.clone(),
        ports,
        n,
        step: 0,
        version: vec![0; n],
        hash: vec![String::new(); n],
        last: None,
        valid_now: true,
        valid_writes: 0,
        invalid_writes: 0,
        violations: Vec::new(),
    };
    reloader.hashes_from(&status);

    // The agents, each moved into its cgroup before it makes a socket.
    let mut agents = Agents(Vec::new());
    let me = std::env::current_exe()?;
    let join = |v: &[SocketAddrV4]| {
        v.iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    for (i, cg) in cg_paths.iter().enumerate() {
        let mut cmd = Command::new(&me);
        cmd.args([
            "soak-agent",
            "--tcp-allowed",
            &l.tcp_allowed.to_string(),
            "--tcp-denied",
            &join(&l.tcp_denied),
            "--udp-allowed",
            &l.udp_allowed.to_string(),
            "--udp-denied",
            &join(&l.udp_denied),
            "--allowed-zone",
            ALLOWED_ZONE,
            "--refused-zone",
            REFUSED_ZONE,
            "--pace-us",
            &args.pace_us.to_string(),
        ]);
        if i < args.flood_agents {
            cmd.arg("--flood");
        }
        agents
            .0
            .push(Worker::spawn(&policy_name(i), cmd, Some(cg))?);
    }
    agents.all("start")?;

    let mut cycles: Vec<Cycle> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let mut refused_at_upstream = 0u64;
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(args.minutes * 60.0);
    let every = Duration::from_secs(args.restart_every_secs);
    let mut cycle_start = t0;
    let mut next_reload = t0;
    let mut next_hup = t0 + Duration::from_secs(args.hup_every_secs);
    let mut mid_sampled = false;
    let mut flooding = false;
    let mut hups = 0u64;
    let mut prev_counts = (0u64, 0u64, 0u64); // valid, invalid writes, hups at cycle start
    let dns_timeout = Duration::from_millis(600);

    loop {
        let now = Instant::now();
        let d = daemon.as_mut().context("no daemon")?;
        d.check_alive()?;
        // Ask the upstream which names reached it: never a refused one.
        refused_at_upstream += upstream
            .take_queries()
            .iter()
            .filter(|q| q.contains(REFUSED_ZONE))
            .count() as u64;
        let in_burst = args.flood_every_secs > 0
            && (now - t0).as_secs() % args.flood_every_secs < args.flood_secs;
        if in_burst != flooding {
            agents.flood(in_burst, args.flood_agents)?;
            flooding = in_burst;
        }
        if !mid_sampled && now >= cycle_start + every / 2 {
            cycle.rss_mid_kib = util::vm_rss_kib(d.pid()).unwrap_or(0);
            mid_sampled = true;
        }
        let last = now >= end;
        let restart_due = now >= cycle_start + every && now + every / 2 < end;
        if (last || restart_due) && reloader.files_valid() {
            // Figures of this lifetime, the last write checked first.
            reloader.verify_last(enforcer, &files.socket);
            let pid = d.pid();
            cycle.lifetime_s = cycle_start.elapsed().as_secs_f64();
            cycle.figures = kernel_figures(Path::new(PIN_DIR), &cg_paths)?;
            cycle
                .figures
                .insert("rss_kib".into(), util::vm_rss_kib(pid)?);
            cycle.figures.insert("fds".into(), fd_count(pid));
            let m = util::http_get(
                &metrics_addr.to_string(),
                "/metrics",
                Duration::from_secs(5),
            )?;
            cycle.reloads_ok =
                metric(&m, "enforcer_policy_reloads_total{result=\"ok\"}").unwrap_or(0);
            cycle.reloads_rejected =
                metric(&m, "enforcer_policy_reloads_total{result=\"rejected\"}").unwrap_or(0);
            cycle.events_lost = metric(&m, "enforcer_events_lost_total").unwrap_or(0);
            cycle.valid_writes = reloader.valid_writes - prev_counts.0;
            cycle.invalid_writes = reloader.invalid_writes - prev_counts.1;
            cycle.hups = hups - prev_counts.2;
            prev_counts = (reloader.valid_writes, reloader.invalid_writes, hups);
            if cycle.reloads_rejected != cycle.invalid_writes {
                failures.push(format!(
                    "cycle {}: enforcer_policy_reloads_total{{result=\"rejected\"}} = {}, but {} invalid files were written",
                    cycle.n, cycle.reloads_rejected, cycle.invalid_writes
                ));
            }
            if cycle.invalid_writes == 0 {
                failures.push(format!("cycle {}: no invalid write (too short?)", cycle.n));
            }
            let status = status_json(enforcer, &files.socket)?;
            reloader.hashes_from(&status);
            eprintln!(
                "soak: cycle {} ends after {:.0}s: RSS {} KiB, {} fds, {} pins, reloads {} ok / {} rejected, {} events lost",
                cycle.n,
                cycle.lifetime_s,
                cycle.figures["rss_kib"],
                cycle.figures["fds"],
                cycle.figures["pins"],
                cycle.reloads_ok,
                cycle.reloads_rejected,
                cycle.events_lost
            );
            if last {
                cycles.push(cycle.clone());
                break;
            }
            // kill -9 with the agents told first: every op that begins
            // from now on counts as "down"; wait until no "up" DNS query
            // can still be in flight.
            agents.all("phase down")?;
            phase.store(1, Ordering::Relaxed);
            agents.flood(true, args.flood_agents)?;
            flooding = true;
            std::thread::sleep(dns_timeout);
            let t_kill = Instant::now();
            daemon.take().unwrap().kill9()?;
            std::thread::sleep(Duration::from_millis(200));
            let pins_down = count_files(Path::new(PIN_DIR));
            cycle.pins_down = Some(pins_down);
            if pins_down != cycle.figures["pins"] {
                failures.push(format!(
                    "cycle {}: {} pinned objects while down, {} before the kill",
                    cycle.n, pins_down, cycle.figures["pins"]
                ));
            }
            cycles.push(cycle.clone());
            std::thread::sleep(Duration::from_secs_f64((args.down_secs - 0.2).max(0.0)));
            let k = cycles.len() + 1;
            let t_spawn = Instant::now();
            let mut d = Daemon::spawn(enforcer, &files, &log(k))?;
            let status = d.wait_ready(enforcer, &bindings, t_spawn + ready_timeout)?;
            let ready = Instant::now();
            let kept: Vec<String> = (0..n)
                .filter(|&i| {
                    identity_hash(&status, &policy_name(i)).as_deref() != Some(&reloader.hash[i])
                })
                .map(policy_name)
                .collect();
            let adopted = std::fs::read_to_string(log(k))
                .unwrap_or_default()
                .matches("adopted pinned links from a previous run")
                .count();
            cycle = Cycle {
                n: k,
                pid: d.pid(),
                window_s: (ready - t_kill).as_secs_f64(),
                startup_s: (ready - t_spawn).as_secs_f64(),
                adopted,
                hashes_kept: kept.is_empty(),
                ..Cycle::default()
            };
            if !kept.is_empty() {
                failures.push(format!(
                    "restart {}: policies changed across the restart: {}",
                    k - 1,
                    kept.join(", ")
                ));
            }
            if adopted != n {
                failures.push(format!(
                    "restart {}: the daemon adopted the pinned links of {adopted} cgroups, not {n}",
                    k - 1
                ));
            }
            eprintln!(
                "soak: restart {}: ready {:.2}s after kill -9 ({:.2}s after spawn), {adopted}/{n} cgroups adopted",
                k - 1,
                cycle.window_s,
                cycle.startup_s
            );
            daemon = Some(d);
            phase.store(0, Ordering::Relaxed);
            agents.all("phase up")?;
            cycle_start = Instant::now();
            mid_sampled = false;
            next_reload = cycle_start;
            next_hup = cycle_start + Duration::from_secs(args.hup_every_secs);
            continue;
        }
        if now >= next_reload {
            reloader.step(enforcer, &files.socket)?;
            next_reload = Instant::now() + Duration::from_millis(args.reload_every_ms);
        }
        if args.hup_every_secs > 0 && now >= next_hup {
            unsafe { libc::kill(d.pid() as i32, libc::SIGHUP) };
            hups += 1;
            next_hup = now + Duration::from_secs(args.hup_every_secs);
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // The end: stats, a clean stop, the audit chain.
    agents.flood(false, args.flood_agents)?;
    std::thread::sleep(dns_timeout);
    let (ops, errnos) = agents.stats()?;
    drop(agents);
    let attacks = l.attacks.clone();
    daemon.take().unwrap().stop()?;
    let verify = Command::new(enforcer)
        .args(["audit", "verify"])
        .arg(&files.audit)
        .output()
        .context("enforcer audit verify")?;
    let audit_ok = verify.status.success();
    let audit_out = String::from_utf8_lossy(&verify.stdout).trim().to_string()
        + String::from_utf8_lossy(&verify.stderr).trim();
    let audit_bytes = std::fs::metadata(&files.audit)
        .map(|m| m.len())
        .unwrap_or(0);
    let audit_starts = std::fs::read_to_string(&files.audit)
        .map(|s| {
            s.lines()
                .filter(|l| l.contains("\"action\":\"start\""))
                .count()
        })
        .unwrap_or(0);

    // Checks.
    let get = |p: &str, k: &str| ops.get(p).and_then(|m| m.get(k)).copied().unwrap_or(0);
    for p in PHASES {
        for k in ["tcp_leak", "udp_leak", "dns_leak", "flood_leak"] {
            if get(p, k) > 0 {
                failures.push(format!(
                    "{} denied ops got through while {p}: {k}",
                    get(p, k)
                ));
            }
        }
        for k in ["tcp_fail", "udp_fail"] {
            if get(p, k) > 0 {
                failures.push(format!("{} allowed ops failed while {p}: {k}", get(p, k)));
            }
        }
        for k in ["tcp_ok", "udp_ok", "tcp_denied", "udp_denied"] {
            if get(p, k) == 0 && (p == "up" || cycles.len() > 1) {
                failures.push(format!("no {k} op at all while {p}: the load did not run"));
            }
        }
    }
    if get("up", "dns_fail") > 0 || get("up", "dns_refused_fail") > 0 {
        failures.push(format!(
            "DNS failed while the daemon was up: {} allowed, {} refused names unanswered",
            get("up", "dns_fail"),
            get("up", "dns_refused_fail")
        ));
    }
    if get("up", "dns_ok") == 0 || get("up", "dns_refused") == 0 {
        failures.push("no DNS answer at all while up".into());
    }
    if attacks.total() > 0 {
        failures.push(format!("bytes at denied listeners: {}", attacks.json()));
    }
    if refused_at_upstream > 0 {
        failures.push(format!(
            "{refused_at_upstream} queries for refused names reached the upstream"
        ));
    }
    failures.extend(reloader.violations.iter().cloned());
    let bound_violations = check_bounds(&cycles);
    failures.extend(bound_violations.iter().cloned());
    if !audit_ok {
        failures.push(format!("enforcer audit verify failed: {audit_out}"));
    }
    if audit_starts != cycles.len() {
        failures.push(format!(
            "{audit_starts} daemon start records in the audit log, {} daemons ran",
            cycles.len()
        ));
    }

    // Report.
    let table = render(&cycles, &ops, &attacks, args);
    println!("\n{table}");
    println!(
        "audit log: {} ({} MiB, {audit_starts} start records): {}",
        if audit_ok { "verified" } else { "BROKEN" },
        audit_bytes / (1 << 20),
        audit_out
    );
    println!("refused names that reached the upstream: {refused_at_upstream}");
    if !errnos.as_object().is_none_or(|m| m.is_empty()) {
        println!("last errno per failing counter: {errnos}");
    }
    println!();
    if failures.is_empty() {
        println!(
            "soak: PASS ({} cycles, {:.1} min)",
            cycles.len(),
            t0.elapsed().as_secs_f64() / 60.0
        );
    } else {
        for f in &failures {
            println!("soak: FAIL: {f}");
        }
    }
    let results = json!({
        "kernel": crate::bench::kernel_release(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "enforcer": enforcer.display().to_string(),
        "minutes": args.minutes,
        "restart_every_secs": args.restart_every_secs,
        "down_secs": args.down_secs,
        "identities": n,
        "pace_us": args.pace_us,
        "cycles": cycles.iter().map(cycle_json).collect::<Vec<_>>(),
        "bounds": BOUNDS.iter().map(|b| json!({
            "figure": b.figure, "factor": b.factor, "slack": b.slack, "why": b.why,
            "limit": cycles.first().and_then(|c| c.figures.get(b.figure)).map(|&v| b.limit(v)),
        })).collect::<Vec<_>>(),
        "ops": ops,
        "last_errno": errnos,
        "denied_listeners": attacks.json(),
        "refused_names_at_upstream": refused_at_upstream,
        "reloads": {
            "valid_writes": reloader.valid_writes,
            "invalid_writes": reloader.invalid_writes,
            "ok": cycles.iter().map(|c| c.reloads_ok).sum::<u64>(),
            "rejected": cycles.iter().map(|c| c.reloads_rejected).sum::<u64>(),
            "sighups": hups,
        },
        "audit": {"verified": audit_ok, "output": audit_out, "bytes": audit_bytes, "start_records": audit_starts},
        "failures": failures,
        "pass": failures.is_empty(),
    });
    let path = out_dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    println!("results: {}", path.display());
    Ok(if failures.is_empty() { 0 } else { 1 })
}

fn cycle_json(c: &Cycle) -> serde_json::Value {
    json!({
        "cycle": c.n,
        "pid": c.pid,
        "restart_window_s": c.window_s,
        "startup_s": c.startup_s,
        "lifetime_s": c.lifetime_s,
        "figures": c.figures,
        "rss_mid_kib": c.rss_mid_kib,
        "pins_while_down": c.pins_down,
        "adopted_cgroups": c.adopted,
        "policies_kept_across_restart": c.hashes_kept,
        "reloads_ok": c.reloads_ok,
        "reloads_rejected": c.reloads_rejected,
        "events_lost": c.events_lost,
        "valid_writes": c.valid_writes,
        "invalid_writes": c.invalid_writes,
        "sighups": c.hups,
    })
}

fn render(cycles: &[Cycle], ops: &Ops, attacks: &Attacks, args: &SoakArgs) -> String {
    let mut t = String::new();
    let cols: Vec<&str> = ["rss_kib", "fds", "pins", "progs_attached"]
        .into_iter()
        .chain(MAPS.iter().copied())
        .chain(["LEARNED_V4 expired"])
        .collect();
    let short = |c: &str| match c {
        "rss_kib" => "RSS KiB".to_string(),
        "progs_attached" => "progs".to_string(),
        "LEARNED_V4 expired" => "LEARN expd".to_string(),
        other => other.to_string(),
    };
    let _ = writeln!(
        t,
        "soak: {} identities, {} min, kill -9 every {} s, {} s down each time",
        args.identities, args.minutes, args.restart_every_secs, args.down_secs
    );
    let _ = write!(
        t,
        "{:<6} {:>9} {:>8} {:>6}",
        "cycle", "window s", "start s", "life s"
    );
    for c in &cols {
        let _ = write!(t, " {:>10}", short(c));
    }
    let _ = writeln!(
        t,
        " {:>7} {:>6} {:>14} {:>9} {:>8}",
        "adopted", "same", "reloads ok/rej", "lost ev", "writes"
    );
    for c in cycles {
        let _ = write!(
            t,
            "{:<6} {:>9.2} {:>8.2} {:>6.0}",
            c.n, c.window_s, c.startup_s, c.lifetime_s
        );
        for col in &cols {
            let _ = write!(
                t,
                " {:>10}",
                c.figures
                    .get(*col)
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "-".into())
            );
        }
        let _ = writeln!(
            t,
            " {:>7} {:>12} {:>8} {:>6}",
            if c.n == 1 {
                "-".to_string()
            } else {
                c.adopted.to_string()
            },
            format!("{}/{}", c.reloads_ok, c.reloads_rejected),
            c.events_lost,
            format!("{}/{}", c.valid_writes, c.invalid_writes)
        );
    }
    if let Some(first) = cycles.first() {
        let _ = write!(t, "{:<6} {:>9} {:>8} {:>6}", "bound", "", "", "");
        for col in &cols {
            let b = BOUNDS.iter().find(|b| b.figure == *col);
            let _ = write!(
                t,
                " {:>10}",
                b.zip(first.figures.get(*col))
                    .map(|(b, &v)| format!("<={}", b.limit(v)))
                    .unwrap_or_else(|| "-".into())
            );
        }
        let _ = writeln!(t);
    }
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "{:<24} {:>12} {:>12}   (agents' ops by daemon phase)",
        "op", "daemon up", "daemon down"
    );
    let keys: Vec<&String> = ops
        .values()
        .flat_map(|m| m.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    for k in keys {
        let g = |p: &str| ops.get(p).and_then(|m| m.get(k)).copied().unwrap_or(0);
        let _ = writeln!(t, "{:<24} {:>12} {:>12}", k, g("up"), g("down"));
    }
    let a = attacks.json();
    for k in ["tcp_accepts", "tcp_bytes", "udp_datagrams", "udp_bytes"] {
        let _ = writeln!(
            t,
            "{:<24} {:>12} {:>12}",
            format!("denied listener {k}"),
            a[k]["up"],
            a[k]["down"]
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cycle(n: usize, figs: &[(&str, u64)]) -> Cycle {
        Cycle {
            n,
            figures: figs.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            ..Cycle::default()
        }
    }

    fn all(rss: u64, pins: u64, learned: u64) -> Vec<(&'static str, u64)> {
        let mut v: Vec<(&str, u64)> = BOUNDS.iter().map(|b| (b.figure, 10)).collect();
        for (k, x) in v.iter_mut() {
            match *k {
                "rss_kib" => *x = rss,
                "pins" => *x = pins,
                "LEARNED_V4" => *x = learned,
                "LEARNED_V4 expired" => *x = 0,
                _ => {}
            }
        }
        v
    }

    fn set(mut v: Vec<(&'static str, u64)>, k: &str, x: u64) -> Vec<(&'static str, u64)> {
        v.iter_mut().find(|f| f.0 == k).unwrap().1 = x;
        v
    }

    #[test]
    fn cycles_within_bounds_pass() {
        let c = vec![
            cycle(1, &all(40_000, 300, 5000)),
            // RSS +25% + 8 MiB, learned x3 + 2048: at the limits
            cycle(2, &all(40_000 * 5 / 4 + 8192, 300, 17_048)),
        ];
        assert_eq!(check_bounds(&c), Vec::<String>::new());
    }

    #[test]
    fn growth_beyond_a_bound_fails_and_names_the_figure() {
        let c = vec![
            cycle(1, &all(40_000, 300, 5000)),
            cycle(2, &all(40_000, 301, 5000)),
            cycle(3, &all(70_000, 300, 17_049)),
        ];
        let v = check_bounds(&c);
        assert_eq!(v.len(), 3, "{v:?}");
        assert!(
            v[0].starts_with("cycle 3: rss_kib = 70000 > bound 58192"),
            "{v:?}"
        );
        assert!(v[1].starts_with("cycle 2: pins = 301 > bound 300"), "{v:?}");
        assert!(
            v[2].starts_with("cycle 3: LEARNED_V4 = 17049 > bound 17048"),
            "{v:?}"
        );
    }

    #[test]
    fn a_cap_holds_from_the_first_cycle() {
        let c = vec![
            cycle(1, &set(all(40_000, 300, 5000), "LEARNED_V4 expired", 2)),
            cycle(2, &set(all(40_000, 300, 5000), "LEARNED_V4 expired", 1)),
        ];
        let v = check_bounds(&c);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(
            v[0].starts_with("cycle 1: LEARNED_V4 expired = 2 > bound 0"),
            "{v:?}"
        );
        assert!(
            v[1].starts_with("cycle 2: LEARNED_V4 expired = 1 > bound 0"),
            "{v:?}"
        );
    }

    #[test]
    fn value_bytes_are_read_little_endian() {
        let e = serde_json::json!({"key": ["0x01"], "value": ["0x01", "0x02", "0", "0", "0", "0", "0", "0x80", "0xff"]});
        assert_eq!(value_u64(&e), Some(0x8000_0000_0000_0201));
        assert_eq!(value_u64(&serde_json::json!({"value": ["0x01"]})), None);
    }

    #[test]
    fn a_missing_figure_is_a_violation() {
        let mut second = all(40_000, 300, 5000);
        second.retain(|(k, _)| *k != "fds");
        let c = vec![cycle(1, &all(40_000, 300, 5000)), cycle(2, &second)];
        assert_eq!(check_bounds(&c), vec!["cycle 2: no figure fds".to_string()]);
    }

    #[test]
    fn metric_lines_are_matched_by_series() {
        let text = "# HELP x\nenforcer_policy_reloads_total{result=\"ok\"} 12\n\
                    enforcer_policy_reloads_total{result=\"rejected\"} 7\nenforcer_events_lost_total 3.0\n";
        assert_eq!(
            metric(text, "enforcer_policy_reloads_total{result=\"rejected\"}"),
            Some(7)
        );
        assert_eq!(metric(text, "enforcer_events_lost_total"), Some(3));
        assert_eq!(metric(text, "enforcer_events_total"), None);
    }
}
