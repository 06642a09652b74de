//! The forked side of `enforcer run`: an init process (PID 1 of the agent's
//! new PID namespace) that builds the agent's mount view, and the agent it
//! forks and execs.
//!
//! Everything here runs after `clone()` of a multi-threaded process, so it
//! makes raw system calls only, on memory prepared before the clone
//! ([`Prepared`]): no allocation, no locks, no logging. A failure is sent
//! to the parent as (stage, errno) over the channel socket, then the
//! process exits.
use std::ffi::CString;

use libc::{c_char, c_int, c_ulong, c_void};

/// A mount point made read-only (with the flags it has, which a bind
/// remount would otherwise clear).
pub struct RoMount {
    pub path: CString,
    pub flags: c_ulong,
}

/// A path the agent may write (its working directory, `spec.writable`),
/// bound at its own path in the new view and made writable.
pub struct Writable {
    pub path: CString,
    /// Directories to create first (when the path lies under the private
    /// /tmp or /run), outermost first.
    pub parents: Vec<CString>,
    pub is_dir: bool,
    pub flags: c_ulong,
    /// The path is under the private /tmp or /run: it must be reached
    /// before those are covered (an O_PATH fd opened in the new namespace).
    pub under_private: bool,
    /// Bound read-only (the command's own executable under a private dir).
    pub read_only: bool,
}

pub struct Device {
    pub name: CString,
    pub mode: libc::mode_t,
    pub dev: libc::dev_t,
}

/// Everything the child needs, built by the parent.
pub struct Prepared {
    pub cgroup_procs: CString,
    pub root_mode: bool,
    pub ro_mounts: Vec<RoMount>,
    pub writable: Vec<Writable>,
    /// bpffs mount points, parents before children.
    pub bpf_mounts: Vec<CString>,
    pub bpf_covers: Vec<CString>,
    /// `/etc/resolv.conf`'s target when it lies under /run (systemd-resolved).
    pub resolv: Option<Writable>,
    pub run_user_dir: CString,
    pub devices: Vec<Device>,
    pub proc_ro: Vec<CString>,
    pub proc_masked: Vec<CString>,
    /// Files enforcer reads or writes (policy, audit log, its binary) that
    /// lie in the agent's view: bound read-only over themselves.
    pub protect_files: Vec<CString>,
    /// /var/run is a directory of its own (not the usual symlink to /run).
    pub var_run_dir: bool,
    /// The kernel's Landlock ABI has scopes (6.12+): the agent may not
    /// connect to abstract unix sockets nor signal processes outside.
    pub landlock_scope: bool,
    /// With `landlock_scope`: also scope abstract unix sockets. Off when the
    /// policy's `spec.local` lists abstract names and the cgroup unix hooks
    /// judge them (Landlock would refuse every abstract socket outside).
    pub landlock_abstract: bool,
    pub cwd: CString,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<libc::gid_t>,
    pub last_cap: u32,
    pub filter: Vec<libc::sock_filter>,
    /// Descriptors kept open for the agent (`--pass-fd`), sorted.
    pub pass_fds: Vec<c_int>,
    pub max_fd: c_int,
    pub exe: CString,
    pub argv: Vec<*const c_char>,
    pub envp: Vec<*const c_char>,
    // Keep the strings argv/envp point into alive.
    pub _argv_store: Vec<CString>,
    pub _envp_store: Vec<CString>,
}

/// Stages, for error messages (index = code sent by the child).
pub const STAGES: &[&str] = &[
    "joining the agent cgroup",
    "making the mount namespace private",
    "making mounts read-only",
    "opening a writable path",
    "mounting the private /tmp, /run and /dev/shm",
    "binding a writable path",
    "hiding bpffs",
    "building the private /dev",
    "mounting /proc for the agent's PID namespace",
    "protecting /proc",
    "entering the working directory",
    "creating the cgroup namespace",
    "starting a new session",
    "forking the agent",
    "resetting signals",
    "dropping capabilities",
    "switching user",
    "setting no_new_privs",
    "installing the seccomp filter",
    "handing over the seccomp listener",
    "closing inherited descriptors",
    "executing the agent",
    "setting the parent-death signal",
    "scoping abstract unix sockets and signals (Landlock)",
];
const S_CGROUP: u8 = 0;
const S_PRIVATE: u8 = 1;
const S_RO: u8 = 2;
const S_OPEN_WRITABLE: u8 = 3;
const S_TMP: u8 = 4;
const S_BIND: u8 = 5;
const S_BPFFS: u8 = 6;
const S_DEV: u8 = 7;
const S_PROC: u8 = 8;
const S_PROC_RO: u8 = 9;
const S_CWD: u8 = 10;
const S_CGROUPNS: u8 = 11;
const S_SETSID: u8 = 12;
const S_FORK: u8 = 13;
const S_SIGNALS: u8 = 14;
const S_CAPS: u8 = 15;
const S_USER: u8 = 16;
const S_NNP: u8 = 17;
const S_SECCOMP: u8 = 18;
const S_LISTENER: u8 = 19;
const S_FDS: u8 = 20;
const S_EXEC: u8 = 21;
const S_PDEATH: u8 = 22;
const S_LANDLOCK: u8 = 23;

/// Message tags on the channel.
pub const MSG_ERROR: u8 = b'E';
pub const MSG_LISTENER: u8 = b'L';

const MAX_WRITABLE: usize = 64;

unsafe fn errno() -> c_int {
    *libc::__errno_location()
}

unsafe fn fail(chan: c_int, stage: u8, err: c_int) -> ! {
    let mut msg = [0u8; 6];
    msg[0] = MSG_ERROR;
    msg[1] = stage;
    msg[2..6].copy_from_slice(&err.to_ne_bytes());
    libc::send(chan, msg.as_ptr().cast(), msg.len(), libc::MSG_NOSIGNAL);
    libc::_exit(127);
}

/// `r < 0` -> report and exit.
unsafe fn check(chan: c_int, stage: u8, r: c_int) {
    if r < 0 {
        fail(chan, stage, errno());
    }
}

/// `r < 0` with an errno other than those tolerated -> report and exit.
unsafe fn check_or(chan: c_int, stage: u8, r: c_int, tolerated: &[c_int]) {
    if r < 0 {
        let e = errno();
        if !tolerated.contains(&e) {
            fail(chan, stage, e);
        }
    }
}

unsafe fn mount(
    src: *const c_char,
    dst: *const c_char,
    fs: *const c_char,
    flags: c_ulong,
    data: *const c_char,
) -> c_int {
    libc::mount(src, dst, fs, flags, data as *const c_void)
}

/// "/proc/self/fd/<fd>" into `buf` (NUL-terminated), no allocation.
fn fd_path(buf: &mut [u8; 32], fd: c_int) -> *const c_char {
    let prefix = b"/proc/self/fd/";
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 12];
    let mut n = fd as u32;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[prefix.len() + i] = digits[len - 1 - i];
    }
    buf[prefix.len() + len] = 0;
    buf.as_ptr().cast()
}

const NULLP: *const c_char = std::ptr::null();

/// Bind `fd`'s file at `w.path` (creating it in a fresh tmpfs when needed)
/// and give the bind the flags `w.flags` (without MS_RDONLY unless `ro`).
unsafe fn bind_at(chan: c_int, w: &Writable, fd: c_int, ro: bool) {
    for p in &w.parents {
        check_or(
            chan,
            S_BIND,
            libc::mkdir(p.as_ptr(), 0o755),
            &[libc::EEXIST],
        );
    }
    if w.is_dir {
        check_or(
            chan,
            S_BIND,
            libc::mkdir(w.path.as_ptr(), 0o755),
            &[libc::EEXIST],
        );
    } else {
        let f = libc::open(
            w.path.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC,
            0o644,
        );
        if f < 0 && errno() != libc::EEXIST && errno() != libc::EROFS {
            fail(chan, S_BIND, errno());
        }
        if f >= 0 {
            libc::close(f);
        }
    }
    let mut buf = [0u8; 32];
    let src = fd_path(&mut buf, fd);
    check(
        chan,
        S_BIND,
        mount(
            src,
            w.path.as_ptr(),
            NULLP,
            libc::MS_BIND | libc::MS_REC,
            NULLP,
        ),
    );
    let rdonly = if ro { libc::MS_RDONLY } else { 0 };
    check(
        chan,
        S_BIND,
        mount(
            NULLP,
            w.path.as_ptr(),
            NULLP,
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV | rdonly | w.flags,
            NULLP,
        ),
    );
}

unsafe fn tmpfs(
    chan: c_int,
    stage: u8,
    at: &std::ffi::CStr,
    flags: c_ulong,
    opts: &std::ffi::CStr,
) {
    check(
        chan,
        stage,
        mount(
            c"tmpfs".as_ptr(),
            at.as_ptr(),
            c"tmpfs".as_ptr(),
            flags,
            opts.as_ptr(),
        ),
    );
}

/// Bind `path` onto itself read-only (ENOENT tolerated).
unsafe fn bind_ro(chan: c_int, stage: u8, path: &CString) {
    let r = mount(
        path.as_ptr(),
        path.as_ptr(),
        NULLP,
        libc::MS_BIND | libc::MS_REC,
        NULLP,
    );
    if r < 0 {
        check_or(chan, stage, r, &[libc::ENOENT]);
        return;
    }
    check(
        chan,
        stage,
        mount(
            NULLP,
            path.as_ptr(),
            NULLP,
            libc::MS_REMOUNT
                | libc::MS_BIND
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | libc::MS_NOEXEC,
            NULLP,
        ),
    );
}

/// The init process: PID 1 of the new PID namespace, in a new mount
/// namespace. Never returns.
///
/// # Safety
/// Only in the child of `clone(CLONE_NEWPID|CLONE_NEWNS)`.
pub unsafe fn init_main(p: &Prepared, chan: c_int) -> ! {
    libc::prctl(libc::PR_SET_NAME, c"enforcer-init".as_ptr(), 0, 0, 0);
    let mut all: libc::sigset_t = std::mem::zeroed();
    libc::sigfillset(&mut all);
    libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
    check(
        chan,
        S_PDEATH,
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0),
    );

    join_cgroup(p, chan);
    make_mounts_private(chan);
    make_mounts_read_only(p, chan);
    let (wfds, resolv_fd) = open_private_writables(p, chan);
    mount_private_tmp_run(p, chan, resolv_fd);
    mount_private_dev(p, chan);
    bind_writables(p, chan, &wfds);
    protect_own_files(p, chan);
    hide_bpffs(p, chan);
    mount_proc(p, chan);
    enter_cwd_cgroupns_and_session(p, chan);

    let agent = libc::syscall(
        libc::SYS_clone,
        libc::SIGCHLD as c_ulong,
        0usize,
        0usize,
        0usize,
        0usize,
    );
    if agent < 0 {
        fail(chan, S_FORK, errno());
    }
    if agent == 0 {
        agent_main(p, chan);
    }
    let agent = agent as libc::pid_t;

    drop_init_privileges(p, chan);
    reap_and_forward_signals(agent, &all)
}

/// Step 1 of [`init_main`].
unsafe fn join_cgroup(p: &Prepared, chan: c_int) {
    // 1. Join the agent cgroup ("0": the writing process).
    let fd = libc::open(p.cgroup_procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
    check(chan, S_CGROUP, fd);
    let w = libc::write(fd, b"0".as_ptr().cast(), 1);
    libc::close(fd);
    check(chan, S_CGROUP, w as c_int);
}

/// Step 2 of [`init_main`].
unsafe fn make_mounts_private(chan: c_int) {
    // 2. Nothing propagates between this view and the host's (a bpffs
    //    mounted on the host later must not appear here).
    check(
        chan,
        S_PRIVATE,
        mount(
            NULLP,
            c"/".as_ptr(),
            NULLP,
            libc::MS_REC | libc::MS_PRIVATE,
            NULLP,
        ),
    );
}

/// Step 3 of [`init_main`].
unsafe fn make_mounts_read_only(p: &Prepared, chan: c_int) {
    // 3. Read-only: every cgroup2 mount (no cgroup.procs write moves the
    //    agent out), and for a uid-0 agent every mount.
    for m in &p.ro_mounts {
        check_or(
            chan,
            S_RO,
            mount(
                NULLP,
                m.path.as_ptr(),
                NULLP,
                // nosuid, nodev: no device node or set-uid file on any
                // mount opens a way around the read-only view.
                libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | m.flags,
                NULLP,
            ),
            // Gone, or shadowed by a later mount (then unreachable).
            &[libc::ENOENT, libc::EINVAL],
        );
    }
}

/// Step 4 of [`init_main`]: the O_PATH descriptors of the writable paths
/// under /tmp or /run (-1 for the others) and of resolv.conf's target (-1
/// when there is none or it cannot be opened).
unsafe fn open_private_writables(p: &Prepared, chan: c_int) -> ([c_int; MAX_WRITABLE], c_int) {
    // 4. Writable paths under /tmp or /run must be opened before those are
    //    covered; the others are opened after, at their final place.
    let mut wfds = [-1 as c_int; MAX_WRITABLE];
    for (i, w) in p.writable.iter().enumerate().take(MAX_WRITABLE) {
        if w.under_private {
            wfds[i] = libc::open(w.path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
            check(chan, S_OPEN_WRITABLE, wfds[i]);
        }
    }
    let mut resolv_fd = -1;
    if let Some(r) = &p.resolv {
        resolv_fd = libc::open(r.path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
    }
    (wfds, resolv_fd)
}

/// Step 5 of [`init_main`]; binds resolv.conf's target from `resolv_fd`
/// and closes it.
unsafe fn mount_private_tmp_run(p: &Prepared, chan: c_int, resolv_fd: c_int) {
    // 5. A private /tmp, /run and /dev/shm: no unix socket of a host or
    //    user service (tmux, X11, D-Bus, systemd, docker, ssh-agent,
    //    resolved's varlink) is reachable through them.
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    tmpfs(chan, S_TMP, c"/tmp", nosuid_nodev, c"mode=1777");
    tmpfs(chan, S_TMP, c"/run", nosuid_nodev, c"mode=755");
    if p.var_run_dir {
        tmpfs(chan, S_TMP, c"/var/run", nosuid_nodev, c"mode=755");
    }
    check_or(
        chan,
        S_TMP,
        libc::mkdir(c"/run/user".as_ptr(), 0o755),
        &[libc::EEXIST],
    );
    check_or(
        chan,
        S_TMP,
        libc::mkdir(p.run_user_dir.as_ptr(), 0o700),
        &[libc::EEXIST],
    );
    check(
        chan,
        S_TMP,
        libc::chown(p.run_user_dir.as_ptr(), p.uid, p.gid),
    );
    if let Some(r) = &p.resolv {
        if resolv_fd >= 0 {
            bind_at(chan, r, resolv_fd, true);
            libc::close(resolv_fd);
        }
    }
}

/// Step 6 of [`init_main`].
unsafe fn mount_private_dev(p: &Prepared, chan: c_int) {
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    // 6. The private /dev of a uid-0 agent (block devices, /dev/kmsg,
    //    /dev/mem... stay out of reach); /dev/shm for everyone.
    if p.root_mode {
        tmpfs(
            chan,
            S_DEV,
            c"/dev",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            c"mode=755",
        );
        for d in &p.devices {
            let mut path = [0u8; 64];
            let prefix = b"/dev/";
            let name = d.name.as_bytes();
            if prefix.len() + name.len() + 1 > path.len() {
                continue;
            }
            path[..prefix.len()].copy_from_slice(prefix);
            path[prefix.len()..prefix.len() + name.len()].copy_from_slice(name);
            let pp: *const c_char = path.as_ptr().cast();
            check(chan, S_DEV, libc::mknod(pp, libc::S_IFCHR | d.mode, d.dev));
            // mknod applies the umask.
            check(chan, S_DEV, libc::chmod(pp, d.mode));
        }
        check(chan, S_DEV, libc::mkdir(c"/dev/pts".as_ptr(), 0o755));
        check(chan, S_DEV, libc::mkdir(c"/dev/shm".as_ptr(), 0o1777));
        check(
            chan,
            S_DEV,
            mount(
                c"devpts".as_ptr(),
                c"/dev/pts".as_ptr(),
                c"devpts".as_ptr(),
                libc::MS_NOSUID | libc::MS_NOEXEC,
                c"newinstance,ptmxmode=0666,mode=0620".as_ptr(),
            ),
        );
        for (target, link) in [
            (c"pts/ptmx", c"/dev/ptmx"),
            (c"/proc/self/fd", c"/dev/fd"),
            (c"/proc/self/fd/0", c"/dev/stdin"),
            (c"/proc/self/fd/1", c"/dev/stdout"),
            (c"/proc/self/fd/2", c"/dev/stderr"),
        ] {
            check(chan, S_DEV, libc::symlink(target.as_ptr(), link.as_ptr()));
        }
    }
    tmpfs(chan, S_TMP, c"/dev/shm", nosuid_nodev, c"mode=1777");
    if p.root_mode {
        check(
            chan,
            S_DEV,
            mount(
                NULLP,
                c"/dev".as_ptr(),
                NULLP,
                libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NOEXEC,
                NULLP,
            ),
        );
    }
}

/// Step 7 of [`init_main`]: `wfds` from [`open_private_writables`]; every
/// descriptor is closed after its bind.
unsafe fn bind_writables(p: &Prepared, chan: c_int, wfds: &[c_int; MAX_WRITABLE]) {
    // 7. Writable paths (working directory, spec.writable), each its own
    //    writable bind at its own path.
    for (i, w) in p.writable.iter().enumerate().take(MAX_WRITABLE) {
        let fd = if w.under_private {
            wfds[i]
        } else {
            let f = libc::open(w.path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
            check(chan, S_OPEN_WRITABLE, f);
            f
        };
        bind_at(chan, w, fd, w.read_only);
        libc::close(fd);
    }
}

/// Step 7b of [`init_main`].
unsafe fn protect_own_files(p: &Prepared, chan: c_int) {
    // 7b. enforcer's own files in the view: read-only.
    for f in &p.protect_files {
        bind_ro(chan, S_BIND, f);
    }
}

/// Step 8 of [`init_main`].
unsafe fn hide_bpffs(p: &Prepared, chan: c_int) {
    // 8. No bpffs: every bpffs mount is detached from this namespace (the
    //    pins stay in the host's), then an empty read-only tmpfs covers
    //    each of their mount points and /sys/fs/bpf.
    for m in p.bpf_mounts.iter().rev() {
        check_or(
            chan,
            S_BPFFS,
            libc::umount2(m.as_ptr(), libc::MNT_DETACH),
            &[libc::ENOENT, libc::EINVAL],
        );
    }
    for c in &p.bpf_covers {
        check_or(
            chan,
            S_BPFFS,
            mount(
                c"tmpfs".as_ptr(),
                c.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"size=4k,mode=755".as_ptr(),
            ),
            &[libc::ENOENT],
        );
    }
}

/// Step 9 of [`init_main`].
unsafe fn mount_proc(p: &Prepared, chan: c_int) {
    // 9. /proc of the new PID namespace: the agent sees its own processes
    //    only. /proc/sys, /proc/sysrq-trigger, ... read-only (uid 0 writes
    //    core_pattern or sysrq without any capability); kcore, keys, ...
    //    masked.
    check(
        chan,
        S_PROC,
        mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            NULLP,
        ),
    );
    for path in &p.proc_ro {
        bind_ro(chan, S_PROC_RO, path);
    }
    for path in &p.proc_masked {
        check_or(
            chan,
            S_PROC_RO,
            mount(
                c"/dev/null".as_ptr(),
                path.as_ptr(),
                NULLP,
                libc::MS_BIND,
                NULLP,
            ),
            &[libc::ENOENT],
        );
    }
}

/// Steps 10-12 of [`init_main`].
unsafe fn enter_cwd_cgroupns_and_session(p: &Prepared, chan: c_int) {
    // 10. Enter the working directory again: the old reference points at
    //     the mount below the new binds (and, under /tmp, at the host's /tmp).
    check(chan, S_CWD, libc::chdir(p.cwd.as_ptr()));
    // 11. A cgroup namespace rooted at the agent cgroup.
    check(chan, S_CGROUPNS, libc::unshare(libc::CLONE_NEWCGROUP));
    // 12. A session of its own: kill(0, ...) and the terminal's process
    //     group signals reach this namespace only, never enforcer; TIOCSTI
    //     needs the controlling terminal, which it no longer has.
    check(chan, S_SETSID, libc::setsid());
}

/// Init after the agent's fork: closes the channel and every other
/// descriptor, then drops to CAP_KILL.
unsafe fn drop_init_privileges(p: &Prepared, chan: c_int) {
    // Init keeps only CAP_KILL (to forward signals to an agent of another
    // uid) and is not dumpable: the agent can neither ptrace nor read it.
    libc::close(chan);
    libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
    libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    for cap in 0..=p.last_cap {
        libc::prctl(libc::PR_CAPBSET_DROP, cap as c_ulong, 0, 0, 0);
    }
    const CAP_KILL: u32 = 5;
    set_caps(1 << CAP_KILL);
}

/// Init's life once the agent runs: `all` is the full mask init blocked.
unsafe fn reap_and_forward_signals(agent: libc::pid_t, all: &libc::sigset_t) -> ! {
    // Reap every child; forward signals to the agent; exit with its status.
    loop {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let sig = libc::sigwaitinfo(all, &mut info);
        if sig < 0 {
            continue;
        }
        if sig == libc::SIGCHLD {
            loop {
                let mut st: c_int = 0;
                let r = libc::waitpid(-1, &mut st, libc::WNOHANG);
                if r <= 0 {
                    break;
                }
                if r == agent {
                    let code = if libc::WIFEXITED(st) {
                        libc::WEXITSTATUS(st)
                    } else if libc::WIFSIGNALED(st) {
                        128 + libc::WTERMSIG(st)
                    } else {
                        continue;
                    };
                    // Leaving kills every other process of the namespace.
                    libc::_exit(code);
                }
            }
            continue;
        }
        // Kernel-generated signals (terminal) already reached the agent's
        // process group; the rest (enforcer forwarding SIGTERM, ...) go on.
        if info.si_code != libc::SI_KERNEL {
            libc::kill(agent, sig);
        }
    }
}

unsafe fn set_caps(mask: u32) -> c_int {
    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let hdr = CapHeader {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [
        CapData {
            effective: mask,
            permitted: mask,
            inheritable: 0,
        },
        CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        },
    ];
    libc::syscall(libc::SYS_capset, &hdr as *const CapHeader, data.as_ptr()) as c_int
}

/// The agent: PID 2 of the namespace. Drops everything, installs the
/// filter, closes inherited descriptors and execs.
unsafe fn agent_main(p: &Prepared, chan: c_int) -> ! {
    // Default dispositions (enforcer ignores SIGPIPE) and an empty mask.
    for sig in 1..32 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    let mut none: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut none);
    check(
        chan,
        S_SIGNALS,
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()),
    );
    // uid 0 gains no capabilities from exec; locked. Empty bounding and
    // ambient sets.
    const SECBIT_NOROOT: c_ulong = 1 << 0;
    const SECBIT_NOROOT_LOCKED: c_ulong = 1 << 1;
    check(
        chan,
        S_CAPS,
        libc::prctl(
            libc::PR_SET_SECUREBITS,
            SECBIT_NOROOT | SECBIT_NOROOT_LOCKED,
            0,
            0,
            0,
        ),
    );
    for cap in 0..=p.last_cap {
        check(
            chan,
            S_CAPS,
            libc::prctl(libc::PR_CAPBSET_DROP, cap as c_ulong, 0, 0, 0),
        );
    }
    check(
        chan,
        S_CAPS,
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as c_ulong,
            0,
            0,
            0,
        ),
    );
    // Raw system calls: glibc's setresuid/setgroups broadcast the change
    // to every thread it knows of (the parent's, after this clone) under a
    // lock another parent thread may have held: a deadlock.
    check(
        chan,
        S_USER,
        libc::syscall(libc::SYS_setgroups, p.groups.len(), p.groups.as_ptr()) as c_int,
    );
    check(
        chan,
        S_USER,
        libc::syscall(libc::SYS_setresgid, p.gid, p.gid, p.gid) as c_int,
    );
    check(
        chan,
        S_USER,
        libc::syscall(libc::SYS_setresuid, p.uid, p.uid, p.uid) as c_int,
    );
    // A credential change clears the parent-death signal: set it now.
    check(
        chan,
        S_PDEATH,
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0),
    );
    if libc::getppid() != 1 {
        libc::_exit(127);
    }
    check(chan, S_CAPS, set_caps(0));
    check(
        chan,
        S_NNP,
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
    );
    // No core dump: a pipe core_pattern hands it to a root helper.
    let core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    check(chan, S_CAPS, libc::setrlimit(libc::RLIMIT_CORE, &core));
    if p.landlock_scope {
        // struct landlock_ruleset_attr { handled_access_fs, handled_access_net, scoped }
        const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1;
        const SCOPE_SIGNAL: u64 = 2;
        let scoped = if p.landlock_abstract {
            SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        } else {
            SCOPE_SIGNAL
        };
        let attr: [u64; 3] = [0, 0, scoped];
        let fd = libc::syscall(
            libc::SYS_landlock_create_ruleset,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
            0u32,
        );
        if fd < 0 {
            fail(chan, S_LANDLOCK, errno());
        }
        let r = libc::syscall(libc::SYS_landlock_restrict_self, fd as c_int, 0u32);
        libc::close(fd as c_int);
        check(chan, S_LANDLOCK, r as c_int);
    }
    // The filter; its listener goes to enforcer.
    let prog = libc::sock_fprog {
        len: p.filter.len() as u16,
        filter: p.filter.as_ptr() as *mut libc::sock_filter,
    };
    const SECCOMP_SET_MODE_FILTER: c_ulong = 1;
    const SECCOMP_FILTER_FLAG_NEW_LISTENER: c_ulong = 1 << 3;
    let listener = libc::syscall(
        libc::SYS_seccomp,
        SECCOMP_SET_MODE_FILTER,
        SECCOMP_FILTER_FLAG_NEW_LISTENER,
        &prog as *const libc::sock_fprog,
    );
    if listener < 0 {
        fail(chan, S_SECCOMP, errno());
    }
    send_fd(chan, listener as c_int);
    libc::close(listener as c_int);
    // Close every inherited descriptor but stdio, --pass-fd and the
    // channel (close-on-exec: it reports an exec failure).
    let mut keep = [0 as c_int; 66];
    let mut n = 0;
    for &f in p.pass_fds.iter().take(64) {
        keep[n] = f;
        n += 1;
    }
    keep[n] = chan;
    n += 1;
    keep[..n].sort_unstable();
    let mut from: c_int = 3;
    for &k in &keep[..n] {
        if k >= from {
            close_range(chan, from, k - 1, p.max_fd);
            from = k + 1;
        }
    }
    close_range(chan, from, c_int::MAX, p.max_fd);
    for &f in &p.pass_fds {
        check(chan, S_FDS, libc::fcntl(f, libc::F_SETFD, 0));
    }
    libc::execve(p.exe.as_ptr(), p.argv.as_ptr(), p.envp.as_ptr());
    fail(chan, S_EXEC, errno());
}

/// close_range(2) (5.9+), else one close() per descriptor.
unsafe fn close_range(chan: c_int, from: c_int, to: c_int, max_fd: c_int) {
    if from > to {
        return;
    }
    let r = libc::syscall(libc::SYS_close_range, from as u32, to as u32, 0u32);
    if r == 0 {
        return;
    }
    if errno() != libc::ENOSYS {
        fail(chan, S_FDS, errno());
    }
    let mut fd = from;
    while fd <= to && fd < max_fd {
        libc::close(fd);
        fd += 1;
    }
}

unsafe fn send_fd(chan: c_int, fd: c_int) {
    let mut tag = [MSG_LISTENER];
    let mut iov = libc::iovec {
        iov_base: tag.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // CMSG_SPACE(sizeof(int)) is 24 on 64-bit; 64 bytes is ample.
    let mut cbuf = [0u64; 8];
    let mut msg: libc::msghdr = std::mem::zeroed();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<c_int>() as u32) as _;
    let cmsg = libc::CMSG_FIRSTHDR(&msg);
    (*cmsg).cmsg_level = libc::SOL_SOCKET;
    (*cmsg).cmsg_type = libc::SCM_RIGHTS;
    (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<c_int>() as u32) as _;
    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<c_int>(), fd);
    if libc::sendmsg(chan, &msg, libc::MSG_NOSIGNAL) < 0 {
        fail(chan, S_LISTENER, errno());
    }
}
