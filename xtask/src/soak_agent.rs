//! `xtask soak-agent`: the load of one identity in `cargo xtask soak`.
//!
//! The soak moves it into its cgroup while it waits on stdin, then sends
//! `start`. From then on three threads loop, each op followed by a
//! `--pace-us` pause:
//!
//! - TCP: connect to `--tcp-allowed` (must succeed), then to each
//!   `--tcp-denied` (must fail with EPERM; a connect that succeeds writes
//!   `LEAK` so that the listener sees bytes);
//! - UDP: one unconnected socket, `sendto` `--udp-allowed` (must succeed)
//!   and each `--udp-denied` (must fail with EPERM);
//! - DNS (messages built and parsed with hickory-proto): a fresh socket per
//!   query, as a stub resolver does, to `--dns-server` (port 53: the
//!   kernel steers it to the identity's proxy): a name under
//!   `--allowed-zone` (must answer NOERROR with an address), then one
//!   under `--refused-zone` (must be REFUSED; the upstream would answer it).
//!
//! With `--flood`, a fourth thread connects to the first denied TCP target
//! as fast as it can while `flood on` (the ring buffer flood).
//!
//! Every result is counted under the phase that was current when the op
//! began (`phase up` / `phase down`: the soak says when its daemon runs).
//! Commands, one answer line each: `start`, `phase up|down`, `flood
//! on|off` (`ok`), `stats` (one JSON object: phase -> counter -> n, and the
//! last errno of each failing counter).
use std::{
    io::{BufRead, Write},
    net::{SocketAddr, SocketAddrV4, UdpSocket},
    str::FromStr,
    sync::{
        atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Result};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RecordType},
};

use crate::worker::{connect_fd, errno, sendto_once, sockaddr, udp_socket};

#[derive(clap::Args)]
pub struct SoakAgentArgs {
    #[arg(long)]
    tcp_allowed: SocketAddrV4,
    #[arg(long, value_delimiter = ',')]
    tcp_denied: Vec<SocketAddrV4>,
    #[arg(long)]
    udp_allowed: SocketAddrV4,
    #[arg(long, value_delimiter = ',')]
    udp_denied: Vec<SocketAddrV4>,
    #[arg(long, default_value = "127.0.0.1:53")]
    dns_server: SocketAddr,
    #[arg(long)]
    allowed_zone: String,
    #[arg(long)]
    refused_zone: String,
    /// Distinct names asked under each zone (n0.<zone> ...).
    #[arg(long, default_value_t = 16)]
    names: usize,
    #[arg(long, default_value_t = 10_000)]
    pace_us: u64,
    #[arg(long, default_value_t = 500)]
    dns_timeout_ms: u64,
    #[arg(long)]
    flood: bool,
}

pub const PHASES: [&str; 2] = ["up", "down"];

/// What the agent counts, per phase. `*_leak`: a denied op that got
/// through (must stay 0); `*_fail`: an allowed op that failed.
#[derive(Clone, Copy)]
#[repr(usize)]
enum C {
    TcpOk,
    TcpFail,
    TcpDenied,
    TcpDeniedOther,
    TcpLeak,
    UdpOk,
    UdpFail,
    UdpDenied,
    UdpDeniedOther,
    UdpLeak,
    DnsOk,
    DnsFail,
    DnsRefused,
    DnsRefusedFail,
    DnsLeak,
    FloodDenied,
    FloodOther,
    FloodLeak,
}

const NAMES: [&str; 18] = [
    "tcp_ok",
    "tcp_fail",
    "tcp_denied",
    "tcp_denied_other_error",
    "tcp_leak",
    "udp_ok",
    "udp_fail",
    "udp_denied",
    "udp_denied_other_error",
    "udp_leak",
    "dns_ok",
    "dns_fail",
    "dns_refused",
    "dns_refused_fail",
    "dns_leak",
    "flood_denied",
    "flood_other_error",
    "flood_leak",
];

struct Counters {
    phase: AtomicUsize,
    n: [[AtomicU64; NAMES.len()]; 2],
    last_errno: [AtomicI32; NAMES.len()],
    flood: AtomicBool,
}

impl Counters {
    fn add(&self, phase: usize, c: C) {
        self.n[phase][c as usize].fetch_add(1, Ordering::Relaxed);
    }
    fn fail(&self, phase: usize, c: C, e: i32) {
        self.add(phase, c);
        self.last_errno[c as usize].store(e, Ordering::Relaxed);
    }
    fn json(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for (p, name) in PHASES.iter().enumerate() {
            let m: serde_json::Map<String, serde_json::Value> = NAMES
                .iter()
                .enumerate()
                .map(|(i, n)| (n.to_string(), self.n[p][i].load(Ordering::Relaxed).into()))
                .collect();
            out.insert(name.to_string(), m.into());
        }
        let errnos: serde_json::Map<String, serde_json::Value> = NAMES
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                let e = self.last_errno[i].load(Ordering::Relaxed);
                (e != 0).then(|| (n.to_string(), e.into()))
            })
            .collect();
        out.insert("last_errno".into(), errnos.into());
        out.into()
    }
}

/// A connect to a denied target: EPERM is the verdict; a connect that
/// succeeds writes bytes the listener counts.
fn denied_connect(cs: &Counters, phase: usize, sa: &libc::sockaddr_in, ok: C, other: C, leak: C) {
    match connect_fd(sa) {
        Err(libc::EPERM) => cs.add(phase, ok),
        Err(e) => cs.fail(phase, other, e),
        Ok(fd) => {
            cs.add(phase, leak);
            unsafe {
                libc::write(fd, b"LEAK".as_ptr().cast(), 4);
                libc::close(fd);
            }
        }
    }
}

fn tcp_loop(a: &SoakAgentArgs, cs: &Counters) {
    let allowed = sockaddr(a.tcp_allowed);
    let denied: Vec<libc::sockaddr_in> = a.tcp_denied.iter().map(|d| sockaddr(*d)).collect();
    loop {
        let phase = cs.phase.load(Ordering::Relaxed);
        match connect_fd(&allowed) {
            Ok(fd) => {
                unsafe { libc::close(fd) };
                cs.add(phase, C::TcpOk)
            }
            Err(e) => cs.fail(phase, C::TcpFail, e),
        }
        for d in &denied {
            denied_connect(cs, phase, d, C::TcpDenied, C::TcpDeniedOther, C::TcpLeak);
        }
        std::thread::sleep(Duration::from_micros(a.pace_us));
    }
}

fn udp_loop(a: &SoakAgentArgs, cs: &Counters) -> Result<()> {
    let fd = udp_socket()?;
    let allowed = sockaddr(a.udp_allowed);
    let denied: Vec<libc::sockaddr_in> = a.udp_denied.iter().map(|d| sockaddr(*d)).collect();
    let payload = [0x5au8; 64];
    loop {
        let phase = cs.phase.load(Ordering::Relaxed);
        match sendto_once(fd, &allowed, &payload) {
            Ok(()) => cs.add(phase, C::UdpOk),
            Err(e) => cs.fail(phase, C::UdpFail, e),
        }
        for d in &denied {
            match sendto_once(fd, d, &payload) {
                Err(libc::EPERM) => cs.add(phase, C::UdpDenied),
                Err(e) => cs.fail(phase, C::UdpDeniedOther, e),
                Ok(()) => cs.add(phase, C::UdpLeak),
            }
        }
        std::thread::sleep(Duration::from_micros(a.pace_us));
    }
}

enum Answer {
    /// NOERROR with at least one record.
    Records,
    Refused,
    /// Anything else, or no answer in time.
    Other(i32),
}

fn ask(server: SocketAddr, id: u16, name: &str, timeout: Duration) -> Answer {
    let Ok(sock) = UdpSocket::bind("0.0.0.0:0") else {
        return Answer::Other(errno());
    };
    let _ = sock.set_read_timeout(Some(timeout));
    let Ok(qname) = Name::from_str(&format!("{name}.")) else {
        return Answer::Other(-1);
    };
    let mut q = Message::new(id, MessageType::Query, OpCode::Query);
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(qname, RecordType::A));
    let Ok(wire) = q.to_vec() else {
        return Answer::Other(-1);
    };
    if let Err(e) = sock.send_to(&wire, server) {
        return Answer::Other(e.raw_os_error().unwrap_or(-1));
    }
    let mut buf = [0u8; 1500];
    loop {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) => return Answer::Other(e.raw_os_error().unwrap_or(-1)),
        };
        let Ok(m) = Message::from_vec(&buf[..n]) else {
            return Answer::Other(-2);
        };
        if m.metadata.id != id {
            continue;
        }
        if from != server {
            // The recvmsg hook must restore the resolver's address.
            return Answer::Other(-3);
        }
        return match m.metadata.response_code {
            ResponseCode::Refused => Answer::Refused,
            ResponseCode::NoError if !m.answers.is_empty() => Answer::Records,
            _ => Answer::Other(-4),
        };
    }
}

fn dns_loop(a: &SoakAgentArgs, cs: &Counters) {
    let timeout = Duration::from_millis(a.dns_timeout_ms);
    let mut i: usize = 0;
    loop {
        let phase = cs.phase.load(Ordering::Relaxed);
        let k = i % a.names.max(1);
        let id = i as u16;
        match ask(
            a.dns_server,
            id,
            &format!("n{k}.{}", a.allowed_zone),
            timeout,
        ) {
            Answer::Records => cs.add(phase, C::DnsOk),
            Answer::Refused => cs.fail(phase, C::DnsFail, -5),
            Answer::Other(e) => cs.fail(phase, C::DnsFail, e),
        }
        let phase = cs.phase.load(Ordering::Relaxed);
        match ask(
            a.dns_server,
            id.wrapping_add(1),
            &format!("n{k}.{}", a.refused_zone),
            timeout,
        ) {
            Answer::Refused => cs.add(phase, C::DnsRefused),
            Answer::Records => cs.add(phase, C::DnsLeak),
            Answer::Other(e) => cs.fail(phase, C::DnsRefusedFail, e),
        }
        i = i.wrapping_add(2);
        std::thread::sleep(Duration::from_micros(a.pace_us));
    }
}

fn flood_loop(a: &SoakAgentArgs, cs: &Counters) {
    let Some(target) = a.tcp_denied.first() else {
        return;
    };
    let sa = sockaddr(*target);
    loop {
        if !cs.flood.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let phase = cs.phase.load(Ordering::Relaxed);
        for _ in 0..64 {
            denied_connect(cs, phase, &sa, C::FloodDenied, C::FloodOther, C::FloodLeak);
        }
    }
}

pub fn run(a: SoakAgentArgs) -> Result<()> {
    let a = Arc::new(a);
    let cs = Arc::new(Counters {
        phase: AtomicUsize::new(0),
        n: Default::default(),
        last_errno: Default::default(),
        flood: AtomicBool::new(false),
    });
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    let mut started = false;
    for line in stdin.lock().lines() {
        let line = line?;
        let answer = match line.split_whitespace().collect::<Vec<_>>()[..] {
            ["start"] if !started => {
                // Every socket is made after the soak moved us into the cgroup.
                started = true;
                let (a1, c1) = (a.clone(), cs.clone());
                std::thread::spawn(move || tcp_loop(&a1, &c1));
                let (a2, c2) = (a.clone(), cs.clone());
                std::thread::spawn(move || {
                    if let Err(e) = udp_loop(&a2, &c2) {
                        eprintln!("soak-agent: udp: {e:#}");
                        std::process::exit(1);
                    }
                });
                let (a3, c3) = (a.clone(), cs.clone());
                std::thread::spawn(move || dns_loop(&a3, &c3));
                if a.flood {
                    let (a4, c4) = (a.clone(), cs.clone());
                    std::thread::spawn(move || flood_loop(&a4, &c4));
                }
                "ok".to_string()
            }
            ["phase", p] => match PHASES.iter().position(|x| *x == p) {
                Some(i) => {
                    cs.phase.store(i, Ordering::Relaxed);
                    "ok".to_string()
                }
                None => bail!("unknown phase {p:?}"),
            },
            ["flood", on] => {
                cs.flood.store(on == "on", Ordering::Relaxed);
                "ok".to_string()
            }
            ["stats"] => cs.json().to_string(),
            _ => bail!("unknown soak-agent command {line:?}"),
        };
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    Ok(())
}
