//! cgroup v2 plumbing: find the unified mount, create/remove cgroups, ids.
use std::{
    fs,
    io::{self, BufRead},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// The cgroup2 mount point, read from /proc/self/mounts (never hard-coded:
/// `/sys/fs/cgroup` on a unified host, `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let f = fs::File::open("/proc/self/mounts").context("reading /proc/self/mounts")?;
    for line in io::BufReader::new(f).lines() {
        let line = line?;
        let mut it = line.split_whitespace();
        let (_src, Some(dir), Some(fstype)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if fstype == "cgroup2" {
            return Ok(PathBuf::from(unescape_mount_path(dir)));
        }
    }
    bail!(
        "no cgroup2 filesystem is mounted (see /proc/self/mounts); enforcer needs the unified \
         cgroup hierarchy: mount it with `mount -t cgroup2 none /sys/fs/cgroup/unified` or boot \
         with systemd.unified_cgroup_hierarchy=1"
    )
}

fn unescape_mount_path(s: &str) -> String {
    // /proc/mounts escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x"), 8)
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every mount point of a cgroup2 filesystem (the same hierarchy can be
/// mounted in several places).
pub fn cgroup2_mounts() -> Result<Vec<PathBuf>> {
    let text = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (_, dir, fstype) = (it.next()?, it.next()?, it.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
        })
        .collect())
}

/// The cgroup id of a cgroup2 directory: the kernfs inode number, which is
/// what `bpf_get_current_cgroup_id()` returns in the kernel.
pub fn cgroup_id(dir: &Path) -> Result<u64> {
    Ok(fs::metadata(dir)
        .with_context(|| format!("stat {}", dir.display()))?
        .ino())
}

/// A cgroup created for one `enforcer run`; removed on drop (after its
/// processes are killed).
pub struct OwnedCgroup {
    pub path: PathBuf,
    pub id: u64,
}

impl OwnedCgroup {
    pub fn create(parent: &Path, name: &str) -> Result<Self> {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        let path = parent.join(name);
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        let id = cgroup_id(&path)?;
        Ok(Self { path, id })
    }

    /// Take ownership of an existing cgroup (it is removed on drop).
    pub fn adopt(path: PathBuf) -> Self {
        let id = cgroup_id(&path).unwrap_or(0);
        Self { path, id }
    }

    pub fn procs(&self) -> Vec<u32> {
        pids_in_tree(&self.path)
    }

    /// Kill every process in the cgroup tree and wait (bounded) for it to empty.
    pub fn kill_all(&self, timeout: Duration) {
        let kill = self.path.join("cgroup.kill");
        if kill.exists() {
            let _ = fs::write(&kill, "1");
        } else {
            for pid in self.procs() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let deadline = Instant::now() + timeout;
        while !self.procs().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn remove_tree(dir: &Path) -> io::Result<()> {
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    let _ = Self::remove_tree(&e.path());
                }
            }
        }
        fs::remove_dir(dir)
    }
}

impl Drop for OwnedCgroup {
    fn drop(&mut self) {
        self.kill_all(Duration::from_secs(2));
        // rmdir can race with the last exiting task; retry briefly.
        for _ in 0..50 {
            match Self::remove_tree(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        tracing::warn!(cgroup = %self.path.display(), "could not remove cgroup");
    }
}

/// Every pid in a cgroup and its descendants.
pub fn pids_in_tree(dir: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(s) = fs::read_to_string(dir.join("cgroup.procs")) {
        // 0: a process outside this process's PID namespace (never to be
        // signalled: kill(0, ..) is our own process group).
        out.extend(
            s.lines()
                .filter_map(|l| l.trim().parse::<u32>().ok())
                .filter(|&p| p != 0),
        );
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(pids_in_tree(&e.path()));
            }
        }
    }
    out
}

/// CAP_NET_RAW (bit 13) in the effective or permitted set of a process.
pub fn holds_net_raw(pid: u32) -> bool {
    const CAP_NET_RAW: u32 = 13;
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status.lines().any(|l| {
        let Some(hex) = l
            .strip_prefix("CapEff:")
            .or_else(|| l.strip_prefix("CapPrm:"))
        else {
            return false;
        };
        u64::from_str_radix(hex.trim(), 16)
            .map(|caps| caps & (1 << CAP_NET_RAW) != 0)
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_root_test_process_holds_net_raw_iff_capable() {
        let expect = caps_has_net_raw();
        assert_eq!(holds_net_raw(std::process::id()), expect);
        assert!(!holds_net_raw(u32::MAX), "no such process");
    }

    fn caps_has_net_raw() -> bool {
        let s = fs::read_to_string("/proc/self/status").unwrap();
        let eff = s.lines().find(|l| l.starts_with("CapEff:")).unwrap();
        u64::from_str_radix(eff[7..].trim(), 16).unwrap() & (1 << 13) != 0
    }

    #[test]
    fn unescapes_octal_mount_paths() {
        assert_eq!(unescape_mount_path("/a\\040b"), "/a b");
        assert_eq!(unescape_mount_path("/sys/fs/cgroup"), "/sys/fs/cgroup");
    }
}
