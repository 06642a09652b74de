//! `cargo xtask bench`: what enforcement costs, measured on the real kernel.
//!
//! One `enforcer daemon` (the realistic deployment) binds bench cgroups to
//! generated policies:
//!
//! | cgroup   | policy                                           |
//! |----------|--------------------------------------------------|
//! | `e10k`   | 10,000 CIDR rules (seeded random + the target)   |
//! | `base`   | none: not bound, not attached (baseline)         |
//! | `ebig`   | 100,000 CIDR rules (`--big-rules`)               |
//! | `e10`    | 10 CIDR rules                                    |
//! | `nft`    | none; nftables with the same 10,000 rules (peer) |
//!
//! A worker process (`xtask bench-worker`) sits in each cgroup; the bench
//! alternates them round by round (A B, B A, A B, ...) for each comparison,
//! and reports the median of the per-round rate ratios and their spread.
//! The listeners (TCP accept + close, UDP drain) run in this process, in
//! the bench's own, unenforced cgroup.
//!
//! A control comparison (A/A: two unenforced cgroups, `base2` vs `base`)
//! shows how far the harness alone moves a ratio on this machine.
//!
//! Everything runs in the default configuration users get (the daemon's
//! and `enforcer run`'s `allowEvents: 1`: allowed decisions accounted as
//! flows); `enforcer run` is measured too, its worker as the agent.
//!
//! Per-program cost: with `kernel.bpf_stats_enabled` on (only then: the
//! statistics slow every program), each worker connects and sends for a
//! while and the kernel's `run_time_ns / run_cnt` of every program on its
//! cgroup's hooks is reported: empty programs (the floor), the daemon and
//! `enforcer run` in their default configuration, and the daemon with
//! `allowEvents: 0` (what the allow accounting costs).
//!
//! Peers (unless `--skip-peers`, see `crate::peers`): nftables with the
//! same 10,000 rules on the cgroup `nft` vs the daemon and vs unenforced, in
//! the same interleaved rounds; and `bench-dns` with dnsmasq as a third
//! side (the enforcer's DNS proxy vs dnsmasq in front of the same upstream).
//!
//! Also: the idle RSS of a daemon with one policy and one binding.
use std::{
    collections::HashSet,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::{
    daemon_harness::{remove_pins, Cgroups, Daemon, DaemonFiles, Worker},
    util, BinArgs,
};

const PIN_DIR: &str = "/sys/fs/bpf/enforcer-bench";
const SEED: u64 = 0x656e_666f_7263_6572; // "enforcer"
const RSS_FLOOR_MB: f64 = 30.0;
/// Rate floors vs unenforced, default configuration (issue 13).
const CONNECT_FLOOR: f64 = 0.98;
const SENDTO_FLOOR: f64 = 0.95;
/// Per-program targets, ns per run from the kernel's statistics, default
/// configuration (issue 13). Hooks not listed: no target.
const NS_TARGETS: &[(&str, f64)] = &[
    ("connect4", 200.0),
    ("connect6", 200.0),
    ("sendmsg4", 120.0),
    ("sendmsg6", 120.0),
    ("sock_create", 80.0),
];

// ---------------------------------------------------------------------------
// policies

/// splitmix64: deterministic, dependency-free.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One egress rule of a bench policy: what the YAML policy says, and what
/// the nftables peer (`crate::peers`) is given, from the same generator.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Rule {
    pub addr: IpAddr,
    pub len: u32,
    /// Empty: every port.
    pub ports: Vec<Port>,
    /// `None`: protocol omitted (any).
    pub proto: Option<Proto>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Port {
    One(u16),
    Range(u16, u16),
}

impl Port {
    pub fn bounds(self) -> (u16, u16) {
        match self {
            Port::One(p) => (p, p),
            Port::Range(lo, hi) => (lo, hi),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// The rules of an `n`-rule bench policy: the two rules that allow the
/// targets, then `n - 2` distinct random CIDRs (about 1 in 10 IPv6; none in
/// 127.0.0.0/8 or ::1, prefix lengths mostly /16../32 with random ports and
/// protocols). Seeded: every run (and every consumer) gets the same rules.
pub(crate) fn bench_rules(n: usize, tcp: SocketAddrV4, udp: SocketAddrV4) -> Vec<Rule> {
    let mut rng = Rng(SEED ^ n as u64);
    let mut seen = HashSet::new();
    let mut rules = Vec::with_capacity(n);
    for (t, proto) in [(tcp, Proto::Tcp), (udp, Proto::Udp)] {
        rules.push(Rule {
            addr: IpAddr::V4(*t.ip()),
            len: 32,
            ports: vec![Port::One(t.port())],
            proto: Some(proto),
        });
    }
    while rules.len() < n {
        let (addr, len) = if rng.below(10) == 0 {
            let len = 32 + rng.below(97) as u32; // /32../128
            let raw = ((rng.next() as u128) << 64 | rng.next() as u128) & !0u128 << (128 - len);
            let a = Ipv6Addr::from(raw);
            if a.is_loopback() || a.to_ipv4_mapped().is_some() || !seen.insert((6, raw, len)) {
                continue;
            }
            (IpAddr::V6(a), len)
        } else {
            let len = match rng.below(10) {
                0 => 8 + rng.below(8) as u32,
                1..=4 => 16 + rng.below(8) as u32,
                _ => 24 + rng.below(9) as u32,
            };
            let raw = (rng.next() as u32) & (!0u64 << (32 - len)) as u32;
            if raw >> 24 == 127 || !seen.insert((4, raw as u128, len)) {
                continue;
            }
            (IpAddr::V4(Ipv4Addr::from(raw)), len)
        };
        let ports = match rng.below(3) {
            0 => Vec::new(),
            1 => vec![Port::One(1 + rng.below(65535) as u16)],
            _ => {
                let lo = 1 + rng.below(60000);
                let one = 1 + rng.below(65535) as u16;
                vec![
                    Port::One(one),
                    Port::Range(lo as u16, (lo + rng.below(5000)) as u16),
                ]
            }
        };
        // protocol omitted = any
        let proto = [None, Some(Proto::Tcp), Some(Proto::Udp)][rng.below(3) as usize];
        rules.push(Rule {
            addr,
            len,
            ports,
            proto,
        });
    }
    rules
}

/// A policy of `n` egress rules ([`bench_rules`]).
fn policy_yaml(name: &str, n: usize, tcp: SocketAddrV4, udp: SocketAddrV4) -> String {
    let rules = bench_rules(n, tcp, udp);
    let mut y = String::with_capacity(n * 64);
    let _ = write!(
        y,
        "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: {name}\nspec:\n  \
         identity:\n    spiffeId: spiffe://enforcer.bench/{name}\n  mode: enforce\n  egress:\n"
    );
    for r in &rules {
        let _ = write!(y, "    - {{cidr: {}/{}", r.addr, r.len);
        if !r.ports.is_empty() {
            let ports: Vec<String> = r
                .ports
                .iter()
                .map(|p| match p {
                    Port::One(p) => p.to_string(),
                    Port::Range(lo, hi) => format!("\"{lo}-{hi}\""),
                })
                .collect();
            let _ = write!(y, ", ports: [{}]", ports.join(", "));
        }
        if let Some(p) = r.proto {
            let _ = write!(y, ", protocol: {}", p.name());
        }
        y.push_str("}\n");
    }
    y
}

// ---------------------------------------------------------------------------
// cgroups, daemon, workers

/// The bench's daemon: its pins in `PIN_DIR`, the default configuration
/// unless `allow_events` says otherwise.
fn start_daemon(
    enforcer: &Path,
    dir: &Path,
    policies: &[(&str, &str)],
    bindings: &[(PathBuf, &str)],
    allow_events: Option<u32>,
    timeout: Duration,
) -> Result<(Daemon, Duration)> {
    Daemon::start(
        enforcer,
        &DaemonFiles::new(dir, Path::new(PIN_DIR)),
        policies,
        bindings,
        &allow_events
            .map(|n| format!("allowEvents: {n}\n"))
            .unwrap_or_default(),
        timeout,
    )
}

/// The bench worker's arguments (after the program).
fn worker_args(cmd: &mut Command, tcp: SocketAddrV4, udp: SocketAddrV4) {
    cmd.args([
        "bench-worker",
        "--connect-addr",
        &tcp.to_string(),
        "--sendto-addr",
        &udp.to_string(),
    ]);
    if let Some((_, cpu)) = util::bench_cpus() {
        cmd.args(["--cpu", &cpu.to_string()]);
    }
}

impl Worker {
    fn start(name: &str, cgroup: &Path, tcp: SocketAddrV4, udp: SocketAddrV4) -> Result<Self> {
        let mut cmd = Command::new(std::env::current_exe()?);
        worker_args(&mut cmd, tcp, udp);
        Self::spawn(name, cmd, Some(cgroup))
    }

    /// A worker as the agent of `enforcer run --policy POLICY` (its default
    /// configuration), in the cgroup `enforcer run` makes.
    fn start_under_run(
        name: &str,
        enforcer: &Path,
        policy: &Path,
        tcp: SocketAddrV4,
        udp: SocketAddrV4,
    ) -> Result<Self> {
        let mut cmd = Command::new(enforcer);
        cmd.args(["run", "--quiet", "--user", "root", "--policy"])
            .arg(policy)
            .arg("--")
            .arg(std::env::current_exe()?)
            .stderr(Stdio::null());
        worker_args(&mut cmd, tcp, udp);
        Self::spawn(name, cmd, None)
    }

    /// The cgroup of the worker process: its own, or (under `enforcer
    /// run`) that of the child of `enforcer run`.
    fn cgroup(&self, mount: &Path) -> Result<PathBuf> {
        let own = self.child.id();
        let child = std::fs::read_dir("/proc")?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|st| {
                        let rest = &st[st.rfind(')')? + 2..];
                        rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                    })
                    == Some(own)
            })
            .unwrap_or(own);
        let cg = std::fs::read_to_string(format!("/proc/{child}/cgroup"))?;
        let rel = cg
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no cgroup v2 line")?;
        Ok(mount.join(rel.trim().trim_start_matches('/')))
    }

    /// Operations per second of one timed loop.
    fn rate(&mut self, op: Op, secs: f64) -> Result<f64> {
        let a = self.ask(&format!("{} {secs}", op.name()))?;
        let f: Vec<u64> = a
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        let [ops, errors, nanos, first_errno] = f[..] else {
            bail!("bench worker {}: bad answer {a:?}", self.name);
        };
        if errors > 0 {
            bail!(
                "bench worker {} ({}): {errors} errors in {ops} operations (first errno {first_errno}): \
                 the target must be allowed",
                self.name,
                op.name()
            );
        }
        Ok(ops as f64 / (nanos as f64 / 1e9))
    }
}

#[derive(Clone, Copy)]
enum Op {
    Connect,
    Sendto,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Connect => "connect",
            Op::Sendto => "sendto",
        }
    }
}

// ---------------------------------------------------------------------------
// comparisons

struct Comparison {
    name: String,
    op: Op,
    subject: String,
    reference: String,
    floor: f64,
    rounds: Vec<(f64, f64)>,
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl Comparison {
    fn ratios(&self) -> Vec<f64> {
        self.rounds.iter().map(|(a, b)| a / b).collect()
    }
    fn ratio(&self) -> f64 {
        median(self.ratios())
    }
    fn pass(&self) -> bool {
        self.ratio() >= self.floor
    }
    fn json(&self) -> serde_json::Value {
        let r = self.ratios();
        json!({
            "name": self.name,
            "op": self.op.name(),
            "subject": self.subject,
            "reference": self.reference,
            "floor": self.floor,
            "median_ratio": self.ratio(),
            "min_ratio": r.iter().cloned().fold(f64::INFINITY, f64::min),
            "max_ratio": r.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
            "subject_median_ops_per_sec": median(self.rounds.iter().map(|x| x.0).collect()),
            "reference_median_ops_per_sec": median(self.rounds.iter().map(|x| x.1).collect()),
            "rounds": self.rounds.iter().map(|(a, b)| json!({"subject": a, "reference": b, "ratio": a / b})).collect::<Vec<_>>(),
            "pass": if self.floor == 0.0 { serde_json::Value::Null } else { json!(self.pass()) },
        })
    }
}

/// ns per run of each program on `cgroup`'s hooks while `w` connects and
/// sends for `secs` each (statistics must be on).
struct Costs {
    label: String,
    /// (hook, program name, ns per run)
    rows: Vec<(&'static str, String, f64)>,
}

fn program_costs(label: &str, w: &mut Worker, cgroup: &Path, secs: f64) -> Result<Costs> {
    eprint!("bench: per-program cost, {label:<28}");
    // Several short phases, the median of each program's ns/run over them:
    // a burst of the host's neighbours spoils a phase, not the figure.
    const PHASES: usize = 5;
    let mut per: Vec<((&'static str, String), Vec<f64>)> = Vec::new();
    for _ in 0..PHASES {
        let before = crate::empty_progs::cgroup_runs(cgroup)?;
        w.rate(Op::Connect, secs / PHASES as f64)?;
        w.rate(Op::Sendto, secs / PHASES as f64)?;
        let after = crate::empty_progs::cgroup_runs(cgroup)?;
        for (hook, name, runs) in &after {
            let prev = before
                .iter()
                .find(|(h, n, _)| h == hook && n == name)
                .map(|x| x.2)
                .unwrap_or_default();
            if let Some(ns) = runs.ns_per_run_since(&prev) {
                let key = (*hook, name.clone());
                match per.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, v)) => v.push(ns),
                    None => per.push((key, vec![ns])),
                }
            }
        }
    }
    let rows: Vec<(&'static str, String, f64)> = per
        .into_iter()
        .map(|((hook, name), v)| (hook, name, median(v)))
        .collect();
    eprintln!(" {} programs ran", rows.len());
    Ok(Costs {
        label: label.to_string(),
        rows,
    })
}

/// The cost of `hook` in `c` (the enforcer's program there, or the sum if
/// several ran; the cost probes left out).
fn hook_ns(c: &Costs, hook: &str) -> Option<f64> {
    let v: Vec<f64> = c
        .rows
        .iter()
        .filter(|r| r.0 == hook && !r.1.starts_with(crate::empty_progs::COST_PREFIX))
        .map(|r| r.2)
        .collect();
    (!v.is_empty()).then(|| v.iter().sum())
}

fn compare(
    name: &str,
    op: Op,
    a: &mut Worker,
    b: &mut Worker,
    floor: f64,
    rounds: u32,
    secs: f64,
) -> Result<Comparison> {
    compare_with(name, op, (a, None), (b, None), floor, rounds, secs)
}

/// One side of a comparison: a worker, and the nftables table whose base
/// chain is hooked only while that worker is measured.
type Side<'a> = (&'a mut Worker, Option<&'a crate::peers::Nft>);

/// One timed loop of a side.
fn side_rate(side: &mut Side, op: Op, secs: f64) -> Result<f64> {
    let Some(nft) = side.1 else {
        return side.0.rate(op, secs);
    };
    // A commit leaves work behind (the old hook list and the transaction
    // are freed after an RCU grace period, by a kworker): let it run before
    // either side's timed loop.
    let settle = Duration::from_millis(20);
    nft.hook(true)?;
    std::thread::sleep(settle);
    let r = side.0.rate(op, secs);
    nft.hook(false)?;
    std::thread::sleep(settle);
    r
}

/// `rounds` interleaved rounds: A B, B A, A B, ... (the order alternates so
/// that drift and warm-up do not favour one side).
fn compare_with(
    name: &str,
    op: Op,
    mut a: Side,
    mut b: Side,
    floor: f64,
    rounds: u32,
    secs: f64,
) -> Result<Comparison> {
    eprint!("bench: {name:<44}");
    // Warm-up, not recorded.
    side_rate(&mut a, op, secs / 4.0)?;
    side_rate(&mut b, op, secs / 4.0)?;
    let mut out = Vec::new();
    for i in 0..rounds {
        let (ra, rb) = if i % 2 == 0 {
            let ra = side_rate(&mut a, op, secs)?;
            (ra, side_rate(&mut b, op, secs)?)
        } else {
            let rb = side_rate(&mut b, op, secs)?;
            (side_rate(&mut a, op, secs)?, rb)
        };
        out.push((ra, rb));
        eprint!(".");
    }
    let c = Comparison {
        name: name.to_string(),
        op,
        subject: a.0.name.clone(),
        reference: b.0.name.clone(),
        floor,
        rounds: out,
    };
    eprintln!(" {:.3}x", c.ratio());
    Ok(c)
}

/// The nftables peer enforces: with its base chain hooked, a worker in the
/// matched cgroup is refused a denied destination (connect: EHOSTUNREACH,
/// the ICMP admin-prohibited of `reject`; sendto: EPERM, the dropped
/// datagram) and reaches the allowed targets, and a worker outside it is
/// not refused; unhooked, nothing is refused. Returns the errors it got.
fn probe_nft(
    w: &mut Worker,
    outside: &mut Worker,
    nft: &crate::peers::Nft,
    denied_tcp: SocketAddrV4,
    denied_udp: SocketAddrV4,
) -> Result<(String, String)> {
    let ask = |w: &mut Worker| -> Result<(String, String)> {
        Ok((
            w.ask(&format!("probe-connect {denied_tcp}"))?,
            w.ask(&format!("probe-sendto {denied_udp}"))?,
        ))
    };
    let open = (format!("errno {}", libc::ECONNREFUSED), "ok".to_string());
    nft.hook(true)?;
    let refused = ask(w)?;
    let beside = ask(outside)?;
    // The allowed targets (`rate` fails on any error).
    let allowed = w
        .rate(Op::Connect, 0.05)
        .and_then(|_| w.rate(Op::Sendto, 0.05));
    nft.hook(false)?;
    let unhooked = ask(w)?;
    let want = (
        format!("errno {}", libc::EHOSTUNREACH),
        format!("errno {}", libc::EPERM),
    );
    if refused != want {
        bail!(
            "nftables did not refuse {} its denied destinations: connect {}, sendto {} \
             (expected {}, {})",
            w.name,
            refused.0,
            refused.1,
            want.0,
            want.1
        );
    }
    allowed.context("nftables refused an allowed target")?;
    if beside != open || unhooked != open {
        bail!(
            "nftables refused more than its cgroup: {} got {beside:?}, {} unhooked {unhooked:?} \
             (expected {open:?})",
            outside.name,
            w.name
        );
    }
    Ok(refused)
}

/// Check that the worker's cgroup really is enforced (or really is not).
fn probe(
    w: &mut Worker,
    denied_tcp: SocketAddrV4,
    denied_udp: SocketAddrV4,
    enforced: bool,
) -> Result<()> {
    let c = w.ask(&format!("probe-connect {denied_tcp}"))?;
    let s = w.ask(&format!("probe-sendto {denied_udp}"))?;
    let eperm = format!("errno {}", libc::EPERM);
    if enforced && (c != eperm || s != eperm) {
        bail!(
            "cgroup {} should be enforced but a denied destination answered: connect {c}, sendto {s}",
            w.name
        );
    }
    if !enforced && (c == eperm || s == eperm) {
        bail!(
            "cgroup {} should not be enforced but got EPERM: connect {c}, sendto {s}",
            w.name
        );
    }
    Ok(())
}

fn spawn_listeners() -> Result<(SocketAddrV4, SocketAddrV4)> {
    let tcp = util::deep_listener(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?;
    let udp = UdpSocket::bind("127.0.0.1:0")?;
    let (SocketAddr::V4(ta), SocketAddr::V4(ua)) = (tcp.local_addr()?, udp.local_addr()?) else {
        unreachable!()
    };
    let cpus = util::bench_cpus();
    std::thread::spawn(move || {
        if let Some((cpu, _)) = cpus {
            let _ = util::pin_to_cpu(cpu);
        }
        for c in tcp.incoming() {
            drop(c);
        }
    });
    std::thread::spawn(move || {
        if let Some((cpu, _)) = cpus {
            let _ = util::pin_to_cpu(cpu);
        }
        let mut buf = [0u8; 2048];
        loop {
            let _ = udp.recv_from(&mut buf);
        }
    });
    Ok((ta, ua))
}

fn thousands(n: usize) -> String {
    if n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

pub(crate) fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default()
}

pub fn run(
    bin: &BinArgs,
    rounds: u32,
    secs: f64,
    skip_scaling: bool,
    big: usize,
    skip_peers: bool,
) -> Result<u8> {
    let root = util::repo_root();
    util::require_root("bench")?;
    if !skip_peers {
        crate::peers::ensure_tools()?;
    }
    let enforcer = util::enforcer_bin(&root, bin)?;
    util::ensure_bpffs()?;
    let mount = util::cgroup2_mount()?;
    let tmp = std::env::temp_dir().join(format!("enforcer-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let result = run_inner(
        &enforcer,
        &mount,
        &tmp,
        &root,
        rounds,
        secs,
        skip_scaling,
        big,
        skip_peers,
    );
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&tmp);
    } else {
        eprintln!(
            "bench: kept {} (daemon configs, policies and logs)",
            tmp.display()
        );
    }
    remove_pins(Path::new(PIN_DIR));
    result
}

#[allow(clippy::too_many_arguments)] // one call site: the bench's parameters, spelled out
fn run_inner(
    enforcer: &Path,
    mount: &Path,
    tmp: &Path,
    root: &Path,
    rounds: u32,
    secs: f64,
    skip_scaling: bool,
    big: usize,
    skip_peers: bool,
) -> Result<u8> {
    let (tcp, udp) = spawn_listeners()?;
    let secs_for_stats = (secs * 8.0).max(1.0);
    // Denied probes: the same host, ports nobody allows (and nobody listens on).
    let denied_tcp = SocketAddrV4::new(*tcp.ip(), if tcp.port() == 9 { 10 } else { 9 });
    let denied_udp = SocketAddrV4::new(*udp.ip(), if udp.port() == 9 { 10 } else { 9 });
    let cgs = Cgroups::create(
        mount,
        "enforcer-bench",
        &["e10k", "base", "base2", "empty", "ebig", "e10", "nft"],
    )?;
    eprintln!("bench: enforcer {}", enforcer.display());
    eprintln!(
        "bench: targets tcp {tcp}, udp {udp}; cgroups under {}",
        cgs.root.display()
    );

    let t0 = Instant::now();
    let p10 = policy_yaml("bench-10", 10, tcp, udp);
    let p10k = policy_yaml("bench-10k", 10_000, tcp, udp);
    let pbig = if skip_scaling {
        String::new()
    } else {
        policy_yaml("bench-big", big, tcp, udp)
    };
    eprintln!(
        "bench: generated policies in {:.1}s (seed {SEED:#x})",
        t0.elapsed().as_secs_f64()
    );

    // 1. Idle RSS: one policy, one binding.
    let (mut d, ready) = start_daemon(
        enforcer,
        &tmp.join("rss"),
        &[("bench-10", &p10)],
        &[(cgs.path("e10"), "bench-10")],
        None,
        Duration::from_secs(60),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    d.check_alive()?;
    let rss_kib = util::vm_rss_kib(d.pid())?;
    d.stop()?;
    let rss_mb = rss_kib as f64 / 1024.0;
    eprintln!(
        "bench: daemon idle RSS (1 policy, 1 binding): {rss_mb:.1} MB (ready in {:.2}s)",
        ready.as_secs_f64()
    );

    // 2. Enforced (10k rules) vs unenforced: one daemon; cgroup `base` is not bound.
    let (d, ready) = start_daemon(
        enforcer,
        &tmp.join("main"),
        &[("bench-10k", &p10k)],
        &[(cgs.path("e10k"), "bench-10k")],
        None,
        Duration::from_secs(300),
    )?;
    eprintln!(
        "bench: daemon (default configuration) with the 10k-rule policy ready in {:.2}s",
        ready.as_secs_f64()
    );
    let mut w10k = Worker::start("e10k (10k rules)", &cgs.path("e10k"), tcp, udp)?;
    let mut wbase = Worker::start("base (unenforced)", &cgs.path("base"), tcp, udp)?;
    probe(&mut w10k, denied_tcp, denied_udp, true)?;
    probe(&mut wbase, denied_tcp, denied_udp, false)?;
    let mut comps = vec![
        compare(
            "connect: 10k rules vs unenforced",
            Op::Connect,
            &mut w10k,
            &mut wbase,
            CONNECT_FLOOR,
            rounds,
            secs,
        )?,
        compare(
            "sendto: 10k rules vs unenforced",
            Op::Sendto,
            &mut w10k,
            &mut wbase,
            SENDTO_FLOOR,
            rounds,
            secs,
        )?,
    ];
    // The floor: empty programs on the same hooks. What the kernel charges
    // for running a program on each hook at all, then what the enforcer's
    // programs add on top of it.
    let hooks = crate::empty_progs::mirror(&cgs.path("e10k"), &cgs.path("empty"))?;
    eprintln!("bench: empty programs on {}", hooks.join(", "));
    let mut wempty = Worker::start("empty (empty programs)", &cgs.path("empty"), tcp, udp)?;
    probe(&mut wempty, denied_tcp, denied_udp, false)?;
    for op in [Op::Connect, Op::Sendto] {
        comps.push(compare(
            &format!("{}: empty programs vs unenforced", op.name()),
            op,
            &mut wempty,
            &mut wbase,
            0.0,
            rounds,
            secs,
        )?);
        comps.push(compare(
            &format!("{}: 10k rules vs empty programs", op.name()),
            op,
            &mut w10k,
            &mut wempty,
            0.0,
            rounds,
            secs,
        )?);
    }
    // The peer an operator reaches for: nftables, the same 10,000 rules,
    // matching the cgroup `nft` (its worker has no program attached).
    let mut nft_info = serde_json::Value::Null;
    if !skip_peers {
        let (path, level) = crate::peers::nft_cgroup(mount, &cgs.path("nft"))?;
        let nft = crate::peers::Nft::load(
            &bench_rules(10_000, tcp, udp),
            &path,
            level,
            &tmp.join("peer.nft"),
        )?;
        let st = &nft.stats;
        eprintln!(
            "bench: nftables ({}): the 10k rules as {} set elements in sets {} ({} covered by \
             another element, left out), loaded in {:.2}s; cgroup match `socket cgroupv2 level \
             {level} \"{path}\"`",
            crate::peers::nft_version(),
            st.elements,
            st.sets
                .iter()
                .map(|(n, c)| format!("{n}: {c}"))
                .collect::<Vec<_>>()
                .join(", "),
            st.covered,
            nft.load_time.as_secs_f64()
        );
        let mut wnft = Worker::start("nft (nftables, 10k rules)", &cgs.path("nft"), tcp, udp)?;
        let refused = probe_nft(&mut wnft, &mut wbase, &nft, denied_tcp, denied_udp)?;
        eprintln!(
            "bench: nftables refuses {denied_tcp}: connect {}, sendto {} (the allowed targets pass)",
            refused.0, refused.1
        );
        for op in [Op::Connect, Op::Sendto] {
            comps.push(compare_with(
                &format!("{}: 10k rules vs nftables 10k", op.name()),
                op,
                (&mut w10k, None),
                (&mut wnft, Some(&nft)),
                1.0,
                rounds,
                secs,
            )?);
            comps.push(compare_with(
                &format!("{}: nftables 10k vs unenforced", op.name()),
                op,
                (&mut wnft, Some(&nft)),
                (&mut wbase, None),
                0.0,
                rounds,
                secs,
            )?);
        }
        nft_info = json!({
            "version": crate::peers::nft_version(),
            "ruleset_file_lines": std::fs::read_to_string(&nft.file).map(|t| t.lines().count()).unwrap_or(0),
            "rules": st.rules,
            "set_elements": st.elements,
            "sets": st.sets.iter().map(|(n, c)| json!({"name": n, "elements": c})).collect::<Vec<_>>(),
            "elements_covered_left_out": st.covered,
            "load_secs": nft.load_time.as_secs_f64(),
            "cgroup_match": format!("socket cgroupv2 level {level} \"{path}\""),
            "reject": "reject with icmpx admin-prohibited",
            "denied_connect": refused.0,
            "denied_sendto": refused.1,
        });
    }
    // Per-program cost from the kernel's own statistics (on only now: they
    // slow every program down).
    let mut costs = Vec::new();
    {
        // What one helper call or lookup adds, in the same calls as the
        // empty programs (after the rate comparisons: they cost the worker).
        crate::empty_progs::attach_cost_probes(&cgs.path("empty"), 10_000)?;
        let _stats = crate::empty_progs::StatsOn::enable()?;
        costs.push(program_costs(
            "empty programs",
            &mut wempty,
            &cgs.path("empty"),
            secs_for_stats,
        )?);
        costs.push(program_costs(
            "daemon, default config",
            &mut w10k,
            &cgs.path("e10k"),
            secs_for_stats,
        )?);
    }
    drop(wempty);
    drop(w10k);
    // Control (A/A): two unenforced cgroups, to show the harness's own noise.
    let mut wbase2 = Worker::start("base2 (unenforced)", &cgs.path("base2"), tcp, udp)?;
    probe(&mut wbase2, denied_tcp, denied_udp, false)?;
    comps.push(compare(
        "control connect: unenforced vs unenf.",
        Op::Connect,
        &mut wbase2,
        &mut wbase,
        0.0,
        rounds,
        secs,
    )?);
    comps.push(compare(
        "control sendto: unenforced vs unenf.",
        Op::Sendto,
        &mut wbase2,
        &mut wbase,
        0.0,
        rounds,
        secs,
    )?);
    drop(wbase2);
    let rss_10k_mb = util::vm_rss_kib(d.pid())
        .map(|k| k as f64 / 1024.0)
        .unwrap_or(f64::NAN);
    d.stop()?;

    // `enforcer run` in its default configuration, same policy, vs the
    // same unenforced worker.
    {
        let pfile = tmp.join("run-10k.yaml");
        std::fs::write(&pfile, &p10k)?;
        let mut wrun = Worker::start_under_run("run (10k rules)", enforcer, &pfile, tcp, udp)?;
        probe(&mut wrun, denied_tcp, denied_udp, true)?;
        for (op, floor) in [(Op::Connect, CONNECT_FLOOR), (Op::Sendto, SENDTO_FLOOR)] {
            comps.push(compare(
                &format!("{}: enforcer run, 10k vs unenf.", op.name()),
                op,
                &mut wrun,
                &mut wbase,
                floor,
                rounds,
                secs,
            )?);
        }
        let cg = wrun.cgroup(mount)?;
        let _stats = crate::empty_progs::StatsOn::enable()?;
        costs.push(program_costs(
            "enforcer run, default",
            &mut wrun,
            &cg,
            secs_for_stats,
        )?);
    }
    drop(wbase);

    // The daemon with allowEvents: 0 (allowed decisions only counted): what
    // the accounting of allowed decisions costs, per program.
    {
        let (d, _) = start_daemon(
            enforcer,
            &tmp.join("noevents"),
            &[("bench-10k", &p10k)],
            &[(cgs.path("e10k"), "bench-10k")],
            Some(0),
            Duration::from_secs(300),
        )?;
        let mut w = Worker::start("e10k (allowEvents 0)", &cgs.path("e10k"), tcp, udp)?;
        probe(&mut w, denied_tcp, denied_udp, true)?;
        let _stats = crate::empty_progs::StatsOn::enable()?;
        costs.push(program_costs(
            "daemon, allowEvents 0",
            &mut w,
            &cgs.path("e10k"),
            secs_for_stats,
        )?);
        drop(w);
        d.stop()?;
    }

    // 3. Lookup cost vs table size: big policy vs 10 rules, both enforced, a
    //    second daemon run. A policy the daemon refuses is a MISS, not an abort.
    let mut scaling_error = None;
    let mut rss_big_mb = f64::NAN;
    if !skip_scaling {
        match start_daemon(
            enforcer,
            &tmp.join("scaling"),
            &[("bench-10", &p10), ("bench-big", &pbig)],
            &[
                (cgs.path("e10"), "bench-10"),
                (cgs.path("ebig"), "bench-big"),
            ],
            None,
            Duration::from_secs(300),
        ) {
            Ok((d, ready)) => {
                eprintln!(
                    "bench: daemon with the {}-rule and 10-rule policies ready in {:.2}s",
                    big,
                    ready.as_secs_f64()
                );
                let mut wbig =
                    Worker::start(&format!("ebig ({big} rules)"), &cgs.path("ebig"), tcp, udp)?;
                let mut w10 = Worker::start("e10 (10 rules)", &cgs.path("e10"), tcp, udp)?;
                probe(&mut wbig, denied_tcp, denied_udp, true)?;
                probe(&mut w10, denied_tcp, denied_udp, true)?;
                let label = thousands(big);
                comps.push(compare(
                    &format!("connect: {label} rules vs 10 rules"),
                    Op::Connect,
                    &mut wbig,
                    &mut w10,
                    0.97,
                    rounds,
                    secs,
                )?);
                comps.push(compare(
                    &format!("sendto: {label} rules vs 10 rules"),
                    Op::Sendto,
                    &mut wbig,
                    &mut w10,
                    0.97,
                    rounds,
                    secs,
                )?);
                drop(wbig);
                drop(w10);
                rss_big_mb = util::vm_rss_kib(d.pid())
                    .map(|k| k as f64 / 1024.0)
                    .unwrap_or(f64::NAN);
                d.stop()?;
            }
            Err(e) => {
                eprintln!("bench: MISS: the {big}-rule comparison could not run: {e:#}");
                scaling_error = Some(format!("{e:#}"));
            }
        }
    }

    // The DNS proxy vs dnsmasq (bench-dns at its defaults, dnsmasq as a third side).
    let dns_peer = if skip_peers {
        None
    } else {
        let m = {
            use crate::dns_bench::*;
            measure(
                enforcer,
                DEFAULT_QUERIES,
                DEFAULT_ROUNDS,
                DEFAULT_CONCURRENCY,
                DEFAULT_SECS,
                true,
            )?
        };
        crate::dns_bench::peer_report(&m)
    };

    // Report.
    println!();
    println!(
        "enforcer bench: {rounds} interleaved rounds x {secs}s per side; kernel {}; {} CPUs ({})",
        kernel_release(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu_model()
    );
    println!();
    println!(
        "{:<36} {:>12} {:>12} {:>8} {:>15} {:>7}  result",
        "comparison", "subject/s", "reference/s", "ratio", "spread", "floor"
    );
    for c in &comps {
        let r = c.ratios();
        let lo = r.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        println!(
            "{:<36} {:>12.0} {:>12.0} {:>7.3}x {:>6.3}..{:<6.3}x {:>7}  {}",
            c.name,
            median(c.rounds.iter().map(|x| x.0).collect()),
            median(c.rounds.iter().map(|x| x.1).collect()),
            c.ratio(),
            lo,
            hi,
            if c.floor == 0.0 {
                "-".to_string()
            } else {
                format!("{:.2}x", c.floor)
            },
            if c.floor == 0.0 && c.name.starts_with("control") {
                "(control)"
            } else if c.floor == 0.0 {
                "(info)"
            } else if c.pass() {
                "PASS"
            } else {
                "MISS"
            }
        );
    }
    let rss_pass = rss_mb < RSS_FLOOR_MB;
    println!(
        "{:<36} {:>12} {:>12} {:>8} {:>15} {:>7}  {}",
        "daemon idle RSS (1 policy)",
        format!("{rss_mb:.1} MB"),
        "",
        "",
        "",
        format!("<{RSS_FLOOR_MB} MB"),
        if rss_pass { "PASS" } else { "MISS" }
    );
    if let Some(e) = &scaling_error {
        let first = e.lines().next().unwrap_or("");
        println!(
            "{:<36} {:>12}  MISS: {first}",
            format!("{} rules vs 10 rules", thousands(big)),
            "not run"
        );
    }
    println!(
        "{:<36} {:>12}   (informational)",
        "daemon RSS, 10k-rule policy, loaded",
        format!("{rss_10k_mb:.1} MB")
    );
    if !skip_scaling && scaling_error.is_none() {
        println!(
            "{:<36} {:>12}   (informational)",
            format!("daemon RSS, {}+10 rules, loaded", thousands(big)),
            format!("{rss_big_mb:.1} MB")
        );
    }

    if !nft_info.is_null() {
        println!(
            "nftables peer ({}): {} sets of {} elements from the same 10k rules, `{}` jump to them, \
             else `{}` (denied connect: {}, sendto: {}); its base chain hooked only while its side runs",
            nft_info["version"].as_str().unwrap_or(""),
            nft_info["sets"].as_array().map_or(0, Vec::len),
            nft_info["set_elements"],
            nft_info["cgroup_match"].as_str().unwrap_or(""),
            nft_info["reject"].as_str().unwrap_or(""),
            nft_info["denied_connect"].as_str().unwrap_or(""),
            nft_info["denied_sendto"].as_str().unwrap_or(""),
        );
    }
    if let Some((table, _)) = &dns_peer {
        println!();
        println!("{table}");
    }

    // Per-program ns/run (kernel statistics), one column per configuration.
    println!();
    print!("{:<14}", "ns/run");
    for c in &costs {
        print!(" {:>24}", c.label);
    }
    println!(" {:>8}  result (default configs)", "target");
    let mut hooks: Vec<&'static str> = Vec::new();
    for c in &costs {
        for r in &c.rows {
            if !hooks.contains(&r.0) {
                hooks.push(r.0);
            }
        }
    }
    let mut program_ns = serde_json::Map::new();
    for hook in &hooks {
        print!("{hook:<14}");
        let mut per = serde_json::Map::new();
        for c in &costs {
            let ns = hook_ns(c, hook);
            print!(
                " {:>24}",
                ns.map(|n| format!("{n:.0}")).unwrap_or_else(|| "-".into())
            );
            per.insert(c.label.clone(), json!(ns));
        }
        let target = NS_TARGETS.iter().find(|t| t.0 == *hook).map(|t| t.1);
        let defaults: Vec<f64> = costs
            .iter()
            .filter(|c| c.label.contains("default"))
            .filter_map(|c| hook_ns(c, hook))
            .collect();
        let result = match target {
            Some(t) if !defaults.is_empty() && defaults.iter().all(|&n| n <= t) => "PASS",
            Some(_) if !defaults.is_empty() => "MISS",
            _ => "(info)",
        };
        println!(
            " {:>8}  {result}",
            target.map(|t| format!("<={t:.0}")).unwrap_or_default()
        );
        per.insert("target".into(), json!(target));
        program_ns.insert(hook.to_string(), serde_json::Value::Object(per));
    }

    // The cost probes: ns added to the empty program on the same hook.
    let mut probe_ns = serde_json::Map::new();
    if let Some(empty) = costs.first() {
        println!();
        println!(
            "{:<26} {:>10} {:>10}   (ns added to the empty program, same calls)",
            "cost probe", "connect4", "sendmsg4"
        );
        let mut names: Vec<&str> = Vec::new();
        for r in &empty.rows {
            if let Some(n) = r.1.strip_prefix(crate::empty_progs::COST_PREFIX) {
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        for n in names {
            let mut per = serde_json::Map::new();
            print!("{n:<26}");
            for hook in ["connect4", "sendmsg4"] {
                let probe = empty
                    .rows
                    .iter()
                    .find(|r| {
                        r.0 == hook && r.1.strip_prefix(crate::empty_progs::COST_PREFIX) == Some(n)
                    })
                    .map(|r| r.2);
                let added = probe.zip(hook_ns(empty, hook)).map(|(p, e)| p - e);
                print!(
                    " {:>10}",
                    added
                        .map(|a| format!("{a:+.0}"))
                        .unwrap_or_else(|| "-".into())
                );
                per.insert(hook.into(), json!(added));
            }
            println!();
            probe_ns.insert(n.to_string(), serde_json::Value::Object(per));
        }
    }

    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let results = json!({
        "kernel": kernel_release(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpu_model(),
        "rounds": rounds,
        "secs_per_round": secs,
        "seed": SEED,
        "big_rules": big,
        "comparisons": comps.iter().map(Comparison::json).collect::<Vec<_>>(),
        "daemon_idle_rss_mb": rss_mb,
        "daemon_idle_rss_floor_mb": RSS_FLOOR_MB,
        "daemon_idle_rss_pass": rss_pass,
        "daemon_rss_10k_loaded_mb": rss_10k_mb,
        "daemon_rss_big_loaded_mb": rss_big_mb,
        "scaling_error": scaling_error,
        "program_ns_per_run": program_ns,
        "cost_probes_ns_added": probe_ns,
        "peers": {
            "nftables": nft_info,
            "dns_dnsmasq": dns_peer.map(|p| p.1),
        },
    });
    let path = out_dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    println!("\nresults: {}", path.display());
    Ok(0)
}

// ---------------------------------------------------------------------------
// side by side: two enforcer builds, per-program cost in the same calls as
// empty programs

/// `cargo xtask bench-ab A B ...`: each build in turn (A B, B A, ...) runs
/// the daemon in its default configuration with the 10k-rule policy bound
/// to a cgroup whose parent carries empty programs on the same hooks
/// (`BPF_F_ALLOW_MULTI`): every call of the worker runs both, so each
/// build's `connect4`/`sendmsg4` minus the empty program of the same calls
/// is what its own work costs, without the minute-to-minute drift of a
/// shared machine (kernel statistics, on only while it measures).
pub fn ab(bins: &[PathBuf], alternations: u32, secs: f64) -> Result<u8> {
    util::require_root("bench-ab")?;
    util::ensure_bpffs()?;
    if bins.len() < 2 {
        bail!("bench-ab needs at least two enforcer binaries");
    }
    let mount = util::cgroup2_mount()?;
    let tmp = std::env::temp_dir().join(format!("enforcer-bench-ab-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let (tcp, udp) = spawn_listeners()?;
    let cgs = Cgroups::create(&mount, "enforcer-bench", &["ab"])?;
    let parent = cgs.path("ab");
    let child = parent.join("w");
    std::fs::create_dir(&child).context("creating the worker's cgroup")?;
    struct RmChild(PathBuf);
    impl Drop for RmChild {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _rm = RmChild(child.clone());
    let p10k = policy_yaml("bench-10k", 10_000, tcp, udp);
    let hooks = ["connect4", "sendmsg4"];
    // (bin index, hook) -> [(program ns, empty ns)]
    let mut got: Vec<Vec<Vec<(f64, f64)>>> = vec![vec![Vec::new(); hooks.len()]; bins.len()];
    let mut mirrored = false;
    for alt in 0..alternations {
        let order: Vec<usize> = if alt % 2 == 0 {
            (0..bins.len()).collect()
        } else {
            (0..bins.len()).rev().collect()
        };
        for i in order {
            let (d, _) = start_daemon(
                &bins[i],
                &tmp.join(format!("d{i}")),
                &[("bench-10k", &p10k)],
                &[(child.clone(), "bench-10k")],
                None,
                Duration::from_secs(300),
            )?;
            if !mirrored {
                crate::empty_progs::mirror(&child, &parent)?;
                mirrored = true;
            }
            let mut w = Worker::start("ab", &child, tcp, udp)?;
            w.rate(Op::Connect, secs / 4.0)?;
            w.rate(Op::Sendto, secs / 4.0)?;
            let c = {
                let _stats = crate::empty_progs::StatsOn::enable()?;
                program_costs(&format!("build {i}"), &mut w, &child, secs)?
            };
            drop(w);
            d.stop()?;
            let mut line = format!("bench-ab: round {alt} build {i}:");
            for (h, hook) in hooks.iter().enumerate() {
                let pick = |prefix: &str| {
                    c.rows
                        .iter()
                        .find(|r| r.0 == *hook && r.1.starts_with(prefix))
                        .map(|r| r.2)
                };
                if let (Some(p), Some(e)) = (pick("enforcer_"), pick("empty_")) {
                    got[i][h].push((p, e));
                    let _ = write!(line, " {hook} {p:.0} (empty {e:.0}, +{:.0})", p - e);
                }
            }
            eprintln!("{line}");
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    println!();
    println!(
        "{:<6} {:>10} {:>22} {:>10} {:>22}   (median over {alternations} rounds; build: path)",
        "build", "connect4", "connect4 - empty", "sendmsg4", "sendmsg4 - empty"
    );
    for (i, per) in got.iter().enumerate() {
        let med = |h: usize, f: fn(&(f64, f64)) -> f64| median(per[h].iter().map(f).collect());
        println!(
            "{:<6} {:>10.0} {:>22.0} {:>10.0} {:>22.0}   {}",
            i,
            med(0, |x| x.0),
            med(0, |x| x.0 - x.1),
            med(1, |x| x.0),
            med(1, |x| x.0 - x.1),
            bins[i].display()
        );
    }
    Ok(0)
}
