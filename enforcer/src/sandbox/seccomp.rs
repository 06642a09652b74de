//! The agent's seccomp filter: what `enforcer run` refuses at the system
//! call boundary, whatever the kernel's BPF LSM support.
//!
//! The filter is compiled by libseccomp (architecture check, x32 and
//! 32-bit ABIs, argument comparisons) in the parent, exported as classic
//! BPF and installed by the forked agent just before `execve` with
//! `SECCOMP_FILTER_FLAG_NEW_LISTENER`. Every refused call is a
//! `SCMP_ACT_NOTIFY`: the kernel parks the caller and hands the call to
//! `enforcer run` over the listener fd ([`serve`]), which records it (audit
//! log, metrics, summary) and answers `EPERM`. If `enforcer run` is gone
//! the kernel answers `ENOSYS` instead: refused either way.
//!
//! Default action: allow. The list follows Docker's and containerd's default
//! profiles for a container without capabilities (the calls they only allow
//! with `CAP_SYS_ADMIN`, `CAP_SYS_PTRACE`, `CAP_SYS_MODULE`, ...), plus the
//! calls that reach the enforcer's own objects (`bpf`), that reach other
//! processes' memory or descriptors, and socket families no cgroup hook
//! judges. `clone3` returns `ENOSYS` (its flags are in memory a filter
//! cannot read; libc falls back to `clone`, whose flags are checked), like
//! Docker's profile.
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result};
use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpNotifReq,
    ScmpNotifResp, ScmpNotifRespFlags, ScmpSyscall,
};

/// One refused group of calls and why (README: "What the agent may not do").
pub struct Refused {
    pub calls: &'static [&'static str],
    pub why: &'static str,
}

/// Calls refused whatever their arguments.
pub const REFUSED: &[Refused] = &[
    Refused {
        calls: &["bpf"],
        why: "reaches the enforcer's programs, maps and links (BPF_OBJ_GET on a pin, \
              BPF_LINK_DETACH, BPF_*_GET_FD_BY_ID) and loads programs",
    },
    Refused {
        calls: &["perf_event_open"],
        why: "kernel tracing and profiling; attaches BPF programs",
    },
    Refused {
        calls: &["io_uring_setup", "io_uring_enter", "io_uring_register"],
        why: "io_uring operations (IORING_OP_SOCKET, ...) bypass this filter",
    },
    Refused {
        calls: &[
            "kexec_load",
            "kexec_file_load",
            "init_module",
            "finit_module",
            "delete_module",
            "reboot",
            "swapon",
            "swapoff",
            "acct",
            "iopl",
            "ioperm",
            "syslog",
            "quotactl",
            "quotactl_fd",
            "nfsservctl",
            "uselib",
            "ustat",
            "sysfs",
            "_sysctl",
            "lookup_dcookie",
            "vhangup",
            "settimeofday",
            "clock_settime",
            "clock_adjtime",
        ],
        why: "the kernel, its modules, the machine's clock and devices",
    },
    Refused {
        calls: &["keyctl", "add_key", "request_key"],
        why: "kernel keyrings (shared with the host, not namespaced)",
    },
    Refused {
        calls: &["userfaultfd"],
        why: "a tool for kernel race exploits",
    },
    Refused {
        calls: &[
            "process_vm_readv",
            "process_vm_writev",
            "pidfd_getfd",
            "kcmp",
            "open_by_handle_at",
        ],
        why: "other processes' memory and descriptors; files by handle around the mount view",
    },
    Refused {
        calls: &[
            "mount",
            "umount2",
            "pivot_root",
            "move_mount",
            "open_tree",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "mount_setattr",
            "setns",
        ],
        why: "the mount view (hidden bpffs, read-only /, private /tmp) and other namespaces",
    },
];

/// Socket families the agent may create (`socket(2)` arg 0); every other
/// family is refused: AF_VSOCK reaches the hypervisor host, AF_PACKET/AF_XDP
/// raw frames, AF_RDS connects from a kernel worker outside the cgroup,
/// AF_TIPC, AF_ALG, AF_BLUETOOTH, ... are judged by no cgroup hook.
pub const ALLOWED_FAMILIES: &[(u64, &str)] = &[
    (libc::AF_UNIX as u64, "AF_UNIX"),
    (libc::AF_INET as u64, "AF_INET"),
    (libc::AF_INET6 as u64, "AF_INET6"),
    (libc::AF_NETLINK as u64, "AF_NETLINK"),
];
/// Netlink protocols the agent may open: route dumps (`ip`, getifaddrs),
/// socket diagnostics (`ss`) and uevents (libudev). NETLINK_NETFILTER,
/// NETLINK_XFRM, NETLINK_AUDIT, generic netlink, ... are refused.
pub const ALLOWED_NETLINK: &[(u64, &str)] = &[
    (libc::NETLINK_ROUTE as u64, "NETLINK_ROUTE"),
    (libc::NETLINK_SOCK_DIAG as u64, "NETLINK_SOCK_DIAG"),
    (
        libc::NETLINK_KOBJECT_UEVENT as u64,
        "NETLINK_KOBJECT_UEVENT",
    ),
];
/// Namespace flags refused in `clone`/`unshare`: a user namespace gives the
/// agent capabilities over new namespaces (mounts over the hidden paths,
/// a network namespace of its own), a large kernel attack surface.
const NS_FLAGS: &[(u64, &str)] = &[
    (libc::CLONE_NEWNS as u64, "CLONE_NEWNS"),
    (libc::CLONE_NEWCGROUP as u64, "CLONE_NEWCGROUP"),
    (libc::CLONE_NEWUTS as u64, "CLONE_NEWUTS"),
    (libc::CLONE_NEWIPC as u64, "CLONE_NEWIPC"),
    (libc::CLONE_NEWUSER as u64, "CLONE_NEWUSER"),
    (libc::CLONE_NEWPID as u64, "CLONE_NEWPID"),
    (libc::CLONE_NEWNET as u64, "CLONE_NEWNET"),
];
const CLONE_NEWTIME: u64 = 0x80;
/// ioctls refused: pushing input into a terminal (the user's shell runs it
/// after the agent ends) and the Linux console.
#[allow(clippy::unnecessary_cast)] // c_ulong or c_int depending on the target
const IOCTLS: &[(u64, &str)] = &[
    (libc::TIOCSTI as u64, "TIOCSTI"),
    (libc::TIOCLINUX as u64, "TIOCLINUX"),
];
/// Highest socket family number of this kernel generation (AF_MAX - 1 = 45
/// on 6.x); anything above is refused too.
const AF_MAX: u64 = 64;
const NETLINK_MAX: u64 = 32;
const LOW32: u64 = 0xffff_ffff;

/// The compiled filter: classic BPF instructions, ready for `seccomp(2)`.
pub struct Filter {
    pub program: Vec<libc::sock_filter>,
}

fn rule(
    f: &mut ScmpFilterContext,
    name: &str,
    conds: &[ScmpArgCompare],
) -> Result<(), libseccomp::error::SeccompError> {
    let sys = match ScmpSyscall::from_name(name) {
        Ok(s) => s,
        // Not a call of this architecture (e.g. `iopl` on arm64).
        Err(_) => return Ok(()),
    };
    if conds.is_empty() {
        f.add_rule(ScmpAction::Notify, sys)?;
    } else {
        f.add_rule_conditional(ScmpAction::Notify, sys, conds)?;
    }
    Ok(())
}

fn masked_eq(arg: u32, value: u64) -> ScmpArgCompare {
    ScmpArgCompare::new(arg, ScmpCompareOp::MaskedEqual(LOW32), value)
}

fn has_flag(arg: u32, flag: u64) -> ScmpArgCompare {
    ScmpArgCompare::new(arg, ScmpCompareOp::MaskedEqual(flag), flag)
}

pub fn build() -> Result<Filter> {
    let mut f = ScmpFilterContext::new(ScmpAction::Allow).context("seccomp_init")?;
    // Another ABI (i386 int 0x80, x32): ENOSYS for every call, so the
    // socketcall() multiplexer cannot carry a refused family past us.
    f.set_act_badarch(ScmpAction::Errno(libc::ENOSYS))?;
    for r in REFUSED {
        for c in r.calls {
            rule(&mut f, c, &[])?;
        }
    }
    // socket(): families outside the allowlist. Compared on the low 32
    // bits (the kernel reads an int); anything with upper bits set is > AF_MAX.
    for fam in 0..AF_MAX {
        if !ALLOWED_FAMILIES.iter().any(|(a, _)| *a == fam) {
            rule(&mut f, "socket", &[masked_eq(0, fam)])?;
            rule(&mut f, "socketpair", &[masked_eq(0, fam)])?;
        }
    }
    for call in ["socket", "socketpair"] {
        rule(
            &mut f,
            call,
            &[ScmpArgCompare::new(0, ScmpCompareOp::GreaterEqual, AF_MAX)],
        )?;
    }
    for proto in 0..NETLINK_MAX {
        if !ALLOWED_NETLINK.iter().any(|(p, _)| *p == proto) {
            rule(
                &mut f,
                "socket",
                &[masked_eq(0, libc::AF_NETLINK as u64), masked_eq(2, proto)],
            )?;
        }
    }
    rule(
        &mut f,
        "socket",
        &[
            masked_eq(0, libc::AF_NETLINK as u64),
            ScmpArgCompare::new(2, ScmpCompareOp::GreaterEqual, NETLINK_MAX),
        ],
    )?;
    for (flag, _) in NS_FLAGS {
        rule(&mut f, "clone", &[has_flag(0, *flag)])?;
        rule(&mut f, "unshare", &[has_flag(0, *flag)])?;
    }
    rule(&mut f, "unshare", &[has_flag(0, CLONE_NEWTIME)])?;
    for (req, _) in IOCTLS {
        rule(&mut f, "ioctl", &[masked_eq(1, *req)])?;
    }
    // No set-user-ID or set-group-ID file: a uid-0 agent could leave a
    // setuid-root binary in a writable directory for someone to run later,
    // outside enforcement. (mode argument index per call.)
    for bit in [libc::S_ISUID as u64, libc::S_ISGID as u64] {
        for (call, mode_arg) in [
            ("chmod", 1),
            ("fchmod", 1),
            ("fchmodat", 2),
            ("fchmodat2", 2),
        ] {
            rule(&mut f, call, &[has_flag(mode_arg, bit)])?;
        }
        for (call, mode_arg) in [("creat", 1), ("mknod", 1), ("mknodat", 2)] {
            rule(&mut f, call, &[has_flag(mode_arg, bit)])?;
        }
        // open/openat read the mode only with O_CREAT or O_TMPFILE.
        for create in [libc::O_CREAT as u64, 0o20000000u64] {
            rule(&mut f, "open", &[has_flag(1, create), has_flag(2, bit)])?;
            rule(&mut f, "openat", &[has_flag(2, create), has_flag(3, bit)])?;
        }
    }
    // SOCK_PACKET on an AF_INET socket is the old way to a packet socket.
    rule(
        &mut f,
        "socket",
        &[
            masked_eq(0, libc::AF_INET as u64),
            ScmpArgCompare::new(1, ScmpCompareOp::MaskedEqual(0xf), 10),
        ],
    )?;
    // openat2's mode is in memory a filter cannot read: ENOSYS, libc uses
    // openat.
    if let Ok(openat2) = ScmpSyscall::from_name("openat2") {
        f.add_rule(ScmpAction::Errno(libc::ENOSYS), openat2)?;
    }
    if let Ok(clone3) = ScmpSyscall::from_name("clone3") {
        f.add_rule(ScmpAction::Errno(libc::ENOSYS), clone3)?;
    }
    let program = export(&f)?;
    Ok(Filter { program })
}

fn export(f: &ScmpFilterContext) -> Result<Vec<libc::sock_filter>> {
    // SAFETY: memfd_create with a static name; the fd is owned below.
    let raw = unsafe { libc::memfd_create(c"seccomp-bpf".as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("memfd_create");
    }
    // SAFETY: `raw` is a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    f.export_bpf(&fd).context("seccomp_export_bpf")?;
    let mut file = std::fs::File::from(fd);
    use std::io::{Read, Seek};
    file.rewind()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let n = std::mem::size_of::<libc::sock_filter>();
    anyhow::ensure!(
        !bytes.is_empty() && bytes.len() % n == 0 && bytes.len() / n <= u16::MAX as usize,
        "libseccomp exported a malformed program ({} bytes)",
        bytes.len()
    );
    Ok(bytes
        .chunks_exact(n)
        .map(|c| libc::sock_filter {
            code: u16::from_ne_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect())
}

/// One refused call, as the supervisor saw it.
#[derive(Debug, Clone)]
pub struct RefusedCall {
    pub pid: u32,
    pub syscall: String,
    /// `socket(AF_VSOCK, SOCK_STREAM, 0)`, `bpf(BPF_OBJ_GET)`, ...
    pub detail: String,
}

fn name_of(table: &'static [(u64, &'static str)], v: u64) -> Option<&'static str> {
    table.iter().find(|(n, _)| *n == v).map(|(_, s)| *s)
}

fn family_name(f: u64) -> String {
    const NAMES: &[(u64, &str)] = &[
        (0, "AF_UNSPEC"),
        (3, "AF_AX25"),
        (4, "AF_IPX"),
        (5, "AF_APPLETALK"),
        (9, "AF_X25"),
        (15, "AF_KEY"),
        (17, "AF_PACKET"),
        (21, "AF_RDS"),
        (29, "AF_CAN"),
        (30, "AF_TIPC"),
        (31, "AF_BLUETOOTH"),
        (38, "AF_ALG"),
        (40, "AF_VSOCK"),
        (41, "AF_KCM"),
        (42, "AF_QIPCRTR"),
        (43, "AF_SMC"),
        (44, "AF_XDP"),
        (45, "AF_MCTP"),
    ];
    name_of(NAMES, f)
        .or_else(|| name_of(ALLOWED_FAMILIES, f))
        .map(str::to_string)
        .unwrap_or_else(|| format!("family {f}"))
}

const BPF_CMDS: &[&str] = &[
    "BPF_MAP_CREATE",
    "BPF_MAP_LOOKUP_ELEM",
    "BPF_MAP_UPDATE_ELEM",
    "BPF_MAP_DELETE_ELEM",
    "BPF_MAP_GET_NEXT_KEY",
    "BPF_PROG_LOAD",
    "BPF_OBJ_PIN",
    "BPF_OBJ_GET",
    "BPF_PROG_ATTACH",
    "BPF_PROG_DETACH",
    "BPF_PROG_TEST_RUN",
    "BPF_PROG_GET_NEXT_ID",
    "BPF_MAP_GET_NEXT_ID",
    "BPF_PROG_GET_FD_BY_ID",
    "BPF_MAP_GET_FD_BY_ID",
    "BPF_OBJ_GET_INFO_BY_FD",
    "BPF_PROG_QUERY",
    "BPF_RAW_TRACEPOINT_OPEN",
    "BPF_BTF_LOAD",
    "BPF_BTF_GET_FD_BY_ID",
    "BPF_TASK_FD_QUERY",
    "BPF_MAP_LOOKUP_AND_DELETE_ELEM",
    "BPF_MAP_FREEZE",
    "BPF_BTF_GET_NEXT_ID",
    "BPF_MAP_LOOKUP_BATCH",
    "BPF_MAP_LOOKUP_AND_DELETE_BATCH",
    "BPF_MAP_UPDATE_BATCH",
    "BPF_MAP_DELETE_BATCH",
    "BPF_LINK_CREATE",
    "BPF_LINK_UPDATE",
    "BPF_LINK_GET_FD_BY_ID",
    "BPF_LINK_GET_NEXT_ID",
    "BPF_ENABLE_STATS",
    "BPF_ITER_CREATE",
    "BPF_LINK_DETACH",
    "BPF_PROG_BIND_MAP",
    "BPF_TOKEN_CREATE",
];

/// A readable form of a refused call from its number and arguments.
pub fn describe(name: &str, args: &[u64; 6]) -> String {
    let low = |i: usize| args[i] & LOW32;
    match name {
        "socket" | "socketpair" => {
            let fam = low(0);
            let proto = if fam == libc::AF_NETLINK as u64 {
                name_of(ALLOWED_NETLINK, low(2))
                    .map(str::to_string)
                    .unwrap_or_else(|| match low(2) {
                        12 => "NETLINK_NETFILTER".into(),
                        6 => "NETLINK_XFRM".into(),
                        9 => "NETLINK_AUDIT".into(),
                        16 => "NETLINK_GENERIC".into(),
                        p => format!("netlink protocol {p}"),
                    })
            } else {
                low(2).to_string()
            };
            format!("{name}({}, {}, {proto})", family_name(args[0]), low(1))
        }
        "bpf" => format!(
            "bpf({})",
            BPF_CMDS
                .get(low(0) as usize)
                .map(|s| s.to_string())
                .unwrap_or_else(|| format!("cmd {}", low(0)))
        ),
        "clone" | "unshare" => {
            let flags: Vec<&str> = NS_FLAGS
                .iter()
                .chain(std::iter::once(&(CLONE_NEWTIME, "CLONE_NEWTIME")))
                .filter(|(f, _)| args[0] & f == *f)
                .map(|(_, n)| *n)
                .collect();
            format!("{name}({})", flags.join("|"))
        }
        "ioctl" => format!(
            "ioctl({}, {})",
            low(0),
            name_of(IOCTLS, low(1))
                .map(str::to_string)
                .unwrap_or_else(|| format!("{:#x}", low(1)))
        ),
        "chmod" | "fchmod" | "creat" | "mknod" => format!("{name}(mode {:#o})", low(1)),
        "fchmodat" | "fchmodat2" | "mknodat" => format!("{name}(mode {:#o})", low(2)),
        "open" => format!("open(flags {:#o}, mode {:#o})", low(1), low(2)),
        "openat" => format!("openat(flags {:#o}, mode {:#o})", low(2), low(3)),
        "ptrace" | "process_vm_readv" | "process_vm_writev" | "kcmp" | "pidfd_getfd" => {
            format!("{name}({}, ...)", low(0) as i32)
        }
        _ => format!("{name}()"),
    }
}

/// Serve the listener: record each refused call and answer EPERM. Returns
/// when every process under the filter is gone (or on an error).
pub async fn serve(listener: OwnedFd, mut record: impl FnMut(RefusedCall)) {
    use tokio::io::{unix::AsyncFd, Interest};
    let fd: RawFd = listener.as_raw_fd();
    // SAFETY: the OwnedFd stays open and unchanged while the AsyncFd owns it.
    let Ok(afd) = (unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }) else {
        tracing::error!("seccomp listener: cannot poll; refused calls answer ENOSYS");
        return;
    };
    // At most RATE records a second: an agent looping on a refused call
    // must not fill the disk; the rest are counted and summarized.
    const RATE: u32 = 100;
    let mut window = std::time::Instant::now();
    let (mut in_window, mut suppressed) = (0u32, 0u64);
    let mut last_pid = 0u32;
    loop {
        // A quiet second flushes the count of calls not recorded one by one.
        let ready = tokio::time::timeout(std::time::Duration::from_secs(1), afd.readable()).await;
        let Ok(ready) = ready else {
            if suppressed > 0 {
                record(RefusedCall {
                    pid: last_pid,
                    syscall: "rate-limited".into(),
                    detail: format!("{suppressed} more refused calls, not recorded one by one"),
                });
            }
            window = std::time::Instant::now();
            (in_window, suppressed) = (0, 0);
            continue;
        };
        let mut guard = match ready {
            Ok(g) => g,
            Err(e) => {
                tracing::debug!("seccomp listener closed: {e}");
                break;
            }
        };
        // POLLHUP without POLLIN: no process left under the filter.
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        if n > 0 && pfd.revents & libc::POLLIN == 0 && pfd.revents & libc::POLLHUP != 0 {
            break;
        }
        if n == 0 {
            guard.clear_ready();
            continue;
        }
        guard.clear_ready();
        let req = match ScmpNotifReq::receive(fd) {
            Ok(r) => r,
            // ENOENT: the caller died while we were picking it up.
            Err(e) => {
                tracing::debug!("seccomp notification: {e}");
                continue;
            }
        };
        let resp = ScmpNotifResp::new_error(req.id, -libc::EPERM, ScmpNotifRespFlags::empty());
        let name = req
            .data
            .syscall
            .get_name_by_arch(req.data.arch)
            .or_else(|_| req.data.syscall.get_name_by_arch(ScmpArch::Native))
            .unwrap_or_else(|_| format!("syscall {}", i32::from(req.data.syscall)));
        let call = RefusedCall {
            pid: req.pid,
            detail: describe(&name, &req.data.args),
            syscall: name,
        };
        if let Err(e) = resp.respond(fd) {
            tracing::debug!("seccomp response: {e}");
        }
        last_pid = call.pid;
        if window.elapsed() >= std::time::Duration::from_secs(1) {
            if suppressed > 0 {
                record(RefusedCall {
                    pid: call.pid,
                    syscall: "rate-limited".into(),
                    detail: format!("{suppressed} more refused calls, not recorded one by one"),
                });
            }
            window = std::time::Instant::now();
            in_window = 0;
            suppressed = 0;
        }
        in_window += 1;
        if in_window <= RATE {
            record(call);
        } else {
            suppressed += 1;
        }
    }
    if suppressed > 0 {
        record(RefusedCall {
            pid: last_pid,
            syscall: "rate-limited".into(),
            detail: format!("{suppressed} more refused calls, not recorded one by one"),
        });
    }
}
