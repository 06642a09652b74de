//! Shared helpers: repository root, root check, setup, building enforcer,
//! cgroup v2 and bpffs mounts.
use std::{
    io::BufRead,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::BinArgs;

/// The pinned nightly of scripts/setup.sh (its LLVM must match bpf-linker's).
pub(crate) const NIGHTLY: &str = "nightly-2026-05-20";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn require_root(what: &str) -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "`cargo xtask {what}` needs root: it runs the enforcer, which loads eBPF programs \
             and creates cgroups.\n  Run it as root, e.g.: sudo -E env \"PATH=$PATH\" cargo xtask {what}"
        );
    }
    Ok(())
}

fn have_bpf_linker() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn have_nightly() -> bool {
    let Ok(out) = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", NIGHTLY])
        .stderr(Stdio::null())
        .output()
    else {
        return false;
    };
    out.status.success()
        && String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.starts_with("rust-src"))
}

/// Run scripts/setup.sh when the eBPF toolchain is missing (it is idempotent).
/// libseccomp's development library (the agent's filter under `enforcer run`).
fn have_libseccomp_dev() -> bool {
    [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
        "/usr/lib64",
    ]
    .iter()
    .any(|d| Path::new(d).join("libseccomp.so").exists())
}

pub fn ensure_setup(root: &Path) -> Result<()> {
    if have_bpf_linker() && have_nightly() && have_libseccomp_dev() {
        return Ok(());
    }
    eprintln!(
        "xtask: bpf-linker, the pinned toolchain {NIGHTLY} or libseccomp-dev is missing: running scripts/setup.sh"
    );
    let st = Command::new("bash")
        .arg(root.join("scripts/setup.sh"))
        .current_dir(root)
        .status()
        .context("running scripts/setup.sh")?;
    if !st.success() {
        bail!("scripts/setup.sh failed ({st})");
    }
    Ok(())
}

/// Forget the variables `cargo run` set for this process (the xtask
/// package's `CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...), so that the cargo
/// commands xtask runs see the environment a plain `cargo build` sees.
/// Build scripts fingerprint some of them (ring's declares
/// `rerun-if-env-changed=CARGO_MANIFEST_DIR`): inherited, they made every
/// nested `cargo build -p enforcer` rebuild ring, rustls, kube and enforcer.
/// Called first thing in `main`, while xtask has one thread.
pub fn scrub_cargo_run_env() {
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str() {
            if is_cargo_run_var(k) {
                std::env::remove_var(k);
            }
        }
    }
}

/// A variable cargo sets for the process it runs (`cargo run`/`cargo
/// test`), as opposed to one the user set for cargo itself (`CARGO_HOME`,
/// `CARGO_TARGET_DIR`, `CARGO_LOG`, ... stay).
pub fn is_cargo_run_var(k: &str) -> bool {
    k.starts_with("CARGO_PKG_")
        || k.starts_with("CARGO_BIN_EXE_")
        || matches!(
            k,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_RUSTC_CURRENT_DIR"
                | "CARGO_TARGET_TMPDIR"
                | "OUT_DIR"
        )
}

/// CLOCK_MONOTONIC in ns (the clock of the kernel's timestamps, and one
/// every PID namespace shares).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The enforcer binary: `--enforcer-bin`/$ENFORCER_BIN, or built now.
pub fn enforcer_bin(root: &Path, args: &BinArgs) -> Result<PathBuf> {
    if let Some(p) = &args.enforcer_bin {
        if !p.is_file() {
            bail!("enforcer binary {} does not exist", p.display());
        }
        return Ok(p.canonicalize()?);
    }
    ensure_setup(root)?;
    cargo_build_bin(root, "enforcer", !args.debug)
}

/// `cargo build -p PACKAGE [--release]`; the path of the binary named
/// PACKAGE, as cargo reports it (so `$CARGO_TARGET_DIR` is honoured).
pub fn cargo_build_bin(root: &Path, package: &str, release: bool) -> Result<PathBuf> {
    let profile = if release { "release" } else { "debug" };
    eprintln!("xtask: building {package} ({profile})");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args([
        "build",
        "-p",
        package,
        "--message-format=json-render-diagnostics",
    ]);
    if release {
        cmd.arg("--release");
    }
    let mut child = cmd
        .current_dir(root)
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo build")?;
    let mut exe = None;
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact" && v["target"]["name"] == package {
            if let Some(e) = v["executable"].as_str() {
                exe = Some(PathBuf::from(e));
            }
        }
    }
    let st = child.wait()?;
    if !st.success() {
        bail!("cargo build -p {package} failed ({st})");
    }
    exe.with_context(|| format!("cargo build did not report the {package} executable"))
}

/// Where cgroup v2 is mounted (hybrid hosts: /sys/fs/cgroup/unified).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    for l in mounts.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() >= 3 && f[2] == "cgroup2" {
            return Ok(PathBuf::from(f[1]));
        }
    }
    bail!("no cgroup2 mount in /proc/self/mounts")
}

pub fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("bpf"))
    {
        return Ok(());
    }
    let st = Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()
        .context("mount -t bpf")?;
    if !st.success() {
        bail!("could not mount bpffs at /sys/fs/bpf");
    }
    Ok(())
}

/// Resident set size of a process, in KiB.
pub fn vm_rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for l in s.lines() {
        if let Some(v) = l.strip_prefix("VmRSS:") {
            return Ok(v.trim().trim_end_matches("kB").trim().parse()?);
        }
    }
    bail!("no VmRSS for pid {pid}")
}

/// Minimal HTTP/1.0 GET on a loopback address (metrics scrape).
pub fn http_get(addr: &str, path: &str, timeout: std::time::Duration) -> Result<String> {
    use std::io::{Read, Write};
    let sa: std::net::SocketAddr = addr.parse()?;
    let mut s = std::net::TcpStream::connect_timeout(&sa, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let (head, body) = buf
        .split_once("\r\n\r\n")
        .context("malformed HTTP answer")?;
    if !head.starts_with("HTTP/1.") || head.split_whitespace().nth(1).is_none_or(|c| c != "200") {
        bail!("HTTP answer: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

/// Pin the calling thread to one CPU (the bench keeps its load generator and
/// its listeners on fixed, separate CPUs: where the scheduler happens to put
/// them moves a loopback loop's rate by more than the costs measured).
pub fn pin_to_cpu(cpu: usize) -> std::io::Result<()> {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The CPUs the bench uses: (listeners, load generator); `None` on one CPU.
pub fn bench_cpus() -> Option<(usize, usize)> {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    (n >= 2).then_some((0, n - 1))
}

/// A TCP listener on `addr` with the deepest accept queue the host
/// allows: std's backlog of 128 overflows under a connect loop, and an
/// overflowing queue drops SYNs (1 s retransmit stalls, not enforcement cost).
pub fn deep_listener(addr: SocketAddrV4) -> Result<std::net::TcpListener> {
    use std::os::fd::FromRawFd;
    let backlog: i32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096);
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        let l = std::net::TcpListener::from_raw_fd(fd);
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*addr.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        if libc::bind(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of_val(&sa) as u32,
        ) < 0
            || libc::listen(fd, backlog) < 0
        {
            bail!("bind/listen: {}", std::io::Error::last_os_error());
        }
        Ok(l)
    }
}
