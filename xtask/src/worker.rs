//! `xtask bench-worker`: the load generator of `cargo xtask bench`.
//!
//! The bench starts one worker per cgroup under test, writes its pid to that
//! cgroup's `cgroup.procs` while the worker waits on stdin, and then drives
//! it with one command per line; only the loop itself is timed:
//!
//! - `connect SECS`: TCP connect + close to `--connect-addr` in a loop
//!   (SO_LINGER 0: the close sends RST, so no TIME_WAIT eats the ports);
//! - `sendto SECS`: UDP `sendto` of 64 bytes to `--sendto-addr` from one
//!   unconnected socket (every call runs the sendmsg hook);
//! - `probe-connect ADDR` / `probe-sendto ADDR`: one attempt, to check that
//!   enforcement is live (a denied destination must fail with EPERM).
//!
//! Answers one line per command: `ops errors nanos first_errno`, or
//! `ok` / `errno N` for probes. Every socket is created after the move into
//! the cgroup (a socket belongs to the cgroup of its creator).
use std::{
    io::{BufRead, Write},
    net::{SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

#[derive(clap::Args)]
pub struct WorkerArgs {
    /// TCP listener for `connect`.
    #[arg(long)]
    connect_addr: SocketAddrV4,
    /// UDP receiver for `sendto`.
    #[arg(long)]
    sendto_addr: SocketAddrV4,
    /// Pin the worker to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
}

pub(crate) fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

pub(crate) fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// One TCP connect + close. Ok or errno.
fn connect_once(sa: &libc::sockaddr_in) -> Result<(), i32> {
    let fd = connect_fd(sa)?;
    unsafe { libc::close(fd) };
    Ok(())
}

/// A TCP connect; the connected socket (SO_LINGER 0: its close sends RST)
/// or the errno.
pub(crate) fn connect_fd(sa: &libc::sockaddr_in) -> Result<i32, i32> {
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(errno());
        }
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
        let r = libc::connect(
            fd,
            (sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        if r < 0 {
            let e = errno();
            libc::close(fd);
            return Err(e);
        }
        Ok(fd)
    }
}

pub(crate) fn udp_socket() -> Result<i32> {
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket(AF_INET, SOCK_DGRAM): errno {}", errno());
    }
    Ok(fd)
}

pub(crate) fn sendto_once(fd: i32, sa: &libc::sockaddr_in, buf: &[u8]) -> Result<(), i32> {
    let r = unsafe {
        libc::sendto(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            0,
            (sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

struct Tally {
    ops: u64,
    errors: u64,
    first_errno: i32,
}

impl Tally {
    fn add(&mut self, r: Result<(), i32>) {
        match r {
            Ok(()) => self.ops += 1,
            Err(e) => {
                if self.errors == 0 {
                    self.first_errno = e;
                }
                self.errors += 1;
            }
        }
    }
}

/// Run `op` until `secs` have passed; the clock is read every 16 operations.
fn timed(secs: f64, mut op: impl FnMut() -> Result<(), i32>) -> (Tally, Duration) {
    let mut t = Tally {
        ops: 0,
        errors: 0,
        first_errno: 0,
    };
    let dur = Duration::from_secs_f64(secs);
    let start = Instant::now();
    loop {
        for _ in 0..16 {
            t.add(op());
        }
        let el = start.elapsed();
        if el >= dur {
            return (t, el);
        }
        // Do not spin on an error storm.
        if t.errors > 1000 && t.ops == 0 {
            return (t, start.elapsed());
        }
    }
}

pub fn run(args: &WorkerArgs) -> Result<()> {
    if let Some(cpu) = args.cpu {
        crate::util::pin_to_cpu(cpu).with_context(|| format!("pinning the worker to CPU {cpu}"))?;
    }
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    let tcp = sockaddr(args.connect_addr);
    let udp = sockaddr(args.sendto_addr);
    let payload = [0x5au8; 64];
    for line in stdin.lock().lines() {
        let line = line?;
        let mut it = line.split_whitespace();
        let (Some(cmd), Some(arg)) = (it.next(), it.next()) else {
            continue;
        };
        let answer = match cmd {
            "connect" | "sendto" => {
                let secs: f64 = arg.parse().context("seconds")?;
                let (t, el) = if cmd == "connect" {
                    timed(secs, || connect_once(&tcp))
                } else {
                    let fd = udp_socket()?;
                    let r = timed(secs, || sendto_once(fd, &udp, &payload));
                    unsafe { libc::close(fd) };
                    r
                };
                format!("{} {} {} {}", t.ops, t.errors, el.as_nanos(), t.first_errno)
            }
            "probe-connect" | "probe-sendto" => {
                let SocketAddr::V4(a) = arg.parse::<SocketAddr>()? else {
                    bail!("probe: IPv4 address expected")
                };
                let sa = sockaddr(a);
                let r = if cmd == "probe-connect" {
                    connect_once(&sa)
                } else {
                    let fd = udp_socket()?;
                    let r = sendto_once(fd, &sa, &payload);
                    unsafe { libc::close(fd) };
                    r
                };
                match r {
                    Ok(()) => "ok".to_string(),
                    Err(e) => format!("errno {e}"),
                }
            }
            other => bail!("unknown worker command {other:?}"),
        };
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    Ok(())
}
