//! `cargo xtask bench-tls`: what the kernel's first-bytes check (TLS SNI)
//! costs a TLS client, in the default configuration of a `host` rule.
//!
//! - A TLS server (`xtask/bench/tls_bench.py server`, outside any enforced
//!   cgroup) on 127.0.0.5, two ports, certificate for both names (EC P-256,
//!   made with `openssl req`).
//! - A DNS upstream in this process: `inspect.bench.test` and
//!   `raw.bench.test` -> 127.0.0.5.
//! - `enforcer run` with a policy of two host rules for the same address:
//!   `inspect.bench.test` on port A (default: first bytes judged) and
//!   `raw.bench.test` on port B with `inspect: none`; loopback answers
//!   vouched by `127.0.0.0/8` port 9.
//! - The worker (`tls_bench.py worker`, the agent) resolves both names
//!   through the system resolver (steered to the proxy) and runs N
//!   handshakes + one request per side per round, sides interleaved (A B,
//!   B A, ...). Reported: median and spread of the per-round rate ratio
//!   (inspected / not inspected); floor 0.97 (reported, not asserted).
//! - With `kernel.bpf_stats_enabled=1`: ns per run of the egress program
//!   and of connect4, from `bpftool prog show` while the agent runs.
//!
//! Writes `target/bench/tls.json`.
use std::{
    io::{BufRead, BufReader, Read},
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::{
    dns_upstream::{Upstream, Zone},
    util, BinArgs,
};

const FLOOR: f64 = 0.97;

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.5:0")?
        .local_addr()?
        .port())
}

/// (run_time_ns, run_cnt) of the programs whose name starts with `prefix`.
fn prog_stats(prefix: &str) -> Option<(u64, u64)> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let mut t = (0u64, 0u64);
    for p in v.as_array()? {
        if p["name"].as_str().is_some_and(|n| n.starts_with(prefix)) {
            t.0 += p["run_time_ns"].as_u64().unwrap_or(0);
            t.1 += p["run_cnt"].as_u64().unwrap_or(0);
        }
    }
    Some(t)
}

pub fn run(bin: &BinArgs, conns: usize, rounds: usize) -> Result<u8> {
    let root = util::repo_root();
    util::require_root("bench-tls")?;
    let enforcer = util::enforcer_bin(&root, bin)?;
    util::ensure_bpffs()?;
    let tmp = std::env::temp_dir().join(format!("enforcer-bench-tls-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let (cert, key) = (tmp.join("cert.pem"), tmp.join("key.pem"));
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=inspect.bench.test"])
        .args([
            "-addext",
            "subjectAltName=DNS:inspect.bench.test,DNS:raw.bench.test",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .context("running openssl")?;
    if !ok.success() {
        bail!("openssl req failed");
    }
    let (pa, pb) = (free_port()?, free_port()?);
    let script = root.join("xtask/bench/tls_bench.py");
    let mut server = Command::new("python3")
        .arg(&script)
        .args(["server", "127.0.0.5", &pa.to_string(), &pb.to_string()])
        .arg(&cert)
        .arg(&key)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the TLS server")?;
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut line)?;
    let ip = Ipv4Addr::new(127, 0, 0, 5);
    let up = Upstream::start(
        "127.0.0.1:0",
        1,
        Zone::new(300)
            .with("inspect.bench.test", ip)
            .with("raw.bench.test", ip),
        false,
    )?;
    let pol = tmp.join("bench-tls.yaml");
    std::fs::write(
        &pol,
        format!(
            "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: bench-tls\nspec:\n  \
             mode: enforce\n  egress:\n    \
             - {{host: inspect.bench.test, ports: [{pa}], protocol: tcp}}\n    \
             - {{host: raw.bench.test, ports: [{pb}], protocol: tcp, inspect: none}}\n    \
             - {{cidr: 127.0.0.0/8, ports: [9], protocol: tcp}}\n  dns:\n    upstream: [\"{}\"]\n",
            up.addr
        ),
    )?;
    let _ = Command::new("sysctl")
        .args(["-qw", "kernel.bpf_stats_enabled=1"])
        .status();
    eprintln!(
        "bench-tls: enforcer {}; {conns} handshakes x {rounds} rounds per side",
        enforcer.display()
    );
    let mut child = Command::new(&enforcer)
        .args(["run", "-q", "--user", "root", "--policy"])
        .arg(&pol)
        .arg("--")
        .arg("python3")
        .arg(&script)
        .args(["worker", "--names", "inspect.bench.test,raw.bench.test"])
        .args(["--ports", &format!("{pa},{pb}")])
        .arg("--cafile")
        .arg(&cert)
        .args([
            "--conns",
            &conns.to_string(),
            "--rounds",
            &rounds.to_string(),
        ])
        .current_dir(&tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting enforcer run")?;
    let mut result = None;
    let mut stats = None;
    for l in BufReader::new(child.stdout.take().unwrap()).lines() {
        let l = l?;
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(l.trim()) {
            // The programs are still attached: read their statistics now.
            stats = Some((prog_stats("enforcer_inspec"), prog_stats("enforcer_connec")));
            result = Some(v);
        }
    }
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err)?;
    let st = child.wait()?;
    let _ = server.kill();
    let _ = server.wait();
    let _ = Command::new("sysctl")
        .args(["-qw", "kernel.bpf_stats_enabled=0"])
        .status();
    let Some(w) = result.filter(|_| st.success()) else {
        bail!(
            "enforcer run / tls worker failed ({st}):\n{err}\n(kept {})",
            tmp.display()
        );
    };
    let _ = std::fs::remove_dir_all(&tmp);
    let ratios: Vec<f64> = w["ratios"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default();
    let median = w["median"].as_f64().unwrap_or(f64::NAN);
    let (lo, hi) = (
        ratios.first().copied().unwrap_or(f64::NAN),
        ratios.last().copied().unwrap_or(f64::NAN),
    );
    let per_run = |s: Option<(u64, u64)>| match s {
        Some((ns, n)) if n > 0 => Some(ns as f64 / n as f64),
        _ => None,
    };
    let (inspect_ns, connect_ns) = stats
        .map(|(a, b)| (per_run(a), per_run(b)))
        .unwrap_or((None, None));
    let mean = |k: &str| {
        let v: Vec<f64> = w[k]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    println!(
        "bench-tls: TLS handshake + one request, learned address: inspected {:.0}/s vs inspect: none {:.0}/s",
        mean("rates_a"),
        mean("rates_b")
    );
    println!(
        "bench-tls: ratio (median of {} rounds) {median:.3}x [{lo:.3} .. {hi:.3}] (floor {FLOOR}) {}",
        ratios.len(),
        if median >= FLOOR { "ok" } else { "BELOW FLOOR" }
    );
    match (inspect_ns, connect_ns) {
        (Some(i), Some(c)) => println!(
            "bench-tls: kernel stats: enforcer_inspect {i:.0} ns/run (every egress segment of the agent), connect4 {c:.0} ns/run"
        ),
        _ => println!("bench-tls: kernel stats unavailable (bpftool, kernel.bpf_stats_enabled)"),
    }
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("tls.json"),
        serde_json::to_vec_pretty(&json!({
            "worker": w, "median": median, "floor": FLOOR,
            "inspect_ns_per_run": inspect_ns, "connect4_ns_per_run": connect_ns,
        }))?,
    )?;
    Ok(0)
}
