//! The values the programs' globals take on the running kernel: struct
//! member offsets read from its BTF (each one missing said in the log), the
//! task-walk probe, and the node's mount namespace for the exec hold of
//! per-container file rules.
use std::fs;

use aya::EbpfLoader;
use enforcer_common::{globals, FileOffsets, SockOffsets, TaskOffsets, UnixLsmOffsets};

use super::{btf, load::timed, lsm::bpf_lsm_listed};

/// What the programs' globals are set to on this kernel: struct member
/// offsets from the kernel's BTF (0 where it has none: the hooks that need
/// them fail closed or call helpers instead) and the node's mount
/// namespace.
pub(super) struct ProgramGlobals {
    /// The file hooks' offsets.
    pub(super) files: FileOffsets,
    /// `bpf_sock_addr_kern`'s `uaddr` and `uaddrlen` (Linux >= 6.7: the
    /// cgroup unix hooks need them), or why there are none.
    pub(super) sock_addr: std::result::Result<(u32, u32), String>,
    /// The same, (0, 0) where there are none.
    uaddr: (u32, u32),
    pub(super) unix_lsm: UnixLsmOffsets,
    /// The exec hold of per-container file rules.
    hold: [(&'static str, u32); 5],
    task: TaskOffsets,
    sock: SockOffsets,
}

impl ProgramGlobals {
    /// Read the kernel's BTF (once) for every global, each missing one said
    /// in the log.
    pub(super) fn read() -> Self {
        // The kernel's BTF, parsed once (under the VM runner's emulation a
        // parse takes seconds).
        let kbtf = timed("parsing the kernel's BTF", || {
            btf::Btf::from_sys_fs().map_err(|e| e.to_string())
        });
        let files = file_hook_offsets(&kbtf);
        let sock_addr = with_btf(&kbtf, btf::sock_addr_offsets);
        let uaddr = match &sock_addr {
            Ok(o) => *o,
            Err(_) => (0, 0),
        };
        let unix_lsm = unix_lsm_hook_offsets(&kbtf);
        let hold = exec_hold(&kbtf);
        let task = current_task_offsets(&kbtf);
        let sock = socket_hook_offsets(&kbtf);
        Self {
            files,
            sock_addr,
            uaddr,
            unix_lsm,
            hold,
            task,
            sock,
        }
    }

    /// Give `loader` every global.
    pub(super) fn set<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        let (uaddr_off, uaddrlen_off) = (&self.uaddr.0, &self.uaddr.1);
        loader.override_global(globals::SOCK_ADDR_UADDR, uaddr_off, true);
        loader.override_global(globals::SOCK_ADDR_UADDRLEN, uaddrlen_off, true);
        let unix_lsm = &self.unix_lsm;
        for (name, value) in [
            (globals::SOCKET_SK, &unix_lsm.socket_sk),
            (globals::SOCK_CGROUP, &unix_lsm.sock_cgroup),
            (globals::CGROUP_KN, &unix_lsm.cgroup_kn),
            (globals::KN_ID, &unix_lsm.kn_id),
            (globals::KN_PARENT, &unix_lsm.kn_parent),
            (globals::UNIX_SOCK_ADDR, &unix_lsm.unix_sock_addr),
            (globals::UNIX_SOCK_DENTRY, &unix_lsm.unix_sock_dentry),
            (globals::UNIX_ADDRESS_LEN, &unix_lsm.unix_address_len),
            (globals::UNIX_ADDRESS_NAME, &unix_lsm.unix_address_name),
        ] {
            loader.override_global(name, value, true);
        }
        let offsets = &self.files;
        for (name, value) in [
            (globals::FILE_F_INODE, &offsets.file_f_inode),
            (globals::FILE_DENTRY, &offsets.file_dentry),
            (globals::INODE_I_INO, &offsets.inode_i_ino),
            (globals::INODE_I_SB, &offsets.inode_i_sb),
            (globals::SB_S_DEV, &offsets.sb_s_dev),
            (globals::DENTRY_D_PARENT, &offsets.dentry_d_parent),
            (globals::DENTRY_D_INODE, &offsets.dentry_d_inode),
            (globals::VALID, &offsets.valid),
        ] {
            loader.override_global(name, value, true);
        }
        for (name, value) in &self.hold {
            loader.override_global(name, value, true);
        }
        let task = &self.task;
        for (name, value) in globals::TASK.iter().zip([
            &task.task_tgid,
            &task.task_cgroups,
            &task.css_set_dfl_cgrp,
            &task.cgroup_kn,
            &task.kn_id,
            &task.valid,
        ]) {
            loader.override_global(name, value, true);
        }
        let sock = &self.sock;
        for (name, value) in globals::SOCK.iter().zip([
            &sock.socket_sk,
            &sock.sock_family,
            &sock.sock_cgroup,
            &sock.cgroup_kn,
            &sock.kn_id,
            &sock.kn_parent,
            &sock.file_f_inode,
            &sock.file_private_data,
            &sock.inode_i_mode,
            &sock.valid,
        ]) {
            loader.override_global(name, value, true);
        }
    }
}

/// The file hooks read kernel structs at these offsets (constants to
/// the verifier). Without BTF they stay 0 and the hooks fail closed.
fn file_hook_offsets(kbtf: &std::result::Result<btf::Btf, String>) -> FileOffsets {
    match with_btf(kbtf, btf::file_offsets) {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!("no struct offsets for the file hooks (file policy fails closed): {e}");
            FileOffsets::default()
        }
    }
}

/// The BPF LSM unix hooks' offsets (without them the hooks are not attached).
fn unix_lsm_hook_offsets(kbtf: &std::result::Result<btf::Btf, String>) -> UnixLsmOffsets {
    match with_btf(kbtf, btf::unix_lsm_offsets) {
        Ok(o) => o,
        Err(e) => {
            tracing::debug!("no struct offsets for the BPF LSM unix hooks: {e}");
            enforcer_common::UnixLsmOffsets::default()
        }
    }
}

/// The exec hold of per-container file rules: the current task's
/// mount namespace against the host's (pid 1's).
fn exec_hold(kbtf: &std::result::Result<btf::Btf, String>) -> [(&'static str, u32); 5] {
    let (nsproxy, mnt_ns, inum) = match with_btf(kbtf, btf::mnt_ns_offsets) {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!("no struct offsets for a task's mount namespace: programs started in pod containers are not held until their file rules are resolved: {e}");
            (0, 0, 0)
        }
    };
    // The node's mount namespace is taken to be /proc/1's: the node's
    // init, whose namespace the container runtime shares. That holds
    // where the daemon sees the node's PID namespace (hostPID, as
    // deploy/ ships it).
    let host_mnt_ns = match fs::metadata("/proc/1/ns/mnt") {
        Ok(m) => std::os::unix::fs::MetadataExt::ino(&m) as u32,
        // Without BPF LSM there is no exec hold to configure (the
        // capability is reported on its own, loudly): no error for
        // every `enforcer run` on such a host.
        Err(e) if !bpf_lsm_listed() => {
            tracing::debug!("reading /proc/1/ns/mnt: {e} (no BPF LSM: no exec hold)");
            0
        }
        Err(e) => {
            tracing::error!(
                "reading /proc/1/ns/mnt: {e}: every program started in a pod container \
                 with file rules is held until a daemon resolves its container"
            );
            0
        }
    };
    const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;
    if fs::metadata("/proc/1/ns/pid")
        .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) != PROC_PID_INIT_INO)
    {
        tracing::warn!(
            "/proc/1 is not the kernel's first process (this daemon does not see the \
             initial PID namespace): file rules for pods take /proc/1 for the node's init, \
             whose root and mount namespace the container runtime must share; run the \
             daemon with hostPID"
        );
    }
    let i_mode = with_btf(kbtf, |b| b.member_offset("inode", "i_mode")).unwrap_or(0);
    [
        (globals::TASK_NSPROXY, nsproxy),
        (globals::NSPROXY_MNT_NS, mnt_ns),
        (globals::MNT_NS_INUM, inum),
        (globals::HOST_MNT_NS, host_mnt_ns),
        (globals::INODE_I_MODE, i_mode),
    ]
}

/// The current task's cgroup id and process id through the task
/// (one helper call instead of two on every decision); without them
/// the programs call the helpers.
fn current_task_offsets(kbtf: &std::result::Result<btf::Btf, String>) -> TaskOffsets {
    match with_btf(kbtf, btf::task_offsets) {
        Ok(o) => match timed("the task-walk probe", || btf::task_walk_loads(&o)) {
            Ok(()) => o,
            Err(e) => {
                tracing::info!(
                    "cgroup programs cannot read the current task on this kernel (they \
                     call bpf_get_current_cgroup_id instead): {e}"
                );
                enforcer_common::TaskOffsets::default()
            }
        },
        Err(e) => {
            tracing::info!(
                "no struct offsets for reading the current task (the programs call \
                 bpf_get_current_cgroup_id instead): {e}"
            );
            enforcer_common::TaskOffsets::default()
        }
    }
}

/// The socket hooks' offsets (a socket's cgroup); without them the
/// foreign-socket check is off (said in the log).
fn socket_hook_offsets(kbtf: &std::result::Result<btf::Btf, String>) -> SockOffsets {
    match with_btf(kbtf, btf::sock_offsets) {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(
                "no struct offsets for the socket hooks (foreign inet sockets not judged): {e}"
            );
            enforcer_common::SockOffsets::default()
        }
    }
}

/// `f` of the kernel's BTF (or why there is none).
fn with_btf<T>(
    btf: &std::result::Result<btf::Btf, String>,
    f: impl FnOnce(&btf::Btf) -> std::result::Result<T, btf::BtfError>,
) -> std::result::Result<T, String> {
    match btf {
        Ok(b) => f(b).map_err(|e| e.to_string()),
        Err(e) => Err(e.clone()),
    }
}
