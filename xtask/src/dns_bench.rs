//! `cargo xtask bench-dns`: what the enforcer's DNS proxy adds to a query.
//!
//! - An upstream responder in this process (UDP, 127.0.0.1:<free port>,
//!   answers built with `hickory-proto`: every name under
//!   `bench.example.com` -> A 127.0.0.5, TTL 300).
//! - `enforcer run --policy <generated> -- xtask bench-dns-worker ...`: the
//!   policy allows `*.bench.example.com` (host rule), vouches for loopback
//!   answers (`127.0.0.0/8` port 9) and allows UDP to the upstream's port, so
//!   that the worker can also query the upstream directly; `dns.upstream` is
//!   the responder.
//! - The worker (inside the enforced cgroup) measures per-query round trips,
//!   sequentially, alternating in rounds: direct to the upstream vs to
//!   `127.0.0.1:53` (steered by the kernel to the proxy, which forwards to
//!   the same upstream). Both paths run the same cgroup hooks; the
//!   difference is the proxy. Then throughput: `--concurrency` threads, each
//!   with one query in flight, for `--secs`, via the proxy (and direct, for
//!   reference).
//!
//! Floors (reported, not asserted): p99 added latency < 1 ms, >= 20,000 qps
//! via the proxy. Writes `target/bench/dns.json`.
use std::{
    fmt::Write as _,
    io::Read,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::{
    dns_upstream::{Upstream, Zone},
    util, BinArgs,
};

const ZONE: &str = "bench.example.com";
const NAMES: usize = 16;
const P99_FLOOR_US: f64 = 1000.0;
const QPS_FLOOR: f64 = 20_000.0;

// ---------------------------------------------------------------------------
// the bench (outside the cgroup)

fn policy(upstream: SocketAddr) -> String {
    format!(
        "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: bench-dns\nspec:\n  \
         identity:\n    spiffeId: spiffe://enforcer.bench/bench-dns\n  mode: enforce\n  egress:\n    \
         - {{host: \"*.{ZONE}\", ports: [443], protocol: tcp}}\n    \
         - {{cidr: 127.0.0.0/8, ports: [9], protocol: tcp}}\n    \
         - {{cidr: {}/32, ports: [{}], protocol: udp}}\n  dns:\n    upstream: [\"{upstream}\"]\n    \
         namesPerMinute: 1000\n",
        upstream.ip(),
        upstream.port()
    )
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn run(
    bin: &BinArgs,
    queries: usize,
    rounds: usize,
    concurrency: usize,
    secs: f64,
) -> Result<u8> {
    let root = util::repo_root();
    util::require_root("bench-dns")?;
    let enforcer = util::enforcer_bin(&root, bin)?;
    util::ensure_bpffs()?;
    let up = Upstream::start(
        "127.0.0.1:0",
        2,
        Zone::new(300).with(&format!("*.{ZONE}"), Ipv4Addr::new(127, 0, 0, 5)),
        false,
    )?;
    let tmp = std::env::temp_dir().join(format!("enforcer-bench-dns-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let pol = tmp.join("bench-dns.yaml");
    std::fs::write(&pol, policy(up.addr))?;
    eprintln!(
        "bench-dns: enforcer {}; upstream {}; {queries} queries x {rounds} rounds per side, then {concurrency} in flight for {secs}s",
        enforcer.display(),
        up.addr
    );
    let r = run_worker(&enforcer, &pol, up.addr, queries, rounds, concurrency, secs);
    if r.is_ok() {
        let _ = std::fs::remove_dir_all(&tmp);
    } else {
        eprintln!("bench-dns: kept {}", tmp.display());
    }
    let w = r?;
    report(&root, &w, up.answered.load(Ordering::Relaxed))
}

fn run_worker(
    enforcer: &Path,
    policy: &Path,
    upstream: SocketAddr,
    queries: usize,
    rounds: usize,
    concurrency: usize,
    secs: f64,
) -> Result<serde_json::Value> {
    let mut child = Command::new(enforcer)
        .args(["run", "-q", "--user", "root", "--policy"])
        .arg(policy)
        .arg("--")
        .arg(std::env::current_exe()?)
        .args([
            "bench-dns-worker",
            "--upstream",
            &upstream.to_string(),
            "--queries",
            &queries.to_string(),
            "--rounds",
            &rounds.to_string(),
            "--concurrency",
            &concurrency.to_string(),
            "--secs",
            &secs.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting enforcer run")?;
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out)?;
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err)?;
    let st = child.wait()?;
    let line = out
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok());
    match line {
        Some(v) if st.success() => Ok(v),
        _ => {
            bail!("enforcer run / bench-dns-worker failed ({st}):\nstdout:\n{out}\nstderr:\n{err}")
        }
    }
}

fn report(root: &Path, w: &serde_json::Value, upstream_answered: u64) -> Result<u8> {
    let f = |k: &str| w[k].as_f64().unwrap_or(f64::NAN);
    let (d50, d99, p50, p99) = (
        f("direct_p50_us"),
        f("direct_p99_us"),
        f("proxy_p50_us"),
        f("proxy_p99_us"),
    );
    let (add50, add99) = (p50 - d50, p99 - d99);
    let (qps, qps_direct) = (f("proxy_qps"), f("direct_qps"));
    let p99_pass = add99 < P99_FLOOR_US;
    let qps_pass = qps >= QPS_FLOOR;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<40} {:>12} {:>12} {:>12}  result",
        "measure", "direct", "via proxy", "added"
    );
    let _ = writeln!(
        t,
        "{:<40} {:>10.1}us {:>10.1}us {:>10.1}us  -",
        "latency p50 (sequential)", d50, p50, add50
    );
    let _ = writeln!(
        t,
        "{:<40} {:>10.1}us {:>10.1}us {:>10.1}us  {} (< {P99_FLOOR_US:.0}us)",
        "latency p99 (sequential)",
        d99,
        p99,
        add99,
        if p99_pass { "PASS" } else { "MISS" }
    );
    let _ = writeln!(
        t,
        "{:<40} {:>12.0} {:>12.0} {:>12}  {} (>= {QPS_FLOOR:.0}/s)",
        format!("queries/s ({} in flight)", w["concurrency"]),
        qps_direct,
        qps,
        "",
        if qps_pass { "PASS" } else { "MISS" }
    );
    let _ = write!(
        t,
        "errors/timeouts: direct {}, proxy {} (upstream answered {upstream_answered})",
        w["direct_errors"], w["proxy_errors"]
    );
    println!("{t}");
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let results = json!({
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "worker": w,
        "added_p50_us": add50,
        "added_p99_us": add99,
        "added_p99_floor_us": P99_FLOOR_US,
        "added_p99_pass": p99_pass,
        "proxy_qps": qps,
        "direct_qps": qps_direct,
        "qps_floor": QPS_FLOOR,
        "qps_pass": qps_pass,
        "upstream_answered": upstream_answered,
    });
    let path = out_dir.join("dns.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    println!("\nresults: {}", path.display());
    Ok(0)
}

// ---------------------------------------------------------------------------
// the worker (inside the enforced cgroup)

#[derive(clap::Args)]
pub struct DnsWorkerArgs {
    /// The upstream, queried directly for the reference side.
    #[arg(long)]
    upstream: SocketAddr,
    /// Queries per round per side (sequential latency).
    #[arg(long, default_value_t = 2000)]
    queries: usize,
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Threads with one query in flight each (throughput).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Seconds per throughput run.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
}

fn encode_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, 1 question
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    q
}

/// One query/answer on `sock` to `to`: Ok(elapsed) when a NOERROR answer
/// with our id and at least one record arrived.
fn query(
    sock: &UdpSocket,
    to: SocketAddr,
    id: u16,
    name: &str,
    buf: &mut [u8],
) -> Result<Duration, String> {
    let q = encode_query(id, name);
    let t = Instant::now();
    sock.send_to(&q, to).map_err(|e| format!("send: {e}"))?;
    loop {
        let (n, _) = sock.recv_from(buf).map_err(|e| format!("recv: {e}"))?;
        if n < 12 || u16::from_be_bytes([buf[0], buf[1]]) != id {
            continue; // a late answer to an earlier, timed-out query
        }
        let el = t.elapsed();
        let rcode = buf[3] & 0xf;
        let ancount = u16::from_be_bytes([buf[6], buf[7]]);
        if rcode != 0 || ancount == 0 {
            return Err(format!("rcode {rcode}, {ancount} answers"));
        }
        return Ok(el);
    }
}

fn socket() -> Result<UdpSocket> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    Ok(s)
}

fn names() -> Vec<String> {
    (0..NAMES).map(|i| format!("n{i}.{ZONE}")).collect()
}

/// `concurrency` threads, one query in flight each, for `secs`.
fn throughput(to: SocketAddr, concurrency: usize, secs: f64) -> Result<(f64, u64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let names = Arc::new(names());
    let mut hs = Vec::new();
    for t in 0..concurrency {
        let (stop, ok, errors, names) = (stop.clone(), ok.clone(), errors.clone(), names.clone());
        let sock = socket()?;
        hs.push(std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            let mut i = t;
            while !stop.load(Ordering::Relaxed) {
                match query(&sock, to, i as u16, &names[i % NAMES], &mut buf) {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
                i = i.wrapping_add(concurrency);
            }
        }));
    }
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let n0 = ok.load(Ordering::Relaxed);
    let el = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        let _ = h.join();
    }
    Ok((n0 as f64 / el.as_secs_f64(), errors.load(Ordering::Relaxed)))
}

pub fn worker(a: &DnsWorkerArgs) -> Result<()> {
    let proxy: SocketAddr = "127.0.0.1:53".parse().unwrap();
    let names = names();
    let sock = socket()?;
    let mut buf = [0u8; 1500];
    // Enforcement is live: a name outside the zone is REFUSED by the proxy
    // (the upstream would say NXDOMAIN), and warm both paths.
    let q = encode_query(1, "not-allowed.example.net");
    sock.send_to(&q, proxy)?;
    let (n, from) = sock
        .recv_from(&mut buf)
        .context("no answer via 127.0.0.1:53: is the query steered?")?;
    if n < 4 || buf[3] & 0xf != 5 {
        bail!(
            "a disallowed name was not REFUSED via 127.0.0.1:53 (rcode {}): not enforced?",
            buf[3] & 0xf
        );
    }
    if from != proxy {
        bail!("the answer came from {from}, not from the resolver asked (127.0.0.1:53)");
    }
    for (i, n) in names.iter().enumerate() {
        query(&sock, proxy, i as u16, n, &mut buf)
            .map_err(|e| anyhow::anyhow!("warm-up via proxy {n}: {e}"))?;
        query(&sock, a.upstream, i as u16, n, &mut buf)
            .map_err(|e| anyhow::anyhow!("warm-up direct {n}: {e}"))?;
    }
    let (mut direct, mut via) = (Vec::new(), Vec::new());
    let (mut derr, mut perr) = (0u64, 0u64);
    let mut id: u16 = 100;
    for r in 0..a.rounds {
        for side in if r % 2 == 0 { [0, 1] } else { [1, 0] } {
            let (to, v, e) = if side == 0 {
                (a.upstream, &mut direct, &mut derr)
            } else {
                (proxy, &mut via, &mut perr)
            };
            for i in 0..a.queries {
                id = id.wrapping_add(1);
                match query(&sock, to, id, &names[i % NAMES], &mut buf) {
                    Ok(d) => v.push(d.as_nanos() as f64 / 1000.0),
                    Err(_) => *e += 1,
                }
            }
        }
    }
    direct.sort_by(f64::total_cmp);
    via.sort_by(f64::total_cmp);
    let (direct_qps, direct_terr) = throughput(a.upstream, a.concurrency, a.secs)?;
    let (proxy_qps, proxy_terr) = throughput(proxy, a.concurrency, a.secs)?;
    let out = json!({
        "queries_per_round": a.queries,
        "rounds": a.rounds,
        "concurrency": a.concurrency,
        "secs": a.secs,
        "direct_n": direct.len(),
        "proxy_n": via.len(),
        "direct_p50_us": percentile(&direct, 50.0),
        "direct_p99_us": percentile(&direct, 99.0),
        "proxy_p50_us": percentile(&via, 50.0),
        "proxy_p99_us": percentile(&via, 99.0),
        "direct_max_us": direct.last(),
        "proxy_max_us": via.last(),
        "direct_errors": derr + direct_terr,
        "proxy_errors": perr + proxy_terr,
        "direct_qps": direct_qps,
        "proxy_qps": proxy_qps,
    });
    println!("{out}");
    Ok(())
}
