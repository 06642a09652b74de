//! `cargo xtask demo`: a prompt-injected agent under `enforcer run`.
//!
//! The demo plays both the agent's API and the attackers with listeners in
//! this process (outside the enforced cgroup) and counts every byte they
//! receive. The verdict does not trust the agent's own report: it passes
//! only if the legitimate calls reached the API and not one byte reached an
//! attacker listener.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{util, BinArgs};

const AGENT: &str = "demo/injected_agent.py";
const AGENT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Api,
    Attacker,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

struct Listener {
    role: Role,
    proto: Proto,
    addr: SocketAddr,
    bytes: AtomicU64,
    /// TCP connections accepted / UDP datagrams received.
    hits: AtomicU64,
}

/// The demo's DNS server (the policy's `dns.upstream`) and its zone.
const UPSTREAM: &str = "127.0.0.1:5300";

fn zone() -> crate::dns_upstream::Zone {
    crate::dns_upstream::Zone::new(60)
        .with("api.agent.demo", std::net::Ipv4Addr::new(127, 0, 0, 10))
        .with("*.attacker.example", std::net::Ipv4Addr::new(127, 0, 0, 2))
}

/// The listeners of the demo. The policy allows only the two API ones.
const LISTENERS: &[(Role, Proto, &str)] = &[
    (Role::Api, Proto::Tcp, "127.0.0.10:8080"),
    (Role::Api, Proto::Udp, "127.0.0.1:5353"),
    (Role::Attacker, Proto::Tcp, "127.0.0.2:853"),
    (Role::Attacker, Proto::Tcp, "127.0.0.2:443"),
    (Role::Attacker, Proto::Tcp, "127.0.0.3:4444"),
    (Role::Attacker, Proto::Udp, "127.0.0.3:4444"),
    (Role::Attacker, Proto::Tcp, "127.0.0.10:9999"),
    (Role::Attacker, Proto::Tcp, "[::1]:8080"),
    (Role::Attacker, Proto::Udp, "[::1]:4444"),
];

fn start_listeners() -> Result<Vec<Arc<Listener>>> {
    let mut out = Vec::new();
    for &(role, proto, addr) in LISTENERS {
        let addr: SocketAddr = addr.parse()?;
        let l = Arc::new(Listener {
            role,
            proto,
            addr,
            bytes: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        });
        match proto {
            Proto::Tcp => {
                let sock = TcpListener::bind(addr).with_context(|| {
                    format!("binding tcp {addr} (is something else listening there?)")
                })?;
                let l2 = l.clone();
                std::thread::spawn(move || tcp_accept(sock, l2));
            }
            Proto::Udp => {
                let sock = UdpSocket::bind(addr).with_context(|| {
                    format!("binding udp {addr} (is something else listening there?)")
                })?;
                let l2 = l.clone();
                std::thread::spawn(move || udp_recv(sock, l2));
            }
        }
        out.push(l);
    }
    Ok(out)
}

fn tcp_accept(sock: TcpListener, l: Arc<Listener>) {
    for conn in sock.incoming() {
        let Ok(mut conn) = conn else { continue };
        l.hits.fetch_add(1, Ordering::Relaxed);
        let l = l.clone();
        std::thread::spawn(move || {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 4096];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        l.bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
            if l.role == Role::Api {
                let body = "{\"choices\":[{\"message\":{\"content\":\"Revenue grew 4%.\"}}]}";
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
    }
}

fn udp_recv(sock: UdpSocket, l: Arc<Listener>) {
    let mut buf = [0u8; 65536];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        l.bytes.fetch_add(n as u64, Ordering::Relaxed);
        l.hits.fetch_add(1, Ordering::Relaxed);
        if l.role == Role::Api {
            let _ = sock.send_to(b"ack", from);
        }
    }
}

/// One line of the agent's report.
struct Attempt {
    verdict: String,
    kind: String,
    vector: String,
    dest: String,
    detail: String,
}

fn parse_attempt(line: &str) -> Option<Attempt> {
    if !(line.starts_with("ALLOWED ") || line.starts_with("BLOCKED ")) {
        return None;
    }
    let cols: Vec<&str> = line
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    if cols.len() < 4 {
        return None;
    }
    Some(Attempt {
        verdict: cols[0].to_string(),
        kind: cols[1].to_string(),
        vector: cols[2].to_string(),
        dest: cols[3].to_string(),
        detail: cols.get(4..).map(|c| c.join("  ")).unwrap_or_default(),
    })
}

struct Style {
    tty: bool,
}

impl Style {
    fn paint(&self, code: &str, s: &str) -> String {
        if self.tty {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
    fn bold(&self, s: &str) -> String {
        self.paint("1", s)
    }
    fn red(&self, s: &str) -> String {
        self.paint("1;31", s)
    }
    fn green(&self, s: &str) -> String {
        self.paint("1;32", s)
    }
    fn head(&self, s: &str) {
        println!("\n{}", self.bold(&format!("== {s} ")));
    }
}

pub fn run(bin: &BinArgs, policy: Option<PathBuf>, metrics_addr: &str) -> Result<u8> {
    let root = util::repo_root();
    util::require_root("demo")?;
    let st = Style {
        tty: unsafe { libc::isatty(1) } == 1,
    };
    let enforcer = util::enforcer_bin(&root, bin)?;
    let policy = policy.unwrap_or_else(|| root.join("policies/demo-agent.yaml"));
    if !policy.is_file() {
        bail!(
            "demo policy {} not found (override with --policy or $DEMO_POLICY)",
            policy.display()
        );
    }
    let policy = policy.canonicalize()?;
    let out_dir = root.join("target/demo");
    std::fs::create_dir_all(&out_dir)?;
    let audit = out_dir.join("audit.jsonl");
    let _ = std::fs::remove_file(&audit);

    let listeners = start_listeners()?;
    let upstream = crate::dns_upstream::Upstream::start(UPSTREAM, 1, zone(), true)?;
    println!(
        "{} DNS server on udp {} (api.agent.demo -> 127.0.0.10, *.attacker.example -> 127.0.0.2)",
        st.bold("demo:"),
        upstream.addr
    );
    println!(
        "{} API on tcp 127.0.0.10:8080 (by name) + udp 127.0.0.1:5353; attackers on {}",
        st.bold("demo:"),
        listeners
            .iter()
            .filter(|l| l.role == Role::Attacker)
            .map(|l| format!("{} {}", proto_name(l.proto), l.addr))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("{} enforcer {}", st.bold("demo:"), enforcer.display());
    println!("{} policy   {}", st.bold("demo:"), policy.display());

    // Scrape metrics while the agent runs; keep the last good answer.
    let done = Arc::new(AtomicBool::new(false));
    let last_scrape: Arc<Mutex<Option<String>>> = Arc::default();
    let scraper = {
        let done = done.clone();
        let last = last_scrape.clone();
        let addr = metrics_addr.to_string();
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Ok(body) = util::http_get(&addr, "/metrics", Duration::from_millis(500)) {
                    *last.lock().unwrap() = Some(body);
                }
                std::thread::sleep(Duration::from_millis(150));
            }
        })
    };

    let args: Vec<String> = vec![
        "run".into(),
        "--user".into(),
        "root".into(),
        "--policy".into(),
        policy.display().to_string(),
        "--audit-log".into(),
        audit.display().to_string(),
        "--metrics-addr".into(),
        metrics_addr.into(),
        "--".into(),
        "python3".into(),
        AGENT.into(),
    ];
    st.head("the agent, under enforcer");
    println!(
        "$ {} {}",
        rel(&root, &enforcer),
        args.iter()
            .map(|a| rel(&root, Path::new(a)))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let started = Instant::now();
    let mut child = Command::new(&enforcer)
        .args(&args)
        .current_dir(&root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", enforcer.display()))?;
    let child_pid = child.id();
    let stderr_buf: Arc<Mutex<String>> = Arc::default();
    let stderr_thread = {
        let buf = stderr_buf.clone();
        let mut err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            *buf.lock().unwrap() = s;
        })
    };
    // Kill a hung run.
    let finished = Arc::new(AtomicBool::new(false));
    {
        let finished = finished.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + AGENT_TIMEOUT;
            while Instant::now() < deadline {
                if finished.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            eprintln!(
                "demo: the agent run takes over {AGENT_TIMEOUT:?}: sending SIGTERM to enforcer"
            );
            unsafe { libc::kill(child_pid as i32, libc::SIGTERM) };
        });
    }
    let mut attempts = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        match parse_attempt(&line) {
            Some(a) => {
                let painted = if a.verdict == "ALLOWED" {
                    if a.kind == "legit" {
                        st.green("ALLOWED")
                    } else {
                        st.red("ALLOWED")
                    }
                } else if a.kind == "legit" {
                    st.red("BLOCKED")
                } else {
                    st.green("BLOCKED")
                };
                println!("  {painted}{}", &line[7..]);
                attempts.push(a);
            }
            None => println!("  {line}"),
        }
    }
    let status = child.wait()?;
    finished.store(true, Ordering::Relaxed);
    let _ = stderr_thread.join();
    done.store(true, Ordering::Relaxed);
    let _ = scraper.join();
    // Late TCP readers: give them a moment to count what arrived.
    std::thread::sleep(Duration::from_millis(300));
    let elapsed = started.elapsed();

    let mut failures: Vec<String> = Vec::new();

    // 1. What the agent tried.
    st.head("what the agent tried");
    println!(
        "  {:<8} {:<6} {:<32} {:<26} detail",
        "verdict", "kind", "vector", "destination"
    );
    for a in &attempts {
        let ok = (a.kind == "legit") == (a.verdict == "ALLOWED");
        let v = match (ok, a.verdict.as_str()) {
            (true, v) => st.green(&format!("{v:<8}")),
            (false, v) => st.red(&format!("{v:<8}")),
        };
        println!(
            "  {v} {:<6} {:<32} {:<26} {}",
            a.kind, a.vector, a.dest, a.detail
        );
        if !ok {
            failures.push(if a.kind == "legit" {
                format!(
                    "legitimate call `{}` to {} was blocked: {}",
                    a.vector, a.dest, a.detail
                )
            } else {
                format!(
                    "exfiltration `{}` to {} went through: {}",
                    a.vector, a.dest, a.detail
                )
            });
        }
    }
    let legit = attempts.iter().filter(|a| a.kind == "legit").count();
    let exfil = attempts.len() - legit;
    let blocked = attempts
        .iter()
        .filter(|a| a.kind == "exfil" && a.verdict == "BLOCKED")
        .count();
    println!(
        "  {legit} legitimate calls, {exfil} exfiltration attempts ({blocked} blocked), agent run {:.1}s",
        elapsed.as_secs_f64()
    );
    if legit < 3 || exfil == 0 {
        failures.push(format!(
            "the agent did not report its attempts ({} lines; exit status {status})",
            attempts.len()
        ));
    }
    if attempts
        .iter()
        .any(|a| a.kind == "legit" && a.dest == "127.0.0.10:8080" && !a.detail.contains("200 OK"))
    {
        failures.push("the API call did not get its HTTP 200 answer".into());
    }

    // 2. What the listeners got: the ground truth.
    st.head("bytes received per listener");
    println!(
        "  {:<9} {:<5} {:<18} {:>8} {:>12}",
        "role", "proto", "address", "bytes", "conns/dgrams"
    );
    for l in &listeners {
        let bytes = l.bytes.load(Ordering::Relaxed);
        let hits = l.hits.load(Ordering::Relaxed);
        let role = if l.role == Role::Api {
            "API"
        } else {
            "attacker"
        };
        let cell = format!("{bytes:>8}");
        let cell = match l.role {
            Role::Attacker if bytes > 0 => st.red(&cell),
            Role::Attacker => st.green(&cell),
            Role::Api if bytes == 0 => st.red(&cell),
            Role::Api => st.green(&cell),
        };
        println!(
            "  {role:<9} {:<5} {:<18} {cell} {hits:>12}",
            proto_name(l.proto),
            l.addr.to_string()
        );
        if l.role == Role::Attacker && bytes > 0 {
            failures.push(format!(
                "ATTACKER LISTENER {} {} RECEIVED {bytes} BYTES",
                proto_name(l.proto),
                l.addr
            ));
        }
        if l.role == Role::Api && bytes == 0 {
            failures.push(format!(
                "the API listener {} {} received nothing",
                proto_name(l.proto),
                l.addr
            ));
        }
    }

    // 2b. What the DNS server was asked: a refused name never reaches it.
    st.head(&format!(
        "queries that reached the DNS server {}",
        upstream.addr
    ));
    let asked = upstream.queries();
    for q in &asked {
        println!("  {q}");
    }
    if asked.is_empty() {
        failures.push("the DNS server saw no query: the API's name was not resolved".into());
    }
    for q in asked
        .iter()
        .filter(|q| q.contains("attacker") || q.contains("TXT"))
    {
        failures.push(format!("a refused query reached the DNS server: {q}"));
    }

    // 3. The enforcer's own summary.
    st.head("enforcer summary (stderr)");
    let stderr = stderr_buf.lock().unwrap().clone();
    for l in stderr.lines() {
        println!("  {l}");
    }
    if !status.success() {
        failures.push(format!("enforcer run exited with {status}"));
    }

    // 4. Metrics.
    st.head(&format!(
        "metrics (last scrape of http://{metrics_addr}/metrics)"
    ));
    match last_scrape.lock().unwrap().as_deref() {
        Some(body) => {
            for l in body.lines().filter(|l| l.starts_with("enforcer_")) {
                println!("  {l}");
            }
        }
        None => {
            println!("  {}", st.red("no successful scrape"));
            failures.push(format!(
                "the metrics endpoint http://{metrics_addr}/metrics never answered"
            ));
        }
    }

    // 5. Audit log.
    st.head("audit log");
    let records = std::fs::read_to_string(&audit)
        .map(|s| s.lines().count())
        .unwrap_or(0);
    println!("  {} records in {}", records, rel(&root, &audit));
    println!("$ enforcer audit verify {}", rel(&root, &audit));
    let out = Command::new(&enforcer)
        .args(["audit", "verify"])
        .arg(&audit)
        .current_dir(&root)
        .output()?;
    for l in String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
    {
        println!("  {l}");
    }
    if !out.status.success() {
        failures.push(format!("enforcer audit verify failed ({})", out.status));
    }

    println!();
    if failures.is_empty() {
        println!(
            "{} the agent's {legit} legitimate calls worked; {exfil} exfiltration attempts, 0 bytes reached an attacker.",
            st.green("PASSED:")
        );
        Ok(0)
    } else {
        println!(
            "{}",
            st.red("################################  FAILED  ################################")
        );
        for f in &failures {
            println!("{} {f}", st.red("FAILED:"));
        }
        Ok(1)
    }
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

/// Show paths under the repository relative to it.
fn rel(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}
