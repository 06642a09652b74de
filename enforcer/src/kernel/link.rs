//! `BPF_LINK_CREATE` and `BPF_OBJ_PIN` by hand, for the one program aya
//! 0.14 cannot hand over as an `FdLink`: its `CgroupSockoptLink` has no
//! conversion (the other cgroup link types have one), so it could be
//! neither pinned nor kept like the others. Written deliberately by hand
//! (two syscalls); the rest of the link handling stays aya's.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `enum bpf_attach_type`: BPF_CGROUP_SETSOCKOPT.
pub const BPF_CGROUP_SETSOCKOPT: u32 = 22;

/// `union bpf_attr` as a zeroed 128-byte buffer (the kernel requires the
/// bytes past the fields of a command to be zero).
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn put_u32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, at: usize, v: u64) {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, zero-padded bpf_attr of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A bpf link attaching `prog` to the cgroup `target` (link_create: prog_fd,
/// target_fd, attach_type, flags).
pub fn cgroup_link(prog: BorrowedFd, target: BorrowedFd, attach_type: u32) -> io::Result<OwnedFd> {
    let mut a = Attr([0; 128]);
    a.put_u32(0, prog.as_raw_fd() as u32);
    a.put_u32(4, target.as_raw_fd() as u32);
    a.put_u32(8, attach_type);
    let fd = bpf(BPF_LINK_CREATE, &mut a)?;
    // SAFETY: the kernel returned a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pin `fd` at `path` on a bpffs (obj_pin: pathname, bpf_fd).
pub fn pin(fd: BorrowedFd, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in pin path"))?;
    let mut a = Attr([0; 128]);
    a.put_u64(0, c.as_ptr() as u64);
    a.put_u32(8, fd.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut a).map(|_| ())
}
