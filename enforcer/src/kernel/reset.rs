//! Reset a connection whose first bytes were refused, so that the agent's
//! next read or write fails at once (ECONNABORTED) instead of waiting for
//! an answer that cannot come: `SOCK_DESTROY` over `NETLINK_SOCK_DIAG`
//! (Linux 4.5, `CONFIG_INET_DIAG_DESTROY`, on in Debian's kernels), the
//! request `ss -K` sends. Written by hand: the request is one fixed-size
//! struct (no netlink crate in the tree speaks sock_diag's destroy).
//!
//! It works in the caller's network namespace: the agent of `enforcer run`,
//! and host-network workloads of the daemon. A pod's connection in its own
//! namespace is not found (ENOENT) and stays as it is: its payload is
//! dropped for good by the kernel either way.
use std::{io, mem::size_of, net::SocketAddr};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;

#[repr(C)]
struct Request {
    // struct nlmsghdr
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    // struct inet_diag_req_v2
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    // struct inet_diag_sockid
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    ifindex: u32,
    cookie: [u32; 2],
}

fn addr16(a: &SocketAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match a {
        SocketAddr::V4(v4) => out[..4].copy_from_slice(&v4.ip().octets()),
        SocketAddr::V6(v6) => out = v6.ip().octets(),
    }
    out
}

/// Destroy the TCP socket with local end `src` and peer `dst` (both of one
/// family; an IPv4-mapped pair is given as IPv4).
pub fn destroy_tcp(src: SocketAddr, dst: SocketAddr) -> io::Result<()> {
    let family = if src.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let req = Request {
        len: size_of::<Request>() as u32,
        kind: SOCK_DESTROY,
        flags: NLM_F_REQUEST | NLM_F_ACK,
        seq: 1,
        pid: 0,
        family: family as u8,
        protocol: libc::IPPROTO_TCP as u8,
        ext: 0,
        pad: 0,
        states: u32::MAX,
        sport: src.port().to_be_bytes(),
        dport: dst.port().to_be_bytes(),
        src: addr16(&src),
        dst: addr16(&dst),
        ifindex: 0,
        // INET_DIAG_NOCOOKIE: match by the addresses and ports.
        cookie: [u32::MAX, u32::MAX],
    };
    // SAFETY: plain syscalls on a descriptor owned here; the buffers are
    // valid for the lengths given.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let r = (|| {
            let tv = libc::timeval {
                tv_sec: 1,
                tv_usec: 0,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as u32,
            );
            let n = libc::send(fd, (&req as *const Request).cast(), size_of::<Request>(), 0);
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut buf = [0u8; 256];
            let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            // nlmsghdr (16 bytes) then, for NLMSG_ERROR, an i32 error.
            if n >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == NLMSG_ERROR {
                let err = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
                if err != 0 {
                    return Err(io::Error::from_raw_os_error(-err));
                }
            }
            Ok(())
        })();
        libc::close(fd);
        r
    }
}
