//! Containment of an `enforcer run` agent: what keeps the agent from
//! switching enforcement off or walking around it.
//!
//! The agent is started as PID 2 of a new PID namespace under a small init
//! (PID 1, [`child::init_main`]) in a new session, inside the agent cgroup,
//! in a private mount namespace:
//! - bpffs is hidden (an empty read-only tmpfs over every bpffs mount and
//!   over /sys/fs/bpf) and `bpf()` is refused by seccomp;
//! - every cgroup2 mount is read-only (no move out of the cgroup);
//! - /proc shows the namespace's processes only (enforcer is invisible and
//!   cannot be signalled or traced); /proc/sys & co are read-only;
//! - /tmp, /run and /dev/shm are private (no host or user service socket);
//! - a uid-0 agent (`--user root` only) gets a read-only view of every
//!   mount except its working directory and `spec.writable`, and a private
//!   /dev;
//! - no capabilities, `no_new_privs`, a seccomp filter ([`seccomp`]) whose
//!   refusals enforcer records, and no inherited descriptor but stdio and
//!   `--pass-fd`.
use std::{
    ffi::{CString, OsStr, OsString},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};

pub mod child;
pub mod seccomp;

use child::{Device, Prepared, RoMount, Writable};

/// Who the agent runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentUser {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub name: Option<String>,
    pub home: Option<PathBuf>,
}

impl AgentUser {
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
    pub fn describe(&self) -> String {
        match &self.name {
            Some(n) => format!("{n} (uid {}, gid {})", self.uid, self.gid),
            None => format!("uid {}, gid {}", self.uid, self.gid),
        }
    }
}

fn from_passwd(u: nix::unistd::User) -> AgentUser {
    let groups = CString::new(u.name.as_bytes())
        .ok()
        .and_then(|n| nix::unistd::getgrouplist(&n, u.gid).ok())
        .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_else(|| vec![u.gid.as_raw()]);
    AgentUser {
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
        groups,
        name: Some(u.name),
        home: Some(u.dir),
    }
}

/// The agent's user: `--user NAME|UID[:GID]|root`, else the user who ran
/// `sudo` (`SUDO_UID`/`SUDO_GID`, or `PKEXEC_UID`). uid 0 only when asked
/// for by name: `--user root` (or `--user 0`).
pub fn resolve_user(flag: Option<&str>, env: &dyn Fn(&str) -> Option<String>) -> Result<AgentUser> {
    let spec = match flag {
        Some(s) => s.to_string(),
        None => {
            let uid = env("SUDO_UID")
                .or_else(|| env("PKEXEC_UID"))
                .filter(|u| u.trim() != "0");
            let Some(uid) = uid else {
                bail!(
                    "enforcer run: no user to run the agent as: not started through sudo (SUDO_UID \
                     is unset or 0). Pass --user NAME|UID[:GID]; an agent runs as uid 0 only with \
                     an explicit --user root (it then gets a read-only view of the file system)"
                );
            };
            match env("SUDO_GID") {
                Some(g) if env("SUDO_UID").is_some() => format!("{uid}:{g}"),
                _ => uid,
            }
        }
    };
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec.as_str(), None),
    };
    let mut user = match u.parse::<u32>() {
        Ok(uid) => match nix::unistd::User::from_uid(uid.into()).ok().flatten() {
            Some(pw) => from_passwd(pw),
            None => AgentUser {
                uid,
                gid: uid,
                groups: vec![uid],
                name: None,
                home: None,
            },
        },
        Err(_) => from_passwd(
            nix::unistd::User::from_name(u)?
                .with_context(|| format!("--user: no such user {u:?}"))?,
        ),
    };
    if let Some(g) = g {
        let gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => nix::unistd::Group::from_name(g)?
                .with_context(|| format!("--user: no such group {g:?}"))?
                .gid
                .as_raw(),
        };
        if gid != user.gid {
            user.gid = gid;
            user.groups = vec![gid];
        }
    }
    Ok(user)
}

/// What `enforcer run` asks of the sandbox.
pub struct Options<'a> {
    pub cgroup_dir: &'a Path,
    pub command: &'a [String],
    pub user: &'a AgentUser,
    /// spec.writable of the policy.
    pub writable: &'a [PathBuf],
    pub pass_fds: &'a [RawFd],
    /// enforcer's own files (policy, audit log): read-only in the view.
    pub protect: &'a [PathBuf],
    /// Abstract unix sockets are judged by `spec.local` (the cgroup unix
    /// hooks): Landlock does not scope them then.
    pub abstract_by_policy: bool,
}

/// Paths a uid-0 agent's writable set must neither be nor contain: the
/// files root services act on (cron, systemd units, ld.so.preload, shell
/// profiles, authorized_keys, ...).
const PROTECTED: &[&str] = &[
    "/etc",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/boot",
    "/root",
    "/var/spool",
    "/var/lib",
    "/var/log",
    "/opt",
    "/srv",
    "/home",
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/var/run",
    "/snap",
];
/// ... nor lie under (a project may live under /root or /home/<user>;
/// /var is refused but for /var/tmp, below).
const PROTECTED_TREES: &[&str] = &[
    "/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/boot", "/proc",
    "/sys", "/dev", "/run",
];

/// Refuse a writable path for a uid-0 agent that holds or is a host file
/// root services act on.
pub fn check_writable_for_root(path: &Path, homes: &[PathBuf]) -> Result<(), String> {
    if path == Path::new("/") {
        return Err("the whole file system".into());
    }
    // Dot files and directories (.ssh, .bashrc, .config/systemd, .git/hooks
    // of a home) hold what runs later as their owner.
    if path
        .components()
        .any(|c| c.as_os_str().as_encoded_bytes().first() == Some(&b'.'))
    {
        return Err("a hidden (dot) file or directory is on its path".into());
    }
    if path.starts_with("/var") && !path.starts_with("/var/tmp") {
        return Err("it lies in /var (only /var/tmp may be writable)".into());
    }
    if path.starts_with("/opt") {
        return Err("it lies in /opt".into());
    }
    for p in PROTECTED {
        let p = Path::new(p);
        if p.starts_with(path) {
            return Err(format!("it holds {}", p.display()));
        }
    }
    for t in PROTECTED_TREES {
        // /dev/shm is private to the agent (a tmpfs of its own).
        if path.starts_with(t) && !path.starts_with("/dev/shm") {
            return Err(format!("it lies in {t}"));
        }
    }
    for h in homes {
        if h.starts_with(path) && h != Path::new("/") && !h.as_os_str().is_empty() {
            return Err(format!(
                "it holds the home directory {} (shell profiles, authorized_keys)",
                h.display()
            ));
        }
    }
    Ok(())
}

fn home_dirs() -> Vec<PathBuf> {
    std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(':').nth(5))
        .filter(|h| h.len() > 1 && h.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

/// One line of /proc/self/mountinfo: mount point, per-mount flags, fs type.
struct MountLine {
    point: PathBuf,
    flags: libc::c_ulong,
    fstype: String,
}

fn unescape(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

fn mount_flags(opts: &str) -> libc::c_ulong {
    let mut f = 0;
    for o in opts.split(',') {
        f |= match o {
            "nosuid" => libc::MS_NOSUID,
            "nodev" => libc::MS_NODEV,
            "noexec" => libc::MS_NOEXEC,
            "noatime" => libc::MS_NOATIME,
            "nodiratime" => libc::MS_NODIRATIME,
            "relatime" => libc::MS_RELATIME,
            _ => 0,
        };
    }
    f
}

fn mounts() -> Result<Vec<MountLine>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mut out = Vec::new();
    for l in text.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        let Some(dash) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if f.len() < 6 || dash + 1 >= f.len() {
            continue;
        }
        out.push(MountLine {
            point: unescape(f[4]),
            flags: mount_flags(f[5]),
            fstype: f[dash + 1].to_string(),
        });
    }
    Ok(out)
}

fn cstr(p: impl AsRef<OsStr>) -> Result<CString> {
    CString::new(p.as_ref().as_bytes()).context("a path or argument holds a NUL byte")
}

fn under_private(p: &Path) -> bool {
    p.starts_with("/tmp")
        || p.starts_with("/run")
        || p.starts_with("/var/run")
        || p.starts_with("/dev/shm")
}

fn writable_entry(path: &Path, mounts: &[MountLine]) -> Result<Writable> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("writable path {}", path.display()))?;
    // Flags of the mount holding the path: the deepest mount point above it.
    let flags = mounts
        .iter()
        .filter(|m| path.starts_with(&m.point))
        .max_by_key(|m| m.point.as_os_str().len())
        .map(|m| m.flags)
        .unwrap_or(0);
    let private = under_private(path);
    let mut parents = Vec::new();
    if private {
        // Ancestors below the tmpfs itself (/tmp, /run), outermost first.
        let mut anc: Vec<&Path> = path
            .ancestors()
            .skip(1)
            .filter(|a| a.components().count() > 2)
            .collect();
        anc.reverse();
        parents = anc.into_iter().map(cstr).collect::<Result<_>>()?;
    }
    Ok(Writable {
        path: cstr(path)?,
        parents,
        is_dir: meta.is_dir(),
        flags: flags & !libc::MS_RDONLY,
        under_private: private,
        read_only: false,
    })
}

fn resolve_exe(cmd: &str, path_var: Option<OsString>) -> Result<PathBuf> {
    if cmd.contains('/') {
        return Ok(PathBuf::from(cmd));
    }
    let path_var = path_var.unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path_var) {
        let c = dir.join(cmd);
        if let Ok(m) = std::fs::metadata(&c) {
            use std::os::unix::fs::PermissionsExt;
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(c);
            }
        }
    }
    bail!("{cmd}: command not found in PATH")
}

/// The kernel's Landlock ABI version (0: none).
pub fn landlock_abi() -> i64 {
    const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
    // SAFETY: the version query takes no memory.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    v.max(0)
}

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// What the agent's view is, in words (summary, audit start record).
pub struct Description {
    pub user: String,
    pub view: String,
    pub writable: Vec<PathBuf>,
}

/// Prepare everything the child needs (allocation happens here, not after
/// the clone).
pub fn prepare(o: &Options, filter: &seccomp::Filter) -> Result<(Prepared, Description)> {
    let user = o.user;
    let all = mounts()?;
    let cwd = std::env::current_dir().context("the working directory")?;
    let root_mode = user.is_root();
    let (writable_paths, mut writable) = writable_set(o, &all, &cwd, root_mode)?;
    let exe = resolve_command(o, &all, &writable_paths, &mut writable)?;

    let ro_mounts = read_only_mounts(&all, root_mode)?;
    let (bpf_mounts, bpf_covers) = bpf_mounts_and_covers(&all)?;
    let resolv = match std::fs::canonicalize("/etc/resolv.conf") {
        Ok(t) if under_private(&t) && t.is_file() => Some(writable_entry(&t, &all)?),
        _ => None,
    };

    let devices = private_devices(root_mode)?;
    let (proc_ro, proc_masked) = proc_ro_and_masked()?;

    // The command, its environment (HOME/USER/LOGNAME of the agent's user,
    // a private XDG_RUNTIME_DIR).
    let argv_store = o.command.iter().map(cstr).collect::<Result<Vec<_>>>()?;
    let run_user_dir = PathBuf::from(format!("/run/user/{}", user.uid));
    let envp_store = agent_env(user, &run_user_dir)?;
    let mut argv: Vec<*const libc::c_char> = argv_store.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = envp_store.iter().map(|c| c.as_ptr()).collect();
    envp.push(std::ptr::null());

    let (pass_fds, max_fd) = checked_pass_fds(o)?;
    let protect_files = protected_files(o)?;
    let view = if root_mode {
        "uid 0: read-only file system except the working directory and spec.writable; private \
         /tmp, /run, /dev; bpffs hidden; own PID namespace"
    } else {
        "private /tmp, /run, /dev/shm; bpffs hidden; own PID namespace"
    };
    let desc = Description {
        user: user.describe(),
        view: view.into(),
        writable: writable_paths.clone(),
    };
    Ok((
        Prepared {
            cgroup_procs: cstr(o.cgroup_dir.join("cgroup.procs"))?,
            root_mode,
            ro_mounts,
            writable,
            bpf_mounts: bpf_mounts.iter().map(cstr).collect::<Result<Vec<_>>>()?,
            bpf_covers,
            resolv,
            run_user_dir: cstr(&run_user_dir)?,
            devices,
            proc_ro,
            proc_masked,
            protect_files,
            var_run_dir: std::fs::symlink_metadata("/var/run")
                .map(|m| m.is_dir())
                .unwrap_or(false),
            landlock_scope: landlock_abi() >= 6,
            landlock_abstract: !o.abstract_by_policy,
            cwd: cstr(&cwd)?,
            uid: user.uid,
            gid: user.gid,
            groups: user.groups.clone(),
            last_cap: last_cap(),
            filter: filter.program.clone(),
            pass_fds,
            max_fd,
            exe: cstr(&exe)?,
            argv,
            envp,
            _argv_store: argv_store,
            _envp_store: envp_store,
        },
        desc,
    ))
}

/// The writable paths, shortest first, and their binds.
fn writable_set(
    o: &Options,
    all: &[MountLine],
    cwd: &Path,
    root_mode: bool,
) -> Result<(Vec<PathBuf>, Vec<Writable>)> {
    // The writable set: the working directory (for uid 0 only if it is
    // safe; for others it matters only under the private /tmp or /run),
    // then spec.writable, parents before children.
    let mut writable_paths: Vec<PathBuf> = Vec::new();
    let homes = home_dirs();
    if root_mode {
        check_writable_for_root(cwd, &homes).map_err(|why| {
            anyhow::anyhow!(
                "--user root: the working directory {} cannot be writable for a uid-0 agent: {why}. \
                 Run from a project directory",
                cwd.display()
            )
        })?;
        writable_paths.push(cwd.to_path_buf());
    } else if under_private(cwd) {
        writable_paths.push(cwd.to_path_buf());
    }
    for w in o.writable {
        let canon =
            std::fs::canonicalize(w).with_context(|| format!("spec.writable: {}", w.display()))?;
        if root_mode {
            check_writable_for_root(&canon, &homes).map_err(|why| {
                anyhow::anyhow!(
                    "spec.writable: {} cannot be writable for a uid-0 agent: {why}",
                    w.display()
                )
            })?;
        }
        if root_mode || under_private(&canon) {
            writable_paths.push(canon);
        }
    }
    writable_paths.sort_by_key(|p| p.as_os_str().len());
    writable_paths.dedup();
    anyhow::ensure!(writable_paths.len() <= 64, "at most 64 writable paths");
    let writable = writable_paths
        .iter()
        .map(|p| writable_entry(p, all))
        .collect::<Result<Vec<_>>>()?;
    Ok((writable_paths, writable))
}

/// The agent's executable, added read-only to `writable` when it lies
/// under a private directory.
fn resolve_command(
    o: &Options,
    all: &[MountLine],
    writable_paths: &[PathBuf],
    writable: &mut Vec<Writable>,
) -> Result<PathBuf> {
    // The command itself stays visible when it lies under a private
    // directory (/tmp, /run, /dev/shm) outside the working directory:
    // bound read-only at its path. (A script passed as an argument is not:
    // keep it in the working directory.)
    let exe = resolve_exe(&o.command[0], std::env::var_os("PATH"))?;
    if let Ok(canon) = std::fs::canonicalize(&exe) {
        if under_private(&canon) && !writable_paths.iter().any(|w| canon.starts_with(w)) {
            let mut e = writable_entry(&canon, all)?;
            e.read_only = true;
            writable.push(e);
        }
    }
    Ok(exe)
}

/// The mount points remounted read-only.
fn read_only_mounts(all: &[MountLine], root_mode: bool) -> Result<Vec<RoMount>> {
    // Read-only mounts: cgroup2 always, everything for uid 0.
    let mut ro_mounts = Vec::new();
    for m in all {
        if root_mode || m.fstype == "cgroup2" {
            ro_mounts.push(RoMount {
                path: cstr(&m.point)?,
                flags: m.flags & !libc::MS_RDONLY,
            });
        }
    }
    ro_mounts.dedup_by(|a, b| a.path == b.path);
    Ok(ro_mounts)
}

/// The bpffs mount points (detached in the view) and the paths an empty
/// tmpfs covers.
fn bpf_mounts_and_covers(all: &[MountLine]) -> Result<(Vec<PathBuf>, Vec<CString>)> {
    let mut bpf_mounts: Vec<PathBuf> = all
        .iter()
        .filter(|m| m.fstype == "bpf")
        .map(|m| m.point.clone())
        .collect();
    bpf_mounts.sort();
    bpf_mounts.dedup();
    let mut covers = bpf_mounts.clone();
    if Path::new("/sys/fs/bpf").is_dir() {
        covers.push("/sys/fs/bpf".into());
    }
    covers.sort();
    covers.dedup();
    let bpf_covers = covers.iter().map(cstr).collect::<Result<Vec<_>>>()?;
    Ok((bpf_mounts, bpf_covers))
}

/// The device nodes of a uid-0 agent's private /dev (none for others).
fn private_devices(root_mode: bool) -> Result<Vec<Device>> {
    let devices = if root_mode {
        [
            ("null", 1, 3),
            ("zero", 1, 5),
            ("full", 1, 7),
            ("random", 1, 8),
            ("urandom", 1, 9),
            ("tty", 5, 0),
        ]
        .iter()
        .map(|(n, ma, mi)| {
            Ok(Device {
                name: cstr(n)?,
                mode: 0o666,
                dev: libc::makedev(*ma, *mi),
            })
        })
        .collect::<Result<Vec<_>>>()?
    } else {
        Vec::new()
    };
    Ok(devices)
}

/// The /proc paths bound read-only and those masked.
fn proc_ro_and_masked() -> Result<(Vec<CString>, Vec<CString>)> {
    let proc_ro = [
        "sys",
        "sysrq-trigger",
        "irq",
        "bus",
        "fs",
        "pressure",
        "acpi",
        "scsi",
    ]
    .iter()
    .map(|p| cstr(format!("/proc/{p}")))
    .collect::<Result<Vec<_>>>()?;
    let proc_masked = [
        "kcore",
        "keys",
        "timer_list",
        "sched_debug",
        "latency_stats",
        "kpageflags",
        "kpagecount",
        "kpagecgroup",
    ]
    .iter()
    .map(|p| cstr(format!("/proc/{p}")))
    .collect::<Result<Vec<_>>>()?;
    Ok((proc_ro, proc_masked))
}

/// The agent's environment: enforcer's, with the agent user's
/// USER/LOGNAME/HOME and a private XDG_RUNTIME_DIR.
fn agent_env(user: &AgentUser, run_user_dir: &Path) -> Result<Vec<CString>> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    let mut set = |k: &str, v: &OsStr| {
        env.retain(|(ek, _)| ek != k);
        env.push((k.into(), v.into()));
    };
    if let Some(name) = &user.name {
        set("USER", name.as_ref());
        set("LOGNAME", name.as_ref());
    }
    if let Some(home) = &user.home {
        set("HOME", home.as_os_str());
    }
    set("XDG_RUNTIME_DIR", run_user_dir.as_os_str());
    env.retain(|(k, _)| k != "DBUS_SESSION_BUS_ADDRESS");
    let envp_store = env
        .iter()
        .map(|(k, v)| {
            let mut s = k.as_bytes().to_vec();
            s.push(b'=');
            s.extend_from_slice(v.as_bytes());
            CString::new(s).context("environment holds a NUL byte")
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(envp_store)
}

/// `--pass-fd`, sorted and checked, and the bound of the one-by-one close
/// fallback (RLIMIT_NOFILE, at most 2^20).
fn checked_pass_fds(o: &Options) -> Result<(Vec<RawFd>, i32)> {
    let mut pass_fds = o.pass_fds.to_vec();
    pass_fds.sort_unstable();
    pass_fds.dedup();
    for &fd in &pass_fds {
        anyhow::ensure!(
            fd > 2,
            "--pass-fd {fd}: stdin, stdout and stderr are always passed"
        );
        // SAFETY: F_GETFD on an integer; no memory involved.
        anyhow::ensure!(
            unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0,
            "--pass-fd {fd}: not an open descriptor of enforcer"
        );
    }
    anyhow::ensure!(pass_fds.len() <= 64, "at most 64 --pass-fd");
    let max_fd = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft.min(1 << 20) as i32)
        .unwrap_or(1 << 16);
    Ok((pass_fds, max_fd))
}

/// enforcer's own files, bound read-only over themselves in the view.
fn protected_files(o: &Options) -> Result<Vec<CString>> {
    // enforcer's own files, if the agent's view holds them at all: the
    // policy, the audit log (the agent must not rewrite its own record),
    // the enforcer binary.
    let mut protect_files = Vec::new();
    let exe_self = std::env::current_exe().ok();
    for f in o.protect.iter().chain(exe_self.iter()) {
        if let Ok(c) = std::fs::canonicalize(f) {
            if c.is_file() {
                protect_files.push(cstr(&c)?);
            }
        }
    }
    Ok(protect_files)
}

/// The started agent: the host pid of its init (wait for it: it exits with
/// the agent's status) and the seccomp listener.
pub struct Spawned {
    pub init_pid: u32,
    pub listener: OwnedFd,
}

/// Clone the init into a new PID and mount namespace; it forks the agent.
/// Returns once the agent has exec'd (or with the stage that failed).
pub fn spawn(p: &Prepared) -> Result<Spawned> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: socketpair into a local array.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context("socketpair");
    }
    // SAFETY: fresh descriptors we own.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // New PID, mount, IPC (SysV objects and POSIX queues of the host are
    // root-owned and uid 0 owns them) and UTS namespaces.
    let flags = (libc::CLONE_NEWPID
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: a fork-like clone (no new stack); the child runs only
    // init_main, which makes raw system calls on `p` and never returns.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("clone(CLONE_NEWPID|CLONE_NEWNS)");
    }
    if pid == 0 {
        // SAFETY: we are the child.
        unsafe { child::init_main(p, theirs.as_raw_fd()) }
    }
    drop(theirs);
    let pid = pid as u32;
    let reap = |e: anyhow::Error| -> anyhow::Error {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
        e
    };
    let mut listener = None;
    loop {
        match recv(&ours, Duration::from_secs(30)) {
            Ok(Msg::Listener(fd)) => listener = Some(fd),
            Ok(Msg::Error(stage, errno)) => {
                let what = child::STAGES
                    .get(stage as usize)
                    .copied()
                    .unwrap_or("starting the agent");
                let err = std::io::Error::from_raw_os_error(errno);
                return Err(reap(anyhow::anyhow!("{what}: {err}")));
            }
            Ok(Msg::Eof) => break,
            Err(e) => return Err(reap(e)),
        }
    }
    let listener = listener.ok_or_else(|| {
        reap(anyhow::anyhow!(
            "the agent ended before it installed its seccomp filter"
        ))
    })?;
    Ok(Spawned {
        init_pid: pid,
        listener,
    })
}

enum Msg {
    Listener(OwnedFd),
    Error(u8, i32),
    Eof,
}

fn recv(sock: &OwnedFd, timeout: Duration) -> Result<Msg> {
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    if n == 0 {
        bail!("the agent did not start within {timeout:?}");
    }
    let mut buf = [0u8; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 8];
    // SAFETY: msghdr over local buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    // SAFETY: as above.
    let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context("reading from the agent");
    }
    if r == 0 {
        return Ok(Msg::Eof);
    }
    match buf[0] {
        child::MSG_ERROR if r >= 6 => Ok(Msg::Error(
            buf[1],
            i32::from_ne_bytes([buf[2], buf[3], buf[4], buf[5]]),
        )),
        child::MSG_LISTENER => {
            // SAFETY: walking the control messages the kernel wrote.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                if !cmsg.is_null()
                    && (*cmsg).cmsg_level == libc::SOL_SOCKET
                    && (*cmsg).cmsg_type == libc::SCM_RIGHTS
                {
                    let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                    return Ok(Msg::Listener(OwnedFd::from_raw_fd(fd)));
                }
            }
            bail!("the agent sent no seccomp listener")
        }
        t => bail!("unexpected message {t} from the agent"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_writable_refuses_system_paths() {
        let homes = vec![PathBuf::from("/home/alice"), PathBuf::from("/root")];
        for bad in [
            "/",
            "/etc",
            "/etc/cron.d",
            "/root",
            "/home",
            "/home/alice",
            "/usr/local",
            "/var",
            "/run/x",
            "/var/lib/docker",
            "/root/.bashrc",
            "/root/.ssh",
            "/home/alice/.config/systemd/user",
            "/var/www",
            "/opt/app/bin",
            "/home/alice/work/.git/hooks",
        ] {
            assert!(
                check_writable_for_root(Path::new(bad), &homes).is_err(),
                "{bad} accepted"
            );
        }
        for ok in [
            "/root/project",
            "/home/alice/work",
            "/tmp/x",
            "/srv/agent/work",
            "/var/tmp/x",
            "/work/repo",
        ] {
            assert!(
                check_writable_for_root(Path::new(ok), &homes).is_ok(),
                "{ok} refused"
            );
        }
    }

    #[test]
    fn user_needs_sudo_or_flag() {
        let none = |_: &str| None;
        let e = resolve_user(None, &none).unwrap_err().to_string();
        assert!(e.contains("--user root"), "{e}");
        let root_sudo = |k: &str| (k == "SUDO_UID").then(|| "0".to_string());
        assert!(resolve_user(None, &root_sudo).is_err());
        let sudo = |k: &str| match k {
            "SUDO_UID" => Some("65534".to_string()),
            "SUDO_GID" => Some("65534".to_string()),
            _ => None,
        };
        let u = resolve_user(None, &sudo).unwrap();
        assert_eq!((u.uid, u.gid), (65534, 65534));
        assert!(!u.is_root());
        let r = resolve_user(Some("root"), &none).unwrap();
        assert!(r.is_root());
        let n = resolve_user(Some("1234:4321"), &none).unwrap();
        assert_eq!((n.uid, n.gid, n.groups.clone()), (1234, 4321, vec![4321]));
    }

    #[test]
    fn mountinfo_escapes_and_flags() {
        assert_eq!(unescape("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(
            mount_flags("rw,nosuid,nodev,noexec,relatime"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RELATIME
        );
    }

    #[test]
    fn filter_compiles_and_describes() {
        let f = seccomp::build().unwrap();
        assert!(f.program.len() > 50, "{} instructions", f.program.len());
        assert_eq!(
            seccomp::describe("socket", &[40, 1, 0, 0, 0, 0]),
            "socket(AF_VSOCK, 1, 0)"
        );
        assert_eq!(
            seccomp::describe("bpf", &[7, 0, 0, 0, 0, 0]),
            "bpf(BPF_OBJ_GET)"
        );
        assert_eq!(
            seccomp::describe("bpf", &[34, 0, 0, 0, 0, 0]),
            "bpf(BPF_LINK_DETACH)"
        );
        assert_eq!(
            seccomp::describe("socket", &[16, 3, 12, 0, 0, 0]),
            "socket(AF_NETLINK, 3, NETLINK_NETFILTER)"
        );
    }
}
