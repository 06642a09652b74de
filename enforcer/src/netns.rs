//! Network namespaces of bound processes, and running code inside one.
//!
//! The kernel steers a bound process's DNS to `127.0.0.1:<dns_port>` *in the
//! caller's network namespace*. When that is not the daemon's own (a
//! Kubernetes pod, the daemon being a DaemonSet pod), the DNS proxy needs
//! listeners inside the pod's namespace (see `dns::proxy`). This module
//! names a namespace ([`NetnsId`]: the nsfs device and inode, what
//! `/proc/<pid>/ns/net` points to), holds one open ([`Netns`]: an owned fd,
//! closed on drop) and runs a closure inside it on a short-lived dedicated
//! OS thread ([`Netns::run`]): the thread enters the namespace with
//! `setns(CLONE_NEWNET)`, runs the closure (bind the proxy's listeners: a
//! socket belongs to the namespace it was created in, whichever thread uses
//! it later) and exits. It never returns to a thread pool, so no tokio worker
//! ever runs in another namespace. Only listeners are made there: the
//! proxy's upstream traffic never leaves from a workload's namespace (its
//! routes and addresses are the workload's to choose; see `dns::proxy`).
use std::{
    fmt,
    fs::File,
    io,
    os::{
        fd::{AsFd, OwnedFd},
        unix::fs::MetadataExt,
    },
};

use nix::sched::{setns, CloneFlags};

/// A network namespace: (device, inode) of its nsfs file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl fmt::Display for NetnsId {
    /// `net:[4026532281]`, as `readlink /proc/<pid>/ns/net` prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "net:[{}]", self.ino)
    }
}

impl NetnsId {
    /// The namespace of process `pid` (`stat`, no fd kept).
    pub fn of_pid(pid: u32) -> io::Result<Self> {
        Self::of_path(&format!("/proc/{pid}/ns/net"))
    }

    /// The daemon's own namespace (its main thread's).
    pub fn own() -> io::Result<Self> {
        Self::of_path("/proc/self/ns/net")
    }

    fn of_path(p: &str) -> io::Result<Self> {
        let m = std::fs::metadata(p)?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// An open network namespace. The fd is closed when this is dropped.
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    pub id: NetnsId,
}

impl Netns {
    /// Open the namespace of `pid`; its id is taken from the open fd, so it
    /// is the namespace actually held even if the process changed since.
    pub fn open_pid(pid: u32) -> io::Result<Self> {
        let f = File::open(format!("/proc/{pid}/ns/net"))?;
        let m = f.metadata()?;
        Ok(Self {
            id: NetnsId {
                dev: m.dev(),
                ino: m.ino(),
            },
            fd: OwnedFd::from(f),
        })
    }

    /// Run `f` inside this namespace on a new OS thread that exits after it
    /// (the caller's thread and the runtime's threads never change
    /// namespace). Awaiting does not block the runtime.
    pub async fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let fd = self.fd.try_clone()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("enforcer-netns".into())
            .spawn(move || {
                let r = setns(fd.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(|e| io::Error::other(format!("setns(CLONE_NEWNET): {e}")))
                    .and_then(|()| {
                        drop(fd);
                        f()
                    });
                let _ = tx.send(r);
            })?;
        rx.await
            .map_err(|_| io::Error::other("the namespace thread ended without an answer"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_has_an_id() {
        let me = NetnsId::own().unwrap();
        assert_eq!(NetnsId::of_pid(std::process::id()).unwrap(), me);
        assert!(me.to_string().starts_with("net:["));
    }

    #[tokio::test]
    async fn run_in_own_namespace() {
        let ns = Netns::open_pid(std::process::id()).unwrap();
        // setns into our own namespace needs CAP_SYS_ADMIN; without it the
        // error is reported, not a panic.
        let r = ns
            .run(|| NetnsId::of_path("/proc/thread-self/ns/net"))
            .await;
        if let Ok(id) = r {
            assert_eq!(id, ns.id);
        }
    }
}
