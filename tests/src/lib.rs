//! Shared helpers for the black-box integration tests of `enforcer`.
//!
//! The tests run the real `enforcer` binary (`$ENFORCER_BIN`, or
//! `<target>/debug/enforcer`, built once with `cargo build -p enforcer`) against
//! hostile agents written in Python (`tests/agents/`). Everything they create
//! (cgroups, bpffs pins, processes, listeners) is owned by a guard that removes
//! it on drop, so a failing assertion cleans up too.
//!
//! Tests need root and a BPF-capable kernel. Without root a test fails when
//! `CI` is set and prints `SKIP: needs root` otherwise ([`require_root`]).
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Mutex, OnceLock,
    },
    thread,
    time::{Duration, Instant},
};

pub use serde_json::{json, Value};

pub mod cri;
pub mod dns_server;
pub mod fake_api;
pub mod unix;

// ---------------------------------------------------------------- environment

/// `true` if the test may go on. Without root: panics when `CI` is set (a CI
/// run must never pass by skipping), otherwise prints `SKIP: needs root`.
#[must_use]
pub fn require_root(test: &str) -> bool {
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{test}: these integration tests need root and a BPF-capable kernel \
             (CI is set, so not skipping)"
        );
    }
    eprintln!("SKIP: needs root ({test})");
    false
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `enforcer` binary under test: `$ENFORCER_BIN`, else
/// `<target>/debug/enforcer`, built once per test process.
pub fn enforcer_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("ENFORCER_BIN") {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "ENFORCER_BIN={} does not exist", p.display());
            return p;
        }
        // The test executable is <target>/debug/deps/<name>-<hash>: build the
        // binary into the same target dir (whatever --target-dir/CARGO_TARGET_DIR
        // said). Always run cargo (a no-op when fresh) so a stale binary is
        // never tested; cargo does not hold its lock while tests run.
        let root = workspace_root();
        let profile_dir = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().and_then(|d| d.parent()).map(Path::to_path_buf))
            .filter(|d| d.file_name().map(|n| n == "debug").unwrap_or(false))
            .unwrap_or_else(|| {
                std::env::var_os("CARGO_TARGET_DIR")
                    .map(PathBuf::from)
                    .map(|t| if t.is_relative() { root.join(t) } else { t })
                    .unwrap_or_else(|| root.join("target"))
                    .join("debug")
            });
        let target = profile_dir.parent().unwrap().to_path_buf();
        let bin = profile_dir.join("enforcer");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        eprintln!(
            "building enforcer (cargo build -p enforcer) into {} ...",
            target.display()
        );
        let mut build = Command::new(cargo);
        // Not the variables `cargo test` set for this process: build scripts
        // fingerprint some (ring's watches CARGO_MANIFEST_DIR), and with
        // them inherited every test binary's first call rebuilt ring,
        // rustls, kube and enforcer (~20 s each).
        for (k, _) in std::env::vars_os() {
            if let Some(k) = k.to_str() {
                if k.starts_with("CARGO_PKG_")
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
                {
                    build.env_remove(k);
                }
            }
        }
        let st = build
            .args(["build", "-p", "enforcer"])
            .current_dir(&root)
            .env("CARGO_TARGET_DIR", &target)
            .status()
            .expect("running cargo build -p enforcer");
        assert!(st.success(), "cargo build -p enforcer failed: {st}");
        assert!(bin.is_file(), "{} missing after build", bin.display());
        bin
    })
}

/// A real python3 executable (not a shell shim: an unprivileged `--user`
/// must be able to run it).
pub fn python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        for c in ["/usr/bin/python3", "/usr/local/bin/python3"] {
            if Path::new(c).is_file() {
                return PathBuf::from(c);
            }
        }
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 is needed by the tests (the project's setup installs it)");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

pub fn agents_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("agents")
}

/// `<pid>-<name>`: unique per test process and test.
pub fn unique(name: &str) -> String {
    format!("{}-{name}", std::process::id())
}

/// A temporary directory readable by everyone (an agent under `--user
/// nobody` must read its script), with the agent scripts copied in.
pub struct TestDir {
    pub dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("enforcer-test-{}-", unique(name)))
            .tempdir()
            .expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for f in [
            "hostile_agent.py",
            "probe.py",
            "dns_agent.py",
            "tls_agent.py",
            "channel_agent.py",
        ] {
            let dst = dir.path().join(f);
            std::fs::copy(agents_dir().join(f), &dst).unwrap();
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Self { dir }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    pub fn agent(&self) -> PathBuf {
        self.join("hostile_agent.py")
    }
    pub fn probe_script(&self) -> PathBuf {
        self.join("probe.py")
    }
    pub fn dns_agent(&self) -> PathBuf {
        self.join("dns_agent.py")
    }
}

/// How many times longer a process may take to finish than on the host:
/// `ENFORCER_TEST_SLOWDOWN`, which `cargo xtask vm-test` sets (QEMU/TCG
/// emulates every instruction: an `enforcer run` that loads the BPF LSM
/// hooks took ~50 s there, ~2 s here), else 1. Stretches
/// [`ChildGuard::wait_timeout`] (and so [`output_with_timeout`]), never a
/// wait for something that must not happen.
pub fn slowdown() -> u32 {
    std::env::var("ENFORCER_TEST_SLOWDOWN")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|n| (1..=20).contains(n))
        .unwrap_or(1)
}

/// Poll `f` every `every` until it returns true or `timeout` passes.
pub fn poll_until(timeout: Duration, every: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(every);
    }
}

/// A free TCP port on 127.0.0.1 (for addresses the enforcer binds itself).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------- processes

/// A child process killed (SIGKILL) and reaped on drop.
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    pub fn new(c: Child) -> Self {
        Self(Some(c))
    }
    pub fn id(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }
    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().unwrap()
    }
    /// Wait at most `timeout` (stretched by [`slowdown`]); None if still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let timeout = timeout * slowdown();
        let c = self.0.as_mut().unwrap();
        let mut st = None;
        poll_until(timeout, Duration::from_millis(20), || {
            st = c.try_wait().expect("try_wait");
            st.is_some()
        });
        st
    }
    pub fn kill9(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn drain<R: Read + Send + 'static>(r: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut r = r;
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

/// Run `cmd` to completion with a bound; panics (after killing it) on timeout.
/// Collectors of a child's stdout and stderr (read on threads so that
/// neither pipe fills).
pub struct OutputThreads {
    out: std::thread::JoinHandle<Vec<u8>>,
    err: std::thread::JoinHandle<Vec<u8>>,
}

impl OutputThreads {
    pub fn take(c: &mut std::process::Child) -> Self {
        let mut so = c.stdout.take().unwrap();
        let mut se = c.stderr.take().unwrap();
        Self {
            out: std::thread::spawn(move || {
                let mut v = Vec::new();
                std::io::Read::read_to_end(&mut so, &mut v).ok();
                v
            }),
            err: std::thread::spawn(move || {
                let mut v = Vec::new();
                std::io::Read::read_to_end(&mut se, &mut v).ok();
                v
            }),
        }
    }
    pub fn finish(self, g: &mut ChildGuard, timeout: Duration) -> Output {
        let status = g.wait_timeout(timeout);
        if status.is_none() {
            g.kill9();
        }
        let out = Output {
            status: status
                .unwrap_or_else(|| panic!("enforcer run did not finish within {timeout:?}")),
            stdout: self.out.join().unwrap(),
            stderr: self.err.join().unwrap(),
        };
        out
    }
}

pub fn output_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let mut g = ChildGuard::new(
        cmd.spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}")),
    );
    let out = drain(g.child().stdout.take().unwrap());
    let err = drain(g.child().stderr.take().unwrap());
    let st = g.wait_timeout(timeout);
    let Some(status) = st else {
        g.kill9();
        let (o, e) = (out.join().unwrap(), err.join().unwrap());
        panic!(
            "{cmd:?} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&o),
            String::from_utf8_lossy(&e)
        );
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

pub fn enforcer() -> Command {
    Command::new(enforcer_bin())
}

// ---------------------------------------------------------------- cgroups, bpffs

pub fn cgroup2_mount() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    for l in mounts.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() > 2 && f[2] == "cgroup2" {
            return PathBuf::from(f[1]);
        }
    }
    panic!("no cgroup2 mount in /proc/self/mounts");
}

/// Make sure a bpffs is mounted at /sys/fs/bpf (the daemon pins there).
pub fn ensure_bpffs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        if !mounts.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && f[2] == "bpf" && f[1] == "/sys/fs/bpf"
        }) {
            let st = Command::new("mount")
                .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
                .status()
                .expect("mount -t bpf");
            assert!(st.success(), "mounting bpffs at /sys/fs/bpf failed");
        }
    });
}

/// A cgroup v2 directory owned by the test: its processes are killed and the
/// whole subtree removed on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    /// `<cgroup2 mount>/enforcer-test-<pid>-<name>`
    pub fn create(name: &str) -> Self {
        let path = cgroup2_mount().join(format!("enforcer-test-{}", unique(name)));
        if path.exists() {
            remove_cgroup_tree(&path);
        }
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }
    /// A nested cgroup (removed with the parent).
    pub fn child(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        p
    }
    /// Path relative to the cgroup2 mount (what daemon bindings may use).
    pub fn relative(&self) -> PathBuf {
        self.path
            .strip_prefix(cgroup2_mount())
            .unwrap()
            .to_path_buf()
    }
}

pub fn move_pid(cgroup_dir: &Path, pid: u32) {
    std::fs::write(cgroup_dir.join("cgroup.procs"), format!("{pid}\n"))
        .unwrap_or_else(|e| panic!("moving pid {pid} into {}: {e}", cgroup_dir.display()));
}

fn cgroup_pids(dir: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = Vec::new();
    if let Ok(s) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(s.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                pids.extend(cgroup_pids(&e.path()));
            }
        }
    }
    pids
}

fn rmdir_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                rmdir_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Kill every process in a cgroup subtree and remove it (best effort, bounded).
pub fn remove_cgroup_tree(path: &Path) {
    if !path.exists() {
        return;
    }
    let _ = std::fs::write(path.join("cgroup.kill"), "1");
    poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        let pids = cgroup_pids(path);
        for p in &pids {
            unsafe { libc::kill(*p as i32, libc::SIGKILL) };
        }
        pids.is_empty()
    });
    poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        rmdir_tree(path);
        !path.exists()
    });
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.path);
    }
}

/// A pin directory on bpffs, `/sys/fs/bpf/enforcer-test-<pid>-<name>`,
/// removed (`rm -r`) on drop: that unpins maps and links.
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    pub fn new(name: &str) -> Self {
        ensure_bpffs();
        let path = PathBuf::from(format!("/sys/fs/bpf/enforcer-test-{}", unique(name)));
        let _ = std::fs::remove_dir_all(&path);
        Self { path }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------- listeners

/// A TCP listener counting connections and bytes received.
pub struct TcpSink {
    pub addr: SocketAddr,
    pub bytes: Arc<AtomicU64>,
    pub conns: Arc<AtomicU64>,
    pub data: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
}

impl TcpSink {
    pub fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let l = TcpListener::bind(addr)?;
        let addr = l.local_addr()?;
        l.set_nonblocking(true)?;
        let s = Self {
            addr,
            bytes: Default::default(),
            conns: Default::default(),
            data: Default::default(),
            stop: Default::default(),
        };
        let (bytes, conns, data, stop) = (
            s.bytes.clone(),
            s.conns.clone(),
            s.data.clone(),
            s.stop.clone(),
        );
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        conns.fetch_add(1, Ordering::SeqCst);
                        let (bytes, data, stop) = (bytes.clone(), data.clone(), stop.clone());
                        thread::spawn(move || {
                            let _ = c.set_nonblocking(false);
                            let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
                            let mut buf = [0u8; 4096];
                            loop {
                                match c.read(&mut buf) {
                                    Ok(0) => break,
                                    Ok(n) => {
                                        data.lock().unwrap().extend_from_slice(&buf[..n]);
                                        bytes.fetch_add(n as u64, Ordering::SeqCst);
                                    }
                                    Err(e)
                                        if matches!(
                                            e.kind(),
                                            std::io::ErrorKind::WouldBlock
                                                | std::io::ErrorKind::TimedOut
                                        ) =>
                                    {
                                        if stop.load(Ordering::Relaxed) {
                                            break;
                                        }
                                    }
                                    Err(_) => break,
                                }
                            }
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(s)
    }
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }
    pub fn conns(&self) -> u64 {
        self.conns.load(Ordering::SeqCst)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data.lock().unwrap()).into_owned()
    }
}

impl Drop for TcpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A UDP socket counting datagrams and bytes received.
pub struct UdpSink {
    pub addr: SocketAddr,
    pub bytes: Arc<AtomicU64>,
    pub datagrams: Arc<AtomicU64>,
    pub data: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
}

impl UdpSink {
    pub fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let u = UdpSocket::bind(addr)?;
        let addr = u.local_addr()?;
        u.set_read_timeout(Some(Duration::from_millis(100)))?;
        let s = Self {
            addr,
            bytes: Default::default(),
            datagrams: Default::default(),
            data: Default::default(),
            stop: Default::default(),
        };
        let (bytes, dg, data, stop) = (
            s.bytes.clone(),
            s.datagrams.clone(),
            s.data.clone(),
            s.stop.clone(),
        );
        thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, _)) = u.recv_from(&mut buf) {
                    dg.fetch_add(1, Ordering::SeqCst);
                    bytes.fetch_add(n as u64, Ordering::SeqCst);
                    data.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            }
        });
        Ok(s)
    }
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }
    pub fn datagrams(&self) -> u64 {
        self.datagrams.load(Ordering::SeqCst)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data.lock().unwrap()).into_owned()
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// TCP and UDP listeners on the same `ip` and the same (dynamic) port.
pub struct SinkPair {
    pub tcp: TcpSink,
    pub udp: UdpSink,
}

impl SinkPair {
    pub fn bind(ip: &str) -> Self {
        let ip: IpAddr = ip.parse().unwrap();
        for _ in 0..100 {
            let tcp = TcpSink::bind(SocketAddr::new(ip, 0)).expect("tcp bind");
            if let Ok(udp) = UdpSink::bind(SocketAddr::new(ip, tcp.port())) {
                return Self { tcp, udp };
            }
        }
        panic!("no port free for both tcp and udp on {ip}");
    }
    pub fn port(&self) -> u16 {
        self.tcp.port()
    }
    pub fn total_bytes(&self) -> u64 {
        self.tcp.bytes() + self.udp.bytes()
    }
    pub fn describe(&self) -> String {
        format!(
            "{}: tcp {} conns {} bytes {:?}; udp {} datagrams {} bytes {:?}",
            self.tcp.addr,
            self.tcp.conns(),
            self.tcp.bytes(),
            self.tcp.text(),
            self.udp.datagrams(),
            self.udp.bytes(),
            self.udp.text()
        )
    }
}

// ---------------------------------------------------------------- policies

/// An AgentPolicy document with `cidr` rules: (cidr, ports, protocol).
pub fn policy_yaml(name: &str, spiffe: &str, mode: &str, rules: &[(&str, &[u16], &str)]) -> String {
    let mut y = format!(
        "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: {name}\nspec:\n  \
         identity:\n    spiffeId: {spiffe}\n  mode: {mode}\n  egress:\n"
    );
    for (cidr, ports, proto) in rules {
        y.push_str(&format!("    - cidr: \"{cidr}\"\n"));
        if !ports.is_empty() {
            let p: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
            y.push_str(&format!("      ports: [{}]\n", p.join(", ")));
        }
        y.push_str(&format!("      protocol: {proto}\n"));
    }
    y
}

/// Write `text` to `path` atomically (temp file + rename in the same dir).
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// ---------------------------------------------------------------- audit log, metrics

pub fn read_jsonl(path: &Path) -> Vec<Value> {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    s.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("bad JSON line {l:?} in {}: {e}", path.display()))
        })
        .collect()
}

/// Plain HTTP/1.1 GET over a TcpStream: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Parse Prometheus text: (name, labels, value) per sample.
pub fn parse_metrics(body: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in body.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut map = BTreeMap::new();
        // label values here never contain `",`
        for kv in labels.split("\",") {
            if let Some((k, v)) = kv.split_once('=') {
                map.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
            }
        }
        out.push((name.to_string(), map, value));
    }
    out
}

/// Sum of the samples of `name` whose labels include all of `labels`; None
/// if no sample matches.
pub fn metric(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for (n, l, v) in parse_metrics(body) {
        if n == name
            && labels
                .iter()
                .all(|(k, want)| l.get(*k).map(|x| x == want).unwrap_or(false))
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

// ---------------------------------------------------------------- probe

/// A python process that executes one JSON command per line (agents/probe.py).
/// Spawn it, move it into a cgroup, then drive it.
pub struct Probe {
    child: ChildGuard,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    pub pid: u32,
}

impl Probe {
    pub fn spawn(dir: &TestDir) -> Self {
        Self::spawn_script(&dir.probe_script())
    }

    /// Any script that speaks the probe protocol (e.g. agents/dns_agent.py).
    pub fn spawn_script(script: &Path) -> Self {
        let mut c = Command::new(python());
        c.arg(script);
        Self::spawn_command(c)
    }

    /// A command that ends in a probe-protocol script, e.g. `nsenter
    /// --net=... python3 dns_agent.py` (the probe's pid is the command's:
    /// the wrapper must exec it).
    pub fn spawn_command(mut c: Command) -> Self {
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = ChildGuard::new(c.spawn().expect("spawning probe"));
        let stdin = child.child().stdin.take().unwrap();
        let stdout = child.child().stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let ready = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("probe did not start");
        let v: Value = serde_json::from_str(&ready).unwrap();
        assert_eq!(v["ready"], true, "{ready}");
        let pid = child.id();
        Self {
            child,
            stdin,
            lines: rx,
            pid,
        }
    }

    pub fn cmd(&mut self, c: Value) -> Value {
        writeln!(self.stdin, "{c}").expect("writing to probe");
        self.stdin.flush().unwrap();
        let l = self
            .lines
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("probe gave no answer to {c}"));
        serde_json::from_str(&l).unwrap()
    }

    pub fn tcp(&mut self, host: &str, port: u16, data: &str) -> Value {
        self.cmd(json!({"op": "tcp", "host": host, "port": port, "data": data}))
    }
    pub fn udp(&mut self, host: &str, port: u16, data: &str) -> Value {
        self.cmd(json!({"op": "udp", "host": host, "port": port, "data": data}))
    }
    pub fn op(&mut self, op: &str) -> Value {
        self.cmd(json!({ "op": op }))
    }
    pub fn kill(&mut self) {
        self.child.kill9();
    }
}

pub const EPERM: i64 = libc::EPERM as i64;
pub const EACCES: i64 = libc::EACCES as i64;

/// Assert a probe answer is a failure with errno EPERM.
#[track_caller]
pub fn assert_eperm(v: &Value, what: &str) {
    assert_eq!(
        v["ok"], false,
        "{what}: expected EPERM, but it succeeded: {v}"
    );
    assert_eq!(
        v["errno"].as_i64(),
        Some(EPERM),
        "{what}: expected EPERM: {v}"
    );
}

#[track_caller]
pub fn assert_ok(v: &Value, what: &str) {
    assert_eq!(v["ok"], true, "{what}: expected success: {v}");
}

// ---------------------------------------------------------------- daemon

/// `enforcer daemon` with its config, policies dir, pin dir, control socket,
/// metrics address and audit log, all private to one test.
pub struct Daemon {
    pub child: Option<ChildGuard>,
    /// A command the daemon runs under (e.g. `nsenter … unshare …`: the
    /// namespaces of a DaemonSet's pod); empty: none. The launcher and the
    /// daemon share a process group, killed as one.
    pub launcher: Vec<String>,
    pub config: PathBuf,
    pub policies: PathBuf,
    pub socket: PathBuf,
    pub metrics: SocketAddr,
    pub audit: PathBuf,
    pub pin_dir: PathBuf,
    pub stderr_log: PathBuf,
    /// The daemon's stdout lines, from [`Daemon::spawn`] until
    /// [`Daemon::wait_ready`] has seen "ready".
    stdout_lines: Option<mpsc::Receiver<String>>,
}

impl Daemon {
    /// Write the config (bindings: (cgroup path, policy name)).
    pub fn configure(dir: &TestDir, pins: &PinDir, bindings: &[(&Path, &str)]) -> Self {
        let policies = dir.join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        let d = Self {
            child: None,
            launcher: Vec::new(),
            config: dir.join("daemon.yaml"),
            policies,
            socket: dir.join("run/enforcer.sock"),
            metrics: SocketAddr::new("127.0.0.1".parse().unwrap(), free_port()),
            audit: dir.join("audit.jsonl"),
            pin_dir: pins.path.clone(),
            stderr_log: dir.join("daemon.stderr"),
            stdout_lines: None,
        };
        d.write_config(bindings);
        d
    }

    pub fn write_config(&self, bindings: &[(&Path, &str)]) {
        let mut y = format!(
            "policiesDir: {}\nmetricsAddr: {}\nauditLog: {}\npinDir: {}\ncontrolSocket: {}\nstateDir: {}\nallowEvents: 1\nbindings:\n",
            self.policies.display(),
            self.metrics,
            self.audit.display(),
            self.pin_dir.display(),
            self.socket.display(),
            self.config.parent().unwrap().join("state").display()
        );
        if bindings.is_empty() {
            y = y.replace("bindings:\n", "bindings: []\n");
        }
        for (cg, pol) in bindings {
            y.push_str(&format!(
                "  - cgroup: {}\n    policy: {pol}\n",
                cg.display()
            ));
        }
        write_atomic(&self.config, &y);
    }

    /// Start and wait (bounded) for "ready" on stdout.
    pub fn start(&mut self) {
        self.spawn();
        self.wait_ready();
    }

    /// Start the daemon without waiting for it (see [`Daemon::wait_ready`]):
    /// a test can act while it starts up (its log: [`Daemon::stderr`]).
    pub fn spawn(&mut self) {
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_log)
            .unwrap();
        let mut c = match self.launcher.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(enforcer_bin()).process_group(0);
                c
            }
            None => enforcer(),
        };
        c.args(["--log", "info", "daemon", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err);
        let mut child = ChildGuard::new(c.spawn().expect("spawning enforcer daemon"));
        let stdout = child.child().stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                let _ = tx.send(l);
            }
        });
        self.child = Some(child);
        self.stdout_lines = Some(rx);
    }

    /// Wait (bounded) for "ready" on the stdout of the daemon that
    /// [`Daemon::spawn`] started; panics (the daemon is killed on drop) if
    /// it exits or is not ready in time.
    pub fn wait_ready(&mut self) {
        let rx = self
            .stdout_lines
            .take()
            .expect("Daemon::wait_ready without Daemon::spawn");
        // Generous: under QEMU/TCG (the BPF LSM runner) loading the object
        // and attaching the LSM hooks (each a trampoline update that waits
        // for RCU grace periods) once took over 60 s.
        let end = Instant::now() + Duration::from_secs(180);
        loop {
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
                if l.contains("ready") {
                    break;
                }
            }
            let child = self.child.as_mut().expect("daemon spawned");
            if let Some(st) = child.child().try_wait().unwrap() {
                panic!(
                    "enforcer daemon exited early ({st}); stderr:\n{}",
                    self.stderr()
                );
            }
            if Instant::now() > end {
                panic!(
                    "enforcer daemon not ready within 180 s; stderr:\n{}",
                    self.stderr()
                );
            }
        }
    }

    /// The daemon's PID (under a launcher: the launcher's child).
    pub fn pid(&self) -> u32 {
        let id = self.child.as_ref().expect("daemon running").id();
        if self.launcher.is_empty() {
            return id;
        }
        let mut pid = None;
        poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
            pid = first_child(id);
            pid.is_some()
        });
        pid.unwrap_or_else(|| panic!("the daemon's launcher {id} has no child"))
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            if !self.launcher.is_empty() {
                unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            }
            c.kill9();
        }
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// `enforcer status --socket S --json`
    /// The identity `name` in `enforcer status --json`, if the daemon has it.
    pub fn identity(&self, name: &str) -> Option<Value> {
        self.status()["identities"]
            .as_array()
            .and_then(|a| a.iter().find(|i| i["name"] == name))
            .cloned()
    }

    pub fn status(&self) -> Value {
        let mut c = enforcer();
        c.args(["status", "--json", "--socket"]).arg(&self.socket);
        let out = output_with_timeout(c, Duration::from_secs(20));
        assert!(
            out.status.success(),
            "enforcer status failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "status is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    pub fn scrape(&self) -> String {
        let (code, body) = http_get(self.metrics, "/metrics").expect("scraping daemon metrics");
        assert_eq!(code, 200, "/metrics: {body}");
        body
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The first child of process `pid` (`/proc/<pid>/task/<pid>/children`),
/// e.g. what a launcher (`nsenter`, `unshare --fork`) started.
pub fn first_child(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Serializes tests that must not overlap (optional; most tests are
/// independent: own ports, cgroups, pin dirs).
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    M.lock().unwrap_or_else(|e| e.into_inner())
}

/// Collects the failures of independent checks so that one test reports
/// every broken guarantee, not only the first one.
#[derive(Default)]
pub struct Checks {
    failures: Vec<String>,
}

impl Checks {
    pub fn new() -> Self {
        Self::default()
    }
    /// Run `f`; a panic inside it is recorded as a failure of `what`.
    pub fn check(&mut self, what: &str, f: impl FnOnce()) {
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            self.failures.push(format!("[{what}] {msg}"));
        }
    }
    pub fn fail(&mut self, msg: String) {
        self.failures.push(msg);
    }
    /// Panic with every recorded failure.
    #[track_caller]
    pub fn finish(self) {
        assert!(
            self.failures.is_empty(),
            "{} check(s) failed:\n\n{}",
            self.failures.len(),
            self.failures.join("\n\n")
        );
    }
}

// ---------------------------------------------------------------- DNS-aware policies

/// One `spec.egress` host entry, as YAML flow mapping text, with
/// `inspect: none`: the DNS tests send raw bytes to learned addresses (they
/// test what a name opens, not what a connection names); the first-bytes
/// checks every host rule gets by default are tested in `first_bytes.rs`.
pub fn host_rule(host: &str, ports: &[u16], protocol: &str) -> String {
    let r = rule("host", host, ports, protocol);
    format!("{}, inspect: none}}", r.trim_end_matches('}'))
}

/// One `spec.egress` cidr entry, as YAML flow mapping text.
pub fn cidr_rule(cidr: &str, ports: &[u16], protocol: &str) -> String {
    rule("cidr", cidr, ports, protocol)
}

fn rule(kind: &str, what: &str, ports: &[u16], protocol: &str) -> String {
    let mut r = format!("{{{kind}: \"{what}\"");
    if !ports.is_empty() {
        let p: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
        r.push_str(&format!(", ports: [{}]", p.join(", ")));
    }
    r.push_str(&format!(", protocol: {protocol}}}"));
    r
}

/// The rule that vouches for loopback answers (the rebinding defence only
/// installs private/loopback addresses that a `cidr` rule contains). Port 9
/// (discard): nothing in the tests listens there, so the rule itself
/// allows nothing the tests use.
pub fn vouch_loopback() -> String {
    cidr_rule("127.0.0.0/8", &[9], "tcp")
}

/// An AgentPolicy with `egress` entries (see [`host_rule`], [`cidr_rule`])
/// and a `dns:` block: `upstream` plus extra lines such as
/// `namesPerMinute: 10`, `queryTypes: [A, TXT]`, `ttl: {min: 1s, max: 2s}`.
pub fn dns_policy_yaml(
    name: &str,
    egress: &[String],
    upstream: &str,
    dns_extra: &[&str],
) -> String {
    let mut y = format!(
        "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: {name}\nspec:\n  \
         identity:\n    spiffeId: spiffe://example.org/ns/tests/sa/{name}\n  mode: enforce\n  egress:\n"
    );
    for e in egress {
        y.push_str(&format!("    - {e}\n"));
    }
    y.push_str(&format!("  dns:\n    upstream: [\"{upstream}\"]\n"));
    for l in dns_extra {
        y.push_str(&format!("    {l}\n"));
    }
    y
}

// ---------------------------------------------------------------- interactive agent under `enforcer run`

/// `enforcer run --policy P [extra] -- python3 <script>` where the script
/// speaks the probe protocol (one JSON command per stdin line, one JSON
/// answer per stdout line; first line `{"ready": true}`): the test drives
/// the agent step by step *inside* the enforced cgroup.
pub struct RunAgent {
    child: ChildGuard,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// The agent's own pid (from its ready line).
    pub pid: u32,
}

impl RunAgent {
    pub fn spawn(policy: &Path, extra: &[String], script: &Path) -> Self {
        let mut c = enforcer();
        c.arg("run")
            .args(["--user", "root", "--policy"])
            .arg(policy)
            .args(extra)
            .arg("--")
            .arg(python())
            .arg(script)
            .current_dir(script.parent().unwrap())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::new(c.spawn().expect("spawning enforcer run"));
        let stdin = child.child().stdin.take().unwrap();
        let stdout = child.child().stdout.take().unwrap();
        let mut se = child.child().stderr.take().unwrap();
        let stderr: Arc<Mutex<Vec<u8>>> = Default::default();
        {
            let stderr = stderr.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = se.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    stderr.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                // Only the agent's JSON lines: anything else is not an answer.
                if serde_json::from_str::<Value>(l.trim()).is_ok() && tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut me = Self {
            child,
            stdin: Some(stdin),
            lines: rx,
            stderr,
            pid: 0,
        };
        // (Under the VM runner's emulation, loading and verifying every
        // program of a policy with file rules takes tens of seconds.)
        let ready = match me.lines.recv_timeout(Duration::from_secs(180)) {
            Ok(l) => l,
            Err(_) => {
                let st = me.child.wait_timeout(Duration::from_secs(2));
                panic!(
                    "agent under `enforcer run` did not start (enforcer status {st:?}); stderr:\n{}",
                    me.stderr()
                )
            }
        };
        let v: Value = serde_json::from_str(&ready).unwrap();
        assert_eq!(v["ready"], true, "{ready}");
        me.pid = v["pid"].as_u64().unwrap_or(0) as u32;
        me
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    pub fn cmd_timeout(&mut self, c: Value, timeout: Duration) -> Value {
        let stdin = self.stdin.as_mut().expect("agent stdin open");
        if writeln!(stdin, "{c}").and_then(|()| stdin.flush()).is_err() {
            panic!("agent is gone (writing {c}); stderr:\n{}", self.stderr());
        }
        let l = self.lines.recv_timeout(timeout).unwrap_or_else(|_| {
            panic!(
                "agent gave no answer to {c} within {timeout:?}; stderr:\n{}",
                self.stderr()
            )
        });
        serde_json::from_str(&l).unwrap()
    }

    pub fn cmd(&mut self, c: Value) -> Value {
        self.cmd_timeout(c, Duration::from_secs(30))
    }

    pub fn tcp(&mut self, host: &str, port: u16, data: &str) -> Value {
        self.cmd(json!({"op": "tcp", "host": host, "port": port, "data": data}))
    }

    /// Ask the agent to stop, wait for `enforcer run` to exit (it flushes
    /// the audit log and prints its summary); kill it after `timeout`.
    pub fn finish(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(mut s) = self.stdin.take() {
            let _ = writeln!(s, "{}", json!({"op": "exit"}));
        }
        let st = self.child.wait_timeout(timeout);
        if st.is_none() {
            self.child.kill9();
        }
        st
    }
}

/// A TCP listener that accepts and drops connections, counting them, with
/// the deepest accept queue the host allows (a connect loop overflows std's
/// 128). Bound to `ip` (0.0.0.0 accepts connections to any 127.x.y.z).
pub struct AcceptSink {
    pub addr: SocketAddr,
    pub conns: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl AcceptSink {
    pub fn bind(ip: std::net::Ipv4Addr) -> Self {
        use std::os::fd::FromRawFd;
        let l = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let l = TcpListener::from_raw_fd(fd);
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from(ip).to_be(),
                },
                sin_zero: [0; 8],
            };
            assert!(
                libc::bind(
                    fd,
                    (&sa as *const libc::sockaddr_in).cast(),
                    std::mem::size_of_val(&sa) as u32,
                ) == 0
                    && libc::listen(fd, 4096) == 0,
                "bind/listen: {}",
                std::io::Error::last_os_error()
            );
            l
        };
        l.set_nonblocking(true).unwrap();
        let s = Self {
            addr: l.local_addr().unwrap(),
            conns: Default::default(),
            stop: Default::default(),
        };
        let (conns, stop) = (s.conns.clone(), s.stop.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok(_) => {
                        conns.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        s
    }
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
    pub fn conns(&self) -> u64 {
        self.conns.load(Ordering::SeqCst)
    }
}

impl Drop for AcceptSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------- network namespaces

/// A network namespace held by an `unshare --net sleep` process.
pub struct TestNetns {
    holder: ChildGuard,
    pub path: PathBuf,
    fd: std::fs::File,
    pub inode: u64,
}

impl TestNetns {
    /// A fresh namespace; its loopback is brought up when `lo_up`.
    pub fn new(lo_up: bool) -> Self {
        use std::os::unix::fs::MetadataExt;
        let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        let mut c = Command::new("unshare");
        c.args(["--net", "--", "sleep", "100000"]);
        let holder = ChildGuard::new(c.spawn().expect("unshare --net"));
        let path = PathBuf::from(format!("/proc/{}/ns/net", holder.id()));
        let mut inode = own;
        assert!(
            poll_until(Duration::from_secs(5), Duration::from_millis(10), || {
                inode = std::fs::metadata(&path).map(|m| m.ino()).unwrap_or(own);
                inode != own
            }),
            "unshare --net did not make a namespace"
        );
        let fd = std::fs::File::open(&path).unwrap();
        if lo_up {
            let st = Command::new("nsenter")
                .arg(format!("--net={}", path.display()))
                .args(["ip", "link", "set", "lo", "up"])
                .status()
                .expect("nsenter ip link set lo up");
            assert!(st.success(), "bringing lo up in the test namespace");
        }
        Self {
            holder,
            path,
            fd,
            inode,
        }
    }

    /// The process holding the namespace (a pod's sandbox, in a test).
    pub fn holder_pid(&self) -> u32 {
        self.holder.id()
    }

    /// Kill the holder: the namespace goes with its last process.
    pub fn kill_holder(&mut self) {
        self.holder.kill9();
    }

    /// `net:[<inode>]`
    pub fn name(&self) -> String {
        format!("net:[{}]", self.inode)
    }

    /// Run `f` on a thread inside the namespace (sockets it makes stay there).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        use std::os::fd::AsRawFd;
        let fd = self.fd.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(move || {
                assert_eq!(
                    unsafe { libc::setns(fd, libc::CLONE_NEWNET) },
                    0,
                    "setns: {}",
                    std::io::Error::last_os_error()
                );
                f()
            })
            .join()
            .unwrap()
        })
    }

    /// `dns_agent.py` inside the namespace (not yet in any bound cgroup).
    pub fn agent(&self, dir: &TestDir) -> Probe {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path.display()))
            .arg(python())
            .arg(dir.dns_agent());
        Probe::spawn_command(c)
    }
}
